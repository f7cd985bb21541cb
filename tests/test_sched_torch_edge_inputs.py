"""Inputs torch 2.x takes that ours used to refuse, against ``torch.optim.lr_scheduler`` run
the same way in the same test (float64, ``1e-12`` relative, every step and ``get_lr_at``):
a ``SequentialLR`` / ``JoinSchedules`` milestone 0 or a repeated one (a child of no steps),
``MultiStepLR`` milestones unsorted, repeated (``gamma`` once per repeat: torch's
``Counter``) or 0, ``gamma = 0``, ``OneCycleLR`` with ``pct_start`` 0 or 1 (a phase of no
steps), ``CyclicLR`` with fractional step sizes or ``exp_range`` ``gamma = 0``. Where torch's
result is no schedule - it divides by zero (``OneCycleLR`` with a reached phase of length 0,
``CyclicLR`` ``step_size_up = 0``) or its ``step()`` contradicts its own closed form
(``total_iters = 0``) - ours refuses, saying so, and changes nothing.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from scheduler_parity import FakeOpt, assert_rel, torch_lrs
from torch.optim import lr_scheduler as tl
from torch.optim.swa_utils import SWALR as TorchSWALR

import mithril.utils.lr_schedulers as sch

N = 16


def mul(t: int) -> float:
    return 0.97 if t % 2 else 1.01


def _ours(make: Callable, n: int) -> tuple[list[float], sch.LRScheduler]:
    opt = FakeOpt(0.1)
    sched = make(opt)
    out = [opt.lr]
    for t in range(1, n + 1):
        sched.step()
        out.append(opt.lr)
        assert (sched.last_step, sched.get_last_lr()) == (t, opt.lr)
    return out, sched


def _same_as_torch(ours: Callable, theirs: Callable, n: int = N, closed_form: int = -1) -> None:
    """Every step's rate equal to torch's; ``get_lr_at`` too, for steps ``0 .. closed_form``
    (all by default)."""
    ref = torch_lrs(theirs, 0.1, n)
    got, sched = _ours(ours, n)
    assert_rel(got, ref)
    last = n if closed_form < 0 else closed_form
    assert_rel([sched.get_lr_at(t) for t in range(last + 1)], ref[:last + 1])


def _three(m: object, o: object, kinds: str) -> list:
    """Three children of ``m`` (ours or torch's module) on ``o``; ``kinds`` picks the middle
    one: a closed form, a recursive one or one starting from the current rate."""
    middle = {"linear": lambda: m.LinearLR(o, 0.2, 1.0, 4),
              "multiplicative": lambda: m.MultiplicativeLR(o, mul),
              "swa": lambda: (sch.SWALR if m is sch else TorchSWALR)(o, 0.02, 3)}[kinds]
    return [m.ConstantLR(o, 0.5, 2), middle(), m.StepLR(o, 2, 0.5)]


@pytest.mark.parametrize("middle", ["linear", "multiplicative", "swa"])
@pytest.mark.parametrize("milestones", [[0, 5], [0, 0], [3, 3], [4, 4], [0, 16]])
def test_sequential_milestone_zero_or_repeated_is_torchs(milestones: list[int],
                                                         middle: str) -> None:
    _same_as_torch(lambda o: sch.SequentialLR(o, _three(sch, o, middle), milestones),
                   lambda o: tl.SequentialLR(o, _three(tl, o, middle), milestones))


def test_join_schedules_boundary_zero_is_torchs_sequential() -> None:
    _same_as_torch(
        lambda o: sch.JoinSchedules(o, [sch.ExponentialLR(o, 0.5), sch.StepLR(o, 3, 0.5)], [0]),
        lambda o: tl.SequentialLR(o, [tl.ExponentialLR(o, 0.5), tl.StepLR(o, 3, 0.5)], [0]))


@pytest.mark.parametrize("milestones", [[5, 2, 8], [2, 5, 5, 8], [0, 3], [4, 0, 0, 9, 4, 4],
                                        [15, 1]])
@pytest.mark.parametrize("gamma", [0.5, 0.0])
def test_multistep_milestones_in_any_order_repeated_or_zero_are_torchs(
        milestones: list[int], gamma: float) -> None:
    _same_as_torch(lambda o: sch.MultiStepLR(o, milestones, gamma),
                   lambda o: tl.MultiStepLR(o, milestones, gamma))
    assert sch.MultiStepLR(FakeOpt(0.1), milestones).milestones == sorted(milestones)


@pytest.mark.parametrize("name", ["step", "exponential", "chained", "cyclic-exp-range"])
def test_gamma_zero_is_torchs(name: str) -> None:
    ours, theirs = {
        "step": (lambda o: sch.StepLR(o, 3, 0.0), lambda o: tl.StepLR(o, 3, 0.0)),
        "exponential": (lambda o: sch.ExponentialLR(o, 0.0), lambda o: tl.ExponentialLR(o, 0.0)),
        "chained": (
            lambda o: sch.ChainedScheduler([sch.LinearLR(o, 0.5, 1.0, 4), sch.StepLR(o, 5, 0.0)]),
            lambda o: tl.ChainedScheduler([tl.LinearLR(o, 0.5, 1.0, 4), tl.StepLR(o, 5, 0.0)])),
        "cyclic-exp-range": (
            lambda o: sch.CyclicLR(o, 0.01, 0.1, 3, mode="exp_range", gamma=0.0),
            lambda o: tl.CyclicLR(o, 0.01, 0.1, 3, mode="exp_range", gamma=0.0,
                                  cycle_momentum=False)),
    }[name]
    _same_as_torch(ours, theirs)


@pytest.mark.parametrize("strategy", ["cos", "linear"])
@pytest.mark.parametrize(("pct", "three_phase"), [(0.0, False), (0.0, True), (0.05, False),
                                                  (0.05, True), (1.0, True), (0.95, True),
                                                  (0.57, True)])
def test_one_cycle_with_a_phase_of_no_steps_is_torchs(pct: float, three_phase: bool,
                                                      strategy: str) -> None:
    total = 12
    kw = dict(pct_start=pct, three_phase=three_phase, anneal_strategy=strategy)
    # (step total_steps, past the cycle, extrapolates: linear holds min_lr there, see the
    # class doc; the cosine is torch's)
    n = total if strategy == "cos" else total - 1
    _same_as_torch(lambda o: sch.OneCycleLR(o, 1.0, total, **kw),
                   lambda o: tl.OneCycleLR(o, 1.0, total, cycle_momentum=False, **kw), n=n)


def test_one_cycle_refuses_exactly_where_torch_divides_by_zero() -> None:
    refused = 0
    for total in range(1, 13):
        for pct in (0.0, 0.1, 0.2, 0.25, 0.5, 0.55, 0.6, 0.75, 1.0):
            for three_phase in (False, True):
                kw = dict(pct_start=pct, three_phase=three_phase)
                try:
                    ref = torch_lrs(lambda o, kw=kw, total=total: tl.OneCycleLR(
                        o, 1.0, total, cycle_momentum=False, **kw), 0.1, total)
                except ZeroDivisionError:
                    opt = FakeOpt(0.1)
                    with pytest.raises(ValueError, match=(
                            rf"pct_start={pct} and total_steps={total} give phase \d a length "
                            r"of 0 steps .* falls in it: torch's OneCycleLR divides by zero")):
                        sch.OneCycleLR(opt, 1.0, total, **kw)
                    assert (opt.lr, opt.set_calls) == (0.1, 0)
                    refused += 1
                    continue
                got, _ = _ours(lambda o, kw=kw, total=total: sch.OneCycleLR(o, 1.0, total, **kw),
                               total)
                assert_rel(got, ref)
    assert refused == 24  # (pct_start * total_steps = 1; two-phase pct_start = 1; ...)


@pytest.mark.parametrize(("up", "down", "mode"), [(2.5, 1.5, "triangular"), (0.5, None,
                         "triangular"), (1.5, None, "triangular2"), (3.7, 0, "exp_range"),
                         (4, 2.25, "triangular2"), (1e-3, 2, "triangular")])
def test_cyclic_fractional_step_sizes_are_torchs(up: float, down: float | None,
                                                 mode: str) -> None:
    kw = dict(step_size_up=up, step_size_down=down, mode=mode, gamma=0.9)
    _same_as_torch(lambda o: sch.CyclicLR(o, 0.01, 0.1, **kw),
                   lambda o: tl.CyclicLR(o, 0.01, 0.1, cycle_momentum=False, **kw))
    assert type(sch.CyclicLR(FakeOpt(0.1), 0.01, 0.1, **kw).step_size_up) is type(up)


def test_cyclic_step_size_up_zero_is_refused_as_torch_divides_by_zero() -> None:
    with pytest.raises(ZeroDivisionError):
        torch_lrs(lambda o: tl.CyclicLR(o, 0.01, 0.1, 0, 3, cycle_momentum=False), 0.1, 2)
    opt = FakeOpt(0.1)
    for up in (0, 0.0):
        with pytest.raises(ValueError, match=rf"step_size_up must be > 0, got {up} \(torch's "
                                             r"CyclicLR divides by zero at step 0\)"):
            sch.CyclicLR(opt, 0.01, 0.1, up, 3)
    assert (opt.lr, opt.set_calls) == (0.1, 0)
    sched = sch.CyclicLR(opt, 0.01, 0.1, 2.5)
    sched.step()
    before = (sched.state_dict(), opt.lr, opt.set_calls)
    with pytest.raises(ValueError, match="step_size_up must be > 0"):
        sched.step_size_up = 0
    assert (sched.state_dict(), opt.lr, opt.set_calls) == before


@pytest.mark.parametrize(("name", "reason"), [
    ("ConstantLR", "keeps factor forever on step\\(\\), where its closed form never applies"),
    ("LinearLR", "keeps start_factor forever on step\\(\\), never reaching end_factor, and its "
                 "closed form divides by zero"),
    ("PolynomialLR", "never decays on step\\(\\), and its closed form divides by zero")])
def test_total_iters_zero_is_refused_as_torchs_is_no_schedule(name: str, reason: str) -> None:
    args = {"ConstantLR": (0.5, 0), "LinearLR": (0.5, 1.0, 0), "PolynomialLR": (0, 1.0)}[name]
    # torch's step() keeps its value at step 0 for ever; its closed form disagrees or raises
    topt = torch.optim.SGD([torch.zeros(1, dtype=torch.float64, requires_grad=True)], lr=0.1)
    tsched = getattr(tl, name)(topt, *args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(5):
            topt.step()
            tsched.step()
    stepped = topt.param_groups[0]["lr"]
    assert stepped == pytest.approx(0.1 if name == "PolynomialLR" else 0.05, rel=1e-15)
    if name == "ConstantLR":
        assert tsched._get_closed_form_lr() == [pytest.approx(0.1, rel=1e-15)]
    else:
        with pytest.raises(ZeroDivisionError):
            tsched._get_closed_form_lr()
    opt = FakeOpt(0.1)
    with pytest.raises(ValueError, match=rf"total_iters must be an integer >= 1, got 0 "
                                         rf"\(torch's {name} {reason}"):
        getattr(sch, name)(opt, *args)
    assert (opt.lr, opt.set_calls) == (0.1, 0)
    sched = getattr(sch, name)(opt, *[3 if a == 0 else a for a in args])
    sched.step()
    before = (sched.state_dict(), opt.lr, opt.set_calls)
    with pytest.raises(ValueError, match=f"torch's {name}"):
        sched.total_iters = 0
    assert (sched.state_dict(), opt.lr, opt.set_calls) == before
