"""kvstore: persistent, shared, exact prompt-cache snapshots for MLX and mlx-lm.

``SnapshotStore`` keeps KV snapshots on disk (safetensors blobs, LMDB index);
``TieredPromptCache`` puts a memory LRU in front of it with the interface of
mlx-lm's ``LRUPromptCache``; ``PromptSession`` is a chat session for callers
of mlx-lm from Python. ``fingerprint`` names a model and cache recipe.

Importing this package does not import MLX: the admin commands stay fast and
run on machines without a model. MLX loads when a cache is encoded or rebuilt.
"""

from .errors import (
    CorruptSnapshot,
    FormatVersionError,
    InvalidInput,
    KVStoreError,
    StoreUnavailable,
    UnsupportedCache,
)
from .fingerprint import Fingerprint, fingerprint
from .maintenance.policy import PrunePolicy
from .records import TIER_RANK, TIERS
from .reports import Match, Problem, SnapshotInfo
from .store import SnapshotStore

__version__ = "0.1.0"

_LAZY = {
    "TieredPromptCache": ".tiered",
    "PromptSession": ".session",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'kvstore' has no attribute {name!r}")


__all__ = [
    "CorruptSnapshot",
    "Fingerprint",
    "FormatVersionError",
    "InvalidInput",
    "KVStoreError",
    "Match",
    "Problem",
    "PromptSession",
    "PrunePolicy",
    "SnapshotInfo",
    "SnapshotStore",
    "StoreUnavailable",
    "TIERS",
    "TIER_RANK",
    "TieredPromptCache",
    "UnsupportedCache",
    "fingerprint",
]
