"""Moving snapshots between a local store and the remote tier, and the remote's admin.

``push_snapshot`` sends a local snapshot (blob chunks first, then its
bundle and index entries); ``adopt`` writes a fetched one into the local
store (blobs written and verified, then one index transaction, as an
archive import does); ``entries``, ``pull`` and ``prune`` are the remote's
listing, copy and deletion for the command line. None of this runs on a
request's thread.
"""

from dataclasses import dataclass

from .errors import CorruptSnapshot
from .records import decode_model, decode_segment, decode_snapshot, segment_from, unpack
from .transactions import adopt_snapshot
from .transfer import BlobSpec, Bundle, check_chunks, decode_bundle, encode_bundle, split


def push_snapshot(tier, store, kb):
    """Send local snapshot ``kb`` to ``tier``'s remote; True if sent (False: not in the local store)."""
    from .remote import ns_id, remote_info

    with store.index.read() as r:
        raw = r.snapshot(kb)
        if raw is None:
            return False
        snap = decode_snapshot(raw)
        segs = {e.segment: r.segment(e.segment) for e in snap.extents}
        model = r.model(snap.fingerprint)
    if model is None or any(v is None for v in segs.values()):
        raise CorruptSnapshot(f"snapshot {kb.hex()} has records missing")
    sizes = {e.segment.hex(): decode_segment(segs[e.segment]).size for e in snap.extents}
    if snap.state:
        sizes[snap.state.blob.hex()] = snap.state.size
    place, nsx = tier.place, ns_id(snap.fingerprint, store.block)
    count = {b: max(1, -(-size // tier.chunk_bytes)) for b, size in sizes.items()}
    have = place.have_chunks(list(count.items()), tier.ttl)
    specs = []
    for blob, size in sizes.items():
        data = store.blobs.read_bytes(blob, size)
        if len(data) != size:
            raise CorruptSnapshot(f"blob {blob} is {len(data)} bytes, index says {size}")
        parts, digests = split(data, tier.chunk_bytes, tier.digest)
        if not have[blob]:
            place.put_chunks(blob, parts, tier.ttl)
            tier.count("bytes_pushed", size)
        specs.append(BlobSpec(blob, size, tier.chunk_bytes, digests))
    bundle = Bundle(kb, nsx, raw, model, segs, specs, tier.digest)
    info = remote_info(snap.fingerprint, snap.n_tokens, snap.tier, sum(sizes.values()), snap.created, snap.tenanted)
    place.put_bundle(nsx, kb.hex(), encode_bundle(bundle, tier.secret), snap.n_tokens, snap.end_link.hex(),
                     [link.hex() for link in snap.link_list()], info, tier.ttl)
    return True


def adopt(store, bundle, chunks, place=None):
    """Write a remote snapshot into the local store; True if added (False: already there).

    ``chunks`` holds the fetched chunks by blob id; blobs not among them are
    fetched from ``place``. Every blob is verified whole before the index
    points at it.
    """
    snap = decode_snapshot(bundle.snapshot)
    model = decode_model(bundle.model)
    with store.index.read() as r:
        if r.snapshot(bundle.key) is not None:
            return False
    missing = [s for s in bundle.blobs if s.blob not in chunks]
    if missing:
        if place is None:
            return False
        got = place.get_chunks([(s.blob, s.chunks()) for s in missing])
        for s in missing:
            check_chunks(s, got[s.blob], bundle.digest)
        chunks = {**chunks, **got}
    written = []
    try:
        for spec in bundle.blobs:
            if not store.blobs.exists(spec.blob):
                store.blobs.write_bytes(spec.blob, b"".join(chunks[spec.blob]))
                written.append(spec.blob)
        for e in snap.extents:
            seg = decode_segment(bundle.segments[e.segment])
            with store.blobs.open(e.segment.hex(), seg.size, seg.header_sum) as rd:
                rd.verify()
        if snap.state:
            with store.blobs.open(snap.state.blob.hex(), snap.state.size, snap.state.header_sum) as rd:
                rd.verify()
        return store.index.write(lambda w: _index(w, bundle, snap, model)) is not None
    except BaseException:
        for b in written:
            store.blobs.unlink(b)
        raise


def _index(w, bundle, snap, model):
    segments = {}
    for e in dict.fromkeys(x.segment for x in snap.extents):
        seg = segment_from(unpack(bundle.segments[e], "segment record"), refs=1)
        if seg.fingerprint != snap.fingerprint:
            raise CorruptSnapshot(f"segment {e.hex()} belongs to another model")
        segments[e] = seg
    return adopt_snapshot(w, bundle.key, snap, model, segments, raw=bundle.snapshot)


# ------------------------------------------------------------------ admin
@dataclass
class RemoteEntry:
    """One snapshot on the remote, as listed."""

    key: str
    ns: str
    fingerprint: str
    tokens: int
    tier: str
    bytes: int
    created: float
    tenanted: bool


def entries(tier):
    """Every snapshot of the deployment (a SCAN over the listing entries)."""
    out = []
    for nsx, key, raw in tier.place.catalogue():
        try:
            rec = unpack(raw, "remote listing")
        except CorruptSnapshot:
            continue
        try:
            out.append(RemoteEntry(key, nsx, str(rec["fp"]), int(rec["n"]), str(rec["tier"]), int(rec["b"]),
                                   float(rec["t"]), bool(rec["ten"])))
        except (KeyError, TypeError, ValueError):
            continue
    return out


def fetch_bundle(tier, entry):
    """The checked ``Bundle`` and chunks of a listed snapshot (``CorruptSnapshot`` if unusable)."""
    raw = tier.place.get_bundle(entry.ns, entry.key)
    if raw is None:
        raise CorruptSnapshot(f"remote snapshot {entry.key} is gone")
    bundle = decode_bundle(raw, bytes.fromhex(entry.key), entry.ns, tier.secret)
    got = tier.place.get_chunks([(s.blob, s.chunks()) for s in bundle.blobs])
    for s in bundle.blobs:
        check_chunks(s, got[s.blob], bundle.digest)
    return bundle, got


def delete(tier, entry):
    """Remove one remote snapshot's bundle and index entries; True if it was there."""
    raw = tier.place.get_bundle(entry.ns, entry.key)
    links, end = [], None
    if raw is not None:
        try:
            body = unpack(unpack(raw, "remote bundle")["b"], "remote bundle")
            snap = decode_snapshot(body["snap"])
            links, end = [x.hex() for x in snap.link_list()], snap.end_link.hex()
        except (CorruptSnapshot, KeyError, TypeError):
            pass
    return tier.place.delete_bundle(entry.ns, entry.key, end or "0" * 32, links)


def sweep_chunks(tier):
    """Delete chunks no remaining bundle names (after deletions); return how many blobs went."""
    used = set()
    for e in entries(tier):
        raw = tier.place.get_bundle(e.ns, e.key)
        if raw is None:
            continue
        try:
            body = unpack(unpack(raw, "remote bundle")["b"], "remote bundle")
            used.update(s[0] for s in body["blobs"])
        except (CorruptSnapshot, KeyError, TypeError, IndexError):
            continue
    gone = 0
    for blob, names in tier.place.chunk_blobs().items():
        if blob not in used:
            tier.place.delete_keys(names)
            gone += 1
    return gone
