"""Preloading: a store's likeliest snapshots loaded into memory at start.

A real store warmed with a real tiny model (``kvstore.warm``), real LMDB and
blob files, and ``TieredPromptCache.preload`` on its promotion thread. Two
tests hold the promotion thread inside its store read (a gate around the
real store's ``fetch``) so that a request arrives while a load is under way:
that moment cannot be caused reliably by timing alone.
"""

import threading
import time

import mlx.core as mx
import numpy as np
import pytest

import kvstore
from kvstore import TieredPromptCache
from kvstore.warm import system_segment, warm

SYSTEM = "You keep the harbor log: boats, wind and tides, in short plain sentences. " * 3


def opts(**kw):
    return {"store_options": {"fsync": False}, **kw}


@pytest.fixture(scope="module")
def llama(tiny_model):
    import mlx_lm

    path = tiny_model("llama")
    model, tok = mlx_lm.load(str(path))
    return path, model, tok


def chat(tok, question, system=SYSTEM):
    return tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": question}],
                                   add_generation_prompt=True)


def logits(model, tokens, cache=None):
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model) if cache is None else cache
    out = model(mx.array(tokens)[None], cache=cache)[0, -1]
    mx.eval(out)
    return np.array(out)


def warmed(tmp_path, llama, systems=(SYSTEM,)):
    path, _, _ = llama
    store = kvstore.SnapshotStore(tmp_path / "store", fsync=False)
    warm(store, path, [[{"role": "system", "content": s}] for s in systems])
    return store


def test_first_request_after_preload_is_a_memory_hit_with_cold_logits(tmp_path, llama):
    path, model, tok = llama
    store = warmed(tmp_path, llama)
    key = (str(path), None, None)
    prompt = chat(tok, "Which boats came back this morning?")
    n_sys = len(system_segment(tok, [{"role": "system", "content": SYSTEM}]))
    with TieredPromptCache(store, **opts()) as c:
        assert c.preload(key)
        assert c.settle(60)
        assert len(c) == 1
        got = c.fetch(key, prompt)
        assert (got.source, got.tier, got.reused) == ("memory", "system", n_sys)
        hit = logits(model, got.rest, got.cache)
    cold = logits(model, prompt)
    assert np.allclose(hit, cold, atol=1e-4), np.abs(hit - cold).max()
    n = c.counters()
    assert n["hits.memory"] == 1 and n["hits.disk"] == 0 and n["preload.done"] == 1
    store.close()


def test_preload_order_and_budget(tmp_path, llama):
    """System tier first; no more entries than the memory tier has room for."""
    path, model, tok = llama
    store = warmed(tmp_path, llama, [SYSTEM, "A second system prompt about tides. " * 4])
    key = (str(path), None, None)
    fp = kvstore.fingerprint(path)
    user = chat(tok, "Any news of the ferry?", system="A third, unrelated prompt. " * 4)
    from kvstore.warm import prefill

    store.put(fp, user, prefill(model, user), tier="user")
    with TieredPromptCache(store, max_size=2, **opts()) as c:
        c.preload(key)
        assert c.settle(60)
        tiers = {t: v["n_sequences"] for t, v in c.stats_by_type().items()}
        assert tiers == {"system": 2, "user": 0, "assistant": 0}
        assert c.counters()["preload.done"] == 2
    with TieredPromptCache(store, max_size=3, max_bytes=1, **opts()) as c:
        c.preload(key)
        assert c.settle(60)
        assert len(c) == 0  # nothing fits in one byte
    store.close()


def test_preload_skips_tenants_and_other_models(tmp_path, llama):
    path, model, tok = llama
    store = kvstore.SnapshotStore(tmp_path / "store", fsync=False)
    fp = kvstore.fingerprint(path)
    ids = system_segment(tok, [{"role": "system", "content": SYSTEM}])
    from kvstore.warm import prefill

    cache = prefill(model, ids)
    store.put(fp, ids, cache, tier="system", tenant="acme")
    store.put("another-model", ids, cache, tier="system")
    with TieredPromptCache(store, **opts()) as c:
        c.preload((str(path), None, None))
        assert c.settle(60)
        assert len(c) == 0
        assert c.counters().get("preload.failed", 0) == 0
    store.close()


class Gate:
    """The real store, with its ``fetch`` held on the promotion thread until ``release``."""

    def __init__(self, store):
        self.store = store
        self.entered, self.open = threading.Event(), threading.Event()
        self.fetches = {"promote": 0, "request": 0}

    def fetch(self, *a, **kw):
        if threading.current_thread().name == "kvstore-promote":
            self.fetches["promote"] += 1
            self.entered.set()
            self.open.wait(60)
        else:
            self.fetches["request"] += 1
        return self.store.fetch(*a, **kw)

    def __getattr__(self, name):
        return getattr(self.store, name)


def test_a_request_during_the_load_waits_for_it(tmp_path, llama):
    path, _, tok = llama
    store = warmed(tmp_path, llama)
    gate = Gate(store)
    key = (str(path), None, None)
    c = TieredPromptCache(gate, **opts())
    c.preload(key)
    assert gate.entered.wait(60)
    got = {}
    t = threading.Thread(target=lambda: got.update(r=c.fetch(key, chat(tok, "Is the wind up?"))))
    t.start()
    deadline = time.monotonic() + 30
    while c.counters().get("promotions.waits", 0) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert c.counters().get("promotions.waits", 0) == 1 and t.is_alive()
    gate.open.set()
    t.join(60)
    assert got["r"].source == "memory" and got["r"].reused > 0
    # loaded once, by the promotion thread; the request read no blob (at most an index lookup)
    assert gate.fetches["promote"] == 1
    assert c.counters()["bytes.read"] == 0 and c.counters()["hits.disk"] == 0
    c.close()
    store.close()


def test_a_queued_preload_is_taken_by_the_request(tmp_path, llama):
    """A snapshot still queued behind another load is read by the request itself, once."""
    path, _, tok = llama
    other = "Another prompt, loaded first. " * 6
    store = warmed(tmp_path, llama, [other, SYSTEM])
    gate = Gate(store)
    key = (str(path), None, None)
    # the first-loaded one is the most used: give it a hit
    fp = kvstore.fingerprint(path)
    assert store.fetch(fp, chat(tok, "x", system=other))[0] is not None
    store.flush_access()
    c = TieredPromptCache(gate, **opts())
    c.preload(key)
    assert gate.entered.wait(60)
    got = c.fetch(key, chat(tok, "Is the tide high?"))
    assert got.source == "disk" and got.reused > 0
    assert c.counters()["promotions.taken"] == 1
    gate.open.set()
    assert c.settle(60)
    assert len(c) == 2  # the other preload, and the request's snapshot promoted once
    assert gate.fetches == {"promote": 2, "request": 1}
    c.close()
    store.close()


def test_serve_preload_first_request_is_a_memory_hit(tmp_path, tiny_model):
    """``kvstore serve --preload`` after ``kvstore warm``: the first request is served from memory,
    with the same answer as a server without the cache."""
    import re

    from kvstore_cli.demo import SYSTEM as DEMO_SYSTEM, LocalServer, cached

    model = tiny_model("llama")
    with kvstore.SnapshotStore(tmp_path / "store") as store:
        (done,) = warm(store, model, [[{"role": "system", "content": DEMO_SYSTEM}]])
    with LocalServer(tmp_path / "store", model, "--preload", "--cache-log-interval", "0.001") as s:
        first = s.chat("Do you sell hammers?")
        log = s.stop()
    assert cached(first) == done["tokens"]
    counts = re.findall(r"kvstore cache: (\d+) fetches, (\d+) memory hits, (\d+) disk hits", log)
    assert counts and counts[0] == ("1", "1", "0"), counts
    assert "Traceback" not in log
    with LocalServer(None, model, "--no-disk") as s:
        cold = s.chat("Do you sell hammers?")
    assert cached(cold) == 0
    assert first["choices"][0]["message"] == cold["choices"][0]["message"]


def test_serve_warmup_runs_before_listening(tmp_path, tiny_model):
    """``--warmup`` sends one request through the server before it listens; answers are unchanged."""
    from kvstore_cli.demo import LocalServer

    model = tiny_model("llama")
    with LocalServer(tmp_path / "store", model, "--warmup", "--log-level", "INFO") as s:
        warmed = s.chat("Do you sell hammers?")
        log = s.stop()
    assert log.index("kvstore: warm-up request done") < log.index("Starting httpd")
    assert "Traceback" not in log
    with LocalServer(tmp_path / "store2", model) as s:
        plain = s.chat("Do you sell hammers?")
    assert warmed["choices"][0]["message"] == plain["choices"][0]["message"]


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="per-thread niceness is Linux's")
def test_preloading_yields_to_the_first_request(tmp_path, llama):
    """Preloading runs at normal priority while nothing else runs, at the lowest from the first request on."""
    import os

    path, _, tok = llama
    store = warmed(tmp_path, llama)
    key = (str(path), None, None)

    def nice():
        (t,) = [t for t in threading.enumerate() if t.name == "kvstore-promote"]
        return os.getpriority(os.PRIO_PROCESS, t.native_id)

    with TieredPromptCache(store, **opts()) as c:
        c.preload(key)
        assert c.settle(60)
        assert nice() == os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) < 19
        assert c.fetch(key, chat(tok, "Is the wind up?")).source == "memory"
        assert nice() == 19
    store.close()
