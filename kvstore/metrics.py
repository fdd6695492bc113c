"""Server metrics: what the prompt cache did, in Prometheus' text format.

Owns the metric definitions and their values for one ``kvstore serve``
process: requests by where their prefix came from (memory / disk / remote /
miss) and tier, tokens reused, an estimate of the prefill time saved,
restore and write latency histograms, and, read when scraped, the write
queue, dropped and failed writes, faults and the store's bytes by tier.

It uses ``prometheus_client`` (its own registry, never the global one) for
the exposition format and the histogram buckets: a small pure-Python
package that gets the format's details right (escaping, ``_total`` /
``_bucket`` / ``+Inf`` series, HELP and TYPE lines, thread-safe updates)
and ships the parser the tests read the endpoint with, where a hand-written
exposition would need all of that written and tested here. It must never raise into a
request: every recording call is plain arithmetic under the library's locks,
and a store that cannot be read when scraped leaves its gauges out.

Prefill time saved is an estimate: every request that prefilled at least
``MIN_SAMPLE`` tokens is a sample of this server's prefill speed (seconds
from the moment the generation thread took the request to the end of its
prompt processing, divided by the tokens it prefilled); the estimate is the
total seconds over the total tokens of the last ``SAMPLES`` samples, and
each request adds its reused tokens times the estimate of the moment.
Reused tokens seen before the first sample are added when it arrives.
"""

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .records import TIERS

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SOURCES = ("memory", "disk", "remote", "miss")
MIN_SAMPLE = 16
SAMPLES = 50
# restores run from well under a millisecond (memory) to seconds (large disk restores)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# how long the store's bytes by tier are reused between scrapes (listing a large store is not free)
STORE_TTL = 30.0


class PrefillRate:
    """Seconds per prefilled token, from this server's own requests (see the module docstring)."""

    def __init__(self, samples=SAMPLES):
        self.samples = deque(maxlen=samples)
        self.lock = threading.Lock()

    def add(self, tokens, seconds):
        if tokens >= MIN_SAMPLE and seconds > 0:
            with self.lock:
                self.samples.append((tokens, seconds))

    def seconds_per_token(self):
        """The estimate, or ``None`` before the first sample."""
        with self.lock:
            tokens = sum(t for t, _ in self.samples)
            seconds = sum(s for _, s in self.samples)
        return seconds / tokens if tokens else None


class ServerMetrics:
    """The metrics of one server process and their exposition.

    ``cache`` (a ``TieredPromptCache`` or ``None``) is read when scraped:
    its ``counters()`` and its store's ``stats()``.
    """

    def __init__(self, cache=None):
        self.cache = cache
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("kvstore_requests", "Completion requests by where their prefix came from",
                                ["source", "tier"], registry=r)
        self.prompt_tokens = Counter("kvstore_prompt_tokens", "Prompt tokens of completion requests", registry=r)
        self.reused = Counter("kvstore_tokens_reused", "Prompt tokens served from a cached prefix", ["source"],
                              registry=r)
        self.saved = Counter("kvstore_prefill_saved_seconds",
                             "Estimated prefill seconds saved: tokens reused times the measured seconds per "
                             "prefilled token", registry=r)
        self.rate = Gauge("kvstore_prefill_seconds_per_token",
                          "Measured prefill seconds per token (last %d requests that prefilled at least %d "
                          "tokens); NaN before the first" % (SAMPLES, MIN_SAMPLE), registry=r)
        self.restore = Histogram("kvstore_restore_seconds", "Time to find and restore a request's cached prefix",
                                 ["source"], buckets=LATENCY_BUCKETS, registry=r)
        self.write = Histogram("kvstore_write_seconds", "Time to write one snapshot to the store",
                               ["outcome"], buckets=LATENCY_BUCKETS, registry=r)
        for source in SOURCES:
            self.reused.labels(source)
            self.restore.labels(source)
            for tier in (("none",) if source == "miss" else TIERS):
                self.requests.labels(source, tier)
        for outcome in ("ok", "failed"):
            self.write.labels(outcome)
        self.rate.set(float("nan"))
        self.prefill = PrefillRate()
        self._pending = 0  # reused tokens waiting for the first prefill sample
        self._lock = threading.Lock()
        self._store_bytes = (0.0, None)
        r.register(_CacheCollector(self))

    # ---------------------------------------------------------------- recording
    def fetched(self, got, total, seconds):
        """One request's prefix lookup: ``got`` a ``Fetched``, ``total`` its prompt tokens."""
        source = got.source or "miss"
        tier = got.tier if got.source else "none"
        self.requests.labels(source, tier).inc()
        self.prompt_tokens.inc(total)
        if got.reused:
            self.reused.labels(source).inc(got.reused)
        self.restore.labels(source).observe(seconds)

    def prefilled(self, reused, prefilled, seconds):
        """A request's prompt processing: ``prefilled`` tokens took ``seconds``; ``reused`` came cached."""
        self.prefill.add(prefilled, seconds)
        per_token = self.prefill.seconds_per_token()
        with self._lock:
            if per_token is None:
                self._pending += reused
                return
            tokens, self._pending = reused + self._pending, 0
        self.rate.set(per_token)
        if tokens:
            self.saved.inc(tokens * per_token)

    def written(self, seconds, ok):
        """One snapshot write of the write-behind queue."""
        self.write.labels("ok" if ok else "failed").observe(seconds)

    # -------------------------------------------------------------- exposition
    def exposition(self):
        """The metrics in Prometheus' text format (bytes)."""
        return generate_latest(self.registry)

    def store_bytes(self):
        """Bytes of snapshots by tier in the cache's store, refreshed every ``STORE_TTL`` seconds."""
        at, value = self._store_bytes
        store = getattr(self.cache, "store", None)
        if store is None:
            return None
        if value is None or time.monotonic() - at > STORE_TTL:
            try:
                by_tier = store.stats()["by_tier"]
                value = {t: by_tier.get(t, {}).get("bytes", 0) for t in TIERS}
            except Exception:  # a store that cannot be read leaves the gauge out
                value = None
            self._store_bytes = (time.monotonic(), value)
        return value


class _CacheCollector:
    """Values read from the cache when scraped."""

    def __init__(self, metrics):
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        cache = self.metrics.cache
        c = cache.counters() if cache is not None else {}

        def counter(name, doc, value):
            return CounterMetricFamily(name, doc, value=value)

        yield GaugeMetricFamily("kvstore_write_queue_depth", "Snapshots waiting for the disk writer",
                                value=c.get("queue.depth", 0) + c.get("queue.in_flight", 0))
        yield GaugeMetricFamily("kvstore_write_queue_size", "Capacity of the write-behind queue",
                                value=c.get("queue.size", 0))
        yield counter("kvstore_writes_dropped", "Snapshots not written because the queue was full or closed",
                      c.get("writes.dropped", 0))
        yield counter("kvstore_writes_failed", "Snapshot writes the store refused", c.get("writes.failed", 0))
        yield counter("kvstore_writes", "Snapshots written to the store", c.get("writes.done", 0))
        yield counter("kvstore_writes_deferred", "Checkpoints taken during a prefill, queued after the first token",
                      c.get("writes.deferred", 0))
        yield counter("kvstore_faults", "Store faults absorbed (failed opens, reads, writes, corrupt blobs)",
                      c.get("disk.faults", 0) + c.get("store.faults", 0))
        yield GaugeMetricFamily("kvstore_memory_bytes", "Bytes held by the memory tier", value=c.get("memory.bytes", 0))
        yield GaugeMetricFamily("kvstore_memory_entries", "Entries held by the memory tier",
                                value=c.get("memory.entries", 0))
        by_tier = self.metrics.store_bytes()
        if by_tier is not None:
            g = GaugeMetricFamily("kvstore_store_bytes", "Bytes of snapshots in the store by tier (refreshed "
                                  "every %d s)" % STORE_TTL, labels=["tier"])
            for tier, n in by_tier.items():
                g.add_metric([tier], n)
            yield g
