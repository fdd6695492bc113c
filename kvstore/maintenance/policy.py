"""Prune policy as data: which snapshots go first, and what deleting them frees.

One ``PrunePolicy`` decides for ``SnapshotStore.prune``, the store's own
disk budget and ``kvstore prune``: candidates are selected by tier, model,
age and keep-last, ordered lowest tier first (assistant, user, system) and
least recently used first within a tier, and a size budget takes them in
that order only until the store fits. What each deletion frees is computed
the way the store frees it: a blob goes with the last snapshot using it.
Pure functions of a listing; no I/O.
"""

import time
from collections import Counter
from dataclasses import dataclass

from ..records import TIER_RANK


@dataclass(frozen=True)
class PrunePolicy:
    """What prune selects.

    ``max_bytes``: delete only until the store holds at most this many bytes;
    ``older_than``: seconds since the last access; ``tiers``: only these
    tiers; ``fingerprint``: only this model; ``model``: only models whose
    name is this or whose fingerprint starts with it; ``keep_last``: spare
    the N most recently used snapshots of each model.
    """

    max_bytes: int | None = None
    older_than: float | None = None
    tiers: tuple | None = None
    fingerprint: str | None = None
    model: str | None = None
    keep_last: int | None = None

    @classmethod
    def of(cls, *, max_bytes=None, older_than=None, tier=None, fingerprint=None, model=None, keep_last=None):
        """A policy from the keyword arguments of ``SnapshotStore.prune`` (``tier``: a name or names)."""
        tiers = (tier,) if isinstance(tier, str) else tuple(tier) if tier else None
        return cls(max_bytes, older_than, tiers, None if fingerprint is None else str(fingerprint), model, keep_last)

    def selects(self, e, now):
        return ((self.tiers is None or e.tier in self.tiers)
                and (self.fingerprint is None or e.fingerprint == self.fingerprint)
                and (self.model is None or model_matches(e, self.model))
                and (self.older_than is None or now - e.accessed >= self.older_than))

    def candidates(self, entries, now=None):
        """The entries this policy selects, in deletion order (the size budget not applied)."""
        now = time.time() if now is None else now
        keep = set()
        if self.keep_last:
            by_model = {}
            for e in entries:
                by_model.setdefault(e.fingerprint, []).append(e)
            for group in by_model.values():
                group.sort(key=lambda e: -e.accessed)
                keep.update(e.key for e in group[: self.keep_last])
        cands = [e for e in entries if e.key not in keep and self.selects(e, now)]
        cands.sort(key=lambda e: (TIER_RANK.get(e.tier, -1), e.accessed))
        return cands

    def plan(self, entries, total_bytes, now=None):
        """``[(entry, bytes deleting it frees at its place in the plan)]`` in deletion order.

        With ``max_bytes`` the plan stops once the store would fit.
        """
        frees = release(entries)
        out, planned = [], 0
        for e in self.candidates(entries, now):
            if self.max_bytes is not None and total_bytes - planned <= self.max_bytes:
                break
            freed = frees(e)
            out.append((e, freed))
            planned += freed
        return out


def model_matches(e, name):
    """True if ``name`` is the snapshot's model name or a prefix of its fingerprint."""
    return e.model == name or e.fingerprint.startswith(name)


def release(entries):
    """``frees(e) -> bytes``: what deleting ``e`` frees after the deletions before it.

    A blob is freed with the last snapshot that uses it, as the store does.
    """
    users = Counter(b for e in entries for b in set(e.blobs))
    sizes = {}
    for e in entries:
        sizes.update(e.blob_bytes)

    def frees(e):
        freed = 0
        for b in set(e.blobs):
            users[b] -= 1
            if users[b] == 0:
                freed += sizes.get(b, 0)
        return freed

    return frees
