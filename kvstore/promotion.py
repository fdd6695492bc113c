"""Promotion: snapshots loaded for the memory tier on a thread of their own.

After a disk hit the caller keeps the cache it was given (no other holder,
so its first decode write needs no copy), and a second, independent copy is
read here from the store (the page cache holds it by then) for the memory
tier. Loaded caches wait in ``done`` until the memory tier's owner drains
them on its own thread: this module never touches the memory tier. A fetch
that needs a snapshot still being loaded waits for it instead of loading it
again. MLX work here runs on this thread's own stream.
"""

import logging
import threading
from collections import deque
from dataclasses import dataclass

log = logging.getLogger("kvstore")


@dataclass
class Ticket:
    """Load the first ``n`` tokens of ``tokens`` (model ``fp``) into memory under ``key`` as ``tier``."""

    key: object
    tokens: list
    n: int
    fp: str
    tier: str
    tenant: object = None
    cache: list | None = None


class Promoter:
    """One thread loading tickets from ``store``; ``count(name, n=1)`` gets its counters."""

    def __init__(self, store, count):
        self.store, self.count = store, count
        self.pending, self.done = deque(), deque()
        self.loading = None
        self.closed = False
        self.cv = threading.Condition()
        self.thread = None

    def submit(self, ticket):
        """Queue ``ticket`` unless the same snapshot is already on its way; True if queued."""
        with self.cv:
            if self.closed or any(self._same(t, ticket) for t in self._all()):
                return False
            self.pending.append(ticket)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="kvstore-promote", daemon=True)
                self.thread.start()
            self.cv.notify_all()
        self.count("promotions")
        return True

    @staticmethod
    def _same(a, b):
        return a.key == b.key and a.n == b.n and a.tokens[: a.n] == b.tokens[: b.n]

    def _all(self):
        return [*self.pending, *([self.loading] if self.loading else []), *self.done]

    def drain(self):
        """The tickets loaded since the last call (``cache`` set), oldest first."""
        with self.cv:
            out, self.done = list(self.done), deque()
        return out

    def wait_for(self, key, tokens, beyond, timeout=30.0):
        """Wait while a ticket that would serve more than ``beyond`` tokens of
        ``tokens`` is queued or loading; True if one was (``drain`` then)."""

        def serving():
            return [t for t in (*self.pending, *([self.loading] if self.loading else []))
                    if t.key == key and beyond < t.n < len(tokens) and tokens[: t.n] == t.tokens[: t.n]]

        with self.cv:
            if not serving():
                return False
            self.count("promotions.waits")
            self.cv.wait_for(lambda: not serving() or self.closed, timeout)
            return True

    def _run(self):
        import mlx.core as mx

        from .writer import lower_priority

        lower_priority()
        stream = mx.new_stream(mx.default_device())
        while True:
            with self.cv:
                self.cv.wait_for(lambda: self.pending or self.closed)
                if self.closed:
                    return
                self.loading = self.pending.popleft()
            ticket = self.loading
            with mx.stream(stream):
                ticket.cache = self._load(ticket)
            with self.cv:
                self.loading = None
                if ticket.cache is not None:
                    self.done.append(ticket)
                self.cv.notify_all()

    def _load(self, t):
        remote = getattr(self.store, "remote", None)
        if remote is not None:  # a remote hit reaches memory through its local copy
            remote.wait_adopted()
        try:
            cache, _rest, match = self.store.fetch(t.fp, t.tokens[: t.n + 1], tenant=t.tenant, min_tokens=t.n - 1,
                                                   record=False)
        except Exception as exc:  # fail open: a promotion is an optimisation
            log.warning("kvstore promotion failed: %s: %s", type(exc).__name__, exc)
            cache, match = None, None
        if cache is None or match.tokens != t.n:
            self.count("promotions.failed")
            return None
        self.count("promotions.done")
        return cache

    def close(self, timeout=10.0):
        with self.cv:
            self.closed = True
            self.pending.clear()
            self.cv.notify_all()
        if self.thread is not None:
            self.thread.join(timeout)
