"""make_train_step: a step that raises changes nothing (issue #16 with the library's rule).

On each backend, after one good step, every bad call below must raise a library error
naming what is wrong (the data key, the parameter, the state's slot or optimizer), and
leave the params, the optimizer state and the step counter bitwise as they were. On JAX
the one-program step donates the params and state it made: a refused call must not have
run the program (a donated buffer would be gone, and the snapshot could not be read). The
next good step must then give exactly what a run that never saw the bad calls gives.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
from mithril.cli.networks import mlp_spec
from mithril.utils.optimizers import LBFGS, SGD, Adam, Muon
from mithril.utils.optimizers.state import OptimizerState
from mithril.utils.training import make_train_step

BACKENDS = {"numpy": NumpyBackend, "torch": TorchBackend, "jax": JaxBackend}
OPTIMIZERS = {"adam": lambda: Adam(learning_rate=1e-2),
              "muon": lambda: Muon(learning_rate=1e-2),  # tensorwise: its own JAX program
              "lbfgs": lambda: LBFGS(learning_rate=0.5, max_iter=3)}  # the model as closure


def compiled_mlp(backend: str, hidden: list[int]) -> Any:
    """The MLP, compiled once per backend and shape for the module (its evaluate jitted
    once); callers that update params take copies (``fresh_params``)."""
    return _compiled_mlp(backend, tuple(hidden))


@functools.cache
def _compiled_mlp(backend: str, hidden: tuple[int, ...]) -> Any:
    spec = mlp_spec(8, 4, list(hidden))
    return ml.compile(spec.model, BACKENDS[backend](dtype="float32", seed=0), shapes=spec.shapes)


def batches(be: Any) -> list[dict]:
    rng = np.random.default_rng(1)
    return [{"input": be.array(rng.standard_normal((32, 8)).astype(np.float32)),
             "target": be.array(rng.integers(0, 4, 32), be.int_dtype)} for _ in range(2)]


def snapshot(be: Any, params: dict, state: Any) -> dict[str, np.ndarray]:
    """Host copies of every parameter and every state array (reading a donated JAX buffer
    raises)."""
    out = {f"p:{k}": np.array(be.to_numpy(v)) for k, v in params.items()}
    if isinstance(state, OptimizerState):
        out.update({f"s:{k}": np.array(state.engine.to_numpy(v)) for k, v in state.slots.items()})
        out["step"] = np.array(state.step)
    else:  # the JAX step's OptaxState (a pytree)
        import jax

        leaves = jax.tree_util.tree_leaves_with_path(state)
        out.update({f"s:{jax.tree_util.keystr(p)}": np.array(x) for p, x in leaves})
    return out


def bad_calls(backend: str, be: Any, good: dict, opt_name: str
              ) -> dict[str, tuple[Callable[[dict, Any], tuple], type, str]]:
    """name: (params, state -> the bad (params, state, data)), the error, its message."""
    n = len(np.asarray(be.to_numpy(good["target"])))
    x, y = good["input"], good["target"]
    other_opt = (SGD(learning_rate=0.1, momentum=0.9) if opt_name == "adam" else
                 Adam(learning_rate=1e-2))
    wider, deeper = [16, 13], [16, 12, 12]  # the same keys with one other shape; other keys

    def state_of(hidden: list[int], opt: Any) -> Any:
        compiled = compiled_mlp(backend, hidden)
        return make_train_step(compiled, opt, loss="loss").init(compiled.get_parameters())

    fresh = OPTIMIZERS[opt_name]
    return {
        "data without a key": (lambda p, s: (p, s, {"input": x}),
                               ml.KeyMismatchError, "target"),
        "data with an unknown key": (lambda p, s: (p, s, {**good, "extra": x}),
                                     ml.KeyMismatchError, "extra"),
        "input of another shape": (
            lambda p, s: (p, s, {"input": be.array(np.zeros((n, 7), np.float32)), "target": y}),
            ml.ShapeError, "input"),
        "labels out of range": (
            lambda p, s: (p, s, {"input": x, "target": be.array(np.full(n, 4), be.int_dtype)}),
            ValueError, "target"),
        "float labels": (
            lambda p, s: (p, s, {"input": x, "target": be.array(np.zeros(n, np.float32))}),
            ml.DTypeError, "target"),
        "data not a dict": (lambda p, s: (p, s, [x, y]), TypeError, "dict"),
        "params without a key": (
            lambda p, s: ({k: v for k, v in p.items() if k != "mlp.linear_0.bias"}, s, good),
            ml.KeyMismatchError, "mlp.linear_0.bias"),
        "params None": (lambda p, s: (None, s, good), (ml.KeyMismatchError, TypeError), "params"),
        "a parameter of another shape": (
            lambda p, s: ({**p, "mlp.linear_0.bias": be.array(np.zeros(3, np.float32))}, s, good),
            ml.ShapeError, "mlp.linear_0.bias"),
        "the state of another optimizer": (  # (LBFGS on JAX: the other's is an OptaxState)
            lambda p, s: (p, state_of(wider, other_opt), good), (ValueError, TypeError),
            type(other_opt).__name__ + "|slots|got OptaxState"),
        "the state of other params (a shape)": (lambda p, s: (p, state_of(wider, fresh()), good),
                                                ValueError, r"mlp\.linear_1\.(bias|weight)"),
        "the state of other params (keys)": (lambda p, s: (p, state_of(deeper, fresh()), good),
                                             (ValueError, ml.KeyMismatchError),
                                             r"mlp\.linear_3|structure"),
        "state None": (lambda p, s: (p, None, good), TypeError, "NoneType"),
    }


@functools.cache
def shared_step(backend: str, opt_name: str) -> tuple[Any, Any]:
    """One step per backend and optimizer for every run of the module: its program compiled
    once, and each refused call also checked to leave the step itself as it was (a later
    run's steps must still equal the first, clean run's)."""
    compiled = compiled_mlp(backend, [16, 12])
    return compiled, make_train_step(compiled, OPTIMIZERS[opt_name](), loss="loss")


def run(backend: str, opt_name: str, bad: str | None) -> tuple[dict, dict]:
    """One good step, the bad call ``bad`` (checked), a second good step; the snapshots
    before the bad call and at the end."""
    compiled, step = shared_step(backend, opt_name)
    be = compiled.backend
    data = batches(be)
    params = {k: be.array(np.array(be.to_numpy(v))) for k, v in compiled.get_parameters().items()}
    state = step.init(params)
    params, state, _ = step(params, state, data[0])
    before = snapshot(be, params, state)
    if bad is not None:
        make, error, match = bad_calls(backend, be, data[1], opt_name)[bad]
        args = make(params, state)
        with pytest.raises(error, match=match):
            step(*args)
        after = snapshot(be, params, state)
        assert after.keys() == before.keys()
        changed = [k for k in before if not np.array_equal(before[k], after[k], equal_nan=True)]
        assert not changed, f"{bad}: changed {changed}"
    params, state, _ = step(params, state, data[1])
    return before, snapshot(be, params, state)


BAD = list(bad_calls("numpy", NumpyBackend(dtype="float32"),
                     batches(NumpyBackend(dtype="float32"))[0], "adam"))


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_a_refused_step_changes_nothing(backend: str, opt_name: str) -> None:
    _, expected = run(backend, opt_name, None)
    for bad in BAD:
        _, got = run(backend, opt_name, bad)
        diff = [k for k in expected if not np.array_equal(expected[k], got[k])]
        assert not diff, f"{backend}/{opt_name}, after '{bad}': the next step differs in {diff}"


def test_state_conversions_refuse_other_params_and_optimizers() -> None:
    """``from_optimizer_state`` / ``to_optimizer_state`` with a state of other params or of
    another optimizer: a named error (they used to convert a state of other shapes silently,
    or fail with a bare KeyError or NumPy's broadcast error)."""
    compiled = compiled_mlp("jax", [16, 12])
    step = make_train_step(compiled, Adam(learning_rate=1e-2), loss="loss")
    params = compiled.get_parameters()
    fused = step.init(params)
    wider, deeper = compiled_mlp("jax", [16, 13]), compiled_mlp("jax", [16, 12, 12])
    adam = Adam(learning_rate=1e-2)
    with pytest.raises(ml.ShapeError, match=r"'mlp\.linear_1\.(weight|bias)' has shape \(13"):
        step.from_optimizer_state(adam.init(wider.get_parameters()))
    with pytest.raises(ml.KeyMismatchError, match=r"unknown \['mlp\.linear_3\.bias"):
        step.from_optimizer_state(adam.init(deeper.get_parameters()))
    with pytest.raises(ValueError, match="made by SGD"):
        step.from_optimizer_state(SGD(learning_rate=0.1, momentum=0.9).init(params))
    with pytest.raises(ml.ShapeError, match=r"slot '[mv]': 'mlp\.linear_1\.(weight|bias)'"):
        step.to_optimizer_state(fused, wider.get_parameters())
    with pytest.raises(ml.KeyMismatchError, match=r"missing \['mlp\.linear_3\.bias"):
        step.to_optimizer_state(fused, deeper.get_parameters())
    sgd_step = make_train_step(compiled, SGD(learning_rate=0.1, momentum=0.9), loss="loss")
    with pytest.raises(ValueError, match=r"slots \['momentum'\].*another optimizer"):
        step.to_optimizer_state(sgd_step.init(params), params)
    with pytest.raises(TypeError, match="NoneType"):
        step.to_optimizer_state(None, params)
    state = step.to_optimizer_state(fused, params)  # the right ones still convert
    assert state.step == 0 and int(step.from_optimizer_state(state).count) == 0


def test_jax_consumed_params_or_state_are_named() -> None:
    """The one-program JAX step donates the params and opt_state it returned to the next
    step. Passing an earlier step's (consumed) params or state again is a TypeError (as
    for any deleted array) that says so, raised before the program runs (it was JAX's 'Array has been deleted' from a
    check, or its runtime's 'Invalid buffer passed to Execute()'), and the current params
    and state still step."""
    compiled = compiled_mlp("jax", [16, 12])
    data = batches(compiled.backend)
    step = make_train_step(compiled, Adam(learning_rate=1e-2), loss="loss")
    p0 = compiled.get_parameters()
    s0 = step.init(p0)
    p1, s1, _ = step(p0, s0, data[0])
    p2, s2, _ = step(p1, s1, data[1])  # p1 and s1 are consumed now
    with pytest.raises(TypeError, match=r"params\['mlp\.[\w.]+'\] is a deleted JAX array: was "
                                        r"it consumed by an earlier step"):
        step(p1, s2, data[0])
    with pytest.raises(TypeError, match=r"opt_state\.\w+.* is a deleted JAX array"):
        step(p2, s1, data[0])
    with pytest.raises(TypeError, match=r"opt_state\.\w+.* is a deleted JAX array"):
        step(p0, s0, data[0])  # the user's p0 was copied, s0 (from init) donated
    before = snapshot(compiled.backend, p2, s2)
    p3, s3, _ = step(p2, s2, data[0])
    assert int(s3.count) == 3 and int(before["s:.count"]) == 2
