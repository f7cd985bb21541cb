"""A scheduler built after another one moved the rate (torch's switching, e.g. its SWA recipe),
against torch doing the same in the same test (float64, ``1e-12`` relative, every step).

torch gives every scheduler ``base_lrs`` = the group's first ``initial_lr`` (its
``setdefault``: the rate before the first scheduler), but its chainable ones multiply the
rate they find, so in effect they start from it, as ours (whose ``base_lr`` is the rate at
construction) do. Its closed forms on ``base_lrs`` differ: ``LambdaLR`` and
``CosineAnnealingWarmRestarts`` jump back to ``initial_lr`` (0.1 where ours stay at the
0.0125 found; ``base_lr=0.1`` gives torch's), ``CosineAnnealingLR`` follows the rate found up
to ``T_max`` and then mixes ``initial_lr`` in (its restart branch), and ``CyclicLR``'s step
0 is ``initial_lr`` (torch sets its ``base_lrs`` after its initial step), its ``base_lr``
from step 1 on. Ours keep one rule; these tests pin where it is torch's and where not.
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

N, K = 25, 3  # steps; the first scheduler's steps before the second is built (rate 0.0125)


def lam(t: int) -> float:
    return 1.0 / (t + 1)


def _torch_after(theirs: Callable) -> list[float]:
    opt = torch.optim.SGD([torch.zeros(1, dtype=torch.float64, requires_grad=True)], lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = tl.ExponentialLR(opt, 0.5)
        for _ in range(K):
            opt.step()
            first.step()
        sched = theirs(opt)
        out = [opt.param_groups[0]["lr"]]
        for _ in range(N):
            opt.step()
            sched.step()
            out.append(opt.param_groups[0]["lr"])
    return out


def _ours_after(ours: Callable) -> tuple[list[float], sch.LRScheduler]:
    opt = FakeOpt(0.1)
    first = sch.ExponentialLR(opt, 0.5)
    for _ in range(K):
        first.step()
    sched = ours(opt)
    out = [opt.lr]
    for _ in range(N):
        sched.step()
        out.append(opt.lr)
    return out, sched


SAME: dict[str, tuple[Callable, Callable]] = {
    "step": (lambda o: sch.StepLR(o, 3, 0.5), lambda o: tl.StepLR(o, 3, 0.5)),
    "multistep": (lambda o: sch.MultiStepLR(o, [2, 5], 0.5), lambda o: tl.MultiStepLR(o, [2, 5], 0.5)),
    "exponential": (lambda o: sch.ExponentialLR(o, 0.9), lambda o: tl.ExponentialLR(o, 0.9)),
    "constant": (lambda o: sch.ConstantLR(o, 0.5, 3), lambda o: tl.ConstantLR(o, 0.5, 3)),
    "linear": (lambda o: sch.LinearLR(o, 0.5, 1.0, 4), lambda o: tl.LinearLR(o, 0.5, 1.0, 4)),
    "polynomial": (lambda o: sch.PolynomialLR(o, 8, 2.0), lambda o: tl.PolynomialLR(o, 8, 2.0)),
    "multiplicative": (lambda o: sch.MultiplicativeLR(o, lambda t: 0.9),
                       lambda o: tl.MultiplicativeLR(o, lambda t: 0.9)),
    "swalr": (lambda o: sch.SWALR(o, 0.02, 3), lambda o: TorchSWALR(o, 0.02, 3)),
    "one-cycle": (lambda o: sch.OneCycleLR(o, 1.0, 30),
                  lambda o: tl.OneCycleLR(o, 1.0, 30, cycle_momentum=False)),
}


@pytest.mark.parametrize("name", list(SAME))
def test_chainable_ones_start_from_the_rate_found_as_torchs(name: str) -> None:
    ours, theirs = SAME[name]
    got, sched = _ours_after(ours)
    ref = _torch_after(theirs)
    assert_rel(got, ref)
    if name != "swalr":  # (its closed form starts from the rate it is given)
        assert_rel([sched.get_lr_at(t) for t in range(N + 1)], ref)


@pytest.mark.parametrize("name", ["lambda", "warm-restarts"])
def test_torchs_closed_forms_jump_back_to_initial_lr_which_base_lr_gives(name: str) -> None:
    ours, theirs = {
        "lambda": (lambda o, **kw: sch.LambdaLR(o, lam, **kw), lambda o: tl.LambdaLR(o, lam)),
        "warm-restarts": (
            lambda o, **kw: sch.CosineAnnealingWarmRestarts(o, 5, 1, 0.001, **kw),
            lambda o: tl.CosineAnnealingWarmRestarts(o, 5, 1, 0.001)),
    }[name]
    ref = _torch_after(theirs)
    got, _ = _ours_after(ours)
    assert (got[0], ref[0]) == (pytest.approx(0.0125, rel=1e-15), 0.1)
    assert_rel(got, torch_lrs(theirs, 0.0125, N))  # ours: torch's from the rate found
    got, _ = _ours_after(lambda o: ours(o, base_lr=0.1))
    assert_rel(got, ref)


def test_torchs_cosine_mixes_initial_lr_in_after_t_max_and_cyclic_at_step_0() -> None:
    got, _ = _ours_after(lambda o: sch.CosineAnnealingLR(o, 10, 0.001))
    ref = _torch_after(lambda o: tl.CosineAnnealingLR(o, 10, 0.001))
    assert_rel(got[:11], ref[:11])
    assert got[12] == pytest.approx(0.0020982, rel=1e-4)
    assert ref[12] == pytest.approx(0.0104536, rel=1e-4)
    got, _ = _ours_after(lambda o: sch.CyclicLR(o, 0.01, 0.1, 3))
    ref = _torch_after(lambda o: tl.CyclicLR(o, 0.01, 0.1, 3, cycle_momentum=False))
    assert (got[0], ref[0]) == (0.01, 0.1)
    assert_rel(got[1:], ref[1:])
