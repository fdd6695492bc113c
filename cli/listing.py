"""kvstore ls and stats: listing a store, its filters, sort orders and table."""

import operator
import os
import re
import time
from collections import Counter

from kvstore import TIER_RANK, TIERS
from kvstore.listing import footprint
from kvstore.maintenance.policy import model_matches

from . import fmt
from .common import GRACE, SHORT_KEY, _arg, emit, not_created, open_store, plural

DECODE_WORDS = 8

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
    "own": ("size", lambda e: e.unique_bytes),
    "shared": ("size", lambda e: e.shared_bytes),
    "accessed": ("age", lambda e: e.accessed),
    "created": ("age", lambda e: e.created),
    "age": ("age", lambda e: e.created),
}


def whole_number(text):
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
        limit = {"count": whole_number, "size": fmt.parse_size, "age": fmt.parse_duration}[kind](value)
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
    "own": lambda e: e.unique_bytes,
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
    if field == "model" and not descending:
        return out  # already in that order
    return sorted(out, key=SORTS[field], reverse=descending)


# --------------------------------------------------------------- rendering
def row(e, text=None):
    """A snapshot as a JSON object (raw bytes, ISO 8601 times)."""
    out = {"key": e.key, "model": e.model, "fingerprint": e.fingerprint, "tier": e.tier, "tokens": e.tokens,
           "bytes": e.bytes, "own_bytes": e.unique_bytes, "shared_bytes": e.shared_bytes, "hits": e.hits, "created": fmt.iso(e.created),
           "accessed": fmt.iso(e.accessed), "trimmable": e.trimmable}
    if text is not None:
        out["text"] = text
    return out


HEADERS = ["KEY", "MODEL", "TIER", "TOKENS", "SIZE", "OWN", "SHARED", "HITS", "ACCESSED", "AGE"]
RIGHT = {"TOKENS", "SIZE", "OWN", "SHARED", "HITS", "ACCESSED", "AGE", "FREES"}
COLUMNS = ("SIZE is everything a snapshot reads (fixed for its life) = OWN (bytes only it holds: what "
           "deleting it alone frees now) + SHARED (segments other snapshots read too). The closing total "
           "counts each shared segment once: for the whole store it equals the store's bytes.")


def render(entries, texts=None, frees=None):
    """Entries as an aligned table for people (``frees``: a FREES column, bytes by key)."""
    now = time.time()
    size, age = _Memo(fmt.size), _Memo(fmt.ago)  # few distinct values: each formatted once
    rows = []
    for e in entries:
        try:  # an age shows whole seconds or coarser: its text depends on int(seconds) alone
            ages = age[int(now - e.accessed)] + " ago", age[int(now - e.created)]
        except (OverflowError, ValueError):  # inf or nan from a damaged record
            ages = fmt.ago(now - e.accessed) + " ago", fmt.ago(now - e.created)
        r = [e.key[:SHORT_KEY], e.model, e.tier, str(e.tokens), size[e.bytes], size[e.unique_bytes],
             size[e.shared_bytes], str(e.hits), *ages]
        r += [size[frees[e.key]]] if frees is not None else []
        rows.append(r + ([texts[e.key]] if texts is not None else []))
    headers = HEADERS + (["FREES"] if frees is not None else []) + (["TEXT"] if texts is not None else [])
    return fmt.table(rows, headers, right=RIGHT)


class _Memo(dict):
    """``memo[x]``: ``fn(x)``, computed once per distinct ``x``."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def __missing__(self, x):
        got = self[x] = self.fn(x)
        return got


def total_line(entries, store_bytes, everything):
    """``total: X own + Y shared (N segments) = Z``, and how that compares with the store."""
    own, shared, n = footprint(entries)
    line = (f"total: {plural(len(entries), 'snapshot')}, {fmt.size(own)} own + {fmt.size(shared)} shared "
            f"({plural(n, 'segment')}) = {fmt.size(own + shared)}")
    return line + (" (the whole store)" if everything else f" of the store's {fmt.size(store_bytes)}")


# ---------------------------------------------------------------- commands
def ls_args(p):
    p.epilog = "columns: " + COLUMNS
    p.add_argument("-f", "--filter", dest="filters", action="append", default=[], type=_arg(parse_filter),
                   metavar="FILTER", help="keep snapshots matching FIELD OP VALUE, repeatable (AND): "
                   "tier=system, model=NAME (name or fingerprint prefix), key=PREFIX, tokens>1000, "
                   "size>100MB, own>1MB, shared>1MB, hits=0, accessed>7d (last access longer ago), created<1h")
    p.add_argument("--sort", type=_arg(parse_sort), default=("model", False), metavar="FIELD",
                   help=f"sort by {', '.join(SORTS)}; a '-' prefix sorts descending; tier sorts in prune "
                   "order: assistant, user, system (default: model)")
    p.add_argument("-r", "--reverse", action="store_true", help="reverse the order")
    p.add_argument("-n", "--limit", type=_arg(whole_number), metavar="N", help="show at most N snapshots (default: all)")
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
    """List snapshots: SIZE = OWN + SHARED, and a total that adds up to the store's bytes."""
    if not_created(args):
        fmt.warn(f"no store at {args.store} yet ('kvstore serve', 'warm' or 'import' create it): it is empty")
        if not args.quiet:
            emit([]) if args.format == "json" else print(render([]) + "\n" + total_line([], 0, True))
        return 0
    with open_store(args) as store:
        listed = store.entries()
        entries = select(listed, args.filters)
        entries = ordered(entries, args.sort[0], args.sort[1] != args.reverse)[: args.limit]
        if args.quiet:
            for e in entries:
                print(e.key)
            return 0
        texts = decode(store, entries) if args.decode else None
        store_bytes = store.total_bytes()
    if args.format == "json":
        emit([row(e, texts and texts[e.key]) for e in entries])
    else:
        print(render(entries, texts))
        print(total_line(entries, store_bytes, len(entries) == len(listed)))
    return 0


def stats_args(p):
    p.add_argument("--grace", type=_arg(fmt.parse_duration), default=fmt.parse_duration(GRACE), metavar="DURATION",
                   help=f"count as orphans only files older than this, as gc does (default: {GRACE})")


def cmd_stats(args):
    """Totals by model and tier, disk and LMDB map use, hits, what gc would clean."""
    if not_created(args):
        if args.format == "json":
            emit({"path": args.store, "exists": False, "snapshots": 0, "bytes": 0})
        else:
            print(f"store      {args.store} (not created yet: 'kvstore serve', 'warm' or 'import' create it)")
            print("snapshots  0")
        return 0
    with open_store(args) as store:
        s = store.stats()
        clean = Counter(p.kind for p in store.gc(grace=args.grace, dry_run=True))
        disk = store.disk_usage()
        s.pop("counters", None)
        s.update(disk_bytes=disk, index_file_bytes=store.index_file_bytes(), gc=dict(clean))
    if args.format == "json":
        emit(s)
        return 0
    used = s["map_used"] / max(s["map_size"], 1)
    print(f"store      {s['path']}")
    print(f"snapshots  {s['snapshots']} ({s['tokens']} tokens, {plural(s['hits'], 'hit')}), "
          f"{plural(s['segments'], 'segment')}")
    print(f"size       {fmt.size(s['bytes'])} indexed; on disk {fmt.size(disk['blobs'])} blobs, "
          f"{fmt.size(disk['tmp'])} temp, {fmt.size(disk['quarantine'])} quarantined")
    print(f"index      {fmt.size(s['map_used'])} used of a {fmt.size(s['map_size'])} map ({used:.1%}), "
          f"file {fmt.size(s['index_file_bytes'])}, {s['block_tokens']}-token blocks")
    if clean:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(clean.items()))
        print(f"gc         {plural(sum(clean.values()), 'item')} to clean ({kinds}): run 'kvstore gc'")
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
