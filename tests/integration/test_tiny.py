import hashlib
import os
import types

import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import (
    ArraysCache,
    CacheList,
    KVCache,
    RotatingKVCache,
    make_prompt_cache,
)
from mlx_lm.server import CompletionRequest, ResponseGenerator

from kvstore import tiny

PROMPT = (
    "The old lighthouse stood at the edge of the harbor, and every night its "
    "keeper climbed the narrow stairs to light the lamp for the ships."
)

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
USER = {"role": "user", "content": "What is the capital of France?"}


def _layout(cache):
    return [
        tuple(type(x) for x in c.caches) if isinstance(c, CacheList) else type(c)
        for c in cache
    ]


EXPECTED = {
    "llama": {KVCache},
    "gemma3_text": {RotatingKVCache, KVCache},
    "qwen3_5": {ArraysCache, KVCache},
    "falcon_h1": {(ArraysCache, KVCache)},
    "mamba": {ArraysCache},
}


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_family_loads_and_runs(family, load_tiny):
    model, tokenizer = load_tiny(family)
    assert len(tokenizer) == tiny.VOCAB_SIZE

    cache = make_prompt_cache(model)
    assert set(_layout(cache)) == EXPECTED[family]
    if family == "gemma3_text":
        window = [c.max_size for c in cache if isinstance(c, RotatingKVCache)]
        assert set(window) == {tiny.CONFIGS[family]["sliding_window"]}

    ids = tokenizer.encode(PROMPT)
    assert 30 <= len(ids) <= 60
    logits = model(mx.array([ids]), cache=cache)
    assert logits.shape == (1, len(ids), tiny.VOCAB_SIZE)
    assert mx.isfinite(logits).all().item()
    assert logits.std().item() > 1e-3

    prompt = mx.array(tokenizer.encode(PROMPT))
    out = [t for t, _ in generate_step(prompt, model, max_tokens=8)]
    assert len(out) == 8
    assert all(0 <= t < tiny.VOCAB_SIZE for t in out)


def test_bfloat16(tmp_path):
    model, _ = mlx_lm.load(str(tiny.build("llama", tmp_path / "l", dtype="bfloat16")))
    assert model.model.embed_tokens.weight.dtype == mx.bfloat16
    logits = model(mx.array([[1, 100, 200, 300]]))
    assert logits.dtype == mx.bfloat16
    assert mx.isfinite(logits).all().item()

    # Like mlx_lm.convert, keep what the model's cast_predicate excludes.
    weights = mx.load(str(tiny.build("qwen3_5", tmp_path / "q", dtype="bfloat16")
                          / "model.safetensors"))
    for name, w in weights.items():
        assert w.dtype == (mx.float32 if name.endswith("A_log") else mx.bfloat16)


def _hashes(path):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in path.iterdir()}


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_build_is_deterministic(family, tmp_path):
    a = _hashes(tiny.build(family, tmp_path / "a", seed=3))
    b = _hashes(tiny.build(family, tmp_path / "b", seed=3))
    assert a == b
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(a)
    c = _hashes(tiny.build(family, tmp_path / "c", seed=4))
    assert c["model.safetensors"] != a["model.safetensors"]


def test_model_dir_reuses_and_survives_a_race(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSTORE_TINY_DIR", str(tmp_path))
    real_build = tiny.build
    winner = {}

    def racing_build(family, dest, **kw):
        # Another process finishes first, while this one is still building.
        winner["path"] = tmp_path / os.path.basename(dest).split(".")[1]
        real_build(family, winner["path"], **kw)
        (winner["path"] / "marker").touch()
        return real_build(family, dest, **kw)

    monkeypatch.setattr(tiny, "build", racing_build)
    path = tiny.model_dir("llama", seed=1)
    assert path == winner["path"] and (path / "marker").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]

    monkeypatch.setattr(tiny, "build", None)
    assert tiny.model_dir("llama", seed=1) == path


def test_tokenizer_round_trip(load_tiny):
    _, tokenizer = load_tiny("llama")
    text = "Hello, world!\n  Two spaces, tabs\tand ünïcødé 你好 🙂 <think>x</think>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    detokenizer = tokenizer.detokenizer
    for t in ids:
        detokenizer.add_token(t)
    detokenizer.finalize()
    assert detokenizer.text == text
    assert tokenizer.eos_token_ids == {tokenizer.convert_tokens_to_ids("<|im_end|>")}
    assert tokenizer.bos_token is None


def test_chat_template(load_tiny):
    _, tokenizer = load_tiny("llama")
    assert tokenizer.has_thinking and tokenizer.has_chat_template
    messages = [
        SYSTEM,
        USER,
        {"role": "assistant", "content": "<think>\nFrance.\n</think>\n\nParis."},
        {"role": "user", "content": "And Italy?"},
    ]
    text = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    assert "<|im_start|>assistant\nParis.<|im_end|>\n" in text
    assert "France.\n" not in text
    assert text.endswith("And Italy?<|im_end|>\n<|im_start|>assistant\n<think>\n")

    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert ids[-2:] == [tokenizer.think_start_id, tokenizer.encode("\n")[0]]

    off = tokenizer.apply_chat_template(
        [USER], add_generation_prompt=True, tokenize=False, enable_thinking=False
    )
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")

    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    calls = [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    messages = [
        SYSTEM,
        USER,
        {"role": "assistant", "content": "", "tool_calls": calls},
        {"role": "tool", "content": "sunny"},
    ]
    text = tokenizer.apply_chat_template(
        messages, tools=tools, add_generation_prompt=True, tokenize=False
    )
    assert text.startswith(f"<|im_start|>system\n{SYSTEM['content']}\n\n# Tools")
    assert '{"type": "function", "function": {"name": "get_weather"}}' in text
    call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert f"<|im_start|>assistant\n<tool_call>\n{call}\n</tool_call><|im_end|>" in text
    assert "<tool_response>\nsunny\n</tool_response>" in text
    assert tokenizer.has_tool_calling and tokenizer.tool_call_start == "<tool_call>"


def test_server_segments(load_tiny):
    _, tokenizer = load_tiny("qwen3_5")
    provider = types.SimpleNamespace(
        cli_args=types.SimpleNamespace(chat_template_args={}), processor=None
    )
    request = CompletionRequest(
        request_type="chat",
        prompt="",
        messages=[dict(SYSTEM), dict(USER)],
        tools=None,
        role_mapping=None,
    )
    prompt, segments, kinds, state, _ = ResponseGenerator._tokenize(
        types.SimpleNamespace(model_provider=provider),
        tokenizer,
        request,
        types.SimpleNamespace(chat_template_kwargs=None),
    )
    assert kinds == ["system", "user", "assistant"]
    assert state == "reasoning"
    assert sum(segments, []) == prompt
    system, user, tail = (tokenizer.decode(s) for s in segments)
    assert system.startswith("<|im_start|>system\nYou are a helpful assistant.")
    assert user.startswith(USER["content"])
    assert tail == "<think>\n"
