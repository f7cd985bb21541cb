"""Review 49, the published Mithril's gaps left by review 48, built and checked against torch
autograd in float64 on NumPy, torch and JAX: ``ManyToOne``'s output width from the loss's
target, ``Arange`` of float ends, comparisons and logic on connections (CLIP's attention
mask), ``Tensor(value)`` constants and ``Reshape`` of a ``Shape`` / ``Size`` output."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import jax_float64
from test_review_published48 import BACKENDS, _check, _run

import mithril as ml
from mithril import Tensor
from mithril.models import (
    TBD,
    Arange,
    Buffer,
    Equal,
    LogicalNot,
    ManyToOne,
    Mean,
    Model,
    PublishedLSTMCell,
    PublishedRNNCell,
    Reshape,
    Shape,
    Size,
    SquaredError,
    Sum,
    TrainModel,
    Where,
)

NAMES = ["numpy", "torch", "jax"]


def _backend(name: str, dtype: str = "float64"):
    return BACKENDS[name](dtype=dtype)


def _in_x64(name: str, fn):
    if name == "jax":
        with jax_float64():
            return fn()
    return fn()


# --- 1. ManyToOne: the output layer's width from the loss's target ------------------------------

def _many_to_one_torch(kind: str, t: dict, data: dict, steps: int) -> torch.Tensor:
    """The published cells unrolled (one length), the last step's output layer."""
    h = torch.tensor(data["initial_hidden"])
    c = torch.tensor(data["initial_cell"]) if kind == "lstm" else None
    for s in range(steps):
        x = torch.tensor(data[f"input{s}"])
        if kind == "rnn":
            h = torch.tanh(x @ t["w_ih"].T + h @ t["w_hh"].T + t["bias_h"])
            continue
        xh = torch.cat([x, h], dim=-1)
        f, i, o = (torch.sigmoid(xh @ t[f"w_{g}"].T + t[f"bias_{g}"]) for g in "fio")
        c = f * c + i * torch.tanh(xh @ t["w_c"].T + t["bias_c"])
        h = o * torch.tanh(c)
    return h @ t["w_ho" if kind == "rnn" else "w_out"].T + t["bias_o" if kind == "rnn" else "bias_out"]


_SIZES = {"rnn": dict(w_ih=(5, 3), w_hh=(5, 5), bias_h=(5,), w_ho=(2, 5), bias_o=(2,)),
          "lstm": {**{f"w_{g}": (5, 8) for g in "fico"}, **{f"bias_{g}": (5,) for g in "fico"},
                   "w_out": (2, 5), "bias_out": (2,)}}


@pytest.mark.parametrize("kind", ["rnn", "lstm"])
@pytest.mark.parametrize("name", NAMES)
def test_many_to_one_infers_its_output_width_from_the_target(name, kind):
    """examples/model_api/many_to_one_any_backend_training.py as published: the data as
    constants and no shapes; the output layer's width is the target's (as the published
    infers it through the SquaredError), every weight's shape from the data."""
    rng = np.random.default_rng(1)
    data = {"initial_hidden": rng.standard_normal((4, 1, 5)), "target": rng.standard_normal((4, 1, 2)),
            **{f"input{i}": rng.standard_normal((4, 1, 3)) for i in range(3)}}
    if kind == "lstm":
        data["initial_cell"] = rng.standard_normal((4, 1, 5))
    cell = PublishedRNNCell() if kind == "rnn" else PublishedLSTMCell()
    model = TrainModel(ManyToOne(cell, 3))
    model.add_loss(SquaredError(), input="output2", target="target", reduce_steps=[Mean()])
    params = {k: rng.standard_normal(v) * 0.5 for k, v in _SIZES[kind].items()}
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    loss = torch.mean((_many_to_one_torch(kind, t, data, 3) - torch.tensor(data["target"])) ** 2)
    loss.backward()

    def go():
        b = _backend(name)
        pm = ml.compile(model, b, constant_keys={k: b.array(v) for k, v in data.items()})
        assert pm.parameter_shapes == _SIZES[kind]
        out, grads = pm.evaluate({k: b.array(v) for k, v in params.items()}, output_gradients=True)
        return ({"final_cost": np.asarray(b.to_numpy(out["final_cost"]))},
                {k: np.asarray(b.to_numpy(v)) for k, v in grads.items()})
    _check(_in_x64(name, go), {"final_cost": loss.detach().numpy()}, t)


def test_many_to_one_width_hint_reads_a_target_of_the_outputs_rank_only():
    """A declared shape of the output layer is read first (a target that disagrees is the
    loss's shape mismatch); a loss without a target (Buffer, as the published
    test_rnn_many_to_one) still needs one."""
    shapes = {"input0": [4, 1, 3], "input1": [4, 1, 3], "initial_hidden": [4, 1, 5]}
    m = TrainModel(ManyToOne(PublishedRNNCell(), 2))
    m.add_loss(SquaredError(), input="output1", target="target", reduce_steps=[Sum()])
    with pytest.raises(ml.ShapeError, match="'input' has shape \\[4, 1, 3\\] but 'target' has "
                                            "shape \\[4, 1, 2\\]"):
        ml.compile(m, ml.NumpyBackend(), shapes={**shapes, "target": [4, 1, 2], "bias_o": [3]})
    pm = ml.compile(m, ml.NumpyBackend(), shapes={**shapes, "target": [4, 1, 7]})
    assert pm.parameter_shapes["w_ho"] == (7, 5) and pm.get_shapes()["output0"] == [4, 1, 7]
    m = TrainModel(ManyToOne(PublishedRNNCell(), 2))
    m.add_loss(Buffer(), input="output1", reduce_steps=[Sum()])
    with pytest.raises(ml.ShapeError, match="cannot infer the shape of parameter 'w_ho'"):
        ml.compile(m, ml.NumpyBackend(), shapes=shapes)


# --- 2. Arange of float ends --------------------------------------------------------------------

@pytest.mark.parametrize("ends, dtype", [
    ((0.0, 1.0, 0.1), None), ((1, 2.5, 0.5), None), ((3.0, -1.0, -0.7), None),
    ((0.5, 3.0, 1.0), "int64"), ((0, 7, 2), "float64"), ((0.0, 1.0, 0.3), "float32"),
    ((2.0, 1.0, 0.5), None),  # (empty: stop below start for a positive step)
])
@pytest.mark.parametrize("name", NAMES)
def test_float_arange_is_torch_arange(name, ends, dtype):
    """Length ceil((stop − start) / step) (NumPy's and torch's) and values start + i·step
    in float64 (NumPy's and torch's differ from it in the last bits); the dtype is the model's float dtype (or
    dtype=), int64 for integer ends. An empty range is NumPy's (torch refuses it)."""
    def go():
        b = _backend(name)
        model = Model()
        model |= Arange(*ends, dtype=dtype).connect(output="output")
        out = b.to_numpy(ml.compile(model, b).evaluate({})["output"])
        if dtype == "float32" and name == "numpy":  # (the NumPy backend gives floats in its dtype)
            out = out.astype(np.float32)
        return out
    want_dtype = {None: torch.int64 if all(isinstance(e, int) for e in ends) else torch.float64,
                  "int64": torch.int64, "float64": torch.float64, "float32": torch.float32}[dtype]
    got = _in_x64(name, go)
    if ends[1] < ends[0] and ends[2] > 0:
        assert got.shape == np.arange(*ends).shape == (0,)
        with pytest.raises(RuntimeError, match="inconsistent with step sign"):
            torch.arange(*ends, dtype=want_dtype)
        return
    want = torch.arange(*ends, dtype=want_dtype).numpy()
    assert got.dtype == want.dtype and got.shape == np.arange(*ends).shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 if dtype == "float32" else 1e-14)


@pytest.mark.parametrize("name", NAMES)
def test_float_arange_takes_the_models_float32(name):
    b = _backend(name, "float32")
    model = Model()
    model |= Arange(0.0, 1.0, 0.1).connect(output="output")
    out = b.to_numpy(ml.compile(model, b).evaluate({})["output"])
    want = torch.arange(0.0, 1.0, 0.1, dtype=torch.float32).numpy()
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, want, rtol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_float_arange_in_a_computation_matches_torch_autograd(name):
    """x · arange(0.25, 2, 0.5) + arange(3.0): the ranges are constants (no gradient)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 4))

    def build():
        m = Model()
        r1, r2 = Arange(0.25, 2.0, 0.5), Arange(stop=4.0)
        m |= r1
        m |= r2
        m |= Buffer().connect(input="x")
        m |= Buffer().connect(input=m.x * r1.output + r2.output, output="output")  # type: ignore
        return m
    t = {"x": torch.tensor(x, requires_grad=True)}
    want = t["x"] * torch.arange(0.25, 2.0, 0.5, dtype=torch.float64) + torch.arange(4.0, dtype=torch.float64)
    cot = rng.standard_normal((3, 4))
    (want * torch.tensor(cot)).sum().backward()
    got = _run(name, build, {"x": [3, 4]}, {"x": x}, {}, {"output": cot}, trainable_keys={"x"})
    _check(got, {"output": want.detach().numpy()}, t)


def test_arange_bad_ends_and_dtype_are_refused_and_change_nothing():
    with pytest.raises(ValueError, match="Arange: stop must be finite, got nan"):
        Arange(stop=float("nan"))
    with pytest.raises(TypeError, match="Arange: start must be an int, a float"):
        Arange(start="0")
    with pytest.raises(TypeError, match="Arange: dtype must be an integer dtype or one of"):
        Arange(stop=3, dtype="complex64")
    a = Arange(stop=3)
    with pytest.raises(TypeError, match="Arange: dtype must be"):
        a.connect(dtype="complex64", output="r")
    assert a.ends == {"start": 0, "stop": 3, "step": 1} and a.dtype is None and a.inputs == ()
    with pytest.raises(ValueError, match="Arange: step must not be 0"):
        Arange(stop=1.0, step=0.0)


# --- 3. comparisons and logic on connections -----------------------------------------------------

def build_attention_mask(n: int) -> Model:
    # synnada-ai/mithril examples/clip/model.py, as published (77 there)
    block = Model()
    block |= Arange(stop=n).connect(output="arange_out_1")
    block |= Arange(stop=n).connect(output="arange_out_2")
    upper_bool_triu = block.arange_out_1[..., None] >= block.arange_out_2[None, ...]  # type: ignore
    block |= Where().connect(
        cond=upper_bool_triu,
        input1=Tensor(0.0),
        input2=Tensor(float("-inf")),
        output="output",
    )
    block.expose_keys("output")
    return block


@pytest.mark.parametrize("name", NAMES)
def test_clip_attention_mask_as_published(name):
    def go():
        b = _backend(name)
        return b.to_numpy(ml.compile(build_attention_mask(7), b).evaluate({})["output"])
    a = torch.arange(7)
    want = torch.where(a[..., None] >= a[None, ...], 0.0, float("-inf")).double().numpy()
    np.testing.assert_array_equal(_in_x64(name, go), want)


_OPS = {
    ">": (lambda a, b: a > b), ">=": (lambda a, b: a >= b), "<": (lambda a, b: a < b),
    "<=": (lambda a, b: a <= b), "eq": (lambda a, b: a.eq(b)), "ne": (lambda a, b: a.ne(b)),
}


@pytest.mark.parametrize("op", list(_OPS))
@pytest.mark.parametrize("name", NAMES)
def test_comparisons_gate_a_where_as_torch_autograd(name, op):
    """where(x ⋚ y, x·y, −x): the comparison broadcasts, gives bools and no gradient (the
    gradients of x and y are torch's through where alone); ties included (y holds x's values)."""
    rng = np.random.default_rng(3)
    x = np.round(rng.standard_normal((3, 4)), 0)
    y = np.round(rng.standard_normal((1, 4)), 0)

    def build():
        m = Model()
        m |= Buffer().connect(input="x", output="xb")
        m |= Buffer().connect(input="y", output="yb")
        m |= Where().connect(cond=_OPS[op](m.xb, m.yb), input1=m.xb * m.yb,  # type: ignore
                             input2=-m.xb, output="output")  # type: ignore
        return m
    t = {k: torch.tensor(v, requires_grad=True) for k, v in (("x", x), ("y", y))}
    fn = {">": torch.gt, ">=": torch.ge, "<": torch.lt, "<=": torch.le, "eq": torch.eq, "ne": torch.ne}[op]
    want = torch.where(fn(t["x"], t["y"]), t["x"] * t["y"], -t["x"])
    cot = rng.standard_normal((3, 4))
    (want * torch.tensor(cot)).sum().backward()
    got = _run(name, build, {"x": [3, 4], "y": [1, 4]}, {"x": x, "y": y}, {}, {"output": cot},
               trainable_keys={"x", "y"})
    _check(got, {"output": want.detach().numpy()}, t)


@pytest.mark.parametrize("name", NAMES)
def test_logical_operators_and_number_operands_match_torch(name):
    """(x > 0) & (y < 0.5), |, ^, ~, with numbers on either side (3 < x is x > 3)."""
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((2, 5)), rng.standard_normal((2, 5))

    def go():
        b = _backend(name)
        m = Model()
        m |= Buffer().connect(input="x", output="xb")
        m |= Buffer().connect(input="y", output="yb")
        a, c = m.xb > 0, m.yb < 0.5  # type: ignore
        exprs = {"and": a & c, "or": a | c, "xor": a ^ c, "not": ~a, "rand": True & c,
                 "ror": False | c, "rcmp": 0.25 < m.xb, "eq": m.xb.eq(m.xb)}  # type: ignore
        for k, e in exprs.items():
            m |= Buffer().connect(input=e, output=k)
        out = ml.compile(m, b, shapes={"x": [2, 5], "y": [2, 5]}).evaluate(
            {}, {"x": b.array(x), "y": b.array(y)})
        return {k: b.to_numpy(v) for k, v in out.items()}
    got = _in_x64(name, go)
    tx, ty = torch.tensor(x), torch.tensor(y)
    a, c = tx > 0, ty < 0.5
    want = {"and": a & c, "or": a | c, "xor": a ^ c, "not": ~a, "rand": True & c, "ror": False | c,
            "rcmp": 0.25 < tx, "eq": tx.eq(tx)}
    for k, v in want.items():
        assert got[k].dtype == np.bool_, k
        np.testing.assert_array_equal(got[k], v.numpy(), err_msg=k)


def test_comparison_blocks_and_their_refusals():
    """The published blocks by name; a bad operand is a TypeError naming it, the model unchanged; == stays identity (dict keys)."""
    m = Model()
    m |= Equal().connect(left="a", right="b", output="same")
    m |= LogicalNot().connect(input="same", output="differ")
    b = ml.NumpyBackend(dtype="float64")
    pm = ml.compile(m, b, shapes={"a": [3], "b": [3]}, trainable_keys={"a"})
    a = np.array([1.0, 2.0, 3.0])
    out = pm.evaluate({"a": a}, {"b": np.array([1.0, 0.0, 3.0])})
    assert out["differ"].tolist() == [False, True, False]
    before = (list(m.conns), len(m.blocks))
    with pytest.raises(TypeError, match="unsupported operand for '>' with Model.a: str"):
        m.a > "x"  # type: ignore  # noqa: B015
    assert (list(m.conns), len(m.blocks)) == before
    t = m.a  # type: ignore
    assert {t: 1}[t] == 1 and (t == m.b) is False  # type: ignore
    with pytest.raises(TypeError, match=r"the truth value of \(Model.a > 0.0\) is known only when"):
        if m.a > 0.0:  # type: ignore
            pass


def test_a_cotangent_for_a_bool_or_integer_block_output_is_refused_by_name():
    """As for a Cast to bool or int (torch refuses backward into them): the comparisons'
    outputs are bool, Arange's and Size's int64; the cotangent is refused, nothing runs."""
    m = Model()
    m |= Equal().connect(left="a", right="b", output="same")
    m |= Size(dim=0).connect(input="a", output="n")
    m |= Arange(stop=3).connect(output="r")
    m |= Buffer().connect(input="a", output="acopy")
    pm = ml.compile(m, ml.NumpyBackend(dtype="float64"), shapes={"a": [3], "b": [3]},
                    trainable_keys={"a"})
    a = np.array([1.0, 2.0, 3.0])
    for key, cot in (("same", np.ones(3)), ("n", np.ones(())), ("r", np.ones(3))):
        with pytest.raises(ml.DTypeError, match=f"output '{key}' has dtype (bool|int64)"):
            pm.evaluate({"a": a}, {"b": np.ones(3)}, output_gradients={key: cot})


def test_tensor_value_is_a_constant_and_its_refusals():
    k = Tensor([1.0, 2.0])
    assert isinstance(k, ml.IOKey) and k.value.tolist() == [1.0, 2.0]
    assert Tensor() is TBD  # (the published placeholder: a tuple input's elements)
    with pytest.raises(TypeError, match="Tensor\\(\\) without a value is not offered"):
        Tensor(type=Tensor[float])
    with pytest.raises(TypeError, match="differentiable=True\\) is not offered"):
        Tensor([1.0], differentiable=True)
    with pytest.raises(TypeError, match="its type is Tensor\\[int\\]"):
        Tensor([1.5], type=Tensor[int])


# --- 4. Reshape of a Shape / Size output ---------------------------------------------------------

@pytest.mark.parametrize("how", ["shape", "size", "expression"])
@pytest.mark.parametrize("name", NAMES)
def test_reshape_to_a_shape_or_size_output_matches_torch_autograd(name, how):
    """x (6, 2) reshaped as ``like`` (3, 4): Reshape().connect(shape=Shape().output), Reshape(
    shape=Size(dim=(0, 1)).output) and x.reshape(shape.output) (published spellings)."""
    rng = np.random.default_rng(5)
    x, like = rng.standard_normal((6, 2)), rng.standard_normal((3, 4))

    def build():
        m = Model()
        m |= Buffer().connect(input="x", output="xb")
        if how == "size":
            sz = Size(dim=(0, 1))
            m |= sz.connect(input="like")
            m |= Reshape(shape=sz.output).connect(input="xb", output="r")
        else:
            sh = Shape()
            m |= sh.connect(input="like")
            if how == "shape":
                m |= Reshape().connect(input="xb", shape=sh.output, output="r")
            else:
                m |= Buffer().connect(input=m.xb.reshape(sh.output), output="r")  # type: ignore
        m |= Buffer().connect(input=m.r * m.like, output="output")  # type: ignore
        return m
    t = {"x": torch.tensor(x, requires_grad=True)}
    want = t["x"].reshape(like.shape) * torch.tensor(like)
    cot = rng.standard_normal((3, 4))
    (want * torch.tensor(cot)).sum().backward()
    got = _run(name, build, {"x": [6, 2], "like": [3, 4]}, {"x": x}, {"like": like},
               {"output": cot}, trainable_keys={"x"})
    _check(got, {"output": want.detach().numpy()}, t)


def test_reshape_to_a_value_the_run_computes_is_refused_by_name():
    m = Model()
    r = Reshape()
    m |= r.connect(input="x", shape="s", output="y")  # (a model input: the run's value)
    with pytest.raises(ml.ShapeError, match="Reshape: the value of 'shape' is computed by the run"):
        ml.compile(m, ml.NumpyBackend(), shapes={"x": [6], "s": [2]})
    m = Model()
    sh = Shape()
    m |= sh.connect(input="like")
    with pytest.raises(TypeError, match="the shape is given twice"):
        m |= Reshape(shape=(2, 3)).connect(input="x", shape=sh.output, output="y")
    assert len(m.blocks) == 1 and "y" not in m.conns


# --- 5. the published examples' small blocks: ZerosLike, Ones, BroadcastTo, ArgMax, Minimum ------

@pytest.mark.parametrize("name", NAMES)
def test_flux_upsample_broadcast_and_reshape_match_torch_autograd(name):
    """examples/flux/auto_encoder.py upsample (before its conv): x[:, :, :, None, :, None]
    broadcast to (B, C, H, 2, W, 2) by shape wires, reshaped to (B, C, 2H, 2W), then SiLU."""
    from mithril.models import BroadcastTo, SiLU
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 3, 2, 3))

    def build():
        block = Model()
        inp = ml.IOKey("input")
        shp = inp.shape
        B, C, H, W = shp[0], shp[1], shp[2], shp[3]
        block |= BroadcastTo().connect(inp[:, :, :, None, :, None], shape=(B, C, H, 2, W, 2))
        block += Reshape().connect(shape=(B, C, H * 2, W * 2))
        block += SiLU().connect(output="output")
        return block
    t = {"input": torch.tensor(x, requires_grad=True)}
    want = torch.nn.functional.silu(
        t["input"][:, :, :, None, :, None].expand(2, 3, 2, 2, 3, 2).reshape(2, 3, 4, 6))
    cot = rng.standard_normal((2, 3, 4, 6))
    (want * torch.tensor(cot)).sum().backward()
    got = _run(name, build, {"input": [2, 3, 2, 3]}, {"input": x}, {}, {"output": cot},
               trainable_keys={"input"})
    _check(got, {"output": want.detach().numpy()}, t)


@pytest.mark.parametrize("name", NAMES)
def test_minimum_maximum_argmax_zeros_like_match_torch(name):
    """Minimum / Maximum with ties (torch splits the cotangent in halves), broadcasting; the
    T5 relative-position pattern min(x, zeros_like(x)); ArgMax / ArgMin (first at ties) as
    torch.argmax / argmin, int64; Ones in the model's dtype."""
    from mithril.models import ArgMax, ArgMin, Maximum, Minimum, Ones, ZerosLike
    x = np.array([[1.0, -2.0, 3.0, 0.0], [0.0, 5.0, -1.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    y = np.array([[1.0, 0.0, 3.0, 2.0]])

    def build():
        m = Model()
        m |= Buffer().connect(input="x", output="xb")
        m |= Buffer().connect(input="y", output="yb")
        m |= Minimum().connect(left="xb", right="yb", output="mn")
        m |= Maximum().connect(left="xb", right="yb", output="mx")
        m |= ZerosLike().connect("xb", output="zeros_like")
        m |= Minimum().connect(left="xb", right="zeros_like", output="neg_part")
        m |= ArgMax(axis=-1).connect(input="xb", output="amax")
        m |= ArgMin(axis=0, keepdim=True).connect(input="xb", output="amin")
        m |= ArgMax().connect(input="xb", output="aflat")
        m |= Ones(shape=(2, m.x.shape[1])).connect(output="ones")  # type: ignore
        return m
    t = {"x": torch.tensor(x, requires_grad=True), "y": torch.tensor(y, requires_grad=True)}
    want = {"mn": torch.minimum(t["x"], t["y"]), "mx": torch.maximum(t["x"], t["y"]),
            "neg_part": torch.minimum(t["x"], torch.zeros_like(t["x"]))}
    rng = np.random.default_rng(7)
    cots = {k: rng.standard_normal((3, 4)) for k in want}
    sum((v * torch.tensor(cots[k])).sum() for k, v in want.items()).backward()
    got = _run(name, build, {"x": [3, 4], "y": [1, 4]}, {"x": x, "y": y}, {}, cots,
               trainable_keys={"x", "y"})
    _check(got, {k: v.detach().numpy() for k, v in want.items()}, t)
    out = got[0]
    tx = torch.tensor(x)
    for k, v in {"amax": tx.argmax(-1), "amin": tx.argmin(0, keepdim=True), "aflat": tx.argmax()}.items():
        assert out[k].dtype == np.int64, k
        np.testing.assert_array_equal(out[k], v.numpy(), err_msg=k)
    assert out["ones"].dtype == np.float64 and out["ones"].shape == (2, 4) and (out["ones"] == 1).all()


def test_ones_dtype_and_the_small_blocks_refusals():
    """Ones(dtype=...) in that dtype; bad shapes, dtypes and axes are refused by name and a
    refused connect leaves the block as it was; a shape that does not broadcast names both."""
    from mithril.models import ArgMax, BroadcastTo, Ones
    m = Model()
    m |= Ones(shape=(3,), dtype=ml.int64).connect(output="k")
    m |= Ones(shape=(2,)).connect(output="f")
    out = ml.compile(m, ml.TorchBackend(dtype="float32")).evaluate({})
    assert out["k"].dtype == torch.int64 and out["f"].dtype == torch.float32
    with pytest.raises(TypeError, match=r"Ones: shape must be a tuple of sizes \(ints >= 0"):
        Ones(shape=(2, -1))
    with pytest.raises(TypeError, match="Ones: dtype must be one of"):
        Ones(shape=(2,), dtype="complex64")
    with pytest.raises(TypeError, match="ArgMax: axis must be an int or None, got 1.5"):
        ArgMax(axis=1.5)  # type: ignore
    b = BroadcastTo(shape=(2, 3))
    with pytest.raises(TypeError, match="BroadcastTo: shape must be a tuple of sizes"):
        b.connect(input="x", shape="wide", output="y")
    assert b.shape == (2, 3) and b.inputs == ("input",)
    bad = Model()
    bad |= BroadcastTo(shape=(2, 3)).connect(input="x", output="y")
    with pytest.raises(ml.ShapeError, match=r"BroadcastTo: the input \[4\] does not broadcast to \[2, 3\]"):
        ml.compile(bad, ml.NumpyBackend(), shapes={"x": [4]})


# --- 6. the published tests/scripts/test_all_models.py cases of these blocks --------------------

def _published_cases():
    from mithril import models as mm
    f5 = {"left": [5.0, 0.0, 9.0, 10.0, 4.0], "right": [6.0, 0.0, 8.0, 9.0, 11.0]}
    f6 = {"left": [7.0, -123.0, 10.0, 5.0, 4.0], "right": [6.0, 7.0, 8.0, 9.0, -123.0]}
    b2 = {"left": [True, False, True, True, False], "right": [True, False, False, False, False]}
    return {  # name: (block, constant keys, expected output), as published
        "test_minimum": (mm.Minimum, f5, [5.0, 0.0, 8.0, 9.0, 4.0]),
        "test_maximum": (mm.Maximum, f5, [6.0, 0.0, 9.0, 10.0, 11.0]),
        "test_arange_1": (lambda: Arange(start=0, stop=10, step=1), {}, list(range(10))),
        "test_arange_2": (lambda: Arange(start=5, stop=10, step=2), {}, [5, 7, 9]),
        "test_greater_1": (mm.Greater, f5, [False, False, True, True, False]),
        "test_greater_2": (mm.Greater, f6, [True, False, True, False, True]),
        "test_greater_equal_1": (mm.GreaterEqual, f5, [False, True, True, True, False]),
        "test_less_1": (mm.Less, f5, [True, False, False, False, True]),
        "test_less_equal_1": (mm.LessEqual, f5, [True, True, False, False, True]),
        "test_equal_1": (mm.Equal, f5, [False, True, False, False, False]),
        "test_not_equal_1": (mm.NotEqual, f5, [True, False, True, True, True]),
        "test_logical_not": (mm.LogicalNot, {"input": [True, False, True, True, False]},
                             [False, True, False, False, True]),
        "test_logical_or": (mm.LogicalOr, b2, [True, False, True, True, False]),
        "test_logical_and": (mm.LogicalAnd, b2, [True, False, False, False, False]),
        "test_logical_xor": (mm.LogicalXOr, b2, [False, False, True, True, False]),
        "test_zeros_like": (mm.ZerosLike, {"input": [[1.0, 2.0], [3.0, 4.0]]}, [[0.0, 0.0], [0.0, 0.0]]),
        "test_ones_static_shape": (lambda: mm.Ones(shape=(2, 3)), {}, [[1.0] * 3] * 2),
    }


@pytest.mark.parametrize("case", list(_published_cases()))
@pytest.mark.parametrize("name", NAMES)
def test_published_all_models_cases(name, case):
    block, statics, want = _published_cases()[case]

    def go():
        b = _backend(name)
        pm = ml.compile(block(), b, constant_keys={k: np.asarray(v) for k, v in statics.items()},
                        inference=True)
        return b.to_numpy(pm.evaluate({})["output"])
    got = _in_x64(name, go)
    np.testing.assert_array_equal(got, np.asarray(want))
    assert got.dtype.kind == np.asarray(want).dtype.kind


@pytest.mark.parametrize("dtype", [ml.float16, ml.float32])
@pytest.mark.parametrize("name", NAMES)
def test_published_arange_static_inference_w_dtype(name, dtype):
    """test_all_models.py::test_arange_static_inference_w_dtype: integer ends, a float dtype."""
    b = BACKENDS[name](dtype=dtype)
    pm = ml.compile(Arange(start=0, stop=10, step=1, dtype=dtype), b, inference=True)
    out = b.to_numpy(pm.evaluate({})["output"])
    assert str(out.dtype) == str(dtype).rsplit(".", 1)[-1]
    np.testing.assert_array_equal(out, np.arange(10))


# --- 7. more published primitives: Floor, Clamp, IsNan, NanToNum, Squeeze, SwapAxes, AtLeast1D, Eye

@pytest.mark.parametrize("name", NAMES)
def test_more_published_primitives_match_torch_autograd(name):
    """Clamp at its ends (torch: gradient 1 there), NanToNum of NaN / ±inf (gradient where
    finite), Floor (gradient 0), Squeeze, SwapAxes, AtLeast1D and Eye against torch."""
    from mithril.models import AtLeast1D, Clamp, Eye, Floor, IsNan, NanToNum, Squeeze, SwapAxes
    x = np.array([[[-1.5, -1.0, 0.25], [1.0, 2.0, 0.5]]])  # (1, 2, 3)
    z = np.array([1.0, np.nan, np.inf, -np.inf, -2.0])
    s = np.array(1.5)

    def build():
        m = Model()
        m |= Buffer().connect(input="x", output="xb")
        m |= Buffer().connect(input="z", output="zb")
        m |= Buffer().connect(input="s", output="sb")
        m |= Clamp(min_val=-1.0, max_val=1.0).connect(input="xb", output="clamp")
        m |= Floor().connect(input=m.xb * 2.0, output="floor")  # type: ignore
        m |= Squeeze().connect(input="xb", output="squeeze")
        m |= SwapAxes(0, -1).connect(input="xb", output="swap")
        m |= NanToNum(nan=0.5, posinf=9.0).connect(input="zb", output="n2n")
        m |= IsNan().connect(input="zb", output="isnan")
        m |= AtLeast1D().connect(input=m.sb * 3.0, output="atleast")  # type: ignore
        m |= Eye(2, 3).connect(output="eye")
        return m
    t = {k: torch.tensor(v, requires_grad=True) for k, v in (("x", x), ("z", z), ("s", s))}
    want = {"clamp": torch.clamp(t["x"], -1.0, 1.0), "floor": torch.floor(t["x"] * 2.0),
            "squeeze": torch.squeeze(t["x"]), "swap": torch.swapaxes(t["x"], 0, -1),
            "n2n": torch.nan_to_num(t["z"], nan=0.5, posinf=9.0),
            "atleast": torch.atleast_1d(t["s"] * 3.0)}
    rng = np.random.default_rng(8)
    cots = {k: rng.standard_normal(tuple(v.shape)) for k, v in want.items()}
    sum((v * torch.tensor(cots[k])).sum() for k, v in want.items()).backward()
    out, grads = _run(name, build, {"x": [1, 2, 3], "z": [5], "s": []}, {"x": x, "z": z, "s": s},
                      {}, cots, trainable_keys={"x", "z", "s"})
    _check((out, grads), {k: v.detach().numpy() for k, v in want.items()}, t)
    np.testing.assert_array_equal(out["isnan"], torch.isnan(torch.tensor(z)).numpy())
    np.testing.assert_array_equal(out["eye"], torch.eye(2, 3, dtype=torch.float64).numpy())
    assert out["eye"].dtype == np.float64


def test_more_published_primitives_refuse_bad_arguments_by_name():
    from mithril.models import Clamp, Eye, NanToNum, Squeeze, SwapAxes
    with pytest.raises(ValueError, match="Clamp: give min_val, max_val or both"):
        Clamp()
    with pytest.raises(TypeError, match="Clamp: min_val must be a number or None, got '0'"):
        Clamp(min_val="0")  # type: ignore
    with pytest.raises(TypeError, match="NanToNum: nan must be a number, got None"):
        NanToNum(nan=None)  # type: ignore
    with pytest.raises(TypeError, match="SwapAxes: axis2 must be an int"):
        SwapAxes(0, 1.0)  # type: ignore
    with pytest.raises(TypeError, match="Eye: N must be an int >= 0, got -2"):
        Eye(-2)
    m = Model()
    m |= SwapAxes(0, 3).connect(input="x", output="y")
    with pytest.raises(ml.ShapeError, match="SwapAxes: axis 3 is out of range for the input's rank 2"):
        ml.compile(m, ml.NumpyBackend(), shapes={"x": [2, 3]})
    m = Model()
    m |= Squeeze().connect(input="x", output="y")
    with pytest.raises(ml.ShapeError, match="Squeeze: which axes have size 1 is not known"):
        ml.compile(m, ml.NumpyBackend(), shapes={"x": [None, 3]})
