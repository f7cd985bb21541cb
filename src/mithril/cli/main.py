"""The ``mithril`` command: ``train``, ``compare`` and ``plot-schedule``.

Errors in what the user typed (unknown names, bad hyperparameters, unwritable paths) end
with an argparse-style ``mithril CMD: error: ...`` line and exit status 2, never a traceback.
Ctrl-C ends with status 130, after writing what was measured.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import __version__
from . import compare, schedule, train
from .errors import CLIError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mithril",
        description="Train and compare Mithril's optimizers on a small real task, and draw "
                    "learning-rate schedules. `mithril COMMAND --help` describes each command.")
    parser.add_argument("--version", action="version", version=f"mithril {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (train, compare, schedule):
        p = module.add_parser(sub)
        p.set_defaults(parser=p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status.
    Usage errors raise ``SystemExit(2)`` as argparse does."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except CLIError as exc:
        args.parser.error(str(exc))
    except KeyboardInterrupt:
        print(f"\nmithril {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0  # pragma: no cover - parser.error exits


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
