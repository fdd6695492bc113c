"""kvstore serve: mlx-lm's own OpenAI-compatible server with the persistent cache.

Runs ``mlx_lm.server.main`` itself, not a copy: every mlx_lm.server option
passes through unchanged. The only change is the prompt cache: the server
builds its ``LRUPromptCache`` by module-global name, and kvstore puts a
``TieredPromptCache`` factory there (memory tier sized by the server's own
``--prompt-cache-size`` / ``--prompt-cache-bytes``, disk tier in the store).
A store that cannot be opened makes the server run without the disk tier.
"""

import argparse
import logging
import signal
import sys

log = logging.getLogger("kvstore")

FORMAT = "%(asctime)s - %(levelname)s - %(message)s"


def _parse_size(text):
    from .fmt import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _budget(text):
    if text in ("auto", "none"):
        return None if text == "none" else text
    return _parse_size(text)


def _tiers(text):
    from kvstore import TIERS

    tiers = tuple(t for t in (x.strip() for x in text.split(",")) if t and t != "none")
    bad = [t for t in tiers if t not in TIERS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown tier {bad[0]!r} (choose from {', '.join(TIERS)}, or none)")
    return tiers


def build_parser():
    p = argparse.ArgumentParser(
        prog="kvstore serve", add_help=False,
        description="mlx_lm.server with a persistent, shared prompt cache. Options not listed here "
                    "are mlx_lm.server's own and pass through unchanged (see below).",
    )
    p.add_argument("-h", "--help", action="store_true", help="show this help and mlx_lm.server's, then exit")
    from .main import default_store

    p.add_argument("--store", metavar="DIR", help=f"store directory (default: {default_store()}, "
                   "from $KVSTORE_DIR or the user cache folder); a read-only one is served read-only")
    p.add_argument("--disk-max-bytes", type=_budget, default="auto", metavar="SIZE",
                   help="disk budget: a size (e.g. 20GB), auto (half the free disk space, at most 50 GB) or "
                   "none; enforced at startup and after each write, lower tiers first, system prompts only "
                   "when nothing else is left (default: auto)")
    p.add_argument("--persist", type=_tiers, default=("system", "user"), metavar="TIERS",
                   help="tiers written to disk, comma-separated, or none; assistant holds generated text and "
                   "every plain /v1/completions prompt (default: system,user)")
    p.add_argument("--no-disk", action="store_true", help="memory tier only, like plain mlx_lm.server")
    p.add_argument("--write-queue", type=int, default=64, metavar="N",
                   help="snapshots waiting for the disk writer before new ones are dropped (default: 64)")
    p.add_argument("--cache-log-interval", type=float, default=60.0, metavar="SECONDS",
                   help="how often cache counters are logged (default: 60)")
    return p


def server_options(rest):
    """The mlx_lm.server options kvstore must know too (they shape the cache)."""
    from mlx_lm.generate import DEFAULT_QUANTIZED_KV_START

    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--kv-bits", type=int, default=None)
    peek.add_argument("--kv-group-size", type=int, default=64)
    peek.add_argument("--quantized-kv-start", type=int, default=DEFAULT_QUANTIZED_KV_START)
    peek.add_argument("--log-level", default="INFO")
    opts, _ = peek.parse_known_args(rest)
    return opts


def cache_options(opts):
    """Fingerprint options for the server's KV quantisation (as ``kvstore warm`` computes them)."""
    if opts.kv_bits is None:
        return {}
    return {"kv_bits": opts.kv_bits, "kv_group_size": opts.kv_group_size,
            "quantized_kv_start": opts.quantized_kv_start}


def open_store(path, max_bytes):
    """Open the store and enforce its budget; ``None`` (with a warning) if it cannot be opened."""
    from kvstore import KVStoreError, SnapshotStore
    from kvstore.budget import at_startup

    try:
        store = SnapshotStore(path, max_bytes=max_bytes)
    except (KVStoreError, OSError) as exc:
        log.warning("kvstore: cannot open the store at %s (%s); serving without the disk tier", path, exc)
        return None
    at_startup(store, max_bytes)
    return store


def main(argv, store_dir=None, fmt=None, quiet=False):
    """Run ``kvstore serve``; return the exit status when the server stops."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    import mlx_lm.server as server

    if args.help:
        parser.print_help()
        print("\nmlx_lm.server options:\n")
        sys.argv = ["kvstore serve", "--help"]
        try:
            server.main()
        except SystemExit:
            pass
        return 0
    opts = server_options(rest)
    logging.basicConfig(level=getattr(logging, opts.log_level.upper(), logging.INFO), format=FORMAT)
    from kvstore import TieredPromptCache

    from .main import default_store

    store = None if args.no_disk else open_store(args.store or store_dir or default_store(), args.disk_max_bytes)
    made = []

    def prompt_cache(max_size=10, max_bytes=None):
        cache = TieredPromptCache(
            store, max_size=max_size, max_bytes=max_bytes, persist=args.persist,
            queue_size=args.write_queue, log_interval=args.cache_log_interval, **cache_options(opts),
        )
        made.append(cache)
        return cache

    # mlx_lm.server.run builds its cache as LRUPromptCache(prompt_cache_size)
    server.LRUPromptCache = prompt_cache

    def stop(signum, frame):
        # the server shuts down cleanly on KeyboardInterrupt; queued snapshots are written
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    sys.argv = ["kvstore serve", *rest]
    try:
        server.main()
    except KeyboardInterrupt:
        pass
    finally:
        for cache in made:
            cache.close()
        if store is not None:
            store.close()
    return 0
