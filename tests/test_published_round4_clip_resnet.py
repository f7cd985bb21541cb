"""Round 4 of the published Mithril's users: the published CLIP ResNet image encoder
(``examples/clip/model.py``: ``modified_resnet`` with its three-convolution stem,
``make_layer`` / ``bottleneck`` stages and ``attention_pool2d`` over
``multi_head_attention_forward``), copied as published with its imports, against OpenAI CLIP's
``ModifiedResNet`` forward written here in torch with the example's substitutions
(``GroupNorm(1)`` for each ``BatchNorm2d``, ``MaxPool2D`` for each ``AvgPool2d``), on NumPy,
torch and JAX in float64 with every gradient against torch autograd. The published
``make_layer`` needs two or more blocks per stage (``blocks=1`` reads its loop variable
after an empty loop: a ``NameError`` in the example itself)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, evaluate_np

import mithril as ml
from mithril import IOKey
from mithril.models import (
    Buffer,
    Concat,
    Convolution2D,
    Flatten,
    GroupNorm,
    MaxPool2D,
    Mean,
    Model,
    Relu,
    Reshape,
    ScaledDotProduct,
    Transpose,
)

RNG = np.random.default_rng(5504)


# ---- examples/clip/model.py, as published --------------------------------------------------
def multi_head_attention_forward(
    embed_dim_to_check: int, num_heads: int, dropout_p: float
):
    block = Model()
    query = IOKey("query", type=ml.Tensor)
    key = IOKey("key", type=ml.Tensor)
    value = IOKey("value", type=ml.Tensor)
    q_proj_weight = IOKey("q_proj_weight", type=ml.Tensor)
    k_proj_weight = IOKey("k_proj_weight", type=ml.Tensor)
    v_proj_weight = IOKey("v_proj_weight", type=ml.Tensor)
    in_proj_bias = IOKey("in_proj_bias", type=ml.Tensor)
    out_proj_weight = IOKey("out_proj_weight", type=ml.Tensor)
    out_proj_bias = IOKey("out_proj_bias", type=ml.Tensor)

    tgt_len, bsz, embed_dim = query.shape[0], query.shape[1], query.shape[2]

    # assert embed_dim == embed_dim_to_check, "Embedding dimension mismatch."

    head_dim = embed_dim // num_heads
    # assert (head_dim * num_heads) == embed_dim,
    # "embed_dim must be divisible by num_heads"

    q = query @ q_proj_weight.transpose() + in_proj_bias[0:embed_dim]  # type: ignore
    block |= Buffer().connect(input=q)
    k = (
        key @ k_proj_weight.transpose()
        + in_proj_bias[embed_dim_to_check : 2 * embed_dim_to_check]
    )
    block |= Buffer().connect(input=k)

    v = (
        value @ v_proj_weight.transpose()
        + in_proj_bias[2 * embed_dim_to_check : 3 * embed_dim_to_check]
    )
    block |= Buffer().connect(input=v)

    q_r = q.reshape((tgt_len, bsz * num_heads, head_dim)).transpose((1, 0, 2))
    block |= Buffer().connect(input=q_r)

    k_r = k.reshape((-1, bsz * num_heads, head_dim)).transpose((1, 0, 2))
    block |= Buffer().connect(input=k_r)

    v_r = v.reshape((-1, bsz * num_heads, head_dim)).transpose((1, 0, 2))
    block |= Buffer().connect(input=v_r)

    block |= ScaledDotProduct(is_causal=False).connect(
        query=q_r, key=k_r, value=v_r, output="attention"
    )

    attn_output = block.attention.transpose((1, 0, 2)).reshape(  # type: ignore
        (tgt_len, bsz, embed_dim)
    )
    attn_output = attn_output @ out_proj_weight.transpose() + out_proj_bias

    block |= Buffer().connect(input=attn_output, output="output")
    block.expose_keys("output")

    return block


def attention_pool2d(
    spacial_dim: int,
    embed_dim: int,
    num_heads: int,
    output_dim: int | None = None,
    name: str | None = None,
):
    block = Model(name=name)
    input = IOKey("input")
    output_dim = output_dim or embed_dim
    """
    self.positional_embedding =
      nn.Parameter(torch.randn(spacial_dim ** 2 + 1, embed_dim) / embed_dim ** 0.5)
    self.k_proj = nn.Linear(embed_dim, embed_dim)
    self.q_proj = nn.Linear(embed_dim, embed_dim)
    self.v_proj = nn.Linear(embed_dim, embed_dim)
    self.c_proj = nn.Linear(embed_dim, output_dim or embed_dim)
    """
    q_proj_weight = IOKey(
        "q_proj_weight", differentiable=True, shape=(embed_dim, embed_dim)
    )
    k_proj_weight = IOKey(
        "k_proj_weight", differentiable=True, shape=(embed_dim, embed_dim)
    )
    v_proj_weight = IOKey(
        "v_proj_weight", differentiable=True, shape=(embed_dim, embed_dim)
    )
    q_proj_bias = IOKey("q_proj_bias", differentiable=True, shape=(embed_dim,))
    k_proj_bias = IOKey("k_proj_bias", differentiable=True, shape=(embed_dim,))
    v_proj_bias = IOKey("v_proj_bias", differentiable=True, shape=(embed_dim,))
    block |= Concat().connect(
        input=[q_proj_bias, k_proj_bias, v_proj_bias], output="in_proj_bias"
    )
    out_proj_weight = IOKey(
        "c_proj_weight", differentiable=True, shape=(output_dim, embed_dim)
    )
    out_proj_bias = IOKey(
        "c_proj_bias", differentiable=True, type=ml.Tensor, shape=(output_dim,)
    )
    positional_embedding = IOKey(
        "positional_embedding",
        differentiable=True,
        type=ml.Tensor,
        shape=(spacial_dim**2 + 1, embed_dim),
    )
    block |= Flatten(start_dim=2).connect(input=input, output="flatten_output")
    block |= Transpose(axes=(2, 0, 1)).connect(
        input=block.flatten_output,  # type: ignore
        output="transpose_output",
    )
    block |= Mean(axis=0, keepdim=True).connect(
        input=block.transpose_output,  # type: ignore
        output="mean_output",
    )
    block |= Concat(axis=0).connect(
        input=[block.mean_output, block.transpose_output],  # type: ignore
        output="cn1",
    )
    block |= Buffer().connect(block.cn1 + positional_embedding[:, None, :], output="x")  # type: ignore

    _multi_head_attention_forward = multi_head_attention_forward(
        embed_dim, num_heads, 0.0
    )

    block |= _multi_head_attention_forward.connect(
        query=block.x[:1],  # type: ignore
        key=block.x,  # type: ignore
        value=block.x,  # type: ignore
        q_proj_weight=q_proj_weight,
        k_proj_weight=k_proj_weight,
        v_proj_weight=v_proj_weight,
        in_proj_bias=block.in_proj_bias,  # type: ignore
        out_proj_weight=out_proj_weight,
        out_proj_bias=out_proj_bias,
        output="attention",
    )
    attn_shape = block.attention.shape  # type: ignore

    block |= Reshape().connect(
        input=block.attention,  # type: ignore
        shape=(attn_shape[-2], attn_shape[-1]),
        output="output",
    )
    block.expose_keys("output")
    return block


def bottleneck(inplanes: int, planes: int, stride: int = 1, name: str | None = None):
    block = Model(name=name)
    expansion = 4
    input = IOKey("input")

    block += Convolution2D(
        kernel_size=1, out_channels=planes, use_bias=False, name="conv1"
    ).connect(input="input")
    # nn.BatchNorm2d(planes)
    block += GroupNorm(num_groups=1, name="bn1")
    block += Relu(name="relu1")
    block += Convolution2D(
        kernel_size=3, out_channels=planes, padding=1, use_bias=False, name="conv2"
    )
    # nn.BatchNorm2d(planes)
    block += GroupNorm(num_groups=1, name="bn2")
    block += Relu(name="relu2")
    if stride > 1:
        # nn.AvgPool2d(stride)
        # nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        block += MaxPool2D(stride, name="avgpool")

    block += Convolution2D(
        kernel_size=1, out_channels=planes * expansion, use_bias=False, name="conv3"
    )
    # nn.BatchNorm2d(planes)
    block += GroupNorm(num_groups=1, name="bn3").connect(output="out1")

    if stride > 1 or inplanes != planes * expansion:
        # nn.AvgPool2d(stride)
        block |= MaxPool2D(stride, name=f"downsample_{-1}").connect(
            input, output="downsample_pool"
        )
        block |= Convolution2D(
            kernel_size=1,
            out_channels=planes * expansion,
            use_bias=False,
            name=f"downsample_{0}",
        ).connect(block.downsample_pool, output="downsample_conv")  # type: ignore
        # nn.BatchNorm2d(planes)
        block |= GroupNorm(num_groups=1, name=f"downsample_{1}").connect(
            block.downsample_conv,  # type: ignore
            output="out2",
        )
        out = block.out1 + block.out2  # type: ignore

    else:
        out = block.out1 + input  # type: ignore
    block |= Relu(name="relu3").connect(out, output="output")
    block.expose_keys("output")
    block.set_cout("output")

    return block


def make_layer(inplanes, planes, blocks, stride=1, name: str | None = None):
    block = Model(name=name)
    input = IOKey("input")
    block |= bottleneck(inplanes, planes, stride, name="0").connect(
        input=input, output="bottle_neck0"
    )
    _inplanes = 4 * planes
    input_key = "bottle_neck0"
    for i in range(1, blocks):
        block |= bottleneck(_inplanes, planes, name=f"{i}").connect(
            input=input_key, output=f"bottle_neck{i}"
        )
        input_key = f"bottle_neck{i}"
    block |= Buffer().connect(input=f"bottle_neck{i}", output="output")
    block.expose_keys("output")
    return block


def modified_resnet(
    layers, output_dim, heads, input_resolution=224, width=64, name: str | None = None
):
    block = Model(name=name)
    input = IOKey("input")

    # x = x.type(self.conv1.weight.dtype)
    block |= Convolution2D(
        kernel_size=3,
        out_channels=width // 2,
        stride=2,
        padding=1,
        use_bias=False,
        name="conv1",
    ).connect(input=input, output="conv_out_1")
    # nn.BatchNorm2d(width // 2)
    block |= GroupNorm(num_groups=1, name="bn1").connect(
        input="conv_out_1", output="norm_out_1"
    )
    block |= Relu(name="relu1").connect(input="norm_out_1", output="rl_out_1")
    block |= Convolution2D(
        kernel_size=3, out_channels=width // 2, padding=1, use_bias=False, name="conv2"
    ).connect(input="rl_out_1", output="conv_out_2")

    # nn.BatchNorm2d(width // 2)
    block |= GroupNorm(num_groups=1, name="bn2").connect(
        input="conv_out_2", output="norm_out_2"
    )
    block |= Relu(name="relu2").connect(input="norm_out_2", output="rl_out_2")
    block |= Convolution2D(
        kernel_size=3, out_channels=width, padding=1, use_bias=False, name="conv3"
    ).connect(input="rl_out_2", output="conv_out_3")

    # nn.BatchNorm2d(width)
    block |= GroupNorm(num_groups=1, name="bn3").connect(
        input="conv_out_3", output="norm_out_3"
    )
    block |= Relu(name="relu3").connect(input="norm_out_3", output="rl_out_3")
    # nn.AvgPool2d(2)

    block |= MaxPool2D(kernel_size=2, name="avgpool").connect(
        input="rl_out_3", output="avgpool_out"
    )
    make_layer_block = make_layer(width, width, layers[0], name="layer1")
    input_key = "make_layer_0"
    block |= make_layer_block.connect(input=block.avgpool_out, output=input_key)  # type: ignore

    for idx in range(1, 4):
        make_layer_block = make_layer(
            width, width * (2**idx), layers[idx], stride=2, name=f"layer{idx+1}"
        )
        block |= make_layer_block.connect(input=input_key, output=f"make_layer_{idx}")
        input_key = f"make_layer_{idx}"
    attnpool = attention_pool2d(
        input_resolution // 32, width * 32, heads, output_dim, name="attnpool"
    )
    block |= attnpool.connect(
        input=input_key,
        output="attn_output",
    )
    block |= Buffer().connect(input=block.attn_output, output="output")  # type: ignore
    block.expose_keys("output")
    return block



# ---- against torch -------------------------------------------------------------------------
WIDTH, LAYERS, HEADS, OUT, RES = 8, (2, 2, 2, 2), 4, 6, 32  # embed 256, 1x1 final map


def _gn(t, x, name):
    return F.group_norm(x, 1, t[name + ".weight"], t[name + ".bias"], 1e-5)


def _bottleneck(t, x, p, inplanes, planes, stride):
    """OpenAI's ``Bottleneck`` (GroupNorm(1), MaxPool as in the example)."""
    out = F.relu(_gn(t, F.conv2d(x, t[p + "conv1.weight"]), p + "bn1"))
    out = F.relu(_gn(t, F.conv2d(out, t[p + "conv2.weight"], padding=1), p + "bn2"))
    if stride > 1:
        out = F.max_pool2d(out, stride)
    out = _gn(t, F.conv2d(out, t[p + "conv3.weight"]), p + "bn3")
    if stride > 1 or inplanes != planes * 4:
        idn = _gn(t, F.conv2d(F.max_pool2d(x, stride), t[p + "downsample_0.weight"]),
                  p + "downsample_1")
    else:
        idn = x
    return F.relu(out + idn)


def _torch_modified_resnet(t, x):
    x = F.relu(_gn(t, F.conv2d(x, t["conv1.weight"], stride=2, padding=1), "bn1"))
    x = F.relu(_gn(t, F.conv2d(x, t["conv2.weight"], padding=1), "bn2"))
    x = F.relu(_gn(t, F.conv2d(x, t["conv3.weight"], padding=1), "bn3"))
    x = F.max_pool2d(x, 2)
    for s, n in enumerate(LAYERS):
        planes, stride = WIDTH * 2 ** s, 1 if s == 0 else 2
        x = _bottleneck(t, x, f"layer{s + 1}.0.", WIDTH, planes, stride)
        for i in range(1, n):
            x = _bottleneck(t, x, f"layer{s + 1}.{i}.", planes * 4, planes, 1)
    # AttentionPool2d
    x = x.flatten(2).permute(2, 0, 1)
    x = torch.cat([x.mean(0, keepdim=True), x], 0) + t["positional_embedding"][:, None, :]
    E = x.shape[-1]
    out, _ = F.multi_head_attention_forward(
        x[:1], x, x, E, HEADS, None,
        torch.cat([t["q_proj_bias"], t["k_proj_bias"], t["v_proj_bias"]]), None, None, False,
        0.0, t["c_proj_weight"], t["c_proj_bias"], need_weights=False,
        use_separate_proj_weight=True, q_proj_weight=t["q_proj_weight"],
        k_proj_weight=t["k_proj_weight"], v_proj_weight=t["v_proj_weight"])
    return out.squeeze(0)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_modified_resnet_matches_torch(name):
    b = BACKENDS[name](dtype="float64")
    model = modified_resnet(LAYERS, output_dim=OUT, heads=HEADS, input_resolution=RES,
                            width=WIDTH, name="visual")
    pm = ml.compile(model, b, shapes={"input": [2, 3, RES, RES]})
    assert pm.parameter_shapes["positional_embedding"] == (2, 256)
    params = {}
    for k, s in pm.parameter_shapes.items():
        fan_in = int(np.prod(s[1:])) if len(s) >= 2 else 1
        params[k] = RNG.standard_normal(s) / np.sqrt(fan_in)
    img, cot = RNG.standard_normal((2, 3, RES, RES)), RNG.standard_normal((2, OUT))
    out, grads = evaluate_np(pm, b, params, {"input": img}, {"output": cot})
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    want = _torch_modified_resnet(t, torch.tensor(img))
    g = dict(zip(t, torch.autograd.grad((want * torch.tensor(cot)).sum(), list(t.values())),
                 strict=True))
    np.testing.assert_allclose(out["output"], want.detach().numpy(), rtol=1e-12, atol=1e-12)
    for k, gk in g.items():
        np.testing.assert_allclose(grads[k], gk.numpy(), rtol=1e-12, atol=1e-12, err_msg=k)


def test_make_layer_with_one_block_fails_in_the_example_itself():
    with pytest.raises(UnboundLocalError):
        make_layer(8, 8, 1, name="layer1")
