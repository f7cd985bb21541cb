"""``--scheduler exponential-decay | polynomial-decay | inverse-time-decay | wsd`` of the CLI:
the CSV ``mithril plot-schedule`` writes equals the scheduler object's rates (built directly,
the CLI's flags as its arguments) exactly, and optax's / Keras's schedule in float64 to
``1e-12``; bad values end with a usage error naming the flag, before anything is written.

The CSV holds the rate each step uses: the optimizer's rate read before the step, ``get_lr_at
(t)`` for ``t = 0 .. steps - 1``, which is the peer's schedule at count ``t`` (optax and Keras
evaluate it before incrementing the count). The references come from one subprocess (JAX's
x64 switch is process-global).
"""

from __future__ import annotations

import csv

import pytest
from conftest import usage_error
from scheduler_parity import assert_rel, peer_schedules

from mithril.cli import main
from mithril.utils.lr_schedulers import (
    WSD,
    ExponentialDecay,
    InverseTimeDecay,
    LinearWarmupScheduler,
    PolynomialDecay,
    SequentialLR,
)
from mithril.utils.optimizers import SGD

LR, STEPS = 0.1, 300

#: name -> (the CLI's flags; the same scheduler built directly on ``o``; the peer at base LR)
CASES = {
    "exp": (["--scheduler", "exponential-decay", "--transition-steps", "40", "--decay-rate",
             "0.5", "--transition-begin", "20", "--staircase", "--end-value", "0.002"],
            lambda o: ExponentialDecay(o, 40, 0.5, 20, True, 0.002),
            "optax.exponential_decay(0.1, 40, 0.5, 20, True, 0.002)"),
    "exp-defaults": (["--scheduler", "exponential-decay"],  # 1% of the lr at the end
                     lambda o: ExponentialDecay(o, STEPS, 0.01),
                     "optax.exponential_decay(0.1, 300, 0.01)"),
    "exp-ceiling-spec": (["--scheduler",
                          "exponential-decay:decay_rate=1.5,transition_steps=50,end_value=0.3"],
                         lambda o: ExponentialDecay(o, 50, 1.5, end_value=0.3),
                         "optax.exponential_decay(0.1, 50, 1.5, end_value=0.3)"),
    "keras-exp-frac": (["--scheduler", "exponential-decay", "--transition-steps", "7.5",
                        "--decay-rate", "0.96"],
                       lambda o: ExponentialDecay(o, 7.5, 0.96),
                       "K.ExponentialDecay(0.1, 7.5, 0.96)"),
    "poly": (["--scheduler", "polynomial-decay", "--transition-steps", "200", "--end-value",
              "0.001", "--power", "2", "--transition-begin", "50"],
             lambda o: PolynomialDecay(o, 200, 0.001, 2.0, 50),
             "optax.polynomial_schedule(0.1, 0.001, 2, 200, 50)"),
    "poly-defaults-begin": (["--scheduler", "polynomial-decay", "--transition-begin", "100"],
                            lambda o: PolynomialDecay(o, 200, 0.0, 1.0, 100),
                            "optax.linear_schedule(0.1, 0.0, 200, 100)"),
    "keras-poly-cycle": (["--scheduler", "polynomial-decay", "--transition-steps", "70",
                          "--end-value", "0.001", "--power", "0.5", "--cycle"],
                         lambda o: PolynomialDecay(o, 70, 0.001, 0.5, cycle=True),
                         "K.PolynomialDecay(0.1, 70, 0.001, 0.5, cycle=True)"),
    "keras-inv-stair": (["--scheduler", "inverse-time-decay", "--decay-steps", "25",
                         "--decay-rate", "0.5", "--staircase"],
                        lambda o: InverseTimeDecay(o, 25, 0.5, True),
                        "K.InverseTimeDecay(0.1, 25, 0.5, staircase=True)"),
    "keras-inv-defaults": (["--scheduler", "inverse-time-decay"],  # T: a tenth of the run
                           lambda o: InverseTimeDecay(o, 30, 1.0),
                           "K.InverseTimeDecay(0.1, 30, 1.0)"),
    "wsd-cosine-warmup": (["--scheduler", "wsd", "--warmup-steps", "30", "--stable-steps", "150",
                           "--decay-type", "cosine", "--final-lr", "0.001", "--exponent", "2"],
                          lambda o: LinearWarmupScheduler(
                              o, 30, 0.0, LR, WSD(o, 0, 150, 120, 0.0, 0.001, "cosine", 2.0)),
                          "optax.join_schedules([optax.linear_schedule(0.0, 0.1, 30), "
                          "optax.constant_schedule(0.1), "
                          "optax.cosine_decay_schedule(0.1, 120, 0.01, 2.0)], [30, 180])"),
    "wsd-defaults": (["--scheduler", "wsd"],  # the last 20% decays, linearly, to 0
                     lambda o: WSD(o, 0, 240, 60),
                     "optax.join_schedules([optax.constant_schedule(0.1), "
                     "optax.linear_schedule(0.1, 0.0, 60)], [240])"),
    "wsd-1-sqrt": (["--scheduler", "wsd:decay_type=1-sqrt,decay_steps=100"],
                   lambda o: WSD(o, 0, 200, 100, decay_type="1-sqrt"),
                   # (no peer has it: Hägele et al.'s formula, in JAX)
                   "lambda t: jnp.where(t < 200, 0.1, "
                   "0.1 * (1 - jnp.sqrt(jnp.clip((t - 200) / 100, 0, 1))))"),
    "sequence": (["--warmup-steps", "20", "--scheduler",
                  "exponential-decay:decay_rate=0.5,transition_steps=30",
                  "polynomial-decay:end_value=0.0", "--switch-at", "150"],
                 lambda o: LinearWarmupScheduler(o, 20, 0.0, LR, SequentialLR(
                     o, [ExponentialDecay(o, 30, 0.5), PolynomialDecay(o, 150, 0.0)], [130])),
                 "optax.join_schedules([optax.linear_schedule(0.0, 0.1, 20), "
                 "optax.exponential_decay(0.1, 30, 0.5), "
                 "optax.polynomial_schedule(0.1, 0.0, 1, 150)], [20, 150])"),
}

@pytest.fixture(scope="module")
def references() -> dict:
    return peer_schedules({k: v[2] for k, v in CASES.items()}, STEPS)


def _plot(tmp_path, name: str, argv: list[str]) -> list[float]:
    png = tmp_path / f"{name}.png"
    assert main(["plot-schedule", *argv, "--steps", str(STEPS), "--lr", str(LR),
                 "--out", str(png)]) == 0
    with open(png.with_suffix(".csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(STEPS))
    return [float(r["lr"]) for r in rows]


@pytest.mark.parametrize("name", list(CASES))
def test_csv_is_the_scheduler_and_the_peer(tmp_path, capsys, name: str, references: dict):
    argv, make, _ = CASES[name]
    got = _plot(tmp_path, name, argv)
    sched = make(SGD(learning_rate=LR))
    assert got == [sched.get_lr_at(t) for t in range(STEPS)]  # (the CSV keeps every digit)
    assert_rel(got, references[name])


def test_train_takes_them(tmp_path, capsys):
    out = tmp_path / "run"
    for spec in ("wsd:decay_type=cosine,final_lr=1e-4", "polynomial-decay:power=2",
                 "exponential-decay", "inverse-time-decay:staircase"):
        assert main(["train", "--dry-run", "--scheduler", spec, "--warmup-steps", "10",
                     "--out", str(out)]) == 0
    assert spec.split(":")[0] in capsys.readouterr().out
    assert not out.exists()


@pytest.mark.parametrize("argv, words", [
    (["--scheduler", "exponential-decay", "--transition-steps", "0"],
     ["transition_steps must be > 0.0, got 0.0 (--transition-steps)"]),
    (["--scheduler", "exponential-decay", "--decay-rate", "0"],
     ["decay_rate must be > 0.0, got 0.0 (--decay-rate)"]),
    (["--scheduler", "exponential-decay", "--end-value", "-0.1"],
     ["end_value must be >= 0.0, got -0.1 (--end-value)"]),
    (["--scheduler", "exponential-decay", "--decay-rate", "10", "--transition-steps", "0.5"],
     ["no valid learning rate at step", "is inf"]),
    (["--scheduler", "exponential-decay", "--decay-rate", "nan"],
     ["argument --decay-rate: must be a finite number"]),
    (["--scheduler", "polynomial-decay", "--power", "-1"],
     ["power must be >= 0.0, got -1.0 (--power)"]),
    (["--scheduler", "polynomial-decay", "--transition-begin", "-1"],
     ["argument --transition-begin: must be between 0 and"]),
    (["--scheduler", "inverse-time-decay", "--decay-steps", "0"],
     ["decay_steps must be > 0.0, got 0.0 (--decay-steps)"]),
    (["--scheduler", "inverse-time-decay", "--decay-rate", "-0.5"],
     ["decay_rate must be >= 0.0, got -0.5 (--decay-rate)"]),
    (["--scheduler", "wsd", "--decay-steps", "12.5"],
     ["decay_steps must be an integer >= 0, got 12.5 (--decay-steps)"]),
    (["--scheduler", "wsd", "--exponent", "-2"], ["exponent must be >= 0.0, got -2.0 (--exponent)"]),
    (["--scheduler", "wsd", "--final-lr", "-0.1"], ["final_lr must be >= 0.0, got -0.1 (--final-lr)"]),
    (["--scheduler", "wsd", "--decay-type", "cubic"], ["argument --decay-type: invalid choice"]),
    (["--scheduler", "wsd:decay_type=cubic"], ["decay_type='cubic'; choose from linear, cosine"]),
    (["--scheduler", "wsd", "--staircase"], ["--staircase does not apply to --scheduler wsd",
                                             "wsd takes --stable-steps, --decay-steps"]),
    (["--scheduler", "exponential-decay:power=2"],
     ["power is not a setting of scheduler exponential-decay"]),
])
def test_bad_values_name_the_flag_and_write_nothing(tmp_path, capsys, argv, words):
    out = tmp_path / "never"
    err = usage_error(capsys, ["plot-schedule", *argv, "--steps", str(STEPS),
                               "--out", str(out / "x.png")])
    for w in words:
        assert w in err
    assert not out.exists()
