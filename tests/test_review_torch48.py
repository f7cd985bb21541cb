"""The torch.optim drop-in's last gaps, side by side with ``torch.optim`` in float64 (complex64
in float32): several groups' ``lr`` under a Mithril scheduler of ``opt.mithril_optimizer``
(shown live, resumed both ways), ``opt.state[p]["step"]`` live and written in place,
complex parameters for every optimizer torch takes them in; then a torch user's review
(SWALR, ReduceLROnPlateau with a ``min_lr`` list, ``add_param_group`` after a load, frozen
parameters unfrozen, GradScaler with ``clip_grad_norm_(foreach=True)`` and a group added)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from test_interop_torch_optimizer import default_dtype
from test_review_torch47 import assert_unchanged, err, groups_of, loss_of, nets, snapshot, step
from torch.optim import lr_scheduler as L
from torch.optim import swa_utils

import mithril.utils.lr_schedulers as M
from mithril.interop import torch_optimizer
from mithril.utils import optimizers as mo

TOL = 1e-12


@pytest.fixture(autouse=True)
def _float64_default():
    # (torch keeps its step counts and NAdam's mu_product in the default dtype)
    with default_dtype(torch.float64):
        yield


def rates(opt: torch.optim.Optimizer) -> list[float]:
    return [float(g["lr"]) for g in opt.param_groups]


# -- 1. several groups and a Mithril scheduler --------------------------------------------------


@pytest.mark.parametrize("per_group", [False, True])
def test_groups_show_a_mithril_scheduler_s_rates_and_resume_both_ways(per_group):
    """Found: with torch's groups, ``StepLR(opt.mithril_optimizer, 2, 0.5)`` trained right but
    ``param_groups[i]['lr']`` kept the constructor's rates (0.01, 0.003 where torch's
    showed 0.000625, 0.0001875 after 8 steps); showing them had broken the resume (the
    factor applied twice). Now each group's ``lr`` is the rate its next step uses, read
    right after the scheduler's step, and a saved run resumes here (with the scheduler's
    state) and in ``torch.optim`` (its ``lr`` as they are)."""
    a, b = nets()
    theirs = torch.optim.Adam(groups_of(a), lr=1e-2)
    ours = torch_optimizer(mo.Adam(learning_rate=1e-2), groups_of(b))
    sa = L.StepLR(theirs, 2, 0.5)
    sb = M.StepLR(ours.mithril_optimizer, 2, 0.5, per_group=per_group)
    for t in range(10):
        if t == 5:  # resumed here: a new wrapper and scheduler, both state dicts loaded
            saved = ours.state_dict(), sb.state_dict()
            assert [g["lr"] for g in saved[0]["param_groups"]] == rates(theirs)
            ours = torch_optimizer(mo.Adam(learning_rate=1e-2), groups_of(b))
            sb = M.StepLR(ours.mithril_optimizer, 2, 0.5, per_group=per_group)
            ours.load_state_dict(saved[0])
            sb.load_state_dict(saved[1])
            assert rates(ours) == rates(theirs)
        for net, opt, sched in ((a, theirs, sa), (b, ours, sb)):
            step(net, opt)
            sched.step()
        assert err(a, b) < TOL, t
        assert rates(ours) == pytest.approx(rates(theirs), rel=1e-15, abs=0), t
    # the other way: torch.optim loads ours and goes on under torch's StepLR
    c = copy.deepcopy(b)
    into = torch.optim.Adam(groups_of(c), lr=1.0)
    into.load_state_dict(ours.state_dict())
    assert rates(into) == pytest.approx(rates(theirs), rel=1e-15, abs=0)
    sc = L.StepLR(into, 2, 0.5)
    sc.last_epoch = sa.last_epoch  # (StepLR is recursive: it goes on from the group's lr)
    for _ in range(4):
        for net, opt, sched in ((a, theirs, sa), (c, into, sc)):
            step(net, opt)
            sched.step()
        assert err(a, c) < TOL
    # and back here (its first group keeps our entry, its rates moved on): torch's rates
    back = torch_optimizer(mo.Adam(learning_rate=1e-2), groups_of(c))
    back.load_state_dict(into.state_dict())
    assert rates(back) == rates(into) == rates(theirs)
    sc = L.StepLR(back, 2, 0.5)
    sc.last_epoch = sa.last_epoch
    for _ in range(3):
        for net, opt, sched in ((a, theirs, sa), (c, back, sc)):
            step(net, opt)
            sched.step()
        assert err(a, c) < TOL
        assert rates(back) == pytest.approx(rates(theirs), rel=1e-15, abs=0)
    # a rate written into a group still wins over the scheduler's, for that group only
    first = rates(ours)[0]
    ours.param_groups[1]["lr"] = 1e-3
    step(b, ours)
    assert ours.mithril_optimizer.get_learning_rate(1) == pytest.approx(1e-3, rel=1e-15)
    assert rates(ours) == [first, 1e-3]


def test_an_empty_group_and_tensor_rates_follow_a_mithril_scheduler_as_torch_s():
    """An empty group (torch takes one; the mithril optimizer leaves it out) shows the
    rate torch's scheduler gives it, and groups holding their ``lr`` as tensors are
    written in place, as torch's schedulers write them."""
    def groups(net: torch.nn.Module) -> list[dict]:
        return [{"params": list(net[0].parameters()), "lr": torch.tensor(1e-2)},
                {"params": [], "lr": 0.3},
                {"params": list(net[2].parameters()), "lr": torch.tensor(3e-3)}]
    a, b = nets()
    theirs = torch.optim.Adam(groups(a), lr=1e-2)
    ours = torch_optimizer(mo.Adam(learning_rate=1e-2), groups(b))
    held = ours.param_groups[0]["lr"]
    sa, sb = L.StepLR(theirs, 2, 0.3), M.StepLR(ours.mithril_optimizer, 2, 0.3)
    for _ in range(7):
        for net, opt, sched in ((a, theirs, sa), (b, ours, sb)):
            step(net, opt)
            sched.step()
        assert err(a, b) < TOL
        assert rates(ours) == pytest.approx(rates(theirs), rel=1e-14, abs=0)
    assert held is ours.param_groups[0]["lr"] and held.item() == pytest.approx(1e-2 * 0.3 ** 3)


def test_a_torch_state_dict_resumes_into_groups_driven_by_a_mithril_scheduler():
    """A run switched over from ``torch.optim`` (its groups' rates halved by its StepLR)
    resumes here at those rates, and a Mithril scheduler made then drives them on."""
    a, b = nets()
    theirs = torch.optim.Adam(groups_of(a), lr=1e-2)
    sa = L.StepLR(theirs, 2, 0.5)
    for _ in range(5):
        step(a, theirs)
        sa.step()
    b.load_state_dict(a.state_dict())
    ours = torch_optimizer(mo.Adam(learning_rate=1e-2), groups_of(b))
    ours.load_state_dict(theirs.state_dict())
    assert rates(ours) == rates(theirs)
    sb = M.StepLR(ours.mithril_optimizer, 2, 0.5)
    for t in range(6):
        for net, opt, sched in ((a, theirs, sa), (b, ours, sb)):
            step(net, opt)
            sched.step() if sched is sb or t % 2 == 0 else None
    # torch's StepLR halves at its epochs 6, 8, 10 (every other step here from epoch 5),
    # the Mithril one at its 2, 4, 6: both have halved three times
    assert rates(ours) == pytest.approx([r * 0.125 for r in (0.0025, 0.00075)], rel=1e-15)


# -- 2. opt.state[p]["step"] --------------------------------------------------------------------


def test_step_reads_live_and_takes_in_place_writes_as_torch():
    """Found: ``opt.state[p]['step']`` was a copy made at the read (a tensor held across a
    step stayed at 3 where torch's shows 4), and ``.zero_()`` on it (restarting a
    parameter's bias corrections, as torch users do) was silently ignored: 1.1e-2 from
    torch's parameters 3 steps later. Now it is a live view, and a write in place is the
    parameter's own count from the next step on."""
    a, b = nets()
    theirs = torch.optim.Adam(a.parameters(), lr=1e-2)
    ours = torch_optimizer(mo.Adam(learning_rate=1e-2), b.parameters())
    for _ in range(3):
        step(a, theirs)
        step(b, ours)
    held = ours.state[b[0].weight]["step"], theirs.state[a[0].weight]["step"]
    assert held[0].dtype == held[1].dtype and held[0].dim() == 0
    step(a, theirs)
    step(b, ours)
    assert held[0].item() == held[1].item() == 4.0
    for opt, net in ((theirs, a), (ours, b)):
        opt.state[net[0].weight]["step"].zero_()
        opt.state[net[2].bias]["step"].fill_(2)
        opt.state[net[0].bias]["step"] -= 1  # (in place, then set back: taken)
    for _ in range(3):
        step(a, theirs)
        step(b, ours)
        assert err(a, b) < TOL
        assert [v["step"].item() for v in ours.state.values()] == [
            v["step"].item() for v in theirs.state.values()]
    assert [s["step"].item() for s in ours.state_dict()["state"].values()] == [3, 6, 7, 5]


@pytest.mark.parametrize("name", ["Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop",
                                  "Adagrad", "Adadelta", "ASGD", "Rprop"])
def test_a_step_written_mid_run_gives_torch_s_numbers_for_every_optimizer(name):
    """Each optimizer reads the written count as torch's reads its ``step`` (bias
    corrections, NAdam's μ, RAdam's rectification, Adagrad's ``lr_decay``, ASGD's η/μ)."""
    theirs_of, ours_of = COMPLEX[name]
    a, b = nets()
    theirs, ours = theirs_of(a.parameters()), torch_optimizer(ours_of(), b.parameters())
    for _ in range(4):
        step(a, theirs)
        step(b, ours)
    for opt, net in ((theirs, a), (ours, b)):
        opt.state[net[0].weight]["step"].fill_(1)
    for _ in range(3):
        step(a, theirs)
        step(b, ours)
        assert err(a, b) < TOL


@pytest.mark.parametrize("value", [100.0, -1.0, 2.5, float("nan")])
def test_a_step_written_out_of_range_is_refused_undone_nothing_changed(value):
    net, _ = nets()
    opt = torch_optimizer(mo.Adam(learning_rate=1e-2), net.parameters())
    for _ in range(3):
        step(net, opt)
    opt.zero_grad()
    loss_of(net).backward()
    before = snapshot(net, opt)
    opt.state[net[2].bias]["step"].fill_(value)
    with pytest.raises(ValueError, match=r"'param3' written as .*refused, undone.*0 to 3"):
        opt.step()
    assert opt.state[net[2].bias]["step"].item() == 3.0
    assert_unchanged(before, snapshot(net, opt))


def test_a_slot_scaled_in_place_with_an_operator_is_taken_not_refused_after_the_write():
    """Found: ``opt.state[p]['exp_avg'] *= 0.5`` scaled the moment in place, then raised
    (Python sets the result back): a call that failed had changed the state. Setting an
    entry back to itself is taken; replacing it still raises, naming the way that works."""
    a, b = nets()
    theirs = torch.optim.Adam(a.parameters(), lr=1e-2)
    ours = torch_optimizer(mo.Adam(learning_rate=1e-2), b.parameters())
    for _ in range(2):
        step(a, theirs)
        step(b, ours)
    for opt, net in ((theirs, a), (ours, b)):
        opt.state[net[0].weight]["exp_avg"] *= 0.5
    step(a, theirs)
    step(b, ours)
    assert err(a, b) < TOL
    before = snapshot(b, ours)
    with pytest.raises(TypeError, match=r"opt.state\[p\]\[key\] = value.*'step'\]\.zero_\(\)"):
        ours.state[b[0].weight]["step"] = torch.tensor(0.0)
    assert_unchanged(before, snapshot(b, ours))


# -- 3. complex parameters ---------------------------------------------------------------------

COMPLEX = {
    "SGD": (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True,
                                      weight_decay=1e-2),
            lambda: mo.SGD(learning_rate=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    "Adam": (lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True, weight_decay=1e-2),
             lambda: mo.Adam(learning_rate=1e-2, amsgrad=True, weight_decay=1e-2)),
    "AdamW": (lambda p: torch.optim.AdamW(p, lr=1e-2), lambda: mo.AdamW(learning_rate=1e-2)),
    "Adamax": (lambda p: torch.optim.Adamax(p, lr=1e-2), lambda: mo.Adamax(learning_rate=1e-2)),
    "NAdam": (lambda p: torch.optim.NAdam(p, lr=1e-2), lambda: mo.NAdam(learning_rate=1e-2)),
    "RAdam": (lambda p: torch.optim.RAdam(p, lr=1e-2), lambda: mo.RAdam(learning_rate=1e-2)),
    "RMSprop": (lambda p: torch.optim.RMSprop(p, lr=1e-2, centered=True, momentum=0.5),
                lambda: mo.RMSProp(learning_rate=1e-2, decay=0.99, centered=True,
                                   momentum=0.5)),
    "Adagrad": (lambda p: torch.optim.Adagrad(p, lr=1e-2, initial_accumulator_value=0.1,
                                              lr_decay=0.01),
                lambda: mo.AdaGrad(learning_rate=1e-2, initial_accumulator_value=0.1,
                                   lr_decay=0.01, epsilon=1e-10)),
    "Adadelta": (lambda p: torch.optim.Adadelta(p, lr=1.0),
                 lambda: mo.Adadelta(learning_rate=1.0)),
    "ASGD": (lambda p: torch.optim.ASGD(p, lr=1e-2, t0=2), lambda: mo.ASGD(learning_rate=1e-2,
                                                                           t0=2)),
    "Rprop": (lambda p: torch.optim.Rprop(p, lr=1e-2), lambda: mo.Rprop(learning_rate=1e-2)),
}


def complex_problem(dtype: torch.dtype) -> tuple[list, list, callable]:
    """A complex weight and a real bias (torch mixes them: complex64 with float32), twice."""
    g = torch.Generator().manual_seed(0)
    cdtype = torch.complex64 if dtype == torch.float32 else torch.complex128
    w = torch.randn(3, 4, dtype=cdtype, generator=g)
    b = torch.randn(3, dtype=dtype, generator=g)
    x = torch.randn(8, 4, dtype=cdtype, generator=g)
    y = torch.randn(8, 3, dtype=cdtype, generator=g)

    def loss(p: list) -> torch.Tensor:
        return ((x @ p[0].T + p[1] - y).abs() ** 2).mean()

    def params() -> list:
        return [torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())]
    return params(), params(), loss


def cstep(p: list, opt: torch.optim.Optimizer, loss) -> None:
    opt.zero_grad()
    loss(p).backward()
    opt.step()


def shapes(entry: dict) -> dict:
    return {k: (v.dtype, tuple(v.shape)) for k, v in entry.items() if k != "step"}


@pytest.mark.parametrize("dtype, tol", [(torch.float64, TOL), (torch.float32, 1e-6)])
@pytest.mark.parametrize("name", list(COMPLEX))
def test_complex_parameters_as_torch_optim(name, dtype, tol):
    """Found: complex parameters were refused (torch's optimizers take them, as
    ``torch.view_as_real``). Now each is optimized as its real view: torch's numbers, its
    state dict entries (complex slots of the parameter's shape), ``opt.state[p]`` live
    complex views, and state dicts taken both ways mid-run."""
    theirs_of, ours_of = COMPLEX[name]
    pa, pb, loss = complex_problem(dtype)
    theirs, ours = theirs_of(pa), torch_optimizer(ours_of(), pb)
    for t in range(8):
        if t == 4:  # each loads the other's state dict
            into_theirs, into_ours = theirs_of(pa), torch_optimizer(ours_of(), pb)
            into_ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
            into_theirs.load_state_dict(copy.deepcopy(ours.state_dict()))
            theirs, ours = into_theirs, into_ours
        cstep(pa, theirs, loss)
        cstep(pb, ours, loss)
        assert pb[0].dtype == pa[0].dtype and pb[1].dtype == dtype
        assert max((x - y).abs().max().item() for x, y in zip(pa, pb)) < tol, t
    for i in (0, 1):
        assert shapes(ours.state_dict()["state"][i]) == shapes(theirs.state_dict()["state"][i])
        assert shapes(ours.state[pb[i]]) == shapes(theirs.state[pa[i]])
    slot = next(k for k, v in ours.state[pb[0]].items() if v.shape == pb[0].shape)
    ours.state[pb[0]][slot].zero_()  # a live view: the optimizer's own buffer
    assert not ours.state_dict()["state"][0][slot].any()


@pytest.mark.parametrize("line_search", [None, "strong_wolfe"])
def test_complex_parameters_with_lbfgs_as_torch_optim(line_search):
    pa, pb, loss = complex_problem(torch.float64)
    theirs = torch.optim.LBFGS(pa, lr=0.5, line_search_fn=line_search)
    ours = torch_optimizer(mo.LBFGS(learning_rate=0.5, line_search_fn=line_search), pb)
    for _ in range(4):
        for p, opt in ((pa, theirs), (pb, ours)):
            def closure(p=p, opt=opt):
                opt.zero_grad()
                value = loss(p)
                value.backward()
                return value
            opt.step(closure)
        assert max((x - y).abs().max().item() for x, y in zip(pa, pb)) < TOL


def test_complex_parameters_added_later_with_clipping_as_torch():
    """A complex group added mid-run (its state fresh, counted from the add) with
    ``clip_grad_norm_(foreach=True)`` and a Mithril scheduler: as torch's. (torch's
    GradScaler cannot unscale complex gradients on CPU: its own NotImplementedError.)"""
    pa, pb, loss = complex_problem(torch.float64)
    theirs = torch.optim.Adam(pa[1:], lr=1e-2)
    ours = torch_optimizer(mo.Adam(learning_rate=1e-2), pb[1:])
    for t in range(8):
        if t == 3:
            theirs.add_param_group({"params": pa[:1], "lr": 5e-3})
            ours.add_param_group({"params": pb[:1], "lr": 5e-3})
            sa, sb = L.StepLR(theirs, 2, 0.5), M.StepLR(ours.mithril_optimizer, 2, 0.5)
        for p, opt in ((pa, theirs), (pb, ours)):
            opt.zero_grad()
            loss(p).backward()
            torch.nn.utils.clip_grad_norm_(p, 0.5, foreach=True)
            opt.step()
        if t >= 3:
            sa.step()
            sb.step()
            assert rates(ours) == pytest.approx(rates(theirs), rel=1e-15)
        assert max((x - y).abs().max().item() for x, y in zip(pa, pb)) < TOL, t
    assert ours.state[pb[0]]["step"].item() == theirs.state[pa[0]]["step"].item() == 5


@pytest.mark.parametrize("make", [lambda: mo.Muon(), lambda: mo.Adafactor()],
                         ids=["Muon", "Adafactor"])
def test_muon_and_adafactor_refuse_complex_parameters_by_name_as_torch(make):
    z = torch.nn.Parameter(torch.randn(3, 4, dtype=torch.complex128))
    z.grad = torch.ones_like(z)
    with pytest.raises(RuntimeError, match="complex"):  # torch's, at its step
        (torch.optim.Muon if "Muon" in type(make()).__name__ else torch.optim.Adafactor)(
            [z]).step()
    with pytest.raises(TypeError, match=r"does not take complex parameters \(\['z'\]\)"):
        torch_optimizer(make(), [("z", z)])
    real = torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
    opt = torch_optimizer(make(), [("w", real)])
    with pytest.raises(TypeError, match=r"complex parameters \(\['z'\]\)"):
        opt.add_param_group({"params": [("z", z)]})
    assert len(opt.param_groups) == 1


# -- 4. a torch user's review --------------------------------------------------------------------


def test_swalr_and_averaged_model_on_the_drop_in_as_torch():
    a, b = nets()
    theirs = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    ours = torch_optimizer(mo.SGD(learning_rate=0.1, momentum=0.9), b.parameters())
    sa, sb = (swa_utils.SWALR(o, swa_lr=0.05, anneal_epochs=3, anneal_strategy="cos")
              for o in (theirs, ours))
    ma, mb = swa_utils.AveragedModel(a), swa_utils.AveragedModel(b)
    for _ in range(8):
        for net, opt, sched, avg in ((a, theirs, sa, ma), (b, ours, sb, mb)):
            step(net, opt)
            sched.step()
            avg.update_parameters(net)
        assert err(a, b) < TOL
        assert rates(ours) == rates(theirs)
    assert err(ma.module, mb.module) < TOL


def test_plateau_min_lr_list_add_after_load_and_unfrozen_parameters_as_torch():
    a, b = nets()
    theirs = torch.optim.Adam(groups_of(a), lr=1e-2)
    ours = torch_optimizer(mo.Adam(learning_rate=1e-2), groups_of(b))
    sa, sb = (L.ReduceLROnPlateau(o, patience=0, factor=0.1, min_lr=[1e-3, 2e-4])
              for o in (theirs, ours))
    for _ in range(5):
        for net, opt, sched in ((a, theirs, sa), (b, ours, sb)):
            step(net, opt)
            sched.step(1.0)
        assert err(a, b) < TOL and rates(ours) == rates(theirs)
    assert rates(ours) == [1e-3, 2e-4]
    # a frozen layer: no state until unfrozen, then counted from there (as torch's), and a
    # group added after a load
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    a = a.double()
    b = copy.deepcopy(a)
    for net in (a, b):
        net[2].bias.requires_grad_(False)
    theirs = torch.optim.Adam(a[2].parameters(), lr=1e-2)
    ours = torch_optimizer(mo.Adam(learning_rate=1e-2), b[2].parameters())
    for _ in range(3):
        step(a, theirs)
        step(b, ours)
    ours2 = torch_optimizer(mo.Adam(learning_rate=1e-2), b[2].parameters())
    ours2.load_state_dict(ours.state_dict())
    for net, opt in ((a, theirs), (b, ours2)):
        opt.add_param_group({"params": net[0].parameters(), "lr": 5e-3})
        net[2].bias.requires_grad_(True)
    for _ in range(3):
        step(a, theirs)
        step(b, ours2)
        assert err(a, b) < TOL
    assert [s["step"].item() for s in ours2.state_dict()["state"].values()] == [
        s["step"].item() for s in theirs.state_dict()["state"].values()] == [6, 3, 3, 3]


def test_a_real_slot_for_a_complex_parameter_is_refused_saying_so_nothing_changed():
    pa, pb, loss = complex_problem(torch.float64)
    ours = torch_optimizer(mo.Adam(learning_rate=1e-2), pb)
    for _ in range(2):
        cstep(pb, ours, loss)
    saved = ours.state_dict()
    bad = copy.deepcopy(saved)
    bad["state"][0]["exp_avg"] = bad["state"][0]["exp_avg"].real.clone()
    before = [p.detach().clone() for p in pb], ours.state_dict()
    with pytest.raises(ValueError, match=r"refused \(nothing changed\).*'m' of 'param0'.*"
                                         r"complex tensors of its shape"):
        ours.load_state_dict(bad)
    assert all(torch.equal(p, q) for p, q in zip(before[0], pb))
    after = ours.state_dict()["state"]
    assert all(torch.equal(v, after[i][k]) for i, e in before[1]["state"].items()
               for k, v in e.items())


def test_grad_scaler_clip_foreach_and_a_group_added_mid_run_as_torch():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    a = a.double()
    b = copy.deepcopy(a)
    theirs = torch.optim.AdamW(a[2].parameters(), lr=1e-2)
    ours = torch_optimizer(mo.AdamW(learning_rate=1e-2), b[2].parameters())
    scalers = [torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=2) for _ in "ab"]
    for t in range(10):
        if t == 4:
            theirs.add_param_group({"params": a[0].parameters()})
            ours.add_param_group({"params": b[0].parameters()})
        for net, opt, scaler in ((a, theirs, scalers[0]), (b, ours, scalers[1])):
            opt.zero_grad()
            scaler.scale(loss_of(net) * (float("inf") if t == 6 else 1.0)).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(net.parameters(), 0.5, foreach=True)
            scaler.step(opt)
            scaler.update()
        assert err(a, b) < TOL, t
        assert scalers[0].get_scale() == scalers[1].get_scale()
    assert [s["step"].item() for s in ours.state_dict()["state"].values()] == [
        s["step"].item() for s in theirs.state_dict()["state"].values()]


@pytest.mark.parametrize("kind", ["Adam", "Adagrad"])
def test_steps_loads_and_adds_under_inference_mode_as_torch(kind):
    """Found: ``opt.step()`` under ``torch.inference_mode()`` (some loops wrap their
    optimizer step so) made the flat buffer there: the parameters became inference
    tensors and got no gradient from then on (2.0e-2 from torch.optim after 3 steps,
    silently). Buffers are now made as normal tensors, also by a load or an add there."""
    make = {"Adam": (lambda p: torch.optim.Adam(p, lr=1e-2),
                     lambda: mo.Adam(learning_rate=1e-2)),
            "Adagrad": (lambda p: torch.optim.Adagrad(p, lr=1e-2),
                        lambda: mo.AdaGrad(learning_rate=1e-2, epsilon=1e-10))}[kind]
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    a = a.double()
    b = copy.deepcopy(a)
    theirs = make[0](a[2].parameters())
    with torch.inference_mode():
        ours = torch_optimizer(make[1](), b[2].parameters())
    for t in range(6):
        for net, opt in ((a, theirs), (b, ours)):
            opt.zero_grad()
            loss_of(net).backward()
            with torch.inference_mode():
                if t == 2:
                    opt.add_param_group({"params": net[0].parameters()})
                if t == 4 and opt is ours:
                    ours = torch_optimizer(make[1](), [{"params": b[2].parameters()},
                                                       {"params": b[0].parameters()}])
                    ours.load_state_dict(opt.state_dict())
                    opt = ours
                opt.step()
        assert err(a, b) < TOL, t
        assert not any(p.is_inference() for p in b.parameters())


def test_a_model_mixing_complex_and_real_parameters_saves_with_torch_save():
    """Found: complex and real parameters of one precision shared the flat buffer, which
    ``torch.save`` refuses ("Cannot save multiple tensors or storages that view the same
    data as different types"): ``torch.save(model.state_dict())`` failed after the first
    step. Complex parameters beside real ones now keep their own memory (copied in and
    out); all-complex ones still lie in the buffer (no copy)."""
    pa, pb, loss = complex_problem(torch.float32)
    theirs = torch.optim.Adam(pa, lr=1e-2)
    ours = torch_optimizer(mo.Adam(learning_rate=1e-2), pb)
    for _ in range(3):
        cstep(pa, theirs, loss)
        cstep(pb, ours, loss)
    buffer = io.BytesIO()
    torch.save({"w": pb[0], "b": pb[1], "opt": ours.state_dict()}, buffer)
    buffer.seek(0)
    back = torch.load(buffer, weights_only=True)
    assert torch.equal(back["w"], pb[0].detach()) and back["w"].dtype == torch.complex64
    assert max((x - y).abs().max().item() for x, y in zip(pa, pb)) < 1e-6
    # all complex: the parameters lie in one buffer (one storage, as the real ones do)
    zs = [torch.nn.Parameter(torch.randn(3, dtype=torch.complex64)) for _ in range(2)]
    opt = torch_optimizer(mo.Adam(learning_rate=1e-2), zs)
    for z in zs:
        z.grad = torch.ones_like(z)
    opt.step()
    assert zs[0].untyped_storage().data_ptr() == zs[1].untyped_storage().data_ptr()


def test_a_step_held_before_an_add_param_group_stays_live():
    a, b = nets()
    theirs = torch.optim.SGD(a[2].parameters(), lr=0.05, momentum=0.9)
    ours = torch_optimizer(mo.SGD(learning_rate=0.05, momentum=0.9), b[2].parameters())
    step(a, theirs)
    step(b, ours)
    held = ours.state[b[2].weight]["step"]
    ours.add_param_group({"params": b[0].parameters(), "lr": 0.01})
    theirs.add_param_group({"params": a[0].parameters(), "lr": 0.01})
    for _ in range(2):
        step(a, theirs)
        step(b, ours)
        assert err(a, b) < TOL
    assert held.item() == 3.0 and ours.state[b[0].weight]["step"].item() == 2.0
