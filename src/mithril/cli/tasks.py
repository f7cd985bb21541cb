"""The jobs of ``mithril train``: which data, which model, and the defaults of each.

* ``digits`` (default): the MLP on scikit-learn's digits (64 standardised pixels);
* ``digits-cnn``: a small CNN on the same digits as 1×8×8 images;
* ``tabular`` (chosen by ``--data FILE.csv|.tsv|.npz|.safetensors`` or a folder of ``.npy``
  files): an MLP on the user's table, classification or regression;
* ``charlm``: a GPT-style character model on ``pydoc_data.topics`` or ``--data FILE.txt``.

:func:`prepare` reads and checks the data and every task flag before anything is trained or
written (a bad file is a :class:`~mithril.cli.errors.CLIError`: exit status 2, one line).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .argtypes import bounded_int, in_path, look, unit_interval
from .data import Dataset, load_digits_split
from .errors import CLIError
from .networks import OBJECTIVES, ModelSpec, cnn_spec, mlp_spec

TASKS = ("digits", "digits-cnn", "charlm")
#: the --data suffixes of a table (the tabular job): text tables (.csv, .tsv, .tab) and named
#: arrays (.npz, .safetensors; a folder of .npy files is one too; a lone .npy is refused there
#: with the fix)
TABLE_SUFFIXES = (".csv", ".tsv", ".tab", ".npz", ".safetensors", ".npy")


def is_table(path: str) -> bool:
    """Whether ``--data path`` is a table (the tabular job; see :data:`TABLE_SUFFIXES`)."""
    return Path(path).suffix.lower() in TABLE_SUFFIXES or look(Path.is_dir, path, "--data")


def needs_target(path: str) -> bool:
    """Whether the table ``path`` needs ``--target``: a text table does (arrays have ``y``)."""
    from .table_arrays import holds_arrays

    return not holds_arrays(path) and Path(path).suffix.lower() != ".npy"

#: per job, the value of each flag left unset (flags not listed keep their parser default)
DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"epochs": 20, "batch_size": 64, "test_size": 0.2, "optimizer": "adam",
               "hidden": [128, 64], "activation": "relu"},
    "digits-cnn": {"epochs": 30, "batch_size": 64, "test_size": 0.2, "optimizer": "adam",
                   "lr": 3e-3, "channels": [32, 64], "dropout": 0.25},
    "tabular": {"epochs": 50, "batch_size": 64, "test_size": 0.2, "optimizer": "adam",
                "hidden": [128, 64], "activation": "relu"},
    "charlm": {"batch_size": 32, "test_size": 0.1, "optimizer": "adamw", "lr": 3e-3,
               "weight_decay": 0.1, "clip_norm": 1.0, "steps": 1500, "eval_every": 100,
               "context": 128, "d_model": 128, "layers": 4, "heads": 4, "dropout": 0.0,
               "eval_windows": 128, "sample_chars": 400, "temperature": 0.8},
}

#: digits-cnn: the conv blocks an 8x8 image allows, each halving it (8 -> 4 -> 2 -> 1)
DIGITS_CNN_BLOCKS = 3

#: flags that belong to some jobs only: giving one to another job is an error
OWN_FLAGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "hidden": ("--hidden", ("digits", "tabular")),
    "activation": ("--activation", ("digits", "tabular")),
    "channels": ("--channels", ("digits-cnn",)),
    "no_batchnorm": ("--no-batchnorm", ("digits-cnn",)),
    "dropout": ("--dropout", ("digits-cnn", "charlm")),
    "target": ("--target", ("tabular",)),
    "objective": ("--objective", ("tabular",)),
    "impute": ("--impute", ("tabular",)),
    "steps": ("--steps", ("charlm",)),
    "eval_every": ("--eval-every", ("charlm",)),
    "context": ("--context", ("charlm",)),
    "d_model": ("--d-model", ("charlm",)),
    "layers": ("--layers", ("charlm",)),
    "heads": ("--heads", ("charlm",)),
    "eval_windows": ("--eval-windows", ("charlm",)),
    "sample_chars": ("--sample-chars", ("charlm",)),
    "temperature": ("--temperature", ("charlm",)),
}


def add_job_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("job (--task or --data; defaults depend on the job)")
    g.add_argument("--task", choices=TASKS, default=None,
                   help="digits: an MLP on the digits (default); digits-cnn: a CNN on the "
                        "digits as 8x8 images; charlm: a GPT-style character model on "
                        "pydoc_data.topics (or --data FILE.txt)")
    g.add_argument("--data", metavar="FILE", type=in_path,
                   help="FILE.csv or FILE.tsv (tab-separated; a header row; --target names "
                        "the column to predict), or FILE.npz, FILE.safetensors or a folder of "
                        "X.npy and y.npy (arrays X and y): train on your own table; with --task "
                        "charlm a text file")
    g.add_argument("--target", metavar="COLUMN", help="the CSV column to predict (--data)")
    g.add_argument("--objective", choices=OBJECTIVES,
                   help="--data: classification or regression (default: inferred from the "
                        "target: strings or at most 20 distinct integers -> classification)")
    add_impute_flag(g)
    g.add_argument("--channels", type=bounded_int(1, 1024), nargs="+", metavar="C",
                   help="digits-cnn: output channels of each conv block (default: 32 64; at "
                        "most 3 blocks, each halves the 8x8 image)")
    g.add_argument("--no-batchnorm", action="store_true", default=None,
                   help="digits-cnn: no BatchNorm after the convolutions")
    g.add_argument("--dropout", type=unit_interval, metavar="P",
                   help="digits-cnn: dropout before the linear layer; charlm: after the "
                        "embeddings and inside every transformer block (default: 0.25 for "
                        "digits-cnn, 0 for charlm)")
    g.add_argument("--precision", choices=("fp16", "bf16"),
                   help="the same as --mixed-precision (e.g. --precision bf16)")
    g = p.add_argument_group("charlm (GPT-style character model)")
    g.add_argument("--steps", type=bounded_int(1, 10**7), help="optimizer steps (default: 1500)")
    g.add_argument("--eval-every", type=bounded_int(1, 10**7), metavar="N",
                   help="measure held-out bits per character every N steps (default: 100)")
    g.add_argument("--context", type=bounded_int(2, 4096), help="characters per window (128)")
    g.add_argument("--d-model", type=bounded_int(1, 4096), help="width (default: 128)")
    g.add_argument("--layers", type=bounded_int(1, 64), help="transformer blocks (default: 4)")
    g.add_argument("--heads", type=bounded_int(1, 64), help="attention heads (default: 4)")
    g.add_argument("--eval-windows", type=bounded_int(1, 10**6), metavar="N",
                   help="windows of the held-out (and training) text measured (default: 128)")
    g.add_argument("--sample-chars", type=bounded_int(0, 100_000), metavar="N",
                   help="length of the paragraph sampled at the end (default: 400; 0: none)")
    g.add_argument("--temperature", type=_positive, help="sampling temperature (default: 0.8)")


def add_impute_flag(g: Any) -> None:
    """``--impute mean`` (train and compare ``--data``)."""
    g.add_argument("--impute", choices=("mean",),
                   help="--data: fill a missing feature cell (empty, NA, NaN, ...) with its "
                        "feature's mean over the training rows, as scikit-learn's "
                        "SimpleImputer(strategy='mean'), and predict fills it the same way "
                        "(default: a missing cell is an error)")


def _positive(text: str) -> float:
    from .argtypes import positive_float

    return positive_float(text)


@dataclass
class Job:
    """The data, the model and what the job writes besides the common files."""

    task: str
    data: Dataset
    spec: ModelSpec
    #: one line describing the data
    describe: str
    #: the job's own settings, recorded in summary.json under config.task_settings
    settings: dict[str, Any] = field(default_factory=dict)
    #: the batch source (None: shuffled rows of the training set)
    batches: Any = None
    #: after training: (run, result) -> (fields added to summary.json, text to print)
    finish: Callable[[Any, Any], tuple[dict[str, Any], str]] | None = None
    #: writes the job's own files into the (staged) output folder: (run, folder) -> paths
    write: Callable[[Any, Path], list[Path]] | None = None


def job_name(args: argparse.Namespace) -> str:
    if args.data is not None and args.task != "charlm" and is_table(args.data):
        if args.task is not None:  # digits or digits-cnn: not "give a .csv" for a .csv
            raise CLIError(f"--task {args.task} trains on the digits; leave --task out to "
                           f"train on --data {args.data}")
        return "tabular"
    if args.data is not None and args.task != "charlm":
        raise CLIError(f"--data {args.data}: give a .csv, .tsv, .npz or .safetensors file, or a "
                       f"folder of .npy files (a table), or a text file with --task charlm")
    return args.task or "digits"


def resolve_defaults(args: argparse.Namespace, task: str) -> None:
    """Fill the flags left unset with the job's defaults; refuse flags of other jobs."""
    for name, (flag, tasks) in OWN_FLAGS.items():
        if getattr(args, name, None) is not None and task not in tasks:
            raise CLIError(f"{flag} does not apply to the {task} job (only to "
                           f"{', '.join(tasks)})")
    if getattr(args, "precision", None) is not None:
        if args.mixed_precision not in ("none", args.precision):
            raise CLIError(f"--precision {args.precision} and --mixed-precision "
                           f"{args.mixed_precision} disagree; give one")
        args.mixed_precision = args.precision
    if task == "charlm" and args.sample_chars == 0 and args.temperature is not None:
        raise CLIError(f"--temperature {args.temperature:g} only applies to the sample: it "
                       f"does nothing with --sample-chars 0")
    if task == "charlm" and args.epochs is not None:
        raise CLIError("--epochs does not apply to charlm: its budget is --steps (measured "
                       "every --eval-every steps)")
    for name, value in DEFAULTS[task].items():
        if getattr(args, name, None) is None and not _not_taken(args, name) and \
                not _not_its_optimizer(args, task, name):
            setattr(args, name, value)
    if task == "charlm" and args.warmup_steps is None:
        # none before one-cycle, which warms up itself: the rate would climb to --lr, drop to
        # one-cycle's start (--lr / --div-factor) and climb again
        first = (args.scheduler or ["onecycle" if getattr(args, "momentum_cycle", False)
                                    else "cosine"])[0]
        args.warmup_steps = 0 if first.partition(":")[0].strip().lower() == "onecycle" \
            else min(100, args.steps // 10)
    if task == "tabular" and args.target is None and needs_target(args.data):
        raise CLIError(f"--data {args.data}: give --target COLUMN, the column to predict")


#: a job's defaults that belong to its optimizer (charlm's AdamW 3e-3 with decoupled decay
#: 0.1, digits-cnn's Adam 3e-3): another optimizer takes its own (sgd 0.05, prodigy's
#: multiplier 1, ...), not a rate tuned for Adam
OPTIMIZER_DEFAULTS = ("lr", "weight_decay")


def _not_its_optimizer(args: argparse.Namespace, task: str, name: str) -> bool:
    """Whether ``name`` is one of :data:`OPTIMIZER_DEFAULTS` and ``--optimizer`` is not the
    job's default optimizer."""
    if name not in OPTIMIZER_DEFAULTS or "optimizer" not in DEFAULTS[task]:
        return False
    chosen = str(getattr(args, "optimizer", None) or "").partition(":")[0]
    return chosen.strip().lower().replace("_", "-") != DEFAULTS[task]["optimizer"]


def _not_taken(args: argparse.Namespace, name: str) -> bool:
    """Whether the job's default ``name`` is a setting the chosen optimizer refuses: DP-SGD
    clips each example's gradient itself and its SGD is its own, so charlm's --clip-norm and
    --weight-decay would be errors naming flags not given, with no way to unset them."""
    optimizer = str(getattr(args, "optimizer", None) or "").partition(":")[0]
    return name in ("clip_norm", "weight_decay") and \
        optimizer.strip().lower().replace("_", "-") == "dpsgd"


def prepare(args: argparse.Namespace) -> Job:
    """The job the flags ask for, its data read and checked (nothing is trained or written)."""
    task = job_name(args)
    resolve_defaults(args, task)
    if task == "digits":
        data = load_digits_split(args.test_size, args.split_seed)
        spec = mlp_spec(data.num_features, data.num_classes, args.hidden, args.activation,
                        what="digits MLP")
        return Job(task, data, spec, _rows("digits", data))
    if task == "digits-cnn":
        if len(args.channels) > DIGITS_CNN_BLOCKS:  # (else a shape error inside the model)
            raise CLIError(f"--channels {' '.join(map(str, args.channels))}: the 8x8 digits "
                           f"allow at most {DIGITS_CNN_BLOCKS} conv blocks (each halves the "
                           f"image), got {len(args.channels)}")
        flat = load_digits_split(args.test_size, args.split_seed)
        data = Dataset(flat.x_train.reshape(-1, 1, 8, 8), flat.y_train,
                       flat.x_test.reshape(-1, 1, 8, 8), flat.y_test, flat.num_classes)
        spec = cnn_spec((1, 8, 8), data.num_classes, args.channels,
                        batchnorm=not args.no_batchnorm, dropout=args.dropout)
        return Job(task, data, spec, _rows("digits as 1×8×8 images", data),
                   {"channels": list(args.channels), "batchnorm": not args.no_batchnorm,
                    "dropout": args.dropout})
    if task == "tabular":
        from .tabular import tabular_job

        return tabular_job(args)
    from .charlm import charlm_job

    return charlm_job(args)


def _rows(what: str, data: Dataset) -> str:
    return (f"{what}: {len(data.y_train)} train / {len(data.y_test)} test samples, "
            f"{data.num_classes} classes")


def steps_in(total: int, per_epoch: int) -> list[int]:
    """``total`` steps cut into epochs of ``per_epoch`` (the last may be shorter)."""
    n = math.ceil(total / per_epoch)
    return [min(per_epoch, total - i * per_epoch) for i in range(n)]


def params_count(params: dict[str, Any]) -> int:
    return int(sum(np.prod(tuple(p.shape)) for p in params.values()))
