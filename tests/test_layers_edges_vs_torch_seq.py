"""Edge cases of the attention and recurrent blocks, side by side with torch in float64 on
NumPy, JAX and torch: every output and the gradient of every parameter and input within
1e-10 (relative to max(1, |torch|)); see ``layer_edges.py``.

Attention: ``is_causal`` with fewer and with more queries than keys (torch's top-left
aligned triangle), an explicit ``scale``, a boolean mask with a row that masks every key and
a float mask with a -inf row (zeros, as torch's SDPA; gradients zero there too), a trainable
float mask (its gradient), one query and one key, and batch axes that broadcast across
query, key and value; ``MultiHeadAttention`` cross-attention (L ≠ S), causal with L < S,
without biases, and with a fully masked row (against ``F.multi_head_attention_forward``).
Recurrent: RNN / LSTM / GRU with one step of one sample, three bidirectional batch-first
layers from given initial states, without biases, and the ReLU RNN (against ``torch.nn``
with the same weights through ``torch.func.functional_call``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from layer_edges import Case, parity_tests, run_mithril

import mithril as ml

_RNG = np.random.default_rng(5)
Q, K, V = (2, 3, 4), (2, 5, 4), (2, 5, 6)
E, HEADS = 8, 2


def sdpa(**kw):
    def ref(t, d):
        mask = d.get("attn_mask", t.get("attn_mask"))
        return {"output": F.scaled_dot_product_attention(t["query"], t["key"], t["value"],
                                                         attn_mask=mask, **kw)}
    return ref


def mha(causal: bool = False):
    """torch's MultiheadAttention forward (batch first) with our parameters."""
    def ref(t, d):
        p = {k.rsplit(".", 1)[-1]: v for k, v in t.items()}
        q, k, v = (p[n].transpose(0, 1) for n in ("query", "key", "value"))
        mask = d.get("attn_mask")
        if causal:
            mask = torch.triu(torch.ones(q.shape[0], k.shape[0], dtype=torch.bool), 1)
        o, _ = F.multi_head_attention_forward(
            q, k, v, E, HEADS, p["in_proj_weight"], p.get("in_proj_bias"), None, None, False, 0.0,
            p["out_proj_weight"], p.get("out_proj_bias"), training=False, need_weights=False,
            attn_mask=mask)
        return {"output": o.transpose(0, 1)}
    return ref


_BOOL = _RNG.random((3, 5)) > 0.4
_BOOL[1] = False  # query 1 sees no key
_MHA_MASK = _RNG.random((3, 5)) > 0.5
_MHA_MASK[2] = True  # True masks (the module's convention): query 2 sees no key

CASES: dict[str, Case] = {
    "sdpa_causal_fewer_queries": Case(lambda: ml.ScaledDotProduct(is_causal=True),
                                      {"query": Q, "key": K, "value": V}, sdpa(is_causal=True)),
    "sdpa_causal_more_queries": Case(lambda: ml.ScaledDotProduct(is_causal=True),
                                     {"query": (2, 6, 4), "key": (2, 3, 4), "value": (2, 3, 6)},
                                     sdpa(is_causal=True)),
    "sdpa_scale": Case(lambda: ml.ScaledDotProduct(scale=0.3), {"query": Q, "key": K, "value": V},
                       sdpa(scale=0.3)),
    "sdpa_bool_mask_fully_masked_row": Case(
        lambda: ml.ScaledDotProduct(use_attn_mask=True), {"query": Q, "key": K, "value": V}, sdpa(),
        data={"attn_mask": _BOOL}),
    "sdpa_float_mask_minus_inf_row": Case(
        lambda: ml.ScaledDotProduct(use_attn_mask=True), {"query": Q, "key": K, "value": V}, sdpa(),
        data={"attn_mask": np.where(_BOOL, 0.0, -np.inf) + _RNG.standard_normal((3, 5))}),
    "sdpa_trainable_float_mask": Case(
        lambda: ml.ScaledDotProduct(use_attn_mask=True),
        {"query": Q, "key": K, "value": V, "attn_mask": (2, 1, 5)}, sdpa()),
    "sdpa_one_query_one_key": Case(lambda: ml.ScaledDotProduct(),
                                   {"query": (2, 1, 4), "key": (2, 1, 4), "value": (2, 1, 6)}, sdpa()),
    "sdpa_broadcast_batch_axes": Case(lambda: ml.ScaledDotProduct(),
                                      {"query": (2, 3, 4, 8), "key": (2, 1, 5, 8), "value": (1, 3, 5, 2)},
                                      sdpa()),
    "mha_cross_attention": Case(lambda: ml.MultiHeadAttention(HEADS),
                                {"query": (2, 3, E), "key": (2, 5, E), "value": (2, 5, E)}, mha()),
    "mha_causal_fewer_queries": Case(lambda: ml.MultiHeadAttention(HEADS, is_causal=True),
                                     {"query": (2, 3, E), "key": (2, 5, E), "value": (2, 5, E)}, mha(True)),
    "mha_no_bias": Case(lambda: ml.MultiHeadAttention(HEADS, use_bias=False),
                        {"query": (2, 3, E), "key": (2, 5, E), "value": (2, 5, E)}, mha()),
    "mha_bool_mask_fully_masked_row": Case(
        lambda: ml.MultiHeadAttention(HEADS, use_attn_mask=True),
        {"query": (2, 3, E), "key": (2, 5, E), "value": (2, 5, E)}, mha(), data={"attn_mask": _MHA_MASK}),
}

IN, H = 3, 4


def recurrent(kind: str, steps: int, batch: int, layers: int, bidirectional: bool,
              batch_first: bool, given_states: bool, **options) -> Case:
    """A :class:`Case` of ``ml.<kind>`` against ``torch.nn.<kind>`` with its weights."""
    d = 2 if bidirectional else 1
    kw = dict(num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, **options)
    inputs = {"input": (batch, steps, IN) if batch_first else (steps, batch, IN)}
    if given_states:
        inputs["initial_hidden"] = (layers * d, batch, H)
        if kind == "LSTM":
            inputs["initial_cell"] = (layers * d, batch, H)
    outputs = ("output", "hidden") + (("cell",) if kind == "LSTM" else ())

    def block():
        return getattr(ml, kind)(H, initial_states=given_states, **kw)

    def ref(t, data):
        module = getattr(torch.nn, kind)(IN, H, dtype=torch.float64, **kw)
        prefix = kind.lower() + "."  # the block's path inside the test's model
        weights = {name: t[ours] for name, ours in block().torch_names(prefix).items()}
        args = (t["input"],)
        if given_states:
            h0 = t["initial_hidden"]
            args += ((h0, t["initial_cell"]) if kind == "LSTM" else h0,)
        y, h = torch.func.functional_call(module, weights, args)
        if kind == "LSTM":
            return {"output": y, "hidden": h[0], "cell": h[1]}
        return {"output": y, "hidden": h}

    return Case(block, inputs, ref, outputs=outputs)


for _kind in ("RNN", "LSTM", "GRU"):
    CASES[f"{_kind.lower()}_one_step_one_sample"] = recurrent(_kind, 1, 1, 1, False, False, False)
    CASES[f"{_kind.lower()}_3_layers_bidirectional_batch_first_given_states"] = recurrent(
        _kind, 4, 2, 3, True, True, True)
    CASES[f"{_kind.lower()}_2_layers_bidirectional_no_bias"] = recurrent(
        _kind, 3, 2, 2, True, False, True, bias=False)
CASES["rnn_relu_2_layers_bidirectional"] = recurrent("RNN", 5, 2, 2, True, True, True,
                                                     nonlinearity="relu")


test_equals_torch, jax_results, test_jax_equals_torch = parity_tests(__name__, CASES)


def test_fully_masked_rows_give_zeros_with_zero_gradients():
    """What the comparison above relies on, said outright: the row whose keys are all masked
    is zeros on every side, and its query gets no gradient (torch's SDPA, not NaN)."""
    name = "sdpa_bool_mask_fully_masked_row"
    params, cots, out, grads = run_mithril(name, CASES[name], "numpy")
    assert np.all(out["output"][:, 1] == 0) and np.all(grads["query"][:, 1] == 0)
    want = F.scaled_dot_product_attention(*(torch.tensor(params[k]) for k in ("query", "key", "value")),
                                          attn_mask=torch.tensor(_BOOL))
    assert torch.all(want[:, 1] == 0)
