"""Schedulers that go on from the rate they find when a parent restarts them (torch's
``MultiplicativeLR`` and ``SWALR`` in its ``SequentialLR``), after a milestone and after a
warm-up, against torch's ``SequentialLR`` run in the same test: every step, the closed form
(``get_lr_at``) and a resume in that phase. (``MultiplicativeLR`` used to jump back to the
base at its milestone; a warm-up's closed form used to start ``SWALR`` from ``end_lr`` where
its steps start from the warm-up's last rate.)
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch
from scheduler_parity import FakeOpt, assert_rel, our_lrs, torch_lrs
from torch.optim import lr_scheduler as tl

import mithril.utils.lr_schedulers as sch

N = 30


def shrink(t: int) -> float:
    return 0.9 if t % 3 else 1.05  # (lr_lambda(0) = 1.05: torch applies it at the milestone)


AFTERS: dict[str, tuple[Callable, Callable]] = {
    "multiplicative": (lambda o: sch.MultiplicativeLR(o, shrink),
                       lambda o: tl.MultiplicativeLR(o, shrink)),
    "multiplicative-constant": (lambda o: sch.MultiplicativeLR(o, lambda t: 0.95),
                                lambda o: tl.MultiplicativeLR(o, lambda t: 0.95)),
    "swalr-cos": (lambda o: sch.SWALR(o, 0.05, 6), lambda o: torch.optim.swa_utils.SWALR(o, 0.05, 6)),
    "swalr-linear": (lambda o: sch.SWALR(o, 0.02, 4, "linear"),
                     lambda o: torch.optim.swa_utils.SWALR(o, 0.02, 4, "linear")),
}

#: our parent (given the child) -> torch's (given torch's child): the child's phase begins at 7
PARENTS: dict[str, tuple[Callable, Callable]] = {
    "after-a-warmup": (
        lambda o, c: sch.LinearWarmupScheduler(o, 7, 0.01, 0.1, c),
        lambda o, c: tl.SequentialLR(o, [tl.LinearLR(o, 0.1, 1.0, 7), c], [7])),
    "sequential": (
        lambda o, c: sch.SequentialLR(o, [sch.ExponentialLR(o, 0.8), c], [7]),
        lambda o, c: tl.SequentialLR(o, [tl.ExponentialLR(o, 0.8), c], [7])),
    "third-of-a-sequence": (
        lambda o, c: sch.SequentialLR(o, [sch.ConstantLR(o, 0.5, 2), sch.CosineAnnealingLR(o, 9),
                                          c], [3, 7]),
        lambda o, c: tl.SequentialLR(o, [tl.ConstantLR(o, 0.5, 2), tl.CosineAnnealingLR(o, 9),
                                         c], [3, 7])),
}


@pytest.mark.parametrize("parent", list(PARENTS))
@pytest.mark.parametrize("after", list(AFTERS))
def test_goes_on_from_the_rate_it_finds_as_torch(parent: str, after: str) -> None:
    ours_parent, torch_parent = PARENTS[parent]
    ours_child, torch_child = AFTERS[after]

    def ours(o: FakeOpt) -> sch.LRScheduler:
        return ours_parent(o, ours_child(o))

    ref = torch_lrs(lambda o: torch_parent(o, torch_child(o)), 0.1, N)
    got = our_lrs(ours, 0.1, N)
    assert_rel(got, ref)
    # the closed form is the run (before: MultiplicativeLR's restarted from the base; a
    # warm-up's SWALR annealed from end_lr)
    assert_rel([ours(FakeOpt(0.1)).get_lr_at(t) for t in range(N + 1)], ref)
    assert got[7] != 0.1  # (not the base: the rate found at step 6, moved by the child)
    for k in (7, 8, 12):  # a checkpoint in the child's phase resumes it exactly
        opt = FakeOpt(0.1)
        sched = ours(opt)
        for _ in range(k):
            sched.step()
        saved = json.loads(json.dumps(sched.state_dict(), allow_nan=False))
        opt = FakeOpt(0.5)
        sched = ours(opt)
        sched.load_state_dict(saved)
        rest = [opt.lr]
        for _ in range(N - k):
            sched.step()
            rest.append(opt.lr)
        assert rest == got[k:]
        assert_rel([sched.get_lr_at(t) for t in range(N + 1)], ref)


def test_a_given_base_lr_is_kept_at_the_restart() -> None:
    # base_lr= is the child's own base, which a parent keeps (as optax's init_value)
    opt = FakeOpt(0.1)
    seq = sch.SequentialLR(opt, [sch.ExponentialLR(opt, 0.8),
                                 sch.MultiplicativeLR(opt, shrink, base_lr=0.03)], [5])
    alone = sch.MultiplicativeLR(FakeOpt(0.03), shrink)
    got = [opt.lr]
    for _ in range(15):
        seq.step()
        got.append(opt.lr)
    assert got[5:] == [alone.get_lr_at(t) for t in range(11)]
    assert got == [seq.get_lr_at(t) for t in range(16)]


def test_a_refused_restart_changes_nothing() -> None:
    opt = FakeOpt(0.1)
    seq = sch.SequentialLR(opt, [sch.ExponentialLR(opt, 0.8),
                                 sch.MultiplicativeLR(opt, lambda t: -1.0 if t == 0 else 0.9)],
                           [3])
    for _ in range(2):
        seq.step()
    before, lr = seq.state_dict(), opt.lr
    with pytest.raises(ValueError, match=r"restarted at the rate 0.064.*lr_lambda\(0\) = -1.0"):
        seq.step()
    assert seq.state_dict() == before and opt.lr == lr
