"""The schedulers' state and their bad input: ``state_dict`` / ``load_state_dict`` round trips
mid-run (ReduceLROnPlateau mid-cooldown and mid-patience against torch's), hyperparameter
validation naming the argument, one ``set_learning_rate`` call a step, and a learning rate the
optimizer refuses (or a state dict with a bad rate) leaving the scheduler and the optimizer as
they were.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from scheduler_parity import FakeOpt, assert_exact, noisy_metric, torch_lrs
from torch.optim import lr_scheduler as tl

from mithril.utils.lr_schedulers import (
    CosineAnnealingLR,
    CosineAnnealingWarmRestarts,
    ExponentialLR,
    LambdaLR,
    LinearWarmupScheduler,
    LRScheduler,
    MultiStepLR,
    OneCycleLR,
    ReduceLROnPlateau,
    SequentialLR,
    StepLR,
)

# --------------------------------------------------------------------------------------------
# state_dict round trip
# --------------------------------------------------------------------------------------------


def _nested(o: FakeOpt) -> SequentialLR:
    inner = SequentialLR(o, [ExponentialLR(o, 0.9), CosineAnnealingWarmRestarts(o, 5, 2)], [10])
    warm = LinearWarmupScheduler(o, 5, 0.0, 0.05, after_scheduler=StepLR(o, 7, 0.7))
    return SequentialLR(o, [warm, inner, OneCycleLR(o, 0.3, 100, three_phase=True)], [40, 90])


ROUND_TRIP_FACTORIES: dict[str, Callable[[FakeOpt], LRScheduler]] = {
    "step": lambda o: StepLR(o, 10, 0.5),
    "multistep": lambda o: MultiStepLR(o, [30, 56, 57, 58, 100], 0.5),
    "exponential": lambda o: ExponentialLR(o, 0.99),
    "cosine": lambda o: CosineAnnealingLR(o, 40, 1e-3),
    "warm_restarts": lambda o: CosineAnnealingLR(o, 6, 1e-3, warm_restarts=True, T_mult=2),
    # saved mid-cooldown / mid-patience, lr between min_lr and base (checked in the test)
    "plateau": lambda o: ReduceLROnPlateau(o, "min", 0.5, 2, 0.03, cooldown=5, min_lr=1e-3),
    "plateau_patience": lambda o: ReduceLROnPlateau(o, "min", 0.5, 3, 0.01, cooldown=2,
                                                    min_lr=1e-3),
    "one_cycle": lambda o: OneCycleLR(o, 1.0, 150, anneal_strategy="linear"),
    "warmup_cosine": lambda o: LinearWarmupScheduler(o, 30, 0.0, 0.2, CosineAnnealingLR(o, 50)),
    "warmup_plateau": lambda o: LinearWarmupScheduler(o, 20, 0.0, 0.2, ReduceLROnPlateau(o)),
    "seq_plateau": lambda o: SequentialLR(
        o,
        [
            LinearWarmupScheduler(o, 10, 0.01, 0.1),
            ReduceLROnPlateau(o, factor=0.5, patience=2, cooldown=1),
            ExponentialLR(o, 0.95),
        ],
        milestones=[20, 120],
    ),
    "nested": _nested,
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIP_FACTORIES))
def test_state_dict_round_trip_mid_run(name: str) -> None:
    make = ROUND_TRIP_FACTORIES[name]
    n, save_at, base = 150, 57, 0.1
    metrics = noisy_metric(n, seed=3)

    def run(sched: LRScheduler, opt: FakeOpt, steps: range) -> list[float]:
        out = []
        for i in steps:
            if isinstance(sched, ReduceLROnPlateau) or sched.requires_metric:
                sched.step(metrics[i])  # type: ignore[call-arg]
            else:
                sched.step()
            out.append(opt.lr)
        return out

    opt_a = FakeOpt(base)
    full = run(make(opt_a), opt_a, range(n))

    opt_b = FakeOpt(base)
    sched_b = make(opt_b)
    first = run(sched_b, opt_b, range(save_at))
    if isinstance(sched_b, ReduceLROnPlateau):  # a save with something to lose
        assert sched_b.min_lr < opt_b.lr < base and sched_b.best < math.inf
        assert sched_b.cooldown_counter > 0 or sched_b.num_bad_epochs > 0
    state = sched_b.state_dict()
    text = json.dumps(state, allow_nan=False)  # strictly JSON: no arrays, no NaN/inf literals
    restored = json.loads(text)
    assert restored == state

    opt_c = FakeOpt(123.0)  # deliberately wrong lr: load_state_dict must set it
    sched_c = make(opt_c)
    sched_c.load_state_dict(restored)
    assert opt_c.lr == full[save_at - 1] == sched_c.get_last_lr()
    assert sched_c.last_step == save_at
    assert sched_c.state_dict() == state
    rest = run(sched_c, opt_c, range(save_at, n))
    assert first + rest == full


def plateau_metrics(n: int, mode: str) -> list[float]:
    """A loss that falls in bursts with noisy plateaus between them (``1 - loss`` for
    ``mode='max'``), so that a plateau scheduler sees improvements, bad streaks and several
    reductions with cooldowns, without reaching ``min_lr`` early."""
    rng = np.random.default_rng(11)
    level = 1.0 - 0.05 * np.floor(np.arange(n) / 9)  # a 5% drop every 9 steps
    loss = level + 0.004 * rng.standard_normal(n)
    return [float(v) for v in (loss if mode == "min" else 1.0 - loss)]


PLATEAU_ROUND_TRIP = [
    dict(mode="min", threshold_mode="rel", factor=0.7, patience=3, threshold=1e-2, cooldown=3,
         min_lr=1e-3),
    dict(mode="min", threshold_mode="abs", factor=0.6, patience=2, threshold=3e-3, cooldown=2,
         min_lr=2e-3),
    dict(mode="max", threshold_mode="rel", factor=0.8, patience=2, threshold=1e-2, cooldown=4,
         min_lr=1e-3),
    dict(mode="max", threshold_mode="abs", factor=0.5, patience=4, threshold=5e-3, cooldown=1,
         min_lr=1e-3),
]


@pytest.mark.parametrize("kwargs", PLATEAU_ROUND_TRIP)
def test_plateau_round_trip_mid_cooldown_and_mid_patience_matches_torch(kwargs: dict) -> None:
    """Save after *every* step (mid-patience, mid-cooldown, right after a reduction, ...),
    restore into a fresh scheduler built with other hyperparameters, and go on: the lr
    sequence equals the uninterrupted run and torch's ReduceLROnPlateau, whose ``best``,
    ``num_bad_epochs``, ``cooldown_counter`` and ``last_epoch`` ours match at every step."""
    n, base = 90, 0.1
    metrics = plateau_metrics(n, kwargs["mode"])
    ref = torch_lrs(lambda o: tl.ReduceLROnPlateau(o, **kwargs), base, n, metrics)

    topt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    tsched = tl.ReduceLROnPlateau(topt, **kwargs)
    opt = FakeOpt(base)
    sched = ReduceLROnPlateau(opt, **kwargs)
    full, states = [opt.lr], []
    kinds = {"cooldown": 0, "patience": 0}
    for t in range(n):
        states.append(json.loads(json.dumps(sched.state_dict(), allow_nan=False)))
        sched.step(metrics[t])
        tsched.step(metrics[t])
        full.append(opt.lr)
        assert (sched.best, sched.num_bad_epochs, sched.cooldown_counter, sched.last_step) == (
            tsched.best, tsched.num_bad_epochs, tsched.cooldown_counter, tsched.last_epoch)
        if kwargs["min_lr"] < opt.lr < base:
            kinds["cooldown"] += sched.cooldown_counter > 0
            kinds["patience"] += sched.cooldown_counter == 0 and sched.num_bad_epochs > 0
    assert_exact(full, ref)
    # the run is not degenerate: several reductions, and many save points mid-cooldown and
    # mid-patience with lr strictly between min_lr and base
    assert len(set(full)) >= 4
    assert kinds["cooldown"] >= 5 and kinds["patience"] >= 5, kinds

    for t, state in enumerate(states):  # state before step t (t steps taken)
        o = FakeOpt(123.0)
        s = ReduceLROnPlateau(o, mode="min", factor=0.1, patience=10)  # hparams come from state
        s.load_state_dict(state)
        assert o.lr == full[t] and s.last_step == t
        rest = [o.lr]
        for m in metrics[t:]:
            s.step(m)
            rest.append(o.lr)
        assert rest == full[t:], f"resumed after step {t}"


def test_load_state_dict_restores_hyperparameters_and_checks_type() -> None:
    src = StepLR(FakeOpt(0.2), step_size=7, gamma=0.5)
    for _ in range(20):
        src.step()
    opt = FakeOpt(1.0)
    dst = StepLR(opt, step_size=3, gamma=0.9)
    dst.load_state_dict(src.state_dict())
    assert (dst.step_size, dst.gamma, dst.base_lr, dst.last_step) == (7, 0.5, 0.2, 20)
    assert opt.lr == 0.2 * 0.5**2
    with pytest.raises(ValueError, match="StepLR"):
        ExponentialLR(FakeOpt(0.1), 0.9).load_state_dict(src.state_dict())
    bad = src.state_dict() | {"step_size": 0}
    with pytest.raises(ValueError, match="step_size"):
        dst.load_state_dict(bad)
    assert (dst.step_size, dst.last_step, opt.lr) == (7, 20, 0.2 * 0.5**2)  # left untouched
    seq = SequentialLR(opt, [StepLR(opt, 2), ExponentialLR(opt, 0.9)], [5])
    seq_state = seq.state_dict()
    seq_state["schedulers"][1]["gamma"] = -1.0  # invalid nested child state
    with pytest.raises(ValueError, match="gamma"):
        seq.load_state_dict(seq_state)
    assert seq.schedulers[1].gamma == 0.9
    plat = ReduceLROnPlateau(FakeOpt(0.1))
    assert plat.state_dict()["best"] == "inf"  # non-finite floats are encoded as strings
    plat.load_state_dict(json.loads(json.dumps(plat.state_dict(), allow_nan=False)))
    assert plat.best == math.inf


def test_setting_lr_is_cheap_one_call_per_step() -> None:
    opt = FakeOpt(0.1)
    sched = CosineAnnealingLR(opt, 10)
    calls = opt.set_calls
    for _ in range(5):
        sched.step()
    assert opt.set_calls - calls == 5


# --------------------------------------------------------------------------------------------
# hyper-parameter validation
# --------------------------------------------------------------------------------------------

VALIDATION_CASES = [
    (lambda o: StepLR(o, 0), "step_size"),
    (lambda o: StepLR(o, 2.5), "step_size"),  # type: ignore[arg-type]
    (lambda o: StepLR(o, 5, gamma=math.inf), "gamma"),
    (lambda o: StepLR(o, 5, gamma=-1.0), "gamma"),
    (lambda o: MultiStepLR(o, [10, -5]), "milestones"),
    (lambda o: MultiStepLR(o, [0, 5.5]), "milestones"),  # type: ignore[list-item]
    (lambda o: MultiStepLR(o, [5, 10], gamma=-0.5), "gamma"),
    (lambda o: ExponentialLR(o, -0.1), "gamma"),
    (lambda o: ExponentialLR(o, math.nan), "gamma"),
    (lambda o: CosineAnnealingLR(o, 0), "T_max"),
    (lambda o: CosineAnnealingLR(o, -3), "T_max"),
    (lambda o: CosineAnnealingLR(o, 10, eta_min=-1.0), "eta_min"),
    (lambda o: CosineAnnealingLR(o, 10, T_mult=2), "T_mult"),
    (lambda o: CosineAnnealingLR(o, 10.5, warm_restarts=True), "T_max"),
    (lambda o: CosineAnnealingWarmRestarts(o, 0), "T_0"),
    (lambda o: CosineAnnealingWarmRestarts(o, 10, T_mult=0), "T_mult"),
    (lambda o: ReduceLROnPlateau(o, mode="avg"), "mode"),  # type: ignore[arg-type]
    (lambda o: ReduceLROnPlateau(o, factor=1.0), "factor"),
    (lambda o: ReduceLROnPlateau(o, factor=1.5), "factor"),
    (lambda o: ReduceLROnPlateau(o, threshold_mode="x"), "threshold_mode"),  # type: ignore[arg-type]
    (lambda o: ReduceLROnPlateau(o, patience=-1), "patience"),
    (lambda o: ReduceLROnPlateau(o, cooldown=-1), "cooldown"),
    (lambda o: ReduceLROnPlateau(o, min_lr=-1.0), "min_lr"),
    (lambda o: ReduceLROnPlateau(o, threshold=-0.1), "threshold"),
    (lambda o: ReduceLROnPlateau(o, eps=-1.0), "eps"),
    (lambda o: LinearWarmupScheduler(o, -1, 0.0, 0.1), "warmup_steps"),
    (lambda o: LinearWarmupScheduler(o, 5, -0.1, 0.1), "start_lr"),
    (lambda o: LinearWarmupScheduler(o, 5, 0.0, math.inf), "end_lr"),
    (lambda o: OneCycleLR(o, -1.0, 100), "max_lr"),
    (lambda o: OneCycleLR(o, 1.0, 0), "total_steps"),
    (lambda o: OneCycleLR(o, 1.0, 100, pct_start=1.5), "pct_start"),
    (lambda o: OneCycleLR(o, 1.0, 10, pct_start=0.1), "pct_start"),  # torch: 0 / 0 at step 0
    (lambda o: OneCycleLR(o, 1.0, 100, anneal_strategy="exp"), "anneal_strategy"),  # type: ignore[arg-type]
    (lambda o: OneCycleLR(o, 1.0, 100, div_factor=0.0), "div_factor"),
    (lambda o: OneCycleLR(o, 1.0, 100, final_div_factor=-1.0), "final_div_factor"),
    (lambda o: SequentialLR(o, [StepLR(o, 2), StepLR(o, 3)], [-1]), "milestones"),
]


@pytest.mark.parametrize("make,param", VALIDATION_CASES)
def test_hyperparameter_validation(make: Callable, param: str) -> None:
    with pytest.raises(ValueError, match=param):
        make(FakeOpt(0.1))


def test_optimizer_duck_type_is_checked() -> None:
    with pytest.raises(TypeError, match="set_learning_rate"):
        StepLR(object(), 5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-negative"):
        StepLR(FakeOpt(0.1), 5).get_lr_at(-1)


# -- a refused learning rate changes nothing -------------------------------------------------------


def test_exponential_growth_that_overflows_is_a_value_error() -> None:
    from mithril.utils.optimizers import SGD

    opt = SGD(0.1)
    sched = ExponentialLR(opt, gamma=2.0)
    assert sched.get_lr_at(10) == pytest.approx(0.1 * 2.0**10)
    with pytest.raises(ValueError, match="step 2000"):
        sched.get_lr_at(2000)


def test_a_learning_rate_the_optimizer_refuses_leaves_the_scheduler_as_it_was() -> None:
    """A schedule that goes below 0 at step 10 (a LambdaLR, as torch's takes it); a real
    optimizer refuses that lr, and the scheduler must not have advanced."""
    from mithril.utils.optimizers import SGD

    opt = SGD(0.1)
    sched = LambdaLR(opt, lambda t: 1.0 - t / 9.5)
    for _ in range(9):
        sched.step()
    before, lr = sched.state_dict(), opt.get_learning_rate()
    assert sched.get_lr_at(10) < 0
    with pytest.raises(ValueError, match="learning_rate"):
        sched.step()
    assert sched.state_dict() == before and opt.get_learning_rate() == lr


@pytest.mark.parametrize("key, value", [("last_lr", "nan"), ("last_lr", -1.0), ("base_lr", -1.0),
                                        ("base_lr", math.inf)])
def test_load_state_dict_refuses_bad_rates_and_changes_nothing(key: str, value: object) -> None:
    from mithril.utils.optimizers import SGD

    opt = SGD(0.1)
    sched = StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(3):
        sched.step()
    saved, lr = sched.state_dict(), opt.get_learning_rate()
    bad = dict(saved, **{key: value})
    with pytest.raises(ValueError, match=key):
        sched.load_state_dict(bad)
    assert sched.state_dict() == saved and opt.get_learning_rate() == lr
