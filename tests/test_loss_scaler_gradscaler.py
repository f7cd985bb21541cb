"""LossScaler side by side with ``torch.amp.GradScaler``: state dicts both ways, and long runs
with overflows (scale, growth tracker and skipped steps after every step)."""

from __future__ import annotations

import numpy as np
import pytest

from mithril.utils.mixed_precision import LossScaler

torch = pytest.importorskip("torch")


class TorchSide:
    """A GradScaler driving a one-parameter SGD, with the step's gradient finite or not."""

    def __init__(self, **kw) -> None:
        self.p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
        self.opt = torch.optim.SGD([self.p], lr=1.0)
        self.gs = torch.amp.GradScaler("cpu", **kw)

    def step(self, overflow: bool) -> bool:
        """One step; whether the optimizer step was skipped."""
        self.gs.scale(torch.ones((), dtype=torch.float64))  # (creates the scale lazily)
        scale = self.gs.get_scale()
        self.p.grad = torch.tensor([float("inf") if overflow else scale], dtype=torch.float64)
        before = self.p.detach().clone()
        self.gs.step(self.opt)
        self.gs.update()
        return bool(torch.equal(before, self.p.detach()))

    def bits(self) -> tuple:
        return self.gs.get_scale(), self.gs._get_growth_tracker()


def ours_bits(s: LossScaler) -> tuple:
    return s.scale, s.growth_tracker


KW = [dict(init_scale=8.0, growth_interval=3),
      dict(init_scale=2.0**16, growth_factor=3.0, backoff_factor=0.25, growth_interval=5),
      dict(init_scale=1.0, growth_factor=1.5, backoff_factor=0.9, growth_interval=1)]


def pattern(n: int, seed: int) -> list[bool]:
    rng = np.random.default_rng(seed)
    return [bool(x) for x in rng.random(n) < 0.2]


@pytest.mark.parametrize("kw", KW, ids=["interval3", "factor3_backoff025", "interval1"])
def test_long_run_with_overflows_matches_gradscaler_step_by_step(kw) -> None:
    t, s = TorchSide(**kw), LossScaler(**kw)
    flags = pattern(400, seed=kw["growth_interval"])
    # Exact growth_interval boundaries too: runs of finite steps of length interval-1, interval,
    # interval+1 between overflows.
    g = kw["growth_interval"]
    for n in (g - 1, g, g + 1, 2 * g):
        flags += [False] * n + [True]
    for i, overflow in enumerate(flags):
        skipped = t.step(overflow)
        s.update(overflow)
        assert skipped == overflow, i
        assert ours_bits(s) == t.bits(), (i, overflow)


def test_documented_trajectory_of_the_conventions() -> None:
    t, s = TorchSide(init_scale=8.0, growth_interval=3), LossScaler(8.0, growth_interval=3)
    got_t, got_s = [], []
    for overflow in [False, False, False, False, True, False, False, False]:
        t.step(overflow)
        s.update(overflow)
        got_t.append(t.bits()[0])
        got_s.append(s.scale)
    assert got_s == got_t == [8, 8, 16, 16, 8, 8, 8, 16]


def test_gradscaler_loads_our_state_dict_and_continues_alike() -> None:
    """Failed before: ``GradScaler.load_state_dict`` raised ``KeyError: '_growth_tracker'``."""
    kw = dict(init_scale=2.0**10, growth_factor=3.0, backoff_factor=0.25, growth_interval=7)
    s, ref = LossScaler(**kw), TorchSide(**kw)
    for overflow in [False, True, False, False, False, False]:  # mid-interval: tracker 4
        s.update(overflow)
        ref.step(overflow)
    assert ours_bits(s) == ref.bits() == (256.0, 4)
    t = TorchSide()  # default GradScaler, overwritten by our state
    t.step(False)  # (its scale tensor exists: load_state_dict fills it)
    t.gs.load_state_dict(s.state_dict())
    assert t.bits() == (256.0, 4)
    assert (t.gs.get_growth_factor(), t.gs.get_backoff_factor(),
            t.gs.get_growth_interval()) == (3.0, 0.25, 7)
    fresh = TorchSide()  # never stepped: the values wait in _init_scale / _init_growth_tracker
    fresh.gs.load_state_dict(s.state_dict())
    for i, overflow in enumerate(pattern(60, seed=5)):
        assert t.step(overflow) == fresh.step(overflow) == ref.step(overflow) == overflow
        s.update(overflow)
        assert ours_bits(s) == t.bits() == fresh.bits() == ref.bits(), i


def test_we_load_gradscaler_state_and_continue_alike() -> None:
    kw = dict(init_scale=64.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=4)
    t = TorchSide(**kw)
    for overflow in [False, False, True, False, False, False, False, False, False]:
        t.step(overflow)
    s = LossScaler()
    s.load_state_dict(t.gs.state_dict())
    assert ours_bits(s) == t.bits() == (64.0, 2)
    for i, overflow in enumerate(pattern(60, seed=6)):
        t.step(overflow)
        s.update(overflow)
        assert ours_bits(s) == t.bits(), i


def test_round_trip_through_gradscaler_and_old_checkpoints() -> None:
    s = LossScaler(init_scale=32.0, growth_interval=5)
    for overflow in [False, False, False]:
        s.update(overflow)
    t = TorchSide()
    t.gs.load_state_dict(s.state_dict())
    back = LossScaler()
    back.load_state_dict(t.gs.state_dict())
    assert ours_bits(back) == ours_bits(s) == (32.0, 3)
    old = {k: v for k, v in s.state_dict().items() if k != "_growth_tracker"}  # before the fix
    back2 = LossScaler()
    back2.load_state_dict(old)
    assert back2.state_dict() == s.state_dict()


def test_state_after_a_skipped_step_and_disabled_scalers() -> None:
    s, t = LossScaler(init_scale=16.0, growth_interval=3), TorchSide(init_scale=16.0,
                                                                     growth_interval=3)
    for overflow in [False, False, True]:
        s.update(overflow)
        t.step(overflow)
    sd = s.state_dict()
    assert (sd["scale"], sd["growth_tracker"], sd["_growth_tracker"]) == (8.0, 0, 0)
    assert {k: sd[k] for k in t.gs.state_dict()} == t.gs.state_dict()
    # A disabled GradScaler saves {} (torch refuses {} too, when enabled); ours names the keys.
    off = torch.amp.GradScaler("cpu", enabled=False)
    assert off.state_dict() == {}
    with pytest.raises(RuntimeError):
        torch.amp.GradScaler("cpu").load_state_dict({})
    before = s.state_dict()
    with pytest.raises(Exception, match="missing key"):
        s.load_state_dict(off.state_dict())
    assert s.state_dict() == before


def test_tracker_keys_are_checked_each_and_must_agree() -> None:
    s = LossScaler(1024.0, growth_interval=3)
    s.update(False)  # tracker 1
    sd, before = s.state_dict(), s.state_dict()
    with pytest.raises(ValueError, match="'growth_tracker' = 2 and torch's '_growth_tracker' = 1"):
        s.load_state_dict({**sd, "growth_tracker": 2})  # one key edited, not the other
    with pytest.raises(ValueError, match="'_growth_tracker' must be < "):
        s.load_state_dict({**sd, "_growth_tracker": 3})
    with pytest.raises(TypeError, match="'_growth_tracker'"):
        s.load_state_dict({**sd, "_growth_tracker": 1.0})
    assert s.state_dict() == before
    s.load_state_dict({k: v for k, v in {**sd, "_growth_tracker": 2}.items()
                       if k != "growth_tracker"})
    assert s.growth_tracker == 2 and s.state_dict()["_growth_tracker"] == 2


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_trainer_unscaled_gradients_equal_gradscaler_unscale(kind) -> None:
    """40 float16 steps, some overflowing: after each, the trainer's ``last_gradients`` equal
    the gradients ``GradScaler.unscale_`` leaves in torch's AMP loop (the same inf/NaN
    entries on the skipped steps, the same values elsewhere)."""
    from test_mixed_precision_peers import (
        SHAPES,
        autocast_loss,
        host,
        linear,
        overflowing_batches,
        p0,
    )

    from mithril.backends import NumpyBackend, TorchBackend
    from mithril.utils.mixed_precision import MixedPrecisionTrainer
    from mithril.utils.optimizers import SGD

    batches = overflowing_batches(40)
    ps = {n: torch.nn.Parameter(torch.full(s, 0.5)) for n, s in SHAPES.items()}
    opt = torch.optim.SGD(list(ps.values()), lr=0.125, momentum=0.9)
    gs = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=3)
    backend = {"numpy": NumpyBackend, "torch": TorchBackend}[kind](dtype="float16")
    tr = MixedPrecisionTrainer(linear(backend), SGD(learning_rate=0.125, momentum=0.9),
                               p0(backend), growth_interval=3)
    n_bad = 0
    for i, (x, c) in enumerate(batches):
        opt.zero_grad()
        gs.scale(autocast_loss(ps, x, c)).backward()
        gs.unscale_(opt)
        want = {n: p.grad.detach().numpy().copy() for n, p in ps.items()}
        gs.step(opt)
        gs.update()
        tr.forward({"input": backend.array(x)})
        ok = tr.backward_and_update({"out": backend.array(c)})[2]
        got = host(backend, tr.last_gradients)
        for n in SHAPES:
            fin = np.isfinite(want[n])
            n_bad += int(not fin.all())
            assert fin.all() or not ok, i  # a non-finite gradient: the step was skipped
            np.testing.assert_array_equal(np.isfinite(got[n]), fin, err_msg=f"{n} {i}")
            np.testing.assert_allclose(got[n][fin], want[n][fin], rtol=1e-5, atol=1e-6,
                                       err_msg=f"{n} {i}")
        assert gs.get_scale() == tr.loss_scale, i
    assert n_bad >= 8  # the run does overflow
