"""torch_optimizer(LBFGS)'s state dict in torch.optim.LBFGS's own layout, both ways: ours
loaded into torch.optim.LBFGS, and torch's into ours, each going on as an unbroken run of
the other (float64; history_size smaller than the steps, so the history wraps; with and
without strong-Wolfe; mid-run), and malformed dicts in torch's layout refused, nothing
changed."""

import copy

import pytest
import torch

import mithril.utils.optimizers as mo
from mithril.interop import torch_optimizer


def _setup(seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(),
                            torch.nn.Linear(4, 3)).double()
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
    return m, x, y


def _run(m, o, x, y, n):
    losses = []
    for _ in range(n):
        def closure():
            o.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x), y)
            loss.backward()
            return loss
        losses.append(float(o.step(closure).detach()))
    return losses


def _params(m):
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


KW = [dict(lr=0.5, history_size=3, max_iter=4),
      dict(lr=1.0, history_size=2, max_iter=5, line_search_fn="strong_wolfe")]


def _ours(m, kw):
    kw = dict(kw)
    return torch_optimizer(mo.LBFGS(learning_rate=kw.pop("lr"), **kw), m.named_parameters())


@pytest.mark.parametrize("kw", KW)
def test_ours_into_torch_lbfgs_goes_on_as_ours(kw):
    """Was: loaded without complaint, then torch's step crashed (per-parameter d)."""
    m, x, y = _setup()
    ref = copy.deepcopy(m)
    theirs_ref = torch.optim.LBFGS(ref.parameters(), **kw)
    ours = _ours(m, kw)
    _run(m, ours, x, y, 3)
    _run(ref, theirs_ref, x, y, 3)
    sd = ours.state_dict()
    st = sd["state"]
    assert list(st) == [0]
    assert len(st[0]["old_dirs"]) == kw["history_size"]
    m2 = copy.deepcopy(m)
    back = torch.optim.LBFGS(m2.parameters(), **kw)
    back.load_state_dict(sd)
    got = _run(m2, back, x, y, 3)
    want = _run(m, ours, x, y, 3)
    unbroken = _run(ref, theirs_ref, x, y, 3)
    assert got == pytest.approx(want, rel=0, abs=0)
    torch.testing.assert_close(_params(m2), _params(m), rtol=0, atol=0)
    torch.testing.assert_close(_params(m2), _params(ref), rtol=0, atol=0)
    assert unbroken == pytest.approx(want, rel=0, abs=0)
    ts, rs = back.state[next(iter(m2.parameters()))], theirs_ref.state[
        next(iter(ref.parameters()))]
    assert (ts["n_iter"], ts["func_evals"]) == (rs["n_iter"], rs["func_evals"])
    # and torch's dict after it went on, back into ours: as the unbroken run again
    m3 = copy.deepcopy(m2)
    again = _ours(m3, kw)
    again.load_state_dict(back.state_dict())
    _run(m3, again, x, y, 2)
    _run(ref, theirs_ref, x, y, 2)
    torch.testing.assert_close(_params(m3), _params(ref), rtol=0, atol=0)


@pytest.mark.parametrize("kw", KW)
def test_torchs_lbfgs_state_dict_into_ours_goes_on_as_torch(kw):
    """Was: refused ('holds none of LBFGS's optimizer-wide values', which it does)."""
    m, x, y = _setup(1)
    theirs = torch.optim.LBFGS(m.parameters(), **kw)
    _run(m, theirs, x, y, 4)
    m1 = copy.deepcopy(m)
    ours = _ours(m1, kw)
    ours.load_state_dict(theirs.state_dict())
    s = ours.state_dict()["state"][0]
    t = theirs.state[next(iter(m.parameters()))]
    for k in ("d", "prev_flat_grad"):
        assert torch.equal(s[k], t[k])
    for k in ("old_dirs", "old_stps", "ro"):
        assert all(torch.equal(torch.as_tensor(a), torch.as_tensor(b))
                   for a, b in zip(s[k], t[k])) and len(s[k]) == len(t[k])
    assert (s["n_iter"], s["func_evals"], s["prev_loss"]) == (
        t["n_iter"], t["func_evals"], t["prev_loss"])
    got = _run(m1, ours, x, y, 4)
    want = _run(m, theirs, x, y, 4)
    assert got == pytest.approx(want, rel=0, abs=0)
    torch.testing.assert_close(_params(m1), _params(m), rtol=0, atol=0)


def test_torchs_fresh_and_first_step_dicts():
    """A dict of torch's before any step, and after a first step that stopped at once
    (gradient under tolerance_grad: only func_evals / n_iter)."""
    m, x, y = _setup(2)
    theirs = torch.optim.LBFGS(m.parameters(), tolerance_grad=1e9)
    _run(m, theirs, x, y, 1)
    sd = theirs.state_dict()
    assert set(sd["state"][0]) == {"func_evals", "n_iter"}
    ours = _ours(copy.deepcopy(m), dict(lr=1.0, tolerance_grad=1e9))
    ours.load_state_dict(sd)
    assert ours.state_dict()["state"] == {0: {"func_evals": 1, "n_iter": 0}}
    fresh = _ours(copy.deepcopy(m), dict(lr=1.0))
    fresh.load_state_dict(torch.optim.LBFGS(m.parameters()).state_dict())
    assert fresh.state_dict()["state"] == {}


def test_torchs_lbfgs_state_dict_malformed_is_refused_nothing_changed():
    m, x, y = _setup(3)
    theirs = torch.optim.LBFGS(m.parameters(), history_size=2, max_iter=3)
    _run(m, theirs, x, y, 3)
    good = theirs.state_dict()
    m1 = copy.deepcopy(m)
    ours = _ours(m1, dict(lr=1.0, history_size=2, max_iter=3))
    _run(m1, ours, x, y, 1)
    before = (_params(m1).clone(), ours.state_dict())

    def bad(change):
        sd = copy.deepcopy(good)
        change(sd["state"][0])
        return sd

    cases = [
        (bad(lambda e: e.update(d=e["d"][:-1])), r"'d' must be a flat real tensor of 39"),
        (bad(lambda e: e["old_dirs"].pop()), r"lists of one length"),
        (bad(lambda e: e.update(n_iter=-1)), r"'n_iter' must be a whole number"),
        (bad(lambda e: e.pop("H_diag")), r"lacks \['H_diag'\]"),
        (bad(lambda e: e.update(foo=1)), r"unknown keys \['foo'\]"),
        ({**good, "state": {1: good["state"][0]}}, r"under the first parameter's id 0"),
    ]
    with pytest.raises(ValueError, match=r"at most history_size 1"):
        _ours(copy.deepcopy(m), dict(lr=1.0)).load_state_dict(
            {**good, "param_groups": [{**good["param_groups"][0], "history_size": 1}]})
    for sd, msg in cases:
        with pytest.raises((ValueError, KeyError), match=msg):
            ours.load_state_dict(sd)
        assert torch.equal(_params(m1), before[0])
        now = ours.state_dict()
        assert now["state"][0]["n_iter"] == before[1]["state"][0]["n_iter"]
        assert torch.equal(now["state"][0]["d"], before[1]["state"][0]["d"])
