"""gc: housekeeping of a local store folder, with a grace period.

Removes temp files and blob files no record references once they are older
than the grace period (a put in flight writes its blob before indexing
it), records whose blobs are missing or of the wrong size (a corrupt one is
quarantined), segment records no snapshot uses and access records of
deleted snapshots, and clears the reader slots of dead processes. Every
deletion is re-checked against what the scan saw, so gc next to live
writers never removes what another process just stored. Never on the
request path.
"""

import stat
import time
from collections import Counter
from itertools import repeat

import xxhash

from ..blobs import SUFFIX, is_blob_id
from ..errors import CorruptSnapshot
from ..records import segment_size, snapshot_summary
from ..reports import Problem


def _scan(store):
    """What one index view saw, read as it streams by (a store's records are not all held
    at once): ``(digests, segs, accs, users, wanted)``.

    ``digests``: ``{snapshot key: xxh3-128 of its record}`` (a later re-check compares
    the record against it); ``segs``: ``{segment id: raw segment record}``; ``accs``:
    access keys; ``users``: how many snapshots read each segment; ``wanted``: ``{blob
    id: (a snapshot key reading it, size or None)}`` of every blob a well-formed record
    references. A damaged record references nothing.
    """
    digests, states = {}, {}
    read, readers = [], []  # every (segment, snapshot) pair, in two flat lists
    with store.index.read() as r:
        for kb, raw in r.snapshots():
            digests[kb] = xxhash.xxh3_128_intdigest(raw)
            try:
                _fp, _tier, _n, extents, state, _trim, _created = snapshot_summary(raw)
            except CorruptSnapshot:
                continue
            segments = [seg for seg, _rows in extents]
            read += segments
            readers += repeat(kb, len(segments))
            if state is not None:
                states[state.blob.hex()] = (kb, state.size)
        segs = dict(r.segments())
        accs = list(r.access_keys())
    wanted = {sid.hex(): (kb, _size(segs.get(sid))) for sid, kb in dict(zip(read, readers)).items()}
    wanted.update(states)
    return digests, segs, accs, Counter(read), wanted


def _size(raw):
    """A segment record's size, ``None`` if the record is missing or damaged."""
    if raw is None:
        return None
    try:
        return segment_size(raw)[0]
    except CorruptSnapshot:
        return None


def _temp_files(store, now, grace, dry_run, found):
    from .archive import orphaned_temps

    dead = set(orphaned_temps(store))  # an import's, whose process is gone: no grace needed
    for name, st in store.blobs.temp_files():
        if now - st.st_mtime >= grace or name in dead:
            found.append(Problem("temp", None, None, f"temp file {name}"))
            if not dry_run:
                store.blobs.remove_temp(name)


def _blob_files(store, wanted, now, grace, dry_run, found):
    """Orphaned files under blobs/; return ``{blob id: size}`` of the blob files present."""
    on_disk = {}
    for sub, name, st in store.blobs.listing():
        if name is None:
            found.append(Problem("orphan", None, None, f"blobs/{sub} is not a folder"))
            continue
        blob_id = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else None
        if blob_id and is_blob_id(blob_id) and blob_id[:2] == sub and stat.S_ISREG(st.st_mode):
            on_disk[blob_id] = st.st_size
            if blob_id in wanted or now - st.st_mtime < grace:
                continue
        elif now - st.st_mtime < grace:
            continue
        found.append(Problem("orphan", None, blob_id, f"unreferenced file blobs/{sub}/{name}"))
        if not dry_run:
            store.blobs.remove_file(sub, name)
    return on_disk


def gc(store, grace=3600.0, dry_run=False):
    """``[Problem]`` for what was (or, with ``dry_run``, would be) cleaned."""
    found, now = [], time.time()
    store.index.clear_stale_readers()
    _temp_files(store, now, grace, dry_run, found)
    digests, segs, accs, users, wanted = _scan(store)
    on_disk = _blob_files(store, wanted, now, grace, dry_run, found)
    bad = []
    for blob_id, (kb, size) in wanted.items():
        if blob_id not in on_disk:
            bad.append(Problem("missing", kb.hex(), blob_id, "blob file is missing"))
        elif size is not None and on_disk[blob_id] != size:
            bad.append(Problem("corrupt", kb.hex(), blob_id, f"blob is {on_disk[blob_id]} bytes, index says {size}"))
    broken = {}
    if bad:
        # a snapshot deleted (or deleted and stored again) by another
        # process since the scan took its blobs with it: not a fault
        with store.index.read() as r:
            for kb in {bytes.fromhex(p.key) for p in bad}:
                raw = r.snapshot(kb)
                if raw is not None and xxhash.xxh3_128_intdigest(raw) == digests[kb]:
                    broken[kb] = raw
        bad = [p for p in bad if bytes.fromhex(p.key) in broken]
        found.extend(bad)
        if not dry_run:
            from ..quarantine import retire

            # each blob with every snapshot reading it, its segment record first (no new user can share it)
            for blob_id, reason in {p.blob: p.reason for p in bad}.items():
                retire(store, blob_id, reason)
    stale_segs = [s for s in segs if users[s] == 0]
    stale_acc = [k for k in accs if k not in digests]
    for s in stale_segs:
        found.append(Problem("segment", None, s.hex(), "segment record no snapshot uses"))
    if not dry_run:
        for kb, raw in broken.items():
            store.remove(kb, expect=raw)
        _drop_stale(store, segs, stale_segs, stale_acc)
    return found


def _drop_stale(store, segs, stale_segs, stale_acc):
    """Delete stale segment and access records still as scanned, then the segments' blobs."""
    if not stale_segs and not stale_acc:
        return

    def tx(w):
        dropped = []
        for s in stale_segs:
            # a put that claimed the segment since the scan changed its record
            if w.segment(s) == segs[s]:
                w.delete_segment(s)
                dropped.append(s.hex())
        for k in stale_acc:
            if w.snapshot(k) is None:
                w.delete_access(k)
        return dropped

    for blob_id in store.index.write(tx):
        store.blobs.unlink(blob_id)
