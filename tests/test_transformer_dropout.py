"""``TransformerBlock`` / ``TransformerDecoderBlock`` with ``dropout=p`` against torch's
``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer(dropout=p, batch_first=True)``.

float64, outputs and the gradient of every parameter and the inputs within 1e-12 relative to
the scale, on NumPy and torch (JAX in a subprocess, x64): in inference mode (no dropout), and in
training mode with torch's ``F.dropout`` and ``F.scaled_dot_product_attention`` replaced by
functions that use the masks our library draws (each Dropout block's and each attention's, from
the seed, step 0 and the block's path, in torch's call order), so the training forward and
backward are compared exactly. Then p = 0 is the block without dropout (the same graph), the
NumPy VJP in training mode against finite differences with the mask held (``step=0``), and the
named error.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
from conftest import BACKENDS, jax_case_params, jax_float64_results, selected_cases, to_np

import mithril as ml
from mithril.backends import NumpyBackend
from mithril.models.attention import MultiHeadAttention
from mithril.models.context import keep_threshold, random_bits
from mithril.models.dropout import Dropout
from mithril.models.transformer import TransformerDecoderBlock

TOL = 1e-12
D, H, FF, SEED = 8, 2, 16, 3
_TORCH_NAMES = {"multi_head_attention": "self_attn", "multi_head_attention_0": "self_attn",
                "multi_head_attention_1": "multihead_attn", "linear_0": "linear1",
                "linear_1": "linear2", "layer_norm_0": "norm1", "layer_norm_1": "norm2",
                "layer_norm_2": "norm3"}


def _causal(n):
    return torch.nn.Transformer.generate_square_subsequent_mask(n, dtype=torch.float64)


# case: (decoder, our options, trainable input shapes, fixed inputs, torch forward keywords)
CASES = {
    "encoder_pre_norm": (False, dict(dropout=0.3), {"input": (2, 5, D)}, {}, lambda t: {}),
    "encoder_post_norm_causal_kpm": (
        False, dict(dropout=0.2, norm_first=False, is_causal=True, use_key_padding_mask=True,
                    activation="gelu"),
        {"input": (3, 5, D)}, {"key_padding_mask": np.array([[False] * 4 + [True]] * 3)},
        lambda t: {"src_mask": _causal(5), "is_causal": True,
                   "src_key_padding_mask": t["key_padding_mask"]}),
    "decoder_pre_norm_causal_memory_kpm": (
        True, dict(dropout=0.25, is_causal=True, use_memory_key_padding_mask=True),
        {"input": (2, 4, D), "memory": (2, 6, D)},
        {"memory_key_padding_mask": np.array([[False] * 5 + [True], [True] + [False] * 5])},
        lambda t: {"tgt_mask": _causal(4), "tgt_is_causal": True,
                   "memory_key_padding_mask": t["memory_key_padding_mask"]}),
    "decoder_post_norm": (True, dict(dropout=0.4, norm_first=False),
                          {"input": (2, 3, D), "memory": (2, 5, D)}, {}, lambda t: {}),
}
RUNS = [f"{c}|{m}" for c in CASES for m in ("train", "eval")]


def _block(case):
    decoder, opts, *_ = CASES[case]
    return (TransformerDecoderBlock if decoder else ml.TransformerBlock)(D, H, FF, **opts)


def make(run, backend):
    case = run.split("|")[0]
    _, _, shapes, fixed, _ = CASES[case]
    compiled = ml.compile(_block(case), backend,
                          shapes={**shapes, **{k: v.shape for k, v in fixed.items()}},
                          trainable_keys=list(shapes))
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    params = {n: rng.standard_normal(s) * (0.5 if n not in shapes else 1.0)
              for n, s in compiled.parameter_shapes.items()}
    cot = rng.standard_normal(compiled.program.output_shape("output"))
    return compiled, params, dict(fixed), cot


def run_mithril(run, backend_name):
    backend = BACKENDS[backend_name](dtype="float64", seed=SEED)
    compiled, params, fixed, cot = make(run, backend)
    out, grads = compiled.evaluate({k: backend.array(v) for k, v in params.items()},
                                   {k: backend.array(v) for k, v in fixed.items()},
                                   training=run.endswith("train"), step=0,
                                   output_gradients={"output": backend.array(cot)})
    return {"output": to_np(backend, out["output"]),
            **{f"grad|{k}": to_np(backend, g) for k, g in grads.items()}}


def _keep(shape, p, path):
    """Our mask for a block at ``path`` (seed SEED, step 0), as torch booleans."""
    bits = random_bits(np, tuple(shape), SEED, 0, zlib.crc32(path.encode()))
    return torch.tensor((bits >> 8) >= keep_threshold(p))


def _patch_torch(monkeypatch, compiled, p):
    """torch's dropout and attention kernel with our masks, taken in call order."""
    nodes = compiled.program.nodes
    attn = [n.path for n in nodes if isinstance(n.op, MultiHeadAttention)]
    drops = [n.path for n in nodes if isinstance(n.op, Dropout)]

    def dropout(x, p=0.5, training=True, inplace=False):
        return x * _keep(x.shape, p, drops.pop(0)) / (1 - p) if training and p else x

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
        s = q @ k.transpose(-2, -1) * (scale or 1 / math.sqrt(q.shape[-1]))
        if is_causal:
            s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), -math.inf)
        if attn_mask is not None:
            s = s.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else s + attn_mask
        w = torch.softmax(s, dim=-1)
        path = attn.pop(0)
        if dropout_p:
            w = w * _keep(w.shape, dropout_p, path) / (1 - dropout_p)
        return w @ v

    monkeypatch.setattr(torch.nn.functional, "dropout", dropout)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    return attn, drops


def torch_ref(run, monkeypatch):
    case, mode = run.split("|")
    decoder, opts, shapes, fixed, fwd = CASES[case]
    compiled, params, fixed, cot = make(run, NumpyBackend(dtype="float64"))
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    t.update({k: torch.tensor(v) for k, v in fixed.items()})
    cls = torch.nn.TransformerDecoderLayer if decoder else torch.nn.TransformerEncoderLayer
    layer = cls(D, H, FF, dropout=opts["dropout"], activation=opts.get("activation", "relu"),
                batch_first=True, norm_first=opts.get("norm_first", True), dtype=torch.float64)
    layer.train(mode == "train")
    state = {}
    for k in params:
        if "." in k:
            mod, role = k.rsplit(".", 1)
            state[f"{_TORCH_NAMES[mod]}.{role.replace('out_proj_', 'out_proj.')}"] = t[k]
    assert sorted(state) == sorted(layer.state_dict())
    left = ([], [])
    if mode == "train":
        left = _patch_torch(monkeypatch, compiled, opts["dropout"])
    args = (t["input"], t["memory"]) if decoder else (t["input"],)
    y = torch.func.functional_call(layer, state, args, fwd(t))
    assert left == ([], []), f"masks torch did not ask for: {left}"
    names = [n for n in params]
    grads = torch.autograd.grad(y, [t[n] for n in names], torch.tensor(cot))
    return {"output": y.detach().numpy(), **{f"grad|{n}": g.numpy() for n, g in zip(names, grads)}}


def compare(run, got, monkeypatch, what):
    want = torch_ref(run, monkeypatch)
    assert set(got) == set(want), set(got) ^ set(want)
    errs = {k: float(np.abs(got[k] - want[k]).max()) / max(1.0, float(np.abs(want[k]).max()))
            for k in want}
    bad = {k: e for k, e in errs.items() if not e <= TOL}
    assert not bad, f"{what} {run}: {bad}"


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
@pytest.mark.parametrize("run", RUNS)
def test_equals_torch(run, backend_name, monkeypatch):
    compare(run, run_mithril(run, backend_name), monkeypatch, backend_name)


JAX_RUNS = ["encoder_post_norm_causal_kpm|train", "decoder_pre_norm_causal_memory_kpm|train"]


@pytest.fixture(scope="module")
def jax_results(request):
    return jax_float64_results("test_transformer_dropout", "JAX_RUNS", "run_mithril",
        only=selected_cases(request, "run", list(JAX_RUNS)))


@pytest.mark.parametrize("run", jax_case_params(list(JAX_RUNS)))
def test_jax_equals_torch(run, jax_results, monkeypatch):
    compare(run, jax_results[run], monkeypatch, "jax")


def test_training_is_not_inference():
    compiled, params, fixed, _ = make("decoder_post_norm|train", NumpyBackend(dtype="float64"))
    assert not np.allclose(compiled.evaluate(params, fixed)["output"],
                           compiled.evaluate(params, fixed, training=False)["output"])


@pytest.mark.parametrize("decoder", [False, True])
def test_p0_is_the_block_without_dropout(decoder):
    cls = TransformerDecoderBlock if decoder else ml.TransformerBlock
    shapes = {"input": (2, 4, D), **({"memory": (2, 3, D)} if decoder else {})}
    outs, programs = [], []
    for block in (cls(D, H, FF), cls(D, H, FF, dropout=0.0)):
        c = ml.compile(block, NumpyBackend(dtype="float64", seed=0), shapes=shapes)
        programs.append([(n.path, repr(n.op)) for n in c.program.nodes])
        data = {k: np.random.default_rng(1).standard_normal(s) for k, s in shapes.items()}
        outs.append(c.evaluate(c.get_parameters(), data)["output"])
    assert programs[0] == programs[1]
    np.testing.assert_array_equal(*outs)


def test_numpy_vjp_matches_finite_differences(eps=1e-6):
    block = TransformerDecoderBlock(4, 2, 6, dropout=0.3, norm_first=False)
    compiled = ml.compile(block, NumpyBackend(dtype="float64", seed=2),
                          shapes={"input": (2, 2, 4), "memory": (2, 3, 4)},
                          trainable_keys=["input", "memory"])
    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(v) for k, v in compiled.parameter_shapes.items()}
    cot = rng.standard_normal((2, 2, 4))
    _, grads = compiled.evaluate(params, {}, step=0, output_gradients={"output": cot})
    for name, p in params.items():
        numeric = np.zeros_like(p)
        for i in np.ndindex(p.shape):
            orig, sums = p[i], []
            for x in (orig + eps, orig - eps):
                p[i] = x
                sums.append(float(np.sum(compiled.evaluate(params, {}, step=0)["output"] * cot)))
            p[i] = orig
            numeric[i] = (sums[0] - sums[1]) / (2 * eps)
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-6, atol=1e-8, err_msg=name)


@pytest.mark.parametrize("cls", [ml.TransformerBlock, TransformerDecoderBlock])
def test_bad_dropout_is_named(cls):
    with pytest.raises(ValueError, match=rf"{cls.__name__}: dropout must be a probability in "
                                         r"\[0, 1\), got 1.5"):
        cls(D, H, FF, dropout=1.5)
