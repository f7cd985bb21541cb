"""MixedPrecisionTrainer with Dropout: each training step draws a new mask (the compiled
model's seed and step counter, as ``evaluate``), the same masks on every backend; a model with
state (BatchNorm) is refused."""

from __future__ import annotations

import numpy as np
import pytest

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
from mithril.errors import KeyMismatchError
from mithril.utils.mixed_precision import MixedPrecisionTrainer
from mithril.utils.optimizers import SGD

BACKENDS = {"numpy": (NumpyBackend, "float16"), "torch": (TorchBackend, "bfloat16"),
            "jax": (JaxBackend, "bfloat16")}


def dropout_model() -> ml.Model:
    m = ml.Model()
    m |= ml.Linear(6)(input="input", output="hidden")
    m |= ml.Dropout(0.5)(input="hidden", output="output")
    return m


def masks(kind: str, steps: int = 3) -> list[np.ndarray]:
    cls, dtype = BACKENDS[kind]
    be = cls(dtype=dtype, seed=3)
    compiled = ml.compile(dropout_model(), be, shapes={"input": [4, 5]})
    params = {k: np.ones(tuple(v.shape), dtype=np.float32)
              for k, v in compiled.get_parameters().items()}
    trainer = MixedPrecisionTrainer(compiled, SGD(learning_rate=0.0), params)
    x = np.ones((4, 5), dtype=np.float32)
    out = []
    for _ in range(steps):
        y = trainer.forward({"input": be.array(x)})["output"]
        trainer.backward_and_update({"output": np.ones((4, 6), dtype=np.float32)})
        out.append(np.asarray(be.to_numpy(y), dtype=np.float32) != 0)
    assert compiled.step == steps
    return out


@pytest.mark.parametrize("kind", list(BACKENDS))
def test_each_step_draws_a_new_mask(kind):
    m = masks(kind)
    assert not np.array_equal(m[0], m[1]) and not np.array_equal(m[1], m[2])
    assert 0.2 < np.mean(m) < 0.8


def test_masks_agree_across_backends_and_with_evaluate():
    ref = masks("numpy")
    for kind in ("torch", "jax"):
        assert all(np.array_equal(a, b) for a, b in zip(ref, masks(kind)))
    be = NumpyBackend(seed=3)
    compiled = ml.compile(dropout_model(), be, shapes={"input": [4, 5]})
    params = {k: np.ones(tuple(v.shape), dtype=np.float32)
              for k, v in compiled.get_parameters().items()}
    y = compiled.evaluate(params, {"input": np.ones((4, 5), dtype=np.float32)}, step=1)
    assert np.array_equal(y["output"] != 0, ref[1])


def test_model_with_state_is_refused():
    m = ml.Model()
    m |= ml.BatchNorm1D(5)(input="input", output="output")
    be = NumpyBackend(dtype="float16")
    compiled = ml.compile(m, be, shapes={"input": [4, 5]})
    trainer = MixedPrecisionTrainer(compiled, SGD(learning_rate=0.1), compiled.get_parameters())
    with pytest.raises(KeyMismatchError, match="state"):
        trainer.forward({"input": be.array(np.ones((4, 5)))})
