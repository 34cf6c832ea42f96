"""Command line: ``python -m recycle <command>``. Run ``python -m recycle <command> --help`` for the options.

`parser` declares the commands; `use` (predict, eval), `train` (pretune, invert, meta-train) and `hub` (zoo, export,
push, push-pool) run them; this module runs one, under torchrun where it can use several ranks, and turns the errors
meant for a user into one line and an exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import traceback
from typing import Callable, Optional, Sequence

from .. import distributed
from ..adapter import LoRAFormatError
from ..backbone import BackboneError
from ..hub import HubError
from ..images import ImageError
from ..pool import PoolError
from ..predict import SupportError
from ..runtime import tune_allocator
from ..io import terminal_safe
from .parser import build_parser

__all__ = ["main", "build_parser"]

_logger = logging.getLogger("recycle")
# Errors whose message is complete for a user (invalid settings, unusable files, a diverged run): printed as one
# line without a traceback. OSError covers files that cannot be read or written (missing, a file where a folder
# is needed, no permission).
USER_ERRORS = (
    BackboneError,
    LoRAFormatError,
    HubError,
    ImageError,
    SupportError,
    PoolError,
    OSError,
    ValueError,
    FloatingPointError,
    distributed.DistributedError,
)
# Exit codes (documented in the README): argparse exits with 2 for a malformed command line.
EXIT_OK, EXIT_USER_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
# Commands that train or run the backbone over many images: they get `tune_allocator` (fewer page faults).
HEAVY_COMMANDS = ("predict", "invert", "pretune", "meta-train", "eval")


def run_on_ranks(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command that can use several ranks: join the process group when launched by torchrun (one device per
    rank), keep the output of ranks other than 0 quiet, and leave the group after a successful run."""
    args.device = distributed.setup(args.device)
    world, rank = distributed.world_size(), distributed.rank()
    if world == 1:
        try:
            return func(args)
        finally:
            distributed.teardown()
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(f"%(levelname)s [rank {rank}/{world}] %(message)s"))
    if rank:
        logging.getLogger().setLevel(max(logging.WARNING, logging.getLogger().level))
        if hasattr(args, "quiet"):
            args.quiet = True
    try:
        with contextlib.ExitStack() as stack:
            if rank:
                stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
            code = func(args)
    except BaseException as e:  # noqa: BLE001 - every failure ends this rank, and with it the job
        # No teardown and no normal interpreter exit: a collective another rank left pending would block the one and
        # abort the other. Say what failed and leave now; the launcher (or the peers' timeouts) ends the other ranks.
        if not isinstance(e, USER_ERRORS + (KeyboardInterrupt,)):
            traceback.print_exc()
        print(f"rank {rank} of {world} failed: {type(e).__name__}: {terminal_safe(str(e))}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED if isinstance(e, KeyboardInterrupt) else EXIT_USER_ERROR)  # a bug: 1, traceback
    distributed.teardown()
    return code


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        if args.command in HEAVY_COMMANDS:
            tune_allocator()
        if getattr(args, "ranks", False):
            return run_on_ranks(func, args)
        return func(args)
    except USER_ERRORS as e:
        print("error: " + terminal_safe(" ".join(str(e).split())), file=sys.stderr)  # one line, no escapes
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
