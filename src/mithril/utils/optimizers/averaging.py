"""Weight averaging in the optimizer's own fused pass: an exponential moving average
(``ema_decay=``) and/or an equal running mean from a given step on (SWA, ``swa_start=``) of
the parameters, each kept as one more state slot (``"ema"``, ``"swa"``) and updated in the
same elementwise pass, right after the parameter update::

    avg ← avg + w·(p_new − avg)          (nothing on a step with w = 0)

An average starts as the parameters given to ``init`` (as torch's ``AveragedModel``, a
copy of the model), so it is never garbage before its first update. The weight ``w`` is a
per-step scalar, one more column of the scalar table (so changing
``ema_decay`` or the learning rate never recompiles), derived from the step count ``t``
alone (nothing more is saved: a state dict or checkpoint restores it with the step):

* EMA, ``ema_every = k``: the average is updated on steps ``k, 2k, 3k, ...``; the first
  update copies the parameters (``w = 1``), each later one takes
  ``w = 1 − ema_decay``. That is torch's
  ``AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay))`` with
  ``update_parameters(model)`` called after every k-th optimizer step. (Keras'
  ``ema_overwrite_frequency`` is another thing: Keras updates its EMA every step and
  *overwrites the model's weights* with it every k steps; here the parameters are never
  overwritten: :meth:`~mithril.utils.optimizers.Optimizer.swap_ema` swaps the average in
  when you ask.)
* SWA, ``swa_start = s``: the average is the mean of the parameters after steps ``s``,
  ``s + 1``, ... (those that are multiples of ``ema_every`` when it is > 1): ``w = 1/n`` on
  its n-th update. That is torch's ``AveragedModel(model)`` (default average) with
  ``update_parameters(model)`` after each of those steps; use it with
  :class:`~mithril.utils.lr_schedulers.SWALR`.

The composed elementwise function (:func:`averaged_math`) is generated once per (math, slot
count, scalar count, averaged slots), with explicit arity, so the numba kernels compile it
as any optimizer's math and it runs as well on NumPy, JAX and torch arrays.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from numba.extending import register_jitable

from .checks import check_int, describe, to_float
from .elementwise import where

#: the state slot of each average
EMA, SWA = "ema", "swa"

#: the largest ``ema_every`` / ``swa_start``: beyond it a step count would overflow int64
MAX_EVERY = 2**62


class NoAverageError(KeyError):
    """The optimizer state keeps no such average (it was made without ``ema_decay=`` /
    ``swa_start=``)."""

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0]) if self.args else ""


def check_ema_decay(value: Any) -> float | None:
    if value is None:
        return None
    v = to_float("ema_decay", value)
    if not (math.isfinite(v) and 0 <= v < 1):
        raise ValueError(f"ema_decay must be in [0, 1) (or None: no EMA), got {describe(value)}")
    return v


def check_ema_every(value: Any) -> int:
    return check_int("ema_every", value, minimum=1, maximum=MAX_EVERY)


def check_swa_start(value: Any) -> int | None:
    if value is None:
        return None
    return check_int("swa_start", value, minimum=1, maximum=MAX_EVERY)


def slots_of(opt: Any) -> tuple[str, ...]:
    """The averaged slots ``opt`` keeps, in order."""
    out = ()
    if getattr(opt, "ema_decay", None) is not None:
        out += (EMA,)
    if getattr(opt, "swa_start", None) is not None:
        out += (SWA,)
    return out


def weights(opt: Any, t: int) -> tuple[float, ...]:
    """The averaging weight of each averaged slot for step ``t`` (1-based): 0 where the
    step does not average, 1 on the first update (a copy)."""
    k = getattr(opt, "ema_every", 1)
    out: tuple[float, ...] = ()
    if getattr(opt, "ema_decay", None) is not None:
        if t % k:
            out += (0.0,)
        else:
            out += (1.0 if t // k == 1 else 1.0 - opt.ema_decay,)
    if getattr(opt, "swa_start", None) is not None:
        s = opt.swa_start
        if t < s or t % k:
            out += (0.0,)
        else:  # updates before this one: the multiples of k in [s, t - 1]
            done = (t - 1) // k - (s - 1) // k
            out += (1.0 / (done + 1),)
    return out


def average(p: Any, a: Any, w: Any) -> Any:
    """One averaging step, elementwise: ``a + w·(p − a)``; exactly ``p`` where ``w`` is 1
    (a first update copies, as torch's ``lerp`` and ``AveragedModel`` do), ``a`` itself
    where ``w`` is 0 (an inf/NaN parameter never leaks into an average a step leaves
    alone)."""
    return where(w == 1, p, where(w != 0, a + w * (p - a), a))


_SRC = """
def averaged({args}):
    out = MATH({math_args})
    p = out[0]
    return ({outs})
"""


@functools.cache
def averaged_math(math_fn: Any, n_slots: int, n_scal: int, n_avg: int) -> Any:
    """``math_fn`` followed by ``n_avg`` averaging steps: ``(p, g, *slots, *avgs, *scalars,
    *weights) -> (p, *slots, *avgs)``. Cached: one function object per base math, so the
    kernels built from it are cached too."""
    slots = [f"s{i}" for i in range(n_slots)]
    avgs = [f"a{i}" for i in range(n_avg)]
    scal = [f"h{i}" for i in range(n_scal)]
    wts = [f"w{i}" for i in range(n_avg)]
    src = _SRC.format(
        args=", ".join(["p", "g", *slots, *avgs, *scal, *wts]),
        math_args=", ".join(["p", "g", *slots, *scal]),
        outs=", ".join(["p", *(f"out[{i + 1}]" for i in range(n_slots)),
                        *(f"AVG(p, {a}, {w})" for a, w in zip(avgs, wts))]) + ",",
    )
    name = getattr(math_fn, "__qualname__", repr(math_fn))
    ns: dict[str, Any] = {"MATH": _jitable(math_fn), "AVG": _jitable(average)}
    exec(compile(src, f"<mithril averaged {name}>", "exec"), ns)
    fn = ns["averaged"]
    fn.__qualname__ = fn.__name__ = f"averaged_{getattr(math_fn, '__name__', 'math')}"
    fn.base_math = math_fn
    return fn


@functools.cache
def _jitable(fn: Any) -> Any:
    """``fn`` itself, callable from Python as ever and, referenced from numba-compiled code,
    compiled and inlined there (numba's ``register_jitable``)."""
    return register_jitable(inline="always")(fn)

