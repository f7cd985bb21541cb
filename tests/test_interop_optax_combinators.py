"""``optax_transformation`` inside what an optax user wraps a transformation in (``chain``,
``MultiSteps``, ``masked``, ``multi_transform``, ``inject_hyperparams``,
``apply_if_finite``, ``lookahead``, ``contrib.reduce_on_plateau``, schedules) and under JAX
transforms (``jit`` with donation, ``lax.scan``, ``vmap`` over an ensemble, ``grad``
through the updates): the parameters after every step are compared with optax's own
optimizer run side by side, in float32 and in float64."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

from mithril.interop import optax_transformation  # noqa: E402
from mithril.utils.optimizers import SGD, Adam, AdamW  # noqa: E402

STEPS = 4


@pytest.fixture(params=["float32", pytest.param("float64", marks=pytest.mark.slow)])
def dtype(request):
    """Each test in float32 and float64 (``jax_enable_x64`` on, then restored; slow: every
    program compiles again)."""
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", request.param == "float64")
    yield jnp.dtype(request.param)
    jax.config.update("jax_enable_x64", before)


def tol(dt: Any) -> float:
    # float32: our traced bias corrections are exp/expm1 of the step, optax's powers
    return 1e-12 if dt == jnp.float64 else 2e-6


class Block(NamedTuple):
    w: Any
    extra: tuple


def params_of(dt: Any) -> dict:
    """Nested dicts, a list, a NamedTuple, a scalar, None and an empty subtree."""
    w = jnp.linspace(-1.0, 1.0, 6, dtype=dt).reshape(3, 2)
    return {"layer": {"w": w, "b": jnp.asarray([0.1, -0.2], dt)},
            "out": [Block(jnp.asarray([0.5, 1.5, -0.5], dt), (jnp.asarray(0.3, dt), None))],
            "empty": {}}


def loss(p: Any) -> Any:
    return sum(jnp.sum(jnp.sin(3 * x) + x * x) for x in jax.tree.leaves(p))


def adam() -> Any:
    return optax_transformation(Adam(learning_rate=1e-2))


def trajectory(tx: Any, params: Any, steps: int = STEPS, **extra: Any) -> list:
    """The params after each of ``steps`` jitted train steps."""
    @jax.jit
    def step(p, s):
        updates, s = tx.update(jax.grad(loss)(p), s, p, **extra)
        return optax.apply_updates(p, updates), s

    state, out = tx.init(params), []
    for _ in range(steps):
        params, state = step(params, state)
        out.append(params)
    return out


def assert_same(ref: list, ours: list, dt: Any) -> None:
    assert len(ref) == len(ours)
    for a, b in zip(ref, ours):
        assert jax.tree.structure(a) == jax.tree.structure(b)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            assert x.dtype == y.dtype == dt
            np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=0, atol=tol(dt))
    moved = max(float(jnp.max(jnp.abs(x - y))) for x, y in
                zip(jax.tree.leaves(ref[0]), jax.tree.leaves(ref[-1])))
    assert moved > 1e-3  # the comparison is not of params that stand still


LABELS = {"layer": {"w": "a", "b": "b"}, "out": [Block("a", ("b", None))], "empty": {}}
MASK = {"layer": {"w": True, "b": False}, "out": [Block(False, (True, None))], "empty": {}}
WRAPS = {
    "chain_clip": lambda t: optax.chain(optax.clip_by_global_norm(0.5), t),
    "multisteps": lambda t: optax.MultiSteps(t, 2),
    "masked": lambda t: optax.masked(t, MASK),
    "multi_transform": lambda t: optax.multi_transform({"a": t, "b": optax.sgd(0.1)}, LABELS),
    "apply_if_finite": lambda t: optax.apply_if_finite(t, 2),
}


@pytest.mark.parametrize("wrap", sorted(WRAPS))
def test_combinators_match_optax(wrap, dtype):
    p = params_of(dtype)
    assert_same(trajectory(WRAPS[wrap](optax.adam(1e-2)), p),
                trajectory(WRAPS[wrap](adam()), p), dtype)


def test_sgd_momentum_in_multisteps_matches_optax(dtype):
    """SGD with momentum (its scalars on the host: a ``pure_callback``) under the
    ``lax.cond`` of ``MultiSteps``."""
    p = params_of(dtype)
    ours = optax_transformation(SGD(learning_rate=0.05, momentum=0.9, nesterov=True))
    assert_same(trajectory(optax.MultiSteps(optax.sgd(0.05, 0.9, nesterov=True), 3), p, 9),
                trajectory(optax.MultiSteps(ours, 3), p, 9), dtype)


def test_schedules_match_optax(dtype):
    p = params_of(dtype)
    warm = optax.warmup_cosine_decay_schedule(0.0, 2e-2, 2, 8)
    joined = optax.join_schedules([optax.constant_schedule(1e-2),
                                   optax.linear_schedule(1e-2, 1e-3, 3)], [3])
    for sched in (warm, joined):
        assert_same(trajectory(optax.adam(sched), p, 6),
                    trajectory(optax_transformation(Adam(1.0), learning_rate=sched), p, 6),
                    dtype)
    injected = optax.inject_hyperparams(optax_transformation)(Adam(1.0), learning_rate=warm)
    assert_same(trajectory(optax.inject_hyperparams(optax.adam)(learning_rate=warm), p, 6),
                trajectory(injected, p, 6), dtype)


def test_learning_rate_set_with_tree_set_matches_optax_without_retracing(dtype):
    p0 = params_of(dtype)

    def run(tx):
        traces = []

        @jax.jit
        def step(p, s):
            traces.append(1)
            updates, s = tx.update(jax.grad(loss)(p), s, p)
            return optax.apply_updates(p, updates), s

        p, s, out = p0, tx.init(p0), []
        for lr in (1e-2, 5e-3, 2e-2, 1e-3):
            s = optax.tree_utils.tree_set(s, learning_rate=lr)
            p, s = step(p, s)
            out.append(p)
        assert float(optax.tree_utils.tree_get(s, "learning_rate")) == pytest.approx(1e-3)
        return out, len(traces)

    ref, ref_traces = run(optax.inject_hyperparams(optax.adam)(learning_rate=1e-2))
    ours, our_traces = run(adam())
    assert_same(ref, ours, dtype)
    assert our_traces <= ref_traces <= 2  # a float set later is weak-typed as the first


def test_lookahead_and_reduce_on_plateau_match_optax(dtype):
    p0 = params_of(dtype)

    def lookahead(inner):
        tx = optax.lookahead(inner, 2, 0.5)
        lp, s, out = optax.LookaheadParams.init_synced(p0), None, []
        s = tx.init(lp)

        @jax.jit
        def step(lp, s):  # optax's lookahead takes the gradients of the fast params
            updates, s = tx.update(jax.grad(loss)(lp.fast), s, lp)
            return optax.apply_updates(lp, updates), s

        for _ in range(STEPS):
            lp, s = step(lp, s)
            out.append(lp)
        return out

    assert_same(lookahead(optax.adam(1e-2)), lookahead(adam()), dtype)
    plateau = optax.contrib.reduce_on_plateau(patience=1, factor=0.5)
    assert_same(trajectory(optax.chain(optax.adam(1e-2), plateau), p0, value=1.0),
                trajectory(optax.chain(adam(), plateau), p0, value=1.0), dtype)


def test_scan_vmap_and_donation_match_optax(dtype):
    p0 = params_of(dtype)

    def scanned(tx):
        def body(carry, _):
            p, s = carry
            updates, s = tx.update(jax.grad(loss)(p), s, p)
            p = optax.apply_updates(p, updates)
            return (p, s), p
        return jax.lax.scan(body, (p0, tx.init(p0)), None, length=STEPS)[1]

    def ensemble(tx):  # three models, vmapped
        batch = jax.tree.map(lambda x: jnp.stack([x, 2 * x, x - 1]), p0)

        def one(p, s):
            updates, s = tx.update(jax.grad(loss)(p), s, p)
            return optax.apply_updates(p, updates), s

        step, state, out = jax.jit(jax.vmap(one)), jax.vmap(tx.init)(batch), []
        for _ in range(STEPS):
            batch, state = step(batch, state)
            out.append(batch)
        return out

    def donated(tx):
        def one(p, s):
            updates, s = tx.update(jax.grad(loss)(p), s, p)
            return optax.apply_updates(p, updates), s

        step = jax.jit(one, donate_argnums=(0, 1))
        p, out = jax.tree.map(jnp.copy, p0), []
        s = tx.init(p)
        for _ in range(STEPS):
            p, s = step(p, s)
            out.append(jax.tree.map(jnp.copy, p))
        return out

    for run in (scanned, ensemble, donated):
        ref, ours = run(optax.adam(1e-2)), run(adam())
        if run is scanned:  # one stacked pytree: unstack it
            ref, ours = ([jax.tree.map(lambda x, i=i: x[i], t) for i in range(STEPS)]
                         for t in (ref, ours))
        assert_same(ref, ours, dtype)


def test_grad_through_the_updates_matches_optax(dtype):
    """Meta-learning: the gradient of the loss after three steps with respect to the
    initial params and the learning rate."""
    p0 = params_of(dtype)

    def meta(make):
        def outer(lr, p):
            tx = make(lr)
            s = tx.init(p)
            for _ in range(3):
                updates, s = tx.update(jax.grad(loss)(p), s, p)
                p = optax.apply_updates(p, updates)
            return loss(p)
        return jax.jit(jax.grad(outer, argnums=(0, 1)))(jnp.asarray(1e-2, dtype), p0)

    for ref_make, our_make in (
            (optax.adam, lambda lr: optax_transformation(Adam(1.0), learning_rate=lr)),
            (lambda lr: optax.sgd(lr, 0.9),
             lambda lr: optax_transformation(SGD(1.0, momentum=0.9), learning_rate=lr))):
        ref, ours = meta(ref_make), meta(our_make)
        assert float(jnp.abs(ref[0])) > 1.0
        for x, y in zip(jax.tree.leaves(ref), jax.tree.leaves(ours)):
            np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=50 * tol(dtype),
                                       atol=50 * tol(dtype))


def test_state_round_trips_through_flatten_and_npz(dtype, tmp_path):
    """A checkpoint of the opt_state as its leaves (``jax.tree_util``), reloaded mid-run:
    the run goes on as optax's."""
    p0 = params_of(dtype)

    def run(tx):
        p, s = p0, tx.init(p0)
        step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))
        out = []
        for i in range(STEPS):
            if i == 3:
                leaves, treedef = jax.tree_util.tree_flatten(s)
                np.savez(tmp_path / "state.npz", *[np.asarray(x) for x in leaves])
                with np.load(tmp_path / "state.npz") as f:
                    s = jax.tree_util.tree_unflatten(
                        treedef, [jnp.asarray(f[f"arr_{k}"]) for k in range(len(leaves))])
            updates, s = step(p, s)
            p = optax.apply_updates(p, updates)
            out.append(p)
        return out

    assert_same(run(optax.adam(1e-2)), run(adam()), dtype)


@pytest.fixture
def x32():
    """JAX's default precision (``jax_enable_x64`` off, then restored): what these tests'
    arrays and expected dtypes assume, whatever an earlier test in the process left on."""
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    yield
    jax.config.update("jax_enable_x64", before)


def test_integer_leaves_refused_by_name_and_kept_by_masked_as_optax(x32):
    p = {"w": jnp.asarray([0.5, -0.5, 1.0]), "step": jnp.asarray(3)}
    g = {"w": jnp.asarray([0.1, -0.2, 0.3]), "step": jnp.asarray(0)}
    with pytest.raises(TypeError, match=r"params\['step'\] has dtype int32"):
        adam().init(p)
    with pytest.raises(TypeError, match=r"params\['step'\]"):
        adam().update(g, adam().init({"w": p["w"]}), p)
    for wrap in (lambda t: optax.masked(t, {"w": True, "step": False}),
                 lambda t: optax.multi_transform({"a": t, "z": optax.set_to_zero()},
                                                 {"w": "a", "step": "z"})):
        out = []
        for tx in (wrap(optax.adam(1e-2)), wrap(adam())):
            updates, _ = jax.jit(tx.update)(g, tx.init(p), p)
            out.append(optax.apply_updates(p, updates))
        assert int(out[1]["step"]) == 3 and out[1]["step"].dtype == jnp.int32
        np.testing.assert_allclose(out[1]["w"], out[0]["w"], rtol=0, atol=1e-7)
        assert float(jnp.max(jnp.abs(out[1]["w"] - p["w"]))) > 5e-3


def test_mixed_dtypes_as_documented(x32):
    """bfloat16 params, float32 gradients: optax's updates are float32, ours bfloat16, the
    new params the same; float32 params, bfloat16 gradients: ours are optax's with the
    gradients first cast to float32 (optax squares them in bfloat16)."""
    g32 = jnp.asarray([0.1, -0.2, 0.3, 1e-3], jnp.float32)
    p16 = jnp.asarray([0.7, -0.3, 1.5, 0.25], jnp.bfloat16)
    ref_u, _ = optax.adam(1e-2).update(g32, optax.adam(1e-2).init(p16), p16)
    our_u, state = adam().update(g32, adam().init(p16), p16)
    assert ref_u.dtype == jnp.float32 and our_u.dtype == jnp.bfloat16
    assert state.slots["m"].dtype == jnp.bfloat16
    ref_p, our_p = optax.apply_updates(p16, ref_u), optax.apply_updates(p16, our_u)
    assert our_p.dtype == ref_p.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(our_p, np.float32), np.asarray(ref_p, np.float32))

    p32 = jnp.asarray([0.7, -0.3, 1.5, 0.25], jnp.float32)
    g16 = g32.astype(jnp.bfloat16)
    tx = optax.adam(1e-2)
    ref_cast, _ = tx.update(g16.astype(jnp.float32), tx.init(p32), p32)
    ref_raw, _ = tx.update(g16, tx.init(p32), p32)
    ours, _ = adam().update(g16, adam().init(p32), p32)
    assert ours.dtype == jnp.float32
    # 2e-5: optax's float32 1 - b2 against its bias correction's 1 - b2**t (~7e-6 on a
    # first step); ours are computed in float64
    np.testing.assert_allclose(ours, ref_cast, rtol=2e-5)
    assert float(jnp.max(jnp.abs(ref_raw - ours) / jnp.abs(ours))) > 1e-4  # the difference


def test_dataclass_params_named_by_key_path_match_adamw_with_mask(x32):
    """``flax.struct``-style dataclass nodes: ``exclude_weight_decay`` names the leaves by
    their key paths ("enc/bias"), as optax's ``adamw(mask=...)`` selects them."""
    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class Dense:
        kernel: Any
        bias: Any

    p0 = {"enc": Dense(jnp.linspace(-1.0, 1.0, 6).reshape(3, 2), jnp.asarray([0.5, -0.5])),
          "head": [Dense(jnp.ones((2, 2)), jnp.ones(2))]}
    mask = jax.tree.map(lambda x: x.ndim > 1, p0)
    ours = optax_transformation(AdamW(1e-2, weight_decay=0.5, exclude_weight_decay=("bias",)))
    assert_same(trajectory(optax.adamw(1e-2, weight_decay=0.5, mask=mask), p0),
                trajectory(ours, p0), jnp.dtype(jnp.float32))
    wrong = optax_transformation(AdamW(1e-2, weight_decay=0.5))  # the mask matters here
    assert not all(bool(jnp.allclose(x, y, atol=1e-6)) for x, y in zip(
        jax.tree.leaves(trajectory(wrong, p0)[-1]),
        jax.tree.leaves(trajectory(optax.adamw(1e-2, weight_decay=0.5, mask=mask), p0)[-1])))
