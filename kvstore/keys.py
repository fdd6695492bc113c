"""Token keys: blake2b chained over fixed-size token blocks.

A model namespace (fingerprint plus optional tenant salt) seeds a root hash;
each block of ``block_tokens`` little-endian int32 tokens is hashed keyed by
the previous link; a snapshot key hashes the partial tail and the length
keyed by the last full-block link. Hashes only find candidates: stored tokens
are compared on every hit. This module never touches disk.
"""

import hashlib
import struct
import sys
import threading
from collections import OrderedDict

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
    arr = _fast_list(tokens) if isinstance(tokens, (list, tuple)) else None
    if arr is None:
        arr = _any_sequence(tokens)
    if arr.size == 0:
        return np.zeros(0, dtype="<i4")
    lo, hi = arr.min(), arr.max()
    if lo < 0:
        raise InvalidInput(f"token {int(lo)} is negative")
    limit = MAX_TOKEN if vocab_size is None else vocab_size - 1
    if hi > limit:
        raise InvalidInput(f"token {int(hi)} is outside the vocabulary (max {limit})")
    return arr.astype("<i4", copy=False)


def _fast_list(tokens):
    """A list of Python ints as an int32 array in one C pass (``None``: take the general path,
    which says precisely what is wrong)."""
    if tokens and type(tokens[0]) is bool:
        return None
    try:
        # struct converts and range-checks each int faster than array.array or numpy do
        return np.frombuffer(struct.pack(f"<{len(tokens)}i", *tokens), dtype="<i4")
    except (struct.error, TypeError, OverflowError):
        return None


def _any_sequence(tokens):
    if hasattr(tokens, "tolist") and not isinstance(tokens, np.ndarray):
        tokens = tokens.tolist()  # mx.array
    try:
        arr = np.asarray(tokens)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"tokens are not a sequence of integers: {exc}") from exc
    if arr.ndim != 1:
        raise InvalidInput(f"tokens must be one-dimensional, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise InvalidInput(f"tokens must be integers, got {arr.dtype}")
    return arr


def shared_prefix(a, b, limit=None):
    """How many leading tokens two token arrays share (at most ``limit``)."""
    m = min(len(a), len(b), len(a) if limit is None else limit)
    if m <= 0:
        return 0
    diff = a[:m] != b[:m]
    first = int(diff.argmax())  # the first True, or 0 when there is none
    return first if diff[first] else m


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
    the namespace root), computed when first asked for: a lookup that finds
    nothing after the first block hashes one block, not the whole prompt.
    ``key(n)`` is the snapshot key of the first ``n`` tokens. ``known`` may
    give the first links already computed (by a chain of the same root whose
    tokens agree that far).
    """

    __slots__ = ("tokens", "block", "links", "_raw")

    def __init__(self, root, tokens, block, known=None):
        self.tokens = tokens
        self.block = block
        self._raw = tokens.tobytes() if sys.byteorder == "little" else tokens.astype("<i4").tobytes()
        self.links = _Links(self, list(known) if known else [root])

    def __len__(self):
        return len(self.tokens)

    def key(self, n):
        """Snapshot key of the first ``n`` tokens (0 < n <= len)."""
        k = n // self.block
        tail = self._raw[4 * k * self.block : 4 * n]
        return hashlib.blake2b(
            tail + n.to_bytes(8, "little"), digest_size=DIGEST, key=self.links[k], person=b"kvstore.key"
        ).digest()


class _Links:
    """A chain's links, hashed block by block as far as they are asked for."""

    __slots__ = ("chain", "done")

    def __init__(self, chain, done):
        self.chain, self.done = chain, done

    def __len__(self):
        return len(self.chain.tokens) // self.chain.block + 1

    def _upto(self, k):
        done, c = self.done, self.chain
        if k < len(done):
            return
        step = 4 * c.block
        mv, h, b2 = memoryview(c._raw), done[-1], hashlib.blake2b
        for i in range(len(done) - 1, k):
            h = b2(mv[i * step : (i + 1) * step], digest_size=DIGEST, key=h, person=b"kvstore.blk").digest()
            done.append(h)

    def __getitem__(self, i):
        n = len(self)
        if isinstance(i, slice):
            start, stop, stride = i.indices(n)
            if stop > start:
                self._upto(stop - 1)
            return self.done[start:stop:stride]
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("chain link out of range")
        self._upto(i)
        return self.done[i]

    def __eq__(self, other):
        return list(self) == list(other)

    def __iter__(self):
        return iter(self[:])

    def computed(self, upto):
        """The links already hashed, at most through ``upto``."""
        return self.done[: upto + 1]


class ChainCache:
    """The chains of the last few requests, so the next request of a
    conversation hashes only the blocks it adds.

    ``chain(root, tokens, block)`` reuses the links of the cached chain with
    the same root that shares the most leading tokens (compared, not
    assumed). Thread-safe; holds at most ``size`` chains.
    """

    def __init__(self, size=16):
        self.size = size
        self._chains = OrderedDict()  # (root, block, id) -> TokenChain
        self._lock = threading.Lock()
        self._next = 0

    def chain(self, root, tokens, block):
        best, best_k, best_id = None, 0, None
        with self._lock:
            cands = [(cid, c) for (r, b, cid), c in self._chains.items() if r == root and b == block]
        for cid, c in cands:
            k = shared_prefix(c.tokens, tokens) // block
            if k > best_k:
                best, best_k, best_id = c, k, cid
        chain = TokenChain(root, tokens, block, best.links.computed(best_k) if best is not None else None)
        with self._lock:
            if best is not None and len(tokens) <= len(best.tokens) and best_k == len(tokens) // block:
                self._chains.move_to_end((root, block, best_id))  # nothing new: keep the longer one
            else:
                if best is not None and len(tokens) >= len(best.tokens):
                    self._chains.pop((root, block, best_id), None)  # this request extends it
                self._next += 1
                self._chains[(root, block, self._next)] = chain
                while len(self._chains) > self.size:
                    self._chains.popitem(last=False)
        return chain
