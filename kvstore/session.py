"""PromptSession: chat generation with mlx-lm over a TieredPromptCache.

This module owns what a chat call does around mlx-lm's generation: the chat
template, the split of the prompt into the segments mlx_lm.server uses
(system prompt, conversation up to the think-start token, the tail), the
fetch of the nearest snapshot, the prefill of only the rest with checkpoints
at segment ends in their tiers, the final insert, and the per-call report.
It also owns message normalisation: volatile per-request header lines that
would break prefix matches are removed from the text before tokenisation.

It never changes how mlx-lm computes: prefill and decoding are mlx-lm's
``generate_step`` and ``stream_generate``. It never inserts a cache it goes
on writing to (the cache copies on insert), and never inserts a cache whose
token count it cannot vouch for.
"""

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import generate_step, stream_generate
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler

from .codec import cache_tokens
from .fingerprint import fingerprint as make_fingerprint
from .resume import checkpoint_reply, initial_state, needs_resume_points, reply_end, reply_message, resume_segments
from .tiered import TieredPromptCache

log = logging.getLogger("kvstore")

# lines clients add to system prompts that change on every request: Claude
# Code's "x-anthropic-billing-header: cc_version=...; cch=HASH" and its kin,
# request / trace / correlation id headers, and "name: <timestamp to the second>"
VOLATILE_PATTERNS = (
    r"^x-anthropic-[A-Za-z0-9-]+:[^\n]*(?:\n|$)",
    r"(?i)^(?:x-)?(?:request|trace|correlation)[-_ ]?id:[^\n]*(?:\n|$)",
    r"^[A-Za-z][A-Za-z0-9 _-]{0,40}:[ \t]*\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}[^\n]*(?:\n|$)",
)


def normalize_messages(messages, patterns=VOLATILE_PATTERNS, roles=("system",)):
    """Return ``messages`` with every line matching ``patterns`` removed.

    Applies to messages whose role is in ``roles``; content may be a string
    or a list of text parts (``{"type": "text", "text": ...}``); a part left
    empty is dropped. Patterns are regular expressions matched per line
    (``re.MULTILINE``). The input is not modified.

    This changes what the model sees: use it only for lines that carry no
    meaning for the model (billing or tracing headers).
    """
    regs = [re.compile(p, re.MULTILINE) if isinstance(p, str) else p for p in patterns]
    if not regs:
        return messages

    def clean(text):
        for r in regs:
            text = r.sub("", text)
        return text

    out = []
    for m in messages:
        if m.get("role") not in roles:
            out.append(m)
            continue
        m = dict(m)
        content = m.get("content")
        if isinstance(content, str):
            m["content"] = clean(content)
        elif isinstance(content, list):
            parts = []
            for p in content:
                if isinstance(p, dict) and isinstance(p.get("text"), str):
                    text = clean(p["text"])
                    if not text and p["text"]:
                        continue
                    p = {**p, "text": text}
                parts.append(p)
            m["content"] = parts
        out.append(m)
    return out


def _flatten(message):
    """Text parts joined into one string, as mlx_lm.server does before templating."""
    content = message.get("content")
    if isinstance(content, list):
        if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
            raise ValueError("Only 'text' content type is supported.")
        return {**message, "content": "".join(p["text"] for p in content)}
    if content is None:
        return {**message, "content": ""}
    return message


def segment_prompt(tokenizer, messages, tools=None, chat_template_args=None):
    """Tokenise a chat and split it as mlx_lm.server's ``ResponseGenerator._tokenize``.

    Returns ``(prompt, segments, segment_types)``: for a chat ending in a user
    message, the system prompt segment (``"system"``), the conversation up to
    the think-start token (``"user"``) and the tail (``"assistant"``);
    otherwise one ``"assistant"`` segment.
    """
    messages = [_flatten(m) for m in messages]
    if not tokenizer.has_chat_template:
        from mlx_lm.server import convert_chat

        prompt = tokenizer.encode(convert_chat(messages, None))
        return prompt, [prompt], ["assistant"]
    kwargs = dict(tools=tools, tokenize=True, **(chat_template_args or {}))
    prompt = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs))
    if not messages or messages[-1]["role"] != "user":
        return prompt, [prompt], ["assistant"]
    segments, types = [], []
    num_system = 0
    for m in messages:
        if m["role"] != "system":
            break
        num_system += 1
    sys_end = 0
    if num_system > 0:
        sys_tokens = tokenizer.apply_chat_template(
            messages[:num_system] + [{"role": "user", "content": ""}], add_generation_prompt=False, **kwargs
        )
        for i, (a, b) in enumerate(zip(sys_tokens, prompt)):
            if a != b:
                sys_end = i
                break
        if 0 < sys_end < len(prompt):
            segments.append(prompt[:sys_end])
            types.append("system")
    tail_start = len(prompt)
    if tokenizer.has_thinking:
        think_start = tokenizer.rfind_think_start(prompt, start=tail_start - 11)
        if think_start >= 0:
            tail_start = think_start
    if sys_end < tail_start:
        segments.append(prompt[sys_end:tail_start])
        types.append("user")
    if tail_start < len(prompt):
        segments.append(prompt[tail_start:])
        types.append("assistant")
    if not segments:
        segments, types = [prompt], ["assistant"]
    return prompt, segments, types



def skip_cached(segments, types, n):
    """Drop the first ``n`` tokens from ``segments`` (and emptied segments'
    ``types``) in place, as mlx_lm.server does after a cache hit."""
    while n > 0:
        if n >= len(segments[0]):
            n -= len(segments.pop(0))
            types.pop(0)
        else:
            segments[0] = segments[0][n:]
            break

@dataclass
class CallInfo:
    """What one ``stream_chat`` call reused and computed.

    ``cached_tokens`` of ``prompt_tokens`` came from ``source`` (``"memory"``,
    ``"disk"`` or ``None``) out of an entry of ``tier``; ``prefilled`` were
    computed; ``checkpoints`` are the ``(tokens, tier)`` inserted at segment
    ends; ``generated`` counts the tokens produced so far. After the reply,
    ``reply`` is the assistant message as mlx_lm.server would return it
    (``content``, ``reasoning``, ``tool_calls``): sent back as the next
    request's history, the chat resumes from ``resume_tokens``, where a
    checkpoint was placed (caches that cannot be trimmed only).
    """

    prompt_tokens: int
    cached_tokens: int
    source: str | None
    tier: str | None
    kind: str | None
    prefilled: int
    checkpoints: list = field(default_factory=list)
    generated: int = 0
    fetch_seconds: float = 0.0
    prefill_seconds: float = 0.0
    reply: dict | None = None
    resume_tokens: int | None = None
    resume_seconds: float = 0.0

    @property
    def hit_share(self):
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class _MemoryOnly:
    """A model key with no fingerprint: its caches never go to disk."""

    def __repr__(self):
        return f"<memory-only model {id(self):#x}>"


class PromptSession:
    """Chat with an mlx-lm model, reusing prompt caches from memory and disk.

    Args:
        model: a local model directory (loaded with ``mlx_lm.load``) or an
            already-loaded ``(model, tokenizer)`` pair.
        store: a store directory or ``SnapshotStore`` (a ``TieredPromptCache``
            is made and owned), a ``TieredPromptCache`` (shared, not closed by
            the session), or ``None`` for a memory-only cache.
        model_path: with a loaded pair, the directory it came from, so its
            caches can be fingerprinted and persisted; or pass ``fingerprint``.
        adapter_path: a LoRA adapter (loaded with the model, part of the fingerprint).
        max_size, max_bytes, persist: the memory tier and persisted tiers of an owned cache.
        normalize: ``False``, ``True`` (remove ``VOLATILE_PATTERNS`` lines from
            system messages) or extra patterns to remove as well.
        chat_template_args: keyword arguments for ``apply_chat_template``.
        prefill_step_size: tokens per prefill step (as mlx-lm).
        remote: a Redis URL (or ``kvstore.remote.RemoteTier``) behind the local store;
            ``remote_options`` are ``RemoteTier`` keyword arguments.
        **cache_options: ``kv_bits``, ``kv_group_size``, ``quantized_kv_start``,
            ``max_kv_size``, passed to mlx-lm and part of the fingerprint.

    Not thread-safe: one call at a time.
    """

    def __init__(self, model, store=None, *, model_path=None, adapter_path=None, fingerprint=None,
                 max_size=10, max_bytes=None, persist=("system", "user"), normalize=False,
                 chat_template_args=None, prefill_step_size=2048, remote=None, remote_options=None,
                 **cache_options):
        if isinstance(model, (str, Path)):
            import mlx_lm

            model_path = model
            self.model, self.tokenizer = mlx_lm.load(str(model), adapter_path=adapter_path)
        else:
            self.model, self.tokenizer = model
        self.cache_options = cache_options
        self._owns_cache = not isinstance(store, TieredPromptCache)
        if self._owns_cache:
            store = TieredPromptCache(store, max_size, max_bytes, persist=persist, remote=remote,
                                      remote_options=remote_options, **cache_options)
        elif remote is not None:
            from .remote import attach

            attach(store.store, remote, **(remote_options or {}))
        self.cache = store
        if fingerprint is None and model_path is not None:
            fingerprint = make_fingerprint(model_path, adapter_path=adapter_path,
                                           digests=getattr(store.store, "file_digests", None), **cache_options)
        if fingerprint is None:
            log.info("kvstore: no model path or fingerprint given; caches stay in memory")
        self.fingerprint = fingerprint
        self._key = fingerprint if fingerprint is not None else _MemoryOnly()
        if normalize is True:
            self.patterns = VOLATILE_PATTERNS
        elif normalize:
            self.patterns = VOLATILE_PATTERNS + tuple(normalize)
        else:
            self.patterns = ()
        self.chat_template_args = chat_template_args
        self.prefill_step_size = prefill_step_size
        self.last = None

    def _gen_kwargs(self):
        opts = self.cache_options
        kw = {"prefill_step_size": self.prefill_step_size}
        for name in ("kv_bits", "kv_group_size", "quantized_kv_start"):
            if opts.get(name) is not None:
                kw[name] = opts[name]
        return kw

    def segment(self, messages, tools=None):
        """``(prompt, segments, segment_types)`` of a chat after normalisation."""
        if self.patterns:
            messages = normalize_messages(messages, self.patterns)
        return segment_prompt(self.tokenizer, messages, tools, self.chat_template_args)

    def stream_chat(self, messages, *, max_tokens=256, tools=None, sampler=None, logits_processors=None,
                    seed=None, **sampler_args):
        """Generate a reply to ``messages``, yielding mlx-lm ``GenerationResponse`` chunks.

        ``sampler_args`` go to ``mlx_lm.sample_utils.make_sampler`` (``temp``,
        ``top_p``, ``min_p``, ``top_k``, ...) unless ``sampler`` is given.
        ``self.last`` holds the ``CallInfo`` of the call from the first chunk on.
        """
        model, tokenizer, cache_store = self.model, self.tokenizer, self.cache
        messages = list(messages)  # the caller may append the reply before the last chunk is consumed
        prompt, segments, types = self.segment(messages, tools)
        if seed is not None:
            mx.random.seed(seed)
        if sampler is None:
            sampler = make_sampler(**sampler_args)
        elif sampler_args:
            raise TypeError("pass either sampler or sampler arguments")
        t0 = time.perf_counter()
        got = cache_store.fetch(self._key, prompt)
        info = CallInfo(len(prompt), got.reused, got.source, got.tier, got.kind, len(got.rest),
                        fetch_seconds=time.perf_counter() - t0)
        self.last = info
        cache = got.cache
        if cache is None:
            cache = make_prompt_cache(model, max_kv_size=self.cache_options.get("max_kv_size"))
        skip_cached(segments, types, got.reused)
        resumable = needs_resume_points(cache, len(prompt))
        if resumable:
            resume_segments(segments, types)
        kw = self._gen_kwargs()
        pos = got.reused
        t0 = time.perf_counter()
        for seg, tier in zip(segments[:-1], types[:-1]):
            for _ in generate_step(mx.array(seg), model, prompt_cache=cache, max_tokens=0, **kw):
                pass
            pos += len(seg)
            mx.eval([c.state for c in cache])
            if self._holds(cache, pos):
                cache_store.insert_cache(self._key, prompt[:pos], cache, cache_type=tier)
                info.checkpoints.append((pos, tier))
        info.prefill_seconds = time.perf_counter() - t0
        out, whole = [], False
        try:
            for resp in stream_generate(model, tokenizer, mx.array(segments[-1]), max_tokens=max_tokens,
                                        sampler=sampler, logits_processors=logits_processors,
                                        prompt_cache=cache, **kw):
                out.append(resp.token)
                info.generated = len(out)
                yield resp
            whole = True
        except GeneratorExit:
            whole = True  # the caller stopped reading; the cache is consistent
            raise
        finally:
            # every yielded token has been fed to the cache (mlx-lm steps before it yields)
            if whole and out and self._holds(cache, len(prompt) + len(out)):
                cache_store.insert_cache(self._key, prompt + out, cache, cache_type="assistant")
                try:
                    self._resume_point(info, messages, tools, prompt, out, cache, resumable)
                except Exception as exc:  # the reply is complete; only its resume point is lost
                    log.warning("kvstore: no resume point for a reply: %s: %s", type(exc).__name__, exc)

    def _resume_point(self, info, messages, tools, prompt, out, cache, resumable):
        """The reply as it comes back, and (non-trimmable caches) a checkpoint at its end."""
        t0 = time.perf_counter()
        stopped = out[-1] in self.tokenizer.eos_token_ids
        info.reply = reply_message(self.tokenizer, out, initial_state(self.tokenizer, prompt), tools, stopped)
        if not resumable or self.cache_options.get("kv_bits") is not None:
            return
        if self.patterns:
            messages = normalize_messages(messages, self.patterns)
        target = reply_end(self.tokenizer, [_flatten(m) for m in messages], info.reply, tools,
                           self.chat_template_args)
        if target and checkpoint_reply(self.cache, self._key, self.model, prompt, out, cache, target,
                                       self.prefill_step_size) is not None:
            info.resume_tokens = len(target)
            info.checkpoints.append((len(target), "assistant"))
        info.resume_seconds = time.perf_counter() - t0

    @staticmethod
    def _holds(cache, n):
        held = cache_tokens(cache)
        return held is None or held == n

    def chat(self, messages, **kwargs):
        """Generate a whole reply; returns ``(text, token ids)``."""
        text, tokens = [], []
        for resp in self.stream_chat(messages, **kwargs):
            text.append(resp.text)
            tokens.append(resp.token)
        return "".join(text), tokens

    def close(self, timeout=None):
        """Flush and close the cache if the session made it."""
        if self._owns_cache:
            self.cache.close(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
