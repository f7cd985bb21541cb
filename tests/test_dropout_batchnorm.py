"""Training / inference modes, counter-based randomness and model state: ``Dropout`` and
``BatchNorm1D`` / ``BatchNorm2D``.

1. Dropout: identity in inference mode; in training mode the drop rate is p (statistically),
   kept values are scaled by 1/(1 − p), the mask is a function of (seed, step, block) only, the
   same on NumPy, JAX and torch; the gradient uses the forward's mask (finite differences with
   the step fixed); p = 0 and p = 1; a bad p is a named error.
2. BatchNorm against ``torch.nn.BatchNorm1d/2d`` in float64 at 1e-10 on all three backends:
   5 training steps (output, gradients of input, weight and bias, running statistics and
   ``num_batches_tracked``), then inference mode; ``momentum=None``, ``affine=False`` and
   ``track_running_stats=False``. The JAX column runs in a subprocess (float64 needs x64).
3. The NumPy VJP of BatchNorm against central finite differences, in both modes.
4. State plumbing: ``initial_state_dict`` as torch's buffers, ``evaluate(..., state=...)``
   returns the new state last, outputs unchanged without state, and named errors.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import (
    BACKENDS,
    assert_arrays_within,
    central_differences,
    jax_case_params,
    jax_float64_results,
    selected_cases,
    to_np,
)

import mithril as ml
from mithril.errors import KeyMismatchError, ShapeError

TOL = 1e-10


def dropout_model(p: float = 0.5, n: int = 1) -> ml.Model:
    m = ml.Model()
    m += ml.Dropout(p)(input="input")
    for _ in range(n - 1):
        m += ml.Dropout(p)
    return m


def mask_of(backend, compiled, shape, **kw) -> np.ndarray:
    out = compiled.evaluate({}, {"input": backend.ones(*shape)}, **kw)["output"]
    return to_np(backend, out)


# -- Dropout -----------------------------------------------------------------------------------
def test_dropout_inference_is_identity(backend):
    x = backend.randn(4, 7)
    g = backend.randn(4, 7)
    for compiled, kw in ((ml.compile(dropout_model(0.7), backend, inference=True), {}),
                         (ml.compile(dropout_model(0.7), backend), {"training": False})):
        out, grads = compiled.evaluate({}, {"input": x}, output_gradients={"output": g}, **kw)
        assert np.array_equal(to_np(backend, out["output"]), to_np(backend, x))
        assert compiled.step == 0  # inference draws nothing


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_rate_and_scale(p):
    backend = ml.NumpyBackend(dtype="float64")
    compiled = ml.compile(dropout_model(p), backend)
    y = mask_of(backend, compiled, (400, 500))
    n = y.size
    rate = float((y == 0).mean())
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / n)
    assert np.allclose(y[y != 0], 1 / (1 - p), rtol=0, atol=1e-12)
    # rows and columns are not correlated: the drop rate per row stays near p
    rows = (y == 0).mean(axis=1)
    assert abs(rows.std() - math.sqrt(p * (1 - p) / 500)) < 0.25 * math.sqrt(p * (1 - p) / 500)


def test_dropout_mask_is_the_same_on_every_backend():
    masks = {}
    for name, cls in BACKENDS.items():
        backend = cls(dtype="float32", seed=7)
        compiled = ml.compile(dropout_model(0.3, n=2), backend)
        masks[name] = [mask_of(backend, compiled, (3, 5, 11)) for _ in range(3)]  # steps 0, 1, 2
        assert compiled.step == 3
        masks[name].append(mask_of(backend, compiled, (3, 5, 11), step=1))
    for name in ("jax", "torch"):
        for a, b in zip(masks["numpy"], masks[name]):
            assert np.array_equal(a, b), name
    steps = masks["numpy"]
    assert np.array_equal(steps[1], steps[3])  # step=1 replays step 1
    assert not np.array_equal(steps[0], steps[1]) and not np.array_equal(steps[1], steps[2])


def test_dropout_is_reproducible_and_blocks_differ():
    def masks(seed):
        backend = ml.NumpyBackend(seed=seed)
        m = ml.Model()
        m |= ml.Dropout(0.5)(input="input", output="a")
        m |= ml.Dropout(0.5)(input="input", output="b")
        compiled = ml.compile(m, backend)
        out = [compiled.evaluate({}, {"input": backend.ones(64)}) for _ in range(2)]
        return [to_np(backend, o[k]) for o in out for k in ("a", "b")]

    first, again, other = masks(0), masks(0), masks(1)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], first[1])  # two blocks, two masks
    assert not np.array_equal(first[0], other[0])  # another seed, another mask


def test_dropout_gradient_uses_the_mask_and_matches_finite_differences(eps=1e-6):
    backend = ml.NumpyBackend(dtype="float64", seed=1)
    m = ml.Model()
    m += ml.Linear(6)(input="input")
    m += ml.Tanh()
    m += ml.Dropout(0.4)
    m += ml.Linear(3)
    compiled = ml.compile(m, backend, shapes={"input": [5, 4]})
    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(s) for k, s in compiled.parameter_shapes.items()}
    x, cot = rng.standard_normal((5, 4)), rng.standard_normal((5, 3))
    _, grads = compiled.evaluate(params, {"input": x}, output_gradients={"output": cot}, step=5)

    def f(p):
        return float((compiled.evaluate(p, {"input": x}, step=5)["output"] * cot).sum())

    for name, fd in central_differences(f, params, eps).items():
        assert np.abs(grads[name] - fd).max() < 1e-7, name
    assert compiled.step == 0  # an explicit step leaves the counter alone
    # the other backends: the same gradient (the same mask)
    for cls in (ml.JaxBackend, ml.TorchBackend):
        m2 = ml.Model()
        m2 += ml.Linear(6)(input="input")
        m2 += ml.Tanh()
        m2 += ml.Dropout(0.4)
        m2 += ml.Linear(3)
        b = cls(dtype="float32", seed=1)
        c = ml.compile(m2, b, shapes={"input": [5, 4]})
        _, g2 = c.evaluate({k: b.array(v) for k, v in params.items()}, {"input": b.array(x)},
                           output_gradients={"output": b.array(cot)}, step=5)
        for k in params:
            assert np.abs(to_np(b, g2[k]) - grads[k]).max() < 1e-4, (cls.name, k)


def test_dropout_p0_and_p1(backend):
    x, g = backend.randn(3, 4), backend.randn(3, 4)
    c0 = ml.compile(dropout_model(0.0), backend)
    out, grads = c0.evaluate({}, {"input": x}, output_gradients={"output": g})
    assert np.array_equal(to_np(backend, out["output"]), to_np(backend, x))
    m = ml.Model()
    m += ml.Linear(2)(input="input")
    m += ml.Dropout(1.0)
    c1 = ml.compile(m, backend, shapes={"input": [3, 4]})
    params = c1.get_parameters()
    out, grads = c1.evaluate(params, {"input": x}, output_gradients={"output": backend.ones(3, 2)})
    assert not to_np(backend, out["output"]).any()
    assert not any(to_np(backend, v).any() for v in grads.values())
    out = c1.evaluate(params, {"input": x}, training=False)  # inference: the identity
    assert to_np(backend, out["output"]).any()


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan"), "0.5", True, None])
def test_dropout_bad_p_is_named(p):
    with pytest.raises(ValueError, match=r"Dropout: p must be a probability in \[0, 1\]"):
        ml.Dropout(p)


def test_bad_mode_and_step_are_named_and_change_nothing():
    backend = ml.NumpyBackend()
    compiled = ml.compile(dropout_model(0.5), backend)
    x = backend.ones(3)
    with pytest.raises(TypeError, match="training"):
        compiled.evaluate({}, {"input": x}, training="yes")
    with pytest.raises(ValueError, match="step"):
        compiled.evaluate({}, {"input": x}, step=-1)
    with pytest.raises(TypeError, match="inference"):
        ml.compile(dropout_model(), backend, inference="no")
    assert compiled.step == 0


def test_jax_does_not_recompile_per_step():
    backend = ml.JaxBackend()
    compiled = ml.compile(dropout_model(0.5), backend)
    for _ in range(4):
        compiled.evaluate({}, {"input": backend.ones(8)})
    assert compiled._eval._fwd_ctx._cache_size() == 1


def test_summary_says_mode_randomness_and_state():
    backend = ml.NumpyBackend(seed=4)
    m = ml.Model()
    m += ml.BatchNorm1D(3)(input="input")
    m += ml.Dropout(0.2)
    text = ml.compile(m, backend, shapes={"input": [None, 3]}, inference=True).summary(print_fn=None)
    assert "mode: inference by default" in text and "seed 4, step 0" in text
    assert "state: 3 arrays, 7 values" in text
    plain = ml.compile(ml.Linear(2), backend, shapes={"input": [1, 2]}).summary(print_fn=None)
    assert "mode:" not in plain and "state:" not in plain


# -- BatchNorm against torch -------------------------------------------------------------------
BN_CASES = {
    "bn1d_2d_input": (1, (6, 3), {}),
    "bn1d_3d_input": (1, (4, 3, 5), {}),
    "bn2d": (2, (4, 3, 2, 5), {}),
    "bn2d_cumulative": (2, (3, 3, 2, 2), {"momentum": None}),
    "bn2d_momentum_eps": (2, (2, 3, 3, 2), {"momentum": 0.3, "eps": 1e-3}),
    "bn1d_no_affine": (1, (5, 3, 2), {"affine": False}),
    "bn2d_no_running_stats": (2, (2, 3, 2, 3), {"track_running_stats": False}),
}
STEPS = 5


def bn_data(case: str):
    nd, shape, kw = BN_CASES[case]
    rng = np.random.default_rng(sum(map(ord, case)))
    shift = rng.standard_normal(shape[1]).reshape((1, -1) + (1,) * (len(shape) - 2))
    xs = [rng.standard_normal(shape) * 1.5 + shift for _ in range(STEPS + 1)]
    cots = [rng.standard_normal(shape) for _ in range(STEPS + 1)]
    wb = (rng.standard_normal(3), rng.standard_normal(3))
    return nd, shape, kw, xs, cots, wb


def run_mithril_bn(case: str, backend_name: str) -> dict[str, np.ndarray]:
    """Per step (5 training, then 1 inference): output, gradients (input, weight, bias) and
    the state after it, keyed "<step>|<what>"."""
    nd, shape, kw, xs, cots, (w, b) = bn_data(case)
    backend = BACKENDS[backend_name](dtype="float64")
    block = (ml.BatchNorm1D if nd == 1 else ml.BatchNorm2D)(3, **kw)
    model = ml.Model()
    model |= block(input="x", output="output")
    compiled = ml.compile(model, backend, shapes={"x": shape}, trainable_keys=["x"])
    state = compiled.initial_state_dict
    res = {}
    for i, (x, cot) in enumerate(zip(xs, cots)):
        by_role = {"x": x, "weight": w, "bias": b}
        params = {k: backend.array(by_role[k.rsplit(".", 1)[-1]]) for k in compiled.parameter_shapes}
        out, grads, state = compiled.evaluate(params, {}, output_gradients={"output": backend.array(cot)},
                                              state=state, training=i < STEPS)
        res[f"{i}|output"] = to_np(backend, out["output"])
        res.update({f"{i}|grad|{k.rsplit('.', 1)[-1]}": to_np(backend, g) for k, g in grads.items()})
        res.update({f"{i}|state|{k.rsplit('.', 1)[-1]}": to_np(backend, s) for k, s in state.items()})
    return res


def run_torch_bn(case: str) -> dict[str, np.ndarray]:
    nd, shape, kw, xs, cots, (w, b) = bn_data(case)
    ref = (torch.nn.BatchNorm1d if nd == 1 else torch.nn.BatchNorm2d)(3, dtype=torch.float64, **kw)
    if ref.affine:
        with torch.no_grad():
            ref.weight.copy_(torch.tensor(w))
            ref.bias.copy_(torch.tensor(b))
    res = {}
    for i, (x, cot) in enumerate(zip(xs, cots)):
        ref.train(i < STEPS)
        xt = torch.tensor(x, requires_grad=True)
        y = ref(xt)
        leaves = {"x": xt, **({"weight": ref.weight, "bias": ref.bias} if ref.affine else {})}
        grads = torch.autograd.grad(y, list(leaves.values()), torch.tensor(cot))
        res[f"{i}|output"] = y.detach().numpy()
        res.update({f"{i}|grad|{k}": g.numpy() for k, g in zip(leaves, grads)})
        if ref.track_running_stats:
            for k in ("running_mean", "running_var", "num_batches_tracked"):
                res[f"{i}|state|{k}"] = getattr(ref, k).numpy().copy()
    return res


def compare_bn(case: str, got: dict[str, np.ndarray], what: str) -> None:
    assert_arrays_within(got, run_torch_bn(case), TOL, f"{what} {case}")


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
@pytest.mark.parametrize("case", list(BN_CASES))
def test_batchnorm_equals_torch(case, backend_name):
    compare_bn(case, run_mithril_bn(case, backend_name), backend_name)


@pytest.fixture(scope="module")
def jax_bn_results(request):
    return jax_float64_results("test_dropout_batchnorm", "BN_CASES", "run_mithril_bn",
        only=selected_cases(request, "case", list(BN_CASES)))


@pytest.mark.parametrize("case", jax_case_params(list(BN_CASES)))
def test_batchnorm_jax_equals_torch(case, jax_bn_results):
    got = jax_bn_results.get(case, {})
    compare_bn(case, got, "jax")


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("make, shape", [(lambda: ml.BatchNorm2D(2), (3, 2, 2, 3)),
                                         (lambda: ml.BatchNorm1D(3, eps=1e-2), (4, 3)),
                                         (lambda: ml.BatchNorm1D(2, affine=False), (2, 2, 3))])
def test_batchnorm_numpy_vjp_matches_finite_differences(make, shape, training, eps=1e-6):
    backend = ml.NumpyBackend(dtype="float64")
    model = ml.Model()
    model |= make()(input="x", output="output")
    compiled = ml.compile(model, backend, shapes={"x": shape}, trainable_keys=["x"])
    rng = np.random.default_rng(3)
    params = {k: rng.standard_normal(s) for k, s in compiled.parameter_shapes.items()}
    state = {k: (v if "tracked" in k else v + rng.uniform(0.2, 1.0, v.shape))
             for k, v in compiled.initial_state_dict.items()}
    cot = rng.standard_normal(shape)
    _, grads, _ = compiled.evaluate(params, {}, output_gradients={"output": cot}, state=state,
                                    training=training)

    def f(p):
        return float((compiled.evaluate(p, {}, state=state, training=training)[0]["output"] * cot).sum())

    for name, fd in central_differences(f, params, eps).items():
        assert np.abs(grads[name] - fd).max() < 1e-7, name


# -- state plumbing and errors -----------------------------------------------------------------
def test_initial_state_and_params_as_torch(backend):
    compiled = ml.compile(ml.BatchNorm2D(4), backend, shapes={"input": [None, 4, 3, 3]})
    params, state = compiled.get_parameters(), compiled.initial_state_dict
    ref = torch.nn.BatchNorm2d(4)
    assert np.array_equal(to_np(backend, params["batch_norm2_d.weight"]), ref.weight.detach().numpy())
    assert np.array_equal(to_np(backend, params["batch_norm2_d.bias"]), ref.bias.detach().numpy())
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        assert np.array_equal(to_np(backend, state[f"batch_norm2_d.{k}"]), getattr(ref, k).numpy())
    assert "int" in backend.dtype_name(state["batch_norm2_d.num_batches_tracked"])
    assert compiled.state_shapes == {"batch_norm2_d.running_mean": (4,), "batch_norm2_d.running_var": (4,),
                                     "batch_norm2_d.num_batches_tracked": ()}
    assert ml.compile(ml.BatchNorm1D(4, track_running_stats=False), backend).initial_state_dict == {}


def test_state_in_state_out_and_outputs_unchanged_without_state(backend):
    compiled = ml.compile(ml.BatchNorm1D(2), backend, shapes={"input": [None, 2]})
    params, state = compiled.get_parameters(), compiled.initial_state_dict
    x = backend.randn(5, 2)
    out, new = compiled.evaluate(params, {"input": x}, state=state)
    assert set(new) == set(state) and int(to_np(backend, new["batch_norm1_d.num_batches_tracked"])) == 1
    assert np.array_equal(to_np(backend, state["batch_norm1_d.running_mean"]), [0, 0])  # not in place
    _, same = compiled.evaluate(params, {"input": x}, state=new, training=False)
    assert all(np.array_equal(to_np(backend, same[k]), to_np(backend, new[k])) for k in new)
    out, grads, _ = compiled.evaluate(params, {"input": x}, output_gradients={"output": x}, state=new)
    assert set(grads) == set(params)
    # a model without state: as before; state={} gets the (empty) state back
    plain = ml.compile(ml.Linear(2), backend, shapes={"input": [None, 2]})
    p = plain.get_parameters()
    assert isinstance(plain.evaluate(p, {"input": x}), dict)
    out, st = plain.evaluate(p, {"input": x}, state={})
    assert st == {} and set(out) == {"output"}


def test_state_errors_are_named_before_any_work(backend):
    compiled = ml.compile(ml.BatchNorm1D(2), backend, shapes={"input": [None, 2]})
    params, state = compiled.get_parameters(), compiled.initial_state_dict
    x = backend.randn(5, 2)
    with pytest.raises(KeyMismatchError, match="keeps state"):
        compiled.evaluate(params, {"input": x})
    partial = {k: v for k, v in state.items() if not k.endswith("running_var")}
    with pytest.raises(KeyMismatchError, match=r"state: missing key\(s\) \['batch_norm1_d.running_var'\]"):
        compiled.evaluate(params, {"input": x}, state=partial)
    with pytest.raises(KeyMismatchError, match="unknown key"):
        compiled.evaluate(params, {"input": x}, state={**state, "other": state["batch_norm1_d.running_var"]})
    with pytest.raises(ShapeError, match="state 'batch_norm1_d.running_mean'"):
        compiled.evaluate(params, {"input": x}, state={**state, "batch_norm1_d.running_mean": backend.zeros(3)})
    with pytest.raises(ValueError, match="more than one value per channel"):
        compiled.evaluate(params, {"input": backend.randn(1, 2)}, state=state)
    # in inference mode one sample is fine
    compiled.evaluate(params, {"input": backend.randn(1, 2)}, state=state, training=False)


@pytest.mark.parametrize("block, shape, match", [
    (lambda: ml.BatchNorm2D(3), (2, 4, 5, 5), r"4 channels \(axis 1\) but num_features is 3"),
    (lambda: ml.BatchNorm1D(3), (2, 2, 7), r"2 channels \(axis 1\) but num_features is 3"),
    (lambda: ml.BatchNorm2D(3), (2, 3, 5), r"must be \(N, C, H, W\)"),
    (lambda: ml.BatchNorm1D(3), (2, 3, 5, 5), r"must be \(N, C\) or \(N, C, L\)"),
])
def test_bad_shapes_are_named_at_compile_time(block, shape, match):
    with pytest.raises(ShapeError, match=match):
        ml.compile(block(), ml.NumpyBackend(), shapes={"input": shape})


def test_free_channel_dim_is_checked_on_concrete_inputs(backend):
    compiled = ml.compile(ml.BatchNorm2D(3), backend, shapes={"input": [None, None, 4, 4]})
    with pytest.raises(ShapeError, match="num_features is 3"):
        compiled.evaluate(compiled.get_parameters(), {"input": backend.randn(2, 5, 4, 4)},
                          state=compiled.initial_state_dict)


@pytest.mark.parametrize("make, match", [
    (lambda: ml.BatchNorm2D(0), "num_features must be a positive int"),
    (lambda: ml.BatchNorm1D(2.5), "num_features must be a positive int"),
    (lambda: ml.BatchNorm1D(2, momentum=1.5), "momentum must be in"),
    (lambda: ml.BatchNorm1D(2, eps=-1.0), "eps must be"),
])
def test_bad_arguments_are_named_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_small_cnn_with_batchnorm_and_dropout_backends_agree():
    """Conv → BatchNorm2D → ReLU → Dropout → Linear, 3 training steps then inference:
    outputs, gradients and state agree across backends (float32)."""
    def build():
        m = ml.Model()
        m += ml.Convolution2D(3, 4, padding=1)(input="input")
        m += ml.BatchNorm2D(4)
        m += ml.Relu()
        m += ml.Flatten()
        m += ml.Dropout(0.25)
        m += ml.Linear(2)
        return m

    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((4, 2, 5, 5)) for _ in range(4)]
    res = {}
    for name, cls in BACKENDS.items():
        backend = cls(dtype="float32", seed=2)
        compiled = ml.compile(build(), backend, shapes={"input": [None, 2, 5, 5]})
        params = {k: backend.array(rng.standard_normal(s) if name == "numpy" else res["p"][k])
                  for k, s in compiled.parameter_shapes.items()}
        if name == "numpy":
            res["p"] = {k: to_np(backend, v) for k, v in params.items()}
        state, got = compiled.initial_state_dict, []
        for i, x in enumerate(xs):
            out, grads, state = compiled.evaluate(
                params, {"input": backend.array(x)}, output_gradients={"output": backend.ones(4, 2)},
                state=state, training=i < 3)
            got.append([to_np(backend, out["output"]), *(to_np(backend, grads[k]) for k in sorted(grads)),
                        *(to_np(backend, state[k]) for k in sorted(state))])
        res[name] = got
    for name in ("jax", "torch"):
        for a_step, b_step in zip(res["numpy"], res[name]):
            for a, b in zip(a_step, b_step):
                assert np.allclose(a, b, rtol=1e-4, atol=1e-4), name
