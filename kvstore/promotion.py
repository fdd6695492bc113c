"""Promotion: snapshots loaded for the memory tier on a thread of their own.

After a disk hit the caller keeps the cache it was given (no other holder,
so its first decode write needs no copy), and a second, independent copy is
read here from the store (the page cache holds it by then) for the memory
tier. At start, a preload plan (``kvstore.preload``) runs here too and queues
the snapshots most likely to be asked for. Loaded caches wait in ``done``
until the memory tier's owner drains them on its own thread: this module
never touches the memory tier. A fetch that needs a snapshot being loaded
waits for it instead of loading it again; a preload still queued is handed
back to the fetch, which reads it itself (so a request never waits behind
other preloads). MLX work here runs on this thread's own stream. The thread
yields the CPU to requests (lowest priority) from the first request or
promotion on; preloading before that runs at normal priority, as nothing
else runs yet.
"""

import logging
import os
import sys
import threading
from collections import deque
from dataclasses import dataclass

log = logging.getLogger("kvstore")


@dataclass
class Ticket:
    """Load the first ``n`` tokens of ``tokens`` (model ``fp``) into memory under ``key`` as ``tier``.

    ``budget`` (a ``kvstore.preload.Budget``) marks a preload: kept only if it fits.
    """

    key: object
    tokens: list
    n: int
    fp: str
    tier: str
    tenant: object = None
    cache: list | None = None
    budget: object = None


def cache_nbytes(cache):
    return sum(getattr(c, "nbytes", 0) for c in cache)


class Promoter:
    """One thread loading tickets from ``store``; ``count(name, n=1)`` gets its counters."""

    def __init__(self, store, count):
        self.store, self.count = store, count
        self.pending, self.done, self.plans = deque(), deque(), deque()
        self.loading = None
        self.planning = False
        self.closed = False
        self.cv = threading.Condition()
        self.thread = None
        self.lowered = False

    def _start(self):
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="kvstore-promote", daemon=True)
            self.thread.start()
        self.cv.notify_all()

    def submit(self, ticket):
        """Queue ``ticket`` unless the same snapshot is already on its way; True if queued."""
        with self.cv:
            if self.closed or any(self._same(t, ticket) for t in self._all()):
                return False
            self.pending.append(ticket)
            self._start()
        self.count("promotions")
        return True

    def plan(self, make):
        """Run ``make()`` on the thread, before queued tickets; it returns tickets to queue."""
        with self.cv:
            if self.closed:
                return
            self.plans.append(make)
            self._start()

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

    def idle(self, timeout=None):
        """Wait until nothing is planned, queued or loading; False on timeout."""
        with self.cv:
            return self.cv.wait_for(
                lambda: self.closed or not (self.plans or self.planning or self.pending or self.loading), timeout)

    def wait_for(self, key, tokens, beyond, timeout=30.0):
        """Wait while a ticket loading now would serve more than ``beyond`` tokens of ``tokens``.

        A plan being made is waited for first (it may queue such a ticket).
        Returns True if the caller should look in memory again (after
        ``drain``): it waited for such a ticket. Queued preload tickets that
        would serve it are taken off the queue instead (the caller reads the
        disk itself rather than wait behind other preloads).
        """

        def serves(t):
            return t.key == key and beyond < t.n < len(tokens) and tokens[: t.n] == t.tokens[: t.n]

        def waiting():
            return [t for t in (*self.pending, *([self.loading] if self.loading else [])) if serves(t)]

        with self.cv:
            if self.plans or self.planning:
                self.count("promotions.waits.plan")
                self.cv.wait_for(lambda: not (self.plans or self.planning) or self.closed, timeout)
            taken = [t for t in self.pending if t.budget is not None and serves(t)]
            for t in taken:
                self.pending.remove(t)
            self.count("promotions.taken", len(taken))
            if not waiting():
                return any(serves(t) for t in self.done)
            self.count("promotions.waits")
            self._restore_priority()
            self.cv.wait_for(lambda: not waiting() or self.closed, timeout)
            return True

    def _next(self):
        """The next plan (``(make, None)``) or ticket (``(None, ticket)``); ``None`` when closed."""
        with self.cv:
            self.cv.wait_for(lambda: self.plans or self.pending or self.closed)
            if self.closed:
                return None
            if self.plans:
                self.planning = True
                return self.plans.popleft(), None
            self.loading = self.pending.popleft()
            return None, self.loading

    def _run(self):
        import mlx.core as mx

        stream = mx.new_stream(mx.default_device())
        with self.cv:
            preloading = bool(self.plans)
        if not preloading:
            self._lower()
        while (job := self._next()) is not None:
            make, ticket = job
            if make is not None and (ticket := self._run_plan(make)) is None:
                continue
            if ticket.budget is None:
                self._lower()
            with mx.stream(stream):
                ticket.cache = self._load(ticket)
            with self.cv:
                self.loading = None
                if ticket.cache is not None:
                    self.done.append(ticket)
                self.cv.notify_all()

    def _lower(self):
        if not self.lowered:
            from .writer import lower_priority

            lower_priority()
            self.lowered = True

    def _restore_priority(self):
        """A request waits for this thread: give it back normal priority if the system allows
        (Linux: privileged or within RLIMIT_NICE); it lowers itself again at its next promotion."""
        thread = self.thread
        if not self.lowered or thread is None or not sys.platform.startswith("linux"):
            return
        try:
            os.setpriority(os.PRIO_PROCESS, thread.native_id, 0)
            self.lowered = False
        except OSError:
            pass

    def yield_to_requests(self):
        """Lower the thread's priority now (requests have started; preloading goes on behind them)."""
        thread = self.thread
        if self.lowered or thread is None or thread.native_id is None or not sys.platform.startswith("linux"):
            return  # elsewhere only a thread can lower itself: it does at its first promotion
        self.lowered = True
        from .writer import lower_priority

        lower_priority(thread.native_id)

    def _run_plan(self, make):
        """Queue the plan's tickets; return the first of the queue, marked as loading at once
        (a request waiting for the plan then waits for that load rather than taking it)."""
        try:
            tickets = make()
        except Exception as exc:  # fail open: preloading is an optimisation
            log.warning("kvstore preload failed: %s: %s", type(exc).__name__, exc)
            tickets = []
        with self.cv:
            for t in tickets:
                if not self.closed and not any(self._same(o, t) for o in self._all()):
                    self.pending.append(t)
            self.planning = False
            if self.pending and not self.closed:
                self.loading = self.pending.popleft()
            self.cv.notify_all()
            return self.loading

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
        what = "preload" if t.budget is not None else "promotions"
        if cache is None or match.tokens != t.n:
            self.count(f"{what}.failed")
            return None
        if t.budget is not None and not t.budget.take(cache_nbytes(cache)):
            self.count("preload.skipped")
            return None
        self.count(f"{what}.done")
        return cache

    def close(self, timeout=10.0):
        with self.cv:
            self.closed = True
            self.pending.clear()
            self.plans.clear()
            self.cv.notify_all()
        if self.thread is not None:
            self.thread.join(timeout)
