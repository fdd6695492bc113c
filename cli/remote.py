"""kvstore remote: the shared tier on Redis (list, stats, push, pull, prune),
and the ``--remote`` options ``serve`` and ``warm`` take.

Like the other admin commands this module never imports MLX. The remote
is named by ``--remote URL`` or ``$KVSTORE_REMOTE``; its secret by
``--remote-secret-file`` or ``$KVSTORE_REMOTE_SECRET``.
"""

import argparse
import os
import sys

from kvstore import KVStoreError
from kvstore.errors import CorruptSnapshot, InvalidInput
from kvstore.reports import SnapshotInfo

from . import fmt
from .common import Fail, _arg, emit, open_store, settle
from .listing import parse_filter, render, select
from .main import Parser, global_options

ACTIONS = ("list", "stats", "push", "pull", "prune")


def _tiers(text):
    tiers = tuple(t for t in text.split(",") if t)
    if not tiers or set(tiers) - {"system", "user", "assistant"}:
        raise argparse.ArgumentTypeError(f"tiers are system, user, assistant (comma-separated), got {text!r}")
    return tiers


def add_remote_args(p):
    """The options naming a remote tier (``serve``, ``warm`` and ``kvstore remote``)."""
    p.add_argument("--remote", metavar="URL", default=None,
                   help="Redis behind the local store: redis://[user:password@]host:port/db, rediss://... "
                        "or unix://path (default: $KVSTORE_REMOTE, else none)")
    p.add_argument("--remote-prefix", metavar="WORD", default="kvstore",
                   help="key prefix of this deployment on the remote (default: kvstore)")
    p.add_argument("--remote-secret-file", metavar="FILE", default=None,
                   help="file holding the shared secret snapshots are signed with "
                        "(default: $KVSTORE_REMOTE_SECRET, else none)")
    p.add_argument("--remote-ttl", type=float, metavar="SECONDS", default=None,
                   help="seconds a pushed snapshot lives on the remote (default: until evicted or pruned)")
    p.add_argument("--remote-push", type=_tiers, metavar="TIERS", default=("system", "user"),
                   help="tiers of local writes pushed to the remote (default: system,user)")


def remote_url(args):
    return getattr(args, "remote", None) or os.environ.get("KVSTORE_REMOTE") or None


def tier_from(args):
    """A ``RemoteTier`` from the options, or ``None`` when no remote is named."""
    url = remote_url(args)
    if url is None:
        return None
    from kvstore.remote import RemoteTier

    return RemoteTier(url, prefix=args.remote_prefix, secret_file=args.remote_secret_file, ttl=args.remote_ttl,
                      push=args.remote_push)


def attach_args(store, args):
    """Put the remote the options name behind ``store`` (warn and go on if it does not answer)."""
    tier = tier_from(args)
    if tier is not None and store is None:
        fmt.warn("--remote is not used without a local store (--no-disk)")
    elif tier is not None:
        from kvstore.remote import attach

        attach(store, tier)
    return tier


# ------------------------------------------------------------------ admin
def _info(e):
    return SnapshotInfo(e.key, e.fingerprint, e.fingerprint[:16], e.tier, e.tokens, e.bytes, 0, e.created,
                        e.created, 0, True)


def _remote_entries(tier, filters):
    from kvstore.sync import entries

    listed = entries(tier)
    keep = {i.key for i in select([_info(e) for e in listed], filters)}
    return [e for e in listed if e.key in keep]


def cmd_list(args, tier):
    """List the snapshots on the remote."""
    got = _remote_entries(tier, args.filters)
    if args.format == "json":
        emit([vars(e) for e in got])
    elif args.quiet:
        for e in got:
            print(e.key)
    else:
        print(render([_info(e) for e in got]))
    return 0


def cmd_stats(args, tier):
    """Totals of the remote and the server's memory."""
    got = _remote_entries(tier, [])
    info = tier.place.server_info()
    out = {"remote": tier.name, "prefix": tier.place.prefix, "snapshots": len(got),
           "bytes": sum(e.bytes for e in got), "models": len({e.fingerprint for e in got}), **info}
    if args.format == "json":
        emit(out)
    else:
        limit = fmt.size(out["maxmemory"]) if out["maxmemory"] else "no limit"
        print(f"{out['remote']} (prefix {out['prefix']}{', cluster' if out['cluster'] else ''})")
        print(f"  {out['snapshots']} snapshots of {out['models']} models, {fmt.size(out['bytes'])}")
        print(f"  server memory {fmt.size(out['used_memory'])} of {limit} ({out['maxmemory_policy']})")
    return 0


def cmd_push(args, tier):
    """Send local snapshots (all, or those the filters select) to the remote."""
    with open_store(args) as store:
        chosen = select(store.entries(), args.filters)
        sent = sum(1 for e in chosen if tier.push(store, e.key))
    failed = len(chosen) - sent
    print(f"Pushed {sent} of {len(chosen)} snapshots to {tier.name}" + (f" ({failed} failed)" if failed else ""))
    return 1 if failed else 0


def cmd_pull(args, tier):
    """Copy remote snapshots (all, or those the filters select) into the local store."""
    from kvstore.sync import adopt, fetch_bundle

    got = _remote_entries(tier, args.filters)
    added = failed = 0
    with open_store(args, write=True, create=True) as store:
        for e in got:
            try:
                bundle, chunks = fetch_bundle(tier, e)
                added += bool(adopt(store, bundle, chunks))
            except (CorruptSnapshot, InvalidInput, OSError) as exc:
                failed += 1
                fmt.warn(f"remote snapshot {e.key[:12]} not pulled: {exc}")
    print(f"Pulled {added} of {len(got)} snapshots from {tier.name} into {args.store}"
          + (f" ({failed} refused)" if failed else ""))
    return 1 if failed else 0


def cmd_prune(args, tier):
    """Delete remote snapshots the filters select (all with none), then chunks nothing uses."""
    from kvstore.sync import delete, sweep_chunks

    got = _remote_entries(tier, args.filters)
    total = sum(e.bytes for e in got)
    print(f"About to delete {len(got)} remote snapshots ({fmt.size(total)}) from {tier.name}")
    if args.dry_run:
        return 0
    if got and not args.yes:
        if not sys.stdin.isatty() or input("Proceed? [y/N] ").strip().lower() not in ("y", "yes"):
            print("Nothing deleted")
            return 1
    deleted = sum(1 for e in got if delete(tier, e))
    blobs = sweep_chunks(tier)
    print(f"Deleted {deleted} remote snapshots and {blobs} unused blobs")
    return 0


RUN = {"list": cmd_list, "stats": cmd_stats, "push": cmd_push, "pull": cmd_pull, "prune": cmd_prune}


def main(command, argv, store_dir, output="human", quiet=False):
    """Run ``kvstore remote ACTION``; return the exit status."""
    parser = Parser(prog="kvstore remote", parents=[global_options(suppress=True)],
                    description="Snapshots shared between hosts through Redis: list, stats, push, pull, prune.")
    parser.add_argument("action", choices=ACTIONS, help="what to do")
    add_remote_args(parser)
    parser.add_argument("-f", "--filter", dest="filters", action="append", default=[], type=_arg(parse_filter),
                        metavar="FIELD OP VALUE", help="select snapshots as ls does (list, push, pull, prune)")
    parser.add_argument("--dry-run", action="store_true", help="prune: say what would go, delete nothing")
    parser.add_argument("-y", "--yes", action="store_true", help="prune: do not ask")
    args = settle(parser.parse_args(argv), store_dir, output, quiet)
    try:
        tier = tier_from(args)
        if tier is None:
            raise Fail("no remote: give --remote URL or set KVSTORE_REMOTE")
        import redis

        try:
            tier.place.open()
            return RUN[args.action](args, tier)
        except redis.exceptions.RedisError as exc:
            raise Fail(f"remote {tier.name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        finally:
            tier.place.close()
    except Fail as exc:
        fmt.error(str(exc))
        return exc.code
    except (KVStoreError, OSError) as exc:
        fmt.error(str(exc))
        return 1

