"""Quarantine: a damaged blob, and every snapshot that depends on it, out of service.

A snapshot that fails to load is handed to ``Repairs``: a thread of its
own, off the request's way, checks the snapshot's record and reads each of
its blobs whole (as ``verify`` does). A blob that is damaged (a header,
size or checksum fault) or missing while the index still points at it is
``retire``\\ d: its file moves to ``quarantine/``, its segment record is
deleted in one short transaction, so no new snapshot can share it any more
(a put that planned to gets ``SegmentGone`` and writes the rows itself),
and every snapshot that references it is removed, each only if its record
is still the one the scan saw. The next request then misses, prefills and
writes a good copy. A blob that reads back whole (a transient I/O error) is
left alone: the failed snapshot is only skipped for a while by the store.

``verify --fix`` and ``gc`` retire blobs the same way, so any number of
processes may quarantine, read and write one store at once. This module
never runs on a request's thread and holds no transaction during blob I/O.
"""

import logging
import threading
from collections import deque

from .errors import CorruptSnapshot, KVStoreError
from .records import decode_segment, snapshot_from, unpack
from .reports import Problem

log = logging.getLogger("kvstore")

# snapshots waiting for a check; more are dropped (each costs one full blob read)
MAX_PENDING = 64


def check_blob(blobs, blob_id, size, header_sum):
    """``None`` if the blob reads back whole and matching, else why it is damaged.

    Only damage is reported: a missing file, or a header, size or checksum
    fault. Another ``OSError`` (out of descriptors, a transient read error)
    is raised, since it says nothing about the blob.
    """
    try:
        with blobs.open(blob_id, size, header_sum) as r:
            r.verify()
        return None
    except FileNotFoundError:
        return "blob file is missing"
    except CorruptSnapshot as exc:
        return str(exc)


def _references(raw, blob):
    """True if the raw snapshot record reads ``blob`` (16 bytes): a shared extent or its state."""
    if blob not in raw:  # cheap test first: the id is stored as plain bytes
        return False
    try:
        snap = snapshot_from(unpack(raw))
    except CorruptSnapshot:
        return False
    return any(e.segment == blob for e in snap.extents) or (snap.state is not None and snap.state.blob == blob)


def users(index, blob_id):
    """``[(key, raw record)]`` of every snapshot that reads the blob ``blob_id`` (hex)."""
    blob = bytes.fromhex(blob_id)
    with index.read() as r:
        return [(k, raw) for k, raw in r.snapshots() if _references(raw, blob)]


def retire(store, blob_id, reason):
    """Take the blob ``blob_id`` and every snapshot reading it out of service.

    Moves the file to ``quarantine/`` (if it is there), deletes its segment
    record (taking its bytes off the store's total) so no snapshot can
    share it from now on, then removes the snapshots that still reference
    it. Returns ``[Problem]``: one per snapshot removed.
    """
    if store.blobs.quarantine(blob_id):
        store._count("quarantined")
    seg_id = bytes.fromhex(blob_id)

    def drop_segment(w):
        raw = w.segment(seg_id)
        if raw is None:
            return
        w.delete_segment(seg_id)
        try:
            w.add_counter("bytes", -decode_segment(raw).size)
        except CorruptSnapshot:
            pass

    store.index.write(drop_segment)
    out = []
    for kb, raw in users(store.index, blob_id):
        if store.remove(kb, expect=raw) is not None:
            store._count("repaired_snapshots")
            out.append(Problem("blob", kb.hex(), blob_id, reason))
    return out


def repair(store, kb):
    """Check the snapshot ``kb`` (bytes) whole; retire what is damaged; return ``[Problem]``.

    A record that cannot be read is removed alone; each damaged blob is
    retired with every snapshot that reads it. A snapshot whose record and
    blobs are sound (or that is gone already) is left as it is.
    """
    from .maintenance.verify import record_blobs

    with store.index.read() as r:
        raw = r.snapshot(kb)
        if raw is None:
            return []
        try:
            rec = unpack(raw)
            segs = {e.segment: r.segment(e.segment) for e in snapshot_from(rec).extents}
            blob_list = record_blobs(rec, {s: v for s, v in segs.items() if v is not None})
        except (CorruptSnapshot, KeyError, TypeError, ValueError) as exc:
            blob_list, bad_record = None, str(exc)
    if blob_list is None:
        if store.remove(kb, expect=raw) is None:
            return []
        store._count("repaired_snapshots")
        return [Problem("record", kb.hex(), None, bad_record)]
    out = []
    for blob_id, size, header_sum in blob_list:
        why = check_blob(store.blobs, blob_id, size, header_sum)
        if why is not None:
            out += retire(store, blob_id, why)
    return out


class Repairs:
    """The thread that checks snapshots which failed to load, one at a time.

    ``submit(key)`` never waits and never does I/O; ``wait()`` returns once
    everything submitted has been checked (for tests and shutdown).
    """

    def __init__(self, store):
        self.store = store
        self.pending = deque()
        self.seen = set()
        self.busy = False
        self.closed = False
        self.cv = threading.Condition()
        self.thread = None

    def submit(self, kb):
        """Queue the snapshot ``kb`` (bytes) for a check; False if not queued."""
        with self.cv:
            if self.closed or kb in self.seen or len(self.pending) >= MAX_PENDING:
                return False
            self.seen.add(kb)
            self.pending.append(kb)
            self._start()
            self.cv.notify_all()
            return True

    def _start(self):
        """Start the thread if it is not running (first use, or in a child after fork)."""
        if self.thread is None or not self.thread.is_alive():
            self.busy = False
            self.thread = threading.Thread(target=self._run, name="kvstore-repair", daemon=True)
            self.thread.start()

    def _run(self):
        from .writer import lower_priority

        lower_priority()
        while True:
            with self.cv:
                self.cv.wait_for(lambda: self.pending or self.closed)
                if self.closed:
                    return
                kb = self.pending.popleft()
                self.busy = True
            try:
                self._repair(kb)
            finally:
                with self.cv:
                    self.busy = False
                    self.seen.discard(kb)
                    self.cv.notify_all()

    def _repair(self, kb):
        try:
            problems = repair(self.store, kb)
        except (KVStoreError, OSError) as exc:  # fail open: the snapshot stays skipped a while
            self.store._fault("repair", exc, kb.hex())
            return
        blobs = sorted({p.blob for p in problems if p.blob})
        if blobs:
            log.warning("kvstore: quarantined blob%s %s and removed %d snapshot%s reading %s (%s); "
                        "the next request stores a good copy", "s" if len(blobs) > 1 else "", ", ".join(blobs),
                        len(problems), "" if len(problems) == 1 else "s", "them" if len(blobs) > 1 else "it",
                        problems[0].reason)
        elif problems:
            log.warning("kvstore: removed snapshot %s, its record is damaged (%s)", kb.hex(), problems[0].reason)

    def wait(self, timeout=None):
        """Wait until every submitted snapshot is checked; False on timeout."""
        with self.cv:
            if self.pending and not self.closed:
                self._start()
            return self.cv.wait_for(lambda: not self.pending and not self.busy, timeout)

    def close(self, timeout=10.0):
        with self.cv:
            self.closed = True
            self.pending.clear()
            self.cv.notify_all()
        if self.thread is not None:
            self.thread.join(timeout)
