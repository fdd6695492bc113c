"""What travels to and from a remote tier: bundles and chunks.

A *bundle* is everything a host needs to trust and rebuild one snapshot
besides its blob bytes: the snapshot record, its segment records, its
model's layout record and, per blob, its size and a digest of each chunk
the bytes travel in. A bundle names its own key and namespace, so it
cannot be replayed under another key. With a shared secret it carries an
HMAC-SHA256 over all of that, and its chunk digests are BLAKE3 (a holder of
the secret vouches for the bytes, not only for the record); without one
they are xxh3 (damage is caught, forgery is not).

Blob bytes travel as chunks of ``chunk_bytes``; ``ChunkSource`` reads a
blob straight out of the fetched chunks (no joined copy) for
``kvstore.blobs.BlobReader``. This module does no network I/O and never
imports MLX.
"""

import hashlib
import hmac
from dataclasses import dataclass, field

import blake3
import xxhash

from .blobs import Source
from .errors import CorruptSnapshot, FormatVersionError
from .records import is_id, pack, unpack

# the bundle format; another version on the remote is a miss
BUNDLE_VERSION = 1
# bytes per value on the remote (see benchmarks/bench_remote.py for the size sweep)
CHUNK_BYTES = 4 << 20


@dataclass
class BlobSpec:
    """One blob of a bundle: its id (hex), size, chunk size and per-chunk digests."""

    blob: str
    size: int
    chunk: int
    digests: list

    def chunks(self):
        return len(self.digests)


@dataclass
class Bundle:
    """A snapshot as it travels: raw records (validated where they are used) and blob specs."""

    key: bytes
    ns: str
    snapshot: bytes
    model: bytes
    segments: dict  # segment id (bytes) -> raw segment record
    blobs: list = field(default_factory=list)  # [BlobSpec]
    digest: str = "xxh3"

    def spec(self, blob_id):
        for s in self.blobs:
            if s.blob == blob_id:
                return s
        raise CorruptSnapshot(f"bundle names no blob {blob_id}")


def chunk_digest(algo, data):
    if algo == "blake3":
        return blake3.blake3(data).digest()
    return xxhash.xxh3_64_intdigest(data)


def split(data, chunk_bytes, algo):
    """``(chunks as memoryviews, digests)`` of a blob's bytes (no copies)."""
    mv = memoryview(data).cast("B")
    parts = [mv[i : i + chunk_bytes] for i in range(0, max(len(mv), 1), chunk_bytes)]
    return parts, [chunk_digest(algo, p) for p in parts]


def _mac(secret, body):
    return hmac.new(secret, body, hashlib.sha256).digest()


def encode_bundle(b, secret=None):
    """The bytes stored for a bundle (signed when ``secret`` is given)."""
    body = pack({
        "v": BUNDLE_VERSION, "key": b.key, "ns": b.ns, "snap": b.snapshot, "model": b.model,
        "segs": [[k, v] for k, v in b.segments.items()], "dg": b.digest,
        "blobs": [[s.blob, s.size, s.chunk, s.digests] for s in b.blobs],
    })
    return pack({"b": body, "m": _mac(secret, body) if secret else None})


def decode_bundle(raw, key, ns, secret=None):
    """The ``Bundle`` stored as ``raw`` under ``key`` in namespace ``ns``.

    ``CorruptSnapshot`` if it is malformed, names another key or namespace,
    or (with ``secret``) is unsigned or signed with another secret;
    ``FormatVersionError`` for another bundle version.
    """
    outer = unpack(raw, "remote bundle")
    body, mac = outer.get("b"), outer.get("m")
    if not isinstance(body, bytes):
        raise CorruptSnapshot("malformed remote bundle")
    if secret is not None:
        if not isinstance(mac, bytes) or not hmac.compare_digest(mac, _mac(secret, body)):
            raise CorruptSnapshot("remote bundle is not signed with this host's secret")
    rec = unpack(body, "remote bundle")
    if rec.get("v") != BUNDLE_VERSION:
        raise FormatVersionError(f"remote bundle has format version {rec.get('v')!r}")
    segs, blobs, algo = rec.get("segs"), rec.get("blobs"), rec.get("dg")
    ok = (rec.get("key") == key and rec.get("ns") == ns and isinstance(rec.get("snap"), bytes)
          and isinstance(rec.get("model"), bytes) and isinstance(segs, list) and isinstance(blobs, list)
          and algo in ("xxh3", "blake3") and (secret is None or algo == "blake3")
          and all(isinstance(s, list) and len(s) == 2 and is_id(s[0]) and isinstance(s[1], bytes) for s in segs)
          and all(isinstance(s, list) and len(s) == 4 and isinstance(s[0], str) and type(s[1]) is int
                  and type(s[2]) is int and s[2] >= 1 and isinstance(s[3], list)
                  and len(s[3]) == max(1, -(-s[1] // s[2])) for s in blobs))
    if not ok:
        raise CorruptSnapshot("malformed remote bundle (or one stored under another key)")
    return Bundle(key, ns, rec["snap"], rec["model"], {bytes(k): v for k, v in segs},
                  [BlobSpec(*s) for s in blobs], algo)


def check_chunks(spec, chunks, algo):
    """Raise ``CorruptSnapshot`` unless ``chunks`` are the blob's, whole and unchanged."""
    if len(chunks) != spec.chunks():
        raise CorruptSnapshot(f"blob {spec.blob}: {len(chunks)} of {spec.chunks()} chunks")
    total = 0
    for i, (c, want) in enumerate(zip(chunks, spec.digests)):
        if c is None:
            raise ChunkMissing(f"blob {spec.blob} chunk {i} is gone (evicted or expired)")
        if chunk_digest(algo, c) != want:
            raise CorruptSnapshot(f"blob {spec.blob} chunk {i} checksum mismatch")
        total += len(c)
    if total != spec.size:
        raise CorruptSnapshot(f"blob {spec.blob} is {total} bytes, bundle says {spec.size}")


class ChunkMissing(CorruptSnapshot):
    """A chunk the bundle names is not on the remote (evicted or expired)."""


class ChunkSource(Source):
    """A blob's bytes as fetched chunks, read in place (a ``BlobReader`` source)."""

    def __init__(self, chunks, chunk_bytes):
        self.chunks = [memoryview(c).cast("B") for c in chunks]
        self.chunk = chunk_bytes
        self.size = sum(len(c) for c in self.chunks)

    def readinto(self, mv, offset):
        got, n = 0, len(mv)
        while got < n and offset + got < self.size:
            i, at = divmod(offset + got, self.chunk)
            part = self.chunks[i][at : at + n - got]
            mv[got : got + len(part)] = part
            got += len(part)
        return got

    def close(self):
        self.chunks = []


class OutOfOrder(CorruptSnapshot):
    """A reader asked a streamed blob for bytes it has already passed (the caller falls back)."""


def _hasher(algo):
    return blake3.blake3() if algo == "blake3" else xxhash.xxh3_64()


def _value(algo, h):
    return h.digest() if algo == "blake3" else h.intdigest()


class StreamSource(Source):
    """A blob's chunks read straight off the wire into the reader's buffers (a ``BlobReader`` source).

    ``stream`` yields the chunks' values in order (``begin() -> length or None``,
    ``recv_into(mv)``, ``skip(n)``, ``end()``). Reads must come in increasing
    offsets (gaps are skipped, still hashed); each chunk's digest is checked
    when its last byte has arrived, so a damaged chunk fails the load before
    anything is handed out. ``close`` drains what was not read.
    """

    def __init__(self, stream, spec, algo):
        self.stream, self.spec, self.algo = stream, spec, algo
        self.size = spec.size
        self.pos, self.i, self.left, self.h = 0, -1, 0, None
        self._scratch = None

    def _next_chunk(self):
        self.i += 1
        n = self.stream.begin()
        if n is None:
            raise ChunkMissing(f"blob {self.spec.blob} chunk {self.i} is gone (evicted or expired)")
        want = min(self.spec.chunk, self.size - self.i * self.spec.chunk)
        if self.i >= self.spec.chunks() or n != want:
            raise CorruptSnapshot(f"blob {self.spec.blob} chunk {self.i} is {n} bytes, bundle says {want}")
        self.left, self.h = n, _hasher(self.algo)

    def _take(self, mv):
        """Receive exactly ``len(mv)`` bytes of the blob into ``mv`` (crossing chunks)."""
        got = 0
        while got < len(mv):
            if self.left == 0:
                self._next_chunk()
            part = mv[got : got + min(self.left, len(mv) - got)]
            self.stream.recv_into(part)
            self.h.update(part)
            got += len(part)
            self.left -= len(part)
            self.pos += len(part)
            if self.left == 0:
                self.stream.end()
                if _value(self.algo, self.h) != self.spec.digests[self.i]:
                    raise CorruptSnapshot(f"blob {self.spec.blob} chunk {self.i} checksum mismatch")

    def _skip_to(self, offset):
        if self._scratch is None:
            self._scratch = memoryview(bytearray(1 << 20))
        while self.pos < offset:
            self._take(self._scratch[: min(len(self._scratch), offset - self.pos)])

    def readinto(self, mv, offset):
        if offset < self.pos:
            raise OutOfOrder(f"blob {self.spec.blob}: read at {offset} after {self.pos}")
        n = max(0, min(len(mv), self.size - offset))
        self._skip_to(offset)
        if n:
            self._take(memoryview(mv).cast("B")[:n])
        return n

    def close(self):
        """Read (and check) the rest of the blob, so the next blob's chunks come next."""
        if self.stream is not None:
            stream, self.stream = self.stream, None
            try:
                self.stream = stream
                self._skip_to(self.size)
            except Exception:
                stream.broken = True
            finally:
                self.stream = None
