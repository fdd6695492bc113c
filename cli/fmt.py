"""Parsing and printing for the command line: sizes, durations, times, tables.

Sizes for people are decimal (kB, MB, GB); JSON carries raw bytes and
ISO 8601 times. Parsers raise ``ValueError`` with a message fit to show as
is. From kvstore it takes only the size formatter its log lines use too.
"""

import re
import sys
from datetime import datetime, timezone

from kvstore.reports import human_size as size  # noqa: F401  (one formatter for the CLI and the logs)

UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
         "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_NUMBER = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(text):
    """Bytes in ``text``: ``500``, ``100MB``, ``1.5GB``, ``2GiB`` (decimal unless ``iB``)."""
    m = _NUMBER.match(text)
    if not m or m.group(2).lower() not in UNITS:
        raise ValueError(f"invalid size {text!r} (examples: 500MB, 2GB, 1.5GiB)")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def parse_duration(text):
    """Seconds in ``text``: ``90``, ``30s``, ``30m``, ``12h``, ``7d``, ``2w``."""
    m = _NUMBER.match(text)
    if not m or m.group(2) not in SECONDS:
        raise ValueError(f"invalid duration {text!r} (examples: 30m, 12h, 7d)")
    return float(m.group(1)) * SECONDS[m.group(2)]


def ago(seconds):
    """A compact age: ``45s``, ``12m``, ``3h``, ``6d``, ``10w``."""
    seconds = max(0.0, seconds)
    for unit, span in (("w", 7 * 86400), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{int(seconds // span)}{unit}"
    return f"{int(seconds)}s"


def iso(t):
    """A Unix time as ISO 8601 in UTC (``2026-01-31T12:00:00+00:00``)."""
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def table(rows, headers, right=()):
    """Rows of strings as aligned columns; columns named in ``right`` align right."""
    cols = list(zip(*rows)) if rows else [()] * len(headers)
    widths = [max(len(h), max(map(len, c), default=0)) for h, c in zip(headers, cols)]
    line = "  ".join(f"{{:{'>' if h in right else '<'}{w}}}" for h, w in zip(headers, widths)).format
    return "\n".join([line(*r).rstrip() for r in [headers] + rows])


def error(msg):
    """Print ``msg`` as one line on stderr."""
    print(f"kvstore: error: {' '.join(str(msg).split())}", file=sys.stderr)


def warn(msg):
    """Print ``msg`` as a one-line warning on stderr."""
    print(f"kvstore: warning: {' '.join(str(msg).split())}", file=sys.stderr)
