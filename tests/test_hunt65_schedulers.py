"""Review hunt 65, learning-rate schedulers side by side with ``torch.optim.lr_scheduler``
(three parameter groups of their own rates, float64, every step)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch.optim import lr_scheduler as ls

import mithril.utils.lr_schedulers as S
from mithril.utils.optimizers import SGD

LRS = (0.1, 0.02, 0.3)
REL = 1e-12


def _pair() -> tuple[SGD, torch.optim.SGD]:
    groups = [{"params": [k], "learning_rate": lr} for k, lr in zip("bc", LRS[1:], strict=True)]
    opt = SGD(learning_rate=LRS[0], momentum=0.9, param_groups=groups)
    ref = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": lr}
                           for lr in LRS], momentum=0.9)
    return opt, ref


def _rates(opt: SGD) -> list[float]:
    return [opt.hyperparameter("learning_rate", g).get() for g in (None, 0, 1)]


def _side_by_side(ours, theirs, steps: int = 40) -> None:
    opt, ref = _pair()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched, ref_sched = ours(opt), theirs(ref)
        for i in range(steps + 1):
            if i:
                ref.step()
                ref_sched.step()
                sched.step()
            want = [g["lr"] for g in ref.param_groups]
            assert all(abs(a - b) <= REL * b for a, b in zip(_rates(opt), want, strict=True)), i
            assert all(abs(a - b) <= REL * b for a, b in
                       zip(sched.get_last_lrs(), ref_sched.get_last_lr(), strict=True)), i


# torch iterates milestones (MultiStepLR: Counter(milestones); SequentialLR: len / bisect):
# a NumPy array or a set was refused here ("must be a sequence of integers")
@pytest.mark.parametrize("milestones", [np.array([9, 3, 3, 20]), {3, 9, 20}, np.arange(5, 40, 7)],
                         ids=["ndarray", "set", "arange"])
def test_multistep_milestones_of_any_collection_torch_takes(milestones) -> None:
    _side_by_side(lambda o: S.MultiStepLR(o, milestones, 0.5, per_group=True),
                  lambda o: ls.MultiStepLR(o, milestones, 0.5))
    # set mid-run: the same closed form on every lane
    opt, _ = _pair()
    sched = S.MultiStepLR(opt, [1], 0.5, per_group=True)
    sched.milestones = milestones
    want = sorted(int(m) for m in milestones)
    assert sched.milestones == want and sched._siblings[1].milestones == want
    assert all(type(m) is int for m in sched.state_dict()["milestones"])


def test_sequential_milestones_as_an_array() -> None:
    _side_by_side(
        lambda o: S.SequentialLR(o, [S.LinearLR(o, 0.1, 1.0, 5, per_group=True),
                                     S.CosineAnnealingLR(o, 20, 1e-3, per_group=True)],
                                 np.array([6])),
        lambda o: ls.SequentialLR(o, [ls.LinearLR(o, 0.1, 1.0, 5),
                                      ls.CosineAnnealingLR(o, 20, 1e-3)], np.array([6])))


@pytest.mark.parametrize("bad", [iter([3, 5]), (m for m in (3, 5)), {3: 2}, np.array(3), "35",
                                 [np.array([3, 5])], [2.5]])
def test_milestones_refused_change_nothing(bad) -> None:
    opt, _ = _pair()
    before = _rates(opt)
    with pytest.raises(ValueError, match="milestones"):
        S.MultiStepLR(opt, bad, 0.5, per_group=True)
    assert _rates(opt) == before
    sched = S.MultiStepLR(opt, [2], 0.5, per_group=True)
    sched.step()
    state = sched.state_dict()
    with pytest.raises(ValueError, match="milestones"):
        sched.milestones = bad
    assert sched.state_dict() == state and _rates(opt) == before
