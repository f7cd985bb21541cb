"""``optax_transformation(opt)`` copies ``opt``'s hyperparameters: a Mithril scheduler
stepping ``opt`` afterwards changes nothing in the transformation. That is warned about
(:mod:`mithril.interop.optax_scheduled`): once, pointing at the user's call, naming what to
use instead; never without a scheduler, for a hyperparameter the transformation is given,
or where Mithril makes the transformation itself (``make_train_step`` follows the
optimizer's rate). The numbers show why: the scheduler's rate is not the one used."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import mithril as ml  # noqa: E402
from mithril import interop  # noqa: E402
from mithril.backends import JaxBackend  # noqa: E402
from mithril.cli.networks import mlp_spec  # noqa: E402
from mithril.interop.optax_transform import optax_transformation  # noqa: E402
from mithril.utils import lr_schedulers as lrs  # noqa: E402
from mithril.utils.optimizers import SGD, Adam, Lookahead, Muon  # noqa: E402
from mithril.utils.training import make_train_step  # noqa: E402

MARK = "a Mithril scheduler drives the optimizer"


def ours(seen: list) -> list:
    return [w for w in seen if MARK in str(w.message)]


def params32() -> dict:
    return {"w": jnp.asarray(np.linspace(-1.0, 1.0, 6).reshape(2, 3), jnp.float32),
            "b": jnp.asarray([0.5, -0.25], jnp.float32)}


def test_a_scheduler_made_before_warns_once_naming_what_to_use() -> None:
    opt = Adam(learning_rate=0.1)
    sched = lrs.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        tx = optax_transformation(opt)
        params = params32()
        state = tx.init(params)
        for _ in range(3):  # (update and init look too: still one warning)
            _, state = tx.update(params, state, params)
            sched.step()
    mine = ours(seen)
    assert len(mine) == 1 and mine[0].category is UserWarning
    assert mine[0].filename == __file__  # (it points at the call)
    text = str(mine[0].message)
    assert "optax_transformation(Adam)" in text and "StepLR: learning_rate" in text
    for hint in ("learning_rate=schedule", "inject_hyperparams", "make_train_step",
                 "state.hyperparams['learning_rate']"):
        assert hint in text
    # what it warns about: the rate used is still the one copied (0.1), not the scheduler's
    assert opt.learning_rate == pytest.approx(0.0125)
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(0.1)


def test_no_warning_without_a_scheduler_on_that_optimizer() -> None:
    other = SGD(learning_rate=0.1)
    lrs.StepLR(other, step_size=1).step()  # (a scheduler of another optimizer, stepped)
    opt = Adam(learning_rate=0.1)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        tx = optax_transformation(opt)
        params = params32()
        state = tx.init(params)
        tx.update(params, state, params)
    assert ours(seen) == []


def test_through_the_package_entry_point_it_points_at_the_call() -> None:
    opt = Adam(learning_rate=0.1)
    sched = lrs.CosineAnnealingLR(opt, T_max=10)  # (held: one no longer held steps nothing)
    with pytest.warns(UserWarning, match=MARK) as seen:
        interop.optax_transformation(opt)
    assert ours(list(seen))[0].filename == __file__ and sched.last_step == 0


def test_a_scheduler_on_another_hyperparameter_or_group_is_named() -> None:
    opt = Adam(learning_rate=0.1, param_groups=[{"params": ["b"], "beta1": 0.8}])
    a = lrs.LinearLR(opt.hyperparameter("beta1", group=0), start_factor=0.5, total_iters=4)
    b = lrs.StepLR(opt.hyperparameter("weight_decay"), step_size=2)
    with pytest.warns(UserWarning, match=MARK) as seen:
        optax_transformation(opt)
    text = str(ours(list(seen))[0].message)
    assert "LinearLR: param_groups[0].beta1" in text and "StepLR: weight_decay" in text
    del a, b


def test_a_hyperparameter_given_to_the_transformation_is_not_warned_about() -> None:
    opt = Adam(learning_rate=0.1)
    held = [lrs.StepLR(opt, step_size=1), lrs.StepLR(opt.hyperparameter("beta2"), step_size=1)]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        optax_transformation(opt, learning_rate=optax.exponential_decay(0.1, 1, 0.5),
                             beta2=0.99)
    assert ours(seen) == []
    with warnings.catch_warnings(record=True) as seen:  # beta2 not given: named alone
        warnings.simplefilter("always")
        optax_transformation(opt, learning_rate=0.1)
    assert len(ours(seen)) == 1 and "(StepLR: beta2)" in str(ours(seen)[0].message)
    del held


def test_a_held_optimizer_and_a_tensorwise_one_are_looked_at() -> None:
    inner = Adam(learning_rate=0.1)
    look = Lookahead(inner, sync_period=2)
    held = [lrs.StepLR(inner, step_size=1)]
    with pytest.warns(UserWarning, match=r"optax_transformation\(Lookahead\)"):
        optax_transformation(look)
    muon = Muon(learning_rate=0.02)
    held.append(lrs.StepLR(muon, step_size=1))
    with pytest.warns(UserWarning, match=r"optax_transformation\(Muon\)"):
        optax_transformation(muon)


def test_a_scheduler_made_after_the_transformation_warns_at_the_next_update() -> None:
    opt = SGD(learning_rate=0.1)
    params = params32()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        tx = optax_transformation(opt)
        state = tx.init(params)
        assert ours(seen) == []
        sched = lrs.StepLR(opt, step_size=1, gamma=0.5)
        updates, state = tx.update(params, state, params)  # (made: seen, not yet stepped)
        assert len(ours(seen)) == 1
        sched.step()
        for _ in range(2):
            updates, state = tx.update(params, state, params)
    mine = ours(seen)
    assert len(mine) == 1 and mine[0].filename == __file__
    # the update used the copied rate, 0.1: SGD's step is -0.1·g (g = params here)
    np.testing.assert_allclose(np.asarray(updates["w"]), -0.1 * np.asarray(params["w"]),
                               rtol=1e-6)


def test_a_refused_call_does_not_warn() -> None:
    opt = Adam(learning_rate=0.1, nonfinite="raise")
    sched = lrs.StepLR(opt, step_size=1)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="nonfinite='raise'"):
            optax_transformation(opt)
    assert ours(seen) == [] and sched.last_step == 0


def test_make_train_step_follows_the_scheduler_and_does_not_warn() -> None:
    """Mithril's own transformation (make_train_step's JAX program) reads the optimizer's
    rate at every call: no warning, and the rate the scheduler set is the one used."""
    be = JaxBackend(dtype="float32")
    spec = mlp_spec(4, 2, [5])
    compiled = ml.compile(spec.model, be, shapes=spec.shapes)
    rng = np.random.default_rng(0)
    data = {"input": be.array(rng.standard_normal((8, 4)).astype(np.float32)),
            "target": be.array(rng.integers(0, 2, 8), be.int_dtype)}
    start = {k: np.array(be.to_numpy(v)) for k, v in compiled.get_parameters().items()}

    def run(fused: bool) -> dict:
        opt = SGD(learning_rate=0.5)
        sched = lrs.StepLR(opt, step_size=1, gamma=0.1)
        params = {k: be.array(v.copy()) for k, v in start.items()}
        step = make_train_step(compiled, opt, loss="loss") if fused else None
        state = step.init(params) if fused else opt.init(params)
        for _ in range(3):
            if fused:
                params, state, _ = step(params, state, data)
            else:
                _, grads = compiled.evaluate(params, data, output_gradients={"loss": 1.0})
                params, state = opt.update(params, grads, state)
            sched.step()
        return {k: np.array(be.to_numpy(v)) for k, v in params.items()}

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = run(True)
    assert ours(seen) == []
    want = run(False)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7)
    assert any(not np.allclose(got[k], start[k]) for k in got)


def test_jitted_update_after_a_warning_gives_the_same_numbers() -> None:
    """The warning changes nothing: the numbers are those of the optimizer unscheduled
    (bit for bit), and optax's (to 2e-5: optax rounds ``1 − β₂ᵗ`` to float32, 1e-5 relative)."""
    opt = Adam(learning_rate=0.1)
    sched = lrs.StepLR(opt, step_size=1)
    with pytest.warns(UserWarning, match=MARK):
        tx = optax_transformation(opt)
    plain, ref = optax_transformation(Adam(learning_rate=0.1)), optax.adam(0.1)
    params = params32()
    s, p, r = tx.init(params), plain.init(params), ref.init(params)
    up, plain_up = jax.jit(tx.update), jax.jit(plain.update)
    for _ in range(3):
        u, s = up(params, s, params)
        w, p = plain_up(params, p, params)
        v, r = ref.update(params, r, params)
        for k in params:
            np.testing.assert_array_equal(np.asarray(u[k]), np.asarray(w[k]))
            np.testing.assert_allclose(np.asarray(u[k]), np.asarray(v[k]), rtol=2e-5)
        sched.step()


def test_a_scheduler_made_after_the_transformation_warns_at_init() -> None:
    """A jitted loop traces its update before the scheduler's first step: only ``init``
    can see a scheduler made after the transformation, cheaply where schedulers register."""
    opt = Adam(learning_rate=0.1)
    tx = optax_transformation(opt)
    sched = lrs.StepLR(opt, step_size=1)
    with pytest.warns(UserWarning, match=MARK):
        tx.init(params32())
    assert sched.last_step == 0
