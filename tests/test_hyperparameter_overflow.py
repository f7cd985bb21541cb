"""Huge integers and other bad hyperparameters give a ValueError / TypeError naming the
argument, never an OverflowError, and a call that raises changes nothing (issue #12).

``float(10**400)`` raises ``OverflowError``; every check that converts a user's number
(optimizer hyperparameters, scheduler arguments, scheduler state dicts, metrics, step
numbers) turns that into a ``ValueError`` saying the value is too large. Integers above
int64's largest are refused everywhere ("too large"). The property tests drive random
sequences of good and bad scheduler calls on a real optimizer.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mithril.utils.lr_schedulers import (
    CosineAnnealingLR,
    CosineAnnealingWarmRestarts,
    ExponentialLR,
    LinearWarmupScheduler,
    LRScheduler,
    MultiStepLR,
    OneCycleLR,
    ReduceLROnPlateau,
    SequentialLR,
    StepLR,
)
from mithril.utils.optimizers import SGD, AdaGrad, Adam, AdamW, RMSProp, clip_gradients

HUGE = 10**400
ALLOWED = (ValueError, TypeError, KeyError)


def big_id(v: Any) -> str | None:
    return f"int_{v.bit_length()}_bits" if isinstance(v, int) and abs(v) > 2**64 else None


# -- optimizers (checks.py) -----------------------------------------------------------------------
OPTIMIZER_ARGS = [
    (SGD, "learning_rate"), (SGD, "momentum"), (SGD, "dampening"), (SGD, "weight_decay"),
    (SGD, "clip_norm"), (SGD, "clip_value"), (Adam, "beta1"), (Adam, "beta2"),
    (Adam, "epsilon"), (AdamW, "weight_decay"), (RMSProp, "decay"), (RMSProp, "epsilon"),
    (RMSProp, "momentum"), (AdaGrad, "epsilon"), (AdaGrad, "initial_accumulator_value"),
    (AdaGrad, "lr_decay"),
]


@pytest.mark.parametrize("value", [HUGE, -HUGE, 10**5000], ids=big_id)
@pytest.mark.parametrize("cls, arg", OPTIMIZER_ARGS)
def test_optimizer_hyperparameter_too_large(cls, arg, value):
    with pytest.raises(ValueError, match=arg) as info:
        cls(**{arg: value})
    assert "too large" in str(info.value) or "must be" in str(info.value)


@pytest.mark.parametrize("cls, arg", OPTIMIZER_ARGS)
def test_optimizer_hyperparameter_of_the_wrong_type(cls, arg):
    for value in ("0.1", b"1", True, [0.1], None if arg not in ("clip_norm", "clip_value") else {}):
        if arg == "momentum" and cls is SGD and not value:
            continue  # SGD treats a falsy momentum as 0
        with pytest.raises(TypeError, match=arg):
            cls(**{arg: value})


def test_set_learning_rate_too_large_changes_nothing():
    opt = Adam(learning_rate=0.01)
    for value, err in [(HUGE, ValueError), (10**5000, ValueError), (2**2000, ValueError),
                       (torch.ones(3), TypeError), ("0.1", TypeError)]:
        with pytest.raises(err, match="learning_rate"):
            opt.set_learning_rate(value)
        assert opt.get_learning_rate() == 0.01
    opt.set_learning_rate(2**62)  # large but a float: accepted as given
    assert opt.get_learning_rate() == float(2**62)


def test_clip_gradients_too_large():
    g = {"w": np.ones(3)}
    for arg in ("clip_norm", "clip_value"):
        with pytest.raises(ValueError, match=f"{arg} is too large"):
            clip_gradients(g, **{arg: HUGE})


@pytest.mark.parametrize("key", ["step", "num_skipped", "num_nonfinite"])
@pytest.mark.parametrize("value", [HUGE, 2**63, -1, True, 1.5], ids=big_id)
def test_optimizer_state_dict_counters(key, value):
    opt = Adam(learning_rate=0.01)
    params = {"w": np.ones(3)}
    state = opt.init(params)
    params, state = opt.update(params, {"w": np.full(3, 0.5)}, state)
    d = opt.state_dict(state)
    with pytest.raises(ValueError, match=f"'{key}'"):
        opt.load_state_dict({**d, key: value}, params)
    ok = opt.load_state_dict({**d, key: 2**63 - 1}, params)
    assert getattr(ok, key) == 2**63 - 1


def test_optimizer_state_dict_hyperparameter_too_large_changes_nothing():
    opt = Adam(learning_rate=0.01)
    d = opt.state_dict()
    bad = {**d, "hyperparameters": {**d["hyperparameters"], "beta2": HUGE}}
    with pytest.raises(ValueError, match="beta2"):
        opt.load_state_dict(bad)
    assert opt.beta2 == 0.999 and opt.get_learning_rate() == 0.01


# -- schedulers -----------------------------------------------------------------------------------
SCHEDULER_ARGS: list[tuple[Callable[[Any, Any], LRScheduler], str]] = [
    (lambda o, v: StepLR(o, v), "step_size"),
    (lambda o, v: StepLR(o, 3, gamma=v), "gamma"),
    (lambda o, v: MultiStepLR(o, [2, v]), r"milestones\[1\]"),
    (lambda o, v: MultiStepLR(o, [2, 5], gamma=v), "gamma"),
    (lambda o, v: ExponentialLR(o, v), "gamma"),
    (lambda o, v: CosineAnnealingLR(o, v), "T_max"),
    (lambda o, v: CosineAnnealingLR(o, v, warm_restarts=True), "T_max"),
    (lambda o, v: CosineAnnealingLR(o, 5, eta_min=v), "eta_min"),
    (lambda o, v: CosineAnnealingWarmRestarts(o, v), "T_0"),
    (lambda o, v: CosineAnnealingWarmRestarts(o, 3, T_mult=v), "T_mult"),
    (lambda o, v: ReduceLROnPlateau(o, factor=v), "factor"),
    (lambda o, v: ReduceLROnPlateau(o, patience=v), "patience"),
    (lambda o, v: ReduceLROnPlateau(o, threshold=v), "threshold"),
    (lambda o, v: ReduceLROnPlateau(o, threshold=v, mode="max"), "threshold"),
    (lambda o, v: ReduceLROnPlateau(o, cooldown=v), "cooldown"),
    (lambda o, v: ReduceLROnPlateau(o, min_lr=v), "min_lr"),
    (lambda o, v: ReduceLROnPlateau(o, eps=v), "eps"),
    (lambda o, v: LinearWarmupScheduler(o, v, 0.0, 0.1), "warmup_steps"),
    (lambda o, v: LinearWarmupScheduler(o, 3, v, 0.1), "start_lr"),
    (lambda o, v: LinearWarmupScheduler(o, 3, 0.0, v), "end_lr"),
    (lambda o, v: OneCycleLR(o, v, 100), "max_lr"),
    (lambda o, v: OneCycleLR(o, 1.0, v), "total_steps"),
    (lambda o, v: OneCycleLR(o, 1.0, 100, pct_start=v), "pct_start"),
    (lambda o, v: OneCycleLR(o, 1.0, 100, div_factor=v), "div_factor"),
    (lambda o, v: OneCycleLR(o, 1.0, 100, final_div_factor=v), "final_div_factor"),
    (lambda o, v: SequentialLR(o, [StepLR(o, 2), StepLR(o, 3)], [v]), r"milestones\[0\]"),
]


@pytest.mark.parametrize("value", [HUGE, 10**5000], ids=big_id)
@pytest.mark.parametrize("make, arg", SCHEDULER_ARGS)
def test_scheduler_argument_too_large(make, arg, value):
    opt = SGD(learning_rate=0.1)
    with pytest.raises(ValueError, match=arg) as info:
        make(opt, value)
    assert "too large" in str(info.value) or "must be" in str(info.value)
    assert opt.get_learning_rate() == 0.1


#: the integer arguments (T_max is one only with warm restarts)
INT_ARGS = [SCHEDULER_ARGS[i] for i in (0, 2, 6, 8, 9, 11, 14, 17, 21, 25)]


@pytest.mark.parametrize("make, arg", INT_ARGS)
def test_scheduler_integer_argument_above_int64(make, arg):
    """2**63 is a fine float but too large for an integer argument (it must fit an int64)."""
    opt = SGD(learning_rate=0.1)
    with pytest.raises(ValueError, match=f"{arg} is too large"):
        make(opt, 2**63)
    assert opt.get_learning_rate() == 0.1


def test_large_but_valid_integers_are_accepted():
    opt = SGD(learning_rate=0.1)
    sched = StepLR(opt, 2**63 - 1)
    for _ in range(3):
        sched.step()
    assert opt.get_learning_rate() == 0.1
    warm = LinearWarmupScheduler(opt, 2**62, 0.0, 1.0)
    warm.step()
    assert opt.get_learning_rate() == 1.0 / 2**62


class DuckOpt:
    def __init__(self, lr: Any) -> None:
        self.lr = lr

    def get_learning_rate(self) -> Any:
        return self.lr

    def set_learning_rate(self, lr: float) -> None:
        self.lr = lr


def test_scheduler_of_an_optimizer_with_a_bad_learning_rate():
    for lr in (HUGE, math.inf, -1.0):
        with pytest.raises(ValueError, match="optimizer's learning rate"):
            StepLR(DuckOpt(lr), 3)


@pytest.mark.parametrize("t", [HUGE, 2**63, -1, 2.5, "3", True, None], ids=big_id)
def test_get_lr_at_bad_step(t):
    sched = CosineAnnealingLR(SGD(learning_rate=0.1), 10)
    with pytest.raises(ValueError, match="step t"):
        sched.get_lr_at(t)
    assert sched.get_lr_at(2**63 - 1) == pytest.approx(
        0.05 * (1 + math.cos(math.pi * float(2**63 - 1) / 10)), rel=1e-12)


@pytest.mark.parametrize("metric, err", [(HUGE, ValueError), (-HUGE, ValueError),
                                         ("0.5", TypeError), (np.ones(3), TypeError),
                                         (torch.ones(2), TypeError), (object(), TypeError),
                                         ([0.5], TypeError)], ids=big_id)
def test_plateau_bad_metric_changes_nothing(metric, err):
    opt = SGD(learning_rate=0.1)
    sched = ReduceLROnPlateau(opt, patience=0)
    sched.step(1.0)
    before = sched.state_dict()
    with pytest.raises(err, match="metric"):
        sched.step(metric)
    assert sched.state_dict() == before and opt.get_learning_rate() == 0.1
    # through a parent that forwards the metric too
    plateau = ReduceLROnPlateau(opt, patience=0)
    warm = LinearWarmupScheduler(opt, 1, 0.0, 0.1, after_scheduler=plateau)
    warm.step(1.0)
    warm.step(1.0)
    before, lr = warm.state_dict(), opt.get_learning_rate()
    with pytest.raises(err, match="metric"):
        warm.step(metric)
    assert warm.state_dict() == before and opt.get_learning_rate() == lr
    sched.step(np.float32(2.0))  # a NumPy scalar or a 0-d tensor is a number
    sched.step(torch.tensor(3.0))
    assert sched.num_bad_epochs == 0 and opt.get_learning_rate() == pytest.approx(0.001)


def test_plateau_reduction_the_optimizer_refuses_changes_nothing():
    class Refusing(DuckOpt):
        def set_learning_rate(self, lr: float) -> None:
            raise ValueError("learning_rate refused")

    opt = Refusing(0.1)
    sched = ReduceLROnPlateau(opt, patience=0, cooldown=2)
    sched.step(1.0)
    before = sched.state_dict()
    with pytest.raises(ValueError, match="refused"):
        sched.step(2.0)  # a bad epoch past patience: a reduction the optimizer refuses
    assert sched.state_dict() == before and before["num_bad_epochs"] == 0
    assert before["last_step"] == 1


def scheduler_factories() -> dict[str, Callable[[Any], LRScheduler]]:
    return {
        "step": lambda o: StepLR(o, 3, 0.5),
        "multistep": lambda o: MultiStepLR(o, [2, 5], 0.5),
        "exponential": lambda o: ExponentialLR(o, 0.9),
        "cosine": lambda o: CosineAnnealingLR(o, 7, 0.001),
        "cosine_float": lambda o: CosineAnnealingLR(o, 6.5, 0.001),
        "restarts": lambda o: CosineAnnealingWarmRestarts(o, 3, 2, 0.001),
        "plateau": lambda o: ReduceLROnPlateau(o, factor=0.5, patience=1, cooldown=1),
        "warmup": lambda o: LinearWarmupScheduler(o, 3, 0.0, 0.1, StepLR(o, 2, 0.5)),
        "warmup_plateau": lambda o: LinearWarmupScheduler(
            o, 2, 0.01, 0.1, ReduceLROnPlateau(o, factor=0.5, patience=0)),
        "one_cycle": lambda o: OneCycleLR(o, 1.0, 6, anneal_strategy="linear"),
        "sequential": lambda o: SequentialLR(
            o, [LinearWarmupScheduler(o, 2, 0.0, 0.1), ReduceLROnPlateau(o, patience=0)], [3]),
    }


def paths(d: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a nested state dict."""
    out = []
    items = d.items() if isinstance(d, dict) else enumerate(d) if isinstance(d, list) else []
    for k, v in items:
        out.append((*prefix, k))
        out.extend(paths(v, (*prefix, k)))
    return out


def with_value(d: Any, path: tuple, value: Any, delete: bool = False) -> Any:
    d = json.loads(json.dumps(d))  # a deep copy
    node = d
    for k in path[:-1]:
        node = node[k]
    if delete and isinstance(node, dict):
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return d


@pytest.mark.parametrize("name", list(scheduler_factories()))
def test_load_state_dict_with_a_huge_int_anywhere_changes_nothing(name):
    opt = SGD(learning_rate=0.1)
    sched = scheduler_factories()[name](opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            sched.step(1.0) if sched.requires_metric else sched.step()
    saved, lr = sched.state_dict(), opt.get_learning_rate()
    assert paths(saved)
    for path in paths(saved):
        for value in (HUGE, -HUGE):
            with pytest.raises(ALLOWED) as info:
                sched.load_state_dict(with_value(saved, path, value))
            assert not isinstance(info.value, OverflowError)
            assert sched.state_dict() == saved and opt.get_learning_rate() == lr, path
    sched.load_state_dict(saved)
    assert sched.state_dict() == saved


# -- property tests: random sequences of scheduler calls ------------------------------------------
GOOD_METRICS = [1.0, 0.5, 2.0, 0.25, math.nan, np.float64(0.75)]
BAD_METRICS = [HUGE, "x", [1.0], np.ones(2), object()]
BAD_VALUES = [HUGE, -HUGE, 2**63, "x", None, math.nan, math.inf, -1, True, [1], {}, 0.5, 7]
BAD_STEPS = [HUGE, 2**63, -1, 2.5, "3", True, None]

OPS = st.one_of(
    st.tuples(st.just("step"), st.none()),
    st.tuples(st.just("step"), st.none()),
    st.tuples(st.just("metric"), st.sampled_from(GOOD_METRICS * 2 + BAD_METRICS)),
    st.tuples(st.just("get_lr_at"), st.sampled_from([0, 3, 10**6] + BAD_STEPS)),
    st.tuples(st.just("mutate"), st.tuples(st.integers(0, 10**6), st.sampled_from(BAD_VALUES),
                                           st.booleans())),
    st.tuples(st.just("reload"), st.integers(0, 10**6)),
    st.tuples(st.just("set_lr"), st.sampled_from([HUGE, -1.0, math.nan, "0.1"])),
)


def snapshot(sched: LRScheduler, opt: SGD) -> tuple[str, str]:
    return json.dumps(sched.state_dict(), sort_keys=True), opt.get_learning_rate().hex()


def check_scheduler_sequence(name: str, ops: list) -> dict[str, int]:
    """Run ``ops``; a call that raises raises a library error and changes neither the
    scheduler nor the optimizer; a huge int always raises; reloading an earlier state dict
    restores it exactly."""
    opt = SGD(learning_rate=0.1)
    sched = scheduler_factories()[name](opt)
    history = [sched.state_dict()]
    stats = {"calls": 0, "raised": 0}
    for op, arg in ops:
        before = snapshot(sched, opt)
        must_raise = False
        stats["calls"] += 1
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if op == "step":
                    sched.step(1.0) if sched.requires_metric else sched.step()
                elif op == "metric":
                    if sched.requires_metric or isinstance(sched, (LinearWarmupScheduler,
                                                                   SequentialLR)):
                        must_raise = any(arg is m for m in BAD_METRICS)
                        sched.step(arg)  # type: ignore[call-arg]
                elif op == "get_lr_at":
                    must_raise = any(arg is t for t in BAD_STEPS)
                    sched.get_lr_at(arg)
                elif op == "mutate":
                    i, value, delete = arg
                    base = history[i % len(history)]
                    path = paths(base)[i % len(paths(base))]
                    node = base
                    for k in path[:-1]:
                        node = node[k]
                    deleted = delete and isinstance(node, dict)  # as with_value does
                    # no float can hold them (a deleted key is not given the value)
                    must_raise = not deleted and (value is HUGE or value == -HUGE)
                    sched.load_state_dict(with_value(base, path, value, delete))
                elif op == "reload":
                    base = history[arg % len(history)]
                    sched.load_state_dict(base)
                    assert sched.state_dict() == base
                    assert opt.get_learning_rate() == sched.get_last_lr()
                else:
                    must_raise = True
                    opt.set_learning_rate(arg)
        except ALLOWED as e:
            stats["raised"] += 1
            assert not isinstance(e, OverflowError)
            assert snapshot(sched, opt) == before, f"{op} {arg!r} changed the state"
            continue
        except NotImplementedError:  # get_lr_at of a plateau phase (documented)
            assert op == "get_lr_at" and not must_raise
            assert snapshot(sched, opt) == before
            continue
        assert not must_raise, f"{op} {arg!r} was accepted"
        history.append(sched.state_dict())
        # whatever was accepted is a state that round-trips
        saved = sched.state_dict()
        sched.load_state_dict(saved)
        assert sched.state_dict() == saved and opt.get_learning_rate() == sched.get_last_lr()
    return stats


NAMES = list(scheduler_factories())


@settings(derandomize=True, max_examples=100, deadline=None)
@given(name=st.sampled_from(NAMES), ops=st.lists(OPS, min_size=1, max_size=12))
def test_property_scheduler_calls_are_all_or_nothing(name, ops):
    check_scheduler_sequence(name, ops)


@pytest.mark.slow
@settings(derandomize=True, max_examples=1000, deadline=None)
@given(name=st.sampled_from(NAMES), ops=st.lists(OPS, min_size=1, max_size=25))
def test_slow_property_scheduler_calls_are_all_or_nothing(name, ops):
    check_scheduler_sequence(name, ops)
