"""Random configurations of every torch scheduler side by side with ``torch.optim.lr_scheduler``.

Each case draws the scheduler's arguments (degenerate ones included: ``gamma`` 0 or 1,
milestones repeated or 0, ``T_mult`` 1..3, fractional ``CyclicLR`` step sizes, the momentum
cycled or not) and three parameter groups of their own rates and momenta, acts per group
(``per_group=True`` or lists, as torch) and runs 300 steps: every group's ``lr`` and
``momentum``, and ``get_last_lrs()`` against torch's ``get_last_lr()``, agree to 1e-12
(relative; torch's recursive forms round differently from our closed forms). The same
scheduler built with a random ``last_epoch=k`` gives torch's uninterrupted run from step
``k + 1``. Composites (``SequentialLR``, ``ChainedScheduler``) of random children, built at a
random step, give torch's uninterrupted run.
"""

from __future__ import annotations

import math
import random
import warnings

import pytest
import torch
from torch.optim import lr_scheduler as ls
from torch.optim.swa_utils import SWALR as TorchSWALR

import mithril.utils.lr_schedulers as S
from mithril.utils.optimizers import SGD

STEPS = 300
REL = 1e-12
SEEDS = range(5)


def _conf(r: random.Random, name: str) -> dict:
    """Random arguments of ``name`` that torch and ours both take."""
    u, ri = r.uniform, r.randint
    if name == "StepLR":
        return {"step_size": ri(1, 20), "gamma": r.choice([0.0, u(0.1, 1.0), 1.0, u(1, 1.05)])}
    if name == "MultiStepLR":
        return {"milestones": [ri(0, 200) for _ in range(ri(0, 5))], "gamma": u(0, 1.2)}
    if name == "ExponentialLR":
        return {"gamma": r.choice([u(0.9, 1.0), 1.0, 0.0, u(0.98, 1.01)])}
    if name == "CosineAnnealingLR":
        return {"T_max": ri(1, 60), "eta_min": r.choice([0.0, u(0, 0.05), u(0, 0.2)])}
    if name == "CosineAnnealingWarmRestarts":
        return {"T_0": ri(1, 30), "T_mult": ri(1, 3), "eta_min": r.choice([0.0, u(0, 0.05)])}
    if name == "LinearLR":
        return {"start_factor": u(0.01, 1.0), "end_factor": u(0.0, 1.0), "total_iters": ri(1, 80)}
    if name == "ConstantLR":
        return {"factor": u(0, 1), "total_iters": ri(1, 50)}
    if name == "PolynomialLR":
        return {"total_iters": ri(1, 80), "power": r.choice([1.0, 2.0, u(0.3, 3)])}
    if name == "OneCycleLR":
        three = r.random() < 0.4
        return {"max_lr": u(0.05, 1.0), "total_steps": ri(2 * STEPS + 20, 2 * STEPS + 100),
                "pct_start": u(0.05, 0.45) if three else r.choice([0.0, u(0.05, 0.6)]),
                "anneal_strategy": r.choice(["cos", "linear"]), "div_factor": u(2, 30),
                "final_div_factor": u(10, 1e4), "three_phase": three,
                "cycle_momentum": r.random() < 0.5}
    if name == "CyclicLR":
        return {"base_lr": u(0.001, 0.05), "max_lr": u(0.05, 0.5),
                "step_size_up": r.choice([ri(1, 30), u(0.5, 20)]),
                "step_size_down": r.choice([None, ri(1, 30)]),
                "mode": r.choice(["triangular", "triangular2", "exp_range"]),
                "gamma": u(0.95, 1.0), "cycle_momentum": r.random() < 0.5,
                "base_momentum": u(0.5, 0.85), "max_momentum": u(0.86, 0.99)}
    if name == "LambdaLR":
        a = u(0.9, 1.0)
        return {"lr_lambda": lambda t: a ** t * (1 + 0.3 * math.sin(t))}
    if name == "MultiplicativeLR":
        b = u(0.95, 1.02)
        return {"lr_lambda": lambda t: b if t % 3 else 0.99}
    if name == "SWALR":
        return {"swa_lr": u(0.001, 0.3), "anneal_epochs": ri(0, 40),
                "anneal_strategy": r.choice(["cos", "linear"])}
    assert name == "ReduceLROnPlateau"
    return {"mode": r.choice(["min", "max"]), "factor": u(0.1, 0.9), "patience": ri(0, 8),
            "threshold": r.choice([0.0, 1e-4, u(0, 0.1)]),
            "threshold_mode": r.choice(["rel", "abs"]), "cooldown": ri(0, 5),
            "min_lr": r.choice([0.0, u(0, 0.01)]), "eps": r.choice([1e-8, u(0, 1e-3)])}


NAMES = ["StepLR", "MultiStepLR", "ExponentialLR", "CosineAnnealingLR",
         "CosineAnnealingWarmRestarts", "LinearLR", "ConstantLR", "PolynomialLR", "OneCycleLR",
         "CyclicLR", "LambdaLR", "MultiplicativeLR", "SWALR", "ReduceLROnPlateau"]
#: the arguments torch takes per group, given here as one value per lane
LISTED = {"OneCycleLR": ("max_lr",), "CyclicLR": ("base_lr", "max_lr"),
          "ReduceLROnPlateau": ("min_lr",), "LambdaLR": ("lr_lambda",),
          "MultiplicativeLR": ("lr_lambda",)}


def _torch_class(name: str) -> type:
    return TorchSWALR if name == "SWALR" else getattr(ls, name)


def _ours(name: str, opt: SGD, conf: dict, **kw) -> S.LRScheduler:
    listed = LISTED.get(name, ())
    conf = {k: [v] * 3 if k in listed else v for k, v in conf.items()}
    return getattr(S, name)(opt, **conf, **({} if listed else {"per_group": True}), **kw)


def _values(opt: SGD, name: str) -> list[float]:
    return [opt.hyperparameter(name, g).get() for g in (None, 0, 1)]


def _close(a: list[float], b: list[float]) -> bool:
    return all(abs(x - y) <= REL * max(abs(x), abs(y)) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("name", NAMES)
def test_random_configurations_per_group_match_torch(name):
    for seed in SEEDS:
        r = random.Random(f"{name}-{seed}")
        conf = _conf(r, name)
        lrs = [r.uniform(0.001, 1.0) for _ in range(3)]
        moms = [r.uniform(0.5, 0.95) for _ in range(3)]
        groups = [{"params": [k], "learning_rate": lr, "momentum": m}
                  for k, lr, m in zip("bc", lrs[1:], moms[1:], strict=True)]
        opt = SGD(learning_rate=lrs[0], momentum=moms[0], param_groups=groups)
        topt = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": lr,
                                 "momentum": m} for lr, m in zip(lrs, moms, strict=True)])
        metrics = [r.choice([r.random(), 1.0, 0.5]) for _ in range(STEPS)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = _torch_class(name)(topt, **conf)
            ours = _ours(name, opt, conf)
            lr_runs, last_runs = [], []
            for i in range(STEPS + 1):
                if i:
                    topt.step()
                    args = (metrics[i - 1],) if name == "ReduceLROnPlateau" else ()
                    ref.step(*args)
                    ours.step(*args)
                want = [g["lr"] for g in topt.param_groups]
                lr_runs.append(want)
                last_runs.append(ours.get_last_lrs())
                case = f"{name} seed {seed} step {i}: {conf}"
                assert _close(_values(opt, "learning_rate"), want), case
                assert _close(ours.get_last_lrs(), ref.get_last_lr()), case
                assert _close(_values(opt, "momentum"), [g["momentum"] for g in topt.param_groups]), case
        if name == "ReduceLROnPlateau":
            continue  # (metric-driven: no start step, see test_sched_last_epoch.py)
        # built with last_epoch=k: torch's uninterrupted run from step k + 1
        k = r.randint(-1, STEPS // 2)
        opt = SGD(learning_rate=lrs[0], momentum=moms[0], param_groups=groups)
        ours = _ours(name, opt, conf, last_epoch=k)
        for i in range(k + 1, STEPS + 1):
            assert _close(ours.get_last_lrs(), lr_runs[i]), f"{name} seed {seed} k={k} step {i}"
            assert _close(_values(opt, "learning_rate"), lr_runs[i])
            ours.step()


CHAINABLE = ["StepLR", "MultiStepLR", "ExponentialLR", "LinearLR", "ConstantLR",
             "PolynomialLR", "MultiplicativeLR"]
#: (OneCycleLR only first: in torch it rewrites the initial_lr the children before it read;
#: ChainedScheduler's product is torch's for chainable children only: see chained.py)
SEQUENTIAL = [*CHAINABLE, "CosineAnnealingLR", "CosineAnnealingWarmRestarts", "LambdaLR",
              "CyclicLR"]


@pytest.mark.parametrize("kind", ["SequentialLR", "ChainedScheduler"])
def test_random_composites_built_at_a_random_step_match_torch(kind):
    for seed in range(12):
        r = random.Random(f"{kind}-{seed}")
        base = r.uniform(0.01, 1.0)
        names = [r.choice(CHAINABLE if kind == "ChainedScheduler" else SEQUENTIAL)
                 for _ in range(r.randint(1, 4))]
        confs = [_conf(r, n) for n in names]
        for c in confs:
            c.pop("cycle_momentum", None)
        ms = sorted(r.randint(0, 120) for _ in names[1:])
        k = r.choice([-1, 0, r.randint(0, 150)])
        topt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            children = [_torch_class(n)(topt, **c) for n, c in zip(names, confs, strict=True)]
            ref = (ls.SequentialLR(topt, children, ms) if kind == "SequentialLR"
                   else ls.ChainedScheduler(children))
            want = [topt.param_groups[0]["lr"]]
            for _ in range(k + 1 + STEPS):
                topt.step()
                ref.step()
                want.append(topt.param_groups[0]["lr"])
        opt = SGD(learning_rate=base)
        kids = [getattr(S, n)(opt, **c) for n, c in zip(names, confs, strict=True)]
        ours = (S.SequentialLR(opt, kids, ms, last_epoch=k) if kind == "SequentialLR"
                else S.ChainedScheduler(kids, last_epoch=k))
        got = [opt.learning_rate]
        for _ in range(STEPS):
            ours.step()
            got.append(opt.learning_rate)
        # (5e-12: a child's recursion in torch, up to 450 steps on, restarted at a milestone)
        assert all(abs(a - b) <= 5 * REL * max(abs(a), abs(b))
                   for a, b in zip(got, want[k + 1:], strict=True)), (names, ms, k)
