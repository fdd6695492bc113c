"""Turn ``benchmarks/results/*.json`` into ``benchmarks/RESULTS.md`` and ``benchmarks/plots/*.png``.

Every figure in the report is computed here from the JSON files of one run;
nothing is typed in by hand. Run: ``python benchmarks/report.py``
(``run_all.py`` calls it at the end).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

HERE = C.HERE


# ------------------------------------------------------------- formatting
def med(runs, key):
    return C.median([r.get(key) for r in runs]) if runs else None


def ms(x, digits=None):
    if x is None:
        return "–"
    x *= 1e3
    if digits is None:
        digits = 2 if x < 10 else 1 if x < 100 else 0
    return f"{x:,.{digits}f} ms"


def sec(x):
    if x is None:
        return "–"
    if x < 1:
        return ms(x)
    return f"{x:,.2f} s" if x < 100 else f"{x:,.0f} s"


def times(x, digits=1):
    if x is None:
        return "–"
    if x >= 100:
        return f"{x:,.0f}×"
    return f"{x:,.{digits}f}×"


def mb(n):
    return "–" if n is None else f"{n / 1e6:,.1f} MB" if n < 1e9 else f"{n / 1e9:,.2f} GB"


def rate(nbytes, seconds):
    if not seconds:
        return "–"
    v = nbytes / seconds
    return f"{v / 1e9:,.2f} GB/s" if v >= 1e9 else f"{v / 1e6:,.0f} MB/s"


def div(a, b):
    return a / b if a is not None and b else None


def pct(x):
    return "–" if x is None else f"{100 * x:.0f}%"


def table(head, rows):
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def load(results):
    data = {}
    for name in ("run_all", "restore", "hotpath", "multiturn", "agent", "scale", "server", "peers", "serve_parts",
                 "fingerprint", "compare", "remote"):
        p = Path(results) / f"{name}.json"
        if p.exists():
            data[name] = json.loads(p.read_text())
    return data


def cmd(r):
    """The command of a results file, with paths inside the repository made relative."""
    return r["command"].replace(str(C.ROOT) + "/", "")


def epoch(r):
    """When a results file's run started, in seconds since the epoch."""
    if "started_epoch" in r:
        return r["started_epoch"]
    import calendar
    import time

    return calendar.timegm(time.strptime(r["started"][:19], "%Y-%m-%d %H:%M:%S"))


def loads_line(r):
    return f"load average {r['load_before'][0]:.2f} before, {r['load_after'][0]:.2f} after"


# ------------------------------------------------------------------ plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_restore(d, out):
    plt = _plt()
    models = d["models"]
    names = ["cold", "lru", "kv_mem", "mlx_fresh_warm", "kv_fresh_warm", "mlx_fresh_cold", "kv_fresh_cold"]
    short = {"cold": "cold prefill", "lru": "mlx-lm LRU hit", "kv_mem": "kvstore memory hit",
             "mlx_fresh_warm": "mlx-lm load, restart, warm", "kv_fresh_warm": "kvstore disk, restart, warm",
             "mlx_fresh_cold": "mlx-lm load, restart, dropped", "kv_fresh_cold": "kvstore disk, restart, dropped"}
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.5), squeeze=False)
    for ax, m in zip(axes[0], models):
        sizes = [c["tokens"] for c in m["cases"]]
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            vals, hatch = [], []
            for c in m["cases"]:
                if name == "cold":
                    ct = c.get("cold_ttft") or {}
                    vals.append(ct.get("seconds"))
                    hatch.append(not ct.get("measured", False))
                else:
                    vals.append(med(c["runs"].get(name, []), "ttft"))
                    hatch.append(False)
            xs = [j + (i - len(names) / 2 + 0.5) * width for j in range(len(sizes))]
            bars = ax.bar(xs, [v or 0 for v in vals], width, label=short[name])
            for b, h in zip(bars, hatch):
                if h:
                    b.set_hatch("//")
                    b.set_alpha(0.6)
        ax.set_yscale("log")
        ax.set_xticks(range(len(sizes)), [f"{n:,} tokens" for n in sizes])
        ax.set_ylabel("time to first token (s, log)")
        ax.set_title(f"{m['model']}: time to first token (hatched: extrapolated)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "restore_ttft.png", dpi=90)
    plt.close(fig)

    # stages of a restore against the raw read of the same bytes
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.5), squeeze=False)
    stages = ["lookup", "open", "alloc", "read", "verify", "rebuild", "other"]
    conts = ["kv_store", "kv_disk", "kv_fresh_warm", "kv_fresh_cold", "mlx_file", "mlx_fresh_warm", "mlx_fresh_cold"]
    for ax, m in zip(axes[0], models):
        c = m["cases"][-1]
        bottom = [0.0] * len(conts)
        for st in stages:
            vals = [(med(c["runs"].get(k, []), st) or 0) * 1e3 for k in conts]
            ax.bar(range(len(conts)), vals, bottom=bottom, label=st)
            bottom = [a + b for a, b in zip(bottom, vals)]
        for k, style in (("raw_read_warm", "--"), ("raw_read_fresh", ":"), ("raw_read_cold", "-.")):
            v = med(c["runs"].get(k, []), "seconds")
            if v:
                ax.axhline(v * 1e3, linestyle=style, color="k", linewidth=1, label=k.replace("_", " "))
        ax.set_xticks(range(len(conts)), [k.replace("_", "\n") for k in conts], fontsize=7)
        ax.set_ylabel("ms")
        ax.set_title(f"{m['model']}, {c['tokens']:,} tokens ({mb(c['kv_bytes'])}): restore stages")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "restore_stages.png", dpi=90)
    plt.close(fig)


def plot_hotpath(d, out):
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    conts = ["lru", "tiered_mem", "tiered_disk"]
    ins = d["insert"]
    ax = axes[0]
    for k, color in zip(conts, ("tab:blue", "tab:orange", "tab:green")):
        ax.plot([x["tokens"] for x in ins], [x["calls"][k]["median"] * 1e3 for x in ins], "o-", color=color,
                label=d["labels"][k])
    ax.set_title("insert_cache, caller's thread (median)")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("ms per call")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fetch = [x for x in d["fetch"] if "tokens" in x]
    ax = axes[1]
    colors = dict(zip(conts, ("tab:blue", "tab:orange", "tab:green")))
    for k in conts:
        for kind, style in (("extend", "s:"), ("new_turn", "o-"), ("miss", "x--")):
            ax.plot([x["tokens"] for x in fetch], [x["kinds"][kind]["calls"][k]["median"] * 1e3 for x in fetch], style,
                    color=colors[k], label=f"{d['labels'][k]}: {kind}")
    ax.set_title("fetch_nearest_cache per call (median)", fontsize=10)
    ax.set_xlabel("stored prompt tokens")
    ax.set_ylabel("ms per call")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax = axes[2]
    w = d["write"]
    names = ["raw", "put", "queue", "mlx_save"]
    width = 0.8 / len(names)
    for i, k in enumerate(names):
        ax.bar([j + (i - 1.5) * width for j in range(len(w))], [x["mb_per_s"][k] for x in w], width, label=d["labels"][k])
    ax.set_xticks(range(len(w)), [f"{x['shape']}\n{x['tokens']:,} tok ({mb(x['snapshot_bytes'])})" for x in w],
                  fontsize=7)
    ax.set_ylabel("MB/s")
    ax.set_title("disk write throughput")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "hotpath.png", dpi=90)
    plt.close(fig)


def plot_multiturn(d, out):
    plt = _plt()
    runs = [r for r in d["runs"] if r["repeat"] == 0]
    fig, axes = plt.subplots(2, len(runs), figsize=(4.5 * len(runs), 6.5), squeeze=False)
    for j, run in enumerate(runs):
        for c, slot in run["contenders"].items():
            xs = [r["request"] for r in slot["reports"]]
            axes[0][j].plot(xs, [r["share"] * 100 for r in slot["reports"]], ".-", label=c)
            axes[1][j].plot(xs, [r["ttft_s"] for r in slot["reports"]], ".-", label=c)
        for i in range(2):
            axes[i][j].axvline(run["restart_before"] - 0.5, color="k", linestyle=":", linewidth=1)
            axes[i][j].grid(alpha=0.3)
        axes[0][j].set_title(f"{run['script']}, {run['model']} model")
        axes[0][j].set_ylabel("prompt tokens from cache (%)")
        axes[1][j].set_ylabel("time to first token (s)")
        axes[1][j].set_xlabel("request (dotted: restart)")
        axes[1][j].set_yscale("log")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "multiturn.png", dpi=90)
    plt.close(fig)


def plot_scale(d, out):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ms_ = d["milestones"]
    for kind in ms_[0]["requests"]:
        xs = [m["snapshots"] for m in ms_]
        ax.plot(xs, [m["requests"][kind]["lookup"]["median"] * 1e3 for m in ms_], "o-", label=f"{kind} p50")
        ax.plot(xs, [m["requests"][kind]["lookup"]["p99"] * 1e3 for m in ms_], "x:", label=f"{kind} p99")
    ax.axhline(1.0, color="k", linewidth=1, linestyle="--", label="1 ms design goal")
    ax.set_xscale("log")
    ax.set_xlabel("snapshots in the store")
    ax.set_ylabel("SnapshotStore.lookup, ms")
    ax.set_title(f"lookup of a {d['config']['request_tokens']:,}-token prompt")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "scale.png", dpi=90)
    plt.close(fig)


def plot_server(d, out):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    phases = ["cold", "warm", "after_restart"]
    kinds = list(d["servers"])
    width = 0.8 / len(kinds)
    for i, k in enumerate(kinds):
        vals = [C.median([r[k][p]["ttft"] for r in d["rounds"]]) for p in phases]
        ax.bar([j + (i - 0.5) * width for j in range(len(phases))], vals, width, label=k)
    ax.set_xticks(range(len(phases)), ["first request\n(cold)", "same system prompt\n(in memory)",
                                       "after a restart"])
    ax.set_yscale("log")
    ax.set_ylabel("time to first token (s, log)")
    ax.set_title(f"server TTFT, {d['model']['name']}")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "server.png", dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------- sections
def machine_section(data):
    any_r = next(iter(v for k, v in data.items() if k != "run_all"))
    m = any_r["machine"]
    lines = ["## Machine and run", ""]
    ra = data.get("run_all")
    if ra:
        lines.append(f"Command: `{cmd(ra)}` (mode `{ra['mode']}`), {ra['started']} to {ra['finished']}, "
                     f"{ra['wall_s'] / 60:.0f} minutes.")
        lines.append("")
    lines += [
        f"- CPU: {m['cpu']}, {m['usable_cores']} usable cores; memory {m['memory_bytes'] / 2**30:.0f} GiB; "
        f"{m['os']}; Python {m['python']}",
        "- " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + f"; repository at `{m['commit']}`",
        f"- MLX device: {m['mlx_device']} (the Linux CPU wheel: matmuls on a slow reference BLAS)",
        f"- scratch folder: {m['scratch']['path']} on {m['scratch']['device']} ({m['scratch']['fs']})",
        "- the machine is shared with other jobs: every figure is a median of interleaved runs; load averages "
        "(1 min) per script:",
        "",
    ]
    rows = []
    for name in ("restore", "hotpath", "multiturn", "agent", "scale", "server"):
        if name in data:
            r = data[name]
            wall = r.get("wall_s") or (ra or {}).get("scripts", {}).get(name, {}).get("wall_s")
            alone = bool(ra) and epoch(r) > epoch(ra) + ra.get("wall_s", 0)
            rows.append([name, f"`{cmd(r)}`" + (" (run again on its own after run_all)" if alone else ""),
                         r["started"][:16], f"{r['load_before'][0]:.2f}", f"{r['load_after'][0]:.2f}",
                         f"{wall / 60:.1f} min" if wall else "–"])
    lines.append(table(["script", "command", "started", "load before", "load after", "wall"], rows))
    return "\n".join(lines)


def restore_summary(d):
    """Headline rows: restart TTFT with and without kvstore, and restore vs the disk."""
    rows = []
    for m in d["models"]:
        for c in m["cases"]:
            R = c["runs"]
            cold = (c.get("cold_ttft") or {})
            cold_s = cold.get("seconds")
            kw = med(R.get("kv_fresh_warm", []), "ttft")
            kc = med(R.get("kv_fresh_cold", []), "ttft")
            mw = med(R.get("mlx_fresh_warm", []), "ttft")
            rows.append([m["model"], f"{c['tokens']:,}", mb(c["kv_bytes"]),
                         sec(cold_s) + ("" if cold.get("measured") else " (extrap.)"),
                         sec(kw), times(div(cold_s, kw)), sec(kc), times(div(cold_s, kc)), sec(mw)])
    return table(["model", "prompt", "snapshot", "restart without kvstore (cold prefill)",
                  "kvstore disk hit, warm", "speedup", "kvstore disk hit, pages dropped", "speedup",
                  "mlx-lm load_prompt_cache, warm"], rows)


def _fresh_alloc_spread(d):
    """'' or how far the buffers of the largest snapshot's fresh warm restores spread in this run."""
    best = None
    for m in d["models"]:
        for c in m["cases"]:
            runs = [r["alloc"] for r in c["runs"].get("kv_fresh_warm", []) if r.get("alloc")]
            if len(runs) > 1 and (best is None or c["kv_bytes"] > best[0]):
                best = (c["kv_bytes"], m["model"], c["tokens"], min(runs), max(runs))
    if best is None:
        return ""
    nbytes, model, n, lo, hi = best
    return (f" (the buffers of the {model} {n:,}-token restore, {mb(nbytes)}, took {sec(lo)} in one fresh "
            f"process of this run and {sec(hi)} in another)")


def restore_section(d):
    cfg = d["config"]
    chk = d["cold_read_check"]
    out = ["## Restore: what a disk hit is worth", "",
           f"Script: `{cmd(d)}`; {loads_line(d)}. Repeats: {cfg['repeats']} for in-process contenders and "
           f"probes, {cfg.get('fresh_repeats', cfg['slow_repeats'])} for fresh processes, {cfg['slow_repeats']} for "
           "nearest hits and cold prefills; all interleaved, the order rotating each repeat. Restored KV is random, "
           "of the model's real shape and dtype (bf16); cold prefills are real forward passes of the random-weight "
           "model.",
           "",
           f"Page cache: dropped with {d['drop_method']}. Check in the same run: a {mb(chk['bytes'])} file read in "
           f"{sec(chk['warm_s'])} warm and {sec(chk['dropped_s'])} after the drop ({times(chk['ratio'])} slower)"
           + (", so the drop works; the dropped reads come from the virtual disk (which the host may cache in turn), "
              "not from this kernel's page cache." if chk["ratio"] and chk["ratio"] > 1.5 else
              ": the drop made no clear difference here, so the 'dropped' rows may have read cached pages."), ""]
    pr = d.get("page_reporting")
    if pr and pr.get("on"):
        out += [f"New memory: this virtual machine reports the pages a process frees to its host at once (free "
                f"page reporting, blocks of order {pr['order']}, {pr['min_free_ms']} ms after the free), so the "
                "first touch of new memory faults on the host as well: a fresh process's allocations cost more, "
                f"and vary more, than on bare metal{_fresh_alloc_spread(d)}. Every contender that allocates pays "
                f"it; fresh processes run {cfg.get('fresh_repeats', cfg['slow_repeats'])} times each, interleaved, "
                "and the tables quote medians. The slow runs fell more often on kvstore's fresh processes than on "
                "mlx-lm's (whose load allocates the same bytes); the cause is not pinned down: the benchmark's own "
                "process is idle meanwhile, the slow child spends about twice the CPU time of a fast one (the "
                "kernel faulting pages in), and the same restore in this process (the in-process rows) makes the "
                "same buffers in a fraction of that time.", ""]
    for m in d["models"]:
        info = m["info"]
        cfgm = info["config"]
        fit = m["cold_fit"]
        meas = ", ".join(f"{int(n):,} tokens {sec(s)}" for n, s in sorted(fit["measured"].items(), key=lambda x: int(x[0])))
        out += [f"### {m['model']}", "",
                f"{info['params'] / 1e6:.0f}M parameters (random, bf16): {cfgm['num_hidden_layers']} layers, hidden "
                f"{cfgm['hidden_size']}, {cfgm['num_attention_heads']} heads, {cfgm['num_key_value_heads']} KV heads of "
                f"{cfgm.get('head_dim')}, vocabulary {cfgm['vocab_size']:,}; KV {m['kv_bytes_per_token']:,} bytes per "
                "token.", "",
                f"Cold prefill measured at {meas}. Other sizes are extrapolated: {fit['how']}. Attention is "
                "included in the FLOP count, so the estimate grows faster than linearly; it assumes the CPU keeps "
                "the FLOP rate it reached at the measured sizes.", ""]
        for c in m["cases"]:
            R = c["runs"]
            n = c["tokens"]
            rw, rf, rc = (med(R.get(k, []), "seconds") for k in ("raw_read_warm", "raw_read_fresh", "raw_read_cold"))
            cp = med(R.get("memcpy", []), "seconds")
            wr = med(R.get("raw_write", []), "seconds")
            out += [f"**{n:,} tokens**: kvstore snapshot {mb(c['kv_bytes'])} in {c['kv_blobs']} blob(s), mlx-lm file "
                    f"{mb(c['mlx_file_bytes'])}. Raw probes on a file of the snapshot's size: read {sec(rw)} warm "
                    f"({rate(c['kv_bytes'], rw)}), {sec(rf)} warm into new memory ({rate(c['kv_bytes'], rf)}), "
                    f"{sec(rc)} pages dropped ({rate(c['kv_bytes'], rc)}); memory copy {sec(cp)} "
                    f"({rate(c['kv_bytes'], cp)}); write+fsync {sec(wr)} ({rate(c['kv_bytes'], wr)}).", ""]
            rows = []
            cold = c.get("cold_ttft") or {}
            if cold:
                rows.append(["cold prefill" + ("" if cold.get("measured") else " (extrapolated)"), "", "", "", "", "",
                             "", sec(cold.get("seconds")), "1.0×", ""])
            order = ["lru", "kv_mem", "mlx_file", "kv_store", "kv_disk", "mlx_fresh_warm", "kv_fresh_warm",
                     "mlx_fresh_cold", "kv_fresh_cold", "lru_near", "kv_mem_near", "kv_disk_near"]
            for k in order:
                runs = R.get(k)
                if not runs:
                    continue
                fetch = med(runs, "fetch")
                ref = rc if k.endswith("cold") else rf
                lim = ""
                if k in ("kv_store", "kv_disk", "kv_fresh_warm", "kv_fresh_cold", "mlx_file", "mlx_fresh_warm",
                         "mlx_fresh_cold", "kv_disk_near"):
                    lim = times(div(fetch, ref))
                rd = med(runs, "read")
                fw = med(runs, "first_write")
                rows.append([
                    d["labels"][k], ms(med(runs, "lookup")), ms(rd) if rd is not None else "–",
                    ms(med(runs, "verify")), ms(med(runs, "rebuild")), ms(fetch),
                    ms(med(runs, "first_step")) + (f" ({ms(fw)} first write)" if fw is not None else ""),
                    sec(med(runs, "ttft")), times(div(cold.get("seconds"), med(runs, "ttft"))), lim])
            out += [table(["contender", "lookup", "read", "verify", "rebuild", "restore total", "first step",
                           "TTFT", "vs cold", "restore ÷ raw read"], rows), ""]
            fw = R.get("kv_fresh_warm") or []
            if fw:
                out += [f"Fresh process, before the first request (not in TTFT): imports {sec(med(fw, 'import'))}, "
                        f"model load {sec(med(fw, 'model_load'))}, model fingerprint {ms(med(fw, 'fingerprint'))}, "
                        f"store open {ms(med(fw, 'store_open'))}. kvstore save: insert on the caller's thread "
                        f"{ms(c['kv_insert_s'])}, written with fsync {ms(c['kv_insert_and_write_s'])}; mlx-lm "
                        f"save_prompt_cache (no fsync) {ms(c['mlx_save_s'])}.", ""]
    out += ["Column notes: *lookup* is hashing plus the index (kvstore) or the trie search (mlx-lm); *read* is "
            "preadv into buffers (kvstore) or `mx.load` with its evaluation (mlx-lm); *verify* is kvstore's xxh3 "
            "checks; *rebuild* is numpy→MLX copies plus cache objects (kvstore), the structural `deepcopy` "
            "(memory hits) or the rest of `load_prompt_cache`; *first step* is the first decode step on the "
            "restored cache (for nearest hits: the suffix prefill). *restore ÷ raw read* divides the restore "
            "total by a raw read of the same bytes into new memory (warm rows) or with pages dropped (dropped "
            "rows).", ""]
    return "\n".join(out)


def hotpath_section(d):
    L = d["labels"]
    out = ["## Hot path", "", f"Script: `{cmd(d)}`; {loads_line(d)}. KV shape: {d['config']['shape']} "
           "(random bf16). Calls interleave the contenders call by call.", "",
           "### insert_cache: time on the caller's thread per call", ""]
    rows = []
    for x in d["insert"]:
        c = x["calls"]
        rows.append([f"{x['tokens']:,}", mb(x["kv_bytes"])] +
                    [f"{ms(c[k]['median'], 3)} / {ms(c[k]['p99'], 3)}" for k in ("lru", "tiered_mem", "tiered_disk")] +
                    [times(div(c["tiered_disk"]["median"], c["lru"]["median"])),
                     f"{x['writes']['writes.done']}/{x['writes']['writes.queued']} written, "
                     f"{x['writes']['writes.dropped']} dropped"])
    out += [table(["prompt tokens", "KV", L["lru"] + " p50 / p99", L["tiered_mem"] + " p50 / p99",
                   L["tiered_disk"] + " p50 / p99", "kvstore ÷ mlx-lm", "write-behind"], rows), "",
            "Both keep mlx-lm's LRU policy (tier order, limits, redundant trimmable prefixes dropped); "
            "mlx-lm's `PromptTrie` walks a dict per token, kvstore's memory tier a radix trie (`kvstore.trie`: "
            "a tuple edge per run of tokens without a branch, the same results call for call), so for kvstore "
            "a longer prompt costs C-speed tuple copies and comparisons, not a Python step per token. kvstore "
            "also copies the cache's structure (new cache objects over the same arrays) and, with a store, "
            "queues it for the writer.", ""]
    out += ["### fetch_nearest_cache: time per call", "",
            "`extend`: the stored prompt plus one token (memory covers all but the last token); `new_turn`: the "
            f"stored prompt plus {d['config']['new_turn']} new tokens (memory serves the stored prompt; kvstore also "
            "asks the disk whether it holds more); `miss`: an unrelated prompt. The returned caches are not used "
            "(no decode), so this is the cache's own overhead.", ""]
    rows = []
    for x in d["fetch"]:
        if "tokens" not in x:
            continue
        for kind, v in x["kinds"].items():
            c = v["calls"]
            rows.append([f"{x['tokens']:,}", kind] +
                        [f"{ms(c[k]['median'], 3)} / {ms(c[k]['p99'], 3)}" for k in ("lru", "tiered_mem", "tiered_disk")]
                        + [("+" if c['tiered_disk']['median'] >= c['lru']['median'] else "−")
                           + ms(abs(c['tiered_disk']['median'] - c['lru']['median']), 3)])
    out += [table(["stored tokens", "request", L["lru"] + " p50 / p99", L["tiered_mem"] + " p50 / p99",
                   L["tiered_disk"] + " p50 / p99", "kvstore with store − mlx-lm (p50)"], rows), ""]
    bd = next((x["breakdown"] for x in d["fetch"] if "breakdown" in x), None)
    if bd:
        rows = [[k, ms(v["median"], 3), ms(v["p99"], 3)] for k, v in bd["stages"].items()]
        out += [f"Where a disk lookup's time goes for a {bd['tokens']:,}-token prompt (medians of "
                f"{next(iter(bd['stages'].values()))['n']} calls):", "", table(["stage", "p50", "p99"], rows), ""]
    out += ["### Disk write throughput", "",
            "Each contender writes the same number of snapshots of the same bytes (distinct random prompts, so "
            "nothing is shared); the raw contender writes files of the same size with `os.write` and one fsync "
            "each, in the same run.", ""]
    rows = []
    for x in d["write"]:
        s = x["mb_per_s"]
        rows.append([x["shape"], f"{x['tokens']:,}", mb(x["snapshot_bytes"]), str(x["snapshots"])] +
                    [f"{s[k]:,.0f} MB/s ({times(x['ratio_to_raw'][k], 2)})" for k in ("raw", "put", "queue", "mlx_save")]
                    + [ms(x["queue_caller_per_insert"]["median"])])
    out += [table(["shape", "tokens", "snapshot", "snapshots", L["raw"], L["put"], L["queue"], L["mlx_save"],
                   "queue: caller's time per insert"], rows), ""]
    return "\n".join(out)


def multiturn_section(d):
    out = ["## Multi-turn conversations with a restart", "",
           f"Script: `{cmd(d)}`; {loads_line(d)}. Models: " + "; ".join(
               f"{role} = {v['name']} ({v['params'] / 1e6:.1f}M parameters, {v['config']['num_hidden_layers']} layers"
               + (f", full attention every {v['config']['full_attention_interval']}" if v['config'].get(
                   'full_attention_interval') else "") + ")" for role, v in d["models"].items()) + ". "
           f"Chat: {d['config']['chat_turns']} turns; agent: {d['config']['agent_tasks']} tasks of "
           f"{d['config']['agent_rounds']} tool rounds; {d['config']['max_tokens']} generated tokens per request; "
           f"{d['config']['repeats']} repeat(s), totals are medians over repeats. TTFT here is the request's time "
           "to its first generated token: fetch, prefill of what was not cached (checkpoints inserted at segment "
           "ends), first token.", ""]
    groups = {}
    for run in d["runs"]:
        groups.setdefault((run["script"], run["model"]), []).append(run)
    rows = []
    for (script, model), runs in groups.items():
        first = runs[0]
        base = C.median([r["contenders"]["mlx_lru"]["total_ttft_s"] for r in runs])
        for c in first["contenders"]:
            tot = C.median([r["contenders"][c]["total_ttft_s"] for r in runs])
            slot = first["contenders"][c]
            ar = slot["after_restart"] or {}
            rows.append([script, model, d["contenders"][c], f"{first['requests']}", pct(div(slot["cached_tokens"],
                         slot["prompt_tokens"])), f"{slot['prefilled_tokens']:,}", sec(tot),
                         times(div(base, tot), 2),
                         f"{ar.get('cached', 0):,}/{ar.get('prompt', 0):,} ({ar.get('source') or 'none'}), "
                         f"{sec(ar.get('ttft_s'))}",
                         (f"{slot['store']['snapshots']} / {mb(slot['store']['bytes'])}" if slot.get("store") else "–")])
    out += [table(["script", "model", "cache", "requests", "prompt tokens from cache", "tokens prefilled",
                   "total TTFT", "mlx-lm ÷ this", "first request after the restart", "store: snapshots / bytes"],
                  rows), ""]
    # per-turn share, compact: one line per contender
    out += ["Share of each request's prompt served from the cache (first repeat; `|` marks the restart):", ""]
    for (script, model), runs in groups.items():
        run = runs[0]
        for c, slot in run["contenders"].items():
            shares = [f"{int(round(100 * r['share']))}" for r in slot["reports"]]
            cut = run["restart_before"] - 1
            line = " ".join(shares[:cut]) + " | " + " ".join(shares[cut:])
            out.append(f"- {script}, {model}, {c}: {line}")
    out.append("")
    return "\n".join(out)


def agent_section(d):
    cfg = d["config"]
    out = ["## Agent loops through the servers", "",
           f"Script: `{cmd(d)}`; {loads_line(d)}. Models: " + "; ".join(
               f"{role} = {v['name']} ({v['params'] / 1e6:.1f}M parameters)" for role, v in d["models"].items())
           + f". {cfg['tasks']} tasks of {cfg['rounds']} requests (a user task, then tool rounds) on a "
           f"{cfg['system_words']}-word system prompt with 3 tools; tool results of {cfg['tool_words'][0]}-"
           f"{cfg['tool_words'][1]} words; {cfg['max_tokens']} generated tokens per request, each reply sent back "
           "as the server returned it. Each contender is a real server on 127.0.0.1 driven over HTTP (streamed: TTFT "
           "is the time to the first chunk); the server process is replaced by a new one in the middle of a task "
           f"(a restart). {cfg['repeats']} repeat(s), contender order rotated; totals are medians.", ""]
    rows = []
    for role in d["models"]:
        runs = [r for r in d["runs"] if r["model"] == role]
        for c in d["contenders"]:
            slots = [r["contenders"][c] for r in runs]
            s = slots[0]
            rows.append([role, d["contenders"][c], pct(div(s["cached_tokens"], s["prompt_tokens"])),
                         pct(s["min_share_later_before_restart"]), pct(s["min_share_later_after_restart"]),
                         sec(C.median([x["total_ttft_s"] for x in slots])),
                         times(d["ttft_ratio"][role], 2) if c == "kvstore" else "–"])
    out += [table(["model", "server", "prompt tokens from cache", "lowest share, later requests of a task, "
                   "before the restart", "after the restart", "total TTFT", "kvstore ÷ mlx_lm.server"], rows), "",
            f"Hybrid's TTFT ratio ÷ plain's: {times(d['ttft_ratio_hybrid_over_plain'], 3)}. kvstore's TTFT includes "
            "the resume point's prefill after each reply (the next request waits for the generation thread). Within a "
            "task, mlx_lm.server's own checkpoint at the prefill's end already serves the previous prompt when the "
            "template keeps the reasoning; the resume point adds the reply's tokens. The gains over mlx_lm.server "
            "are the restart and the first request of a task after it.", "",
            "Share of each request's prompt served from the cache (first repeat; `|` marks the restart, `/` a new "
            "task):", ""]
    for run in [r for r in d["runs"] if r["repeat"] == 0]:
        for c, slot in run["contenders"].items():
            parts = []
            for x in slot["reports"]:
                sep = " | " if x["after_restart"] else (" / " if x["round"] == 0 and x["request"] > 1 else " ")
                parts.append(sep + f"{int(round(100 * x['share']))}")
            out.append(f"- {run['model']}, {c}: " + "".join(parts).strip())
    out.append("")
    disk = d.get("disk")
    if disk:
        out += ["### Disk growth of a long hybrid agent session", "",
                f"{disk['requests']} requests in `PromptSession` on the hybrid model with assistant checkpoints "
                f"persisted (the prefill's end, the reply, the reply as re-rendered): {disk['snapshots']} snapshots "
                f"({disk['tiers']['system']} system, {disk['tiers']['user']} user, {disk['tiers']['assistant']} "
                "assistant). Unique state = distinct prefix tokens × positional KV bytes per token + snapshots × "
                "recurrent state bytes.", "",
                table(["distinct prefix tokens", "KV bytes per token", "recurrent state per snapshot",
                       "unique state", "blob files", "whole store (allocated, index included)", "blobs ÷ unique",
                       "store ÷ unique"],
                      [[f"{disk['distinct_prefix_tokens']:,}", f"{disk['kv_bytes_per_token']:,}",
                        mb(disk['recurrent_bytes']), mb(disk['unique_bytes']), mb(disk['blob_bytes']),
                        mb(disk['store_allocated']), times(disk['ratio_blobs'], 3),
                        times(disk['ratio_store_allocated'], 3)]]), ""]
    return "\n".join(out)


def scale_section(d):
    b = d["bytes"]
    cfg = d["config"]
    out = ["## Scale", "", f"Script: `{cmd(d)}`; {loads_line(d)}. {d['build_note']}. Traffic shape: "
           f"{cfg['systems']} system prompts of {cfg['system_tokens']} tokens, conversations of {cfg['turns']} "
           f"checkpoints each {cfg['turn_tokens'][0]}–{cfg['turn_tokens'][1]} tokens longer than the last, one "
           f"conversation with checkpoints up to {cfg['request_tokens']:,} tokens.", ""]
    rows = [[("setup (one process): system prompts and the long conversation" if i == 0 else
              f"{cfg['builders']} builder processes"), f"{x['snapshots']:,}", sec(x["seconds"]),
             f"{x['puts_per_s']:,.0f}"] for i, x in enumerate(d["build"])]
    out += ["Build (wall time, including process start):", "",
            table(["step", "snapshots after", "seconds", "puts/s"], rows), ""]
    rows = []
    for m in d["milestones"]:
        for kind, v in m["requests"].items():
            f = v.get("fetch")
            mt = v["match"]
            cv = v.get("convert")
            rows.append([f"{m['snapshots']:,}", kind, f"{mt['kind']} {mt['tokens']:,}" if mt else "miss",
                         ms(v["lookup"]["median"], 2), ms(v["lookup"]["p99"], 2), ms(cv["median"], 2) if cv else "–",
                         ms(f["median"], 2) if f else "–", ms(f["p99"], 2) if f else "–"])
    out += [f"Lookups of {cfg['request_tokens']:,}-token prompts (`SnapshotStore.lookup`: index only; *conversion*: "
            "the request's token list to int32 alone, as every lookup starts, timed after each lookup; `fetch`: "
            "with blob reads and rebuild of the tiny cache):", "",
            table(["snapshots", "request", "match", "lookup p50", "lookup p99", "conversion p50", "fetch p50",
                   "fetch p99"], rows), ""]
    c = d["commands"]
    runs = c.get("runs", {})
    rows = [[f"`kvstore {k}`", sec(v), ", ".join(sec(x) for x in runs.get(k, [v]))]
            for k, v in c.items() if isinstance(v, float)]
    out += [f"Commands on the store ({b['snapshots']:,} snapshots; `ls` printed {c['ls_lines']:,} lines; the "
            "reading commands run on the store, `prune` and then `gc` each on a fresh copy of it):", "",
            table(["command", "wall time (median)", "each run"], rows), "",
            f"`prune` said: {' '.join(c['prune_output'])} Afterwards: {c['after_prune']['snapshots']:,} snapshots, "
            f"{mb(c['after_prune']['bytes'])}. `gc` said: {' '.join(c['gc_output'])}", ""]
    per = b["per_token_bytes_llama_135m"]
    out += ["Bytes on disk with shared prefixes:", "",
            table(["", "tokens", "KV bytes here", "at llama-135m's 23,040 B/token"], [
                ["every snapshot stored whole (no sharing)", f"{b['tokens_referenced']:,}", mb(b["kv_bytes_unshared"]),
                 mb(b["tokens_referenced"] * per)],
                ["kvstore's segments (rows stored)", f"{b['rows_stored']:,}", mb(b["kv_bytes_stored"]),
                 mb(b["rows_stored"] * per)],
                ["unique: distinct prefix tokens", f"{b['distinct_prefix_tokens']:,}", mb(b["kv_bytes_unique"]),
                 mb(b["distinct_prefix_tokens"] * per)],
            ]), "",
            f"kvstore stores {times(div(b['rows_stored'], b['distinct_prefix_tokens']), 3)} the unique rows and "
            f"{pct(div(b['rows_stored'], b['tokens_referenced']))} of the unshared rows. On disk: blob files "
            f"{mb(b['blob_files_logical'])} logical ({mb(b['kvstore_total_bytes'])} by kvstore's count, "
            f"{mb(b['blob_files_allocated'])} allocated: with caches this small, headers and 4 kB blocks dominate), "
            f"index {mb(b['index_logical'])} (the index keeps every snapshot's token ids and one link per 64-token "
            "block).", ""]
    if b.get("extents_per_snapshot"):
        e = b["extents_per_snapshot"]
        out += [f"A restore reads its snapshot from {e['median']:.0f} segment piece(s) at the median, {e['p99']:.0f} "
                f"at p99, {e['max']:.0f} at most; {b['short_extents']:,} pieces (not counting each snapshot's own "
                "last one) are shorter than one 64-token block.", ""]
    return "\n".join(out)


def server_section(d):
    out = ["## Server", "", f"Script: `{cmd(d)}`; {loads_line(d)}. Model {d['model']['name']} "
           f"({d['model']['params'] / 1e6:.0f}M parameters); {len(d['rounds'])} round(s), servers interleaved.", ""]
    rows = []
    kinds = list(d["servers"])
    for k in kinds:
        R = [r[k] for r in d["rounds"]]
        rows.append([d["servers"][k], sec(C.median([r["startup_s"] for r in R]))] +
                    [f"{sec(C.median([r[p]['ttft'] for r in R]))} ({R[0][p]['cached_tokens']}/{R[0][p]['prompt_tokens']})"
                     for p in ("cold", "warm", "after_restart")] +
                    [sec(C.median([r["restart_startup_s"] for r in R])), "yes" if any(r["traceback"] for r in R) else "no"])
    out += [table(["server", "start (to /health)", "TTFT cold (cached/prompt)", "TTFT same system prompt",
                   "TTFT after restart", "restart (to /health)", "traceback in log"], rows), ""]
    a = C.median([r["mlx_lm.server"]["after_restart"]["ttft"] for r in d["rounds"]])
    b = C.median([r["kvstore serve"]["after_restart"]["ttft"] for r in d["rounds"]])
    ca = C.median([r["mlx_lm.server"]["cold"]["ttft"] for r in d["rounds"]])
    cb = C.median([r["kvstore serve"]["cold"]["ttft"] for r in d["rounds"]])
    wb = C.median([r["kvstore serve"]["warm"]["ttft"] for r in d["rounds"]])
    out += [f"After a restart, kvstore serve answers {times(div(a, b))} sooner than mlx_lm.server. On the cold "
            f"request kvstore serve takes {times(div(cb, ca), 2)} mlx_lm.server's time. Its first request after a "
            f"restart ({sec(b)}) is slower than a memory hit in a running server ({sec(wb)}) by more than the disk "
            "read (milliseconds for this prompt, see the restore section); this run does not isolate the rest, "
            "which includes a new process's first forward pass.", ""]
    return "\n".join(out)


def fingerprint_section(d):
    """What hashing every weight byte costs, at the first and at later starts."""
    out = ["## Model fingerprints: every weight byte, once", "",
           f"Script: `{cmd(d)}`; {loads_line(d)}. A model folder of random safetensors shards, fingerprinted in a "
           "fresh process per run (time of the call, medians of interleaved runs); BLAKE3 through a memory map on "
           "every core; a later start finds each file's digest in the store by its content identity (device, "
           "inode, size, mtime, ctime) and reads nothing.", ""]
    rows = []
    for size in d["sizes"]:
        r = size["runs"]
        m = {k: C.median([x["seconds"] for x in v]) for k, v in r.items()}
        rows.append([mb(size["bytes"]), str(size["files"]),
                     f"{sec(m['first_dropped'])} ({rate(size['bytes'], m['first_dropped'])})",
                     f"{sec(m['raw_dropped'])} ({rate(size['bytes'], m['raw_dropped'])})",
                     f"{sec(m['first_warm'])} ({rate(size['bytes'], m['first_warm'])})",
                     f"{sec(m['raw_warm'])} ({rate(size['bytes'], m['raw_warm'])})",
                     sec(m["later"]), "yes" if size["same_fingerprint"] else "NO"])
    out += [table(["weights", "files", "first start, pages dropped", "raw read, pages dropped",
                   "first start, page cache warm", "raw read, warm", "later start (digest cache)",
                   "same fingerprint every run"], rows), ""]
    return "\n".join(out)


def compare_section(d):
    """Several commits' ``run_all --quick`` figures side by side (``compare.py``)."""
    cs = d["commits"]
    counts = ", ".join(f"`{c}` {d['runs_per_commit'][c]} runs" for c in cs)
    out = ["## Commits compared: `run_all.py --quick`, interleaved", "",
           f"Command: `{d['command']}`; {counts}, run in the "
           "order first, second, ..., last, last, ..., first, each commit in its own worktree and venv with its own "
           "scripts (see `benchmarks/compare.py`). Medians of each commit's runs; the ratio columns are each "
           f"commit's figure over `{cs[0]}`'s (below 1 is faster, except MB/s). mlx-lm's own figures, measured in "
           "the same runs, show the spread this machine gives between runs of the same code.", ""]
    rows = []
    for name, vals in d["figures"].items():
        base = vals[cs[0]]

        def f(v):
            if v is None:
                return "–"
            return f"{v:,.0f}" if "MB/s" in name else sec(v)

        rows.append([name] + [f(vals[c]) for c in cs] +
                    [("–" if vals[c] is None or not base else f"{vals[c] / base:.2f}") for c in cs[1:]])
    out += [table(["figure"] + [f"`{c}`" for c in cs] + [f"`{c}` / `{cs[0]}`" for c in cs[1:]], rows), ""]
    return "\n".join(out)


def peers_section(d):
    """kvstore serve against vllm-mlx (``bench_peers.py``; run by hand, it needs vllm-mlx's own venv)."""
    import bench_peers

    return bench_peers.section(d)


def gaps_section(data):
    """Where kvstore is still slower than a goal, with the breakdown of this run."""
    import goals

    def missed(goal):  # a goal of ``goals.GOALS`` this run measured and did not meet
        got = goal(data)
        return got is not None and not got[1]

    out = ["## Where kvstore is still slower, and why", ""]
    items = []
    d = data.get("restore")
    if d and (missed(goals.restore_warm) or missed(goals.restore_cold)):
        parts = []
        for m in d["models"]:
            for c in m["cases"]:
                R = c["runs"]
                ks = R.get("kv_store", [])
                parts.append(
                    f"{m['model']} {c['tokens']:,} tokens ({mb(c['kv_bytes'])}): in process {ms(med(ks, 'fetch'))} = "
                    f"lookup {ms(med(ks, 'lookup'))}, open {ms(med(ks, 'open'))}, buffers {ms(med(ks, 'alloc'))}, "
                    f"read {ms(med(ks, 'read'))}, "
                    f"verify {ms(med(ks, 'verify'))}, rebuild {ms(med(ks, 'rebuild'))}, other {ms(med(ks, 'other'))}"
                    + (f", minus {ms(med(ks, 'overlap'))} run side by side"
                       if (med(ks, "overlap") or 0) > 0.1 * med(ks, "fetch") else "") + "; "
                    f"a raw read of the same bytes into new memory {ms(med(R.get('raw_read_fresh', []), 'seconds'))} "
                    f"(into a new MLX buffer {ms(med(R.get('raw_read_mlx', []), 'seconds'))}), "
                    f"a memory copy {ms(med(R.get('memcpy', []), 'seconds'))}")
        items.append(
            "**A disk restore against a raw read of the same bytes.** Each tensor is read once, with grouped "
            "`preadv` calls, into buffers MLX allocated for it, and each chunk's xxh3 is checked right after it "
            "is read (a corrupt chunk is a miss before a byte is used). The buffers are made about 4 MB at a time "
            "on the caller's thread while a reader thread fills and checks the ones already made, so the two "
            "halves run on two cores side by side (*run side by side*: by how much the stages add up to more "
            "than the total). Making the buffers (*buffers*) is the larger half: on this Linux build every new "
            "MLX array's 4 KiB pages are faulted in and zeroed one by one, while numpy gets transparent huge pages "
            "for large buffers and reuses its heap below glibc's mmap threshold. The probe *into a new MLX buffer* "
            "allocates the arrays a restore needs (same shapes, decode headroom, MLX's buffer cache emptied first) "
            "and then reads the same bytes into them, one after the other on one thread (mlx-lm's "
            "`load_prompt_cache` pays the same allocation). " + "; ".join(parts) + ".")
    h = data.get("hotpath")
    if h:
        rows = []
        for ins in h["insert"]:
            c = ins["calls"]
            rows.append(f"{ins['tokens']:,} tokens {ms(c['tiered_disk']['median'], 2)} with a store, "
                        f"{ms(c['tiered_mem']['median'], 2)} memory only, {ms(c['lru']['median'], 2)} for mlx-lm "
                        f"({times(div(c['tiered_disk']['median'], c['lru']['median']), 2)})")
        if missed(goals.caller_thread):
            items.append(
                "**`insert_cache` on the caller's thread**: " + "; ".join(rows) + ". kvstore makes a structural "
                "copy of the cache (new cache objects over the same arrays, no data copied), keeps mlx-lm's "
                "LRU policy over a radix trie (a step per branch point, where mlx-lm's `PromptTrie` takes a "
                "dict per token) and queues persisted tiers for the writer; mlx-lm's `LRUPromptCache` stores "
                "the reference it is given.")
        wr = []
        for w in h["write"]:
            r_ = w["mb_per_s"]
            wr.append(f"{w['shape']} {w['tokens']:,} tokens: `put` {r_['put']:,.0f} MB/s, queue {r_['queue']:,.0f} "
                      f"MB/s, raw fsynced write {r_['raw']:,.0f} MB/s")
        if missed(goals.writes):
            items.append(
                "**Snapshot writes** against a raw write of the same bytes fsynced with its folder: " + "; ".join(wr) +
                ". A `put` checksums each 2 MB batch of its blob just before one `pwritev` and starts the disk on it "
                "(`sync_file_range`), fsyncs the blob and its folder, then commits one index transaction. The queue's "
                "writer thread runs at the lowest CPU priority while nobody waits for it (so a checkpoint never "
                "takes CPU from a request) and at a waiting caller's priority during `flush` or an insert waiting for "
                "room; the shared virtual disk's raw probe varies several-fold between repeats (the bench pairs "
                "each round's contenders with that round's raw write).")
    s = data.get("scale")
    if s and "commands" in s and (missed(goals.lookup) or missed(goals.big_store)):
        last = s["milestones"][-1]
        r = last["requests"]
        cmds = s["commands"]
        items.append(
            f"**A store of {last['snapshots']:,} snapshots**: lookup p50 {ms(r['hit_long']['lookup']['median'], 2)} "
            f"(hit), {ms(r['shared_system']['lookup']['median'], 2)} (shared system prompt), "
            f"{ms(r['miss']['lookup']['median'], 2)} (miss); `ls` {sec(cmds['ls'])}, prune of the assistant half "
            f"{sec(cmds['prune --tier assistant -y'])}, `gc` {sec(cmds['gc'])}. A lookup of a "
            f"{s['config']['request_tokens']:,}-token prompt converts the token list to int32 once (a pass of "
            "Python over every token"
            + (f"; alone {ms(max(v['convert']['median'] for v in r.values()), 2)} at the p50 in the same run"
               if all("convert" in v for v in r.values()) else "") +
            "), reuses the block hashes of recent chains and the records recent lookups "
            "decoded while the index holds the same bytes, and reads the links of the deepest block in LMDB; its "
            "p99 is the second-worst of 200 samples, so a scheduler stall of this shared machine decides it. "
            f"`ls -n 20 --sort -accessed` (the same index scan and decoding of every record, 20 rows printed) "
            f"took {sec(cmds['ls -n 20 --sort -accessed'])} of `ls`'s {sec(cmds['ls'])}: the scan is most of it, "
            "the rest is formatting 100,000 rows. Prune deletes in transactions that grow while they take under "
            + (f"{s['config']['delete_hold_s']:g} s " if "delete_hold_s" in s["config"] else "a set time ") +
            "(each commit is an fsync and writes every page the run dirtied; a shared segment's reference count "
            "is read and written once per transaction) and unlinks freed blobs from 8 "
            "threads after the commit; gc streams the index (a digest of each record kept for its re-check, "
            "not the record).")
    sv = data.get("server")
    if sv and missed(goals.serve_overhead):
        def both(phase):
            return (C.median([x["mlx_lm.server"][phase]["ttft"] for x in sv["rounds"]]),
                    C.median([x["kvstore serve"][phase]["ttft"] for x in sv["rounds"]]))

        (ca, cb), (wa, wb) = both("cold"), both("warm")
        items.append(
            f"**Requests through `kvstore serve` that the disk does not help**: cold {sec(cb)} against "
            f"{sec(ca)} for mlx_lm.server ({times(div(cb, ca), 2)}); system prompt in memory {sec(wb)} against "
            f"{sec(wa)} ({times(div(wb, wa), 2)}). kvstore's own work on such a request is a lookup that memory "
            "usually answers without the disk, a structural copy per checkpoint and a queue hand-off; the "
            "writer runs at the lowest priority. `bench_serve_parts.py` (below) splits a request's time between "
            "kvstore and mlx_lm.server.")
    out += [f"{i + 1}. {t}" for i, t in enumerate(items)]
    out.append("")
    return "\n".join(out)


def summary_section(data):
    out = ["## Summary", ""]
    d = data.get("restore")
    if d:
        out += ["Time to first token after a restart, without kvstore (a cold prefill of the prompt) and with it (a "
                "disk hit in a fresh process, plus the first decode step); mlx-lm's own file save/load for "
                "comparison:", "", restore_summary(d), ""]
        rows = []
        for m in d["models"]:
            for c in m["cases"]:
                R = c["runs"]
                rf, rc = (med(R.get(k, []), "seconds") for k in ("raw_read_fresh", "raw_read_cold"))
                cp = med(R.get("memcpy", []), "seconds")
                kw, kc = med(R.get("kv_fresh_warm", []), "fetch"), med(R.get("kv_fresh_cold", []), "fetch")
                mw, mc = med(R.get("mlx_fresh_warm", []), "fetch"), med(R.get("mlx_fresh_cold", []), "fetch")
                km, lr = med(R.get("kv_mem", []), "ttft"), med(R.get("lru", []), "ttft")
                rows.append([m["model"], f"{c['tokens']:,}", f"{ms(kw)} = {times(div(kw, rf))} raw, "
                             f"{times(div(kw, cp))} memcpy", f"{ms(kc)} = {times(div(kc, rc))} raw",
                             f"{times(div(kw, mw), 2)} / {times(div(kc, mc), 2)}", times(div(km, lr), 2)])
        out += ["Restore time (lookup to rebuilt cache, before the first decode step) as a multiple of the "
                "machine's limits measured in the same run (raw sequential read of the same bytes into new "
                "memory; memory copy), and against mlx-lm:", "",
                table(["model", "prompt", "kvstore restore, warm", "kvstore restore, pages dropped",
                       "kvstore ÷ mlx-lm load_prompt_cache (warm / dropped)",
                       "kvstore memory hit ÷ mlx-lm LRU hit (TTFT)"], rows), ""]
    h = data.get("hotpath")
    if h:
        ins = h["insert"]
        fetch = [x for x in h["fetch"] if "tokens" in x]
        out.append("Hot path (medians per call): insert_cache " + "; ".join(
            f"{x['tokens']:,} tokens {ms(x['calls']['tiered_disk']['median'], 2)} vs mlx-lm "
            f"{ms(x['calls']['lru']['median'], 2)}" for x in ins) + ". fetch_nearest_cache on a new turn " + "; ".join(
            f"{x['tokens']:,} tokens {ms(x['kinds']['new_turn']['calls']['tiered_disk']['median'], 2)} vs "
            f"{ms(x['kinds']['new_turn']['calls']['lru']['median'], 2)}" for x in fetch) + ". Write throughput " +
            "; ".join(f"{w['shape']} {w['tokens']:,}: put {times(w['ratio_to_raw']['put'], 2)}, queue "
                      f"{times(w['ratio_to_raw']['queue'], 2)} the raw fsynced rate" for w in h["write"]) + ".")
        out.append("")
    mt = data.get("multiturn")
    if mt:
        parts = []
        groups = {}
        for run in mt["runs"]:
            groups.setdefault((run["script"], run["model"]), []).append(run)
        for (script, model), runs in groups.items():
            a = C.median([r["contenders"]["mlx_lru"]["total_ttft_s"] for r in runs])
            b = C.median([r["contenders"]["kvstore"]["total_ttft_s"] for r in runs])
            parts.append(f"{script}/{model}: {sec(b)} vs {sec(a)} ({times(div(a, b), 2)})")
        out += ["Multi-turn with a restart halfway, total time to first tokens, kvstore vs mlx-lm: " + "; ".join(parts)
                + ".", ""]
    s = data.get("scale")
    if s:
        last = s["milestones"][-1]
        r = last["requests"]["hit_long"]
        out += [f"Scale: {last['snapshots']:,} snapshots, {s['config']['request_tokens']:,}-token lookup p50 "
                f"{ms(r['lookup']['median'], 2)}, p99 {ms(r['lookup']['p99'], 2)}; `ls` {sec(s['commands']['ls'])}, "
                f"`prune` of the assistant half {sec(s['commands']['prune --tier assistant -y'])}, `gc` {sec(s['commands']['gc'])}; "
                f"segments hold {times(div(s['bytes']['rows_stored'], s['bytes']['distinct_prefix_tokens']), 3)} the "
                f"unique KV rows, {pct(div(s['bytes']['rows_stored'], s['bytes']['tokens_referenced']))} of what "
                "unshared snapshots would.", ""]
    sv = data.get("server")
    if sv:
        a = C.median([x["mlx_lm.server"]["after_restart"]["ttft"] for x in sv["rounds"]])
        b = C.median([x["kvstore serve"]["after_restart"]["ttft"] for x in sv["rounds"]])
        out += [f"Server: after a restart, TTFT {sec(b)} through kvstore serve vs {sec(a)} through mlx_lm.server "
                f"({times(div(a, b))}).", ""]
    return "\n".join(out)


def goals_part(data, before_dir):
    """The goal / before / after table, with where each run came from."""
    import goals

    before = load(before_dir) if before_dir else None

    def label(d):
        commits = {}
        for k, v in (d or {}).items():
            if k != "run_all" and "machine" in v:
                commits.setdefault(v["machine"]["commit"], []).append(k)
        if len(commits) <= 1:
            return " ".join(f"`{c}`" for c in commits) or "–"
        return "; ".join(f"{', '.join(sorted(ks))} `{c}`" for c, ks in commits.items())

    out = ["## Goals", "",
           "Each figure is a ratio measured side by side in one run (medians); the two columns are two runs of "
           "the same scripts, on the commit before the performance work and on this one.", "",
           goals.goals_section(data, before, f"before ({label(before)})", f"after ({label(data)})"), ""]
    return "\n".join(out)


def build(results=C.RESULTS, md=HERE / "RESULTS.md", plots=C.PLOTS, before=None):
    data = load(results)
    if not any(k != "run_all" for k in data):
        raise SystemExit(f"no results in {results}")
    plots = Path(plots)
    plots.mkdir(parents=True, exist_ok=True)
    pics = []
    for name, fn, files in (("restore", plot_restore, ["restore_ttft.png", "restore_stages.png"]),
                            ("hotpath", plot_hotpath, ["hotpath.png"]), ("multiturn", plot_multiturn, ["multiturn.png"]),
                            ("scale", plot_scale, ["scale.png"]), ("server", plot_server, ["server.png"])):
        if name in data:
            fn(data[name], plots)
            pics += files
    mode = (data.get("run_all") or next(iter(data.values())))["mode"]
    doc = ["# kvstore benchmarks", "",
           "What a disk hit is worth, side by side, in one run. Generated by `benchmarks/report.py` from the JSON "
           f"files in `benchmarks/results/` (mode `{mode}`); every figure below comes from that run. Scripts are "
           "in `benchmarks/`: `run_all.py --quick` (a few minutes) or `--full`.", "",
           goals_part(data, before), machine_section(data), "", summary_section(data), gaps_section(data)]
    for name, fn in (("restore", restore_section), ("hotpath", hotpath_section), ("multiturn", multiturn_section),
                     ("agent", agent_section), ("scale", scale_section), ("server", server_section),
                     ("peers", peers_section), ("serve_parts", serve_parts_section),
                     ("fingerprint", fingerprint_section),
                     ("compare", compare_section), ("remote", _remote_section)):
        if name in data:
            doc.append(fn(data[name]))
    rel = Path(plots).resolve().relative_to(Path(md).resolve().parent) if Path(plots).resolve().is_relative_to(
        Path(md).resolve().parent) else Path(plots)
    doc += ["## Plots", ""] + [f"![{p}]({rel / p})" for p in pics] + [""]
    doc += ["## Reproducing", "",
            "```bash",
            ".venv/bin/pip install -e \".[bench]\"",
            ".venv/bin/python benchmarks/run_all.py --quick    # a few minutes",
            ".venv/bin/python benchmarks/run_all.py --full     # about 45 minutes on 2 cores",
            ".venv/bin/python benchmarks/bench_restore.py --full --models llama-135m --sizes 512,2048  # one part",
            "```", "",
            "Random-weight models are built once into `~/.cache/kvstore-bench-models` (`$KVSTORE_BENCH_MODELS`); "
            "stores and scratch files go to a temporary folder (`$KVSTORE_BENCH_TMP`) that is removed at the end.",
            ""]
    Path(md).write_text("\n".join(doc))
    return md


def serve_parts_section(d):
    """Where a cache hit's time goes in kvstore serve (``bench_serve_parts.py``)."""
    import bench_serve_parts

    return bench_serve_parts.section(d)


def _remote_section(d):
    from report_remote import remote_section

    return remote_section(d)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(C.RESULTS))
    p.add_argument("--md", default=str(HERE / "RESULTS.md"))
    p.add_argument("--plots", default=str(C.PLOTS))
    p.add_argument("--before", help="results of the same scripts on an earlier commit (the goals table)")
    a = p.parse_args(argv)
    print(build(a.results, a.md, a.plots, a.before))


if __name__ == "__main__":
    main()
