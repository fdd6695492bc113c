"""SnapshotStore: durable, exact, shared prompt-cache snapshots on disk.

A snapshot is the prompt cache of one token sequence for one model
fingerprint. Its positional KV (KVCache, QuantizedKVCache,
ConcatenateKVCache layers) lives in shared segment blobs: a snapshot
references a prefix of an earlier snapshot's segments for the tokens they
share and writes a new segment only for the rest, so ten conversations over
one system prompt store that prompt once. Segments are reference counted and
removed with the last snapshot that uses them. Non-positional state
(recurrent state, rotating windows) goes into one blob owned by the snapshot.

Write order: blobs (tmp, fsync, rename), then one short LMDB transaction.
Reads verify tokens, sizes, checksums, shapes and dtypes; anything wrong is a
miss with a logged, counted reason. Store faults never raise out of ``put``
or ``fetch_nearest``: they return ``None`` / a miss (fail open).
"""

import atexit
import json
import weakref
import logging
import os
import stat
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import lmdb
import numpy as np

from . import blobs as B
from .errors import CorruptSnapshot, InvalidInput, KVStoreError, StoreUnavailable
from .index import Index, pack, unpack
from .keys import TokenChain, as_tokens, namespace

log = logging.getLogger("kvstore")

FORMAT_VERSION = B.FORMAT_VERSION
TIERS = ("system", "user", "assistant")
# eviction order: lower rank goes first
TIER_RANK = {"assistant": 0, "user": 1, "system": 2}
DEFAULT_BLOCK = 64
DEFAULT_MAP_SIZE = 32 << 30
MAX_CANDIDATES = 16
# distinct exact layouts one model may have (e.g. plain and quantised KV)
MAX_LAYOUTS = 8
# seconds a snapshot that failed to load is skipped by this process
BAD_TTL = 60.0
SETTINGS = "store.json"
CACHEDIR_TAG = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# This file is a cache directory tag created by kvstore.\n"
    "# For information about cache directory tags see https://bford.info/cachedir/\n"
)


@dataclass
class SnapshotInfo:
    """One snapshot as ``entries()`` lists it (no blob I/O needed)."""

    key: str
    fingerprint: str
    model: str
    tier: str
    tokens: int
    bytes: int  # its blobs, each shared segment split evenly between its users
    shared_bytes: int  # bytes of segments it reads that other snapshots use too
    created: float
    accessed: float
    hits: int
    trimmable: bool
    blobs: list = field(default_factory=list)
    unique_bytes: int = 0  # what deleting it alone frees now

    def token_ids(self, store):
        """The snapshot's token ids (read from the index)."""
        return store.tokens_of(self.key)


class Match(NamedTuple):
    """The snapshot a fetch uses: its key, the tokens it serves, how it matched
    (``exact`` served one token short, ``shorter`` a stored prefix, ``longer``
    the shared prefix of a longer trimmable entry) and its tier."""

    key: str
    tokens: int
    kind: str
    tier: str


@dataclass
class Problem:
    """One fault ``verify`` or ``gc`` found."""

    kind: str
    key: str | None
    blob: str | None
    reason: str


def _now():
    return time.time()


def _is_id(x):
    return isinstance(x, bytes) and len(x) == 16


def check_record(rec):
    """Raise ``CorruptSnapshot`` unless ``rec`` has the shape ``put`` writes.

    Index records are decoded from msgpack and may hold anything (a flipped
    bit, another tool's writes, a hostile archive): every field a reader,
    ``delete`` or ``gc`` relies on is checked before it is used.
    """
    n = rec.get("n")
    tok, ext, st, links = rec.get("tok"), rec.get("ext"), rec.get("st"), rec.get("links", b"")
    ok = (
        rec.get("v") == FORMAT_VERSION and isinstance(rec.get("fp"), str) and isinstance(rec.get("tier"), str)
        and type(n) is int and n >= 1 and isinstance(tok, bytes) and len(tok) == 4 * n
        and isinstance(rec.get("lay"), list) and isinstance(rec.get("sid"), str)
        and isinstance(ext, list)
        and all(isinstance(e, list) and len(e) == 2 and _is_id(e[0]) and type(e[1]) is int and e[1] >= 1
                for e in ext)
        and (st is None or (isinstance(st, list) and len(st) == 3 and _is_id(st[0])
                            and type(st[1]) is int and st[1] >= 0 and type(st[2]) is int))
        and isinstance(links, bytes) and len(links) % 16 == 0 and _is_id(rec.get("endl"))
    )
    if not ok:
        raise CorruptSnapshot("malformed snapshot record")
    return rec


def check_segment(srec):
    """Raise ``CorruptSnapshot`` unless ``srec`` has the shape of a segment record."""
    if not (isinstance(srec.get("fp"), str) and type(srec.get("rows")) is int and srec["rows"] >= 1
            and type(srec.get("size")) is int and srec["size"] >= 0 and type(srec.get("hs")) is int
            and type(srec.get("refs")) is int and type(srec.get("at", 0)) is int):
        raise CorruptSnapshot("malformed segment record")
    return srec


def _or_empty(check, rec):
    """``check(rec)``, or ``{}`` for a record that fails it."""
    try:
        return check(rec)
    except CorruptSnapshot:
        return {}


def _hex(b):
    return b.hex()


class SnapshotStore:
    """A directory of snapshots shared by any number of processes.

    Args:
        path: the store directory; created (0700) if missing.
        map_size: LMDB map size in bytes, fixed when the store is created.
        block_tokens: token block size of the key chain, fixed at creation.
        max_bytes: optional disk budget; ``put`` evicts a bounded number of
            lower-tier, least recently used snapshots to stay under it.
        readonly: open without creating or writing anything.
        fsync: fsync blobs and folders (leave on outside tests and benchmarks).
        access_flush: seconds between batched writes of access times and hits.
    """

    def __init__(self, path, *, map_size=None, block_tokens=None, max_bytes=None,
                 readonly=False, fsync=True, access_flush=5.0):
        self.path = Path(os.path.realpath(os.fspath(path)))
        self.readonly = readonly
        self.fsync = fsync
        self.max_bytes = max_bytes
        self.access_flush = access_flush
        # this process's counters; written by the caller's and writer threads
        self.counters = Counter()
        self._count_lock = threading.Lock()
        self._pending = {}
        self._pending_since = None
        self._flusher = None
        # hit counts and access times batched in memory reach the index even
        # if the process exits without close()
        self._at_exit = _flush_at_exit(weakref.ref(self))
        atexit.register(self._at_exit)
        self._bad = {}
        self._lock = threading.RLock()
        self._fds = {}
        self._fd_pid = None
        settings = self._open_root(map_size, block_tokens)
        self.block = settings["block_tokens"]
        self.map_size = settings["map_size"]
        self.index = Index(self.path / "index", self.map_size, readonly=readonly)
        self.index.env  # open now: fail early and clear stale readers
        self.file_digests = FileDigests(self)

    # ------------------------------------------------------------------ setup
    def _open_root(self, map_size, block_tokens):
        """Create or check the store folder; return its settings.

        Every file and folder of the store is created, read and removed
        relative to the root's own descriptor, never through a symlink.
        """
        if not self.readonly:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            root = self._fd(".")
        except NotADirectoryError as exc:
            raise StoreUnavailable(f"{self.path} is not a directory") from exc
        except OSError as exc:
            raise StoreUnavailable(f"no kvstore store at {self.path}: {exc.strerror or exc}") from exc
        if not self.readonly:
            for sub in ("blobs", "tmp", "quarantine", "index"):
                try:
                    os.mkdir(sub, 0o700, dir_fd=root)
                except FileExistsError:
                    pass
        # LMDB follows links: a planted one must not move the index (or blobs) elsewhere
        for sub in ("blobs", "tmp", "quarantine", "index", "index/data.mdb", "index/lock.mdb"):
            try:
                st = os.stat(sub, dir_fd=root, follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StoreUnavailable(f"cannot use {self.path / sub}: {exc}") from exc
            want = stat.S_ISREG if sub.endswith(".mdb") else stat.S_ISDIR
            if not want(st.st_mode) or (sub.endswith(".mdb") and st.st_nlink != 1):
                raise StoreUnavailable(f"{self.path / sub} is a link or not a {'file' if sub.endswith('.mdb') else 'folder'}")
        if not self.readonly:
            try:
                os.stat("CACHEDIR.TAG", dir_fd=root, follow_symlinks=False)
            except FileNotFoundError:
                self._write_new("CACHEDIR.TAG", CACHEDIR_TAG.encode())
        try:
            os.stat(SETTINGS, dir_fd=root, follow_symlinks=False)
        except FileNotFoundError:
            if self.readonly:
                raise StoreUnavailable(f"{self.path} is not a kvstore store (no {SETTINGS})") from None
            settings = {
                "format": FORMAT_VERSION,
                "block_tokens": int(block_tokens or DEFAULT_BLOCK),
                "map_size": int(map_size or DEFAULT_MAP_SIZE),
                "created": _now(),
            }
            if settings["block_tokens"] < 1 or settings["map_size"] < (1 << 20):
                raise InvalidInput("block_tokens must be >= 1 and map_size >= 1 MiB")
            self._write_new(SETTINGS, json.dumps(settings, indent=1).encode())
        spath = self.path / SETTINGS
        try:
            fd = os.open(SETTINGS, os.O_RDONLY | B._NOFOLLOW | B._CLOEXEC, dir_fd=root)
            with os.fdopen(fd, "rb") as f:
                settings = json.loads(f.read(1 << 16))
            if settings.get("format") != FORMAT_VERSION:
                raise StoreUnavailable(f"{self.path} has store format {settings.get('format')}, "
                                       f"this kvstore reads {FORMAT_VERSION}")
            settings["block_tokens"] = int(settings["block_tokens"])
            settings["map_size"] = int(settings["map_size"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StoreUnavailable(f"cannot read {spath}: {exc}") from exc
        return settings

    def _write_new(self, name, data):
        """Create the file ``name`` in the store root once, atomically, without
        replacing a concurrent winner or following a link."""
        root = self._fd(".")
        tmp = f".{name}.{os.getpid()}.{B.new_id()[:8]}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | B._NOFOLLOW | B._CLOEXEC, 0o600, dir_fd=root)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
            os.link(tmp, name, src_dir_fd=root, dst_dir_fd=root, follow_symlinks=False)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp, dir_fd=root)

    def _fd(self, name):
        """Directory fds of the root (``"."``) and its folders, opened without
        following symlinks, per process."""
        if self._fd_pid != os.getpid():
            self._fds, self._fd_pid = {}, os.getpid()
        fd = self._fds.get(name)
        if fd is None:
            if name == ".":
                fd = B.open_dir(str(self.path))
            else:
                fd = B.open_dir(name, dir_fd=self._fd("."))
            self._fds[name] = fd
        return fd

    def compact_index(self, dest="index.compact"):
        """Write a compacted copy of the LMDB index to ``STORE/dest/data.mdb``; return its size.

        The folder and file are made 0700 / 0600 relative to the store's own
        descriptor; a link planted at either is refused, never followed. The
        copy is never swapped in under live processes: that is the caller's
        step, once no process uses the store.
        """
        if "/" in dest or dest in ("", ".", ".."):
            raise InvalidInput(f"not a folder name in the store: {dest!r}")
        root = self._fd(".")
        try:
            os.mkdir(dest, 0o700, dir_fd=root)
        except FileExistsError:
            pass
        try:
            dfd = B.open_dir(dest, dir_fd=root)
        except OSError as exc:
            raise StoreUnavailable(f"{self.path / dest} is a link or not a folder") from exc
        try:
            try:
                os.unlink("data.mdb", dir_fd=dfd)
            except FileNotFoundError:
                pass
            fd = os.open("data.mdb", os.O_WRONLY | os.O_CREAT | os.O_EXCL | B._NOFOLLOW | B._CLOEXEC, 0o600,
                         dir_fd=dfd)
            try:
                self.index.env.copyfd(fd, compact=True)
                os.fsync(fd)
                return os.fstat(fd).st_size
            except lmdb.Error as exc:
                raise StoreUnavailable(f"cannot write a compacted index to {self.path / dest}: {exc}") from exc
            finally:
                os.close(fd)
        finally:
            os.close(dfd)

    def close(self):
        """Flush pending access updates and release the index and folders."""
        atexit.unregister(self._at_exit)
        flusher = self._flusher
        if flusher is not None and flusher.is_alive():
            flusher.join(timeout=10)
        try:
            self.flush_access()
        except KVStoreError:
            pass
        if self._fd_pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}
        self.index.close()

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

    def _touch(self, key):
        with self._lock:
            last, hits = self._pending.get(key, (0.0, 0))
            self._pending[key] = (_now(), hits + 1)
            if self._pending_since is None:
                self._pending_since = time.monotonic()
            due = time.monotonic() - self._pending_since >= self.access_flush or len(self._pending) >= 256
        if due:
            # never on the caller's thread: the write lock may be held by
            # another process, and a fetch must not wait for it
            with self._lock:
                busy = self._flusher is not None and self._flusher.is_alive()
                if not busy:
                    self._flusher = threading.Thread(target=self._flush_quietly, name="kvstore-access", daemon=True)
                    self._flusher.start()

    def _flush_quietly(self):
        try:
            self.flush_access()
        except KVStoreError as exc:
            self._fault("access-flush", exc)

    def flush_access(self):
        """Write batched access times and hit counts in one small transaction."""
        with self._lock:
            pending, self._pending, self._pending_since = self._pending, {}, None
        if not pending or self.readonly:
            return
        try:
            with self.index.begin(write=True) as txn:
                acc, snap = self.index.db("acc"), self.index.db("snap")
                for key, (t, hits) in pending.items():
                    if txn.get(key, db=snap) is None:
                        continue
                    old = txn.get(key, db=acc)
                    prev = _access(unpack_safe(old)) if old else {}
                    txn.put(key, pack({"a": max(t, prev.get("a", 0.0)), "h": prev.get("h", 0) + hits}), db=acc)
        except lmdb.Error as exc:
            raise StoreUnavailable(f"cannot record access times: {exc}") from exc

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
        n = len(toks)
        if n == 0:
            raise InvalidInput("cannot store an empty prompt")
        from . import codec

        enc = codec.encode(cache, n)
        sig = codec.signature(enc.layout, enc.positional, enc.state)
        try:
            chain = TokenChain(namespace(fp, tenant), toks, self.block)
            return self._put(fp, chain, enc, sig, tier, tenant is not None, dedup=True)
        except InvalidInput:
            raise
        except (KVStoreError, OSError, lmdb.Error) as exc:
            self._fault("put", exc)
            self._count("put_failures")
            return None

    @staticmethod
    def _check_layout(fp, model, sig):
        """Refuse a cache whose layout cannot belong to the model ``fp`` names."""
        from . import codec

        if model.get("struct") != codec.structure(sig):
            raise InvalidInput(
                f"this cache's layout differs from the one stored for {fp}: "
                "the fingerprint does not match the model or cache options"
            )
        sigs = model.get("sigs") or {}
        if codec.sig_id(sig) not in sigs and len(sigs) >= MAX_LAYOUTS:
            raise InvalidInput(f"{fp} already has {MAX_LAYOUTS} cache layouts")

    def _put(self, fp, chain, enc, sig, tier, tenanted, dedup):
        from . import codec

        n = len(chain)
        key = chain.key(n)
        toks = chain.tokens
        snap_db, model_db = self.index.db("snap"), self.index.db("model")
        base, shared = [], 0
        with self.index.begin() as txn:
            old = txn.get(key, db=snap_db)
            if old is not None and self._same_tokens(unpack(old), toks):
                self._count("put_existing")
                self._touch(key)
                return _hex(key)
            known = txn.get(fp.encode(), db=model_db)
            if known is not None:
                self._check_layout(fp, unpack(known, "model record"), sig)
            if enc.positional and dedup:
                base, shared = self._dedup_base(txn, fp, chain, n, codec.sig_id(sig))
        written = []
        try:
            seg = None
            if enc.positional and shared < n:
                tensors = {name: (d, a[:, :, shared:n, :], 2) for name, (d, a) in enc.positional.items()}
                seg_id, size, hs = B.write_blob(
                    self._fd("blobs"), self._fd("tmp"), tensors,
                    {"kvstore.kind": "segment", "kvstore.fp": fp}, fsync=self.fsync,
                )
                written.append(seg_id)
                seg = (bytes.fromhex(seg_id), n - shared, size, hs)
            state = None
            if enc.state:
                tensors = {name: (d, a, None) for name, (d, a) in enc.state.items()}
                st_id, size, hs = B.write_blob(
                    self._fd("blobs"), self._fd("tmp"), tensors,
                    {"kvstore.kind": "state", "kvstore.fp": fp}, fsync=self.fsync,
                )
                written.append(st_id)
                state = [bytes.fromhex(st_id), size, hs]
            extents = [list(e) for e in base] + ([[seg[0], seg[1]]] if seg else [])
            own = (seg[2] if seg else 0) + (state[1] if state else 0)
            record = {
                "v": FORMAT_VERSION, "fp": str(fp), "tier": tier, "n": n, "tok": toks.tobytes(),
                "lay": enc.layout, "sid": codec.sig_id(sig), "ext": extents, "st": state, "trim": enc.trimmable,
                "own": own, "t": _now(), "ten": tenanted,
                # the chain links this record is indexed under (delete needs
                # them, and they cannot be rebuilt without the tenant salt)
                "links": b"".join(chain.links[1 : n // self.block + 1]),
                "endl": chain.links[n // self.block],
            }
            model_rec = {"name": getattr(fp, "name", "") or "", "type": getattr(fp, "model_type", "") or "",
                         "vocab": getattr(fp, "vocab_size", None), "path": getattr(fp, "path", "") or "",
                         "struct": codec.structure(sig), "sigs": {codec.sig_id(sig): sig}, "t": _now()}
            result = self._commit_put(key, chain, record, seg, base, fp, model_rec)
            if result == "retry":
                # a shared segment vanished under us: store the prefix ourselves
                for blob_id in written:
                    B.unlink_blob(self._fd("blobs"), blob_id)
                written = []
                self._count("put_dedup_races")
                return self._put(fp, chain, enc, sig, tier, tenanted, dedup=False)
            if result == "exists":
                for blob_id in written:
                    B.unlink_blob(self._fd("blobs"), blob_id)
                self._count("put_existing")
                return _hex(key)
        except BaseException:
            for blob_id in written:
                B.unlink_blob(self._fd("blobs"), blob_id)
            raise
        self._count("puts")
        self._count("put_tokens_shared", shared)
        self._count("bytes_written", own)
        if self.max_bytes is not None:
            self._enforce_budget()
        return _hex(key)

    def _commit_put(self, key, chain, record, seg, base, fp, model_rec):
        n = record["n"]
        db = self.index.db
        with self.index.begin(write=True) as txn:
            old = txn.get(key, db=db("snap"))
            if old is not None:
                try:
                    if self._same_tokens(unpack(old), chain.tokens):
                        return "exists"
                except CorruptSnapshot:
                    pass
                self._delete_in(txn, key, unpack_safe(old))
            for seg_id, _rows in base:
                raw = txn.get(seg_id, db=db("seg"))
                try:
                    rec = check_segment(unpack(raw, "segment record")) if raw is not None else None
                except CorruptSnapshot:
                    rec = None
                if rec is None:
                    txn.abort()
                    return "retry"
                rec["refs"] += 1
                txn.put(seg_id, pack(rec), db=db("seg"))
            if seg is not None:
                seg_id, rows, size, hs = seg
                # "at": the first token the segment holds (its rows are positional)
                txn.put(seg_id, pack({"v": FORMAT_VERSION, "fp": str(fp), "rows": rows, "at": n - rows, "size": size,
                                      "hs": hs, "refs": 1, "t": _now()}), db=db("seg"))
            txn.put(key, pack(record), db=db("snap"))
            txn.put(key, pack({"a": record["t"], "h": 0}), db=db("acc"))
            for k in range(1, n // self.block + 1):
                txn.put(chain.links[k], key, db=db("thru"), dupdata=True)
            txn.put(chain.links[n // self.block], n.to_bytes(4, "big") + key, db=db("ends"), dupdata=True)
            self._merge_model(txn, str(fp), model_rec)
            self._meta_add(txn, "bytes", record["own"])
            self._meta_add(txn, "snapshots", 1)
        return "ok"

    def _merge_model(self, txn, fp, model_rec):
        """Add a model record, or its new exact layouts to the known one."""
        db = self.index.db("model")
        raw = txn.get(fp.encode(), db=db)
        if raw is None:
            txn.put(fp.encode(), pack(model_rec), db=db)
            return
        known = unpack(raw, "model record")
        if known.get("struct") != model_rec["struct"]:
            raise InvalidInput(f"this store holds another layout for {fp}")
        sigs = known.get("sigs") or {}
        new = {k: v for k, v in model_rec["sigs"].items() if k not in sigs}
        if new:
            if len(sigs) + len(new) > MAX_LAYOUTS:
                raise InvalidInput(f"{fp} already has {MAX_LAYOUTS} cache layouts")
            known["sigs"] = {**sigs, **new}
            txn.put(fp.encode(), pack(known), db=db)

    def _meta_add(self, txn, name, delta):
        db = self.index.db("meta")
        raw = txn.get(name.encode(), db=db)
        value = int(raw.decode()) if raw else 0
        txn.put(name.encode(), str(max(0, value + delta)).encode(), db=db)

    def _meta_get(self, txn, name):
        raw = txn.get(name.encode(), db=self.index.db("meta"))
        return int(raw.decode()) if raw else 0

    @staticmethod
    def _same_tokens(record, toks):
        raw = record.get("tok")
        return isinstance(raw, bytes) and raw == toks.tobytes()

    def _deepest_link(self, txn, chain, limit):
        """Deepest k <= limit with chain.links[k] in ``thru`` (0 if none)."""
        thru = self.index.db("thru")
        lo, hi = 0, min(limit, len(chain.links) - 1)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if txn.get(chain.links[mid], db=thru) is not None:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _through(self, txn, link):
        """Up to MAX_CANDIDATES snapshot keys passing through ``link``."""
        cur = txn.cursor(db=self.index.db("thru"))
        out = []
        if cur.set_key(link):
            for value in cur.iternext_dup():
                out.append(bytes(value))
                if len(out) >= MAX_CANDIDATES:
                    break
        return out

    def _common(self, record, toks, limit):
        raw = record.get("tok")
        if not isinstance(raw, bytes):
            return 0
        other = np.frombuffer(raw, dtype="<i4")
        m = min(len(other), len(toks), limit)
        diff = np.flatnonzero(other[:m] != toks[:m])
        return int(diff[0]) if diff.size else m

    def _dedup_base(self, txn, fp, chain, n, sid):
        """Extents of an earlier snapshot covering the longest shared prefix."""
        k = self._deepest_link(txn, chain, n // self.block)
        if k == 0:
            return [], 0
        best, best_rec = 0, None
        snap = self.index.db("snap")
        for cand in self._through(txn, chain.links[k]):
            raw = txn.get(cand, db=snap)
            if raw is None:
                continue
            try:
                rec = check_record(unpack(raw))
            except CorruptSnapshot:
                continue
            # only segments of the same exact layout (plain vs quantised KV differ)
            if not rec.get("ext") or rec.get("fp") != str(fp) or rec.get("sid") != sid:
                continue
            common = self._common(rec, chain.tokens, n)
            if common > best:
                best, best_rec = common, rec
        if best_rec is None:
            return [], 0
        base, covered = [], 0
        for seg_id, rows in best_rec["ext"]:
            if covered >= best:
                break
            take = min(rows, best - covered)
            base.append((bytes(seg_id), take))
            covered += take
        return base, covered

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

    def fetch(self, fp, tokens, *, tenant=None, min_tokens=0):
        """``fetch_nearest`` that also returns the ``Match`` it used (or ``None``).

        Matches serving ``min_tokens`` tokens or fewer are not loaded: a
        caller that already holds that much in memory pays no disk I/O.
        """
        toks = as_tokens(tokens, getattr(fp, "vocab_size", None))
        rest_all = toks.tolist()
        if len(toks) < 2:
            self._count("misses")
            return None, rest_all, None
        try:
            chain = TokenChain(namespace(fp, tenant), toks, self.block)
            for plan in self._plans(fp, chain):
                if plan[1] <= min_tokens:
                    break
                cache = self._load(fp, chain, plan)
                if cache is not None:
                    key, n, kind, rec = plan
                    self._count("hits")
                    self._count("tokens_reused", n)
                    self._touch(key)
                    return cache, rest_all[n:], Match(_hex(key), n, kind, rec.get("tier", "user"))
        except (KVStoreError, OSError, lmdb.Error) as exc:
            if isinstance(exc, InvalidInput):
                raise
            self._fault("fetch", exc)
        self._count("misses")
        return None, rest_all, None

    def lookup(self, fp, tokens, *, tenant=None):
        """The ``Match`` ``fetch_nearest`` would try first, without loading blobs (or ``None``)."""
        toks = as_tokens(tokens, getattr(fp, "vocab_size", None))
        if len(toks) < 2:
            return None
        chain = TokenChain(namespace(fp, tenant), toks, self.block)
        for key, n, kind, rec in self._plans(fp, chain):
            return Match(_hex(key), n, kind, rec.get("tier", "user"))
        return None

    def _plans(self, fp, chain):
        """Candidate (key, tokens to serve, kind, record), best first."""
        m = len(chain)
        db = self.index.db
        out = []
        with self.index.begin() as txn:
            snap = db("snap")

            def record(key):
                if time.monotonic() - self._bad.get(key, -1e9) < BAD_TTL:
                    return None
                raw = txn.get(key, db=snap)
                if raw is None:
                    return None
                try:
                    rec = unpack(raw)
                    if rec.get("v") != FORMAT_VERSION or rec.get("fp") != str(fp):
                        return None
                    return check_record(rec)
                except CorruptSnapshot as exc:
                    self._fault("fetch", exc, _hex(key))
                    self._bad[key] = time.monotonic()
                    return None

            exact = chain.key(m)
            rec = record(exact)
            if rec is not None and self._same_tokens(rec, chain.tokens) and rec.get("trim"):
                out.append((exact, m - 1, "exact", rec))
            k = self._deepest_link(txn, chain, m // self.block)
            # longer (or equal) trimmable entries sharing a prefix
            cands = self._through(txn, chain.links[k]) if k > 0 else []
            cur = txn.cursor(db=db("ends"))
            if cur.set_key(chain.links[m // self.block]):
                for value in cur.iternext_dup():
                    cands.append(bytes(value[4:]))
                    if len(cands) >= 2 * MAX_CANDIDATES:
                        break
            for cand in dict.fromkeys(cands):
                rec = record(cand)
                if rec is None or not rec.get("trim"):
                    continue
                common = min(self._common(rec, chain.tokens, m), m - 1)
                if common > 0 and common < rec.get("n", 0):
                    out.append((cand, common, "longer", rec))
            # the longest stored prefix shorter than the request
            for level in range(min(k, (m - 1) // self.block), -1, -1):
                if not cur.set_key(chain.links[level]):
                    continue
                found = None
                for value in cur.iternext_dup():
                    n = int.from_bytes(value[:4], "big")
                    if n >= m or n == 0:
                        continue
                    key = bytes(value[4:])
                    if chain.key(n) != key:
                        continue
                    rec = record(key)
                    if rec is not None and self._same_tokens(rec, chain.tokens[:n]):
                        if found is None or n > found[1]:
                            found = (key, n, "shorter", rec)
                if found is not None:
                    out.append(found)
                    break
        # most tokens first; on a tie prefer an exact-length checkpoint
        rank = {"shorter": 0, "exact": 1, "longer": 2}
        out.sort(key=lambda p: (-p[1], rank[p[2]]))
        return out[:3]

    def _load(self, fp, chain, plan):
        key, n, kind, rec = plan
        from . import codec
        import mlx.core as mx

        try:
            if not self._same_tokens_prefix(rec, chain.tokens, n):
                raise CorruptSnapshot("stored tokens do not match")
            with self.index.begin() as txn:
                model_raw = txn.get(str(fp).encode(), db=self.index.db("model"))
                segs = {}
                for seg_id, rows in rec["ext"]:
                    raw = txn.get(bytes(seg_id), db=self.index.db("seg"))
                    if raw is None:
                        raise CorruptSnapshot(f"segment {_hex(bytes(seg_id))} is missing from the index")
                    srec = check_segment(unpack(raw, "segment record"))
                    if srec["fp"] != rec["fp"]:
                        raise CorruptSnapshot(f"segment {_hex(bytes(seg_id))} belongs to another model")
                    if rows > srec["rows"]:
                        raise CorruptSnapshot(f"extent of {rows} rows in a {srec['rows']}-row segment")
                    segs[bytes(seg_id)] = srec
            if model_raw is None:
                raise CorruptSnapshot(f"no layout recorded for {fp}")
            sigs = unpack(model_raw, "model record").get("sigs")
            sig = sigs.get(rec.get("sid")) if isinstance(sigs, dict) else None
            if not isinstance(sig, dict) or not isinstance(sig.get("tensors"), dict):
                raise CorruptSnapshot(f"no layout {rec.get('sid')} recorded for {fp}")
            codec.check_layout(rec["lay"], sig.get("layout"), rec["n"])
            tensors = sig["tensors"]
            positional = {}
            specs = codec.positional_specs(rec["lay"])
            cap = codec.headroom(n)
            dests = {}
            for name, _path in specs:
                want = tensors.get(name)
                if not (isinstance(want, list) and len(want) == 2 and want[0] in B.DTYPES
                        and isinstance(want[1], list) and len(want[1]) == 3
                        and all(type(d) is int and d >= 1 for d in want[1])):
                    raise CorruptSnapshot(f"tensor {name} is not in the model layout")
                dests[name] = (want[0], tuple(want[1]), None)
            if dests:
                pos = 0
                for seg_id, rows in rec["ext"]:
                    if pos >= n:
                        break
                    take = min(int(rows), n - pos)
                    srec = segs[bytes(seg_id)]
                    if srec.get("at", pos) != pos:
                        raise CorruptSnapshot(f"segment {_hex(bytes(seg_id))} holds tokens from {srec['at']}, not {pos}")
                    with B.BlobReader(self._fd("blobs"), _hex(bytes(seg_id)), srec["size"], srec["hs"]) as r:
                        for name, (sdtype, (b_, h_, x_), dest) in list(dests.items()):
                            shape = r.shape(name)
                            if r.dtype(name) != sdtype or len(shape) != 4 or (shape[0], shape[1], shape[3]) != (b_, h_, x_):
                                raise CorruptSnapshot(f"segment tensor {name} has shape {shape} {r.dtype(name)}")
                            if shape[2] < take:
                                raise CorruptSnapshot(f"segment tensor {name} has {shape[2]} rows, need {take}")
                            if dest is None:
                                # allocated only once a real blob has shown these shapes
                                dest = np.zeros((b_, h_, cap, x_), dtype=B.DTYPES[sdtype])
                                dests[name] = (sdtype, (b_, h_, x_), dest)
                            view = dest.reshape(-1, cap, dest.shape[3])[:, pos : pos + take, :]
                            r.read_rows(name, take, view)
                        self._count("bytes_read", r.bytes_read)
                    pos += take
                if pos < n:
                    raise CorruptSnapshot(f"segments cover {pos} of {n} tokens")
                positional = {name: codec.to_mx(dest, sdtype) for name, (sdtype, _dims, dest) in dests.items()}
            state = {}
            if rec.get("st"):
                st_id, size, hs = rec["st"]
                with B.BlobReader(self._fd("blobs"), _hex(bytes(st_id)), size, hs) as r:
                    for name in r.tensors:
                        arr = r.read(name)
                        want = tensors.get(name)
                        if not isinstance(want, list) or len(want) != 2 or want[0] != r.dtype(name):
                            raise CorruptSnapshot(f"state tensor {name} is not in the model layout")
                        shape = list(arr.shape)
                        if name.endswith((".k", ".v")):
                            shape = [shape[0], shape[1], shape[3]] if len(shape) == 4 else shape
                        if shape != list(want[1]):
                            raise CorruptSnapshot(f"state tensor {name} has shape {arr.shape}, want {want[1]}")
                        state[name] = codec.to_mx(arr, r.dtype(name))
                    self._count("bytes_read", r.bytes_read)
            cache = codec.decode(rec["lay"], positional, state, n)
            mx.eval([a for a in list(positional.values()) + list(state.values())])
            return cache
        except (CorruptSnapshot, OSError, KeyError, TypeError, ValueError, IndexError, AttributeError,
                OverflowError, MemoryError, RuntimeError) as exc:
            # RuntimeError: MLX refusing what a damaged record asks of it
            self._count("misses.corrupt")
            self._bad[key] = time.monotonic()
            self._fault("load", exc if isinstance(exc, KVStoreError) else CorruptSnapshot(repr(exc)), _hex(key))
            return None

    @staticmethod
    def _same_tokens_prefix(rec, toks, n):
        raw = rec.get("tok")
        return isinstance(raw, bytes) and len(raw) >= 4 * n and raw[: 4 * n] == toks[:n].tobytes()

    # -------------------------------------------------------- listing, delete
    def tokens_of(self, key):
        """The token ids of one snapshot (``InvalidInput`` if there is none,
        ``CorruptSnapshot`` if its record is damaged)."""
        rec = check_record(self._record(key))
        return np.frombuffer(rec["tok"], dtype="<i4").tolist()

    def _record(self, key):
        kb = self._key_bytes(key)
        with self.index.begin() as txn:
            raw = txn.get(kb, db=self.index.db("snap"))
        if raw is None:
            raise InvalidInput(f"no snapshot {key}")
        return unpack(raw)

    def resolve(self, prefix):
        """Full key for a unique key prefix (as ``ls`` prints short keys)."""
        prefix = prefix.lower()
        if not prefix or any(c not in "0123456789abcdef" for c in prefix):
            raise InvalidInput(f"not a snapshot key: {prefix!r}")
        found = []
        with self.index.begin() as txn:
            cur = txn.cursor(db=self.index.db("snap"))
            start = bytes.fromhex(prefix + "0" * (len(prefix) % 2))
            if cur.set_range(start):
                for k in cur.iternext(keys=True, values=False):
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

    @staticmethod
    def _key_bytes(key):
        try:
            kb = bytes.fromhex(key) if isinstance(key, str) else bytes(key)
        except ValueError:
            raise InvalidInput(f"not a snapshot key: {key!r}") from None
        if len(kb) != 16:
            raise InvalidInput(f"not a snapshot key: {key!r}")
        return kb

    def models(self):
        """``{fingerprint: {"name", "type", "vocab", "path"}}`` of every model the store has seen."""
        with self.index.begin() as txn:
            out = {}
            for k, raw in txn.cursor(db=self.index.db("model")):
                rec = unpack_safe(raw)
                out[bytes(k).decode(errors="replace")] = {f: rec.get(f) for f in ("name", "type", "vocab", "path")}
        return out

    def entries(self, *, fingerprint=None, tier=None):
        """Every snapshot as a ``SnapshotInfo`` (index only, no blob I/O)."""
        self.flush_access()
        out = []
        with self.index.begin() as txn:
            seg_db, acc_db, model_db = (self.index.db(n) for n in ("seg", "acc", "model"))
            names = {}
            for k, raw in txn.cursor(db=self.index.db("snap")):
                try:
                    rec = check_record(unpack(raw))
                except CorruptSnapshot:
                    out.append(SnapshotInfo(k.hex(), "?", "?", "?", 0, 0, 0, 0.0, 0.0, 0, False))
                    continue
                if fingerprint is not None and rec.get("fp") != str(fingerprint):
                    continue
                if tier is not None and rec.get("tier") != tier:
                    continue
                fp = rec.get("fp", "?")
                if fp not in names:
                    m = txn.get(fp.encode(), db=model_db)
                    name = unpack_safe(m).get("name") if m else ""
                    names[fp] = name if isinstance(name, str) and name else fp
                share = shared = unique = 0
                blob_ids = []
                for seg_id, _rows in rec.get("ext", []):
                    s = txn.get(bytes(seg_id), db=seg_db)
                    blob_ids.append(bytes(seg_id).hex())
                    srec = _or_empty(check_segment, unpack_safe(s)) if s is not None else {}
                    size, refs = srec.get("size", 0), max(srec.get("refs", 1), 1)
                    share += size // refs
                    if refs > 1:
                        shared += size
                    else:
                        unique += size
                if rec.get("st"):
                    blob_ids.append(bytes(rec["st"][0]).hex())
                    share += rec["st"][1]
                    unique += rec["st"][1]
                a = txn.get(k, db=acc_db)
                acc = _access(unpack_safe(a) if a else {})
                created = rec.get("t") if isinstance(rec.get("t"), (int, float)) else 0.0
                out.append(SnapshotInfo(
                    key=k.hex(), fingerprint=fp, model=names[fp], tier=rec.get("tier", "?"),
                    tokens=rec.get("n", 0), bytes=share, shared_bytes=shared, unique_bytes=unique,
                    created=created, accessed=acc.get("a", created),
                    hits=acc.get("h", 0), trimmable=bool(rec.get("trim")), blobs=blob_ids,
                ))
        return out

    def delete(self, key):
        """Delete one snapshot; return the bytes freed on disk (0 if it was not there).

        Shared segments are freed only when no other snapshot uses them.
        """
        return self._delete(self._key_bytes(key)) or 0

    def _delete(self, kb):
        """Delete one snapshot; bytes freed, or ``None`` if it was not there."""
        try:
            with self.index.begin(write=True) as txn:
                raw = txn.get(kb, db=self.index.db("snap"))
                if raw is None:
                    return None
                doomed, freed = self._delete_in(txn, kb, unpack_safe(raw))
        except lmdb.Error as exc:
            raise StoreUnavailable(f"cannot delete {kb.hex()}: {exc}") from exc
        for blob_id in doomed:
            B.unlink_blob(self._fd("blobs"), blob_id)
        self._bad.pop(kb, None)
        self._count("deletes")
        return freed

    def _delete_in(self, txn, kb, rec):
        """Remove a record and its index entries inside ``txn``; return (blobs to unlink, bytes)."""
        db = self.index.db
        doomed, freed = [], 0
        # a malformed record is removed alone; gc drops segments no record uses
        rec = _or_empty(check_record, rec)
        n = rec.get("n", 0)
        for seg_id, _rows in rec.get("ext", []) or []:
            seg_id = bytes(seg_id)
            s = txn.get(seg_id, db=db("seg"))
            if s is None:
                continue
            try:
                srec = check_segment(unpack(s, "segment record"))
            except CorruptSnapshot:
                srec = {"refs": 1, "size": 0}
            refs = srec["refs"] - 1
            if refs <= 0:
                txn.delete(seg_id, db=db("seg"))
                doomed.append(seg_id.hex())
                freed += srec["size"]
            else:
                srec["refs"] = refs
                txn.put(seg_id, pack(srec), db=db("seg"))
        if rec.get("st"):
            doomed.append(bytes(rec["st"][0]).hex())
            freed += rec["st"][1]
        links = rec.get("links") or b""
        for i in range(0, len(links), 16):
            txn.delete(bytes(links[i : i + 16]), kb, db=db("thru"))
        if rec.get("endl"):
            txn.delete(bytes(rec["endl"]), int(n).to_bytes(4, "big") + kb, db=db("ends"))
        txn.delete(kb, db=db("snap"))
        txn.delete(kb, db=db("acc"))
        self._meta_add(txn, "bytes", -freed)
        self._meta_add(txn, "snapshots", -1)
        return doomed, freed

    # ------------------------------------------------------- stats, policies
    def stats(self):
        """Totals by model and tier, disk and map use, and this process's counters."""
        entries = self.entries()
        by_model, by_tier = {}, {t: {"snapshots": 0, "tokens": 0, "bytes": 0} for t in TIERS}
        for e in entries:
            m = by_model.setdefault(e.model, {"fingerprint": e.fingerprint, "snapshots": 0, "tokens": 0, "bytes": 0})
            for d in (m, by_tier.setdefault(e.tier, {"snapshots": 0, "tokens": 0, "bytes": 0})):
                d["snapshots"] += 1
                d["tokens"] += e.tokens
                d["bytes"] += e.bytes
        env = self.index.env
        info, st = env.info(), env.stat()
        with self.index.begin() as txn:
            segs = txn.stat(self.index.db("seg"))["entries"]
            indexed = self._meta_get(txn, "bytes")
        return {
            "path": str(self.path),
            "snapshots": len(entries),
            "segments": segs,
            "bytes": indexed,
            "tokens": sum(e.tokens for e in entries),
            "hits": sum(e.hits for e in entries),
            "by_model": by_model,
            "by_tier": by_tier,
            "map_size": info["map_size"],
            "map_used": (info["last_pgno"] + 1) * st["psize"],
            "block_tokens": self.block,
            "counters": dict(self.counters),
        }

    def plan_prune(self, *, max_bytes=None, older_than=None, tier=None, fingerprint=None, keep_last=None):
        """Snapshots ``prune`` would delete, in deletion order.

        Lower tiers go first (assistant, user, system) and, within a tier, the
        least recently used. ``older_than`` (seconds since last access),
        ``tier`` and ``fingerprint`` select candidates; ``keep_last`` spares
        the N most recently used of each model; ``max_bytes`` deletes only
        until the store fits.
        """
        entries = self.entries(fingerprint=fingerprint)
        keep = set()
        if keep_last:
            by_model = {}
            for e in entries:
                by_model.setdefault(e.fingerprint, []).append(e)
            for group in by_model.values():
                group.sort(key=lambda e: -e.accessed)
                keep.update(e.key for e in group[:keep_last])
        now = _now()
        tiers = {tier} if isinstance(tier, str) else set(tier) if tier else None
        cands = [
            e for e in entries
            if e.key not in keep
            and (tiers is None or e.tier in tiers)
            and (older_than is None or now - e.accessed >= older_than)
        ]
        cands.sort(key=lambda e: (TIER_RANK.get(e.tier, -1), e.accessed))
        if max_bytes is None:
            return cands
        with self.index.begin() as txn:
            total = self._meta_get(txn, "bytes")
        plan = []
        for e in cands:
            if total <= max_bytes:
                break
            plan.append(e)
            # an estimate: deleting earlier picks may leave this one sole owner of more
            total -= max(e.unique_bytes, 1)
        return plan

    def total_bytes(self):
        """Bytes of every blob the index references (shared segments once)."""
        with self.index.begin() as txn:
            return self._meta_get(txn, "bytes")

    def prune(self, on_delete=None, **policy):
        """Delete what ``plan_prune(**policy)`` selects; return ``(count, bytes freed)``.

        With ``max_bytes`` the real total is checked after each delete, since
        a snapshot whose segments others share frees less than its size.
        Only snapshots this call deleted are counted (not those another
        process deleted first); ``on_delete(info)`` is called for each.
        """
        limit = policy.get("max_bytes")
        plan = self.plan_prune(**{**policy, "max_bytes": None})
        count = freed = 0
        for e in plan:
            if limit is not None and self.total_bytes() <= limit:
                break
            got = self._delete(bytes.fromhex(e.key))
            if got is None:
                continue
            freed += got
            count += 1
            if on_delete is not None:
                on_delete(e)
        return count, freed

    def _enforce_budget(self, limit=8):
        """Bounded eviction on the write path: at most ``limit`` snapshots per put."""
        try:
            with self.index.begin() as txn:
                total = self._meta_get(txn, "bytes")
            if total <= self.max_bytes:
                return
            for e in self.plan_prune()[:limit]:
                if self.total_bytes() <= self.max_bytes:
                    break
                self.delete(e.key)
                self._count("evictions")
        except (KVStoreError, OSError, lmdb.Error) as exc:
            self._fault("evict", exc)

    def verify(self, keys=None, fix=False, progress=None):
        """Check every record and blob (or those of ``keys``); return ``[Problem]``.

        Reads each blob whole and checks header, size and every checksum.
        With ``fix=True`` bad blobs are moved to ``quarantine/`` and the
        snapshots that use them are deleted. ``progress(1)`` is called per
        snapshot checked. A snapshot another process deletes meanwhile is
        not a problem.
        """
        problems = []
        wanted = None if keys is None else {self._key_bytes(k) for k in keys}
        checked = {}
        bad_keys = []
        with self.index.begin() as txn:
            seg_db = self.index.db("seg")
            items = list(txn.cursor(db=self.index.db("snap")))
            segs = {bytes(k): bytes(v) for k, v in txn.cursor(db=seg_db)}
        for kb, raw in items:
            kb = bytes(kb)
            if wanted is not None and kb not in wanted:
                continue
            if progress:
                progress(1)
            try:
                rec = unpack(raw)
                if rec.get("v") != FORMAT_VERSION:
                    raise CorruptSnapshot(f"record format version {rec.get('v')}")
                toks = rec.get("tok")
                if not isinstance(toks, bytes) or len(toks) != 4 * rec.get("n", -1):
                    raise CorruptSnapshot("token list does not match the token count")
                check_record(rec)
                blob_list = []
                covered = 0
                for seg_id, rows in rec.get("ext", []):
                    seg_id = bytes(seg_id)
                    if seg_id not in segs:
                        raise CorruptSnapshot(f"segment {seg_id.hex()} is missing from the index")
                    srec = check_segment(unpack(segs[seg_id], "segment record"))
                    if srec["fp"] != rec["fp"]:
                        raise CorruptSnapshot(f"segment {seg_id.hex()} belongs to another model")
                    if rows > srec["rows"]:
                        raise CorruptSnapshot(f"extent of {rows} rows in a {srec['rows']}-row segment")
                    if srec.get("at", covered) != covered:
                        raise CorruptSnapshot(f"segment {seg_id.hex()} holds tokens from {srec['at']}, not {covered}")
                    covered += rows
                    blob_list.append((seg_id.hex(), srec["size"], srec["hs"]))
                if rec.get("ext") and covered != rec["n"]:
                    raise CorruptSnapshot(f"segments cover {covered} of {rec['n']} tokens")
                if rec.get("st"):
                    st_id, size, hs = rec["st"]
                    blob_list.append((bytes(st_id).hex(), size, hs))
            except (CorruptSnapshot, KeyError, TypeError, ValueError) as exc:
                problems.append(Problem("record", kb.hex(), None, str(exc)))
                bad_keys.append((kb, None))
                continue
            for blob_id, size, hs in blob_list:
                if blob_id not in checked:
                    try:
                        with B.BlobReader(self._fd("blobs"), blob_id, size, hs) as r:
                            r.verify()
                        checked[blob_id] = None
                    except FileNotFoundError:
                        checked[blob_id] = "blob file is missing"
                    except (CorruptSnapshot, OSError) as exc:
                        checked[blob_id] = str(exc)
                if checked[blob_id] is not None:
                    problems.append(Problem("blob", kb.hex(), blob_id, checked[blob_id]))
                    bad_keys.append((kb, blob_id))
        scanned_raw = {bytes(k): bytes(v) for k, v in items}
        if problems:
            # deleted by another process since the scan: not a fault
            scanned = scanned_raw
            with self.index.begin() as txn:
                snap = self.index.db("snap")
                live = {p.key for p in problems
                        if txn.get(bytes.fromhex(p.key), db=snap) == scanned[bytes.fromhex(p.key)]}
            problems = [p for p in problems if p.key in live]
            bad_keys = [(k, b) for k, b in bad_keys if k.hex() in live]
            checked = {b: r for b, r in checked.items() if r is None or any(p.blob == b for p in problems)}
        if fix:
            for blob_id, reason in checked.items():
                if reason is not None:
                    self._quarantine(blob_id)
            for kb, _ in dict.fromkeys(bad_keys):
                self._force_delete(kb, scanned_raw.get(kb))
        return problems

    def _quarantine(self, blob_id):
        try:
            sub = B.open_dir(blob_id[:2], dir_fd=self._fd("blobs"))
        except OSError:
            return
        try:
            os.rename(f"{blob_id}{B.SUFFIX}", f"{blob_id}{B.SUFFIX}", src_dir_fd=sub, dst_dir_fd=self._fd("quarantine"))
            self._count("quarantined")
        except OSError:
            pass
        finally:
            os.close(sub)

    def _force_delete(self, kb, expect=None):
        """Delete a record even when it cannot be decoded.

        With ``expect`` (the record as a scan saw it), only that record: one
        another process deleted and stored again since is left alone.
        """
        with self.index.begin(write=True) as txn:
            raw = txn.get(kb, db=self.index.db("snap"))
            if raw is None or (expect is not None and bytes(raw) != expect):
                return
            rec = unpack_safe(raw)
            doomed, _ = self._delete_in(txn, kb, rec)
        for blob_id in doomed:
            B.unlink_blob(self._fd("blobs"), blob_id)

    def gc(self, grace=3600.0, dry_run=False):
        """Housekeeping; return ``[Problem]`` for what was (or would be) cleaned.

        Removes temp files and unreferenced blob files older than ``grace``
        seconds (a put in flight writes its blob before indexing it), records
        whose blobs are missing or the wrong size, segment records no
        snapshot uses, access records of deleted snapshots, and clears the
        reader slots of dead processes.
        """
        found = []
        now = _now()
        try:
            self.index.env.reader_check()
        except lmdb.Error:
            pass
        tmp_fd = self._fd("tmp")
        for name in os.listdir(tmp_fd):
            try:
                st = os.stat(name, dir_fd=tmp_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if now - st.st_mtime >= grace:
                found.append(Problem("temp", None, None, f"temp file {name}"))
                if not dry_run:
                    try:
                        os.unlink(name, dir_fd=tmp_fd)
                    except FileNotFoundError:
                        pass
        with self.index.begin() as txn:
            raws = {bytes(k): bytes(v) for k, v in txn.cursor(db=self.index.db("snap"))}
            segs = {bytes(k): _or_empty(check_segment, unpack_safe(v)) for k, v in txn.cursor(db=self.index.db("seg"))}
            accs = [bytes(k) for k in txn.cursor(db=self.index.db("acc")).iternext(keys=True, values=False)]
        items = [(kb, _or_empty(check_record, unpack_safe(raw))) for kb, raw in raws.items()]
        wanted, users = {}, Counter()
        snap_keys = set()
        for kb, rec in items:
            snap_keys.add(kb)
            for seg_id, _rows in rec.get("ext", []) or []:
                users[bytes(seg_id)] += 1
                srec = segs.get(bytes(seg_id), {})
                wanted[bytes(seg_id).hex()] = (kb, srec.get("size"))
            if rec.get("st"):
                wanted[bytes(rec["st"][0]).hex()] = (kb, rec["st"][1])
        blobs_fd = self._fd("blobs")
        on_disk = {}
        for sub in os.listdir(blobs_fd):
            try:
                sfd = B.open_dir(sub, dir_fd=blobs_fd)
            except OSError:
                found.append(Problem("orphan", None, None, f"blobs/{sub} is not a folder"))
                continue
            try:
                for name in os.listdir(sfd):
                    try:
                        st = os.stat(name, dir_fd=sfd, follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # deleted by another process since the listing
                    blob_id = name[: -len(B.SUFFIX)] if name.endswith(B.SUFFIX) else None
                    if blob_id and B.is_blob_id(blob_id) and blob_id[:2] == sub and stat.S_ISREG(st.st_mode):
                        on_disk[blob_id] = st.st_size
                        if blob_id in wanted or now - st.st_mtime < grace:
                            continue
                    elif now - st.st_mtime < grace:
                        continue
                    found.append(Problem("orphan", None, blob_id, f"unreferenced file blobs/{sub}/{name}"))
                    if not dry_run:
                        try:
                            os.unlink(name, dir_fd=sfd)
                        except FileNotFoundError:
                            pass
            finally:
                os.close(sfd)
        bad = []
        for blob_id, (kb, size) in wanted.items():
            if blob_id not in on_disk:
                bad.append(Problem("missing", kb.hex(), blob_id, "blob file is missing"))
            elif size is not None and on_disk[blob_id] != size:
                bad.append(Problem("corrupt", kb.hex(), blob_id, f"blob is {on_disk[blob_id]} bytes, index says {size}"))
        broken = set()
        if bad:
            # a snapshot deleted (or deleted and stored again) by another
            # process since the scan took its blobs with it: not a fault
            with self.index.begin() as txn:
                snap = self.index.db("snap")
                broken = {kb for kb in {bytes.fromhex(p.key) for p in bad}
                          if txn.get(kb, db=snap) == raws[kb]}
            bad = [p for p in bad if bytes.fromhex(p.key) in broken]
            found.extend(bad)
            if not dry_run:
                for p in bad:
                    if p.kind == "corrupt":
                        self._quarantine(p.blob)
        stale_segs = [s for s in segs if users[s] == 0]
        stale_acc = [k for k in accs if k not in snap_keys]
        for s in stale_segs:
            found.append(Problem("segment", None, s.hex(), "segment record no snapshot uses"))
        if not dry_run:
            for kb in broken:
                self._force_delete(kb, raws[kb])
            dropped = []
            if stale_segs or stale_acc:
                with self.index.begin(write=True) as txn:
                    for s in stale_segs:
                        raw = txn.get(s, db=self.index.db("seg"))
                        # a put that claimed the segment since our scan bumped its refs
                        if raw is not None and unpack_safe(raw).get("refs") == segs[s].get("refs"):
                            txn.delete(s, db=self.index.db("seg"))
                            dropped.append(s.hex())
                    for k in stale_acc:
                        if txn.get(k, db=self.index.db("snap")) is None:
                            txn.delete(k, db=self.index.db("acc"))
            for blob_id in dropped:
                B.unlink_blob(blobs_fd, blob_id)
        return found

    # --------------------------------------------------------- export/import
    def export_archive(self, archive, keys=None, progress=None):
        """Write snapshots (all, or ``keys``) with their blobs to a tar archive (mode 0600).

        Blobs are copied as they are (no re-encoding) after a full verify;
        a snapshot whose blobs fail is skipped and reported. Returns
        ``(snapshots written, bytes of blobs, [Problem])``.
        """
        from .archive import write_archive

        wanted = None if keys is None else {self._key_bytes(k) for k in keys}
        with self.index.begin() as txn:
            snaps = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=self.index.db("snap"))
                     if wanted is None or bytes(k) in wanted]
            segs = {bytes(k): unpack_safe(v) for k, v in txn.cursor(db=self.index.db("seg"))}
            models = {bytes(k): unpack_safe(v) for k, v in txn.cursor(db=self.index.db("model"))}
        manifest = {"format": FORMAT_VERSION, "block_tokens": self.block, "snapshots": [], "segments": {},
                    "models": {}}
        problems, blob_list = [], {}
        for kb, raw in snaps:
            try:
                rec = unpack(raw)
                need = {}
                for seg_id, _rows in rec.get("ext", []):
                    srec = segs.get(bytes(seg_id))
                    if not srec:
                        raise CorruptSnapshot(f"segment {bytes(seg_id).hex()} is missing from the index")
                    need[bytes(seg_id).hex()] = (srec["size"], srec["hs"])
                if rec.get("st"):
                    need[bytes(rec["st"][0]).hex()] = (rec["st"][1], rec["st"][2])
                for blob_id, (size, hs) in need.items():
                    if blob_id not in blob_list:
                        with B.BlobReader(self._fd("blobs"), blob_id, size, hs) as r:
                            r.verify()
                        blob_list[blob_id] = size
            except (CorruptSnapshot, FileNotFoundError, OSError, KeyError, TypeError) as exc:
                problems.append(Problem("export", kb.hex(), None, str(exc)))
                continue
            manifest["snapshots"].append({"key": kb, "rec": raw})
            for seg_id, _rows in rec.get("ext", []):
                srec = segs[bytes(seg_id)]
                manifest["segments"][bytes(seg_id).hex()] = {k: srec[k] for k in ("fp", "rows", "at", "size", "hs") if k in srec}
            fp = rec.get("fp", "").encode()
            if fp in models:
                manifest["models"][fp.decode()] = models[fp]

        def files():
            for blob_id, size in blob_list.items():
                yield blob_id, size, self._open_blob_file(blob_id)

        write_archive(archive, pack(manifest), files(), progress)
        return len(manifest["snapshots"]), sum(blob_list.values()), problems

    def _open_blob_file(self, blob_id):
        sub = B.open_dir(blob_id[:2], dir_fd=self._fd("blobs"))
        try:
            fd = os.open(f"{blob_id}{B.SUFFIX}", os.O_RDONLY | B._NOFOLLOW | B._CLOEXEC, dir_fd=sub)
        finally:
            os.close(sub)
        return os.fdopen(fd, "rb")

    def _has_blob(self, blob_id):
        """True if a blob file of that id is in place (not checked)."""
        try:
            sub = B.open_dir(blob_id[:2], dir_fd=self._fd("blobs"))
        except OSError:
            return False
        try:
            os.stat(f"{blob_id}{B.SUFFIX}", dir_fd=sub, follow_symlinks=False)
            return True
        except FileNotFoundError:
            return False
        finally:
            os.close(sub)

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
        from .archive import import_archive

        return import_archive(self, archive, progress)

    def _import_record(self, kb, rec, raw, segments, models, arrived):
        if len(kb) != 16 or rec.get("v") != FORMAT_VERSION:
            raise CorruptSnapshot("bad record in archive")
        check_record(rec)
        fp = rec.get("fp")
        model = models.get(fp)
        if not isinstance(model, dict) or "struct" not in model or not isinstance(model.get("sigs"), dict):
            raise CorruptSnapshot(f"archive has no layout for {fp}")
        need = {}
        for seg_id, _rows in rec.get("ext", []):
            meta = segments.get(bytes(seg_id).hex())
            if not isinstance(meta, dict):
                raise CorruptSnapshot(f"archive has no segment {bytes(seg_id).hex()}")
            if check_segment({**meta, "refs": 1})["fp"] != fp:
                raise CorruptSnapshot(f"segment {bytes(seg_id).hex()} belongs to another model")
            need[bytes(seg_id).hex()] = (meta["size"], meta["hs"], meta)
        if rec.get("st"):
            need[bytes(rec["st"][0]).hex()] = (rec["st"][1], rec["st"][2], None)
        tmp_fd, blobs_fd = self._fd("tmp"), self._fd("blobs")
        # place (or find already placed) blobs, verified before they are indexed
        placed = []
        for blob_id, (size, hs, _meta) in need.items():
            try:
                with B.BlobReader(blobs_fd, blob_id, size, hs) as r:
                    r.verify()
                continue  # already here (an earlier import or snapshot)
            except FileNotFoundError:
                pass
            if blob_id not in arrived:
                raise CorruptSnapshot(f"archive lacks blob {blob_id}")
            tmp_name = arrived[blob_id]
            sub = B.open_dir(blob_id[:2], dir_fd=blobs_fd, create=True)
            try:
                os.rename(tmp_name, f"{blob_id}{B.SUFFIX}", src_dir_fd=tmp_fd, dst_dir_fd=sub)
            finally:
                os.close(sub)
            del arrived[blob_id]
            try:
                with B.BlobReader(blobs_fd, blob_id, size, hs) as r:
                    r.verify()
            except (CorruptSnapshot, OSError):
                B.unlink_blob(blobs_fd, blob_id)
                raise
            placed.append((blob_id, size))
        db = self.index.db
        with self.index.begin(write=True) as txn:
            if txn.get(kb, db=db("snap")) is not None:
                return None
            self._merge_model(txn, fp, model)
            new_bytes = 0
            for blob_id, (size, hs, meta) in need.items():
                if meta is None:
                    continue
                sid = bytes.fromhex(blob_id)
                cur = txn.get(sid, db=db("seg"))
                if cur is None:
                    srec = {"v": FORMAT_VERSION, "fp": meta["fp"], "rows": meta["rows"], "size": size, "hs": hs,
                            "refs": 1, "t": _now()}
                    if type(meta.get("at")) is int:
                        srec["at"] = meta["at"]
                    txn.put(sid, pack(srec), db=db("seg"))
                    new_bytes += size
                else:
                    srec = unpack(cur, "segment record")
                    srec["refs"] += 1
                    txn.put(sid, pack(srec), db=db("seg"))
            if rec.get("st"):
                new_bytes += rec["st"][1]
            txn.put(kb, raw, db=db("snap"))
            txn.put(kb, pack({"a": _now(), "h": 0}), db=db("acc"))
            links = rec.get("links") or b""
            for i in range(0, len(links), 16):
                txn.put(bytes(links[i : i + 16]), kb, db=db("thru"), dupdata=True)
            txn.put(bytes(rec["endl"]), int(rec["n"]).to_bytes(4, "big") + kb, db=db("ends"), dupdata=True)
            self._meta_add(txn, "bytes", new_bytes)
            self._meta_add(txn, "snapshots", 1)
        return new_bytes


class FileDigests:
    """The store's cache of weight-file digests, for ``kvstore.fingerprint``.

    Keys are a file's content identity (``fingerprint.content_identity``),
    values its digest and the path it was read at, so every process that
    opens the store skips re-reading weights it has hashed before. A read-only
    store only reads the cache; a write that fails is counted, never raised.
    """

    def __init__(self, store):
        self._store = store

    def get(self, identity):
        """The digest recorded for ``identity``, or ``None``."""
        index = self._store.index
        if index.db("files") is None:
            return None
        try:
            with index.begin() as txn:
                raw = txn.get(identity, db=index.db("files"))
        except lmdb.Error as exc:
            self._store._fault("digest-cache", exc)
            return None
        digest = unpack_safe(raw).get("d") if raw is not None else None
        return digest if isinstance(digest, bytes) else None

    def put(self, identity, digest, path=""):
        """Record ``digest`` for ``identity`` (nothing in a read-only store)."""
        store = self._store
        if store.readonly or store.index.db("files") is None:
            return
        try:
            with store.index.begin(write=True) as txn:
                txn.put(identity, pack({"d": digest, "p": str(path), "t": _now()}), db=store.index.db("files"))
        except lmdb.Error as exc:
            store._fault("digest-cache", exc)


def _access(acc):
    """An access record's fields that are numbers (a malformed one counts as none)."""
    return {k: acc[k] for k in ("a", "h") if type(acc.get(k)) in (int, float)}


def _flush_at_exit(ref):
    def flush():
        store = ref()
        if store is not None and store._pending:
            store._flush_quietly()

    return flush


def unpack_safe(raw):
    try:
        return unpack(raw)
    except CorruptSnapshot:
        return {}

