"""Admin commands: ls, stats, rm, prune, gc, verify, export, import.

This module owns store maintenance from the command line. It works only
through ``SnapshotStore`` (multi-process safe, so it runs next to live
servers) and never imports MLX, mlx_lm or transformers: it starts fast and
runs on machines without a model. Commands that only read open the store
read-only, and no command but ``import`` creates a store.
"""

import argparse
import json
import logging
import operator
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path

import lmdb

from kvstore import KVStoreError, SnapshotStore
from kvstore.blobs import blob_relpath
from kvstore.store import SETTINGS, TIER_RANK, TIERS

from . import fmt
from .main import Parser, global_options

GRACE = "1h"
SHORT_KEY = 12
DECODE_WORDS = 8


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


# ------------------------------------------------------------------ filters
_FILTER = re.compile(r"^\s*([a-z_]+)\s*(>=|<=|!=|==|=|>|<)\s*(.*?)\s*$")
_OPS = {"=": operator.eq, "==": operator.eq, "!=": operator.ne, ">": operator.gt, "<": operator.lt,
        ">=": operator.ge, "<=": operator.le}
# field -> (kind, value of a SnapshotInfo); ages compare the time since then
FIELDS = {
    "key": ("text", lambda e: e.key),
    "model": ("text", lambda e: e.model),
    "tier": ("text", lambda e: e.tier),
    "tokens": ("count", lambda e: e.tokens),
    "hits": ("count", lambda e: e.hits),
    "size": ("size", lambda e: e.bytes),
    "shared": ("size", lambda e: e.shared_bytes),
    "accessed": ("age", lambda e: e.accessed),
    "created": ("age", lambda e: e.created),
    "age": ("age", lambda e: e.created),
}


def model_matches(e, name):
    """True if ``name`` is the snapshot's model name or a prefix of its fingerprint."""
    return e.model == name or e.fingerprint.startswith(name)


def _count(text):
    if not text.isdigit():
        raise ValueError(f"{text!r} is not a whole number")
    return int(text)


def parse_filter(text):
    """A predicate on ``SnapshotInfo`` from ``FIELD OP VALUE``.

    ``tier=system,user``, ``model=llama`` (name or fingerprint prefix),
    ``key=3fa9``, ``tokens>1000``, ``size>100MB``, ``hits=0``,
    ``accessed>7d`` (last access more than 7 days ago), ``created<1h``.
    Text fields take ``=`` / ``!=`` and comma-separated alternatives.
    """
    m = _FILTER.match(text)
    if not m:
        raise ValueError(f"invalid filter {text!r} (examples: tier=system, size>100MB, accessed>7d)")
    name, op, value = m.groups()
    if name not in FIELDS:
        raise ValueError(f"unknown filter field {name!r} (choose from {', '.join(FIELDS)})")
    kind, get = FIELDS[name]
    if kind == "text":
        alts = [v for v in value.split(",") if v]
        if op not in ("=", "==", "!=") or not alts:
            raise ValueError(f"invalid filter {text!r}: {name} takes = or != and a value")
        if name == "tier" and set(alts) - set(TIERS):
            raise ValueError(f"invalid filter {text!r}: tiers are {', '.join(TIERS)}")
        if name == "model":
            hit = lambda e: any(model_matches(e, v) for v in alts)  # noqa: E731
        elif name == "key":
            hit = lambda e: any(e.key.startswith(v.lower()) for v in alts)  # noqa: E731
        else:
            hit = lambda e: get(e) in alts  # noqa: E731
        return hit if op != "!=" else (lambda e: not hit(e))
    try:
        limit = {"count": _count, "size": fmt.parse_size, "age": fmt.parse_duration}[kind](value)
    except ValueError as exc:
        raise ValueError(f"invalid filter {text!r}: {exc}") from None
    cmp = _OPS[op]
    if kind == "age":
        now = time.time()
        return lambda e: cmp(now - get(e), limit)
    return lambda e: cmp(get(e), limit)


def select(entries, filters):
    """The entries every filter accepts."""
    return [e for e in entries if all(f(e) for f in filters)]


# ------------------------------------------------------------------ sorting
SORTS = {
    "key": lambda e: e.key,
    "model": lambda e: (e.model, e.fingerprint),
    "tier": lambda e: TIER_RANK.get(e.tier, -1),
    "tokens": lambda e: e.tokens,
    "size": lambda e: e.bytes,
    "shared": lambda e: e.shared_bytes,
    "hits": lambda e: e.hits,
    "accessed": lambda e: e.accessed,
    "created": lambda e: e.created,
}


def parse_sort(text):
    """``(field, descending)`` from ``FIELD`` or ``-FIELD``."""
    name = text.lstrip("-")
    if name not in SORTS:
        raise ValueError(f"cannot sort by {name!r} (choose from {', '.join(SORTS)})")
    return name, text.startswith("-")


def _glue_sort(argv):
    """argparse reads ``--sort -tokens`` as two options: pass ``--sort=-tokens``."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--sort" and i + 1 < len(argv) and argv[i + 1][:1] == "-" and argv[i + 1][1:] in SORTS:
            out.append(f"--sort={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def ordered(entries, field, descending):
    """Entries sorted by ``field``; ties in model, tier (system first), tokens order."""
    out = sorted(entries, key=lambda e: (e.model, e.fingerprint, -TIER_RANK.get(e.tier, -1), e.tokens, e.key))
    return sorted(out, key=SORTS[field], reverse=descending)


# --------------------------------------------------------------- rendering
def row(e, text=None):
    """A snapshot as a JSON object (raw bytes, ISO 8601 times)."""
    out = {"key": e.key, "model": e.model, "fingerprint": e.fingerprint, "tier": e.tier, "tokens": e.tokens,
           "bytes": e.bytes, "shared_bytes": e.shared_bytes, "hits": e.hits, "created": fmt.iso(e.created),
           "accessed": fmt.iso(e.accessed), "trimmable": e.trimmable}
    if text is not None:
        out["text"] = text
    return out


HEADERS = ["KEY", "MODEL", "TIER", "TOKENS", "SIZE", "SHARED", "HITS", "ACCESSED", "AGE"]
RIGHT = {"TOKENS", "SIZE", "SHARED", "HITS", "ACCESSED", "AGE"}


def render(entries, texts=None):
    """Entries as an aligned table for people."""
    now = time.time()
    rows = []
    for e in entries:
        r = [e.key[:SHORT_KEY], e.model, e.tier, str(e.tokens), fmt.size(e.bytes), fmt.size(e.shared_bytes),
             str(e.hits), fmt.ago(now - e.accessed) + " ago", fmt.ago(now - e.created)]
        rows.append(r + ([texts[e.key]] if texts is not None else []))
    return fmt.table(rows, HEADERS + (["TEXT"] if texts is not None else []), right=RIGHT)


def emit(obj):
    """Print ``obj`` as JSON on stdout."""
    print(json.dumps(obj, indent=2))


def describe(p):
    """One line for a ``Problem``."""
    where = ", ".join(f"{what} {x}" for what, x in (("snapshot", p.key), ("blob", p.blob)) if x and x not in p.reason)
    return f"{p.kind}: {p.reason}" + (f" ({where})" if where else "")


def problem(p):
    return {"kind": p.kind, "key": p.key, "blob": p.blob, "reason": p.reason}


def _by_tier(counts):
    parts = [f"{counts[t]} {t}" for t in sorted(counts, key=lambda t: TIER_RANK.get(t, -1))]
    return ", ".join(parts)


def _plural(n, word):
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


# --------------------------------------------------------------- the store
def open_store(args, write=False, create=False):
    """Open the store at ``args.store``.

    A path without a store is an error, except that ``create`` makes one in
    a missing or empty folder. Read-only unless ``write``.
    """
    path = Path(args.store)
    if not (path / SETTINGS).is_file():
        empty = not path.exists() or (path.is_dir() and not any(path.iterdir()))
        if not (create and empty):
            raise Fail(f"no kvstore store at {path}" if not path.exists()
                       else f"{path} is not a kvstore store (no {SETTINGS})")
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


def _file_size(path):
    try:
        return os.lstat(path).st_size
    except OSError:
        return 0


def releaser(store, entries):
    """``drop(e) -> bytes``: what deleting ``e`` frees after the drops before it.

    A blob is freed with the last snapshot that uses it, as ``store.delete``
    does, so a plan's size is what deleting it frees now.
    """
    users = Counter(b for e in entries for b in set(e.blobs))
    sizes = {b: _file_size(store.path / "blobs" / blob_relpath(b)) for b in users}

    def drop(e):
        freed = 0
        for b in set(e.blobs):
            users[b] -= 1
            if users[b] == 0:
                freed += sizes[b]
        return freed

    return drop


def disk_use(root):
    """Bytes of the files in each store folder (symlinks not followed)."""
    out = {}
    for sub in ("blobs", "tmp", "quarantine", "index"):
        total = 0
        for folder, _dirs, files in os.walk(root / sub):
            for name in files:
                total += _file_size(os.path.join(folder, name))
        out[sub] = total
    return out


# ---------------------------------------------------------------- commands
def ls_args(p):
    p.add_argument("-f", "--filter", dest="filters", action="append", default=[], type=_arg(parse_filter),
                   metavar="FILTER", help="keep snapshots matching FIELD OP VALUE, repeatable (AND): "
                   "tier=system, model=NAME (name or fingerprint prefix), key=PREFIX, tokens>1000, "
                   "size>100MB, shared>1MB, hits=0, accessed>7d (last access longer ago), created<1h")
    p.add_argument("--sort", type=_arg(parse_sort), default=("model", False), metavar="FIELD",
                   help=f"sort by {', '.join(SORTS)}; a '-' prefix sorts descending; tier sorts in prune "
                   "order: assistant, user, system (default: model)")
    p.add_argument("-r", "--reverse", action="store_true", help="reverse the order")
    p.add_argument("-n", "--limit", type=_arg(_count), metavar="N", help="show at most N snapshots (default: all)")
    p.add_argument("--decode", action="store_true",
                   help="show the first words of each snapshot's text (needs the model's tokenizer.json)")


def _tokenizer(Tokenizer, path, model):
    """``Tokenizer`` of ``path/tokenizer.json``, or None after a warning."""
    try:
        if not path:
            raise OSError("the store has no path for this model")
        return Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    except Exception as exc:  # tokenizers raises its own Exception type for bad files
        fmt.warn(f"cannot load the tokenizer of {model}: {exc}; showing '?'")
        return None


def decode(store, entries):
    """``{key: first words}`` decoded with each model's tokenizer ("?" when unavailable)."""
    try:
        from tokenizers import Tokenizer  # no MLX, no transformers
    except ImportError:
        fmt.warn("--decode needs the 'tokenizers' package (pip install tokenizers); showing '?'")
        return {e.key: "?" for e in entries}
    paths = {fp: m.get("path") for fp, m in store.models().items()}
    tokenizers, texts = {}, {}
    for e in entries:
        if e.fingerprint not in tokenizers:
            tokenizers[e.fingerprint] = _tokenizer(Tokenizer, paths.get(e.fingerprint), e.model)
        tok = tokenizers[e.fingerprint]
        if tok is None:
            texts[e.key] = "?"
            continue
        words = tok.decode(store.tokens_of(e.key)[: 8 * DECODE_WORDS], skip_special_tokens=False).split()
        text = " ".join(words[:DECODE_WORDS])
        texts[e.key] = text[:60] + ("..." if len(words) > DECODE_WORDS or len(text) > 60 else "")
    return texts


def cmd_ls(args):
    """List snapshots."""
    with open_store(args) as store:
        entries = select(store.entries(), args.filters)
        entries = ordered(entries, args.sort[0], args.sort[1] != args.reverse)[: args.limit]
        if args.quiet:
            for e in entries:
                print(e.key)
            return 0
        texts = decode(store, entries) if args.decode else None
    if args.format == "json":
        emit([row(e, texts and texts[e.key]) for e in entries])
    else:
        print(render(entries, texts))
    return 0


def stats_args(p):
    p.add_argument("--grace", type=_arg(fmt.parse_duration), default=fmt.parse_duration(GRACE), metavar="DURATION",
                   help=f"count as orphans only files older than this, as gc does (default: {GRACE})")


def cmd_stats(args):
    """Totals by model and tier, disk and LMDB map use, hits, what gc would clean."""
    with open_store(args) as store:
        s = store.stats()
        clean = Counter(p.kind for p in store.gc(grace=args.grace, dry_run=True))
        index_file = store.path / "index" / "data.mdb"
        disk = disk_use(store.path)
        s.pop("counters", None)
        s.update(disk_bytes=disk, index_file_bytes=index_file.stat().st_size, gc=dict(clean))
    if args.format == "json":
        emit(s)
        return 0
    used = s["map_used"] / max(s["map_size"], 1)
    print(f"store      {s['path']}")
    print(f"snapshots  {s['snapshots']} ({s['tokens']} tokens, {_plural(s['hits'], 'hit')}), "
          f"{_plural(s['segments'], 'segment')}")
    print(f"size       {fmt.size(s['bytes'])} indexed; on disk {fmt.size(disk['blobs'])} blobs, "
          f"{fmt.size(disk['tmp'])} temp, {fmt.size(disk['quarantine'])} quarantined")
    print(f"index      {fmt.size(s['map_used'])} used of a {fmt.size(s['map_size'])} map ({used:.1%}), "
          f"file {fmt.size(s['index_file_bytes'])}, {s['block_tokens']}-token blocks")
    if clean:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(clean.items()))
        print(f"gc         {_plural(sum(clean.values()), 'item')} to clean ({kinds}): run 'kvstore gc'")
    else:
        print("gc         nothing to clean")
    if s["by_model"]:
        rows = [[name, str(m["snapshots"]), str(m["tokens"]), fmt.size(m["bytes"]), m["fingerprint"]]
                for name, m in sorted(s["by_model"].items())]
        print()
        print(fmt.table(rows, ["MODEL", "SNAPSHOTS", "TOKENS", "SIZE", "FINGERPRINT"],
                        right={"SNAPSHOTS", "TOKENS", "SIZE"}))
        rows = [[t, str(d["snapshots"]), str(d["tokens"]), fmt.size(d["bytes"])]
                for t, d in sorted(s["by_tier"].items(), key=lambda kv: -TIER_RANK.get(kv[0], -1))]
        print()
        print(fmt.table(rows, ["TIER", "SNAPSHOTS", "TOKENS", "SIZE"], right={"SNAPSHOTS", "TOKENS", "SIZE"}))
    return 0


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
    summary = f"{_plural(len(plan), 'snapshot')} ({fmt.size(planned)}; {_by_tier(counts)})"
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
            print(render(plan))
            print(f"\nWould delete {summary}; dry run, nothing deleted.")
        return 0
    if args.yes and human and not args.quiet:
        print(f"About to delete {summary}.")
    confirm(args, summary)
    count = freed = 0
    with progress(args, len(plan), "deleting") as bar:
        for e in plan:
            if limit is not None and store.total_bytes() <= limit:
                break
            freed += store.delete(e.key)
            count += 1
            bar.update()
    if not human:
        emit({"dry_run": False, "snapshots": rows(plan[:count]), "planned_bytes": planned,
              "deleted": count, "freed_bytes": freed})
    elif not args.quiet:
        print(f"Deleted {_plural(count, 'snapshot')}, freed {fmt.size(freed)}.")
    return 0


def cmd_rm(args):
    """Delete snapshots by key or unique key prefix."""
    with open_store(args, write=not args.dry_run) as store:
        entries = store.entries()
        by_key = {e.key: e for e in entries}
        plan = [by_key[k] for k in resolve(store, args.keys, by_key)]
        drop = releaser(store, entries)
        return remove(store, args, plan, sum(drop(e) for e in plan))


def _tier_list(text):
    tiers = [t for t in text.split(",") if t]
    if not tiers or set(tiers) - set(TIERS):
        raise ValueError(f"invalid tier {text!r} (choose from {', '.join(TIERS)})")
    return tiers


def prune_args(p):
    p.add_argument("--max-size", type=_arg(fmt.parse_size), metavar="SIZE",
                   help="delete until the store holds at most SIZE (e.g. 20GB)")
    p.add_argument("--older-than", type=_arg(fmt.parse_duration), metavar="DURATION",
                   help="delete snapshots last used longer ago than DURATION (e.g. 7d, 12h, 30m)")
    p.add_argument("--tier", dest="tiers", action="append", type=_arg(_tier_list), metavar="TIER",
                   help="only these tiers: system, user, assistant (repeatable or comma list)")
    p.add_argument("--model", metavar="MODEL", help="only this model (name or fingerprint prefix)")
    p.add_argument("--keep-last", type=_arg(_count), metavar="N",
                   help="spare the N most recently used snapshots of each model")
    _deletion_args(p)


def cmd_prune(args):
    """Delete snapshots by policy: lower tiers first, least recently used first within a tier."""
    if all(getattr(args, k) is None for k in ("max_size", "older_than", "tiers", "model", "keep_last")):
        raise Usage("prune needs a policy: --max-size, --older-than, --tier, --model or --keep-last "
                    "(it does not delete everything)")
    tiers = sorted({t for group in args.tiers or [] for t in group})
    with open_store(args, write=not args.dry_run) as store:
        cands = store.plan_prune(older_than=args.older_than, tier=tiers or None, keep_last=args.keep_last)
        entries = store.entries()
        if args.model is not None:
            if not any(model_matches(e, args.model) for e in entries):
                raise Fail(f"no snapshot in the store is of model {args.model!r}")
            cands = [e for e in cands if model_matches(e, args.model)]
        drop = releaser(store, entries)
        total = store.total_bytes()
        plan, planned, frees = [], 0, {}
        for e in cands:
            if args.max_size is not None and total - planned <= args.max_size:
                break
            plan.append(e)
            frees[e.key] = drop(e)
            planned += frees[e.key]
        return remove(store, args, plan, planned, limit=args.max_size, frees=frees)


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
    src = store.path / "index" / "data.mdb"
    dest = store.path / "index.compact"
    out = {"index_file_bytes": src.stat().st_size, "path": str(dest), "compacted_bytes": None}
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
            print(f"Would clean {_plural(len(problems), 'item')} ({kinds}); dry run, nothing changed.")
        else:
            print(f"Cleaned {_plural(len(problems), 'item')} ({kinds}).")
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
            line = f"Verified {_plural(len(keys), 'snapshot')}: "
            if not problems:
                line += "no problems."
            else:
                line += f"{_plural(len(problems), 'problem')} in {_plural(len(bad), 'snapshot')}"
                line += (f"; quarantined {_plural(quarantined, 'blob')} and deleted {_plural(len(bad), 'snapshot')}."
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
        print(f"Exported {_plural(count, 'snapshot')} ({fmt.size(nbytes)}) to {archive}.")
    return 1 if problems else 0


def import_args(p):
    p.add_argument("archive", metavar="ARCHIVE", help="a tar archive written by 'kvstore export'")


def cmd_import(args):
    """Add an archive's snapshots to the store (created if missing); every blob is verified first."""
    if not os.path.isfile(args.archive):
        raise Fail(f"no archive at {args.archive}")
    with open_store(args, create=True) as store:
        with progress(args, None, "importing") as bar:
            count, nbytes, problems = store.import_archive(args.archive, progress=bar.update)
    for p in problems:
        fmt.warn(f"not imported: {describe(p)}")
    if args.format == "json":
        emit({"archive": args.archive, "snapshots": count, "bytes": nbytes, "problems": [problem(p) for p in problems]})
    elif not args.quiet:
        print(f"Imported {_plural(count, 'snapshot')} ({fmt.size(nbytes)}) from {args.archive}.")
    return 1 if problems else 0


# name -> (add arguments, run)
ADMIN = {
    "ls": (ls_args, cmd_ls),
    "stats": (stats_args, cmd_stats),
    "rm": (rm_args, cmd_rm),
    "prune": (prune_args, cmd_prune),
    "gc": (gc_args, cmd_gc),
    "verify": (verify_args, cmd_verify),
    "export": (export_args, cmd_export),
    "import": (import_args, cmd_import),
}


def main(command, argv, store_dir, output="human", quiet=False):
    """Run the admin ``command`` with its own arguments ``argv``; return the exit status.

    ``store_dir``, ``output`` (``--format``) and ``quiet`` are the global
    options given before the command; the same options after it win.
    """
    add_args, run = ADMIN[command]
    parser = Parser(prog=f"kvstore {command}", parents=[global_options(suppress=True)],
                    description=run.__doc__.splitlines()[0])
    add_args(parser)
    args = parser.parse_args(_glue_sort(argv))
    args.store = os.path.expanduser(getattr(args, "store", None) or store_dir)
    args.format = getattr(args, "format", None) or output
    args.quiet = getattr(args, "quiet", False) or quiet
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.WARNING,
                        format="kvstore: %(levelname)s: %(message)s")
    try:
        return run(args)
    except Fail as exc:
        fmt.error(str(exc))
        return exc.code
    except BrokenPipeError:
        # the reader went away (| head): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (KVStoreError, OSError, lmdb.Error) as exc:
        fmt.error(str(exc))
        return 1
    except KeyboardInterrupt:
        fmt.error("interrupted")
        return 130
