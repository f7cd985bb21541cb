"""The compiled NumPy cross-entropy (logits against class indices, :mod:`mithril.models.loss_kernels`):
values and gradients against ``torch.nn.functional.cross_entropy`` with and without the
compiled loops, NaN / inf logits routed as NumPy's path routes them, the forward without
gradients equal to the differentiated one, and bad indices left to NumPy's error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mithril as ml
from mithril.backends import NumpyBackend
from mithril.models import loss_kernels
from mithril.models.losses import CrossEntropy


def _loss_and_grad(op: CrossEntropy, x: np.ndarray, t: np.ndarray, g: np.ndarray):
    loss, res = op.forward_residuals(np, x, t)
    grad = op.vjp(np.asarray(g, x.dtype) if np.ndim(g) else x.dtype.type(g), loss,
                  {"input": x.copy(), "target": t}, {"input"}, residuals=res)["input"]
    return loss, grad


@pytest.mark.parametrize("loops", [True, False], ids=["compiled", "numpy"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 2e-6)])
@pytest.mark.parametrize("shape", [(7, 5), (2, 3, 4), (1, 1)])
def test_against_torch(loops, reduction, dtype, tol, shape, monkeypatch):
    if not loops:
        monkeypatch.setattr(loss_kernels, "COMPILED", ())
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 4).astype(dtype)
    t = rng.integers(0, shape[-1], shape[:-1])
    g = rng.standard_normal(shape[:-1]).astype(dtype) if reduction == "none" else 0.7
    op = CrossEntropy(reduction)
    loss, grad = _loss_and_grad(op, x, t, g)
    xt = torch.tensor(x.astype(np.float64), requires_grad=True)
    ref = F.cross_entropy(xt.reshape(-1, shape[-1]), torch.tensor(t.reshape(-1)),
                          reduction=reduction)
    ref = ref.reshape(shape[:-1]) if reduction == "none" else ref
    (ref * torch.tensor(np.asarray(g, np.float64))).sum().backward()
    np.testing.assert_allclose(np.asarray(loss, np.float64), ref.detach().numpy(), rtol=tol,
                               atol=tol)
    np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=tol, atol=tol)
    assert np.asarray(loss).dtype == dtype and grad.dtype == dtype
    assert np.array_equal(op.forward(np, x, t), loss)  # no gradients: the same arithmetic


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_nan_and_inf_logits_as_numpy(reduction, monkeypatch):
    x = np.array([[1.0, np.nan, 2.0], [np.inf, 0.0, 1.0], [-np.inf, 0.0, 1.0],
                  [3.0, 2.0, np.nan]], np.float32)
    t = np.array([0, 1, 0, 2])
    g = np.ones(4, np.float32) if reduction == "none" else 1.0
    op = CrossEntropy(reduction)
    compiled = _loss_and_grad(op, x, t, g)
    monkeypatch.setattr(loss_kernels, "COMPILED", ())
    with np.errstate(invalid="ignore"):
        plain = _loss_and_grad(op, x, t, g)
        for a, b in zip(compiled, plain):
            np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
            np.testing.assert_allclose(np.nan_to_num(a), np.nan_to_num(b), rtol=1e-6)


def test_a_bad_index_computes_nothing_and_numpy_raises():
    """An index past the classes (a target computed inside the model, not an input that
    evaluate checks): the loop writes nothing and NumPy's indexing raises."""
    x = np.zeros((3, 4), np.float32)
    assert loss_kernels.softmax_nll(x, np.array([0, 4, 1])) is None
    with pytest.raises(IndexError):
        CrossEntropy().forward_residuals(np, x, np.array([0, 4, 1]))


def test_a_model_trains_the_same_with_and_without_the_loops(monkeypatch):
    """evaluate's loss and gradients on a small classifier, float64: the compiled loops equal
    NumPy's path to rounding, on every parameter."""
    m = ml.Model()
    m |= ml.Linear(6)(input="input", output=ml.IOKey("z", expose=False))
    m |= CrossEntropy()(input="z", target="target", output="loss")
    compiled = ml.compile(m, NumpyBackend(dtype="float64", seed=0), shapes={"input": [9, 5]})
    params = compiled.get_parameters()
    rng = np.random.default_rng(1)
    data = {"input": rng.standard_normal((9, 5)), "target": rng.integers(0, 6, 9)}
    out_a, grad_a = compiled.evaluate(params, data, output_gradients={"loss": 1.0})
    monkeypatch.setattr(loss_kernels, "COMPILED", ())
    out_b, grad_b = compiled.evaluate(params, data, output_gradients={"loss": 1.0})
    np.testing.assert_allclose(out_a["loss"], out_b["loss"], rtol=1e-14)
    for k in grad_a:
        np.testing.assert_allclose(grad_a[k], grad_b[k], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint64])
def test_label_range_check_of_every_integer_dtype(dtype):
    """``evaluate``'s class-index check (one reduction over the labels seen as unsigned):
    in-range labels pass, a negative one or one past the classes is the named error."""
    m = ml.Model()
    m |= ml.CrossEntropy()(input="input", target="target", output="loss")
    c = ml.compile(m, NumpyBackend(dtype="float64"), shapes={"input": [4, 3]})
    x = np.zeros((4, 3))
    out = c.evaluate({}, {"input": x, "target": np.array([0, 2, 1, 2], dtype)})
    np.testing.assert_allclose(out["loss"], np.log(3.0))
    bad = [np.array([0, 3, 1, 2], dtype)]
    if np.dtype(dtype).kind == "i":
        bad.append(np.array([0, -1, 1, 2], dtype))
        bad.append(np.array([np.iinfo(dtype).min, 0, 1, 2], dtype))
    for t in bad:
        with pytest.raises(ValueError, match=r"input 'target': 1 of 4 class indices out of range"):
            c.evaluate({}, {"input": x, "target": t})
