"""Starting worker processes (tests/workers.py roles) and reading their results."""

import json
import subprocess
import sys
from pathlib import Path

WORKERS = Path(__file__).parent / "workers.py"


def spawn(role, args):
    """Start ``workers.py ROLE ARGS`` with piped output."""
    return subprocess.Popen([sys.executable, str(WORKERS), role, json.dumps(args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result(proc, timeout=300):
    """Wait for a worker; return ``(its result, its stderr)``; fail if it failed."""
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])["result"], err


def run_worker(role, args, timeout=300):
    """Run a worker to the end and return its result."""
    return result(spawn(role, args), timeout)[0]
