"""Review of the learning-rate schedules, part 2: schedulers on wrapped optimizers.

* ``Accumulate`` (optax's ``MultiSteps``, torch's accumulation loop): ``cycle_momentum`` and
  ``per_group`` reach the wrapped optimizer, side by side with torch summing ``grad / k``.
* A torch drop-in (``torch_optimizer``) whose ``mithril_optimizer`` a Mithril scheduler
  cycles: what ``mithril.interop`` shows and keeps of the cycled momentum (fixed by the lead).
* Two schedulers stepped back to back on one rate reached through two objects (an optimizer
  and its learning-rate handle, a wrapper and the wrapped optimizer, a per-group scheduler
  and one on a group's handle) are refused as on one object; values that differ compose.
* A composite's ``repr`` names its children.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mithril.utils import lr_schedulers as L
from mithril.utils.optimizers import SGD

TL = torch.optim.lr_scheduler
BASE = 0.1

# --------------------------------------------------------------------------------------------
# schedulers on a wrapped optimizer: Accumulate (optax's MultiSteps, torch's accumulation loop)
# --------------------------------------------------------------------------------------------


def _accumulated_run(opt, sched, ref, ref_sched, params, k=2, windows=12):
    """``k`` micro-batches per update: ours through ``Accumulate(opt, k)`` with the scheduler
    stepped after each applied update, torch summing ``grad / k`` over the window."""
    from mithril.utils.accumulation import Accumulate

    acc = Accumulate(opt, k)
    scheduler = sched(acc)
    ref_scheduler = ref_sched(ref)
    tensors = [p for g in ref.param_groups for p in g["params"]]
    state = acc.init(params)
    rng = np.random.default_rng(11)
    for _ in range(windows):
        for tensor in tensors:
            tensor.grad = torch.zeros_like(tensor)
        for _ in range(k):
            grads = {n: rng.standard_normal(v.shape) for n, v in params.items()}
            params, state = acc.update(params, grads, state)
            for tensor, n in zip(tensors, params, strict=True):
                tensor.grad += torch.tensor(grads[n]) / k
        assert state.applied
        ref.step()
        scheduler.step()
        ref_scheduler.step()
    for tensor, n in zip(tensors, params, strict=True):
        np.testing.assert_allclose(params[n], tensor.detach().numpy(), rtol=1e-11, atol=1e-14)
    return scheduler


def test_one_cycle_cycles_the_beta1_of_an_accumulated_adam():
    # before: "OneCycleLR: cycle_momentum=True needs an optimizer with a momentum or beta1
    # hyperparameter ...; Accumulate has neither", though acc.beta1 is the Adam's
    from mithril.utils.optimizers import Adam

    p0 = np.random.default_rng(2).standard_normal(5)
    opt = Adam(learning_rate=0.01)
    ref = torch.optim.Adam([torch.nn.Parameter(torch.tensor(p0))], lr=0.01)
    _accumulated_run(opt, lambda a: L.OneCycleLR(a, 0.05, total_steps=12, cycle_momentum=True),
                     ref, lambda r: TL.OneCycleLR(r, 0.05, total_steps=12), {"w": p0.copy()})
    assert abs(opt.beta1 - ref.param_groups[0]["betas"][0]) <= 1e-15
    assert abs(opt.learning_rate - ref.param_groups[0]["lr"]) <= 1e-15


def test_per_group_schedulers_on_an_accumulated_sgd():
    # before: "StepLR: per_group needs a mithril optimizer (with param_groups), got Accumulate"
    rng = np.random.default_rng(4)
    params = {"w": rng.standard_normal(4), "b": rng.standard_normal(2)}
    opt = SGD(learning_rate=0.1, momentum=0.9,
              param_groups=[{"params": ["b"], "learning_rate": 0.02}])
    t = {n: torch.nn.Parameter(torch.tensor(v)) for n, v in params.items()}
    ref = torch.optim.SGD([{"params": [t["w"]]}, {"params": [t["b"]], "lr": 0.02}], lr=0.1,
                          momentum=0.9)

    def ours(acc):
        return L.SequentialLR(acc, [L.LinearLR(acc, 0.1, 1.0, 4, per_group=True),
                                    L.CosineAnnealingLR(acc, 8, eta_min=0.01, per_group=True)],
                              [4])

    def theirs(r):
        return TL.SequentialLR(r, [TL.LinearLR(r, 0.1, 1.0, 4),
                                   TL.CosineAnnealingLR(r, 8, eta_min=0.01)], [4])

    sched = _accumulated_run(opt, ours, ref, theirs, params, k=3)
    np.testing.assert_allclose(sched.get_last_lrs(), [g["lr"] for g in ref.param_groups],
                               rtol=1e-12)


# --------------------------------------------------------------------------------------------
# a Mithril scheduler cycling the momentum of a torch drop-in's mithril_optimizer
# --------------------------------------------------------------------------------------------


def _drop_in_cycled(groups: bool):
    from mithril.interop.torch_optim import torch_optimizer

    w, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    given = [{"params": [w]}, {"params": [b], "lr": 0.02}] if groups else [w, b]
    tw = torch_optimizer(SGD(learning_rate=0.1, momentum=0.9), given)
    opt = tw.mithril_optimizer
    sched = L.OneCycleLR(opt, 0.1, total_steps=30, cycle_momentum=True, per_group=groups)
    for _ in range(5):
        w.grad, b.grad = torch.ones(3), torch.ones(2)
        tw.step()
        sched.step()
    assert abs(opt.momentum - 0.9) > 0.01  # cycled
    return tw, opt, w, b


def test_drop_in_keeps_a_cycled_momentum_when_another_group_value_is_edited():
    tw, opt, w, b = _drop_in_cycled(groups=True)
    cycled = opt.momentum
    tw.param_groups[1]["weight_decay"] = 1e-4  # an unrelated edit, as a user would
    w.grad, b.grad = torch.zeros(3), torch.zeros(2)
    tw.step()
    assert opt.momentum == cycled  # was put back to 0.9 silently


def test_drop_in_shows_and_saves_a_cycled_momentum():
    tw, opt, _, _ = _drop_in_cycled(groups=False)
    assert tw.param_groups[0]["momentum"] == opt.momentum  # shows 0.9
    assert tw.state_dict()["param_groups"][0]["momentum"] == opt.momentum


def test_repr_of_a_composite_names_its_children():
    # before: "ChainedScheduler(, last_step=0, last_lr=0.1)" (no hyperparameters: a bare comma)
    opt = SGD(learning_rate=BASE)
    chain = L.ChainedScheduler([L.StepLR(opt, 2), L.ExponentialLR(opt, 0.9)])
    assert repr(chain) == ("ChainedScheduler(schedulers=[StepLR, ExponentialLR], last_step=0, "
                           "last_lr=0.1)")
    seq = L.SequentialLR(opt, [L.LinearLR(opt, 0.5, 1.0, 2), L.StepLR(opt, 3)], [2])
    assert repr(seq).startswith("SequentialLR(schedulers=[LinearLR, StepLR], milestones=[2], ")
    assert repr(L.StepLR(opt, 2)).startswith("StepLR(step_size=2, gamma=0.1, last_step=0, ")

# --------------------------------------------------------------------------------------------
# two schedulers stepped back to back on one rate reached through different objects
# --------------------------------------------------------------------------------------------


def _targets(kind: str):
    from mithril.utils.accumulation import Accumulate
    from mithril.utils.optimizers import Lookahead

    opt = SGD(learning_rate=BASE)
    if kind == "handle":
        return opt, opt, opt.hyperparameter("learning_rate")
    if kind == "lookahead":
        return opt, Lookahead(opt), opt
    if kind == "lookahead-handle":
        wrapped = Lookahead(opt)
        return opt, wrapped, wrapped.hyperparameter("learning_rate")
    return opt, Accumulate(opt, 2), opt


@pytest.mark.parametrize("kind", ["handle", "lookahead", "lookahead-handle", "accumulate"])
def test_back_to_back_on_one_rate_through_two_objects_is_refused(kind):
    # before: the second scheduler silently discarded the first one's change at every step
    # (0.1 * 0.9**t instead of an error; the same object on both was refused)
    opt, a_target, b_target = _targets(kind)
    a, b = L.StepLR(a_target, 1, 0.5), L.ExponentialLR(b_target, 0.9)
    a.step()
    b.step()
    before = (opt.get_learning_rate(), a.state_dict(), b.state_dict())
    with pytest.raises(RuntimeError, match="ChainedScheduler"):
        a.step()
    assert (opt.get_learning_rate(), a.state_dict(), b.state_dict()) == before
    # their product, as torch's chain of the two: ChainedScheduler on either object
    start = opt.get_learning_rate()
    chain = L.ChainedScheduler([L.StepLR(a_target, 1, 0.5), L.ExponentialLR(b_target, 0.9)])
    for _ in range(3):
        chain.step()
    assert abs(opt.get_learning_rate() - start * 0.45**3) < 1e-16


def test_other_values_of_one_optimizer_are_not_refused():
    opt = SGD(learning_rate=BASE, momentum=0.9)
    lr, wd, mom = (L.StepLR(opt, 1, 0.5), L.ExponentialLR(opt.hyperparameter("weight_decay"), 0.9),
                   L.LinearLR(opt.hyperparameter("momentum"), 0.5, 1.0, 4))
    for _ in range(3):
        lr.step()
        wd.step()
        mom.step()
    assert opt.get_learning_rate() == BASE * 0.125 and opt.momentum == 0.9 * (0.5 + 0.5 * 3 / 4)


@pytest.mark.parametrize("first", ["per-group", "group-handle"])
def test_back_to_back_with_a_per_group_scheduler_and_one_on_its_group_is_refused(first):
    # before: the group's rate silently followed whichever stepped last
    opt = SGD(learning_rate=BASE, param_groups=[{"params": ["b"], "learning_rate": 0.5}])
    per_group = L.StepLR(opt, 1, 0.5, per_group=True)
    on_group = L.ExponentialLR(opt.hyperparameter("learning_rate", group=0), 0.9)
    a, b = (per_group, on_group) if first == "per-group" else (on_group, per_group)
    a.step()
    b.step()
    group = opt.hyperparameter("learning_rate", group=0)
    before = (opt.get_learning_rate(), group.get(), a.state_dict(), b.state_dict())
    with pytest.raises(RuntimeError, match="stepped since this scheduler's last step"):
        a.step()
    assert (opt.get_learning_rate(), group.get(), a.state_dict(), b.state_dict()) == before


def test_a_scheduler_of_the_optimizer_and_one_of_a_group_compose():
    # not per group, the optimizer's scheduler leaves a group scheduled on its own to it
    opt = SGD(learning_rate=BASE, param_groups=[{"params": ["b"], "learning_rate": 0.5}])
    own, group = L.StepLR(opt, 1, 0.5), L.ExponentialLR(opt.hyperparameter("learning_rate", 0),
                                                        0.9)
    for _ in range(3):
        own.step()
        group.step()
    assert opt.get_learning_rate() == BASE * 0.125
    assert abs(opt.hyperparameter("learning_rate", 0).get() - 0.5 * 0.9**3) < 1e-16
