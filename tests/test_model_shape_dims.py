"""Declared shape dimensions are ints, ``None`` or symbolic names (free dimensions): a float,
bool or numeric string is a ``TypeError`` naming the key, not rounded or coerced."""

from __future__ import annotations

import numpy as np
import pytest

import mithril as ml
from mithril.backends import NumpyBackend
from mithril.models import IOKey, Linear, Model


@pytest.mark.parametrize("dim", [2.7, 2.0, "2", True, np.float64(2.0), b"N", "2N"])
def test_non_integer_dimensions_are_refused_naming_the_key(dim):
    with pytest.raises(TypeError, match="shape of 'input'"):
        ml.compile(Linear(2), NumpyBackend(), shapes={"input": [dim, 3]})
    with pytest.raises(TypeError, match="shape of 'x'"):
        IOKey("x", shape=[dim, 3])
    m = Model()
    m |= Linear(2)(input="input", output="y")
    with pytest.raises(TypeError, match="shape of 'input'"):
        m.set_shapes(input=[dim, 3])


def test_a_symbolic_name_is_a_free_dimension():
    m = Model()
    m |= Linear(2)(input=IOKey("x", shape=["N", 3]), output="y")
    b = NumpyBackend(dtype="float64")
    c = ml.compile(m, b, shapes={"x": ["batch", 3]})
    assert c.shapes["x"] == (None, 3) and c.shapes["y"] == (None, 2)
    p = c.randomize_params()
    for n in (1, 4):
        x = np.ones((n, 3))
        np.testing.assert_allclose(c.evaluate(p, {"x": x})["y"],
                                   x @ p["linear.weight"].T + p["linear.bias"])


def test_numpy_integers_are_dimensions():
    c = ml.compile(Linear(2), NumpyBackend(), shapes={"input": [np.int64(4), np.int32(3)]})
    assert c.shapes["input"] == (4, 3)
