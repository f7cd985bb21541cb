"""``MaxUnpool1D/2D`` and ``LPPool1D/2D`` side by side with ``F.max_unpool1d/2d`` and
``F.lp_pool1d/2d``.

Float64, the output and the input gradient on NumPy and torch in process and on JAX in a
fresh x64 process within 1e-10 of torch autograd's. Unpooling: the indices of torch's own
``max_pool(return_indices=True)`` (strides, padding, an ``output_size`` off the default,
unbatched). LP pooling: p = 1, 2, 3 and 1.5, ``ceil_mode`` (a cut window averaged over its
part times the full kernel, as torch), strides other than the kernel, a window of zeros
(0, gradient 0) and odd p over negative sums (NaN where torch's is). Bad indices, sizes and
arguments refused naming the key."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from layer_edges import Case, parity_tests

import mithril as ml
from mithril.backends import NumpyBackend
from mithril.errors import InputValueError, ShapeError
from mithril.models.lp_pooling import LPPool1D, LPPool2D
from mithril.models.unpooling import MaxUnpool1D, MaxUnpool2D

_RNG = np.random.default_rng(44)


def _pool_indices(nd: int, shape: tuple, k, s, p) -> np.ndarray:
    """torch's max-pool indices of a random image of ``shape`` (pooled by k, s, p)."""
    x = torch.tensor(_RNG.standard_normal(shape))
    fn = F.max_pool1d if nd == 1 else F.max_pool2d
    return fn(x, k, s, p, return_indices=True)[1].numpy()


def _unpool_ref(nd, k, s, p, size=None):
    fn = F.max_unpool1d if nd == 1 else F.max_unpool2d
    return lambda t, d: {"output": fn(t["input"], d["indices"], k, s, p, output_size=size)}


def _lp_ref(nd, p, k, s, ceil):
    fn = F.lp_pool1d if nd == 1 else F.lp_pool2d
    return lambda t, _: {"output": fn(t["input"], p, k, s, ceil)}


CASES: dict[str, Case] = {}
for name, (nd, shape, k, s, p, size) in {
    "2d k2": (2, (2, 3, 6, 8), 2, None, 0, None),
    "2d k3 s2 p1": (2, (1, 2, 7, 5), 3, 2, 1, None),
    "2d k2 output_size+1": (2, (2, 1, 6, 6), 2, 2, 0, (7, 7)),
    "2d unbatched (2,3)": (2, (3, 4, 9), (2, 3), (2, 3), 0, None),
    "1d k2": (1, (2, 3, 8), 2, None, 0, None),
    "1d k3 s2 p1 unbatched": (1, (2, 9), 3, 2, 1, None),
}.items():
    idx = _pool_indices(nd, shape, k, s, p)
    block = MaxUnpool1D if nd == 1 else MaxUnpool2D
    CASES[f"unpool {name}"] = Case(
        lambda block=block, k=k, s=s, p=p, size=size: block(k, s, p, output_size=size),
        {"input": idx.shape}, _unpool_ref(nd, k, s, p, size), data={"indices": idx})

_ZERO = _RNG.standard_normal((1, 2, 6, 6))
_ZERO[0, 0, :2, :2] = 0.0  # a window of zeros: 0, gradient 0
for name, (nd, x, p, k, s, ceil) in {
    "2d p2 k2": (2, (2, 3, 6, 8), 2.0, 2, None, False),
    "2d p2 zeros": (2, _ZERO, 2.0, 2, None, False),
    "2d p3 k(2,3) s1 (NaN)": (2, (1, 2, 5, 6), 3.0, (2, 3), 1, False),
    "2d p1.5 ceil": (2, np.abs(_RNG.standard_normal((1, 2, 7, 5))) + 0.1, 1.5, 3, 2, True),
    "2d p1 unbatched": (2, np.abs(_RNG.standard_normal((2, 4, 4))) + 0.1, 1.0, 2, None, False),
    "1d p2 k3 s2 ceil": (1, (2, 3, 8), 2.0, 3, 2, True),
    "1d p3 unbatched": (1, np.abs(_RNG.standard_normal((3, 6))) + 0.1, 3.0, 2, None, False),
}.items():
    block = LPPool1D if nd == 1 else LPPool2D
    CASES[f"lp {name}"] = Case(lambda block=block, p=p, k=k, s=s, ceil=ceil:
                               block(p, k, s, ceil_mode=ceil), {"input": x},
                               _lp_ref(nd, p, k, s, ceil))

JAX_NAMES = ["unpool 2d k3 s2 p1", "unpool 1d k3 s2 p1 unbatched", "lp 2d p2 zeros",
             "lp 2d p1.5 ceil", "lp 1d p2 k3 s2 ceil"]
test_equals_torch, jax_results, test_jax_equals_torch = parity_tests(
    "test_unpooling_lp_pooling_vs_torch", CASES, jax_default=JAX_NAMES)


def test_edge_cases_are_live() -> None:
    """torch's zero window has gradient 0 and its odd-p negative window NaN (the cases above
    exercise both)."""
    x = torch.tensor(_ZERO, requires_grad=True)
    F.lp_pool2d(x, 2.0, 2).sum().backward()
    assert (x.grad[0, 0, :2, :2] == 0).all() and torch.isfinite(x.grad).all()
    rng = np.random.default_rng(__import__("zlib").crc32(b"lp 2d p3 k(2,3) s1 (NaN)"))
    y = F.lp_pool2d(torch.tensor(rng.standard_normal((1, 2, 5, 6))), 3.0, (2, 3), 1)
    assert torch.isnan(y).any() and not torch.isnan(y).all()


def _compile(block, shapes):
    model = ml.Model()
    model |= block(**{k: k for k in shapes}, output="output")
    return ml.compile(model, NumpyBackend(dtype="float64"), shapes=shapes)


def test_unpool_bad_indices_are_named() -> None:
    c = _compile(MaxUnpool2D(2), {"input": [1, 1, 2, 2], "indices": [1, 1, 2, 2]})
    with pytest.raises(InputValueError, match=r"indices 'indices' holds 16: .*\[0, 15\]"):
        c.evaluate({}, {"input": np.ones((1, 1, 2, 2)),
                        "indices": np.array([[[[0, 3], [9, 16]]]])})


@pytest.mark.parametrize(("block", "shapes", "match"), [
    (MaxUnpool2D(2), {"input": [1, 1, 2, 2], "indices": [1, 1, 2, 3]},
     r"'indices' \[1, 1, 2, 3\] must have 'input''s shape \[1, 1, 2, 2\]"),
    (MaxUnpool2D(2, output_size=(6, 4)), {"input": [1, 1, 2, 2], "indices": [1, 1, 2, 2]},
     r"output_size \(6, 4\) must be within stride \(2, 2\) of the default size \(4, 4\)"),
    (MaxUnpool1D(2), {"input": [1, 2, 3, 4], "indices": [1, 2, 3, 4]}, r"must have rank 3"),
    (LPPool2D(2, 3), {"input": [1, 1, 2, 2]}, r"LPPool2D"),
])
def test_bad_shapes_are_named(block, shapes, match) -> None:
    with pytest.raises(ShapeError, match=match):
        _compile(block, shapes)


@pytest.mark.parametrize(("make", "match"), [
    (lambda: LPPool2D(0, 2), "LPPool2D: norm_type must be a finite number > 0"),
    (lambda: LPPool1D(float("inf"), 2), "LPPool1D: norm_type must be a finite number > 0"),
    (lambda: LPPool2D(2, 0), "LPPool2D: kernel_size must be"),
    (lambda: MaxUnpool2D(2, stride=0), "MaxUnpool2D: stride must be"),
])
def test_bad_arguments_are_named(make, match) -> None:
    with pytest.raises(ValueError, match=match):
        make()
