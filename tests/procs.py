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


HOLD = """
import sys, kvstore
s = kvstore.SnapshotStore(sys.argv[1])
txn = s.index.env.begin(write=True)  # the LMDB backend's own lock, held by another process
print("held", flush=True)
sys.stdin.readline()
txn.abort()
"""


def hold_write_lock(path):
    """Another process that holds the store's LMDB write lock until released."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def release(p):
    """Let a ``hold_write_lock`` process go."""
    p.stdin.write("\n")
    p.stdin.flush()
    assert p.wait(30) == 0

