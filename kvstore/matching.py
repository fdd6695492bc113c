"""Matching: which stored snapshot may serve a prompt, as pure code.

Given an index view and the token chain of a request, ``plan_fetch`` lists
the safe candidates, best first: the exact entry (trimmable snapshots only:
it is served one token short, so the remainder is never empty), the longest
stored prefix shorter than the request, and the shared prefix of a longer
trimmable snapshot. A snapshot that cannot be trimmed (recurrent state, a
window that has slid) is only ever a candidate at the exact length it was
stored. ``dedup_base`` finds the stored segments a new snapshot can share.

Hashes only find candidates: every plan's record holds the tokens it
serves, compared here. The loader compares them again before a byte is
used. This module reads an ``IndexReader`` and nothing else: no files, no
LMDB, no MLX.
"""

import threading
from dataclasses import dataclass, field

from .errors import CorruptSnapshot
from .keys import shared_prefix
from .records import FORMAT_VERSION, Extent, Snapshot, decode_snapshot, snapshot_from, unpack

MAX_CANDIDATES = 16
MAX_PLANS = 3
# on a tie in tokens served, the preferred kind (an exact-length checkpoint first)
RANK = {"shorter": 0, "exact": 1, "longer": 2}


@dataclass(frozen=True)
class Plan:
    """Serve ``tokens`` tokens of the request from snapshot ``key``.

    ``kind`` is ``"exact"`` (the whole request is stored; served one token
    short), ``"shorter"`` (a stored prefix of the request) or ``"longer"``
    (the shared prefix of a longer trimmable snapshot).
    """

    key: bytes
    tokens: int
    kind: str
    record: Snapshot


@dataclass
class Plans:
    """Candidate plans best first, and the records found damaged on the way."""

    plans: list = field(default_factory=list)
    corrupt: list = field(default_factory=list)  # [(key, CorruptSnapshot)]


@dataclass(frozen=True)
class DedupBase:
    """Extents of stored segments covering the first ``tokens`` tokens of a new snapshot."""

    extents: tuple = ()
    tokens: int = 0


class DecodedRecords:
    """Snapshot records decoded by recent lookups, reused while their bytes are the same.

    Each entry keeps the raw record it was decoded from and is used only when
    the index still holds exactly those bytes (a key deleted and stored again
    is decoded afresh). Holds at most ``size`` records. Thread-safe.
    """

    def __init__(self, size=64):
        self.size = size
        self._map = {}  # key -> (raw, Snapshot), oldest first
        self._lock = threading.Lock()

    def get(self, key, raw):
        hit = self._map.get(key)
        return hit[1] if hit is not None and hit[0] == raw else None

    def put(self, key, raw, rec):
        with self._lock:
            self._map.pop(key, None)
            while len(self._map) >= self.size:
                self._map.pop(next(iter(self._map)))
            self._map[key] = (raw, rec)


class _Records:
    """Records of one model read through one view; damaged ones noted, never raised."""

    def __init__(self, reader, fingerprint, skip, decoded=None):
        self.reader, self.fp, self.skip, self.decoded = reader, str(fingerprint), skip, decoded
        self.corrupt = []
        self._seen = {}

    def get(self, key):
        if key not in self._seen:
            self._seen[key] = self._read(key)
        return self._seen[key]

    def _read(self, key):
        if self.skip is not None and self.skip(key):
            return None
        raw = self.reader.snapshot(key)
        if raw is None:
            return None
        if self.decoded is not None:
            rec = self.decoded.get(key, raw)
            if rec is not None:
                return rec if rec.fingerprint == self.fp else None
        try:
            rec = unpack(raw)
            if rec.get("v") != FORMAT_VERSION or rec.get("fp") != self.fp:
                return None  # another model's or another version's: not ours, not damaged
            rec = snapshot_from(rec)
        except CorruptSnapshot as exc:
            self.corrupt.append((key, exc))
            return None
        if self.decoded is not None:
            self.decoded.put(key, raw, rec)
        return rec


def deepest_link(reader, chain, limit, known=0):
    """The deepest ``k <= limit`` with ``chain.links[k]`` passed through by a stored snapshot (0 if none);
    ``known``: a level already known to be passed through.

    Being passed through is monotonic (a snapshot through block ``k`` passes
    every block before it), so the search gallops up from ``known`` and then
    bisects: it hashes and reads about twice as many levels as the answer
    holds, not the whole prompt.
    """
    lo, hi = known, min(limit, len(chain.links) - 1)
    step = 1
    while lo < hi:
        probe = min(hi, lo + step)
        if not reader.passes_through(chain.links[probe]):
            hi = probe - 1
            break
        lo, step = probe, step * 2
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if reader.passes_through(chain.links[mid]):
            lo = mid
        else:
            hi = mid - 1
    return lo


def common_prefix(record, toks, limit):
    """How many leading tokens of ``toks`` (at most ``limit``) the record holds."""
    return shared_prefix(record.token_ids(), toks, limit)


def plan_fetch(reader, chain, fingerprint, skip=None, min_tokens=0, decoded=None):
    """The safe ``Plan``\\ s for ``chain``'s tokens that serve more than
    ``min_tokens`` tokens, best first (most tokens; on a tie an exact-length
    checkpoint), at most ``MAX_PLANS``.

    ``skip(key)`` leaves out snapshots the caller knows not to try (ones
    that just failed to load). With ``min_tokens`` (what the caller already
    holds), blocks that cannot beat it are not read: any snapshot sharing
    more than ``min_tokens`` tokens passes through the link of block
    ``(min_tokens + 1) // block``. ``decoded`` (a ``DecodedRecords``) reuses
    the records recent calls decoded while the index holds the same bytes.
    """
    records = _Records(reader, fingerprint, skip, decoded)
    m, block, toks = len(chain), chain.block, chain.tokens
    floor = (min_tokens + 1) // block
    if m < 2 or min_tokens >= m - 1 or (floor >= 1 and not reader.passes_through(chain.links[floor])):
        return Plans()  # whatever is served, one token must be left to prefill
    out = []
    k = deepest_link(reader, chain, m // block, floor)
    if k == m // block:  # a snapshot of exactly these tokens passes through every full block
        exact = chain.key(m)
        rec = records.get(exact)
        if rec is not None and rec.n_tokens == m and rec.same_tokens(toks) and rec.trimmable:
            out.append(Plan(exact, m - 1, "exact", rec))
    out += _longer(records, reader, chain, k)
    # a stored prefix matters only if it serves at least what is already planned
    best = max((p.tokens for p in out), default=0)
    shorter = _shorter(records, reader, chain, k, max(floor, best // block))
    if shorter is not None:
        out.append(shorter)
    out = [p for p in out if p.tokens > min_tokens]
    out.sort(key=lambda p: (-p.tokens, RANK[p.kind]))
    return Plans(out[:MAX_PLANS], records.corrupt)


def _longer(records, reader, chain, k):
    """Longer (or equal) trimmable snapshots sharing a prefix with the request
    (``k``: the deepest block link a stored snapshot passes through)."""
    m, block = len(chain), chain.block
    cands = reader.links_through(chain.links[k], MAX_CANDIDATES) if k > 0 else []
    cands += [key for _n, key in reader.ends_at(chain.links[m // block], 2 * MAX_CANDIDATES - len(cands))]
    out = []
    for cand in dict.fromkeys(cands):
        rec = records.get(cand)
        if rec is None or not rec.trimmable:
            continue
        common = min(common_prefix(rec, chain.tokens, m), m - 1)
        if 0 < common < rec.n_tokens:
            out.append(Plan(cand, common, "longer", rec))
    return out


def _shorter(records, reader, chain, k, floor=0):
    """The longest stored snapshot that is a strict prefix of the request (ending at level ``floor`` or deeper).

    At each level the index compares the request's own key of each length with the
    snapshots ending there (a system prompt that thousands of conversations continue
    costs a probe per distinct length, not a step per conversation).
    """
    m, block = len(chain), chain.block
    keys = {}  # several snapshots often end at one length: hash the request's key of each length once

    def key_of(n):
        got = keys.get(n)
        if got is None:
            got = keys[n] = chain.key(n)
        return got

    for level in range(min(k, (m - 1) // block), floor - 1, -1):  # deepest first
        for n in reader.ends_matching(chain.links[level], m, key_of):  # most tokens first
            rec = records.get(keys[n])
            if rec is not None and rec.n_tokens == n and rec.same_tokens(chain.tokens, n):
                return Plan(keys[n], n, "shorter", rec)
    return None


def dedup_base(reader, chain, n, fingerprint, layout_id):
    """Stored segments a new snapshot of ``chain``'s first ``n`` tokens can share.

    Only segments of the same model and exact layout (plain and quantised
    KV differ) are shared, and only for tokens the other snapshot holds.
    """
    k = deepest_link(reader, chain, n // chain.block)
    if k == 0:
        return DedupBase()
    best, best_rec = 0, None
    for cand in reader.links_through(chain.links[k], MAX_CANDIDATES):
        raw = reader.snapshot(cand)
        if raw is None:
            continue
        try:
            rec = decode_snapshot(raw)
        except CorruptSnapshot:
            continue
        if not rec.extents or rec.fingerprint != str(fingerprint) or rec.layout_id != layout_id:
            continue
        common = common_prefix(rec, chain.tokens, n)
        if common > best:
            best, best_rec = common, rec
    if best_rec is None:
        return DedupBase()
    base, covered = [], 0
    for e in best_rec.extents:
        if covered >= best:
            break
        take = min(e.rows, best - covered)
        base.append(Extent(e.segment, take))
        covered += take
    return DedupBase(tuple(base), covered)
