"""The README's opening commands are the ones CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    (command,) = re.findall(r"^TEST_COMMAND='(.*)'$", ci, re.M)
    head = "\n".join((ROOT / "README.md").read_text().splitlines()[:15])
    assert command in head


def test_readme_opens_with_the_demo_command():
    head = "\n".join((ROOT / "README.md").read_text().splitlines()[:15])
    assert ".venv/bin/kvstore demo" in head
