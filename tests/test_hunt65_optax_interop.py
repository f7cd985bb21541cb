"""An optax user's loop around ``optax_transformation``, side by side with optax (float64,
jitted): hyperparameters written into ``opt_state.hyperparams`` between steps."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import jax_float64

from mithril.interop import optax_transformation
from mithril.utils.optimizers import SGD, Adam, Muon


def params_of() -> dict:
    rng = np.random.default_rng(0)
    return {"enc": {"kernel": jnp.asarray(rng.standard_normal((4, 3))),
                    "bias": jnp.asarray(rng.standard_normal(3))},
            "head": (jnp.asarray(rng.standard_normal(3)), None),
            "scale": jnp.asarray(0.7)}


def loss(p: Any) -> Any:
    return sum(jnp.sum(jnp.sin(2 * x) + 0.5 * x * x) for x in jax.tree.leaves(p))


def run(tx: Any, writes: dict[str, float], at: int = 4, steps: int = 10) -> tuple[list, Any]:
    step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))
    p, state, out = params_of(), tx.init(params_of()), []
    for i in range(steps):
        if i == at:
            state.hyperparams.update(writes)
        u, state = step(p, state)
        p = optax.apply_updates(p, u)
        out.append(jax.tree.map(np.array, p))
    return out, state


def gap(a: list, b: list) -> float:
    return max(float(np.max(np.abs(x - y))) for pa, pb in zip(a, b)
               for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)))


def test_a_number_keyword_hyperparameter_written_in_the_state_is_used_as_optaxs():
    """Regression: ``optax_transformation(Adam(), beta1=0.9)`` keeps ``beta1`` in
    ``state.hyperparams`` (docs: "a loop that writes opt_state.hyperparams['beta1'], as with
    optax.inject_hyperparams, steps as optax's does"), but each update recomputed it from the
    constant: the write was silently ignored and overwritten (3e-2 from optax after 10
    steps). It is read from the state now, as the learning rate is; a schedule still wins."""
    with jax_float64():
        ref, ref_state = run(optax.inject_hyperparams(optax.adam)(
            learning_rate=0.05, b1=0.9, b2=0.99), {"b1": 0.5, "b2": 0.9, "learning_rate": 0.02})
        ours, state = run(optax_transformation(Adam(0.05, convention="optax"), beta1=0.9,
                                               beta2=0.99),
                          {"beta1": 0.5, "beta2": 0.9, "learning_rate": 0.02})
        unchanged, _ = run(optax.inject_hyperparams(optax.adam)(
            learning_rate=0.05, b1=0.9, b2=0.99), {"learning_rate": 0.02})
        assert gap(ours, ref) < 1e-12
        assert gap(ref, unchanged) > 1e-3  # (the writes matter)
        assert float(state.hyperparams["beta1"]) == 0.5  # kept, as optax's b1
        assert float(ref_state.hyperparams["b1"]) == 0.5
        # SGD's momentum, and a tensorwise optimizer (Muon) the same way
        ref, _ = run(optax.inject_hyperparams(optax.sgd)(learning_rate=0.05, momentum=0.9),
                     {"momentum": 0.3})
        ours, _ = run(optax_transformation(SGD(0.05, momentum=0.9), momentum=0.9),
                      {"momentum": 0.3})
        assert gap(ours, ref) < 1e-12
        muon = Muon(0.05, momentum=0.9)
        a, _ = run(optax_transformation(muon, momentum=0.9), {"momentum": 0.3})
        b, _ = run(optax_transformation(Muon(0.05, momentum=0.9), momentum=0.9), {})
        assert gap(a[:4], b[:4]) == 0 and gap(a, b) > 1e-4  # the write counts from step 5
        # a schedule's value is the schedule's, as optax overwrites a scheduled b1
        sched = optax.linear_schedule(0.9, 0.5, 6)
        ref, _ = run(optax.inject_hyperparams(optax.adam)(learning_rate=0.05, b1=sched),
                     {"b1": 0.1})
        ours, _ = run(optax_transformation(Adam(0.05, convention="optax"), beta1=sched),
                      {"beta1": 0.1})
        assert gap(ours, ref) < 1e-8  # (the schedule's float32 values, rounded alike)


def test_a_complex_or_bool_gradient_is_refused_naming_the_leaf():
    """Regression: a complex gradient of a real parameter was cast to the parameter's dtype,
    its imaginary part silently dropped (Adam's step -0.01 where optax's, which steps with
    the complex gradient, gives -0.006 once applied); a bool one was taken as 0 / 1. Both
    raise a TypeError naming the key now, jitted too, on elementwise, two-pass and tensorwise
    optimizers; a real gradient of another float or int dtype is still cast, as optax
    promotes it."""
    from mithril.utils.optimizers import LAMB, Adafactor

    with jax_float64():
        p = {"enc": {"w": jnp.ones((2, 3))}, "s": jnp.asarray(0.5)}
        g = {"enc": {"w": jnp.full((2, 3), 0.3 + 0.4j)}, "s": jnp.asarray(0.3)}
        ref = optax.adam(1e-2)
        step = ref.update(g, ref.init(p), p)[0]["enc"]["w"]  # (complex: apply_updates
        np.testing.assert_allclose(np.real(np.asarray(step)), -0.006, rtol=1e-6)  # takes .real)
        for make in (Adam, LAMB, Muon, Adafactor):
            tx = optax_transformation(make(1e-2))
            state = tx.init(p)
            for update in (tx.update, jax.jit(tx.update)):
                with pytest.raises(TypeError, match=r"update for 'enc/w' has dtype complex128, "
                                                    r"the parameter float64"):
                    update(g, state, p)
                with pytest.raises(TypeError, match=r"update for 's' has dtype bool"):
                    update({**g, "enc": {"w": jnp.ones((2, 3))}, "s": jnp.asarray(True)},
                           state, p)
            real = {"enc": {"w": jnp.full((2, 3), 3, jnp.int32)}, "s": jnp.asarray(0.3)}
            ours, _ = tx.update(real, state, p)
            floats = {"enc": {"w": jnp.full((2, 3), 3.0)}, "s": jnp.asarray(0.3)}
            same, _ = tx.update(floats, state, p)
            assert gap([ours], [same]) == 0


def test_a_mismatched_updates_tree_names_the_key():
    """Regression: an updates tree of another structure raised JAX's message alone ("List
    arity mismatch: 2 != 1", "Expected named tuple, got (...)", "Expected None, got ..."),
    which does not say where in a deep tree; the key missing or beyond the params is named
    now (jitted, elementwise and tensorwise)."""
    from typing import NamedTuple

    from mithril.utils.optimizers import LAMB

    class Pair(NamedTuple):
        a: Any
        b: Any

    p = {"d": {"w": jnp.ones((2, 2)), "b": jnp.zeros(2)}, "t": Pair(jnp.ones(2), None),
         "l": [jnp.ones(1)]}
    g = jax.tree.map(jnp.ones_like, p)
    cases = [({**g, "l": [jnp.ones(1), jnp.ones(1)]}, r"an update for 'l/1', which is no "
                                                       r"parameter"),
             ({**g, "t": (jnp.ones(2), None)}, r"no update for 't/a'; an update for 't/0'"),
             ({**g, "t": Pair(jnp.ones(2), jnp.ones(2))}, r"an update for 't/b'"),
             ({**g, "d": {"w": jnp.ones((2, 2))}}, r"no update for 'd/b'")]
    for make in (Adam, LAMB, Muon):
        tx = optax_transformation(make(1e-2))
        state = tx.init(p)
        for bad, where in cases:
            with pytest.raises(ValueError, match=r"(?s)do not have the params' structure: .* -- "
                                                 + where):
                jax.jit(tx.update)(bad, state, p)
        tx.update(g, state, p)


def test_an_injected_hyperparameter_is_found_once_by_tree_get():
    """Regression: ``optax.inject_hyperparams`` around a factory naming ``beta1`` (the
    documented way) kept ``beta1`` in the inner state as well as in the injecting one, so
    ``optax.tree_utils.tree_get(state, "beta1")`` raised "Found multiple values" where
    optax's ``inject_hyperparams(optax.adam)`` finds its one ``b1`` (as our fixed learning
    rate is already left out). A fixed array is not kept now; the steps are optax's."""
    with jax_float64():
        ours = optax.inject_hyperparams(lambda learning_rate, beta1: optax_transformation(
            Adam(convention="optax"), learning_rate=learning_rate, beta1=beta1))(
            learning_rate=0.05, beta1=0.9)
        ref = optax.inject_hyperparams(optax.adam)(learning_rate=0.05, b1=0.9)
        a, state = run(ours, {"beta1": 0.5})
        b, ref_state = run(ref, {"b1": 0.5})
        assert gap(a, b) < 1e-12
        assert float(optax.tree_utils.tree_get(state, "beta1")) == 0.5
        assert float(optax.tree_utils.tree_get(ref_state, "b1")) == 0.5
        moved = optax.tree_utils.tree_set(state, beta1=0.7)
        assert float(optax.tree_utils.tree_get(moved, "beta1")) == 0.7
        muon = optax.inject_hyperparams(lambda learning_rate, momentum: optax_transformation(
            Muon(), learning_rate=learning_rate, momentum=momentum))(learning_rate=0.05,
                                                                     momentum=0.9)
        _, state = run(muon, {"momentum": 0.3})
        assert float(optax.tree_utils.tree_get(state, "momentum")) == 0.3
