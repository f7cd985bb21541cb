"""``mithril plot-schedule``: draw a learning-rate schedule without training anything."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..utils.optimizers import SGD
from .argtypes import bounded_int, finite_float, out_path
from .common import HelpFormatter, add_schedule_flags, scheduler_specs
from .errors import CLIError
from .options import OPTIONS, build_schedule, settings_from
from .plots import schedule_figure
from .report import ensure_writable_file, write_csv

DESCRIPTION = """\
Draw the learning rate of every step of a schedule, exactly as training would see it: the
real scheduler classes drive a real optimizer (SGD) and the learning rate is read before
each step. Writes the figure to --out and the values to a CSV beside it (same name, .csv).

Any scheduler of `mithril train` works except plateau (it follows the training loss):
warm-up (--warmup-steps), warm restarts (cosine-restarts), optax's / Keras's decays
(exponential-decay, polynomial-decay, inverse-time-decay, with their arguments as flags),
warmup-stable-decay (wsd) and sequences (several --scheduler names with --switch-at)
included.
"""

#: the most steps drawn (a million points already take a while to plot)
MAX_STEPS = 1_000_000

EXAMPLES = """\
examples:
  mithril plot-schedule --scheduler cosine --steps 1000 --warmup-steps 100
  mithril plot-schedule --scheduler cosine-restarts --t-0 100 --t-mult 2 --steps 700
  mithril plot-schedule --scheduler onecycle --max-lr 0.1 --steps 500 --out onecycle.png
  mithril plot-schedule --scheduler "step:step_size=100,gamma=0.5" cosine --switch-at 400
  mithril plot-schedule --scheduler exponential-decay --transition-steps 100 --decay-rate 0.5
  mithril plot-schedule --scheduler wsd --warmup-steps 100 --decay-steps 200 --decay-type cosine
"""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("plot-schedule", help="draw a learning-rate schedule to a PNG",
                       description=DESCRIPTION, epilog=EXAMPLES,
                       usage="mithril plot-schedule [options]",
                       formatter_class=HelpFormatter)
    g = p.add_argument_group("what to draw")
    g.add_argument("--steps", type=bounded_int(1, MAX_STEPS), default=1000,
                   help="number of optimizer steps (default: 1000)")
    g.add_argument("--lr", type=finite_float, default=0.1, help="base learning rate (default: 0.1)")
    g.add_argument("--out", metavar="FILE", type=out_path, help="image file, .png (or .svg/.pdf) "
                   "(default: runs/schedule-<scheduler>.png)")
    add_schedule_flags(p)
    p.set_defaults(func=run)
    return p


def learning_rates(specs: list[tuple[str, dict[str, Any]]], settings: dict[str, Any],
                   steps: int, lr: float) -> tuple[list[float], str]:
    """The learning rate used by each of ``steps`` steps, and the schedule's description."""
    try:
        optimizer = SGD(learning_rate=lr)
    except ValueError as exc:
        raise CLIError(f"--lr: {exc}") from None
    schedule = build_schedule(optimizer, specs, settings, steps)
    if schedule.plateau is not None:
        raise CLIError("plateau lowers the lr when the training loss stops improving, so it has "
                       "no schedule to draw without a run: see training.png of "
                       "`mithril train --scheduler plateau`")
    values = []
    for _ in range(steps):
        values.append(optimizer.get_learning_rate())
        schedule.after_step()
    return values, schedule.description


def _not_a_schedule(path: Path) -> bool:
    """Whether ``path`` exists and is not a CSV this command wrote (its header ``step,lr``):
    the values CSV is written beside ``--out`` unasked, so it must not replace another file."""
    if not path.exists():
        return False
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.readline().strip() != "step,lr"
    except OSError:  # a folder of that name, no permission
        return True


def run(args: argparse.Namespace) -> int:
    specs = scheduler_specs(args)
    settings = settings_from(args, OPTIONS.values())
    values, description = learning_rates(specs, settings, args.steps, args.lr)
    names = "-".join(n for n, _ in specs)
    out = Path(args.out) if args.out else Path("runs") / f"schedule-{names}.png"
    if out.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise CLIError(f"--out {out}: give a .png, .svg or .pdf file name")
    ensure_writable_file(out)
    values_csv = out.with_suffix(".csv")
    if _not_a_schedule(values_csv):  # e.g. --out data.png beside the user's data.csv
        raise CLIError(f"--out {out}: the values go beside it to {values_csv}, which exists and "
                       f"is not a schedule of this command (a file of yours?); give another "
                       f"--out name")
    marks = []
    warmup = settings.get("warmup_steps") or 0
    if warmup:
        marks.append((warmup, "warm-up ends"))
    marks += [(s, f"→ {n}") for s, (n, _) in zip(settings.get("switch_at") or [], specs[1:])]
    title = f"{description} · base lr {args.lr:g} · {args.steps} steps"
    schedule_figure(values, out, title, marks)
    csv_path = write_csv(values_csv,
                         [{"step": i, "lr": v} for i, v in enumerate(values)], ("step", "lr"))
    peak = max(range(len(values)), key=values.__getitem__)
    print(f"mithril plot-schedule: {description}")
    print(f"  lr at step 0: {values[0]:.6g}; peak {values[peak]:.6g} at step {peak}; "
          f"lowest {min(values):.6g}; last (step {len(values) - 1}) {values[-1]:.6g}")
    print(f"wrote {out}, {csv_path}")
    return 0
