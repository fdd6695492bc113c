"""Multi-turn: cache reuse per turn over long conversations, with a restart.

Two scripted conversations, on a hybrid (gated delta net + attention,
thinking template) and a plain (llama) model:

- ``chat``: the N-turn thinking-model conversation: a system prompt, then a
  user question and an assistant reply per turn; the client sends the reply
  back with its reasoning, which the template strips (as real thinking
  templates do).
- ``agent``: an agent loop: a long system prompt with tools, a user task,
  several assistant tool calls each answered by a tool result, a final
  answer, then the next user task, in one conversation.

Every request goes through one server-like driver (mlx_lm.server's
batched path: fetch_nearest_cache, prefill segment by segment with a
checkpoint inserted at each segment end, generate, insert the final cache),
with mlx-lm's ``LRUPromptCache`` or kvstore's ``TieredPromptCache`` as the
cache. Halfway through, the process exits and a new process takes over
(a restart), for every contender. Assistant replies are scripted (the
generated tokens are fed to the cache but not sent back), so every
contender sees the same prompts.

Run: ``python benchmarks/bench_multiturn.py --quick`` (or ``--full``).
"""

import argparse
import copy
import json
import random
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402
from common import log, now  # noqa: E402

MODES = {
    "quick": {"models": {"hybrid": "qwen3_5-tiny", "plain": "llama-tiny"}, "chat_turns": 8,
              "agent_tasks": 2, "agent_rounds": 2, "max_tokens": 8, "repeats": 1, "system_words": 150,
              "persist_all": False},
    "full": {"models": {"hybrid": "qwen3_5-small", "plain": "llama-small"}, "chat_turns": 40,
             "agent_tasks": 4, "agent_rounds": 3, "max_tokens": 16, "repeats": 1, "system_words": 200,
             "persist_all": True},
}
CONTENDERS = {
    "mlx_lru": "mlx-lm LRUPromptCache (memory only)",
    "kvstore": "kvstore TieredPromptCache (persists system, user)",
    "kvstore_all": "kvstore TieredPromptCache (persists system, user, assistant)",
}
WORDS = (
    "the old lighthouse keeper climbed narrow stairs to light lamp for ships that passed rocks in dark and wrote "
    "weather small book with names of boats file test function value error module class return import data "
    "cache token model server request build check read write list path line code change commit branch fix"
).split()
TOOLS = [
    {"type": "function", "function": {
        "name": "read_file", "description": "Read a file of the repository and return its text.",
        "parameters": {"type": "object", "properties": {"path": {"type": "string", "description": "file path"}},
                       "required": ["path"]}}},
    {"type": "function", "function": {
        "name": "run_tests", "description": "Run the test suite, or the tests matching a pattern.",
        "parameters": {"type": "object", "properties": {"pattern": {"type": "string"}}}}},
    {"type": "function", "function": {
        "name": "search", "description": "Search the repository for a string and list matching lines.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}},
]


def words(rng, lo, hi):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def system_prompt(kind, n_words, seed):
    rng = random.Random(seed)
    head = ("You are a careful coding agent working in a repository. Use the tools to read files, search and "
            "run tests before you answer. " if kind == "agent" else
            "You are a helpful assistant for a harbor office. Answer in short, clear sentences. ")
    lines = [f"Rule {i + 1}: {words(rng, 8, 16)}." for i in range(n_words // 12)]
    return head + "\n".join(lines)


def chat_script(cfg, seed=1):
    """(messages, request points, tools) of the thinking conversation."""
    rng = random.Random(seed)
    msgs = [{"role": "system", "content": system_prompt("chat", cfg["system_words"], seed)}]
    points = []
    for t in range(1, cfg["chat_turns"] + 1):
        msgs.append({"role": "user", "content": f"Question {t}: {words(rng, 8, 14)}?"})
        points.append(len(msgs))
        msgs.append({"role": "assistant", "content": f"<think>\n{words(rng, 20, 30)}</think>\n\n"
                                                     f"Answer {t}: {words(rng, 8, 12)}."})
    return msgs, points, None


def agent_script(cfg, seed=2):
    rng = random.Random(seed)
    msgs = [{"role": "system", "content": system_prompt("agent", 2 * cfg["system_words"], seed)}]
    points = []
    for k in range(1, cfg["agent_tasks"] + 1):
        msgs.append({"role": "user", "content": f"Task {k}: {words(rng, 10, 20)}."})
        points.append(len(msgs))
        for r in range(cfg["agent_rounds"]):
            tool = TOOLS[(k + r) % len(TOOLS)]["function"]["name"]
            arg = {"read_file": "path", "run_tests": "pattern", "search": "query"}[tool]
            msgs.append({"role": "assistant", "content": f"<think>\n{words(rng, 15, 25)}</think>\n\nLet me check.",
                         "tool_calls": [{"type": "function", "function": {
                             "name": tool, "arguments": {arg: words(rng, 1, 3).replace(' ', '_')}}}]})
            msgs.append({"role": "tool", "content": words(rng, 40, 80)})
            points.append(len(msgs))
        msgs.append({"role": "assistant", "content": f"<think>\n{words(rng, 15, 25)}</think>\n\n"
                                                     f"Done with task {k}: {words(rng, 10, 15)}."})
    return msgs, points, TOOLS


SCRIPTS = {"chat": chat_script, "agent": agent_script}


# ------------------------------------------------------------------ worker
def worker(spec):
    """Play requests ``spec['points'][first:last]`` with one cache; print one JSON line."""
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.generate import generate_step, stream_generate
    from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
    from mlx_lm.sample_utils import make_sampler

    import kvstore
    from kvstore import TieredPromptCache
    from kvstore.codec import cache_tokens
    from kvstore.session import segment_prompt, skip_cached

    model, tok = mlx_lm.load(spec["model"])
    msgs, points, tools = spec["messages"], spec["points"], spec["tools"]
    kind = spec["contender"]
    if kind == "mlx_lru":
        pc, key = LRUPromptCache(max_size=10), (spec["model"], None, None)
    else:
        persist = ("system", "user", "assistant") if kind == "kvstore_all" else ("system", "user")
        pc, key = TieredPromptCache(spec["store"], max_size=10, persist=persist), kvstore.fingerprint(spec["model"])
    sampler = make_sampler(temp=0.0)
    # warm the kernels on a throwaway prompt (no cache involved)
    for _ in stream_generate(model, tok, tok.encode("warm up the kernels " * 8), max_tokens=4):
        pass
    reports = []
    for i in range(spec["first"], spec["last"]):
        messages = msgs[: points[i]]
        prompt, segments, types = segment_prompt(tok, messages, tools)
        before = pc.counters() if kind != "mlx_lru" else None
        t0 = now()
        cache, rest = pc.fetch_nearest_cache(key, prompt)
        fetch_s = now() - t0
        if cache is not None and not rest:
            # mlx-lm's LRU serves an exact hit with nothing to prefill: back off one token
            if can_trim_prompt_cache(cache):
                trim_prompt_cache(cache, 1)
                rest = prompt[-1:]
            else:
                cache, rest = None, prompt
        if cache is None:
            cache = make_prompt_cache(model)
        cached = len(prompt) - len(rest)
        skip_cached(segments, types, cached)
        pos = cached
        for seg, tier in zip(segments[:-1], types[:-1]):
            for _ in generate_step(mx.array(seg), model, prompt_cache=cache, max_tokens=0):
                pass
            mx.eval([c.state for c in cache])
            pos += len(seg)
            held = cache_tokens(cache)
            if held is None or held == pos:
                # the server inserts an extracted copy; kvstore copies on insert itself
                pc.insert_cache(key, prompt[:pos], copy.deepcopy(cache) if kind == "mlx_lru" else cache,
                                cache_type=tier)
        ttft, out = None, []
        for resp in stream_generate(model, tok, mx.array(segments[-1]), max_tokens=spec["max_tokens"],
                                    sampler=sampler, prompt_cache=cache):
            if ttft is None:
                ttft = now() - t0
            out.append(resp.token)
        total = now() - t0
        pc.insert_cache(key, prompt + out, cache, cache_type="assistant")
        source = None
        if before is not None:
            after = pc.counters()
            source = "memory" if after["hits.memory"] > before["hits.memory"] else (
                "disk" if after["hits.disk"] > before["hits.disk"] else None)
        elif cached:
            source = "memory"
        reports.append({"request": i + 1, "prompt": len(prompt), "cached": cached, "share": cached / len(prompt),
                        "source": source, "fetch_s": fetch_s, "ttft_s": ttft, "total_s": total,
                        "last_role": messages[-1]["role"]})
    if kind != "mlx_lru":
        pc.close()
    print(json.dumps({"reports": reports}), flush=True)


def run_half(spec, scratch):
    path = Path(scratch) / "multiturn-worker.json"
    path.write_text(json.dumps(spec))
    t = now()
    proc = subprocess.run([C.PY, __file__, "--worker", str(path)], capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed: {proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_wall"] = now() - t
    return out


def main(argv=None):
    p = C.mode_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(json.loads(Path(args.worker).read_text()))
    cfg = MODES[args.mode]
    result = C.header("multiturn", args.mode, argv)
    result["config"] = cfg
    result["contenders"] = CONTENDERS
    result["runs"] = []
    models = {role: C.model_dir(name) for role, name in cfg["models"].items()}
    result["models"] = {role: {"name": cfg["models"][role], **C.model_info(path)} for role, path in models.items()}
    with C.scratch() as scratch:
        for rep in range(cfg["repeats"]):
            for script in SCRIPTS:
                msgs, points, tools = SCRIPTS[script](cfg)
                half = (len(points) + 1) // 2
                for role, path in models.items():
                    contenders = ["mlx_lru", "kvstore"] + (["kvstore_all"] if script == "agent" and cfg["persist_all"] else [])
                    contenders = C.rotated(contenders, rep)
                    stores = {c: scratch / f"store-{rep}-{script}-{role}-{c}" for c in contenders}
                    run = {"repeat": rep, "script": script, "model": role, "restart_before": half + 1,
                           "requests": len(points), "contenders": {}}
                    # first halves, then (after every process has exited) second halves
                    for first, last in ((0, half), (half, len(points))):
                        for c in contenders:
                            spec = {"model": str(path), "contender": c, "store": str(stores[c]), "messages": msgs,
                                    "points": points, "tools": tools, "first": first, "last": last,
                                    "max_tokens": cfg["max_tokens"]}
                            got = run_half(spec, scratch)
                            slot = run["contenders"].setdefault(c, {"reports": [], "process_wall": []})
                            slot["reports"] += got["reports"]
                            slot["process_wall"].append(got["process_wall"])
                    for c, slot in run["contenders"].items():
                        reps = slot["reports"]
                        slot["total_ttft_s"] = sum(r["ttft_s"] for r in reps)
                        slot["total_fetch_s"] = sum(r["fetch_s"] for r in reps)
                        slot["prompt_tokens"] = sum(r["prompt"] for r in reps)
                        slot["cached_tokens"] = sum(r["cached"] for r in reps)
                        slot["prefilled_tokens"] = slot["prompt_tokens"] - slot["cached_tokens"]
                        slot["after_restart"] = reps[half] if len(reps) > half else None
                        if c != "mlx_lru":
                            import kvstore

                            with kvstore.SnapshotStore(stores[c], readonly=True) as st:
                                slot["store"] = {"snapshots": len(st.entries()), "bytes": st.total_bytes()}
                    log(f"multiturn {script} {role} (repeat {rep + 1}): " + ", ".join(
                        f"{c}: {s['total_ttft_s']:.2f}s to first tokens, {s['cached_tokens']}/{s['prompt_tokens']} "
                        f"cached" for c, s in run["contenders"].items()))
                    result["runs"].append(run)
    path = C.finish(result, out=args.out)
    log(f"multiturn: wrote {path}")


if __name__ == "__main__":
    main()
