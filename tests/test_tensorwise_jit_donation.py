"""The tensorwise optimizers' one-program JAX step (:mod:`~mithril.utils.optimizers.engines.
tensorwise_jit`) donates the params it updates, as the jitted elementwise engine does: those
the last step returned (the caller handed them over) are consumed; a caller's own arrays
are copied first and stay readable; under ``nonfinite="skip"`` nothing is donated (a skipped
step returns the caller's params). A parameter without a gradient is never donated. Values:
the same as the eager per-tensor path, whatever was donated."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy

import mithril.utils.optimizers.engines as engines  # noqa: E402
from mithril.utils.optimizers import SM3, Muon  # noqa: E402
from mithril.utils.optimizers.engines import tensorwise_jit  # noqa: E402

SHAPES = {"w": (4, 3), "b": (5,), "frozen": (2,)}


@pytest.fixture(autouse=True)
def _jit_engine(monkeypatch):
    monkeypatch.setattr(engines, "JAX_ENGINE", "jit")


def data(seed: int = 0) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(seed)
    p = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    gs = [{k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()
           if k != "frozen"} for _ in range(3)]
    return p, gs


@pytest.mark.parametrize("make", [lambda: SM3(0.05, clip_norm=1.0),
                                  lambda: Muon(0.05, ns_dtype="float32")], ids=["sm3", "muon"])
def test_the_params_handed_over_are_donated(make, monkeypatch):
    p0, gs = data()
    results = []
    for jit in (False, True):
        monkeypatch.setattr(tensorwise_jit, "ENABLED", jit)
        opt = make()
        mine = {k: jnp.asarray(v) for k, v in p0.items()}
        params, state, returned = mine, opt.init(mine), []
        for g in gs:
            params, state = opt.update(params, {k: jnp.asarray(v) for k, v in g.items()}, state)
            returned.append(params)
        results.append({k: np.asarray(v) for k, v in params.items()})
        if jit:  # the caller's own arrays: copied, readable; those returned: consumed
            assert not any(v.is_deleted() for v in mine.values())
            for old in returned[:-1]:
                assert old["w"].is_deleted() and old["b"].is_deleted()
                assert not old["frozen"].is_deleted()  # (no gradient: not donated)
            assert params["frozen"] is mine["frozen"]
    for k in SHAPES:
        np.testing.assert_allclose(results[1][k], results[0][k], rtol=2e-6, atol=2e-7)


def test_a_refusing_policy_donates_nothing(monkeypatch):
    monkeypatch.setattr(tensorwise_jit, "ENABLED", True)
    p0, gs = data()
    opt = SM3(0.05, nonfinite="skip")
    params = {k: jnp.asarray(v) for k, v in p0.items()}
    state = opt.init(params)
    params, state = opt.update(params, {k: jnp.asarray(v) for k, v in gs[0].items()}, state)
    before = dict(params)
    bad = {k: jnp.asarray(v) for k, v in gs[1].items()}
    bad["w"] = bad["w"].at[0, 0].set(jnp.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out, state = opt.update(params, bad, state)
    assert state.last_step_skipped and not any(v.is_deleted() for v in before.values())
    assert all(out[k] is before[k] for k in before)
    params, state = opt.update(out, {k: jnp.asarray(v) for k, v in gs[2].items()}, state)
    assert not any(v.is_deleted() for v in before.values())  # (still: skip donates nothing)
