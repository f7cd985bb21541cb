"""A LossScaler backed off to 0.0 round-trips through its state dict, and torch's
``GradScaler.state_dict()`` loads.

With GradScaler's defaults (2**16, backoff 0.5) ~165 non-finite steps in a row take the
float32 scale through the subnormals to exactly 0.0, as torch's does; ``load_state_dict``
refused that very dict ("must be positive"), and the torch engine divided by it
(``ZeroDivisionError``). torch's ``GradScaler.load_state_dict`` takes 0.0, and at scale 0
every step is skipped (inv_scale inf, the gradients NaN)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import half_backends

import mithril as ml
from mithril.utils.mixed_precision import LossScaler, MixedPrecisionTrainer
from mithril.utils.optimizers import SGD


def _backed_off_to_zero() -> LossScaler:
    s = LossScaler()  # GradScaler's defaults
    steps = 0
    while s.scale > 0:
        s.update(True)
        steps += 1
    # 2**16 * 0.5**k reaches float32's smallest subnormal 2**-149 at k = 165, then 0
    assert steps == 166
    return s


def test_scale_zero_state_dict_round_trips() -> None:
    s = _backed_off_to_zero()
    sd = s.state_dict()
    assert sd["scale"] == 0.0
    t = LossScaler(8.0)
    t.load_state_dict(sd)
    assert t.state_dict() == sd and t.scale == 0.0
    t.update(True)
    assert t.scale == 0.0  # 0 * backoff, as torch
    # the trainer's state dict as well
    np_b = ml.backends.NumpyBackend(dtype="float16")
    m = ml.Model()
    m |= ml.Linear(2)(input="input", output=ml.IOKey("out"))
    c = ml.compile(m, np_b, shapes={"input": [None, 3]})
    tr = MixedPrecisionTrainer(c, SGD(learning_rate=0.1), c.get_parameters())
    tr.load_state_dict({"scaler": sd, "num_steps": 166, "num_skipped_steps": 166})
    assert tr.loss_scale == 0.0 and tr.state_dict()["scaler"] == sd


def test_constructor_still_refuses_scale_zero() -> None:
    with pytest.raises(ValueError, match="init_scale must be positive"):
        LossScaler(0.0)
    with pytest.raises(ValueError, match="'scale' must be finite and >= 0"):
        LossScaler().load_state_dict({**LossScaler().state_dict(), "scale": -0.5})
    with pytest.raises(ValueError, match="must not round to 0"):  # (positive, underflows)
        LossScaler().load_state_dict({**LossScaler().state_dict(), "scale": 1e-50})


@pytest.mark.parametrize("backend", half_backends(), ids=lambda b: b.name)
def test_training_at_scale_zero_skips_every_step(backend) -> None:
    m = ml.Model()
    m |= ml.Linear(2)(input="input", output=ml.IOKey("out"))
    c = ml.compile(m, backend, shapes={"input": [None, 3]})
    tr = MixedPrecisionTrainer(c, SGD(learning_rate=0.1), c.get_parameters())
    before = {k: np.asarray(backend.to_numpy(v), np.float32) for k, v in tr.master_params.items()}
    tr.scaler.load_state_dict(_backed_off_to_zero().state_dict())
    tr.forward({"input": np.ones((2, 3), np.float32)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no divide-by-zero warning either)
        _, _, ok = tr.backward_and_update({"out": np.ones((2, 2), np.float32)})
    assert not ok and tr.loss_scale == 0.0
    assert (tr.num_steps, tr.num_skipped_steps) == (1, 1)
    for k, v in tr.master_params.items():
        np.testing.assert_array_equal(np.asarray(backend.to_numpy(v), np.float32), before[k])


def test_torch_gradscaler_state_dict_loads() -> None:
    torch = pytest.importorskip("torch")
    gs = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_factor=3.0, backoff_factor=0.25,
                              growth_interval=7)
    d = {"scale": 512.0, "growth_factor": 3.0, "backoff_factor": 0.25, "growth_interval": 7,
         "_growth_tracker": 4}
    gs.load_state_dict(d)  # (torch's own keys, as its state_dict() gives them once used)
    s = LossScaler()
    s.load_state_dict(d)
    assert s.state_dict() == {"scale": 512.0, "growth_factor": 3.0, "backoff_factor": 0.25,
                              "growth_interval": 7, "dynamic": True, "growth_tracker": 4,
                              "_growth_tracker": 4}
    for _ in range(3):  # three finite steps: the tracker reaches 7, the scale grows
        s.update(False)
    assert s.scale == 1536.0 and s.growth_tracker == 0
    before = s.state_dict()
    with pytest.raises(ValueError, match="'growth_tracker' = 1 and torch's '_growth_tracker' = 2"):
        s.load_state_dict({**d, "growth_tracker": 1, "_growth_tracker": 2})
    with pytest.raises(ValueError, match="'_growth_tracker' must be < "):
        s.load_state_dict({**d, "_growth_tracker": 7})
    assert s.state_dict() == before
    s.load_state_dict({**d, "growth_tracker": 4})  # both, agreeing
    assert s.growth_tracker == 4
    s.load_state_dict(gs.state_dict())  # what torch's state_dict() gives
    assert (s.scale, s.growth_factor, s.growth_interval, s.growth_tracker) == (512.0, 3.0, 7, 4)
