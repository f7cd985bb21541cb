"""Review hunt 65, learning-rate schedulers side by side with ``torch.optim.lr_scheduler``
(three parameter groups of their own rates, float64, every step)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch.optim import lr_scheduler as ls

import mithril.utils.lr_schedulers as S
from mithril.utils.optimizers import SGD

LRS = (0.1, 0.02, 0.3)
REL = 1e-12


def _pair() -> tuple[SGD, torch.optim.SGD]:
    groups = [{"params": [k], "learning_rate": lr} for k, lr in zip("bc", LRS[1:], strict=True)]
    opt = SGD(learning_rate=LRS[0], momentum=0.9, param_groups=groups)
    ref = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": lr}
                           for lr in LRS], momentum=0.9)
    return opt, ref


def _rates(opt: SGD) -> list[float]:
    return [opt.hyperparameter("learning_rate", g).get() for g in (None, 0, 1)]


def _side_by_side(ours, theirs, steps: int = 40) -> None:
    opt, ref = _pair()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched, ref_sched = ours(opt), theirs(ref)
        for i in range(steps + 1):
            if i:
                ref.step()
                ref_sched.step()
                sched.step()
            want = [g["lr"] for g in ref.param_groups]
            assert all(abs(a - b) <= REL * b for a, b in zip(_rates(opt), want, strict=True)), i
            assert all(abs(a - b) <= REL * b for a, b in
                       zip(sched.get_last_lrs(), ref_sched.get_last_lr(), strict=True)), i


# torch iterates milestones (MultiStepLR: Counter(milestones); SequentialLR: len / bisect):
# a NumPy array or a set was refused here ("must be a sequence of integers")
@pytest.mark.parametrize("milestones", [np.array([9, 3, 3, 20]), {3, 9, 20}, np.arange(5, 40, 7)],
                         ids=["ndarray", "set", "arange"])
def test_multistep_milestones_of_any_collection_torch_takes(milestones) -> None:
    _side_by_side(lambda o: S.MultiStepLR(o, milestones, 0.5, per_group=True),
                  lambda o: ls.MultiStepLR(o, milestones, 0.5))
    # set mid-run: the same closed form on every lane
    opt, _ = _pair()
    sched = S.MultiStepLR(opt, [1], 0.5, per_group=True)
    sched.milestones = milestones
    want = sorted(int(m) for m in milestones)
    assert sched.milestones == want and sched._siblings[1].milestones == want
    assert all(type(m) is int for m in sched.state_dict()["milestones"])


def test_sequential_milestones_as_an_array() -> None:
    _side_by_side(
        lambda o: S.SequentialLR(o, [S.LinearLR(o, 0.1, 1.0, 5, per_group=True),
                                     S.CosineAnnealingLR(o, 20, 1e-3, per_group=True)],
                                 np.array([6])),
        lambda o: ls.SequentialLR(o, [ls.LinearLR(o, 0.1, 1.0, 5),
                                      ls.CosineAnnealingLR(o, 20, 1e-3)], np.array([6])))


@pytest.mark.parametrize("bad", [iter([3, 5]), (m for m in (3, 5)), {3: 2}, np.array(3), "35",
                                 [np.array([3, 5])], [2.5]])
def test_milestones_refused_change_nothing(bad) -> None:
    opt, _ = _pair()
    before = _rates(opt)
    with pytest.raises(ValueError, match="milestones"):
        S.MultiStepLR(opt, bad, 0.5, per_group=True)
    assert _rates(opt) == before
    sched = S.MultiStepLR(opt, [2], 0.5, per_group=True)
    sched.step()
    state = sched.state_dict()
    with pytest.raises(ValueError, match="milestones"):
        sched.milestones = bad
    assert sched.state_dict() == state and _rates(opt) == before


def _torch_run(make, steps: int) -> list[list[float]]:
    _, ref = _pair()
    sched = make(ref)
    out = [[g["lr"] for g in ref.param_groups]]
    for _ in range(steps):
        ref.step()
        sched.step()
        out.append([g["lr"] for g in ref.param_groups])
    return out


def _close(a: list[float], b: list[float]) -> bool:
    return all(abs(x - y) <= REL * max(abs(x), abs(y)) for x, y in zip(a, b, strict=True))


# a function set between steps (sched.scale_fn = f, sched.lr_lambda = f) reached the
# optimizer's own lane only: per group, the groups kept the old one (and CyclicLR's state
# dict then fit no scheduler); CyclicLR's scale_fn was not checked (a string failed at the
# next step with Python's "'str' object is not callable")
def test_cyclic_scale_fn_set_mid_run_reaches_every_group() -> None:
    def scale(c: float) -> float:
        return 0.8 ** c

    bounds = dict(base_lr=[0.01, 0.001, 0.02], max_lr=[0.1, 0.05, 0.3], step_size_up=3,
                  step_size_down=2)
    want = _torch_run(lambda o: ls.CyclicLR(o, **bounds, scale_fn=scale), 30)
    opt, _ = _pair()
    sched = S.CyclicLR(opt, **bounds)
    for _ in range(6):
        sched.step()
    sched.scale_fn = scale
    for t in range(7, 31):
        sched.step()
        assert _close(sched.get_last_lrs(), want[t]) and _close(_rates(opt), want[t]), t
    state = sched.state_dict()
    assert [g["custom_scale_fn"] for g in state["groups"]] == [True, True]
    resumed = S.CyclicLR(_pair()[0], **bounds, scale_fn=scale)
    resumed.load_state_dict(state)
    assert resumed.get_last_lrs() == sched.get_last_lrs()
    for bad in ("triangular", 3, [scale, scale, scale]):
        with pytest.raises(TypeError, match="scale_fn"):
            sched.scale_fn = bad
        assert sched.state_dict() == state and _close(_rates(opt), want[30])
        assert all(lane.scale_fn is scale for lane in (sched, *sched._siblings))


@pytest.mark.parametrize("kind", ["LambdaLR", "MultiplicativeLR"])
def test_lr_lambda_set_mid_run_reaches_every_group(kind: str) -> None:
    def first(t: int) -> float:
        return 0.9 ** t if kind == "LambdaLR" else 0.9

    def then(t: int) -> float:
        return 1.0 / (1 + t) if kind == "LambdaLR" else 1.05

    opt, _ = _pair()
    sched = getattr(S, kind)(opt, [first] * 3)
    for _ in range(5):
        sched.step()
    at5 = sched.get_last_lrs()
    sched.lr_lambda = then  # one function: every group's
    for _ in range(10):
        sched.step()
    if kind == "LambdaLR":  # the closed form with the new function, torch's LambdaLR(then)
        assert _close(sched.get_last_lrs(), _torch_run(lambda o: ls.LambdaLR(o, then), 15)[15])
    else:  # it goes on multiplying from the rate it had: torch's product
        assert _close(sched.get_last_lrs(), [lr * 1.05 ** 10 for lr in at5])
    assert _close(_rates(opt), sched.get_last_lrs())
    state, rates = sched.state_dict(), _rates(opt)
    for bad, error in ((3, TypeError), ([first, first, "x"], TypeError), ([first], ValueError)):
        with pytest.raises(error, match="lr_lambda"):
            sched.lr_lambda = bad
        assert sched.state_dict() == state and _rates(opt) == rates
        assert all(lane.lr_lambda is then for lane in (sched, *sched._siblings))
    with pytest.raises(AttributeError, match="lr_lambda"):  # a misspelling changed no step
        sched.lr_lamda = then


# OneCycleLR's arguments were in another order than torch's (epochs and steps_per_epoch
# keyword-only, pct_start third): torch's OneCycleLR(opt, max_lr, None, epochs, steps) was
# refused as pct_start=epochs, and positional arguments past it meant other things
def test_one_cycle_positional_arguments_in_torch_order() -> None:
    args = ([0.1, 0.05, 0.3], None, 6, 10, 0.4, "cos", True, [0.8, 0.7, 0.6], 0.9, 10.0,
            100.0, True)
    opt, ref = _pair()
    sched, ref_sched = S.OneCycleLR(opt, *args), ls.OneCycleLR(ref, *args)
    for i in range(60):
        ref.step()
        ref_sched.step()
        sched.step()
        assert _close(_rates(opt), [g["lr"] for g in ref.param_groups]), i
        assert _close([opt.hyperparameter("momentum", g).get() for g in (None, 0, 1)],
                      [g["momentum"] for g in ref.param_groups]), i
    assert sched.total_steps == 60 and sched.three_phase and sched.div_factor == 10.0
    with pytest.raises(ValueError, match="Tried to step 61 times"):  # past the end, as torch
        sched.step()
    with pytest.raises(ValueError, match="Tried to step 61 times"):
        ref_sched.step()
    assert sched.last_step == 60 and _close(_rates(opt), sched.get_last_lrs())


# CyclicLR's base_lr (the lower bound, per group as max_lr) set between steps reached the
# optimizer's own lane only, and a list (one per group, as the constructor takes) was refused
def test_cyclic_base_lr_set_mid_run_reaches_every_group() -> None:
    low, high = [0.005, 0.002, 0.05], [0.1, 0.05, 0.3]
    want = _torch_run(lambda o: ls.CyclicLR(o, low, high, 3, 5, "triangular2"), 30)
    opt, _ = _pair()
    sched = S.CyclicLR(opt, [0.01, 0.001, 0.02], high, 3, 5, "triangular2")
    for _ in range(4):
        sched.step()
    sched.base_lr = low
    for t in range(5, 31):
        sched.step()
        assert _close(sched.get_last_lrs(), want[t]) and _close(_rates(opt), want[t]), t
    sched.base_lr = 0.004  # one value: every group's
    assert [lane.base_lr for lane in (sched, *sched._siblings)] == [0.004] * 3
    state = sched.state_dict()
    for bad in ([0.01, -0.01, 0.01], [0.01], -1.0):
        with pytest.raises(ValueError, match="base_lr"):
            sched.base_lr = bad
        assert sched.state_dict() == state


# Keras's PiecewiseConstantDecay takes NumPy arrays (boundaries and values); ours refused
# them as "not a sequence". Keras's rates: values[number of boundaries b with t > b]
def test_piecewise_constant_keras_form_takes_arrays() -> None:
    boundaries, values = np.array([3, 7, 7 + 5]), np.array([0.1, 0.05, 0.01, 0.001])
    opt = SGD(learning_rate=1.0)
    sched = S.PiecewiseConstant(opt, boundaries=boundaries, values=values)
    got = [opt.learning_rate]
    for _ in range(20):
        sched.step()
        got.append(opt.learning_rate)
    want = [float(values[np.searchsorted(boundaries, t, side="left")]) for t in range(21)]
    assert got == want and got[3] == 0.1 and got[4] == 0.05 and got[13] == 0.001
    assert sched.state_dict()["boundaries"] == [3, 7, 12]
    opt = SGD(learning_rate=0.1)
    joined = S.JoinSchedules(opt, [S.ConstantLR(opt, 0.5, 2), S.ExponentialLR(opt, 0.9)],
                             np.array([4]))
    assert joined.boundaries == [4] and joined.get_lr_at(6) == 0.1 * 0.9**2
    for bad in ("37", np.array(3), iter([3, 7, 12])):
        with pytest.raises(ValueError, match="boundaries"):
            S.PiecewiseConstant(SGD(learning_rate=1.0), boundaries=bad, values=values)
