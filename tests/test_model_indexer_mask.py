"""``Indexer`` with a constant boolean mask selects as NumPy does (it used to cast the mask
to int and read entries 0 and 1), on every backend, with its gradient."""

from __future__ import annotations

import numpy as np
import pytest

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
from mithril.models import Indexer

BACKENDS = [pytest.param(lambda: NumpyBackend(dtype="float64"), id="numpy"),
            pytest.param(lambda: TorchBackend(dtype="float64"), id="torch"),
            pytest.param(lambda: JaxBackend(dtype="float32"), id="jax")]

MASK = [True, False, True]
CASES = [
    ((slice(None), MASK), (2, 3)),
    ((slice(None), np.array(MASK)), (2, 3)),
    ((np.array([[True, False, True], [False, True, True]]),), (2, 3)),
    ((Ellipsis, MASK, slice(None, None, -1)), (2, 3, 2)),
    (([False, True],), (2, 3)),
]


@pytest.mark.parametrize("make", BACKENDS)
@pytest.mark.parametrize("index,shape", CASES)
def test_boolean_mask_selects_and_differentiates_as_numpy(make, index, shape):
    b = make()
    x = np.arange(float(np.prod(shape))).reshape(shape)
    ref_index = tuple(np.asarray(i) if isinstance(i, list) else i for i in index)
    want = x[ref_index]
    c = ml.compile(Indexer(index), b, shapes={"input": list(shape)}, trainable_keys=["input"])
    assert c.shapes["output"] == want.shape
    g = np.random.default_rng(0).standard_normal(want.shape)
    out, grads = c.evaluate({"input": b.array(x)}, {}, output_gradients={"output": b.array(g)})
    np.testing.assert_allclose(b.to_numpy(out["output"]), want, rtol=1e-6)
    want_g = np.zeros_like(x)
    np.add.at(want_g, ref_index, g)
    np.testing.assert_allclose(b.to_numpy(grads["input"]), want_g, rtol=1e-6)


def test_a_mask_fixes_the_free_axis_it_reads():
    c = ml.compile(Indexer((slice(None), MASK)), NumpyBackend(), shapes={"input": [None, None]})
    assert c.shapes["output"] == (None, 2)
    with pytest.raises(ml.ShapeError, match="does not fit"):
        ml.compile(Indexer((slice(None), MASK)), NumpyBackend(), shapes={"input": [2, 4]})


def test_a_float_index_array_is_refused():
    with pytest.raises(TypeError, match="ints or bools"):
        Indexer(([0.5, 1.0],))


def test_a_mask_in_an_expression_indexes_as_numpy():
    from mithril.models import Buffer, Model

    m = Model()
    m |= Buffer()(input="x", output="x_copy")
    m |= Buffer()(input=m.x[:, np.array(MASK)] * 2.0, output="y")
    b = NumpyBackend(dtype="float64")
    c = ml.compile(m, b, shapes={"x": [2, 3]})
    x = np.arange(6.0).reshape(2, 3)
    np.testing.assert_allclose(c.evaluate({}, {"x": x})["y"], x[:, np.array(MASK)] * 2.0)
    with pytest.raises(TypeError, match="unsupported index True"):
        _ = m.x[True]
