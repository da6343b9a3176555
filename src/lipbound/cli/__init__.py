"""The ``lipbound`` command line: a thin layer over the library functions.

Each sub-command lives in its own module defining ``register(sub)`` and ``run(args)``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys

from .._memory import keep_freed_memory
from ..errors import LipboundError
from .common import start_idle_sampling

COMMANDS = ["models", "bound", "demo", "sweep", "layers", "radius", "compare", "bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lipbound",
        description="Certified local and global Lipschitz bounds, certified radii, attacks "
                    "and rival methods for ReLU networks.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        if importlib.util.find_spec(f"{__name__}.{name}") is None:
            continue
        mod = importlib.import_module(f"{__name__}.{name}")
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    keep_freed_memory()  # this process is ours: reuse freed blocks (lipbound._memory)
    start_idle_sampling()  # --threads auto: the idle count spans the model loading
    try:
        return int(args.func(args) or 0)
    except LipboundError as exc:
        print(f"lipbound: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lipbound: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`lipbound ... | head`): stop quietly
        _silence_stdout()
        return 141  # as a shell reports a process ended by SIGPIPE


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit raises nothing more."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (e.g. captured in tests)
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
