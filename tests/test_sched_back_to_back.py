"""Two schedulers stepped back to back on one optimizer, torch's documented "chaining"
(``scheduler1.step(); scheduler2.step()`` every epoch: each scales the rate the other left),
against torch doing it in the same test. Ours set closed-form values, so the later one
stepped used to discard the other's change silently (rates 0.1, 0.1, 0.01 where torch's are
0.09, 0.081, 0.0073); now the step that would discard it raises, naming the combinator that
gives torch's rates, and changes nothing. A scheduler that goes on from the current rate
(``ReduceLROnPlateau``, ``SWALR``) keeps the other's change, as torch's, and is not refused;
switching from one scheduler to another (torch's SWA recipe) and one scheduler per optimizer
stay as they were.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.optim import lr_scheduler as tl

import mithril.utils.lr_schedulers as sch
from mithril.utils.optimizers import SGD


def _torch_opt(lr: float = 0.1) -> torch.optim.SGD:
    return torch.optim.SGD([torch.zeros(1, dtype=torch.float64, requires_grad=True)], lr=lr)


def test_torchs_chaining_is_refused_and_chained_scheduler_gives_its_rates() -> None:
    topt = _torch_opt()
    t1, t2 = tl.ExponentialLR(topt, gamma=0.9), tl.MultiStepLR(topt, milestones=[3, 6], gamma=0.1)
    ref = []
    for _ in range(8):
        topt.step()
        t1.step()
        t2.step()
        ref.append(topt.param_groups[0]["lr"])
    opt = SGD(learning_rate=0.1)
    s1, s2 = sch.ExponentialLR(opt, gamma=0.9), sch.MultiStepLR(opt, milestones=[3, 6], gamma=0.1)
    s1.step()
    s2.step()  # (MultiStepLR set 0.1 over ExponentialLR's 0.09: torch's is 0.09)
    assert (opt.learning_rate, ref[0]) == (0.1, pytest.approx(0.09, rel=1e-15))
    before = (s1.state_dict(), s2.state_dict(), opt.learning_rate)
    with pytest.raises(RuntimeError, match=r"ExponentialLR.step\(\): MultiStepLR on the same "
                                           r"optimizer stepped since.*ChainedScheduler\(\[a, b\]\)"):
        s1.step()
    assert (s1.state_dict(), s2.state_dict(), opt.learning_rate) == before
    opt = SGD(learning_rate=0.1)
    chain = sch.ChainedScheduler([sch.ExponentialLR(opt, 0.9), sch.MultiStepLR(opt, [3, 6], 0.1)])
    got = []
    for _ in range(8):
        chain.step()
        got.append(opt.learning_rate)
    assert got == pytest.approx(ref, rel=1e-12)


def test_a_plateau_after_a_closed_form_is_torchs_until_the_closed_form_would_discard() -> None:
    metrics = [1.0, 0.9, 0.8, 0.85, 0.9, 0.95]
    topt = _torch_opt()
    tstep, tplateau = tl.StepLR(topt, 3), tl.ReduceLROnPlateau(topt, patience=0)
    opt = SGD(learning_rate=0.1)
    step, plateau = sch.StepLR(opt, 3), sch.ReduceLROnPlateau(opt, patience=0)
    for i, m in enumerate(metrics):
        topt.step()
        tstep.step()
        if i == 4:  # StepLR would set 0.01 over the plateau's 0.001: torch keeps 0.001
            before = (step.state_dict(), plateau.state_dict(), opt.learning_rate)
            with pytest.raises(RuntimeError, match="ReduceLROnPlateau on the same optimizer"):
                step.step()
            assert (step.state_dict(), plateau.state_dict(), opt.learning_rate) == before
            assert topt.param_groups[0]["lr"] == pytest.approx(0.001, rel=1e-12)
            break
        step.step()
        tplateau.step(m)
        plateau.step(m)  # (reads the rate StepLR left, as torch's: never refused)
        assert opt.learning_rate == pytest.approx(topt.param_groups[0]["lr"], rel=1e-12)
    else:
        raise AssertionError("the StepLR step after the plateau's reduction was not refused")


def test_switching_schedulers_and_one_per_optimizer_are_torchs() -> None:
    # torch's SWA recipe: a cosine until swa_start, then SWALR from the rate it left
    topt = _torch_opt()
    tcos, tswa = tl.CosineAnnealingLR(topt, 20), torch.optim.swa_utils.SWALR(topt, 0.02, 3)
    opt = SGD(learning_rate=0.1)
    cos, swa = sch.CosineAnnealingLR(opt, 20), sch.SWALR(opt, 0.02, 3)
    # and a second optimizer with its own scheduler, stepped in between (a GAN's two)
    topt2, opt2 = _torch_opt(0.2), SGD(learning_rate=0.2)
    tother, other = tl.ExponentialLR(topt2, 0.8), sch.ExponentialLR(opt2, 0.8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch: "lr_scheduler.step() before optimizer.step()")
        for epoch in range(10):
            topt.step()
            topt2.step()
            (tswa if epoch >= 8 else tcos).step()
            (swa if epoch >= 8 else cos).step()
            tother.step()
            other.step()
            assert opt.learning_rate == pytest.approx(topt.param_groups[0]["lr"], rel=1e-12)
            assert opt2.learning_rate == pytest.approx(topt2.param_groups[0]["lr"], rel=1e-12)
    assert opt.learning_rate != 0.02  # (annealing from the cosine's rate, not yet at swa_lr)
