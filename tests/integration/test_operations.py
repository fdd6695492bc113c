"""Running a store in production: sizes that add up, prune that frees what it
says, the default disk budget, read-only stores, truncated archives.

Real stores on disk, the installed ``kvstore`` command in subprocesses,
real read-only folders (a read-only bind mount, else an immutable folder,
else a folder without write permission), real truncated tar files.
"""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import kvstore
from kvstore import budget
from readonly import read_only
from workers import seed_tokens, synthetic_prefix_cache

KVSTORE = shutil.which("kvstore") or str(Path(sys.executable).with_name("kvstore"))
FP = "synthetic"


def kv(*args, store):
    env = {k: v for k, v in os.environ.items() if k != "KVSTORE_DIR"}
    return subprocess.run([KVSTORE, "--store", str(store), *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=env)


def blob_bytes(path):
    """Bytes of the blob files on disk."""
    return sum(p.stat().st_size for p in Path(path, "blobs").glob("*/*.safetensors"))


def seed_store(path, block=16):
    """System prompts, users over them and assistants over the users: segments shared across tiers."""
    store = kvstore.SnapshotStore(path, block_tokens=block, fsync=False)
    for s in (1, 2):
        system = seed_tokens(s, 64)
        store.put(FP, system, synthetic_prefix_cache(system), tier="system")
        for u in range(3):
            user = system + [3000 + 10 * s + u] * (20 + u)
            store.put(FP, user, synthetic_prefix_cache(user), tier="user")
            if u < 2:
                turn = user + [4000 + u] * 17
                store.put(FP, turn, synthetic_prefix_cache(turn), tier="assistant")
    return store


# ------------------------------------------------------------- ls sizes
def test_ls_sizes_add_up_and_size_stays_fixed(tmp_path):
    store = seed_store(tmp_path / "s")
    entries = store.entries()
    first = {e.key: e.bytes for e in entries}
    for e in entries:
        assert e.bytes == e.unique_bytes + e.shared_bytes and e.shared_bytes <= e.bytes
    own, shared, _n = kvstore.listing.footprint(entries)
    assert own + shared == store.total_bytes() == blob_bytes(store.path)
    # SIZE does not change as others come and go; OWN is what rm of it alone frees
    extra = seed_tokens(1, 64) + [5000] * 40
    store.put(FP, extra, synthetic_prefix_cache(extra), tier="user")
    victim = next(e for e in store.entries() if e.tier == "assistant")
    assert {e.key: e.bytes for e in store.entries() if e.key in first} == first
    before = blob_bytes(store.path)
    assert store.delete(victim.key) == victim.unique_bytes == before - blob_bytes(store.path)
    own, shared, _n = kvstore.listing.footprint(store.entries())
    assert own + shared == store.total_bytes() == blob_bytes(store.path)
    store.close()
    out = kv("ls", store=tmp_path / "s")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[4:7] == ["SIZE", "OWN", "SHARED"]
    assert lines[-1].startswith(f"total: {len(lines) - 2} snapshots") and lines[-1].endswith("(the whole store)")
    rows = json.loads(kv("--format", "json", "ls", store=tmp_path / "s").stdout)
    assert all(r["bytes"] == r["own_bytes"] + r["shared_bytes"] for r in rows)
    assert "OWN (bytes only it holds" in " ".join(kv("ls", "--help", store=tmp_path / "s").stdout.split())
    filtered = kv("ls", "-f", "tier=system", store=tmp_path / "s").stdout.splitlines()[-1]
    assert filtered.startswith("total: 2 snapshots") and "of the store's" in filtered


@pytest.mark.parametrize("policy", [("--max-size", "40kB"), ("--tier", "user"), ("--tier", "assistant,user"),
                                    ("--older-than", "0s")])
def test_prune_dry_run_frees_exactly_what_the_real_run_frees(tmp_path, policy):
    path = tmp_path / "s"
    seed_store(path).close()
    dry = kv("--format", "json", "prune", *policy, "--dry-run", store=path)
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert plan["planned_bytes"] == sum(r["frees_bytes"] for r in plan["snapshots"]) > 0
    human = kv("prune", *policy, "--dry-run", store=path).stdout
    assert "FREES" in human.splitlines()[0]
    on_disk = blob_bytes(path)
    real = json.loads(kv("--format", "json", "prune", *policy, "-y", store=path).stdout)
    assert real["freed_bytes"] == plan["planned_bytes"] == on_disk - blob_bytes(path)
    assert [r["key"] for r in real["snapshots"]] == [r["key"] for r in plan["snapshots"]]


def test_rm_dry_run_frees_exactly_what_rm_frees(tmp_path):
    path = tmp_path / "s"
    with seed_store(path) as store:
        users = [e.key for e in store.entries() if e.tier == "user"]
    plan = json.loads(kv("--format", "json", "rm", *users, "--dry-run", store=path).stdout)
    on_disk = blob_bytes(path)
    real = json.loads(kv("--format", "json", "rm", *users, "-y", store=path).stdout)
    assert real["freed_bytes"] == plan["planned_bytes"] == on_disk - blob_bytes(path) > 0


# ------------------------------------------------------------ disk budget
def test_default_budget_is_half_the_free_disk_at_most_50gb(tmp_path):
    st = os.statvfs(tmp_path)
    free = st.f_bavail * st.f_frsize
    got = budget.default_budget(tmp_path / "not-yet", held=10**6)
    assert abs(got - min(budget.DEFAULT_CAP, (free + 10**6) // 2)) < 64 << 20  # free space moves a little
    with kvstore.SnapshotStore(tmp_path / "s", max_bytes="auto") as s:
        assert 0 < s.max_bytes <= budget.DEFAULT_CAP


def test_budget_keeps_system_prompts_until_nothing_else_is_left(tmp_path, caplog):
    store = seed_store(tmp_path / "s")
    system_bytes = sum(e.bytes for e in store.entries() if e.tier == "system")
    caplog.set_level(logging.INFO, logger="kvstore")
    count, freed = budget.enforce(store, system_bytes)  # room for the system prompts only
    left = store.entries()
    assert {e.tier for e in left} == {"system"} and len(left) == 2 and count > 0
    assert store.total_bytes() <= system_bytes
    line = [r for r in caplog.records if "disk budget" in r.message][-1]
    assert line.levelno == logging.INFO and f"removed {count} snapshots" in line.message
    assert "assistant" in line.message and "user" in line.message
    # only when nothing else is left does a system prompt go, and that is a warning
    count, _ = budget.enforce(store, system_bytes - 1)
    assert count == 1 and len(store.entries()) == 1
    line = [r for r in caplog.records if "disk budget" in r.message][-1]
    assert line.levelno == logging.WARNING and "System prompts went" in line.message
    store.close()


def test_budget_on_the_write_path_spares_system_snapshots(tmp_path):
    path = tmp_path / "s"
    with seed_store(path) as s:
        system_bytes = sum(e.bytes for e in s.entries() if e.tier == "system")
    with kvstore.SnapshotStore(path, max_bytes=system_bytes + 20_000) as store:
        for i in range(6):
            toks = seed_tokens(1, 64) + [6000 + i] * 30
            assert store.put(FP, toks, synthetic_prefix_cache(toks), tier="user")
        tiers = [e.tier for e in store.entries()]
        assert tiers.count("system") == 2 and store.counters["evictions"] > 0


def test_a_tier_kept_in_memory_only_is_said_once(caplog):
    from kvstore import notices

    caplog.set_level(logging.INFO, logger="kvstore")
    notices._given.discard(("memory-only", "assistant"))
    cache = kvstore.TieredPromptCache(None, log_interval=None)
    cache._writer = object()  # the notice is for caches with a disk tier; no write is made here
    for _ in range(3):
        cache.insert_cache(FP, [1, 2, 3], synthetic_prefix_cache([1, 2, 3]), cache_type="assistant")
    said = [r.message for r in caplog.records if "memory only" in r.message]
    assert len(said) == 1 and "/v1/completions" in said[0] and "--persist system,user,assistant" in said[0]
    cache._writer = None


# -------------------------------------------------------- read-only store
def snapshot_of_files(root):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes()) for p in Path(root).rglob("*") if p.is_file()}


@pytest.mark.parametrize("ways", [("mount", "chattr", "chmod"), ("chattr", "chmod")])
def test_read_only_store_gives_hits_and_writes_nothing(tmp_path, caplog, ways):
    folder = tmp_path / "vol"
    folder.mkdir()
    toks = seed_tokens(9, 80)
    with kvstore.SnapshotStore(folder / "store", block_tokens=16) as s:
        s.put(FP, toks, synthetic_prefix_cache(toks), tier="system")
    caplog.set_level(logging.WARNING, logger="kvstore")
    with read_only(folder, ways) as (path, how):
        files = snapshot_of_files(path)
        with pytest.raises(OSError):
            (path / "probe").write_text("x")  # the folder really refuses writes
        store = kvstore.SnapshotStore(path)  # asked for read-write, as serve asks
        assert store.readonly, how
        cache, rest = store.fetch_nearest(FP, toks + [5])
        assert cache is not None and rest == [5]
        tiered = kvstore.TieredPromptCache(store, log_interval=None)
        assert tiered.fetch(FP, toks + [6]).source == "disk"
        tiered.insert_cache(FP, toks + [6, 7], synthetic_prefix_cache(toks + [6, 7]), cache_type="system")
        tiered.close()
        store.close()
        assert snapshot_of_files(path) == files, how  # no writes, no access-time updates
    said = [r.message for r in caplog.records if "opened read-only" in r.message]
    assert len(said) == 1, said


# ---------------------------------------------------------- truncated import
def test_truncated_archive_import_is_one_line_and_leaves_nothing(tmp_path):
    src = tmp_path / "src"
    seed_store(src).close()
    archive = tmp_path / "all.tar"
    assert kv("export", archive, store=src).returncode == 0
    data = archive.read_bytes()
    for cut in (600, len(data) // 3, len(data) // 2, len(data) * 9 // 10):  # the manifest, blobs
        part = tmp_path / f"cut-{cut}.tar"
        part.write_bytes(data[:cut])
        dest = tmp_path / f"dest-{cut}"
        kvstore.SnapshotStore(dest, block_tokens=16).close()
        out = kv("import", part, store=dest)
        assert out.returncode == 1, (cut, out.stdout, out.stderr)
        err = out.stderr.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in out.stderr, (cut, out.stderr)
        assert "truncated or damaged" in err[0] or "damaged" in err[0], err
        assert os.listdir(dest / "tmp") == [], cut
        with kvstore.SnapshotStore(dest) as s:
            assert s.entries() == [] and blob_bytes(dest) == 0
        fresh = tmp_path / f"fresh-{cut}"  # no store there yet: none is left behind
        out = kv("import", part, store=fresh)
        assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1 and not fresh.exists()


def test_import_into_a_new_store_takes_the_archives_block_size(tmp_path):
    src = tmp_path / "src"
    seed_store(src, block=16).close()
    archive = tmp_path / "all.tar"
    assert kv("export", archive, store=src).returncode == 0
    out = kv("import", archive, store=tmp_path / "new")
    assert out.returncode == 0, out.stderr
    with kvstore.SnapshotStore(tmp_path / "new") as s, kvstore.SnapshotStore(src) as a:
        assert s.block == 16 and len(s.entries()) == len(a.entries()) and s.verify() == []


def test_temp_files_of_a_killed_import_are_removed_at_once(tmp_path):
    """A killed import's temp files carry its process id: the next import (and gc,
    without waiting for the grace period) removes them once that process is gone."""
    src = tmp_path / "src"
    seed_store(src).close()
    archive = tmp_path / "all.tar"
    assert kv("export", archive, store=src).returncode == 0
    dest = tmp_path / "dest"
    kvstore.SnapshotStore(dest, block_tokens=16).close()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    leftover = dest / "tmp" / f"{'ab' * 16}.import.{gone.pid}.deadbeef"
    leftover.write_bytes(b"partial")
    alive = dest / "tmp" / f"{'cd' * 16}.import.{os.getpid()}.deadbeef"  # this process: left alone
    alive.write_bytes(b"in flight")
    with kvstore.SnapshotStore(dest) as s:
        found = s.gc(dry_run=True)  # default grace of an hour
        assert [p.reason for p in found if p.kind == "temp"] == [f"temp file {leftover.name}"]
    out = kv("import", archive, store=dest)
    assert out.returncode == 0, out.stderr
    assert sorted(os.listdir(dest / "tmp")) == [alive.name]


# ------------------------------------------------------- prune batches
def _commits(store):
    """Count the store's index write transactions (a wrapper around the real LMDB index)."""
    count = [0]
    write = store.index.write

    def counted(fn):
        count[0] += 1
        return write(fn)

    store.index.write = counted
    return count


@pytest.mark.parametrize("hold,batches", [(0.0, 5), (60.0, 1)])
def test_prune_deletes_in_transactions_that_grow_while_they_are_short(tmp_path, monkeypatch, hold, batches):
    """At least DELETE_BATCH snapshots go in each transaction; more while it has run under
    DELETE_HOLD seconds (each commit is an fsync): the same snapshots go either way."""
    from kvstore.maintenance import deleting

    monkeypatch.setattr(deleting, "DELETE_BATCH", 2)
    monkeypatch.setattr(deleting, "DELETE_HOLD", hold)
    store = seed_store(tmp_path / "s")
    before = {e.key for e in store.entries()}
    plan = store.plan_prune(tier=["assistant", "user"])
    assert len(plan) == 10
    commits = _commits(store)
    count, freed = store.prune(tier=["assistant", "user"])
    # one transaction per batch, and one small commit after them (LMDB reuses freed pages from then on)
    assert (count, commits[0]) == (10, batches + 1)
    assert {e.key for e in store.entries()} == before - {e.key for e in plan}
    assert freed > 0 and store.gc(grace=0, dry_run=True) == []
    store.close()


def test_prune_with_a_size_limit_stops_inside_a_large_transaction(tmp_path, monkeypatch):
    from kvstore.maintenance import deleting

    monkeypatch.setattr(deleting, "DELETE_HOLD", 60.0)
    store = seed_store(tmp_path / "s")
    total = store.total_bytes()
    count, _freed = store.prune(max_bytes=total - 1)
    assert count >= 1 and store.total_bytes() <= total - 1
    assert len(store.entries()) == 12 - count and count < 10
    store.close()


def _segment_refs(store):
    """``(refs each segment record holds, references the snapshot records make)`` by segment id."""
    from collections import Counter

    from kvstore.records import decode_segment, decode_snapshot

    with store.index.read() as r:
        held = {sid: decode_segment(raw).refs for sid, raw in r.segments()}
        made = Counter(e.segment for _k, raw in r.snapshots() for e in decode_snapshot(raw).extents)
    return held, dict(made)


def test_one_transaction_of_deletions_leaves_what_deleting_one_at_a_time_leaves(tmp_path, monkeypatch):
    """Deletions in one transaction read and write each shared segment once: the reference
    counts, sizes, counters and files they leave equal those of one transaction per snapshot."""
    from kvstore.maintenance import deleting

    monkeypatch.setattr(deleting, "DELETE_HOLD", 60.0)
    batched, single = seed_store(tmp_path / "a"), seed_store(tmp_path / "b")
    plan = batched.plan_prune(tier=["assistant", "user"])
    assert len(plan) == 10
    commits = _commits(batched)
    got = batched.prune(tier=["assistant", "user"])
    assert commits[0] == 2  # the deletions, then the small commit after them
    freed = sum(single.delete(e.key) for e in single.plan_prune(tier=["assistant", "user"]))
    assert got == (10, freed) and freed > 0
    for store in (batched, single):
        held, made = _segment_refs(store)
        assert held == made and len(held) > 0  # every record counts exactly its snapshots' references
        assert store.gc(grace=0, dry_run=True) == []
    sizes = [{e.key: (e.tier, e.bytes, e.unique_bytes, e.shared_bytes) for e in s.entries()} for s in (batched, single)]
    assert sizes[0] == sizes[1] and {t for t, *_ in sizes[0].values()} == {"system"}
    assert batched.total_bytes() == single.total_bytes() == blob_bytes(tmp_path / "a") == blob_bytes(tmp_path / "b")
    with batched.index.read() as r, single.index.read() as q:
        assert r.counter("snapshots") == q.counter("snapshots") == 2
    batched.close()
    single.close()


# ------------------------------------------------- records reused by lookups
def test_lookups_reuse_decoded_records_only_while_the_index_holds_the_same_bytes(tmp_path):
    """A lookup reuses the records earlier lookups decoded; a snapshot deleted and stored
    again (same key, new record) is read afresh, by this process and by another."""
    store = kvstore.SnapshotStore(tmp_path / "s", block_tokens=16, fsync=False)
    system = seed_tokens(1, 64)
    turn = system + [3001] * 20
    store.put(FP, system, synthetic_prefix_cache(system), tier="system")
    store.put(FP, turn, synthetic_prefix_cache(turn), tier="user")
    request = turn + [5] * 9
    first = store.lookup(FP, request)
    assert (first.tokens, first.kind, first.tier) == (len(turn), "shorter", "user")
    assert store.lookup(FP, request) == first  # served from the decoded records
    assert store.delete(first.key) > 0
    assert store.lookup(FP, request).tier == "system"
    other = kvstore.SnapshotStore(tmp_path / "s", block_tokens=16, fsync=False)  # one environment per process
    other.put(FP, turn, synthetic_prefix_cache(turn), tier="assistant")
    again = store.lookup(FP, request)
    assert (again.key, again.tier) == (first.key, "assistant")
    other.close()
    store.close()


def test_many_blobs_are_unlinked_from_several_threads_and_none_is_left(tmp_path):
    from kvstore.blobs import new_id
    from kvstore.maintenance import deleting

    store = kvstore.SnapshotStore(tmp_path / "s", fsync=False)
    ids = [new_id() for _ in range(3 * deleting.UNLINK_PARALLEL)]
    for blob_id in ids:
        store.blobs.write_bytes(blob_id, b"x" * 100)
    assert all(store.blobs.exists(b) for b in ids)
    deleting.unlink_all(store.blobs, ids[:-1] + [new_id()])  # one that is not there: no error
    assert [b for b in ids if store.blobs.exists(b)] == ids[-1:]
    store.close()
