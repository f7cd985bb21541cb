"""Review 48: the published Mithril's shape wires (``conn.shape``, ``Shape``, ``Size``,
``Arange``, sizes given to ``Reshape``), its recurrent templates, and ``ManyToOne``'s
weights without ``shapes=``: programs of the published examples ported as they are and run
on NumPy, torch and JAX in float64, outputs and every gradient compared with torch autograd
of the same network."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import jax_float64

import mithril as ml
from mithril.errors import KeyMismatchError
from mithril.models import (
    Add,
    Arange,
    Buffer,
    Convolution2D,
    Embedding,
    Gelu,
    IOKey,
    LayerNorm,
    Linear,
    Model,
    Reshape,
    ScaledDotProduct,
    Shape,
    Size,
    Split,
)

BACKENDS = {"numpy": ml.NumpyBackend, "torch": ml.TorchBackend, "jax": ml.JaxBackend}
TOL = dict(rtol=1e-10, atol=1e-12)


def _run(name: str, build, shapes: dict, params: dict, data: dict, cots: dict, **kw):
    """Compile ``build()`` on backend ``name`` (float64), evaluate with NumPy ``params`` /
    ``data`` / output cotangents ``cots`` moved to the backend; NumPy outputs and gradients."""
    def go():
        b = BACKENDS[name](dtype="float64")
        pm = ml.compile(build(), b, shapes=shapes, **kw)
        out, grads = pm.evaluate({k: b.array(v) for k, v in params.items()},
                                 {k: b.array(v) for k, v in data.items()},
                                 output_gradients={k: b.array(v) for k, v in cots.items()})
        return ({k: np.asarray(b.to_numpy(v)) for k, v in out.items()},
                {k: np.asarray(b.to_numpy(v)) for k, v in grads.items()})
    if name == "jax":
        with jax_float64():
            return go()
    return go()


def _check(got: tuple[dict, dict], want_out: dict, t: dict) -> None:
    out, grads = got
    for k, v in want_out.items():
        np.testing.assert_allclose(out[k], v, **TOL, err_msg=k)
    assert set(grads) == set(t)
    for k, v in t.items():  # (torch leaves a parameter no output reads without a grad)
        want = np.zeros(v.shape) if v.grad is None else v.grad.numpy()
        np.testing.assert_allclose(grads[k], want, **TOL, err_msg=k)


# --- examples/gpt/model.py: create_gpt, with its shape wires and Size -> Arange -----------------

def causal_attention(input_dim, num_heads, bias=True):
    # synnada-ai/mithril examples/gpt/model.py, as published but for ScaledDotProduct's
    # published default is_causal=True, spelled out (False here)
    if (input_dim % num_heads) != 0:
        raise ValueError("Requires input dims to be divisible by num_heads")

    model = Model(name="attn")
    model |= Linear(input_dim * 3, name="c_attn").connect("input", output="c_attn_out")

    t_axes = (0, 2, 1, 3)
    shp_con = model.input.shape  # type: ignore
    reshape_con = (shp_con[0], shp_con[1], num_heads, -1)

    model |= Split(3, axis=-1).connect(model.c_attn_out, output="split_out")  # type: ignore
    tq = model.split_out[0].reshape(reshape_con).transpose(t_axes)  # type: ignore
    tk = model.split_out[1].reshape(reshape_con).transpose(t_axes)  # type: ignore
    tv = model.split_out[2].reshape(reshape_con).transpose(t_axes)  # type: ignore

    model |= ScaledDotProduct(is_causal=True).connect(query=tq, key=tk, value=tv, output="sdp_out")
    t_sdp = model.sdp_out.transpose(t_axes).reshape(shp_con[:3])  # type: ignore
    model |= Linear(input_dim, name="c_proj").connect(t_sdp)
    return model


def mlp(n_embd: int):
    # examples/gpt/model.py, as published
    block = Model(name="mlp")
    block += Linear(n_embd * 4, name="c_fc").connect(input="input")
    block += Gelu()
    block += Linear(n_embd, name="c_proj").connect(output=IOKey("output"))
    return block


def create_block(name, dims, num_heads, bias=True, eps=1e-5):
    # examples/gpt/model.py, as published
    block = Model(name=name)
    block += LayerNorm(use_bias=bias, eps=eps, name="ln_1").connect("input")
    block += causal_attention(dims, num_heads, bias)
    block |= Add().connect("input", block.cout, "add_out")
    block += LayerNorm(use_bias=bias, eps=eps, name="ln_2")
    block += mlp(dims)
    block |= Add().connect("add_out", right=block.cout)
    return block


def create_gpt(bias, block_size, dims, num_heads, num_layers, vocab_size):
    # examples/gpt/model.py, as published
    transformer = Model(name="transformer")
    transformer += Size(dim=1).connect("input")
    transformer += Arange(start=0, step=1)
    transformer += Embedding(name="wpe", num_embeddings=block_size, dim=dims).connect(
        output="pos_out"
    )
    transformer |= Embedding(name="wte", num_embeddings=vocab_size, dim=dims).connect(
        "input", output="token_out"
    )
    transformer |= Add().connect("pos_out", "token_out")

    blocks = Model(name="h")
    for idx in range(num_layers):
        blocks += create_block(f"{idx}", dims, num_heads)
    transformer += blocks
    transformer += LayerNorm(use_bias=bias, name="ln_f")

    gpt = Model()
    gpt += transformer.connect(input="input")
    gpt += Linear(vocab_size, use_bias=False, name="lm_head").connect(output=IOKey("output"))
    gpt.set_differentiability({gpt.input: False})  # type: ignore
    return gpt


_GPT = dict(bias=True, block_size=12, dims=8, num_heads=2, num_layers=2, vocab_size=11)


def _gpt_torch(p: dict, idx: np.ndarray, cot: np.ndarray) -> tuple[np.ndarray, dict]:
    """nanoGPT's forward in torch, on the compiled parameter names."""
    t = {k: torch.tensor(v, requires_grad=True) for k, v in p.items()}
    B, T = idx.shape
    x = t["transformer.wte.weight"][torch.tensor(idx)] + t["transformer.wpe.weight"][torch.arange(T)]
    for i in range(_GPT["num_layers"]):
        h = f"transformer.h.{i}"
        a = F.layer_norm(x, (8,), t[f"{h}.ln_1.weight"], t[f"{h}.ln_1.bias"], 1e-5)
        q, k, v = F.linear(a, t[f"{h}.attn.c_attn.weight"], t[f"{h}.attn.c_attn.bias"]).split(8, -1)
        q, k, v = (z.reshape(B, T, 2, -1).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, 8)
        x = x + F.linear(y, t[f"{h}.attn.c_proj.weight"], t[f"{h}.attn.c_proj.bias"])
        m = F.layer_norm(x, (8,), t[f"{h}.ln_2.weight"], t[f"{h}.ln_2.bias"], 1e-5)
        m = F.gelu(F.linear(m, t[f"{h}.mlp.c_fc.weight"], t[f"{h}.mlp.c_fc.bias"]))
        x = x + F.linear(m, t[f"{h}.mlp.c_proj.weight"], t[f"{h}.mlp.c_proj.bias"])
    x = F.layer_norm(x, (8,), t["transformer.ln_f.weight"], t["transformer.ln_f.bias"], 1e-5)
    out = F.linear(x, t["lm_head.weight"])
    out.backward(torch.tensor(cot))
    return out.detach().numpy(), t


@pytest.fixture(scope="module")
def gpt_case():
    rng = np.random.default_rng(48)
    pm = ml.compile(create_gpt(**_GPT), ml.NumpyBackend(dtype="float64"), shapes={"input": [3, 5]})
    params = {k: rng.standard_normal(v) * 0.4 for k, v in pm.parameter_shapes.items()}
    idx, cot = rng.integers(0, 11, (3, 5)), rng.standard_normal((3, 5, 11))
    return params, idx, cot, _gpt_torch(params, idx, cot)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_gpt_example_with_shape_wires_matches_torch(name, gpt_case):
    params, idx, cot, (want, t) = gpt_case
    got = _run(name, lambda: create_gpt(**_GPT), {"input": [3, 5]}, params, {"input": idx},
               {"output": cot})
    _check(got, {"output": want}, t)


def test_gpt_example_with_a_free_batch_and_built_lazily(gpt_case):
    """The shape wires' free entries stay free (x.shape[0] with a batch of None): the
    parameters' shapes follow all the same, and each evaluate reshapes by its own batch."""
    params, idx, cot, (want, t) = gpt_case
    pm = ml.compile(create_gpt(**_GPT), ml.NumpyBackend(dtype="float64"), shapes={"input": [None, 5]})
    assert pm.get_shapes()["output"] == [None, 5, 11]
    out, grads = pm.evaluate(params, {"input": idx}, output_gradients={"output": cot})
    np.testing.assert_allclose(out["output"], want, **TOL)
    np.testing.assert_allclose(pm.evaluate(params, {"input": idx[:1]})["output"], want[:1], **TOL)
    lazy = ml.compile(create_gpt(**_GPT), ml.TorchBackend(dtype="float64"))  # no shapes at all
    got = lazy.evaluate({k: torch.tensor(v) for k, v in params.items()}, {"input": torch.tensor(idx)})
    np.testing.assert_allclose(got["output"].numpy(), want, **TOL)
    for k, v in t.items():
        np.testing.assert_allclose(grads[k], v.grad.numpy(), **TOL, err_msg=k)


# --- examples/clip/model.py: multi_head_attention (B * L) and the vision stem's Reshape() ------

def multi_head_attention(d_model: int, n_head: int, name: str | None = None):
    # synnada-ai/mithril examples/clip/model.py multi_head_attention(use_attn_mask=False), as
    # published (B, L read off the IOKey; tests/test_review_iokey48.py runs it with free sizes)
    block = Model(name=name)
    assert d_model % n_head == 0, "d_model is not divisible by h"
    queries = IOKey("queries")
    head_dim = d_model // n_head
    B, L = queries.shape[0], queries.shape[1]
    block |= Linear(3 * d_model, name="in_proj").connect(queries, output="in_proj")

    in_proj = (
        block.in_proj.reshape((B, L, 3, -1))  # type: ignore
        .reshape((1, B, L, 3, d_model))
        .transpose((3, 1, 2, 0, 4))
        .reshape((3, B, L, -1))
    )
    queries = in_proj[0, :, :, :].reshape((B, L, n_head, head_dim)).transpose((1, 2, 0, 3))
    keys = in_proj[1, :, :, :].reshape((B, L, n_head, head_dim)).transpose((1, 2, 0, 3))
    values = in_proj[2, :, :, :].reshape((B, L, n_head, head_dim)).transpose((1, 2, 0, 3))
    block |= ScaledDotProduct(is_causal=False, use_attn_mask=False).connect(
        query=queries, key=keys, value=values, output="attention"
    )
    block |= Buffer().connect(input=block.attention, output="buffer_output")  # type: ignore
    values_hat = block.attention.transpose((2, 0, 1, 3)).reshape((B * L, d_model))  # type: ignore
    block |= Linear(d_model, name="out_proj").connect(values_hat, output="out")
    block |= Buffer().connect(
        input=block.out.reshape((B, L, d_model)),  # type: ignore
        output="output",
    )
    block.expose_keys("output")
    return block


@pytest.mark.parametrize("name", list(BACKENDS))
def test_clip_multi_head_attention_matches_torch(name):
    rng = np.random.default_rng(1)
    B, L, d, h = 3, 4, 6, 2
    pm = ml.compile(multi_head_attention(d, h), ml.NumpyBackend(dtype="float64"),
                    shapes={"queries": [B, L, d]})
    assert pm.get_shapes()["out"] == [B * L, d] and pm.get_shapes()["output"] == [B, L, d]
    params = {k: rng.standard_normal(v) for k, v in pm.parameter_shapes.items()}
    x = rng.standard_normal((B, L, d))
    cots = {k: rng.standard_normal(tuple(pm.get_shapes()[k])) for k in ("output", "buffer_output")}
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    p = F.linear(torch.tensor(x), t["in_proj.weight"], t["in_proj.bias"])
    p = p.reshape(B, L, 3, -1).reshape(1, B, L, 3, d).permute(3, 1, 2, 0, 4).reshape(3, B, L, -1)
    q, k, v = (p[i].reshape(B, L, h, d // h).permute(1, 2, 0, 3) for i in range(3))
    att = F.scaled_dot_product_attention(q, k, v)
    out = F.linear(att.permute(2, 0, 1, 3).reshape(B * L, d), t["out_proj.weight"], t["out_proj.bias"])
    y = out.reshape(B, L, d)
    (torch.sum(y * torch.tensor(cots["output"])) + torch.sum(att * torch.tensor(cots["buffer_output"]))).backward()
    got = _run(name, lambda: multi_head_attention(d, h), {"queries": [B, L, d]}, params,
               {"queries": x}, cots)
    _check(got, {"output": y.detach().numpy(), "buffer_output": att.detach().numpy()}, t)


def clip_stem(patch_size: int, width: int) -> Model:
    # examples/clip/model.py vision_transformer(), its first lines as published
    block = Model()
    input = IOKey("input")
    block |= Convolution2D(kernel_size=patch_size, out_channels=width, stride=patch_size,
                           use_bias=False, name="conv1").connect(input=input, output="conv1")
    shape_conv1 = block.conv1.shape  # type: ignore
    block |= Reshape().connect(
        shape=(shape_conv1[0], shape_conv1[1], -1),
        input=block.conv1,  # type: ignore
        output="conv1_r",
    )
    conv1_rt = block.conv1_r.transpose((0, 2, 1))  # type: ignore
    block |= LayerNorm(name="ln_pre").connect(input=conv1_rt, output="output")
    return block


@pytest.mark.parametrize("name", list(BACKENDS))
def test_clip_stem_reshape_of_a_shape_wire_matches_torch(name):
    rng = np.random.default_rng(2)
    shapes = {"input": [2, 3, 8, 8]}
    pm = ml.compile(clip_stem(4, 5), ml.NumpyBackend(dtype="float64"), shapes=shapes)
    assert pm.get_shapes()["conv1_r"] == [2, 5, 4]
    params = {k: rng.standard_normal(v) for k, v in pm.parameter_shapes.items()}
    x, cot = rng.standard_normal((2, 3, 8, 8)), rng.standard_normal((2, 4, 5))
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    c = F.conv2d(torch.tensor(x), t["conv1.weight"], stride=4)
    y = F.layer_norm(c.reshape(2, 5, -1).transpose(1, 2), (5,), t["ln_pre.weight"], t["ln_pre.bias"])
    y.backward(torch.tensor(cot))
    got = _run(name, lambda: clip_stem(4, 5), shapes, params, {"input": x}, {"output": cot})
    _check(got, {"output": y.detach().numpy()}, t)


# --- Shape, Size, Arange and shape-wire arithmetic against torch ------------------------------

@pytest.mark.parametrize("name", list(BACKENDS))
def test_shape_size_and_arange_values_match_torch(name):
    x = np.zeros((2, 7, 3))
    model = Model()
    model |= Shape().connect(input="x", output="shape")
    model |= Size().connect(input="x", output="numel")
    model |= Size(dim=(0, -1)).connect(input="x", output="dims")
    model |= Size(dim=1).connect(input="x", output="length")
    model |= Arange(start=1).connect(stop=model.length, output="positions")  # type: ignore
    s = model.x.shape  # type: ignore
    model |= Arange(step=2).connect(stop=s[1] * s[2] - 4, output="evens")
    model |= Arange(start=s[1] - 1, stop=-1, step=-3).connect(output="down")
    model |= Arange(start=s[1] // 2 + s[0] % 2).connect(stop=s[-1] * 5, output="mixed")

    def go():
        b = BACKENDS[name](dtype="float64")
        pm = ml.compile(model, b, shapes={"x": [2, 7, 3]})
        assert pm.get_shapes()["evens"] == [9] and pm.get_shapes()["down"] == [3]
        return {k: np.asarray(b.to_numpy(v)) for k, v in pm.evaluate({}, {"x": b.array(x)}).items()}
    out = go() if name != "jax" else _under_x64(go)
    tx = torch.tensor(x)
    want = {"shape": torch.tensor(tx.shape), "numel": torch.tensor(tx.numel()),
            "dims": torch.tensor([tx.shape[0], tx.shape[-1]]), "length": torch.tensor(tx.shape[1]),
            "positions": torch.arange(1, tx.shape[1]), "evens": torch.arange(0, 7 * 3 - 4, 2),
            "down": torch.arange(6, -1, -3), "mixed": torch.arange(3, 15)}
    for k, v in want.items():
        assert out[k].dtype.kind == "i", k
        np.testing.assert_array_equal(out[k], v.numpy(), err_msg=k)


def _under_x64(fn):
    with jax_float64():
        return fn()


# --- what cannot be inferred, and bad input: named errors, nothing changed ------------------------

def _snapshot(model: Model) -> tuple:
    return (len(model.blocks), dict(model.conns), model.input_keys, model.output_keys)


def test_a_shape_wire_out_of_range_or_below_zero_is_a_named_shape_error():
    model = Model()
    model |= Buffer().connect(input="x", output="y")
    s = model.x.shape  # type: ignore
    model |= Buffer().connect(input=model.y.reshape((s[0], s[5])), output="z")  # type: ignore
    with pytest.raises(ml.ShapeError, match=r"Model.x.shape\[5\]: index 5 is out of range for "
                                            r"a shape of rank 2 \(\[2, 3\]\)"):
        ml.compile(model, ml.NumpyBackend(), shapes={"x": [2, 3]})
    neg = Model()
    neg |= Buffer().connect(input="x", output="y")
    s = neg.x.shape  # type: ignore
    neg |= Reshape(shape=(s[0] - 3, -1)).connect(input="y", output="z")
    with pytest.raises(ml.ShapeError, match=r"\(Model.x.shape\[0\] - 3\) is -1, a size below 0"):
        ml.compile(neg, ml.NumpyBackend(), shapes={"x": [2, 3]})
    bad = Model()
    bad |= Buffer().connect(input="x", output="y")
    s = bad.x.shape  # type: ignore
    bad |= Reshape(shape=(s[0], 4, -1)).connect(input="y", output="z")
    with pytest.raises(ml.ShapeError, match=r"cannot reshape \[2, 3\] into \[2, 4, -1\]"):
        ml.compile(bad, ml.NumpyBackend(), shapes={"x": [2, 3]})


def test_a_shape_wire_of_another_model_is_refused_and_the_model_is_unchanged():
    other = Model()
    other |= Buffer().connect(input="a", output="b")
    model = Model()
    model |= Buffer().connect(input="x", output="y")
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"Reshape: the shape wire's Model.a: .*not \(yet\) part "
                                         r"of this model"):
        model |= Reshape(shape=(other.a.shape[0], -1)).connect(input="y", output="z")  # type: ignore
    assert _snapshot(model) == before
    with pytest.raises(ValueError, match="not \\(yet\\) part of this model"):  # through .reshape
        model |= Buffer().connect(input=model.y.reshape(other.a.shape), output="z")  # type: ignore
    assert _snapshot(model) == before


def test_arange_of_a_value_the_run_computes_is_refused_by_name():
    model = Model()
    model |= Size(dim=0).connect(input="x", output="n")
    model |= Arange().connect(stop="n", output="r")
    pm = ml.compile(model, ml.NumpyBackend(), shapes={"x": [4]})
    assert pm.get_shapes()["r"] == [4]
    model = Model()
    model |= Arange().connect(stop="n", output="r")  # a model input: its value is the run's
    with pytest.raises(ml.ShapeError, match=r"Arange: the value of 'stop' is computed by the run"):
        ml.compile(model, ml.NumpyBackend(), shapes={"n": []})
    with pytest.raises(TypeError, match="Arange: start must be an int, a float"):
        Arange(start="0.5")
    with pytest.raises(TypeError, match="Arange: dtype must be an integer dtype or one of"):
        Arange(stop=3, dtype="complex64")
    a = Arange(stop=3)
    with pytest.raises(TypeError, match="stop is given twice"):
        a.connect(stop="n")
    assert a.ends == {"start": 0, "stop": 3, "step": 1} and a.inputs == ()
    with pytest.raises(TypeError, match=r"Arange: stop=Model.r.shape is a whole shape"):
        Arange(stop=model.r.shape)  # type: ignore


def test_shape_wires_refuse_what_has_no_static_meaning():
    model = Model()
    model |= Buffer().connect(input="x", output="y")
    s = model.x.shape  # type: ignore
    with pytest.raises(TypeError, match=r"len\(Model.x.shape\): the rank of a shape wire is known "
                                        "at compile time only"):
        len(s)
    with pytest.raises(TypeError, match="a whole shape takes no arithmetic"):
        s + 1
    with pytest.raises(TypeError, match="one size cannot be indexed"):
        s[0][0]
    with pytest.raises(TypeError, match="an index of a shape is an int or a slice"):
        s["a"]
    with pytest.raises(TypeError):
        iter(s)
    r = Reshape((2, 3))
    with pytest.raises(TypeError, match=r"Reshape: the shape is given twice"):
        r.connect(input="y", shape=(3, 2))
    assert r.shape == (2, 3) and r.inputs == ("input",)
    with pytest.raises(TypeError, match="a size is an int, -1, None or a shape wire"):
        Reshape(shape=(s[0], 2.5))
    empty = Model()
    empty |= Buffer().connect(input="x", output="y")
    empty += Reshape()
    with pytest.raises(ml.ShapeError, match=r"Reshape: no shape given"):
        ml.compile(empty, ml.NumpyBackend(), shapes={"x": [2, 3]})
    with pytest.raises(TypeError, match=r"Reshape: no shape given"):
        Reshape().connect(input="y")
    r = Reshape()
    with pytest.raises(KeyMismatchError, match=r"Reshape has no terminal\(s\) \['nope'\]"):
        r.connect(input="y", shape=(s[0], -1), nope="z")
    assert r.shape is None and r.shape_args is None and r.inputs == ("input",)


# --- a shape wire of an expression (CLIP's conv1_rt.shape), and what waits for expressions.py ----

def _stem_of_expression(spelled: bool) -> Model:
    # examples/clip/model.py: conv1_rt = block.conv1_r.transpose((0, 2, 1)); conv1_rt.shape
    from mithril.models.shape_wires import shape_of
    block = Model()
    block |= Buffer().connect(input="input", output="conv1_r")
    conv1_rt = block.conv1_r.transpose((0, 2, 1))  # type: ignore
    conv1_rt_shape = conv1_rt.shape if spelled else shape_of(conv1_rt)
    block |= Reshape().connect(input=conv1_rt, shape=(conv1_rt_shape[0], 1, -1), output="output")
    return block


@pytest.mark.parametrize("name", ["numpy", "torch"])
def test_a_shape_wire_of_an_expression_wires_the_expression_once(name):
    x, cot = np.random.default_rng(3).standard_normal((2, 3, 4)), np.arange(24.0).reshape(2, 1, 12)
    b = BACKENDS[name](dtype="float64")
    model = _stem_of_expression(spelled=False)
    assert sum(type(blk).__name__ == "Transpose" for blk, _ in model.blocks) == 1
    pm = ml.compile(model, b, shapes={"input": [2, 3, 4]}, trainable_keys={"input"})
    out, grads = pm.evaluate({"input": b.array(x)}, {}, output_gradients={"output": b.array(cot)})
    tx = torch.tensor(x, requires_grad=True)
    y = tx.transpose(1, 2).reshape(2, 1, -1)
    y.backward(torch.tensor(cot))
    np.testing.assert_allclose(b.to_numpy(out["output"]), y.detach().numpy(), **TOL)
    np.testing.assert_allclose(b.to_numpy(grads["input"]), tx.grad.numpy(), **TOL)


def test_expression_shape_as_published():
    pm = ml.compile(_stem_of_expression(spelled=True), ml.NumpyBackend(), shapes={"input": [2, 3, 4]})
    assert pm.get_shapes()["output"] == [2, 1, 12]


def test_iokey_shape_as_published():
    # examples/clip/model.py multi_head_attention: queries = IOKey("queries"); queries.shape[0]
    queries = IOKey("queries")
    B, L = queries.shape[0], queries.shape[1]
    block = Model()
    block |= Linear(6).connect(queries, output="in_proj")
    block |= Buffer().connect(input=block.in_proj.reshape((B * L, -1)), output="output")  # type: ignore
    pm = ml.compile(block, ml.NumpyBackend(), shapes={"queries": [2, 3, 4]})
    assert pm.get_shapes()["output"] == [6, 6]


def test_split_list_output_is_the_pieces_stacked_and_a_bad_connect_changes_nothing():
    x = np.arange(24.0).reshape(2, 12)
    model = Model()
    model |= Split(3, axis=-1).connect("input", output="split_out")
    model |= Buffer().connect(input=model.split_out[2] - model.split_out[0], output="d")  # type: ignore
    pm = ml.compile(model, ml.TorchBackend(dtype="float64"), shapes={"input": [2, 12]},
                    trainable_keys={"input"})
    cot = np.arange(6.0).reshape(3, 2, 1) * np.ones((3, 2, 4))
    out, grads = pm.evaluate({"input": torch.tensor(x)}, {},
                             output_gradients={"split_out": torch.tensor(cot), "d": torch.ones(2, 4, dtype=torch.float64)})
    tx = torch.tensor(x, requires_grad=True)
    pieces = torch.stack(torch.split(tx, 4, dim=-1))
    (torch.sum(pieces * torch.tensor(cot)) + torch.sum(pieces[2] - pieces[0])).backward()
    np.testing.assert_allclose(out["split_out"].numpy(), pieces.detach().numpy(), **TOL)
    np.testing.assert_allclose(grads["input"].numpy(), tx.grad.numpy(), **TOL)
    split = Split(2)
    before = (len(split.blocks), dict(split.conns))
    with pytest.raises(KeyMismatchError, match=r"Split has no terminal\(s\) \['nope'\]"):
        split.connect("x", output="s", nope="y")
    assert (len(split.blocks), dict(split.conns)) == before and split.output_keys == ("output_0", "output_1")


def test_a_deep_copy_of_a_block_with_shape_wires_reads_its_own_connections():
    # the published templates deepcopy their blocks: the copy's shape wires read the copy's wires
    import copy
    block = causal_attention(8, 2)
    model = Model()
    for i, b in enumerate((copy.deepcopy(block), block)):  # (two children named "attn": nested)
        h = Model(name=f"h{i}")
        h += b.connect(input="input", output=IOKey("output"))
        model += h.connect(**({"input": "input"} if i == 0 else {}))
    pm = ml.compile(model, ml.NumpyBackend(dtype="float64"), shapes={"input": [2, 7, 8]})
    assert pm.get_shapes()["output"] == [2, 7, 8]
    assert sorted(k for k in pm.parameter_shapes if k.endswith("c_attn.weight")) == [
        "h0.attn.c_attn.weight", "h1.attn.c_attn.weight"]
    x = np.random.default_rng(0).standard_normal((2, 7, 8))
    assert pm.evaluate(pm.randomize_params(), {"input": x})["output"].shape == (2, 7, 8)


def whisper_attention(name: str, input_dim: int, num_heads: int, is_causal: bool = False,
                      cross_attention: bool = False):
    # synnada-ai/mithril examples/whisper/whisper_model.py, as published
    model = Model(name=name)
    t_axes = (0, 2, 1, 3)
    v_project = Linear(input_dim, name="v_proj")
    k_project = Linear(input_dim, name="k_proj", use_bias=False)
    q_project = Linear(input_dim, name="q_proj")
    model |= q_project.connect(input="input", output="q")
    shp_con = model.input.shape  # type: ignore
    reshape_con = (shp_con[0], shp_con[1], num_heads, -1)
    tq = model.q.reshape(reshape_con).transpose(t_axes)  # type: ignore
    if cross_attention:
        model |= v_project.connect(input="xa", output="v")
        model |= k_project.connect(input="xa", output="k")
        shp_con_2 = model.xa.shape  # type: ignore
        reshape_kv = (shp_con_2[0], shp_con_2[1], num_heads, -1)
        tk = model.k.reshape(reshape_kv).transpose(t_axes)  # type: ignore
        tv = model.v.reshape(reshape_kv).transpose(t_axes)  # type: ignore
    else:
        model |= v_project.connect(input="input", output="v")
        model |= k_project.connect(input="input", output="k")  # type: ignore
        tk = model.k.reshape(reshape_con).transpose(t_axes)  # type: ignore
        tv = model.v.reshape(reshape_con).transpose(t_axes)  # type: ignore
    model |= ScaledDotProduct(is_causal=is_causal).connect(
        query=tq, key=tk, value=tv, output="sdp_out"
    )
    t_sdp = model.sdp_out.transpose(t_axes).reshape(shp_con[:3])  # type: ignore
    model |= (lin := Linear(input_dim, name="out_proj")).connect(t_sdp)
    model.set_cout(lin.output)
    return model


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("name", list(BACKENDS))
def test_whisper_attention_matches_torch(name, cross):
    rng = np.random.default_rng(12)
    shapes = {"input": [2, 5, 6], **({"xa": [2, 7, 6]} if cross else {})}
    build = lambda: whisper_attention("attn", 6, 3, is_causal=not cross, cross_attention=cross)  # noqa: E731
    pm = ml.compile(build(), ml.NumpyBackend(dtype="float64"), shapes=shapes)
    params = {k: rng.standard_normal(v) for k, v in pm.parameter_shapes.items()}
    data = {k: rng.standard_normal(v) for k, v in shapes.items()}
    out_key = pm.output_keys[-1] if "output" not in pm.output_keys else "output"
    cot = rng.standard_normal((2, 5, 6))
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    x = torch.tensor(data["input"])
    kv = torch.tensor(data["xa"]) if cross else x

    def heads(z):
        return z.reshape(z.shape[0], z.shape[1], 3, -1).transpose(1, 2)
    q = heads(F.linear(x, t["q_proj.weight"], t["q_proj.bias"]))
    k = heads(F.linear(kv, t["k_proj.weight"]))
    v = heads(F.linear(kv, t["v_proj.weight"], t["v_proj.bias"]))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=not cross).transpose(1, 2).reshape(2, 5, 6)
    y = F.linear(y, t["out_proj.weight"], t["out_proj.bias"])
    y.backward(torch.tensor(cot))
    got = _run(name, build, shapes, params, data, {out_key: cot})
    _check(got, {out_key: y.detach().numpy()}, t)


def test_size_takes_dim_in_connect_and_arange_chains_into_stop_as_published():
    # published: Size.connect(input, dim, output); Arange's canonical input is stop
    model = Model()
    model |= Size().connect(input="x", dim=0)
    model += Arange(start=ml.TBD).connect(start="s0")  # stop <- the Size; start an input
    model |= Size(dim=-1).connect(input="x", output="s0")
    pm = ml.compile(model, ml.NumpyBackend(), shapes={"x": [6, 2]})
    out = pm.evaluate({}, {"x": np.zeros((6, 2))})
    np.testing.assert_array_equal(out["output"], torch.arange(2, 6).numpy())
    size = Size(dim=1)
    with pytest.raises(TypeError, match="Size: dim must be an int, a tuple of ints or None"):
        size.connect(input="x", dim=1.5)
    with pytest.raises(KeyMismatchError, match="Size has no terminal"):
        size.connect(input="x", dim=0, nope="y")
    assert size.dim == 1


def test_reshape_and_arange_connect_take_the_published_positional_order():
    model = Model()
    model |= Buffer().connect(input="x", output="y")
    s = model.x.shape  # type: ignore
    model |= Reshape().connect("y", (s[1], -1), "r")  # input, shape, output
    model |= Arange().connect(1, s[0] * 2, 3, "int64", "a")  # start, stop, step, dtype, output
    pm = ml.compile(model, ml.NumpyBackend(), shapes={"x": [4, 3]})
    out = pm.evaluate({}, {"x": np.arange(12.0).reshape(4, 3)})
    np.testing.assert_array_equal(out["r"], torch.arange(12.0).reshape(4, 3).reshape(3, -1).numpy())
    np.testing.assert_array_equal(out["a"], torch.arange(1, 8, 3).numpy())
    with pytest.raises(TypeError, match=r"Reshape.connect got two values for 'shape'"):
        Reshape().connect("y", (2, 3), shape=(3, 2))
    with pytest.raises(TypeError, match=r"Arange.connect takes at most 5 positional"):
        Arange().connect(0, 1, 1, None, "a", "b")


def test_chaining_never_wires_into_what_a_shape_wire_reads():
    # Arange(stop=x.shape[1]) has no canonical input: += must not feed the previous output
    # to the connection its shape wire reads (it took the previous output's shape before)
    model = Model()
    model |= Buffer().connect(input="x", output="y")
    model += Reshape(shape=(-1,))  # (12,): the previous output
    model += Arange(stop=model.x.shape[1]).connect(output="r")  # type: ignore
    pm = ml.compile(model, ml.NumpyBackend(), shapes={"x": [4, 3]})
    assert pm.get_shapes()["r"] == [3]
