"""The storage interface every place that keeps snapshots implements.

An ``Index`` holds small records by key (snapshots, segments, models,
access times, counters) and two link tables: the snapshots whose tokens
pass *through* a block link, and the snapshots that *end* in the block
after a link. It is read through consistent views (``read()``) and written
in one short transaction (``write(fn)``) whose result tells the caller what
to clean up once it has committed (blob files to remove). A ``Blobs`` store
keeps immutable blobs: written once, opened for reading rows, unlinked.

Backends store bytes; ``kvstore.records`` gives them meaning and
``kvstore.matching`` decides what a safe hit is, so a new backend never
re-implements either. This module defines the protocols and nothing else.
"""

from typing import Callable, ContextManager, Iterator, Protocol, TypeVar

T = TypeVar("T")


class IndexReader(Protocol):
    """A consistent view of an index (an LMDB read transaction, a fetched set of keys)."""

    def snapshot(self, key: bytes) -> bytes | None:
        """The raw snapshot record stored under ``key``."""

    def segment(self, seg_id: bytes) -> bytes | None:
        """The raw segment record ``seg_id``."""

    def model(self, fingerprint: str) -> bytes | None:
        """The raw model record of ``fingerprint``."""

    def access(self, key: bytes) -> bytes | None:
        """The raw access record of snapshot ``key``."""

    def passes_through(self, link: bytes) -> bool:
        """True if any snapshot's tokens pass through the block ``link`` names."""

    def links_through(self, link: bytes, limit: int) -> list:
        """Up to ``limit`` keys of snapshots passing through ``link``."""

    def ends_at(self, link: bytes, limit: int | None = None) -> list:
        """Up to ``limit`` (``None``: all) ``(tokens, key)`` of snapshots ending
        in the block after ``link``, fewest tokens first."""

    def ends_matching(self, link: bytes, below: int, key_of: Callable[[int], bytes]) -> list:
        """The token counts ``n`` under ``below`` at which the snapshot ``key_of(n)`` ends in the
        block after ``link``, most tokens first."""

    def snapshots(self) -> Iterator:
        """Every ``(key, raw record)``."""

    def segments(self) -> Iterator:
        """Every ``(segment id, raw record)``."""

    def models(self) -> Iterator:
        """Every ``(fingerprint, raw record)``."""

    def access_keys(self) -> Iterator:
        """Every key that has an access record."""

    def accesses(self) -> Iterator:
        """Every ``(snapshot key, raw access record)``."""

    def counter(self, name: str) -> int:
        """A counter every process agrees on (``bytes``, ``snapshots``)."""

    def count(self, table: str) -> int:
        """How many records ``table`` (``snapshots``, ``segments``) holds."""


class IndexWriter(IndexReader, Protocol):
    """The view inside a write transaction: reads see the transaction's own writes."""

    def put_snapshot(self, key: bytes, raw: bytes) -> None: ...
    def delete_snapshot(self, key: bytes) -> None: ...
    def add_link(self, link: bytes, key: bytes) -> None: ...
    def remove_link(self, link: bytes, key: bytes) -> None: ...
    def add_end(self, link: bytes, n: int, key: bytes) -> None: ...
    def remove_end(self, link: bytes, n: int, key: bytes) -> None: ...
    def put_segment(self, seg_id: bytes, raw: bytes) -> None: ...
    def delete_segment(self, seg_id: bytes) -> None: ...
    def put_model(self, fingerprint: str, raw: bytes) -> None: ...
    def put_access(self, key: bytes, raw: bytes) -> None: ...
    def delete_access(self, key: bytes) -> None: ...
    def add_counter(self, name: str, delta: int) -> None: ...


class Index(Protocol):
    """Where snapshot records live. Faults are ``StoreUnavailable``."""

    readonly: bool

    def read(self) -> ContextManager[IndexReader]:
        """A consistent read view, as a context manager."""

    def write(self, fn: Callable[[IndexWriter], T]) -> T:
        """Run ``fn`` in one short write transaction and return its result
        (committed if ``fn`` returns, rolled back if it raises). ``fn`` does
        no blob I/O and no MLX work."""

    def close(self) -> None: ...


class Blobs(Protocol):
    """Where immutable blobs live."""

    def write(self, tensors: dict, meta: dict):
        """Store ``tensors`` (see ``kvstore.blobs.encode``) as a new blob; return its ``BlobRef``."""

    def open(self, blob_id: str, size: int | None = None, header_sum: int | None = None):
        """A ``kvstore.blobs.BlobReader`` of the blob; ``FileNotFoundError`` if it is gone."""

    def exists(self, blob_id: str) -> bool: ...

    def unlink(self, blob_id: str) -> None:
        """Remove a blob; one already gone is not an error."""

    def read_bytes(self, blob_id: str, size: int) -> bytes:
        """A blob's bytes as stored (to copy it to another place), unchecked."""

    def write_bytes(self, blob_id: str, data) -> None:
        """Store the bytes of a blob under its own id (a copy from another place; the
        caller verifies it with ``open`` before any index points at it)."""


class Backend(Protocol):
    """One place that keeps snapshots: an index, blobs and the settings every
    process using it agrees on (``block``: tokens per chain link)."""

    index: Index
    blobs: Blobs
    block: int
    readonly: bool
    path: object  # where it is, for people (a folder, a URL)
    file_digests: object  # the weight-digest cache, or None where the backend has none

    def close(self) -> None: ...
