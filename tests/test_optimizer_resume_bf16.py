"""A JAX bfloat16 optimizer state round-trips through ``state_dict`` / ``load_state_dict``.

``state_dict`` gives the slots as NumPy arrays of ml_dtypes' ``bfloat16`` (dtype kind 'V'
to NumPy); ``load_state_dict`` took only kinds 'f', 'i', 'u' and refused them, which also
broke ``MixedPrecisionTrainer(model, opt, params, stepped_bf16_state)`` on JAX (the stepped
state is carried to the float32 masters through that round trip)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("jax")
ml_dtypes = pytest.importorskip("ml_dtypes")

import mithril as ml  # noqa: E402
from mithril.backends import JaxBackend  # noqa: E402
from mithril.utils.mixed_precision import MixedPrecisionTrainer  # noqa: E402
from mithril.utils.optimizers import Adam  # noqa: E402


def _stepped(b: JaxBackend) -> tuple:
    params = {"w": b.array(np.ones((2, 3), np.float32))}
    opt = Adam(learning_rate=1e-2)
    state = opt.init(params)
    grads = {"w": b.array(np.full((2, 3), 0.5, np.float32))}
    params, state = opt.update(params, grads, state)
    return opt, params, state


def test_bfloat16_state_dict_round_trips() -> None:
    b = JaxBackend(dtype="bfloat16")
    opt, params, state = _stepped(b)
    sd = opt.state_dict(state)
    assert sd["slots"]["m"]["w"].dtype == np.dtype(ml_dtypes.bfloat16)
    restored = opt.load_state_dict(sd, params)
    assert restored.step == 1
    for s in ("m", "v"):
        got = np.asarray(restored.slot(s)["w"], np.float32)
        want = np.asarray(state.slot(s)["w"], np.float32)
        np.testing.assert_array_equal(got, want)
    # Adam's first moment after one step of g = 0.5: (1 - 0.9) * 0.5
    np.testing.assert_allclose(np.asarray(restored.slot("m")["w"], np.float32), 0.05, rtol=1e-2)
    # the restored state goes on as the original does
    g = {"w": b.array(np.full((2, 3), -0.25, np.float32))}
    p1, _ = opt.update({"w": b.array(np.asarray(params["w"]))}, g, state)
    p2, _ = opt.update({"w": b.array(np.asarray(params["w"]))}, g, restored)
    np.testing.assert_array_equal(np.asarray(p1["w"], np.float32), np.asarray(p2["w"], np.float32))


def test_ml_dtypes_integer_slot_still_refused() -> None:
    b = JaxBackend(dtype="bfloat16")
    opt, params, state = _stepped(b)
    sd = opt.state_dict(state)
    sd["slots"]["m"]["w"] = np.zeros((2, 3), ml_dtypes.int4)
    with pytest.raises(TypeError, match="slot 'm' of 'w' is not numeric"):
        opt.load_state_dict(sd, params)


def test_mixed_precision_trainer_takes_a_stepped_bfloat16_state() -> None:
    m = ml.Model()
    m |= ml.Linear(2)(input="input", output="out")
    m |= ml.SquaredError()(input="out", target="target", output="se")
    m |= ml.Mean()(input="se", output=ml.IOKey("loss"))
    b = JaxBackend(dtype="bfloat16")
    c = ml.compile(m, b, shapes={"input": [None, 3]})
    params = c.get_parameters()
    opt = Adam(learning_rate=1e-2)
    state = opt.init(params)
    grads = {k: b.array(np.full(v.shape, 0.1, np.float32)) for k, v in params.items()}
    params, state = opt.update(params, grads, state)
    trainer = MixedPrecisionTrainer(c, opt, params, state)
    carried = trainer.optimizer_state
    assert carried.step == 1 and carried.layout.dtype == "float32"
    for k in params:  # the bfloat16 slots, exactly, now in float32: (1 - 0.9) * 0.1
        np.testing.assert_array_equal(np.asarray(carried.slot("m")[k]),
                                      np.asarray(state.slot("m")[k], np.float32))
        np.testing.assert_allclose(np.asarray(carried.slot("m")[k]), 0.01, rtol=1e-2)
