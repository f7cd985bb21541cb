"""``convention="torch" | "optax" | "keras"`` on SGD, Adam/AdamW/AMSGrad, RMSProp, AdaGrad, NAdam.

float64 parity: every optimizer x convention runs 100 steps side by side with the library it
names (``torch.optim`` with ``torch.set_default_dtype(torch.float64)``; optax jitted with
``jax_enable_x64``, the learning rate through ``optax.inject_hyperparams``; Keras 3 on the
JAX backend, ``opt.learning_rate = ...``), from the same start and gradient sequence, with the
learning rate changed twice mid-run and weight decay on in most cases, on our NumPy backend
(the fused numba kernel) and the jitted JAX engine; parameters are compared after every step,
``<= 1e-10`` in the measure of :func:`rel_err` (elementwise relative, floored at 1e-3 of the
tensor's largest magnitude). JAX float64 needs the process-global x64 switch, so all of it
runs in ONE fresh subprocess (:func:`reference_run`, cached) that prints the errors.

Also: the default is torch's; the conventions really differ where the libraries do; a state
dict taken mid-run (it keeps ``convention``) resumes bit-exactly; bad conventions and the
combinations a library lacks are refused with errors naming the argument.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

import numpy as np
import pytest
import torch
from float64_reference import lr_at, reference_code, rel_err

from mithril.utils.optimizers import SGD, AdaGrad, Adam, AdamW, NAdam, RMSProp

STEPS = 100
TOL64 = 1e-10
SHAPES = {"w": (3, 4), "b": (4,), "s": ()}
CLASSES = {c.__name__: c for c in (SGD, Adam, AdamW, RMSProp, AdaGrad, NAdam)}

# name -> (class, our kwargs, reference). A reference is ("torch", class, kwargs without lr),
# ("optax", a factory of the learning rate for optax.inject_hyperparams) or ("keras", class,
# kwargs without learning_rate). Torch cases leave ``convention`` out: the default.
# Coupled weight decay where optax has none of its own is add_decayed_weights in front.
_ADW = "optax.add_decayed_weights(0.1)"
CASES: dict[str, tuple[str, dict, tuple]] = {
    # SGD: keras keeps lr inside the velocity (the lr changes show it)
    "sgd_dampening/torch": ("SGD", {"lr": 0.05, "momentum": 0.9, "dampening": 0.3},
                            ("torch", "SGD", {"momentum": 0.9, "dampening": 0.3})),
    "sgd_nesterov_wd/torch": ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True,
                                      "weight_decay": 0.1},
                              ("torch", "SGD", {"momentum": 0.9, "nesterov": True,
                                                "weight_decay": 0.1})),
    "sgd_momentum/optax": ("SGD", {"lr": 0.05, "momentum": 0.9, "convention": "optax"},
                           ("optax", "lambda learning_rate: optax.sgd(learning_rate, 0.9)")),
    "sgd_nesterov_wd/optax": (
        "SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1,
                "convention": "optax"},
        ("optax", f"lambda learning_rate: optax.chain({_ADW}, optax.sgd(learning_rate, 0.9, "
                  f"nesterov=True))")),
    "sgd_momentum/keras": ("SGD", {"lr": 0.05, "momentum": 0.9, "convention": "keras"},
                           ("keras", "SGD", {"momentum": 0.9})),
    "sgd_nesterov_wd/keras": ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True,
                                      "weight_decay": 0.1, "convention": "keras"},
                              ("keras", "SGD", {"momentum": 0.9, "nesterov": True,
                                                "weight_decay": 0.1})),
    "sgd_wd/keras": ("SGD", {"lr": 0.05, "weight_decay": 0.1, "convention": "keras"},
                     ("keras", "SGD", {"weight_decay": 0.1})),
    # Adam / AdamW / AMSGrad (ε = 1e-3 makes its place matter)
    "adam_wd/torch": ("Adam", {"lr": 0.01, "eps": 1e-3, "weight_decay": 0.1},
                      ("torch", "Adam", {"eps": 1e-3, "weight_decay": 0.1})),
    "amsgrad/torch": ("Adam", {"lr": 0.01, "beta2": 0.99, "amsgrad": True},
                      ("torch", "Adam", {"betas": (0.9, 0.99), "amsgrad": True})),
    "adamw_amsgrad/torch": ("AdamW", {"lr": 0.01, "beta2": 0.99, "weight_decay": 0.1,
                                      "amsgrad": True},
                            ("torch", "AdamW", {"betas": (0.9, 0.99), "weight_decay": 0.1,
                                                "amsgrad": True})),
    "adam_wd/optax": ("Adam", {"lr": 0.01, "eps": 1e-3, "weight_decay": 0.1,
                               "convention": "optax"},
                      ("optax", f"lambda learning_rate: optax.chain({_ADW}, "
                                f"optax.adam(learning_rate, eps=1e-3))")),
    "amsgrad/optax": ("Adam", {"lr": 0.01, "beta2": 0.99, "amsgrad": True, "convention": "optax"},
                      ("optax", "lambda learning_rate: optax.amsgrad(learning_rate, b2=0.99)")),
    "adamw/optax": ("AdamW", {"lr": 0.01, "eps": 1e-3, "weight_decay": 0.1,
                              "convention": "optax"},
                    ("optax", "lambda learning_rate: optax.adamw(learning_rate, eps=1e-3, "
                              "weight_decay=0.1)")),
    "adamw_amsgrad/optax": (
        "AdamW", {"lr": 0.01, "beta2": 0.99, "weight_decay": 0.1, "amsgrad": True,
                  "convention": "optax"},
        ("optax", f"lambda learning_rate: optax.chain(optax.scale_by_amsgrad(b2=0.99), {_ADW}, "
                  f"optax.scale_by_learning_rate(learning_rate))")),
    "adam_wd/keras": ("Adam", {"lr": 0.01, "eps": 1e-3, "weight_decay": 0.1,
                               "convention": "keras"},
                      ("keras", "Adam", {"epsilon": 1e-3, "weight_decay": 0.1})),
    "amsgrad/keras": ("Adam", {"lr": 0.01, "beta2": 0.99, "eps": 1e-3, "amsgrad": True,
                               "convention": "keras"},
                      ("keras", "Adam", {"beta_2": 0.99, "epsilon": 1e-3, "amsgrad": True})),
    "adamw/keras": ("AdamW", {"lr": 0.01, "eps": 1e-7, "weight_decay": 0.1,
                              "convention": "keras"},
                    ("keras", "AdamW", {"epsilon": 1e-7, "weight_decay": 0.1})),
    # RMSProp: optax/keras put ε inside the root and lr inside the momentum buffer
    "rmsprop_momentum/torch": ("RMSProp", {"lr": 0.01, "eps": 1e-3, "momentum": 0.5},
                               ("torch", "RMSprop", {"alpha": 0.9, "eps": 1e-3,
                                                     "momentum": 0.5})),
    "rmsprop_centered_wd/torch": (
        "RMSProp", {"lr": 0.01, "eps": 1e-3, "momentum": 0.5, "centered": True,
                    "weight_decay": 0.1},
        ("torch", "RMSprop", {"alpha": 0.9, "eps": 1e-3, "momentum": 0.5, "centered": True,
                              "weight_decay": 0.1})),
    "rmsprop/optax": ("RMSProp", {"lr": 0.01, "eps": 1e-3, "convention": "optax"},
                      ("optax", "lambda learning_rate: optax.rmsprop(learning_rate, 0.9, 1e-3)")),
    "rmsprop_momentum_wd/optax": (
        "RMSProp", {"lr": 0.01, "eps": 1e-3, "momentum": 0.5, "weight_decay": 0.1,
                    "convention": "optax"},
        ("optax", f"lambda learning_rate: optax.chain({_ADW}, optax.rmsprop(learning_rate, "
                  f"0.9, 1e-3, momentum=0.5))")),
    "rmsprop_centered_momentum/optax": (
        "RMSProp", {"lr": 0.01, "eps": 1e-3, "momentum": 0.5, "centered": True,
                    "convention": "optax"},
        ("optax", "lambda learning_rate: optax.rmsprop(learning_rate, 0.9, 1e-3, "
                  "centered=True, momentum=0.5)")),
    "rmsprop_momentum/keras": ("RMSProp", {"lr": 0.01, "eps": 1e-3, "momentum": 0.5,
                                           "convention": "keras"},
                               ("keras", "RMSprop", {"rho": 0.9, "epsilon": 1e-3,
                                                     "momentum": 0.5})),
    "rmsprop_centered_momentum_wd/keras": (
        "RMSProp", {"lr": 0.01, "eps": 1e-3, "momentum": 0.5, "centered": True,
                    "weight_decay": 0.1, "convention": "keras"},
        ("keras", "RMSprop", {"rho": 0.9, "epsilon": 1e-3, "momentum": 0.5, "centered": True,
                              "weight_decay": 0.1})),
    # AdaGrad: optax/keras start the accumulator at 0.1 (the default follows the convention)
    "adagrad_wd/torch": ("AdaGrad", {"lr": 0.1, "eps": 1e-10, "lr_decay": 0.01,
                                     "weight_decay": 0.1},
                         ("torch", "Adagrad", {"eps": 1e-10, "lr_decay": 0.01,
                                               "weight_decay": 0.1})),
    "adagrad/optax": ("AdaGrad", {"lr": 0.1, "eps": 1e-7, "convention": "optax"},
                      ("optax", "lambda learning_rate: optax.adagrad(learning_rate)")),
    "adagrad_wd/optax": (
        "AdaGrad", {"lr": 0.1, "eps": 1e-3, "initial_accumulator_value": 0.5,
                    "weight_decay": 0.1, "convention": "optax"},
        ("optax", f"lambda learning_rate: optax.chain({_ADW}, optax.adagrad(learning_rate, "
                  f"initial_accumulator_value=0.5, eps=1e-3))")),
    "adagrad/keras": ("AdaGrad", {"lr": 0.1, "eps": 1e-7, "convention": "keras"},
                      ("keras", "Adagrad", {"epsilon": 1e-7})),
    "adagrad_wd/keras": ("AdaGrad", {"lr": 0.1, "eps": 1e-3, "initial_accumulator_value": 0.5,
                                     "weight_decay": 0.1, "convention": "keras"},
                         ("keras", "Adagrad", {"epsilon": 1e-3, "initial_accumulator_value": 0.5,
                                               "weight_decay": 0.1})),
    # NAdam: the momentum schedule (torch ψ, Keras ψ = 1, optax none)
    "nadam_wd/torch": ("NAdam", {"lr": 0.01, "momentum_decay": 0.02, "weight_decay": 0.1},
                       ("torch", "NAdam", {"momentum_decay": 0.02, "weight_decay": 0.1})),
    "nadamw/torch": ("NAdam", {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True},
                     ("torch", "NAdam", {"weight_decay": 0.1, "decoupled_weight_decay": True})),
    "nadam_wd/optax": ("NAdam", {"lr": 0.01, "eps": 1e-3, "weight_decay": 0.1,
                                 "convention": "optax"},
                       ("optax", f"lambda learning_rate: optax.chain({_ADW}, "
                                 f"optax.nadam(learning_rate, eps=1e-3))")),
    "nadamw/optax": ("NAdam", {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True,
                               "convention": "optax"},
                     ("optax", "lambda learning_rate: optax.nadamw(learning_rate, "
                               "weight_decay=0.1)")),
    "nadam/keras": ("NAdam", {"lr": 0.01, "eps": 1e-7, "convention": "keras"},
                    ("keras", "Nadam", {"epsilon": 1e-7})),
    "nadam_wd/keras": ("NAdam", {"lr": 0.01, "beta2": 0.99, "eps": 1e-3, "weight_decay": 0.1,
                                 "convention": "keras"},
                       ("keras", "Nadam", {"beta_2": 0.99, "epsilon": 1e-3,
                                           "weight_decay": 0.1})),
}


def problem(dtype: str = "float64", steps: int = STEPS, seed: int = 0):
    """Start parameters and a gradient sequence; "b" gets a zero gradient on the first two
    steps (AdaGrad's empty accumulator, a zero first moment)."""
    rng = np.random.default_rng(seed)
    p0 = {k: np.asarray(rng.standard_normal(s), dtype=dtype) for k, s in SHAPES.items()}
    grads = [{k: np.asarray(rng.standard_normal(s) * (1 + t % 7) * (k != "b" or t >= 2),
                            dtype=dtype) for k, s in SHAPES.items()} for t in range(steps)]
    return p0, grads


# ---------------------------------------------------------------------------------------------
# float64 parity. optax, Keras and our jitted JAX engine need the process-global
# jax_enable_x64: they run in ONE fresh subprocess, started first and awaited last, so that
# it overlaps the in-process half (torch's references and our NumPy runs).
# ---------------------------------------------------------------------------------------------

_SCRIPT = r"""
import json, os
os.environ["KERAS_BACKEND"] = "jax"
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np
import optax
import keras

import mithril.utils.optimizers as mo
import mithril.utils.optimizers.engines as engines

keras.config.set_floatx("float64")
"""

_SCRIPT_MAIN = r"""
p0, grads = problem("float64")
names = list(SHAPES)


def run_reference(kw, ref):
    lr0 = kw["lr"]
    traj = []
    if ref[0] == "keras":
        opt = getattr(keras.optimizers, ref[1])(learning_rate=lr0, **ref[2])
        vs = [keras.Variable(p0[k], dtype="float64") for k in names]
        for t in range(STEPS):
            opt.learning_rate = lr_at(lr0, t)
            opt.apply([jnp.asarray(grads[t][k]) for k in names], vs)
            traj.append([np.array(v.value) for v in vs])
    else:
        tx = optax.inject_hyperparams(eval(ref[1]))(learning_rate=lr0)

        @jax.jit
        def step(params, g, s):
            u, s = tx.update(g, s, params)
            return optax.apply_updates(params, u), s

        params = {k: jnp.asarray(v) for k, v in p0.items()}
        s = tx.init(params)
        for t in range(STEPS):
            s.hyperparams["learning_rate"] = jnp.asarray(lr_at(lr0, t), dtype=jnp.float64)
            params, s = step(params, {k: jnp.asarray(v) for k, v in grads[t].items()}, s)
            traj.append([np.array(params[k]) for k in names])
    assert traj[-1][0].dtype == np.float64
    return traj


refs, errors = {}, {}
for case, (cls_name, kw, ref) in CASES.items():
    if ref[0] == "torch":
        continue
    traj = run_reference(kw, ref)
    refs[case] = [[a.tolist() for a in step] for step in traj]
    engines.JAX_ENGINE = "jit"
    opt = getattr(mo, cls_name)(**kw)
    params = {k: jnp.asarray(v) for k, v in p0.items()}
    state = opt.init(params)
    assert type(state.engine).__name__ == "JaxEngine"
    err = 0.0
    for t in range(STEPS):
        opt.set_learning_rate(lr_at(kw["lr"], t))
        params, state = opt.update(params, {k: jnp.asarray(v) for k, v in grads[t].items()}, state)
        err = max(err, *(rel_err(np.array(params[k]), b) for k, b in zip(names, traj[t])))
    assert np.array(params["w"]).dtype == np.float64
    errors[case] = err
print(json.dumps({"refs": refs, "jax-jit": errors}))
"""


@functools.cache
def reference_process() -> tuple[subprocess.Popen, Any, Any]:
    """The subprocess computing optax's and Keras's trajectories and our jitted JAX errors,
    started once, with its stdout and stderr (files: it never waits for a reader)."""
    code = reference_code(_SCRIPT, _SCRIPT_MAIN, problem, STEPS, SHAPES, CASES)
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=err, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    return proc, out, err


@functools.cache
def reference_run() -> dict:
    """{"refs": {case: trajectory}, "jax-jit": {case: max error}} for the optax/Keras cases."""
    proc, out, err = reference_process()
    try:
        proc.wait(timeout=300)
    finally:
        proc.kill()  # a no-op once it has exited
    with out, err:
        out.seek(0)
        err.seek(0)
        assert proc.returncode == 0, err.read()[-4000:]
        return json.loads(out.read().strip().splitlines()[-1])


def torch_reference(kw: dict, ref: tuple) -> list:
    p0, grads = problem("float64")
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # NAdam's mu_product: a tensor of the default dtype
    try:
        ts = [torch.tensor(p0[k], requires_grad=True) for k in SHAPES]
        opt = getattr(torch.optim, ref[1])(ts, lr=kw["lr"], **ref[2])
        traj = []
        for t in range(STEPS):
            opt.param_groups[0]["lr"] = lr_at(kw["lr"], t)
            for k, x in zip(SHAPES, ts):
                x.grad = torch.tensor(grads[t][k])
            opt.step()
            traj.append([x.detach().numpy().copy() for x in ts])
    finally:
        torch.set_default_dtype(old)
    return traj


def numpy_run(cls_name: str, kw: dict) -> list:
    p0, grads = problem("float64")
    opt = CLASSES[cls_name](**kw)
    assert opt.convention == kw.get("convention", "torch")
    params = {k: v.copy() for k, v in p0.items()}
    state = opt.init(params)
    assert type(state.engine).__name__ == "NumbaEngine"
    traj = []
    for t in range(STEPS):
        opt.set_learning_rate(lr_at(kw["lr"], t))
        params, state = opt.update(params, grads[t], state)
        traj.append([np.array(params[k]) for k in SHAPES])
    return traj


def test_float64_parity_with_torch_optax_and_keras():
    """Every optimizer x convention, 100 steps with two lr changes, <= 1e-10 on NumPy (every
    case) and jitted JAX (the optax and Keras cases; the torch ones are in
    tests/test_optimizers.py). One test, so that under xdist the subprocess runs once."""
    covered = {(CASES[c][0].replace("AdamW", "Adam"), c.split("/")[1]) for c in CASES}
    assert covered == {(n, conv) for n in ("SGD", "Adam", "RMSProp", "AdaGrad", "NAdam")
                       for conv in ("torch", "optax", "keras")}
    proc = reference_process()[0]  # runs while we compute ours
    try:
        ours = {case: numpy_run(cls_name, kw) for case, (cls_name, kw, _) in CASES.items()}
        refs = {case: torch_reference(kw, ref) for case, (_, kw, ref) in CASES.items()
                if ref[0] == "torch"}
    except BaseException:
        proc.kill()
        raise
    res = reference_run()
    refs.update(res["refs"])
    errors = {f"{case}/jax-jit": e for case, e in res["jax-jit"].items()}
    for case, traj in ours.items():
        errors[f"{case}/numpy"] = max(rel_err(a, b) for t in range(STEPS)
                                      for a, b in zip(traj[t], refs[case][t]))
    bad = {k: v for k, v in errors.items() if not v <= TOL64}
    assert not bad, bad
    assert len(errors) == len(CASES) + len(res["jax-jit"]) and len(res["jax-jit"]) >= 20
    print(f"max float64 error: {max(errors.values()):.1e}")


# ---------------------------------------------------------------------------------------------
# in-process checks (NumPy)
# ---------------------------------------------------------------------------------------------


def trajectory(opt, steps: int = 60, stop_at: int | None = None, native=np.array):
    """Final params of ``opt`` (lr changed as :data:`LR_FACTORS`, scaled to ``steps``); with
    ``stop_at``, optimizer and state are rebuilt from a state dict (into a default-constructed
    optimizer of the class) after that many steps. ``native`` makes the arrays."""
    p0, grads = problem("float64", steps)
    grads = [{k: native(v) for k, v in g.items()} for g in grads]
    params = {k: native(v) for k, v in p0.items()}
    state = opt.init(params)
    lr0 = opt.learning_rate
    for t in range(steps):
        opt.set_learning_rate(lr_at(lr0, t * STEPS // steps))
        if t == stop_at:
            d = json.loads(json.dumps(opt.state_dict(state), default=lambda a: a.tolist()))
            opt = type(opt)()
            params = {k: np.array(v) for k, v in params.items()}
            state = opt.load_state_dict(d, params)
            assert state.step == stop_at
        params, state = opt.update(params, grads[t], state)
    return {k: np.array(v.detach().numpy() if isinstance(v, torch.Tensor) else v)
            for k, v in params.items()}, opt


ALL = [(cls, conv) for cls in CLASSES for conv in ("torch", "optax", "keras")]
OPTIONS = {"SGD": {"momentum": 0.9, "nesterov": True}, "Adam": {"amsgrad": True},
           "AdamW": {"amsgrad": True}, "RMSProp": {"momentum": 0.5, "centered": True},
           "AdaGrad": {}, "NAdam": {}}


def test_the_default_is_torch():
    for cls in CLASSES.values():
        assert inspect.signature(cls).parameters["convention"].default == "torch"
        assert cls().convention == "torch" and cls().hyperparameters()["convention"] == "torch"
    assert AdaGrad().initial_accumulator_value == 0.0
    assert (NAdam().momentum_decay, NAdam().decoupled_weight_decay) == (4e-3, False)
    for name, cls in CLASSES.items():
        kw = {"learning_rate": 0.01, "weight_decay": 0.1, **OPTIONS[name]}
        a, _ = trajectory(cls(**kw), steps=20)
        b, _ = trajectory(cls(**kw, convention="torch"), steps=20)
        assert all(np.array_equal(a[k], b[k]) for k in SHAPES), name


def test_defaults_and_weight_decay_follow_the_convention():
    assert [AdaGrad(convention=c).initial_accumulator_value for c in ("optax", "keras")] == [0.1] * 2
    assert NAdam(convention="keras").momentum_decay == 1.0
    assert NAdam(convention="optax").momentum_decay is None
    # weight decay: Keras's is always decoupled; optax's where it has one (adamw, nadamw)
    for name, cls in CLASSES.items():
        for conv in ("torch", "optax", "keras"):
            want = conv == "keras" or name == "AdamW"
            assert cls(convention=conv).decoupled_weight_decay is want, (name, conv)
    assert NAdam(convention="optax", decoupled_weight_decay=True).decoupled_weight_decay


def max_diff(a, b) -> float:
    return max(rel_err(a[k], b[k]) for k in SHAPES)


@pytest.mark.parametrize("name", list(CLASSES))
def test_the_conventions_differ_where_the_libraries_do(name):
    """Same hyperparameters, three conventions: each differs from torch's by far more than
    rounding, except SGD with optax (the same update; optax has no dampening). Without weight
    decay, optax's RMSProp and AdaGrad are Keras's."""
    cls = CLASSES[name]
    kw = {"learning_rate": 0.01, "epsilon": 0.1, **OPTIONS[name]}
    if name == "SGD":
        kw.pop("epsilon")
    runs = {c: trajectory(cls(**kw, convention=c), steps=20)[0]
            for c in ("torch", "optax", "keras")}
    for conv in ("optax", "keras"):
        d = max_diff(runs["torch"], runs[conv])
        if name == "SGD" and conv == "optax":
            assert d == 0.0
        else:
            assert d > 1e-4, (name, conv, d)
    d = max_diff(runs["optax"], runs["keras"])
    assert d == 0.0 if name in ("RMSProp", "AdaGrad") else d > 1e-4, (name, d)


@pytest.mark.parametrize("name, conv", ALL)
def test_state_dict_keeps_the_convention_and_resumes_bit_exactly(name, conv):
    cls = CLASSES[name]
    kw = {"learning_rate": 0.01, "weight_decay": 0.1, "convention": conv, **OPTIONS[name]}
    whole, _ = trajectory(cls(**kw), steps=20)
    resumed, opt = trajectory(cls(**kw), steps=20, stop_at=9)
    hp = {k: v for k, v in opt.hyperparameters().items() if k != "learning_rate"}
    assert opt.convention == conv and hp == {
        k: v for k, v in cls(**kw).hyperparameters().items() if k != "learning_rate"}
    for k in SHAPES:
        np.testing.assert_array_equal(whole[k], resumed[k])


@pytest.mark.parametrize("name, conv", [a for a in ALL if a[1] != "torch"])
def test_the_tensor_op_engine_agrees(name, conv, monkeypatch):
    """The flat tensor-op engine (torch on accelerators), forced on CPU in float64, gives what
    the fused numba kernel gives: each convention's math runs on torch tensors too."""
    from mithril.utils.optimizers import engines
    from mithril.utils.optimizers.engines.array_engine import ArrayEngine

    kw = {"learning_rate": 0.01, "weight_decay": 0.1, "convention": conv, **OPTIONS[name]}
    fused, _ = trajectory(CLASSES[name](**kw), steps=20)
    monkeypatch.setattr(engines, "engine_for", lambda backend, layout, *_: ArrayEngine(backend, layout))
    probe = CLASSES[name](**kw).init({"w": torch.zeros(2, dtype=torch.float64)})
    assert type(probe.engine).__name__ == "ArrayEngine"
    tensors, _ = trajectory(CLASSES[name](**kw), steps=20, native=torch.tensor)
    assert max_diff(fused, tensors) <= 1e-12


BAD = [
    (SGD, {"convention": "jax"}), (Adam, {"convention": "Torch"}), (AdamW, {"convention": None}),
    (RMSProp, {"convention": 1}), (AdaGrad, {"convention": ""}), (NAdam, {"convention": "mlx"}),
]


@pytest.mark.parametrize("cls, kw", BAD, ids=[f"{c.__name__}-{kw['convention']!r}" for c, kw in BAD])
def test_a_bad_convention_names_the_argument_and_the_choices(cls, kw):
    with pytest.raises(ValueError, match=r"convention must be one of \('torch', 'optax', 'keras'(, 'mlx')?\)"):
        cls(**kw)


UNSUPPORTED = [
    (SGD, {"momentum": 0.9, "dampening": 0.1, "convention": "optax"}, "dampening"),
    (SGD, {"momentum": 0.9, "dampening": 0.1, "convention": "keras"}, "dampening"),
    (SGD, {"momentum": 0.9, "nesterov": True, "dampening": 0.1}, "nesterov"),
    (AdaGrad, {"lr_decay": 0.01, "convention": "optax"}, "lr_decay"),
    (AdaGrad, {"lr_decay": 0.01, "convention": "keras"}, "lr_decay"),
    (NAdam, {"momentum_decay": 4e-3, "convention": "optax"}, "momentum_decay"),
    (NAdam, {"momentum_decay": 4e-3, "convention": "keras"}, "momentum_decay"),
    (NAdam, {"decoupled_weight_decay": False, "convention": "keras"}, "decoupled_weight_decay"),
]


@pytest.mark.parametrize("cls, kw, arg", UNSUPPORTED)
def test_what_a_library_lacks_is_refused(cls, kw, arg):
    with pytest.raises(ValueError, match=arg):
        cls(**kw)


def test_only_optax_nadam_has_no_momentum_schedule():
    NAdam(momentum_decay=None, convention="optax")
    for conv in ("torch", "keras"):
        with pytest.raises(TypeError, match="momentum_decay"):
            NAdam(momentum_decay=None, convention=conv)


def test_a_group_cannot_switch_the_update_rule():
    with pytest.raises(ValueError, match="convention"):
        Adam(param_groups=[{"params": "b", "convention": "keras"}])
    with pytest.raises(ValueError, match="convention"):
        RMSProp(momentum=0.5, param_groups=[{"params": "b", "convention": "optax"}])
