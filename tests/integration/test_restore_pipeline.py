"""The restore's two halves side by side: buffers made on the caller's thread,
reads and checksums on the reader thread (a small snapshot is read without a
hand-off). Real LMDB, real blob files, a real tiny model; the group size and
the pipelining threshold are shrunk so that every tensor is its own group."""

import json
import logging
import struct
import threading
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

import kvstore
from kvstore import blobs as B
from kvstore import loader, tiny


def prefill(model, tokens, cache=None):
    cache = make_prompt_cache(model) if cache is None else cache
    logits = model(mx.array(tokens)[None], cache=cache)[0, -1]
    mx.eval(logits)
    return cache, logits


def prompt(n, seed=0):
    return [int(t) for t in np.random.RandomState(seed).randint(5, tiny.VOCAB_SIZE, n)]


@pytest.fixture
def one_group_per_tensor(monkeypatch):
    monkeypatch.setattr(loader, "ALLOC_GROUP", 1)
    monkeypatch.setattr(loader, "PIPELINE_MIN", 0)


@pytest.fixture
def watched(monkeypatch):
    """Which threads made buffers and read rows, and whether a blob closed under a read."""
    seen = {"alloc": [], "read": [], "active": 0, "closed_mid_read": 0}
    lock = threading.Lock()
    alloc, read_rows, close = loader.alloc, B.BlobReader.read_rows, B.BlobReader.close

    def timed_alloc(shapes):
        seen["alloc"].append((threading.current_thread().name, len(shapes)))
        return alloc(shapes)

    def timed_read(self, *a, **k):
        with lock:
            seen["active"] += 1
            seen["read"].append(threading.current_thread().name)
        try:
            return read_rows(self, *a, **k)
        finally:
            with lock:
                seen["active"] -= 1

    def checked_close(self):
        with lock:
            seen["closed_mid_read"] += seen["active"]
        return close(self)

    monkeypatch.setattr(loader, "alloc", timed_alloc)
    monkeypatch.setattr(B.BlobReader, "read_rows", timed_read)
    monkeypatch.setattr(B.BlobReader, "close", checked_close)
    return seen


def _saved(store, tiny_model, load_tiny, n=40):
    model, _ = load_tiny("llama")
    fp = kvstore.fingerprint(tiny_model("llama"))
    toks = prompt(n, seed=21)
    cache, _ = prefill(model, toks)
    store.put(fp, toks, cache)
    return model, fp, toks, cache


def _tensor_spans(path):
    """``{name: (start, end)}`` of each tensor's bytes in a blob file."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__")
    return {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1]) for k, v in header.items()}


def test_groups_split_by_bytes_in_order(monkeypatch):
    monkeypatch.setattr(loader, "ALLOC_GROUP", 2 * 4 * 8 * 2)  # two (1, 4, 8) bf16 tensors
    shapes = {f"t{i}": ((1, 4, 8), "BF16") for i in range(5)}
    assert [list(g) for g in loader._groups(shapes)] == [["t0", "t1"], ["t2", "t3"], ["t4"]]


def test_pipelined_restore_is_exact_and_reads_off_the_callers_thread(
        store, tiny_model, load_tiny, one_group_per_tensor, watched):
    model, fp, toks, cache = _saved(store, tiny_model, load_tiny)
    got, rest = store.fetch_nearest(fp, toks + [7])
    assert got is not None and rest == [7]
    me = threading.current_thread().name
    layers = len(cache)
    # one buffer per group, every group made here; every read on the reader thread
    assert len(watched["alloc"]) == 2 * layers and {t for t, _ in watched["alloc"]} == {me}
    assert len(watched["read"]) == 2 * layers
    assert all(t.startswith("kvstore-restore") for t in watched["read"])
    assert watched["closed_mid_read"] == 0
    for a, b in zip(got, cache):
        assert mx.array_equal(a.keys[..., : len(toks), :], b.keys[..., : len(toks), :])
        assert mx.array_equal(a.values[..., : len(toks), :], b.values[..., : len(toks), :])
    _, warm = prefill(model, [7], got)
    _, cold = prefill(model, toks + [7])
    assert mx.array_equal(warm, cold)


@pytest.mark.parametrize("where", ["first", "last"])
def test_corrupt_tensor_is_a_miss_with_no_read_outliving_its_blob(
        store, tiny_model, load_tiny, one_group_per_tensor, watched, where, caplog):
    _model, fp, toks, _cache = _saved(store, tiny_model, load_tiny)
    (path,) = sorted(p for p in (store.path / "blobs").glob("*/*") if p.is_file())
    spans = _tensor_spans(path)
    name = sorted(spans, key=lambda k: spans[k][0])[0 if where == "first" else -1]
    data = bytearray(path.read_bytes())
    data[spans[name][0] + 3] ^= 0x10  # inside the first token's row of that tensor
    path.write_bytes(data)
    with caplog.at_level(logging.WARNING, logger="kvstore"):
        got, rest = store.fetch_nearest(fp, toks + [7])
    assert got is None and rest == toks + [7]
    assert store.counters["faults"] >= 1
    assert any("checksum mismatch" in r.getMessage() for r in caplog.records)
    assert watched["closed_mid_read"] == 0 and watched["active"] == 0


def test_restore_reads_on_the_callers_thread_when_the_reader_is_gone(
        store, tiny_model, load_tiny, one_group_per_tensor, watched, monkeypatch):
    model, fp, toks, _cache = _saved(store, tiny_model, load_tiny)
    gone = ThreadPoolExecutor(1)
    gone.shutdown()  # submit now raises RuntimeError, as at interpreter shutdown
    monkeypatch.setattr(loader, "_reader", lambda: gone)
    got, rest = store.fetch_nearest(fp, toks + [7])
    assert got is not None and rest == [7]
    assert set(watched["read"]) == {threading.current_thread().name}
    _, warm = prefill(model, [7], got)
    _, cold = prefill(model, toks + [7])
    assert mx.array_equal(warm, cold)


def test_a_small_snapshot_is_read_without_a_hand_off(store, tiny_model, load_tiny, watched, monkeypatch):
    monkeypatch.setattr(loader, "ALLOC_GROUP", 1)  # many groups, but under PIPELINE_MIN: one
    model, fp, toks, _cache = _saved(store, tiny_model, load_tiny)  # a few KB
    got, rest = store.fetch_nearest(fp, toks + [7])
    assert got is not None and rest == [7]
    assert len(watched["alloc"]) == 1
    assert set(watched["read"]) == {threading.current_thread().name}
    _, warm = prefill(model, [7], got)
    _, cold = prefill(model, toks + [7])
    assert mx.array_equal(warm, cold)
