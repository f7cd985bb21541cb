"""optax's zoom line search (``optax.scale_by_zoom_linesearch``: Nocedal & Wright's
Algorithms 3.5 and 3.6 with Hager & Zhang's approximate decrease test), on flat buffers.

The search looks along ``u`` from ``x`` (value ``f0``, slope ``f0' = g·u < 0``) for a
stepsize ``η`` with

* sufficient decrease: ``f(x+ηu) ≤ f0 + slope_rtol·η·f0'``, or (``approx_dec_rtol`` not
  None) the approximate one ``f'(η) ≤ (2·slope_rtol − 1)·f0'`` where ``f(x+ηu) ≤ f0 +
  approx_dec_rtol·|f0|``;
* small curvature: ``|f'(η)| ≤ curv_rtol·|f0'|``.

It first grows ``η`` (the guess, then ``increase_factor`` times the last) until an interval
holds such a step, then zooms into it (a cubic, else a quadratic interpolation, else
bisection). After ``max_steps`` evaluations, or once the interval is shorter than
``interval_threshold`` with a decreasing step found, it takes the best step with sufficient
decrease (or, if there is none and the last step was non-finite, ``η = 0``). A trial point
whose loss or gradient is inf/NaN is a step too far, as optax's.

Scalars are float64 (optax's in float64; a float32 run rounds its scalars otherwise, within
float32 rounding); the arithmetic and its order are optax's, NaN-propagating as ``jnp``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from .lbfgs_math import Ops


class ZoomInfo(NamedTuple):
    """optax's ``ZoomLinesearchInfo``: the evaluations made and the last trial's errors
    (0 where its criterion holds)."""

    num_linesearch_steps: int
    decrease_error: float
    curvature_error: float


class _Point(NamedTuple):
    step: float
    x: Any  # the trial params
    value: float
    grad: Any
    slope: float


def _nanmax(a: float, b: float) -> float:  # jnp.maximum: NaN propagates
    return a if a != a else b if b != b else max(a, b)


def _nanmin(a: float, b: float) -> float:
    return a if a != a else b if b != b else min(a, b)


def _error(e: float) -> float:
    """A criterion's violation: positive part, NaN as inf."""
    e = _nanmax(e, 0.0)
    return math.inf if e != e else e


def _cubicmin(a: float, fa: float, fpa: float, b: float, fb: float, c: float, fc: float
              ) -> float:
    """optax's ``_cubicmin``: the minimiser of the cubic through ``(a, fa)`` with slope
    ``fpa``, ``(b, fb)`` and ``(c, fc)`` (NaN where there is none)."""
    a, fa, fpa, b, fb, c, fc = map(np.float64, (a, fa, fpa, b, fb, c, fc))
    with np.errstate(all="ignore"):
        C, db, dc = fpa, b - a, c - a
        denom = (db * dc) ** 2 * (db - dc)
        e1, e2 = fb - fa - C * db, fc - fa - C * dc
        A = (dc * dc * e1 + -(db * db) * e2) / denom
        B = (-(dc * dc * dc) * e1 + db * db * db * e2) / denom
        radical = B * B - 3.0 * A * C
        return float(a + (-B + np.sqrt(radical)) / (3.0 * A))


def _quadmin(a: float, fa: float, fpa: float, b: float, fb: float) -> float:
    """optax's ``_quadmin``: the minimiser of the parabola through ``(a, fa)`` with slope
    ``fpa`` and ``(b, fb)``."""
    a, fa, fpa, b, fb = map(np.float64, (a, fa, fpa, b, fb))
    with np.errstate(all="ignore"):
        db = b - a
        B = (fb - fa - fpa * db) / (db * db)
        return float(a - fpa / (2.0 * B))


def zoom_linesearch(ops: Ops, evaluate: Callable[[Any], tuple[float, Any]], x: Any, u: Any,
                    value: float, grad: Any, *, guess: float = 1.0, max_steps: int = 20,
                    max_stepsize: float | None = None, tol: float = 0.0,
                    increase_factor: float = 2.0, slope_rtol: float = 1e-4,
                    curv_rtol: float = 0.9, approx_dec_rtol: float | None = 1e-6,
                    interval_threshold: float = 1e-5
                    ) -> tuple[float, Any, float, Any, ZoomInfo]:
    """One run of optax's ``zoom_linesearch`` from ``x`` (loss ``value``, gradient
    ``grad``) along ``u``; ``evaluate(point) -> (loss, gradient)`` may return non-finite
    ones. Returns ``(stepsize, params, loss, gradient, info)`` at the chosen step (the
    params ``x + stepsize·u`` as evaluated; ``x`` itself at stepsize 0)."""
    slope0 = float(ops.dot(u, grad))
    start = _Point(0.0, x, value, grad, slope0)

    def trial(step: float) -> tuple[_Point, float, float]:
        xt = ops.add(x, step, u)
        v, g = evaluate(xt)
        s = float(ops.dot(g, u))
        dec = v - value - slope_rtol * step * slope0
        if approx_dec_rtol is not None:
            approx = _nanmax(s - (2 * slope_rtol - 1.0) * slope0,
                             v - value - approx_dec_rtol * abs(value))
            dec = _nanmin(approx, dec)
        return _Point(step, xt, v, g, s), _error(dec), _error(abs(s) - curv_rtol * abs(slope0))

    cur, low, high, ref, safe = start, start, start, start, start
    interval_found = done = failed = False
    count, dec = 0, math.inf
    curv = math.inf
    while not (done or failed):
        if not interval_found:  # Algorithm 3.5: grow the step until an interval is found
            step = guess if count == 0 else increase_factor * cur.step
            reached = False
            if max_stepsize is not None:
                reached, step = step >= max_stepsize, min(step, max_stepsize)
            new, dec, curv = trial(step)
            err = _nanmax(dec, curv)
            if dec <= tol:
                safe = new
            set_high = dec > 0.0 or (new.value >= cur.value and count > 0)
            set_low = new.slope >= 0.0 and not set_high
            low, high = (new, cur) if set_low else (cur, new)
            ref = low
            interval_found = set_high or set_low or err <= tol
            done = err <= tol or (reached and not interval_found)
            failed = count + 1 >= max_steps and not done
        else:  # Algorithm 3.6: zoom into [low, high]
            delta = abs(high.step - low.step)
            left, right = min(high.step, low.step), max(high.step, low.step)
            mid = _cubicmin(low.step, low.value, low.slope, high.step, high.value, ref.step,
                            ref.value)
            if not (left + 0.2 * delta < mid < right - 0.2 * delta):
                mid = _quadmin(low.step, low.value, low.slope, high.step, high.value)
                if not (left + 0.1 * delta < mid < right - 0.1 * delta):
                    mid = (low.step + high.step) / 2.0
            new, dec, curv = trial(mid)
            if dec <= tol and new.value < safe.value:
                safe = new
            done = _nanmax(dec, curv) <= tol
            high_to_mid = dec > 0.0 or new.value >= low.value
            high_to_low = new.slope * (high.step - low.step) >= 0.0 and not high_to_mid
            ref = high if high_to_mid or high_to_low else low
            high = low if high_to_low else new if high_to_mid else high
            low = low if high_to_mid else new
            failed = (count + 1 >= max_steps or (delta <= interval_threshold
                                                  and safe.step > 0.0)) and not done
        cur, count = new, count + 1
        if failed and (safe.step > 0.0 or math.isinf(dec)):
            cur = safe  # the best step with sufficient decrease (or none: stepsize 0)
    return cur.step, cur.x, cur.value, cur.grad, ZoomInfo(count, dec, curv)
