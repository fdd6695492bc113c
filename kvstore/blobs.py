"""The blob format: immutable safetensors with kvstore's header, read defensively.

A blob is a plain safetensors file whose ``__metadata__`` carries kvstore's
format version, the blob's own id and xxh3 checksums of fixed row chunks of
every tensor, so a reader can verify a prefix of a tensor without reading
the rest. ``encode`` lays a blob out; ``BlobReader`` parses and verifies one
from any byte source (a file, bytes fetched from a remote), checking every
offset, size and checksum before it hands a byte out.

This module parses nothing but safetensors headers (bounded JSON), does no
I/O of its own and never imports MLX: tensors come in and go out as numpy
arrays and buffers. Where blobs live is the backends' business.
"""

import json
import secrets
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
# bytes of rows read before they are checksummed (they are still in the CPU's cache)
GROUP_BYTES = 2 << 20
# buffers per preadv (POSIX guarantees at least 16; Linux and macOS take 1024)
IOV_BATCH = 512
# bytes of pieces a writer is handed at a time (checksummed just before, so still in the CPU's cache)
BATCH_BYTES = 2 << 20

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


def new_id():
    """A fresh random blob id (32 hex characters)."""
    return secrets.token_hex(16)


def is_blob_id(name):
    """True for a 32-hex-digit blob id."""
    return isinstance(name, str) and len(name) == 32 and not name.strip("0123456789abcdef")


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


def _slices(arr, rows_axis):
    """``arr`` as C-contiguous pieces in file order, without copying where it can be
    avoided: a ``(B, H, T, X)`` slice of a larger buffer (a KV cache's rows) is
    contiguous per (B, H) slice even when the whole is not."""
    if arr.flags.c_contiguous:
        return [arr]
    if rows_axis == 2 and arr.ndim == 4 and arr[0, 0].flags.c_contiguous:
        return [arr[b, h] for b in range(arr.shape[0]) for h in range(arr.shape[1])]
    return [np.ascontiguousarray(arr)]


def _sum_piece(hashers, piece, rows_axis, shape, n_pieces):
    """Feed one piece of a tensor (the whole tensor, or one leading slice of
    ``n_pieces``) to its chunk hashers, slice by slice; each hasher sees its
    rows in file order, as ``_chunk_sums`` feeds them."""
    if rows_axis is None or not shape:
        hashers[0].update(memoryview(piece).cast("B"))
        return
    rows = shape[rows_axis]
    view = _row_view(piece, rows_axis) if n_pieces == 1 else [piece.reshape(rows, -1).view(np.uint8)]
    for sl in view:
        for c, h in enumerate(hashers):
            h.update(sl[c * CHUNK_ROWS : (c + 1) * CHUNK_ROWS])


def _sum_count(rows_axis, shape):
    """How many checksums a tensor has: one per row chunk, or one over it all."""
    if rows_axis is None or not shape:
        return 1
    return max(1, -(-shape[rows_axis] // CHUNK_ROWS))


class Layout:
    """A blob laid out for writing: the tensors' pieces in file order (no copy of
    the tensors), their checksums once ``sum()`` has run, and the header.

    The header's length does not depend on the checksums (fixed-width hex), so
    ``data_offset`` is known before they are computed: a writer writes the data
    as ``batches()`` checksums it, and the header last.
    """

    def __init__(self, tensors, meta, blob_id=None):
        self.blob_id = blob_id or new_id()
        self.meta = {k: str(v) for k, v in meta.items()}
        self.entries, self.pieces, offset = {}, [], 0
        for name, (dtype, arr, rows_axis) in tensors.items():
            arr = np.asarray(arr)
            if arr.ndim == 0:
                arr = arr.reshape(1)  # stored as one element, as earlier versions wrote it
            parts = _slices(arr, rows_axis)
            nbytes = sum(p.nbytes for p in parts)
            self.entries[name] = (dtype, list(arr.shape), offset, rows_axis, parts, arr.dtype.itemsize)
            self.pieces += [memoryview(p).cast("B") for p in parts if p.nbytes]
            offset += nbytes
        self.data_bytes = offset
        self.sums = None
        self.data_offset = len(self.head(placeholder=True))
        self.size = self.data_offset + offset

    def sum(self):
        """Compute every tensor's chunk checksums (reads the data once)."""
        for _ in self.batches():
            pass

    def batches(self, limit=BATCH_BYTES):
        """The data pieces in file order, in lists of about ``limit`` bytes (at
        least one piece each); a piece is checksummed just before it is handed
        out, so a writer's copy reads it from the CPU's cache. ``sums`` is
        complete once every batch has been taken."""
        sums, batch, size = {}, [], 0
        for name, (_dt, shape, _off, rows_axis, parts, _isz) in self.entries.items():
            hashers = [xxhash.xxh3_64() for _ in range(_sum_count(rows_axis, shape))]
            for part in parts:
                _sum_piece(hashers, part, rows_axis, shape, len(parts))
                if not part.nbytes:
                    continue
                batch.append(memoryview(part).cast("B"))
                size += part.nbytes
                if size >= limit:
                    yield batch
                    batch, size = [], 0
            sums[name] = [rows_axis, CHUNK_ROWS if rows_axis is not None else 1,
                          "".join(f"{h.intdigest():016x}" for h in hashers)]
        if batch:
            yield batch
        self.sums = sums

    def head(self, placeholder=False):
        """The length prefix and JSON header (checksums as zeros with ``placeholder``)."""
        header = {}
        sums = {}
        for name, (dtype, shape, offset, rows_axis, parts, _isz) in self.entries.items():
            nbytes = sum(p.nbytes for p in parts)
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
            if placeholder:
                sums[name] = [rows_axis, CHUNK_ROWS if rows_axis is not None else 1,
                              "0" * 16 * _sum_count(rows_axis, shape)]
        header["__metadata__"] = {
            **self.meta,
            "kvstore.format": str(FORMAT_VERSION),
            "kvstore.id": self.blob_id,
            "kvstore.sums": json.dumps(sums if placeholder else self.sums, separators=(",", ":")),
        }
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw

    def header_sum(self, head):
        return xxhash.xxh3_64_intdigest(head[8:])


class Encoded:
    """A blob ready to write: ``head`` (length prefix and JSON header) then the
    data ``pieces`` in order make ``size`` bytes."""

    __slots__ = ("blob_id", "head", "pieces", "size", "header_sum")

    def __init__(self, blob_id, head, pieces, size, header_sum):
        self.blob_id, self.head, self.pieces, self.size, self.header_sum = blob_id, head, pieces, size, header_sum

    def buffers(self):
        """The blob's bytes as a list of buffers (no copy of the tensors)."""
        return [self.head] + list(self.pieces)


def encode(tensors, meta, blob_id=None):
    """Lay out ``tensors`` as one blob, checksums computed.

    Args:
        tensors: ``{name: (dtype, array, rows_axis)}`` with a safetensors dtype
            name, a numpy array and the axis checksummed in row chunks
            (``None`` for one checksum over the whole tensor).
        meta: extra string metadata for the header.
        blob_id: the id to give it (default: a fresh random one).
    """
    lay = Layout(tensors, meta, blob_id)
    lay.sum()
    head = lay.head()
    return Encoded(lay.blob_id, head, lay.pieces, lay.size, lay.header_sum(head))


class Source:
    """Where a ``BlobReader`` reads from: a subclass gives ``readinto(mv, offset)``
    (bytes copied into ``mv`` from ``offset``, fewer at the end) and ``close()``."""

    def readv(self, bufs, offset):
        """Fill ``bufs`` in order from ``offset``; the bytes copied (fewer at the end)."""
        got = 0
        for mv in bufs:
            n = self.readinto(mv, offset + got)
            got += n
            if n < len(mv):
                break
        return got


class BytesSource(Source):
    """A blob's bytes held in memory, as a ``BlobReader`` source."""

    def __init__(self, data):
        self.data = memoryview(data).cast("B")
        self.size = len(self.data)

    def readinto(self, mv, offset):
        n = max(0, min(len(mv), self.size - offset))
        mv[:n] = self.data[offset : offset + n]
        return n


    def close(self):
        self.data = memoryview(b"")


class BlobReader:
    """A verified, read-only view of one blob.

    ``source`` gives the bytes (``size``, ``readinto(buffer, offset) -> n``,
    ``close()``). Opening checks the size against the index, the header's
    bounds, format version, own id and checksum; tensor reads verify the row
    chunks they touch. Every failure is ``CorruptSnapshot`` (or
    ``FormatVersionError``). The reader owns and closes the source.
    """

    def __init__(self, source, blob_id, size=None, header_sum=None):
        self.source = source
        self.id = blob_id
        self.bytes_read = 0
        try:
            if not is_blob_id(blob_id):
                raise CorruptSnapshot(f"bad blob id {blob_id!r}")
            self._parse(size, header_sum)
        except BaseException:
            source.close()
            raise

    def _parse(self, size, header_sum):
        self.size = self.source.size
        if size is not None and self.size != size:
            raise CorruptSnapshot(f"blob {self.id} is {self.size} bytes, index says {size}")
        head = bytearray(8)
        if self.source.readinto(memoryview(head), 0) < 8:
            raise CorruptSnapshot(f"blob {self.id} is truncated")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or n > self.size - 8:
            raise CorruptSnapshot(f"blob {self.id} claims a {n}-byte header")
        raw = bytearray(n)
        if self.source.readinto(memoryview(raw), 8) < n:
            raise CorruptSnapshot(f"blob {self.id} is truncated")
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
        self.tensors = {}
        self._index(header, sums)

    def _index(self, header, sums):
        data_len = self.size - self.base
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
        self.source.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _readinto(self, buf, offset):
        mv = memoryview(buf).cast("B")
        got = self.source.readinto(mv, offset)
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
        for c, s in enumerate(_chunk_sums(view, view.shape[1], chunk)):
            if f"{s:016x}" != hexsums[16 * c : 16 * c + 16]:
                raise CorruptSnapshot(f"blob {self.id}: tensor {name!r} chunk {c} checksum mismatch")
        return out

    def read_into(self, name, out):
        """Read and verify a whole tensor into ``out``, a writable C-contiguous
        array of its shape in its container dtype (bf16 as uint16); each chunk
        is checksummed right after it is read."""
        sdtype, dtype, shape, start, rows_axis, chunk, hexsums = self._entry(name)
        if out.shape != shape or out.dtype != np.dtype(dtype) or not out.flags.c_contiguous:
            raise CorruptSnapshot(f"blob {self.id}: tensor {name!r} does not fit {out.shape} {out.dtype}")
        if rows_axis == 2 and len(shape) == 4:
            return self.read_rows(name, shape[2], out.reshape(shape[0] * shape[1], shape[2], shape[3]))
        if out.nbytes:
            self._readinto(out, self.base + start)
        view = _row_view(out, rows_axis)
        for c, s in enumerate(_chunk_sums(view, view.shape[1], chunk)):
            if f"{s:016x}" != hexsums[16 * c : 16 * c + 16]:
                raise CorruptSnapshot(f"blob {self.id}: tensor {name!r} chunk {c} checksum mismatch")

    def read_rows(self, name, rows, out):
        """Read rows ``[0, rows)`` of a 4-D tensor along axis 2 into ``out``.

        ``out`` is a writable numpy array of shape ``(B*H, rows, X)`` in the
        tensor's container dtype (rows contiguous per slice). Only the row
        chunks that cover ``rows`` are read and verified, a group of slices at
        a time (one ``preadv`` where the rows are contiguous in the blob),
        each checksummed while it is still in the CPU's cache.
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
        hashers = [xxhash.xxh3_64() for _ in range(-(-covered // chunk) if covered else 0)]
        group = max(1, GROUP_BYTES // max(1, covered * row_bytes))
        for g0 in range(0, lead, group):
            g1 = min(lead, g0 + group)
            self._read_slices(out, extra, g0, g1, rows, total, row_bytes, self.base + start)
            for i in range(g0, g1):
                for c, h in enumerate(hashers):
                    lo, hi = c * chunk, min((c + 1) * chunk, covered)
                    if lo < rows:
                        h.update(out[i, lo : min(hi, rows)])
                    if hi > rows:
                        h.update(extra[i, max(lo, rows) - rows : hi - rows])
        for c, h in enumerate(hashers):
            if f"{h.intdigest():016x}" != hexsums[16 * c : 16 * c + 16]:
                lo, hi = c * chunk, min((c + 1) * chunk, covered)
                raise CorruptSnapshot(f"blob {self.id}: tensor {name!r} rows {lo}-{hi} checksum mismatch")

    def _read_slices(self, out, extra, g0, g1, rows, total, row_bytes, base):
        """Rows ``[0, covered)`` of slices ``g0..g1`` into ``out`` (and ``extra`` past ``rows``)."""
        covered = rows + (extra.shape[1] if extra is not None else 0)
        if covered == total:  # whole slices: one contiguous span of the blob
            bufs = []
            for i in range(g0, g1):
                if rows:
                    bufs.append(memoryview(out[i]).cast("B"))
                if extra is not None and extra.shape[1]:
                    bufs.append(memoryview(extra[i]).cast("B"))
            self._readv(bufs, base + g0 * total * row_bytes)
            return
        for i in range(g0, g1):
            off = base + i * total * row_bytes
            if rows:
                self._readinto(out[i], off)
            if extra is not None:
                self._readinto(extra[i], off + rows * row_bytes)

    def _readv(self, bufs, offset):
        for k in range(0, len(bufs), IOV_BATCH):
            part = bufs[k : k + IOV_BATCH]
            want = sum(len(b) for b in part)
            got = self.source.readv(part, offset)
            self.bytes_read += got
            if got != want:
                raise CorruptSnapshot(f"blob {self.id} is truncated")
            offset += want

    def verify(self, piece=VERIFY_PIECE):
        """Read and verify every tensor, ``piece`` bytes at a time (memory stays
        bounded whatever the tensor sizes); raise ``CorruptSnapshot`` on the first fault."""
        buf = bytearray(piece)
        for name, (_sd, dtype, shape, start, rows_axis, chunk, hexsums) in self.tensors.items():
            for c, spans in enumerate(self._chunk_spans(dtype, shape, start, rows_axis, chunk)):
                h = xxhash.xxh3_64()
                for offset, length in spans:
                    self._hash_span(h, buf, offset, length)
                if f"{h.intdigest():016x}" != hexsums[16 * c : 16 * c + 16]:
                    raise CorruptSnapshot(f"blob {self.id}: tensor {name!r} chunk {c} checksum mismatch")

    def _chunk_spans(self, dtype, shape, start, rows_axis, chunk):
        """Per checksum chunk, the (offset, length) byte spans it covers, in hashing order."""
        itemsize = np.dtype(dtype).itemsize
        if rows_axis is None or not shape:
            return [[(self.base + start, itemsize * int(np.prod(shape, dtype=np.int64)))]]
        lead = int(np.prod(shape[:rows_axis], dtype=np.int64))
        total = shape[rows_axis]
        row_bytes = itemsize * int(np.prod(shape[rows_axis + 1:], dtype=np.int64))
        return [[(self.base + start + (i * total + lo) * row_bytes, (min(lo + chunk, total) - lo) * row_bytes)
                 for i in range(lead)]
                for lo in range(0, max(total, 1), chunk)]

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
