"""Flags shared by the commands, and turning parsed flags into a :class:`RunConfig`."""

from __future__ import annotations

import argparse
import textwrap
from typing import Any

from .argtypes import (
    MAX_SEED,
    bounded_int,
    fraction,
    out_path,
    positive_float,
    run_name,
)
from .errors import CLIError
from .options import (
    COMMON_OPTIONS,
    OPTIONS,
    SCHEDULER_NAMES,
    SCHEDULER_OPTIONS,
    WARMUP_OPTIONS,
    add_options,
    parse_spec,
    settings_from,
)
from .training import BACKENDS, MIXED_PRECISION, RunConfig

#: torch's OneCycleLR defaults of --base-momentum / --max-momentum
MOMENTUM_CYCLE_DEFAULT = (0.85, 0.95)

#: bounds of the task flags: beyond them a run would not fit in memory or in a lifetime
MAX_EPOCHS, MAX_BATCH, MAX_HIDDEN, MAX_THREADS = 10_000, 1_000_000, 8192, 1024


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The commands' help: descriptions as written, option help wrapped at spaces only (the
    default also breaks at hyphens: "sign-" / "sgd", "docs/cli-" / "train.md")."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


#: the initial loss scale of --mixed-precision (--loss-scale), torch's GradScaler's
LOSS_SCALE = 2.0**16

def add_task_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("task and budget")
    g.add_argument("--backend", choices=BACKENDS, default="numpy",
                   help="where the model runs (default: numpy)")
    g.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="parameter and compute dtype without mixed precision (default: float32)")
    g.add_argument("--epochs", type=bounded_int(1, MAX_EPOCHS), default=20,
                   help=f"passes over the training set (default: 20; train --data: 50; at most "
                        f"{MAX_EPOCHS})")
    g.add_argument("--batch-size", type=bounded_int(1, MAX_BATCH), default=64, help="default: 64")
    g.add_argument("--seed", type=bounded_int(0, MAX_SEED), default=0,
                   help="seed of the parameter initialisation and batch order (default: 0)")
    g.add_argument("--split-seed", type=bounded_int(0, MAX_SEED), default=0,
                   help="seed of the train/test split, fixed so runs compare (default: 0)")
    g.add_argument("--test-size", type=fraction, default=0.2,
                   help="fraction of the data held out for testing (default: 0.2; train --task "
                        "charlm: 0.1, the end of the text)")
    g.add_argument("--hidden", type=bounded_int(1, MAX_HIDDEN), nargs="+", default=[128, 64], metavar="SIZE",
                   help="hidden layer sizes of the MLP (default: 128 64)")
    g.add_argument("--activation", choices=("relu", "tanh", "gelu", "sigmoid", "leaky_relu"),
                   default="relu", help="hidden activation (default: relu)")
    g.add_argument("--threads", type=bounded_int(1, MAX_THREADS), default=1,
                   help="BLAS/OpenMP and optimizer threads while training (default: 1, the "
                        "fastest for this small model, and robust when other jobs share the "
                        "cores)")
    g.add_argument("--mixed-precision", choices=tuple(MIXED_PRECISION), default="none",
                   help="compute in float16/bfloat16 with float32 master weights and dynamic "
                        "loss scaling (default: none)")
    g.add_argument("--loss-scale", type=positive_float, default=None,
                   help=f"initial loss scale for --mixed-precision (default: "
                        f"{LOSS_SCALE:g})")


def add_schedule_flags(p: argparse.ArgumentParser, default: str | None = "cosine") -> None:
    g = p.add_argument_group("learning-rate schedule")
    g.add_argument("--scheduler", nargs="+", metavar="NAME[:KEY=VALUE,...]",
                   default=[default] if default else None,
                   help=f"one of {', '.join(SCHEDULER_NAMES)} (default: {default}); settings "
                        "may follow the name, e.g. step:step_size=200,gamma=0.5; several names "
                        "with --switch-at make a sequence")
    add_options(p, "scheduler settings (lengths in steps; plateau counts epochs)",
                SCHEDULER_OPTIONS + WARMUP_OPTIONS)


def add_common_optimizer_flags(p: argparse.ArgumentParser) -> None:
    add_options(p, "gradient handling (all optimizers)", COMMON_OPTIONS)


def add_output_flags(p: argparse.ArgumentParser, command: str) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="DIR", type=out_path, help=f"output folder (default: runs/<name>, or "
                   f"runs/{command}-<date>-<time>)")
    g.add_argument("--name", type=run_name,
                   help="run name: the output folder becomes runs/<name> (a plain folder "
                        "name: no '/', '..')")
    g.add_argument("--no-plot", action="store_true", help="do not draw the PNG")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bar (it is shown on a terminal only anyway); one line per "
                        "epoch instead")
    g.add_argument("--dry-run", action="store_true",
                   help="check every setting, print what would run, and stop before training "
                        "or writing anything")


def momentum_cycle_of(args: argparse.Namespace) -> tuple[float, float] | None:
    """``(base, max)`` momentum of ``--momentum-cycle`` (None without it; the bounds alone
    are a mistake)."""
    base, top = getattr(args, "base_momentum", None), getattr(args, "max_momentum", None)
    if not getattr(args, "momentum_cycle", False):
        given = [f for f, v in (("--base-momentum", base), ("--max-momentum", top))
                 if v is not None]
        if given:
            raise CLIError(f"{' and '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} with "
                           f"--momentum-cycle")
        return None
    return (MOMENTUM_CYCLE_DEFAULT[0] if base is None else base,
            MOMENTUM_CYCLE_DEFAULT[1] if top is None else top)


def scheduler_specs(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    return [parse_spec(s, "scheduler", SCHEDULER_NAMES) for s in args.scheduler or ["none"]]


def run_config(args: argparse.Namespace, optimizer: str = "adam",
               overrides: dict[str, Any] | None = None) -> RunConfig:
    """A :class:`RunConfig` from the parsed flags (``overrides``: option values that replace
    the flags', e.g. from a ``compare`` spec; its ``scheduler`` key replaces ``--scheduler``)."""
    if args.mixed_precision != "none" and args.dtype != "float32":
        # the masters are float32 and the model computes in half precision: float64 would be
        # silently dropped (summary.json recording it as if it had been used)
        raise CLIError(f"--dtype {args.dtype} does not apply with --mixed-precision "
                       f"{args.mixed_precision} (float32 master weights, computing in "
                       f"{args.mixed_precision}); give one of them")
    if args.loss_scale is not None and args.mixed_precision == "none" and \
            not getattr(args, "resume", None):  # (a run saved before: its parser's 65536)
        raise CLIError(f"--loss-scale only applies with --mixed-precision fp16 or bf16 (it "
                       f"scales the half-precision loss), got --loss-scale {args.loss_scale:g}")
    settings = settings_from(args, OPTIONS.values())
    specs = scheduler_specs(args)
    if overrides:
        overrides = dict(overrides)
        if "scheduler" in overrides:
            specs = [(overrides.pop("scheduler"), {})]
        settings.update(overrides)
    return RunConfig(optimizer=optimizer, settings=settings, schedulers=specs,
                     # (named as keys where the command has no such flag: compare's --beta1)
                     spec_keys=tuple(k for k in overrides or () if not hasattr(args, k)),
                     backend=args.backend, dtype=args.dtype,
                     mixed_precision=args.mixed_precision,
                     loss_scale=LOSS_SCALE if args.loss_scale is None else args.loss_scale,
                     epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                     hidden=tuple(args.hidden or ()), activation=args.activation or "relu",
                     threads=args.threads, no_decay_on=getattr(args, "no_decay_on", None),
                     ema=getattr(args, "ema", None), momentum_cycle=momentum_cycle_of(args))
