"""One-time log lines about defaults an operator should know of.

Each notice is logged once per process, at INFO, the first time it
applies; nothing here changes behaviour.
"""

import logging
import threading

log = logging.getLogger("kvstore")
_given = set()
_lock = threading.Lock()


def once(key, message, *args):
    """Log ``message`` at INFO the first time ``key`` is seen in this process; True if logged."""
    with _lock:
        if key in _given:
            return False
        _given.add(key)
    log.info(message, *args)
    return True


def memory_only(tier, persist):
    """A cache of a tier that is not persisted was kept: say so once per tier."""
    once(("memory-only", tier),
         "kvstore: %s-tier caches stay in memory only (persisted tiers: %s); mlx_lm.server files plain "
         "/v1/completions prompts and generated text under 'assistant'. Pass --persist %s to write them to "
         "disk too", tier, ",".join(persist) or "none", ",".join((*persist, tier)))
