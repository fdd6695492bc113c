"""Blob files: immutable safetensors, written safely, read defensively.

A blob is written under a fresh random name in ``tmp/``, fsynced, then
renamed into ``blobs/<xx>/<id>.safetensors``; only after that does the index
point at it. Every file is created 0600 in 0700 folders and is never opened
through a symlink or a hard link. The header carries kvstore's format
version and xxh3 checksums of fixed row chunks of every tensor, so a reader
can verify a prefix of a tensor without reading the rest.

This module parses nothing but safetensors headers (bounded JSON) and never
imports MLX: tensors come in and go out as numpy arrays and buffers.
"""

import errno
import json
import os
import secrets
import stat
import struct

import numpy as np
import xxhash

from .errors import CorruptSnapshot, FormatVersionError

FORMAT_VERSION = 1
CHUNK_ROWS = 256
MAX_HEADER = 16 << 20
SUFFIX = ".safetensors"
# bytes read at a time when a whole blob is verified
VERIFY_PIECE = 4 << 20

# safetensors dtype -> numpy container (bf16 travels as uint16 bits)
DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


def new_id():
    """A fresh random blob id (32 hex characters)."""
    return secrets.token_hex(16)


def is_blob_id(name):
    return len(name) == 32 and all(c in "0123456789abcdef" for c in name)


def blob_relpath(blob_id):
    return f"{blob_id[:2]}/{blob_id}{SUFFIX}"


def open_dir(path, dir_fd=None, create=False):
    """Open a directory without following a symlink; create it 0700 if asked."""
    if create:
        try:
            os.mkdir(path, 0o700, dir_fd=dir_fd)
        except FileExistsError:
            pass
    fd = os.open(path, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC, dir_fd=dir_fd)
    st = os.fstat(fd)
    if not stat.S_ISDIR(st.st_mode):
        os.close(fd)
        raise NotADirectoryError(path)
    return fd


def _row_view(arr, rows_axis):
    """View an array as (slices, rows, row_bytes) for chunked checksums."""
    if rows_axis is None or arr.ndim == 0:
        return arr.reshape(1, 1, -1).view(np.uint8)
    lead = int(np.prod(arr.shape[:rows_axis], dtype=np.int64))
    return arr.reshape(lead, arr.shape[rows_axis], -1).view(np.uint8)


def _chunk_sums(view, rows, chunk):
    """xxh3 of each row chunk, over every leading slice in order."""
    sums = []
    for start in range(0, max(rows, 1), chunk):
        h = xxhash.xxh3_64()
        for sl in view:
            h.update(sl[start : start + chunk])
        sums.append(h.intdigest())
    return sums


def write_blob(blobs_fd, tmp_fd, tensors, meta, fsync=True):
    """Write tensors as one safetensors blob and return ``(blob_id, size, header_sum)``.

    Args:
        blobs_fd, tmp_fd: directory fds of ``blobs/`` and ``tmp/``.
        tensors: ``{name: (dtype, array, rows_axis)}`` with a safetensors dtype
            name, a C-contiguous numpy array and the axis checksummed in row
            chunks (``None`` for one checksum over the whole tensor).
        meta: extra string metadata for the header.
    """
    blob_id = new_id()
    header, sums, offset = {}, {}, 0
    for name, (dtype, arr, rows_axis) in tensors.items():
        arr = np.ascontiguousarray(arr)
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        view = _row_view(arr, rows_axis)
        rows = view.shape[1]
        chunk = CHUNK_ROWS if rows_axis is not None else max(rows, 1)
        sums[name] = [rows_axis, chunk, "".join(f"{s:016x}" for s in _chunk_sums(view, rows, chunk))]
    header["__metadata__"] = {
        **{k: str(v) for k, v in meta.items()},
        "kvstore.format": str(FORMAT_VERSION),
        "kvstore.id": blob_id,
        "kvstore.sums": json.dumps(sums, separators=(",", ":")),
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp_name = f"{blob_id}.tmp"
    size = 8 + len(raw) + offset
    fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o600, dir_fd=tmp_fd)
    try:
        with os.fdopen(fd, "wb", buffering=0) as f:
            _write_all(fd, struct.pack("<Q", len(raw)))
            _write_all(fd, raw)
            for _, arr, _ in tensors.values():
                _write_all(fd, memoryview(np.ascontiguousarray(arr)).cast("B"))
            if os.fstat(fd).st_size != size:
                raise OSError(errno.EIO, f"blob {blob_id} is {os.fstat(fd).st_size} bytes after writing {size}")
            if fsync:
                os.fsync(f.fileno())
        sub = open_dir(blob_id[:2], dir_fd=blobs_fd, create=True)
        try:
            os.rename(tmp_name, f"{blob_id}{SUFFIX}", src_dir_fd=tmp_fd, dst_dir_fd=sub)
            if fsync:
                os.fsync(sub)
        finally:
            os.close(sub)
    except BaseException:
        try:
            os.unlink(tmp_name, dir_fd=tmp_fd)
        except OSError:
            pass
        raise
    return blob_id, size, xxhash.xxh3_64_intdigest(raw)


def _write_all(fd, data):
    """Write all of ``data`` or raise: a short write (a file-size limit, a disk
    filling up) must never leave a blob that looks complete to its writer."""
    mv = memoryview(data).cast("B")
    while len(mv):
        n = os.write(fd, mv)
        if n <= 0:
            raise OSError(errno.ENOSPC, "no progress writing a blob")
        mv = mv[n:]


def unlink_blob(blobs_fd, blob_id):
    """Remove a blob file; a file already gone is not an error."""
    try:
        sub = open_dir(blob_id[:2], dir_fd=blobs_fd)
    except OSError:
        return
    try:
        os.unlink(f"{blob_id}{SUFFIX}", dir_fd=sub)
    except FileNotFoundError:
        pass
    finally:
        os.close(sub)


class BlobReader:
    """A verified, read-only view of one blob file.

    Opening checks that the file is a regular file with one link, reached
    without symlinks, of the expected size, with a well-formed header of a
    known format version whose checksum matches the index. Tensor reads
    verify the row chunks they touch. Every failure is ``CorruptSnapshot``
    (or ``FormatVersionError``); a missing file is ``FileNotFoundError``.
    """

    def __init__(self, blobs_fd, blob_id, size=None, header_sum=None, *, name=None):
        if not is_blob_id(blob_id):
            raise CorruptSnapshot(f"bad blob id {blob_id!r}")
        self.id = blob_id
        self.bytes_read = 0
        # the blob in its place (blobs/<xx>/<id>), or a named file in the folder blobs_fd
        sub = open_dir(blob_id[:2], dir_fd=blobs_fd) if name is None else blobs_fd
        try:
            self.fd = os.open(name or f"{blob_id}{SUFFIX}", os.O_RDONLY | _NOFOLLOW | _CLOEXEC, dir_fd=sub)
        except OSError as exc:
            if exc.errno == getattr(os, "ELOOP", -1) or "symbolic" in str(exc).lower():
                raise CorruptSnapshot(f"blob {blob_id} is a symlink") from exc
            raise
        finally:
            if name is None:
                os.close(sub)
        try:
            self._parse(size, header_sum)
        except BaseException:
            os.close(self.fd)
            raise

    @classmethod
    def in_dir(cls, dir_fd, name, blob_id, size=None, header_sum=None):
        """A reader of blob ``blob_id`` stored under another ``name`` in the folder ``dir_fd`` (a temp file)."""
        return cls(dir_fd, blob_id, size, header_sum, name=name)

    def _parse(self, size, header_sum):
        st = os.fstat(self.fd)
        if not stat.S_ISREG(st.st_mode):
            raise CorruptSnapshot(f"blob {self.id} is not a regular file")
        if st.st_nlink != 1:
            raise CorruptSnapshot(f"blob {self.id} has {st.st_nlink} hard links")
        self.size = st.st_size
        if size is not None and st.st_size != size:
            raise CorruptSnapshot(f"blob {self.id} is {st.st_size} bytes, index says {size}")
        head = os.pread(self.fd, 8, 0)
        if len(head) < 8:
            raise CorruptSnapshot(f"blob {self.id} is truncated")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or n > self.size - 8:
            raise CorruptSnapshot(f"blob {self.id} claims a {n}-byte header")
        raw = os.pread(self.fd, n, 8)
        if header_sum is not None and xxhash.xxh3_64_intdigest(raw) != header_sum:
            raise CorruptSnapshot(f"blob {self.id} header checksum mismatch")
        try:
            header = json.loads(raw)
            meta = header.pop("__metadata__")
            version = int(meta["kvstore.format"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CorruptSnapshot(f"blob {self.id} has no valid kvstore header") from exc
        if version != FORMAT_VERSION:
            raise FormatVersionError(f"blob {self.id} has format version {version}")
        if meta.get("kvstore.id") != self.id:
            raise CorruptSnapshot(f"blob {self.id} header names another blob")
        try:
            sums = json.loads(meta["kvstore.sums"])
        except (ValueError, KeyError) as exc:
            raise CorruptSnapshot(f"blob {self.id} has no checksums") from exc
        self.meta = meta
        self.base = 8 + n
        data_len = self.size - self.base
        self.tensors = {}
        spans = []
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                start, end = (int(x) for x in info["data_offsets"])
                rows_axis, chunk, hexsums = sums[name]
            except (KeyError, TypeError, ValueError) as exc:
                raise CorruptSnapshot(f"blob {self.id}: bad entry for tensor {name!r}") from exc
            if any(d < 0 for d in shape) or not 0 <= start <= end <= data_len:
                raise CorruptSnapshot(f"blob {self.id}: tensor {name!r} out of bounds")
            nbytes = np.dtype(dtype).itemsize
            for d in shape:
                nbytes *= d
            if nbytes != end - start:
                raise CorruptSnapshot(f"blob {self.id}: tensor {name!r} size does not match its shape")
            if rows_axis is not None and not (isinstance(rows_axis, int) and 0 <= rows_axis < len(shape)):
                raise CorruptSnapshot(f"blob {self.id}: tensor {name!r} has a bad row axis")
            rows = shape[rows_axis] if rows_axis is not None else 1
            if not isinstance(chunk, int) or chunk < 1 or not isinstance(hexsums, str):
                raise CorruptSnapshot(f"blob {self.id}: tensor {name!r} has bad checksums")
            if len(hexsums) != 16 * max(1, -(-rows // chunk)):
                raise CorruptSnapshot(f"blob {self.id}: tensor {name!r} has the wrong number of checksums")
            self.tensors[name] = (info["dtype"], dtype, shape, start, rows_axis, chunk, hexsums)
            spans.append((start, end))
        spans.sort()
        pos = 0
        for start, end in spans:
            if start != pos:
                raise CorruptSnapshot(f"blob {self.id}: tensors overlap or leave gaps")
            pos = end
        if pos != data_len:
            raise CorruptSnapshot(f"blob {self.id}: data section is {data_len} bytes, tensors need {pos}")

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _readinto(self, buf, offset):
        mv = memoryview(buf).cast("B")
        got = os.preadv(self.fd, [mv], offset) if hasattr(os, "preadv") else None
        if got is None:
            data = os.pread(self.fd, len(mv), offset)
            got = len(data)
            mv[:got] = data
        self.bytes_read += got
        if got != len(mv):
            raise CorruptSnapshot(f"blob {self.id} is truncated")

    def shape(self, name):
        return self.tensors[name][2]

    def dtype(self, name):
        return self.tensors[name][0]

    def read(self, name):
        """Read and verify a whole tensor as a numpy array (bf16 as uint16)."""
        sdtype, dtype, shape, start, rows_axis, chunk, hexsums = self._entry(name)
        out = np.empty(shape, dtype=dtype)
        if out.nbytes:
            self._readinto(out, self.base + start)
        view = _row_view(out, rows_axis)
        self._check(name, view, 0, view.shape[1], chunk, hexsums)
        return out

    def read_rows(self, name, rows, out):
        """Read rows ``[0, rows)`` of a 4-D tensor along axis 2 into ``out``.

        ``out`` is a writable numpy array of shape ``(B*H, rows, X)`` in the
        tensor's container dtype (rows contiguous per slice). Only the row
        chunks that cover ``rows`` are read and verified.
        """
        sdtype, dtype, shape, start, rows_axis, chunk, hexsums = self._entry(name)
        if rows_axis != 2 or len(shape) != 4:
            raise CorruptSnapshot(f"blob {self.id}: tensor {name!r} is not row-chunked")
        lead, total, width = shape[0] * shape[1], shape[2], shape[3]
        if rows > total or out.shape != (lead, rows, width) or out.dtype != np.dtype(dtype):
            raise CorruptSnapshot(f"blob {self.id}: tensor {name!r} does not fit {out.shape}")
        covered = min(total, -(-rows // chunk) * chunk)
        row_bytes = width * out.itemsize
        extra = np.empty((lead, covered - rows, width), dtype=dtype) if covered > rows else None
        for i in range(lead):
            off = self.base + start + i * total * row_bytes
            if rows:
                self._readinto(out[i], off)
            if extra is not None:
                self._readinto(extra[i], off + rows * row_bytes)
        nchunks = -(-covered // chunk) if covered else 0
        for c in range(nchunks):
            lo, hi = c * chunk, min((c + 1) * chunk, covered)
            h = xxhash.xxh3_64()
            for i in range(lead):
                if lo < rows:
                    h.update(out[i, lo : min(hi, rows)])
                if hi > rows:
                    h.update(extra[i, max(lo, rows) - rows : hi - rows])
            if f"{h.intdigest():016x}" != hexsums[16 * c : 16 * c + 16]:
                raise CorruptSnapshot(f"blob {self.id}: tensor {name!r} rows {lo}-{hi} checksum mismatch")

    def verify(self, piece=VERIFY_PIECE):
        """Read and verify every tensor, ``piece`` bytes at a time (memory stays
        bounded whatever the tensor sizes); raise ``CorruptSnapshot`` on the first fault."""
        buf = bytearray(piece)
        for name, (_sd, dtype, shape, start, rows_axis, chunk, hexsums) in self.tensors.items():
            itemsize = np.dtype(dtype).itemsize
            if rows_axis is None or not shape:
                nbytes = itemsize * int(np.prod(shape, dtype=np.int64))
                chunks = [[(self.base + start, nbytes)]]
            else:
                lead = int(np.prod(shape[:rows_axis], dtype=np.int64))
                total = shape[rows_axis]
                row_bytes = itemsize * int(np.prod(shape[rows_axis + 1:], dtype=np.int64))
                chunks = [
                    [(self.base + start + (i * total + lo) * row_bytes, (min(lo + chunk, total) - lo) * row_bytes)
                     for i in range(lead)]
                    for lo in range(0, max(total, 1), chunk)
                ]
            for c, spans in enumerate(chunks):
                h = xxhash.xxh3_64()
                for offset, length in spans:
                    self._hash_span(h, buf, offset, length)
                if f"{h.intdigest():016x}" != hexsums[16 * c : 16 * c + 16]:
                    raise CorruptSnapshot(f"blob {self.id}: tensor {name!r} chunk {c} checksum mismatch")

    def _hash_span(self, h, buf, offset, length):
        mv = memoryview(buf)
        while length > 0:
            n = min(length, len(buf))
            self._readinto(mv[:n], offset)
            h.update(mv[:n])
            offset += n
            length -= n

    def _entry(self, name):
        try:
            return self.tensors[name]
        except KeyError:
            raise CorruptSnapshot(f"blob {self.id} has no tensor {name!r}") from None

    def _check(self, name, view, lo, hi, chunk, hexsums):
        for c, s in enumerate(_chunk_sums(view, hi - lo, chunk)):
            if f"{s:016x}" != hexsums[16 * c : 16 * c + 16]:
                raise CorruptSnapshot(f"blob {self.id}: tensor {name!r} chunk {c} checksum mismatch")
