"""The torch-equivalent schedulers added to ``mithril.utils.lr_schedulers`` (LambdaLR,
MultiplicativeLR, ConstantLR, LinearLR, PolynomialLR, CyclicLR, ChainedScheduler) against
``torch.optim.lr_scheduler`` over 300 steps, and, for every new scheduler (the optax / Keras
ones of ``test_lr_schedulers_peers.py`` included): state-dict round trips, argument checks and
refused learning rates.

Tolerance as in ``test_lr_schedulers.py``: ``|ours - torch| <= 1e-12 * max(|ours|, |torch|)``
where torch is recursive (ConstantLR, LinearLR, PolynomialLR, ChainedScheduler), exact equality
where torch computes the same closed form or recursion with the same arithmetic (LambdaLR,
MultiplicativeLR, CyclicLR).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import pytest
from scheduler_parity import FakeOpt, N, assert_rel, our_lrs, torch_lrs
from torch.optim import lr_scheduler as tl

from mithril.utils.lr_schedulers import (
    WSD,
    ChainedScheduler,
    ConstantLR,
    CosineAnnealingLR,
    CosineDecayRestarts,
    CyclicLR,
    ExponentialLR,
    InverseSqrt,
    JoinSchedules,
    LambdaLR,
    LinearLR,
    LinearWarmupScheduler,
    LRScheduler,
    MultiplicativeLR,
    MultiStepLR,
    PiecewiseConstant,
    PiecewiseInterpolate,
    PolynomialLR,
    ReduceLROnPlateau,
    SequentialLR,
    StepLR,
)

# --------------------------------------------------------------------------------------------
# equal to torch over 300 steps
# --------------------------------------------------------------------------------------------


def lam_cycle(t: int) -> float:
    return 0.5 + 0.5 * math.cos(t / 7.0)


def lam_mult(t: int) -> float:
    return 0.99 if t % 3 else 1.02


LAMBDAS = {"const": lambda t: 0.5, "step": lambda t: 0.9 ** (t // 30), "cycle": lam_cycle,
           "warm": lambda t: min(1.0, (t + 1) / 50)}


@pytest.mark.parametrize("name", sorted(LAMBDAS))
def test_lambda_lr_equals_torch_exactly(name: str) -> None:
    fn = LAMBDAS[name]
    ours = our_lrs(lambda o: LambdaLR(o, fn), 0.1)
    assert ours == torch_lrs(lambda o: tl.LambdaLR(o, fn), 0.1)


@pytest.mark.parametrize("fn", [lam_mult, lambda t: 0.98, lambda t: 1.0 + 0.01 * math.sin(t)])
def test_multiplicative_lr_equals_torch_exactly(fn: Callable[[int], float]) -> None:
    ours = our_lrs(lambda o: MultiplicativeLR(o, fn), 0.1)
    assert ours == torch_lrs(lambda o: tl.MultiplicativeLR(o, fn), 0.1)
    # get_lr_at, in any order, is the same product
    sched = MultiplicativeLR(FakeOpt(0.1), fn)
    for t in (250, 3, 300, 0, 299, 17, 17, 150):
        assert sched.get_lr_at(t) == ours[t]


@pytest.mark.parametrize("factor,total_iters", [(1 / 3, 5), (0.5, 40), (0.1, 299), (1.0, 3),
                                                (0.25, 1)])
def test_constant_lr_matches_torch(factor: float, total_iters: int) -> None:
    ours = our_lrs(lambda o: ConstantLR(o, factor, total_iters), 0.05)
    assert_rel(ours, torch_lrs(lambda o: tl.ConstantLR(o, factor, total_iters), 0.05))


@pytest.mark.parametrize("start,end,total_iters", [(1 / 3, 1.0, 5), (0.05, 1.0, 40),
                                                   (1.0, 0.0, 100), (0.5, 0.1, 299),
                                                   (0.2, 0.2, 10), (1.0, 0.3, 1)])
def test_linear_lr_matches_torch(start: float, end: float, total_iters: int) -> None:
    ours = our_lrs(lambda o: LinearLR(o, start, end, total_iters), 0.05)
    assert_rel(ours, torch_lrs(lambda o: tl.LinearLR(o, start, end, total_iters), 0.05))


@pytest.mark.parametrize("total_iters,power", [(5, 1.0), (50, 0.9), (100, 2.0), (299, 0.5),
                                               (300, 3.0), (1, 1.0), (40, 0.0)])
def test_polynomial_lr_matches_torch(total_iters: int, power: float) -> None:
    ours = our_lrs(lambda o: PolynomialLR(o, total_iters, power), 0.05)
    assert_rel(ours, torch_lrs(lambda o: tl.PolynomialLR(o, total_iters, power), 0.05))
    assert ours[total_iters:] == [0.0] * (N + 1 - total_iters) or power == 0.0


CYCLIC_CASES = [
    dict(base_lr=0.01, max_lr=0.1, step_size_up=10),
    dict(base_lr=0.01, max_lr=0.1, step_size_up=7, step_size_down=13, mode="triangular2"),
    dict(base_lr=0.001, max_lr=0.05, step_size_up=20, mode="exp_range", gamma=0.99),
    dict(base_lr=0.1, max_lr=0.01, step_size_up=3, step_size_down=0),  # descending sawtooth
    dict(base_lr=0.0, max_lr=0.1, step_size_up=1, mode="triangular2"),  # 150 cycles, amplitude halved each
    dict(base_lr=0.01, max_lr=0.1, step_size_up=9, scale_fn=lambda x: 1 / (1 + x)),
    dict(base_lr=0.01, max_lr=0.1, step_size_up=9, scale_fn=lambda x: 0.995**x,
         scale_mode="iterations"),
]


@pytest.mark.parametrize("kwargs", CYCLIC_CASES)
def test_cyclic_lr_equals_torch_exactly(kwargs: dict) -> None:
    ours = our_lrs(lambda o: CyclicLR(o, **kwargs), 0.5)
    ref = torch_lrs(lambda o: tl.CyclicLR(o, **kwargs, cycle_momentum=False), 0.5)
    assert ours == ref
    assert ours[0] == kwargs["base_lr"]


def test_cyclic_triangular2_far_out_is_base_lr_not_an_overflow() -> None:
    sched = CyclicLR(FakeOpt(0.1), 0.01, 0.1, step_size_up=1, mode="triangular2")
    assert sched.get_lr_at(5001) == 0.01  # cycle 2501: 1 / 2**2500 overflows, the limit is 0


def test_cyclic_lr_momentum_cycling_needs_a_momentum() -> None:
    # as torch: an optimizer with neither momentum nor beta1 (here: no hyperparameters at
    # all) is refused; momentum cycling itself is tested in test_scheduler_groups.py
    with pytest.raises(ValueError, match="cycle_momentum.*momentum or beta1.*FakeOpt"):
        CyclicLR(FakeOpt(0.1), 0.01, 0.1, cycle_momentum=True)


CHAINS: dict[str, tuple[Callable, Callable]] = {
    # torch's docstring example
    "constant_exponential": (
        lambda o: [ConstantLR(o, 0.1, 20), ExponentialLR(o, 0.9)],
        lambda o: [tl.ConstantLR(o, 0.1, 20), tl.ExponentialLR(o, 0.9)]),
    "linear_step_multiplicative": (
        lambda o: [LinearLR(o, 0.1, 1.0, 30), StepLR(o, 50, 0.5), MultiplicativeLR(o, lam_mult)],
        lambda o: [tl.LinearLR(o, 0.1, 1.0, 30), tl.StepLR(o, 50, 0.5),
                   tl.MultiplicativeLR(o, lam_mult)]),
    "multiplicative_polynomial_multistep": (
        lambda o: [MultiplicativeLR(o, lam_mult), PolynomialLR(o, 250, 1.5),
                   MultiStepLR(o, [40, 90])],
        lambda o: [tl.MultiplicativeLR(o, lam_mult), tl.PolynomialLR(o, 250, 1.5),
                   tl.MultiStepLR(o, [40, 90])]),
    "cosine_constant": (  # a recursive cosine (eta_min=0) up to T_max chains as a factor too
        lambda o: [ConstantLR(o, 0.5, 10), CosineAnnealingLR(o, 300)],
        lambda o: [tl.ConstantLR(o, 0.5, 10), tl.CosineAnnealingLR(o, 300)]),
    "one": (lambda o: [ExponentialLR(o, 0.99)], lambda o: [tl.ExponentialLR(o, 0.99)]),
}


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_chained_scheduler_matches_torch(name: str) -> None:
    ours_children, torch_children = CHAINS[name]
    ours = our_lrs(lambda o: ChainedScheduler(ours_children(o)), 0.05)
    ref = torch_lrs(lambda o: tl.ChainedScheduler(torch_children(o), o), 0.05)
    assert_rel(ours, ref)


def test_chained_scheduler_multiplies_closed_form_children_too() -> None:
    """An intended difference: torch lets a closed-form child (LambdaLR, CyclicLR, ...)
    overwrite the rate, after which ExponentialLR scales by gamma once, not gamma**t; ours
    multiplies whole schedules, whatever their order."""
    def cyc(o: FakeOpt) -> CyclicLR:
        return CyclicLR(o, 0.01, 0.1, 15, mode="triangular2")

    for order in (0, 1):
        def make(o: FakeOpt, order: int = order) -> ChainedScheduler:
            kids: list[LRScheduler] = [cyc(o), ExponentialLR(o, 0.995)]
            return ChainedScheduler(kids if order == 0 else kids[::-1])

        # the cyclic child (constructed first) sets the optimizer to its base_lr 0.01, the
        # exponential one's base_lr, hence the chain's base in either order
        ours = our_lrs(make, 0.05)
        first = cyc(FakeOpt(0.05))
        assert_rel(ours, [first.get_lr_at(t) * 0.995**t for t in range(N + 1)])
    ref = torch_lrs(lambda o: tl.ChainedScheduler(
        [tl.CyclicLR(o, 0.01, 0.1, 15, mode="triangular2", cycle_momentum=False),
         tl.ExponentialLR(o, 0.995)], o), 0.05)
    assert ref[2] == pytest.approx(cyc(FakeOpt(0.05)).get_lr_at(2) * 0.995, rel=1e-14)


def test_chained_scheduler_argument_orders_children_and_refusals() -> None:
    opt = FakeOpt(0.1)
    a, b = ConstantLR(opt, 0.5, 3), ExponentialLR(opt, 0.9)
    chain = ChainedScheduler(opt, [a, b])  # SequentialLR's order is accepted too
    assert chain.base_lr == 0.1 and b.base_lr == 0.1  # re-based past ConstantLR's 0.05
    chain.step()
    assert (a.last_step, b.last_step, a.get_last_lr()) == (1, 1, 0.05)
    assert opt.lr == pytest.approx(0.1 * 0.5 * 0.9, rel=1e-15)
    with pytest.raises(ValueError, match="ReduceLROnPlateau.*metric"):
        ChainedScheduler([StepLR(opt, 2), ReduceLROnPlateau(opt)])
    with pytest.raises(ValueError, match="same optimizer"):
        ChainedScheduler([StepLR(opt, 2), StepLR(FakeOpt(0.1), 2)], opt)
    with pytest.raises(ValueError, match="at least one"):
        ChainedScheduler([], opt)
    with pytest.raises(ValueError, match="distinct"):
        ChainedScheduler([a, a])
    with pytest.raises(TypeError, match="schedulers"):
        ChainedScheduler(opt)  # type: ignore[call-overload]
    with pytest.raises(ValueError, match=r"schedulers\[1\] has base_lr 0"):
        zero = FakeOpt(0.0)
        ChainedScheduler([StepLR(zero, 2), StepLR(zero, 3)])


def test_chained_scheduler_in_a_sequence_and_nested() -> None:
    """A chain is a child like any other (re-based, restarted at its milestone)."""
    n, base = 120, 0.1

    def ours(o: FakeOpt) -> LRScheduler:
        first = LinearLR(o, 0.1, 1.0, 20)  # constructed first: its base_lr is the sequence's
        chain = ChainedScheduler([ConstantLR(o, 0.5, 10), ExponentialLR(o, 0.97)])
        return SequentialLR(o, [first, chain], [30])

    # torch's SequentialLR restarts a child by calling its step(0), which torch's
    # ChainedScheduler does not accept; compare with the closed form instead
    vals = our_lrs(ours, base, n)
    expected = [base * (0.1 + 0.9 * min(t, 20) / 20) for t in range(30)]
    expected += [base * (0.5 if t < 10 else 1.0) * 0.97**t for t in range(n + 1 - 30)]
    assert_rel(vals, expected)


# --------------------------------------------------------------------------------------------
# every new scheduler: round trips, refused learning rates, bad state dicts
# --------------------------------------------------------------------------------------------


def _chain(o: FakeOpt) -> LRScheduler:
    return ChainedScheduler([LinearLR(o, 0.2, 1.0, 40), MultiplicativeLR(o, lam_mult),
                             CosineAnnealingLR(o, 150)])


def _join(o: FakeOpt) -> LRScheduler:
    return JoinSchedules(o, [InverseSqrt(o, 20), PiecewiseInterpolate(o, "cosine", {30: 0.1}),
                             WSD(o, 5, 10, 40, decay_type="1-sqrt")], [35, 80])


#: name -> (our factory, torch factory or None)
FACTORIES: dict[str, tuple[Callable[[FakeOpt], LRScheduler], Callable | None]] = {
    "lambda": (lambda o: LambdaLR(o, lam_cycle), lambda o: tl.LambdaLR(o, lam_cycle)),
    "multiplicative": (lambda o: MultiplicativeLR(o, lam_mult),
                       lambda o: tl.MultiplicativeLR(o, lam_mult)),
    "constant": (lambda o: ConstantLR(o, 0.3, 80), lambda o: tl.ConstantLR(o, 0.3, 80)),
    "linear": (lambda o: LinearLR(o, 0.1, 0.9, 90), lambda o: tl.LinearLR(o, 0.1, 0.9, 90)),
    "polynomial": (lambda o: PolynomialLR(o, 120, 2.0), lambda o: tl.PolynomialLR(o, 120, 2.0)),
    "cyclic": (lambda o: CyclicLR(o, 0.01, 0.1, 11, 6, "exp_range", 0.99),
               lambda o: tl.CyclicLR(o, 0.01, 0.1, 11, 6, "exp_range", 0.99,
                                     cycle_momentum=False)),
    "cyclic_scale_fn": (lambda o: CyclicLR(o, 0.01, 0.1, 8, scale_fn=lam_cycle),
                        lambda o: tl.CyclicLR(o, 0.01, 0.1, 8, scale_fn=lam_cycle,
                                              cycle_momentum=False)),
    "chained": (_chain, lambda o: tl.ChainedScheduler(
        [tl.LinearLR(o, 0.2, 1.0, 40), tl.MultiplicativeLR(o, lam_mult),
         tl.CosineAnnealingLR(o, 150)], o)),
    "wsd": (lambda o: WSD(o, 20, 30, 60, 0.001, 0.002, "cosine"), None),
    "inverse_sqrt": (lambda o: InverseSqrt(o, 25, 0.001, timescale=10.0), None),
    "piecewise_constant": (lambda o: PiecewiseConstant(o, {10: 0.5, 56: 0.1, 58: 3.0}), None),
    "piecewise_keras": (lambda o: PiecewiseConstant(o, boundaries=[10, 56, 57],
                                                    values=[0.1, 0.05, 0.01, 0.02]), None),
    "piecewise_interpolate": (lambda o: PiecewiseInterpolate(o, "linear", {40: 0.1, 90: 2.0}),
                              None),
    "join": (_join, None),
    "cosine_restarts": (lambda o: CosineDecayRestarts(o, 7, 1.5, 0.8, 0.05), None),
    "warmup_then_chain": (lambda o: LinearWarmupScheduler(o, 10, 0.0, 0.2, _chain(o)), None),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_state_dict_round_trip_mid_run(name: str) -> None:
    """Save after 57 of 150 steps, JSON round trip, load into a fresh scheduler on a fresh
    optimizer (with a wrong lr), continue: equal to the uninterrupted run (and to torch)."""
    make, make_torch = FACTORIES[name]
    n, save_at, base = 150, 57, 0.1
    opt_a = FakeOpt(base)
    sched_a = make(opt_a)
    full = [opt_a.lr]
    for _ in range(n):
        sched_a.step()
        full.append(opt_a.lr)
    if make_torch is not None:
        assert_rel(full, torch_lrs(make_torch, base, n))

    opt_b = FakeOpt(base)
    sched_b = make(opt_b)
    for _ in range(save_at):
        sched_b.step()
    state = sched_b.state_dict()
    restored = json.loads(json.dumps(state, allow_nan=False))
    assert restored == state

    opt_c = FakeOpt(123.0)
    sched_c = make(opt_c)
    sched_c.load_state_dict(restored)
    assert opt_c.lr == full[save_at] == sched_c.get_last_lr()
    assert sched_c.last_step == save_at and sched_c.state_dict() == state
    rest = [opt_c.lr]
    for _ in range(save_at, n):
        sched_c.step()
        rest.append(opt_c.lr)
    assert rest == full[save_at:]
    assert [sched_c.get_lr_at(t) for t in range(n + 1)] == pytest.approx(full, rel=1e-14)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_a_refused_learning_rate_leaves_the_scheduler_unchanged(name: str) -> None:
    make, _ = FACTORIES[name]
    opt = FakeOpt(0.1)
    sched = make(opt)
    for _ in range(20):
        sched.step()
    before, lr = sched.state_dict(), opt.lr
    opt.refuse = True
    with pytest.raises(ValueError, match="refused"):
        sched.step()
    assert sched.state_dict() == before and opt.lr == lr
    opt.refuse = False
    sched.step()  # and it goes on as if nothing had happened
    assert sched.last_step == 21 and opt.lr == make(FakeOpt(0.1)).get_lr_at(21)


def test_a_refused_negative_lr_from_user_functions_changes_nothing() -> None:
    from mithril.utils.optimizers import SGD

    def fn(t: int) -> float:
        return 1.0 if t < 5 else -1.0

    for make in (lambda o: LambdaLR(o, fn), lambda o: MultiplicativeLR(o, fn),
                 lambda o: CyclicLR(o, 0.01, 0.1, 3, scale_fn=lambda x: 1.0 if x < 2 else -9.0),
                 lambda o: ChainedScheduler([LambdaLR(o, fn), ExponentialLR(o, 0.9)]),
                 lambda o: ChainedScheduler([ExponentialLR(o, 0.9), LambdaLR(o, fn)])):
        opt = SGD(0.1)
        sched = make(opt)
        for _ in range(4):
            sched.step()
        before, lr = sched.state_dict(), opt.get_learning_rate()
        with pytest.raises(ValueError, match="learning_rate"):
            for _ in range(10):
                sched.step()
        assert sched.state_dict()["last_step"] <= 6
        if sched.state_dict()["last_step"] == 4:
            assert sched.state_dict() == before and opt.get_learning_rate() == lr
        assert opt.get_learning_rate() == sched.get_last_lr()


def test_user_functions_must_return_numbers() -> None:
    with pytest.raises(TypeError, match="lr_lambda"):
        LambdaLR(FakeOpt(0.1), lambda t: "0.5")  # type: ignore[arg-type,return-value]
    opt = FakeOpt(0.1)
    sched = MultiplicativeLR(opt, lambda t: None if t == 3 else 0.5)  # type: ignore[arg-type,return-value]
    sched.step()
    sched.step()
    before = sched.state_dict()
    with pytest.raises(TypeError, match=r"lr_lambda\(3\)"):
        sched.step()
    assert sched.state_dict() == before
    with pytest.raises(ValueError, match="lr_lambda.*too large"):
        LambdaLR(FakeOpt(0.1), lambda t: 10**400)
    with pytest.raises(ValueError, match="step 0"):
        LambdaLR(FakeOpt(0.1), lambda t: math.nan)
    with pytest.raises(TypeError, match="scale_fn"):
        CyclicLR(FakeOpt(0.1), 0.01, 0.1, scale_fn=lambda x: [1.0])  # type: ignore[arg-type,return-value]


def test_lambdas_are_not_in_the_state_dict() -> None:
    sched = LambdaLR(FakeOpt(0.1), lam_cycle)
    sched.step()
    assert set(sched.state_dict()) == {"type", "last_step", "base_lr", "last_lr"}
    cyc = CyclicLR(FakeOpt(0.1), 0.01, 0.1, 5, scale_fn=lam_cycle)
    with pytest.raises(ValueError, match="custom_scale_fn"):  # saved with one, loaded without
        CyclicLR(FakeOpt(0.1), 0.01, 0.1, 5).load_state_dict(cyc.state_dict())


BAD_STATES = [
    ("constant", {"factor": 1.5}, "factor"),
    ("constant", {"total_iters": 10**400}, "total_iters"),
    ("linear", {"start_factor": "nan"}, "start_factor"),
    ("polynomial", {"power": -1.0}, "power"),
    ("cyclic", {"mode": "sine"}, "mode"),
    ("cyclic", {"base_lr": -0.1}, "base_lr"),
    ("cyclic", {"custom_scale_fn": True}, "custom_scale_fn"),
    ("wsd", {"decay_type": "exp"}, "decay_type"),
    ("inverse_sqrt", {"timescale": 0.0}, "timescale"),
    ("piecewise_constant", {"scales": [0.5, -1.0, 2.0]}, "scales"),
    ("piecewise_constant", {"values": [0.1, 0.2, 0.3, 0.4]}, "exactly one"),
    ("piecewise_keras", {"boundaries": [10, 9, 57]}, "boundaries"),
    ("piecewise_interpolate", {"interpolate_type": "cubic"}, "interpolate_type"),
    ("cosine_restarts", {"t_mul": 0.5}, "t_mul"),
    ("join", {"boundaries": [35]}, "boundaries"),
    ("lambda", {"last_step": -1}, "step"),
    ("lambda", {"type": "MultiplicativeLR"}, "MultiplicativeLR"),
    ("multiplicative", {"last_lr": "inf"}, "last_lr"),
]


@pytest.mark.parametrize("name,patch,match", BAD_STATES)
def test_a_bad_state_dict_raises_naming_the_key_and_changes_nothing(
        name: str, patch: dict, match: str) -> None:
    make, _ = FACTORIES[name]
    opt = FakeOpt(0.1)
    sched = make(opt)
    for _ in range(7):
        sched.step()
    before, lr = sched.state_dict(), opt.lr
    with pytest.raises((ValueError, TypeError, KeyError), match=match):
        sched.load_state_dict({**before, **patch})
    assert sched.state_dict() == before and opt.lr == lr
    missing = dict(before)
    missing.pop(next(k for k in before if k not in ("type",)))
    with pytest.raises(ValueError, match="missing"):
        sched.load_state_dict(missing)
    assert sched.state_dict() == before


def test_bad_nested_states_change_nothing() -> None:
    opt = FakeOpt(0.1)
    chain = _chain(opt)
    for _ in range(5):
        chain.step()
    before = chain.state_dict()
    bad = json.loads(json.dumps(before))
    bad["schedulers"][2]["T_max"] = -3
    with pytest.raises(ValueError, match="T_max"):
        chain.load_state_dict(bad)
    bad = json.loads(json.dumps(before))
    bad["schedulers"][1]["base_lr"] = 0.0
    with pytest.raises(ValueError, match="base_lr 0"):
        chain.load_state_dict(bad)
    bad = json.loads(json.dumps(before))
    bad["schedulers"] = bad["schedulers"][:2]
    with pytest.raises(ValueError, match="3 child"):
        chain.load_state_dict(bad)
    assert chain.state_dict() == before and opt.lr == before["last_lr"]


HUGE = 10**400

VALIDATION_CASES = [
    (lambda o: LambdaLR(o, 0.5), "lr_lambda"),  # type: ignore[arg-type]
    (lambda o: MultiplicativeLR(o, None), "lr_lambda"),  # type: ignore[arg-type]
    (lambda o: ConstantLR(o, 1.5), "factor"),
    (lambda o: ConstantLR(o, -0.1), "factor"),
    (lambda o: ConstantLR(o, math.nan), "factor"),
    (lambda o: ConstantLR(o, 0.5, 0), "total_iters"),
    (lambda o: ConstantLR(o, 0.5, HUGE), "total_iters"),
    (lambda o: ConstantLR(o, 0.5, 2.5), "total_iters"),  # type: ignore[arg-type]
    (lambda o: LinearLR(o, 0.0), "start_factor"),
    (lambda o: LinearLR(o, HUGE), "start_factor"),
    (lambda o: LinearLR(o, 0.5, 1.2), "end_factor"),
    (lambda o: LinearLR(o, 0.5, 1.0, -1), "total_iters"),
    (lambda o: LinearLR(o, "0.5"), "start_factor"),  # type: ignore[arg-type]
    (lambda o: PolynomialLR(o, 0), "total_iters"),
    (lambda o: PolynomialLR(o, 10, -1.0), "power"),
    (lambda o: PolynomialLR(o, 10, math.inf), "power"),
    (lambda o: PolynomialLR(o, True), "total_iters"),  # type: ignore[arg-type]
    (lambda o: CyclicLR(o, -0.01, 0.1), "base_lr"),
    (lambda o: CyclicLR(o, 0.01, math.nan), "max_lr"),
    (lambda o: CyclicLR(o, 0.01, HUGE), "max_lr"),
    (lambda o: CyclicLR(o, 0.01, 0.1, 0), "step_size_up"),
    (lambda o: CyclicLR(o, 0.01, 0.1, HUGE), "step_size_up"),
    (lambda o: CyclicLR(o, 0.01, 0.1, 5, -1), "step_size_down"),
    (lambda o: CyclicLR(o, 0.01, 0.1, mode="sine"), "mode"),  # type: ignore[arg-type]
    (lambda o: CyclicLR(o, 0.01, 0.1, gamma=-0.5), "gamma"),
    (lambda o: CyclicLR(o, 0.01, 0.1, scale_mode="epoch"), "scale_mode"),  # type: ignore[arg-type]
    (lambda o: CyclicLR(o, 0.01, 0.1, scale_fn=3.0), "scale_fn"),  # type: ignore[arg-type]
    (lambda o: CyclicLR(o, 0.01, 0.1, cycle_momentum=True), "cycle_momentum"),
    (lambda o: WSD(o, -1, 10, 10), "warmup_steps"),
    (lambda o: WSD(o, 10, HUGE, 10), "stable_steps"),
    (lambda o: WSD(o, 10, 10, 1.5), "decay_steps"),  # type: ignore[arg-type]
    (lambda o: WSD(o, 10, 10, 10, start_lr=-1.0), "start_lr"),
    (lambda o: WSD(o, 10, 10, 10, final_lr=math.nan), "final_lr"),
    (lambda o: WSD(o, 10, 10, 10, decay_type="exp"), "decay_type"),  # type: ignore[arg-type]
    (lambda o: InverseSqrt(o, -5), "warmup_steps"),
    (lambda o: InverseSqrt(o, 0), "timescale"),
    (lambda o: InverseSqrt(o, 10, timescale=-1.0), "timescale"),
    (lambda o: InverseSqrt(o, 10, timescale=HUGE), "timescale"),
    (lambda o: InverseSqrt(o, 10, start_lr=math.inf), "start_lr"),
    (lambda o: PiecewiseConstant(o, {10: -0.5}), "boundaries_and_scales"),
    (lambda o: PiecewiseConstant(o, {-1: 0.5}), "boundaries_and_scales"),
    (lambda o: PiecewiseConstant(o, {HUGE: 0.5}), "boundaries_and_scales"),
    (lambda o: PiecewiseConstant(o, {10: math.nan}), "boundaries_and_scales"),
    (lambda o: PiecewiseConstant(o, [10, 0.5]), "boundaries_and_scales"),  # type: ignore[arg-type]
    (lambda o: PiecewiseConstant(o, boundaries=[5, 5], values=[1, 2, 3]), "boundaries"),
    (lambda o: PiecewiseConstant(o, boundaries=[5], values=[1.0]), "values"),
    (lambda o: PiecewiseConstant(o, boundaries=[5], values=[1.0, -2.0]), "values"),
    (lambda o: PiecewiseConstant(o, boundaries=[5]), "both"),
    (lambda o: PiecewiseConstant(o, {5: 0.5}, boundaries=[5], values=[1, 2]), "not both"),
    (lambda o: PiecewiseInterpolate(o, "cubic", {5: 0.5}), "interpolate_type"),  # type: ignore[arg-type]
    (lambda o: PiecewiseInterpolate(o, "linear", {5.5: 0.5}), "boundaries_and_scales"),  # type: ignore[dict-item]
    (lambda o: PiecewiseInterpolate(o, "linear", {5: HUGE}), "boundaries_and_scales"),
    (lambda o: JoinSchedules(o, [StepLR(o, 2), StepLR(o, 3)], [-1]), "boundaries"),
    (lambda o: JoinSchedules(o, [StepLR(o, 2), StepLR(o, 3)], [5, 6]), "boundaries"),
    (lambda o: JoinSchedules(o, [StepLR(o, 2), StepLR(o, 3)], [HUGE]), "boundaries"),
    (lambda o: CosineDecayRestarts(o, 0), "first_decay_steps"),
    (lambda o: CosineDecayRestarts(o, HUGE), "first_decay_steps"),
    (lambda o: CosineDecayRestarts(o, 10, t_mul=0.9), "t_mul"),
    (lambda o: CosineDecayRestarts(o, 10, m_mul=-0.5), "m_mul"),
    (lambda o: CosineDecayRestarts(o, 10, alpha=math.nan), "alpha"),
    (lambda o: CosineDecayRestarts(o, 10, alpha=None), "alpha"),  # type: ignore[arg-type]
]


@pytest.mark.parametrize("make,param", VALIDATION_CASES)
def test_bad_arguments_are_named(make: Callable, param: str) -> None:
    with pytest.raises((ValueError, TypeError), match=param):
        make(FakeOpt(0.1))


def test_get_lr_at_rejects_bad_steps_and_huge_steps_are_value_errors() -> None:
    sched = WSD(FakeOpt(0.1), 10, 10, 10)
    for bad in (-1, 1.5, HUGE, True):
        with pytest.raises(ValueError, match="step t"):
            sched.get_lr_at(bad)  # type: ignore[arg-type]
    big = 2**63 - 1
    assert sched.get_lr_at(big) == 0.0
    assert InverseSqrt(FakeOpt(0.1), 10).get_lr_at(big) > 0
    assert CosineDecayRestarts(FakeOpt(0.1), 10, 2.0).get_lr_at(big) >= 0
    assert CyclicLR(FakeOpt(0.1), 0.01, 0.1, 7, mode="triangular2").get_lr_at(big) >= 0.01
    with pytest.raises(ValueError, match="step"):  # overflows to inf: a ValueError
        CyclicLR(FakeOpt(0.1), 0.01, 0.1, 7, mode="exp_range", gamma=1.5).get_lr_at(10**6)


def test_new_schedulers_drive_a_mithril_optimizer() -> None:
    from mithril.utils.optimizers import Adam

    opt = Adam(learning_rate=1e-3)
    sched = JoinSchedules(opt, [LinearLR(opt, 0.01, 1.0, 10), WSD(opt, 0, 20, 10)], [10])
    lrs = [opt.get_learning_rate()]
    for _ in range(45):
        sched.step()
        lrs.append(opt.get_learning_rate())
    assert lrs[0] == pytest.approx(1e-5) and lrs[10:30] == [1e-3] * 20
    assert lrs[35] == pytest.approx(5e-4) and lrs[40:] == [0.0] * 6
