"""Network layers side by side with torch at their edges, forward values and gradients, on
NumPy, torch and JAX (float32 and float64; JAX float32 in process, its x64 being
process-wide): cases the per-layer test files do not reach.

1. Max pooling whose dilated windows read padding only (kernel 2, dilation 3, padding 1 over
   an input of 2): −inf as torch, and no gradient (torch's backward writes it through a
   garbage index: out of bounds, a heap corruption).
2. BatchNorm with eps = 0, which torch's F.batch_norm refuses in training mode.
3. RNN / LSTM / GRU over an empty sequence (refused, as torch), then over one step.
4. Attention over no keys (S = 0): zeros, as torch.
5. Max pooling on JAX, dilated or not: −inf and NaN windows route their gradient as torch.
6. GroupNorm's eps: checked as BatchNorm's; 0 and ints as torch.
7. TransformerBlock's eps: checked; a given one is torch's layer_norm_eps.
8. A ReLU RNN at z = 0 (zero-padded steps): torch's zero gradient on JAX too.
9. GroupNorm of an empty input: zero parameter gradients on torch too, and no warnings.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, assert_arrays_within, to_np

import mithril as ml

DTYPES = {"float32": 1e-5, "float64": 1e-12}
CASES = [(bk, dt) for bk in BACKENDS for dt in DTYPES if not (bk == "jax" and dt == "float64")]


def _evaluate(block, backend, inputs: dict, cots: dict,
              params: dict | None = None) -> tuple[dict, dict]:
    """Outputs and gradients (float64 NumPy) of ``block`` with ``inputs`` trainable."""
    c = ml.compile(block, backend, shapes={k: v.shape for k, v in inputs.items()},
                   trainable_keys=list(inputs))
    p = {k: backend.array(v) for k, v in {**(params or {}), **inputs}.items()}
    out, grads = c.evaluate(p, {}, output_gradients={k: backend.array(v) for k, v in cots.items()})
    return {k: to_np(backend, v) for k, v in out.items()}, {k: to_np(backend, v) for k, v in grads.items()}


# -- 1. max pooling: windows of padding only ---------------------------------------------------
@pytest.mark.parametrize("backend_name, dtype", CASES)
@pytest.mark.parametrize("nd, stride", [(1, 2), (2, 2), (2, 1)])
def test_max_pool_windows_of_padding_only_are_minus_inf_without_gradient(backend_name, dtype, nd,
                                                                         stride):
    """NumPy left such windows uninitialised and its VJP wrote out of bounds (a heap
    corruption), as torch's own backward does: the reference is torch's forward with its
    indices, the cotangent added at them where the window holds an input element."""
    backend = BACKENDS[backend_name](dtype=dtype)
    shape = (3, 5, 2) if nd == 1 else (3, 5, 2, 5)
    rng = np.random.default_rng(nd * 10 + stride)
    x = rng.standard_normal(shape).astype(dtype)
    x[1, 2] = -np.inf  # windows of −inf real values: torch's first real element
    block = (ml.MaxPool1D if nd == 1 else ml.MaxPool2D)(2, stride=stride, padding=1, dilation=3)
    model = ml.Model()
    model |= block(input="input", output="output")
    pool = F.max_pool1d if nd == 1 else F.max_pool2d
    want, idx = pool(torch.tensor(x), 2, stride, 1, 3, return_indices=True)
    ones = torch.ones((1, 1, *shape[2:]), dtype=torch.float64)
    inside = pool(F.pad(ones, [1] * 2 * nd), 2, stride, 0, 3) > 0  # windows with an element
    assert not inside.all()  # the case is the one described
    cot = rng.standard_normal(tuple(want.shape)).astype(dtype)
    want_g = torch.zeros(x.shape, dtype=torch.float64).flatten(2).scatter_add_(
        2, torch.where(inside, idx, 0).flatten(2), (torch.tensor(cot).double() * inside).flatten(2))
    out, grads = _evaluate(model, backend, {"input": x}, {"output": cot})
    # (assert_allclose: equal infinities agree)
    np.testing.assert_allclose(out["output"], want.double().numpy(), rtol=0, atol=0)
    np.testing.assert_allclose(grads["input"], want_g.view(shape).numpy(), rtol=0, atol=0)


# -- 2. BatchNorm with eps = 0 -----------------------------------------------------------------
def _batch_norm_eps0(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch's batch-statistics normalisation with eps = 0, which ``F.batch_norm`` refuses in
    training mode: ``F.layer_norm`` (eps = 0 allowed) over each channel's values."""
    c = x.shape[1]
    flat = x.movedim(1, 0).reshape(c, -1)
    y = F.layer_norm(flat, (flat.shape[1],), eps=0.0)
    y = y.reshape(x.movedim(1, 0).shape).movedim(0, 1)
    per_channel = (1, -1) + (1,) * (x.ndim - 2)
    return y * w.reshape(per_channel) + b.reshape(per_channel)


@pytest.mark.parametrize("backend_name, dtype", CASES)
@pytest.mark.parametrize("track", [True, False])
def test_batch_norm_with_eps_0_normalises_by_the_batch_on_every_backend(backend_name, dtype, track):
    """eps = 0 is accepted (eps >= 0); torch's ``F.batch_norm`` refused it in training mode,
    so the torch backend raised where NumPy and JAX normalised. Training mode, then inference
    mode (running statistics, or the batch's again without ``track_running_stats``)."""
    backend = BACKENDS[backend_name](dtype=dtype)
    rng = np.random.default_rng(7)
    shape = (4, 3, 2, 3)
    model = ml.Model()
    model |= ml.BatchNorm2D(3, eps=0.0, track_running_stats=track)(input="input", output="output")
    compiled = ml.compile(model, backend, shapes={"input": shape}, trainable_keys=["input"])
    w, b = rng.standard_normal(3).astype(dtype), rng.standard_normal(3).astype(dtype)
    state = compiled.initial_state_dict
    running = (np.zeros(3), np.ones(3))
    for training in (True, False):
        x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
        cot = rng.standard_normal(shape).astype(dtype)
        params = {k: backend.array({"weight": w, "bias": b, "input": x}[k.rsplit(".", 1)[-1]])
                  for k in compiled.parameter_shapes}
        res = compiled.evaluate(params, {}, output_gradients={"output": backend.array(cot)},
                                training=training, **({"state": state} if track else {}))
        out, grads = res[:2]
        t = {k: torch.tensor(v, requires_grad=True) for k, v in (("input", x), ("weight", w), ("bias", b))}
        if training or not track:
            want = _batch_norm_eps0(t["input"], t["weight"], t["bias"])
        else:
            want = F.batch_norm(t["input"], *(torch.tensor(r, dtype=t["input"].dtype) for r in running),
                                t["weight"], t["bias"], False, 0.0, 0.0)
        want_g = torch.autograd.grad(want, list(t.values()), torch.tensor(cot))
        tol = DTYPES[dtype]
        np.testing.assert_allclose(to_np(backend, out["output"]), want.detach().double().numpy(),
                                   rtol=0, atol=tol * 10)
        for k, g in zip(t, want_g):
            got = grads[next(n for n in grads if n.rsplit(".", 1)[-1] == k)]
            np.testing.assert_allclose(to_np(backend, got), g.double().numpy(), rtol=0, atol=tol * 10,
                                       err_msg=k)
        if track and training:
            state = res[2]
            xt = torch.tensor(x, dtype=torch.float64)
            axes = (0, 2, 3)
            running = (0.1 * xt.mean(axes).numpy(), 0.9 + 0.1 * xt.var(axes, correction=1).numpy())
            got = {k.rsplit(".", 1)[-1]: to_np(backend, v) for k, v in state.items()}
            np.testing.assert_allclose(got["running_mean"], running[0], rtol=0, atol=tol)
            np.testing.assert_allclose(got["running_var"], running[1], rtol=0, atol=tol * 10)


# -- 3. recurrent layers: an empty sequence ----------------------------------------------------
@pytest.mark.parametrize("backend_name, dtype", CASES)
@pytest.mark.parametrize("kind", ["RNN", "LSTM", "GRU"])
def test_recurrent_empty_sequence_is_named_and_changes_nothing(backend_name, dtype, kind):
    """T = 0 is a ShapeError naming the input, at compile time or, for a free length, before
    running (NumPy and torch failed inside ``stack``; JAX returned an empty h_n, where torch
    refuses the sequence); then one step, bidirectional and stacked, equals torch's."""
    backend = BACKENDS[backend_name](dtype=dtype)
    block = getattr(ml, kind)(3, batch_first=True, num_layers=2, bidirectional=True)
    with pytest.raises(ml.ShapeError, match=r"'input' has no time steps \(T = 0 .*\[0, 2, 4\]"):
        ml.compile(block, backend, shapes={"input": (2, 0, 4)})
    compiled = ml.compile(block, backend, shapes={"input": (2, None, 4)})
    ref = getattr(torch.nn, kind)(4, 3, num_layers=2, bidirectional=True, batch_first=True,
                                  dtype=getattr(torch, dtype))
    params = block.params_from_torch(ref.state_dict(), backend=backend)
    with pytest.raises(ml.ShapeError, match=r"'input' has no time steps"):
        compiled.evaluate(params, {"input": backend.array(np.zeros((2, 0, 4), dtype))})
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 1, 4)).astype(dtype)
    out_t, states = ref(torch.tensor(x))
    outs = {"output": out_t, **dict(zip(("hidden", "cell"), states if kind == "LSTM" else (states,)))}
    cots = {k: rng.standard_normal(tuple(v.shape)).astype(dtype) for k, v in outs.items()}
    leaves = {block.torch_names()[n]: p for n, p in ref.named_parameters()}
    want_g = torch.autograd.grad(list(outs.values()), list(leaves.values()),
                                 [torch.tensor(cots[k]) for k in outs])
    out, grads = compiled.evaluate(params, {"input": backend.array(x)},
                                   output_gradients={k: backend.array(v) for k, v in cots.items()})
    tol = DTYPES[dtype]
    assert_arrays_within({k: to_np(backend, v) for k, v in out.items()},
                         {k: v.detach().double().numpy() for k, v in outs.items()}, tol, "outputs")
    assert_arrays_within({k: to_np(backend, v) for k, v in grads.items()},
                         {k: g.double().numpy() for k, g in zip(leaves, want_g)}, tol, "gradients")


# -- 4. attention over no keys -----------------------------------------------------------------
@pytest.mark.parametrize("backend_name, dtype", CASES)
@pytest.mark.parametrize("block", ["sdpa", "mha"])
def test_attention_over_no_keys_is_zeros_as_torch(backend_name, dtype, block):
    """S = 0 keys: torch's attention gives zeros (and zero gradients); NumPy and JAX failed
    with "zero-size array to reduction operation maximum" (the softmax's row maximum)."""
    backend = BACKENDS[backend_name](dtype=dtype)
    rng = np.random.default_rng(11)
    arrays = {"query": rng.standard_normal((2, 3, 4)), "key": rng.standard_normal((2, 0, 4)),
              "value": rng.standard_normal((2, 0, 4))}
    arrays = {k: v.astype(dtype) for k, v in arrays.items()}
    op = ml.ScaledDotProduct(is_causal=True) if block == "sdpa" else ml.MultiHeadAttention(2)
    model = ml.Model()
    model |= op(query="query", key="key", value="value", output="output")
    params = {}
    t = {k: torch.tensor(v, requires_grad=True) for k, v in arrays.items()}
    if block == "sdpa":
        want = F.scaled_dot_product_attention(*t.values(), is_causal=True)
    else:
        ref = torch.nn.MultiheadAttention(4, 2, batch_first=True, dtype=getattr(torch, dtype))
        with torch.no_grad():
            for p in ref.parameters():
                p.normal_()  # non-zero biases: the output is out_proj's bias
        want = ref(*t.values(), need_weights=False)[0]
        params = {f"multi_head_attention.{n.replace('.', '_')}": p.detach().numpy()
                  for n, p in ref.named_parameters()}
        t.update({f"multi_head_attention.{n.replace('.', '_')}": p for n, p in ref.named_parameters()})
    cot = rng.standard_normal(tuple(want.shape)).astype(dtype)
    want_g = torch.autograd.grad(want, list(t.values()), torch.tensor(cot))
    out, grads = _evaluate(model, backend, arrays, {"output": cot}, params)
    tol = DTYPES[dtype]
    assert_arrays_within(out, {"output": want.detach().double().numpy()}, tol, "output")
    assert_arrays_within(grads, {k: g.double().numpy() for k, g in zip(t, want_g)}, tol, "gradients")


# -- 5. dilated max pooling on JAX routes as torch ---------------------------------------------
@pytest.mark.parametrize("backend_name, dtype", CASES)
@pytest.mark.parametrize("nd", [1, 2])
def test_dilated_max_pool_routes_minus_inf_and_nan_windows_as_torch(backend_name, dtype, nd):
    """Dilated windows whose real values are all −inf send the gradient to their first real
    element (JAX sent it to the padding: its argmax took the first −inf) and windows with two
    NaNs to the last (JAX: the first), as torch on every backend, dilated or not
    (tests/test_pool_nonfinite.py covers the undilated windows)."""
    backend = BACKENDS[backend_name](dtype=dtype)
    rng = np.random.default_rng(nd)
    shape = (2, 2, 7) if nd == 1 else (2, 2, 5, 6)
    x = rng.standard_normal(shape).astype(dtype)
    x[1, 0] = -np.inf  # a plane of −inf: every window's real values
    x[0, 1, ..., 1] = x[0, 1, ..., 3] = np.nan  # two NaNs in the windows that hold offsets 0, 1
    model = ml.Model()
    model |= (ml.MaxPool1D if nd == 1 else ml.MaxPool2D)(3, stride=2, padding=1, dilation=2)(
        input="input", output="output")
    tx = torch.tensor(x, requires_grad=True)
    want = (F.max_pool1d if nd == 1 else F.max_pool2d)(tx, 3, 2, 1, 2)
    cot = rng.standard_normal(tuple(want.shape)).astype(dtype)
    (want_g,) = torch.autograd.grad(want, tx, torch.tensor(cot))
    out, grads = _evaluate(model, backend, {"input": x}, {"output": cot})
    np.testing.assert_allclose(out["output"], want.detach().double().numpy(), rtol=0, atol=0)
    np.testing.assert_allclose(grads["input"], want_g.double().numpy(), rtol=0, atol=DTYPES[dtype])


# -- 6. GroupNorm's and LayerNorm's eps ------------------------------------------------------------
NORMS = {  # name: (block of eps, torch's function of (x, w, b, eps), input shape, param prefix)
    "GroupNorm": (lambda eps: ml.GroupNorm(2, eps=eps),
                  lambda x, w, b, eps: F.group_norm(x, 2, w, b, eps), (2, 4, 3), "group_norm"),
    "LayerNorm": (lambda eps: ml.LayerNorm(eps=eps),
                  lambda x, w, b, eps: F.layer_norm(x, (4,), w, b, eps), (2, 3, 4), "layer_norm"),
}


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("backend_name, dtype", CASES)
def test_norm_eps_is_checked_and_is_torchs(backend_name, dtype, norm):
    """A bad eps is named, as BatchNorm's (a string or None raised float()'s unnamed error or
    failed inside the forward, a negative or NaN eps gave NaN outputs, True passed as 1.0);
    a given eps, 0 and an int included, is torch's."""
    block, ref, shape, prefix = NORMS[norm]
    for eps in ("1e-5", -1e-5, float("nan"), True, None):
        with pytest.raises(ValueError, match=fr"{norm}: eps must be a finite float >= 0, got "):
            block(eps)
    # torch's first argument (LayerNorm(16)'s normalized_shape, GroupNorm(2, 6)'s channels)
    # landing on our eps is named, not taken as eps = 16
    with pytest.raises(ValueError, match=fr"{norm}: eps=16 is an int >= 2, which looks like "
                                         fr"torch's normalized_shape"):
        block(16)
    backend = BACKENDS[backend_name](dtype=dtype)
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(shape) * 0.3).astype(dtype)  # small: eps matters
    for eps in (0, 1, 0.25):
        model = ml.Model()
        model |= block(eps)(input="input", output="output")
        w, b = rng.standard_normal(4).astype(dtype), rng.standard_normal(4).astype(dtype)
        t = {k: torch.tensor(v, requires_grad=True) for k, v in (("input", x), ("weight", w), ("bias", b))}
        want = ref(t["input"], t["weight"], t["bias"], eps)
        cot = rng.standard_normal(x.shape).astype(dtype)
        want_g = torch.autograd.grad(want, list(t.values()), torch.tensor(cot))
        params = {f"{prefix}.weight": w, f"{prefix}.bias": b}
        out, grads = _evaluate(model, backend, {"input": x}, {"output": cot}, params)
        tol = DTYPES[dtype] * 10
        assert_arrays_within(out, {"output": want.detach().double().numpy()}, tol, f"output, eps={eps}")
        assert_arrays_within(grads, {k: g.double().numpy() for k, g in
                                     zip(["input", *params], want_g)}, tol, f"gradients, eps={eps}")


# -- 7. TransformerBlock's eps -----------------------------------------------------------------
_TORCH_LAYER = {"layer_norm_0": "norm1", "layer_norm_1": "norm2", "linear_0": "linear1",
                "linear_1": "linear2", "multi_head_attention": "self_attn"}


@pytest.mark.parametrize("backend_name, dtype", CASES)
def test_transformer_block_eps_is_checked_and_is_torchs(backend_name, dtype):
    """A bad eps is named at construction (None failed inside the first LayerNorm's forward, a
    negative one gave NaN); a given eps is torch's ``layer_norm_eps``."""
    for eps in ("x", -1e-5, None, True):
        with pytest.raises(ValueError, match=r"TransformerBlock: eps must be a finite float >= 0"):
            ml.TransformerBlock(4, 2, 8, eps=eps)
    backend = BACKENDS[backend_name](dtype=dtype)
    model = ml.Model()
    model |= ml.TransformerBlock(4, 2, 8, eps=0.25, activation="gelu")(input="input", output="output")
    ref = torch.nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, activation="gelu", layer_norm_eps=0.25,
                                           batch_first=True, norm_first=True, dtype=getattr(torch, dtype))
    params = {}
    for name, p in ref.named_parameters():  # norm1.weight -> transformer_block.layer_norm_0.weight
        layer, role = name.split(".", 1)
        ours = next(k for k, v in _TORCH_LAYER.items() if v == layer)
        params[f"transformer_block.{ours}.{role.replace('.', '_')}"] = p
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((2, 3, 4)) * 0.3).astype(dtype)  # small: eps matters
    tx = torch.tensor(x, requires_grad=True)
    want = ref(tx)
    cot = rng.standard_normal(x.shape).astype(dtype)
    want_g = torch.autograd.grad(want, [tx, *params.values()], torch.tensor(cot))
    out, grads = _evaluate(model, backend, {"input": x}, {"output": cot},
                           {k: v.detach().numpy() for k, v in params.items()})
    tol = DTYPES[dtype] * 10
    assert_arrays_within(out, {"output": want.detach().double().numpy()}, tol, "output")
    assert_arrays_within(grads, {k: g.double().numpy() for k, g in zip(["input", *params], want_g)},
                         tol, "gradients")


# -- 8. ReLU RNN at z = 0 --------------------------------------------------------------------------
@pytest.mark.parametrize("backend_name, dtype", CASES)
def test_relu_rnn_gradient_at_zero_preactivation_is_torchs(backend_name, dtype):
    """Zero-padded steps (both ends) from zero states with no bias give z = 0 exactly: the
    gradient there is torch's 0, not ``jnp.maximum``'s ½ (JAX's input gradient was off by
    O(1))."""
    backend = BACKENDS[backend_name](dtype=dtype)
    block = ml.RNN(3, nonlinearity="relu", bias=False, bidirectional=True)
    ref = torch.nn.RNN(2, 3, nonlinearity="relu", bias=False, bidirectional=True,
                       dtype=getattr(torch, dtype))
    rng = np.random.default_rng(12)
    x = rng.standard_normal((5, 2, 2)).astype(dtype)
    x[:2] = x[-1:] = 0
    tx = torch.tensor(x, requires_grad=True)
    out_t, h_t = ref(tx)
    cots = {"output": rng.standard_normal(tuple(out_t.shape)).astype(dtype),
            "hidden": rng.standard_normal(tuple(h_t.shape)).astype(dtype)}
    leaves = {"input": tx, **{block.torch_names()[n]: p for n, p in ref.named_parameters()}}
    want_g = torch.autograd.grad([out_t, h_t], list(leaves.values()),
                                 [torch.tensor(cots["output"]), torch.tensor(cots["hidden"])])
    params = {k: v.detach().numpy() for k, v in leaves.items() if k != "input"}
    out, grads = _evaluate(block, backend, {"input": x}, cots, params)
    tol = DTYPES[dtype] * 10
    assert_arrays_within(out, {"output": out_t.detach().double().numpy(),
                               "hidden": h_t.detach().double().numpy()}, tol, "outputs")
    assert_arrays_within(grads, {k: g.double().numpy() for k, g in zip(leaves, want_g)}, tol,
                         "gradients")


# -- 9. GroupNorm of an empty input ------------------------------------------------------------
@pytest.mark.parametrize("backend_name, dtype", CASES)
@pytest.mark.parametrize("shape", [(2, 4, 0), (0, 4, 3)], ids=["no_positions", "no_samples"])
def test_group_norm_of_an_empty_input_has_zero_parameter_gradients(backend_name, dtype, shape):
    """torch's ``F.group_norm`` over groups of no positions gives the weight a NaN gradient,
    which the torch backend passed on (NumPy and JAX: 0, an empty sum); the reference is torch's
    output and its gradients of ``x̂ · weight + bias``, x̂ empty."""
    backend = BACKENDS[backend_name](dtype=dtype)
    model = ml.Model()
    model |= ml.GroupNorm(2)(input="input", output="output")
    rng = np.random.default_rng(13)
    params = {"group_norm.weight": rng.standard_normal(4).astype(dtype),
              "group_norm.bias": rng.standard_normal(4).astype(dtype)}
    x = np.zeros(shape, dtype)
    t = {k: torch.tensor(v, requires_grad=True) for k, v in {"input": x, **params}.items()}
    want = F.group_norm(t["input"], 2, t["group_norm.weight"], t["group_norm.bias"])
    y = t["input"] * t["group_norm.weight"].view(-1, 1) + t["group_norm.bias"].view(-1, 1)
    want_g = torch.autograd.grad(y, list(t.values()), torch.zeros(shape, dtype=y.dtype))
    out, grads = _evaluate(model, backend, {"input": x}, {"output": np.zeros(shape, dtype)}, params)
    assert_arrays_within(out, {"output": want.detach().double().numpy()}, 0.0, "output")
    assert_arrays_within(grads, {k: g.double().numpy() for k, g in zip(t, want_g)}, 0.0,
                         "gradients")
