"""PromptSession: server segmentation, reuse over a 40-turn chat and across a
process restart, outputs equal to uncached generation, exact independent
checkpoints, message normalisation. Real tiny models, real stores, a real
second process."""

import copy
import json
import subprocess
import sys
import types
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step, stream_generate
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.server import ResponseGenerator

import kvstore
from kvstore import PromptSession, TieredPromptCache
from kvstore.session import VOLATILE_PATTERNS, normalize_messages, segment_prompt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import chat  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent.parent
SYSTEM = {"role": "system", "content": chat.SYSTEM}
TOOLS = [{"type": "function", "function": {"name": "get_tide", "parameters": {"type": "object"}}}]


def server_tokenize(tokenizer, messages, tools=None):
    """mlx_lm.server's own ResponseGenerator._tokenize, called with a stand-in
    for the server object (it only reads the processor and template args)."""
    server = types.SimpleNamespace(model_provider=types.SimpleNamespace(
        processor=None, cli_args=types.SimpleNamespace(chat_template_args={})))
    request = types.SimpleNamespace(request_type="chat", messages=copy.deepcopy(messages), tools=tools,
                                    role_mapping=None)
    args = types.SimpleNamespace(chat_template_kwargs=None)
    prompt, segments, segment_types, _, _ = ResponseGenerator._tokenize(server, tokenizer, request, args)
    return prompt, segments, segment_types


CHATS = [
    [SYSTEM, chat.user_message(1)],
    [SYSTEM, {"role": "system", "content": "Be brief."}, chat.user_message(1)],
    [chat.user_message(1)],
    [SYSTEM, chat.user_message(1), chat.assistant_message(1, "hm"), chat.user_message(2)],
    [SYSTEM, chat.user_message(1), {"role": "assistant", "content": "Sure."}],
    [SYSTEM, {"role": "user", "content": [{"type": "text", "text": "Part one. "}, {"type": "text", "text": "Two."}]}],
]


@pytest.mark.parametrize("tools", [None, TOOLS])
def test_segments_match_mlx_lm_server(load_tiny, tools):
    _, tok = load_tiny("qwen3_5")
    for messages in CHATS:
        assert segment_prompt(tok, messages, tools) == server_tokenize(tok, messages, tools)
    prompt, segments, kinds = segment_prompt(tok, CHATS[0])
    assert kinds == ["system", "user", "assistant"] and sum(segments, []) == prompt
    assert segments[2][0] == tok.convert_tokens_to_ids("<think>")


def test_forty_turn_chat_with_a_restart(tmp_path, tiny_model):
    """40 turns on the thinking hybrid model; a new process takes over at turn 21."""
    model_dir, store = str(tiny_model("qwen3_5")), str(tmp_path / "store")
    messages = [SYSTEM]
    session = PromptSession(model_dir, store=store)
    reports = chat.play(session, messages, 1, 20)
    session.close()
    history = tmp_path / "history.json"
    history.write_text(json.dumps(messages))
    args = {"model": model_dir, "store": store, "history": str(history), "first": 21, "last": 40}
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "chat.py"), json.dumps(args)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    reports += json.loads(out.stdout.strip().splitlines()[-1])["reports"]
    print()
    for r in reports:
        print(f"turn {r['turn']:2d}: {r['cached']:4d}/{r['prompt']:4d} prompt tokens from cache "
              f"({r['share']:6.1%}, {r['source']})")
    assert [r["turn"] for r in reports] == list(range(1, 41))
    assert reports[0]["cached"] == 0
    assert all(r["share"] >= 0.8 for r in reports[4:]), [round(r["share"], 3) for r in reports]
    assert reports[20]["source"] == "disk"
    assert {r["source"] for r in reports[1:20]} == {r["source"] for r in reports[21:]} == {"memory"}


@pytest.mark.parametrize("family", ["llama", "qwen3_5"])
def test_outputs_equal_with_and_without_cache(tmp_path, family, load_tiny, tiny_model):
    model, tok = load_tiny(family)
    path = tmp_path / "store"

    def uncached(messages):
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
        return [r.token for r in stream_generate(model, tok, prompt, max_tokens=8)]

    messages, sources = [SYSTEM], []
    session = PromptSession((model, tok), store=path, model_path=tiny_model(family))
    for turn in range(1, 7):
        if turn == 4:  # a fresh cache: this turn comes from disk
            session.close()
            session = PromptSession((model, tok), store=path, model_path=tiny_model(family))
        messages.append(chat.user_message(turn))
        text, tokens = session.chat(messages, max_tokens=8, seed=0)
        assert tokens == uncached(messages), f"turn {turn}"
        sources.append(session.last.source)
        messages.append(chat.assistant_message(turn, text))
    session.close()
    assert sources == [None, "memory", "memory", "disk", "memory", "memory"]


def states(cache, n):
    out = []
    for c in cache:
        if hasattr(c, "keys") and c.keys is not None:
            out += [np.array(c.keys[:, :, :n, :]), np.array(c.values[:, :, :n, :])]
        elif hasattr(c, "cache"):
            out += [np.array(a) for a in c.cache if a is not None]
    return out


def test_checkpoints_are_exact_and_independent(load_tiny):
    model, tok = load_tiny("qwen3_5")
    session = PromptSession((model, tok))
    messages = [SYSTEM, chat.user_message(1)]
    session.chat(messages, max_tokens=6)
    prompt, segments, _ = session.segment(messages)
    sys_end, user_end = len(segments[0]), len(segments[0]) + len(segments[1])
    # a hybrid cache also gets resume points: the prefill's end, and the reply's end as re-rendered
    resume = session.last.resume_tokens
    assert session.last.checkpoints == [(sys_end, "system"), (user_end, "user"), (len(prompt) - 1, "assistant"),
                                        (resume, "assistant")]
    tokens = tok.apply_chat_template(messages + [session.last.reply], tools=None)
    assert resume == len(tokens)  # this template ends the reply where the whole chat ends
    assert session.cache.stats_by_type()["assistant"]["n_sequences"] == 3
    for n, tier in session.last.checkpoints:
        full = tokens if n == resume else prompt
        got = session.cache.fetch(session._key, full[:n] + [7])
        assert (got.reused, got.tier, got.source) == (n, tier, "memory")
        # the session went on prefilling and decoding into its own cache after
        # inserting: the checkpoint must still be the state of exactly n tokens
        cold = make_prompt_cache(model)
        for _ in generate_step(mx.array(full[:n]), model, prompt_cache=cold, max_tokens=0):
            pass
        a, b = states(got.cache, n), states(cold, n)
        assert len(a) == len(b) and all(np.allclose(x, y, atol=1e-5) for x, y in zip(a, b))


def test_loaded_model_and_a_shared_cache(tmp_path, load_tiny, tiny_model):
    model, tok = load_tiny("llama")
    cache = TieredPromptCache(tmp_path / "store", max_size=4)
    a = PromptSession((model, tok), store=cache, model_path=tiny_model("llama"))
    b = PromptSession((model, tok), store=cache, fingerprint=a.fingerprint)
    messages = [SYSTEM, chat.user_message(1)]
    a.chat(messages, max_tokens=4)
    b.chat(messages, max_tokens=4)
    assert (b.last.source, b.last.kind, b.last.cached_tokens) == ("memory", "longer", b.last.prompt_tokens - 1)
    a.close()
    assert cache.store is not None  # a shared cache stays open
    # without a model path or fingerprint nothing can be persisted
    c = PromptSession((model, tok), store=cache)
    c.chat([SYSTEM, chat.user_message(2)], max_tokens=4)
    cache.close()
    with kvstore.SnapshotStore(tmp_path / "store") as s:
        assert {(e.fingerprint, e.tier) for e in s.entries()} == {(a.fingerprint, "system"), (a.fingerprint, "user")}


def test_normalize_messages():
    header = "x-anthropic-billing-header: cc_version=2.1.3; cch=5f0e2\n"
    messages = [
        {"role": "system", "content": header + "You are helpful.\nToday is Monday.\n"},
        {"role": "system", "content": [{"type": "text", "text": header}, {"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": header + "hi"},
    ]
    before = copy.deepcopy(messages)
    out = normalize_messages(messages)
    assert messages == before and out[2] is messages[2]
    assert out[0]["content"] == "You are helpful.\nToday is Monday.\n"
    assert out[1]["content"] == [{"type": "text", "text": "Be brief."}]
    out = normalize_messages(messages, VOLATILE_PATTERNS + (r"^Today is .*$\n?",))
    assert out[0]["content"] == "You are helpful.\n"


def test_volatile_header_needs_normalising(load_tiny):
    model, tok = load_tiny("llama")

    def ask(session, cch):
        system = f"x-anthropic-billing-header: cc_version=2.1.3; cch={cch}\n{chat.SYSTEM}"
        session.chat([{"role": "system", "content": system}, chat.user_message(1)], max_tokens=2)
        return session.last

    plain = PromptSession((model, tok))
    ask(plain, "a1b2c")
    # reuse stops at the hash, before the system prompt proper
    head = tok.apply_chat_template([{"role": "system", "content": "x-anthropic-billing-header: cc_version=2.1.3; cch="}])
    assert ask(plain, "f9e8d").cached_tokens < len(head) < 50
    for normalize in (True, [r"^Request-Id: .*\n"]):
        norm = PromptSession((model, tok), normalize=normalize)
        ask(norm, "a1b2c")
        got = ask(norm, "f9e8d")
        assert got.cached_tokens == got.prompt_tokens - 1


def test_stopping_early_leaves_a_consistent_entry(load_tiny):
    model, tok = load_tiny("llama")
    session = PromptSession((model, tok))
    messages = [SYSTEM, chat.user_message(1)]
    prompt = session.segment(messages)[0]
    full = [r.token for r in stream_generate(model, tok, prompt, max_tokens=6)]
    gen = session.stream_chat(messages, max_tokens=6)
    assert [next(gen).token for _ in range(3)] == full[:3]
    gen.close()
    got = session.cache.fetch(session._key, prompt + full[:4])
    assert (got.reused, got.tier, got.rest) == (len(prompt) + 3, "assistant", full[3:4])
    nxt = next(stream_generate(model, tok, got.rest, max_tokens=1, prompt_cache=got.cache))
    assert nxt.token == full[4]
