"""Resuming mid-run at *every* step, against ``torch.optim.lr_scheduler`` resumed the same way
in the same test: torch saves ``optimizer.state_dict()`` and ``scheduler.state_dict()`` after
``k`` steps and loads both into a fresh optimizer and scheduler; ours saves
``scheduler.state_dict()`` through JSON and loads it into a fresh scheduler on an optimizer at
another rate. Every scheduler torch has, the composites (``ChainedScheduler``,
``SequentialLR``, a warm-up join) included, on one parameter group and per group (three groups
with their own rates and momenta, cycled momenta included); and loaded into a scheduler built
with other arguments, where torch's ``load_state_dict`` takes the saved hyperparameters (its
``__dict__.update``): so do ours. Rates to ``1e-12`` relative, float64.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable

import pytest
import torch
from scheduler_parity import FakeOpt
from torch.optim import lr_scheduler as tl

import mithril.utils.lr_schedulers as sch
import mithril.utils.optimizers as mo

N = 24
TOL = 1e-12


def lam(t: int) -> float:
    return 0.95**t + 0.1 * (t % 3)


def mul(t: int) -> float:
    return 0.97 if t % 2 else 1.01


#: name -> (ours, torch's) on one parameter group
SINGLE: dict[str, tuple[Callable, Callable]] = {
    "step": (lambda o: sch.StepLR(o, 4, 0.5), lambda o: tl.StepLR(o, 4, 0.5)),
    "multistep": (lambda o: sch.MultiStepLR(o, [3, 7, 8, 20], 0.3),
                  lambda o: tl.MultiStepLR(o, [3, 7, 8, 20], 0.3)),
    "exponential": (lambda o: sch.ExponentialLR(o, 0.9), lambda o: tl.ExponentialLR(o, 0.9)),
    "cosine": (lambda o: sch.CosineAnnealingLR(o, 10, 0.01),
               lambda o: tl.CosineAnnealingLR(o, 10, 0.01)),
    "cosine-fractional-t-max": (lambda o: sch.CosineAnnealingLR(o, 7.5, 0.01),
                                lambda o: tl.CosineAnnealingLR(o, 7.5, 0.01)),
    "warm-restarts": (lambda o: sch.CosineAnnealingWarmRestarts(o, 3, 2, 0.001),
                      lambda o: tl.CosineAnnealingWarmRestarts(o, 3, 2, 0.001)),
    "one-cycle-three-phase": (
        lambda o: sch.OneCycleLR(o, 1.0, 30, pct_start=0.3, three_phase=True, div_factor=10,
                                 final_div_factor=100),
        lambda o: tl.OneCycleLR(o, 1.0, 30, pct_start=0.3, three_phase=True, div_factor=10,
                                final_div_factor=100, cycle_momentum=False)),
    "one-cycle-linear": (lambda o: sch.OneCycleLR(o, 1.0, 30, anneal_strategy="linear"),
                         lambda o: tl.OneCycleLR(o, 1.0, 30, anneal_strategy="linear",
                                                 cycle_momentum=False)),
    "lambda": (lambda o: sch.LambdaLR(o, lam), lambda o: tl.LambdaLR(o, lam)),
    "multiplicative": (lambda o: sch.MultiplicativeLR(o, mul),
                       lambda o: tl.MultiplicativeLR(o, mul)),
    "constant": (lambda o: sch.ConstantLR(o, 0.25, 6), lambda o: tl.ConstantLR(o, 0.25, 6)),
    "linear": (lambda o: sch.LinearLR(o, 0.2, 0.9, 9), lambda o: tl.LinearLR(o, 0.2, 0.9, 9)),
    "polynomial": (lambda o: sch.PolynomialLR(o, 12, 1.7), lambda o: tl.PolynomialLR(o, 12, 1.7)),
    "cyclic-triangular": (lambda o: sch.CyclicLR(o, 0.01, 0.1, 3, 5),
                          lambda o: tl.CyclicLR(o, 0.01, 0.1, 3, 5, cycle_momentum=False)),
    "cyclic-triangular2": (
        lambda o: sch.CyclicLR(o, 0.01, 0.1, 3, mode="triangular2"),
        lambda o: tl.CyclicLR(o, 0.01, 0.1, 3, mode="triangular2", cycle_momentum=False)),
    "cyclic-exp-range": (
        lambda o: sch.CyclicLR(o, 0.01, 0.1, 3, mode="exp_range", gamma=0.95),
        lambda o: tl.CyclicLR(o, 0.01, 0.1, 3, mode="exp_range", gamma=0.95,
                              cycle_momentum=False)),
    "cyclic-scale-fn-iterations": (
        lambda o: sch.CyclicLR(o, 0.01, 0.1, 3, scale_fn=lambda x: 0.9**x,
                               scale_mode="iterations"),
        lambda o: tl.CyclicLR(o, 0.01, 0.1, 3, scale_fn=lambda x: 0.9**x,
                              scale_mode="iterations", cycle_momentum=False)),
    "chained": (
        lambda o: sch.ChainedScheduler([sch.StepLR(o, 3, 0.5), sch.ExponentialLR(o, 0.95),
                                        sch.LinearLR(o, 0.5, 1.0, 5)]),
        lambda o: tl.ChainedScheduler([tl.StepLR(o, 3, 0.5), tl.ExponentialLR(o, 0.95),
                                       tl.LinearLR(o, 0.5, 1.0, 5)], o)),
    "sequential": (
        lambda o: sch.SequentialLR(o, [sch.LinearLR(o, 0.1, 1.0, 5), sch.CosineAnnealingLR(o, 10),
                                       sch.StepLR(o, 2, 0.5)], [5, 15]),
        lambda o: tl.SequentialLR(o, [tl.LinearLR(o, 0.1, 1.0, 5), tl.CosineAnnealingLR(o, 10),
                                      tl.StepLR(o, 2, 0.5)], [5, 15])),
    "sequential-multiplicative": (
        lambda o: sch.SequentialLR(o, [sch.LinearLR(o, 0.1, 1.0, 5),
                                       sch.MultiplicativeLR(o, mul)], [5]),
        lambda o: tl.SequentialLR(o, [tl.LinearLR(o, 0.1, 1.0, 5),
                                      tl.MultiplicativeLR(o, mul)], [5])),
    "warmup-join": (
        lambda o: sch.LinearWarmupScheduler(o, 5, 0.01, 0.1, sch.CosineAnnealingLR(o, 10)),
        lambda o: tl.SequentialLR(o, [tl.LinearLR(o, 0.1, 1.0, 5), tl.CosineAnnealingLR(o, 10)],
                                  [5])),
    "swalr": (lambda o: sch.SWALR(o, 0.05, 5, "cos"),
              lambda o: torch.optim.swa_utils.SWALR(o, 0.05, 5, "cos")),
}


def _torch_opt() -> torch.optim.SGD:
    return torch.optim.SGD([torch.zeros(1, dtype=torch.float64, requires_grad=True)], lr=0.1)


def _torch_resumed(theirs: Callable, k: int, other: Callable | None = None) -> list[float]:
    """torch's rates from step ``k`` on, saved after ``k`` steps and loaded into a fresh
    optimizer (at another rate) and a fresh scheduler (built by ``other`` if given)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = _torch_opt()
        sched = theirs(opt)
        for _ in range(k):
            opt.step()
            sched.step()
        saved_opt, saved = opt.state_dict(), sched.state_dict()
        opt = _torch_opt()
        opt.param_groups[0]["lr"] = 0.3
        sched = (other or theirs)(opt)
        opt.load_state_dict(saved_opt)
        sched.load_state_dict(saved)
        out = [float(opt.param_groups[0]["lr"])]
        for _ in range(N - k):
            opt.step()
            sched.step()
            out.append(float(opt.param_groups[0]["lr"]))
    return out


def _ours_resumed(ours: Callable, k: int, other: Callable | None = None) -> list[float]:
    opt = FakeOpt(0.1)
    sched = ours(opt)
    for _ in range(k):
        sched.step()
    saved = json.loads(json.dumps(sched.state_dict(), allow_nan=False))
    opt = FakeOpt(0.3)
    sched = (other or ours)(opt)
    sched.load_state_dict(saved)
    assert sched.last_step == k and sched.get_last_lr() == opt.lr
    out = [opt.lr]
    for _ in range(N - k):
        sched.step()
        out.append(opt.lr)
    return out


def _close(ours: list[float], ref: list[float], what: str) -> None:
    assert len(ours) == len(ref)
    bad = [(t, a, b) for t, (a, b) in enumerate(zip(ours, ref, strict=True))
           if abs(a - b) > TOL * max(abs(a), abs(b))]
    assert not bad, f"{what}: first mismatches (t, ours, torch): {bad[:3]}"


@pytest.mark.parametrize("name", list(SINGLE))
def test_resumed_at_every_step_as_torch_resumed(name: str) -> None:
    ours, theirs = SINGLE[name]
    full = _torch_resumed(theirs, 0)
    for k in range(N):
        ref = _torch_resumed(theirs, k)
        _close(ref, full[k:], f"torch's own resume after {k}")  # (torch is consistent too)
        _close(_ours_resumed(ours, k), ref, f"resumed after {k} steps")


#: name -> (ours saved, ours built otherwise, torch's saved, torch's built otherwise)
OTHER_ARGUMENTS: dict[str, tuple[Callable, Callable, Callable, Callable]] = {
    "step": (lambda o: sch.StepLR(o, 4, 0.5), lambda o: sch.StepLR(o, 7, 0.9),
             lambda o: tl.StepLR(o, 4, 0.5), lambda o: tl.StepLR(o, 7, 0.9)),
    "multistep": (lambda o: sch.MultiStepLR(o, [3, 7, 8, 20], 0.3),
                  lambda o: sch.MultiStepLR(o, [2], 0.5),
                  lambda o: tl.MultiStepLR(o, [3, 7, 8, 20], 0.3),
                  lambda o: tl.MultiStepLR(o, [2], 0.5)),
    "warm-restarts": (lambda o: sch.CosineAnnealingWarmRestarts(o, 3, 2, 0.001),
                      lambda o: sch.CosineAnnealingWarmRestarts(o, 5),
                      lambda o: tl.CosineAnnealingWarmRestarts(o, 3, 2, 0.001),
                      lambda o: tl.CosineAnnealingWarmRestarts(o, 5)),
    "one-cycle": (lambda o: sch.OneCycleLR(o, 1.0, 40, three_phase=True),
                  lambda o: sch.OneCycleLR(o, 0.5, 60),
                  lambda o: tl.OneCycleLR(o, 1.0, 40, three_phase=True, cycle_momentum=False),
                  lambda o: tl.OneCycleLR(o, 0.5, 60, cycle_momentum=False)),
    "polynomial": (lambda o: sch.PolynomialLR(o, 12, 1.7), lambda o: sch.PolynomialLR(o, 5),
                   lambda o: tl.PolynomialLR(o, 12, 1.7), lambda o: tl.PolynomialLR(o, 5)),
    "cyclic": (lambda o: sch.CyclicLR(o, 0.01, 0.1, 3, mode="triangular2"),
               lambda o: sch.CyclicLR(o, 0.02, 0.2, 5),
               lambda o: tl.CyclicLR(o, 0.01, 0.1, 3, mode="triangular2", cycle_momentum=False),
               lambda o: tl.CyclicLR(o, 0.02, 0.2, 5, cycle_momentum=False)),
    "sequential": (
        lambda o: sch.SequentialLR(o, [sch.LinearLR(o, 0.1, 1.0, 5), sch.CosineAnnealingLR(o, 10)],
                                   [5]),
        lambda o: sch.SequentialLR(o, [sch.LinearLR(o, 0.3, 1.0, 2), sch.CosineAnnealingLR(o, 30)],
                                   [2]),
        lambda o: tl.SequentialLR(o, [tl.LinearLR(o, 0.1, 1.0, 5), tl.CosineAnnealingLR(o, 10)],
                                  [5]),
        lambda o: tl.SequentialLR(o, [tl.LinearLR(o, 0.3, 1.0, 2), tl.CosineAnnealingLR(o, 30)],
                                  [2])),
    "chained": (
        lambda o: sch.ChainedScheduler([sch.StepLR(o, 3, 0.5), sch.ExponentialLR(o, 0.95)]),
        lambda o: sch.ChainedScheduler([sch.StepLR(o, 2, 0.1), sch.ExponentialLR(o, 0.5)]),
        lambda o: tl.ChainedScheduler([tl.StepLR(o, 3, 0.5), tl.ExponentialLR(o, 0.95)], o),
        lambda o: tl.ChainedScheduler([tl.StepLR(o, 2, 0.1), tl.ExponentialLR(o, 0.5)], o)),
}


@pytest.mark.parametrize("name", list(OTHER_ARGUMENTS))
def test_loaded_into_one_built_otherwise_takes_the_saved_arguments_as_torch(name: str) -> None:
    ours, ours_other, theirs, theirs_other = OTHER_ARGUMENTS[name]
    for k in range(0, N, 3):
        ref = _torch_resumed(theirs, k, theirs_other)
        _close(ref, _torch_resumed(theirs, k), f"torch after {k}")  # (its saved arguments)
        _close(_ours_resumed(ours, k, ours_other), ref, f"loaded after {k} steps")


# -- several parameter groups, each with its own rate and momentum ---------------------------
LR = 0.1

#: name -> (ours on the grouped optimizer, torch's): every group its own base (and momentum)
GROUPED: dict[str, tuple[Callable, Callable]] = {
    "multistep": (lambda o: sch.MultiStepLR(o, [3, 7, 8, 20], 0.3, per_group=True),
                  lambda o: tl.MultiStepLR(o, [3, 7, 8, 20], 0.3)),
    "warm-restarts": (lambda o: sch.CosineAnnealingWarmRestarts(o, 3, 2, 0.001, per_group=True),
                      lambda o: tl.CosineAnnealingWarmRestarts(o, 3, 2, 0.001)),
    "one-cycle-momentum": (
        lambda o: sch.OneCycleLR(o, [1.0, 0.5, 2.0], 30, three_phase=True, cycle_momentum=True),
        lambda o: tl.OneCycleLR(o, [1.0, 0.5, 2.0], 30, three_phase=True)),
    "lambda-list": (lambda o: sch.LambdaLR(o, [lam, mul, lambda t: 1 / (t + 1)]),
                    lambda o: tl.LambdaLR(o, [lam, mul, lambda t: 1 / (t + 1)])),
    "multiplicative": (lambda o: sch.MultiplicativeLR(o, mul, per_group=True),
                       lambda o: tl.MultiplicativeLR(o, mul)),
    "polynomial": (lambda o: sch.PolynomialLR(o, 12, 1.7, per_group=True),
                   lambda o: tl.PolynomialLR(o, 12, 1.7)),
    "cyclic-exp-range-momentum": (
        lambda o: sch.CyclicLR(o, [0.01, 0.02, 0.03], [0.1, 0.2, 0.3], 3, mode="exp_range",
                               gamma=0.95, cycle_momentum=True, base_momentum=[0.8, 0.7, 0.4],
                               max_momentum=0.95),
        lambda o: tl.CyclicLR(o, [0.01, 0.02, 0.03], [0.1, 0.2, 0.3], 3, mode="exp_range",
                              gamma=0.95, base_momentum=[0.8, 0.7, 0.4], max_momentum=0.95)),
    "chained": (
        lambda o: sch.ChainedScheduler([sch.StepLR(o, 3, 0.5, per_group=True),
                                        sch.ExponentialLR(o, 0.95, per_group=True)]),
        lambda o: tl.ChainedScheduler([tl.StepLR(o, 3, 0.5), tl.ExponentialLR(o, 0.95)], o)),
    "sequential-multiplicative": (
        lambda o: sch.SequentialLR(o, [sch.LinearLR(o, 0.1, 1.0, 5, per_group=True),
                                       sch.MultiplicativeLR(o, mul, per_group=True)], [5]),
        lambda o: tl.SequentialLR(o, [tl.LinearLR(o, 0.1, 1.0, 5),
                                      tl.MultiplicativeLR(o, mul)], [5])),
    "swalr": (lambda o: sch.SWALR(o, [0.05, 0.01, 0.2], 5, "linear"),
              lambda o: torch.optim.swa_utils.SWALR(o, [0.05, 0.01, 0.2], 5, "linear")),
}


def _torch_grouped() -> torch.optim.SGD:
    ps = [torch.zeros(2, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    return torch.optim.SGD([{"params": [ps[0]]}, {"params": [ps[1]], "lr": LR * 0.5},
                            {"params": [ps[2]], "lr": LR * 2, "momentum": 0.5}],
                           lr=LR, momentum=0.9)


def _ours_grouped() -> mo.SGD:
    return mo.SGD(learning_rate=LR, momentum=0.9,
                  param_groups=[{"params": ["b"], "learning_rate": LR * 0.5},
                                {"params": ["c"], "learning_rate": LR * 2, "momentum": 0.5}])


def _torch_values(opt: torch.optim.Optimizer) -> list[float]:
    return [float(g[k]) for k in ("lr", "momentum") for g in opt.param_groups]


def _our_values(opt: mo.SGD) -> list[float]:
    return [opt.hyperparameter(k, g).get() for k in ("learning_rate", "momentum")
            for g in (None, 0, 1)]


@pytest.mark.parametrize("name", list(GROUPED))
def test_per_group_resumed_at_every_step_as_torchs_run(name: str) -> None:
    ours, theirs = GROUPED[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        topt = _torch_grouped()
        tsched = theirs(topt)
        ref = [_torch_values(topt)]
        for _ in range(N):
            topt.step()
            tsched.step()
            ref.append(_torch_values(topt))
    for k in range(N):
        opt = _ours_grouped()
        sched = ours(opt)
        for _ in range(k):
            sched.step()
        saved = json.loads(json.dumps(sched.state_dict(), allow_nan=False))
        opt = _ours_grouped()
        sched = ours(opt)
        sched.load_state_dict(saved)
        got = [_our_values(opt)]
        for _ in range(N - k):
            sched.step()
            got.append(_our_values(opt))
        for t, (a, b) in enumerate(zip(got, ref[k:], strict=True)):
            _close(a, b, f"resumed after {k}, step {k + t}")
