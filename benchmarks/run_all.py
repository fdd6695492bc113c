"""Run every benchmark script, then write RESULTS.md and the plots.

Each script runs in its own process (one after the other, so they never
compete for the cores), writes ``benchmarks/results/<name>.json``, and
``report.py`` turns those into ``benchmarks/RESULTS.md`` and
``benchmarks/plots/*.png``.

Run: ``python benchmarks/run_all.py --quick`` (a few minutes on 2 cores) or
``--full`` (about 45 minutes).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402
import report  # noqa: E402

SCRIPTS = ("restore", "hotpath", "multiturn", "agent", "scale", "server", "remote")


def main(argv=None):
    p = C.mode_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--only", help=f"comma-separated subset of {','.join(SCRIPTS)}")
    p.add_argument("--md", default=str(C.HERE / "RESULTS.md"), help="report file (default: benchmarks/RESULTS.md)")
    p.add_argument("--plots", default=str(C.PLOTS), help="plot folder (default: benchmarks/plots)")
    args = p.parse_args(argv)
    only = args.only.split(",") if args.only else SCRIPTS
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = C.header("run_all", args.mode, argv)
    run["scripts"] = {}
    t0 = time.perf_counter()
    for name in SCRIPTS:
        if name not in only:
            continue
        cmd = [C.PY, str(C.HERE / f"bench_{name}.py"), f"--{args.mode}", "--out", str(out)]
        C.log(f"run_all: {' '.join(cmd[1:])}")
        t = time.perf_counter()
        proc = subprocess.run(cmd)
        run["scripts"][name] = {"wall_s": time.perf_counter() - t, "returncode": proc.returncode,
                                "load_after": C.loadavg()}
        if proc.returncode != 0:
            C.log(f"run_all: {name} failed with status {proc.returncode}")
    run["wall_s"] = time.perf_counter() - t0
    C.finish(run, out=out)
    (out / "run_all.json").write_text(json.dumps(run, indent=1) + "\n")
    md = report.build(out, args.md, args.plots)
    C.log(f"run_all: wrote {md} ({run['wall_s'] / 60:.1f} minutes)")
    return 1 if any(s["returncode"] for s in run["scripts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
