"""Adaptive gradient clipping fused into the step (``engines/unitwise.py``): the fused path
equals clipping the gradients first (:func:`clipping.adaptive_clip`, which
``tests/test_tensor_clipping.py`` checks against optax) and running the optimizer on them,
on every engine, with tensors large enough to be cut mid-row into several pieces, with
other clipping, groups, averages and the non-finite policies; no gradient copy is made;
a refused step changes nothing."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import host, native, optimizer_engine

from mithril.utils.optimizers import LAMB, SGD, Adam, AdamW, Lookahead
from mithril.utils.optimizers.clipping import adaptive_clip
from mithril.utils.optimizers.engines import threads
from mithril.utils.optimizers.engines.numba_engine import NumbaEngine

# "wide" has 210,000 elements in rows of 700 units: pieces of 65,536 elements (set below,
# smaller than the default) start mid-row
SHAPES = {"wide": (300, 700), "heads": (40, 30, 20), "conv": (3, 3, 16, 8), "b": (700,),
          "row": (1, 9), "s": ()}
STEPS = 6


@pytest.fixture(autouse=True)
def _small_pieces(monkeypatch):
    """Pieces of 65,536 elements, so that "wide" is cut into several, mid-row."""
    monkeypatch.setattr(threads, "PIECE", 1 << 16)


def problem(dtype: str, scale: float = 1.0):
    rng = np.random.default_rng(1)
    p0 = {k: np.asarray(rng.standard_normal(s) * 0.1, dtype=dtype) for k, s in SHAPES.items()}
    # units' gradients spread over four decades: each step clips some units and not others
    spread = {k: np.geomspace(1e-3, 10, s[-1]) if s else 1.0 for k, s in SHAPES.items()}
    grads = [{k: np.asarray(rng.standard_normal(s) * spread[k] * scale * (0.2 + t % 3),
                            dtype=dtype) for k, s in SHAPES.items()} for t in range(STEPS)]
    return p0, grads


def run(opt, p0, grads, backend="numpy", pre_clip=None):
    """``opt`` for every step; with ``pre_clip=(c, eps, skip)`` the gradients are clipped
    first, tensor by tensor (those in ``skip`` left alone), as the unfused reference."""
    params = {k: native(backend, v) for k, v in p0.items()}
    state = opt.init(params)
    for g in grads:
        hp = {k: host(v) for k, v in params.items()}
        if pre_clip is not None:
            c, eps, skip = pre_clip
            g = {k: v if k in skip else adaptive_clip(v, hp[k], c, eps) for k, v in g.items()}
        params, state = opt.update(params, {k: native(backend, v) for k, v in g.items()}, state)
    return {k: host(v) for k, v in params.items()}, state


def rel(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def assert_close(mine, want, tol):
    errs = {k: rel(mine[k], want[k]) for k in want}
    assert max(errs.values()) <= tol, errs


# (JAX only in float32: x64 is off in this process)
@pytest.mark.parametrize("engine, dtype", [
    *((e, d) for e in ("numpy", "torch", "array-torch") for d in ("float64", "float32")),
    ("jax", "float32"), ("jax-jit", "float32")])
def test_fused_equals_clipping_first(engine, dtype):
    backend = engine.split("-")[-1] if engine != "jax-jit" else "jax"
    p0, grads = problem(dtype)
    opt = Adam(0.01, adaptive_clip=0.05)
    with optimizer_engine(engine):
        mine, state = run(opt, p0, grads, backend)
        want, _ = run(Adam(0.01), p0, grads, backend, pre_clip=(0.05, 1e-3, ()))
    assert_close(mine, want, 1e-13 if dtype == "float64" else 2e-6)
    assert isinstance(state.engine, NumbaEngine) == (engine in ("numpy", "torch", "jax"))
    if isinstance(state.engine, NumbaEngine):  # "wide" really is cut into several pieces
        assert state.engine._plan.pieces >= 4
    # the numba kernel and the jitted JAX step clip inside the step; the tensor-op engine
    # (torch on accelerators) gets clipped copies
    assert state.engine.fuses_adaptive_clip(opt, state) == (engine != "array-torch")


def test_jitted_jax_two_pass_and_tensor_clipping():
    """In the jitted JAX step the clipping also reaches the first pass of a two-pass
    optimizer and the per-tensor norms of ``clip_tensor_norm``."""
    p0, grads = problem("float32")
    with optimizer_engine("jax-jit"):
        for make in (lambda **k: LAMB(0.01, **k),
                     lambda **k: Adam(0.01, clip_tensor_norm=0.5, clip_norm=1.0, **k)):
            opt = make(adaptive_clip=0.05)
            mine, state = run(opt, p0, grads, "jax")
            want, _ = run(make(), p0, grads, "jax", pre_clip=(0.05, 1e-3, ()))
            assert state.engine.fuses_adaptive_clip(opt, state)
            assert_close(mine, want, 2e-6)


def test_some_units_clipped_others_not():
    """The bound falls between units' norms: a real mix, and the clipped tensors differ
    from an unclipped run (the test can fail)."""
    p0, grads = problem("float64")
    mine, _ = run(SGD(0.1, momentum=0.9, adaptive_clip=0.05), p0, grads)
    want, _ = run(SGD(0.1, momentum=0.9), p0, grads, pre_clip=(0.05, 1e-3, ()))
    raw, _ = run(SGD(0.1, momentum=0.9), p0, grads)
    assert_close(mine, want, 1e-13)
    for k in ("wide", "heads", "conv", "b"):
        assert rel(mine[k], raw[k]) > 1e-3, k
    g = grads[1]["wide"].reshape(-1, 700)
    bound = 0.05 * np.maximum(np.linalg.norm(p0["wide"].reshape(-1, 700), axis=0), 1e-3)
    hit = np.linalg.norm(g, axis=0) > bound
    assert 0 < hit.sum() < 700  # some units clipped, some not


def test_thread_count_does_not_change_the_result():
    p0, grads = problem("float32")
    out = []
    for n in (1, 2, 3):
        old = threads._threads
        threads.set_num_threads(n)
        try:
            out.append(run(Adam(0.01, adaptive_clip=0.05), p0, grads)[0])
        finally:
            threads._threads = old
    for o in out[1:]:
        assert all(np.array_equal(o[k], out[0][k]) for k in SHAPES)


def test_with_global_and_tensor_clipping_groups_and_ema():
    """adaptive clipping first, then per-tensor and global norm clipping see the clipped
    gradients; a group turns it off for two tensors; the EMA slot rides along."""
    p0, grads = problem("float64", scale=5.0)
    groups = [{"params": ["b", "row"], "adaptive_clip": None}]
    mine, state = run(AdamW(0.01, adaptive_clip=0.05, clip_tensor_norm=0.5, clip_norm=1.0,
                            ema_decay=0.9, param_groups=groups), p0, grads)
    want, ref_state = run(AdamW(0.01, clip_tensor_norm=0.5, clip_norm=1.0, ema_decay=0.9),
                          p0, grads, pre_clip=(0.05, 1e-3, ("b", "row")))
    assert_close(mine, want, 1e-13)
    assert abs(state.last_grad_norm - ref_state.last_grad_norm) <= 1e-12 * ref_state.last_grad_norm
    ema = {k: host(v) for k, v in AdamW(0.01, ema_decay=0.9).ema_params(state).items()}
    ref = {k: host(v) for k, v in AdamW(0.01, ema_decay=0.9).ema_params(ref_state).items()}
    assert_close(ema, ref, 1e-13)


def test_lookahead_and_two_pass_optimizers():
    p0, grads = problem("float64")
    mine, _ = run(Lookahead(Adam(0.01, adaptive_clip=0.05), sync_period=2), p0, grads)
    want, _ = run(Lookahead(Adam(0.01), sync_period=2), p0, grads, pre_clip=(0.05, 1e-3, ()))
    assert_close(mine, want, 1e-13)
    # LAMB's first pass reads the gradients too: it scales them by the same factors
    opt = LAMB(0.01, adaptive_clip=0.05)
    mine, state = run(opt, p0, grads)
    want, _ = run(LAMB(0.01), p0, grads, pre_clip=(0.05, 1e-3, ()))
    assert_close(mine, want, 1e-13)
    assert state.engine.fuses_adaptive_clip(opt, state)


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_nonfinite_policies_change_nothing(policy):
    p0, grads = problem("float64")
    opt = Adam(0.01, adaptive_clip=0.05, nonfinite=policy)
    params, state = run(opt, p0, grads[:2])
    before = ({k: v.copy() for k, v in params.items()},
              {s: np.array(v) for s, v in state.slots.items()}, state.step)
    bad = dict(grads[2])
    bad["wide"] = bad["wide"].copy()
    bad["wide"][7, 3] = np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if policy == "raise":
            with pytest.raises(FloatingPointError, match="wide"):
                opt.update(params, bad, state)
        else:
            out, state = opt.update(params, bad, state)
            assert state.last_step_skipped
    assert state.step == before[2]
    assert all(np.array_equal(params[k], before[0][k]) for k in params)
    assert all(np.array_equal(np.array(state.slots[s]), before[1][s]) for s in before[1])


def test_refused_shape_changes_nothing_on_the_fused_path():
    opt = Adam(0.01, adaptive_clip=0.1)
    params = {"ok": np.ones((4, 5)), "x": np.ones((1, 2, 1, 2, 1, 2))}
    state = opt.init(params)
    with pytest.raises(ValueError, match=r"adaptive_clip: parameter 'x'"):
        opt.update(params, {k: np.ones_like(v) for k, v in params.items()}, state)
    assert state.step == 0 and np.all(params["ok"] == 1) and np.all(state.slots["m"] == 0)
