"""Schedulers built at a given step: ``last_step=n`` or torch's ``last_epoch=k`` (``= n - 1``).

Side by side with ``torch.optim.lr_scheduler`` built with ``last_epoch=k`` (``initial_lr`` in
its group, and the group's rate where torch 2.13 expects it: the rate of step ``k`` for the
schedulers whose first step applies a decay, of step ``k + 1`` for those whose initial step
keeps the rate; the closed forms ignore it), the whole sequence of rates afterwards is equal to
1e-12, for ``k`` before, on and past milestones and cycles. Where torch's ``last_epoch`` gives
no resumed schedule (``SequentialLR`` restarts its first child, ``SWALR`` counts its own steps,
``CosineAnnealingWarmRestarts`` past its first cycle with ``T_mult > 1``; ``ChainedScheduler``
takes none) ours equal torch's uninterrupted run. Every scheduler built at step ``n`` is the
one built at 0 and stepped ``n`` times (state dict included) and resumes from its state dict.
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import numpy as np
import pytest
import torch
from scheduler_parity import FakeOpt, assert_rel, torch_lrs
from torch.optim import lr_scheduler as ls
from torch.optim.swa_utils import SWALR as TorchSWALR

import mithril.utils.lr_schedulers as S
from mithril.utils.optimizers import SGD

BASE = 0.1
M = 40  # steps compared after the start
KS = [0, 1, 2, 3, 4, 8, 14, 21, 57]


def _mult(t: int) -> float:
    return 0.9 if t % 2 else 0.8


def _lam(t: int) -> float:
    return 1.0 / (t + 1)


# name: (torch's, ours, where torch wants the group's rate: "k", "k+1" or "any")
CASES = {
    "StepLR": (lambda o, **k: ls.StepLR(o, 3, 0.5, **k),
               lambda o, **k: S.StepLR(o, 3, 0.5, **k), "k"),
    "MultiStepLR": (lambda o, **k: ls.MultiStepLR(o, [2, 5, 5, 9, 30], 0.5, **k),
                    lambda o, **k: S.MultiStepLR(o, [2, 5, 5, 9, 30], 0.5, **k), "k"),
    "ConstantLR": (lambda o, **k: ls.ConstantLR(o, 0.3, 4, **k),
                   lambda o, **k: S.ConstantLR(o, 0.3, 4, **k), "k"),
    "ExponentialLR": (lambda o, **k: ls.ExponentialLR(o, 0.93, **k),
                      lambda o, **k: S.ExponentialLR(o, 0.93, **k), "k+1"),
    "LinearLR": (lambda o, **k: ls.LinearLR(o, 0.2, 0.9, 9, **k),
                 lambda o, **k: S.LinearLR(o, 0.2, 0.9, 9, **k), "k+1"),
    "PolynomialLR": (lambda o, **k: ls.PolynomialLR(o, 12, 2.0, **k),
                     lambda o, **k: S.PolynomialLR(o, 12, 2.0, **k), "k+1"),
    "CosineAnnealingLR": (lambda o, **k: ls.CosineAnnealingLR(o, 7, 0.01, **k),
                          lambda o, **k: S.CosineAnnealingLR(o, 7, 0.01, **k), "k+1"),
    "MultiplicativeLR": (lambda o, **k: ls.MultiplicativeLR(o, _mult, **k),
                         lambda o, **k: S.MultiplicativeLR(o, _mult, **k), "k+1"),
    "LambdaLR": (lambda o, **k: ls.LambdaLR(o, _lam, **k),
                 lambda o, **k: S.LambdaLR(o, _lam, **k), "any"),
    "CosineAnnealingWarmRestarts": (
        lambda o, **k: ls.CosineAnnealingWarmRestarts(o, 5, 1, 0.01, **k),
        lambda o, **k: S.CosineAnnealingWarmRestarts(o, 5, 1, 0.01, **k), "any"),
    "CyclicLR": (lambda o, **k: ls.CyclicLR(o, 0.01, 0.2, 3, 2, cycle_momentum=False, **k),
                 lambda o, **k: S.CyclicLR(o, 0.01, 0.2, 3, 2, **k), "any"),
    "CyclicLR-triangular2": (
        lambda o, **k: ls.CyclicLR(o, 0.01, 0.2, 3, mode="triangular2", cycle_momentum=False,
                                   **k),
        lambda o, **k: S.CyclicLR(o, 0.01, 0.2, 3, mode="triangular2", **k), "any"),
    "CyclicLR-exp_range": (
        lambda o, **k: ls.CyclicLR(o, 0.01, 0.2, 4, mode="exp_range", gamma=0.97,
                                   cycle_momentum=False, **k),
        lambda o, **k: S.CyclicLR(o, 0.01, 0.2, 4, mode="exp_range", gamma=0.97, **k), "any"),
    "OneCycleLR": (lambda o, **k: ls.OneCycleLR(o, 0.5, total_steps=120, cycle_momentum=False,
                                                **k),
                   lambda o, **k: S.OneCycleLR(o, 0.5, total_steps=120, **k), "any"),
    "OneCycleLR-linear-3": (
        lambda o, **k: ls.OneCycleLR(o, 0.5, total_steps=110, anneal_strategy="linear",
                                     three_phase=True, cycle_momentum=False, **k),
        lambda o, **k: S.OneCycleLR(o, 0.5, total_steps=110, anneal_strategy="linear",
                                    three_phase=True, **k), "any"),
}


def _torch_at(make, k: int, where: str, ref: list[float]) -> tuple[int, list[float]]:
    """torch's scheduler built with ``last_epoch=k`` on an optimizer resumed as torch expects:
    its counter after construction and its rates then and after each of ``M`` steps."""
    fresh = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=BASE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make(fresh)  # (the group keys torch's run put there: initial_lr, max_lr, ...)
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=BASE)
        opt.param_groups[0].update({key: v for key, v in fresh.param_groups[0].items()
                                    if key not in ("params", "lr")})
        opt.param_groups[0]["lr"] = {"k": ref[k], "k+1": ref[k + 1], "any": BASE}[where]
        sched = make(opt, last_epoch=k)
        out = [float(opt.param_groups[0]["lr"])]
        for _ in range(M):
            opt.step()
            sched.step()
            out.append(float(opt.param_groups[0]["lr"]))
    return sched.last_epoch - M, out


def _ours(sched: S.LRScheduler, opt: FakeOpt | SGD) -> list[float]:
    out = [float(opt.get_learning_rate())]
    assert sched.get_last_lr() == out[0]
    for _ in range(M):
        sched.step()
        out.append(float(opt.get_learning_rate()))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_last_epoch_gives_torchs_rates(name):
    make_torch, make_ours, where = CASES[name]
    ref = torch_lrs(make_torch, BASE, n=max(KS) + M + 2)
    for k in KS:
        counter, want = _torch_at(make_torch, k, where, ref)
        opt = FakeOpt(BASE)
        sched = make_ours(opt, last_epoch=k)
        assert (sched.last_step, counter) == (k + 1, k + 1)
        got = _ours(sched, opt)
        assert_rel(got, want)
        assert_rel(got, ref[k + 1: k + 2 + M])  # the uninterrupted run's, from step k + 1
        # last_step=n is last_epoch=n-1, on a mithril optimizer too
        sgd = SGD(learning_rate=BASE)
        assert_rel(_ours(make_ours(sgd, last_step=k + 1), sgd), want)


# torch's last_epoch gives no resumed schedule here (see the module's docstring): ours are
# torch's uninterrupted run from step n
UNINTERRUPTED = {
    "CosineAnnealingWarmRestarts-T_mult2": (
        lambda o: ls.CosineAnnealingWarmRestarts(o, 3, 2, 0.01),
        lambda o, **k: S.CosineAnnealingWarmRestarts(o, 3, 2, 0.01, **k)),
    "SequentialLR": (
        lambda o: ls.SequentialLR(o, [ls.LinearLR(o, 0.1, 1.0, 5), ls.StepLR(o, 4, 0.5),
                                      ls.ExponentialLR(o, 0.9)], [5, 17]),
        lambda o, **k: S.SequentialLR(o, [S.LinearLR(o, 0.1, 1.0, 5), S.StepLR(o, 4, 0.5),
                                          S.ExponentialLR(o, 0.9)], [5, 17], **k)),
    "ChainedScheduler": (
        lambda o: ls.ChainedScheduler([ls.StepLR(o, 4, 0.5), ls.ExponentialLR(o, 0.95)]),
        lambda o, **k: S.ChainedScheduler([S.StepLR(o, 4, 0.5), S.ExponentialLR(o, 0.95)],
                                          **k)),
    "SWALR": (lambda o: TorchSWALR(o, 0.02, anneal_epochs=6),
              lambda o, **k: S.SWALR(o, 0.02, anneal_epochs=6, **k)),
    "SWALR-linear": (lambda o: TorchSWALR(o, 0.3, anneal_epochs=5, anneal_strategy="linear"),
                     lambda o, **k: S.SWALR(o, 0.3, anneal_epochs=5, anneal_strategy="linear",
                                            **k)),
}


@pytest.mark.parametrize("name", list(UNINTERRUPTED))
def test_last_epoch_is_torchs_uninterrupted_run(name):
    make_torch, make_ours = UNINTERRUPTED[name]
    ref = torch_lrs(make_torch, BASE, n=max(KS) + M + 2)
    for k in KS:
        opt = FakeOpt(BASE)
        sched = make_ours(opt, last_epoch=k)
        assert sched.last_step == k + 1
        assert_rel(_ours(sched, opt), ref[k + 1: k + 2 + M])


def _every_scheduler(opt):
    """One of each scheduler (mithril's own too), built on ``opt`` with the start keywords
    given to the outer one only (a composite's children are built at step 0)."""
    return {
        "StepLR": lambda **k: S.StepLR(opt, 3, 0.5, **k),
        "ExponentialLR": lambda **k: S.ExponentialLR(opt, 0.9, base_lr=0.2, **k),
        "CosineAnnealingWarmRestarts": lambda **k: S.CosineAnnealingWarmRestarts(opt, 3, 2, **k),
        "OneCycleLR-momentum": lambda **k: S.OneCycleLR(opt, 0.4, total_steps=50,
                                                        cycle_momentum=True, **k),
        "CyclicLR": lambda **k: S.CyclicLR(opt, 0.01, 0.2, 3, cycle_momentum=True, **k),
        "PolynomialLR": lambda **k: S.PolynomialLR(opt, 10, 1.5, **k),
        "LambdaLR": lambda **k: S.LambdaLR(opt, _lam, **k),
        "MultiplicativeLR": lambda **k: S.MultiplicativeLR(opt, _mult, **k),
        "WSD": lambda **k: S.WSD(opt, 5, 10, 6, **k),
        "InverseSqrt": lambda **k: S.InverseSqrt(opt, 4, **k),
        "PiecewiseConstant": lambda **k: S.PiecewiseConstant(opt, {3: 0.5, 8: 0.2}, **k),
        "ExponentialDecay": lambda **k: S.ExponentialDecay(opt, 5, 0.5, 2, **k),
        "CosineDecayRestarts": lambda **k: S.CosineDecayRestarts(opt, 4, **k),
        "sgdr_schedule": lambda **k: S.sgdr_schedule(
            opt, [{"init_value": 0.0, "peak_value": 0.1, "warmup_steps": 2, "decay_steps": 6},
                  {"init_value": 0.0, "peak_value": 0.05, "warmup_steps": 1,
                   "decay_steps": 5}], **k),
        "LinearWarmupScheduler": lambda **k: S.LinearWarmupScheduler(
            opt, 4, 0.01, 0.1, after_scheduler=S.StepLR(opt, 3, 0.5), **k),
        "JoinSchedules": lambda **k: S.JoinSchedules(
            opt, [S.LinearLR(opt, 0.1, 1.0, 4), S.CosineAnnealingLR(opt, 9)], [4], **k),
        "SequentialLR": lambda **k: S.SequentialLR(
            opt, [S.StepLR(opt, 2, 0.5), S.MultiplicativeLR(opt, _mult), S.SWALR(opt, 0.01)],
            [4, 9], **k),
        "ChainedScheduler": lambda **k: S.ChainedScheduler(
            [S.StepLR(opt, 4, 0.5), S.CyclicLR(opt, 0.01, 0.2, 3)], **k),
        "SWALR": lambda **k: S.SWALR(opt, 0.02, anneal_epochs=4, **k),
    }


def _opt() -> SGD:
    return SGD(learning_rate=BASE, momentum=0.9)


@pytest.mark.parametrize("name", list(_every_scheduler(_opt())))
@pytest.mark.parametrize("n", [0, 1, 4, 9, 23])
def test_built_at_n_is_built_at_0_and_stepped_n_times(name, n):
    opt_a, opt_b = _opt(), _opt()
    stepped = _every_scheduler(opt_a)[name]()
    for _ in range(n):
        stepped.step()
    at = _every_scheduler(opt_b)[name](last_step=n)
    assert at.state_dict() == stepped.state_dict()
    assert (opt_b.learning_rate, opt_b.momentum) == (opt_a.learning_rate, opt_a.momentum)
    # and it goes on, and resumes from its state dict, as the stepped one
    saved = json.loads(json.dumps(at.state_dict(), allow_nan=False))
    opt_c = _opt()
    resumed = _every_scheduler(opt_c)[name]()
    resumed.load_state_dict(saved)
    for _ in range(7):
        for s in (stepped, at, resumed):
            s.step()
        rates = {(o.learning_rate, o.momentum) for o in (opt_a, opt_b, opt_c)}
        assert len(rates) == 1, rates
    assert at.state_dict() == stepped.state_dict() == resumed.state_dict()


def test_per_group_last_epoch_gives_torchs_rates():
    # two groups of their own rates, torch's initial_lr being each group's
    groups = [{"params": ["b"], "learning_rate": 0.02}, {"params": ["s"], "momentum": 0.5}]
    rates = [0.1, 0.02, 0.1]
    for k in [0, 5, 11]:
        opt = SGD(learning_rate=0.1, momentum=0.9, param_groups=copy.deepcopy(groups))
        sched = S.StepLR(opt, 4, 0.3, per_group=True, last_epoch=k)
        ps = [torch.zeros(1, requires_grad=True) for _ in rates]
        topt = torch.optim.SGD([{"params": [p], "lr": r, "initial_lr": r}
                                for p, r in zip(ps, rates, strict=True)], lr=0.1)
        for g, r in zip(topt.param_groups, rates, strict=True):
            g["lr"] = r * 0.3 ** (k // 4)  # the rate of step k, as torch resumed
        tsched = ls.StepLR(topt, 4, 0.3, last_epoch=k)
        for _ in range(20):
            want = [g["lr"] for g in topt.param_groups]
            np.testing.assert_allclose(sched.get_last_lrs(), want, rtol=1e-12)
            topt.step()
            tsched.step()
            sched.step()
        assert sched.last_step == tsched.last_epoch == k + 21


def test_base_lr_keyword_is_torchs_initial_lr():
    # an optimizer resumed at the rate of step k (not its base): base_lr= gives the base,
    # as torch's group["initial_lr"]
    opt = SGD(learning_rate=BASE * 0.5 ** 2)
    sched = S.StepLR(opt, 3, 0.5, base_lr=BASE, last_epoch=7)
    assert (sched.last_step, opt.learning_rate) == (8, BASE * 0.5 ** 2)
    sched.step()
    assert opt.learning_rate == BASE * 0.5 ** 3


@pytest.mark.parametrize(("kw", "err", "msg"), [
    ({"last_step": -1}, ValueError, r"StepLR: last_step must be an integer >= 0, got -1"),
    ({"last_epoch": -2}, ValueError, r"StepLR: last_epoch must be an integer >= -1, got -2"),
    ({"last_epoch": 2.5}, ValueError, r"last_epoch must be an integer >= -1, got 2.5"),
    ({"last_step": True}, ValueError, r"last_step must be an integer >= 0, got True"),
    ({"last_step": 2 ** 80}, ValueError, r"last_step is too large"),
    ({"last_step": 1, "last_epoch": 0}, TypeError, r"not both \(last_epoch=k is last_step=k\+1"),
])
def test_bad_start_is_refused_and_changes_nothing(kw, err, msg):
    opt = FakeOpt(BASE)
    with pytest.raises(err, match=msg):
        S.StepLR(opt, 3, 0.5, **kw)
    assert (opt.lr, opt.set_calls) == (BASE, 0)


def test_a_metric_driven_scheduler_takes_no_start_step():
    opt = FakeOpt(BASE)
    with pytest.raises(TypeError, match=r"ReduceLROnPlateau: no last_epoch= \(it follows the "
                                        r"metrics"):
        S.ReduceLROnPlateau(opt, last_epoch=3)
    first, plateau = S.StepLR(opt, 2), S.ReduceLROnPlateau(opt)
    before = (opt.lr, opt.set_calls, plateau.state_dict())
    with pytest.raises(TypeError, match=r"SequentialLR: no last_step= \(its ReduceLROnPlateau"):
        S.SequentialLR(opt, [first, plateau], [3], last_step=4)
    assert (opt.lr, opt.set_calls, plateau.state_dict()) == before
    # as torch: last_epoch=-1 (and last_step=0) is a scheduler built at step 0
    assert S.ReduceLROnPlateau(opt, last_epoch=-1).last_step == 0
    assert S.StepLR(opt, 3, last_step=0).state_dict() == S.StepLR(opt, 3).state_dict()


def test_a_refused_rate_at_the_start_step_changes_nothing():
    # the rate of step 6 is inf: the constructor raises, the optimizer and child as before
    opt = FakeOpt(BASE)
    child = S.ExponentialLR(opt, 1e200)
    before = (opt.lr, child.state_dict())
    with pytest.raises(ValueError, match=r"at step 2 is inf"):
        S.SequentialLR(opt, [S.StepLR(opt, 2), child], [4], last_step=6)
    assert (opt.lr, child.state_dict()) == before
    with pytest.raises(ValueError, match=r"at step 6 is inf"):
        S.ExponentialLR(opt, 1e200, last_step=6)
    assert opt.lr == BASE and math.isfinite(opt.lr)


def test_a_far_start_jumps_for_a_closed_form_and_is_refused_past_the_stepping_limit():
    from mithril.utils.lr_schedulers.start import MAX_STEPPED

    opt = FakeOpt(BASE)
    sched = S.CosineAnnealingLR(opt, 7, 0.01, last_step=10**12)  # at once, as get_lr_at
    assert (sched.last_step, opt.lr) == (10**12, sched.get_lr_at(10**12))
    first = S.StepLR(opt, 2)
    before = (opt.lr, first.state_dict())
    with pytest.raises(ValueError, match=rf"SequentialLR: last_step={MAX_STEPPED + 1} is too "
                                         rf"large: a SequentialLR is stepped one step at a time"):
        S.SequentialLR(opt, [first, S.ExponentialLR(opt, 0.9)], [3], last_step=MAX_STEPPED + 1)
    assert (opt.lr, first.state_dict()) == before
    calls = opt.set_calls
    with pytest.raises(ValueError, match=r"MultiplicativeLR: last_epoch=\d+ is too large"):
        S.MultiplicativeLR(opt, _mult, last_epoch=MAX_STEPPED)  # (a product of 10**6 calls)
    assert (opt.lr, opt.set_calls) == (before[0], calls)


def test_a_torch_state_dicts_last_epoch_is_our_last_step():
    # a torch run's saved scheduler state: refused by load_state_dict, which names the way
    make_torch, make_ours, _ = CASES["MultiStepLR"]
    topt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=BASE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = make_torch(topt)
        for _ in range(7):
            topt.step()
            ref.step()
    saved = ref.state_dict()
    with pytest.raises(ValueError, match=r"build it with last_step=state_dict\['last_epoch'\]"):
        make_ours(FakeOpt(BASE)).load_state_dict(saved)
    opt = FakeOpt(BASE)
    ours = make_ours(opt, last_step=saved["last_epoch"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(30):
            assert [ours.get_last_lr()] == ref.get_last_lr() == [opt.lr]
            topt.step()
            ref.step()
            ours.step()


_PG = {"per_group": True}
PER_GROUP = {
    "SequentialLR": lambda o, **k: S.SequentialLR(
        o, [S.StepLR(o, 2, 0.5, **_PG), S.MultiplicativeLR(o, [_mult] * 2),
            S.SWALR(o, 0.01, **_PG)], [4, 9], **k),
    "ChainedScheduler": lambda o, **k: S.ChainedScheduler(
        [S.StepLR(o, 4, 0.5, **_PG),
         S.CyclicLR(o, [0.01, 0.001], [0.2, 0.02], 3, cycle_momentum=True)], **k),
    "LinearWarmupScheduler": lambda o, **k: S.LinearWarmupScheduler(
        o, 4, [0.01, 0.001], [0.1, 0.02], after_scheduler=S.CosineAnnealingLR(o, 9, **_PG), **k),
    "JoinSchedules": lambda o, **k: S.JoinSchedules(
        o, [S.LinearLR(o, 0.1, 1.0, 4, **_PG), S.CosineAnnealingWarmRestarts(o, 3, 2, **_PG)],
        [4], **k),
    "sgdr_schedule": lambda o, **k: S.sgdr_schedule(
        o, [{"init_value": 0.0, "peak_value": [0.1, 0.02], "warmup_steps": 2,
             "decay_steps": 6}] * 2, **k),
    "OneCycleLR": lambda o, **k: S.OneCycleLR(o, [0.4, 0.04], total_steps=50,
                                              cycle_momentum=True, **k),
}


@pytest.mark.parametrize("name", list(PER_GROUP))
def test_per_group_built_at_n_is_built_at_0_and_stepped_n_times(name):
    def opt():
        return SGD(learning_rate=BASE, momentum=0.9, param_groups=[
            {"params": ["b"], "learning_rate": 0.02, "momentum": 0.5}])

    def values(o):
        return [o.hyperparameter(h, g).get() for h in ("learning_rate", "momentum")
                for g in (None, 0)]

    for n in [1, 3, 7, 13]:
        opt_a, opt_b = opt(), opt()
        stepped = PER_GROUP[name](opt_a)
        for _ in range(n):
            stepped.step()
        at = PER_GROUP[name](opt_b, last_step=n)
        assert at.per_group and at.state_dict() == stepped.state_dict()
        for _ in range(5):
            assert values(opt_a) == values(opt_b)
            stepped.step()
            at.step()
