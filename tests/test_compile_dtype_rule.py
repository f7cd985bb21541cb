"""Parameters and output gradients must have the model's dtype, by the same rule on every
backend: the dtype is checked before an array of another framework is converted (NumPy
refused a float64 NumPy weight for a float32 model, torch and JAX cast it silently; a torch
float64 tensor was refused by torch and cast by NumPy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
from mithril.models import Linear

BACKENDS = [pytest.param(lambda: NumpyBackend(dtype="float32"), id="numpy"),
            pytest.param(lambda: TorchBackend(dtype="float32"), id="torch"),
            pytest.param(lambda: JaxBackend(dtype="float32"), id="jax")]

FOREIGN = [pytest.param(lambda: np.ones((2, 3), np.float64), id="numpy-float64"),
           pytest.param(lambda: np.ones((2, 3), np.float16), id="numpy-float16"),
           pytest.param(lambda: torch.ones(2, 3, dtype=torch.float64), id="torch-float64"),
           pytest.param(lambda: np.ones((2, 3), np.int64), id="numpy-int64")]


def _compiled(b):
    c = ml.compile(Linear(2), b, shapes={"input": [1, 3]})
    return c, c.randomize_params()


@pytest.mark.parametrize("make", BACKENDS)
@pytest.mark.parametrize("weight", FOREIGN)
def test_a_parameter_of_another_dtype_is_refused_on_every_backend(make, weight):
    c, p = _compiled(make())
    with pytest.raises(ml.DTypeError, match="parameter 'linear.weight': expected dtype float32"):
        c.evaluate({**p, "linear.weight": weight()}, {"input": np.ones((1, 3), np.float32)})


@pytest.mark.parametrize("make", BACKENDS)
def test_an_output_gradient_of_another_dtype_is_refused_on_every_backend(make):
    c, p = _compiled(make())
    with pytest.raises(ml.DTypeError, match="output gradient 'output': expected dtype float32, got float64"):
        c.evaluate(p, {"input": np.ones((1, 3), np.float32)},
                   output_gradients={"output": np.ones((1, 2))})


@pytest.mark.parametrize("make", BACKENDS)
def test_float32_arrays_of_any_framework_lists_and_numbers_are_taken(make):
    b = make()
    c, _ = _compiled(b)
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    for weight in (w, torch.tensor(w), w.tolist()):
        params = {"linear.weight": weight, "linear.bias": np.zeros(2, np.float32)}
        out, grads = c.evaluate(params, {"input": np.ones((1, 3))},  # float64 data is cast
                                output_gradients={"output": [[1.0, 2.0]]})
        np.testing.assert_allclose(b.to_numpy(out["output"]), [[3.0, 12.0]])
        np.testing.assert_allclose(b.to_numpy(grads["linear.weight"]), [[1.0] * 3, [2.0] * 3])


GIVEN = [pytest.param(lambda: np.array([1.0, 2.0]), "float64", id="numpy-float64"),
         pytest.param(lambda: np.array([1.0, 2.0], np.float32), "float32", id="numpy-float32"),
         pytest.param(lambda: torch.tensor([1.0, 2.0], dtype=torch.float64), "float64", id="torch-float64"),
         pytest.param(lambda: [1.5, 2.0], "float64", id="list"),
         pytest.param(lambda: np.array([True, False]), "bool", id="bool")]


@pytest.mark.parametrize("make", BACKENDS)
@pytest.mark.parametrize(("ids", "given"), GIVEN)
def test_a_dtype_error_names_the_dtype_passed_not_the_converted_one(make, ids, given):
    # torch and JAX convert a float64 array to float32 before the integer check: the error
    # named float32 there and float64 on NumPy for the same call
    c = ml.compile(ml.Embedding(5, 3), make(), shapes={"input": [2]})
    with pytest.raises(ml.DTypeError, match=f"input 'input': expected an integer dtype, got {given}$"):
        c.evaluate(c.randomize_params(), {"input": ids()})


@pytest.mark.parametrize("make", BACKENDS)
def test_a_float16_input_is_refused_naming_float16_on_every_backend(make):
    c, p = _compiled(make())
    for x in (np.ones((1, 3), np.float16), torch.ones(1, 3, dtype=torch.float16)):
        with pytest.raises(ml.DTypeError, match="input 'input': expected dtype float32, got float16"):
            c.evaluate(p, {"input": x})
