"""Warming: prefill system prompts ahead of deployment.

``system_segment`` cuts a chat exactly where mlx_lm.server cuts its system
segment (``ResponseGenerator._tokenize``): the tokens the rendered system
messages share with a full prompt. ``warm`` prefills that segment and stores
it with tier ``system`` under the fingerprint the server resolves its model
key to, so the first real request after deployment hits. This module never
changes what mlx-lm renders or computes; it only reproduces the cut.
"""

import logging
import time

log = logging.getLogger("kvstore")

# first user messages used to find the cut: the segment ends where any
# plausible first message would start (the minimum over these)
PROBES = ("x", "Hello, how are you?", " ", "1", "\n", "你好")


def system_messages(messages):
    """The leading system messages of a chat (the server's system segment)."""
    out = []
    for m in messages:
        if m.get("role") != "system":
            break
        out.append(m)
    return out


def system_segment(tokenizer, messages, tools=None, chat_template_args=None):
    """Tokens of the system segment mlx_lm.server keys for ``messages``.

    ``messages`` starts with one or more system messages (anything after them
    is ignored). Raises ``InvalidInput`` if there is no system message or
    the template gives no stable cut.
    """
    from .errors import InvalidInput

    system = system_messages(messages)
    if not system:
        raise InvalidInput("a warm prompt needs at least one leading system message")
    kwargs = dict(tools=tools, tokenize=True, **(chat_template_args or {}))
    sys_tokens = list(tokenizer.apply_chat_template(
        system + [{"role": "user", "content": ""}], add_generation_prompt=False, **kwargs))
    cuts = []
    for probe in PROBES:
        prompt = list(tokenizer.apply_chat_template(
            system + [{"role": "user", "content": probe}], add_generation_prompt=True, **kwargs))
        cut = next((i for i, (a, b) in enumerate(zip(sys_tokens, prompt)) if a != b), 0)
        if 0 < cut < len(prompt):
            cuts.append((cut, prompt))
    if not cuts:
        raise InvalidInput("the chat template gives no system segment for these messages")
    cut, prompt = min(cuts, key=lambda c: c[0])
    if len({c for c, _ in cuts}) > 1:
        log.warning("system segment cut varies with the first user message (%s); using %d tokens",
                    sorted({c for c, _ in cuts}), cut)
    return prompt[:cut]


def prefill(model, tokens, step=2048, progress=None):
    """Prefill ``tokens`` into a fresh prompt cache in chunks of ``step``."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    for start in range(0, len(tokens), step):
        chunk = tokens[start : start + step]
        model(mx.array(chunk)[None], cache=cache)
        mx.eval([c.state for c in cache])
        if progress is not None:
            progress(len(chunk))
    return cache


def warm(store, model_path, conversations, *, adapter_path=None, tools=None, chat_template_args=None,
         prefill_step_size=2048, progress=False, **cache_options):
    """Prefill and store the system segment of each conversation.

    Args:
        store: a ``SnapshotStore``.
        model_path: the model directory the server is started with.
        conversations: lists of chat messages, each starting with its system message(s).
        adapter_path: the server's ``--adapter-path``, if any (part of the fingerprint).
        tools, chat_template_args: as the server renders requests with them.
        progress: show a progress bar per prompt on stderr.
        **cache_options: the server's ``kv_bits`` / ``kv_group_size`` /
            ``quantized_kv_start`` / ``max_kv_size`` (part of the fingerprint).

    Returns a list of dicts: key (or None if the store refused it), tokens,
    seconds spent prefilling, and whether it was already stored.
    """
    import mlx_lm

    from .fingerprint import fingerprint

    model, tokenizer = mlx_lm.load(str(model_path), adapter_path=adapter_path)
    fp = fingerprint(model_path, adapter_path=adapter_path, digests=store.file_digests, **cache_options)
    out = []
    for messages in conversations:
        tokens = system_segment(tokenizer, messages, tools=tools, chat_template_args=chat_template_args)
        # already stored at exactly this length: nothing to prefill
        hit = store.lookup(fp, tokens + [0])
        if hit is not None and (hit.tokens, hit.kind) == (len(tokens), "shorter"):
            out.append({"key": hit.key, "tokens": len(tokens), "seconds": 0.0, "existing": True})
            continue
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(tokens), unit="tok", desc="prefill", leave=False)
        t0 = time.perf_counter()
        try:
            cache = prefill(model, tokens, prefill_step_size, bar.update if bar else None)
        finally:
            if bar:
                bar.close()
        seconds = time.perf_counter() - t0
        key = store.put(fp, tokens, cache, tier="system")
        out.append({"key": key, "tokens": len(tokens), "seconds": seconds, "existing": False})
    return out
