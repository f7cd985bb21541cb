"""Operator-by-operator checks against torch (session 35's hunt): each case is a bug that was
found and fixed, with its real numbers compared to torch.nn.functional / autograd on every
backend (float32 in process; JAX's float64 needs x64, which is process-wide)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend

BACKENDS = [NumpyBackend, JaxBackend, TorchBackend]
IDS = ["numpy", "jax", "torch"]


def _run(backend, model, inputs: dict, trainable: list[str], cots: dict, params=None):
    """Outputs and gradients (float64 NumPy) of ``model`` on ``backend``."""
    params = params or {}
    c = ml.compile(model, backend, shapes={k: v.shape for k, v in inputs.items()},
                   trainable_keys=trainable)
    p = {k: backend.array(v) for k, v in {**params, **{k: inputs[k] for k in trainable}}.items()}
    data = {k: (backend.array(v) if v.dtype.kind == "f" else v) for k, v in inputs.items()
            if k not in trainable}
    out, grads = c.evaluate(p, data, output_gradients={k: backend.array(v) for k, v in cots.items()})
    conv = lambda a: np.asarray(backend.to_numpy(a), np.float64)  # noqa: E731
    return {k: conv(v) for k, v in out.items()}, {k: conv(v) for k, v in grads.items()}


# -- Flatten over an empty axis -------------------------------------------------------------
@pytest.mark.parametrize("backend_cls", BACKENDS, ids=IDS)
def test_flatten_of_an_empty_batch_is_torch_flatten(backend_cls):
    """(0, 3, 4) -> (0, 12) as torch.flatten: the forward reshaped to (0, -1), which every
    backend refuses (the size of -1 is ambiguous next to a 0)."""
    b = backend_cls(dtype="float32")
    x = np.zeros((0, 3, 4), np.float32)
    want = torch.flatten(torch.tensor(x), 1)
    out, grads = _run(b, ml.Flatten(), {"input": x}, ["input"], {"output": np.zeros((0, 12))})
    assert out["output"].shape == tuple(want.shape) == (0, 12)
    assert grads["input"].shape == (0, 3, 4)
    # a non-empty batch still flattens as torch does
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    g = np.arange(24, dtype=np.float64).reshape(2, 12)
    out, grads = _run(b, ml.Flatten(), {"input": x}, ["input"], {"output": g})
    np.testing.assert_array_equal(out["output"], torch.flatten(torch.tensor(x), 1).numpy())
    np.testing.assert_array_equal(grads["input"], g.reshape(2, 3, 4))


# -- LayerNorm of a 0-d input ---------------------------------------------------------------
@pytest.mark.parametrize("backend_cls", BACKENDS, ids=IDS)
def test_layer_norm_of_a_scalar_is_a_shape_error_and_changes_nothing(backend_cls):
    """Without scale and bias nothing checked the rank: a 0-d input failed inside the backend
    (NumPy's AxisError, JAX's and torch's IndexError). Now a ShapeError naming the block, and
    the same compiled model then normalises a vector as torch's F.layer_norm."""
    from mithril.errors import ShapeError

    b = backend_cls(dtype="float32")
    c = ml.compile(ml.LayerNorm(use_scale=False, use_bias=False), b)
    with pytest.raises(ShapeError, match=r"LayerNorm.*rank >= 1"):
        c.evaluate({}, {"input": b.array(np.float32(2.0))})
    x = np.array([[1.0, -2.0, 0.5, 3.0]], np.float32)
    out = np.asarray(b.to_numpy(c.evaluate({}, {"input": b.array(x)})["output"]))
    want = torch.nn.functional.layer_norm(torch.tensor(x), (4,)).numpy()
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
