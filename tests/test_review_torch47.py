"""A torch.optim user's loop with ``torch_optimizer`` in place of ``torch.optim``, run side by
side with torch's on copies of one model in float64, the parameters compared each step:
torch's schedulers (momentum cycling, per-group floors, fractional epochs, state dicts saved
mid-run), ``torch.amp.GradScaler`` with inf/NaN gradients injected (the steps skipped and the
scale sequence as torch's), ``clip_grad_norm_``, parameters without a gradient now and then,
``zero_grad(set_to_none=False)``, the optimizer hooks, state dicts both ways; then the
review's findings: a Mithril scheduler of ``opt.mithril_optimizer`` was undone at each step,
a ``torch.optim`` state dict of another kind made before its first step was taken (the
state reset, its ``momentum`` ignored), ``differentiable=True`` was ignored."""

from __future__ import annotations

import collections
import copy
import warnings

import pytest
import torch
from torch.optim import lr_scheduler as L

import mithril.utils.lr_schedulers as M
from mithril.errors import KeyMismatchError
from mithril.interop import torch_optimizer
from mithril.utils import optimizers as mo

TOL = 1e-12


@pytest.fixture(autouse=True)
def _float64_default():
    # why: torch keeps NAdam's mu_product, ASGD's eta/mu and every step count in the default
    # dtype (float32 unless set), 1e-10 from float64 parameters' numbers after one step
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def nets() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    a = a.double()
    return a, copy.deepcopy(a)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 4, generator=g, dtype=torch.float64)
    return x, x.sum(1, keepdim=True).sin()


X, Y = data()


def loss_of(net: torch.nn.Module) -> torch.Tensor:
    return torch.nn.functional.mse_loss(net(X), Y)


def step(net: torch.nn.Module, opt: torch.optim.Optimizer) -> torch.Tensor:
    opt.zero_grad()
    loss = loss_of(net)
    loss.backward()
    opt.step()
    return loss


def err(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def groups_of(net: torch.nn.Module) -> list[dict]:
    return [{"params": list(net[0].parameters())},
            {"params": list(net[2].parameters()), "lr": 3e-3, "weight_decay": 0.0}]


SCHEDULERS = {
    "OneCycleLR betas": lambda o: L.OneCycleLR(o, max_lr=0.05, total_steps=25),
    "OneCycleLR three phase": lambda o: L.OneCycleLR(o, max_lr=[0.05, 0.02], total_steps=25,
                                                     three_phase=True,
                                                     anneal_strategy="linear"),
    "CyclicLR exp_range betas": lambda o: L.CyclicLR(o, 1e-3, 1e-2, step_size_up=3,
                                                     mode="exp_range", gamma=0.9),
    "SequentialLR warmup cosine": lambda o: L.SequentialLR(
        o, [L.LinearLR(o, 0.1, 1.0, total_iters=5), L.CosineAnnealingLR(o, T_max=15)], [5]),
    "ChainedScheduler": lambda o: L.ChainedScheduler([L.LinearLR(o, 0.1, 1.0, total_iters=5),
                                                      L.ExponentialLR(o, 0.9)]),
    "LambdaLR": lambda o: L.LambdaLR(o, [lambda s: 1 / (1 + s), lambda s: 0.9 ** s]),
    "MultiplicativeLR": lambda o: L.MultiplicativeLR(o, lambda s: 0.95),
    "CosineAnnealingWarmRestarts": lambda o: L.CosineAnnealingWarmRestarts(o, 4, 2, 1e-4),
    "PolynomialLR": lambda o: L.PolynomialLR(o, total_iters=12, power=2.0),
    "ReduceLROnPlateau": lambda o: L.ReduceLROnPlateau(o, patience=1, cooldown=2, factor=0.5,
                                                       min_lr=[1e-3, 2e-3]),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_torch_schedulers_drive_the_drop_in_as_torch_optim(name):
    a, b = nets()
    theirs = torch.optim.AdamW(groups_of(a), lr=1e-2, weight_decay=0.1)
    ours = torch_optimizer(mo.AdamW(learning_rate=1e-2, weight_decay=0.1), groups_of(b))
    sa, sb = SCHEDULERS[name](theirs), SCHEDULERS[name](ours)
    for t in range(20):
        for net, opt, s in ((a, theirs, sa), (b, ours, sb)):
            loss = step(net, opt)
            s.step(round(loss.item(), 1) if t < 8 else 1.0) if name == "ReduceLROnPlateau" \
                else s.step()
        assert err(a, b) < TOL, t
        assert [g["lr"] for g in ours.param_groups] == [g["lr"] for g in theirs.param_groups]
        assert [g["betas"] for g in ours.param_groups] == [
            tuple(g["betas"]) for g in theirs.param_groups]


def test_warm_restarts_at_fractional_epochs_and_a_scheduler_resumed_mid_run():
    a, b = nets()
    theirs = torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                             weight_decay=1e-3)
    ours = torch_optimizer(mo.SGD(learning_rate=0.05, momentum=0.9, nesterov=True,
                                  weight_decay=1e-3), b.parameters())
    sa, sb = (L.CosineAnnealingWarmRestarts(o, T_0=2, T_mult=2, eta_min=1e-3)
              for o in (theirs, ours))
    for epoch in range(3):
        for i in range(4):
            step(a, theirs)
            step(b, ours)
            sa.step(epoch + i / 4)
            sb.step(epoch + i / 4)
            assert err(a, b) < TOL
    # a OneCycleLR cycling SGD's momentum, both state dicts saved and loaded mid-run
    a, b = nets()
    theirs = torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9)
    ours = torch_optimizer(mo.SGD(learning_rate=0.05, momentum=0.9), b.parameters())
    sa, sb = (L.OneCycleLR(o, 0.1, total_steps=30) for o in (theirs, ours))
    for _ in range(10):
        step(a, theirs)
        step(b, ours)
        sa.step()
        sb.step()
    saved = ours.state_dict(), sb.state_dict()
    resumed = torch_optimizer(mo.SGD(learning_rate=0.05, momentum=0.9), b.parameters())
    sr = L.OneCycleLR(resumed, 0.1, total_steps=30)
    resumed.load_state_dict(saved[0])
    sr.load_state_dict(saved[1])
    for _ in range(15):
        step(a, theirs)
        step(b, resumed)
        sa.step()
        sr.step()
        assert err(a, b) < TOL
        assert resumed.param_groups[0]["momentum"] == theirs.param_groups[0]["momentum"]


@pytest.mark.parametrize("kind", ["AdamW", "SGD", "RMSprop", "NAdam"])
def test_grad_scaler_with_inf_and_nan_gradients_skips_as_torch(kind):
    make = {"AdamW": (lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
                      lambda: mo.AdamW(learning_rate=1e-2, weight_decay=0.1)),
            "SGD": (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
                    lambda: mo.SGD(learning_rate=0.05, momentum=0.9)),
            "RMSprop": (lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.9, centered=True,
                                                      momentum=0.5),
                        lambda: mo.RMSProp(learning_rate=0.01, decay=0.9, centered=True,
                                           momentum=0.5)),
            "NAdam": (lambda p: torch.optim.NAdam(p, lr=0.01),
                      lambda: mo.NAdam(learning_rate=0.01))}[kind]
    a, b = nets()
    theirs, ours = make[0](a.parameters()), torch_optimizer(make[1](), b.parameters())
    sa, sb = (L.OneCycleLR(o, 0.05, total_steps=25) for o in (theirs, ours))
    ga, gb = (torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=3) for _ in "ab")
    bad = {3: float("inf"), 4: float("inf"), 9: float("nan"), 15: float("-inf")}
    scales = []
    with warnings.catch_warnings():  # (torch: "lr_scheduler.step() before optimizer.step()")
        warnings.simplefilter("ignore")
        for t in range(20):
            for net, opt, sched, scaler in ((a, theirs, sa, ga), (b, ours, sb, gb)):
                opt.zero_grad()
                scaler.scale(loss_of(net)).backward()
                if t in bad:
                    net[0].weight.grad[0, 0] = bad[t]
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(net.parameters(), 0.5)
                scaler.step(opt)
                scaler.update()
                sched.step()
            assert err(a, b) < TOL, t
            assert ga.get_scale() == gb.get_scale()
            scales.append(gb.get_scale())
    assert scales[:8] == [8.0, 8.0, 16.0, 8.0, 4.0, 4.0, 4.0, 8.0]
    assert ga.state_dict() == gb.state_dict()
    steps_ours = {int(s["step"]) for s in ours.state.values()}
    assert steps_ours == {16}  # 20 steps, 4 skipped


class Branches(torch.nn.Module):
    """``c`` is used every third step only; ``frozen`` never has a gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 1)
        self.c, self.frozen = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor, use_c: bool) -> torch.Tensor:
        out = self.b(torch.tanh(self.a(x))) + self.frozen(x)
        return out + self.c(x) if use_c else out


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("kind", ["AdamW", "SGD", "ASGD", "RAdam"])
def test_parameters_without_a_gradient_and_frozen_ones_as_torch(kind, set_to_none):
    make = {"AdamW": (lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
                      lambda: mo.AdamW(learning_rate=1e-2, weight_decay=0.1)),
            "SGD": (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.1,
                                              weight_decay=0.01),
                    lambda: mo.SGD(learning_rate=0.05, momentum=0.9, dampening=0.1,
                                   weight_decay=0.01)),
            "ASGD": (lambda p: torch.optim.ASGD(p, lr=0.01, t0=3),
                     lambda: mo.ASGD(learning_rate=0.01, t0=3)),
            "RAdam": (lambda p: torch.optim.RAdam(p, lr=0.01),
                      lambda: mo.RAdam(learning_rate=0.01))}[kind]
    torch.manual_seed(0)
    a = Branches().double()
    b = copy.deepcopy(a)
    theirs, ours = make[0](a.parameters()), torch_optimizer(make[1](), b.parameters())
    for t in range(15):
        for net, opt in ((a, theirs), (b, ours)):
            opt.zero_grad(set_to_none=set_to_none)
            torch.nn.functional.mse_loss(net(X, t % 3 == 1), Y).backward()
            opt.step()
        assert err(a, b) < TOL, t


def hooked_run(opt: torch.optim.Optimizer, net: torch.nn.Module) -> list:
    """What every kind of optimizer hook saw over two steps and a state dict round trip."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    log: list = []
    pre = opt.register_step_pre_hook(lambda o, args, kw: log.append(("pre", tuple(kw))))
    opt.register_step_post_hook(lambda o, args, kw: log.append("post"))
    opt.register_state_dict_pre_hook(lambda o: log.append("sd pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    opt.register_load_state_dict_pre_hook(
        lambda o, sd: {k: v for k, v in sd.items() if k != "extra"})
    opt.register_load_state_dict_post_hook(lambda o: log.append("load post"))
    handle = register_optimizer_step_pre_hook(lambda o, args, kw: log.append("global"))
    try:
        step(net, opt)
        opt.step(closure=lambda: loss_of(net))
        saved = opt.state_dict()
        opt.load_state_dict(saved)
        pre.remove()
        step(net, opt)
    finally:
        handle.remove()
    return [*log, saved["extra"]]


def test_hooks_run_as_torch_optim_s():
    a, b = nets()
    theirs = hooked_run(torch.optim.Adam(a.parameters(), lr=1e-2), a)
    ours = hooked_run(torch_optimizer(mo.Adam(learning_rate=1e-2), b.parameters()), b)
    assert ours == theirs == [
        "global", ("pre", ()), "post", "global", ("pre", ("closure",)), "post", "sd pre",
        "load post", "global", "post", 1]
    assert err(a, b) < TOL


@pytest.mark.parametrize("kind", ["Adam", "SGD"])
def test_state_dicts_both_ways_mid_run(kind):
    make = {"Adam": (lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True, weight_decay=1e-2),
                     lambda: mo.Adam(learning_rate=1e-2, amsgrad=True, weight_decay=1e-2)),
            "SGD": (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
                    lambda: mo.SGD(learning_rate=0.05, momentum=0.9, nesterov=True))}[kind]
    a, b = nets()
    theirs = make[0](a.parameters())
    for _ in range(5):
        step(a, theirs)
    b.load_state_dict(a.state_dict())
    ours = torch_optimizer(make[1](), b.parameters())
    ours.load_state_dict(theirs.state_dict())
    for _ in range(10):
        step(a, theirs)
        step(b, ours)
        assert err(a, b) < TOL
    back = copy.deepcopy(b)
    torch_again = make[0](back.parameters())
    torch_again.load_state_dict(ours.state_dict())
    for _ in range(10):
        step(back, torch_again)
        step(b, ours)
        assert err(back, b) < TOL


def snapshot(net: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple:
    state = {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
             for i, s in opt.state_dict()["state"].items()}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return [p.detach().clone() for p in net.parameters()], state, copy.deepcopy(groups)


def assert_unchanged(before: tuple, after: tuple, groups: bool = True) -> None:
    assert all(torch.equal(p, q) for p, q in zip(before[0], after[0]))
    assert before[1].keys() == after[1].keys()
    for i, entry in before[1].items():
        assert entry.keys() == after[1][i].keys()
        assert all(torch.equal(v, after[1][i][k]) for k, v in entry.items())
    if groups:
        assert before[2] == after[2]


def trained() -> tuple[torch.nn.Module, torch.optim.Optimizer, L.StepLR]:
    net, _ = nets()
    opt = torch_optimizer(mo.Adam(learning_rate=1e-2), groups_of(net))
    sched = L.StepLR(opt, 3)
    for _ in range(4):
        step(net, opt)
        sched.step()
    opt.zero_grad()
    loss_of(net).backward()
    return net, opt, sched


@pytest.mark.parametrize("key, value, exc", [
    ("lr", float("nan"), ValueError), ("lr", -1.0, ValueError), ("betas", (1.5, 0.9), ValueError),
    ("amsgrad", True, ValueError), ("eps", float("nan"), ValueError),
    ("weight_decay", "0.1", TypeError), ("maximize", True, ValueError)])
def test_a_refused_group_value_changes_nothing(key, value, exc):
    net, opt, sched = trained()
    before, sched_before = snapshot(net, opt), sched.state_dict()
    opt.param_groups[1][key] = value
    with pytest.raises(exc, match=rf"param_groups\[1\]\['{key}'\]"):
        opt.step()
    assert_unchanged(before, snapshot(net, opt), groups=False)
    assert sched.state_dict() == sched_before


def test_a_bad_gradient_or_state_dict_changes_nothing():
    net, opt, _ = trained()
    before = snapshot(net, opt)
    net[2].weight.grad.data = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"gradients\['param2'\] has shape \(3,\)"):
        opt.step()
    net[2].weight.grad.data = torch.zeros(1, 8, dtype=torch.float32)
    with pytest.raises(TypeError, match=r"gradients\['param2'\] has dtype float32"):
        opt.step()
    assert_unchanged(before, snapshot(net, opt))
    for edit, match in [
            (lambda sd: sd["state"][3].__setitem__("exp_avg", torch.zeros(5)), "shape"),
            (lambda sd: sd["state"][3].pop("exp_avg_sq"), "slot 'v'"),
            (lambda sd: sd.__setitem__("param_groups", sd["param_groups"][:1]), "2 groups"),
            (lambda sd: sd["state"][3].__setitem__("step", torch.tensor(-4.0)), "'step'")]:
        sd = opt.state_dict()
        edit(sd)
        with pytest.raises((ValueError, KeyError), match=match):
            opt.load_state_dict(sd)
        assert_unchanged(before, snapshot(net, opt))


# -- the review's findings --------------------------------------------------------------------


def test_a_mithril_scheduler_of_the_wrapped_optimizer_drives_the_rate():
    """Found: ``StepLR(opt.mithril_optimizer, 3, 0.5)`` halved the wrapped optimizer's rate,
    and the next ``step()`` set ``param_groups[0]['lr']`` (0.01, unchanged) back: the run
    trained at 0.01 throughout (parameters 0.047 away from torch's StepLR run after 10
    steps). Now the group shows the scheduler's rate and the run is torch's."""
    a, b = nets()
    theirs = torch.optim.Adam(a.parameters(), lr=1e-2)
    ours = torch_optimizer(mo.Adam(learning_rate=1e-2), b.parameters())
    sa, sb = L.StepLR(theirs, 3, 0.5), M.StepLR(ours.mithril_optimizer, 3, 0.5)
    for t in range(10):
        for net, opt, sched in ((a, theirs, sa), (b, ours, sb)):
            step(net, opt)
            sched.step()
        assert err(a, b) < TOL, t
        assert ours.state_dict()["param_groups"][0]["lr"] == theirs.param_groups[0]["lr"]
    assert ours.param_groups[0]["lr"] == theirs.param_groups[0]["lr"] == 0.01 * 0.5 ** 3
    # saved and resumed, both state dicts
    saved = ours.state_dict(), sb.state_dict()
    ours = torch_optimizer(mo.Adam(learning_rate=1e-2), b.parameters())
    sb = M.StepLR(ours.mithril_optimizer, 3, 0.5)
    ours.load_state_dict(saved[0])
    sb.load_state_dict(saved[1])
    for t in range(5):
        for net, opt, sched in ((a, theirs, sa), (b, ours, sb)):
            step(net, opt)
            sched.step()
        assert err(a, b) < TOL, t
    # a torch scheduler's lr written into the group since still wins
    ours.param_groups[0]["lr"] = 0.002
    step(b, ours)
    assert ours.mithril_optimizer.get_learning_rate() == 0.002
    # with groups (each group's lr a ratio to the optimizer's rate), per group or in
    # proportion, resumed too (their param_groups' lr do not show the rates: see the report)
    for per_group in (True, False):
        a, b = nets()
        theirs = torch.optim.Adam(groups_of(a), lr=1e-2)
        ours = torch_optimizer(mo.Adam(learning_rate=1e-2), groups_of(b))
        sa, sb = L.StepLR(theirs, 2, 0.5), M.StepLR(ours.mithril_optimizer, 2, 0.5,
                                                    per_group=per_group)
        for t in range(10):
            if t == 5:
                saved = ours.state_dict(), sb.state_dict()
                ours = torch_optimizer(mo.Adam(learning_rate=1e-2), groups_of(b))
                sb = M.StepLR(ours.mithril_optimizer, 2, 0.5, per_group=per_group)
                ours.load_state_dict(saved[0])
                sb.load_state_dict(saved[1])
            for net, opt, sched in ((a, theirs, sa), (b, ours, sb)):
                step(net, opt)
                sched.step()
            assert err(a, b) < TOL, (per_group, t)
    # the wrapper itself given to a Mithril scheduler: the error says what to pass
    with pytest.raises(TypeError, match="pass its .mithril_optimizer"):
        M.StepLR(ours, 3)
    with pytest.raises(TypeError, match="pass its .mithril_optimizer"):
        M.StepLR(ours, 3, per_group=True)


@pytest.mark.parametrize("other, ours_of, match", [
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), lambda: mo.Adam(learning_rate=1e-2),
     "momentum"),
    (lambda p: torch.optim.Adam(p, lr=0.1), lambda: mo.SGD(learning_rate=0.05, momentum=0.9),
     "betas"),
    (lambda p: torch.optim.RMSprop(p, lr=0.1), lambda: mo.Adam(learning_rate=1e-2), "alpha"),
    (lambda p: torch.optim.LBFGS(p), lambda: mo.SGD(learning_rate=0.05), "max_iter")])
def test_a_torch_state_dict_of_another_kind_is_refused_before_its_first_step(other, ours_of,
                                                                             match):
    """Found: a ``torch.optim.SGD(momentum=0.9)`` state dict made before its first step (no
    slots to tell its kind by) loaded into Adam's wrapper was taken: Adam's moments were
    reset, ``lr`` became 0.1 and ``momentum`` stayed in the group unread."""
    net, ref = nets()
    opt = torch_optimizer(ours_of(), net.parameters())
    twin = torch_optimizer(ours_of(), ref.parameters())
    for _ in range(3):
        step(net, opt)
        step(ref, twin)
    before = snapshot(net, opt)
    with pytest.raises(KeyMismatchError, match=rf"refused \(nothing changed\).*{match}"):
        opt.load_state_dict(other(list(copy.deepcopy(net).parameters())).state_dict())
    assert_unchanged(before, snapshot(net, opt))
    step(net, opt)
    step(ref, twin)
    assert err(net, ref) == 0.0


def test_differentiable_true_is_refused_not_ignored():
    """Found: ``param_groups[0]['differentiable'] = True`` (or a torch state dict saying so)
    was taken and ignored: the step runs under ``torch.no_grad``, no graph through it."""
    net, _ = nets()
    opt = torch_optimizer(mo.Adam(learning_rate=1e-2), net.parameters())
    step(net, opt)
    opt.zero_grad()
    loss_of(net).backward()
    before = snapshot(net, opt)
    opt.param_groups[0]["differentiable"] = True
    with pytest.raises(ValueError, match=r"\['differentiable'\] = True.*no_grad"):
        opt.step()
    del opt.param_groups[0]["differentiable"]
    assert_unchanged(before, snapshot(net, opt))
    theirs = torch.optim.Adam(copy.deepcopy(net).parameters(), lr=1e-2, differentiable=True)
    with pytest.raises(ValueError, match="differentiable"):
        opt.load_state_dict(theirs.state_dict())
    assert_unchanged(before, snapshot(net, opt))
    opt.load_state_dict(torch.optim.Adam(copy.deepcopy(net).parameters()).state_dict())


@pytest.mark.parametrize("edit", [
    lambda o, p: o.state.clear(), lambda o, p: o.state.__delitem__(p),
    lambda o, p: o.state.pop(p), lambda o, p: o.state[p].clear(),
    lambda o, p: o.state[p].__setitem__("exp_avg", torch.zeros_like(p)),
    lambda o, p: o.state[p].__setitem__("step", torch.tensor(0.0)),
    lambda o, p: o.state[p].update(exp_avg=torch.zeros_like(p)),
    lambda o, p: setattr(o, "state", collections.defaultdict(dict))],
    ids=["clear", "del", "pop", "entry clear", "set slot", "set step", "update", "assign"])
def test_torch_s_ways_to_reset_a_state_raise_not_ignored(edit):
    """Found: ``opt.state.clear()``, ``del opt.state[p]``, ``opt.state[p]['exp_avg'] =
    zeros`` and ``opt.state = defaultdict(dict)`` were silently ignored (``opt.state`` is
    rebuilt from the optimizer's buffers at each access): torch's Adam restarts those
    moments, ours went on with the old ones (parameters 4.2e-2 apart 3 steps later). Now
    each raises, naming the way that works, and changes nothing; writing a slot in place
    works as torch's."""
    a, b = nets()
    theirs = torch.optim.Adam(a.parameters(), lr=1e-2)
    ours = torch_optimizer(mo.Adam(learning_rate=1e-2), b.parameters())
    for _ in range(3):
        step(a, theirs)
        step(b, ours)
    before = snapshot(b, ours)
    with pytest.raises((TypeError, AttributeError), match="torch_optimizer"):
        edit(ours, b[0].weight)
    assert_unchanged(before, snapshot(b, ours))
    for opt, net in ((theirs, a), (ours, b)):  # in place: as torch's
        opt.state[net[0].weight]["exp_avg"].zero_()
    for _ in range(3):
        step(a, theirs)
        step(b, ours)
        assert err(a, b) < TOL
    # reading: copies are plain dicts, a parameter without a state reads as empty
    copied = copy.deepcopy(ours.state)
    assert type(copied) is collections.defaultdict
    assert [set(v) for v in copied.values()] == [{"step", "exp_avg", "exp_avg_sq"}] * 4
    assert dict(ours.state[torch.nn.Parameter(torch.zeros(1))]) == {}


def test_momentum_cycled_to_zero_is_refused_naming_the_schedule():
    """Known limit, made clear: ``OneCycleLR(base_momentum=0)`` brings SGD's momentum to 0
    at the peak; torch's keeps the buffer unused then (plain steps), ours cannot drop the
    slot mid-run. The step raises saying so (it said "set this in the constructor",
    where no constructor value helps) and changes nothing."""
    a, b = nets()
    theirs = torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9)
    ours = torch_optimizer(mo.SGD(learning_rate=0.05, momentum=0.9), b.parameters())
    sa, sb = (L.OneCycleLR(o, 0.1, total_steps=20, base_momentum=0.0, max_momentum=0.9)
              for o in (theirs, ours))
    for _ in range(5):
        for net, opt, sched in ((a, theirs, sa), (b, ours, sb)):
            step(net, opt)
            sched.step()
        assert err(a, b) < TOL
    assert ours.param_groups[0]["momentum"] == 0.0
    ours.zero_grad()
    loss_of(b).backward()
    before = snapshot(b, ours)
    with pytest.raises(ValueError, match=r"\['momentum'\].*keeps the unused slot.*above 0"):
        ours.step()
    assert_unchanged(before, snapshot(b, ours))
