"""Lookahead with a param group that joined after ``N`` steps (its ``step_offset``, what
``add_param_group`` mid-run means). torch has no Lookahead; timm's and torch-optimizer's
keep a step counter per param group (a group added later counts from its add), so the
group counts its own steps ``t − N`` for every step rule: the inner optimizer's bias
corrections, and its sync (every ``sync_period``-th step since it joined, with
``reset_state`` the inner's restart). Its slow weights start as its parameters at the add
(optax's ``init_synced``, at the join). The reference is written by hand: torch.optim.Adam
with ``add_param_group`` after N steps, each parameter's slow weights updated on its own
group's count, float64. Ours: the fused NumPy engine and the torch backend (resuming from an
N-step state), and the traced JAX program (``optax_transformation`` under ``jax.jit``, from
``init``: the late parameter kept until it joins), in a float64 subprocess."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from conftest import jax_float64_results

from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
from mithril.utils import optimizers as O

N, M, P, ALPHA, LR = 5, 8, 3, 0.5, 0.1  # the late group syncs at t = 8, 11; the first at 3, 6, ...
TOL = 1e-10
cases = ["plain", "reset_state"]
BACKENDS = {"numpy": NumpyBackend, "torch": TorchBackend, "jax": JaxBackend}


def _data() -> tuple:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 4)), rng.standard_normal(5)
    ga = [rng.standard_normal((3, 4)) for _ in range(N + M)]
    gb = [rng.standard_normal(5) for _ in range(N + M)]
    return a, b, ga, gb


def make(case: str, offset: int | None) -> O.Lookahead:
    groups = {} if offset is None else {"param_groups": [{"params": ["b"],
                                                          "step_offset": offset}]}
    return O.Lookahead(O.Adam(learning_rate=LR, **groups), sync_period=P,
                       slow_step_size=ALPHA, reset_state=case == "reset_state")


def reference(case: str) -> dict[str, np.ndarray]:
    """torch.optim.Adam (``add_param_group`` of b after N steps) and, per parameter, slow
    weights from its join synced on its own count; with ``reset_state`` a synced
    parameter's Adam state is dropped (torch then starts it anew: step 1, zero moments)."""
    a, b, ga, gb = _data()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ta, tb = torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True)
        opt = torch.optim.Adam([ta], lr=LR)
        joined = {"a": (ta, 0)}
        slow = {"a": ta.detach().clone()}
        for i in range(N + M):
            if i == N:
                opt.add_param_group({"params": [tb]})
                joined["b"], slow["b"] = (tb, N), tb.detach().clone()
            ta.grad, tb.grad = torch.tensor(ga[i]), torch.tensor(gb[i]) if i >= N else None
            opt.step()
            t = i + 1
            for k, (x, since) in joined.items():
                if (t - since) % P == 0:  # this parameter's own count
                    with torch.no_grad():
                        slow[k] += ALPHA * (x - slow[k])
                        x.copy_(slow[k])
                    if case == "reset_state":
                        opt.state.pop(x)
    finally:
        torch.set_default_dtype(old)
    return {"a": ta.detach().numpy().copy(), "b": tb.detach().numpy().copy(),
            "slow_a": slow["a"].numpy().copy(), "slow_b": slow["b"].numpy().copy()}


def resumed(case: str, backend: str, offset: int = N) -> dict[str, np.ndarray]:
    """Ours: N steps of a alone, then b joined in a group of ``offset`` for M steps."""
    a, b, ga, gb = _data()
    be = BACKENDS[backend](dtype="float64")
    first = make(case, None)
    p = {"a": be.array(a)}
    st = first.init(p)
    for i in range(N):
        p, st = first.update(p, {"a": be.array(ga[i])}, st)
    before = first.state_dict(st)
    opt = make(case, offset)
    p = {"a": p["a"], "b": be.array(b)}
    fresh = opt.state_dict(opt.init(p))  # (b's slow weights: b at the join)
    st = opt.load_state_dict({**fresh, "step": before["step"], "slots": {
        s: {"a": before["slots"][s]["a"], "b": fresh["slots"][s]["b"]}
        for s in fresh["slots"]}}, p)
    for i in range(N, N + M):
        p, st = opt.update(p, {"a": be.array(ga[i]), "b": be.array(gb[i])}, st)
    slow = opt.slow_params(st)
    return {"a": be.to_numpy(p["a"]), "b": be.to_numpy(p["b"]),
            "slow_a": be.to_numpy(slow["a"]), "slow_b": be.to_numpy(slow["b"])}


def run(case: str, backend: str) -> dict[str, np.ndarray]:
    """The traced program: ``optax_transformation`` under ``jax.jit`` from ``init`` (b's
    gradients given from the start: unused until it joins), float64; its compiles; and
    the eager JAX engine resuming as :func:`resumed` (``eager#``)."""
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    from mithril.interop import optax_transformation

    assert backend == "jax"
    a, b, ga, gb = _data()
    tx = optax_transformation(make(case, N))

    @jax.jit
    def step(p: Any, st: Any, g: Any) -> tuple:
        return tx.update(g, st, p, new_params=True)

    p = {"a": jnp.asarray(a), "b": jnp.asarray(b)}
    st = tx.init(p)
    for i in range(N + M):
        p, st = step(p, st, {"a": jnp.asarray(ga[i]), "b": jnp.asarray(gb[i])})
    eager = {f"eager#{k}": np.asarray(v) for k, v in resumed(case, "jax").items()}
    return {"a": np.asarray(p["a"]), "b": np.asarray(p["b"]),
            "slow_a": np.asarray(st.slots["slow"]["a"]),
            "slow_b": np.asarray(st.slots["slow"]["b"]),
            "compiles": np.array(step._cache_size()), "count": np.asarray(st.count), **eager}


@pytest.fixture(scope="module")
def jax_results() -> dict[str, dict[str, np.ndarray]]:
    return jax_float64_results("test_lookahead_step_offset", "cases", "run")


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("case", cases)
def test_a_late_group_counts_its_own_steps_and_syncs(case, backend):
    ref = reference(case)
    got = resumed(case, backend)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=TOL, err_msg=k)
    # b synced last at t = 11 (its own 6th step), a at t = 12: both differ from their fast
    # weights now, and each parameter moved
    a, b, _, _ = _data()
    assert not np.allclose(ref["b"], b) and not np.allclose(ref["slow_b"], b)


@pytest.mark.parametrize("case", cases)
def test_the_traced_program_and_the_jax_engine_count_it_too(case, jax_results):
    ref, got = reference(case), jax_results[case]
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=TOL, err_msg=k)
        np.testing.assert_allclose(got[f"eager#{k}"], ref[k], rtol=0, atol=TOL, err_msg=k)
    assert int(got["compiles"]) == 1 and got["count"].shape == () and int(got["count"]) == N + M


def test_the_offset_matters():
    """What the test above could not pass without: the late group counting the optimizer's
    steps (offset 0: Adam's bias corrections and the sync of a) is far from the reference."""
    ref, plain = reference("plain"), resumed("plain", "numpy", offset=0)
    assert np.abs(plain["b"] - ref["b"]).max() > 1e-3
    np.testing.assert_allclose(plain["a"], ref["a"], rtol=0, atol=TOL)  # (a is a's)
