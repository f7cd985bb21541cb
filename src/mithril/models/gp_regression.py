"""Gaussian-process regression of the published Mithril: ``GaussProcessRegressionCore`` and
the linear-algebra primitives it is built from (``AddDiagonal``, ``SymmetricSolve``,
``TransposedDiagonal``, ``GPRLoss``).

A symmetric matrix is read as its symmetric part (A + Aᵀ)/2, so the gradient with respect
to it is symmetric: the convention of torch's and JAX's Cholesky, whose gradients the
published Mithril's (built on ``cholesky``) are."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import InputValueError
from .arithmetic import Add, MatrixMultiply
from .half_precision import float32_forward, float32_vjp
from .model import IOKey, Model
from .operator import Operator, ShapeError, fmt, torch_of, unbroadcast, unify
from .primitives import Absolute, Subtract
from .shaping import Transpose


def _square(who: str, key: str, s: Any) -> None:
    if s is not None and (len(s) != 2 or None not in s and s[0] != s[1]):
        raise ShapeError(f"{who}: '{key}' must be a square matrix (N, N), got shape {fmt(s)}")


def _one_number(who: str, key: str, s: Any) -> None:
    if s is not None and math.prod(d or 1 for d in s) != 1:
        raise ShapeError(f"{who}: '{key}' must hold one number, got shape {fmt(s)}")


def _sym(x: Any) -> Any:
    return (x + x.swapaxes(-1, -2)) * 0.5


def _linalg(xp: Any) -> Any:
    torch = torch_of(xp)
    return torch.linalg if torch is not None else xp.linalg


class AddDiagonal(Operator):
    """input + value·I for a square (N, N) ``input`` and a one-number ``value`` (the
    published Mithril's ``k + s·Eye(N)``). Gradients: the cotangent for ``input``, its trace
    for ``value``."""

    inputs = ("input", "value")

    def infer_shape(self, shapes):
        _square("AddDiagonal", "input", shapes.get("input"))
        _one_number("AddDiagonal", "value", shapes.get("value"))
        return shapes.get("input")

    def forward(self, xp: Any, input: Any, value: Any) -> Any:
        torch = torch_of(xp)
        n = input.shape[0]
        eye = torch.eye(n, dtype=input.dtype, device=input.device) if torch else xp.eye(n, dtype=input.dtype)
        return input + value.reshape(()) * eye

    def vjp(self, g, out, args, wrt):
        res = {"input": g, "value": np.full(np.shape(args["value"]), np.trace(g), dtype=g.dtype)}
        return {k: v for k, v in res.items() if k in wrt}


class SymmetricSolve(Operator):
    """S⁻¹·input for S = (matrix + matrixᵀ)/2, ``matrix`` (N, N) and ``input`` (N, M): the
    published Mithril's ``GPRAlpha`` (and, times kᵀ, ``GPRVOuter``), solved through the
    Cholesky factor there. Gradients: S⁻¹·G for ``input``, the symmetric part of
    −S⁻¹·G·outᵀ for ``matrix``."""

    inputs = ("matrix", "input")

    def infer_shape(self, shapes):
        a, b = shapes.get("matrix"), shapes.get("input")
        _square("SymmetricSolve", "matrix", a)
        if b is not None and len(b) != 2:
            raise ShapeError(f"SymmetricSolve: 'input' must be (N, M), got shape {fmt(b)}")
        if a is None or b is None:
            return None
        unify(a[:1], b[:1], "matrix (rows)", "input (rows)")
        return (a[0] if a[0] is not None else b[0], b[1])

    # (float16 / bfloat16 in float32, rounded once, as torch.autocast's linalg: torch has no CPU
    # half lu, NumPy and JAX no float16 solve)
    @float32_forward(on_torch=True)
    def forward(self, xp: Any, matrix: Any, input: Any) -> Any:
        linalg = _linalg(xp)
        try:
            return linalg.solve(_sym(matrix), input)
        except getattr(linalg, "LinAlgError", np.linalg.LinAlgError) as e:  # (JAX: NaN)
            raise InputValueError(f"SymmetricSolve: the symmetric part of 'matrix' is singular "
                                  f"(a Gaussian process's K = k + s·I must be positive "
                                  f"definite): {e}") from None

    @float32_vjp
    def vjp(self, g, out, args, wrt):
        gb = np.linalg.solve(_sym(args["matrix"]), g)
        res = {"input": gb, "matrix": _sym(-gb @ out.T)}
        return {k: v for k, v in res.items() if k in wrt}


class TransposedDiagonal(Operator):
    """The diagonal of a square (N, N) ``input`` as a column (N, 1), as the published
    Mithril's ``TransposedDiagonal``."""

    def infer_shape(self, shapes):
        s = shapes.get("input")
        _square("TransposedDiagonal", "input", s)
        return None if s is None else (s[0] if s[0] is not None else s[1], 1)

    def forward(self, xp: Any, input: Any) -> Any:
        torch = torch_of(xp)
        return (torch.diagonal(input) if torch else xp.diagonal(input))[:, None]

    def vjp(self, g, out, args, wrt):
        return {"input": np.diagflat(g[:, 0]).astype(g.dtype, copy=False)}


class GPRLoss(Operator):
    """The negative log marginal likelihood of a Gaussian process, (1,):

        ½·(labels − mu)ᵀ·alpha + ½·log det K + (N/2)·log 2π

    with K = (K_term + K_termᵀ)/2 (the published Mithril's ``GPRLoss``, whose
    Σ log diag(cholesky(K)) is ½·log det K; K must be positive definite: an indefinite K is
    refused with an ``InputValueError`` naming 'K_term', a NaN loss on JAX) and ``alpha`` =
    K⁻¹·(labels − mu) given; N is K's (a (1, 1) ``mu`` or ``labels`` broadcasts, its
    gradient summed). Gradients: ½·alpha, −½·alpha, ½·(labels − mu) and ½·K⁻¹."""

    inputs = ("labels", "mu", "K_term", "alpha")

    def infer_shape(self, shapes):
        _square("GPRLoss", "K_term", shapes.get("K_term"))
        for k in ("labels", "mu", "alpha"):
            s = shapes.get(k)
            if s is not None and (len(s) != 2 or s[1] not in (1, None)):
                raise ShapeError(f"GPRLoss: '{k}' must be a column (N, 1), got shape {fmt(s)}")
        return (1,)

    @float32_forward(on_torch=True)  # (no half cholesky on torch's CPU, NumPy or JAX)
    def forward(self, xp: Any, labels: Any, mu: Any, K_term: Any, alpha: Any) -> Any:
        linalg = _linalg(xp)
        try:  # (the published Σ log diag(cholesky(K)): an indefinite K is refused, NaN on JAX)
            chol = linalg.cholesky(_sym(K_term))
        except getattr(linalg, "LinAlgError", np.linalg.LinAlgError) as e:
            raise InputValueError(f"GPRLoss: the symmetric part of 'K_term' is not positive "
                                  f"definite (a Gaussian process's K = k + s·I must be): "
                                  f"{e}") from None
        torch = torch_of(xp)
        diag = torch.diagonal(chol) if torch is not None else xp.diagonal(chol)
        logdet = 2 * xp.log(diag).sum()
        fit = ((labels - mu) * alpha).sum()  # (N: K's, where a (1, 1) mu or labels broadcasts)
        return (0.5 * (fit + logdet) + K_term.shape[0] * (math.log(2 * math.pi) / 2)).reshape(1)

    @float32_vjp
    def vjp(self, g, out, args, wrt):
        g0 = g.reshape(())
        lab, mu, alpha = args["labels"], args["mu"], args["alpha"]
        full = np.broadcast_shapes(lab.shape, mu.shape, alpha.shape)
        ga = np.broadcast_to(0.5 * g0 * alpha, full)
        res = {"labels": unbroadcast(ga, lab.shape), "mu": unbroadcast(-ga, mu.shape),
               "alpha": unbroadcast(np.broadcast_to(0.5 * g0 * (lab - mu), full), alpha.shape)}
        if "K_term" in wrt:
            res["K_term"] = 0.5 * g0 * _sym(np.linalg.inv(_sym(args["K_term"])))
        return {k: v for k, v in res.items() if k in wrt}


class GaussProcessRegressionCore(Model):
    """Gaussian-process regression with a given kernel, as the published Mithril's
    ``GaussProcessRegressionCore``. Inputs: ``label`` and the prior mean ``mu`` (N, 1), the
    noise ``s`` (1,), the train kernel ``k`` (N, N) and ``k_star`` (N, N). With
    K = k + s·I and α = K⁻¹·(label − mu):

        loss        = ½·(label − mu)ᵀα + ½·log det K + (N/2)·log 2π        (1,)
        predictions = mu + kᵀα                                             (N, 1)
        confidence  = s + |diag(k_star − kᵀK⁻¹k)|                           (N, 1)

    (the published output ``predictions``, as its test data names it). K enters through its
    symmetric part, as through torch's Cholesky: its gradient is symmetric."""

    def __init__(self) -> None:
        super().__init__()
        k_term = AddDiagonal()
        diff = Subtract()
        alpha = SymmetricSolve()
        self |= k_term.connect(input="k", value="s")
        self |= diff.connect(left="label", right="mu")
        self |= alpha.connect(matrix=k_term.output, input=diff.output)
        self |= GPRLoss().connect(labels="label", mu="mu", K_term=k_term.output,
                                  alpha=alpha.output, output=IOKey("loss"))
        k_t = Transpose()
        self |= k_t.connect(input="k")
        pred = MatrixMultiply()
        self |= pred.connect(left=k_t.output, right=alpha.output)
        self |= Add().connect(left="mu", right=pred.output, output=IOKey("predictions"))
        v = SymmetricSolve()
        self |= v.connect(matrix=k_term.output, input="k")
        v_outer = MatrixMultiply()
        self |= v_outer.connect(left=k_t.output, right=v.output)
        gap = Subtract()
        self |= gap.connect(left="k_star", right=v_outer.output)
        diag = TransposedDiagonal()
        self |= diag.connect(input=gap.output)
        conf = Absolute()
        self |= conf.connect(input=diag.output)
        self |= Add().connect(left="s", right=conf.output, output=IOKey("confidence"))
