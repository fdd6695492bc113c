"""The LMDB index: one environment per path per process, small transactions.

Databases:
  snap   snapshot key -> snapshot record
  thru   block link -> keys of snapshots whose tokens pass through that block (dupsort)
  ends   block link -> (length, key) of snapshots ending inside the next block (dupsort)
  seg    segment id -> shared positional-KV segment record
  acc    snapshot key -> last access and hits, updated in batches
  model  fingerprint -> model record
  meta   counters every process agrees on
  files  weight file content identity -> its digest (fingerprints need not re-read weights)

This module owns the environment's life cycle (opened lazily after fork,
stale readers cleared on open, shared by stores opened twice on one path in
one process) and is the only module that imports ``lmdb``. It never does
blob I/O or MLX work, so no write transaction waits on either. Every LMDB
fault leaves it as ``StoreUnavailable``.
"""

import contextlib
import os
import threading

import lmdb

from ..errors import StoreUnavailable

DBS = ("snap", "thru", "ends", "seg", "acc", "model", "meta", "files")
DUPSORT = ("thru", "ends")
# databases a store written by an older version may lack (opened read-only, they read as empty)
OPTIONAL = ("files",)
TABLES = {"snapshots": "snap", "segments": "seg"}
# ends_matching steps through at most this many ends of one link, and seeks by count beyond
ENDS_SCAN = 128
# LMDB allows one environment per file per process: (pid, path) -> [env, dbs, users]
_OPEN = {}
_OPEN_LOCK = threading.Lock()


class _View:
    """``IndexReader`` / ``IndexWriter`` over one LMDB transaction."""

    def __init__(self, txn, dbs):
        self.txn, self.dbs = txn, dbs

    def _get(self, db, key):
        raw = self.txn.get(key, db=self.dbs[db])
        return None if raw is None else bytes(raw)

    def snapshot(self, key):
        return self._get("snap", key)

    def segment(self, seg_id):
        return self._get("seg", seg_id)

    def model(self, fingerprint):
        return self._get("model", fingerprint.encode())

    def access(self, key):
        return self._get("acc", key)

    def passes_through(self, link):
        return self.txn.get(link, db=self.dbs["thru"]) is not None

    def links_through(self, link, limit):
        cur = self.txn.cursor(db=self.dbs["thru"])
        out = []
        if cur.set_key(link):
            for value in cur.iternext_dup():
                out.append(bytes(value))
                if len(out) >= limit:
                    break
        return out

    def ends_at(self, link, limit=None):
        cur = self.txn.cursor(db=self.dbs["ends"])
        out = []
        if cur.set_key(link):
            for value in cur.iternext_dup():
                out.append((int.from_bytes(value[:4], "big"), bytes(value[4:])))
                if limit is not None and len(out) >= limit:
                    break
        return out

    def ends_matching(self, link, below, key_of):
        cur = self.txn.cursor(db=self.dbs["ends"])
        out = []
        if not cur.set_key(link):
            return out
        if cur.count() <= ENDS_SCAN:  # a few: step through them
            for value in cur.iternext_dup():
                n = int.from_bytes(value[:4], "big")
                if n >= below:
                    break
                if n and key_of(n) == value[4:]:
                    out.append(n)
            return out[::-1]
        # many (a system prompt thousands of conversations continue): values sort by the
        # 4-byte big-endian count, then key, so seek once per distinct count and look up
        # key_of(n) there, not a step per snapshot
        found = True
        while found:
            n = int.from_bytes(cur.value()[:4], "big")
            if n >= below:
                break
            if n and cur.set_key_dup(link, n.to_bytes(4, "big") + key_of(n)):
                out.append(n)
            found = cur.set_range_dup(link, (n + 1).to_bytes(4, "big"))
        return out[::-1]

    def _items(self, db):
        # transactions are opened without buffers: keys and values are bytes already, and
        # the cursor iterates in C (a listing reads 100,000s of records through here)
        if self.dbs[db] is None:
            return iter(())
        return iter(self.txn.cursor(db=self.dbs[db]))

    def snapshots(self):
        return self._items("snap")

    def segments(self):
        return self._items("seg")

    def models(self):
        for k, v in self._items("model"):
            yield k.decode(errors="replace"), v

    def access_keys(self):
        return (bytes(k) for k in self.txn.cursor(db=self.dbs["acc"]).iternext(keys=True, values=False))

    def accesses(self):
        return self._items("acc")

    def snapshot_keys_from(self, start):
        """Snapshot keys in order from ``start`` (for resolving key prefixes)."""
        cur = self.txn.cursor(db=self.dbs["snap"])
        if cur.set_range(start):
            for k in cur.iternext(keys=True, values=False):
                yield bytes(k)

    def counter(self, name):
        raw = self.txn.get(name.encode(), db=self.dbs["meta"])
        return int(raw.decode()) if raw else 0

    def count(self, table):
        return self.txn.stat(self.dbs[TABLES[table]])["entries"]

    def file_digest(self, identity):
        return self._get("files", identity) if self.dbs["files"] is not None else None

    # ------------------------------------------------------------- writes
    def put_snapshot(self, key, raw):
        self.txn.put(key, raw, db=self.dbs["snap"])

    def delete_snapshot(self, key):
        self.txn.delete(key, db=self.dbs["snap"])

    def add_link(self, link, key):
        self.txn.put(link, key, db=self.dbs["thru"], dupdata=True)

    def remove_link(self, link, key):
        self.txn.delete(link, key, db=self.dbs["thru"])

    def add_end(self, link, n, key):
        self.txn.put(link, int(n).to_bytes(4, "big") + key, db=self.dbs["ends"], dupdata=True)

    def remove_end(self, link, n, key):
        self.txn.delete(link, int(n).to_bytes(4, "big") + key, db=self.dbs["ends"])

    def put_segment(self, seg_id, raw):
        self.txn.put(seg_id, raw, db=self.dbs["seg"])

    def delete_segment(self, seg_id):
        self.txn.delete(seg_id, db=self.dbs["seg"])

    def put_model(self, fingerprint, raw):
        self.txn.put(fingerprint.encode(), raw, db=self.dbs["model"])

    def put_access(self, key, raw):
        self.txn.put(key, raw, db=self.dbs["acc"])

    def delete_access(self, key):
        self.txn.delete(key, db=self.dbs["acc"])

    def add_counter(self, name, delta):
        value = self.counter(name)
        self.txn.put(name.encode(), str(max(0, value + delta)).encode(), db=self.dbs["meta"])

    def put_file_digest(self, identity, raw):
        if self.dbs["files"] is not None:
            self.txn.put(identity, raw, db=self.dbs["files"])


def _denied(exc):
    """True for an LMDB error that says the file may not be opened for writing."""
    import errno

    return getattr(exc, "errno", None) in (errno.EACCES, errno.EPERM, errno.EROFS) or any(
        text in str(exc) for text in ("Permission denied", "Operation not permitted", "Read-only file system"))


class LmdbIndex:
    """The ``Index`` of a local store: an LMDB environment in ``path``."""

    def __init__(self, path, map_size, readonly=False):
        self.path = str(path)
        self.map_size = map_size
        self.readonly = readonly
        self._pid = None
        self._env = None
        self._dbs = None
        self._lock = threading.Lock()
        self.env  # open now: fail early and clear stale readers

    def _open(self):
        key = (os.getpid(), os.path.realpath(self.path))
        with _OPEN_LOCK:
            shared = _OPEN.get(key)
            if shared is not None:
                if shared[0].flags()["readonly"] and not self.readonly:
                    raise StoreUnavailable(f"{self.path} is already open read-only in this process")
                shared[2] += 1
                self._env, self._dbs, self._pid = shared[0], shared[1], key[0]
                return
            self._open_new()
            _OPEN[key] = [self._env, self._dbs, 1]

    def _lmdb_open(self, lock):
        return lmdb.open(
            self.path, map_size=self.map_size, subdir=True, max_dbs=len(DBS) + 1,
            readonly=self.readonly, lock=lock, metasync=False, sync=True,
            readahead=False, max_readers=512, mode=0o600, create=not self.readonly,
        )

    def _open_new(self):
        try:
            try:
                env = self._lmdb_open(lock=True)
            except lmdb.Error as exc:
                # a read-only index whose lock file this process may not open (an immutable
                # or foreign-owned folder): read it lock-free, as LMDB does on a read-only mount
                if not (self.readonly and _denied(exc)):
                    raise
                env = self._lmdb_open(lock=False)
        except lmdb.Error as exc:
            raise StoreUnavailable(f"cannot open the index at {self.path}: {exc}") from exc
        try:
            env.reader_check()
        except lmdb.Error:
            pass
        dbs = {}
        for name in DBS:
            try:
                dbs[name] = env.open_db(name.encode(), create=not self.readonly, dupsort=name in DUPSORT,
                                        dupfixed=name in DUPSORT)
            except lmdb.NotFoundError:
                if name not in OPTIONAL:
                    raise StoreUnavailable(f"the index at {self.path} has no {name!r} database") from None
                dbs[name] = None
        self._env, self._dbs, self._pid = env, dbs, os.getpid()

    @property
    def env(self):
        """The process's environment (reopened in a forked child)."""
        if self._pid != os.getpid():
            # LMDB handles must not cross fork: open a fresh one in the child
            with self._lock:
                if self._pid != os.getpid():
                    self._env = None
                    self._open()
        return self._env

    @contextlib.contextmanager
    def read(self):
        """A read view (one LMDB read transaction)."""
        try:
            with self.env.begin() as txn:
                yield _View(txn, self._dbs)
        except lmdb.Error as exc:
            raise StoreUnavailable(f"cannot read the index: {type(exc).__name__}: {exc}") from exc

    def write(self, fn):
        """Run ``fn(view)`` in one write transaction; return its result."""
        try:
            with self.env.begin(write=True) as txn:
                return fn(_View(txn, self._dbs))
        except lmdb.Error as exc:
            raise StoreUnavailable(f"cannot write the index: {type(exc).__name__}: {exc}") from exc

    def clear_stale_readers(self):
        """Free reader slots of dead processes."""
        try:
            self.env.reader_check()
        except lmdb.Error:
            pass

    def usage(self):
        """``(map size, bytes of the map in use)``."""
        info, st = self.env.info(), self.env.stat()
        return info["map_size"], (info["last_pgno"] + 1) * st["psize"]

    def copy_compacted(self, fd):
        """Write a compacted copy of the environment to the open file ``fd``."""
        try:
            self.env.copyfd(fd, compact=True)
        except lmdb.Error as exc:
            raise StoreUnavailable(f"cannot copy the index: {exc}") from exc

    def close(self):
        if self._env is not None and self._pid == os.getpid():
            key = (self._pid, os.path.realpath(self.path))
            with _OPEN_LOCK:
                shared = _OPEN.get(key)
                if shared is not None and shared[0] is self._env:
                    shared[2] -= 1
                    if shared[2] == 0:
                        del _OPEN[key]
                        self._env.close()
        self._env = None
        self._pid = None
