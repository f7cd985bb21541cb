"""Composition and compile edge cases found by the sixty-sixth session's hunt, each checked
against torch autograd on the NumPy, torch and JAX backends (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
from mithril.models import Embedding, IOKey, Linear, Model

BACKENDS = [pytest.param(lambda: NumpyBackend(dtype="float64"), id="numpy"),
            pytest.param(lambda: TorchBackend(dtype="float64"), id="torch"),
            pytest.param(lambda: JaxBackend(dtype="float64"), id="jax")]


def _np(b, x):
    return np.asarray(b.to_numpy(x))


@pytest.mark.parametrize("make", BACKENDS)
@pytest.mark.parametrize("named", [False, True])
def test_a_constant_weight_gives_the_free_input_width(make, named):
    # a constant Linear weight whose input width is not declared used to be refused at
    # compile ("a constant of shape [2, 3] does not broadcast to the parameter's shape
    # [2, None]"): its shape gives the width, as the published Mithril infers it
    b = make()
    m = Model()
    m |= Linear(2).connect(input="x", output="y", **({"weight": "w"} if named else {}))
    key = "w" if named else "linear.weight"
    rng = np.random.default_rng(0)
    w, bias = rng.standard_normal((2, 3)), rng.standard_normal(2)
    c = ml.compile(m, b, constant_keys={key: w}, shapes={"x": [None, None]})
    assert list(c.parameter_shapes) == ["linear.bias"]
    for n in (4, 1):
        x, g = rng.standard_normal((n, 3)), rng.standard_normal((n, 2))
        out, grads = c.evaluate({"linear.bias": b.array(bias)}, {"x": b.array(x)},
                                output_gradients={"y": b.array(g)})
        tb = torch.tensor(bias, requires_grad=True)
        ty = F.linear(torch.tensor(x), torch.tensor(w), tb)
        (tg,) = torch.autograd.grad((ty * torch.tensor(g)).sum(), [tb])
        np.testing.assert_allclose(_np(b, out["y"]), ty.detach().numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(_np(b, grads["linear.bias"]), tg.numpy(), rtol=1e-12)
    with pytest.raises(ml.ShapeError, match=r"'x' \[4, 5\]"):  # another width: named, before a run
        c.evaluate({"linear.bias": b.array(bias)}, {"x": b.ones(4, 5)})


@pytest.mark.parametrize("make", BACKENDS)
def test_a_data_weight_of_another_input_width_is_a_shape_error(make):
    # a data weight against an input of another width reached the backend's matmul (NumPy's
    # ValueError, torch's RuntimeError, JAX's TypeError), naming no key
    b = make()
    m = Model()
    m |= Linear(2).connect(input="x", weight="w", output="y")
    c = ml.compile(m, b, data_keys={"w"})
    rng = np.random.default_rng(1)
    x, w, g = rng.standard_normal((4, 3)), rng.standard_normal((2, 3)), rng.standard_normal((4, 2))
    params = {"linear.bias": b.zeros(2)}
    out, grads = c.evaluate(params, {"x": b.array(x), "w": b.array(w)},
                            output_gradients={"y": b.array(g)})
    np.testing.assert_allclose(_np(b, out["y"]), x @ w.T, rtol=1e-12)
    np.testing.assert_allclose(_np(b, grads["linear.bias"]), g.sum(0), rtol=1e-12)
    with pytest.raises(ml.ShapeError, match=r"'w' has shape \[2, 3\].*linear.weight.*\[2, 5\]"):
        c.evaluate(params, {"x": b.ones(4, 5), "w": b.array(w)})


@pytest.mark.parametrize("make", BACKENDS)
def test_a_trainable_key_feeding_an_integer_input_is_refused_at_compile(make):
    # trainable_keys=["idx"] on an Embedding index compiled, drew float "indices" and then
    # ran garbage (torch indexed by truncated floats) or failed inside the backend; torch
    # refuses requires_grad on an integer tensor, as set_differentiability(idx=True) is here
    from mithril.models import Buffer

    with pytest.raises(RuntimeError, match="floating point"):
        torch.tensor([0, 1, 4]).requires_grad_()
    b = make()
    m = Model()
    m |= Embedding(num_embeddings=5, dim=2).connect(input="idx", output="e")
    with pytest.raises(TypeError, match=r"'idx' feeds the integer input\(s\) \['embedding.input'\]"):
        ml.compile(m, b, shapes={"idx": [3]}, trainable_keys=["idx"])
    typed = Model()
    typed |= Buffer().connect(input=IOKey("x", type=ml.Tensor[int]), output="y")
    with pytest.raises(TypeError, match=r"'x' is declared Tensor\[int\]"):
        ml.compile(typed, b, shapes={"x": [3]}, trainable_keys=["x"])
    # the float weight of the same model is trainable and equals torch's gradient
    c = ml.compile(m, b, shapes={"idx": [3]})
    params = c.randomize_params()
    idx, g = np.array([0, 4, 0]), np.random.default_rng(2).standard_normal((3, 2))
    _, grads = c.evaluate(params, {"idx": b.array(idx, b.int_dtype)},
                          output_gradients={"e": b.array(g)})
    tw = torch.tensor(_np(b, params["embedding.weight"]), requires_grad=True)
    (tg,) = torch.autograd.grad((F.embedding(torch.tensor(idx), tw) * torch.tensor(g)).sum(), [tw])
    np.testing.assert_allclose(_np(b, grads["embedding.weight"]), tg.numpy(), rtol=1e-12)


@pytest.mark.parametrize("make", BACKENDS)
def test_a_mask_the_model_computes_is_refused_as_an_index(make):
    # x[x > 1.0] was taken as integer indexing: compile said shape [3, 4, 4], torch then
    # indexed rows 0 and 1 (the mask cast to int64: silently not torch's x[mask]), NumPy
    # and JAX raised an IndexError; torch's x[mask] selects as many elements as
    # the mask holds, a shape a compiled program cannot know
    from mithril.models import Buffer, Where

    b = make()
    xv = np.array([[0.5, 2.0, 1.5, -1.0], [3.0, 0.0, 1.0, 1.2], [0.1, 0.2, 0.3, 4.0]])
    assert torch.tensor(xv)[torch.tensor(xv) > 1.0].shape == (5,)
    m = Model()
    x = IOKey("x", shape=[3, 4])
    m |= Buffer().connect(input=x[x > 1.0], output="out")
    with pytest.raises(TypeError, match=r"gather_indexer.index0.*'greater.output' is the bool output"):
        ml.compile(m, b)
    emb = Model()
    emb |= Embedding(5, 2).connect(input=IOKey("x", shape=[3]) > 0.0, output="out")
    with pytest.raises(TypeError, match=r"embedding.input \(Embedding\) takes integer indices"):
        ml.compile(emb, b)
    # what keeps the shape: Where(mask, x, 0), equal to torch's with its gradient
    keep = Model()
    x = IOKey("x", shape=[3, 4])
    keep |= Where().connect(cond=x > 1.0, input1=x, input2=ml.Tensor(0.0), output="out")
    c = ml.compile(keep, b, trainable_keys=["x"])
    g = np.random.default_rng(3).standard_normal((3, 4))
    out, grads = c.evaluate({"x": b.array(xv)}, {}, output_gradients={"out": b.array(g)})
    tx = torch.tensor(xv, requires_grad=True)
    ty = torch.where(tx > 1.0, tx, torch.zeros(()).double())
    (tg,) = torch.autograd.grad((ty * torch.tensor(g)).sum(), [tx])
    np.testing.assert_allclose(_np(b, out["out"]), ty.detach().numpy(), rtol=0)
    np.testing.assert_allclose(_np(b, grads["x"]), tg.numpy(), rtol=0)


@pytest.mark.parametrize("make", BACKENDS)
def test_an_output_gradient_of_none_or_a_bool_is_refused(make):
    # {"loss": None} for a scalar output was read as NaN (np.asarray(None, float64)): every
    # gradient NaN, no error; {"loss": True} was a cotangent of 1.0; a string for the whole
    # output_gradients was an AttributeError ('str' object has no attribute 'keys')
    from mithril.models import Mean

    b = make()
    m = Model()
    m |= Linear(2).connect(input="x", output="y")
    m |= Mean().connect(input="y", output="loss")
    c = ml.compile(m, b, shapes={"x": [3, 4]})
    params = c.randomize_params()
    x = np.random.default_rng(4).standard_normal((3, 4))
    data = {"x": b.array(x)}
    for bad in (None, True):
        with pytest.raises(TypeError, match=f"output gradient 'loss': expected an array or a number, got {bad}"):
            c.evaluate(params, data, output_gradients={"loss": bad})
    with pytest.raises(TypeError, match="must be a dict of output cotangents"):
        c.evaluate(params, data, output_gradients="loss")
    _, grads = c.evaluate(params, data, output_gradients={"loss": 2.0})
    tw = torch.tensor(_np(b, params["linear.weight"]), requires_grad=True)
    tb = torch.tensor(_np(b, params["linear.bias"]), requires_grad=True)
    loss = F.linear(torch.tensor(x), tw, tb).mean()
    gw, gb = torch.autograd.grad(loss, [tw, tb], grad_outputs=torch.tensor(2.0, dtype=torch.float64))
    np.testing.assert_allclose(_np(b, grads["linear.weight"]), gw.numpy(), rtol=1e-12)
    np.testing.assert_allclose(_np(b, grads["linear.bias"]), gb.numpy(), rtol=1e-12)


@pytest.mark.parametrize("make", BACKENDS)
def test_a_shared_weight_against_an_input_of_another_free_width(make):
    # a weight shared by name (connect(weight="w") twice) whose second input's width is free:
    # an input of another width reached the backend's matmul error; torch's F.linear refuses
    # it too, and sharing with inputs of the one width gives torch's summed gradient
    b = make()
    m = Model()
    m |= Linear(3).connect(input="x", weight="w", output="a")
    m |= Linear(3).connect(input="z", weight="w", output="b")
    c = ml.compile(m, b, shapes={"x": [2, 4], "z": [None, None]})
    params = c.randomize_params()
    rng = np.random.default_rng(5)
    x, z = rng.standard_normal((2, 4)), rng.standard_normal((5, 4))
    ga, gb = rng.standard_normal((2, 3)), rng.standard_normal((5, 3))
    _, grads = c.evaluate(params, {"x": b.array(x), "z": b.array(z)},
                          output_gradients={"a": b.array(ga), "b": b.array(gb)})
    tw = torch.tensor(_np(b, params["w"]), requires_grad=True)
    s = (F.linear(torch.tensor(x), tw) * torch.tensor(ga)).sum() + \
        (F.linear(torch.tensor(z), tw) * torch.tensor(gb)).sum()
    (tg,) = torch.autograd.grad(s, [tw])
    np.testing.assert_allclose(_np(b, grads["w"]), tg.numpy(), rtol=1e-12)
    with pytest.raises(RuntimeError):
        F.linear(torch.ones(5, 6, dtype=torch.float64), tw)
    with pytest.raises(ml.ShapeError, match=r"linear_1 \(Linear\).*'w' has shape \[3, 4\]"):
        c.evaluate(params, {"x": b.array(x), "z": b.ones(5, 6)})


FLOAT32 = [pytest.param(lambda: NumpyBackend(dtype="float32"), id="numpy"),
           pytest.param(lambda: TorchBackend(dtype="float32"), id="torch"),
           pytest.param(lambda: JaxBackend(dtype="float32"), id="jax")]


@pytest.mark.parametrize("make", FLOAT32)
def test_an_input_reshaped_into_a_linear_takes_the_float_input_rule(make):
    # an input read first by a block that moves elements (Reshape, Buffer, an indexer) was
    # taken in any dtype: a torch float64 tensor reached torch's matmul ("mat1 and mat2 must
    # have the same dtype, but got Double and Float"), int64 and float16 data were cast
    # silently on NumPy and JAX and refused by torch's matmul; fed to the Linear directly
    # they are cast (float64) or refused by name (float16, int64) on every backend
    b = make()
    m = Model()
    m |= Linear(2).connect(input=IOKey("x").reshape((2, 3)), output="y")
    c = ml.compile(m, b, shapes={"x": [6]}, trainable_keys=[])
    params = c.randomize_params()
    x = np.arange(6.0) / 7
    for given in (x, torch.tensor(x), x.astype(np.float32)):
        out, grads = c.evaluate(params, {"x": given}, output_gradients={"y": b.ones(2, 2)})
        tw = torch.tensor(_np(b, params["linear.weight"]), requires_grad=True)
        ty = F.linear(torch.tensor(x, dtype=torch.float32).reshape(2, 3), tw,
                      torch.tensor(_np(b, params["linear.bias"])))
        (tg,) = torch.autograd.grad(ty.sum(), [tw])
        assert str(out["y"].dtype).removeprefix("torch.") == "float32"
        np.testing.assert_allclose(_np(b, out["y"]), ty.detach().numpy(), rtol=1e-6)
        np.testing.assert_allclose(_np(b, grads["linear.weight"]), tg.numpy(), rtol=1e-6)
    for bad, name in ((x.astype(np.float16), "float16"), (torch.ones(6, dtype=torch.float16), "float16"),
                      (np.arange(6), "int64")):
        with pytest.raises(ml.DTypeError, match=f"input 'x': expected dtype float32, got {name}"):
            c.evaluate(params, {"x": bad})



@pytest.mark.parametrize("make", BACKENDS)
def test_a_float_constant_for_an_integer_input_is_refused_at_compile(make):
    # constant_keys={"i": [0.0, 3.0]} for an Embedding index compiled: NumPy then raised
    # IndexError and JAX a TypeError at the run, torch indexed by the truncated floats; data of
    # that dtype is a DTypeError ("expected an integer dtype"), as torch's F.embedding refuses
    # float indices
    b = make()
    with pytest.raises(RuntimeError):
        F.embedding(torch.tensor([0.0, 3.0]), torch.ones(4, 2))
    m = Model()
    m |= Embedding(4, 2).connect(input="i", output="y")
    for bad, name in ((np.array([0.0, 3.0]), "float64"), (np.array([True, False]), "bool")):
        with pytest.raises(ml.DTypeError, match=f"constant 'i': it feeds integer inputs.*got {name}"):
            ml.compile(m, b, constant_keys={"i": bad})
    idx = np.array([3, 0, 3])
    c = ml.compile(m, b, constant_keys={"i": idx})
    params = c.randomize_params()
    g = np.random.default_rng(6).standard_normal((3, 2))
    out, grads = c.evaluate(params, output_gradients={"y": b.array(g)})
    tw = torch.tensor(_np(b, params["embedding.weight"]), requires_grad=True)
    ty = F.embedding(torch.tensor(idx), tw)
    (tg,) = torch.autograd.grad((ty * torch.tensor(g)).sum(), [tw])
    np.testing.assert_allclose(_np(b, out["y"]), ty.detach().numpy(), rtol=0)
    np.testing.assert_allclose(_np(b, grads["embedding.weight"]), tg.numpy(), rtol=1e-12)
