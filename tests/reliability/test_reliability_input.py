"""Bad input: hostile records, blobs, archives, planted links, permissions and
tokens. Each is a clear error (``InvalidInput`` for bad arguments) or a miss,
never a crash, a hang, a huge allocation or a wrong cache.

Extends tests/test_blobs.py (hostile safetensors headers) and
tests/test_store.py (damaged blobs, a garbage record): here the records are
valid msgpack with hostile contents, blobs are valid safetensors holding the
wrong tensors, and the blob, record, header and archive parsers are fuzzed
with hypothesis for a bounded number of examples (``KVSTORE_FUZZ_EXAMPLES``,
default 60 per target).
"""

import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvstore
from kvstore import blobs as B
from kvstore.errors import CorruptSnapshot, InvalidInput
from kvstore.backends.files import FileBlobs, Folder, blob_relpath
from kvstore.records import pack, unpack

HERE = Path(__file__).resolve().parent.parent  # tests/: the helper modules
sys.path.insert(0, str(HERE))

from workers import check_prefix_layers, prefix_cache, seed_tokens  # noqa: E402

EXAMPLES = int(os.environ.get("KVSTORE_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck))
FP = "synthetic"
TOKS = seed_tokens(21, 300)


class Stored:
    """A store holding one snapshot of TOKS (two KV layers; dedup segments of
    an earlier 200-token prefix) and one hybrid snapshot (a state blob)."""

    def __init__(self, path):
        from workers import HYBRID, hybrid_cache

        # the read path's own checks are under test here: no repair after a failed load
        # changes the store between examples (tests/reliability/test_reliability_repair.py)
        self.store = kvstore.SnapshotStore(path, block_tokens=16, repair=False)
        self.store.put(FP, TOKS[:200], prefix_cache(TOKS[:200], 2))
        self.key = self.store.put(FP, TOKS, prefix_cache(TOKS, 2))
        self.htoks = seed_tokens(22, 50)
        self.hkey = self.store.put(HYBRID, self.htoks, hybrid_cache(self.htoks))
        self.hybrid = HYBRID

    def raw(self, key):
        with self.store.index.read() as r:
            return r.snapshot(bytes.fromhex(key))

    def put_raw(self, key, raw, db="snap"):
        kb = key if isinstance(key, bytes) else bytes.fromhex(key)
        put = {"snap": "put_snapshot", "seg": "put_segment"}[db]
        self.store.index.write(lambda w: getattr(w, put)(kb, raw))
        self.store.retry_failed()

    def put_model_raw(self, fp, raw):
        self.store.index.write(lambda w: w.put_model(fp, raw))
        self.store.retry_failed()

    def model_raw(self, fp):
        with self.store.index.read() as r:
            return r.model(fp)

    def blob_path(self, blob_id):
        return self.store.path / "blobs" / blob_relpath(blob_id)

    def fetch(self, fp=FP, toks=None):
        """fetch_nearest of toks+[5]: must be a miss or exactly right."""
        toks = TOKS if toks is None else toks
        self.store.retry_failed()
        cache, rest = self.store.fetch_nearest(fp, toks + [5])
        assert rest and len(rest) <= len(toks) + 1
        if cache is not None:
            n = len(toks) + 1 - len(rest)
            if fp == self.hybrid:
                from workers import check_hybrid

                assert check_hybrid(cache, toks[:n]), "wrong hybrid cache served"
            else:
                assert check_prefix_layers(cache, toks[:n]), "wrong KV served"
        return cache


@pytest.fixture
def stored(tmp_path):
    s = Stored(tmp_path / "store")
    yield s
    s.store.close()


# --------------------------------------------- records: valid msgpack, hostile contents
def test_extent_pointing_at_another_models_segment_is_a_miss(stored):
    """Same shapes, same tokens, another model: its segments must never be served."""
    other = "synthetic-other-weights"
    wrong = [c for c in prefix_cache(TOKS, 2)]
    for c in wrong:
        c.keys = c.keys + 100  # what another model computes for these tokens
    okey = stored.store.put(other, TOKS, wrong)
    rec, orec = unpack(stored.raw(stored.key)), unpack(stored.raw(okey))
    rec["ext"] = orec["ext"]
    stored.put_raw(stored.key, pack(rec))
    assert stored.fetch() is None
    assert stored.store.counters["misses.corrupt"] >= 1


def hostile_records(s):
    """(name, record) pairs: valid msgpack, hostile contents."""
    rec = unpack(s.raw(s.key))
    seg = bytes(rec["ext"][-1][0])
    out = []

    def case(name, **changes):
        r = dict(rec)
        r.update(changes)
        out.append((name, r))

    case("huge-n", n=1 << 40)
    case("negative-n", n=-5)
    case("n-not-int", n="300")
    case("tokens-not-bytes", tok=list(TOKS))
    case("tokens-short", tok=rec["tok"][:-8])
    case("unknown-class", lay=[{"c": "os.system", "n": 300}, rec["lay"][1]])
    case("class-from-globals", lay=[{"c": "__import__"}] * 2)
    case("layout-not-a-tree", lay=[1, "x"])
    case("layout-not-a-list", lay={"c": "KVCache"})
    case("layout-extra-layer", lay=rec["lay"] + [{"c": "KVCache", "n": 300}])
    case("rotating-absurd", lay=[{"c": "RotatingKVCache", "o": 300, "keep": 0, "max": 1 << 40, "idx": -7}] * 2)
    case("chunked-absurd-start", lay=[{"c": "ChunkedKVCache", "o": 300, "cs": 1, "sp": -(1 << 40)}] * 2)
    case("arrays-huge", lay=[{"c": "ArraysCache", "s": [1] * 100000}] * 2)
    case("cachelist-deep", lay=[{"c": "CacheList", "ch": [{"c": "CacheList", "ch": []}] * 3}] * 2)
    case("ext-huge-rows", ext=[[seg, 1 << 40]])
    case("ext-negative-rows", ext=[[seg, -100], [seg, 400]])
    case("ext-repeats-a-segment", ext=[[seg, 100], [seg, 100], [seg, 100]])
    case("ext-unknown-segment", ext=[[b"\0" * 16, 300]])
    case("ext-not-a-list", ext=7)
    case("ext-bad-id", ext=[["zz", 300]])
    case("state-blob-absurd", st=[b"\1" * 16, 1 << 50, 3])
    case("state-not-a-list", st="abc")
    case("unknown-version", v=99)
    case("other-model", fp="synthetic-hybrid")
    case("layout-id-unknown", sid="0" * 16)
    case("trim-lie", trim=True, lay=[{"c": "ArraysCache", "s": [1]}] * 2)
    case("not-a-map-inside", lay=[[["c", "KVCache"]]] * 2)
    return out


def test_hostile_records_are_misses(stored):
    for name, rec in hostile_records(stored):
        stored.put_raw(stored.key, pack(rec))
        t = time.monotonic()
        cache = stored.fetch()
        # never the hostile record; the intact 200-token snapshot may serve
        assert cache is None or cache[0].offset == 200, name
        assert time.monotonic() - t < 5, name
        stored.store.lookup(FP, TOKS + [5])
        stored.store.entries()
        stored.store.verify()
    # the clean record serves again after being put back
    stored.store.delete(stored.key)
    assert stored.store.put(FP, TOKS, prefix_cache(TOKS, 2)) == stored.key
    assert stored.fetch() is not None


def test_hostile_model_records_are_misses(stored):
    model = unpack(stored.model_raw(FP))
    (sid,) = model["sigs"]
    bad = []
    for shape in ([1 << 20, 1 << 20, 1 << 20], [0, 2, 32], [-1, 2, 32], [1, 2], "x"):
        m = json.loads(json.dumps(model))
        for name in m["sigs"][sid]["tensors"]:
            m["sigs"][sid]["tensors"][name][1] = shape
        bad.append(m)
    m = json.loads(json.dumps(model))
    for name in m["sigs"][sid]["tensors"]:
        m["sigs"][sid]["tensors"][name][0] = "OBJECT"
    bad += [m, {"sigs": []}, {"sigs": {sid: "x"}}, {"struct": 5}]
    for m in bad:
        stored.put_model_raw(FP, pack(m))
        assert stored.fetch() is None, m
    stored.put_model_raw(FP, b"\xc1")
    assert stored.fetch() is None


def test_wrong_tensors_in_an_otherwise_valid_blob_are_misses(stored):
    """Valid safetensors with correct checksums (re-written by the blob writer),
    but holding the wrong shape or dtype for the model's layout."""
    store = stored.store
    rec = unpack(stored.raw(stored.key))
    cases = {
        "wrong-width": lambda a: a[..., :16],
        "wrong-heads": lambda a: np.concatenate([a, a], axis=1),
        "wrong-dtype": lambda a: a.astype(np.float16),
        "too-few-rows": lambda a: a[:, :, :10, :],
    }
    for name, change in cases.items():
        seg_id = bytes(rec["ext"][-1][0]).hex()
        with store.blobs.open(seg_id) as r:
            tensors = {t: r.read(t) for t in r.tensors}
        dt = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32"}
        new = {t: change(a) for t, a in tensors.items()}
        ref = store.blobs.write({t: (dt[a.dtype], a, 2) for t, a in new.items()}, {})
        new_id, size, hs = ref.blob.hex(), ref.size, ref.header_sum
        with store.index.read() as r:
            srec = unpack(r.segment(bytes.fromhex(seg_id)))
        r2 = dict(rec)
        r2["ext"] = rec["ext"][:-1] + [[bytes.fromhex(new_id), rec["ext"][-1][1]]]
        stored.put_raw(bytes.fromhex(new_id), pack({**srec, "size": size, "hs": hs}), db="seg")
        stored.put_raw(stored.key, pack(r2))
        assert stored.fetch() is None, name
    # a state blob with the wrong shape (valid checksums)
    hrec = unpack(stored.raw(stored.hkey))
    st_id = bytes(hrec["st"][0]).hex()
    with store.blobs.open(st_id) as r:
        tensors = {t: r.read(t) for t in r.tensors}
    for name, change in {"state-shape": lambda a: np.concatenate([a, a], axis=-1),
                         "state-extra": None, "state-missing": "drop"}.items():
        if change == "drop":
            new = dict(list(tensors.items())[1:])
        elif change is None:
            new = {**tensors, "9.s0": np.zeros((1, 4), np.float32)}
        else:
            new = {t: change(a) for t, a in tensors.items()}
        ref = store.blobs.write({t: ("F32", a, None) for t, a in new.items()}, {})
        new_id, size, hs = ref.blob.hex(), ref.size, ref.header_sum
        stored.put_raw(stored.hkey, pack({**hrec, "st": [bytes.fromhex(new_id), size, hs]}))
        assert stored.fetch(stored.hybrid, stored.htoks) is None, name


# ------------------------------------------------------------------ fuzzing
def mutate(value, draw_value):
    return draw_value


def msgpack_values():
    leaf = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 63), (1 << 64) - 1),
                     st.floats(allow_nan=True), st.text(max_size=20), st.binary(max_size=40))
    return st.recursive(leaf, lambda c: st.one_of(st.lists(c, max_size=5),
                                                  st.dictionaries(st.text(max_size=5), c, max_size=5)),
                        max_leaves=12)


def test_fuzz_records_are_misses_or_exact(tmp_path):
    """Replace, drop or add fields of a real record (and of the nodes in its
    layout) with arbitrary msgpack values: fetch, lookup, entries and verify
    never raise; a hit is exactly the right KV."""
    s = Stored(tmp_path / "fz")
    base = unpack(s.raw(s.key))
    fields = sorted(base) + ["extra"]
    examples = [0]

    @FUZZ
    @given(st.lists(st.tuples(st.sampled_from(fields), st.one_of(st.just("<drop>"), msgpack_values())),
                    min_size=1, max_size=3),
           st.integers(0, 1), st.sampled_from(["c", "n", "ch", "x"]), msgpack_values())
    def run(changes, layer, node_field, node_value):
        examples[0] += 1
        rec = json_safe_copy(base)
        for f, v in changes:
            if v == "<drop>":
                rec.pop(f, None)
            else:
                rec[f] = v
        if isinstance(rec.get("lay"), list) and layer < len(rec["lay"]) and isinstance(rec["lay"][layer], dict):
            rec["lay"][layer][node_field] = node_value
        s.put_raw(s.key, pack(rec))
        s.fetch()
        s.store.lookup(FP, TOKS + [5])
        s.store.entries()
        s.store.verify()

    run()
    s.store.close()
    print(f"\nrecords fuzzed: {examples[0]}")


def json_safe_copy(rec):
    return unpack(pack(rec))


def test_fuzz_blob_bytes_are_misses_or_exact(tmp_path):
    """Flip, overwrite, truncate or extend the bytes of real segment and state
    blobs: every fetch is a miss or exactly right (checksums catch the rest)."""
    s = Stored(tmp_path / "fz")
    rec = unpack(s.raw(s.key))
    hrec = unpack(s.raw(s.hkey))
    targets = [(bytes(e[0]).hex(), FP, TOKS) for e in rec["ext"]] + [(bytes(hrec["st"][0]).hex(), s.hybrid, s.htoks)]
    originals = {t[0]: s.blob_path(t[0]).read_bytes() for t in targets}
    examples = [0]

    @FUZZ
    @given(st.sampled_from(targets), st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
                                              min_size=1, max_size=4),
           st.sampled_from(["flip", "truncate", "extend", "header"]), st.floats(0, 1))
    def run(target, flips, how, cut):
        examples[0] += 1
        blob_id, fp, toks = target
        data = bytearray(originals[blob_id])
        n = struct.unpack("<Q", data[:8])[0]
        if how == "flip":
            for pos, x in flips:
                data[int(pos * len(data))] ^= x
        elif how == "header":
            for pos, x in flips:
                data[int(pos * (n + 8))] ^= x
        elif how == "truncate":
            data = data[: int(cut * len(data))]
        else:
            data += bytes(x for _, x in flips)
        p = s.blob_path(blob_id)
        p.write_bytes(bytes(data))
        try:
            s.fetch(fp, toks)
        finally:
            p.write_bytes(originals[blob_id])

    run()
    assert s.fetch() is not None
    s.store.close()
    print(f"\nblob byte mutations fuzzed: {examples[0]}")


def header_entries():
    num = st.one_of(st.integers(-(1 << 64), 1 << 64), st.floats(), st.text(max_size=4), st.none())
    return st.dictionaries(
        st.sampled_from(["dtype", "shape", "data_offsets", "junk"]),
        st.one_of(st.sampled_from(list(B.DTYPES) + ["OBJ", ""]), st.lists(num, max_size=5), num),
        max_size=4,
    )


def test_fuzz_safetensors_headers(tmp_path):
    """Arbitrary header JSON (tensor entries, checksums, metadata, claimed
    lengths): BlobReader raises CorruptSnapshot (or FormatVersionError),
    quickly, and never allocates what the header claims."""
    for sub in ("blobs", "tmp"):
        (tmp_path / sub).mkdir(mode=0o700)
    folder = Folder(tmp_path)
    blobs = FileBlobs(folder)
    examples = [0]

    @FUZZ
    @given(st.dictionaries(st.text(max_size=6), header_entries(), max_size=4),
           st.one_of(st.none(), st.dictionaries(st.text(max_size=6), st.tuples(
               st.one_of(st.none(), st.integers(-3, 5)), st.integers(-2, 1 << 40), st.text(max_size=40)),
               max_size=3)),
           st.binary(max_size=64), st.one_of(st.none(), st.integers(0, 1 << 64 - 1)),
           st.sampled_from(["1", "2", "x", None]))
    def run(tensors, sums, data, claimed, version):
        examples[0] += 1
        blob_id = B.new_id()
        header = dict(tensors)
        meta = {"kvstore.id": blob_id}
        if version is not None:
            meta["kvstore.format"] = version
        if sums is not None:
            meta["kvstore.sums"] = json.dumps(sums)
        header["__metadata__"] = meta
        raw = json.dumps(header).encode()
        sub = tmp_path / "blobs" / blob_id[:2]
        sub.mkdir(exist_ok=True, mode=0o700)
        (sub / f"{blob_id}.safetensors").write_bytes(struct.pack("<Q", len(raw) if claimed is None else claimed)
                                                      + raw + data)
        t = time.monotonic()
        try:
            with blobs.open(blob_id) as r:
                r.verify()
                for name in r.tensors:
                    shape = r.shape(name)
                    if len(shape) == 4 and r.tensors[name][4] == 2:
                        out = np.empty((shape[0] * shape[1], shape[2], shape[3]), dtype=r.tensors[name][1])
                        r.read_rows(name, shape[2], out)
        except CorruptSnapshot:
            pass
        assert time.monotonic() - t < 2

    run()
    folder.close()
    print(f"\nsafetensors headers fuzzed: {examples[0]}")


def test_fuzz_msgpack_records_never_raise_other_errors():
    """Arbitrary bytes and arbitrary msgpack trees through the record decoder:
    a dict or CorruptSnapshot, nothing else, within the decoder's size limits."""

    @FUZZ
    @given(st.one_of(st.binary(max_size=200), msgpack_values().map(pack)))
    def run(raw):
        try:
            assert isinstance(unpack(raw), dict)
        except CorruptSnapshot:
            pass

    run()
    # a 4-byte claim of a 4 GiB string or a billion-entry array is refused, not allocated
    for raw in (b"\xdb\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff"):
        with pytest.raises(CorruptSnapshot):
            unpack(raw)


def archive_with(manifest, members=()):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = manifest if isinstance(manifest, bytes) else pack(manifest)
        info = tarfile.TarInfo("manifest.msgpack")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def test_fuzz_import_manifests(tmp_path):
    """Hostile archive manifests (valid msgpack, any contents) and members
    (links, absolute paths, traversal): import reports problems or raises
    InvalidInput, adds nothing broken, writes nothing outside the store."""
    s = Stored(tmp_path / "src")
    real = tmp_path / "real.tar"
    s.store.export_archive(str(real))
    s.store.close()
    with tarfile.open(real) as tar:
        manifest = unpack(tar.extractfile("manifest.msgpack").read())
    target = kvstore.SnapshotStore(tmp_path / "dst", block_tokens=16)
    examples = [0]
    link = tarfile.TarInfo("blobs/" + "a" * 32 + ".safetensors")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    evil = tarfile.TarInfo("../../evil")
    evil.size = 3

    @FUZZ
    @given(st.lists(st.tuples(st.sampled_from(["format", "block_tokens", "snapshots", "segments", "models", "x"]),
                              msgpack_values()), max_size=3),
           st.booleans())
    def run(changes, links):
        examples[0] += 1
        m = json_safe_copy(manifest)
        for k, v in changes:
            m[k] = v
        path = tmp_path / f"a{examples[0]}.tar"
        path.write_bytes(archive_with(m, [(link, None), (evil, b"abc")] if links else []))
        try:
            target.import_archive(str(path))
        except InvalidInput:
            pass
        assert target.verify() == []
        path.unlink()

    run()
    assert not (tmp_path.parent / "evil").exists() and not (tmp_path / "evil").exists()
    for raw in (b"", b"\xc1", pack([1, 2]), pack({"format": 1, "block_tokens": 16, "snapshots": [1, {"key": 3}]})):
        p = tmp_path / "bad.tar"
        p.write_bytes(archive_with(raw))
        try:
            target.import_archive(str(p))
        except InvalidInput:
            pass
    target.gc(grace=0)
    assert target.verify() == []
    target.close()
    print(f"\narchive manifests fuzzed: {examples[0]}")


# -------------------------------------------------------------- files in the store
def test_planted_symlinks_in_the_store_are_never_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    for sub in ("blobs", "tmp", "index"):
        path = tmp_path / f"s-{sub}"
        s = Stored(path)
        s.store.close()
        moved = tmp_path / f"moved-{sub}"
        (path / sub).rename(moved)
        (path / sub).symlink_to(outside)
        before = sorted(outside.rglob("*"))
        try:
            store = kvstore.SnapshotStore(path)
        except kvstore.StoreUnavailable:
            continue  # refusing to open is a clear error too
        # reads are misses, writes fail open: nothing lands in the link's target
        if sub != "tmp":  # reads never touch tmp/
            assert store.fetch_nearest(FP, TOKS + [5])[0] is None, sub
        assert store.put(FP, seed_tokens(5, 40), prefix_cache(seed_tokens(5, 40), 2)) is None, sub
        assert sorted(outside.rglob("*")) == before, sub
        store.close()
    # a planted store.json link is refused
    path = tmp_path / "s-json"
    Stored(path).store.close()
    (path / "store.json").rename(tmp_path / "store.json")
    (path / "store.json").symlink_to(tmp_path / "store.json")
    with pytest.raises(kvstore.StoreUnavailable):
        kvstore.SnapshotStore(path)


def test_wrong_permissions_are_misses_and_failed_puts(tmp_path):
    """A blob the server cannot read (mode 000) is a miss; a tmp/ folder it
    cannot write (mode 500) makes puts fail open. As root, the child runs
    without the capabilities that let root ignore file modes."""
    s = Stored(tmp_path / "store")
    rec = unpack(s.raw(s.key))
    blob = s.blob_path(bytes(rec["ext"][-1][0]).hex())
    s.store.close()
    code = (
        "import sys, json; sys.path.insert(0, %r); import kvstore; from workers import seed_tokens;"
        "s = kvstore.SnapshotStore(%r); t = seed_tokens(21, 300);"
        "c, rest = s.fetch_nearest('synthetic', t + [5]);"
        "from workers import prefix_cache; u = seed_tokens(23, 40);"
        "key = s.put('synthetic', u, prefix_cache(u, 2));"
        "print(json.dumps([c is None, len(rest), s.counters['faults'], key, s.counters['put_failures']]))"
    ) % (str(HERE), str(s.store.path))
    os.chmod(blob, 0)
    os.chmod(s.store.path / "tmp", 0o500)
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def drop():
        # root reads anything: drop the capabilities that bypass file modes
        # (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) from the child's bounding set
        for cap in (1, 2):
            if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "prctl")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         preexec_fn=drop if os.geteuid() == 0 else None, env={**os.environ, "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    miss, rest, faults, key, put_failures = json.loads(out.stdout.strip().splitlines()[-1])
    # the 300-token snapshot's own segment is unreadable: a miss (or the intact
    # 200-token snapshot), never an error
    assert (miss and rest == 301) or rest == 101
    assert faults >= 2
    assert key is None and put_failures == 1
    assert "Traceback" not in out.stderr
    os.chmod(blob, 0o600)
    os.chmod(s.store.path / "tmp", 0o700)
    with kvstore.SnapshotStore(s.store.path) as again:
        assert again.verify() == [] and len(again.entries()) == 3


# ---------------------------------------------------------------------- tokens
@FUZZ
@given(st.lists(st.one_of(st.integers(-(1 << 70), 1 << 70), st.floats(), st.text(max_size=3), st.none(),
                          st.booleans(), st.lists(st.integers(0, 5), max_size=2)), max_size=8))
def test_fuzz_tokens_are_valid_or_invalid_input(tokens):
    store = _TOKEN_STORE[0]
    for call in (lambda: store.fetch_nearest(FP, tokens), lambda: store.lookup(FP, tokens),
                 lambda: store.fetch(FP, tokens, tenant="t")):
        try:
            call()
        except InvalidInput:
            pass


_TOKEN_STORE = []


@pytest.fixture(autouse=True, scope="module")
def _token_store(tmp_path_factory):
    s = kvstore.SnapshotStore(tmp_path_factory.mktemp("tok") / "s", block_tokens=16)
    s.put(FP, TOKS, prefix_cache(TOKS, 2))
    _TOKEN_STORE.append(s)
    yield
    s.close()


def test_token_edge_cases(tmp_path):
    from kvstore import TieredPromptCache, tiny

    store = _TOKEN_STORE[0]
    vocab_fp = kvstore.fingerprint(tiny.model_dir("llama"))
    cache = prefix_cache(TOKS[:10], 2)
    for bad in ([1.5], ["1"], [None], [-1], [1 << 31], [[1, 2]], [True, False], np.array([1.0, 2.0]),
                mx.array([1.0, 2.0]), np.array([[1, 2]]), np.array([1 << 40]), "abc", 5):
        with pytest.raises(InvalidInput):
            store.fetch_nearest(FP, bad)
        with pytest.raises(InvalidInput):
            store.put(FP, bad, cache)
    with pytest.raises(InvalidInput, match="vocabulary"):
        store.fetch_nearest(vocab_fp, [tiny.VOCAB_SIZE])
    with pytest.raises(InvalidInput, match="empty"):
        store.put(FP, [], cache)
    assert store.fetch_nearest(FP, []) == (None, [])
    assert store.lookup(FP, []) is None and store.lookup(FP, [3]) is None
    # numpy and MLX integer arrays are fine
    for ok in (np.array(TOKS[:50], dtype=np.int64), mx.array(TOKS[:50]), np.array(TOKS[:50], dtype=np.uint16)):
        assert store.fetch_nearest(FP, ok)[0] is not None
    # the tiered front fails open on bad tokens: a miss, counted, never raised
    with TieredPromptCache(store) as t:
        for bad in ([1.5, 2.5], ["a", "b"], [-3, 4], []):
            c, rest = t.fetch_nearest_cache(FP, bad)
            assert c is None and list(rest) == list(bad)
        assert t.counters()["disk.faults"] >= 3


def test_hostile_segment_records(stored):
    """A shared segment's record damaged (valid msgpack): readers miss, a new
    put over that prefix stores the prefix itself, delete and gc still work."""
    rec = unpack(stored.raw(stored.key))
    seg = bytes(rec["ext"][0][0])
    with stored.store.index.read() as r:
        good = unpack(r.segment(seg))
    for bad in ({**good, "refs": "2"}, {**good, "fp": "another-model"}, {**good, "at": 7}, {**good, "rows": -1},
                {**good, "size": None}, {"v": 1}):
        stored.put_raw(seg, pack(bad), db="seg")
        assert stored.fetch() is None, bad
        stored.store.entries()
        assert stored.store.verify() != []
    toks = TOKS[:250] + [2999]
    key = stored.store.put(FP, toks, prefix_cache(toks, 2))
    assert key is not None
    assert stored.fetch(FP, toks) is not None
    for e in stored.store.entries():
        stored.store.delete(e.key)
    stored.store.gc(grace=0)
    assert stored.store.entries() == [] and stored.store.verify() == []
    assert list((stored.store.path / "blobs").glob("*/*")) == []
