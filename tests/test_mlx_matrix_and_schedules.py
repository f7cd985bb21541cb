"""MLX's Adafactor and Muon (``convention="mlx"``), its schedules, ``clip_grad_norm`` and
``MultiOptimizer``, side by side with MLX 0.32 (the reference) in float64.

MLX keeps a float learning rate as a float32 ``mx.array``: each MLX optimizer here is given
its rate as a float64 ``mx.array`` (``lr64``), the value Mithril takes. Its schedules compute
in float32 from the integer step (``mx.array(step, uint64)``); :func:`in_float64` runs
MLX's very schedule on the step as a float64 array, so that the side-by-side runs compare
float64 arithmetic, and :func:`test_schedule_values_match_mlxs_float32_ones` checks the
float32 values themselves (to float32 rounding). MLX 0.32's CPU ``mx.cos`` of a float64
array is float32's cosine (8e-8 off): the float64 runs of ``cosine_decay`` give MLX's
schedule module a float64 ``cos`` (:func:`precise_cos`), its formula otherwise unchanged.
"""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
optim = pytest.importorskip("mlx.optimizers")

import types  # noqa: E402

import mlx.optimizers.schedulers as mlx_schedulers  # noqa: E402
import torch  # noqa: E402
from conftest import host, native  # noqa: E402

from mithril.errors import ShapeError  # noqa: E402
from mithril.utils.lr_schedulers import (  # noqa: E402
    WSD,
    ExponentialLR,
    JoinSchedules,
    PolynomialDecay,
    StepLR,
)
from mithril.utils.optimizers import (  # noqa: E402
    SGD,
    Adafactor,
    AdamW,
    Muon,
    clip_gradients,
    global_norm,
)

STEPS, TOL = 20, 1e-12
SHAPES = {"w": (5, 3), "wide": (3, 6), "b": (4,), "k": (2, 3, 4), "s": ()}


def lr64(x: float):
    return mx.array(x, dtype=mx.float64)


def in_float64(schedule):
    """MLX's ``schedule`` evaluated on the step as a float64 array (its own arithmetic)."""
    return lambda step: schedule(step.astype(mx.float64))


@pytest.fixture
def precise_cos(monkeypatch):
    """MLX's schedule module with a float64 cosine (see the module's docs)."""
    shim = types.SimpleNamespace(**{k: getattr(mx, k) for k in dir(mx) if not k.startswith("__")})
    shim.cos = lambda x: mx.array(np.cos(np.array(x)), dtype=mx.float64)
    monkeypatch.setattr(mlx_schedulers, "mx", shim)


def test_mlx_cos_of_float64_is_float32s():
    """Why :func:`precise_cos`: if this fails, MLX's float64 cosine became precise; drop it."""
    x = np.linspace(0, 3, 31)
    got = np.array(mx.cos(mx.array(x, dtype=mx.float64)))
    assert np.array_equal(got, np.cos(x.astype(np.float32)).astype(np.float64)) or \
        np.abs(got - np.cos(x)).max() > 1e-9


def grid(cases):
    """(backend, case) for each case on NumPy, torch and JAX; JAX past the first case is
    ``slow`` (eager JAX compiles each operation per shape)."""
    first = next(iter(cases))
    return [pytest.param(b, c, marks=[pytest.mark.slow] if b == "jax" and c != first else [])
            for c in cases for b in ("numpy", "torch", "jax")]


@pytest.fixture
def on(request):
    """The backend of the test's ``backend`` parameter, JAX in float64."""
    if request.node.callspec.params["backend"] == "jax":  # (conftest restores it after)
        import jax

        jax.config.update("jax_enable_x64", True)




def problem(shapes=SHAPES, steps=STEPS, seed=0, dtype="float64"):
    rng = np.random.default_rng(seed)
    p0 = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
    grads = [{k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
             for _ in range(steps)]
    return p0, grads


def run_mlx(opt, p0, grads, dtype=None):
    dtype = dtype or mx.float64
    params = {k: mx.array(v, dtype=dtype) for k, v in p0.items()}
    for g in grads:
        params = opt.apply_gradients({k: mx.array(v, dtype=dtype) for k, v in g.items()},
                                     params)
        mx.eval(params)
    return {k: np.array(v) for k, v in params.items()}


def run_ours(opt, p0, grads, backend="numpy", sched=None):
    params = {k: native(backend, v) for k, v in p0.items()}
    state = opt.init(params)
    if not grads:
        return params, state
    for g in grads:
        params, state = opt.update(params, {k: native(backend, v) for k, v in g.items()},
                                   state)
        if sched is not None:
            sched.step()
    return {k: host(v) for k, v in params.items()}, state


def err(ours, ref):
    return max(float(np.abs(ours[k] - ref[k]).max()) for k in ref)


# -- Adafactor -------------------------------------------------------------------------------
ADAFACTOR = {  # id: (MLX's keywords, ours)
    "defaults": ({}, {}),
    "first moment, decay": ({"beta_1": 0.9, "weight_decay": 0.1},
                            {"beta_1": 0.9, "weight_decay": 0.1}),
    "warmup_init": ({"warmup_init": True, "decay_rate": -0.6},
                    {"warmup_init": True, "beta2_decay": -0.6}),
    "lr, unscaled, clipped": (
        {"learning_rate": lr64(0.05), "relative_step": False, "scale_parameter": False,
         "clip_threshold": 0.5, "eps": (1e-20, 1e-2)},
        {"learning_rate": 0.05, "relative_step": False, "scale_parameter": False, "d": 0.5,
         "epsilon": (1e-20, 1e-2)}),
}


@pytest.mark.parametrize("backend, case", grid(ADAFACTOR))
def test_adafactor_matches_mlx(on, backend, case):
    theirs, ours = ADAFACTOR[case]
    p0, grads = problem()
    ref = run_mlx(optim.Adafactor(**theirs), p0, grads)
    got, state = run_ours(Adafactor(convention="mlx", **ours), p0, grads, backend)
    assert err(got, ref) <= TOL
    assert ("exp_avg" in state.slots) == ("beta_1" in ours)


def test_adafactor_with_a_schedule_and_float32():
    p0, grads = problem()
    sched = optim.step_decay(lr64(0.05), lr64(0.5), 7)
    ref = run_mlx(optim.Adafactor(learning_rate=in_float64(sched), relative_step=False,
                                  weight_decay=0.2), p0, grads)
    opt = Adafactor(0.05, relative_step=False, weight_decay=0.2, convention="mlx")
    got, _ = run_ours(opt, p0, grads, sched=StepLR(opt, step_size=7, gamma=0.5))
    assert err(got, ref) <= TOL
    p32, g32 = problem(dtype="float32")  # MLX's float32 arithmetic: to float32 rounding
    ref = run_mlx(optim.Adafactor(beta_1=0.8), p32, g32, mx.float32)
    got, _ = run_ours(Adafactor(beta_1=0.8, convention="mlx"), p32, g32)
    assert err(got, ref) <= 1e-6


def test_adafactor_step_scalars_are_mlxs_float32_ones():
    """MLX's ``t^decay_rate`` and ``1/√t`` are float32 (its step is an integer array)."""
    opt = Adafactor(convention="mlx", warmup_init=True)
    for t in (1, 2, 3, 17, 999, 2500, 40000):
        _, w, rho = opt.scalars(t)
        step = mx.array(t, dtype=mx.uint64)
        assert w == float(np.array(step ** -0.8))
        assert rho == float(np.array(mx.minimum(1e-6 * step, mx.rsqrt(step))))


# -- Muon -------------------------------------------------------------------------------------
MUON = {
    "defaults": {},
    "no nesterov, no decay": {"nesterov": False, "weight_decay": 0.0},
    "momentum, ns_steps, decay": {"momentum": 0.9, "ns_steps": 3, "weight_decay": 0.1},
}


@pytest.mark.parametrize("backend, case", grid(MUON))
def test_muon_matches_mlx_on_every_rank(on, backend, case):
    """Matrices, a wide one, a vector, a 3-D tensor (orthogonalised as (2, 12)) and a
    scalar: MLX's Muon takes them all."""
    kw = MUON[case]
    p0, grads = problem()
    ref = run_mlx(optim.Muon(lr64(0.02), **kw), p0, grads)
    got, _ = run_ours(Muon(0.02, convention="mlx", **kw), p0, grads, backend)
    assert err(got, ref) <= TOL


def test_muon_defaults_are_mlxs():
    mlx_muon, ours = optim.Muon(0.1), Muon(0.1, convention="mlx")
    assert (ours.weight_decay, ours.momentum, ours.nesterov, ours.ns_steps) == (
        mlx_muon.weight_decay, mlx_muon.momentum, mlx_muon.nesterov, mlx_muon.ns_steps)
    assert ours.fallback is None and ours.ns_dtype is None
    assert not ours.decoupled_weight_decay  # MLX's is g + wd·p
    torch_like = Muon(0.1)
    assert torch_like.weight_decay == 0.1 and torch_like.ns_dtype == "bfloat16"
    assert isinstance(torch_like.fallback, AdamW)


def test_muon_float32_matches_mlx_to_float32_rounding():
    p32, g32 = problem(dtype="float32")
    ref = run_mlx(optim.Muon(0.02), p32, g32, mx.float32)  # (its float32 0.02: ours too)
    got, _ = run_ours(Muon(float(np.float32(0.02)), convention="mlx"), p32, g32)
    assert err(got, ref) <= 1e-5


# -- schedules -------------------------------------------------------------------------------
def _schedules():
    """id: (MLX's schedule, the optimizer's rate, a factory of the Mithril scheduler)."""
    return {
        "exponential_decay": (optim.exponential_decay(lr64(0.05), lr64(0.9)), 0.05,
                              lambda o: ExponentialLR(o, gamma=0.9)),
        "step_decay": (optim.step_decay(lr64(0.05), lr64(0.7), 6), 0.05,
                       lambda o: StepLR(o, step_size=6, gamma=0.7)),
        "cosine_decay": (optim.cosine_decay(lr64(0.05), 15, 0.01), 0.05,  # clamped after 15
                         lambda o: WSD(o, 0, 0, 15, final_lr=0.01, decay_type="cosine")),
        "linear_schedule": (optim.linear_schedule(lr64(0.0), 0.05, 8), 0.0,
                            lambda o: PolynomialDecay(o, 8, end_value=0.05)),
        "join_schedules": (
            optim.join_schedules([optim.linear_schedule(lr64(0.0), 0.05, 5),
                                  optim.cosine_decay(lr64(0.05), 12)], [5]), 0.0,
            lambda o: JoinSchedules(o, [PolynomialDecay(o, 5, end_value=0.05),
                                        WSD(o, 0, 0, 12, decay_type="cosine", base_lr=0.05)],
                                    [5])),
    }


@pytest.mark.parametrize("name", list(_schedules()))
def test_mlx_schedules_drive_the_same_steps(name, precise_cos):
    mlx_sched, lr, make = _schedules()[name]
    p0, grads = problem(steps=25)
    ref = run_mlx(optim.Muon(in_float64(mlx_sched), weight_decay=0.05), p0, grads)
    opt = Muon(lr, weight_decay=0.05, convention="mlx")
    got, _ = run_ours(opt, p0, grads, sched=make(opt))
    assert err(got, ref) <= TOL


@pytest.mark.parametrize("name", list(_schedules()))
def test_schedule_values_match_mlxs_float32_ones(name):
    """MLX's schedule as it runs (float32 from the uint64 step) vs the scheduler's rate at
    each update: to float32 rounding."""
    mlx_sched, lr, make = _schedules()[name]
    opt = Muon(lr, convention="mlx")
    sched = make(opt)
    for step in range(40):
        theirs = float(np.array(mlx_sched(mx.array(step, dtype=mx.uint64)).astype(mx.float32)))
        assert abs(opt.learning_rate - theirs) <= 4e-7 * 0.05, step  # (0.05: the peak)
        sched.step()


# -- clip_grad_norm ----------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.5, 1 - 1e-7, 1 - 1e-9, 1 + 1e-9, 2.0])
def test_clip_grad_norm_is_clip_gradients_and_clip_norm(ratio):
    """``max_norm`` around the norm (just above/below: MLX's 1e-6 in the denominator, as
    torch's, scales a norm within 1e-6 of it too): ``clip_gradients(g, clip_norm=m)`` and an
    optimizer's ``clip_norm=m`` (default ``clip_eps=1e-6``) give MLX's gradients."""
    p0, grads = problem(steps=3)
    norm = np.sqrt(sum(float(np.sum(v * v)) for v in grads[0].values()))
    m = float(norm * ratio)  # (a NumPy float would make MLX's normalizer float32)
    def mlx(d):
        return {k: mx.array(v, dtype=mx.float64) for k, v in d.items()}

    theirs, total = optim.clip_grad_norm(mlx(grads[0]), m)
    assert abs(float(np.array(total)) - global_norm(grads[0])) <= 1e-15 * norm
    ours = clip_gradients(grads[0], clip_norm=m)
    assert err(ours, {k: np.array(v) for k, v in theirs.items()}) <= 1e-15
    # in a step: MLX's Muon on MLX's clipped gradients
    mlx_opt, params = optim.Muon(lr64(0.02)), mlx(p0)
    for g in grads:
        params = mlx_opt.apply_gradients(optim.clip_grad_norm(mlx(g), m)[0], params)
    got, _ = run_ours(Muon(0.02, convention="mlx", clip_norm=m), p0, grads)
    assert err(got, {k: np.array(v) for k, v in params.items()}) <= TOL


# -- MultiOptimizer ------------------------------------------------------------------------------
def test_multioptimizer_of_one_class_is_param_groups():
    """``MultiOptimizer([Muon(a), Muon(b)], [filter])``: one Muon with a group for the
    filter's parameters."""
    p0, grads = problem()
    multi = optim.MultiOptimizer(
        [optim.Muon(lr64(0.05), weight_decay=0.1, nesterov=False),
         optim.Muon(lr64(0.02), weight_decay=0.0)],
        [lambda path, g: g.ndim == 2])
    ref = run_mlx(multi, p0, grads)
    matrices = [k for k, s in SHAPES.items() if len(s) == 2]
    opt = Muon(0.02, weight_decay=0.0, convention="mlx", param_groups=[
        {"params": matrices, "learning_rate": 0.05, "weight_decay": 0.1, "nesterov": False}])
    got, _ = run_ours(opt, p0, grads)
    assert err(got, ref) <= TOL


def test_multioptimizer_of_two_classes_is_a_fallback():
    """``MultiOptimizer([Muon, other], [w.ndim == 2])`` (MLX's recommended pairing, AdamW
    there) is ``Muon(convention="mlx", fallback=other)``: the tensors that are not matrices
    go to the fallback, at its own learning rate (``fallback_lr_ratio``: the ratio of the
    two given). Here MLX's SGD with momentum (torch's SGD: no dampening)."""
    p0, grads = problem()
    multi = optim.MultiOptimizer(
        [optim.Muon(lr64(0.02)),
         optim.SGD(lr64(0.01), momentum=0.9, weight_decay=0.05, nesterov=True)],
        [lambda path, g: g.ndim == 2])
    ref = run_mlx(multi, p0, grads)
    opt = Muon(0.02, convention="mlx",
               fallback=SGD(0.01, momentum=0.9, weight_decay=0.05, nesterov=True))
    got, _ = run_ours(opt, p0, grads)
    assert err(got, ref) <= TOL


# -- interop -------------------------------------------------------------------------------------
INTEROP = {  # id: (ours, MLX's)
    "muon": (lambda: Muon(0.02, convention="mlx"), lambda: optim.Muon(lr64(0.02))),
    "adafactor": (lambda: Adafactor(beta_1=0.9, weight_decay=0.1, convention="mlx"),
                  lambda: optim.Adafactor(beta_1=0.9, weight_decay=0.1)),
}


@pytest.mark.parametrize("name", INTEROP)
def test_torch_optimizer_matches_mlx(name):
    from mithril.interop import torch_optimizer

    make, make_mlx = INTEROP[name]
    p0, grads = problem(shapes={"w": (5, 3), "b": (4,)})
    ref = run_mlx(make_mlx(), p0, grads)
    tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in p0.items()}
    topt = torch_optimizer(make(), list(tp.items()))
    for g in grads:
        for k, p in tp.items():
            p.grad = torch.tensor(g[k])
        topt.step()
    assert err({k: p.detach().numpy() for k, p in tp.items()}, ref) <= TOL


@pytest.mark.parametrize("scalars", ["host", "traced"])
def test_optax_transformation_matches_mlx(scalars):
    """Adafactor's float32 step scalars computed in the jitted program too (``traced``)."""
    import jax

    jax.config.update("jax_enable_x64", True)  # (conftest restores it after the module)
    import jax.numpy as jnp
    import optax

    from mithril.interop import optax_transformation

    p0, grads = problem(shapes={"w": (5, 3), "b": (4,)})
    kw = {"beta_1": 0.9, "weight_decay": 0.1, "warmup_init": True}
    ref = run_mlx(optim.Adafactor(**kw), p0, grads)
    tx = optax_transformation(Adafactor(convention="mlx", **kw), scalars=scalars)
    params = {k: jnp.asarray(v) for k, v in p0.items()}
    state, update = tx.init(params), jax.jit(tx.update)
    for g in grads:
        u, state = update({k: jnp.asarray(v) for k, v in g.items()}, state, params)
        params = optax.apply_updates(params, u)
    assert err({k: np.array(v) for k, v in params.items()}, ref) <= TOL


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("name", ["muon", "adafactor"])
def test_make_train_step_is_evaluate_then_update(on, backend, name):
    """The train step (JAX: one jitted program) equals the model's gradients given to
    ``update``, which the tests above hold to MLX's. (Muon without a bias: the JAX step's
    transformation still refuses a vector to a Muon without a fallback.)"""
    import mithril as ml
    from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
    from mithril.utils.training import make_train_step

    b = {"numpy": NumpyBackend, "torch": TorchBackend, "jax": JaxBackend}[backend](
        dtype="float64")
    m = ml.Model()
    m |= ml.Linear(3, use_bias=name != "muon")(input="input", output="y")
    m |= ml.MeanSquaredError()(input="y", target="target", output=ml.IOKey("loss"))
    c = ml.compile(m, b, shapes={"input": [6, 4], "target": [6, 3]})
    make, _ = INTEROP[name]
    step, opt = make_train_step(c, make(), loss="loss"), make()
    pa = pb = c.get_parameters()
    sa, sb = step.init(pa), opt.init(pb)
    rng = np.random.default_rng(0)
    for _ in range(4):
        data = {k: b.array(rng.standard_normal((6, n))) for k, n in (("input", 4),
                                                                    ("target", 3))}
        pa, sa, _ = step(pa, sa, data)
        _, g = c.evaluate(pb, data, output_gradients={"loss": 1.0})
        pb, sb = opt.update(pb, g, sb)
    assert err({k: host(v) for k, v in pa.items()}, {k: host(v) for k, v in pb.items()}) \
        <= TOL


@pytest.mark.parametrize("name", INTEROP)
def test_checkpoint_resumes_the_mlx_convention(name, tmp_path):
    """A checkpoint keeps ``convention="mlx"`` and MLX's options: loaded into another Muon
    (of the torch convention here) or Adafactor of the MLX convention (the torch one knows
    no ``beta_1``: refused), the run goes on as MLX's."""
    from mithril.utils.checkpoint import load_checkpoint, save_checkpoint

    make, make_mlx = INTEROP[name]
    p0, grads = problem()
    ref = run_mlx(make_mlx(), p0, grads)
    opt = make()
    params, state = run_ours(opt, p0, grads[:7])
    save_checkpoint(tmp_path / "ck.safetensors", params, opt, state)
    blank = Muon(0.5) if name == "muon" else Adafactor(0.5, convention="mlx")
    ck = load_checkpoint(tmp_path / "ck.safetensors", params_template=p0, optimizer=blank)
    params, state = ck["params"], ck["state"]
    assert blank.convention == "mlx"
    for g in grads[7:]:
        params, state = blank.update(params, g, state)
    assert err(params, ref) <= TOL


# -- arguments -------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, exc, match", [
    (lambda: Adafactor(relative_step=False), TypeError, "relative_step=.*convention='mlx'"),
    (lambda: Adafactor(beta_1=0.9, convention="keras"), TypeError, "beta_1=: MLX's option"),
    (lambda: Adafactor(warmup_init="yes", convention="mlx"), TypeError, "warmup_init"),
    (lambda: Adafactor(beta_1=1.0, convention="mlx"), ValueError, "beta_1"),
    (lambda: Adafactor(d=0.0, convention="mlx"), ValueError, "d"),
    (lambda: Adafactor(convention="MLX"), ValueError, "convention"),
    (lambda: Muon(convention="keras"), ValueError, "convention"),
    (lambda: Muon(weight_decay=-1.0, convention="mlx"), ValueError, "weight_decay"),
    (lambda: Muon(adjust_lr_fn="match_rms_adamw", convention="mlx"), ValueError,
     "adjust_lr_fn='match_rms_adamw'"),
    (lambda: Adafactor(param_groups=[{"params": ["b"], "convention": "mlx"}]), ValueError,
     r"param_groups\[0\]: \['convention'\]"),
    (lambda: Adafactor(param_groups=[{"params": ["b"], "warmup_init": True}]), KeyError,
     r"\['warmup_init'\] are not hyperparameters of Adafactor"),
    (lambda: Muon(convention="mlx", param_groups=[{"params": ["b"], "convention": "torch"}]),
     ValueError, r"\['convention'\] configure Muon"),
])
def test_bad_arguments_are_named(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_a_refused_update_changes_nothing():
    opt = Adafactor(beta_1=0.9, convention="mlx")
    p0, grads = problem(shapes={"w": (5, 3), "b": (4,)})
    params, state = opt.update(dict(p0), grads[0], opt.init(dict(p0)))
    before = {k: np.array(v) for k, v in state.slots.items()}
    kept = {k: np.array(v) for k, v in params.items()}
    with pytest.raises(ShapeError, match=r"gradients\['w'\] has shape \(3, 5\)"):
        opt.update(params, {"w": np.ones((3, 5)), "b": grads[1]["b"]}, state)
    assert all(np.array_equal(state.slots[k], before[k]) for k in before)
    assert all(np.array_equal(params[k], kept[k]) for k in kept) and state.step == 1
