"""Adafactor's fused numba step (``fused=True``, :mod:`...engines.factored_kernels`)
against its per-tensor array-op path (``fused=False``) and torch.optim.Adafactor.

On NumPy and torch, float32 and float64: matrices (square, wide, tall, one row, one
column), 3-D tensors (factored per leading index), vectors, scalars and empty tensors;
every option the step honours (parameter groups, clipping of every kind, weight
averages, missing gradients); the same results on any thread count and on JAX's double
buffer; gradients that are non-contiguous or alias the parameters; and nothing written
by a step that is refused or skipped.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

from mithril.utils.optimizers import Adafactor
from mithril.utils.optimizers.engines import threads

SHAPES = {"sq": (5, 5), "tall": (7, 3), "wide": (3, 9), "row": (1, 6), "col": (6, 1),
          "k": (2, 3, 4), "b": (5,), "s": (), "e": (0, 3)}
FACTORED = ["sq", "tall", "wide", "row", "col", "k"]
STEPS = 40


def problem(dtype="float64", steps=STEPS, shapes=SHAPES, seed=0):
    rng = np.random.default_rng(seed)
    p0 = {k: np.asarray(rng.standard_normal(s), dtype) for k, s in shapes.items()}
    grads = [{k: np.asarray(rng.standard_normal(s) * 0.1, dtype) for k, s in shapes.items()}
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


def run(opt, p0, grads, backend="numpy", lr_after=None, drop=None):
    """Every step (the learning rate changed half way; ``drop``: the names without a
    gradient at step 3); returns the params and state as host arrays."""
    params = {k: native(backend, v) for k, v in p0.items()}
    state = opt.init(params)
    for t, g in enumerate(grads):
        if t == len(grads) // 2 and lr_after is not None:
            opt.set_learning_rate(lr_after)
        g = {k: v for k, v in g.items() if t != 3 or k not in (drop or ())}
        params, state = opt.update(params, {k: native(backend, v) for k, v in g.items()}, state)
    return ({k: host(v) for k, v in params.items()},
            {s: {k: host(v) for k, v in state.slot(s).items()} for s in state.slots}, state)


def rel(a, b):
    """The largest difference over the largest magnitude, over every array of two dicts."""
    return max(float(np.abs(a[k] - b[k]).max()) / max(float(np.abs(b[k]).max()), 1e-300)
               for k in b if b[k].size)


def close(a, b, tol):
    for k in b:
        if isinstance(b[k], dict):
            close(a[k], b[k], tol)
        else:
            assert a[k].shape == b[k].shape, k
    flat_a = {f"{s}/{k}": v for s, d in a.items() for k, v in (d.items() if isinstance(d, dict)
                                                                else [(s, d)])}
    flat_b = {f"{s}/{k}": v for s, d in b.items() for k, v in (d.items() if isinstance(d, dict)
                                                                else [(s, d)])}
    err = rel(flat_a, flat_b)
    assert err <= tol, err


TOL = {"float64": 1e-12, "float32": 2e-5}
KWS = [{}, {"weight_decay": 0.1}, {"weight_decay": 0.05, "d": 2.0, "eps": (1e-20, 1e-2),
                                    "beta2_decay": -0.5, "maximize": True}]


# ---------------------------------------------------------------------------------------------
# the fused step against the array-op path and torch
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kw", KWS)
def test_fused_equals_array_ops_and_torch(backend, dtype, kw):
    p0, grads = problem(dtype)
    ours, s_ours, state = run(Adafactor(0.05, **kw), p0, grads, backend, 0.02)
    ref, s_ref, _ = run(Adafactor(0.05, fused=False, **kw), p0, grads, backend, 0.02)
    close({"p": ours, **s_ours}, {"p": ref, **s_ref}, TOL[dtype])
    assert state.step == STEPS and np.isfinite(state.last_grad_norm)
    # torch.optim itself
    tp = {k: torch.tensor(v) for k, v in p0.items() if v.size}
    topt = torch.optim.Adafactor(list(tp.values()), lr=0.05, **kw)
    for t, g in enumerate(grads):
        if t == STEPS // 2:
            topt.param_groups[0]["lr"] = 0.02
        for k, v in tp.items():
            v.grad = torch.tensor(g[k])
        topt.step()
    assert rel(ours, {k: v.numpy() for k, v in tp.items()}) <= TOL[dtype]


def test_state_shapes_and_global_norm():
    p0, grads = problem(steps=1)
    _, slots, state = run(Adafactor(0.05), p0, grads)
    assert slots["row_var"]["k"].shape == (2, 3, 1) and slots["col_var"]["k"].shape == (2, 1, 4)
    assert slots["variance"]["b"].shape == (5,) and slots["variance"]["sq"].shape == (0,)
    norm = np.sqrt(sum(float(np.sum(g ** 2)) for g in grads[0].values()))
    assert state.last_grad_norm == pytest.approx(norm, rel=1e-14)


@pytest.mark.parametrize("make", [
    lambda **kw: Adafactor(0.05, clip_norm=0.5, **kw),
    lambda **kw: Adafactor(0.05, clip_value=0.05, weight_decay=0.1, **kw),
    lambda **kw: Adafactor(0.05, clip_tensor_norm=0.3, **kw),
    lambda **kw: Adafactor(0.05, clip_block_rms=0.05, clip_norm=1.0, **kw),
    lambda **kw: Adafactor(0.05, adaptive_clip=0.01, **kw),
    lambda **kw: Adafactor(0.05, ema_decay=0.9, swa_start=5, **kw),
    lambda **kw: Adafactor(0.05, weight_decay=0.1, exclude_weight_decay=["b"], **kw),
    lambda **kw: Adafactor(0.05, weight_decay=0.1, param_groups=[
        {"params": ["k", "wide"], "learning_rate": 0.01, "d": 2.0, "maximize": True},
        {"params": "b", "epsilon": (1e-12, 1e-2), "weight_decay": 0.0, "clip_value": 0.05}], **kw),
], ids=["clip_norm", "clip_value", "tensor_norm", "block_rms", "adaptive", "ema_swa",
        "wd_exclude", "groups"])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_every_option_as_the_array_path(make, backend):
    """Each option, with a gradient missing for some tensors at step 3 (their params and
    factors stay, their averages still move)."""
    p0, grads = problem(steps=12)
    drop = ["sq", "b", "k"]
    ours, s_ours, _ = run(make(), p0, grads, backend, drop=drop)
    ref, s_ref, _ = run(make(fused=False), p0, grads, backend, drop=drop)
    close({"p": ours, **s_ours}, {"p": ref, **s_ref}, 1e-12)


def test_missing_gradient_leaves_the_tensor_and_its_factors():
    p0, grads = problem(steps=2)
    opt = Adafactor(0.05)
    params = {k: v.copy() for k, v in p0.items()}
    params, state = opt.update(params, grads[0], opt.init(params))
    before = {k: host(v).copy() for k, v in params.items()}
    rows = {k: v.copy() for k, v in state.slot("row_var").items()}
    params, state = opt.update(params, {k: v for k, v in grads[1].items() if k != "wide"}, state)
    np.testing.assert_array_equal(params["wide"], before["wide"])
    np.testing.assert_array_equal(state.slot("row_var")["wide"], rows["wide"])
    assert not np.array_equal(params["sq"], before["sq"])


# ---------------------------------------------------------------------------------------------
# threads, JAX's double buffer, gradients where they lie
# ---------------------------------------------------------------------------------------------

def test_thread_count_does_not_change_the_result():
    shapes = {f"m{i}": (300, 200) for i in range(4)} | {f"v{i}": (30000,) for i in range(4)}
    p0, grads = problem("float32", steps=3, shapes=shapes)
    old = threads._threads
    try:
        out = []
        for n in (1, 2, 3):
            threads.set_num_threads(n)
            out.append(run(Adafactor(0.05, weight_decay=0.1), p0, grads)[:2])
    finally:
        threads._threads = old
    for other in out[1:]:
        for k in shapes:
            np.testing.assert_array_equal(other[0][k], out[0][0][k])
            np.testing.assert_array_equal(other[1]["row_var"][k], out[0][1]["row_var"][k])


def test_jax_double_buffer_equals_numpy():
    pytest.importorskip("jax")
    p0, grads = problem("float32", steps=6)
    ours, s_ours, state = run(Adafactor(0.05, weight_decay=0.1, ema_decay=0.5), p0, grads,
                              "jax", drop=["sq"])
    ref, s_ref, _ = run(Adafactor(0.05, weight_decay=0.1, ema_decay=0.5), p0, grads, "numpy",
                        drop=["sq"])
    assert type(state.engine).__name__ == "NumbaEngine"
    close({"p": ours, **s_ours}, {"p": ref, **s_ref}, 0.0)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_noncontiguous_and_aliasing_gradients(backend):
    """A transposed gradient, and the returned params passed as gradients (they lie in the
    buffer the step writes: read before anything is written)."""
    p0, grads = problem(steps=2)
    outs = []
    for mode in ("plain", "strided"):
        opt = Adafactor(0.05)
        params = {k: native(backend, v) for k, v in p0.items()}
        params, state = opt.update(params, {k: native(backend, v) for k, v in grads[0].items()},
                                   opt.init(params))
        g = {k: native(backend, v) for k, v in grads[1].items()}
        if mode == "strided":
            g["sq"] = native(backend, np.ascontiguousarray(grads[1]["sq"].T)).T
            assert not (g["sq"].is_contiguous() if backend == "torch"
                        else g["sq"].flags.c_contiguous)
        params, state = opt.update(params, g, state)
        aliased = dict(params)  # the returned params, as gradients
        expected = {k: host(v).copy() for k, v in params.items()}
        params, state = opt.update(params, aliased, state)
        outs.append(({k: host(v) for k, v in params.items()}, expected))
    for k in SHAPES:
        np.testing.assert_array_equal(outs[0][0][k], outs[1][0][k])
    # the aliasing step equals one with copies of those gradients
    opt = Adafactor(0.05)
    params = {k: native(backend, v) for k, v in p0.items()}
    params, state = opt.update(params, {k: native(backend, v) for k, v in grads[0].items()},
                               opt.init(params))
    params, state = opt.update(params, {k: native(backend, v) for k, v in grads[1].items()},
                               state)
    params, state = opt.update(params, {k: native(backend, v) for k, v in outs[0][1].items()},
                               state)
    for k in SHAPES:
        np.testing.assert_array_equal(host(params[k]), outs[0][0][k])


# ---------------------------------------------------------------------------------------------
# nothing changes unless the step is applied
# ---------------------------------------------------------------------------------------------

def snapshot(params, state):
    return ({k: host(v).copy() for k, v in params.items()},
            {s: host(v).copy() for s, v in state.slots.items()}, state.step)


def same(a, b):
    for x, y in zip(a[:2], b[:2]):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert a[2] == b[2]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_refused_and_skipped_steps_change_nothing(backend, dtype):
    p0, grads = problem(dtype, steps=3)
    for policy in ("skip", "raise"):
        opt = Adafactor(0.05, weight_decay=0.1, ema_decay=0.9, nonfinite=policy)
        params = {k: native(backend, v) for k, v in p0.items()}
        state = opt.init(params)
        for g in grads[:2]:
            params, state = opt.update(params, {k: native(backend, v) for k, v in g.items()},
                                       state)
        before = snapshot(params, state)
        nan = {k: native(backend, v) for k, v in grads[2].items()}
        nan["k"][1, 0, 2] = float("nan")
        huge = copy.copy(opt)  # finite gradients, non-finite results
        huge.__dict__.update(weight_decay=1e308, learning_rate=10.0)
        good = {k: native(backend, v) for k, v in grads[2].items()}
        for o, g, what in ((opt, nan, "non-finite gradient"), (huge, good, "non-finite")):
            if policy == "skip":
                with pytest.warns(RuntimeWarning, match="skipped"):
                    out, state = o.update(params, g, state)
                assert out["sq"] is params["sq"] and state.last_step_skipped
            else:
                with pytest.raises(FloatingPointError, match=what):
                    o.update(params, g, state)
            same(before, snapshot(params, state))
    bad_inputs = [
        {**{k: native(backend, v) for k, v in grads[2].items()},
         "sq": native(backend, np.zeros((5, 4), dtype))},
        {**{k: native(backend, v) for k, v in grads[2].items()}, "zz": native(backend, p0["b"])},
        {k: native(backend, v.astype("float16")) for k, v in grads[2].items()},
    ]
    opt = Adafactor(0.05)
    params = {k: native(backend, v) for k, v in p0.items()}
    params, state = opt.update(params, {k: native(backend, v) for k, v in grads[0].items()},
                               opt.init(params))
    before = snapshot(params, state)
    for g in bad_inputs:
        with pytest.raises((TypeError, ValueError, KeyError)):
            opt.update(params, g, state)
        same(before, snapshot(params, state))


def test_nonfinite_propagate_counts_and_applies():
    p0, grads = problem(steps=1)
    opt = Adafactor(0.05)
    params = {k: v.copy() for k, v in p0.items()}
    state = opt.init(params)
    grads[0]["wide"][0, 0] = np.inf
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        params, state = opt.update(params, grads[0], state)
    assert state.num_nonfinite == 1 and state.step == 1 and not np.isfinite(
        state.last_grad_norm)
    assert not np.isfinite(params["wide"]).all() and np.isfinite(params["sq"]).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        params, state = opt.update(params, problem(steps=1, seed=1)[1][0], state)


def test_fused_is_a_checked_flag():
    with pytest.raises(TypeError, match="fused"):
        Adafactor(fused="yes")
    assert Adafactor().hyperparameters()["fused"] is True
