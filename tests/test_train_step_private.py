"""``make_train_step`` with DP-SGD (an optimizer whose ``update`` takes per-example
gradients): the step computes each example's gradients itself, equal to
``per_example_gradients`` + ``update`` on every backend and, on JAX, to
``optax.contrib.dpsgd`` run beside it (without noise: optax's draws are its own)."""

from __future__ import annotations

import numpy as np
import pytest

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
from mithril.utils.optimizers import DPSGD, Adam, DifferentiallyPrivate
from mithril.utils.per_example import per_example_gradients
from mithril.utils.training import make_train_step

BACKENDS = {"numpy": NumpyBackend, "torch": TorchBackend, "jax": JaxBackend}


def _model(dropout: bool = False, unreached: bool = False) -> ml.Model:
    m = ml.Model()
    m |= ml.MLP(["tanh", None], [6, 3])(input="input", output="logits")
    if dropout:
        m |= ml.Dropout(0.5)(input="logits", output="dropped")
    m |= ml.CrossEntropy()(input="dropped" if dropout else "logits", target="target",
                           output=ml.IOKey("loss"))
    if unreached:  # (a head the loss does not reach: left out, as a .grad None)
        m |= ml.Linear(2)(input="input", output=ml.IOKey("aux"))
    return m


def _setup(name: str, unreached: bool = False) -> tuple:
    be = BACKENDS[name](dtype="float64")
    compiled = ml.compile(_model(unreached=unreached), be, shapes={"input": [None, 4]})
    rng = np.random.default_rng(0)
    p0 = {k: 0.5 * rng.standard_normal(s) for k, s in sorted(compiled.parameter_shapes.items())}
    batches = [{"input": rng.standard_normal((5, 4)), "target": rng.integers(0, 3, 5)}
               for _ in range(3)]
    return be, compiled, p0, batches


def _data(be, d: dict) -> dict:
    return {"input": be.array(d["input"]), "target": be.array(d["target"], be.int_dtype)}


@pytest.mark.parametrize("name", ["numpy", "torch", "jax"])
def test_the_step_equals_per_example_gradients_then_update(name) -> None:
    be, compiled, p0, batches = _setup(name, unreached=True)

    def make():
        return DifferentiallyPrivate(Adam(0.05), l2_norm_clip=0.1, noise_multiplier=1.1,
                                     seed=3)
    step = make_train_step(compiled, make(), loss="loss")
    assert step.fused == (name == "jax")  # (JAX: one program, train_step_private)
    params = {k: be.array(v) for k, v in p0.items()}
    state = step.init(params)
    opt = make()
    ref = {k: be.array(v) for k, v in p0.items()}
    ref_state = opt.init(ref)
    tol = 1e-12 if step.fused else 0.0  # (float64; bit for bit on NumPy, torch)
    for d in batches:
        data = _data(be, d)
        params, state, out = step(params, state, data)
        rows = per_example_gradients(compiled, ref, data, "loss")
        want_out = compiled.evaluate(ref, data)
        ref, ref_state = opt.update(ref, {k: g for k, g in rows.items()
                                          if not k.startswith("linear")}, ref_state)
        np.testing.assert_allclose(be.to_numpy(out["loss"]), be.to_numpy(want_out["loss"]),
                                   rtol=tol, atol=tol)
    for k in p0:
        np.testing.assert_allclose(be.to_numpy(params[k]), be.to_numpy(ref[k]), rtol=tol,
                                   atol=tol, err_msg=k)
    # the head the loss does not reach: untouched (no noise, no step), its slots too
    np.testing.assert_array_equal(be.to_numpy(params["linear.weight"]), p0["linear.weight"])
    if step.fused:
        state = step.to_optimizer_state(state, params)
    assert state.values["dp_count"] == 3


def test_without_noise_the_jax_step_equals_optax_dpsgd() -> None:
    import jax
    import optax

    be, compiled, p0, batches = _setup("jax")
    step = make_train_step(compiled, DPSGD(0.3, l2_norm_clip=0.1, noise_multiplier=0.0,
                                           seed=0, momentum=0.9), loss="loss")
    params = {k: be.array(v) for k, v in p0.items()}
    state = step.init(params)
    tx = optax.contrib.dpsgd(0.3, 0.1, 0.0, seed=0, momentum=0.9)
    ref = {k: jax.numpy.asarray(v) for k, v in p0.items()}
    ref_state = tx.init(ref)
    for d in batches:
        data = _data(be, d)
        params, state, _ = step(params, state, data)
        rows = per_example_gradients(compiled, ref, data, "loss")
        upd, ref_state = tx.update(rows, ref_state)
        ref = optax.apply_updates(ref, upd)
    for k in p0:
        np.testing.assert_allclose(np.asarray(params[k]), np.asarray(ref[k]), rtol=1e-12,
                                   atol=1e-13, err_msg=k)


def test_a_model_with_dropout_is_refused_when_the_step_is_made() -> None:
    compiled = ml.compile(_model(dropout=True), NumpyBackend(dtype="float64"),
                          shapes={"input": [None, 4]})
    with pytest.raises(TypeError, match="DP-SGD step needs per-example gradients, and the "
                                        "model has Dropout or BatchNorm"):
        make_train_step(compiled, DPSGD(), loss="loss")


def test_a_refused_step_changes_nothing() -> None:
    """A target out of range: the model's check, before any update."""
    be, compiled, p0, batches = _setup("numpy")
    step = make_train_step(compiled, DPSGD(0.1, noise_multiplier=0.5), loss="loss")
    params = {k: be.array(v.copy()) for k, v in p0.items()}
    state = step.init(params)
    bad = {**batches[0], "target": np.array([0, 1, 7, 0, 1])}
    with pytest.raises(Exception, match="target"):
        step(params, state, _data(be, bad))
    assert state.values["dp_count"] == 0
    for k in p0:
        np.testing.assert_array_equal(params[k], p0[k])
