"""torch's scheduler arguments that have no meaning here (``step(epoch)``, ``verbose=``) are
refused with an error that says what to do instead, and a refused
``step(epoch)`` changes nothing; the step-counted form gives torch's per-iteration
``CosineAnnealingWarmRestarts.step(epoch + i / iters)`` sequence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mithril.utils.lr_schedulers import CosineAnnealingWarmRestarts, ExponentialLR, StepLR
from mithril.utils.optimizers import SGD


def test_step_with_an_epoch_is_refused_and_changes_nothing():
    opt = SGD(learning_rate=0.1)
    s = CosineAnnealingWarmRestarts(opt, T_0=4)
    s.step()
    before = (s.last_step, s.get_last_lr(), opt.learning_rate, s.state_dict())
    with pytest.raises(TypeError, match=r"takes no epoch \(got 1.5\).*T_0 = epochs \* batches"):
        s.step(1.5)
    assert (s.last_step, s.get_last_lr(), opt.learning_rate, s.state_dict()) == before


@pytest.mark.parametrize(("kw", "hint"), [("verbose", "get_last_lr")])
def test_torch_constructor_arguments_are_refused_with_a_hint(kw, hint):
    with pytest.raises(TypeError, match=f"StepLR: no {kw}= argument.*{hint}"):
        StepLR(SGD(learning_rate=0.1), step_size=2, **{kw: 3})
    with pytest.raises(TypeError, match=f"ExponentialLR: no {kw}="):
        ExponentialLR(SGD(learning_rate=0.1), gamma=0.5, **{kw: 3})


def test_counted_in_updates_the_restarts_equal_torchs_fractional_epochs():
    # torch's documented per-iteration use: step(epoch + i / iters) with T_0 in epochs; here
    # T_0 counts updates (epochs * iters), and the rates are the same
    iters, t0, t_mult = 5, 2, 2
    p = torch.nn.Parameter(torch.zeros(1))
    topt = torch.optim.SGD([p], lr=0.1)
    ref = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(topt, T_0=t0, T_mult=t_mult,
                                                               eta_min=0.01)
    opt = SGD(learning_rate=0.1)
    ours = CosineAnnealingWarmRestarts(opt, T_0=t0 * iters, T_mult=t_mult, eta_min=0.01)
    got, want = [], []
    for epoch in range(12):
        for i in range(iters):
            want.append(topt.param_groups[0]["lr"])
            got.append(opt.learning_rate)
            ref.step(epoch + (i + 1) / iters)
            ours.step()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_a_new_lr_lambda_is_checked_and_drops_the_cached_product():
    # torch: replace the function mid-run (lr_lambdas[0]); the product continues with it
    p = torch.nn.Parameter(torch.zeros(1))
    topt = torch.optim.SGD([p], lr=0.1)
    ref = torch.optim.lr_scheduler.MultiplicativeLR(topt, lambda t: 0.9)
    opt = SGD(learning_rate=0.1)
    from mithril.utils.lr_schedulers import LambdaLR, MultiplicativeLR

    ours = MultiplicativeLR(opt, lambda t: 0.9)
    want, got = [], []
    for t in range(1, 11):
        if t == 4:
            assert ours.get_lr_at(8) == pytest.approx(0.1 * 0.9**8, rel=1e-12)  # (cached)
            ref.lr_lambdas[0] = lambda t: 0.5
            ours.lr_lambda = lambda t: 0.5
            assert ours.get_lr_at(8) == pytest.approx(0.1 * 0.9**3 * 0.5**5, rel=1e-12)
        topt.step()
        ref.step()
        ours.step()
        want.append(topt.param_groups[0]["lr"])
        got.append(opt.learning_rate)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    for sched in (ours, LambdaLR(SGD(learning_rate=0.1), lambda t: 1.0)):
        before = sched.state_dict()
        with pytest.raises(TypeError, match="lr_lambda"):
            sched.lr_lambda = 0.5
        assert sched.state_dict() == before


def test_reading_torchs_names_says_ours() -> None:
    # torch's scheduler has them (a loop that logs sched.last_epoch or sched.base_lrs[0]);
    # ours: an AttributeError naming ours (before: the bare "has no attribute")
    p = torch.nn.Parameter(torch.zeros(1))
    ref = torch.optim.lr_scheduler.StepLR(torch.optim.SGD([p], lr=0.1), step_size=2)
    sched = StepLR(SGD(learning_rate=0.1), step_size=2)
    for _ in range(3):
        ref.optimizer.step()
        ref.step()
        sched.step()
    assert (ref.last_epoch, ref.base_lrs, ref.get_last_lr()) == (sched.last_step, [sched.base_lr],
                                                                 sched.get_last_lrs())
    for name, ours in [("last_epoch", "last_step"), ("base_lrs", "base_lr"),
                       ("get_lr", r"get_last_lr\(\) or get_lr_at\(t\)")]:
        assert hasattr(ref, name)
        with pytest.raises(AttributeError, match=f"'StepLR' object has no attribute '{name}' "
                                                 f"\\(torch's name; here: {ours}\\)"):
            getattr(sched, name)
    with pytest.raises(AttributeError, match="no attribute 'gama'$"):
        sched.gama  # noqa: B018 - (any other name: the plain error)


def test_plateau_takes_torchs_metrics_keyword_and_refuses_an_epoch() -> None:
    from mithril.utils.lr_schedulers import ReduceLROnPlateau

    p = torch.nn.Parameter(torch.zeros(1))
    topt = torch.optim.SGD([p], lr=0.1)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(topt, patience=1, factor=0.5)
    opt = SGD(learning_rate=0.1)
    sched = ReduceLROnPlateau(opt, patience=1, factor=0.5)
    want, got = [], []
    for m in [1.0, 0.9, 0.95, 0.97, 0.99, 0.98, 0.97]:
        ref.step(metrics=m)  # (torch's keyword: before, a TypeError here)
        sched.step(metrics=m)
        want.append(topt.param_groups[0]["lr"])
        got.append(opt.learning_rate)
    assert got == want and len(set(got)) == 3
    before = (sched.state_dict(), opt.learning_rate)
    with pytest.raises(TypeError, match=r"takes no epoch \(got 7\).*load_state_dict"):
        sched.step(0.5, 7)  # (torch's deprecated form: sets last_epoch = 7)
    with pytest.raises(TypeError, match="got metric and metrics"):
        sched.step(0.5, metrics=0.4)
    assert (sched.state_dict(), opt.learning_rate) == before
