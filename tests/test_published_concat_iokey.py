"""The published Mithril's ``Concat`` list input and ``IOKey(type=..., differentiable=...)``.

``Concat(axis).connect(input=[a, b, ...])`` (``axis=None``: flattened first) against
``torch.cat`` and torch autograd on the three backends, and against central differences;
``IOKey(differentiable=...)`` / ``Model.set_differentiability`` against torch's gradients and
their precedence under ``compile``'s key sets; ``IOKey(type=Tensor[...])`` refusals, by name,
leaving the model as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import BACKENDS, central_differences, to_np

import mithril as ml
from mithril.models import Add, Buffer, Concat, Embedding, IOKey, Linear, Model, Multiply
from mithril.models.connection_types import Tensor

RNG = np.random.default_rng(7)
SHAPES = {0: [(2, 3), (4, 3), (1, 3)], 1: [(2, 1), (2, 4), (2, 2)], -1: [(3, 2, 1), (3, 2, 5), (3, 2, 2)],
          None: [(1, 4), (4, 1), (2, 3, 1)]}


def _torch_cat(arrays, axis):
    ts = [torch.tensor(a, requires_grad=True) for a in arrays]
    out = torch.cat([t.reshape(-1) for t in ts] if axis is None else ts, dim=axis or 0)
    return ts, out


@pytest.mark.parametrize("axis", list(SHAPES), ids=str)
@pytest.mark.parametrize("name", list(BACKENDS))
def test_concat_list_input_matches_torch_cat(name, axis):
    """Concat(axis).connect(input=[...]): elements given as an IOKey, a name and another
    block's output; outputs and each element's gradient as torch.cat's (float32)."""
    b = BACKENDS[name](dtype="float32")
    arrays = [RNG.standard_normal(s).astype(np.float32) for s in SHAPES[axis]]
    model = Model()
    model |= Buffer().connect(input="c_in", output=IOKey("c", expose=False))
    model |= Concat(axis=axis).connect(input=[IOKey("a", differentiable=True), "b", model.c],
                                       output="output")
    shapes = dict(zip(("a", "b", "c_in"), SHAPES[axis], strict=True))
    compiled = ml.compile(model, b, shapes=shapes, trainable_keys=["b", "c_in"])
    assert compiled.input_keys == () and set(compiled.parameter_shapes) == {"a", "b", "c_in"}
    ts, want = _torch_cat(arrays, axis)
    cot = RNG.standard_normal(tuple(want.shape)).astype(np.float32)
    params = {k: b.array(v) for k, v in zip(("a", "b", "c_in"), arrays, strict=True)}
    out, grads = compiled.evaluate(params, {}, output_gradients={"output": b.array(cot)})
    want_grads = torch.autograd.grad(want, ts, torch.tensor(cot))
    np.testing.assert_allclose(to_np(b, out["output"]), want.detach().numpy(), rtol=0, atol=0)
    for k, g in zip(("a", "b", "c_in"), want_grads, strict=True):
        np.testing.assert_allclose(to_np(b, grads[k]), g.numpy(), rtol=0, atol=0)


@pytest.mark.parametrize("axis", [1, None], ids=str)
def test_concat_list_gradient_against_central_differences(axis):
    """float64 NumPy: each element's gradient of sum(w · concat) by central differences."""
    b = ml.NumpyBackend(dtype="float64")
    names = ("x0", "x1", "x2")
    params = {n: RNG.standard_normal(s) for n, s in zip(names, SHAPES[axis], strict=True)}
    model = Model()
    model |= Concat(axis=axis).connect(input=[IOKey(n, differentiable=True) for n in names],
                                       output="output")
    compiled = ml.compile(model, b, shapes={n: v.shape for n, v in params.items()})
    w = RNG.standard_normal(compiled.shapes["output"])
    _, grads = compiled.evaluate(params, {}, output_gradients={"output": w})
    fd = central_differences(lambda p: float(np.sum(w * compiled.evaluate(p, {})["output"])),
                             params, 1e-6)
    for n in names:
        np.testing.assert_allclose(grads[n], fd[n], rtol=1e-8, atol=1e-8)


def test_concat_list_refusals_change_nothing():
    """An empty list, a list of another length than n, an unknown terminal and a list-form
    Concat left unconnected are refused by name; a connect that raises leaves n as it was."""
    with pytest.raises(ValueError, match="the list is empty"):
        Concat().connect(input=[])
    with pytest.raises(ValueError, match="takes 2 inputs .* a list of 3"):
        Concat(2).connect(input=["a", "b", "c"])
    cat = Concat(axis=0)
    with pytest.raises(ml.KeyMismatchError, match="no terminal"):
        cat.connect(input=["a", "b"], bogus="c")
    assert cat.n is None and cat.inputs == ("input",)
    with pytest.raises(ml.ShapeError, match=r"connect\(input=\[a, b, ...\]\)"):
        ml.compile(Concat(axis=0), ml.NumpyBackend(), shapes={"input": [2]})
    with pytest.raises(ValueError, match="positive int"):
        Concat(n=0)
    with pytest.raises(TypeError, match="axis must be an int or None"):
        Concat(axis="0")
    bound = Concat(axis=1)(input=("p", "q"), output="out")  # (calling the block is connect)
    assert bound.block.n == 2 and set(bound.connections) == {"input1", "input2", "output"}



def test_concat_without_n_connected_by_numbered_names():
    """``Concat()`` bound by name to input1 .. input<k> is Concat(k) (before the list form,
    n defaulted to 2 and such code ran): the same values as numpy.concatenate; a connect
    that raises leaves it as it was."""
    model = Model()
    model |= Concat(axis=0).connect(input1="a", input2="b", input3="c", output="out")
    compiled = ml.compile(model, ml.NumpyBackend(dtype="float64"),
                          shapes={"a": [2], "b": [3], "c": [1]})
    x = {k: np.arange(n, dtype=np.float64) + i for i, (k, n) in enumerate((("a", 2), ("b", 3), ("c", 1)))}
    out = compiled.evaluate({}, x)["out"]
    np.testing.assert_array_equal(out, np.concatenate([x["a"], x["b"], x["c"]]))
    cat = Concat()
    with pytest.raises(ml.KeyMismatchError, match="inputx"):
        cat.connect(input1="a", inputx="b")
    assert cat.n is None and cat.inputs == ("input",)

# -- IOKey(differentiable=...) -----------------------------------------------------------------
def _product_model(**keys) -> Model:
    """output = left * right + right, with the IOKeys given."""
    model = Model()
    model |= Multiply().connect(left=keys.get("left", "left"), right=keys.get("right", "right"))
    model |= Add().connect(left=model.cout, right="right", output="output")
    return model


@pytest.mark.parametrize("name", list(BACKENDS))
def test_differentiable_inputs_get_torch_gradients(name):
    """IOKey(differentiable=True) and set_differentiability make inputs trainable with no
    trainable_keys; their gradients are torch autograd's (float32)."""
    b = BACKENDS[name](dtype="float32")
    left, right = RNG.standard_normal((2, 3)).astype(np.float32), RNG.standard_normal((2, 3)).astype(np.float32)
    cot = RNG.standard_normal((2, 3)).astype(np.float32)
    tl, tr = torch.tensor(left, requires_grad=True), torch.tensor(right, requires_grad=True)
    want = tl * tr + tr
    gl, gr = torch.autograd.grad(want, (tl, tr), torch.tensor(cot))
    m1 = _product_model(left=IOKey("left", type=Tensor[int | float | bool], differentiable=True))
    m2 = _product_model().set_differentiability({"left": True}, right=True)
    for model, trainable in ((m1, {"left"}), (m2, {"left", "right"})):
        c = ml.compile(model, b, shapes={"left": [2, 3], "right": [2, 3]})
        assert set(c.parameter_shapes) == trainable and set(c.input_keys) == {"left", "right"} - trainable
        arrays = {"left": left, "right": right}
        out, grads = c.evaluate({k: b.array(arrays[k]) for k in trainable},
                                {k: b.array(arrays[k]) for k in c.input_keys},
                                output_gradients={"output": b.array(cot)})
        np.testing.assert_allclose(to_np(b, out["output"]), want.detach().numpy(), rtol=1e-6)
        np.testing.assert_allclose(to_np(b, grads["left"]), gl.numpy(), rtol=1e-6)
        if "right" in trainable:
            np.testing.assert_allclose(to_np(b, grads["right"]), gr.numpy(), rtol=1e-6)


def test_compile_key_sets_win_over_declarations():
    """As published: data_keys / constant_keys make a declared-differentiable input data or a
    constant; trainable_keys makes a parameter role declared not differentiable trainable."""
    b = ml.NumpyBackend(dtype="float64")
    model = _product_model(left=IOKey("left", differentiable=True))
    assert ml.compile(model, b, shapes={"left": [3], "right": [3]}, data_keys=["left"]).parameter_shapes == {}
    c = ml.compile(model, b, shapes={"right": [3]}, constant_keys={"left": np.ones(3)})
    assert c.parameter_shapes == {} and c.input_keys == ("right",)
    lin = Model()
    lin |= Linear(2).connect(input="x", weight=IOKey("w", differentiable=False), output="output")
    frozen = ml.compile(lin, b, shapes={"x": [4, 3]})
    assert set(frozen.input_keys) == {"x", "w"} and set(frozen.parameter_shapes) == {"linear.bias"}
    x, w = RNG.standard_normal((4, 3)), RNG.standard_normal((2, 3))
    out = frozen.evaluate({"linear.bias": np.zeros(2)}, {"x": x, "w": w})
    np.testing.assert_allclose(out["output"], x @ w.T, rtol=1e-12)
    trained = ml.compile(lin, b, shapes={"x": [4, 3]}, trainable_keys=["w"])
    assert trained.input_keys == ("x",) and set(trained.parameter_shapes) == {"w", "linear.bias"}


def test_a_nested_declaration_holds_for_the_parent_wire():
    """A child's IOKey(differentiable=True) input, bound to a parent input, makes that one
    trainable; its gradient is the product's."""
    child = _product_model(left=IOKey("left", differentiable=True))
    parent = Model()
    parent |= child.connect(left="a", right="b", output="output")
    c = ml.compile(parent, ml.NumpyBackend(dtype="float64"), shapes={"a": [2], "b": [2]})
    assert c.input_keys == ("b",) and list(c.parameter_shapes) == ["a"]
    _, g = c.evaluate({"a": np.array([1.0, 2.0])}, {"b": np.array([3.0, -4.0])},
                      output_gradients={"output": np.ones(2)})
    np.testing.assert_allclose(g["a"], [3.0, -4.0])


def test_differentiability_refusals_change_nothing():
    """Contradicting declarations, one for an output or a constant, a non-bool, an unknown
    name: errors naming the key; the model keeps what it had."""
    model = _product_model(left=IOKey("left", differentiable=True))
    with pytest.raises(ValueError, match="'left' is declared differentiable=True and differentiable=False"):
        model |= Buffer().connect(input=IOKey("left", differentiable=False), output="copy")
    assert "copy" not in model.conns and model.conns["left"].differentiable is True
    with pytest.raises(ValueError, match="'out2' is an output"):
        model |= Buffer().connect(input="right", output=IOKey("out2", differentiable=True))
    assert "out2" not in model.conns
    with pytest.raises(ValueError, match="'output' is computed by a block"):
        model.set_differentiability(right=True, output=True)
    with pytest.raises(TypeError, match="for 'right' must be a bool"):
        model.set_differentiability(right="yes")
    with pytest.raises(ml.KeyMismatchError, match="no connection 'nope'"):
        model.set_differentiability(nope=True)
    assert model.conns["right"].differentiable is None
    with pytest.raises(ValueError, match="a constant value gets no gradient"):
        IOKey("k", value=1.0, differentiable=True)
    with pytest.raises(TypeError, match="differentiable must be a bool"):
        IOKey("k", differentiable=1)


# -- IOKey(type=...) ---------------------------------------------------------------------------
def test_types_are_checked_against_what_the_connection_feeds():
    """Tensor[int] into a float input, Tensor[float] into an index input, two types sharing
    no kind, a value of another kind and the scalar types are TypeErrors naming the key (at
    add time, or at compile for a connection typed after its float consumer was added)."""
    model = Model()
    with pytest.raises(TypeError, match="'x' is declared Tensor\\[int\\], but it feeds Multiply.left, "
                                        "which takes float arrays"):
        model |= Multiply().connect(left=IOKey("x", type=Tensor[int]), right="y")
    assert model.blocks == [] and model.conns == {}
    with pytest.raises(TypeError, match="feeds Embedding.input, which takes int arrays"):
        model |= Embedding(5, 2).connect(input=IOKey("ids", type=Tensor[float]))
    model |= Embedding(5, 2).connect(input=IOKey("ids", type=Tensor[int | bool]), output="emb")
    with pytest.raises(TypeError, match="declared Tensor\\[int \\| bool\\] and Tensor\\[float\\]"):
        model |= Buffer().connect(input=IOKey("ids", type=Tensor[float]), output="copy")
    late = Model()
    late |= Multiply().connect(left="x", right="y", output="output")
    late |= Buffer().connect(input=IOKey("x", type=Tensor[int]), output="x_copy")  # Buffer: any kind
    with pytest.raises(TypeError, match="'x' is declared Tensor\\[int\\], but it feeds Multiply.left"):
        ml.compile(late, ml.NumpyBackend(), shapes={"x": [2], "y": [2]})
    with pytest.raises(TypeError, match="its value holds float elements, but its type is Tensor\\[int\\]"):
        IOKey("c", value=[1.5], type=Tensor[int])
    with pytest.raises(TypeError, match="IOKey 'n': type=<class 'tuple'> is not offered"):
        IOKey("n", type=tuple)
    with pytest.raises(TypeError, match="a differentiable connection is Tensor\\[float\\]"):
        IOKey("n", type=Tensor[int], differentiable=True)
    with pytest.raises(TypeError, match="expose must be a bool or None, got Tensor\\[float\\]"):
        IOKey("x", None, [3], Tensor[float])  # the published 4th argument is type=
    with pytest.raises(TypeError, match="Tensor\\[...\\] takes int, float, bool"):
        Tensor[str]
    with pytest.raises(TypeError, match=r"Tensor\(\) without a value"):
        Tensor(shape=[3])
    ok = Model()
    ok |= Multiply().connect(left=IOKey("x", type=Tensor), right=IOKey("y", type=Tensor[float]),
                             output="output")
    assert ml.compile(ok, ml.NumpyBackend(), shapes={"x": [2], "y": [2]}).input_keys == ("x", "y")


def test_set_types_as_published():
    """Model.set_types(x=Tensor[...]) declares as IOKey(type=...) does: checked against what
    the connection feeds, intersected with earlier declarations; a refusal sets nothing."""
    model = Model()
    model |= Multiply().connect(left="x", right="y", output="output")
    model |= Embedding(4, 2).connect(input="ids", output="emb")
    with pytest.raises(TypeError, match="'x' is declared Tensor\\[int\\], but it feeds Multiply.left"):
        model.set_types(y=Tensor[float], x=Tensor[int])
    assert model.conns["x"].kinds is None and model.conns["y"].kinds is None
    with pytest.raises(TypeError, match="'ids' is declared Tensor\\[float\\], but it feeds Embedding.input"):
        model.set_types(ids=Tensor[float])
    model.set_types({model.x: Tensor[int | float]}, ids=Tensor[int])
    assert model.conns["x"].kinds == {"int", "float"} and model.conns["ids"].kinds == {"int"}
    with pytest.raises(TypeError, match="'x' is declared Tensor\\[int \\| float\\] and Tensor\\[bool\\]"):
        model.set_types(x=Tensor[bool])
    with pytest.raises(TypeError, match="type=<class 'tuple'> is not offered"):
        model.set_types(y=tuple)
    with pytest.raises(ml.KeyMismatchError, match="no connection 'z'"):
        model.set_types(z=Tensor)
