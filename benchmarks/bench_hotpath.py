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
   against a raw fsynced write of the same bytes measured in the same run.

Calls are interleaved across contenders; caches are random bf16 KV of a
real model shape (a hot path does not care how the KV was computed).

Run: ``python benchmarks/bench_hotpath.py --quick`` (or ``--full``).
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402
from common import log, now  # noqa: E402

MODES = {
    "quick": {"shape": "llama-135m", "insert_sizes": [2048], "insert_calls": 12,
              "fetch_sizes": [2048, 32768], "fetch_calls": 30, "new_turn": 64,
              "write": [("llama-135m", 2048)], "write_snapshots": 3, "write_repeats": 2},
    "full": {"shape": "llama-135m", "insert_sizes": [512, 2048, 8192, 32768], "insert_calls": 30,
             "fetch_sizes": [512, 2048, 8192, 32768], "fetch_calls": 100, "new_turn": 64,
             "write": [("llama-135m", 2048), ("llama-135m", 8192), ("qwen3-0.6b", 2048)],
             "write_snapshots": 4, "write_repeats": 5},
}
FP = "bench-hotpath-model"
LABELS = {
    "lru": "mlx-lm LRUPromptCache",
    "tiered_mem": "kvstore TieredPromptCache, memory only",
    "tiered_disk": "kvstore TieredPromptCache with a store",
    "raw": "raw write + fsync",
    "put": "SnapshotStore.put (fsync)",
    "queue": "TieredPromptCache write-behind queue (fsync)",
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


def write_bench(cfg, scratch, rng):
    import mlx.core as mx
    from mlx_lm.models.cache import save_prompt_cache

    from kvstore import SnapshotStore, TieredPromptCache

    out = []
    for shape, n in cfg["write"]:
        cache = C.shape_cache(shape, n, seed=n)
        nbytes = sum(c.keys[:, :, :n].nbytes + c.values[:, :, :n].nbytes for c in cache)
        k = cfg["write_snapshots"]
        runs = {name: [] for name in ("raw", "put", "queue", "mlx_save")}
        store_n = [0]

        def fresh_store():
            store_n[0] += 1
            return SnapshotStore(scratch / f"write-{shape}-{n}-{store_n[0]}")

        def raw():
            # write_probe times only the writes and fsync (not making its buffer)
            s = sum(C.write_probe(scratch / f"raw-{i}.bin", nbytes) for i in range(k))
            for i in range(k):
                os.unlink(scratch / f"raw-{i}.bin")
            return s

        def put():
            store = fresh_store()
            t = now()
            for _ in range(k):
                assert store.put(FP, tokens(rng, n), cache, tier="user")
            s = now() - t
            store.close()
            return s

        def queue():
            store = fresh_store()
            tc = TieredPromptCache(store, max_size=2 * k, queue_size=2 * k)
            caller = 0.0
            t = now()
            for _ in range(k):
                c0 = now()
                tc.insert_cache(FP, tokens(rng, n), cache, cache_type="user")
                caller += now() - c0
            tc.flush()
            s = now() - t
            assert tc.counters()["writes.done"] == k, tc.counters()
            tc.close()
            store.close()
            return s, caller

        def mlx_save():
            t = now()
            for i in range(k):
                p = scratch / f"mlx-{i}.safetensors"
                save_prompt_cache(str(p), cache)
                fd = os.open(p, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
            s = now() - t
            for i in range(k):
                os.unlink(scratch / f"mlx-{i}.safetensors")
            return s

        fns = {"raw": raw, "put": put, "queue": queue, "mlx_save": mlx_save}
        callers = []
        for r in range(cfg["write_repeats"]):
            for name in C.rotated(fns, r):
                got = fns[name]()
                if name == "queue":
                    got, caller = got
                    callers.append(caller / k)
                runs[name].append(got)
            C.fresh_memory()
        mb = nbytes * k / 1e6
        res = {"shape": shape, "tokens": n, "snapshot_bytes": nbytes, "snapshots": k,
               "seconds": {name: C.summary(v) for name, v in runs.items()},
               "mb_per_s": {name: mb / C.median(v) for name, v in runs.items()},
               "queue_caller_per_insert": C.summary(callers)}
        res["ratio_to_raw"] = {name: res["mb_per_s"][name] / res["mb_per_s"]["raw"] for name in runs}
        log(f"hotpath write {shape} {n}: " + ", ".join(f"{k2} {v:.0f} MB/s" for k2, v in res["mb_per_s"].items()))
        out.append(res)
        del cache
        mx.clear_cache()
    return out


def main(argv=None):
    import numpy as np

    p = C.mode_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = p.parse_args(argv)
    cfg = MODES[args.mode]
    result = C.header("hotpath", args.mode, argv)
    result["config"] = cfg
    result["labels"] = LABELS
    rng = np.random.default_rng(11)
    with C.scratch() as scratch:
        result["insert"] = insert_bench(cfg, scratch, rng)
        result["fetch"] = fetch_bench(cfg, scratch, rng)
        result["write"] = write_bench(cfg, scratch, rng)
    path = C.finish(result, out=args.out)
    log(f"hotpath: wrote {path}")


if __name__ == "__main__":
    main()
