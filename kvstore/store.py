"""SnapshotStore: durable, exact, shared prompt-cache snapshots.

A snapshot is the prompt cache of one token sequence for one model
fingerprint. Its positional KV (KVCache, QuantizedKVCache,
ConcatenateKVCache layers) lives in shared segment blobs: a snapshot
references a prefix of an earlier snapshot's segments for the tokens they
share and writes a new segment only for the rest, so ten conversations over
one system prompt store that prompt once. Segments are reference counted and
removed with the last snapshot that uses them. Non-positional state
(recurrent state, rotating windows) goes into one blob owned by the snapshot.

This module owns the store's rules for writing, finding, loading and
deleting snapshots and its fail-open accounting; where bytes live is the
backend's (``kvstore.backends``), which candidate is safe is
``kvstore.matching``'s, the restore path ``kvstore.loader``'s, and
housekeeping ``kvstore.maintenance``'s. Write order: blobs, then one short
index transaction. Store faults never raise out of ``put`` or ``fetch``:
they return ``None`` / a miss, logged and counted.
"""

import dataclasses
import logging
import threading
import time
from collections import Counter

from . import budget, listing
from .access import AccessLog
from .backends.local import LocalFolder
from .errors import CorruptSnapshot, InvalidInput, KVStoreError, StoreUnavailable
from .keys import ChainCache, as_tokens, namespace
from .loader import load
from .maintenance.deleting import DELETE_MAX, remove_run, unlink_all
from .maintenance.policy import PrunePolicy
from .quarantine import Repairs
from .matching import DecodedRecords, DedupBase, dedup_base, plan_fetch
from .records import FORMAT_VERSION, TIERS, Extent, Model, Segment, Snapshot, decode_model, decode_snapshot, unpack
from .reports import Match, Problem, RemoteMatch, SnapshotInfo
from .transactions import SegmentGone, add_snapshot, check_layout, remove_snapshot

log = logging.getLogger("kvstore")

__all__ = ["FORMAT_VERSION", "Match", "Problem", "SnapshotInfo", "SnapshotStore", "TIERS"]

# seconds a snapshot that failed to load is skipped by this process
BAD_TTL = 60.0
# seconds a put waits for the checks of snapshots that failed to load (it runs off the request's way)
REPAIR_WAIT = 30.0
# loading faults: anything a damaged record or blob can make the restore path raise
LOAD_FAULTS = (CorruptSnapshot, OSError, KeyError, TypeError, ValueError, IndexError, AttributeError,
               OverflowError, MemoryError, RuntimeError)


class SnapshotStore:
    """A place of snapshots shared by any number of processes.

    Args:
        path: the store directory (created 0700 if missing), or a backend
            object (``kvstore.backends.base.Backend``: an index and blobs
            elsewhere), in which case the folder options below do not apply.
        map_size: LMDB map size in bytes, fixed when the store is created.
        block_tokens: token block size of the key chain, fixed at creation.
        max_bytes: optional disk budget in bytes, or ``"auto"`` (half the free
            disk space, at most 50 GB: ``kvstore.budget``); ``put`` evicts a
            bounded number of lower-tier, least recently used snapshots to stay
            under it (system snapshots only when nothing else is left).
        readonly: open without creating or writing anything.
        fsync: fsync blobs and folders (leave on outside tests and benchmarks).
        access_flush: seconds between batched writes of access times and hits.
        repair: check each snapshot that fails to load and quarantine a damaged
            blob with every snapshot reading it (``kvstore.quarantine``); False
            leaves the store as found (a read-only store never repairs).

    A folder that exists but cannot be written is opened read-only (logged once).
    """

    def __init__(self, path, *, map_size=None, block_tokens=None, max_bytes=None,
                 readonly=False, fsync=True, access_flush=5.0, repair=True):
        if hasattr(path, "index") and hasattr(path, "blobs"):
            self.backend = path
        else:
            self.backend = LocalFolder(path, map_size=map_size, block_tokens=block_tokens, readonly=readonly,
                                       fsync=fsync)
        b = self.backend
        self.path, self.block, self.map_size = b.path, b.block, getattr(b, "map_size", None)
        self.index, self.blobs, self.file_digests = b.index, b.blobs, getattr(b, "file_digests", None)
        self.readonly, self.fsync = b.readonly, fsync
        self.max_bytes = None if self.readonly else budget.resolve(max_bytes, self.path, self.total_bytes)
        # this process's counters; written by the caller's and writer threads
        self.counters = Counter()
        self._count_lock = threading.Lock()
        self._bad = {}
        self._chains = ChainCache()
        self._decoded = DecodedRecords()
        self.remote = None  # a kvstore.remote.RemoteTier (see kvstore.remote.attach)
        self.access = AccessLog(self.index, access_flush, self._fault)
        # snapshots that fail to load are checked (and quarantined) off the request's way
        self.repairs = None if self.readonly or not repair else Repairs(self)

    def chain(self, fp, toks, tenant=None):
        """The ``TokenChain`` of ``toks`` (an int32 array) in ``fp``'s namespace, reusing
        the links of a recent request that shares its leading blocks."""
        return self._chains.chain(namespace(fp, tenant), toks, self.block)

    @staticmethod
    def is_store(path):
        """True if ``path`` is a store folder (without opening it)."""
        return LocalFolder.is_store(path)

    def close(self):
        """Flush pending access updates and release the index and folders."""
        if self.repairs is not None:
            self.repairs.close()
        self.access.close()
        if self.remote is not None:
            self.remote.close()
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------- accounting
    def _count(self, name, n=1):
        with self._count_lock:
            self.counters[name] += n

    def _fault(self, what, exc, key=None):
        reason = f"{type(exc).__name__}: {exc}"
        self._count("faults")
        self._count(f"faults.{what}")
        log.warning("kvstore %s failed%s: %s", what, f" for {key}" if key else "", reason)
        return reason

    def retry_failed(self):
        """Forget which snapshots failed to load lately (each is skipped for
        ``BAD_TTL`` seconds after a failure, so a damaged one costs one try)."""
        self._bad.clear()

    def flush_access(self):
        """Write batched access times and hit counts in one small transaction."""
        self.access.flush()

    def _unlink(self, blob_ids):
        unlink_all(self.blobs, blob_ids)

    # -------------------------------------------------------------------- put
    def put(self, fp, tokens, cache, tier="system", *, tenant=None):
        """Store ``cache`` (prefilled with exactly ``tokens``) and return its key.

        Returns the hex key, or ``None`` when the store could not take it
        (disk or map full, I/O error): the fault is logged and counted, and
        nothing already stored is touched. Raises ``InvalidInput`` /
        ``UnsupportedCache`` for arguments that can never be stored.
        """
        if tier not in TIERS:
            raise InvalidInput(f"tier must be one of {TIERS}, got {tier!r}")
        if self.readonly:
            raise StoreUnavailable("the store is open read-only")
        toks = as_tokens(tokens, getattr(fp, "vocab_size", None))
        if len(toks) == 0:
            raise InvalidInput("cannot store an empty prompt")
        from . import codec

        enc = codec.encode(cache, len(toks))
        sig = codec.signature(enc.layout, enc.positional, enc.state)
        try:
            chain = self.chain(fp, toks, tenant)
            return self._put(fp, chain, enc, sig, tier, tenant is not None, dedup=True)
        except InvalidInput:
            raise
        except (KVStoreError, OSError) as exc:
            self._fault("put", exc)
            self._count("put_failures")
            return None

    def _put(self, fp, chain, enc, sig, tier, tenanted, dedup):
        from . import codec

        n, toks, key = len(chain), chain.tokens, chain.key(len(chain))
        sid, struct = codec.sig_id(sig), codec.structure(sig)
        if self._bad and self.repairs is not None:
            # a snapshot failed to load lately: let its check finish, so a damaged one is
            # replaced by this put rather than found "already stored" or shared from
            self.repairs.wait(REPAIR_WAIT)
        with self.index.read() as r:
            if _holds(r.snapshot(key), toks):
                self._count("put_existing")
                self.access.touch(key, hit=False)  # a put is no hit: HITS counts loads served
                return key.hex()
            known = r.model(str(fp))
            if known is not None:
                check_layout(fp, decode_model(known), struct, sid)
            base = dedup_base(r, chain, n, fp, sid) if enc.positional and dedup else DedupBase()
        written = []
        try:
            snap, new_segment = self._write_blobs(fp, chain, enc, sid, tier, tenanted, base, written)
            model = Model(getattr(fp, "name", "") or "", getattr(fp, "model_type", "") or "",
                          getattr(fp, "vocab_size", None), getattr(fp, "path", "") or "", struct, {sid: sig},
                          time.time())
            try:
                outcome, cleanup = self.index.write(lambda w: add_snapshot(w, key, snap, new_segment, model))
            except SegmentGone:
                # a shared segment vanished under us: store the prefix ourselves
                self._unlink(written)
                written = []
                self._count("put_dedup_races")
                return self._put(fp, chain, enc, sig, tier, tenanted, dedup=False)
            self._unlink(cleanup)
            if outcome == "exists":
                self._unlink(written)
                self._count("put_existing")
                return key.hex()
        except BaseException:
            self._unlink(written)
            raise
        self._count("puts")
        if self.remote is not None:
            self.remote.queued_push(self, key, tier)
        self._count("put_tokens_shared", base.tokens)
        self._count("bytes_written", snap.own_bytes)
        if self.max_bytes is not None:
            budget.after_put(self)
        return key.hex()

    def _write_blobs(self, fp, chain, enc, sid, tier, tenanted, base, written):
        """Write the new segment (rows past ``base``) and the state blob; return the record to index."""
        n, shared, now = len(chain), base.tokens, time.time()
        new_segment = state = None
        if enc.positional and shared < n:
            tensors = {name: (d, a[:, :, shared:n, :], 2) for name, (d, a) in enc.positional.items()}
            ref = self.blobs.write(tensors, {"kvstore.kind": "segment", "kvstore.fp": fp})
            written.append(ref.blob.hex())
            new_segment = (ref.blob, Segment(str(fp), n - shared, shared, ref.size, ref.header_sum, 1, now))
        if enc.state:
            state = self.blobs.write({name: (d, a, None) for name, (d, a) in enc.state.items()},
                                     {"kvstore.kind": "state", "kvstore.fp": fp})
            written.append(state.blob.hex())
        extents = list(base.extents) + ([Extent(new_segment[0], n - shared)] if new_segment else [])
        own = (new_segment[1].size if new_segment else 0) + (state.size if state else 0)
        snap = Snapshot(
            str(fp), tier, n, chain.tokens.tobytes(), enc.layout, sid, extents, state, enc.trimmable, own, now,
            tenanted,
            # the chain links it is indexed under (delete needs them; they cannot be rebuilt without the tenant)
            b"".join(chain.links[1 : n // self.block + 1]), chain.links[n // self.block],
        )
        return snap, new_segment

    # ------------------------------------------------------------------ fetch
    def fetch_nearest(self, fp, tokens, *, tenant=None):
        """Return ``(cache, rest)``: the best safe snapshot for ``tokens``.

        The best of: the exact entry (served one token short if trimmable),
        the longest stored prefix, and (only for fully trimmable snapshots)
        the shared prefix of a longer entry, loading only that prefix's bytes.
        ``rest`` is never empty; on a miss the result is ``(None, tokens)``.
        The returned cache is a fresh object no other caller shares. Faults
        (corrupt, missing or foreign blobs, I/O errors) are misses, logged
        and counted; invalid tokens raise ``InvalidInput``.
        """
        cache, rest, _ = self.fetch(fp, tokens, tenant=tenant)
        return cache, rest

    def fetch(self, fp, tokens, *, tenant=None, min_tokens=0, record=True):
        """``fetch_nearest`` that also returns the ``Match`` it used (or ``None``).

        Matches serving ``min_tokens`` tokens or fewer are not looked at: a
        caller that already holds that much in memory pays no disk I/O.
        ``record=False`` counts no hit or miss and no access (a second load
        of a snapshot just served, for another tier).
        """
        toks = as_tokens(tokens, getattr(fp, "vocab_size", None))
        rest = (lambda n: tokens[n:]) if isinstance(tokens, list) else (lambda n: toks[n:].tolist())
        if len(toks) < 2:
            self._count("misses", int(record))
            return None, rest(0), None
        try:
            chain = self.chain(fp, toks, tenant)
            plans = self._plans(fp, chain, min_tokens)
            got = None
            if self.remote is not None and record:  # the remote serves what is longer than our best match
                got = self.remote.fetch(self, fp, chain, max([min_tokens] + [p.tokens for p in plans]))
            for plan, cache in [(got[1], got[0])] if got else [(p, None) for p in plans]:
                source = "disk" if cache is None else "remote"
                cache = cache if cache is not None else self._load(fp, chain, plan)
                if cache is not None:
                    if record:
                        self._count("hits")
                        self._count("tokens_reused", plan.tokens)
                        if source == "disk":
                            self.access.touch(plan.key)
                    made = Match if source == "disk" else RemoteMatch
                    return cache, rest(plan.tokens), made(plan.key.hex(), plan.tokens, plan.kind, plan.record.tier)
        except InvalidInput:
            raise
        except (KVStoreError, OSError) as exc:
            self._fault("fetch", exc)
        self._count("misses", int(record))
        return None, rest(0), None

    def lookup(self, fp, tokens, *, tenant=None):
        """The ``Match`` ``fetch_nearest`` would try first, without loading blobs (or ``None``)."""
        toks = as_tokens(tokens, getattr(fp, "vocab_size", None))
        if len(toks) < 2:
            return None
        for plan in self._plans(fp, self.chain(fp, toks, tenant)):
            return Match(plan.key.hex(), plan.tokens, plan.kind, plan.record.tier)
        return None

    def _plans(self, fp, chain, min_tokens=0):
        """Candidate ``Plan``\\ s serving more than ``min_tokens`` tokens, best first;
        damaged records are counted and skipped for a while."""
        now = time.monotonic()
        with self.index.read() as r:
            found = plan_fetch(r, chain, fp, skip=lambda key: now - self._bad.get(key, -1e9) < BAD_TTL,
                               min_tokens=min_tokens, decoded=self._decoded)
        for key, exc in found.corrupt:
            self._fault("fetch", exc, key.hex())
            self._failed(key)
        return found.plans

    def _failed(self, key):
        """Skip ``key`` for a while; have it checked and, if damaged, quarantined."""
        self._bad[key] = time.monotonic()
        if self.repairs is not None:
            self.repairs.submit(key)

    def _load(self, fp, chain, plan):
        try:
            cache, nread = load(self.index, self.blobs, plan, fp, chain.tokens)
        except LOAD_FAULTS as exc:
            # RuntimeError: MLX refusing what a damaged record asks of it
            self._count("misses.corrupt")
            self._fault("load", exc if isinstance(exc, KVStoreError) else CorruptSnapshot(repr(exc)), plan.key.hex())
            self._failed(plan.key)
            return None
        self._count("bytes_read", nread)
        return cache

    # -------------------------------------------------------- listing, delete
    def tokens_of(self, key):
        """The token ids of one snapshot (``InvalidInput`` if there is none,
        ``CorruptSnapshot`` if its record is damaged)."""
        kb = _key_bytes(key)
        with self.index.read() as r:
            raw = r.snapshot(kb)
        if raw is None:
            raise InvalidInput(f"no snapshot {key}")
        return decode_snapshot(raw).token_ids().tolist()

    def resolve(self, prefix):
        """Full key for a unique key prefix (as ``ls`` prints short keys)."""
        prefix = prefix.lower()
        if not prefix or any(c not in "0123456789abcdef" for c in prefix):
            raise InvalidInput(f"not a snapshot key: {prefix!r}")
        found = []
        with self.index.read() as r:
            for k in r.snapshot_keys_from(bytes.fromhex(prefix + "0" * (len(prefix) % 2))):
                if not k.hex().startswith(prefix):
                    break
                found.append(k.hex())
                if len(found) > 1:
                    break
        if not found and len(prefix) == 32:
            raise InvalidInput(f"no snapshot {prefix}")
        if len(found) != 1:
            raise InvalidInput(f"key prefix {prefix!r} matches {'no' if not found else 'several'} snapshots")
        return found[0]

    def models(self):
        """``{fingerprint: {"name", "type", "vocab", "path"}}`` of every model the store has seen."""
        return listing.models(self.index)

    def entries(self, *, fingerprint=None, tier=None):
        """Every snapshot as a ``SnapshotInfo`` (index only, no blob I/O)."""
        self.flush_access()
        return listing.entries(self.index, fingerprint, tier)

    def delete(self, key):
        """Delete one snapshot; return the bytes freed on disk (0 if it was not there).

        Shared segments are freed only when no other snapshot uses them.
        """
        return self.remove(_key_bytes(key)) or 0

    def remove(self, kb, expect=None):
        """Delete the snapshot ``kb`` (bytes) in one transaction, then its unused blobs.

        With ``expect`` (the raw record as a scan saw it) only that record: one
        another process deleted and stored again since is left alone. Returns
        the bytes freed, or ``None`` if there was nothing (of that) to delete.
        """

        def tx(w):
            raw = w.snapshot(kb)
            if raw is None or (expect is not None and raw != expect):
                return None
            return remove_snapshot(w, kb, raw)

        got = self.index.write(tx)
        if got is None:
            return None
        doomed, freed = got
        self._unlink(doomed)
        self._bad.pop(kb, None)
        self._count("deletes")
        return freed

    # ------------------------------------------------------- stats, policies
    def stats(self):
        """Totals by model and tier, disk and map use, and this process's counters."""
        out = listing.totals(self.entries(), self.index)
        out.update(path=str(self.path), block_tokens=self.block, counters=dict(self.counters))
        return out

    def total_bytes(self):
        """Bytes of every blob the index references (shared segments once)."""
        with self.index.read() as r:
            return r.counter("bytes")

    def plan_prune(self, policy=None, **kwargs):
        """Snapshots ``prune`` would delete, in deletion order.

        ``policy`` is a ``PrunePolicy`` (or give its fields as keywords:
        ``max_bytes``, ``older_than``, ``tier``, ``fingerprint``, ``model``,
        ``keep_last``). Lower tiers go first (assistant, user, system) and,
        within a tier, the least recently used; ``keep_last`` spares the N
        most recently used of each model; ``max_bytes`` deletes only until
        the store fits.
        """
        policy = policy or PrunePolicy.of(**kwargs)
        return [e for e, _ in policy.plan(self.entries(), self.total_bytes())]

    def prune(self, policy=None, *, on_delete=None, limit=None, **kwargs):
        """Delete what ``plan_prune`` selects; return ``(count, bytes freed)``.

        With ``max_bytes`` the real total is checked before each delete, since
        a snapshot whose segments others share frees less than its size.
        Only snapshots this call deleted are counted (not those another
        process deleted first); ``on_delete(info)`` is called for each;
        ``limit`` caps how many are deleted.
        """
        policy = policy or PrunePolicy.of(**kwargs)
        entries = self.entries()
        plan = [e for e, _ in dataclasses.replace(policy, max_bytes=None).plan(entries, 0)]
        return self.delete_planned(plan[:limit], max_bytes=policy.max_bytes, on_delete=on_delete)

    def delete_planned(self, plan, *, max_bytes=None, on_delete=None):
        """Delete ``plan`` (``SnapshotInfo``\\ s) in order, stopping once the
        store holds at most ``max_bytes``; return ``(count, bytes freed)``.

        Snapshots are deleted in runs of one transaction each (one commit, one
        fsync; sized as ``maintenance.deleting`` says), their unused blobs
        removed after each commit.
        """
        count = freed = i = 0
        keys = [bytes.fromhex(e.key) for e in plan]
        while i < len(plan):
            batch = plan[i : i + DELETE_MAX]
            done, stop = self._remove_batch(keys[i : i + DELETE_MAX], max_bytes)
            i += len(done)
            for e, got in zip(batch, done):
                if got is None:
                    continue
                freed += got
                count += 1
                if on_delete is not None:
                    on_delete(e)
            if stop:
                break
        if count:
            # LMDB reuses the pages a transaction freed only from the second
            # commit after it: one small commit now lets the next put use them
            self.index.write(lambda w: w.add_counter("prunes", 1))
        return count, freed

    def _remove_batch(self, kbs, max_bytes=None):
        """Delete a leading run of ``kbs`` in one transaction (``deleting.remove_run``);
        return ``([bytes freed or None per key handled], stopped early)``."""
        out, doomed, stop = self.index.write(lambda w: remove_run(w, kbs, max_bytes))
        self._unlink(doomed)
        for kb, got in zip(kbs, out):
            if got is not None:
                self._bad.pop(kb, None)
                self._count("deletes")
        return out, stop

    # ------------------------------------------------------------ maintenance
    def verify(self, keys=None, fix=False, progress=None):
        """Check every record and blob (or those of ``keys``); return ``[Problem]``.

        Reads each blob whole and checks header, size and every checksum.
        With ``fix=True`` bad blobs are moved to ``quarantine/`` and the
        snapshots that use them are deleted. ``progress(1)`` is called per
        snapshot checked. A snapshot another process deletes meanwhile is
        not a problem.
        """
        from .maintenance.verify import verify

        return verify(self, None if keys is None else {_key_bytes(k) for k in keys}, fix, progress)

    def gc(self, grace=3600.0, dry_run=False):
        """Housekeeping; return ``[Problem]`` for what was (or would be) cleaned.

        Removes temp files and unreferenced blob files older than ``grace``
        seconds (a put in flight writes its blob before indexing it), records
        whose blobs are missing or the wrong size, segment records no
        snapshot uses, access records of deleted snapshots, and clears the
        reader slots of dead processes.
        """
        from .maintenance.gc import gc

        return gc(self, grace, dry_run)

    def export_archive(self, archive, keys=None, progress=None):
        """Write snapshots (all, or ``keys``) with their blobs to a tar archive (mode 0600).

        Blobs are copied as they are (no re-encoding) after a full verify;
        a snapshot whose blobs fail is skipped and reported. Returns
        ``(snapshots written, bytes of blobs, [Problem])``.
        """
        from .maintenance.archive import export_archive

        return export_archive(self, None if keys is None else {_key_bytes(k) for k in keys}, archive, progress)

    def import_archive(self, archive, progress=None):
        """Add the snapshots of an ``export_archive`` tar to this store.

        Every blob is verified (size, header, every checksum, read in
        chunks) before it is indexed; snapshots already present are skipped;
        a model whose layout differs from the one this store knows is
        refused. The manifest is decoded one record at a time, each blob
        member is copied only up to its declared size, duplicate and
        undeclared members are refused, an archive whose blobs cannot fit
        on the disk is refused before anything is written, and no temp file
        is left behind. Returns ``(snapshots added, bytes of blobs added,
        [Problem])``; a file that is not a kvstore archive raises ``InvalidInput``.
        """
        from .maintenance.archive import import_archive

        return import_archive(self, archive, progress)

    def compact_index(self, dest="index.compact"):
        """Write a compacted copy of the index to ``STORE/dest/data.mdb``; return its size in bytes.

        Links planted there are refused, never followed; the copy is never
        swapped in under live processes (that step is the caller's, once no
        process uses the store)."""
        return self.backend.compact_index(dest)

    def disk_usage(self):
        """Bytes on disk in each part of the store: ``blobs``, ``tmp``, ``quarantine``, ``index``."""
        return self.backend.disk_usage()

    def index_file_bytes(self):
        """Size of the index file (LMDB's data file) in bytes."""
        return self.backend.index_file_bytes()


def _holds(raw, toks):
    """True if the raw record stores exactly ``toks`` (a damaged record holds nothing)."""
    if raw is None:
        return False
    try:
        return unpack(raw).get("tok") == toks.tobytes()
    except CorruptSnapshot:
        return False


def _key_bytes(key):
    try:
        kb = bytes.fromhex(key) if isinstance(key, str) else bytes(key)
    except ValueError:
        raise InvalidInput(f"not a snapshot key: {key!r}") from None
    if len(kb) != 16:
        raise InvalidInput(f"not a snapshot key: {key!r}")
    return kb
