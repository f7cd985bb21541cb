"""Round 4 of the published Mithril's users: the published CLIP vision model
(``examples/clip/model.py``: ``vision_transformer`` with its patch convolution, class and
position embeddings, the pre-norm residual attention blocks in LND order, the class-token
pooling and the projection), copied as published with its imports, against OpenAI CLIP's
``VisionTransformer`` forward written here in torch (``torch.nn.functional``), on NumPy, torch
and JAX with the gradients of every parameter against torch autograd.

The example's ``layer_norm`` computes in float32 (``Cast`` to float32, ``LayerNorm``, ``Cast``
back: OpenAI's ``LayerNorm`` subclass does the same), so a float64 model agrees with torch to
float32's precision there; the example with those two casts left out agrees to 1e-12. In a
float32 model the casts change nothing and the three backends agree with torch's float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, evaluate_np

import mithril as ml
from mithril import IOKey
from mithril.models import (
    Arange,
    Buffer,
    Cast,
    Concat,
    Convolution2D,
    LayerNorm,
    Linear,
    Model,
    Randn,
    Reshape,
    ScaledDotProduct,
    Sigmoid,
    Tensor,
    Transpose,
    Where,
    ZerosLike,
)

RNG = np.random.default_rng(5204)


# ---- examples/clip/model.py, as published --------------------------------------------------

def layer_norm(name: str | None = None):
    block = Model(name=name)
    input = IOKey("input")
    block |= Cast().connect(input=input, dtype=ml.float32)
    block |= LayerNorm().connect(
        input=block.cout, weight=IOKey("weight"), bias=IOKey("bias")
    )  # type: ignore
    block |= Cast().connect(dtype=input.dtype(), input=block.cout, output="output")  # type: ignore
    block.expose_keys("output")
    block.set_cin("input")
    return block


def quick_gelu(name: str | None = None):
    block = Model(name=name)
    input = IOKey("input")
    block |= Sigmoid().connect((1.702 * input), output="sigmoid")
    block |= Buffer().connect(input * block.sigmoid, output="output")  # type: ignore
    block.expose_keys("output")
    return block


def multi_head_attention(
    d_model: int, n_head: int, use_attn_mask: bool = False, name: str | None = None
):
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

    queries = (
        in_proj[0, :, :, :].reshape((B, L, n_head, head_dim)).transpose((1, 2, 0, 3))
    )
    keys = in_proj[1, :, :, :].reshape((B, L, n_head, head_dim)).transpose((1, 2, 0, 3))
    values = (
        in_proj[2, :, :, :].reshape((B, L, n_head, head_dim)).transpose((1, 2, 0, 3))
    )

    if use_attn_mask:
        block |= (mask_model := build_attention_mask())
        block |= ScaledDotProduct(is_causal=False, use_attn_mask=True).connect(
            query=queries,
            key=keys,
            value=values,
            attn_mask=mask_model.cout,
            output="attention",
        )
    else:
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


def mlp_resblock(d_model: int, name: str | None = None):
    block = Model(name=name)
    block |= Linear(d_model * 4, name="c_fc").connect(
        input="input", output="c_fc_output"
    )
    block |= quick_gelu(name="gelu").connect(
        input=block.c_fc_output,  # type: ignore
        output="gelu_output",
    )
    block |= Linear(d_model, name="c_proj").connect(
        input=block.gelu_output,  # type: ignore
        output="output",
    )
    block.expose_keys("output")
    return block


def residual_attention_block(
    d_model: int, n_head: int, use_attn_mask: bool = False, name: str | None = None
):
    block = Model(name=name)
    assert d_model % n_head == 0, "d_model is not divisible by h"
    input = IOKey("input")
    block += layer_norm(name="ln_1").connect(input="input", output="ln_1")

    attn = multi_head_attention(d_model, n_head, use_attn_mask, name="attn")
    block |= attn.connect(queries=block.ln_1, output="attention")  # type: ignore

    block |= layer_norm(name="ln_2").connect(
        input=input + block.attention,  # type: ignore
        output="ln_2",
    )
    mlp = mlp_resblock(d_model, name="mlp")

    block |= mlp.connect(input=block.ln_2, output="mlp_output")  # type: ignore

    result = input + block.attention + block.mlp_output  # type: ignore
    block |= Buffer().connect(result, output="output")
    block.expose_keys("output")
    return block


def seq_resblocks(
    width: int,
    layers: int,
    heads: int,
    use_attn_mask: bool = False,
    name: str | None = None,
):
    block = Model(name=name)
    input_key = "input"
    for idx in range(layers):
        block |= residual_attention_block(
            width, heads, use_attn_mask=use_attn_mask, name=f"{idx}"
        ).connect(input=input_key, output=f"attn_output_{idx}")
        input_key = f"attn_output_{idx}"
    block |= Buffer().connect(input=f"attn_output_{idx}", output="output")
    block.expose_keys("output")
    return block


def transformer(
    width: int,
    layers: int,
    heads: int,
    use_attn_mask: bool = False,
    name: str | None = None,
):
    block = Model(name=name)
    input = IOKey("input")

    resblocks = seq_resblocks(
        width=width,
        layers=layers,
        heads=heads,
        use_attn_mask=use_attn_mask,
        name="resblocks",
    )
    block |= resblocks.connect(input=input, output="resblocks_output")

    block |= Buffer().connect(input=block.resblocks_output, output="output")  # type: ignore
    block.expose_keys("output")

    return block


def vision_transformer(
    input_resolution: int,
    patch_size: int,
    width: int,
    layers: int,
    heads: int,
    output_dim: int,
    use_proj: bool = False,
    name: str | None = None,
):
    block = Model(name=name)
    input = IOKey("input")

    block |= Convolution2D(
        kernel_size=patch_size,
        out_channels=width,
        stride=patch_size,
        use_bias=False,
        name="conv1",
    ).connect(input=input, output="conv1")
    shape_conv1 = block.conv1.shape  # type: ignore
    block |= Reshape().connect(
        shape=(shape_conv1[0], shape_conv1[1], -1),
        input=block.conv1,  # type: ignore
        output="conv1_r",
    )
    conv1_rt = block.conv1_r.transpose((0, 2, 1))  # type: ignore
    conv1_rt_shape = conv1_rt.shape

    # TODO: Implement zeros primitive and replace it with following two lines.
    block |= Randn().connect(
        shape=(conv1_rt_shape[0], 1, conv1_rt_shape[-1]), output="rand_1"
    )
    block |= ZerosLike().connect(input=block.rand_1, output="zeros_out")  # type: ignore
    class_embedding = IOKey("class_embedding", differentiable=True, shape=[width])

    block |= Concat(axis=1).connect(
        input=[class_embedding + block.zeros_out, conv1_rt],  # type: ignore
        output="cat1",
    )
    positional_embedding = IOKey(
        "positional_embedding",
        differentiable=True,
        shape=[(input_resolution // patch_size) ** 2 + 1, width],
    )

    block |= layer_norm(name="ln_pre").connect(
        input=block.cat1 + positional_embedding,  # type: ignore
        output="ln_1",
    )
    block.set_shapes(positional_embedding=["a", "b"], cat1=["n", "a", "b"])
    transformer_visual = transformer(width, layers, heads, name="transformer")

    block |= transformer_visual.connect(
        input=block.ln_1.transpose((1, 0, 2)),  # type: ignore
        output="transformer",
    )
    block |= Transpose(axes=(1, 0, 2)).connect(
        input=block.transformer,  # type: ignore
        output="transformer_p",
    )
    block |= layer_norm(name="ln_post").connect(
        input=block.transformer_p,  # type: ignore
        output="ln_post",
    )
    if use_proj:
        block |= Buffer().connect(
            block.ln_post[:, 0, :]  # type: ignore
            @ IOKey("proj", differentiable=True, shape=(width, output_dim)),
            output="output",
        )
        block.expose_keys("output")
        return block

    block |= Buffer().connect(input=block.ln_post[:, 0, :], output="output")  # type: ignore
    block.expose_keys("output")
    return block



def build_attention_mask() -> Model:
    block = Model()
    block |= Arange(stop=77).connect(output="arange_out_1")
    block |= Arange(stop=77).connect(output="arange_out_2")
    upper_bool_triu = block.arange_out_1[..., None] >= block.arange_out_2[None, ...]  # type: ignore
    block |= Where().connect(
        cond=upper_bool_triu,
        input1=Tensor(0.0),
        input2=Tensor(float("-inf")),
        output="output",
    )
    block.expose_keys("output")
    return block


# ---- against torch -------------------------------------------------------------------------
R, P, W, LAYERS, HEADS, OUT = 8, 4, 8, 2, 2, 6  # 2x2 patches of 4x4 pixels: 5 tokens

#: the parameter of each layer_norm: its IOKey("weight") / ("bias") become inputs of the
#: blocks above it, renamed by each (a second "weight" is "weight_1", and so on)
LN_SUFFIX = {"ln_pre": "", "0.ln_1": "_1", "0.ln_2": "_1_1", "1.ln_1": "_2", "1.ln_2": "_1_1_1",
             "ln_post": "_3"}


def _ln(t, x, which, f32):
    """OpenAI's LayerNorm (eps 1e-5); ``f32``: normalised in float32 as the example's
    ``layer_norm`` (the float32 x̂, then the model's weight and bias)."""
    w, b = t["weight" + LN_SUFFIX[which]], t["bias" + LN_SUFFIX[which]]
    if f32 and x.dtype == torch.float64:
        return F.layer_norm(x.float(), (x.shape[-1],), eps=1e-5).double() * w + b
    return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)


def _torch_vision_transformer(t, img, f32):
    """OpenAI CLIP's ``VisionTransformer.forward`` (``nn.MultiheadAttention`` in LND order,
    quick GELU), with ``proj``."""
    x = F.conv2d(img, t["conv1.weight"], stride=P)
    N = x.shape[0]
    x = x.reshape(N, W, -1).permute(0, 2, 1)
    x = torch.cat([t["class_embedding"] + torch.zeros(N, 1, W, dtype=x.dtype), x], 1)
    x = _ln(t, x + t["positional_embedding"], "ln_pre", f32).permute(1, 0, 2)
    for i in range(LAYERS):
        p = f"transformer.resblocks.{i}."
        h = _ln(t, x, f"{i}.ln_1", f32)
        a, _ = F.multi_head_attention_forward(
            h, h, h, W, HEADS, t[p + "attn.in_proj.weight"], t[p + "attn.in_proj.bias"], None,
            None, False, 0.0, t[p + "attn.out_proj.weight"], t[p + "attn.out_proj.bias"],
            need_weights=False)
        x = x + a
        h = F.linear(_ln(t, x, f"{i}.ln_2", f32), t[p + "mlp.c_fc.weight"], t[p + "mlp.c_fc.bias"])
        x = x + F.linear(h * torch.sigmoid(1.702 * h), t[p + "mlp.c_proj.weight"],
                         t[p + "mlp.c_proj.bias"])
    return _ln(t, x.permute(1, 0, 2)[:, 0, :], "ln_post", f32) @ t["proj"]


def _layer_norm_without_casts(name: str | None = None):
    """The published ``layer_norm`` less its two float32 ``Cast`` s."""
    block = Model(name=name)
    block |= LayerNorm().connect(input=IOKey("input"), weight=IOKey("weight"),
                                 bias=IOKey("bias"), output="output")
    block.expose_keys("output")
    block.set_cin("input")
    return block


def _run(name, dtype, f32, rtol, atol):
    """Compile the published vision transformer, evaluate it with random parameters, an
    image and an output gradient, and compare with torch (values and every gradient);
    returns the largest output difference."""
    b = BACKENDS[name](dtype=dtype)
    model = vision_transformer(input_resolution=R, patch_size=P, width=W, layers=LAYERS,
                               heads=HEADS, output_dim=OUT, use_proj=True, name="visual")
    pm = ml.compile(model, b, shapes={"input": [2, 3, R, R]})
    assert set(pm.parameter_shapes) == {
        "class_embedding", "positional_embedding", "proj", "conv1.weight",
        *(f"{k}{s}" for k in ("weight", "bias") for s in LN_SUFFIX.values()),
        *(f"transformer.resblocks.{i}.{n}.{k}" for i in range(LAYERS)
          for n in ("attn.in_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj")
          for k in ("weight", "bias"))}
    assert pm.parameter_shapes["positional_embedding"] == (5, W)
    params = {k: (RNG.standard_normal(s) * (0.3 if len(s) >= 2 else 1.0)).astype(dtype)
              for k, s in pm.parameter_shapes.items()}
    img, cot = RNG.standard_normal((2, 3, R, R)).astype(dtype), RNG.standard_normal((2, OUT)).astype(dtype)
    out, grads = evaluate_np(pm, b, params, {"input": img}, {"output": cot})
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    want = _torch_vision_transformer(t, torch.tensor(img), f32)
    g = dict(zip(t, torch.autograd.grad((want * torch.tensor(cot)).sum(), list(t.values())),
                 strict=True))
    np.testing.assert_allclose(out["output"], want.detach().numpy(), rtol=rtol, atol=atol)
    for k, gk in g.items():
        np.testing.assert_allclose(grads[k], gk.numpy(), rtol=rtol, atol=atol, err_msg=k)
    return float(np.abs(out["output"] - want.detach().numpy()).max())


@pytest.mark.parametrize("name", list(BACKENDS))
def test_vision_transformer_without_the_float32_casts_matches_torch_to_1e12(name, monkeypatch):
    """The published structure (patch conv, class token, positions, LND blocks, pooling,
    projection) in float64: values and every gradient within 1e-12 of torch autograd."""
    monkeypatch.setitem(globals(), "layer_norm", _layer_norm_without_casts)
    _run(name, "float64", False, 1e-12, 1e-12)


@pytest.mark.parametrize("name", ["numpy", "jax"])
def test_vision_transformer_as_published_computes_its_layer_norms_in_float32(name):
    """Verbatim in a float64 model: torch's OpenAI forward with float32 layer norms agrees to
    float32's precision, and the float32 step is real (1e-9 from the all-float64 forward)."""
    _run(name, "float64", True, 1e-5, 5e-6)
    with pytest.raises(AssertionError):
        _run(name, "float64", False, 1e-9, 1e-9)


def test_vision_transformer_as_published_on_torch_in_float64():
    _run("torch", "float64", True, 1e-5, 5e-6)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_vision_transformer_as_published_in_float32_matches_torch(name):
    """Verbatim in a float32 model (the casts are no-ops): torch's float32 forward, gradients
    included, to float32's precision."""
    _run(name, "float32", True, 2e-4, 2e-5)
