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
