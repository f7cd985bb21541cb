"""Wrong keys, shapes and dtypes give Mithril errors that name the key and what was expected."""

from __future__ import annotations

import numpy as np
import pytest

import mithril as ml
from mithril.backends import NumpyBackend


@pytest.fixture
def setup(backend):
    model = ml.MLP(["relu", None], [6, 3])
    model.set_shapes(input=[None, 4])
    compiled = ml.compile(model, backend)
    return backend, compiled, compiled.get_parameters(), {"input": backend.randn(5, 4)}


def other_dtype(backend, x):
    return backend.array(backend.to_numpy(x), dtype="float16")


def test_error_classes_subclass_the_builtins():
    assert issubclass(ml.KeyMismatchError, KeyError)
    assert issubclass(ml.ShapeError, ValueError)
    assert issubclass(ml.DTypeError, TypeError)
    assert str(ml.KeyMismatchError("a 'b' c")) == "a 'b' c"  # not quoted like KeyError


# -- keys -------------------------------------------------------------------------------------
def test_missing_parameter(setup):
    b, compiled, params, inputs = setup
    del params["linear_1.bias"]
    with pytest.raises(ml.KeyMismatchError, match=r"params: missing key\(s\) \['linear_1.bias'\]"):
        compiled.evaluate(params, inputs)


def test_unknown_parameter(setup):
    b, compiled, params, inputs = setup
    params["linear_2.weight"] = params["linear_1.weight"]
    with pytest.raises(ml.KeyMismatchError, match=r"params: unknown key\(s\) \['linear_2.weight'\]"):
        compiled.evaluate(params, inputs)


def test_renamed_parameter_reports_both_sides(setup):
    b, compiled, params, inputs = setup
    params["linear_0.w"] = params.pop("linear_0.weight")
    with pytest.raises(ml.KeyMismatchError) as e:
        compiled.evaluate(params, inputs, output_gradients={"output": b.ones(5, 3)})
    msg = str(e.value)
    assert "unknown key(s) ['linear_0.w']" in msg and "missing key(s) ['linear_0.weight']" in msg


def test_missing_and_unknown_input(setup):
    b, compiled, params, inputs = setup
    with pytest.raises(ml.KeyMismatchError, match=r"inputs: missing key\(s\) \['input'\]"):
        compiled.evaluate(params, {})
    with pytest.raises(ml.KeyMismatchError, match=r"inputs: unknown key\(s\) \['x'\]"):
        compiled.evaluate(params, {**inputs, "x": inputs["input"]})


def test_unknown_output_gradient_key(setup):
    b, compiled, params, inputs = setup
    with pytest.raises(ml.KeyMismatchError, match=r"output_gradients: unknown key\(s\) \['loss'\].*'output'"):
        compiled.evaluate(params, inputs, output_gradients={"loss": b.ones(5, 3)})


def test_unknown_terminal_names():
    with pytest.raises(ml.KeyMismatchError, match="Linear has no terminal.*'inputs'"):
        ml.Linear(3)(inputs="x")
    with pytest.raises(ml.KeyMismatchError, match="no terminal 'x'"):
        ml.MLP([None], [2]).set_shapes(x=[None, 3])
    with pytest.raises(ml.KeyMismatchError, match="no terminal 'x'"):
        ml.compile(ml.MLP([None], [2]), NumpyBackend(), shapes={"x": [None, 3]})


# -- shapes -----------------------------------------------------------------------------------
def test_wrong_parameter_shape(setup):
    b, compiled, params, inputs = setup
    params["linear_0.weight"] = b.randn(6, 5)
    with pytest.raises(ml.ShapeError, match=r"parameter 'linear_0.weight': expected shape \[6, 4\], got \[6, 5\]"):
        compiled.evaluate(params, inputs)


def test_wrong_input_shape(setup):
    b, compiled, params, inputs = setup
    with pytest.raises(ml.ShapeError, match=r"input 'input': expected shape \[None, 4\], got \[5, 3\]"):
        compiled.evaluate(params, {"input": b.randn(5, 3)})
    with pytest.raises(ml.ShapeError, match=r"input 'input': expected shape \[None, 4\], got \[4\]"):
        compiled.evaluate(params, {"input": b.randn(4)})


def test_wrong_output_gradient_shape(setup):
    b, compiled, params, inputs = setup
    with pytest.raises(ml.ShapeError, match=r"output gradient 'output': expected shape \[None, 3\], got \[5, 2\]"):
        compiled.evaluate(params, inputs, output_gradients={"output": b.ones(5, 2)})


@pytest.mark.parametrize("rows", [1, 3, 6])
def test_output_gradient_with_another_batch_is_named(setup, rows):
    """The output's free dimension is bound by this call's inputs (5 rows): a cotangent of
    another batch is a ShapeError on every backend, not a NumPy broadcast (1 row: the
    gradient of another loss) or the framework's own error; nothing moves."""
    b, compiled, params, inputs = setup
    step = compiled.step
    with pytest.raises(ml.ShapeError, match=rf"output gradient 'output': expected shape \[5, 3\] "
                                            rf"\(the output's for these inputs\), got \[{rows}, 3\]"):
        compiled.evaluate(params, inputs, output_gradients={"output": b.ones(rows, 3)})
    assert compiled.step == step
    _, grads = compiled.evaluate(params, inputs, output_gradients={"output": b.ones(5, 3)})
    assert set(grads) == set(params)


# -- dtypes -----------------------------------------------------------------------------------
def test_wrong_parameter_dtype(setup):
    b, compiled, params, inputs = setup
    params["linear_1.bias"] = other_dtype(b, params["linear_1.bias"])
    with pytest.raises(ml.DTypeError, match="parameter 'linear_1.bias': expected dtype float32, got float16"):
        compiled.evaluate(params, inputs)


def test_wrong_input_dtype(setup):
    b, compiled, params, inputs = setup
    with pytest.raises(ml.DTypeError, match="input 'input': expected dtype float32, got float16"):
        compiled.evaluate(params, {"input": other_dtype(b, inputs["input"])})
    with pytest.raises(ml.DTypeError, match="input 'input': expected dtype float32, got int"):
        compiled.evaluate(params, {"input": b.array(np.ones((5, 4), dtype=np.int32))})


def test_wrong_output_gradient_dtype(setup):
    b, compiled, params, inputs = setup
    with pytest.raises(ml.DTypeError, match="output gradient 'output': expected dtype float32, got float16"):
        compiled.evaluate(params, inputs, output_gradients={"output": other_dtype(b, b.ones(5, 3))})


def test_integer_input_refuses_floats(backend):
    compiled = ml.compile(ml.Embedding(5, 2), backend, shapes={"input": [None]})
    params = compiled.get_parameters()
    with pytest.raises(ml.DTypeError, match="input 'input': expected an integer dtype, got float32"):
        compiled.evaluate(params, {"input": backend.array([1.0, 2.0])})
    out = compiled.evaluate(params, {"input": [1, 2, 4]})["output"]  # a list of ints is fine
    assert tuple(out.shape) == (3, 2)


def test_non_arrays_and_non_dicts(setup):
    b, compiled, params, inputs = setup
    with pytest.raises(TypeError, match="input 'input': expected an array, got object"):
        compiled.evaluate(params, {"input": object()})
    with pytest.raises(TypeError, match="both must be dicts"):
        compiled.evaluate(list(params.values()), inputs)
    with pytest.raises(TypeError, match="mithril Backend"):
        ml.compile(ml.Linear(2), "numpy")


def test_model_construction_errors():
    with pytest.raises(ValueError, match="2 activations for 3 dimensions"):
        ml.MLP(["relu", None], [4, 4, 2])
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        ml.MLP(["swish"], [4])
    with pytest.raises(ValueError, match="reduction must be one of"):
        ml.CrossEntropy(reduction="avg")
    with pytest.raises(ValueError, match="positive int"):
        ml.Linear(0)
    with pytest.raises(TypeError, match="must be a str name"):
        ml.Linear(2)(input=object())  # a number is a constant (published Mithril)
