"""``ChannelShuffle``, ``Softmax2D`` and ``TripletMarginWithDistanceLoss`` side by side with
``F.channel_shuffle``, ``nn.Softmax2d`` and ``F.triplet_margin_with_distance_loss``.

Float64, the output and every input gradient on NumPy and torch in process and on JAX in a
fresh x64 process within 1e-10 of torch autograd's: shuffles of 3-, 4- and 5-D inputs
(groups 1, 2, C), the channel softmax batched and unbatched, the triplet loss with torch's
default distance, a 1-norm ``PairwiseDistance`` and a composite block (squared distance),
``swap`` with exact ties (the gradient split in half, as torch.minimum), triplets exactly at
the margin, every reduction. Bad shapes and arguments are refused naming them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from layer_edges import Case, parity_tests

import mithril as ml
from mithril.errors import KeyMismatchError, ShapeError
from mithril.models.channel_modules import ChannelShuffle, Softmax2D
from mithril.models.triplet_distance_loss import TripletMarginWithDistanceLoss

_RNG = np.random.default_rng(165)


def _squared() -> ml.Model:
    """A composite distance block: the squared 2-norm distance."""
    m = ml.Model()
    m |= ml.PairwiseDistance()(input1="x", input2="y", output=ml.IOKey("dist", expose=False))
    m |= ml.Square()(input="dist", output="output")
    return m


_DIST = {"default": (lambda: None, None),
         "l1 eps=0": (lambda: ml.PairwiseDistance(p=1, eps=0.0),
                      lambda x, y: F.pairwise_distance(x, y, p=1, eps=0.0)),
         "squared (a Model)": (_squared, lambda x, y: F.pairwise_distance(x, y) ** 2)}
_TRIPLET = ("anchor", "positive", "negative")

CASES: dict[str, Case] = {}
for name, shape, groups in (("3-D g2", (2, 4, 5), 2), ("4-D g3", (2, 6, 3, 2), 3),
                            ("5-D gC", (1, 4, 2, 1, 3), 4), ("g1", (2, 3, 4), 1)):
    CASES[f"shuffle {name}"] = Case(lambda g=groups: ChannelShuffle(g), {"input": shape},
                                    lambda t, _, g=groups: {"output": F.channel_shuffle(
                                        t["input"], g)})
for shape in ((2, 3, 4, 5), (4, 2, 3)):
    CASES[f"softmax2d {shape}"] = Case(Softmax2D, {"input": shape},
                                       lambda t, _: {"output": torch.nn.Softmax2d()(t["input"])})
for dname, (make, fn) in _DIST.items():
    for swap in (False, True):
        for red in ("mean", "sum", "none"):
            CASES[f"triplet {dname} swap={swap} {red}"] = Case(
                lambda make=make, swap=swap, red=red: TripletMarginWithDistanceLoss(
                    make(), margin=0.7, swap=swap, reduction=red),
                {k: (6, 5) for k in _TRIPLET},
                lambda t, _, fn=fn, swap=swap, red=red: {"output": F.triplet_margin_with_distance_loss(
                    *(t[k] for k in _TRIPLET), distance_function=fn, margin=0.7, swap=swap,
                    reduction=red)})
# swap ties: positive = anchor, so D(a, n) = D(p, n) exactly; a triplet exactly at the margin
_A = _RNG.standard_normal((4, 3))
_N = _RNG.standard_normal((4, 3))
CASES["triplet swap ties"] = Case(
    lambda: TripletMarginWithDistanceLoss(ml.PairwiseDistance(p=1, eps=0.0), margin=50.0,
                                          swap=True, reduction="sum"),
    {"anchor": _A, "positive": _A.copy(), "negative": _N},
    lambda t, _: {"output": F.triplet_margin_with_distance_loss(
        *(t[k] for k in _TRIPLET), distance_function=lambda x, y: F.pairwise_distance(
            x, y, p=1, eps=0.0), margin=50.0, swap=True, reduction="sum")})
# row 1: D(a, p) = 1, D(a, n) = 2, margin 1: hinge argument exactly 0 (no zero component in
# a difference: that is the "pairwise ... zero component" cases below)
_P = np.array([[0.25, 0.25], [0.5, 0.5]])
_NEG = np.array([[2.0, 1.0], [-1.5, -0.5]])
CASES["triplet at the margin"] = Case(
    lambda: TripletMarginWithDistanceLoss(ml.PairwiseDistance(p=1, eps=0.0), reduction="none"),
    {"anchor": np.zeros((2, 2)), "positive": _P, "negative": _NEG},
    lambda t, _: {"output": F.triplet_margin_with_distance_loss(
        *(t[k] for k in _TRIPLET), distance_function=lambda x, y: F.pairwise_distance(
            x, y, p=1, eps=0.0), reduction="none")})

# PairwiseDistance where one component of x1 - x2 is exactly 0 (a whole row in row 2): that
# component's gradient is 0 (torch's), not NaN (|0|^(p-1), p < 1) nor JAX's abs'(0) = 1
_X1 = np.array([[0.0, 1.5, -0.5], [0.3, -0.2, 0.7]])
_X2 = np.array([[2.0, 1.5, 0.25], [0.3, -0.2, 0.7]])
for p in (0.5, 1, 3, float("inf")):
    CASES[f"pairwise p={p} zero component"] = Case(
        lambda p=p: ml.PairwiseDistance(p=p, eps=0.0), {"input1": _X1, "input2": _X2},
        lambda t, _, p=p: {"output": F.pairwise_distance(t["input1"], t["input2"], p=p,
                                                         eps=0.0)})

JAX_NAMES = ["shuffle 4-D g3", "softmax2d (4, 2, 3)", "triplet default swap=True mean",
             "triplet squared (a Model) swap=False none", "triplet swap ties",
             "pairwise p=0.5 zero component", "pairwise p=1 zero component"]
test_equals_torch, jax_results, test_jax_equals_torch = parity_tests(
    "test_small_modules_more_vs_torch", CASES, jax_default=JAX_NAMES)


def test_edge_cases_are_live() -> None:
    """torch splits a swap tie in half and passes the gradient at the margin."""
    a = torch.tensor(_A, requires_grad=True)
    p = torch.tensor(_A.copy(), requires_grad=True)
    n = torch.tensor(_N, requires_grad=True)
    F.triplet_margin_with_distance_loss(a, p, n, distance_function=lambda x, y: F.pairwise_distance(
        x, y, p=1, eps=0.0), margin=50.0, swap=True, reduction="sum").backward()
    half = -0.5 * torch.sign(torch.tensor(_A - _N))  # each side of the tie gets half
    assert torch.equal(a.grad, half) and torch.equal(p.grad, half)
    assert torch.equal(n.grad, -2 * half)
    x = torch.zeros(2, 2, requires_grad=True)
    F.triplet_margin_with_distance_loss(x, torch.tensor(_P), torch.tensor(_NEG),
                                        distance_function=lambda u, v: F.pairwise_distance(
                                            u, v, p=1, eps=0.0), reduction="sum").backward()
    assert x.grad.abs().sum() > 0


def test_pairwise_zero_component_is_live() -> None:
    """torch's gradient at a zero component of x1 - x2 is 0 (where ours was NaN / 1)."""
    for p in (0.5, 1.0):
        x = torch.tensor(_X1, requires_grad=True)
        F.pairwise_distance(x, torch.tensor(_X2), p=p, eps=0.0).sum().backward()
        assert x.grad[0, 1] == 0 and x.grad[0, 0] != 0 and torch.equal(x.grad[1], torch.zeros(3))


def _compile(block, shapes):
    model = ml.Model()
    model |= block(**{k: k for k in shapes}, output="output")
    return ml.compile(model, ml.NumpyBackend(), shapes=shapes)


@pytest.mark.parametrize(("block", "shapes", "match"), [
    (ChannelShuffle(2), {"input": [2, 3, 4]}, r"has 3 channels, not divisible by groups=2"),
    (ChannelShuffle(2), {"input": [2, 4]}, r"must have rank >= 3"),
    (Softmax2D(), {"input": [2, 3]}, r"Softmax2D: 'input' must be \(N, C, H, W\) or \(C, H, W\)"),
    (TripletMarginWithDistanceLoss(), {"anchor": [2, 3], "positive": [2, 3], "negative": [3, 3]},
     r"'input2' <- 'negative' \[3, 3\]"),
])
def test_bad_shapes_are_named(block, shapes, match) -> None:
    with pytest.raises(ShapeError, match=match):
        _compile(block, shapes)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="ChannelShuffle: groups must be an int >= 1"):
        ChannelShuffle(0)
    with pytest.raises(ValueError, match="TripletMarginWithDistanceLoss: margin must be"):
        TripletMarginWithDistanceLoss(margin=0.0)
    with pytest.raises(KeyMismatchError, match="distance_function needs two inputs and one output"):
        TripletMarginWithDistanceLoss(ml.Square())
    with pytest.raises(TypeError, match="distance_function must be a block"):
        TripletMarginWithDistanceLoss(lambda x, y: x)  # type: ignore[arg-type]
