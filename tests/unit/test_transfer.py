"""Bundles and chunks as they travel to the remote: signing, binding to a key,
format versions, chunk digests, and blobs read out of chunks; URL checks."""

import pytest

from kvstore.backends.redis_index import check_url, redact
from kvstore.blobs import BlobReader, encode
from kvstore.errors import CorruptSnapshot, FormatVersionError, InvalidInput
from kvstore.records import pack, unpack
from kvstore.transfer import (BlobSpec, Bundle, ChunkMissing, ChunkSource, StreamSource, check_chunks,
                              decode_bundle, encode_bundle, split)

import numpy as np

KEY, NS = bytes(range(16)), "00112233aabbccdd"


def bundle(digest="xxh3"):
    return Bundle(KEY, NS, b"snap", b"model", {bytes(16): b"seg"}, [BlobSpec("ab" * 16, 10, 4, [1, 2, 3])], digest)


def test_bundle_round_trip_and_binding():
    raw = encode_bundle(bundle())
    got = decode_bundle(raw, KEY, NS)
    assert got.snapshot == b"snap" and got.blobs[0].digests == [1, 2, 3]
    with pytest.raises(CorruptSnapshot):
        decode_bundle(raw, bytes(16), NS)  # replayed under another key
    with pytest.raises(CorruptSnapshot):
        decode_bundle(raw, KEY, "ffffffffffffffff")  # or another namespace


def test_signatures():
    signed = encode_bundle(bundle("blake3"), b"one")
    assert decode_bundle(signed, KEY, NS, b"one").digest == "blake3"
    for secret in (b"two", b""):
        with pytest.raises(CorruptSnapshot, match="signed"):
            decode_bundle(signed, KEY, NS, secret or b"x")
    with pytest.raises(CorruptSnapshot, match="signed"):
        decode_bundle(encode_bundle(bundle("blake3")), KEY, NS, b"one")  # unsigned
    # a signed bundle must vouch for its bytes with a cryptographic digest
    with pytest.raises(CorruptSnapshot):
        decode_bundle(encode_bundle(bundle("xxh3"), b"one"), KEY, NS, b"one")


def test_other_version_and_garbage():
    outer = unpack(encode_bundle(bundle()))
    body = unpack(outer["b"])
    body["v"] = 2
    with pytest.raises(FormatVersionError):
        decode_bundle(pack({"b": pack(body), "m": None}), KEY, NS)
    for raw in (b"", b"\x00garbage", pack({"b": 5})):
        with pytest.raises(CorruptSnapshot):
            decode_bundle(raw, KEY, NS)


def blob_bytes():
    arr = np.arange(2 * 3 * 40 * 8, dtype=np.float32).reshape(2, 3, 40, 8)
    enc = encode({"t": ("F32", arr, 2)}, {})
    return enc, b"".join(bytes(b) for b in enc.buffers()), arr


@pytest.mark.parametrize("chunk", [7, 100, 1 << 20])
def test_chunks_and_blob_reads(chunk):
    enc, data, arr = blob_bytes()
    parts, digests = split(data, chunk, "xxh3")
    spec = BlobSpec(enc.blob_id, len(data), chunk, digests)
    check_chunks(spec, [bytes(p) for p in parts], "xxh3")
    with BlobReader(ChunkSource([bytes(p) for p in parts], chunk), enc.blob_id, enc.size, enc.header_sum) as r:
        assert np.array_equal(r.read("t"), arr)
    bad = [bytearray(p) for p in parts]
    bad[-1][0] ^= 1
    with pytest.raises(CorruptSnapshot, match="checksum"):
        check_chunks(spec, bad, "xxh3")
    with pytest.raises(ChunkMissing):
        check_chunks(spec, [bytes(p) for p in parts[:-1]] + [None], "xxh3")


class Wire:
    """Chunk values as a stream (what ``ChunkStream`` reads off a socket)."""

    def __init__(self, values):
        self.values, self.cur, self.broken = list(values), None, False

    def begin(self):
        v = self.values.pop(0)
        self.cur = memoryview(v) if v is not None else None
        return None if v is None else len(v)

    def recv_into(self, mv):
        mv[:] = self.cur[: len(mv)]
        self.cur = self.cur[len(mv):]

    def end(self):
        assert not len(self.cur)


def test_stream_source_reads_in_place_and_checks_digests():
    enc, data, arr = blob_bytes()
    parts, digests = split(data, 64, "blake3")
    spec = BlobSpec(enc.blob_id, len(data), 64, digests)
    with BlobReader(StreamSource(Wire([bytes(p) for p in parts]), spec, "blake3"), enc.blob_id, enc.size,
                    enc.header_sum) as r:
        out = np.empty((6, 40, 8), np.float32)
        r.read_rows("t", 40, out)
        assert np.array_equal(out.reshape(arr.shape), arr)
    bad = [bytes(p) for p in parts]
    bad[3] = bytes([bad[3][0] ^ 1]) + bad[3][1:]
    with pytest.raises(CorruptSnapshot):
        with BlobReader(StreamSource(Wire(bad), spec, "blake3"), enc.blob_id, enc.size, enc.header_sum) as r:
            r.read_rows("t", 40, np.empty((6, 40, 8), np.float32))


def test_urls():
    for ok in ("redis://localhost:6379/0", "rediss://u:p@h:6380/1", "unix:///tmp/redis.sock", "redis://h"):
        check_url(ok)
    for bad in ("http://h:1", "redis://", "redis://h:99999999/0", "redis://h:1/db", "h:6379", None):
        with pytest.raises(InvalidInput):
            check_url(bad)
    assert "secret" not in redact("redis://user:secret@h:1/0") and "***" in redact("redis://user:secret@h:1/0")
