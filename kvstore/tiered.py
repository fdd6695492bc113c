"""TieredPromptCache: a memory tier in front of a SnapshotStore.

This module owns the choice between a memory and a disk hit, the promotion
of disk hits into memory, the resolution of mlx_lm.server model keys to
fingerprints and the hit / miss / write counters. The memory tier is
``kvstore.memory`` (mlx-lm's ``LRUPromptCache``), the write-behind queue
``kvstore.writer``.

It must never: let a store fault reach the caller (faults are logged,
counted and become misses or dropped writes), hand out a cache that another
caller or the memory tier shares mutable state with, return an empty
remainder, or do disk I/O or serialisation on the caller's thread when
inserting. Arrays are evaluated on the caller's thread before they are
queued (MLX evaluates a graph only on the thread that made it); an insert
may defer that until the caller says (``kvstore.pending``).

Prompt normalisation (volatile header lines in system prompts) is not done
here: the cache sees tokens, and a line can only be removed exactly from the
text before it is tokenised. ``kvstore.session.normalize_messages`` does it
for the session and for servers that hold the request messages.
"""

import copy
import logging
import threading
import time
import weakref
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from . import notices
from .fingerprint import LAYOUT_OPTIONS, fingerprint
from .keys import tenant_salt
from .memory import MemoryTier
from .pending import Pending, at_exit
from .preload import preload_plan
from .promotion import Promoter, Ticket, cache_nbytes
from .records import TIERS
from .writer import POLICIES, Write, WriteBehind

log = logging.getLogger("kvstore")

@dataclass
class Fetched:
    """What ``TieredPromptCache.fetch`` found for a prompt.

    ``cache`` is an independent cache holding ``reused`` tokens (``None`` on a
    miss), ``rest`` the tokens still to prefill (never empty when the prompt is
    not), ``source`` ``"memory"``, ``"disk"``, ``"remote"`` or ``None``, ``tier`` the tier
    of the entry served and ``kind`` ``"exact"``, ``"shorter"`` or ``"longer"``.
    """

    cache: list | None
    rest: list
    reused: int = 0
    source: str | None = None
    tier: str | None = None
    kind: str | None = None


def _as_list(tokens):
    return tokens.tolist() if hasattr(tokens, "tolist") else list(tokens)


_ATOMIC = frozenset((int, float, str, bool, type(None)))


def _detach(obj, found):
    """A copy of a cache's structure that shares its arrays; the copies' arrays appended to ``found``.

    New cache objects and containers, so nothing the caller does to its own
    objects (an offset moved, a state list slot replaced) reaches the copy;
    each array gets a handle of its own on the same buffer (``__copy__``):
    the caller's ``a[i] = x`` rebinds only its handle, and MLX copies a
    buffer that two handles share before writing into it. This runs on the
    caller's thread for every insert, so the common types are tested by
    identity first and an object's attributes are copied in one loop.
    """
    t = type(obj)
    if t is mx.array:
        a = obj.__copy__()
        found.append(a)
        return a
    if t in _ATOMIC:
        return obj
    if t is list:
        return [_detach(x, found) for x in obj]
    if t is tuple:
        return tuple(_detach(x, found) for x in obj)
    if isinstance(obj, mx.array):
        a = copy.copy(obj)
        found.append(a)
        return a
    if isinstance(obj, (int, float, str, bool)):
        return obj
    if isinstance(obj, list):
        return [_detach(x, found) for x in obj]
    if isinstance(obj, tuple):
        return tuple(_detach(x, found) for x in obj)
    d = getattr(obj, "__dict__", None)
    if d is None:
        return copy.deepcopy(obj)
    new = object.__new__(t)
    nd = new.__dict__
    for k, v in d.items():
        tv = type(v)
        if tv is mx.array:
            v = v.__copy__()
            found.append(v)
        elif tv not in _ATOMIC:
            v = _detach(v, found)
        nd[k] = v
    return new


def _local_dir(path):
    """A local directory for a model path or a Hugging Face repo already downloaded."""
    if path is None:
        return None
    if Path(path).is_dir():
        return Path(path)
    from mlx_lm.utils import hf_repo_to_path

    return hf_repo_to_path(str(path))


class _Counts:
    """Counters shared by the caller's thread and the writer thread."""

    def __init__(self):
        self.counts = Counter()
        self.lock = threading.Lock()

    def __call__(self, name, n=1):
        with self.lock:
            self.counts[name] += n

    def snapshot(self):
        with self.lock:
            return dict(self.counts)


class TieredPromptCache:
    """A prompt cache with the interface of mlx-lm's ``LRUPromptCache`` and a disk tier.

    Args:
        store_or_path: a ``SnapshotStore``, a store directory (opened and owned),
            or ``None`` for a memory-only cache.
        max_size: most entries kept in memory (as ``LRUPromptCache``).
        max_bytes: most bytes kept in memory (``None``: no limit).
        persist: tiers written to disk on insert (``"assistant"`` is optional).
        queue_size: snapshots the write-behind queue holds.
        queue_policy: what an insert does when the queue is full: ``"drop"``
            (never wait; the snapshot stays in memory only and
            ``writes.dropped`` counts it) or ``"wait"`` (wait up to
            ``queue_timeout`` seconds, then drop and count).
        queue_timeout: the longest wait of the ``"wait"`` policy, in seconds.
        log_interval: seconds between counter log lines (``None``: never).
        exit_timeout: seconds an interpreter exit waits for queued writes.
        store_options: keyword arguments for ``SnapshotStore`` when a path is given.
        remote: a Redis URL or ``kvstore.remote.RemoteTier`` behind the local store (see
            ``kvstore.remote``); ``remote_options`` are ``RemoteTier`` keyword arguments.
        **cache_options: ``kv_bits``, ``kv_group_size``, ``quantized_kv_start``,
            ``max_kv_size``: the cache recipe the server uses, part of the
            fingerprint of an mlx_lm.server model key.

    ``model`` arguments are a fingerprint string (see ``kvstore.fingerprint``),
    an mlx_lm.server model key ``(model_path, adapter_path, draft_path)``
    (fingerprinted once), or any other hashable, which keeps its entries in
    memory only. ``tenant`` (a string or bytes salt, default none) gives each
    tenant its own namespace in memory and on disk: one tenant never gets
    another's cache, even for the same tokens. Not thread-safe, like ``LRUPromptCache``; the writer thread
    never touches the memory tier.
    """

    def __init__(self, store_or_path=None, max_size=10, max_bytes=None, *, persist=("system", "user"),
                 queue_size=64, queue_policy="drop", queue_timeout=1.0, log_interval=60.0,
                 exit_timeout=30.0, store_options=None, remote=None, remote_options=None, **cache_options):
        unknown = set(cache_options) - set(LAYOUT_OPTIONS)
        if unknown:
            raise TypeError(f"unknown cache options: {sorted(unknown)} (known: {LAYOUT_OPTIONS})")
        if queue_policy not in POLICIES:
            raise ValueError(f"queue_policy must be one of {POLICIES}, got {queue_policy!r}")
        if not set(persist) <= set(TIERS):
            raise ValueError(f"persist must name tiers among {TIERS}, got {persist!r}")
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self.cache_options = cache_options
        self.persist = tuple(persist)
        self.queue_size, self.queue_policy = queue_size, queue_policy
        self.log_interval = log_interval
        self.exit_timeout = exit_timeout
        self._memory = MemoryTier(max_size, max_bytes)
        self._count = _Counts()
        self._fps = {}
        self._last_log = time.monotonic()
        self._owns_store = False
        self.store = None
        if store_or_path is not None:
            if isinstance(store_or_path, (str, Path)):
                from .store import SnapshotStore

                try:
                    self.store = SnapshotStore(store_or_path, **(store_options or {}))
                    self._owns_store = True
                except Exception as exc:
                    self._fault("open", exc)
                    log.warning("kvstore: serving from memory only")
            else:
                self.store = store_or_path
        if remote is not None:
            from .remote import attach

            if store_or_path is None:
                raise ValueError("a remote tier needs a local store (memory -> local store -> remote)")
            if self.store is not None:  # a store that failed to open leaves memory only
                attach(self.store, remote, **(remote_options or {}))
        self._writer = self._pending = None
        self._promoter = Promoter(self.store, self._count) if self.store is not None else None
        self._store_counters = self.store.counters if self.store is not None else None
        if self.store is not None and not getattr(self.store, "readonly", False):
            self._writer = WriteBehind(self.store, queue_size, queue_policy, queue_timeout, self._count)
            self._pending = Pending(self._writer.submit, self._count)
            # the queue is written at interpreter exit or when the cache is collected
            self._finalize = weakref.finalize(self, at_exit, self._pending, self._writer,
                                              self.store if self._owns_store else None, exit_timeout)

    # -------------------------------------------------------------- counting
    def _fault(self, what, exc):
        self._count("disk.faults")
        self._count(f"disk.faults.{what}")
        log.warning("kvstore %s failed: %s: %s", what, type(exc).__name__, exc)

    def counters(self):
        """Hits, misses, reuse, bytes and queue state as a flat dict.

        ``hits.memory`` / ``hits.disk`` (and ``.system`` / ``.user`` /
        ``.assistant`` by the tier served), ``misses`` (nothing served),
        ``misses.memory`` (memory had nothing usable), ``misses.disk`` (the
        disk was consulted and had nothing longer), ``tokens.requested``,
        ``tokens.reused`` (``.memory`` / ``.disk``), ``bytes.read``,
        ``bytes.written``, ``writes.deferred`` (inserts with ``defer=True``),
        ``writes.queued`` / ``done`` / ``dropped`` / ``failed``, ``queue.waits``, ``queue.depth``, ``queue.in_flight``,
        ``disk.faults``, ``faults`` (every fault once, the store's failed
        loads included), ``disk.skipped`` (memory served every full key block:
        no lookup), ``preload.done`` / ``preload.skipped`` / ``preload.dropped``
        (loaded, over the budget, no room left in memory),
        ``promotions.waits`` / ``promotions.taken`` (a fetch waited for a load,
        took a queued preload itself) and the memory tier's ``memory.entries`` /
        ``memory.bytes`` / ``memory.evicted``.
        """
        out = self._count.snapshot()
        for name in ("fetches", "hits", "misses", "hits.memory", "hits.disk", "hits.remote", "misses.memory",
                     "misses.disk",
                     "tokens.requested", "tokens.reused", "bytes.read", "bytes.written", "writes.queued",
                     "writes.done", "writes.dropped", "writes.failed", "disk.faults"):
            out.setdefault(name, 0)
        depth, busy = self._writer.depth() if self._writer else (0, 0)
        out.update({
            "queue.depth": depth, "queue.in_flight": busy, "queue.size": self.queue_size,
            "queue.policy": self.queue_policy,
            "memory.entries": len(self._memory), "memory.bytes": self._memory.nbytes,
        })
        if self._store_counters is not None:
            # faults the store absorbed itself (corrupt or missing blobs, I/O errors)
            sc = self._store_counters
            out.update({f"store.{k}": sc[k] for k in ("faults", "misses.corrupt", "put_failures", "quarantined")})
        # every fault once: the store's own (failed loads among them) and this cache's (a failed
        # write is counted by both)
        out["faults"] = out["disk.faults"] + out.get("store.faults", 0) - out.get("store.put_failures", 0)
        if getattr(self.store, "remote", None) is not None:
            out.update(self.store.remote.stats())
        return out

    def _maybe_log(self):
        if not self.log_interval or time.monotonic() - self._last_log < self.log_interval:
            return
        self._last_log = time.monotonic()
        c = self.counters()
        log.info(
            "kvstore cache: %d fetches, %d memory hits, %d disk hits, %d misses, %d/%d tokens reused, "
            "%d bytes read, %d bytes written, %d writes dropped, %d faults, queue %d/%d",
            c["fetches"], c["hits.memory"], c["hits.disk"], c["misses"], c["tokens.reused"],
            c["tokens.requested"], c["bytes.read"], c["bytes.written"], c["writes.dropped"],
            c["faults"], c["queue.depth"], c["queue.size"],
        )

    # ------------------------------------------------------------ model keys
    def fingerprint_of(self, model):
        """The fingerprint ``model`` stores under, or ``None`` (memory only)."""
        if isinstance(model, str):
            return model
        if not isinstance(model, tuple):
            return None
        if model not in self._fps:
            path, adapter, draft = (tuple(model) + (None, None, None))[:3]
            try:
                self._fps[model] = fingerprint(
                    _local_dir(path), adapter_path=_local_dir(adapter), draft_model=_local_dir(draft),
                    digests=getattr(self.store, "file_digests", None), **self.cache_options,
                )
            except Exception as exc:
                self._fps[model] = None
                self._count("models.unresolved")
                log.warning("kvstore: cannot fingerprint model %r (%s: %s); its caches stay in memory",
                            model, type(exc).__name__, exc)
        return self._fps[model]

    def _key(self, model, tenant=None):
        salt = tenant_salt(tenant)  # InvalidInput for an empty or non-string tenant
        fp = self.fingerprint_of(model)
        key = model if fp is None else fp
        return (key if salt is None else ("kvstore.tenant", salt, key)), fp

    # ------------------------------------------------------- LRUPromptCache API
    def __len__(self):
        return len(self._memory)

    @property
    def nbytes(self):
        """Bytes held by the memory tier."""
        return self._memory.nbytes

    def stats_by_type(self):
        """``{tier: {"n_sequences", "n_bytes"}}`` of the memory tier (as ``LRUPromptCache``)."""
        return self._memory.stats_by_type()

    def trim_to(self, *, n_sequences=None, n_bytes=None):
        """Evict memory entries (assistant first, system last) down to the limits."""
        self._promoted()
        self._count("memory.evicted", self._memory.trim_to(n_sequences=n_sequences, n_bytes=n_bytes))

    def fetch_nearest_cache(self, model, tokens, *, tenant=None):
        """``(cache, rest)`` as ``LRUPromptCache.fetch_nearest_cache``, except that
        ``rest`` is never empty: an exact hit serves one token less (trimmed
        for trimmable caches; a non-trimmable exact entry falls back to the
        best shorter checkpoint in memory or on disk)."""
        got = self.fetch(model, tokens, tenant=tenant)
        return got.cache, got.rest

    def fetch(self, model, tokens, *, tenant=None):
        """Find the best cache for ``tokens`` in memory and on disk; see ``Fetched``."""
        tokens = _as_list(tokens)
        key, fp = self._key(model, tenant)
        self._count("fetches")
        self._count("tokens.requested", len(tokens))
        self._promoted()
        plan = self._memory.plan(key, tokens)
        mem_n = plan[1] if plan else 0
        if self._promoter is not None and mem_n < len(tokens) - 1 and self._promoter.wait_for(key, tokens, mem_n):
            # the snapshot is on its way into memory: take it from there, not from the disk again
            self._promoted()
            plan = self._memory.plan(key, tokens)
            mem_n = plan[1] if plan else 0
        if self._promoter is not None:
            self._promoter.yield_to_requests()  # what is still preloading goes on behind requests
        if plan is None:
            self._count("misses.memory")
        got = None
        if self.store is not None and fp is not None and mem_n < len(tokens) - 1:
            if self._disk_adds_little(mem_n, len(tokens)):
                self._count("disk.skipped")
            else:
                got = self._fetch_disk(key, fp, tokens, mem_n, tenant)
        if got is None and plan is not None:
            held, n, kind = plan
            cache, tier = self._memory.checkout(key, held, n)
            got = Fetched(cache, tokens[n:], n, "memory", tier, kind)
        if got is None:
            self._count("misses")
            got = Fetched(None, tokens)
        else:
            self._count("hits")
            self._count(f"hits.{got.source}")
            self._count(f"hits.{got.source}.{got.tier}")
            self._count("tokens.reused", got.reused)
            self._count(f"tokens.reused.{got.source}", got.reused)
        self._maybe_log()
        return got

    def _disk_adds_little(self, mem_n, n):
        """True if memory serves every full key block of an ``n``-token request: the disk could
        add less than a block (the tail of a longer match in the last one), not worth a lookup."""
        block = getattr(self.store, "block", None)
        return bool(block) and mem_n > 0 and mem_n >= (n - 1) // block * block

    def _fetch_disk(self, key, fp, tokens, mem_n, tenant=None):
        store = self.store
        read = store.counters["bytes_read"]
        try:
            # looks only for a match longer than what memory can serve
            cache, rest, match = store.fetch(fp, tokens, min_tokens=mem_n, tenant=tenant)
        except Exception as exc:
            self._fault("fetch", exc)
            return None
        self._count("disk.lookups")
        self._count("bytes.read", max(0, store.counters["bytes_read"] - read))
        if cache is None:
            self._count("misses.disk")
            return None
        n = match.tokens
        tier = match.tier if match.tier in TIERS else "user"
        # the caller keeps the loaded cache (nobody else holds its buffers, so its first
        # write copies nothing); memory gets its own copy, read on another thread
        self._promoter.submit(Ticket(key, tokens[: n + 1], n, fp, tier, tenant))
        return Fetched(cache, tokens[n:], n, match.source, tier, match.kind)

    def _promoted(self):
        """Put the caches promotion has loaded into the memory tier (on the caller's thread)."""
        if self._promoter is None:
            return
        for t in self._promoter.drain():
            if t.budget is not None and not self._memory.fits(cache_nbytes(t.cache)):
                self._count("preload.dropped")  # requests filled memory first: never evict for a preload
                continue
            self._memory_insert(t.key, t.tokens[: t.n], t.cache, t.tier)

    def preload(self, model):
        """Load ``model``'s snapshots most likely to be asked for into memory, in the background.

        System tier first, then user, then assistant; within a tier most hits
        first, then most recently used; as many as the memory tier has room
        for (entries and bytes) without evicting anything. Returns at once:
        the store is read on the promotion thread, and the loaded caches
        enter memory at the next call on the owner's thread. A fetch whose
        snapshot is loading meanwhile waits for that load instead of reading
        the disk again. Un-tenanted snapshots only. Returns False (and does
        nothing) without a disk tier.
        """
        if self._promoter is None or self.store is None:
            return False
        entries, nbytes = self._memory.room()
        store = self.store
        self._promoter.plan(lambda: preload_plan(store, self._key, model, entries, nbytes))
        self._count("preload.started")
        return True

    def settle(self, timeout=None):
        """Wait until preloading and promotions are done, then put what they loaded into
        memory (on the caller's thread); False if ``timeout`` passed first."""
        idle = self._promoter.idle(timeout) if self._promoter is not None else True
        self._promoted()
        return idle

    def insert_cache(self, model, tokens, prompt_cache, *, cache_type="assistant", tenant=None, defer=False):
        """Keep ``prompt_cache`` (prefilled with exactly ``tokens``) in memory and,
        for persisted tiers, queue it for the disk.

        The cache's structure is copied (MLX arrays are values: a buffer is
        copied the first time either side writes to it), so the caller may go
        on using its cache. The caller's thread evaluates the arrays and
        queues them; encoding and I/O happen on the writer thread. With
        ``defer=True`` the evaluation waits until this thread calls
        ``write_deferred``, an insert without ``defer``, ``flush`` or
        ``close``: a checkpoint taken in the middle of a prefill then costs
        the request nothing before its first token. An insert without
        ``defer`` first queues what this thread deferred.
        """
        if cache_type not in TIERS:
            raise ValueError(f"cache_type must be one of {TIERS}, got {cache_type!r}")
        tokens = _as_list(tokens)
        key, fp = self._key(model, tenant)
        self._promoted()
        persist = self._writer is not None and fp is not None and cache_type in self.persist and tokens
        if self._writer is not None and fp is not None and cache_type not in self.persist:
            notices.memory_only(cache_type, self.persist)
        if self._pending is not None and not defer:
            self._pending.release()
        found = []
        cache = _detach(prompt_cache, found)
        if persist and not defer:
            mx.eval(found)
        self._count("inserts")
        self._count(f"inserts.{cache_type}")
        self._memory_insert(key, tokens, cache, cache_type)
        if persist:
            write = Write(fp, tokens, cache, cache_type, tenant=tenant)
            if defer:
                self._pending.hold(write)
            else:
                self._writer.submit(write)
        self._maybe_log()

    def write_deferred(self, prefix=None):
        """Evaluate and queue the checkpoints this thread inserted with ``defer=True``.

        ``prefix`` (tokens): only the checkpoints of that prompt (those whose
        tokens begin it), not those of other requests still before their
        first token. Returns how many were queued.
        """
        if self._pending is None:
            return 0
        return self._pending.release(None if prefix is None else _as_list(prefix))

    def _memory_insert(self, key, tokens, cache, cache_type):
        self._count("memory.evicted", self._memory.insert(key, tokens, cache, cache_type))

    def on_write(self, fn):
        """Call ``fn(seconds, ok)`` on the writer thread after each snapshot write (metrics)."""
        if self._writer is not None:
            self._writer.on_write = fn

    # -------------------------------------------------------------- life cycle
    def flush(self, timeout=None):
        """Wait until every queued snapshot is written; ``False`` on timeout.

        Checkpoints this thread deferred are queued first; those another
        thread deferred stay with it.
        """
        if self._pending is not None:
            self._pending.release()
        return self._writer.flush(timeout) if self._writer else True

    def close(self, timeout=None):
        """Write what is queued (deferred checkpoints first), stop the writer and close an owned store.

        The memory tier stays usable (memory only). Returns ``False`` if
        ``timeout`` passed first; snapshots still queued then are dropped
        and counted.
        """
        store, self.store = self.store, None
        if self._promoter is not None:
            self._promoter.close()
            self._promoter = None
        if self._writer is None:
            if self._owns_store and store is not None:
                store.close()
            return True
        writer, self._writer = self._writer, None
        pending, self._pending = self._pending, None
        self._finalize.detach()
        return at_exit(pending, writer, store if self._owns_store else None, timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
