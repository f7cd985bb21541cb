"""A number or a smaller array given for a parameter role (``Linear(3)(weight=2.0)``) is a
constant broadcast to the parameter's shape (as a float array) at compile time: the same
numbers and gradients on every backend, where evaluate used to fail with a raw backend error."""

from __future__ import annotations

import numpy as np
import pytest

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
from mithril.models import Linear, Model

BACKENDS = [pytest.param(lambda: NumpyBackend(dtype="float64"), id="numpy"),
            pytest.param(lambda: TorchBackend(dtype="float64"), id="torch"),
            pytest.param(lambda: JaxBackend(dtype="float32"), id="jax")]


@pytest.mark.parametrize("make", BACKENDS)
@pytest.mark.parametrize("weight", [2.0, 2, [[1.0, -2.0]], np.array([[0.5], [1.0], [-1.0]])])
def test_a_constant_weight_broadcasts_to_the_parameter_shape(make, weight):
    b = make()
    m = Model()
    m |= Linear(3)(input="x", weight=weight, output="y")
    c = ml.compile(m, b, shapes={"x": [4, 2]}, trainable_keys=["x"])
    assert sorted(c.randomize_params()) == ["linear.bias", "x"]
    w = np.broadcast_to(np.asarray(weight, dtype=np.float64), (3, 2))
    rng = np.random.default_rng(0)
    x, bias, g = rng.standard_normal((4, 2)), rng.standard_normal(3), rng.standard_normal((4, 3))
    params = {"x": b.array(x), "linear.bias": b.array(bias)}
    out, grads = c.evaluate(params, {}, output_gradients={"y": b.array(g)})
    np.testing.assert_allclose(b.to_numpy(out["y"]), x @ w.T + bias, rtol=1e-5)
    np.testing.assert_allclose(b.to_numpy(grads["x"]), g @ w, rtol=1e-5)
    np.testing.assert_allclose(b.to_numpy(grads["linear.bias"]), g.sum(0), rtol=1e-5)


def test_a_constant_that_does_not_broadcast_is_refused_at_compile_time():
    m = Model()
    m |= Linear(3)(input="x", weight=[[1.0, 2.0, 3.0]], output="y")
    with pytest.raises(ml.ShapeError, match="linear.weight"):
        ml.compile(m, NumpyBackend(), shapes={"x": [4, 2]})
