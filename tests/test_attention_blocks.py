"""Attention, the transformer block and position embeddings against torch.

1. Every block, float64, on NumPy, JAX and torch: the output and the gradient of every
   parameter and of every float input (inputs are made trainable with ``trainable_keys``, so
   their gradients are the block's input cotangents; boolean masks stay plain inputs) equal
   torch's within 1e-10: ``F.scaled_dot_product_attention`` (causal, rectangular, broadcast,
   boolean and float masks, a fully masked row), ``nn.MultiheadAttention(batch_first=True)``
   (self and cross attention, causal, masks, no bias, unbatched) with our parameters loaded
   through ``torch.func.functional_call``, ``nn.TransformerEncoderLayer(norm_first=True,
   dropout=0.0)`` with ReLU and GELU, and the learned / sinusoidal position tables. JAX float64
   needs ``jax_enable_x64`` for the whole process, so its column runs once in a subprocess.
2. The NumPy VJPs against central finite differences.
3. torch's default initialisation, and the named errors (a sequence longer than the table).
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, jax_case_params, jax_float64, selected_cases, to_np
from torch.func import functional_call

import mithril as ml
from mithril.backends import NumpyBackend
from mithril.errors import DTypeError, ShapeError

TOL = 1e-10
E, H = 8, 2  # embed dim and heads of the attention cases


def _causal(n):
    return torch.nn.Transformer.generate_square_subsequent_mask(n, dtype=torch.float64)


def _bool_mask(shape, seed=0):
    """Booleans with a few False; row 1 all False (a fully masked row)."""
    m = np.random.default_rng(seed).random(shape) > 0.3
    m[..., 1, :] = False
    return m


def _self_attn(block):
    m = ml.Model()
    m |= block(query="x", key="x", value="x", output="output")
    return m


def _masked_self_attn(block):
    m = ml.Model()
    m |= block(query="x", key="x", value="x", attn_mask="attn_mask", output="output")
    return m


# -- torch references: t holds our arrays as tensors, keyed by our names --------------------------
def _mha_params(t, prefix):
    return {k[len(prefix):].replace("out_proj_", "out_proj."): v for k, v in t.items()
            if k.startswith(prefix) and k.endswith(("weight", "bias"))}


def mha_ref(q, k, v, prefix="multi_head_attention.", heads=H, bias=True, **extra):
    """``nn.MultiheadAttention(batch_first=True)`` with our parameters; ``extra``: forward
    keyword arguments (callables of ``t``)."""
    def ref(t):
        mod = torch.nn.MultiheadAttention(E, heads, bias=bias, batch_first=True, dtype=torch.float64)
        args = {"need_weights": False, **{a: (f(t) if callable(f) else f) for a, f in extra.items()}}
        return functional_call(mod, _mha_params(t, prefix), (t[q], t[k], t[v]), args)[0]
    return ref


_LAYER = {"layer_norm_0": "norm1", "layer_norm_1": "norm2", "linear_0": "linear1",
          "linear_1": "linear2", "multi_head_attention": "self_attn"}


def transformer_ref(activation, causal=False, mask=None):
    def ref(t):
        layer = torch.nn.TransformerEncoderLayer(E, H, 16, dropout=0.0, activation=activation,
                                                 batch_first=True, norm_first=True,
                                                 dtype=torch.float64)
        params = {}
        for k, v in t.items():
            if "." in k:
                mod, role = k.rsplit(".", 1)
                params[f"{_LAYER[mod]}.{role.replace('out_proj_', 'out_proj.')}"] = v
        kw = {}
        if causal:
            kw = {"src_mask": _causal(t["input"].shape[-2]), "is_causal": True}
        if mask is not None:
            kw = {"src_mask": t["attn_mask"]}
        return functional_call(layer, params, (t["input"],), kw)
    return ref


def tutorial_table(n, d):
    """The sinusoidal table as the torch tutorial builds it (float64)."""
    pe = torch.zeros(n, d, dtype=torch.float64)
    position = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    div = torch.exp(torch.arange(0, d, 2, dtype=torch.float64) * (-math.log(10000.0) / d))
    pe[:, 0::2] = torch.sin(position * div)
    pe[:, 1::2] = torch.cos(position * div[: d // 2])
    return pe


# name -> (model factory, trainable input shapes, fixed inputs, torch reference(t))
CASES = {
    "sdpa": (lambda: ml.ScaledDotProduct(), {"query": (2, 3, 5, 4), "key": (2, 3, 6, 4), "value": (2, 3, 6, 3)},
             {}, lambda t: F.scaled_dot_product_attention(t["query"], t["key"], t["value"])),
    "sdpa_causal": (lambda: ml.ScaledDotProduct(is_causal=True),
                    {"query": (2, 5, 4), "key": (2, 5, 4), "value": (2, 5, 3)}, {},
                    lambda t: F.scaled_dot_product_attention(t["query"], t["key"], t["value"], is_causal=True)),
    "sdpa_causal_wide": (lambda: ml.ScaledDotProduct(is_causal=True),
                         {"query": (2, 4, 3), "key": (2, 7, 3), "value": (2, 7, 2)}, {},
                         lambda t: F.scaled_dot_product_attention(t["query"], t["key"], t["value"], is_causal=True)),
    "sdpa_causal_tall": (lambda: ml.ScaledDotProduct(is_causal=True, scale=0.7),
                         {"query": (6, 3), "key": (4, 3), "value": (4, 5)}, {},
                         lambda t: F.scaled_dot_product_attention(t["query"], t["key"], t["value"],
                                                                  is_causal=True, scale=0.7)),
    "sdpa_broadcast_scale": (lambda: ml.ScaledDotProduct(scale=0.3),
                             {"query": (2, 3, 4, 5), "key": (3, 6, 5), "value": (1, 6, 2)}, {},
                             lambda t: F.scaled_dot_product_attention(t["query"], t["key"], t["value"],
                                                                      scale=0.3)),
    "sdpa_bool_mask": (lambda: ml.ScaledDotProduct(use_attn_mask=True),
                       {"query": (2, 4, 3), "key": (2, 5, 3), "value": (2, 5, 2)},
                       {"attn_mask": _bool_mask((4, 5))},
                       lambda t: F.scaled_dot_product_attention(t["query"], t["key"], t["value"],
                                                                attn_mask=t["attn_mask"])),
    "sdpa_float_mask": (lambda: ml.ScaledDotProduct(use_attn_mask=True),
                        {"query": (2, 2, 4, 3), "key": (2, 2, 5, 3), "value": (2, 2, 5, 2),
                         "attn_mask": (2, 1, 4, 5)}, {},
                        lambda t: F.scaled_dot_product_attention(t["query"], t["key"], t["value"],
                                                                 attn_mask=t["attn_mask"])),
    "mha_self": (lambda: _self_attn(ml.MultiHeadAttention(H)), {"x": (2, 5, E)}, {},
                 mha_ref("x", "x", "x")),
    "mha_self_causal": (lambda: _self_attn(ml.MultiHeadAttention(H, is_causal=True)), {"x": (3, 6, E)}, {},
                        mha_ref("x", "x", "x", attn_mask=lambda t: _causal(6), is_causal=True)),
    "mha_cross": (lambda: ml.MultiHeadAttention(H, embed_dim=E),
                  {"query": (2, 4, E), "key": (2, 6, E), "value": (2, 6, E)}, {},
                  mha_ref("query", "key", "value")),
    "mha_cross_causal_four_heads": (lambda: ml.MultiHeadAttention(4, is_causal=True),
                                    {"query": (2, 5, E), "key": (2, 5, E), "value": (2, 5, E)}, {},
                                    mha_ref("query", "key", "value", heads=4,
                                            attn_mask=lambda t: _causal(5), is_causal=True)),
    "mha_bool_mask": (lambda: _masked_self_attn(ml.MultiHeadAttention(H, use_attn_mask=True)),
                      {"x": (2, 5, E)}, {"attn_mask": ~_bool_mask((5, 5), seed=1)},
                      mha_ref("x", "x", "x", attn_mask=lambda t: t["attn_mask"])),
    "mha_float_mask_per_head": (lambda: _masked_self_attn(ml.MultiHeadAttention(H, use_attn_mask=True)),
                                {"x": (2, 5, E), "attn_mask": (2, H, 5, 5)}, {},
                                mha_ref("x", "x", "x", attn_mask=lambda t: t["attn_mask"].reshape(2 * H, 5, 5))),
    "mha_no_bias": (lambda: _self_attn(ml.MultiHeadAttention(H, use_bias=False)), {"x": (2, 4, E)}, {},
                    mha_ref("x", "x", "x", bias=False)),
    "mha_unbatched": (lambda: _self_attn(ml.MultiHeadAttention(H)), {"x": (5, E)}, {},
                      mha_ref("x", "x", "x")),
    "transformer_relu": (lambda: ml.TransformerBlock(E, H, 16), {"input": (2, 5, E)}, {},
                         transformer_ref("relu")),
    "transformer_gelu_causal": (lambda: ml.TransformerBlock(E, H, 16, activation="gelu", is_causal=True),
                                {"input": (2, 6, E)}, {}, transformer_ref("gelu", causal=True)),
    "transformer_float_mask": (lambda: ml.TransformerBlock(E, H, 16, activation="gelu", use_attn_mask=True),
                               {"input": (3, 4, E), "attn_mask": (4, 4)}, {},
                               transformer_ref("gelu", mask=True)),
    "positional_embedding": (lambda: ml.PositionalEmbedding(7, 6), {"input": (2, 5, 6)}, {},
                             lambda t: t["input"] + t["positional_embedding.weight"][:5]),
    "positional_encoding": (lambda: ml.PositionalEncoding(6, max_len=9), {"input": (2, 9, 6)}, {},
                            lambda t: t["input"] + tutorial_table(9, 6)),
    "positional_encoding_odd": (lambda: ml.PositionalEncoding(7), {"input": (3, 7)}, {},
                                lambda t: t["input"] + tutorial_table(3, 7)),
}


def max_error(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max(initial=0.0)) / max(1.0, float(np.abs(want).max(initial=0.0)))


def make(case: str, backend):
    factory, trainable, fixed, _ = CASES[case]
    compiled = ml.compile(factory(), backend, shapes={**trainable, **{k: v.shape for k, v in fixed.items()}},
                          trainable_keys=list(trainable))
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    params = {n: rng.standard_normal(s) * (0.5 if n not in trainable else 1.0)
              for n, s in compiled.parameter_shapes.items()}
    cot = rng.standard_normal(compiled.program.output_shape("output"))
    return compiled, params, dict(fixed), cot


def run_mithril(case: str, backend_name: str):
    """Params, fixed inputs, cotangent, output and gradients of ``case`` in float64."""
    backend = BACKENDS[backend_name](dtype="float64")
    compiled, params, fixed, cot = make(case, backend)
    native = {k: backend.array(v) for k, v in params.items()}
    ins = {k: backend.array(v) for k, v in fixed.items()}
    out, grads = compiled.evaluate(native, ins, output_gradients={"output": backend.array(cot)})
    plain = compiled.evaluate(native, ins)
    assert max_error(to_np(backend, plain["output"]), to_np(backend, out["output"])) <= 1e-14
    return params, fixed, cot, to_np(backend, out["output"]), {k: to_np(backend, g) for k, g in grads.items()}


def run_torch(case: str, params, fixed, cot):
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    out = CASES[case][3]({**t, **{k: torch.tensor(v) for k, v in fixed.items()}})
    grads = torch.autograd.grad(out, list(t.values()), torch.tensor(cot), allow_unused=True)
    return out.detach().numpy(), {k: np.zeros_like(params[k]) if g is None else g.numpy()
                                  for k, g in zip(t, grads)}


def compare(case, params, fixed, cot, out, grads, what):
    want_out, want_grads = run_torch(case, params, fixed, cot)
    assert set(grads) == set(want_grads) == set(params)
    errs = {"output": max_error(out, want_out),
            **{f"gradient of {k}": max_error(grads[k], want_grads[k]) for k in want_grads}}
    bad = {k: e for k, e in errs.items() if not e <= TOL}
    assert not bad, f"{what} {case}: {bad}"
    return max(errs.values())


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
@pytest.mark.parametrize("case", list(CASES))
def test_equals_torch(case, backend_name):
    compare(case, *run_mithril(case, backend_name), what=backend_name)


@pytest.fixture(scope="module")
def jax_results(request):
    """The selected cases on JAX float64 (jit), run once in this process (x64 for the block)."""
    flat = {}
    with jax_float64():
        for case in selected_cases(request, "case", list(CASES)):
            params, fixed, cot, out, grads = run_mithril(case, "jax")
            flat[case + "|output"] = np.asarray(out)
            flat.update({case + "|grad|" + k: np.asarray(v) for k, v in grads.items()})
    return flat


@pytest.mark.parametrize("case", jax_case_params(list(CASES)))
def test_jax_equals_torch(case, jax_results):
    _, params, fixed, cot = make(case, NumpyBackend(dtype="float64"))  # the same draws as in there
    grads = {k.split("|", 2)[2]: v for k, v in jax_results.items() if k.startswith(case + "|grad|")}
    compare(case, params, fixed, cot, jax_results[case + "|output"], grads, what="jax")


# -- finite differences of the NumPy VJPs ------------------------------------------------------
FD_CASES = {
    "sdpa_causal_broadcast": (lambda: ml.ScaledDotProduct(is_causal=True, scale=0.6),
                              {"query": (2, 3, 2), "key": (4, 2), "value": (2, 4, 3)}, {}),
    "sdpa_float_mask": (lambda: ml.ScaledDotProduct(use_attn_mask=True),
                        {"query": (1, 3, 2), "key": (1, 4, 2), "value": (1, 4, 2), "attn_mask": (3, 4)}, {}),
    "sdpa_bool_mask": (lambda: ml.ScaledDotProduct(use_attn_mask=True),
                       {"query": (3, 2), "key": (4, 2), "value": (4, 2)}, {"attn_mask": _bool_mask((3, 4))}),
    "mha_self_causal": (lambda: _self_attn(ml.MultiHeadAttention(2, is_causal=True)), {"x": (2, 3, 4)}, {}),
    "mha_cross_mask": (lambda: ml.MultiHeadAttention(2, use_attn_mask=True),
                       {"query": (1, 2, 4), "key": (1, 3, 4), "value": (1, 3, 4), "attn_mask": (2, 3)}, {}),
    "transformer_gelu": (lambda: ml.TransformerBlock(4, 2, 6, activation="gelu", is_causal=True),
                         {"input": (1, 3, 4)}, {}),
    "positional_embedding": (lambda: ml.PositionalEmbedding(4, 3), {"input": (2, 3, 3)}, {}),
    "positional_encoding": (lambda: ml.PositionalEncoding(3), {"input": (2, 3)}, {}),
}


@pytest.mark.parametrize("case", list(FD_CASES))
def test_numpy_vjp_matches_finite_differences(case, eps=1e-6):
    factory, trainable, fixed = FD_CASES[case]
    compiled = ml.compile(factory(), NumpyBackend(dtype="float64"),
                          shapes={**trainable, **{k: v.shape for k, v in fixed.items()}},
                          trainable_keys=list(trainable))
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    params = {k: rng.standard_normal(v) for k, v in compiled.parameter_shapes.items()}
    cot = rng.standard_normal(compiled.program.output_shape("output"))

    def loss(p):
        return float(np.sum(compiled.evaluate(p, fixed)["output"] * cot))

    _, grads = compiled.evaluate(params, fixed, output_gradients={"output": cot})
    for name, p in params.items():
        numeric = np.zeros_like(p)
        for i in np.ndindex(p.shape):
            orig = p[i]
            p[i] = orig + eps
            up = loss(params)
            p[i] = orig - eps
            numeric[i] = (up - loss(params)) / (2 * eps)
            p[i] = orig
        scale = max(np.abs(numeric).max(), 1e-3)
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-6, atol=1e-7 * scale,
                                   err_msg=f"{case}: gradient of '{name}'")


def test_stable_softmax_with_huge_scores(backend):
    """Scores of ±1e4 (float32 exp overflows at 89): finite: each query takes its best key's value."""
    q = np.array([[[100.0, 0.0], [-100.0, 0.0]]], dtype=np.float32)
    k = np.array([[[100.0, 0.0], [-100.0, 0.0], [0.0, 1.0]]], dtype=np.float32)
    v = np.array([[[1.0], [2.0], [3.0]]], dtype=np.float32)
    compiled = ml.compile(ml.ScaledDotProduct(scale=1.0), backend)
    out = to_np(backend, compiled.evaluate({}, {"query": q, "key": k, "value": v})["output"])
    np.testing.assert_allclose(out, [[[1.0], [2.0]]])


# -- initialisation ------------------------------------------------------------------------------
def _uniform_like(arr, bound, draws_note=""):
    assert np.abs(arr).max() <= bound
    assert np.abs(arr).max() > 0.97 * bound, draws_note
    assert abs(arr.mean()) < 0.05 * bound
    assert abs(arr.var() / (bound**2 / 3) - 1) < 0.1


def test_multi_head_attention_init_is_torchs():
    e = 64
    params = ml.compile(ml.MultiHeadAttention(4), NumpyBackend(dtype="float64", seed=1),
                        shapes={"query": [2, 3, e], "key": [2, 3, e], "value": [2, 3, e]}).get_parameters()
    ref = torch.nn.MultiheadAttention(e, 4, batch_first=True, dtype=torch.float64)
    for name, theirs in ref.named_parameters():
        ours = params["multi_head_attention." + name.replace("out_proj.", "out_proj_")]
        theirs = theirs.detach().numpy()
        assert ours.shape == theirs.shape, name
        if name.endswith("bias"):
            np.testing.assert_array_equal(ours, 0)
            np.testing.assert_array_equal(theirs, 0)
            continue
        bound = math.sqrt(6 / (4 * e)) if name == "in_proj_weight" else 1 / math.sqrt(e)
        for arr in (ours, theirs):
            _uniform_like(arr, bound, name)


def test_transformer_block_init_is_torchs():
    d, ff = 32, 64
    params = ml.compile(ml.TransformerBlock(d, 4, ff), NumpyBackend(dtype="float64", seed=2),
                        shapes={"input": [2, 5, d]}).get_parameters()
    layer = torch.nn.TransformerEncoderLayer(d, 4, ff, dropout=0.0, batch_first=True, norm_first=True,
                                             dtype=torch.float64)
    theirs = dict(layer.named_parameters())
    assert len(params) == len(theirs)
    for name, ours in params.items():
        mod, role = name.rsplit(".", 1)
        ref = theirs[f"{_LAYER[mod]}.{role.replace('out_proj_', 'out_proj.')}"].detach().numpy()
        assert ours.shape == ref.shape, name
        if mod.startswith("layer_norm"):
            np.testing.assert_array_equal(ours, ref)
        elif mod.startswith("linear"):
            bound = 1 / math.sqrt(d if mod == "linear_0" else ff)
            assert np.abs(ours).max() <= bound and np.abs(ref).max() <= bound, name
            assert np.abs(ours).max() > (0.97 if role == "weight" else 0.8) * bound, name
            if role == "weight":
                _uniform_like(ours, bound, name)
                _uniform_like(ref, bound, name)


def test_positional_init_and_table():
    params = ml.compile(ml.PositionalEmbedding(512, 16), NumpyBackend(dtype="float64", seed=3),
                        shapes={"input": [None, 8, 16]}).get_parameters()
    (w,) = params.values()
    assert w.shape == (512, 16)
    assert abs(w.mean()) < 0.03 and abs(w.std() - 1) < 0.03  # N(0, 1), as nn.Embedding
    enc = ml.compile(ml.PositionalEncoding(16), NumpyBackend(dtype="float64"), shapes={"input": [1, 50, 16]})
    assert enc.get_parameters() == {}
    out = enc.evaluate({}, {"input": np.zeros((1, 50, 16))})["output"]
    np.testing.assert_allclose(out[0], tutorial_table(50, 16).numpy(), rtol=0, atol=1e-15)


def test_init_same_on_every_backend():
    model = ml.Model()
    model += ml.PositionalEmbedding(8, E)
    model += ml.TransformerBlock(E, H, 16, is_causal=True)
    per_backend = {}
    for name, cls in BACKENDS.items():
        backend = cls(dtype="float32", seed=5)
        params = ml.compile(model, backend, shapes={"input": [1, 4, E]}).get_parameters()
        per_backend[name] = {k: to_np(backend, v) for k, v in params.items()}
    for name, params in per_backend.items():
        assert list(params) == list(per_backend["numpy"])
        for k, v in params.items():
            np.testing.assert_array_equal(v, per_backend["numpy"][k], err_msg=f"{name}: {k}")


# -- a small causal language model on the three backends -------------------------------------------
def test_small_char_model_backends_agree():
    model = ml.Model()
    model += ml.Embedding(11, E)
    model += ml.PositionalEmbedding(16, E)
    model += ml.PositionalEncoding(E)
    model += ml.TransformerBlock(E, H, 16, activation="gelu", is_causal=True)
    model += ml.TransformerBlock(E, H, 16, is_causal=True)
    model += ml.LayerNorm()
    model += ml.Linear(11)
    tokens = np.random.default_rng(0).integers(0, 11, (3, 12))
    g = np.random.default_rng(1).standard_normal((3, 12, 11)).astype(np.float32)
    results = {}
    for name, cls in BACKENDS.items():
        backend = cls(dtype="float32", seed=0)
        compiled = ml.compile(model, backend, shapes={"input": [None, None]})
        out, grads = compiled.evaluate(compiled.get_parameters(), {"input": backend.array(tokens)},
                                       output_gradients={"output": backend.array(g)})
        results[name] = (to_np(backend, out["output"]), {k: to_np(backend, v) for k, v in grads.items()})
    ref_out, ref_grads = results["numpy"]
    assert ref_out.shape == (3, 12, 11)
    # causal: the first 5 positions do not depend on the later ones
    for name, (out, grads) in results.items():
        np.testing.assert_allclose(out, ref_out, rtol=1e-4, atol=1e-4, err_msg=name)
        for k, v in grads.items():
            scale = max(np.abs(ref_grads[k]).max(), 1e-6)
            np.testing.assert_allclose(v, ref_grads[k], rtol=1e-4, atol=1e-4 * scale, err_msg=f"{name} {k}")


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
def test_three_wires_given_one_array_each_get_their_own_gradient(backend_name):
    """Query, key and value as three trainable wires, called with one array object for all
    three: each wire's gradient is its own part, as torch's with three leaves (the NumPy
    VJP's fused self-attention path used to return the sum under 'query' and nothing for
    'key' and 'value')."""
    m = ml.Model()
    m |= ml.MultiHeadAttention(H)(query="q", key="k", value="v", output="output")
    backend = BACKENDS[backend_name](dtype="float64", seed=0)
    c = ml.compile(m, backend, shapes={n: [2, 4, E] for n in "qkv"}, trainable_keys={"q", "k", "v"})
    weights = {k: v for k, v in c.get_parameters().items() if k not in ("q", "k", "v")}
    rng = np.random.default_rng(0)
    x, g = rng.standard_normal((2, 4, E)), rng.standard_normal((2, 4, E))
    xb = backend.array(x)
    out, grads = c.evaluate({**weights, "q": xb, "k": xb, "v": xb}, {},
                            output_gradients={"output": backend.array(g)})
    mha = torch.nn.MultiheadAttention(E, H, batch_first=True, dtype=torch.float64)
    w = {k.removeprefix("multi_head_attention."): torch.tensor(to_np(backend, v))
         for k, v in weights.items()}
    with torch.no_grad():
        mha.in_proj_weight.copy_(w["in_proj_weight"])
        mha.in_proj_bias.copy_(w["in_proj_bias"])
        mha.out_proj.weight.copy_(w["out_proj_weight"])
        mha.out_proj.bias.copy_(w["out_proj_bias"])
    leaves = [torch.tensor(x, requires_grad=True) for _ in range(3)]
    y, _ = mha(*leaves, need_weights=False)
    y.backward(torch.tensor(g))
    np.testing.assert_allclose(to_np(backend, out["output"]), y.detach().numpy(), rtol=0, atol=TOL)
    for name, leaf in zip("qkv", leaves, strict=True):
        np.testing.assert_allclose(to_np(backend, grads[name]), leaf.grad.numpy(), rtol=0,
                                   atol=TOL, err_msg=name)


def test_causal_outputs_ignore_the_future():
    compiled = ml.compile(ml.TransformerBlock(E, H, 16, is_causal=True), NumpyBackend(dtype="float64"),
                          shapes={"input": [None, None, E]})
    params = compiled.get_parameters()
    x = np.random.default_rng(0).standard_normal((2, 7, E))
    y = x.copy()
    y[:, 4:] = 10 * np.random.default_rng(1).standard_normal((2, 3, E))
    a, b = (compiled.evaluate(params, {"input": v})["output"] for v in (x, y))
    np.testing.assert_allclose(a[:, :4], b[:, :4], rtol=0, atol=1e-13)
    assert np.abs(a[:, 4:] - b[:, 4:]).min() > 0


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("block", [lambda: ml.PositionalEmbedding(8, 4), lambda: ml.PositionalEncoding(4, max_len=8)])
def test_sequence_longer_than_the_table_is_named_at_compile_time(block):
    with pytest.raises(ShapeError, match=r"sequence length 9 .* is longer than the position table \(max_len=8\)"):
        ml.compile(block(), NumpyBackend(), shapes={"input": [2, 9, 4]})


@pytest.mark.parametrize("block", [lambda: ml.PositionalEmbedding(8, 4), lambda: ml.PositionalEncoding(4, max_len=8)])
def test_sequence_longer_than_the_table_is_named_before_running(block, backend):
    model = ml.Model()
    model += (op := block())
    calls = []
    forward = op.forward
    op.forward = lambda xp, **kw: calls.append(1) or forward(xp, **kw)
    compiled = ml.compile(model, backend, shapes={"input": [None, None, 4]}, jit=False)
    params = compiled.get_parameters()
    ok = compiled.evaluate(params, {"input": backend.randn(2, 8, 4)})
    assert tuple(ok["output"].shape) == (2, 8, 4) and calls == [1]
    with pytest.raises(ShapeError, match=r"sequence length 9 .* longer than the position table \(max_len=8\)"):
        compiled.evaluate(params, {"input": backend.randn(2, 9, 4)})
    assert calls == [1]  # nothing ran


@pytest.mark.parametrize("block, shapes, match", [
    (lambda: ml.MultiHeadAttention(3), {"query": [2, 4, 8], "key": [2, 4, 8], "value": [2, 4, 8]},
     r"embed_dim \(8, the last dimension of 'query'\) must be divisible by num_heads \(3\)"),
    (lambda: ml.MultiHeadAttention(2, embed_dim=6), {"query": [2, 4, 8], "key": [2, 4, 8], "value": [2, 4, 8]},
     "'query' has 8 features but embed_dim is 6"),
    (lambda: ml.MultiHeadAttention(2), {"query": [2, 4, 8], "key": [2, 4, 6], "value": [2, 4, 6]},
     r"or give kdim and embed_dim"),
    (lambda: ml.MultiHeadAttention(2), {"query": [2, 4, 8], "key": [2, 5, 8], "value": [2, 4, 8]},
     "same length"),
    (lambda: ml.ScaledDotProduct(), {"query": [2, 4, 8], "key": [2, 5, 7], "value": [2, 5, 3]},
     "same last dimension"),
    (lambda: ml.ScaledDotProduct(), {"query": [8], "key": [2, 5, 8], "value": [2, 5, 3]}, "rank >= 2"),
    (lambda: ml.ScaledDotProduct(use_attn_mask=True),
     {"query": [2, 4, 8], "key": [2, 5, 8], "value": [2, 5, 3], "attn_mask": [4, 4]}, "do not broadcast"),
    (lambda: ml.PositionalEmbedding(8, 4), {"input": [2, 5, 3]}, "must have 4 features"),
    (lambda: ml.PositionalEncoding(4), {"input": [4]}, "rank >= 2"),
])
def test_bad_shapes_are_named_at_compile_time(block, shapes, match):
    with pytest.raises(ShapeError, match=match):
        ml.compile(block(), NumpyBackend(), shapes=shapes)


def test_integer_mask_is_a_dtype_error(backend):
    compiled = ml.compile(ml.ScaledDotProduct(use_attn_mask=True), backend)
    x = backend.randn(2, 3, 4)
    with pytest.raises(DTypeError, match="attn_mask.*booleans or floats"):
        compiled.evaluate({}, {"query": x, "key": x, "value": x, "attn_mask": np.ones((3, 3), dtype=np.int64)})


@pytest.mark.parametrize("make, match", [
    (lambda: ml.ScaledDotProduct(is_causal=True, use_attn_mask=True), "exclude each other"),
    (lambda: ml.MultiHeadAttention(2, is_causal=True, use_attn_mask=True), "exclude each other"),
    (lambda: ml.MultiHeadAttention(0), "num_heads must be a positive int"),
    (lambda: ml.MultiHeadAttention(3, embed_dim=8), r"embed_dim \(8\) must be divisible by num_heads \(3\)"),
    (lambda: ml.TransformerBlock(8, 2, 16, activation="swish"), "activation must be 'relu', 'gelu'"),
    (lambda: ml.TransformerBlock(8, 3), "must be divisible by num_heads"),
    (lambda: ml.PositionalEmbedding(0, 4), "max_len must be a positive int"),
    (lambda: ml.PositionalEncoding(4, max_len=-1), "max_len must be a positive int"),
])
def test_bad_arguments_are_named_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()
