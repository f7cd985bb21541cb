"""Review iokey48: ``IOKey("q").shape`` is, as published, the shape wire of the connection the
key names (``examples/clip/model.py``: ``queries = IOKey("queries"); B, L = queries.shape[0],
queries.shape[1]``), while ``IOKey(name, shape=[...])`` still declares a shape (kept as
``value_shape``, the published attribute). The published CLIP attention block runs on NumPy,
JAX and torch in float64 against torch autograd; declarations, reprs and errors read as
before, and a call that raises changes nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import jax_float64
from test_review_published48 import multi_head_attention  # (the published CLIP attention)

import mithril as ml
from mithril.errors import ShapeError
from mithril.models import Buffer, IOKey, Linear, Model
from mithril.models.connections import IOKey as ConnectionsIOKey
from mithril.models.model import IOKey as ModelIOKey

BACKENDS = {"numpy": ml.NumpyBackend, "torch": ml.TorchBackend, "jax": ml.JaxBackend}
TOL = dict(rtol=1e-10, atol=1e-12)


def _torch_attention(x, t, B, L, d, h):
    p = F.linear(torch.tensor(x), t["in_proj.weight"], t["in_proj.bias"])
    p = p.reshape(B, L, 3, -1).reshape(1, B, L, 3, d).permute(3, 1, 2, 0, 4).reshape(3, B, L, -1)
    q, k, v = (p[i].reshape(B, L, h, d // h).permute(1, 2, 0, 3) for i in range(3))
    att = F.scaled_dot_product_attention(q, k, v)
    out = F.linear(att.permute(2, 0, 1, 3).reshape(B * L, d), t["out_proj.weight"], t["out_proj.bias"])
    return out.reshape(B, L, d), att


def _evaluate(name, shapes, params, x, cots):
    b = BACKENDS[name](dtype="float64")
    pm = ml.compile(multi_head_attention(6, 2), b, shapes=shapes)
    out, grads = pm.evaluate({k: b.array(v) for k, v in params.items()}, {"queries": b.array(x)},
                             output_gradients={k: b.array(v) for k, v in cots.items()})
    return ({k: np.asarray(b.to_numpy(v)) for k, v in out.items()},
            {k: np.asarray(b.to_numpy(v)) for k, v in grads.items()})


@pytest.mark.parametrize("free_batch", [False, True])
@pytest.mark.parametrize("name", list(BACKENDS))
def test_published_clip_attention_with_iokey_shape_matches_torch(name, free_batch):
    """Outputs and every parameter gradient against torch autograd, float64; with the batch
    and length free at compile time too (``queries.shape[0]`` is then read per call)."""
    rng = np.random.default_rng(4)
    B, L, d, h = 3, 4, 6, 2
    shapes = {"queries": [None, None, d] if free_batch else [B, L, d]}
    pm = ml.compile(multi_head_attention(d, h), ml.NumpyBackend(dtype="float64"), shapes=shapes)
    want_shapes = [None, None, d] if free_batch else [B, L, d]
    assert pm.get_shapes()["output"] == want_shapes
    params = {k: rng.standard_normal(v) for k, v in pm.parameter_shapes.items()}
    x = rng.standard_normal((B, L, d))
    cots = {"output": rng.standard_normal((B, L, d)), "buffer_output": rng.standard_normal((L, h, B, d // h))}
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    y, att = _torch_attention(x, t, B, L, d, h)
    (torch.sum(y * torch.tensor(cots["output"])) + torch.sum(att * torch.tensor(cots["buffer_output"]))).backward()
    if name == "jax":
        with jax_float64():
            out, grads = _evaluate(name, shapes, params, x, cots)
    else:
        out, grads = _evaluate(name, shapes, params, x, cots)
    np.testing.assert_allclose(out["output"], y.detach().numpy(), **TOL)
    np.testing.assert_allclose(out["buffer_output"], att.detach().numpy(), **TOL)
    assert set(grads) == set(t)
    for k, v in t.items():
        np.testing.assert_allclose(grads[k], v.grad.numpy(), **TOL, err_msg=k)


def test_iokey_is_one_class_at_every_import_path():
    assert ml.IOKey is IOKey is ModelIOKey is ConnectionsIOKey


def test_declared_shape_is_value_shape_and_still_declares():
    key = IOKey("x", shape=[None, 3])
    assert key.value_shape == (None, 3)
    assert IOKey("c", value=np.zeros((2, 5))).value_shape == (2, 5)
    model = Model()
    model |= Linear(4).connect(input=key, output="y")
    pm = ml.compile(model, ml.NumpyBackend(dtype="float64"), shapes={"x": [7, None]})
    assert pm.get_shapes()["x"] == [7, 3] and pm.get_shapes()["y"] == [7, 4]
    with pytest.raises(ShapeError, match="x"):
        ml.compile(model, ml.NumpyBackend(), shapes={"x": [7, 5]})


def test_iokey_shape_reads_the_connection_not_only_its_declaration():
    """The wire's value is the compiled connection's shape: a declared free entry is filled
    in by compile's shapes, an undeclared key reads whatever reaches it."""
    for key, shapes in ((IOKey("q", shape=[None, 3, 4]), {"q": [5, 3, 4]}),
                        (IOKey("q"), {"q": [5, 3, 4]})):
        model = Model()
        model |= Buffer().connect(input=key, output="copy")
        model |= Buffer().connect(input=model.copy.reshape((key.shape[0] * key.shape[1], -1)),  # type: ignore
                                  output="flat")
        pm = ml.compile(model, ml.NumpyBackend(dtype="float64"), shapes=shapes)
        assert pm.get_shapes()["flat"] == [15, 4]
        x = np.arange(60.0).reshape(5, 3, 4)
        np.testing.assert_array_equal(pm.evaluate({}, {"q": x})["flat"], x.reshape(15, 4))


def test_iokey_shape_used_before_the_key_is_connected_adds_it_as_an_input():
    """As published: a wire read off an IOKey no block takes yet makes the key an input."""
    q = IOKey("q", shape=[None, 2])
    model = Model()
    model |= Buffer().connect(input=IOKey("x").reshape((q.shape[0], -1)), output="y")
    assert set(model.input_keys) == {"x", "q"}
    pm = ml.compile(model, ml.NumpyBackend(dtype="float64"), shapes={"x": [3, 4], "q": [6, 2]})
    assert pm.get_shapes()["y"] == [6, 2]


def test_constant_iokey_shape_is_its_values_shape():
    model = Model()
    c = IOKey(value=np.ones((2, 6)))
    model |= Buffer().connect(input=IOKey("x").reshape((c.shape[1], -1)), output="y")
    pm = ml.compile(model, ml.NumpyBackend(dtype="float64"), shapes={"x": [3, 4]})
    assert pm.get_shapes()["y"] == [6, 2]


def test_repr_and_wire_text_read_well():
    assert repr(IOKey("q", shape=[2, 3])) == "IOKey('q', shape=[2, 3])"
    assert repr(IOKey("q", shape=[None, 3])) == "IOKey('q', shape=[None, 3])"
    assert repr(IOKey("q")) == "IOKey('q')"
    assert repr(IOKey()) == "IOKey()"
    assert repr(IOKey(value=2.0)) == "IOKey(value=2.0)"
    assert repr(IOKey(value=np.zeros((2, 3)))) == "IOKey(value=array[2, 3])"
    q = IOKey("q", shape=[2, 3])
    assert repr(q.shape[0] * q.shape[1]) == "(IOKey('q', shape=[2, 3]).shape[0] * IOKey('q', shape=[2, 3]).shape[1])"
    assert repr(q + 1) == "(IOKey('q', shape=[2, 3]) + 1)"  # (an int constant stays an int)
    assert repr(IOKey(value=2.0) * q) == "(2.0 * IOKey('q', shape=[2, 3]))"


def test_unnamed_iokey_shape_is_refused_by_name():
    with pytest.raises(TypeError, match=r"IOKey\(\)\.shape: an unnamed IOKey .* name it"):
        IOKey().shape  # noqa: B018
    with pytest.raises(TypeError, match=r"len\(IOKey\('q'\)\.shape\)"):
        len(IOKey("q").shape)


def test_iokey_shape_index_out_of_range_names_the_wire_at_compile():
    q = IOKey("q", shape=[2, 3])
    model = Model()
    model |= Buffer().connect(input=q.reshape((q.shape[5], -1)), output="y")
    with pytest.raises(ShapeError, match=r"IOKey\('q', shape=\[2, 3\]\)\.shape\[5\]: index 5 is "
                                         r"out of range for a shape of rank 2"):
        ml.compile(model, ml.NumpyBackend())


def test_a_raising_add_with_an_iokey_shape_changes_nothing():
    """A key whose declared shape conflicts with the model's wire is refused when the block
    reading its shape is added; the model keeps its blocks, connections and shapes."""
    model = Model()
    model |= Buffer().connect(input=IOKey("q", shape=[4, 3]), output="a")
    before = (len(model.blocks), dict(model.conns), model.conns["q"].shape, model.input_keys)
    bad = IOKey("q", shape=[5, 3])
    with pytest.raises(ShapeError, match="q"):
        model |= Buffer().connect(input=model.a.reshape((bad.shape[0], -1)), output="b")  # type: ignore
    assert (len(model.blocks), dict(model.conns), model.conns["q"].shape, model.input_keys) == before
    model |= Buffer().connect(input=model.a.reshape((IOKey("q").shape[1], -1)), output="b")  # type: ignore
    pm = ml.compile(model, ml.NumpyBackend(dtype="float64"))
    assert pm.get_shapes()["b"] == [3, 4]


def test_iokey_shape_as_a_slice_end_as_published():
    query, bias = IOKey("query"), IOKey("in_proj_bias")
    embed_dim = query.shape[2]
    model = Model()
    model |= Buffer().connect(input=query + bias[0:embed_dim], output="q")
    pm = ml.compile(model, ml.NumpyBackend(dtype="float64"),
                    shapes={"query": [2, 3, 4], "in_proj_bias": [12]})
    x, b = np.arange(24.0).reshape(2, 3, 4), np.arange(12.0)
    np.testing.assert_array_equal(pm.evaluate({}, {"query": x, "in_proj_bias": b})["q"], x + b[:4])
