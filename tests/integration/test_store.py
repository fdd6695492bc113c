"""SnapshotStore: exact hits across processes, match rules, independence,
faults, dedup. Real LMDB, real blob files, real tiny MLX models."""

import copy
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

import kvstore
from kvstore import tiny
from procs import run_worker

HERE = Path(__file__).resolve().parent.parent  # tests/: the helper modules
FAMILIES = tiny.FAMILIES
NON_TRIMMABLE = ("qwen3_5", "falcon_h1", "mamba")


def prefill(model, tokens, cache=None):
    """Run ``tokens`` through ``model``; return (cache, last-position logits)."""
    cache = make_prompt_cache(model) if cache is None else cache
    logits = model(mx.array(tokens)[None], cache=cache)[0, -1]
    mx.eval(logits)
    return cache, logits


def prompt(n, seed=0, vocab=tiny.VOCAB_SIZE):
    return [int(t) for t in np.random.RandomState(seed).randint(5, vocab, n)]


def blob_files(store):
    root = store.path / "blobs"
    return sorted(p for p in root.glob("*/*") if p.is_file() or p.is_symlink())


# -------------------------------------------------------------- exactness
def test_hit_in_new_process_matches_cold_prefill(tmp_path, tiny_model, load_tiny):
    """Every family: put here, fetch prompt+suffix in a fresh process, finish
    the prefill there: next-token logits equal a cold prefill of it all."""
    store = kvstore.SnapshotStore(tmp_path / "s", block_tokens=16)
    cases = []
    for fam in FAMILIES:
        model, _ = load_tiny(fam)
        toks = prompt(40, seed=1)
        cache, _ = prefill(model, toks)
        assert store.put(kvstore.fingerprint(tiny_model(fam)), toks, cache, tier="system")
        cases.append({"model": str(tiny_model(fam)), "store": str(store.path), "prompt": toks,
                      "suffix": prompt(7, seed=2)})
    store.close()
    results = run_worker("fetch_compare", {"cases": cases})
    for fam, res in zip(FAMILIES, results):
        assert res["hit"], fam
        assert res["rest"] == 7, (fam, res)
        assert res["max_diff"] <= 1e-5, (fam, res)
        assert res["argmax_equal"], fam


@pytest.mark.parametrize("family", FAMILIES)
def test_restored_cache_decodes_identically(store, family, tiny_model, load_tiny):
    """Round trip, then 6 greedy decode steps: restored and original agree bit for bit."""
    model, _ = load_tiny(family)
    fp = kvstore.fingerprint(tiny_model(family))
    toks = prompt(30, seed=3)
    orig, logits = prefill(model, toks)
    assert store.put(fp, toks, orig)
    nxt = int(mx.argmax(logits))
    restored, rest = store.fetch_nearest(fp, toks + [nxt])
    assert restored is not None and rest == [nxt]
    for _ in range(6):
        _, a = prefill(model, [nxt], orig)
        _, b = prefill(model, [nxt], restored)
        assert mx.array_equal(a, b), family
        nxt = int(mx.argmax(a))


def test_quantized_kv_round_trip_decodes_identically(store, tiny_model):
    import mlx_lm

    path = tiny_model("llama", head_dim=32)  # MLX quantises in groups of 32 or more
    model, _ = mlx_lm.load(str(path))
    fp = kvstore.fingerprint(path, kv_bits=4, kv_group_size=32)
    toks = prompt(30, seed=4)
    cache, logits = prefill(model, toks)
    orig = [c.to_quantized(group_size=32, bits=4) for c in cache]
    assert store.put(fp, toks, orig)
    nxt = int(mx.argmax(logits))
    restored, rest = store.fetch_nearest(fp, toks + [nxt])
    assert type(restored[0]).__name__ == "QuantizedKVCache" and rest == [nxt]
    assert restored[0].bits == 4 and restored[0].group_size == 32
    for _ in range(4):
        _, a = prefill(model, [nxt], orig)
        _, b = prefill(model, [nxt], restored)
        assert mx.array_equal(a, b)
        nxt = int(mx.argmax(a))


def test_rotating_window_before_and_after_wrap(store, tiny_model, load_tiny):
    """gemma3_text's 16-token window: a 10-token snapshot (unwrapped, trimmable)
    and a 40-token one (wrapped, checkpoint only) both decode identically."""
    model, _ = load_tiny("gemma3_text")
    fp = kvstore.fingerprint(tiny_model("gemma3_text"))
    for n, trimmable in ((10, True), (40, False)):
        toks = prompt(n, seed=n)
        orig, logits = prefill(model, toks)
        key = store.put(fp, toks, orig)
        assert [e.trimmable for e in store.entries() if e.key == key] == [trimmable]
        nxt = int(mx.argmax(logits))
        restored, rest = store.fetch_nearest(fp, toks + [nxt])
        assert rest == [nxt]
        for _ in range(20):  # decode past the window edge
            _, a = prefill(model, [nxt], orig)
            _, b = prefill(model, [nxt], restored)
            assert mx.array_equal(a, b), n
            nxt = int(mx.argmax(a))


def test_bf16_model_round_trip(tmp_path):
    path = tiny.build("llama", tmp_path / "bf16", dtype="bfloat16")
    import mlx_lm

    model, _ = mlx_lm.load(str(path))
    store = kvstore.SnapshotStore(tmp_path / "s", block_tokens=16)
    fp = kvstore.fingerprint(path)
    toks = prompt(20)
    orig, logits = prefill(model, toks)
    assert orig[0].keys.dtype == mx.bfloat16
    assert store.put(fp, toks, orig)
    restored, rest = store.fetch_nearest(fp, toks + [7])
    assert restored[0].keys.dtype == mx.bfloat16
    assert mx.array_equal(restored[0].keys[..., :20, :], orig[0].keys[..., :20, :])
    _, a = prefill(model, [7], orig)
    _, b = prefill(model, [7], restored)
    assert mx.array_equal(a, b)


# -------------------------------------------------------------- match rules
def test_exact_shorter_and_longer_matches(store, tiny_model, load_tiny):
    model, _ = load_tiny("llama")
    fp = kvstore.fingerprint(tiny_model("llama"))
    toks = prompt(100, seed=5)
    cache, _ = prefill(model, toks)
    key = store.put(fp, toks, cache, tier="user")

    # exact: served one token short, never an empty remainder
    c, rest = store.fetch_nearest(fp, toks)
    assert rest == toks[-1:] and c[0].offset == 99
    assert store.lookup(fp, toks) == (key, 99, "exact", "user")

    # longer request: the stored snapshot is its prefix
    c, rest = store.fetch_nearest(fp, toks + [1, 2, 3])
    assert rest == [1, 2, 3] and c[0].offset == 100

    # diverging request: shared prefix of a longer trimmable entry
    req = toks[:60] + [1, 2, 3]
    c, rest = store.fetch_nearest(fp, req)
    assert rest == [1, 2, 3] and c[0].offset == 60
    assert store.lookup(fp, req)[1:] == (60, "longer", "user")
    _, warm = prefill(model, rest, c)
    _, cold = prefill(model, req)
    assert float(mx.abs(warm - cold).max()) <= 1e-5

    # strict prefix of the stored entry
    c, rest = store.fetch_nearest(fp, toks[:50])
    assert rest == toks[49:50] and c[0].offset == 49

    # nothing shared
    c, rest = store.fetch_nearest(fp, prompt(30, seed=99))
    assert c is None and len(rest) == 30


def test_longer_match_reads_only_the_prefix_bytes(store, tiny_model, load_tiny):
    model, _ = load_tiny("llama")
    fp = kvstore.fingerprint(tiny_model("llama"))
    toks = prompt(2000, seed=6)
    cache, _ = prefill(model, toks)
    store.put(fp, toks, cache)
    total = sum(p.stat().st_size for p in blob_files(store))
    before = store.counters["bytes_read"]
    c, rest = store.fetch_nearest(fp, toks[:100] + [1])
    assert c[0].offset == 100
    read = store.counters["bytes_read"] - before
    # one 256-row checksum chunk per layer and head, not the 2000-token blob
    assert read <= total * 256 / 2000 + 4096, (read, total)


@pytest.mark.parametrize("family", NON_TRIMMABLE + ("gemma3_text",))
def test_non_trimmable_used_only_at_saved_length(store, family, tiny_model, load_tiny):
    model, _ = load_tiny(family)
    fp = kvstore.fingerprint(tiny_model(family))
    toks = prompt(40, seed=7)  # past gemma's 16-token window
    cache, _ = prefill(model, toks)
    store.put(fp, toks, cache)
    assert [e.trimmable for e in store.entries()] == [False]
    # a strict prefix or a diverging request cannot be served by trimming
    for req in (toks[:30], toks[:30] + [1, 2], toks):
        c, rest = store.fetch_nearest(fp, req)
        assert c is None and rest == req, (family, len(req))
    # a longer request gets the checkpoint at exactly its saved length
    c, rest = store.fetch_nearest(fp, toks + [3])
    assert rest == [3]
    # with a shorter checkpoint too, the exact request falls back to it
    short, _ = prefill(model, toks[:20])
    store.put(fp, toks[:20], short)
    c, rest = store.fetch_nearest(fp, toks)
    assert c is not None and rest == toks[20:]


def test_remainder_never_empty(store, tiny_model, load_tiny):
    model, _ = load_tiny("llama")
    fp = kvstore.fingerprint(tiny_model("llama"))
    rng = np.random.RandomState(8)
    stored = []
    for i in range(6):
        toks = prompt(int(rng.randint(2, 60)), seed=100 + i, vocab=40)
        cache, _ = prefill(model, toks)
        store.put(fp, toks, cache)
        stored.append(toks)
    for i in range(60):
        base = stored[rng.randint(len(stored))]
        req = base[: rng.randint(1, len(base) + 1)] + prompt(int(rng.randint(0, 3)), seed=i, vocab=40)
        c, rest = store.fetch_nearest(fp, req)
        assert len(rest) >= 1
        if c is not None:
            assert c[0].offset + len(rest) == len(req)
    assert store.fetch_nearest(fp, []) == (None, [])
    assert store.fetch_nearest(fp, [5]) == (None, [5])


def test_other_model_or_cache_options_never_hit(store, tiny_model, load_tiny, tmp_path):
    model, _ = load_tiny("llama")
    fp = kvstore.fingerprint(tiny_model("llama"))
    toks = prompt(40, seed=9)
    cache, _ = prefill(model, toks)
    store.put(fp, toks, cache)
    other_seed = tiny.build("llama", tmp_path / "llama-seed1", seed=1)
    for other in (
        kvstore.fingerprint(tiny_model("qwen3_5")),
        kvstore.fingerprint(other_seed),
        kvstore.fingerprint(tiny_model("llama"), kv_bits=8),
        kvstore.fingerprint(tiny_model("llama"), max_kv_size=64),
    ):
        assert other != fp
        assert store.fetch_nearest(other, toks + [1]) == (None, toks + [1])
    # another tenant salt is another namespace
    assert store.fetch_nearest(fp, toks + [1], tenant="acme")[0] is None
    assert store.fetch_nearest(fp, toks + [1])[0] is not None


def test_layout_mismatch_is_refused(store, tiny_model, load_tiny):
    fp = kvstore.fingerprint(tiny_model("llama"))
    llama, _ = load_tiny("llama")
    qwen, _ = load_tiny("qwen3_5")
    toks = prompt(20)
    store.put(fp, toks, prefill(llama, toks)[0])
    with pytest.raises(kvstore.InvalidInput, match="layout"):
        store.put(fp, prompt(20, seed=1), prefill(qwen, prompt(20, seed=1))[0])


def test_bad_inputs_raise_clear_errors(store, tiny_model, load_tiny):
    model, _ = load_tiny("llama")
    fp = kvstore.fingerprint(tiny_model("llama"))
    cache, _ = prefill(model, prompt(10))
    with pytest.raises(kvstore.InvalidInput, match="tier"):
        store.put(fp, prompt(10), cache, tier="everything")
    with pytest.raises(kvstore.InvalidInput, match="holds 10 tokens"):
        store.put(fp, prompt(11), cache)
    with pytest.raises(kvstore.InvalidInput, match="empty"):
        store.put(fp, [], cache)
    for bad in ([1.5, 2.0], ["a"], [-1, 2], [[1, 2]], [tiny.VOCAB_SIZE + 5]):
        with pytest.raises(kvstore.InvalidInput):
            store.fetch_nearest(fp, bad)
    with pytest.raises(kvstore.UnsupportedCache):
        store.put(fp, prompt(10), [object()])
    with pytest.raises(kvstore.InvalidInput):
        store.delete("not-a-key")
    assert store.entries() == []


def test_fetch_hands_out_independent_caches(store, tiny_model, load_tiny):
    model, _ = load_tiny("llama")
    fp = kvstore.fingerprint(tiny_model("llama"))
    toks = prompt(40, seed=10)
    cache, _ = prefill(model, toks)
    store.put(fp, toks, cache)
    prefill(model, prompt(5, seed=11), cache)  # the caller keeps using its cache
    a, _ = store.fetch_nearest(fp, toks + [1])
    b, _ = store.fetch_nearest(fp, toks + [1])
    keys_b = mx.array(b[0].keys[..., :40, :])
    _, la = prefill(model, prompt(300, seed=12), a)  # grows and mutates a in place
    c, _ = store.fetch_nearest(fp, toks + [1])
    assert mx.array_equal(b[0].keys[..., :40, :], keys_b)
    assert mx.array_equal(c[0].keys[..., :40, :], keys_b)
    assert a[0].keys is not b[0].keys
    fresh, _ = prefill(model, toks)
    assert mx.array_equal(c[0].keys[..., :40, :], fresh[0].keys[..., :40, :])


def test_restored_kv_has_decode_headroom(store, tiny_model, load_tiny):
    model, _ = load_tiny("llama")
    fp = kvstore.fingerprint(tiny_model("llama"))
    toks = prompt(256, seed=13)  # exactly one 256-row step: mlx-lm's own buffer is full
    cache, _ = prefill(model, toks)
    store.put(fp, toks, cache)
    c, rest = store.fetch_nearest(fp, toks + [1])
    assert c[0].offset == 256 and c[0].keys.shape[2] > 256
    buf = c[0].keys
    prefill(model, rest, c)
    assert c[0].keys.shape == buf.shape  # the first decode step did not regrow


# -------------------------------------------------------------- dedup
def test_shared_system_prompt_stored_once(tmp_path, tiny_model, load_tiny):
    """Ten conversations over one 1,000-token system prompt: bytes on disk
    stay under 1.3x the unique KV bytes."""
    store = kvstore.SnapshotStore(tmp_path / "s")  # default block size
    model, _ = load_tiny("llama")
    fp = kvstore.fingerprint(tiny_model("llama"))
    system = prompt(1000, seed=14)
    sys_cache, _ = prefill(model, system)
    unique_tokens = len(system)
    for i in range(10):
        conv = prompt(int(40 + 7 * i), seed=200 + i)
        cache = copy.deepcopy(sys_cache)
        prefill(model, conv, cache)
        assert store.put(fp, system + conv, cache, tier="user")
        unique_tokens += len(conv)
    per_token = sum(c.keys.nbytes + c.values.nbytes for c in sys_cache) // sys_cache[0].keys.shape[2]
    unique = unique_tokens * per_token
    on_disk = sum(p.stat().st_size for p in blob_files(store))
    assert on_disk < 1.3 * unique, (on_disk, unique)
    assert store.total_bytes() == on_disk
    # every conversation still restores exactly
    for i in range(10):
        conv = prompt(int(40 + 7 * i), seed=200 + i)
        c, rest = store.fetch_nearest(fp, system + conv + [3])
        assert rest == [3]
        fresh = copy.deepcopy(sys_cache)
        prefill(model, conv, fresh)
        n = len(system) + len(conv)
        assert float(mx.abs(c[0].keys[..., :n, :] - fresh[0].keys[..., :n, :]).max()) <= 1e-5
    # deleting conversations frees their own rows; the shared prefix goes with the last
    keys = [e.key for e in store.entries()]
    for k in keys[:-1]:
        store.delete(k)
    assert store.fetch_nearest(fp, system + [1])[0] is not None
    store.delete(keys[-1])
    assert blob_files(store) == [] and store.total_bytes() == 0
    assert store.verify() == [] and store.gc(grace=0) == []


# -------------------------------------------------------------- faults
def _one_snapshot(store, tiny_model, load_tiny, family="llama", n=40):
    model, _ = load_tiny(family)
    fp = kvstore.fingerprint(tiny_model(family))
    toks = prompt(n, seed=15)
    cache, _ = prefill(model, toks)
    key = store.put(fp, toks, cache)
    return fp, toks, key, blob_files(store)[0]


@pytest.mark.parametrize("fault", ["flip-data", "flip-header", "truncate", "symlink", "hardlink", "missing",
                                   "version", "empty"])
def test_damaged_blob_is_a_logged_miss(store, tiny_model, load_tiny, fault, caplog, tmp_path):
    fp, toks, key, path = _one_snapshot(store, tiny_model, load_tiny)
    data = bytearray(path.read_bytes())
    if fault == "flip-data":
        data[-100] ^= 0x40
        path.write_bytes(data)
    elif fault == "flip-header":
        data[20] ^= 0x01
        path.write_bytes(data)
    elif fault == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif fault == "symlink":
        # even a link to an intact copy is refused: files are never followed
        copy_ = tmp_path / "elsewhere.safetensors"
        copy_.write_bytes(data)
        path.unlink()
        path.symlink_to(copy_)
    elif fault == "hardlink":
        os.link(path, tmp_path / "second-name")
    elif fault == "missing":
        path.unlink()
    elif fault == "version":
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        header["__metadata__"]["kvstore.format"] = "99"
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (n - len(raw))
        path.write_bytes(data[:8] + raw[:n] + data[8 + n :])
    elif fault == "empty":
        path.write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="kvstore"):
        c, rest = store.fetch_nearest(fp, toks + [1])
    assert c is None and rest == toks + [1]
    assert store.counters["faults"] >= 1
    assert any(key in r.getMessage() for r in caplog.records)
    problems = store.verify()
    assert [p.key for p in problems] == [key]
    store.verify(fix=True)
    assert store.entries() == [] and store.verify() == []
    store.gc(grace=0)
    assert [p for p in blob_files(store)] == []


def test_corrupt_record_is_a_miss(store, tiny_model, load_tiny):
    fp, toks, key, path = _one_snapshot(store, tiny_model, load_tiny)
    store.index.write(lambda w: w.put_snapshot(bytes.fromhex(key), b"\xc1garbage"))
    # verify sees the damaged record while nothing has repaired it yet
    assert [p.kind for p in store.verify()] == ["record"]
    c, rest = store.fetch_nearest(fp, toks + [1])
    assert c is None and rest == toks + [1]
    # the miss hands the snapshot to the repair thread, which removes the record
    assert store.repairs.wait(10)
    assert store.verify() == [] and store.entries() == []


def test_full_lmdb_map_fails_open(tmp_path, caplog):
    from workers import seed_tokens, synthetic_cache

    store = kvstore.SnapshotStore(tmp_path / "s", map_size=1 << 20, block_tokens=16)
    kept = []
    with caplog.at_level(logging.WARNING, logger="kvstore"):
        for seed in range(1, 200):
            toks = seed_tokens(seed, 2000)  # 8 kB of tokens per record
            key = store.put("synthetic", toks, synthetic_cache(seed, 2000, layers=1))
            if key is None:
                break
            kept.append((key, toks))
    assert key is None, "the 1 MiB map never filled"
    assert store.counters["put_failures"] == 1
    assert any("MapFull" in r.getMessage() for r in caplog.records)
    # what was stored is intact and still served; the failed put left no blob behind
    assert store.verify() == []
    c, rest = store.fetch_nearest("synthetic", kept[0][1] + [1])
    assert rest == [1]
    assert len(blob_files(store)) == len(kept)


def test_access_times_and_hits_are_batched(store, tiny_model, load_tiny):
    fp, toks, key, _ = _one_snapshot(store, tiny_model, load_tiny)
    for _ in range(3):
        store.fetch_nearest(fp, toks + [1])
    (e,) = store.entries()  # entries() flushes pending access updates
    assert e.hits == 3 and e.accessed >= e.created


def test_files_are_private_and_tagged(store, tiny_model, load_tiny):
    _one_snapshot(store, tiny_model, load_tiny, family="qwen3_5")
    assert (store.path / "CACHEDIR.TAG").read_text().startswith("Signature: 8a477f597d28d172789f06886806bc55")
    for p in [store.path, *store.path.rglob("*")]:
        mode = p.stat().st_mode & 0o777
        if p.is_dir():
            assert mode == 0o700, p
        elif p.suffix == ".safetensors":
            assert mode == 0o600, p


def test_blobs_are_safetensors(store, tiny_model, load_tiny):
    """Blob files open with the safetensors library: a standard format."""
    from safetensors.numpy import load_file

    _one_snapshot(store, tiny_model, load_tiny)
    (path,) = blob_files(store)
    tensors = load_file(str(path))
    assert set(tensors) == {"0.k", "0.v", "1.k", "1.v"}
    assert tensors["0.k"].shape == (1, 2, 40, 16)


def test_plain_and_quantized_layouts_of_one_model(store, tiny_model):
    """With kv_bits, mlx-lm quantises only past quantized_kv_start: one
    fingerprint holds both layouts, and segments never mix between them."""
    import mlx_lm

    path = tiny_model("llama", head_dim=32)
    model, _ = mlx_lm.load(str(path))
    fp = kvstore.fingerprint(path, kv_bits=8, kv_group_size=32, quantized_kv_start=64)
    short = prompt(40, seed=20)
    plain, _ = prefill(model, short)
    assert store.put(fp, short, plain)
    long_ = short + prompt(60, seed=21)
    cache, _ = prefill(model, long_)
    quant = [c.to_quantized(group_size=32, bits=8) for c in cache]
    assert store.put(fp, long_, quant)
    c, rest = store.fetch_nearest(fp, short + [1])
    assert type(c[0]).__name__ == "KVCache" and rest == [1]
    c, rest = store.fetch_nearest(fp, long_ + [1])
    assert type(c[0]).__name__ == "QuantizedKVCache" and rest == [1]
    assert store.counters["put_tokens_shared"] == 0
    assert store.verify() == []


def test_one_path_opened_twice_in_one_process(tmp_path, tiny_model, load_tiny):
    """LMDB allows one environment per file per process: two stores on one path share it."""
    a = kvstore.SnapshotStore(tmp_path / "s")
    b = kvstore.SnapshotStore(tmp_path / "s", readonly=True)
    fp, toks, key, _ = _one_snapshot(a, tiny_model, load_tiny)
    assert b.lookup(fp, toks + [1]).key == key
    a.close()
    assert b.fetch_nearest(fp, toks + [1])[0] is not None  # still open for b
    b.close()
    c = kvstore.SnapshotStore(tmp_path / "s")
    assert [e.key for e in c.entries()] == [key]
    c.close()


def test_hits_reach_the_index_without_close(tmp_path):
    """Batched hit counts are written at interpreter exit even if close() is never called."""
    from workers import seed_tokens, synthetic_cache

    path = tmp_path / "s"
    with kvstore.SnapshotStore(path) as s:
        s.put("synthetic", seed_tokens(3, 50), synthetic_cache(3, 50))
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import kvstore; from workers import seed_tokens; "
            f"s = kvstore.SnapshotStore({str(path)!r}); "
            "[s.fetch_nearest('synthetic', seed_tokens(3, 50) + [1]) for _ in range(3)]")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    with kvstore.SnapshotStore(path) as s:
        assert [e.hits for e in s.entries()] == [3]
