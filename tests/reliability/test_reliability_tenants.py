"""Tenants: with per-tenant salts one tenant can never fetch, look up, or
share segments with another's snapshots, even for the same tokens, in the
store and in TieredPromptCache (memory tier included). The lookup timing
side channel is measured and recorded (see RELIABILITY.md)."""

import statistics
import sys
import time
from pathlib import Path


import kvstore
from kvstore import TieredPromptCache

HERE = Path(__file__).resolve().parent.parent  # tests/: the helper modules
sys.path.insert(0, str(HERE))

from test_reliability_load import record  # noqa: E402
from workers import check_prefix_layers, prefix_cache, seed_tokens  # noqa: E402

FP = "synthetic"
SYSTEM = seed_tokens(31, 600)  # a "secret" system prompt


def test_same_tokens_other_tenant_is_unreachable(store):
    key_a = store.put(FP, SYSTEM, prefix_cache(SYSTEM, 2), tenant="acme")
    for tenant in ("globex", None, b"acme\0", "ACME"):
        assert store.fetch_nearest(FP, SYSTEM + [5], tenant=tenant) == (None, SYSTEM + [5])
        assert store.lookup(FP, SYSTEM + [5], tenant=tenant) is None
        # any prefix or extension of it too
        assert store.lookup(FP, SYSTEM[:300], tenant=tenant) is None
    cache, rest = store.fetch_nearest(FP, SYSTEM + [5], tenant="acme")
    assert rest == [5] and check_prefix_layers(cache, SYSTEM)
    # the same tokens stored by another tenant are another snapshot with other blobs
    key_b = store.put(FP, SYSTEM, prefix_cache(SYSTEM, 2), tenant="globex")
    assert key_b != key_a
    blobs = {e.key: set(e.blobs) for e in store.entries()}
    assert not blobs[key_a] & blobs[key_b]
    # deleting one tenant's snapshot leaves the other's whole
    store.delete(key_a)
    assert store.fetch_nearest(FP, SYSTEM + [5], tenant="acme")[0] is None
    assert store.fetch_nearest(FP, SYSTEM + [5], tenant="globex")[0] is not None
    assert store.verify() == []


def test_dedup_never_shares_segments_across_tenants(store):
    """Within a tenant a shared prefix is stored once; across tenants never."""
    a1, a2 = SYSTEM + [2001, 2002], SYSTEM + [2003]
    b1 = SYSTEM + [2004, 2005, 2006]
    store.put(FP, a1, prefix_cache(a1, 2), tenant="acme")
    shared = store.counters["put_tokens_shared"]
    store.put(FP, a2, prefix_cache(a2, 2), tenant="acme")
    assert store.counters["put_tokens_shared"] - shared == len(SYSTEM)  # same tenant: shared
    shared = store.counters["put_tokens_shared"]
    store.put(FP, b1, prefix_cache(b1, 2), tenant="globex")
    store.put(FP, b1 + [7], prefix_cache(b1 + [7], 2))  # no tenant at all
    assert store.counters["put_tokens_shared"] == shared  # other tenants: nothing shared
    entries = store.entries()
    by_tenant = {}
    for e in entries:
        toks = store.tokens_of(e.key)
        tenant = "globex" if toks[:len(b1)] == b1 and len(toks) == len(b1) else (
            None if len(toks) == len(b1) + 1 else "acme")
        by_tenant.setdefault(tenant, set()).update(e.blobs)
    assert not by_tenant["acme"] & by_tenant["globex"]
    assert not by_tenant["acme"] & by_tenant[None] and not by_tenant["globex"] & by_tenant[None]
    for toks, tenant in ((a1, "acme"), (a2, "acme"), (b1, "globex"), (b1 + [7], None)):
        cache, rest = store.fetch_nearest(FP, toks + [5], tenant=tenant)
        assert rest == [5] and check_prefix_layers(cache, toks)


def _median_us(fn, n):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1e6, 1)


def test_lookup_timing_side_channel(store):
    """Without salts, whether a prefix is stored is observable (the lookup
    answers it, and its latency differs); with per-tenant salts another
    tenant's entries are unreachable, so the probe sees the same as for a
    prefix nobody stored. Figures are recorded, the functional part asserted."""
    other = seed_tokens(32, 600)
    for i in range(200):  # a populated store
        t = seed_tokens(1000 + i, 200)
        store.put(FP, t, prefix_cache(t, 1))
    store.put(FP, SYSTEM, prefix_cache(SYSTEM, 1))
    store.put(FP, SYSTEM, prefix_cache(SYSTEM, 1), tenant="victim")
    probe, miss = SYSTEM + [5], other + [5]
    n = 400
    figures = {
        "no_salt_stored_us": _median_us(lambda: store.lookup(FP, probe), n),
        "no_salt_unstored_us": _median_us(lambda: store.lookup(FP, miss), n),
        "salted_other_tenant_stored_us": _median_us(lambda: store.lookup(FP, probe, tenant="attacker"), n),
        "salted_other_tenant_unstored_us": _median_us(lambda: store.lookup(FP, miss, tenant="attacker"), n),
        "salted_own_tenant_stored_us": _median_us(lambda: store.lookup(FP, probe, tenant="victim"), n),
    }
    # the functional side channel: without a salt the answer itself tells
    assert store.lookup(FP, probe).tokens == len(SYSTEM)
    assert store.lookup(FP, miss) is None
    # with salts the attacker's probes of a stored and an unstored prefix look alike
    assert store.lookup(FP, probe, tenant="attacker") is None
    assert store.lookup(FP, miss, tenant="attacker") is None
    assert store.lookup(FP, probe, tenant="victim").tokens == len(SYSTEM)
    record("tenant-timing", figures)


def test_tiered_prompt_cache_keeps_tenants_apart(tmp_path):
    path = tmp_path / "store"
    toks = SYSTEM[:200]
    with TieredPromptCache(path, store_options={"block_tokens": 16}) as c:
        c.insert_cache(FP, toks, prefix_cache(toks, 2), cache_type="system", tenant="acme")
        # memory tier: the other tenant (and no tenant) misses
        for tenant in ("globex", None):
            got = c.fetch(FP, toks + [5], tenant=tenant)
            assert got.cache is None and got.rest == toks + [5], tenant
        got = c.fetch(FP, toks + [5], tenant="acme")
        assert got.source == "memory" and got.reused == 200 and check_prefix_layers(got.cache, toks)
        assert c.flush(30)
    # disk tier after a restart: the same
    with TieredPromptCache(path) as c:
        for tenant in ("globex", None):
            cache, rest = c.fetch_nearest_cache(FP, toks + [5], tenant=tenant)
            assert cache is None and rest == toks + [5]
        got = c.fetch(FP, toks + [5], tenant="acme")
        assert got.source == "disk" and got.reused == 200 and check_prefix_layers(got.cache, toks)
        # promoted into memory under the tenant's key only
        assert c.fetch(FP, toks + [5], tenant="acme").source == "memory"
        assert c.fetch(FP, toks + [5], tenant="globex").cache is None
    with kvstore.SnapshotStore(path) as s:
        assert s.lookup(FP, toks + [5]) is None
        assert s.lookup(FP, toks + [5], tenant="acme").tokens == 200
