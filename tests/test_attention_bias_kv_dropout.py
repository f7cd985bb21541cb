"""``MultiHeadAttention``'s ``add_bias_kv``, ``add_zero_attn`` and ``dropout`` (and
``AttentionWeights``' with them) against ``torch.nn.MultiheadAttention(batch_first=True)``.

Side by side in float64 on NumPy, torch and JAX (a subprocess, x64): the output, the
need_weights weights (averaged or per head) and the gradient of every parameter (``bias_k`` /
``bias_v`` copied 1:1 from torch's state dict) and float input, within 1e-12 relative to the
scale, with kdim / vdim, no bias, bool / float / per-head masks, key padding, is_causal and
unbatched inputs. In training mode with dropout, torch's ``F.dropout`` is replaced by the mask
our library draws (from the seed, the step and the block's path or ``dropout_key``), so the
training forward and backward are compared exactly, on every backend. Then: inference mode
and p = 0 are no dropout, the statistics of the mask (fraction dropped ≈ p, mean preserved),
same seed and step → same result, the NumPy VJPs against finite differences with the mask
held (``step=0``), one ``make_train_step`` step against its manual equivalent, and the
named errors.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from conftest import BACKENDS, jax_float64_results, to_np

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
from mithril.models.attention_weights import AttentionWeights
from mithril.models.context import keep_threshold, random_bits

TOL = 1e-12
E, H, SEED = 8, 2, 5


def _pad(shape, seed, full_row=False):
    m = np.random.default_rng(seed).random(shape) > 0.6
    m[..., -1] = True
    if full_row:  # every given key padded: the extra keys keep the row finite in torch
        m[0] = True
    return m


def _causal(n):
    return torch.nn.Transformer.generate_square_subsequent_mask(n, dtype=torch.float64)


# case: MultiHeadAttention options, inputs (self-attention "x" or query / key / value), masks,
# weights (None: none; True / False: AttentionWeights averaged / per head), torch forward
# keywords from the tensors ``t``
CASES = {
    "bias_kv_self": dict(opts=dict(add_bias_kv=True), shapes={"x": (2, 5, E)}),
    "zero_attn_self_causal": dict(opts=dict(add_zero_attn=True, is_causal=True),
                                  shapes={"x": (2, 5, E)},
                                  torch=lambda t: {"attn_mask": _causal(5)}),
    "both_cross_bool_masks": dict(
        opts=dict(add_bias_kv=True, add_zero_attn=True, use_attn_mask=True,
                  use_key_padding_mask=True),
        shapes={"query": (3, 4, E), "key": (3, 6, E), "value": (3, 6, E)},
        fixed={"attn_mask": np.random.default_rng(1).random((4, 6)) > 0.7,
               "key_padding_mask": _pad((3, 6), 2, full_row=True)}),
    "both_float_masks_per_head": dict(
        opts=dict(add_bias_kv=True, add_zero_attn=True, use_attn_mask=True,
                  use_key_padding_mask=True),
        shapes={"x": (2, 5, E), "attn_mask": (2, H, 5, 5), "key_padding_mask": (2, 5)},
        torch=lambda t: {"attn_mask": t["attn_mask"].reshape(2 * H, 5, 5),
                         "key_padding_mask": t["key_padding_mask"]}),
    "bias_kv_kdim_vdim_no_bias": dict(
        opts=dict(add_bias_kv=True, embed_dim=E, kdim=5, vdim=3, use_bias=False),
        shapes={"query": (2, 4, E), "key": (2, 6, 5), "value": (2, 6, 3)}),
    "zero_attn_unbatched_kpm": dict(
        opts=dict(add_zero_attn=True, use_key_padding_mask=True),
        shapes={"query": (3, E), "key": (4, E), "value": (4, E)},
        fixed={"key_padding_mask": np.array([False, True, False, True])}),
    "bias_kv_causal_kpm": dict(
        opts=dict(add_bias_kv=True, is_causal=True, use_key_padding_mask=True),
        shapes={"x": (3, 5, E)}, fixed={"key_padding_mask": _pad((3, 5), 3)},
        torch=lambda t: {"attn_mask": _causal(5), "is_causal": True,
                         "key_padding_mask": t["key_padding_mask"]}),
    "weights_average_both_bool_mask": dict(
        opts=dict(add_bias_kv=True, add_zero_attn=True, use_attn_mask=True),
        shapes={"query": (2, 4, E), "key": (2, 6, E), "value": (2, 6, E)},
        fixed={"attn_mask": np.random.default_rng(4).random((4, 6)) > 0.8}, weights=True),
    "weights_per_head_bias_kv_float_kpm": dict(
        opts=dict(add_bias_kv=True, use_key_padding_mask=True),
        shapes={"x": (2, 5, E), "key_padding_mask": (2, 5)}, weights=False),
    # dropout (training mode: compared through our mask, see _fake_dropout)
    "dropout_self": dict(opts=dict(dropout=0.3), shapes={"x": (2, 5, E)}),
    "dropout_both_masks_cross_weights": dict(
        opts=dict(dropout=0.25, add_bias_kv=True, add_zero_attn=True, use_attn_mask=True,
                  use_key_padding_mask=True, dropout_key="attn"),
        shapes={"query": (3, 4, E), "key": (3, 6, E), "value": (3, 6, E), "attn_mask": (4, 6)},
        fixed={"key_padding_mask": _pad((3, 6), 6)}, weights=True),
    "dropout_kdim_causal_weights_per_head": dict(
        opts=dict(dropout=0.5, embed_dim=E, kdim=3, vdim=5, is_causal=True, dropout_key="k2"),
        shapes={"query": (2, 5, E), "key": (2, 5, 3), "value": (2, 5, 5)}, weights=False,
        torch=lambda t: {"attn_mask": _causal(5), "is_causal": True}),
    "dropout_unbatched_bias_kv": dict(opts=dict(dropout=0.4, add_bias_kv=True),
                                      shapes={"query": (3, E), "key": (4, E), "value": (4, E)}),
}
DROPOUT = [c for c in CASES if CASES[c]["opts"].get("dropout")]
RUNS = [f"{c}|{mode}" for c in CASES for mode in (("train", "eval") if c in DROPOUT else ("train",))]
#: the runs JAX checks by default (a subprocess, ~3 s a run); the rest are marked slow
JAX_FAST = ["both_cross_bool_masks|train", "weights_per_head_bias_kv_float_kpm|train",
            "dropout_both_masks_cross_weights|train", "dropout_kdim_causal_weights_per_head|eval"]
JAX_SLOW = [r for r in RUNS if r not in JAX_FAST]


def _model(case):
    """The attention (every parameter named by its role, torch's names with ``_`` for
    ``.``) and, with ``weights``, an AttentionWeights on the same parameters."""
    spec = CASES[case]
    opts, shapes, fixed = spec["opts"], spec["shapes"], spec.get("fixed", {})
    mha = ml.MultiHeadAttention(H, **opts)
    ins = {"query": "x", "key": "x", "value": "x"} if "x" in shapes else \
        {n: n for n in ("query", "key", "value")}
    masks = {n: n for n in ("attn_mask", "key_padding_mask") if n in {**shapes, **fixed}}
    model = ml.Model()
    model |= mha(**ins, **masks, **{r: r for r in mha.param_init}, output=ml.IOKey("output"))
    if spec.get("weights") is not None:
        aw = AttentionWeights(H, average_attn_weights=spec["weights"], **opts)
        model |= aw(query=ins["query"], key=ins["key"], **masks,
                    **{r: r for r in aw.param_init}, output=ml.IOKey("weights"))
    return model


def make(run, backend):
    case, mode = run.split("|")
    spec = CASES[case]
    shapes, fixed = spec["shapes"], spec.get("fixed", {})
    compiled = ml.compile(_model(case), backend,
                          shapes={**shapes, **{k: v.shape for k, v in fixed.items()}},
                          trainable_keys=list(shapes))
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    params = {n: rng.standard_normal(s) * (0.5 if n not in shapes else 1.0)
              for n, s in compiled.parameter_shapes.items()}
    outs = ("output", "weights") if spec.get("weights") is not None else ("output",)
    cots = {k: rng.standard_normal(compiled.program.output_shape(k)) for k in outs}
    return compiled, params, dict(fixed), cots


def run_mithril(run, backend_name):
    """Outputs and gradients of ``run`` (``case|train`` at step 0, or ``case|eval``)."""
    backend = BACKENDS[backend_name](dtype="float64", seed=SEED)
    compiled, params, fixed, cots = make(run, backend)
    nat = {k: backend.array(v) for k, v in params.items()}
    ins = {k: backend.array(v) for k, v in fixed.items()}
    out, grads = compiled.evaluate(nat, ins, training=run.endswith("train"), step=0,
                                   output_gradients={k: backend.array(v) for k, v in cots.items()})
    return {**{k: to_np(backend, v) for k, v in out.items()},
            **{f"grad|{k}": to_np(backend, g) for k, g in grads.items()}}


def our_keep(shape, p, key, step=0, seed=SEED):
    """The library's dropout keep-mask for attention weights of ``shape`` (see
    :func:`mithril.models.attention_core.dropout_factor`), recomputed here."""
    bits = random_bits(np, shape, seed, step, zlib.crc32(key.encode()))
    return (bits >> 8) >= keep_threshold(p)


def torch_ref(run, monkeypatch):
    """torch's outputs and gradients (autograd) on our parameters and cotangents."""
    case, mode = run.split("|")
    spec = CASES[case]
    opts = spec["opts"]
    _, params, fixed, cots = make(run, NumpyBackend(dtype="float64"))
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    t.update({k: torch.tensor(v) for k, v in fixed.items()})
    mod = torch.nn.MultiheadAttention(
        E, H, dropout=opts.get("dropout", 0.0), bias=opts.get("use_bias", True),
        add_bias_kv=opts.get("add_bias_kv", False), add_zero_attn=opts.get("add_zero_attn", False),
        kdim=opts.get("kdim"), vdim=opts.get("vdim"), batch_first=True, dtype=torch.float64)
    mod.train(mode == "train")
    names = sorted(mod.state_dict())
    state = {k.replace("out_proj_", "out_proj."): t[k] for k in params if k.replace(
        "out_proj_", "out_proj.") in names}
    assert sorted(state) == names  # the parameters copy 1:1 under torch's names
    p = opts.get("dropout", 0.0)
    if mode == "train" and p:
        key = opts.get("dropout_key", "multi_head_attention")

        def fake_dropout(x, p=0.5, training=True, inplace=False):
            return x * torch.tensor(our_keep(tuple(x.shape), p, key)) / (1 - p)

        monkeypatch.setattr(torch.nn.functional, "dropout", fake_dropout)
    q, k, v = (t["x"],) * 3 if "x" in t else (t["query"], t["key"], t["value"])
    kw = spec["torch"](t) if "torch" in spec else \
        {n: t[n] for n in ("attn_mask", "key_padding_mask") if n in t}
    weights = spec.get("weights")
    # need_weights=True: the path that calls F.dropout (the other one draws inside SDPA)
    y, w = torch.func.functional_call(mod, state, (q, k, v), {
        **kw, "need_weights": True, "average_attn_weights": weights is not False})
    want = {"output": y}
    if weights is not None:
        want["weights"] = w
    loss = sum((want[n] * torch.tensor(c)).sum() for n, c in cots.items())
    trainable = [n for n in params]
    grads = torch.autograd.grad(loss, [t[n] for n in trainable], allow_unused=True)
    res = {n: x.detach().numpy() for n, x in want.items()}
    res.update({f"grad|{n}": np.zeros_like(params[n]) if g is None else g.numpy()
                for n, g in zip(trainable, grads)})
    return res


def compare(run, got, monkeypatch, what):
    want = torch_ref(run, monkeypatch)
    assert set(got) == set(want), set(got) ^ set(want)
    errs = {k: float(np.abs(got[k] - want[k]).max(initial=0.0))
            / max(1.0, float(np.abs(want[k]).max(initial=0.0))) for k in want}
    assert not any(np.isnan(w).any() for w in want.values()), "torch gave NaN"
    bad = {k: e for k, e in errs.items() if not e <= TOL}
    assert not bad, f"{what} {run}: {bad}"
    return max(errs.values())


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
@pytest.mark.parametrize("run", RUNS)
def test_equals_torch(run, backend_name, monkeypatch):
    compare(run, run_mithril(run, backend_name), monkeypatch, backend_name)


@pytest.fixture(scope="module")
def jax_fast():
    return jax_float64_results("test_attention_bias_kv_dropout", "JAX_FAST", "run_mithril")


@pytest.fixture(scope="module")
def jax_slow():
    return jax_float64_results("test_attention_bias_kv_dropout", "JAX_SLOW", "run_mithril")


@pytest.mark.parametrize("run", JAX_FAST)
def test_jax_equals_torch(run, jax_fast, monkeypatch):
    compare(run, jax_fast[run], monkeypatch, "jax")


@pytest.mark.slow
@pytest.mark.parametrize("run", JAX_SLOW)
def test_jax_equals_torch_all(run, jax_slow, monkeypatch):
    compare(run, jax_slow[run], monkeypatch, "jax")


def test_training_masks_differ_from_eval_and_between_steps():
    """The dropout runs above are not the identity: training differs from inference, and
    step 1 from step 0; the same seed and step give the same result."""
    run = "dropout_both_masks_cross_weights|train"
    outs = []
    for seed, step in ((SEED, 0), (SEED, 0), (SEED, 1), (SEED + 1, 0)):
        backend = NumpyBackend(dtype="float64", seed=seed)
        compiled, params, fixed, _ = make(run, backend)
        outs.append(compiled.evaluate(params, fixed, step=step))
    clean = compiled.evaluate(params, fixed, training=False)
    for k in ("output", "weights"):
        np.testing.assert_array_equal(outs[0][k], outs[1][k])
        assert not np.allclose(outs[0][k], outs[2][k])
        assert not np.allclose(outs[0][k], outs[3][k])
        assert not np.allclose(outs[0][k], clean[k])


def test_p0_is_no_dropout_and_draws_nothing():
    opts = dict(add_bias_kv=True, use_key_padding_mask=True)
    plain, zero = ml.MultiHeadAttention(H, **opts), ml.MultiHeadAttention(H, dropout=0.0, **opts)
    assert not zero.context and not zero.random and ml.MultiHeadAttention(H, dropout=0.1).random
    x = np.random.default_rng(0).standard_normal((2, 4, E))
    kpm = np.array([[False, False, True, False], [True, False, False, False]])
    res = []
    for op in (plain, zero):
        m = ml.Model()
        m |= op(query="x", key="x", value="x", key_padding_mask="kpm", output="output")
        c = ml.compile(m, NumpyBackend(dtype="float64", seed=0), shapes={"x": x.shape})
        res.append(c.evaluate(c.get_parameters(), {"x": x, "kpm": kpm})["output"])
        assert c.step == 0  # nothing random: the counter stays
    np.testing.assert_array_equal(*res)


def test_mask_statistics():
    """Per-head weights of identical batch entries: the fraction dropped is p (to 5 standard
    deviations of the binomial), and the mean over the entries of the attention output is
    the inference output (to 5 standard errors)."""
    p, n = 0.3, 400
    x1 = np.random.default_rng(1).standard_normal((1, 6, E))
    x = np.repeat(x1, n, axis=0)
    m = ml.Model()
    kw = dict(dropout=p, add_zero_attn=True, dropout_key="a")
    mha = ml.MultiHeadAttention(H, **kw)
    aw = AttentionWeights(H, average_attn_weights=False, **kw)
    m |= mha(query="x", key="x", value="x", in_proj_weight="w", in_proj_bias="b",
             output=ml.IOKey("output"))
    m |= aw(query="x", key="x", in_proj_weight="w", in_proj_bias="b", output=ml.IOKey("weights"))
    c = ml.compile(m, NumpyBackend(dtype="float64", seed=3), shapes={"x": x.shape})
    params = {k: v * 3 for k, v in c.get_parameters().items()}
    params["b"] = np.random.default_rng(2).standard_normal(3 * E)
    train = c.evaluate(params, {"x": x}, step=7)
    clean = c.evaluate(params, {"x": x}, training=False)
    w = train["weights"]
    dropped = (w == 0) & (clean["weights"] > 0)
    frac, count = dropped.sum() / (clean["weights"] > 0).sum(), (clean["weights"] > 0).sum()
    assert abs(frac - p) < 5 * np.sqrt(p * (1 - p) / count), frac
    kept = w[~dropped & (clean["weights"] > 0)] / clean["weights"][~dropped & (clean["weights"] > 0)]
    np.testing.assert_allclose(kept, 1 / (1 - p), rtol=1e-12)  # inverted dropout: 1/(1-p)
    y = train["output"]
    mean, sem = y.mean(axis=0), y.std(axis=0) / np.sqrt(n)
    assert np.all(np.abs(mean - clean["output"][0]) < 5 * sem + 1e-12)
    # the row sums of the dropped weights are 1 on average
    assert abs(w.sum(axis=-1).mean() - 1) < 5 * w.sum(axis=-1).std() / np.sqrt(w.sum(axis=-1).size)


# -- the NumPy VJPs against finite differences (training mode, the mask held: step=0) ---------
FD_CASES = {
    "both_float_masks_cross": dict(
        opts=dict(add_bias_kv=True, add_zero_attn=True, use_attn_mask=True,
                  use_key_padding_mask=True, dropout=0.3, dropout_key="d"),
        shapes={"query": (2, 2, 4), "key": (2, 3, 4), "value": (2, 3, 4), "attn_mask": (2, 3),
                "key_padding_mask": (2, 3)}, weights=True),
    "self_kdim_bias_kv_dropout_per_head": dict(
        opts=dict(add_bias_kv=True, dropout=0.5, embed_dim=4, vdim=3, dropout_key="d"),
        shapes={"query": (2, 3, 4), "key": (2, 3, 4), "value": (2, 3, 3)}, weights=False),
    "self_zero_attn_causal": dict(opts=dict(add_zero_attn=True, is_causal=True, dropout=0.2),
                                  shapes={"x": (2, 3, 4)}),
}


@pytest.mark.parametrize("case", list(FD_CASES))
def test_numpy_vjp_matches_finite_differences(case, monkeypatch, eps=1e-6):
    monkeypatch.setitem(CASES, case, FD_CASES[case])
    compiled, params, fixed, cots = make(f"{case}|train", NumpyBackend(dtype="float64", seed=1))
    _, grads = compiled.evaluate(params, fixed, step=0, output_gradients=cots)
    assert set(grads) == set(params)

    def loss():
        out = compiled.evaluate(params, fixed, step=0)
        return sum(float(np.sum(out[k] * c)) for k, c in cots.items())

    clean = compiled.evaluate(params, fixed, training=False)["output"]
    assert not np.allclose(compiled.evaluate(params, fixed, step=0)["output"], clean)  # a mask
    for name, p in params.items():
        numeric = np.zeros_like(p)
        for i in np.ndindex(p.shape):
            orig, sums = p[i], []
            for x in (orig + eps, orig - eps):
                p[i] = x
                sums.append(loss())
            p[i] = orig
            numeric[i] = (sums[0] - sums[1]) / (2 * eps)
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-6, atol=1e-8,
                                   err_msg=f"{case}: gradient of '{name}'")


# -- make_train_step ----------------------------------------------------------------------------
def _train_model():
    m = ml.Model()
    m |= ml.MultiHeadAttention(H, dropout=0.3, add_bias_kv=True)(query="input", key="input",
                                                                  value="input", output="h")
    m |= ml.SquaredError()(input="h", target="target", output="se")
    m |= ml.Mean()(input="se", output=ml.IOKey("loss"))
    return m


@pytest.mark.parametrize("backend_name, fused", [("numpy", False), ("torch", False), ("jax", True)])
def test_make_train_step_draws_the_step_mask(backend_name, fused):
    """Two SGD steps equal two manual ones (evaluate at steps 0 and 1, then p − lr·g): the
    train step draws the mask of the model's counter and advances it."""
    from mithril.utils.optimizers import SGD
    from mithril.utils.training import make_train_step

    cls = {"numpy": NumpyBackend, "torch": TorchBackend, "jax": JaxBackend}[backend_name]
    b = cls(dtype="float32", seed=0)
    c = ml.compile(_train_model(), b, shapes={"input": [4, 5, E]})
    rng = np.random.default_rng(0)
    data = {"input": rng.standard_normal((4, 5, E)).astype(np.float32),
            "target": rng.standard_normal((4, 5, E)).astype(np.float32)}
    p0 = {k: rng.standard_normal(v).astype(np.float32) * 0.5 for k, v in c.parameter_shapes.items()}
    step = make_train_step(c, SGD(learning_rate=0.1), loss="loss")
    params = {k: b.array(v) for k, v in p0.items()}
    state = step.init(params) if fused else step.optimizer.init(params)
    native = {k: b.array(v) for k, v in data.items()}
    for _ in range(2):
        params, state, _ = step(params, state, native)
    assert c.step == 2
    want = {k: v.astype(np.float64) for k, v in p0.items()}
    data = {k: v.astype(np.float64) for k, v in data.items()}
    ref = ml.compile(_train_model(), NumpyBackend(dtype="float64", seed=0),
                     shapes={"input": [4, 5, E]})
    for s in (0, 1):
        _, g = ref.evaluate(want, data, output_gradients={"loss": np.float64(1.0)}, step=s)
        want = {k: want[k] - 0.1 * g[k] for k in want}
    for k in want:
        np.testing.assert_allclose(to_np(b, params[k]), want[k], rtol=1e-4, atol=1e-5,
                                   err_msg=k)


def test_refused_step_leaves_the_counter():
    """As for Dropout (test_train_step_dropout_refused): a train step refused for its optimizer
    state neither runs the model nor moves the counter, so later masks are the ones an
    uninterrupted run draws."""
    from mithril.utils.optimizers import SGD, Adam
    from mithril.utils.training import make_train_step

    rng = np.random.default_rng(0)
    data = {"input": rng.standard_normal((4, 5, E)), "target": rng.standard_normal((4, 5, E))}
    finals = []
    for bad in (False, True):
        c = ml.compile(_train_model(), NumpyBackend(dtype="float64", seed=0),
                       shapes={"input": [4, 5, E]})
        step = make_train_step(c, Adam(learning_rate=1e-2), loss="loss")
        p = {k: np.full(v, 0.3) for k, v in c.parameter_shapes.items()}
        s = step.optimizer.init(p)
        p, s, _ = step(p, s, data)
        if bad:
            other = make_train_step(c, SGD(learning_rate=0.1, momentum=0.9), loss="loss")
            with pytest.raises(ValueError, match=r"SGD|\['momentum'\]"):
                step(p, other.optimizer.init(p), data)
            assert c.step == 1
        p, s, _ = step(p, s, data)
        finals.append(p)
    for k in finals[0]:
        np.testing.assert_array_equal(finals[0][k], finals[1][k])


# -- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(dropout=1.0), r"dropout must be a probability in \[0, 1\), got 1.0"),
    (dict(dropout=-0.1), r"dropout must be .*got -0.1"),
    (dict(dropout=float("nan")), r"dropout must be .*got nan"),
    (dict(dropout="0.5"), r"dropout must be .*got '0.5'"),
    (dict(dropout=True), r"dropout must be .*got True"),
    (dict(add_bias_kv=1), r"add_bias_kv must be True or False, got 1"),
    (dict(add_zero_attn="yes"), r"add_zero_attn must be True or False, got 'yes'"),
    (dict(dropout_key=3), r"dropout_key must be a str or None, got 3"),
])
@pytest.mark.parametrize("cls", [ml.MultiHeadAttention, AttentionWeights])
def test_bad_arguments_are_named(cls, kw, match):
    with pytest.raises(ValueError, match=rf"{cls.__name__}: {match}"):
        cls(H, **kw)


def test_repr_and_parameters():
    op = ml.MultiHeadAttention(H, dropout=0.1, add_bias_kv=True, add_zero_attn=True,
                               use_bias=False, dropout_key="a")
    assert repr(op).endswith("dropout=0.1, add_bias_kv=True, add_zero_attn=True, dropout_key='a')")
    m = ml.Model()
    m |= op(query="x", key="x", value="x", output="output")
    c = ml.compile(m, NumpyBackend(seed=0), shapes={"x": [2, 3, E]})
    # torch's bias=False keeps bias_k / bias_v (they are not the projection biases)
    assert {k.split(".")[-1]: v for k, v in c.parameter_shapes.items()} == {
        "in_proj_weight": (3 * E, E), "bias_k": (1, 1, E), "bias_v": (1, 1, E),
        "out_proj_weight": (E, E)}


def test_bias_kv_init_is_torchs_xavier_normal():
    """``bias_k`` / ``bias_v`` start as torch's ``xavier_normal_`` of a (1, 1, E) tensor:
    N(0, 1/E) (torch's fans: E each), on every backend; their moments against torch's own."""
    e, n = 1024, 4
    ours = []
    for backend in (NumpyBackend(dtype="float64", seed=4), TorchBackend(dtype="float64", seed=4)):
        m = ml.Model()
        m |= ml.MultiHeadAttention(n, add_bias_kv=True)(query="x", key="x", value="x",
                                                        bias_k="bk", bias_v="bv",
                                                        output=ml.IOKey("output"))
        params = ml.compile(m, backend, shapes={"x": (1, 2, e)}).get_parameters()
        ours += [to_np(backend, params["bk"]), to_np(backend, params["bv"])]
    ref = torch.nn.MultiheadAttention(e, n, add_bias_kv=True, dtype=torch.float64)
    theirs = [ref.bias_k.detach().numpy(), ref.bias_v.detach().numpy()]
    for arr in ours + theirs:
        assert arr.shape == (1, 1, e)
        assert abs(arr.mean()) < 4 / e  # 4 standard errors of the mean (std 1/√E, E draws)
        assert abs(arr.var() * e - 1) < 0.2  # the variance 1/E (±~4.5% one standard error)
    assert not np.array_equal(ours[0], ours[1])  # two draws
