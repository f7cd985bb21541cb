"""Bugs found by running the schedulers side by side with ``torch.optim.lr_scheduler``
(hunt s35). Each test runs torch's counterpart in the same test and compares the values."""

from __future__ import annotations

import warnings

import torch
from scheduler_parity import FakeOpt, assert_rel

import mithril.utils.lr_schedulers as sch

T = torch.optim.lr_scheduler


def _torch_run(make, base: float, n: int) -> list[float]:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = make(opt)
        out = [float(opt.param_groups[0]["lr"])]
        for _ in range(n):
            opt.step()
            sched.step()
            out.append(float(opt.param_groups[0]["lr"]))
    return out


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
