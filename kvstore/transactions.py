"""The store's write transactions, over any ``IndexWriter``.

Adding a snapshot (its record, the links and end it is found by, one more
reference on each shared segment, its new segment, its model's layouts,
the counters), removing one (and every segment only it used), and merging a
model record. Each function runs inside one short write transaction and
returns what to clean up after the commit: the blob files no record points
at any more. Blob I/O and MLX work never happen here.
"""

import time

from .errors import CorruptSnapshot, InvalidInput
from .records import (Access, Segment, decode_model, decode_segment, encode_access, encode_model,
                      encode_segment, encode_snapshot, snapshot_from, unpack)

# distinct exact layouts one model may have (e.g. plain and quantised KV)
MAX_LAYOUTS = 8


class SegmentGone(Exception):
    """A segment a new snapshot meant to share was deleted meanwhile: store the prefix instead."""


def check_layout(fingerprint, model, struct, layout_id):
    """Refuse a cache whose layout cannot belong to the model ``fingerprint`` names."""
    if model.struct != struct:
        raise InvalidInput(f"this cache's layout differs from the one stored for {fingerprint}: "
                           "the fingerprint does not match the model or cache options")
    if layout_id not in model.sigs and len(model.sigs) >= MAX_LAYOUTS:
        raise InvalidInput(f"{fingerprint} already has {MAX_LAYOUTS} cache layouts")


def merge_model(w, fingerprint, model):
    """Add a model record, or its new exact layouts to the known one."""
    raw = w.model(fingerprint)
    if raw is None:
        w.put_model(fingerprint, encode_model(model))
        return
    known = decode_model(raw)
    if known.struct != model.struct:
        raise InvalidInput(f"this store holds another layout for {fingerprint}")
    new = {k: v for k, v in model.sigs.items() if k not in known.sigs}
    if new:
        if len(known.sigs) + len(new) > MAX_LAYOUTS:
            raise InvalidInput(f"{fingerprint} already has {MAX_LAYOUTS} cache layouts")
        known.sigs = {**known.sigs, **new}
        w.put_model(fingerprint, encode_model(known))


def index_snapshot(w, key, snap, raw=None):
    """Add the record, its access record, its links and its end; count it."""
    w.put_snapshot(key, raw if raw is not None else encode_snapshot(snap))
    w.put_access(key, encode_access(Access(time.time(), 0)))
    for link in snap.link_list():
        w.add_link(link, key)
    w.add_end(snap.end_link, snap.n_tokens, key)
    w.add_counter("snapshots", 1)


def adopt_snapshot(w, key, snap, model, segments, raw=None):
    """Index a snapshot copied from elsewhere (an archive, another host) whose
    blobs are already in place. ``segments`` maps each segment id it reads to
    its ``Segment`` record, written where the index has none (else the
    index's record gains a reference). Returns the bytes new to the store, or
    ``None`` if ``key`` is already indexed.
    """
    if w.snapshot(key) is not None:
        return None
    merge_model(w, snap.fingerprint, model)
    new_bytes = 0
    for sid, seg in segments.items():
        cur = w.segment(sid)
        if cur is None:
            seg.created = time.time()
            w.put_segment(sid, encode_segment(seg))
            new_bytes += seg.size
        else:
            known = decode_segment(cur)
            known.refs += 1
            w.put_segment(sid, encode_segment(known))
    if snap.state:
        new_bytes += snap.state.size
    index_snapshot(w, key, snap, raw=raw)
    w.add_counter("bytes", new_bytes)
    return new_bytes


def add_snapshot(w, key, snap, new_segment, model):
    """Commit a snapshot whose blobs are written.

    ``new_segment`` is ``(segment id, Segment)`` for the rows it wrote
    itself, or ``None``. Every shared extent gains a reference; a shared
    segment gone since it was planned raises ``SegmentGone`` (nothing is
    written). Returns ``(outcome, blobs to unlink)``: ``"exists"`` when the
    same tokens were stored meanwhile (the caller's new blobs are then
    unused), else ``"ok"``.
    """
    cleanup = []
    old = w.snapshot(key)
    if old is not None:
        try:
            if unpack(old).get("tok") == snap.tokens:
                return "exists", cleanup
        except CorruptSnapshot:
            pass
        cleanup += remove_snapshot(w, key, old)[0]
    new_id = new_segment[0] if new_segment else None
    for e in snap.extents:
        if e.segment == new_id:
            continue
        raw = w.segment(e.segment)
        try:
            seg = decode_segment(raw) if raw is not None else None
        except CorruptSnapshot:
            seg = None
        if seg is None:
            raise SegmentGone(e.segment)
        seg.refs += 1
        w.put_segment(e.segment, encode_segment(seg))
    if new_segment is not None:
        w.put_segment(new_id, encode_segment(new_segment[1]))
    index_snapshot(w, key, snap)
    merge_model(w, snap.fingerprint, model)
    w.add_counter("bytes", snap.own_bytes)
    return "ok", cleanup


def remove_snapshot(w, key, raw):
    """Remove a snapshot and its index entries; return ``(blob ids to unlink, bytes freed)``.

    A malformed record is removed alone (gc later drops segments no record
    uses); a segment is freed with the last snapshot referencing it.
    """
    removal = Removal(w)
    got = removal.remove(key, raw)
    removal.finish()
    return got


class Removal:
    """Snapshots removed in one write transaction (``remove`` each, then ``finish``).

    Links, ends and records go at once; a segment's reference count is read
    the first time one of them drops a reference and written once, by
    ``finish``, with the counters: a run of deletions that shares a system
    prompt's segments reads and rewrites each of them once, not once per
    snapshot. ``freed`` is what the removals so far free, the store's
    ``bytes`` counter less that until ``finish``.
    """

    def __init__(self, w):
        self.w = w
        self.freed = self.count = 0
        self._segments = {}  # segment id -> [its Segment, references dropped], in first-drop order

    def remove(self, key, raw):
        """Remove one snapshot (``raw``: its record); return ``(blob ids to unlink, bytes freed)``.
        A segment is freed by the removal that drops its last reference."""
        w = self.w
        try:
            snap = snapshot_from(unpack(raw))
        except CorruptSnapshot:
            snap = None
        doomed, freed = [], 0
        for e in snap.extents if snap else ():
            held = self._segments.get(e.segment)
            if held is None:
                sraw = w.segment(e.segment)
                if sraw is None:
                    continue
                try:
                    seg = decode_segment(sraw)
                except CorruptSnapshot:
                    seg = Segment("", 1, None, 0, 0, 1)
                seg.refs = max(seg.refs, 1)  # this snapshot reads it: at least its reference
                held = self._segments[e.segment] = [seg, 0]
            seg = held[0]
            if held[1] >= seg.refs:
                continue  # freed by an earlier removal of this transaction
            held[1] += 1
            if held[1] >= seg.refs:
                doomed.append(e.segment.hex())
                freed += seg.size
        if snap is not None:
            if snap.state:
                doomed.append(snap.state.blob.hex())
                freed += snap.state.size
            for link in snap.link_list():
                w.remove_link(link, key)
            w.remove_end(snap.end_link, snap.n_tokens, key)
        w.delete_snapshot(key)
        w.delete_access(key)
        self.freed += freed
        self.count += 1
        return doomed, freed

    def finish(self):
        """Write the segments' new reference counts (deleting the freed ones) and the counters."""
        w = self.w
        for seg_id, (seg, dropped) in self._segments.items():
            if dropped >= seg.refs:
                w.delete_segment(seg_id)
            else:
                seg.refs -= dropped
                w.put_segment(seg_id, encode_segment(seg))
        self._segments.clear()
        if self.count:
            w.add_counter("bytes", -self.freed)
            w.add_counter("snapshots", -self.count)
        self.freed = self.count = 0
