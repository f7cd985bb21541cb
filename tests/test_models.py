"""Composing models, naming, shape inference, summary, seeding, and the guide's first listing."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import np_dict, to_np

import mithril as ml
from mithril.backends import NumpyBackend


def relu(x):
    return np.maximum(x, 0)


# -- composition -----------------------------------------------------------------------------
def test_ior_with_connect_and_call_syntax_wires_named_terminals(backend):
    model = ml.Model()
    model |= ml.Linear(4).connect(input="x", output="hidden")
    model |= ml.Relu()(input="hidden", output="y")  # call syntax == connect
    assert model.input_keys == ("x",)
    assert set(model.output_keys) == {"hidden", "y"}

    compiled = ml.compile(model, backend, shapes={"x": [None, 3]})
    params = compiled.get_parameters()
    assert list(params) == ["linear.weight", "linear.bias"]
    x = np.random.default_rng(1).standard_normal((5, 3))
    out = compiled.evaluate(params, {"x": backend.array(x)})
    p = np_dict(backend, params)
    h = x @ p["linear.weight"].T + p["linear.bias"]
    np.testing.assert_allclose(to_np(backend, out["hidden"]), h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_np(backend, out["y"]), relu(h), rtol=1e-5, atol=1e-6)


def test_iadd_chains_first_input_to_previous_output():
    model = ml.Model()
    model += ml.Linear(8)
    model += ml.Tanh()
    model += ml.Linear(2)
    # each newer block's output takes the name "output"; only the last stays a terminal
    assert model.input_keys == ("input",)
    assert model.output_keys == ("output",)
    compiled = ml.compile(model, NumpyBackend(), shapes={"input": [None, 5]})
    assert [n.path for n in compiled.program.nodes] == ["linear_0", "tanh", "linear_1"]
    assert compiled.parameter_shapes == {"linear_0.weight": (8, 5), "linear_0.bias": (8,),
                                         "linear_1.weight": (2, 8), "linear_1.bias": (2,)}


def test_iadd_respects_explicit_connections_and_mixes_with_ior():
    model = ml.Model()
    model += ml.Linear(3)(input="features", output="logits")
    model |= ml.CrossEntropy()(input="logits", target="labels", output="loss")
    assert set(model.input_keys) == {"features", "labels"}
    assert set(model.output_keys) == {"logits", "loss"}
    b = NumpyBackend(dtype="float64")
    compiled = ml.compile(model, b, shapes={"features": [None, 4]})
    params = compiled.get_parameters()
    x = b.randn(6, 4)
    labels = b.randint(0, 3, 6)
    out = compiled.evaluate(params, {"features": x, "labels": labels})
    logits = x @ params["linear.weight"].T + params["linear.bias"]
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(out["loss"], -logp[np.arange(6), labels].mean(), rtol=1e-12)


def test_unnamed_duplicate_terminals_get_suffixes():
    model = ml.Model()
    model |= ml.Linear(2)
    model |= ml.Linear(2)
    assert model.input_keys == ("input", "input_1")
    assert model.output_keys == ("output", "output_1")


def test_nesting_names_parameters_by_path():
    model = ml.Model()
    model += ml.Embedding(10, 4)
    model += ml.MLP(["relu", None], [8, 3])
    model += ml.LayerNorm()
    model.set_shapes(input=[None, 5])
    compiled = ml.compile(model, NumpyBackend())
    assert compiled.parameter_shapes == {
        "embedding.weight": (10, 4),          # single child of its class: no index
        "mlp.linear_0.weight": (8, 4), "mlp.linear_0.bias": (8,),
        "mlp.linear_1.weight": (3, 8), "mlp.linear_1.bias": (3,),
        "layer_norm.weight": (3,), "layer_norm.bias": (3,),
    }
    assert compiled.shapes["output"] == (None, 5, 3)
    params = compiled.get_parameters()
    assert list(params) == list(compiled.parameter_shapes)
    idx = np.array([[1, 2, 3, 4, 5], [0, 9, 9, 0, 1]])
    out = compiled.evaluate(params, {"input": idx})["output"]
    assert out.shape == (2, 5, 3)
    np.testing.assert_allclose(out.mean(-1), 0, atol=1e-5)  # layer-normalised


def test_two_nested_models_of_one_class_are_indexed():
    model = ml.Model()
    model += ml.MLP(["tanh"], [4])
    model += ml.MLP([None], [2])
    compiled = ml.compile(model, NumpyBackend(), shapes={"input": [None, 3]})
    assert list(compiled.parameter_shapes) == ["mlp_0.linear.weight", "mlp_0.linear.bias",
                                               "mlp_1.linear.weight", "mlp_1.linear.bias"]


def test_compiling_an_operator_directly():
    compiled = ml.compile(ml.Linear(3, use_bias=False), NumpyBackend(), shapes={"input": [2, 7]})
    assert compiled.parameter_shapes == {"linear.weight": (3, 7)}
    assert compiled.shapes["output"] == (2, 3)


def test_a_block_can_be_added_only_once():
    model, lin = ml.Model(), ml.Linear(2)
    model += lin
    with pytest.raises(ValueError, match="already part of a model"):
        model += lin
    mlp = ml.MLP([None], [2])
    ml.Model().__iadd__(mlp)
    with pytest.raises(ValueError, match="already part of a model"):
        ml.Model().__iadd__(mlp)
    with pytest.raises(ValueError, match="cannot contain itself"):
        model += model


def test_one_operator_in_two_sub_models_is_refused_at_compile():
    """One operator instance in two sub-models would be two nodes with their own parameters
    (a torch or Keras user expects the module's weights shared): refused, naming both
    places. Sharing by name gives one parameter whose gradient is the sum of both uses."""
    lin = ml.Linear(4)
    a, b = ml.Model(), ml.Model()
    a |= lin(input="input", output="output")
    b |= ml.Tanh()(input="input", output="t")
    b |= lin(input="t", output="output")
    m = ml.Model()
    m |= a(input="x", output="h")
    m |= b(input="h", output="y")
    with pytest.raises(ValueError, match=r"Linear\(4, use_bias=True\) is used twice, as "
                                         r"'model_0.linear' and 'model_1.linear'"):
        ml.compile(m, NumpyBackend(dtype="float64"), shapes={"x": [2, 4]})
    # the same operator compiled alone twice is two programs: fine
    for _ in range(2):
        assert ml.compile(lin, NumpyBackend(), shapes={"input": [2, 3]}).shapes["output"] == (2, 4)
    tied = ml.Model()
    tied |= ml.Linear(4, use_bias=False)(input="x", weight="w", output="h")
    tied |= ml.Linear(4, use_bias=False)(input="h", weight="w", output="y")
    c = ml.compile(tied, NumpyBackend(dtype="float64"), shapes={"x": [2, 4]})
    assert list(c.parameter_shapes) == ["w"]
    x, w = np.arange(8.0).reshape(2, 4) / 8, np.eye(4) + 0.1
    _, g = c.evaluate({"w": w}, {"x": x}, output_gradients={"y": np.ones((2, 4))})
    np.testing.assert_allclose(g["w"], np.ones((2, 4)).T @ (x @ w.T) + (np.ones((2, 4)) @ w).T @ x,
                               rtol=1e-12)


# -- shapes ------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["set_shapes", "compile"])
def test_parameter_shapes_are_inferred_from_input_shapes(how):
    model = ml.MLP(["relu", "relu", None], [32, 16, 10])
    if how == "set_shapes":
        model.set_shapes(input=[None, 784])
        compiled = ml.compile(model, NumpyBackend())
    else:
        compiled = ml.compile(model, NumpyBackend(), shapes={"input": [None, 784]})
    assert compiled.parameter_shapes == {
        "linear_0.weight": (32, 784), "linear_0.bias": (32,),
        "linear_1.weight": (16, 32), "linear_1.bias": (16,),
        "linear_2.weight": (10, 16), "linear_2.bias": (10,)}
    assert compiled.shapes["input"] == (None, 784)
    assert compiled.shapes["output"] == (None, 10)
    params = compiled.get_parameters()
    assert {k: v.shape for k, v in params.items()} == compiled.parameter_shapes


def test_set_shapes_and_compile_shapes_merge():
    model = ml.Model()
    model |= ml.Add()(left="a", right="b", output="c")
    model.set_shapes(a=[None, 3])
    compiled = ml.compile(model, NumpyBackend(), shapes={"a": [4, None], "b": [3]})
    assert compiled.shapes == {"a": (4, 3), "b": (3,), "c": (4, 3)}


def test_uninferable_parameter_shape_says_what_to_declare():
    """Compiled without shapes, the model is built at its first evaluate (as the published
    README compiles ``Linear(16)``); until then what needs the shapes names what to declare."""
    compiled = ml.compile(ml.MLP([None, None], [3, 2]), NumpyBackend())
    with pytest.raises(ml.ShapeError, match=r"linear_0\.weight.*set_shapes"):
        compiled.randomize_params()


def test_set_shapes_clash_names_both_keys_and_shapes():
    model = ml.MLP([None], [2])
    model.set_shapes(input=[None, 5])
    with pytest.raises(ml.ShapeError) as e:
        model.set_shapes(input=[None, 6])
    assert "input" in str(e.value) and "[None, 5]" in str(e.value) and "[None, 6]" in str(e.value)
    with pytest.raises(ml.ShapeError) as e:
        ml.compile(model, NumpyBackend(), shapes={"input": [8, 4]})
    msg = str(e.value)
    assert "input" in msg and "[None, 5]" in msg and "[8, 4]" in msg


def test_inferred_shape_clash_names_both_keys_and_shapes():
    model = ml.Model()
    model += ml.Linear(10)
    model |= ml.MeanSquaredError()(input="output", target="target", output="loss")
    model.set_shapes(input=[None, 5], target=[None, 3])
    with pytest.raises(ml.ShapeError) as e:
        ml.compile(model, NumpyBackend())
    msg = str(e.value)
    assert "mean_squared_error" in msg
    assert "'output' [None, 10]" in msg and "'target' [None, 3]" in msg

    model = ml.MLP(["relu", None], [4, 3])
    model.set_shapes(input=[None, 5], output=[None, 2])
    with pytest.raises(ml.ShapeError) as e:
        ml.compile(model, NumpyBackend())
    msg = str(e.value)
    assert "'output' has shape [None, 2]" in msg and "'linear_1.output (inferred)' has shape [None, 3]" in msg


@pytest.mark.parametrize("op, shapes, words", [
    (ml.Add(), {"left": [3, 4], "right": [5, 4]}, ["'left' <- 'left' [3, 4]", "'right' <- 'right' [5, 4]"]),
    (ml.MatrixMultiply(), {"left": [3, 4], "right": [5, 2]}, ["[3, 4]", "[5, 2]", "inner dims"]),
    (ml.CrossEntropy(), {"input": [3, 4], "target": [5]}, ["[3, 4]", "[5]", "target"]),
    (ml.SquaredError(), {"input": [3, 4], "target": [3, 5]}, ["[3, 4]", "[3, 5]", "target"]),
])
def test_operator_shape_rules_reject_clashes(op, shapes, words):
    with pytest.raises(ml.ShapeError) as e:
        ml.compile(op, NumpyBackend(), shapes=shapes)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("op, shapes, out", [
    (ml.Add(), {"left": [None, 1, 4], "right": [3, 1]}, (None, 3, 4)),
    (ml.MatrixMultiply(), {"left": [2, 1, 3, 4], "right": [5, 4, 6]}, (2, 5, 3, 6)),
    (ml.Flatten(), {"input": [None, 2, 3, 4]}, (None, 24)),
    (ml.Embedding(5, 7), {"input": [2, 3]}, (2, 3, 7)),
    (ml.CrossEntropy(reduction="none"), {"input": [None, 6, 4], "target": [2, None]}, (2, 6)),
    (ml.CrossEntropy(), {"input": [8, 4], "target": [8, 4]}, ()),
    (ml.SquaredError(), {"input": [None, 4], "target": [3, None]}, (3, 4)),
])
def test_operator_shape_rules(op, shapes, out):
    assert ml.compile(op, NumpyBackend(), shapes=shapes).shapes["output"] == out


# -- summary -----------------------------------------------------------------------------
def test_summary_lists_layers_shapes_and_parameter_counts():
    model = ml.Model()
    model += ml.MLP(["tanh", "tanh", None], [32, 32, 10])
    model += ml.Softmax()
    model.set_shapes(input=[None, 784])
    printed = []
    compiled = ml.compile(model, NumpyBackend())
    assert compiled.summary(print_fn=printed.append) is None  # printed or returned, not both
    text = compiled.summary(print_info=False)
    assert printed == [text]
    lines = text.splitlines()
    assert lines[0].split() == ["layer", "output", "shape", "parameters"]
    rows = {ln.split()[0]: ln.split() for ln in lines[2:-1]}
    assert list(rows) == ["mlp.linear_0", "mlp.tanh_0", "mlp.linear_1", "mlp.tanh_1",
                          "mlp.linear_2", "softmax"]
    assert rows["mlp.linear_0"] == ["mlp.linear_0", "(Linear)", "[None,", "32]", str(784 * 32 + 32)]
    assert rows["mlp.linear_2"][-1] == str(32 * 10 + 10)
    assert rows["softmax"] == ["softmax", "(Softmax)", "[None,", "10]", "0"]
    total = 784 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10
    assert lines[-1].startswith(f"total parameters: {total}")
    assert "NumpyBackend" in lines[-1]


# -- parameters and seeding ----------------------------------------------------------------
def _mlp():
    model = ml.MLP(["relu", None], [6, 3])
    model.set_shapes(input=[None, 4])
    return model


def test_get_parameters_is_deterministic_under_set_seed(backend_cls):
    b = backend_cls()
    b.set_seed(123)
    first = np_dict(b, ml.compile(_mlp(), b).get_parameters())
    b.set_seed(123)
    again = np_dict(b, ml.compile(_mlp(), b).get_parameters())
    b.set_seed(124)
    other = np_dict(b, ml.compile(_mlp(), b).get_parameters())
    for k in first:
        np.testing.assert_array_equal(first[k], again[k])
    assert not np.allclose(first["linear_0.weight"], other["linear_0.weight"])
    # Glorot uniform weights, zero biases
    limit = np.sqrt(6 / (4 + 6))
    assert np.abs(first["linear_0.weight"]).max() <= limit
    assert first["linear_0.weight"].std() > limit / 4
    np.testing.assert_array_equal(first["linear_0.bias"], 0)
    # a fresh backend with the same seed draws the same
    fresh = np_dict(b, ml.compile(_mlp(), backend_cls(seed=123)).get_parameters())
    for k in first:
        np.testing.assert_array_equal(first[k], fresh[k])


def test_same_seed_gives_same_parameters_on_every_backend():
    from conftest import BACKENDS

    drawn = []
    for cls in BACKENDS.values():
        b = cls(seed=7)
        drawn.append(np_dict(b, ml.compile(_mlp(), b).get_parameters()))
    for other in drawn[1:]:
        for k, v in drawn[0].items():
            np.testing.assert_array_equal(v, other[k])


def test_get_parameters_is_stable_and_randomize_params_redraws(backend):
    compiled = ml.compile(_mlp(), backend)
    p1, p2 = compiled.get_parameters(), compiled.get_parameters()
    # the same arrays in a fresh dict; JAX's are copies the caller owns (a user's donating
    # jax.jit would otherwise delete the model's: tests/test_review_jax48.py)
    same = backend.name != "jax"
    assert p1 is not p2 and all((p1[k] is p2[k]) == same for k in p1)
    assert all(np.array_equal(to_np(backend, p1[k]), to_np(backend, p2[k])) for k in p1)
    p3 = compiled.randomize_params()
    assert not np.allclose(to_np(backend, p1["linear_0.weight"]), to_np(backend, p3["linear_0.weight"]))
    w = compiled.get_parameters()["linear_0.weight"]
    assert (w is p3["linear_0.weight"]) == same
    assert np.array_equal(to_np(backend, w), to_np(backend, p3["linear_0.weight"]))


# -- the guide's first listing ("Manual Parameter Updates") ---------------------------------
def test_guide_manual_parameter_updates(backend):
    model = ml.MLP(["tanh", "tanh", None], [32, 32, 10])
    model.set_shapes(input=[None, 784])
    compiled_model = ml.compile(model, backend)
    params = compiled_model.get_parameters()
    inputs = {"input": backend.randn(32, 784)}  # Batch of 32 examples
    targets = backend.randn(32, 10)             # Target outputs
    learning_rate = 0.01

    losses = []
    for _ in range(50):
        outputs = compiled_model.evaluate(params, inputs)
        losses.append(float(to_np(backend, ((outputs["output"] - targets) ** 2).mean())))
        loss_gradients = {"output": 2 * (outputs["output"] - targets)}  # MSE loss gradient
        _, gradients = compiled_model.evaluate(params, inputs, output_gradients=loss_gradients)
        assert set(gradients) == set(params)
        for name, grad in gradients.items():
            params[name] = params[name] - learning_rate * grad

    assert np.isfinite(losses).all()
    # it oscillates for a few steps (lr 0.01 on an unnormalised gradient), then settles
    assert max(losses[-10:]) < 0.05 * losses[0], np.round(losses, 3)
