"""Calls of the published Mithril (synnada-ai/mithril 0.1.x) found, running it side by side
with this package, to be refused here while the published library takes them. The expected
values are plain NumPy math, so these run without the published library."""
import numpy as np
import pytest

import mithril as ml
from mithril.models import Linear, Model, Relu


def _model() -> Model:
    model = Model()
    model |= Linear(3).connect(input="input", output="h")
    model |= Relu().connect(input="h", output="output")
    model.expose_keys("h", "output")
    return model


@pytest.mark.parametrize("flags", [{"safe_names": False}, {"use_short_namings": False},
                                   {"safe_shapes": False},
                                   {"safe_names": True, "use_short_namings": True, "safe_shapes": True}])
def test_compile_takes_the_published_code_generation_flags(flags):
    backend = ml.NumpyBackend(dtype=ml.float64)
    compiled = ml.compile(_model(), backend, shapes={"input": [3, 4]}, jit=False, **flags)
    params = compiled.randomize_params()
    x = np.arange(12.0).reshape(3, 4) / 10
    out = compiled.evaluate(params, {"input": x})
    h = x @ params["linear.weight"].T + params["linear.bias"]
    np.testing.assert_allclose(out["h"], h, rtol=1e-12)
    np.testing.assert_allclose(out["output"], np.maximum(h, 0), rtol=1e-12)
    with pytest.raises(ml.ShapeError, match="'input'"):  # safe_shapes=False checks all the same
        compiled.evaluate(params, {"input": np.ones((3, 5))})


def test_compile_flags_must_be_bools():
    with pytest.raises(TypeError, match=r"compile\(safe_names=...\) must be a bool"):
        ml.compile(_model(), ml.NumpyBackend(), shapes={"input": [3, 4]}, safe_names="no")


def test_randomize_params_excluded_keys():
    backend = ml.NumpyBackend(dtype=ml.float64)
    compiled = ml.compile(_model(), backend, shapes={"input": [3, 4]}, jit=False)
    full = compiled.randomize_params()
    assert sorted(compiled.randomize_params(excluded_keys={"linear.bias"})) == ["linear.weight"]
    assert sorted(compiled.randomize_params(excluded_keys="linear.weight")) == ["linear.bias"]
    assert compiled.randomize_params(excluded_keys=set(full)) == {}
    # a partial draw leaves the model's own parameters as they were
    kept = compiled.get_parameters()
    assert all(kept[k] is full[k] for k in full)
    with pytest.raises(ml.KeyMismatchError, match=r"unknown key\(s\) \['bias'\].*linear.bias"):
        compiled.randomize_params(excluded_keys={"bias"})
    assert all(compiled.get_parameters()[k] is full[k] for k in full)  # unchanged by the error


def test_repeated_index_gradient_adds_every_repeat():
    """The published NumPy backend gives [[1, 1, 1], [1, 1, 1]] here; a gather's gradient is a
    scatter-add, so the twice-taken row gets 2 (torch's and JAX's answer)."""
    from mithril.models import Buffer

    model = Model()
    model |= Buffer().connect(input="a", output=ml.IOKey("kept", expose=False))
    model |= Buffer().connect(input=model.a[[1, 0, 1]], output="y")
    backend = ml.NumpyBackend(dtype=ml.float64)
    compiled = ml.compile(model, backend, shapes={"a": [2, 3]}, trainable_keys={"a"}, jit=False)
    a = np.array([[-2.0, -0.5, 0.0], [0.5, 1.0, 3.0]])
    g = np.arange(9.0).reshape(3, 3)
    out, grads = compiled.evaluate({"a": a}, {}, output_gradients={"y": g})
    np.testing.assert_array_equal(out["y"], a[[1, 0, 1]])
    expected = np.zeros_like(a)
    np.add.at(expected, [1, 0, 1], g)
    np.testing.assert_array_equal(grads["a"], expected)


def test_compile_key_sets_take_connection_objects():
    """As published: ``compile(trainable_keys={model.input}, shapes={model.input: ...}, ...)``
    (ours read the object as an unknown name and raised KeyMismatchError)."""
    backend = ml.NumpyBackend(dtype=ml.float64)
    x = np.arange(12.0).reshape(3, 4) / 10 - 0.5
    model = _model()
    lin = model.blocks[0][0]
    compiled = ml.compile(model, backend, shapes={model.input: [3, 4]}, jit=False,
                          trainable_keys={model.input}, discard_keys=[lin.output])
    assert compiled.output_keys == ("output",) and compiled.get_shapes()["input"] == [3, 4]
    params = compiled.randomize_params()
    out, grads = compiled.evaluate({**params, "input": x}, {}, output_gradients={"output": np.ones((3, 3))})
    h = x @ params["linear.weight"].T + params["linear.bias"]
    np.testing.assert_allclose(out["output"], np.maximum(h, 0), rtol=1e-12)
    np.testing.assert_allclose(grads["input"], (h > 0) @ params["linear.weight"], rtol=1e-12)

    model = _model()
    compiled = ml.compile(model, backend, constant_keys={model.input: x}, jit=False)
    params = compiled.randomize_params()
    h = x @ params["linear.weight"].T + params["linear.bias"]
    np.testing.assert_allclose(compiled.evaluate(params)["h"], h, rtol=1e-12)
    model = _model()
    compiled = ml.compile(model, backend, shapes={ml.IOKey("input"): [3, 4]}, data_keys=model.input)
    assert compiled.input_keys == ("input",)


def test_compile_refuses_an_internal_or_foreign_connection_as_a_key():
    backend = ml.NumpyBackend(dtype=ml.float64)
    lin, relu = Linear(3), Relu()
    model = Model()
    model |= lin.connect(input="input")
    model += relu.connect(output="output")
    with pytest.raises(ml.KeyMismatchError, match=r"discard_keys.*Linear.output.*internal connection"):
        ml.compile(model, backend, shapes={"input": [3, 4]}, discard_keys={lin.output})
    with pytest.raises(ml.KeyMismatchError, match=r"trainable_keys.*Linear.input.*not a connection"):
        ml.compile(model, backend, shapes={"input": [3, 4]}, trainable_keys={Linear(2).input})
    # the refused calls left the model as it was
    compiled = ml.compile(model, backend, shapes={"input": [3, 4]})
    assert compiled.output_keys == ("output",)


def _train_model(reg_input, key_name=None):
    from mithril.models import L2, Mean, SquaredError, Tanh, TrainModel

    l1, l2 = Linear(4), Linear(2)
    model = Model()
    model |= l1.connect(input="input")
    model += Tanh()
    model += l2.connect(output="output")
    train = TrainModel(model)
    train.add_loss(SquaredError(), reduce_steps=[Mean()], input="output", target="target")
    train.add_regularization(L2(), coef=0.5, input=reg_input(l1, l2), key_name=key_name)
    return train


def test_add_regularization_takes_a_connection_object():
    """``input=lin.weight`` (a block's parameter as an object) is the parameter, as published
    (ours raised TypeError); it is the same regularizer as by name."""
    backend = ml.NumpyBackend(dtype=ml.float64)
    rng = np.random.default_rng(0)
    data = {"input": rng.standard_normal((6, 3)), "target": rng.standard_normal((6, 2))}
    by_name = ml.compile(_train_model(lambda a, b: "linear_1.weight"), backend,
                         shapes={"input": [6, 3], "target": [6, 2]})
    by_object = ml.compile(_train_model(lambda a, b: b.weight), backend,
                           shapes={"input": [6, 3], "target": [6, 2]})
    params = by_name.randomize_params()
    cost = by_object.evaluate(params, data)["final_cost"]
    assert cost == by_name.evaluate(params, data)["final_cost"]
    w1, b1, w2, b2 = (params[k] for k in ("linear_0.weight", "linear_0.bias", "linear_1.weight", "linear_1.bias"))
    pred = np.tanh(data["input"] @ w1.T + b1) @ w2.T + b2
    expected = np.mean((pred - data["target"]) ** 2) + 0.5 * 0.5 * np.sum(w2**2) / 12
    np.testing.assert_allclose(cost, expected, rtol=1e-12)
    with pytest.raises(ml.KeyMismatchError, match=r"Linear.weight is not a parameter or input"):
        _train_model(lambda a, b: Linear(3).weight)


def test_regularization_key_name_is_the_regularizer_value():
    """As published, ``key_name`` shows R(x) itself (½Σw² for L2); ``final_cost`` takes it
    times coef over the loss size. Ours showed the scaled term (0.028 for 3.369)."""
    backend = ml.NumpyBackend(dtype=ml.float64)
    compiled = ml.compile(_train_model(lambda a, b: "linear_1.weight", key_name="l2"), backend,
                          shapes={"input": [6, 3], "target": [6, 2]})
    params = compiled.randomize_params()
    rng = np.random.default_rng(1)
    data = {"input": rng.standard_normal((6, 3)), "target": rng.standard_normal((6, 2))}
    out, grads = compiled.evaluate(params, data, output_gradients=True)
    np.testing.assert_allclose(out["l2"], 0.5 * np.sum(params["linear_1.weight"] ** 2), rtol=1e-12)
    w1, b1, w2, b2 = (params[k] for k in ("linear_0.weight", "linear_0.bias", "linear_1.weight", "linear_1.bias"))
    h = np.tanh(data["input"] @ w1.T + b1)
    err = h @ w2.T + b2 - data["target"]
    np.testing.assert_allclose(out["final_cost"], np.mean(err**2) + 0.5 * out["l2"] / 12, rtol=1e-12)
    np.testing.assert_allclose(grads["linear_1.weight"], 2 * err.T @ h / 12 + 0.5 * w2 / 12, rtol=1e-10)
