"""Attacks with real files and processes: a fine-tune that keeps the sampled
bytes of its base, links planted where the store writes, archives built to
fill the disk or the memory, tenant values that alias, and files readable
by others. Each is refused or contained (see RELIABILITY.md, "Attacks")."""

import io
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import kvstore
from kvstore.errors import InvalidInput
from kvstore.maintenance import archive as archives
from kvstore.records import pack, unpack

HERE = Path(__file__).resolve().parent.parent  # tests/: the helper modules
sys.path.insert(0, str(HERE))

from test_reliability_limits import fill_up, small_fs  # noqa: E402
from workers import prefix_cache, seed_tokens  # noqa: E402

FP = "synthetic"


# ------------------------------------------------------------ model identity
def _windows(start, end, sample=64):
    """The three byte windows per tensor the first fingerprint version sampled."""
    mid = start + (end - start) // 2 - sample // 2
    return [(start, start + sample), (mid, mid + sample), (end - sample, end)]


def test_a_fine_tune_that_keeps_the_sampled_bytes_gets_its_own_fingerprint(tmp_path, tiny_model, load_tiny):
    """Model B retrains every embedding row except the bytes a sampling
    fingerprint would read: B must not be served A's KV."""
    a = tiny_model("llama")
    b = tmp_path / "fine-tune"
    shutil.copytree(a, b)
    path = b / "model.safetensors"
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    start, end = (8 + n + x for x in header["model.embed_tokens.weight"]["data_offsets"])
    before = bytes(raw)
    rows = np.frombuffer(raw[start:end], dtype=np.float32) * 1.5
    raw[start:end] = rows.tobytes()
    for lo, hi in _windows(start, end):
        raw[lo:hi] = before[lo:hi]
    path.write_bytes(bytes(raw))
    assert all(raw[lo:hi] == before[lo:hi] for lo, hi in _windows(start, end))
    assert sum(x != y for x, y in zip(raw[start:end], before[start:end])) > (end - start) // 2

    fa, fb = kvstore.fingerprint(a), kvstore.fingerprint(b)
    assert fa != fb
    model_a, tok = load_tiny("llama")
    prompt = tok.encode("The old lighthouse stood at the edge of the harbor, and every night its keeper")
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model_a)
    mx.eval(model_a(mx.array(prompt)[None], cache=cache))
    with kvstore.SnapshotStore(tmp_path / "store", block_tokens=16) as store:
        assert store.put(fa, prompt, cache) is not None
        assert store.fetch_nearest(fb, prompt + [5]) == (None, prompt + [5])
        assert store.lookup(fb, prompt + [5]) is None
        assert store.fetch_nearest(fa, prompt + [5])[1] == [5]


# ------------------------------------------------------------ planted links
def _gc_compact(store_dir):
    from kvstore_cli.main import main

    return main(["--store", str(store_dir), "gc", "--compact"])


@pytest.mark.parametrize("where", ["folder", "file"])
def test_compact_never_follows_a_planted_link(tmp_path, where, capsys):
    store_dir = tmp_path / "store"
    with kvstore.SnapshotStore(store_dir, block_tokens=16) as s:
        toks = seed_tokens(3, 40)
        s.put(FP, toks, prefix_cache(toks, 2))
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "data.mdb"
    victim.write_bytes(b"precious")
    if where == "folder":
        (store_dir / "index.compact").symlink_to(outside)
    else:
        (store_dir / "index.compact").mkdir(mode=0o700)
        (store_dir / "index.compact" / "data.mdb").symlink_to(victim)
    code = _gc_compact(store_dir)
    err = capsys.readouterr().err
    assert victim.read_bytes() == b"precious"
    assert sorted(p.name for p in outside.iterdir()) == ["data.mdb"]
    if where == "folder":
        assert code == 1 and "is a link or not a folder" in err and len(err.strip().splitlines()) == 1
    else:
        # the planted link itself is replaced by the store's own private copy
        copy = store_dir / "index.compact" / "data.mdb"
        assert code == 0 and not copy.is_symlink() and stat.S_IMODE(copy.stat().st_mode) == 0o600


def test_store_files_are_private_under_a_permissive_umask(tmp_path):
    old = os.umask(0o022)
    try:
        store_dir = tmp_path / "store"
        with kvstore.SnapshotStore(store_dir, block_tokens=16) as s:
            toks = seed_tokens(4, 40)
            s.put(FP, toks, prefix_cache(toks, 2))
            s.export_archive(str(tmp_path / "out.tar"))
            s.compact_index()
        from kvstore_cli.main import main

        assert main(["--store", str(store_dir), "export", str(tmp_path / "cli.tar")]) == 0
    finally:
        os.umask(old)
    for path in (tmp_path / "out.tar", tmp_path / "cli.tar", store_dir / "index.compact" / "data.mdb",
                 store_dir / "store.json", store_dir / "CACHEDIR.TAG"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for folder in ("blobs", "tmp", "index", "index.compact"):
        assert stat.S_IMODE((store_dir / folder).stat().st_mode) == 0o700, folder


# ------------------------------------------------------------ hostile archives
@pytest.fixture
def exported(tmp_path):
    """An archive of two snapshots: its manifest and blob members."""
    with kvstore.SnapshotStore(tmp_path / "src", block_tokens=16) as s:
        for seed in (5, 6):
            toks = seed_tokens(seed, 120)
            s.put(FP, toks, prefix_cache(toks, 2))
        s.export_archive(str(tmp_path / "real.tar"))
    with tarfile.open(tmp_path / "real.tar") as tar:
        manifest = tar.extractfile("manifest.msgpack").read()
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.name != "manifest.msgpack"]
    return manifest, members


def _archive(path, manifest, members, mode="w"):
    with tarfile.open(path, mode) as tar:
        info = tarfile.TarInfo("manifest.msgpack")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
        for info, data in members:
            tar.addfile(info, io.BytesIO(data))
    return path


def _left_in_tmp(store):
    return os.listdir(store.path / "tmp")


def test_import_refuses_duplicate_and_oversized_members(tmp_path, exported):
    manifest, members = exported
    (m0, d0), (m1, d1) = members
    big = tarfile.TarInfo(m1.name)
    big.size = len(d1) + (8 << 20)  # claims 8 MB more than the manifest declares
    archive = _archive(tmp_path / "evil.tar", manifest, [(m0, d0), (m0, d0), (big, d1 + b"\0" * (8 << 20))])
    with kvstore.SnapshotStore(tmp_path / "dst", block_tokens=16) as dst:
        added, nbytes, problems = dst.import_archive(str(archive))
        reasons = " | ".join(p.reason for p in problems)
        assert "duplicate archive member" in reasons
        assert "the manifest says" in reasons
        assert added == 1  # the snapshot whose blob arrived whole
        assert _left_in_tmp(dst) == []
        assert dst.verify() == []
        assert dst.gc(grace=0) == []


def test_import_on_a_full_disk_leaves_no_temp_files(tmp_path, exported):
    manifest, members = exported
    archive = _archive(tmp_path / "real.tar", manifest, members)
    with small_fs(tmp_path / "fs", "8m") as fs:
        dst = kvstore.SnapshotStore(fs / "store", block_tokens=16, map_size=1 << 20)
        filler = fill_up(fs)
        before = os.statvfs(fs).f_bavail
        try:
            with pytest.raises(kvstore.StoreUnavailable, match="free"):
                dst.import_archive(str(archive))
        finally:
            assert _left_in_tmp(dst) == []
            assert os.statvfs(fs).f_bavail == before
            dst.close()
        assert filler is not None


def test_import_fails_open_when_the_disk_fills_mid_copy(tmp_path, exported):
    """The free-space check passes, then the disk fills (another writer): each
    failed copy removes its temp file and is reported. The disk really fills
    (a tmpfs); wrapping the copy only picks the moment, which another
    process's writes would pick at random."""
    manifest, members = exported
    archive = _archive(tmp_path / "real.tar", manifest, members)
    with small_fs(tmp_path / "fs", "8m") as fs:
        dst = kvstore.SnapshotStore(fs / "store", block_tokens=16, map_size=1 << 20)
        real_import = archives._import_blob

        def fill_then_import(store, src, blob_id, size, hs):
            fill_up(fs)  # another process takes the disk between the check and the copy
            return real_import(store, src, blob_id, size, hs)

        archives._import_blob = fill_then_import
        try:
            added, _, problems = dst.import_archive(str(archive))
        finally:
            archives._import_blob = real_import
        assert added == 0 and problems
        assert any("No space" in p.reason or "ENOSPC" in p.reason or "Errno 28" in p.reason for p in problems)
        assert _left_in_tmp(dst) == []
        dst.close()


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads peak RSS from /proc")
def test_import_memory_is_bounded_by_the_records_not_the_manifest(tmp_path, exported):
    """A 4 MB gzip archive whose manifest decompresses to ~160 MB of segment
    entries no record references: memory stays far below the manifest."""
    manifest, members = exported
    m = unpack(manifest)
    junk = "x" * 2700
    m["segments"].update({f"{i:032x}": {"fp": FP, "size": 1, "hs": 1, "rows": 1, "junk": junk} for i in range(60_000)})
    raw = pack(m)
    assert len(raw) > 150 << 20
    path = _archive(tmp_path / "bomb.tar.gz", raw, members, mode="w:gz")
    assert path.stat().st_size < 8 << 20
    # peak RSS from /proc (VmHWM is per address space; getrusage's maxrss
    # carries the parent's peak across exec)
    code = (
        "import re, sys, kvstore\n"
        "peak = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
        "s = kvstore.SnapshotStore(sys.argv[1], block_tokens=16)\n"
        "before = peak()\n"
        "added, nbytes, problems = s.import_archive(sys.argv[2])\n"
        "print(added, len(problems), (peak() - before) // 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "dst"), str(path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    added, problems, grew_mb = map(int, out.stdout.split())
    assert added == 2 and problems == 0
    assert grew_mb < 64, f"import grew RSS by {grew_mb} MB for a {len(raw) >> 20} MB manifest"


def test_import_refuses_a_manifest_with_an_oversized_record(tmp_path, exported):
    manifest, members = exported
    m = unpack(manifest)
    m["snapshots"].append({"key": b"\1" * 16, "rec": b"\0" * (80 << 20)})
    path = _archive(tmp_path / "big.tar.gz", pack(m), members, mode="w:gz")
    with kvstore.SnapshotStore(tmp_path / "dst", block_tokens=16) as dst:
        with pytest.raises(InvalidInput, match="malformed manifest"):
            dst.import_archive(str(path))
        assert _left_in_tmp(dst) == [] and dst.entries() == []


# ------------------------------------------------------------ tenants
def test_tenants_never_alias(store):
    toks = seed_tokens(8, 80)
    for empty in ("", b""):
        with pytest.raises(InvalidInput, match="tenant must not be empty"):
            store.put(FP, toks, prefix_cache(toks, 2), tenant=empty)
        with pytest.raises(InvalidInput, match="tenant must not be empty"):
            store.fetch_nearest(FP, toks, tenant=empty)
    with pytest.raises(InvalidInput, match="string or bytes"):
        store.lookup(FP, toks, tenant=7)
    store.put(FP, toks, prefix_cache(toks, 2))  # no tenant
    long = "t" * 100
    import hashlib

    store.put(FP, toks, prefix_cache(toks, 2), tenant=long)
    # the digest a long salt was once folded to is a tenant of its own
    folded = hashlib.blake2b(long.encode(), digest_size=32).digest()
    for tenant in (folded, "t" * 64, "x"):
        assert store.lookup(FP, toks + [1], tenant=tenant) is None
    assert store.lookup(FP, toks + [1], tenant=long).tokens == len(toks)
    assert store.lookup(FP, toks + [1], tenant=long.encode()).tokens == len(toks)  # str and its bytes agree
    assert store.lookup(FP, toks + [1]).tokens == len(toks)


def test_tiered_cache_refuses_an_empty_tenant(tmp_path):
    with kvstore.TieredPromptCache(tmp_path / "store") as cache:
        with pytest.raises(InvalidInput):
            cache.fetch_nearest_cache(FP, [1, 2, 3], tenant="")
        with pytest.raises(InvalidInput):
            cache.insert_cache(FP, [1, 2, 3], prefix_cache([1, 2, 3], 1), tenant=b"")
