"""Schedulers per parameter group and on any hyperparameter (issue #15, point 2), against
``torch.optim.lr_scheduler`` on float64 torch optimizers with the same ``param_groups``:

* momentum cycling (``cycle_momentum=True``) of :class:`OneCycleLR` and :class:`CyclicLR`,
  driving SGD's ``momentum`` or Adam's ``beta1`` (torch's ``betas[0]``);
* schedulers acting per group (``per_group=True`` or torch's per-group lists), each group
  from its own base value, two groups and the parameters in no group;
* a weight-decay schedule (``optimizer.hyperparameter("weight_decay")``).

Every step's learning rates and momenta agree with torch's to ``1e-12`` (relative to
``max(1, |value|)``: exact where torch has the same closed form, up to the rounding of a
group's rate kept as a ratio to the optimizer's otherwise); parameters after 50 steps to
``1e-10`` (``rel_err`` of ``optimizer_parity``). Then: momentum changes compile nothing anew,
state dicts resume exactly, and bad input is refused by name, changing nothing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from optimizer_parity import init, natives, on, rel_err
from torch.optim import lr_scheduler as tl

import mithril.utils.optimizers as mo
from mithril.utils.lr_schedulers import (
    ConstantLR,
    CosineAnnealingLR,
    CyclicLR,
    LambdaLR,
    LinearLR,
    OneCycleLR,
    ReduceLROnPlateau,
    SequentialLR,
    StepLR,
)
from mithril.utils.optimizers.engines import jax_engine
from mithril.utils.optimizers.engines.kernels import update_kernel

N = 300
TOL = 1e-12
PARAM_TOL = 1e-10
SHAPES = {"w": (3, 4), "b": (4,), "c": (2, 2)}
#: the largest error of each check (printed after the run: conftest.py)
OBSERVED: dict[str, float] = {}


def close(name: str, ours: list[list[float]], ref: list[list[float]], tol: float = TOL) -> None:
    assert len(ours) == len(ref)
    err = 0.0
    for t, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert len(a) == len(b), (t, a, b)
        for x, y in zip(a, b, strict=True):
            e = abs(x - y) / max(1.0, abs(x), abs(y))
            err = max(err, e)
            assert e <= tol, f"{name}: step {t}: ours {a}, torch {b}"
    OBSERVED[name] = max(OBSERVED.get(name, 0.0), err)


def torch_opt(kind: str, groups: bool, **kw) -> torch.optim.Optimizer:
    """A float64 torch optimizer; with ``groups`` the parameters w (no group), b, c in three
    param groups as :func:`our_opt` makes them."""
    ps = [torch.zeros(s, dtype=torch.float64, requires_grad=True) for s in SHAPES.values()]
    if groups:
        spec = [{"params": [ps[0]]}, {"params": [ps[1]], "lr": kw["lr"] * 0.5},
                {"params": [ps[2]], "lr": kw["lr"] * 2.0, **({"momentum": 0.5} if kind == "sgd"
                                                             else {"betas": (0.5, 0.99)})}]
    else:
        spec = ps
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[kind]
    return cls(spec, **kw)


def our_opt(kind: str, groups: bool, **kw) -> mo.Optimizer:
    lr = kw["learning_rate"]
    if groups:
        other = {"momentum": 0.5} if kind == "sgd" else {"beta1": 0.5, "beta2": 0.99}
        kw["param_groups"] = [{"params": ["b"], "learning_rate": lr * 0.5},
                              {"params": ["c"], "learning_rate": lr * 2.0, **other}]
    return {"sgd": mo.SGD, "adam": mo.Adam}[kind](**kw)


def torch_trace(opt: torch.optim.Optimizer, make: Callable, n: int = N):
    """Each step's (lrs, momenta) of every group, from construction to step ``n``."""
    sched = make(opt)

    def momenta() -> list[float]:
        return [float(g["momentum"]) if "momentum" in g else float(g["betas"][0])
                for g in opt.param_groups]

    lrs, moms = [[float(g["lr"]) for g in opt.param_groups]], [momenta()]
    for _ in range(n):
        opt.step()  # no gradients: nothing moves, but torch wants the order step -> sched.step
        sched.step()
        lrs.append([float(g["lr"]) for g in opt.param_groups])
        moms.append(momenta())
    return lrs, moms


def our_values(opt: mo.Optimizer, name: str) -> list[float]:
    return [opt.hyperparameter(name, g).get() for g in (None, *range(len(opt.param_groups)))]


def our_trace(opt: mo.Optimizer, make: Callable, momentum: str, n: int = N):
    sched = make(opt)
    lrs, moms = [our_values(opt, "learning_rate")], [our_values(opt, momentum)]
    for _ in range(n):
        sched.step()
        lrs.append(our_values(opt, "learning_rate"))
        moms.append(our_values(opt, momentum))
        if sched.per_group:  # a group's rate is kept as a ratio: rounding aside, the same
            assert sched.get_last_lrs() == pytest.approx(lrs[-1], rel=1e-15, abs=0)
    return lrs, moms


# -- momentum cycling, against torch ----------------------------------------------------------
ONE_CYCLE = {
    "cos": {},
    "linear_three_phase": {"anneal_strategy": "linear", "three_phase": True, "pct_start": 0.25},
    "bounds": {"base_momentum": 0.7, "max_momentum": 0.99, "div_factor": 10.0},
}


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("case", list(ONE_CYCLE))
def test_one_cycle_cycles_momentum_or_beta1_as_torch(kind, case):
    kw = ONE_CYCLE[case]
    lr = 0.05
    ref = torch_trace(torch_opt(kind, False, lr=lr, **({"momentum": 0.9} if kind == "sgd" else {})),
                      lambda o: tl.OneCycleLR(o, max_lr=0.1, total_steps=N, **kw), N - 1)
    ours = our_trace(our_opt(kind, False, learning_rate=lr,
                             **({"momentum": 0.9} if kind == "sgd" else {})),
                     lambda o: OneCycleLR(o, max_lr=0.1, total_steps=N, cycle_momentum=True, **kw),
                     "momentum" if kind == "sgd" else "beta1", N - 1)
    close(f"onecycle {kind} {case} lr", ours[0], ref[0], 0.0)  # the same closed form
    close(f"onecycle {kind} {case} momentum", ours[1], ref[1], 0.0)
    assert min(m for (m,) in ours[1]) == pytest.approx(kw.get("base_momentum", 0.85))


@pytest.mark.parametrize("mode", ["triangular", "triangular2", "exp_range"])
def test_cyclic_cycles_momentum_as_torch(mode):
    kw = {"base_lr": 0.01, "max_lr": 0.1, "step_size_up": 20, "step_size_down": 13, "mode": mode,
          "gamma": 0.995}
    ref = torch_trace(torch_opt("sgd", False, lr=0.05, momentum=0.9),
                      lambda o: tl.CyclicLR(o, **kw, cycle_momentum=True))
    ours = our_trace(our_opt("sgd", False, learning_rate=0.05, momentum=0.9),
                     lambda o: CyclicLR(o, **kw, cycle_momentum=True), "momentum")
    close(f"cyclic {mode} lr", ours[0], ref[0], 0.0)
    close(f"cyclic {mode} momentum", ours[1], ref[1], 0.0)


def test_cyclic_cycles_adam_beta1_with_custom_bounds():
    kw = {"base_lr": 1e-3, "max_lr": 1e-2, "step_size_up": 7, "base_momentum": 0.6,
          "max_momentum": 0.95}
    ref = torch_trace(torch_opt("adam", False, lr=1e-3),
                      lambda o: tl.CyclicLR(o, **kw, cycle_momentum=True))
    ours = our_trace(our_opt("adam", False, learning_rate=1e-3),
                     lambda o: CyclicLR(o, **kw, cycle_momentum=True), "beta1")
    close("cyclic adam lr", ours[0], ref[0], 0.0)
    close("cyclic adam beta1", ours[1], ref[1], 0.0)


# -- per parameter group, against torch -------------------------------------------------------
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_per_group_cosine_from_each_groups_base(kind):
    extra = {"momentum": 0.9} if kind == "sgd" else {}
    ref = torch_trace(torch_opt(kind, True, lr=0.1, **extra),
                      lambda o: tl.CosineAnnealingLR(o, T_max=70, eta_min=1e-3))
    ours = our_trace(our_opt(kind, True, learning_rate=0.1, **extra),
                     lambda o: CosineAnnealingLR(o, T_max=70, eta_min=1e-3, per_group=True),
                     "momentum" if kind == "sgd" else "beta1")
    close(f"per-group cosine {kind} lr", ours[0], ref[0])
    close(f"per-group cosine {kind} momentum", ours[1], ref[1], 0.0)  # untouched
    assert len(ours[0][0]) == 3


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_per_group_one_cycle_with_lists_and_momentum(kind):
    max_lr, base_m, max_m = [0.1, 0.05, 0.3], [0.85, 0.8, 0.4], [0.95, 0.9, 0.6]
    extra = {"momentum": 0.9} if kind == "sgd" else {}
    ref = torch_trace(torch_opt(kind, True, lr=0.1, **extra),
                      lambda o: tl.OneCycleLR(o, max_lr=max_lr, total_steps=N,
                                              base_momentum=base_m, max_momentum=max_m),
                      N - 1)
    ours = our_trace(our_opt(kind, True, learning_rate=0.1, **extra),
                     lambda o: OneCycleLR(o, max_lr=max_lr, total_steps=N, cycle_momentum=True,
                                          base_momentum=base_m, max_momentum=max_m),
                     "momentum" if kind == "sgd" else "beta1", N - 1)
    close(f"per-group onecycle {kind} lr", ours[0], ref[0])
    close(f"per-group onecycle {kind} momentum", ours[1], ref[1], 0.0)


def test_per_group_one_cycle_scalar_max_lr_is_torchs_too():
    """torch gives every group the scalar max_lr (and the momentum bounds): per_group=True."""
    ref = torch_trace(torch_opt("sgd", True, lr=0.1, momentum=0.9),
                      lambda o: tl.OneCycleLR(o, max_lr=0.2, total_steps=N), N - 1)
    ours = our_trace(our_opt("sgd", True, learning_rate=0.1, momentum=0.9),
                     lambda o: OneCycleLR(o, max_lr=0.2, total_steps=N, cycle_momentum=True,
                                          per_group=True), "momentum", N - 1)
    close("per-group onecycle scalar lr", ours[0], ref[0])
    close("per-group onecycle scalar momentum", ours[1], ref[1], 0.0)


def test_per_group_cyclic_lists():
    kw = {"base_lr": [0.01, 0.002, 0.02], "max_lr": [0.1, 0.05, 0.3], "step_size_up": 11,
          "mode": "triangular2", "base_momentum": [0.8, 0.7, 0.3], "max_momentum": 0.9}
    ref = torch_trace(torch_opt("sgd", True, lr=0.1, momentum=0.9),
                      lambda o: tl.CyclicLR(o, **kw, cycle_momentum=True))
    ours = our_trace(our_opt("sgd", True, learning_rate=0.1, momentum=0.9),
                     lambda o: CyclicLR(o, **kw, cycle_momentum=True), "momentum")
    close("per-group cyclic lr", ours[0], ref[0])
    close("per-group cyclic momentum", ours[1], ref[1], 0.0)


def test_per_group_lambda_list():
    fns = [lambda t: 0.99**t, lambda t: 1 / (1 + t), lambda t: 1.0 + (t % 10)]
    ref = torch_trace(torch_opt("sgd", True, lr=0.1, momentum=0.9),
                      lambda o: tl.LambdaLR(o, fns), 60)
    ours = our_trace(our_opt("sgd", True, learning_rate=0.1, momentum=0.9),
                     lambda o: LambdaLR(o, fns), "momentum", 60)
    close("per-group lambda lr", ours[0], ref[0])


def test_without_per_group_groups_follow_in_proportion():
    """The behaviour before per-group scheduling is kept: the optimizer's rate follows the
    schedule, each group keeps its ratio to it (torch's result where the formula is relative,
    e.g. a cosine to 0)."""
    ref = torch_trace(torch_opt("sgd", True, lr=0.1, momentum=0.9),
                      lambda o: tl.CosineAnnealingLR(o, T_max=500), 100)
    ours = our_trace(our_opt("sgd", True, learning_rate=0.1, momentum=0.9),
                     lambda o: CosineAnnealingLR(o, T_max=500), "momentum", 100)
    close("proportional cosine lr", ours[0], ref[0])


# -- any hyperparameter: a weight-decay schedule ----------------------------------------------
def test_weight_decay_schedule_and_group_beta1():
    opt = mo.AdamW(1e-2, weight_decay=0.1, param_groups=[{"params": ["b"], "weight_decay": 0.0}])
    wd = StepLR(opt.hyperparameter("weight_decay"), step_size=3, gamma=0.5)
    values = []
    for _ in range(10):
        values.append((opt.weight_decay, opt.hyperparameter("weight_decay", 0).get()))
        wd.step()
    assert values == [(0.1 * 0.5 ** (t // 3), 0.0) for t in range(10)]
    beta = LinearLR(opt.hyperparameter("beta1", group=0), start_factor=0.5, total_iters=4)
    got = []
    for _ in range(6):
        got.append((opt.beta1, opt.hyperparameter("beta1", 0).get()))
        beta.step()
    assert [b for _, b in got] == pytest.approx([0.45, 0.5625, 0.675, 0.7875, 0.9, 0.9],
                                                abs=1e-15)
    assert all(a == 0.9 for a, _ in got)  # the optimizer's own beta1 is untouched
    # per group: each group decays from its own weight decay
    opt = mo.SGD(0.1, weight_decay=0.01, param_groups=[{"params": ["b"], "weight_decay": 0.1}])
    sched = StepLR(opt.hyperparameter("weight_decay"), step_size=2, gamma=0.1, per_group=True)
    for _ in range(4):
        sched.step()
    assert sched.get_last_lrs() == pytest.approx([1e-4, 1e-3], rel=1e-12)
    assert (opt.weight_decay, opt.param_groups[0]["weight_decay"]) == tuple(sched.get_last_lrs())


def _torch_params(groups, steps, grads, p0, setter):
    ts = {k: torch.tensor(v, requires_grad=True) for k, v in p0.items()}
    spec = [{"params": [ts[n] for n in names], **over} for names, over in groups]
    opt, sched = setter(spec)
    for t in range(steps):
        for k, v in ts.items():
            v.grad = torch.tensor(grads[t][k])
        opt.step()
        sched(opt, t)
    return {k: v.detach().numpy() for k, v in ts.items()}


def test_parameters_follow_torch_with_cycled_momentum_and_a_weight_decay_schedule():
    """SGD (momentum, per group) on NumPy float64 under a per-group one-cycle with momentum
    cycling and a weight-decay schedule: the parameters after 50 steps are torch's."""
    rng = np.random.default_rng(0)
    steps = 50
    p0 = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    grads = [{k: rng.standard_normal(s) for k, s in SHAPES.items()} for _ in range(steps)]
    opt = mo.SGD(0.1, momentum=0.9, weight_decay=1e-2, nesterov=True, param_groups=[
        {"params": ["b"], "learning_rate": 0.05}, {"params": ["c"], "momentum": 0.5}])
    sched = OneCycleLR(opt, max_lr=[0.2, 0.1, 0.4], total_steps=steps, cycle_momentum=True,
                       base_momentum=[0.85, 0.8, 0.4])
    wd = StepLR(opt.hyperparameter("weight_decay"), step_size=10, gamma=0.5)
    params = {k: v.copy() for k, v in p0.items()}
    state = opt.init(params)
    for g in grads:
        params, state = opt.update(params, g, state)
        sched.step()
        wd.step()

    def torch_setup(spec):
        o = torch.optim.SGD(spec, lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True)
        s = tl.OneCycleLR(o, max_lr=[0.2, 0.1, 0.4], total_steps=steps,
                          base_momentum=[0.85, 0.8, 0.4])

        def after(o, t):
            s.step()
            for grp in o.param_groups:
                grp["weight_decay"] = 1e-2 * 0.5 ** ((t + 1) // 10)
        return o, after

    ref = _torch_params([(["w"], {}), (["b"], {"lr": 0.05}), (["c"], {"momentum": 0.5})],
                        steps, grads, p0, torch_setup)
    err = max(rel_err(params[k], ref[k]) for k in ref)
    OBSERVED["params after 50 steps (sgd nesterov, per-group onecycle + momentum + wd)"] = err
    assert err <= PARAM_TOL


def test_adam_parameters_follow_torch_with_cycled_beta1():
    rng = np.random.default_rng(1)
    steps = 50
    p0 = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    grads = [{k: rng.standard_normal(s) for k, s in SHAPES.items()} for _ in range(steps)]
    opt = mo.Adam(1e-2)
    sched = CyclicLR(opt, 1e-3, 2e-2, step_size_up=6, cycle_momentum=True)
    params = {k: v.copy() for k, v in p0.items()}
    state = opt.init(params)
    for g in grads:
        params, state = opt.update(params, g, state)
        sched.step()

    def torch_setup(spec):
        o = torch.optim.Adam(spec, lr=1e-2)
        s = tl.CyclicLR(o, 1e-3, 2e-2, step_size_up=6)
        return o, lambda o, t: s.step()

    ref = _torch_params([(list(SHAPES), {})], steps, grads, p0, torch_setup)
    err = max(rel_err(params[k], ref[k]) for k in ref)
    OBSERVED["params after 50 steps (adam, cyclic beta1)"] = err
    assert err <= PARAM_TOL


# -- nothing recompiles ------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["numpy", "jax-jit"])
def test_changing_momentum_every_step_never_recompiles(backend):
    rng = np.random.default_rng(2)
    p0 = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    grads = [{k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
             for _ in range(12)]
    opt = mo.SGD(0.1, momentum=0.9, weight_decay=1e-3,
                 param_groups=[{"params": ["b"], "learning_rate": 0.05, "momentum": 0.5}])
    sched = OneCycleLR(opt, max_lr=[0.1, 0.05], total_steps=20, cycle_momentum=True,
                       base_momentum=[0.85, 0.3], max_momentum=[0.95, 0.6])
    wd = StepLR(opt.hyperparameter("weight_decay"), step_size=2, gamma=0.5, per_group=True)
    with on(backend):
        params = natives(backend, p0)
        state = init(opt, backend, params)
        params, state = opt.update(params, natives(backend, grads[0]), state)
        sched.step()
        counts = (update_kernel.cache_info().misses, len(jax_engine._COMPILED),
                  sum(f._cache_size() for f in jax_engine._COMPILED.values()))
        seen = set()
        for g in grads[1:]:
            seen.add((opt.momentum, opt.param_groups[0]["momentum"]))
            params, state = opt.update(params, natives(backend, g), state)
            sched.step()
            wd.step()
        assert (update_kernel.cache_info().misses, len(jax_engine._COMPILED),
                sum(f._cache_size() for f in jax_engine._COMPILED.values())) == counts
    assert len(seen) == 11  # a new momentum every step
    assert all(np.isfinite(np.asarray(v)).all() for v in params.values())


# -- state dicts --------------------------------------------------------------------------------
MAKERS = {
    "onecycle per group": lambda o: OneCycleLR(o, max_lr=[0.1, 0.05, 0.2], total_steps=100,
                                               cycle_momentum=True, base_momentum=[0.8, 0.7, 0.4]),
    "cyclic momentum": lambda o: CyclicLR(o, 0.01, 0.1, step_size_up=9, mode="exp_range",
                                          gamma=0.99, cycle_momentum=True),
    "cosine per group": lambda o: CosineAnnealingLR(o, T_max=30, eta_min=1e-3, per_group=True),
}


@pytest.mark.parametrize("name", list(MAKERS))
def test_state_dict_round_trip_resumes_exactly(name):
    make = MAKERS[name]
    straight = our_opt("sgd", True, learning_rate=0.1, momentum=0.9)
    sched = make(straight)
    for _ in range(37):
        sched.step()
    saved = json.loads(json.dumps(sched.state_dict(), allow_nan=False))
    resumed = our_opt("sgd", True, learning_rate=0.1, momentum=0.9)
    again = make(resumed)
    again.load_state_dict(saved)
    assert again.state_dict() == saved
    for _ in range(50):
        assert our_values(resumed, "learning_rate") == our_values(straight, "learning_rate")
        assert our_values(resumed, "momentum") == our_values(straight, "momentum")
        sched.step()
        again.step()
    assert again.get_last_lrs() == sched.get_last_lrs()


def test_old_state_dicts_still_load_and_momentum_settings_must_match():
    opt = mo.SGD(0.1, momentum=0.9)
    plain = OneCycleLR(opt, max_lr=0.1, total_steps=50)
    for _ in range(5):
        plain.step()
    old = {k: v for k, v in plain.state_dict().items() if k != "cycle_momentum"}  # before
    other = OneCycleLR(mo.SGD(0.1, momentum=0.9), max_lr=0.1, total_steps=50)
    other.load_state_dict(old)
    assert other.last_step == 5
    cycling = OneCycleLR(mo.SGD(0.1, momentum=0.9), max_lr=0.1, total_steps=50,
                         cycle_momentum=True)
    with pytest.raises(ValueError, match="cycle_momentum=False.*cycle_momentum=True"):
        cycling.load_state_dict(old)
    assert cycling.last_step == 0
    grouped = OneCycleLR(our_opt("sgd", True, learning_rate=0.1, momentum=0.9), max_lr=0.1,
                         total_steps=50, per_group=True)
    with pytest.raises(ValueError, match="3 parameter groups|2 parameter groups"):
        grouped.load_state_dict(old)
    with pytest.raises(ValueError, match="acting per parameter group"):
        other.load_state_dict(grouped.state_dict())


# -- bad input --------------------------------------------------------------------------------
def test_hyperparameter_handles_refuse_bad_input_by_name():
    opt = our_opt("sgd", True, learning_rate=0.1, momentum=0.9)
    before = (opt.hyperparameters(), [dict(g) for g in opt.param_groups], opt._groups_version)
    with pytest.raises(KeyError, match=r"SGD has no hyperparameter 'beta1'.*'momentum'"):
        opt.hyperparameter("beta1")
    with pytest.raises(KeyError, match="SGD has 2 param_groups, no group 2"):
        opt.hyperparameter("momentum", group=2)
    with pytest.raises(TypeError, match="group must be an index"):
        opt.hyperparameter("momentum", group="b")
    with pytest.raises(TypeError, match="nesterov=False is not a number"):
        opt.hyperparameter("nesterov")
    with pytest.raises(ValueError, match="clip_norm holds for the whole step"):
        mo.SGD(0.1, clip_norm=1.0, param_groups=[{"params": "b"}]).hyperparameter("clip_norm", 0)
    mom = opt.hyperparameter("momentum", group=1)
    with pytest.raises(ValueError, match=r"SGD param_groups\[1\]: momentum=1.5 refused: "
                                         r"momentum must be in \[0, 1\)"):
        mom.set(1.5)
    with pytest.raises(ValueError, match=r"param_groups\[1\]: momentum=0.0 changes SGD's state "
                                         r"slots"):
        mom.set(0.0)
    with pytest.raises(ValueError, match=r"SGD: weight_decay=-1 refused"):
        opt.hyperparameter("weight_decay").set(-1)
    with pytest.raises(ValueError, match=r"SGD param_groups\[0\]: learning_rate must be >= 0"):
        opt.hyperparameter("lr", group=0).set(-0.1)
    assert before == (opt.hyperparameters(), [dict(g) for g in opt.param_groups],
                      opt._groups_version)
    assert repr(mom) == "SGD.hyperparameter('momentum', group=1)"
    assert opt.hyperparameter("lr").name == "learning_rate"


def test_momentum_cycling_refuses_optimizers_without_momentum():
    with pytest.raises(ValueError, match="momentum or beta1.*AdaGrad has neither"):
        OneCycleLR(mo.AdaGrad(0.1), max_lr=0.1, total_steps=10, cycle_momentum=True)

    class Plain:
        lr = 0.1

        def get_learning_rate(self):
            return self.lr

        def set_learning_rate(self, lr):
            self.lr = lr

    with pytest.raises(ValueError, match="CyclicLR: cycle_momentum=True needs .*Plain"):
        CyclicLR(Plain(), 0.01, 0.1, cycle_momentum=True)
    sgd = mo.SGD(0.1)  # momentum 0: a momentum buffer would have to appear
    with pytest.raises(ValueError, match="base_momentum=0.85.*changes SGD's state slots"):
        OneCycleLR(sgd, max_lr=0.1, total_steps=10, cycle_momentum=True)
    assert (sgd.momentum, sgd.learning_rate) == (0.0, 0.1)
    sgd = mo.SGD(0.1, momentum=0.9)
    with pytest.raises(ValueError, match="base_momentum=1.2.*momentum must be in"):
        CyclicLR(sgd, 0.01, 0.1, cycle_momentum=True, base_momentum=1.2)
    assert (sgd.momentum, sgd.learning_rate) == (0.9, 0.1)
    with pytest.raises(ValueError, match="cycle_momentum must be a bool"):
        OneCycleLR(sgd, max_lr=0.1, total_steps=10, cycle_momentum=1)


def test_per_group_bad_input():
    opt = our_opt("sgd", True, learning_rate=0.1, momentum=0.9)
    snapshot = (opt.hyperparameters(), [dict(g) for g in opt.param_groups])
    with pytest.raises(ValueError, match=r"max_lr has 2 values; it needs one per parameter "
                                         r"group, 3 here"):
        OneCycleLR(opt, max_lr=[0.1, 0.2], total_steps=10)
    with pytest.raises(ValueError, match=r"min_lr has 2 values; it needs one per parameter "):
        ReduceLROnPlateau(opt, min_lr=[0.0, 0.1])
    with pytest.raises(TypeError, match="per_group must be a bool"):
        StepLR(opt, 3, per_group="yes")
    with pytest.raises(ValueError, match="needs the optimizer, or a handle on one of its own"):
        StepLR(opt.hyperparameter("momentum", 0), 3, per_group=True)
    with pytest.raises(TypeError, match="per_group needs a mithril optimizer"):
        class Plain:
            def get_learning_rate(self):
                return 0.1

            def set_learning_rate(self, lr):
                pass
        StepLR(Plain(), 3, per_group=True)
    # a group refusing its momentum: nothing built, nothing changed
    with pytest.raises(ValueError, match=r"base_momentum=1.5"):
        OneCycleLR(opt, max_lr=0.1, total_steps=10, cycle_momentum=True,
                   base_momentum=[0.8, 0.8, 1.5])
    assert snapshot == (opt.hyperparameters(), [dict(g) for g in opt.param_groups])
    per_group = CosineAnnealingLR(opt, T_max=10, eta_min=1e-3, per_group=True)
    with pytest.raises(ValueError, match="acting per parameter group, every child needs 3"):
        SequentialLR(opt, [ConstantLR(opt, 0.5, 3), per_group], [3])


def test_a_refused_step_changes_nothing_in_any_group():
    opt = our_opt("sgd", True, learning_rate=0.1, momentum=0.9)
    sched = LambdaLR(opt, [lambda t: 1.0 - 0.1 * t, lambda t: 1.0 + t, lambda t: 1.0 - 0.5 * t])
    sched.step()  # group 1's factor becomes negative at step 3
    sched.step()
    before = (our_values(opt, "learning_rate"), sched.state_dict())
    with pytest.raises(ValueError, match=r"param_groups\[1\]: learning_rate must be >= 0"):
        sched.step()
    assert (our_values(opt, "learning_rate"), sched.state_dict()) == before
    # the optimizer's rate at 0: the groups' 0 as well is fine, another value is refused
    opt = our_opt("sgd", True, learning_rate=0.1, momentum=0.9)
    sched = LinearLR(opt, start_factor=1.0, end_factor=0.0, total_iters=4, per_group=True)
    for _ in range(4):
        sched.step()
    assert our_values(opt, "learning_rate") == [0.0, 0.0, 0.0]
    assert math.isclose(opt.param_groups[1]["lr_scale"], 2.0)
