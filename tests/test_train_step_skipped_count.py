"""The one-program JAX step counts the steps ``nonfinite="skip"`` skipped.

``to_optimizer_state`` reported ``num_skipped == 0`` after skipped steps, where the
separate calls (``optimizer.update``) count each. The program now keeps the count in the
donated state (``opt_state.hyperparams["num_skipped"]``, an int32: nothing is read back
per step), and ``to_optimizer_state`` / ``from_optimizer_state`` carry it.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

pytest.importorskip("jax")

import mithril as ml  # noqa: E402
from mithril.backends import JaxBackend  # noqa: E402
from mithril.utils.optimizers import Adam  # noqa: E402
from mithril.utils.training import make_train_step  # noqa: E402


def _model() -> ml.Model:
    m = ml.Model()
    m |= ml.Linear(2)(input="input", output="out")
    m |= ml.SquaredError()(input="out", target="target", output="se")
    m |= ml.Mean()(input="se", output=ml.IOKey("loss"))
    return m


GOOD = {"input": np.ones((4, 3), np.float32), "target": np.zeros((4, 2), np.float32)}
BAD = {"input": np.full((4, 3), np.inf, np.float32), "target": np.zeros((4, 2), np.float32)}


def _run(fused: bool, batches: list, nonfinite: str = "skip") -> tuple:
    b = JaxBackend()
    c = ml.compile(_model(), b, shapes={"input": [None, 3]})
    step = make_train_step(c, Adam(learning_rate=1e-2, nonfinite=nonfinite), loss="loss")
    p = {k: b.array(np.full(tuple(v.shape), 0.3, np.float32))
         for k, v in c.get_parameters().items()}
    s = step.init(p) if fused else step.optimizer.init(p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the separate calls warn of each skipped step)
        for d in batches:
            p, s, _ = step(p, s, {k: b.array(v) for k, v in d.items()})
    return step, p, s


def test_fused_step_counts_skipped_steps_as_the_separate_calls() -> None:
    import jax

    batches = [GOOD, BAD, GOOD, BAD, BAD, GOOD]
    step, p, s = _run(True, batches)
    assert step.fused and "num_skipped" in s.hyperparams
    got = step.to_optimizer_state(s, p)
    _, p_ref, ref = _run(False, batches)
    assert (got.step, got.num_skipped) == (ref.step, ref.num_skipped) == (3, 3)
    for k in p_ref:
        np.testing.assert_allclose(np.asarray(p[k]), np.asarray(p_ref[k]), rtol=1e-6)
    # the count goes through a checkpoint: from_optimizer_state, then more skipped steps
    s2 = step.from_optimizer_state(got)
    assert int(s2.hyperparams["num_skipped"]) == 3
    with pytest.warns(RuntimeWarning, match="1 step"):  # (the skip, warned a call later)
        p, s2, _ = step(p, s2, BAD)
        jax.block_until_ready(s2)
        p, s2, _ = step(p, s2, GOOD)
    again = step.to_optimizer_state(s2, p)
    assert (again.step, again.num_skipped) == (4, 4)


def test_no_counter_without_skip() -> None:
    step, p, s = _run(True, [GOOD, GOOD], nonfinite="propagate")
    assert "num_skipped" not in s.hyperparams
    got = step.to_optimizer_state(s, p)
    assert (got.step, got.num_skipped) == (2, 0)


def test_fused_step_warns_of_skipped_steps_a_call_later() -> None:
    # update warns of each skipped step; the program cannot, so the next call warns of
    # those it finds counted (reading the count only once the device has it)
    import re

    import jax

    b = JaxBackend()
    c = ml.compile(_model(), b, shapes={"input": [None, 3]})
    step = make_train_step(c, Adam(learning_rate=1e-2, nonfinite="skip"), loss="loss")
    p = {k: b.array(np.full(tuple(v.shape), 0.3, np.float32)) for k, v in c.get_parameters().items()}
    s = step.init(p)
    warned = []
    for d in [GOOD, BAD, GOOD, BAD, BAD, GOOD, GOOD]:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            p, s, _ = step(p, s, {k: b.array(v) for k, v in d.items()})
        jax.block_until_ready(s)
        got = [x for x in w if "skipped" in str(x.message)]
        assert all(x.filename == __file__ and x.category is RuntimeWarning for x in got)
        warned.append(sum(int(re.match(r"Adam: (\d+) step", str(x.message)).group(1)) for x in got))
    assert warned == [0, 0, 1, 0, 1, 1, 0]
