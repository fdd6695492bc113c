"""What every admin command shares: failures, argument types, output, progress bars, opening the store.

Nothing here imports MLX, mlx_lm or transformers: the admin commands start
fast and run on machines without a model.
"""

import argparse
import json
import os
import sys
from pathlib import Path

from kvstore import TIER_RANK, SnapshotStore

GRACE = "1h"
SHORT_KEY = 12


class Fail(Exception):
    """An expected failure: one line on stderr, exit status 1."""

    code = 1


class Usage(Fail):
    """A usage error: one line on stderr, exit status 2."""

    code = 2


def _arg(parse):
    """Wrap a parser raising ValueError as an argparse type with its message."""

    def convert(text):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


def settle(args, store_dir, output, quiet):
    """Apply the global options given before a command where the command's own did not set
    them, and set up logging for an admin command; return ``args``."""
    import logging

    args.store = os.path.expanduser(getattr(args, "store", None) or store_dir)
    args.format = getattr(args, "format", None) or output
    args.quiet = getattr(args, "quiet", False) or quiet
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.WARNING,
                        format="kvstore: %(levelname)s: %(message)s")
    return args


def emit(obj):
    """Print ``obj`` as JSON on stdout."""
    print(json.dumps(obj, indent=2))


def describe(p):
    """One line for a ``Problem``."""
    where = ", ".join(f"{what} {x}" for what, x in (("snapshot", p.key), ("blob", p.blob)) if x and x not in p.reason)
    return f"{p.kind}: {p.reason}" + (f" ({where})" if where else "")


def problem(p):
    return {"kind": p.kind, "key": p.key, "blob": p.blob, "reason": p.reason}


def by_tier(counts):
    """``"2 assistant, 1 user"``: counts by tier in prune order."""
    parts = [f"{counts[t]} {t}" for t in sorted(counts, key=lambda t: TIER_RANK.get(t, -1))]
    return ", ".join(parts)


def plural(n, word):
    return f"{n} {word}{'' if n == 1 else 's'}"


class _NoBar:
    def update(self, n=1):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def bars(args):
    """True when progress bars show: stderr is a terminal and not ``-q``."""
    return not args.quiet and sys.stderr.isatty()


def progress(args, total=None, desc=None):
    """A tqdm bar on stderr when ``bars(args)``; else a silent stand-in."""
    if not bars(args):
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)


def not_created(args):
    """True if nothing exists at the store path yet (a fresh machine: read commands show an empty store)."""
    return not os.path.lexists(args.store)


def open_store(args, write=False, create=False):
    """Open the store at ``args.store``.

    A path without a store is an error, except that ``create`` makes one in
    a missing or empty folder. Read-only unless ``write``.
    """
    path = Path(args.store)
    if not SnapshotStore.is_store(path):
        empty = not path.exists() or (path.is_dir() and not any(path.iterdir()))
        if not (create and empty):
            raise Fail(f"no kvstore store at {path}" if not path.exists()
                       else f"{path} is not a kvstore store")
    return SnapshotStore(path, readonly=not (write or create))


def resolve(store, prefixes, known):
    """Full keys of ``prefixes`` (full keys or unique prefixes), each once, all in ``known``."""
    keys = []
    for k in prefixes:
        full = store.resolve(k)
        if full not in known:  # resolve() passes any 32-digit key through
            raise Fail(f"no snapshot {k}")
        keys.append(full)
    return list(dict.fromkeys(keys))
