"""L-BFGS with torch.optim.LBFGS's algorithm, defaults and results; optax.lbfgs's on request
(``convention="optax"``, :mod:`.lbfgs_optax`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import Any

import numpy as np

from ...errors import KeyMismatchError, ShapeError
from .base import Optimizer
from .checks import check_flag, check_int, check_positive, describe, to_float
from .lbfgs_math import JaxOps, Memory, Ops, TorchOps, lbfgs_step
from .lbfgs_optax import (
    OPTAX_DEFAULTS,
    OPTAX_VALUES,
    check_optax_arguments,
    check_optax_values,
    optax_update,
)
from .sgd import BY_CONVENTION, check_convention
from .state import OptimizerState

#: set by a drop-in wrapper (:func:`mithril.interop.torch_optimizer`) around its updates: an
#: LBFGS with ``fused=None`` then runs torch's own operations, so that a torch training loop
#: gets ``torch.optim.LBFGS``'s numbers to the last bit
TORCH_OPS: ContextVar[bool] = ContextVar("mithril_lbfgs_torch_ops", default=False)

_LINE_SEARCHES = (None, "strong_wolfe")
#: the optimizer-wide scalars besides the history's ``ro0``, ``ro1``, ...
_VALUES = ("t", "H_diag", "prev_loss", "n_iter", "func_evals", "history", "last_loss")


class LBFGS(Optimizer):
    """L-BFGS as ``torch.optim.LBFGS`` (minFunc's method): same hyperparameters, defaults
    and arithmetic, so the same start gives torch's parameters to rounding error (to the
    last bit on torch, where torch's own operations run)::

        def closure(params):                  # the loss and gradients at any params
            outputs, grads = compiled.evaluate(params, data, output_gradients={"loss": 1.0})
            return outputs["loss"], grads

        state = opt.init(params)
        params, state = opt.update(params, None, state, closure=closure)

    One ``update`` is one torch ``step(closure)``: up to ``max_iter`` iterations and
    ``max_eval`` evaluations of ``closure``, each at new params (a dict of backend arrays,
    never written afterwards). The first evaluation is the closure's at ``params``, or,
    when you already have it, ``update(params, gradients, state, closure=closure,
    loss=loss)``. ``line_search_fn="strong_wolfe"`` picks each step length by torch's
    strong-Wolfe line search, else each step is ``learning_rate`` along the direction
    (the first one scaled by ``min(1, 1/‖g‖₁)``). ``state.last_loss`` is the loss at the
    params given to the last update (what torch's ``step`` returns), ``state.step`` counts
    updates, ``state.values["n_iter"]`` / ``["func_evals"]`` torch's counters.

    Nothing changes unless the whole step succeeds: a closure that raises, or returns a
    non-finite loss or gradient, or gradients with other names, shapes or dtype than the
    params (``FloatingPointError``, ``KeyMismatchError``, ``ShapeError``, ``TypeError``),
    leaves ``params`` and ``state`` as they were.

    State: flat slots ``d`` (the last direction), ``prev_flat_grad`` and the history, oldest
    first, ``s0 … s{h-1}`` (steps) and ``y0 … y{h-1}`` (gradient changes), ``h =
    history_size``; scalars in ``state.values``: ``t``, ``H_diag``, ``prev_loss``,
    ``n_iter``, ``func_evals``, ``history`` (how many entries are in use), ``ro0 …`` and
    ``last_loss``. Memory grows like torch's: two parameter-sized buffers per history
    entry, up to ``history_size`` (the slots of entries not yet made share one zero
    buffer), plus ``d``, ``prev_flat_grad`` and that buffer. A step keeps the entries it
    evicts until it succeeds, so once the history is full a step briefly holds up to
    ``2·min(max_iter, history_size)`` more (torch frees them at once). Saved and restored
    bit-exactly with ``state_dict`` / ``load_state_dict`` and checkpoints; a checkpoint
    holds every slot, in use or not.

    ``fused``: on the torch backend (CPU), ``True`` fuses each update of the two-loop
    recursion with the next dot product: one read of a parameter-sized vector fewer per
    history entry, the dots summed in float64 (~0.9x torch's step; float64 results within
    ~1e-12 of torch's on a smooth problem). ``False`` runs torch's own operations, torch's
    results to the last bit: what reproduces a torch run exactly, since L-BFGS on a
    non-convex loss (a ReLU network, a float32 strong-Wolfe search) amplifies any last-bit
    difference into another trajectory. ``None`` (default): fused, except inside
    :func:`~mithril.interop.torch_optimizer`, a drop-in replacement for
    ``torch.optim.LBFGS``, which keeps torch's numbers. The NumPy backend always fuses
    (there are no torch bits to keep).

    Not torch's: no parameter groups (torch has none either), and no ``weight_decay`` or
    clipping (add them to the closure's loss).

    ``convention="optax"``: ``optax.lbfgs``'s algorithm instead, one optax iteration per
    ``update``: ``history_size`` (default 10) is its ``memory_size``, ``learning_rate``
    (``None`` or 1.0 by default, optax's ``None``) scales the direction,
    ``line_search_fn="zoom"`` (default) is ``optax.scale_by_zoom_linesearch`` with
    ``max_linesearch_steps`` (20) and ``initial_guess_strategy`` ("one", optax.lbfgs's),
    None no line search; ``scale_init_precond``, ``max_learning_rate``, ``slope_rtol``,
    ``curv_rtol``, ``approx_dec_rtol`` and ``stepsize_precision`` are optax's, with its
    defaults. torch's ``max_iter``, ``max_eval``, ``tolerance_grad``, ``tolerance_change``
    and ``fused`` are refused there, optax's knobs under ``convention="torch"``. See
    :mod:`.lbfgs_optax` for its update, state and errors.
    """

    def __init__(self, learning_rate: float | None = 1.0, max_iter: int = BY_CONVENTION,
                 max_eval: int | None = None, tolerance_grad: float = BY_CONVENTION,
                 tolerance_change: float = BY_CONVENTION, history_size: int = BY_CONVENTION,
                 line_search_fn: str | None = BY_CONVENTION, *, fused: bool | None = None,
                 convention: str = "torch", scale_init_precond: bool = True,
                 max_linesearch_steps: int = 20, max_learning_rate: float | None = None,
                 slope_rtol: float = 1e-4, curv_rtol: float = 0.9,
                 approx_dec_rtol: float | None = 1e-6, stepsize_precision: float = 1e-5,
                 initial_guess_strategy: str = "one", backend: Any = None) -> None:
        self.convention = check_convention(convention, ("torch", "optax"))
        optax_args = {k: v for k, v in locals().items() if k in OPTAX_DEFAULTS}
        if convention == "optax":
            torch_args = {"max_iter": max_iter, "max_eval": max_eval, "tolerance_grad":
                          tolerance_grad, "tolerance_change": tolerance_change, "fused": fused}
            super().__init__(1.0 if learning_rate is None else learning_rate, backend=backend)
            self.__dict__.update(check_optax_arguments(history_size, line_search_fn,
                                                       optax_args, torch_args))
            return
        odd = [f"{k}={v!r}" for k, v in optax_args.items() if v != OPTAX_DEFAULTS[k]]
        if odd:
            raise ValueError(f"{', '.join(odd)}: optax.lbfgs's option(s), for "
                             f"convention='optax' (this LBFGS follows torch.optim.LBFGS)")
        max_iter = 20 if max_iter is BY_CONVENTION else max_iter
        tolerance_grad = 1e-7 if tolerance_grad is BY_CONVENTION else tolerance_grad
        tolerance_change = 1e-9 if tolerance_change is BY_CONVENTION else tolerance_change
        history_size = 100 if history_size is BY_CONVENTION else history_size
        line_search_fn = None if line_search_fn is BY_CONVENTION else line_search_fn
        super().__init__(learning_rate, backend=backend)
        self.fused = None if fused is None else check_flag("fused", fused)
        self.max_iter = check_int("max_iter", max_iter, 1)
        self.max_eval = (self.max_iter * 5 // 4 if max_eval is None
                         else check_int("max_eval", max_eval, 1))
        self.tolerance_grad = check_positive("tolerance_grad", tolerance_grad)
        self.tolerance_change = check_positive("tolerance_change", tolerance_change)
        self.history_size = check_int("history_size", history_size, 1, 1 << 20)
        if not (line_search_fn is None or isinstance(line_search_fn, str)) or \
                line_search_fn not in _LINE_SEARCHES:
            raise ValueError(f"line_search_fn must be None or 'strong_wolfe', got "
                             f"{describe(line_search_fn)} (optax's 'zoom' needs "
                             f"convention='optax')")
        self.line_search_fn = line_search_fn

    def hyperparameters(self) -> dict[str, Any]:
        if self._optax:
            return {k: getattr(self, k) for k in (
                "learning_rate", "history_size", "line_search_fn", "convention", *OPTAX_DEFAULTS)}
        return {k: getattr(self, k) for k in (
            "learning_rate", "max_iter", "max_eval", "tolerance_grad", "tolerance_change",
            "history_size", "line_search_fn", "fused", "convention")}

    @property
    def _optax(self) -> bool:
        """Whether this LBFGS follows ``optax.lbfgs`` (``convention="optax"``)."""
        return self.__dict__.get("convention") == "optax"

    # -- the state's layout ------------------------------------------------------------
    def slot_names(self) -> tuple[str, ...]:
        if self.__dict__.get("_bare"):  # init: the slots are made here, not by the base class
            return ()
        h = range(self.history_size)
        first = ("prev_params", "prev_grad", "ls_grad") if self._optax else ("d", "prev_flat_grad")
        return (*first, *(f"s{i}" for i in h), *(f"y{i}" for i in h))

    @property  # type: ignore[override]
    def state_values(self) -> tuple[str, ...]:
        if self._optax:
            return (*OPTAX_VALUES, *(f"rho{i}" for i in range(self.history_size)))
        return (*_VALUES, *(f"ro{i}" for i in range(self.history_size)))

    def state_value_init(self, name: str) -> float:
        if self._optax:  # optax's: no stepsize yet but 1, no value yet (inf)
            return {"ls_learning_rate": 1.0, "ls_value": math.inf, "decrease_error": math.inf,
                    "curvature_error": math.inf}.get(name, 0.0)
        return 1.0 if name == "H_diag" else 0.0

    def init(self, params: Mapping[str, Any]) -> OptimizerState:
        """A fresh state; its history slots share one zero buffer until used."""
        self.__dict__["_bare"] = True
        try:
            state = super().init(params)
        finally:
            del self.__dict__["_bare"]
        zero = _zeros(state)
        state.slots = dict.fromkeys(self.slot_names(), zero)
        state.last_loss = None
        return state

    def load_state_dict(self, d: Mapping[str, Any], params: Mapping[str, Any] | None = None
                        ) -> OptimizerState | None:
        hp = d.get("hyperparameters") if isinstance(d, Mapping) else None
        h = hp.get("history_size", self.history_size) if isinstance(hp, Mapping) else None
        values = d.get("values") if isinstance(d, Mapping) else None
        conv = hp.get("convention", "torch") if isinstance(hp, Mapping) else None
        if isinstance(hp, Mapping) and (not isinstance(conv, str) or conv not in (
                "torch", "optax")):  # (an optax LBFGS's trial copy then had no max_iter)
            raise ValueError(f"state dict hyperparameters: convention must be one of "
                             f"('torch', 'optax'), got {describe(conv)}")
        if conv in ("torch", "optax") and conv != self.convention:  # the other's checks
            other = type(self)(convention=conv, backend=self._backend)
            state = other.load_state_dict(d, params)
            self.__dict__.update({k: getattr(other, k) for k in other.hyperparameters()})
            return state
        torch = conv != "optax"
        if params is not None and isinstance(values, Mapping) and isinstance(h, int):
            _check_values(values, h) if torch else check_optax_values(values)  # before all
        state = super().load_state_dict(d, params)
        if state is not None and self._optax:
            state.last_loss = state.values["last_loss"] if state.step else None
        elif state is not None:
            n, fresh = int(state.values["history"]), state.values["n_iter"] == 0
            zero = _zeros(state)
            for name in state.slots:  # unused entries: the shared zero buffer again
                used = not fresh if name in ("d", "prev_flat_grad") else int(name[1:]) < n
                if not used:
                    state.slots[name] = zero
            state.last_loss = state.values["last_loss"] if state.step else None
        return state

    # -- one step ------------------------------------------------------------------------
    def update(self, params: Mapping[str, Any], gradients: Mapping[str, Any] | None,
               state: OptimizerState, closure: Callable | None = None, *,
               loss: Any = None) -> tuple[dict[str, Any], OptimizerState]:
        """One ``torch.optim.LBFGS.step(closure)``. ``closure(params) -> (loss, gradients)``
        evaluates at any params; ``gradients`` (with ``loss=``) are those at ``params``,
        or ``None`` for the closure to give them. Returns the new params and state; on any
        error neither ``params`` nor ``state`` has changed."""
        name = type(self).__name__
        if self._optax:
            return optax_update(self, params, gradients, state, closure, loss)
        if closure is None:
            raise TypeError(f"{name}.update needs closure=: a function params -> (loss, "
                            f"gradients) that evaluates the loss and its gradients at the "
                            f"params it is given (L-BFGS evaluates several points per step)")
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {describe(closure)}")
        self._check_state(state)
        if gradients is not None and loss is None:
            raise TypeError(f"{name}.update: give the loss at params with its gradients "
                            f"(loss=...), or gradients=None for the closure to evaluate both")
        if gradients is None and loss is not None:
            raise TypeError(f"{name}.update: loss= is the loss at params, given with their "
                            f"gradients; got loss but gradients=None")
        ops = _ops(state, self.fused if self.fused is not None else not TORCH_OPS.get())
        x = self._flat_params(params, state)
        mem = _memory(state, ops, self.history_size)

        def evaluate(xb: Any) -> tuple[float, Any]:
            out = closure(_views(state, xb))
            if not isinstance(out, (tuple, list)) or len(out) != 2:
                raise TypeError(f"the closure must return (loss, gradients), got "
                                f"{describe(out)}")
            return self._checked(state, ops, out[0], out[1], "the closure's")

        with np.errstate(all="ignore"):  # inf/NaN as torch gives them, without warnings
            if gradients is None:
                loss, g = evaluate(x)
            else:
                loss, g = self._checked(state, ops, loss, gradients, "")
            norm = math.sqrt(max(float(ops.dot(g, g)), 0.0))
            x, mem = lbfgs_step(
                ops, evaluate, x, loss, g, mem, lr=self.learning_rate, max_iter=self.max_iter,
                max_eval=self.max_eval, tolerance_grad=self.tolerance_grad,
                tolerance_change=self.tolerance_change, history_size=self.history_size,
                line_search_fn=self.line_search_fn)
            views = _views(state, x)
        # commit: everything above worked on new buffers
        h, zero = self.history_size, _zeros(state)
        slots = {"d": zero if mem.d is None else mem.d,
                 "prev_flat_grad": zero if mem.prev_flat_grad is None else mem.prev_flat_grad}
        for i in range(h):
            used = i < len(mem.dirs)
            slots[f"s{i}"] = mem.stps[i] if used else zero
            slots[f"y{i}"] = mem.dirs[i] if used else zero
        values = {"t": float(mem.t), "H_diag": float(mem.H_diag),
                  "prev_loss": float(mem.prev_loss), "n_iter": float(mem.n_iter),
                  "func_evals": float(mem.func_evals), "history": float(len(mem.dirs)),
                  "last_loss": loss}
        values.update({f"ro{i}": float(mem.ro[i]) if i < len(mem.ro) else 0.0 for i in range(h)})
        state.slots, state.values = slots, values
        state.params_flat, state.param_views = x, views
        state.step += 1
        state.last_loss, state.last_grad_norm, state.last_step_skipped = loss, norm, False
        return dict(views), state

    # -- checks --------------------------------------------------------------------------
    def _check_state(self, state: Any) -> None:
        name = type(self).__name__
        if not isinstance(state, OptimizerState):
            raise TypeError(f"state must be what {name}.init returned, got "
                            f"{type(state).__name__}")
        if state.kind != name or set(state.slots) != set(self.slot_names()) or \
                set(state.values) != set(self.state_values):
            def made_by(conv: str, h: int) -> str:
                return f"convention={conv!r}, history_size={h}"

            h = sum(k[0] == "s" and k[1:].isdigit() for k in state.slots)
            made = (f"{name} with {made_by('optax' if 'ls_grad' in state.slots else 'torch', h)}"
                    if state.kind == name else state.kind)
            raise ValueError(f"state was made by {made}, not by this {name} "
                             f"({made_by(self.convention, self.history_size)})")
        if state.engine.backend.name != self.backend.name:
            raise ValueError(f"state was made for {state.engine.backend.name} arrays, but "
                             f"this {name} works on {self.backend.name} arrays")

    def _arrays(self, state: OptimizerState, arrays: Any, what: str) -> list[Any]:
        """``arrays`` (a dict like the params) in layout order, checked: exactly the
        parameters' names, the backend's array type, their shapes and dtype."""
        lay, eng = state.layout, state.engine
        if not isinstance(arrays, Mapping):
            raise TypeError(f"{what} must be a dict of arrays, got {type(arrays).__name__}")
        if arrays.keys() != lay.index.keys():
            missing = sorted(set(lay.names) - set(arrays))
            unknown = sorted(set(arrays) - set(lay.names))
            raise KeyMismatchError(f"{what} do not match the params: missing {missing}, "
                                   f"unknown {unknown}")
        out = []
        for name, shape in zip(lay.names, lay.shapes):
            a = arrays[name]
            if not isinstance(a, eng.array_type):
                raise TypeError(f"{what}['{name}'] is a {type(a).__name__}, not a "
                                f"{eng.backend.name} array")
            if tuple(a.shape) != shape:
                raise ShapeError(f"{what}['{name}'] has shape {tuple(a.shape)} but the "
                                 f"parameter has shape {shape}")
            if a.dtype != eng.native_dtype:
                raise TypeError(f"{what}['{name}'] has dtype {eng.backend.dtype_name(a)} but "
                                f"the parameter has dtype {lay.dtype}")
            out.append(a)
        return out

    def _flat_params(self, params: Any, state: OptimizerState) -> Any:
        views = state.param_views or {}
        if isinstance(params, Mapping) and len(params) == len(views) and all(
                params.get(k) is v for k, v in views.items()):
            return state.params_flat  # the arrays the last update returned
        return _flatten(state, self._arrays(state, params, "params"))

    def _checked(self, state: OptimizerState, ops: Ops, loss: Any, grads: Any,
                 whose: str) -> tuple[float, Any]:
        """The loss as a float and the gradients as a flat buffer, both checked finite."""
        whose = f"{whose} " if whose else ""
        value = to_float(f"{whose}loss", loss)
        flat = _flatten(state, self._arrays(state, grads, f"{whose}gradients"))
        if not math.isfinite(value) or not ops.all_finite(flat):
            bad = [n for n, a, b, _ in state.layout.spans() if not ops.all_finite(flat[a:b])]
            what = [f"{whose}loss is {value}"] if not math.isfinite(value) else []
            what += [f"{whose}gradients are non-finite for {bad}"] if bad else []
            raise FloatingPointError(f"{type(self).__name__}: {' and '.join(what)}; params "
                                     f"and state left unchanged")
        return value, flat


def _check_values(values: Mapping[str, Any], h: int) -> None:
    """The counters of saved values: whole numbers, ``history`` at most ``h``."""
    for key, top in (("n_iter", 2**53), ("func_evals", 2**53), ("history", h)):
        if key not in values:
            continue
        try:
            v = float(values[key])
        except OverflowError:  # (an int too large for a float: named below, not Python's)
            v = math.inf
        except (TypeError, ValueError):
            continue  # the base class names it
        if not (v == int(v) if math.isfinite(v) else False) or not 0 <= v <= top:
            raise ValueError(f"state value '{key}' must be a whole number in [0, {top}], got "
                             f"{describe(values[key])}")


def _memory(state: OptimizerState, ops: Ops, h: int) -> Memory:
    """What the state holds, as :func:`lbfgs_step` takes it (nothing copied)."""
    v, s = state.values, state.slots
    _check_values(v, h)
    n, n_iter = int(v["history"]), int(v["n_iter"])
    fresh = n_iter == 0
    return Memory(n_iter, int(v["func_evals"]), ops.scalar(v["t"]), ops.scalar(v["H_diag"]),
                  float(v["prev_loss"]), None if fresh else s["d"],
                  None if fresh else s["prev_flat_grad"], [s[f"y{i}"] for i in range(n)],
                  [s[f"s{i}"] for i in range(n)], [ops.scalar(v[f"ro{i}"]) for i in range(n)])


def _ops(state: OptimizerState, fused: bool = True) -> Ops:
    buf = _zeros(state)
    if isinstance(buf, np.ndarray):
        return Ops(state.layout.dtype)
    if type(buf).__module__.split(".", 1)[0] == "torch":
        return TorchOps(state.layout.dtype, fused)
    return JaxOps(state.layout.dtype)


def _zeros(state: OptimizerState) -> Any:
    """The state's zero buffer over the layout, which the slots of unused history entries
    share; never written (read-only where NumPy allows)."""
    zero = state.__dict__.get("lbfgs_zero")
    if zero is None:
        zero = state.engine.full(state.layout.total, 0.0)
        if isinstance(zero, np.ndarray):
            zero.flags.writeable = False
        state.lbfgs_zero = zero
    return zero


def _flatten(state: OptimizerState, arrays: list[Any]) -> Any:
    """A new flat buffer over the state's layout holding ``arrays`` (zeros in any gaps)."""
    lay, eng = state.layout, state.engine
    buf = _zeros(state)
    if isinstance(buf, np.ndarray):
        out = np.zeros(lay.total, dtype=buf.dtype) if lay.align > 1 or not arrays else None
        if out is None:
            return np.concatenate([np.asarray(eng.to_numpy(a)).reshape(-1) for a in arrays])
        for (_, a, b, _), x in zip(lay.spans(), arrays):
            out[a:b] = np.asarray(eng.to_numpy(x)).reshape(-1)
        return out
    if type(buf).__module__.split(".", 1)[0] == "torch":
        import torch

        if not arrays:
            return torch.zeros(0, dtype=buf.dtype, device=buf.device)
        for (name, *_), a in zip(lay.spans(), arrays):
            if a.device != buf.device:
                raise ValueError(f"'{name}' is on {a.device}; the optimizer state is on "
                                 f"{buf.device}")
        return torch.cat([a.detach().reshape(-1) for a in arrays])
    import jax.numpy as jnp

    return jnp.concatenate([a.reshape(-1) for a in arrays]) if arrays else jnp.zeros(0, buf.dtype)


def _views(state: OptimizerState, flat: Any) -> dict[str, Any]:
    """The parameters at ``flat`` in the backend's array type: views on NumPy and torch,
    ``jax.Array`` copies for JAX on CPU (whose state is host buffers), slices on JAX."""
    lay = state.layout
    if state.engine.backend.name == "jax" and isinstance(flat, np.ndarray):
        import jax.numpy as jnp

        return {n: jnp.array(flat[a:b].reshape(shp)) for n, a, b, shp in lay.spans()}
    return lay.unflatten(flat)
