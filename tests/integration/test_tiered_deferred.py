"""Checkpoints whose evaluation waits until the caller says (``insert_cache(defer=True)``).

A checkpoint mlx-lm takes during a prefill is a lazy graph (``BatchKVCache.extract``
is a copy of the KV rows): kvstore serve queues it after the request's first
token. These tests build such lazy checkpoints from real MLX arrays, write them
to a real store and restore them.
"""

import queue
import subprocess
import sys
import threading

import mlx.core as mx
import mlx_lm.server as server
import pytest
from mlx_lm.models.cache import KVCache

import kvstore
from kvstore import TieredPromptCache
from kvstore.pending import LIMIT
from kvstore.server_generation import _FirstToken
from test_tiered import ROOT, kv, opts, same, toks


def lazy(n, seed=0, layers=2):
    """``kv(n, seed)`` as ``BatchKVCache.extract`` makes a checkpoint: unevaluated copies of the rows."""
    out = []
    for layer in kv(n, seed, layers):
        c = KVCache()
        c.keys = mx.contiguous(layer.keys[:, :, :n, :] * 1)
        c.values = mx.contiguous(layer.values[:, :, :n, :] * 1)
        c.offset = n
        out.append(c)
    return out


@pytest.fixture
def path(tmp_path):
    return tmp_path / "store"


def stored(path):
    with kvstore.SnapshotStore(path) as s:
        return sorted(e.tokens for e in s.entries())


def restores(path, n, seed):
    with kvstore.SnapshotStore(path) as s:
        cache, rest = s.fetch_nearest("m", toks(n + 1))
        return rest == [n + 1] and same(cache, kv(n, seed), n)


def test_a_deferred_checkpoint_waits_for_its_prompt_then_is_written_exactly(path):
    c = TieredPromptCache(path, **opts())
    c.insert_cache("m", toks(40), lazy(40, seed=3), cache_type="user", defer=True)
    n = c.counters()
    assert n["writes.deferred"] == 1 and n["writes.queued"] == 0
    got = c.fetch("m", toks(45))  # memory serves it before it is evaluated
    assert (got.source, got.reused) == ("memory", 40) and same(got.cache, kv(40, seed=3), 40)
    assert c.write_deferred(toks(50, start=2)) == 0  # another request's prompt
    assert c.counters()["writes.queued"] == 0
    assert c.write_deferred(toks(45)) == 1
    assert c.flush() and c.counters()["writes.done"] == 1
    c.close()
    assert stored(path) == [40] and restores(path, 40, 3)


def test_an_insert_without_defer_queues_what_was_deferred_first(path):
    c = TieredPromptCache(path, **opts())
    c.insert_cache("m", toks(40), lazy(40, seed=1), cache_type="user", defer=True)
    c.insert_cache("m", toks(20, 100), kv(20, seed=2), cache_type="system", defer=True)
    assert c.counters()["writes.queued"] == 0
    c.insert_cache("m", toks(30, 200), kv(30, seed=4), cache_type="user")
    assert c.counters()["writes.queued"] == 3
    c.close()
    assert stored(path) == [20, 30, 40] and restores(path, 40, 1)


def test_flush_and_close_write_what_was_deferred(path):
    c = TieredPromptCache(path, **opts())
    c.insert_cache("m", toks(40), lazy(40, seed=5), cache_type="user", defer=True)
    assert c.flush() and stored(path) == [40]
    c.insert_cache("m", toks(24, 300), lazy(24, seed=6), cache_type="user", defer=True)
    assert c.close()
    assert stored(path) == [24, 40] and restores(path, 40, 5)


def test_memory_only_tiers_are_never_deferred(path):
    c = TieredPromptCache(path, **opts())
    c.insert_cache("m", toks(40), lazy(40), cache_type="assistant", defer=True)
    assert "writes.deferred" not in c.counters() and len(c) == 1
    c.close()
    assert stored(path) == []


def test_another_thread_leaves_the_owners_checkpoints_alone(path, caplog):
    """MLX evaluates a graph only on the thread that made it: other threads neither queue
    the owner's deferred checkpoints nor fail; a close on another thread drops them, counted."""
    c = TieredPromptCache(path, **opts())
    c.insert_cache("m", toks(40), lazy(40, seed=7), cache_type="user", defer=True)
    done = []
    t = threading.Thread(target=lambda: done.append((c.write_deferred(), c.flush())))
    t.start()
    t.join()
    assert done == [(0, True)] and c.counters()["writes.queued"] == 0
    closer = threading.Thread(target=c.close)
    closer.start()
    closer.join()
    assert c.counters()["writes.dropped"] == 1 and "1 deferred checkpoint(s) not written" in caplog.text
    assert stored(path) == []


def test_at_most_LIMIT_checkpoints_wait(path):
    c = TieredPromptCache(path, queue_size=4 * LIMIT, **opts())
    for i in range(LIMIT + 3):
        c.insert_cache("m", toks(16, 100 * i + 1), lazy(16, seed=i), cache_type="user", defer=True)
    n = c.counters()
    assert n["writes.deferred"] == LIMIT + 3 and n["writes.queued"] == 3
    c.close()
    assert stored(path) == [16] * (LIMIT + 3)


def test_later_writes_to_the_callers_cache_do_not_reach_a_deferred_checkpoint(path):
    c = TieredPromptCache(path, **opts())
    mine = lazy(40, seed=8)
    c.insert_cache("m", toks(40), mine, cache_type="user", defer=True)
    for layer in mine:  # the caller rewinds and overwrites before the checkpoint is evaluated
        layer.trim(30)
        layer.update_and_fetch(mx.full((1, 2, 30, 8), -1.0), mx.full((1, 2, 30, 8), -1.0))
    mx.eval([layer.keys for layer in mine])
    c.close()
    assert restores(path, 40, 8)


EXIT = """
import sys
sys.path[:0] = ["tests", "tests/integration"]
from test_tiered_deferred import TieredPromptCache, lazy, toks
c = TieredPromptCache(sys.argv[1], store_options={"block_tokens": 16})
for i in range(5):
    c.insert_cache("m", toks(64, 100 * i + 1), lazy(64, seed=i), cache_type="user", defer=True)
"""


def test_interpreter_exit_writes_what_was_deferred(path):
    p = subprocess.run([sys.executable, "-c", EXIT, str(path)], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert stored(path) == [64] * 5


def response(token):
    return server.Response("x", token, 0.0, None, ())


def test_the_first_token_queues_its_requests_checkpoints(path):
    """What kvstore serve's generation thread does with a request's response queue."""
    c = TieredPromptCache(path, **opts())
    c.insert_cache("m", toks(40), lazy(40, seed=9), cache_type="user", defer=True)
    c.insert_cache("m", toks(40, 500), lazy(40, seed=10), cache_type="user", defer=True)  # another request's
    q = queue.Queue()
    rq = _FirstToken(q, c)
    rq.put(server.GenerationContext(has_thinking=False, has_tool_calling=False, tool_parser=None, text_sm=None,
                                    initial_state="normal", prompt=toks(41)))
    rq.put((20, 41))  # prompt progress
    assert c.counters()["writes.queued"] == 0
    rq.put(response(7))
    assert c.counters()["writes.queued"] == 1  # this request's, not the other one's
    rq.put(response(8))
    rq.put(None)
    assert c.counters()["writes.queued"] == 1
    assert [type(x).__name__ for x in iter(q.get_nowait, None)] == ["GenerationContext", "tuple", "Response",
                                                                       "Response"]
    c.close()
    assert stored(path) == [40, 40] and restores(path, 40, 9)  # close queued the other one


def test_a_request_that_ends_without_a_token_queues_its_checkpoints(path):
    c = TieredPromptCache(path, **opts())
    c.insert_cache("m", toks(40), lazy(40, seed=11), cache_type="user", defer=True)
    rq = _FirstToken(queue.Queue(), c)
    rq.put(server.GenerationContext(has_thinking=False, has_tool_calling=False, tool_parser=None, text_sm=None,
                                    initial_state="normal", prompt=toks(41)))
    rq.put(RuntimeError("the model failed"))
    assert c.counters()["writes.queued"] == 1
    c.close()
    assert stored(path) == [40]


@pytest.mark.parametrize("defer", [False, True])
def test_strided_bf16_views_are_written_exactly(path, defer):
    """A bf16 view that is not contiguous (rows of a longer buffer) reaches the writer as it is;
    the writer thread copies it on a stream of its own (numpy has no bf16)."""
    import numpy as np

    full = mx.random.normal((1, 2, 64, 8), key=mx.random.key(3)).astype(mx.bfloat16)
    cache = []
    for layer in range(2):
        c = KVCache()
        c.keys, c.values = full[:, :, 10 + layer:50 + layer, :], -full[:, :, 5:45, :]
        c.offset = 40
        cache.append(c)
    mx.eval([[c.keys, c.values] for c in cache])
    assert not memoryview(cache[0].keys).c_contiguous
    c = TieredPromptCache(path, **opts())
    c.insert_cache("m", toks(40), cache, cache_type="user", defer=defer)
    c.close()
    with kvstore.SnapshotStore(path) as s:
        got, rest = s.fetch_nearest("m", toks(41))
    assert rest == [41]
    for a, b in zip(got, cache):
        for x, y in ((a.keys, b.keys), (a.values, b.values)):
            assert np.array_equal(np.array(x[:, :, :40, :].astype(mx.float32)), np.array(y.astype(mx.float32)))
