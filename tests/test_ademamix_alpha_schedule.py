"""AdEMAMix's α (and β₃) and SimplifiedAdEMAMix's α following a schedule, side by side with
optax's ``ScalarOrSchedule`` arguments (``optax.contrib.ademamix(alpha=..., b3=...)``,
``optax.contrib.simplified_ademamix(alpha=...)``): 100 steps in float64.

* ours: a mithril scheduler (:class:`PolynomialDecay`, optax's ``polynomial_schedule``)
  driving ``opt.hyperparameter("alpha")`` / ``("beta3")``, stepped after each update, on
  NumPy, torch, JAX (the default engine) and JAX's jitted engine, which compiles its step
  once for all 100 values;
* ``optax_transformation(opt, schedules={...})`` under ``jax.jit``, given optax's very
  schedule callables (one program for every step).

JAX float64 needs ``jax_enable_x64`` (process-wide): optax's reference and the JAX runs are
computed in a subprocess. optax's schedules return float32 for its int32 count even then
(``count / transition_steps``: int32 by a Python int is float32), α ~1e-7 relative off its
float64 value, which moves the params ~1e-6 in 100 steps: the float64 comparisons give
them the count as float64 (``wide``); optax's schedules as they are, through the
transformation, give optax's numbers with them as they are."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np
import pytest
import torch
from conftest import run_python

from mithril.interop import optax_transformation
from mithril.utils.lr_schedulers import PolynomialDecay
from mithril.utils.optimizers import AdEMAMix, SimplifiedAdEMAMix

STEPS = 100
TOL = 1e-10
ALPHA_END, ALPHA_T = 8.0, 60           # alpha: optax.linear_schedule(0, 8, 60)
B3_START, B3_END, B3_POW, B3_T = 0.9, 0.999, 2.0, 80   # b3: optax.polynomial_schedule
CASES = ("simplified", "ademamix", "ademamix-b3")


def problem() -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    rng = np.random.default_rng(7)
    p0 = {"w": rng.standard_normal((6, 5)), "b": rng.standard_normal(5)}
    noise = [{k: rng.standard_normal(v.shape) for k, v in p0.items()} for _ in range(STEPS)]
    return p0, noise


def make(case: str) -> Any:
    """Our optimizer at the schedules' step-0 values (what the schedulers start from)."""
    if case == "simplified":
        return SimplifiedAdEMAMix(1e-3, beta1=0.9, alpha=0.0, weight_decay=1e-2)
    b3 = B3_START if case == "ademamix-b3" else 0.9999
    return AdEMAMix(1e-2, beta3=b3, alpha=0.0, weight_decay=1e-2)


def schedulers(opt: Any, case: str) -> list[Any]:
    """The mithril way to schedule them: a scheduler on a hyperparameter handle."""
    out = [PolynomialDecay(opt.hyperparameter("alpha"), ALPHA_T, end_value=ALPHA_END)]
    if case == "ademamix-b3":
        out.append(PolynomialDecay(opt.hyperparameter("beta3"), B3_T, end_value=B3_END,
                                   power=B3_POW))
    return out


def run_ours(case: str, to: Any, back: Any, after_first: Any = None) -> dict[str, np.ndarray]:
    """STEPS updates of our optimizer on arrays made by ``to``, the schedulers stepped after
    each (gradients ``noise + 0.5·p``: they follow the trajectory); ``after_first()`` is
    called after the first update."""
    p0, noise = problem()
    opt = make(case)
    scheds = schedulers(opt, case)
    params = {k: to(v) for k, v in p0.items()}
    state = opt.init(params)
    for n in noise:
        grads = {k: to(n[k]) + 0.5 * params[k] for k in params}
        params, state = opt.update(params, grads, state)
        if after_first is not None and int(state.step) == 1:
            after_first()
        for s in scheds:
            s.step()
    return {k: back(v) for k, v in params.items()}


# the JAX side (a subprocess with x64): optax's reference, our JAX runs, the transformation
JAX_CODE = """
    import sys
    sys.path.insert(0, {tests!r})
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.monitoring
    import jax.numpy as jnp
    import numpy as np
    import optax
    import test_ademamix_alpha_schedule as t
    from mithril.interop import optax_transformation
    from mithril.utils.optimizers import engines

    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, *a, **k: compiles.append(event)
        if event == "/jax/core/compile/backend_compile_duration" else None)

    def wide(schedule):  # optax's schedule of a float64 count: float64 values
        return lambda count: schedule(jnp.asarray(count, jnp.float64))

    def schedules(case, widen=wide):
        out = {{"alpha": widen(optax.linear_schedule(0.0, t.ALPHA_END, t.ALPHA_T))}}
        if case == "ademamix-b3":
            out["beta3"] = widen(optax.polynomial_schedule(t.B3_START, t.B3_END, t.B3_POW,
                                                           t.B3_T))
        return out

    def peer(case, widen=wide):
        s = schedules(case, widen)
        if case == "simplified":
            return optax.contrib.simplified_ademamix(1e-3, b1=0.9, alpha=s["alpha"],
                                                     weight_decay=1e-2)
        return optax.contrib.ademamix(1e-2, b3=s.get("beta3", 0.9999), alpha=s["alpha"],
                                      weight_decay=1e-2)

    def run_tx(tx):
        p0, noise = t.problem()
        p = {{k: jnp.asarray(v) for k, v in p0.items()}}
        state = tx.init(p)
        step = jax.jit(tx.update)
        for n in noise:
            u, state = step({{k: n[k] + 0.5 * p[k] for k in p}}, state, p)
            p = optax.apply_updates(p, u)
        return {{k: np.asarray(v) for k, v in p.items()}}, step._cache_size(), state

    def to(x):
        return jnp.asarray(np.asarray(x, np.float64))

    out = {{}}
    for case in t.CASES:
        want, _, _ = run_tx(peer(case))
        out[case + "/optax"] = want
        engines.JAX_ENGINE = "auto"
        got = t.run_ours(case, to, np.asarray)
        out[case + "/jax"] = got
        engines.JAX_ENGINE = "jit"
        first = []
        got = t.run_ours(case, to, np.asarray, lambda: first.append(len(compiles)))
        out[case + "/jax-jit"] = got
        out[case + "/jax-jit-compiles"] = np.array(len(compiles) - first[0])
        engines.JAX_ENGINE = "auto"
        tx = optax_transformation(t.make(case), schedules=schedules(case))
        got, programs, state = run_tx(tx)
        out[case + "/transformation"] = got
        out[case + "/transformation-programs"] = np.array(programs)
        out[case + "/transformation-alpha"] = np.asarray(state.hyperparams["alpha"])
        # optax's schedules as they are (float32 values): the same on both sides
        as_is = lambda s: s  # noqa: E731
        out[case + "/optax-as-is"], _, _ = run_tx(peer(case, as_is))
        tx = optax_transformation(t.make(case), schedules=schedules(case, as_is))
        out[case + "/transformation-as-is"], _, _ = run_tx(tx)
        for k, v in got.items():
            assert v.dtype == np.float64, (case, k, v.dtype)
    flat = {{}}
    for k, v in out.items():
        flat.update({{f"{{k}}#{{n}}": a for n, a in v.items()}} if isinstance(v, dict) else {{k: v}})
    np.savez({path!r}, **flat)
"""


@pytest.fixture(scope="module")
def jax_side() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "out.npz")
        run_python(JAX_CODE.format(tests=os.path.dirname(__file__), path=path), timeout=600)
        with np.load(path) as z:
            flat = {k: z[k] for k in z.files}
    out: dict[str, Any] = {}
    for k, v in flat.items():
        if "#" in k:
            key, name = k.split("#", 1)
            out.setdefault(key, {})[name] = v
        else:
            out[k] = v
    return out


def max_diff(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    assert set(got) == set(want)
    return max(float(np.max(np.abs(np.asarray(got[k]) - want[k]))) for k in want)


@pytest.mark.parametrize("case", CASES)
def test_schedule_matters(jax_side: dict[str, Any], case: str) -> None:
    """The schedules change the trajectory (a constant α would end elsewhere), and the
    transformation's state holds α's last value (the schedule's at count 99)."""
    p0, _ = problem()
    want = jax_side[f"{case}/optax"]
    assert max_diff({k: p0[k] for k in want}, want) > 0.05  # the params moved
    const = run_ours_const(case)
    assert max_diff(const, want) > 1e-4, case
    assert float(jax_side[f"{case}/transformation-alpha"]) == pytest.approx(ALPHA_END)


def run_ours_const(case: str) -> dict[str, np.ndarray]:
    """Our optimizer at the schedules' final values, unscheduled (NumPy)."""
    p0, noise = problem()
    opt = make(case)
    opt.alpha = ALPHA_END
    if case == "ademamix-b3":
        opt.beta3 = B3_END
    params = {k: v.copy() for k, v in p0.items()}
    state = opt.init(params)
    for n in noise:
        params, state = opt.update(params, {k: n[k] + 0.5 * params[k] for k in params}, state)
    return params


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_scheduler_on_handle_equals_optax(jax_side: dict[str, Any], case: str,
                                          backend: str) -> None:
    if backend == "numpy":
        got = run_ours(case, lambda x: np.array(x, np.float64), np.asarray)
    else:
        got = run_ours(case, lambda x: torch.tensor(np.asarray(x), dtype=torch.float64),
                       lambda x: x.detach().numpy())
    err = max_diff(got, jax_side[f"{case}/optax"])
    assert err <= TOL, (case, backend, err)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("where", ["jax", "jax-jit", "transformation"])
def test_jax_equals_optax(jax_side: dict[str, Any], case: str, where: str) -> None:
    got = jax_side[f"{case}/{where}"]
    err = max_diff(got, jax_side[f"{case}/optax"])
    assert err <= TOL, (case, where, err)


@pytest.mark.parametrize("case", CASES)
def test_transformation_with_optax_schedules_as_they_are(jax_side: dict[str, Any],
                                                          case: str) -> None:
    """optax's schedule callables themselves (float32 values for the int32 count): the
    transformation calls them as optax does, at the same count."""
    want = jax_side[f"{case}/optax-as-is"]
    assert max_diff(jax_side[f"{case}/transformation-as-is"], want) <= TOL
    # (and they are what moves the float64 run by ~1e-6: the reason for ``wide``)
    assert max_diff(want, jax_side[f"{case}/optax"]) > TOL


@pytest.mark.parametrize("case", CASES)
def test_nothing_recompiles(jax_side: dict[str, Any], case: str) -> None:
    """100 values of α (and β₃): the jitted engine compiles nothing after its first step,
    the transformation's ``jax.jit`` one program for all."""
    assert int(jax_side[f"{case}/transformation-programs"]) == 1
    assert int(jax_side[f"{case}/jax-jit-compiles"]) == 0


def test_schedules_refused_by_name() -> None:
    """Bad ``schedules=``: an error naming the key, and nothing built."""
    import optax

    opt = AdEMAMix(1e-2)
    sched = optax.linear_schedule(0.0, 5.0, 10)
    with pytest.raises(KeyError, match="gamma"):
        optax_transformation(opt, schedules={"gamma": sched})
    with pytest.raises(TypeError, match=r"schedules\['alpha'\] must be an optax schedule"):
        optax_transformation(opt, schedules={"alpha": 5.0})
    with pytest.raises(ValueError, match="learning_rate="):
        optax_transformation(opt, schedules={"learning_rate": sched})
    with pytest.raises(ValueError, match="'alpha' is in traced_hyperparams too"):
        optax_transformation(opt, schedules={"alpha": sched}, traced_hyperparams=["alpha"])
    with pytest.raises(TypeError, match="schedules must be a dict"):
        optax_transformation(opt, schedules=[sched])
    assert opt.alpha == 5.0 and opt.beta3 == 0.9999


def test_schedules_reach_a_tensorwise_optimizer() -> None:
    """``schedules=`` on Muon's momentum (a per-tensor optimizer's traced value): the same
    params as passing the schedule's values to ``update(hyper=...)`` by hand, one program
    for all steps, and ``state.hyperparams`` holds the last value."""
    import jax
    import jax.numpy as jnp
    import optax

    from mithril.interop.optax_hyperparams import pair
    from mithril.utils.optimizers import Muon

    sched = optax.linear_schedule(0.8, 0.95, 8)
    rng = np.random.default_rng(3)
    p0 = {"w": jnp.asarray(rng.standard_normal((6, 4)), jnp.float32),
          "b": jnp.asarray(rng.standard_normal(4), jnp.float32)}
    noise = [{k: jnp.asarray(rng.standard_normal(v.shape), jnp.float32) for k, v in p0.items()}
             for _ in range(10)]
    make = lambda: Muon(1e-2, momentum=0.8, ns_dtype="float32")  # noqa: E731

    tx = optax_transformation(make(), schedules={"momentum": sched})
    step = jax.jit(tx.update)
    p, s = dict(p0), tx.init(p0)
    for n in noise:
        u, s = step(n, s, p)
        p = optax.apply_updates(p, u)
    assert step._cache_size() == 1
    assert float(s.hyperparams["momentum"]) == pytest.approx(0.95)

    by_hand = optax_transformation(make(), traced_hyperparams=["momentum"])
    upd = jax.jit(lambda g, s, p, h: by_hand.update(g, s, p, hyper=h))
    q, st = dict(p0), by_hand.init(p0)
    for i, n in enumerate(noise):
        h = jnp.asarray(pair(float(sched(i)), np.float32)[None, :])
        u, st = upd(n, st, q, h)
        q = optax.apply_updates(q, u)
    moved = max(float(jnp.max(jnp.abs(p[k] - p0[k]))) for k in p)
    assert moved > 1e-3
    for k in p:
        np.testing.assert_allclose(np.asarray(p[k]), np.asarray(q[k]), rtol=1e-6, atol=1e-7)
    # (a constant momentum ends elsewhere: the schedule took effect)
    const = optax_transformation(make())
    r, sc = dict(p0), const.init(p0)
    for n in noise:
        u, sc = jax.jit(const.update)(n, sc, r)
        r = optax.apply_updates(r, u)
    assert max(float(jnp.max(jnp.abs(p[k] - r[k]))) for k in p) > 1e-4
