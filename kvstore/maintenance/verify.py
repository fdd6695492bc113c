"""verify: every record checked, every blob read whole and checksummed.

A record is checked as a reader would (format, tokens, extents covering
its tokens, segments of its own model at the right positions); each blob
once, whatever the number of snapshots sharing it. With ``fix`` the bad
blobs are retired as a failed load retires them (``kvstore.quarantine``):
moved to ``quarantine/``, their segment records deleted so no new snapshot
shares them, and the snapshots using them deleted, only if their records
are still the ones the scan saw (other processes may delete and store
again meanwhile). Never on the request path.
"""

from ..errors import CorruptSnapshot
from ..records import FORMAT_VERSION, decode_segment, snapshot_from, unpack
from ..reports import Problem


def record_blobs(rec, segs):
    """Check one decoded record against the segment records; return its blobs
    as ``[(blob id, size, header sum)]`` (``CorruptSnapshot`` on a fault)."""
    if rec.get("v") != FORMAT_VERSION:
        raise CorruptSnapshot(f"record format version {rec.get('v')}")
    toks = rec.get("tok")
    if not isinstance(toks, bytes) or len(toks) != 4 * rec.get("n", -1):
        raise CorruptSnapshot("token list does not match the token count")
    snap = snapshot_from(rec)
    out, covered = [], 0
    for e in snap.extents:
        if e.segment not in segs:
            raise CorruptSnapshot(f"segment {e.segment.hex()} is missing from the index")
        seg = decode_segment(segs[e.segment])
        if seg.fingerprint != snap.fingerprint:
            raise CorruptSnapshot(f"segment {e.segment.hex()} belongs to another model")
        if e.rows > seg.rows:
            raise CorruptSnapshot(f"extent of {e.rows} rows in a {seg.rows}-row segment")
        if seg.start is not None and seg.start != covered:
            raise CorruptSnapshot(f"segment {e.segment.hex()} holds tokens from {seg.start}, not {covered}")
        covered += e.rows
        out.append((e.segment.hex(), seg.size, seg.header_sum))
    if snap.extents and covered != snap.n_tokens:
        raise CorruptSnapshot(f"segments cover {covered} of {snap.n_tokens} tokens")
    if snap.state:
        out.append((snap.state.blob.hex(), snap.state.size, snap.state.header_sum))
    return out


def _check_blob(blobs, blob_id, size, hs):
    """``None`` if the blob reads back whole and matching, else the reason."""
    try:
        with blobs.open(blob_id, size, hs) as r:
            r.verify()
        return None
    except FileNotFoundError:
        return "blob file is missing"
    except (CorruptSnapshot, OSError) as exc:
        return str(exc)


def verify(store, wanted=None, fix=False, progress=None):
    """``[Problem]`` of the store's records and blobs (only keys in ``wanted``, bytes, if given)."""
    problems, checked, bad_keys = [], {}, []
    with store.index.read() as r:
        items = list(r.snapshots())
        segs = dict(r.segments())
    for kb, raw in items:
        if wanted is not None and kb not in wanted:
            continue
        if progress:
            progress(1)
        try:
            blob_list = record_blobs(unpack(raw), segs)
        except (CorruptSnapshot, KeyError, TypeError, ValueError) as exc:
            problems.append(Problem("record", kb.hex(), None, str(exc)))
            bad_keys.append(kb)
            continue
        for blob_id, size, hs in blob_list:
            if blob_id not in checked:
                checked[blob_id] = _check_blob(store.blobs, blob_id, size, hs)
            if checked[blob_id] is not None:
                problems.append(Problem("blob", kb.hex(), blob_id, checked[blob_id]))
                bad_keys.append(kb)
    scanned = dict(items)
    if problems:
        # deleted by another process since the scan: not a fault
        with store.index.read() as r:
            live = {p.key for p in problems if r.snapshot(bytes.fromhex(p.key)) == scanned[bytes.fromhex(p.key)]}
        problems = [p for p in problems if p.key in live]
        bad_keys = [k for k in bad_keys if k.hex() in live]
        checked = {b: why for b, why in checked.items() if why is None or any(p.blob == b for p in problems)}
    if fix:
        from ..quarantine import retire

        # each bad blob with every snapshot reading it, its segment record first (no new user can share it)
        for blob_id, reason in checked.items():
            if reason is not None:
                retire(store, blob_id, reason)
        for kb in dict.fromkeys(bad_keys):
            store.remove(kb, expect=scanned.get(kb))
    return problems
