"""Agent loops: cache reuse per request through real servers, and disk growth.

Two parts:

- ``server``: an agent client drives a real server on 127.0.0.1 over HTTP
  (streaming, so the time to the first chunk is measured), the contenders
  interleaved request by request under the same load: a long system
  prompt with tools, then tasks of tool rounds; each reply goes back as the
  server returned it, followed by a scripted tool result. Halfway through (in
  the middle of a task) the server process is replaced by a new one (a
  restart). Contenders: plain ``mlx_lm.server`` and ``kvstore serve
  --persist system,user,assistant``, on a hybrid model (gated delta net +
  attention, thinking template) and a plain one (llama).
- ``disk``: a 40-round agent session in ``PromptSession`` on the hybrid
  model with assistant checkpoints persisted; the store's bytes on disk
  against what the snapshots hold that is unique: the distinct prefix
  tokens' positional KV rows plus one recurrent state per snapshot.

Run: ``python benchmarks/bench_agent.py --quick`` (or ``--full``).
"""

import argparse
import http.client
import json
import random
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402
from common import log, now  # noqa: E402

MODES = {
    "quick": {"models": {"hybrid": "qwen3_5-tiny", "plain": "llama-tiny"}, "tasks": 3, "rounds": 4,
              "max_tokens": 48, "system_words": 500, "tool_words": (15, 30), "disk_rounds": 40, "repeats": 1},
    "full": {"models": {"hybrid": "qwen3_5-small", "plain": "llama-small"}, "tasks": 4, "rounds": 5,
             "max_tokens": 64, "system_words": 800, "tool_words": (20, 40), "disk_rounds": 40, "repeats": 2},
}
CONTENDERS = {
    "mlx_lm": "mlx_lm.server (its own LRU prompt cache)",
    "kvstore": "kvstore serve --persist system,user,assistant",
}
WORDS = (
    "file test function value error module class return import data cache token model server request build "
    "check read write list path line code change commit branch fix the a of to in and for with that this"
).split()
TOOLS = [
    {"type": "function", "function": {"name": name, "description": desc, "parameters": {
        "type": "object", "properties": {arg: {"type": "string"}}, "required": [arg]}}}
    for name, desc, arg in (("read_file", "Read a file of the repository and return its text.", "path"),
                            ("run_tests", "Run the tests matching a pattern and return the failures.", "pattern"),
                            ("search", "Search the repository for a string and list matching lines.", "query"))
]


def words(rng, lo, hi):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def system_prompt(n_words, seed=3):
    rng = random.Random(seed)
    head = ("You are a careful coding agent working in a repository. Use the tools to read files, search and run "
            "tests before you answer.\n")
    return head + "\n".join(f"Rule {i + 1}: {words(rng, 8, 16)}." for i in range(n_words // 12))


def tool_result(cfg, k, r):
    rng = random.Random(1000 * k + r)
    return {"role": "tool", "content": words(rng, *cfg["tool_words"])}


def task(rng, k):
    return {"role": "user", "content": f"Task {k}: {words(rng, 10, 20)}."}


def schedule(cfg):
    """``(task, round)`` of every request, in order."""
    return [(k, r) for k in range(1, cfg["tasks"] + 1) for r in range(cfg["rounds"])]


# ------------------------------------------------------------------ servers
class Server:
    """A server process on a free loopback port, stopped with SIGTERM."""

    def __init__(self, contender, model, store, max_tokens, logfile):
        from kvstore_cli.demo import _kvstore, free_port

        self.port = free_port()
        common = ["--model", str(model), "--host", "127.0.0.1", "--port", str(self.port),
                  "--max-tokens", str(max_tokens)]
        if contender == "mlx_lm":
            cmd = [C.PY, "-m", "mlx_lm", "server", *common]
        else:
            cmd = [_kvstore(), "--store", str(store), "serve", "--persist", "system,user,assistant", *common]
        self.log = open(logfile, "a")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{contender} server exited; see {logfile}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"{contender} server did not start; see {logfile}")

    def chat(self, messages, max_tokens):
        """One streamed greedy chat completion: ``(ttft, total, message, usage)``."""
        body = json.dumps({"messages": messages, "tools": TOOLS, "max_tokens": max_tokens, "temperature": 0,
                           "stream": True, "stream_options": {"include_usage": True}})
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=3600)
        t0 = now()
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        ttft, usage, content, reasoning, calls = None, None, "", "", []
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage") and not chunk.get("choices"):
                usage = chunk["usage"]
                continue
            delta = chunk["choices"][0].get("delta", {})
            if ttft is None:
                ttft = now() - t0
            content += delta.get("content") or ""
            reasoning += delta.get("reasoning") or ""
            calls += [{k: v for k, v in c.items() if k != "index"} for c in delta.get("tool_calls") or []]
        total = now() - t0
        conn.close()
        message = {"role": "assistant", "content": content or None}
        if reasoning:
            message["reasoning"] = reasoning
        if calls:
            message["tool_calls"] = calls
        return ttft, total, message, usage or {}

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def restart_point(cfg, plan):
    """Index of the first request after the restart: halfway, in the middle of a task."""
    half = len(plan) // 2
    if plan[half][1] == 0 and cfg["rounds"] > 1:
        half += 1
    return half


def run_agent(cfg, contenders, model, stores, logdir):
    """The agent run on every contender at once, request by request (interleaved, order
    rotating), each server replaced by a new process halfway; per-request reports."""
    plan = schedule(cfg)
    half = restart_point(cfg, plan)
    state = {c: {"messages": [{"role": "system", "content": system_prompt(cfg["system_words"])}],
                 "rng": random.Random(7), "reports": [], "server": None} for c in contenders}
    for i, (k, r) in enumerate(plan):
        for c in C.rotated(contenders, i):
            st = state[c]
            if i in (0, half):
                if st["server"] is not None:
                    st["server"].stop()
                st["server"] = Server(c, model, stores[c], cfg["max_tokens"], Path(logdir) / f"{c}.log")
            messages = st["messages"]
            if r == 0:
                messages.append(task(st["rng"], k))
            ttft, total, message, usage = st["server"].chat(messages, cfg["max_tokens"])
            prompt = usage.get("prompt_tokens", 0)
            got = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            st["reports"].append({"request": i + 1, "task": k, "round": r, "prompt": prompt, "cached": got,
                                  "share": got / prompt if prompt else 0.0, "ttft_s": ttft, "total_s": total,
                                  "after_restart": i == half})
            messages.append(message)
            if r < cfg["rounds"] - 1:  # the task's last reply is its answer; the next request is a new task
                messages.append(tool_result(cfg, k, r))
    for st in state.values():
        st["server"].stop()
    return {c: st["reports"] for c, st in state.items()}, half


# --------------------------------------------------------------------- disk
def unique_tokens(sequences):
    """Distinct prefix positions over token sequences (the nodes of their trie)."""
    root, count = {}, 0
    for seq in sequences:
        node = root
        for t in seq:
            nxt = node.get(t)
            if nxt is None:
                nxt = node[t] = {}
                count += 1
            node = nxt
    return count


def state_bytes(cache):
    """(positional KV bytes per token, bytes of the state that is not positional) of a prompt cache."""
    import mlx.core as mx

    per_token = C.kv_bytes_per_token(cache)
    other = 0
    for c in cache:
        if getattr(c, "keys", None) is not None and hasattr(c, "offset"):
            continue
        other += sum(a.nbytes for a in getattr(c, "cache", []) or [] if isinstance(a, mx.array))
    return per_token, other


def run_disk(cfg, model_path, store):
    """A ``disk_rounds``-request agent session with assistant checkpoints persisted; bytes against unique state."""
    import kvstore
    from kvstore import PromptSession, TieredPromptCache

    cache = TieredPromptCache(store, max_size=10, persist=("system", "user", "assistant"), queue_policy="wait",
                              queue_timeout=60)
    inserted = []
    insert = cache.insert_cache

    def recording(model, tokens, prompt_cache, **kw):
        inserted.append(list(tokens))
        return insert(model, tokens, prompt_cache, **kw)

    cache.insert_cache = recording
    session = PromptSession(model_path, store=cache, model_path=model_path)
    rng = random.Random(11)
    messages = [{"role": "system", "content": system_prompt(cfg["system_words"])}]
    shares, t0 = [], now()
    rounds = cfg["disk_rounds"]
    for i in range(rounds):
        k, r = divmod(i, cfg["rounds"])
        if r == 0:
            messages.append(task(rng, k + 1))
        session.chat(messages, max_tokens=cfg["max_tokens"], tools=TOOLS)
        shares.append(session.last.hit_share)
        messages.append(session.last.reply)
        if r < cfg["rounds"] - 1:
            messages.append(tool_result(cfg, k + 1, r))
    probe = session.model, session.tokenizer
    cache.close()
    from mlx_lm.models.cache import make_prompt_cache
    import mlx.core as mx

    c = make_prompt_cache(probe[0])
    probe[0](mx.array([[1, 2, 3, 4]]), cache=c)
    mx.eval([x.state for x in c])
    per_token, recurrent = state_bytes(c)
    with kvstore.SnapshotStore(store, readonly=True) as st:
        entries = st.entries()
        indexed = st.total_bytes()
    keys = {tuple(t) for t in inserted}
    distinct = unique_tokens(sorted(keys))
    unique = distinct * per_token + len(entries) * recurrent
    blobs = C.dir_bytes(Path(store) / "blobs")
    everything = C.dir_bytes(store)
    return {"requests": rounds, "snapshots": len(entries), "snapshots_inserted": len(keys),
            "tiers": {t: sum(e.tier == t for e in entries) for t in ("system", "user", "assistant")},
            "distinct_prefix_tokens": distinct, "kv_bytes_per_token": per_token, "recurrent_bytes": recurrent,
            "unique_bytes": unique, "indexed_bytes": indexed, "blob_bytes": blobs[0], "blob_allocated": blobs[1],
            "store_bytes": everything[0], "store_allocated": everything[1],
            "ratio_blobs": blobs[0] / unique, "ratio_store_allocated": everything[1] / unique,
            "shares": shares, "wall_s": now() - t0}


# --------------------------------------------------------------------- main
def summarise(reports, half):
    later = [x for x in reports if x["round"] > 0]
    return {"reports": reports, "restart_before": half + 1,
            "total_ttft_s": sum(x["ttft_s"] for x in reports),
            "prompt_tokens": sum(x["prompt"] for x in reports), "cached_tokens": sum(x["cached"] for x in reports),
            "min_share_later_rounds": min(x["share"] for x in later) if later else None,
            "min_share_later_before_restart": min((x["share"] for x in later if x["request"] <= half), default=None),
            "min_share_later_after_restart": min((x["share"] for x in later if x["request"] > half), default=None)}


def main(argv=None):
    p = C.mode_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--skip-disk", action="store_true", help="only the server part")
    p.add_argument("--repeats", type=int, help="repeats of the server part (default: the mode's)")
    args = p.parse_args(argv)
    cfg = dict(MODES[args.mode])
    if args.repeats:
        cfg["repeats"] = args.repeats
    result = C.header("agent", args.mode, argv)
    result.update(config=cfg, contenders=CONTENDERS, runs=[])
    models = {role: C.model_dir(name) for role, name in cfg["models"].items()}
    result["models"] = {role: {"name": cfg["models"][role], **C.model_info(path)} for role, path in models.items()}
    with C.scratch() as scratch:
        for rep in range(cfg["repeats"]):
            for role, path in models.items():
                run = {"repeat": rep, "model": role, "contenders": {}}
                order = C.rotated(list(CONTENDERS), rep)
                stores = {c: scratch / f"store-{rep}-{role}-{c}" for c in order}
                logdir = scratch / f"logs-{rep}-{role}"
                logdir.mkdir()
                got, half = run_agent(cfg, order, path, stores, logdir)
                for c in CONTENDERS:
                    reports = got[c]
                    run["contenders"][c] = summarise(reports, half)
                    if c == "kvstore":
                        run["contenders"][c]["store_bytes"] = C.dir_bytes(stores[c])[0]
                    s = run["contenders"][c]
                    log(f"agent {role} {c} (repeat {rep + 1}): {s['total_ttft_s']:.2f}s to first tokens, "
                        f"{s['cached_tokens']}/{s['prompt_tokens']} cached, shares "
                        + " ".join(f"{100 * x['share']:.0f}" for x in reports))
                result["runs"].append(run)
        ratios = {}
        for role in models:
            runs = [r for r in result["runs"] if r["model"] == role]
            ratios[role] = C.median([r["contenders"]["kvstore"]["total_ttft_s"]
                                     / r["contenders"]["mlx_lm"]["total_ttft_s"] for r in runs])
        result["ttft_ratio"] = ratios
        result["ttft_ratio_hybrid_over_plain"] = ratios["hybrid"] / ratios["plain"]
        if not args.skip_disk:
            result["disk"] = run_disk(cfg, models["hybrid"], scratch / "disk-store")
            d = result["disk"]
            log(f"agent disk: {d['requests']} requests, {d['snapshots']} snapshots, {d['blob_bytes']} blob bytes "
                f"against {d['unique_bytes']} unique ({d['ratio_blobs']:.3f}x)")
    path = C.finish(result, out=args.out)
    log(f"agent: wrote {path}")


if __name__ == "__main__":
    main()
