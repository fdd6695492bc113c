"""The prompt cache as mlx_lm.server's generation thread sees it: tenants, a log line, metrics.

``RequestCache`` stands where mlx_lm.server expects its ``LRUPromptCache``
and forwards to a ``TieredPromptCache``. It owns three things the tiered
cache does not know about: the tenant of the request being served (set
from the request's arguments on the generation thread, see
``TenantModel``), the one INFO line per request saying where its prefix
came from, and the request and restore metrics.

Tenants never share a cache entry: a request's model description carries
its tenant, so mlx_lm.server never batches requests of two tenants
together (it finishes one tenant's batch before it starts the next), and
every fetch and insert made while a request or batch is served uses that
tenant's namespace. It must never let a metric or a log line fail a
request.
"""

import dataclasses
import hashlib
import logging
import time

log = logging.getLogger("kvstore")


def tenant_id(tenant):
    """A short, stable, non-reversible name of a tenant for logs (``-`` for none)."""
    if tenant is None:
        return "-"
    return hashlib.blake2b(tenant.encode(), digest_size=4, person=b"kvstore-tlog").hexdigest()


def tenant_model(description, tenant):
    """``description`` (an mlx_lm.server ``ModelDescription``) tagged with ``tenant``.

    Two descriptions are equal only for the same tenant, and mlx_lm.server
    adds a request to the running batch only when its description equals
    the batch's: a batch never mixes tenants.
    """
    if tenant is None:
        return description
    base = type(description)
    cls = _TAGGED.get(base)
    if cls is None:
        cls = _TAGGED[base] = dataclasses.make_dataclass(
            "TenantModel", [("tenant", str, dataclasses.field(default=None))], bases=(base,))
    return cls(**{f.name: getattr(description, f.name) for f in dataclasses.fields(base)}, tenant=tenant)


_TAGGED = {}


class _Quiet:
    """``fetch_nearest_cache`` / ``insert_cache`` of a ``TieredPromptCache`` for one tenant,
    not counted as requests (``RequestCache`` adds the per-request log line and metrics)."""

    defer = False  # defer the evaluation of checkpoints taken during a prefill (not of finished replies)

    def __init__(self, cache, tenant):
        self.cache, self.tenant = cache, tenant

    def fetch_nearest_cache(self, model, tokens):
        got = self.cache.fetch(model, tokens, tenant=self.tenant)
        return got.cache, got.rest

    def insert_cache(self, model, tokens, prompt_cache, *, cache_type="assistant"):
        self.cache.insert_cache(model, tokens, prompt_cache, cache_type=cache_type, tenant=self.tenant,
                                defer=self.defer and cache_type != "assistant")


class RequestCache(_Quiet):
    """mlx_lm.server's prompt cache: a ``TieredPromptCache`` with a tenant per request.

    ``metrics`` is a ``kvstore.metrics.ServerMetrics`` or ``None``. The
    generation thread calls ``serve(args)`` before it tokenizes a request
    (``bind`` installs that on a ``ResponseGenerator``); every fetch and
    insert after it, until the next ``serve``, is for that request's tenant.
    The checkpoints mlx_lm.server inserts during a prefill are deferred: the
    generation thread queues them right after the request's first token
    (``kvstore.server_generation``) or at the next reply's insert.
    """

    defer = True

    def __init__(self, cache, metrics=None):
        super().__init__(cache, None)
        self.metrics = metrics

    def serve(self, args):
        """The generation thread takes the request whose arguments are ``args``."""
        self.tenant = getattr(getattr(args, "model", None), "tenant", None)

    def bind(self, generator):
        """Make ``generator`` (an mlx_lm.server ``ResponseGenerator``) call ``serve`` per request."""
        tokenize = generator._tokenize

        def _tokenize(tokenizer, request, args):
            self.serve(args)
            return tokenize(tokenizer, request, args)

        generator._tokenize = _tokenize
        return generator

    def quiet(self):
        """This cache for the server's own fetches and inserts between requests
        (resume points): the current request's tenant, but no request log line
        and no request metrics."""
        return _Quiet(self.cache, self.tenant)

    # ---------------------------------------------------- LRUPromptCache API
    def fetch_nearest_cache(self, model, tokens):
        t0 = time.perf_counter()
        got = self.cache.fetch(model, tokens, tenant=self.tenant)
        seconds = time.perf_counter() - t0
        total = len(tokens)
        try:
            if self.metrics is not None:
                self.metrics.fetched(got, total, seconds)
            if got.source:
                log.info("kvstore request: %d of %d prompt tokens from %s (tier %s, %s match), restore %.1f ms, "
                         "tenant %s", got.reused, total, got.source, got.tier, got.kind, seconds * 1000,
                         tenant_id(self.tenant))
            else:
                log.info("kvstore request: 0 of %d prompt tokens cached (miss), lookup %.1f ms, tenant %s",
                         total, seconds * 1000, tenant_id(self.tenant))
        except Exception as exc:  # observability never fails a request
            log.debug("kvstore: request metrics failed: %s", exc)
        return got.cache, got.rest

    def __len__(self):
        return len(self.cache)

    def __getattr__(self, name):
        # nbytes, stats_by_type, trim_to, counters, flush, close, ...
        return getattr(self.cache, name)

