"""``torch_optimizer`` given torch's list of parameter-group dicts, side by side with the
``torch.optim`` optimizer given the same groups: every optimizer of the torch catalog
(tests/test_interop_torch_optimizer.py's ``CASES``) with a per-group learning rate, weight
decay and a per-group ``LambdaLR`` whose first lane starts at 0; values changed mid-run;
state dicts (also through ``torch.distributed.checkpoint``); ``GradScaler`` and
``OneCycleLR``; groups that cannot be held, refused by name with nothing changed."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from test_interop_torch_optimizer import (
    CASES,
    TOL64,
    data,
    default_dtype,
    make_model,
    model_err,
    train,
)
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from mithril.errors import KeyMismatchError
from mithril.interop import torch_optimizer
from mithril.utils import optimizers as mo

#: torch.optim classes without a weight_decay argument
NO_WD = {"rprop"}
#: lambdas per group: the first warms up from 0 (its rate is 0 while the others' are not)
LAMBDAS = [lambda s: min(1.0, s / 5), lambda s: 0.95 ** s, lambda s: 1.0]


@pytest.fixture(autouse=True)
def _float64_default():
    """torch keeps NAdam's and ASGD's step scalars in the default dtype: float64 here, as
    ours (tests/test_interop_torch_optimizer.py's parity runs do the same)."""
    with default_dtype(torch.float64):
        yield


def groups(model, lr: float, case: str = "", named: bool = False) -> list[dict]:
    """Weights at the optimizer's values; biases, scale and ``extra`` (no gradient unless
    ``train(extra_every=)``) at half the rate without weight decay; ``shift`` alone at
    twice the rate."""
    def ps(*names):
        return [(n, getattr_path(model, n)) if named else getattr_path(model, n) for n in names]

    second = {"lr": lr / 2, **({} if case in NO_WD else {"weight_decay": 0.0})}
    return [{"params": ps("l1.weight", "l2.weight")},
            {"params": ps("l1.bias", "l2.bias", "scale", "extra"), **second},
            {"params": ps("shift"), "lr": lr * 2}]


def getattr_path(model, name):
    for part in name.split("."):
        model = getattr(model, part)
    return model


def pair(case: str, model, named: bool = False):
    """(ours, torch's), each over its own copy of ``model``, and the two copies."""
    cls, kw, tname, tkw = CASES[case]
    m1, m2 = model, copy.deepcopy(model)
    ours = torch_optimizer(cls(**kw), groups(m1, tkw["lr"], case, named))
    ref = getattr(torch.optim, tname)(groups(m2, tkw["lr"], case), **tkw)
    return (m1, ours), (m2, ref)


@pytest.mark.parametrize("case", list(CASES))
def test_groups_match_torch(case):
    (m1, o1), (m2, o2) = pair(case, make_model())
    for m, o in ((m1, o1), (m2, o2)):
        train(m, o, 40, sched=torch.optim.lr_scheduler.LambdaLR(o, LAMBDAS))
    assert [g["lr"] for g in o1.param_groups] == [g["lr"] for g in o2.param_groups]
    assert model_err(m1, m2) < TOL64, case


def test_named_groups_and_state_dict_layout():
    (m1, o1), (m2, o2) = pair("adamw", make_model(), named=True)
    ref = torch.optim.AdamW(groups(copy.deepcopy(m2), 0.01, named=True), lr=0.01,
                            weight_decay=0.1)
    assert [g["param_names"] for g in o1.param_groups] == \
        [g["param_names"] for g in ref.param_groups]
    train(m1, o1, 3)
    train(m2, o2, 3)
    ours, theirs = o1.state_dict(), o2.state_dict()
    assert [g["params"] for g in ours["param_groups"]] == \
        [g["params"] for g in theirs["param_groups"]] == [[0, 1], [2, 3, 4, 5], [6]]
    for g, t in zip(ours["param_groups"], theirs["param_groups"]):
        for key in ("lr", "betas", "eps", "weight_decay", "amsgrad"):
            assert g[key] == t[key], key
    assert set(theirs["state"]) == set(range(7)) - {5}  # (torch: none for `extra`, unused)
    for i, entry in theirs["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours["state"][i][key], entry[key], rtol=1e-12, atol=0)


def test_group_values_changed_mid_run_match_torch():
    (m1, o1), (m2, o2) = pair("adamw", make_model())
    for m, o in ((m1, o1), (m2, o2)):
        train(m, o, 10)
        o.param_groups[1]["weight_decay"] = 0.3
        o.param_groups[2]["betas"] = (0.8, 0.95)
        o.param_groups[0]["eps"] = 1e-6
        train(m, o, 10, start=10)
    assert model_err(m1, m2) < TOL64


def _roundtrip(sd: dict) -> dict:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("case", ["adamw", "sgd_nesterov", "asgd"])
def test_resume_with_groups_is_bit_exact(case):
    def run(model, steps, start, state=None):
        _, kw, _, tkw = CASES[case]
        opt = torch_optimizer(CASES[case][0](**kw), groups(model, tkw["lr"], case))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, LAMBDAS)
        if state is not None:
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
        train(model, opt, steps, start=start, sched=sched)
        return opt, sched

    full = make_model()
    run(full, 30, 0)
    part = make_model()
    o1, s1 = run(part, 12, 0)
    saved = _roundtrip({"model": part.state_dict(), "opt": o1.state_dict(),
                        "sched": s1.state_dict()})
    fresh = make_model(seed=3)
    fresh.load_state_dict(saved["model"])
    run(fresh, 18, 12, saved)
    for (n, p), q in zip(full.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), f"{case}: {n} differs after resuming"


def test_resume_through_distributed_checkpoint_helpers():
    """``get/set_optimizer_state_dict`` keep only ``state`` and ``param_groups`` (by
    parameter name): the groups' values and the counters come back, and training goes on
    as it would have."""
    def make(m):
        return torch_optimizer(mo.Adam(learning_rate=0.01, weight_decay=0.1),
                               groups(m, 0.01))

    m = make_model()
    o = make(m)
    train(m, o, 3)
    o.param_groups[1]["lr"] = 0.002
    m2 = make_model(seed=5)
    m2.load_state_dict(m.state_dict())
    o2 = make(m2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (DCP's own warnings about a process group)
        set_optimizer_state_dict(m2, o2, copy.deepcopy(get_optimizer_state_dict(m, o)))
    assert [g["lr"] for g in o2.param_groups] == [0.01, 0.002, 0.02]
    train(m, o, 3, start=3)
    train(m2, o2, 3, start=3)
    for p, q in zip(m.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_grad_scaler_and_clipping_with_groups():
    (m1, o1), (m2, o2) = pair("adam", make_model())
    x, y = data(torch.float64)
    for m, o in ((m1, o1), (m2, o2)):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=3)
        for t in range(12):
            o.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x), y)
            scaler.scale(loss * (float("inf") if t == 4 else 1.0)).backward()
            scaler.unscale_(o)
            torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
            scaler.step(o)
            scaler.update()
    assert model_err(m1, m2) < TOL64


def test_one_cycle_per_group_cycles_each_groups_betas():
    (m1, o1), (m2, o2) = pair("adam", make_model())
    for m, o in ((m1, o1), (m2, o2)):
        sched = torch.optim.lr_scheduler.OneCycleLR(o, max_lr=[0.02, 0.01, 0.05],
                                                    total_steps=25, base_momentum=0.8,
                                                    max_momentum=[0.95, 0.9, 0.92])
        train(m, o, 24, sched=sched)
    assert [g["betas"] for g in o1.param_groups] == [g["betas"] for g in o2.param_groups]
    assert model_err(m1, m2) < TOL64


REFUSED = {
    "unknown key": (mo.Adam, {"momentum": 0.9}, KeyError, r"param_groups\[1\]: \['momentum'\]"),
    "rule differs": (mo.Adam, {"amsgrad": True}, ValueError,
                     r"param_groups\[1\]: amsgrad=True changes Adam's state slots"),
    "momentum 0 vs 0.9": (mo.SGD, {"momentum": 0.9}, ValueError,
                          r"param_groups\[1\]: momentum=0.9 changes SGD's"),
    "whole-step value": (mo.Adam, {"clip_norm": 1.0}, ValueError,
                         r"param_groups\[1\]\['clip_norm'\] = 1.0 differs .* whole step"),
    "negative lr": (mo.Adam, {"lr": -1.0}, ValueError,
                    r"param_groups\[1\]\['learning_rate'\]: learning_rate must be >= 0"),
    "betas of one": (mo.Adam, {"betas": (0.9,)}, ValueError,
                     r"param_groups\[1\]\['betas'\] must be a sequence of 2"),
}


@pytest.mark.parametrize("label", list(REFUSED))
def test_groups_that_cannot_be_held_are_refused(label):
    cls, extra, exc, msg = REFUSED[label]
    opt = cls(learning_rate=0.1)
    before = copy.deepcopy(opt.state_dict())
    model = make_model()
    with pytest.raises(exc, match=msg):
        torch_optimizer(opt, [{"params": [model.l1.weight]},
                              {"params": [model.l1.bias], **extra}])
    assert opt.state_dict() == before, label


@pytest.mark.parametrize("opt,msg", [
    (mo.LBFGS(), "LBFGS does not take parameter groups"),
    (mo.Prodigy(), r"Prodigy does not take torch's parameter-group dicts: its \['d', 'numerator'\]"),
    (mo.Muon(), r"its \['fallback'\] follow"),
    (mo.Adam(param_groups=[{"params": ["x"], "learning_rate": 0.1}]), "not both"),
])
def test_optimizers_that_cannot_take_torch_groups(opt, msg):
    model = make_model()
    with pytest.raises(ValueError, match=msg):
        torch_optimizer(opt, [{"params": [model.l1.weight]}, {"params": [model.l1.bias]}])


def test_a_refused_change_mid_run_changes_nothing():
    (m1, o1), (m2, o2) = pair("sgd_momentum", make_model())
    train(m1, o1, 5)
    train(m2, o2, 5)
    hp = copy.deepcopy(o1.mithril_optimizer.state_dict()["hyperparameters"])
    params = [p.detach().clone() for p in m1.parameters()]
    slots = o1.mithril_state.slot("momentum")
    slots = {k: v.clone() for k, v in slots.items()}
    o1.param_groups[0]["lr"] = 0.5
    o1.param_groups[1]["momentum"] = 0.0  # would drop the momentum buffer: refused
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\], "
                                         r"param_groups\[1\]\['momentum'\]"):
        train(m1, o1, 1, start=5)
    o1.param_groups[1]["momentum"] = 0.9
    o1.param_groups[0]["lr"] = 0.05
    o1.param_groups[2]["lr"] = float("nan")
    with pytest.raises(ValueError, match=r"param_groups\[2\]\['lr'\]"):
        train(m1, o1, 1, start=5)
    assert o1.mithril_optimizer.state_dict()["hyperparameters"] == hp
    assert all(torch.equal(p, q) for p, q in zip(params, m1.parameters()))
    assert all(torch.equal(v, o1.mithril_state.slot("momentum")[k]) for k, v in slots.items())
    o1.param_groups[2]["lr"] = 0.1  # put right, the run goes on as torch's
    train(m1, o1, 5, start=5)
    train(m2, o2, 5, start=5)
    assert model_err(m1, m2) < TOL64


def test_state_dict_of_other_groups_refused_nothing_changed():
    model = make_model()
    opt = torch_optimizer(mo.Adam(learning_rate=0.01), groups(model, 0.01))
    train(model, opt, 2)
    good = opt.state_dict()
    one = torch_optimizer(mo.Adam(learning_rate=0.01), make_model().parameters())
    before = copy.deepcopy(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    other = copy.deepcopy(good)
    other["param_groups"][1]["params"] = [2, 3, 4]
    other["param_groups"][2]["params"] = [5, 6]
    for bad, msg in ((one.state_dict(), "a list of 3 groups"),
                     (other, "parameter group 1 has 3 parameters, this optimizer's 4")):
        with pytest.raises(ValueError, match=msg):
            opt.load_state_dict(bad)
    missing = copy.deepcopy(good)
    del missing["param_groups"][2]["betas"]
    with pytest.raises(KeyMismatchError, match=r"param_groups\[2\] has no 'betas'"):
        opt.load_state_dict(missing)
    torch.testing.assert_close(opt.state_dict()["state"], before["state"], rtol=0, atol=0)
    assert opt.state_dict()["param_groups"] == before["param_groups"]
    assert all(torch.equal(p, q) for p, q in zip(params, model.parameters()))


def test_other_entries_of_a_group_are_carried_along_as_torchs():
    """A group's entry that is no setting (``"name"``, used to log per group) is kept in
    the group and its state dict as torch keeps it (it was refused); a near spelling of a
    key, or another optimizer's setting, is still refused."""
    model = make_model()
    tagged = [{**g, "name": n} for g, n in zip(groups(model, 0.01), ("w", "b", "shift"))]
    ours = torch_optimizer(mo.AdamW(learning_rate=0.01, weight_decay=0.1), tagged)
    ref = torch.optim.AdamW([dict(g) for g in tagged], lr=0.01, weight_decay=0.1)
    assert [g["name"] for g in ours.param_groups] == [g["name"] for g in ref.param_groups]
    train(model, ours, 3)
    sd = ours.state_dict()
    assert [g["name"] for g in sd["param_groups"]] == ["w", "b", "shift"]
    again = make_model()
    fresh = torch_optimizer(mo.AdamW(learning_rate=0.01, weight_decay=0.1), groups(again, 0.01))
    fresh.load_state_dict(sd)
    assert [g["name"] for g in fresh.param_groups] == ["w", "b", "shift"]
    for bad, msg in (({"weight_decy": 0.0}, "did you mean weight_decay"),
                     ({"nesterov": True}, r"\['nesterov'\] are not values")):
        with pytest.raises(KeyError, match=msg):
            torch_optimizer(mo.AdamW(), [{"params": [again.l1.weight]},
                                         {"params": [again.l1.bias], **bad}])


@pytest.mark.parametrize("cls", [mo.DoG, mo.DoWG])
def test_plain_groups_of_an_optimizer_with_step_wide_values(cls):
    """A torch group repeats every default, the step-wide ones (DoG's layer_wise, eps,
    init_step) included: the same values are no change (they were refused, naming values the
    user never set); the run equals one group's bit for bit."""
    m1, m2 = make_model(), make_model()
    m2.load_state_dict(m1.state_dict())
    o1 = torch_optimizer(cls(layer_wise=True), [{"params": [m1.l1.weight]},
                                                {"params": [p for n, p in m1.named_parameters()
                                                            if n != "l1.weight"]}])
    o2 = torch_optimizer(cls(layer_wise=True), m2.parameters())
    for t in range(3):
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            x, y = data(torch.float64, seed=t + 1)
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    assert not torch.equal(m1.l1.weight, make_model().l1.weight)  # (the steps moved it)
