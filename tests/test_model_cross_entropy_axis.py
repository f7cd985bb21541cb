"""``CrossEntropy(axis=1)``: torch's ``F.cross_entropy`` class axis (the published Mithril's),
checked against torch in float64 on the NumPy and torch backends and on float64 JAX (in a
subprocess: x64 is process-global); the default stays the last axis."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_python

import mithril as ml
from mithril.backends import NumpyBackend, TorchBackend
from mithril.models import CrossEntropy

BACKENDS = [pytest.param(lambda: NumpyBackend(dtype="float64"), id="numpy"),
            pytest.param(lambda: TorchBackend(dtype="float64"), id="torch")]


def _case(kind: str, reduction: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Logits (N, C, T) with T == C (the case the last axis silently got wrong), a target,
    and torch's loss and gradient of the logits for a fixed cotangent."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 3))
    if kind == "index":
        t = rng.integers(0, 3, (2, 3))
    else:
        t = rng.random((2, 3, 3))
        t /= t.sum(axis=1, keepdims=True)
    xt = torch.tensor(x, requires_grad=True)
    tt = torch.tensor(t)
    loss = F.cross_entropy(xt, tt, reduction=reduction)
    g = np.ones(()) if reduction != "none" else rng.standard_normal(loss.shape)
    loss.backward(torch.tensor(g))
    return x, t, g, (loss.detach().numpy(), xt.grad.numpy())


@pytest.mark.parametrize("make", BACKENDS)
@pytest.mark.parametrize("kind", ["index", "probs"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_axis_1_is_torch_cross_entropy(make, kind, reduction):
    b = make()
    x, t, g, (want, want_g) = _case(kind, reduction)
    c = ml.compile(CrossEntropy(reduction=reduction, axis=1), b,
                   shapes={"input": list(x.shape), "target": list(t.shape)},
                   trainable_keys=["input"])
    assert c.shapes["output"] == want.shape
    out, grads = c.evaluate({"input": b.array(x)}, {"target": b.array(t)},
                            output_gradients={"output": b.array(g)})
    np.testing.assert_allclose(b.to_numpy(out["output"]), want, rtol=1e-12)
    np.testing.assert_allclose(b.to_numpy(grads["input"]), want_g, rtol=1e-12, atol=1e-15)


def test_axis_1_on_float64_jax():
    out = run_python("""
        import numpy as np, torch, torch.nn.functional as F
        import mithril as ml
        from mithril.models import CrossEntropy
        rng = np.random.default_rng(1)
        x = rng.standard_normal((2, 3, 3)); t = rng.integers(0, 3, (2, 3))
        xt = torch.tensor(x, requires_grad=True)
        F.cross_entropy(xt, torch.tensor(t)).backward()
        b = ml.JaxBackend(dtype="float64")
        c = ml.compile(CrossEntropy(axis=1), b, shapes={"input": [2, 3, 3], "target": [2, 3]},
                       trainable_keys=["input"])
        o, g = c.evaluate({"input": b.array(x)}, {"target": b.array(t, dtype=ml.int32)},
                          output_gradients={"output": b.array(1.0)})
        np.testing.assert_allclose(np.asarray(o["output"]),
                                   F.cross_entropy(xt, torch.tensor(t)).item(), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(g["input"]), xt.grad.numpy(), rtol=1e-12, atol=1e-15)
        print("ok")
    """)
    assert out.strip().endswith("ok")


def test_default_axis_is_the_last():
    b = NumpyBackend(dtype="float64")
    x = np.random.default_rng(0).standard_normal((2, 3, 4))
    t = np.random.default_rng(1).integers(0, 4, (2, 3))
    c = ml.compile(CrossEntropy(), b, shapes={"input": [2, 3, 4], "target": [2, 3]})
    want = F.cross_entropy(torch.tensor(x).permute(0, 2, 1), torch.tensor(t)).item()
    np.testing.assert_allclose(c.evaluate({}, {"input": x, "target": t})["output"], want, rtol=1e-12)


def test_bad_axis_and_target_shape_are_refused_at_compile_time():
    with pytest.raises(ml.ShapeError, match="axis 3 is out of range"):
        ml.compile(CrossEntropy(axis=3), NumpyBackend(), shapes={"input": [2, 3, 4]})
    with pytest.raises(ml.ShapeError, match="target"):
        ml.compile(CrossEntropy(axis=1), NumpyBackend(),
                   shapes={"input": [2, 3, 4], "target": [2, 3]})
    with pytest.raises(TypeError, match="axis"):
        CrossEntropy(axis=1.0)
