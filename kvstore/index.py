"""The LMDB index: one environment per process, small transactions, msgpack records.

Databases:
  snap   snapshot key -> record (model, tier, tokens, layout, extents, state blob)
  thru   block link -> keys of snapshots whose tokens pass through that block (dupsort)
  ends   block link -> (length, key) of snapshots ending inside the next block (dupsort)
  seg    segment id -> shared positional-KV segment (rows, size, checksum, refs)
  acc    snapshot key -> (last access, hits), updated in batches
  model  fingerprint -> name, vocabulary size and cache layout signature
  files  weight file content identity -> its digest (fingerprints need not re-read weights)
  meta   counters and settings every process agrees on

This module owns the environment's life cycle (opened lazily after fork,
stale readers cleared on open) and record encoding. It never does blob I/O
or MLX work, so no write transaction waits on either.
"""

import os
import threading

import lmdb
import msgpack

from .errors import CorruptSnapshot, StoreUnavailable

DBS = ("snap", "thru", "ends", "seg", "acc", "model", "meta", "files")
# databases a store written by an older version may lack (opened read-only, they read as empty)
OPTIONAL = ("files",)
# LMDB allows one environment per file per process: stores opened twice
# on one path share it. (pid, path) -> [env, dbs, users]
_OPEN = {}
_OPEN_LOCK = threading.Lock()
DUPSORT = ("thru", "ends")


def pack(obj):
    return msgpack.packb(obj, use_bin_type=True)


def unpack(raw, what="record"):
    """Decode a msgpack record; anything malformed is ``CorruptSnapshot``."""
    try:
        obj = msgpack.unpackb(
            raw, raw=False, strict_map_key=False, max_bin_len=1 << 30, max_str_len=1 << 20,
            max_array_len=1 << 22, max_map_len=1 << 16,
        )
    except Exception as exc:  # msgpack raises a zoo of types on hostile input
        raise CorruptSnapshot(f"malformed {what}: {type(exc).__name__}") from exc
    if not isinstance(obj, dict):
        raise CorruptSnapshot(f"malformed {what}: not a map")
    return obj


class Index:
    """A per-process handle on the store's LMDB environment."""

    def __init__(self, path, map_size, readonly=False):
        self.path = str(path)
        self.map_size = map_size
        self.readonly = readonly
        self._pid = None
        self._env = None
        self._dbs = None
        self._lock = threading.Lock()

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

    def _open_new(self):
        try:
            env = lmdb.open(
                self.path, map_size=self.map_size, subdir=True, max_dbs=len(DBS) + 1,
                readonly=self.readonly, lock=True, metasync=False, sync=True,
                readahead=False, max_readers=512, mode=0o600, create=not self.readonly,
            )
        except lmdb.Error as exc:
            raise StoreUnavailable(f"cannot open the index at {self.path}: {exc}") from exc
        try:
            env.reader_check()
        except lmdb.Error:
            pass
        dbs = {}
        for name in DBS:
            try:
                dbs[name] = env.open_db(
                    name.encode(), create=not self.readonly, dupsort=name in DUPSORT,
                    dupfixed=name in DUPSORT,
                )
            except lmdb.NotFoundError:
                if name not in OPTIONAL:
                    raise StoreUnavailable(f"the index at {self.path} has no {name!r} database") from None
                dbs[name] = None
        self._env, self._dbs, self._pid = env, dbs, os.getpid()

    @property
    def env(self):
        if self._pid != os.getpid():
            # LMDB handles must not cross fork: open a fresh one in the child
            with self._lock:
                if self._pid != os.getpid():
                    self._env = None
                    self._open()
        return self._env

    def db(self, name):
        self.env
        return self._dbs[name]

    def begin(self, write=False):
        return self.env.begin(write=write)

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
