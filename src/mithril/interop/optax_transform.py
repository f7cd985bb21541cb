"""Any mithril optimizer as an ``optax.GradientTransformation``.

:func:`optax_transformation` turns an elementwise mithril optimizer (one that states
``slots``, ``scalars(step)`` and its ``math``; :mod:`mithril.utils.optimizers`) into a
transformation any JAX / Flax training loop takes: ``init`` and ``update`` are pure
functions of pytrees, jittable, and compose in ``optax.chain``; the numbers are the
optimizer's own (the same elementwise math, prologue and per-step scalars the JAX engine
runs)::

    import jax
    import jax.numpy as jnp
    import optax
    from mithril.interop import optax_transformation
    from mithril.utils.optimizers import Adam

    params = {"layer": {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}}
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax_transformation(Adam(learning_rate=1e-2, weight_decay=1e-4)))
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state):
        grads = jax.grad(lambda p: sum(jnp.sum(x**2) for x in jax.tree.leaves(p)))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

How it works:

* **State** (:class:`OptaxState`, a pytree): ``count`` (int32, the steps taken), ``slots``
  (slot name -> a pytree like the params: ``"m"``, ``"v"``, ..., and ``"ema"`` / ``"swa"``
  with weight averaging), ``tensor_slots`` (a two-pass optimizer's per-tensor slots: a pytree
  of 0-d arrays), ``values`` (its optimizer-wide scalars) and ``hyperparams``
  (``{"learning_rate": ...}``, as ``optax.inject_hyperparams`` keeps it).
* **Learning rate.** By default it is read from ``state.hyperparams["learning_rate"]``
  (initially the optimizer's): set it between steps (``state.hyperparams["learning_rate"]
  = 0.01``, a Python float or a 0-d array) and nothing recompiles. Or give
  ``learning_rate=`` a number, or an optax schedule (a function of the 0-based step count),
  or wrap the factory in ``optax.inject_hyperparams(optax_transformation)(opt,
  learning_rate=...)``. Parameter groups keep their ``lr_scale`` relative to it.
* **Per-step scalars** (bias corrections, ...) come from the step count in the state.
  Where the optimizer's ``scalars(step)`` is plain arithmetic (most are: ``1 - b**step``)
  it is traced with the step as a JAX value, so the update is one XLA program: ``math.sqrt``
  & co. in it run as their ``jnp`` versions, and ``b ** step`` as ``exp(step·ln b)``, with
  ``1 − b**step`` as ``−expm1(step·ln b)`` (float32 keeps the relative precision of
  ``1 − βᵗ``, which ``jnp.power(float32(β), t)`` would lose); they are float32 unless
  ``jax_enable_x64`` is on (the engines compute them in float64: the results differ by
  float32 rounding, ~1e-7 relative). Where ``scalars`` has Python control flow on the step
  (``0.0 if step == 1 else ...``: SGD with momentum, RAdam, NAdam, Adan, ADOPT, ASGD,
  Lookahead), they are computed on the host in float64 by a ``jax.pure_callback`` (still
  pure and jittable; the engines' very scalars, at the price of one small host round trip
  per step, and not differentiable with respect to the learning rate). Which one an
  optimizer gets is checked once (tracing, then comparing a few steps with the host's
  values); ``scalars="host"`` / ``"traced"`` force either, and :func:`scalars_on_host`
  says which ``"auto"`` picks, and why.
* **Everything else of the base class**, per leaf (no flat buffer): ``clip_norm`` (on the
  global norm over all leaves), ``clip_value``, coupled or decoupled ``weight_decay``,
  ``param_groups`` / ``weight_decay_mask`` / ``exclude_weight_decay`` (parameter names are
  the key paths, ``"layer/w"``), weight averaging (``ema_decay``, ``swa_start``: the
  averages are ``state.slots["ema"]`` / ``["swa"]``), two-pass optimizers (LAMB, LARS,
  Novograd: the per-tensor sums are per leaf) and ``nonfinite="skip"`` (a step with a
  non-finite gradient, or giving non-finite values, returns zero updates and leaves the
  state as it was, the count included). ``nonfinite="raise"`` cannot raise inside
  ``jax.jit`` and is refused. Leaves may have different floating-point dtypes.
* The update returned is ``new_params − params`` (``optax.apply_updates`` then gives the
  optimizer's new parameters, exactly for any ordinary step size).
* The optimizer is copied when the transformation is made: changing its hyperparameters
  afterwards does not change the transformation (the learning rate lives in the state).

Optimizers that override ``init``/``update`` entirely (no elementwise math: LBFGS, ...)
are refused with a ``TypeError`` naming them; :class:`~mithril.utils.optimizers.Lookahead`
(whose ``init`` only adds the slow weights, a copy of the params) is supported.
"""

from __future__ import annotations

import copy
import functools
import math
import types
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

__all__ = ["OptaxState", "optax_transformation", "scalars_on_host"]

_MODES = ("auto", "traced", "host")
_INT32_MAX = 2**31 - 1


class OptaxState(NamedTuple):
    """The state :func:`optax_transformation`'s ``init`` returns (a pytree)."""

    count: Any
    slots: dict[str, Any]
    tensor_slots: dict[str, Any]
    values: dict[str, Any]
    hyperparams: dict[str, Any]


# -- what an optimizer must be -------------------------------------------------------------
def _check_optimizer(optimizer: Any) -> None:
    from ..utils.optimizers.base import Optimizer

    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optax_transformation needs a mithril optimizer "
                        f"(mithril.utils.optimizers), got {type(optimizer).__name__}")
    cls, name = type(optimizer), type(optimizer).__name__
    below = cls.__mro__[:cls.__mro__.index(Optimizer)]
    own_update = [c.__name__ for c in below if "update" in c.__dict__]
    own_init = [c.__name__ for c in below if "init" in c.__dict__ and not _is_lookahead(c)]
    if own_update:
        raise TypeError(
            f"{name} overrides update() (in {own_update[0]}): its step is not only the "
            f"elementwise math (slots, scalars(step), math) that an optax transformation "
            f"runs, so it cannot be one; use it through its own init/update")
    if own_init:
        raise TypeError(
            f"{name} overrides init() (in {own_init[0]}): its state is not only the slots an "
            f"optax transformation builds (each filled with slot_init, the weight averages "
            f"with the params), so it cannot be one; use it through its own init/update")
    has_math = (cls.kernel_math is not Optimizer.kernel_math or cls.math is not Optimizer.math)
    if not has_math:
        raise TypeError(f"{name} defines no math (neither math nor kernel_math): nothing to run "
                        f"as an optax transformation")
    if optimizer.nonfinite == "raise":
        raise ValueError(f"{name}(nonfinite='raise') cannot raise inside jax.jit: use "
                         f"nonfinite='skip' (or 'propagate', the default, with "
                         f"optax.apply_if_finite)")


def _is_lookahead(cls: type) -> bool:
    try:
        from ..utils.optimizers.lookahead import Lookahead
    except ImportError:  # pragma: no cover - an older tree
        return False
    return issubclass(cls, Lookahead)


def _copied_slots(opt: Any) -> tuple[str, ...]:
    """The slots that start as a copy of the params: the weight averages, and Lookahead's
    slow weights."""
    out = tuple(opt.averaged_slots())
    if _is_lookahead(type(opt)):
        out += tuple(s for s in opt.slot_names() if s == "slow")
    return out


# -- tracing the optimizer's scalars(step) ---------------------------------------------------
def _jnp_math() -> dict[str, Callable]:
    import jax.numpy as jnp

    return {"sqrt": jnp.sqrt, "exp": jnp.exp, "log": jnp.log, "log1p": jnp.log1p,
            "expm1": jnp.expm1, "log2": jnp.log2, "log10": jnp.log10, "pow": jnp.power,
            "fabs": jnp.abs, "sin": jnp.sin, "cos": jnp.cos, "tan": jnp.tan,
            "tanh": jnp.tanh, "atan": jnp.arctan, "floor": jnp.floor, "ceil": jnp.ceil,
            "isfinite": jnp.isfinite, "isnan": jnp.isnan, "isinf": jnp.isinf,
            "copysign": jnp.copysign, "hypot": jnp.hypot}


def _on_numbers(real: Callable, traced: Callable) -> Callable:
    @functools.wraps(real)
    def fn(*args: Any) -> Any:
        if all(isinstance(a, (int, float)) for a in args):  # Python / NumPy numbers
            return real(*args)
        return traced(*map(_value, args))

    return fn


def _value(x: Any) -> Any:
    """``x``, a :class:`_Step` or :class:`_Power` as the JAX value it stands for."""
    return x.value() if isinstance(x, (_Step, _Power)) else x


def _lifted(name: str, reflected: bool = False) -> Callable:
    """The operator ``name`` on the JAX value a wrapper stands for."""
    import operator

    op = getattr(operator, name)
    if reflected:
        return lambda self, other: op(_value(other), self.value())
    return lambda self, *other: op(self.value(), *map(_value, other))


_OPS = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow")
_UNARY = ("neg", "pos", "abs", "eq", "ne", "lt", "le", "gt", "ge")


def _with_operators(cls: type) -> type:
    """Every arithmetic operator and comparison ``cls`` does not define itself goes to the
    JAX value (so ``if step == 1`` fails as on any traced value: not traceable)."""
    for name in _OPS:
        for dunder, reflected in ((f"__{name}__", False), (f"__r{name}__", True)):
            if dunder not in cls.__dict__:
                setattr(cls, dunder, _lifted(name, reflected))
    for name in _UNARY:
        if f"__{name}__" not in cls.__dict__:
            setattr(cls, f"__{name}__", _lifted(name))
    cls.__hash__ = None  # type: ignore[assignment] - a step is no dict key (ASGD's lrs)
    cls.__bool__ = lambda self: bool(self.value())  # type: ignore[attr-defined] - raises
    return cls


@_with_operators
class _Step:
    """The traced step count as ``scalars(step)`` sees it. ``b ** step`` (also
    ``b ** (step + 1)``) becomes a :class:`_Power`; any other use is the int32 value's."""

    def __init__(self, t: Any) -> None:
        self.t = t

    def value(self) -> Any:
        return self.t

    def __add__(self, k: Any) -> Any:
        return _Step(self.t + k) if isinstance(k, int) else self.t + _value(k)

    __radd__ = __add__

    def __sub__(self, k: Any) -> Any:
        return _Step(self.t - k) if isinstance(k, int) else self.t - _value(k)

    def __rpow__(self, base: Any) -> Any:
        if isinstance(base, (int, float)) and base > 0:
            return _Power(float(base), self.t)
        return _value(base) ** self.t


@_with_operators
class _Power:
    """``base ** t`` for a Python ``base > 0`` and the traced step ``t``, computed as
    ``exp(t·ln base)`` with ``ln base`` taken in float64 on the host, and ``c − base**t``
    as ``(c − 1) − expm1(t·ln base)``: the bias corrections ``1 − βᵗ`` keep their relative
    precision in float32 (``jnp.power(float32(β), t)`` loses ~1e-5 of it for β near 1: β's
    own rounding, compounded t times, cancels in ``1 − βᵗ``)."""

    def __init__(self, base: float, t: Any) -> None:
        self.log_base, self.t = math.log(base), t

    def exponent(self) -> Any:
        return self.t * self.log_base

    def value(self) -> Any:
        import jax.numpy as jnp

        return jnp.exp(self.exponent())

    def __rsub__(self, c: Any) -> Any:
        import jax.numpy as jnp

        if isinstance(c, (int, float)):
            return (c - 1) - jnp.expm1(self.exponent())
        return _value(c) - self.value()

    def __sub__(self, c: Any) -> Any:
        import jax.numpy as jnp

        if isinstance(c, (int, float)):
            return jnp.expm1(self.exponent()) + (1 - c)
        return self.value() - _value(c)


class _MathShim(types.ModuleType):
    """``math`` whose functions take JAX values too (Python numbers still go to ``math``)."""

    def __init__(self) -> None:
        super().__init__("math")
        for name, fn in _jnp_math().items():
            setattr(self, name, _on_numbers(getattr(math, name), fn))

    def __getattr__(self, name: str) -> Any:
        return getattr(math, name)


@functools.cache
def _traceable(fn: Callable) -> Callable:
    """``fn`` with ``math`` (and functions imported from it) in its globals replaced by
    versions that take JAX values: the optimizer's source is not changed."""
    if not isinstance(fn, types.FunctionType):
        return fn
    g = fn.__globals__
    shim = _MathShim()
    swap = {k: shim for k, v in g.items() if v is math}
    swap.update({k: getattr(shim, v.__name__) for k, v in g.items()
                 if isinstance(v, types.BuiltinFunctionType)
                 and getattr(v, "__module__", None) == "math" and v.__name__ in _jnp_math()})
    if not swap:
        return fn
    new = types.FunctionType(fn.__code__, {**g, **swap}, fn.__name__, fn.__defaults__,
                             fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    return new


def _scalars(view: Any, step: Any) -> tuple[Any, ...]:
    fn = getattr(type(view), "scalars", None)
    if not isinstance(fn, types.FunctionType):  # pragma: no cover - a non-function scalars
        fn = type(view).scalars
    return tuple(map(_value, _traceable(fn)(view, _Step(step))))


def _averaging_weights(opt: Any, t: Any) -> list[Any]:
    """:func:`mithril.utils.optimizers.averaging.weights` for a traced step ``t`` (int32)."""
    import jax.numpy as jnp

    k = min(int(getattr(opt, "ema_every", 1)), _INT32_MAX)
    out = []
    if getattr(opt, "ema_decay", None) is not None:
        decay = 1.0 - opt.ema_decay
        out.append(jnp.where(t % k != 0, 0.0, jnp.where(t // k == 1, 1.0, decay)))
    if getattr(opt, "swa_start", None) is not None:
        s = opt.swa_start
        if s > _INT32_MAX:
            out.append(jnp.zeros(()))
        else:  # updates before this one: the multiples of k in [s, t - 1]
            done = (t - 1) // k - (s - 1) // k
            out.append(jnp.where((t < s) | (t % k != 0), 0.0, 1.0 / (done + 1)))
    return out


def _static_prologue(view: Any) -> tuple[float, float, float]:
    """(clip_value or 0, coupled L2 factor, decoupled weight decay) of a group's view, as
    :func:`~mithril.utils.optimizers.engines.common.prologue` applies them."""
    cv = float(view.clip_value or 0.0)
    if view.weight_decay_in_math:
        return cv, 0.0, 0.0
    if view.decoupled_weight_decay:
        return cv, 0.0, float(view.weight_decay)
    return cv, float(view.weight_decay), 0.0


def _traced_row(view: Any, scale: float, t: Any, lr: Any) -> list[Any]:
    """(decoupled keep factor, *full scalars) of one group for step ``t`` (traced)."""
    v = copy.copy(view)
    v.learning_rate = lr * scale
    scal = [*_scalars(v, t), *_averaging_weights(v, t)]
    keep = 1.0 - scal[0] * _static_prologue(v)[2]
    return [keep, *scal]


def _host_rows(views: list[Any], scales: list[float], t: int, lr: float) -> np.ndarray:
    """The same rows in float64, computed by the optimizer itself (the JAX engine's)."""
    rows = []
    for v, s in zip(views, scales):
        v.learning_rate = lr * s
        scal = v.full_scalars(t)
        rows.append((1.0 - scal[0] * _static_prologue(v)[2], *scal))
    return np.array(rows, dtype=np.float64)


def _probe(views: list[Any], scales: list[float]) -> str | None:
    """Why the scalars cannot be traced (None when they can and agree with the host's)."""
    import jax
    import jax.numpy as jnp

    def rows(t: Any, lr: Any) -> Any:
        return [jnp.stack([jnp.asarray(x, dtype=jnp.result_type(float)) for x in
                           _traced_row(v, s, t, lr)]) for v, s in zip(views, scales)]

    lr0 = float(views[0].learning_rate) or 1e-3
    try:
        jax.make_jaxpr(rows)(np.int32(1), np.float32(lr0))
    except Exception as e:  # noqa: BLE001 - any failure: compute them on the host
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"{type(views[0]).__name__}.scalars(step) is not traceable ({type(e).__name__}: {first[:160]})"
    fresh = [copy.copy(v) for v in views]
    with jax.ensure_compile_time_eval():
        for t in (1, 2, 3, 10, 1000):
            got = np.array([np.asarray(r, dtype=np.float64)
                            for r in rows(jnp.int32(t), jnp.asarray(lr0))])
            want = _host_rows(fresh, scales, t, lr0)
            tol = 1e-12 if jax.config.jax_enable_x64 else 1e-5
            if got.shape != want.shape or not np.allclose(got, want, rtol=tol, atol=1e-30,
                                                          equal_nan=True):
                return (f"{type(views[0]).__name__}.scalars(step) traced gives other values "
                        f"than on the host (step {t})")
    return None


def scalars_on_host(optimizer: Any) -> str | None:
    """Why ``optimizer``'s per-step scalars would be computed on the host (a
    ``jax.pure_callback``) under ``scalars="auto"``, or None when they are traced into the
    update (plain arithmetic on the step)."""
    _check_optimizer(optimizer)
    opt = copy.copy(optimizer)
    return _probe([opt], [1.0])


# -- the per-structure plan -----------------------------------------------------------------
class _Plan:
    """What one parameter structure needs, worked out once per tree structure (names,
    groups, how the scalars are computed)."""

    def __init__(self, opt: Any, names: list[str], mode: str) -> None:
        from types import SimpleNamespace

        holder = SimpleNamespace(groups=None, layout=SimpleNamespace(name_list=names))
        index, views = opt.group_rows(holder)
        rows = holder.groups[2] if holder.groups is not None else [{}] * len(views)
        self.index = [int(i) for i in index]
        self.views = views
        self.scales = [float(r.get("lr_scale", 1.0)) for r in rows]
        self.static = [_static_prologue(v) for v in views]
        #: each row's (clip_tensor_norm, clip_block_rms), where any row clips per tensor
        clips = [(getattr(v, "clip_tensor_norm", None), getattr(v, "clip_block_rms", None))
                 for v in views]
        self.tensor_clip = clips if any(c != (None, None) for c in clips) else None
        self.host_views = [copy.copy(v) for v in views]  # kept: ASGD remembers lrs
        self.width = 1 + len(copy.copy(views[0]).full_scalars(1))  # keep factor, scalars
        reason = None if mode == "host" else _probe(views, self.scales)
        if mode == "traced" and reason is not None:
            raise TypeError(f"scalars='traced': {reason}; use scalars='auto' or 'host' (a "
                            f"host callback)")
        self.host = mode == "host" or reason is not None
        self.reason = reason


def _key_name(path: Any) -> str:
    import jax

    return jax.tree_util.keystr(path, simple=True, separator="/")


def _global_norm(leaves: list[Any]) -> Any:
    """‖g‖₂ over all leaves, scaled by max|g| as the JAX engine's (finite gradients whose
    squares overflow still have a finite norm)."""
    import jax.numpy as jnp

    if not leaves:
        return jnp.zeros((), jnp.float32)
    dt = jnp.result_type(*[jnp.promote_types(g.dtype, jnp.float32) for g in leaves])
    gs = [g.astype(dt) for g in leaves]
    a = jnp.max(jnp.stack([jnp.max(jnp.abs(g)) if g.size else jnp.zeros((), dt) for g in gs]))
    safe = jnp.where((a > 0) & jnp.isfinite(a), a, jnp.ones((), dt))
    scaled = safe * jnp.sqrt(sum(jnp.sum(jnp.square(g / safe)) for g in gs))
    return jnp.where(jnp.isfinite(a), scaled, jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in gs)))


def _tensor_clip_scales(plan: _Plan, grads: list[Any], dt: Any) -> tuple[list, list]:
    """Each tensor's factor from ``clip_tensor_norm`` (Keras ``clipnorm``: ``c / max(‖g‖,
    c)``) then ``clip_block_rms`` (optax ``clip_by_block_rms``: ``1 / max(1, rms(g) / c)``),
    as the engines' ``clipped_table``, and each tensor's Σ g²."""
    import jax.numpy as jnp

    factors, sumsq = [], []
    for i, g in enumerate(grads):
        w = g.astype(jnp.promote_types(g.dtype, jnp.float32))
        sq = jnp.sum(w * w).astype(dt)
        c_norm, c_rms = plan.tensor_clip[plan.index[i]]
        f = jnp.ones((), dt)
        if c_norm is not None:
            f = f * (c_norm / jnp.maximum(jnp.sqrt(sq), c_norm))
        if c_rms is not None:
            rms = jnp.sqrt(sq * f * f / max(int(np.prod(g.shape)), 1))
            f = f / jnp.maximum(1.0, rms / c_rms)
        factors.append(f)
        sumsq.append(sq)
    return factors, sumsq


def optax_transformation(optimizer: Any, *, learning_rate: Any = None,
                         scalars: str = "auto") -> Any:
    """``optimizer`` (an elementwise mithril optimizer) as an ``optax.GradientTransformation``
    whose ``init(params)`` / ``update(updates, state, params)`` are pure and jittable (see
    the module docs).

    ``learning_rate``: None (default) reads it from ``state.hyperparams["learning_rate"]``,
    initially the optimizer's (set it there between steps: nothing recompiles); a number or
    0-d array (what ``optax.inject_hyperparams`` passes) uses that; a callable is an optax
    schedule of the 0-based step count. ``scalars``: ``"auto"`` (traced where the
    optimizer's ``scalars(step)`` is arithmetic, else computed on the host by a
    ``jax.pure_callback``), ``"traced"`` (refuse otherwise) or ``"host"``."""
    import jax
    import jax.numpy as jnp
    import optax

    _check_optimizer(optimizer)
    if scalars not in _MODES:
        raise ValueError(f"scalars must be one of {_MODES}, got {scalars!r}")
    opt = copy.copy(optimizer)
    opt_name = type(opt).__name__
    own = tuple(opt.slot_names())
    full = tuple(opt.full_slot_names())
    copied = _copied_slots(opt)
    tensor_slots = tuple(opt.tensor_slots)
    two_pass = opt.two_pass()
    n_avg = len(full) - len(own)
    plans: dict[Any, _Plan] = {}

    def flatten(params: Any) -> tuple[list[Any], Any, list[str]]:
        with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
        leaves = [jnp.asarray(x) for _, x in with_path]
        for (path, _), x in zip(with_path, leaves):
            if not jnp.issubdtype(x.dtype, jnp.floating):
                raise TypeError(f"{opt_name}: params['{_key_name(path)}'] has dtype {x.dtype}; "
                                f"optimizers need floating-point parameters")
        return leaves, treedef, [_key_name(p) for p, _ in with_path]

    def plan_for(treedef: Any, names: list[str]) -> _Plan:
        plan = plans.get(treedef)
        if plan is None:
            plan = plans[treedef] = _Plan(opt, names, scalars)
        return plan

    def wide() -> Any:
        return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32

    def init(params: Any) -> OptaxState:
        leaves, treedef, _ = flatten(params)
        slots = {}
        for s in full:
            if s in copied:
                slots[s] = treedef.unflatten([jnp.array(p, copy=True) for p in leaves])
            else:
                v = opt.slot_init(s)
                slots[s] = treedef.unflatten([jnp.full(p.shape, v, p.dtype) for p in leaves])
        tensors = {s: treedef.unflatten([jnp.full((), opt.slot_init(s), p.dtype) for p in leaves])
                   for s in tensor_slots}
        values = {v: jnp.asarray(float(opt.state_value_init(v)), wide())
                  for v in opt.state_values}
        if learning_rate is None:
            lr = jnp.asarray(float(opt.learning_rate))  # weak-typed: a Python float set
        elif callable(learning_rate):                    # later does not recompile
            lr = jnp.asarray(learning_rate(jnp.zeros((), jnp.int32)))
        else:
            lr = jnp.asarray(learning_rate)
        return OptaxState(jnp.zeros((), jnp.int32), slots, tensors, values,
                          {"learning_rate": lr})

    def row_scalars(plan: _Plan, t: Any, lr: Any) -> list[list[Any]]:
        dt = wide()
        if plan.host:
            width = plan.width
            out_dt = np.dtype(dt)

            def callback(step: Any, rate: Any) -> np.ndarray:
                return _host_rows(plan.host_views, plan.scales, int(step),
                                  float(rate)).astype(out_dt)

            table = jax.pure_callback(
                callback, jax.ShapeDtypeStruct((len(plan.views), width), dt), t,
                jnp.asarray(lr, dt), vmap_method="sequential")
            return [[table[r, j] for j in range(width)] for r in range(len(plan.views))]
        return [[jnp.asarray(x, dt) for x in _traced_row(v, s, t, jnp.asarray(lr, dt))]
                for v, s in zip(plan.views, plan.scales)]

    def update(updates: Any, state: OptaxState, params: Any = None) -> tuple[Any, OptaxState]:
        if params is None:
            raise ValueError(f"{opt_name} as an optax transformation needs params: call "
                             f"update(updates, state, params)")
        if not isinstance(state, OptaxState):
            raise TypeError(f"state must be what this transformation's init returned "
                            f"(an OptaxState), got {type(state).__name__}")
        leaves, treedef, names = flatten(params)
        grads = [jnp.asarray(g) for g in treedef.flatten_up_to(updates)]
        for g, p, n in zip(grads, leaves, names):
            if g.shape != p.shape:
                raise ValueError(f"{opt_name}: the update for '{n}' has shape {g.shape}, the "
                                 f"parameter {p.shape}")
        plan = plan_for(treedef, names)
        slot_leaves = {s: treedef.flatten_up_to(state.slots[s]) for s in full}
        count = state.count
        t = count + 1
        if learning_rate is None:
            lr = state.hyperparams["learning_rate"]
        elif callable(learning_rate):
            lr = learning_rate(count)
        else:
            lr = learning_rate
        rows = row_scalars(plan, t, lr)
        n_full = len(rows[0]) - 1
        n_own = n_full - n_avg
        skip = opt.nonfinite == "skip"

        # the prologue: each tensor clipped by its own norm / RMS, then by the global norm
        # and by value, weight decay
        norm = _global_norm(grads) if (opt.clip_norm is not None or skip) else None
        scales = _tensor_clip_scales(plan, grads, wide()) if plan.tensor_clip else None
        factors: list[Any] = [None] * len(leaves)
        if scales is not None:
            if opt.clip_norm is not None:  # the clipped gradients' norm
                f, sq = scales
                clipped = jnp.sqrt(sum(s * x * x for s, x in zip(sq, f)))
                gscale = jnp.minimum(1.0, jnp.asarray(opt.clip_norm, clipped.dtype)
                                     / (clipped + 1e-6))
                factors = [x * gscale for x in f]
            else:
                factors = list(scales[0])
        elif opt.clip_norm is not None:
            gscale = jnp.minimum(1.0, jnp.asarray(opt.clip_norm, norm.dtype) / (norm + 1e-6))
            factors = [gscale] * len(leaves)
        gs, ps = [], []
        for i, (p, g) in enumerate(zip(leaves, grads)):
            r = plan.index[i]
            cv, l2, dwd = plan.static[r]
            g = g.astype(p.dtype)
            if factors[i] is not None:
                g = g * factors[i].astype(p.dtype)
            if cv > 0:
                c = jnp.asarray(cv, p.dtype)
                g = jnp.clip(g, -c, c)
            if l2:
                g = g + jnp.asarray(l2, p.dtype) * p
            gs.append(g)
            ps.append(p * rows[r][0].astype(p.dtype) if dwd else p)

        def own_scalars(i: int) -> list[Any]:
            return rows[plan.index[i]][1:1 + n_own]

        # two-pass optimizers: per-tensor sums, then tensor_scalars between the passes
        extra: list[Any] = []
        new_tensors: dict[str, Any] = {}
        new_values = dict(state.values)
        tensor_leaves = {s: treedef.flatten_up_to(state.tensor_slots[s]) for s in tensor_slots}
        if two_pass:
            dt = wide()
            n = len(leaves)
            sums: list[Any] = []
            if opt.reductions:
                reduce_fn = opt.reduce_math()
                per_leaf = []
                for i, (p, g) in enumerate(zip(ps, gs)):
                    scal = [x.astype(p.dtype) for x in own_scalars(i)]
                    terms = reduce_fn(p, g, *(slot_leaves[s][i] for s in own), *scal)
                    acc = jnp.promote_types(p.dtype, jnp.float32)
                    per_leaf.append([jnp.sum(jnp.asarray(x).astype(acc)).astype(dt)
                                     for x in terms])
                sums = [jnp.stack([per_leaf[i][k] for i in range(n)])
                        for k in range(opt.reductions)]
            cols = tuple(jnp.stack([own_scalars(i)[j] for i in range(n)]) for j in range(n_own))
            tens = {s: jnp.stack([x.astype(dt) for x in tensor_leaves[s]]) for s in tensor_slots}
            sizes = np.array([int(np.prod(p.shape, dtype=np.int64)) for p in leaves],
                             dtype=np.int64)
            try:
                ext, new_t, new_values = opt.tensor_scalars(t, tuple(sums), cols, dict(tens),
                                                            dict(state.values), sizes)
            except Exception as e:
                raise TypeError(f"{opt_name}.tensor_scalars does not run on traced JAX values "
                                f"({type(e).__name__}: {e}); it must use arithmetic and "
                                f"mithril.utils.optimizers.elementwise functions only") from e
            if set(new_t) != set(tensor_slots) or set(new_values) != set(opt.state_values):
                raise RuntimeError(f"{opt_name}.tensor_scalars must return every tensor slot "
                                   f"{sorted(tensor_slots)} and value {sorted(opt.state_values)}")
            extra = [jnp.broadcast_to(jnp.asarray(e, dt), (n,)) for e in ext]
            new_tensors = {s: [jnp.asarray(new_t[s], dt).reshape(n)[i].astype(leaves[i].dtype)
                               for i in range(n)] for s in tensor_slots}
            new_values = {k: jnp.asarray(v, dt) for k, v in new_values.items()}

        # the elementwise math, per leaf
        math_fn = opt.full_kernel_math(n_full + len(extra))
        new_ps: list[Any] = []
        new_slots: dict[str, list[Any]] = {s: [] for s in full}
        for i, (p, g) in enumerate(zip(ps, gs)):
            row = rows[plan.index[i]]
            scal = [*row[1:1 + n_own], *(e[i] for e in extra), *row[1 + n_own:]]
            out = math_fn(p, g, *(slot_leaves[s][i] for s in full),
                          *(x.astype(p.dtype) for x in scal))
            new_ps.append(jnp.asarray(out[0]).astype(p.dtype))
            for s, v in zip(full, out[1:]):
                new_slots[s].append(jnp.asarray(v).astype(p.dtype))

        new_count = jnp.minimum(count, _INT32_MAX - 1) + 1
        if skip:
            finite = jnp.isfinite(norm)
            for x in [*new_ps, *(v for vs in new_slots.values() for v in vs)]:
                finite = finite & jnp.all(jnp.isfinite(x))

            def pick(new: Any, old: Any) -> Any:
                return jnp.where(finite, new, old)

            new_ps = [pick(a, b) for a, b in zip(new_ps, leaves)]
            new_slots = {s: [pick(a, b) for a, b in zip(vs, slot_leaves[s])]
                         for s, vs in new_slots.items()}
            new_tensors = {s: [pick(a, b) for a, b in zip(vs, tensor_leaves[s])]
                           for s, vs in new_tensors.items()}
            new_values = {k: pick(v, state.values[k]) for k, v in new_values.items()}
            new_count = jnp.where(finite, new_count, count)

        out_updates = treedef.unflatten([a - b for a, b in zip(new_ps, leaves)])
        hyper = dict(state.hyperparams)
        if learning_rate is not None:
            hyper["learning_rate"] = jnp.asarray(lr)
        new_state = OptaxState(
            new_count,
            {s: treedef.unflatten(v) for s, v in new_slots.items()},
            {s: treedef.unflatten(new_tensors[s]) if two_pass else state.tensor_slots[s]
             for s in tensor_slots},
            new_values if two_pass else dict(state.values),
            hyper)
        return out_updates, new_state

    return optax.GradientTransformation(init, update)
