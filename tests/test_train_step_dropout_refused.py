"""make_train_step: a refused call does not run the model, nor move its Dropout counter.

The separate calls (NumPy, torch, JAX with an ``OptimizerState``) checked the optimizer
state only inside ``optimizer.update``, after ``evaluate`` had run the model and advanced
``compiled.step``; the one-program JAX step advanced it before the program refused a
wrong ``OptaxState``. Every later step then drew other Dropout masks than a run that never
saw the bad call. Here, after one good step, each bad call raises a library error, leaves
``compiled.step`` as it was, and the next good step equals the uninterrupted run's, bit
for bit.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
from mithril.errors import ShapeError
from mithril.utils.optimizers import SGD, Adam
from mithril.utils.training import make_train_step

BACKENDS = {"numpy": NumpyBackend, "torch": TorchBackend, "jax": JaxBackend}


def _model() -> ml.Model:
    m = ml.Model()
    m |= ml.Linear(4)(input="input", output="h")
    m |= ml.Dropout(0.5)(input="h", output="d")
    m |= ml.Linear(1)(input="d", output="out")
    m |= ml.SquaredError()(input="out", target="target", output="se")
    m |= ml.Mean()(input="se", output=ml.IOKey("loss"))
    return m


def _data(inf: bool = False) -> dict[str, np.ndarray]:
    x = np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32)
    if inf:
        x[0, 0] = np.inf
    return {"input": x, "target": np.zeros((8, 1), np.float32)}


def _run(backend: str, fused: bool, bad: Any = None, nonfinite: str = "propagate") -> tuple:
    """Three good steps, with ``bad(step, c, params)`` (a refused call) after the first;
    returns the final params (host) and ``compiled.step`` seen around the bad call."""
    b = BACKENDS[backend]()
    c = ml.compile(_model(), b, shapes={"input": [None, 3]})
    step = make_train_step(c, Adam(learning_rate=1e-2, nonfinite=nonfinite), loss="loss")
    p = {k: b.array(np.full(tuple(v.shape), 0.3, np.float32))
         for k, v in c.get_parameters().items()}
    s = step.init(p) if fused else step.optimizer.init(p)
    data = _data()
    p, s, _ = step(p, s, data)
    around = None
    if bad is not None:
        before = c.step
        bad(step, c, p, s)
        around = (before, c.step)
    for _ in range(2):
        p, s, _ = step(p, s, data)
    return {k: np.array(b.to_numpy(v)) for k, v in p.items()}, around


def _wrong_optimizer(step: Any, c: Any, p: dict, s: Any) -> None:
    other = make_train_step(c, SGD(learning_rate=0.1, momentum=0.9), loss="loss")
    with pytest.raises(ValueError, match=r"SGD|\['momentum'\]"):
        step(p, other.init(p) if step.fused else other.optimizer.init(p), _data())


def _other_shapes(step: Any, c: Any, p: dict, s: Any) -> None:
    c5 = ml.compile(_model(), c.backend, shapes={"input": [None, 5]})
    other = make_train_step(c5, Adam(learning_rate=1e-2), loss="loss")
    p5 = c5.get_parameters()
    wrong = other.init(p5) if step.fused else other.optimizer.init(p5)
    with pytest.raises((ValueError, ShapeError), match="linear_0.weight"):
        step(p, wrong, _data())


def _inf_input(step: Any, c: Any, p: dict, s: Any) -> None:
    with pytest.raises(FloatingPointError):
        step(p, s, _data(inf=True))


def _numpy_params(step: Any, c: Any, p: dict, s: Any) -> None:
    host = {k: np.array(c.backend.to_numpy(v)) for k, v in p.items()}
    with pytest.raises(TypeError, match=r"params\['linear_0.*must be a torch array.*ndarray"):
        step(host, s, _data())


CASES = [(be, fused, bad) for be in BACKENDS for fused in ((False, True) if be == "jax" else
                                                           (False,))
         for bad in (_wrong_optimizer, _other_shapes)]


@pytest.mark.parametrize("backend, fused, bad", CASES,
                         ids=lambda v: getattr(v, "__name__", str(v)).strip("_"))
def test_refused_state_leaves_the_dropout_counter(backend: str, fused: bool, bad: Any) -> None:
    want, _ = _run(backend, fused)
    got, (before, after) = _run(backend, fused, bad)
    assert after == before == 1
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_nonfinite_raise_leaves_the_dropout_counter(backend: str) -> None:
    want, _ = _run(backend, False, nonfinite="raise")
    with np.errstate(invalid="ignore"):  # (NumPy's forward of the inf input: inf * 0)
        got, (before, after) = _run(backend, False, _inf_input, nonfinite="raise")
    assert after == before == 1
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_numpy_params_on_torch_refused_before_the_model_runs() -> None:
    want, _ = _run("torch", False)
    got, (before, after) = _run("torch", False, _numpy_params)
    assert after == before == 1
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
