"""The per-call caches of the JAX training path: ``CompiledModel._check_concrete`` (shape
checks by input signature, value checks every time), ``TrainStep``'s data signatures, the
fused step's gradient norm, and the JAX-on-CPU optimizer engine with many tensors and its
single first buffer. A cache must never let a bad input through."""

from __future__ import annotations

import numpy as np
import pytest

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend
from mithril.cli.networks import mlp_spec
from mithril.utils.optimizers import Adam
from mithril.utils.train_step_jax import gradients_norm
from mithril.utils.training import make_train_step

jax = pytest.importorskip("jax")
jnp = jax.numpy


def problem(backend: type = JaxBackend, batch: int = 16) -> tuple:
    spec = mlp_spec(8, 4, [12])
    be = backend(dtype="float32", seed=0)
    compiled = ml.compile(spec.model, be, shapes=spec.shapes)
    rng = np.random.default_rng(0)
    data = {"input": be.array(rng.standard_normal((batch, 8)).astype(np.float32)),
            "target": be.array(rng.integers(0, 4, batch), be.int_dtype)}
    return compiled, be, data


@pytest.mark.parametrize("backend", [NumpyBackend, JaxBackend])
def test_check_concrete_caches_shapes_but_not_values(backend: type) -> None:
    compiled, be, data = problem(backend)
    params = compiled.get_parameters()
    out = compiled.evaluate(params, data)
    assert len(compiled._checked) == 1  # one signature passed
    compiled.evaluate(params, data)
    assert len(compiled._checked) == 1  # the same one again: no new entry
    bad = {"input": data["input"], "target": be.array(np.full(16, 7), be.int_dtype)}
    with pytest.raises(ValueError, match="out of range"):  # same signature, bad values
        compiled.evaluate(params, bad)
    with pytest.raises(ml.ShapeError):  # another batch of labels: shapes checked again
        compiled.evaluate(params, {"input": data["input"],
                                   "target": be.array(np.zeros(15, np.int64), be.int_dtype)})
    with pytest.raises(ml.DTypeError):  # float labels of the class-index shape: dtype checked
        compiled.evaluate(params, {"input": data["input"],
                                   "target": be.array(np.zeros(16, np.float32))})
    # a new signature that passes is checked in full once, then cached too
    _, _, small = problem(backend, batch=5)
    compiled.evaluate(params, small)
    assert len(compiled._checked) == 2
    again = compiled.evaluate(params, data)
    np.testing.assert_array_equal(be.to_numpy(again["loss"]), be.to_numpy(out["loss"]))


@pytest.mark.parametrize("backend", [NumpyBackend, JaxBackend])
def test_train_step_signature_cache_keeps_every_error(backend: type) -> None:
    compiled, be, data = problem(backend)
    step = make_train_step(compiled, Adam(learning_rate=1e-2), loss="loss")
    params = compiled.get_parameters()
    state = step.init(params)
    for _ in range(2):
        params, state, _ = step(params, state, data)
    # the data's signature passed and is known: the step's (JAX), or the model's steady
    # inputs (NumPy and torch: mithril.compiler.steady)
    assert step._data_sigs or compiled._steady_ins is not None
    with pytest.raises(ValueError, match="out of range"):
        step(params, state, {"input": data["input"],
                             "target": be.array(np.full(16, -1), be.int_dtype)})
    with pytest.raises(ml.ShapeError):
        step(params, state, {"input": be.array(np.zeros((16, 7), np.float32)),
                             "target": data["target"]})
    with pytest.raises(ml.DTypeError):
        step(params, state, {"input": data["input"],
                             "target": be.array(np.zeros(16, np.float32))})
    with pytest.raises(ml.KeyMismatchError):
        step(params, state, {"input": data["input"]})
    # host data (converted each time, never cached as native) still works
    host = {"input": np.asarray(be.to_numpy(data["input"])),
            "target": np.asarray(be.to_numpy(data["target"]))}
    params, state, out = step(params, state, host)
    assert np.isfinite(float(be.to_numpy(out["loss"])))


def test_fused_step_checks_each_jax_array_once_per_signature() -> None:
    """A JAX array is immutable: labels that passed the value checks are not read again
    (the same object, the same signature), while a new array of the same signature is
    checked, and a bad one is refused with nothing changed."""
    compiled, be, data = problem()
    step = make_train_step(compiled, Adam(learning_rate=1e-2), loss="loss")
    params = compiled.get_parameters()
    state = step.init(params)
    params, state, _ = step(params, state, data)  # checked in full, remembered
    calls = []
    real = compiled._check_concrete
    compiled._check_concrete = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    params, state, _ = step(params, state, data)
    assert calls == []  # the same label array: no value check
    fresh = {"input": data["input"], "target": be.array(np.asarray(data["target"]), be.int_dtype)}
    params, state, _ = step(params, state, fresh)
    assert calls == [1]  # a new array: checked
    bad = {"input": data["input"], "target": be.array(np.full(16, 9), be.int_dtype)}
    before = {k: np.asarray(v).copy() for k, v in params.items()}
    with pytest.raises(ValueError, match="out of range"):
        step(params, state, bad)
    for k, v in params.items():  # the params were not donated: nothing changed
        np.testing.assert_array_equal(np.asarray(v), before[k])
    with pytest.raises(ValueError, match="out of range"):  # refused arrays are not remembered
        step(params, state, bad)


def test_fused_step_equals_uncached_run() -> None:
    """The cached path gives what a step with every check run gives, bit for bit."""
    runs = []
    for clear in (False, True):
        compiled, be, data = problem()
        step = make_train_step(compiled, Adam(learning_rate=1e-2), loss="loss")
        params = compiled.get_parameters()
        state = step.init(params)
        losses = []
        for _ in range(3):
            if clear:
                step._data_sigs.clear()
                step._run_sigs.clear()
                step._steady = None
                compiled.__dict__.pop("_checked", None)
            params, state, out = step(params, state, data)
            losses.append(float(out["loss"]))
        runs.append((losses, {k: np.asarray(v) for k, v in params.items()}))
    assert runs[0][0] == runs[1][0]
    for k in runs[0][1]:
        np.testing.assert_array_equal(runs[0][1][k], runs[1][1][k])


def test_fused_steady_state_equals_full_path_and_falls_back() -> None:
    """The loop's steady state (the params and state the last step returned, data of the
    same keys, types, shapes and dtypes, value-checked arrays seen before) skips the
    checks and gives what the full path gives, bit for bit, a changed learning rate
    included; anything else takes the full path, which checks and raises."""
    def run(steady: bool, full_calls: list) -> tuple:
        compiled, be, data = problem()
        other = {"input": data["input"] * 0.5, "target": data["target"][::-1]}
        opt = Adam(learning_rate=1e-2)
        step = make_train_step(compiled, opt, loss="loss")
        real = step._inputs
        step._inputs = lambda *a: (full_calls.append(1), real(*a))[1]
        params = compiled.get_parameters()
        state = step.init(params)
        losses = []
        for i in range(6):
            if not steady:
                step._steady = None
            if i == 3:
                opt.learning_rate = 3e-3  # a scheduler's change: read in the steady state too
            params, state, out = step(params, state, data if i % 2 else other)
            losses.append(float(out["loss"]))
        return losses, {k: np.asarray(v) for k, v in params.items()}, step, params, state, be

    fast_calls: list = []
    losses, final, step, params, state, be = run(True, fast_calls)
    assert len(fast_calls) == 2  # the first two steps (each data dict's arrays checked once)
    slow_calls: list = []
    want_losses, want, *_ = run(False, slow_calls)
    assert len(slow_calls) == 6 and losses == want_losses
    for k in want:
        np.testing.assert_array_equal(final[k], want[k])

    data = {"input": jnp.ones((16, 8), jnp.float32),
            "target": jnp.asarray(np.arange(16) % 4, be.int_dtype)}
    params, state, _ = step(params, state, data)  # new arrays: full path, then steady
    n = len(fast_calls)
    params, state, _ = step(params, state, data)
    assert len(fast_calls) == n
    # a parameter replaced in the returned dict: the full path copies it in
    name = next(iter(params))
    params = {**params, name: jnp.zeros_like(params[name])}
    params, state, _ = step(params, state, data)
    assert len(fast_calls) == n + 1
    # a state that is not the last one returned, a missing key, host data: the full path
    with pytest.raises(ml.KeyMismatchError):
        step(params, state, {"input": data["input"]})
    with pytest.raises(ValueError, match="out of range"):  # a new label array, checked
        step(params, state, {"input": data["input"],
                             "target": jnp.asarray(np.full(16, 4), be.int_dtype)})
    host = {k: np.asarray(v) for k, v in data.items()}
    before = len(fast_calls)
    params, state, _ = step(params, state, host)
    params, state, _ = step(params, state, host)
    assert len(fast_calls) == before + 2  # host arrays are converted every step
    with pytest.raises(TypeError, match="opt_state"):
        step(params, {"not": "a state"}, data)


def test_grad_norm_one_pass_and_overflow() -> None:
    from mithril.utils.optimizers.engines.jax_engine import scaled_norm

    rng = np.random.default_rng(0)
    gs = [jnp.asarray(rng.standard_normal(s).astype(np.float32)) for s in ((3, 5), (7,), ())]
    want = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in gs))
    np.testing.assert_allclose(float(jax.jit(gradients_norm)(gs)), want, rtol=1e-6)
    big = [jnp.full((4,), 3e20, jnp.float32), jnp.full((2,), 4e20, jnp.float32)]
    got = float(jax.jit(gradients_norm)(big))  # the squares overflow: the scaled norm
    assert np.isfinite(got)
    np.testing.assert_allclose(got, float(jax.jit(scaled_norm)(big)), rtol=1e-6)
    assert np.isinf(float(jax.jit(gradients_norm)([jnp.asarray([np.inf, 1.0], jnp.float32)])))
    assert np.isnan(float(jax.jit(gradients_norm)([jnp.asarray([np.nan, 1.0], jnp.float32)])))


def _many(n: int = 300) -> tuple[dict, list]:
    rng = np.random.default_rng(1)
    shapes = [(3,) if i % 2 else (2, 2) for i in range(n)]
    params = {f"p{i:03d}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)}
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
             for _ in range(3)]
    return params, grads


def test_jax_cpu_engine_many_tensors_matches_numpy() -> None:
    """Many tensors: the same values as NumPy's engine."""
    params, grads = _many()
    opt_n, opt_j = Adam(learning_rate=1e-2), Adam(learning_rate=1e-2)
    pn = {k: v.copy() for k, v in params.items()}
    pj = {k: jnp.asarray(v) for k, v in params.items()}
    sn, sj = opt_n.init(pn), opt_j.init(pj)
    assert type(sj.engine).__name__ == "NumbaEngine"
    for g in grads:
        pn, sn = opt_n.update(pn, g, sn)
        pj, sj = opt_j.update(pj, {k: jnp.asarray(v) for k, v in g.items()}, sj)
    for k in pn:
        np.testing.assert_array_equal(np.asarray(pj[k]), pn[k], err_msg=k)


def test_jax_cpu_engine_refuses_a_bad_gradient_late_in_the_layout() -> None:
    params, grads = _many()
    opt = Adam(learning_rate=1e-2)
    p = {k: jnp.asarray(v) for k, v in params.items()}
    state = opt.init(p)
    jg = {k: jnp.asarray(v) for k, v in grads[0].items()}
    p, state = opt.update(p, jg, state)  # the gradients' avals are known now
    before = {k: np.array(v) for k, v in p.items()}
    for bad, err in ((jnp.ones(5, jnp.float32), ml.ShapeError),
                     (jnp.ones(3, jnp.float16), TypeError)):
        with pytest.raises(err, match="p299"):
            opt.update(p, {**jg, "p299": bad}, state)
        assert state.step == 1
        assert all(np.array_equal(np.asarray(p[k]), before[k]) for k in p)
    p, state = opt.update(p, jg, state)  # and the good ones still take the fast path
    assert state.step == 2


def test_jax_cpu_engine_first_update_holds_one_buffer() -> None:
    """The first update writes its one fresh buffer in place (no second one yet); from the
    second the two alternate, and the arrays given to an update stay valid through it."""
    params, grads = _many(10)
    opt = Adam(learning_rate=1e-2)
    p = {k: jnp.asarray(v) for k, v in params.items()}
    given = {k: np.array(v) for k, v in p.items()}
    state = opt.init(p)
    p1, state = opt.update(p, {k: jnp.asarray(v) for k, v in grads[0].items()}, state)
    assert getattr(state.engine, "_spare", None) is None
    assert all(np.array_equal(np.asarray(p[k]), given[k]) for k in p)  # never modified
    first = {k: np.array(v) for k, v in p1.items()}
    p2, state = opt.update(p1, {k: jnp.asarray(v) for k, v in grads[1].items()}, state)
    assert state.engine._spare is not None
    assert all(np.array_equal(np.asarray(p1[k]), first[k]) for k in p1)  # valid one more step
    assert not all(np.array_equal(np.asarray(p2[k]), first[k]) for k in p2)
