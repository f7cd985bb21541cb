"""``compile``'s constant, data, trainable and discard keys must be disjoint sets (as in the
published Mithril): a key in two of them is a ``ValueError`` naming it and both sets."""

from __future__ import annotations

import numpy as np
import pytest

import mithril as ml
from mithril.backends import NumpyBackend
from mithril.models import Add, Linear, Model


def _model() -> Model:
    m = Model()
    m |= Linear(2)(input="x", weight="w", output="h")
    m |= Add()(left="h", right="b", output="y")
    return m


@pytest.mark.parametrize("kwargs,named", [
    ({"constant_keys": {"b": np.ones(2)}, "data_keys": ["b"]}, "'b' in constant_keys and data_keys"),
    ({"constant_keys": {"b": np.ones(2)}, "trainable_keys": ["b"]},
     "'b' in constant_keys and trainable_keys"),
    ({"data_keys": ["w"], "trainable_keys": ["w"]}, "'w' in data_keys and trainable_keys"),
    ({"data_keys": ["b"], "trainable_keys": ["b"], "constant_keys": {"b": 1.0}},
     "'b' in constant_keys and data_keys and trainable_keys"),
    ({"trainable_keys": ["h"], "discard_keys": ["h"]}, "'h' in trainable_keys and discard_keys"),
])
def test_overlapping_key_sets_are_refused(kwargs, named):
    with pytest.raises(ValueError, match="must be disjoint") as e:
        ml.compile(_model(), NumpyBackend(), shapes={"x": [1, 3]}, **kwargs)
    assert named in str(e.value)


def test_disjoint_sets_compile_and_evaluate():
    b = NumpyBackend(dtype="float64")
    c = ml.compile(_model(), b, shapes={"x": [1, 3]}, constant_keys={"b": np.full(2, 0.5)},
                   data_keys=["w"], discard_keys=["h"])
    p = c.randomize_params()
    w = np.arange(6.0).reshape(2, 3)
    out = c.evaluate(p, {"x": np.ones((1, 3)), "w": w})
    np.testing.assert_allclose(out["y"], np.ones((1, 3)) @ w.T + p["linear.bias"] + 0.5)
    assert "h" not in out
