"""Muon's elementwise passes around the Newton–Schulz products, fused in numba with
torch.optim.Muon's bits (float32 on the CPU; :meth:`.Muon.fused_step`).

torch makes five passes over each matrix besides the products (``buf.lerp_``, the Nesterov
``lerp``, the cast to bfloat16, ``mul_`` for weight decay, ``add_``) and ours two more
(the gradient norm, the non-finite probe). Here they are two:

* :func:`momentum_pass` reads ``g`` and ``buf`` once: Σg² (float64), ``buf ← lerp(buf, g,
  1−μ)``, ``u = lerp(g, buf, μ)`` (Nesterov) written straight as bfloat16 (the
  iteration's input), and the new ``buf``'s largest exponent field;
* :func:`apply_pass` reads the bfloat16 result once: ``p ← p·keep + α·O``, probed too.

The same bits as torch's kernels, operation by operation: ``lerp`` is ``fma(w, end −
start, start)`` for ``|w| < 0.5``, else ``fma(w − 1, end − start, end)`` (ATen's
``lerp_vec``); the cast rounds to nearest even; ``add_(o, alpha=α)`` of a bfloat16 ``o``
is ``fma(o, α, p)`` in float32; scalars are rounded to float32 first, as ATen's opmath.
``tests/test_muon_fused.py`` checks them against torch.optim.Muon bit for bit.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from . import kernel_cache
from .kernels import exponent_bits


@intrinsic
def fma(typingctx, a, b, c):  # pragma: no cover - compiled by numba
    """``a·b + c`` rounded once (LLVM's ``llvm.fma``), for three floats of one type."""
    if isinstance(a, types.Float) and a == b == c:
        def codegen(context, builder, signature, args):
            ty = args[0].type
            fn = builder.module.declare_intrinsic("llvm.fma", [ty], ir.FunctionType(ty, [ty] * 3))
            return builder.call(fn, args)
        return a(a, b, c), codegen
    return None


@intrinsic
def widen_bf16(typingctx, x):  # pragma: no cover - compiled by numba
    """The float32 value of bfloat16 bits (a uint16): exact."""
    if isinstance(x, types.Integer) and x.bitwidth == 16:
        def codegen(context, builder, signature, args):
            wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
            return builder.bitcast(wide, ir.FloatType())
        return types.float32(x), codegen
    return None


@kernel_cache.jit(nogil=True, fastmath={"reassoc"})
def momentum_pass(buf: Any, g: Any, x16: Any, c_buf: Any, from_g: bool, c_u: Any,
                  u_from_buf: bool, nesterov: bool) -> tuple[float, int]:  # pragma: no cover
    """One pass over a matrix's float32 ``g`` and ``buf`` (1-D, same size), ``x16`` (uint16,
    the bfloat16 input of the iteration): ``buf ← lerp(buf, g, w)`` with ``c_buf`` = w or
    w − 1 (``from_g``: |w| ≥ 0.5, the base is ``g``), then ``u = lerp(g, buf, μ)`` likewise
    (``c_u``, ``u_from_buf``) if ``nesterov``, else ``u = buf``, written rounded to bfloat16.
    Returns (Σg² in float64, the new ``buf``'s largest exponent field)."""
    s = 0.0
    z = exponent_bits(buf[0]) & 0
    for i in range(g.size):
        gi, bi = g[i], buf[i]
        gd = np.float64(gi)
        s += gd * gd
        nb = fma(c_buf, gi - bi, gi if from_g else bi)
        buf[i] = nb
        z = max(z, exponent_bits(nb))
        u = nb
        if nesterov:
            u = fma(c_u, nb - gi, nb if u_from_buf else gi)
        bits = np.uint32(np.float32(u).view(np.uint32))
        if (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):  # NaN: torch's quiet NaN
            x16[i] = np.uint16(0x7FC0)
        else:
            x16[i] = np.uint16((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16)
    return s, z


@kernel_cache.jit(nogil=True)
def apply_pass(p: Any, o16: Any, keep: Any, decay: bool, alpha: Any) -> int:  # pragma: no cover
    """``p ← p·keep`` (if ``decay``) then ``p ← fma(O, α, p)``, for a float32 matrix ``p``
    (2-D) and the iteration's bfloat16 result ``o16`` (uint16, 2-D, any strides: a tall
    matrix's result is a transposed view). Returns the new ``p``'s largest exponent field."""
    z = exponent_bits(p[0, 0]) & 0
    rows, cols = p.shape
    for i in range(rows):
        for j in range(cols):
            v = p[i, j]
            if decay:
                v = v * keep
            v = fma(widen_bf16(o16[i, j]), alpha, v)
            p[i, j] = v
            z = max(z, exponent_bits(v))
    return z


def weights(w: float) -> tuple[np.float32, bool]:
    """ATen's ``lerp_vec`` coefficient for a scalar weight: (w or w − 1 in float32, whether
    the base is ``end``)."""
    w32 = np.float32(w)
    big = not abs(w32) < 0.5
    return (np.float32(w32 - np.float32(1.0)) if big else w32), big


_F32_TOP = 0x7F800000  # float32's exponent field all ones: inf or NaN


def numpy_of(a: Any) -> np.ndarray:
    """A CPU array's memory as NumPy (a torch tensor's without a copy)."""
    return a if isinstance(a, np.ndarray) else a.detach().numpy()


def step_matrix(xp: Any, p: Any, g: Any, buf: Any, row: Any, lr: float, iterate: Any
                ) -> tuple[float, bool]:
    """One matrix of Muon's in-place step (float32 on the CPU, bfloat16 iteration; torch
    tensors ``p``, ``g``, ``buf``, possibly views of NumPy memory): :func:`momentum_pass`,
    ``iterate`` (``muon._newton_schulz_torch`` on the bfloat16 scratch it filled), then
    :func:`apply_pass`. Returns (Σg², whether the new ``p`` and ``buf`` are finite)."""
    from ..muon import _buffers

    torch = xp.m
    x = _buffers(torch, "x16", tuple(g.shape), torch.bfloat16, 1, g.device)[0]
    c_buf, from_g = weights(1 - row.momentum)
    c_u, u_from_buf = weights(row.momentum)
    gn = np.ascontiguousarray(numpy_of(g)).reshape(-1)
    s, zb = momentum_pass(numpy_of(buf).reshape(-1), gn, bits16(x).reshape(-1), c_buf, from_g,
                          c_u, u_from_buf, row.nesterov)
    o = iterate(xp, x, row.ns_coefficients, row.ns_steps, row.epsilon, "bfloat16", owned=True)
    keep = 1.0 - row.learning_rate * row.weight_decay
    zp = apply_pass(numpy_of(p), bits16(o), np.float32(keep), bool(row.weight_decay),
                    np.float32(-lr))
    return float(s), int(zb) != _F32_TOP and int(zp) != _F32_TOP


def bits16(t: Any) -> np.ndarray:
    """A bfloat16 CPU tensor's bits as a uint16 NumPy view (any strides, no copy)."""
    import torch

    return t.view(torch.int16).numpy().view(np.uint16)


@kernel_cache.jit(nogil=True)
def _max_exponent(x: Any) -> int:  # pragma: no cover - compiled
    """The largest exponent field in a non-empty 1-D float buffer (all ones: an inf or a
    NaN somewhere): an integer max, one vectorised pass, no temporary."""
    z = exponent_bits(x[0])
    for i in range(1, x.size):
        z = max(z, exponent_bits(x[i]))
    return z


def finite(a: Any) -> bool:
    """Whether a CPU array (NumPy, or a torch tensor's memory) holds no inf or NaN."""
    flat = numpy_of(a).reshape(-1)
    return int(_max_exponent(flat)) != (_F32_TOP if flat.dtype.itemsize == 4
                                        else 0x7FF0000000000000)


@kernel_cache.jit(fastmath={"reassoc", "contract"}, nogil=True)
def _sumsq(x: Any) -> float:  # pragma: no cover - compiled
    """Σ x² of a 1-D buffer in float64 (no float64 copy of it)."""
    acc = 0.0
    for i in range(x.size):
        v = np.float64(x[i])
        acc += v * v
    return acc


def grad_sumsq(torch: Any, g: Any) -> float:
    """Σ g² in float64 (as :meth:`.TorchOps.sumsq`, to the last bits' rounding): on the CPU
    in one numba pass over the memory, else through one float64 copy."""
    if isinstance(g, np.ndarray) or g.device.type == "cpu":
        return float(_sumsq(np.ascontiguousarray(numpy_of(g)).reshape(-1)))
    return float(g.detach().to(torch.float64, copy=True).square_().sum())
