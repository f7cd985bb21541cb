"""Review 49b (continued): the published ToTensor / Item, Slice into Indexer, Layer and the
scalar IOKey types, against torch in float64 on NumPy, torch and JAX (the published tests'
programs, ported)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_review_published48 import BACKENDS, _check, _run
from test_review_published49b import NAMES, _in_x64

import mithril as ml
from mithril import IOKey
from mithril.models import Buffer, Linear, Log, Model, Multiply

# --- ToTensor / Item (scalar_blocks.py) -----------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_published_shape_to_tensor_chain_and_item(name):
    """tests/scripts/test_constant_inputs.py's Shape() -> ToTensor() (then arithmetic, an int
    constant kept int), ToTensor([1, 2, 3]) as an int tensor, ToTensor(dtype=...) and Item's
    value and gradient against torch's `x.reshape(())`."""
    from mithril.models import Item, Multiply, Shape, ToTensor

    def go():
        b = BACKENDS[name](dtype="float64")
        model = Model()
        model += Shape().connect(input="input")
        model += ToTensor()
        model += Multiply().connect(right=2, output="output")
        pm = ml.compile(model, b, shapes={"input": [8, 5]}, inference=True)
        shp = pm.evaluate({}, {"input": b.ones(8, 5)})["output"]
        m = Model()
        m |= ToTensor([1, 2, 3]).connect(output="t")
        m |= ToTensor(dtype=ml.int32).connect(input=[1.7, 2.2], output="i")
        m |= Item().connect(input="x", output="it")
        m |= Buffer().connect(input=m.it * IOKey("w", differentiable=True), output="y")  # type: ignore
        m.expose_keys("t", "i", "y")
        pm = ml.compile(m, b, shapes={"x": [1, 1, 1], "w": [3]}, trainable_keys={"x"})
        out, grads = pm.evaluate({"x": b.array(np.full((1, 1, 1), 2.5)), "w": b.array([1., 2., 4.])},
                                 output_gradients={"y": b.array([1., -1., 0.5])})
        return ({k: np.asarray(b.to_numpy(v)) for k, v in {"shape": shp, **out}.items()},
                {k: np.asarray(b.to_numpy(v)) for k, v in grads.items()})
    out, grads = _in_x64(name, go)
    assert out["shape"].dtype.kind == "i" and out["t"].dtype.kind == "i" and out["i"].dtype == np.int32
    np.testing.assert_array_equal(out["shape"], [16, 10])
    np.testing.assert_array_equal(out["t"], [1, 2, 3])
    np.testing.assert_array_equal(out["i"], torch.tensor([1.7, 2.2]).to(torch.int32).numpy())
    tx = torch.full((1, 1, 1), 2.5, dtype=torch.float64, requires_grad=True)
    tw = torch.tensor([1., 2., 4.], dtype=torch.float64, requires_grad=True)
    y = tx.reshape(()) * tw
    (y * torch.tensor([1., -1., 0.5], dtype=torch.float64)).sum().backward()
    np.testing.assert_allclose(out["y"], y.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(grads["x"], tx.grad.numpy(), rtol=1e-12)
    np.testing.assert_allclose(grads["w"], tw.grad.numpy(), rtol=1e-12)


def test_item_of_several_elements_and_a_bad_to_tensor_are_refused_by_name():
    from mithril.models import Item, ToTensor

    m = Model()
    m |= Item().connect(input="x", output="y")
    with pytest.raises(ml.ShapeError, match=r"Item: 'input' has shape \[2, 3\], not one element"):
        ml.compile(m, ml.NumpyBackend(), shapes={"x": [2, 3]})
    with pytest.raises(TypeError, match="ToTensor: input must be a number"):
        ToTensor({"a": 1})
    t = ToTensor()
    with pytest.raises(ValueError, match="Cast: dtype must be one of"):
        t.connect(input="x", dtype="complex64")
    assert t.dtype is None


def test_numpy_keeps_an_output_cast_to_float64_in_a_float32_model():
    """NumPy returned every float output in the model's dtype, a ``Cast`` to float64
    included (torch and JAX keep it); now kept, and so are gradients through it."""
    m = Model()
    m |= Buffer().connect(input=IOKey("x").cast(ml.float64), output="y")
    pm = ml.compile(m, ml.NumpyBackend(), shapes={"x": [2]}, inference=True)
    assert pm.evaluate({}, {"x": np.ones(2, np.float32)})["y"].dtype == np.float64


def test_connection_tensor_and_item_methods_and_scalar_iokey_types():
    """`conn.tensor()` / `conn.item()` as published (ToTensor / Item); IOKey(type=int) is an
    int array's connection (T5's query_length), refused where a float one is needed."""
    m = Model()
    x = IOKey("x")
    m |= Buffer().connect(input=x.sum().item() * x[0].tensor(), output="y")  # type: ignore
    pm = ml.compile(m, ml.NumpyBackend(dtype="float64"), shapes={"x": [3, 2]}, inference=True)
    xv = np.arange(6.0).reshape(3, 2)
    np.testing.assert_allclose(pm.evaluate({}, {"x": xv})["y"], xv.sum() * xv[0], rtol=1e-15)
    bad = Model()
    bad |= Buffer().connect(input=IOKey("n", type=int), output="c")
    with pytest.raises(TypeError, match="'n' is declared Tensor\\[int\\], but it feeds Multiply.left"):
        bad |= Multiply().connect(left="n", right="z", output="output")
    assert len(bad.blocks) == 1
    with pytest.raises(TypeError, match="IOKey 'n': type=<class 'tuple'> is not offered"):
        IOKey("n", type=tuple)


def test_numpy_log_of_zero_and_a_cast_of_inf_are_silent_as_torch():
    """The T5 buckets take log(0) on the diagonal and cast its -inf to int16 (not picked by
    the Where): torch and JAX are silent, NumPy warned at every evaluate. Log's values and
    gradient at 0, -1 and 2 equal torch's."""
    import warnings

    m = Model()
    m |= Log().connect(input="x", output="y")
    m |= Buffer().connect(input=m.y.cast(ml.int16), output="i")  # type: ignore
    m.expose_keys("y", "i")
    pm = ml.compile(m, ml.NumpyBackend(dtype="float64"), shapes={"x": [3]}, trainable_keys={"x"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, grads = pm.evaluate({"x": np.array([0.0, -1.0, 2.0])},
                                 output_gradients={"y": np.ones(3)})
    tx = torch.tensor([0.0, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    ty = torch.log(tx)
    ty.sum().backward()
    np.testing.assert_array_equal(out["y"], ty.detach().numpy())
    np.testing.assert_array_equal(grads["x"], tx.grad.numpy())
    assert out["i"][2] == 0 and out["i"].dtype == np.int16


# --- Slice -> Indexer().connect(index=...) --------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_published_slice_into_indexer(name):
    """tests/scripts/test_all_models.py's test_tensor_item_with_slice_1 (Slice(0, 1) then
    Indexer().connect(index=slice.output)) and a Slice whose ends are set in connect, one a
    shape wire, with a negative step: values and gradients equal torch's."""
    from mithril.models import Indexer, Slice

    def build():
        model = Model()
        s1 = Slice(start=0, stop=1, step=None)
        model |= s1
        model |= Indexer().connect(input="input", index=s1.output, output=IOKey("output"))
        s2 = Slice(step=None)
        model |= s2.connect(start=IOKey("input").shape[0] - 1, stop=None, step=-2)
        model |= Indexer().connect("input", s2.output, output=IOKey("rev"))
        return model
    x = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    cots = {"output": np.array([[5.0, 6.0]]), "rev": np.array([[1.0, -1.0], [2.0, 0.5]])}
    got = _run(name, build, {"input": [3, 2]}, {"input": x}, {}, cots, trainable_keys={"input"})
    tx = torch.tensor(x, requires_grad=True)
    out, rev = tx[0:1], torch.flip(tx, [0])[0::2]
    ((out * torch.tensor(cots["output"])).sum() + (rev * torch.tensor(cots["rev"])).sum()).backward()
    _check(got, {"output": out.detach().numpy(), "rev": rev.detach().numpy()}, {"input": tx})


def test_indexer_without_an_index_and_bad_slices_are_refused_by_name():
    from mithril.models import Indexer, Slice

    m = Model()
    with pytest.raises(TypeError, match="Indexer: no index given"):
        m |= Indexer().connect(input="x", output="y")
    lin = Linear(2)
    m |= lin.connect(input="x", output="h")
    ix = Indexer()
    with pytest.raises(TypeError, match=r"Indexer.connect\(index=Linear.output\): an index is static"):
        m |= ix.connect(input="h", index=lin.output, output="y")
    assert ix.index is ml.TBD and len(m.blocks) == 1
    with pytest.raises(TypeError, match="Indexer: the index is given twice"):
        Indexer(0).connect(input="x", index=1)
    with pytest.raises(ValueError, match="Slice: step must not be 0"):
        Slice(0, 3, 0)
    s = Slice(0, 3)
    with pytest.raises(TypeError, match="Slice: stop must be an int, None or a shape wire"):
        s.connect(stop=2.5)
    assert (s.start, s.stop, s.step) == (0, 3, None)


# --- Layer (blocks.py), the published tests/scripts/test_scripts.py composite -----------------------

@pytest.mark.parametrize("name", NAMES)
def test_published_layer_composite_with_a_regularized_pattern(name):
    """test_composite_1_extend_from_inputs (the second of its two builds): two Layers, a
    probs CrossEntropy, and L2 with coef=Tensor(0.1) on re.compile(r"weight\\d") (the
    Layers' weights, named by their connections: before, the pattern matched no parameter and
    coef=Tensor(...) was refused). Loss and gradients equal torch autograd's."""
    import re

    from mithril import Tensor
    from mithril.models import L2, CrossEntropy, Layer, Mean, Sigmoid, Softmax, TrainModel

    def build():
        model = Model()
        layer1 = Layer(dimension=3, activation=Sigmoid())
        layer2 = Layer(dimension=2, activation=Softmax())
        model |= layer1.connect(weight="weight0", bias="bias0", input="input")
        model |= layer2.connect(input=layer1.output, weight="weight1", bias="bias1",
                                output="output")
        model.expose_keys("output")
        context = TrainModel(model)
        context.add_loss(CrossEntropy(input_type="probs"), [Mean()], target="target",
                         input="output")
        context.add_regularization(model=L2(), coef=Tensor(1e-1), input=re.compile(r"weight\d"))
        return context
    params = {"weight0": np.array([[1.0], [2], [3]]), "bias0": np.array([-2.0, -3, 0]),
              "weight1": np.array([[-1.0, 0, 1], [-2, 0, 2]]), "bias1": np.array([-5.0, 5])}
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    h = torch.sigmoid(torch.tensor([[1.0]], dtype=torch.float64) @ t["weight0"].T + t["bias0"])
    p = torch.softmax(h @ t["weight1"].T + t["bias1"], dim=-1)
    loss = -torch.log(p[0, 0]) + 0.1 * 0.5 * (t["weight0"].square().sum()
                                               + t["weight1"].square().sum())
    loss.backward()

    def go():
        b = BACKENDS[name](dtype="float64")
        pm = ml.compile(build(), b, constant_keys={"input": b.array(np.array([[1.0]])),
                                                    "target": b.array(np.array([0]))})
        out, grads = pm.evaluate({k: b.array(v) for k, v in params.items()},
                                 output_gradients=True)
        return ({k: np.asarray(b.to_numpy(v)) for k, v in out.items()},
                {k: np.asarray(b.to_numpy(v)) for k, v in grads.items()})
    _check(_in_x64(name, go), {"final_cost": loss.detach().numpy(),
                               "output": p.detach().numpy()}, t)
