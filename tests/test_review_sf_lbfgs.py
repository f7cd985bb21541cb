"""Review probes of ``ScheduleFree(base)`` (= ``optax.contrib.schedule_free``) and
``LBFGS(convention="optax")`` (= ``optax.lbfgs``) where the authors' tests do not go, each
side by side with optax in float64 (float32 where named):

* ScheduleFree around a base with parameter groups (optax: ``partition`` of two bases), a
  base that clips (optax: ``chain(clip_by_global_norm, base)``), AdamW's decay read at ``y``,
  SGD with momentum, float32, and torch tensors through ``torch_optimizer`` (its
  ``eval_params``);
* LBFGS on 1-D non-convex problems (the direction not always one of descent, the zoom at
  ``max_linesearch_steps``, ``max_learning_rate`` capping the growth), the zoom's tolerances
  away from their defaults, a converged problem run on (zero gradients), float32 on JAX, a
  state dict mid-run resumed against optax's uninterrupted run, and torch tensors through
  ``torch_optimizer`` with ``max_learning_rate``.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib as oc
import pytest
import torch
from conftest import host, native

from mithril.utils.optimizers import LBFGS, SGD, Adam, AdamW, ScheduleFree


@pytest.fixture
def x64():
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", old)


def err(ours, theirs) -> float:
    return max(float(np.max(np.abs(host(ours[k]) - np.asarray(theirs[k])))) for k in theirs)


# ==============================================================================================
# ScheduleFree
# ==============================================================================================
RNG = np.random.default_rng(0)
A = RNG.normal(size=(4, 3))
P0 = {"w": RNG.normal(size=(4, 3)), "b": RNG.normal(size=3)}
STEPS, TOL = 25, 1e-12


def grads_at(p):
    """Gradients of ``½‖w − A‖² + 0.1·Σw⁴ + ‖b‖²`` in the arrays' backend."""
    w, b = p["w"], p["b"]
    a = native("torch" if hasattr(w, "detach") else "jax" if isinstance(w, jax.Array)
               else "numpy", A.astype("float32" if "float32" in str(w.dtype) else "float64"))
    return {"w": (w - a) + 0.4 * w ** 3, "b": 2 * b}


def sf_check(ours, tx, backend, dtype="float64", tol=TOL):
    """Params and eval params after every step against optax's."""
    q = {k: jnp.asarray(v, dtype) for k, v in P0.items()}
    s = tx.init(q)
    params = {k: native(backend, v.astype(dtype)) for k, v in P0.items()}
    state = ours.init(params)
    worst = 0.0

    @jax.jit
    def step(q, s):
        u, s = tx.update(grads_at(q), s, q)
        return optax.apply_updates(q, u), s

    for _ in range(STEPS):
        q, s = step(q, s)
        params, state = ours.update(params, grads_at(params), state)
        worst = max(worst, err(params, q),
                    err(ours.eval_params(state, params), oc.schedule_free_eval_params(s, q)))
    assert worst <= tol, worst
    assert host(params["w"]).dtype == np.dtype(dtype)
    assert err(params, P0) > 0.1


SF_CASES = {  # id: (ours, optax's)
    "groups": (  # a group of the base with its own lr and decay: optax's partition
        lambda: ScheduleFree(Adam(0.05, beta1=0.0, param_groups=[
            {"params": ["w"], "learning_rate": 0.02, "weight_decay": 0.3}])),
        lambda: oc.schedule_free(optax.partition(
            {"w": optax.chain(optax.add_decayed_weights(0.3), optax.adam(0.02, b1=0.0)),
             "b": optax.adam(0.05, b1=0.0)}, {"w": "w", "b": "b"}), 0.05)),
    "clip_norm": (
        lambda: ScheduleFree(SGD(0.1, clip_norm=1.5, clip_eps=0.0)),  # (optax's: no ε)
        lambda: oc.schedule_free(optax.chain(optax.clip_by_global_norm(1.5), optax.sgd(0.1)),
                                 0.1)),
    "adamw_decay_at_y": (
        lambda: ScheduleFree(AdamW(0.05, beta1=0.0, weight_decay=0.5), b1=0.8),
        lambda: oc.schedule_free(optax.adamw(0.05, b1=0.0, weight_decay=0.5), 0.05, b1=0.8)),
    "sgd_momentum_power": (
        lambda: ScheduleFree(SGD(0.05, momentum=0.5, convention="optax"), weight_lr_power=1.5),
        lambda: oc.schedule_free(optax.sgd(0.05, momentum=0.5), 0.05, weight_lr_power=1.5)),
}


@pytest.mark.parametrize("case, backend", [  # (every case on NumPy, torch; JAX once by default)
    pytest.param(c, b, marks=[pytest.mark.slow] if b == "jax" and c != "groups" else [])
    for c in SF_CASES for b in ("numpy", "torch", "jax")])
def test_schedule_free_around_more_bases(case, backend, x64):
    ours, theirs = SF_CASES[case]
    sf_check(ours(), theirs(), backend)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_schedule_free_float32(backend):
    """float32 (optax keeps weight_sum in float32, ours in float64): float32 rounding."""
    assert not jax.config.jax_enable_x64
    sf_check(ScheduleFree(Adam(0.05, beta1=0.0)),
             oc.schedule_free(optax.adam(0.05, b1=0.0), 0.05), backend, "float32", 5e-6)


def test_schedule_free_through_torch_optimizer_and_its_eval_params(x64):
    """torch tensors that require grad, stepped by ``torch_optimizer``; ``eval_params`` of
    its Mithril state at those tensors: optax's ``schedule_free_eval_params``."""
    from mithril.interop import torch_optimizer

    tx = oc.schedule_free(optax.adam(0.05, b1=0.0), 0.05)
    q = {k: jnp.asarray(v) for k, v in P0.items()}
    s = tx.init(q)
    ts = {k: torch.tensor(v, requires_grad=True) for k, v in P0.items()}
    topt = torch_optimizer(ScheduleFree(Adam(0.05, beta1=0.0)), ts.items())
    step = jax.jit(lambda q, s: tx.update(grads_at(q), s, q))
    for _ in range(10):
        g = grads_at({k: x.detach() for k, x in ts.items()})
        for k, x in ts.items():
            x.grad = g[k].clone()
        topt.step()
        u, s = step(q, s)
        q = optax.apply_updates(q, u)
    ev = topt.mithril_optimizer.eval_params(topt.mithril_state, dict(ts))
    assert isinstance(ev["w"], torch.Tensor)
    assert err(ev, oc.schedule_free_eval_params(s, q)) <= TOL
    assert err({k: x.detach() for k, x in ts.items()}, q) <= TOL


# ==============================================================================================
# LBFGS(convention="optax")
# ==============================================================================================
def double_well(p):  # non-convex: the curvature turns negative between the wells
    x = p["x"]
    return jnp.sum(x ** 4 - 3.0 * x ** 2 + x)


def wavy(p):  # many local minima on a bowl: the zoom works for its curvature condition
    x = p["x"]
    return jnp.sum(jnp.sin(5.0 * x) + 0.1 * x ** 2)


def soft_abs(p):  # nearly linear far out: the zoom grows its step
    x = p["x"]
    return jnp.sum(jnp.sqrt(1e-2 + (x - 3.0) ** 2))


def bowl(p):  # reached exactly: zero gradients afterwards
    return jnp.sum((p["x"] - 3.0) ** 2)


@functools.cache
def _value_and_grad(f):
    return jax.jit(jax.value_and_grad(f))


def flat(params):
    return np.concatenate([host(params[k]).ravel() for k in sorted(params)])


_OPTAX_RUNS: dict = {}


def optax_lbfgs(f, x0, iters, dtype="float64", **kw):
    """optax.lbfgs's flat params and zoom steps after each iteration (memoised)."""
    key = (f, tuple(x0), iters, dtype, repr(sorted(kw.items())))
    if key in _OPTAX_RUNS:
        return _OPTAX_RUNS[key]
    ls_kw = {k: kw.pop(k) for k in list(kw) if k in (
        "max_linesearch_steps", "max_learning_rate", "slope_rtol", "curv_rtol",
        "approx_dec_rtol", "stepsize_precision", "initial_guess_strategy")}
    ls = optax.scale_by_zoom_linesearch(**{"max_linesearch_steps": 20,
                                           "initial_guess_strategy": "one", **ls_kw})
    opt = optax.lbfgs(linesearch=ls, **kw)
    params = {"x": jnp.asarray(np.asarray(x0), dtype)}
    state = opt.init(params)
    vg = optax.value_and_grad_from_state(f)

    @jax.jit
    def step(params, state):
        value, g = vg(params, state=state)
        u, state = opt.update(g, state, params, value=value, grad=g, value_fn=f)
        return optax.apply_updates(params, u), state

    out, steps = [], []
    for _ in range(iters):
        params, state = step(params, state)
        out.append(flat(params))
        steps.append(int(optax.tree.get(state, "info").num_linesearch_steps))
    _OPTAX_RUNS[key] = out, steps
    return out, steps


def closure_of(f, kind, dtype="float64"):
    vg = _value_and_grad(f)

    def closure(p):
        v, g = vg({k: jnp.asarray(host(a)) for k, a in p.items()})
        g = np.asarray(g["x"], dtype)
        return float(v), {"x": torch.tensor(g) if kind == "torch" else
                          jnp.asarray(g) if kind == "jax" else g}
    return closure


def ours_lbfgs(f, x0, iters, kind="numpy", dtype="float64", resume_at=None, **kw):
    opt = LBFGS(convention="optax", **{"history_size": kw.pop("memory_size", 10), **kw})
    params = {"x": native(kind, np.asarray(x0, dtype))}
    closure = closure_of(f, kind, dtype)
    state = opt.init(params)
    out, steps = [], []
    for i in range(iters):
        if i == resume_at:  # a state dict through JSON-like lists, into a fresh LBFGS()
            d = json.loads(json.dumps(opt.state_dict(state), default=lambda a: a.tolist()))
            opt = LBFGS()
            params = {"x": native(kind, host(params["x"]))}
            state = opt.load_state_dict(d, params)
        params, state = opt.update(params, None, state, closure=closure)
        out.append(flat(params))
        steps.append(int(state.values["num_linesearch_steps"]))
    return out, steps


def rel_err(a, b) -> float:
    return max(float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-300)) for x, y in zip(a, b))


LB_CASES = {  # id: (f, x0, iterations, options, a check on optax's zoom steps)
    "double well, several starts": (double_well, [2.5, -0.1, 0.2, -1.9], 12, {}, None),
    "double well, 2 zoom steps": (double_well, [2.5, -0.1, 0.2, -1.9], 12,
                                  {"max_linesearch_steps": 2}, lambda s: s.count(2) >= 2),
    "wavy, keep": (wavy, [0.3, 2.0, -1.1], 12, {"initial_guess_strategy": "keep",
                                                 "memory_size": 3}, lambda s: max(s) > 1),
    "soft abs, growth capped": (soft_abs, [-40.0, 7.0], 8, {
        "max_learning_rate": 3.0, "initial_guess_strategy": "keep"}, lambda s: max(s) > 2),
    "soft abs, growing": (soft_abs, [-40.0], 8, {"scale_init_precond": False},
                          lambda s: max(s) > 2),
    "tolerances": (wavy, [0.3, 2.0, -1.1], 10, {
        "slope_rtol": 0.3, "curv_rtol": 0.2, "approx_dec_rtol": None,
        "stepsize_precision": 0.1}, None),
    "converged, run on": (bowl, [1.0, -2.0], 8, {}, None),
}


#: by default NumPy on max_learning_rate capping a growing zoom with the "keep" guess (the
#: resume and torch_optimizer tests reuse its optax run: each compiles for ~5 s); the other
#: cases and backends (the same code paths; the step limit is test_lbfgs_optax's) are slow
DEFAULT = ("soft abs, growth capped",)


@pytest.mark.parametrize("case, kind", [
    pytest.param(c, k, marks=[] if c in DEFAULT and k == "numpy" else [pytest.mark.slow])
    for c in LB_CASES for k in ("numpy", "torch", "jax")])
def test_lbfgs_matches_optax_on_harder_problems(case, kind, x64):
    f, x0, iters, kw, check = LB_CASES[case]
    ref, ref_steps = optax_lbfgs(f, x0, iters, **dict(kw))
    got, steps = ours_lbfgs(f, x0, iters, kind, **dict(kw))
    assert rel_err(got, ref) <= 1e-10, (rel_err(got, ref), steps, ref_steps)
    assert steps == ref_steps
    assert check is None or check(ref_steps), ref_steps
    assert float(f({"x": jnp.asarray(got[-1])})) < float(f({"x": jnp.asarray(x0)}))


@pytest.mark.parametrize("kind", ["numpy", pytest.param("jax", marks=pytest.mark.slow)])
def test_lbfgs_resumed_from_a_state_dict_is_optaxs_uninterrupted_run(kind, x64):
    """Saved after 3 iterations (the "keep" guess and the capped step in the state) and
    loaded into ``LBFGS()``: optax's run without a break."""
    f, x0, iters, kw, _ = LB_CASES["soft abs, growth capped"]
    ref, ref_steps = optax_lbfgs(f, x0, iters, **dict(kw))
    got, steps = ours_lbfgs(f, x0, iters, kind, resume_at=3, **dict(kw))
    assert rel_err(got, ref) <= 1e-10 and steps == ref_steps


@pytest.mark.slow
def test_lbfgs_float32_on_jax():
    assert not jax.config.jax_enable_x64
    ref, _ = optax_lbfgs(double_well, [2.5, -0.1, 0.2, -1.9], 6, "float32")
    got, _ = ours_lbfgs(double_well, [2.5, -0.1, 0.2, -1.9], 6, "jax", "float32")
    assert got[-1].dtype == np.float32
    assert rel_err(got, ref) <= 1e-4, rel_err(got, ref)


def test_lbfgs_torch_optimizer_with_max_learning_rate(x64):
    from mithril.interop import torch_optimizer

    f, x0, iters, kw, _ = LB_CASES["soft abs, growth capped"]  # (its optax run, once)
    ref, _ = optax_lbfgs(f, x0, iters, **dict(kw))
    x = torch.tensor([-40.0, 7.0], dtype=torch.float64, requires_grad=True)
    opt = torch_optimizer(LBFGS(convention="optax", max_learning_rate=3.0,
                                initial_guess_strategy="keep"), [("x", x)])

    def closure():
        opt.zero_grad()
        loss = torch.sqrt(1e-2 + (x - 3.0) ** 2).sum()
        loss.backward()
        return loss

    for i in range(iters):
        opt.step(closure)
        assert rel_err([x.detach().numpy()], [ref[i]]) <= 1e-10, i
