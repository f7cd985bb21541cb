"""Fixes of the sixty-fifth session's review that fall outside the hunters' own files."""

from __future__ import annotations

import numpy as np
import pytest

import mithril as ml

BACKENDS = {"numpy": ml.NumpyBackend, "torch": ml.TorchBackend, "jax": ml.JaxBackend}


def _draws(name: str, dtype: str) -> np.ndarray:
    from mithril.models import Randn

    m = ml.Model()
    m |= Randn(shape=(4000,), key=7).connect(output="z")
    m.expose_keys("z")
    be = BACKENDS[name](dtype=dtype)
    out = ml.compile(m, be, inference=True).evaluate({}, {})
    return np.asarray(be.to_numpy(out["z"]), dtype=np.float64)


@pytest.mark.parametrize("name", sorted(BACKENDS))
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_randn_in_half_precision_is_the_wide_draw_rounded(name, dtype):
    """Randn in float16 / bfloat16 gives the float64 draws to the half dtype's rounding (one
    ulp), on every backend (JAX drew in the half dtype: 2**24 is inf in float16, so every
    value was inf or NaN, and bfloat16's uniforms lost their bits)."""
    want = _draws("numpy", "float64")
    got = _draws(name, dtype)
    assert np.isfinite(got).all()
    ulp = 2.0 ** (-10 if dtype == "float16" else -7)
    np.testing.assert_allclose(got, want, rtol=ulp, atol=1e-6)  # atol: float32 cos near its zeros


@pytest.mark.parametrize("max_lr", [[0.1, 0.0], [0.0, 0.0]])
def test_one_cycle_with_a_frozen_group_is_torchs(max_lr):
    """OneCycleLR with max_lr 0 for a group (or all) holds that group at 0 and schedules the
    others, as torch's (it was refused: no division by zero in torch there)."""
    import torch

    from mithril.utils.lr_schedulers import OneCycleLR
    from mithril.utils.optimizers import SGD

    opt = SGD(learning_rate=0.1, param_groups=[{"params": ["b"]}])
    ours = OneCycleLR(opt, max_lr, 20, per_group=True)
    m = torch.nn.Linear(1, 1)
    topt = torch.optim.SGD([{"params": [m.weight]}, {"params": [m.bias]}], lr=0.1)
    theirs = torch.optim.lr_scheduler.OneCycleLR(topt, max_lr, 20, cycle_momentum=False)
    for step in range(21):
        want = [g["lr"] for g in topt.param_groups]
        np.testing.assert_allclose([opt.get_learning_rate(), opt.get_learning_rate(0)], want,
                                   rtol=1e-13, atol=0, err_msg=f"step {step}")
        if step < 20:
            topt.step()
            theirs.step()
            ours.step()


BCE_WEIGHTS = [np.array([0.5, 2.0, -1.0]), np.array([[3.0], [0.25]]), np.array([1.5]),
               np.arange(6.0).reshape(2, 3) - 2.0]


@pytest.mark.parametrize("name", sorted(BACKENDS))
@pytest.mark.parametrize("input_type", ["logits", "probs"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("wi", range(len(BCE_WEIGHTS)))
def test_binary_cross_entropy_weight_is_torchs(name, input_type, reduction, wi):
    """BinaryCrossEntropy(weight=...) rescales each element's loss as torch's ``weight``
    (broadcast; "mean" over the elements), with pos_weight too for logits: values and the
    gradients of input and target on every backend (``weight`` was not an argument)."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(wi)
    x = rng.standard_normal((2, 3)) if input_type == "logits" else rng.uniform(0.05, 0.95, (2, 3))
    t = rng.uniform(0.0, 1.0, (2, 3))
    w = BCE_WEIGHTS[wi]
    pw = [2.0, 0.5, 1.0] if input_type == "logits" else 1.0
    xt, tt = (torch.tensor(a, requires_grad=True) for a in (x, t))
    if input_type == "logits":
        ref = F.binary_cross_entropy_with_logits(xt, tt, weight=torch.tensor(w),
                                                 pos_weight=torch.tensor(pw), reduction=reduction)
    else:
        ref = F.binary_cross_entropy(xt, tt, weight=torch.tensor(w), reduction=reduction)
    g = rng.standard_normal(tuple(ref.shape))
    ref.backward(torch.tensor(g))
    be = BACKENDS[name](dtype="float64")
    model = ml.Model()
    model |= ml.BinaryCrossEntropy(input_type, pos_weight=pw, weight=w, reduction=reduction)(
        input="x", target="t", output=ml.IOKey("loss"))
    compiled = ml.compile(model, be, shapes={"x": [2, 3], "t": [2, 3]},
                          trainable_keys={"x", "t"})
    out, grads = compiled.evaluate({"x": be.array(x), "t": be.array(t)}, {},
                                   output_gradients={"loss": be.array(g)})
    np.testing.assert_allclose(np.asarray(be.to_numpy(out["loss"])), ref.detach().numpy(),
                               rtol=1e-12, atol=1e-14)
    for key, tensor in (("x", xt), ("t", tt)):
        np.testing.assert_allclose(np.asarray(be.to_numpy(grads[key])), tensor.grad.numpy(),
                                   rtol=1e-12, atol=1e-14, err_msg=key)


def test_binary_cross_entropy_weight_is_checked():
    with pytest.raises(ValueError, match="weight must be an array of finite numbers"):
        ml.BinaryCrossEntropy(weight=[1.0, float("nan")])
    model = ml.Model()
    model |= ml.BinaryCrossEntropy(weight=np.ones(4))(input="x", target="t",
                                                      output=ml.IOKey("loss"))
    with pytest.raises(ml.ShapeError, match=r"weight of shape \(4,\) does not broadcast"):
        ml.compile(model, ml.NumpyBackend(), shapes={"x": [2, 3], "t": [2, 3]})


def test_numpy_max_unpool_of_a_larger_pool_names_the_index():
    """MaxPool2D of a 5x5 input into MaxUnpool2D without output_size: an index past the 4x4
    output is torch's "invalid max index"; NumPy raised its own IndexError (negative ones
    would wrap), now a ValueError naming the index and the plane."""
    import torch
    import torch.nn.functional as F

    x = np.arange(25.0).reshape(1, 1, 5, 5)
    out, idx = F.max_pool2d(torch.tensor(x), 2, return_indices=True)
    with pytest.raises(RuntimeError, match="invalid max index"):
        F.max_unpool2d(out, idx, 2)
    model = ml.Model()
    model |= ml.MaxPool2D(2, return_indices=True)(
        input="input", output=ml.IOKey("o", expose=False), indices=ml.IOKey("i", expose=False))
    model |= ml.MaxUnpool2D(2)(input="o", indices="i", output=ml.IOKey("output"))
    compiled = ml.compile(model, ml.NumpyBackend(dtype="float64"), shapes={"input": [1, 1, 5, 5]})
    with pytest.raises(ValueError, match=r"MaxUnpool2D: indices holds 18: indices must be in "
                                         r"\[0, 15\]"):
        compiled.evaluate({}, {"input": x})


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_hardsigmoid_at_infinities_and_nan_is_torchs(name):
    """Hardsigmoid at ±inf is 1 / 0 and at NaN NaN, with gradient 0 at all three, as
    F.hardsigmoid's (the JAX backend's autodiff followed the (x + 3) / 6 branch at NaN:
    gradient 1/6); torch's backward multiplies by 1/6 in float32, hence the tolerance."""
    import torch
    import torch.nn.functional as F

    from mithril.models.activations import Hardsigmoid

    x = np.array([np.inf, -np.inf, np.nan, 3.0, -3.0, 1.0, 2.999, -7.0])
    xt = torch.tensor(x, requires_grad=True)
    want = F.hardsigmoid(xt)
    want.backward(torch.ones_like(want))
    model = ml.Model()
    model |= Hardsigmoid()(input="x", output=ml.IOKey("y"))
    be = BACKENDS[name](dtype="float64")
    compiled = ml.compile(model, be, shapes={"x": [8]}, trainable_keys={"x"})
    out, grads = compiled.evaluate({"x": be.array(x)}, {},
                                   output_gradients={"y": be.array(np.ones(8))})
    np.testing.assert_allclose(np.asarray(be.to_numpy(out["y"])), want.detach().numpy(),
                               rtol=1e-15, atol=0)  # (XLA: (x + 3) · (1/6))
    np.testing.assert_allclose(np.asarray(be.to_numpy(grads["x"])), xt.grad.numpy(),
                               rtol=1e-7, atol=0)
