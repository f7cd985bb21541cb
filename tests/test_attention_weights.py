"""``AttentionWeights``: torch's ``nn.MultiheadAttention(..., need_weights=True)`` weights,
averaged over the heads or per head, with key padding, float / bool / causal masks, kdim,
self-attention; float64 on NumPy, torch and JAX (a subprocess, x64): the weights and the
gradients of the query, key, float masks and in-projection within 1e-10 of torch's autograd.
Then one model holding a ``MultiHeadAttention`` and its ``AttentionWeights`` on one shared
in-projection, against torch's one call returning both, and the NumPy VJP against finite
differences.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import (
    BACKENDS,
    assert_arrays_within,
    jax_case_params,
    jax_float64_results,
    selected_cases,
    to_np,
)

import mithril as ml
from mithril.models.attention_weights import AttentionWeights

TOL = 1e-10
E, H, L = 8, 2, 5
CASES = {  # case: options (average_attn_weights, kdim, key padding, mask kind, causal, self)
    "average": {"avg": True},
    "per_head": {"avg": False},
    "average_kpm_float_mask": {"avg": True, "kpm": True, "mask": "float"},
    "per_head_kdim_bool_mask": {"avg": False, "kdim": 3, "mask": "bool"},
    "average_causal_self": {"avg": True, "causal": True, "self_attn": True},
    "per_head_kpm_self": {"avg": False, "kpm": True, "self_attn": True},
}


def setup(case: str):
    """(model, trainable shapes, fixed data, params, cotangent, S) of ``case``."""
    o = CASES[case]
    rng = np.random.default_rng(sum(map(ord, case)))
    opts = {"use_key_padding_mask": o.get("kpm", False), "use_attn_mask": "mask" in o,
            "is_causal": o.get("causal", False)}
    if o.get("kdim"):
        opts.update(embed_dim=E, kdim=o["kdim"])
    s = L if o.get("self_attn") else 6
    ins = {"query": "x", "key": "x"} if o.get("self_attn") else {"query": "query", "key": "key"}
    extra = ({"key_padding_mask": "kpm"} if o.get("kpm") else {}) | ({"attn_mask": "mask"} if "mask" in o else {})
    model = ml.Model()
    model |= AttentionWeights(H, average_attn_weights=o["avg"], **opts)(**ins, **extra, output="output")
    shapes = {"x": (2, L, E)} if o.get("self_attn") else {"query": (2, L, E), "key": (2, s, o.get("kdim") or E)}
    data = {}
    if o.get("kpm"):  # no row wholly padded: torch's weights are NaN there (ours: zeros)
        data["kpm"] = np.array([[False] * (s - 2) + [True] * 2, [True] + [False] * (s - 1)])
    if o.get("mask") == "float":
        shapes["mask"] = (L, s)
    if o.get("mask") == "bool":
        data["mask"] = rng.random((L, s)) > 0.8
    return model, shapes, data, rng, s


def run_mithril(case: str, backend_name: str) -> dict[str, np.ndarray]:
    model, shapes, data, rng, _ = setup(case)
    backend = BACKENDS[backend_name](dtype="float64")
    c = ml.compile(model, backend, shapes={**shapes, **{k: v.shape for k, v in data.items()}},
                   trainable_keys=list(shapes))
    params = {k: rng.standard_normal(s) * 0.5 for k, s in c.parameter_shapes.items()}
    cot = rng.standard_normal(c.program.output_shape("output"))
    out, grads = c.evaluate({k: backend.array(v) for k, v in params.items()},
                            {k: backend.array(v) for k, v in data.items()},
                            output_gradients={"output": backend.array(cot)})
    return {"out": to_np(backend, out["output"]), **{f"grad|{k}": to_np(backend, v) for k, v in grads.items()},
            **{f"param|{k}": v for k, v in params.items()}, "cot": cot}


def run_torch(case: str, got: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """torch's weights and gradients on the parameters and cotangent ``got`` used."""
    o = CASES[case]
    _, _, data, _, s = setup(case)
    t = {k.split("|", 1)[1]: torch.tensor(v, requires_grad=True) for k, v in got.items() if k.startswith("param|")}
    kdim = o.get("kdim")
    mod = torch.nn.MultiheadAttention(E, H, kdim=kdim, vdim=E if kdim else None, batch_first=True,
                                      dtype=torch.float64)
    pp = {k.split(".", 1)[1]: v for k, v in t.items() if "." in k}
    pp.update({"out_proj.weight": torch.eye(E, dtype=torch.float64), "out_proj.bias": torch.zeros(E, dtype=torch.float64)})
    if kdim:
        pp.setdefault("v_proj_weight", torch.zeros(E, E, dtype=torch.float64))
    q, k = (t["x"], t["x"]) if o.get("self_attn") else (t["query"], t["key"])
    kw = {"need_weights": True, "average_attn_weights": o["avg"]}
    if o.get("kpm"):
        kw["key_padding_mask"] = torch.tensor(data["kpm"])
    if o.get("mask"):
        kw["attn_mask"] = t["mask"] if o["mask"] == "float" else torch.tensor(data["mask"])
    if o.get("causal"):
        kw["attn_mask"] = torch.nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
    want = torch.func.functional_call(mod, pp, (q, k, torch.zeros(2, s, E, dtype=torch.float64)), kw)[1]
    tg = torch.autograd.grad(want, list(t.values()), torch.tensor(got["cot"]), allow_unused=True)
    return {"out": want.detach().numpy(),
            **{f"grad|{k}": torch.zeros_like(v).numpy() if g is None else g.numpy() for (k, v), g in zip(t.items(), tg)}}


def compare(case: str, got: dict[str, np.ndarray], what: str) -> None:
    want = run_torch(case, got)
    assert_arrays_within({k: v for k, v in got.items() if k in want}, want, TOL, f"{what} {case}")


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
@pytest.mark.parametrize("case", list(CASES))
def test_equals_torch_need_weights(case, backend_name):
    compare(case, run_mithril(case, backend_name), backend_name)


@pytest.fixture(scope="module")
def jax_results(request):
    return jax_float64_results("test_attention_weights", "CASES", "run_mithril",
        only=selected_cases(request, "case", list(CASES)))


@pytest.mark.parametrize("case", jax_case_params(list(CASES)))
def test_jax_equals_torch_need_weights(case, jax_results):
    compare(case, jax_results[case], "jax")


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
def test_shared_in_projection_is_torchs_one_call(backend_name):
    """MultiHeadAttention and AttentionWeights on one in-projection: torch's (output, weights)
    of one call, and the gradients of a loss on both (the in-projection's add up)."""
    model = ml.Model()
    model |= ml.MultiHeadAttention(H, use_key_padding_mask=True)(
        query="x", key="x", value="x", key_padding_mask="kpm", in_proj_weight="in_proj_weight",
        in_proj_bias="in_proj_bias", out_proj_weight="out_proj_weight", out_proj_bias="out_proj_bias",
        output=ml.IOKey("output"))
    model |= AttentionWeights(H, average_attn_weights=False, use_key_padding_mask=True)(
        query="x", key="x", key_padding_mask="kpm", in_proj_weight="in_proj_weight",
        in_proj_bias="in_proj_bias", output=ml.IOKey("weights"))
    backend = BACKENDS[backend_name](dtype="float64")
    kpm = np.array([[False, False, True, False, True], [False] * 5])
    c = ml.compile(model, backend, shapes={"x": (2, L, E), "kpm": kpm.shape}, trainable_keys=["x"])
    assert sorted(c.parameter_shapes) == ["in_proj_bias", "in_proj_weight", "out_proj_bias", "out_proj_weight", "x"]
    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(s) * 0.5 for k, s in c.parameter_shapes.items()}
    cots = {k: rng.standard_normal(c.program.output_shape(k)) for k in ("output", "weights")}
    out, grads = c.evaluate({k: backend.array(v) for k, v in params.items()}, {"kpm": backend.array(kpm)},
                            output_gradients={k: backend.array(v) for k, v in cots.items()})
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    mod = torch.nn.MultiheadAttention(E, H, batch_first=True, dtype=torch.float64)
    pp = {k.replace("out_proj_", "out_proj."): v for k, v in t.items() if k != "x"}
    y, w = torch.func.functional_call(mod, pp, (t["x"], t["x"], t["x"]),
                                      {"key_padding_mask": torch.tensor(kpm), "average_attn_weights": False})
    tg = torch.autograd.grad([y, w], list(t.values()), [torch.tensor(cots["output"]), torch.tensor(cots["weights"])])
    got = {"output": to_np(backend, out["output"]), "weights": to_np(backend, out["weights"]),
           **{f"d{k}": to_np(backend, v) for k, v in grads.items()}}
    want = {"output": y.detach().numpy(), "weights": w.detach().numpy(),
            **{f"d{k}": g.numpy() for k, g in zip(t, tg)}}
    assert_arrays_within(got, want, TOL, backend_name)


def test_numpy_vjp_matches_finite_differences(eps=1e-6):
    model = ml.Model()
    model |= AttentionWeights(2, average_attn_weights=True, embed_dim=4, kdim=3, use_attn_mask=True,
                              use_key_padding_mask=True)(query="q", key="k", attn_mask="m",
                                                         key_padding_mask="p", output="output")
    shapes = {"q": (2, 3, 4), "k": (2, 4, 3), "m": (3, 4), "p": (2, 4)}
    c = ml.compile(model, ml.NumpyBackend(dtype="float64"), shapes=shapes, trainable_keys=list(shapes))
    rng = np.random.default_rng(3)
    params = {k: rng.standard_normal(s) for k, s in c.parameter_shapes.items()}
    cot = rng.standard_normal(c.program.output_shape("output"))
    _, grads = c.evaluate(params, {}, output_gradients={"output": cot})
    for name, p in params.items():
        numeric = np.zeros_like(p)
        for i in np.ndindex(p.shape):
            orig, sums = p[i], []
            for x in (orig + eps, orig - eps):
                p[i] = x
                sums.append(float(np.sum(c.evaluate(params, {})["output"] * cot)))
            p[i] = orig
            numeric[i] = (sums[0] - sums[1]) / (2 * eps)
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-6, atol=1e-8, err_msg=name)
