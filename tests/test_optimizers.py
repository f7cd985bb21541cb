"""Parity of ``mithril.utils.optimizers`` with ``torch.optim`` (and optax), side by side.

Every parity test runs a mithril optimizer and its torch.optim counterpart in the same loop,
from the same start, on the same gradient sequence, and compares the parameters after every
step (and the optimizer state slots at the end, e.g. Adam's ``m``/``v`` against torch's
``exp_avg``/``exp_avg_sq``), on NumPy arrays, torch tensors and JAX arrays. JAX runs twice:
``"jax"`` is the default engine on CPU (the fused numba kernel over an aliased host buffer)
and ``"jax-jit"`` the jitted :class:`JaxEngine` used on accelerators; torch runs twice too:
``"torch-ops"`` is :class:`TorchFusedEngine` (torch's own fused kernels on our flat buffers,
the default on CUDA) forced on CPU, whose other optimizers take the tensor-op path. The tensor-op
:class:`ArrayEngine` (torch on GPU, float16/bfloat16) is forced on CPU in float64 for NumPy
and torch and held to the same parity.

The harness, its error measure (:func:`optimizer_parity.rel_err`: float64 parity must be
``<= 1e-10`` after 100 steps) and its costs are described in ``optimizer_parity.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from optimizer_parity import (
    ALL,
    ARRAY_BACKENDS,
    CASES,
    LR_FACTORS,
    OBSERVED,
    OPTAX,
    SHAPES,
    STEPS,
    TOL32,
    TOL64,
    array_engine,  # noqa: F401  (a fixture, used by name)
    as_none,
    check,
    drop_some,
    drop_tail,
    host,
    init,
    native,
    natives,
    on,
    rel_err,
    run_optax,
    side_by_side,
    small_problem,
)

from mithril.utils.optimizers import (
    SGD,
    Adam,
    RMSProp,
)

# ---------------------------------------------------------------------------------------------
# float64 parity with torch.optim (and optax)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_parity_float64(case):
    """100 steps vs torch.optim on every backend, the jitted JAX engine included (one test per
    case, so each kernel compiles once per worker); plus optax where it shares torch's
    convention."""
    finals = {}
    for backend in ALL:
        r = side_by_side(case, backend)
        assert r["dtype"] == "float64" and r["step"] == STEPS, backend
        check(f"{case}/{backend}", r)
        finals[backend] = r["final"]
    if case in OPTAX:
        o = run_optax(case)
        vs_mithril = max(rel_err(o["final"][k], finals["jax"][k]) for k in SHAPES)
        OBSERVED[f"{case}/optax"] = max(o["vs_torch"], vs_mithril)
        assert o["vs_torch"] <= TOL64 and vs_mithril <= TOL64, (o["vs_torch"], vs_mithril)


def test_jax_float64_left_process_flag_alone():
    import jax
    import jax.numpy as jnp

    before = jax.config.jax_enable_x64
    side_by_side("sgd", "jax", steps=2)
    assert jax.config.jax_enable_x64 == before
    if not before:
        assert jnp.ones(2).dtype == jnp.float32


@pytest.mark.parametrize("case", ["sgd_nesterov", "adam", "rmsprop_momentum", "adagrad"])
def test_set_learning_rate_mid_run_matches_torch(case):
    """set_learning_rate == torch's ``param_groups[0]["lr"] = ...`` (lr outside buffers)."""
    for backend in ALL:
        check(f"lr/{case}/{backend}", side_by_side(case, backend, lr_factors=LR_FACTORS))


@pytest.mark.parametrize("case, drop", [
    ("sgd_weight_decay", drop_some), ("rmsprop_centered_momentum", drop_some),
    ("adagrad_tiny_eps", drop_some), ("adamw", drop_tail), ("adagrad", drop_tail),
    ("sgd_weight_decay", as_none(drop_some)), ("adamw", as_none(drop_tail))])
def test_missing_gradients_match_torch_grad_none(case, drop):
    """A parameter absent from ``gradients``, or whose gradient is None, is left alone, and
    so is its state (torch skips parameters whose ``grad`` is None, weight decay
    included)."""
    for backend in ALL:
        check(f"drop/{case}/{backend}", side_by_side(case, backend, drop=drop))


@pytest.mark.parametrize("backend", ALL)
def test_sgd_dampening_first_step_is_the_optimizers(backend):
    """The undampened first buffer (b = g) belongs to the optimizer's first step (one step
    count per state): a parameter first seen at step 2 gets b = (1 - tau) g, where torch,
    counting per parameter, takes b = g. The parameter seen from step 1 matches torch."""
    p0 = {"a": np.array([1.0, -2.0]), "b": np.array([0.5, 3.0])}
    g1, g2 = {"a": np.array([0.3, -0.1])}, {"a": np.array([0.2, 0.4]), "b": np.array([1.5, -2.0])}
    lr, mu, tau = 0.1, 0.9, 0.25
    with on(backend, "float64"):
        opt = SGD(lr, momentum=mu, dampening=tau)
        params = natives(backend, p0)
        state = init(opt, backend, params)
        for g in (g1, g2):
            params, state = opt.update(params, natives(backend, g), state)
        ours = {k: host(v) for k, v in params.items()}
        buf = {k: host(v) for k, v in state.slot("momentum").items()}
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in p0.items()}
    topt = torch.optim.SGD(tp.values(), lr=lr, momentum=mu, dampening=tau)
    for g in (g1, g2):
        for k, t in tp.items():
            t.grad = torch.tensor(g[k]) if k in g else None
        topt.step()
    np.testing.assert_allclose(ours["a"], tp["a"].detach().numpy(), rtol=1e-14)
    np.testing.assert_array_equal(buf["b"], (1 - tau) * g2["b"])
    np.testing.assert_allclose(ours["b"], p0["b"] - lr * (1 - tau) * g2["b"], rtol=1e-14)
    np.testing.assert_array_equal(topt.state[tp["b"]]["momentum_buffer"].numpy(), g2["b"])


# the global gradient norms of problem() range over ~130-920 (gradient scale 1 + t % 7):
# clip_norm=500 clips only the larger ones, lower values clip every step
CLIP_RUNS = [
    ("adam", {"clip_norm": 1.5}, {"norm": 1.5}),
    ("sgd_nesterov", {"clip_norm": 500.0}, {"norm": 500.0}),
    ("sgd_momentum", {"clip_value": 0.5}, {"value": 0.5}),
    ("rmsprop_momentum", {"clip_norm": 2.0, "clip_value": 0.01}, {"norm": 2.0, "value": 0.01}),
    ("adamw", {"clip_value": 0.5}, {"value": 0.5}),
    ("adamw", {"clip_norm": 500.0}, {"norm": 500.0}),
    ("adagrad", {"clip_value": 1.0}, {"value": 1.0}),
    ("adagrad", {"clip_norm": 3.0}, {"norm": 3.0}),
    ("amsgrad", {"clip_value": 2.0}, {"value": 2.0}),
    ("amsgrad", {"clip_norm": 500.0, "clip_value": 1.0}, {"norm": 500.0, "value": 1.0}),
]


@pytest.mark.parametrize("case, extra, torch_clip", CLIP_RUNS)
def test_clip_options_match_torch_clip_then_step(case, extra, torch_clip):
    """``clip_norm``/``clip_value`` == torch ``clip_grad_norm_``/``clip_grad_value_`` followed
    by the torch optimizer (norm first when both are given)."""
    for backend in ALL:
        r = side_by_side(case, backend, torch_clip=torch_clip, **extra)
        check(f"clip/{case}/{','.join(extra)}/{backend}", r)


@pytest.mark.parametrize("backend", ["numpy", "jax"])
def test_step_count_is_per_optimizer(backend):
    """Convention (optax's, not torch's): bias correction and AdaGrad's lr_decay use the
    optimizer's step count, also for a parameter that missed earlier steps."""
    p_np, g_np = small_problem()
    opt = Adam(0.1)
    params = natives(backend, p_np)
    state = init(opt, backend, params)
    params, state = opt.update(params, {"a": native(backend, g_np["a"])}, state)
    params, state = opt.update(params, natives(backend, g_np), state)
    g = g_np["b"].astype(np.float64)
    m, v = 0.1 * g, 0.001 * g * g  # first moment update of "b", at t = 2
    expected = p_np["b"] - 0.1 / (1 - 0.9**2) * m / (np.sqrt(v) / np.sqrt(1 - 0.999**2) + 1e-8)
    assert rel_err(host(params["b"]), expected) <= 1e-6
    assert state.step == 2


@pytest.mark.parametrize("backend", ALL)
def test_gradient_key_order_and_key_objects_do_not_matter(backend):
    """Gradients are matched by name: the same steps whatever the order of their keys, and
    whether the keys are the params' own string objects or equal copies (the fast paths
    remember the keys that last matched). Equal shapes, so that only the names tell the
    gradients apart."""
    rng = np.random.default_rng(3)
    p0 = {k: rng.standard_normal(64).astype(np.float32) for k in ("u", "vv", "www")}
    grads = [{k: rng.standard_normal(64).astype(np.float32) for k in p0} for _ in range(4)]
    results = []
    for order in ("same", "reversed", "alternating"):
        opt = Adam(0.05)
        params = natives(backend, p0)
        state = init(opt, backend, params)
        for t, g in enumerate(grads):
            keys = list(g) if order == "same" or (order == "alternating" and t % 2) else list(g)[::-1]
            params, state = opt.update(params, {(k + "!")[:-1]: native(backend, g[k]) for k in keys}, state)
        results.append({k: host(v) for k, v in params.items()})
    for r in results[1:]:
        for k in results[0]:
            np.testing.assert_array_equal(results[0][k], r[k], err_msg=k)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_centered_rmsprop_constant_gradient_stays_finite(dtype):
    """With a constant gradient, v - mean(g)^2 cancels to rounding noise; torch takes the sqrt
    of slightly negative values and its params turn NaN (float64: after ~330 steps at
    alpha=0.9; float32: ~130). mithril clamps the variance at 0: identical to torch while
    torch is finite (until the variance is noise: float64 ~100 steps, float32 ~20), finite
    afterwards."""
    g_np = (np.full(64, 1.7) * np.linspace(0.5, 1.5, 64)).astype(dtype)
    p_np = np.zeros(64, dtype)
    compare = 100 if dtype == "float64" else 20
    for backend in ALL:
        with on(backend, dtype):
            opt = RMSProp(1e-3, decay=0.9, centered=True)
            params = {"w": native(backend, p_np)}
            state = init(opt, backend, params)
            tp = torch.tensor(p_np, requires_grad=True)
            topt = torch.optim.RMSprop([tp], lr=1e-3, alpha=0.9, eps=1e-8, centered=True)
            g = {"w": native(backend, g_np)}
            for t in range(400):
                params, state = opt.update(params, g, state)
                tp.grad = torch.tensor(g_np)
                topt.step()
                if t < compare and not torch.isnan(tp).any():
                    tol = 1e-5 if dtype == "float32" else TOL64
                    assert rel_err(host(params["w"]), tp.detach().numpy()) <= tol, (backend, t)
            w = host(params["w"])
            assert w.dtype == np.dtype(dtype) and np.isfinite(w).all(), backend
            assert np.isfinite(host(state.slots["grad_avg"])).all(), backend
            assert (w < 0).all()  # still descending


# ---------------------------------------------------------------------------------------------
# the tensor-op engine forced on CPU (the fixture: optimizer_parity.array_engine)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.usefixtures("array_engine")
def test_array_engine_parity_float64(case):
    for backend in ARRAY_BACKENDS:
        r = side_by_side(case, backend)
        assert r["dtype"] == "float64" and r["step"] == STEPS, backend
        check(f"array/{case}/{backend}", r)


@pytest.mark.parametrize("backend", ARRAY_BACKENDS)
@pytest.mark.usefixtures("array_engine")
def test_array_engine_clip_missing_gradients_and_lr_change(backend):
    for case, extra, torch_clip in (CLIP_RUNS[4], CLIP_RUNS[7], CLIP_RUNS[9]):
        r = side_by_side(case, backend, torch_clip=torch_clip, **extra)
        check(f"array/clip/{case}/{','.join(extra)}/{backend}", r)
    for case, drop in (("rmsprop_centered_momentum", drop_some), ("sgd_weight_decay", drop_some),
                       ("adamw", drop_tail), ("adagrad", drop_tail)):
        check(f"array/drop/{case}/{backend}", side_by_side(case, backend, drop=drop))
    check(f"array/lr/adam/{backend}", side_by_side("adam", backend, lr_factors=LR_FACTORS))


# ---------------------------------------------------------------------------------------------
# float32: the backends agree with each other
# ---------------------------------------------------------------------------------------------

# one per kernel family; the float32 kernels are reused by the small tests below
F32_CASES = ["sgd_dampening", "adam", "rmsprop_centered_momentum"]


@pytest.mark.parametrize("case", F32_CASES)
def test_float32_backends_agree(case):
    runs = {b: side_by_side(case, b, dtype="float32") for b in ALL}
    for b, r in runs.items():
        assert r["dtype"] == "float32", b
        # each is also close to torch.optim in float32 (rounding compounds over 100 steps)
        assert r["params"] <= 1e-3, (b, r["params"])
    # measured relative to each tensor's scale (max |x|): elementwise relative errors of
    # float32 values that cancel over 100 steps say nothing about the optimizer
    for a, b in (("numpy", "torch"), ("numpy", "jax"), ("numpy", "jax-jit"), ("torch", "jax-jit")):
        for k in SHAPES:
            x, y = runs[a]["final"][k], runs[b]["final"][k]
            err = float(np.max(np.abs(x - y)) / np.max(np.abs(y)))
            OBSERVED[f"f32/{case}/{a}-{b}"] = max(err, OBSERVED.get(f"f32/{case}/{a}-{b}", 0))
            assert err <= TOL32, (case, a, b, k, err)
    # NumPy, torch and JAX on CPU run the same fused kernel: identical bits
    for k in SHAPES:
        np.testing.assert_array_equal(runs["numpy"]["final"][k], runs["torch"]["final"][k])
        np.testing.assert_array_equal(runs["numpy"]["final"][k], runs["jax"]["final"][k])


