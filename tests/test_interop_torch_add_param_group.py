"""``TorchOptimizer.add_param_group`` (progressive unfreezing), side by side with torch.optim.

A float64 two-layer model: the first layer optimized 10 steps, the second added as a new
group (its own ``lr``, the rest torch's ``defaults``), then 10 more steps under a per-group
``LambdaLR``; the parameters agree with torch's optimizer to 1e-10 (:func:`rel_err`) at
every step, torch.optim as it is: the new parameters count their own steps from the add
(their group's ``step_offset``), so the rules that read the count (bias corrections,
AdaGrad's lr decay, ASGD, SGD's dampening) match torch's per-parameter ``step``. Also: the
state dict's layout (each parameter's own ``step``) and round trips, schedulers made
before the add, and refused groups changing nothing.
"""

from __future__ import annotations

import pytest
import torch
from test_interop_torch_optimizer import CASES, default_dtype, rel_err
from test_interop_torch_state_dict import assert_same_dict
from torch import nn

from mithril.errors import KeyMismatchError
from mithril.interop import torch_optimizer
from mithril.utils import optimizers as mo

TOL = 1e-10
#: AdaGrad without lr decay reads no step count: torch's numbers as they are
ALL_CASES = {**CASES, "adagrad_plain": (mo.AdaGrad, {"learning_rate": 0.1, "epsilon": 1e-10},
                                        "Adagrad", {"lr": 0.1, "eps": 1e-10})}


def two_layers(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(16, 5, generator=g, dtype=torch.float64)
    return x, torch.sin(x[:, :3])


def train_step(models, opts, step: int) -> None:
    x, y = batch(step)
    for m, o in zip(models, opts):
        m.zero_grad()
        nn.functional.mse_loss(m(x), y).backward()
        o.step()


def max_err(a: nn.Module, b: nn.Module) -> float:
    return max(rel_err(p, q) for p, q in zip(a.parameters(), b.parameters()))


def pair(case: str):
    """(model, wrapper over its first layer, model, torch.optim over its first layer)."""
    cls, kw, tname, tkw = ALL_CASES[case]
    m1, m2 = two_layers(), two_layers()
    ours = torch_optimizer(cls(**kw), m1[0].parameters())
    ref = getattr(torch.optim, tname)(m2[0].parameters(), **tkw)
    return m1, ours, m2, ref, tkw["lr"]


@pytest.mark.parametrize("case", sorted(ALL_CASES))
def test_added_group_matches_torch(case):
    with default_dtype(torch.float64):
        m1, ours, m2, ref, lr = pair(case)
        for step in range(10):
            train_step((m1, m2), (ours, ref), step)
            assert max_err(m1, m2) <= TOL, step
        kept = [{k: v.clone() for k, v in ours.state[p].items()} for p in m1[0].parameters()]
        ours.add_param_group({"params": m1[2].parameters(), "lr": lr / 2})  # a generator
        ref.add_param_group({"params": m2[2].parameters(), "lr": lr / 2})
        assert sorted(ours.param_groups[1]) == sorted(ours.param_groups[0])
        for p, before in zip(m1[0].parameters(), kept):  # the state kept bit for bit
            assert ours.state[p].keys() == before.keys()
            assert all(torch.equal(ours.state[p][k], v) for k, v in before.items())
        assert ours.param_groups[1]["lr"] == lr / 2
        for key in ref.defaults.keys() & ours.defaults.keys() - {"params", "lr"}:
            assert ours.param_groups[1][key] == ours.defaults[key], key
        scheds = [torch.optim.lr_scheduler.LambdaLR(o, [lambda s: 0.9 ** s,
                                                        lambda s: min(1.0, (s + 1) / 4)])
                  for o in (ours, ref)]
        for step in range(10, 20):
            train_step((m1, m2), (ours, ref), step)
            for s in scheds:
                s.step()
            assert [g["lr"] for g in ours.param_groups] == [g["lr"] for g in ref.param_groups]
            assert max_err(m1, m2) <= TOL, step
        # the new parameters moved (from their own gradients, not left as they were)
        assert not torch.equal(m1[2].weight, two_layers()[2].weight)


@pytest.mark.parametrize("case", ["adam", "adagrad", "sgd_nesterov", "asgd", "nadam", "rprop"])
def test_state_dict_after_add_round_trips_and_loads_into_torch(case):
    cls, kw, tname, tkw = ALL_CASES[case]
    with default_dtype(torch.float64):
        m1, ours, m2, ref, lr = pair(case)
        for step in range(5):
            train_step((m1, m2), (ours, ref), step)
        ours.add_param_group({"params": [m1[2].weight, m1[2].bias], "lr": lr / 2})
        for step in range(5, 8):
            train_step((m1,), (ours,), step)
        sd = ours.state_dict()
        assert [g["params"] for g in sd["param_groups"]] == [[0, 1], [2, 3]]
        assert sorted(sd["state"]) == [0, 1, 2, 3]
        assert sd["state"][2].keys() == sd["state"][0].keys()
        # each parameter's own count, as torch's: the added ones joined after 5 steps
        assert [float(sd["state"][i]["step"]) for i in range(4)] == [8, 8, 3, 3]
        assert [float(ours.state[p]["step"]) for p in m1[2].parameters()] == [3, 3]
        # a new wrapper, given the same add_param_group call: continues bit for bit
        m3 = two_layers()
        m3.load_state_dict(m1.state_dict())
        again = torch_optimizer(cls(**kw), m3[0].parameters())
        again.add_param_group({"params": [m3[2].weight, m3[2].bias], "lr": lr / 2})
        again.load_state_dict(sd)
        assert_same_dict(again.state_dict()["state"], sd["state"])
        # torch.optim, given the same add_param_group call: continues with the same numbers
        m4 = two_layers()
        m4.load_state_dict(m1.state_dict())
        theirs = getattr(torch.optim, tname)(m4[0].parameters(), **tkw)
        theirs.add_param_group({"params": [m4[2].weight, m4[2].bias], "lr": lr / 2})
        theirs.load_state_dict(sd)
        for step in range(8, 13):
            train_step((m1, m3, m4), (ours, again, theirs), step)
            assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m3.parameters()))
            assert max_err(m1, m4) <= TOL, step
        # and back: torch.optim's state dict (it kept our "mithril" entry in its first group
        # and counted each parameter's steps on) resumes here
        m6 = two_layers()
        m6.load_state_dict(m4.state_dict())
        back = torch_optimizer(cls(**kw), m6[0].parameters())
        back.add_param_group({"params": [m6[2].weight, m6[2].bias], "lr": lr / 2})
        back.load_state_dict(theirs.state_dict())
        # (torch's SGD counts no steps: the entry's count stays, unused after the first step)
        assert back.state_dict()["mithril"]["step"] == (8 if tname == "SGD" else 13)
        for step in range(13, 16):
            train_step((m4, m6), (theirs, back), step)
            assert max_err(m4, m6) <= TOL, step
        # a state dict of torch.optim's own making (its group added after 2 steps) is taken:
        # each parameter's step is its count, and both continue with the same numbers
        m5, m7 = two_layers(), two_layers()
        native = getattr(torch.optim, tname)(m5[0].parameters(), **tkw)
        for step in range(2):
            train_step((m5,), (native,), step)
        native.add_param_group({"params": [m5[2].weight, m5[2].bias], "lr": lr / 2})
        train_step((m5,), (native,), 2)
        m7.load_state_dict(m5.state_dict())
        mine = torch_optimizer(cls(**kw), m7[0].parameters())
        mine.add_param_group({"params": [m7[2].weight, m7[2].bias], "lr": lr / 2})
        mine.load_state_dict(native.state_dict())
        for step in range(3, 7):
            train_step((m5, m7), (native, mine), step)
            assert max_err(m5, m7) <= TOL, step


def test_torch_state_dict_whose_steps_differ_is_refused_unchanged():
    """A torch.optim that loaded ours, then added a group of its own: that group lacks the
    values ours keeps (torch's has none of mithril's keys), refused by name, unchanged."""
    with default_dtype(torch.float64):
        m1, ours, m2, ref, lr = pair("adam")
        train_step((m1, m2), (ours, ref), 0)
        ref.load_state_dict(ours.state_dict())
        ref.add_param_group({"params": m2[2].parameters()})
        train_step((m2,), (ref,), 1)
        ours.add_param_group({"params": m1[2].parameters()})
        snap = snapshot(ours)
        with pytest.raises(KeyMismatchError,  # (the first of mithril's keys it lacks)
                           match=r"param_groups\[1\] has no '(centralize|clip_tensor_norm)' \(the optimizer's"):
            ours.load_state_dict(ref.state_dict())
        assert_unchanged(ours, snap)


def test_add_before_the_first_step_and_params_forms():
    """A single tensor, a list and a generator, added before any step: torch's numbers (Adam
    counts every parameter's steps from the same first step then)."""
    with default_dtype(torch.float64):
        m1, ours, m2, ref, lr = pair("adam")
        ours.add_param_group({"params": m1[2].weight, "betas": (0.8, 0.9)})
        ref.add_param_group({"params": m2[2].weight, "betas": (0.8, 0.9)})
        given = [{"params": [m[2].bias], "lr": 0.02, "weight_decay": 0.1} for m in (m1, m2)]
        ours.add_param_group(given[0])
        ref.add_param_group(given[1])
        assert ours.param_groups[2] is given[0] and ref.param_groups[2] is given[1]  # as torch
        assert len(ours.param_groups) == 3 and ours.param_groups[1]["lr"] == lr
        for step in range(10):
            train_step((m1, m2), (ours, ref), step)
            assert max_err(m1, m2) <= TOL, step


def test_named_groups_follow_torch():
    with default_dtype(torch.float64):
        m1, m2 = two_layers(), two_layers()
        ours = torch_optimizer(mo.SGD(learning_rate=0.1, momentum=0.9),
                               m1[0].named_parameters())
        ref = torch.optim.SGD(m2[0].named_parameters(), lr=0.1, momentum=0.9)
        for o, m in ((ours, m1), (ref, m2)):  # torch's text: named groups take named ones
            with pytest.raises(ValueError, match="cannot add param group without names"):
                o.add_param_group({"params": m[2].parameters()})
        assert len(ours.param_groups) == 1
        train_step((m1, m2), (ours, ref), 0)
        ours.add_param_group({"params": m1[2].named_parameters(prefix="2")})
        ref.add_param_group({"params": m2[2].named_parameters(prefix="2")})
        assert ours.param_groups[1]["param_names"] == ["2.weight", "2.bias"]
        assert ours.state_dict()["mithril"]["param_names"][2:] == ["2.weight", "2.bias"]
        for step in range(1, 6):
            train_step((m1, m2), (ours, ref), step)
            assert max_err(m1, m2) <= TOL


def test_adagrad_state_of_an_added_group_is_torchs():
    """torch.optim.Adagrad makes its constructor groups' state at once, and a later group's
    at its first step, from ``defaults``' ``initial_accumulator_value``."""
    with default_dtype(torch.float64):
        m1, m2 = two_layers(), two_layers()
        ours = torch_optimizer(mo.AdaGrad(learning_rate=0.1, epsilon=1e-10,
                                          initial_accumulator_value=0.3), m1[0].parameters())
        ref = torch.optim.Adagrad(m2[0].parameters(), lr=0.1, initial_accumulator_value=0.3)
        train_step((m1, m2), (ours, ref), 0)
        ours.add_param_group({"params": m1[2].parameters(), "initial_accumulator_value": 2.0})
        ref.add_param_group({"params": m2[2].parameters(), "initial_accumulator_value": 2.0})
        assert torch.equal(ours.state[m1[2].weight]["sum"],
                           torch.full_like(m1[2].weight, 0.3))
        for step in range(1, 8):
            train_step((m1, m2), (ours, ref), step)
            assert max_err(m1, m2) <= TOL
        assert rel_err(ours.state[m1[2].bias]["sum"], ref.state[m2[2].bias]["sum"]) <= TOL


def test_schedulers_made_before_the_add_behave_as_torchs():
    with default_dtype(torch.float64):
        m1, ours, m2, ref, lr = pair("sgd_nesterov")
        steps = [torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5) for o in (ours, ref)]
        for step in range(4):
            train_step((m1, m2), (ours, ref), step)
            for s in steps:
                s.step()
        ours.add_param_group({"params": m1[2].parameters(), "lr": 0.01})
        ref.add_param_group({"params": m2[2].parameters(), "lr": 0.01})
        assert "initial_lr" not in ours.param_groups[1]  # as torch's: set at construction
        for step in range(4, 12):
            train_step((m1, m2), (ours, ref), step)
            for s in steps:
                s.step()
            assert [g["lr"] for g in ours.param_groups] == [g["lr"] for g in ref.param_groups]
            assert max_err(m1, m2) <= TOL
        # one holding a value per group, or reading the new group's "initial_lr", fails as
        # torch's does
        for make, error in ((lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 0.9 ** e),
                             ValueError),
                            (lambda o: torch.optim.lr_scheduler.OneCycleLR(
                                o, max_lr=0.1, total_steps=20, cycle_momentum=False), KeyError)):
            m1, ours, m2, ref, lr = pair("sgd_nesterov")
            scheds = [make(o) for o in (ours, ref)]
            for o, m in ((ours, m1), (ref, m2)):
                o.add_param_group({"params": m[2].parameters()})
            train_step((m1, m2), (ours, ref), 0)
            for s in scheds:
                with pytest.raises(error):
                    s.step()


def snapshot(opt):
    sd = opt.state_dict()
    return sd, [dict(g) for g in opt.param_groups], [p.detach().clone() for p in opt._params]


def assert_unchanged(opt, snap):
    sd, groups, params = snap
    assert_same_dict(opt.state_dict(), sd)
    assert [{k: v for k, v in g.items()} for g in opt.param_groups] == groups
    assert all(torch.equal(p, q) for p, q in zip(opt._params, params))


def test_refused_groups_change_nothing():
    with default_dtype(torch.float64):
        m1, ours, m2, ref, lr = pair("adam")
        train_step((m1, m2), (ours, ref), 0)
        snap = snapshot(ours)
        for o, m in ((ours, m1), (ref, m2)):  # torch's error text
            with pytest.raises(ValueError, match="some parameters appear in more than one "
                                                 "parameter group"):
                o.add_param_group({"params": [m[2].weight, m[0].bias]})
        assert_unchanged(ours, snap)
        bad = [({"params": m1[2].parameters(), "momentum": 0.9}, KeyError,
                r"param_groups\[1\]: \['momentum'\] are not values of this optimizer"),
               ({"params": m1[2].parameters(), "lr": -1.0}, ValueError,
                r"param_groups\[1\]\['lr'\]"),
               ({"params": m1[2].parameters(), "betas": (0.9,)}, ValueError,
                r"param_groups\[1\]\['betas'\] must be a sequence of 2"),
               ({"params": m1[2].parameters(), "amsgrad": True}, ValueError,
                r"param_groups\[1\]\['amsgrad'\]"),
               ({"params": [nn.Parameter(torch.zeros(2, dtype=torch.float32))]}, TypeError,
                "mix dtypes"),
               ({"params": {m1[2].weight}}, TypeError, r"param_groups\[1\]\['params'\]"),
               ({"lr": 0.1}, KeyMismatchError, r"param_groups\[1\] has no 'params'"),
               ([m1[2].weight], TypeError, "param_group must be a dict")]
        for group, error, match in bad:
            with pytest.raises(error, match=match):
                ours.add_param_group(group)
            assert_unchanged(ours, snap)
        # and the run goes on as torch's
        ours.add_param_group({"params": m1[2].parameters()})
        ref.add_param_group({"params": m2[2].parameters()})
        ref.load_state_dict(ours.state_dict())
        for step in range(1, 4):
            train_step((m1, m2), (ours, ref), step)
            assert max_err(m1, m2) <= TOL


def test_a_change_needing_other_slots_is_refused_after_the_first_step():
    with default_dtype(torch.float64):
        m1, ours, m2, ref, lr = pair("sgd")
        train_step((m1, m2), (ours, ref), 0)
        ours.param_groups[0]["momentum"] = 0.9  # pending, not yet applied by a step
        snap = snapshot(ours)
        with pytest.raises(ValueError, match=r"param_groups\[1\].*state slots"):
            ours.add_param_group({"params": m1[2].parameters(), "momentum": 0.9})
        assert_unchanged(ours, snap)


@pytest.mark.parametrize("make, match", [
    (lambda: mo.LBFGS(learning_rate=1.0), "does not take parameter groups"),
    (lambda: mo.Prodigy(), "does not take torch's parameter-group dicts"),
    (lambda: mo.Muon(learning_rate=0.02), "does not take torch's parameter-group dicts"),
    (lambda: mo.ScheduleFreeAdamW(), "does not take torch's parameter-group dicts"),
    (lambda: mo.Adam(param_groups=[{"params": "bias", "learning_rate": 0.1}]),
     "has param_groups / weight-decay masks of its own"),
])
def test_one_group_optimizers_refuse(make, match):
    m = two_layers()
    opt = torch_optimizer(make(), m[0].named_parameters())
    snap = snapshot(opt)
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": m[2].named_parameters(prefix="2")})
    assert_unchanged(opt, snap)
