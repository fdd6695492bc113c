"""Model fingerprints: the namespace that keeps a snapshot with its model.

A fingerprint covers what decides the KV a model computes: every byte of
every weight file (BLAKE3, read through a memory map on all cores), the
config, the tokenizer files, an adapter, a draft model, the mlx-lm version
and the cache options that change the cache layout. It is stable across
processes and machines for the same files.

Hashing a 70 GB model reads 70 GB, so a file's digest is remembered by what
identifies its content on disk (device, inode, size, mtime and ctime in ns):
in this process, and in a store's digest cache when one is given, so a
restart re-reads nothing. A file in a Hugging Face cache ``blobs/`` folder is
named by the SHA-256 of its content, and that name is used instead of
reading it. This module imports no MLX.
"""

import hashlib
import json
import os
import re
import struct
import threading
from pathlib import Path
from typing import NamedTuple

import blake3

from .errors import InvalidInput

FINGERPRINT_VERSION = 2
# digests of weight files by content identity, for this process
_MEMO = {}
_MEMO_LOCK = threading.Lock()
_HF_BLOB = re.compile(r"^[0-9a-f]{64}$")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
)
LAYOUT_OPTIONS = ("kv_bits", "kv_group_size", "quantized_kv_start", "max_kv_size")


class Fingerprint(str):
    """A fingerprint string that also carries a readable model name.

    It compares and hashes as the plain string; ``name``, ``model_type``,
    ``vocab_size`` and ``path`` are informational (``kvstore ls`` shows the
    name; ``--decode`` finds the tokenizer by the path).
    """

    name: str = ""
    model_type: str = ""
    vocab_size: int | None = None
    path: str = ""

    def __new__(cls, value, name="", model_type="", vocab_size=None, path=""):
        obj = super().__new__(cls, value)
        obj.name, obj.model_type, obj.vocab_size, obj.path = name, model_type, vocab_size, path
        return obj


class FileDigest(NamedTuple):
    """A weight file's content digest and where it came from: ``"hashed"``
    (read whole now), ``"memo"`` (this process hashed it before), ``"cache"``
    (a store's digest cache) or ``"hf-blob"`` (its Hugging Face blob name)."""

    digest: bytes
    source: str


def content_identity(st):
    """What identifies a file's content on disk, as bytes: device, inode,
    size, mtime and ctime in nanoseconds (ctime cannot be set back by a user,
    so a rewrite in place always changes it)."""
    return f"blake3:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}".encode()


def _hf_blob_digest(path):
    """The SHA-256 a Hugging Face cache names a blob by, or ``None``.

    Only a file reached in ``models--*/blobs/<64 hex digits>`` counts: the
    hub stores large files under the SHA-256 of their content.
    """
    real = Path(os.path.realpath(path))
    if _HF_BLOB.match(real.name) and real.parent.name == "blobs" and real.parent.parent.name.startswith("models--"):
        return b"sha256:" + bytes.fromhex(real.name)
    return None


def file_digest(path, cache=None):
    """The ``FileDigest`` of every byte of the file at ``path``.

    ``cache`` is an optional store digest cache (``get(identity)`` /
    ``put(identity, digest, path)``, as ``SnapshotStore.file_digests``); a file is
    read only when neither this process nor the cache has its identity.
    """
    hf = _hf_blob_digest(path)
    if hf is not None:
        return FileDigest(hf, "hf-blob")
    for _ in range(3):
        before = os.stat(path)
        ident = content_identity(before)
        with _MEMO_LOCK:
            memo = _MEMO.get(ident)
        if memo is not None:
            return FileDigest(memo, "memo")
        cached = cache.get(ident) if cache is not None else None
        if cached is not None:
            with _MEMO_LOCK:
                _MEMO[ident] = cached
            return FileDigest(cached, "cache")
        h = blake3.blake3(max_threads=blake3.blake3.AUTO)
        if before.st_size:
            h.update_mmap(str(path))
        digest = b"blake3:" + h.digest()
        if content_identity(os.stat(path)) != ident:
            continue  # rewritten while we read it: read it again
        with _MEMO_LOCK:
            _MEMO[ident] = digest
        if cache is not None:
            cache.put(ident, digest, str(path))
        return FileDigest(digest, "hashed")
    raise InvalidInput(f"{path} keeps changing while it is read")


def _check_safetensors(path):
    """Raise ``InvalidInput`` unless ``path`` starts with a plausible safetensors header."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InvalidInput(f"{path} is not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise InvalidInput(f"{path} has an invalid safetensors header")
        try:
            json.loads(f.read(n))
        except ValueError as exc:
            raise InvalidInput(f"{path} has an invalid safetensors header") from exc


def _hash_dir(h, root, label, cache=None):
    root = Path(root)
    if not root.is_dir():
        raise InvalidInput(f"{label} directory not found: {root}")
    h.update(f"[{label}]".encode())
    for name in ("config.json", "adapter_config.json", "model.safetensors.index.json"):
        p = root / name
        if p.is_file():
            h.update(name.encode() + b"\0" + p.read_bytes())
    for name in TOKENIZER_FILES:
        p = root / name
        if p.is_file():
            h.update(name.encode() + b"\0" + p.read_bytes())
    weights = sorted(root.glob("*.safetensors"))
    for p in weights:
        _check_safetensors(p)
        h.update(p.name.encode() + b"\0" + file_digest(p, cache).digest)
    return len(weights)


def model_name(path):
    """A readable name: ``org/name`` for a Hugging Face cache snapshot, else the folder name."""
    parts = Path(path).parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3][len("models--"):].replace("--", "/")
    return Path(path).name


def _mlx_lm_version():
    from importlib import metadata  # here: the admin commands never need it, and it is slow to import

    try:
        return metadata.version("mlx-lm")
    except metadata.PackageNotFoundError:
        return "unknown"


def fingerprint(model_dir, *, adapter_path=None, draft_model=None, digests=None, **cache_options):
    """Return the ``Fingerprint`` of a model directory and cache recipe.

    Args:
        model_dir: a local model directory (config.json, *.safetensors, tokenizer).
        adapter_path: optional adapter directory (LoRA), part of the identity.
        draft_model: optional draft model directory (its cache is appended).
        digests: a store's weight-digest cache (``SnapshotStore.file_digests``):
            weight files it has seen unchanged are not read again.
        **cache_options: options that change the cache layout: ``kv_bits``,
            ``kv_group_size``, ``quantized_kv_start``, ``max_kv_size``. Options
            left at ``None`` do not change the fingerprint.

    Every byte of every weight file is hashed (BLAKE3, about the speed of
    reading the file), once per file content: see ``file_digest``.
    """
    unknown = set(cache_options) - set(LAYOUT_OPTIONS)
    if unknown:
        raise InvalidInput(f"unknown cache options: {sorted(unknown)} (known: {LAYOUT_OPTIONS})")
    model_dir = Path(model_dir)
    h = hashlib.blake2b(digest_size=16, person=b"kvstore.fp")
    h.update(f"v{FINGERPRINT_VERSION} mlx-lm {_mlx_lm_version()}".encode())
    if _hash_dir(h, model_dir, "model", digests) == 0:
        raise InvalidInput(f"no *.safetensors weights in {model_dir}")
    if adapter_path is not None:
        _hash_dir(h, adapter_path, "adapter", digests)
    if draft_model is not None:
        _hash_dir(h, draft_model, "draft", digests)
    options = {k: v for k, v in sorted(cache_options.items()) if v is not None}
    if options.get("kv_bits") is None:
        # group size and start only matter once KV is quantised
        options.pop("kv_group_size", None)
        options.pop("quantized_kv_start", None)
    h.update(json.dumps(options, sort_keys=True).encode())
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    model_type = str(config.get("model_type", ""))
    vocab = config.get("vocab_size", text.get("vocab_size"))
    resolved = model_dir.resolve()
    return Fingerprint(
        f"{model_type or 'model'}-{h.hexdigest()}",
        name=model_name(resolved),
        model_type=model_type,
        vocab_size=vocab if isinstance(vocab, int) and vocab > 0 else None,
        path=str(resolved),
    )
