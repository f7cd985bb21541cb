"""A refused ``MixedPrecisionTrainer.forward`` / ``backward_and_update`` changes nothing.

* ``forward`` cleared the previous forward before checking its inputs: after a refused
  call, ``backward_and_update`` raised "needs a forward() first" (torch keeps its earlier
  graph). A forward that fails after the model's run context also restores its Dropout
  counter.
* ``backward_and_update`` dropped the forward and counted the step (``num_steps``,
  ``last_gradients``) before the optimizer update, which may still raise: the batch could
  not be retried and ``step_scheduler`` would step. Now the counters, the scale, the state
  and the Dropout counter stay; the forward is spent (as torch's backward frees its graph),
  and ``forward`` then ``backward_and_update`` again give an uninterrupted run's result,
  bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import half_backends

import mithril as ml
from mithril.errors import KeyMismatchError
from mithril.utils.mixed_precision import MixedPrecisionTrainer
from mithril.utils.optimizers import Adam


def _model() -> ml.Model:
    m = ml.Model()
    m |= ml.Linear(4)(input="input", output="h")
    m |= ml.Dropout(0.5)(input="h", output="d")
    m |= ml.Linear(2)(input="d", output="out")
    m |= ml.SquaredError()(input="out", target="target", output="se")
    m |= ml.Mean()(input="se", output=ml.IOKey("loss"))
    return m


def _setup(backend) -> tuple:
    c = ml.compile(_model(), backend, shapes={"input": [None, 3]})
    params = {k: backend.array(np.full(tuple(v.shape), 0.3, np.float32))
              for k, v in c.get_parameters().items()}
    opt = Adam(learning_rate=1e-2)
    tr = MixedPrecisionTrainer(c, opt, params, loss_scale=2.0**8)
    rng = np.random.default_rng(0)
    data = {"input": rng.standard_normal((4, 3)).astype(np.float32),
            "target": np.zeros((4, 2), np.float32)}
    return c, opt, tr, data


def _host(tr: MixedPrecisionTrainer) -> dict[str, np.ndarray]:
    b = tr.master_backend
    return {k: np.array(b.to_numpy(v), np.float32) for k, v in tr.master_params.items()}


def _reference(backend) -> dict[str, np.ndarray]:
    """Two uninterrupted steps."""
    c, _, tr, data = _setup(backend)
    for _ in range(2):
        tr.forward(data)
        assert tr.backward_and_update({"loss": 1.0})[2]
    return _host(tr)


@pytest.mark.parametrize("backend", half_backends(), ids=lambda b: b.name)
def test_refused_forward_keeps_the_previous_one(backend) -> None:
    want = _reference(backend)
    c, _, tr, data = _setup(backend)
    tr.forward(data)
    assert tr.backward_and_update({"loss": 1.0})[2]
    tr.forward(data)
    step = c.step
    with pytest.raises(KeyMismatchError, match="target"):
        tr.forward({"input": data["input"]})
    # an engine that fails after the run context was taken: the Dropout counter is restored
    engine_forward = tr._engine.forward

    def failing(*args: object) -> None:
        raise RuntimeError("out of memory")

    tr._engine.forward = failing
    with pytest.raises(RuntimeError, match="out of memory"):
        tr.forward(data)
    tr._engine.forward = engine_forward
    assert c.step == step
    _, _, ok = tr.backward_and_update({"loss": 1.0})  # the earlier, good forward
    assert ok and tr.num_steps == 2
    got = _host(tr)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


@pytest.mark.parametrize("backend", half_backends(), ids=lambda b: b.name)
def test_refused_update_changes_nothing_and_can_be_retried(backend) -> None:
    want = _reference(backend)
    c, opt, tr, data = _setup(backend)
    tr.forward(data)
    assert tr.backward_and_update({"loss": 1.0})[2]
    tr.forward(data)
    before = (_host(tr), tr.state_dict(), tr.optimizer_state.step, c.step, tr.last_gradients)
    opt.nonfinite, opt.learning_rate = "raise", 1e38  # the update would give inf params
    with pytest.raises(FloatingPointError, match="non-finite"):
        tr.backward_and_update({"loss": 1.0})
    after = (_host(tr), tr.state_dict(), tr.optimizer_state.step, c.step, tr.last_gradients)
    for k in before[0]:
        np.testing.assert_array_equal(after[0][k], before[0][k])
    assert after[1:3] == before[1:3] and after[4] is before[4]
    assert tr.num_steps == 1 and tr.num_skipped_steps == 0 and tr.optimizer_state.step == 1
    assert c.step == before[3] - 1  # back to where the spent forward found it
    with pytest.raises(RuntimeError, match="needs a forward"):  # the forward is spent
        tr.backward_and_update({"loss": 1.0})

    class Scheduler:
        steps = 0

        def step(self) -> None:
            self.steps += 1

    opt.nonfinite, opt.learning_rate = "propagate", 1e-2
    tr.forward(data)  # the same batch, again
    _, _, ok = tr.backward_and_update({"loss": 1.0})
    assert ok and tr.num_steps == 2 and tr.optimizer_state.step == 2
    sched = Scheduler()
    assert tr.step_scheduler(sched) and sched.steps == 1
    got = _host(tr)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    with pytest.raises(RuntimeError, match="needs a forward"):  # still one backward per forward
        tr.backward_and_update({"loss": 1.0})
