"""``Upsample(mode="bicubic")`` and the fixed-mode ``UpsamplingNearest2D`` /
``UpsamplingBilinear2D`` side by side with ``F.interpolate`` / ``nn.UpsamplingNearest2d`` /
``nn.UpsamplingBilinear2d``.

Float64: bicubic up and down (scale factors per axis, sizes, an output of one pixel),
``align_corners`` both ways, borders where the four taps are clamped, the output and the
input gradient on NumPy and torch in process and on JAX in a fresh x64 process within 1e-10
of torch autograd's. Where the output has the input's size but is not the identity
(scale_factor 1.2 on 3 pixels) torch's backward copies the cotangent while its forward
interpolates: the forward is torch's there and the gradient that forward's (central
differences), on every backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import central_differences
from layer_edges import Case, parity_tests, run_mithril, scalar_loss

import mithril as ml
from mithril.errors import ShapeError
from mithril.models.upsampling_2d import UpsamplingBilinear2D, UpsamplingNearest2D


def _ref(**kw):
    return lambda t, _: {"output": F.interpolate(t["input"], mode="bicubic", **kw)}


CASES: dict[str, Case] = {}
for name, (shape, kw) in {
    "size up": ((2, 3, 4, 5), {"size": (7, 9)}),
    "x2": ((1, 2, 5, 4), {"scale_factor": 2.0}),
    "down and up (0.5, 1.7)": ((1, 2, 6, 5), {"scale_factor": (0.5, 1.7)}),
    "to one pixel": ((1, 1, 4, 3), {"size": (1, 2)}),
    "from one pixel": ((1, 1, 1, 3), {"size": (3, 5)}),
    "x3 recompute": ((1, 1, 3, 2), {"scale_factor": 3.3, "recompute_scale_factor": True}),
}.items():
    for ac in (False, True):
        CASES[f"bicubic {name} ac={ac}"] = Case(
            lambda kw=kw, ac=ac: ml.Upsample(mode="bicubic", align_corners=ac, **kw),
            {"input": shape}, _ref(align_corners=ac, **kw))
CASES["nearest2d x2"] = Case(lambda: UpsamplingNearest2D(scale_factor=2), {"input": (1, 2, 3, 4)},
                             lambda t, _: {"output": torch.nn.UpsamplingNearest2d(
                                 scale_factor=2)(t["input"])})
CASES["nearest2d size"] = Case(lambda: UpsamplingNearest2D((5, 7)), {"input": (1, 2, 3, 4)},
                               lambda t, _: {"output": torch.nn.UpsamplingNearest2d(
                                   (5, 7))(t["input"])})
CASES["bilinear2d x1.5"] = Case(lambda: UpsamplingBilinear2D(scale_factor=1.5),
                                {"input": (2, 1, 4, 3)},
                                lambda t, _: {"output": torch.nn.UpsamplingBilinear2d(
                                    scale_factor=1.5)(t["input"])})
CASES["bilinear2d size"] = Case(lambda: UpsamplingBilinear2D((6, 2)), {"input": (1, 2, 3, 4)},
                                lambda t, _: {"output": torch.nn.UpsamplingBilinear2d(
                                    (6, 2))(t["input"])})

JAX_NAMES = ["bicubic size up ac=False", "bicubic down and up (0.5, 1.7) ac=True",
             "bicubic to one pixel ac=False", "bilinear2d x1.5"]
test_equals_torch, jax_results, test_jax_equals_torch = parity_tests(
    "test_upsample_bicubic_vs_torch", CASES, jax_default=JAX_NAMES)


_SAME = Case(lambda: ml.Upsample(scale_factor=1.2, mode="bicubic"), {"input": (1, 2, 3, 3)},
             _ref(scale_factor=1.2))


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
def test_same_size_forward_is_torchs_and_gradient_is_its_own(backend_name: str) -> None:
    params, cots, out, grads = run_mithril("same", _SAME, backend_name)
    x = torch.tensor(params["input"], requires_grad=True)
    want = F.interpolate(x, scale_factor=1.2, mode="bicubic")
    assert np.abs(out["output"] - want.detach().numpy()).max() < 1e-12
    want.backward(torch.tensor(cots["output"]))
    assert np.abs(x.grad.numpy() - cots["output"]).max() == 0  # torch: the identity's gradient
    fd = central_differences(scalar_loss(_SAME, params, cots), {"input": params["input"]}, 1e-6)
    assert np.abs(grads["input"] - fd["input"]).max() < 1e-7
    assert np.abs(grads["input"] - cots["output"]).max() > 0.1  # (not the identity's)


def test_bad_ranks_and_arguments_are_named() -> None:
    for block, shape in ((ml.Upsample(scale_factor=2, mode="bicubic"), [1, 2, 3]),
                         (UpsamplingNearest2D(scale_factor=2), [1, 2, 3, 4, 5]),
                         (UpsamplingBilinear2D(scale_factor=2), [1, 2, 3])):
        model = ml.Model()
        model |= block(input="input", output="output")
        with pytest.raises(ShapeError, match=r"needs an 'input' of rank 4 \(N, C, H, W\)"):
            ml.compile(model, ml.NumpyBackend(), shapes={"input": shape})
    with pytest.raises(ValueError, match="give exactly one of size and scale_factor"):
        UpsamplingBilinear2D()
