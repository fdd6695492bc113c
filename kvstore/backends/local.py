"""A store folder on this host: settings, an LMDB index and blob files.

    STORE/store.json     settings every process agrees on (format, block size, map size)
    STORE/CACHEDIR.TAG   backup tools skip the store
    STORE/index/         the LMDB index
    STORE/blobs/, tmp/, quarantine/

This module owns the folder's life cycle: creating it (0700) or checking it,
refusing links planted where the store keeps its parts, the settings, the
weight-digest cache and compacting the index. It opens everything relative
to the store's own descriptor and never follows a link.
"""

import json
import logging
import os
import stat
import time
from pathlib import Path

from ..blobs import FORMAT_VERSION, new_id
from ..errors import InvalidInput, StoreUnavailable
from ..records import pack, unpack
from .files import CLOEXEC, NOFOLLOW, FileBlobs, Folder, open_dir
from .lmdb_index import LmdbIndex

SETTINGS = "store.json"
DEFAULT_BLOCK = 64
DEFAULT_MAP_SIZE = 32 << 30
PARTS = ("blobs", "tmp", "quarantine", "index")
log = logging.getLogger("kvstore")
CACHEDIR_TAG = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# This file is a cache directory tag created by kvstore.\n"
    "# For information about cache directory tags see https://bford.info/cachedir/\n"
)


class LocalFolder:
    """The parts of one store folder: ``index`` (``LmdbIndex``), ``blobs``
    (``FileBlobs``), ``file_digests``, and the settings ``block`` and ``map_size``."""

    def __init__(self, path, *, map_size=None, block_tokens=None, readonly=False, fsync=True):
        self.path = Path(os.path.realpath(os.fspath(path)))
        if not readonly and not writable(self.path):
            # a warmed store shipped on a read-only volume (an image, a shared mount): serve hits from it
            log.warning("kvstore: %s is not writable: opened read-only (hits are served, nothing is written)",
                        self.path)
            readonly = True
        self.readonly, self.fsync = readonly, fsync
        self.folder = Folder(self.path)
        settings = self._open_root(map_size, block_tokens)
        self.block = settings["block_tokens"]
        self.map_size = settings["map_size"]
        self.index = LmdbIndex(self.path / "index", self.map_size, readonly=readonly)
        self.blobs = FileBlobs(self.folder, fsync)
        self.file_digests = FileDigests(self.index)

    @staticmethod
    def is_store(path):
        """True if ``path`` holds a store's settings file."""
        return (Path(path) / SETTINGS).is_file()

    def _open_root(self, map_size, block_tokens):
        if not self.readonly:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            root = self.folder.fd(".")
        except NotADirectoryError as exc:
            raise StoreUnavailable(f"{self.path} is not a directory") from exc
        except OSError as exc:
            raise StoreUnavailable(f"no kvstore store at {self.path}: {exc.strerror or exc}") from exc
        if not self.readonly:
            for sub in PARTS:
                try:
                    os.mkdir(sub, 0o700, dir_fd=root)
                except FileExistsError:
                    pass
        self._refuse_links(root)
        if not self.readonly and not self._exists("CACHEDIR.TAG"):
            self._write_new("CACHEDIR.TAG", CACHEDIR_TAG.encode())
        if not self._exists(SETTINGS):
            if self.readonly:
                raise StoreUnavailable(f"{self.path} is not a kvstore store (no {SETTINGS})")
            settings = {"format": FORMAT_VERSION, "block_tokens": int(block_tokens or DEFAULT_BLOCK),
                        "map_size": int(map_size or DEFAULT_MAP_SIZE), "created": time.time()}
            if settings["block_tokens"] < 1 or settings["map_size"] < (1 << 20):
                raise InvalidInput("block_tokens must be >= 1 and map_size >= 1 MiB")
            self._write_new(SETTINGS, json.dumps(settings, indent=1).encode())
        return self._read_settings(root)

    def _refuse_links(self, root):
        """LMDB follows links: a planted one must not move the index (or blobs) elsewhere."""
        for sub in PARTS + ("index/data.mdb", "index/lock.mdb"):
            try:
                st = os.stat(sub, dir_fd=root, follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StoreUnavailable(f"cannot use {self.path / sub}: {exc}") from exc
            is_file = sub.endswith(".mdb")
            ok = stat.S_ISREG(st.st_mode) and st.st_nlink == 1 if is_file else stat.S_ISDIR(st.st_mode)
            if not ok:
                raise StoreUnavailable(f"{self.path / sub} is a link or not a {'file' if is_file else 'folder'}")

    def _exists(self, name):
        try:
            os.stat(name, dir_fd=self.folder.fd("."), follow_symlinks=False)
            return True
        except FileNotFoundError:
            return False

    def _read_settings(self, root):
        spath = self.path / SETTINGS
        try:
            fd = os.open(SETTINGS, os.O_RDONLY | NOFOLLOW | CLOEXEC, dir_fd=root)
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
        """Create the file ``name`` in the root once, atomically, without
        replacing a concurrent winner or following a link."""
        root = self.folder.fd(".")
        tmp = f".{name}.{os.getpid()}.{new_id()[:8]}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW | CLOEXEC, 0o600, dir_fd=root)
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

    def compact_index(self, dest="index.compact"):
        """Write a compacted copy of the index to ``STORE/dest/data.mdb``; return its size.

        The folder and file are made 0700 / 0600 relative to the store's own
        descriptor; a link planted at either is refused, never followed. The
        copy is never swapped in under live processes.
        """
        if "/" in dest or dest in ("", ".", ".."):
            raise InvalidInput(f"not a folder name in the store: {dest!r}")
        root = self.folder.fd(".")
        try:
            os.mkdir(dest, 0o700, dir_fd=root)
        except FileExistsError:
            pass
        try:
            dfd = open_dir(dest, dir_fd=root)
        except OSError as exc:
            raise StoreUnavailable(f"{self.path / dest} is a link or not a folder") from exc
        try:
            try:
                os.unlink("data.mdb", dir_fd=dfd)
            except FileNotFoundError:
                pass
            fd = os.open("data.mdb", os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW | CLOEXEC, 0o600, dir_fd=dfd)
            try:
                self.index.copy_compacted(fd)
                os.fsync(fd)
                return os.fstat(fd).st_size
            finally:
                os.close(fd)
        finally:
            os.close(dfd)

    def disk_usage(self):
        """Bytes of the files in each part of the folder (links not followed)."""
        out = {}
        for sub in PARTS:
            total = 0
            for folder, _dirs, files in os.walk(self.path / sub):
                for name in files:
                    try:
                        total += os.lstat(os.path.join(folder, name)).st_size
                    except OSError:
                        pass
            out[sub] = total
        return out

    def index_file_bytes(self):
        try:
            return os.stat("index/data.mdb", dir_fd=self.folder.fd("."), follow_symlinks=False).st_size
        except OSError:
            return 0

    def close(self):
        self.folder.close()
        self.index.close()


def writable(path):
    """False if ``path`` is an existing store whose index this process cannot write (a
    read-only mount, an immutable folder, no write permission); True otherwise,
    including a store yet to be created. (A store whose index is writable but whose
    blob folders are not is a damaged one: its puts fail open.)"""
    if not LocalFolder.is_store(path):
        return True
    return all(os.access(p, os.W_OK) for p in (path, path / "index", path / "index" / "data.mdb")
               if os.path.lexists(p))


class FileDigests:
    """The store's cache of weight-file digests, for ``kvstore.fingerprint``.

    Keys are a file's content identity (``fingerprint.content_identity``),
    values its digest and the path it was read at, so every process that
    opens the store skips re-reading weights it has hashed before. A
    read-only store only reads the cache; a fault is logged and the digest
    is simply computed again next time.
    """

    def __init__(self, index):
        self._index = index

    def get(self, identity):
        """The digest recorded for ``identity``, or ``None``."""
        try:
            with self._index.read() as r:
                raw = r.file_digest(identity)
        except StoreUnavailable as exc:
            log.warning("kvstore: cannot read the weight-digest cache: %s", exc)
            return None
        if raw is None:
            return None
        try:
            digest = unpack(raw, "digest record").get("d")
        except Exception:
            return None
        return digest if isinstance(digest, bytes) else None

    def put(self, identity, digest, path=""):
        """Record ``digest`` for ``identity`` (nothing in a read-only store)."""
        if self._index.readonly:
            return
        raw = pack({"d": digest, "p": str(path), "t": time.time()})
        try:
            self._index.write(lambda w: w.put_file_digest(identity, raw))
        except StoreUnavailable as exc:
            log.warning("kvstore: cannot record a weight digest: %s", exc)
