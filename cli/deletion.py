"""kvstore rm, prune and gc: deletion planned, confirmed, then done; housekeeping."""

import sys
from collections import Counter

from kvstore import TIERS, PrunePolicy
from kvstore.maintenance.policy import model_matches, release

from . import fmt
from .common import GRACE, Fail, Usage, _arg, by_tier, describe, emit, open_store, plural, problem, progress, resolve
from .listing import render, row, whole_number

def _deletion_args(p):
    p.add_argument("--dry-run", action="store_true", help="show what would be deleted, delete nothing")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")


def rm_args(p):
    p.add_argument("keys", nargs="+", metavar="KEY", help="full snapshot keys or unique prefixes (as ls shows)")
    _deletion_args(p)


def confirm(args, summary):
    """Ask on a terminal before deleting; refuse without one unless ``-y``."""
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise Usage("refusing to delete without confirmation: stdin is not a terminal (pass -y to proceed)")
    sys.stderr.write(f"About to delete {summary}. Proceed? [y/N] ")
    sys.stderr.flush()
    if sys.stdin.readline().strip().lower() not in ("y", "yes"):
        raise Fail("aborted, nothing deleted")


def remove(store, args, plan, planned, limit=None, frees=None):
    """Show ``plan`` (``planned`` bytes to free), confirm, delete in order, report.

    With ``limit`` deletion stops early once the store's indexed bytes fit.
    ``frees`` maps a key to what deleting it frees at its place in the plan.
    """

    def rows(entries):
        return [{**row(e), **({"frees_bytes": frees[e.key]} if frees else {})} for e in entries]

    human = args.format == "human"
    counts = Counter(e.tier for e in plan)
    summary = f"{plural(len(plan), 'snapshot')} ({fmt.size(planned)}; {by_tier(counts)})"
    if not plan:
        if human and not args.quiet:
            print("Nothing to delete.")
        elif not human:
            emit({"dry_run": args.dry_run, "snapshots": [], "planned_bytes": 0, "deleted": 0, "freed_bytes": 0})
        return 0
    if args.dry_run:
        if not human:
            emit({"dry_run": True, "snapshots": rows(plan), "planned_bytes": planned,
                  "deleted": 0, "freed_bytes": 0})
        elif not args.quiet:
            print(render(plan, frees=frees))
            print(f"\nWould delete {summary}; dry run, nothing deleted.")
        return 0
    if args.yes and human and not args.quiet:
        print(f"About to delete {summary}.")
    confirm(args, summary)
    deleted = []
    with progress(args, len(plan), "deleting") as bar:
        count, freed = store.delete_planned(plan, max_bytes=limit,
                                            on_delete=lambda e: (deleted.append(e), bar.update()))
    if not human:
        emit({"dry_run": False, "snapshots": rows(deleted), "planned_bytes": planned,
              "deleted": count, "freed_bytes": freed})
    elif not args.quiet:
        print(f"Deleted {plural(count, 'snapshot')}, freed {fmt.size(freed)}.")
    return 0


def cmd_rm(args):
    """Delete snapshots by key or unique key prefix."""
    with open_store(args, write=not args.dry_run) as store:
        entries = store.entries()
        by_key = {e.key: e for e in entries}
        plan = [by_key[k] for k in resolve(store, args.keys, by_key)]
        frees_of = release(entries)
        frees = {e.key: frees_of(e) for e in plan}
        return remove(store, args, plan, sum(frees.values()), frees=frees)


def _tier_list(text):
    tiers = [t for t in text.split(",") if t]
    if not tiers or set(tiers) - set(TIERS):
        raise ValueError(f"invalid tier {text!r} (choose from {', '.join(TIERS)})")
    return tiers


def prune_args(p):
    p.epilog = ("--dry-run lists what would go with a FREES column: the bytes each deletion frees at its place "
                "in the plan (a shared segment goes with the last snapshot reading it); their sum is what the "
                "real run frees.")
    p.add_argument("--max-size", type=_arg(fmt.parse_size), metavar="SIZE",
                   help="delete until the store holds at most SIZE (e.g. 20GB)")
    p.add_argument("--older-than", type=_arg(fmt.parse_duration), metavar="DURATION",
                   help="delete snapshots last used longer ago than DURATION (e.g. 7d, 12h, 30m)")
    p.add_argument("--tier", dest="tiers", action="append", type=_arg(_tier_list), metavar="TIER",
                   help="only these tiers: system, user, assistant (repeatable or comma list)")
    p.add_argument("--model", metavar="MODEL", help="only this model (name or fingerprint prefix)")
    p.add_argument("--keep-last", type=_arg(whole_number), metavar="N",
                   help="spare the N most recently used snapshots of each model")
    _deletion_args(p)


def cmd_prune(args):
    """Delete snapshots by policy: lower tiers first, least recently used first within a tier."""
    if all(getattr(args, k) is None for k in ("max_size", "older_than", "tiers", "model", "keep_last")):
        raise Usage("prune needs a policy: --max-size, --older-than, --tier, --model or --keep-last "
                    "(it does not delete everything)")
    tiers = sorted({t for group in args.tiers or [] for t in group})
    policy = PrunePolicy(max_bytes=args.max_size, older_than=args.older_than, tiers=tuple(tiers) or None,
                         model=args.model, keep_last=args.keep_last)
    with open_store(args, write=not args.dry_run) as store:
        entries = store.entries()
        if args.model is not None and not any(model_matches(e, args.model) for e in entries):
            raise Fail(f"no snapshot in the store is of model {args.model!r}")
        planned = policy.plan(entries, store.total_bytes())
        plan = [e for e, _ in planned]
        return remove(store, args, plan, sum(f for _, f in planned), limit=args.max_size,
                      frees={e.key: f for e, f in planned})


def gc_args(p):
    p.add_argument("--grace", type=_arg(fmt.parse_duration), default=fmt.parse_duration(GRACE), metavar="DURATION",
                   help="leave files younger than this alone: a put in flight writes its blob before "
                   f"indexing it (default: {GRACE})")
    p.add_argument("--dry-run", action="store_true", help="show what would be cleaned, change nothing")
    p.add_argument("--compact", action="store_true",
                   help="also write a compacted copy of the LMDB index to STORE/index.compact and print how to "
                   "swap it in once no process uses the store (it is never swapped under live processes)")


def compact(store, args):
    """Write a compacted copy of the index beside it; return a JSON-able summary.

    Swapping the file under live processes is unsafe, so that step is left
    to the user (printed as instructions).
    """
    dest = store.path / "index.compact"
    out = {"index_file_bytes": store.index_file_bytes(), "path": str(dest), "compacted_bytes": None}
    if not args.dry_run:
        out["compacted_bytes"] = store.compact_index(dest.name)
    return out


def cmd_gc(args):
    """Housekeeping with a grace period: temp files, orphaned blobs, broken records, stale readers."""
    with open_store(args, write=not args.dry_run) as store:
        problems = store.gc(grace=args.grace, dry_run=args.dry_run)
        packed = compact(store, args) if args.compact else None
        index = store.path / "index"
    if args.format == "json":
        emit({"dry_run": args.dry_run, "grace": args.grace, "problems": [problem(p) for p in problems],
              "compact": packed})
        return 0
    if not args.quiet:
        for p in problems:
            print(("would clean " if args.dry_run else "cleaned ") + describe(p))
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(Counter(p.kind for p in problems).items()))
        if not problems:
            print("Nothing to clean.")
        elif args.dry_run:
            print(f"Would clean {plural(len(problems), 'item')} ({kinds}); dry run, nothing changed.")
        else:
            print(f"Cleaned {plural(len(problems), 'item')} ({kinds}).")
    if packed and packed["compacted_bytes"] is not None:
        dest = packed["path"]
        print(f"Wrote a compacted index ({fmt.size(packed['compacted_bytes'])}, the live one is "
              f"{fmt.size(packed['index_file_bytes'])}) to {dest}.\n"
              "To use it, stop every process that has this store open, then run:\n"
              f"  mv {dest}/data.mdb {index}/data.mdb && rm -f {index}/lock.mdb && rmdir {dest}\n"
              "Snapshots stored after the copy was made drop out of the index; gc then removes their blobs.")
    elif packed:
        print(f"The index file is {fmt.size(packed['index_file_bytes'])}; --compact would copy it compacted "
              f"to {packed['path']}.")
    return 0
