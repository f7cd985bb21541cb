"""A mithril optimizer as an ``mlx.optimizers.Optimizer``.

:func:`mlx_optimizer` wraps any mithril optimizer (:mod:`mithril.utils.optimizers`) for a
plain MLX training loop: the model, ``nn.value_and_grad`` and ``mx.eval`` stay MLX's, the
update is mithril's (its NumPy backend: the fused numba kernel over all parameters)::

    import mlx.core as mx
    import mlx.nn as nn
    from mithril.interop import mlx_optimizer
    from mithril.utils.optimizers import Prodigy

    opt = mlx_optimizer(Prodigy())
    loss, grads = nn.value_and_grad(model, loss_fn)(model, x, y)
    opt.update(model, grads)          # or: params = opt.apply_gradients(grads, params)
    mx.eval(model.parameters(), opt.state)

How it works:

* The wrapper is a real ``mlx.optimizers.Optimizer`` (``isinstance`` checks hold). Trees
  are flattened with ``mlx.utils.tree_flatten``: parameters are named by their dotted
  paths (``"layers.0.weight"``), the names the mithril optimizer's ``param_groups``,
  ``weight_decay_mask`` and Muon's matrix rules see. As MLX's, the first call (or
  :meth:`MlxOptimizer.init`) fixes the parameters: those of the gradients tree; a later
  gradient for another name is refused (:class:`~mithril.errors.KeyMismatchError`).
* Arrays cross as NumPy: an ``mx.array`` is read in place (``np.asarray``: no copy on CPU),
  mithril copies the parameters into its flat buffer (only those changed since its last
  step: a model holding the arrays the last step returned, not edited in place with
  ``a[i] = v``, is already there), steps, and the new parameters come back as new
  ``mx.array`` of the parameters' dtype (float16, float32 or float64; bfloat16 is refused
  by name: NumPy has no bfloat16).
  :meth:`~MlxOptimizer.apply_gradients` returns a tree of the gradients' structure, as
  MLX's; a parameter absent from the gradients is left alone (no weight decay either) and
  its state kept.
* One step count for all parameters, as MLX's (and mithril's): ``state["step"]`` is the
  mithril state's count (a step skipped under ``nonfinite="skip"`` is not counted).
* ``state`` is ``{"step": uint64, "learning_rate": array}``, MLX's keys, cheap to
  ``mx.eval`` each step; the slots stay on the NumPy side (``opt.mithril_state``).
  ``learning_rate``: the mithril optimizer's unless given; an MLX schedule (a callable of
  the step) is evaluated at the step count before the update, as MLX's (step 0 first); a
  value below 0 by its float32 rounding (``linear_schedule(init, 0, T)`` from step T) is 0.
  Setting ``opt.learning_rate`` (a number, or a schedule) between steps works as MLX's,
  except that a number replaces a schedule (MLX's would overwrite it at the next step).
  A number set here reaches mithril unrounded; a value MLX holds as an array (a schedule's,
  or one written into ``state["learning_rate"]``) is its float32 value, as MLX uses. A rate
  set on the mithril side (a mithril scheduler of ``opt.mithril_optimizer``, its
  ``set_learning_rate``) is followed, unless one was set here since.
* A call that raises (a mismatched tree, shape or dtype, a bad learning rate, a non-finite
  step under ``nonfinite="raise"``) changes neither the parameters nor the state.
* Checkpoints: :meth:`MlxOptimizer.state_dict` / :meth:`load_state_dict` (mithril's
  state dict: hyperparameters, the step count and NumPy slots) and
  :meth:`save` / :meth:`load` (a safetensors file through
  :func:`mithril.utils.checkpoint.save_checkpoint`, no pickle). A resumed run continues
  bit for bit; an MLX schedule, being code, is given again to the new wrapper.
* :meth:`MlxOptimizer.ema_params`, :meth:`~MlxOptimizer.swa_params` and, for a
  schedule-free optimizer, :meth:`~MlxOptimizer.eval_params` give those parameters as an
  MLX tree (to evaluate: ``y = model.parameters(); model.update(opt.eval_params())``, then
  ``model.update(y)`` before the next update, which reads the model's weights).
* The update runs eagerly on the host: call it outside ``mx.compile`` / ``mx.vmap``
  (compile the loss-and-gradient function; a traced array is refused by name).
* An optimizer whose ``update`` needs ``loss=`` (loss-aware ones) takes it as
  ``opt.update(model, grads, loss=loss)``. One that evaluates the loss itself (LBFGS, SAM)
  takes ``closure=``: a function of a parameter tree returning ``(loss, gradients)`` there,
  as ``nn.value_and_grad`` gives them (``model.update(params)`` then the loss and gradients:
  ``update`` puts the model's parameters back if the step raises); LBFGS takes
  ``gradients=None`` (the closure gives them).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map_with_path, tree_unflatten

from ..errors import KeyMismatchError
from ..utils.optimizers import Optimizer
from ..utils.optimizers.checks import check_positive

#: the MLX dtypes NumPy holds (an ``mx.array`` of another, bfloat16, cannot cross)
_DTYPES = (mx.float16, mx.float32, mx.float64)


def _host(where: str, flat: dict[str, Any], names: Any = None) -> dict[str, np.ndarray]:
    """The ``mx.array`` leaves ``names`` (default: all) of flattened tree ``where`` as NumPy
    arrays over their memory (read only by mithril: it copies parameters in), evaluated
    together first (one graph evaluation for all the gradients)."""
    names = list(flat) if names is None else names
    for n in names:
        a = flat[n]
        if not isinstance(a, mx.array):
            raise TypeError(f"{where}['{n}'] is a {type(a).__name__}, not an mx.array")
        if a.dtype not in _DTYPES:
            raise TypeError(f"{where}['{n}'] has dtype {a.dtype}: mlx_optimizer takes float16, "
                            f"float32 or float64 (NumPy has no bfloat16: keep float32 master "
                            f"weights, e.g. model.set_dtype(mx.float32))")
    try:
        mx.eval([flat[n] for n in names])
    except ValueError as e:  # placeholders of mx.compile / vmap: nothing to read yet
        raise ValueError(f"{where} cannot be read ({e}): mlx_optimizer steps on the host, so "
                         f"call its update outside mx.compile / vmap (compile the "
                         f"loss-and-gradient function instead)") from None
    return {n: np.asarray(flat[n]) for n in names}


def _flat(tree: Any, where: str) -> dict[str, Any]:
    if isinstance(tree, nn.Module):
        tree = tree.parameters()
    if not isinstance(tree, (dict, list, tuple)):
        raise TypeError(f"{where} must be a tree (dict / list) of mx.array, got "
                        f"{type(tree).__name__}")
    pairs = tree_flatten(tree)
    flat = dict(pairs)
    if len(flat) != len(pairs):  # ({"a.b": x, "a": {"b": y}}: one name for two leaves)
        seen: set[str] = set()
        twice = sorted({n for n, _ in pairs if n in seen or seen.add(n)})
        raise KeyMismatchError(f"{where} names {twice} twice (a key with a '.' and a "
                               f"subtree of the same dotted path)")
    return flat


def _number(x: Any, what: str) -> Any:
    """``x`` (a loss) as a Python number where it is a one-element ``mx.array``."""
    if not isinstance(x, mx.array):
        return x
    if x.size != 1:  # (MLX's own item() error would not say which argument)
        raise ValueError(f"{what} must be a scalar, got an mx.array of shape {x.shape}")
    return x.item()


def _host_closure(closure: Callable[[Any], Any], dtypes: dict[str, Any]) -> Callable:
    """``closure`` (MLX trees in and out) as mithril's: NumPy params -> (loss, gradients)."""
    def host(params: Any) -> Any:
        out = closure(tree_unflatten([(n, mx.array(v, dtype=dtypes[n]))
                                      for n, v in params.items()]))
        pair = isinstance(out, tuple) and len(out) == 2
        where = "the closure's gradients"
        grads = _host(where, _flat(out[1] if pair else out, where))
        return (_number(out[0], "the closure's loss"), grads) if pair else grads

    return host


class MlxOptimizer(optim.Optimizer):
    """A mithril optimizer behind MLX's optimizer interface; see the module docs.
    ``mithril_optimizer`` / ``mithril_state`` are the wrapped optimizer and its
    :class:`~mithril.utils.optimizers.OptimizerState` (``None`` before the first step)."""

    def __init__(self, optimizer: Optimizer,
                 learning_rate: float | Callable[[mx.array], mx.array] | None = None) -> None:
        if not isinstance(optimizer, Optimizer) or type(optimizer) is Optimizer:
            raise TypeError(f"mlx_optimizer needs a mithril optimizer (e.g. Adam()), got "
                            f"{type(optimizer).__name__}")
        super().__init__()
        self.mithril_optimizer = optimizer
        self.mithril_state: Any = None
        self._params: dict[str, np.ndarray] | None = None  # what mithril returned last
        self._returned: dict[str, mx.array] = {}  # ... and what this wrapper made of it
        self._shape: Any = None  # the user's tree of the last step that named every parameter
        self._peak = abs(float(optimizer.learning_rate or 0.0))  # (the largest rate seen)
        self.learning_rate = optimizer.learning_rate if learning_rate is None else learning_rate
        # (the state's rate and the mithril optimizer's when they last agreed: a rate changed
        # on the mithril side since, by its scheduler, is followed; MLX's side wins if both)
        self._synced = (self._state["learning_rate"], optimizer.learning_rate)
        self._initialized = True  # (MLX's per-parameter init is not used)

    # -- MLX's interface ----------------------------------------------------------------
    @property
    def state(self) -> dict[str, Any]:
        """MLX's keys: ``step`` (uint64) and ``learning_rate`` (as MLX's: a schedule's value
        at the last step)."""
        return self._state

    @state.setter
    def state(self, state: dict) -> None:
        raise AttributeError("mlx_optimizer's state holds only step and learning_rate; "
                             "restore a checkpoint with load_state_dict(d) or load(path)")

    @property
    def learning_rate(self) -> mx.array:
        return self._state["learning_rate"]

    @learning_rate.setter
    def learning_rate(self, value: float | mx.array | Callable[[mx.array], mx.array]) -> None:
        if callable(value):  # an MLX schedule: evaluated at each update's step count
            first = self._checked_lr(self._scheduled(value, self.step))
            self._schedulers["learning_rate"] = value
            self._state["learning_rate"] = arr = mx.array(first)
        else:
            first = self._checked_lr(value)
            self._schedulers.pop("learning_rate", None)
            self._state["learning_rate"] = arr = value if isinstance(value, mx.array) \
                else mx.array(first)
        self._exact = (arr, first)  # (the number set, unrounded, while the state holds arr)
        self._peak = max(self._peak, first)

    def _scheduled(self, schedule: Callable[[mx.array], Any], step: mx.array) -> Any:
        """``schedule``'s rate at ``step``; one below 0 by MLX's float32 rounding, within
        2⁻²⁰ of the largest rate of the run, is 0 (MLX's ``linear_schedule(1e-2, 0, T)``
        ends at −9.3e-10; MLX steps with it, a negative rate is refused here)."""
        v = schedule(step)
        x = v.item() if isinstance(v, mx.array) and v.size == 1 else v
        if isinstance(x, float) and -self._peak * 2.0**-20 <= x < 0:
            return mx.array(0.0)
        return v

    @staticmethod
    def _checked_lr(value: Any) -> float:
        if isinstance(value, mx.array):
            if value.size != 1:
                raise ValueError(f"learning_rate must be a scalar, got shape {value.shape}")
            value = value.item()
        return check_positive("learning_rate", value)

    def init(self, parameters: Any) -> None:
        """Make the mithril state for ``parameters`` (a tree or an ``nn.Module``), as MLX's
        ``init``: optional, the first update makes it from the gradients' names."""
        flat = _host("parameters", _flat(parameters, "parameters"))
        if self.mithril_state is not None:
            if set(flat) != set(self.mithril_state.layout.names):
                raise KeyMismatchError(f"init: the optimizer already holds parameters "
                                       f"{sorted(self.mithril_state.layout.names)}")
            return
        self.mithril_state = self.mithril_optimizer.init(flat)

    def update(self, model: nn.Module, gradients: Any, *, loss: Any = None,
               closure: Callable[[Any], Any] | None = None) -> None:
        """Apply ``gradients`` to ``model``'s parameters (``model.update``), as MLX's."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"update: model must be an mlx.nn.Module, got "
                            f"{type(model).__name__} (a tree of parameters: apply_gradients)")
        before = model.parameters()  # (references: a closure may move the model)
        try:
            model.update(self.apply_gradients(gradients, model, loss=loss, closure=closure))
        except BaseException:
            model.update(before)
            raise

    def apply_gradients(self, gradients: Any, parameters: Any, *, loss: Any = None,
                        closure: Callable[[Any], Any] | None = None) -> Any:
        """One mithril step; returns the updated parameters in the gradients' tree structure.
        ``parameters`` (a tree or an ``nn.Module``) may be a superset of the gradients.
        ``closure``: for an optimizer that evaluates the loss itself (see the module docs);
        with ``gradients=None`` all its parameters are returned."""
        opt = self.mithril_optimizer
        if closure is not None and "closure" not in inspect.signature(opt.update).parameters:
            raise TypeError(f"closure: {type(opt).__name__} takes gradients only")
        grads_mx = {} if gradients is None and closure else _flat(gradients, "gradients")
        params_mx = _flat(parameters, "parameters")
        state = self.mithril_state
        names = (list(state.layout.names) if state is not None else
                 list(grads_mx) if gradients is not None else list(params_mx))
        out_names = list(grads_mx) if gradients is not None else names
        missing = sorted(n for n in {*names, *grads_mx} if n not in params_mx)
        if missing:
            raise KeyMismatchError(f"parameters has no {missing} (the gradients' or the "
                                   f"optimizer's parameter(s))")
        grads = _host("gradients", grads_mx)
        params = _host("parameters", params_mx, names)
        if self._params is not None and all(
                params_mx[n] is self._returned.get(n) and np.array_equal(params[n], self._params[n])
                for n in names):
            # the model holds the last step's arrays, unchanged (one edited in place, a[i] = v,
            # is the same object with other values): nothing to copy in
            params = self._params
        sched = self._schedulers.get("learning_rate")
        lr_arr = self._scheduled(sched, self.step) if sched is not None \
            else self._state["learning_rate"]
        if sched is None and lr_arr is self._synced[0] and opt.learning_rate != self._synced[1]:
            lr = opt.learning_rate  # (set on the mithril side: a mithril scheduler's)
            lr_arr = mx.array(lr)
        else:
            lr = self._exact[1] if lr_arr is self._exact[0] else self._checked_lr(lr_arr)
            lr_arr = lr_arr if isinstance(lr_arr, mx.array) else mx.array(lr)  # (a callable's)
        kw: dict[str, Any] = {} if loss is None else {"loss": _number(loss, "loss")}
        if closure is not None:
            kw["closure"] = _host_closure(closure, {n: params_mx[n].dtype for n in names})
        old = opt.learning_rate
        try:
            if lr != old:
                opt.learning_rate = lr
            if state is None:
                state = opt.init(params)
            new, state = opt.update(params, None if gradients is None else grads, state, **kw)
        except BaseException:
            if opt.learning_rate != old:
                opt.learning_rate = old  # a refused call changes nothing
            raise
        self.mithril_state, self._params = state, new
        self._state["step"] = mx.array(state.step, mx.uint64)
        self._state["learning_rate"] = lr_arr
        self._exact = self._synced = (lr_arr, lr)
        self._peak = max(self._peak, lr)
        # (copies: mithril overwrites its buffer at the next step)
        self._returned = {n: mx.array(new[n], dtype=params_mx[n].dtype) for n in out_names}
        # (the gradients' very structure, as MLX's tree_map: tuples stay tuples, a dict with
        # keys "0", "1" stays a dict)
        tree = (None if gradients is None else
                gradients.parameters() if isinstance(gradients, nn.Module) else gradients)
        if tree is not None and len(grads_mx) == len(names):
            self._shape = tree  # (ema_params() & co. give their trees this structure)
        if tree is None:
            return tree_unflatten(list(self._returned.items())) if out_names else {}
        return tree_map_with_path(lambda n, _: self._returned[n], tree)

    # -- the optimizer's other parameter sets, as MLX trees -------------------------------
    def ema_params(self) -> Any:
        """The EMA of the parameters (``ema_decay=``), a tree of new ``mx.array``."""
        return self._tree(lambda o, s: o.ema_params(s))

    def swa_params(self) -> Any:
        """The SWA average (``swa_start=``), a tree of new ``mx.array``."""
        return self._tree(lambda o, s: o.swa_params(s))

    def eval_params(self) -> Any:
        """A schedule-free optimizer's evaluation parameters (``x``) at the last step's."""
        def get(o: Any, s: Any) -> Any:
            if not callable(getattr(o, "eval_params", None)):
                raise TypeError(f"eval_params: {type(o).__name__} is not schedule-free "
                                f"(ScheduleFree(base), ScheduleFreeAdamW, ... are): its "
                                f"parameters are those to evaluate with")
            return o.eval_params(s, self._params)

        return self._tree(get)

    def _tree(self, get: Callable[[Any, Any], Any]) -> Any:
        if self.mithril_state is None:
            raise ValueError("no step yet: the optimizer holds no parameters")
        dtype = getattr(mx, self.mithril_state.layout.dtype)
        got = {n: mx.array(v, dtype=dtype)
               for n, v in get(self.mithril_optimizer, self.mithril_state).items()}
        if self._shape is not None and {n for n, _ in tree_flatten(self._shape)} == set(got):
            # (the parameters' own structure: tuples stay tuples, digit-keyed dicts dicts)
            return tree_map_with_path(lambda n, _: got[n], self._shape)
        return tree_unflatten(list(got.items()))

    # -- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The mithril optimizer's state dict (hyperparameters, the learning rate of the
        last step included; with a state, its step count and NumPy slots)."""
        return self.mithril_optimizer.state_dict(self.mithril_state)

    def load_state_dict(self, d: Any, parameters: Any = None) -> None:
        """Restore :meth:`state_dict`'s ``d``: its state is rebuilt for ``parameters`` (a
        tree or module, of which those ``d`` holds slots for; default: those of the last
        step). Checked first, nothing changed on error."""
        if parameters is not None:  # (those of the saved slots: a model's frozen ones left out)
            flat = _flat(parameters, "parameters")
            slots = d.get("slots") if isinstance(d, dict) else None
            saved = next(iter(slots.values()), None) if isinstance(slots, dict) else None
            missing = sorted(set(saved) - set(flat)) if isinstance(saved, dict) else []
            if missing:
                raise KeyMismatchError(f"load_state_dict: parameters has no {missing} (the "
                                       f"state dict's: is it another model's?)")
            params = _host("parameters", flat,
                           [n for n in flat if not isinstance(saved, dict) or n in saved])
        elif self._params is not None:
            params = self._params
        else:
            params = None
        if params is None and isinstance(d, dict) and "slots" in d:
            raise ValueError("load_state_dict: give the parameters (a tree or the model) to "
                             "rebuild the optimizer state for")
        state = self.mithril_optimizer.load_state_dict(d, params)
        self._restored(state, params)

    def save(self, path: str | os.PathLike) -> None:
        """Write the optimizer (hyperparameters, step count, slots and the parameters it
        stepped last) to the safetensors file ``path``, atomically."""
        from ..utils.checkpoint import save_checkpoint

        save_checkpoint(path, self._params or {}, self.mithril_optimizer, self.mithril_state)

    def load(self, path: str | os.PathLike) -> None:
        """Restore what :meth:`save` wrote; checked first, nothing changed on error."""
        from ..utils.checkpoint import load_checkpoint

        got = load_checkpoint(path, self._params, self.mithril_optimizer)
        self._restored(got["state"], got["params"])

    def _restored(self, state: Any, params: Any) -> None:
        self.mithril_state, self._params = state, (params if state is not None else None)
        self._returned = {}
        self._state["step"] = mx.array(0 if state is None else state.step, mx.uint64)
        sched, lr = self._schedulers.get("learning_rate"), self.mithril_optimizer.learning_rate
        if sched is not None:  # the last step's value, as MLX's state shows (step 0's at 0)
            arr = self._scheduled(sched, mx.array(max(int(self.step) - 1, 0), mx.uint64))
            lr = self._checked_lr(arr)
        else:
            arr = mx.array(lr)
        self._state["learning_rate"], self._exact = arr, (arr, lr)
        self._synced = (arr, self.mithril_optimizer.learning_rate)
        self._peak = max(self._peak, lr)


def mlx_optimizer(optimizer: Optimizer,
                  learning_rate: float | Callable[[mx.array], mx.array] | None = None
                  ) -> MlxOptimizer:
    """``optimizer`` (a mithril optimizer) as an ``mlx.optimizers.Optimizer``;
    ``learning_rate``: a number or an MLX schedule (default: the optimizer's own)."""
    return MlxOptimizer(optimizer, learning_rate)
