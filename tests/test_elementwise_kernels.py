"""The compiled NumPy ReLU loops (:mod:`mithril.models.elementwise_kernels`): bit for bit
NumPy's ``maximum(x, 0)`` and ``g * ~(out <= 0)`` (torch's mask) (NaN, ±0, ±inf included), in place and
into new arrays, float32 and float64; other arrays take NumPy's expressions; and a model's
gradients through ReLU equal torch's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mithril as ml
from mithril.backends import NumpyBackend
from mithril.models import elementwise_kernels as ek

SPECIAL = [np.nan, -np.nan, 0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45, 3.5, -2.0]


def _values(dtype, shape=(7, 9)):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)
    x.reshape(-1)[:len(SPECIAL)] = SPECIAL
    return x


def _bits(a):
    return a.view(np.uint32 if a.dtype == np.float32 else np.uint64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_bit_for_bit(dtype):
    x = _values(dtype)
    with np.errstate(invalid="ignore"):
        ref = np.maximum(x, 0)
    out = ek.relu(x)
    assert np.array_equal(_bits(out), _bits(ref))
    y = x.copy()
    assert ek.relu(y, out=y) is y and np.array_equal(_bits(y), _bits(ref))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_vjp_bit_for_bit(dtype):
    out = _values(dtype)
    g = np.roll(_values(dtype), 3)
    with np.errstate(invalid="ignore"):
        ref = g * ~(out <= 0)  # torch's mask: a NaN output passes g
    assert np.array_equal(_bits(ek.relu_vjp(g, out)), _bits(ref))
    h = g.copy()
    assert ek.relu_vjp(h, out, res=h) is h and np.array_equal(_bits(h), _bits(ref))
    same = out.copy()  # the cotangent is the output itself: NumPy's buffered product
    with np.errstate(invalid="ignore"):
        expect = same * (same > 0)
        got = ek.relu_vjp(same, same, res=same)
    assert np.array_equal(_bits(got), _bits(expect))


@pytest.mark.parametrize("make", [lambda x: x[:, ::2], lambda x: x.T,
                                  lambda x: x.astype(np.float16), lambda x: x > 0,
                                  lambda x: np.nan_to_num(x, posinf=9, neginf=-9).astype(np.int32)],
                         ids=["strided", "F", "f16", "bool", "int32"])
def test_other_arrays_take_numpy(make):
    x = make(_values(np.float32))
    with np.errstate(invalid="ignore"):
        got, want = ek.relu(x), np.maximum(x, 0)
        assert got.dtype == want.dtype and np.array_equal(got, want, equal_nan=True)
        g = np.ones(x.shape, np.float32)
        got, want = ek.relu_vjp(g, x), g * ~(x <= 0)
        assert got.dtype == want.dtype and np.array_equal(got, want, equal_nan=True)


def test_mlp_gradients_against_torch():
    m = ml.Model()
    m |= ml.Linear(8)(input="input", output=ml.IOKey("a", expose=False))
    m |= ml.Relu()(input="a", output=ml.IOKey("b", expose=False))
    m |= ml.Linear(3)(input="b", output="output")
    compiled = ml.compile(m, NumpyBackend(dtype="float64", seed=0), shapes={"input": [5, 4]})
    params = compiled.get_parameters()
    x = np.random.default_rng(1).standard_normal((5, 4))
    out, grads = compiled.evaluate(params, {"input": x}, output_gradients={"output": np.ones((5, 3))})
    names = sorted(params)  # linear_0.*, linear_1.* (bias before weight)
    t = {k: torch.tensor(params[k], requires_grad=True) for k in names}
    tw = [t[k] for k in names if k.endswith("weight")]
    tb = [t[k] for k in names if k.endswith("bias")]
    y = torch.relu(torch.tensor(x) @ tw[0].T + tb[0]) @ tw[1].T + tb[1]
    y.sum().backward()
    np.testing.assert_allclose(out["output"], y.detach().numpy(), rtol=1e-12)
    for k in names:
        np.testing.assert_allclose(grads[k], t[k].grad.numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(128, 10), (1, 7), (33, 1), (300, 257)])
def test_bias_loops_bit_for_bit(dtype, shape):
    rng = np.random.default_rng(3)
    g = (rng.standard_normal(shape) * 10 ** rng.uniform(-3, 3, shape)).astype(dtype)
    g.reshape(-1)[:3] = [np.inf, -0.0, 1e-40]
    b = rng.standard_normal(shape[1]).astype(dtype)
    with np.errstate(all="ignore"):
        assert np.array_equal(_bits(ek.column_sums(g)), _bits(g.sum(axis=0)))
        y = g.copy()
        assert ek.add_rows(y, b) is y
        assert np.array_equal(_bits(y), _bits(g + b))


@pytest.mark.parametrize("make", [lambda g: g[:0], lambda g: g.T, lambda g: g[:, ::2],
                                  lambda g: g.astype(np.float16)],
                         ids=["no-rows", "F", "strided", "f16"])
def test_bias_loops_other_arrays_take_numpy(make):
    g = make(np.arange(24, dtype=np.float32).reshape(4, 6) / 7)
    assert np.array_equal(ek.column_sums(g), g.sum(axis=0))
    b = np.ones(g.shape[1], g.dtype)
    y = g.copy()
    assert np.array_equal(ek.add_rows(y, b), g + b)
