"""Gradients of every block and loss.

1. NumPy backend, float64: the hand-written VJPs against central finite differences of
   ``L(params) = Σ_k <output_k, cotangent_k>`` on every parameter element. Operators
   without parameters sit behind a ``Linear`` (or two), so their input VJPs are checked
   through the gradient of the ``Linear`` parameters.
2. NumPy, JAX and torch, float32: the same seed gives the same parameters; on the same
   inputs and cotangents, outputs and gradients agree within 1e-5 (relative to each
   array's largest entry).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from conftest import BACKENDS, np_dict, to_np

import mithril as ml
from mithril.backends import NumpyBackend


# -- model builders ----------------------------------------------------------------------------
def chain(*blocks) -> ml.Model:
    m = ml.Model()
    for b in blocks:
        m += b
    return m


def binary(op: Callable, d_left: int, d_right: int) -> ml.Model:
    """output = op(Linear(d_left)(a), Linear(d_right)(b)); the Linear outputs stay outputs too."""
    m = ml.Model()
    m |= ml.Linear(d_left)(input="a", output="left")
    m |= ml.Linear(d_right)(input="b", output="right")
    m |= op()(left="left", right="right", output="output")
    return m


def with_loss(loss: ml.Operator, soft_target: bool = False) -> ml.Model:
    """loss(Linear(4)(input), target); with ``soft_target`` the target is Softmax(Linear(4)(t))."""
    m = ml.Model()
    m += ml.Linear(4)
    if soft_target:
        m |= ml.Linear(4)(input="t", output="t_logits")
        m |= ml.Softmax()(input="t_logits", output="target")
    m |= loss(input="output", target="target", output="loss")
    return m


def floats(*shape):
    return ("float", shape)


def ints(high, *shape):  # integer class indices in [0, high)
    return ("int", high, shape)


def probs(classes, *lead):  # rows of probabilities summing to 1
    return ("probs", classes, lead)


def onehot(classes, *lead):  # one-hot rows
    return ("onehot", classes, lead)


ACTS = {"relu": ml.Relu, "leaky_relu": lambda: ml.LeakyRelu(0.1), "sigmoid": ml.Sigmoid,
        "tanh": ml.Tanh, "gelu": ml.Gelu, "softmax": ml.Softmax}

CASES: dict[str, tuple[Callable[[], ml.Model | ml.Operator], dict]] = {
    "linear": (lambda: ml.Linear(3), {"input": floats(4, 5)}),
    "linear_no_bias": (lambda: ml.Linear(3, use_bias=False), {"input": floats(4, 5)}),
    "linear_3d_input": (lambda: ml.Linear(3), {"input": floats(2, 3, 5)}),
    "linear_1d_input": (lambda: ml.Linear(3), {"input": floats(5)}),
    "mlp": (lambda: ml.MLP(["tanh", "sigmoid", None], [6, 5, 3]), {"input": floats(4, 5)}),
    "mlp_no_bias": (lambda: ml.MLP(["relu", "gelu"], [5, 3], use_bias=False), {"input": floats(4, 5)}),
    "embedding": (lambda: ml.Embedding(7, 4), {"input": ints(7, 3, 5)}),
    "embedding_mlp": (lambda: chain(ml.Embedding(6, 3), ml.Linear(2)), {"input": ints(6, 9)}),
    "layer_norm": (lambda: chain(ml.Linear(6), ml.LayerNorm()), {"input": floats(4, 3)}),
    "layer_norm_no_scale": (lambda: chain(ml.Linear(6), ml.LayerNorm(use_scale=False)), {"input": floats(2, 2, 3)}),
    "layer_norm_no_bias": (lambda: chain(ml.Linear(6), ml.LayerNorm(use_bias=False)), {"input": floats(4, 3)}),
    "flatten": (lambda: chain(ml.Linear(4), ml.Flatten(), ml.Linear(3)), {"input": floats(2, 3, 5)}),
    **{name: (lambda a=act: chain(ml.Linear(5), a()), {"input": floats(4, 3)}) for name, act in ACTS.items()},
    # no bias: softmax over the batch axis ignores it (its gradient is exactly zero)
    "softmax_axis0": (lambda: chain(ml.Linear(5, use_bias=False), ml.Softmax(axis=0)), {"input": floats(4, 3)}),
    "add": (lambda: binary(ml.Add, 4, 4), {"a": floats(3, 5), "b": floats(3, 2)}),
    "add_broadcast": (lambda: binary(ml.Add, 4, 4), {"a": floats(3, 5), "b": floats(1, 2)}),
    "multiply": (lambda: binary(ml.Multiply, 4, 4), {"a": floats(3, 5), "b": floats(3, 2)}),
    "multiply_broadcast_column": (lambda: binary(ml.Multiply, 4, 1), {"a": floats(3, 5), "b": floats(3, 2)}),
    "multiply_broadcast_rank": (lambda: binary(ml.Multiply, 4, 4), {"a": floats(2, 3, 5), "b": floats(2)}),
    "matrix_multiply": (lambda: binary(ml.MatrixMultiply, 4, 2), {"a": floats(3, 5), "b": floats(4, 6)}),
    "matrix_multiply_batched": (lambda: binary(ml.MatrixMultiply, 4, 2), {"a": floats(2, 3, 5), "b": floats(4, 6)}),
}
for red in ("mean", "sum", "none"):
    CASES[f"squared_error_{red}"] = (lambda r=red: with_loss(ml.SquaredError(r)),
                                     {"input": floats(3, 5), "target": floats(3, 4)})
    CASES[f"mean_squared_error_{red}"] = (lambda r=red: with_loss(ml.MeanSquaredError(r)),
                                          {"input": floats(2, 3, 5), "target": floats(2, 3, 4)})
    CASES[f"cross_entropy_int_{red}"] = (lambda r=red: with_loss(ml.CrossEntropy(r)),
                                         {"input": floats(5, 3), "target": ints(4, 5)})
    CASES[f"cross_entropy_onehot_{red}"] = (lambda r=red: with_loss(ml.CrossEntropy(r)),
                                            {"input": floats(5, 3), "target": onehot(4, 5)})
    CASES[f"cross_entropy_probs_3d_{red}"] = (lambda r=red: with_loss(ml.CrossEntropy(r)),
                                              {"input": floats(2, 3, 3), "target": probs(4, 2, 3)})
    CASES[f"cross_entropy_soft_target_{red}"] = (
        lambda r=red: with_loss(ml.CrossEntropy(r), soft_target=True), {"input": floats(5, 3), "t": floats(5, 2)})


def make_inputs(spec: dict, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, s in spec.items():
        if s[0] == "float":
            out[name] = rng.standard_normal(s[1])
        elif s[0] == "int":
            out[name] = rng.integers(0, s[1], s[2])
        else:
            classes, lead = s[1], s[2]
            if s[0] == "onehot":
                out[name] = np.eye(classes)[rng.integers(0, classes, lead)]
            else:
                e = rng.random((*lead, classes))
                out[name] = e / e.sum(-1, keepdims=True)
    return out


def shapes_of(inputs: dict) -> dict:
    return {k: list(v.shape) for k, v in inputs.items()}


def cotangents(compiled, inputs: dict, seed: int = 1) -> dict[str, np.ndarray]:
    """A random cotangent for every output, shaped like the output on ``inputs``."""
    rng = np.random.default_rng(seed)
    outs = compiled.evaluate(compiled.get_parameters(), inputs)
    return {k: rng.standard_normal(np.shape(compiled.backend.to_numpy(v))) for k, v in outs.items()}


# -- 1. finite differences ------------------------------------------------------------------
def finite_difference_check(build, spec, eps=1e-6):
    backend = NumpyBackend(dtype="float64")
    inputs = make_inputs(spec)
    compiled = ml.compile(build(), backend, shapes=shapes_of(inputs))
    rng = np.random.default_rng(2)
    # random parameters, so that biases, LayerNorm scales, ... are not special values
    params = {k: rng.standard_normal(v.shape) for k, v in compiled.get_parameters().items()}
    cots = cotangents(compiled, inputs)

    def loss(p):
        outs = compiled.evaluate(p, inputs)
        return sum(float(np.sum(outs[k] * g)) for k, g in cots.items())

    outputs, grads = compiled.evaluate(params, inputs, output_gradients=cots)
    assert list(grads) == list(params)
    for name, p in params.items():
        numeric = np.zeros_like(p)
        for i in np.ndindex(p.shape):
            orig = p[i]
            p[i] = orig + eps
            up = loss(params)
            p[i] = orig - eps
            down = loss(params)
            p[i] = orig
            numeric[i] = (up - down) / (2 * eps)
        assert grads[name].shape == p.shape and grads[name].dtype == np.float64
        scale = max(np.abs(numeric).max(), 1e-3)
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-6, atol=1e-7 * scale,
                                   err_msg=f"gradient of '{name}'")


@pytest.mark.parametrize("case", list(CASES))
def test_gradient_matches_finite_differences(case):
    build, spec = CASES[case]
    finite_difference_check(build, spec)


# -- 2. the three backends agree ---------------------------------------------------------------
def run_on(backend_name: str, build, spec, seed=0):
    backend = BACKENDS[backend_name](dtype="float32", seed=seed)
    inputs64 = make_inputs(spec)
    # identical float32 values for every backend
    inputs = {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in inputs64.items()}
    compiled = ml.compile(build(), backend, shapes=shapes_of(inputs))
    params = compiled.get_parameters()
    cots = {k: backend.array(v.astype(np.float32))
            for k, v in cotangents(ml.compile(build(), NumpyBackend(), shapes=shapes_of(inputs)),
                                   inputs).items()}
    native = {k: backend.array(v) for k, v in inputs.items()}
    outputs, grads = compiled.evaluate(params, native, output_gradients=cots)
    plain = compiled.evaluate(params, native)
    for k, v in outputs.items():
        np.testing.assert_array_equal(to_np(backend, v), to_np(backend, plain[k]))
        assert backend.dtype_name(v) == "float32"
    for v in grads.values():
        assert backend.dtype_name(v) == "float32"
    return np_dict(backend, params), np_dict(backend, outputs), np_dict(backend, grads)


def assert_close(got, want, what):
    assert got.shape == want.shape, what
    scale = max(np.abs(want).max(), 1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale, err_msg=what)


@pytest.mark.parametrize("case", list(CASES))
def test_backends_agree(case):
    build, spec = CASES[case]
    ref_params, ref_out, ref_grads = run_on("numpy", build, spec)
    for name in ("jax", "torch"):
        params, outputs, grads = run_on(name, build, spec)
        assert list(params) == list(ref_params) and list(grads) == list(ref_grads)
        for k, v in params.items():
            np.testing.assert_array_equal(v, ref_params[k], err_msg=f"{name}: param '{k}'")
        for k, v in outputs.items():
            assert_close(v, ref_out[k], f"{name}: output '{k}'")
        for k, v in grads.items():
            assert_close(v, ref_grads[k], f"{name}: gradient of '{k}'")


def test_missing_output_gradients_count_as_zero(backend):
    build, spec = CASES["add"]
    inputs = {k: backend.array(v) for k, v in make_inputs(spec).items()}
    compiled = ml.compile(build(), backend, shapes=shapes_of(inputs))
    params = compiled.get_parameters()
    ones = backend.ones(3, 4)
    _, only_out = compiled.evaluate(params, inputs, output_gradients={"output": ones})
    zeros = {k: backend.zeros(3, 4) for k in ("left", "right")}
    _, explicit = compiled.evaluate(params, inputs, output_gradients={"output": ones, **zeros})
    for k in params:
        np.testing.assert_allclose(to_np(backend, only_out[k]), to_np(backend, explicit[k]))
    _, none = compiled.evaluate(params, inputs, output_gradients={})
    for k in params:
        np.testing.assert_array_equal(to_np(backend, none[k]), 0)


def test_scalar_loss_accepts_a_python_float_cotangent(backend):
    build, spec = CASES["cross_entropy_int_mean"]
    inputs = {k: backend.array(v) for k, v in make_inputs(spec).items()}
    compiled = ml.compile(build(), backend, shapes=shapes_of(inputs))
    params = compiled.get_parameters()
    _, g1 = compiled.evaluate(params, inputs, output_gradients={"loss": 1.0})
    _, g2 = compiled.evaluate(params, inputs, output_gradients={"loss": backend.array(np.float32(2.0))})
    for k in params:
        np.testing.assert_allclose(2 * to_np(backend, g1[k]), to_np(backend, g2[k]), rtol=1e-6)
