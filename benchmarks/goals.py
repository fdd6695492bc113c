"""The performance goals, computed from one run's results (``benchmarks/results/*.json``).

Each goal reads ratios measured side by side in one run (medians), so a
"before" run on an earlier commit and an "after" run on this one can be set
side by side: ``report.py --before DIR`` puts the table at the top of
RESULTS.md.
"""

import common as C


def _med(runs, key):
    vals = [r.get(key) for r in runs if r.get(key) is not None]
    return C.median(vals) if vals else None


def _restore_cases(d):
    for m in d.get("models", []):
        for case in m["cases"]:
            yield m["model"], case


def _fmt(x, digits=2):
    return "–" if x is None else f"{x:.{digits}f}×"


def serve_overhead(data):
    d = data.get("server")
    if not d:
        return None
    out = []
    for kind in ("cold", "warm"):
        k = C.median([r["kvstore serve"][kind]["ttft"] for r in d["rounds"]])
        m = C.median([r["mlx_lm.server"][kind]["ttft"] for r in d["rounds"]])
        out.append((kind, k / m))
    worst = max(v for _, v in out)
    return ", ".join(f"{k} {_fmt(v)}" for k, v in out), worst <= 1.03


def _through_write(runs, kv):
    """Seconds of a fresh-process restore through its first decode write."""
    fetch = _med(runs, "fetch")
    upd = _med(runs, "first_update")
    if fetch is None or upd is None:
        return None
    return fetch + upd + (_med(runs, "store_open") or 0.0 if kv else 0.0)


def restore_warm(data):
    d = data.get("restore")
    if not d:
        return None
    parts, ok = [], True
    for model, case in _restore_cases(d):
        runs = case["runs"]
        kv, mlx = _through_write(runs["kv_fresh_warm"], True), _through_write(runs["mlx_fresh_warm"], False)
        raw = _med(runs["raw_read_fresh"], "seconds")
        if kv is None or mlx is None:
            return None
        a, b = kv / mlx, kv / raw
        ok &= a <= 0.8 and b <= 1.5
        into_mlx = _med(runs.get("raw_read_mlx", []), "seconds")
        floor = f" ({_fmt(kv / into_mlx)} a raw read into a new MLX buffer)" if into_mlx else ""
        parts.append(f"{model} {case['tokens']}: {_fmt(a)} mlx-lm, {_fmt(b)} raw{floor}")
    return "; ".join(parts), ok


def restore_cold(data):
    d = data.get("restore")
    if not d:
        return None
    parts, ok = [], True
    for model, case in _restore_cases(d):
        runs = case["runs"]
        kv = _med(runs["kv_fresh_cold"], "fetch") + (_med(runs["kv_fresh_cold"], "store_open") or 0.0)
        r = kv / _med(runs["raw_read_cold"], "seconds")
        ok &= r <= 1.2
        parts.append(f"{model} {case['tokens']}: {_fmt(r)}")
    return "; ".join(parts), ok


def first_write(data):
    d = data.get("restore")
    if not d:
        return None
    parts, ok = [], True
    for model, case in _restore_cases(d):
        runs = case["runs"]
        a, b = _med(runs["kv_disk"], "first_write"), _med(runs["kv_store"], "first_write")
        if a is None or b is None:
            continue
        ok &= a <= 2 * b
        parts.append(f"{model} {case['tokens']}: {a * 1e3:.2f} vs {b * 1e3:.2f} ms ({_fmt(a / b)})")
    return "; ".join(parts), ok


def lookup(data):
    d = data.get("scale")
    if not d:
        return None
    last = d["milestones"][-1]
    reqs = last["requests"].values()
    p50 = max(r["lookup"]["median"] for r in reqs)
    p99 = max(r["lookup"]["p99"] for r in reqs)
    text = (f"{last['snapshots']:,} snapshots: p50 {p50 * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms (worst of hit, "
            "shared system prompt, miss)")
    if all("convert" in r for r in reqs):  # runs before the conversion was timed beside each lookup lack it
        floor = max(r["convert"]["median"] for r in reqs)
        text += f"; the token list's conversion alone, timed beside them: p50 {floor * 1e3:.2f} ms"
    return text, p50 <= 0.5e-3 and p99 < 1e-3


def caller_thread(data):
    d = data.get("hotpath")
    if not d:
        return None
    parts, ok = [], True
    for ins in d["insert"]:
        if ins["tokens"] < 2048:
            continue
        r = ins["calls"]["tiered_disk"]["median"] / ins["calls"]["lru"]["median"]
        ok &= r <= 1.1
        parts.append(f"insert {ins['tokens']}: {_fmt(r)}")
    for f in d["fetch"]:
        if "tokens" not in f or f["tokens"] < 2048:
            continue
        for kind in ("extend", "new_turn"):
            calls = f["kinds"][kind]["calls"]
            r = calls["tiered_disk"]["median"] / calls["lru"]["median"]
            ok &= r <= 1.1
            parts.append(f"fetch {kind} {f['tokens']}: {_fmt(r)}")
    return "; ".join(parts), ok


def writes(data):
    d = data.get("hotpath")
    if not d:
        return None
    parts, ok = [], True
    for w in d["write"]:
        r = w["ratio_to_raw"]
        ok &= r["put"] >= 0.9 and r["queue"] >= 0.9
        parts.append(f"{w['shape']} {w['tokens']}: put {r['put']:.0%}, queue {r['queue']:.0%}")
    return "; ".join(parts), ok


def big_store(data):
    d = data.get("scale")
    if not d or "commands" not in d:
        return None
    c = d["commands"]
    ok = c["ls"] <= 2 and c["prune --tier assistant -y"] <= 10 and c["gc"] <= 3
    return (f"{d['config']['snapshots']:,} snapshots: ls {c['ls']:.2f} s, prune of half "
            f"{c['prune --tier assistant -y']:.2f} s, gc {c['gc']:.2f} s"), ok


def _agent_hybrid(data):
    d = data.get("agent")
    if not d:
        return None
    return [r["contenders"]["kvstore"] for r in d["runs"] if r["model"] == "hybrid"]


def agent_reuse(data):
    runs = _agent_hybrid(data)
    if not runs:
        return None
    before = min(r["min_share_later_before_restart"] for r in runs)
    after = min(r["min_share_later_after_restart"] for r in runs)
    return f"lowest share before the restart {before:.0%}, after {after:.0%}", min(before, after) >= 0.9


def agent_ttft(data):
    d = data.get("agent")
    if not d or "ttft_ratio" not in d:
        return None
    r = d["ttft_ratio"]
    x = d["ttft_ratio_hybrid_over_plain"]
    return (f"kvstore ÷ mlx_lm.server: hybrid {r['hybrid']:.2f}, plain {r['plain']:.2f}; hybrid ÷ plain "
            f"{_fmt(x)}"), x <= 1.15


def agent_disk(data):
    d = (data.get("agent") or {}).get("disk")
    if not d:
        return None
    return (f"{d['requests']} requests, {d['snapshots']} snapshots: blobs {_fmt(d['ratio_blobs'], 3)}, whole store "
            f"allocated {_fmt(d['ratio_store_allocated'], 3)} the unique KV rows + recurrent states"), \
        d["ratio_blobs"] <= 1.2


GOALS = [
    ("request through `kvstore serve` the disk does not help (cold; prefix in memory)",
     "<= 1.03x mlx_lm.server", serve_overhead),
    ("disk restore, fresh store object, page cache warm, through the first decode write",
     "<= 0.8x mlx-lm load_prompt_cache + its first write; <= 1.5x a raw read into new memory", restore_warm),
    ("disk restore, page cache dropped", "<= 1.2x a raw read with the cache dropped", restore_cold),
    ("first decode write after a TieredPromptCache disk hit", "within 2x of the same write after "
     "SnapshotStore.fetch_nearest", first_write),
    ("lookup, 32K-token prompt, 100,000-snapshot store", "p50 <= 0.5 ms, p99 < 1 ms", lookup),
    ("insert_cache / fetch_nearest_cache on the caller's thread", "<= 1.1x mlx-lm LRUPromptCache at 2K, 8K, "
     "32K", caller_thread),
    ("snapshot writes", ">= 90% of a raw fsynced write", writes),
    ("100,000-snapshot store", "ls <= 2 s, prune of half <= 10 s, gc <= 3 s", big_store),
    ("agent loop on the hybrid model, every request after a task's first", ">= 90% of the prompt from the cache, "
     "before and after a restart", agent_reuse),
    ("agent loop, total TTFT", "hybrid's ratio to mlx_lm.server <= 1.15x the plain model's", agent_ttft),
    ("disk for a 40-request hybrid agent session, assistant checkpoints persisted",
     "<= 1.2x unique KV rows + recurrent states", agent_disk),
]


def goals_section(after, before=None, before_label="before", after_label="after"):
    """The goal / before / after table, from two runs' loaded results."""
    rows = []
    for what, goal, fn in GOALS:
        a = fn(after)
        b = fn(before) if before else None
        rows.append([what, goal, b[0] if b else "–", a[0] if a else "not measured",
                     ("met" if a[1] else "**not met**") if a else "–"])
    head = ["what", "goal", before_label, after_label, ""]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)
