"""Server: time to first token through ``kvstore serve`` against ``mlx_lm.server``.

Both servers run the same model on 127.0.0.1 and get the same requests:
a system prompt with three different user questions. Each round, for each
server (the order rotates): start it (time until /health answers), send
question 1 (cold: nothing cached), question 2 (the system prompt is in
memory), stop it (SIGTERM), start it again and send question 3 (after a
restart: mlx_lm.server has lost its cache, kvstore serve reads the
system prompt's snapshot from disk). Time to first token is the wall time
of a ``max_tokens=1`` chat request (prefill plus one token, as the client
sees it); ``cached_tokens`` comes from the response's usage.

Run: ``python benchmarks/bench_server.py --quick`` (or ``--full``).
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402
from common import log, now  # noqa: E402

MODES = {
    "quick": {"model": "llama-small", "system_words": 300, "rounds": 1},
    "full": {"model": "llama-135m", "system_words": 180, "rounds": 2},
}
KVSTORE = shutil.which("kvstore", path=os.path.dirname(sys.executable)) or "kvstore"
SERVERS = {"mlx_lm.server": "mlx_lm.server (in-memory LRUPromptCache)", "kvstore serve": "kvstore serve (disk tier)"}
QUESTIONS = ["Which boats came back to the harbor this morning?", "What was the wind like yesterday evening?",
             "Can you list the ships that passed the rocks in the dark?"]


def system_prompt(n_words):
    import random

    rng = random.Random(4)
    vocab = ("the old lighthouse keeper climbed narrow stairs to light the lamp for ships that passed the rocks "
             "in the dark and wrote the weather in a small book with the names of boats wind waves sky").split()
    lines = []
    while sum(len(x.split()) for x in lines) < n_words:
        lines.append(" ".join(rng.choice(vocab) for _ in range(12)).capitalize() + ".")
    return "You are the harbor office assistant. " + " ".join(lines)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One server process on a free loopback port."""

    def __init__(self, kind, model, store, log_dir):
        self.port = free_port()
        common = ["--model", str(model), "--host", "127.0.0.1", "--port", str(self.port)]
        if kind == "kvstore serve":
            args = [KVSTORE, "serve", "--store", str(store), *common]
        else:
            args = [C.PY, "-m", "mlx_lm.server", *common]
        self.log = Path(log_dir) / f"server-{self.port}.log"
        t = now()
        self.proc = subprocess.Popen(args, stdout=open(self.log, "w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{kind} exited: {self.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"{kind} did not start: {self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if json.load(r).get("status") == "ok":
                        break
            except OSError:
                time.sleep(0.1)
        self.startup = now() - t

    def ask(self, system, question):
        body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
                "max_tokens": 1, "temperature": 0}
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/chat/completions",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        t = now()
        with urllib.request.urlopen(req, timeout=3600) as r:
            resp = json.load(r)
        took = now() - t
        usage = resp["usage"]
        return {"ttft": took, "prompt_tokens": usage["prompt_tokens"],
                "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)}

    def stop(self):
        t = now()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return now() - t


def one_round(kind, model, store, system, scratch):
    out = {}
    s = Server(kind, model, store, scratch)
    out["startup_s"] = s.startup
    out["cold"] = s.ask(system, QUESTIONS[0])
    out["warm"] = s.ask(system, QUESTIONS[1])
    out["stop_s"] = s.stop()
    s = Server(kind, model, store, scratch)
    out["restart_startup_s"] = s.startup
    out["after_restart"] = s.ask(system, QUESTIONS[2])
    s.stop()
    text = s.log.read_text()
    out["traceback"] = "Traceback" in text
    return out


def main(argv=None):
    p = C.mode_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--rounds", type=int, help="rounds of both servers, interleaved (default: 2 with --full, "
                                              "1 with --quick); more rounds steady the medians on a noisy machine")
    args = p.parse_args(argv)
    cfg = dict(MODES[args.mode])
    if args.rounds:
        cfg["rounds"] = max(1, args.rounds)
    result = C.header("server", args.mode, argv)
    result["config"] = cfg
    result["servers"] = SERVERS
    model = C.model_dir(cfg["model"])
    result["model"] = {"name": cfg["model"], **C.model_info(model)}
    system = system_prompt(cfg["system_words"])
    result["rounds"] = []
    with C.scratch() as scratch:
        for r in range(cfg["rounds"]):
            row = {}
            for kind in C.rotated(SERVERS, r):
                store = scratch / f"store-{r}"
                row[kind] = one_round(kind, model, store, system, scratch)
                shutil.rmtree(store, ignore_errors=True)
                x = row[kind]
                log(f"server round {r + 1} {kind}: start {x['startup_s']:.1f}s, cold {x['cold']['ttft']:.2f}s "
                    f"({x['cold']['cached_tokens']}/{x['cold']['prompt_tokens']} cached), warm {x['warm']['ttft']:.2f}s "
                    f"({x['warm']['cached_tokens']}), after restart {x['after_restart']['ttft']:.2f}s "
                    f"({x['after_restart']['cached_tokens']})")
            result["rounds"].append(row)
    path = C.finish(result, out=args.out)
    log(f"server: wrote {path}")


if __name__ == "__main__":
    main()
