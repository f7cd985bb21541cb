"""``optax_transformation`` where an optax user meets it and the existing combinator tests
(tests/test_interop_optax_combinators.py) do not look: ``optax.tree_utils`` on a state
wrapped by ``inject_hyperparams``, ours before / after ``add_decayed_weights`` and
``scale_by_schedule``, ``apply_if_finite`` with non-finite gradients, ``vmap`` over learning
rates (several models at once, the scalars on the host: a ``pure_callback`` under ``vmap``)
and ``jax.grad`` of the loss after a few updates with respect to the learning rate, each
side by side with optax's own optimizer (float32, JAX's default precision)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

from mithril.interop import optax_transformation  # noqa: E402
from mithril.utils.optimizers import SGD, Adam, NAdam, RAdam  # noqa: E402

# float32: our traced bias corrections are exp/expm1 of the step, optax's powers
TOL = 2e-6


@pytest.fixture(autouse=True)
def x32():
    """JAX's default precision (``jax_enable_x64`` off, then restored), whatever an earlier
    test in the process left on."""
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    yield
    jax.config.update("jax_enable_x64", before)


def params0() -> dict:
    return {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3),
            "b": [jnp.asarray([0.3, -0.2]), jnp.asarray(0.7)]}


def loss(p: Any) -> Any:
    return sum(jnp.sum(jnp.sin(3 * x) + x * x) for x in jax.tree.leaves(p))


def trajectory(tx: Any, steps: int = 4, nan_at: tuple = (), lr_at: dict | None = None) -> list:
    """The params after each of ``steps`` jitted steps; the gradients are NaN at the steps
    ``nan_at``; ``lr_at``: step -> a learning rate set with ``optax.tree_utils.tree_set``."""
    @jax.jit
    def step(p, s, bad):
        g = jax.tree.map(lambda x: jnp.where(bad, jnp.nan, x), jax.grad(loss)(p))
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    p = params0()
    s, out = tx.init(p), []
    for i in range(steps):
        if lr_at and i in lr_at:
            s = optax.tree_utils.tree_set(s, learning_rate=lr_at[i])
        p, s = step(p, s, i in nan_at)
        out.append(p)
    return out


def assert_same(ref: list, ours: list, tol: float = TOL) -> None:
    assert len(ref) == len(ours)
    for a, b in zip(ref, ours):
        assert jax.tree.structure(a) == jax.tree.structure(b)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            assert x.dtype == y.dtype
            np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=0, atol=tol)
    moved = max(float(jnp.max(jnp.abs(x - y))) for x, y in
                zip(jax.tree.leaves(params0()), jax.tree.leaves(ref[-1])))
    assert moved > 1e-3  # the comparison is not of params that stand still


def test_inject_hyperparams_state_holds_one_learning_rate_as_optax():
    """Regression: under ``optax.inject_hyperparams(optax_transformation)`` the given rate
    was kept in our state too, so ``optax.tree_utils.tree_get(state, "learning_rate")`` (how
    optax's docs log the rate) raised ``KeyError: Found multiple values`` where optax's
    ``inject_hyperparams(optax.adam)`` gives 0.01; now it gives 0.01 (a fixed rate is not
    kept in our state, as ``optax.adam(0.01)`` keeps none), and ``tree_set`` still drives
    the steps as optax's."""
    ref = optax.inject_hyperparams(optax.adam)(learning_rate=0.01)
    ours = optax.inject_hyperparams(optax_transformation)(Adam(1.0), learning_rate=0.01)
    for tx in (ref, ours):
        assert float(optax.tree_utils.tree_get(tx.init(params0()), "learning_rate")) == \
            pytest.approx(0.01)
    lr_at = {1: 0.03, 3: 0.002}
    assert_same(trajectory(ref, lr_at=lr_at), trajectory(ours, lr_at=lr_at))
    # a fixed rate: none in the state (as optax.adam(0.01)'s); a schedule's: its last value
    assert "learning_rate" not in optax_transformation(Adam(1.0), learning_rate=0.01).init(
        params0()).hyperparams
    sched = optax_transformation(Adam(1.0), learning_rate=optax.linear_schedule(0.1, 0.0, 10))
    _, s = sched.update(jax.grad(loss)(params0()), sched.init(params0()), params0())
    assert float(optax.tree_utils.tree_get(s, "learning_rate")) == pytest.approx(0.1)


def adam() -> Any:
    return optax_transformation(Adam(1e-2))


WRAPS = {  # ours where optax's adam(1e-2) is, in each
    "decay_before": lambda t: optax.chain(optax.add_decayed_weights(0.1), t),
    "decay_after": lambda t: optax.chain(t, optax.add_decayed_weights(0.1)),
    "schedule_after": lambda t: optax.chain(t, optax.scale_by_schedule(
        optax.exponential_decay(1.0, 2, 0.5))),
    "clip_after": lambda t: optax.chain(t, optax.clip_by_global_norm(5e-3)),
}


@pytest.mark.parametrize("wrap", sorted(WRAPS))
def test_chain_before_and_after_decay_schedule_and_clip_matches_optax(wrap):
    assert_same(trajectory(WRAPS[wrap](optax.adam(1e-2))), trajectory(WRAPS[wrap](adam())))


def test_apply_if_finite_with_nonfinite_gradients_matches_optax():
    """NaN gradients at steps 1 and 3 (skipped, the state kept), and three in a row
    (the third applied: ``max_consecutive_errors=2``), NaN params then on both sides."""
    tx = lambda t: optax.apply_if_finite(t, 2)  # noqa: E731
    assert_same(trajectory(tx(optax.adam(1e-2)), 6, nan_at=(1, 3)),
                trajectory(tx(adam()), 6, nan_at=(1, 3)))
    ref = trajectory(tx(optax.adam(1e-2)), 5, nan_at=(1, 2, 3))
    ours = trajectory(tx(adam()), 5, nan_at=(1, 2, 3))
    assert_same(ref[:3], ours[:3])
    for a, b in zip(jax.tree.leaves(ref[3]), jax.tree.leaves(ours[3])):
        assert bool(jnp.all(jnp.isnan(a))) and bool(jnp.all(jnp.isnan(b)))


def test_vmap_over_learning_rates_with_host_scalars_matches_optax_runs():
    """Three models, each its own learning rate (vmapped, the rate in the state): SGD with
    Nesterov momentum, whose scalars are a ``pure_callback`` on the host (``vmap`` of the
    callback), against optax's ``sgd`` run once per rate."""
    lrs = jnp.asarray([1e-2, 3e-2, 1e-1])
    ours = optax_transformation(SGD(1.0, momentum=0.9, nesterov=True))

    def run(lr):
        p = params0()
        s = optax.tree_utils.tree_set(ours.init(p), learning_rate=lr)
        for _ in range(3):
            updates, s = ours.update(jax.grad(loss)(p), s, p)
            p = optax.apply_updates(p, updates)
        return p

    batched = jax.jit(jax.vmap(run))(lrs)
    for i, lr in enumerate(lrs.tolist()):
        ref = trajectory(optax.sgd(lr, 0.9, nesterov=True), 3)[-1]
        assert_same([ref], [jax.tree.map(lambda x, i=i: x[i], batched)])


def meta_grad(make: Any, lr: float = 1e-2) -> Any:
    """d loss(params after 3 updates) / d learning rate."""
    def outer(lr):
        tx, p = make(lr), params0()
        s = tx.init(p)
        for _ in range(3):
            updates, s = tx.update(jax.grad(loss)(p), s, p)
            p = optax.apply_updates(p, updates)
        return loss(p)

    return jax.jit(jax.grad(outer))(jnp.asarray(lr)), outer


def test_grad_with_respect_to_the_learning_rate_matches_optax():
    """Meta-learning through host scalars (NAdam's, a ``pure_callback``: the rate stays
    outside it): optax's number. RAdam: optax's gradient is NaN (its unrectified first
    steps take ``jnp.where`` of a NaN square root), ours the finite difference's."""
    ref, _ = meta_grad(lambda lr: optax.nadam(lr))
    ours, _ = meta_grad(lambda lr: optax_transformation(NAdam(1.0, convention="optax"),
                                                        learning_rate=lr))
    assert abs(float(ref)) > 10.0
    np.testing.assert_allclose(float(ours), float(ref), rtol=1e-5)
    theirs, _ = meta_grad(lambda lr: optax.radam(lr))
    ours, outer = meta_grad(lambda lr: optax_transformation(RAdam(1.0), learning_rate=lr))
    h = 1e-3
    fd = (float(outer(jnp.asarray(1e-2 + h))) - float(outer(jnp.asarray(1e-2 - h)))) / (2 * h)
    assert bool(jnp.isnan(theirs)) and abs(fd) > 10.0
    np.testing.assert_allclose(float(ours), fd, rtol=1e-3)
