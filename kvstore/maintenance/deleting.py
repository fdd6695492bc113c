"""Deleting many snapshots: transactions sized by time, blob files unlinked in parallel.

``SnapshotStore.delete_planned`` (prune, rm and the disk budget) deletes a
plan in runs of one index transaction each, then unlinks the blobs the run
freed. Each commit is an fsync and writes every page the run dirtied (the
link tables' pages are spread over the whole file: on a 100,000-snapshot
store a commit cost about the same for 2,500 deletions as for 10,000), so a
run takes at least ``DELETE_BATCH`` snapshots and then more while the
transaction has lasted under ``DELETE_HOLD`` seconds: a writer in another
process waits at most about that long for LMDB's write lock, and gets it
between runs while this process unlinks. Blobs go only after the commit that
dropped their last reference (a crash in between leaves orphan files, which
gc removes, never a record without its blobs).
"""

import time
from concurrent.futures import ThreadPoolExecutor

from ..transactions import Removal

DELETE_BATCH = 256
DELETE_HOLD = 1.0
DELETE_MAX = 16384
# a run freeing at least UNLINK_PARALLEL blobs unlinks them from UNLINK_THREADS threads: each
# unlink may wait on the file system's journal, and several wait together
UNLINK_PARALLEL = 64
UNLINK_THREADS = 8


def remove_run(w, kbs, max_bytes=None):
    """In the write view ``w``: delete a leading run of ``kbs`` (all of the first
    ``DELETE_BATCH``, then more until ``DELETE_HOLD`` seconds have passed),
    stopping once the store holds at most ``max_bytes``. Returns ``([bytes freed
    or None per key handled], [blob ids to unlink after the commit], stopped)``."""
    out, doomed, stopped = [], [], False
    removal = Removal(w)
    before = w.counter("bytes") if max_bytes is not None else 0
    start = time.monotonic()
    for n, kb in enumerate(kbs):
        if n >= DELETE_BATCH and (n - DELETE_BATCH) % 64 == 0 and time.monotonic() - start > DELETE_HOLD:
            break
        if max_bytes is not None and before - removal.freed <= max_bytes:
            stopped = True
            break
        raw = w.snapshot(kb)
        if raw is None:
            out.append(None)
            continue
        blobs, freed = removal.remove(kb, raw)
        doomed += blobs
        out.append(freed)
    removal.finish()
    return out, doomed, stopped


def unlink_all(blobs, blob_ids):
    """Unlink ``blob_ids`` from ``blobs``, from several threads when there are many."""

    def run(ids):
        for blob_id in ids:
            blobs.unlink(blob_id)

    if len(blob_ids) < UNLINK_PARALLEL:
        return run(blob_ids)
    run(blob_ids[:1])  # opens the blobs folder before the threads share it
    rest = blob_ids[1:]
    with ThreadPoolExecutor(UNLINK_THREADS) as pool:
        list(pool.map(run, [rest[i::UNLINK_THREADS] for i in range(UNLINK_THREADS)]))
