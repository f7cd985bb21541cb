"""``mithril train``: train a model (the digits MLP, a CNN, a character model, or an MLP on the
user's table; see :mod:`.tasks`) and write metrics and a plot."""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

from ..distributed.process_group import PeerError
from ..utils.optimizers.averaging import MAX_EVERY
from .argtypes import bounded_int, positive_float, regex, unit_interval
from .common import (
    HelpFormatter,
    add_common_optimizer_flags,
    add_output_flags,
    add_schedule_flags,
    add_task_flags,
    run_config,
)
from .data import Dataset
from .errors import CLIError, TrainingError
from .optimizer_catalog import (
    NAMES,
    PER_EXAMPLE,
    REFUSED,
    check_data_parallel,
    parse_optimizer_spec,
)
from .options import OPTIMIZER_OPTIONS, add_options
from .parallel import (
    Parallel,
    World,
    add_parallel_flags,
    check,
    describe,
    join,
    launch,
    leave,
    one_process_mesh,
    world_of,
)
from .plots import training_figure
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
from .resume import (
    CHECKPOINT_FILE,
    FORMAT,
    add_resume_flags,
    check_noise,
    restore,
    resumed_args,
    snapshot,
    write_checkpoint,
)
from .runtime import exit_status
from .tasks import add_job_flags, prepare
from .training import Run, RunResult

STEP_FIELDS = ("step", "epoch", "loss", "acc", "lr", "grad_norm", "skipped")
EPOCH_FIELDS = ("epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc",
                "batch_loss", "batch_acc", "lr", "time_s")
#: epochs.csv columns added by --ema: the same metrics with the EMA of the weights
EMA_FIELDS = ("train_loss_ema", "train_acc_ema", "test_loss_ema", "test_acc_ema")


def step_fields(result: RunResult) -> tuple[str, ...]:
    """metrics.csv's columns: ``acc`` is ``rmse`` for regression."""
    return tuple(result.metric if f == "acc" else f for f in STEP_FIELDS)


def epoch_fields(result: RunResult) -> tuple[str, ...]:
    """epochs.csv's columns: the measured metrics (``final``'s keys, EMA ones included) after
    ``epoch, step``, then ``batch_loss``, ``batch_acc`` (or ``batch_rmse``), ``lr``,
    ``time_s``."""
    measured = tuple(k for k in result.final)
    return ("epoch", "step", *measured, "batch_loss", f"batch_{result.metric}", "lr", "time_s")

DESCRIPTION = """\
Train a model and write its metrics. The job is one of
  --task digits       an MLP classifier on scikit-learn's digits (8x8 images, 10 classes;
                      standardised, with a fixed stratified train/test split); the default
  --task digits-cnn   a small CNN (conv, BatchNorm, relu, max-pool; twice) on the same digits
  --data FILE.csv --target COLUMN  (or FILE.tsv, tab-separated; or FILE.npz, FILE.safetensors
                      or a folder of .npy files, with X and y)
                      an MLP on your table: classification or regression (--objective),
                      standardised features, a seeded split; `mithril predict` uses the run
  --task charlm       a GPT-style character model on pydoc_data.topics (or --data FILE.txt),
                      AdamW with warm-up and cosine decay; held-out bits per character and a
                      sampled paragraph
and write, under --out:

  metrics.csv   one row per optimizer step: step, epoch, loss, acc (regression: rmse), lr,
                grad_norm, skipped
                (with --momentum-cycle also momentum: the momentum or beta1 of the step)
  epochs.csv    one row per epoch: train/test loss and accuracy (and with --ema the same
                for the EMA weights: *_ema), lr, seconds (--momentum-cycle: momentum)
  summary.json  the configuration, final metrics and timings
  training.png  loss, accuracy, learning rate and gradient norm against the step

Ctrl-C or SIGTERM stops training after the step under way, saves checkpoint.safetensors at
once, still writes everything measured so far and prints the --resume command (exit status
128 + signal: 130 Ctrl-C, 143 SIGTERM; a second signal aborts at once); so
does a non-finite gradient with --nonfinite raise, which then ends with one error line naming
the step and the parameters, exit status 1 (and nothing is written if it was the first step).
The
files are written into a hidden folder beside --out that is renamed at the end, so the folder
never holds a partial set (a second Ctrl-C while writing leaves it as it was). With
--checkpoint the folder also gets checkpoint.safetensors (--checkpoint-every N: every N
steps too), and --resume DIR continues the run.
"""

EXAMPLES = """\
examples:
  mithril train
  mithril train --optimizer sgd --lr 0.1 --momentum 0.9 --nesterov --scheduler step
  mithril train --backend torch --optimizer adamw --weight-decay 0.05 --warmup-steps 50
  mithril train --scheduler onecycle --max-lr 0.01 --epochs 10 --out runs/onecycle
  mithril train --optimizer adamw --weight-decay 0.05 --no-decay-on bias --ema 0.99
  mithril train --ema 0.999 --ema-start 200
  mithril train --optimizer sgd --lr 0.05 --momentum 0.9 --momentum-cycle --max-lr 0.2
  mithril train --optimizer "lion:beta1=0.95,beta2=0.98" --lr 3e-4
  mithril train --optimizer "lookahead:inner=sgd,sync_period=5" --lr 0.1 --momentum 0.9
  mithril train --optimizer prodigy --scheduler none
  mithril train --task digits-cnn
  mithril train --data houses.csv --target price --name houses
  mithril predict --run runs/houses --data new-houses.csv
  mithril train --data houses.tsv --target price --scheduler plateau --checkpoint --name houses
  mithril train --resume runs/houses --epochs 100
  mithril train --task charlm --backend jax --steps 1500
"""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train a model (digits MLP or CNN, your table, a character "
                                     "model) and plot the metrics",
                       description=DESCRIPTION, epilog=EXAMPLES, usage="mithril train [options]",
                       formatter_class=HelpFormatter)
    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", default=None, metavar="NAME[:KEY=VALUE,...]",
                   help="default: adam (charlm: adamw). One of " +
                        ", ".join(n for n in NAMES if n not in REFUSED) + " (not " +
                        ", ".join(REFUSED) + ": a closure). Settings may follow the name, e.g. lion:beta1=0.95,beta2=0.98 "
                        "(the constructor's arguments; learning_rate is lr, epsilon eps); "
                        "lookahead wraps another: lookahead:inner=sgd,sync_period=5")
    add_options(p, "optimizer hyperparameters (unset: the optimizer's default)",
                OPTIMIZER_OPTIONS)
    add_common_optimizer_flags(p)
    g = p.add_argument_group("weight decay and averaging")
    g.add_argument("--no-decay-on", type=regex, metavar="REGEX",
                   help="no weight decay for the parameters whose names this regular "
                        "expression matches (searched in names such as mlp.linear_0.bias), "
                        "e.g. 'bias|norm'; it must match at least one")
    g.add_argument("--ema", type=unit_interval, metavar="DECAY",
                   help="keep an exponential moving average of the weights with this decay "
                        "(in [0, 1), e.g. 0.99) and evaluate it beside them after each epoch")
    g.add_argument("--ema-start", type=bounded_int(1, MAX_EVERY), metavar="STEP",
                   help="with --ema: start the EMA at this optimizer step (its first update "
                        "copies the weights; default 1), e.g. after a warm-up")
    g = p.add_argument_group("differential privacy (optimizer dpsgd or differentially-private)")
    g.add_argument("--delta", type=open_unit, metavar="DELTA",
                   help=f"the δ of the (ε, δ) the run reports at the end (default "
                        f"{DEFAULT_DELTA:g}; keep it below 1/number of training rows). ε comes "
                        f"from the RDP accountant (mithril.utils.privacy_accounting, as Opacus's), "
                        f"the sampling rate batch-size/rows and the steps taken")
    g.add_argument("--target-epsilon", type=positive_float, metavar="EPS",
                   help="set the noise multiplier so that the whole run spends this ε at --delta "
                        "(Opacus's make_private_with_epsilon); noise_multiplier= then must not "
                        "be given")
    add_schedule_flags(p)
    # None: not given (cosine, or onecycle with --momentum-cycle; see resolve_scheduler)
    p.set_defaults(scheduler=None)
    g = p.add_argument_group("momentum cycling (one-cycle)")
    g.add_argument("--momentum-cycle", action="store_true",
                   help="cycle the momentum inversely to the learning rate, as torch's "
                        "OneCycleLR(cycle_momentum=True): from --max-momentum down to "
                        "--base-momentum while the lr rises, back up while it falls. sgd and "
                        "rmsprop cycle --momentum (give one > 0), adam and adamw beta1 (any "
                        "optimizer: its momentum, else its beta1; none is an error). It "
                        "needs the onecycle scheduler: without --scheduler, onecycle replaces "
                        "the default cosine; another --scheduler is an error")
    g.add_argument("--base-momentum", type=unit_interval, metavar="M",
                   help="lowest momentum, at the peak lr (default 0.85; with --momentum-cycle)")
    g.add_argument("--max-momentum", type=unit_interval, metavar="M",
                   help="highest momentum, at the start and end (default 0.95; with "
                        "--momentum-cycle)")
    add_task_flags(p)
    add_job_flags(p)
    # None: not given; each job has its own defaults (see tasks.DEFAULTS)
    p.set_defaults(epochs=None, batch_size=None, test_size=None, hidden=None, activation=None)
    add_parallel_flags(p)
    add_output_flags(p, "train")
    add_resume_flags(p)
    p.set_defaults(func=run)
    return p


def resolve_scheduler(args: argparse.Namespace) -> None:
    """``--scheduler`` when not given: ``onecycle`` with ``--momentum-cycle`` (the schedule
    that cycles the momentum), else the default ``cosine``."""
    if args.scheduler is None:
        args.scheduler = ["onecycle" if getattr(args, "momentum_cycle", False) else "cosine"]


#: every file a run of any job writes: a rerun into the same --out removes those it does not
#: write again (another job's model, the plot of a run before --no-plot), so the folder never
#: mixes two runs
RUN_FILES = ("metrics.csv", "epochs.csv", "summary.json", "training.png", "model.safetensors",
             "preprocess.json", "sample.txt", CHECKPOINT_FILE)


def held_a_run(folder: Path) -> bool:
    """Whether ``folder`` holds an earlier run (of ``train``, or a ``compare``
    configuration's): the summary.json :func:`write_run` writes, or a checkpoint of theirs
    (a run killed between periodic saves has no summary.json)."""
    from ..utils.checkpoint_io import read_metadata
    from .compare_checkpoints import FORMAT as COMPARE_FORMAT

    with contextlib.suppress(OSError, ValueError):
        with open(folder / "summary.json", encoding="utf-8") as f:
            summary = json.load(f)
        if isinstance(summary, dict) and {"config", "final"} <= summary.keys():
            return True
    try:
        extra = json.loads(read_metadata(str(folder / CHECKPOINT_FILE)))["extra"]
    except (OSError, ValueError, KeyError, TypeError):  # none, or not mithril's
        return False
    return isinstance(extra, dict) and extra.get("format") in (FORMAT, COMPARE_FORMAT)


def not_ours(folder: Path) -> set[str]:
    """The names of :data:`RUN_FILES` in ``folder`` that a run there must not remove: all
    those there when it held no earlier run (:func:`held_a_run`: they are the user's), else
    none. Taken before training: a periodic save writes into the folder."""
    if held_a_run(folder):
        return set()
    return {n for n in RUN_FILES if os.path.lexists(folder / n)}


def write_logs(result: RunResult, out: Path) -> list[Path]:
    """metrics.csv and epochs.csv (in that order, each replaced atomically) under ``out``."""
    extra_fields = ("loss_scale",) if result.config.mixed_precision != "none" else ()
    e_fields = epoch_fields(result)  # the EMA's metrics beside the raw ones
    if result.momentum is not None:  # --momentum-cycle: the momentum beside the lr
        extra_fields += ("momentum",)
        e_fields = e_fields[:-1] + ("momentum",) + e_fields[-1:]
    return [write_csv(out / "metrics.csv", result.steps, step_fields(result) + extra_fields),
            write_csv(out / "epochs.csv", result.epochs, e_fields)]


def save_progress(training: Run, out: Path, flags: dict[str, Any],
                  steps: list[dict[str, Any]], epochs: list[dict[str, Any]]) -> None:
    """The checkpoint of a run under way (``--checkpoint-every``; a signal): metrics.csv,
    epochs.csv, then checkpoint.safetensors into ``out``, each replaced atomically. A kill in
    between leaves the previous checkpoint with logs as long or longer (``--resume`` takes
    the rows up to the checkpoint's)."""
    nan = float("nan")
    result = RunResult(training.cfg, steps, epochs, {k: nan for k in training.metric_names()},
                       0.0, False, training.optimizer_repr, training.label,
                       training.schedule.description,
                       None if training.momentum is None else training.momentum.name,
                       training.metric, training.spec.description)
    try:
        write_logs(result, out)
        write_checkpoint(training, out, flags, len(steps), len(epochs))
    except OSError as exc:
        raise TrainingError(f"cannot save the checkpoint into {out} after step {len(steps)} "
                            f"({exc.strerror or exc})") from None


def write_run(result: RunResult, out: Path, steps_per_epoch: int, plot: bool,
              extra: dict[str, Any] | None = None) -> list[Path]:
    """metrics.csv, epochs.csv, summary.json and (``plot``) training.png under ``out``."""
    files = write_logs(result, out)
    times = [e["time_s"] for e in result.epochs]
    summary = {"config": result.config.as_dict(), "optimizer": result.optimizer,
               "label": result.label, "schedule": result.schedule,
               "momentum_hyperparameter": result.momentum, "final": result.final,
               "steps": len(result.steps), "epochs_completed": len(result.epochs),
               "interrupted": result.interrupted, "error": result.error,
               "total_s": result.total_s,
               "epoch_s": times, **(extra or {})}
    files.append(write_json(out / "summary.json", summary))
    if plot and result.steps:
        files.append(training_figure(result, out / "training.png", steps_per_epoch))
    return files


def timing_line(result: RunResult) -> str:
    times = [e["time_s"] for e in result.epochs]
    if not times:
        return f"{len(result.steps)} steps in {result.total_s:.1f} s"
    later = times[1:] or times
    return (f"{len(times)} epochs, {len(result.steps)} steps: {sum(later) / len(later):.2f} s per "
            f"epoch of training (first epoch {times[0]:.2f} s, with compilation); "
            f"{result.total_s:.1f} s in all")


#: the columns of the final table per metric: (header, format)
COLUMNS = {"loss": ("loss", "{:.4f}"), "acc": ("accuracy", "{:.2%}"),
           "bpc": ("bits/char", "{:.3f}"), "rmse": ("RMSE", "{:.4g}"), "r2": ("R²", "{:.4f}")}


def final_table(result: RunResult) -> str:
    f = result.final
    keys = [k for k in COLUMNS if f"test_{k}" in f]
    rows = []
    for suffix, tag in (("", ""), ("_ema", " (EMA)")):
        if f"test_loss{suffix}" in f:
            rows += [[f"{which}{tag}", *(COLUMNS[k][1].format(f[f"{which}_{k}{suffix}"])
                                        for k in keys)] for which in ("train", "test")]
    return table(["", *(COLUMNS[k][0] for k in keys)], rows)


def describe_data(data: Dataset, run: Run) -> str:
    return (f"digits: {len(data.y_train)} train / {len(data.y_test)} test samples, "
            f"{data.num_features} features, {data.num_classes} classes; "
            f"{run.steps_per_epoch} steps per epoch")


def run(args: argparse.Namespace) -> int:
    # (the folders the command creates, --out and missing parents, go again if it fails)
    return run_removing_empty_dirs(train_command, args)


def train_command(args: argparse.Namespace, made: list[Path]) -> int:
    """``mithril train``; the folders it creates are added to ``made`` before it does."""
    resumed = None
    if args.resume:  # the run's flags, those given now on top
        args, resumed = resumed_args(args)
    args.snapshot = snapshot(args)  # as given, before the job's defaults: what --resume takes
    job = prepare(args)  # reads and checks the data and the job's flags first
    resolve_scheduler(args)
    world = world_of(args)  # --nprocs, --shard-state, torchrun's environment
    optimizer, overrides = parse_optimizer_spec(args.optimizer, flag="--optimizer")
    check_privacy_flags(args, optimizer, overrides, world)
    cfg = run_config(args, optimizer, overrides)
    if args.ema_start is not None:  # (common.run_config knows --ema, not this flag)
        if args.ema is None:
            raise CLIError("--ema-start only applies with --ema")
        cfg.ema_start = args.ema_start
    cfg.task, cfg.task_settings = job.task, job.settings
    out = Path(args.out) if args.out else default_out_dir("train", args.name)
    clash = [n for n in RUN_FILES if args.data is not None and same_file(out / n, Path(args.data))]
    if clash:  # the run would write over (or remove) the data it trains on
        raise CLIError(f"--out {out} would replace --data {args.data} (the run writes its "
                       f"{clash[0]} there); give another --out, or rename the data file")
    if world is not None and (not world.member or args.dry_run):  # check, then start them
        if world.engine == "jax":  # --devices N: JAX gets its devices before the run starts it
            check(world, None)
        training = Run(cfg, job.data, job.spec, job.batches)  # validates every setting first
        check(world, training)
        if world.engine != "jax":
            check_data_parallel(training.optimizer, world.shard_state)
    else:
        if world is not None:
            join(world)
        try:
            training = Run(cfg, job.data, job.spec, job.batches,
                           None if world is None else Parallel(world))
        except NotImplementedError as exc:  # (torchrun) what DataParallel cannot shard
            if world is not None:
                leave()
            raise CLIError(f"--shard-state: {exc}") from None
        except BaseException:
            if world is not None:
                leave()
            raise
        if resumed is not None:  # checks everything, loads the state; writes nothing
            training.resumed_line = restore(training, resumed)
    if args.target_epsilon is not None:  # (before the header: it prints the optimizer)
        set_noise_for(training, args.target_epsilon, delta_of(args))
    if resumed is not None:  # DP-SGD: the noise of the steps done
        check_noise(training, resumed)
    if world is None or world.rank == 0:
        if not args.dry_run:
            made += new_dirs(out)
            ensure_writable_dir(out)
        else:
            check_out_dir(out)
        if world is None or world.launcher == "torchrun" or world.size == 1 or not world.member:
            print_header(args, job, cfg, training, world)
    if args.dry_run:
        print(f"dry run: would train {training.total_steps} steps and write to {out}")
        return 0
    if world is not None and not world.member:
        return launch(world, args.argv)
    if world is None:
        return train_and_write(args, job, training, out, None)
    try:
        with contextlib.nullcontext() if world.rank == 0 else \
                contextlib.redirect_stdout(io.StringIO()):
            return train_and_write(args, job, training, out, world)
    except PeerError as exc:
        print(f"mithril train: error: {exc}", file=sys.stderr)
        return 1
    finally:
        leave()


#: the δ of the reported (ε, δ) without --delta
DEFAULT_DELTA = 1e-5


def open_unit(text: str) -> float:
    """A number in (0, 1) (argparse type of ``--delta``)."""
    v = unit_interval(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return v


def delta_of(args: argparse.Namespace) -> float:
    return DEFAULT_DELTA if args.delta is None else args.delta


def check_privacy_flags(args: argparse.Namespace, optimizer: str, overrides: dict[str, Any],
                        world: Any) -> None:
    """--delta and --target-epsilon go with DP-SGD, which trains in one process (JAX's
    --devices included: its step computes each example's gradient on the mesh)."""
    private = optimizer in PER_EXAMPLE
    given = [f for f, v in (("--delta", args.delta), ("--target-epsilon", args.target_epsilon))
             if v is not None]
    if private and args.delta is not None and args.task == "charlm":
        raise CLIError(f"--delta {args.delta:g} does not apply to charlm: its batches are "
                       f"overlapping windows of the text, not rows of a table, so no (ε, δ) "
                       f"is accounted")
    if given and not private:
        raise CLIError(f"{' and '.join(given)} only appl{'y' if len(given) > 1 else 'ies'} "
                       f"with a DP-SGD optimizer "
                       f"({', '.join(PER_EXAMPLE)}), not {optimizer}")
    if private and world is not None and not one_process_mesh(world):
        raise CLIError(f"optimizer {optimizer} (DP-SGD) trains in one process (with "
                       f"--backend jax, --devices N too): the data-parallel runs (--nprocs, "
                       f"torchrun) take one gradient per batch, not each example's")
    if args.target_epsilon is not None and overrides.get("noise_multiplier") is not None:
        raise CLIError("--target-epsilon sets the noise multiplier: give it or "
                       "noise_multiplier=, not both")


def set_noise_for(training: Run, target: float, delta: float) -> None:
    """The noise multiplier that spends ``target`` ε over the whole run (Opacus's search)."""
    from ..utils.privacy_accounting import get_noise_multiplier

    q = training.sample_rate()
    if q is None:
        raise CLIError("--target-epsilon needs batches of table rows (its sampling rate)")
    try:
        sigma = get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=q,
                                     steps=training.total_steps)
    except ImportError as exc:
        raise CLIError(str(exc)) from None
    except ValueError as exc:
        raise CLIError(f"--target-epsilon {target:g}: {exc}") from None
    training.optimizer.noise_multiplier = sigma
    training.optimizer_repr = repr(training.optimizer)


def privacy_line(privacy: dict[str, Any]) -> str:
    """``privacy: ε = 2.31 at δ = 1e-05 (...)``."""
    eps = privacy["epsilon"]
    if eps is None:  # (charlm: overlapping windows at random offsets, no sampling rate)
        return (f"privacy: no ε reported: the batches are not rows of a table (charlm's are "
                f"overlapping windows of the text), so there is no per-example sampling rate "
                f"to account (noise multiplier {privacy['noise_multiplier']:.4g}, "
                f"{privacy['steps']} steps)")
    return (f"privacy: ε = {eps:.4g} at δ = {privacy['delta']:g} (RDP accountant; noise "
            f"multiplier {privacy['noise_multiplier']:.4g}, sampling rate "
            f"{privacy['sample_rate']:.4g}, {privacy['steps']} steps; shuffled batches "
            f"accounted as Poisson-sampled)")


def print_header(args: argparse.Namespace, job: Any, cfg: Any, training: Run,
                 world: World | None) -> None:
    print(f"mithril train: {job.spec.description} on {cfg.backend} "
          f"{cfg.dtype if cfg.mixed_precision == 'none' else cfg.mixed_precision}")
    print(f"  optimizer: {training.optimizer_repr}")
    print(f"  schedule:  {training.schedule.description}")
    if training.no_decay:
        print(f"  no weight decay on: {', '.join(training.no_decay)}")
    if cfg.ema is not None:
        start = f", from step {cfg.ema_start}" if cfg.ema_start != 1 else ""
        print(f"  EMA of the weights: decay {cfg.ema:g}{start}, evaluated after each epoch")
    if training.momentum is not None and cfg.momentum_cycle is not None:
        base, top = cfg.momentum_cycle
        print(f"  momentum cycle: {training.momentum.name} {top:g} → {base:g} → {top:g}, "
              f"inversely to the learning rate (one-cycle)")
    if training.private:
        q = training.sample_rate()
        print(f"  DP-SGD: clip {training.optimizer.l2_norm_clip:g}, noise multiplier "
              f"{training.optimizer.noise_multiplier:.4g}"
              + ("; no ε (batches not of table rows: no sampling rate)" if q is None
                 else f", sampling rate {q:.4g}; ε at δ = {delta_of(args):g} reported at "
                      f"the end"))
    if world is not None:
        print(describe(world, cfg.batch_size))
    print(f"  {job.describe}; {training.steps_per_epoch} steps per epoch, {cfg.epochs} epochs")
    if getattr(training, "resumed_line", None):
        print(training.resumed_line)


def train_and_write(args: argparse.Namespace, job: Any, training: Run, out: Path,
                    world: World | None) -> int:
    """Train, then (rank 0) write the files and print the results."""
    lead = world is None or world.rank == 0
    theirs = not_ours(out)  # (the user's files: left alone)
    if world is None:  # a signal saves a checkpoint at once; --checkpoint-every N, every N
        training.saver = functools.partial(save_progress, training, out, args.snapshot)
        training.save_every = args.checkpoint_every
    result = training.train(progress=False if args.no_progress or not lead else None,
                            desc="train", log=print)
    saving = bool(args.checkpoint or args.checkpoint_every or args.resume or result.signal)
    gather = getattr(training.parallel, "gather", None)
    if saving and gather is not None and (result.steps or result.error is None):
        # (--shard-state, mixed precision: every rank takes part in the final save)
        gather(training)
    if not lead:  # rank 0 reports
        return 1 if result.error else exit_status(result.signal) if result.interrupted \
            else 0
    if result.error is not None and not result.steps:
        raise TrainingError(result.error)  # not one step completed: nothing to write
    extra, text = job.finish(training, result) if job.finish is not None else ({}, "")
    extra = {**extra, **(world.summary() if world is not None else
                         {"nprocs": 1, "shard_state": False, "launcher": None})}
    privacy = training.privacy(len(result.steps), delta_of(args))
    if privacy is not None:
        extra["privacy"] = privacy
    with staged_dir(out) as stage:  # the whole set appears at once, or nothing
        written = write_run(result, stage, training.steps_per_epoch, plot=not args.no_plot,
                            extra=extra)
        if job.write is not None:
            written += job.write(training, stage)
        if saving:
            saved = write_checkpoint(training, stage, args.snapshot, len(result.steps),
                                     len(result.epochs))
            written += [saved] if saved is not None else []
            if saved is None:
                par = training.parallel
                why = par.why_no_checkpoint if par is not None and not par.can_checkpoint \
                    else "interrupted inside a step, where parameters and logs do not agree"
                print(f"(no {CHECKPOINT_FILE}: {why})")
    files = [out / f.name for f in written]
    for name in set(RUN_FILES) - {f.name for f in files} - theirs:
        with contextlib.suppress(OSError):  # absent (the usual case), or a folder: kept
            if (out / name).is_file():
                (out / name).unlink()
    print()
    if result.interrupted or result.error is not None:
        why = "stopped by an error" if not result.interrupted else "interrupted" \
            if result.signal is None else f"stopped by {signal.Signals(result.signal).name}"
        print(f"{why} after {len(result.steps)} of {training.total_steps} steps; "
              f"results so far:")
    if text:
        print(text)
    print(final_table(result))
    if privacy is not None:
        print(privacy_line(privacy))
    print(timing_line(result))
    print(f"wrote {', '.join(str(f) for f in files)}")
    if result.error is not None:
        n = len(result.steps)
        raise TrainingError(f"{result.error}; the {n} step{'s' * (n != 1)} before it "
                            f"{'are' if n != 1 else 'is'} written to {out}")
    if result.signal is not None and training.position is not None and \
            training.position.epoch <= training.cfg.epochs:  # (else: done, nothing to resume)
        print(f"resume with: mithril train --resume {shlex.quote(str(out))}")
    return exit_status(result.signal) if result.interrupted else 0
