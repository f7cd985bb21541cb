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
from collections.abc import Callable
from typing import Any

import numpy as np

import mithril as ml

from ..utils.optimizers import global_norm
from ..utils.training import make_train_step
from .data import Dataset
from .errors import CLIError, TrainingError
from .evaluation import Evaluation
from .networks import ModelSpec, mlp_spec
from .optimizer_catalog import build_optimizer
from .options import Schedule, build_schedule
from .parallel import one_process_mesh
from .run_types import (
    BACKENDS,
    MAX_TOTAL_STEPS,
    MIXED_PRECISION,
    RunConfig,
    RunResult,
    ShuffledRows,
    build_model,
    correct,
    make_backend,
    optimizer_label,
)
from .runtime import Aborted, HeldInterrupt, NoBar, Position, thread_limit

__all__ = ["BACKENDS", "MIXED_PRECISION", "Run", "RunConfig", "RunResult", "ShuffledRows",
           "build_model", "correct", "make_backend", "thread_limit"]


class Run(Evaluation):
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
        self.optimizer = build_optimizer(cfg.optimizer, cfg.settings, extra, cfg.spec_keys)
        #: DP-SGD: the step computes each example's gradient (make_train_step)
        self.private = bool(getattr(self.optimizer, "takes_per_example_gradients", False))
        if self.private and parallel is not None and not one_process_mesh(parallel.world):
            raise CLIError(f"optimizer {cfg.optimizer} (DP-SGD) trains in one process (with "
                           f"--backend jax, --devices N too): the data-parallel runs "
                           f"(--nprocs, torchrun) take one gradient per batch, not each "
                           f"example's")
        if self.private and cfg.mixed_precision != "none":
            raise CLIError(f"--mixed-precision does not apply to optimizer {cfg.optimizer} "
                           f"(DP-SGD): train it in float32 or float64")
        #: Sophia: the loop measures Hutchinson's estimate of the Hessian's diagonal on its
        #: due steps (mithril.utils.hessian), as optax's sophia does inside its update
        self.hessian = _hessian_user(self.optimizer, cfg, parallel)
        self.optimizer_repr = repr(self.optimizer)  # before a schedule changes its lr
        self.label = optimizer_label(cfg.optimizer, self.optimizer, cfg.settings)
        #: what --momentum-cycle drives: a handle on the optimizer's momentum or beta1
        self.momentum = self._momentum_handle()
        self.schedule: Schedule = build_schedule(self.optimizer, cfg.schedulers, cfg.settings,
                                                 self.total_steps, cfg.momentum_cycle)
        dtype = MIXED_PRECISION[cfg.mixed_precision] or cfg.dtype
        self.backend = be = make_backend(cfg.backend, dtype, cfg.seed)
        self.compiled = ml.compile(spec.model, be, shapes=spec.shapes)
        if self.hessian and self.compiled.program.has_context:
            raise CLIError(f"optimizer {cfg.optimizer} (Sophia) measures the Hessian of a "
                           f"loss that is a function of the parameters alone: "
                           f"{spec.description} has Dropout or BatchNorm. Train a model "
                           f"without them (digits-cnn: --no-batchnorm --dropout 0)")
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
        #: ``saver(steps, epochs)`` saves a checkpoint where :attr:`position` stands: after
        #: every :attr:`save_every`-th step (``--checkpoint-every``), and once when a signal
        #: (SIGINT, SIGTERM) stops the loop, before anything slower; None: no saving
        self.saver: Callable[[list[dict[str, Any]], list[dict[str, Any]]], Any] | None = None
        self.save_every: int | None = None
        #: DP-SGD: ``(noise_multiplier, sample_rate, steps)`` of the steps before a
        #: ``--resume`` (the accountant's history, as the checkpoint keeps it)
        self.privacy_before: list[tuple[float, float, int]] = []

    def sample_rate(self) -> float | None:
        """DP-SGD's sampling rate ``q``: the batch size over the training rows (shuffled
        batches, accounted as Poisson sampling at that rate, as Opacus does without
        ``poisson_sampling``); None where the batches are not rows of a table."""
        rows = getattr(self.batches, "rows", None)
        return min(1.0, self.cfg.batch_size / rows) if isinstance(self.batches, ShuffledRows) \
            and rows else None

    def privacy(self, steps: int, delta: float) -> dict[str, Any] | None:
        """The ``(ε, δ)`` of ``steps`` DP-SGD steps (:mod:`mithril.utils.privacy_accounting`,
        the RDP accountant) with what it was computed from: the steps before a ``--resume``
        (:attr:`privacy_before`) at their own noise, the others at this run's; None without
        DP-SGD."""
        if not self.private:
            return None
        q = self.sample_rate()
        sigma = float(self.optimizer.noise_multiplier)
        out: dict[str, Any] = {"delta": delta, "noise_multiplier": sigma, "sample_rate": q,
                               "steps": steps, "accountant": "rdp",
                               "l2_norm_clip": float(self.optimizer.l2_norm_clip)}
        if q is None:
            out["epsilon"] = None
            return out
        acc = self.accountant(steps)
        out["history"] = acc.state_dict()["history"]
        try:
            out["epsilon"] = acc.get_epsilon(delta)
        except ImportError as exc:
            raise CLIError(str(exc)) from None
        return out

    def accountant(self, steps: int) -> Any:
        """The :class:`~mithril.utils.privacy_accounting.PrivacyAccountant` after ``steps``
        DP-SGD steps of this run (those of :attr:`privacy_before` first); needs
        :meth:`sample_rate`."""
        from ..utils.privacy_accounting import PrivacyAccountant

        acc = PrivacyAccountant("rdp")
        for sigma, q, n in self.privacy_before:
            acc.step(noise_multiplier=sigma, sample_rate=q, steps=n)
        rest = steps - sum(n for _, _, n in self.privacy_before)
        if rest > 0:
            acc.step(noise_multiplier=float(self.optimizer.noise_multiplier),
                     sample_rate=self.sample_rate(), steps=rest)
        return acc

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
            estimate = self._hessian_estimate(inputs)
            if self.model_state is not None:
                self.params, self.state, out, self.model_state = self.train_step(
                    self.params, self.state, inputs, state=self.model_state)
            else:
                self.params, self.state, out = self.train_step(self.params, self.state, inputs)
            if estimate is not None:
                self.state = self.optimizer.update_hessian(self.state, estimate)
            norm = self.state.last_grad_norm
            skipped = self.state.last_step_skipped
        pred = be.to_numpy(out[self.spec.output])
        if self.metric == "acc":
            metric = float(np.mean(correct(pred, y)))
        else:  # the RMSE in the target's units
            metric = float(np.sqrt(np.mean((pred - y) ** 2))) * self.spec.target_scale
        return float(be.to_numpy(out["loss"])), metric, \
            float("nan") if norm is None else float(norm), bool(skipped)

    def _hessian_estimate(self, inputs: dict[str, Any]) -> dict[str, Any] | None:
        """Sophia's estimate for the coming step where it is due (at the params before the
        step), else None. Its signs come from ``--seed`` and the step count, so a resumed
        run draws what the uninterrupted one drew."""
        if not self.hessian or not self.optimizer.hessian_due(self.state):
            return None
        from ..utils.hessian import hutchinson_diagonal

        seed = np.random.SeedSequence([self.cfg.seed, self.state.step])
        return hutchinson_diagonal(self.compiled, self.params, inputs,
                                   np.random.default_rng(seed), loss="loss")

    def inputs(self, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        """A batch as the model's inputs: integer features (character indices) stay
        integers, class labels are integers, regression targets floats."""
        be = self.backend
        xs = be.array(x, be.int_dtype) if x.dtype.kind in "iu" else be.array(x)
        ys = be.array(y, be.int_dtype) if self.spec.objective == "classification" \
            else be.array(y)
        return {"input": xs, "target": ys}

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
        agree, repeat_s = (None, 0.0) if self.parallel is None else \
            self.parallel.stop_agreement()  # (the ranks stop after the same step)
        held = HeldInterrupt(agree=agree, repeat_s=repeat_s)
        if hasattr(agree, "current"):  # (a StepAgreement: the step carries the vote)
            agree.current = held.ballot
        if self.parallel is not None and self.saver is None:  # rank 0 saves for all
            self.saver, self.save_every = self.parallel.saver(self)
        try:  # inf/NaN show in the metrics (and --nonfinite acts on them): no numpy warnings
            with thread_limit(cfg.threads, cfg.backend), np.errstate(all="ignore"), held:
                self._loop(bar, rng, steps, epochs, log if show_epochs else None, desc, held)
        except Aborted:  # a second signal: nothing more (the caller writes nothing)
            raise
        except KeyboardInterrupt:
            interrupted = True
            if self.parallel is not None and not self.parallel.can_checkpoint:
                self.position = None  # (a world whose state cannot be saved: none resumes)
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
                         self.spec.description, error, held.signum if interrupted else None)

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
                stop = held.settle()  # (data-parallel: every rank's decision alike)
                if self.saver is not None and (stop or self.save_every is not None
                                               and len(steps) % self.save_every == 0):
                    self.saver(steps, epochs)
                if stop:
                    raise KeyboardInterrupt
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
            if held.settle() and self.saver is not None:  # (it came while measuring)
                self.saver(steps, epochs)
            held.check()


def _holds(opt: Any, cls: type) -> bool:
    """Whether ``opt`` wraps (at any depth) an optimizer of class ``cls``."""
    inner, seen = opt, set()
    while inner is not None and id(inner) not in seen:
        seen.add(id(inner))
        inner = next((v for a in ("inner", "optimizer", "base_optimizer",
                                  getattr(inner, "HELD", None)) if a
                      and (v := getattr(inner, a, None)) is not None), None)
        if isinstance(inner, cls):
            return True
    return False


def _hessian_user(opt: Any, cfg: Any, parallel: Any) -> bool:
    """Whether ``opt`` is Sophia, or a wrapper that hands the estimate on to the Sophia it
    holds (``lookahead:inner=sophia``: its ``hessian_due`` / ``update_hessian``), whose
    estimate the loop measures; refused where it cannot: a wrapper that does not hand it
    on, mixed precision, data-parallel. (A wrapper's own ``update_hessian`` does not make
    it one: what counts is the Sophia it holds.)"""
    from ..utils.optimizers import Sophia
    from ..utils.optimizers.sophia import HeldEstimates

    if not isinstance(opt, Sophia):
        if not _holds(opt, Sophia):
            return False
        if not isinstance(opt, HeldEstimates):
            raise CLIError(f"optimizer {cfg.optimizer}: Sophia takes its Hessian estimate "
                           f"from the training loop, which this wrapper does not hand on: "
                           f"train --optimizer sophia without the wrapper")
    if parallel is not None or cfg.mixed_precision != "none":
        raise CLIError(f"optimizer {cfg.optimizer} (Sophia) trains in one process in float32 "
                       f"or float64: its Hessian estimate is measured by the training loop, "
                       f"not by the data-parallel or mixed-precision steps")
    return True
