"""The arithmetic of ``LBFGS(convention="optax")``: one iteration of ``optax.lbfgs``
(``scale_by_lbfgs``, the learning-rate scaling, then ``scale_by_zoom_linesearch`` or no
line search) on flat buffers, with :mod:`.lbfgs_math`'s backend ops.

optax's L-BFGS memory is a ring of ``m = memory_size`` entries: iteration ``k`` (its
``count``) stores ``s = x_k − x_{k−1}``, ``y = g_k − g_{k−1}`` and ``ρ = 1/(y·s)`` (0 where
``y·s = 0``; no curvature test, unlike torch's ``y·s > 1e-10``) at slot ``(k−1) mod m``,
then preconditions ``g_k`` by the two-loop recursion from the newest entry, the initial
inverse Hessian ``γ·I`` with ``γ = y·s / y·y`` (``min(1, 1/‖g_0‖₂)`` at ``k = 0``; 1
without ``scale_init_precond``). The update direction is ``u = −lr·H·g``; the zoom line
search picks the stepsize ``η`` (``x_{k+1} = x_k + η·u``), or ``η = 1`` without one.
Entries with ``ρ = 0`` (none yet, or ``y·s = 0``) add exact zeros in optax's recursion and
are skipped here.

``LBFGS(convention="optax").update(params, gradients, state, closure=f, loss=...)`` is
one such iteration. ``f(params) -> (loss, gradients)`` evaluates any params; the loss and
gradients at ``params`` are, in this order: ``gradients`` with ``loss=``, else those the
last update's line search found at the params it returned (when ``params`` are those
arrays: optax's ``value_and_grad_from_state``), else ``f(params)``. Without line search
(``line_search_fn=None``) ``closure`` is needed only without ``gradients``, and ``loss``
never. As optax's, a trial point of the line search may give an inf/NaN loss or gradient
(a step too far: the search backs off); anything else non-finite (at ``params``, or the
new params), a closure that raises, or gradients with other names, shapes or dtype than
the params leave ``params`` and ``state`` unchanged (``FloatingPointError``,
``KeyMismatchError``, ``ShapeError``, ``TypeError``).

State (``state.values``; optax's names): ``count``, ``rho0 …`` (``weights_memory``),
``ls_learning_rate`` and ``ls_value`` (the line search's last stepsize and loss),
``num_linesearch_steps``, ``decrease_error``, ``curvature_error`` (its
``ZoomLinesearchInfo``) and ``last_loss``; slots ``prev_params``, ``prev_grad``,
``ls_grad`` and the ring ``s0 …``, ``y0 …`` (``diff_params_memory``,
``diff_updates_memory``), entries never written sharing one zero buffer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .checks import check_flag, check_int, check_positive, describe, to_float
from .lbfgs_math import Ops
from .sgd import BY_CONVENTION
from .zoom_linesearch import ZoomInfo, zoom_linesearch

#: optax.lbfgs's options besides memory_size and the learning rate, with its defaults
OPTAX_DEFAULTS: dict[str, Any] = {
    "scale_init_precond": True, "max_linesearch_steps": 20, "max_learning_rate": None,
    "slope_rtol": 1e-4, "curv_rtol": 0.9, "approx_dec_rtol": 1e-6, "stepsize_precision": 1e-5,
    "initial_guess_strategy": "one"}
#: the optimizer-wide scalars besides the ring's ``rho0``, ``rho1``, ...
OPTAX_VALUES = ("count", "ls_learning_rate", "ls_value", "num_linesearch_steps",
                "decrease_error", "curvature_error", "last_loss")


def check_optax_arguments(history_size: Any, line_search_fn: Any, options: dict[str, Any],
                          torch_args: dict[str, Any]) -> dict[str, Any]:
    """The attributes of ``LBFGS(convention="optax")``, checked: ``options`` are
    :data:`OPTAX_DEFAULTS`'s; ``torch_args`` (torch's only) must be left unset."""
    given = [f"{k}={v!r}" for k, v in torch_args.items() if v is not BY_CONVENTION
             and v is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: torch.optim.LBFGS's; convention='optax' "
                         f"makes one optax.lbfgs iteration per update, without max_iter, "
                         f"max_eval, tolerance_grad, tolerance_change or fused")
    ls = "zoom" if line_search_fn is BY_CONVENTION else line_search_fn
    if not (ls is None or isinstance(ls, str)) or ls not in (None, "zoom"):
        raise ValueError(f"line_search_fn must be 'zoom' (optax's zoom line search) or None "
                         f"with convention='optax', got {describe(ls)}")
    o = options
    if o["initial_guess_strategy"] not in ("one", "keep"):
        raise ValueError(f"initial_guess_strategy must be 'one' or 'keep', got "
                         f"{describe(o['initial_guess_strategy'])}")
    return {"history_size": 10 if history_size is BY_CONVENTION else
            check_int("history_size", history_size, 1, 1 << 20),
            "line_search_fn": ls,
            "scale_init_precond": check_flag("scale_init_precond", o["scale_init_precond"]),
            "max_linesearch_steps": check_int("max_linesearch_steps",
                                              o["max_linesearch_steps"], 1),
            "max_learning_rate": None if o["max_learning_rate"] is None else
            check_positive("max_learning_rate", o["max_learning_rate"], False),
            **{k: check_positive(k, o[k]) for k in ("slope_rtol", "curv_rtol",
                                                    "stepsize_precision")},
            "approx_dec_rtol": None if o["approx_dec_rtol"] is None else
            check_positive("approx_dec_rtol", o["approx_dec_rtol"]),
            "initial_guess_strategy": o["initial_guess_strategy"]}


@dataclass
class OptaxMemory:
    """optax's ``ScaleByLBFGSState`` (``count``, the last ``params`` and gradient, the
    ring ``s``/``y``/``rho``; None for an entry never written) and
    ``ScaleByZoomLinesearchState`` (the last ``stepsize``, and the loss and gradient at
    the params it returned, which the next iteration reuses)."""

    count: int = 0
    prev_params: Any = None
    prev_grad: Any = None
    s: list = field(default_factory=list)
    y: list = field(default_factory=list)
    rho: list = field(default_factory=list)
    stepsize: float = 1.0
    value: float = math.inf
    grad: Any = None
    info: ZoomInfo = ZoomInfo(0, math.inf, math.inf)


def _inv(v: float) -> float:
    return 0.0 if v == 0.0 else 1.0 / v


def precondition(ops: Ops, g: Any, s: list, y: list, rho: list, count: int,
                 gamma: float) -> Any:
    """``H·g`` by the two-loop recursion over the ring, whose oldest entry is at ``count
    mod m`` (optax's ``_precondition_by_lbfgs``): newest to oldest, then back."""
    m = len(rho)
    order = [i for i in ((count + j) % m for j in range(m)) if rho[i] != 0.0]
    q, alpha = ops.mul(g, 1.0), {}  # (a new buffer: the recursion updates it in place)
    for i in reversed(order):
        alpha[i] = rho[i] * float(ops.dot(s[i], q))
        q = ops.axpy_(q, -alpha[i], y[i])
    q = ops.mul(q, gamma)
    for i in order:
        beta = rho[i] * float(ops.dot(y[i], q))
        q = ops.axpy_(q, alpha[i] - beta, s[i])
    return q


def optax_lbfgs_step(ops: Ops, evaluate: Callable[[Any], tuple[float, Any]] | None, x: Any,
                     loss: float, g: Any, mem: OptaxMemory, *, lr: float,
                     scale_init_precond: bool, line_search: dict[str, Any] | None,
                     keep_guess: bool) -> tuple[Any, OptaxMemory]:
    """One ``optax.lbfgs`` update from ``x`` (loss ``loss``, gradient ``g``) and the
    memory ``mem`` (not modified). ``line_search``: :func:`zoom_linesearch`'s keywords, or
    None for a step of ``u`` itself; ``keep_guess``: its first trial is the last
    stepsize (``initial_guess_strategy="keep"``), else 1. Returns the new params and
    memory."""
    m = len(mem.rho)
    s, y, rho = list(mem.s), list(mem.y), list(mem.rho)
    gamma = 1.0
    if mem.count > 0:  # 1. the memory
        ds, dy = ops.sub(x, mem.prev_params), ops.sub(g, mem.prev_grad)
        ys = float(ops.dot(dy, ds))
        k = (mem.count - 1) % m
        s[k], y[k], rho[k] = ds, dy, _inv(ys)
        if scale_init_precond:  # 2. the initial inverse Hessian γ·I
            yy = float(ops.dot(dy, dy))
            gamma = ys / yy if yy > 0.0 else 1.0
    elif scale_init_precond:  # (the first: a capped inverse of the gradient's norm)
        norm = math.sqrt(float(ops.dot(g, g)))
        gamma = min(1.0, 1.0 / norm) if norm > 0.0 else 1.0
    u = ops.mul(precondition(ops, g, s, y, rho, mem.count, gamma), -lr)  # 3. the direction
    new = replace(mem, count=mem.count + 1, prev_params=x, prev_grad=g, s=s, y=y, rho=rho)
    if line_search is None:
        return ops.add(x, 1.0, u), new
    step, x, value, grad, info = zoom_linesearch(
        ops, evaluate, x, u, loss, g, guess=mem.stepsize if keep_guess else 1.0,
        **line_search)
    if step == 0.0:  # (optax's x + 0·u)
        x = ops.add(x, 0.0, u)
    return x, replace(new, stepsize=step, value=value, grad=grad, info=info)


def check_optax_values(values: Any) -> None:
    """The saved ``count``: a whole number (the base class names other bad values)."""
    v = values.get("count") if hasattr(values, "get") else None
    try:
        c = float(v)
    except OverflowError:  # (an int too large for a float: named below, not Python's)
        c = math.inf
    except (TypeError, ValueError):
        return
    if not (math.isfinite(c) and c == int(c) and 0 <= c <= 2**53):
        raise ValueError(f"state value 'count' must be a whole number in [0, 2**53], got "
                         f"{describe(v)}")


def optax_update(opt: Any, params: Any, gradients: Any, state: Any, closure: Any,
                 loss: Any) -> tuple[dict[str, Any], Any]:
    """``opt.update`` for ``opt.convention == "optax"`` (the module's docs)."""
    from .lbfgs import _flatten, _ops, _views, _zeros

    name, zoom = type(opt).__name__, opt.line_search_fn == "zoom"
    if closure is not None and not callable(closure):
        raise TypeError(f"closure must be callable, got {describe(closure)}")
    opt._check_state(state)
    if closure is None and (zoom or gradients is None):
        raise TypeError(f"{name}.update needs closure=: a function params -> (loss, "
                        f"gradients) that evaluates the loss and its gradients at the params "
                        f"it is given" + (" (the zoom line search evaluates several points)"
                                          if zoom else ", or the gradients at params"))
    if gradients is not None and loss is None and zoom:
        raise TypeError(f"{name}.update: give the loss at params with its gradients "
                        f"(loss=...), or gradients=None for the closure to evaluate both")
    if gradients is None and loss is not None:
        raise TypeError(f"{name}.update: loss= is the loss at params, given with their "
                        f"gradients; got loss but gradients=None")
    ops = _ops(state, False)
    v, sl = state.values, state.slots
    check_optax_values(v)
    x = opt._flat_params(params, state)

    def evaluate(xb: Any, finite: bool = True) -> tuple[float, Any]:
        out = closure(_views(state, xb))
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise TypeError(f"the closure must return (loss, gradients), got {describe(out)}")
        if finite:
            return opt._checked(state, ops, out[0], out[1], "the closure's")
        return (to_float("the closure's loss", out[0]),  # a trial point: inf/NaN allowed
                _flatten(state, opt._arrays(state, out[1], "the closure's gradients")))

    h, count = opt.history_size, int(v["count"])
    rho = [float(v[f"rho{i}"]) for i in range(h)]
    mem = OptaxMemory(count, sl["prev_params"], sl["prev_grad"],
                      [sl[f"s{i}"] for i in range(h)], [sl[f"y{i}"] for i in range(h)], rho,
                      float(v["ls_learning_rate"]), float(v["ls_value"]), sl["ls_grad"])
    with np.errstate(all="ignore"):
        if gradients is not None:  # (without line search, the loss is optional)
            given = loss
            loss, g = opt._checked(state, ops, 0.0 if given is None else given, gradients, "")
            loss = None if given is None else loss
        elif zoom and count and x is state.params_flat and math.isfinite(mem.value):
            loss, g = mem.value, mem.grad  # the line search's (value_and_grad_from_state)
        else:
            loss, g = evaluate(x)
        x, mem = optax_lbfgs_step(
            ops, lambda xb: evaluate(xb, False), x, 0.0 if loss is None else loss, g, mem,
            lr=opt.learning_rate, scale_init_precond=opt.scale_init_precond,
            line_search={"max_steps": opt.max_linesearch_steps,
                         "max_stepsize": opt.max_learning_rate,
                         "slope_rtol": opt.slope_rtol, "curv_rtol": opt.curv_rtol,
                         "approx_dec_rtol": opt.approx_dec_rtol,
                         "interval_threshold": opt.stepsize_precision} if zoom else None,
            keep_guess=opt.initial_guess_strategy == "keep")
        if not ops.all_finite(x) or (zoom and not ops.all_finite(mem.grad)):
            raise FloatingPointError(f"{name}: the step gives non-finite params or "
                                     f"gradients; params and state left unchanged")
        norm = math.sqrt(max(float(ops.dot(g, g)), 0.0))
        views = _views(state, x)
    # commit: everything above worked on new buffers
    zero = _zeros(state)
    slots = {"prev_params": mem.prev_params, "prev_grad": mem.prev_grad,
             "ls_grad": zero if mem.grad is None else mem.grad}
    for i in range(h):
        slots[f"s{i}"] = zero if mem.s[i] is None else mem.s[i]
        slots[f"y{i}"] = zero if mem.y[i] is None else mem.y[i]
    info = mem.info
    values = {"count": float(mem.count), "ls_learning_rate": mem.stepsize,
              "ls_value": mem.value, "num_linesearch_steps": float(info.num_linesearch_steps),
              "decrease_error": info.decrease_error, "curvature_error": info.curvature_error,
              "last_loss": math.nan if loss is None else loss}
    values.update({f"rho{i}": mem.rho[i] for i in range(h)})
    state.slots, state.values = slots, values
    state.params_flat, state.param_views = x, views
    state.step += 1
    state.last_loss, state.last_grad_norm, state.last_step_skipped = loss, norm, False
    return dict(views), state
