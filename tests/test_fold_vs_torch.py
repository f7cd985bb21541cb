"""``Unfold`` / ``Fold`` side by side with ``torch.nn.functional.unfold`` / ``fold``.

Float64: kernel sizes, dilations, paddings and strides per axis (overlapping, disjoint and
gapped blocks, a stride the image does not fill), batched and unbatched, the output and the
input gradient on NumPy and torch in process and on JAX in a fresh x64 process within 1e-10
of torch autograd's; bad geometry refused naming the argument or shape."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from layer_edges import Case, parity_tests

import mithril as ml
from mithril.backends import NumpyBackend
from mithril.errors import ShapeError
from mithril.models.fold import Fold, Unfold

#: (kernel_size, dilation, padding, stride, (H, W))
GEOMETRIES = {
    "k3": (3, 1, 0, 1, (5, 6)),
    "k(2,3) d(1,2) p(1,0) s(2,1)": ((2, 3), (1, 2), (1, 0), (2, 1), (6, 7)),
    "k2 s2 disjoint": (2, 1, 0, 2, (4, 6)),
    "k2 s3 gaps, ragged": (2, 1, 1, 3, (7, 5)),
    "k(1,2) d3 p2": ((1, 2), 3, 2, 1, (3, 4)),
}


def _unfold_ref(k, d, p, s):
    return lambda t, _: {"output": F.unfold(t["input"], k, d, p, s)}


def _fold_ref(size, k, d, p, s):
    return lambda t, _: {"output": F.fold(t["input"], size, k, d, p, s)}


def _blocks(size, k, d, p, s) -> int:
    k, d, p, s = (np.broadcast_to(v, 2) for v in (k, d, p, s))
    return int(np.prod([(n + 2 * pi - di * (ki - 1) - 1) // si + 1
                        for n, ki, di, pi, si in zip(size, k, d, p, s)]))


CASES: dict[str, Case] = {}
for name, (k, d, p, s, size) in GEOMETRIES.items():
    kk = int(np.prod(np.broadcast_to(k, 2)))
    L = _blocks(size, k, d, p, s)
    CASES[f"unfold {name}"] = Case(lambda k=k, d=d, p=p, s=s: Unfold(k, d, p, s),
                                   {"input": (2, 3, *size)}, _unfold_ref(k, d, p, s))
    CASES[f"fold {name}"] = Case(lambda k=k, d=d, p=p, s=s, size=size: Fold(size, k, d, p, s),
                                 {"input": (2, 3 * kk, L)}, _fold_ref(size, k, d, p, s))
CASES["unfold unbatched"] = Case(lambda: Unfold((2, 2), stride=(1, 2)), {"input": (2, 4, 5)},
                                 _unfold_ref((2, 2), 1, 0, (1, 2)))
CASES["fold unbatched"] = Case(lambda: Fold((4, 5), 2, padding=1), {"input": (8, 30)},
                               _fold_ref((4, 5), 2, 1, 1, 1))

JAX_NAMES = ["unfold k(2,3) d(1,2) p(1,0) s(2,1)", "fold k(2,3) d(1,2) p(1,0) s(2,1)",
             "unfold unbatched", "fold unbatched"]
test_equals_torch, jax_results, test_jax_equals_torch = parity_tests(
    "test_fold_vs_torch", CASES, jax_default=JAX_NAMES)


def _run(block, x: np.ndarray) -> np.ndarray:
    model = ml.Model()
    model |= block(input="input", output="output")
    c = ml.compile(model, NumpyBackend(dtype="float64"), shapes={"input": list(x.shape)})
    return np.asarray(c.evaluate({}, {"input": x})["output"])


def test_fold_of_unfold_counts_the_blocks_covering_each_pixel() -> None:
    x = np.random.default_rng(0).standard_normal((1, 2, 5, 5))
    cols = _run(Unfold(3, padding=1), x)
    back = _run(Fold(5, 3, padding=1), cols)
    count = F.fold(F.unfold(torch.ones(1, 1, 5, 5), 3, padding=1), 5, 3, padding=1).numpy()
    assert np.abs(back - x * count).max() < 1e-12 and count.min() == 4 and count.max() == 9


@pytest.mark.parametrize(("make", "shape", "match"), [
    (lambda: Unfold(4), (1, 2, 3, 5), r"Unfold: 'input' \[3, 5\] padded by \(0, 0\) is smaller"),
    (lambda: Unfold(2), (2, 3), r"Unfold: 'input' must be \(N, C, H, W\) or \(C, H, W\)"),
    (lambda: Fold(4, 2), (1, 6, 9), r"axis 1 \(6\) must be divisible by the kernel's 4"),
    (lambda: Fold(4, 2), (1, 8, 8), r"has 8 blocks, but output_size \(4, 4\) .* has 9"),
    (lambda: Fold(4, 2), (8,), r"Fold: 'input' must be \(N, C·kh·kw, L\)"),
])
def test_bad_shapes_are_named(make, shape, match) -> None:
    model = ml.Model()
    model |= make()(input="input", output="output")
    with pytest.raises(ShapeError, match=match):
        ml.compile(model, NumpyBackend(), shapes={"input": list(shape)})


@pytest.mark.parametrize(("make", "match"), [
    (lambda: Unfold(0), r"Unfold: kernel_size must be an int or a sequence of 2 ints, each >= 1"),
    (lambda: Unfold(2, stride=(1, 0)), r"stride must be"),
    (lambda: Unfold(2, padding=-1), r"padding must be .* each >= 0"),
    (lambda: Fold((4, 4, 4), 2), r"Fold: output_size must be"),
    (lambda: Fold(2, 3), r"Fold: output_size \[2, 2\] padded by \(0, 0\) is smaller"),
])
def test_bad_arguments_are_named(make, match) -> None:
    with pytest.raises(ValueError, match=match):
        make()
