"""``opt.param_groups[i][key] = value`` mid-run on a mithril ``torch_optimizer``, side by side
with the same edit on the ``torch.optim`` optimizer: every hyperparameter torch's group holds
(``lr`` as a float and as a 0-d tensor, ``weight_decay``, ``betas``, ``eps``, ``momentum``,
``dampening``, the ``nesterov`` toggle, ``alpha``, ``lr_decay``, ``lambd``/``t0``, ``etas``,
``step_sizes``, ``rho``, ``momentum_decay``, ``decoupled_weight_decay``), float64, the
parameters equal to 1e-12. torch's ``maximize`` and ``decoupled_weight_decay`` on an
optimizer without them, and changes needing other state slots, are refused at the step
(torch.optim runs on, or raises a ``KeyError``), nothing changed; put back, the run goes on
as torch's that never had the edit. Groups: tests/test_interop_torch_param_groups.py."""

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

from mithril.interop import torch_optimizer
from mithril.utils import optimizers as mo

TOL = 1e-12


@pytest.fixture(autouse=True)
def _float64_default():
    with default_dtype(torch.float64):
        yield


def steps(model, opt, n: int, start: int = 0) -> None:
    x, y = data(torch.float64)
    for t in range(start, start + n):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x, t % 3 == 0), y).backward()
        opt.step()


def both(case: str):
    m1 = make_model()
    m2 = copy.deepcopy(m1)
    return m1, ours_for(case, m1), m2, torch_for(case, m2)


#: a 0-d lr tensor in float64 (a float32 one rounds torch's Adam step size ``lr / (1 - β₁ᵗ)``
#: to float32, its dtype: ~2e-8 off the float64 run; ours takes the tensor's value)
EDITS = [
    ("adam", "lr", 0.003), ("adam", "lr", torch.tensor(0.003, dtype=torch.float64)),
    ("adam", "weight_decay", 0.05), ("adam", "betas", (0.5, 0.9)), ("adam", "eps", 1e-3), ("adamw", "weight_decay", 0.3),
    ("amsgrad", "betas", (0.8, 0.95)), ("sgd_momentum", "momentum", 0.5),
    ("sgd_momentum", "dampening", 0.0), ("sgd_nesterov", "nesterov", False),
    ("sgd_wd", "lr", torch.tensor(0.01, dtype=torch.float64)), ("rmsprop", "alpha", 0.5),
    ("rmsprop_centered_momentum", "momentum", 0.2), ("adagrad", "lr_decay", 0.1),
    ("adagrad", "eps", 1e-3), ("asgd", "lambd", 0.01), ("asgd", "t0", 5),
    ("asgd", "alpha", 0.5), ("nadam", "momentum_decay", 0.01), ("nadam", "betas", (0.5, 0.9)),
    ("radam", "betas", (0.7, 0.99)), ("rprop", "etas", (0.3, 1.5)),
    ("rprop", "step_sizes", (1e-5, 1e-3)), ("adadelta", "rho", 0.5),
    ("adamax", "betas", (0.5, 0.9)), ("adamax", "eps", 1e-2),
]


@pytest.mark.parametrize("case, key, value", EDITS,
                         ids=[f"{c}-{k}-{type(v).__name__}" for c, k, v in EDITS])
def test_an_edited_group_value_follows_torch(case, key, value):
    m1, o1, m2, o2 = both(case)
    steps(m1, o1, 4)
    steps(m2, o2, 4)
    for o in (o1, o2):
        o.param_groups[0][key] = value
    steps(m1, o1, 6, start=4)
    steps(m2, o2, 6, start=4)
    err = model_err(m1, m2)
    assert err <= TOL, f"{case}/{key}: {err:.3g}"
    assert o1.state_dict()["param_groups"][0][key] is value  # (as torch's: the object given)


def test_nesterov_toggled_on_and_decoupled_weight_decay_on_nadam_and_radam():
    """SGD's ``nesterov`` switched on (momentum and no dampening: its rule holds) and
    NAdam's / RAdam's own ``decoupled_weight_decay`` switched on with a weight decay."""
    CASES["_sgd_m"] = (mo.SGD, {"learning_rate": 0.05, "momentum": 0.9}, "SGD",
                       {"lr": 0.05, "momentum": 0.9})
    try:
        for case, edits in (("_sgd_m", {"nesterov": True}),
                            ("nadam", {"weight_decay": 0.1, "decoupled_weight_decay": True}),
                            ("radam", {"weight_decay": 0.1, "decoupled_weight_decay": True})):
            m1, o1, m2, o2 = both(case)
            steps(m1, o1, 4)
            steps(m2, o2, 4)
            for o in (o1, o2):
                o.param_groups[0].update(edits)
            steps(m1, o1, 6, start=4)
            steps(m2, o2, 6, start=4)
            assert model_err(m1, m2) <= TOL, case
    finally:
        del CASES["_sgd_m"]


REFUSED = [
    # (case, key, value, the error's text); torch.optim: what it does instead
    ("adam", "maximize", True, "['maximize'] = True: Adam has no 'maximize'"),  # ascends
    ("sgd_momentum", "maximize", True, "SGD has no 'maximize'"),  # ascends
    ("adam_wd", "decoupled_weight_decay", True,  # becomes AdamW
     "['decoupled_weight_decay'] = True: Adam has no 'decoupled_weight_decay'"),
    ("adamw", "decoupled_weight_decay", False,  # becomes Adam
     "['decoupled_weight_decay'] = False: AdamW has no"),
    ("adam", "amsgrad", True, "would then need the state slots ['m', 'v', 'vmax']"),  # KeyError
    ("sgd", "momentum", 0.9, "would then need the state slots ['momentum']"),  # a fresh buffer
    ("sgd_momentum", "momentum", 0.0, "would then need the state slots []"),  # plain SGD
    ("rmsprop_centered_momentum", "centered", False, "but its state has ['grad_avg'"),
    ("sgd_momentum", "nesterov", True, "nesterov=True requires momentum > 0 and dampening = 0"),
]


@pytest.mark.parametrize("case, key, value, msg", REFUSED,
                         ids=[f"{c}-{k}" for c, k, _, _ in REFUSED])
def test_an_edit_ours_cannot_run_is_refused_and_changes_nothing(case, key, value, msg):
    m1, o1, m2, o2 = both(case)
    steps(m1, o1, 4)
    steps(m2, o2, 4)
    old = o1.param_groups[0][key] if key in o1.param_groups[0] else None
    o1.param_groups[0][key] = value
    o1.param_groups[0]["lr"] = 0.5 * o1.param_groups[0]["lr"]  # (refused with it: kept)
    before = ([p.detach().clone() for p in m1.parameters()], str(o1.state_dict()["state"]),
              o1.mithril_optimizer.state_dict(None))
    x, y = data(torch.float64)
    o1.zero_grad()
    torch.nn.functional.mse_loss(m1(x), y).backward()
    with pytest.raises(ValueError) as info:
        o1.step()
    assert msg in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(before[0], m1.parameters()))
    assert str(o1.state_dict()["state"]) == before[1]
    assert o1.mithril_optimizer.state_dict(None) == before[2]
    # put back (the rate too): the run goes on as torch's without the edit
    if old is None:
        del o1.param_groups[0][key]
    else:
        o1.param_groups[0][key] = old
    o1.param_groups[0]["lr"] = o2.param_groups[0]["lr"]
    steps(m1, o1, 5, start=4)
    steps(m2, o2, 5, start=4)
    assert model_err(m1, m2) <= TOL


def test_torchs_flags_at_what_the_optimizer_does_are_taken():
    """``maximize=False`` anywhere and AdamW's ``decoupled_weight_decay=True`` (a torch
    state dict's groups hold them) change nothing; with several groups, a flag in the
    second is named by its index."""
    m1, o1, m2, o2 = both("adamw")
    for o in (o1, o2):
        o.param_groups[0].update(maximize=False, decoupled_weight_decay=True)
    steps(m1, o1, 5)
    steps(m2, o2, 5)
    assert model_err(m1, m2) <= TOL
    m = make_model()
    ps = list(m.named_parameters())
    opt = torch_optimizer(mo.Adam(learning_rate=0.01), [{"params": ps[:3]},
                                                         {"params": ps[3:], "lr": 0.001}])
    steps(m, opt, 2)
    opt.param_groups[1]["maximize"] = True
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['maximize'\] = True"):
        steps(m, opt, 1)


@pytest.mark.parametrize("how", ["replaced", "cut", "appended to", "a group appended"])
def test_a_groups_parameters_changed_by_hand_are_refused(how):
    """torch.optim steps what ``param_groups[i]["params"]`` holds at each step; ours holds
    its parameters in one buffer, taken at construction / ``add_param_group``: a list
    changed by hand is refused at the step (it was silently ignored: every parameter still
    stepped), nothing changed; put back, the run goes on as torch's."""
    m1, o1, m2, o2 = both("adam")
    steps(m1, o1, 2)
    steps(m2, o2, 2)
    group = o1.param_groups[0]
    kept = group["params"]
    if how == "replaced":
        group["params"] = kept[:3]
    elif how == "cut":
        group["params"] = list(kept)
        del group["params"][-1]
    elif how == "appended to":
        group["params"] = [*kept, torch.nn.Parameter(torch.ones(2))]
    else:
        o1.param_groups.append({**group, "params": [torch.nn.Parameter(torch.ones(2))]})
    before = [p.detach().clone() for p in m1.parameters()]
    with pytest.raises(ValueError, match="param_groups changed their parameters .* "
                                         "add_param_group"):
        steps(m1, o1, 1, start=2)
    assert all(torch.equal(a, b) for a, b in zip(before, m1.parameters()))
    group["params"] = kept
    del o1.param_groups[1:]
    steps(m1, o1, 3, start=2)
    steps(m2, o2, 3, start=2)
    assert model_err(m1, m2) <= TOL
