"""mlx_lm.server's ResponseGenerator with resume points and message normalisation.

mlx_lm.server tokenises chat requests and places its prompt-cache
checkpoints in ``ResponseGenerator``: segment ends during the prefill (its
batched path also ends the prefill one token short of the prompt, in tier
``assistant``) and the final cache after generation. This module subclasses
it to add, on that same thread:

- message normalisation (``kvstore serve --normalize``): volatile header
  lines are removed from system messages before the chat template runs;
- a resume point after each chat reply, for caches that cannot be trimmed:
  a checkpoint at the last token of the reply as the chat template will
  render it in the next request (``kvstore.resume``);
- one prefill pass where mlx_lm.server makes two, for caches that can be
  trimmed: its user segment and the short generation-prompt tail after it
  (``<think>`` and the like) become one segment, so the checkpoint of the
  user turn is the one mlx_lm.server already places one token short of the
  prompt (tier ``user``). A trimmed copy of it serves every shorter prefix, so
  nothing is lost, and the request saves a forward pass and a checkpoint.

- the checkpoints of a prefill written after the first token: the request
  cache defers their evaluation (``kvstore.pending``), and the generation
  thread queues them right after it hands the request's first token to the
  HTTP thread (or when the request ends without one);
- while no request is waiting, the caches preloading or a promotion has read
  enter the memory tier (``TieredPromptCache.settle``), so the first request
  after a start does not put them there itself.

It owns nothing of the HTTP layer. It never changes a response: the resume
point is made after the reply has been handed to the client, and any fault in
making it is logged and skipped. ``check()`` verifies, at server start, that
the mlx_lm.server names it relies on exist.
"""

import dataclasses
import inspect
import logging
import re

import mlx_lm.server as server

from .resume import checkpoint_reply, needs_resume_points, reply_end, reply_message, trimmable
from .session import VOLATILE_PATTERNS, _flatten, normalize_messages

log = logging.getLogger("kvstore")

PENDING = 64  # chat prompts waiting for their reply's resume point


def check():
    """Raise ``RuntimeError`` naming what is missing if mlx_lm.server changed shape."""
    missing = []
    base = getattr(server, "ResponseGenerator", None)
    if base is None:
        missing.append("mlx_lm.server.ResponseGenerator")
    else:
        for name in ("_tokenize", "_next_request", "_generate", "_serve_single", "cli_args"):
            if not hasattr(base, name):
                missing.append(f"ResponseGenerator.{name}")
        if list(inspect.signature(base.__init__).parameters)[1:3] != ["model_provider", "prompt_cache"]:
            missing.append("ResponseGenerator(model_provider, prompt_cache)")
        tokenize = getattr(base, "_tokenize", None)
        if tokenize is not None and list(inspect.signature(tokenize).parameters) != ["self", "tokenizer", "request",
                                                                                     "args"]:
            missing.append("ResponseGenerator._tokenize(tokenizer, request, args)")
    for name in ("ToolCallFormatter", "CompletionRequest", "GenerationContext", "Response", "run"):
        if not hasattr(server, name):
            missing.append(f"mlx_lm.server.{name}")
    request = getattr(server, "CompletionRequest", None)
    if request is not None and "messages" not in {f.name for f in dataclasses.fields(request)}:
        missing.append("CompletionRequest.messages")
    if missing:
        raise RuntimeError("this mlx-lm version does not have what kvstore serve hooks into: "
                           + ", ".join(missing))


def patterns(normalize, extra=()):
    """The compiled patterns for ``--normalize`` and ``--normalize-pattern``; raises ``re.error``."""
    chosen = (VOLATILE_PATTERNS if normalize else ()) + tuple(extra or ())
    return tuple(re.compile(p, re.MULTILINE) for p in chosen)


class _Pending:
    __slots__ = ("prompt", "messages", "tools", "template_args", "state")

    def __init__(self, prompt, messages, tools, template_args, state):
        self.prompt, self.messages, self.tools = prompt, messages, tools
        self.template_args, self.state = template_args, state


class _ResumeCache:
    """The server's prompt cache, seen through one hook: the insert of a finished reply."""

    def __init__(self, inner, owner):
        self._inner, self._owner = inner, owner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __len__(self):
        return len(self._inner)

    def insert_cache(self, model, tokens, prompt_cache, *args, cache_type="assistant", **kwargs):
        self._inner.insert_cache(model, tokens, prompt_cache, *args, cache_type=cache_type, **kwargs)
        if cache_type == "assistant":
            self._owner._reply_done(model, tokens, prompt_cache)


class _FirstToken:
    """A request's response queue, seen from the generation thread: after the first
    token (or the end) is put on it, the request's deferred checkpoints are queued."""

    __slots__ = ("_queue", "_cache", "_prompt")

    def __init__(self, queue, cache):
        self._queue, self._cache, self._prompt = queue, cache, None

    def __getattr__(self, name):
        return getattr(self._queue, name)

    def put(self, item, *args, **kwargs):
        self._queue.put(item, *args, **kwargs)
        if self._cache is None:
            return
        if isinstance(item, server.GenerationContext):
            self._prompt = item.prompt
        elif item is None or isinstance(item, (server.Response, Exception)):
            cache, self._cache = self._cache, None
            try:
                cache.write_deferred(self._prompt)
            except Exception as exc:  # fail open: only the checkpoints are lost
                log.warning("kvstore: deferred checkpoints not queued: %s: %s", type(exc).__name__, exc)


class ResumeGenerator(server.ResponseGenerator):
    """``ResponseGenerator`` that normalises chat messages and places resume points.

    Class attributes set by ``install``: ``normalize`` (compiled patterns
    removed from system messages; empty: off) and ``resume`` (place resume
    points for caches that cannot be trimmed).
    """

    normalize = ()
    resume = True

    def __init__(self, model_provider, prompt_cache):
        self._pending = []
        self.resume_points = 0
        super().__init__(model_provider, _ResumeCache(prompt_cache, self))

    def _generate(self):
        cache = self.prompt_cache  # mlx_lm.server drops it as the thread ends
        try:
            super()._generate()
        finally:  # on this thread: MLX evaluates a graph only where it was made
            write_deferred = getattr(cache, "write_deferred", None)
            if write_deferred is not None:
                write_deferred()

    def _next_request(self, timeout=None):
        got = super()._next_request(timeout)
        if got is None:  # idle: what preloading or a promotion has loaded enters memory now,
            settle = getattr(self.prompt_cache, "settle", None)  # not on the next request's way
            if settle is not None:
                settle(0)
            return got
        write_deferred = getattr(self.prompt_cache, "write_deferred", None)
        if write_deferred is None:
            return got
        rqueue, request, args = got
        return _FirstToken(rqueue, self.prompt_cache), request, args

    def _tokenize(self, tokenizer, request, args):
        if request.request_type == "chat" and self.normalize and request.messages:
            request = dataclasses.replace(request, messages=normalize_messages(request.messages, self.normalize))
        got = super()._tokenize(tokenizer, request, args)
        prompt, segments, types, state, vision = got
        if types[-2:] == ["user", "assistant"] and self._trimmable_at(len(prompt)):
            got = (prompt, segments[:-2] + [segments[-2] + segments[-1]], types[:-1], state, vision)
        if self.resume and request.request_type == "chat" and vision is None and tokenizer.has_chat_template:
            template_args = dict(self.cli_args.chat_template_args or {})
            template_args.update(args.chat_template_kwargs or {})
            self._pending.append(_Pending(list(prompt), request.messages, request.tools, template_args, state))
            del self._pending[:-PENDING]
        return got

    def _trimmable_at(self, n):
        """True if the current model's cache can still be trimmed once it holds ``n`` tokens."""
        model = self.model_provider.model
        if model is None:
            return False
        if getattr(self, "_layers_of", None) is not model:
            from mlx_lm.models.cache import make_prompt_cache

            self._layers, self._layers_of = make_prompt_cache(model), model
        return not needs_resume_points(self._layers, n)

    def _take(self, tokens):
        for i in range(len(self._pending) - 1, -1, -1):
            p = self._pending[i].prompt
            if len(tokens) > len(p) and tokens[:len(p)] == p:
                return self._pending.pop(i)
        return None

    def _reply_done(self, model_key, tokens, cache):
        """After a reply's final insert: a checkpoint where the next request resumes."""
        tokens = list(tokens)
        pending = self._take(tokens)
        provider = self.model_provider
        if pending is None or provider.draft_model is not None or self.cli_args.kv_bits is not None \
                or trimmable(cache):
            return
        try:
            tokenizer = provider.tokenizer
            out = tokens[len(pending.prompt):]
            stopped = out[-1] in tokenizer.eos_token_ids
            reply = reply_message(tokenizer, out, pending.state, pending.tools, stopped)
            target = reply_end(tokenizer, [_flatten(m) for m in pending.messages], reply, pending.tools,
                               pending.template_args)
            inner = self.prompt_cache._inner
            # kvstore serve's cache: the request's tenant, not counted as a request
            quiet = getattr(type(inner), "quiet", None)
            n = checkpoint_reply(quiet(inner) if quiet else inner, model_key, provider.model, pending.prompt, out, cache,
                                 target, self.cli_args.prefill_step_size)
            if n is not None:
                self.resume_points += 1
                log.debug("kvstore: resume point at %d tokens (%d prefilled)", len(target), n)
        except Exception as exc:  # fail open: the reply is out, only the checkpoint is lost
            log.warning("kvstore: no resume point for a reply: %s: %s", type(exc).__name__, exc)


def install(normalize=(), resume=True):
    """Make mlx_lm.server build a ``ResumeGenerator``; check the hooks first."""
    check()
    ResumeGenerator.normalize = tuple(normalize)
    ResumeGenerator.resume = resume
    server.ResponseGenerator = ResumeGenerator
    return ResumeGenerator
