"""Round 3 of the published Mithril's users: ``ToList`` / ``ToTuple`` (list-valued wires).

The published ``tests/scripts/test_all_models.py`` models (``test_concat_1/2``,
``test_concat_3_with_indexer_list_input`` / ``..._tuple_input``,
``test_list_of_list_type_data_flow``) and a segformer-style ``ToTuple(n)(*hidden_states)``,
built with the published imports, against ``torch.cat`` and torch autograd in float64 on
NumPy, torch and JAX; what a list cannot feed is refused by name, the model left as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import BACKENDS, to_np

import mithril as ml
from mithril.models import (
    Buffer,
    Concat,
    IOKey,
    Linear,
    Model,
    Relu,
    Tensor,
    ToList,
    ToTuple,
)

RNG = np.random.default_rng(50)


def _grads(compiled, b, params, data, cot):
    out, grads = compiled.evaluate({k: b.array(v) for k, v in params.items()},
                                   {k: b.array(v) for k, v in data.items()},
                                   output_gradients={k: b.array(v) for k, v in cot.items()})
    return ({k: to_np(b, v) for k, v in out.items()}, {k: to_np(b, v) for k, v in grads.items()})


@pytest.mark.parametrize("kind", [ToList, ToTuple])
@pytest.mark.parametrize("name", list(BACKENDS))
def test_a_list_feeds_two_concats_and_a_slice_of_it_a_third(name, kind):
    """test_concat_2 + test_concat_3: ``+= Concat()`` after the list, ``Concat().connect(input=
    lst.output)`` and ``input=lst.output[-2:]``; outputs and gradients as torch's (float64)."""
    b = BACKENDS[name](dtype="float64")
    model = Model()
    lst = kind(n=3)
    model |= lst.connect(input1=IOKey("input1", type=Tensor), input2=IOKey("input2", type=Tensor),
                         input3=IOKey("input3", type=Tensor))
    model += Concat().connect(output="output_1")
    model |= Concat(axis=1).connect(input=lst.output, output="output_2")
    model |= Concat().connect(input=lst.output[-2:], output="output_3")
    shapes = {f"input{i}": [2, 3] for i in (1, 2, 3)}
    compiled = ml.compile(model, b, shapes=shapes, trainable_keys={"input1", "input3"})
    xs = {f"input{i}": RNG.standard_normal((2, 3)) for i in (1, 2, 3)}
    cot = {"output_1": RNG.standard_normal((6, 3)), "output_2": RNG.standard_normal((2, 9)),
           "output_3": RNG.standard_normal((4, 3))}
    out, grads = _grads(compiled, b, {k: xs[k] for k in ("input1", "input3")},
                        {"input2": xs["input2"]}, cot)
    t = {k: torch.tensor(v, requires_grad=k != "input2") for k, v in xs.items()}
    ts = [t["input1"], t["input2"], t["input3"]]
    want = {"output_1": torch.cat(ts), "output_2": torch.cat(ts, dim=1), "output_3": torch.cat(ts[-2:])}
    total = sum((w * torch.tensor(cot[k])).sum() for k, w in want.items())
    g1, g3 = torch.autograd.grad(total, [t["input1"], t["input3"]])
    assert set(out) == set(want) and set(grads) == {"input1", "input3"}
    for k, w in want.items():
        np.testing.assert_allclose(out[k], w.detach().numpy(), rtol=0, atol=0)
    np.testing.assert_allclose(grads["input1"], g1.numpy(), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(grads["input3"], g3.numpy(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_a_list_of_lists_indexed_twice(name):
    """test_list_of_list_type_data_flow: ``tl_3.output[0][0]`` is ``input_1`` (gradient 0.1 ·
    [1]), next to a constant element; here with a Linear and Relu after it, against torch."""
    b = BACKENDS[name](dtype="float64")
    model = Model()
    model |= (tl_1 := ToList(n=2)).connect(input1=IOKey("input_1", differentiable=True),
                                           input2=IOKey("input_2", value=np.array([2.0, 3.0])))
    model |= (tl_2 := ToList(n=2)).connect(input1="input_2", input2="input_2")
    model |= (tl_3 := ToList(n=2)).connect(input1=tl_1.output, input2=tl_2.output)
    model |= Buffer().connect(tl_3.output[0][0], output="output")
    model |= (lin := Linear(3)).connect(input=tl_3.output[0][0] * tl_3.output[1][1])
    model |= Relu().connect(input=lin.output, output="y")
    compiled = ml.compile(model, b, shapes={"input_1": [2]})
    params = {k: RNG.standard_normal(s) for k, s in compiled.parameter_shapes.items()}
    cot = {"output": RNG.standard_normal(2), "y": RNG.standard_normal(3)}
    out, grads = _grads(compiled, b, params, {}, cot)
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    h = t["linear.weight"] @ (t["input_1"] * torch.tensor([2.0, 3.0])) + t["linear.bias"]
    y = torch.relu(h)
    total = (t["input_1"] * torch.tensor(cot["output"])).sum() + (y * torch.tensor(cot["y"])).sum()
    want = dict(zip(t, torch.autograd.grad(total, list(t.values())), strict=True))
    np.testing.assert_allclose(out["output"], params["input_1"], rtol=0, atol=0)
    np.testing.assert_allclose(out["y"], y.detach().numpy(), rtol=1e-12, atol=1e-15)
    for k, g in want.items():
        np.testing.assert_allclose(grads[k], g.numpy(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_segformer_hidden_states_tuple_by_name_and_positionally(name):
    """The published segformer encoder's ``ToTuple(n=k)(*all_hidden_states)``, named, read back
    by name (``Concat().connect(input="hidden_states")``) and element by element
    (``model.hidden_states[i]``)."""
    b = BACKENDS[name](dtype="float64")
    model = Model()
    hs = []
    for i in range(3):
        model |= (lin := Linear(4, name=f"block_{i}")).connect(input=hs[-1] if hs else "input")
        hs.append(lin.output)
    model |= ToTuple(n=3)(*hs, output="hidden_states")
    model |= Concat(axis=-1).connect(input="hidden_states", output="all")
    model |= Buffer().connect(input=model.hidden_states[1], output="h1")
    compiled = ml.compile(model, b, shapes={"input": [2, 5]})
    params = {k: RNG.standard_normal(s) for k, s in compiled.parameter_shapes.items()}
    x = RNG.standard_normal((2, 5))
    cot = {"all": RNG.standard_normal((2, 12)), "h1": RNG.standard_normal((2, 4))}
    out, grads = _grads(compiled, b, params, {"input": x}, cot)
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    h, want_hs = torch.tensor(x), []
    for i in range(3):
        h = h @ t[f"block_{i}.weight"].T + t[f"block_{i}.bias"]
        want_hs.append(h)
    total = (torch.cat(want_hs, -1) * torch.tensor(cot["all"])).sum() + \
        (want_hs[1] * torch.tensor(cot["h1"])).sum()
    want = dict(zip(t, torch.autograd.grad(total, list(t.values())), strict=True))
    np.testing.assert_allclose(out["all"], torch.cat(want_hs, -1).detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(out["h1"], want_hs[1].detach().numpy(), rtol=1e-12)
    for k, g in want.items():
        np.testing.assert_allclose(grads[k], g.numpy(), rtol=1e-12, atol=1e-14)


def _state(model):
    return (len(model.blocks), len(model._list_blocks), dict(model.conns), dict(model._lists),
            model.input_keys, model.output_keys)


def test_what_a_list_cannot_feed_is_refused_by_name_and_changes_nothing():
    model = Model()
    model |= (lst := ToList(n=2)).connect(input1="a", input2="b", output="lst")
    before = _state(model)
    cases = [
        (lambda: Linear(3).connect(input=lst.output), TypeError, "Linear.input: a list"),
        (lambda: Relu().connect(input="lst"), TypeError, "Relu.input: a list"),
        (lambda: Relu().connect(input=model.lst + 1.0), TypeError, "lists (ToList / ToTuple outputs) are indexed"),
        (lambda: Relu().connect(input=lst.output[2]), IndexError, "index 2 is out of range for a list of 2"),
        (lambda: Relu().connect(input=lst.output[0, 1]), TypeError, "indexed with an int or a slice"),
        (lambda: Relu().connect(input="a", output="lst"), ValueError, "'lst' is a list"),
        (lambda: ToList(n=1).connect(input1="a", output="a"), ValueError, "'a' names another connection"),
    ]
    for make, err, text in cases:
        with pytest.raises(err, match=text.replace("(", r"\(").replace(")", r"\)")):
            model |= make()
        assert _state(model) == before
    with pytest.raises(TypeError, match="is a list"):
        model.expose_keys(out=model.lst)
    with pytest.raises(TypeError, match="is a list"):
        model.set_shapes({model.lst: [2, 3]})
    assert _state(model) == before
    # a Concat whose list failed to connect is left as it was: it takes a list again
    model2 = Model()
    model2 |= (nested := ToList(n=2)).connect(input1="x", input2="y")
    model2 |= (outer := ToList(n=1)).connect(input1=nested.output)
    concat = Concat()
    with pytest.raises(TypeError, match="holds a list; Concat joins arrays"):
        model2 |= concat.connect(input=outer.output)
    assert concat.n is None
    model2 |= concat.connect(input=nested.output, output="z")
    assert concat.n == 2 and model2.output_keys == ("z",)


def test_a_list_alone_is_not_compiled_and_arguments_are_checked():
    b = ml.NumpyBackend(dtype="float64")
    with pytest.raises(TypeError, match=r"ToList\(n=2\): its list \(unnamed\) is read by no block"):
        ml.compile(ToList(n=2), b, shapes={"input1": [2], "input2": [2]})
    inner = Model()  # the segformer encoder's hidden_states tuple as an output: refused
    inner |= (lin := Linear(2)).connect(input="x")
    inner |= ToTuple(n=1)(lin.output, output="hidden_states")
    outer = Model()
    outer |= inner.connect(x="x")
    with pytest.raises(TypeError, match="its tuple \\('hidden_states'\\) is read by no block"):
        ml.compile(outer, b, shapes={"x": [1, 2]})
    with pytest.raises(ValueError, match="ToTuple: n must be a positive int, got 0"):
        ToTuple(n=0)
    with pytest.raises(TypeError, match=r"ToList\(2\): no input\(s\) \['input3'\]"):
        ToList(2, input3=1.0)
    model = Model()
    model |= ToList(n=2, input2=np.array([1.0, 2.0])).connect(input1="x")
    model += Concat().connect(output="y")
    compiled = ml.compile(model, b, shapes={"x": [3]})
    np.testing.assert_array_equal(compiled.evaluate({}, {"x": np.zeros(3)})["y"], [0, 0, 0, 1, 2])
    model = Model()  # the values hold for a ToList added without connect too
    model |= Buffer().connect(input="x", output="x_out")
    model += ToTuple(2, input2=np.array([1.0, 2.0]))
    model += Concat().connect(output="y")
    compiled = ml.compile(model, b, shapes={"x": [3]})
    assert compiled.input_keys == ("x",)
    np.testing.assert_array_equal(compiled.evaluate({}, {"x": np.ones(3)})["y"], [1, 1, 1, 1, 2])


@pytest.mark.parametrize("name", list(BACKENDS))
def test_concat_connect_positionally_and_its_axis_as_published(name):
    """``Concat().connect(input, axis, output)`` (the published signature: positional, and
    ``axis`` given in connect), a list's output among its inputs, against torch.cat."""
    b = BACKENDS[name](dtype="float64")
    model = Model()
    model |= (lst := ToList(n=2)).connect(input1="a", input2="b")
    model |= Concat().connect(lst.output, 1, "y")
    model |= Concat().connect(input=["a", "b"], axis=None, output="flat")
    compiled = ml.compile(model, b, shapes={"a": [2, 3], "b": [2, 1]}, trainable_keys={"a"})
    a, bv = RNG.standard_normal((2, 3)), RNG.standard_normal((2, 1))
    cot = {"y": RNG.standard_normal((2, 4)), "flat": RNG.standard_normal(8)}
    out, grads = _grads(compiled, b, {"a": a}, {"b": bv}, cot)
    ta = torch.tensor(a, requires_grad=True)
    y, flat = torch.cat([ta, torch.tensor(bv)], 1), torch.cat([ta.reshape(-1), torch.tensor(bv).reshape(-1)])
    (ga,) = torch.autograd.grad((y * torch.tensor(cot["y"])).sum() + (flat * torch.tensor(cot["flat"])).sum(), [ta])
    np.testing.assert_array_equal(out["y"], y.detach().numpy())
    np.testing.assert_array_equal(out["flat"], flat.detach().numpy())
    np.testing.assert_allclose(grads["a"], ga.numpy(), rtol=1e-12, atol=1e-15)
    concat = Concat(axis=0)
    with pytest.raises(TypeError, match="Concat.connect: axis must be an int or None, got 1.5"):
        concat.connect(input=["a"], axis=1.5)
    with pytest.raises(ValueError, match="the list is empty"):
        concat.connect(input=[], axis=1)
    assert concat.axis == 0 and concat.n is None


def test_composite_blocks_take_the_published_positional_connections():
    """``LinearSVM().connect(input, weight, bias, output, decision_output)`` and
    ``QuadraticFormRegularizer().connect(input, kernel, output)`` positionally, as published; a
    model without a published order takes names only (a ``TypeError`` naming its terminals)."""
    from mithril.models import LinearSVM, QuadraticFormRegularizer

    b = ml.NumpyBackend(dtype="float64")
    model = Model()
    model |= LinearSVM().connect("x", "w", "b", "out", "dec")
    model |= QuadraticFormRegularizer().connect("w", "k", "reg")
    compiled = ml.compile(model, b, shapes={"x": [4, 3], "w": [1, 3], "k": [3, 3]})
    assert {"w", "b"} <= set(compiled.parameter_shapes) and {"out", "dec", "reg"} <= set(compiled.output_keys)
    x, k = RNG.standard_normal((4, 3)), RNG.standard_normal((3, 3))
    params = {"w": RNG.standard_normal((1, 3)), "b": RNG.standard_normal(1)}
    out = compiled.evaluate(params, {"x": x, "k": k})
    np.testing.assert_allclose(out["out"], x @ params["w"].T + params["b"], rtol=1e-12)
    np.testing.assert_allclose(out["reg"], 0.5 * params["w"] @ k @ params["w"].T, rtol=1e-12)
    with pytest.raises(TypeError, match=r"Model.connect takes its connections by name here \(its terminals: \['x'"):
        model.connect("a")
    with pytest.raises(TypeError, match="got two values for 'input'"):
        LinearSVM().connect("x", input="y")
