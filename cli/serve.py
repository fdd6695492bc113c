"""kvstore serve: mlx-lm's own OpenAI-compatible server with the persistent cache.

Runs ``mlx_lm.server.main`` itself, not a copy: every mlx_lm.server option
passes through unchanged. The only change is the prompt cache: the server
builds its ``LRUPromptCache`` by module-global name, and kvstore puts a
``TieredPromptCache`` factory there (memory tier sized by the server's own
``--prompt-cache-size`` / ``--prompt-cache-bytes``, disk tier in the store).
A store that cannot be opened makes the server run without the disk tier.
"""

import argparse
import functools
import logging
import re
import signal
import sys

from .remote import InvalidInput, add_remote_args, attach_args

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
        description="mlx_lm.server with a persistent, shared prompt cache; GET /metrics serves Prometheus "
                    "metrics, SIGTERM stops cleanly (exit 0 once queued snapshots are written). Options not "
                    "listed here are mlx_lm.server's own and pass through unchanged (see below).",
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
    p.add_argument("--preload", action="store_true",
                   help="at start, load the model's most used snapshots (system tier first) into the memory "
                        "tier in the background, so the first request is a memory hit")
    p.add_argument("--warmup", action="store_true",
                   help="send one short request through the server before it listens, so the first real "
                        "request does not pay MLX's first-call costs (start-up takes that long instead)")
    p.add_argument("--cache-log-interval", type=float, default=60.0, metavar="SECONDS",
                   help="how often cache counters are logged (default: 60)")
    p.add_argument("--normalize", action="store_true",
                   help="remove known volatile header lines (billing headers with a per-request hash, request "
                        "ids, timestamps) from system messages before templating; changes what the model sees")
    p.add_argument("--normalize-pattern", action="append", default=[], metavar="REGEX",
                   help="remove lines matching REGEX from system messages too (repeatable; with or without "
                        "--normalize)")
    p.add_argument("--no-resume-points", action="store_true",
                   help="no checkpoint at the end of each reply as the next request re-renders it")
    p.add_argument("--tenant-header", metavar="NAME",
                   help="take each request's tenant from this header, e.g. X-Tenant: tenants never share "
                        "a snapshot (default: no tenants)")
    p.add_argument("--tenant-from-key", action="store_true",
                   help="take each request's tenant from a hash of its API key (Authorization: Bearer KEY "
                        "or X-Api-Key); --tenant-header wins when both are present (default: off)")
    add_remote_args(p)
    return p


def server_options(rest):
    """The mlx_lm.server options kvstore must know too (they shape the cache)."""
    from mlx_lm.generate import DEFAULT_QUANTIZED_KV_START

    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--kv-bits", type=int, default=None)
    peek.add_argument("--kv-group-size", type=int, default=64)
    peek.add_argument("--quantized-kv-start", type=int, default=DEFAULT_QUANTIZED_KV_START)
    peek.add_argument("--log-level", default="INFO")
    peek.add_argument("--model", default=None)
    peek.add_argument("--adapter-path", default=None)
    peek.add_argument("--draft-model", default=None)
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


def _stop(signum, frame):
    # the server shuts down cleanly on KeyboardInterrupt: queued snapshots are written.
    # Once: a second signal must not interrupt the shutdown itself.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv, store_dir=None, fmt=None, quiet=False):
    """Run ``kvstore serve``; return the exit status when the server stops (0 after SIGTERM or Ctrl-C)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    # from the start, so a stop during start-up is clean too
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
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
        return _serve(server, args, rest, store_dir)
    except KeyboardInterrupt:
        return 0


def _serve(server, args, rest, store_dir):
    """Run mlx_lm.server with kvstore's cache, handler and stop; close the cache and store after."""
    opts = server_options(rest)
    logging.basicConfig(level=getattr(logging, opts.log_level.upper(), logging.INFO), format=FORMAT)
    from kvstore import TieredPromptCache, server_generation
    from kvstore.metrics import ServerMetrics
    from kvstore.server_cache import RequestCache
    from kvstore.server_http import Tenancy, make_handler, run

    try:  # mlx_lm.server builds its ResponseGenerator by name: normalisation and resume points
        server_generation.install(server_generation.patterns(args.normalize, args.normalize_pattern),
                                  resume=not args.no_resume_points)
    except (RuntimeError, re.error) as exc:
        print(f"kvstore serve: {exc}", file=sys.stderr)
        return 2

    from .main import default_store

    store = None if args.no_disk else open_store(args.store or store_dir or default_store(), args.disk_max_bytes)
    try:
        attach_args(store, args)
    except InvalidInput as exc:
        print(f"kvstore serve: {exc}", file=sys.stderr)
        return 2
    made = []
    metrics = ServerMetrics()

    def prompt_cache(max_size=10, max_bytes=None):
        cache = TieredPromptCache(
            store, max_size=max_size, max_bytes=max_bytes, persist=args.persist,
            queue_size=args.write_queue, log_interval=args.cache_log_interval, **cache_options(opts),
        )
        made.append(cache)
        metrics.cache = cache
        cache.on_write(metrics.written)
        if args.preload and opts.model is not None:
            # mlx_lm.server's key of its default model
            cache.preload((opts.model, opts.adapter_path, opts.draft_model))
        return RequestCache(cache, metrics)

    # mlx_lm.server.run builds its cache as LRUPromptCache(prompt_cache_size)
    server.LRUPromptCache = prompt_cache
    # and serves with APIHandler: kvstore's adds /metrics and tenants, and stops cleanly
    handler = make_handler(metrics, Tenancy(args.tenant_header, args.tenant_from_key))
    server.run = functools.partial(run, handler_class=handler, bind=lambda gen: gen.prompt_cache.bind(gen))
    if args.warmup:
        from .warmup import before_listening

        before_listening(server)
    sys.argv = ["kvstore serve", *rest]
    try:
        server.main()
    finally:
        for cache in made:
            cache.close()
        if store is not None:
            store.close()
    return 0
