"""Self-repair: a damaged blob is quarantined with everything that reads it,
and the next request stores a good copy.

Bytes are flipped in real blob files of real stores; a fresh process then
restores the rewritten snapshot and its logits are compared with a cold
prefill. Several processes reading and writing one store while a damaged
shared segment is quarantined leave it clean: no snapshot reads the
quarantined blob, ``verify`` and ``gc`` find nothing, every snapshot left
restores exactly.
"""

import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

import kvstore
from procs import result, run_worker, spawn
from workers import seed_tokens, synthetic_prefix_cache


def prompt(n, seed):
    return [int(t) for t in np.random.RandomState(seed).randint(5, kvstore.tiny.VOCAB_SIZE, n)]


def blob_path(store_path, blob_id):
    return Path(store_path) / "blobs" / blob_id[:2] / f"{blob_id}.safetensors"


def flip(path, offset=-64):
    """Flip one byte of a real blob file in place (inside its tensor data)."""
    with open(path, "r+b") as f:
        f.seek(offset, 2)
        b = f.read(1)
        f.seek(offset, 2)
        f.write(bytes([b[0] ^ 0xFF]))


def test_damaged_shared_segment_is_quarantined_and_stored_again(tmp_path, tiny_model, load_tiny):
    model, _ = load_tiny("llama")
    fp = kvstore.fingerprint(tiny_model("llama"))
    path = tmp_path / "store"
    store = kvstore.SnapshotStore(path, block_tokens=16)
    system, user = prompt(48, 1), prompt(12, 2)
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array(system)[None], cache=cache))
    assert store.put(fp, system, cache, tier="system")
    mx.eval(model(mx.array(user)[None], cache=cache))
    assert store.put(fp, system + user, cache, tier="user")
    by_tier = {e.tier: e for e in store.entries()}
    shared = by_tier["system"].blobs[0]
    assert shared in by_tier["user"].blobs  # the user snapshot reads the system prompt's segment
    flip(blob_path(path, shared))

    tiered = kvstore.TieredPromptCache(store, log_interval=None)
    got = tiered.fetch(fp, system + user + [7])
    assert got.cache is None and got.source is None  # a miss, not a hit
    c = tiered.counters()
    assert c["hits"] == 0 and c["faults"] >= 1 and c["store.misses.corrupt"] >= 1
    assert store.repairs.wait(120)
    # the damaged blob and both snapshots reading it are out of service
    assert not blob_path(path, shared).exists()
    assert (path / "quarantine" / f"{shared}.safetensors").exists()
    assert store.entries() == [] and store.total_bytes() == 0
    assert store.lookup(fp, system + [0]) is None  # kvstore warm prefills it again
    assert store.verify() == [] and [p for p in store.gc(grace=0) if p.kind != "temp"] == []
    assert store.counters["quarantined"] == 1 and store.counters["repaired_snapshots"] == 2

    # the next request prefills and stores a good copy through the normal write path
    got = tiered.fetch(fp, system + [7])
    assert got.cache is None
    fresh = make_prompt_cache(model)
    mx.eval(model(mx.array(system)[None], cache=fresh))
    tiered.insert_cache(fp, system, fresh, cache_type="system")
    assert tiered.flush(30)
    tiered.close()
    [e] = store.entries()
    assert shared not in e.blobs and store.verify() == []
    store.close()

    # one restart later the prefix hits again, exactly
    [res] = run_worker("fetch_compare", {"cases": [{"model": str(tiny_model("llama")), "store": str(path),
                                                    "prompt": system, "suffix": user}]})
    assert res["hit"] and res["rest"] == len(user)
    assert res["max_diff"] <= 1e-5 and res["argmax_equal"]


def test_damaged_state_blob_removes_only_its_snapshot(tmp_path):
    """A blob of one snapshot's own (here the rows only it holds) goes with that snapshot alone."""
    store = kvstore.SnapshotStore(tmp_path / "s", block_tokens=16)
    base = seed_tokens(3, 64)
    a, b = base + [1500] * 20, base + [1600] * 20
    for toks in (base, a, b):
        assert store.put("synthetic", toks, synthetic_prefix_cache(toks))
    # storing it again (a server re-inserting its system prompt) is no hit: HITS counts loads served
    assert store.put("synthetic", base, synthetic_prefix_cache(base))
    assert [e.hits for e in store.entries()] == [0, 0, 0]
    own = {e.tokens: e for e in store.entries()}
    key_a = next(e.key for e in store.entries() if store.tokens_of(e.key) == a)
    blob_a = [x for x in {e.key: e for e in store.entries()}[key_a].blobs if x not in own[64].blobs][0]
    flip(blob_path(store.path, blob_a))
    cache, rest = store.fetch_nearest("synthetic", a + [5])
    assert len(rest) > 1  # not served by the damaged snapshot
    assert store.repairs.wait(120)
    left = {tuple(store.tokens_of(e.key)) for e in store.entries()}
    assert left == {tuple(base), tuple(b)}
    assert store.verify() == []
    store.close()


def test_quarantine_while_other_processes_read_and_write(tmp_path):
    """Three processes put, fetch and delete snapshots over one shared prefix
    while its segment is damaged and quarantined: no errors, no wrong hits,
    and the store ends clean with nothing reading the quarantined blob."""
    path = tmp_path / "store"
    store = kvstore.SnapshotStore(path, block_tokens=16)
    base = seed_tokens(7, 100)  # the prefix every worker shares
    assert store.put("synthetic", base, synthetic_prefix_cache(base), tier="system")
    [shared] = store.entries()[0].blobs
    procs = [spawn("mixed", {"store": str(path), "seed": i, "seconds": 6, "prefix": 100}) for i in range(3)]
    time.sleep(2.0)
    flip(blob_path(path, shared))
    deadline = time.monotonic() + 20
    while blob_path(path, shared).exists() and time.monotonic() < deadline:
        store.fetch_nearest("synthetic", base + [5])
        store.retry_failed()
        store.repairs.wait(10)
    results = [result(p) for p in procs]
    for r, err in results:
        assert r["errors"] == 0, err[-2000:]
        assert r["wrong"] == 0
    assert not blob_path(path, shared).exists()
    assert (path / "quarantine" / f"{shared}.safetensors").exists()
    listed = store.entries()
    assert all(shared not in e.blobs for e in listed)
    assert store.verify() == []
    assert [p for p in store.gc(grace=0) if p.kind != "temp"] == []
    check, _ = result(spawn("check_all", {"store": str(path), "kind": "prefix"}))
    assert check == {"ok": len(listed), "bad": 0}
    # and the shared prefix is stored again on the next put
    assert store.put("synthetic", base, synthetic_prefix_cache(base), tier="system")
    cache, rest = store.fetch_nearest("synthetic", base + [5])
    assert cache is not None and rest == [5]
    store.close()
