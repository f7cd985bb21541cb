"""SAM / ASAM in the one-program JAX train step (:mod:`mithril.utils.train_step_sam`): the
gradient at the perturbed point is a second forward+VJP inside the program. Before, SAM's
step on JAX was the separate calls (``SAM.update`` with the model as its closure), which
each case here runs beside it on the same batches: params, state and losses to float32
rounding."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("jax")

from test_train_step_outer_wrappers import (  # noqa: E402
    _close,
    _problem,
    _run,
    _same_states,
    two_heads_alternately,
)

import mithril as ml  # noqa: E402
from mithril.backends import JaxBackend  # noqa: E402
from mithril.utils import optimizers as o  # noqa: E402
from mithril.utils.optimizers.state import OptimizerState  # noqa: E402
from mithril.utils.training import make_train_step  # noqa: E402

CASES = {
    "sam_sgd": lambda: o.SAM(o.SGD(learning_rate=0.1, momentum=0.9), rho=0.1),
    "sam_adam": lambda: o.SAM(o.Adam(learning_rate=1e-2)),
    "asam_adamw_groups_clip": lambda: o.SAM(o.AdamW(
        learning_rate=1e-2, clip_norm=0.5,
        param_groups=[{"params": "bias", "lr_scale": 0.5, "weight_decay": 0.0}]),
        rho=0.5, adaptive=True),
    "sam_lamb_eps0": lambda: o.SAM(o.LAMB(learning_rate=1e-2), eps=0.0),
    "sam_mechanize": lambda: o.SAM(o.Mechanize(o.Adam(learning_rate=1.0), s_init=1e-3)),
    "sam_adafactor": lambda: o.SAM(o.Adafactor(learning_rate=1e-2)),
}


@pytest.mark.parametrize("name", CASES)
def test_one_program_equals_the_separate_calls(name: str) -> None:
    c, be, batches = _problem()
    _, want, want_state, want_losses = _run(c, CASES[name](), batches, fused=False)
    assert isinstance(want_state, OptimizerState) and want_state.kind == "SAM"
    step, got, state, losses = _run(c, CASES[name](), batches, fused=True)
    assert step.fused and type(state).__name__ == "OptaxState"
    assert step.rebuilds == 0 and step._jitted._cache_size() == 1
    np.testing.assert_allclose(losses, want_losses, rtol=2e-6, atol=2e-6)
    _close(got, want)
    _same_states(step.to_optimizer_state(state, got), want_state)


def test_the_second_gradient_is_taken() -> None:
    """Against the base optimizer's own one-program step: SAM moves the params elsewhere
    (rho large), so the program does not just step with the first gradient."""
    c, be, batches = _problem()
    _, plain, _, _ = _run(c, o.SGD(learning_rate=0.1), batches[:1], fused=True)
    _, sam, _, _ = _run(c, o.SAM(o.SGD(learning_rate=0.1), rho=1.0), batches[:1], fused=True)
    assert max(float(np.abs(np.asarray(sam[n]) - np.asarray(plain[n])).max())
               for n in plain) > 1e-3


def test_rho_change_rebuilds_and_is_taken() -> None:
    c, be, batches = _problem()

    def between(opt, i: int) -> None:
        if i == 2:
            opt.rho = 0.3

    def make():
        return o.SAM(o.Adam(learning_rate=1e-2), rho=0.05)

    _, want, want_state, _ = _run(c, make(), batches, fused=False, between=between)
    step, got, state, _ = _run(c, make(), batches, fused=True, between=between)
    assert step.fused and step.rebuilds == 1
    _close(got, want)
    _same_states(step.to_optimizer_state(state, got), want_state)


def test_params_the_loss_does_not_reach_are_not_perturbed() -> None:
    """Two heads trained by turns: the unreached head is not perturbed, not in ‖g‖, and
    the base leaves it out (a missed step counted), in the program as in the separate
    calls."""
    two_heads_alternately(lambda: o.SAM(o.AdamW(learning_rate=1e-2, weight_decay=0.1),
                                        rho=0.2))


def test_dropout_and_loss_aware_bases_keep_the_separate_calls() -> None:
    """A Dropout draws a mask per evaluation (the closure's second one its own), and a
    loss-aware base needs a loss SAM does not give it: both stay the separate calls."""
    m = ml.Model()
    m |= ml.Linear(4)(input="input", output="h")
    m |= ml.Dropout(0.5)(input="h", output="d")
    m |= ml.Mean()(input="d", output=ml.IOKey("loss"))
    c = ml.compile(m, JaxBackend(), shapes={"input": [2, 3]})
    assert not make_train_step(c, o.SAM(o.SGD(learning_rate=0.1)), loss="loss").fused
    assert make_train_step(c, o.SGD(learning_rate=0.1), loss="loss").fused
    c2, _, _ = _problem()
    assert not make_train_step(c2, o.SAM(o.PolyakSGD()), loss="loss").fused


#: the wrappers the sharded step is checked with (here, and on two devices:
#: tests/jax_wrappers_worker.py)
SHARDED = {"sam": lambda: o.SAM(o.Adam(learning_rate=1e-2), rho=0.1),
           "asam": lambda: o.SAM(o.SGD(learning_rate=0.1, momentum=0.9), adaptive=True),
           "dp": lambda: o.DPSGD(0.1, noise_multiplier=0.5, seed=3),
           "mechanize": lambda: o.Mechanize(o.Adam(learning_rate=1.0), s_init=1e-3),
           "schedule_free": lambda: o.ScheduleFree(o.Adam(learning_rate=1e-2, beta1=0.0))}


def sharded_equals_separate(make, devices: int, shard: bool, tol: float = 2e-6) -> bool:
    """Three steps of ``make_sharded_train_step`` on ``devices`` against the separate calls
    in one process, to ``tol``; whether the batch was split over the devices."""
    from mithril.distributed.jax_parallel import make_sharded_train_step

    c, be, batches = _problem()
    _, want, want_state, _ = _run(c, make(), batches[:3], fused=False)
    step = make_sharded_train_step(c, make(), loss="loss", devices=devices, shard_state=shard)
    params = c.get_parameters()
    state = step.init(params)
    for data in batches[:3]:
        params, state, _ = step(params, state, data)
    _close(params, want, tol)
    _same_states(step.to_optimizer_state(state, params), want_state, tol)
    return bool(step.last_batch_sharded)


@pytest.mark.parametrize("name", SHARDED)
def test_sharded_step_takes_them_as_the_plain_step(name: str) -> None:
    """``make_sharded_train_step`` (one device here, the state sharded: padded flat slots)
    runs the same program as the plain step: SAM's second gradient and DP-SGD's
    per-example ones included (it ran their base's update alone, or refused them)."""
    sharded_equals_separate(SHARDED[name], 1, True)


def test_sharded_step_refuses_what_the_plain_step_runs_separately() -> None:
    from mithril.distributed.jax_parallel import make_sharded_train_step

    m = ml.Model()
    m |= ml.Linear(4)(input="input", output="h")
    m |= ml.Dropout(0.5)(input="h", output="d")
    m |= ml.Mean()(input="d", output=ml.IOKey("loss"))
    c = ml.compile(m, JaxBackend(), shapes={"input": [2, 3]})
    with pytest.raises(TypeError, match="SAM's step cannot be one program"):
        make_sharded_train_step(c, o.SAM(o.SGD(learning_rate=0.1)), loss="loss", devices=1)
    c2, _, _ = _problem()
    with pytest.raises(TypeError, match="Mechanize's step cannot be one program"):
        make_sharded_train_step(c2, o.Mechanize(o.DPSGD()), loss="loss", devices=1)


@pytest.mark.slow
def test_sharded_on_two_devices() -> None:
    """Two CPU devices (a process of its own): the batch split over them, replicated and
    sharded state, SAM / DP-SGD / Mechanize / ScheduleFree equal to one process's separate
    calls to 5e-6 (tests/jax_wrappers_worker.py)."""
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    out = subprocess.run([sys.executable, os.path.join(here, "jax_wrappers_worker.py")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count(" ok") == 8, out.stdout


def test_sharded_step_refuses_a_wrapper_over_a_loss_aware_base() -> None:
    """Mechanize hands its base no loss: the plain step takes the separate calls (which
    refuse it), the sharded one refuses it when made (it failed on a missing attribute)."""
    from mithril.distributed.jax_parallel import make_sharded_train_step

    c, _, _ = _problem()
    with pytest.raises(TypeError, match="Mechanize's step cannot be one program"):
        make_sharded_train_step(c, o.Mechanize(o.PolyakSGD()), loss="loss", devices=1)
