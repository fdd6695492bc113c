"""Load: several real processes put, fetch, delete, prune, gc and verify one
store at once for a bounded time. Afterwards the store verifies clean, no
process ever got a wrong cache, and every snapshot a process stored and
still held is listed and restores exactly, unless a prune or gc reported
deleting it.

``KVSTORE_LOAD_SECONDS`` (default 8) and ``KVSTORE_LOAD_PROCS`` (default 4)
set the run; the figures are printed (``pytest -s``) and, with
``KVSTORE_RELIABILITY_OUT=file``, appended to that file as JSON lines.
"""

import json
import os
import sys
import time
from pathlib import Path

import kvstore

HERE = Path(__file__).resolve().parent.parent  # tests/: the helper modules
sys.path.insert(0, str(HERE))

from procs import result, spawn  # noqa: E402
from workers import check_prefix_layers  # noqa: E402

SECONDS = float(os.environ.get("KVSTORE_LOAD_SECONDS", "8"))
PROCS = int(os.environ.get("KVSTORE_LOAD_PROCS", "4"))





def record(name, figures):
    print(f"\n{name}: {json.dumps(figures)}")
    out = os.environ.get("KVSTORE_RELIABILITY_OUT")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps({"test": name, **figures}) + "\n")


def test_mixed_load_loses_nothing_and_serves_nothing_wrong(tmp_path):
    path = str(tmp_path / "store")
    kvstore.SnapshotStore(path, block_tokens=16).close()
    t0 = time.monotonic()
    procs = [spawn("load", {"store": path, "seed": i, "seconds": SECONDS, "prefix": 120, "layers": 2})
             for i in range(PROCS)]
    results = [result(p, timeout=SECONDS + 600) for p in procs]
    wall = time.monotonic() - t0
    runs = [r for r, _ in results]

    errors = [e for r in runs for e in r["errors"]]
    assert errors == [], errors[:10]
    assert sum(r["wrong"] for r in runs) == 0
    # concurrent gc (with its grace period) and verify found nothing wrong
    problems = [p for r in runs for p in r["problems"]]
    assert problems == [], problems[:10]

    store = kvstore.SnapshotStore(path)
    assert store.verify() == []
    listed = {e.key for e in store.entries()}
    kept = {k: v for r in runs for k, v in r["kept"].items()}
    deleted_by_policy = {k for r in runs for k in r["pruned"] + r["gc_deleted"]}
    ever = {k for r in runs for k in r["stored_ever"]}
    lost = [k for k in kept if k not in listed and k not in deleted_by_policy]
    assert lost == [], f"{len(lost)} snapshots vanished without a prune or gc deleting them"
    assert listed <= ever, "the store lists snapshots no process stored"
    # every snapshot still held restores exactly (a function of its tokens)
    restored = 0
    for key, toks in kept.items():
        if key not in listed:
            continue
        cache, rest = store.fetch_nearest("synthetic", toks + [5])
        assert cache is not None and rest == [5], key
        assert check_prefix_layers(cache, toks), key
        restored += 1
    # nothing left for housekeeping: no temp files, orphans or stale records
    assert store.gc(grace=0) == []
    assert store.verify() == []
    store.close()

    ops = sum(r["ops"] for r in runs)
    by_op = {}
    for r in runs:
        for k, v in r["counts"].items():
            by_op[k] = by_op.get(k, 0) + v
    assert by_op.get("put", 0) >= PROCS and by_op.get("fetch", 0) >= PROCS
    assert by_op.get("hits", 0) > 0
    p50 = {op: round(max(r["p50_ms"].get(op, 0) for r in runs), 2) for r in runs for op in r["p50_ms"]}
    p99 = {op: round(max(r["p99_ms"].get(op, 0) for r in runs), 2) for r in runs for op in r["p99_ms"]}
    record("load", {
        "procs": PROCS, "seconds": SECONDS, "wall_s": round(wall, 1), "ops": ops,
        "ops_per_s": round(ops / SECONDS, 1), "by_op": by_op, "errors": len(errors),
        "wrong": 0, "kept": len(kept), "listed_at_end": len(listed), "restored_exactly": restored,
        "pruned": len(deleted_by_policy), "p50_ms_worst_proc": p50, "p99_ms_worst_proc": p99,
    })


def test_gc_racing_a_delete_and_a_new_put_of_the_same_tokens(tmp_path):
    """gc scans the index, then lists blob files. A snapshot another process
    deletes in between took its blobs with it: that is not a fault, and if
    the same tokens were stored again meanwhile, the new snapshot (same key,
    new blobs) must survive. The interleaving is forced by running the
    other process's delete and put from inside gc's first folder open (the
    only way to make this race happen every time)."""
    from unittest import mock

    from kvstore.backends import files
    from workers import prefix_cache, seed_tokens

    store = kvstore.SnapshotStore(tmp_path / "store", block_tokens=16)
    toks = seed_tokens(3, 80)
    key = store.put("synthetic", toks, prefix_cache(toks, 2))
    other = store.put("synthetic", seed_tokens(4, 40), prefix_cache(seed_tokens(4, 40), 2))
    real_open_dir, raced = files.open_dir, []

    def open_dir(*a, **kw):
        if not raced:
            raced.append(1)
            store.delete(key)
            assert store.put("synthetic", toks, prefix_cache(toks, 2)) == key
        return real_open_dir(*a, **kw)

    with mock.patch.object(files, "open_dir", open_dir):
        problems = store.gc(grace=3600)
    assert raced and problems == []
    assert {e.key for e in store.entries()} == {key, other}
    cache, rest = store.fetch_nearest("synthetic", toks + [5])
    assert rest == [5] and check_prefix_layers(cache, toks)
    assert store.verify() == [] and store.gc(grace=0) == []
    store.close()
