"""Gaps found auditing the published Mithril model API (issue #13), each fixed and pinned
here with numbers: ``evaluate(data=...)`` and without params, prediction without labels,
``get_shapes``, ``summary`` that prints or returns, the input dtype rule, ``cin`` / ``cout``
on operators (the published ResNet example), and the top-level type names."""

from __future__ import annotations

import numpy as np
import pytest

import mithril as ml
from mithril.models import (
    Add,
    Convolution2D,
    Linear,
    Mean,
    Model,
    Relu,
    SquaredError,
    TrainModel,
)


def n(b, x):
    return np.asarray(b.to_numpy(x))


def _linear(b, **kw):
    m = Model()
    m |= Linear(2).connect(input="x", output="y")
    return ml.compile(m, b, shapes={"x": [3, 4]}, **kw)


def test_top_level_names():
    import mithril.backends
    import mithril.types

    assert (ml.int16, ml.int32, ml.int64, ml.bool) == ("int16", "int32", "int64", "bool")
    assert ml.DataType is mithril.types.DataType
    assert ml.Backend[ml.DataType] is ml.Backend  # annotations of the published examples
    assert mithril.backends.TorchBackend is ml.TorchBackend
    assert "bool" not in ml.__all__  # `from mithril import *` leaves the builtin alone
    b = ml.NumpyBackend()
    assert b.dtype_name(b.randint(0, 3, 4, dtype=ml.int32)) == "int32"


def test_evaluate_takes_data_keyword_and_no_params(backend):
    c = _linear(backend)
    p = c.randomize_params()
    x = np.arange(12.0).reshape(3, 4)
    by_pos = c.evaluate(p, {"x": x})["y"]
    by_kw = c.evaluate(p, data={"x": x})["y"]
    np.testing.assert_array_equal(n(backend, by_pos), n(backend, by_kw))
    w, bias = n(backend, p["linear.weight"]), n(backend, p["linear.bias"])
    np.testing.assert_allclose(n(backend, by_kw), x @ w.T + bias, rtol=1e-5)
    grads = c.evaluate_gradients(p, data={"x": x}, output_gradients={"y": backend.ones(3, 2)})
    np.testing.assert_allclose(n(backend, grads["linear.bias"]), [3.0, 3.0])
    with pytest.raises(TypeError, match="inputs or as data="):
        c.evaluate(p, {"x": x}, data={"x": x})
    m = Model()
    m |= Relu().connect(input="x", output="y")
    c = ml.compile(m, backend, shapes={"x": [3]})
    np.testing.assert_array_equal(n(backend, c.evaluate(data={"x": [-1.0, 0.0, 2.0]})["y"]), [0, 0, 2])


def test_prediction_without_labels(backend):
    tm = TrainModel(Linear(2))
    tm.add_loss(SquaredError(), reduce_steps=[Mean()], input="output", target="target")
    c = ml.compile(tm, backend, shapes={"input": [4, 3], "target": [4, 2]})
    p = c.randomize_params()
    x = np.arange(12.0).reshape(4, 3)
    pred = c.evaluate(p, {"input": x})
    assert set(pred) == {"output"}  # final_cost needs the target: left out
    full = c.evaluate(p, {"input": x, "target": np.zeros((4, 2))})
    np.testing.assert_allclose(n(backend, pred["output"]), n(backend, full["output"]), rtol=1e-6)
    np.testing.assert_allclose(float(n(backend, full["final_cost"])),
                               np.mean(n(backend, full["output"]) ** 2), rtol=1e-5)
    with pytest.raises(ml.KeyMismatchError, match=r"\['final_cost'\] need the inputs \['target'\]"):
        c.evaluate(p, {"input": x}, output_gradients=True)
    with pytest.raises(ml.KeyMismatchError, match=r"missing key\(s\) \['input'\]"):
        c.evaluate(p, {"target": np.zeros((4, 2))})  # no output can be computed
    # the same again (cached part of the program), gradients of what is computed
    _, g = c.evaluate(p, {"input": x}, output_gradients={"output": backend.ones(4, 2)})
    np.testing.assert_allclose(n(backend, g["linear.weight"]), np.tile(x.sum(0), (2, 1)), rtol=1e-5)


def test_get_shapes_and_summary_print_or_return(capsys):
    m = Model()
    m |= Linear(8).connect(input="x")
    m += Relu()
    m += Linear(2).connect(output="y")
    c = ml.compile(m, ml.NumpyBackend(), shapes={"x": [None, 4]})
    # "output": Relu's, left unnamed (a terminal under its default name, see the compat page)
    assert c.get_shapes() == {"x": [None, 4], "output": [None, 8], "y": [None, 2], "linear_0.weight": [8, 4],
                              "linear_0.bias": [8], "linear_1.weight": [2, 8], "linear_1.bias": [2]}
    assert c.summary() is None  # printed, not returned
    printed = capsys.readouterr().out
    text = c.summary(print_info=False)  # returned, not printed
    assert capsys.readouterr().out == "" and printed == text + "\n"
    assert "total parameters: 58" in text
    rows = [ln.split() for ln in text.splitlines()[2:5]]
    assert rows[0] == ["linear_0", "(Linear)", "[None,", "8]", "40"]
    short = c.summary(shapes=False, print_fn=None, name="mlp").splitlines()
    assert short[0] == "mlp" and short[1].split() == ["layer", "parameters"]
    nested = Model()
    nested |= m.connect(x="x", y="out")
    nested += Linear(1)
    c2 = ml.compile(nested, ml.NumpyBackend(), shapes={"x": [None, 4]})
    rows = [ln.split() for ln in c2.summary(depth=1, print_info=False).splitlines()[2:4]]
    assert rows == [["model", "(block)", "[None,", "2]", "58"], ["linear", "(Linear)", "[None,", "1]", "3"]]
    with pytest.raises(ValueError, match="depth"):
        c2.summary(depth=0)


@pytest.mark.parametrize("name", ["numpy", "jax", "torch"])
def test_float64_data_is_cast_on_every_backend(name):
    cls = {"numpy": ml.NumpyBackend, "jax": ml.JaxBackend, "torch": ml.TorchBackend}[name]
    b = cls(dtype="float32")
    c = _linear(b)
    p = c.randomize_params()
    x = np.random.default_rng(0).standard_normal((3, 4))  # float64, NumPy's default
    want = x.astype(np.float32) @ n(b, p["linear.weight"]).T + n(b, p["linear.bias"])
    for data in (x, x.tolist(), b.array(x, "float32")):
        out = c.evaluate(p, {"x": data})["y"]
        assert b.dtype_name(out) == "float32"
        np.testing.assert_allclose(n(b, out), want, rtol=1e-5)
    if name != "jax":  # a float64 backend array (JAX is float32-only without x64)
        out = c.evaluate(p, {"x": cls(dtype="float64").array(x)})["y"]
        np.testing.assert_allclose(n(b, out), want, rtol=1e-5)
    # half precision data is refused on every backend, NumPy array or native
    for data in (x.astype(np.float16), b.array(x, "float16")):
        with pytest.raises(ml.DTypeError, match="input 'x': expected dtype float32, got float16"):
            c.evaluate(p, {"x": data})
    with pytest.raises(ml.DTypeError, match="got int"):
        c.evaluate(p, {"x": np.ones((3, 4), np.int32)})


def test_operator_cin_cout_build_the_published_resnet_block():
    block = Model()
    block += Convolution2D(kernel_size=3, out_channels=4, padding=1)
    model_input = block.cin
    block += Relu()
    block += Convolution2D(kernel_size=3, out_channels=4, padding=1)
    skip_in = block.cout
    down = Convolution2D(kernel_size=1, out_channels=4)
    assert down.cin.key == "input" and down.cout.key == "output"
    block |= down.connect(input=model_input)
    block |= Add().connect(left=down.cout, right=skip_in)
    block += Relu()
    b = ml.NumpyBackend(dtype="float64")
    c = ml.compile(block, b, shapes={"input": [1, 2, 5, 5]})
    p = c.randomize_params()
    x = np.random.default_rng(1).standard_normal((1, 2, 5, 5))
    key = block.cout.key  # "output_3": unnamed outputs keep default names (see the compat page)
    out = c.evaluate(p, {"input": x})[key]
    zero = {k: np.zeros_like(v) if k.startswith("convolution2_d_0") else v for k, v in p.items()}
    # with the first convolution zeroed, the block is relu(bias of conv 1 + down(x))
    got = c.evaluate(zero, {"input": x})[key]
    w, bias = p["convolution2_d_2.weight"], p["convolution2_d_2.bias"]
    skip = np.broadcast_to(p["convolution2_d_1.bias"][:, None, None], (4, 5, 5))
    down_x = np.einsum("oc,nchw->nohw", w[:, :, 0, 0], x) + bias[:, None, None]
    np.testing.assert_allclose(got, np.maximum(down_x + skip, 0), rtol=1e-12)
    assert out.shape == (1, 4, 5, 5) and (out >= 0).all()
