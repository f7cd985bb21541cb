"""``+=`` wires the canonical output chosen with ``set_cout`` (not merely the latest block's
output), and after ``+=`` the new block's output is the model's ``cout``."""

from __future__ import annotations

import numpy as np

import mithril as ml
from mithril.backends import NumpyBackend
from mithril.models import Linear, Model, Relu


def test_iadd_wires_the_cout_chosen_with_set_cout():
    m = Model()
    m |= Linear(2)(input="x", output="a")
    m |= Linear(2)(input="x", output="b")
    m.set_cout("a")
    m += Relu()(output="r")
    assert m.cout.key == "r"  # the new block's output is now the canonical one
    c = ml.compile(m, NumpyBackend(dtype="float64"), shapes={"x": [2, 3]})
    params = c.randomize_params()
    x = np.random.default_rng(0).standard_normal((2, 3))
    out = c.evaluate(params, {"x": x})
    a = x @ params["linear_0.weight"].T + params["linear_0.bias"]
    np.testing.assert_allclose(out["r"], np.maximum(a, 0.0), rtol=1e-12)
    np.testing.assert_allclose(out["a"], a, rtol=1e-12)


def test_iadd_after_iadd_follows_the_new_cout():
    m = Model()
    m |= Linear(2)(input="x", output="a")
    m |= Linear(2)(input="x", output="b")
    m.set_cout(m.a)
    m += Relu()(output="r")
    m += Linear(1)(output="y")  # reads r, the cout after the first +=
    c = ml.compile(m, NumpyBackend(dtype="float64"), shapes={"x": [2, 3]})
    params = c.randomize_params()
    x = np.ones((2, 3))
    out = c.evaluate(params, {"x": x})
    r = np.maximum(x @ params["linear_0.weight"].T + params["linear_0.bias"], 0.0)
    np.testing.assert_allclose(out["y"], r @ params["linear_2.weight"].T + params["linear_2.bias"],
                               rtol=1e-12)
