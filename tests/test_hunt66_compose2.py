"""Composition and compile edge cases found by the sixty-sixth session's second compile-layer
hunt, each checked against torch on the NumPy, torch and JAX backends (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
from mithril.models import Buffer, Embedding, IOKey, Linear, Model

BACKENDS = [pytest.param(lambda: NumpyBackend(dtype="float64"), id="numpy"),
            pytest.param(lambda: TorchBackend(dtype="float64"), id="torch"),
            pytest.param(lambda: JaxBackend(dtype="float64"), id="jax")]


def _np(b, x):
    return np.asarray(b.to_numpy(x))


def _embedding_through(how: str) -> Model:
    m = Model()
    if how == "buffer":
        m |= Buffer().connect(input="idx", output="t")
        m |= Embedding(5, 2).connect(input="t", output="e")
    elif how == "reshape":
        m |= Embedding(5, 2).connect(input=IOKey("idx").reshape((3,)), output="e")
    else:
        m |= Embedding(5, 2).connect(input=IOKey("idx")[1:], output="e")
    return m


@pytest.mark.parametrize("make", BACKENDS)
@pytest.mark.parametrize("how", ["buffer", "reshape", "slice"])
def test_a_trainable_key_reaching_an_integer_input_through_moves_is_refused(make, how):
    # trainable_keys=["idx"] was refused only where 'idx' fed the Embedding directly: through a
    # Buffer, a Reshape or a slice it compiled, drew float "indices" and then failed inside the
    # run (an IndexError for index 0 of 5 embeddings); torch refuses requires_grad on integers
    with pytest.raises(RuntimeError, match="floating point"):
        torch.tensor([0, 1, 4]).requires_grad_()
    b = make()
    n = 4 if how == "slice" else 3
    with pytest.raises(TypeError, match=r"'idx' feeds the integer input\(s\) \['embedding.input'\]"):
        ml.compile(_embedding_through(how), b, shapes={"idx": [n]}, trainable_keys=["idx"])
    # as data (integers) it is torch's F.embedding, with its weight gradient
    c = ml.compile(_embedding_through(how), b, shapes={"idx": [n]})
    params = c.randomize_params()
    idx = np.array([4, 0, 2, 0])[:n]
    used = idx[1:] if how == "slice" else idx
    g = np.random.default_rng(0).standard_normal((3, 2))
    out, grads = c.evaluate(params, {"idx": b.array(idx, b.int_dtype)},
                            output_gradients={"e": b.array(g)})
    tw = torch.tensor(_np(b, params["embedding.weight"]), requires_grad=True)
    ty = F.embedding(torch.tensor(used), tw)
    (tg,) = torch.autograd.grad((ty * torch.tensor(g)).sum(), [tw])
    np.testing.assert_allclose(_np(b, out["e"]), ty.detach().numpy(), rtol=0)
    np.testing.assert_allclose(_np(b, grads["embedding.weight"]), tg.numpy(), rtol=1e-12)


@pytest.mark.parametrize("make", BACKENDS)
def test_a_typed_input_feeding_only_a_buffer_takes_its_declared_kind(make):
    # IOKey("x", type=Tensor[int]) read only by a Buffer took float and bool data and passed
    # them on; the declaration now is the input's dtype rule, as for an Embedding index
    b = make()
    m = Model()
    m |= Buffer().connect(input=IOKey("x", type=ml.Tensor[int]), output="y")
    c = ml.compile(m, b, shapes={"x": [3]})
    for bad, name in ((np.array([1.5, 2.0, 3.0]), "float64"), (np.array([True, False, True]), "bool")):
        with pytest.raises(ml.DTypeError, match=f"input 'x': expected an integer dtype, got {name}"):
            c.evaluate({}, {"x": bad})
    x = np.array([3, -1, 7])
    out = c.evaluate({}, {"x": b.array(x, b.int_dtype)})
    np.testing.assert_array_equal(_np(b, out["y"]), torch.tensor(x).clone().numpy())
    flags = Model()
    flags |= Buffer().connect(input=IOKey("m", type=ml.Tensor[bool]), output="y")
    c = ml.compile(flags, b, shapes={"m": [2]})
    with pytest.raises(ml.DTypeError, match="input 'm': expected dtype bool, got float64"):
        c.evaluate({}, {"m": np.array([1.0, 0.0])})
    np.testing.assert_array_equal(_np(b, c.evaluate({}, {"m": np.array([True, False])})["y"]),
                                  [True, False])
    # declared int but reshaped into a Linear (which takes floats): refused at compile
    lin = Model()
    lin |= Linear(2).connect(input=IOKey("x", type=ml.Tensor[int]).reshape((2, 3)), output="y")
    with pytest.raises(TypeError, match=r"'x' is declared Tensor\[int\], but it reaches float"):
        ml.compile(lin, b, shapes={"x": [6]})


@pytest.mark.parametrize("make", BACKENDS)
@pytest.mark.parametrize("symbol", ["//", "%"])
def test_a_shape_expression_dividing_by_an_empty_dimension(make, symbol):
    # x.reshape((x.shape[1] // x.shape[0], -1)) with 0 rows was a bare ZeroDivisionError (at
    # compile for shapes [0, 6], at evaluate for [None, 6]) naming no block or key; now a
    # ShapeError naming the expression and the block
    b = make()
    op = (lambda p, q: p // q) if symbol == "//" else (lambda p, q: p % q)

    def model() -> Model:
        m = Model()
        x = IOKey("x")
        m |= Buffer().connect(input=x.reshape((op(x.shape[1], x.shape[0]), -1)), output="y")
        return m

    msg = rf"reshape \(Reshape\): .*shape\[1\] {symbol} .*shape\[0\]\).*is 0, so 6 {symbol} 0"
    with pytest.raises(ml.ShapeError, match=msg):
        ml.compile(model(), b, shapes={"x": [0, 6]})
    c = ml.compile(model(), b, shapes={"x": [None, 6]})
    with pytest.raises(ml.ShapeError, match=msg):
        c.evaluate({}, {"x": np.ones((0, 6))})
    x = np.arange(24.0).reshape(4, 6)  # (a nonzero dimension: torch's reshape)
    t = torch.tensor(x)
    want = t.reshape(op(t.shape[1], t.shape[0]), -1)
    np.testing.assert_array_equal(_np(b, c.evaluate({}, {"x": x})["y"]), want.numpy())


@pytest.mark.parametrize("make", BACKENDS)
def test_one_key_given_by_name_and_by_object(make):
    # compile(shapes={"x": [3, 4], lin.input: [3, 5]}) compiled for [3, 5] (the last entry won),
    # constant_keys the same; now refused naming both unless the values are equal;
    # trainable_keys=["x", lin.input] was "'x' is not an input" (popped twice), now one key
    b = make()
    m = Model()
    lin = Linear(2)
    m |= lin.connect(input="x", output="y")
    with pytest.raises(ml.KeyMismatchError, match=r"'x' and Linear.input both name 'x', with "
                                                  r"different values \(\[3, 4\] and \[3, 5\]\)"):
        ml.compile(m, b, shapes={"x": [3, 4], lin.input: [3, 5]})
    with pytest.raises(ml.KeyMismatchError, match=r"constant_keys.*'linear.weight' and "
                                                  "Linear.weight both name 'linear.weight'"):
        ml.compile(m, b, shapes={"x": [3, 4]},
                   constant_keys={"linear.weight": np.ones((2, 4)), lin.weight: np.zeros((2, 4))})
    rng = np.random.default_rng(1)
    w = rng.standard_normal((2, 4))
    c = ml.compile(m, b, shapes={"x": [3, 4], lin.input: (3, 4)}, trainable_keys=["x", lin.input],
                   constant_keys={"linear.weight": w, lin.weight: w.copy()})
    assert list(c.parameter_shapes) == ["x", "linear.bias"]
    x, bias, g = rng.standard_normal((3, 4)), rng.standard_normal(2), rng.standard_normal((3, 2))
    out, grads = c.evaluate({"x": b.array(x), "linear.bias": b.array(bias)},
                            output_gradients={"y": b.array(g)})
    tx, tb = torch.tensor(x, requires_grad=True), torch.tensor(bias, requires_grad=True)
    ty = F.linear(tx, torch.tensor(w), tb)
    gx, gb = torch.autograd.grad((ty * torch.tensor(g)).sum(), [tx, tb])
    np.testing.assert_allclose(_np(b, out["y"]), ty.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(_np(b, grads["x"]), gx.numpy(), rtol=1e-12)
    np.testing.assert_allclose(_np(b, grads["linear.bias"]), gb.numpy(), rtol=1e-12)
