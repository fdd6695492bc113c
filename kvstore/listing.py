"""Listing a store: snapshots with their sizes, models, totals by model and tier.

Read from one index view, no blob I/O. Sizes come from the segment records:
``bytes`` splits each shared segment evenly between its users,
``shared_bytes`` counts segments others use too, ``unique_bytes`` what
deleting the snapshot alone frees now.
"""

from .errors import CorruptSnapshot
from .records import TIERS, Model, decode_access, decode_model, decode_segment, decode_snapshot
from .reports import SnapshotInfo


def entries(index, fingerprint=None, tier=None):
    """Every snapshot as a ``SnapshotInfo``; a damaged record is listed with ``?`` fields."""
    out, names = [], {}
    with index.read() as r:
        segs = _segment_sizes(r)
        for k, raw in r.snapshots():
            try:
                snap = decode_snapshot(raw)
            except CorruptSnapshot:
                out.append(SnapshotInfo(k.hex(), "?", "?", "?", 0, 0, 0, 0.0, 0.0, 0, False))
                continue
            if (fingerprint is not None and snap.fingerprint != str(fingerprint)) or \
                    (tier is not None and snap.tier != tier):
                continue
            if snap.fingerprint not in names:
                names[snap.fingerprint] = _model_name(r, snap.fingerprint)
            out.append(_info(r, k, snap, names[snap.fingerprint], segs))
    return out


def _segment_sizes(r):
    """``{segment id: (size, users)}`` of every well-formed segment record, read in one pass."""
    out = {}
    for sid, raw in r.segments():
        try:
            seg = decode_segment(raw)
        except CorruptSnapshot:
            continue
        out[sid] = (seg.size, max(seg.refs, 1))
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
            d["bytes"] += e.bytes
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


def _info(r, k, snap, name, segs):
    """The ``SnapshotInfo`` of one decoded record, sizes from its segment records."""
    share = shared = unique = 0
    sizes = {}
    for e in snap.extents:
        size, refs = segs.get(e.segment, (0, 1))
        sizes[e.segment.hex()] = size
        share += size // refs
        if refs > 1:
            shared += size
        else:
            unique += size
    if snap.state:
        sizes[snap.state.blob.hex()] = snap.state.size
        share += snap.state.size
        unique += snap.state.size
    acc_raw = r.access(k)
    acc = decode_access(acc_raw) if acc_raw is not None else None
    accessed = acc.accessed if acc is not None and acc.accessed else snap.created
    return SnapshotInfo(
        key=k.hex(), fingerprint=snap.fingerprint, model=name, tier=snap.tier, tokens=snap.n_tokens, bytes=share,
        shared_bytes=shared, unique_bytes=unique, created=snap.created, accessed=accessed,
        hits=acc.hits if acc is not None else 0, trimmable=snap.trimmable, blobs=list(sizes), blob_bytes=sizes,
    )
