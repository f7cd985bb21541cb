"""``mithril compare``: several optimizer configurations on the same task, seed and budget."""

from __future__ import annotations

import argparse
import math
import re
import textwrap
from pathlib import Path
from typing import Any

from .common import (
    HelpFormatter,
    add_common_optimizer_flags,
    add_output_flags,
    add_schedule_flags,
    add_task_flags,
    run_config,
)
from .data import load_digits_split
from .errors import CLIError, TrainingError
from .optimizer_catalog import NAMES, REFUSED, parse_optimizer_spec
from .options import SCHEDULER_NAMES, check_name
from .plots import compare_figure
from .report import (
    check_out_dir,
    default_out_dir,
    ensure_writable_dir,
    new_dirs,
    run_removing_empty_dirs,
    staged_dir,
    table,
    write_csv,
    write_json,
)
from .train import describe_data, write_run
from .training import Run, RunResult

DEFAULT_CONFIGS = (
    "adam:lr=1e-3",
    "adamw:lr=1e-3,weight_decay=1e-2",
    "sgd:lr=0.05",
    "sgd:lr=0.05,momentum=0.9,nesterov",
    "rmsprop:lr=1e-3",
    "adagrad:lr=0.05",
)

DESCRIPTION = """\
Train the digits MLP once per optimizer configuration, all with the same data split,
initialisation (seed), batch order, epochs and schedule, and rank them by final test
accuracy. A configuration is OPTIMIZER[:KEY=VALUE,...]: the keys are the optimizer's
constructor arguments (lr for learning_rate, eps for epsilon; e.g. lr, momentum, nesterov,
beta1, beta2, weight_decay; lion:beta1=0.95,beta2=0.98), clip_norm, clip_eps, clip_value,
centralize, normalize_grad, normalize_eps and nonfinite, plus `scheduler` and its settings
(step_size, gamma, t_max, warmup_steps, ...), which replace the shared flags. lookahead wraps another optimizer
(lookahead:inner=sgd,sync_period=5,momentum=0.9). The optimizers:
""" + textwrap.fill(", ".join(n for n in NAMES if n not in REFUSED), 88, initial_indent="  ",
                    subsequent_indent="  ", break_on_hyphens=False) + """

Writes, under --out: compare.png (loss curves and test accuracy), results.csv and
results.json (the ranking), and one folder per configuration with its metrics.csv,
epochs.csv and summary.json. They are written into a hidden folder beside --out that is
renamed at the end, so --out never holds a partial set. Ctrl-C (status 130), or a
non-finite gradient in a configuration with nonfinite=raise (one error line naming it, status
1), stops the comparison: the configurations run so far are ranked and written.
"""

EXAMPLES = """\
examples:
  mithril compare
  mithril compare --configs "adam:lr=1e-3" "sgd:lr=0.1,momentum=0.9" --epochs 10
  mithril compare --configs "adam:lr=3e-3" "adam:lr=3e-3,scheduler=onecycle" --scheduler none
  mithril compare --configs adam "lion:lr=3e-4" lamb prodigy "schedule-free-adamw" --epochs 10
"""

RESULT_FIELDS = ("rank", "config", "test_acc", "test_loss", "train_acc", "train_loss",
                 "steps", "total_s", "interrupted", "optimizer", "schedule", "folder")


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("compare", help="compare optimizer configurations on the same task",
                       description=DESCRIPTION, epilog=EXAMPLES, usage="mithril compare [options]",
                       formatter_class=HelpFormatter)
    p.add_argument("--configs", nargs="+", metavar="OPTIMIZER[:KEY=VALUE,...]",
                   default=list(DEFAULT_CONFIGS),
                   help="configurations to compare (default: " + " ".join(DEFAULT_CONFIGS) + ")")
    add_common_optimizer_flags(p)
    add_schedule_flags(p)
    add_task_flags(p)
    add_output_flags(p, "compare")
    p.set_defaults(func=run)
    return p


def parse_config(text: str) -> tuple[str, dict[str, Any]]:
    def scheduler(name: str) -> str:
        return check_name("scheduler", name.lower(), SCHEDULER_NAMES)

    return parse_optimizer_spec(text, run_keys=True, special={"scheduler": scheduler})


def slug(i: int, text: str) -> str:
    return f"{i:02d}-" + re.sub(r"[^A-Za-z0-9.=_-]+", "_", text).strip("_")


def ranking(labels: list[str], results: list[RunResult], folders: list[str]) -> list[dict]:
    rows = [{"config": label, **r.final, "steps": len(r.steps), "total_s": r.total_s,
             "interrupted": r.interrupted, "error": r.error, "optimizer": r.optimizer,
             "schedule": r.schedule, "folder": folder}
            for label, r, folder in zip(labels, results, folders)]

    def order(r: dict) -> tuple[bool, float, float]:  # a diverged (NaN) run ranks last
        acc, loss = r["test_acc"], r["test_loss"]
        return (math.isnan(acc), -acc if not math.isnan(acc) else 0.0,
                loss if not math.isnan(loss) else math.inf)

    rows.sort(key=order)
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return rows


def run(args: argparse.Namespace) -> int:
    # (the folders the command creates, --out and missing parents, go again if it fails)
    return run_removing_empty_dirs(compare_command, args)


def compare_command(args: argparse.Namespace, made: list[Path]) -> int:
    """``mithril compare``; the folders it creates are added to ``made`` before it does."""
    data = load_digits_split(args.test_size, args.split_seed)
    runs: list[tuple[str, Run]] = []
    for text in args.configs:
        name, overrides = parse_config(text)
        try:
            runs.append((text, Run(run_config(args, name, overrides), data)))
        except CLIError as exc:
            raise CLIError(f"config {text!r}: {exc}") from None
    out = Path(args.out) if args.out else default_out_dir("compare", args.name)
    if not args.dry_run:
        made += new_dirs(out)
        ensure_writable_dir(out)
    else:
        check_out_dir(out)
    first = runs[0][1]
    print(f"mithril compare: {len(runs)} configurations, {args.epochs} epochs each, seed "
          f"{args.seed}, {args.backend}; {describe_data(data, first)}")
    if args.dry_run:
        for label, r in runs:
            print(f"  {label}: {r.optimizer_repr}; schedule {r.schedule.description}")
        print(f"dry run: would train {len(runs)} x {first.total_steps} steps and write to {out}")
        return 0
    labels: list[str] = []
    results: list[RunResult] = []
    folders: list[str] = []
    interrupted = False
    error: str | None = None
    with staged_dir(out) as stage:  # the whole set appears at once, or nothing
        for i, (label, r) in enumerate(runs, 1):
            print(f"[{i}/{len(runs)}] {label}: {r.optimizer_repr}; "
                  f"schedule {r.schedule.description}")
            res = r.train(progress=False if args.no_progress else None, desc=label)
            if res.error is not None:  # nonfinite=raise: stop as Ctrl-C does
                error = f"config {label!r}: {res.error}"
                if not res.steps:  # not one step: nothing of it to keep
                    print(f"    stopped at its first step: {res.error}")
                    break
            folder = stage / slug(i, label)
            folder.mkdir()
            write_run(res, folder, r.steps_per_epoch, plot=False)
            labels.append(label)
            results.append(res)
            folders.append(folder.name)
            print(f"    test acc {res.final['test_acc']:.2%}, test loss "
                  f"{res.final['test_loss']:.4f} ({res.total_s:.1f} s)")
            if res.interrupted or res.error is not None:
                interrupted = res.interrupted
                print(f"{'interrupted' if interrupted else 'stopped on an error'}: ranking "
                      f"the configurations run so far")
                break
        if not results:  # the first configuration failed at once: write nothing
            raise TrainingError(error)
        rows = ranking(labels, results, folders)
        written = [write_csv(stage / "results.csv", rows, RESULT_FIELDS),
                   write_json(stage / "results.json",
                              {"task": "digits", "epochs": args.epochs,
                               "batch_size": args.batch_size, "seed": args.seed,
                               "backend": args.backend, "results": rows})]
        if not args.no_plot:
            title = (f"digits MLP {list(args.hidden)} · {args.backend} · {args.epochs} epochs "
                     f"× {first.steps_per_epoch} steps · seed {args.seed}")
            written.append(compare_figure(results, labels, stage / "compare.png",
                                          first.steps_per_epoch, title))
    files = [out / f.name for f in written]
    print()
    print(table(["rank", "config", "test acc", "test loss", "train acc", "train loss", "time"],
                [[r["rank"], r["config"], f"{r['test_acc']:.2%}", f"{r['test_loss']:.4f}",
                  f"{r['train_acc']:.2%}", f"{r['train_loss']:.4f}", f"{r['total_s']:.1f} s"]
                 for r in rows], align="rlrrrrr"))
    print(f"wrote {', '.join(str(f) for f in files)}")
    if error is not None:
        raise TrainingError(f"{error}; the configurations run so far are written to {out}")
    return 130 if interrupted else 0
