"""``EncoderDistanceMatrix``: the published Mithril's Minkowski distances between two sets of
points, with a learnable order."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .half_precision import float32_forward, float32_vjp
from .operator import Operator, ShapeError, backend_of, fmt, unify
from .primitives import _abs
from .probability_losses import tiny


def _full(xp: Any) -> Any:
    return xp.t if backend_of(xp) == "torch" else xp


def _order(xp: Any, norm: Any) -> Any:
    """The published norm modifier: p = 4·(1 − 2·|((n − 1) mod 8)/8 − ½|) + 1, a triangle
    wave of n with period 8 between 1 (n = 1) and 5 (n = 5); its gradient at the peaks
    n = 5 + 8k is 0 on every backend (``NormModifier``'s, torch's |·|; JAX's abs has 1)."""
    return 4.0 * (1.0 - 2.0 * _abs(xp, ((norm - 1.0) % 8) / 8 - 0.5)) + 1.0


def _safe_pow(xp: Any, a: Any, p: Any) -> Any:
    """a^p for a >= 0, 0 at a = 0, with finite gradients there (in a: 0; in p: 0)."""
    pos = a != 0  # (not > 0: a NaN stays NaN, as torch.cdist)
    return xp.where(pos, xp.exp(p * xp.log(xp.where(pos, a, 1.0))), 0.0)


class EncoderDistanceMatrix(Operator):
    """Distances between the rows of ``input1`` (N, d) and ``input2`` (M, d), (N, M), of an
    order p learnt through ``norm`` (shape (1,)), as the published Mithril's
    ``EncoderDistanceMatrix(get_final_distance=True, robust=True)``:

        p = 4·(1 − 2·|((norm − 1) mod 8)/8 − ½|) + 1           (in [1, 5])
        D_ij = Σ_k |input1_ik − input2_jk|^p
        output = D^(1/p)  (get_final_distance, the Minkowski distance), else D

    With ``robust`` (the published default) the root is the published robust power: D/c
    where D < c and 1/p < 1 − log c / log D (c the dtype's smallest normal number; at D = 0
    it is 0 with a finite gradient), D^(1/p) elsewhere. Every input is differentiable; a
    zero difference contributes a gradient of 0.

    A float16 / bfloat16 input is computed in float32 and rounded once (``half_precision``,
    every backend): D of p = 2 over 1024 features of 10 passes float16's 65504, its root 320
    does not. c stays the input dtype's (float16's 6.1e−5), so the robust cutoff is the
    same; D itself (``get_final_distance=False``, as MDS takes it) is inf where it passes
    the dtype's range, as it must."""

    inputs = ("input1", "input2", "norm")

    def __init__(self, get_final_distance: bool = True, robust: bool = True) -> None:
        for name, v in (("get_final_distance", get_final_distance), ("robust", robust)):
            if not isinstance(v, (bool, np.bool_)):
                raise TypeError(f"EncoderDistanceMatrix: {name} must be a bool, got {v!r}")
        self.get_final_distance, self.robust = bool(get_final_distance), bool(robust)

    def infer_shape(self, shapes):
        a, b, n = shapes.get("input1"), shapes.get("input2"), shapes.get("norm")
        for key, s in (("input1", a), ("input2", b)):
            if s is not None and len(s) != 2:
                raise ShapeError(f"EncoderDistanceMatrix: '{key}' must be (points, features), "
                                 f"got shape {fmt(s)}")
        if n is not None and math.prod(d or 1 for d in n) != 1:
            raise ShapeError(f"EncoderDistanceMatrix: 'norm' must hold one number, got shape {fmt(n)}")
        if a is None or b is None:
            return None
        unify(a[1:], b[1:], "input1 (features)", "input2 (features)")
        return (a[0], b[0])

    def forward(self, xp: Any, input1: Any, input2: Any, norm: Any) -> Any:
        return self._forward(xp, input1, input2, norm, tiny(input1.dtype))

    @float32_forward(on_torch=True)  # (c: the input dtype's cutoff, also in float32)
    def _forward(self, xp: Any, input1: Any, input2: Any, norm: Any, c: float) -> Any:
        xp = _full(xp)
        p = _order(xp, norm.reshape(()))
        a = xp.abs(input1[:, None, :] - input2[None, :, :])
        d = _safe_pow(xp, a, p).sum(-1)
        if not self.get_final_distance:
            return d
        e = 1.0 / p
        if not self.robust:
            return _safe_pow(xp, d, e)
        with np.errstate(divide="ignore"):
            lin = (e < 1 - math.log(c) / xp.log(d)) & (d < c)
        # (the unpicked d/c of a large d overflows)
        return xp.where(lin, xp.where(lin, d, 0.0) / c, _safe_pow(xp, d, e))

    def vjp(self, g, out, args, wrt):
        return self._vjp(g, out, args, wrt, tiny(args["input1"].dtype))

    @float32_vjp
    def _vjp(self, g, out, args, wrt, c: float):
        x1, x2, n = args["input1"], args["input2"], args["norm"]
        n0 = n.reshape(())
        p = _order(np, n0)
        diff = x1[:, None, :] - x2[None, :, :]
        a = np.abs(diff)
        pos = a != 0
        loga = np.log(np.where(pos, a, 1.0))
        ap = np.where(pos, np.exp(p * loga), 0.0)
        d = ap.sum(-1)
        gd, gp = g, 0.0
        if self.get_final_distance:
            e = 1.0 / p
            dpos = d != 0
            logd = np.log(np.where(dpos, d, 1.0))
            de = np.where(dpos, np.exp(e * logd), 0.0)
            lin = np.zeros_like(d, dtype=bool)
            if self.robust:
                with np.errstate(divide="ignore"):
                    lin = (e < 1 - math.log(c) / np.log(d)) & (d < c)
                slope = np.where(lin, 1 / c, np.where(dpos, e * de / np.where(dpos, d, 1.0), 0.0))
            else:
                slope = np.where(dpos, e * de / np.where(dpos, d, 1.0), 0.0)
            gd = g * slope
            # d/dp of D^(1/p): D^(1/p)·log D·(−1/p²); the linear piece has none
            gp = np.sum(np.where(lin, 0.0, g * de * logd)) * (-1.0 / (p * p))
        # d a^p / d diff = p·a^(p−1)·sign(diff) (0 at a = 0); d a^p / dp = a^p·log a
        gdiff = gd[:, :, None] * np.where(pos, p * ap / np.where(pos, a, 1.0), 0.0) * np.sign(diff)
        gp = gp + np.sum(gd[:, :, None] * ap * loga)
        inner = ((n0 - 1.0) % 8) / 8 - 0.5
        res = {"input1": gdiff.sum(1), "input2": -gdiff.sum(0),
               "norm": np.full(n.shape, gp * -np.sign(inner), dtype=n.dtype)}
        return {k: v for k, v in res.items() if k in wrt}

    def __repr__(self) -> str:
        return (f"EncoderDistanceMatrix(get_final_distance={self.get_final_distance}, "
                f"robust={self.robust})")
