"""Asymmetric padding and inputs without a batch axis in the convolution and pooling layers,
side by side with torch in float64 (within 1e-12, relative to max(1, |torch|)) on NumPy,
torch and JAX (a fresh x64 process), outputs and input / weight / bias gradients.

1. Padding with a different amount before and after (a ``(before, after)`` pair per
   spatial axis; for 1-D also a bare pair). torch's layers take only symmetric padding, so
   the reference pads first with ``F.pad`` and runs torch's function unpadded:
   convolutions with every ``padding_mode`` (``F.pad``'s constant / reflect / replicate /
   circular); max pooling with −inf padding; average pooling from torch's window sums
   (``divisor_override=1``) of the zero-padded input, divided by torch's window sums of a
   ones mask padded with ones (``count_include_pad=True``: the padding counts, the part
   past it under ``ceil_mode`` does not) or zeros (``False``: input elements only).
   ``ceil_mode``'s output size is torch's ``pooling_output_shape_pad_lr``: the last window
   must start inside the input or the padding before it; the reference's extra windows
   (on the padded input they may start in the padding after) are cut off. A max window
   whose maximum is −inf routes its gradient to its first element inside the input, as
   torch's own (symmetric) padding does; a dilated window of padding only is −inf with no
   gradient.
2. Inputs without a batch axis ((C, L) / (C, H, W)), as torch's ``Conv1d/2d`` and pooling
   layers take them: the reference is torch's function on the same unbatched input.
3. Bad padding is refused naming the layer and the argument; a few NumPy gradients against
   central differences.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import central_differences
from layer_edges import (
    Case,
    avg_pool_padded_ref,
    conv_padded_ref,
    max_pool_padded_ref,
    nonfinite_error,
    parity_tests,
    run_mithril,
    scalar_loss,
)

import mithril as ml
from mithril.errors import ShapeError

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")
TIGHT = 1e-12


def _err(got: np.ndarray, want: np.ndarray) -> float:
    """:func:`nonfinite_error`, failing (inf) anything above 1e-12."""
    e = nonfinite_error(got, want)
    return e if e <= TIGHT else float("inf")


def unbatched_ref(fn: Any, *args: Any, **kw: Any):
    """torch's function on the unbatched input (with the block's weight and bias, if any)."""
    def ref(t: dict, _: dict) -> dict:
        params = [v for key, v in t.items() if key != "input"]
        params.sort(key=lambda v: -v.ndim)  # weight, then bias
        return {"output": fn(t["input"], *params, *args, **kw)}
    return ref


def _pool_input(shape: tuple, special: bool) -> np.ndarray:
    """Standard normal; ``special``: the first half of the last axis −inf (windows starting
    in the padding before it hold only −inf inside) and one NaN."""
    x = np.random.default_rng(sum(shape)).standard_normal(shape)
    if special:
        x[..., : shape[-1] // 2] = -np.inf
        x.reshape(-1)[-2] = np.nan
    return x


# -- cases ----------------------------------------------------------------------------------------
CASES: dict[str, Case] = {}
for _mode in ("zeros", "reflect", "replicate", "circular"):
    CASES[f"conv1d_pair_{_mode}"] = Case(
        lambda m=_mode: ml.Convolution1D(3, 4, stride=2, padding=(2, 1), padding_mode=m),
        {"input": (2, 3, 7)}, conv_padded_ref(1, 2, 1, 1, ((2, 1),), _mode))
    CASES[f"conv2d_pairs_{_mode}"] = Case(
        lambda m=_mode: ml.Convolution2D((2, 3), 4, stride=(2, 1), padding=((0, 2), (3, 1)),
                                         dilation=(1, 2), groups=2, padding_mode=m),
        {"input": (2, 4, 5, 6)}, conv_padded_ref(2, (2, 1), (1, 2), 2, ((0, 2), (3, 1)), _mode))
    CASES[f"conv2d_pairs_unbatched_{_mode}"] = Case(
        lambda m=_mode: ml.Convolution2D(3, 2, padding=((1, 0), (0, 2)), padding_mode=m),
        {"input": (3, 4, 5)}, conv_padded_ref(2, 1, 1, 1, ((1, 0), (0, 2)), _mode))
CASES["conv1d_published_form"] = Case(  # test_conv1d_7's arguments
    lambda: ml.Convolution1D(3, 1, stride=2, padding=(0, 1)), {"input": (1, 2, 4)},
    conv_padded_ref(1, 2, 1, 1, ((0, 1),), "zeros"))
CASES["conv1d_unbatched"] = Case(
    lambda: ml.Convolution1D(3, 4, stride=2, padding=1, dilation=2), {"input": (3, 9)},
    unbatched_ref(F.conv1d, stride=2, padding=1, dilation=2))
CASES["conv2d_unbatched_same"] = Case(
    lambda: ml.Convolution2D((2, 3), 4, padding="same", groups=2, use_bias=False),
    {"input": (2, 5, 6)}, unbatched_ref(F.conv2d, padding="same", groups=2))

for _ceil in (False, True):
    c = "_ceil" if _ceil else ""
    CASES[f"max1d_pair{c}"] = Case(
        lambda ce=_ceil: ml.MaxPool1D(3, stride=2, padding=(0, 1), ceil_mode=ce),
        {"input": _pool_input((2, 3, 8), False)}, max_pool_padded_ref(1, (3,), (2,), (1,), ((0, 1),), _ceil))
    CASES[f"max2d_pairs_dilated{c}"] = Case(
        lambda ce=_ceil: ml.MaxPool2D((3, 2), stride=(2, 1), padding=((1, 0), (0, 1)),
                                      dilation=(2, 3), ceil_mode=ce),
        {"input": _pool_input((1, 2, 6, 7), False)},
        max_pool_padded_ref(2, (3, 2), (2, 1), (2, 3), ((1, 0), (0, 1)), _ceil))
    CASES[f"max2d_pairs_nonfinite{c}"] = Case(
        lambda ce=_ceil: ml.MaxPool2D(3, stride=2, padding=((0, 1), (1, 0)), ceil_mode=ce),
        {"input": _pool_input((2, 2, 5, 6), True)},
        max_pool_padded_ref(2, (3, 3), (2, 2), (1, 1), ((0, 1), (1, 0)), _ceil))
    for _inc in (True, False):
        i = "_incl" if _inc else "_excl"
        CASES[f"avg1d_pair{i}{c}"] = Case(
            lambda ce=_ceil, inc=_inc: ml.AvgPool1D(3, stride=2, padding=(1, 0), ceil_mode=ce,
                                                    count_include_pad=inc),
            {"input": (2, 3, 8)}, avg_pool_padded_ref(1, (3,), (2,), ((1, 0),), _ceil, _inc, None))
        CASES[f"avg2d_pairs{i}{c}"] = Case(
            lambda ce=_ceil, inc=_inc: ml.AvgPool2D((3, 2), stride=(2, 3), padding=((0, 1), (1, 0)),
                                                    ceil_mode=ce, count_include_pad=inc),
            {"input": (1, 2, 6, 7)}, avg_pool_padded_ref(2, (3, 2), (2, 3), ((0, 1), (1, 0)), _ceil, _inc, None))
CASES["avg2d_pairs_divisor"] = Case(
    lambda: ml.AvgPool2D(3, stride=2, padding=((1, 0), (0, 1)), divisor_override=-2),
    {"input": (2, 1, 5, 6)}, avg_pool_padded_ref(2, (3, 3), (2, 2), ((1, 0), (0, 1)), False, True, -2))
CASES["max1d_published_unbatched_pair"] = Case(  # test_maxpool1d_4_2d_input
    lambda: ml.MaxPool1D(2, padding=(0, 1)), {"input": _pool_input((1, 5), False)},
    max_pool_padded_ref(1, (2,), (2,), (1,), ((0, 1),), False))
CASES["max2d_published_unbatched_pairs"] = Case(  # test_maxpool2d_4_3d_input
    lambda: ml.MaxPool2D(2, padding=((1, 0), (0, 1))), {"input": _pool_input((1, 5, 5), False)},
    max_pool_padded_ref(2, (2, 2), (2, 2), (1, 1), ((1, 0), (0, 1)), False))
CASES["avg2d_pairs_unbatched_ceil"] = Case(
    lambda: ml.AvgPool2D(2, padding=((1, 0), (0, 1)), ceil_mode=True, count_include_pad=False),
    {"input": (3, 5, 6)}, avg_pool_padded_ref(2, (2, 2), (2, 2), ((1, 0), (0, 1)), True, False, None))
CASES["max1d_unbatched"] = Case(
    lambda: ml.MaxPool1D(3, stride=2, padding=1, ceil_mode=True), {"input": _pool_input((3, 8), True)},
    unbatched_ref(F.max_pool1d, 3, 2, 1, ceil_mode=True))
CASES["max2d_unbatched_dilated"] = Case(
    lambda: ml.MaxPool2D(2, stride=1, padding=1, dilation=2), {"input": _pool_input((2, 5, 6), False)},
    unbatched_ref(F.max_pool2d, 2, 1, 1, 2))
CASES["avg1d_unbatched"] = Case(
    lambda: ml.AvgPool1D(3, stride=2, padding=1, count_include_pad=False), {"input": (2, 7)},
    unbatched_ref(F.avg_pool1d, 3, 2, 1, count_include_pad=False))
CASES["avg2d_unbatched_divisor"] = Case(
    lambda: ml.AvgPool2D(3, stride=2, padding=1, ceil_mode=True, divisor_override=5),
    {"input": (2, 6, 7)}, unbatched_ref(F.avg_pool2d, 3, 2, 1, True, True, 5))

test_equals_torch, jax_results, test_jax_equals_torch = parity_tests(
    "test_conv_asymmetric_unbatched", CASES, err=_err)


@pytest.mark.parametrize("block, shape, want", [
    (lambda: ml.Convolution1D(3, 4, padding=(2, 1)), [2, 3, 7], [2, 4, 8]),
    (lambda: ml.Convolution1D(3, 4, padding=((2, 1),)), [3, 7], [4, 8]),
    (lambda: ml.Convolution2D(3, 1, padding=((0, 1), (1, 1))), [1, 1, 5, 5], [1, 1, 4, 5]),
    (lambda: ml.Convolution2D(3, 4, stride=2), [3, 9, 8], [4, 4, 3]),
    (lambda: ml.MaxPool1D(2, padding=(0, 1)), [1, 5], [1, 3]),
    (lambda: ml.MaxPool2D(2, padding=((1, 0), (0, 1))), [1, 1, 5, 5], [1, 1, 3, 3]),
    (lambda: ml.AvgPool2D(3, stride=2, padding=((1, 0), (0, 1)), ceil_mode=True), [2, 6, 7], [2, 3, 4]),
])
def test_output_shapes(block: Any, shape: list[int], want: list[int]) -> None:
    """The shape rule, known before any run (the published cases' shapes among them)."""
    model = ml.Model()
    model |= block()(input="input", output="output")
    c = ml.compile(model, ml.NumpyBackend(), shapes={"input": shape})
    assert list(c.program.output_shape("output")) == want


@pytest.mark.parametrize("make, error, match", [
    (lambda: ml.Convolution2D(3, 4, padding=((0, -1), (0, 0))), ValueError,
     r"Convolution2D: padding pair \(before, after\) must be .* >= 0, got \(0, -1\)"),
    (lambda: ml.MaxPool1D(2, padding=(-1, 0)), ValueError,
     r"MaxPool1D: padding pair \(before, after\) must be .* >= 0"),
    (lambda: ml.Convolution2D(3, 4, padding=((0, 1),)), ValueError,
     r"Convolution2D: padding must hold one \(before, after\) pair per spatial axis \(2\)"),
    (lambda: ml.AvgPool2D(2, padding=((0, 1), (0, 1), (1, 0))), ValueError,
     r"AvgPool2D: padding must hold one \(before, after\) pair per spatial axis \(2\)"),
    (lambda: ml.Convolution1D(3, 4, padding=(1, 2, 3)), ValueError,
     r"Convolution1D: padding must be an int, \(p,\), a \(before, after\) pair"),
    (lambda: ml.MaxPool2D(2, padding=((0, 2), (0, 0))), ValueError,
     r"MaxPool2D: padding must be at most half the kernel size"),
])
def test_bad_padding_is_refused_by_name(make: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        make()


def test_reflect_padding_past_the_input_is_refused() -> None:
    """torch: reflect padding must be less than the axis's size; circular at most it."""
    x = torch.zeros(1, 1, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError):
        F.pad(x, [3, 0], mode="reflect")
    F.pad(x, [2, 0], mode="reflect")  # allowed: so is ours
    for pad, mode in (((3, 0), "reflect"), ((0, 4), "circular")):
        model = ml.Model()
        model |= ml.Convolution1D(2, 1, padding=pad, padding_mode=mode)(input="input", output="output")
        with pytest.raises(ShapeError, match=rf"Convolution1D: padding_mode='{mode}' needs each "
                                             rf"padding .* on spatial axis 0 of size 3"):
            ml.compile(model, ml.NumpyBackend(), shapes={"input": [1, 1, 3]})
    model = ml.Model()
    model |= ml.Convolution1D(2, 1, padding=(2, 0), padding_mode="reflect")(input="input",
                                                                          output="output")
    ml.compile(model, ml.NumpyBackend(), shapes={"input": [1, 1, 3]})


@pytest.mark.parametrize("block, shape, match", [
    (lambda: ml.Convolution2D(3, 4), [8, 8], r"Convolution2D: 'input' must have rank 4 \(N, C, H, W\) or 3"),
    (lambda: ml.MaxPool1D(2), [1, 2, 3, 8], r"MaxPool1D: 'input' must have rank 3 \(N, C, L\) or 2"),
    (lambda: ml.GlobalAvgPool2D(), [2, 3, 4], r"GlobalAvgPool2D: 'input' must have rank 4 \(N, C, H, W\), got"),
])
def test_other_ranks_are_refused(block: Any, shape: list[int], match: str) -> None:
    model = ml.Model()
    model |= block()(input="input", output="output")
    with pytest.raises(ShapeError, match=match):
        ml.compile(model, ml.NumpyBackend(), shapes={"input": shape})


@pytest.mark.parametrize("name", ["conv2d_pairs_reflect", "conv2d_pairs_unbatched_circular",
                                  "max2d_pairs_dilated_ceil", "avg2d_pairs_excl_ceil",
                                  "avg1d_unbatched"])
def test_numpy_gradients_equal_central_differences(name: str) -> None:
    case = CASES[name]
    params, cots, out, grads = run_mithril(name, case, "numpy")
    fd = central_differences(scalar_loss(case, params, cots), params, 1e-6)
    for k, g in grads.items():
        np.testing.assert_allclose(g, fd[k], rtol=1e-6, atol=1e-7, err_msg=k)
