"""More of ``torch_optimizer`` given torch's parameter-group dicts, side by side with the
``torch.optim`` optimizer given the same groups (tests/test_interop_torch_param_groups.py
has the catalog): groups torch takes that the first version mishandled, each test failing
on that version."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from test_interop_torch_more import assert_unchanged, snapshot
from test_interop_torch_optimizer import TOL64, default_dtype, make_model, model_err, train
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

from mithril.interop import torch_optimizer
from mithril.utils import optimizers as mo


@pytest.fixture(autouse=True)
def _float64_default():
    """torch keeps NAdam's and ASGD's step scalars in the default dtype: float64, as ours."""
    with default_dtype(torch.float64):
        yield


def frozen(model, opt):
    """The parameters, the state dict and the mithril optimizer's own hyperparameters."""
    return snapshot(model, opt), copy.deepcopy(opt.mithril_optimizer.state_dict(None))


def assert_frozen(model, opt, before):
    assert_unchanged(model, opt, before[0])
    assert opt.mithril_optimizer.state_dict(None) == before[1]


def with_empty(m) -> list[dict]:
    """Groups with an empty one between (torch takes it: a model without biases gives an
    empty no-decay bucket)."""
    return [{"params": [m.l1.weight, m.l2.weight]},
            {"params": [], "weight_decay": 0.0, "lr": 0.5},
            {"params": [m.l1.bias, m.l2.bias, m.scale, m.shift], "lr": 0.02, "eps": 1e-6}]


def test_an_empty_group_is_silent_and_others_match_torch():
    """An empty group warned "matches no parameter" at every step after a rate change (the
    mithril optimizer held it as a group matching nothing)."""
    m1 = make_model()
    m2 = copy.deepcopy(m1)
    o1 = torch_optimizer(mo.Adam(learning_rate=0.01, weight_decay=0.1), with_empty(m1))
    o2 = torch.optim.Adam(with_empty(m2), lr=0.01, weight_decay=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for m, o in ((m1, o1), (m2, o2)):
            train(m, o, 12, sched=torch.optim.lr_scheduler.StepLR(o, 2, gamma=0.7))
            o.param_groups[2]["betas"] = (0.8, 0.99)  # (all groups set anew)
            train(m, o, 4, start=12)
    assert [g["lr"] for g in o1.param_groups] == [g["lr"] for g in o2.param_groups]
    assert model_err(m1, m2) < TOL64
    # its values are still checked, naming it (torch's index), with nothing changed
    before = frozen(m1, o1)
    for i, key, value, exc, msg in (
            (1, "lr", float("nan"), ValueError, r"param_groups\[1\]\['lr'\]: Adam lear"),
            (1, "eps", -1.0, ValueError, r"param_groups\[1\]\['eps'\]: .*epsilon must be"),
            (2, "eps", "x", TypeError, r"param_groups\[2\]\['eps'\]: .*must be a number")):
        o1.param_groups[i][key], old = value, o1.param_groups[i][key]
        assert o1.state_dict()["param_groups"][i][key] is value  # (saved as torch saves it)
        with pytest.raises(exc, match=msg):
            o1.step()
        o1.param_groups[i][key] = old
    assert_frozen(m1, o1, before)


def adagrad_groups(m) -> list[dict]:
    return [{"params": [m.l1.weight, m.l2.weight]},
            {"params": [m.l1.bias, m.l2.bias, m.scale], "lr": 0.05, "weight_decay": 0.0},
            {"params": [m.shift, m.extra], "lr": 0.2, "lr_decay": 0.1}]


def test_adagrad_state_is_made_with_the_optimizer_as_torchs():
    """torch.optim.Adagrad makes its state in its constructor, so DCP's
    ``get_optimizer_state_dict`` (a checkpoint at step 0) leaves it alone; ours had none yet,
    and DCP ran a step at lr 0 on it: one lr_decay step ahead and weight decay summed in."""
    m1 = make_model()
    m2 = copy.deepcopy(m1)
    o1 = torch_optimizer(mo.AdaGrad(learning_rate=0.1, epsilon=1e-10, lr_decay=0.01,
                                    weight_decay=0.01, initial_accumulator_value=0.1),
                         adagrad_groups(m1))
    o2 = torch.optim.Adagrad(adagrad_groups(m2), lr=0.1, lr_decay=0.01, weight_decay=0.01,
                             initial_accumulator_value=0.1)
    for m, o in ((m1, o1), (m2, o2)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (DCP's own warnings about a process group)
            get_optimizer_state_dict(m, o)
        train(m, o, 10)
    assert model_err(m1, m2) < TOL64
    fresh = torch_optimizer(mo.AdaGrad(), adagrad_groups(make_model())).state_dict()["state"]
    assert {k: sorted(v) for k, v in fresh.items()} == {
        k: sorted(v) for k, v in torch.optim.Adagrad(adagrad_groups(make_model())).state_dict()[
            "state"].items()}


def dcp_groups(m) -> list[dict]:
    return [{"params": [m.l1.weight, m.l2.weight]},
            {"params": [m.l1.bias, m.l2.bias, m.scale], "weight_decay": 0.0, "lr": 0.005},
            {"params": [m.shift, m.extra], "lr": 0.02}]


def test_flattened_distributed_checkpoint_resumes_as_torchs(tmp_path):
    """DCP's ``flatten_optimizer_state_dict=True`` (torchtitan's) unflattens only the keys
    the live groups have: the "mithril" entry was lost and the load refused ("no 'mithril'
    entry"). Saved after one group's values changed, loaded into a fresh wrapper, resumed
    as the unbroken run and as torch.optim.Adam doing the same."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    makers = {"torch": lambda m: torch.optim.Adam(dcp_groups(m), lr=0.01, weight_decay=0.1),
              "ours": lambda m: torch_optimizer(mo.Adam(learning_rate=0.01, weight_decay=0.1),
                                                dcp_groups(m))}
    ends = {}
    for label, make in makers.items():
        m = make_model()
        o = make(m)
        train(m, o, 3, extra_every=1)
        o.param_groups[1]["lr"] = 0.002
        o.param_groups[2]["betas"] = (0.8, 0.9)
        train(m, o, 2, start=3, extra_every=1)
        m2 = make_model(seed=5)
        m2.load_state_dict(m.state_dict())
        o2 = make(m2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (DCP's own warnings about a process group)
            dcp.save({"optim": get_optimizer_state_dict(m, o, options=flat)},
                     checkpoint_id=str(tmp_path / label))
            holder = {"optim": get_optimizer_state_dict(m2, o2, options=flat)}
            dcp.load(holder, checkpoint_id=str(tmp_path / label))
            set_optimizer_state_dict(m2, o2, holder["optim"], options=flat)
        assert [(g["lr"], g["betas"]) for g in o2.param_groups] == \
            [(0.01, (0.9, 0.999)), (0.002, (0.9, 0.999)), (0.02, (0.8, 0.9))]
        train(m, o, 3, start=5, extra_every=1)
        train(m2, o2, 3, start=5, extra_every=1)
        assert all(torch.equal(p, q) for p, q in zip(m.parameters(), m2.parameters())), label
        ends[label] = m2
    assert model_err(ends["ours"], ends["torch"]) < TOL64
    # a state dict of ours that lost the entry some other way loads as a torch.optim one
    # (its groups hold the values, each entry's step its count: the same run on)
    m = make_model()
    o = makers["ours"](m)
    train(m, o, 3, extra_every=2)
    sd = o.state_dict()
    del sd["mithril"], sd["param_groups"][0]["mithril"]
    m3 = copy.deepcopy(m)
    o3 = makers["ours"](m3)
    o3.load_state_dict(sd)
    train(m, o, 3, start=3, extra_every=2)
    train(m3, o3, 3, start=3, extra_every=2)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), m3.parameters()))


@pytest.mark.parametrize("cls,given,msg", [
    (mo.Adam, [{"eps": -1.0}], r"^param_groups\[0\]\['eps'\]: epsilon must be > 0"),
    (mo.Adam, [{"lr": -1.0}], r"^param_groups\[0\]\['lr'\]: learning_rate must be >= 0"),
    (mo.Adam, [{}, {"lr": 0.5, "betas": (0.9, 2.0)}],
     r"^param_groups\[1\]\['lr'\], param_groups\[1\]\['betas'\]: .*beta2 must be in"),
    (mo.RMSProp, [{}, {"alpha": 1.5}], r"^param_groups\[1\]\['alpha'\]: .*decay must be in"),
])
def test_a_refused_group_value_is_named_by_its_torch_key(cls, given, msg):
    """A value the optimizer refused at construction was named by mithril's name or not at
    all (``epsilon must be > 0``; a single group: no group either), where the same value
    set mid-run names ``param_groups[i]['key']``."""
    m = make_model()
    opt = cls(learning_rate=0.01)
    before = copy.deepcopy(opt.state_dict())
    params = [[m.l1.weight], [m.l1.bias]]
    with pytest.raises(ValueError, match=msg):
        torch_optimizer(opt, [{"params": ps, **g} for ps, g in zip(params, given)])
    assert opt.state_dict() == before


def test_a_refused_saved_group_value_is_named_by_its_torch_key():
    """A state dict whose group holds a value the optimizer refuses named mithril's name or
    nothing (``beta2 must be in [0, 1)``); loaded after torch's Adam trained alongside, the
    good one still resumes as torch's."""
    m1 = make_model()
    m2 = copy.deepcopy(m1)
    o1 = torch_optimizer(mo.Adam(learning_rate=0.01), dcp_groups(m1))
    o2 = torch.optim.Adam(dcp_groups(m2), lr=0.01)
    train(m1, o1, 4)
    train(m2, o2, 4)
    good = o1.state_dict()
    before = frozen(m1, o1)
    for i, key, value, msg in ((0, "betas", (0.9, 2.0), "beta2 must be in"),
                               (2, "eps", -1.0, "epsilon must be > 0")):
        bad = copy.deepcopy(good)
        bad["param_groups"][i][key] = value
        with pytest.raises(ValueError, match=rf"refused \(nothing changed\): param_groups\[{i}\]"
                                             rf"\['{key}'\]: .*{msg}"):
            o1.load_state_dict(bad)
        assert_frozen(m1, o1, before)
    o1.load_state_dict(good)
    train(m1, o1, 4, start=4)
    train(m2, o2, 4, start=4)
    assert model_err(m1, m2) < TOL64
