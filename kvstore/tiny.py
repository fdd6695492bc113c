"""Tiny offline models for tests and demos.

This module owns the random-weight model directories that ``mlx_lm.load``
opens like real checkpoints: one per supported cache layout (plain KV,
sliding window, gated delta net hybrid, mamba + attention, pure mamba), a
small byte-level BPE tokenizer with think tokens and a ChatML chat template.
Builds are deterministic: the same arguments give byte-identical files.
"""

import copy
import hashlib
import importlib
import json
import os
import random
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

FAMILIES = ("llama", "gemma3_text", "qwen3_5", "falcon_h1", "mamba")

VOCAB_SIZE = 512
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
ADDED_TOKENS = ("<think>", "</think>", "<tool_call>", "</tool_call>")
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

_ATTN = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}

CONFIGS = {
    "llama": {
        **_ATTN,
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
    },
    "gemma3_text": {
        **_ATTN,
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        "num_hidden_layers": 4,
        "rms_norm_eps": 1e-6,
        "query_pre_attn_scalar": 16,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "sliding_window": 16,
        "sliding_window_pattern": 2,
    },
    "qwen3_5": {
        **_ATTN,
        "model_type": "qwen3_5_text",
        "num_hidden_layers": 4,
        "full_attention_interval": 2,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_conv_kernel_dim": 4,
        "rms_norm_eps": 1e-6,
        "attention_bias": False,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [1, 1, 0],
            "mrope_interleaved": True,
        },
    },
    "falcon_h1": {
        **_ATTN,
        "model_type": "falcon_h1",
        "architectures": ["FalconH1ForCausalLM"],
        "num_hidden_layers": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "mamba_d_ssm": 64,
        "mamba_n_heads": 4,
        "mamba_d_head": 16,
        "mamba_d_state": 16,
        "mamba_n_groups": 1,
        "mamba_d_conv": 4,
        "mamba_chunk_size": 16,
        "mamba_conv_bias": True,
        "mamba_proj_bias": False,
        "mamba_rms_norm": False,
    },
    "mamba": {
        "model_type": "mamba",
        "architectures": ["MambaForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "state_size": 16,
        "num_hidden_layers": 2,
        "conv_kernel": 4,
        "use_bias": False,
        "use_conv_bias": True,
        "time_step_rank": 4,
        "tie_word_embeddings": False,
    },
}

_PARAGRAPHS = """\
The old lighthouse stood at the edge of the harbor, and every night its keeper
climbed the narrow stairs to light the lamp. Ships that passed the rocks in the
dark would see the beam sweep across the water and know that they were close to
home. In the morning the keeper wrote the weather in a small book: the wind, the
waves, the color of the sky, and the names of the boats that came back.

A cache is a place where you keep things you will need again soon. When a
computer reads the same data many times, it is faster to keep a copy nearby than
to fetch it from far away each time. Language models use a key and value cache
so that the tokens of a long prompt are processed once, and the next token only
has to look back at what was already stored.

Please write a short answer. What is the capital of France? The capital of
France is Paris. How many days are in a week? There are seven days in a week.
Can you explain why the sky is blue? Sunlight is scattered by the air, and blue
light is scattered more than red light, so the sky looks blue during the day.

You are a helpful assistant. The user asks a question and the assistant thinks
about it step by step before giving the final answer. Let me think about this.
First, we need to understand the problem. Then we check each case, and at the
end we write the result in a clear and friendly way.

def add(a, b):
    return a + b

for i in range(10):
    print(i, add(i, 2))

{"name": "get_weather", "arguments": {"city": "London", "unit": "celsius"}}
The numbers 0 1 2 3 4 5 6 7 8 9 10 12 16 32 64 100 128 256 512 1024 2048.
"""

_WORDS = (
    "the a an this that some every each one two three many few small large old "
    "new red blue green quick slow bright dark happy quiet cat dog bird fish "
    "tree river city house road book letter story system user assistant model "
    "answer question idea plan time day night morning water light sound word "
    "people friend teacher student computer program file data cache token "
    "runs reads writes finds keeps sees makes takes gives tells asks helps "
    "thinks learns builds opens closes moves starts stops waits and but or so "
    "because when while if then with without over under near far into from "
    "about after before again always never often here there today tomorrow"
).split()

CHAT_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' + (tool | tojson) }}
    {%- endfor %}
    {{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_user=-1) %}
{%- for message in messages %}
    {%- if message.role == 'user' %}
        {%- set ns.last_user = loop.index0 %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set reasoning = message.reasoning_content if message.reasoning_content is string
            else (message.reasoning if message.reasoning is string else '') %}
        {%- if '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].split('<think>')[-1] %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_user and reasoning %}
            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content }}
        {%- else %}
            {{- '<|im_start|>assistant\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {%- if not loop.first or content %}
                    {{- '\\n' }}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- else %}
        {{- '<think>\\n' }}
    {%- endif %}
{%- endif %}
"""


def _corpus():
    rng = random.Random(0)

    def sentence():
        s = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 14)))
        return s[0].upper() + s[1:] + rng.choice(".?!")

    lines = [_PARAGRAPHS] * 4
    lines += [sentence() + "\n" for _ in range(300)]
    for _ in range(60):
        for role in ("system", "user", "assistant"):
            lines.append(f"{role}\n{sentence()}\n")
    return "".join(lines)


@lru_cache(maxsize=1)
def tokenizer_json() -> str:
    """The tokenizer.json text: a byte-level BPE of ``VOCAB_SIZE`` tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers import trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(ADDED_TOKENS),
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus().splitlines(keepends=True), trainer)
    tok.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS]
    )
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    return json.dumps(json.loads(tok.to_str()), indent=2, ensure_ascii=False) + "\n"


def _token_id(token):
    for t in json.loads(tokenizer_json())["added_tokens"]:
        if t["content"] == token:
            return t["id"]
    raise KeyError(token)


def _tokenizer_files():
    added = json.loads(tokenizer_json())["added_tokens"]
    tokenizer_config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added
        },
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": 4096,
        "pad_token": PAD_TOKEN,
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }
    special_tokens_map = {"eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    return {
        "tokenizer.json": tokenizer_json(),
        "tokenizer_config.json": _dumps(tokenizer_config),
        "special_tokens_map.json": _dumps(special_tokens_map),
        "chat_template.jinja": CHAT_TEMPLATE,
    }


def _dumps(obj):
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def config(family: str, **config_overrides) -> dict:
    """The config.json contents of a tiny ``family`` model.

    Overrides update the text model's keys (the nested ``text_config`` for
    ``qwen3_5``).
    """
    if family not in CONFIGS:
        raise ValueError(f"Unknown family {family!r}, expected one of {FAMILIES}")
    text = copy.deepcopy(CONFIGS[family])
    text.update(
        vocab_size=VOCAB_SIZE,
        eos_token_id=_token_id(EOS_TOKEN),
        pad_token_id=_token_id(PAD_TOKEN),
        bos_token_id=None,
    )
    text.update(copy.deepcopy(config_overrides))
    if family != "qwen3_5":
        return text
    return {
        "model_type": "qwen3_5",
        "architectures": ["Qwen3_5ForConditionalGeneration"],
        "eos_token_id": text["eos_token_id"],
        "pad_token_id": text["pad_token_id"],
        "tie_word_embeddings": text["tie_word_embeddings"],
        "text_config": text,
    }


def _init_weights(model, family, seed, dtype):
    rng = np.random.default_rng(seed)
    cast = getattr(model, "cast_predicate", None) or (lambda _: True)
    weights = {}
    for name, p in sorted(tree_flatten(model.parameters())):
        if name.endswith("weight") and p.ndim >= 2:
            p = mx.array(rng.normal(0.0, 0.02, p.shape).astype(np.float32))
        elif name.endswith("bias"):
            p = mx.zeros(p.shape)
        elif name.endswith("A_log"):
            p = mx.array(np.log(rng.uniform(1.0, 16.0, p.shape)).astype(np.float32))
        elif family == "gemma3_text" and name.endswith("norm.weight"):
            p = mx.zeros(p.shape)
        if mx.issubdtype(p.dtype, mx.floating) and cast(name):
            p = p.astype(dtype)
        weights[name] = p
    return weights


def build(
    family: str, dest, *, seed: int = 0, dtype: str = "float32", **config_overrides
) -> Path:
    """Write a tiny random ``family`` model into ``dest`` and return its path.

    The directory holds config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json, special_tokens_map.json and chat_template.jinja.
    Weights are normal(0, 0.02) from ``seed`` with unit norms, stored as
    ``dtype``. The same arguments give byte-identical files.
    """
    cfg = config(family, **config_overrides)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)

    arch = importlib.import_module(f"mlx_lm.models.{cfg['model_type']}")
    model = arch.Model(arch.ModelArgs.from_dict(cfg))
    weights = _init_weights(model, family, seed, getattr(mx, dtype))
    mx.eval(weights)
    mx.save_safetensors(
        str(dest / "model.safetensors"), weights, metadata={"format": "mlx"}
    )

    files = {"config.json": _dumps(cfg), **_tokenizer_files()}
    for name, text in files.items():
        (dest / name).write_text(text, encoding="utf-8")
    return dest


def _stamp():
    import mlx_lm

    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(f"{mx.__version__} {mlx_lm.__version__}".encode())
    return h.hexdigest()


def cache_root() -> Path:
    """Where ``model_dir`` keeps its builds: ``$KVSTORE_TINY_DIR`` or the
    user cache dir."""
    if root := os.environ.get("KVSTORE_TINY_DIR"):
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    # beside, not inside, the default store folder (~/.cache/kvstore)
    return Path(base) / "kvstore-tiny"


def model_dir(family: str, **kw) -> Path:
    """Path of a tiny ``family`` model built with ``build(family, ..., **kw)``.

    Builds once per argument set and module version into ``cache_root()``
    and reuses it. Concurrent callers are safe: each builds into a temporary
    directory and renames it into place, and a loser of the race uses the
    winner's copy.
    """
    if family not in FAMILIES:
        raise ValueError(f"Unknown family {family!r}, expected one of {FAMILIES}")
    kw = {"seed": 0, "dtype": "float32", **kw}
    key = json.dumps([family, kw, _stamp()], sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    root = cache_root()
    path = root / f"{family}-{digest}"
    return build_once(path, lambda tmp: build(family, tmp, **kw))


def build_once(path, make):
    """Build a directory at ``path`` once: ``make(tmp)`` fills a temp folder
    beside it, renamed into place; a concurrent winner's copy is used."""
    path = Path(path)
    if path.is_dir():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        make(tmp)
        os.rename(tmp, path)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
