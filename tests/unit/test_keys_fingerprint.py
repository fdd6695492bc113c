"""Token keys and model fingerprints."""

import json
import os
import shutil
import struct
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np
import pytest

import kvstore
from kvstore import tiny
from kvstore.fingerprint import file_digest
from kvstore.keys import TokenChain, as_tokens, namespace


# -------------------------------------------------------------- keys
def test_as_tokens_accepts_integer_sequences():
    for seq in ([1, 2, 3], (1, 2, 3), np.array([1, 2, 3], dtype=np.int64), mx.array([1, 2, 3])):
        out = as_tokens(seq)
        assert out.dtype == np.dtype("<i4") and out.tolist() == [1, 2, 3]
    assert as_tokens([]).size == 0


@pytest.mark.parametrize("bad", [[1.0, 2.0], ["1"], [True, False], [-3], [2**31], [[1], [2]], [None], "abc"])
def test_as_tokens_rejects_non_tokens(bad):
    with pytest.raises(kvstore.InvalidInput):
        as_tokens(bad)


def test_as_tokens_checks_the_vocabulary():
    assert as_tokens([0, 511], vocab_size=512).tolist() == [0, 511]
    with pytest.raises(kvstore.InvalidInput, match="vocabulary"):
        as_tokens([512], vocab_size=512)


def test_chain_keys_are_prefix_consistent_and_namespaced():
    toks = as_tokens(list(range(100)))
    root = namespace("fp")
    chain = TokenChain(root, toks, 16)
    assert len(chain.links) == 100 // 16 + 1
    for n in (1, 15, 16, 17, 64, 99, 100):
        # the key of a prefix does not depend on what follows it
        assert chain.key(n) == TokenChain(root, toks[:n], 16).key(n)
    keys = {chain.key(n) for n in range(1, 101)}
    assert len(keys) == 100
    assert TokenChain(namespace("other"), toks, 16).key(100) != chain.key(100)
    assert TokenChain(namespace("fp", tenant="a"), toks, 16).key(100) != chain.key(100)
    assert TokenChain(namespace("fp", tenant="a"), toks, 16).key(100) != TokenChain(
        namespace("fp", tenant="b"), toks, 16).key(100)
    # the length is part of the key: a run of zeros is not its own prefix
    zeros = as_tokens([0] * 20)
    z = TokenChain(root, zeros, 16)
    assert z.key(19) != z.key(20)
    with pytest.raises(kvstore.InvalidInput):
        namespace("")


# -------------------------------------------------------------- fingerprint
def test_fingerprint_is_stable_across_processes_and_paths(tiny_model, tmp_path):
    path = tiny_model("llama")
    fp = kvstore.fingerprint(path)
    out = subprocess.run([sys.executable, "-c", f"import kvstore; print(kvstore.fingerprint({str(path)!r}))"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == fp
    moved = tmp_path / "renamed-copy"
    shutil.copytree(path, moved)
    assert kvstore.fingerprint(moved) == fp  # the weights, not the path string
    assert fp.name == path.name and fp.model_type == "llama" and fp.vocab_size == tiny.VOCAB_SIZE
    assert fp.startswith("llama-")


def test_fingerprint_changes_with_what_changes_the_kv(tiny_model, tmp_path):
    path = tiny_model("llama")
    fp = kvstore.fingerprint(path)

    def variant(name, edit):
        d = tmp_path / name
        shutil.copytree(path, d)
        edit(d)
        return kvstore.fingerprint(d)

    def bump_weight(d):
        w = dict(mx.load(str(d / "model.safetensors")))
        key = sorted(k for k in w if "layers.1" in k and "v_proj" in k)[0]
        w[key] = w[key] * 1.01
        mx.save_safetensors(str(d / "model.safetensors"), w)

    def bump_config(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg["rope_theta"] = 20000.0
        (d / "config.json").write_text(json.dumps(cfg))

    def bump_tokenizer(d):
        t = json.loads((d / "tokenizer.json").read_text())
        t["added_tokens"][-1]["content"] = "<other>"
        (d / "tokenizer.json").write_text(json.dumps(t))

    seen = {fp}
    for name, edit in (("w", bump_weight), ("c", bump_config), ("t", bump_tokenizer)):
        other = variant(name, edit)
        assert other not in seen, name
        seen.add(other)
    for opts in ({"kv_bits": 8}, {"kv_bits": 4}, {"kv_bits": 8, "kv_group_size": 32}, {"max_kv_size": 512}):
        other = kvstore.fingerprint(path, **opts)
        assert other not in seen, opts
        seen.add(other)
    # options left at None, or group size without quantisation, change nothing
    assert kvstore.fingerprint(path, kv_bits=None, max_kv_size=None) == fp
    assert kvstore.fingerprint(path, kv_group_size=32) == fp
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    mx.save_safetensors(str(adapter / "adapters.safetensors"), {"a": mx.zeros((4,))})
    assert kvstore.fingerprint(path, adapter_path=adapter) not in seen
    with pytest.raises(kvstore.InvalidInput, match="unknown cache options"):
        kvstore.fingerprint(path, kv_bitz=4)


def sparse_model(d, nbytes, model_type="llama"):
    """A model folder whose one safetensors file is ``nbytes`` of holes (nothing written)."""
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"model_type": model_type, "vocab_size": 128256}))
    per = nbytes // 400
    header, off = {}, 0
    for i in range(400):
        header[f"model.layers.{i}.weight"] = {"dtype": "BF16", "shape": [per // 2], "data_offsets": [off, off + per]}
        off += per
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(d / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + off)
    return d / "model.safetensors"


def test_a_hugging_face_blob_is_named_by_its_content(tmp_path):
    """A 70 GB file in a Hugging Face cache is not read: its blob name is the SHA-256 of its content."""
    repo = tmp_path / "hub" / "models--org--big"
    weights = sparse_model(repo / "staging", 70 * 10**9)
    sha = "ab" * 32
    (repo / "blobs").mkdir()
    weights.rename(repo / "blobs" / sha)
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(repo / "blobs" / sha)
    (repo / "staging" / "config.json").rename(snap / "config.json")
    assert (repo / "blobs" / sha).stat().st_size > 69 * 10**9
    t = time.perf_counter()
    fp = kvstore.fingerprint(snap)
    assert time.perf_counter() - t < 1.0
    assert fp.startswith("llama-") and fp.name == "org/big"
    assert file_digest(snap / "model.safetensors") == (b"sha256:" + bytes.fromhex(sha), "hf-blob")
    # another blob name is another fingerprint
    other = "cd" * 32
    (repo / "blobs" / sha).rename(repo / "blobs" / other)
    (snap / "model.safetensors").unlink()
    (snap / "model.safetensors").symlink_to(repo / "blobs" / other)
    assert kvstore.fingerprint(snap) != fp


def test_weights_are_read_once_per_content(tmp_path):
    """The first start hashes every byte; a later one (another process, same
    store) reads nothing; a rewritten file is hashed again."""
    weights = sparse_model(tmp_path / "model", 64 * 10**6)
    store = kvstore.SnapshotStore(tmp_path / "store")
    first = file_digest(weights, store.file_digests)
    assert first.source == "hashed"
    assert file_digest(weights, store.file_digests) == (first.digest, "memo")
    fp = kvstore.fingerprint(tmp_path / "model", digests=store.file_digests)
    store.close()
    code = ("import sys, kvstore; from kvstore.fingerprint import file_digest; "
            "s = kvstore.SnapshotStore(sys.argv[1], readonly=True); d = file_digest(sys.argv[2], s.file_digests); "
            "print(d.source, d.digest.hex(), kvstore.fingerprint(sys.argv[3], digests=s.file_digests))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "store"), str(weights), str(tmp_path / "model")],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["cache", first.digest.hex(), fp]
    # the same size, the same mtime, one byte changed: ctime moves, so it is read again
    st = weights.stat()
    with open(weights, "r+b") as f:
        f.seek(st.st_size - 1)
        f.write(b"\x01")
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = file_digest(weights, None)
    assert again.source == "hashed" and again.digest != first.digest
    assert kvstore.fingerprint(tmp_path / "model") != fp


def test_fingerprint_rejects_what_is_not_a_model(tmp_path):
    with pytest.raises(kvstore.InvalidInput, match="not found"):
        kvstore.fingerprint(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(kvstore.InvalidInput, match="no \\*.safetensors"):
        kvstore.fingerprint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(kvstore.InvalidInput, match="invalid safetensors header"):
        kvstore.fingerprint(tmp_path)
