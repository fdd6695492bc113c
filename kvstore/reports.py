"""What the store reports to its callers: listings, matches and problems.

Plain values, no behaviour beyond reading them; the store, maintenance and
the command line all speak in these.
"""

from dataclasses import dataclass, field
from typing import NamedTuple


@dataclass(slots=True)  # a listing holds one per snapshot: 100,000s
class SnapshotInfo:
    """One snapshot as ``entries()`` lists it (no blob I/O needed).

    ``blobs`` are the blob ids it reads and ``blob_bytes`` their sizes.
    Sizes add up: ``bytes`` (SIZE) is everything it reads, fixed for its
    life; ``unique_bytes`` (OWN) the bytes only it holds, which is what
    deleting it alone frees now; ``shared_bytes`` (SHARED) the rest: the
    segments in ``shared_blobs``, which other snapshots read too.
    ``split_bytes`` splits each shared segment evenly between its users
    (totals by model or tier add up to the store's bytes).
    """

    key: str
    fingerprint: str
    model: str
    tier: str
    tokens: int
    bytes: int
    shared_bytes: int
    created: float
    accessed: float
    hits: int
    trimmable: bool
    blobs: list = field(default_factory=list)
    unique_bytes: int = 0
    blob_bytes: dict = field(default_factory=dict)
    split_bytes: int = 0
    shared_blobs: list = field(default_factory=list)

    @property
    def own_bytes(self):
        """Bytes only this snapshot holds (``unique_bytes``)."""
        return self.unique_bytes

    def token_ids(self, store):
        """The snapshot's token ids (read from the index)."""
        return store.tokens_of(self.key)


class Match(NamedTuple):
    """The snapshot a fetch uses: its key, the tokens it serves, how it matched
    (``exact`` served one token short, ``shorter`` a stored prefix, ``longer``
    the shared prefix of a longer trimmable entry) and its tier."""

    key: str
    tokens: int
    kind: str
    tier: str
    source = "disk"  # where it was loaded from (``RemoteMatch``: "remote"); not a field


class RemoteMatch(Match):
    """A ``Match`` served by the remote tier."""

    __slots__ = ()
    source = "remote"


@dataclass
class Problem:
    """One fault ``verify``, ``gc``, an export or an import found."""

    kind: str
    key: str | None
    blob: str | None
    reason: str


def human_size(n):
    """``n`` bytes for people, in decimal units: ``950 B``, ``1.2 kB``, ``35.0 MB``."""
    if n < 1000:
        return f"{n} B"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000
        if n < 999.95 or unit == "TB":
            return f"{n:.1f} {unit}"
