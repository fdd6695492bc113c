"""Index records: snapshots, segments, models and access times as typed values.

Every record kvstore keeps in an index is one of the dataclasses here,
converted to and from msgpack in this module and nowhere else. Decoding
validates every field a reader, ``delete``, ``gc``, ``verify`` or an import
relies on: index bytes may hold anything (a flipped bit, another tool's
writes, a hostile archive), and anything malformed is ``CorruptSnapshot``.
The msgpack field names are the on-disk format (format version 1); they
never change without a new version. This module does no I/O.
"""

from dataclasses import dataclass, field
from typing import NamedTuple

import msgpack
import numpy as np

from .errors import CorruptSnapshot

FORMAT_VERSION = 1
TIERS = ("system", "user", "assistant")
# eviction and prune order: lower rank goes first
TIER_RANK = {"assistant": 0, "user": 1, "system": 2}
KEY_BYTES = 16


def pack(obj):
    """msgpack bytes of a plain value (maps, lists, bytes, str, numbers)."""
    return msgpack.packb(obj, use_bin_type=True)


def unpack(raw, what="record"):
    """Decode one msgpack map; anything malformed or oversized is ``CorruptSnapshot``."""
    try:
        obj = msgpack.unpackb(
            raw, raw=False, strict_map_key=False, max_bin_len=1 << 30, max_str_len=1 << 20,
            max_array_len=1 << 22, max_map_len=1 << 16,
        )
    except Exception as exc:  # msgpack raises a zoo of types on hostile input
        raise CorruptSnapshot(f"malformed {what}: {type(exc).__name__}") from exc
    if not isinstance(obj, dict):
        raise CorruptSnapshot(f"malformed {what}: not a map")
    return obj


def is_id(x):
    """True for a 16-byte id (snapshot key, blob or segment id, chain link)."""
    return isinstance(x, bytes) and len(x) == KEY_BYTES


def _int(x, lo=0):
    return type(x) is int and x >= lo


# ------------------------------------------------------------------ records
class Extent(NamedTuple):
    """``rows`` rows of the shared segment ``segment`` (positional KV of consecutive tokens)."""

    segment: bytes
    rows: int


@dataclass(frozen=True)
class BlobRef:
    """An immutable blob: its id, size in bytes and the checksum of its header."""

    blob: bytes
    size: int
    header_sum: int


@dataclass
class Snapshot:
    """One snapshot: a model's prompt cache for one token sequence.

    ``extents`` cover its positional KV token by token (segments shared with
    other snapshots); ``state`` is the blob of its non-positional state
    (recurrent state, rotating windows), owned by this snapshot alone.
    ``links`` are the chain links it is indexed under (block ``1..n//block``)
    and ``end_link`` the link of the block it ends in.
    """

    fingerprint: str
    tier: str
    n_tokens: int
    tokens: bytes
    layout: list
    layout_id: str
    extents: list
    state: BlobRef | None
    trimmable: bool
    own_bytes: int
    created: float
    tenanted: bool
    links: bytes
    end_link: bytes
    version: int = FORMAT_VERSION

    def token_ids(self):
        """The tokens as a little-endian int32 array (a view of the record's bytes)."""
        return np.frombuffer(self.tokens, dtype="<i4")

    def link_list(self):
        """The chain links the snapshot is indexed under, in order."""
        return [self.links[i : i + KEY_BYTES] for i in range(0, len(self.links), KEY_BYTES)]

    def blob_ids(self):
        """Every blob the snapshot reads: its segments, then its state blob."""
        return [e.segment for e in self.extents] + ([self.state.blob] if self.state else [])

    def same_tokens(self, toks, n=None):
        """True if the stored tokens start with the first ``n`` (default: all) of ``toks`` (int32 array)."""
        n = len(toks) if n is None else n
        return len(self.tokens) >= 4 * n and self.tokens[: 4 * n] == toks[:n].tobytes()


@dataclass
class Segment:
    """Positional KV rows for tokens ``start .. start + rows`` of one model,
    shared by every snapshot whose extents reference it."""

    fingerprint: str
    rows: int
    start: int | None
    size: int
    header_sum: int
    refs: int
    created: float = 0.0
    version: int = FORMAT_VERSION


@dataclass
class Model:
    """What the store knows of one fingerprint: a readable name, the tokenizer
    path, the layout structure every snapshot shares, and its exact layouts
    (signature id -> signature)."""

    name: str = ""
    type: str = ""
    vocab: int | None = None
    path: str = ""
    struct: dict | None = None
    sigs: dict = field(default_factory=dict)
    created: float = 0.0


@dataclass
class Access:
    """A snapshot's last access time and hit count."""

    accessed: float = 0.0
    hits: int = 0


# ------------------------------------------------------------------ encoding
def encode_snapshot(s):
    return pack({
        "v": s.version, "fp": s.fingerprint, "tier": s.tier, "n": s.n_tokens, "tok": s.tokens, "lay": s.layout,
        "sid": s.layout_id, "ext": [[e.segment, e.rows] for e in s.extents],
        "st": [s.state.blob, s.state.size, s.state.header_sum] if s.state else None, "trim": s.trimmable,
        "own": s.own_bytes, "t": s.created, "ten": s.tenanted, "links": s.links, "endl": s.end_link,
    })


def decode_snapshot(raw):
    """The ``Snapshot`` in ``raw``; ``CorruptSnapshot`` unless it has the shape ``put`` writes."""
    return snapshot_from(unpack(raw))


def snapshot_from(rec):
    """A ``Snapshot`` from a decoded record map (validated as ``decode_snapshot``)."""
    check_snapshot(rec)
    get, st = rec.get, rec.get("st")
    own = get("own", 0)
    return Snapshot(
        rec["fp"], rec["tier"], rec["n"], rec["tok"], rec["lay"], rec["sid"], [Extent(bytes(s), r) for s, r in rec["ext"]],
        BlobRef(bytes(st[0]), st[1], st[2]) if st else None, bool(get("trim")), own if type(own) is int else 0,
        _created(rec), bool(get("ten")), get("links", b""), rec["endl"],
    )


def snapshot_summary(raw):
    """``(fingerprint, tier, n_tokens, [[segment, rows], ...], state BlobRef or None, trimmable, created)``
    of a snapshot record, validated as ``decode_snapshot`` but without building a ``Snapshot``
    (a listing and gc read every record for these fields alone)."""
    rec = check_snapshot(unpack(raw))
    st = rec.get("st")
    return (rec["fp"], rec["tier"], rec["n"], rec["ext"], BlobRef(bytes(st[0]), st[1], st[2]) if st else None,
            bool(rec.get("trim")), _created(rec))


def check_snapshot(rec):
    """``rec`` (a decoded map) if it has the shape ``put`` writes; ``CorruptSnapshot`` otherwise."""
    get = rec.get
    n, tok, st, links, endl = get("n"), get("tok"), get("st"), get("links", b""), get("endl")
    if not (
        get("v") == FORMAT_VERSION and isinstance(get("fp"), str) and isinstance(get("tier"), str)
        and type(n) is int and n >= 1 and isinstance(tok, bytes) and len(tok) == 4 * n
        and isinstance(get("lay"), list) and isinstance(get("sid"), str) and _extents_ok(get("ext"))
        and (st is None or (isinstance(st, list) and len(st) == 3 and is_id(st[0]) and _int(st[1])
                            and type(st[2]) is int))
        and isinstance(links, bytes) and len(links) % KEY_BYTES == 0
        and isinstance(endl, bytes) and len(endl) == KEY_BYTES
    ):
        raise CorruptSnapshot("malformed snapshot record")
    return rec


def _extents_ok(ext):
    """True if a record's ``ext`` field is a list of ``[16-byte id, rows >= 1]``."""
    if not isinstance(ext, list):
        return False
    for e in ext:
        if not (isinstance(e, list) and len(e) == 2):
            return False
        seg, rows = e
        if not (isinstance(seg, bytes) and len(seg) == KEY_BYTES and type(rows) is int and rows >= 1):
            return False
    return True


def _created(rec):
    t = rec.get("t", 0.0)
    return float(t) if type(t) in (int, float) else 0.0


def encode_segment(s):
    rec = {"v": s.version, "fp": s.fingerprint, "rows": s.rows, "size": s.size, "hs": s.header_sum, "refs": s.refs,
           "t": s.created}
    if s.start is not None:
        rec["at"] = s.start  # the first token the segment holds (its rows are positional)
    return pack(rec)


def decode_segment(raw):
    """The ``Segment`` in ``raw``; ``CorruptSnapshot`` unless well formed."""
    return segment_from(unpack(raw, "segment record"))


def segment_size(raw):
    """``(size, refs)`` of a segment record, validated as ``decode_segment`` (for listings)."""
    rec = unpack(raw, "segment record")
    at, size, refs = rec.get("at"), rec.get("size"), rec.get("refs")
    if not (isinstance(rec.get("fp"), str) and _int(rec.get("rows"), 1) and _int(size)
            and type(rec.get("hs")) is int and type(refs) is int and (at is None or type(at) is int)):
        raise CorruptSnapshot("malformed segment record")
    return size, refs


def segment_from(rec, refs=None):
    """A ``Segment`` from a decoded map: an index record, or (with ``refs``
    given) an archive's segment entry, which carries no reference count."""
    if refs is not None:
        rec = {**rec, "refs": refs}
    at = rec.get("at")
    if not (isinstance(rec.get("fp"), str) and _int(rec.get("rows"), 1) and _int(rec.get("size"))
            and type(rec.get("hs")) is int and type(rec.get("refs")) is int and (at is None or type(at) is int)):
        raise CorruptSnapshot("malformed segment record")
    t = rec.get("t", 0.0)
    return Segment(rec["fp"], rec["rows"], at, rec["size"], rec["hs"], rec["refs"],
                   float(t) if type(t) in (int, float) else 0.0)


def encode_model(m):
    return pack({"name": m.name, "type": m.type, "vocab": m.vocab, "path": m.path, "struct": m.struct,
                 "sigs": m.sigs, "t": m.created})


def decode_model(raw):
    """The ``Model`` in ``raw``; ``CorruptSnapshot`` if it is not a map."""
    return model_from(unpack(raw, "model record"))


def model_from(rec):
    """A ``Model`` from a decoded map; informational fields of the wrong type read as empty."""

    def text(name):
        v = rec.get(name)
        return v if isinstance(v, str) else ""

    vocab, sigs, t = rec.get("vocab"), rec.get("sigs"), rec.get("t", 0.0)
    return Model(text("name"), text("type"), vocab if type(vocab) is int else None, text("path"),
                 rec.get("struct") if isinstance(rec.get("struct"), dict) else None,
                 sigs if isinstance(sigs, dict) else {}, float(t) if type(t) in (int, float) else 0.0)


def encode_access(a):
    return pack({"a": a.accessed, "h": a.hits})


def decode_access(raw):
    """An ``Access``; a malformed record counts as never accessed."""
    try:
        rec = unpack(raw, "access record")
    except CorruptSnapshot:
        return Access()
    a, h = rec.get("a"), rec.get("h")
    return Access(float(a) if type(a) in (int, float) else 0.0, h if type(h) is int else 0)
