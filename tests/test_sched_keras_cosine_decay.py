"""Keras's ``CosineDecay`` (with and without its linear warm-up to ``warmup_target``) written
as :class:`WSD`, as ``docs/optimizers.md`` maps it: ``CosineDecay(init, D, alpha,
warmup_target=peak, warmup_steps=W)`` is ``WSD(opt, W, 0, D, init, alpha * peak, "cosine")``
on an optimizer at ``peak`` (no warm-up: ``WSD(opt, 0, 0, D, final_lr=alpha * init,
decay_type="cosine")`` at ``init``). Keras 3 on JAX in float64 (its cosine computed in
float64), every step past the end, and resumed mid-warm-up and mid-decay: ``1e-12`` relative.
"""

from __future__ import annotations

import json

import pytest
from scheduler_parity import FakeOpt, assert_rel, our_lrs, peer_schedules

from mithril.utils.lr_schedulers import WSD

N = 130
B = 0.1

#: name -> (optimizer's rate, our WSD arguments, Keras's schedule)
CASES: dict[str, tuple[float, tuple, str]] = {
    "no-warmup": (B, (0, 0, 100, 0.0, 0.0, "cosine"), "K.CosineDecay(0.1, 100)"),
    "no-warmup-alpha": (B, (0, 0, 100, 0.0, 0.1 * B, "cosine"),
                        "K.CosineDecay(0.1, 100, alpha=0.1)"),
    "warmup": (B, (20, 0, 80, 0.001, 0.05 * B, "cosine"),
               "K.CosineDecay(0.001, 80, alpha=0.05, warmup_target=0.1, warmup_steps=20)"),
    "warmup-from-zero": (B, (30, 0, 60, 0.0, 0.0, "cosine"),
                         "K.CosineDecay(0.0, 60, warmup_target=0.1, warmup_steps=30)"),
    "warm-down": (B, (10, 0, 50, 0.3, 0.0, "cosine"),
                  "K.CosineDecay(0.3, 50, warmup_target=0.1, warmup_steps=10)"),
    "one-step-each": (0.05, (1, 0, 1, 0.01, 0.2 * 0.05, "cosine"),
                      "K.CosineDecay(0.01, 1, alpha=0.2, warmup_target=0.05, warmup_steps=1)"),
}


@pytest.fixture(scope="module")
def references() -> dict[str, list[float]]:
    return peer_schedules({k: v[2] for k, v in CASES.items()}, N + 1)


@pytest.mark.parametrize("name", list(CASES))
def test_wsd_is_keras_cosine_decay(name: str, references: dict) -> None:
    lr, args, _ = CASES[name]
    got = our_lrs(lambda o: WSD(o, *args), lr, N, closed_form=True)
    assert_rel(got, references[name])
    assert len(set(got)) > 2  # (a schedule, not a constant)


@pytest.mark.parametrize("name", ["warmup", "warm-down"])
@pytest.mark.parametrize("at", [5, 25, 95])
def test_resumed_mid_run_goes_on_as_keras(name: str, at: int, references: dict) -> None:
    lr, args, _ = CASES[name]
    opt = FakeOpt(lr)
    sched = WSD(opt, *args)
    for _ in range(at):
        sched.step()
    saved = json.loads(json.dumps(sched.state_dict(), allow_nan=False))
    opt = FakeOpt(0.7)  # another rate and other arguments: the saved ones win
    resumed = WSD(opt, 3, 4, 5)
    resumed.load_state_dict(saved)
    got = [opt.lr]
    for _ in range(N - at):
        resumed.step()
        got.append(opt.lr)
    assert_rel(got, references[name][at:])
