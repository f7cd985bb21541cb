"""Composite schedulers (SequentialLR, ChainedScheduler, LinearWarmupScheduler, SWALR in a
sequence) changed or resumed mid-run, against ``torch.optim.lr_scheduler`` doing the same in
each test: new milestones / end_lr / warm-up lengths, cycled momentum on load and on a refused
step, plateau children stepped without a metric, SWALR annealing from the rate it finds."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from scheduler_parity import FakeOpt, assert_rel
from scheduler_parity import torch_lrs as _torch_run

import mithril.utils.lr_schedulers as sch

T = torch.optim.lr_scheduler


def test_a_new_end_lr_rebases_the_after_scheduler_as_a_warmup_built_with_it() -> None:
    # torch: warm up from 0.01 to 0.1 over 5 steps, then a cosine from 0.1 (the optimizer's)
    ref = _torch_run(lambda o: T.SequentialLR(o, [T.LinearLR(o, 0.1, 1.0, 5),
                                                  T.CosineAnnealingLR(o, 20)], [5]), 0.1, 30)
    opt = FakeOpt(1.0)
    # built for end_lr 0.2; set to torch's 0.1 before the warm-up ends
    warm = sch.LinearWarmupScheduler(opt, 5, 0.01, 0.2, sch.CosineAnnealingLR(opt, 20))
    warm.step()
    warm.end_lr = 0.1
    ours = []
    for t in range(2, 31):
        warm.step()
        ours.append(opt.lr)
        assert warm.get_last_lr() == warm.get_lr_at(t) == opt.lr
    # (before: the warm-up reached 0.08, then the cosine jumped to 0.2, its old base)
    assert_rel(ours, ref[2:])


def test_new_milestones_mid_run_give_torchs_sequence_built_with_them() -> None:
    ref = _torch_run(lambda o: T.SequentialLR(o, [T.ExponentialLR(o, 0.8),
                                                  T.LinearLR(o, 0.1, 1.0, 10)], [20]), 1.0, 40)
    opt = FakeOpt(1.0)
    seq = sch.SequentialLR(opt, [sch.ExponentialLR(opt, 0.8), sch.LinearLR(opt, 0.1, 1.0, 10)],
                           [10])
    ours = [opt.lr]
    for t in range(1, 41):
        if t == 16:  # the second child has run 5 steps; the first must come back at step 16
            seq.milestones = [20]
        seq.step()
        ours.append(opt.lr)
        assert seq.get_last_lr() == seq.get_lr_at(t) == opt.lr
    # (before: steps 16..19 continued the first child from its step 10: 0.8**10, not 0.8**16)
    assert_rel(ours[16:], ref[16:])


def test_a_shorter_warmup_mid_run_gives_the_closed_form_of_the_after_scheduler() -> None:
    # torch: 5 steps of warm-up, then ExponentialLR from the optimizer's 1.0
    ref = _torch_run(lambda o: T.SequentialLR(o, [T.LinearLR(o, 0.1, 1.0, 5),
                                                  T.ExponentialLR(o, 0.5)], [5]), 1.0, 14)
    opt = FakeOpt(1.0)
    warm = sch.LinearWarmupScheduler(opt, 10, 0.1, 1.0, sch.ExponentialLR(opt, 0.5))
    ours = [opt.lr]
    for t in range(1, 15):
        if t == 8:
            warm.warmup_steps = 5
        warm.step()
        ours.append(opt.lr)
        assert warm.get_last_lr() == warm.get_lr_at(t) == opt.lr
    # (before: step 8 restarted nothing and set 0.5, the after scheduler's step 1, not 0.5**3)
    assert_rel(ours[8:], ref[8:])


def _torch_sgd_momentum() -> torch.optim.SGD:
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9)


def _torch_values(opt: torch.optim.Optimizer) -> tuple[float, float]:
    return float(opt.param_groups[0]["lr"]), float(opt.param_groups[0]["momentum"])


def test_a_refused_chain_step_puts_a_cycled_momentum_back() -> None:
    from mithril.utils.optimizers import SGD

    ref = _torch_sgd_momentum()
    ref_cycle = T.OneCycleLR(ref, 0.5, 100)  # (cycle_momentum=True, torch's default)
    opt = SGD(learning_rate=0.1, momentum=0.9)
    chain = sch.ChainedScheduler([sch.OneCycleLR(opt, 0.5, 100, cycle_momentum=True),
                                  sch.LambdaLR(opt, lambda t: 1.0 if t < 5 else -1.0)])
    for _ in range(4):
        ref.step()
        ref_cycle.step()
        chain.step()
    _, momentum = _torch_values(ref)
    assert abs(opt.momentum - momentum) <= 1e-15
    state, lr = chain.state_dict(), opt.learning_rate
    with pytest.raises(ValueError, match="learning_rate"):
        chain.step()  # (step 5: the LambdaLR child's rate is negative)
    # (before: the rate and the children came back, the momentum stayed at step 5's)
    assert (opt.learning_rate, opt.momentum, chain.state_dict()) == (lr, momentum, state)


def _resumed_momenta(make, n: int, stop: int) -> tuple[list, list]:
    """(uninterrupted, resumed at ``stop`` from JSON) (lr, momentum) after each step, the
    resumed run's first entry read right after load_state_dict."""
    from mithril.utils.optimizers import SGD

    opt = SGD(learning_rate=0.1, momentum=0.9)
    sched = make(opt)
    full = []
    for _ in range(n):
        sched.step()
        full.append((opt.learning_rate, opt.momentum))
    opt = SGD(learning_rate=0.1, momentum=0.9)
    sched = make(opt)
    for _ in range(stop):
        sched.step()
    saved = json.loads(json.dumps(sched.state_dict()))
    opt = SGD(learning_rate=0.1, momentum=0.9)
    sched = make(opt)
    sched.load_state_dict(saved)
    resumed = [(opt.learning_rate, opt.momentum)]
    for _ in range(n - stop):
        sched.step()
        resumed.append((opt.learning_rate, opt.momentum))
    return full, resumed


# (ours, torch's, whether torch's learning rates are ours too: torch's ChainedScheduler lets
# a CyclicLR overwrite the rate, so only its momentum is compared there)
COMPOSITES_WITH_A_MOMENTUM_CYCLE = {
    "sequential": (
        lambda o: sch.SequentialLR(o, [sch.LinearLR(o, 0.1, 1.0, 5),
                                       sch.CyclicLR(o, 0.01, 0.3, 4, cycle_momentum=True)], [5]),
        lambda o: T.SequentialLR(o, [T.LinearLR(o, 0.1, 1.0, 5), T.CyclicLR(o, 0.01, 0.3, 4)],
                                 [5]), True),
    "warmup": (
        lambda o: sch.LinearWarmupScheduler(
            o, 5, 0.01, 0.1, sch.CyclicLR(o, 0.01, 0.3, 4, cycle_momentum=True)),
        lambda o: T.SequentialLR(o, [T.LinearLR(o, 0.1, 1.0, 5), T.CyclicLR(o, 0.01, 0.3, 4)],
                                 [5]), True),
    "chained": (
        lambda o: sch.ChainedScheduler([sch.CyclicLR(o, 0.01, 0.3, 4, cycle_momentum=True),
                                        sch.ExponentialLR(o, 0.97)]),
        lambda o: T.CyclicLR(o, 0.01, 0.3, 4), False),
}


@pytest.mark.parametrize("name", list(COMPOSITES_WITH_A_MOMENTUM_CYCLE))
def test_load_state_dict_of_a_composite_sets_the_cycled_momentum_as_torchs_run(name) -> None:
    ours, theirs, same_lr = COMPOSITES_WITH_A_MOMENTUM_CYCLE[name]
    ref = _torch_sgd_momentum()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_sched = theirs(ref)
        torch_run = []
        for _ in range(30):
            ref.step()
            ref_sched.step()
            torch_run.append(_torch_values(ref))
    full, resumed = _resumed_momenta(ours, 30, 12)
    for (a, b), (c, d) in zip(full, torch_run, strict=True):
        assert abs(b - d) <= 1e-12 and (not same_lr or abs(a - c) <= 1e-12 * c)
    # right after loading, the optimizer holds step 12's momentum, as the uninterrupted run
    # (before: the value the fresh construction had left)
    assert resumed[0] == full[11]
    assert resumed == full[11:]


def test_a_warmup_before_a_plateau_nested_in_a_sequence_steps_without_a_metric() -> None:
    ref = _torch_run(lambda o: T.LinearLR(o, 0.1, 1.0, 5), 0.1, 5)  # torch's warm-up
    opt = FakeOpt(0.1)
    seq = sch.SequentialLR(opt, [sch.LinearWarmupScheduler(opt, 5, 0.01, 0.1,
                                                           sch.ReduceLROnPlateau(opt)),
                                 sch.StepLR(opt, 3)], [30])
    ours = [opt.lr]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "called without the monitored metric"
        for _ in range(5):  # the warm-up, then the plateau's restart: no metric observed
            seq.step()
            ours.append(opt.lr)
    # (before: it warned and stayed at step 0, as LinearWarmupScheduler alone does not)
    assert_rel(ours, ref)
    assert seq.last_step == 5
    with pytest.warns(RuntimeWarning, match="without the monitored metric"):
        seq.step()  # the plateau's first observation needs the metric
    assert seq.last_step == 5 and opt.lr == ref[-1]
    seq.step(1.0)
    assert seq.last_step == 6


def test_the_missing_metric_warning_points_at_the_callers_line() -> None:
    # torch's plateau after the same two metrics (its step needs one: nothing to compare)
    ref = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    ref_plateau = T.ReduceLROnPlateau(ref, patience=0, factor=0.5)
    for m in (1.0, 2.0):
        ref_plateau.step(m)
    opt = FakeOpt(0.1)
    plateau = sch.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    other = FakeOpt(0.1)
    seq = sch.SequentialLR(other, [sch.StepLR(other, 3), sch.ReduceLROnPlateau(other)], [1])
    seq.step()
    for m in (1.0, 2.0):
        plateau.step(m)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plateau.step()
        seq.step()
    # (before: both pointed into lr_schedulers/lanes.py, the wrapper every such step runs in)
    assert [w.filename for w in caught] == [__file__, __file__]
    assert opt.lr == plateau.get_last_lr() == ref.param_groups[0]["lr"] == 0.05
    assert other.lr == 0.1 and seq.last_step == 1


@pytest.mark.parametrize("anneal", [(5, "cos"), (7, "linear"), (0, "cos")])
def test_swalr_after_a_milestone_anneals_from_the_rate_left_as_torchs(anneal) -> None:
    epochs, strategy = anneal

    def theirs(o):
        return T.SequentialLR(o, [T.CosineAnnealingLR(o, 100),
                                  torch.optim.swa_utils.SWALR(o, 0.05, epochs, strategy)], [75])

    def ours(o):
        return sch.SequentialLR(o, [sch.CosineAnnealingLR(o, 100),
                                    sch.SWALR(o, 0.05, epochs, strategy)], [75])

    ref = _torch_run(theirs, 0.1, 100)
    opt = FakeOpt(0.1)
    seq = ours(opt)
    got = [opt.lr]
    for t in range(1, 101):
        seq.step()
        got.append(opt.lr)
        if t == 80:  # a checkpoint in the SWA phase resumes it exactly
            saved = json.loads(json.dumps(seq.state_dict()))
            opt = FakeOpt(0.1)
            seq = ours(opt)
            seq.load_state_dict(saved)
            assert opt.lr == got[-1]
    # (before: the SWA phase restarted at 0.1, the rate before the cosine, and annealed down)
    assert_rel(got, ref)
    # and the closed form plots it (it jumped back to 0.1 at the milestone)
    assert_rel([ours(FakeOpt(0.1)).get_lr_at(t) for t in range(101)], ref)


def test_a_chain_after_a_warmup_refuses_a_zero_end_lr_by_name() -> None:
    ref = _torch_run(lambda o: T.ChainedScheduler([T.StepLR(o, 3, 0.5),
                                                   T.ExponentialLR(o, 0.9)]), 0.1, 10)

    def chain(o):
        return sch.ChainedScheduler([sch.StepLR(o, 3, 0.5), sch.ExponentialLR(o, 0.9)])

    with pytest.raises(ValueError, match="base_lr"):  # (before: ZeroDivisionError at a step)
        zero = FakeOpt(0.1)
        sch.LinearWarmupScheduler(zero, 2, 0.0, 0.0, chain(zero))
    opt = FakeOpt(0.1)
    warm = sch.LinearWarmupScheduler(opt, 2, 0.01, 0.1, chain(opt))
    warm.step()
    state = warm.state_dict()
    with pytest.raises(ValueError, match="base_lr"):
        warm.end_lr = 0.0
    assert warm.state_dict() == state and warm.end_lr == 0.1
    got = []
    for _ in range(11):
        warm.step()
        got.append(opt.lr)
    assert_rel(got, ref)  # the chain from 0.1 after the warm-up, as torch's
