"""Shaping, indexing and tensor-creation blocks against torch in float64 (hunt 65)."""

import numpy as np
import pytest
import torch

import mithril as ml

BACKENDS = {"numpy": ml.NumpyBackend, "torch": ml.TorchBackend, "jax": ml.JaxBackend}


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("block, fn", [(ml.Maximum, torch.maximum), (ml.Minimum, torch.minimum)])
def test_extremum_gradient_at_infinite_ties_and_nan_is_torchs(backend, block, fn):
    # a tie of two infinities splits the cotangent in halves (NumPy gave 0: inf - inf is NaN);
    # where either operand is NaN, torch gives both the whole cotangent (NumPy and JAX gave 0)
    nan, inf = np.nan, np.inf
    left = np.array([[1.0], [inf], [-inf], [nan]])
    right = np.array([1.0, inf, -inf, nan, -2.0])
    model = ml.Model()
    model |= block()(left="left", right="right", output="output")
    compiled = ml.compile(model, BACKENDS[backend](dtype="float64"),
                          shapes={"left": [4, 1], "right": [5]}, trainable_keys={"left", "right"})
    cot = np.random.default_rng(0).standard_normal((4, 5))
    out, grads = compiled.evaluate({"left": left, "right": right}, {},
                                   output_gradients={"output": cot})
    tl = torch.tensor(left, requires_grad=True)
    tr = torch.tensor(right, requires_grad=True)
    y = fn(tl, tr)
    (y * torch.tensor(cot)).sum().backward()
    np.testing.assert_array_equal(np.asarray(out["output"]), y.detach().numpy())
    np.testing.assert_allclose(np.asarray(grads["left"]), tl.grad.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(grads["right"]), tr.grad.numpy(), rtol=0, atol=1e-12)
