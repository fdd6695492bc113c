"""kvstore serve in agent loops: resume points and --normalize, over HTTP.

A real ``kvstore serve`` on 127.0.0.1: an agent client sends each reply back
as the server returned it, with a tool result; on a hybrid model every tool
round resumes where the previous reply ends, before and after a restart in
the middle of a task. Volatile system lines (a billing header whose hash
changes on every request) miss without ``--normalize`` and hit with it.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvstore_cli.demo import LocalServer as Server, cached

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import agent  # noqa: E402

KVSTORE = shutil.which("kvstore", path=os.path.dirname(sys.executable)) or "kvstore"


def play(server, messages, rounds, new_task=None):
    """Requests of one task over HTTP; ``(prompt tokens, cached tokens, resume point)`` per request."""
    import mlx_lm

    _, tok = mlx_lm.load(str(server.model))
    if new_task is not None:
        messages.append(agent.task(new_task))
    out = []
    for r in range(rounds):
        resp = server.post("/v1/chat/completions", {"messages": messages, "tools": agent.TOOLS, "max_tokens": 16,
                                                    "temperature": 0})
        messages.append(resp["choices"][0]["message"])
        # where the next request can resume: the chat through this reply, as the template renders it
        resume = len(tok.apply_chat_template(messages, tools=agent.TOOLS))
        messages.append(agent.tool_result(new_task or 0, r))
        out.append((resp["usage"]["prompt_tokens"], cached(resp), resume))
    return out


class AgentServer(Server):
    def __init__(self, store, model, *extra):
        self.model = model
        super().__init__(store, model, "--persist", "system,user,assistant", *extra, max_tokens=16)


def test_tool_rounds_resume_where_replies_end(tmp_path, tiny_model):
    store, model = tmp_path / "store", tiny_model("qwen3_5")
    messages = [{"role": "system", "content": agent.SYSTEM}]
    with AgentServer(store, model) as s:
        before = play(s, messages, 3, new_task=1)
        log = s.stop()
    assert "Traceback" not in log and "no resume point" not in log
    with AgentServer(store, model) as s:  # a restart in the middle of the task
        after = play(s, messages, 2)
    rounds = before + after
    assert rounds[0][1] == 0
    for (_, _, resume), (prompt, got, _) in zip(rounds, rounds[1:]):
        assert got == resume, rounds
        assert got / prompt > 0.8


def test_without_resume_points_tool_rounds_resume_earlier(tmp_path, tiny_model):
    store, model = tmp_path / "store", tiny_model("qwen3_5")
    messages = [{"role": "system", "content": agent.SYSTEM}]
    with AgentServer(store, model, "--no-resume-points") as s:
        rounds = play(s, messages, 3, new_task=1)
    for (prev_prompt, _, resume), (_, got, _) in zip(rounds, rounds[1:]):
        # mlx_lm.server's own checkpoint: the previous prompt, one token short
        assert got == prev_prompt - 1 < resume


def billed(cch, nonce):
    return (f"x-anthropic-billing-header: cc_version=2.1.3; cch={cch}\nRequest-Nonce: {nonce}\n{agent.SYSTEM}")


def ask(server, cch, nonce):
    msgs = [{"role": "system", "content": billed(cch, nonce)}, agent.task(1)]
    resp = server.post("/v1/chat/completions", {"messages": msgs, "max_tokens": 2, "temperature": 0})
    return resp["usage"]["prompt_tokens"], cached(resp)


def test_volatile_header_hits_only_with_normalize(tmp_path, tiny_model):
    model = tiny_model("llama")
    with Server(tmp_path / "plain", model) as s:
        ask(s, "a1b2c", 1)
        prompt, got = ask(s, "f9e8d", 2)
    assert got < 0.2 * prompt  # the prefix breaks at the hash, in the first line
    with Server(tmp_path / "norm", model, "--normalize", "--normalize-pattern", r"^Request-Nonce: \d+\n") as s:
        ask(s, "a1b2c", 1)
        prompt2, got2 = ask(s, "f9e8d", 2)
        log = s.stop()
    assert got2 == prompt2 - 1 and prompt2 < prompt  # the model saw neither line
    assert "Traceback" not in log
    # --normalize alone keeps the nonce line: a miss right after the header
    with Server(tmp_path / "norm-only", model, "--normalize") as s:
        ask(s, "a1b2c", 1)
        _, got3 = ask(s, "f9e8d", 2)
    assert got3 < 0.2 * prompt


def test_a_bad_pattern_is_refused_before_anything_starts(tmp_path, tiny_model):
    out = subprocess.run([KVSTORE, "--store", str(tmp_path / "store"), "serve", "--model", str(tiny_model("llama")),
                          "--normalize-pattern", "(unclosed"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.startswith("kvstore serve: ") and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "store").exists()
