"""The tensorwise optimizers' (Muon, Adafactor, SM3) JAX step as one jax.jit program
(:mod:`mithril.utils.optimizers.engines.tensorwise_jit`) against the eager per-tensor path it
replaces and against optax.sm3, on the jitted engine (``MITHRIL_JAX_ENGINE=jit``) on CPU.

Tolerance: float32 rounding. The program takes the norms in float32 where the eager path
sums in float64 on the host, and its scalars are float32: after 3 steps every param and slot
is within 2e-6 relative (of the largest magnitude of that array) of the eager path's."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy
optax = pytest.importorskip("optax")

import mithril.utils.optimizers.engines as engines  # noqa: E402
from mithril.utils.optimizers import SM3, Adafactor, Muon  # noqa: E402
from mithril.utils.optimizers.engines import tensorwise_jit  # noqa: E402

TOL = 2e-6
SHAPES = {"w": (4, 3), "k": (2, 3, 4), "b": (5,)}


@pytest.fixture(autouse=True)
def _jit_engine(monkeypatch):
    monkeypatch.setattr(engines, "JAX_ENGINE", "jit")


def problem(steps: int = 3, shapes: dict = SHAPES, seed: int = 0) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(seed)
    p = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    return p, [{k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
               for _ in range(steps)]


def run(make, p0: dict, grads: list[dict], jit: bool, monkeypatch, lrs=None):
    monkeypatch.setattr(tensorwise_jit, "ENABLED", jit)
    opt = make()
    params = {k: jnp.asarray(v) for k, v in p0.items()}
    state = opt.init(params)
    assert type(state.engine).__name__ == "JaxEngine"
    norms = []
    for i, g in enumerate(grads):
        if lrs is not None:
            opt.learning_rate = lrs[i]
        params, state = opt.update(params, {k: jnp.asarray(v) for k, v in g.items()}, state)
        norms.append(state.last_grad_norm)
    slots = {s: np.asarray(state.slots[s]) for s in state.slots}
    return {k: np.asarray(v) for k, v in params.items()}, slots, norms, state


def close(a: np.ndarray, b: np.ndarray) -> float:
    scale = max(float(np.max(np.abs(b))) if b.size else 0.0, 1e-30)
    return float(np.max(np.abs(a - b))) / scale if b.size else 0.0


CASES = {
    "sm3-groups-clip-ema": lambda: SM3(0.05, weight_decay=0.01, clip_norm=1.5, ema_decay=0.9,
                                       param_groups=[{"params": ["b"], "learning_rate": 0.1}]),
    "adafactor-tensor-clip-swa": lambda: Adafactor(
        0.05, weight_decay=0.1, clip_tensor_norm=0.8, clip_value=0.6, swa_start=1,
        param_groups=[{"params": ["k"], "d": 2.0}]),
    "adafactor-keras": lambda: Adafactor(0.05, weight_decay=0.1, convention="keras",
                                         clip_block_rms=0.5),
    "muon-fallback-groups": lambda: Muon(0.02, weight_decay=0.1, clip_norm=2.0, ema_decay=0.5,
                                         param_groups=[{"params": ["w"], "momentum": 0.8}]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_jit_equals_eager(name, monkeypatch):
    p0, grads = problem()
    lrs = [0.05, 0.02, 0.03]  # (a learning rate set between steps)
    eager, s_eager, n_eager, _ = run(CASES[name], p0, grads, False, monkeypatch, lrs)
    before = tensorwise_jit.TRACES
    ours, s_ours, n_ours, _ = run(CASES[name], p0, grads, True, monkeypatch, lrs)
    assert tensorwise_jit.TRACES == before + 1  # one program, the lr changes traced
    for k in p0:
        assert ours[k].dtype == np.float32
        assert close(ours[k], eager[k]) < TOL, k
        assert not np.array_equal(ours[k], p0[k]), k  # (the step happened)
    assert set(s_ours) == set(s_eager)
    for s in s_eager:
        assert close(s_ours[s], s_eager[s]) < TOL, s
    np.testing.assert_allclose(n_ours, n_eager, rtol=1e-6)


def test_sm3_vs_optax_sm3(monkeypatch):
    p0, grads = problem(4)
    ours, _, _, _ = run(lambda: SM3(0.05, momentum=0.9), p0, grads, True, monkeypatch)
    tx = optax.sm3(0.05, momentum=0.9)
    params = {k: jnp.asarray(v) for k, v in p0.items()}
    st = tx.init(params)
    for g in grads:
        u, st = tx.update({k: jnp.asarray(v) for k, v in g.items()}, st, params)
        params = optax.apply_updates(params, u)
    for k in p0:
        np.testing.assert_allclose(ours[k], np.asarray(params[k]), rtol=1e-5, atol=1e-7)


def test_compiles_once_per_layout(monkeypatch):
    monkeypatch.setattr(tensorwise_jit, "ENABLED", True)
    p0, grads = problem(4, {"w": (5, 2), "b": (7,)}, seed=1)  # (a layout of its own)
    before = tensorwise_jit.TRACES
    run(lambda: SM3(0.01), p0, grads, True, monkeypatch, lrs=[0.01, 0.02, 0.5, 1e-4])
    assert tensorwise_jit.TRACES == before + 1
    run(lambda: SM3(0.3), p0, grads, True, monkeypatch)  # another optimizer, same layout
    assert tensorwise_jit.TRACES == before + 1
    p1, g1 = problem(2, {"w": (3, 3), "b": (6,)}, seed=2)  # a new layout: a new program
    run(lambda: SM3(0.01), p1, g1, True, monkeypatch)
    assert tensorwise_jit.TRACES == before + 2
    run(lambda: SM3(0.01, momentum=0.5), p1, g1, True, monkeypatch)  # a static setting
    assert tensorwise_jit.TRACES == before + 3


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_refused_step_changes_nothing(policy, monkeypatch):
    p0, grads = problem(2, seed=3)
    _, s1, _, state = run(lambda: Adafactor(0.05, nonfinite=policy), p0, grads[:1], True,
                          monkeypatch)
    opt = Adafactor(0.05, nonfinite=policy)
    params = {k: jnp.asarray(v) for k, v in p0.items()}
    state = opt.init(params)
    params, state = opt.update(params, {k: jnp.asarray(v) for k, v in grads[0].items()}, state)
    kept = {k: np.asarray(v) for k, v in params.items()}
    slots = {s: np.asarray(state.slots[s]) for s in state.slots}
    bad = dict(grads[1])
    bad["k"] = np.full(SHAPES["k"], 3e38, np.float32)  # finite gradient, non-finite step
    g = {k: jnp.asarray(v) for k, v in bad.items()}
    if policy == "raise":
        with pytest.raises(FloatingPointError, match="'k'"):
            opt.update(params, g, state)
        out = params
    else:
        with pytest.warns(RuntimeWarning, match="skipped"):
            out, state = opt.update(params, g, state)
        assert state.last_step_skipped
    assert state.step == 1
    for k in kept:
        np.testing.assert_array_equal(np.asarray(out[k]), kept[k])
    for s in slots:
        np.testing.assert_array_equal(np.asarray(state.slots[s]), slots[s])
        np.testing.assert_array_equal(slots[s], s1[s])


def test_bfloat16_stays_bfloat16(monkeypatch):
    p0, grads = problem(2, seed=4)
    p0 = {k: v.astype(jnp.bfloat16) for k, v in p0.items()}
    grads = [{k: v.astype(jnp.bfloat16) for k, v in g.items()} for g in grads]
    eager, _, _, _ = run(lambda: SM3(0.05), p0, grads, False, monkeypatch)
    ours, _, _, _ = run(lambda: SM3(0.05), p0, grads, True, monkeypatch)
    for k in p0:
        assert ours[k].dtype == jnp.bfloat16
        np.testing.assert_allclose(ours[k].astype(np.float32), eager[k].astype(np.float32),
                                   rtol=1e-2, atol=1e-2)


class _HostBranch(SM3):
    """An update with Python control flow on a per-step scalar: it does not trace."""

    def tensor_update(self, xp, p, g, slots, scalars, name):
        lr = 0.5 * scalars[0] if float(scalars[0]) > 0.04 else scalars[0]
        return super().tensor_update(xp, p, g, slots, (lr,), name)


def test_an_update_that_does_not_trace_runs_eagerly(monkeypatch):
    p0, grads = problem(2, {"w": (2, 5), "b": (4,)}, seed=5)
    eager, s_eager, _, _ = run(lambda: _HostBranch(0.05), p0, grads, False, monkeypatch)
    before = tensorwise_jit.TRACES
    ours, s_ours, _, _ = run(lambda: _HostBranch(0.05), p0, grads, True, monkeypatch)
    assert tensorwise_jit.TRACES == before + 1  # tried once, then eagerly
    ref, _, _, _ = run(lambda: SM3(0.025), p0, grads, False, monkeypatch)
    for k in p0:
        np.testing.assert_array_equal(ours[k], eager[k])
        np.testing.assert_allclose(ours[k], ref[k], rtol=1e-6)
    for s in s_eager:
        np.testing.assert_array_equal(s_ours[s], s_eager[s])
