"""Review probes (session 46) of the newest surfaces, run side by side with the peers:

* ``X(convention="mlx")`` against ``mlx.optimizers.X`` with non-default options on a
  scalar, a vector, a matrix, a 3-D tensor and a 0-size one (float64 to 1e-12, float32 to
  float32 rounding); ``mlx_optimizer`` in an ``mlx.nn`` loop whose modules are frozen and
  unfrozen mid-run while the learning rate is set, in float16, and on strided MLX arrays;
* ``mlx_optimizer``'s refusals: each names the argument (no MLX / Python internals) and
  changes neither the model nor the optimizer;
* ``ScheduleFree``'s refused checkpoint loads change nothing;
* ``LBFGS(convention="optax")`` against ``optax.lbfgs`` on an ill-conditioned quadratic,
  Rosenbrock and a function with a NaN region, and closures failing inside its zoom line
  search (nothing changed).

MLX keeps a float learning rate in float32: float64 runs give it a float64 ``mx.array``.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from mithril.errors import KeyMismatchError
from mithril.utils.optimizers import (
    LBFGS,
    SGD,
    Adadelta,
    Adafactor,
    AdaGrad,
    Adam,
    Adamax,
    AdamW,
    Lion,
    Muon,
    PolyakSGD,
    RMSProp,
    ScheduleFree,
)

mx = pytest.importorskip("mlx.core")
nn = pytest.importorskip("mlx.nn")
optim = pytest.importorskip("mlx.optimizers")
from mlx.utils import tree_flatten  # noqa: E402 - after the skip

from mithril.interop import mlx_optimizer  # noqa: E402 - needs MLX


def lr64(x: float):
    return mx.array(x, dtype=mx.float64)


# -- convention="mlx" with non-default options, odd shapes ------------------------------------
SHAPES = {"w": (3, 4), "b": (4,), "s": (), "t": (2, 3, 4), "z": (0, 3)}

#: id -> (ours(lr), MLX's(lr), lr)
OPTIONS = {
    "sgd_dampening_wd": (
        lambda lr: SGD(lr, momentum=0.9, dampening=0.5, weight_decay=0.1, convention="mlx"),
        lambda lr: optim.SGD(lr, momentum=0.9, dampening=0.5, weight_decay=0.1), 0.05),
    "sgd_nesterov_wd": (
        lambda lr: SGD(lr, momentum=0.9, weight_decay=0.1, nesterov=True, convention="mlx"),
        lambda lr: optim.SGD(lr, momentum=0.9, weight_decay=0.1, nesterov=True), 0.05),
    "adam_bc_betas_eps": (
        lambda lr: Adam(lr, beta1=0.5, beta2=0.9, epsilon=1e-3, bias_correction=True,
                        convention="mlx"),
        lambda lr: optim.Adam(lr, betas=[0.5, 0.9], eps=1e-3, bias_correction=True), 0.01),
    "adamw_bc_wd": (
        lambda lr: AdamW(lr, beta1=0.5, beta2=0.9, epsilon=1e-3, weight_decay=0.2,
                         bias_correction=True, convention="mlx"),
        lambda lr: optim.AdamW(lr, betas=[0.5, 0.9], eps=1e-3, weight_decay=0.2,
                               bias_correction=True), 0.01),
    "adamax": (lambda lr: Adamax(lr, beta1=0.5, beta2=0.8, epsilon=1e-2, convention="mlx"),
               lambda lr: optim.Adamax(lr, betas=[0.5, 0.8], eps=1e-2), 0.01),
    "rmsprop": (lambda lr: RMSProp(lr, decay=0.5, epsilon=1e-2, convention="mlx"),
                lambda lr: optim.RMSprop(lr, alpha=0.5, eps=1e-2), 0.01),
    "adagrad": (lambda lr: AdaGrad(lr, epsilon=1e-2, convention="mlx"),
                lambda lr: optim.Adagrad(lr, eps=1e-2), 0.1),
    "adadelta": (lambda lr: Adadelta(lr, rho=0.5, epsilon=1e-3, convention="mlx"),
                 lambda lr: optim.AdaDelta(lr, rho=0.5, eps=1e-3), 0.5),
    "lion": (lambda lr: Lion(lr, beta1=0.5, beta2=0.8, weight_decay=0.3, convention="mlx"),
             lambda lr: optim.Lion(lr, betas=[0.5, 0.8], weight_decay=0.3), 0.003),
    "adafactor_all_options": (
        lambda lr: Adafactor(lr, epsilon=(1e-20, 1e-2), d=0.5, beta2_decay=-0.5, beta_1=0.7,
                             weight_decay=0.1, scale_parameter=False, relative_step=False,
                             convention="mlx"),
        lambda lr: optim.Adafactor(lr, eps=(1e-20, 1e-2), clip_threshold=0.5,
                                   decay_rate=-0.5, beta_1=0.7, weight_decay=0.1,
                                   scale_parameter=False, relative_step=False), 0.05),
    "adafactor_relative_step": (
        lambda lr: Adafactor(epsilon=(1e-20, 1e-2), d=0.5, beta2_decay=-0.5, beta_1=0.7,
                             weight_decay=0.1, convention="mlx"),
        lambda lr: optim.Adafactor(eps=(1e-20, 1e-2), clip_threshold=0.5, decay_rate=-0.5,
                                   beta_1=0.7, weight_decay=0.1), 0.05),
    "adafactor_warmup_init": (
        lambda lr: Adafactor(warmup_init=True, scale_parameter=False, convention="mlx"),
        lambda lr: optim.Adafactor(warmup_init=True, scale_parameter=False), 0.05),
    "muon_options": (
        lambda lr: Muon(lr, momentum=0.8, weight_decay=0.1, nesterov=False, ns_steps=3,
                        convention="mlx"),
        lambda lr: optim.Muon(lr, momentum=0.8, weight_decay=0.1, nesterov=False,
                              ns_steps=3), 0.02),
}


def problem(dtype: str, steps: int = 15, seed: int = 0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    p0 = {k: np.asarray(rng.standard_normal(s), dtype=dtype) for k, s in shapes.items()}
    grads = [{k: np.asarray(rng.standard_normal(s) * (1 + t % 3), dtype=dtype)
              for k, s in shapes.items()} for t in range(steps)]
    return p0, grads


def mlx_run(opt, p0, grads, dtype):
    params = {k: mx.array(v, dtype=dtype) for k, v in p0.items()}
    for g in grads:
        params = opt.apply_gradients({k: mx.array(v, dtype=dtype) for k, v in g.items()},
                                     params)
        mx.eval(params)
    return {k: np.array(v) for k, v in params.items()}


def ours_run(opt, p0, grads):
    params = {k: v.copy() for k, v in p0.items()}
    state = opt.init(params)
    for g in grads:
        params, state = opt.update(params, g, state)
    return {k: np.asarray(v) for k, v in params.items()}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", list(OPTIONS))
def test_mlx_convention_with_non_default_options_on_odd_shapes(case, dtype):
    ours, theirs, lr = OPTIONS[case]
    p0, grads = problem(dtype)
    if dtype == "float64":  # (MLX's float lr is float32: give it ours, float64)
        ref, got = mlx_run(theirs(lr64(lr)), p0, grads, mx.float64), ours_run(ours(lr), p0, grads)
        tol = 1e-12
    else:  # (float32 both: MLX's lr is float32(lr), ours too)
        ref = mlx_run(theirs(lr), p0, grads, mx.float32)
        got, tol = ours_run(ours(float(np.float32(lr))), p0, grads), 2e-6
    for k in SHAPES:
        assert got[k].dtype == np.dtype(dtype) and got[k].shape == SHAPES[k], k
        if ref[k].size:
            scale = max(1.0, float(np.abs(ref[k]).max()))
            assert float(np.abs(got[k] - ref[k]).max()) <= tol * scale, (k, got[k], ref[k])
    assert float(np.abs(got["w"] - p0["w"]).max()) > 1e-5  # (it moved: warmup_init barely)


def test_mlxs_adafactor_names_are_refused_naming_ours():
    """MLX's ``decay_rate=`` / ``clip_threshold=`` (was: "unexpected keyword argument
    'decay_rate'" with no hint; only "Keras's clip_threshold"); ours with the names the error
    gives are MLX's numbers."""
    with pytest.raises(TypeError, match="MLX's decay_rate=: ours is beta2_decay"):
        Adafactor(convention="mlx", decay_rate=-0.5)
    with pytest.raises(TypeError, match="MLX's and Keras's clip_threshold=: ours is d"):
        Adafactor(convention="mlx", clip_threshold=0.5)
    p0, grads = problem("float64", steps=6)
    ref = mlx_run(optim.Adafactor(decay_rate=-0.5, clip_threshold=0.5), p0, grads, mx.float64)
    got = ours_run(Adafactor(beta2_decay=-0.5, d=0.5, convention="mlx"), p0, grads)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=1e-12)


# -- mlx_optimizer in an mlx.nn loop: freezing, unfreezing, lr set, float16, strides -------
_rng = np.random.default_rng(1)
X = _rng.standard_normal((16, 4)).astype(np.float32)
Y = _rng.integers(0, 3, 16)


def freeze_run(opt):
    """12 steps of a Linear-LayerNorm-Linear model: layer 0 frozen at step 3, LayerNorm's
    bias at 6, all unfrozen at 8; the learning rate set at steps 5 and 9."""
    mx.random.seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    loss_and_grad = nn.value_and_grad(
        model, lambda m, x, y: nn.losses.cross_entropy(m(x), y, reduction="mean"))
    opt.init(model.trainable_parameters())
    x, y = mx.array(X), mx.array(Y)
    for t in range(12):
        if t == 3:
            model.layers[0].freeze()
        if t == 6:
            model.layers[1].freeze(keys=["bias"])
        if t == 8:
            model.unfreeze()
        if t in (5, 9):
            opt.learning_rate = 0.003 if t == 5 else 0.02
        _, grads = loss_and_grad(model, x, y)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
    return ({k: np.array(v) for k, v in tree_flatten(model.parameters())},
            int(opt.state["step"]), float(opt.state["learning_rate"]))


@pytest.mark.parametrize("ours, theirs", [
    (lambda: AdamW(1e-2, weight_decay=0.1, bias_correction=True, convention="mlx"),
     lambda: optim.AdamW(1e-2, weight_decay=0.1, bias_correction=True)),
    (lambda: SGD(0.1, momentum=0.9, nesterov=True, weight_decay=0.01, convention="mlx"),
     lambda: optim.SGD(0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    (lambda: Adafactor(1e-2, relative_step=False, beta_1=0.9, weight_decay=0.1,
                       convention="mlx"),
     lambda: optim.Adafactor(1e-2, relative_step=False, beta_1=0.9, weight_decay=0.1)),
    (lambda: Muon(0.02, convention="mlx"), lambda: optim.Muon(0.02)),
], ids=["adamw", "sgd", "adafactor", "muon"])
def test_mlx_loop_with_frozen_modules_and_lr_changes(ours, theirs):
    """A frozen module has no gradient: left alone (no weight decay, its slots kept), as
    MLX's; the step count stays one for all."""
    got, step, lr = freeze_run(mlx_optimizer(ours()))
    ref, ref_step, ref_lr = freeze_run(theirs())
    assert (step, lr) == (ref_step, ref_lr) == (12, float(np.float32(0.02)))
    for k in ref:
        assert float(np.abs(got[k] - ref[k]).max()) <= 2e-6 * max(1, np.abs(ref[k]).max()), k


@pytest.mark.parametrize("ours, theirs, tol", [
    (lambda: Adam(1e-2, epsilon=1e-4, convention="mlx"), lambda: optim.Adam(1e-2, eps=1e-4), 0),
    (lambda: SGD(0.1, momentum=0.9, convention="mlx"), lambda: optim.SGD(0.1, momentum=0.9), 0),
    (lambda: Lion(1e-2, convention="mlx"), lambda: optim.Lion(1e-2), 0),
    (lambda: Adafactor(convention="mlx"), lambda: optim.Adafactor(), 2e-3),
    (lambda: Muon(0.02, convention="mlx"), lambda: optim.Muon(0.02), 2e-3),
], ids=["adam", "sgd", "lion", "adafactor", "muon"])
def test_mlx_optimizer_in_float16_is_mlxs(ours, theirs, tol):
    """float16 parameters through the wrapper: MLX's float16 arithmetic (Adafactor's and
    Muon's reductions within two float16 ulps of 1)."""
    rng = np.random.default_rng(0)
    shapes = {"w": (6, 5), "b": (5,)}
    p0 = {k: rng.standard_normal(s) for k, s in shapes.items()}
    grads = [{k: rng.standard_normal(s) for k, s in shapes.items()} for _ in range(10)]
    got = mlx_run(mlx_optimizer(ours()), p0, grads, mx.float16)
    ref = mlx_run(theirs(), p0, grads, mx.float16)
    for k in shapes:
        assert got[k].dtype == np.float16
        assert float(np.abs(got[k].astype(np.float64) - ref[k]).max()) <= tol, k


def test_mlx_optimizer_reads_strided_arrays():
    """Transposed, broadcast and sliced ``mx.array`` parameters and gradients (NumPy views
    with strides, stride 0 for the broadcast): MLX's numbers."""
    rng = np.random.default_rng(0)
    w, g = (rng.standard_normal((4, 3)).astype(np.float32) for _ in range(2))
    views = [(mx.array(w.T.copy()).T, mx.array(g.T.copy()).T),
             (mx.broadcast_to(mx.array(w[:1]), (4, 3)), mx.broadcast_to(mx.array(g[:1]), (4, 3))),
             (mx.array(np.repeat(w, 2, 1))[:, ::2], mx.array(np.repeat(g, 2, 1))[:, ::2])]
    for p, grad in views:
        ours, theirs = mlx_optimizer(Adam(1e-2, convention="mlx")), optim.Adam(1e-2)
        a = b = {"w": p}
        for _ in range(3):
            a, b = ours.apply_gradients({"w": grad}, a), theirs.apply_gradients({"w": grad}, b)
            mx.eval(a, b)
        np.testing.assert_allclose(np.array(a["w"]), np.array(b["w"]), rtol=0, atol=1e-7)


def test_a_mithril_scheduler_drives_the_wrapped_optimizer():
    """``StepLR(opt.mithril_optimizer, 3, 0.5)`` is MLX's ``step_decay(lr, 0.5, 3)`` (was:
    the wrapper put its own rate back at every update, the scheduler's lost: 0.01 throughout
    against MLX's 0.01 → 0.00125); a rate set as ``opt.learning_rate`` afterwards wins."""
    from mithril.utils.lr_schedulers import StepLR

    p0, grads = problem("float64", steps=10, shapes={"w": (3, 4), "b": (4,)})
    ours = mlx_optimizer(Adam(0.01, bias_correction=True, convention="mlx"))
    sched = StepLR(ours.mithril_optimizer, step_size=3, gamma=0.5)
    theirs = optim.Adam(optim.step_decay(lr64(0.01), lr64(0.5), 3), bias_correction=True)
    a = b = {k: mx.array(v, dtype=mx.float64) for k, v in p0.items()}
    for g in grads:
        g = {k: mx.array(v, dtype=mx.float64) for k, v in g.items()}
        a, b = ours.apply_gradients(g, a), theirs.apply_gradients(g, b)
        mx.eval(a, b)
        sched.step()
        for k in a:
            np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), rtol=0, atol=1e-12)
    assert ours.state["learning_rate"].item() == pytest.approx(0.00125, rel=1e-7)
    ours.learning_rate = 0.5  # (MLX's side set after the scheduler's: it wins)
    sched.step()
    ours.apply_gradients(g, a)
    assert ours.mithril_optimizer.learning_rate == 0.5


def test_muon_fallback_rate_under_a_muon_schedule_as_mlxs_multi_optimizer():
    """MLX's ``MultiOptimizer([Muon(schedule), AdamW(0.01)], [matrices])`` keeps AdamW's
    rate; ours keeps the fallback's as its ratio to Muon's (documented in
    coming-from-mlx.md), so the recipe sets the ratio at each step. Without it the vector
    is 0.12 off MLX's after 8 steps; with it, exact."""
    p0, grads = problem("float64", steps=8, shapes={"w": (4, 3), "b": (3,)})
    schedule = optim.step_decay(lr64(0.02), lr64(0.5), 3)
    theirs = optim.MultiOptimizer([optim.Muon(schedule), optim.AdamW(lr64(0.01),
                                                                     weight_decay=0.0)],
                                  [lambda path, w: w.ndim == 2])
    ref = mlx_run(theirs, p0, grads, mx.float64)
    worst = {}
    for recipe in (False, True):
        opt = Muon(0.02, convention="mlx", fallback=AdamW(0.01, weight_decay=0.0,
                                                           convention="mlx"))
        params = {k: v.copy() for k, v in p0.items()}
        state = opt.init(params)
        for t, g in enumerate(grads):
            lr = float(schedule(mx.array(t, mx.uint64)))
            opt.set_learning_rate(lr)
            if recipe:
                opt.fallback_lr_ratio = 0.01 / lr
            params, state = opt.update(params, g, state)
        worst[recipe] = {k: float(np.abs(params[k] - ref[k]).max()) for k in params}
    assert worst[True]["w"] <= 1e-12 and worst[True]["b"] <= 1e-12, worst
    assert worst[False]["w"] <= 1e-12 and worst[False]["b"] > 0.05, worst


@pytest.mark.parametrize("make", [
    lambda: optim.linear_schedule(1e-2, 0.0, 5),
    lambda: optim.join_schedules([optim.linear_schedule(0.0, 1e-2, 3),
                                  optim.linear_schedule(1e-2, 0.0, 5)], [3])],
    ids=["linear_to_0", "warmup_then_linear_to_0"])
def test_an_mlx_schedule_decaying_to_zero_runs_to_its_end(make):
    """MLX's ``linear_schedule(1e-2, 0, 5)`` is −9.3e-10 from step 5 (float32 rounding):
    MLX steps with it; the wrapper refused it at step 5 ("learning_rate must be >= 0 and
    finite, got -9.313225746154785e-10"), ending the run. Now 0: MLX's float32 numbers."""
    got = freeze_free_run(mlx_optimizer(Adam(convention="mlx")), make())
    ref = freeze_free_run(optim.Adam(make()), None)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=1e-7)
    assert float(make()(mx.array(12, mx.uint64))) < 0  # (MLX's own value, still negative)


def freeze_free_run(opt, schedule, steps=12):
    if schedule is not None:
        opt.learning_rate = schedule
    mx.random.seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    loss_and_grad = nn.value_and_grad(
        model, lambda m, x, y: nn.losses.cross_entropy(m(x), y, reduction="mean"))
    for _ in range(steps):
        _, grads = loss_and_grad(model, mx.array(X), mx.array(Y))
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


# -- mlx_optimizer's refusals: the argument named, nothing changed ------------------------------
def snapshot(opt, model=None):
    sd = json.dumps(opt.state_dict(), default=lambda a: np.asarray(a).tolist(), sort_keys=True)
    params = {k: np.array(v).tolist() for k, v in tree_flatten(model.parameters())} \
        if model is not None else None
    return (sd, int(opt.state["step"]), float(opt.state["learning_rate"]),
            {k: np.asarray(v).tolist() for k, v in (opt._params or {}).items()}, params)


def stepped(opt, steps=2):
    mx.random.seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    loss_and_grad = nn.value_and_grad(model, lambda m, x: (m(x) ** 2).mean())
    for _ in range(steps):
        _, grads = loss_and_grad(model, mx.array(X))
        opt.update(model, grads)
        mx.eval(model.parameters())
    return model, loss_and_grad(model, mx.array(X))[1]


def test_mlx_optimizer_refusals_name_the_argument_and_change_nothing():
    opt = mlx_optimizer(Adam(1e-2, nonfinite="raise"))
    model, grads = stepped(opt)
    saved = opt.state_dict()
    other = nn.Sequential(nn.Linear(3, 2))  # (another model: none of the saved names)
    before = snapshot(opt, model)
    cases = [  # (was: AttributeError from inside / a KeyError naming "parameters []")
        (TypeError, "eval_params: Adam is not schedule-free", lambda: opt.eval_params()),
        (KeyMismatchError, r"parameters has no \['layers.2.bias', 'layers.2.weight'\]",
         lambda: opt.load_state_dict(saved, other)),
        (TypeError, "model must be an mlx.nn.Module, got dict",
         lambda: opt.update(model.parameters(), grads)),
        (TypeError, "state dict must be a dict, got NoneType", lambda: opt.load_state_dict(None)),
    ]
    for err, match, call in cases:
        with pytest.raises(err, match=match):
            call()
        assert snapshot(opt, model) == before
    fresh = mlx_optimizer(Adam(1e-2))  # (was: "argument of type 'NoneType' is not iterable")
    with pytest.raises(TypeError, match="state dict must be a dict, got NoneType"):
        fresh.load_state_dict(None)
    assert fresh.mithril_state is None and int(fresh.state["step"]) == 0
    # the same saved state into the right model: loads, and steps as the original
    fresh.load_state_dict(saved, model)
    fresh.update(model, grads)
    opt.update(model, grads)
    assert json.dumps(fresh.state_dict(), default=lambda a: np.asarray(a).tolist()) == \
        json.dumps(opt.state_dict(), default=lambda a: np.asarray(a).tolist())


def test_a_loss_that_is_not_a_scalar_is_refused_by_name():
    """``loss=`` and a closure's loss as a vector ``mx.array`` (was: MLX's "[convert] Only
    length-1 arrays can be converted to Python scalars")."""
    opt, ref = mlx_optimizer(PolyakSGD(max_learning_rate=0.5)), PolyakSGD(max_learning_rate=0.5)
    p = {"w": mx.array([1.0, -2.0, 0.5])}
    with pytest.raises(ValueError, match=r"loss must be a scalar, got an mx.array of shape \(3,\)"):
        opt.apply_gradients(p, p, loss=mx.ones(3))
    assert opt.mithril_state is None and int(opt.state["step"]) == 0
    new = opt.apply_gradients(p, p, loss=mx.array(2.0))  # (a scalar: PolyakSGD's own step)
    q = {"w": np.array([1.0, -2.0, 0.5], np.float32)}
    want, _ = ref.update(q, {k: v.copy() for k, v in q.items()}, ref.init(q), loss=2.0)
    np.testing.assert_array_equal(np.array(new["w"]), want["w"])
    lbfgs = mlx_optimizer(LBFGS(convention="optax"))
    with pytest.raises(ValueError, match="the closure's loss must be a scalar"):
        lbfgs.apply_gradients(None, p, closure=lambda q: (mx.ones(2), q))
    assert lbfgs.mithril_state is None


@pytest.fixture
def x64():
    import jax

    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", old)


# -- ScheduleFree: a refused checkpoint load changes nothing ------------------------------------
def sf_snapshot(opt, state, params):
    return (json.dumps(opt.state_dict(state), default=lambda a: np.asarray(a).tolist(),
                       sort_keys=True), {k: v.tolist() for k, v in params.items()})


SF_BAD = {  # id: (edit of the state dict, error, match)
    "z_shape": ("e['slots']['z']['w'] = np.ones((4, 3))", ValueError, "slot 'z' of 'w'"),
    "z_missing": ("del e['slots']['z']", KeyError, r"ScheduleFree's \['z'\]"),
    "z_param_missing": ("del e['slots']['z']['w']", KeyError, "slot 'z' must have exactly"),
    "weight_sum_missing": ("del e['values']['weight_sum']", KeyError, "weight_sum"),
    "weight_sum_text": ("e['values']['weight_sum'] = 'x'", TypeError, "'weight_sum'"),
    "b1_zero": ("e['hyperparameters']['b1'] = 0.0", ValueError, "b1 must be in"),
    "base_lr_nan": ("e['hyperparameters']['base_optimizer']['hyperparameters']"
                    "['learning_rate'] = float('nan')", ValueError, "learning_rate"),
    "base_class": ("e['hyperparameters']['base_optimizer']['optimizer'] = 'SGD'", ValueError,
                   "base optimizer is 'SGD'"),
    "step_negative": ("e['step'] = -1", ValueError, "'step'"),
}


@pytest.mark.parametrize("case", list(SF_BAD))
def test_schedule_free_refused_loads_change_nothing(case, x64):
    import optax
    import optax.contrib as oc

    edit, err, match = SF_BAD[case]
    rng = np.random.default_rng(0)
    p0 = {"w": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)}
    grads = [{k: rng.standard_normal(v.shape) for k, v in p0.items()} for _ in range(4)]
    opt = ScheduleFree(Adam(0.05, beta1=0.0), b1=0.8)
    params = {k: v.copy() for k, v in p0.items()}
    state = opt.init(params)
    for g in grads[:2]:
        params, state = opt.update(params, g, state)
    d = opt.state_dict(state)
    e = copy.deepcopy(d)
    exec(edit, {"e": e, "np": np})
    before = sf_snapshot(opt, state, params)
    with pytest.raises(err, match=match):
        opt.load_state_dict(e, params)
    assert sf_snapshot(opt, state, params) == before
    # the optimizer goes on as optax's schedule_free (x64 NumPy vs optax on float64 NumPy)
    state = opt.load_state_dict(d, params)
    for g in grads[2:]:
        params, state = opt.update(params, g, state)
    tx = oc.schedule_free(optax.adam(0.05, b1=0.0), 0.05, b1=0.8)
    q = {k: v.copy() for k, v in p0.items()}
    s = tx.init(q)
    for g in grads:
        u, s = tx.update(g, s, q)
        q = optax.apply_updates(q, u)
    for k in q:
        np.testing.assert_allclose(params[k], np.asarray(q[k]), rtol=0, atol=1e-12)


def test_schedule_free_in_an_mlx_loop_on_an_mlx_schedule_is_optaxs(x64):
    """``mlx_optimizer(ScheduleFree(Adam(beta1=0)), learning_rate=schedule)``: the base and
    the averaging weight read the schedule at MLX's step (0 first), optax's
    ``schedule_free(adam(schedule), lambda c: schedule(c - 1))`` (its wrapper counts from 1).
    optax's schedule of its int32 count is float32: MLX's schedule is given those values."""
    import jax.numpy as jnp
    import optax
    import optax.contrib as oc

    def schedule(c):  # warm-up over 4 steps, then decay
        return 0.1 * jnp.minimum(1.0, (c + 1) / 4) * 0.9 ** jnp.maximum(0, c - 4)

    p0, grads = problem("float64", steps=10, shapes={"w": (3, 4), "b": (4,)})
    ours = mlx_optimizer(ScheduleFree(Adam(0.1, beta1=0.0), b1=0.8), learning_rate=lambda step:
                         lr64(float(schedule(jnp.asarray(int(step), jnp.int32)))))
    tx = oc.schedule_free(optax.adam(schedule, b1=0.0), lambda c: schedule(c - 1), b1=0.8)
    p = {k: mx.array(v, dtype=mx.float64) for k, v in p0.items()}
    q = {k: jnp.asarray(v) for k, v in p0.items()}
    s = tx.init(q)
    for g in grads:
        p = ours.apply_gradients({k: mx.array(v, dtype=mx.float64) for k, v in g.items()}, p)
        u, s = tx.update({k: jnp.asarray(v) for k, v in g.items()}, s, q)
        q = optax.apply_updates(q, u)
        for k in q:
            np.testing.assert_allclose(np.array(p[k]), np.asarray(q[k]), rtol=0, atol=1e-12)
    x, want = ours.eval_params(), oc.schedule_free_eval_params(s, q)
    for k in q:
        np.testing.assert_allclose(np.array(x[k]), np.asarray(want[k]), rtol=0, atol=1e-12)
    assert ours.state["learning_rate"].item() == float(schedule(jnp.asarray(9, jnp.int32)))


# -- LBFGS(convention="optax") on harder functions ----------------------------------------------
def _functions():
    import jax.numpy as jnp

    diag = jnp.asarray(np.logspace(0, 6, 8))

    def ill_conditioned(x):  # condition number 1e6
        return 0.5 * jnp.sum(diag * (x - 1.0) ** 2)

    def rosenbrock(x):
        return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2)

    def nan_region(x):  # x·log x − x/2: NaN for x < 0, where the first zoom steps land
        return jnp.sum(x * jnp.log(x) - 0.5 * x)

    return {"ill_conditioned": (ill_conditioned, np.linspace(-3, 3, 8), 15),
            "rosenbrock": (rosenbrock, np.array([-1.2, 1.0, -0.5, 0.8]), 25),
            "nan_region": (nan_region, np.array([0.05, 3.0, 0.02]), 10)}


def lbfgs_pair(name):
    """optax.lbfgs's iterates and zoom steps, and ours (NumPy), on function ``name``."""
    import jax
    import jax.numpy as jnp
    import optax

    f, x0, iters = _functions()[name]
    tx = optax.lbfgs(linesearch=optax.scale_by_zoom_linesearch(
        max_linesearch_steps=20, initial_guess_strategy="one"))
    vg = optax.value_and_grad_from_state(f)

    @jax.jit
    def step(x, s):
        v, g = vg(x, state=s)
        u, s = tx.update(g, s, x, value=v, grad=g, value_fn=f)
        return optax.apply_updates(x, u), s

    x, s = jnp.asarray(x0), tx.init(jnp.asarray(x0))
    value_and_grad = jax.jit(jax.value_and_grad(f))

    def closure(p):
        v, g = value_and_grad(jnp.asarray(p["x"]))
        return float(v), {"x": np.asarray(g)}

    opt = LBFGS(convention="optax")
    params = {"x": x0.astype(np.float64)}
    state = opt.init(params)
    out = []
    for _ in range(iters):
        x, s = step(x, s)
        params, state = opt.update(params, None, state, closure=closure)
        out.append((np.asarray(params["x"]), np.asarray(x),
                    int(state.values["num_linesearch_steps"]),
                    int(optax.tree.get(s, "info").num_linesearch_steps)))
    return out


@pytest.mark.parametrize("name", [
    "ill_conditioned", pytest.param("rosenbrock", marks=pytest.mark.slow),
    pytest.param("nan_region", marks=pytest.mark.slow)])
def test_lbfgs_optax_on_harder_functions(name, x64):
    out = lbfgs_pair(name)
    for ours, theirs, steps, their_steps in out:
        assert steps == their_steps
        assert float(np.abs(ours - theirs).max()) <= 1e-10 * max(1.0, np.abs(theirs).max())
    assert np.isfinite(out[-1][0]).all()


def test_lbfgs_optax_closure_failing_in_the_line_search_changes_nothing():
    """A closure that fails at a zoom trial point (wrong shape, missing key, float32, a
    vector loss, no pair, an exception): the error names what, nothing changed; the next
    update with a good closure is the uninterrupted run's."""
    a = np.diag([1.0, 10.0, 100.0])

    def good(p):
        return float(0.5 * p["x"] @ a @ p["x"]), {"x": a @ p["x"]}

    opt = LBFGS(convention="optax")
    params = {"x": np.array([1.0, 2.0, 3.0])}
    state = opt.init(params)
    for _ in range(2):
        params, state = opt.update(params, None, state, closure=good)
    bad = [
        (ValueError, r"closure's gradients\['x'\] has shape", lambda q: (1.0, {"x": np.ones(4)})),
        (KeyMismatchError, r"missing \['x'\]", lambda q: (1.0, {})),
        (TypeError, "float32", lambda q: (1.0, {"x": q["x"].astype(np.float32)})),
        (TypeError, "closure's loss must be a number", lambda q: (np.ones(2), good(q)[1])),
        (TypeError, r"must return \(loss, gradients\)", lambda q: good(q)[1]),
        (ZeroDivisionError, "division by zero", lambda q: 1 / 0),
    ]
    before = sf_snapshot(opt, state, params)
    for err, match, fail in bad:
        calls = []

        def closure(q, fail=fail, calls=calls):  # (optax's: the loss at params is the
            calls.append(1)                          # state's, the first call a trial point)
            return fail(q)

        with pytest.raises(err, match=match):
            opt.update(params, None, state, closure=closure)
        assert len(calls) == 1 and sf_snapshot(opt, state, params) == before
    ref = LBFGS(convention="optax")
    p_ref = {"x": np.array([1.0, 2.0, 3.0])}
    s_ref = ref.init(p_ref)
    for _ in range(3):
        p_ref, s_ref = ref.update(p_ref, None, s_ref, closure=good)
    params, state = opt.update(params, None, state, closure=good)
    np.testing.assert_array_equal(params["x"], p_ref["x"])


def test_lbfgs_memory_size_hint():
    with pytest.raises(TypeError, match="history_size"):
        LBFGS(convention="optax", memory_size=3)
