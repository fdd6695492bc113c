"""The README's Python snippets run as written, and the demo cleans up after itself."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
KVSTORE = shutil.which("kvstore", path=os.path.dirname(sys.executable)) or "kvstore"


def readme_block(marker):
    """The README's python block that contains ``marker``, and the output block after it."""
    text = (ROOT / "README.md").read_text()
    for m in re.finditer(r"```python\n(.*?)```\n(?:\n[^\n]*\n\n```\n(.*?)```)?", text, re.S):
        if marker in m.group(1):
            return m.group(1), m.group(2)
    raise AssertionError(f"no README python block with {marker!r}")


def test_tiered_prompt_cache_snippet_runs(tmp_path, tiny_model):
    tiny_model("llama")  # built once for the session; the snippet finds it through KVSTORE_TINY_DIR
    store = "/tmp/readme-tiered"
    code, shown = readme_block(store)
    assert "TieredPromptCache(" in code
    script = tmp_path / "snippet.py"
    script.write_text(code.replace(store, str(tmp_path / "store")))
    runs = [subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
            for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    first, second = (r.stdout.strip() for r in runs)
    assert first.startswith("reused 0 of ") and "(0 disk hits, 1 misses)" in first
    assert "(1 disk hits, 0 misses)" in second and not second.startswith("reused 0 ")
    # the output the README shows is the output the snippet prints
    assert shown.strip().splitlines() == [first, second]
    assert (tmp_path / "store").is_dir()


def test_demo_removes_its_temporary_store_and_names_the_real_command(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = subprocess.run([KVSTORE, "demo"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TMPDIR": str(tmp)}, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    store = re.search(r"^store: (\S+)", out.stdout, re.M).group(1)
    assert store.startswith(str(tmp))
    assert not Path(store).exists()
    assert not [p for p in tmp.iterdir() if p.name.startswith("kvstore-")]
    last = out.stdout.strip().splitlines()[-1]
    command = re.search(r"With your own model: (\S+) serve", last).group(1)
    assert Path(tmp_path, command).resolve() == Path(KVSTORE).resolve()
