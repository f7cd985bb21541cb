"""Muon's Newton–Schulz orthogonalisation (torch's ``_zeropower_via_newtonschulz``) on
every backend, and the scratch-buffer helpers of its NumPy / torch fast path: the same
operations as torch, the products written in place into per-thread buffers."""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from .engines import kernel_cache
from .engines import muon_kernels as _mk
from .tensorwise import NumpyOps, TorchOps


@kernel_cache.jit(nogil=True)
def _bf16_round(x: Any) -> None:  # pragma: no cover - compiled
    """``x`` (float32, 1-D) rounded in place to the nearest bfloat16 (ties to even, NaN
    kept): NumpyOps.rnd in one pass."""
    u = x.view(np.uint32)
    for i in range(u.size):
        b = u[i]
        r = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        u[i] = b if (b & 0x7FFFFFFF) > 0x7F800000 else r


@kernel_cache.jit(nogil=True)
def _axpby(out: Any, x: Any, beta: Any, alpha: Any, bf16: bool) -> None:  # pragma: no cover
    """``out ← beta·x + alpha·out`` (1-D, one dtype; NumPy's ``beta*x + alpha*out``: two
    products and a sum, each rounded; no fused multiply-add), rounded to bfloat16 if
    ``bf16``: :meth:`.NumpyOps.addmm`'s elementwise part in one pass."""
    for i in range(out.size):
        out[i] = beta * x[i] + alpha * out[i]
    if bf16:
        _bf16_round(out)


_scratch = threading.local()


def _guard(xp: NumpyOps, norm: Any, eps: float, add_eps: bool) -> Any:
    """The divisor of the normalisation: ``max(norm, eps)`` (torch) or ``norm + eps``
    (MLX, ``add_eps``)."""
    return norm + eps if add_eps else xp.clamp_min(norm, eps)


def _buffers(m: Any, role: str, shape: tuple, dtype: Any, n: int, device: Any = None
             ) -> list[Any]:
    """``n`` scratch arrays of ``shape`` for ``role``: views of flat buffers (``m``: numpy
    or torch) made once per thread, dtype and device, and grown to the largest shape asked
    for; fresh large arrays each step would cost the kernel's page faults."""
    cache = _scratch.__dict__.setdefault("buffers", {})
    key, size = (m.__name__, role, dtype, device), math.prod(shape)
    flat = cache.get(key)
    if flat is None or flat[0].shape[0] < size:
        kw = {} if device is None else {"device": device}
        flat = cache[key] = [m.empty((size,), dtype=dtype, **kw) for _ in range(n)]
    return [f[:size].reshape(shape) for f in flat]


def _newton_schulz_numpy(xp: NumpyOps, G: Any, coefficients: Sequence[float], steps: int,
                         eps: float, dtype: str | None, add_eps: bool = False) -> Any:
    """:func:`newton_schulz` on NumPy float32/float64 (bfloat16 emulated in float32) into
    this thread's scratch buffers (the result is one: use it before the next call): the
    same operations, the products written in place (``out=``), the elementwise parts
    fused and rounded in one pass, and ``A·A`` (A = X·Xᵀ is symmetric, exactly: NumPy
    computes X·Xᵀ by BLAS ``syrk``, one triangle, and mirrors it) as ``A·Aᵀ``, which NumPy
    also computes by ``syrk``: 2.5 matrix products' work per iteration instead of 3. The
    products' float32 sums round as BLAS orders them (as ``@`` does; bfloat16: within
    torch's bfloat16 rounding)."""
    a, b, c = coefficients
    bf16 = dtype == "bfloat16"
    work = np.dtype(np.float32 if bf16 else G.dtype if dtype is None else dtype)
    tall = G.shape[0] > G.shape[1]
    m, n = G.shape[::-1] if tall else G.shape
    X, Y = _buffers(np, "X", (m, n), work, 2)
    A, B = _buffers(np, "A", (m, m), work, 2)
    np.copyto(X, G.T if tall else G, casting="unsafe")  # G in the work dtype (as astype)
    flat = X.reshape(-1)
    if bf16:
        _bf16_round(flat)
    norm = np.sqrt(np.float64(_mk._sumsq(flat))).astype(work)  # NumpyOps.norm0, no copy
    rnd = xp.rnd if bf16 else (lambda v: v)
    np.divide(X, rnd(_guard(xp, rnd(norm), eps, add_eps)), out=X)  # spectral norm <= 1
    if bf16:
        _bf16_round(flat)
    kind = work.type
    a, b, c, one = kind(a), kind(b), kind(c), kind(1.0)
    for _ in range(steps):
        np.matmul(X, X.T, out=A)
        if bf16:
            _bf16_round(A.reshape(-1))
        np.matmul(A, A.T, out=B)  # A·A
        _axpby(B.reshape(-1), A.reshape(-1), b, c, bf16)  # B = b·A + c·A·A
        np.matmul(B, X, out=Y)
        _axpby(Y.reshape(-1), flat, a, one, bf16)  # X ← a·X + B·X
        X, Y = Y, X
        flat = X.reshape(-1)
    return X.T if tall else X


def _newton_schulz_torch(xp: NumpyOps, G: Any, coefficients: Sequence[float], steps: int,
                         eps: float, dtype: str | None, owned: bool = False,
                         add_eps: bool = False) -> Any:
    """:func:`newton_schulz` on torch: torch's very operations (the same bits), the
    products written into this thread's scratch buffers (``out=``; the result is one:
    use it before the next call). ``owned``: ``G`` is already the copy in ``dtype`` that
    torch makes first (a scratch buffer of :meth:`Muon.fused_step`), iterated in place."""
    torch = xp.m
    a, b, c = coefficients
    if owned:
        X = G
    else:
        X = G.clone() if dtype is None else G.to(getattr(torch, dtype), copy=True)
    tall = G.shape[0] > G.shape[1]
    if tall:
        X = X.T
    X.div_(X.norm() + eps if add_eps else X.norm().clamp(min=eps))  # in place, as torch
    m, n = X.shape
    A, B = _buffers(torch, "A", (m, m), X.dtype, 2, X.device)
    Y, Z = _buffers(torch, "X", (m, n), X.dtype, 2, X.device)
    for i in range(steps):
        torch.mm(X, X.T, out=A)
        torch.addmm(A, A, A, beta=b, alpha=c, out=B)
        out = Y if i % 2 == 0 else Z
        torch.addmm(X, B, X, beta=a, out=out)
        X = out
    return X.T if tall else X


def _newton_schulz(xp: NumpyOps, G: Any, coefficients: Sequence[float], steps: int, eps: float,
                   dtype: str | None, add_eps: bool = False) -> Any:
    """:func:`newton_schulz`, on NumPy and torch into scratch buffers (use the result
    before the next call)."""
    if xp.name == "numpy" and G.ndim == 2 and min(G.shape) > 0 and (
            dtype is not None or G.dtype.char in "fd"):
        return _newton_schulz_numpy(xp, G, coefficients, steps, eps, dtype, add_eps)
    if xp.name == "torch" and G.ndim == 2 and min(G.shape) > 0:
        return _newton_schulz_torch(xp, G, coefficients, steps, eps, dtype, add_eps=add_eps)
    return None


_TORCH: dict[str, Any] = {}


def _torch_for_numpy() -> TorchOps | None:
    """torch's ops, where it is installed and ``MITHRIL_MUON_TORCH=0`` is not set, else None.
    NumPy has no bfloat16 matrix product, and torch's CPU one (oneDNN) is 3-4x OpenBLAS'
    float32 one, so Muon's bfloat16 step on the NumPy backend runs torch's very operations
    on zero-copy views of the arrays (the same bits as ``torch.optim.Muon``); without torch
    it is emulated with float32 BLAS (:func:`_newton_schulz_numpy`)."""
    if "module" not in _TORCH:
        import importlib.util

        found = (os.environ.get("MITHRIL_MUON_TORCH", "1") != "0"
                 and importlib.util.find_spec("torch") is not None)
        _TORCH["module"] = TorchOps() if found else None
    return _TORCH["module"]


def _lerp_scratch(xp: NumpyOps, a: Any, b: Any, w: float) -> Any:
    """``xp.lerp(a, b, w)`` (the same bits) into a scratch buffer on NumPy and torch (the
    Newton–Schulz input: used at once)."""
    if xp.name not in ("numpy", "torch") or a.shape != b.shape or a.dtype != b.dtype:
        return xp.lerp(a, b, w)
    out = _buffers(xp.m, "u", tuple(a.shape), a.dtype, 1,
                   a.device if xp.name == "torch" else None)[0]
    if xp.name == "torch":
        return xp.m.lerp(a, b, w, out=out)
    np.subtract(b, a, out=out)
    if abs(w) < 0.5:  # a + w·(b − a), else b − (b − a)·(1 − w): NumpyOps.lerp
        np.multiply(out, w, out=out)
        return np.add(a, out, out=out)
    np.multiply(out, 1 - w, out=out)
    return np.subtract(b, out, out=out)


def _add_scaled_scratch(xp: NumpyOps, p: Any, o: Any, alpha: float) -> Any:
    """``xp.add_scaled(p, o, alpha)`` (the same bits) with one new array, ``o`` being a
    scratch buffer of :func:`_newton_schulz` (NumPy: overwritten; torch: a bfloat16 ``o``
    widened into another first, which torch's mixed-dtype ``add`` would allocate)."""
    if xp.name == "torch" and abs(alpha) > xp.m.finfo(p.dtype).max:
        return p + o.to(p.dtype) * alpha  # torch's add refuses such an alpha: inf, as NumPy
    if xp.name == "numpy" and o.dtype == p.dtype:
        return np.add(p, np.multiply(o, alpha, out=o))
    if xp.name == "torch" and o.dtype != p.dtype and o.is_floating_point():
        # (in the promoted dtype, rounded once: float16 p + bfloat16 o is float32 in
        # torch's add_, where an add of two float16 tensors rounds differently)
        dt = xp.m.promote_types(p.dtype, o.dtype)
        wide = _buffers(xp.m, "wide", tuple(o.shape), dt, 1, o.device)[0]
        out = xp.m.add(p, wide.copy_(o), alpha=alpha)
        return out if out.dtype == p.dtype else out.to(p.dtype)
    return xp.add_scaled(p, o, alpha)


def newton_schulz(xp: NumpyOps, G: Any, coefficients: Sequence[float], steps: int, eps: float,
                  dtype: str | None = "bfloat16", add_eps: bool = False) -> Any:
    """torch's ``_zeropower_via_newtonschulz``: ``steps`` quintic iterations towards the
    orthogonal factor of the matrix ``G``, in ``dtype`` (None: ``G``'s own; bfloat16 as
    torch, emulated on NumPy and JAX by rounding every result to bfloat16). ``G`` is first
    divided by ``max(‖G‖, eps)`` (torch), or by ``‖G‖ + eps`` with ``add_eps`` (MLX)."""
    fast = _newton_schulz(xp, G, coefficients, steps, eps, dtype, add_eps)
    if fast is not None:
        return xp.copy(fast)  # not the scratch buffer
    a, b, c = coefficients
    X, rnd = xp.low_precision(G, dtype)
    tall = G.shape[0] > G.shape[1]
    if tall:
        X = xp.T(X)
    X = rnd(X / rnd(_guard(xp, rnd(xp.norm0(X)), eps, add_eps)))  # spectral norm <= 1
    for _ in range(steps):
        A = rnd(X @ xp.T(X))
        B = rnd(xp.addmm(A, A, A, b, c))
        X = rnd(xp.addmm(X, B, X, a, 1.0))
    return xp.T(X) if tall else X


def newton_schulz_axes(xp: NumpyOps, U: Any, axes: Any, coefficients: Sequence[float],
                       steps: int, eps: float, dtype: str | None) -> Any:
    """:func:`newton_schulz` of a tensor under ``weight_dimension_numbers`` (``axes``: its
    :class:`~.dimension_numbers.Axes`): as optax, ``U`` transposed and reshaped to
    ``(B, fan_in, fan_out)``, each of the B matrices orthogonalised alone, and the result
    put back in ``U``'s shape. A 2-D tensor is orthogonalised as it is (the iteration gives
    the transpose of a transposed matrix's result, to the bit)."""
    from .dimension_numbers import from_matrices, to_matrices

    if len(U.shape) == 2:
        return newton_schulz(xp, U, coefficients, steps, eps, dtype)
    mats = to_matrices(xp, U, axes)
    out = [newton_schulz(xp, mats[i], coefficients, steps, eps, dtype)
           for i in range(mats.shape[0])]
    return from_matrices(xp, xp.m.stack(out), axes, tuple(U.shape))
