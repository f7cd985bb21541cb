"""torch options of attention and the transformer blocks against torch, side by side.

``MultiHeadAttention(use_key_padding_mask=True)`` against ``nn.MultiheadAttention``'s
``key_padding_mask`` (booleans and floats, a batch entry with every key padded, with
``attn_mask`` booleans / floats per head, with ``is_causal``, cross attention, unbatched);
``TransformerBlock`` post-norm (``norm_first=False``, torch's default), ``eps`` and
``src_key_padding_mask``; ``TransformerDecoderBlock`` against ``nn.TransformerDecoderLayer``
(masks on both attentions, pre- and post-norm, no bias). float64 on NumPy, torch and JAX (a
subprocess, x64): the output and the gradient of every parameter and float input within 1e-10
(relative to the output's scale), with our parameters loaded into torch's module through
``torch.func.functional_call``. Then the NumPy VJPs against finite differences and the named
errors.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, jax_case_params, jax_float64, selected_cases, to_np
from test_attention_blocks import _causal, _mha_params, max_error, mha_ref

import mithril as ml
from mithril.backends import NumpyBackend
from mithril.errors import DTypeError, ShapeError
from mithril.models.transformer import TransformerDecoderBlock

TOL = 1e-10
E, H = 8, 2


def _pad(shape, seed=0, full_row=True):
    """Booleans (True: padding), the last key of every entry padded, and entry 0 wholly
    padded when ``full_row`` (torch's need_weights=False path gives zeros there)."""
    m = np.random.default_rng(seed).random(shape) > 0.6
    m[..., -1] = True
    if full_row:
        m[0] = True
    return m


def _mha(block, cross=False, mask=False):
    m = ml.Model()
    qkv = {"query": "query", "key": "key", "value": "value"} if cross else \
        {"query": "x", "key": "x", "value": "x"}
    extra = {"attn_mask": "attn_mask"} if mask else {}
    m |= block(**qkv, key_padding_mask="key_padding_mask", output="output", **extra)
    return m


def _kpm(t):
    return t["key_padding_mask"]


# name -> (model factory, trainable input shapes, fixed inputs, torch reference(t))
CASES = {
    "mha_kpm_bool": (lambda: _mha(ml.MultiHeadAttention(H, use_key_padding_mask=True)),
                     {"x": (3, 5, E)}, {"key_padding_mask": _pad((3, 5))},
                     mha_ref("x", "x", "x", key_padding_mask=_kpm)),
    "mha_kpm_float": (lambda: _mha(ml.MultiHeadAttention(H, use_key_padding_mask=True)),
                      {"x": (2, 5, E), "key_padding_mask": (2, 5)}, {},
                      mha_ref("x", "x", "x", key_padding_mask=_kpm)),
    "mha_kpm_bool_cross_bool_mask": (
        lambda: _mha(ml.MultiHeadAttention(H, use_attn_mask=True, use_key_padding_mask=True),
                     cross=True, mask=True),
        {"query": (3, 4, E), "key": (3, 6, E), "value": (3, 6, E)},
        {"key_padding_mask": _pad((3, 6), full_row=False),
         "attn_mask": np.random.default_rng(1).random((4, 6)) > 0.7},
        mha_ref("query", "key", "value", key_padding_mask=_kpm, attn_mask=lambda t: t["attn_mask"])),
    "mha_kpm_bool_float_mask_per_head": (
        lambda: _mha(ml.MultiHeadAttention(H, use_attn_mask=True, use_key_padding_mask=True),
                     mask=True),
        {"x": (2, 5, E), "attn_mask": (2, H, 5, 5)}, {"key_padding_mask": _pad((2, 5), 2)},
        mha_ref("x", "x", "x", key_padding_mask=_kpm,
                attn_mask=lambda t: t["attn_mask"].reshape(2 * H, 5, 5))),
    "mha_kpm_float_float_mask": (
        lambda: _mha(ml.MultiHeadAttention(H, use_attn_mask=True, use_key_padding_mask=True),
                     mask=True),
        {"x": (2, 4, E), "attn_mask": (4, 4), "key_padding_mask": (2, 4)}, {},
        mha_ref("x", "x", "x", key_padding_mask=_kpm, attn_mask=lambda t: t["attn_mask"])),
    "mha_kpm_bool_causal": (lambda: _mha(ml.MultiHeadAttention(4, is_causal=True, use_key_padding_mask=True)),
                            {"x": (3, 6, E)}, {"key_padding_mask": _pad((3, 6), 3)},
                            mha_ref("x", "x", "x", heads=4, key_padding_mask=_kpm,
                                    attn_mask=lambda t: _causal(6), is_causal=True)),
    "mha_kpm_unbatched": (lambda: _mha(ml.MultiHeadAttention(H, use_key_padding_mask=True), cross=True),
                          {"query": (3, E), "key": (5, E), "value": (5, E)},
                          {"key_padding_mask": np.array([False, True, False, False, True])},
                          mha_ref("query", "key", "value", key_padding_mask=_kpm)),
}


_TORCH_NAMES = {"multi_head_attention": "self_attn", "multi_head_attention_0": "self_attn",
                "multi_head_attention_1": "multihead_attn", "linear_0": "linear1",
                "linear_1": "linear2", "layer_norm_0": "norm1", "layer_norm_1": "norm2",
                "layer_norm_2": "norm3"}


def layer_ref(decoder, activation="relu", norm_first=True, eps=1e-5, bias=True, **masks):
    """torch's ``TransformerEncoderLayer`` / ``DecoderLayer`` on our parameters; ``masks``:
    torch's forward keyword -> our input name (or a callable of ``t``)."""
    def ref(t):
        cls = torch.nn.TransformerDecoderLayer if decoder else torch.nn.TransformerEncoderLayer
        layer = cls(E, H, 16, dropout=0.0, activation=activation, layer_norm_eps=eps,
                    batch_first=True, norm_first=norm_first, bias=bias, dtype=torch.float64)
        params = {}
        for k, v in t.items():
            if "." in k:
                mod, role = k.rsplit(".", 1)
                params[f"{_TORCH_NAMES[mod]}.{role.replace('out_proj_', 'out_proj.')}"] = v
        assert sorted(params) == sorted(layer.state_dict())
        kw = {a: f(t) if callable(f) else t[f] for a, f in masks.items()}
        args = (t["input"], t["memory"]) if decoder else (t["input"],)
        return torch.func.functional_call(layer, params, args, kw)
    return ref


def _dec(**opts):
    return TransformerDecoderBlock(E, H, 16, **opts)


CASES.update({
    "encoder_post_norm_relu_eps": (lambda: ml.TransformerBlock(E, H, 16, eps=1e-2, norm_first=False),
                                   {"input": (2, 5, E)}, {}, layer_ref(False, norm_first=False, eps=1e-2)),
    "encoder_post_norm_gelu_kpm": (
        lambda: ml.TransformerBlock(E, H, 16, activation="gelu", norm_first=False,
                                    use_key_padding_mask=True),
        {"input": (3, 5, E)}, {"key_padding_mask": _pad((3, 5), 4)},
        layer_ref(False, "gelu", norm_first=False, src_key_padding_mask="key_padding_mask")),
    "encoder_causal_float_kpm": (
        lambda: ml.TransformerBlock(E, H, 16, is_causal=True, use_key_padding_mask=True),
        {"input": (2, 6, E), "key_padding_mask": (2, 6)}, {},
        layer_ref(False, src_key_padding_mask="key_padding_mask", is_causal=lambda t: True,
                  src_mask=lambda t: _causal(6))),
    "encoder_post_norm_no_bias_mask": (
        lambda: ml.TransformerBlock(E, H, 16, use_attn_mask=True, use_bias=False, norm_first=False),
        {"input": (2, 4, E)}, {"attn_mask": np.random.default_rng(5).random((4, 4)) > 0.7},
        layer_ref(False, norm_first=False, bias=False, src_mask="attn_mask")),
    "decoder_causal_memory_kpm": (
        lambda: _dec(is_causal=True, use_memory_key_padding_mask=True),
        {"input": (3, 5, E), "memory": (3, 6, E)}, {"memory_key_padding_mask": _pad((3, 6), 6, False)},
        layer_ref(True, tgt_mask=lambda t: _causal(5), tgt_is_causal=lambda t: True,
                  memory_key_padding_mask="memory_key_padding_mask")),
    "decoder_post_norm_gelu_all_masks": (
        lambda: _dec(activation="gelu", eps=1e-3, norm_first=False, use_tgt_mask=True,
                     use_memory_mask=True, use_tgt_key_padding_mask=True,
                     use_memory_key_padding_mask=True),
        {"input": (2, 4, E), "memory": (2, 5, E), "tgt_mask": (4, 4)},
        {"memory_mask": np.random.default_rng(7).random((4, 5)) > 0.8,
         "tgt_key_padding_mask": _pad((2, 4), 8, False),
         "memory_key_padding_mask": _pad((2, 5), 9, False)},
        layer_ref(True, "gelu", norm_first=False, eps=1e-3, tgt_mask="tgt_mask",
                  memory_mask="memory_mask", tgt_key_padding_mask="tgt_key_padding_mask",
                  memory_key_padding_mask="memory_key_padding_mask")),
    "decoder_no_bias_unbatched": (lambda: _dec(use_bias=False), {"input": (4, E), "memory": (3, E)}, {},
                                  layer_ref(True, bias=False)),
})


def mha_dims_ref(kdim, vdim, bias=True, heads=H, **extra):
    """``nn.MultiheadAttention(E, heads, kdim=kdim, vdim=vdim)`` on our parameters."""
    def ref(t):
        mod = torch.nn.MultiheadAttention(E, heads, bias=bias, kdim=kdim, vdim=vdim,
                                          batch_first=True, dtype=torch.float64)
        params = _mha_params(t, "multi_head_attention.")
        assert sorted(params) == sorted(mod.state_dict())
        kw = {"need_weights": False, **{a: f(t) for a, f in extra.items()}}
        return torch.func.functional_call(mod, params, (t["query"], t["key"], t["value"]), kw)[0]
    return ref


def _kv_dims(**opts):
    return ml.MultiHeadAttention(H, embed_dim=E, **opts)


CASES.update({
    "mha_kdim_vdim": (lambda: _kv_dims(kdim=5, vdim=3),
                      {"query": (2, 4, E), "key": (2, 6, 5), "value": (2, 6, 3)}, {},
                      mha_dims_ref(5, 3)),
    "mha_kdim_no_bias_kpm_causal": (
        lambda: _mha(ml.MultiHeadAttention(4, embed_dim=E, use_bias=False, is_causal=True,
                                           use_key_padding_mask=True, kdim=6), cross=True),
        {"query": (3, 5, E), "key": (3, 5, 6), "value": (3, 5, E)}, {"key_padding_mask": _pad((3, 5), 11)},
        mha_dims_ref(6, None, bias=False, heads=4, key_padding_mask=_kpm,
                     attn_mask=lambda t: _causal(5), is_causal=lambda t: True)),
    "mha_vdim_float_mask_unbatched": (
        lambda: _mha(ml.MultiHeadAttention(H, embed_dim=E, use_attn_mask=True, use_key_padding_mask=True,
                                           vdim=2), cross=True, mask=True),
        {"query": (3, E), "key": (4, E), "value": (4, 2), "attn_mask": (3, 4), "key_padding_mask": (4,)}, {},
        mha_dims_ref(None, 2, key_padding_mask=_kpm, attn_mask=lambda t: t["attn_mask"])),
})


def _gqa(**kw):
    def ref(t):
        mask = {"attn_mask": t["attn_mask"]} if "attn_mask" in t else {}
        return F.scaled_dot_product_attention(t["query"], t["key"], t["value"], enable_gqa=True,
                                              **mask, **kw)
    return ref


CASES.update({
    "sdpa_gqa": (lambda: ml.ScaledDotProduct(enable_gqa=True),
                 {"query": (2, 4, 5, 3), "key": (2, 2, 6, 3), "value": (2, 2, 6, 2)}, {}, _gqa()),
    "sdpa_gqa_causal_scale_broadcast": (lambda: ml.ScaledDotProduct(is_causal=True, scale=0.4, enable_gqa=True),
                                        {"query": (2, 6, 5, 3), "key": (2, 5, 3), "value": (2, 5, 4)}, {},
                                        _gqa(is_causal=True, scale=0.4)),
    "sdpa_mqa_bool_mask": (lambda: ml.ScaledDotProduct(use_attn_mask=True, enable_gqa=True),
                           {"query": (3, 4, 3), "key": (1, 5, 3), "value": (1, 5, 2)},
                           {"attn_mask": np.random.default_rng(12).random((4, 5)) > 0.3}, _gqa()),
    "sdpa_gqa_float_mask": (lambda: ml.ScaledDotProduct(use_attn_mask=True, enable_gqa=True),
                            {"query": (2, 4, 3, 2), "key": (2, 2, 4, 2), "value": (2, 2, 4, 3),
                             "attn_mask": (2, 4, 3, 4)}, {}, _gqa()),
})


# -- the harness: our block on one backend, torch's on our parameters ---------------------------
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
    backend = BACKENDS[backend_name](dtype="float64")
    compiled, params, fixed, cot = make(case, backend)
    native = {k: backend.array(v) for k, v in params.items()}
    ins = {k: backend.array(v) for k, v in fixed.items()}
    out, grads = compiled.evaluate(native, ins, output_gradients={"output": backend.array(cot)})
    return to_np(backend, out["output"]), {k: to_np(backend, g) for k, g in grads.items()}


def compare(case: str, out, grads, what: str) -> None:
    _, params, fixed, cot = make(case, NumpyBackend(dtype="float64"))
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    want = CASES[case][3]({**t, **{k: torch.tensor(v) for k, v in fixed.items()}})
    assert not torch.isnan(want).any(), "torch gave NaN: not a comparable case"
    tg = torch.autograd.grad(want, list(t.values()), torch.tensor(cot), allow_unused=True)
    want_grads = {k: np.zeros_like(params[k]) if g is None else g.numpy() for k, g in zip(t, tg)}
    assert set(grads) == set(want_grads)
    errs = {"output": max_error(out, want.detach().numpy()),
            **{f"gradient of {k}": max_error(grads[k], want_grads[k]) for k in want_grads}}
    bad = {k: e for k, e in errs.items() if not e <= TOL}
    assert not bad, f"{what} {case}: {bad}"


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
            out, grads = run_mithril(case, "jax")
            flat[case + "|output"] = np.asarray(out)
            flat.update({case + "|grad|" + k: np.asarray(v) for k, v in grads.items()})
    return flat


@pytest.mark.parametrize("case", jax_case_params(list(CASES)))
def test_jax_equals_torch(case, jax_results):
    grads = {k.split("|", 2)[2]: v for k, v in jax_results.items() if k.startswith(case + "|grad|")}
    compare(case, jax_results[case + "|output"], grads, what="jax")


# -- finite differences of the NumPy VJPs (float masks are differentiable inputs) ---------------
FD_CASES = {
    "mha_kpm_float_float_mask": (
        lambda: _mha(ml.MultiHeadAttention(2, use_attn_mask=True, use_key_padding_mask=True), mask=True),
        {"x": (2, 3, 4), "attn_mask": (3, 3), "key_padding_mask": (2, 3)}, {}),
    "mha_kdim_vdim_kpm_float": (
        lambda: _mha(ml.MultiHeadAttention(2, embed_dim=4, use_key_padding_mask=True, kdim=3, vdim=2),
                     cross=True),
        {"query": (2, 2, 4), "key": (2, 3, 3), "value": (2, 3, 2), "key_padding_mask": (2, 3)}, {}),
    "sdpa_gqa_causal": (lambda: ml.ScaledDotProduct(is_causal=True, enable_gqa=True),
                        {"query": (1, 4, 3, 2), "key": (1, 2, 3, 2), "value": (1, 2, 3, 2)}, {}),
    "mha_kpm_bool_causal_cross": (
        lambda: _mha(ml.MultiHeadAttention(2, is_causal=True, use_key_padding_mask=True), cross=True),
        {"query": (2, 3, 4), "key": (2, 3, 4), "value": (2, 3, 4)},
        {"key_padding_mask": np.array([[False, True, False], [True, False, False]])}),
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
    _, grads = compiled.evaluate(params, fixed, output_gradients={"output": cot})
    assert set(grads) == set(params)
    for name, p in params.items():
        numeric = np.zeros_like(p)
        for i in np.ndindex(p.shape):
            orig, sums = p[i], []
            for x in (orig + eps, orig - eps):
                p[i] = x
                sums.append(float(np.sum(compiled.evaluate(params, fixed)["output"] * cot)))
            p[i] = orig
            numeric[i] = (sums[0] - sums[1]) / (2 * eps)
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-6, atol=1e-8,
                                   err_msg=f"{case}: gradient of '{name}'")


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shapes, match", [
    ({"x": [2, 5, E], "key_padding_mask": [2, 4]}, r"'key_padding_mask' must be \(…, S\) with S = 5"),
    ({"x": [2, 5, E], "key_padding_mask": [3, 5]}, "key_padding_mask"),
    ({"x": [2, 5, E], "key_padding_mask": [4, 2, 5]}, "not enlarge them"),
])
def test_bad_key_padding_mask_shapes_are_named(shapes, match):
    with pytest.raises(ShapeError, match=match):
        ml.compile(_mha(ml.MultiHeadAttention(H, use_key_padding_mask=True)), NumpyBackend(),
                   shapes=shapes)


def test_integer_key_padding_mask_is_a_dtype_error(backend):
    compiled = ml.compile(_mha(ml.MultiHeadAttention(H, use_key_padding_mask=True)), backend,
                          shapes={"x": [2, 3, E]})
    x = backend.randn(2, 3, E)
    with pytest.raises(DTypeError, match="key_padding_mask.*booleans or floats"):
        compiled.evaluate(compiled.get_parameters(),
                          {"x": x, "key_padding_mask": np.zeros((2, 3), dtype=np.int64)})


@pytest.mark.parametrize("make, match", [
    (lambda: _dec(is_causal=True, use_tgt_mask=True), "TransformerDecoderBlock: is_causal and use_tgt_mask"),
    (lambda: _dec(eps=-1.0), "TransformerDecoderBlock: eps must be"),
    (lambda: TransformerDecoderBlock(E, H, 0), "TransformerDecoderBlock: dim_feedforward must be"),
    (lambda: TransformerDecoderBlock(E, 3), "must be divisible by num_heads"),
])
def test_bad_decoder_arguments_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_decoder_memory_of_another_width_is_named():
    with pytest.raises(ShapeError, match=r"'key' must have the query's embed_dim \(8\).*'memory' \[2, 5, 10\]"):
        ml.compile(_dec(), NumpyBackend(), shapes={"input": [2, 4, E], "memory": [2, 5, E + 2]})


def test_torchs_per_head_mask_layout_is_named():
    """torch's 3-D (N·num_heads, L, S) mask is (N, num_heads, L, S) here: the error says so."""
    m = ml.Model()
    m |= ml.MultiHeadAttention(H, use_attn_mask=True)(query="x", key="x", value="x",
                                                      attn_mask="attn_mask", output="output")
    with pytest.raises(ShapeError, match=r"\(N·num_heads, L, S\) per-head mask is \(N, num_heads, L, S\)"):
        ml.compile(m, NumpyBackend(), shapes={"x": [3, 5, E], "attn_mask": [3 * H, 5, 5]})


def test_kdim_vdim_names_and_init_are_torchs():
    """The three in-projections under torch's names and shapes, each xavier_uniform_ over
    its own shape; the out-projection U(±1/√E); zero biases."""
    e, kdim, vdim = 64, 48, 80
    params = ml.compile(ml.MultiHeadAttention(4, embed_dim=e, kdim=kdim, vdim=vdim),
                        NumpyBackend(dtype="float64", seed=3),
                        shapes={"query": [2, 3, e], "key": [2, 5, kdim], "value": [2, 5, vdim]}).get_parameters()
    ref = torch.nn.MultiheadAttention(e, 4, kdim=kdim, vdim=vdim, batch_first=True, dtype=torch.float64)
    theirs = {k.replace("out_proj.", "out_proj_"): v.numpy() for k, v in ref.state_dict().items()}
    ours = {k.removeprefix("multi_head_attention."): v for k, v in params.items()}
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    for name, arr in ours.items():
        if name.endswith("bias"):
            assert not arr.any() and not theirs[name].any(), name
            continue
        bound = np.sqrt(6 / sum(arr.shape)) if name != "out_proj_weight" else 1 / np.sqrt(e)
        for a in (arr, theirs[name]):
            assert bound * 0.95 < np.abs(a).max() <= bound, name


@pytest.mark.parametrize("make, match", [
    (lambda: ml.MultiHeadAttention(H, kdim=4), "kdim must be a positive int given with embed_dim"),
    (lambda: ml.MultiHeadAttention(H, embed_dim=E, vdim=0), "vdim must be a positive int"),
])
def test_bad_kdim_vdim_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_key_of_another_width_than_kdim_is_named():
    with pytest.raises(ShapeError, match=r"'key' must have kdim = 5 features.*\[2, 6, 4\]"):
        ml.compile(_kv_dims(kdim=5, vdim=3), NumpyBackend(),
                   shapes={"query": [2, 4, E], "key": [2, 6, 4], "value": [2, 6, 3]})


@pytest.mark.parametrize("shapes, match", [
    ({"query": [2, 4, 5, 3], "key": [2, 3, 6, 3], "value": [2, 3, 6, 2]},
     r"heads of 'key' / 'value' \(3, axis -3\) must divide the heads of 'query'"),
    ({"query": [2, 4, 5, 3], "key": [2, 2, 6, 3], "value": [2, 1, 6, 2]}, "same heads"),
    ({"query": [5, 3], "key": [6, 3], "value": [6, 2]}, "rank >= 3"),
])
def test_bad_gqa_shapes_are_named(shapes, match):
    with pytest.raises(ShapeError, match=match):
        ml.compile(ml.ScaledDotProduct(enable_gqa=True), NumpyBackend(), shapes=shapes)
