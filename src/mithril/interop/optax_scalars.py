"""The per-step scalars of :func:`~mithril.interop.optax_transformation` (``scalars(step)``,
learning rate first, then the weight averages' weights) and the per-structure plan: traced
into the update where ``scalars`` is plain arithmetic on the step (:class:`_Step` stands in
for it, ``math`` is swapped for a version taking JAX values), else computed on the host in
float64 by a ``jax.pure_callback`` (see :mod:`.optax_transform`'s docs). The state values
an optimizer's ``scalars`` reads (its ``scalar_values``: Prodigy's ``d``) are passed as
keyword arguments, traced or as arguments of the callback."""

from __future__ import annotations

import copy
import functools
import inspect
import math
import types
from collections.abc import Callable
from typing import Any

import numpy as np

from ..utils.optimizers.traced_ops import MathShim
from ..utils.optimizers.traced_ops import jnp_math as _jnp_math  # (optax_tensorwise's too)

_INT32_MAX = 2**31 - 1


# -- tracing the optimizer's scalars(step) ---------------------------------------------------
def _value(x: Any) -> Any:
    """``x``, a :class:`_Step`, :class:`_Power` or :class:`_Hyper` as the JAX value it
    stands for."""
    return x.value() if isinstance(x, (_Step, _Power, _Hyper)) else x


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
    # jnp.asarray takes it as its JAX value (schedule-free's warm-up)
    cls.__jax_array__ = lambda self: self.value()  # type: ignore[attr-defined]
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

    def __mod__(self, k: Any) -> Any:  # (a count since a period began: Lookahead's reset)
        return _Step(self.t % k) if isinstance(k, int) else self.t % _value(k)

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

    def __init__(self, base: float, t: Any, log_base: Any = None) -> None:
        self.log_base, self.t = math.log(base) if log_base is None else log_base, t

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


@_with_operators
class _Hyper:
    """A traced hyperparameter as ``scalars(step)`` sees it: the pair ``(hi, lo)`` whose
    sum is its float64 value (:func:`~mithril.interop.optax_hyperparams.pair`). ``c − h``
    is ``(c − hi) − lo`` and ``h ** step`` a :class:`_Power` of ``ln h = ln hi + lo/hi``,
    so ``1 − β`` and ``1 − βᵗ`` keep the precision the engines' float64 gives them (β₂ =
    0.999 as one float32 would make ``1 − β₂`` 1.3e-5 off); any other use is ``hi + lo``'s."""

    def __init__(self, hi: Any, lo: Any) -> None:
        self.hi, self.lo = hi, lo

    def value(self) -> Any:
        return self.hi + self.lo

    def log(self) -> Any:
        """``ln h`` as ``ln hi + lo/hi`` (float32's ``ln(hi + lo)`` loses ``lo``)."""
        import jax.numpy as jnp

        return jnp.log(self.hi) + self.lo / self.hi

    def __rsub__(self, c: Any) -> Any:
        if isinstance(c, (int, float)):
            return (c - self.hi) - self.lo
        return _value(c) - self.value()

    def __pow__(self, e: Any) -> Any:
        if isinstance(e, _Step):
            return _Power(1.0, e.t, self.log())
        return self.value() ** _value(e)


class _MathShim(MathShim):
    """``math`` whose functions take JAX values and this module's lazy scalars too."""

    def __init__(self) -> None:
        super().__init__(_value)


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


def offset_of(view: Any) -> int:
    """The ``step_offset`` of a group's view (0 for the optimizer's own row): its
    parameters joined after that many steps (see :mod:`~mithril.utils.optimizers.groups`)."""
    return int(getattr(view, "_step_offset", 0) or 0)


def row_count(step: Any, offset: int) -> Any:
    """The traced step ``step`` as a row of ``offset`` counts it: ``step − offset``, at
    least 1 (before its group joins the row's scalars are computed but not used: its
    parameters and slots are kept, see :func:`joined`)."""
    import jax.numpy as jnp

    return jnp.maximum(step - offset, 1) if offset else step


def joined(plan: Any, t: Any) -> list[Any] | None:
    """Per leaf: None where its row has no ``step_offset``, else whether the traced step
    ``t`` is past it (the leaf's group has joined); None for all when no row has one.
    Before its group joins, a leaf's gradient takes no part in the step (zeroed before the
    global norm) and its parameter and slots are kept, as torch leaves a parameter it was
    not yet given by ``add_param_group``."""
    if not any(plan.offsets):
        return None
    return [t > plan.offsets[r] if plan.offsets[r] else None for r in plan.index]


def _scalars(view: Any, step: Any, values: dict[str, Any] | None = None) -> tuple[Any, ...]:
    from ..utils.optimizers.state import scalar_arguments

    step = row_count(step, offset_of(view))  # (a group that joined later counts its own)
    fn = getattr(type(view), "scalars", None)
    if not isinstance(fn, types.FunctionType):  # pragma: no cover - a non-function scalars
        fn = type(view).scalars
    return tuple(map(_value, _traceable(fn)(view, _Step(step),
                                            **scalar_arguments(view, values))))


def _averaging_weights(opt: Any, t: Any) -> list[Any]:
    """:func:`mithril.utils.optimizers.averaging.weights` for a traced step ``t`` (int32)."""
    import jax.numpy as jnp

    k = min(int(getattr(opt, "ema_every", 1)), _INT32_MAX)
    out = []
    if getattr(opt, "ema_decay", None) is not None:
        decay = 1.0 - opt.ema_decay
        s = getattr(opt, "ema_start", 1)
        if s > _INT32_MAX:  # (an int32 step never reaches it)
            out.append(jnp.zeros(()))
        else:  # the first update on or after the start (none before it) copies
            first = (t - 1) // k == (s - 1) // k
            out.append(jnp.where((t < s) | (t % k != 0), 0.0, jnp.where(first, 1.0, decay)))
    if getattr(opt, "swa_start", None) is not None:
        s = opt.swa_start
        if s > _INT32_MAX:
            out.append(jnp.zeros(()))
        else:  # updates before this one: the multiples of k in [s, t - 1]
            done = (t - 1) // k - (s - 1) // k
            out.append(jnp.where((t < s) | (t % k != 0), 0.0, 1.0 / (done + 1)))
    return out


def _prologue_terms(view: Any) -> tuple[Any, Any, Any]:
    """(clip_value or 0, coupled L2 factor, decoupled weight decay) of a group's view, as
    :func:`~mithril.utils.optimizers.engines.common.prologue` applies them (traced where
    the view's values are)."""
    cv = 0.0 if view.clip_value is None else view.clip_value
    if view.weight_decay_in_math:
        return cv, 0.0, 0.0
    if view.decoupled_weight_decay:
        return cv, 0.0, view.weight_decay
    return cv, view.weight_decay, 0.0


def _static_prologue(view: Any) -> tuple[float, float, float]:
    """:func:`_prologue_terms` as floats (the values the program bakes in)."""
    return tuple(float(x) for x in _prologue_terms(view))  # type: ignore[return-value]


def _with_attrs(view: Any, scale: Any, lr: Any, attrs: dict[str, Any] | None) -> Any:
    """A copy of ``view`` at learning rate ``lr`` times its scale (a traced group
    ``lr_scale`` of ``attrs`` in place of ``scale``), with ``attrs`` set."""
    v = copy.copy(view)
    attrs = dict(attrs or {})
    attrs["learning_rate"] = lr * attrs.pop("lr_scale", scale)
    v.assign(attrs)
    return v


def _traced_row(view: Any, scale: float, t: Any, lr: Any,
                attrs: dict[str, Any] | None = None,
                values: dict[str, Any] | None = None, missed: Any = None) -> list[Any]:
    """(decoupled keep factor, *full scalars) of one group for step ``t`` (traced);
    ``attrs``: hyperparameters traced in the program (driven by the state, or given to
    ``update``), set on a copy of the view; ``values``: the state's values, those
    ``scalars`` reads passed to it (None: the initial ones)."""
    v = _with_attrs(view, scale, lr, attrs)
    _count_missed(v, missed)
    for inner in v.hyper_holders()[1:]:  # (a wrapper's scalars call its inner's: shimmed too)
        fn = inspect.getattr_static(type(inner), "scalars", None)
        if isinstance(fn, types.FunctionType):  # (a plain method: not a static one)
            inner.__dict__["scalars"] = types.MethodType(_traceable(fn), inner)
    # (the averages count the optimizer's steps: its t, each row's missed steps put back)
    scal = [*_scalars(v, t, values),
            *_averaging_weights(v, t if missed is None else t + missed)]
    keep = 1.0 - scal[0] * _value(_prologue_terms(v)[2])
    return [keep, *scal]


def _host_rows(views: list[Any], scales: list[float], t: Any, lr: float,
               attrs: list[dict[str, Any]] | None = None,
               values: dict[str, float] | None = None,
               missed: list[int] | None = None) -> np.ndarray:
    """The same rows in float64, computed by the optimizer itself (the JAX engine's), each
    padded with zeros to the longest (``values``: as for :func:`_traced_row`; ``t``: the
    step, or each row's)."""
    rows = []
    for r, (v, s) in enumerate(zip(views, scales)):
        a = dict(attrs[r]) if attrs else {}
        a["learning_rate"] = lr * a.pop("lr_scale", s)
        v.assign(a)  # (on the view itself: ASGD keeps lrs)
        # (a row whose group has not joined yet: any count will do, its leaves are kept)
        tr = t if isinstance(t, int) else int(t[r])  # (per row: its own missed steps out)
        scal = v.full_scalars(max(tr, offset_of(v) + 1), values)
        if missed is not None and missed[r]:  # (the averages count the optimizer's t)
            from ..utils.optimizers.averaging import weights

            n = len(v.averaged_slots())
            scal = (*scal[:len(scal) - n], *weights(v, tr + missed[r]))
        rows.append([1.0 - scal[0] * _static_prologue(v)[2], *scal])
    width = max(map(len, rows))
    return np.array([r + [0.0] * (width - len(r)) for r in rows], dtype=np.float64)


@functools.cache
def _known_traceable() -> frozenset[Any]:
    """The built-in ``scalars`` methods that are arithmetic in (step, hyperparameters) for
    every configuration: no probe needed (``tests/test_interop_optax_more.py`` probes each
    in several configurations). SignSGD's covers Signum (which inherits it); its choice
    between momentum and none is on a Python float, fixed when the plan is made (a traced
    momentum takes ``attrs``, which are always probed). Not here: those with Python control
    flow on the step (RAdam, ADOPT, Adan, schedule-free warm-up), with state values
    (Prodigy, ASGD)."""
    from ..utils.optimizers import (
        COCOB,
        LAMB,
        LARS,
        SGD,
        AdaBelief,
        Adadelta,
        AdaGrad,
        Adam,
        Adamax,
        AdEMAMix,
        Fromage,
        Ftrl,
        Lion,
        NAdam,
        Novograd,
        OptimisticAdam,
        OptimisticGD,
        RMSProp,
        Rprop,
        SignSGD,
        SimplifiedAdEMAMix,
        Yogi,
    )

    return frozenset(c.__dict__["scalars"] for c in (
        Adam, AdaBelief, Adadelta, AdaGrad, Adamax, AdEMAMix, COCOB, Fromage, Ftrl, LAMB, LARS,
        Lion, NAdam, Novograd, OptimisticAdam, OptimisticGD, RMSProp, Rprop, SGD, SignSGD,
        SimplifiedAdEMAMix, Yogi))


def _needs_no_probe(views: list[Any]) -> bool:
    """Every view's scalars are a known-traceable built-in's, with no averaging weights
    and no state values (what the probe would find traceable anyway: it costs a compile,
    ~25 ms, on a first-ever run)."""
    from ..utils.optimizers.averaging import AveragingMixin

    known = _known_traceable()
    return all(type(v).scalars in known and not v.scalar_values
               and type(v).full_scalars is AveragingMixin.full_scalars
               and v.ema_decay is None and v.swa_start is None for v in views)


def _probe(views: list[Any], scales: list[float], trust_known: bool = True,
           attrs: list[dict[str, float]] | None = None) -> str | None:
    """Why the scalars cannot be traced (None when they can and agree with the host's).
    The state values ``scalars`` reads are traced too (at their initial values), and so
    are each row's ``attrs`` (traced hyperparameters, at their values here).
    ``trust_known``: None at once for :func:`_needs_no_probe` views without ``attrs``."""
    attrs = attrs or [{} for _ in views]
    if trust_known and not any(attrs) and _needs_no_probe(views):
        return None
    return _probe_traced(views, scales, attrs)


def _probe_traced(views: list[Any], scales: list[float], attrs: list[dict[str, float]]
                  ) -> str | None:
    """:func:`_probe`'s work: trace the rows (``jax.make_jaxpr``), then compare a jitted
    program's values at a few steps with the host's (a compile, ~25 ms)."""
    import jax
    import jax.numpy as jnp

    from ..utils.optimizers.state import scalar_arguments
    from .optax_hyperparams import pair

    init = scalar_arguments(views[0], None)
    names = sorted(init)
    wide = jnp.result_type(float)
    pairs = [{k: pair(x, wide) for k, x in a.items()} for a in attrs]

    def rows(t: Any, lr: Any, hyper: list[dict[str, Any]], *vals: Any) -> Any:
        values = dict(zip(names, vals))
        return [jnp.stack([jnp.asarray(x, dtype=wide) for x in _traced_row(
            v, s, t, lr, {k: _Hyper(p[0], p[1]) for k, p in h.items()}, values)])
                for v, s, h in zip(views, scales, hyper)]

    def padded(got: list[Any]) -> np.ndarray:
        width = max(len(r) for r in got)
        return np.array([np.pad(np.asarray(r, dtype=np.float64), (0, width - len(r)))
                         for r in got])

    lr0 = float(views[0].learning_rate) or 1e-3
    try:
        jax.make_jaxpr(rows)(np.int32(1), np.float32(lr0), pairs,
                             *(np.float32(init[k]) for k in names))
    except Exception as e:  # noqa: BLE001 - any failure: compute them on the host
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"{type(views[0]).__name__}.scalars(step) is not traceable ({type(e).__name__}: {first[:160]})"
    fresh = [copy.copy(v) for v in views]
    jitted = jax.jit(rows)  # one small program for every step below (eager: one per operation)
    late = max(map(offset_of, views), default=0)  # (steps each row has joined by)
    with jax.ensure_compile_time_eval():
        for t in (late + 1, late + 2, late + 3, late + 10, late + 1000):
            got = padded(jitted(jnp.int32(t), jnp.asarray(lr0), pairs,
                                *(jnp.asarray(init[k]) for k in names)))
            want = _host_rows(fresh, scales, t, lr0, attrs, init)
            tol = 1e-12 if jax.config.jax_enable_x64 else 1e-5
            if got.shape != want.shape or not np.allclose(got, want, rtol=tol, atol=1e-30,
                                                          equal_nan=True):
                return (f"{type(views[0]).__name__}.scalars(step) traced gives other values "
                        f"than on the host (step {t})")
    return None


# -- the per-structure plan -----------------------------------------------------------------
class _Plan:
    """What one parameter structure needs, worked out once per tree structure: each
    tensor's row (``index``), one optimizer per row (``views``) with its learning rate's
    ratio to the optimizer's (``scales``), what each row's group overrides, per-tensor
    clipping, and how the scalars are computed. ``owners``: each row's (group, decays);
    ``traced``: the hyperparameters the update reads at every step (names as in
    :mod:`.optax_hyperparams`), ``live`` each row's share of them."""

    def __init__(self, index: list[int], views: list[Any], scales: list[float], mode: str,
                 overrides: list[set[str]] | None = None, clips: list[tuple] | None = None,
                 owners: list[tuple] | None = None, traced: tuple[str, ...] = (),
                 share: Callable[[dict[str, Any]], list[dict[str, Any]]] | None = None
                 ) -> None:
        self.index = [int(i) for i in index]
        self.share = share  # (each row's share of the traced values, where not row_attrs')
        self.views = views
        self.scales = scales
        self.overrides = overrides or [set() for _ in views]
        self.owners = owners or [(None, True) for _ in views]
        self.static = [_static_prologue(v) for v in views]
        self.live = self.attrs(dict.fromkeys(traced, True))
        #: each row's weight decay: "l2" (coupled), "decoupled" or "" (in the math)
        self.decay = ["" if v.weight_decay_in_math else
                      "decoupled" if v.decoupled_weight_decay else "l2" for v in views]
        #: each row's (clip_tensor_norm, clip_block_rms), where any row clips per tensor
        if clips is None:
            clips = [(getattr(v, "clip_tensor_norm", None), getattr(v, "clip_block_rms", None))
                     for v in views]
        self.tensor_clip = clips if any(c != (None, None) for c in clips) else None
        self.host_views = [copy.copy(v) for v in views]  # kept: ASGD remembers lrs
        #: each row's ``step_offset`` (static: a group joining later builds a new plan)
        self.offsets = [offset_of(v) for v in views]
        self.widths = [1 + len(copy.copy(v).full_scalars(1 + k))
                       for v, k in zip(views, self.offsets)]
        self.width = max(self.widths, default=1)  # the host table's (keep factor, scalars), padded
        now = [{k: (s if k == "lr_scale" else v._hyperparameter_value(k, None)) for k in live}
               for v, s, live in zip(views, scales, self.live)]
        reason = None if mode == "host" else _probe(views, self.scales, attrs=now)
        if mode == "traced" and reason is not None:
            raise TypeError(f"scalars='traced': {reason}; use scalars='auto' or 'host' (a "
                            f"host callback)")
        self.host = mode == "host" or reason is not None
        self.reason = reason
        #: each tensor's adaptive clipping (c, ε), c None where off; None if none clips
        self.agc = self.adaptive([views[r] for r in self.index])
        #: each tensor's (centralize, normalize_grad, normalize_eps); None if none takes one
        self.pre = self.pre_clip([views[r] for r in self.index])

    @staticmethod
    def adaptive(views: list[Any]) -> list[tuple[Any, float]] | None:
        """Each tensor's ``(adaptive_clip, adaptive_clip_eps)`` from its view; None when
        no tensor clips."""
        agc = [(getattr(v, "adaptive_clip", None), float(getattr(v, "adaptive_clip_eps", 1e-3)))
               for v in views]
        return agc if any(c is not None for c, _ in agc) else None

    @staticmethod
    def pre_clip(views: list[Any]) -> list[tuple[bool, Any, float]] | None:
        """Each tensor's ``(centralize, normalize_grad, normalize_eps)`` from its view; None
        when no tensor is centralized or normalized."""
        pre = [(bool(getattr(v, "centralize", False)), getattr(v, "normalize_grad", None),
                float(getattr(v, "normalize_eps", 1e-6))) for v in views]
        return pre if any(c or s is not None for c, s, _ in pre) else None

    @classmethod
    def of_groups(cls, opt: Any, names: list[str], mode: str, traced: tuple[str, ...] = (),
                  per_leaf: bool = False) -> _Plan:
        """The plan of an elementwise optimizer: its parameter groups' rows; ``per_leaf``:
        one row per leaf (its group's), for leaves that count their own steps (the
        ``missed`` counts of :func:`_row_scalars`, as the engines' ``own_count_rows``)."""
        from ..utils.optimizers.groups import resolve, views

        refuse_pinned(opt)
        index, rows, owners = resolve(opt, names)
        if per_leaf and len(index):
            rows, owners = [rows[r] for r in index], [owners[r] for r in index]
            index = range(len(index))
        return cls(list(index), views(opt, rows), [float(r.get("lr_scale", 1.0)) for r in rows],
                   mode, [set(r) for r in rows], owners=owners, traced=traced)

    def attrs(self, driven: dict[str, Any]) -> list[dict[str, Any]]:
        """Each row's share of ``driven`` (hyperparameter name -> value; see
        :func:`~mithril.interop.optax_hyperparams.row_attrs`), by attribute."""
        from .optax_hyperparams import row_attrs

        if self.share is not None:
            return self.share(driven)
        return row_attrs(self.owners, self.overrides, driven)


def refuse_pinned(opt: Any) -> None:
    """``ValueError`` naming the groups of ``opt`` holding a rate set while the optimizer's
    was 0: a program's row takes the optimizer's rate times the group's ratio, 0 here."""
    pinned = [i for i, g in enumerate(opt.param_groups) if "learning_rate" in g]
    if pinned:
        raise ValueError(
            f"{type(opt).__name__} param_groups{pinned}: a learning rate set while the "
            f"optimizer's is 0 cannot be traced (the program holds a group's rate as a "
            f"ratio to the optimizer's); run the optimizer's own update, or start the "
            f"first lane's schedule above 0")


def _pair_of(x: Any) -> tuple[Any, Any]:
    """A driven value as (hi, lo): a :class:`_Hyper`'s own, a plain one's with lo 0."""
    return (x.hi, x.lo) if isinstance(x, _Hyper) else (x, 0.0)


def _count_missed(view: Any, missed: Any) -> None:
    """Give a row that reads its group's count beside its own (a Lookahead's sync: its
    ``_missed``, ``t − missed`` being the step it is given) its tensor's missed steps."""
    if missed is not None and hasattr(type(view), "_missed"):
        view._missed = missed


def _row_scalars(plan: _Plan, t: Any, lr: Any, driven: dict[str, Any], dt: Any,
                 values: dict[str, Any] | None = None, missed: Any = None
                 ) -> list[list[Any]]:
    """Each row's (keep factor, *full scalars) for step ``t`` (traced), as JAX values of
    dtype ``dt``: traced, or computed on the host by a ``jax.pure_callback``. ``driven``:
    the hyperparameters the program reads (from the state, or :class:`_Hyper` pairs given
    to the update; names as in :mod:`.optax_hyperparams`), set on (a copy of) each view
    first; ``values``:
    the state values ``scalars`` reads (its ``scalar_values``), passed to it as keyword
    arguments."""
    import jax
    import jax.numpy as jnp

    attrs = plan.attrs(driven)
    values = dict(values or {})
    per_row = getattr(t, "ndim", 0) == 1  # (each row's own count: see _Plan.of_groups)
    if plan.host:
        names, vnames = sorted(driven), sorted(values)
        out_dt = np.dtype(dt)

        def callback(step: Any, rate: Any, *vals: Any) -> np.ndarray:
            lost = None
            if missed is not None:  # (the first operand after the rate: each row's count)
                lost = [int(m) for m in np.asarray(vals[0]).tolist()]
                for v, m in zip(plan.host_views, lost):
                    _count_missed(v, m)
                vals = vals[1:]
            got = [float(v) for v in vals]
            n = 2 * len(names)  # (each driven value as hi, lo: its float64 value)
            hyper = {k: got[2 * i] + got[2 * i + 1] for i, k in enumerate(names)}
            state_values = dict(zip(vnames, got[n:]))
            return _host_rows(plan.host_views, plan.scales,
                              np.asarray(step) if per_row else int(step), float(rate),
                              plan.attrs(hyper), state_values, lost).astype(out_dt)

        table = jax.pure_callback(
            callback, jax.ShapeDtypeStruct((len(plan.views), plan.width), dt), t,
            jnp.asarray(lr, dt), *(() if missed is None else (missed,)),
            *(jnp.asarray(x, dt) for k in names
                                   for x in _pair_of(driven[k])),
            *(jnp.asarray(values[k], dt) for k in vnames), vmap_method="sequential")
        return [[table[r, j] for j in range(w)] for r, w in enumerate(plan.widths)]
    return [[jnp.asarray(x, dt) for x in _traced_row(
        v, s, t[r] if per_row else t, jnp.asarray(lr, dt), a, values,
        None if missed is None else missed[r])]
            for r, (v, s, a) in enumerate(zip(plan.views, plan.scales, attrs))]
