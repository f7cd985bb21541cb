"""A parameter group's ``step_offset``: its parameters joined after that many optimizer
steps and count their own, as torch.optim counts each parameter's steps (a group added by
``add_param_group`` mid-run starts its bias corrections, ``lr_decay``, ASGD's η/μ and SGD's
undampened first step at 1). Side by side with torch.optim: a parameter stepped from the
start, another added after ``N`` steps; ours resumes from a state of ``N`` steps with the
second parameter in a group of ``step_offset=N``. On the fused NumPy engine, the torch
array engine, the eager JAX engine and the two-pass (ASGD) path (the traced JAX program and
Lookahead: their own test files); an offset the state has not reached is refused before
anything changes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
from mithril.utils import optimizers as O

N, M = 5, 6  # steps before the second parameter joins, steps after
BACKENDS = {"numpy": NumpyBackend, "torch": TorchBackend, "jax": JaxBackend}

CASES = {  # ours, torch's (lr 0.1 both)
    "adam": (O.Adam, {}, torch.optim.Adam, {}),
    "adamw_amsgrad": (O.AdamW, {"amsgrad": True}, torch.optim.AdamW, {"amsgrad": True}),
    "nadam": (O.NAdam, {}, torch.optim.NAdam, {}),
    "radam": (O.RAdam, {}, torch.optim.RAdam, {}),
    "adamax": (O.Adamax, {}, torch.optim.Adamax, {}),
    "adagrad_lr_decay": (O.AdaGrad, {"lr_decay": 0.1}, torch.optim.Adagrad, {"lr_decay": 0.1}),
    "sgd_dampening": (O.SGD, {"momentum": 0.9, "dampening": 0.3}, torch.optim.SGD,
                      {"momentum": 0.9, "dampening": 0.3}),
    "asgd": (O.ASGD, {"t0": 3}, torch.optim.ASGD, {"t0": 3}),
}
#: torch keeps NAdam's μ product, Adagrad's and ASGD's step scalars in float32 tensors
TOL = {"nadam": 1e-7, "adagrad_lr_decay": 1e-5, "asgd": 1e-7}


def _data():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 4)), rng.standard_normal(5)
    ga = [rng.standard_normal((3, 4)) for _ in range(N + M)]
    gb = [rng.standard_normal(5) for _ in range(N + M)]
    return a, b, ga, gb


def _torch(cls, kw):
    a, b, ga, gb = _data()
    ta = torch.tensor(a, requires_grad=True)
    tb = torch.tensor(b, requires_grad=True)
    opt = cls([ta], lr=0.1, **kw)
    for i in range(N + M):
        if i == N:
            opt.add_param_group({"params": [tb]})
        ta.grad = torch.tensor(ga[i])
        tb.grad = torch.tensor(gb[i]) if i >= N else None
        opt.step()
    return ta.detach().numpy(), tb.detach().numpy()


def _joined_state(make, backend, offset=N):
    """(optimizer with b in a group of ``offset``, params, state after N steps of a alone)."""
    a, b, ga, _ = _data()
    be = BACKENDS[backend](dtype="float64")
    first = make(None)
    p = {"a": be.array(a)}
    st = first.init(p)
    for i in range(N):
        p, st = first.update(p, {"a": be.array(ga[i])}, st)
    before = first.state_dict(st)
    opt = make([{"params": ["b"], "step_offset": offset}])
    params = {"a": p["a"], "b": be.array(b)}
    fresh = opt.state_dict(opt.init(params))
    merged = {**fresh, "step": before["step"],
              "slots": {k: {"a": before["slots"][k]["a"], "b": fresh["slots"][k]["b"]}
                        for k in fresh["slots"]}}
    return opt, params, opt.load_state_dict(merged, params), be


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_joined_group_counts_its_own_steps_as_torch(case, backend):
    ours, okw, theirs, tkw = CASES[case]
    ref_a, ref_b = _torch(theirs, tkw)
    _, _, ga, gb = _data()

    def make(groups):
        return ours(learning_rate=0.1, **okw, **({} if groups is None else
                                                 {"param_groups": groups}))

    opt, p, st, be = _joined_state(make, backend)
    assert opt.param_groups[0]["step_offset"] == N
    for i in range(N, N + M):
        p, st = opt.update(p, {"a": be.array(ga[i]), "b": be.array(gb[i])}, st)
    tol = TOL.get(case, 1e-12)
    np.testing.assert_allclose(np.asarray(be.to_numpy(p["a"])), ref_a, rtol=0, atol=tol)
    np.testing.assert_allclose(np.asarray(be.to_numpy(p["b"])), ref_b, rtol=0, atol=tol)
    # without the offset the joined parameter's first steps are torch's times ~3 (Adam)
    if case == "adam":
        plain, p2, st2, be2 = _joined_state(make, backend, offset=0)
        for i in range(N, N + M):
            p2, st2 = plain.update(p2, {"a": be2.array(ga[i]), "b": be2.array(gb[i])}, st2)
        assert np.abs(np.asarray(be2.to_numpy(p2["b"])) - ref_b).max() > 1e-2


def test_state_dict_keeps_the_offset():
    make = lambda g: O.Adam(learning_rate=0.1, **({} if g is None else {"param_groups": g}))  # noqa: E731
    opt, p, st, _ = _joined_state(make, "numpy")
    d = opt.state_dict(st)
    assert d["hyperparameters"]["param_groups"][0]["step_offset"] == N
    again = O.Adam(learning_rate=0.1)
    st2 = again.load_state_dict(d, p)
    assert again.param_groups[0]["step_offset"] == N and st2.step == N


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_bad_offset_is_refused_by_name(bad):
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['step_offset'\]"):
        O.Adam(param_groups=[{"params": ["b"], "step_offset": bad}])


def test_offset_the_state_has_not_reached_is_refused_and_changes_nothing():
    opt = O.Adam(learning_rate=0.1, param_groups=[{"params": ["b"], "step_offset": 3}])
    p = {"a": np.ones(2), "b": np.ones(3)}
    st = opt.init(p)
    before = {k: v.copy() for k, v in p.items()}
    with pytest.raises(ValueError, match="step_offset 3 is not below the step count 1"):
        opt.update(p, {"a": np.ones(2), "b": np.ones(3)}, st)
    assert st.step == 0 and all(np.array_equal(p[k], before[k]) for k in p)
    assert not st.slots["m"].any()


def test_a_state_dict_below_its_offset_is_refused_and_changes_nothing():
    """A saved state whose step has not reached a group's offset could never step: refused
    at the load, naming the group, and the optimizer keeps its hyperparameters."""
    make = lambda g: O.Adam(learning_rate=0.1, **({} if g is None else {"param_groups": g}))  # noqa: E731
    opt, p, st, _ = _joined_state(make, "numpy")
    d = opt.state_dict(st)
    d["step"] = N - 1
    again = O.Adam(learning_rate=0.2)
    with pytest.raises(ValueError, match=rf"param_groups\[0\]\['step_offset'\] = {N} is "
                                         rf"beyond its step count {N - 1}"):
        again.load_state_dict(d, p)
    assert again.learning_rate == 0.2 and not again.param_groups
