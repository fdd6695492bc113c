"""kvstore warm: prefill system prompts into a store before deployment.

Each prompt is rendered with the model's chat template and cut where
mlx_lm.server cuts the system segment, so the first request after the server
starts hits. Owns argument parsing and reporting; the work is kvstore.warm.
"""

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from .remote import add_remote_args, attach_args


def _load_json(path, what):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"kvstore warm: cannot read {what} {path}: {exc}") from None


def build_parser():
    p = argparse.ArgumentParser(
        prog="kvstore warm",
        description="Prefill system prompts and store them (tier system) keyed as mlx_lm.server keys "
                    "the system segment of a chat, so the first request after deployment hits.",
    )
    p.add_argument("--store", help="store directory (default: --store before the subcommand, "
                                   "$KVSTORE_DIR, or the platform cache folder)")
    p.add_argument("--model", required=True, help="model directory, as given to the server's --model")
    p.add_argument("--adapter-path", help="adapter directory, as given to the server (default: none)")
    p.add_argument("--system", action="append", default=[], metavar="TEXT",
                   help="a system prompt (repeatable: several prompts in one call)")
    p.add_argument("--system-file", action="append", default=[], metavar="FILE",
                   help="a file holding one system prompt (repeatable)")
    p.add_argument("--messages", action="append", default=[], metavar="FILE.json",
                   help="a JSON chat (list of messages) or a list of chats; each chat's leading "
                        "system messages are warmed (repeatable)")
    p.add_argument("--tools", metavar="FILE.json", help="JSON list of tools the requests will carry")
    p.add_argument("--chat-template-args", type=json.loads, default={}, metavar="JSON",
                   help="arguments for apply_chat_template, as given to the server (default: {})")
    p.add_argument("--kv-bits", type=int, help="the server's --kv-bits (default: none)")
    p.add_argument("--kv-group-size", type=int, default=64, help="the server's --kv-group-size (default: 64)")
    p.add_argument("--quantized-kv-start", type=int, default=None,
                   help="the server's --quantized-kv-start (default: mlx-lm's)")
    p.add_argument("--prefill-step-size", type=int, default=2048, help="tokens per prefill step (default: 2048)")
    p.add_argument("--tenant", metavar="VALUE",
                   help="warm for the tenant whose requests carry VALUE in the server's --tenant-header "
                        "(default: requests without a tenant)")
    p.add_argument("--tenant-key", metavar="KEY",
                   help="warm for the tenant of API key KEY (a server with --tenant-from-key)")
    p.add_argument("--format", choices=("human", "json"), default=None, help="output format (default: human)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the keys stored")
    add_remote_args(p)
    return p


def conversations(args):
    """The chats to warm, from --system, --system-file and --messages."""
    chats = [[{"role": "system", "content": text}] for text in args.system]
    for path in args.system_file:
        try:
            chats.append([{"role": "system", "content": Path(path).read_text()}])
        except OSError as exc:
            raise SystemExit(f"kvstore warm: cannot read {path}: {exc}") from None
    for path in args.messages:
        data = _load_json(path, "messages")
        group = data if data and isinstance(data[0], list) else [data]
        for chat in group:
            if not (isinstance(chat, list) and chat and all(isinstance(m, dict) and "role" in m for m in chat)):
                raise SystemExit(f"kvstore warm: {path} is not a list of chat messages")
            chats.append(chat)
    if not chats:
        raise SystemExit("kvstore warm: give at least one --system, --system-file or --messages")
    return chats


def _line(r):
    state = "already stored" if r["existing"] else (
        f"prefilled in {r['seconds']:.2f}s" if r["key"] else "NOT STORED (see the log)")
    return f"{(r['key'] or '-')[:12]}  system  {r['tokens']:>7} tokens  {state}"


def open_store(path):
    """The store at ``path``, or ``SystemExit`` with one line saying why not."""
    from kvstore import KVStoreError, SnapshotStore

    if os.path.exists(path) and not os.path.isdir(path):
        raise SystemExit(f"kvstore warm: {path} is a file, not a store directory")
    try:
        return SnapshotStore(path)
    except (KVStoreError, OSError) as exc:
        raise SystemExit(f"kvstore warm: cannot open the store at {path}: {exc}") from None


def main(argv, store_dir=None, fmt=None, quiet=False):
    """Run ``kvstore warm``; return the exit status.

    Human output prints one line per prompt as it finishes (with a progress
    bar on a terminal); JSON prints everything at the end and, off a
    terminal, one progress line per prompt on stderr. Ctrl-C stops between
    store writes: what was stored is reported, the status is 130.
    """
    args = build_parser().parse_args(argv)
    chats = conversations(args)
    tools = _load_json(args.tools, "tools") if args.tools else None
    fmt = args.format or fmt or "human"
    quiet = args.quiet or quiet
    from kvstore import KVStoreError
    from kvstore.warm import check_model_path, warm

    from .main import default_store
    from .serve import cache_options

    path = args.store or store_dir or default_store()
    if args.quantized_kv_start is None:
        from mlx_lm.generate import DEFAULT_QUANTIZED_KV_START

        args.quantized_kv_start = DEFAULT_QUANTIZED_KV_START
    # the fingerprint the server resolves its model key to, with the same options
    options = cache_options(args)
    if args.tenant and args.tenant_key:
        raise SystemExit("kvstore warm: give --tenant or --tenant-key, not both")
    from kvstore.server_http import header_tenant, key_tenant

    tenant = header_tenant(args.tenant) if args.tenant else key_tenant(args.tenant_key) if args.tenant_key else None
    tty = sys.stderr.isatty() and not quiet
    done = []

    def report(r):
        done.append(r)
        if quiet or fmt == "json":
            if fmt == "json" and not tty and not quiet:
                print(f"kvstore warm: {len(done)}/{len(chats)} {_line(r)}", file=sys.stderr, flush=True)
            return
        line = _line(r)
        if tty:
            from tqdm import tqdm

            tqdm.write(line)
        else:
            print(line, flush=True)

    try:
        check_model_path(args.model)  # before the store is created for nothing
    except KVStoreError as exc:
        print(f"kvstore warm: {exc}", file=sys.stderr)
        return 1
    store = open_store(path)
    # Ctrl-C means stop, even when started from a shell that ignores SIGINT in the background
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with store:
            attach_args(store, args)  # warmed system prompts are pushed as they are stored
            results = warm(
                store, args.model, chats, adapter_path=args.adapter_path, tools=tools,
                chat_template_args=args.chat_template_args, prefill_step_size=args.prefill_step_size,
                progress=tty, on_result=report, tenant=tenant, **options,
            )
    except KeyboardInterrupt:
        stored = sum(1 for r in done if r["key"])
        print(f"kvstore warm: interrupted; {stored} of {len(chats)} system prompts stored in {path}",
              file=sys.stderr)
        return 130
    except KVStoreError as exc:
        print(f"kvstore warm: {exc}", file=sys.stderr)
        return 1
    failed = [r for r in results if r["key"] is None]
    if fmt == "json":
        print(json.dumps({"store": str(path), "model": str(args.model), "snapshots": results}, indent=1))
    elif quiet:
        for r in results:
            if r["key"]:
                print(r["key"])
    else:
        print(f"Warmed {len(results) - len(failed)} of {len(results)} system prompts in {path}")
    return 1 if failed else 0
