"""Listing a store: snapshots with their sizes, models, totals by model and tier.

Read from one index view, no blob I/O. Sizes come from the segment records
and add up: ``bytes`` is everything a snapshot reads (its own blobs and the
shared segments it uses), fixed for its life; ``unique_bytes`` (OWN) the
bytes only it holds, which is what deleting it alone frees now;
``shared_bytes`` the rest, segments other snapshots use too. The OWN bytes
of every snapshot plus each shared segment once is the store's total.
``split_bytes`` splits each shared segment evenly between its users, so
totals by model or tier add up to the store's bytes too.
"""

import contextlib
import gc

from .errors import CorruptSnapshot
from .records import TIERS, Model, decode_access, decode_model, segment_size, snapshot_summary
from .reports import SnapshotInfo


def entries(index, fingerprint=None, tier=None):
    """Every snapshot as a ``SnapshotInfo``; a damaged record is listed with ``?`` fields."""
    out, names = [], {}
    with index.read() as r, gc_paused():
        segs = _segment_sizes(r)
        accesses = dict(r.accesses())  # one pass in key order, not a lookup per snapshot
        for k, raw in r.snapshots():
            try:
                snap = snapshot_summary(raw)
            except CorruptSnapshot:
                out.append(SnapshotInfo(k.hex(), "?", "?", "?", 0, 0, 0, 0.0, 0.0, 0, False))
                continue
            fp = snap[0]
            if (fingerprint is not None and fp != str(fingerprint)) or (tier is not None and snap[1] != tier):
                continue
            if fp not in names:
                names[fp] = _model_name(r, fp)
            out.append(_info(k, snap, names[fp], segs, accesses.get(k)))
    return out


@contextlib.contextmanager
def gc_paused():
    """Pause the cyclic garbage collector (a listing builds many objects and no cycles)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _segment_sizes(r):
    """``{segment id: (size, its share of it for one user, hex id, shared)}`` of every
    well-formed segment record, read in one pass."""
    out = {}
    for sid, raw in r.segments():
        try:
            size, refs = segment_size(raw)
        except CorruptSnapshot:
            continue
        out[sid] = (size, size // max(refs, 1), sid.hex(), refs > 1)
    return out


def models(index):
    """``{fingerprint: {"name", "type", "vocab", "path"}}`` of every model record."""
    out = {}
    with index.read() as r:
        for fp, raw in r.models():
            try:
                m = decode_model(raw)
            except CorruptSnapshot:
                m = Model()
            out[fp] = {"name": m.name, "type": m.type, "vocab": m.vocab, "path": m.path}
    return out


def totals(listed, index):
    """Snapshots, tokens, bytes and hits by model and tier; index use."""
    by_model, by_tier = {}, {t: {"snapshots": 0, "tokens": 0, "bytes": 0} for t in TIERS}
    for e in listed:
        m = by_model.setdefault(e.model, {"fingerprint": e.fingerprint, "snapshots": 0, "tokens": 0, "bytes": 0})
        for d in (m, by_tier.setdefault(e.tier, {"snapshots": 0, "tokens": 0, "bytes": 0})):
            d["snapshots"] += 1
            d["tokens"] += e.tokens
            d["bytes"] += e.split_bytes
    map_size, map_used = index.usage()
    with index.read() as r:
        segs, indexed = r.count("segments"), r.counter("bytes")
    return {"snapshots": len(listed), "segments": segs, "bytes": indexed, "tokens": sum(e.tokens for e in listed),
            "hits": sum(e.hits for e in listed), "by_model": by_model, "by_tier": by_tier, "map_size": map_size,
            "map_used": map_used}


def _model_name(r, fingerprint):
    raw = r.model(fingerprint)
    try:
        name = decode_model(raw).name if raw is not None else ""
    except CorruptSnapshot:
        name = ""
    return name or fingerprint


def _info(k, snap, name, segs, acc_raw):
    """The ``SnapshotInfo`` of one record (``snapshot_summary``), sizes from its segment
    records, last access from its raw access record (``None``: never accessed)."""
    fp, tier, n, extents, state, trimmable, created = snap
    size = split = shared_size = 0
    sizes, shared = {}, []
    for seg, _rows in extents:
        got = segs.get(seg)
        seg_size, part, hexid, many = got if got is not None else (0, 0, seg.hex(), False)
        sizes[hexid] = seg_size
        size += seg_size
        split += part
        if many:
            shared.append(hexid)
            shared_size += seg_size
    own = size - shared_size
    if state:
        sizes[state.blob.hex()] = state.size
        size += state.size
        split += state.size
        own += state.size
    acc = decode_access(acc_raw) if acc_raw is not None else None
    accessed = acc.accessed if acc is not None and acc.accessed else created
    return SnapshotInfo(k.hex(), fp, name, tier, n, size, size - own, created, accessed,
                        acc.hits if acc is not None else 0, trimmable, list(sizes), own, sizes, split, shared)


def footprint(listed):
    """``(own bytes, shared bytes, shared blobs)`` of ``listed``: their OWN bytes, and each
    blob that several of them (or others) read counted once. For every snapshot of a
    store, own + shared is the store's total bytes."""
    own = sum(e.unique_bytes for e in listed)
    shared = {b: e.blob_bytes.get(b, 0) for e in listed for b in e.shared_blobs}
    return own, sum(shared.values()), len(shared)
