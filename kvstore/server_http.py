"""The HTTP side of ``kvstore serve``: mlx_lm.server's handler with /metrics and tenants, and a clean stop.

``make_handler`` subclasses mlx_lm.server's ``APIHandler``: ``GET /metrics``
answers in Prometheus' text format, each completion request gets its tenant
from a header or from its API key (``Tenancy``), and its prompt processing
time feeds the prefill-rate estimate of ``kvstore.metrics``. ``run`` stands
in for ``mlx_lm.server.run``: the same prompt cache, generator and HTTP loop,
with this handler, and a stop that always ends the generation thread (also
when the stop comes during start-up) and waits until the thread is really
gone before the interpreter shuts down.

Why the wait: ``Thread.join`` returns before the operating-system thread has
run its thread-local destructors. MLX keeps a thread-local compile cache
whose destructor takes the GIL; if the interpreter is finalizing by then,
Python ends that thread with ``pthread_exit``, whose unwinding through the
C++ destructor calls ``std::terminate`` (exit status 134, "terminate called
without an active exception"). This module never touches the generation
loop itself.
"""

import hashlib
import logging
import os
import sys
import time

from .metrics import CONTENT_TYPE
from .server_cache import tenant_model

log = logging.getLogger("kvstore")


class Tenancy:
    """Where a request's tenant comes from.

    ``header``: the value of this request header (e.g. ``X-Tenant``);
    ``from_key``: a hash of the request's API key (``Authorization: Bearer
    KEY`` or ``X-Api-Key: KEY``); the key itself is never kept. The header
    wins when both are given and present. A request with neither has no
    tenant: it shares the namespace of every other request without one.
    """

    def __init__(self, header=None, from_key=False):
        self.header = header
        self.from_key = from_key

    @property
    def enabled(self):
        return bool(self.header or self.from_key)

    def of(self, headers):
        """The tenant of a request with these headers, or ``None``."""
        if self.header:
            value = (headers.get(self.header) or "").strip()
            if value:
                return header_tenant(value)
        if self.from_key:
            auth = (headers.get("Authorization") or "").strip()
            key = auth[7:].strip() if auth[:7].lower() == "bearer " else (headers.get("X-Api-Key") or "").strip()
            if key:
                return key_tenant(key)
        return None


def header_tenant(value):
    """The tenant of a request whose tenant header says ``value`` (as ``kvstore warm --tenant``)."""
    return "header:" + value.strip()


def key_tenant(key):
    """The tenant of a request with API key ``key``: a hash, so the key is never kept."""
    return "key:" + hashlib.blake2b(key.strip().encode(), digest_size=16, person=b"kvstore-apikey").hexdigest()


class _RequestGenerator:
    """The response generator as one request's handler uses it: tenant tagged, prefill timed."""

    def __init__(self, generator, handler):
        self._generator = generator
        self._handler = handler

    def __getattr__(self, name):
        return getattr(self._generator, name)

    def generate(self, request, args, progress_callback=None):
        handler = self._handler
        tenant = handler.tenancy.of(handler.headers) if handler.tenancy is not None else None
        if tenant is not None:
            args.model = tenant_model(args.model, tenant)
        finished = []

        def progress(processed, total):
            if processed >= total and not finished:
                finished.append(time.perf_counter())
            if progress_callback is not None:
                progress_callback(processed, total)

        ctx, responses = self._generator.generate(request, args, progress_callback=progress)
        return ctx, self._timed(ctx, responses, time.perf_counter(), finished)

    def _timed(self, ctx, responses, start, finished):
        metrics = self._handler.metrics
        first = True
        for response in responses:
            if first and metrics is not None:
                first = False
                end = finished[0] if finished else time.perf_counter()
                reused = max(0, ctx.prompt_cache_count)
                metrics.prefilled(reused, len(ctx.prompt) - reused, end - start)
            yield response


def make_handler(metrics=None, tenancy=None):
    """An mlx_lm.server ``APIHandler`` subclass serving ``/metrics`` and deriving tenants."""
    from mlx_lm.server import APIHandler

    class KVStoreHandler(APIHandler):
        def __init__(self, response_generator, *args, **kwargs):
            # BaseHTTPRequestHandler serves the request inside __init__
            super().__init__(_RequestGenerator(response_generator, self), *args, **kwargs)

        def do_GET(self):
            if self.path.split("?")[0] == "/metrics" and self.metrics is not None:
                return self.handle_metrics()
            return super().do_GET()

        def handle_metrics(self):
            try:
                body = self.metrics.exposition()
            except Exception as exc:  # a broken scrape is reported, never raised into the server
                log.warning("kvstore: /metrics failed: %s: %s", type(exc).__name__, exc)
                self.send_response(500)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    KVStoreHandler.metrics = metrics
    KVStoreHandler.tenancy = tenancy if tenancy is not None and tenancy.enabled else None
    return KVStoreHandler


def run(host, port, model_provider, *, handler_class, bind=None):
    """``mlx_lm.server.run`` with ``handler_class`` and a clean stop.

    Builds the prompt cache and the response generator by their
    ``mlx_lm.server`` module names (so a replaced ``LRUPromptCache`` or
    ``ResponseGenerator`` is used), calls ``bind(generator)`` if given, and
    serves until ``KeyboardInterrupt``. However it ends, the generation
    thread is stopped, joined, and waited for until it has exited.
    """
    import mlx.core as mx
    import mlx_lm.server as server

    group = mx.distributed.init()
    prompt_cache = server.LRUPromptCache(model_provider.cli_args.prompt_cache_size)
    generator = server.ResponseGenerator(model_provider, prompt_cache)
    if bind is not None:
        bind(generator)
    try:
        if group.rank() == 0:
            server._run_http_server(host, port, generator, handler_class=handler_class)
        else:
            generator.join()
    finally:
        stop_generator(generator)


def stop_generator(generator, timeout=60.0):
    """Stop and join mlx_lm.server's generation thread, then wait until the OS thread is gone."""
    thread = getattr(generator, "_generation_thread", None)
    generator.stop_and_join()
    if thread is not None:
        wait_thread_exit(thread, timeout)


def wait_thread_exit(thread, timeout=60.0):
    """Wait until a joined thread's operating-system thread has exited (its
    thread-local destructors have run); True if seen gone.

    Linux lists live threads in ``/proc/self/task``; elsewhere a short sleep
    (which releases the GIL the destructors need) stands in.
    """
    tid = getattr(thread, "native_id", None)
    task = f"/proc/self/task/{tid}"
    if tid is None or not sys.platform.startswith("linux") or not os.path.isdir("/proc/self/task"):
        time.sleep(0.5)
        return False
    deadline = time.monotonic() + timeout
    while os.path.exists(task):
        if time.monotonic() > deadline:
            log.warning("kvstore: the generation thread has not exited after %.0f s", timeout)
            return False
        time.sleep(0.01)
    return True
