"""Activations and reductions against torch at their edges (values and gradients, float64,
NumPy / torch / JAX)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import mithril as ml

BACKENDS = {"numpy": ml.NumpyBackend, "torch": ml.TorchBackend, "jax": ml.JaxBackend}


def _value_and_grad(block, backend_name, x, g, **evaluate):
    backend = BACKENDS[backend_name](dtype="float64")
    model = ml.Model()
    model |= block(input="input", output="output")
    c = ml.compile(model, backend, shapes={"input": list(x.shape)}, trainable_keys={"input"})
    out, grads = c.evaluate({"input": backend.array(x)}, {},
                            output_gradients={"output": backend.array(g)}, **evaluate)[:2]
    as_np = lambda a: a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)  # noqa: E731
    return as_np(out["output"]).astype(np.float64), as_np(grads["input"]).astype(np.float64)


def _torch_value_and_grad(fn, x, g):
    xt = torch.tensor(x, requires_grad=True)
    y = fn(xt)
    y.backward(torch.tensor(g))
    return y.detach().numpy(), xt.grad.numpy()


def _same(got, want):
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize(("shape", "axis", "correction"), [
    ((3, 1, 4), 1, 2),        # one element, correction 2: NaN, gradient 2·0 / (1 − 2) = 0
    ((2, 3), 0, 2),           # N = correction: inf, gradient ±inf
    ((2, 3), 0, 3),           # N < correction: inf, gradient 2·(x − mean) / (N − c), finite
    ((4, 2), (0, 1), 9),
])
def test_variance_with_no_degrees_of_freedom_is_torchs(backend, shape, axis, correction):
    """Variance where N − correction <= 0 was NaN on JAX where torch's (and NumPy's) is inf,
    and its NumPy / JAX gradient NaN or ±inf where torch's is 2·(x − mean) / (N − c)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape)
    ref = lambda t: torch.var(t, dim=axis, correction=correction)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = rng.standard_normal(tuple(ref(torch.tensor(x)).shape))
    want_y, want_g = _torch_value_and_grad(ref, x, g)
    y, gx = _value_and_grad(ml.Variance(axis=axis, correction=correction), backend, x, g)
    _same(y, want_y)
    np.testing.assert_array_equal(np.isinf(gx), np.isinf(want_g))
    _same(gx, want_g)


def _half_value_and_grad(block, backend_name, dtype, x, g):
    backend = BACKENDS[backend_name](dtype=dtype)
    model = ml.Model()
    model |= block(input="input", output="output")
    c = ml.compile(model, backend, shapes={"input": list(x.shape)}, trainable_keys={"input"})
    out, grads = c.evaluate({"input": backend.array(x)}, {},
                            output_gradients={"output": backend.array(g)})[:2]
    as_np = lambda a: a.float().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, np.float64)  # noqa: E731
    return as_np(out["output"]), as_np(grads["input"])


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_softplus_in_half_precision_does_not_overflow_below_the_threshold(backend, dtype):
    """Softplus of a float16 input between β·x ≈ 11.1 and the threshold (20) was inf on NumPy
    and JAX (e^(β·x) overflows float16) and its gradient NaN; torch computes it in float32
    and gives x (gradient 1 − e^−x)."""
    x = np.array([[-30.0, -12.0, -1.0, 0.0, 1.0, 11.0, 12.0, 15.0, 19.5, 20.0, 25.0]])
    g = np.linspace(0.5, 1.5, x.size).reshape(x.shape)
    for block, ref in ((ml.Softplus(), torch.nn.functional.softplus),
                       (ml.Softplus(beta=2.0, threshold=30.0),
                        lambda t: torch.nn.functional.softplus(t, 2.0, 30.0))):
        xt = torch.tensor(x, dtype=getattr(torch, dtype), requires_grad=True)
        y = ref(xt)
        y.backward(torch.tensor(g, dtype=xt.dtype))
        got_y, got_g = _half_value_and_grad(block, backend, dtype, x, g)
        assert np.isfinite(got_y).all() and np.isfinite(got_g).all()
        tol = 1e-3 if dtype == "float16" else 8e-3  # one rounding: half an ulp, relative
        np.testing.assert_allclose(got_y, y.detach().float().numpy(), rtol=tol, atol=1e-6)
        np.testing.assert_allclose(got_g, xt.grad.float().numpy(), rtol=tol, atol=1e-6)


@pytest.mark.parametrize("backend", ["numpy", "jax"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", ["gelu", "gelu_tanh", "elu", "celu", "selu", "silu", "mish"])
def test_half_precision_activations_are_computed_in_float32_as_torch(backend, dtype, name):
    """GELU, the ELU family, SiLU and Mish of a float16 / bfloat16 input were computed in
    the half dtype on NumPy / JAX: GELU's gradient at x = −0.75 (a cancellation) was 2.5×
    torch's in bfloat16 on JAX, ELU / CELU / SELU's JAX gradient 0 in the tail (e^−9.5 =
    7.5e-5 lost in expm1 + 1), the tanh GELU 0 below −4. torch computes them in float32 and
    rounds once; so do they now (a few ulps from torch's)."""
    F = torch.nn.functional
    block, ref = {
        "gelu": (ml.Gelu(), F.gelu),
        "gelu_tanh": (ml.Gelu(approximate="tanh"), lambda t: F.gelu(t, approximate="tanh")),
        "elu": (ml.Elu(), F.elu), "celu": (ml.Celu(0.5), lambda t: F.celu(t, 0.5)),
        "selu": (ml.Selu(), F.selu), "silu": (ml.Silu(), F.silu), "mish": (ml.Mish(), F.mish),
    }[name]
    x = np.linspace(-10.0, 10.0, 81)[None]
    g = np.ones_like(x)
    xt = torch.tensor(x, dtype=getattr(torch, dtype), requires_grad=True)
    y = ref(xt)
    y.backward(torch.tensor(g, dtype=xt.dtype))
    x64 = torch.tensor(x, requires_grad=True)
    y64 = ref(x64)
    y64.backward(torch.tensor(g))
    got_y, got_g = _half_value_and_grad(block, backend, dtype, x, g)
    ulp = 2.0**-10 if dtype == "float16" else 2.0**-7
    for got, want, exact in ((got_y, y.detach().float().numpy(), y64.detach().numpy()),
                             (got_g, xt.grad.float().numpy(), x64.grad.numpy())):
        # as close to the exact value as torch's half result, give or take 4 ulps (4e-6 near 0)
        bound = np.abs(want - exact) + 4 * ulp * np.abs(exact) + 4e-6
        i = np.argmax(np.abs(got - exact) - bound)
        assert (np.abs(got - exact) <= bound).all(), (x.ravel()[i], got.ravel()[i],
                                                      want.ravel()[i], exact.ravel()[i])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_rrelu_training_slopes_in_half_precision_are_in_range(backend, dtype):
    """RReLU in training mode drew its slope from 24 random bits cast to the input dtype: in
    float16 2^24 overflows, so every slope was inf (NaN on JAX). Each slope lies in
    [lower, upper] (rounded to the dtype) and the gradient is the same slope, as torch's."""
    x = -np.ones((8, 16))
    backend_obj = BACKENDS[backend](dtype=dtype)
    model = ml.Model()
    model |= ml.RReLU(0.1, 0.3)(input="input", output="output")
    c = ml.compile(model, backend_obj, shapes={"input": [8, 16]}, trainable_keys={"input"})
    out, grads = c.evaluate({"input": backend_obj.array(x)}, {},
                            output_gradients={"output": backend_obj.array(np.ones((8, 16)))},
                            training=True)[:2]
    as_np = lambda a: a.double().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, np.float64)  # noqa: E731
    slope, gx = -as_np(out["output"]), as_np(grads["input"])
    lo = float(torch.tensor(0.1, dtype=getattr(torch, dtype)))
    hi = float(torch.tensor(0.3, dtype=getattr(torch, dtype)))
    assert np.isfinite(slope).all() and (slope >= lo).all() and (slope <= hi).all()
    assert slope.std() > 0.02  # drawn, not one value
    np.testing.assert_array_equal(gx, slope)


@pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("correction", [0, 1])
def test_variance_over_no_axis_reduces_nothing_on_every_backend(backend, correction):
    """Variance(axis=()) is the variance of each element alone (shape kept, as Sum(axis=())
    and NumPy's axis=()): the torch backend passed dim=() to torch.var, which reduces every
    axis, and returned a scalar against the compiled shape (2, 3)."""
    x = np.arange(6.0).reshape(2, 3)
    g = np.ones((2, 3))
    y, gx = _value_and_grad(ml.Variance(axis=(), correction=correction), backend, x, g)
    # each element as a slice of one: torch.var over a new axis of size 1
    want_y, want_g = _torch_value_and_grad(
        lambda t: torch.var(t.unsqueeze(-1), dim=-1, correction=correction), x, g)
    assert y.shape == (2, 3)
    _same(y, want_y)
    _same(gx, want_g)
