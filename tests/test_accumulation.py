"""Gradient accumulation (== one step on the whole batch) and the monitoring helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
from mithril.errors import KeyMismatchError
from mithril.utils.accumulation import Accumulate, GradientAccumulator
from mithril.utils.lr_schedulers import StepLR
from mithril.utils.monitoring import (
    TrainingMonitor,
    global_norm,
    gradient_norms,
    parameter_norms,
    snapshot,
    update_ratios,
)
from mithril.utils.optimizers import SGD, Adam
from mithril.utils.optimizers import global_norm as clipping_global_norm

BACKENDS = {"numpy": NumpyBackend, "torch": TorchBackend, "jax": JaxBackend}
OPTIMIZERS = {
    "sgd": lambda: SGD(learning_rate=0.1, momentum=0.9, nesterov=True),
    "adam": lambda: Adam(learning_rate=0.01, weight_decay=1e-3),
}


def classifier() -> ml.Model:
    m = ml.Model()
    m += ml.MLP(["tanh", None], [16, 3])(input="input", output="logits")
    m |= ml.CrossEntropy()(input="logits", target="labels", output="loss")  # mean over the batch
    m.set_shapes(input=[None, 5])
    return m


def data(backend, n, seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 5)), rng.integers(0, 3, n)


def inputs(backend, x, y):
    return {"input": backend.array(x), "labels": backend.array(y.astype(backend.int_dtype))}


def grads_of(compiled, params, x, y):
    _, g = compiled.evaluate(params, inputs(compiled.backend, x, y), output_gradients={"loss": 1.0})
    return g


def np_tree(backend, tree):
    return {k: backend.to_numpy(v).astype(np.float64) for k, v in tree.items()}


# -- accumulation == one step on the concatenated batch ------------------------------------------
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_accumulating_4_micro_batches_equals_one_step_on_the_batch(kind, opt_name):
    backend = BACKENDS[kind](dtype="float64", seed=0)
    compiled = ml.compile(classifier(), backend)
    p0 = compiled.get_parameters()

    # reference: 3 steps on whole batches of 32
    opt = OPTIMIZERS[opt_name]()
    ref, ref_state = dict(p0), opt.init(p0)
    for step in range(3):
        x, y = data(backend, 32, step)
        ref, ref_state = opt.update(ref, grads_of(compiled, ref, x, y), ref_state)
    ref = np_tree(backend, ref)

    # GradientAccumulator: 4 micro-batches of 8, one update with their mean
    opt = OPTIMIZERS[opt_name]()
    params, state = dict(p0), opt.init(p0)
    acc = GradientAccumulator()
    for step in range(3):
        x, y = data(backend, 32, step)
        for i in range(0, 32, 8):
            acc.add(grads_of(compiled, params, x[i:i + 8], y[i:i + 8]))
        assert acc.count == 4
        params, state = opt.update(params, acc.mean(), state)
        acc.reset()
    for k, v in np_tree(backend, params).items():
        np.testing.assert_allclose(v, ref[k], rtol=0, atol=1e-6)
        np.testing.assert_allclose(v, ref[k], rtol=1e-12, atol=1e-13)  # in fact to rounding

    # Accumulate(optimizer, 4): the same through the optimizer contract
    wrapped = Accumulate(OPTIMIZERS[opt_name](), 4)
    params, state = dict(p0), wrapped.init(p0)
    for step in range(3):
        x, y = data(backend, 32, step)
        for j, i in enumerate(range(0, 32, 8)):
            before = params
            params, state = wrapped.update(params, grads_of(compiled, params, x[i:i + 8], y[i:i + 8]),
                                           state)
            assert state.applied is (j == 3)
            if j < 3:
                assert params is before and state.micro_step == j + 1
        assert state.step == step + 1 and state.micro_step == 0
    for k, v in np_tree(backend, params).items():
        np.testing.assert_allclose(v, ref[k], rtol=1e-12, atol=1e-13)


def test_unequal_micro_batches_weighted_by_size():
    backend = NumpyBackend(dtype="float64")
    compiled = ml.compile(classifier(), backend)
    params = compiled.get_parameters()
    x, y = data(backend, 30, 7)
    whole = grads_of(compiled, params, x, y)
    acc = GradientAccumulator()
    for a, b in [(0, 4), (4, 20), (20, 30)]:
        acc.add(grads_of(compiled, params, x[a:b], y[a:b]), weight=b - a)
    assert acc.total_weight == 30
    for k, v in acc.mean().items():
        np.testing.assert_allclose(v, whole[k], rtol=1e-12, atol=1e-14)


def test_accumulator_on_jax_float32():
    backend = JaxBackend(seed=0)
    compiled = ml.compile(classifier(), backend)
    params = compiled.get_parameters()
    x, y = data(backend, 32, 3)
    whole = np_tree(backend, grads_of(compiled, params, x, y))
    acc = GradientAccumulator()
    for i in range(0, 32, 8):
        acc.add(grads_of(compiled, params, x[i:i + 8], y[i:i + 8]))
    for k, v in np_tree(backend, acc.mean()).items():
        np.testing.assert_allclose(v, whole[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["numpy", "torch", "jax"])
def test_accumulate_0d_parameters_equals_optax_multisteps(kind):
    """A 0-d parameter (a scalar gain, a temperature): the mean of its micro-batch gradients
    stays an array of its backend (NumPy's arithmetic on 0-d arrays gives scalars), and
    ``Accumulate`` steps as ``optax.MultiSteps`` does."""
    import jax.numpy as jnp
    import optax

    backend = {"numpy": NumpyBackend, "torch": TorchBackend, "jax": JaxBackend}[kind](
        dtype="float64" if kind != "jax" else "float32")
    rng = np.random.default_rng(3)
    p0 = {"s": np.array(1.5), "w": rng.standard_normal(3)}
    gs = [{"s": np.array(rng.standard_normal()), "w": rng.standard_normal(3)} for _ in range(6)]
    conv = {k: backend.array(v) for k, v in p0.items()}
    acc = GradientAccumulator()
    acc.add({k: backend.array(v) for k, v in gs[0].items()})
    acc.add({k: backend.array(v) for k, v in gs[1].items()})
    mean = acc.mean()["s"]
    assert type(mean) is type(conv["s"]) and tuple(mean.shape) == ()
    opt = Accumulate(SGD(learning_rate=0.1, momentum=0.9), k=2)
    params, state = conv, opt.init(conv)
    ref = optax.MultiSteps(optax.sgd(0.1, momentum=0.9), every_k_schedule=2)
    rp = {k: jnp.asarray(v, jnp.float32) for k, v in p0.items()}
    rs = ref.init(rp)
    for g in gs:
        params, state = opt.update(params, {k: backend.array(v) for k, v in g.items()}, state)
        u, rs = ref.update({k: jnp.asarray(v, jnp.float32) for k, v in g.items()}, rs, rp)
        rp = optax.apply_updates(rp, u)
    assert state.step == 3
    for k, v in np_tree(backend, params).items():
        assert v.shape == p0[k].shape
        np.testing.assert_allclose(v, np.asarray(rp[k]), rtol=2e-6, atol=1e-7)


def test_accumulator_copies_inputs_and_checks_keys():
    g1 = {"w": np.ones(3), "b": np.ones(2)}
    acc = GradientAccumulator()
    acc.add(g1)
    acc.add({"w": np.full(3, 3.0), "b": np.full(2, 3.0)})
    np.testing.assert_array_equal(g1["w"], np.ones(3))  # the first gradients were not aliased
    np.testing.assert_array_equal(acc.mean()["w"], np.full(3, 2.0))
    with pytest.raises(KeyMismatchError):
        acc.add({"w": np.ones(3)})
    with pytest.raises(ValueError):
        acc.add(g1, weight=0)
    with pytest.raises(RuntimeError):
        GradientAccumulator().mean()
    with pytest.raises(ValueError):
        Accumulate(SGD(), 0)


def test_accumulate_forwards_the_learning_rate_to_schedulers():
    backend = NumpyBackend(dtype="float64")
    compiled = ml.compile(classifier(), backend)
    wrapped = Accumulate(SGD(learning_rate=0.1), 2)
    sched = StepLR(wrapped, step_size=1, gamma=0.5)
    params = compiled.get_parameters()
    state = wrapped.init(params)
    x, y = data(backend, 8, 0)
    for _ in range(4):
        params, state = wrapped.update(params, grads_of(compiled, params, x, y), state)
        if state.applied:
            sched.step()
    assert sched.last_step == 2 and wrapped.optimizer.get_learning_rate() == pytest.approx(0.025)


# -- monitoring ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(BACKENDS))
def test_monitoring_helpers_match_numpy(kind):
    backend = BACKENDS[kind](dtype="float32", seed=1)
    compiled = ml.compile(classifier(), backend)
    params = compiled.get_parameters()
    x, y = data(backend, 16, 1)
    grads = grads_of(compiled, params, x, y)
    g_np, p_np = np_tree(backend, grads), np_tree(backend, params)

    norms = gradient_norms(grads)
    for k, v in g_np.items():
        assert norms[k] == pytest.approx(np.linalg.norm(v.ravel()), rel=1e-6)
    for k, v in parameter_norms(params).items():
        assert v == pytest.approx(np.linalg.norm(p_np[k].ravel()), rel=1e-6)
    want_global = math.sqrt(sum(float(np.sum(v**2)) for v in g_np.values()))
    assert global_norm(grads) == pytest.approx(want_global, rel=1e-6)
    assert global_norm(grads) == pytest.approx(clipping_global_norm(grads), rel=1e-6)

    # update ratios around a real (in-place / donating) optimizer update
    opt = Adam(learning_rate=1e-2)
    state = opt.init(params)
    monitor = TrainingMonitor()
    params, state = opt.update(params, grads, state)  # params are now the optimizer's views
    before = snapshot(params)
    before_np = np_tree(backend, before)
    grads = grads_of(compiled, params, x, y)
    monitor.before_update(params)
    params, state = opt.update(params, grads, state)
    rec = monitor.after_update(params, grads)
    after_np = np_tree(backend, params)
    ratios = update_ratios(before, params)
    for k in after_np:
        want = np.linalg.norm((after_np[k] - before_np[k]).ravel()) / np.linalg.norm(before_np[k])
        assert want > 0
        assert ratios[k] == pytest.approx(want, rel=1e-4)
        assert rec["update_ratios"][k] == pytest.approx(want, rel=1e-4)
        assert rec["grad_norms"][k] == pytest.approx(np.linalg.norm(np_tree(backend, grads)[k]),
                                                     rel=1e-6)
    assert rec["global_grad_norm"] == pytest.approx(global_norm(grads), rel=1e-6)
    assert rec["nonfinite"] == [] and len(monitor.series("global_grad_norm")) == 1
    first = next(iter(after_np))
    assert monitor.series("update_ratios", first) == [rec["update_ratios"][first]]


def test_update_ratio_edge_cases_and_nonfinite():
    before = {"w": np.array([3.0, 4.0]), "b": np.zeros(2), "c": np.zeros(1)}
    after = {"w": np.array([3.0, 4.5]), "b": np.array([0.0, 1.0]), "c": np.zeros(1)}
    r = update_ratios(before, after)
    assert r == {"w": pytest.approx(0.1), "b": math.inf, "c": 0.0}
    with pytest.raises(KeyMismatchError):
        update_ratios(before, {"w": after["w"]})
    mon = TrainingMonitor(keep_history=False)
    rec = mon.after_update(after, {"w": np.array([np.inf, 1.0]), "b": np.ones(2)})
    assert rec["nonfinite"] == ["w"] and math.isinf(rec["global_grad_norm"])
    assert len(mon.history) == 1
