"""The kvstore error tree.

Every fault kvstore raises is a ``KVStoreError``. Library errors (LMDB, OS,
msgpack) are wrapped with ``raise ... from exc`` so callers catch one type.
Cache reads and writes never let these escape: they fail open (a miss or
``None``), log the reason and count it.
"""


class KVStoreError(Exception):
    """Base class of every kvstore error."""


class InvalidInput(KVStoreError, ValueError):
    """A caller passed something kvstore cannot use (tokens, tier, key, path)."""


class StoreUnavailable(KVStoreError):
    """The store cannot be opened or written (locked, read-only, disk or map full)."""


class CorruptSnapshot(KVStoreError):
    """A blob or record failed a header, size, checksum, shape or dtype check."""


class UnsupportedCache(KVStoreError):
    """A cache object whose class is not on the whitelist, or whose state cannot be stored."""


class FormatVersionError(CorruptSnapshot):
    """A blob or record was written in a format version this kvstore does not know."""
