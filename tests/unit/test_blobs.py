"""Blobs: the safetensors format, its defensive reader, and blob files on disk."""

import json
import os
import struct

import numpy as np
import pytest

from kvstore import blobs as B
from kvstore.backends.files import FileBlobs, Folder, blob_relpath
from kvstore.errors import CorruptSnapshot, FormatVersionError


@pytest.fixture
def dirs(tmp_path):
    for sub in ("blobs", "tmp"):
        (tmp_path / sub).mkdir(mode=0o700)
    folder = Folder(tmp_path)
    yield tmp_path, FileBlobs(folder)
    folder.close()


def write(blobs, tensors):
    ref = blobs.write(tensors, {"kvstore.kind": "test"})
    return ref.blob.hex(), ref.size, ref.header_sum


def path_of(root, blob_id):
    return root / "blobs" / blob_relpath(blob_id)


def test_round_trip_prefix_reads_and_chunk_checks(dirs):
    root, blobs = dirs
    k = np.arange(1 * 2 * 600 * 8, dtype=np.float32).reshape(1, 2, 600, 8)
    s = np.arange(12, dtype=np.uint16).reshape(3, 4)
    blob_id, size, hs = write(blobs, {"k": ("F32", k, 2), "s": ("BF16", s, None)})
    assert path_of(root, blob_id).stat().st_size == size
    assert oct(path_of(root, blob_id).stat().st_mode & 0o777) == "0o600"
    with blobs.open(blob_id, size, hs) as r:
        assert np.array_equal(r.read("k"), k) and np.array_equal(r.read("s"), s)
        out = np.zeros((2, 300, 8), dtype=np.float32)
        r.bytes_read = 0
        r.read_rows("k", 300, out)
        assert np.array_equal(out, k[0, :, :300, :])
        # 300 rows cover two 256-row chunks: 512 rows per slice are read, not 600
        assert r.bytes_read == 2 * 512 * 8 * 4
    # damage past the prefix: the prefix still reads, a full verify does not
    data = bytearray(path_of(root, blob_id).read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    data[8 + n + (600 * 8 - 1) * 4] ^= 0xFF  # last row of slice 0
    path_of(root, blob_id).write_bytes(data)
    with blobs.open(blob_id, size, hs) as r:
        r.read_rows("k", 300, np.zeros((2, 300, 8), dtype=np.float32))
        with pytest.raises(CorruptSnapshot, match="checksum"):
            r.verify()


def test_a_blob_reads_the_same_from_bytes(dirs):
    """The format does not depend on where the bytes live: a blob held in memory reads and verifies alike."""
    root, blobs = dirs
    k = np.arange(2 * 300 * 4, dtype=np.float32).reshape(1, 2, 300, 4)
    blob_id, size, hs = write(blobs, {"k": ("F32", k, 2)})
    data = path_of(root, blob_id).read_bytes()
    with B.BlobReader(B.BytesSource(data), blob_id, size, hs) as r:
        out = np.zeros((2, 260, 4), dtype=np.float32)
        r.read_rows("k", 260, out)
        assert np.array_equal(out, k[0, :, :260, :])
        r.verify()
    damaged = bytearray(data)
    damaged[-1] ^= 1
    with B.BlobReader(B.BytesSource(bytes(damaged)), blob_id, size, hs) as r, \
            pytest.raises(CorruptSnapshot, match="checksum"):
        r.verify()
    with pytest.raises(CorruptSnapshot, match="bytes, index says"):
        B.BlobReader(B.BytesSource(data[:-4]), blob_id, size, hs)


def test_write_leaves_no_temp_file(dirs):
    root, blobs = dirs
    write(blobs, {"a": ("F32", np.zeros(3, np.float32), None)})
    assert list((root / "tmp").iterdir()) == []


def hostile(root, blobs, header, data=b"", meta=None, raw_len=None):
    """Write a hand-made blob with any header, return its id."""
    blob_id = B.new_id()
    if meta is not False:
        header["__metadata__"] = {"kvstore.format": "1", "kvstore.id": blob_id, "kvstore.sums": json.dumps({}),
                                  **(meta or {})}
    raw = json.dumps(header).encode()
    (root / "blobs" / blob_id[:2]).mkdir(exist_ok=True, mode=0o700)
    path_of(root, blob_id).write_bytes(struct.pack("<Q", raw_len or len(raw)) + raw + data)
    return blob_id


@pytest.mark.parametrize("case", [
    "huge-header", "header-past-eof", "not-json", "no-metadata", "absurd-shape", "offset-past-eof",
    "overlap", "gap", "bad-dtype", "negative-dim", "no-sums", "wrong-sum-count", "bad-row-axis", "array-header",
])
def test_hostile_headers_are_corrupt_not_crashes(dirs, case):
    root, blobs = dirs
    ok = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    sums = json.dumps({"t": [None, 1, "0" * 16]})
    h, data, meta, raw_len = {"t": dict(ok)}, b"\0" * 8, {"kvstore.sums": sums}, None
    if case == "huge-header":
        raw_len = 1 << 60
    elif case == "header-past-eof":
        raw_len = 10_000
    elif case == "absurd-shape":
        h["t"]["shape"] = [2**40, 2**40]
    elif case == "offset-past-eof":
        h["t"]["data_offsets"] = [0, 2**50]
        h["t"]["shape"] = [2**48]
    elif case == "overlap":
        h["u"] = dict(ok)
        meta["kvstore.sums"] = json.dumps({"t": [None, 1, "0" * 16], "u": [None, 1, "0" * 16]})
    elif case == "gap":
        h["t"]["data_offsets"] = [4, 12]
        data = b"\0" * 12
    elif case == "bad-dtype":
        h["t"]["dtype"] = "OBJECT"
    elif case == "negative-dim":
        h["t"]["shape"] = [-2]
    elif case == "no-sums":
        meta["kvstore.sums"] = "{}"
    elif case == "wrong-sum-count":
        meta["kvstore.sums"] = json.dumps({"t": [None, 1, "0" * 32]})
    elif case == "bad-row-axis":
        meta["kvstore.sums"] = json.dumps({"t": [7, 1, "0" * 16]})
    if case == "not-json":
        blob_id = B.new_id()
        (root / "blobs" / blob_id[:2]).mkdir(exist_ok=True)
        path_of(root, blob_id).write_bytes(struct.pack("<Q", 5) + b"{{{{{" + data)
    elif case == "no-metadata":
        blob_id = hostile(root, blobs, h, data, meta=False)
    elif case == "array-header":
        blob_id = B.new_id()
        (root / "blobs" / blob_id[:2]).mkdir(exist_ok=True)
        path_of(root, blob_id).write_bytes(struct.pack("<Q", 2) + b"[]")
    else:
        blob_id = hostile(root, blobs, h, data, meta, raw_len)
    with pytest.raises(CorruptSnapshot):
        with blobs.open(blob_id) as r:
            r.verify()


def test_unknown_format_version(dirs):
    root, blobs = dirs
    blob_id = hostile(root, blobs, {}, meta={"kvstore.format": "2"})
    with pytest.raises(FormatVersionError):
        blobs.open(blob_id)


def test_links_are_never_followed(dirs, tmp_path):
    root, blobs = dirs
    blob_id, size, hs = write(blobs, {"a": ("F32", np.ones(4, np.float32), None)})
    p = path_of(root, blob_id)
    # a symlinked fan-out folder is refused too, not only a symlinked file
    sub = p.parent
    moved = tmp_path / "elsewhere"
    sub.rename(moved)
    sub.symlink_to(moved)
    with pytest.raises(OSError):
        blobs.open(blob_id, size, hs)
    sub.unlink()
    moved.rename(sub)
    os.link(p, tmp_path / "second")
    with pytest.raises(CorruptSnapshot, match="hard links"):
        blobs.open(blob_id, size, hs)


def test_a_blob_is_copied_by_its_bytes_under_its_own_id(dirs, tmp_path):
    root, blobs = dirs
    blob_id, size, hs = write(blobs, {"k": ("F32", np.arange(40, dtype=np.float32).reshape(1, 2, 5, 4), 2)})
    data = blobs.read_bytes(blob_id, size)
    other_root = tmp_path / "other"
    for sub in ("blobs", "tmp"):
        (other_root / sub).mkdir(parents=True, mode=0o700)
    other = FileBlobs(Folder(other_root))
    other.write_bytes(blob_id, data)
    other.write_bytes(blob_id, b"not the same blob")  # a blob already in place is kept
    with other.open(blob_id, size, hs) as r:
        r.verify()
    assert list((other_root / "tmp").iterdir()) == []
    assert oct(path_of(other_root, blob_id).stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("limit", [1, 5000, B.BATCH_BYTES])
def test_batches_hand_out_the_data_in_file_order_with_the_checksums_a_reader_checks(dirs, limit):
    """Pieces of strided views (a cache's rows inside a larger buffer) come out in file
    order whatever the batch size, and the checksums made on the way are the ones the
    reader computes over the tensor made contiguous."""
    root, blobs = dirs
    rng = np.random.default_rng(3)
    big = rng.integers(0, 2**16, (1, 3, 700, 8), dtype=np.uint16)
    k = big[:, :, 20:620, :]  # strided: 600 rows of a 700-row buffer, one piece per head
    v = rng.integers(0, 2**16, (1, 3, 600, 8), dtype=np.uint16)  # contiguous: one piece
    s = rng.standard_normal((2, 5)).astype(np.float32)
    tensors = {"k": ("BF16", k, 2), "v": ("BF16", v, 2), "s": ("F32", s, None)}
    lay = B.Layout(tensors, {"kvstore.kind": "test"})
    batches = list(lay.batches(limit))
    assert all(batches) and (limit > 5000 or len(batches) > 1)
    data = b"".join(bytes(b) for batch in batches for b in batch)
    assert data == np.ascontiguousarray(k).tobytes() + v.tobytes() + s.tobytes()
    for name, arr in (("k", np.ascontiguousarray(k)), ("v", v)):
        view = B._row_view(arr, 2)
        want = "".join(f"{x:016x}" for x in B._chunk_sums(view, 600, B.CHUNK_ROWS))
        assert lay.sums[name] == [2, B.CHUNK_ROWS, want]
    blob_id, size, hs = write(blobs, tensors)
    with blobs.open(blob_id, size, hs) as r:
        r.verify()
        assert np.array_equal(r.read("k"), k) and np.array_equal(r.read("s"), s)
