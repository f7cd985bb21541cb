"""The evaluation half of a :class:`~mithril.cli.training.Run`: the weights it evaluates
(the training ones, a schedule-free average, the EMA), the metrics on the whole train and test
sets, and their line per epoch."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .run_types import correct, r_squared

__all__ = ["Evaluation"]


class Evaluation:
    """Methods of :class:`~mithril.cli.training.Run` that measure it (they read its
    ``compiled``, ``params``, ``state``, ``optimizer``, ``trainer``, ``spec``, ``sets``...)."""

    cfg: Any
    spec: Any
    sets: dict[str, tuple[np.ndarray, np.ndarray]]
    metric: str
    compiled: Any
    backend: Any
    optimizer: Any
    params: dict[str, Any]
    state: Any
    trainer: Any
    parallel: Any
    model_state: dict[str, Any] | None

    inputs: Any  #: (Run's) a batch as the model's inputs

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
            res["r2"] = r_squared(sse, sst)
        return res

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
