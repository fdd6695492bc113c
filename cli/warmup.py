"""A warm-up request through mlx_lm.server's own generation path, before it listens.

A new process pays once for what MLX and mlx-lm do on their first call
(kernels built for the CPU, the batch generator made, buffers allocated,
the chat template compiled). ``kvstore serve --warmup`` sends one short text
completion through the server's ``ResponseGenerator`` and renders the chat
template once before the HTTP server accepts connections, so the first real
request does not pay it: start-up takes that much longer instead. The
warm-up is a text completion, so its cache entry is of the assistant tier
(kept in memory, evicted first, not written to disk unless the assistant
tier is persisted). A warm-up that fails is logged and the server starts
anyway.
"""

import logging
import time

log = logging.getLogger("kvstore")

PROMPT = "Hello."


def warm_up(response_generator, max_tokens=2):
    """Run one greedy ``max_tokens`` completion of ``PROMPT``; return its seconds, or ``None`` on failure."""
    from mlx_lm import server as S

    cli = response_generator.cli_args
    args = S.GenerationArguments(
        model=S.ModelDescription(model="default_model", draft="default_model", adapter=None),
        sampling=S.SamplingArguments(temperature=0.0, top_p=cli.top_p, top_k=cli.top_k, min_p=cli.min_p,
                                     xtc_probability=0.0, xtc_threshold=0.1),
        logits=S.LogitsProcessorArguments(logit_bias=None, repetition_penalty=0.0, repetition_context_size=20,
                                          presence_penalty=0.0, presence_context_size=20, frequency_penalty=0.0,
                                          frequency_context_size=20),
        stop_words=[], max_tokens=max_tokens, num_draft_tokens=cli.num_draft_tokens, logprobs=False,
        top_logprobs=-1, seed=None, chat_template_kwargs=None,
    )
    request = S.CompletionRequest(request_type="text", prompt=PROMPT, messages=[], tools=None, role_mapping=None)
    t = time.perf_counter()
    try:
        _ctx, responses = response_generator.generate(request, args)
        for _ in responses:
            pass
    except Exception as exc:  # fail open: the server starts without a warm-up
        log.warning("kvstore: warm-up request failed (%s: %s); starting without it", type(exc).__name__, exc)
        return None
    try:
        # a chat request renders the chat template; its first rendering compiles it
        tokenizer = response_generator.model_provider.tokenizer
        if tokenizer is not None and getattr(tokenizer, "has_chat_template", False):
            tokenizer.apply_chat_template([{"role": "system", "content": PROMPT}, {"role": "user", "content": PROMPT}],
                                          add_generation_prompt=True)
    except Exception as exc:  # the template fails on the first real request too; it says why there
        log.debug("kvstore: warm-up could not render the chat template: %s", exc)
    seconds = time.perf_counter() - t
    log.info("kvstore: warm-up request done in %.2f s", seconds)
    return seconds


def before_listening(server):
    """Make ``server`` (the ``mlx_lm.server`` module) run ``warm_up`` before it listens."""
    run_http = server._run_http_server

    def run_http_server(host, port, response_generator, *args, **kwargs):
        warm_up(response_generator)
        return run_http(host, port, response_generator, *args, **kwargs)

    server._run_http_server = run_http_server
