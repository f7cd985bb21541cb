"""The two-pass protocol (``Optimizer.reductions`` / ``tensor_slots`` / ``state_values`` /
``tensor_scalars``): per-tensor sums of a first pass, per-tensor scalars in the fused second
pass, committed only when a step is applied; saved and restored bit-exactly.

The catalog's two-pass optimizers (LAMB, LARS, Novograd) are checked against optax in
tests/test_optimizers_optax_catalog.py; here, a user-written one against NumPy per tensor, on
every engine, and the state guarantees."""

from __future__ import annotations

import contextlib
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import optimizer_engine

from mithril.utils.checkpoint import load_checkpoint, save_checkpoint
from mithril.utils.optimizers import Novograd, Optimizer, set_num_threads
from mithril.utils.optimizers.elementwise import sqrt, where
from mithril.utils.optimizers.engines import threads


def _normalized_reduce(p, g, lr):
    return (g * g,)


def _normalized(p, g, lr, scale):
    return (p - lr * scale * g,)


class NormalizedSGD(Optimizer):
    """Per-tensor normalised SGD with a running count of steps taken (a state value):
    ``p ← p − lr · g / max(‖g‖, 1e-12)``."""

    reductions = 1
    state_values = ("taken",)

    def reduce_math(self):
        return _normalized_reduce

    def kernel_math(self):
        return _normalized

    def tensor_scalars(self, step, sums, scalars, tensors, values, sizes):
        norm = sqrt(sums[0])
        return (1.0 / where(norm > 1e-12, norm, 1e-12),), tensors, {"taken": values["taken"] + 1}


SHAPES = {"w": (40, 30), "b": (30,), "s": (), "e": (0,), "big": (300, 500)}


def problem(dtype=np.float64, steps=6, seed=0):
    rng = np.random.default_rng(seed)
    p0 = {k: np.asarray(rng.standard_normal(s), dtype=dtype) for k, s in SHAPES.items()}
    grads = [{k: np.asarray(rng.standard_normal(s) * (1 + t), dtype=dtype)
              for k, s in SHAPES.items()}
             for t in range(steps)]
    return p0, grads


def reference(p0, grads, lr=0.1, groups=None):
    p = {k: v.copy() for k, v in p0.items()}
    for g in grads:
        for k in p:
            n = max(np.sqrt(np.sum(g[k].astype(np.float64) ** 2)), 1e-12)
            p[k] = p[k] - (groups or {}).get(k, lr) * g[k] / n
    return p


BACKENDS = {
    "numpy": (np.array, contextlib.nullcontext),
    "torch": (torch.from_numpy, contextlib.nullcontext),
    "jax": (jnp.asarray, contextlib.nullcontext),
    "jax-jit": (jnp.asarray, lambda: optimizer_engine("jax-jit")),
    "array-numpy": (np.array, lambda: optimizer_engine("array")),
    "array-torch": (torch.from_numpy, lambda: optimizer_engine("array")),
}


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_user_two_pass_optimizer_equals_numpy_per_tensor(backend):
    conv, ctx = BACKENDS[backend]
    p0, grads = problem(np.float32)
    want = reference(p0, grads, groups={"b": 0.01})
    with ctx():
        opt = NormalizedSGD(0.1, param_groups=[{"params": ["b"], "learning_rate": 0.01}])
        params = {k: conv(v.copy()) for k, v in p0.items()}
        state = opt.init(params)
        for g in grads:
            params, state = opt.update(params, {k: conv(v) for k, v in g.items()}, state)
    for k in SHAPES:
        np.testing.assert_allclose(np.asarray(params[k]), want[k], rtol=2e-5, atol=2e-6)
    assert state.values == {"taken": float(len(grads))}


def test_float64_exact_and_thread_count_independent():
    p0, grads = problem(np.float64)
    out = []
    for n in (1, 2):
        set_num_threads(n)
        opt = NormalizedSGD(0.1)
        params = {k: v.copy() for k, v in p0.items()}
        state = opt.init(params)
        for g in grads:
            params, state = opt.update(params, g, state)
        out.append({k: np.array(v) for k, v in params.items()})
    set_num_threads(threads.get_num_threads())
    want = reference(p0, grads)
    for k in SHAPES:
        assert np.array_equal(out[0][k], out[1][k])  # segment sums added in order
        np.testing.assert_allclose(out[0][k], want[k], rtol=1e-13, atol=1e-15)


def _novograd_run(steps, state_io=None):
    p0, grads = problem(np.float64, steps=steps)
    opt = Novograd(0.01, weight_decay=0.1)
    params = {k: v.copy() for k, v in p0.items()}
    state = opt.init(params)
    for t, g in enumerate(grads):
        if state_io is not None and t == steps // 2:
            params, state, opt = state_io(params, state, opt)
        params, state = opt.update(params, g, state)
    return params, state


def test_tensor_slots_and_values_resume_bit_exactly(tmp_path):
    straight, st = _novograd_run(8)

    def via_state_dict(params, state, opt):
        sd = opt.state_dict(state)
        assert set(sd["slots"]["nu"]["w"].shape) == set()  # one value per tensor
        fresh = Novograd(0.5)
        return ({k: v.copy() for k, v in params.items()},
                fresh.load_state_dict(sd, {k: v.copy() for k, v in params.items()}), fresh)

    def via_checkpoint(params, state, opt):
        path = tmp_path / "ckpt.safetensors"
        save_checkpoint(path, params, opt, state)
        fresh = Novograd(0.5)
        ck = load_checkpoint(path, params_template=params, optimizer=fresh)
        return ck["params"], ck["state"], fresh

    for io in (via_state_dict, via_checkpoint):
        resumed, _ = _novograd_run(8, io)
        for k in SHAPES:
            assert np.array_equal(resumed[k], straight[k]), (io.__name__, k)

    # and the values of a user optimizer
    p0, grads = problem(np.float64)
    opt = NormalizedSGD(0.1)
    params = {k: v.copy() for k, v in p0.items()}
    state = opt.init(params)
    params, state = opt.update(params, grads[0], state)
    path = tmp_path / "values.safetensors"
    save_checkpoint(path, params, opt, state)
    ck = load_checkpoint(path, params_template=params, optimizer=NormalizedSGD(0.1))
    assert ck["state"].values == {"taken": 1.0}
    assert NormalizedSGD(0.1).load_state_dict(opt.state_dict(state), params).values == {"taken": 1.0}


def test_bad_tensor_slot_or_values_in_state_dict_are_named():
    p0, grads = problem(np.float64)
    opt = Novograd(0.01)
    params = {k: v.copy() for k, v in p0.items()}
    state = opt.init(params)
    sd = opt.state_dict(state)
    sd["slots"]["nu"]["w"] = np.zeros((40, 30))
    with pytest.raises(ValueError, match=r"slot 'nu' of 'w' has shape \(40, 30\), the slot's \(\)"):
        Novograd(0.01).load_state_dict(sd, params)
    user = NormalizedSGD(0.1)
    sd = user.state_dict(user.init(params))
    sd["values"] = {"other": 1.0}
    with pytest.raises(KeyError, match="taken"):
        user.load_state_dict(sd, params)
    sd["values"] = {"taken": "x"}
    with pytest.raises(TypeError, match="taken"):
        user.load_state_dict(sd, params)


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_refused_step_commits_no_tensor_slot_or_value(policy):
    p0, grads = problem(np.float64)
    for opt in (Novograd(0.01, nonfinite=policy), NormalizedSGD(0.1, nonfinite=policy)):
        params = {k: v.copy() for k, v in p0.items()}
        state = opt.init(params)
        params, state = opt.update(params, grads[0], state)
        before = ({k: np.array(v) for k, v in params.items()}, state.to_numpy(),
                  dict(state.values))
        bad = dict(grads[1], b=np.full(30, np.nan))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            if policy == "raise":
                with pytest.raises(FloatingPointError):
                    opt.update(params, bad, state)
            else:
                params, state = opt.update(params, bad, state)
                assert state.last_step_skipped
        for k in SHAPES:
            assert np.array_equal(np.asarray(params[k]), before[0][k])
        for s, v in state.to_numpy().items():
            assert np.array_equal(v, before[1][s]), s
        assert state.values == before[2]


def test_tensor_without_gradient_keeps_its_tensor_slot():
    p0, grads = problem(np.float64)
    opt = Novograd(0.01)
    params = {k: v.copy() for k, v in p0.items()}
    state = opt.init(params)
    params, state = opt.update(params, grads[0], state)
    nu_w = float(state.slot("nu")["w"])
    w = np.array(params["w"])
    params, state = opt.update(params, {k: v for k, v in grads[1].items() if k != "w"}, state)
    assert float(state.slot("nu")["w"]) == nu_w
    assert np.array_equal(params["w"], w)
    assert float(state.slot("nu")["b"]) != float(opt.state_dict(opt.init(p0))["slots"]["nu"]["b"])


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_tensor_without_gradient_counts_for_nothing(backend):
    """A tensor without a gradient adds nothing to a step's sums, on every engine: Prodigy's
    ‖s‖₁ leaves its ``s`` out (the jitted JAX and the tensor-op engines counted its decayed
    ``s``: ``d`` 4e-4 off the numba engine's after five steps). Gradients of a quadratic
    (``d`` grows); step 3 lacks ``b``'s."""
    from mithril.utils.optimizers import Prodigy

    conv, ctx = BACKENDS[backend]
    p0, _ = problem(np.float32)
    target = {k: v[::-1].copy() if v.ndim else -v for k, v in p0.items()}

    def run(conv, ctx):
        with ctx():
            opt = Prodigy(1.0, weight_decay=1e-2)
            params = {k: conv(v.copy()) for k, v in p0.items()}
            state = opt.init(params)
            for t in range(6):
                g = {k: np.asarray(np.asarray(params[k]) - target[k], np.float32)
                     for k in params if (t, k) != (3, "b")}
                params, state = opt.update(params, {k: conv(v) for k, v in g.items()}, state)
        return {k: np.asarray(v) for k, v in params.items()}, state.values

    want, want_values = run(*BACKENDS["numpy"])
    got, values = run(conv, ctx)
    assert want_values["d"] > 2 * 1e-6
    # (the jitted engine sums in float32: the numerator, a sum of terms of both signs, to ~1e-5)
    assert values["d"] == pytest.approx(want_values["d"], rel=2e-6)
    assert values["numerator"] == pytest.approx(want_values["numerator"], rel=1e-4)
    for k in SHAPES:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
