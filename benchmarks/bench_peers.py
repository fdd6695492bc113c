"""Peers: ``kvstore serve`` against vllm-mlx, the MLX server that keeps its prefix cache on disk.

Both servers run the same model folder (a random-weight llama of hidden 256
and 4 layers, built with ``kvstore.tiny``) on 127.0.0.1 and get the same
streamed chat requests: a long system prompt (about 2,000 tokens) and a
short question, 32 tokens, greedy. Time to first token is measured to the
first chunk that carries content. Each round runs every scenario on each
server, the servers' order rotating between rounds:

- restart: start (until /health answers), a cold request, a request whose
  system prompt is in memory, SIGTERM (stop time), start again, a request
  after the restart; disk used after those 3 requests.
- warm: the system prompt warmed before the first request (``kvstore warm``
  then ``kvstore serve --preload``; vllm-mlx's ``--warm-prompts``), then the
  first request.
- kill: a cold request, a second request killed with SIGKILL at its first
  content chunk, a restart, and a request: what survived (cached tokens)
  and its time.

Questions rotate over the rounds so that every question is once asked cold
on each server; every answer to a question must equal that server's cold
answer (a cache hit changes nothing). kvstore serve reports cached tokens in
``usage``; vllm-mlx in its log (``[cache_fetch] ... cached=N``).

vllm-mlx runs from its own virtual environment (it pins another mlx-lm and
pulls torch), given by ``--peer-venv`` or ``$KVSTORE_PEER_VENV``; without
it the script says so and exits. Never run in CI. Install recipe:

    python3 -m venv /work/peer-venv
    /work/peer-venv/bin/pip install torch==2.13.0   # a CPU build on disk here, if there is one
    /work/peer-venv/bin/pip install vllm-mlx==0.6.0 "mlx[cpu]"

Run: ``python benchmarks/bench_peers.py --peer-venv /work/peer-venv`` (3
rounds, about 10 minutes on 2 cores) or ``--quick`` (1 round).
"""

import argparse
import json
import os
import random
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

MODEL = ("llama", {"hidden_size": 256, "intermediate_size": 768, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "head_dim": 64, "num_hidden_layers": 4})
MODES = {"quick": {"system_tokens": 2000, "rounds": 1, "max_tokens": 32},
         "full": {"system_tokens": 2000, "rounds": 3, "max_tokens": 32}}
KVSTORE = shutil.which("kvstore", path=os.path.dirname(sys.executable)) or "kvstore"
SERVERS = ("kvstore serve", "vllm-mlx")
# kvstore serve options under test (besides --preload)
EXTRA = ["--warmup"]
QUESTIONS = ["Which boats came back to the harbor this morning?", "What was the wind like yesterday evening?",
             "Can you list the ships that passed the rocks in the dark?"]
# delta fields that carry generated text (mlx_lm.server streams a thinking model's text as reasoning)
TEXT_KEYS = ("content", "reasoning", "reasoning_content")
# rows of the table: (label, key in a server's summary, kind)
ROWS = [("cold", "cold", "s"), ("prefix in memory", "memory", "s"), ("after SIGTERM + restart", "restart", "s"),
        ("first request after warming", "warm", "s"), ("start-up until ready", "startup", "s"),
        ("stop time (SIGTERM)", "stop", "s"), ("disk after 3 requests", "disk", "bytes"),
        ("SIGKILL during a request, then restart", "kill", "kill")]


# ------------------------------------------------------------------ parsing
def parse_stream(lines, t0, clock=time.perf_counter):
    """Read an OpenAI server-sent event stream (an iterable of byte lines).

    Returns ``{"ttft", "text", "usage", "chunks"}``: ``ttft`` is the time
    (by ``clock``, from ``t0``) of the first chunk whose delta carries text
    (``content``, or ``reasoning`` where a server parses the model's output
    as thinking), ``text`` all of it joined, ``usage`` the last usage seen.
    """
    out = {"ttft": None, "text": "", "usage": None, "chunks": 0}
    for raw in lines:
        line = raw.decode("utf-8", "replace").strip() if isinstance(raw, bytes) else raw.strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        out["chunks"] += 1
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            piece = "".join(delta.get(k) or "" for k in TEXT_KEYS)
            if piece:
                if out["ttft"] is None:
                    out["ttft"] = clock() - t0
                out["text"] += piece
        if chunk.get("usage"):
            out["usage"] = chunk["usage"]
    return out


def usage_cached(usage):
    """``cached_tokens`` of an OpenAI usage dict (``None`` if it does not say)."""
    details = (usage or {}).get("prompt_tokens_details") or {}
    return details.get("cached_tokens")


def vllm_cached(log_text):
    """Cached tokens of the last request in a vllm-mlx log: its last ``[cache_fetch]`` line
    (``HIT ... cached=N``, or ``MISS``: 0); ``None`` if there is none."""
    for line in reversed(log_text.splitlines()):
        if "[cache_fetch]" not in line:
            continue
        if " MISS " in line:
            return 0
        for part in line.split():
            if part.startswith("cached="):
                return int(part[len("cached="):])
    return None


def summarize(rounds):
    """Medians per server over the rounds: ``{server: {row key: value}}`` plus cached tokens
    and the answer check (every cached answer equal to the same question's cold answer)."""
    out = {}
    for server in SERVERS:
        runs = [r[server] for r in rounds if server in r]
        if not runs:
            continue

        def med(f):
            return C.median([f(x) for x in runs])

        s = {
            "cold": med(lambda x: x["restart"]["cold"]["ttft"]),
            "memory": med(lambda x: x["restart"]["memory"]["ttft"]),
            "restart": med(lambda x: x["restart"]["after_restart"]["ttft"]),
            "warm": med(lambda x: x["warm"]["first"]["ttft"]),
            "startup": med(lambda x: x["restart"]["startup_s"]),
            "stop": med(lambda x: x["restart"]["stop_s"]),
            "disk": med(lambda x: x["restart"]["disk_bytes"]),
            "kill": med(lambda x: x["kill"]["after"]["ttft"]),
            "kill_cached": med(lambda x: x["kill"]["after"]["cached"]),
        }
        for name, get in (("memory", lambda x: x["restart"]["memory"]), ("restart", lambda x: x["restart"]["after_restart"]),
                          ("warm", lambda x: x["warm"]["first"])):
            s[f"{name}_cached"] = med(lambda x: get(x)["cached"])
        s["answers"] = answers_check(runs)
        out[server] = s
    return out


def answers_check(runs):
    """``{"compared", "equal", "mismatches"}``: each answer given from a cache against the same
    question's cold answer on the same server (where that question was asked cold)."""
    cold, cached = {}, []
    for x in runs:
        for got in (x["restart"]["cold"], x["kill"].get("first")):
            if got is not None:
                cold.setdefault(got["question"], got["text"])
        for got in (x["restart"]["memory"], x["restart"]["after_restart"], x["warm"]["first"], x["kill"]["after"]):
            cached.append((got["question"], got["text"]))
    compared = [(q, t) for q, t in cached if q in cold]
    bad = [q for q, t in compared if t != cold[q]]
    return {"compared": len(compared), "equal": len(compared) - len(bad), "mismatches": bad}


def fmt_value(value, kind):
    if value is None:
        return "-"
    if kind == "bytes":
        return f"{value / 1e6:.1f} MB"
    return f"{value:.2f} s" if value >= 1 else f"{value * 1000:.0f} ms"


def table(summary):
    """The comparison as markdown rows (one column per server present)."""
    servers = [s for s in SERVERS if s in summary]
    lines = ["| | " + " | ".join(servers) + " |", "| --- |" + " --- |" * len(servers)]
    for label, key, kind in ROWS:
        cells = []
        for s in servers:
            v = summary[s]
            if kind == "kill":
                cached = v.get("kill_cached")
                cells.append(f"{fmt_value(v['kill'], 's')} ({'-' if cached is None else int(cached)} cached)")
            else:
                cells.append(fmt_value(v.get(key), kind))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    checks = [f"{s}: {summary[s]['answers']['equal']}/{summary[s]['answers']['compared']}" for s in servers]
    lines.append(f"| answers equal to cold | " + " | ".join(checks) + " |")
    return "\n".join(lines)


HEADING = "## Against vllm-mlx, side by side"
INSTALL = """python3 -m venv /work/peer-venv
/work/peer-venv/bin/pip install torch==2.13.0   # a CPU build where one lies on disk (torchvision may then bring another)
/work/peer-venv/bin/pip install vllm-mlx==0.6.0 "mlx[cpu]"
.venv/bin/python benchmarks/bench_peers.py --peer-venv /work/peer-venv   # or KVSTORE_PEER_VENV=..."""


def section(result):
    """The RESULTS.md section of a results file."""
    cfg, peer = result["config"], result["config"]["peer"]
    loads = f"load average {result['load_before'][0]:.1f} before, {result['load_after'][0]:.1f} after"
    kv_opts = " ".join(["--preload", *cfg.get("kvstore_options", [])])
    out = [HEADING, "",
           f"Script: `{result['command']}`; {result['started']}, {len(result['rounds'])} round(s), servers "
           f"interleaved (order rotating); {loads}. Model: a random-weight llama of hidden "
           f"{cfg['model']['hidden_size']} and {cfg['model']['num_hidden_layers']} layers built with `kvstore.tiny`, "
           f"the same folder for both; a system prompt of about {cfg['system_tokens']:,} tokens, a short question, "
           f"{cfg['max_tokens']} streamed tokens, greedy; time to the first chunk that carries text, medians. "
           f"kvstore serve runs with `{kv_opts}`; vllm-mlx {' '.join(peer['vllm_mlx'])} (mlx-lm "
           f"{' '.join(peer['mlx_lm'])}) with `--continuous-batching` (its prefix cache is saved at a graceful "
           "stop and loaded at start only in that mode) and `--warm-prompts` for the warmed row. Cached tokens: "
           "kvstore serve's `usage`, vllm-mlx's log. The first request after warming follows `kvstore warm` "
           "(kvstore) or a start with `--warm-prompts` (vllm-mlx; its start-up then includes the warm-up).", "",
           table(result["summary"]), "",
           "Install vllm-mlx beside the project (its own venv: it pins mlx-lm below 0.32 and pulls torch and "
           "torchvision; 6.6 GB here), then run the script:", "", "```bash", INSTALL, "```", ""]
    return "\n".join(out)


def write_section(md, text, heading=HEADING):
    """Put ``text`` (a section under ``heading``) into the RESULTS.md at ``md``: in place of an
    earlier copy, else before ``## Plots``."""
    md = Path(md)
    doc = md.read_text() if md.exists() else ""
    if heading in doc:
        start = doc.index(heading)
        end = doc.find("\n## ", start + len(heading))
        doc = doc[:start] + text + (doc[end + 1:] if end >= 0 else "")
    elif "\n## Plots" in doc:
        at = doc.index("\n## Plots") + 1
        doc = doc[:at] + text + "\n" + doc[at:]
    else:
        doc += "\n" + text
    md.write_text(doc)


def peer_venv(arg=None):
    """The vllm-mlx virtual environment from ``arg`` or ``$KVSTORE_PEER_VENV``, or ``None``
    (with the reason) when it is not given or holds no ``vllm-mlx``."""
    venv = arg or os.environ.get("KVSTORE_PEER_VENV")
    if not venv:
        return None, "no vllm-mlx environment given (--peer-venv or KVSTORE_PEER_VENV)"
    exe = Path(venv) / "bin" / "vllm-mlx"
    if not exe.exists():
        return None, f"{exe} not found (install: see this script's docstring)"
    return Path(venv), None


def peer_versions(peer):
    """``[vllm-mlx version, mlx-lm version]`` installed in the peer venv."""
    return subprocess.run([str(Path(peer) / "bin" / "python"), "-c",
                           "import importlib.metadata as m; print(m.version('vllm-mlx'), m.version('mlx-lm'))"],
                          capture_output=True, text=True).stdout.split()


# ------------------------------------------------------------------ servers
def vllm_command(peer, model, port, warm_file=None):
    """The vllm-mlx command line of these benchmarks (``--continuous-batching``: its prefix cache
    is saved at a graceful stop and loaded at start only in that mode)."""
    args = [str(Path(peer) / "bin" / "vllm-mlx"), "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
            "--continuous-batching"]
    return args + (["--warm-prompts", str(warm_file)] if warm_file else [])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One server process on a free loopback port, its log in a file."""

    def __init__(self, kind, model, place, log_dir, peer=None, warm_file=None):
        self.kind, self.port = kind, free_port()
        self.log = Path(log_dir) / f"{kind.split()[0]}-{self.port}.log"
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        host = ["--host", "127.0.0.1", "--port", str(self.port)]
        if kind == "kvstore serve":
            args = [KVSTORE, "--store", str(place), "serve", "--model", str(model), "--preload", *EXTRA, *host]
        else:
            # vllm-mlx keeps its prefix cache under ~/.cache/vllm-mlx: a home of its own per scenario
            env["HOME"] = str(place)
            args = vllm_command(peer, model, self.port, warm_file)
        self.model = str(model)
        t = now()
        self.proc = subprocess.Popen(args, stdout=open(self.log, "w"), stderr=subprocess.STDOUT, env=env)
        self._wait_ready()
        self.startup = now() - t

    def _wait_ready(self, timeout=600):
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited: {self.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"{self.kind} did not start: {self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if json.load(r).get("status") in ("ok", "healthy"):
                        return
            except OSError:
                time.sleep(0.05)

    def ask(self, system, question, max_tokens, kill_at_first=False):
        """Stream one chat request; ``kill_at_first`` SIGKILLs the server at the first content chunk."""
        body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
                "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        if self.kind != "kvstore serve":
            body["model"] = self.model
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/chat/completions",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        t = now()
        with urllib.request.urlopen(req, timeout=3600) as r:
            lines = r
            if kill_at_first:
                lines = self._kill_at_first(r)
            got = parse_stream(lines, t)
        got["question"] = question
        if self.kind == "kvstore serve":
            got["cached"] = usage_cached(got["usage"])
        else:
            time.sleep(0.05)
            got["cached"] = vllm_cached(self.log.read_text())
        return got

    def _kill_at_first(self, lines):
        for raw in lines:
            yield raw
            if parse_stream([raw], 0.0)["text"]:
                self.proc.kill()
                self.proc.wait()
                return

    def stop(self):
        t = now()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return now() - t


# ---------------------------------------------------------------- scenarios
def disk_bytes(kind, place):
    root = Path(place) if kind == "kvstore serve" else Path(place) / ".cache" / "vllm-mlx"
    return C.dir_bytes(root)[0] if root.exists() else 0


def scenario_restart(kind, model, place, system, qs, cfg, scratch, peer):
    out = {}
    s = Server(kind, model, place, scratch, peer)
    out["startup_s"] = s.startup
    out["cold"] = s.ask(system, qs[0], cfg["max_tokens"])
    out["memory"] = s.ask(system, qs[1], cfg["max_tokens"])
    out["stop_s"] = s.stop()
    s = Server(kind, model, place, scratch, peer)
    out["restart_startup_s"] = s.startup
    out["after_restart"] = s.ask(system, qs[2], cfg["max_tokens"])
    out["stop2_s"] = s.stop()
    out["disk_bytes"] = disk_bytes(kind, place)
    out["traceback"] = "Traceback" in s.log.read_text()
    return out


def scenario_warm(kind, model, place, system, q, cfg, scratch, peer):
    out = {}
    warm_file = None
    if kind == "kvstore serve":
        t = now()
        subprocess.run([KVSTORE, "--store", str(place), "warm", "--model", str(model), "--system", system],
                       check=True, capture_output=True)
        out["warm_s"] = now() - t
    else:
        warm_file = Path(scratch) / "warm-prompts.json"
        warm_file.write_text(json.dumps([[{"role": "system", "content": system}]]))
    s = Server(kind, model, place, scratch, peer, warm_file=warm_file)
    out["startup_s"] = s.startup
    out["first"] = s.ask(system, q, cfg["max_tokens"])
    out["stop_s"] = s.stop()
    return out


def scenario_kill(kind, model, place, system, qs, cfg, scratch, peer):
    out = {}
    s = Server(kind, model, place, scratch, peer)
    out["first"] = s.ask(system, qs[0], cfg["max_tokens"])
    out["killed"] = s.ask(system, qs[1], cfg["max_tokens"], kill_at_first=True)
    s = Server(kind, model, place, scratch, peer)
    out["startup_s"] = s.startup
    out["after"] = s.ask(system, qs[2], cfg["max_tokens"])
    s.stop()
    return out


def one_round(r, kind, model, system, cfg, scratch, peer):
    qs = [QUESTIONS[(r + i) % len(QUESTIONS)] for i in range(3)]
    res = {}
    for name, fn, q in (("restart", scenario_restart, qs), ("warm", scenario_warm, qs[0]),
                        ("kill", scenario_kill, [qs[2], qs[0], qs[1]])):
        place = Path(scratch) / f"{kind.split()[0]}-{name}-{r}"
        place.mkdir()
        res[name] = fn(kind, model, place, system, q, cfg, scratch, peer)
        shutil.rmtree(place, ignore_errors=True)
    return res


def system_prompt(tokenizer, n_tokens):
    """A system prompt of about ``n_tokens`` tokens of plain sentences."""
    rng = random.Random(4)
    vocab = ("the old lighthouse keeper climbed narrow stairs to light the lamp for ships that passed the rocks "
             "in the dark and wrote the weather in a small book with the names of boats wind waves sky").split()
    text = "You are the harbor office assistant."
    while len(tokenizer.encode(text)) < n_tokens:
        text += " " + " ".join(rng.choice(vocab) for _ in range(12)).capitalize() + "."
    return text


def main(argv=None):
    p = C.mode_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--peer-venv", help="virtual environment holding vllm-mlx (default: $KVSTORE_PEER_VENV)")
    p.add_argument("--md", help="RESULTS.md to write the section into (default: benchmarks/RESULTS.md when "
                                "--out is the default results folder)")
    p.add_argument("--rounds", type=int, help="rounds of both servers (default: 3 with --full, 1 with --quick)")
    args = p.parse_args(argv)
    peer, why = peer_venv(args.peer_venv)
    if peer is None:
        log(f"peers: skipped: {why}")
        return 0
    cfg = dict(MODES[args.mode])
    if args.rounds:
        cfg["rounds"] = args.rounds
    from transformers import AutoTokenizer

    from kvstore import tiny

    model = tiny.model_dir(MODEL[0], **MODEL[1])
    system = system_prompt(AutoTokenizer.from_pretrained(str(model)), cfg["system_tokens"])
    result = C.header("peers", args.mode, argv)
    peer_version = peer_versions(peer)
    result["config"] = {**cfg, "model": {"family": MODEL[0], **MODEL[1]}, "questions": QUESTIONS,
                        "kvstore_options": EXTRA,
                        "peer": {"venv": str(peer), "vllm_mlx": peer_version[:1], "mlx_lm": peer_version[1:]}}
    result["rounds"] = []
    with C.scratch() as scratch:
        for r in range(cfg["rounds"]):
            row = {}
            for kind in C.rotated(SERVERS, r):
                row[kind] = one_round(r, kind, model, system, cfg, scratch, peer)
                x = row[kind]
                log(f"peers round {r + 1} {kind}: cold {x['restart']['cold']['ttft']:.3f}s, memory "
                    f"{x['restart']['memory']['ttft']:.3f}s, restart {x['restart']['after_restart']['ttft']:.3f}s, "
                    f"warm {x['warm']['first']['ttft']:.3f}s, kill {x['kill']['after']['ttft']:.3f}s "
                    f"({x['kill']['after']['cached']} cached), start {x['restart']['startup_s']:.2f}s")
            result["rounds"].append(row)
    result["summary"] = summarize(result["rounds"])
    result["table"] = table(result["summary"])
    path = C.finish(result, out=args.out)
    print(result["table"])
    md = args.md or (C.HERE / "RESULTS.md" if Path(args.out).resolve() == C.RESULTS.resolve() else None)
    if md:
        write_section(md, section(result))
        log(f"peers: wrote its section into {md}")
    log(f"peers: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
