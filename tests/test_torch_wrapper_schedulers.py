"""Every ``torch.optim.lr_scheduler`` class (and ``swa_utils.SWALR``) driving a mithril
``torch_optimizer``, side by side with the same scheduler driving the ``torch.optim``
optimizer: float64, the parameters equal to 1e-12 (:func:`rel_err`), the scheduler's
``get_last_lr()`` and the group's ``lr`` / ``betas`` / ``momentum`` equal at every step.
``CyclicLR`` / ``OneCycleLR`` with ``cycle_momentum=True`` edit Adam's ``betas`` and SGD's
``momentum``; ``ReduceLROnPlateau`` reads a loss; a scheduler's ``state_dict`` resumed on a
new optimizer (ours and torch's) continues as the unbroken run. Groups and the other basics
(StepLR, CosineAnnealingLR, LambdaLR, OneCycleLR): tests/test_interop_torch_optimizer.py."""

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
from torch.optim import lr_scheduler as ls
from torch.optim.swa_utils import SWALR, AveragedModel

TOL = 1e-12
STEPS = 30


@pytest.fixture(autouse=True)
def _float64_default():
    with default_dtype(torch.float64):
        yield


SCHEDULERS = {
    "MultiplicativeLR": lambda o: ls.MultiplicativeLR(o, lambda t: 0.97),
    "MultiStepLR": lambda o: ls.MultiStepLR(o, milestones=[5, 12, 20], gamma=0.3),
    "ConstantLR": lambda o: ls.ConstantLR(o, factor=0.25, total_iters=7),
    "LinearLR": lambda o: ls.LinearLR(o, start_factor=0.1, end_factor=1.0, total_iters=10),
    "ExponentialLR": lambda o: ls.ExponentialLR(o, gamma=0.93),
    "PolynomialLR": lambda o: ls.PolynomialLR(o, total_iters=25, power=2.0),
    "CosineAnnealingWarmRestarts": lambda o: ls.CosineAnnealingWarmRestarts(
        o, T_0=6, T_mult=2, eta_min=1e-4),
    "SequentialLR": lambda o: ls.SequentialLR(o, [
        ls.LinearLR(o, start_factor=0.2, total_iters=5),
        ls.CosineAnnealingLR(o, T_max=20, eta_min=1e-4)], milestones=[5]),
    "ChainedScheduler": lambda o: ls.ChainedScheduler([
        ls.ExponentialLR(o, gamma=0.95), ls.StepLR(o, step_size=4, gamma=0.5)]),
    "CyclicLR": lambda o: ls.CyclicLR(o, base_lr=1e-3, max_lr=0.03, step_size_up=4,
                                      mode="exp_range", gamma=0.97, cycle_momentum=False),
    "CyclicLR_momentum": lambda o: ls.CyclicLR(o, base_lr=1e-3, max_lr=0.03, step_size_up=4,
                                               base_momentum=0.7, max_momentum=0.95),
    "OneCycleLR_momentum": lambda o: ls.OneCycleLR(o, max_lr=0.05, total_steps=STEPS,
                                                  three_phase=True, anneal_strategy="linear"),
    "SWALR": lambda o: SWALR(o, swa_lr=0.002, anneal_epochs=6, anneal_strategy="cos"),
    "ReduceLROnPlateau": lambda o: ls.ReduceLROnPlateau(o, factor=0.5, patience=1,
                                                        threshold=0.05),
}
#: SGD with momentum: the only torch.optim with a "momentum" CyclicLR / OneCycleLR cycle
CYCLES_MOMENTUM = {"CyclicLR_momentum", "OneCycleLR_momentum"}


def observed(opt: torch.optim.Optimizer) -> list[tuple]:
    """What a scheduler writes into the groups: ``lr`` and ``betas`` / ``momentum``."""
    return [(float(g["lr"]), tuple(g["betas"]) if "betas" in g else g.get("momentum"))
            for g in opt.param_groups]


def run(model, opt, sched, steps: int, start: int = 0) -> list:
    """Full-batch steps, the scheduler stepped after each (on the loss: ReduceLROnPlateau);
    what the groups and ``get_last_lr()`` held before each step."""
    x, y = data(torch.float64)
    seen = []
    for t in range(start, start + steps):
        seen.append((observed(opt), [float(v) for v in sched.get_last_lr()]))
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x, t % 3 == 0), y)
        loss.backward()
        opt.step()
        if isinstance(sched, ls.ReduceLROnPlateau):
            sched.step(loss.item() if t % 6 else 10.0)  # (a plateau every 6th step too)
        else:
            sched.step()
    return seen


def both(case: str):
    m1 = make_model()
    m2 = copy.deepcopy(m1)
    return m1, ours_for(case, m1), m2, torch_for(case, m2)


@pytest.mark.parametrize("case", ["adam", "sgd_nesterov", "nadam"])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_drives_ours_as_torchs(case, name):
    if name in CYCLES_MOMENTUM and case == "nadam":
        pytest.skip("(betas cycled: covered by adam)")
    m1, o1, m2, o2 = both(case)
    s1, s2 = SCHEDULERS[name](o1), SCHEDULERS[name](o2)
    seen1, seen2 = run(m1, o1, s1, STEPS), run(m2, o2, s2, STEPS)
    assert seen1 == seen2
    assert len({s[0][0] for s in seen1}) > 1, "the scheduler changed nothing"
    if name in CYCLES_MOMENTUM:
        assert len({s[0][0][1] for s in seen1}) > 2, "the momentum was not cycled"
    err = model_err(m1, m2)
    assert err <= TOL, f"{case}/{name}: {err:.3g}"
    assert observed(o1) == observed(o2)


@pytest.mark.parametrize("name", ["OneCycleLR_momentum", "CyclicLR_momentum",
                                  "SequentialLR", "ReduceLROnPlateau", "SWALR"])
def test_a_schedulers_state_dict_resumes_on_a_new_optimizer(name):
    """15 steps, then optimizer and scheduler saved and loaded into new ones (both made,
    then both loaded, as torch's docs do), 15 more: equal to the unbroken torch run."""
    case = "adam"
    m1, o1, m2, o2 = both(case)
    ref = copy.deepcopy(m2)
    oref = torch_for(case, ref)
    sref = SCHEDULERS[name](oref)
    full = run(ref, oref, sref, 2 * 15)
    s1, s2 = SCHEDULERS[name](o1), SCHEDULERS[name](o2)
    run(m1, o1, s1, 15)
    run(m2, o2, s2, 15)
    for m, o, s, make in ((m1, o1, s1, ours_for), (m2, o2, s2, torch_for)):
        saved_opt, saved_sched = o.state_dict(), s.state_dict()
        o_new = make(case, m)
        s_new = SCHEDULERS[name](o_new)  # (torch's recipe: both made, then both loaded)
        o_new.load_state_dict(saved_opt)
        s_new.load_state_dict(saved_sched)
        rest = run(m, o_new, s_new, 15, start=15)
        assert rest == full[15:], make.__name__
        assert model_err(m, ref) <= TOL, make.__name__
    assert model_err(m1, m2) <= TOL


def test_cycled_momentum_on_an_optimizer_without_one_is_refused_as_torchs():
    """ASGD has neither ``momentum`` nor ``betas``: both schedulers refuse it, with torch's
    text, as they refuse torch's ASGD."""
    for make in (ours_for, torch_for):
        opt = make("asgd", make_model())
        with pytest.raises(ValueError, match="momentum"):
            ls.OneCycleLR(opt, max_lr=0.05, total_steps=10)
        with pytest.raises(ValueError, match="momentum"):
            ls.CyclicLR(opt, base_lr=1e-3, max_lr=0.01)


def test_swa_averaged_model_and_swalr_on_our_wrapper():
    """The SWA recipe of torch's docs (AveragedModel + SWALR after ``swa_start``) through
    our wrapper and through torch.optim.SGD: the same averaged weights."""
    results = []
    for make in (ours_for, torch_for):
        model = make_model()
        opt = make("sgd_momentum", model)
        swa_model = AveragedModel(model)
        sched = ls.CosineAnnealingLR(opt, T_max=20)
        swa_sched = SWALR(opt, swa_lr=0.01, anneal_epochs=3)
        x, y = data(torch.float64)
        for t in range(20):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            if t >= 10:
                swa_model.update_parameters(model)
                swa_sched.step()
            else:
                sched.step()
        results.append((model, swa_model, [g["lr"] for g in opt.param_groups]))
    (m1, a1, lr1), (m2, a2, lr2) = results
    assert lr1 == lr2
    assert int(a1.n_averaged) == int(a2.n_averaged) == 10
    assert model_err(m1, m2) <= TOL
    assert model_err(a1.module, a2.module) <= TOL


def test_every_case_of_the_catalog_under_one_cycle():
    """OneCycleLR (momentum cycled where the optimizer has one) on every torch.optim twin."""
    for case in CASES:
        m1, o1, m2, o2 = both(case)
        cycle = "momentum" in o2.defaults or "betas" in o2.defaults
        s1, s2 = (ls.OneCycleLR(o, max_lr=0.02, total_steps=12, cycle_momentum=cycle)
                  for o in (o1, o2))
        assert run(m1, o1, s1, 12) == run(m2, o2, s2, 12), case
        assert model_err(m1, m2) <= 1e-11, case
