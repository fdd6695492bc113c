"""Scale: a store with many snapshots (100,000 in the full run).

The store is built through ``SnapshotStore.put`` by two processes at once
(fsync off for the build: the index and blobs are the same, only the
durability wait is skipped), from tiny synthetic caches (one layer, one
KV head of width 8, float16), with the prefix structure of real traffic:
P system prompts, conversations under each, and T growing checkpoints per
conversation (tiers system, user, assistant), plus one long conversation
with checkpoints up to 32K tokens.

Measured: ``SnapshotStore.lookup`` (index only) and ``fetch_nearest`` (with
blob I/O) for 32K-token prompts (a hit on the long conversation, a prompt
that shares a popular system prompt, a miss) as the store grows; the
``kvstore`` commands ``ls``, ``stats``, ``prune`` (to half the bytes) and
``gc``, each several times (medians; prune and gc on fresh copies of the
store); bytes on disk with shared prefixes against what the snapshots would
take unshared and the unique (distinct-prefix) bytes.

Run: ``python benchmarks/bench_scale.py --quick`` (or ``--full``).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402
from common import log, now  # noqa: E402

MODES = {
    "quick": {"snapshots": 5_000, "systems": 20, "turns": 4, "system_tokens": 512, "turn_tokens": (32, 128),
              "milestones": [1_000, 5_000], "lookups": 50, "final_lookups": 100, "request_tokens": 32_768,
              "builders": 2, "command_runs": 1},
    "full": {"snapshots": 100_000, "systems": 100, "turns": 4, "system_tokens": 512, "turn_tokens": (32, 128),
             "milestones": [1_000, 10_000, 100_000], "lookups": 50, "final_lookups": 200, "request_tokens": 32_768,
             "builders": 2, "command_runs": 3},
}
FP = "bench-scale-model"
WIDTH = 8
BYTES_PER_TOKEN = 2 * 1 * WIDTH * 2  # keys + values, one head, float16
KVSTORE = shutil.which("kvstore", path=os.path.dirname(sys.executable)) or "kvstore"


def system_tokens(cfg, p):
    import numpy as np

    return np.random.default_rng(1_000 + p).integers(10, 500, cfg["system_tokens"]).tolist()


def conversation(cfg, j):
    """(system index, [token lists of each checkpoint]) of conversation ``j``."""
    import numpy as np

    p = j % cfg["systems"]
    rng = np.random.default_rng(10_000_000 + j)
    toks = system_tokens(cfg, p)
    lo, hi = cfg["turn_tokens"]
    out = []
    for _t in range(cfg["turns"]):
        toks = toks + rng.integers(10, 500, int(rng.integers(lo, hi + 1))).tolist()
        out.append(toks)
    return p, out


def tiny_cache(n):
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    c = KVCache()
    cap = -(-n // 256) * 256
    c.keys = mx.zeros((1, 1, cap, WIDTH), dtype=mx.float16)
    c.values = mx.zeros((1, 1, cap, WIDTH), dtype=mx.float16)
    c.offset = n
    return [c]


def builder(spec):
    """Put the checkpoints of conversations ``spec['conversations']`` into the store."""
    import lmdb

    from kvstore import SnapshotStore

    # the build skips durability waits: blob fsyncs (fsync=False) and the
    # index commit's fsync (LMDB sync=False in this process only); the
    # files are the same, the kernel writes them back on its own time
    _open = lmdb.open
    lmdb.open = lambda *a, **k: _open(*a, **{**k, "sync": False})
    cfg = spec["cfg"]
    store = SnapshotStore(spec["store"], fsync=False)
    t = now()
    puts = 0
    for j in spec["conversations"]:
        _p, checkpoints = conversation(cfg, j)
        for i, toks in enumerate(checkpoints):
            tier = "user" if i % 2 == 0 else "assistant"
            if store.put(FP, toks, tiny_cache(len(toks)), tier=tier) is None:
                raise RuntimeError("put failed")
            puts += 1
    store.close()
    print(json.dumps({"puts": puts, "seconds": now() - t}), flush=True)


def build_to(cfg, store_path, start, end, scratch):
    """Conversations [start, end) by ``cfg['builders']`` processes; returns (puts, wall seconds)."""
    k = cfg["builders"]
    procs = []
    t = now()
    for b in range(k):
        spec = {"cfg": cfg, "store": str(store_path), "conversations": list(range(start + b, end, k))}
        path = Path(scratch) / f"builder-{b}.json"
        path.write_text(json.dumps(spec))
        procs.append(subprocess.Popen([C.PY, __file__, "--builder", str(path)], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    puts = 0
    for proc in procs:
        out, err = proc.communicate(timeout=7200)
        if proc.returncode != 0:
            raise RuntimeError(f"builder failed: {err[-3000:]}")
        puts += json.loads(out.strip().splitlines()[-1])["puts"]
    return puts, now() - t


def requests(cfg, long_tokens):
    import numpy as np

    rng = np.random.default_rng(5)
    n = cfg["request_tokens"]
    sys0 = system_tokens(cfg, 0)
    return {
        "hit_long": long_tokens[: n - 64] + rng.integers(10, 500, 64).tolist(),
        "shared_system": sys0 + rng.integers(10, 500, n - len(sys0)).tolist(),
        "miss": rng.integers(10, 500, n).tolist(),
    }


def measure_lookups(store, reqs, reps, fetch=False):
    """Lookups of each request, and beside each one the conversion every lookup starts with
    (the request's token list to int32, ``as_tokens``): the floor a lookup cannot go under."""
    from kvstore.keys import as_tokens

    out = {}
    for kind, req in reqs.items():
        times, convert, match = [], [], None
        for _ in range(reps):
            t = now()
            match = store.lookup(FP, req)
            times.append(now() - t)
            t = now()
            as_tokens(req)
            convert.append(now() - t)
        res = {"lookup": C.summary(times, p99=True), "convert": C.summary(convert, p99=True),
               "match": None if match is None else {"tokens": match.tokens, "kind": match.kind}}
        if fetch and match is not None:
            ft = []
            for _ in range(max(10, reps // 4)):
                t = now()
                cache, rest = store.fetch_nearest(FP, req)
                ft.append(now() - t)
                assert cache is not None
            res["fetch"] = C.summary(ft, p99=True)
        out[kind] = res
    return out


def cli(*args, timeout=3600):
    t = now()
    proc = subprocess.run([KVSTORE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=timeout)
    s = now() - t
    if proc.returncode != 0:
        raise RuntimeError(f"kvstore {' '.join(args)} failed: {proc.stderr[-2000:]}")
    return s, proc.stdout


def main(argv=None):
    p = C.mode_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--snapshots", type=int, help="store size (default: by mode)")
    p.add_argument("--builder", help=argparse.SUPPRESS)
    p.add_argument("--keep-store", metavar="DIR",
                   help="copy the built store to DIR (which must not exist) before the commands change it")
    args = p.parse_args(argv)
    if args.builder:
        return builder(json.loads(Path(args.builder).read_text()))
    cfg = dict(MODES[args.mode])
    if args.snapshots:
        cfg["snapshots"] = args.snapshots
        cfg["milestones"] = [m for m in cfg["milestones"] if m < args.snapshots] + [args.snapshots]
    from kvstore import SnapshotStore

    result = C.header("scale", args.mode, argv)
    from kvstore.maintenance.deleting import DELETE_HOLD

    result["config"] = {**cfg, "delete_hold_s": DELETE_HOLD}
    result["build_note"] = ("built with SnapshotStore.put(fsync=False) by %d processes at once, their LMDB "
                            "environments opened with sync=False (no fsync per index commit); tiny caches: "
                            "1 layer, 1 KV head of width 8, float16 (%d bytes per token)" %
                            (cfg["builders"], BYTES_PER_TOKEN))
    per_conv = cfg["turns"]
    with C.scratch() as scratch:
        store_path = scratch / "store"
        store = SnapshotStore(store_path, fsync=False)
        t = now()
        for s in range(cfg["systems"]):
            store.put(FP, system_tokens(cfg, s), tiny_cache(cfg["system_tokens"]), tier="system")
        # one long conversation under system prompt 0, checkpoints up to the request size
        import numpy as np

        rng = np.random.default_rng(3)
        long_tokens = system_tokens(cfg, 0) + rng.integers(10, 500, cfg["request_tokens"]).tolist()
        long_points = [8_192, 16_384, 24_576, cfg["request_tokens"] - 128]
        for n in long_points:
            store.put(FP, long_tokens[:n], tiny_cache(n), tier="user")
        store.close()
        built = cfg["systems"] + len(long_points)
        result["build"] = [{"snapshots": built, "seconds": now() - t, "puts_per_s": built / (now() - t)}]
        reqs = requests(cfg, long_tokens)
        result["milestones"] = []
        conv, base = 0, built
        for m in cfg["milestones"]:
            target = max(0, (m - base) // per_conv)
            if target > conv:
                puts, secs = build_to(cfg, store_path, conv, target, scratch)
                conv = target
                built += puts
                result["build"].append({"snapshots": built, "puts": puts, "seconds": secs, "puts_per_s": puts / secs})
                log(f"scale: {built} snapshots ({puts / secs:.0f} puts/s with {cfg['builders']} processes)")
            store = SnapshotStore(store_path)
            last = m == cfg["milestones"][-1]
            res = measure_lookups(store, reqs, cfg["final_lookups"] if last else cfg["lookups"], fetch=last)
            store.close()
            result["milestones"].append({"snapshots": built, "requests": res})
            log(f"scale: lookup at {built}: " + ", ".join(
                f"{k} p50 {v['lookup']['median'] * 1e3:.2f} ms p99 {v['lookup']['p99'] * 1e3:.2f} ms"
                for k, v in res.items()))
        # bytes: shared segments against unshared and distinct-prefix bytes
        store = SnapshotStore(store_path)
        entries = store.entries()
        referenced = sum(e.tokens for e in entries)
        from kvstore.records import decode_segment, decode_snapshot

        with store.index.read() as r:
            seg_rows = sum(decode_segment(v).rows for _k, v in r.segments())
            segments = r.count("segments")
            # how many segment pieces a restore of each snapshot reads, and how many are
            # shorter than one 64-token block (other than a snapshot's own last piece)
            pieces, short = [], 0
            for _k, v in r.snapshots():
                ext = decode_snapshot(v).extents
                pieces.append(len(ext))
                short += sum(1 for e in ext[:-1] if e.rows < store.block)
        distinct = cfg["systems"] * cfg["system_tokens"] + (len(long_tokens[: long_points[-1]]) - cfg["system_tokens"])
        for j in range(conv):
            _p, cps = conversation(cfg, j)
            distinct += len(cps[-1]) - cfg["system_tokens"]
        blob_logical, blob_alloc = C.dir_bytes(store_path / "blobs")
        index_logical, index_alloc = C.dir_bytes(store_path / "index")
        result["bytes"] = {
            "snapshots": len(entries), "segments": segments, "tokens_referenced": referenced,
            "rows_stored": seg_rows, "distinct_prefix_tokens": distinct,
            "kv_bytes_unshared": referenced * BYTES_PER_TOKEN, "kv_bytes_stored": seg_rows * BYTES_PER_TOKEN,
            "kv_bytes_unique": distinct * BYTES_PER_TOKEN, "kvstore_total_bytes": store.total_bytes(),
            "blob_files_logical": blob_logical, "blob_files_allocated": blob_alloc,
            "index_logical": index_logical, "index_allocated": index_alloc,
            "per_token_bytes_llama_135m": 23_040,
            "extents_per_snapshot": C.summary(pieces, p99=True), "short_extents": short,
        }
        store.close()
        log(f"scale: {referenced} tokens referenced, {seg_rows} rows stored, {distinct} distinct")
        if args.keep_store:
            shutil.copytree(store_path, args.keep_store, symlinks=True)
            log(f"scale: kept a copy of the store in {args.keep_store}")
        # the admin commands, as a user runs them; each several times (medians): the reading ones
        # on the store, prune and gc each on a fresh copy of it
        st = ["--store", str(store_path)]
        samples, cmds = {}, {}

        def timed(name, *args):
            secs, out = cli(*args)
            samples.setdefault(name, []).append(secs)
            return out

        for _ in range(cfg["command_runs"]):
            out = timed("ls", *st, "ls")
            cmds["ls_lines"] = out.count("\n")
            timed("ls -q", *st, "-q", "ls")
            timed("ls -n 20 --sort -accessed", *st, "ls", "-n", "20", "--sort", "-accessed")
            timed("stats", *st, "stats")
        for i in range(cfg["command_runs"]):
            copy = scratch / f"pruned-{i}"
            shutil.copytree(store_path, copy, symlinks=True)
            os.sync()  # the copy's pages written out: a commit's fsync flushes only its own
            # every second checkpoint of each conversation is tier assistant: half the store
            out = timed("prune --tier assistant -y", "--store", str(copy), "prune", "--tier", "assistant", "-y")
            cmds["prune_output"] = out.strip().splitlines()[-1:] if out else []
            with SnapshotStore(copy) as s2:
                cmds["after_prune"] = {"snapshots": len(s2.entries()), "bytes": s2.total_bytes()}
            out = timed("gc", "--store", str(copy), "gc")
            cmds["gc_output"] = out.strip().splitlines()[-1:] if out else []
            shutil.rmtree(copy)
        cmds.update({name: C.median(v) for name, v in samples.items()})
        cmds["runs"] = samples
        result["commands"] = cmds
        log("scale: commands " + ", ".join(f"{k} {v:.1f}s" for k, v in cmds.items() if isinstance(v, float)))
    path = C.finish(result, out=args.out)
    log(f"scale: wrote {path}")


if __name__ == "__main__":
    main()
