"""Preload: the snapshots a server is most likely to be asked for, chosen at start.

This module owns the choice: a model's un-tenanted snapshots in the order
they are likely to be asked for (system tier first, then user, then
assistant; within a tier most hits first, then most recently used), a
snapshot skipped when a longer trimmable one already chosen serves its
tokens, and the whole kept within the memory tier's free entries and bytes.
It reads the index only (one consistent view, no blob I/O, no MLX) and
turns the choice into promotion tickets; loading them is
``kvstore.promotion``'s, on the promotion thread.

It must never: choose a tenanted snapshot (its tenant is not known here),
count a preload as a hit or an access, or plan past the memory tier's
budget (a loaded snapshot that no longer fits is dropped, never evicting
what requests put there).
"""

import logging
import threading
from dataclasses import dataclass

from .errors import CorruptSnapshot
from .records import TIERS, decode_access, decode_segment, decode_snapshot

log = logging.getLogger("kvstore")

TIER_ORDER = {t: i for i, t in enumerate(("system", "user", "assistant"))}


@dataclass
class Candidate:
    """One snapshot that may be preloaded: its tokens, tier, use and in-memory size estimate."""

    key: bytes
    tokens: list
    tier: str
    hits: int
    accessed: float
    trimmable: bool
    nbytes: int


def _nbytes(r, snap):
    """Bytes of a snapshot's arrays: its share of each segment's rows, plus its state blob."""
    total = snap.state.size if snap.state else 0
    for e in snap.extents:
        raw = r.segment(e.segment)
        try:
            seg = decode_segment(raw) if raw is not None else None
        except CorruptSnapshot:
            seg = None
        if seg is not None and seg.rows:
            total += seg.size * e.rows // seg.rows
    return total


def candidates(index, fingerprint):
    """Every un-tenanted snapshot of ``fingerprint``, most likely to be asked for first."""
    out = []
    with index.read() as r:
        for key, raw in r.snapshots():
            try:
                snap = decode_snapshot(raw)
            except CorruptSnapshot:
                continue
            if snap.fingerprint != str(fingerprint) or snap.tenanted or snap.n_tokens < 2:
                continue
            acc_raw = r.access(key)
            acc = decode_access(acc_raw) if acc_raw is not None else None
            accessed = acc.accessed if acc is not None and acc.accessed else snap.created
            tier = snap.tier if snap.tier in TIERS else "user"
            out.append(Candidate(bytes(key), snap.token_ids().tolist(), tier, acc.hits if acc else 0, accessed,
                                 snap.trimmable, _nbytes(r, snap)))
    return ranked(out)


def ranked(cands):
    """``cands`` most likely to be asked for first: by tier (system, user, assistant), then
    most hits, then most recently used."""
    return sorted(cands, key=lambda c: (TIER_ORDER.get(c.tier, len(TIER_ORDER)), -c.hits, -c.accessed))


def choose(cands, max_entries, max_bytes=None):
    """The candidates to preload, in order: at most ``max_entries`` within ``max_bytes``
    (``None``: no byte limit); one whose tokens a longer trimmable chosen one holds is skipped."""
    chosen, used = [], 0
    for c in cands:
        if len(chosen) >= max_entries:
            break
        if any(o.trimmable and len(o.tokens) > len(c.tokens) and o.tokens[: len(c.tokens)] == c.tokens
               for o in chosen):
            continue
        if max_bytes is not None and used + c.nbytes > max_bytes:
            continue
        chosen.append(c)
        used += c.nbytes
    return chosen


class Budget:
    """Entries and bytes preloaded snapshots may still take in memory (shared with the promotion thread)."""

    def __init__(self, entries, nbytes=None):
        self.entries, self.nbytes = entries, nbytes
        self.lock = threading.Lock()

    def take(self, nbytes):
        """Reserve room for one loaded snapshot of ``nbytes``; False if it does not fit."""
        with self.lock:
            if self.entries < 1 or (self.nbytes is not None and nbytes > self.nbytes):
                return False
            self.entries -= 1
            if self.nbytes is not None:
                self.nbytes -= nbytes
            return True


def preload_plan(store, key_of, model, entries, nbytes):
    """Promotion tickets for ``model``'s snapshots to preload into ``entries`` entries and
    ``nbytes`` bytes (``None``: no limit) of memory; ``key_of(model)`` is ``(memory key, fingerprint)``."""
    from .promotion import Ticket

    key, fp = key_of(model)
    if fp is None or entries < 1:
        return []
    budget = Budget(entries, nbytes)
    found = candidates(store.index, fp)
    chosen = choose(found, entries, nbytes)
    log.info("kvstore: preloading %d of %d snapshots (%d bytes) into memory", len(chosen), len(found),
             sum(c.nbytes for c in chosen))
    # one token more than the snapshot holds: the store serves the whole snapshot, as for a promotion
    return [Ticket(key, c.tokens + c.tokens[-1:], len(c.tokens), fp, c.tier, budget=budget) for c in chosen]
