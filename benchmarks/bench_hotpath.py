"""Hot path: what kvstore costs the caller's thread, and how fast it writes.

1. ``insert_cache`` per call, caller's thread only: mlx-lm's
   ``LRUPromptCache``, kvstore's ``TieredPromptCache`` without a store and
   with one (the snapshot is queued; the writer thread does the I/O).
2. ``fetch_nearest_cache`` per call against the same three, for prompts of
   several lengths: a continuation the memory tier covers to the last token
   (``extend``), a new turn after a stored prompt (``new_turn``: kvstore also
   asks the disk whether it holds more), and an unrelated prompt (``miss``).
3. Disk write throughput: ``SnapshotStore.put`` (fsync), the write-behind
   queue drained by its thread, and mlx-lm's ``save_prompt_cache`` (+fsync),
   against a raw write of the same bytes made durable the way a blob is (the
   file fsynced, then its folder), measured in the same rounds; the same raw
   write on a thread at the writer's priority, and written as kvstore writes
   a blob (the disk started on each 2 MB at once); where a ``put``'s time goes.

Calls are interleaved across contenders; caches are random bf16 KV of a
real model shape (a hot path does not care how the KV was computed).

Run: ``python benchmarks/bench_hotpath.py --quick`` (or ``--full``);
``--parts write`` runs the write throughput part alone.
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402
from common import log, now  # noqa: E402

MODES = {
    "quick": {"shape": "llama-135m", "insert_sizes": [2048], "insert_calls": 12,
              "fetch_sizes": [2048, 32768], "fetch_calls": 30, "new_turn": 64,
              "write": [("llama-135m", 2048)], "write_snapshots": 3, "write_repeats": 15},
    "full": {"shape": "llama-135m", "insert_sizes": [512, 2048, 8192, 32768], "insert_calls": 30,
             "fetch_sizes": [512, 2048, 8192, 32768], "fetch_calls": 100, "new_turn": 64,
             "write": [("llama-135m", 2048), ("llama-135m", 8192), ("qwen3-0.6b", 2048)],
             "write_snapshots": 4, "write_repeats": 11},
}
FP = "bench-hotpath-model"
LABELS = {
    "lru": "mlx-lm LRUPromptCache",
    "tiered_mem": "kvstore TieredPromptCache, memory only",
    "tiered_disk": "kvstore TieredPromptCache with a store",
    "raw": "raw write + fsync (file and folder)",
    "raw_bg": "raw write + fsync at the writer thread's priority",
    "raw_wb": "raw write + fsync, the disk started on each 2 MB at once (as kvstore writes)",
    "put": "SnapshotStore.put (fsync)",
    "queue": "TieredPromptCache write-behind queue (fsync), then flush",
    "queue_bg": "TieredPromptCache write-behind queue (fsync), nobody waiting: the writer at the lowest priority",
    "mlx_save": "mlx-lm save_prompt_cache + fsync",
}


def tokens(rng, n):
    return rng.integers(10, 500, n).tolist()


def insert_bench(cfg, scratch, rng):
    from mlx_lm.models.cache import LRUPromptCache

    from kvstore import SnapshotStore, TieredPromptCache

    out = []
    for n in cfg["insert_sizes"]:
        # past 8K tokens two layers of the shape: what the caller pays per call is per
        # layer (the structure copied, arrays evaluated); whole-model KV would make
        # the writer write 20 GB in the background
        cache = C.shape_cache(cfg["shape"], n, seed=n)
        if n > 8192:
            cache = cache[:2]
        store = SnapshotStore(scratch / f"insert-{n}")
        caches = {
            "lru": LRUPromptCache(max_size=10),
            "tiered_mem": TieredPromptCache(None, max_size=10),
            "tiered_disk": TieredPromptCache(store, max_size=10, queue_size=64),
        }
        times = {k: [] for k in caches}
        for i in range(cfg["insert_calls"]):
            toks = tokens(rng, n)
            for name in C.rotated(caches, i):
                c = caches[name]
                t = now()
                c.insert_cache(FP, toks, cache, cache_type="user")
                times[name].append(now() - t)
        t = now()
        caches["tiered_disk"].flush()
        drain = now() - t
        counters = caches["tiered_disk"].counters()
        for c in caches.values():
            if hasattr(c, "close"):
                c.close()
        store.close()
        out.append({"tokens": n, "kv_bytes": sum(c.keys.nbytes + c.values.nbytes for c in cache),
                    "calls": {k: C.summary(v, p99=True) for k, v in times.items()},
                    "raw_calls": times, "drain_after_s": drain,
                    "writes": {k: counters.get(k, 0) for k in ("writes.queued", "writes.done", "writes.dropped",
                                                               "bytes.written")}})
        log(f"hotpath insert {n}: " + ", ".join(f"{k} {C.median(v) * 1e3:.3f} ms" for k, v in times.items()))
        del cache, caches
        C.fresh_memory()
    return out


def fetch_bench(cfg, scratch, rng):
    from mlx_lm.models.cache import LRUPromptCache

    from kvstore import SnapshotStore, TieredPromptCache

    out = []
    for n in cfg["fetch_sizes"]:
        # the KV size does not change a memory fetch (copies are structural):
        # a one-layer cache keeps 32K-token cases small
        cache = C.shape_cache(cfg["shape"], n, seed=n, fill=False)[:1]
        stored = tokens(rng, n)
        store = SnapshotStore(scratch / f"fetch-{n}", fsync=False)
        caches = {
            "lru": LRUPromptCache(max_size=10),
            "tiered_mem": TieredPromptCache(None, max_size=10),
            "tiered_disk": TieredPromptCache(store, max_size=10),
        }
        for c in caches.values():
            c.insert_cache(FP, stored, cache, cache_type="user")
        caches["tiered_disk"].flush()
        # a few other stored prompts, so the index is not trivially small
        for _ in range(20):
            store.put(FP, tokens(rng, 256), C.shape_cache(cfg["shape"], 256, fill=False)[:1], tier="user")
        kinds = {
            "extend": lambda: stored + tokens(rng, 1),
            "new_turn": lambda: stored + tokens(rng, cfg["new_turn"]),
            "miss": lambda: tokens(rng, n + cfg["new_turn"]),
        }
        res = {"tokens": n, "kinds": {}}
        for kind, make in kinds.items():
            times = {k: [] for k in caches}
            reused = {}
            for i in range(cfg["fetch_calls"]):
                req = make()
                for name in C.rotated(caches, i):
                    c = caches[name]
                    t = now()
                    got, rest = c.fetch_nearest_cache(FP, req)
                    times[name].append(now() - t)
                    reused[name] = len(req) - len(rest)
                    del got
            res["kinds"][kind] = {"calls": {k: C.summary(v, p99=True) for k, v in times.items()},
                                  "reused": reused}
            log(f"hotpath fetch {n} {kind}: " + ", ".join(f"{k} {C.median(v) * 1e3:.3f} ms"
                                                          for k, v in times.items()))
        for c in caches.values():
            if hasattr(c, "close"):
                c.close()
        store.close()
        out.append(res)
        C.fresh_memory()
    # where the time of a new-turn fetch goes for the longest prompt
    out.append({"breakdown": lookup_breakdown(cfg, scratch, rng)})
    return out


def lookup_breakdown(cfg, scratch, rng, reps=50):
    """Per-stage seconds of ``SnapshotStore.lookup`` for the longest fetch size."""
    import numpy as np

    from kvstore import SnapshotStore
    from kvstore.keys import TokenChain, as_tokens, namespace

    n = max(cfg["fetch_sizes"])
    store = SnapshotStore(scratch / "breakdown", fsync=False)
    stored = tokens(rng, n)
    store.put(FP, stored, C.shape_cache(cfg["shape"], n, fill=False)[:1], tier="user")
    req = stored + tokens(rng, cfg["new_turn"])
    arr = as_tokens(req)
    root = namespace(FP)
    stages = {
        "as_tokens(list)": lambda: as_tokens(req),
        "TokenChain (blake2b per 64-token block)": lambda: TokenChain(root, arr, store.block).links[-1],
        "array.tolist()": lambda: arr.tolist(),
        "SnapshotStore.lookup (conversion, hashing, index)": lambda: store.lookup(FP, req),
    }
    times = {k: [] for k in stages}
    for i in range(reps):
        for k in C.rotated(stages, i):
            t = now()
            stages[k]()
            times[k].append(now() - t)
    raw = np.asarray(req, dtype="<i4").tobytes()
    import hashlib

    def one_hash():
        hashlib.blake2b(raw, digest_size=16).digest()

    t = []
    for _ in range(reps):
        s = now()
        one_hash()
        t.append(now() - s)
    times["one blake2b over all tokens (reference)"] = t
    store.close()
    return {"tokens": len(req), "stages": {k: C.summary(v, p99=True) for k, v in times.items()}}


class WriteStages:
    """Seconds a ``put`` spends in each stage of a snapshot write, by wrapping
    kvstore's functions (a stage another version of kvstore lacks is not timed)."""

    STAGES = (("kvstore.codec", None, "encode", "encode"),
              ("kvstore.backends.files", None, "_write_data", "data (checksums and writes)"),
              ("kvstore.backends.files", None, "_sync_file", "fsync of the blob"),
              ("kvstore.backends.files", None, "_place", "rename and fsync of its folder"),
              ("kvstore.backends.lmdb_index", "LmdbIndex", "write", "index transaction and commit"))

    def __init__(self):
        from collections import Counter

        self.t, self._undo = Counter(), []

    def install(self):
        import importlib

        for module, owner, attr, name in self.STAGES:
            obj = importlib.import_module(module)
            obj = getattr(obj, owner) if owner else obj
            orig = getattr(obj, attr, None)
            if orig is None:
                continue
            self._undo.append((obj, attr, orig))
            setattr(obj, attr, C.timed(orig, self.t, name))
        return self

    def uninstall(self):
        for obj, attr, orig in reversed(self._undo):
            setattr(obj, attr, orig)
        self._undo = []


def _sync_file_range():
    """Linux's ``sync_file_range`` through libc, or ``None``."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


def raw_write(folder, nbytes, k, writeback=False):
    """Seconds to write ``k`` files of ``nbytes`` into ``folder`` as a blob is made durable:
    each file written with ``os.write``, fsynced, then its folder fsynced. With
    ``writeback`` it is written 2 MB at a time, the disk started on each piece at once
    (``sync_file_range``), as kvstore writes a blob."""
    import numpy as np

    piece = 2 << 20 if writeback else 16 << 20
    start = _sync_file_range() if writeback else None
    buf = memoryview(np.random.default_rng(1).integers(0, 255, min(nbytes, piece), dtype=np.uint8))
    folder.mkdir()
    t = now()
    dfd = os.open(folder, os.O_RDONLY)
    try:
        for i in range(k):
            fd = os.open(folder / f"raw-{i}.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                done = 0
                while done < nbytes:
                    n = os.write(fd, buf[: min(nbytes - done, len(buf))])
                    if start is not None:
                        start(fd, done, n, 2)  # SYNC_FILE_RANGE_WRITE
                    done += n
                os.fsync(fd)
            finally:
                os.close(fd)
            os.fsync(dfd)
    finally:
        os.close(dfd)
    return now() - t


def at_writer_priority(fn):
    """``fn()`` run on a thread at the write-behind thread's priority."""
    import threading

    from kvstore.writer import lower_priority

    out = []

    def run():
        lower_priority()
        out.append(fn())

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return out[0]


def write_bench(cfg, scratch, rng):
    """Write throughput of the same bytes by each contender, in rounds.

    Every round runs each contender once, in a fresh random order (no contender
    always follows the same one), each writing ``write_snapshots`` snapshots
    into a folder of its own that is removed, outside the timing, before the
    next contender starts. Rates are medians over rounds; ``paired`` ratios are
    medians of each round's ratio to that round's raw write.
    """
    import shutil

    import mlx.core as mx
    import numpy as np
    from mlx_lm.models.cache import save_prompt_cache

    from kvstore import SnapshotStore, TieredPromptCache

    out = []
    order = np.random.default_rng(5)
    for shape, n in cfg["write"]:
        cache = C.shape_cache(shape, n, seed=n)
        nbytes = sum(c.keys[:, :, :n].nbytes + c.values[:, :, :n].nbytes for c in cache)
        k = cfg["write_snapshots"]
        names = ("raw", "raw_bg", "raw_wb", "put", "queue", "queue_bg", "mlx_save")
        runs = {name: [] for name in names}
        stages, per_round, callers, writer_busy = WriteStages(), [], [], []

        def put(folder):
            store = SnapshotStore(folder)
            stages.t.clear()
            stages.install()
            try:
                t = now()
                for _ in range(k):
                    assert store.put(FP, tokens(rng, n), cache, tier="user")
                s = now() - t
            finally:
                stages.uninstall()
            store.close()
            per_round.append({**stages.t, "other": s - sum(stages.t.values())})
            return s

        def queue(folder, wait=True):
            """Inserts, then ``flush`` (the writer runs at the caller's priority while it
            waits) or, without ``wait``, polling until written (the writer stays low)."""
            store = SnapshotStore(folder)
            tc = TieredPromptCache(store, max_size=2 * k, queue_size=2 * k)
            busy = []
            tc.on_write(lambda seconds, ok: busy.append(seconds))
            caller = 0.0
            t = now()
            for _ in range(k):
                c0 = now()
                tc.insert_cache(FP, tokens(rng, n), cache, cache_type="user")
                caller += now() - c0
            if wait:
                tc.flush()
            else:
                while tc.counters().get("writes.done", 0) + tc.counters().get("writes.failed", 0) < k:
                    time.sleep(0.002)
            s = now() - t
            assert tc.counters()["writes.done"] == k, tc.counters()
            tc.close()
            store.close()
            if wait:
                callers.append(caller / k)
                writer_busy.append(sum(busy))
            return s

        def mlx_save(folder):
            folder.mkdir()
            t = now()
            dfd = os.open(folder, os.O_RDONLY)
            for i in range(k):
                p = folder / f"mlx-{i}.safetensors"
                save_prompt_cache(str(p), cache)
                fd = os.open(p, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
                os.fsync(dfd)
            os.close(dfd)
            return now() - t

        fns = {"raw": lambda f: raw_write(f, nbytes, k),
               "raw_bg": lambda f: at_writer_priority(lambda: raw_write(f, nbytes, k)),
               "raw_wb": lambda f: raw_write(f, nbytes, k, writeback=True),
               "put": put, "queue": queue, "queue_bg": lambda f: queue(f, wait=False), "mlx_save": mlx_save}
        loads = [C.loadavg()]
        for r in range(cfg["write_repeats"]):
            for i in order.permutation(len(names)):
                name = names[i]
                folder = scratch / f"write-{shape}-{n}-{name}-{r}"
                runs[name].append(fns[name](folder))
                shutil.rmtree(folder, ignore_errors=True)
            C.fresh_memory()
        loads.append(C.loadavg())
        out.append(write_result(shape, n, nbytes, k, runs, per_round, callers, writer_busy, loads))
        del cache
        mx.clear_cache()
    return out


def write_result(shape, n, nbytes, k, runs, per_round, callers, writer_busy, loads):
    mb = nbytes * k / 1e6
    res = {"shape": shape, "tokens": n, "snapshot_bytes": nbytes, "snapshots": k, "rounds": len(runs["raw"]),
           "load": loads, "seconds": {name: C.summary(v) for name, v in runs.items()},
           "mb_per_s": {name: mb / C.median(v) for name, v in runs.items()},
           "queue_caller_per_insert": C.summary(callers)}
    res["ratio_to_raw"] = {name: res["mb_per_s"][name] / res["mb_per_s"]["raw"] for name in runs}
    res["paired_ratio_to_raw"] = {name: C.median([r / x for r, x in zip(runs["raw"], v)]) for name, v in runs.items()}
    # per snapshot, the median over rounds of each stage (medians need not add up to the put's median)
    res["put_stages_ms"] = {name: 1e3 * C.median([r.get(name, 0.0) for r in per_round]) / k for name in per_round[0]}
    res["raw_ms_per_file"] = 1e3 * C.median(runs["raw"]) / k
    # the queue's wall time less the writer's time inside put: hand-offs, wake-ups, waiting for a CPU
    res["queue_ms_outside_put"] = 1e3 * C.median([q - b for q, b in zip(runs["queue"], writer_busy)]) / k
    log(f"hotpath write {shape} {n} (load {loads[0][0]:.2f} -> {loads[-1][0]:.2f}): " + ", ".join(
        f"{name} {v:.0f} MB/s ({res['ratio_to_raw'][name]:.2f}x, paired {res['paired_ratio_to_raw'][name]:.2f}x)"
        for name, v in res["mb_per_s"].items()))
    log(f"hotpath write {shape} {n} put stages per snapshot: " + ", ".join(
        f"{name} {v:.2f} ms" for name, v in res["put_stages_ms"].items()) + f"; raw {res['raw_ms_per_file']:.2f} ms")
    return res


def main(argv=None):
    import numpy as np

    p = C.mode_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--parts", nargs="+", choices=("insert", "fetch", "write"), default=["insert", "fetch", "write"],
                   help="which parts to run (default: all three)")
    args = p.parse_args(argv)
    cfg = MODES[args.mode]
    result = C.header("hotpath", args.mode, argv)
    result["config"] = cfg
    result["parts"] = args.parts
    result["labels"] = LABELS
    rng = np.random.default_rng(11)
    with C.scratch() as scratch:
        for part, bench in (("insert", insert_bench), ("fetch", fetch_bench), ("write", write_bench)):
            if part in args.parts:
                result[part] = bench(cfg, scratch, rng)
    path = C.finish(result, out=args.out)
    log(f"hotpath: wrote {path}")


if __name__ == "__main__":
    main()
