"""The failures the graph fuzzer (:mod:`tests.test_graph_fuzz`) found, each minimised and named.

Every case runs on NumPy, torch and JAX (float32 here: JAX's float64 is process-global) and
checks the numbers against NumPy's own semantics written out by hand.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BACKENDS

import mithril as ml
from mithril.models import Buffer, IOKey, Model

# -- Indexer: an int and an index array apart ---------------------------------------------------
# NumPy reads an int as an index array when the index holds one (a list or a mask), and puts
# the result axes first when a slice, None or ``...`` separates them: x[0, :, [1]] of a
# (2, 3, 2) array is (1, 3). torch selects the int first and gave (3, 1): a different shape
# from NumPy's and JAX's, for the shape the compiler inferred (found as x[0, :, [True]] of a
# (1, 3, 1) input).
INDICES = {
    "int_slice_mask": (0, slice(None), [True, False]),
    "int_slice_list": (1, slice(None), [1, 0, 1]),
    "slice_int_none_list": (slice(None), 1, None, [0, 0]),
    "int_none_reversed_mask": (0, None, slice(None, None, -1), [True, True]),
    "list_slice_int": ([1, 0], slice(None), -1),
}


@pytest.mark.parametrize("backend_name", list(BACKENDS))
@pytest.mark.parametrize("case", list(INDICES))
def test_indexer_ints_apart_from_index_arrays_follow_numpy(case, backend_name):
    index = INDICES[case]
    b = BACKENDS[backend_name](dtype="float32")
    m = Model()
    m |= Buffer()(input=IOKey("x")[index] * 2.0, output="y")
    c = ml.compile(m, b, shapes={"x": [2, 3, 2]}, trainable_keys=["x"])
    x = np.arange(12, dtype=np.float32).reshape(2, 3, 2)
    want = x[index] * 2
    assert tuple(c.get_shapes()["y"]) == want.shape
    cot = np.arange(1, want.size + 1, dtype=np.float32).reshape(want.shape)
    out, grads = c.evaluate({"x": b.array(x)}, {}, output_gradients={"y": b.array(cot)})
    want_grad = np.zeros_like(x)
    np.add.at(want_grad, index, 2 * cot)  # (repeats add up)
    np.testing.assert_array_equal(b.to_numpy(out["y"]), want)
    np.testing.assert_array_equal(b.to_numpy(grads["x"]), want_grad)


# -- Max / Min over an empty axis ------------------------------------------------------------------
# The maximum of no values has no identity: x[1:1].max(axis=0) compiled, then raised NumPy's
# "zero-size array to reduction operation maximum", torch's IndexError from amax() and JAX's
# ValueError at evaluate. It is a ShapeError naming the block, the axis and the shape: at
# compile time for a known shape, before the run for a free dimension (naming the input).
@pytest.mark.parametrize("backend_name", list(BACKENDS))
@pytest.mark.parametrize("reduce", ["max", "min"])
def test_max_min_over_an_empty_axis_is_a_shape_error(reduce, backend_name):
    b = BACKENDS[backend_name](dtype="float32")
    m = Model()
    m |= Buffer()(input=getattr(IOKey("x")[1:1], reduce)(axis=0), output="y")
    with pytest.raises(ml.ShapeError, match=rf"{reduce.capitalize()} over axis 0 of size 0 \(shape \[0, 3\]\)"):
        ml.compile(m, b, shapes={"x": [2, 3]})
    m = Model()  # the other axis of an empty array: an empty result, as NumPy
    m |= Buffer()(input=getattr(IOKey("x")[1:1], reduce)(axis=1), output="y")
    out = ml.compile(m, b, shapes={"x": [2, 3]}).evaluate({}, {"x": b.ones(2, 3)})
    assert tuple(b.to_numpy(out["y"]).shape) == (0,)

    m = Model()  # a free dimension: refused before the run, naming the input
    m |= Buffer()(input=getattr(IOKey("d"), reduce)(axis=0), output="y")
    c = ml.compile(m, b, shapes={"d": [None, 3]})
    with pytest.raises(ml.ShapeError, match=r"of size 0 .*'input' <- 'd' \[0, 3\]"):
        c.evaluate({}, {"d": b.array(np.zeros((0, 3), np.float32))})
    d = np.array([[1.0, -2.0, 3.0], [0.5, 4.0, -1.0]], np.float32)
    want = d.max(axis=0) if reduce == "max" else d.min(axis=0)
    np.testing.assert_array_equal(b.to_numpy(c.evaluate({}, {"d": b.array(d)})["y"]), want)


# -- an array evaluate cannot convert ------------------------------------------------------------
# A torch tensor that requires grad, given to the NumPy or JAX backend, raised torch's own
# RuntimeError ("Can't call numpy() on Tensor that requires grad"), naming no key: it is taken
# as its values now (4267a511). A ragged list raised NumPy's ValueError: the library's
# TypeError naming the key, and the next correct call runs.
@pytest.mark.parametrize("backend_name", ["numpy", "jax"])
def test_an_array_that_cannot_be_converted_names_its_key(backend_name):
    import torch

    b = BACKENDS[backend_name](dtype="float32")
    m = Model()
    m |= Buffer()(input=IOKey("x") * IOKey("d"), output="y")
    c = ml.compile(m, b, shapes={"x": [2], "d": [2]}, trainable_keys=["x"])
    params = {"x": b.array(np.array([1.0, 2.0], np.float32))}
    with pytest.raises(TypeError, match=rf"input 'd': cannot make a {backend_name} array of this"):
        c.evaluate(params, {"d": [[1.0], [1.0, 2.0]]})
    # a torch tensor that requires grad is data: taken as its values (detached) on every
    # backend, as the torch backend takes it (np.asarray refused it: NumPy and JAX raised)
    d = torch.tensor([3.0, -4.0], requires_grad=True)
    got = c.evaluate(params, {"d": d})["y"]
    np.testing.assert_array_equal(b.to_numpy(got), (torch.tensor([1.0, 2.0]) * d).detach().numpy())
    out = c.evaluate(params, {"d": b.array(np.array([3.0, 4.0], np.float32))})
    np.testing.assert_array_equal(b.to_numpy(out["y"]), [3.0, 8.0])
