"""Composite, metric-driven and SWA schedulers acting per parameter group (issue #15, point
2), against ``torch.optim.lr_scheduler`` / ``torch.optim.swa_utils`` with the same
``param_groups`` (the optimizer's own parameters plus two groups of other base rates):

* ``SequentialLR`` and ``ChainedScheduler`` of per-group children act per group, as torch's
  (whose children always do);
* ``ReduceLROnPlateau(per_group=True)`` with a ``min_lr`` per group, and ``SWALR`` with a
  ``swa_lr`` per group;
* a per-group warm-up into a per-group cosine, each lane from its own values.

Every step's rates agree with torch to ``1e-12``; state dicts resume exactly; a step a group
refuses changes nothing in any group.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_scheduler_groups import close, our_opt, our_trace, our_values, torch_opt, torch_trace
from torch.optim import lr_scheduler as tl
from torch.optim import swa_utils

from mithril.utils.lr_schedulers import (
    SWALR,
    ChainedScheduler,
    ConstantLR,
    CosineAnnealingLR,
    ExponentialLR,
    LambdaLR,
    LinearLR,
    LinearWarmupScheduler,
    ReduceLROnPlateau,
    SequentialLR,
    StepLR,
)


def sequential(o, mine: bool):
    if mine:
        return SequentialLR(o, [LinearLR(o, 0.1, 1.0, 20, per_group=True),
                                CosineAnnealingLR(o, T_max=60, eta_min=1e-3, per_group=True)],
                            milestones=[20])
    return tl.SequentialLR(o, [tl.LinearLR(o, 0.1, 1.0, 20),
                               tl.CosineAnnealingLR(o, T_max=60, eta_min=1e-3)], milestones=[20])


def chained(o, mine: bool):
    if mine:
        return ChainedScheduler([ExponentialLR(o, 0.99, per_group=True),
                                 StepLR(o, 25, 0.5, per_group=True)], o)
    return tl.ChainedScheduler([tl.ExponentialLR(o, 0.99), tl.StepLR(o, 25, 0.5)], o)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("make", [sequential, chained], ids=["sequential", "chained"])
def test_composites_of_per_group_children_act_per_group(kind, make):
    extra = {"momentum": 0.9} if kind == "sgd" else {}
    ref = torch_trace(torch_opt(kind, True, lr=0.1, **extra), lambda o: make(o, False))
    ours = our_trace(our_opt(kind, True, learning_rate=0.1, **extra), lambda o: make(o, True),
                     "momentum" if kind == "sgd" else "beta1")
    close(f"per-group {make.__name__} {kind}", ours[0], ref[0])
    assert len(ours[0][0]) == 3  # three lanes: the own parameters and two groups


def test_plateau_per_group_with_min_lr_per_group():
    metrics = [1.0, 0.9, 0.95, 0.96, 0.97, 0.98, 0.99, 0.5, 0.6, 0.7, 0.8, 0.9] * 6
    opt_t = torch_opt("sgd", True, lr=0.1, momentum=0.9)
    sched_t = tl.ReduceLROnPlateau(opt_t, factor=0.5, patience=2, cooldown=1,
                                   min_lr=[1e-3, 0.02, 1e-4])
    opt = our_opt("sgd", True, learning_rate=0.1, momentum=0.9)
    sched = ReduceLROnPlateau(opt, factor=0.5, patience=2, cooldown=1,
                              min_lr=[1e-3, 0.02, 1e-4])
    ref, ours = [], []
    for m in metrics:
        opt_t.step()
        sched_t.step(m)
        sched.step(m)
        ref.append([g["lr"] for g in opt_t.param_groups])
        ours.append(our_values(opt, "learning_rate"))
    close("per-group plateau", ours, ref)
    assert ours[-1][1] == pytest.approx(0.02)  # group 0 stopped at its own floor
    assert ours[-1][0] < 0.02 and ours[-1][2] < 1e-3
    # no metric: a warning, and no lane moves
    before = sched.state_dict()
    with pytest.warns(RuntimeWarning, match="without the monitored metric"):
        sched.step()
    assert sched.state_dict() == before


def test_swalr_per_group_swa_lr():
    opt_t = torch_opt("sgd", True, lr=0.1, momentum=0.9)
    ref = torch_trace(opt_t, lambda o: swa_utils.SWALR(o, swa_lr=[0.01, 0.002, 0.05],
                                                       anneal_epochs=7), n=30)
    opt = our_opt("sgd", True, learning_rate=0.1, momentum=0.9)
    ours = our_trace(opt, lambda o: SWALR(o, swa_lr=[0.01, 0.002, 0.05], anneal_epochs=7),
                     "momentum", n=30)
    close("per-group SWALR", ours[0], ref[0])
    assert ours[0][-1] == pytest.approx([0.01, 0.002, 0.05], rel=1e-12)


def test_warmup_per_group_into_a_per_group_cosine():
    opt = our_opt("sgd", True, learning_rate=0.1, momentum=0.9)
    bases = our_values(opt, "learning_rate")  # 0.1, 0.05, 0.2
    sched = LinearWarmupScheduler(opt, 5, start_lr=[0.001, 0.0, 0.01], end_lr=bases,
                                  after_scheduler=CosineAnnealingLR(opt, T_max=10, eta_min=0.0,
                                                                    per_group=True))
    seen = [our_values(opt, "learning_rate")]
    for _ in range(15):
        sched.step()
        seen.append(our_values(opt, "learning_rate"))
    for t, lrs in enumerate(seen):
        for lane, (start, end) in enumerate(zip([0.001, 0.0, 0.01], bases, strict=True)):
            want = (start + (end - start) * t / 5 if t < 5 else
                    end * (1 + math.cos(math.pi * (t - 5) / 10)) / 2)
            assert lrs[lane] == pytest.approx(want, rel=1e-12, abs=1e-15), (t, lane)
    assert sched.get_last_lrs() == pytest.approx(seen[-1], rel=1e-15)


@pytest.mark.parametrize("make", [sequential, chained], ids=["sequential", "chained"])
def test_state_dict_resumes_every_lane_exactly(make):
    opt = our_opt("sgd", True, learning_rate=0.1, momentum=0.9)
    sched = make(opt, True)
    for _ in range(23):
        sched.step()
    saved = sched.state_dict()
    assert len(saved["groups"]) == 2
    rest = []
    for _ in range(30):
        sched.step()
        rest.append(our_values(opt, "learning_rate"))
    opt2 = our_opt("sgd", True, learning_rate=0.1, momentum=0.9)
    sched2 = make(opt2, True)
    sched2.load_state_dict(saved)
    again = []
    for _ in range(30):
        sched2.step()
        again.append(our_values(opt2, "learning_rate"))
    assert again == rest


def test_a_step_one_group_refuses_changes_nothing():
    opt = our_opt("sgd", True, learning_rate=0.1, momentum=0.9)
    lam = LambdaLR(opt, [lambda t: 1.0, lambda t: 1.0 - 0.5 * t, lambda t: 1.0])
    sched = SequentialLR(opt, [ConstantLR(opt, 1.0, 2, per_group=True), lam], milestones=[2])
    for _ in range(4):  # the lambda's steps 0-2: group 0 at 1, 0.5, then 0
        sched.step()
    assert our_values(opt, "learning_rate")[1] == 0.0
    before = (our_values(opt, "learning_rate"), sched.state_dict())
    with pytest.raises(ValueError, match=r"param_groups\[0\]: learning_rate must be >= 0"):
        sched.step()  # group 0's factor is negative at the lambda's step 3
    assert (our_values(opt, "learning_rate"), sched.state_dict()) == before


def test_mixed_children_are_refused_by_name_and_change_nothing():
    opt = our_opt("sgd", True, learning_rate=0.1, momentum=0.9)
    per_group = CosineAnnealingLR(opt, T_max=10, eta_min=1e-3, per_group=True)
    before = (our_values(opt, "learning_rate"), per_group.state_dict())
    with pytest.raises(ValueError, match=r"schedulers holds a ConstantLR with 1 lane\(s\); acting "
                                         r"per parameter group, every child needs 3"):
        SequentialLR(opt, [ConstantLR(opt, 0.5, 3), per_group], [3])
    assert per_group.per_group and per_group.state_dict()["groups"] == before[1]["groups"]
    with pytest.raises(TypeError, match="per_group needs a mithril optimizer"):
        class Plain:
            def get_learning_rate(self):
                return 0.1

            def set_learning_rate(self, lr):
                pass
        ReduceLROnPlateau(Plain(), per_group=True)


def test_torch_composites_really_act_per_group():
    """The reference itself: torch's SequentialLR moves every group from its own base (so the
    comparisons above can fail if we only moved the optimizer's own rate)."""
    opt_t = torch_opt("sgd", True, lr=0.1, momentum=0.9)
    lrs, _ = torch_trace(opt_t, lambda o: sequential(o, False), n=10)
    assert lrs[0] == pytest.approx([0.01, 0.005, 0.02])
    assert isinstance(opt_t, torch.optim.SGD)
