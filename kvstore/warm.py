"""Warming: prefill system prompts ahead of deployment.

``system_segment`` cuts a chat exactly where mlx_lm.server cuts its system
segment (``ResponseGenerator._tokenize``): the tokens the rendered system
messages share with a full prompt. ``warm`` prefills that segment and stores
it with tier ``system`` under the fingerprint the server resolves its model
key to, so the first real request after deployment hits. This module never
changes what mlx-lm renders or computes; it only reproduces the cut.
"""

import contextlib
import logging
import signal
import threading
import time
from pathlib import Path

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


def check_model_path(model_path):
    """``InvalidInput`` unless ``model_path`` is a directory or looks like a Hugging Face repo id."""
    from .errors import InvalidInput

    path = Path(str(model_path)).expanduser()
    if path.exists() and not path.is_dir():
        raise InvalidInput(f"{model_path} is a file, not a model directory")
    if not path.exists() and (str(model_path).startswith(("/", ".", "~")) or str(model_path).count("/") != 1):
        raise InvalidInput(f"no model directory at {model_path} (nor a Hugging Face repo id)")


def load_model(model_path, adapter_path=None):
    """``mlx_lm.load`` with one clear ``InvalidInput`` for a model that is not there or not loadable."""
    import mlx_lm

    from .errors import InvalidInput

    check_model_path(model_path)
    try:
        return mlx_lm.load(str(model_path), adapter_path=adapter_path)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise InvalidInput(f"cannot load the model {model_path}: {type(exc).__name__}: {first}") from exc


@contextlib.contextmanager
def deferred_interrupts():
    """Hold SIGINT and SIGTERM until the block ends, then raise ``KeyboardInterrupt``.

    Around a store write, so an interrupt never leaves a half-written blob
    in the store's temp folder. Only in the main thread (where Python runs
    signal handlers); elsewhere the block runs as is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    old = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum))
           for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if caught:
        raise KeyboardInterrupt


def warm(store, model_path, conversations, *, adapter_path=None, tools=None, chat_template_args=None,
         prefill_step_size=2048, progress=False, on_result=None, tenant=None, **cache_options):
    """Prefill and store the system segment of each conversation.

    Args:
        store: a ``SnapshotStore``.
        model_path: the model directory the server is started with.
        conversations: lists of chat messages, each starting with its system message(s).
        adapter_path: the server's ``--adapter-path``, if any (part of the fingerprint).
        tools, chat_template_args: as the server renders requests with them.
        progress: show progress bars (prompts, and tokens of the current one) on stderr.
        on_result: called with each result as its prompt finishes.
        tenant: store in this tenant's namespace (as ``SnapshotStore.put``).
        **cache_options: the server's ``kv_bits`` / ``kv_group_size`` /
            ``quantized_kv_start`` / ``max_kv_size`` (part of the fingerprint).

    Returns a list of dicts: key (or None if the store refused it), tokens,
    seconds spent prefilling, and whether it was already stored. Raises
    ``InvalidInput`` for a model that cannot be loaded; ``KeyboardInterrupt``
    stops between store writes, never inside one (what ``on_result`` was
    given is stored).
    """
    from .fingerprint import fingerprint

    model, tokenizer = load_model(model_path, adapter_path)
    fp = fingerprint(model_path, adapter_path=adapter_path, digests=store.file_digests, **cache_options)
    out = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(conversations), unit="prompt", desc="warm", dynamic_ncols=True)
    try:
        for messages in conversations:
            result = _warm_one(store, model, tokenizer, fp, messages, tools, chat_template_args,
                               prefill_step_size, progress, tenant)
            out.append(result)
            if bar is not None:
                bar.update(1)
            if on_result is not None:
                on_result(result)
    finally:
        if bar is not None:
            bar.close()
    return out


def _warm_one(store, model, tokenizer, fp, messages, tools, chat_template_args, step, progress, tenant):
    tokens = system_segment(tokenizer, messages, tools=tools, chat_template_args=chat_template_args)
    # already stored at exactly this length: nothing to prefill
    hit = store.lookup(fp, tokens + [0], tenant=tenant)
    if hit is not None and (hit.tokens, hit.kind) == (len(tokens), "shorter"):
        return {"key": hit.key, "tokens": len(tokens), "seconds": 0.0, "existing": True}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tokens), unit="tok", desc="prefill", leave=False, position=1, dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        cache = prefill(model, tokens, step, bar.update if bar else None)
    finally:
        if bar:
            bar.close()
    seconds = time.perf_counter() - t0
    with deferred_interrupts():
        key = store.put(fp, tokens, cache, tier="system", tenant=tenant)
    return {"key": key, "tokens": len(tokens), "seconds": seconds, "existing": False}
