"""Where a cache-hit request's time goes in ``kvstore serve``: kvstore's parts and mlx_lm.server's.

Runs ``kvstore serve`` in this process (``kvstore_cli.serve.main``) with
timers around the functions a request passes through, and a client thread
that sends streamed chat requests (the model, system prompt and questions of
``bench_peers.py``). A first process fills a store (a cold request, then a
clean stop); a second starts on it with ``--preload --warmup`` and sends the
questions: the first request after the restart, then memory hits
(``--serve-args`` changes the options). Each part
is summed over a request, up to its first content chunk:

- kvstore: ``TieredPromptCache.fetch`` (memory plan, copy, disk lookup) and
  ``insert_cache`` (the segment snapshots the server inserts before the first
  token);
- mlx_lm.server: ``_tokenize`` (chat template, segments), the prefill passes
  (``PromptProcessingBatch.prompt``, one per segment piece), the first
  token's pass (``generate``) and the decode step that hands it out;
- the rest: HTTP, queues, threads, detokenizing.

Run: ``python benchmarks/bench_serve_parts.py`` (about a minute).
"""

import argparse
import functools
import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402
from common import log  # noqa: E402

PARTS = {  # label: (owner, module or class path, function)
    "fetch": ("kvstore", "kvstore.tiered:TieredPromptCache", "fetch"),
    "insert_cache": ("kvstore", "kvstore.tiered:TieredPromptCache", "insert_cache"),
    "tokenize": ("mlx_lm.server", "mlx_lm.server:ResponseGenerator", "_tokenize"),
    "prefill passes": ("mlx_lm.server", "mlx_lm.generate:PromptProcessingBatch", "prompt"),
    "first token pass": ("mlx_lm.server", "mlx_lm.generate:PromptProcessingBatch", "generate"),
    "batch steps": ("mlx_lm.server", "mlx_lm.generate:BatchGenerator", "next"),
}
QUESTIONS = ["Which boats came back to the harbor this morning?", "What was the wind like yesterday evening?",
             "Can you list the ships that passed the rocks in the dark?", "Is the tide high tonight?",
             "Was the ferry late?", "Did the fog lift by noon?"]


def instrument(events):
    """Wrap each part's function so that calls append ``(label, start, seconds)`` to ``events``."""
    for label, (_owner, where, name) in PARTS.items():
        mod, cls = where.split(":")
        owner = getattr(importlib.import_module(mod), cls)
        f = getattr(owner, name)

        def wrapped(*a, __f=f, __label=label, **k):
            t = time.perf_counter()
            try:
                return __f(*a, **k)
            finally:
                events.append((__label, t, time.perf_counter() - t))

        setattr(owner, name, functools.wraps(f)(wrapped))


def serve_and_ask(store, questions, extra):
    """Run kvstore serve here; ask ``questions`` from a thread; return per-request parts."""
    import bench_peers as B
    from transformers import AutoTokenizer

    from kvstore import tiny

    events, out = [], []
    instrument(events)
    model = tiny.model_dir(B.MODEL[0], **B.MODEL[1])
    system = B.system_prompt(AutoTokenizer.from_pretrained(str(model)), 2000)
    port = B.free_port()

    client = types.SimpleNamespace(kind="kvstore serve", port=port, model=str(model))  # what Server.ask reads

    def run():
        import urllib.request

        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.05)
        for q in questions:
            events.clear()
            t0 = time.perf_counter()
            got = B.Server.ask(client, system, q, 8)
            end = t0 + got["ttft"]
            parts = {}
            for label, t, d in list(events):
                if t < end:
                    parts[label] = parts.get(label, 0.0) + min(d, end - t)
            out.append({"question": q, "ttft": got["ttft"], "cached": got["cached"], "parts": parts})
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=run, daemon=True).start()
    from kvstore_cli import serve

    serve.main(["--store", str(store), "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
                "--log-level", "WARNING", *extra])
    return out


def summarize(requests):
    """Medians per part for the first request and for the later ones, with owners and the rest."""
    def row(reqs):
        labels = sorted({k for r in reqs for k in r["parts"]})
        parts = {k: C.median([r["parts"].get(k, 0.0) for r in reqs]) for k in labels}
        # batch steps contain the prefill and first-token passes: keep what they add themselves
        steps = parts.pop("batch steps", 0.0) - parts.get("prefill passes", 0.0) - parts.get("first token pass", 0.0)
        parts["decode step handing out the first token"] = max(0.0, steps)
        ttft = C.median([r["ttft"] for r in reqs])
        owners = {"kvstore": sum(v for k, v in parts.items() if k in ("fetch", "insert_cache")),
                  "mlx_lm.server": sum(v for k, v in parts.items() if k not in ("fetch", "insert_cache"))}
        owners["rest (HTTP, queues, threads)"] = max(0.0, ttft - sum(owners.values()))
        return {"n": len(reqs), "ttft": ttft, "cached": C.median([r["cached"] for r in reqs]), "parts": parts,
                "owners": owners}

    return {"first after restart": row(requests[:1]), "memory hits": row(requests[1:])}


HEADING = "## Where a cache hit's time goes in kvstore serve"


def section(result):
    """The RESULTS.md section of a results file."""
    rows, names = [], []
    for row in result["summary"].values():
        for k in [*row["owners"], *row["parts"]]:
            if k not in names:
                names.append(k)
    head = "| | " + " | ".join(f"{k} (n={v['n']})" for k, v in result["summary"].items()) + " |"
    lines = [head, "| --- |" + " --- |" * len(result["summary"])]
    lines.append("| time to first token | " + " | ".join(f"{v['ttft'] * 1000:.1f} ms"
                                                     for v in result["summary"].values()) + " |")
    for k in names:
        owner = "" if k in ("kvstore", "mlx_lm.server") or k.startswith("rest") else \
            (" (kvstore)" if k in ("fetch", "insert_cache") else " (mlx_lm.server)")
        bold = "**" if k in ("kvstore", "mlx_lm.server") or k.startswith("rest") else ""
        cells = [f"{row['owners'].get(k, row['parts'].get(k, 0.0)) * 1000:.1f} ms" for row in result["summary"].values()]
        lines.append(f"| {bold}{k}{bold}{owner} | " + " | ".join(cells) + " |")
    out = [HEADING, "",
           f"Script: `{result['command']}`; {result['started']}; load average {result['load_before'][0]:.1f} "
           f"before, {result['load_after'][0]:.1f} after. kvstore serve (`{result['serve_args']}`) in the "
           "script's own process with timers around the functions a request passes through, on a store filled "
           "by an earlier process; the model, prompt and questions of the section above; medians. Parts are "
           "summed up to the first content chunk; a part's own time includes what MLX evaluates inside it.", "",
           *lines, ""]
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(C.RESULTS))
    p.add_argument("--serve-args", default="--preload --warmup",
                   help="kvstore serve options of both processes (default: --preload --warmup)")
    p.add_argument("--phase", choices=("fill", "measure"), help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.phase:
        qs = QUESTIONS[:1] if args.phase == "fill" else QUESTIONS[1:]
        print(json.dumps(serve_and_ask(args.store, qs, args.serve_args.split())))
        return 0
    result = C.header("serve_parts", "full", argv)
    with C.scratch() as scratch:
        runs = {}
        for phase in ("fill", "measure"):
            proc = subprocess.run([C.PY, __file__, "--phase", phase, "--store", str(scratch / "store"),
                                   f"--serve-args={args.serve_args}"],
                                  capture_output=True, text=True, timeout=1800)
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-3000:])
            runs[phase] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["serve_args"] = args.serve_args
    result["requests"] = runs["measure"]
    result["summary"] = summarize(runs["measure"])
    path = C.finish(result, out=args.out)
    if Path(args.out).resolve() == C.RESULTS.resolve():
        import bench_peers

        bench_peers.write_section(C.HERE / "RESULTS.md", section(result), HEADING)
    for name, row in result["summary"].items():
        log(f"{name}: TTFT {row['ttft'] * 1000:.1f} ms; " +
            ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in {**row["owners"], **row["parts"]}.items()))
    log(f"serve_parts: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
