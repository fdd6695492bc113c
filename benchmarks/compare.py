"""Compare ``run_all.py --quick`` results of several commits, run interleaved.

Each commit is checked out in a worktree with its own venv and runs its own
scripts, in the order A B C C B A (so a machine that gets busier or quieter
over the run weighs on every commit alike), each run into its own folder:

    git worktree add ../bench-A A && (cd ../bench-A && python3 -m venv .venv && .venv/bin/pip install -e ".[bench]")
    (cd ../bench-A && .venv/bin/python benchmarks/run_all.py --quick --out RUNS/A-1 --md RUNS/A-1/RESULTS.md \\
        --plots RUNS/A-1/plots)     # ... B-1, C-1, C-2, B-2, A-2

Then ``python benchmarks/compare.py RUNS A B C`` writes ``benchmarks/results/compare.json``
(the median of each commit's runs per figure, and each commit's ratio to the first),
which ``report.py`` renders.
"""

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402


def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def figures(d):
    """``{figure: seconds (or MB/s)}`` of one run_all --quick folder."""
    out = {}
    r = json.loads((d / "restore.json").read_text())
    for m in r["models"]:
        for c in m["cases"]:
            for k in ("kv_store", "kv_disk", "kv_mem", "kv_fresh_warm", "mlx_fresh_warm"):
                out[f"restore {c['tokens']} {k} fetch"] = _med([x.get("fetch") for x in c["runs"][k]])
            out[f"restore {c['tokens']} kv_disk first write"] = _med([x.get("first_write") for x in c["runs"]["kv_disk"]])
    h = json.loads((d / "hotpath.json").read_text())
    for i in h["insert"]:
        for k in ("tiered_disk", "lru"):
            out[f"insert {i['tokens']} {k}"] = i["calls"][k]["median"]
    for f in h["fetch"]:
        for kind in f.get("kinds", {}):
            for k in ("tiered_disk", "lru"):
                out[f"fetch {f['tokens']} {kind} {k}"] = f["kinds"][kind]["calls"][k]["median"]
    for w in h["write"]:
        for k in ("put", "raw"):
            out[f"write {w['tokens']} {k} MB/s"] = w["mb_per_s"][k]
    s = json.loads((d / "scale.json").read_text())
    for ms in s["milestones"]:
        for kind, v in ms["requests"].items():
            out[f"lookup {ms['snapshots']} snapshots {kind} p50"] = v["lookup"]["median"]
    for k in ("ls", "prune --tier assistant -y", "gc", "stats"):
        out[f"kvstore {k} ({s['config']['snapshots']} snapshots)"] = s["commands"][k]
    sv = json.loads((d / "server.json").read_text())
    for kind in ("cold", "warm", "after_restart"):
        for server in ("kvstore serve", "mlx_lm.server"):
            out[f"server {kind} TTFT {server}"] = _med([r[server][kind]["ttft"] for r in sv["rounds"]])
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    base, commits = Path(argv[0]), argv[1:]
    runs = {c: [figures(p) for p in sorted(base.glob(f"{c}-*")) if (p / "server.json").exists()] for c in commits}
    names = list(runs[commits[0]][0])
    table = {n: {c: _med([r.get(n) for r in runs[c]]) for c in commits} for n in names}
    result = {"bench": "compare", "commits": commits, "runs_per_commit": {c: len(runs[c]) for c in commits},
              "order": "interleaved A B C C B A", "figures": table,
              "machine": C.machine(), "started": "", "command": "python benchmarks/compare.py RUNS " + " ".join(commits)}
    out = C.RESULTS / "compare.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(out)


if __name__ == "__main__":
    main()
