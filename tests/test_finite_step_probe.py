"""The JAX programs' probe of a step's new values (``finite_step``: one reduction per
parameter over its new value and its same-shaped slots, the rest apart) and the skip it
drives (one ``lax.cond``): every non-finite element is seen wherever it lies, and a skipped
step keeps every array, as the per-array ``isfinite`` and ``where`` it replaced."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy

from mithril.interop import optax_transformation  # noqa: E402
from mithril.utils.optimizers import Adafactor, Adam  # noqa: E402
from mithril.utils.optimizers.engines.jax_finite import finite_step  # noqa: E402


def _arrays():
    rng = np.random.default_rng(0)
    params = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((3, 4), (5,), ())]
    m = [jnp.asarray(rng.standard_normal(p.shape), jnp.bfloat16) for p in params]
    rows = [jnp.asarray(rng.standard_normal(3), jnp.float32)]  # (a factored slot's shape)
    others = [jnp.asarray(rng.standard_normal(2), jnp.float64 if jax.config.x64_enabled
                          else jnp.float32), jnp.asarray([1, 2], jnp.int32)]
    return params, [m, rows], others


def test_all_finite_is_finite() -> None:
    params, slots, others = _arrays()
    assert bool(jax.jit(finite_step)(params, slots, others))
    assert bool(finite_step([], [], []))


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_a_non_finite_element_anywhere_is_seen(bad) -> None:
    params, slots, others = _arrays()
    probe = jax.jit(finite_step)
    places = [("p", i) for i in range(3)] + [("m", i) for i in range(3)] + [("rows", 0)] + [
        ("o", 0)]
    for where, i in places:
        p, (m, rows), o = list(params), [list(a) for a in slots], list(others)
        target = {"p": p, "m": m, "rows": rows, "o": o}[where]
        flat = np.array(target[i], dtype=np.float64).reshape(-1)
        flat[-1] = bad
        target[i] = jnp.asarray(flat.reshape(np.shape(target[i])), target[i].dtype)
        assert not bool(probe(p, [m, rows], o)), (where, i)


def test_large_finite_values_do_not_read_as_overflow() -> None:
    """x − x is 0 for every finite x (a sum of squares would overflow here)."""
    big = [jnp.full((4,), 3e38, jnp.float32), jnp.full((2,), 6e4, jnp.float16)]
    assert bool(finite_step(big, [[big[0] * 0 - 3e38, big[1]]]))


@pytest.mark.parametrize("make", [lambda: Adam(0.1, nonfinite="skip"),
                                  lambda: Adafactor(0.1, nonfinite="skip")])
def test_a_skipped_step_keeps_every_array_and_an_applied_one_moves(make) -> None:
    rng = np.random.default_rng(1)
    params = {"w": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32),
              "b": jnp.asarray(rng.standard_normal(3), jnp.float32)}
    tx = optax_transformation(make())
    update = jax.jit(tx.update)
    state = tx.init(params)
    good = {k: jnp.ones_like(v) for k, v in params.items()}
    _, state = update(good, state, params)
    for name, i in itertools.product(params, (0, -1)):
        grads = {k: np.array(v) for k, v in good.items()}
        grads[name].reshape(-1)[i] = np.nan
        updates, new = update({k: jnp.asarray(v) for k, v in grads.items()}, state, params)
        for k in params:
            np.testing.assert_array_equal(np.asarray(updates[k]), 0.0)
        for a, b in zip(jax.tree_util.tree_leaves(new.slots),
                        jax.tree_util.tree_leaves(state.slots), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert int(new.count) == int(state.count)
    updates, new = update(good, state, params)
    assert int(new.count) == int(state.count) + 1
    assert all(float(jnp.abs(u).max()) > 0 for u in updates.values())


@pytest.mark.parametrize("scale", [1e20, 3e38])
def test_skip_applies_finite_gradients_whose_squares_overflow(scale) -> None:
    """``nonfinite="skip"`` asks only whether the gradients are finite (``finite_grads``:
    their sums of squares, and Σ (g − g) under ``lax.cond`` where those overflow):
    gradients whose squares or norm overflow float32 are finite, and SGD's new values with
    them, so the step is applied, as on NumPy."""
    from mithril.backends import NumpyBackend
    from mithril.utils.optimizers import SGD

    rng = np.random.default_rng(2)
    params = {"w": rng.standard_normal((4, 3)).astype(np.float32),
              "b": rng.standard_normal(3).astype(np.float32)}
    grads = {k: (scale * np.sign(rng.standard_normal(v.shape))).astype(np.float32)
             for k, v in params.items()}
    tx = optax_transformation(SGD(0.1, momentum=0.9, nonfinite="skip"))
    state = tx.init({k: jnp.asarray(v) for k, v in params.items()})
    updates, new = jax.jit(tx.update)({k: jnp.asarray(v) for k, v in grads.items()}, state,
                                      {k: jnp.asarray(v) for k, v in params.items()})
    assert int(new.count) == int(state.count) + 1
    opt = SGD(0.1, momentum=0.9, nonfinite="skip", backend=NumpyBackend(dtype="float32"))
    want = {k: v.copy() for k, v in params.items()}
    st = opt.init(want)
    want, st = opt.update(want, grads, st)
    assert st.num_skipped == 0
    for k, v in params.items():
        got = v + np.asarray(updates[k])
        assert np.all(np.isfinite(got)) and not np.array_equal(got, v)
        np.testing.assert_allclose(got, np.asarray(want[k]), rtol=1e-6)
    bad = {k: np.where(np.arange(v.size).reshape(v.shape) == 0, np.inf, v)
           for k, v in grads.items()}  # (and an inf among them is still skipped)
    _, new = jax.jit(tx.update)({k: jnp.asarray(v, jnp.float32) for k, v in bad.items()},
                                state, {k: jnp.asarray(v) for k, v in params.items()})
    assert int(new.count) == int(state.count)


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax", "jax-jit"])
@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_every_engine_applies_finite_gradients_whose_norm_overflows(backend, policy,
                                                                    monkeypatch) -> None:
    """Gradients of 3e38 are finite though their float32 norm is not: every engine applies
    the step (the jitted JAX engine looks at the gradients themselves when its norm is not
    finite), to the same params, and still refuses an inf among them."""
    from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
    from mithril.utils.optimizers import SGD, engines

    if backend == "torch":
        pytest.importorskip("torch")
    if backend == "jax-jit":
        monkeypatch.setattr(engines, "JAX_ENGINE", "jit")
    be = {"numpy": NumpyBackend, "torch": TorchBackend}.get(backend, JaxBackend)(
        dtype="float32")
    rng = np.random.default_rng(3)
    start = rng.standard_normal((4, 3)).astype(np.float32)
    g = np.full((4, 3), 3e38, np.float32)
    opt = SGD(0.1, momentum=0.9, nonfinite=policy, backend=be)
    state = opt.init({"w": be.array(start)})
    new, state = opt.update({"w": be.array(start)}, {"w": be.array(g)}, state)
    assert state.num_skipped == 0 and state.step == 1
    np.testing.assert_allclose(np.asarray(be.to_numpy(new["w"])),
                               start - np.float32(0.1) * g, rtol=1e-6)
    g[0, 0] = np.inf
    before = np.asarray(be.to_numpy(new["w"])).copy()
    if policy == "skip":
        new, state = opt.update(new, {"w": be.array(g)}, state)
        assert state.num_skipped == 1 and state.step == 1
    else:
        with pytest.raises(FloatingPointError, match="'w'"):
            opt.update(new, {"w": be.array(g)}, state)
        assert state.step == 1
    np.testing.assert_array_equal(np.asarray(be.to_numpy(new["w"])), before)


def test_finite_grads_is_exact_where_the_norm_overflows() -> None:
    """``finite_grads``: finite gradients whose squares (1e20) or norm (3e38) pass float32's
    range are finite; one inf or NaN anywhere is not; a given norm decides when finite."""
    from mithril.utils.optimizers.engines.jax_finite import finite_grads

    f = jax.jit(finite_grads)
    for scale in (1.0, 1e20, 3e38):
        grads = [jnp.full((3, 4), scale, jnp.float32), jnp.full((5,), -scale, jnp.bfloat16)]
        assert bool(f(grads)), scale
        for i, bad in itertools.product(range(2), (np.inf, -np.inf, np.nan)):
            broken = list(grads)
            broken[i] = broken[i].reshape(-1).at[-1].set(bad).reshape(broken[i].shape)
            assert not bool(f(broken)), (scale, i, bad)
    grads = [jnp.full((3,), 3e38, jnp.float32)]
    assert bool(finite_grads(grads, jnp.asarray(np.inf, jnp.float32)))  # (the rare pass)
    assert bool(finite_grads([]))
