"""Every gradient evaluate returns is its own buffer, as torch's autograd gives: an in-place
change of one (torch's clip_grad_norm_) changes no other gradient and not the caller's
output gradient."""

import numpy as np
import pytest
import torch

import mithril as ml


@pytest.mark.parametrize("backend_cls", [ml.NumpyBackend, ml.TorchBackend], ids=lambda b: b.__name__)
def test_add_gradients_are_distinct_buffers(backend_cls):
    backend = backend_cls(dtype="float64")
    m = ml.Model()
    m |= ml.Add()(left="p1", right="p2", output="y")
    c = ml.compile(m, backend, shapes={"p1": [3], "p2": [3]}, trainable_keys={"p1", "p2"})
    g = backend.array(np.array([3.0, 4.0, 0.0]))
    params = {"p1": backend.array(np.zeros(3)), "p2": backend.array(np.zeros(3))}
    _, grads = c.evaluate(params, {}, output_gradients={"y": g})
    ps = [torch.nn.Parameter(torch.zeros(3, dtype=torch.float64)) for _ in range(2)]
    ps[0].grad, ps[1].grad = (torch.as_tensor(grads[k]) for k in ("p1", "p2"))
    torch.nn.utils.clip_grad_norm_(ps, 1.0)  # in place, on each gradient once
    want = np.array([3.0, 4.0, 0.0]) / (np.sqrt(50.0) + 1e-6)  # torch's +1e-6
    np.testing.assert_allclose(ps[0].grad.numpy(), want, rtol=1e-12)
    np.testing.assert_allclose(ps[1].grad.numpy(), want, rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(backend.to_numpy(g)), [3.0, 4.0, 0.0])
