"""Connections as objects (issue #13): ``lin.input`` / ``lin.weight`` / ``model.cout``,
``connect(...)`` with connections and constants, ``set_cin`` / ``set_cout``, ``expose_keys``,
parameter roles as wires, and ``compile(constant_keys=, data_keys=, discard_keys=)``."""

from __future__ import annotations

import numpy as np
import pytest

import mithril as ml
from mithril.backends import NumpyBackend, TorchBackend
from mithril.models import Add, Linear, Model, Multiply, Power, Relu
from mithril.models.model import Terminal

BACKENDS = [pytest.param(lambda: NumpyBackend(dtype="float64"), id="numpy"),
            pytest.param(lambda: TorchBackend(dtype="float64"), id="torch")]


def _np(b, x):
    return np.asarray(b.to_numpy(x))


def test_every_block_exposes_its_terminals_and_parameter_roles():
    lin = Linear(3)
    for key in ("input", "output", "weight", "bias"):
        t = getattr(lin, key)
        assert isinstance(t, Terminal) and t.block is lin and t.key == key
    assert lin.dimension == 3  # ordinary attributes are untouched
    with pytest.raises(AttributeError):
        _ = lin.target
    assert Power().exponent.key == "exponent" and Add().left.key == "left"
    m = Model()
    m |= Linear(2).connect(input="x", output="y")
    assert m.x.conn is m.conns["x"] and m.y.key == "y"
    with pytest.raises(AttributeError):
        _ = m.z


@pytest.mark.parametrize("make", BACKENDS)
def test_connect_with_connection_objects(make):
    b = make()
    lin1, relu, lin2 = Linear(4), Relu(), Linear(2)
    m = Model()
    m |= lin1.connect(input="x")
    m |= relu.connect(input=lin1.output)
    m |= lin2.connect(input=relu.output, output="y")
    m |= Add().connect(left=lin2.output, right=m.x, output="z")  # a model's own connection
    c = ml.compile(m, b, shapes={"x": [5, 2]})
    p = c.randomize_params()
    x = np.random.default_rng(0).standard_normal((5, 2))
    out = c.evaluate(p, {"x": b.array(x)})
    pn = {k: _np(b, v) for k, v in p.items()}
    h = np.maximum(x @ pn["linear_0.weight"].T + pn["linear_0.bias"], 0)
    y = h @ pn["linear_1.weight"].T + pn["linear_1.bias"]
    np.testing.assert_allclose(_np(b, out["y"]), y, rtol=1e-12)
    np.testing.assert_allclose(_np(b, out["z"]), y + x, rtol=1e-12)


def test_a_connection_object_reaches_an_internal_wire():
    lin = Linear(3)
    m = Model()
    m += lin
    m += Relu()  # lin's output was only named by default: now an internal wire
    m |= Add().connect(left=lin.output, right=m.cout, output="skip")
    assert m.output_keys == ("output", "skip")
    c = ml.compile(m, NumpyBackend(dtype="float64"), shapes={"input": [2, 3]})
    p = c.randomize_params()
    x = np.arange(6.0).reshape(2, 3) - 2
    h = x @ p["linear.weight"].T + p["linear.bias"]
    np.testing.assert_allclose(c.evaluate(p, {"input": x})["skip"], h + np.maximum(h, 0))


def test_a_connection_of_a_block_not_in_the_model_is_refused():
    lin = Linear(3)
    m = Model()
    with pytest.raises(ValueError, match="not \\(yet\\) part of this model"):
        m |= Relu().connect(input=lin.output)


def test_constants_in_connect_are_folded_in():
    m = Model()
    m |= Add().connect(left="x", right=3.0, output="a")
    m |= Multiply().connect(left="a", right=[1.0, 2.0], output="b")
    m |= Power().connect(base="b", exponent=2, output="y")
    assert m.input_keys == ("x",)
    for b in (NumpyBackend(dtype="float64"), TorchBackend(dtype="float64")):
        c = ml.compile(m, b, shapes={"x": [2]}, trainable_keys=["x"])
        out, g = c.evaluate({"x": b.array(np.array([1.0, -1.0]))}, {}, output_gradients={"y": b.ones(2)})
        np.testing.assert_allclose(_np(b, out["y"]), [16.0, 16.0])
        np.testing.assert_allclose(_np(b, g["x"]), [8.0, 16.0])  # 2·b·[1, 2]


def test_cin_and_cout():
    m = Model()
    m += Linear(4)
    m += Relu()
    assert m.cin.key == "input" and m.cout.key == "output"
    assert m.cin.conn is m.conns["input"]
    two = Model()
    two |= Linear(2).connect(input="a", output="p")
    two |= Linear(2).connect(input="b", output="q")
    assert two.cin.key == "a" and two.cout.key == "q"
    two.set_cin("b").set_cout(two.p)
    assert two.cin.key == "b" and two.cout.key == "p"
    parent = Model()
    parent += Linear(3).connect(input="x")
    parent += two  # += wires the previous output to two's cin ("b"), and takes its cout ("p")
    parent += Relu().connect(output="r")
    assert set(parent.input_keys) == {"x", "a"}
    c = ml.compile(parent, NumpyBackend(), shapes={"x": [1, 5], "a": [1, 7]})
    assert c.shapes["r"] == (1, 2)
    assert [n.path for n in c.program.nodes if n.op.__class__ is Relu] == ["relu"]
    relu = next(n for n in c.program.nodes if isinstance(n.op, Relu))
    assert c.program.wire_names[relu.ins["input"]] == "p"
    with pytest.raises(ml.KeyMismatchError):
        _ = Model().cout


def test_expose_keys_makes_an_internal_wire_an_output():
    lin = Linear(3)
    m = Model()
    m |= lin.connect(input="x", output=ml.IOKey("h", expose=False))
    m |= Relu().connect(input="h", output="y")
    assert m.output_keys == ("y",)
    m.expose_keys("h")
    assert set(m.output_keys) == {"h", "y"}
    m2 = Model()
    lin2 = Linear(3)
    m2 += lin2
    m2 += Relu()
    m2.expose_keys(hidden=lin2.output)
    assert set(m2.output_keys) == {"hidden", "output"}
    c = ml.compile(m2, NumpyBackend(dtype="float64"), shapes={"input": [2, 2]})
    p = c.randomize_params()
    out = c.evaluate(p, {"input": np.ones((2, 2))})
    np.testing.assert_allclose(out["output"], np.maximum(out["hidden"], 0))
    with pytest.raises(ValueError, match="names another connection"):
        m2.expose_keys(input=m2.cout)


@pytest.mark.parametrize("make", BACKENDS)
def test_parameter_roles_named_and_shared(make):
    b = make()
    m = Model()
    m |= Linear(3).connect(input="x", weight="w", output="a")
    m |= Linear(3).connect(input="x", weight="w", output="b")  # the same name: one parameter
    c = ml.compile(m, b, shapes={"x": [4, 2]})
    assert set(c.parameter_shapes) == {"w", "linear_0.bias", "linear_1.bias"}
    assert c.parameter_shapes["w"] == (3, 2) and c.input_keys == ("x",)
    p = c.randomize_params()
    x = b.array(np.random.default_rng(1).standard_normal((4, 2)))
    ga, gb = b.ones(4, 3), b.ones(4, 3) * 2
    out, g = c.evaluate(p, {"x": x}, output_gradients={"a": ga, "b": gb})
    xn = _np(b, x)
    np.testing.assert_allclose(_np(b, g["w"]), 3 * np.ones((3, 4)) @ xn, rtol=1e-12)
    # shared by object: the second block reads the first one's weight
    lin1, lin2 = Linear(3), Linear(3)
    m2 = Model()
    m2 |= lin1.connect(input="x", output="a")
    m2 |= lin2.connect(input="a", weight=lin1.weight, output="y")
    with pytest.raises(ml.ShapeError):  # (3, 2) against (3, 3)
        ml.compile(m2, b, shapes={"x": [4, 2]})
    c2 = ml.compile(m2, b, shapes={"x": [4, 3]})
    assert set(c2.parameter_shapes) == {"linear_0.weight", "linear_0.bias", "linear_1.bias"}


def test_parameter_roles_as_constants_and_data():
    b = NumpyBackend(dtype="float64")
    m = Model()
    m |= Linear(2).connect(input="x", weight=ml.IOKey("w", value=[[1.0, 0.0], [0.0, 2.0]]),
                           bias=0.5, output="y")
    c = ml.compile(m, b, shapes={"x": [1, 2]})
    assert c.parameter_shapes == {} and c.input_keys == ("x",)
    np.testing.assert_allclose(c.evaluate({}, {"x": np.array([[1.0, 1.0]])})["y"], [[1.5, 2.5]])
    m = Model()
    m |= Linear(2).connect(input="x", weight="w", output="y")
    c = ml.compile(m, b, shapes={"x": [1, 3], "w": [2, 3]}, data_keys=["w"])
    assert set(c.input_keys) == {"x", "w"} and set(c.parameter_shapes) == {"linear.bias"}
    p = c.randomize_params()
    out = c.evaluate(p, {"x": np.ones((1, 3)), "w": np.ones((2, 3))})["y"]
    np.testing.assert_allclose(out, 3 + p["linear.bias"][None])


def test_compile_constant_data_and_discard_keys():
    b = NumpyBackend(dtype="float64")
    m = Model()
    m |= Linear(2).connect(input="x", output="y")
    m |= Relu().connect(input="y", output="r")
    x = np.arange(6.0).reshape(3, 2)
    c = ml.compile(m, b, constant_keys={"x": x}, discard_keys=["y"])  # shapes from the constant
    assert c.input_keys == () and c.output_keys == ("r",)
    p = c.randomize_params()
    np.testing.assert_allclose(c.evaluate(p)["r"],
                               np.maximum(x @ p["linear.weight"].T + p["linear.bias"], 0))
    assert set(c.evaluate_gradients(p, None, {"r": np.ones((3, 2))})) == set(p)
    c = ml.compile(m, b, shapes={"x": [3, 2]}, data_keys=["x"], jit=False)
    assert c.input_keys == ("x",)
    for kw, match in (({"constant_keys": {"r": 1.0}}, "not an input"), ({"data_keys": ["q"]}, "not an input"),
                      ({"discard_keys": ["x"]}, "not an output")):
        with pytest.raises(ml.KeyMismatchError, match=match):
            ml.compile(m, b, shapes={"x": [3, 2]}, **kw)
