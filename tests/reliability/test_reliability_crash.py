"""Crashes: a process is SIGKILLed at a random moment of ``put``, ``prune``,
``gc`` or ``import``. After every kill the store verifies clean, every
snapshot it lists restores exactly (no reader gets a wrong or partial
cache), and ``gc`` brings it back to a clean state (no temp files, no
orphan blobs, every referenced blob present).

Each run is classified by what the kill left behind, to show the kills
land inside the operation and not only before or after it: ``before``
(nothing changed yet), ``inside`` (temp files, orphan blobs, a partial
prune / gc / import) or ``after`` (the operation had finished).

``KVSTORE_CRASH_RUNS`` runs per operation (default 2); the figures are
printed (``pytest -s``) and appended to ``KVSTORE_RELIABILITY_OUT``.
"""

import json
import os
import random
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import kvstore
import procs
from kvstore import blobs as B
from kvstore.backends.files import blob_relpath

HERE = Path(__file__).resolve().parent.parent  # tests/: the helper modules
sys.path.insert(0, str(HERE))

from test_reliability_load import record  # noqa: E402
from workers import HYBRID, check_hybrid, check_prefix_layers, hybrid_cache, prefix_cache, seed_tokens  # noqa: E402

RUNS = int(os.environ.get("KVSTORE_CRASH_RUNS", "2"))
def spawn(args):
    return procs.spawn("crash_op", args)


def wait_ready(proc):
    line = proc.stdout.readline()
    assert line and "ready" in line, proc.stderr.read()[-3000:]


def blob_ids(path):
    return {p.name.split(".")[0] for p in Path(path, "blobs").glob("*/*.safetensors")}


def tmp_files(path):
    return list(Path(path, "tmp").iterdir())


def referenced(store):
    return {b for e in store.entries() for b in e.blobs}


def check_readers(store):
    """Every listed snapshot restores exactly; returns how many."""
    n = 0
    for e in store.entries():
        toks = store.tokens_of(e.key)
        cache, rest = store.fetch_nearest(e.fingerprint, toks + [5])
        assert cache is not None and rest == [5], e.key
        ok = check_hybrid(cache, toks) if e.fingerprint == HYBRID else check_prefix_layers(cache, toks)
        assert ok, f"snapshot {e.key} restored wrong KV"
        n += 1
    return n


def check_clean_after_gc(store, path, verify_first=True):
    if verify_first:
        assert store.verify() == []
    store.gc(grace=0)
    assert tmp_files(path) == []
    assert blob_ids(path) == referenced(store)
    assert store.verify() == [] and store.gc(grace=0) == []


def fill(store, count, seed, prefix=300):
    """``count`` snapshots sharing a prefix (shared segments), a few hybrid ones (state blobs)."""
    rng = np.random.RandomState(seed)
    base = seed_tokens(11, prefix)
    for i in range(count):
        toks = base[: rng.randint(prefix // 2, prefix + 1)] + [int(t) for t in rng.randint(2000, 3000, 30)]
        if i % 8 == 7:
            assert store.put(HYBRID, toks, hybrid_cache(toks), tier="user")
        else:
            assert store.put("synthetic", toks, prefix_cache(toks, 2), tier=["system", "user", "assistant"][i % 3])


def kill_at(proc, delay):
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()


def timed_run(args):
    """Run one operation to its end; return its duration from ``ready``."""
    proc = spawn(args)
    wait_ready(proc)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])["result"]["seconds"]


# ------------------------------------------------------------------ one op each
def crash_put(tmp_path, rng, runs):
    path = str(tmp_path / "put")
    store = kvstore.SnapshotStore(path, block_tokens=16)
    outcomes = Counter()
    for run in range(runs):
        proc = spawn({"store": path, "op": "put", "seed": run, "prefix": 1500, "layers": 4})
        wait_ready(proc)
        kill_at(proc, rng.uniform(0.0, 0.8))
        torn = bool(tmp_files(path)) or bool(blob_ids(path) - referenced(store))
        outcomes["inside" if torn else "between"] += 1
        assert store.verify() == [], run
        check_readers(store)
        if run % 10 == 9 or run == runs - 1:
            check_clean_after_gc(store, path)
            if len(store.entries()) > 40:
                store.prune(max_bytes=0)
    store.close()
    return outcomes


def crash_prune(tmp_path, rng, runs):
    path = str(tmp_path / "prune")
    store = kvstore.SnapshotStore(path, block_tokens=16, fsync=False)
    outcomes, count = Counter(), 400
    fill(store, count, seed=0)
    span = timed_run({"store": path, "op": "prune"})
    for run in range(runs):
        fill(store, count - len(store.entries()), seed=run + 1)
        before = len(store.entries())
        proc = spawn({"store": path, "op": "prune"})
        wait_ready(proc)
        kill_at(proc, rng.uniform(0.0, 1.2 * span))
        left = len(store.entries())
        orphans = blob_ids(path) - referenced(store)
        outcomes["before" if left == before and not orphans else "after" if left == 0 and not orphans
                 else "inside"] += 1
        assert store.verify() == [], run
        check_readers(store)
        check_clean_after_gc(store, path)
    store.close()
    return outcomes, span


def make_mess(store, path, rng, orphans=1500, broken=6):
    """Old orphan blobs, old temp files and records whose blobs are gone: work for gc."""
    old = time.time() - 7200
    for _ in range(orphans):
        blob_id = store.blobs.write({"x": ("F32", np.zeros(4, np.float32), None)}, {}).blob.hex()
        os.utime(Path(path, "blobs", blob_relpath(blob_id)), (old, old))
    for i in range(200):
        p = Path(path, "tmp", f"{B.new_id()}.tmp")
        p.write_bytes(b"half a blob")
        os.utime(p, (old, old))
    for i in range(broken):
        toks = seed_tokens(int(rng.integers(10_000, 1 << 30)), 40)
        key = store.put("synthetic", toks, prefix_cache(toks, 2), tier="assistant")
        (e,) = [e for e in store.entries() if e.key == key]
        store.blobs.unlink(e.blobs[-1])


def crash_gc(tmp_path, rng, runs):
    path = str(tmp_path / "gc")
    store = kvstore.SnapshotStore(path, block_tokens=16, fsync=False)
    fill(store, 40, seed=0)
    good = {e.key for e in store.entries()}
    nprng = np.random.default_rng(0)
    make_mess(store, path, nprng)
    span = timed_run({"store": path, "op": "gc"})
    outcomes = Counter()
    for run in range(runs):
        make_mess(store, path, nprng)
        mess = len(tmp_files(path)) + len(blob_ids(path) - referenced(store)) + len(store.entries())
        proc = spawn({"store": path, "op": "gc"})
        wait_ready(proc)
        kill_at(proc, rng.uniform(0.0, 1.2 * span))
        left = len(tmp_files(path)) + len(blob_ids(path) - referenced(store)) + len(store.entries())
        outcomes["before" if left == mess else "after" if left == len(good) else "inside"] += 1
        # a killed gc never removes a good snapshot; records with missing blobs are misses
        assert good <= {e.key for e in store.entries()}
        for e in store.entries():
            if e.key not in good:  # its blob is gone: a miss, never a partial cache
                toks = store.tokens_of(e.key)
                assert store.fetch_nearest("synthetic", toks + [5]) == (None, toks + [5])
        check_clean_after_gc(store, path, verify_first=False)
        assert {e.key for e in store.entries()} == good
        check_readers(store)
    store.close()
    return outcomes, span


def crash_import(tmp_path, rng, runs):
    src = kvstore.SnapshotStore(tmp_path / "src", block_tokens=16, fsync=False)
    fill(src, 48, seed=5, prefix=1200)
    want = {e.key for e in src.entries()}
    archive = str(tmp_path / "snapshots.tar")
    src.export_archive(archive)
    src.close()
    kvstore.SnapshotStore(tmp_path / "calibrate", block_tokens=16).close()
    span = timed_run({"store": str(tmp_path / "calibrate"), "op": "import", "archive": archive})
    outcomes = Counter()
    for run in range(runs):
        path = str(tmp_path / f"import-{run}")
        kvstore.SnapshotStore(path, block_tokens=16).close()
        proc = spawn({"store": path, "op": "import", "archive": archive})
        wait_ready(proc)
        kill_at(proc, rng.uniform(0.0, 1.2 * span))
        store = kvstore.SnapshotStore(path)
        got = {e.key for e in store.entries()}
        torn = bool(tmp_files(path)) or bool(blob_ids(path) - referenced(store))
        outcomes["after" if got == want and not torn else "before" if not got and not torn else "inside"] += 1
        assert got <= want
        assert store.verify() == [], run
        check_readers(store)
        check_clean_after_gc(store, path)
        # importing again completes what the kill interrupted
        added, _, problems = store.import_archive(archive)
        assert problems == [] and added == len(want - got)
        assert {e.key for e in store.entries()} == want
        if run % 5 == 0:
            assert check_readers(store) == len(want)
        check_clean_after_gc(store, path)
        store.close()
        import shutil

        shutil.rmtree(path)
    return outcomes, span


@pytest.mark.parametrize("op", ["put", "prune", "gc", "import"])
def test_sigkill_at_a_random_moment(tmp_path, op):
    rng = random.Random(f"crash-{op}")
    t0 = time.monotonic()
    span = None
    if op == "put":
        outcomes = crash_put(tmp_path, rng, RUNS)
    else:
        outcomes, span = {"prune": crash_prune, "gc": crash_gc, "import": crash_import}[op](tmp_path, rng, RUNS)
    record(f"crash-{op}", {"runs": RUNS, "outcomes": dict(outcomes), "op_seconds": span and round(span, 4),
                           "wall_s": round(time.monotonic() - t0, 1), "wrong_or_partial_reads": 0,
                           "unclean_after_gc": 0})
    if RUNS >= 10:
        # enough runs that some kills must land inside the operation
        assert outcomes["inside"] >= 1, outcomes
