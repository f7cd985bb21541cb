"""Muon and Adafactor (TensorwiseOptimizer): exact against torch.optim 2.13, the backends
agree, state dicts and checkpoints resume bit-exactly, non-finite steps change nothing, bad
arguments are named.

float64 parity: 100 steps with the learning rate changed at step 50, with and without
weight decay, measured by :func:`rel_err` (largest absolute difference over the tensor's
largest magnitude) against ``<= 1e-10``. torch.optim.Muon runs its Newton–Schulz iteration
in bfloat16 whatever the parameters' dtype, so its float64 parity is checked with
``ns_dtype="float64"`` against torch's Muon whose ``_zeropower_via_newtonschulz`` is
patched to keep the gradient's dtype (:func:`ns_in_grad_dtype`: torch's code without the
``.bfloat16()``); the bfloat16 default is checked against unpatched torch (on the torch
backend the same operations: equal to the last bit).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.optim._muon as torch_muon

import mithril.utils.optimizers.engines as engines
from mithril.errors import ShapeError
from mithril.utils.checkpoint import load_checkpoint, save_checkpoint
from mithril.utils.lr_schedulers import StepLR
from mithril.utils.optimizers import LBFGS, SGD, Adafactor, Adam, AdamW, Muon
from mithril.utils.optimizers.muon import newton_schulz
from mithril.utils.optimizers.tensorwise import JaxOps, NumpyOps

STEPS, SWITCH = 100, 50
TOL64 = 1e-10
SHAPES = {"w": (6, 4), "wide": (3, 7), "sq": (5, 5), "b": (5,), "s": (), "k": (2, 3, 4)}
MATRICES = ["w", "wide", "sq"]
OTHERS = ["b", "s", "k"]


def ns_in_grad_dtype(grad, ns_coefficients, ns_steps, eps):
    """torch 2.13's ``_zeropower_via_newtonschulz`` without its cast to bfloat16."""
    a, b, c = ns_coefficients
    ortho = grad.clone()
    if grad.size(0) > grad.size(1):
        ortho = ortho.T
    ortho.div_(ortho.norm().clamp(min=eps))
    for _ in range(ns_steps):
        gram = ortho @ ortho.T
        update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        ortho = torch.addmm(ortho, update, ortho, beta=a)
    if grad.size(0) > grad.size(1):
        ortho = ortho.T
    return ortho


@pytest.fixture
def ns64(monkeypatch):
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", ns_in_grad_dtype)


def problem(dtype="float64", steps=STEPS, names=tuple(SHAPES)):
    rng = np.random.default_rng(0)
    p0 = {k: rng.standard_normal(SHAPES[k]).astype(dtype) for k in names}
    grads = [{k: rng.standard_normal(SHAPES[k]).astype(dtype) for k in names}
             for _ in range(steps)]
    return p0, grads


def native(backend, x):
    if backend == "torch":
        return torch.tensor(x)
    if backend == "jax":
        import jax.numpy as jnp

        return jnp.asarray(x)
    return np.array(x)


def host(x):
    return np.array(x.numpy() if isinstance(x, torch.Tensor) else x)


def rel_err(ours, ref):
    return max(float(np.abs(host(ours[k]) - ref[k]).max() / max(np.abs(ref[k]).max(), 1e-300))
               for k in ref if ref[k].size)


def run_torch(p0, grads, groups, lrs_after):
    """torch optimizers ``groups`` = [(factory(list of tensors), names)], stepped together;
    at step SWITCH each one's lr becomes its entry of ``lrs_after``."""
    tp = {k: torch.tensor(v) for k, v in p0.items()}
    opts = [make([tp[n] for n in names]) for make, names in groups]
    for t, g in enumerate(grads):
        if t == SWITCH:
            for o, lr in zip(opts, lrs_after):
                for pg in o.param_groups:
                    pg["lr"] = lr
        for k in tp:
            tp[k].grad = torch.tensor(g[k])
        for o in opts:
            o.step()
    return {k: v.numpy() for k, v in tp.items()}


def run_ours(opt, p0, grads, backend="numpy", lr_after=None, start=0, state=None, params=None,
             sched=None):
    if params is None:
        params = {k: native(backend, v) for k, v in p0.items()}
    if state is None:
        state = opt.init(params)
    for t in range(start, len(grads)):
        if t == SWITCH and lr_after is not None:
            opt.set_learning_rate(lr_after)
        params, state = opt.update(params, {k: native(backend, v) for k, v in grads[t].items()},
                                   state)
        if sched is not None:
            sched.step()
    return params, state


# ---------------------------------------------------------------------------------------------
# Muon against torch.optim.Muon (and AdamW for the fallback)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("wd, nesterov, adjust", [(0.0, True, None), (0.1, True, "original"),
                                                  (0.1, False, "match_rms_adamw")])
def test_muon_float64_matches_torch(ns64, backend, wd, nesterov, adjust):
    p0, grads = problem(names=MATRICES)
    kw = dict(weight_decay=wd, nesterov=nesterov, adjust_lr_fn=adjust)
    ref = run_torch(p0, grads, [(lambda ps: torch.optim.Muon(ps, lr=0.02, **kw), MATRICES)],
                    [0.01])
    opt = Muon(0.02, ns_dtype="float64", fallback=None, **kw)
    ours, _ = run_ours(opt, p0, grads, backend, lr_after=0.01)
    err = rel_err(ours, ref)
    assert err <= TOL64, err
    if backend == "torch":  # the same torch operations
        assert err == 0.0


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("wd, fb_wd", [(0.0, 0.0), (0.1, 0.01)])
def test_muon_fallback_matches_torch_muon_and_adamw(ns64, backend, wd, fb_wd):
    """Matrices through Muon, the rest (a vector, a scalar, a 3-D tensor) through the
    fallback, against torch's Muon and AdamW side by side; the lr change moves both."""
    p0, grads = problem()
    ref = run_torch(p0, grads, [
        (lambda ps: torch.optim.Muon(ps, lr=0.02, weight_decay=wd), MATRICES),
        (lambda ps: torch.optim.AdamW(ps, lr=3e-4, weight_decay=fb_wd), OTHERS)], [0.01, 1.5e-4])
    opt = Muon(0.02, weight_decay=wd, ns_dtype="float64",
               fallback=AdamW(3e-4, weight_decay=fb_wd))
    assert opt.fallback_lr_ratio == pytest.approx(0.015)
    ours, state = run_ours(opt, p0, grads, backend, lr_after=0.01)
    assert opt.fallback.learning_rate == pytest.approx(1.5e-4)
    assert rel_err(ours, ref) <= TOL64
    assert sorted(state.slots) == ["fallback_m", "fallback_v", "momentum_buffer"]
    assert state.slot("momentum_buffer")["b"].shape == (0,)
    assert state.slot("fallback_m")["w"].shape == (0,)
    assert state.slot("fallback_m")["k"].shape == (2, 3, 4)


def test_the_fallbacks_learning_rate_is_muons_times_the_ratio():
    """The fallback's ``learning_rate`` reads what its steps take (Muon's times
    ``fallback_lr_ratio``, however either was set), and setting it on the fallback (what no
    step would read) is refused, naming what to set; the fallback's own groups and other
    hyperparameters stay its own. Against torch's AdamW for the fallback's tensors, with
    its learning rate halved at SWITCH through ``fallback_lr_ratio``."""
    opt = Muon(0.02, ns_dtype="float64", fallback=AdamW(3e-4))
    opt.learning_rate = 0.01  # (an attribute: unchecked, as torch's param_groups)
    assert opt.fallback.learning_rate == pytest.approx(1.5e-4)
    opt.fallback_lr_ratio = 0.03
    assert opt.fallback.learning_rate == pytest.approx(3e-4)
    before = opt.state_dict()
    for refused in (lambda: setattr(opt.fallback, "learning_rate", 0.1),
                    lambda: opt.fallback.set_learning_rate(0.1),
                    lambda: opt.fallback.hyperparameter("lr").set(0.1),
                    lambda: StepLR(opt.fallback, step_size=2)):
        with pytest.raises(ValueError, match="AdamW is a Muon's fallback: its learning rate "
                                             "is Muon's times fallback_lr_ratio"):
            refused()
    assert json.dumps(opt.state_dict()) == json.dumps(before)
    opt.fallback.beta2 = 0.99  # its other hyperparameters are its own
    p0, grads = problem(steps=2 * SWITCH)
    ref = run_torch(p0, grads, [
        (lambda ps: torch.optim.AdamW(ps, lr=3e-4, betas=(0.9, 0.99)), OTHERS)], [1.5e-4])
    opt = Muon(0.02, ns_dtype="float64", fallback=AdamW(3e-4, beta2=0.99))
    state = opt.init(p0)
    params = dict(p0)
    for t, g in enumerate(grads):
        if t == SWITCH:
            opt.hyperparameter("fallback_lr_ratio").set(0.0075)  # (a scheduler may drive it)
        params, state = opt.update(params, g, state)
    assert rel_err({k: params[k] for k in OTHERS}, {k: ref[k] for k in OTHERS}) <= TOL64


@pytest.mark.parametrize("clip, fb", [
    ({"clip_norm": 2.0}, ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01))),
    ({"clip_value": 0.5}, ("Adam", dict(lr=1e-3, weight_decay=0.01)))], ids=["norm", "value"])
def test_clipping_and_coupled_decay_of_the_fallback_match_torch(ns64, clip, fb):
    """Clipping (global, over every parameter) and a fallback with coupled weight decay,
    against torch's clip_grad_norm_ / clip_grad_value_ then Muon and SGD / Adam."""
    p0, grads = problem(steps=30)
    name, kw = fb
    tp = {k: torch.tensor(v) for k, v in p0.items()}
    muon = torch.optim.Muon([tp[n] for n in MATRICES], lr=0.02)
    other = getattr(torch.optim, name)([tp[n] for n in OTHERS], **kw)
    for g in grads:
        for k in tp:
            tp[k].grad = torch.tensor(g[k])
        if "clip_norm" in clip:
            torch.nn.utils.clip_grad_norm_(list(tp.values()), clip["clip_norm"])
        else:
            torch.nn.utils.clip_grad_value_(list(tp.values()), clip["clip_value"])
        muon.step()
        other.step()
    fallback = (SGD(kw["lr"], momentum=0.9, nesterov=True, weight_decay=0.01) if name == "SGD"
                else Adam(kw["lr"], weight_decay=0.01))
    ours, _ = run_ours(Muon(0.02, ns_dtype="float64", fallback=fallback, **clip), p0, grads)
    assert rel_err(ours, {k: v.numpy() for k, v in tp.items()}) <= TOL64


@pytest.mark.parametrize("backend", ["numpy", "torch", "numpy without torch"])
def test_muon_bfloat16_default_matches_torch(backend, monkeypatch):
    """torch's own bfloat16 Newton–Schulz: on torch, and on NumPy where torch is installed
    (torch's operations on zero-copy views), equal to the last bit; on NumPy without torch
    emulated (float32 arithmetic rounded to bfloat16 after each operation), equal wherever
    float32 sums round alike, so the runs agree to bfloat16 rounding."""
    import mithril.utils.optimizers.muon as muon_module

    if backend == "numpy without torch":
        monkeypatch.setitem(muon_module._TORCH, "module", None)
    p0, grads = problem(names=MATRICES)
    ref = run_torch(p0, grads, [(lambda ps: torch.optim.Muon(ps, lr=0.02), MATRICES)], [0.01])
    ours, _ = run_ours(Muon(0.02, fallback=None), p0, grads, backend.split()[0], lr_after=0.01)
    err = rel_err(ours, ref)
    assert err < 1e-3 if backend == "numpy without torch" else err == 0.0, err


@pytest.mark.parametrize("ops", ["numpy", "jax"])
def test_bfloat16_newton_schulz_emulation_is_torch_on_small_matrices(ops):
    xp = NumpyOps() if ops == "numpy" else JaxOps()
    rng = np.random.default_rng(1)
    shapes = [(4, 3), (3, 5), (6, 6), (8, 2)] * 3 if ops == "numpy" else [(4, 3)] * 4
    for shape in shapes:
        g = rng.standard_normal(shape)
        ref = torch_muon._zeropower_via_newtonschulz(torch.tensor(g), (3.4445, -4.775, 2.0315),
                                                     5, 1e-7).float().numpy()
        ours = newton_schulz(xp, native(ops, g), (3.4445, -4.775, 2.0315), 5, 1e-7)
        np.testing.assert_array_equal(np.asarray(ours), ref)


# ---------------------------------------------------------------------------------------------
# Adafactor against torch.optim.Adafactor
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("kw", [{}, {"weight_decay": 0.1}, {"weight_decay": 0.05, "d": 2.0,
                                                            "eps": (1e-20, 1e-2),
                                                            "beta2_decay": -0.5,
                                                            "maximize": True}])
@pytest.mark.parametrize("fused", [True, False])
def test_adafactor_float64_matches_torch(backend, kw, fused):
    p0, grads = problem()
    ref = run_torch(p0, grads, [(lambda ps: torch.optim.Adafactor(ps, lr=0.05, **kw),
                                 list(SHAPES))], [0.02])
    opt = Adafactor(0.05, fused=fused, **kw)
    ours, state = run_ours(opt, p0, grads, backend, lr_after=0.02)
    err = rel_err(ours, ref)
    assert err <= TOL64, err
    if backend == "torch" and not fused:  # torch's own operations, tensor by tensor
        assert err == 0.0
    assert state.slot("row_var")["k"].shape == (2, 3, 1)
    assert state.slot("col_var")["k"].shape == (2, 1, 4)
    assert state.slot("variance")["b"].shape == (5,)
    assert state.slot("variance")["w"].shape == (0,)


# ---------------------------------------------------------------------------------------------
# the backends agree
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ["auto", "jit"])
@pytest.mark.parametrize("make", [
    lambda: Muon(0.02, ns_dtype=None, fallback=AdamW(1e-3), ema_decay=0.9),
    lambda: Adafactor(0.05, weight_decay=0.1)], ids=["muon", "adafactor"])
def test_jax_float32_agrees_with_numpy_float32(make, engine, monkeypatch):
    """On JAX-on-CPU's host buffers ("auto") and on the jitted engine's jax.Array slots (as
    on accelerators). Few tensors and steps: eager JAX compiles each operation per shape."""
    monkeypatch.setattr(engines, "JAX_ENGINE", engine)
    p0, grads = problem("float32", 8, names=("w", "b"))
    opt = make()
    ref, s_ref = run_ours(opt, p0, grads, "numpy")
    ours, state = run_ours(make(), p0, grads, "jax")
    assert type(state.engine).__name__ == ("NumbaEngine" if engine == "auto" else "JaxEngine")
    assert rel_err(ours, {k: host(v) for k, v in ref.items()}) < 1e-5
    for s in s_ref.slots:
        assert rel_err(state.slot(s), {k: host(v) for k, v in s_ref.slot(s).items()}) < 1e-5


# ---------------------------------------------------------------------------------------------
# parameter groups, averaging, missing gradients, ownership
# ---------------------------------------------------------------------------------------------

def test_groups_equal_torch_param_groups(ns64):
    """Muon's groups for its matrices, the fallback's own groups for the rest, against torch
    optimizers with the same param_groups."""
    p0, grads = problem()
    ref = run_torch(p0, grads, [
        (lambda ps: torch.optim.Muon([{"params": ps[:1], "lr": 0.01, "weight_decay": 0.0},
                                      {"params": ps[1:]}], lr=0.02), MATRICES),
        (lambda ps: torch.optim.AdamW([{"params": ps[:1], "weight_decay": 0.0},
                                       {"params": ps[1:]}], lr=1e-3, weight_decay=0.1),
         OTHERS)], [])
    fb = AdamW(1e-3, weight_decay=0.1, exclude_weight_decay=["b"])
    opt = Muon(0.02, ns_dtype="float64", fallback=fb,
               param_groups=[{"params": ["w"], "learning_rate": 0.01, "weight_decay": 0.0}])
    ours, _ = run_ours(opt, p0, grads)
    assert rel_err(ours, ref) <= TOL64


def test_ema_and_missing_gradients():
    p0, grads = problem(steps=6)
    opt = Adafactor(0.05, ema_decay=0.5)
    params = {k: v.copy() for k, v in p0.items()}
    state = opt.init(params)
    ema = {k: v.copy() for k, v in p0.items()}
    for t, g in enumerate(grads):
        if t == 3:
            g = {k: v for k, v in g.items() if k != "w"}
            frozen = {k: np.array(v) for k, v in state.slot("row_var").items()}
            before = params["w"].copy()
        params, state = opt.update(params, g, state)
        w = 1.0 if t == 0 else 0.5
        ema = {k: ema[k] + w * (params[k] - ema[k]) for k in ema}
        if t == 3:
            np.testing.assert_array_equal(params["w"], before)
            np.testing.assert_array_equal(state.slot("row_var")["w"], frozen["w"])
    for k in SHAPES:
        np.testing.assert_allclose(opt.ema_params(state)[k], ema[k], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_returned_arrays_are_views_of_the_state_and_given_ones_are_never_written(backend):
    p0, grads = problem(steps=2)
    opt = Muon(0.02)
    mine = {k: native(backend, v) for k, v in p0.items()}
    out, state = opt.update(mine, {k: native(backend, v) for k, v in grads[0].items()},
                            opt.init(mine))
    for k in SHAPES:
        np.testing.assert_array_equal(host(mine[k]), p0[k])  # copied in, never modified
    assert all(out[k] is state.param_views[k] for k in SHAPES)
    again, state = opt.update(out, {k: native(backend, v) for k, v in grads[1].items()}, state)
    assert all(again[k] is out[k] for k in SHAPES)  # written in place, as the engines do


# ---------------------------------------------------------------------------------------------
# state dicts and checkpoints
# ---------------------------------------------------------------------------------------------

def _make(kind):
    if kind == "muon":
        return Muon(0.02, fallback=AdamW(3e-4, exclude_weight_decay=["s"]), ema_decay=0.9,
                    param_groups=[{"params": ["wide"], "momentum": 0.8}])
    return Adafactor(0.05, weight_decay=0.1, param_groups=[{"params": "k", "d": 2.0}])


def _blank(kind):
    return Muon(0.5, fallback=AdamW(0.5)) if kind == "muon" else Adafactor(0.5)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("kind", ["muon", "adafactor"])
def test_state_dict_resumes_bit_exactly(backend, kind):
    p0, grads = problem(steps=30)
    whole, s_whole = run_ours(_make(kind), p0, grads, backend, lr_after=None)
    opt = _make(kind)
    params, state = run_ours(opt, p0, grads[:13], backend)
    d = copy.deepcopy(opt.state_dict(state))
    json.dumps(d["hyperparameters"])  # plain JSON
    fresh = _blank(kind)
    params = {k: native(backend, host(v)) for k, v in params.items()}
    state = fresh.load_state_dict(d, params)
    assert state.step == 13 and fresh.hyperparameters() == opt.hyperparameters()
    resumed, s_res = run_ours(fresh, p0, grads, backend, start=13, state=state, params=params)
    for k in SHAPES:
        np.testing.assert_array_equal(host(whole[k]), host(resumed[k]))
    for slot in s_whole.slots:
        for k in SHAPES:
            np.testing.assert_array_equal(host(s_whole.slot(slot)[k]), host(s_res.slot(slot)[k]))


@pytest.mark.parametrize("kind", ["muon", "adafactor"])
def test_checkpoint_resumes_bit_exactly(tmp_path, kind):
    p0, grads = problem(steps=30)
    opt = _make(kind)
    whole, _ = run_ours(opt, p0, grads, sched=StepLR(opt, step_size=4, gamma=0.7))
    if kind == "muon":  # the scheduler drives the fallback's lr too
        assert opt.fallback.learning_rate == pytest.approx(3e-4 * 0.7 ** 7)
    opt = _make(kind)
    sched = StepLR(opt, step_size=4, gamma=0.7)
    params, state = run_ours(opt, p0, grads[:17], sched=sched)
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, params, opt, state, sched)
    opt2 = _blank(kind)
    sched2 = StepLR(opt2, step_size=4, gamma=0.7)
    ck = load_checkpoint(path, params_template=p0, optimizer=opt2, scheduler=sched2)
    resumed, _ = run_ours(opt2, p0, grads, start=17, state=ck["state"], params=ck["params"],
                          sched=sched2)
    for k in SHAPES:
        np.testing.assert_array_equal(whole[k], resumed[k])


# ---------------------------------------------------------------------------------------------
# non-finite steps
# ---------------------------------------------------------------------------------------------

def _snapshot(params, state):
    return ({k: host(v).copy() for k, v in params.items()},
            {s: {k: host(v).copy() for k, v in state.slot(s).items()} for s in state.slots},
            state.step)


def _same(a, b):
    for x, y in zip(a[:2], b[:2]):
        for k in x:
            if isinstance(x[k], dict):
                for n in x[k]:
                    np.testing.assert_array_equal(x[k][n], y[k][n])
            else:
                np.testing.assert_array_equal(x[k], y[k])
    assert a[2] == b[2]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("make, huge", [
    (lambda **kw: Muon(0.02, **kw), lambda o: setattr(o, "ns_coefficients", (1e30,) * 3)),
    (lambda **kw: Adafactor(0.05, weight_decay=0.1, **kw),
     lambda o: o.__dict__.update(weight_decay=1e308, learning_rate=10.0))],
    ids=["muon", "adafactor"])
def test_nonfinite_skip_and_raise_change_nothing(backend, make, huge):
    p0, grads = problem(steps=3)
    for policy in ("skip", "raise"):
        opt = make(nonfinite=policy)
        params, state = run_ours(opt, p0, grads[:2], backend)
        before = _snapshot(params, state)
        bad = {k: native(backend, v) for k, v in grads[2].items()}
        bad["b"][1] = float("nan")
        huge_opt = copy.copy(opt)
        huge(huge_opt)
        good = {k: native(backend, v) for k, v in grads[2].items()}
        for o, g in ((opt, bad), (huge_opt, good)):
            if policy == "skip":
                with pytest.warns(RuntimeWarning, match="skipped"):
                    out, state = o.update(params, g, state)
                assert state.last_step_skipped and out["w"] is params["w"]
            else:
                with pytest.raises(FloatingPointError, match="unchanged"):
                    o.update(params, g, state)
            _same(before, _snapshot(params, state))
        assert state.num_skipped == (2 if policy == "skip" else 0)


def test_nonfinite_propagate_warns_and_counts():
    p0, grads = problem(steps=1)
    opt = Adafactor(0.05)
    params = {k: v.copy() for k, v in p0.items()}
    state = opt.init(params)
    grads[0]["w"][0, 0] = np.inf
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        params, state = opt.update(params, grads[0], state)
    assert state.num_nonfinite == 1 and state.step == 1 and not np.isfinite(
        state.last_grad_norm)


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, exc, match", [
    (lambda: Muon(momentum=-1), ValueError, "momentum"),
    (lambda: Muon(ns_steps=100), ValueError, "ns_steps"),
    (lambda: Muon(ns_steps=2.0), TypeError, "ns_steps"),
    (lambda: Muon(adjust_lr_fn="rms"), ValueError, "adjust_lr_fn"),
    (lambda: Muon(ns_dtype="float16"), ValueError, "ns_dtype"),
    (lambda: Muon(ns_coefficients=(1.0, 2.0)), TypeError, "ns_coefficients"),
    (lambda: Muon(nesterov="yes"), TypeError, "nesterov"),
    (lambda: Muon(fallback="adamw"), TypeError, "fallback"),
    (lambda: Muon(fallback=Muon()), TypeError, "fallback: Muon"),
    (lambda: Muon(fallback=LBFGS()), TypeError, "fallback: LBFGS"),
    (lambda: Muon(fallback=AdamW(clip_norm=1.0)), ValueError, "give it to Muon"),
    (lambda: Muon(learning_rate=0.0), ValueError, "fallback_lr_ratio"),
    (lambda: Muon(param_groups=[{"params": "w", "fallback_lr_ratio": 2.0}]), ValueError,
     "fallback_lr_ratio"),
    (lambda: Adafactor(beta2_decay=0.5), ValueError, "beta2_decay"),
    (lambda: Adafactor(eps=(1e-30,)), TypeError, "epsilon"),
    (lambda: Adafactor(eps=(None, -1.0)), ValueError, r"epsilon\[1\]"),
    (lambda: Adafactor(d=0.5), ValueError, "d "),
    (lambda: Adafactor(lr=-1.0), ValueError, "learning_rate"),
    (lambda: Adafactor(maximize=2), TypeError, "maximize"),
])
def test_bad_arguments_are_named(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_muon_without_fallback_names_a_non_matrix_and_keeps_nothing():
    opt = Muon(fallback=None)
    params = {"w": np.zeros((3, 2)), "bias": np.zeros(3)}
    with pytest.raises(ShapeError, match=r"\['bias'\] has shape \(3,\).*fallback=AdamW"):
        opt.init(params)
    assert opt._backend is None  # nothing kept, not even the inferred backend
    with pytest.raises(ShapeError, match="matrix path.*'v'"):
        opt.tensor_update(NumpyOps(), np.zeros(3), np.zeros(3),
                          {"momentum_buffer": np.zeros(3)}, (0.1,), "v")


def test_refused_update_changes_nothing():
    p0, grads = problem(steps=2)
    opt = Muon(0.02, fallback=SGD(0.1, momentum=0.9))
    params, state = run_ours(opt, p0, grads[:1])
    assert sorted(state.slots) == ["fallback_momentum", "momentum_buffer"]
    before = _snapshot(params, state)
    with pytest.raises(ShapeError, match="gradients\\['w'\\] has shape"):
        opt.update(params, {**grads[1], "w": np.zeros((4, 6))}, state)
    with pytest.raises(KeyError, match="nope"):
        opt.update(params, {"nope": np.zeros(3)}, state)
    with pytest.raises(TypeError, match="state must be"):
        opt.update(params, grads[1], {})
    _same(before, _snapshot(params, state))
