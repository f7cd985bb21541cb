"""``Linear()`` without a dimension, as the published Mithril's (its LSTM cell and kernelized
SVM build theirs so): the width is the first axis of the weight, else of the bias, when
either is a connection whose shape the compiler knows (``compile(shapes=...)``, an
``IOKey(shape=...)``). Outputs and gradients against ``torch.nn.functional.linear`` on three
backends; a width that nothing gives is refused at compile, naming the block."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import evaluate_np, jax_float64

import mithril as ml
from mithril.models import IOKey, Linear, Model

BACKENDS = {"numpy": ml.NumpyBackend, "torch": ml.TorchBackend, "jax": ml.JaxBackend}
TOL = dict(rtol=0, atol=1e-12)


def _case(bias: bool):
    rng = np.random.default_rng(7)
    params = {"w": rng.normal(size=(3, 4))}
    if bias:
        params["b"] = rng.normal(size=3)
    return params, rng.normal(size=(5, 4)), rng.normal(size=(5, 3))


def _torch(params, x, cot):
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    xt = torch.tensor(x)
    y = F.linear(xt, t["w"], t.get("b"))
    y.backward(torch.tensor(cot))
    return y.detach().numpy(), {k: v.grad.numpy() for k, v in t.items()}


def _run(name, model, shapes, params, x, cot):
    def go():
        b = BACKENDS[name](dtype="float64")
        c = ml.compile(model, b, shapes=shapes)
        return c, evaluate_np(c, b, params, {"input": x}, {"output": cot})

    if name == "jax":
        with jax_float64():
            return go()
    return go()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", list(BACKENDS))
def test_width_from_the_weights_shape_equals_torch(name, bias):
    params, x, cot = _case(bias)
    m = Model()
    m |= Linear(use_bias=bias).connect(input="input", weight="w", **({"bias": "b"} if bias else {}),
                                      output=IOKey("output"))
    c, (out, grads) = _run(name, m, {"input": [5, 4], "w": [3, 4]}, params, x, cot)
    assert c.parameter_shapes == {k: v.shape for k, v in params.items()}
    assert c.get_shapes()["output"] == [5, 3]
    want, want_grads = _torch(params, x, cot)
    np.testing.assert_allclose(out["output"], want, **TOL)
    assert set(grads) == set(want_grads)
    for k, g in want_grads.items():
        np.testing.assert_allclose(grads[k], g, **TOL, err_msg=k)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_width_from_the_bias_and_a_declared_iokey_shape(name):
    # the weight's shape follows from the bias's width and the input's last axis
    params, x, cot = _case(True)
    m = Model()
    m |= Linear().connect(input="input", weight="w", bias=IOKey("b", shape=[3]),
                          output=IOKey("output"))
    c, (out, grads) = _run(name, m, {"input": [5, 4]}, params, x, cot)
    assert c.parameter_shapes == {"w": (3, 4), "b": (3,)}
    want, want_grads = _torch(params, x, cot)
    np.testing.assert_allclose(out["output"], want, **TOL)
    for k, g in want_grads.items():
        np.testing.assert_allclose(grads[k], g, **TOL, err_msg=k)


def test_the_published_call_style_trains_like_torch():
    # Linear()(input=..., weight=...) inside Model.create, a few SGD steps against torch
    from mithril.utils.optimizers import SGD

    x_in = IOKey("input")
    out = Linear()(input=x_in, weight=IOKey("w", shape=[2, 4]), bias=IOKey("b"))
    m = Model.create(output=out)
    b = ml.NumpyBackend(dtype="float64")
    c = ml.compile(m, b, shapes={"input": [6, 4]})
    assert c.parameter_shapes == {"w": (2, 4), "b": (2,)}
    rng = np.random.default_rng(3)
    params = {"w": rng.normal(size=(2, 4)), "b": rng.normal(size=2)}
    tw = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    opt, topt = SGD(learning_rate=0.1), torch.optim.SGD(tw.values(), lr=0.1)
    state = opt.init(params)
    for _ in range(3):
        x, cot = rng.normal(size=(6, 4)), rng.normal(size=(6, 2))
        _, grads = c.evaluate(params, {"input": x}, output_gradients={"output": cot})
        params, state = opt.update(params, grads, state)
        topt.zero_grad()
        F.linear(torch.tensor(x), tw["w"], tw["b"]).backward(torch.tensor(cot))
        topt.step()
    for k in params:
        np.testing.assert_allclose(params[k], tw[k].detach().numpy(), **TOL, err_msg=k)


def test_a_width_nothing_gives_is_refused_naming_the_block():
    m = Model()
    m |= Linear().connect(input="input", output=IOKey("output"))
    with pytest.raises(ml.ShapeError, match=r"Linear\(\) has no dimension.*weight"):
        ml.compile(m, ml.NumpyBackend(), shapes={"input": [5, 4]})
    m = Model()
    m |= Linear().connect(input="input", weight="w", output=IOKey("output"))
    with pytest.raises(ml.ShapeError, match=r"Linear\(\) has no dimension, and the shape "
                                            r"of its weight connection is unknown"):
        ml.compile(m, ml.NumpyBackend(), shapes={"input": [5, 4]})


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "3"])
def test_a_given_dimension_must_still_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="dimension must be a positive int or None"):
        Linear(bad)
