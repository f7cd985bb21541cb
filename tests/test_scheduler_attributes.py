"""Setting a scheduler's attribute after construction (``sched.gamma = 0.5``,
``lr_schedulers/attributes.py``): a hyperparameter is checked as the constructor checks it and
reaches every lane of a scheduler acting per parameter group; from the next step on the
schedule equals one built with the new value (its closed form); a refused value, and a name
no step would read (torch's ``last_epoch``, a misspelling), change nothing."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
from scheduler_parity import FakeOpt

import mithril.utils.lr_schedulers as sch
import mithril.utils.optimizers as mo

# (a scheduler, an attribute, a new value it takes, a value it refuses)
CASES: list[tuple[Callable[[FakeOpt], sch.LRScheduler], str, object, object]] = [
    (lambda o: sch.StepLR(o, 5, 0.5), "gamma", 0.8, -1.0),
    (lambda o: sch.StepLR(o, 5, 0.5), "step_size", 3, 0),
    (lambda o: sch.MultiStepLR(o, [10, 20], 0.5), "milestones", [4, 12], [12, -4]),
    (lambda o: sch.ExponentialLR(o, 0.9), "gamma", 0.95, math.nan),
    (lambda o: sch.CosineAnnealingLR(o, 40, 1e-3), "T_max", 25, 0),
    (lambda o: sch.CosineAnnealingLR(o, 40, 1e-3), "eta_min", 1e-2, -1.0),
    (lambda o: sch.CosineAnnealingLR(o, 40), "T_mult", 1, 2),  # (2 needs warm restarts)
    (lambda o: sch.CosineAnnealingWarmRestarts(o, 10, 2), "T_0", 4, 2.5),  # (T_max: torch's name)
    (lambda o: sch.OneCycleLR(o, 1.0, 100), "max_lr", 0.5, -1.0),
    (lambda o: sch.OneCycleLR(o, 1.0, 100, pct_start=0.2), "total_steps", 60, 5),  # (0 / 0)
    (lambda o: sch.OneCycleLR(o, 1.0, 100), "pct_start", 0.5, 1.5),
    (lambda o: sch.LinearWarmupScheduler(o, 10, 0.0, 0.2), "end_lr", 0.1, math.inf),
    (lambda o: sch.ReduceLROnPlateau(o, patience=2), "factor", 0.5, 1.5),
    (lambda o: sch.CyclicLR(o, 0.01, 0.1, 4), "max_lr", 0.2, -0.1),
]


def steps(sched: sch.LRScheduler, opt: FakeOpt, n: int) -> list[float]:
    out = []
    for i in range(n):
        if sched.requires_metric:
            sched.step(1.0 / (1 + i % 3))  # type: ignore[call-arg]
        else:
            sched.step()
        out.append(opt.lr)
    return out


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c[1]}-{i}" for i, c in
                                                         enumerate(CASES)])
def test_a_set_value_is_checked_and_used_from_the_next_step(case: int) -> None:
    make, name, good, bad = CASES[case]
    opt = FakeOpt(0.1)
    sched = make(opt)
    steps(sched, opt, 7)
    before, lr = sched.state_dict(), opt.lr
    with pytest.raises(ValueError, match=name):
        setattr(sched, name, bad)
    assert sched.state_dict() == before and opt.lr == lr  # nothing changed
    setattr(sched, name, good)
    assert getattr(sched, name) == good and opt.lr == lr  # (the optimizer: at the next step)
    # from now on the schedule is the one built with the new value, at the same step
    ref_opt = FakeOpt(0.1)
    ref = make(ref_opt)
    setattr(ref, name, good)
    ref.load_state_dict(sched.state_dict())
    assert steps(sched, opt, 30) == steps(ref, ref_opt, 30)
    loaded = make(FakeOpt(0.1))
    loaded.load_state_dict(sched.state_dict())  # (a checkpoint of it loads)
    assert getattr(loaded, name) == good


def test_closed_form_after_a_change_equals_a_scheduler_built_with_it() -> None:
    opt, fresh = FakeOpt(0.1), FakeOpt(0.1)
    sched, built = sch.StepLR(opt, 4, 0.5), sch.StepLR(fresh, 4, 0.8)
    steps(sched, opt, 9)
    steps(built, fresh, 9)
    sched.gamma = 0.8
    assert steps(sched, opt, 20) == steps(built, fresh, 20)


def test_names_no_step_reads_are_refused_and_others_are_the_users() -> None:
    opt = FakeOpt(0.1)
    sched = sch.StepLR(opt, 5, 0.5)
    before = dict(vars(sched))
    for name, meant in [("base_lrs", "base_lr"), ("gama", "gamma"), ("step_sise", "step_size")]:
        with pytest.raises(AttributeError, match=f"StepLR has no attribute '{name}': setting "
                                                 f"it would change no step \\(did you mean "
                                                 f"{meant}"):
            setattr(sched, name, 3)
    with pytest.raises(ValueError, match="base_lr must be a finite real number >= 0"):
        sched.base_lr = -1.0
    assert vars(sched) == before
    sched.note = "warm-up done"  # (a name of the user's own)
    sched.base_lr = 0.2  # (the closed form's base: steps from it)
    sched.step()
    assert opt.lr == 0.2
    cyc = sch.CyclicLR(mo.SGD(0.01, momentum=0.9), 0.01, 0.1, 4, cycle_momentum=True)
    with pytest.raises(AttributeError, match="cycle_momentum is fixed at construction"):
        cyc.cycle_momentum = False
    warm = sch.LinearWarmupScheduler(opt, 5, 0.0, 0.1, after_scheduler=sch.StepLR(opt, 2))
    for name, value in [("optimizer", FakeOpt(0.2)), ("after_scheduler", sch.StepLR(opt, 3))]:
        with pytest.raises(AttributeError, match=f"LinearWarmupScheduler.{name} is fixed at "
                                                 f"construction: build a new"):
            setattr(warm, name, value)
    with pytest.raises(ValueError, match="max_momentum"):
        cyc.max_momentum = 1.5  # (SGD refuses a momentum above 1)
    cyc.max_momentum = 0.97
    assert cyc.max_momentum == 0.97


def grouped() -> mo.Adam:
    return mo.Adam(0.1, param_groups=[{"params": ["b"], "lr_scale": 0.5}])


def test_every_lane_of_a_per_group_scheduler_takes_the_value() -> None:
    opt, ref_opt = grouped(), grouped()
    sched = sch.StepLR(opt, 1, 0.5, per_group=True)
    ref = sch.StepLR(ref_opt, 1, 0.1, per_group=True)
    sched.gamma = 0.1
    for _ in range(3):
        sched.step()
        ref.step()
        assert sched.get_last_lrs() == ref.get_last_lrs()
    # a list: one value per lane, for the arguments torch takes per group
    cyc = sch.OneCycleLR(grouped(), [1.0, 0.4], 50)
    before = cyc.state_dict()
    with pytest.raises(ValueError, match="max_lr"):
        cyc.max_lr = [0.5, -1.0]  # (the second lane refuses: the first is put back)
    with pytest.raises(ValueError, match="3 values given; it takes one, or one per parameter "
                                         "group \\(2 here"):
        cyc.max_lr = [0.5, 0.2, 0.1]
    assert cyc.state_dict() == before
    cyc.max_lr = [0.5, 0.2]  # (the optimizer's own lane, then the group's)
    ref = sch.OneCycleLR(grouped(), [0.5, 0.2], 50)
    assert [cyc.max_lr, cyc._siblings[0].max_lr] == [0.5, 0.2]
    for _ in range(20):
        cyc.step()
        ref.step()
        assert cyc.get_last_lrs() == ref.get_last_lrs()


def test_the_child_of_a_per_group_composite_reaches_its_lane_mates() -> None:
    opt, ref_opt = grouped(), grouped()

    def composite(o: mo.Adam, gamma: float) -> tuple[sch.SequentialLR, sch.StepLR]:
        child = sch.StepLR(o, 1, gamma, per_group=True)
        return sch.SequentialLR(o, [child, sch.ExponentialLR(o, 0.9, per_group=True)], [5]), child

    seq, child = composite(opt, 0.5)
    ref, _ = composite(ref_opt, 0.7)
    child.gamma = 0.7
    for _ in range(8):
        seq.step()
        ref.step()
        assert seq.get_last_lrs() == ref.get_last_lrs()
