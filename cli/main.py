"""The ``kvstore`` command: global options and the subcommand dispatcher.

This module owns the command table, the default store location and the
global options (``--store``, ``--format``, ``-q``). It imports command
modules lazily: admin commands never load MLX, and ``serve`` / ``warm``
receive everything after their name untouched.
"""

import argparse
import importlib
import os
import sys
from pathlib import Path

from .fmt import error

# name -> (module, one-line description); the module's main() runs the command
COMMANDS = {
    "ls": ("admin", "list snapshots (filter, sort, decode their text)"),
    "stats": ("admin", "totals by model and tier, disk and index use, hits, orphans"),
    "rm": ("admin", "delete snapshots by key or unique key prefix"),
    "prune": ("admin", "delete snapshots by policy (size, age, tier, model)"),
    "gc": ("admin", "housekeeping: temp files, orphaned blobs, broken records"),
    "verify": ("admin", "check every blob's header, size and checksums"),
    "export": ("admin", "write a selection of snapshots to an archive"),
    "import": ("admin", "add the snapshots of an archive to the store"),
    "remote": ("remote", "snapshots shared through Redis: list, stats, push, pull, prune"),
    "serve": ("serve", "run mlx_lm.server with the persistent prompt cache"),
    "warm": ("warm", "prefill prompts and store their snapshots"),
    "demo": ("demo", "warm, serve and restart on a built-in tiny model, showing what is reused"),
}
PASSTHROUGH = ("serve", "warm", "demo")


def default_store():
    """``$KVSTORE_DIR``, else the platform's user cache folder + ``kvstore``."""
    if env := os.environ.get("KVSTORE_DIR"):
        return os.path.expanduser(env)
    if sys.platform == "darwin":
        return str(Path.home() / "Library" / "Caches" / "kvstore")
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return str(Path(base) / "kvstore")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit 2)."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        sys.exit(2)


def global_options(suppress=False):
    """A parent parser with the global options.

    With ``suppress`` an option left out does not appear in the namespace,
    so a subcommand parser can take them after its name without undoing
    what came before it.
    """
    p = argparse.ArgumentParser(add_help=False)
    d = argparse.SUPPRESS if suppress else None
    p.add_argument("--store", metavar="DIR", default=d,
                   help=f"store directory (default: {default_store()}, from $KVSTORE_DIR, else the platform's "
                   "cache folder + kvstore)")
    p.add_argument("--format", choices=("human", "json"), default=d,
                   help="output for people or for programs (default: human)")
    p.add_argument("-q", "--quiet", action="store_true", default=d,
                   help="print only essentials: ls prints full keys, one a line")
    return p


def _commands_help():
    width = max(map(len, COMMANDS))
    lines = [f"  {name.ljust(width)}  {desc}" for name, (_mod, desc) in COMMANDS.items()]
    return "commands:\n" + "\n".join(lines) + "\n\nRun 'kvstore COMMAND --help' for a command's options."


def main(argv=None):
    """Run ``kvstore`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    parser = Parser(
        prog="kvstore", parents=[global_options()],
        description="Persistent, shared prompt-cache (KV) snapshots for MLX: inspect and maintain a store.",
        epilog=_commands_help(), formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="kvstore [--store DIR] [--format {human,json}] [-q] COMMAND ...",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("command", nargs="?", metavar="COMMAND", help=argparse.SUPPRESS)
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.version:
        from importlib import metadata

        print(f"kvstore {metadata.version('mlx-kvstore')}")
        return 0
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command not in COMMANDS:
        parser.error(f"unknown command {args.command!r} (choose from {', '.join(COMMANDS)})")
    store_dir = os.path.expanduser(args.store) if args.store else default_store()
    module = COMMANDS[args.command][0]
    try:
        mod = importlib.import_module(f"{__package__}.{module}")
    except ModuleNotFoundError as exc:  # the command's module, or a package it needs
        error(f"'kvstore {args.command}' is not available in this installation ({exc})")
        return 1
    if args.command in PASSTHROUGH:
        return mod.main(args.args, store_dir, fmt=args.format, quiet=bool(args.quiet))
    return mod.main(args.command, args.args, store_dir, output=args.format or "human", quiet=bool(args.quiet))


if __name__ == "__main__":
    sys.exit(main())
