"""``mithril compare``: several optimizer configurations on the same task, seed and budget."""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import math
import re
import shlex
import textwrap
from pathlib import Path
from typing import Any

from .argtypes import in_path
from .common import (
    HelpFormatter,
    add_common_optimizer_flags,
    add_output_flags,
    add_schedule_flags,
    add_task_flags,
    run_config,
)
from .compare_checkpoints import (
    FORMAT,
    add_checkpoint_flags,
    restore_config,
    resumed_args,
    save_config,
    wants_checkpoints,
)
from .data import Dataset, load_digits_split
from .errors import CLIError, TrainingError
from .networks import OBJECTIVES
from .optimizer_catalog import NAMES, REFUSED, parse_optimizer_spec
from .options import SCHEDULER_NAMES, check_name
from .plots import compare_figure
from .report import (
    check_out_dir,
    default_out_dir,
    ensure_writable_dir,
    new_dirs,
    run_removing_empty_dirs,
    same_file,
    staged_dir,
    table,
    write_csv,
    write_json,
)
from .resume import snapshot, write_checkpoint
from .runtime import exit_status
from .tasks import add_impute_flag, is_table, needs_target
from .train import (
    DEFAULT_DELTA,
    RUN_FILES,
    describe_data,
    not_ours,
    open_unit,
    privacy_line,
    write_run,
)
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
Train the digits MLP (or, with --data FILE --target COLUMN, an MLP on your table, as
`mithril train --data` does) once per optimizer configuration, all with the same data split,
initialisation (seed), batch order, epochs and schedule, and rank them by final test
accuracy (regression: test RMSE). A configuration is OPTIMIZER[:KEY=VALUE,...]: the keys
are the optimizer's constructor arguments (lr for learning_rate, eps for epsilon; e.g. lr, momentum, nesterov,
beta1, beta2, weight_decay; lion:beta1=0.95,beta2=0.98), clip_norm, clip_eps, clip_value,
centralize, normalize_grad, normalize_eps and nonfinite, plus `scheduler` and its settings
(step_size, gamma, t_max, warmup_steps, ...), which replace the shared flags. lookahead wraps another optimizer
(lookahead:inner=sgd,sync_period=5,momentum=0.9). The optimizers:
""" + textwrap.fill(", ".join(n for n in NAMES if n not in REFUSED), 88, initial_indent="  ",
                    subsequent_indent="  ", break_on_hyphens=False) + """

Writes, under --out: compare.png (loss curves and test accuracy), results.csv and
results.json (the ranking), and one folder per configuration with its metrics.csv,
epochs.csv and summary.json. They are written into a hidden folder beside --out that is
renamed at the end, so --out never holds a partial set. A DP-SGD configuration reports its
ε (at --delta). Ctrl-C (status 130; SIGTERM 143), or a
non-finite gradient in a configuration with nonfinite=raise (one error line naming it, status
1), stops the comparison: the configurations run so far are ranked and written. A signal also
saves each configuration's checkpoint.safetensors (the one under way at once) and prints the
--resume command; --checkpoint-every N saves the one under way every N steps (and each one
when it finishes), and --resume DIR continues the comparison as if it had not stopped.
"""

EXAMPLES = """\
examples:
  mithril compare
  mithril compare --configs "adam:lr=1e-3" "sgd:lr=0.1,momentum=0.9" --epochs 10
  mithril compare --configs "adam:lr=3e-3" "adam:lr=3e-3,scheduler=onecycle" --scheduler none
  mithril compare --configs adam "lion:lr=3e-4" lamb prodigy "schedule-free-adamw" --epochs 10
  mithril compare --data houses.csv --target price --configs adam "sgd:lr=0.05,momentum=0.9"
  mithril compare --checkpoint-every 100 --name sweep
  mithril compare --resume runs/sweep
"""

RESULT_FIELDS = ("rank", "config", "test_acc", "test_loss", "train_acc", "train_loss",
                 "steps", "total_s", "interrupted", "optimizer", "schedule", "folder")
#: the ranking's columns for a regression target (--data): RMSE in the target's units, R²
REGRESSION_FIELDS = ("rank", "config", "test_rmse", "test_r2", "test_loss", "train_rmse",
                     "train_r2", "train_loss", *RESULT_FIELDS[6:])
#: the files compare writes into --out (a --data file of that name would be replaced)
COMPARE_FILES = ("results.csv", "results.json", "compare.png")


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
    g = p.add_argument_group("your own table (instead of the digits)")
    g.add_argument("--data", metavar="FILE", type=in_path,
                   help="FILE.csv, FILE.tsv (tab-separated), FILE.npz, FILE.safetensors or a "
                        "folder of X.npy and y.npy: compare on this table, read and split as "
                        "`mithril train --data` does")
    g.add_argument("--target", metavar="COLUMN", help="the column to predict (--data)")
    g.add_argument("--objective", choices=OBJECTIVES,
                   help="--data: classification or regression (default: inferred from the "
                        "target: strings or at most 20 distinct integers -> classification)")
    add_impute_flag(g)
    g = p.add_argument_group("differential privacy (configurations of dpsgd or "
                             "differentially-private)")
    g.add_argument("--delta", type=open_unit, metavar="DELTA",
                   help=f"the δ of the (ε, δ) reported for each DP-SGD configuration (default "
                        f"{DEFAULT_DELTA:g}); ε: the RDP accountant over the sampling rate "
                        f"batch-size/rows and the steps taken, as `mithril train` reports it")
    add_output_flags(p, "compare")
    add_checkpoint_flags(p)
    p.set_defaults(func=run)
    return p


def parse_config(text: str) -> tuple[str, dict[str, Any]]:
    def scheduler(name: str) -> str:
        return check_name("scheduler", name.lower(), SCHEDULER_NAMES)

    return parse_optimizer_spec(text, run_keys=True, special={"scheduler": scheduler})


#: the longest folder name of a configuration (file systems allow 255 bytes)
SLUG_MAX = 100


def _full_slug(i: int, text: str) -> str:
    return f"{i:02d}-" + re.sub(r"[^A-Za-z0-9.=_-]+", "_", text).strip("_")


def slug(i: int, text: str) -> str:
    """The folder name of configuration ``i``, ``NN-<config>`` in the characters a file name
    may hold; a longer one than :data:`SLUG_MAX` is cut and ends with a hash of the whole
    configuration, so that it stays distinct."""
    name = _full_slug(i, text)
    if len(name) <= SLUG_MAX:
        return name
    digest = hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"{name[:SLUG_MAX - len(digest) - 1].rstrip('_')}-{digest}"


def folder_names(labels: list[str], resume: str | None) -> list[str]:
    """Each configuration's folder (:func:`slug`). Resuming a comparison written before long
    names were cut, a configuration keeps the folder it has there."""
    names = []
    for i, label in enumerate(labels, 1):
        name, old = slug(i, label), _full_slug(i, label)
        if resume and old != name and len(old.encode()) <= 255:
            with contextlib.suppress(OSError):
                name = old if (Path(resume) / old).is_dir() else name
        names.append(name)
    return names


def ranking(labels: list[str], results: list[RunResult], folders: list[str],
            privacy: list[dict[str, Any] | None] | None = None) -> list[dict]:
    """The results, best first: by test accuracy (higher), or for a regression target by
    test RMSE (lower); ties by the test loss; a diverged (NaN) run last. ``privacy``: each
    run's :meth:`Run.privacy` (None: not DP-SGD); a DP-SGD run's row gets its ``epsilon``
    and ``delta``."""
    privacy = privacy or [None] * len(results)
    rows = [{"config": label, **r.final, "steps": len(r.steps), "total_s": r.total_s,
             "interrupted": r.interrupted, "error": r.error, "optimizer": r.optimizer,
             "schedule": r.schedule, "folder": folder,
             **({} if dp is None else {"epsilon": dp["epsilon"], "delta": dp["delta"]})}
            for label, r, folder, dp in zip(labels, results, folders, privacy, strict=True)]
    key, sign = ("test_rmse", 1.0) if results and results[0].metric == "rmse" else \
        ("test_acc", -1.0)

    def order(r: dict) -> tuple[bool, float, float]:
        m, loss = r[key], r["test_loss"]
        return (math.isnan(m), sign * m if not math.isnan(m) else 0.0,
                loss if not math.isnan(loss) else math.inf)

    rows.sort(key=order)
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return rows


def score(final: dict[str, float]) -> str:
    """The test metric of a configuration's line: accuracy, or RMSE and R²."""
    if "test_rmse" in final:
        return f"test RMSE {final['test_rmse']:.4g}, R² {final['test_r2']:.4f}"
    return f"test acc {final['test_acc']:.2%}"


def results_table(rows: list[dict[str, Any]], regression: bool, private: bool) -> str:
    """The ranking as text; ``private``: with an ``ε`` column (δ as given; blank for a
    configuration that is not DP-SGD, ∞ for one without noise)."""
    if regression:
        heads = ["rank", "config", "test RMSE", "test R²", "test loss", "train RMSE",
                 "train loss"]
        cells = [[r["rank"], r["config"], f"{r['test_rmse']:.4g}", f"{r['test_r2']:.4f}",
                  f"{r['test_loss']:.4f}", f"{r['train_rmse']:.4g}", f"{r['train_loss']:.4f}"]
                 for r in rows]
    else:
        heads = ["rank", "config", "test acc", "test loss", "train acc", "train loss"]
        cells = [[r["rank"], r["config"], f"{r['test_acc']:.2%}", f"{r['test_loss']:.4f}",
                  f"{r['train_acc']:.2%}", f"{r['train_loss']:.4f}"] for r in rows]
    if private:
        delta = next(r["delta"] for r in rows if "delta" in r)
        heads.append(f"ε (δ={delta:g})")
        for r, c in zip(rows, cells, strict=True):
            eps = r.get("epsilon")
            c.append("" if "delta" not in r else "n/a" if eps is None else f"{eps:.4g}")
    heads.append("time")
    for r, c in zip(rows, cells, strict=True):
        c.append(f"{r['total_s']:.1f} s")
    return table(heads, cells, align="rl" + "r" * (len(heads) - 2))


def run(args: argparse.Namespace) -> int:
    # (the folders the command creates, --out and missing parents, go again if it fails)
    return run_removing_empty_dirs(compare_command, args)


def table_job(args: argparse.Namespace) -> Any:
    """The :class:`~mithril.cli.tasks.Job` of ``--data`` (read and checked as ``mithril train
    --data`` does), or None for the digits (``--target``/``--objective`` without ``--data``
    are a mistake)."""
    if args.data is None:
        given = [f for f, v in (("--target", args.target), ("--objective", args.objective),
                                ("--impute", args.impute)) if v is not None]
        if given:
            raise CLIError(f"{' and '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} "
                           f"with --data FILE (the digits have their labels)")
        return None
    if not is_table(args.data):
        raise CLIError(f"--data {args.data}: give a .csv, .tsv, .npz or .safetensors file, or "
                       f"a folder of .npy files (a table)")
    if args.target is None and needs_target(args.data):
        raise CLIError(f"--data {args.data}: give --target COLUMN, the column to predict")
    from .tabular import tabular_job

    return tabular_job(args)


def compare_command(args: argparse.Namespace, made: list[Path]) -> int:
    """``mithril compare``; the folders it creates are added to ``made`` before it does."""
    if args.resume:  # the comparison's flags, those given now on top
        args = resumed_args(args)
    flags = snapshot(args)  # (what each configuration's checkpoint keeps for --resume)
    job = table_job(args)
    data: Dataset = load_digits_split(args.test_size, args.split_seed) if job is None else \
        job.data
    runs: list[tuple[str, Run]] = []
    for text in args.configs:
        name, overrides = parse_config(text)
        try:
            cfg = run_config(args, name, overrides)
            if job is not None:
                cfg.task, cfg.task_settings = job.task, job.settings
            runs.append((text, Run(cfg, data, None if job is None else job.spec)))
        except CLIError as exc:
            raise CLIError(f"config {text!r}: {exc}") from None
    out = Path(args.out) if args.out else default_out_dir("compare", args.name)
    clash = [n for n in COMPARE_FILES if job is not None and same_file(out / n, Path(args.data))]
    if clash:  # the comparison would write over the data it trains on
        raise CLIError(f"--out {out} would replace --data {args.data} (the comparison writes "
                       f"its {clash[0]} there); give another --out, or rename the data file")
    names = folder_names([label for label, _ in runs], args.resume)
    resumed = []  # the configurations continued from a checkpoint (checked, nothing written)
    for name, (label, r) in zip(names, runs, strict=True):
        if args.resume:
            try:
                if restore_config(r, Path(args.resume) / name):
                    resumed.append(label)
            except CLIError as exc:
                raise CLIError(f"config {label!r}: {exc}") from None
        # a signal saves the one under way at once; --checkpoint-every N, every N steps
        r.saver = functools.partial(save_config, r, out / name, flags)
        r.save_every = args.checkpoint_every
    if not args.dry_run:
        made += new_dirs(out)
        ensure_writable_dir(out)
        theirs = {name: not_ours(out / name) for name in names}  # (the user's: left alone)
    else:
        check_out_dir(out)
    first = runs[0][1]
    what = describe_data(data, first) if job is None else \
        f"{job.describe}; {first.steps_per_epoch} steps per epoch"
    print(f"mithril compare: {len(runs)} configurations, {args.epochs} epochs each, seed "
          f"{args.seed}, {args.backend}; {what}")
    if args.resume:
        print(f"  resumed from {args.resume}: {len(resumed)} configuration(s) from their "
              f"checkpoints ({', '.join(resumed) or 'none'}), the others from the start")
    if args.dry_run:
        for label, r in runs:
            print(f"  {label}: {r.optimizer_repr}; schedule {r.schedule.description}")
        print(f"dry run: would train {len(runs)} x {first.total_steps} steps and write to {out}")
        return 0
    labels: list[str] = []
    results: list[RunResult] = []
    privacy: list[dict[str, Any] | None] = []
    delta = DEFAULT_DELTA if args.delta is None else args.delta
    folders: list[str] = []
    trained: list[tuple[Run, RunResult]] = []
    wrote: dict[str, set[str]] = {}  # each configuration's folder -> the files written there
    interrupted = False
    signum: int | None = None  # the signal that stopped it (exit status 128 + signum)
    error: str | None = None
    with staged_dir(out) as stage:  # the whole set appears at once, or nothing
        for i, (name, (label, r)) in enumerate(zip(names, runs, strict=True), 1):
            print(f"[{i}/{len(runs)}] {label}: {r.optimizer_repr}; "
                  f"schedule {r.schedule.description}")
            res = r.train(progress=False if args.no_progress else None, desc=label)
            if res.error is not None:  # nonfinite=raise: stop as Ctrl-C does
                error = f"config {label!r}: {res.error}"
                if not res.steps:  # not one step: nothing of it to keep
                    print(f"    stopped at its first step: {res.error}")
                    break
            trained.append((r, res))
            if args.checkpoint_every and not (res.interrupted or res.error):  # kept at once
                save_config(r, out / name, flags, res.steps, res.epochs)
            folder = stage / name
            folder.mkdir()
            dp = r.privacy(len(res.steps), delta)  # (None: not DP-SGD)
            files = write_run(res, folder, r.steps_per_epoch, plot=False,
                              extra=None if dp is None else {"privacy": dp})
            if job is not None and job.write is not None:  # what `mithril predict` needs
                files += job.write(r, folder)
            wrote[folder.name] = {f.name for f in files}
            labels.append(label)
            results.append(res)
            folders.append(folder.name)
            privacy.append(dp)
            print(f"    {score(res.final)}, test loss {res.final['test_loss']:.4f} "
                  f"({res.total_s:.1f} s)")
            if dp is not None:
                print(f"    {privacy_line(dp)}")
            if res.interrupted or res.error is not None:
                interrupted, signum = res.interrupted, res.signal
                print(f"{'interrupted' if interrupted else 'stopped on an error'}: ranking "
                      f"the configurations run so far")
                break
        if not results:  # the first configuration failed at once: write nothing
            raise TrainingError(error)
        if wants_checkpoints(args) or signum is not None:  # what --resume continues from
            for (r, res), name in zip(trained, folders, strict=True):
                saved = write_checkpoint(r, stage / name, flags, len(res.steps),
                                         len(res.epochs), fmt=FORMAT)
                if saved is not None:
                    wrote[name].add(saved.name)
        rows = ranking(labels, results, folders, privacy)
        regression = results[0].metric == "rmse"
        private = any(dp is not None for dp in privacy)  # an ε column (empty: not DP-SGD)
        fields = REGRESSION_FIELDS if regression else RESULT_FIELDS
        if private:
            fields = fields[:fields.index("steps")] + ("epsilon", "delta") + \
                fields[fields.index("steps"):]
        task = {"task": "digits"} if job is None else \
            {"task": job.task, "task_settings": job.settings}
        written = [write_csv(stage / "results.csv", rows, fields),
                   write_json(stage / "results.json",
                              {**task, "epochs": args.epochs,
                               "batch_size": args.batch_size, "seed": args.seed,
                               "backend": args.backend, "results": rows})]
        if not args.no_plot:
            model = "digits MLP " + str(list(args.hidden)) if job is None else \
                first.spec.description
            title = (f"{model} · {args.backend} · {args.epochs} epochs "
                     f"× {first.steps_per_epoch} steps · seed {args.seed}")
            written.append(compare_figure(results, labels, stage / "compare.png",
                                          first.steps_per_epoch, title))
    for name, kept in wrote.items():  # a folder of an earlier comparison: no file of it stays
        for old in set(RUN_FILES) - kept - theirs[name]:
            with contextlib.suppress(OSError):
                if (out / name / old).is_file():
                    (out / name / old).unlink()
    files = [out / f.name for f in written]
    print()
    print(results_table(rows, regression, private))
    print(f"wrote {', '.join(str(f) for f in files)}")
    if error is not None:
        raise TrainingError(f"{error}; the configurations run so far are written to {out}")
    if signum is not None:
        print(f"resume with: mithril compare --resume {shlex.quote(str(out))}")
    return exit_status(signum) if interrupted else 0
