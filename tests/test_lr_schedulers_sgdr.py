"""optax's ``sgdr_schedule`` with a different peak (and warm-up, decay, end, exponent) per
cycle, and the ``base_lr=`` keyword it is built on (a scheduler's own base, kept when a
parent re-bases), side by side with optax 0.2 and Keras 3 in float64.

The references come from one subprocess (JAX's x64 switch is process-global), vectorised over
the steps; ours must agree at ``1e-12`` relative at every step. optax evaluates a schedule at
the count before incrementing it (0 for the first update); our scheduler, stepped after each
update, gives update ``t`` the rate of step ``t``. Keras 3.15's jax backend computes ``cos``
of float64 in float32, so its ``CosineDecayRestarts`` is evaluated with that op in float64
(as in ``test_lr_schedulers_peers.py``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from scheduler_parity import FakeOpt, assert_rel, peer_schedules

import mithril.utils.optimizers as mo
from mithril.utils.lr_schedulers import (
    WSD,
    ChainedScheduler,
    CosineDecayRestarts,
    ExponentialDecay,
    ExponentialLR,
    JoinSchedules,
    LinearWarmupScheduler,
    OneCycleLR,
    PiecewiseConstant,
    PolynomialDecay,
    SequentialLR,
    StepLR,
    sgdr_schedule,
)

#: three cycles, every value different (init above the peak in the third: a warm-down)
CYCLES3 = [
    dict(init_value=0.0, peak_value=0.1, warmup_steps=10, decay_steps=100, end_value=1e-3),
    dict(init_value=0.002, peak_value=0.05, warmup_steps=5, decay_steps=60, end_value=1e-4,
         exponent=2.0),
    dict(init_value=0.04, peak_value=0.02, warmup_steps=15, decay_steps=80, end_value=0.0,
         exponent=0.5),
]
#: the edges: no warm-up, a one-step decay, a zero peak (and end), a rising "decay"
CYCLES5 = [
    dict(init_value=0.3, peak_value=0.2, warmup_steps=0, decay_steps=40, end_value=0.01),
    dict(init_value=0.0, peak_value=0.15, warmup_steps=7, decay_steps=8, exponent=3.0),
    dict(init_value=0.05, peak_value=0.0, warmup_steps=4, decay_steps=20),
    dict(init_value=0.0, peak_value=0.01, warmup_steps=3, decay_steps=33, end_value=0.03),
    dict(init_value=0.1, peak_value=0.1, warmup_steps=1, decay_steps=57, end_value=0.001,
         exponent=1.7),
]
N = 300  # steps compared: past the end of every schedule below
BASE = 0.7  # the optimizer's rate: sgdr_schedule and base_lr= must not use it


def _by_hand(o, cycles):  # the composition the docs give, written out
    bounds = [sum(c["decay_steps"] for c in cycles[: i + 1]) for i in range(len(cycles) - 1)]
    return JoinSchedules(o, [
        WSD(o, c["warmup_steps"], 0, c["decay_steps"] - c["warmup_steps"], c["init_value"],
            c.get("end_value", 0.0), "cosine", c.get("exponent", 1.0), base_lr=c["peak_value"])
        for c in cycles], bounds)


#: name -> (ours, on ``o``; the peer's expression)
CASES = {
    "sgdr-3": (lambda o: sgdr_schedule(o, CYCLES3), f"optax.sgdr_schedule({CYCLES3!r})"),
    "sgdr-5-edges": (lambda o: sgdr_schedule(o, CYCLES5), f"optax.sgdr_schedule({CYCLES5!r})"),
    "sgdr-3-by-hand": (lambda o: _by_hand(o, CYCLES3), f"optax.sgdr_schedule({CYCLES3!r})"),
    "sgdr-1": (lambda o: sgdr_schedule(o, CYCLES3[1:2]), f"optax.sgdr_schedule({CYCLES3[1:2]!r})"),
    # optax joins schedules each with its own init_value: base_lr= on any closed form
    "join-own-inits": (
        lambda o: JoinSchedules(o, [WSD(o, 20, 0, 0, 0.0, base_lr=0.1),
                                    ExponentialDecay(o, 10, 0.8, base_lr=0.05),
                                    PolynomialDecay(o, 50, 0.001, 2.0, base_lr=0.02)], [20, 60]),
        "optax.join_schedules([optax.linear_schedule(0.0, 0.1, 20), "
        "optax.exponential_decay(0.05, 10, 0.8), optax.polynomial_schedule(0.02, 0.001, 2, 50)]"
        ", [20, 60])"),
    "sequential-own-inits": (
        lambda o: SequentialLR(o, [ExponentialDecay(o, 5, 0.5, base_lr=0.08),
                                   WSD(o, 0, 0, 90, decay_type="cosine", base_lr=0.03)], [45]),
        "optax.join_schedules([optax.exponential_decay(0.08, 5, 0.5), "
        "optax.cosine_decay_schedule(0.03, 90)], [45])"),
    # a warm-up to 0.1 whose after_scheduler keeps its own base (re-based to end_lr without)
    "warmup-keeps-base": (
        lambda o: LinearWarmupScheduler(o, 10, 0.0, 0.1,
                                        WSD(o, 0, 0, 50, decay_type="cosine", base_lr=0.03)),
        "optax.join_schedules([optax.linear_schedule(0.0, 0.1, 10), "
        "optax.cosine_decay_schedule(0.03, 50)], [10])"),
    # Keras's CosineDecayRestarts: as before, and with its own base
    "keras-restarts": (lambda o: CosineDecayRestarts(o, 30, 2.0, 0.8, 0.05),
                       "K.CosineDecayRestarts(0.2, 30, 2.0, 0.8, 0.05)"),  # (o at 0.2)
    "keras-restarts-base": (lambda o: CosineDecayRestarts(o, 30, 2.0, 0.8, 0.05, base_lr=0.2),
                            "K.CosineDecayRestarts(0.2, 30, 2.0, 0.8, 0.05)"),
}

@pytest.fixture(scope="module")
def references() -> dict:
    return peer_schedules({k: v[1] for k, v in CASES.items()}, N + 1)


def _run(sched, o, n: int) -> list[float]:
    out = [o.get_learning_rate()]
    for _ in range(n):
        sched.step()
        out.append(o.get_learning_rate())
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_equals_optax_and_keras_in_float64(name: str, references: dict) -> None:
    o = FakeOpt(0.2 if name == "keras-restarts" else BASE)  # (the other cases ignore it)
    sched = CASES[name][0](o)
    got = _run(sched, o, N)
    assert got == [sched.get_lr_at(t) for t in range(N + 1)]
    assert_rel(got, references[name])


def test_the_cycles_differ_and_the_peaks_are_the_dicts(references: dict) -> None:
    """Not one peak repeated: cycle i peaks at its own peak_value, at B_i + W_i."""
    ref = references["sgdr-3"]
    assert (ref[10], ref[105], ref[175]) == (0.1, 0.05, 0.02)
    inits = (ref[100], ref[160])  # each cycle starts at its own init_value
    assert inits == pytest.approx((0.002, 0.04), rel=1e-12) and ref[N] == 0.0


@pytest.mark.parametrize("name", ["sgdr-3", "sgdr-5-edges", "join-own-inits"])
@pytest.mark.parametrize("at", [0, 7, 104, 133])
def test_state_dict_round_trip_mid_run(name: str, at: int, references: dict) -> None:
    """Saved at step ``at`` through JSON, loaded into a fresh one on an optimizer at another
    rate: the rest of the run is optax's."""
    o = FakeOpt(BASE)
    sched = CASES[name][0](o)
    _run(sched, o, at)
    state = json.loads(json.dumps(sched.state_dict(), allow_nan=False))
    o2 = FakeOpt(0.3)
    resumed = CASES[name][0](o2)
    resumed.load_state_dict(state)
    assert resumed.last_step == at and o2.lr == o.lr
    assert o2.lr == pytest.approx(references[name][at], rel=1e-12)
    assert_rel(_run(resumed, o2, N - at)[1:], references[name][at + 1:])


def test_a_mithril_optimizer_trained_with_it_gets_optax_rates(references: dict) -> None:
    """An SGD stepped with the schedule: update t uses optax's rate at count t."""
    opt = mo.SGD(learning_rate=BASE)
    sched = sgdr_schedule(opt, CYCLES3)
    params = {"w": np.ones(2)}
    state = opt.init(params)
    lrs = []
    for _ in range(250):
        lrs.append(opt.get_learning_rate())
        params, state = opt.update(params, {"w": np.ones(2)}, state)
        sched.step()
    assert_rel(lrs, references["sgdr-3"][:250])
    np.testing.assert_allclose(params["w"], 1.0 - sum(references["sgdr-3"][:250]), rtol=1e-12)


def test_parents_keep_a_given_base_and_rebase_the_others() -> None:
    o = FakeOpt(0.1)
    other = ExponentialLR(o, 0.5)
    own = ExponentialLR(o, 0.5, base_lr=0.4)
    assert (own.base_lr, other.base_lr) == (0.4, 0.1)
    o.lr = 1.0  # a parent re-bases to its first child's base: only the other follows
    seq = SequentialLR(o, [StepLR(o, 3), own, other], [5, 8])
    assert [seq.get_lr_at(t) for t in (5, 6, 8)] == [0.4, 0.2, 1.0]
    chained = ChainedScheduler([StepLR(o, 2, 0.5), ExponentialLR(o, 0.9, base_lr=0.3)])
    assert chained.schedulers[1].base_lr == 0.3  # its factor: relative to its own base
    assert chained.get_lr_at(4) == pytest.approx(1.0 * 0.25 * 0.9**4, rel=1e-15)
    with pytest.raises(TypeError, match="JoinSchedules takes no base_lr"):
        JoinSchedules(o, [StepLR(o, 3)], [], base_lr=0.1)


@pytest.mark.parametrize("make,err,match", [
    (lambda o: OneCycleLR(o, 1.0, 10, base_lr=0.1), TypeError, "OneCycleLR takes no base_lr"),
    (lambda o: StepLR(o, 3, base_lr=-0.1), ValueError, "base_lr must be >= 0"),
    (lambda o: StepLR(o, 3, base_lr=float("inf")), ValueError, "base_lr must be finite"),
    (lambda o: StepLR(o, 3, base_lr="0.1"), ValueError, "base_lr must be a real number"),
    (lambda o: PiecewiseConstant(o, boundaries=[3], values=[0.1, 0.01], base_lr=0.5),
     TypeError, "base_lr= has no effect with values"),
])
def test_a_bad_base_lr_raises_and_changes_nothing(make, err, match: str) -> None:
    o = FakeOpt(BASE)
    with pytest.raises(err, match=match):
        make(o)
    assert o.lr == BASE and o.set_calls == 0


def test_base_lr_is_refused_per_group() -> None:
    opt = mo.SGD(0.1, param_groups=[{"params": ["b"], "learning_rate": 0.02}])
    with pytest.raises(TypeError, match="base_lr= gives one base; acting per parameter group"):
        StepLR(opt, 3, base_lr=0.5, per_group=True)
    assert opt.get_learning_rate() == 0.1


_OK = dict(init_value=0.0, peak_value=0.1, warmup_steps=2, decay_steps=10)


@pytest.mark.parametrize("cycles,match", [
    ([], "at least one cycle"),
    ({"a": 1}, "cosine_kwargs must be a list of dicts"),
    ([_OK, [0.1]], r"cosine_kwargs\[1\] must be a dict"),
    ([_OK, {**_OK, "decay_steps": 2}], r"cosine_kwargs\[1\]\['decay_steps'\] must be an "
                                         r"integer >= 3"),  # optax raises too
    ([{**_OK, "warmup_steps": -1}], r"\['warmup_steps'\] must be an integer >= 0"),
    ([{**_OK, "warmup_steps": 2.5}], r"\['warmup_steps'\] must be an integer"),
    ([_OK, {**_OK, "peak_value": -0.1}], r"cosine_kwargs\[1\]\['peak_value'\] must be >= 0"),
    ([{**_OK, "exponent": float("nan")}], r"\['exponent'\] must be finite"),
    ([{**_OK, "peak_value": 0.0, "end_value": 0.01}], r"\['end_value'\] is 0.01 with "
                                                      r"peak_value 0"),  # optax: stays at 0
    ([{**_OK, "alpha": 0.1}], r"unknown key\(s\) \['alpha'\]"),
    ([{k: v for k, v in _OK.items() if k != "init_value"}],
     r"missing key\(s\) \['init_value'\]"),
])
def test_sgdr_bad_cycles_name_the_key_and_change_nothing(cycles, match: str) -> None:
    o = FakeOpt(BASE)
    with pytest.raises(ValueError, match=match):
        sgdr_schedule(o, cycles)
    assert o.lr == BASE and o.set_calls == 0


class _RefusesTheJoin(FakeOpt):
    """Takes the cycles' first rates, refuses the next one (the join's), then takes any."""

    tries = 0

    def set_learning_rate(self, lr: float) -> None:
        self.tries += 1
        self.refuse = self.tries == len(CYCLES3) + 1
        super().set_learning_rate(lr)


def test_sgdr_refused_rate_puts_the_optimizer_back() -> None:
    o = _RefusesTheJoin(BASE)
    with pytest.raises(ValueError, match="learning_rate refused"):
        sgdr_schedule(o, CYCLES3)
    assert o.lr == BASE
