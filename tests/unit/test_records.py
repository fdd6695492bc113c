"""Index records: typed values to msgpack and back, validated in one place."""

import pytest

from kvstore.errors import CorruptSnapshot
from kvstore.records import (Access, BlobRef, Extent, Model, Segment, Snapshot, decode_access, decode_model,
                             decode_segment, decode_snapshot, encode_access, encode_model, encode_segment,
                             encode_snapshot, pack, segment_from, segment_size, snapshot_summary, unpack)

ID = bytes(range(16))


def snapshot(**changes):
    s = Snapshot("llama-abc", "system", 3, b"\x01\0\0\0\x02\0\0\0\x03\0\0\0", [{"c": "KVCache", "n": 3}], "sid1",
                 [Extent(ID, 3)], BlobRef(ID[::-1], 120, 77), True, 999, 1.5, False, ID, ID[::-1])
    for k, v in changes.items():
        setattr(s, k, v)
    return s


def test_every_record_round_trips():
    s = snapshot()
    assert decode_snapshot(encode_snapshot(s)) == s
    seg = Segment("llama-abc", 40, 64, 4096, 12345, 2, 3.0)
    assert decode_segment(encode_segment(seg)) == seg
    m = Model("org/m", "llama", 512, "/models/m", {"layout": []}, {"sid1": {"layout": [], "tensors": {}}}, 2.0)
    assert decode_model(encode_model(m)) == m
    assert decode_access(encode_access(Access(5.0, 3))) == Access(5.0, 3)


def test_the_format_1_field_names_are_read():
    """Bytes as every earlier version wrote them (one-letter msgpack keys)."""
    raw = pack({"v": 1, "fp": "llama-abc", "tier": "user", "n": 2, "tok": b"\x07\0\0\0\x08\0\0\0",
                "lay": [{"c": "KVCache", "n": 2}], "sid": "s", "ext": [[ID, 2]], "st": None, "trim": True,
                "own": 64, "t": 10.0, "ten": True, "links": b"", "endl": ID})
    s = decode_snapshot(raw)
    assert (s.n_tokens, s.token_ids().tolist(), s.extents, s.state, s.tenanted) == (2, [7, 8], [Extent(ID, 2)],
                                                                                     None, True)
    seg = decode_segment(pack({"v": 1, "fp": "f", "rows": 2, "size": 9, "hs": 1, "refs": 3, "t": 1}))
    assert seg.start is None and seg.refs == 3  # segments of the first stores carry no "at"


@pytest.mark.parametrize("field,value", [
    ("v", 2), ("fp", None), ("tier", 3), ("n", 0), ("n", True), ("tok", b"\0" * 5), ("lay", {}), ("sid", 1),
    ("ext", [[b"short", 3]]), ("ext", [[ID, 0]]), ("st", [ID, -1, 0]), ("st", [ID, 1]), ("links", b"\0" * 5),
    ("endl", b"x"),
])
def test_malformed_snapshots_are_corrupt(field, value):
    rec = unpack(encode_snapshot(snapshot()))
    rec[field] = value
    with pytest.raises(CorruptSnapshot):
        decode_snapshot(pack(rec))


def test_malformed_segments_and_garbage_are_corrupt():
    good = unpack(encode_segment(Segment("f", 2, 0, 10, 1, 1)))
    for field, value in (("refs", "2"), ("rows", 0), ("size", None), ("fp", 5), ("at", "0"), ("hs", 1.5)):
        with pytest.raises(CorruptSnapshot):
            decode_segment(pack({**good, field: value}))
    archived = {k: v for k, v in good.items() if k != "refs"}
    with pytest.raises(CorruptSnapshot):
        decode_segment(pack(archived))  # an index record must count its users
    assert segment_from(archived, refs=1).refs == 1  # an archive's entry does not
    for raw in (b"", b"\xc1", pack([1, 2]), b"\xdd\xff\xff\xff\xff"):
        with pytest.raises(CorruptSnapshot):
            decode_snapshot(raw)


def test_informational_fields_of_the_wrong_type_read_as_empty():
    m = decode_model(pack({"name": 5, "vocab": "x", "sigs": [], "struct": 7}))
    assert (m.name, m.vocab, m.sigs, m.struct) == ("", None, {}, None)
    assert decode_access(b"\xc1") == Access() and decode_access(pack({"a": "x", "h": 2})) == Access(0.0, 2)


MUTATIONS = [(f, v) for f in ("v", "fp", "tier", "n", "tok", "lay", "sid", "ext", "st", "trim", "own", "t", "ten",
                              "links", "endl", "rows", "size", "hs", "refs", "at")
             for v in (None, 0, 1, -1, True, 2.5, float("inf"), "x", b"x", ID, [], [[ID, 3]], [[ID, 0]], [ID, 1, 2],
                       [[ID, 3], [b"short", 1]], [[ID, True]], {}, b"\0" * 12)] + [("drop", f) for f in ("links", "t")]


def _mutated(base, field, value):
    rec = dict(base)
    if field == "drop":
        rec.pop(value, None)
    else:
        rec[field] = value
    return pack(rec)


def _outcome(fn, raw):
    try:
        return fn(raw)
    except CorruptSnapshot:
        return "corrupt"


@pytest.mark.parametrize("field,value", MUTATIONS)
def test_listing_decoders_accept_exactly_what_the_full_decoders_accept(field, value):
    """``snapshot_summary`` and ``segment_size`` (what a listing reads of every record) refuse
    the same records as ``decode_snapshot`` / ``decode_segment`` and agree on every field."""
    raw = _mutated(unpack(encode_snapshot(snapshot())), field, value)
    full, brief = _outcome(decode_snapshot, raw), _outcome(snapshot_summary, raw)
    if full == "corrupt":
        assert brief == "corrupt"
    else:
        assert brief == (full.fingerprint, full.tier, full.n_tokens, [[e.segment, e.rows] for e in full.extents],
                         full.state, full.trimmable, full.created)
    raw = _mutated(unpack(encode_segment(Segment("f", 2, 0, 10, 1, 3))), field, value)
    full, brief = _outcome(decode_segment, raw), _outcome(segment_size, raw)
    assert brief == ("corrupt" if full == "corrupt" else (full.size, full.refs))
