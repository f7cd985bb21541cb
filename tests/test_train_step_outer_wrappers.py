"""Mechanize and ScheduleFree (wrappers of a whole base optimizer's update) in the one-program
JAX train step (:mod:`mithril.interop.optax_outer`): before, their steps were the separate
``evaluate`` + ``update`` calls on JAX. Each case runs the same batches through the program
(``step.init``'s state) and through the separate calls (``optimizer.init``'s state, the
wrapper's own ``update``, float64 scalars on the host), and holds params, the state
(the wrapper's own slots and values included, through ``to_optimizer_state``) and the losses
to float32 rounding."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

pytest.importorskip("jax")

from test_train_step_skipped_count import _model as skip_model  # noqa: E402
from test_unreached_params import SCHEDULE, data_of, two_heads  # noqa: E402

import mithril as ml  # noqa: E402
from mithril.backends import JaxBackend  # noqa: E402
from mithril.cli.networks import mlp_spec  # noqa: E402
from mithril.utils import optimizers as o  # noqa: E402
from mithril.utils.optimizers.state import OptimizerState  # noqa: E402
from mithril.utils.training import make_train_step  # noqa: E402

TOL = 2e-6
STEPS = 5

CASES = {
    "mechanize_adam": lambda: o.Mechanize(o.Adam(learning_rate=1.0), s_init=1e-3),
    "mechanize_sgd_wd": lambda: o.Mechanize(
        o.SGD(learning_rate=0.5, momentum=0.9, weight_decay=1e-2), weight_decay=0.1,
        num_betas=3, s_init=1e-2),
    "mechanize_adamw_groups_clip": lambda: o.Mechanize(o.AdamW(
        learning_rate=1.0, clip_norm=0.5,
        param_groups=[{"params": "bias", "lr_scale": 0.5, "weight_decay": 0.0}]),
        s_init=1e-3),
    "mechanize_lamb": lambda: o.Mechanize(o.LAMB(learning_rate=1.0), s_init=1e-3),
    "mechanize_muon": lambda: o.Mechanize(o.Muon(learning_rate=1.0), s_init=1e-3),
    "mechanize_sgd_schedule_free": lambda: o.Mechanize(
        o.ScheduleFreeSGD(learning_rate=1.0), s_init=1e-3),
    "mechanize_of_schedule_free": lambda: o.Mechanize(
        o.ScheduleFree(o.Adam(learning_rate=1.0, beta1=0.0)), s_init=1e-3),
    "schedule_free_adam": lambda: o.ScheduleFree(o.Adam(learning_rate=1e-2, beta1=0.0)),
    "schedule_free_sgd_lr": lambda: o.ScheduleFree(o.SGD(learning_rate=0.1), averaging_lr=0.5,
                                                   b1=0.8, weight_lr_power=1.0),
    "schedule_free_adafactor": lambda: o.ScheduleFree(o.Adafactor(learning_rate=1e-2)),
    "schedule_free_ema": lambda: o.ScheduleFree(o.Adam(learning_rate=1e-2, beta1=0.0,
                                                       ema_decay=0.9)),
}
#: Muon's Newton-Schulz iteration amplifies float32 rounding (tests/test_train_step_fn.py)
TOLERANCE = {"mechanize_muon": 5e-4}


def _problem(seed: int = 0) -> tuple:
    spec = mlp_spec(8, 4, [16, 12])
    be = JaxBackend(dtype="float32", seed=seed)
    c = ml.compile(spec.model, be, shapes=spec.shapes)
    rng = np.random.default_rng(seed)
    batches = [{"input": be.array(rng.standard_normal((32, 8)).astype(np.float32)),
                "target": be.array(rng.integers(0, 4, 32), be.int_dtype)}
               for _ in range(STEPS)]
    return c, be, batches


def _run(c, opt, batches: list, fused: bool, between=None) -> tuple:
    params = c.get_parameters()
    step = make_train_step(c, opt, loss="loss")
    state = step.init(params) if fused else opt.init(params)
    losses = []
    for i, data in enumerate(batches):
        if between is not None:
            between(opt, i)
        params, state, out = step(params, state, data)
        losses.append(float(out["loss"]))
    return step, params, state, losses


def _close(got: dict, want: dict, tol: float = TOL, what: str = "") -> None:
    assert got.keys() == want.keys()
    for n in want:
        np.testing.assert_allclose(np.asarray(got[n]), np.asarray(want[n]), rtol=tol,
                                   atol=tol, err_msg=f"{what} {n}")


def _same_states(got: OptimizerState, want: OptimizerState, tol: float = TOL) -> None:
    assert got.kind == want.kind and got.step == want.step
    assert set(got.slots) == set(want.slots)
    for s in want.slots:
        _close(got.slot(s), want.slot(s), tol, s)
    assert got.values.keys() == want.values.keys()
    for k, v in want.values.items():
        assert got.values[k] == pytest.approx(v, rel=max(tol, 1e-5), abs=tol), k


def two_heads_alternately(make, batch: int | None = 8) -> None:
    """Two heads trained by turns (``SCHEDULE``), one optimizer ``make()`` in the program
    and in the separate calls: params, missed counts and state to float32 rounding
    (``batch``: the compiled batch dimension, None for a DP-SGD)."""
    runs = {}
    for fused in (False, True):
        c = ml.compile(two_heads(), JaxBackend(), shapes={"input": [batch, 3]})
        opt = make()
        steps = {k: make_train_step(c, opt, loss=k) for k in ("loss_a", "loss_b")}
        assert all(s.fused for s in steps.values())
        params = c.get_parameters()
        state = steps["loss_a"].init(params) if fused else opt.init(params)
        rng = np.random.default_rng(1)
        for loss in SCHEDULE:
            data = {k: c.backend.array(v.astype(np.float32)) for k, v in data_of(rng).items()}
            params, state, _ = steps[loss](params, state, data)
        runs[fused] = (params, steps["loss_a"].to_optimizer_state(state, params))
    (want, want_state), (got, state) = runs[False], runs[True]
    _close(got, want)
    assert state.missed_counts() == want_state.missed_counts() != {}
    _same_states(state, want_state)


@pytest.mark.parametrize("name", CASES)
def test_one_program_equals_the_separate_calls(name: str) -> None:
    c, be, batches = _problem()
    tol = TOLERANCE.get(name, TOL)
    opt_a, opt_b = CASES[name](), CASES[name]()
    ref_step, want, want_state, want_losses = _run(c, opt_a, batches, fused=False)
    assert not ref_step.fused or isinstance(want_state, OptimizerState)
    step, got, state, losses = _run(c, opt_b, batches, fused=True)
    assert step.fused and type(state).__name__ == "OptaxState"
    assert step.rebuilds == 0 and step._jitted._cache_size() == 1
    np.testing.assert_allclose(losses, want_losses, rtol=tol, atol=tol)
    _close(got, want, tol)
    _same_states(step.to_optimizer_state(state, got), want_state, tol)


@pytest.mark.parametrize("name", ["mechanize_adam", "schedule_free_adam"])
def test_state_round_trips_through_the_separate_calls(name: str) -> None:
    """Two fused steps, ``to_optimizer_state``, one ``optimizer.update``,
    ``from_optimizer_state``, two fused steps: five separate steps' numbers."""
    c, be, batches = _problem()
    _, want, want_state, _ = _run(c, CASES[name](), batches, fused=False)
    opt = CASES[name]()
    step = make_train_step(c, opt, loss="loss")
    params = c.get_parameters()
    fstate = step.init(params)
    for data in batches[:2]:
        params, fstate, _ = step(params, fstate, data)
    state = step.to_optimizer_state(fstate, params)
    _, grads = c.evaluate(params, batches[2], output_gradients={"loss": 1.0})
    params, state = opt.update(params, grads, state)
    fstate = step.from_optimizer_state(state)
    assert type(fstate).__name__ == "OptaxState" and int(fstate.count) == 3
    for data in batches[3:]:
        params, fstate, _ = step(params, fstate, data)
    _close(params, want)
    _same_states(step.to_optimizer_state(fstate, params), want_state)


def test_own_hyperparameter_changes_rebuild_the_program() -> None:
    """A wrapper's own hyperparameters are baked in: a change builds the program anew
    (``step.rebuilds``), and the steps after it take the new value, as the separate calls
    do; a learning-rate change (the base's) compiles nothing."""
    c, be, batches = _problem()

    def between(opt, i: int) -> None:
        if i == 2:
            opt.b1 = 0.7
        opt.learning_rate = 1e-2 / (1 + i)

    def make():
        return o.ScheduleFree(o.Adam(learning_rate=1e-2, beta1=0.0))

    _, want, want_state, _ = _run(c, make(), batches, fused=False, between=between)
    step, got, state, _ = _run(c, make(), batches, fused=True, between=between)
    assert step.fused and step.rebuilds == 1
    _close(got, want)
    _same_states(step.to_optimizer_state(state, got), want_state)


@pytest.mark.parametrize("wrap", ["mechanize", "schedule_free"])
def test_a_step_the_base_skips_is_skipped_whole(wrap: str) -> None:
    """``nonfinite="skip"`` on the base: a non-finite gradient skips the base's step, and
    the wrapper's (params, its slots and values as they were), counted as skipped."""
    good = {"input": np.ones((4, 3), np.float32), "target": np.zeros((4, 2), np.float32)}
    bad = {"input": np.full((4, 3), np.inf, np.float32), "target": good["target"]}
    schedule = [good, bad, good, bad, good]

    def make():
        base = o.Adam(learning_rate=1e-2 if wrap == "schedule_free" else 1.0,
                      beta1=0.0 if wrap == "schedule_free" else 0.9, nonfinite="skip")
        return o.ScheduleFree(base) if wrap == "schedule_free" else o.Mechanize(
            base, s_init=1e-3)

    runs = {}
    for fused in (False, True):
        b = JaxBackend()
        c = ml.compile(skip_model(), b, shapes={"input": [None, 3]})
        step = make_train_step(c, make(), loss="loss")
        p = {k: b.array(np.full(tuple(v.shape), 0.3, np.float32))
             for k, v in c.get_parameters().items()}
        s = step.init(p) if fused else step.optimizer.init(p)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (skipped steps are warned of)
            for d in schedule:
                before = {k: np.asarray(v) for k, v in p.items()}
                p, s, _ = step(p, s, {k: b.array(v) for k, v in d.items()})
                if d is bad:
                    _close(p, before, 0.0, "skipped")
        assert step.fused and isinstance(s, OptimizerState) != fused
        runs[fused] = (p, step.to_optimizer_state(s, p))
    (want, want_state), (got, state) = runs[False], runs[True]
    assert (state.step, state.num_skipped) == (want_state.step, want_state.num_skipped) == (3, 2)
    _close(got, want)
    _same_states(state, want_state)


@pytest.mark.parametrize("wrap", ["mechanize", "schedule_free"])
def test_params_the_loss_does_not_reach_sit_out(wrap: str) -> None:
    """Two heads trained by turns: each step's unreached head keeps its params, its slots
    (the wrapper's ``x0`` / ``z`` too) and counts a missed step, in the program as in the
    separate calls."""
    def make():
        if wrap == "mechanize":
            return o.Mechanize(o.AdamW(learning_rate=1.0, weight_decay=0.1), s_init=1e-3)
        return o.ScheduleFree(o.AdamW(learning_rate=1e-2, beta1=0.0, weight_decay=0.1))

    two_heads_alternately(make)


def test_schedule_free_eval_params_of_the_programs_state() -> None:
    """``ScheduleFree.eval_params`` takes the program's state (``step.init``'s) as the
    separate calls' (it refused it), and ``schedule_free_eval_params`` says which to use."""
    from mithril.interop import schedule_free_eval_params

    c, be, batches = _problem()
    make = CASES["schedule_free_sgd_lr"]
    opt_a, opt_b = make(), make()
    _, want, want_state, _ = _run(c, opt_a, batches[:3], fused=False)
    _, got, state, _ = _run(c, opt_b, batches[:3], fused=True)
    x = opt_b.eval_params(state, got)
    assert all(str(v.dtype) == "float32" for v in x.values())
    _close(x, opt_a.eval_params(want_state, want))
    with pytest.raises(ValueError, match="opt.eval_params"):
        schedule_free_eval_params(state, got)
    with pytest.raises(ValueError, match="training parameters of this state"):
        opt_b.eval_params(state, {k: v for k, v in list(got.items())[1:]})
