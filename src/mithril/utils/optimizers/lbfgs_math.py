"""The arithmetic of :class:`~mithril.utils.optimizers.LBFGS`: one ``torch.optim.LBFGS.step``
ported line by line onto flat buffers, with the backend's own array ops.

Vectors (the parameters, gradients, directions and history) are flat buffers in the
optimizer state's layout: NumPy arrays (the NumPy backend and JAX on CPU, whose state
lives in host buffers), torch tensors, or ``jax.Array`` on JAX accelerators. :class:`Ops`
gives the few operations the method needs on each. No buffer is ever written after it is
made, except the two-loop recursion's own temporaries: a step can then be abandoned at
any point (a closure that raises) and the state it started from is intact.

Scalars follow torch's types: where torch holds a 0-d tensor (dot products, norms and
everything computed from them) we hold a NumPy scalar of the parameters' dtype, where it
holds a Python number (losses, the learning rate) a Python number. NumPy's promotion
(NEP 50: Python numbers are "weak") is torch's, so float32 scalars round as torch's do.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .engines import kernel_cache


@kernel_cache.jit(fastmath={"contract"}, nogil=True)
def _axpy_inplace(q: Any, a: Any, y: Any) -> None:  # pragma: no cover - compiled
    for i in range(q.size):
        q[i] += a * y[i]


@kernel_cache.jit(fastmath={"contract", "reassoc"}, nogil=True)
def _axpy_dot_inplace(q: Any, a: Any, y: Any, s: Any) -> float:  # pragma: no cover
    """``q += a·y`` (the bits of :func:`_axpy_inplace`), then ``s·q``, in one pass (the
    products summed in float64, in vector lanes)."""
    acc = 0.0
    for i in range(q.size):
        v = q[i] + a * y[i]
        q[i] = v
        acc += np.float64(s[i]) * np.float64(v)
    return acc


@kernel_cache.jit(fastmath={"contract"}, nogil=True)
def _axpy_new(x: Any, a: Any, d: Any) -> Any:  # pragma: no cover - compiled
    out = np.empty_like(x)
    for i in range(x.size):
        out[i] = x[i] + a * d[i]
    return out


@kernel_cache.jit(nogil=True)
def _abs_max_scaled(x: Any, s: Any) -> float:  # pragma: no cover - compiled
    """max |x_i·s| over a non-empty 1-D buffer (NaN if any is NaN), in one read: the value
    of ``(x * s).abs().max()`` exactly (products rounded alike; abs and max are exact)."""
    m = abs(x[0] * s)
    nan = m != m
    for i in range(1, x.size):
        v = abs(x[i] * s)
        nan |= v != v
        if v > m:
            m = v
    return np.nan if nan else m


def _fusable(a: Any, b: Any) -> bool:
    """Whether the fused loops apply: float32/float64 contiguous buffers of one dtype."""
    return (a.dtype == b.dtype and a.dtype.char in "fd" and a.flags.c_contiguous
            and b.flags.c_contiguous and a.shape == b.shape)


def scalar_type(dtype: str) -> Any:
    """The NumPy scalar type of ``dtype`` (bfloat16 from ml_dtypes, which JAX brings)."""
    try:
        return np.dtype(dtype).type
    except TypeError:
        import ml_dtypes

        return getattr(ml_dtypes, dtype)


class Ops:
    """Flat-buffer operations on NumPy arrays (JAX on CPU too: its state is host buffers).

    Every operation returns a new buffer, except ``axpy_`` (the two-loop recursion's
    temporaries). Scalars multiplying a buffer are cast to its dtype first, as torch does.
    ``x + a·y`` is one fused loop with a fused multiply-add, as torch's ``add(alpha=)``
    (the same bits, half NumPy's memory traffic); dot products and sums are NumPy's (BLAS,
    pairwise: they round differently from torch's), but for the two-loop recursion's, each
    fused with the update before it (:meth:`axpy_dot_`, summed in float64)."""

    def __init__(self, dtype: str) -> None:
        self.scalar = scalar_type(dtype)

    def neg(self, a: Any) -> Any:
        return np.negative(a)

    def sub(self, a: Any, b: Any) -> Any:
        return np.subtract(a, b)

    def mul(self, a: Any, s: Any) -> Any:
        return np.multiply(a, self.scalar(s))

    def add(self, x: Any, alpha: Any, d: Any) -> Any:
        """``x + alpha·d`` (torch's ``x.add(d, alpha=alpha)``)."""
        if _fusable(x, d):
            return _axpy_new(x, self.scalar(alpha), d)
        return x + self.scalar(alpha) * d

    def axpy_(self, q: Any, alpha: Any, y: Any) -> Any:
        """``q += alpha·y`` in place where the buffer allows; returns the result."""
        if _fusable(q, y) and q.flags.writeable:
            _axpy_inplace(q, self.scalar(alpha), y)
        else:
            q += self.scalar(alpha) * y
        return q

    def axpy_dot_(self, q: Any, alpha: Any, y: Any, s: Any) -> tuple[Any, Any]:
        """``q += alpha·y`` as :meth:`axpy_`, and ``s·q`` after it (None if ``s`` is),
        fused in one pass where the buffers allow."""
        if (s is not None and isinstance(q, np.ndarray) and _fusable(q, y) and _fusable(q, s)
                and q.flags.writeable):
            return q, self.scalar(_axpy_dot_inplace(q, self.scalar(alpha), y, s))
        q = self.axpy_(q, alpha, y)
        return q, None if s is None else self.dot(s, q)

    def dot(self, a: Any, b: Any) -> Any:
        return self.scalar(np.dot(a, b))

    def abs_max(self, a: Any) -> Any:
        return self.abs_max_scaled(a, 1)

    def abs_max_scaled(self, a: Any, s: Any) -> Any:
        """``abs_max(mul(a, s))`` without the product's buffer where the ops allow."""
        if a.size and a.dtype.char in "fd" and a.flags.c_contiguous:
            return self.scalar(_abs_max_scaled(a.reshape(-1), a.dtype.type(s)))
        return self.scalar(np.abs(self.mul(a, s)).max()) if a.size else self.scalar(0)

    def abs_sum(self, a: Any) -> Any:
        return self.scalar(np.abs(a).sum())

    def all_finite(self, a: Any) -> bool:
        return bool(np.isfinite(a).all())

    # the line search's scalars: torch's own types on torch (below), ours elsewhere
    def ls_dot(self, a: Any, b: Any) -> Any:
        return self.dot(a, b)

    def ls_abs_max(self, a: Any) -> Any:
        return self.abs_max(a)

    def ls_scalar(self, x: Any) -> Any:
        return x


class TorchOps(Ops):
    """The same with torch's own operations (torch's results to the last bit on CPU)."""

    def __init__(self, dtype: str, fused: bool = False) -> None:
        super().__init__(dtype)
        import torch

        self.torch = torch
        self.fused = fused

    def axpy_dot_(self, q: Any, alpha: Any, y: Any, s: Any) -> tuple[Any, Any]:
        """``fused``: on CPU, the update (torch's bits: one fused multiply-add) and the
        next dot product in one pass, as :meth:`Ops.axpy_dot_` (the dot summed in float64,
        so it rounds otherwise than torch's BLAS): one read of ``q`` fewer per history
        entry. Else torch's ``add_`` then ``dot``."""
        t = self.torch
        if (self.fused and s is not None and q.device.type == "cpu"
                and q.dtype in (t.float32, t.float64) and q.dtype == y.dtype == s.dtype
                and q.is_contiguous() and y.is_contiguous() and s.is_contiguous()):
            qn = q.detach().numpy()
            dot = _axpy_dot_inplace(qn, qn.dtype.type(float(alpha)), y.detach().numpy(),
                                    s.detach().numpy())
            return q, self.scalar(dot)
        q = self.axpy_(q, alpha, y)
        return q, None if s is None else self.dot(s, q)

    def neg(self, a: Any) -> Any:
        return a.neg()

    def sub(self, a: Any, b: Any) -> Any:
        return a.sub(b)

    def mul(self, a: Any, s: Any) -> Any:
        return a.mul(float(s))

    def add(self, x: Any, alpha: Any, d: Any) -> Any:
        return x.add(d, alpha=float(alpha))

    def axpy_(self, q: Any, alpha: Any, y: Any) -> Any:
        return q.add_(y, alpha=float(alpha))

    def dot(self, a: Any, b: Any) -> Any:
        return self.scalar(a.dot(b).item())

    def abs_max(self, a: Any) -> Any:
        return self.abs_max_scaled(a, 1)

    def abs_max_scaled(self, a: Any, s: Any) -> Any:
        """torch's ``a.mul(s).abs().max()``, in one read of CPU memory (the same value: the
        products round alike, abs and max are exact)."""
        if not a.numel():
            return self.scalar(0)
        if a.device.type == "cpu" and a.is_contiguous() and a.dtype in (
                self.torch.float32, self.torch.float64):
            flat = a.detach().reshape(-1).numpy()
            return self.scalar(_abs_max_scaled(flat, flat.dtype.type(float(s))))
        return self.scalar((a if s == 1 else a.mul(float(s))).abs().max().item())

    def abs_sum(self, a: Any) -> Any:
        return self.scalar(a.abs().sum().item())

    def all_finite(self, a: Any) -> bool:
        # a finite sum has no inf or NaN term (one read; isfinite().all() is ~50x slower on
        # torch CPU); a sum that overflowed is told apart by the exact test
        return bool(self.torch.isfinite(a.sum())) or bool(self.torch.isfinite(a).all())

    # The line search on torch's own scalars, 0-d tensors where torch holds them: its
    # arithmetic is then torch's, op for op, where NumPy scalars would round otherwise
    # (float32 ``sqrt`` is not correctly rounded on torch CPU; ``float / tensor`` is
    # ``reciprocal() * float``, two roundings).
    def ls_dot(self, a: Any, b: Any) -> Any:
        return a.dot(b)

    def ls_abs_max(self, a: Any) -> Any:
        return a.abs().max()

    def ls_scalar(self, x: Any) -> Any:
        if isinstance(x, np.generic):
            return self.torch.tensor(x.item(), dtype=getattr(self.torch, x.dtype.name))
        return x


class JaxOps(Ops):
    """The same with ``jax.numpy`` (JAX on accelerators: the state lives on the device)."""

    def __init__(self, dtype: str) -> None:
        super().__init__(dtype)
        import jax.numpy as jnp

        self.jnp = jnp

    def neg(self, a: Any) -> Any:
        return -a

    def sub(self, a: Any, b: Any) -> Any:
        return a - b

    def mul(self, a: Any, s: Any) -> Any:
        return a * self.jnp.asarray(s, a.dtype)

    def add(self, x: Any, alpha: Any, d: Any) -> Any:
        return x + self.jnp.asarray(alpha, x.dtype) * d

    def axpy_(self, q: Any, alpha: Any, y: Any) -> Any:
        return self.add(q, alpha, y)

    def dot(self, a: Any, b: Any) -> Any:
        return self.scalar(float(self.jnp.dot(a, b)))

    def abs_max(self, a: Any) -> Any:
        return self.scalar(float(self.jnp.abs(a).max())) if a.size else self.scalar(0)

    def abs_max_scaled(self, a: Any, s: Any) -> Any:
        return self.abs_max(self.mul(a, s))

    def abs_sum(self, a: Any) -> Any:
        return self.scalar(float(self.jnp.abs(a).sum()))

    def all_finite(self, a: Any) -> bool:
        return bool(self.jnp.isfinite(a).all())


@dataclass
class Memory:
    """What a step carries over (torch's ``state`` of its first parameter): the counters,
    the last direction ``d`` and step ``t``, ``H_diag``, the previous gradient and loss,
    and the history oldest first: ``dirs`` (y = g_new − g_old, torch's ``old_dirs``),
    ``stps`` (s = t·d, ``old_stps``) and ``ro`` (1/(y·s)). Lists of buffer references:
    a step that fails leaves the memory it was given unchanged."""

    n_iter: int = 0
    func_evals: int = 0
    t: Any = 0.0
    H_diag: Any = 1
    prev_loss: float = 0.0
    d: Any = None
    prev_flat_grad: Any = None
    dirs: list = field(default_factory=list)
    stps: list = field(default_factory=list)
    ro: list = field(default_factory=list)


def cubic_interpolate(x1: Any, f1: Any, g1: Any, x2: Any, f2: Any, g2: Any,
                      bounds: tuple[Any, Any] | None = None) -> Any:
    """torch's ``_cubic_interpolate`` (minFunc's polyinterp): the minimiser of the cubic
    through two points with their values and derivatives, clamped to ``bounds``."""
    if bounds is not None:
        xmin_bound, xmax_bound = bounds
    else:
        xmin_bound, xmax_bound = (x1, x2) if x1 <= x2 else (x2, x1)
    d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    d2_square = d1 * d1 - g1 * g2
    if d2_square >= 0:
        if isinstance(d2_square, np.generic):
            d2 = np.sqrt(d2_square)
        elif isinstance(d2_square, (int, float)):
            d2 = math.sqrt(d2_square)
        else:
            d2 = d2_square.sqrt()  # a torch 0-d tensor: torch's own sqrt, as torch
        if x1 <= x2:
            min_pos = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
        else:
            min_pos = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
        return min(max(min_pos, xmin_bound), xmax_bound)
    return (xmin_bound + xmax_bound) / 2.0


def strong_wolfe(ops: Ops, obj_func: Callable, x: Any, t: Any, d: Any, f: float, g: Any,
                 gtd: Any, c1: float = 1e-4, c2: float = 0.9, tolerance_change: float = 1e-9,
                 max_ls: int = 25) -> tuple[float, Any, Any, int]:
    """torch's ``_strong_wolfe`` (minFunc's lswolfe): a step ``t`` along ``d`` satisfying
    the strong Wolfe conditions, bracketed then zoomed by cubic interpolation. Returns
    ``(loss, gradient, t, evaluations)``. Its scalars are ``ops.ls_*``'s (torch's 0-d
    tensors on torch, as torch's)."""
    d_norm = ops.ls_abs_max(d)
    f_new, g_new = obj_func(x, t, d)
    ls_func_evals = 1
    gtd_new = ops.ls_dot(g_new, d)

    # bracket an interval containing a point satisfying the Wolfe criteria
    t_prev, f_prev, g_prev, gtd_prev = 0, f, g, gtd
    done = False
    ls_iter = 0
    bracket: list = []
    bracket_f: list = []
    bracket_g: list = []
    bracket_gtd: list = [None, None]
    while ls_iter < max_ls:
        if f_new > (f + c1 * t * gtd) or (ls_iter > 1 and f_new >= f_prev):
            bracket, bracket_f = [t_prev, t], [f_prev, f_new]
            bracket_g, bracket_gtd = [g_prev, g_new], [gtd_prev, gtd_new]
            break
        if abs(gtd_new) <= -c2 * gtd:
            bracket, bracket_f, bracket_g = [t], [f_new], [g_new]
            done = True
            break
        if gtd_new >= 0:
            bracket, bracket_f = [t_prev, t], [f_prev, f_new]
            bracket_g, bracket_gtd = [g_prev, g_new], [gtd_prev, gtd_new]
            break
        # interpolate
        min_step = t + 0.01 * (t - t_prev)
        max_step = t * 10
        tmp = t
        t = cubic_interpolate(t_prev, f_prev, gtd_prev, t, f_new, gtd_new,
                              bounds=(min_step, max_step))
        # next step
        t_prev, f_prev, g_prev, gtd_prev = tmp, f_new, g_new, gtd_new
        f_new, g_new = obj_func(x, t, d)
        ls_func_evals += 1
        gtd_new = ops.ls_dot(g_new, d)
        ls_iter += 1

    # reached max number of iterations?
    if ls_iter == max_ls:
        bracket, bracket_f, bracket_g = [0, t], [f, f_new], [g, g_new]

    # zoom phase: refine the bracket until a point satisfies the criteria
    insuf_progress = False
    low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[-1] else (1, 0)
    while not done and ls_iter < max_ls:
        if abs(bracket[1] - bracket[0]) * d_norm < tolerance_change:
            break  # the bracket is too small
        t = cubic_interpolate(bracket[0], bracket_f[0], bracket_gtd[0],
                              bracket[1], bracket_f[1], bracket_gtd[1])
        # a t too close to an end of the bracket, or at it, twice in a row: move it 10% of
        # the bracket's length inside
        eps = 0.1 * (max(bracket) - min(bracket))
        if min(max(bracket) - t, t - min(bracket)) < eps:
            if insuf_progress or t >= max(bracket) or t <= min(bracket):
                if abs(t - max(bracket)) < abs(t - min(bracket)):
                    t = max(bracket) - eps
                else:
                    t = min(bracket) + eps
                insuf_progress = False
            else:
                insuf_progress = True
        else:
            insuf_progress = False

        f_new, g_new = obj_func(x, t, d)
        ls_func_evals += 1
        gtd_new = ops.ls_dot(g_new, d)
        ls_iter += 1

        if f_new > (f + c1 * t * gtd) or f_new >= bracket_f[low_pos]:
            # Armijo condition not satisfied or not lower than the lowest point
            bracket[high_pos], bracket_f[high_pos] = t, f_new
            bracket_g[high_pos], bracket_gtd[high_pos] = g_new, gtd_new
            low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[1] else (1, 0)
        else:
            if abs(gtd_new) <= -c2 * gtd:
                done = True  # Wolfe conditions satisfied
            elif gtd_new * (bracket[high_pos] - bracket[low_pos]) >= 0:
                # old high becomes new low
                bracket[high_pos], bracket_f[high_pos] = bracket[low_pos], bracket_f[low_pos]
                bracket_g[high_pos] = bracket_g[low_pos]
                bracket_gtd[high_pos] = bracket_gtd[low_pos]
            # new point becomes new low
            bracket[low_pos], bracket_f[low_pos] = t, f_new
            bracket_g[low_pos], bracket_gtd[low_pos] = g_new, gtd_new

    return bracket_f[low_pos], bracket_g[low_pos], bracket[low_pos], ls_func_evals


def lbfgs_step(ops: Ops, evaluate: Callable[[Any], tuple[float, Any]], x: Any, loss: float,
               flat_grad: Any, mem: Memory, *, lr: float, max_iter: int, max_eval: int,
               tolerance_grad: float, tolerance_change: float, history_size: int,
               line_search_fn: str | None) -> tuple[Any, Memory]:
    """One ``torch.optim.LBFGS.step``: up to ``max_iter`` iterations from ``x``, whose loss
    and gradient (the step's first evaluation) are ``loss`` and ``flat_grad``.
    ``evaluate(x)`` gives the loss and gradient at other points. Returns the new point and
    a new :class:`Memory` (``mem`` is not modified)."""
    mem = Memory(mem.n_iter, mem.func_evals + 1, mem.t, mem.H_diag, mem.prev_loss, mem.d,
                 mem.prev_flat_grad, list(mem.dirs), list(mem.stps), list(mem.ro))
    current_evals = 1
    if ops.abs_max(flat_grad) <= tolerance_grad:  # optimal condition
        return x, mem

    d, t, H_diag = mem.d, mem.t, mem.H_diag
    old_dirs, old_stps, ro = mem.dirs, mem.stps, mem.ro
    prev_flat_grad, prev_loss = mem.prev_flat_grad, mem.prev_loss
    n_iter = 0
    while n_iter < max_iter:
        n_iter += 1
        mem.n_iter += 1

        # the descent direction
        if mem.n_iter == 1:
            d = ops.neg(flat_grad)
            old_dirs.clear(), old_stps.clear(), ro.clear()
            H_diag = 1
        else:
            # update the memory
            y = ops.sub(flat_grad, prev_flat_grad)
            s = ops.mul(d, t)
            ys = ops.dot(y, s)
            if ys > 1e-10:
                if len(old_dirs) == history_size:  # shift the history by one
                    old_dirs.pop(0), old_stps.pop(0), ro.pop(0)
                old_dirs.append(y)
                old_stps.append(s)
                ro.append(1.0 / ys)
                H_diag = ys / ops.dot(y, y)  # scale of the initial Hessian approximation
            # the two-loop recursion: d = −H·g for the L-BFGS inverse Hessian H
            num_old = len(old_dirs)
            al: list = [None] * num_old
            # (each update fused with the next loop's dot product where the ops can: one
            # read of q or r fewer per history entry)
            q = ops.neg(flat_grad)
            qs = ops.dot(old_stps[-1], q) if num_old else None
            for i in range(num_old - 1, -1, -1):
                al[i] = qs * ro[i]
                q, qs = ops.axpy_dot_(q, -al[i], old_dirs[i], old_stps[i - 1] if i else None)
            r = ops.mul(q, H_diag)
            ry = ops.dot(old_dirs[0], r) if num_old else None
            for i in range(num_old):
                be_i = ry * ro[i]
                r, ry = ops.axpy_dot_(r, al[i] - be_i, old_stps[i],
                                      old_dirs[i + 1] if i + 1 < num_old else None)
            d = r

        prev_flat_grad = flat_grad  # never written in place: no copy needed
        prev_loss = loss

        # the step length
        if mem.n_iter == 1:
            t = min(1.0, 1.0 / ops.abs_sum(flat_grad)) * lr
        else:
            t = lr
        gtd = ops.ls_dot(flat_grad, d)  # directional derivative
        if gtd > -tolerance_change:
            break

        ls_func_evals = 0
        if line_search_fn is not None:
            def obj_func(x: Any, t: Any, d: Any) -> tuple[float, Any]:
                return evaluate(ops.add(x, t, d))

            loss, flat_grad, t, ls_func_evals = strong_wolfe(
                ops, obj_func, x, ops.ls_scalar(t), d, loss, flat_grad, gtd,
                max_ls=max_eval - current_evals)
            x = ops.add(x, t, d)
            opt_cond = ops.abs_max(flat_grad) <= tolerance_grad
        else:
            x = ops.add(x, t, d)  # a fixed step
            opt_cond = False
            if n_iter != max_iter:  # torch re-evaluates except in the last iteration
                loss, flat_grad = evaluate(x)
                opt_cond = ops.abs_max(flat_grad) <= tolerance_grad
                ls_func_evals = 1

        current_evals += ls_func_evals
        mem.func_evals += ls_func_evals

        # conditions to stop
        if n_iter == max_iter or current_evals >= max_eval or opt_cond:
            break
        if ops.abs_max_scaled(d, t) <= tolerance_change:
            break  # lack of progress
        if abs(loss - prev_loss) < tolerance_change:
            break

    mem.d, mem.t, mem.H_diag = d, t, H_diag
    mem.prev_flat_grad, mem.prev_loss = prev_flat_grad, prev_loss
    return x, mem
