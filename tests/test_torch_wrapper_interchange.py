"""State dicts between a mithril ``torch_optimizer`` and the ``torch.optim`` optimizer of the
same kind, both ways, for every optimizer torch also has (tests/test_interop_torch_optimizer.py's
``CASES``): torch's own state dict (not one that went through ours) loaded into ours, ours into
torch's, then more steps on both: the parameters equal to 1e-12 (:func:`rel_err`) and the
same observable state (each parameter's ``step`` and torch's slots). A parameter that never
had a gradient (torch keeps no entry for it) and one that has one every 3rd step only are in
each run. torch's groups that ours cannot run (AdamW's ``decoupled_weight_decay`` into Adam,
``maximize``, another optimizer's slots) are refused by name, nothing changed."""

from __future__ import annotations

import copy

import pytest
import torch
from test_interop_torch_optimizer import (
    CASES,
    data,
    default_dtype,
    make_model,
    model_err,
    ours_for,
    torch_for,
)

from mithril.errors import KeyMismatchError
from mithril.interop import torch_optimizer
from mithril.utils import optimizers as mo

TOL = 1e-12
#: the parameter without a gradient until the load (index in ``model.parameters()``)
FROZEN = 4


@pytest.fixture(autouse=True)
def _float64_default():
    with default_dtype(torch.float64):
        yield


def steps(model, opt, n: int, start: int = 0, frozen: bool = True) -> None:
    """Full-batch steps; ``extra`` has a gradient every 3rd step, ``l1.bias`` none while
    ``frozen``."""
    x, y = data(torch.float64)
    for t in range(start, start + n):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x, t % 3 == 0), y).backward()
        if frozen:
            model.l1.bias.grad = None
        opt.step()


def assert_same_state(ours, theirs) -> None:
    """Every entry of torch's state dict is in ours, equal (``step`` as a number); an entry
    torch has not made yet (no gradient so far) is ours at step 0."""
    a, b = ours.state_dict()["state"], theirs.state_dict()["state"]
    assert set(b) <= set(a)
    sgd = isinstance(theirs, torch.optim.SGD)  # (torch's counts no steps: a loaded one stays)
    for pid, entry in a.items():
        if pid not in b:
            assert sgd or float(entry["step"]) == 0, pid
            continue
        for key, value in b[pid].items():
            got = entry[key]
            if key == "step":  # (torch's scalar dtype: float64 where that is the default)
                assert sgd or (float(got) == float(value) and got.dtype == value.dtype), pid
            else:
                torch.testing.assert_close(got, value, rtol=TOL, atol=1e-15, msg=(pid, key))


def snapshot(model, opt) -> tuple:
    return ([p.detach().clone() for p in model.parameters()], str(opt.state_dict()),
            copy.deepcopy([{k: v for k, v in g.items() if k != "params"}
                           for g in opt.param_groups]))


@pytest.mark.parametrize("case", list(CASES))
def test_torchs_state_dict_loads_into_ours_and_both_go_on(case):
    m1 = make_model()
    m2 = copy.deepcopy(m1)
    ref, theirs = m2, torch_for(case, m2)
    steps(ref, theirs, 7)
    with torch.no_grad():
        for p, q in zip(m1.parameters(), ref.parameters()):
            p.copy_(q)
    ours = ours_for(case, m1)
    steps(m1, ours, 2, frozen=False)  # (a state of its own first: the load replaces it)
    with torch.no_grad():
        for p, q in zip(m1.parameters(), ref.parameters()):
            p.copy_(q)
    ours.load_state_dict(theirs.state_dict())
    assert_same_state(ours, theirs)
    steps(m1, ours, 6, start=7, frozen=False)
    steps(ref, theirs, 6, start=7, frozen=False)
    err = model_err(m1, ref)
    assert err <= TOL, f"{case}: {err:.3g}"
    assert_same_state(ours, theirs)
    # and back: ours (now counting on from torch's) into a fresh torch.optim
    m3 = copy.deepcopy(m1)
    back = torch_for(case, m3)
    back.load_state_dict(ours.state_dict())
    steps(m1, ours, 4, start=13, frozen=False)
    steps(m3, back, 4, start=13, frozen=False)
    assert model_err(m1, m3) <= TOL, case
    assert_same_state(ours, back)


@pytest.mark.parametrize("case", ["adam", "sgd_momentum", "sgd_nesterov", "asgd", "adagrad",
                                  "rprop"])
def test_ours_loads_into_torchs_with_groups_and_a_frozen_parameter(case):
    """Two groups (the second at half the rate), a parameter that never had a gradient:
    ours saved, torch's loads it and both go on; then torch's own saved back into ours."""
    cls, kw, _, _ = CASES[case]
    name, tkw = CASES[case][2], CASES[case][3]
    lr = tkw["lr"]

    def split(m, named):
        ps = list(m.named_parameters()) if named else list(m.parameters())
        return [{"params": ps[:3]}, {"params": ps[3:], "lr": lr / 2}]

    m1 = make_model()
    m2 = copy.deepcopy(m1)
    ours = torch_optimizer(cls(**kw), split(m1, True))
    theirs = getattr(torch.optim, name)(split(m2, False), **tkw)
    steps(m1, ours, 5)
    m3 = copy.deepcopy(m1)
    loaded = getattr(torch.optim, name)(split(m3, False), **tkw)
    loaded.load_state_dict(ours.state_dict())
    steps(m1, ours, 5, start=5, frozen=False)
    steps(m3, loaded, 5, start=5, frozen=False)
    assert model_err(m1, m3) <= TOL
    assert_same_state(ours, loaded)
    steps(m2, theirs, 5)
    again = torch_optimizer(cls(**kw), split(m1, True))
    with torch.no_grad():
        for p, q in zip(m1.parameters(), m2.parameters()):
            p.copy_(q)
    again.load_state_dict(theirs.state_dict())
    assert [g["lr"] for g in again.param_groups] == [lr, lr / 2]
    steps(m1, again, 5, start=5, frozen=False)
    steps(m2, theirs, 5, start=5, frozen=False)
    assert model_err(m1, m2) <= TOL
    assert_same_state(again, theirs)


REFUSED = {
    # (ours, torch's, an edit of torch's state dict, the error, its text)
    "AdamW's into Adam": ("adam", "adamw", None, ValueError,
                          "param_groups[0]['decoupled_weight_decay'] = True: Adam has no"),
    "Adam's into AdamW": ("adamw", "adam", None, ValueError,
                          "param_groups[0]['decoupled_weight_decay'] = False: AdamW has no"),
    "maximize": ("adam", "adam", lambda sd: sd["param_groups"][0].update(maximize=True),
                 ValueError, "param_groups[0]['maximize'] = True: Adam has no 'maximize'"),
    "Adam's into SGD": ("sgd_momentum", "adam", None, KeyMismatchError,
                        "['exp_avg', 'exp_avg_sq'] unknown to SGD"),
    "Adam's into NAdam": ("nadam", "adam", None, KeyMismatchError,
                          "slot 'mu_product' must have exactly the parameters"),
    "fewer parameters": ("adam", "adam", lambda sd: sd["param_groups"][0]["params"].pop(),
                         ValueError, "parameter group 0 has 6 parameters, this optimizer's 7"),
    "bad step": ("adam", "adam", lambda sd: sd["state"][0].update(step=torch.tensor(2.5)),
                 ValueError, "'state'[0]['step'] must be a whole number"),
    "two groups": ("adam", "adam", lambda sd: sd["param_groups"].append(
        {**sd["param_groups"][0], "params": []}), ValueError, "must be a list of one group"),
}


@pytest.mark.parametrize("label", list(REFUSED))
def test_a_torch_state_dict_ours_cannot_run_is_refused_unchanged(label):
    mine, theirs_case, edit, exc, msg = REFUSED[label]
    m1, m2 = make_model(), make_model()
    ours, theirs = ours_for(mine, m1), torch_for(theirs_case, m2)
    steps(m1, ours, 3)
    steps(m2, theirs, 4)
    sd = theirs.state_dict()
    if edit is not None:
        edit(sd)
    before = snapshot(m1, ours)
    with pytest.raises(exc) as info:
        ours.load_state_dict(sd)
    assert msg in str(info.value)
    after = snapshot(m1, ours)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    assert before[1:] == after[1:]


def test_a_torch_state_dict_before_any_step_loads_as_a_fresh_state():
    m1 = make_model()
    m2 = copy.deepcopy(m1)
    ours, theirs = ours_for("adam", m1), torch_for("adam", m2)
    steps(m1, ours, 3)
    with torch.no_grad():
        for p, q in zip(m1.parameters(), m2.parameters()):
            p.copy_(q)
    theirs.param_groups[0]["lr"] = 0.02
    ours.load_state_dict(theirs.state_dict())
    assert ours.mithril_state is None and ours.param_groups[0]["lr"] == 0.02
    steps(m1, ours, 4)
    steps(m2, theirs, 4)
    assert model_err(m1, m2) <= TOL
    assert_same_state(ours, theirs)
    assert isinstance(ours.mithril_optimizer, mo.Adam)


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8, bias=False), torch.nn.Tanh(),
                               torch.nn.Linear(8, 3, bias=False))


@pytest.mark.parametrize("name", ["Adafactor", "Muon"])
def test_adafactor_and_muon_interchange_both_ways(name):
    """torch.optim's Adafactor (float64) and Muon (its bfloat16 Newton-Schulz, float32):
    torch's state dict into ours and ours into torch's, each going on as the other."""
    dtype = torch.float32 if name == "Muon" else torch.float64
    make_ours = {"Adafactor": lambda m: torch_optimizer(mo.Adafactor(learning_rate=0.01),
                                                        m.named_parameters()),
                 "Muon": lambda m: torch_optimizer(mo.Muon(learning_rate=0.02),
                                                   m.named_parameters())}[name]
    lr = 0.02 if name == "Muon" else 0.01
    with default_dtype(dtype):
        m2 = _mlp()
        m1 = copy.deepcopy(m2)
        x, y = torch.randn(32, 5), torch.randn(32, 3)

        def run(m, o, n):
            for _ in range(n):
                o.zero_grad()
                torch.nn.functional.mse_loss(m(x), y).backward()
                o.step()

        theirs = getattr(torch.optim, name)(m2.parameters(), lr=lr)
        run(m2, theirs, 3)
        ours = make_ours(m1)
        with torch.no_grad():
            for p, q in zip(m1.parameters(), m2.parameters()):
                p.copy_(q)
        ours.load_state_dict(theirs.state_dict())
        run(m1, ours, 3)
        run(m2, theirs, 3)
        assert model_err(m1, m2) <= TOL
        m3 = copy.deepcopy(m1)
        back = getattr(torch.optim, name)(m3.parameters(), lr=lr)
        back.load_state_dict(ours.state_dict())
        run(m1, ours, 3)
        run(m3, back, 3)
        assert model_err(m1, m3) <= TOL


def test_torchs_lbfgs_state_dict_is_refused_by_name():
    """torch.optim.LBFGS's own state dict (its flat history in its first parameter's entry)
    is taken by LBFGS() and goes on as torch (it was refused, saying it held none of
    LBFGS's optimizer-wide values, which it does); an optax-convention LBFGS, whose values
    torch's do not give, still refuses it by name, nothing changed."""
    m2 = _mlp().double()
    x, y = torch.randn(32, 5), torch.randn(32, 3)
    theirs = torch.optim.LBFGS(m2.parameters())

    def closure():
        theirs.zero_grad()
        loss = torch.nn.functional.mse_loss(m2(x), y)
        loss.backward()
        return loss

    theirs.step(closure)
    m1 = copy.deepcopy(m2)
    ours = torch_optimizer(mo.LBFGS(), m1.named_parameters())
    ours.load_state_dict(theirs.state_dict())

    def closure1():
        ours.zero_grad()
        loss = torch.nn.functional.mse_loss(m1(x), y)
        loss.backward()
        return loss

    ours.step(closure1)
    theirs.step(closure)
    assert model_err(m1, m2) <= TOL
    m3 = copy.deepcopy(m2)
    optax_like = torch_optimizer(mo.LBFGS(convention="optax"), m3.named_parameters())
    before = snapshot(m3, optax_like)
    with pytest.raises(ValueError, match=r"a torch.optim optimizer's state does not give "
                                         r"LBFGS's optimizer-wide values"):
        optax_like.load_state_dict(theirs.state_dict())
    assert before[1:] == snapshot(m3, optax_like)[1:]
