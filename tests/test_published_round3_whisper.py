"""Round 3 of the published Mithril's users: the published Whisper encoder layers
(``examples/whisper/whisper_model.py``: ``whisper_attention``, ``encoder_block``), copied as
published with its imports, against a hand-written Hugging Face ``WhisperEncoderLayer`` in
torch autograd, float64, on NumPy, torch and JAX. ``block += Add().connect("layer_in",
output="attn_res")`` wires the previous output to ``right``, as published (``Add``'s canonical
inputs are ``left`` and ``right``); it was left a new input ``right`` here before."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, to_np

import mithril as ml
from mithril.models import (
    Add,
    Gelu,
    LayerNorm,
    Linear,
    Model,
    Relu,
    ScaledDotProduct,
    Subtract,
)

RNG = np.random.default_rng(5032)


# ---- examples/whisper/whisper_model.py, as published ---------------------------------------
def whisper_attention(
    name: str,
    input_dim: int,
    num_heads: int,
    is_causal: bool = False,
    cross_attention: bool = False,
):
    """Attention implementation for self attention in encoder-decoder,
    and cross-attention in decoder"""
    model = Model(name=name)
    t_axes = (0, 2, 1, 3)
    v_project = Linear(input_dim, name="v_proj")
    k_project = Linear(input_dim, name="k_proj", use_bias=False)
    q_project = Linear(input_dim, name="q_proj")
    model |= q_project.connect(input="input", output="q")
    shp_con = model.input.shape
    reshape_con = (shp_con[0], shp_con[1], num_heads, -1)
    tq = model.q.reshape(reshape_con).transpose(t_axes)
    if cross_attention:
        model |= v_project.connect(input="xa", output="v")
        model |= k_project.connect(input="xa", output="k")
        shp_con_2 = model.xa.shape
        reshape_kv = (shp_con_2[0], shp_con_2[1], num_heads, -1)
        tk = model.k.reshape(reshape_kv).transpose(t_axes)
        tv = model.v.reshape(reshape_kv).transpose(t_axes)
    else:
        model |= v_project.connect(input="input", output="v")
        model |= k_project.connect(input="input", output="k")
        tk = model.k.reshape(reshape_con).transpose(t_axes)
        tv = model.v.reshape(reshape_con).transpose(t_axes)
    model |= ScaledDotProduct(is_causal=is_causal).connect(
        query=tq, key=tk, value=tv, output="sdp_out"
    )
    t_sdp = model.sdp_out.transpose(t_axes).reshape(shp_con[:3])
    model |= (lin := Linear(input_dim, name="out_proj")).connect(t_sdp)
    model.set_cout(lin.output)
    return model


def encoder_block(num_layers: int, input_dim: int, num_heads: int, ffn_dim: int):
    layers = Model(name="layers")
    for idx in range(num_layers):
        block = Model(name=f"{idx}")
        block |= LayerNorm(name="self_attn_layer_norm").connect(
            "layer_in", output="layer_norm_out"
        )
        block += whisper_attention("self_attn", input_dim, num_heads)
        block += Add().connect("layer_in", output="attn_res")
        block.set_cout("attn_res")
        block += LayerNorm(name="final_layer_norm")
        block += Linear(ffn_dim, name="fc1")
        block += Gelu()
        block += Linear(input_dim, name="fc2").connect(output="ffn_out")
        block |= Add().connect("attn_res", block.ffn_out)
        block.set_cin("layer_in")
        layers += block
    return layers


# ---- against torch -------------------------------------------------------------------------
def _lin(t, name, v, bias=True):
    return v @ t[name + ".weight"].T + (t[name + ".bias"] if bias else 0)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_whisper_encoder_layers_match_torch(name):
    b = BACKENDS[name](dtype="float64")
    D, H, F_, L = 8, 2, 16, 5
    layers = encoder_block(2, D, H, F_)
    assert layers.input_keys == ("layer_in",)
    compiled = ml.compile(layers, b, shapes={"layer_in": [2, L, D]}, trainable_keys={"layer_in"})
    params = {k: RNG.standard_normal(s) * (0.4 if len(s) == 2 else 1.0)
              for k, s in compiled.parameter_shapes.items()}
    params["layer_in"] = RNG.standard_normal((2, L, D))
    (out_key,) = compiled.output_keys  # (the last Add's output, named by default)
    cot = RNG.standard_normal((2, L, D))
    out, grads = compiled.evaluate({k: b.array(v) for k, v in params.items()}, {},
                                   output_gradients={out_key: b.array(cot)})
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    x = t["layer_in"]
    for i in range(2):
        p = f"{i}."
        h = F.layer_norm(x, (D,), t[p + "self_attn_layer_norm.weight"], t[p + "self_attn_layer_norm.bias"])
        q = _lin(t, p + "self_attn.q_proj", h).reshape(2, L, H, -1).transpose(1, 2)
        k = _lin(t, p + "self_attn.k_proj", h, bias=False).reshape(2, L, H, -1).transpose(1, 2)
        v = _lin(t, p + "self_attn.v_proj", h).reshape(2, L, H, -1).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, L, D)
        x = x + _lin(t, p + "self_attn.out_proj", a)
        h = F.layer_norm(x, (D,), t[p + "final_layer_norm.weight"], t[p + "final_layer_norm.bias"])
        x = x + _lin(t, p + "fc2", F.gelu(_lin(t, p + "fc1", h)))
    want = dict(zip(t, torch.autograd.grad((x * torch.tensor(cot)).sum(), list(t.values())),
                    strict=True))
    np.testing.assert_allclose(to_np(b, out[out_key]), x.detach().numpy(), rtol=1e-12, atol=1e-12)
    for key, g in want.items():
        np.testing.assert_allclose(to_np(b, grads[key]), g.numpy(), rtol=1e-12, atol=1e-12, err_msg=key)


def test_chaining_into_a_commutative_operator_with_one_side_given():
    """``+= Add().connect(left=...)`` wires ``right`` (and ``right=`` given: ``left``), as
    published; ``Subtract`` has one canonical input (``left``): given, ``+=`` has nothing to
    wire and refuses (published: "Submodel must have single available canonical input"),
    changing nothing; ``|=`` adds it."""
    model = Model()
    model |= Relu().connect(input="x")
    model += Add().connect(left="x", output="y")
    with pytest.raises(ml.KeyMismatchError, match="canonical input 'left'"):
        model += Subtract().connect(left="y", output="z")
    assert "z" not in model.output_keys and len(model.blocks) == 2
    model |= Subtract().connect(left="y", output="z")
    assert model.input_keys == ("x", "right")
    b = ml.NumpyBackend(dtype="float64")
    compiled = ml.compile(model, b, shapes={"x": [3], "right": [3]})
    xv = np.array([-1.0, 0.5, 2.0])
    out = compiled.evaluate({}, {"x": xv, "right": np.ones(3)})
    np.testing.assert_array_equal(out["y"], xv + np.maximum(xv, 0))
    np.testing.assert_array_equal(out["z"], out["y"] - 1)
