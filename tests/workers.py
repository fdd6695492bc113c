"""Worker processes for the multi-process, crash and cross-process tests.

Run as ``python tests/workers.py ROLE JSON-ARGS``; each role prints one JSON
line with what it saw. Roles use real stores, real tiny models and real
MLX arrays, exactly as a second server process would.
"""

import json
import os
import sys
import time

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import ArraysCache, KVCache, make_prompt_cache

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kvstore  # noqa: E402

H, D = 2, 32


def synthetic_cache(seed, n, layers=2):
    """A KV cache of ``n`` tokens whose values are a function of (seed, position)."""
    cache = []
    for layer in range(layers):
        c = KVCache()
        pos = mx.arange(n, dtype=mx.float32)[None, None, :, None]
        k = mx.broadcast_to(pos * 1e-3 + seed + layer, (1, H, n, D))
        c.update_and_fetch(k, -k)
        cache.append(c)
    mx.eval([c.keys for c in cache])
    return cache


def check_synthetic(cache, seed, n):
    """True if ``cache`` holds exactly what ``synthetic_cache(seed, n)`` held."""
    want = synthetic_cache(seed, n, layers=len(cache))
    for a, b in zip(cache, want):
        ka, va = a.keys[..., : a.offset, :], a.values[..., : a.offset, :]
        kb, vb = b.keys[..., :n, :], b.values[..., :n, :]
        if a.offset != n or not (mx.array_equal(ka, kb) and mx.array_equal(va, vb)):
            return False
    return True


def seed_tokens(seed, n):
    """Tokens that name their seed: a reader can rebuild the expected KV."""
    return [seed] + [int(t) for t in np.random.RandomState(seed).randint(1000, 2000, n - 1)]


def role_fetch_compare(args):
    """For each case: fetch prompt+suffix in this fresh process, finish the
    prefill and compare the next-token logits with a cold prefill."""
    return [_fetch_compare(case) for case in args["cases"]]


def _fetch_compare(args):
    model, _ = _load(args["model"])
    fp = kvstore.fingerprint(args["model"])
    store = kvstore.SnapshotStore(args["store"])
    full = args["prompt"] + args["suffix"]
    cache, rest = store.fetch_nearest(fp, full)
    out = {"hit": cache is not None, "rest": len(rest)}
    if cache is None:
        cache, rest = make_prompt_cache(model), full
    warm = model(mx.array(rest)[None], cache=cache)[0, -1]
    cold_cache = make_prompt_cache(model)
    cold = model(mx.array(full)[None], cache=cold_cache)[0, -1]
    mx.eval(warm, cold)
    out["max_diff"] = float(mx.abs(warm - cold).max())
    out["argmax_equal"] = int(mx.argmax(warm)) == int(mx.argmax(cold))
    store.close()
    return out


_models = {}


def _load(path):
    import mlx_lm

    if path not in _models:
        _models[path] = mlx_lm.load(path)
    return _models[path]


def role_writer(args):
    """Put synthetic snapshots forever (until killed), printing each key stored."""
    store = kvstore.SnapshotStore(args["store"])
    seed = args["first_seed"]
    n = args["tokens"]
    while True:
        key = store.put("synthetic", seed_tokens(seed, n), synthetic_cache(seed, n, args.get("layers", 2)))
        print(json.dumps({"stored": seed, "key": key}), flush=True)
        seed += 1
        if args.get("count") and seed - args["first_seed"] >= args["count"]:
            return {"done": True}


def role_mixed(args):
    """Put, fetch and delete shared-prefix snapshots; report what stayed stored."""
    rng = np.random.RandomState(args["seed"])
    store = kvstore.SnapshotStore(args["store"])
    base = seed_tokens(7, args["prefix"])  # every worker shares this prefix
    mine, errors, ops, wrong = {}, 0, 0, 0
    deadline = time.monotonic() + args["seconds"]
    i = 0
    while time.monotonic() < deadline:
        i += 1
        ops += 1
        op = rng.choice(["put", "fetch", "delete"], p=[0.5, 0.4, 0.1])
        try:
            if op == "put":
                # tails from this worker's own token range: two workers never
                # hold the same snapshot, so one's delete cannot remove what
                # the other reports as kept; they still share the prefix
                lo = 2000 + 1000 * args["seed"]
                tail = [int(t) for t in rng.randint(lo, lo + 1000, rng.randint(1, 40))]
                toks = base + tail
                cache = synthetic_prefix_cache(toks)
                key = store.put("synthetic", toks, cache, tier=rng.choice(["system", "user", "assistant"]))
                if key:
                    mine[key] = toks
            elif op == "fetch" and mine:
                key = list(mine)[rng.randint(len(mine))]
                toks = mine[key] + [5]
                cache, rest = store.fetch_nearest("synthetic", toks)
                if cache is not None:
                    n = len(toks) - len(rest)
                    if not check_prefix_cache(cache, toks[:n]):
                        wrong += 1
            elif op == "delete" and mine:
                key = list(mine)[rng.randint(len(mine))]
                store.delete(key)
                del mine[key]
        except Exception as exc:  # counted and reported, the test asserts on it
            errors += 1
            print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
    store.close()
    return {"ops": ops, "errors": errors, "wrong": wrong, "kept": {k: v for k, v in mine.items()}}


def synthetic_prefix_cache(tokens):
    """A KV cache whose row i depends only on tokens[:i+1] (like real attention KV)."""
    n = len(tokens)
    t = np.asarray(tokens, dtype=np.float64)
    rows = np.cumsum(t) % 9973  # a function of the prefix
    k = np.broadcast_to(rows[None, None, :, None], (1, H, n, D)).astype(np.float32)
    c = KVCache()
    c.update_and_fetch(mx.array(k), mx.array(-k))
    mx.eval(c.keys, c.values)
    return [c]


def check_prefix_cache(cache, tokens):
    want = synthetic_prefix_cache(tokens)[0]
    c = cache[0]
    n = len(tokens)
    return c.offset == n and bool(
        mx.array_equal(c.keys[..., :n, :], want.keys[..., :n, :])
        and mx.array_equal(c.values[..., :n, :], want.values[..., :n, :])
    )


def role_check_all(args):
    """Restore every snapshot in the store and check its content."""
    store = kvstore.SnapshotStore(args["store"])
    ok = bad = 0
    for e in store.entries():
        toks = store.tokens_of(e.key)
        cache, rest = store.fetch_nearest("synthetic", toks + [1])
        good = cache is not None and len(rest) == 1
        if good:
            if args.get("kind") == "prefix":
                good = check_prefix_cache(cache, toks)
            else:
                good = check_synthetic(cache, toks[0], len(toks))
        ok += good
        bad += not good
    return {"ok": ok, "bad": bad}


ROLES = {
    "fetch_compare": role_fetch_compare,
    "writer": role_writer,
    "mixed": role_mixed,
    "check_all": role_check_all,
}

# ------------------------------------------------ reliability roles (load, crashes)
def prefix_cache(tokens, layers=1):
    """``synthetic_prefix_cache`` with ``layers`` KV layers (layer i offset by i)."""
    base = synthetic_prefix_cache(tokens)[0]
    cache = []
    for i in range(layers):
        c = KVCache()
        c.update_and_fetch(base.keys[..., : len(tokens), :] + i, base.values[..., : len(tokens), :] - i)
        cache.append(c)
    mx.eval([c.keys for c in cache])
    return cache


def check_prefix_layers(cache, tokens):
    """True if ``cache`` holds exactly what ``prefix_cache(tokens, len(cache))`` holds."""
    want = prefix_cache(tokens, len(cache))
    n = len(tokens)
    return all(
        a.offset == n and bool(mx.array_equal(a.keys[..., :n, :], b.keys[..., :n, :])
                               and mx.array_equal(a.values[..., :n, :], b.values[..., :n, :]))
        for a, b in zip(cache, want)
    )


def role_load(args):
    """Mixed put / fetch / delete / re-put / prune / gc / verify on one store for a
    bounded time. Reports what it stored and still holds, what its prunes and
    gcs deleted, per-operation counts and latencies, errors and wrong hits.

    Every hit is checked: a snapshot's KV is a function of its tokens, so any
    process can tell whether the cache it got is the right one.
    """
    from collections import Counter, defaultdict

    rng = np.random.RandomState(args["seed"])
    store = kvstore.SnapshotStore(args["store"])
    base = seed_tokens(7, args["prefix"])  # every worker shares this prefix
    mine, gone = {}, {}
    pruned, gc_deleted, problems = [], [], []
    counts, lat = Counter(), defaultdict(list)
    errors, wrong = [], 0
    names = ["put", "fetch", "delete", "reput", "prune", "gc", "verify"]
    probs = args.get("mix", [0.40, 0.36, 0.10, 0.05, 0.04, 0.03, 0.02])
    layers = args.get("layers", 1)
    deadline = time.monotonic() + args["seconds"]
    while time.monotonic() < deadline:
        op = names[rng.choice(len(names), p=probs)]
        t0 = time.perf_counter()
        try:
            if op == "put":
                cut = rng.randint(args["prefix"] // 2, args["prefix"] + 1)
                toks = base[:cut] + [int(t) for t in rng.randint(2000, 3000, rng.randint(1, 60))]
                key = store.put("synthetic", toks, prefix_cache(toks, layers),
                                tier=["system", "user", "assistant"][rng.randint(3)])
                if key:
                    mine[key] = toks
                else:
                    counts["put_none"] += 1
            elif op == "reput" and gone:
                key = list(gone)[rng.randint(len(gone))]
                toks = gone.pop(key)
                got = store.put("synthetic", toks, prefix_cache(toks, layers), tier="user")
                if got:
                    assert got == key, (got, key)
                    mine[key] = toks
            elif op == "fetch":
                if mine and rng.rand() < 0.7:
                    toks = mine[list(mine)[rng.randint(len(mine))]]
                    toks = toks[: rng.randint(2, len(toks) + 1)] + [5] * rng.randint(0, 3)
                else:
                    toks = base[: rng.randint(2, len(base) + 1)] + [int(t) for t in rng.randint(2000, 3000, 3)]
                cache, rest = store.fetch_nearest("synthetic", toks)
                if not rest:
                    wrong += 1
                if cache is not None:
                    counts["hits"] += 1
                    if not check_prefix_layers(cache, toks[: len(toks) - len(rest)]):
                        wrong += 1
                else:
                    counts["misses"] += 1
            elif op == "delete" and mine:
                key = list(mine)[rng.randint(len(mine))]
                store.delete(key)
                gone[key] = mine.pop(key)
            elif op == "prune":
                if rng.rand() < 0.85:
                    policy = {"tier": "assistant", "older_than": float(rng.uniform(0.5, 3.0))}
                else:
                    policy = {"max_bytes": int(store.total_bytes() * 0.9)}
                store.prune(on_delete=lambda e: pruned.append(e.key), **policy)
            elif op == "gc":
                for p in store.gc(grace=args.get("grace", 60.0)):
                    problems.append(f"gc {p.kind} {p.key} {p.reason}")
                    if p.key:
                        gc_deleted.append(p.key)
            elif op == "verify":
                for p in store.verify():
                    problems.append(f"verify {p.kind} {p.key} {p.reason}")
            else:
                continue
        except Exception as exc:  # counted and reported, the test asserts on it
            errors.append(f"{op}: {type(exc).__name__}: {exc}")
            print(f"error: {op}: {type(exc).__name__}: {exc}", file=sys.stderr)
        counts[op] += 1
        lat[op].append(time.perf_counter() - t0)
    store.close()
    return {
        "ops": sum(counts[n] for n in names), "counts": dict(counts), "errors": errors, "wrong": wrong,
        "kept": mine, "pruned": pruned, "gc_deleted": gc_deleted, "problems": problems,
        "stored_ever": list(mine) + list(gone),
        "p50_ms": {k: 1000 * float(np.median(v)) for k, v in lat.items()},
        "p99_ms": {k: 1000 * float(np.percentile(v, 99)) for k, v in lat.items()},
    }


def role_crash_op(args):
    """Open the store, print ``ready``, then run one operation (``put`` in a
    loop, ``prune``, ``gc`` or ``import``) until it ends or the test kills us."""
    store = kvstore.SnapshotStore(args["store"], fsync=args.get("fsync", True))
    op = args["op"]
    rng = np.random.RandomState(args.get("seed", 0))
    base = seed_tokens(7, args.get("prefix", 1000))
    print(json.dumps({"ready": os.getpid()}), flush=True)
    t0 = time.monotonic()
    if op == "put":
        while True:
            cut = rng.randint(len(base) // 2, len(base) + 1)
            toks = base[:cut] + [int(t) for t in rng.randint(2000, 3000, rng.randint(200, 2000))]
            key = store.put("synthetic", toks, prefix_cache(toks, args.get("layers", 4)),
                            tier=["system", "user", "assistant"][rng.randint(3)])
            print(json.dumps({"stored": key}), flush=True)
    elif op == "prune":
        count, freed = store.prune(max_bytes=0, on_delete=lambda e: print(json.dumps({"pruned": e.key}), flush=True))
        out = {"count": count, "freed": freed}
    elif op == "gc":
        out = {"problems": len(store.gc(grace=0))}
    elif op == "import":
        added, nbytes, problems = store.import_archive(args["archive"])
        out = {"added": added, "bytes": nbytes, "problems": [p.reason for p in problems]}
    out["seconds"] = time.monotonic() - t0
    store.close()
    return out


ROLES.update({"load": role_load, "crash_op": role_crash_op})

if __name__ == "__main__":
    role, raw = sys.argv[1], sys.argv[2]
    result = ROLES[role](json.loads(raw))
    print(json.dumps({"result": result}), flush=True)


HYBRID = "synthetic-hybrid"


def hybrid_cache(tokens):
    """Recurrent state plus a KV layer, both functions of ``tokens``."""
    a = ArraysCache(1)
    t = np.asarray(tokens, dtype=np.float64)
    a[0] = mx.array([[t.sum() % 7919, len(t), t[-1], t[0]]], dtype=mx.float32)
    return [a] + prefix_cache(tokens, 1)


def check_hybrid(cache, tokens):
    """True if ``cache`` holds exactly what ``hybrid_cache(tokens)`` holds."""
    want = hybrid_cache(tokens)
    return bool(mx.array_equal(cache[0].cache[0], want[0].cache[0])) and check_prefix_layers(cache[1:], tokens)

