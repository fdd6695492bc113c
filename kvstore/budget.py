"""The store's disk budget: its default size, what it removes, and saying so.

``max_bytes="auto"`` (the default of ``kvstore serve``) is half of the space
free on the store's filesystem when the store opens, counting what the
store already holds, and at most ``DEFAULT_CAP`` (50 GB): the cache can
never fill the disk it shares with models and logs, and on a large disk it
stays small enough that ``verify``, ``export`` and a cold page cache cost
minutes, not hours. An operator who wants more or less passes a size.

Enforcing a budget removes snapshots lowest tier first (assistant, then
user) and least recently used first within a tier; system snapshots (warmed
system prompts) are removed only when nothing else is left. Each round of
removals logs one line saying what went: INFO for lower tiers (on the write
path at most one a minute, summed), WARNING when a system snapshot had to go. Policy and deletion are
``kvstore.maintenance.policy`` and ``SnapshotStore.delete_planned``; this
module only decides the size and speaks.
"""

import logging
import os
import threading
import time
from collections import Counter
from pathlib import Path

from .maintenance.policy import PrunePolicy
from .records import TIER_RANK
from .reports import human_size

log = logging.getLogger("kvstore")

DEFAULT_SHARE = 0.5
DEFAULT_CAP = 50 * 10**9
# snapshots the budget deletes at most per put (eviction on the write path is bounded)
EVICT_PER_PUT = 8
# seconds between log lines of write-path evictions of lower tiers (summed in between)
REPORT_EVERY = 60.0
# per store: [removed by tier, bytes, when last said] not logged yet
_unsaid = {}
_lock = threading.Lock()


def free_bytes(path):
    """Bytes free for this user on the filesystem of ``path`` (or its nearest existing parent)."""
    p = Path(os.path.abspath(os.fspath(path)))
    while not p.exists() and p != p.parent:
        p = p.parent
    st = os.statvfs(p)
    return st.f_bavail * st.f_frsize


def default_budget(path, held=0):
    """The budget ``"auto"`` stands for: ``DEFAULT_SHARE`` of the free space plus
    the ``held`` bytes the store already holds, at most ``DEFAULT_CAP``."""
    return int(min(DEFAULT_CAP, DEFAULT_SHARE * (free_bytes(path) + held)))


def resolve(max_bytes, path, held=0):
    """A byte count (or ``None``: no budget) for ``max_bytes``: ``None``, ``"auto"`` or bytes
    (``held``: the bytes the store holds, or a function returning them)."""
    if max_bytes == "auto":
        return default_budget(path, held() if callable(held) else held)
    return None if max_bytes is None else int(max_bytes)


def plan(store, max_bytes, entries=None):
    """Snapshots to remove, in order, so the store fits ``max_bytes``: lower tiers
    first; system snapshots only after every other one."""
    entries = store.entries() if entries is None else entries
    return [e for e, _ in PrunePolicy(max_bytes=max_bytes).plan(entries, store.total_bytes())]


def enforce(store, max_bytes, limit=None, quiet_for=0.0):
    """Remove what ``plan`` selects (at most ``limit`` snapshots) until the store
    fits; log one line of what went (lower tiers at most once per ``quiet_for``
    seconds, summed meanwhile). Returns ``(count, bytes freed)``."""
    if store.total_bytes() <= max_bytes:
        return 0, 0
    todo = plan(store, max_bytes)[:limit]
    gone = []
    count, freed = store.delete_planned(todo, max_bytes=max_bytes, on_delete=gone.append)
    if count:
        with _lock:
            tally = _unsaid.setdefault(id(store), [Counter(), 0, 0.0])
            tally[0].update(e.tier for e in gone)
            tally[1] += freed
            due = tally[0]["system"] or time.monotonic() - tally[2] >= quiet_for
            if due:
                tiers, total, _ = _unsaid.pop(id(store))
                _unsaid[id(store)] = [Counter(), 0, time.monotonic()]
        if due:
            report(store, max_bytes, tiers, total)
    return count, freed


def after_put(store):
    """Bounded eviction on the write path: at most ``EVICT_PER_PUT`` snapshots; a fault
    is logged and counted, never raised."""
    from .errors import KVStoreError

    try:
        count, _ = enforce(store, store.max_bytes, limit=EVICT_PER_PUT, quiet_for=REPORT_EVERY)
        store._count("evictions", count)
    except (KVStoreError, OSError) as exc:
        store._fault("evict", exc)


def report(store, max_bytes, tiers, freed):
    """One log line: what a budget removed (``tiers``: a count by tier)."""
    n = sum(tiers.values())
    parts = ", ".join(f"{tiers[t]} {t}" for t in sorted(tiers, key=lambda t: TIER_RANK.get(t, -1)))
    line = (f"kvstore: disk budget {human_size(max_bytes)}: removed {n} snapshot"
            f"{'' if n == 1 else 's'} ({human_size(freed)}; {parts}), least recently used first; "
            f"the store holds {human_size(store.total_bytes())}")
    if tiers.get("system"):
        log.warning("%s. System prompts went because nothing else was left: raise the budget "
                    "(--disk-max-bytes) to keep them", line)
    else:
        log.info("%s", line)


def at_startup(store, asked):
    """Enforce the store's budget once when a server starts and log where the store
    is, what it holds and its budget (``asked``: what the operator passed)."""
    if store.max_bytes is not None:
        try:
            enforce(store, store.max_bytes)
        except Exception as exc:  # fail open: a server starts whatever the budget does
            log.warning("kvstore: could not enforce the disk budget: %s: %s", type(exc).__name__, exc)
    if store.readonly:
        limit = "read-only, no budget"
    elif store.max_bytes is None:
        limit = "no disk budget"
    elif asked == "auto":
        limit = (f"disk budget {human_size(store.max_bytes)} (auto: half the free disk space, "
                 f"at most {human_size(DEFAULT_CAP)})")
    else:
        limit = f"disk budget {human_size(store.max_bytes)}"
    log.info("kvstore: persistent prompt cache at %s (%s in snapshots, %s)", store.path,
             human_size(store.total_bytes()), limit)
