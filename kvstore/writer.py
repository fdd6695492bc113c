"""The write-behind queue: snapshots written to a store off the caller's thread.

A bounded queue and the one thread that drains it. ``submit`` never does
disk I/O or serialisation: a full queue either drops the snapshot or waits
a bounded time (policy ``drop`` / ``wait``), counted either way. The writer
runs no MLX graph work (arrays are evaluated before they are queued) and a
store fault is a failed write, counted, never raised to anyone.

The writer runs at the lowest priority, so a checkpoint never takes the CPU
from a request. While a caller is blocked on it (``submit`` waiting for room,
``flush``, ``close``) the writer is on that caller's way, and a lowest-priority
writer on a busy machine would keep it waiting (priority inversion): for as
long as someone waits, the writer runs at the waiting caller's priority (on
Linux, where one thread may set another's, if the system allows it), and the
last caller to stop waiting sets it back to the lowest.
"""

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field

log = logging.getLogger("kvstore")

POLICIES = ("drop", "wait")
# niceness of background threads (Linux); macOS gets the "background" QoS class
NICE = 19


def lower_priority(native_id=None):
    """Make the calling thread (or, on Linux, thread ``native_id``) yield the CPU to
    request work (generation, prefill).

    Linux schedules threads by their own niceness (``setpriority`` on the
    thread id); macOS by QoS class (``pthread_set_qos_class_self_np``, the
    calling thread only). Elsewhere, or if refused, the thread keeps its priority.
    """
    import sys

    try:
        if sys.platform.startswith("linux"):
            os.setpriority(os.PRIO_PROCESS, native_id or threading.get_native_id(), NICE)
        elif sys.platform == "darwin" and native_id is None:
            import ctypes

            qos_class_background = 0x09
            ctypes.CDLL(None).pthread_set_qos_class_self_np(qos_class_background, 0)
    except (OSError, AttributeError, ValueError) as exc:
        log.debug("kvstore: background thread keeps its priority (%s)", exc)


def _share_priority(native_id):
    """Give thread ``native_id`` the calling thread's priority (Linux: one thread may set
    another's niceness; raising it back needs privilege or RLIMIT_NICE). True if done."""
    import sys

    if native_id is None or not sys.platform.startswith("linux"):
        return False
    try:
        os.setpriority(os.PRIO_PROCESS, native_id, os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return True
    except OSError as exc:
        log.debug("kvstore: the writer keeps its low priority while a caller waits (%s)", exc)
        return False


@dataclass
class Write:
    """One queued snapshot: ``cache`` holds exactly ``tokens`` of model ``fp``."""

    fp: str
    tokens: list
    cache: list
    tier: str
    nbytes: int = field(default=0)
    tenant: object = None


class WriteBehind:
    """A bounded queue of snapshots and the one thread that writes them.

    ``count(name, n=1)`` receives the queue's counters (``writes.queued`` /
    ``done`` / ``dropped`` / ``failed``, ``queue.waits``, ``bytes.written``).
    """

    def __init__(self, store, size, policy, timeout, count):
        self.store = store
        self.size = size
        self.policy = policy
        self.timeout = timeout
        self.count = count
        self.queue = deque()
        self.busy = 0
        self.closed = False
        self.cv = threading.Condition()
        self.thread = None
        self.on_write = None  # on_write(seconds, ok) after each write, on the writer thread
        self.waiting = 0  # callers blocked on the writer (submit waiting for room, flush)
        self.raised = False  # the writer runs at a waiting caller's priority

    def submit(self, item):
        with self.cv:
            if self.closed:
                self.count("writes.dropped")
                return False
            if len(self.queue) >= self.size:
                if self.policy == "wait":
                    t = time.monotonic()
                    self._wait(lambda: len(self.queue) < self.size or self.closed, self.timeout)
                    self.count("queue.waits")
                    self.count("queue.wait_ms", int((time.monotonic() - t) * 1000))
                if len(self.queue) >= self.size or self.closed:
                    self.count("writes.dropped")
                    return False
            self.queue.append(item)
            self.count("writes.queued")
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="kvstore-writer", daemon=True)
                self.thread.start()
            self.cv.notify_all()
            return True

    def _wait(self, predicate, timeout):
        """Wait on the queue's condition (held) with the writer at this caller's
        priority; the last caller to stop waiting lowers it again."""
        self.waiting += 1
        try:
            if not self.raised and self.thread is not None and not predicate():
                self.raised = _share_priority(self.thread.native_id)
            return self.cv.wait_for(predicate, timeout)
        finally:
            self.waiting -= 1
            if self.raised and not self.waiting:
                lower_priority(self.thread.native_id)
                self.raised = False

    def _run(self):
        with self.cv:
            if not self.raised:  # else a caller waits already: it lowers the thread when done
                lower_priority()
        while True:
            with self.cv:
                self.cv.wait_for(lambda: self.queue or self.closed)
                if not self.queue:
                    return
                item = self.queue.popleft()
                self.busy = 1
                self.cv.notify_all()
            try:
                self._write(item)
            finally:
                item = None
                with self.cv:
                    self.busy = 0
                    self.cv.notify_all()

    def _write(self, item):
        store = self.store
        before = store.counters["bytes_written"]
        t0 = time.perf_counter()
        try:
            key = store.put(item.fp, item.tokens, item.cache, item.tier, tenant=item.tenant)
        except Exception as exc:  # fail open: a bad snapshot is a dropped write
            log.warning("kvstore write of %d tokens failed: %s: %s", len(item.tokens), type(exc).__name__, exc)
            key = None
        if key is None:
            self.count("writes.failed")
            self.count("disk.faults")
        else:
            self.count("writes.done")
            self.count("bytes.written", max(0, store.counters["bytes_written"] - before))
        if self.on_write is not None:
            try:
                self.on_write(time.perf_counter() - t0, key is not None)
            except Exception as exc:
                log.debug("kvstore: write observer failed: %s", exc)

    def depth(self):
        with self.cv:
            return len(self.queue), self.busy

    def flush(self, timeout=None):
        with self.cv:
            return self._wait(lambda: not self.queue and not self.busy, timeout)

    def close(self, timeout=None):
        done = self.flush(timeout)
        with self.cv:
            self.closed = True
            lost = len(self.queue)
            self.queue.clear()
            self.cv.notify_all()
        if lost:
            self.count("writes.dropped", lost)
        if self.thread is not None:
            self.thread.join(timeout)
        return done


def shutdown(writer, store, timeout):
    """Write what is queued, stop the writer, close an owned store (also at exit or collection)."""
    done = writer.close(timeout)
    if store is not None and (writer.thread is None or not writer.thread.is_alive()):
        try:
            store.close()
        except Exception as exc:
            writer.count("disk.faults")
            log.warning("kvstore close failed: %s: %s", type(exc).__name__, exc)
    return done
