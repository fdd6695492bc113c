"""TieredPromptCache: mlx-lm's LRUPromptCache contract, the disk tier, the
write-behind queue and failing open. Real MLX caches, real LMDB and blob
files, real processes holding the store's write lock or dying mid-write."""

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import ArraysCache, KVCache, LRUPromptCache

import kvstore
from kvstore import TieredPromptCache
from kvstore.codec import cache_tokens
from procs import hold_write_lock, release

ROOT = Path(__file__).resolve().parent.parent.parent
H, D = 2, 8


def kv(n, seed=0, layers=2):
    """A trimmable cache of ``n`` tokens (KVCache layers) whose values depend on (seed, position)."""
    cache = []
    for layer in range(layers):
        c = KVCache()
        k = mx.arange(n * H * D, dtype=mx.float32).reshape(1, H, n, D) + 1000 * seed + layer
        c.update_and_fetch(k, -k)
        cache.append(c)
    mx.eval([c.keys for c in cache])
    return cache


def hybrid(n, seed=0):
    """A non-trimmable cache of ``n`` tokens: recurrent state (ArraysCache) plus a KV layer."""
    a = ArraysCache(2)
    a[0] = mx.arange(6, dtype=mx.float32).reshape(1, 6) + n + 1000 * seed
    a[1] = mx.ones((1, 3)) * seed
    return [a] + kv(n, seed, layers=1)


def held(cache):
    return cache_tokens(cache)


def rows(cache, n):
    """The first ``n`` rows of every KV layer and every recurrent state, as numpy."""
    out = []
    for c in cache:
        if isinstance(c, KVCache):
            out += [np.array(c.keys[:, :, :n, :]), np.array(c.values[:, :, :n, :])]
        else:
            out += [np.array(a) for a in c.cache]
    return out


def same(a, b, n):
    ra, rb = rows(a, n), rows(b, n)
    return len(ra) == len(rb) and all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(ra, rb))


def toks(n, start=1):
    return list(range(start, start + n))


# ------------------------------------------------------------ the contract
class PromptCacheContract:
    """Behaviours of mlx-lm's LRUPromptCache, written once for every class.

    The one intended difference is stated here: ``never_empty`` classes
    serve an exact hit one token short (trimming a trimmable entry, falling
    back to a shorter checkpoint for a non-trimmable one); mlx-lm's class
    returns the whole entry and an empty remainder.
    """

    never_empty = None

    def make(self, max_size=10, max_bytes=None):
        raise NotImplementedError

    def test_miss(self):
        c = self.make()
        assert c.fetch_nearest_cache("m", [1, 2, 3]) == (None, [1, 2, 3])
        c.insert_cache("m", [5, 6, 7], kv(3))
        assert c.fetch_nearest_cache("m", [1, 2, 3]) == (None, [1, 2, 3])

    def test_exact_trimmable(self):
        c = self.make()
        c.insert_cache("m", toks(6), kv(6))
        cache, rest = c.fetch_nearest_cache("m", toks(6))
        if self.never_empty:
            assert rest == [6] and held(cache) == 5
        else:
            assert rest == [] and held(cache) == 6
        assert same(cache, kv(6), held(cache))

    def test_exact_checkpoint(self):
        c = self.make()
        c.insert_cache("m", toks(3), hybrid(3), cache_type="user")
        c.insert_cache("m", toks(6), hybrid(6), cache_type="user")
        cache, rest = c.fetch_nearest_cache("m", toks(6))
        if self.never_empty:
            assert rest == [4, 5, 6] and held(cache) == 3 and same(cache, hybrid(3), 3)
        else:
            assert rest == [] and held(cache) == 6 and same(cache, hybrid(6), 6)

    def test_shorter(self):
        c = self.make()
        c.insert_cache("m", toks(3), kv(3))
        cache, rest = c.fetch_nearest_cache("m", toks(5))
        assert rest == [4, 5] and held(cache) == 3 and same(cache, kv(3), 3)
        # a one-token prefix is not a "shorter" match in mlx-lm's trie: a
        # trimmable one is still served (as a longer entry trimmed by 0), a
        # checkpoint is not
        c.insert_cache("m", [9], kv(1))
        cache, rest = c.fetch_nearest_cache("m", [9, 8, 7])
        assert rest == [8, 7] and held(cache) == 1
        c.insert_cache("h", [9], hybrid(1))
        assert c.fetch_nearest_cache("h", [9, 8, 7]) == (None, [9, 8, 7])

    def test_longer_trimmable(self):
        c = self.make()
        c.insert_cache("m", toks(8), kv(8))
        cache, rest = c.fetch_nearest_cache("m", [1, 2, 3, 4, 99, 98])
        assert rest == [99, 98] and held(cache) == 4 and same(cache, kv(8), 4)
        # a request that is a prefix of the entry still prefills one token
        cache, rest = c.fetch_nearest_cache("m", toks(3))
        assert rest == [3] and held(cache) == 2

    def test_longer_checkpoint_is_not_trimmed(self):
        c = self.make()
        c.insert_cache("m", toks(8), hybrid(8))
        assert c.fetch_nearest_cache("m", [1, 2, 3, 4, 99]) == (None, [1, 2, 3, 4, 99])
        c.insert_cache("m", toks(2), hybrid(2))
        cache, rest = c.fetch_nearest_cache("m", [1, 2, 3, 4, 99])
        assert rest == [3, 4, 99] and held(cache) == 2

    def test_longer_beats_shorter_only_when_it_shares_more(self):
        c = self.make()
        c.insert_cache("m", toks(8), kv(8, seed=1))
        c.insert_cache("m", toks(3), hybrid(3), cache_type="user")
        cache, rest = c.fetch_nearest_cache("m", [1, 2, 3, 4, 5, 99])
        assert rest == [99] and held(cache) == 5 and same(cache, kv(8, seed=1), 5)
        cache, rest = c.fetch_nearest_cache("m", [1, 2, 3, 99])
        assert rest == [99] and held(cache) == 3 and same(cache, hybrid(3), 3)

    def test_fetch_hands_out_independent_copies(self):
        c = self.make()
        c.insert_cache("m", toks(6), kv(6))
        cache, rest = c.fetch_nearest_cache("m", toks(6) + [50, 51])
        # what generation does: append, then rewind and overwrite rows in place
        cache[0].update_and_fetch(mx.ones((1, H, 2, D)), mx.ones((1, H, 2, D)))
        cache[0].trim(5)
        cache[0].update_and_fetch(mx.full((1, H, 4, D), -7.0), mx.full((1, H, 4, D), -7.0))
        mx.eval(cache[0].keys)
        again, _ = c.fetch_nearest_cache("m", toks(6) + [50, 51])
        assert held(again) == 6 and same(again, kv(6), 6)

    def test_trimmable_insert_drops_its_prefixes(self):
        c = self.make()
        for n in (2, 3, 5):
            c.insert_cache("m", toks(n), kv(n))
        assert len(c) == 1 and c.nbytes == sum(x.nbytes for x in kv(5))
        c2 = self.make()
        for n in (2, 3, 5):
            c2.insert_cache("m", toks(n), hybrid(n))
        assert len(c2) == 3

    def test_tier_eviction_order(self):
        c = self.make(max_size=4)
        c.insert_cache("m", [10, 1], hybrid(2), cache_type="system")
        c.insert_cache("m", [20, 1], hybrid(2), cache_type="user")
        c.insert_cache("m", [21, 1], hybrid(2), cache_type="user")
        c.insert_cache("m", [30, 1], hybrid(2), cache_type="assistant")
        c.insert_cache("m", [31, 1], hybrid(2), cache_type="assistant")
        st = c.stats_by_type()
        assert [st[t]["n_sequences"] for t in ("system", "user", "assistant")] == [1, 2, 1]
        # the assistant tier does not evict the user tier below its own size
        c.insert_cache("m", [22, 1], hybrid(2), cache_type="user")
        st = c.stats_by_type()
        assert [st[t]["n_sequences"] for t in ("system", "user", "assistant")] == [1, 2, 1]
        assert c.fetch_nearest_cache("m", [20, 1, 5])[0] is None
        assert held(c.fetch_nearest_cache("m", [21, 1, 5])[0]) == 2
        assert held(c.fetch_nearest_cache("m", [31, 1, 5])[0]) == 2
        assert held(c.fetch_nearest_cache("m", [10, 1, 5])[0]) == 2

    def test_byte_limit(self):
        one = sum(x.nbytes for x in hybrid(4))
        c = self.make(max_bytes=int(2.5 * one))
        for i in range(3):
            c.insert_cache("m", [i + 1, 0, 0, 0], hybrid(4, seed=i), cache_type="user")
        assert len(c) == 2 and c.nbytes == 2 * one <= 2.5 * one
        assert c.fetch_nearest_cache("m", [1, 0, 0, 0, 9])[0] is None
        assert c.stats_by_type()["user"] == {"n_sequences": 2, "n_bytes": 2 * one}

    def test_trim_to(self):
        c = self.make()
        for i, tier in enumerate(("system", "user", "assistant", "assistant")):
            c.insert_cache("m", [i + 1, 0], hybrid(2, seed=i), cache_type=tier)
        one = c.nbytes // 4
        c.trim_to(n_sequences=3)
        assert c.stats_by_type()["assistant"]["n_sequences"] == 1
        c.trim_to(n_bytes=one)
        st = c.stats_by_type()
        assert len(c) == 1 and st["system"]["n_sequences"] == 1 and c.nbytes == one
        c.trim_to(n_sequences=0)
        assert len(c) == 0 and c.nbytes == 0

    def test_stats_by_type_shape(self):
        c = self.make()
        c.insert_cache("m", [1, 2], kv(2), cache_type="user")
        st = c.stats_by_type()
        assert set(st) == {"system", "user", "assistant"}
        assert st["user"] == {"n_sequences": 1, "n_bytes": sum(x.nbytes for x in kv(2))}
        assert st["system"] == st["assistant"] == {"n_sequences": 0, "n_bytes": 0}

    def test_reinsert_replaces(self):
        c = self.make()
        c.insert_cache("m", toks(4), hybrid(4, seed=1), cache_type="user")
        c.insert_cache("m", toks(4), hybrid(4, seed=2), cache_type="system")
        assert len(c) == 1 and c.stats_by_type()["system"]["n_sequences"] == 1
        cache, _ = c.fetch_nearest_cache("m", toks(4) + [9])
        assert same(cache, hybrid(4, seed=2), 4)

    def test_models_are_separate(self):
        c = self.make()
        c.insert_cache("a", toks(4), kv(4))
        assert c.fetch_nearest_cache("b", toks(5)) == (None, toks(5))
        assert held(c.fetch_nearest_cache("a", toks(5))[0]) == 4


class TestLRUPromptCache(PromptCacheContract):
    never_empty = False

    def make(self, max_size=10, max_bytes=None):
        return LRUPromptCache(max_size, (1 << 63) if max_bytes is None else max_bytes)


class TestTieredMemory(PromptCacheContract):
    never_empty = True

    def make(self, max_size=10, max_bytes=None):
        return TieredPromptCache(None, max_size, max_bytes)


# ----------------------------------------------------------- memory extras
def test_insert_copies_so_the_caller_may_go_on():
    c = TieredPromptCache(None)
    mine = kv(6)
    c.insert_cache("m", toks(6), mine, cache_type="user")
    # LRUPromptCache keeps the caller's objects: this would change its entry
    mine[0].trim(3)
    mine[0].update_and_fetch(mx.full((1, H, 3, D), 5.0), mx.full((1, H, 3, D), 5.0))
    mx.eval(mine[0].keys)
    cache, rest = c.fetch_nearest_cache("m", toks(7))
    assert rest == [7] and same(cache, kv(6), 6)


def test_fetch_reports_source_tier_and_kind():
    c = TieredPromptCache(None)
    c.insert_cache("m", toks(4), kv(4), cache_type="system")
    got = c.fetch("m", toks(9))
    assert (got.source, got.tier, got.kind, got.reused, got.rest) == ("memory", "system", "shorter", 4, toks(5, 5))
    assert c.fetch("m", toks(4)).kind == "exact"
    n = c.counters()
    assert n["hits.memory.system"] == 2 and n["tokens.reused"] == 4 + 3 and n["tokens.requested"] == 13


# --------------------------------------------------------------- disk tier
@pytest.fixture
def path(tmp_path):
    return tmp_path / "store"


def opts(**kw):
    return {"store_options": {"block_tokens": 16, "fsync": False}, **kw}


def test_disk_hit_after_restart_is_promoted(path):
    with TieredPromptCache(path, **opts()) as a:
        a.insert_cache("m", toks(40), kv(40, seed=3), cache_type="user")
        a.insert_cache("m", toks(20, 100), kv(20, seed=4), cache_type="system")
        a.insert_cache("m", toks(30, 200), kv(30, seed=5), cache_type="assistant")
    b = TieredPromptCache(path, **opts())
    got = b.fetch("m", toks(45))
    assert (got.source, got.tier, got.reused, got.rest) == ("disk", "user", 40, toks(5, 41))
    assert same(got.cache, kv(40, seed=3), 40)
    again = b.fetch("m", toks(45))
    assert (again.source, again.reused) == ("memory", 40)
    got = b.fetch("m", toks(20, 100))  # exact on disk: one token short
    assert (got.source, got.tier, got.reused) == ("disk", "system", 19)
    # the assistant tier is not persisted by default
    assert b.fetch("m", toks(31, 200)).cache is None
    n = b.counters()
    assert n["hits.disk"] == 2 and n["hits.disk.user"] == 1 and n["hits.memory"] == 1
    assert n["promotions"] == 2 and n["bytes.read"] > 0 and n["misses"] == 1
    b.close()


def _address(a):
    return np.asarray(memoryview(a).cast("B")).ctypes.data


def test_a_disk_hit_is_the_callers_alone_and_memory_gets_its_own_copy(path):
    """The caller's first decode write lands in place (no copy of the whole KV);
    the memory tier's promoted entry shares no buffer with it."""
    with TieredPromptCache(path, **opts()) as a:
        a.insert_cache("m", toks(300), kv(300, seed=3), cache_type="user")
    with TieredPromptCache(path, **opts()) as b:
        got = b.fetch("m", toks(305))
        assert (got.source, got.reused) == ("disk", 300)
        layer = got.cache[0]
        before = _address(layer.keys)
        assert layer.keys.shape[2] > 300  # decode headroom
        layer.update_and_fetch(mx.ones((1, 2, 1, 8), dtype=layer.keys.dtype),
                               mx.ones((1, 2, 1, 8), dtype=layer.values.dtype))
        mx.eval(layer.keys)
        assert _address(layer.keys) == before, "the first write copied the KV"
        again = b.fetch("m", toks(305))
        assert (again.source, again.reused) == ("memory", 300)
        assert same(again.cache, kv(300, seed=3), 300)
        assert _address(again.cache[0].keys) != before
        c = b.counters()
        assert c["promotions"] == 1 and c["promotions.done"] == 1


def test_persist_assistant_when_asked(path):
    with TieredPromptCache(path, persist=("system", "user", "assistant"), **opts()) as a:
        a.insert_cache("m", toks(30), kv(30), cache_type="assistant")
    with TieredPromptCache(path, **opts()) as b:
        got = b.fetch("m", toks(31))
        assert (got.source, got.tier, got.reused) == ("disk", "assistant", 30)


def test_disk_consulted_when_it_holds_more(path):
    with TieredPromptCache(path, **opts()) as a:
        a.insert_cache("m", toks(30), kv(30), cache_type="user")
    with TieredPromptCache(path, **opts()) as b:
        b.insert_cache("m", toks(10), kv(10), cache_type="assistant")
        got = b.fetch("m", toks(40))
        assert (got.source, got.reused) == ("disk", 30) and same(got.cache, kv(30), 30)
        # memory now holds the longest match: the disk is not read again
        read = b.counters()["bytes.read"]
        assert b.fetch("m", toks(40)).source == "memory" and b.counters()["bytes.read"] == read


def test_checkpoint_exact_in_memory_falls_back_to_disk(path):
    with TieredPromptCache(path, **opts()) as a:
        a.insert_cache("h", toks(20), hybrid(20), cache_type="user")
    with TieredPromptCache(path, **opts()) as b:
        b.insert_cache("h", toks(30), hybrid(30), cache_type="assistant")
        got = b.fetch("h", toks(30))
        assert (got.source, got.kind, got.reused, got.rest) == ("disk", "shorter", 20, toks(10, 21))
        assert same(got.cache, hybrid(20), 20)


def test_model_keys_resolve_to_fingerprints(path, tiny_model):
    d = str(tiny_model("llama"))
    with TieredPromptCache(path, kv_bits=8, **opts()) as c:
        assert c.fingerprint_of((d, None, None)) == kvstore.fingerprint(d, kv_bits=8)
        assert c.fingerprint_of((d, None, None)) != kvstore.fingerprint(d)
        assert c.fingerprint_of("fp-string") == "fp-string"
        c.insert_cache((d, None, None), toks(20), kv(20), cache_type="user")
        # a key that names no local model stays in memory, and nothing fails
        bad = ("no-such-org/no-such-model", None, None)
        c.insert_cache(bad, toks(20), kv(20), cache_type="user")
        assert c.fingerprint_of(bad) is None and c.fetch(bad, toks(21)).source == "memory"
        c.flush()
        assert c.counters()["models.unresolved"] == 1 and c.counters()["writes.done"] == 1
    with kvstore.SnapshotStore(path) as s:
        assert [e.fingerprint for e in s.entries()] == [kvstore.fingerprint(d, kv_bits=8)]


# --------------------------------------------------------- write-behind queue
def wait_for(pred, timeout=10):
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end
        time.sleep(0.01)


def burst(c, n, start=0):
    for i in range(start, start + n):
        c.insert_cache("m", toks(20, 100 * i + 1), kv(20, seed=i), cache_type="user")


def stored(path):
    with kvstore.SnapshotStore(path) as s:
        return sorted(e.tokens for e in s.entries()), s.verify()


@pytest.mark.parametrize("policy", ["drop", "wait"])
def test_burst_beyond_the_queue(path, policy):
    c = TieredPromptCache(path, queue_size=4, queue_policy=policy, queue_timeout=0.05, **opts())
    holder = hold_write_lock(path)
    try:
        burst(c, 1)
        # the writer took the first snapshot and waits for the lock
        wait_for(lambda: c.counters()["queue.in_flight"] == 1)
        t = time.monotonic()
        burst(c, 11, start=1)
        spent = time.monotonic() - t
        n = c.counters()
        assert n["queue.policy"] == policy and n["queue.depth"] == 4
        assert n["writes.queued"] == 5 and n["writes.dropped"] == 7 and n["writes.done"] == 0
        if policy == "wait":
            assert n["queue.waits"] == 7 and 7 * 0.05 <= spent < 5
        else:
            assert "queue.waits" not in n and spent < 1
        assert len(c) == 10  # memory keeps what the disk could not take
    finally:
        release(holder)
    assert c.close()
    n = c.counters()
    assert n["writes.done"] == 5 and n["writes.dropped"] == 7 and n["queue.depth"] == 0
    tokens, problems = stored(path)
    assert tokens == [20] * 5 and problems == []


def _writer_nice():
    """The niceness of the write-behind thread (``None`` while there is none)."""
    t = next((t for t in threading.enumerate() if t.name == "kvstore-writer" and t.is_alive()), None)
    return None if t is None else os.getpriority(os.PRIO_PROCESS, t.native_id)


def _may_raise_priority():
    """Whether this process may give a thread back a lower niceness (root, or RLIMIT_NICE)."""
    got = []

    def probe():
        me = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, me, 19)
        try:
            os.setpriority(os.PRIO_PROCESS, me, os.getpriority(os.PRIO_PROCESS, threading.main_thread().native_id))
            got.append(True)
        except OSError:
            got.append(False)

    t = threading.Thread(target=probe)
    t.start()
    t.join()
    return got[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="one thread setting another's niceness is Linux's")
@pytest.mark.parametrize("blocked", ["flush", "submit"])
def test_the_writer_runs_at_the_priority_of_a_caller_it_keeps_waiting(path, blocked):
    """The lowest priority while nobody waits for the writer; a caller's own while it
    waits (in flush, or in an insert that waits for room), the lowest again after."""
    if not _may_raise_priority():
        pytest.skip("this process may not give a thread back a lower niceness")
    caller = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert caller < 19
    c = TieredPromptCache(path, queue_size=1, queue_policy="wait", queue_timeout=30, **opts())
    holder = hold_write_lock(path)
    try:
        burst(c, 1)
        # the writer took the first snapshot and waits for the lock held by another process
        wait_for(lambda: c.counters()["queue.in_flight"] == 1)
        assert _writer_nice() == 19
        burst(c, 1, start=1)  # queued: the queue is full now
        time.sleep(0.2)
        assert _writer_nice() == 19
        waiter = threading.Thread(target=c.flush if blocked == "flush" else lambda: burst(c, 1, start=2))
        waiter.start()
        wait_for(lambda: _writer_nice() == caller)
    finally:
        release(holder)
    waiter.join(30)
    assert not waiter.is_alive()
    assert _writer_nice() == 19
    assert c.close()
    n = c.counters()
    assert n["writes.done"] == (2 if blocked == "flush" else 3) and n["writes.dropped"] == 0


def test_close_writes_everything_queued(path):
    c = TieredPromptCache(path, queue_size=64, **opts())
    holder = hold_write_lock(path)
    try:
        burst(c, 30)
        assert c.counters()["writes.done"] == 0
    finally:
        release(holder)
    c.close()
    assert c.counters()["writes.done"] == 30
    tokens, problems = stored(path)
    assert tokens == [20] * 30 and problems == []


def test_queued_snapshot_ignores_later_changes_to_the_callers_cache(path):
    c = TieredPromptCache(path, **opts())
    holder = hold_write_lock(path)
    try:
        mine = kv(40, seed=7)
        c.insert_cache("m", toks(40), mine, cache_type="user")
        # while the snapshot waits in the queue the caller rewinds and overwrites
        for layer in mine:
            layer.trim(30)
            layer.update_and_fetch(mx.full((1, H, 30, D), -1.0), mx.full((1, H, 30, D), -1.0))
        mx.eval([layer.keys for layer in mine])
    finally:
        release(holder)
    c.close()
    with kvstore.SnapshotStore(path) as s:
        cache, rest = s.fetch_nearest("m", toks(41))
        assert rest == [41] and same(cache, kv(40, seed=7), 40)


CRASH = """
import os, signal, sys
sys.path[:0] = ["tests", "tests/integration"]
from test_tiered import TieredPromptCache, kv, toks
c = TieredPromptCache(sys.argv[1], store_options={"block_tokens": 16})
for i in range(40):
    c.insert_cache("m", toks(64, 100 * i + 1), kv(64, seed=i), cache_type="user")
while c.counters()["writes.done"] < 10:
    pass
os.kill(os.getpid(), signal.SIGKILL)
"""


EXIT = """
import sys
sys.path[:0] = ["tests", "tests/integration"]
from test_tiered import TieredPromptCache, kv, toks
c = TieredPromptCache(sys.argv[1], store_options={"block_tokens": 16})
for i in range(20):
    c.insert_cache("m", toks(64, 100 * i + 1), kv(64, seed=i), cache_type="user")
"""


def test_interpreter_exit_writes_the_queue(path):
    p = subprocess.run([sys.executable, "-c", EXIT, str(path)], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert stored(path) == ([64] * 20, [])


def test_abrupt_exit_loses_only_the_queue(path):
    p = subprocess.run([sys.executable, "-c", CRASH, str(path)], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    with kvstore.SnapshotStore(path) as s:
        entries = s.entries()
        assert 10 <= len(entries) < 40 and s.verify() == []
        for e in entries:
            cache, rest = s.fetch_nearest("m", e.token_ids(s) + [1])
            i = (e.token_ids(s)[0] - 1) // 100
            assert rest == [1] and same(cache, kv(64, seed=i), 64)


# -------------------------------------------------------------- fail open
def test_deleted_blobs_are_misses(path):
    with TieredPromptCache(path, **opts()) as a:
        a.insert_cache("m", toks(40), kv(40), cache_type="user")
    shutil.rmtree(path / "blobs")
    os.mkdir(path / "blobs", 0o700)
    with TieredPromptCache(path, **opts()) as b:
        assert b.fetch_nearest_cache("m", toks(41)) == (None, toks(41))
        n = b.counters()
        assert n["misses"] == 1 and n["misses.disk"] == 1 and n["store.faults"] >= 1


def test_store_removed_under_a_running_cache(path):
    c = TieredPromptCache(path, **opts())
    c.insert_cache("m", toks(40), kv(40), cache_type="user")
    c.flush()
    shutil.rmtree(path)
    c.insert_cache("m", toks(30, 500), kv(30), cache_type="user")
    c.flush()
    got = c.fetch("m", toks(30, 500) + [1])
    assert got.source == "memory" and got.reused == 30
    c.trim_to(n_sequences=0)
    assert c.fetch_nearest_cache("m", toks(41)) == (None, toks(41))
    n = c.counters()
    assert n["writes.failed"] == 1 and n["disk.faults"] >= 1 and n["writes.done"] == 1
    c.close()


def test_unusable_store_path_gives_a_memory_cache(tmp_path):
    (tmp_path / "file").write_text("not a store")
    c = TieredPromptCache(tmp_path / "file")
    assert c.store is None and c.counters()["disk.faults.open"] == 1
    c.insert_cache("m", toks(5), kv(5), cache_type="user")
    assert c.fetch("m", toks(6)).reused == 5


def test_snapshot_the_store_refuses_is_a_dropped_write(path):
    with TieredPromptCache(path, **opts()) as c:
        c.insert_cache("m", toks(20), kv(20), cache_type="user")
        c.flush()
        # same model, another cache layout: the store refuses it
        c.insert_cache("m", toks(20, 300), kv(20, layers=3), cache_type="user")
        c.flush()
        n = c.counters()
        assert n["writes.done"] == 1 and n["writes.failed"] == 1
        assert c.fetch("m", toks(20, 300) + [1]).reused == 20


def test_counters_are_logged(caplog):
    c = TieredPromptCache(None, log_interval=1e-9)
    with caplog.at_level(logging.INFO, logger="kvstore"):
        c.insert_cache("m", toks(5), kv(5))
        c.fetch("m", toks(6))
    assert any("kvstore cache: 1 fetches, 1 memory hits" in r.getMessage() for r in caplog.records)


def test_read_only_store_serves_but_never_writes(path):
    with TieredPromptCache(path, **opts()) as a:
        a.insert_cache("m", toks(30), kv(30), cache_type="user")
    with kvstore.SnapshotStore(path, readonly=True) as s:
        c = TieredPromptCache(s)
        assert c.fetch("m", toks(31)).source == "disk"
        c.insert_cache("m", toks(20, 400), kv(20), cache_type="system")
        assert c.counters()["writes.queued"] == 0
        c.close()
    assert stored(path)[0] == [30]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")
def test_background_threads_yield_to_requests(path):
    """The writer and promotion threads run at a lower priority than the caller."""
    import threading

    with TieredPromptCache(path, **opts()) as c:
        c.insert_cache("m", toks(40), kv(40), cache_type="user")
        assert c.flush(30)
        c2 = TieredPromptCache(c.store, **opts())
        c2.fetch("m", toks(45))  # a disk hit: a promotion starts
        c2.fetch("m", toks(45))
        nice = {t.name: os.getpriority(os.PRIO_PROCESS, t.native_id) for t in threading.enumerate()
                if t.name in ("kvstore-writer", "kvstore-promote")}
        assert nice == {"kvstore-writer": 19, "kvstore-promote": 19}
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) < 19
        c2.close()
