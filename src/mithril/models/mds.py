"""Multidimensional scaling of the published Mithril: ``MDSCore`` (the stress between two
distance matrices) and ``MDS`` (points ``coords`` fitted to given distances), composites of
its primitives (robust powers, ``StableReciprocal``, ``NormModifier``, sums)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .arithmetic import Multiply
from .distance_models import EncoderDistanceMatrix
from .model import IOKey, Model
from .operator import Operator, ShapeError, fmt
from .primitives import Absolute, Buffer, Power, Subtract
from .reductions import Sum
from .unary_primitives import NormModifier, StableReciprocal

_INPUT_TYPES = ("distances", "powered_distances", "points")


def _bool(who: str, name: str, v: Any) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{who}: {name} must be a bool, got {v!r}")
    return bool(v)


class _SquarePair(Operator):
    """``input`` as is, once it and ``like`` are square matrices of one size (N, N): the
    published MDSCore's shapes ``["N", "N"]`` (a broadcast, say of (1, 1) against (N, N),
    or an (N, M) pair gave a number). ``like`` is read for its shape only."""

    inputs = ("input", "like")
    any_dtype_inputs = frozenset({"like"})

    def __init__(self, keys: tuple[str, str]) -> None:
        self.keys = keys  # (the MDSCore terminals, for the message)

    def infer_shape(self, shapes):
        got = [shapes.get("input"), shapes.get("like")]
        for key, s in zip(self.keys, got):
            if s is not None and (len(s) != 2 or None not in s and s[0] != s[1]):
                raise ShapeError(f"MDSCore: '{key}' must be a square matrix (N, N), got "
                                 f"shape {fmt(s)}")
        sizes = {d for s in got if s is not None for d in s if d is not None}
        if len(sizes) > 1:
            raise ShapeError(f"MDSCore: '{self.keys[0]}' {fmt(got[0])} and '{self.keys[1]}' "
                             f"{fmt(got[1])} must be (N, N) of one N")
        return got[0]

    def forward(self, xp: Any, input: Any, like: Any) -> Any:
        return input

    def vjp(self, g, out, args, wrt):
        res = {"input": g, "like": np.zeros(np.shape(args["like"]), dtype=g.dtype)}
        return {k: v for k, v in res.items() if k in wrt}


class MDSCore(Model):
    """The normalised stress of predicted distances, as the published Mithril's ``MDSCore``.
    Inputs ``distances`` and ``pred_distances`` (N, N), ``norm`` (one number); output
    ``output`` (a scalar). With p = NormModifier(norm) (in [1, 5]) and r = 1/p (the
    published ``StableReciprocal``):

        exact_distances=True:   (Σ |D − P^r|^p / Σ D^p)^r
        exact_distances=False:  (Σ |D^r − P^r|^p / Σ D)^r     (D, P: powered distances)

    with D = ``distances``, P = ``pred_distances``, and 1/Σ the stable reciprocal. Every
    power is the published robust one with ``robust=True`` (the default: finite gradients
    at 0), the plain power without."""

    def __init__(self, exact_distances: bool = True, robust: bool = True) -> None:
        super().__init__()
        self.exact_distances = _bool("MDSCore", "exact_distances", exact_distances)
        self.robust = _bool("MDSCore", "robust", robust)
        order, inv = NormModifier(), StableReciprocal()
        self |= order.connect(input="norm")
        self |= inv.connect(input=order.output)
        pred = Power(robust=self.robust)
        self |= pred.connect(base="pred_distances", exponent=inv.output)
        square = _SquarePair(("distances", "pred_distances"))
        self |= square.connect(input="distances", like="pred_distances")
        distances = square.output
        diff = Subtract()
        if self.exact_distances:
            self |= diff.connect(left=distances, right=pred.output)
            scale = Power(robust=self.robust)
            self |= scale.connect(base=distances, exponent=order.output)
            scale_out = scale.output
        else:
            rooted = Power(robust=self.robust)
            self |= rooted.connect(base=distances, exponent=inv.output)
            self |= diff.connect(left=rooted.output, right=pred.output)
            scale_out = distances
        gap, gap_p, total, norm_sum, norm_inv, ratio, out = (
            Absolute(), Power(robust=self.robust), Sum(), Sum(), StableReciprocal(), Multiply(),
            Power(robust=self.robust))
        self |= gap.connect(input=diff.output)
        self |= gap_p.connect(base=gap.output, exponent=order.output)
        self |= total.connect(input=gap_p.output)
        self |= norm_sum.connect(input=scale_out)
        self |= norm_inv.connect(input=norm_sum.output)
        self |= ratio.connect(left=total.output, right=norm_inv.output)
        self |= out.connect(base=ratio.output, exponent=inv.output, output=IOKey("output"))


class MDS(Model):
    """Multidimensional scaling, as the published Mithril's ``MDS``: ``coords`` (N,
    ``prediction_dim``) whose powered Minkowski distances of order p (``EncoderDistanceMatrix
    (get_final_distance=False)``, p = NormModifier(norm)) are compared by :class:`MDSCore`
    with those of ``input``: the distance matrix itself (``input_type="distances"``, exact
    distances), its p-th powers (``"powered_distances"``), or points (``"points"``: their
    powered distances are computed as the coords'). Outputs ``output`` (the stress) and
    ``predicted_coords`` (``coords`` as is).

    In float16 / bfloat16 each EncoderDistanceMatrix computes in float32, but its powered
    distances Σ|d|^p pass between the blocks in the model's dtype: one above float16's 65504
    (p = 2 over 1024 features of 10, ``"points"``) is inf there and the stress NaN; no
    rounding can hold it, so train such data in float32."""

    def __init__(self, prediction_dim: int, input_type: str = "distances") -> None:
        super().__init__()
        if isinstance(prediction_dim, bool) or not isinstance(prediction_dim, (int, np.integer)) \
                or prediction_dim < 1:
            raise ValueError(f"MDS: prediction_dim must be a positive int, got {prediction_dim!r}")
        if input_type not in _INPUT_TYPES:
            raise ValueError(f"MDS: input_type must be one of {_INPUT_TYPES}, got {input_type!r}")
        self.prediction_dim, self.input_type = int(prediction_dim), input_type
        pred = EncoderDistanceMatrix(get_final_distance=False)
        self |= pred.connect(input1="coords", input2="coords", norm="norm")
        distances: Any = "input"
        if input_type == "points":
            given = EncoderDistanceMatrix(get_final_distance=False)
            self |= given.connect(input1="input", input2="input", norm="norm")
            distances = given.output
        core = MDSCore(exact_distances=input_type == "distances")
        self |= core.connect(distances=distances, pred_distances=pred.output, norm="norm",
                             output=IOKey("output"))
        self |= Buffer().connect(input="coords", output=IOKey("predicted_coords"))
        self.set_shapes(coords=[None, self.prediction_dim])
