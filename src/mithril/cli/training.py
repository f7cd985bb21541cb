"""One training run of an MLP classifier, shared by ``mithril train`` and ``mithril compare``.

A :class:`Run` is built (and every setting validated) before anything slow
happens; :meth:`Run.train` then loops over epochs and batches. Ctrl-C inside the loop ends it
early: the result is marked ``interrupted`` and keeps everything measured so far. A
non-finite gradient with ``nonfinite="raise"`` ends it the same way, the result's ``error``
naming the step, the epoch and the parameters (the commands then exit with an error).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import mithril as ml

from ..utils.optimizers import global_norm
from ..utils.training import make_train_step
from .data import Dataset
from .errors import CLIError, TrainingError
from .networks import ModelSpec, mlp_spec
from .optimizer_catalog import WRAPPERS, build_optimizer, inner_name, optimizer_keys
from .options import Schedule, build_schedule
from .runtime import HeldInterrupt, NoBar, Position, thread_limit

__all__ = ["BACKENDS", "MIXED_PRECISION", "Run", "RunConfig", "RunResult", "thread_limit"]

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


def build_model(hidden: Sequence[int], num_classes: int, activation: str = "relu") -> ml.Model:
    """MLP ``input -> hidden... -> logits`` and a cross-entropy ``loss`` against integer
    ``target`` labels."""
    return mlp_spec(1, num_classes, hidden, activation).model


def correct(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Whether each prediction is the label; one with an inf/NaN logit is wrong (argmax would
    take a NaN for the first class: a diverged model scoring the share of class 0)."""
    return (np.argmax(logits, axis=-1) == y) & np.isfinite(logits).all(axis=-1)


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


class Run:
    """A compiled model, its parameters, optimizer and schedule, ready to train."""

    def __init__(self, cfg: RunConfig, data: Dataset, spec: ModelSpec | None = None,
                 batches: Any = None, parallel: Any = None) -> None:
        """``spec``: the model (default: the MLP of ``cfg.hidden`` on ``data``);
        ``batches``: the batch source, with ``steps(epoch)`` and ``(epoch, rng) -> iterator of
        (x, y)`` (default: :class:`ShuffledRows` of the training set); ``parallel``: a
        :class:`~mithril.cli.parallel.Parallel` to train data-parallel over processes."""
        self.cfg, self.data = cfg, data
        self.parallel = parallel
        if spec is None and (not cfg.hidden or any(h < 1 for h in cfg.hidden)):
            raise CLIError(f"--hidden needs positive layer sizes, got {list(cfg.hidden)}")
        if spec is None:
            spec = mlp_spec(data.num_features, data.num_classes, cfg.hidden, cfg.activation)
        self.spec = spec
        if cfg.epochs < 1 or cfg.batch_size < 1:
            raise CLIError(f"--epochs and --batch-size must be >= 1, got {cfg.epochs} and "
                           f"{cfg.batch_size}")
        if cfg.mixed_precision not in MIXED_PRECISION:
            raise CLIError(f"unknown --mixed-precision {cfg.mixed_precision!r}; choose from "
                           f"{', '.join(MIXED_PRECISION)}")
        self.batches = batches or ShuffledRows(data.x_train, data.y_train, cfg.batch_size)
        self.steps_per_epoch = self.batches.steps(1)
        self.total_steps = sum(self.batches.steps(e) for e in range(1, cfg.epochs + 1))
        if self.total_steps > MAX_TOTAL_STEPS:
            raise CLIError(f"--epochs {cfg.epochs} x {self.steps_per_epoch} steps per epoch "
                           f"(--batch-size {cfg.batch_size}) is {self.total_steps:,} steps; at "
                           f"most {MAX_TOTAL_STEPS:,}: fewer epochs or larger batches")
        # cheap validation first: optimizer and schedule (their ValueErrors become CLIErrors)
        extra: dict[str, Any] = {}
        if cfg.no_decay_on is not None:
            try:
                re.compile(cfg.no_decay_on)
            except re.error as exc:
                raise CLIError(f"--no-decay-on {cfg.no_decay_on!r} is not a valid regular "
                               f"expression ({exc})") from None
            extra["exclude_weight_decay"] = [cfg.no_decay_on]
        if cfg.ema is not None:
            if not (math.isfinite(cfg.ema) and 0 <= cfg.ema < 1):
                raise CLIError(f"--ema must be in [0, 1), got {cfg.ema}")
            extra["ema_decay"], extra["ema_start"] = cfg.ema, cfg.ema_start
        self.optimizer = build_optimizer(cfg.optimizer, cfg.settings, extra)
        #: DP-SGD: the step computes each example's gradient (make_train_step)
        self.private = bool(getattr(self.optimizer, "takes_per_example_gradients", False))
        if self.private and parallel is not None:
            raise CLIError(f"optimizer {cfg.optimizer} (DP-SGD) trains in one process: the "
                           f"data-parallel runs (--nprocs, --devices, torchrun) take one "
                           f"gradient per batch, not each example's")
        if self.private and cfg.mixed_precision != "none":
            raise CLIError(f"--mixed-precision does not apply to optimizer {cfg.optimizer} "
                           f"(DP-SGD): train it in float32 or float64")
        self.optimizer_repr = repr(self.optimizer)  # before a schedule changes its lr
        self.label = optimizer_label(cfg.optimizer, self.optimizer, cfg.settings)
        #: what --momentum-cycle drives: a handle on the optimizer's momentum or beta1
        self.momentum = self._momentum_handle()
        self.schedule: Schedule = build_schedule(self.optimizer, cfg.schedulers, cfg.settings,
                                                 self.total_steps, cfg.momentum_cycle)
        dtype = MIXED_PRECISION[cfg.mixed_precision] or cfg.dtype
        self.backend = be = make_backend(cfg.backend, dtype, cfg.seed)
        self.compiled = ml.compile(spec.model, be, shapes=spec.shapes)
        self.params = self.compiled.get_parameters()
        #: BatchNorm's running statistics (None: the model keeps no state)
        self.model_state = dict(self.compiled.initial_state_dict) \
            if self.compiled.program.state_shapes else None
        if self.model_state is not None and cfg.mixed_precision != "none":
            raise CLIError("--mixed-precision does not keep model state (BatchNorm's running "
                           "statistics): train this model without it (e.g. --no-batchnorm)")
        #: the parameters --no-decay-on exempts from weight decay
        self.no_decay: list[str] = []
        if cfg.no_decay_on is not None:
            rx = re.compile(cfg.no_decay_on)
            self.no_decay = [n for n in self.params if rx.search(n)]
            if not self.no_decay:
                raise CLIError(f"--no-decay-on {cfg.no_decay_on!r} matches no parameter (they "
                               f"are {', '.join(self.params)})")
        if parallel is not None:  # DataParallel's state; each step on this rank's rows
            self.trainer = None
            self.state = parallel.init(self)
        elif cfg.mixed_precision == "none":
            self.trainer = None
            self.state = self.optimizer.init(self.params)
            try:
                self.train_step = make_train_step(self.compiled, self.optimizer, loss="loss")
            except TypeError as exc:  # (DP-SGD and a model with Dropout or BatchNorm)
                if not self.private:
                    raise
                raise CLIError(f"optimizer {cfg.optimizer} (DP-SGD) clips each example's "
                               f"gradient, which BatchNorm (batch statistics) and Dropout "
                               f"(random masks) mix between examples: {spec.description} has "
                               f"them. Train a model without them (digits-cnn: --no-batchnorm "
                               f"--dropout 0) [{exc}]") from None
        else:  # the trainer initialises the state on its float32 master weights
            self.trainer = self._mixed_precision_trainer()
            self.state = self.trainer.optimizer_state
        self.sets = {"train": (data.x_train, data.y_train), "test": (data.x_test, data.y_test)}
        self.metric = "acc" if spec.objective == "classification" else "rmse"
        #: where the loop stands after the last step logged (what a checkpoint saves); None
        #: before training, or while a step runs (an interrupt there leaves no clean point)
        self.position: Position | None = None
        #: ``--resume``: the position and the logs (steps, epochs) to continue from
        self.start: tuple[Position, list[dict[str, Any]], list[dict[str, Any]]] | None = None

    def sample_rate(self) -> float | None:
        """DP-SGD's sampling rate ``q``: the batch size over the training rows (shuffled
        batches, accounted as Poisson sampling at that rate, as Opacus does without
        ``poisson_sampling``); None where the batches are not rows of a table."""
        rows = getattr(self.batches, "rows", None)
        return min(1.0, self.cfg.batch_size / rows) if isinstance(self.batches, ShuffledRows) \
            and rows else None

    def privacy(self, steps: int, delta: float) -> dict[str, Any] | None:
        """The ``(ε, δ)`` of ``steps`` DP-SGD steps (:mod:`mithril.utils.privacy_accounting`,
        the RDP accountant), with what it was computed from; None without DP-SGD."""
        if not self.private:
            return None
        from ..utils.privacy_accounting import get_epsilon

        q = self.sample_rate()
        sigma = float(self.optimizer.noise_multiplier)
        out: dict[str, Any] = {"delta": delta, "noise_multiplier": sigma, "sample_rate": q,
                               "steps": steps, "accountant": "rdp",
                               "l2_norm_clip": float(self.optimizer.l2_norm_clip)}
        try:
            out["epsilon"] = None if q is None else get_epsilon(sigma, q, steps, delta)
        except ImportError as exc:
            raise CLIError(str(exc)) from None
        return out

    def _momentum_handle(self) -> Any:
        """The optimizer's ``momentum`` (sgd, rmsprop) or ``beta1`` (adam, adamw) handle that
        ``--momentum-cycle`` drives (torch's rule), after checking that it can; None without
        the flag."""
        cycle = self.cfg.momentum_cycle
        if cycle is None:
            return None
        name = self.cfg.optimizer
        hp = self.optimizer.flat_hyperparameters()  # a wrapper's: its inner's too
        which = "momentum" if "momentum" in hp else "beta1" if "beta1" in hp else None
        if which is None:
            raise CLIError(f"--momentum-cycle: optimizer {name} has no momentum or beta1 to cycle "
                           f"(sgd and rmsprop cycle --momentum, adam and adamw beta1; "
                           f"any optimizer with a momentum or beta1 setting cycles it)")
        if which == "momentum" and not hp["momentum"]:
            raise CLIError(f"--momentum-cycle with {name} needs --momentum > 0 (e.g. --momentum "
                           f"0.9): a momentum buffer cannot appear in the middle of a run")
        handle = self.optimizer.hyperparameter(which)
        for flag, value in zip(("--base-momentum", "--max-momentum"), cycle, strict=True):
            try:
                handle.check(value)
            except ValueError as exc:
                raise CLIError(f"{flag} {value:g}: {exc}") from None
        return handle

    def _mixed_precision_trainer(self) -> Any:
        try:
            from ..utils.mixed_precision import MixedPrecisionTrainer
        except ImportError as exc:
            raise CLIError(f"--mixed-precision needs mithril.utils.mixed_precision ({exc})") from None
        try:
            return MixedPrecisionTrainer(self.compiled, self.optimizer, self.params, None,
                                         loss_scale=self.cfg.loss_scale, dynamic_loss_scaling=True)
        except ValueError as exc:
            raise CLIError(f"invalid mixed-precision setting: {exc}") from None

    # -- one step, evaluation ------------------------------------------------------------------
    def step(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, bool]:
        """One update on a batch: (loss, accuracy, gradient norm, skipped).

        With mixed precision ``self.params`` are the float32 master weights."""
        if self.parallel is not None:
            return self.parallel.step(self, x, y)
        be = self.backend
        inputs = self.inputs(x, y)
        if self.trainer is not None:
            out = self.trainer.forward(inputs)
            self.params, self.state, ok = self.trainer.backward_and_update({"loss": 1.0})
            skipped = not ok
            norm = global_norm(self.trainer.last_gradients) if skipped \
                else self.state.last_grad_norm
        else:
            # evaluate + update as one call (the optimizer's own state: every backend keeps
            # the engine's grad norm, skip policy and per-step hyperparameter changes)
            if self.model_state is not None:
                self.params, self.state, out, self.model_state = self.train_step(
                    self.params, self.state, inputs, state=self.model_state)
            else:
                self.params, self.state, out = self.train_step(self.params, self.state, inputs)
            norm = self.state.last_grad_norm
            skipped = self.state.last_step_skipped
        pred = be.to_numpy(out[self.spec.output])
        if self.metric == "acc":
            metric = float(np.mean(correct(pred, y)))
        else:  # the RMSE in the target's units
            metric = float(np.sqrt(np.mean((pred - y) ** 2))) * self.spec.target_scale
        return float(be.to_numpy(out["loss"])), metric, \
            float("nan") if norm is None else float(norm), bool(skipped)

    def inputs(self, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        """A batch as the model's inputs: integer features (character indices) stay
        integers, class labels are integers, regression targets floats."""
        be = self.backend
        xs = be.array(x, be.int_dtype) if x.dtype.kind in "iu" else be.array(x)
        ys = be.array(y, be.int_dtype) if self.spec.objective == "classification" \
            else be.array(y)
        return {"input": xs, "target": ys}

    def predict(self, params: dict[str, Any], x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        """The model's outputs in inference mode (Dropout off, BatchNorm's running
        statistics), as NumPy arrays."""
        inputs = self.inputs(x, y)
        if self.model_state is not None:
            out, _ = self.compiled.evaluate(params, inputs, state=self.model_state,
                                            training=False)
        else:
            out = self.compiled.evaluate(params, inputs, training=False)
        return {k: self.backend.to_numpy(v) for k, v in out.items()}

    def ema_params(self) -> dict[str, Any]:
        """The EMA of the weights (``--ema``), as the model evaluates them: views of the
        optimizer state (read only; training is not disturbed), cast to the compute dtype
        with mixed precision."""
        ema = self.optimizer.ema_params(self.state if self.parallel is None else self.state.local)
        if self.trainer is not None:
            engine = self.trainer._engine
            ema = engine.cast_tree(ema, engine.cdt)
        return dict(ema)

    def saved_params(self) -> dict[str, Any]:
        """The weights a run saves: those its final metrics measure (schedule-free: the
        averaged x, as :meth:`eval_params`; not the EMA), in the parameter dtype (with mixed
        precision the float32 masters)."""
        params = self.params if self.trainer is None else self.trainer.master_params
        if hasattr(self.optimizer, "eval_params") and (
                self.parallel is None or not self.parallel.world.shard_state):
            params = self._averaged(params)
        return dict(params)

    def _averaged(self, params: dict[str, Any]) -> dict[str, Any]:
        """A schedule-free optimizer's averaged x at the training weights ``params`` (y): of
        this process's state, or on the JAX mesh (whose state is the sharded step's)."""
        if hasattr(self.parallel, "eval_params"):
            return self.parallel.eval_params(self)
        state = self.state if self.parallel is None else self.state.local
        return dict(self.optimizer.eval_params(state, params))

    def eval_params(self, ema: bool = False) -> dict[str, Any]:
        """The weights the model evaluates: the training ones or (``ema``) their EMA."""
        if ema:
            return self.ema_params()
        if hasattr(self.optimizer, "eval_params") and (
                self.parallel is None or not self.parallel.world.shard_state):
            # schedule-free: the averaged sequence x, not the gradient point y (a process of
            # a data-parallel run holds the whole state unless it is sharded); with mixed
            # precision, x of the float32 masters, cast to the compute dtype as they are
            if self.trainer is None:
                return self._averaged(self.params)
            engine = self.trainer._engine
            x = self._averaged(self.trainer.master_params)
            return dict(engine.cast_tree(x, engine.cdt))
        return self.params if self.trainer is None else self.trainer.compute_params()

    def evaluate(self, which: str, ema: bool = False) -> dict[str, float]:
        """Metrics on the whole ``"train"`` or ``"test"`` set (in chunks of
        ``spec.eval_chunk`` rows), with the training weights or (``ema``) their EMA:
        ``loss`` (the mean over the set) and ``acc`` (``bpc`` too for a character model),
        or for regression ``rmse`` (the target's units) and ``r2``."""
        x, y = self.sets[which]
        params = self.eval_params(ema)
        n = len(y)
        chunk = self.spec.eval_chunk or n
        loss = right = sse = 0.0
        for i in range(0, n, chunk):
            xs, ys = x[i:i + chunk], y[i:i + chunk]
            out = self.predict(params, xs, ys)
            loss += float(out["loss"]) * len(ys)
            pred = out[self.spec.output]
            if self.metric == "acc":
                right += float(np.sum(correct(pred, ys)))
            else:
                sse += float(np.sum((pred - ys) ** 2))
        res = {"loss": loss / n}
        if self.metric == "acc":
            res["acc"] = right / y.size
            if self.spec.bits_per_char:
                res["bpc"] = res["loss"] / math.log(2)
        else:
            sst = float(np.sum((y - y.mean()) ** 2))
            res["rmse"] = math.sqrt(sse / y.size) * self.spec.target_scale
            res["r2"] = 1 - sse / sst if sst > 0 else float("nan")
        return res

    # -- the loop --------------------------------------------------------------------------------
    def train(self, progress: bool | None = None, desc: str = "train",
              log: Callable[[str], None] | None = None) -> RunResult:
        """Train for ``cfg.epochs``. ``progress``: True/False shows/hides a tqdm bar, None shows
        it on a terminal only (tqdm is imported only then); ``log`` gets one line per epoch
        when there is no bar."""
        cfg = self.cfg
        rng = np.random.default_rng(cfg.seed)
        steps: list[dict[str, Any]] = []
        epochs: list[dict[str, Any]] = []
        if self.start is not None:  # --resume: the logs so far (the data order: _loop)
            steps, epochs = list(self.start[1]), list(self.start[2])
        if progress is False:
            bar: Any = NoBar()
        else:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, desc=desc, unit="step", dynamic_ncols=True,
                       disable=None if progress is None else not progress, leave=True,
                       initial=len(steps))
        show_epochs = log is not None and bar.disable
        interrupted = False
        error: str | None = None
        start = time.perf_counter()
        try:  # inf/NaN show in the metrics (and --nonfinite acts on them): no numpy warnings
            with thread_limit(cfg.threads, cfg.backend), np.errstate(all="ignore"), \
                    HeldInterrupt(enabled=self.parallel is None) as held:
                self._loop(bar, rng, steps, epochs, log if show_epochs else None, desc, held)
        except KeyboardInterrupt:
            interrupted = True
        except TrainingError as exc:  # kept like an interrupt: the steps before it stand
            error = str(exc)
        finally:
            bar.close()
        total = time.perf_counter() - start
        if epochs and epochs[-1]["step"] == len(steps):
            last = epochs[-1]
            final = {k: last[k] for k in self.metric_names()}
        else:  # interrupted inside an epoch: measure where the parameters are now
            # (after a non-finite gradient they may be huge: inf/NaN metrics)
            with thread_limit(cfg.threads, cfg.backend), np.errstate(all="ignore"):
                final = self.measure()
        return RunResult(cfg, steps, epochs, final, total, interrupted, self.optimizer_repr,
                         self.label, self.schedule.description,
                         None if self.momentum is None else self.momentum.name, self.metric,
                         self.spec.description, error)

    def _loop(self, bar: Any, rng: np.random.Generator, steps: list[dict[str, Any]],
              epochs: list[dict[str, Any]], log: Callable[[str], None] | None, desc: str,
              held: HeldInterrupt) -> None:
        """The epochs (from :attr:`start` with ``--resume``); appends to ``steps`` and
        ``epochs`` as it goes (so an interrupt keeps every row written so far) and keeps
        :attr:`position` after each step."""
        cfg, key = self.cfg, self.metric
        at = self.start[0] if self.start is not None else Position(1, 0, rng.bit_generator.state,
                                                                   (0.0, 0.0, 0))
        rng.bit_generator.state = at.rng_state
        self.position = at
        for epoch in range(at.epoch, cfg.epochs + 1):
            t0 = time.perf_counter()
            begun = rng.bit_generator.state  # the epoch's data order is drawn from here
            skip, (epoch_loss, epoch_metric, n) = (at.batch, at.sums) if epoch == at.epoch \
                else (0, (0.0, 0.0, 0))
            for b, (xb, yb) in enumerate(self.batches(epoch, rng)):
                if b < skip:  # --resume: done before the checkpoint (drawn again, skipped)
                    continue
                last, self.position = self.position, None  # None until the step is logged
                lr = self.optimizer.get_learning_rate()
                momentum = None if self.momentum is None else self.momentum.get()
                try:
                    loss, acc, norm, skipped = self.step(xb, yb)
                except FloatingPointError as exc:  # nonfinite="raise": the step is undone
                    self.position = last
                    raise TrainingError(f"step {len(steps) + 1} (epoch {epoch}/{cfg.epochs}): "
                                        f"{exc} (nonfinite=raise)") from exc
                if not skipped:  # a skipped (non-finite) step does not advance the schedule
                    self.schedule.after_step()
                steps.append({"step": len(steps) + 1, "epoch": epoch, "loss": loss, key: acc,
                              "lr": lr, "grad_norm": norm, "skipped": int(skipped)})
                if momentum is not None:  # the momentum (or beta1) this step used
                    steps[-1]["momentum"] = momentum
                if self.trainer is not None:
                    steps[-1]["loss_scale"] = self.trainer.loss_scale
                epoch_loss += loss * len(yb)
                epoch_metric += acc * len(yb)
                n += len(yb)
                self.position = Position(epoch, b + 1, begun, (epoch_loss, epoch_metric, n))
                held.check()
                bar.update(1)
                bar.set_postfix(epoch=f"{epoch}/{cfg.epochs}", loss=f"{loss:.4f}",
                                **{key: f"{acc:.3f}"}, lr=f"{lr:.3g}", refresh=False)
            train_s = time.perf_counter() - t0
            self.position = None  # until the epoch is logged
            self.schedule.after_epoch(epoch_loss / n)
            m = self.measure()
            lr = self.optimizer.get_learning_rate()
            epochs.append({"epoch": epoch, "step": len(steps), **m,
                           "batch_loss": epoch_loss / n, f"batch_{key}": epoch_metric / n,
                           "lr": lr, "time_s": train_s})
            if self.momentum is not None:
                epochs[-1]["momentum"] = self.momentum.get()
            self.position = Position(epoch + 1, 0, rng.bit_generator.state, (0.0, 0.0, 0))
            if log is not None:
                log(f"{desc}: epoch {epoch}/{cfg.epochs}  {self.epoch_line(m)}  "
                    f"lr {lr:.3g}  ({train_s:.2f} s)")
            held.check()

    def epoch_line(self, m: dict[str, float]) -> str:
        """The measured metrics of an epoch, e.g. ``loss 0.1 train acc 99% test acc 97%``."""
        line = f"loss {m['train_loss']:.4f}  "
        if self.metric == "rmse":
            line += (f"train RMSE {m['train_rmse']:.4g}  test RMSE {m['test_rmse']:.4g}  "
                     f"test R² {m['test_r2']:.4f}")
        elif self.spec.bits_per_char:
            line += (f"test loss {m['test_loss']:.4f}  test bits/char {m['test_bpc']:.3f}  "
                     f"test acc {m['test_acc']:.2%}")
        else:
            line += f"train acc {m['train_acc']:.2%}  test acc {m['test_acc']:.2%}"
        if "test_acc_ema" in m:
            line += f"  EMA test acc {m['test_acc_ema']:.2%}"
        if "test_rmse_ema" in m:
            line += f"  EMA test RMSE {m['test_rmse_ema']:.4g}"
        return line

    def metric_names(self) -> tuple[str, ...]:
        """The keys of :meth:`measure`: train/test loss and accuracy, then (``--ema``) the
        same with the EMA weights (``*_ema``)."""
        keys = ("loss", "acc", "bpc") if self.spec.bits_per_char else \
            ("loss", "acc") if self.metric == "acc" else ("loss", "rmse", "r2")
        names = tuple(f"{which}_{k}" for which in ("train", "test") for k in keys)
        return names + tuple(f"{k}_ema" for k in names) if self.cfg.ema is not None else names

    def measure(self) -> dict[str, float]:
        """Loss and accuracy on the whole train and test sets (see :meth:`metric_names`)."""
        out: dict[str, float] = {}
        for ema in (False, True) if self.cfg.ema is not None else (False,):
            for which in ("train", "test"):
                suffix = "_ema" if ema else ""
                for k, v in self.evaluate(which, ema=ema).items():
                    out[f"{which}_{k}{suffix}"] = v
        return out
