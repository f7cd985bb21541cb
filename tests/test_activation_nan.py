"""A NaN entering an activation stays NaN on every backend, and its gradient is torch's."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend

TORCH = {"Relu": torch.relu, "LeakyRelu": F.leaky_relu, "Gelu": F.gelu, "Sigmoid": torch.sigmoid,
         "Tanh": torch.tanh}


@pytest.mark.parametrize("backend_cls", [NumpyBackend, TorchBackend, JaxBackend], ids=lambda b: b.__name__)
@pytest.mark.parametrize("name", sorted(TORCH))
def test_nan_propagates_as_torch(backend_cls, name):
    backend = backend_cls(dtype="float64")
    model = ml.Model()
    model |= getattr(ml, name)()(input="input", output=ml.IOKey("output"))
    compiled = ml.compile(model, backend, shapes={"input": [1, 5]}, trainable_keys=["input"])
    x = np.array([[np.nan, -1.5, 0.0, 2.0, -0.0]])
    g = np.array([[1.0, 2.0, 3.0, 4.0, 5.0]])
    out, grads = compiled.evaluate({"input": backend.array(x)}, {}, output_gradients={"output": backend.array(g)})
    xt = torch.tensor(x, requires_grad=True)
    ref = TORCH[name](xt)
    ref.backward(torch.tensor(g))
    np.testing.assert_allclose(np.asarray(backend.to_numpy(out["output"])), ref.detach().numpy(), rtol=1e-12,
                               atol=1e-15)
    np.testing.assert_allclose(np.asarray(backend.to_numpy(grads["input"])), xt.grad.numpy(), rtol=1e-12,
                               atol=1e-15)
