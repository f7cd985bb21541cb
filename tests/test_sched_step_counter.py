"""The step counter ``last_step`` (torch's ``last_epoch``) is read-only. Setting it used to be
accepted and move nothing: the optimizer's rate and ``get_last_lr()`` stayed, and
``MultiplicativeLR.get_lr_at`` went wrong from there on (0.1 · 0.5^t after 1 step and
``last_step = 5``: ``get_lr_at(6)`` 0.025 for 0.0015625). torch's own assignment moves the
counter only, its next rate chained from the current one (``ExponentialLR(0.5)``: 0.025 where
its uninterrupted run has 0.0015625), so there is no rate of torch's to match: ours refuses
it, naming the supported route, and changes nothing; the run then goes on as torch's
uninterrupted one, and ``load_state_dict`` of a run saved at step ``k`` gives torch's rates
from ``k`` on. float64, ``1e-12`` relative, every step.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable

import pytest
import torch
from scheduler_parity import FakeOpt, assert_rel, torch_lrs
from torch.optim import lr_scheduler as tl

import mithril.utils.lr_schedulers as sch

N, K = 20, 6


def mul(t: int) -> float:
    return 0.97 if t % 2 else 1.01


#: name -> (ours, torch's): closed forms, the recursive one and the composites
CASES: dict[str, tuple[Callable, Callable]] = {
    "multiplicative": (lambda o: sch.MultiplicativeLR(o, mul),
                       lambda o: tl.MultiplicativeLR(o, mul)),
    "exponential": (lambda o: sch.ExponentialLR(o, 0.9), lambda o: tl.ExponentialLR(o, 0.9)),
    "chained": (
        lambda o: sch.ChainedScheduler([sch.StepLR(o, 3, 0.5), sch.MultiplicativeLR(o, mul)]),
        lambda o: tl.ChainedScheduler([tl.StepLR(o, 3, 0.5), tl.MultiplicativeLR(o, mul)], o)),
    "sequential": (
        lambda o: sch.SequentialLR(o, [sch.LinearLR(o, 0.1, 1.0, 4),
                                       sch.MultiplicativeLR(o, mul)], [4]),
        lambda o: tl.SequentialLR(o, [tl.LinearLR(o, 0.1, 1.0, 4),
                                      tl.MultiplicativeLR(o, mul)], [4])),
    "warmup-join": (
        lambda o: sch.LinearWarmupScheduler(o, 4, 0.01, 0.1, sch.CosineAnnealingLR(o, 10)),
        lambda o: tl.SequentialLR(o, [tl.LinearLR(o, 0.1, 1.0, 4), tl.CosineAnnealingLR(o, 10)],
                                  [4])),
    "join": (
        lambda o: sch.JoinSchedules(o, [sch.ExponentialLR(o, 0.8),
                                        sch.MultiplicativeLR(o, mul)], [5]),
        lambda o: tl.SequentialLR(o, [tl.ExponentialLR(o, 0.8), tl.MultiplicativeLR(o, mul)],
                                  [5])),
    "swalr": (lambda o: sch.SWALR(o, 0.05, 5, "cos"),
              lambda o: torch.optim.swa_utils.SWALR(o, 0.05, 5, "cos")),
}


def _snapshot(sched: sch.LRScheduler, opt: FakeOpt) -> tuple:
    return (json.dumps(sched.state_dict()), opt.lr, opt.set_calls, sched.get_last_lrs(),
            [sched.get_lr_at(t) for t in range(N + 1)])


@pytest.mark.parametrize("attr", ["last_step", "last_epoch"])
@pytest.mark.parametrize("name", list(CASES))
def test_setting_the_counter_is_refused_and_the_run_stays_torchs(name: str, attr: str) -> None:
    ours, theirs = CASES[name]
    ref = torch_lrs(theirs, 0.1, N)
    opt = FakeOpt(0.1)
    sched = ours(opt)
    got = [opt.lr]
    for t in range(1, N + 1):
        if t == K:
            before = _snapshot(sched, opt)
            with pytest.raises(AttributeError, match=(
                    rf"{type(sched).__name__}\.last_step \(torch's last_epoch\) is read-only, "
                    rf"{attr} = 2 refused: step\(\) advances it .*load_state_dict\(saved_state\)")):
                setattr(sched, attr, 2)
            assert _snapshot(sched, opt) == before
        sched.step()
        got.append(opt.lr)
        assert (sched.last_step, sched.get_last_lr()) == (t, opt.lr)
    assert_rel(got, ref)
    if name != "swalr":  # (its closed form starts from the rate it is given)
        assert_rel([sched.get_lr_at(t) for t in range(N + 1)], ref)


def test_torchs_assignment_is_no_rate_to_match_and_load_state_dict_is() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        topt = torch.optim.SGD([torch.zeros(1, dtype=torch.float64, requires_grad=True)], lr=0.1)
        tsched = tl.ExponentialLR(topt, 0.5)
        tsched.step()
        tsched.last_epoch = 5
        tsched.step()
    uninterrupted = torch_lrs(lambda o: tl.ExponentialLR(o, 0.5), 0.1, N)
    assert (tsched.last_epoch, topt.param_groups[0]["lr"]) == (6, pytest.approx(0.025, rel=1e-15))
    assert uninterrupted[6] == pytest.approx(0.1 * 0.5**6, rel=1e-15)
    # ours: a run saved at step k, loaded into a fresh scheduler, is torch's uninterrupted one
    for k in range(N + 1):
        opt = FakeOpt(0.1)
        sched = sch.ExponentialLR(opt, 0.5)
        for _ in range(k):
            sched.step()
        saved = json.loads(json.dumps(sched.state_dict()))
        opt = FakeOpt(0.3)
        resumed = sch.ExponentialLR(opt, 0.5)
        resumed.load_state_dict(saved)
        got = [opt.lr]
        for _ in range(N - k):
            resumed.step()
            got.append(opt.lr)
        assert resumed.last_step == N
        assert_rel(got, uninterrupted[k:])
