"""The one-program JAX step counts the non-finite steps it applies, as ``optimizer.update``
counts them in ``state.num_nonfinite`` (a non-finite gradient each time; params or state
made non-finite once, until a step leaves them finite again), under ``nonfinite=
"propagate"`` and for the steps ``max_consecutive_skips`` forces. Before, its
``to_optimizer_state`` gave 0 where the separate calls gave the real count. The program
keeps the count in the donated state (``hyperparams["num_nonfinite"]``: nothing read back
per step); ``from_optimizer_state`` / ``to_optimizer_state`` carry it.
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

GOOD = {"input": np.ones((4, 3), np.float32), "target": np.zeros((4, 2), np.float32)}
BAD = {"input": np.full((4, 3), np.inf, np.float32), "target": GOOD["target"]}
#: a finite step, then 2 non-finite gradients (NaN params after: every later gradient is
#: NaN too, each counted)
BATCHES = [GOOD, BAD, BAD, GOOD, GOOD, BAD, GOOD]


def _step(fused: bool, **kw: object) -> tuple:
    b = JaxBackend()
    m = ml.Model()
    m |= ml.Linear(2)(input="input", output="out")
    m |= ml.SquaredError()(input="out", target="target", output="se")
    m |= ml.Mean()(input="se", output=ml.IOKey("loss"))
    c = ml.compile(m, b, shapes={"input": [None, 3]})
    step = make_train_step(c, Adam(1e-2, **kw), loss="loss")
    p = {k: b.array(np.full(tuple(v.shape), 0.3, np.float32))
         for k, v in c.get_parameters().items()}
    return b, step, p, (step.init(p) if fused else step.optimizer.init(p))


def _run(b, step, p, s, batches) -> tuple:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for d in batches:
            p, s, _ = step(p, s, {k: b.array(v) for k, v in d.items()})
    return p, s


@pytest.mark.parametrize("kw", [{}, {"nonfinite": "skip", "max_consecutive_skips": 1}],
                         ids=["propagate", "given_up"])
def test_fused_counts_nonfinite_steps_as_update(kw: dict) -> None:
    b, step, p, s = _step(False, **kw)
    _, plain = _run(b, step, p, s, BATCHES)
    b, step, p, s = _step(True, **kw)
    assert step.fused
    p, s = _run(b, step, p, s, BATCHES)
    got = step.to_optimizer_state(s, p)
    assert plain.num_nonfinite > 0
    assert (got.num_nonfinite, got.nonfinite_values, got.step, got.num_skipped) == (
        plain.num_nonfinite, plain.nonfinite_values, plain.step, plain.num_skipped)


def test_propagate_count_is_six() -> None:
    b, step, p, s = _step(True)
    p, s = _run(b, step, p, s, BATCHES)
    assert int(s.hyperparams["num_nonfinite"]) == 6  # every step after the first
    assert step.to_optimizer_state(s, p).num_nonfinite == 6


def test_count_resumes_through_from_optimizer_state() -> None:
    """Half the run by the separate calls, the rest in the program from the converted
    state (the count and whether the values are non-finite carried over): the same count as
    all of it by the separate calls."""
    b, step, p, s = _step(False)
    _, plain = _run(b, step, p, s, BATCHES)
    b, step, p, s = _step(False)
    p, s = _run(b, step, p, s, BATCHES[:4])
    assert s.num_nonfinite == 3 and s.nonfinite_values
    fs = step.from_optimizer_state(s)
    assert int(fs.hyperparams["num_nonfinite"]) == 3 and bool(fs.hyperparams["nonfinite_values"])
    p, fs = _run(b, step, p, fs, BATCHES[4:])
    got = step.to_optimizer_state(fs, p)
    assert (got.num_nonfinite, got.nonfinite_values) == (plain.num_nonfinite,
                                                         plain.nonfinite_values)


def test_unchecked_counts_nothing() -> None:
    """``"unchecked"`` looks at nothing (as ``update``): no counter in the state."""
    b, step, p, s = _step(True, nonfinite="unchecked")
    assert "num_nonfinite" not in s.hyperparams
    p, s = _run(b, step, p, s, BATCHES)
    assert step.to_optimizer_state(s, p).num_nonfinite == 0


def test_values_made_nonfinite_count_once() -> None:
    """Finite gradients (the loss is linear in the params) with a learning rate that
    overflows the params: counted once, at the step that made them inf, as ``update``
    counts it, whatever the steps after do (still inf)."""
    from mithril.utils.optimizers import SGD

    got = []
    for fused in (False, True):
        b = JaxBackend()
        m = ml.Model()
        m |= ml.Linear(2)(input="input", output="out")
        m |= ml.Mean()(input="out", output=ml.IOKey("loss"))
        c = ml.compile(m, b, shapes={"input": [None, 3]})
        step = make_train_step(c, SGD(1e38), loss="loss")
        p = {k: b.array(np.full(tuple(v.shape), 0.3, np.float32))
             for k, v in c.get_parameters().items()}
        s = step.init(p) if fused else step.optimizer.init(p)
        assert step.fused
        p, s = _run(b, step, p, s, [{"input": GOOD["input"]}] * 8)
        st = step.to_optimizer_state(s, p)
        assert not all(np.isfinite(np.asarray(v)).all() for v in p.values())
        got.append((st.num_nonfinite, st.nonfinite_values, st.step))
    assert got[0] == got[1] == (1, True, 8)
