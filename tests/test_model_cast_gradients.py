"""An output made by ``Cast`` to another float dtype is differentiable on every backend: its
gradient may have the model's dtype or the output's own, and JAX casts it to the output's
dtype for ``jax.vjp`` (which raised a raw ValueError)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_python

import mithril as ml
from mithril.backends import NumpyBackend, TorchBackend
from mithril.models import Cast, Linear, Model

CODE = """
import numpy as np
import mithril as ml
from mithril.models import Cast, Linear, Model

def check(b):
    m = Model()
    m |= Linear(2)(input="x", output="h")
    m |= Cast(ml.float32)(input="h", output="y")
    c = ml.compile(m, b, shapes={"x": [3, 4]})
    p = c.randomize_params()
    x = np.random.default_rng(0).standard_normal((3, 4))
    g = np.random.default_rng(1).standard_normal((3, 2))
    w = b.to_numpy(p["linear.weight"])
    for cot in (b.array(g), b.array(g.astype(np.float32), dtype=ml.float32)):
        out, grads = c.evaluate(p, {"x": b.array(x)}, output_gradients={"y": cot})
        np.testing.assert_allclose(b.to_numpy(out["y"]), x @ w.T + b.to_numpy(p["linear.bias"]),
                                   rtol=1e-6)
        np.testing.assert_allclose(b.to_numpy(grads["linear.weight"]), g.T @ x, rtol=1e-6)
        np.testing.assert_allclose(b.to_numpy(grads["linear.bias"]), g.sum(0), rtol=1e-6)
        assert b.dtype_name(grads["linear.weight"]) == "float64"
    try:
        c.evaluate(p, {"x": b.array(x)}, output_gradients={"y": g.astype(np.float16)})
        raise AssertionError("a float16 gradient was taken")
    except ml.DTypeError as e:
        assert "output gradient 'y'" in str(e)
"""


@pytest.mark.parametrize("make", [lambda: NumpyBackend(dtype="float64"),
                                  lambda: TorchBackend(dtype="float64")])
def test_gradient_of_a_cast_output(make):
    scope: dict = {}
    exec(CODE, scope)
    scope["check"](make())


def test_gradient_of_a_cast_output_on_float64_jax():
    out = run_python(CODE + "\ncheck(ml.JaxBackend(dtype='float64'))\nprint('ok')\n")
    assert out.strip().endswith("ok")


def test_other_outputs_keep_the_model_dtype_rule():
    m = Model()
    m |= Linear(2)(input="x", output="h")
    m |= Cast(ml.float32)(input="h", output="y")
    c = ml.compile(m, NumpyBackend(dtype="float64"), shapes={"x": [1, 4]})
    with pytest.raises(ml.DTypeError, match="output gradient 'h'"):
        c.evaluate(c.randomize_params(), {"x": np.ones((1, 4))},
                   output_gradients={"h": np.ones((1, 2), np.float32)})
