"""``JoinSchedules`` of per-group children acts per group, as ``SequentialLR`` does (its
children argument is ``schedules``; it was read as ``schedulers``, so the composite had one
lane: ``get_last_lrs()`` held the optimizer's rate only and the state dict no groups). The
rates are torch's ``SequentialLR`` per group."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch.optim import lr_scheduler as ls

import mithril.utils.lr_schedulers as S
from mithril.utils.optimizers import SGD


def test_join_schedules_of_per_group_children_acts_per_group_as_torch():
    rates = [0.1, 0.02]
    opt = SGD(learning_rate=rates[0], param_groups=[{"params": ["b"], "learning_rate": rates[1]}])
    join = S.JoinSchedules(opt, [S.StepLR(opt, 2, 0.5, per_group=True),
                                 S.ExponentialLR(opt, 0.9, per_group=True)], [3],
                           last_step=1)
    topt = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": r}
                            for r in rates])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = ls.SequentialLR(topt, [ls.StepLR(topt, 2, 0.5), ls.ExponentialLR(topt, 0.9)], [3])
        topt.step()
        ref.step()
        assert join.per_group and join.last_step == 1
        for _ in range(8):
            want = [g["lr"] for g in topt.param_groups]
            np.testing.assert_allclose(join.get_last_lrs(), want, rtol=1e-12)
            np.testing.assert_allclose(
                [opt.learning_rate, opt.hyperparameter("learning_rate", 0).get()], want,
                rtol=1e-12)
            topt.step()
            ref.step()
            join.step()
    assert len(join.state_dict()["groups"]) == 1
