"""Several real processes on one store, and writers killed with SIGKILL mid-put."""

import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest

import kvstore
from procs import result, spawn

CRASH_RUNS = int(os.environ.get("KVSTORE_CRASH_RUNS", "6"))


def test_concurrent_writers_and_readers(tmp_path):
    """Four processes put, fetch and delete snapshots sharing one prefix (so
    they reference each other's segments) for a bounded time."""
    path = str(tmp_path / "store")
    kvstore.SnapshotStore(path, block_tokens=16).close()
    procs = [spawn("mixed", {"store": path, "seed": i, "seconds": 6, "prefix": 100}) for i in range(4)]
    results = [result(p) for p in procs]
    total_ops = sum(r["ops"] for r, _ in results)
    assert total_ops > 40
    for r, err in results:
        assert r["errors"] == 0, err[-2000:]
        assert r["wrong"] == 0
    store = kvstore.SnapshotStore(path)
    assert store.verify() == []
    kept = {k: v for r, _ in results for k, v in r["kept"].items()}
    listed = {e.key for e in store.entries()}
    # everything a process stored and did not delete is still there
    assert set(kept) <= listed
    check, _ = result(spawn("check_all", {"store": path, "kind": "prefix"}))
    assert check == {"ok": len(listed), "bad": 0}
    assert [p for p in store.gc(grace=0) if p.kind != "temp"] == []
    store.close()


def blob_ids_on_disk(path):
    return {p.name.split(".")[0] for p in Path(path, "blobs").glob("*/*.safetensors")}


def test_sigkill_mid_put_leaves_nothing_a_reader_trusts(tmp_path):
    path = str(tmp_path / "store")
    kvstore.SnapshotStore(path, block_tokens=16).close()
    rng = random.Random(1)
    seed = 1
    torn = 0  # runs whose kill left a temp file or an unindexed blob behind
    for run in range(CRASH_RUNS):
        # 8 layers of 6,000 tokens: each put writes ~25 MB, so a kill lands mid-write
        proc = spawn("writer", {"store": path, "first_seed": seed, "tokens": 6000, "layers": 8})
        # wait for the process to start writing, then kill it at a random moment
        line = proc.stdout.readline()
        assert line, proc.stderr.read()[-2000:]
        time.sleep(rng.uniform(0.0, 0.25))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        seed += 1000
        store = kvstore.SnapshotStore(path)
        referenced = {b for e in store.entries() for b in e.blobs}
        torn += bool(list(Path(path, "tmp").iterdir()) or blob_ids_on_disk(path) - referenced)
        assert store.verify() == [], run
        store.close()
        check, _ = result(spawn("check_all", {"store": path}))
        assert check["bad"] == 0 and check["ok"] >= 1
    assert torn >= 1, "no kill landed inside a put: the test proved nothing"
    store = kvstore.SnapshotStore(path)
    store.gc(grace=0)
    assert list(Path(path, "tmp").iterdir()) == []
    referenced = {b for e in store.entries() for b in e.blobs}
    assert blob_ids_on_disk(path) == referenced
    assert store.verify() == [] and store.gc(grace=0) == []
    store.close()


def test_gc_grace_spares_a_put_in_flight(tmp_path):
    """A blob written but not yet indexed (a put in flight) survives gc with a grace period."""
    path = tmp_path / "store"
    store = kvstore.SnapshotStore(path)
    blob_id = store.blobs.write({}, {}).blob.hex()
    assert store.gc(grace=60) == []
    assert blob_id in blob_ids_on_disk(path)
    old = time.time() - 120
    p = next(Path(path, "blobs").glob(f"*/{blob_id}.safetensors"))
    os.utime(p, (old, old))
    assert [x.kind for x in store.gc(grace=60)] == ["orphan"]
    assert blob_id not in blob_ids_on_disk(path)


@pytest.mark.slow
def test_many_crashes(tmp_path, monkeypatch):
    """The long version: ``KVSTORE_CRASH_RUNS=100 pytest -m slow``."""
    monkeypatch.setattr(sys.modules[__name__], "CRASH_RUNS", max(CRASH_RUNS, 100))
    test_sigkill_mid_put_leaves_nothing_a_reader_trusts(tmp_path)
