"""The compiled NumPy cross-entropy (logits against class indices, :mod:`mithril.models.loss_kernels`):
values and gradients against ``torch.nn.functional.cross_entropy`` with and without the
compiled loops, NaN / inf logits routed as NumPy's path routes them, the forward without
gradients equal to the differentiated one, and bad indices refused by the forward itself
(``evaluate`` naming the data key); on torch, ``F.cross_entropy`` itself, without a reshape
where the logits are already rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mithril as ml
from mithril.backends import NumpyBackend
from mithril.errors import InputValueError
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


@pytest.mark.parametrize("bad", [4, -1])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])  # compiled loop / NumPy's path
def test_a_bad_index_computes_nothing_and_the_forward_refuses_it(bad, dtype):
    """An index outside the classes: the loop writes nothing, and the NumPy forward refuses
    it itself (a negative index would wrap in NumPy's indexing), compiled or not."""
    x = np.zeros((3, 4), dtype)
    t = np.array([0, bad, 1])
    if dtype == np.float32:
        assert loss_kernels.softmax_nll(x, t) is None
    with pytest.raises(InputValueError, match=rf"1 of 3 class indices out of range \(e.g. "
                       rf"{bad}\): 4 classes, so labels must be in \[0, 3\]"):
        CrossEntropy().forward_residuals(np, x, t)
    with pytest.raises(InputValueError):  # log-probabilities: NumPy's gather, checked too
        CrossEntropy(input_type="log_probs").forward(np, x, t)


@pytest.mark.parametrize("labels", ["input", "inside"])
def test_evaluate_names_the_key_of_labels_the_forward_refused(labels):
    """On NumPy the range of class indices is checked by the loss's own pass, not before the
    run: ``evaluate`` still raises the compiler's message naming the data key (and for
    labels computed inside the model, the loss's own message), and a train step changes
    nothing."""
    from mithril.utils.optimizers import Adam
    from mithril.utils.training import make_train_step

    m = ml.Model()
    m |= ml.Linear(4)(input="input", output=ml.IOKey("z", expose=False))
    if labels == "input":
        m |= CrossEntropy()(input="z", target="target", output="loss")
    else:  # the target is the input's argmax shifted by 3: out of range for most rows
        m |= ml.Buffer()(input="target", output=ml.IOKey("t", expose=False))
        m |= CrossEntropy()(input="z", target="t", output="loss")
    compiled = ml.compile(m, NumpyBackend(dtype="float32", seed=0), shapes={"input": [5, 3]})
    params = compiled.get_parameters()
    rng = np.random.default_rng(0)
    good = {"input": rng.standard_normal((5, 3)).astype(np.float32),
            "target": np.array([0, 1, 2, 3, 0])}
    bad = {**good, "target": np.array([0, 1, 7, 3, 0])}
    compiled.evaluate(params, good, output_gradients={"loss": 1.0})  # (checks cached)
    want = "input 'target': 1 of 5" if labels == "input" else "CrossEntropy: target: 1 of 5"
    with pytest.raises(ValueError, match=want):
        compiled.evaluate(params, bad, output_gradients={"loss": 1.0})
    with pytest.raises(ValueError, match=want):
        compiled.evaluate(params, bad)
    step = make_train_step(compiled, Adam(learning_rate=0.1), loss="loss")
    state = step.init(params)
    params, state, _ = step(params, state, good)
    before = {k: v.copy() for k, v in params.items()}
    slots = {k: np.array(v) for k, v in state.slots.items()}
    with pytest.raises(ValueError, match=want):
        step(params, state, bad)
    assert state.step == 1
    for k in before:
        np.testing.assert_array_equal(params[k], before[k])
    for k in slots:
        np.testing.assert_array_equal(np.asarray(state.slots[k]), slots[k])
    params, state, _ = step(params, state, good)  # and the loop goes on
    assert state.step == 2


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


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(7, 5), (2, 3, 4), (5,)])
def test_torch_forward_is_functional_cross_entropy(reduction, shape):
    """On torch the loss is ``F.cross_entropy`` itself (values and autograd's gradient, bit
    for bit, rows flattened where the logits are not 2-D), and 2-D logits against 1-D labels
    reach it without a reshape: each is a node of autograd's graph (~40 us of a small MLP's
    backward on CPU)."""
    from mithril.backends import TorchBackend

    xp = TorchBackend(dtype="float32")._xp
    rng = np.random.default_rng(1)
    x = torch.tensor((rng.standard_normal(shape) * 3).astype(np.float32), requires_grad=True)
    t = torch.tensor(rng.integers(0, shape[-1], shape[:-1]))
    loss = CrossEntropy(reduction).forward(xp, x, t)
    ref = F.cross_entropy(x.reshape(-1, shape[-1]), t.reshape(-1), reduction=reduction)
    ref = ref.reshape(shape[:-1]) if reduction == "none" else ref
    assert torch.equal(loss, ref)
    g = torch.tensor(rng.standard_normal(shape[:-1]).astype(np.float32))
    (got,) = torch.autograd.grad(loss, x, g if reduction == "none" else None)
    (want,) = torch.autograd.grad(ref, x, g if reduction == "none" else None)
    assert torch.equal(got, want)
    nodes, fn = [], loss.grad_fn
    while fn is not None:  # the chain from the loss back to the logits
        nodes.append(type(fn).__name__)
        fn = next((f for f, _ in fn.next_functions if f is not None), None)
    assert ("ViewBackward0" in nodes) == (len(shape) != 2), nodes
