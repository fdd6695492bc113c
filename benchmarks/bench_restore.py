"""Restore: what a hit is worth against a cold prefill, side by side.

For each model shape and prompt size, one process run interleaves (the
order rotates every repeat):

- cold prefill (where it fits; elsewhere extrapolated from the sizes that do)
- mlx-lm ``LRUPromptCache`` hit, mlx-lm ``load_prompt_cache`` of a
  ``save_prompt_cache`` file (in this process, and in a fresh process with the
  page cache warm and dropped)
- kvstore memory hit (``TieredPromptCache``), disk hit through
  ``TieredPromptCache`` and through ``SnapshotStore.fetch_nearest`` in this
  process, and a disk hit in a fresh process (page cache warm and dropped)
- nearest hits: a prompt sharing all but ``suffix`` tokens with the stored
  one (mlx-lm LRU, kvstore memory, kvstore disk), suffix prefill included
- raw probes on a file of the snapshot's size: fsynced write, warm and
  dropped sequential read, and a memory copy

Each hit is split into lookup, read, verify, rebuild and the first decode
step (the suffix prefill for nearest hits). kvstore's stages are timed by
wrapping its functions in this process (kvstore itself is not changed).
The KV of the restored snapshots is random, of the model's real shape: a
restore does not care how the KV was computed. Cold prefills are real.

Run: ``python benchmarks/bench_restore.py --quick`` (or ``--full``).
"""

import argparse
import copy
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402
from common import log, now  # noqa: E402

MODES = {
    "quick": {"models": ["llama-135m"], "sizes": [512, 2048], "cold_sizes": {"llama-135m": [128]},
              "repeats": 2, "slow_repeats": 1, "fresh_repeats": 1, "suffix": 16},
    "full": {"models": ["llama-135m", "qwen3-0.6b"], "sizes": [512, 2048, 8192],
             "cold_sizes": {"llama-135m": [128, 512], "qwen3-0.6b": [64, 128]},
             "repeats": 5, "slow_repeats": 3, "fresh_repeats": 5, "suffix": 16},
}
MODEL_KEY = "bench-model"

LABELS = {
    "cold": "cold prefill",
    "lru": "mlx-lm LRUPromptCache hit",
    "mlx_file": "mlx-lm load_prompt_cache (same process, warm)",
    "mlx_fresh_warm": "mlx-lm load_prompt_cache, fresh process, page cache warm",
    "mlx_fresh_cold": "mlx-lm load_prompt_cache, fresh process, page cache dropped",
    "kv_mem": "kvstore memory hit",
    "kv_disk": "kvstore disk hit (TieredPromptCache, same process, warm)",
    "kv_store": "kvstore disk hit (SnapshotStore.fetch_nearest, same process, warm)",
    "kv_fresh_warm": "kvstore disk hit, fresh process, page cache warm",
    "kv_fresh_cold": "kvstore disk hit, fresh process, page cache dropped",
    "lru_near": "mlx-lm LRUPromptCache nearest hit + suffix prefill",
    "kv_mem_near": "kvstore memory nearest hit + suffix prefill",
    "kv_disk_near": "kvstore disk nearest hit + suffix prefill",
    "raw_write": "raw write + fsync of the snapshot's bytes",
    "raw_read_warm": "raw sequential read, page cache warm",
    "raw_read_fresh": "raw sequential read, page cache warm, into newly allocated memory",
    "raw_read_mlx": "raw sequential read, page cache warm, into a new MLX buffer (MLX's buffer cache emptied)",
    "raw_read_cold": "raw sequential read, pages dropped",
    "memcpy": "memory copy of the snapshot's bytes",
}


# ----------------------------------------------------------- stage timers
class Stages:
    """Seconds spent in kvstore's restore stages, by wrapping its functions.

    ``keys``: token validation and block hashing; ``plan``: the index lookup
    (``_plans``); ``mem_plan``: the memory-tier search; ``open``: opening and
    checking blob headers; ``read``: preadv into buffers (``_readinto`` and
    the grouped ``_readv``); ``read_rows``:
    read plus chunk checksums (verify = read_rows - read); ``to_mx``:
    numpy -> MLX copies; ``decode``: rebuilding cache objects; ``alloc``:
    the MLX buffers the bytes are read into. Reads and checks run on the
    restore's reader thread while the caller makes the next buffers, so the
    stages overlap; ``overlap`` is by how much they add up to more than the total.
    """

    def __init__(self):
        self.t = Counter()
        self._undo = []

    def _wrap(self, owner, attr, name):
        orig = getattr(owner, attr, None)
        if orig is None:  # another version of kvstore: that stage is not timed
            return
        setattr(owner, attr, C.timed(orig, self.t, name))
        self._undo.append((owner, attr, orig))

    def install(self):
        import importlib

        import kvstore.blobs as B
        import kvstore.codec as codec
        import kvstore.store as S

        try:
            M = importlib.import_module("kvstore.memory")
        except ImportError:  # another version of kvstore
            M = None

        self._wrap(S, "as_tokens", "keys")
        self._wrap(getattr(S, "ChainCache", None), "chain", "keys")
        self._wrap(S.SnapshotStore, "_plans", "plan")
        self._wrap(getattr(M, "MemoryTier", None), "plan", "mem_plan")
        self._wrap(B.BlobReader, "_parse", "open")
        self._wrap(B.BlobReader, "_readinto", "read")
        self._wrap(B.BlobReader, "_readv", "readv")  # grouped reads: the same stage
        self._wrap(B.BlobReader, "read_rows", "read_rows")
        self._wrap(importlib.import_module("kvstore.loader"), "alloc", "alloc")
        self._wrap(codec, "to_mx", "to_mx")
        self._wrap(codec, "decode", "decode")
        return self

    def reset(self):
        self.t.clear()

    def split(self, total):
        """The kvstore stages of one fetch that took ``total`` seconds."""
        t = self.t
        out = {
            "lookup": t["keys"] + t["plan"] + t["mem_plan"],
            "open": t["open"],
            "read": t["read"] + t["readv"],
            "verify": max(0.0, t["read_rows"] - t["read"] - t["readv"]),
            "rebuild": t["to_mx"] + t["decode"],
            "alloc": t["alloc"],
        }
        # buffers are made on the caller's thread while the reader thread reads and
        # checks (kvstore.loader): the stages can add up to more than the total
        spent = sum(out.values())
        out["other"] = max(0.0, total - spent)
        out["overlap"] = max(0.0, spent - total)
        return out


class TimedLoad:
    """``mlx_lm.models.cache.load_prompt_cache`` with its ``mx.load`` (+ eval) timed as the read."""

    def __init__(self):
        self.read = 0.0

    def __call__(self, path):
        import mlx.core as mx
        import mlx_lm.models.cache as mc

        outer = self

        class _Mx:
            def __getattr__(self, name):
                return getattr(mx, name)

            def load(self, *a, **k):
                t = now()
                out = mx.load(*a, **k)
                arrays = out[0] if isinstance(out, tuple) else out
                mx.eval(list(arrays.values()))
                outer.read += now() - t
                return out

        self.read = 0.0
        saved, mc.mx = mc.mx, _Mx()
        try:
            cache = mc.load_prompt_cache(str(path))
        finally:
            mc.mx = saved
        mx.eval([c.state for c in cache])
        return cache


def first_write(cache, n):
    """Seconds to write one row at position ``n`` of every KV buffer (what the first
    decode step's ``update_and_fetch`` does first): a buffer another cache shares is
    copied whole here. Caches without room past ``n`` are left alone (0.0)."""
    import mlx.core as mx

    t = now()
    arrays = []
    for c in cache:
        k, v = getattr(c, "keys", None), getattr(c, "values", None)
        if k is None or k.shape[2] <= n:
            continue
        c.keys[..., n : n + 1, :] = mx.zeros((*k.shape[:2], 1, k.shape[3]), dtype=k.dtype)
        c.values[..., n : n + 1, :] = mx.zeros((*v.shape[:2], 1, v.shape[3]), dtype=v.dtype)
        arrays += [c.keys, c.values]
    if not arrays:
        return None
    mx.eval(arrays)
    return now() - t


def first_update(cache):
    """Seconds of the first decode write as mlx-lm does it, for any restored cache: one
    ``update_and_fetch`` of one row per KV layer (a buffer without room is grown, i.e.
    copied whole; a shared one is copied on write), then trimmed back."""
    import mlx.core as mx

    t = now()
    arrays, grown = [], []
    for c in cache:
        k, v = getattr(c, "keys", None), getattr(c, "values", None)
        if k is None or not hasattr(c, "update_and_fetch"):
            continue
        c.update_and_fetch(mx.zeros((*k.shape[:2], 1, k.shape[3]), dtype=k.dtype),
                           mx.zeros((*v.shape[:2], 1, v.shape[3]), dtype=v.dtype))
        arrays += [c.keys, c.values]
        grown.append(c)
    if not arrays:
        return None
    mx.eval(arrays)
    s = now() - t
    for c in grown:
        c.trim(1)
    return s


def step(model, cache, rest):
    """Seconds of the first decode step (or suffix prefill) on ``rest``."""
    import mlx.core as mx

    t = now()
    logits = model(mx.array(rest)[None], cache=cache)[:, -1, :]
    mx.eval(logits)
    return now() - t


# ------------------------------------------------------------ fresh worker
def worker(args):
    """One restore in a fresh process; prints one JSON line."""
    t0 = now()
    import mlx.core as mx  # noqa: F401
    import mlx_lm

    import kvstore
    from kvstore import TieredPromptCache

    out = {"import": now() - t0}
    tokens = json.loads(Path(args["tokens"]).read_text())
    t = now()
    model, _tok = mlx_lm.load(args["model"])
    out["model_load"] = now() - t
    if args["kind"] == "kvstore":
        stages = Stages().install()
        t = now()
        fp = kvstore.fingerprint(args["model"])
        out["fingerprint"] = now() - t
        t = now()
        cache_obj = TieredPromptCache(args["store"])
        out["store_open"] = now() - t
        stages.reset()
        t = now()
        got = cache_obj.fetch(fp, tokens)
        out["fetch"] = now() - t
        out.update(stages.split(out["fetch"]))
        out["source"], out["reused"] = got.source, got.reused
        cache, rest = got.cache, got.rest
        out["first_write"] = first_write(cache, got.reused)
        out["first_update"] = first_update(cache)
    else:
        load = TimedLoad()
        t = now()
        cache = load(args["file"])
        out["fetch"] = now() - t
        out["read"], out["rebuild"] = load.read, out["fetch"] - load.read
        out["source"], out["reused"] = "file", len(tokens) - 1
        out["first_update"] = first_update(cache)
        rest = tokens[-1:]
    out["first_step"] = (out.get("first_write") or 0.0) + step(model, cache, rest)
    out["ttft"] = out["fetch"] + out["first_step"]
    print(json.dumps(out), flush=True)
    if args["kind"] == "kvstore":
        cache_obj.close()


def run_worker(spec, scratch):
    path = Path(scratch) / "worker.json"
    path.write_text(json.dumps(spec))
    t = now()
    proc = subprocess.run([C.PY, __file__, "--worker", str(path)], capture_output=True, text=True, timeout=1800)
    wall = now() - t
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed: {proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_wall"] = wall
    return out


# -------------------------------------------------------------- one model
def flops(info, n):
    """Prefill FLOPs of ``n`` tokens: weights, causal attention, the last chunk's logits."""
    cfg = info["config"]
    d, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    heads, hd = cfg["num_attention_heads"], cfg.get("head_dim") or d // cfg["num_attention_heads"]
    vocab = cfg["vocab_size"]
    body = info["params"] - vocab * d  # tied embeddings: the lm_head is the embedding
    return 2 * body * n + 2 * layers * heads * hd * n * n + 2 * vocab * d * min(n, 2048)


def fit_cold(info, measured):
    """A FLOP-proportional fit of cold prefill seconds: ``t = c * flops(n)`` (least squares)."""
    import numpy as np

    pts = [(flops(info, n), s) for n, s in measured.items() if s is not None]
    if not pts:
        return None
    f = np.array([p[0] for p in pts], dtype=float)
    t = np.array([p[1] for p in pts], dtype=float)
    return float((f @ t) / (f @ f))


def bench_model(name, cfg, scratch, result):
    import mlx.core as mx
    import mlx_lm
    import numpy as np
    from mlx_lm.models.cache import LRUPromptCache, save_prompt_cache

    import kvstore
    from kvstore import SnapshotStore, TieredPromptCache

    path = C.model_dir(name)
    info = C.model_info(path)
    log(f"restore: {name} ({info['params'] / 1e6:.0f}M params) from {path}")
    model, _tok = mlx_lm.load(str(path))
    fp = kvstore.fingerprint(path)
    rng = np.random.default_rng(7)
    reps, slow, fresh_reps = cfg["repeats"], cfg["slow_repeats"], cfg["fresh_repeats"]
    suffix = cfg["suffix"]
    stages = Stages().install()
    store_dir = scratch / f"store-{name}"
    store = SnapshotStore(store_dir)
    entry = {"model": name, "info": info, "cold": {}, "cases": []}
    result["models"].append(entry)

    # warm kernels and kvstore's imports in this process (fresh processes pay theirs)
    warm = C.random_cache(model, 300, seed=99)
    step(model, warm, [1])
    C.prefill(model, rng.integers(10, 500, 32).tolist())
    w = TieredPromptCache(SnapshotStore(scratch / "warmup-store"))
    w.insert_cache(fp, list(range(10, 310)), C.random_cache(model, 300, seed=98), cache_type="user")
    w.flush()
    w2 = TieredPromptCache(w.store)
    w2.fetch(fp, list(range(10, 311)))
    w.close(), w2.close()
    del warm, w, w2
    entry["kv_bytes_per_token"] = C.kv_bytes_per_token(C.random_cache(model, 256, seed=97))

    def cold_run(n):
        toks = rng.integers(10, 500, n + 1).tolist()
        C.fresh_memory()
        t = now()
        C.prefill(model, toks)
        return {"ttft": now() - t}

    # cold prefill at sizes that fit but are not restore sizes
    extra = [n for n in cfg["cold_sizes"].get(name, []) if n not in cfg["sizes"]]
    for n in extra:
        runs = []
        for r in range(slow):
            runs.append(cold_run(n))
            log(f"  cold {n}: {runs[-1]['ttft']:.2f}s")
        entry["cold"][str(n)] = runs

    for n in cfg["sizes"]:
        log(f"restore: {name} {n} tokens: setting up")
        toks = rng.integers(10, 500, n).tolist()
        request = toks + [int(rng.integers(10, 500))]
        near = toks[: n - suffix] + rng.integers(10, 500, suffix).tolist()
        if near[n - suffix] == toks[n - suffix]:  # the suffix must differ from its first token on
            near[n - suffix] = 10 + (toks[n - suffix] - 9) % 490
        cache = C.random_cache(model, n, seed=n)
        case = {"tokens": n, "suffix": suffix, "runs": {}}
        # the stored forms: LRU entry, mlx-lm file, kvstore memory + disk
        lru = LRUPromptCache(max_size=10)
        lru.insert_cache(MODEL_KEY, toks, cache, cache_type="user")
        mfile = scratch / f"{name}-{n}.safetensors"
        t = now()
        save_prompt_cache(str(mfile), cache)
        case["mlx_save_s"] = now() - t
        case["mlx_file_bytes"] = mfile.stat().st_size
        tiered = TieredPromptCache(store, max_size=10)
        t = now()
        tiered.insert_cache(fp, toks, cache, cache_type="user")
        case["kv_insert_s"] = now() - t
        tiered.flush()
        case["kv_insert_and_write_s"] = now() - t
        (e,) = [e for e in store.entries() if e.tokens == n]
        case["kv_bytes"] = e.bytes
        case["kv_blobs"] = len(e.blobs)
        case["kv_tensor_bytes"] = sum(c.keys[:, :, :n].nbytes + c.values[:, :, :n].nbytes for c in cache)
        tok_file = scratch / f"tokens-{name}-{n}.json"
        tok_file.write_text(json.dumps(request))
        raw = scratch / "raw.bin"
        nbytes = case["kv_bytes"]
        rbuf = np.ones(nbytes, dtype=np.uint8)

        def lru_hit():
            C.fresh_memory()
            t = now()
            lru._trie.search(MODEL_KEY, request)
            lookup = now() - t
            t = now()
            c, rest = lru.fetch_nearest_cache(MODEL_KEY, request)
            fetch = now() - t
            assert len(rest) == 1
            s = step(model, c, rest)
            return {"lookup": lookup, "rebuild": max(0.0, fetch - lookup), "fetch": fetch, "first_step": s,
                    "ttft": fetch + s}

        def lru_near():
            C.fresh_memory()
            t = now()
            c, rest = lru.fetch_nearest_cache(MODEL_KEY, near)
            fetch = now() - t
            assert len(rest) == suffix, len(rest)
            s = step(model, c, rest)
            return {"fetch": fetch, "first_step": s, "ttft": fetch + s}

        def mlx_file():
            C.fresh_memory()
            load = TimedLoad()
            t = now()
            c = load(mfile)
            fetch = now() - t
            u = first_update(c)
            s = step(model, c, request[-1:])
            return {"read": load.read, "rebuild": fetch - load.read, "fetch": fetch, "first_update": u,
                    "first_step": s, "ttft": fetch + s}

        def kv_fetch(tc, req, want_source, want_rest):
            C.fresh_memory()
            stages.reset()
            t = now()
            got = tc.fetch(fp, req)
            fetch = now() - t
            assert got.source == want_source and len(got.rest) == want_rest, (got.source, len(got.rest))
            w = first_write(got.cache, got.reused)
            u = first_update(got.cache)
            s = (w or 0.0) + step(model, got.cache, got.rest)
            return {**stages.split(fetch), "fetch": fetch, "first_write": w, "first_update": u, "first_step": s,
                    "ttft": fetch + s, "kind": got.kind}

        def kv_disk(req, want_rest):
            tc = TieredPromptCache(store, max_size=10)
            try:
                return kv_fetch(tc, req, "disk", want_rest)
            finally:
                tc.close()

        def kv_store():
            C.fresh_memory()
            stages.reset()
            t = now()
            c, rest = store.fetch_nearest(fp, request)
            fetch = now() - t
            assert len(rest) == 1
            w = first_write(c, n)
            u = first_update(c)
            s = (w or 0.0) + step(model, c, rest)
            return {**stages.split(fetch), "fetch": fetch, "first_write": w, "first_update": u, "first_step": s,
                    "ttft": fetch + s}

        def fresh(kind, cold):
            if cold:
                C.drop_tree(store_dir) if kind == "kvstore" else C.drop_pages(mfile)
            else:  # make sure the pages are in
                for p in ([mfile] if kind == "mlx" else [os.path.join(r, f) for r, _, fs in os.walk(store_dir)
                                                         for f in fs]):
                    C.read_probe(p)
            return run_worker({"kind": kind, "model": str(path), "store": str(store_dir), "file": str(mfile),
                               "tokens": str(tok_file)}, scratch)

        def raw_write():
            return {"seconds": C.write_probe(raw, nbytes)}

        def raw_read_warm():
            C.read_probe(raw, rbuf)
            return {"seconds": C.read_probe(raw, rbuf)}

        def raw_read_fresh():
            C.read_probe(raw, rbuf)
            return {"seconds": C.read_probe(raw)}

        def raw_read_mlx():
            # the buffers a restore of this cache needs (its arrays' shapes, decode headroom), new
            from kvstore.codec import headroom

            C.read_probe(raw, rbuf)
            C.fresh_memory()
            return C.read_into_mlx_probe(raw, [(a.shape[:2] + (headroom(n),) + a.shape[3:], a.dtype)
                                               for c in cache for a in (c.keys, c.values)])

        def raw_read_cold():
            C.drop_pages(raw)
            return {"seconds": C.read_probe(raw, rbuf)}

        def memcpy():
            return {"seconds": C.memcpy_probe(nbytes)}

        contenders = {
            "lru": (lru_hit, reps), "mlx_file": (mlx_file, reps),
            "kv_mem": (lambda: kv_fetch(tiered, request, "memory", 1), reps),
            "kv_disk": (lambda: kv_disk(request, 1), reps), "kv_store": (kv_store, reps),
            "lru_near": (lru_near, slow), "kv_mem_near": (lambda: kv_fetch(tiered, near, "memory", suffix), slow),
            "kv_disk_near": (lambda: kv_disk(near, suffix), slow),
            "kv_fresh_warm": (lambda: fresh("kvstore", False), fresh_reps),
            "kv_fresh_cold": (lambda: fresh("kvstore", True), fresh_reps),
            "mlx_fresh_warm": (lambda: fresh("mlx", False), fresh_reps),
            "mlx_fresh_cold": (lambda: fresh("mlx", True), fresh_reps),
            "raw_write": (raw_write, reps), "raw_read_warm": (raw_read_warm, reps),
            "raw_read_fresh": (raw_read_fresh, reps), "raw_read_mlx": (raw_read_mlx, reps),
            "raw_read_cold": (raw_read_cold, reps), "memcpy": (memcpy, reps),
        }
        if n in cfg["cold_sizes"].get(name, []):
            contenders["cold"] = (lambda: cold_run(n), slow)
        raw_write()
        for r in range(reps):
            for cname in C.rotated(contenders, r):
                fn, times = contenders[cname]
                if r >= times:
                    continue
                out = fn()
                case["runs"].setdefault(cname, []).append(out)
            log(f"  {name} {n} repeat {r + 1}/{reps}: " + ", ".join(
                f"{k} {case['runs'][k][-1].get('ttft', case['runs'][k][-1].get('seconds')):.3f}"
                for k in contenders if k in case["runs"] and len(case["runs"][k]) == r + 1))
        if n in cfg["cold_sizes"].get(name, []):
            entry["cold"][str(n)] = case["runs"]["cold"]
        entry["cases"].append(case)
        tiered.close()
        os.unlink(raw)
        os.unlink(mfile)
        del cache, lru, tiered, rbuf
        C.fresh_memory()

    measured = {int(k): C.median([r["ttft"] for r in v]) for k, v in entry["cold"].items()}
    coef = fit_cold(info, measured)
    entry["cold_fit"] = {"seconds_per_flop": coef, "measured": measured,
                         "how": "t(n) = c * FLOPs(n), FLOPs = 2*P_body*n + 2*L*H*D*n^2 + 2*V*D*min(n, 2048), "
                                "c by least squares over the measured cold sizes"}
    for case in entry["cases"]:
        n = case["tokens"]
        if str(n) in entry["cold"]:
            case["cold_ttft"] = {"seconds": measured[n], "measured": True}
        elif coef:
            case["cold_ttft"] = {"seconds": coef * flops(info, n), "measured": False}
    store.close()
    del model
    C.fresh_memory()


def main(argv=None):
    p = C.mode_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--models", help="comma-separated model shapes (default: by mode)")
    p.add_argument("--sizes", help="comma-separated prompt sizes (default: by mode)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(json.loads(Path(args.worker).read_text()))
    cfg = dict(MODES[args.mode])
    if args.models:
        cfg["models"] = args.models.split(",")
    if args.sizes:
        cfg["sizes"] = [int(x) for x in args.sizes.split(",")]
    result = C.header("restore", args.mode, argv)
    result["config"] = cfg
    result["labels"] = LABELS
    result["models"] = []
    with C.scratch() as scratch:
        result["cold_read_check"] = C.cold_read_works(scratch)
        result["page_reporting"] = C.page_reporting()
        result["drop_method"] = ("os.posix_fadvise(POSIX_FADV_DONTNEED) after fsync on each file "
                                 f"(/proc/sys/vm/drop_caches writable: {C.drop_caches_writable()}, not used: "
                                 "machine-wide)")
        for name in cfg["models"]:
            bench_model(name, cfg, scratch, result)
    path = C.finish(result, out=args.out)
    log(f"restore: wrote {path}")


if __name__ == "__main__":
    main()
