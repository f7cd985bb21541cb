"""The published Mithril's primitives (Buffer, reductions, elementwise math, shaping, Where, Cast).

1. Every backend in float64 (JAX in a subprocess: x64 is process-wide), against torch's own
   functions in float64 at 1e-10: outputs, and the gradients of ``Σ <output, cotangent>``
   with respect to every float input (made trainable with ``compile(trainable_keys=...)``).
2. The NumPy VJPs against central finite differences.
3. Ties (|x| at 0, max/min with repeated values, Relu at 0): the same gradient everywhere.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import jax_float64

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend

TOL = 1e-10


def _x(*shape, seed=0, low=None):
    a = np.random.default_rng(seed).standard_normal(shape)
    return np.abs(a) + low if low is not None else a


_PROBS = np.exp(_x(3, 4, seed=5)) / np.exp(_x(3, 4, seed=5)).sum(-1, keepdims=True)
TIES = np.array([[1.0, 3.0, 3.0, -2.0], [0.0, -2.0, -2.0, 0.0], [5.0, 5.0, 5.0, 5.0]])

# name: (operator or model factory, inputs, torch reference returning {output: tensor}, smooth)
# "smooth" cases also run the finite-difference check (no kinks at the inputs).
CASES: dict[str, tuple[Callable, dict, Callable, bool]] = {
    "buffer": (ml.Buffer, {"input": _x(3, 4)}, lambda t: {"output": t["input"] * 1}, True),
    "exponential": (ml.Exponential, {"input": _x(3, 4)}, lambda t: {"output": t["input"].exp()}, True),
    "log": (ml.Log, {"input": _x(3, 4, low=0.5)}, lambda t: {"output": t["input"].log()}, True),
    "sqrt": (ml.Sqrt, {"input": _x(3, 4, low=0.5)}, lambda t: {"output": t["input"].sqrt()}, True),
    "absolute": (ml.Absolute, {"input": _x(3, 4)}, lambda t: {"output": t["input"].abs()}, True),
    "absolute_at_0": (ml.Absolute, {"input": TIES}, lambda t: {"output": t["input"].abs()}, False),
    "negate": (ml.Negate, {"input": _x(3, 4)}, lambda t: {"output": -t["input"]}, True),
    "square": (ml.Square, {"input": _x(3, 4)}, lambda t: {"output": t["input"].square()}, True),
    "subtract": (ml.Subtract, {"left": _x(3, 4), "right": _x(4, seed=1)},
                 lambda t: {"output": t["left"] - t["right"]}, True),
    "divide": (ml.Divide, {"numerator": _x(3, 4), "denominator": _x(3, 1, seed=1, low=0.5)},
               lambda t: {"output": t["numerator"] / t["denominator"]}, True),
    "power": (ml.Power, {"base": _x(3, 4, low=0.5), "exponent": _x(3, 4, seed=1)},
              lambda t: {"output": torch.pow(t["base"], t["exponent"])}, True),
    "power_fixed_exponent": (lambda: ml.Power(exponent=3.0), {"base": _x(3, 4)},
                             lambda t: {"output": t["base"] ** 3}, True),
    "where": (ml.Where, {"cond": _x(3, 4, seed=2) > 0, "input1": _x(3, 4), "input2": _x(4, seed=1)},
              lambda t: {"output": torch.where(t["cond"], t["input1"], t["input2"])}, True),
    "cast_float64": (lambda: ml.Cast(ml.float64), {"input": _x(3, 4)},
                     lambda t: {"output": t["input"].to(torch.float64)}, True),
    "sum_all": (ml.Sum, {"input": _x(2, 3, 4)}, lambda t: {"output": t["input"].sum()}, True),
    "sum_axis": (lambda: ml.Sum(axis=1), {"input": _x(2, 3, 4)},
                 lambda t: {"output": t["input"].sum(1)}, True),
    "mean_axes_keepdim": (lambda: ml.Mean(axis=(0, 2), keepdim=True), {"input": _x(2, 3, 4)},
                          lambda t: {"output": t["input"].mean((0, 2), keepdim=True)}, True),
    "mean_negative_axis": (lambda: ml.Mean(axis=-1), {"input": _x(2, 3, 4)},
                           lambda t: {"output": t["input"].mean(-1)}, True),
    "max_axis": (lambda: ml.Max(axis=1), {"input": _x(2, 3, 4)},
                 lambda t: {"output": t["input"].amax(1)}, True),
    "max_all": (ml.Max, {"input": _x(2, 3, 4)}, lambda t: {"output": t["input"].amax()}, True),
    "min_keepdim": (lambda: ml.Min(axis=0, keepdim=True), {"input": _x(2, 3, 4)},
                    lambda t: {"output": t["input"].amin(0, keepdim=True)}, True),
    "max_ties": (lambda: ml.Max(axis=1), {"input": TIES}, lambda t: {"output": t["input"].amax(1)}, False),
    "min_ties": (lambda: ml.Min(axis=1), {"input": TIES}, lambda t: {"output": t["input"].amin(1)}, False),
    "max_all_ties": (ml.Max, {"input": TIES}, lambda t: {"output": t["input"].amax()}, False),
    "reshape": (lambda: ml.Reshape((4, -1)), {"input": _x(2, 3, 4)},
                lambda t: {"output": t["input"].reshape(4, -1)}, True),
    "transpose_default": (ml.Transpose, {"input": _x(2, 3, 4)},
                          lambda t: {"output": t["input"].permute(2, 1, 0)}, True),
    "transpose_axes": (lambda: ml.Transpose((1, 0, 2)), {"input": _x(2, 3, 4)},
                       lambda t: {"output": t["input"].permute(1, 0, 2)}, True),
    "concat": (lambda: ml.Concat(n=3, axis=1),
               {"input1": _x(2, 1, 3), "input2": _x(2, 2, 3, seed=1), "input3": _x(2, 4, 3, seed=2)},
               lambda t: {"output": torch.cat([t["input1"], t["input2"], t["input3"]], 1)}, True),
    "split": (lambda: ml.Split(2, axis=1), {"input": _x(2, 4, 3)},
              lambda t: dict(zip(("output_0", "output_1"), t["input"].chunk(2, 1), strict=True)), True),
    "indexer_slices": (lambda: ml.Indexer((slice(1, 3), 0)), {"input": _x(4, 3, 2)},
                       lambda t: {"output": t["input"][1:3, 0]}, True),
    "indexer_ellipsis_newaxis": (lambda: ml.Indexer((Ellipsis, None, -1)), {"input": _x(4, 3, 2)},
                                 lambda t: {"output": t["input"][..., None, -1]}, True),
    "indexer_repeats": (lambda: ml.Indexer([0, 2, 0]), {"input": _x(4, 3)},
                        lambda t: {"output": t["input"][[0, 2, 0]]}, True),
    # the published defaults and arguments of Gelu, Flatten and CrossEntropy
    "gelu_exact": (ml.Gelu, {"input": _x(3, 4)}, lambda t: {"output": F.gelu(t["input"])}, True),
    "gelu_tanh": (lambda: ml.Gelu(approximate=True), {"input": _x(3, 4)},
                  lambda t: {"output": F.gelu(t["input"], approximate="tanh")}, True),
    "flatten_end_dim": (lambda: ml.Flatten(start_dim=0, end_dim=1), {"input": _x(2, 3, 4)},
                        lambda t: {"output": t["input"].flatten(0, 1)}, True),
    "flatten_negative": (lambda: ml.Flatten(start_dim=-3, end_dim=-2), {"input": _x(2, 3, 4, 2)},
                         lambda t: {"output": t["input"].flatten(1, 2)}, True),
    "cross_entropy_probs": (lambda: ml.CrossEntropy("none", input_type="probs"),
                            {"input": _PROBS, "target": np.array([0, 2, 1])},
                            lambda t: {"output": F.nll_loss(t["input"].log(), t["target"], reduction="none")},
                            True),
    "cross_entropy_probs_robust_soft": (
        lambda: ml.CrossEntropy("sum", input_type="probs", robust=True),
        {"input": _PROBS, "target": _PROBS[::-1].copy()},
        lambda t: {"output": -(t["target"] * t["input"].log()).sum()}, True),
    "cross_entropy_log_probs_mean": (lambda: ml.CrossEntropy(input_type="log_probs"),
                                     {"input": np.log(_PROBS), "target": np.array([1, 1, 3])},
                                     lambda t: {"output": F.nll_loss(t["input"], t["target"])}, True),
}


def _float_keys(inputs: dict) -> list[str]:
    return [k for k, v in inputs.items() if v.dtype.kind == "f"]


def _cotangents(name: str, outputs: dict[str, tuple]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return {k: rng.standard_normal(s) for k, s in outputs.items()}


def reference(name: str) -> tuple[dict, dict]:
    """torch float64: outputs and input gradients for the case's cotangents."""
    _, inputs, ref, _ = CASES[name]
    t = {k: torch.tensor(v, requires_grad=v.dtype.kind == "f") for k, v in inputs.items()}
    out = ref(t)
    cots = _cotangents(name, {k: tuple(v.shape) for k, v in out.items()})
    keys = _float_keys(inputs)
    grads = torch.autograd.grad(list(out.values()), [t[k] for k in keys],
                                [torch.tensor(cots[k]) for k in out])
    return ({k: v.detach().numpy() for k, v in out.items()},
            {k: g.numpy() for k, g in zip(keys, grads, strict=True)})


def run_case(backend, name: str) -> tuple[dict, dict]:
    """Our outputs and gradients (as float64 NumPy) on ``backend``."""
    factory, inputs, _, _ = CASES[name]
    keys = _float_keys(inputs)
    compiled = ml.compile(factory(), backend, shapes={k: v.shape for k, v in inputs.items()},
                          trainable_keys=keys)
    params = {k: backend.array(inputs[k]) for k in keys}
    data = {k: backend.array(v) for k, v in inputs.items() if k not in keys}
    shapes = {k: compiled.shapes[k] for k in compiled.output_keys}
    cots = {k: backend.array(v) for k, v in _cotangents(name, shapes).items()}
    out, grads = compiled.evaluate(params, data, output_gradients=cots)
    conv = backend.to_numpy
    return ({k: np.asarray(conv(v), np.float64) for k, v in out.items()},
            {k: np.asarray(conv(v), np.float64) for k, v in grads.items()})


def _assert_close(got: tuple[dict, dict], want: tuple[dict, dict]) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for k in w:
            np.testing.assert_allclose(g[k], w[k], rtol=TOL, atol=TOL, err_msg=k)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("backend_cls", [NumpyBackend, TorchBackend], ids=["numpy", "torch"])
def test_primitive_matches_torch_float64(backend_cls, name):
    _assert_close(run_case(backend_cls(dtype="float64"), name), reference(name))


@pytest.fixture(scope="module")
def jax_results():
    """Every case on JAX float64, computed once in this process (x64 for the block), as
    lists (what the tests read)."""
    res = {}
    with jax_float64():
        b = JaxBackend(dtype="float64")
        for name in CASES:
            o, g = run_case(b, name)
            res[name] = [{k: np.asarray(v).tolist() for k, v in o.items()},
                         {k: np.asarray(v).tolist() for k, v in g.items()}]
    return res


@pytest.mark.parametrize("name", list(CASES))
def test_primitive_matches_torch_float64_on_jax(jax_results, name):
    o, g = jax_results[name]
    got = ({k: np.asarray(v) for k, v in o.items()}, {k: np.asarray(v) for k, v in g.items()})
    _assert_close(got, reference(name))


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c[3]])
def test_numpy_vjp_against_finite_differences(name):
    factory, inputs, _, _ = CASES[name]
    b = NumpyBackend(dtype="float64")
    keys = _float_keys(inputs)
    compiled = ml.compile(factory(), b, shapes={k: v.shape for k, v in inputs.items()},
                          trainable_keys=keys)
    data = {k: v for k, v in inputs.items() if k not in keys}
    params = {k: inputs[k].copy() for k in keys}
    cots = _cotangents(name, {k: compiled.shapes[k] for k in compiled.output_keys})

    def loss(p):
        out = compiled.evaluate(p, data)
        return sum(float(np.sum(out[k] * cots[k])) for k in cots)

    _, grads = compiled.evaluate(params, data, output_gradients=cots)
    eps = 1e-6
    for k in keys:
        fd = np.zeros_like(params[k])
        for i in np.ndindex(params[k].shape):
            plus, minus = {**params, k: params[k].copy()}, {**params, k: params[k].copy()}
            plus[k][i] += eps
            minus[k][i] -= eps
            fd[i] = (loss(plus) - loss(minus)) / (2 * eps)
        np.testing.assert_allclose(grads[k], fd, rtol=1e-6, atol=1e-7, err_msg=k)


# -- ties: the same gradient on every backend --------------------------------------------------
TIE_OPS = {"relu": (ml.Relu, lambda x: (x > 0) * 1.0),
           "leaky_relu": (lambda: ml.LeakyRelu(0.1), lambda x: np.where(x > 0, 1.0, 0.1)),
           "absolute": (ml.Absolute, np.sign)}


@pytest.mark.parametrize("op", list(TIE_OPS))
@pytest.mark.parametrize("backend_cls", [NumpyBackend, JaxBackend, TorchBackend],
                         ids=["numpy", "jax", "torch"])
def test_gradient_at_a_kink_is_the_same_on_every_backend(backend_cls, op):
    factory, deriv = TIE_OPS[op]
    b = backend_cls(dtype="float32")
    x = np.array([-1.0, 0.0, 0.0, 2.0], np.float32)
    compiled = ml.compile(factory(), b, shapes={"input": [4]}, trainable_keys=["input"])
    _, grads = compiled.evaluate({"input": b.array(x)}, {}, output_gradients={"output": b.ones(4)})
    np.testing.assert_allclose(np.asarray(b.to_numpy(grads["input"])), deriv(x), rtol=1e-7)


def test_relu_inside_a_model_has_gradient_0_at_0_on_jax():
    """The bug report's case: a Linear whose pre-activation is exactly 0."""
    b = JaxBackend(dtype="float32")
    m = ml.Model()
    m += ml.Linear(1)
    m += ml.Relu()
    c = ml.compile(m, b, shapes={"input": [1, 1]})
    params = {"linear.weight": b.array([[1.0]]), "linear.bias": b.array([0.0])}
    _, g = c.evaluate(params, {"input": b.array([[0.0]])}, output_gradients={"output": b.ones(1, 1)})
    assert float(b.to_numpy(g["linear.bias"])[0]) == 0.0


# -- cast, shape rules, errors -----------------------------------------------------------------
@pytest.mark.parametrize("backend_cls", [NumpyBackend, JaxBackend, TorchBackend],
                         ids=["numpy", "jax", "torch"])
def test_cast_to_integer_and_narrower_float(backend_cls):
    b = backend_cls(dtype="float32")
    x = np.array([[1.7, -2.2], [3.0, 0.4]], np.float32)
    c = ml.compile(ml.Cast("int32"), b, shapes={"input": [2, 2]})
    out = b.to_numpy(c.evaluate({}, {"input": b.array(x)})["output"])
    assert "int32" in str(out.dtype)
    np.testing.assert_array_equal(out, x.astype(np.int32))
    c = ml.compile(ml.Cast(ml.float16), b, shapes={"input": [2, 2]})
    out = b.to_numpy(c.evaluate({}, {"input": b.array(x)})["output"])
    # the values are rounded to float16 (the NumPy backend hands float outputs back in its dtype)
    np.testing.assert_array_equal(out.astype(np.float32), x.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("op, shapes, out", [
    (ml.Sum(axis=(0, -1)), {"input": (None, 3, 4)}, (3,)),
    (ml.Mean(keepdim=True), {"input": (None, 3)}, (1, 1)),
    (ml.Reshape((-1, 4)), {"input": (None, 8)}, (None, 4)),
    (ml.Reshape((2, None)), {"input": (4, 6)}, (2, 12)),
    (ml.Transpose(), {"input": (None, 3, 5)}, (5, 3, None)),
    (ml.Concat(2, axis=-1), {"input1": (None, 2), "input2": (None, 5)}, (None, 7)),
    (ml.Indexer((slice(1, None), 0)), {"input": (None, 3)}, (None,)),
    (ml.Indexer((Ellipsis, slice(0, 2))), {"input": (None, 3)}, (None, 2)),
    (ml.Where(), {"cond": (4, 1), "input1": (None, 3), "input2": (3,)}, (4, 3)),
])
def test_shape_rules(op, shapes, out):
    assert op.infer_shape(shapes) == out


@pytest.mark.parametrize("op, shapes, words", [
    (ml.Sum(axis=3), {"input": (2, 3)}, "out of range"),
    (ml.Reshape((5, -1)), {"input": (2, 3)}, "cannot reshape"),
    (ml.Transpose((0, 0)), {"input": (2, 3)}, "not a permutation"),
    (ml.Concat(2, axis=0), {"input1": (2, 3), "input2": (2, 4)}, "shape mismatch"),
    (ml.Indexer((0, 0, 0)), {"input": (2, 3)}, "does not fit"),
])
def test_shape_rules_reject(op, shapes, words):
    with pytest.raises(ml.ShapeError, match=words):
        op.infer_shape(shapes)


def test_split_needs_equal_parts_and_constructor_errors():
    with pytest.raises(ml.ShapeError, match="equal parts"):
        ml.compile(ml.Split(2, axis=0), NumpyBackend(), shapes={"input": [3, 2]})
    with pytest.raises(ValueError, match="dtype must be one of"):
        ml.Cast("complex64")
    with pytest.raises(ValueError, match="at most one -1"):
        ml.Reshape((-1, -1))


def test_primitives_compose_with_chaining():
    """Softmax written with primitives equals the formula."""
    m = ml.Model()
    m |= ml.Exponential()(input="x", output="e")
    m |= ml.Sum(axis=-1, keepdim=True)(input="e", output="total")
    m |= ml.Divide()(numerator="e", denominator="total", output="softmax")
    b = NumpyBackend(dtype="float64")
    c = ml.compile(m, b, shapes={"x": [2, 3]})
    x = _x(2, 3)
    e = np.exp(x)
    np.testing.assert_allclose(c.evaluate({}, {"x": x})["softmax"], e / e.sum(-1, keepdims=True),
                               rtol=1e-12)

