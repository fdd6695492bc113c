"""When a memory hit skips the disk lookup: only when the disk could add less than a block."""

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from kvstore import TieredPromptCache


def kv(n, seed=0):
    cache = []
    for layer in range(2):
        c = KVCache()
        k = mx.arange(n * 2 * 8, dtype=mx.float32).reshape(1, 2, n, 8) + 1000 * seed + layer
        c.update_and_fetch(k, -k)
        cache.append(c)
    mx.eval([c.keys for c in cache])
    return cache


def test_memory_covering_every_full_block_skips_the_disk(tmp_path):
    opts = {"store_options": {"block_tokens": 16, "fsync": False}}
    base = list(range(1, 41))
    with TieredPromptCache(tmp_path / "s", **opts) as a:
        a.insert_cache("m", base + [7, 7, 7], kv(43), cache_type="user")  # 43 tokens on disk
    with TieredPromptCache(tmp_path / "s", **opts) as b:
        b.insert_cache("m", base[:33], kv(33, seed=1), cache_type="system")  # 33 in memory (memory only now)
        b.flush()
        # 47 tokens: full blocks end at 32; memory serves 33, the disk's 43 adds 10: no lookup
        got = b.fetch("m", base + [7, 7, 7, 9, 9, 9, 9])
        assert (got.source, got.reused) == ("memory", 33)
        assert b.counters()["disk.skipped"] == 1 and b.counters().get("disk.lookups", 0) == 0
        # 50 tokens: full blocks end at 48, past what memory serves: the disk is asked and serves 43
        got = b.fetch("m", base + [7, 7, 7] + [9] * 7)
        assert (got.source, got.reused) == ("disk", 43)
        assert b.counters()["disk.lookups"] == 1
