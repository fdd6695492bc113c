"""The remote tier: snapshots shared between hosts through Redis (or Valkey).

Layers are memory -> local store -> remote. ``SnapshotStore.fetch`` asks
the remote (``RemoteTier.fetch``) when its own best match is shorter than
the request allows: one lookup call over the request's block links
(``backends.redis_index``), ``kvstore.matching.plan_fetch`` over what came
back (the same rules as a local hit: stored tokens compared, non-trimmable
snapshots only at their exact length, never an empty remainder), then one
pipeline of chunk GETs whose bytes are checked (chunk digests, then the
blob's own header and row checksums as ``kvstore.loader`` reads them
straight out of the fetched chunks into the cache's buffers). The caller
gets that cache; the bytes are written into the local store behind the
request, so the next request is a local hit. Local puts of the tiers in
``push`` are sent to the remote behind the request by the same thread.

The tier fails open: a fault (Redis down, slow, full, refusing auth) is
counted, logged once per outage, and the remote is left alone for a
growing back-off (1 s up to 30 s), so a dead remote costs a request nearly
nothing. A bundle that is unsigned or signed with another secret (when a
secret is set), of another format version, damaged or missing chunks is a
miss; a bundle whose chunks were evicted or expired is removed.
"""

import logging
import os
import threading
import time
from collections import Counter, OrderedDict, deque

from .backends.inmemory import InMemoryIndex
from .backends.redis_index import RedisPlace, redact
from .blobs import BlobReader
from .errors import CorruptSnapshot, FormatVersionError, InvalidInput, KVStoreError
from .loader import load
from .matching import MAX_CANDIDATES, plan_fetch
from .records import TIERS, decode_model, decode_snapshot, pack
from .transactions import check_layout
from .transfer import (CHUNK_BYTES, ChunkMissing, ChunkSource, OutOfOrder, StreamSource, check_chunks,
                       decode_bundle)

log = logging.getLogger("kvstore")

SECRET_ENV = "KVSTORE_REMOTE_SECRET"
BACKOFF = (1.0, 30.0)
# recent remote hits whose bytes are kept until they are in the local store
HELD = 4
LOAD_FAULTS = (KVStoreError, OSError, KeyError, TypeError, ValueError, IndexError, AttributeError,
               OverflowError, MemoryError, RuntimeError)


def _faults():
    import redis

    return (redis.exceptions.RedisError, OSError)


def ns_id(fingerprint, block):
    """The hash tag of one model's keys on the remote (tenants are told apart by their links)."""
    import hashlib

    return hashlib.blake2b(f"{fingerprint}|{block}".encode(), digest_size=8).hexdigest()


def read_secret(secret=None, secret_file=None):
    """The shared secret: ``secret``, the contents of ``secret_file``, or ``$KVSTORE_REMOTE_SECRET``
    (``None`` when none is set)."""
    if secret is None and secret_file is not None:
        try:
            with open(secret_file, "rb") as f:
                secret = f.read().strip()
        except OSError as exc:
            raise InvalidInput(f"cannot read the remote secret file {secret_file}: {exc.strerror}") from None
        if not secret:
            raise InvalidInput(f"the remote secret file {secret_file} is empty")
    if secret is None:
        secret = os.environ.get(SECRET_ENV) or None
    return secret.encode() if isinstance(secret, str) else secret


class _Prefetched:
    """An ``IndexReader`` over what one lookup returned (for ``plan_fetch``).

    A level the lookup listed without its bundles (by its ends' keys, or by
    their lengths only) is resolved when the plan first asks about it:
    ``resolve(link, keys)`` gets, in one more call, the records of those of
    the request's own keys that end there (for a level listed by keys, only
    the ones that matched).
    """

    def __init__(self, chain, k, ends, through, records, resolve=None, asked=()):
        self.level = {link: i for i, link in enumerate(chain.links[: len(chain) // chain.block + 1])}
        self.k, self.records, self.resolve = k, records, resolve
        self.asked = set(asked)  # keys whose bundles came already (a refused one is not asked for again)
        self.ends, self.lengths = {}, {}
        for lvl, items in ends.items():
            self.ends[lvl] = sorted((n, bytes.fromhex(key)) for n, key in items if key)
            self.lengths[lvl] = sorted({n for n, key in items if not key})
        self.through = [bytes.fromhex(t) for t in through]

    def snapshot(self, key):
        return self.records.get(key)

    def passes_through(self, link):
        lvl = self.level.get(link)
        return lvl is not None and lvl <= self.k

    def links_through(self, link, limit):
        return self.through[:limit] if self.level.get(link) == self.k else []

    def ends_at(self, link, limit=None):
        items = self.ends.get(self.level.get(link), [])
        return items if limit is None else items[:limit]

    def ends_matching(self, link, below, key_of):
        lvl = self.level.get(link)
        found = {n for n, key in self.ends.get(lvl, ()) if 0 < n < below and key == key_of(n)}
        ask = found | {n for n in self.lengths.get(lvl, ()) if 0 < n < below}
        missing = [key_of(n) for n in ask if key_of(n) not in self.records and key_of(n) not in self.asked]
        if missing and self.resolve is not None:
            self.asked.update(missing)
            self.records.update(self.resolve(link, missing))
        return sorted((n for n in ask if key_of(n) in self.records), reverse=True)

    def segment(self, seg_id):
        return None

    def model(self, fingerprint):
        return None


class _FetchedBlobs:
    """``Blobs`` for the loader: blobs whose chunks were fetched and checked."""

    def __init__(self, bundle, chunks):
        self.bundle, self.chunks = bundle, chunks

    def open(self, blob_id, size=None, header_sum=None):
        spec = self.bundle.spec(blob_id)
        return BlobReader(ChunkSource(self.chunks[blob_id], spec.chunk), blob_id, size, header_sum)


class _StreamedBlobs:
    """``Blobs`` for the loader: each blob's chunks received as it is opened, in ``order``."""

    def __init__(self, bundle, stream, order):
        self.bundle, self.stream, self.order = bundle, stream, list(order)

    def open(self, blob_id, size=None, header_sum=None):
        if not self.order or self.order[0] != blob_id:
            raise OutOfOrder(f"blob {blob_id} opened out of order")
        self.order.pop(0)
        spec = self.bundle.spec(blob_id)
        return BlobReader(StreamSource(self.stream, spec, self.bundle.digest), blob_id, size, header_sum)


class RemoteTier:
    """Snapshots shared through one Redis deployment.

    Args:
        url: ``redis://[user:password@]host:port/db``, ``rediss://...`` (TLS) or ``unix://path``.
        prefix: the deployment's key prefix (hosts sharing snapshots use the same one).
        secret: shared secret (bytes or str); default ``$KVSTORE_REMOTE_SECRET``; with one,
            bundles are signed and unsigned or foreign-signed ones refused.
        secret_file: a file holding the secret (instead of ``secret``).
        ttl: seconds a pushed snapshot lives on the remote (``None``: until evicted or pruned).
        push: tiers of local puts pushed to the remote.
        chunk_bytes: bytes per value on the remote.
        connect_timeout, timeout: seconds a connect / a reply may take.
        queue_size: pushes and local writes waiting at most (more are dropped and counted).
    """

    def __init__(self, url, *, prefix="kvstore", secret=None, secret_file=None, ttl=None, push=("system", "user"),
                 chunk_bytes=CHUNK_BYTES, connect_timeout=0.5, timeout=5.0, queue_size=64):
        bad = set(push) - set(TIERS)
        if bad:
            raise InvalidInput(f"remote push tiers must be among {TIERS}, got {sorted(bad)}")
        if ttl is not None and ttl <= 0:
            raise InvalidInput(f"remote ttl must be positive seconds, got {ttl}")
        self.place = RedisPlace(url, prefix, connect_timeout, timeout)
        self.url, self.name = url, redact(url)
        self.secret = read_secret(secret, secret_file)
        self.ttl, self.push_tiers, self.chunk_bytes = ttl, tuple(push), int(chunk_bytes)
        self.digest = "blake3" if self.secret else "xxh3"
        self.counters = Counter()
        self._lock = threading.Lock()
        self._down, self._down_until, self._backoff = False, 0.0, BACKOFF[0]
        self._held = OrderedDict()  # key -> (bundle, chunks): hits not yet in the local store
        self.queue_size = queue_size
        self._jobs, self._busy, self._closed = deque(), 0, False
        self._adopting = 0  # local writes of hits queued or running
        self._cv = threading.Condition()
        self._thread = None

    # ------------------------------------------------------------- accounting
    def count(self, name, n=1):
        with self._lock:
            self.counters[f"remote.{name}"] += n

    def available(self):
        """False while the remote is left alone after a fault (its back-off)."""
        return not self._down or time.monotonic() >= self._down_until

    def _call(self, fn):
        """``fn()``, or ``None`` after a fault (counted, logged once per outage, backed off)."""
        if not self.available():
            self.count("skipped")
            return None
        try:
            out = fn()
        except _faults() as exc:
            self._outage(exc)
            return None
        if self._down:
            with self._lock:
                self._down, self._backoff = False, BACKOFF[0]
            log.warning("kvstore remote %s is back", self.name)
        return out

    def _outage(self, exc):
        self.count("faults")
        with self._lock:
            first = not self._down
            self._down = True
            self._down_until = time.monotonic() + self._backoff
            self._backoff = min(BACKOFF[1], self._backoff * 2)
        if first:
            log.warning("kvstore remote %s unavailable (%s: %s); serving without it until it answers",
                        self.name, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        self.place.close()  # reconnect from scratch next time

    def probe(self):
        """Connect now; True if the remote answers (else warn once and go on without it)."""
        return bool(self._call(lambda: self.place.open().ping()))

    # ------------------------------------------------------------------ fetch
    def fetch(self, store, fp, chain, min_tokens=0):
        """``(cache, Plan)`` from the remote for ``chain``'s tokens serving more than
        ``min_tokens``, or ``None``. Faults and bad bundles are misses."""
        m, block = len(chain), chain.block
        if m < 2 or min_tokens >= m - 1:
            return None
        if not self.available():
            self.count("skipped")
            return None
        nsx = ns_id(str(fp), block)
        links = [link.hex() for link in chain.links[: m // block + 1]]
        floor = (min_tokens + 1) // block
        got = self._call(lambda: self.place.lookup(nsx, links, chain.key(m).hex(), floor, m, MAX_CANDIDATES))
        self.count("lookups")
        if got is None or got[0] < 0:
            self.count("misses")
            return None
        k, ends, through, raws = got
        bundles = self._bundles(nsx, raws)

        def resolve(link, keys):  # a crowded level's own keys, or bundles the lookup left out
            raws = self._call(lambda: self.place.resolve(nsx, link.hex(), [key.hex() for key in keys]))
            more = self._bundles(nsx, raws or {})
            bundles.update(more)
            return {key: b.snapshot for key, b in more.items()}

        reader = _Prefetched(chain, k, ends, through, {key: b.snapshot for key, b in bundles.items()}, resolve,
                             asked=(bytes.fromhex(key) for key in raws))
        for plan in plan_fetch(reader, chain, fp, min_tokens=min_tokens).plans:
            cache = self._load(store, fp, chain, plan, bundles[plan.key], nsx)
            if cache is not None:
                self.count("hits")
                self.count("tokens_reused", plan.tokens)
                return cache, plan
        self.count("misses")
        return None

    def _bundles(self, nsx, raws):
        out = {}
        for key_hex, raw in raws.items():
            key = bytes.fromhex(key_hex)
            try:
                out[key] = decode_bundle(raw, key, nsx, self.secret)
            except FormatVersionError:
                self.count("other_version")
            except CorruptSnapshot as exc:
                self.count("refused" if "signed" in str(exc) else "corrupt")
                log.debug("kvstore remote bundle %s refused: %s", key_hex, exc)
        return out

    def _load(self, store, fp, chain, plan, bundle, nsx):
        """Fetch, check and load the blobs ``plan`` needs; ``None`` on any fault (counted)."""
        need = []
        try:
            snap = decode_snapshot(bundle.snapshot)
            model = decode_model(bundle.model)
            known = _local_model(store, fp)
            if known is not None:  # this host's record of the model decides what a layout may be
                check_layout(fp, known, model.struct, snap.layout_id)
            need = _needed(snap, plan.tokens, bundle)
            index = InMemoryIndex()
            index.tables["seg"].update(bundle.segments)
            index.tables["model"][str(fp)] = bundle.model
            try:
                cache, nread, chunks = self._read(index, bundle, need, plan, fp, chain, streamed=True)
            except OutOfOrder:
                self.count("stream_fallbacks")
                cache, nread, chunks = self._read(index, bundle, need, plan, fp, chain, streamed=False)
        except ChunkMissing as exc:
            self.count("evicted")
            log.info("kvstore remote snapshot %s: %s; removing it", plan.key.hex(), exc)
            self._call(lambda: self._forget(nsx, plan.key, bundle, need))
            return None
        except _faults() as exc:  # the connection failed while chunks were arriving
            self._outage(exc)
            return None
        except LOAD_FAULTS as exc:
            self.count("corrupt")
            log.warning("kvstore remote snapshot %s refused: %s: %s", plan.key.hex(), type(exc).__name__, exc)
            return None
        if cache is None:
            return None
        self.count("bytes_read", nread)
        self._hold(plan.key, bundle, chunks, store)
        return cache

    def _read(self, index, bundle, need, plan, fp, chain, streamed):
        """``(cache, bytes read, chunks or None)``: chunks received straight into the cache's
        buffers (``streamed``; not on a cluster), else fetched as values, checked, then copied."""
        held = self._held.get(plan.key)
        specs = [bundle.spec(b) for b in need]
        if held is not None and all(b in held[1] for b in need):
            chunks = held[1]
        elif streamed and self.available():
            stream = self.place.stream_chunks([(s.blob, s.chunks()) for s in specs])
            if stream is not None:
                try:
                    cache, nread = load(index, _StreamedBlobs(bundle, stream, need), plan, fp, chain.tokens)
                finally:
                    stream.finish()
                return cache, nread, None
            chunks = self.place.get_chunks([(s.blob, s.chunks()) for s in specs])
        elif self.available():
            chunks = self.place.get_chunks([(s.blob, s.chunks()) for s in specs])
        else:
            return None, 0, None
        for s in specs:
            check_chunks(s, chunks[s.blob], bundle.digest)
        cache, nread = load(index, _FetchedBlobs(bundle, chunks), plan, fp, chain.tokens)
        return cache, nread, chunks

    def _forget(self, nsx, key, bundle, blobs):
        snap = decode_snapshot(bundle.snapshot)
        self.place.delete_bundle(nsx, key.hex(), snap.end_link.hex(), [link.hex() for link in snap.link_list()])
        for b in blobs:
            self.place.delete_chunks(b, bundle.spec(b).chunks())

    def _hold(self, key, bundle, chunks, store):
        """Queue the local write of a hit; keep its bytes (if it has them as values) until then,
        so a second load reads them from here."""
        if chunks is not None:
            with self._cv:
                self._held[key] = (bundle, chunks)
                self._held.move_to_end(key)
                while len(self._held) > HELD:
                    self._held.popitem(last=False)
        self._submit(("adopt", store, key, bundle, chunks or {}))

    # ------------------------------------------------------------------ push
    def queued_push(self, store, key, tier):
        """Queue a local snapshot for the remote if its tier is pushed (never blocks)."""
        if tier in self.push_tiers:
            self._submit(("push", store, key))

    def push(self, store, key):
        """Send one local snapshot (``key`` hex or bytes) to the remote now; True if sent.
        Faults are counted and ``False``."""
        from .sync import push_snapshot

        kb = bytes.fromhex(key) if isinstance(key, str) else key
        try:
            return bool(self._call(lambda: push_snapshot(self, store, kb)))
        except (CorruptSnapshot, OSError, InvalidInput) as exc:
            self.count("push_failed")
            log.warning("kvstore remote push of %s failed: %s", kb.hex(), exc)
            return False

    # -------------------------------------------------------- the one thread
    def _submit(self, job):
        with self._cv:
            if self._closed or len(self._jobs) >= self.queue_size:
                self.count("dropped")
                return False
            if job[0] == "adopt":
                self._jobs.appendleft(job)  # a host's own hits first
                self._adopting += 1
            else:
                self._jobs.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kvstore-remote", daemon=True)
                self._thread.start()
            self._cv.notify_all()
            return True

    def _run(self):
        from .writer import lower_priority

        lower_priority()
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._jobs or self._closed)
                if not self._jobs:
                    return
                job = self._jobs.popleft()
                self._busy = 1
            try:
                self._do(job)
            except Exception as exc:  # fail open: background work is an optimisation
                self.count("job_failed")
                log.warning("kvstore remote %s failed: %s: %s", job[0], type(exc).__name__, exc)
            finally:
                job = None
                with self._cv:
                    self._busy = 0
                    self._cv.notify_all()

    def _do(self, job):
        from .sync import adopt

        if job[0] == "push":
            if self.push(job[1], job[2]):
                self.count("pushed")
            return
        _kind, store, key, bundle, chunks = job
        try:
            if self._call(lambda: adopt(store, bundle, chunks, self.place)):
                self.count("adopted")
            if self.ttl:  # a snapshot in use stays: its expiry counts from its last hit
                self._call(lambda: self.place.touch(bundle.ns, key.hex(), [(s.blob, s.chunks()) for s in bundle.blobs],
                                                    self.ttl))
        finally:
            with self._cv:
                self._held.pop(key, None)
                self._adopting -= 1
                self._cv.notify_all()

    def wait_adopted(self, timeout=30.0):
        """Wait until the hits served so far are in the local store (or were given up); False on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._adopting or self._closed, timeout)

    def flush(self, timeout=None):
        """Wait until queued pushes and local writes are done; False on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._jobs and not self._busy, timeout)

    def close(self, timeout=30.0):
        """Finish queued work (up to ``timeout`` seconds), then disconnect."""
        done = self.flush(timeout)
        with self._cv:
            self._closed = True
            lost = len(self._jobs)
            self._jobs.clear()
            self._adopting = 0
            self._cv.notify_all()
        if lost:
            self.count("dropped", lost)
        if self._thread is not None:
            self._thread.join(timeout)
        self.place.close()
        return done

    def stats(self):
        """This process's remote counters."""
        with self._lock:
            return dict(self.counters)


def _local_model(store, fp):
    with store.index.read() as r:
        raw = r.model(str(fp))
    return decode_model(raw) if raw is not None else None


def _needed(snap, tokens, bundle):
    """Blob ids (hex) a load of the first ``tokens`` tokens reads: the extents that cover them, the state."""
    out, pos = [], 0
    for e in snap.extents:
        if pos >= tokens:
            break
        out.append(e.segment.hex())
        pos += e.rows
    if snap.state:
        out.append(snap.state.blob.hex())
    for b in out:
        bundle.spec(b)  # every blob read must be one the bundle vouches for
    return out


def remote_info(fp, n, tier, nbytes, created, tenanted):
    """The listing entry kept for a snapshot on the remote."""
    return pack({"fp": str(fp), "n": n, "tier": tier, "b": nbytes, "t": created, "ten": bool(tenanted)})


def attach(store, remote, **options):
    """Give ``store`` a remote tier: a ``RemoteTier`` or a URL (opened with ``options``
    and owned by the store, closed with it). An unreachable remote is a warning, not an
    error: the store serves without it until it answers. Returns the tier."""
    tier = remote if isinstance(remote, RemoteTier) else RemoteTier(remote, **options)
    tier.probe()
    store.remote = tier
    return tier
