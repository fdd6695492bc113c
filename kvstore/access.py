"""Access times and hit counts, batched in memory and written in one small transaction.

A hit must never wait for the index's write lock (another process may hold
it), so ``touch`` only notes the hit; the batch is written off the caller's
thread every few seconds or 256 keys, at ``flush``, and at interpreter exit.
"""

import atexit
import threading
import time
import weakref

from .records import Access, decode_access, encode_access

BATCH = 256


class AccessLog:
    """Pending hits of one store in this process."""

    def __init__(self, index, interval, on_fault):
        self.index, self.interval, self.on_fault = index, interval, on_fault
        self._pending, self._since = {}, None
        self._lock = threading.Lock()
        self._flusher = None
        # what is batched reaches the index even if the process exits without close()
        self._at_exit = _flush_at_exit(weakref.ref(self))
        atexit.register(self._at_exit)

    def touch(self, key, hit=True):
        """Note a use of snapshot ``key`` now: a hit, or (``hit=False``) a put that found
        it stored, which keeps it fresh without counting a hit. Nothing in a read-only store."""
        if self.index.readonly:
            return
        with self._lock:
            _last, hits = self._pending.get(key, (0.0, 0))
            self._pending[key] = (time.time(), hits + int(hit))
            if self._since is None:
                self._since = time.monotonic()
            due = time.monotonic() - self._since >= self.interval or len(self._pending) >= BATCH
            if due and (self._flusher is None or not self._flusher.is_alive()):
                self._flusher = threading.Thread(target=self.flush_quietly, name="kvstore-access", daemon=True)
                self._flusher.start()

    def pending(self):
        with self._lock:
            return bool(self._pending)

    def flush(self):
        """Write the batch in one transaction (``StoreUnavailable`` if it cannot)."""
        with self._lock:
            pending, self._pending, self._since = self._pending, {}, None
        if not pending or self.index.readonly:
            return

        def write(w):
            for key, (t, hits) in pending.items():
                if w.snapshot(key) is None:
                    continue
                old = w.access(key)
                prev = decode_access(old) if old is not None else Access()
                w.put_access(key, encode_access(Access(max(t, prev.accessed), prev.hits + hits)))

        self.index.write(write)

    def flush_quietly(self):
        try:
            self.flush()
        except Exception as exc:  # fail open: hit counts are not worth a crash
            self.on_fault("access-flush", exc)

    def close(self):
        atexit.unregister(self._at_exit)
        flusher = self._flusher
        if flusher is not None and flusher.is_alive():
            flusher.join(timeout=10)
        self.flush_quietly()


def _flush_at_exit(ref):
    def flush():
        log = ref()
        if log is not None and log.pending():
            log.flush_quietly()

    return flush
