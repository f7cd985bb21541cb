"""State dicts that do not fit the scheduler they are loaded into: torch's own (a user
switching over), a composite's child of another kind, another number of children, a bad
value deep in a nested state. torch's ``load_state_dict`` takes any of them silently (its
``__dict__.update``: a ``SequentialLR`` of three children left with one milestone, a
``CosineAnnealingLR`` given an ``ExponentialLR``'s ``gamma``), as checked here side by side;
ours refuse with an error naming where the state does not fit, and change nothing.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable

import pytest
import torch
from scheduler_parity import FakeOpt
from torch.optim import lr_scheduler as tl

import mithril.utils.lr_schedulers as sch


def _torch_opt() -> torch.optim.SGD:
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


#: name -> (ours, torch's)
TORCH_STATES: dict[str, tuple[Callable, Callable]] = {
    "step": (lambda o: sch.StepLR(o, 3), lambda o: tl.StepLR(o, 3)),
    "one-cycle": (lambda o: sch.OneCycleLR(o, 1.0, 20),
                  lambda o: tl.OneCycleLR(o, 1.0, 20, cycle_momentum=False)),
    "plateau": (lambda o: sch.ReduceLROnPlateau(o), lambda o: tl.ReduceLROnPlateau(o)),
    "sequential": (
        lambda o: sch.SequentialLR(o, [sch.StepLR(o, 3), sch.ExponentialLR(o, 0.9)], [3]),
        lambda o: tl.SequentialLR(o, [tl.StepLR(o, 3), tl.ExponentialLR(o, 0.9)], [3])),
}


@pytest.mark.parametrize("name", list(TORCH_STATES))
def test_a_torch_state_dict_is_refused_saying_what_to_do(name: str) -> None:
    ours, theirs = TORCH_STATES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        topt = _torch_opt()
        tsched = theirs(topt)
        for _ in range(4):
            topt.step()
            tsched.step(1.0) if name == "plateau" else tsched.step()
    saved = tsched.state_dict()
    opt = FakeOpt(0.1)
    sched = ours(opt)
    sched.step(1.0) if name == "plateau" else sched.step()
    before, lr = sched.state_dict(), opt.lr
    # (before: "state_dict is for None, cannot load it into StepLR")
    with pytest.raises(ValueError, match=r"torch.optim.lr_scheduler's \(it has 'last_epoch', "
                                         r"no 'type'\).*step it last_epoch times"):
        sched.load_state_dict(saved)
    assert sched.state_dict() == before and opt.lr == lr


def _pair(make_ours: Callable, make_torch: Callable) -> tuple:
    opt = FakeOpt(0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make_ours(opt), opt, make_torch(_torch_opt())


def test_a_child_of_another_kind_is_refused_naming_it() -> None:
    saved_ours, _, saved_torch = _pair(
        lambda o: sch.SequentialLR(o, [sch.StepLR(o, 3), sch.ExponentialLR(o, 0.9)], [3]),
        lambda o: tl.SequentialLR(o, [tl.StepLR(o, 3), tl.ExponentialLR(o, 0.9)], [3]))
    sched, opt, tsched = _pair(
        lambda o: sch.SequentialLR(o, [sch.StepLR(o, 3), sch.CosineAnnealingLR(o, 9)], [3]),
        lambda o: tl.SequentialLR(o, [tl.StepLR(o, 3), tl.CosineAnnealingLR(o, 9)], [3]))
    tsched.load_state_dict(saved_torch.state_dict())  # torch: taken, gamma and all
    assert tsched._schedulers[1].gamma == 0.9 and tsched._schedulers[1].T_max == 9
    before = sched.state_dict()
    with pytest.raises(ValueError, match=r"^state_dict\['schedulers'\]\[1\]: state_dict is for "
                                         r"'ExponentialLR', cannot load it into "
                                         r"CosineAnnealingLR"):
        sched.load_state_dict(saved_ours.state_dict())
    assert sched.state_dict() == before and opt.lr == 0.1


def test_another_number_of_children_is_refused_as_such() -> None:
    saved_ours, _, saved_torch = _pair(
        lambda o: sch.SequentialLR(o, [sch.StepLR(o, 3), sch.ExponentialLR(o, 0.9)], [3]),
        lambda o: tl.SequentialLR(o, [tl.StepLR(o, 3), tl.ExponentialLR(o, 0.9)], [3]))
    sched, opt, tsched = _pair(
        lambda o: sch.SequentialLR(o, [sch.StepLR(o, 3), sch.ExponentialLR(o, 0.9),
                                       sch.StepLR(o, 2)], [3, 5]),
        lambda o: tl.SequentialLR(o, [tl.StepLR(o, 3), tl.ExponentialLR(o, 0.9),
                                      tl.StepLR(o, 2)], [3, 5]))
    tsched.load_state_dict(saved_torch.state_dict())  # torch: three children, one milestone
    assert tsched._milestones == [3] and len(tsched._schedulers) == 3
    before = sched.state_dict()
    # (before: "milestones must have len(schedulers) - 1 = 2 entries, got 1")
    with pytest.raises(ValueError, match=r"state_dict\['schedulers'\] holds 2 child scheduler "
                                         r"states, this SequentialLR has 3 children"):
        sched.load_state_dict(saved_ours.state_dict())
    chain = sch.ChainedScheduler([sch.StepLR(opt, 3), sch.ExponentialLR(opt, 0.9)])
    with pytest.raises(ValueError, match=r"must be a list of 2 child scheduler states"):
        chain.load_state_dict({**chain.state_dict(), "schedulers": "none"})
    assert sched.state_dict() == before


def test_a_bad_value_deep_in_a_nested_state_names_its_path() -> None:
    def make(o: FakeOpt) -> sch.SequentialLR:
        inner = sch.SequentialLR(o, [sch.StepLR(o, 2), sch.CosineAnnealingLR(o, 5)], [4])
        return sch.SequentialLR(o, [sch.StepLR(o, 3),
                                    sch.LinearWarmupScheduler(o, 3, 0.0, 0.1, inner)], [3])

    opt = FakeOpt(0.1)
    sched = make(opt)
    for _ in range(8):
        sched.step()
    before, lr = sched.state_dict(), opt.lr
    bad = json.loads(json.dumps(before))
    bad["schedulers"][1]["after_scheduler"]["schedulers"][1]["T_max"] = -1
    with pytest.raises(ValueError, match=r"^state_dict\['schedulers'\]\[1\]\['after_scheduler'\]"
                                         r"\['schedulers'\]\[1\]: T_max must be > 0"):
        sched.load_state_dict(bad)
    assert sched.state_dict() == before and opt.lr == lr
    sched.load_state_dict(json.loads(json.dumps(before)))  # the good one still loads
    sched.step()
    assert opt.lr == make(FakeOpt(0.1)).get_lr_at(9)
