"""What a run of :mod:`.training` is made of besides the loop: its configuration
(:class:`RunConfig`), its result (:class:`RunResult`), the shuffled batches of a table, the
backend and the optimizer's short label."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import mithril as ml

from .errors import CLIError
from .networks import mlp_spec
from .optimizer_catalog import WRAPPERS, inner_name, optimizer_keys

__all__ = ["BACKENDS", "MAX_TOTAL_STEPS", "MIXED_PRECISION", "RunConfig", "RunResult",
           "ShuffledRows", "build_model", "correct", "make_backend", "optimizer_label"]

BACKENDS = ("numpy", "jax", "torch")
MIXED_PRECISION = {"none": None, "fp16": "float16", "bf16": "bfloat16"}
#: the longest run (optimizer steps): its schedule is checked step by step up front, and
#: metrics.csv gets one row per step
MAX_TOTAL_STEPS = 2_000_000


@dataclass
class RunConfig:
    """Everything that defines a run besides the data."""

    optimizer: str = "adam"
    #: option name -> value for the options given (see :mod:`.options`)
    settings: dict[str, Any] = field(default_factory=dict)
    #: (scheduler name, its own settings); several make a sequence
    schedulers: list[tuple[str, dict[str, Any]]] = field(default_factory=lambda: [("cosine", {})])
    backend: str = "numpy"
    dtype: str = "float32"
    mixed_precision: str = "none"
    loss_scale: float = 2.0**16
    epochs: int = 20
    batch_size: int = 64
    seed: int = 0
    hidden: tuple[int, ...] = (128, 64)
    activation: str = "relu"
    #: BLAS/OpenMP threads while training: the matrices are small, and on a shared 2-core
    #: machine a second BLAS thread that has to wait for a core makes each step ~10x slower
    threads: int = 1
    #: regex of the parameter names that get no weight decay (``--no-decay-on``)
    no_decay_on: str | None = None
    #: decay of an EMA of the weights, evaluated beside them (``--ema``); None: no EMA
    ema: float | None = None
    #: the optimizer step the EMA starts at (``--ema-start``; ``ema_start=``)
    ema_start: int = 1
    #: ``(base, max)`` momentum cycled by the one-cycle schedule (``--momentum-cycle``)
    momentum_cycle: tuple[float, float] | None = None
    #: the job (``--task``: digits, digits-cnn, tabular, charlm) and its own settings
    task: str = "digits"
    task_settings: dict[str, Any] = field(default_factory=dict)
    #: the settings given in an ``--optimizer`` / ``--configs`` spec (errors name them as its
    #: keys, not as flags); not part of the run's identity
    spec_keys: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"task": self.task, **({"task_settings": dict(self.task_settings)}
                                      if self.task_settings else {}),
                "optimizer": self.optimizer, "settings": dict(self.settings),
                "schedulers": [[n, dict(s)] for n, s in self.schedulers],
                "backend": self.backend, "dtype": self.dtype,
                "mixed_precision": self.mixed_precision, "loss_scale": self.loss_scale,
                "epochs": self.epochs, "batch_size": self.batch_size, "seed": self.seed,
                "hidden": list(self.hidden), "activation": self.activation,
                "threads": self.threads, "no_decay_on": self.no_decay_on, "ema": self.ema,
                "ema_start": self.ema_start,
                "momentum_cycle": None if self.momentum_cycle is None else
                {"base_momentum": self.momentum_cycle[0],
                 "max_momentum": self.momentum_cycle[1]}}


@dataclass
class RunResult:
    config: RunConfig
    steps: list[dict[str, Any]]
    epochs: list[dict[str, Any]]
    final: dict[str, float]
    total_s: float
    interrupted: bool
    optimizer: str  #: repr of the optimizer as built (every hyperparameter)
    label: str  #: short form: name, learning rate and the options that were set
    schedule: str
    #: the hyperparameter ``--momentum-cycle`` drives (``momentum`` or ``beta1``), or None
    momentum: str | None = None
    #: the per-batch metric of metrics.csv and the plot: ``acc`` or (regression) ``rmse``
    metric: str = "acc"
    #: what was trained, for the plot's title
    model: str = "digits MLP"
    #: why training stopped early with an error (a non-finite gradient with
    #: ``--nonfinite raise``: the step, the epoch, the parameters), or None
    error: str | None = None
    #: the signal that stopped it (``signal.SIGINT``: Ctrl-C, ``signal.SIGTERM``), or None
    signal: int | None = None


def build_model(hidden: Sequence[int], num_classes: int, activation: str = "relu") -> ml.Model:
    """MLP ``input -> hidden... -> logits`` and a cross-entropy ``loss`` against integer
    ``target`` labels."""
    return mlp_spec(1, num_classes, hidden, activation).model


def correct(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Whether each prediction is the label; one with an inf/NaN logit is wrong (argmax would
    take a NaN for the first class: a diverged model scoring the share of class 0)."""
    return (np.argmax(logits, axis=-1) == y) & np.isfinite(logits).all(axis=-1)


def r_squared(sse: float, sst: float) -> float:
    """R² = 1 − SSE/SST, as ``sklearn.metrics.r2_score`` (``force_finite=True``): for a
    constant target (SST = 0) 1.0 if every prediction is exact, else 0.0 (not NaN)."""
    if sst > 0:
        return 1 - sse / sst
    return 1.0 if sse == 0 else 0.0 if sse == sse else float("nan")


class ShuffledRows:
    """The batches of an epoch: the training rows in a new random order, ``batch_size`` at a
    time (the last batch may be smaller)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size
        self.rows = len(y)

    def steps(self, epoch: int) -> int:
        return math.ceil(self.rows / self.batch_size)

    def __call__(self, epoch: int, rng: np.random.Generator
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        order = rng.permutation(self.rows)
        for i in range(0, self.rows, self.batch_size):
            idx = order[i:i + self.batch_size]
            yield self.x[idx], self.y[idx]


def make_backend(name: str, dtype: str, seed: int) -> Any:
    try:
        from .. import backends

        cls = {"numpy": "NumpyBackend", "jax": "JaxBackend", "torch": "TorchBackend"}[name]
        return getattr(backends, cls)(dtype=dtype, seed=seed)
    except KeyError:
        raise CLIError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}") from None
    except ImportError as exc:
        raise CLIError(f"the {name} backend needs {exc.name or name}: "
                       f"pip install 'mithril[{name}]'") from None


def optimizer_label(name: str, optimizer: Any, settings: dict[str, Any]) -> str:
    """e.g. ``sgd(lr=0.1, momentum=0.9, nesterov)``: the learning rate and what was set."""
    parts = [f"lr={optimizer.get_learning_rate():g}"]
    if name in WRAPPERS:
        parts.insert(0, f"{WRAPPERS[name]}={inner_name(name, settings)}")
    for key in optimizer_keys(name, settings):
        value = settings.get(key)
        if key == "lr" or value is None:
            continue
        parts.append(key if value is True else f"{key}={value:g}" if isinstance(value, float)
                     else f"{key}={value}")
    return f"{name}({', '.join(parts)})"

