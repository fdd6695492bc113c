"""Admin commands: ls, stats, rm, prune, gc, verify, export, import.

This module dispatches store maintenance from the command line to the
command groups (``listing``, ``deletion``, ``transfer``). They work only
through kvstore's public API (``SnapshotStore`` is multi-process safe, so
they run next to live servers) and never import MLX, mlx_lm or
transformers: they start fast and run on machines without a model. Commands
that only read open the store read-only, and no command but ``import``
creates a store.
"""

import contextlib
import os
import sys

from kvstore import KVStoreError
from kvstore.listing import gc_paused

from . import fmt
from .common import Fail, settle
from .deletion import cmd_gc, cmd_prune, cmd_rm, gc_args, prune_args, rm_args
from .listing import _glue_sort, cmd_ls, cmd_stats, ls_args, stats_args
from .main import Parser, global_options
from .transfer import cmd_export, cmd_import, cmd_verify, export_args, import_args, verify_args

# commands that hold a listing of every snapshot: they build many objects and no cycles
LISTING = ("ls", "stats", "rm", "prune")
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
    args = settle(parser.parse_args(_glue_sort(argv)), store_dir, output, quiet)
    try:
        with gc_paused() if command in LISTING else contextlib.nullcontext():
            return run(args)
    except Fail as exc:
        fmt.error(str(exc))
        return exc.code
    except BrokenPipeError:
        # the reader went away (| head): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (KVStoreError, OSError) as exc:
        fmt.error(str(exc))
        return 1
    except KeyboardInterrupt:
        fmt.error("interrupted")
        return 130
