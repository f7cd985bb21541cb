"""The ``mithril`` command: ``train``, ``predict``, ``compare``, ``plot-schedule`` and
``cache``.

Errors in what the user typed (unknown names, bad hyperparameters, unwritable paths) end
with an argparse-style ``mithril CMD: error: ...`` line and exit status 2, never a traceback.
A missing optional dependency (the ``cli`` extra, or the backend's) is found before any work
and ends with one line naming the module and the ``pip install`` that brings it, status 1.
Ctrl-C ends with status 130, after writing what was measured. Training that has to stop (a
non-finite gradient with ``--nonfinite raise``) ends with one ``mithril CMD: error: ...`` line
naming the step and status 1, after writing the steps completed before it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .. import __version__
from . import cache, compare, predict, schedule, train
from .errors import CLIError, TrainingError
from .runtime import Aborted, exit_status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mithril",
        description="Train models (digits MLP and CNN, your own table, a character model), "
                    "predict with them, compare Mithril's optimizers, draw learning-rate "
                    "schedules, and show or clear the kernel caches. `mithril COMMAND --help` "
                    "describes each command.")
    parser.add_argument("--version", action="version", version=f"mithril {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (train, predict, compare, schedule, cache):
        p = module.add_parser(sub)
        p.set_defaults(parser=p)
    return parser


#: exit status of a missing optional dependency (2 is kept for mistakes on the command line)
MISSING_MODULE_STATUS = 1
#: exit status of training that had to stop (:class:`TrainingError`), as a failed process
TRAINING_ERROR_STATUS = 1


def needed_modules(args: argparse.Namespace) -> dict[str, str]:
    """The optional modules the parsed command needs -> what for. Only what its flags use:
    tqdm not with ``--no-progress``, matplotlib not with ``--no-plot``; ``--dry-run`` needs
    what the run would need (it checks that the run can start)."""
    if args.command == "plot-schedule":
        return {"matplotlib": "the figure"}
    if args.command == "cache":
        return {}
    needs = {}
    if args.backend in ("jax", "torch"):  # first: other imports may look for it
        needs[args.backend] = f"--backend {args.backend}"
    if args.command == "predict":
        return needs
    needs.update({"sklearn": "the digits data set (scikit-learn)",
                  "threadpoolctl": "the --threads limit"})
    if not args.no_progress:
        needs["tqdm"] = "the progress bar; --no-progress does without it"
    if not args.no_plot:
        needs["matplotlib"] = f"{'compare' if args.command == 'compare' else 'training'}.png; " \
                              "--no-plot does without it"
    return needs


def missing_module(args: argparse.Namespace) -> str | None:
    """One line naming the first needed module that cannot be imported, or None."""
    for module, why in needed_modules(args).items():
        extra = module if module in ("jax", "torch") else "cli"
        try:
            importlib.import_module(module)
        except ImportError:
            return (f"mithril {args.command}: error: missing module '{module}' ({why}): "
                    f"pip install 'mithril[{extra}]'")
        except Exception as e:  # noqa: BLE001 - a broken install: name it, no traceback
            return (f"mithril {args.command}: error: module '{module}' ({why}) fails to import "
                    f"({type(e).__name__}: {e}): reinstall it with pip install 'mithril[{extra}]'")
    return None


def _hint(args: argparse.Namespace, unknown: list[str]) -> str:
    """compare's optimizer settings are per configuration: say so for ``--beta1`` & co."""
    from .options import OPTIMIZER_OPTIONS

    flags = {o.flag for o in OPTIMIZER_OPTIONS}
    given = [a.partition("=")[0] for a in unknown if a.partition("=")[0] in flags]
    if args.command != "compare" or not given:
        return ""
    key = given[0][2:].replace("-", "_")
    return (f" (optimizer settings go in each configuration, e.g. --configs "
            f"'adam:{key}=...')")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status.
    Usage errors raise ``SystemExit(2)`` as argparse does; a missing optional dependency
    returns 1 after one line on stderr, before any work."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the command's usage and name ("mithril compare: error"), not the top's
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}{_hint(args, unknown)}")
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what --nprocs runs again
    missing = missing_module(args)
    if missing is not None:
        print(missing, file=sys.stderr)
        return MISSING_MODULE_STATUS
    try:
        return int(args.func(args))
    except CLIError as exc:
        args.parser.error(str(exc))
    except TrainingError as exc:  # not a usage error: no usage line
        print(f"mithril {args.command}: error: {exc}", file=sys.stderr)
        return TRAINING_ERROR_STATUS
    except Aborted as exc:  # a second SIGINT/SIGTERM while a step ran
        print(f"\nmithril {args.command}: aborted by a second {exc}: stopped at once, nothing "
              f"more written (a checkpoint saved before stands)", file=sys.stderr)
        return exit_status(exc.signum)
    except KeyboardInterrupt:
        print(f"\nmithril {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0  # pragma: no cover - parser.error exits


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
