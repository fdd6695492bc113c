"""Blob files in a store folder: written safely, opened without following links.

A blob is written under a fresh random name in ``tmp/``, fsynced, then
renamed into ``blobs/<xx>/<id>.safetensors``; only after that may an index
point at it. Every file is created 0600 in 0700 folders and opened relative
to the store's own directory descriptors, never through a symlink or a
file with more than one hard link. This module owns those descriptors
(per process: they must not cross a fork) and the files; it knows nothing
of indexes or caches.
"""

import errno
import os
import stat
import sys

from ..blobs import SUFFIX, BlobReader, Layout, is_blob_id, new_id
from ..errors import CorruptSnapshot
from ..records import BlobRef

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
CLOEXEC = getattr(os, "O_CLOEXEC", 0)
DIRECTORY = getattr(os, "O_DIRECTORY", 0)
# buffers per pwritev (POSIX guarantees at least 16; Linux and macOS take 1024)
IOV_MAX = 512


def open_dir(path, dir_fd=None, create=False):
    """Open a directory without following a symlink; create it 0700 if asked."""
    if create:
        try:
            os.mkdir(path, 0o700, dir_fd=dir_fd)
        except FileExistsError:
            pass
    fd = os.open(path, os.O_RDONLY | DIRECTORY | NOFOLLOW | CLOEXEC, dir_fd=dir_fd)
    st = os.fstat(fd)
    if not stat.S_ISDIR(st.st_mode):
        os.close(fd)
        raise NotADirectoryError(path)
    return fd


def blob_relpath(blob_id):
    """A blob's path relative to ``blobs/``."""
    return f"{blob_id[:2]}/{blob_id}{SUFFIX}"


class Folder:
    """Directory descriptors of a store root (``"."``) and its folders, per process."""

    def __init__(self, path):
        self.path = path
        self._fds, self._pid = {}, None

    def fd(self, name="."):
        """The descriptor of the root or one of its folders, opened without following links."""
        if self._pid != os.getpid():
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(name)
        if fd is None:
            fd = open_dir(str(self.path)) if name == "." else open_dir(name, dir_fd=self.fd("."))
            self._fds[name] = fd
        return fd

    def close(self):
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}


class FileSource:
    """A ``BlobReader`` source over an open blob file (checked: regular, one link)."""

    def __init__(self, fd, blob_id):
        self.fd = fd
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CorruptSnapshot(f"blob {blob_id} is not a regular file")
        if st.st_nlink != 1:
            raise CorruptSnapshot(f"blob {blob_id} has {st.st_nlink} hard links")
        self.size = st.st_size

    def readinto(self, mv, offset):
        return self.readv([mv], offset)

    def readv(self, bufs, offset):
        """Fill ``bufs`` in order from ``offset``; the bytes read (short only at the end of the file)."""
        got, want = 0, sum(len(b) for b in bufs)
        while got < want:
            if hasattr(os, "preadv"):
                n = os.preadv(self.fd, _after(bufs, got), offset + got)
            else:
                mv = _after(bufs, got)[0]
                data = os.pread(self.fd, len(mv), offset + got)
                mv[: len(data)] = data
                n = len(data)
            if n <= 0:
                break
            got += n
        return got

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _after(bufs, skip):
    """``bufs`` without their first ``skip`` bytes (after a short read)."""
    out = []
    for b in bufs:
        if skip >= len(b):
            skip -= len(b)
            continue
        out.append(memoryview(b).cast("B")[skip:] if skip else b)
        skip = 0
    return out


def _write_all(fd, data):
    """Write all of ``data`` or raise: a short write (a file-size limit, a disk
    filling up) must never leave a blob that looks complete to its writer."""
    mv = memoryview(data).cast("B")
    while len(mv):
        n = os.write(fd, mv)
        if n <= 0:
            raise OSError(errno.ENOSPC, "no progress writing a blob")
        mv = mv[n:]


def _write_data(fd, lay, writeback=True):
    """Write a laid-out blob to ``fd``; return its header.

    The data goes out in batches of pieces (one ``writev`` each, no joined
    copy), each checksummed just before it is written; with ``writeback`` the
    disk starts on a batch while the next is copied (``_start_writeback``),
    so the fsync that follows has little left to wait for. The header, whose
    length does not depend on the checksums, is written last, at the start of
    the file.
    """
    offset = lay.data_offset
    for batch in lay.batches():
        _writev_all(fd, batch, offset)
        n = sum(len(b) for b in batch)
        if writeback:
            _start_writeback(fd, offset, n)
        offset += n
    head = lay.head()
    _writev_all(fd, [head], 0)
    size = os.fstat(fd).st_size
    if size != lay.size:
        raise OSError(errno.EIO, f"blob {lay.blob_id} is {size} bytes after writing {lay.size}")
    return head


def _writev_all(fd, bufs, offset):
    """Write ``bufs`` in order at ``offset`` or raise: a short write (a file-size
    limit, a disk filling up) must never leave a blob that looks complete."""
    want = sum(len(b) for b in bufs)
    done = 0
    while done < want:
        rest = _after(bufs, done)
        if hasattr(os, "pwritev"):
            n = os.pwritev(fd, rest[:IOV_MAX], offset + done)
        else:
            n = os.pwrite(fd, rest[0], offset + done)
        if n <= 0:
            raise OSError(errno.ENOSPC, "no progress writing a blob")
        done += n


def _writeback_call():
    """Linux's ``sync_file_range`` (through libc), or ``None`` where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _writeback_call()
SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd, offset, length):
    """Have the kernel start writing a range just written to the disk, without
    waiting for it: the fsync that makes the blob durable then waits for less.
    A hint only; its result is ignored (the fsync reports real errors)."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def _sync_file(fd):
    """Make a written blob durable (its own stage, so benchmarks can time it)."""
    os.fsync(fd)


def _place(folder, tmp_name, blob_id, fsync):
    """Rename a written temp file into ``blobs/<xx>/`` (and fsync that folder, and
    ``blobs/`` too when the subfolder is new)."""
    blobs_fd = folder.fd("blobs")
    try:
        os.mkdir(blob_id[:2], 0o700, dir_fd=blobs_fd)
        created = True
    except FileExistsError:
        created = False
    sub = open_dir(blob_id[:2], dir_fd=blobs_fd)
    try:
        os.rename(tmp_name, f"{blob_id}{SUFFIX}", src_dir_fd=folder.fd("tmp"), dst_dir_fd=sub)
        if fsync:
            os.fsync(sub)
            if created:  # the new folder's own entry, once per folder
                os.fsync(blobs_fd)
    finally:
        os.close(sub)


class FileBlobs:
    """The ``Blobs`` of a store folder: ``blobs/<xx>/<id>.safetensors`` written through ``tmp/``."""

    def __init__(self, folder, fsync=True):
        self.folder = folder
        self.fsync = fsync

    def write(self, tensors, meta):
        """Write a new blob (tmp, fsync, rename) and return its ``BlobRef``."""
        lay = Layout(tensors, meta)
        blob_id, tmp_fd = lay.blob_id, self.folder.fd("tmp")
        tmp_name = f"{blob_id}.tmp"
        fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW | CLOEXEC, 0o600, dir_fd=tmp_fd)
        try:
            try:
                head = _write_data(fd, lay, writeback=self.fsync)
                if self.fsync:
                    _sync_file(fd)
            finally:
                os.close(fd)
            _place(self.folder, tmp_name, blob_id, self.fsync)
        except BaseException:
            try:
                os.unlink(tmp_name, dir_fd=tmp_fd)
            except OSError:
                pass
            raise
        return BlobRef(bytes.fromhex(blob_id), lay.size, lay.header_sum(head))

    def _open_fd(self, blob_id):
        if not is_blob_id(blob_id):
            raise CorruptSnapshot(f"bad blob id {blob_id!r}")
        sub = open_dir(blob_id[:2], dir_fd=self.folder.fd("blobs"))
        try:
            return os.open(f"{blob_id}{SUFFIX}", os.O_RDONLY | NOFOLLOW | CLOEXEC, dir_fd=sub)
        except OSError as exc:
            if exc.errno == getattr(os, "ELOOP", -1) or "symbolic" in str(exc).lower():
                raise CorruptSnapshot(f"blob {blob_id} is a symlink") from exc
            raise
        finally:
            os.close(sub)

    def open(self, blob_id, size=None, header_sum=None):
        """A verified ``BlobReader`` of a blob in place."""
        return _reader(self._open_fd(blob_id), blob_id, size, header_sum)

    def open_temp(self, name, blob_id, size=None, header_sum=None):
        """A ``BlobReader`` of a blob still under its temp ``name`` in ``tmp/`` (an import)."""
        fd = os.open(name, os.O_RDONLY | NOFOLLOW | CLOEXEC, dir_fd=self.folder.fd("tmp"))
        return _reader(fd, blob_id, size, header_sum)

    def open_file(self, blob_id):
        """The blob's file, opened for reading as it is (an export copies it)."""
        return os.fdopen(self._open_fd(blob_id), "rb")

    def exists(self, blob_id):
        try:
            sub = open_dir(blob_id[:2], dir_fd=self.folder.fd("blobs"))
        except OSError:
            return False
        try:
            os.stat(f"{blob_id}{SUFFIX}", dir_fd=sub, follow_symlinks=False)
            return True
        except FileNotFoundError:
            return False
        finally:
            os.close(sub)

    def unlink(self, blob_id):
        try:
            sub = open_dir(blob_id[:2], dir_fd=self.folder.fd("blobs"))
        except OSError:
            return
        try:
            os.unlink(f"{blob_id}{SUFFIX}", dir_fd=sub)
        except FileNotFoundError:
            pass
        finally:
            os.close(sub)

    def read_bytes(self, blob_id, size):
        """The blob file's bytes (at most ``size``), unchecked."""
        with self.open_file(blob_id) as f:
            return f.read(size)

    def write_bytes(self, blob_id, data):
        """Write ``data`` as blob ``blob_id`` (tmp, fsync, rename); a blob already in place is kept."""
        if not is_blob_id(blob_id):
            raise CorruptSnapshot(f"bad blob id {blob_id!r}")
        tmp_fd = self.folder.fd("tmp")
        tmp_name = f"{blob_id}.copy.{new_id()[:8]}"
        fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW | CLOEXEC, 0o600, dir_fd=tmp_fd)
        try:
            try:
                _write_all(fd, data)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if not self.exists(blob_id):
                self.adopt(tmp_name, blob_id)
        finally:
            self.remove_temp(tmp_name)

    def adopt(self, tmp_name, blob_id):
        """Move a verified temp file into place as blob ``blob_id`` (an import)."""
        sub = open_dir(blob_id[:2], dir_fd=self.folder.fd("blobs"), create=True)
        try:
            os.rename(tmp_name, f"{blob_id}{SUFFIX}", src_dir_fd=self.folder.fd("tmp"), dst_dir_fd=sub)
        finally:
            os.close(sub)

    def quarantine(self, blob_id):
        """Move a blob to ``quarantine/``; True if it was moved."""
        try:
            sub = open_dir(blob_id[:2], dir_fd=self.folder.fd("blobs"))
        except OSError:
            return False
        try:
            os.rename(f"{blob_id}{SUFFIX}", f"{blob_id}{SUFFIX}", src_dir_fd=sub,
                      dst_dir_fd=self.folder.fd("quarantine"))
            return True
        except OSError:
            return False
        finally:
            os.close(sub)

    def listing(self):
        """Every entry under ``blobs/``: ``(subfolder, name, lstat or None)``; a
        subfolder that is not a folder comes as ``(name, None, None)``."""
        blobs_fd = self.folder.fd("blobs")
        for sub in os.listdir(blobs_fd):
            try:
                sfd = open_dir(sub, dir_fd=blobs_fd)
            except OSError:
                yield sub, None, None
                continue
            try:
                for name in os.listdir(sfd):
                    try:
                        yield sub, name, os.stat(name, dir_fd=sfd, follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # deleted by another process since the listing
            finally:
                os.close(sfd)

    def remove_file(self, sub, name):
        """Remove ``blobs/sub/name`` (an orphan gc found); gone already is fine."""
        try:
            sfd = open_dir(sub, dir_fd=self.folder.fd("blobs"))
        except OSError:
            return
        try:
            os.unlink(name, dir_fd=sfd)
        except FileNotFoundError:
            pass
        finally:
            os.close(sfd)

    def temp_files(self):
        """``(name, lstat)`` of every file in ``tmp/``."""
        tmp_fd = self.folder.fd("tmp")
        for name in os.listdir(tmp_fd):
            try:
                yield name, os.stat(name, dir_fd=tmp_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue

    def remove_temp(self, name):
        try:
            os.unlink(name, dir_fd=self.folder.fd("tmp"))
        except FileNotFoundError:
            pass


def _reader(fd, blob_id, size, header_sum):
    try:
        source = FileSource(fd, blob_id)
    except BaseException:
        os.close(fd)
        raise
    return BlobReader(source, blob_id, size, header_sum)
