"""Every mlx-lm cache class round-trips through the store, then keeps decoding
exactly like the original. Tiny real MLX arrays (mx.arange-based)."""

import copy

import mlx.core as mx
import pytest
from mlx_lm.models import cache as C

import kvstore
from kvstore import codec


def kv(n, seed, h=2, d=32):
    base = mx.arange(n * h * d, dtype=mx.float32).reshape(1, h, n, d) * 1e-3 + seed
    return base, -base + 0.5


def fill(c, n, seed):
    """Feed ``n`` tokens into cache ``c`` in a few uneven steps, like a prefill then decode."""
    done = 0
    for step in (max(1, n - 3), 1, 1, 1):
        step = min(step, n - done)
        if step <= 0:
            break
        _update(c, step, seed + done)
        done += step
    return c


def _update(c, step, seed):
    if isinstance(c, C.CacheList):
        for sub in c.caches:
            _update(sub, step, seed)
    elif isinstance(c, C.ArraysCache):
        for i in range(len(c.cache)):
            prev = c.cache[i] if c.cache[i] is not None else mx.zeros((1, 3, 8))
            c.cache[i] = prev * 0.5 + seed * (i + 1)
    else:
        k, v = kv(step, seed)
        c.update_and_fetch(k, v)


def outputs(c, steps, seed):
    """What further updates return: the decode-time view of the cache."""
    out = []
    for i in range(steps):
        if isinstance(c, C.CacheList):
            out.extend(outputs_list(c, seed + i))
            continue
        if isinstance(c, C.ArraysCache):
            _update(c, 1, seed + i)
            out.extend(a for a in c.cache if a is not None)
            continue
        k, v = kv(1, seed + i)
        ka, va = c.update_and_fetch(k, v)
        out += list(ka) if isinstance(ka, tuple) else [ka]
        out += list(va) if isinstance(va, tuple) else [va]
    return out


def outputs_list(cl, seed):
    res = []
    for sub in cl.caches:
        res.extend(outputs(sub, 1, seed))
    return res


def tokens_of(c):
    n = codec.cache_tokens([c])
    return 12 if n is None else n


CASES = {
    "KVCache": lambda: fill(C.KVCache(), 40, 1),
    "QuantizedKVCache": lambda: fill(C.QuantizedKVCache(group_size=32, bits=8), 40, 1),
    "ConcatenateKVCache": lambda: fill(C.ConcatenateKVCache(), 40, 1),
    "RotatingKVCache-unwrapped": lambda: fill(C.RotatingKVCache(max_size=64, keep=4), 40, 1),
    "RotatingKVCache-wrapped": lambda: fill(C.RotatingKVCache(max_size=16, keep=4), 40, 1),
    "ChunkedKVCache": lambda: fill(C.ChunkedKVCache(chunk_size=64), 40, 1),
    "ChunkedKVCache-slid": lambda: _slid_chunked(),
    "ArraysCache": lambda: fill(C.ArraysCache(size=2), 12, 1),
    "CacheList": lambda: fill(C.CacheList(C.ArraysCache(size=2), C.KVCache()), 12, 1),
    "CacheList-nested": lambda: fill(
        C.CacheList(C.CacheList(C.KVCache(), C.RotatingKVCache(max_size=8)), C.ArraysCache(size=1)), 12, 1
    ),
}
TRIMMABLE = {"KVCache", "QuantizedKVCache", "ConcatenateKVCache", "RotatingKVCache-unwrapped", "ChunkedKVCache"}


def _slid_chunked():
    c = fill(C.ChunkedKVCache(chunk_size=16), 40, 1)
    c.maybe_trim_front()
    assert c.start_position > 0
    return c


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_then_identical_updates(tmp_path, name):
    store = kvstore.SnapshotStore(tmp_path / "s", block_tokens=8)
    orig = CASES[name]()
    n = tokens_of(orig)
    toks = list(range(1, n + 1))
    key = store.put("fp-" + name, toks, [orig])
    assert key
    (entry,) = store.entries()
    assert entry.trimmable == (name in TRIMMABLE)
    restored, rest = store.fetch_nearest("fp-" + name, toks + [99])
    assert restored is not None and rest == [99], name
    (r,) = restored
    assert type(r) is type(orig)
    twin = copy.deepcopy(orig)
    a, b = outputs(twin, 5, 7), outputs(r, 5, 7)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.shape == y.shape and x.dtype == y.dtype
        assert mx.array_equal(x, y), name


@pytest.mark.parametrize("name", sorted(TRIMMABLE))
def test_trimmable_serves_a_prefix(tmp_path, name):
    store = kvstore.SnapshotStore(tmp_path / "s", block_tokens=8)
    orig = CASES[name]()
    toks = list(range(1, 41))
    store.put("fp", toks, [orig])
    restored, rest = store.fetch_nearest("fp", toks[:25] + [500])
    assert rest == [500]
    (r,) = restored
    assert r.offset == 25
    # the prefix equals the original trimmed to 25 tokens
    twin = copy.deepcopy(orig)
    twin.trim(40 - 25)
    if isinstance(twin, C.ConcatenateKVCache):
        # mlx-lm's trim only lowers the offset; the next update would
        # concatenate onto the stale rows. The truly trimmed cache is the reference.
        twin.keys, twin.values = twin.keys[..., :25, :], twin.values[..., :25, :]
    for x, y in zip(outputs(twin, 2, 3), outputs(r, 2, 3)):
        assert mx.array_equal(x, y), name


def test_unknown_class_and_batched_caches_are_refused(tmp_path):
    store = kvstore.SnapshotStore(tmp_path / "s")

    class MyCache(C.KVCache):
        pass

    with pytest.raises(kvstore.UnsupportedCache, match="not supported"):
        store.put("fp", [1, 2], [fill(MyCache(), 2, 1)])
    batched = C.KVCache()
    k = mx.zeros((2, 2, 4, 32))
    batched.update_and_fetch(k, k)
    with pytest.raises(kvstore.UnsupportedCache, match="heads, tokens"):
        store.put("fp", [1, 2, 3, 4], [batched])
    assert store.entries() == []


def test_decode_refuses_unknown_class_names():
    layout = [{"c": "os.system", "n": 1}]
    with pytest.raises(kvstore.CorruptSnapshot, match="unknown cache class"):
        codec.decode(layout, {}, {}, 1)
