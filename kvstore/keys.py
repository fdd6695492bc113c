"""Token keys: blake2b chained over fixed-size token blocks.

A model namespace (fingerprint plus optional tenant salt) seeds a root hash;
each block of ``block_tokens`` little-endian int32 tokens is hashed keyed by
the previous link; a snapshot key hashes the partial tail and the length
keyed by the last full-block link. Hashes only find candidates: stored tokens
are compared on every hit. This module never touches disk.
"""

import hashlib
import sys

import numpy as np

from .errors import InvalidInput

DIGEST = 16
MAX_TOKEN = 2**31 - 1


def as_tokens(tokens, vocab_size=None):
    """Validate ``tokens`` and return them as a little-endian int32 array.

    Accepts a list, tuple, numpy array or ``mx.array`` of integers. Raises
    ``InvalidInput`` for non-integers, negatives, values past int32 or past
    ``vocab_size``, and for anything that is not one-dimensional.
    """
    if hasattr(tokens, "tolist") and not isinstance(tokens, np.ndarray):
        tokens = tokens.tolist()  # mx.array
    try:
        arr = np.asarray(tokens)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"tokens are not a sequence of integers: {exc}") from exc
    if arr.ndim != 1:
        raise InvalidInput(f"tokens must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype="<i4")
    if arr.dtype.kind not in "iu":
        raise InvalidInput(f"tokens must be integers, got {arr.dtype}")
    lo, hi = arr.min(), arr.max()
    if lo < 0:
        raise InvalidInput(f"token {int(lo)} is negative")
    limit = MAX_TOKEN if vocab_size is None else vocab_size - 1
    if hi > limit:
        raise InvalidInput(f"token {int(hi)} is outside the vocabulary (max {limit})")
    return arr.astype("<i4", copy=False)


def tenant_salt(tenant):
    """The 32-byte key a tenant's namespace is derived with (``None``: no tenant).

    A tenant is a non-empty string or bytes; every tenant value, short or
    long, is hashed, so no tenant's salt equals another's and none equals
    the un-tenanted namespace. Raises ``InvalidInput`` for an empty or
    non-string tenant.
    """
    if tenant is None:
        return None
    if isinstance(tenant, str):
        raw = tenant.encode()
    elif isinstance(tenant, (bytes, bytearray, memoryview)):
        raw = bytes(tenant)
    else:
        raise InvalidInput(f"tenant must be a string or bytes, got {type(tenant).__name__}")
    if not raw:
        raise InvalidInput("tenant must not be empty (pass None for no tenant)")
    return hashlib.blake2b(raw, digest_size=32, person=b"kvstore.tenant").digest()


def namespace(fingerprint, tenant=None):
    """The root link for one model fingerprint and optional tenant.

    "No tenant" and every tenant are separate domains (different blake2b
    personalisation), so no tenant value reaches the un-tenanted namespace.
    """
    if not isinstance(fingerprint, str) or not fingerprint or len(fingerprint) > 256:
        raise InvalidInput("fingerprint must be a non-empty string of at most 256 chars")
    salt = tenant_salt(tenant)
    if salt is None:
        return hashlib.blake2b(fingerprint.encode(), digest_size=DIGEST, person=b"kvstore.root").digest()
    return hashlib.blake2b(fingerprint.encode(), digest_size=DIGEST, key=salt, person=b"kvstore.tnt").digest()


class TokenChain:
    """Chained block hashes of one token sequence under one namespace.

    ``links[k]`` is the hash of the first ``k * block`` tokens (``links[0]`` is
    the namespace root). ``key(n)`` is the snapshot key of the first ``n`` tokens.
    """

    __slots__ = ("tokens", "block", "links", "_raw")

    def __init__(self, root, tokens, block):
        self.tokens = tokens
        self.block = block
        raw = tokens.tobytes() if sys.byteorder == "little" else tokens.astype("<i4").tobytes()
        self._raw = raw
        step = 4 * block
        links = [root]
        h = root
        b2 = hashlib.blake2b
        for k in range(len(tokens) // block):
            h = b2(raw[k * step : (k + 1) * step], digest_size=DIGEST, key=h, person=b"kvstore.blk").digest()
            links.append(h)
        self.links = links

    def __len__(self):
        return len(self.tokens)

    def key(self, n):
        """Snapshot key of the first ``n`` tokens (0 < n <= len)."""
        k = n // self.block
        tail = self._raw[4 * k * self.block : 4 * n]
        return hashlib.blake2b(
            tail + n.to_bytes(8, "little"), digest_size=DIGEST, key=self.links[k], person=b"kvstore.key"
        ).digest()
