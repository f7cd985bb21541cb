"""Review probes of ``convention="mlx"`` where the authors' tests do not go, each run side by
side with ``mlx.optimizers`` (float64 on MLX's CPU build unless named): per-group
hyperparameters (MLX: one optimizer per group, its ``MultiOptimizer``), ``clip_norm`` (MLX's
``clip_grad_norm`` first), ``nonfinite="skip"`` (MLX never sees the skipped step), an EMA of
the parameters (of MLX's trajectory), the jitted JAX engine and torch's fused-ops engine,
float32 on torch and JAX, a checkpoint loaded into an optimizer built with another
convention (Adafactor's MLX-only options included, both ways), Muon on 3-D / 4-D tensors
whose last two axes scale its lr, Adafactor on a zero parameter (its scale falls to
``eps[1]``), and Muon / Adafactor with groups, an EMA, a skipped step and both engines.

MLX keeps a float learning rate in float32: float64 runs give it a float64 ``mx.array``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import host, native, optimizer_engine

from mithril.utils.optimizers import (
    SGD,
    Adadelta,
    Adafactor,
    AdaGrad,
    Adam,
    Adamax,
    AdamW,
    Lion,
    Muon,
    RMSProp,
)

mx = pytest.importorskip("mlx.core")
optim = pytest.importorskip("mlx.optimizers")

TOL, STEPS = 1e-12, 20
SHAPES = {"w": (3, 4), "b": (4,), "s": ()}

# id -> (our class, our kwargs, MLX class name, MLX kwargs, lr)
CASES = {
    "sgd_damp_wd": (SGD, {"momentum": 0.9, "dampening": 0.3, "weight_decay": 0.1}, "SGD",
                    {"momentum": 0.9, "dampening": 0.3, "weight_decay": 0.1}, 0.05),
    "sgd_nesterov": (SGD, {"momentum": 0.8, "nesterov": True}, "SGD",
                     {"momentum": 0.8, "nesterov": True}, 0.05),
    "adam_bc": (Adam, {"bias_correction": True, "beta2": 0.99}, "Adam",
                {"bias_correction": True, "betas": [0.9, 0.99]}, 0.01),
    "adamw": (AdamW, {"weight_decay": 0.1}, "AdamW", {"weight_decay": 0.1}, 0.01),
    "adamax": (Adamax, {}, "Adamax", {}, 0.01),
    "rmsprop": (RMSProp, {}, "RMSprop", {}, 0.01),
    "adagrad": (AdaGrad, {}, "Adagrad", {}, 0.1),
    "adadelta": (Adadelta, {}, "AdaDelta", {}, 1.0),
    "lion_wd": (Lion, {"weight_decay": 0.1}, "Lion", {"weight_decay": 0.1}, 0.003),
}


def lr64(x: float):
    return mx.array(x, dtype=mx.float64)


def problem(dtype: str = "float64", steps: int = STEPS, seed: int = 0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    p0 = {k: np.asarray(rng.standard_normal(s), dtype=dtype) for k, s in shapes.items()}
    grads = [{k: np.asarray(rng.standard_normal(s) * (1 + t % 4), dtype=dtype)
              for k, s in shapes.items()} for t in range(steps)]
    return p0, grads


def mlx_run(opts, p0, grads, dtype=None, clip=None, split=None):
    """MLX's parameters after each step: ``opts`` one optimizer, or one per group with
    ``split(name) -> index`` (MLX's ``MultiOptimizer`` does the same); ``clip``: MLX's
    ``clip_grad_norm`` of the whole tree first."""
    dtype = dtype or mx.float64
    opts = opts if isinstance(opts, list) else [opts]
    split = split or (lambda k: 0)
    params = {k: mx.array(v, dtype=dtype) for k, v in p0.items()}
    out = []
    for g in grads:
        gm = {k: mx.array(v, dtype=dtype) for k, v in g.items()}
        if clip is not None:
            gm = optim.clip_grad_norm(gm, clip)[0]
        new = dict(params)
        for i, o in enumerate(opts):
            part = {k: v for k, v in gm.items() if split(k) == i}
            if part:
                new.update(o.apply_gradients(part, params))
        params = new
        mx.eval(params)
        out.append({k: np.array(v) for k, v in params.items()})
    return out


def ours_run(opt, p0, grads, backend="numpy", keep_state=False):
    params = {k: native(backend, v) for k, v in p0.items()}
    state = opt.init(params)
    out = []
    for g in grads:
        params, state = opt.update(params, {k: native(backend, v) for k, v in g.items()}, state)
        out.append({k: host(v) for k, v in params.items()})
    return (out, state) if keep_state else out


def worst(a, b) -> float:
    assert len(a) == len(b) > 0
    return max(float(np.max(np.abs(x[k] - y[k]))) / max(1.0, float(np.max(np.abs(y[k]))))
               for x, y in zip(a, b) for k in y)


@pytest.fixture
def x64():
    import jax

    jax.config.update("jax_enable_x64", True)  # (conftest restores it after the module)


# -- per-group hyperparameters: MLX's MultiOptimizer of one class ---------------------------------
GROUPS = {  # id: (our class, kwargs, group of "w", MLX class, MLX kwargs, MLX kwargs of "w", lr)
    "adam_bc": (Adam, {"bias_correction": True},
                {"learning_rate": 0.03, "beta1": 0.8, "beta2": 0.95, "epsilon": 1e-4},
                "Adam", {"bias_correction": True},
                {"learning_rate": lr64(0.03), "betas": [0.8, 0.95], "eps": 1e-4}, 0.01),
    "sgd": (SGD, {"momentum": 0.9, "dampening": 0.2},
            {"momentum": 0.5, "dampening": 0.6, "weight_decay": 0.3},
            "SGD", {"momentum": 0.9, "dampening": 0.2},
            {"learning_rate": lr64(0.05), "momentum": 0.5, "dampening": 0.6,
             "weight_decay": 0.3}, 0.05),
    "adamw": (AdamW, {"weight_decay": 0.05}, {"learning_rate": 0.02, "weight_decay": 0.4},
              "AdamW", {"weight_decay": 0.05}, {"learning_rate": lr64(0.02), "weight_decay": 0.4},
              0.01),
    "lion": (Lion, {"weight_decay": 0.1}, {"beta1": 0.5, "weight_decay": 0.7},
             "Lion", {"weight_decay": 0.1}, {"learning_rate": lr64(0.003), "betas": [0.5, 0.99],
                                             "weight_decay": 0.7}, 0.003),
}


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("case", list(GROUPS))
def test_a_group_with_other_hyperparameters_is_a_second_mlx_optimizer(case, backend):
    cls, kw, group, name, mkw, mgroup, lr = GROUPS[case]
    p0, grads = problem(seed=1)
    mlx_opts = [getattr(optim, name)(**{**mkw, **mgroup}), getattr(optim, name)(lr64(lr), **mkw)]
    ref = mlx_run(mlx_opts, p0, grads, split=lambda k: 0 if k == "w" else 1)
    opt = cls(lr, convention="mlx", param_groups=[{"params": ["w"], **group}], **kw)
    ours = ours_run(opt, p0, grads, backend)
    assert worst(ours, ref) <= TOL, worst(ours, ref)
    assert worst(ours_run(cls(lr, convention="mlx", **kw), p0, grads), ref) > 1e-4


def test_a_group_cannot_switch_bias_correction_silently():
    """MLX's MultiOptimizer([Adam(bias_correction=True), Adam()]): a group's
    ``bias_correction`` either gives that or is refused by name."""
    p0, grads = problem(seed=2)
    try:
        opt = Adam(0.01, convention="mlx", bias_correction=True,
                   param_groups=[{"params": ["w"], "bias_correction": False}])
        ours = ours_run(opt, p0, grads)
    except (ValueError, TypeError) as e:
        assert "bias_correction" in str(e)
        return
    ref = mlx_run([optim.Adam(lr64(0.01)), optim.Adam(lr64(0.01), bias_correction=True)],
                  p0, grads, split=lambda k: 0 if k == "w" else 1)
    assert worst(ours, ref) <= TOL, worst(ours, ref)


# -- clipping, skipped steps, EMA ----------------------------------------------------------------
@pytest.mark.parametrize("case", ["adam_bc", "sgd_damp_wd", "lion_wd"])
def test_clip_norm_is_mlxs_clip_grad_norm_first(case):
    cls, kw, name, mkw, lr = CASES[case]
    p0, grads = problem(seed=3)
    m = 3.0  # (the gradients' norms are ~3.5 to ~14: some steps clip, the first does not)
    ref = mlx_run(getattr(optim, name)(lr64(lr), **mkw), p0, grads, clip=m)
    ours = ours_run(cls(lr, convention="mlx", clip_norm=m, **kw), p0, grads)
    assert worst(ours, ref) <= TOL, worst(ours, ref)
    assert worst(ours_run(cls(lr, convention="mlx", **kw), p0, grads), ref) > 1e-6


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("case", ["adam_bc", "sgd_damp_wd"])
def test_a_skipped_step_is_one_mlx_never_took(case, backend):
    """``nonfinite="skip"``: the NaN step is not taken, nor counted (MLX's bias correction
    on the steps it took)."""
    cls, kw, name, mkw, lr = CASES[case]
    p0, grads = problem(seed=4)
    bad = [dict(g) for g in grads]
    bad[5]["w"] = bad[5]["w"].copy()
    bad[5]["w"][0, 1] = np.nan
    ref = mlx_run(getattr(optim, name)(lr64(lr), **mkw), p0, grads[:5] + grads[6:])
    with pytest.warns(RuntimeWarning):
        ours = ours_run(cls(lr, convention="mlx", nonfinite="skip", **kw), p0, bad, backend)
    assert worst(ours[:5] + ours[6:], ref) <= TOL, worst(ours[:5] + ours[6:], ref)


@pytest.mark.parametrize("case", ["adamw", "adam_bc"])
def test_the_ema_of_an_mlx_run(case):
    """``ema_decay=d``: the EMA (from the first step's parameters) of MLX's trajectory."""
    cls, kw, name, mkw, lr = CASES[case]
    p0, grads = problem(seed=5)
    ref = mlx_run(getattr(optim, name)(lr64(lr), **mkw), p0, grads)
    ours, state = ours_run(cls(lr, convention="mlx", ema_decay=0.8, **kw), p0, grads,
                           keep_state=True)
    assert worst(ours, ref) <= TOL
    ema = dict(ref[0])
    for p in ref[1:]:
        ema = {k: 0.8 * ema[k] + 0.2 * p[k] for k in p}
    opt = cls(lr, convention="mlx", ema_decay=0.8, **kw)
    got = {k: host(v) for k, v in opt.ema_params(state).items()}
    assert worst([got], [ema]) <= TOL, worst([got], [ema])


# -- engines and float32 ---------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["jax-jit", "torch-ops"])
@pytest.mark.parametrize("case", list(CASES))
def test_the_jitted_jax_and_torch_fused_engines(case, engine, x64, monkeypatch):
    import mithril.utils.optimizers.engines as engines

    if engine == "torch-ops":
        monkeypatch.setattr(engines, "TORCH_ENGINE", "fused-ops")
    cls, kw, name, mkw, lr = CASES[case]
    p0, grads = problem(seed=6, steps=8)
    ref = mlx_run(getattr(optim, name)(lr64(lr), **mkw), p0, grads)
    with optimizer_engine(engine):
        ours, state = ours_run(cls(lr, convention="mlx", **kw), p0, grads,
                               "jax" if engine == "jax-jit" else "torch", keep_state=True)
    kind = type(state.engine).__name__
    assert kind == ("JaxEngine" if engine == "jax-jit" else "TorchFusedEngine"), kind
    assert worst(ours, ref) <= TOL, worst(ours, ref)


@pytest.mark.parametrize("backend", ["torch", "jax"])
@pytest.mark.parametrize("case", ["adam_bc", "sgd_nesterov", "lion_wd", "adadelta"])
def test_float32_on_torch_and_jax(case, backend):
    """float32 parameters, MLX's float32 learning rate (a plain float): ~float32 rounding."""
    cls, kw, name, mkw, lr = CASES[case]
    p0, grads = problem("float32", seed=7)
    ref = mlx_run(getattr(optim, name)(lr, **mkw), p0, grads, dtype=mx.float32)
    ours = ours_run(cls(lr, convention="mlx", **kw), p0, grads, backend)
    assert ours[-1]["w"].dtype == np.float32
    assert worst(ours, ref) <= 2e-6, worst(ours, ref)


# -- a checkpoint loaded into an optimizer of another convention ------------------------------
LOADS = {  # id: (MLX-convention optimizer, MLX's, the loader built with its defaults, shapes)
    "sgd": (lambda: SGD(0.05, momentum=0.9, dampening=0.5, convention="mlx"),
            lambda: optim.SGD(lr64(0.05), momentum=0.9, dampening=0.5), lambda: SGD(0.05),
            SHAPES),
    "lion": (lambda: Lion(0.003, weight_decay=0.1, convention="mlx"),
             lambda: optim.Lion(lr64(0.003), weight_decay=0.1), lambda: Lion(0.003), SHAPES),
    "adamw": (lambda: AdamW(0.01, convention="mlx"), lambda: optim.AdamW(lr64(0.01)),
              lambda: AdamW(0.01), SHAPES),
    "muon": (lambda: Muon(0.02, convention="mlx"), lambda: optim.Muon(lr64(0.02)),
             lambda: Muon(0.02), {"w": (5, 3), "b": (4,)}),
    "adafactor": (lambda: Adafactor(convention="mlx"), lambda: optim.Adafactor(),
                  lambda: Adafactor(), {"w": (5, 3), "b": (4,)}),
}


@pytest.mark.parametrize("case", list(LOADS))
def test_a_checkpoint_into_another_convention_goes_on_as_mlx_or_is_refused(case):
    ours_mlx, theirs, loader, shapes = LOADS[case]
    p0, grads = problem(seed=8, shapes=shapes)
    ref = mlx_run(theirs(), p0, grads)
    opt = ours_mlx()
    params = {k: v.copy() for k, v in p0.items()}
    state = opt.init(params)
    for g in grads[:10]:
        params, state = opt.update(params, g, state)
    d = json.loads(json.dumps(opt.state_dict(state), default=lambda a: a.tolist()))
    other = loader()
    try:
        state = other.load_state_dict(d, params)
    except (ValueError, TypeError, KeyError) as e:
        assert "convention" in str(e), e
        return
    assert other.convention == "mlx"
    for g in grads[10:]:
        params, state = other.update(params, g, state)
    assert worst([params], ref[-1:]) <= TOL, worst([params], ref[-1:])


# -- Muon's lr scale on tensors of more axes, Adafactor on a zero parameter -----------------------
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_muon_scales_lr_by_the_last_two_axes_of_3d_and_4d_tensors(backend):
    """MLX's ``√max(1, shape[-2]/shape[-1])`` of the tensor as it is (not of the flattened
    matrix): a conv kernel (8, 2, 3, 2) gets √1.5, a (4, 5, 3) tensor √(5/3), a tall
    (6, 2) matrix √3; a wide one and a vector 1."""
    shapes = {"conv": (8, 2, 3, 2), "t3": (4, 5, 3), "tall": (6, 2), "wide": (2, 6),
              "b": (5,)}
    p0, grads = problem(seed=9, shapes=shapes, steps=10)
    ref = mlx_run(optim.Muon(lr64(0.02), weight_decay=0.05), p0, grads)
    ours = ours_run(Muon(0.02, weight_decay=0.05, convention="mlx"), p0, grads, backend)
    assert worst(ours, ref) <= TOL, worst(ours, ref)


def test_adafactor_scale_of_a_zero_parameter_is_eps1():
    """A zero bias (RMS 0): MLX scales by eps[1]; relative_step=False with an lr, first
    moment and weight decay."""
    shapes = {"w": (4, 3), "b": (3,)}
    p0, grads = problem(seed=10, shapes=shapes)
    p0["b"][:] = 0.0
    theirs = optim.Adafactor(lr64(0.3), relative_step=False, beta_1=0.9, weight_decay=0.1)
    ref = mlx_run(theirs, p0, grads)
    ours = ours_run(Adafactor(0.3, relative_step=False, beta_1=0.9, weight_decay=0.1,
                              convention="mlx"), p0, grads)
    assert worst(ours, ref) <= TOL, worst(ours, ref)
    assert 0 < np.abs(ref[0]["b"]).max() < 1e-2


def test_a_torch_adafactor_checkpoint_into_an_mlx_one_goes_on_as_torchs():
    """The other way (torch's convention saved, MLX's loading): torch.optim.Adafactor's run
    goes on, and MLX's options are gone (the optimizer saves as a torch one)."""
    p0, grads = problem(seed=11, shapes={"w": (5, 3), "b": (4,)})
    ts = {k: torch.tensor(v, requires_grad=True) for k, v in p0.items()}
    topt = torch.optim.Adafactor(list(ts.values()), lr=0.02)
    for g in grads:
        for k, x in ts.items():
            x.grad = torch.tensor(g[k])
        topt.step()
    opt = Adafactor(0.02)
    params = {k: v.copy() for k, v in p0.items()}
    state = opt.init(params)
    for g in grads[:10]:
        params, state = opt.update(params, g, state)
    d = json.loads(json.dumps(opt.state_dict(state), default=lambda a: a.tolist()))
    mlx_one = Adafactor(beta_1=0.9, convention="mlx")
    state = mlx_one.load_state_dict(d, params)
    assert mlx_one.convention == "torch" and not hasattr(mlx_one, "beta_1")
    for g in grads[10:]:
        params, state = mlx_one.update(params, g, state)
    want = {k: x.detach().numpy() for k, x in ts.items()}
    assert worst([params], [want]) <= 1e-12, worst([params], [want])
    Adafactor().load_state_dict(mlx_one.state_dict(state), params)  # (a torch checkpoint)


# -- the tensorwise ones (Muon, Adafactor) with groups, an EMA and skipped steps -------------------
TENSORWISE = {  # id: (ours, MLX's [group "w", the rest])
    "muon": (lambda: Muon(0.02, convention="mlx", param_groups=[
        {"params": ["w"], "learning_rate": 0.05, "weight_decay": 0.0, "momentum": 0.8}]),
        lambda: [optim.Muon(lr64(0.05), weight_decay=0.0, momentum=0.8),
                 optim.Muon(lr64(0.02))]),
    "adafactor": (lambda: Adafactor(0.05, relative_step=False, convention="mlx", param_groups=[
        {"params": ["w"], "learning_rate": 0.2, "weight_decay": 0.1}]),
        lambda: [optim.Adafactor(lr64(0.2), relative_step=False, weight_decay=0.1),
                 optim.Adafactor(lr64(0.05), relative_step=False)]),
}


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("case", list(TENSORWISE))
def test_tensorwise_groups_are_two_mlx_optimizers(case, backend):
    ours, theirs = TENSORWISE[case]
    p0, grads = problem(seed=12, shapes={"w": (5, 3), "v": (3, 4), "b": (4,)})
    ref = mlx_run(theirs(), p0, grads, split=lambda k: 0 if k == "w" else 1)
    got = ours_run(ours(), p0, grads, backend)
    assert worst(got, ref) <= TOL, worst(got, ref)


@pytest.mark.parametrize("make, theirs", [
    (lambda **kw: Muon(0.02, convention="mlx", **kw), lambda: optim.Muon(lr64(0.02))),
    (lambda **kw: Adafactor(beta_1=0.9, convention="mlx", **kw),
     lambda: optim.Adafactor(beta_1=0.9))], ids=["muon", "adafactor"])
def test_tensorwise_ema_and_a_skipped_step(make, theirs):
    """An EMA of MLX's trajectory; a NaN step skipped (MLX never sees it, nor counts it)."""
    p0, grads = problem(seed=13, shapes={"w": (5, 3), "b": (4,)})
    ref = mlx_run(theirs(), p0, grads[:4] + grads[5:])
    bad = [dict(g) for g in grads]
    bad[4] = {**bad[4], "b": np.full(4, np.nan)}
    opt = make(ema_decay=0.7, nonfinite="skip")
    with pytest.warns(RuntimeWarning):
        ours, state = ours_run(opt, p0, bad, keep_state=True)
    assert worst(ours[:4] + ours[5:], ref) <= TOL, worst(ours[:4] + ours[5:], ref)
    ema = dict(ref[0])
    for p in ref[1:]:
        ema = {k: 0.7 * ema[k] + 0.3 * p[k] for k in p}
    got = {k: host(v) for k, v in opt.ema_params(state).items()}
    assert worst([got], [ema]) <= TOL, worst([got], [ema])


@pytest.mark.parametrize("engine", ["jax-jit", "torch-ops"])
@pytest.mark.parametrize("make, theirs", [
    (lambda: Muon(0.02, weight_decay=0.1, convention="mlx"),
     lambda: optim.Muon(lr64(0.02), weight_decay=0.1)),
    (lambda: Adafactor(beta_1=0.9, weight_decay=0.1, warmup_init=True, convention="mlx"),
     lambda: optim.Adafactor(beta_1=0.9, weight_decay=0.1, warmup_init=True))],
    ids=["muon", "adafactor"])
def test_tensorwise_on_the_jitted_jax_and_torch_fused_engines(make, theirs, engine, x64,
                                                              monkeypatch):
    """The per-tensor programs (JAX's jitted one, float32 step scalars traced) on a 3-D
    tensor, a matrix and a vector."""
    import mithril.utils.optimizers.engines as engines

    if engine == "torch-ops":
        monkeypatch.setattr(engines, "TORCH_ENGINE", "fused-ops")
    p0, grads = problem(seed=15, shapes={"w": (5, 3), "k": (4, 2, 3), "b": (4,)}, steps=6)
    ref = mlx_run(theirs(), p0, grads)
    with optimizer_engine(engine):
        ours = ours_run(make(), p0, grads, "jax" if engine == "jax-jit" else "torch")
    assert worst(ours, ref) <= TOL, worst(ours, ref)


def test_a_refused_cross_convention_adafactor_load_changes_nothing():
    """An MLX Adafactor checkpoint with a slot of the wrong shape, into ``Adafactor()``:
    refused naming the slot, and the loader is still torch's (its run equals
    torch.optim.Adafactor's)."""
    p0, grads = problem(seed=16, shapes={"w": (5, 3), "b": (4,)}, steps=4)
    opt = Adafactor(convention="mlx", beta_1=0.9)
    state = opt.init(p0)
    d = json.loads(json.dumps(opt.state_dict(state), default=lambda a: a.tolist()))
    d["slots"]["exp_avg"]["w"] = np.zeros((3, 5)).tolist()
    loader = Adafactor(0.02)
    before = loader.hyperparameters()
    with pytest.raises((ValueError, KeyError), match="exp_avg"):
        loader.load_state_dict(d, p0)
    assert loader.hyperparameters() == before and not hasattr(loader, "beta_1")
    ts = [torch.tensor(p0[k], requires_grad=True) for k in ("w", "b")]
    topt = torch.optim.Adafactor(ts, lr=0.02)
    for g in grads:
        for x, k in zip(ts, ("w", "b")):
            x.grad = torch.tensor(g[k])
        topt.step()
    ours = ours_run(loader, p0, grads)[-1]
    want = {k: x.detach().numpy() for k, x in zip(("w", "b"), ts)}
    assert worst([ours], [want]) <= 1e-12


# -- MLX's float32 powers: its C library's powf, to the last bit ----------------------------------
def test_the_bias_corrections_and_adafactors_power_are_mlxs_for_20000_steps():
    """``β ** step`` and ``step ** decay_rate`` are float32 powers in MLX (``powf``); the
    float64 power rounded to float32 misses their last bit at some steps (β₂ = 0.9999: step
    508 on, c2 off by 6e-7 relative; t^-0.8: step 3,046 on)."""
    from mithril.utils.optimizers.adafactor import _f32_pow
    from mithril.utils.optimizers.adam import mlx_corrections

    steps = np.arange(1, 20001)
    st = mx.array(steps.astype(np.uint64))
    for b1, b2 in ((0.9, 0.999), (0.8, 0.9999)):
        c1 = np.array((lr64(0.01) / (1 - b1 ** st)).astype(mx.float64))
        c2 = np.array(mx.rsqrt(1 - b2 ** st).astype(mx.float64))
        ours = np.array([mlx_corrections(0.01, b1, b2, int(t)) for t in steps])
        assert np.array_equal(ours[:, 0], c1) and np.array_equal(ours[:, 1], c2), (b1, b2)
    for e in (-0.8, -0.6):
        ours = np.array([_f32_pow(int(t), e) for t in steps], dtype=np.float32)
        assert np.array_equal(ours, np.array(st ** e)), e


def test_adam_with_beta2_0_9999_past_step_508():
    """The run that the float64-rounded power put 2e-9 off MLX's at step 508 (c2 6e-7 off)."""
    p0, grads = problem(seed=17, shapes={"w": (3,)}, steps=520)
    ref = mlx_run(optim.Adam(lr64(0.01), betas=[0.8, 0.9999], bias_correction=True), p0,
                  grads)
    ours = ours_run(Adam(0.01, beta1=0.8, beta2=0.9999, bias_correction=True,
                         convention="mlx"), p0, grads)
    assert worst(ours, ref) <= TOL, worst(ours, ref)


@pytest.mark.parametrize("make, theirs", [
    (lambda: Adafactor(beta_1=0.9, convention="mlx"), lambda: optim.Adafactor(beta_1=0.9)),
    (lambda: Adafactor(0.1, relative_step=False, scale_parameter=False, convention="mlx"),
     lambda: optim.Adafactor(lr64(0.1), relative_step=False, scale_parameter=False)),
    (lambda: Muon(0.02, convention="mlx"), lambda: optim.Muon(lr64(0.02)))],
    ids=["adafactor", "adafactor-lr", "muon"])
def test_degenerate_shapes(make, theirs):
    """A row, a column, a 3-D tensor with a unit axis, a one-element vector, a scalar and a
    4-D kernel: MLX's factored means and Muon's reshape on each."""
    shapes = {"r": (1, 5), "c": (5, 1), "k": (2, 1, 3), "o": (1,), "s": (), "q": (3, 4, 2, 2)}
    p0, grads = problem(seed=18, shapes=shapes, steps=10)
    ref = mlx_run(theirs(), p0, grads)
    assert worst(ours_run(make(), p0, grads), ref) <= TOL
