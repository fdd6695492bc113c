"""Resource limits: a full disk (a real small tmpfs when this process may
mount one, else a file-size limit in a child process), a full LMDB map and
a saturated write-behind queue. Requests keep being served without the
cache, nothing crashes, the store stays consistent (verify clean, earlier
snapshots intact and exact), and it takes writes again once space is freed.
One test runs a real ``kvstore serve`` on 127.0.0.1 against a full disk."""

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import kvstore
from kvstore import TieredPromptCache

HERE = Path(__file__).resolve().parent.parent  # tests/: the helper modules
sys.path.insert(0, str(HERE))

from test_reliability_load import record  # noqa: E402
from workers import check_prefix_layers, prefix_cache, seed_tokens  # noqa: E402

FP = "synthetic"


@contextlib.contextmanager
def small_fs(where, size="16m"):
    """A real tmpfs of ``size`` mounted at ``where`` (skips if mounting is not allowed)."""
    where.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({out.stderr.strip()}); the RLIMIT_FSIZE test covers a full disk")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill_up(fs):
    """Take every free byte of the filesystem with one file; return its path."""
    filler = fs / f"filler-{time.monotonic_ns()}"
    try:
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return None  # so full that not even an empty file fits
    try:
        for size in (1 << 16, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def put_many(store, seeds, n=400, layers=2):
    kept = {}
    for seed in seeds:
        toks = seed_tokens(seed, n)
        key = store.put(FP, toks, prefix_cache(toks, layers))
        if key is None:
            return kept, seed
        kept[key] = toks
    return kept, None


def check_intact(store, kept):
    assert store.verify() == []
    for key, toks in kept.items():
        cache, rest = store.fetch_nearest(FP, toks + [5])
        assert rest == [5] and check_prefix_layers(cache, toks), key


def test_full_disk_fails_open_and_recovers(tmp_path):
    with small_fs(tmp_path / "fs", "8m") as fs:
        store = kvstore.SnapshotStore(fs / "store", block_tokens=16)
        kept, failed_at = put_many(store, range(1, 1000))
        assert failed_at is not None, "the 8 MB filesystem never filled"
        assert store.counters["put_failures"] == 1
        # the failed put left no partial blob behind
        assert list((fs / "store" / "tmp").iterdir()) == []
        check_intact(store, kept)
        # squeeze out the last bytes too: every write now fails, reads go on
        filler = fill_up(fs)
        failures = 0
        for seed in range(2000, 2020):
            toks = seed_tokens(seed, 50)
            failures += store.put(FP, toks, prefix_cache(toks, 2)) is None
            assert store.fetch_nearest(FP, toks + [1])[0] is None
        assert failures == 20
        check_intact(store, kept)
        # access times cannot be written either; that is not fatal
        store.flush_access()
        # free space: writes succeed again
        if filler is not None:
            filler.unlink()
        for key in list(kept)[:5]:
            store.delete(key)
            kept.pop(key)
        more, _ = put_many(store, range(3000, 3003))
        assert len(more) == 3
        kept.update(more)
        check_intact(store, kept)
        assert store.gc(grace=0) == []
        record("full-disk", {"puts_before_full": len(kept) - 3, "failed_puts": failures + 1,
                             "fs": "tmpfs 8 MB", "verify_problems": 0})
        store.close()


FSIZE_CHILD = r"""
import json, resource, signal, sys
sys.path.insert(0, sys.argv[2])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), int(sys.argv[3])))
import kvstore
from workers import prefix_cache, seed_tokens
s = kvstore.SnapshotStore(sys.argv[1])
out = {"stored": {}, "failed": 0}
for seed in range(1, 40):
    toks = seed_tokens(seed, 100 * seed)
    key = s.put("synthetic", toks, prefix_cache(toks, 2))
    if key is None:
        out["failed"] += 1
    else:
        out["stored"][key] = toks
    c, rest = s.fetch_nearest("synthetic", seed_tokens(1, 100) + [5])
    out.setdefault("hits", 0)
    out["hits"] += c is not None
out["faults"] = s.counters["faults"]
s.close()
print(json.dumps(out))
"""


def test_file_size_limit_fails_open(tmp_path):
    """RLIMIT_FSIZE with SIGXFSZ ignored: every write past the limit is EFBIG,
    as on a full disk for files that grow (blobs, the LMDB file)."""
    path = tmp_path / "store"
    kvstore.SnapshotStore(path, block_tokens=16).close()
    out = subprocess.run([sys.executable, "-c", FSIZE_CHILD, str(path), str(HERE), str(1 << 20)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["failed"] >= 1 and res["stored"] and res["hits"] == 39
    assert "Traceback" not in out.stderr
    store = kvstore.SnapshotStore(path)
    check_intact(store, res["stored"])
    assert {e.key for e in store.entries()} == set(res["stored"])
    assert store.gc(grace=0) == [] and list((path / "tmp").iterdir()) == []
    store.close()


def test_full_lmdb_map_keeps_serving_and_can_be_pruned(tmp_path):
    store = kvstore.SnapshotStore(tmp_path / "s", map_size=1 << 20, block_tokens=16)
    kept = {}
    for seed in range(1, 400):
        toks = seed_tokens(seed, 1500)  # 6 kB of tokens per record
        key = store.put(FP, toks, prefix_cache(toks, 1))
        if key is None:
            break
        kept[key] = toks
    assert key is None, "the 1 MiB map never filled"
    check_intact(store, kept)
    store.flush_access()  # access updates into a full map fail quietly or fit
    # deleting from a full map works (prune by policy frees room), and puts resume
    count, freed = store.prune(max_bytes=store.total_bytes() // 2)
    assert count >= 1
    for k in list(kept):
        if k not in {e.key for e in store.entries()}:
            kept.pop(k)
    toks = seed_tokens(999, 1500)
    assert store.put(FP, toks, prefix_cache(toks, 1)) is not None
    kept[store.lookup(FP, toks + [1]).key] = toks
    check_intact(store, kept)
    assert store.gc(grace=0) == []
    store.close()


def test_saturated_queue_on_a_filling_disk_keeps_serving(tmp_path):
    """A 2-slot write-behind queue whose writer first waits for the LMDB
    write lock (another process holds it), then fills a small disk: inserts
    never wait, fetches are served from memory, every snapshot is written,
    dropped or failed and counted; earlier snapshots stay intact."""
    from procs import hold_write_lock, release

    with small_fs(tmp_path / "fs", "6m") as fs:
        store = kvstore.SnapshotStore(fs / "store", block_tokens=16)
        kept, _ = put_many(store, range(1, 4))
        c = TieredPromptCache(store, max_size=200, queue_size=2)
        holder = hold_write_lock(fs / "store")
        worst = 0.0
        try:
            for i in range(100):
                toks = seed_tokens(5000 + i, 300)
                t = time.monotonic()
                c.insert_cache(FP, toks, prefix_cache(toks, 2), cache_type="system")
                worst = max(worst, time.monotonic() - t)
                got = c.fetch(FP, toks + [5])
                assert got.source == "memory" and check_prefix_layers(got.cache, toks)
            saturated = c.counters()
        finally:
            release(holder)
        assert saturated["writes.dropped"] >= 90 and saturated["queue.depth"] == 2
        for i in range(100, 160):  # the writer runs again, into a disk that fills up
            toks = seed_tokens(5000 + i, 300)
            c.insert_cache(FP, toks, prefix_cache(toks, 2), cache_type="system")
            assert c.fetch(FP, toks + [5]).source == "memory"
            # each one reaches the disk (a busy machine's writer would otherwise see most dropped)
            assert c.flush(60)
        assert c.flush(120)
        n = c.counters()
        assert n["writes.done"] + n["writes.failed"] + n["writes.dropped"] == 160
        assert n["writes.failed"] >= 1, "the disk never filled"
        # earlier snapshots are still served from disk through the same front
        for key, toks in kept.items():
            got = c.fetch(FP, toks + [5])
            assert got.source == "disk" and check_prefix_layers(got.cache, toks)
        c.close()
        check_intact(store, kept)
        assert store.gc(grace=0) == []
        record("saturated-queue-filling-disk", {
            "inserts": 160, "written": n["writes.done"], "dropped": n["writes.dropped"],
            "failed": n["writes.failed"], "worst_insert_ms_while_saturated": round(worst * 1000, 1)})
        store.close()


def test_serve_answers_while_the_disk_is_full(tmp_path, tiny_model):
    from kvstore_cli.demo import LocalServer as Server, cached

    model = tiny_model("llama")
    with small_fs(tmp_path / "fs", "16m") as fs:
        # the store lives on the small filesystem; the server log next to the link does not
        (tmp_path / "store").symlink_to(fs / "store")
        store = kvstore.SnapshotStore(tmp_path / "store", block_tokens=16)
        kept, _ = put_many(store, range(1, 4))
        store.close()
        with Server(tmp_path / "store", model) as s:
            warm = s.chat("Do you sell hammers?")  # stores the system segment while there is room
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                with kvstore.SnapshotStore(tmp_path / "store") as st:
                    if any(e.tier == "system" for e in st.entries()):
                        break
                time.sleep(0.2)
            fill_up(fs)
            answers = [s.chat(q) for q in ("Where is the paint aisle?", "Do you sell nails?",
                                            "What time do you open?")]
            answers.append(s.chat("A new conversation", system="Another system prompt entirely. " * 10))
            log = s.stop()
        assert cached(warm) == 0
        for a in answers:
            assert a["usage"]["completion_tokens"] > 0 and a["choices"][0]["finish_reason"]
        # the stored system segment was still served from the full disk
        assert all(cached(a) > 0 for a in answers[:3])
        assert "Traceback" not in log
        assert "No space left" in log or "failed" in log
        store = kvstore.SnapshotStore(tmp_path / "store")
        check_intact(store, kept)
        assert store.gc(grace=0) == []
        store.close()
        record("serve-full-disk", {"requests": len(answers) + 1, "served": len(answers) + 1,
                                   "cached_tokens": [cached(a) for a in answers], "fs": "tmpfs 16 MB"})
