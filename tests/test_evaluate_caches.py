"""``evaluate``'s per-call caches: the last call's signature (keys, types, shapes and dtypes
of params and inputs that passed unconverted) skips the checks a loop repeats, and a
Python-number cotangent's array is made once. Neither may let a bad input through or
change a result."""

from __future__ import annotations

import numpy as np
import pytest

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend

BACKENDS = [NumpyBackend, TorchBackend, JaxBackend]


def problem(backend: type) -> tuple:
    m = ml.Model()
    m |= ml.Linear(4)(input="input", output=ml.IOKey("logits"))
    m |= ml.CrossEntropy()(input="logits", target="target", output="loss")
    be = backend(dtype="float32", seed=0)
    compiled = ml.compile(m, be, shapes={"input": [6, 3]})
    rng = np.random.default_rng(0)
    data = {"input": be.array(rng.standard_normal((6, 3)).astype(np.float32)),
            "target": be.array(np.array([0, 1, 2, 3, 0, 1]), be.int_dtype)}
    return compiled, be, data


def host(be, tree):
    return {k: np.array(be.to_numpy(v)) for k, v in tree.items()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_repeated_signature_keeps_every_check(backend: type) -> None:
    compiled, be, data = problem(backend)
    params = compiled.get_parameters()
    out, grads = compiled.evaluate(params, data, output_gradients={"loss": 1.0})
    assert compiled._last_prepared is not None  # the signature is remembered
    again, grads2 = compiled.evaluate(params, data, output_gradients={"loss": 1.0})
    for k, v in host(be, grads).items():
        np.testing.assert_array_equal(host(be, grads2)[k], v)
    np.testing.assert_array_equal(be.to_numpy(again["loss"]), be.to_numpy(out["loss"]))
    with pytest.raises(ml.ShapeError, match="input 'input'"):
        compiled.evaluate(params, {**data, "input": be.array(np.zeros((6, 2), np.float32))})
    with pytest.raises(ml.ShapeError, match="parameter"):
        compiled.evaluate({**params, next(iter(params)): be.array(np.zeros((9, 9), np.float32))},
                          data)
    with pytest.raises(ml.DTypeError):
        compiled.evaluate(params, {**data, "target": be.array(np.zeros(6, np.float32))})
    with pytest.raises(ml.KeyMismatchError):
        compiled.evaluate(params, {"input": data["input"], "other": data["target"]})
    with pytest.raises(ValueError, match="out of range"):  # values are read on every call
        compiled.evaluate(params, {**data, "target": be.array(np.full(6, 4), be.int_dtype)})
    # a prediction without labels (the partial program), then the check that needs them all
    pred = compiled.evaluate(params, {"input": data["input"]})
    assert set(pred) == {"logits"}
    pred = compiled.evaluate(params, {"input": data["input"]})
    assert set(pred) == {"logits"}
    with pytest.raises(ml.KeyMismatchError):
        compiled._validate(params, {"input": data["input"]})
    # float64 host data is cast on every call (never remembered as passing unconverted)
    wide = {**data, "input": np.asarray(be.to_numpy(data["input"]), np.float64)}
    for _ in range(2):
        out64 = compiled.evaluate(params, wide)
        np.testing.assert_array_equal(be.to_numpy(out64["loss"]), be.to_numpy(out["loss"]))


def test_an_array_reshaped_in_place_is_checked_again() -> None:
    compiled, be, data = problem(NumpyBackend)
    params = compiled.get_parameters()
    compiled.evaluate(params, data)
    x = data["input"].copy()
    compiled.evaluate(params, {**data, "input": x})
    x.shape = (3, 6)  # the same object, another shape
    with pytest.raises(ml.ShapeError, match="input 'input'"):
        compiled.evaluate(params, {**data, "input": x})


@pytest.mark.parametrize("backend", BACKENDS)
def test_number_cotangents_are_made_once_and_never_written_over(backend: type) -> None:
    compiled, be, data = problem(backend)
    params = compiled.get_parameters()
    _, g1 = compiled.evaluate(params, data, output_gradients={"loss": 1.0})
    first = compiled._last_cots[1]["loss"]
    for _ in range(3):  # the same array each time, still holding 1
        _, g = compiled.evaluate(params, data, output_gradients={"loss": 1.0})
        assert compiled._last_cots[1]["loss"] is first
        for k, v in host(be, g1).items():
            np.testing.assert_array_equal(host(be, g)[k], v)
    assert float(be.to_numpy(first)) == 1.0
    _, g2 = compiled.evaluate(params, data, output_gradients={"loss": 2.0})  # another number
    _, g1i = compiled.evaluate(params, data, output_gradients={"loss": 1})  # an int
    _, garr = compiled.evaluate(params, data, output_gradients={"loss": be.array(
        np.float32(3.0))})  # an array: checked as given
    for k, v in host(be, g1).items():
        np.testing.assert_allclose(host(be, g2)[k], 2 * v, rtol=1e-6)
        np.testing.assert_array_equal(host(be, g1i)[k], v)
        np.testing.assert_allclose(host(be, garr)[k], 3 * v, rtol=1e-6)
    with pytest.raises(ml.KeyMismatchError):
        compiled.evaluate(params, data, output_gradients={"nope": 1.0})
    with pytest.raises(ml.ShapeError):  # the logits' cotangent must have their shape
        compiled.evaluate(params, data, output_gradients={"logits": be.array(
            np.ones(3, np.float32))})
