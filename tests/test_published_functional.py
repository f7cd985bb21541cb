"""The published Mithril's functional API: a block's call is a connection (its output) and
``Model.create`` collects the calls an output reaches. The published nanoGPT
(``examples/gpt/functional_model.py``) runs verbatim on NumPy, torch and JAX in float64, its
output and every gradient against torch.nn.functional with the same weights; its parameter
names are the class-based example's. Then the published rules (tests/scripts/
test_immediate_extend.py) one by one against the same model built with ``|=``, the old
styles still working, and bad input refused with nothing changed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import evaluate_np, jax_float64

import mithril as ml
from mithril.models import (
    Add,
    Buffer,
    Gelu,
    IOKey,
    Linear,
    Model,
    Multiply,
    Relu,
    Split,
)
from mithril.models.primitives import Power

BACKENDS = {"numpy": ml.NumpyBackend, "torch": ml.TorchBackend, "jax": ml.JaxBackend}
F64 = dict(rtol=0, atol=1e-12)

# synnada-ai/mithril examples/gpt/functional_model.py, verbatim but for its license header
GPT_SRC = '''
"""
This example is equivalent of nanoGPT by karpathy.
Torch implementation of nanoGPT: https://github.com/karpathy/nanoGPT
"""

from mithril import IOKey
from mithril.models import (
    Add,
    Arange,
    Embedding,
    Gelu,
    LayerNorm,
    Linear,
    Model,
    ScaledDotProduct,
    Size,
    Split,
)


# Create self causal attention model.
def causal_attention(input_dim, num_heads, bias=True):
    if (input_dim % num_heads) != 0:
        raise ValueError("Requires input dims to be divisible by num_heads")

    input = IOKey("input")
    lin_out = Linear(input_dim * 3, name="c_attn")(input=input)

    t_axes = (0, 2, 1, 3)
    shp_con = input.shape
    reshape_con = (shp_con[0], shp_con[1], num_heads, -1)

    split_out = Split(3, axis=-1)(input=lin_out)
    tq = split_out[0].reshape(reshape_con).transpose(t_axes)
    tk = split_out[1].reshape(reshape_con).transpose(t_axes)
    tv = split_out[2].reshape(reshape_con).transpose(t_axes)

    sdp_out = ScaledDotProduct()(query=tq, key=tk, value=tv)
    t_sdp = sdp_out.transpose(t_axes).reshape(shp_con[:3])
    output = Linear(input_dim, name="c_proj")(input=t_sdp)
    return Model.create(output, name="attn")


def mlp(n_embd: int):
    fc_out = Linear(n_embd * 4, name="c_fc")(input=IOKey("input"))
    gelu_out = Gelu()(input=fc_out)
    output = Linear(n_embd, name="c_proj")(input=gelu_out)
    return Model.create(output, name="mlp")


# Create Transformer Encoder Block.
def create_block(name, dims, num_heads, bias=True, eps=1e-5):
    input = IOKey("input")
    ln1_out = LayerNorm(use_bias=bias, eps=eps, name="ln_1")(input=input)
    attn_out = causal_attention(dims, num_heads, bias)(input=ln1_out)
    add1_out = Add()(left=input, right=attn_out)
    ln2_out = LayerNorm(use_bias=bias, eps=eps, name="ln_2")(input=add1_out)
    mlp_out = mlp(dims)(input=ln2_out)
    output = Add()(left=add1_out, right=mlp_out)
    return Model.create(output, name=name)


def create_gpt(bias, block_size, dims, num_heads, num_layers, vocab_size):
    # Create Position Embedding model
    input = IOKey("input")
    s_out = Size(dim=1)(input=input)
    arr_out = Arange(start=0, step=1)(stop=s_out)
    pos_out = Embedding(name="wpe", num_embeddings=block_size, dim=dims)(input=arr_out)
    token_out = Embedding(name="wte", num_embeddings=vocab_size, dim=dims)(input=input)

    block_out = IOKey("input")
    for idx in range(num_layers):
        block_out = create_block(f"{idx}", dims, num_heads)(input=block_out)
    blocks_out = Model.create(block_out, name="h")(input=pos_out + token_out)

    ln_out = LayerNorm(use_bias=bias, name="ln_f")(input=blocks_out)
    transformer = Model.create(ln_out, name="transformer")
    # Create GPT
    t_out = transformer(input=IOKey("input", differentiable=False))
    output = Linear(vocab_size, use_bias=False, name="lm_head")(input=t_out)
    return Model.create(output=output, name="gpt")
'''

CFG = dict(bias=True, block_size=12, dims=8, num_heads=2, num_layers=2, vocab_size=11)


def published_gpt(causal: bool = False) -> Model:
    """``create_gpt(**CFG)`` of the published file. Its ``ScaledDotProduct()`` is causal as
    published (the default there) and not causal here (torch's default here): ``causal``
    spells ``is_causal=True`` out in the source, the one change."""
    src = GPT_SRC.replace("ScaledDotProduct()(", "ScaledDotProduct(is_causal=True)(") \
        if causal else GPT_SRC
    namespace: dict = {}
    exec(compile(src, "functional_model.py", "exec"), namespace)  # noqa: S102
    return namespace["create_gpt"](**CFG)


def torch_gpt(p: dict, idx: np.ndarray, cot: np.ndarray, causal: bool) -> tuple[np.ndarray, dict]:
    """nanoGPT's forward (karpathy) in torch.nn.functional on the published names."""
    t = {k: torch.tensor(v, requires_grad=True) for k, v in p.items()}
    B, T = idx.shape
    D, H = CFG["dims"], CFG["num_heads"]
    x = t["transformer.wte.weight"][torch.tensor(idx)] + t["transformer.wpe.weight"][torch.arange(T)]
    for i in range(CFG["num_layers"]):
        h = f"transformer.h.{i}"
        a = F.layer_norm(x, (D,), t[f"{h}.ln_1.weight"], t[f"{h}.ln_1.bias"], 1e-5)
        q, k, v = F.linear(a, t[f"{h}.attn.c_attn.weight"], t[f"{h}.attn.c_attn.bias"]).split(D, -1)
        q, k, v = (z.reshape(B, T, H, -1).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2).reshape(B, T, D)
        x = x + F.linear(y, t[f"{h}.attn.c_proj.weight"], t[f"{h}.attn.c_proj.bias"])
        m = F.layer_norm(x, (D,), t[f"{h}.ln_2.weight"], t[f"{h}.ln_2.bias"], 1e-5)
        m = F.gelu(F.linear(m, t[f"{h}.mlp.c_fc.weight"], t[f"{h}.mlp.c_fc.bias"]))
        x = x + F.linear(m, t[f"{h}.mlp.c_proj.weight"], t[f"{h}.mlp.c_proj.bias"])
    x = F.layer_norm(x, (D,), t["transformer.ln_f.weight"], t["transformer.ln_f.bias"], 1e-5)
    out = F.linear(x, t["lm_head.weight"])
    out.backward(torch.tensor(cot))
    return out.detach().numpy(), {k: v.grad.numpy() for k, v in t.items()}


@pytest.fixture(scope="module")
def gpt_case():
    rng = np.random.default_rng(51)
    pm = ml.compile(published_gpt(), ml.NumpyBackend(dtype="float64"), shapes={"input": [3, 5]})
    params = {k: rng.standard_normal(v) * 0.4 for k, v in pm.parameter_shapes.items()}
    return params, rng.integers(0, CFG["vocab_size"], (3, 5)), rng.standard_normal((3, 5, 11))


def test_gpt_parameter_names_are_the_class_based_examples():
    from test_review_published48 import _GPT, create_gpt

    assert _GPT == CFG
    b = ml.NumpyBackend(dtype="float64")
    functional = ml.compile(published_gpt(), b, shapes={"input": [3, 5]})
    classic = ml.compile(create_gpt(**CFG), b, shapes={"input": [3, 5]})
    assert functional.parameter_shapes == classic.parameter_shapes
    assert "transformer.h.1.attn.c_attn.weight" in functional.parameter_shapes
    assert list(functional.input_keys) == ["input"] and functional.get_shapes()["output"] == [3, 5, 11]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", list(BACKENDS))
def test_published_functional_gpt_matches_torch_nanogpt(name, causal, gpt_case):
    params, idx, cot = gpt_case
    want, want_grads = torch_gpt(params, idx, cot, causal)

    def run():
        b = BACKENDS[name](dtype="float64")
        pm = ml.compile(published_gpt(causal), b, shapes={"input": [3, 5]})
        return evaluate_np(pm, b, params, {"input": idx}, {"output": cot})

    if name == "jax":
        with jax_float64():
            out, grads = run()
    else:
        out, grads = run()
    np.testing.assert_allclose(out["output"], want, **F64)
    assert set(grads) == set(want_grads)
    for k, g in want_grads.items():
        np.testing.assert_allclose(grads[k], g, **F64, err_msg=k)
