"""Checkpoints on their way to the write-behind queue: evaluated now or after the first token.

A checkpoint's arrays are evaluated on the thread that made them before they
are queued; the writer thread reads their buffers (and makes a strided bf16
view contiguous on a stream of its own, ``kvstore.codec.to_numpy``). MLX streams belong to the thread that created
them (since MLX 0.31.2, on every device: evaluating another thread's graph
raises "There is no Stream(...) in current thread"), so that thread is the
only one that can do it.

A checkpoint that mlx-lm inserts in the middle of a prefill is often still a
lazy graph: its ``BatchKVCache.extract`` is a copy of the KV rows that
mlx-lm's own ``LRUPromptCache`` never evaluates until a later request uses
the entry. Evaluating it at insert time puts that copy (milliseconds on a
CPU) in front of the request's first token. ``Pending`` holds such
checkpoints instead, and the owner thread evaluates and queues them when it
says so: ``kvstore serve`` does it right after a request's first token is
handed out, and so does its generation thread before it ends; any insert
that is not deferred, ``flush`` and ``close`` do it before their own work.

It must never: evaluate an array on a thread other than the one that
inserted it while that thread may still be running (only ``close`` at the
end of the owner's life tries; MLX refuses, and that is a dropped write,
counted and logged, never an exception), reorder two checkpoints of one
thread, or hold more than ``LIMIT`` checkpoints of one thread (the oldest
are then queued at once).
"""

import logging
import threading

import mlx.core as mx

log = logging.getLogger("kvstore")

LIMIT = 16  # deferred checkpoints held at most; beyond that the oldest are evaluated at the next insert


def arrays(obj, out):
    """Append every ``mx.array`` inside ``obj`` (cache objects, lists, tuples) to ``out``."""
    if isinstance(obj, mx.array):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            arrays(x, out)
    elif hasattr(obj, "__dict__"):
        for x in vars(obj).values():
            arrays(x, out)
    return out


def ready(cache):
    """Evaluate a cache's arrays (on the thread that made them; see the module's text)."""
    mx.eval(arrays(cache, []))
    return cache


class Pending:
    """Deferred checkpoints (``kvstore.writer.Write`` items with lazy arrays), per owner thread.

    ``submit(item)`` queues an evaluated item on the write-behind queue and
    returns whether it was taken; ``count(name, n=1)`` receives
    ``writes.deferred`` and ``writes.dropped``.
    """

    def __init__(self, submit, count):
        self.submit = submit
        self.count = count
        self.items = []  # (thread ident, Write), oldest first
        self.lock = threading.Lock()

    def __len__(self):
        return len(self.items)

    def hold(self, item):
        """Keep ``item`` until its thread says it may be evaluated; the oldest go now past ``LIMIT``."""
        with self.lock:
            self.items.append((threading.get_ident(), item))
        self.count("writes.deferred")
        if self.mine() > LIMIT:
            self.release(oldest=self.mine() - LIMIT)

    def mine(self):
        me = threading.get_ident()
        return sum(1 for owner, _ in self.items if owner == me)

    def release(self, prefix=None, oldest=None):
        """Evaluate and queue this thread's deferred checkpoints, oldest first.

        ``prefix``: only those whose tokens are a prefix of it (one request's
        checkpoints, not those of a request still before its first token);
        ``oldest``: at most that many. Returns how many were queued.
        """
        me = threading.get_ident()
        with self.lock:
            take, keep = [], []
            for owner, item in self.items:
                fits = owner == me and (prefix is None or _is_prefix(item.tokens, prefix))
                (take if fits and (oldest is None or len(take) < oldest) else keep).append((owner, item))
            self.items = keep
        return self._queue([item for _, item in take])

    def release_all(self):
        """Queue every deferred checkpoint, whichever thread made it (the owner's life is over).

        On a device whose streams belong to their thread (Metal), another
        thread's graph cannot be evaluated here: those are dropped, counted
        and logged.
        """
        with self.lock:
            take, self.items = [item for _, item in self.items], []
        return self._queue(take)

    def _queue(self, items):
        if not items:
            return 0
        try:
            mx.eval([arrays(item.cache, []) for item in items])
        except Exception as exc:  # another thread's stream, or a graph that cannot run: lose the writes only
            log.warning("kvstore: %d deferred checkpoint(s) not written: %s: %s", len(items), type(exc).__name__, exc)
            self.count("writes.dropped", len(items))
            return 0
        done = 0
        for item in items:
            item.cache = ready(item.cache)
            done += bool(self.submit(item))
        return done


def at_exit(pending, writer, store, timeout):
    """Queue what is deferred, then write the queue and stop (``kvstore.writer.shutdown``)."""
    from .writer import shutdown

    if pending is not None:
        pending.release_all()
    return shutdown(writer, store, timeout)


def _is_prefix(short, long):
    return len(short) <= len(long) and long[:len(short)] == short
