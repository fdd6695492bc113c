"""Where a cache-hit request's time goes in ``kvstore serve``, and in vllm-mlx: each server's cache
parts and its serving engine's.

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

With ``--peer-venv`` (or ``$KVSTORE_PEER_VENV``, as ``bench_peers.py``) it
then does the same for vllm-mlx (``PEER_PARTS``): its ``serve`` command runs
in a process of the peer venv's python (this file, hidden ``--phase``
options) with timers around its prefix cache's ``fetch`` and prompt
snapshot, its chat template, tokenizing, scheduling, mlx-lm's passes and its
response processing; a fill process, then a process that loads the saved
cache and gets the same questions. The section puts both side by side.
Without a peer venv only kvstore serve is measured (the JSON says why).

Run: ``python benchmarks/bench_serve_parts.py [--peer-venv /work/peer-venv]``
(about a minute per server).
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
# vllm-mlx 0.6.0 with --continuous-batching: BatchedEngine.stream_chat applies the chat template
# (and twice more for the prefix boundary), Scheduler.add_request encodes and looks the prompt up in
# MemoryAwarePrefixCache, Scheduler.step inserts it into mlx-lm's BatchGenerator and runs its
# passes, and _process_batch_responses stores the prompt's cache before handing out the first token.
# Timed by own time (nested timed calls taken out), so labels name what a function adds itself.
PEER_PARTS = {
    "fetch": ("vllm-mlx prefix cache", "vllm_mlx.memory_cache:MemoryAwarePrefixCache", "fetch"),
    "store prompt snapshot": ("vllm-mlx prefix cache", "vllm_mlx.scheduler:Scheduler", "_store_prompt_only_cache"),
    "chat template": ("vllm-mlx engine", "vllm_mlx.engine.batched:BatchedEngine", "_apply_chat_template"),
    "prefix boundary (two tokenizations)": ("vllm-mlx engine", "vllm_mlx.engine.batched:BatchedEngine",
                                            "_compute_prefix_boundary"),
    "tokenize (encode)": ("vllm-mlx engine", "vllm_mlx.scheduler:Scheduler", "add_request"),
    "schedule into the batch": ("vllm-mlx engine", "vllm_mlx.scheduler:Scheduler", "_schedule_waiting"),
    "prefill passes": ("vllm-mlx engine", "mlx_lm.generate:PromptProcessingBatch", "prompt"),
    "first token pass": ("vllm-mlx engine", "mlx_lm.generate:PromptProcessingBatch", "generate"),
    "decode step handing out the first token": ("vllm-mlx engine", "mlx_lm.generate:BatchGenerator", "next"),
    "detokenize, outputs": ("vllm-mlx engine", "vllm_mlx.scheduler:Scheduler", "_process_batch_responses"),
}
# per server: the cache's owner, the serving engine's, its parts, and whether a part counts its
# own time (vllm-mlx) or its whole time with nested parts taken out in the summary (kvstore serve)
SERVERS = {
    "kvstore serve": {"cache": "kvstore", "engine": "mlx_lm.server", "parts": PARTS, "own_time": False},
    "vllm-mlx": {"cache": "vllm-mlx prefix cache", "engine": "vllm-mlx engine", "parts": PEER_PARTS,
                 "own_time": True},
}
REST = "rest (HTTP, queues, threads)"
# rows of the side-by-side table: (stage, cache or engine, kvstore serve's parts, vllm-mlx's parts)
STAGES = [
    ("prefix-cache lookup and copy", "cache", ["fetch"], ["fetch"]),
    ("cache snapshot before the first token", "cache", ["insert_cache"], ["store prompt snapshot"]),
    ("tokenize / chat template", "engine", ["tokenize"],
     ["chat template", "prefix boundary (two tokenizations)", "tokenize (encode)"]),
    ("scheduling into the batch", "engine", [], ["schedule into the batch"]),
    ("prefill of the uncached tokens", "engine", ["prefill passes"], ["prefill passes"]),
    ("first-token pass", "engine", ["first token pass"], ["first token pass"]),
    ("decode step handing out the first token", "engine", ["decode step handing out the first token"],
     ["decode step handing out the first token"]),
    ("detokenize, outputs", "engine", [], ["detokenize, outputs"]),
]
QUESTIONS = ["Which boats came back to the harbor this morning?", "What was the wind like yesterday evening?",
             "Can you list the ships that passed the rocks in the dark?", "Is the tide high tonight?",
             "Was the ferry late?", "Did the fog lift by noon?"]
_stack = threading.local()


def instrument(events, parts=PARTS):
    """Wrap each part's function so that calls append ``(label, start, seconds, own seconds)`` to
    ``events``; own seconds leave out the time of wrapped calls made inside (on the same thread)."""
    for label, (_owner, where, name) in parts.items():
        mod, cls = where.split(":")
        owner = getattr(importlib.import_module(mod), cls)
        f = getattr(owner, name)

        def wrapped(*a, __f=f, __label=label, **k):
            stack = _stack.__dict__.setdefault("inner", [])
            stack.append(0.0)
            t = time.perf_counter()
            try:
                return __f(*a, **k)
            finally:
                d = time.perf_counter() - t
                inner = stack.pop()
                if stack:
                    stack[-1] += d
                events.append((__label, t, d, d - inner))

        setattr(owner, name, functools.wraps(f)(wrapped))


def parts_between(events, start, end, own_time=False):
    """Each label's time inside ``[start, end)``: a call's time (or its own time), cut to the
    part of the call that lies in the window."""
    parts = {}
    for label, t, d, own in events:
        inside = min(t + d, end) - max(t, start)
        if inside > 0:
            parts[label] = parts.get(label, 0.0) + min(own if own_time else d, inside)
    return parts


def calls_between(events, start, end):
    """How many calls of each label overlap ``[start, end)``."""
    calls = {}
    for label, t, d, _own in events:
        if min(t + d, end) > max(t, start):
            calls[label] = calls.get(label, 0) + 1
    return calls


def ask_all(client, system, questions, events, own_time=False):
    """Wait for the server's /health, then ask ``questions`` one by one (``bench_peers.Server.ask``
    on ``client``); each request's parts are the events up to its first content chunk."""
    import urllib.request

    import bench_peers as B

    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{client.port}/health", timeout=2)
            break
        except OSError:
            time.sleep(0.05)
    out = []
    for q in questions:
        events.clear()
        t0 = time.perf_counter()
        got = B.Server.ask(client, system, q, 8)
        seen = list(events)
        out.append({"question": q, "ttft": got["ttft"], "cached": got["cached"], "first": not out,
                    "parts": parts_between(seen, t0, t0 + got["ttft"], own_time),
                    "calls": calls_between(seen, t0, t0 + got["ttft"])})
    return out


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
        out.extend(ask_all(client, system, questions, events))
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=run, daemon=True).start()
    from kvstore_cli import serve

    serve.main(["--store", str(store), "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
                "--log-level", "WARNING", *extra])
    return out


def peer_serve_and_ask(peer, model, system, questions, result_file):
    """Run vllm-mlx's ``serve`` here (the peer venv's python, ``$HOME`` a folder of its own: its prefix
    cache lives under ``~/.cache/vllm-mlx``); ask ``questions`` from a thread and write the
    per-request parts to ``result_file`` before the SIGTERM (uvicorn ends the process with that
    signal once it has stopped). Cached tokens come from its scheduler's ``[cache_fetch]`` log lines."""
    import logging

    import bench_peers as B

    events = []
    instrument(events, PEER_PARTS)
    log_file = Path(result_file).with_suffix(".log")
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))
    sched = logging.getLogger("vllm_mlx.scheduler")
    sched.addHandler(handler)
    sched.setLevel(logging.INFO)
    port = B.free_port()
    client = types.SimpleNamespace(kind="vllm-mlx", port=port, model=str(model), log=log_file)

    def run():
        try:
            Path(result_file).write_text(json.dumps(ask_all(client, system, questions, events, own_time=True)))
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=run, daemon=True).start()
    from vllm_mlx import cli

    sys.argv = ["vllm-mlx", *B.vllm_command(peer, model, port)[1:]]
    cli.main()


def summarize(requests, server="kvstore serve"):
    """Medians per part for the first request of each process (those marked ``first``; else the
    first of the list) and for the later ones, with owners and the rest."""
    spec = SERVERS[server]
    cache_parts = {k for k, (owner, _, _) in spec["parts"].items() if owner == spec["cache"]}

    def row(reqs):
        labels = sorted({k for r in reqs for k in r["parts"]})
        parts = {k: C.median([r["parts"].get(k, 0.0) for r in reqs]) for k in labels}
        if not spec["own_time"]:
            # batch steps contain the prefill and first-token passes: keep what they add themselves
            steps = parts.pop("batch steps", 0.0) - parts.get("prefill passes", 0.0) - \
                parts.get("first token pass", 0.0)
            parts["decode step handing out the first token"] = max(0.0, steps)
        ttft = C.median([r["ttft"] for r in reqs])
        owners = {spec["cache"]: sum(v for k, v in parts.items() if k in cache_parts),
                  spec["engine"]: sum(v for k, v in parts.items() if k not in cache_parts)}
        owners[REST] = max(0.0, ttft - sum(owners.values()))
        cached = [r["cached"] for r in reqs if r["cached"] is not None]
        return {"n": len(reqs), "ttft": ttft, "cached": C.median(cached) if cached else None, "parts": parts,
                "owners": owners}

    firsts = {i for i, r in enumerate(requests) if r.get("first")} or {0}
    return {"first after restart": row([r for i, r in enumerate(requests) if i in firsts]),
            "memory hits": row([r for i, r in enumerate(requests) if i not in firsts])}


HEADING = "## Where a cache hit's time goes in kvstore serve"


def _ms(v):
    return "-" if v is None else f"{v * 1000:.1f} ms"


def _own_table(summary):
    """kvstore serve's parts, one column per request group (the table without a peer)."""
    rows, names = [], []
    for row in summary.values():
        for k in [*row["owners"], *row["parts"]]:
            if k not in names:
                names.append(k)
    head = "| | " + " | ".join(f"{k} (n={v['n']})" for k, v in summary.items()) + " |"
    lines = [head, "| --- |" + " --- |" * len(summary)]
    lines.append("| time to first token | " + " | ".join(_ms(v["ttft"]) for v in summary.values()) + " |")
    for k in names:
        owner = "" if k in ("kvstore", "mlx_lm.server") or k.startswith("rest") else \
            (" (kvstore)" if k in ("fetch", "insert_cache") else " (mlx_lm.server)")
        bold = "**" if k in ("kvstore", "mlx_lm.server") or k.startswith("rest") else ""
        cells = [_ms(row["owners"].get(k, row["parts"].get(k, 0.0))) for row in summary.values()]
        lines.append(f"| {bold}{k}{bold}{owner} | " + " | ".join(cells) + " |")
    return lines


def side_by_side(summaries):
    """Both servers' parts by stage (``STAGES``), memory hits first: ``summaries`` is
    ``{"kvstore serve": summary, "vllm-mlx": summary}``; a stage a server has no timed part for is
    "-" (its time is in the rest)."""
    servers = list(SERVERS)
    cols = [(g, s) for g in ("memory hits", "first after restart") for s in servers]
    lines = ["| | " + " | ".join(f"{s}, {g} (n={summaries[s][g]['n']})" for g, s in cols) + " |",
             "| --- |" + " --- |" * len(cols),
             "| time to first token | " + " | ".join(_ms(summaries[s][g]["ttft"]) for g, s in cols) + " |",
             "| cached tokens | " + " | ".join("-" if summaries[s][g]["cached"] is None else
                                              f"{summaries[s][g]['cached']:.0f}" for g, s in cols) + " |"]
    covered = {s: set() for s in servers}
    for who in ("cache", "engine"):
        names = " / ".join(SERVERS[s][who] for s in servers)
        lines.append(f"| **{who}: {names}** | " + " | ".join(
            _ms(summaries[s][g]["owners"][SERVERS[s][who]]) for g, s in cols) + " |")
        for stage, owner, *labels in STAGES:
            if owner != who:
                continue
            mine = dict(zip(servers, labels))
            cells = []
            for g, s in cols:
                covered[s].update(mine[s])
                cells.append(_ms(sum(summaries[s][g]["parts"].get(k, 0.0) for k in mine[s])) if mine[s] else "-")
            lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    for g, s in cols:  # parts no stage names (kept visible rather than lost)
        for k in summaries[s][g]["parts"]:
            if k not in covered[s]:
                covered[s].add(k)
                lines.append(f"| {k} ({s}) | " + " | ".join(
                    _ms(summaries[s2][g2]["parts"].get(k)) if s2 == s else "-" for g2, s2 in cols) + " |")
    lines.append(f"| **{REST}** | " + " | ".join(_ms(summaries[s][g]["owners"][REST]) for g, s in cols) + " |")
    return lines


def _functions(server, owner):
    parts = SERVERS[server]["parts"]
    return ", ".join(f"`{where.split(':')[1]}.{name}`" for o, where, name in parts.values() if o == owner)


def section(result):
    """The RESULTS.md section of a results file (both servers side by side when it holds vllm-mlx)."""
    intro = (f"Script: `{result['command']}`; {result['started']}; load average {result['load_before'][0]:.1f} "
             f"before, {result['load_after'][0]:.1f} after. kvstore serve (`{result['serve_args']}`) in the "
             "script's own process with timers around the functions a request passes through, on a store filled "
             "by an earlier process; the model, prompt and questions of the section above; medians. Parts are "
             "summed up to the first content chunk; a part's own time includes what MLX evaluates inside it.")
    peer = result.get("peer")
    if not peer:
        skipped = [f"vllm-mlx was not measured: {result['peer_skipped']}.", ""] if result.get("peer_skipped") else []
        return "\n".join([HEADING, "", intro, "", *_own_table(result["summary"]), "", *skipped])
    kv, vm = SERVERS["kvstore serve"], SERVERS["vllm-mlx"]
    text = (f"vllm-mlx {peer['versions'][0]} (mlx-lm {peer['versions'][1]}, `--continuous-batching`) the same way, "
            "in a process of the peer venv's python: a fill process (a cold request, a graceful stop, which saves "
            "its prefix cache), then a process that loads it and gets the same questions; "
            f"{result.get('rounds', 1)} round(s) of both servers, their order rotating. The cache's parts are "
            f"kvstore's {_functions('kvstore serve', kv['cache'])} and vllm-mlx's prefix cache "
            f"{_functions('vllm-mlx', vm['cache'])} (a copy of the prompt's KV taken before the first token is "
            f"handed out); the serving engine's are mlx_lm.server's {_functions('kvstore serve', kv['engine'])} "
            f"and vllm-mlx's {_functions('vllm-mlx', vm['engine'])} (both run mlx-lm's `BatchGenerator`). "
            "vllm-mlx's parts are their own time (timed calls inside them taken out); kvstore serve's decode step "
            "is `BatchGenerator.next` less the passes inside it. A \"-\" is a stage with no timed function of "
            "its own on that server: its time is in the rest.")
    rows = side_by_side({"kvstore serve": result["summary"], "vllm-mlx": peer["summary"]})
    return "\n".join([HEADING, "", intro, "", text, "", *rows, ""])


def run_phases(cmd, scratch, name, env=None):
    """The fill and measure phases of one server, each its own process running ``cmd`` plus
    ``--phase`` and ``--result``; returns ``{phase: requests}``."""
    runs = {}
    for phase in ("fill", "measure"):
        path = Path(scratch) / f"{name}-{phase}.json"
        proc = subprocess.run([*cmd, "--phase", phase, "--result", str(path)], capture_output=True, text=True,
                              timeout=1800, env=env)
        if proc.returncode not in (0, -signal.SIGTERM) or not path.exists():
            raise SystemExit(proc.stderr[-3000:])
        runs[phase] = json.loads(path.read_text())
    return runs


def measure(server, place, args, peer=None):
    """One round of ``server``: its fill and measure processes on a fresh ``place`` (kvstore's
    store; vllm-mlx's home, holding its saved prefix cache); returns the measured requests."""
    place.mkdir()
    if server == "kvstore serve":
        cmd, env = [C.PY, __file__, "--store", str(place / "store"), f"--serve-args={args.serve_args}"], None
    else:
        env = dict(os.environ, HOME=str(place), HF_HUB_OFFLINE="1")
        cmd = [str(peer / "bin" / "python"), __file__, "--server", "vllm-mlx", f"--peer-venv={peer}",
               f"--model={args.model}", f"--system-file={args.system_file}"]
    return run_phases(cmd, place, server.split()[0], env)["measure"]


def run_phase(args):
    """One phase inside a server's process: its requests' parts into ``--result``."""
    qs = QUESTIONS[:1] if args.phase == "fill" else QUESTIONS[1:]
    if args.server == "vllm-mlx":
        peer_serve_and_ask(args.peer_venv, args.model, Path(args.system_file).read_text(), qs, args.result)
    else:
        Path(args.result).write_text(json.dumps(serve_and_ask(args.store, qs, args.serve_args.split())))
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(C.RESULTS))
    p.add_argument("--serve-args", default="--preload --warmup",
                   help="kvstore serve options of both processes (default: --preload --warmup)")
    p.add_argument("--peer-venv", help="virtual environment holding vllm-mlx, measured the same way "
                                       "(default: $KVSTORE_PEER_VENV; without one only kvstore serve is measured)")
    p.add_argument("--rounds", type=int, default=1,
                   help="rounds of fill + measure processes per server, servers interleaved (default: 1)")
    for hidden in ("--phase", "--server", "--store", "--model", "--system-file", "--result"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.phase:
        return run_phase(args)
    import bench_peers

    peer, why = bench_peers.peer_venv(args.peer_venv)
    servers = ["kvstore serve"] + (["vllm-mlx"] if peer else [])
    result = C.header("serve_parts", "full", argv)
    result["serve_args"], result["rounds"] = args.serve_args, args.rounds
    got = {s: [] for s in servers}
    with C.scratch() as scratch:
        if peer:
            from transformers import AutoTokenizer

            from kvstore import tiny

            args.model = tiny.model_dir(bench_peers.MODEL[0], **bench_peers.MODEL[1])
            args.system_file = scratch / "system.txt"
            args.system_file.write_text(bench_peers.system_prompt(AutoTokenizer.from_pretrained(str(args.model)),
                                                                  2000))
        for r in range(args.rounds):
            for server in C.rotated(servers, r):
                got[server] += measure(server, scratch / f"{server.split()[0]}-{r}", args, peer)
    result["requests"] = got["kvstore serve"]
    result["summary"] = summarize(got["kvstore serve"])
    if peer is None:
        log(f"serve_parts: vllm-mlx skipped: {why}")
        result["peer_skipped"] = why
    else:
        result["peer"] = {"versions": bench_peers.peer_versions(peer), "requests": got["vllm-mlx"],
                          "summary": summarize(got["vllm-mlx"], "vllm-mlx")}
    path = C.finish(result, out=args.out)
    if Path(args.out).resolve() == C.RESULTS.resolve():
        bench_peers.write_section(C.HERE / "RESULTS.md", section(result), HEADING)
    for server, summary in (("kvstore serve", result["summary"]), ("vllm-mlx", result.get("peer", {}).get("summary"))):
        for name, row in (summary or {}).items():
            log(f"{server}, {name}: TTFT {row['ttft'] * 1000:.1f} ms; " +
                ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in {**row["owners"], **row["parts"]}.items()))
    log(f"serve_parts: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
