"""``TripletMarginWithDistanceLoss``, as torch's ``nn.TripletMarginWithDistanceLoss``: the
triplet hinge over any distance block.

With D the distance block (torch's default: ``PairwiseDistance()``, the 2-norm of
x − y + 1e−6 over the last axis), per triplet

    max(0, margin + D(anchor, positive) − D(anchor, negative))

and with ``swap=True`` D(anchor, negative) replaced by min(D(anchor, negative),
D(positive, negative)) (a tie splits the gradient in half, as torch.minimum). The hinge's
gradient passes where its argument is >= 0 (torch's clamp_min). A composite: three
distance blocks and :class:`TripletHinge`.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from ..errors import KeyMismatchError
from .margin_losses import _reduced, _unify_all, hinge0
from .model import IOKey, Model
from .operator import Operator
from .pointwise_losses import check_number, check_reduction, elementwise_cotangent, maximum, reduce
from .similarity import PairwiseDistance


class TripletHinge(Operator):
    """max(0, margin + ``d_pos`` − ``d_neg``), ``d_neg`` first replaced by
    min(``d_neg``, ``d_swap``) when ``swap``; reduced by ``reduction``. The distances have
    one shape (one per triplet)."""

    def __init__(self, margin: float = 1.0, swap: bool = False, reduction: str = "mean") -> None:
        who = "TripletMarginWithDistanceLoss"
        self.margin = check_number(who, "margin", margin, 0.0, open_lo=True)
        if not isinstance(swap, (bool, np.bool_)):
            raise ValueError(f"{who}: swap must be a bool, got {swap!r}")
        self.swap, self.reduction = bool(swap), check_reduction(who, reduction)
        self.inputs = ("d_pos", "d_neg", *(("d_swap",) if swap else ()))  # type: ignore[misc]

    def infer_shape(self, shapes):
        return _reduced(_unify_all("TripletMarginWithDistanceLoss", shapes, self.inputs),
                        self.reduction)

    def forward(self, xp: Any, d_pos: Any, d_neg: Any, d_swap: Any = None) -> Any:
        if d_swap is not None:  # min(a, b) = −max(−a, −b): torch.minimum's split tie
            d_neg = -maximum(xp, -d_neg, -d_swap)
        return reduce(xp, hinge0(xp, self.margin + d_pos - d_neg), self.reduction)

    def vjp(self, g, out, args, wrt):
        dp, dn, ds = args["d_pos"], args["d_neg"], args.get("d_swap")
        wn = np.ones_like(dn) if ds is None else np.where(
            dn < ds, 1.0, np.where(dn == ds, 0.5, 0.0)).astype(dn.dtype, copy=False)
        near = dn if ds is None else np.minimum(dn, ds)
        ge = elementwise_cotangent(g, dp.shape, self.reduction) * (self.margin + dp - near >= 0)
        grads = {"d_pos": ge, "d_neg": -ge * wn, "d_swap": -ge * (1 - wn)}
        return {k: grads[k] for k in wrt}

    def __repr__(self) -> str:
        return (f"TripletHinge(margin={self.margin}, swap={self.swap}, "
                f"reduction={self.reduction!r})")


def _two_inputs(block: Any) -> tuple[tuple[str, str], str]:
    """The distance block's two inputs (in order) and its one output."""
    if isinstance(block, Operator):
        ins, outs = tuple(block.inputs), ("output",)
    elif isinstance(block, Model):
        ins, outs = tuple(block.input_keys), tuple(block.output_keys)
    else:
        raise TypeError(f"TripletMarginWithDistanceLoss: distance_function must be a block (an "
                        f"Operator or a Model) of two inputs, got {block!r}")
    if len(ins) != 2 or len(outs) != 1:
        raise KeyMismatchError(f"TripletMarginWithDistanceLoss: distance_function needs two "
                               f"inputs and one output, {type(block).__name__} has inputs "
                               f"{list(ins)} and outputs {list(outs)}")
    return (ins[0], ins[1]), outs[0]


class TripletMarginWithDistanceLoss(Model):
    """``nn.TripletMarginWithDistanceLoss(distance_function=None, margin=1.0, swap=False,
    reduction="mean")`` (module docstring): inputs ``anchor``, ``positive``, ``negative``
    (one shape; the distance block maps two of them to one distance per triplet), output
    ``output``. ``distance_function``: a block of two inputs and one output (None:
    ``PairwiseDistance()``, torch's default); each of its two or three uses is its own copy,
    so a block with parameters gets one set per use (torch's shares one: give it a block
    without parameters). ``margin`` > 0 (torch's check)."""

    def __init__(self, distance_function: Operator | Model | None = None, margin: float = 1.0,
                 swap: bool = False, reduction: str = "mean") -> None:
        dist = PairwiseDistance() if distance_function is None else distance_function
        (x, y), out = _two_inputs(dist)
        hinge = TripletHinge(margin, swap, reduction)  # checks the arguments first
        super().__init__()
        pairs = [("anchor", "positive", "d_pos"), ("anchor", "negative", "d_neg")]
        if swap:
            pairs.append(("positive", "negative", "d_swap"))
        for a, b, d in pairs:  # the distances: internal wires
            self |= copy.deepcopy(dist).connect(**{x: a, y: b, out: IOKey(d, expose=False)})
        self |= hinge.connect(**{d: d for _, _, d in pairs}, output="output")
        self.set_cout("output")
