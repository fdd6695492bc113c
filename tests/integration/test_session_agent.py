"""Agent loops in PromptSession: resume points for caches that cannot be trimmed.

Each request of a task after the first resumes where the previous reply
ends as the chat template re-renders it, in memory and after a restart (a
new process, assistant checkpoints persisted); the checkpoint is exact; the
tiny thinking template keeps reasoning within a task and drops it at the
next user turn. Real tiny models, real stores, a real second process.
"""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

import kvstore
from kvstore import PromptSession
from kvstore.resume import reply_end, reply_message

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import agent  # noqa: E402

HYBRID = ("qwen3_5", "mamba", "falcon_h1", "gemma3_text")  # gemma3_text: a 16-token sliding window


def history():
    return [{"role": "system", "content": agent.SYSTEM}]


def test_template_keeps_reasoning_within_a_task(load_tiny):
    _, tok = load_tiny("qwen3_5")
    reply = {"role": "assistant", "content": "Let me look.", "reasoning": "I should read the file."}
    within = tok.apply_chat_template(history() + [agent.task(1), reply, agent.tool_result(1, 0)], tokenize=False)
    assert "<think>\nI should read the file.\n</think>\n\nLet me look." in within
    after = tok.apply_chat_template(history() + [agent.task(1), reply, agent.task(2)], tokenize=False)
    assert "I should read the file." not in after and "<|im_start|>assistant\nLet me look.<|im_end|>" in after
    # the reasoning inline in the content, as some clients send it, renders the same way
    inline = {"role": "assistant", "content": "<think>\nI should read the file.</think>\n\nLet me look."}
    assert tok.apply_chat_template(history() + [agent.task(1), inline, agent.tool_result(1, 0)],
                                   tokenize=False) == within


def test_reply_message_as_the_server_returns_it(load_tiny):
    _, tok = load_tiny("qwen3_5")
    text = ('I will read it.</think>\n\nReading.<tool_call>\n{"name": "read_file", "arguments": {"path": "a.py"}}'
            "\n</tool_call>")
    tokens = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    msg = reply_message(tok, tokens, "reasoning", agent.TOOLS)
    assert msg["reasoning"] == "I will read it." and msg["content"].strip() == "Reading."
    (call,) = msg["tool_calls"]
    assert call["function"]["name"] == "read_file" and json.loads(call["function"]["arguments"]) == {"path": "a.py"}
    # the re-rendered reply ends at its end-of-message token and newline, before the tool turn
    messages = history() + [agent.task(1)]
    end = reply_end(tok, messages, msg, agent.TOOLS)
    full = tok.apply_chat_template(messages + [msg, agent.tool_result(1, 0)], tools=agent.TOOLS)
    assert full[:len(end)] == end and tok.decode(end).endswith("</tool_call><|im_end|>\n")


@pytest.mark.parametrize("family", HYBRID)
def test_every_round_resumes_where_the_reply_ends(tmp_path, load_tiny, tiny_model, family):
    model, tok = load_tiny(family)
    session = PromptSession((model, tok), store=tmp_path / "store", model_path=tiny_model(family))
    messages = history()
    reports = agent.play_session(session, messages, 1, 4) + agent.play_session(session, messages, 2, 3)
    session.close()
    for prev, cur in zip(reports, reports[1:]):
        if cur["round"] > 0:
            assert prev["resume"] is not None and cur["cached"] == prev["resume"], (family, prev, cur)
    # the next task starts from the previous task's user checkpoint (its reasoning is dropped)
    first_of_2 = reports[4]
    assert 0 < first_of_2["cached"] < reports[3]["prompt"]


def test_trimmable_caches_get_no_extra_checkpoints(load_tiny):
    model, tok = load_tiny("llama")
    session = PromptSession((model, tok))
    reports = agent.play_session(session, history(), 1, 3)
    assert [r["resume"] for r in reports] == [None] * 3
    assert [t for _, t in session.last.checkpoints] == []  # a tool round has no segment ends
    assert all(r["cached"] >= p["prompt"] - 1 for p, r in zip(reports, reports[1:]))


def test_resume_point_is_exact(load_tiny):
    model, tok = load_tiny("qwen3_5")
    session = PromptSession((model, tok))
    messages = history() + [agent.task(1)]
    session.chat(messages, max_tokens=12, tools=agent.TOOLS)
    target = reply_end(tok, messages, session.last.reply, agent.TOOLS)
    assert session.last.resume_tokens == len(target)
    got = session.cache.fetch(session._key, target + [7])
    assert got.reused == len(target) and got.tier == "assistant"
    cold = make_prompt_cache(model)
    cold_logits = model(mx.array(target)[None], cache=cold)[0, -1]
    hit_logits = model(mx.array([7])[None], cache=got.cache)[0, -1]
    cold_next = model(mx.array([7])[None], cache=cold)[0, -1]
    assert np.allclose(np.array(hit_logits), np.array(cold_next), atol=1e-4)
    assert not np.allclose(np.array(cold_logits), np.array(cold_next))


def test_resume_points_survive_a_restart(tmp_path, tiny_model):
    model, store = tiny_model("qwen3_5"), tmp_path / "store"
    hist = tmp_path / "history.json"
    hist.write_text(json.dumps(history()))

    def play(k, rounds, new_task):
        args = {"model": str(model), "store": str(store), "history": str(hist), "task": k, "rounds": rounds,
                "new_task": new_task}
        out = subprocess.run([sys.executable, str(Path(agent.__file__)), json.dumps(args)], capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])["reports"]

    before = play(1, 2, True)
    after = play(1, 2, False)  # a new process in the middle of the task
    assert after[0]["source"] == "disk" and after[0]["cached"] == before[-1]["resume"]
    assert after[1]["source"] == "memory" and after[1]["cached"] == after[0]["resume"]
    with kvstore.SnapshotStore(store) as s:
        tiers = [e.tier for e in s.entries()]
    assert tiers.count("assistant") >= 6  # per request: the prefill's end, the reply, the re-rendered reply
