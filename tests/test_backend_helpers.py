"""The published Mithril's backend array helpers (``randn``, ``rand_uniform``, ``randint``,
``arange``, ``linspace``, ``stack``, ``cat``, ``sin``, ``pi``, dtype attributes, ...) give the
same values on NumPy, JAX and torch, and refuse bad arguments with a named error before
anything is created."""

from __future__ import annotations

import math

import numpy as np
import pytest

import mithril as ml
from mithril.backends.helpers import dtype_arg
from mithril.errors import DTypeError, ShapeError


def n(b, x):
    return np.asarray(b.to_numpy(x))


def test_constants_and_dtype_attributes(backend):
    assert backend.pi == math.pi and backend.e == math.e and backend.inf == math.inf
    assert math.isnan(backend.nan)
    assert backend.precision == 32 and backend.default_dtype == "float32"
    assert backend.backend_type == backend.name
    assert backend.get_backend_array_type() is backend.native_type is backend.DataType
    for name in ("float16", "bfloat16", "float32", "float64", "int32", "int64", "bool"):
        assert dtype_arg(getattr(backend, name)) == name
    x = backend.ones(2, dtype=backend.int32)
    assert backend.dtype_name(x) == "int32"
    assert ml.Backend[int] is ml.Backend  # published annotations: ml.Backend[DataType]
    assert backend.is_manualgrad is (backend.name == "numpy")


def test_arange_and_linspace_equal_numpy(backend):
    b = backend
    np.testing.assert_array_equal(n(b, b.arange(5)), np.arange(5))
    assert "int" in b.dtype_name(b.arange(5))
    np.testing.assert_array_equal(n(b, b.arange(2, 7)), np.arange(2, 7))
    np.testing.assert_allclose(n(b, b.arange(1.0, 2.0, 0.25)), [1.0, 1.25, 1.5, 1.75])
    assert b.dtype_name(b.arange(1.0, 2.0, 0.25)) == "float32"
    assert n(b, b.arange(3, 1)).shape == (0,)
    np.testing.assert_allclose(n(b, b.arange(0, 10, 3, dtype=ml.float32)), [0, 3, 6, 9])
    np.testing.assert_allclose(n(b, b.linspace(0, 1, 5)), np.linspace(0, 1, 5), rtol=1e-7)
    assert b.dtype_name(b.linspace(0, 1, 5)) == "float32"
    # bounds may be 0-d backend arrays (the published sine-forecast example)
    start = b.rand_uniform(0, 2 * b.pi)
    assert tuple(start.shape) == ()
    s = float(n(b, start))
    wave = b.sin(b.linspace(start, start + 2 * b.pi, 9))
    np.testing.assert_allclose(n(b, wave), np.sin(np.linspace(s, s + 2 * np.pi, 9)), atol=1e-5)
    with pytest.raises(TypeError, match="1 to 3"):
        b.arange()
    with pytest.raises(ValueError, match="steps"):
        b.linspace(0, 1, -2)


def test_stack_cat_and_shape_helpers(backend):
    b = backend
    a, c = b.array([[1.0, 2.0]]), b.array([[3.0, 4.0]])
    np.testing.assert_array_equal(n(b, b.stack([a, c])), [[[1, 2]], [[3, 4]]])
    np.testing.assert_array_equal(n(b, b.stack([a, c], axis=2)), [[[1, 3], [2, 4]]])
    np.testing.assert_array_equal(n(b, b.cat([a, c])), [[1, 2], [3, 4]])
    np.testing.assert_array_equal(n(b, b.concat([a, c], axis=1)), [[1, 2, 3, 4]])
    x = b.array(np.arange(24.0).reshape(2, 3, 4))
    assert tuple(b.flatten(x).shape) == (24,)
    assert tuple(b.flatten(x, start_dim=1).shape) == (2, 12)
    assert tuple(b.flatten(x, 0, 1).shape) == (6, 4)
    np.testing.assert_array_equal(n(b, b.transpose(x, (2, 0, 1))), np.arange(24.0).reshape(2, 3, 4).transpose(2, 0, 1))
    assert tuple(b.transpose(b.ones(2, 3)).shape) == (3, 2)
    assert tuple(b.reshape(x, (4, -1)).shape) == (4, 6)
    assert tuple(b.squeeze(b.ones(1, 3, 1)).shape) == (3,)
    assert tuple(b.expand_dims(b.ones(3), 0).shape) == (1, 3)
    np.testing.assert_array_equal(n(b, b.pad(b.ones(1, 2), ((1, 0), (0, 2)))), [[0, 0, 0, 0], [1, 1, 0, 0]])
    assert tuple(b.atleast_2d(b.array(1.0)).shape) == (1, 1)


def test_math_and_reductions(backend):
    b = backend
    v = np.array([[3.0, -1.0, 2.0], [0.5, 4.0, -2.0]])
    x = b.array(v)
    np.testing.assert_allclose(n(b, b.abs(x)), np.abs(v))
    np.testing.assert_allclose(n(b, b.sign(x)), np.sign(v))
    np.testing.assert_allclose(n(b, b.cos(x)), np.cos(v), rtol=1e-6)
    np.testing.assert_allclose(n(b, b.exp(x)), np.exp(v), rtol=1e-6)
    np.testing.assert_allclose(n(b, b.log(b.abs(x))), np.log(np.abs(v)), rtol=1e-6)
    np.testing.assert_allclose(n(b, b.sqrt(b.abs(x))), np.sqrt(np.abs(v)), rtol=1e-6)
    np.testing.assert_allclose(n(b, b.relu(x)), np.maximum(v, 0))
    np.testing.assert_allclose(n(b, b.leaky_relu(x, 0.1)), np.where(v > 0, v, 0.1 * v), rtol=1e-6)
    np.testing.assert_allclose(n(b, b.sigmoid(x)), 1 / (1 + np.exp(-v)), rtol=1e-6)
    np.testing.assert_allclose(n(b, b.softplus(x)), np.log1p(np.exp(v)), rtol=1e-5)
    sm = np.exp(v) / np.exp(v).sum(-1, keepdims=True)
    np.testing.assert_allclose(n(b, b.softmax(x)), sm, rtol=1e-5)
    np.testing.assert_allclose(n(b, b.clip(x, -1.5, 1.5)), np.clip(v, -1.5, 1.5))
    np.testing.assert_allclose(n(b, b.where(x > 0, x, b.zeros_like(x))), np.maximum(v, 0))
    np.testing.assert_allclose(n(b, b.sum(x, axis=1, keepdim=True)), v.sum(1, keepdims=True))
    np.testing.assert_allclose(n(b, b.mean(x)), v.mean(), rtol=1e-6)
    np.testing.assert_allclose(n(b, b.max(x, axis=0)), v.max(0))
    np.testing.assert_allclose(n(b, b.min(x)), v.min())
    np.testing.assert_array_equal(n(b, b.argmax(x, axis=1)), [0, 1])
    np.testing.assert_array_equal(n(b, b.argmin(x, axis=1)), [1, 2])
    np.testing.assert_allclose(n(b, b.topk(x, 2)), [[3.0, 2.0], [4.0, 0.5]])
    np.testing.assert_allclose(n(b, b.sort(x, descending=True)), -np.sort(-v, axis=-1))
    nan = b.array([np.nan, 1.0, np.inf])
    np.testing.assert_array_equal(n(b, b.isnan(nan)), [True, False, False])
    np.testing.assert_allclose(n(b, b.nan_to_num(nan, posinf=9.0)), [0.0, 1.0, 9.0])
    assert bool(n(b, b.all(x > -5))) and not bool(n(b, b.any(x > 5)))


def test_creation_helpers_and_dtypes(backend):
    b = backend
    np.testing.assert_array_equal(n(b, b.zeros(2, 3)), np.zeros((2, 3)))
    np.testing.assert_array_equal(n(b, b.ones((2, 3))), np.ones((2, 3)))
    assert tuple(b.ones([4]).shape) == (4,) and tuple(b.zeros().shape) == ()
    x = b.ones(2, 3)
    assert b.dtype_name(b.zeros_like(x)) == "float32"
    assert b.dtype_name(b.ones_like(x, dtype=ml.float16)) == "float16"
    assert b.dtype_name(b.ones(2, dtype=b.float16)) == "float16"
    assert b.dtype_name(b.cast(np.ones(2), ml.float16)) == "float16"
    assert b.dtype_name(b.cast(np.ones(2, np.float64))) == "float32"
    assert b.dtype_name(b.array([1, 2], dtype=b.int32)) == "int32"


def test_seeded_randomness_is_reproducible(backend_cls):
    a, c = backend_cls(seed=7), backend_cls(seed=7)
    x, y = a.randn(3, 4), c.randn((3, 4))
    assert tuple(x.shape) == (3, 4) and a.dtype_name(x) == "float32"
    np.testing.assert_array_equal(n(a, x), n(c, y))
    # the same seed on every backend: the same numbers (one NumPy generator behind them)
    np.testing.assert_allclose(n(a, x), np.random.default_rng(7).standard_normal((3, 4)), rtol=1e-6)
    assert not np.array_equal(n(a, a.randn(3, 4)), n(a, x))  # the stream advances
    a.set_seed(7)
    np.testing.assert_array_equal(n(a, a.randn(3, 4)), n(a, x))
    # key=: the same key, the same array, and the backend's stream is left alone
    k1, k2 = a.randn(5, key=42), a.randn(5, key=42)
    np.testing.assert_array_equal(n(a, k1), n(a, k2))
    np.testing.assert_array_equal(n(a, a.randn(5)), n(c, c.randn(5)))
    r = n(a, a.rand(1000))
    assert r.min() >= 0 and r.max() < 1


def test_rand_uniform_and_randint_bounds(backend):
    b = backend
    u = n(b, b.rand_uniform(-2.0, 3.0, 2000))
    assert u.shape == (2000,) and u.min() >= -2.0 and u.max() < 3.0 and 0.3 < u.mean() < 0.7
    assert b.dtype_name(b.rand_uniform(0, 1, 3, 2)) == "float32"
    np.testing.assert_array_equal(n(b, b.rand_uniform(0, 1, (4,), key=3)),
                                  n(b, b.rand_uniform(0, 1, 4, key=3)))
    i = n(b, b.randint(-3, 4, (500,)))
    assert i.shape == (500,) and i.min() == -3 and i.max() == 3
    assert "int" in b.dtype_name(b.randint(0, 5, 2, 2))
    assert set(np.unique(n(b, b.randint(0, 2, 200, key=1)))) == {0, 1}
    m = n(b, b.multinomial(b.array([[0.0, 1.0], [1.0, 0.0]]), 3, replacement=True, key=0))
    np.testing.assert_array_equal(m, [[1, 1, 1], [0, 0, 0]])


@pytest.mark.parametrize("call, error, match", [
    (lambda b: b.ones(-1, 2), ShapeError, "ones: sizes must be >= 0, got -1"),
    (lambda b: b.zeros((2, -3)), ShapeError, "zeros: sizes must be >= 0, got -3"),
    (lambda b: b.randn(2.5), ShapeError, "randn: sizes must be ints, got 2.5"),
    (lambda b: b.rand_uniform(0, 1, -4), ShapeError, "rand_uniform: sizes must be >= 0"),
    (lambda b: b.randint(0, 5, (3, -1)), ShapeError, "randint: sizes must be >= 0"),
    (lambda b: b.randn(2, dtype="float8"), DTypeError, r"randn\(dtype=...\): unsupported dtype 'float8'"),
    (lambda b: b.zeros(2, dtype=complex), DTypeError, "unsupported dtype"),
    (lambda b: b.randint(5, 5, 3), ValueError, "high must be > low"),
    (lambda b: b.rand_uniform(2.0, 1.0, 3), ValueError, "low must be <= high"),
])
def test_bad_arguments_raise_named_errors_before_drawing(backend, call, error, match):
    before = backend._rng.bit_generator.state
    with pytest.raises(error, match=match):
        call(backend)
    assert backend._rng.bit_generator.state == before  # nothing was drawn
    assert issubclass(ShapeError, ValueError) and issubclass(DTypeError, TypeError)


def test_device_helpers(backend):
    x = backend.ones(2)
    assert backend.block_until_ready(x) is x
    assert tuple(backend.to_device(x, "cpu").shape) == (2,)
    assert "cpu" in str(backend.get_device()).lower()
    backend.empty_cache()
