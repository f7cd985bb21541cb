"""The published segformer encoder (``examples/segformer/segformer_encoder.py``, verbatim in
:mod:`test_published_functional_segformer`): its dwconv, mix-FFN, layer (sequence reduction 2)
and the whole encoder (two stages) on NumPy, torch and JAX (jitted) in float64, outputs and
gradients against a torch.nn.functional reference written here (HF ``SegformerEncoder``'s
arithmetic) with the same weights. Their reshapes take ``height`` / ``width`` connections: a
``Size`` output of the patch embeddings (through ``Buffer`` s and sub-model boundaries) or an
integer constant, known at compile time (``mithril.models.size_values``)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import evaluate_np, jax_float64
from test_published_functional_segformer import BACKENDS, F64, SRC, published

import mithril as ml
from mithril.models import Buffer, IOKey, Model, Reshape, Shape, Tensor

RNG = np.random.default_rng(5120)
CONFIG = SimpleNamespace(num_encoder_blocks=2, patch_sizes=[7, 3], strides=[4, 2],
                         hidden_sizes=[8, 12], num_attention_heads=[1, 2], depths=[1, 2],
                         sr_ratios=[2, 1], mlp_ratios=[2, 2], reshape_last_stage=True)

# the published encoder returns its stages' outputs as a ToTuple output, which Model.create
# does not take yet (test_the_published_encoder_builds_with_its_tuple_output): here each is
# an output of its own, the rest verbatim
_TUPLE = '''    hidden_states_tuple = ToTuple(n=num_encoder_blocks)(*all_hidden_states)
    return Model.create(
        name=name, output=hidden_states, hidden_states=hidden_states_tuple
    )'''
_EACH = '''    return Model.create(name=name, output=hidden_states, **{
        f"hidden_states_{i}": h for i, h in enumerate(all_hidden_states[:-1])})'''


def encoder_with_each_stage_an_output() -> dict:
    assert _TUPLE in SRC
    namespace: dict = {}
    exec(compile(SRC.replace("from mithril.framework import IOKey, Tensor",  # noqa: S102
                             "from mithril.models import IOKey, Tensor").replace(_TUPLE, _EACH),
                 "segformer_encoder.py", "exec"), namespace)
    return namespace


# -- the torch reference (nn.functional, HF SegformerEncoder's arithmetic) --------------------
def _dwconv(t: dict, p: str, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, n, c = x.shape
    y = x.transpose(1, 2).reshape(b, c, h, w)
    y = F.conv2d(y, t[f"{p}.dwconv.weight"], t[f"{p}.dwconv.bias"], padding=1, groups=c)
    return y.flatten(2).transpose(1, 2)


def _mixffn(t: dict, p: str, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    y = F.linear(x, t[f"{p}.dense1.weight"], t[f"{p}.dense1.bias"])
    y = F.gelu(_dwconv(t, f"{p}.dwconv", y, h, w))
    return F.linear(y, t[f"{p}.dense2.weight"], t[f"{p}.dense2.bias"])


def _ln(t: dict, p: str, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], t[f"{p}.weight"], t[f"{p}.bias"], 1e-5)


def _attention(t: dict, p: str, x: torch.Tensor, h: int, w: int, heads: int,
               sr: int) -> torch.Tensor:
    b, n, c = x.shape
    s = f"{p}.self"

    def split(z: torch.Tensor) -> torch.Tensor:
        return z.reshape(b, -1, heads, c // heads).transpose(1, 2)

    q = split(F.linear(x, t[f"{s}.query.weight"], t[f"{s}.query.bias"]))
    kv = x
    if sr > 1:
        kv = x.transpose(1, 2).reshape(b, c, h, w)
        kv = F.conv2d(kv, t[f"{s}.sr.weight"], t[f"{s}.sr.bias"], stride=sr)
        kv = _ln(t, f"{s}.layer_norm", kv.reshape(b, c, -1).transpose(1, 2))
    k = split(F.linear(kv, t[f"{s}.key.weight"], t[f"{s}.key.bias"]))
    v = split(F.linear(kv, t[f"{s}.value.weight"], t[f"{s}.value.bias"]))
    probs = torch.softmax(q @ k.transpose(-1, -2) / (c // heads) ** 0.5, dim=-1)
    ctx = (probs @ v).transpose(1, 2).reshape(b, n, c)
    return F.linear(ctx, t[f"{p}.output.dense.weight"], t[f"{p}.output.dense.bias"])


def _layer(t: dict, p: str, x: torch.Tensor, h: int, w: int, heads: int, sr: int) -> torch.Tensor:
    x = _attention(t, f"{p}.attention", _ln(t, f"{p}.layer_norm_1", x), h, w, heads, sr) + x
    return _mixffn(t, f"{p}.mlp", _ln(t, f"{p}.layer_norm_2", x), h, w) + x


def _encoder(t: dict, x: torch.Tensor, cfg: SimpleNamespace) -> list[torch.Tensor]:
    outs = []
    for i in range(cfg.num_encoder_blocks):
        e = F.conv2d(x, t[f"patch_embeddings_{i}.proj.weight"], t[f"patch_embeddings_{i}.proj.bias"],
                     stride=cfg.strides[i], padding=cfg.patch_sizes[i] // 2)
        h, w = e.shape[2:]
        x = _ln(t, f"patch_embeddings_{i}.layer_norm", e.flatten(2).transpose(1, 2))
        for j in range(cfg.depths[i]):
            x = _layer(t, f"block_{i}.{j}", x, h, w, cfg.num_attention_heads[i], cfg.sr_ratios[i])
        x = _ln(t, f"layer_norm_{i}", x)
        x = x.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2)
        outs.append(x)
    return outs


def _params(model, shapes: dict, constants: dict | None = None) -> dict:
    pm = ml.compile(model, ml.NumpyBackend(dtype="float64"), shapes=shapes,
                    constant_keys=constants)
    return {k: RNG.standard_normal(v) * (0.3 if len(v) > 1 else 0.1) + (len(v) == 1 and
            k.endswith("weight")) for k, v in pm.parameter_shapes.items()}


def _compare(name: str, model, shapes: dict, data: dict, params: dict, outs: dict,
             t: dict, constants: dict | None = None, jit: bool = True) -> None:
    """``model`` on backend ``name`` (JAX jitted unless not ``jit``) against the torch outputs ``outs`` and the
    gradients torch's autograd left in ``t`` (the cotangents were ``cot`` below)."""
    cot = {k: RNG.standard_normal(v.shape) for k, v in outs.items()}
    torch.autograd.backward([v for v in outs.values()], [torch.tensor(cot[k]) for k in outs])

    def go():
        b = BACKENDS[name](dtype="float64")
        pm = ml.compile(model, b, shapes=shapes, constant_keys=constants, jit=jit)
        return evaluate_np(pm, b, params, data, cot)

    got_out, grads = _run_in(name, go)
    for k, v in outs.items():
        np.testing.assert_allclose(got_out[k], v.detach().numpy(), **F64, err_msg=k)
    assert set(grads) == set(t)
    for k, v in t.items():
        np.testing.assert_allclose(grads[k], v.grad.numpy(), **F64, err_msg=k)


def _run_in(name: str, go):
    if name == "jax":
        with jax_float64():
            return go()
    return go()


@pytest.mark.parametrize("name", list(BACKENDS))
def test_segformer_dwconv_with_constant_sizes_matches_torch(name):
    """The dwconv alone: ``height`` / ``width`` its inputs, given as integer constants
    (JAX not jitted: test_constant_sizes_under_jax_jit)."""
    model = published()["segformer_dwconv"](6, name="dwconv")
    shapes, consts = {"input": [2, 12, 6]}, {"height": 4, "width": 3}
    params = _params(model, shapes, consts)
    x = RNG.standard_normal((2, 12, 6))
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    want = {"output": _dwconv({f"dwconv.{k}": v for k, v in t.items()}, "dwconv",
                              torch.tensor(x), 4, 3)}
    _compare(name, model, shapes, {"input": x}, params, want, t, consts, jit=name != "jax")


def test_constant_sizes_under_jax_jit():
    model = published()["segformer_dwconv"](6, name="dwconv")
    with jax_float64():
        b = ml.JaxBackend(dtype="float64")
        pm = ml.compile(model, b, shapes={"input": [2, 12, 6]}, jit=True,
                        constant_keys={"height": 4, "width": 3})
        params = {k: b.array(np.ones(v)) for k, v in pm.parameter_shapes.items()}
        pm.evaluate(params, {"input": b.array(np.ones((2, 12, 6)))})


@pytest.mark.parametrize("name", list(BACKENDS))
def test_segformer_layer_with_sequence_reduction_matches_torch(name):
    """A layer (attention with sequence reduction 2: its reshape by ``Buffer()(input=height)``,
    the mix-FFN's dwconv), ``height`` / ``width`` given by a parent as ``x.shape[2]`` /
    ``x.shape[3]`` of a 4-d input (Size outputs)."""
    layer = published()["segformer_layer"](8, 2, 2, 2, name="0")
    image = IOKey("image", type=Tensor[float])
    out = layer(input=IOKey("input"), height=image.shape[2], width=image.shape[3])
    model = Model.create(output=out)
    shapes = {"input": [2, 12, 8], "image": [2, 1, 4, 3]}
    params = _params(model, shapes)
    x, img = RNG.standard_normal((2, 12, 8)), np.zeros((2, 1, 4, 3))
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    want = {"output": _layer(t, "0", torch.tensor(x), 4, 3, 2, 2)}
    _compare(name, model, shapes, {"input": x, "image": img}, params, want, t)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_segformer_encoder_matches_torch(name):
    """The whole encoder: two stages (sequence reduction 2 then 1, depths 1 and 2), each
    stage's reshape back to (B, C, H, W) by the patch embeddings' ``height`` / ``width``."""
    model = encoder_with_each_stage_an_output()["segformer_encoder"](CONFIG, name="encoder")
    assert model.output_keys == ("output", "hidden_states_0")
    shapes = {"input": [2, 3, 16, 12]}
    params = _params(model, shapes)
    x = RNG.standard_normal((2, 3, 16, 12))
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    h0, h1 = _encoder(t, torch.tensor(x), CONFIG)
    assert tuple(h0.shape) == (2, 8, 4, 3) and tuple(h1.shape) == (2, 12, 2, 2)
    _compare(name, model, shapes, {"input": x}, params, {"output": h1, "hidden_states_0": h0}, t)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_the_published_encoder_builds_with_its_tuple_output(name):
    """The published encoder verbatim: its ``hidden_states`` ToTuple output is one output of
    a call (``last, hs = encoder(input=x)``, as published) and, compiled, its elements
    ``hidden_states_0`` .. (before: "output hidden_states (ToTuple(...).output) is computed
    by no block")."""
    model = published()["segformer_encoder"](CONFIG, name="encoder")
    assert model.output_keys == ("output", "hidden_states_0", "hidden_states_1")
    last, hs = model(input=IOKey("input"))
    outer = Model.create(first=hs[0], output=last)
    shapes = {"input": [2, 3, 16, 12]}
    params = _params(model, shapes)
    x = RNG.standard_normal((2, 3, 16, 12))
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    h0, h1 = _encoder(t, torch.tensor(x), CONFIG)
    _compare(name, model, shapes, {"input": x}, params,
             {"output": h1, "hidden_states_0": h0, "hidden_states_1": h1}, t)
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    h0, h1 = _encoder(t, torch.tensor(x), CONFIG)
    _compare(name, outer, shapes, {"input": x}, {f"encoder.{k}": v for k, v in params.items()},
             {"output": h1, "first": h0}, {f"encoder.{k}": v for k, v in t.items()})


def test_a_list_output_of_a_created_model_is_refused_clearly():
    from mithril.models import Relu, ToTuple

    x = IOKey("x")
    a, b = Relu()(input=x), Relu()(input=x)
    with pytest.raises(TypeError, match=r"Model.create: ToTuple\(...\).output is a tuple: a list "
                                        r"output is given by name"):
        Model.create(ToTuple(2)(a, b))
    with pytest.raises(ValueError, match=r"Model.create\(hs=...\): its elements are outputs "
                                         r"\['hs_0', 'hs_1'\], but 'hs_1' names another"):
        Model.create(hs=ToTuple(2)(a, b), hs_1=IOKey("hs_1") * 2)
    with pytest.raises(ValueError, match=r"Model.create\(hs_1=...\): 'hs_1' names another"):
        Model.create(hs=ToTuple(2)(a, b), hs_1=a)
    assert a.home is None and b.home is None
    m = Model.create(hs=ToTuple(2)(a, b), hs_2=a)
    assert m.output_keys == ("hs_0", "hs_1", "hs_2")
    assert len(m(x="x")) == 2 and [o.key for o in m(x="x")] == ["hs", "hs_2"]
    with pytest.raises(ValueError, match="'hs_1' is an element of the tuple 'hs'"):
        m.rename_key("hs_1", "z")
    assert m.output_keys == ("hs_0", "hs_1", "hs_2")


# -- Reshape's sizes given by connections (mithril.models.size_values) -------------------------
def _mixed_model() -> Model:
    """``y = x.reshape((B, h, -1, w))`` and ``z = x.reshape((s, -1))``: ``B`` a shape wire,
    ``h`` / ``w`` an image's ``Size`` outputs handed through a sub-model's ``Buffer`` and its
    boundary, ``s`` a ``Shape`` output (1-d: its sizes spliced in)."""
    inner_x, inner_h = IOKey("x", type=Tensor[float]), IOKey("h")
    h = Buffer()(input=Buffer()(input=inner_h))
    inner = Model.create(y=inner_x.reshape((inner_x.shape[0], h, -1, IOKey("w"))), h_out=h)
    x, img = IOKey("x", type=Tensor[float]), IOKey("img", type=Tensor[float])
    y, h_out = inner(x=x, h=img.shape[2], w=img.shape[3])
    s = Shape()(input=img.transpose(axes=(0, 1, 3, 2)))
    return Model.create(y=y, z=x.reshape((s, -1)), h=h_out)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_reshape_sizes_by_connections_match_torch(name):
    model = _mixed_model()
    shapes = {"x": [2, 24], "img": [2, 1, 4, 3]}
    pm = ml.compile(model, ml.NumpyBackend(dtype="float64"), shapes=shapes, trainable_keys={"x"})
    assert pm.program.output_shape("y") == (2, 4, 2, 3)
    assert pm.program.output_shape("z") == (2, 1, 3, 4, 2)
    x = RNG.standard_normal((2, 24))
    tx = torch.tensor(x, requires_grad=True)
    outs = {"y": tx.reshape(2, 4, -1, 3), "z": tx.reshape(2, 1, 3, 4, -1)}
    cot = {k: RNG.standard_normal(v.shape) for k, v in outs.items()}
    torch.autograd.backward(list(outs.values()), [torch.tensor(cot[k]) for k in outs])

    def go():
        b = BACKENDS[name](dtype="float64")
        pm = ml.compile(model, b, shapes=shapes, trainable_keys={"x"}, jit=True)
        return evaluate_np(pm, b, {"x": x}, {"img": np.zeros((2, 1, 4, 3))}, cot)

    got, grads = _run_in(name, go)
    for k, v in outs.items():
        np.testing.assert_array_equal(got[k], v.detach().numpy(), err_msg=k)
    assert int(got["h"]) == 4 and set(grads) == {"x"}
    np.testing.assert_array_equal(grads["x"], tx.grad.numpy())


def test_a_size_the_run_computes_is_refused_by_name_and_changes_nothing():
    """``h`` a data input: a ShapeError naming the size and what to give; the model is as it
    was (the same model compiles once ``h`` is a constant, with the right numbers)."""
    m = Model()
    m |= Buffer().connect(input=IOKey("x").reshape((IOKey("x").shape[0], IOKey("h"), -1)),
                          output="y")
    keys = (m.input_keys, m.output_keys)
    b = ml.NumpyBackend(dtype="float64")
    with pytest.raises(ml.ShapeError, match=r"size 1 of the shape, IOKey\('h'\), is a connection "
                       r"whose value is computed by the run.*Size / Shape output.*integer "
                       r"constant.*compile\(constant_keys=...\)"):
        ml.compile(m, b, shapes={"x": [2, 6]})
    assert (m.input_keys, m.output_keys) == keys
    x = RNG.standard_normal((2, 6))
    pm = ml.compile(m, b, shapes={"x": [2, 6]}, constant_keys={"h": 3}, inference=True)
    np.testing.assert_array_equal(pm.evaluate({}, {"x": x})["y"], x.reshape(2, 3, -1))
    with pytest.raises(ml.ShapeError, match=r"size 1 of the shape, IOKey\('h'\), is -3, a size "
                       "below -1"):
        ml.compile(m, b, shapes={"x": [2, 6]}, constant_keys={"h": -3})
    with pytest.raises(ml.ShapeError, match=r"cannot reshape \[2, 6\] into \[2, 4, -1\]"):
        ml.compile(m, b, shapes={"x": [2, 6]}, constant_keys={"h": 4})


def test_reshape_connect_with_connection_sizes_and_a_bad_size():
    """``Reshape()(input=x, shape=(B, h, -1))`` as the published connect; a size that is
    neither an int, a shape wire nor a connection is a TypeError, the block unchanged."""
    r = Reshape()
    with pytest.raises(TypeError, match=r"Reshape: a size is an int, -1, None or a shape wire "
                       r"\(or a connection whose value is known at compile time\), got 'h'"):
        r.connect(input="x", shape=(2, "h"))
    assert r.shape is None and r.inputs == ("input",)
    with pytest.raises(TypeError):  # torch refuses a float size too (once truncated to 1 here)
        torch.zeros(6).reshape(2, 1.5)
    with pytest.raises(TypeError, match="got 1.5"):
        Reshape((2, 1.5))
    m = Model()
    m |= r.connect(input="x", shape=(IOKey("x").shape[0], IOKey("h"), -1), output="y")
    assert repr(r) == "Reshape([IOKey('x').shape[0], IOKey('h'), -1])"
    assert m.input_keys == ("x", "h")
    pm = ml.compile(m, ml.NumpyBackend(dtype="float64"), shapes={"x": [2, 6]},
                    constant_keys={"h": 2}, inference=True)
    assert pm.program.output_shape("y") == (2, 2, 3)
