"""DP-SGD in the one-program JAX train step (:mod:`mithril.utils.train_step_private`):
the per-example gradients (``jax.vmap``), their clipping, noise and mean, and the base's
update in one ``jax.jit`` program. Before, the JAX step was ``per_example_gradients`` +
``update`` (the separate calls), which each case runs beside it on the same batches, float32:
params, state (``dp_count``, the base's slots) and losses to rounding; the noise is the same
pure function of the seed, the parameter and the step in both."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("jax")

from test_train_step_outer_wrappers import (  # noqa: E402
    _close,
    _problem,
    _run,
    _same_states,
    two_heads_alternately,
)

from mithril.errors import ShapeError  # noqa: E402
from mithril.utils import optimizers as o  # noqa: E402
from mithril.utils.training import make_train_step  # noqa: E402

CASES = {
    "dp_adam_noise": lambda: o.DifferentiallyPrivate(o.Adam(learning_rate=1e-2),
                                                     l2_norm_clip=0.5, noise_multiplier=1.0,
                                                     seed=7),
    "dpsgd_momentum_expected": lambda: o.DPSGD(0.1, l2_norm_clip=0.3, noise_multiplier=0.5,
                                               momentum=0.9, expected_batch_size=40,
                                               clip_epsilon=1e-6),
    "dp_adamw_groups_clip": lambda: o.DifferentiallyPrivate(o.AdamW(
        learning_rate=1e-2, clip_norm=0.05,
        param_groups=[{"params": "bias", "lr_scale": 0.5, "weight_decay": 0.0}]),
        l2_norm_clip=0.2, noise_multiplier=0.0),
    "dp_mechanize": lambda: o.DifferentiallyPrivate(
        o.Mechanize(o.Adam(learning_rate=1.0), s_init=1e-3), noise_multiplier=0.7),
}


@pytest.mark.parametrize("name", CASES)
def test_one_program_equals_the_separate_calls(name: str) -> None:
    c, be, batches = _problem()
    _, want, want_state, want_losses = _run(c, CASES[name](), batches, fused=False)
    step, got, state, losses = _run(c, CASES[name](), batches, fused=True)
    assert step.fused and type(state).__name__ == "OptaxState"
    assert step.rebuilds == 0 and step._jitted._cache_size() == 1
    np.testing.assert_allclose(losses, want_losses, rtol=2e-6, atol=2e-6)
    _close(got, want)
    got_state = step.to_optimizer_state(state, got)
    assert got_state.values["dp_count"] == want_state.values["dp_count"] == len(batches)
    _same_states(got_state, want_state)


def test_noise_is_drawn() -> None:
    """With noise the params differ from the same step without (the program draws it)."""
    c, be, batches = _problem()
    runs = [_run(c, o.DPSGD(0.1, noise_multiplier=m, seed=1), batches[:2], fused=True)[1]
            for m in (0.0, 1.0)]
    assert max(float(np.abs(np.asarray(runs[0][n]) - np.asarray(runs[1][n])).max())
               for n in runs[0]) > 1e-3


def test_state_round_trips_and_the_noise_continues() -> None:
    """Two fused steps, ``to_optimizer_state``, one ``optimizer.update`` of per-example
    gradients, ``from_optimizer_state``, two more fused steps: five separate steps (the
    noise of each step drawn at its own count)."""
    from mithril.utils.per_example import per_example_gradients

    c, be, batches = _problem()
    make = CASES["dp_adam_noise"]
    _, want, want_state, _ = _run(c, make(), batches, fused=False)
    opt = make()
    step = make_train_step(c, opt, loss="loss")
    params = c.get_parameters()
    fstate = step.init(params)
    for data in batches[:2]:
        params, fstate, _ = step(params, fstate, data)
    state = step.to_optimizer_state(fstate, params)
    params, state = opt.update(params, per_example_gradients(c, params, batches[2], "loss"),
                               state)
    fstate = step.from_optimizer_state(state)
    for data in batches[3:]:
        params, fstate, _ = step(params, fstate, data)
    _close(params, want)
    _same_states(step.to_optimizer_state(fstate, params), want_state)


def test_params_the_loss_does_not_reach_sit_out() -> None:
    two_heads_alternately(lambda: o.DifferentiallyPrivate(
        o.AdamW(learning_rate=1e-2, weight_decay=0.1), l2_norm_clip=0.3, noise_multiplier=0.8,
        seed=2), batch=None)


def test_empty_batch_is_noise_alone_or_refused() -> None:
    """An empty batch (Poisson sampling): with ``expected_batch_size`` a step of noise
    alone, as the separate calls take it; without, the DP error, and nothing changed."""
    c, be, batches = _problem()
    empty = {"input": be.array(np.zeros((0, 8), np.float32)),
             "target": be.array(np.zeros(0, np.int64), be.int_dtype)}
    runs = {}
    for fused in (False, True):
        _, p, s, _ = _run(c, o.DPSGD(0.1, noise_multiplier=1.0, expected_batch_size=16),
                          [batches[0], empty], fused=fused)
        runs[fused] = p
    _close(runs[True], runs[False])
    step = make_train_step(c, o.DPSGD(0.1), loss="loss")
    params = c.get_parameters()
    state = step.init(params)
    before = {n: np.asarray(v) for n, v in params.items()}
    with pytest.raises(ShapeError, match="empty batch"):
        step(params, state, empty)
    params, state, _ = step(params, state, batches[0])  # (the state was not consumed)
    assert int(step.to_optimizer_state(state, params).values["dp_count"]) == 1
    assert any(not np.array_equal(np.asarray(params[n]), before[n]) for n in before)


def test_keys_that_disagree_on_the_batch_are_refused() -> None:
    c, be, batches = _problem()
    step = make_train_step(c, o.DPSGD(0.1), loss="loss")
    params = c.get_parameters()
    state = step.init(params)
    bad = {"input": batches[0]["input"], "target": batches[0]["target"][:5]}
    with pytest.raises(Exception, match="target"):
        step(params, state, bad)
    params, state, _ = step(params, state, batches[0])
    assert int(step.to_optimizer_state(state, params).values["dp_count"]) == 1


def test_dp_under_another_wrapper_is_not_one_program() -> None:
    """A DP-SGD under Mechanize takes the batch's gradient in its update (refused there):
    the step is not made a program that would aggregate nothing."""
    c, be, batches = _problem()
    inner = o.DifferentiallyPrivate(o.Adam(learning_rate=1e-2))
    assert not make_train_step(c, o.Mechanize(inner), loss="loss").fused
