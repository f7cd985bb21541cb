"""Tests for ``mithril.utils.lr_schedulers``.

Every schedule is compared value by value against ``torch.optim.lr_scheduler`` run side by side
on ``torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)``.

Tolerance: where PyTorch uses a closed form (``OneCycleLR``, ``CosineAnnealingWarmRestarts``)
or plain comparisons and multiplications (``ReduceLROnPlateau``) the values must be *exactly*
equal. Where PyTorch's formula is recursive (``StepLR``, ``MultiStepLR``, ``ExponentialLR``,
``CosineAnnealingLR``, ``LinearLR``, and ``SequentialLR`` built from them) while ours is a closed
form, the two differ by the rounding of the recursion, so we require
``|ours - torch| <= 1e-12 * max(|ours|, |torch|)`` (purely relative, no absolute slack; the
observed worst case over 300 steps is ~3e-13, for CosineAnnealingLR; the recursion's error
grows with the number of steps). A non-integer ``T_max`` within ~1e-7 of an integer makes
torch's recursion ill-conditioned (2e-5 relative drift, or ZeroDivisionError): there ours is
compared with torch's own closed form instead (see
``test_cosine_t_max_near_an_integer_is_the_closed_form_not_torchs_recursion``).

State dicts, argument checks and refused learning rates: ``test_lr_scheduler_state.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scheduler_parity import (
    FakeOpt,
    assert_exact,
    assert_rel,
    noisy_metric,
    our_lrs,
    torch_lrs,
)
from torch.optim import lr_scheduler as tl

from mithril.utils.lr_schedulers import (
    CosineAnnealingLR,
    CosineAnnealingWarmRestarts,
    ExponentialLR,
    LinearWarmupScheduler,
    MultiStepLR,
    OneCycleLR,
    ReduceLROnPlateau,
    SequentialLR,
    StepLR,
)
from mithril.utils.optimizers import SGD

# --------------------------------------------------------------------------------------------
# simple schedules vs torch
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("step_size,gamma", [(1, 0.9), (7, 0.5), (30, 0.1), (11, 1.5)])
def test_step_lr_matches_torch(step_size: int, gamma: float) -> None:
    n, base = 250, 0.1
    ours = our_lrs(lambda o: StepLR(o, step_size, gamma), base, n)
    ref = torch_lrs(lambda o: tl.StepLR(o, step_size, gamma), base, n)
    assert_rel(ours, ref)
    # closed form, exactly
    assert ours == [base * gamma ** (t // step_size) for t in range(n + 1)]


@pytest.mark.parametrize("milestones,gamma", [([10, 50, 51, 200], 0.5), ([1], 0.1), ([99], 2.0)])
def test_multistep_lr_matches_torch(milestones: list[int], gamma: float) -> None:
    n, base = 250, 0.3
    ours = our_lrs(lambda o: MultiStepLR(o, milestones, gamma), base, n)
    ref = torch_lrs(lambda o: tl.MultiStepLR(o, milestones, gamma), base, n)
    assert_rel(ours, ref)


@pytest.mark.parametrize("gamma", [0.99, 0.9, 1.01])
def test_exponential_lr_matches_torch(gamma: float) -> None:
    n, base = 300, 0.05
    ours = our_lrs(lambda o: ExponentialLR(o, gamma), base, n)
    ref = torch_lrs(lambda o: tl.ExponentialLR(o, gamma), base, n)
    assert_rel(ours, ref)


@pytest.mark.parametrize("T_max", [10, 37, 100])
@pytest.mark.parametrize("eta_min", [0.0, 1e-3])
def test_cosine_matches_torch_including_beyond_t_max(T_max: int, eta_min: float) -> None:
    n, base = 300, 0.1  # 300 >= 3 * T_max: covers the rise after T_max and a second minimum
    ours = our_lrs(lambda o: CosineAnnealingLR(o, T_max, eta_min), base, n)
    ref = torch_lrs(lambda o: tl.CosineAnnealingLR(o, T_max, eta_min), base, n)
    assert_rel(ours, ref)
    # documented behaviour past T_max: minimum at T_max, back to base at 2 T_max, period 2 T_max
    assert ours[T_max] == pytest.approx(eta_min, abs=1e-15)
    assert ours[2 * T_max] == pytest.approx(base, rel=1e-15)
    assert ours[T_max + 1] > ours[T_max]
    for t in range(n + 1 - 2 * T_max):
        assert ours[t + 2 * T_max] == pytest.approx(ours[t], rel=1e-9, abs=1e-15)


def torch_cosine_closed_form(T_max: float, eta_min: float, base: float, n: int) -> list[float]:
    """torch's own closed form (``CosineAnnealingLR._get_closed_form_lr``, what it uses for
    ``step(epoch)``) at ``t = 0..n``."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    sched = tl.CosineAnnealingLR(opt, T_max, eta_min)
    out = []
    for t in range(n + 1):
        sched.last_epoch = t
        out.append(float(sched._get_closed_form_lr()[0]))
    return out


@pytest.mark.parametrize("T_max", [2.5, 7.3, 9.99, 10.5, 37.77])
@pytest.mark.parametrize("eta_min", [0.0, 1e-3])
def test_cosine_non_integer_t_max_matches_torch(T_max: float, eta_min: float) -> None:
    """A real ``T_max`` is accepted (as by torch). Ours is the closed form, bit for bit torch's
    ``_get_closed_form_lr``; torch's stepped (recursive) values agree to ``REL_TOL`` here. For
    a non-integer ``T_max`` torch's special case at the minimum never fires, which is harmless
    while ``t / T_max`` stays away from odd integers (these ``T_max``); see the next test."""
    n, base = 300, 0.1
    ours = our_lrs(lambda o: CosineAnnealingLR(o, T_max, eta_min), base, n)
    assert_exact(ours, torch_cosine_closed_form(T_max, eta_min, base, n))
    assert_rel(ours, torch_lrs(lambda o: tl.CosineAnnealingLR(o, T_max, eta_min), base, n))
    assert all(eta_min <= v <= base for v in ours)


@pytest.mark.parametrize("T_max", [3.0000001, 10.000001, 9.999999, 10 + 1e-9])
def test_cosine_t_max_near_an_integer_is_the_closed_form_not_torchs_recursion(
    T_max: float,
) -> None:
    """Intended difference from torch's *stepped* ``CosineAnnealingLR``.

    torch steps ``lr_t = eta_min + (lr_{t-1} - eta_min) * (1 + cos(pi t / T)) / (1 + cos(pi (t-1)
    / T))``. When ``(t - 1) / T_max`` is within ~1e-7 of an odd integer but ``T_max`` is not an
    integer (so torch's special case for the minimum does not fire), the denominator cancels
    to ~1e-14 and, with ``eta_min > 0``, the rounding error of ``lr_{t-1} - eta_min`` is
    amplified: measured with torch 2.13, base 0.1, eta_min 1e-3, T_max = 10.000001, torch's lr at
    t = 20 is 0.10000232 (2.3e-5 relative above the exact 0.1, i.e. above base_lr, which the
    cosine never exceeds), and for ``T_max = 10 + 1e-9`` the denominator is exactly 0 and torch
    raises ZeroDivisionError. Ours is the closed form at every step (no error accumulates):
    equal to torch's own closed form, always within ``[eta_min, base_lr]``, and as close to
    the integer-``T_max`` schedule as the (tiny) change of ``T_max`` allows.
    """
    n, base, eta_min = 300, 0.1, 1e-3
    ours = our_lrs(lambda o: CosineAnnealingLR(o, T_max, eta_min), base, n)
    assert_exact(ours, torch_cosine_closed_form(T_max, eta_min, base, n))
    assert all(eta_min <= v <= base for v in ours)
    near = our_lrs(lambda o: CosineAnnealingLR(o, round(T_max), eta_min), base, n)
    # |d lr / d T_max| <= (base - eta_min) / 2 * pi * t / T_max^2
    bound = (base - eta_min) / 2 * math.pi * n / T_max**2 * abs(T_max - round(T_max))
    assert max(abs(a - b) for a, b in zip(ours, near, strict=True)) <= bound + 1e-15


@pytest.mark.parametrize("T_0,T_mult", [(10, 1), (10, 2), (7, 2), (5, 3)])
def test_cosine_warm_restarts_matches_torch_exactly(T_0: int, T_mult: int) -> None:
    n, base, eta_min = 300, 0.1, 1e-4
    ref = torch_lrs(lambda o: tl.CosineAnnealingWarmRestarts(o, T_0, T_mult, eta_min), base, n)
    ours = our_lrs(lambda o: CosineAnnealingWarmRestarts(o, T_0, T_mult, eta_min), base, n)
    assert_exact(ours, ref)
    via_flag = our_lrs(
        lambda o: CosineAnnealingLR(o, T_0, eta_min, warm_restarts=True, T_mult=T_mult), base, n
    )
    assert_exact(via_flag, ref)


# --------------------------------------------------------------------------------------------
# ReduceLROnPlateau vs torch
# --------------------------------------------------------------------------------------------

PLATEAU_CASES = [
    dict(mode="min", threshold_mode="rel", factor=0.5, patience=5),
    dict(mode="min", threshold_mode="abs", factor=0.5, patience=3, threshold=1e-3),
    dict(mode="max", threshold_mode="rel", factor=0.3, patience=4, threshold=1e-2),
    dict(mode="max", threshold_mode="abs", factor=0.7, patience=2, threshold=5e-3),
    dict(mode="min", threshold_mode="rel", factor=0.5, patience=2, cooldown=5),
    dict(mode="max", threshold_mode="abs", factor=0.1, patience=1, cooldown=3, min_lr=1e-4),
    dict(mode="min", threshold_mode="rel", factor=0.5, patience=0, min_lr=0.0123),
    dict(mode="min", threshold_mode="rel", factor=0.9, patience=0, eps=1e-3),
    # cooldown with the two remaining (mode, threshold_mode) combinations
    dict(mode="min", threshold_mode="abs", factor=0.5, patience=1, threshold=2e-3, cooldown=4),
    dict(mode="max", threshold_mode="rel", factor=0.6, patience=1, threshold=5e-3, cooldown=3,
         min_lr=1e-3),
]


@pytest.mark.parametrize("kwargs", PLATEAU_CASES)
def test_reduce_on_plateau_matches_torch_exactly(kwargs: dict) -> None:
    n, base = 300, 0.1
    metrics = noisy_metric(n, seed=len(str(kwargs)))
    if kwargs["mode"] == "max":
        metrics = [2.0 - m for m in metrics]  # an accuracy-like curve
    ref = torch_lrs(lambda o: tl.ReduceLROnPlateau(o, **kwargs), base, n, metrics)
    ours = our_lrs(lambda o: ReduceLROnPlateau(o, **kwargs), base, n, metrics)
    assert_exact(ours, ref)
    assert len(set(ours)) >= 3, "the metric sequence should trigger several reductions"
    if kwargs.get("cooldown"):  # the cooldown changed the schedule
        no_cooldown = {**kwargs, "cooldown": 0}
        assert our_lrs(lambda o: ReduceLROnPlateau(o, **no_cooldown), base, n, metrics) != ours
    if "min_lr" in kwargs:
        # reached the floor (possibly a few ulps above it: the eps rule skips tiny reductions)
        assert ours[-1] == pytest.approx(kwargs["min_lr"], rel=1e-12)


def test_reduce_on_plateau_without_metric_warns_and_changes_nothing() -> None:
    opt = FakeOpt(0.1)
    sched = ReduceLROnPlateau(opt, patience=0)
    for _ in range(3):
        with pytest.warns(RuntimeWarning, match="without the monitored metric"):
            sched.step()
    assert sched.last_step == 0 and sched.num_bad_epochs == 0 and opt.get_learning_rate() == 0.1
    sched.step(np.float64(1.0))  # anything float() accepts
    assert sched.best == 1.0 and sched.last_step == 1
    with pytest.raises(NotImplementedError):
        sched.get_lr_at(1)


# --------------------------------------------------------------------------------------------
# OneCycleLR vs torch
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("anneal_strategy", ["cos", "linear"])
@pytest.mark.parametrize("three_phase", [False, True])
@pytest.mark.parametrize(
    "total_steps,pct_start,div_factor,final_div_factor",
    [(250, 0.3, 25.0, 1e4), (101, 0.25, 10.0, 100.0), (200, 0.45, 5.0, 1e3)],
)
def test_one_cycle_matches_torch_exactly(
    anneal_strategy: str,
    three_phase: bool,
    total_steps: int,
    pct_start: float,
    div_factor: float,
    final_div_factor: float,
) -> None:
    max_lr = 0.8
    kw = dict(
        pct_start=pct_start,
        anneal_strategy=anneal_strategy,
        div_factor=div_factor,
        final_div_factor=final_div_factor,
        three_phase=three_phase,
    )
    # torch allows exactly total_steps calls to step() after construction
    ref = torch_lrs(lambda o: tl.OneCycleLR(o, max_lr, total_steps, **kw), 123.0, total_steps)
    ours = our_lrs(lambda o: OneCycleLR(o, max_lr, total_steps, **kw), 123.0, total_steps)
    if anneal_strategy == "linear":  # step total_steps: torch extrapolates below min_lr
        min_lr = max_lr / div_factor / final_div_factor
        assert ref[-1] < min_lr and ours[-1] == pytest.approx(min_lr, rel=1e-9)
        ours, ref = ours[:-1], ref[:-1]
    assert_exact(ours, ref)
    # t=0 is evaluated through the annealing formula (as in torch): initial_lr up to rounding
    assert ours[0] == pytest.approx(max_lr / div_factor, rel=1e-15)
    # the peak is at step pct_start * total_steps - 1 (reached exactly when that is an integer)
    peak_step = pct_start * total_steps - 1
    assert int(np.argmax(ours)) == math.floor(peak_step)
    if peak_step == int(peak_step):
        assert max(ours) == max_lr


@pytest.mark.parametrize("three_phase", [False, True])
def test_one_cycle_linear_last_step_of_a_loop_keeps_a_valid_rate(three_phase: bool) -> None:
    """torch's loop (``scheduler.step()`` after each of ``total_steps`` updates) with a real
    optimizer: torch's last step extrapolates the linear phase to a negative rate (never
    used); ours holds ``min_lr`` and ``max_momentum`` there, and every earlier rate and
    momentum is torch's."""
    total, max_lr = 100, 0.1
    w = torch.zeros(1, requires_grad=True)
    topt = torch.optim.SGD([w], lr=max_lr, momentum=0.9)
    tsched = tl.OneCycleLR(topt, max_lr, total, anneal_strategy="linear", three_phase=three_phase)
    opt = SGD(learning_rate=max_lr, momentum=0.9)
    sched = OneCycleLR(opt, max_lr, total, anneal_strategy="linear", three_phase=three_phase,
                       cycle_momentum=True)
    for t in range(1, total + 1):
        topt.step()
        tsched.step()
        sched.step()
        if t < total:
            assert opt.learning_rate == topt.param_groups[0]["lr"], t
            assert opt.momentum == topt.param_groups[0]["momentum"], t
    assert topt.param_groups[0]["lr"] < 0
    assert opt.learning_rate == pytest.approx(max_lr / 25.0 / 1e4, rel=1e-9)
    assert opt.momentum == pytest.approx(0.95, rel=1e-12)
    assert sched.get_lr_at(total) == opt.learning_rate


def test_one_cycle_epochs_and_steps_per_epoch_as_torch() -> None:
    """torch's ``OneCycleLR(opt, max_lr, epochs=e, steps_per_epoch=n)``: a cycle of e·n
    steps, the same rates; missing or disagreeing counts are refused before anything is
    set (torch silently keeps ``total_steps`` when both are given)."""
    kw = dict(epochs=4, steps_per_epoch=13, pct_start=0.25)
    ref = torch_lrs(lambda o: tl.OneCycleLR(o, 0.5, **kw), 0.1, 52)
    ours = our_lrs(lambda o: OneCycleLR(o, 0.5, **kw), 0.1, 52)
    assert_exact(ours, ref)
    per_group = OneCycleLR(SGD(0.1), [0.5], epochs=4, steps_per_epoch=13, per_group=True)
    assert per_group.total_steps == 52
    opt = FakeOpt(0.1)
    for bad, match in [({}, "needs total_steps"), ({"epochs": 4}, "together"),
                       ({"total_steps": 50, "epochs": 4, "steps_per_epoch": 13},
                        "total_steps=50 but epochs"),
                       ({"epochs": 0, "steps_per_epoch": 13}, "epochs")]:
        with pytest.raises(ValueError, match=match):
            OneCycleLR(opt, 0.5, **bad)
        assert opt.lr == 0.1


def test_one_cycle_stepping_past_total_steps_raises_like_torch() -> None:
    total = 20
    topt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    tsched = tl.OneCycleLR(topt, 1.0, total)
    opt = FakeOpt(0.1)
    sched = OneCycleLR(opt, 1.0, total)
    for _ in range(total):
        topt.step()
        tsched.step()
        sched.step()
    assert opt.lr == topt.param_groups[0]["lr"]
    with pytest.raises(ValueError):
        tsched.step()
    with pytest.raises(ValueError, match="total steps"):
        sched.step()
    assert sched.last_step == total and opt.lr == sched.get_last_lr()  # state untouched
    with pytest.raises(ValueError):
        sched.get_lr_at(total + 1)


# --------------------------------------------------------------------------------------------
# LinearWarmupScheduler vs torch LinearLR (+ SequentialLR)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("warmup_steps,start_lr", [(20, 0.01), (1, 0.05), (57, 0.001)])
def test_linear_warmup_alone_matches_torch_linear_lr(warmup_steps: int, start_lr: float) -> None:
    n, end_lr = 200, 0.1
    ref = torch_lrs(
        lambda o: tl.LinearLR(o, start_lr / end_lr, 1.0, total_iters=warmup_steps), end_lr, n
    )
    ours = our_lrs(lambda o: LinearWarmupScheduler(o, warmup_steps, start_lr, end_lr), 7.0, n)
    assert_rel(ours, ref)
    assert ours[0] == start_lr and all(v == end_lr for v in ours[warmup_steps:])


@pytest.mark.parametrize(
    "make_after,make_torch_after",
    [
        (lambda o: CosineAnnealingLR(o, 100, 1e-4), lambda o: tl.CosineAnnealingLR(o, 100, 1e-4)),
        (lambda o: StepLR(o, 15, 0.5), lambda o: tl.StepLR(o, 15, 0.5)),
        (lambda o: ExponentialLR(o, 0.98), lambda o: tl.ExponentialLR(o, 0.98)),
    ],
)
def test_linear_warmup_then_after_scheduler_matches_torch_sequential(
    make_after: Callable, make_torch_after: Callable
) -> None:
    n, W, start_lr, end_lr = 250, 20, 0.01, 0.1

    def make_torch(o: torch.optim.Optimizer) -> tl.SequentialLR:
        warm = tl.LinearLR(o, start_lr / end_lr, 1.0, total_iters=W)
        return tl.SequentialLR(o, [warm, make_torch_after(o)], milestones=[W])

    ref = torch_lrs(make_torch, end_lr, n)
    # the optimizer's initial lr (0.5) is irrelevant: the after-scheduler is re-based to end_lr
    ours = our_lrs(lambda o: LinearWarmupScheduler(o, W, start_lr, end_lr, make_after(o)), 0.5, n)
    assert_rel(ours, ref)
    assert ours[W] == end_lr


def test_linear_warmup_zero_steps_and_rebase() -> None:
    opt = FakeOpt(0.5)
    after = ExponentialLR(opt, 0.5)
    assert after.base_lr == 0.5
    warm = LinearWarmupScheduler(opt, 0, 0.0, 0.2, after_scheduler=after)
    assert after.base_lr == 0.2
    assert opt.lr == 0.2
    warm.step()
    warm.step()
    assert opt.lr == 0.2 * 0.5**2 == warm.get_lr_at(2)
    plain = LinearWarmupScheduler(FakeOpt(1.0), 4, 0.0, 0.2)
    assert [plain.get_lr_at(t) for t in range(6)] == [0.0, 0.05, 0.1, 0.15000000000000002, 0.2, 0.2]


def test_linear_warmup_with_plateau_after_scheduler() -> None:
    opt = FakeOpt(1.0)
    plat = ReduceLROnPlateau(opt, factor=0.5, patience=0, threshold=0.0)
    warm = LinearWarmupScheduler(opt, 2, 0.0, 0.4, after_scheduler=plat)
    assert warm.requires_metric and opt.lr == 0.0
    warm.step()  # no metric needed during warm-up
    assert opt.lr == 0.2
    warm.step(123.0)  # end of warm-up: plateau restarts at end_lr, metric not observed
    assert opt.lr == 0.4 and plat.best == math.inf
    warm.step(1.0)
    assert opt.lr == 0.4 and plat.best == 1.0
    warm.step(1.0)  # not better -> bad epoch 1 > patience 0 -> halve
    assert opt.lr == 0.2 and warm.get_last_lr() == 0.2
    with pytest.warns(RuntimeWarning, match="metric"):
        warm.step()
    assert warm.last_step == 4 and opt.lr == 0.2


# --------------------------------------------------------------------------------------------
# SequentialLR
# --------------------------------------------------------------------------------------------


def test_sequential_matches_torch() -> None:
    n, base = 300, 0.1

    def make_torch(o: torch.optim.Optimizer) -> tl.SequentialLR:
        a = tl.LinearLR(o, 0.1, 1.0, total_iters=10)
        b = tl.CosineAnnealingLR(o, 60, 1e-3)
        c = tl.ExponentialLR(o, 0.97)
        d = tl.StepLR(o, 25, 0.5)
        return tl.SequentialLR(o, [a, b, c, d], milestones=[10, 100, 170])

    def make_ours(o: FakeOpt) -> SequentialLR:
        a = LinearWarmupScheduler(o, 10, 0.01, 0.1)
        b = CosineAnnealingLR(o, 60, 1e-3)
        c = ExponentialLR(o, 0.97)
        d = StepLR(o, 25, 0.5)
        return SequentialLR(o, [a, b, c, d], milestones=[10, 100, 170])

    ref = torch_lrs(make_torch, base, n)
    ours = our_lrs(make_ours, base, n)
    assert_rel(ours, ref)
    # closed form agrees with stepping
    opt = FakeOpt(base)
    sched = make_ours(opt)
    assert all(sched.get_lr_at(t) == ours[t] for t in range(n + 1))
    assert opt.lr == ours[0] and sched.last_step == 0  # get_lr_at is pure


def test_sequential_of_one_cycle_and_warm_restarts_matches_torch_exactly() -> None:
    n, base = 260, 0.1

    def make_torch(o: torch.optim.Optimizer) -> tl.SequentialLR:
        a = tl.CosineAnnealingWarmRestarts(o, 8, 2, 1e-4)
        b = tl.StepLR(o, 1000, 0.5)
        return tl.SequentialLR(o, [a, b], milestones=[120])

    def make_ours(o: FakeOpt) -> SequentialLR:
        return SequentialLR(o, [CosineAnnealingWarmRestarts(o, 8, 2, 1e-4), StepLR(o, 1000)], [120])

    assert_exact(our_lrs(make_ours, base, n), torch_lrs(make_torch, base, n))


def test_sequential_with_plateau_child_hand_computed() -> None:
    opt = FakeOpt(0.1)
    warm = LinearWarmupScheduler(opt, 4, 0.0, 0.1)
    plat = ReduceLROnPlateau(opt, factor=0.5, patience=1, threshold=0.0)
    tail = ExponentialLR(opt, 0.5)
    # warm's construction set the lr to 0.0; SequentialLR re-bases every child to 0.1
    assert plat.base_lr == 0.0 and tail.base_lr == 0.0
    seq = SequentialLR(opt, [warm, plat, tail], milestones=[4, 12])
    assert plat.base_lr == tail.base_lr == 0.1 and seq.requires_metric
    assert opt.lr == 0.0
    assert [seq.get_lr_at(t) for t in range(4)] == [0.0, 0.025, 0.05, 0.07500000000000001]
    with pytest.raises(NotImplementedError):
        seq.get_lr_at(5)

    lrs = []
    for _ in range(3):
        seq.step()  # no metric needed while the warm-up is active
        lrs.append(opt.lr)
    # t=4: milestone -> plateau restarts at base_lr, the metric (from the warm-up) is ignored
    # t=5..10: metrics; patience=1 -> reduce by 0.5 on the 2nd consecutive non-improvement
    for m in [9.0, 1.0, 1.0, 1.0, 0.5, 0.6, 0.6]:
        seq.step(m)
        lrs.append(opt.lr)
    assert lrs == [0.025, 0.05, 0.07500000000000001, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025]
    assert seq.last_step == 10 and plat.last_step == 6 and plat.best == 0.5
    assert seq.get_last_lr() == 0.025
    with pytest.warns(RuntimeWarning, match="metric"):
        seq.step()  # plateau active: without a metric nothing advances
    assert seq.last_step == 10 and opt.lr == 0.025
    seq.step(0.55)  # t=11: not better than 0.5, but only 1 bad epoch since the reduction
    assert opt.lr == 0.025 and plat.num_bad_epochs == 1
    seq.step(0.1)  # t=12: milestone of the exponential tail (restarts at base 0.1)
    assert opt.lr == 0.1 and plat.best == 0.5  # the metric was not observed
    seq.step()  # metric optional again
    seq.step(42.0)  # and ignored
    assert [opt.lr, seq.last_step, tail.last_step] == [0.1 * 0.5**2, 14, 2]
    assert seq.get_lr_at(14) == opt.lr


def test_sequential_rejects_foreign_or_bad_children() -> None:
    opt, other = FakeOpt(0.1), FakeOpt(0.1)
    a = StepLR(opt, 5)
    with pytest.raises(ValueError, match="same optimizer"):
        SequentialLR(opt, [a, StepLR(other, 5)], milestones=[3])
    with pytest.raises(ValueError, match="milestones"):
        SequentialLR(opt, [a, StepLR(opt, 5)], milestones=[3, 4])
    with pytest.raises(ValueError, match="milestones"):
        SequentialLR(opt, [a, StepLR(opt, 5), StepLR(opt, 5)], milestones=[4, 3])
    with pytest.raises(ValueError, match="distinct"):
        SequentialLR(opt, [a, a], milestones=[3])
    with pytest.raises(ValueError, match="at least one"):
        SequentialLR(opt, [], milestones=[])
    with pytest.raises(TypeError):
        SequentialLR(opt, [a, object()], milestones=[3])  # type: ignore[list-item]


# --------------------------------------------------------------------------------------------
# property tests
# --------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    base=st.floats(1e-5, 1.0),
    step_size=st.integers(1, 60),
    gamma=st.floats(0.05, 1.5),
    n=st.integers(1, 250),
)
def test_property_step_lr_equals_torch(base: float, step_size: int, gamma: float, n: int) -> None:
    ours = our_lrs(lambda o: StepLR(o, step_size, gamma), base, n)
    assert_rel(ours, torch_lrs(lambda o: tl.StepLR(o, step_size, gamma), base, n))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    base=st.floats(1e-4, 1.0),
    T_max=st.integers(1, 120),
    eta_frac=st.sampled_from([0.0, 0.001, 0.1, 0.5]),
    n=st.integers(1, 300),
)
def test_property_cosine_equals_torch(base: float, T_max: int, eta_frac: float, n: int) -> None:
    eta_min = base * eta_frac
    ours = our_lrs(lambda o: CosineAnnealingLR(o, T_max, eta_min), base, n)
    assert_rel(ours, torch_lrs(lambda o: tl.CosineAnnealingLR(o, T_max, eta_min), base, n))


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    base=st.floats(1e-4, 1.0),
    T_0=st.integers(1, 40),
    T_mult=st.integers(1, 3),
    n=st.integers(1, 250),
)
def test_property_warm_restarts_equal_torch(base: float, T_0: int, T_mult: int, n: int) -> None:
    ours = our_lrs(lambda o: CosineAnnealingWarmRestarts(o, T_0, T_mult, 1e-5), base, n)
    ref = torch_lrs(lambda o: tl.CosineAnnealingWarmRestarts(o, T_0, T_mult, 1e-5), base, n)
    assert_exact(ours, ref)


#: metric values: mostly a few levels whose sums and products with the thresholds 0.25 / 0.5
#: are exact, so ties and metrics exactly on the threshold edge are frequent; else any float,
#: inf and NaN included
_LEVELS = [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, -0.5, -1.0]
_METRIC = st.one_of(
    st.sampled_from(_LEVELS),
    st.sampled_from(_LEVELS),
    st.floats(-10.0, 10.0),
    st.floats(allow_nan=True, allow_infinity=True),
)


@st.composite
def plateau_setups(draw: st.DrawFn) -> tuple[dict, float, list[float]]:
    mode = draw(st.sampled_from(["min", "max"]))
    threshold_mode = draw(st.sampled_from(["rel", "abs"]))
    hi = 0.5 if (mode, threshold_mode) == ("min", "rel") else 2.0  # ours: < 1 for min/rel
    # powers of two and halves make lr - lr * factor land exactly on eps / min_lr now and then
    base = draw(st.one_of(st.sampled_from([1.0, 0.5, 0.1]), st.floats(1e-6, 10.0)))
    kwargs = dict(
        mode=mode,
        threshold_mode=threshold_mode,
        factor=draw(st.one_of(st.sampled_from([0.0, 0.5, 0.25]), st.floats(0.0, 0.999))),
        patience=draw(st.integers(0, 5)),
        threshold=draw(st.one_of(st.sampled_from([0.0, 0.25, 0.5, 1e-4]), st.floats(0.0, hi))),
        cooldown=draw(st.integers(0, 5)),
        min_lr=draw(st.one_of(st.sampled_from([0.0, base / 4, base / 8]), st.floats(0.0, base))),
        eps=draw(st.sampled_from([0.0, 1e-8, 1e-3, 0.05, 0.125, 0.25])),
    )
    return kwargs, base, draw(st.lists(_METRIC, min_size=1, max_size=60))


@settings(max_examples=400, deadline=None, derandomize=True)
@given(setup=plateau_setups())
def test_property_reduce_on_plateau_equals_torch(setup: tuple[dict, float, list[float]]) -> None:
    """Random hyperparameters (every mode / threshold_mode, patience and cooldown 0-5, factor
    0 included, min_lr up to base, eps up to 0.25) and metric sequences (ties, metrics exactly
    on the threshold edge, reductions exactly equal to eps, inf, NaN): the lr sequence is
    exactly torch's. (Mutating any comparison of the rule - ``<`` for ``<=``, ``>`` for ``>=``
    in the eps test, the rounding of ``best * (1 + threshold)``, the order of the cooldown
    update - makes this fail.)"""
    kwargs, base, metrics = setup
    n = len(metrics)
    ref = torch_lrs(lambda o: tl.ReduceLROnPlateau(o, **kwargs), base, n, metrics)
    assert_exact(our_lrs(lambda o: ReduceLROnPlateau(o, **kwargs), base, n, metrics), ref)


# --------------------------------------------------------------------------------------------
# real optimizer
# --------------------------------------------------------------------------------------------


def test_step_lr_drives_mithril_sgd() -> None:
    from mithril.utils.optimizers import SGD

    opt = SGD(learning_rate=0.1)
    sched = StepLR(opt, step_size=3, gamma=0.5)
    lrs = [opt.get_learning_rate()]
    for _ in range(9):
        sched.step()
        lrs.append(opt.get_learning_rate())
    assert lrs == pytest.approx([0.1] * 3 + [0.05] * 3 + [0.025] * 3 + [0.0125], rel=1e-15)
