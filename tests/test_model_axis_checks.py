"""An operator's ``axis`` out of range is a ``ShapeError`` naming the block at compile time
(``Softmax`` used to fail with a raw backend error at evaluate), as ``Sum`` / ``Concat`` do."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mithril as ml
from mithril.backends import NumpyBackend, TorchBackend
from mithril.models import Model, Softmax


@pytest.mark.parametrize("axis", [2, -3, 5])
def test_softmax_axis_out_of_range_is_a_shape_error_naming_the_block(axis):
    m = Model()
    m |= Softmax(axis=axis)(input="x", output="y")
    with pytest.raises(ml.ShapeError, match=rf"softmax \(Softmax\): axis {axis} is out of range for rank 2"):
        ml.compile(m, NumpyBackend(), shapes={"x": [2, 3]})


def test_softmax_of_a_scalar_is_refused():
    with pytest.raises(ml.ShapeError, match="out of range for rank 0"):
        ml.compile(Softmax(), NumpyBackend(), shapes={"input": []})


def test_softmax_axis_must_be_an_int():
    with pytest.raises(TypeError, match="axis"):
        Softmax(axis=1.0)


@pytest.mark.parametrize("make", [lambda: NumpyBackend(dtype="float64"), lambda: TorchBackend(dtype="float64")])
@pytest.mark.parametrize("axis", [0, 1, -2])
def test_softmax_in_range_axes_match_torch(make, axis):
    b = make()
    x = np.random.default_rng(0).standard_normal((2, 3))
    c = ml.compile(Softmax(axis=axis), b, shapes={"input": [2, 3]}, trainable_keys=["input"])
    g = np.random.default_rng(1).standard_normal((2, 3))
    out, grads = c.evaluate({"input": b.array(x)}, {}, output_gradients={"output": b.array(g)})
    xt = torch.tensor(x, requires_grad=True)
    y = torch.softmax(xt, dim=axis)
    y.backward(torch.tensor(g))
    np.testing.assert_allclose(b.to_numpy(out["output"]), y.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(b.to_numpy(grads["input"]), xt.grad.numpy(), rtol=1e-12, atol=1e-15)
