"""Resume points: checkpoints where the next request of an agent loop resumes.

A cache that cannot be trimmed (recurrent state, a wrapped window) is reused
only at the exact length it was saved. In an agent loop each request is the
previous prompt, the assistant reply as the chat template renders it, a tool
result and a new generation prompt; with checkpoints only at the system and
user segment ends, every tool round would prefill every earlier round again.

This module owns where the two extra checkpoints go and what the reply looks
like when it comes back:

- ``resume_segments``: the prompt's last segment is cut one token short, so
  the prefill ends in a checkpoint (tier ``assistant``) just before the token
  generation starts from;
- ``reply_message``: the assistant message mlx_lm.server returns for the
  generated tokens (``content``, ``reasoning``, ``tool_calls``), which an
  agent client sends back;
- ``reply_end``: the tokens of the next prompt up to the last token of that
  message as the chat template renders it before a tool result (a thinking
  template keeps the reasoning within a task, and generated tokens need not
  be the tokens the text re-encodes to);
- ``checkpoint_reply``: puts a checkpoint there, continuing the generation's
  own cache when it is a prefix of the re-rendered tokens, else prefilling
  from the best checkpoint the cache holds.

It never changes what the model computes for a request: checkpoints are made
after the reply is complete, from token sequences a later request must match
exactly to use. It never trims a cache. Its prefill does not quantise KV, so
callers skip resume points when KV quantisation is on.
"""

import copy
import logging

import mlx.core as mx
from mlx_lm.models.cache import can_trim_prompt_cache

from .codec import cache_tokens

log = logging.getLogger("kvstore")

PROBES = ("A", "B")  # two tool results that differ from their first character


def trimmable(cache):
    """True if every layer of ``cache`` can be trimmed (no resume points needed)."""
    return can_trim_prompt_cache(cache)


def needs_resume_points(cache, n):
    """True if ``cache``, once it holds ``n`` tokens, cannot be trimmed (a window
    of fewer than ``n`` tokens, recurrent state, any layer that says so)."""
    for c in cache:
        inner = getattr(c, "caches", None)
        if inner is not None:
            if needs_resume_points(inner, n):
                return True
        elif getattr(c, "max_size", None) is not None:
            if n >= c.max_size:
                return True
        elif not c.is_trimmable():
            return True
    return False


def resume_segments(segments, types):
    """Cut the last segment one token short, in place, so the prefill ends in a checkpoint.

    The cut piece keeps the last segment's tier (``assistant`` for a chat's
    tail); the one token left is what generation starts from.
    """
    if segments and len(segments[-1]) > 1:
        last = segments.pop()
        segments += [last[:-1], last[-1:]]
        types.append(types[-1])
    return segments, types


def common_prefix(a, b):
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def reply_message(tokenizer, generated, initial_state="normal", tools=None, stopped=True):
    """The assistant message mlx_lm.server returns for ``generated`` tokens.

    Mirrors the server's chat completion handler: the final stop token is not
    decoded, text is split by mlx-lm's ``TextStateMachine`` into reasoning,
    tool calls and content, tool calls are parsed by the tokenizer's tool
    parser. Tool call ids are fresh, as the server's are.
    """
    from mlx_lm.generate import TextStateMachine, make_text_state_machine
    from mlx_lm.server import ToolCallFormatter

    tokens = list(generated)
    if stopped and tokens and tokens[-1] in tokenizer.eos_token_ids:
        tokens = tokens[:-1]
    sm = make_text_state_machine(tokenizer)
    state, segments = TextStateMachine.split(sm.make_state(initial_state), tokenizer.decode(tokens))
    if stopped:
        TextStateMachine.discard(state)
    else:
        state, flushed, current = TextStateMachine.flush(state)
        segments.append((current, flushed))
    reasoning, text, tool_text, calls, prev = "", "", "", [], initial_state
    for current, piece in segments:
        if current == "reasoning":
            reasoning += piece
        elif current == "tool":
            tool_text += piece
        elif current == "normal":
            if prev == "tool":
                calls.append(tool_text)
                tool_text = ""
            text += piece
        prev = current
    if prev == "tool" and tool_text:
        calls.append(tool_text)
    message = {"role": "assistant", "content": text if text else None}
    if reasoning:
        message["reasoning"] = reasoning
    if calls and tokenizer.has_tool_calling:
        message["tool_calls"] = ToolCallFormatter(tokenizer.tool_parser, tools)(calls)
    return message


def initial_state(tokenizer, prompt):
    """``"reasoning"`` if ``prompt`` ends inside an open think block, else ``"normal"``
    (as mlx_lm.server decides)."""
    state = "normal"
    if tokenizer.has_thinking and tokenizer.rfind_think_start(prompt) > tokenizer.rfind_think_end(prompt):
        state = "reasoning"
    return getattr(tokenizer, "response_initial_state", None) or state


def reply_end(tokenizer, messages, reply, tools=None, template_args=None):
    """Tokens of the next prompt through the last token of ``reply`` as re-rendered.

    The chat is rendered with the reply followed by two different tool
    results; what all renderings share (and the rendering with the reply
    last) ends where the reply does. ``None`` if the template fails.
    """
    kwargs = dict(tools=tools, tokenize=True, add_generation_prompt=False, **(template_args or {}))
    try:
        last = list(tokenizer.apply_chat_template(messages + [reply], **kwargs))
        probes = [list(tokenizer.apply_chat_template(messages + [reply, {"role": "tool", "content": p}], **kwargs))
                  for p in PROBES]
    except Exception as exc:  # a template that cannot render the reply: no checkpoint
        log.debug("kvstore: cannot render the reply for a resume point: %s", exc)
        return None
    end = min(common_prefix(last, probes[0]), common_prefix(probes[0], probes[1]))
    return probes[0][:end]


def prefill(model, cache, tokens, step=2048):
    """Feed ``tokens`` into ``cache`` (no sampling); returns the cache."""
    for i in range(0, len(tokens), step):
        model(mx.array(tokens[i:i + step])[None], cache=cache)
        mx.eval([c.state for c in cache])
    return cache


def checkpoint_reply(prompt_cache, key, model, prompt, generated, cache, target, step=2048, **fetch_kwargs):
    """Put a checkpoint (tier ``assistant``) at ``target``, the re-rendered reply's end.

    ``cache`` holds ``prompt + generated`` after generation (it is not
    changed). When those tokens are a prefix of ``target`` the rest is fed to
    a copy of it; otherwise the nearest cache ``prompt_cache`` holds for
    ``target`` is continued. Nothing is done when ``target`` does not continue
    ``prompt`` (the template rewrote it) or is already held. Returns the
    number of tokens prefilled, or ``None`` if no checkpoint was made.
    """
    if not target or common_prefix(target, prompt) < len(prompt) - 1:
        return None
    done = list(prompt) + list(generated)
    if len(target) <= len(done) and target == done[:len(target)]:
        return None  # the generation's own checkpoint covers it, or it lies inside it
    if common_prefix(target, done) == len(done) and cache_tokens(cache) in (None, len(done)):
        base, n = copy.deepcopy(cache), len(done)
    else:
        base, rest = prompt_cache.fetch_nearest_cache(key, target, **fetch_kwargs)
        if base is None:
            return None
        n = len(target) - len(rest)
    if n < len(prompt) - 1:
        return None  # nothing closer than the prompt's own checkpoints: leave it to the next request
    prefill(model, base, target[n:], step)
    prompt_cache.insert_cache(key, target, base, cache_type="assistant", **fetch_kwargs)
    return len(target) - n
