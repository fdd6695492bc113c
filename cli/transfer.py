"""kvstore verify, export and import: integrity, and moving snapshots between stores."""

import os
import shutil
from pathlib import Path

from kvstore import SnapshotStore
from kvstore.maintenance.archive import archive_block_tokens

from . import fmt
from .common import Fail, _arg, bars, describe, emit, open_store, plural, problem, progress, resolve
from .listing import parse_filter, select

def verify_args(p):
    p.add_argument("keys", nargs="*", metavar="KEY", help="snapshots to check, full keys or prefixes (default: all)")
    p.add_argument("--fix", action="store_true",
                   help="move bad blobs to quarantine/ and delete the snapshots that use them")


def cmd_verify(args):
    """Check the header, size and every checksum of each blob; exit 1 if anything is wrong."""
    with open_store(args, write=args.fix) as store:
        known = {e.key for e in store.entries()}
        keys = resolve(store, args.keys, known) or sorted(known)
        # store.verify has no progress hook: check in batches when a bar shows
        step = max(64, -(-len(keys) // 100)) if bars(args) else max(len(keys), 1)
        problems = []
        with progress(args, len(keys), "verifying") as bar:
            for i in range(0, len(keys), step):
                problems += store.verify(keys[i : i + step], fix=args.fix)
                bar.update(len(keys[i : i + step]))
        quarantined = store.counters.get("quarantined", 0)
    bad = {p.key for p in problems if p.key}
    if args.format == "json":
        emit({"checked": len(keys), "problems": [problem(p) for p in problems], "fixed": args.fix,
              "quarantined_blobs": quarantined, "deleted": len(bad) if args.fix else 0})
    else:
        for p in problems:
            print(describe(p))
        if not args.quiet:
            line = f"Verified {plural(len(keys), 'snapshot')}: "
            if not problems:
                line += "no problems."
            else:
                line += f"{plural(len(problems), 'problem')} in {plural(len(bad), 'snapshot')}"
                line += (f"; quarantined {plural(quarantined, 'blob')} and deleted {plural(len(bad), 'snapshot')}."
                         if args.fix else "; run 'kvstore verify --fix' to quarantine them.")
            print(line)
    return 1 if problems else 0


def export_args(p):
    p.add_argument("archive", metavar="ARCHIVE", help="the tar archive to write")
    p.add_argument("-f", "--filter", dest="filters", action="append", default=[], type=_arg(parse_filter),
                   metavar="FILTER", help="export only snapshots matching FILTER, as in ls (default: all)")


def cmd_export(args):
    """Write a selection of snapshots with their blobs (verified, as stored) to one archive."""
    archive = Path(args.archive)
    tmp = archive.with_name(f".{archive.name}.{os.getpid()}.tmp")
    with open_store(args) as store:
        entries = select(store.entries(), args.filters)
        if not entries:
            raise Fail("no snapshot matches the filters" if args.filters else "the store has no snapshots")
        blobs = {b for e in entries for b in e.blobs}
        try:
            with progress(args, len(blobs), "exporting") as bar:
                count, nbytes, problems = store.export_archive(str(tmp), [e.key for e in entries], progress=bar.update)
            os.replace(tmp, archive)
        finally:
            tmp.unlink(missing_ok=True)
    for p in problems:
        fmt.warn(f"not exported: {describe(p)}")
    if args.format == "json":
        emit({"archive": str(archive), "snapshots": count, "bytes": nbytes, "problems": [problem(p) for p in problems]})
    elif not args.quiet:
        print(f"Exported {plural(count, 'snapshot')} ({fmt.size(nbytes)}) to {archive}.")
    return 1 if problems else 0


def import_args(p):
    p.add_argument("archive", metavar="ARCHIVE", help="a tar archive written by 'kvstore export'")


def cmd_import(args):
    """Add an archive's snapshots to the store (created if missing); every blob is verified first."""
    if not os.path.isfile(args.archive):
        raise Fail(f"no archive at {args.archive}")
    existed = os.path.lexists(args.store)
    made = not SnapshotStore.is_store(args.store) and (not existed or (
        os.path.isdir(args.store) and not os.listdir(args.store)))
    if made:
        # a new store takes the archive's block size (a damaged manifest creates nothing)
        SnapshotStore(args.store, block_tokens=archive_block_tokens(args.archive)).close()
    try:
        with open_store(args, create=True) as store:
            with progress(args, None, "importing") as bar:
                count, nbytes, problems = store.import_archive(args.archive, progress=bar.update)
    except BaseException:
        if made:
            _unmake(args.store, existed)
        raise
    for p in problems:
        fmt.warn(f"not imported: {describe(p)}")
    if args.format == "json":
        emit({"archive": args.archive, "snapshots": count, "bytes": nbytes, "problems": [problem(p) for p in problems]})
    elif not args.quiet:
        print(f"Imported {plural(count, 'snapshot')} ({fmt.size(nbytes)}) from {args.archive}.")
    return 1 if problems else 0


def _unmake(path, keep_folder):
    """Remove a store this import created and left empty (its folder too, unless it was there)."""
    with SnapshotStore(path, readonly=True) as store:
        if store.entries():
            return
    for child in Path(path).iterdir():
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    if not keep_folder:
        os.rmdir(path)


# name -> (add arguments, run)
