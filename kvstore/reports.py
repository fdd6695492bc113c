"""What the store reports to its callers: listings, matches and problems.

Plain values, no behaviour beyond reading them; the store, maintenance and
the command line all speak in these.
"""

from dataclasses import dataclass, field
from typing import NamedTuple


@dataclass
class SnapshotInfo:
    """One snapshot as ``entries()`` lists it (no blob I/O needed).

    ``blobs`` are the blob ids it reads and ``blob_bytes`` their sizes;
    ``bytes`` splits each shared segment evenly between its users,
    ``shared_bytes`` counts segments other snapshots use too and
    ``unique_bytes`` what deleting it alone frees now.
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
