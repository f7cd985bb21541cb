"""Parity of ``mithril.utils.optimizers`` with ``torch.optim`` (and optax), side by side.

Every parity test runs a mithril optimizer and its torch.optim counterpart in the same loop,
from the same start, on the same gradient sequence, and compares the parameters after every
step (and the optimizer state slots at the end, e.g. Adam's ``m``/``v`` against torch's
``exp_avg``/``exp_avg_sq``), on NumPy arrays, torch tensors and JAX arrays. JAX runs twice:
``"jax"`` is the default engine on CPU (the fused numba kernel over an aliased host buffer)
and ``"jax-jit"`` the jitted :class:`JaxEngine` used on accelerators; torch runs twice too:
``"torch-ops"`` is :class:`TorchFusedEngine` (torch's own fused kernels on our flat buffers,
the default on CUDA) forced on CPU, whose other optimizers take the tensor-op path. The tensor-op
:class:`ArrayEngine` (torch on GPU, float16/bfloat16) is forced on CPU in float64 for NumPy
and torch and held to the same parity.

Error measure (:func:`rel_err`), not a pure elementwise relative error:
``max |a - b| / max(|a|, |b|, 1e-3 * M)`` with ``M`` the largest magnitude in the tensor (of
either side). Elements at or above 0.1% of ``M`` are measured elementwise-relative; elements
below are measured against the floor ``1e-3 * M``, i.e. relative to the tensor's scale. The
reason: over 100 steps some values cancel to near zero (``p - lr*g`` with ``p ~ lr*g``), and
there a pure elementwise relative error measures the cancellation, not the optimizer: a
rounding difference of the size of an ulp of the operands becomes a large relative error of
the tiny result (measured here: up to ~4e-8 on elements ~1e-9 of their tensor's largest
magnitude, e.g. sgd_momentum and adamw, on the fused and the jitted engines alike; ~1e-13 in
the floored measure). Rounding differences with torch, which rounds every op separately, are
expected: the fused numba kernels are compiled with the fastmath flags ``contract`` (fused
multiply-adds), ``reassoc`` (reassociation), ``arcp`` (division as multiplication by a
reciprocal), ``afn`` (approximate math functions allowed) and ``nsz`` (sign of zero ignored),
and XLA fuses the jitted engine's arithmetic. float64 parity must be ``<= 1e-10`` after 100
steps in this measure.

JAX float64 needs ``jax_enable_x64``: :func:`jax_float64` switches it on with the thread-local
``jax.enable_x64`` context and restores the global flag afterwards (building a float64
``JaxBackend``, as ``infer_backend`` does, sets it globally), so the other tests of the same
xdist worker still see float32 JAX.

Cost: numba compiles each (kernel, dtype, clip-by-value) variant once per process (~0.5 s) and
the jitted JAX engine compiles per ``init`` (~0.1-0.4 s: every case runs on it, ~4 s in all),
so each parity test covers all backends of one case and the float32 / small tests reuse the
same few kernels.
"""

from __future__ import annotations

import contextlib
import functools
import json
import warnings

import numpy as np
import pytest
import torch

import mithril.utils.optimizers as mo
import mithril.utils.optimizers.engines as engines
from mithril.utils.optimizers import (
    SGD,
    AdaGrad,
    Adam,
    AdamW,
    Optimizer,
    OptimizerState,
    RMSProp,
    clip_gradients,
    global_norm,
)
from mithril.utils.optimizers.elementwise import sqrt

STEPS = 100
TOL64 = 1e-10
TOL32 = 1e-5
# "big" (16,900 elements) is above the numba engine's small-tensor threshold, so both of its
# gradient paths (gathered scratch buffer and in-place read) are exercised; "s" is a 0-d scalar
SHAPES = {"w": (3, 4), "b": (4,), "s": (), "big": (130, 130)}

# name -> (mithril class, kwargs, torch.optim class, kwargs)
CASES: dict[str, tuple[str, dict, str, dict]] = {
    "sgd": ("SGD", {"learning_rate": 0.05}, "SGD", {"lr": 0.05}),
    "sgd_momentum": ("SGD", {"learning_rate": 0.05, "momentum": 0.9},
                     "SGD", {"lr": 0.05, "momentum": 0.9}),
    "sgd_dampening": ("SGD", {"learning_rate": 0.05, "momentum": 0.9, "dampening": 0.3},
                      "SGD", {"lr": 0.05, "momentum": 0.9, "dampening": 0.3}),
    "sgd_nesterov": ("SGD", {"learning_rate": 0.05, "momentum": 0.9, "nesterov": True},
                     "SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    "sgd_weight_decay": ("SGD", {"learning_rate": 0.05, "momentum": 0.5, "weight_decay": 0.1},
                         "SGD", {"lr": 0.05, "momentum": 0.5, "weight_decay": 0.1}),
    "adam": ("Adam", {"learning_rate": 0.01}, "Adam", {"lr": 0.01}),
    "adam_weight_decay": ("Adam", {"learning_rate": 0.01, "weight_decay": 0.1},
                          "Adam", {"lr": 0.01, "weight_decay": 0.1}),
    "amsgrad": ("Adam", {"learning_rate": 0.01, "beta1": 0.8, "beta2": 0.99, "amsgrad": True},
                "Adam", {"lr": 0.01, "betas": (0.8, 0.99), "amsgrad": True}),
    "adamw": ("AdamW", {"learning_rate": 0.01, "weight_decay": 0.1, "epsilon": 1e-6},
              "AdamW", {"lr": 0.01, "weight_decay": 0.1, "eps": 1e-6}),
    "rmsprop": ("RMSProp", {"learning_rate": 0.01, "decay": 0.9},
                "RMSprop", {"lr": 0.01, "alpha": 0.9, "eps": 1e-8}),
    "rmsprop_centered": ("RMSProp", {"learning_rate": 0.01, "decay": 0.95, "centered": True},
                         "RMSprop", {"lr": 0.01, "alpha": 0.95, "eps": 1e-8, "centered": True}),
    "rmsprop_momentum": ("RMSProp", {"learning_rate": 0.01, "decay": 0.9, "momentum": 0.8},
                         "RMSprop", {"lr": 0.01, "alpha": 0.9, "eps": 1e-8, "momentum": 0.8}),
    "rmsprop_centered_momentum": (
        "RMSProp", {"learning_rate": 0.01, "decay": 0.99, "momentum": 0.7, "centered": True,
                    "weight_decay": 0.01},
        "RMSprop", {"lr": 0.01, "alpha": 0.99, "eps": 1e-8, "momentum": 0.7, "centered": True,
                    "weight_decay": 0.01}),
    "adagrad": ("AdaGrad", {"learning_rate": 0.1, "epsilon": 1e-10, "lr_decay": 0.01,
                            "initial_accumulator_value": 0.1},
                "Adagrad", {"lr": 0.1, "eps": 1e-10, "lr_decay": 0.01,
                            "initial_accumulator_value": 0.1}),
    # the eps -> 0 limit, to compare with optax (which puts eps inside the sqrt)
    "adagrad_tiny_eps": ("AdaGrad", {"learning_rate": 0.1, "epsilon": 1e-300,
                                     "initial_accumulator_value": 0.1},
                         "Adagrad", {"lr": 0.1, "eps": 1e-300,
                                     "initial_accumulator_value": 0.1}),
    # option combinations: weight decay with every variant, AMSGrad with both decays, AdaGrad
    # from the default empty accumulator
    "sgd_plain_weight_decay": ("SGD", {"learning_rate": 0.05, "weight_decay": 0.1},
                               "SGD", {"lr": 0.05, "weight_decay": 0.1}),
    "sgd_nesterov_weight_decay": (
        "SGD", {"learning_rate": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.05},
        "SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.05}),
    "sgd_dampening_weight_decay": (
        "SGD", {"learning_rate": 0.05, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.05},
        "SGD", {"lr": 0.05, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.05}),
    "amsgrad_weight_decay": (
        "Adam", {"learning_rate": 0.01, "beta1": 0.8, "beta2": 0.99, "amsgrad": True,
                 "weight_decay": 0.1},
        "Adam", {"lr": 0.01, "betas": (0.8, 0.99), "amsgrad": True, "weight_decay": 0.1}),
    "adamw_amsgrad": ("AdamW", {"learning_rate": 0.01, "weight_decay": 0.1, "amsgrad": True},
                      "AdamW", {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True}),
    "rmsprop_weight_decay": ("RMSProp", {"learning_rate": 0.01, "decay": 0.9, "weight_decay": 0.1},
                             "RMSprop", {"lr": 0.01, "alpha": 0.9, "eps": 1e-8,
                                         "weight_decay": 0.1}),
    "rmsprop_centered_weight_decay": (
        "RMSProp", {"learning_rate": 0.01, "decay": 0.95, "centered": True, "weight_decay": 0.1},
        "RMSprop", {"lr": 0.01, "alpha": 0.95, "eps": 1e-8, "centered": True,
                    "weight_decay": 0.1}),
    "adagrad_weight_decay": ("AdaGrad", {"learning_rate": 0.1, "epsilon": 1e-10, "lr_decay": 0.01,
                                         "initial_accumulator_value": 0.1, "weight_decay": 0.1},
                             "Adagrad", {"lr": 0.1, "eps": 1e-10, "lr_decay": 0.01,
                                         "initial_accumulator_value": 0.1, "weight_decay": 0.1}),
    "adagrad_zero_init": ("AdaGrad", {"learning_rate": 0.1, "epsilon": 1e-10},
                          "Adagrad", {"lr": 0.1, "eps": 1e-10}),
}

# mithril slot -> torch.optim state key
TORCH_SLOTS = {
    "SGD": {"momentum": "momentum_buffer"},
    "Adam": {"m": "exp_avg", "v": "exp_avg_sq", "vmax": "max_exp_avg_sq"},
    "AdamW": {"m": "exp_avg", "v": "exp_avg_sq", "vmax": "max_exp_avg_sq"},
    "RMSProp": {"v": "square_avg", "grad_avg": "grad_avg", "momentum": "momentum_buffer"},
    "AdaGrad": {"sum": "sum"},
}

# optax transformations with the same convention as the torch optimizer of the case. Coupled
# weight decay (torch: g + wd*p before the rule) is optax.add_decayed_weights chained in front.
# RMSProp with momentum: optax keeps lr inside the momentum buffer, torch outside; the same for a
# constant lr (these runs), different once lr changes. Not here: AMSGrad (optax keeps the max of
# the bias-corrected v, torch of the raw v), SGD dampening (optax has none), AdaGrad with
# eps > 0 (optax: inside the sqrt, torch: outside).
OPTAX = {
    "sgd": "optax.sgd(0.05)",
    "sgd_momentum": "optax.sgd(0.05, momentum=0.9)",  # trace b <- g + mu*b, b_1 = g
    "sgd_nesterov": "optax.sgd(0.05, momentum=0.9, nesterov=True)",
    "sgd_weight_decay": "optax.chain(optax.add_decayed_weights(0.1), "
                        "optax.sgd(0.05, momentum=0.5))",
    "sgd_plain_weight_decay": "optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.05))",
    "sgd_nesterov_weight_decay": "optax.chain(optax.add_decayed_weights(0.05), "
                                 "optax.sgd(0.05, momentum=0.9, nesterov=True))",
    "adam": "optax.adam(0.01)",  # eps_root=0
    "adam_weight_decay": "optax.chain(optax.add_decayed_weights(0.1), optax.adam(0.01))",
    "adamw": "optax.adamw(0.01, weight_decay=0.1, eps=1e-6)",
    "rmsprop": "optax.rmsprop(0.01, decay=0.9, eps=1e-8, eps_in_sqrt=False)",
    "rmsprop_centered": "optax.rmsprop(0.01, decay=0.95, eps=1e-8, eps_in_sqrt=False, centered=True)",
    "rmsprop_momentum": "optax.rmsprop(0.01, decay=0.9, eps=1e-8, eps_in_sqrt=False, momentum=0.8)",
    "rmsprop_centered_momentum": "optax.chain(optax.add_decayed_weights(0.01), optax.rmsprop("
                                 "0.01, decay=0.99, eps=1e-8, eps_in_sqrt=False, momentum=0.7, "
                                 "centered=True))",
    "rmsprop_weight_decay": "optax.chain(optax.add_decayed_weights(0.1), "
                            "optax.rmsprop(0.01, decay=0.9, eps=1e-8, eps_in_sqrt=False))",
    "rmsprop_centered_weight_decay": "optax.chain(optax.add_decayed_weights(0.1), optax.rmsprop("
                                     "0.01, decay=0.95, eps=1e-8, eps_in_sqrt=False, "
                                     "centered=True))",
    "adagrad_tiny_eps": "optax.adagrad(0.1, initial_accumulator_value=0.1, eps=0.0)",
}

# lr changes mid-run: step index -> factor of the case's initial lr
LR_FACTORS = {25: 3.0, 50: 0.5, 75: 0.05}
ALL = ("numpy", "torch", "jax", "jax-jit", "torch-ops")
EXPECTED_ENGINE = {"numpy": "NumbaEngine", "torch": "NumbaEngine", "jax": "NumbaEngine",
                   "jax-jit": "JaxEngine", "torch-ops": "TorchFusedEngine"}
#: the max errors observed, by check (print with ``pytest -s``, see the last test)
OBSERVED: dict[str, float] = {}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


@functools.cache
def problem(dtype: str = "float64", steps: int = STEPS, seed: int = 0):
    """Start parameters and a gradient sequence (NumPy arrays of ``dtype``)."""
    rng = np.random.default_rng(seed)
    p0 = {k: np.asarray(rng.standard_normal(s), dtype=dtype) for k, s in SHAPES.items()}
    grads = [{k: np.asarray(rng.standard_normal(s) * (1 + t % 7), dtype=dtype)
              for k, s in SHAPES.items()} for t in range(steps)]
    return p0, grads


def _small(dtype="float32"):
    rng = np.random.default_rng(1)
    p = {"a": rng.standard_normal((2, 3)).astype(dtype), "b": rng.standard_normal(3).astype(dtype)}
    g = {"a": rng.standard_normal((2, 3)).astype(dtype), "b": rng.standard_normal(3).astype(dtype)}
    return p, g


def rel_err(a, b) -> float:
    """``max |a - b| / max(|a|, |b|, 1e-3 * M)``, ``M`` = the largest magnitude in either tensor.

    Elementwise relative for elements at or above 0.1% of ``M``; smaller elements are measured
    against ``1e-3 * M`` (relative to the tensor's scale), so this is NOT a pure elementwise
    relative error. Values that cancel to near zero carry an error of the size of their
    operands' rounding; relative to the tiny result, that measures the cancellation, not the
    optimizer (see the module docstring: up to ~4e-8 in float64 where this measure gives
    ~1e-13).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise AssertionError(f"shape {a.shape} != {b.shape}")
    scale = np.maximum(np.abs(a), np.abs(b))
    scale = np.maximum(scale, max(1e-3 * float(np.max(scale, initial=0.0)), 1e-300))
    return float(np.max(np.abs(a - b) / scale, initial=0.0))


def native(backend: str, a: np.ndarray):
    """A copy of ``a`` as a ``backend`` array of the same dtype."""
    if backend.startswith("torch"):
        return torch.tensor(a)
    if backend.startswith("jax"):
        import jax.numpy as jnp

        return jnp.asarray(a)
    return np.array(a)


def natives(backend: str, d: dict) -> dict:
    return {k: native(backend, v) for k, v in d.items()}


def host(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy().copy()
    return np.array(x)


@contextlib.contextmanager
def engine_of(backend: str):
    """``"jax-jit"``: JAX arrays through the jitted :class:`JaxEngine` (the default on
    accelerators; on CPU JAX arrays go through the fused numba engine); ``"torch-ops"``:
    torch tensors through :class:`TorchFusedEngine` (torch's fused kernels, the default on
    CUDA; its other steps are the tensor-op engine's)."""
    name = {"jax-jit": "JAX_ENGINE", "torch-ops": "TORCH_ENGINE"}.get(backend)
    if name is None:
        yield
        return
    old = getattr(engines, name)
    setattr(engines, name, "jit" if backend == "jax-jit" else "fused-ops")
    try:
        yield
    finally:
        setattr(engines, name, old)


@contextlib.contextmanager
def jax_float64():
    """float64 JAX for the duration of the block, leaving the process-global flag as it was."""
    import jax

    old = jax.config.jax_enable_x64
    try:
        with jax.enable_x64(True):
            yield
    finally:
        jax.config.update("jax_enable_x64", old)


@contextlib.contextmanager
def on(backend: str, dtype: str = "float32"):
    """The engine of ``backend`` and, for JAX float64, x64 mode."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(engine_of(backend))
        if backend.startswith("jax") and dtype == "float64":
            stack.enter_context(jax_float64())
        yield


def init(opt: Optimizer, backend: str, params: dict) -> OptimizerState:
    with engine_of(backend):
        state = opt.init(params)
    assert type(state.engine).__name__ == EXPECTED_ENGINE[backend]
    return state


def make_opt(case: str, **extra) -> Optimizer:
    cls, kw, _, _ = CASES[case]
    return getattr(mo, cls)(**kw, **extra)


def side_by_side(case: str, backend: str = "numpy", dtype: str = "float64", steps: int = STEPS,
                 lr_factors: dict | None = None, drop=None, torch_clip: dict | None = None,
                 **extra) -> dict:
    """Run the mithril optimizer of ``case`` on ``backend`` and torch.optim in lock-step.

    ``lr_factors``: {step: factor} changes the lr of both mid-run; ``drop(t)``: names whose
    gradient is missing at step t (torch: ``grad = None``); ``torch_clip``: {"norm": x} and/or
    {"value": y} applied to torch's gradients before its step (mithril gets ``extra`` options).
    Returns the max relative errors of params (every step) and slots (end), and final params.
    """
    with on(backend, dtype):
        return _side_by_side(case, backend, dtype, steps, lr_factors, drop, torch_clip, extra)


def _side_by_side(case, backend, dtype, steps, lr_factors, drop, torch_clip, extra):
    _, _, tcls, tkw = CASES[case]
    p0, grads = problem(dtype, steps)
    opt = make_opt(case, **extra)
    params = natives(backend, p0)
    state = init(opt, backend, params)
    tparams = {k: torch.tensor(v, requires_grad=True) for k, v in p0.items()}
    topt = getattr(torch.optim, tcls)(list(tparams.values()), **tkw)
    lr0 = opt.get_learning_rate()
    perr = 0.0
    for t in range(steps):
        if lr_factors and t in lr_factors:
            opt.set_learning_rate(lr0 * lr_factors[t])
            topt.param_groups[0]["lr"] = lr0 * lr_factors[t]
        gone = set(drop(t)) if drop else set()
        g = {k: v for k, v in grads[t].items() if k not in gone}
        mine = natives(backend, g)
        if getattr(drop, "as_none", False):  # present with None, as torch's .grad is
            mine = {k: mine.get(k) for k in grads[t]}
        params, state = opt.update(params, mine, state)
        for k, p in tparams.items():
            p.grad = torch.tensor(g[k]) if k in g else None
        if torch_clip:
            with_grad = [p for p in tparams.values() if p.grad is not None]
            if "norm" in torch_clip:
                torch.nn.utils.clip_grad_norm_(with_grad, torch_clip["norm"])
            if "value" in torch_clip:
                torch.nn.utils.clip_grad_value_(with_grad, torch_clip["value"])
        topt.step()
        perr = max(perr, *(rel_err(host(params[k]), tparams[k].detach().numpy()) for k in SHAPES))
    serr = 0.0
    names = TORCH_SLOTS[type(opt).__name__]
    assert set(state.slots) <= set(names), state.slots
    for slot in state.slots:
        mine = state.slot(slot)
        for k, p in tparams.items():
            if p in topt.state:  # else torch never saw a gradient for p
                serr = max(serr, rel_err(host(mine[k]), topt.state[p][names[slot]].numpy()))
    return {"params": perr, "slots": serr, "final": {k: host(v) for k, v in params.items()},
            "step": state.step, "dtype": str(host(params["w"]).dtype)}


def run_optax(case: str, steps: int = STEPS) -> dict:
    """optax (JAX float64, jitted) vs torch.optim, side by side; and its final params."""
    with jax_float64():
        return _run_optax(case, steps)


def _run_optax(case, steps):
    import jax
    import jax.numpy as jnp
    import optax  # noqa: F401  (used by eval)

    _, _, tcls, tkw = CASES[case]
    p0, grads = problem("float64", steps)
    tx = eval(OPTAX[case])

    @jax.jit
    def step(params, g, ostate):
        upd, ostate = tx.update(g, ostate, params)
        return optax.apply_updates(params, upd), ostate

    params = {k: jnp.asarray(v) for k, v in p0.items()}
    ostate = tx.init(params)
    tparams = {k: torch.tensor(v, requires_grad=True) for k, v in p0.items()}
    topt = getattr(torch.optim, tcls)(list(tparams.values()), **tkw)
    err = 0.0
    for t in range(steps):
        params, ostate = step(params, {k: jnp.asarray(v) for k, v in grads[t].items()}, ostate)
        for k, p in tparams.items():
            p.grad = torch.tensor(grads[t][k])
        topt.step()
        err = max(err, *(rel_err(host(params[k]), tparams[k].detach().numpy()) for k in SHAPES))
    assert host(params["w"]).dtype == np.float64
    return {"vs_torch": err, "final": {k: host(v) for k, v in params.items()}}


def drop_some(t: int) -> list[str]:
    """Gradients missing at step t: "b" on every third step, "big" and "s" now and then."""
    out = ["b"] if t % 3 == 1 else []
    if t % 10 == 4:
        out += ["big", "s"]
    return out


def drop_tail(t: int) -> list[str]:
    """Gradients missing only at the end (for optimizers whose math depends on the step:
    torch counts steps per parameter, mithril - like optax - once per optimizer)."""
    return (["b"] if t >= STEPS - 10 else []) + (["s", "big"] if t >= STEPS - 3 else [])


def as_none(drop):  # noqa: ANN001, ANN201
    """``drop``, its gradients passed as None under their keys instead of left out (a dict
    built from torch's ``.grad`` of every parameter)."""
    def none(t: int) -> list[str]:
        return drop(t)

    none.as_none = True
    none.__name__ = f"{drop.__name__}_as_none"
    return none


def _check(label: str, r: dict, tol: float = TOL64) -> None:
    OBSERVED[label] = max(r["params"], r["slots"])
    assert r["params"] <= tol, f"{label}: params rel err {r['params']:.3g}"
    assert r["slots"] <= tol, f"{label}: slots rel err {r['slots']:.3g}"


# ---------------------------------------------------------------------------------------------
# float64 parity with torch.optim (and optax)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_parity_float64(case):
    """100 steps vs torch.optim on every backend, the jitted JAX engine included (one test per
    case, so each kernel compiles once per worker); plus optax where it shares torch's
    convention."""
    finals = {}
    for backend in ALL:
        r = side_by_side(case, backend)
        assert r["dtype"] == "float64" and r["step"] == STEPS, backend
        _check(f"{case}/{backend}", r)
        finals[backend] = r["final"]
    if case in OPTAX:
        o = run_optax(case)
        vs_mithril = max(rel_err(o["final"][k], finals["jax"][k]) for k in SHAPES)
        OBSERVED[f"{case}/optax"] = max(o["vs_torch"], vs_mithril)
        assert o["vs_torch"] <= TOL64 and vs_mithril <= TOL64, (o["vs_torch"], vs_mithril)


def test_jax_float64_left_process_flag_alone():
    import jax
    import jax.numpy as jnp

    before = jax.config.jax_enable_x64
    side_by_side("sgd", "jax", steps=2)
    assert jax.config.jax_enable_x64 == before
    if not before:
        assert jnp.ones(2).dtype == jnp.float32


@pytest.mark.parametrize("case", ["sgd_nesterov", "adam", "rmsprop_momentum", "adagrad"])
def test_set_learning_rate_mid_run_matches_torch(case):
    """set_learning_rate == torch's ``param_groups[0]["lr"] = ...`` (lr outside buffers)."""
    for backend in ALL:
        _check(f"lr/{case}/{backend}", side_by_side(case, backend, lr_factors=LR_FACTORS))


@pytest.mark.parametrize("case, drop", [
    ("sgd_weight_decay", drop_some), ("rmsprop_centered_momentum", drop_some),
    ("adagrad_tiny_eps", drop_some), ("adamw", drop_tail), ("adagrad", drop_tail),
    ("sgd_weight_decay", as_none(drop_some)), ("adamw", as_none(drop_tail))])
def test_missing_gradients_match_torch_grad_none(case, drop):
    """A parameter absent from ``gradients``, or whose gradient is None, is left alone, and
    so is its state (torch skips parameters whose ``grad`` is None, weight decay
    included)."""
    for backend in ALL:
        _check(f"drop/{case}/{backend}", side_by_side(case, backend, drop=drop))


@pytest.mark.parametrize("backend", ALL)
def test_sgd_dampening_first_step_is_the_optimizers(backend):
    """The undampened first buffer (b = g) belongs to the optimizer's first step (one step
    count per state): a parameter first seen at step 2 gets b = (1 - tau) g, where torch,
    counting per parameter, takes b = g. The parameter seen from step 1 matches torch."""
    p0 = {"a": np.array([1.0, -2.0]), "b": np.array([0.5, 3.0])}
    g1, g2 = {"a": np.array([0.3, -0.1])}, {"a": np.array([0.2, 0.4]), "b": np.array([1.5, -2.0])}
    lr, mu, tau = 0.1, 0.9, 0.25
    with on(backend, "float64"):
        opt = SGD(lr, momentum=mu, dampening=tau)
        params = natives(backend, p0)
        state = init(opt, backend, params)
        for g in (g1, g2):
            params, state = opt.update(params, natives(backend, g), state)
        ours = {k: host(v) for k, v in params.items()}
        buf = {k: host(v) for k, v in state.slot("momentum").items()}
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in p0.items()}
    topt = torch.optim.SGD(tp.values(), lr=lr, momentum=mu, dampening=tau)
    for g in (g1, g2):
        for k, t in tp.items():
            t.grad = torch.tensor(g[k]) if k in g else None
        topt.step()
    np.testing.assert_allclose(ours["a"], tp["a"].detach().numpy(), rtol=1e-14)
    np.testing.assert_array_equal(buf["b"], (1 - tau) * g2["b"])
    np.testing.assert_allclose(ours["b"], p0["b"] - lr * (1 - tau) * g2["b"], rtol=1e-14)
    np.testing.assert_array_equal(topt.state[tp["b"]]["momentum_buffer"].numpy(), g2["b"])


# the global gradient norms of problem() range over ~130-920 (gradient scale 1 + t % 7):
# clip_norm=500 clips only the larger ones, lower values clip every step
CLIP_RUNS = [
    ("adam", {"clip_norm": 1.5}, {"norm": 1.5}),
    ("sgd_nesterov", {"clip_norm": 500.0}, {"norm": 500.0}),
    ("sgd_momentum", {"clip_value": 0.5}, {"value": 0.5}),
    ("rmsprop_momentum", {"clip_norm": 2.0, "clip_value": 0.01}, {"norm": 2.0, "value": 0.01}),
    ("adamw", {"clip_value": 0.5}, {"value": 0.5}),
    ("adamw", {"clip_norm": 500.0}, {"norm": 500.0}),
    ("adagrad", {"clip_value": 1.0}, {"value": 1.0}),
    ("adagrad", {"clip_norm": 3.0}, {"norm": 3.0}),
    ("amsgrad", {"clip_value": 2.0}, {"value": 2.0}),
    ("amsgrad", {"clip_norm": 500.0, "clip_value": 1.0}, {"norm": 500.0, "value": 1.0}),
]


@pytest.mark.parametrize("case, extra, torch_clip", CLIP_RUNS)
def test_clip_options_match_torch_clip_then_step(case, extra, torch_clip):
    """``clip_norm``/``clip_value`` == torch ``clip_grad_norm_``/``clip_grad_value_`` followed
    by the torch optimizer (norm first when both are given)."""
    for backend in ALL:
        r = side_by_side(case, backend, torch_clip=torch_clip, **extra)
        _check(f"clip/{case}/{','.join(extra)}/{backend}", r)


@pytest.mark.parametrize("backend", ["numpy", "jax"])
def test_step_count_is_per_optimizer(backend):
    """Convention (optax's, not torch's): bias correction and AdaGrad's lr_decay use the
    optimizer's step count, also for a parameter that missed earlier steps."""
    p_np, g_np = _small()
    opt = Adam(0.1)
    params = natives(backend, p_np)
    state = init(opt, backend, params)
    params, state = opt.update(params, {"a": native(backend, g_np["a"])}, state)
    params, state = opt.update(params, natives(backend, g_np), state)
    g = g_np["b"].astype(np.float64)
    m, v = 0.1 * g, 0.001 * g * g  # first moment update of "b", at t = 2
    expected = p_np["b"] - 0.1 / (1 - 0.9**2) * m / (np.sqrt(v) / np.sqrt(1 - 0.999**2) + 1e-8)
    assert rel_err(host(params["b"]), expected) <= 1e-6
    assert state.step == 2


@pytest.mark.parametrize("backend", ALL)
def test_gradient_key_order_and_key_objects_do_not_matter(backend):
    """Gradients are matched by name: the same steps whatever the order of their keys, and
    whether the keys are the params' own string objects or equal copies (the fast paths
    remember the keys that last matched). Equal shapes, so that only the names tell the
    gradients apart."""
    rng = np.random.default_rng(3)
    p0 = {k: rng.standard_normal(64).astype(np.float32) for k in ("u", "vv", "www")}
    grads = [{k: rng.standard_normal(64).astype(np.float32) for k in p0} for _ in range(4)]
    results = []
    for order in ("same", "reversed", "alternating"):
        opt = Adam(0.05)
        params = natives(backend, p0)
        state = init(opt, backend, params)
        for t, g in enumerate(grads):
            keys = list(g) if order == "same" or (order == "alternating" and t % 2) else list(g)[::-1]
            params, state = opt.update(params, {(k + "!")[:-1]: native(backend, g[k]) for k in keys}, state)
        results.append({k: host(v) for k, v in params.items()})
    for r in results[1:]:
        for k in results[0]:
            np.testing.assert_array_equal(results[0][k], r[k], err_msg=k)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_centered_rmsprop_constant_gradient_stays_finite(dtype):
    """With a constant gradient, v - mean(g)^2 cancels to rounding noise; torch takes the sqrt
    of slightly negative values and its params turn NaN (float64: after ~330 steps at
    alpha=0.9; float32: ~130). mithril clamps the variance at 0: identical to torch while
    torch is finite (until the variance is noise: float64 ~100 steps, float32 ~20), finite
    afterwards."""
    g_np = (np.full(64, 1.7) * np.linspace(0.5, 1.5, 64)).astype(dtype)
    p_np = np.zeros(64, dtype)
    compare = 100 if dtype == "float64" else 20
    for backend in ALL:
        with on(backend, dtype):
            opt = RMSProp(1e-3, decay=0.9, centered=True)
            params = {"w": native(backend, p_np)}
            state = init(opt, backend, params)
            tp = torch.tensor(p_np, requires_grad=True)
            topt = torch.optim.RMSprop([tp], lr=1e-3, alpha=0.9, eps=1e-8, centered=True)
            g = {"w": native(backend, g_np)}
            for t in range(400):
                params, state = opt.update(params, g, state)
                tp.grad = torch.tensor(g_np)
                topt.step()
                if t < compare and not torch.isnan(tp).any():
                    tol = 1e-5 if dtype == "float32" else TOL64
                    assert rel_err(host(params["w"]), tp.detach().numpy()) <= tol, (backend, t)
            w = host(params["w"])
            assert w.dtype == np.dtype(dtype) and np.isfinite(w).all(), backend
            assert np.isfinite(host(state.slots["grad_avg"])).all(), backend
            assert (w < 0).all()  # still descending


# ---------------------------------------------------------------------------------------------
# the tensor-op engine (torch on GPU, float16/bfloat16), forced on CPU in float64
# ---------------------------------------------------------------------------------------------

ARRAY_BACKENDS = ("numpy", "torch")


@pytest.fixture
def array_engine(monkeypatch):
    """Every ``init`` gets an :class:`ArrayEngine` (for the duration of the test)."""
    from mithril.utils.optimizers.engines.array_engine import ArrayEngine

    monkeypatch.setattr(engines, "engine_for", lambda backend, layout: ArrayEngine(backend, layout))
    for backend in ARRAY_BACKENDS:
        monkeypatch.setitem(EXPECTED_ENGINE, backend, "ArrayEngine")


@pytest.mark.parametrize("case", list(CASES))
def test_array_engine_parity_float64(array_engine, case):
    for backend in ARRAY_BACKENDS:
        r = side_by_side(case, backend)
        assert r["dtype"] == "float64" and r["step"] == STEPS, backend
        _check(f"array/{case}/{backend}", r)


@pytest.mark.parametrize("backend", ARRAY_BACKENDS)
def test_array_engine_clip_missing_gradients_and_lr_change(array_engine, backend):
    for case, extra, torch_clip in (CLIP_RUNS[4], CLIP_RUNS[7], CLIP_RUNS[9]):
        r = side_by_side(case, backend, torch_clip=torch_clip, **extra)
        _check(f"array/clip/{case}/{','.join(extra)}/{backend}", r)
    for case, drop in (("rmsprop_centered_momentum", drop_some), ("sgd_weight_decay", drop_some),
                       ("adamw", drop_tail), ("adagrad", drop_tail)):
        _check(f"array/drop/{case}/{backend}", side_by_side(case, backend, drop=drop))
    _check(f"array/lr/adam/{backend}", side_by_side("adam", backend, lr_factors=LR_FACTORS))


# ---------------------------------------------------------------------------------------------
# float32: the backends agree with each other
# ---------------------------------------------------------------------------------------------

# one per kernel family; the float32 kernels are reused by the small tests below
F32_CASES = ["sgd_dampening", "adam", "rmsprop_centered_momentum"]


@pytest.mark.parametrize("case", F32_CASES)
def test_float32_backends_agree(case):
    runs = {b: side_by_side(case, b, dtype="float32") for b in ALL}
    for b, r in runs.items():
        assert r["dtype"] == "float32", b
        # each is also close to torch.optim in float32 (rounding compounds over 100 steps)
        assert r["params"] <= 1e-3, (b, r["params"])
    # measured relative to each tensor's scale (max |x|): elementwise relative errors of
    # float32 values that cancel over 100 steps say nothing about the optimizer
    for a, b in (("numpy", "torch"), ("numpy", "jax"), ("numpy", "jax-jit"), ("torch", "jax-jit")):
        for k in SHAPES:
            x, y = runs[a]["final"][k], runs[b]["final"][k]
            err = float(np.max(np.abs(x - y)) / np.max(np.abs(y)))
            OBSERVED[f"f32/{case}/{a}-{b}"] = max(err, OBSERVED.get(f"f32/{case}/{a}-{b}", 0))
            assert err <= TOL32, (case, a, b, k, err)
    # NumPy, torch and JAX on CPU run the same fused kernel: identical bits
    for k in SHAPES:
        np.testing.assert_array_equal(runs["numpy"]["final"][k], runs["torch"]["final"][k])
        np.testing.assert_array_equal(runs["numpy"]["final"][k], runs["jax"]["final"][k])


# ---------------------------------------------------------------------------------------------
# ownership, pass-through, returned arrays, recompilation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ALL)
def test_inputs_not_modified_and_absent_params_pass_through(backend):
    p_np, g_np = _small()
    params = natives(backend, p_np)
    opt = Adam(0.1)
    state = init(opt, backend, params)
    new, state = opt.update(params, {"a": native(backend, g_np["a"])}, state)
    # the arrays we passed (not returned by an update) are never modified
    for k in p_np:
        np.testing.assert_array_equal(host(params[k]), p_np[k])
    np.testing.assert_array_equal(host(new["b"]), p_np["b"])  # no gradient: unchanged
    assert not np.array_equal(host(new["a"]), p_np["a"])
    np.testing.assert_array_equal(host(state.slot("m")["b"]), 0)
    np.testing.assert_array_equal(host(state.slot("v")["b"]), 0)
    assert np.all(host(state.slot("v")["a"]) > 0)
    assert state.step == 1 and list(new) == ["a", "b"]
    assert all(type(v) is type(params["a"]) for v in new.values())


def test_torch_returned_params_are_usable_leaf_tensors():
    import mithril as ml
    from mithril.backends import TorchBackend

    model = ml.MLP(["tanh", None], [8, 3])
    model.set_shapes(input=[None, 5])
    cm = ml.compile(model, TorchBackend(dtype="float64"))
    params = cm.get_parameters()
    x = {"input": torch.randn(4, 5, dtype=torch.float64)}
    opt = SGD(0.1, momentum=0.9)
    state = opt.init(params)
    for _ in range(3):
        out = cm.evaluate(params, x)
        _, grads = cm.evaluate(params, x, output_gradients={"output": out["output"]})
        params, state = opt.update(params, grads, state)
    for p in params.values():
        assert isinstance(p, torch.Tensor) and p.is_leaf and not p.requires_grad
        assert p.dtype == torch.float64 and p.device.type == "cpu"
    # torch can use them directly: autograd on a clone, and a torch.optim step in place
    w = params["linear_0.weight"].clone().requires_grad_()
    (w**2).sum().backward()
    np.testing.assert_allclose(w.grad.numpy(), 2 * params["linear_0.weight"].numpy())
    tp = params["linear_1.bias"]
    tp.grad = torch.ones_like(tp)
    before = tp.clone()
    torch.optim.SGD([tp], lr=0.5).step()
    np.testing.assert_allclose(tp.numpy(), before.numpy() - 0.5)
    assert torch.isfinite(cm.evaluate(params, x)["output"]).all()


def test_jax_learning_rate_change_does_not_recompile():
    p_np, g_np = _small()
    params, grads = natives("jax", p_np), natives("jax", g_np)
    opt = Adam(0.01)
    state = init(opt, "jax-jit", params)
    from mithril.utils.optimizers.engines.jax_engine import _COMPILED as cache

    params, state = opt.update(params, grads, state)  # first step copies, then donates
    n_fns, n_traces = len(cache), sum(f._cache_size() for f in cache.values())
    for k in range(20):
        opt.set_learning_rate(0.01 / (k + 1))
        params, state = opt.update(params, grads, state)
    assert len(cache) == n_fns
    assert sum(f._cache_size() for f in cache.values()) == n_traces
    assert state.step == 21
    # a second optimizer of the same kind and layout reuses the compiled step
    state2 = init(Adam(0.5), "jax-jit", natives("jax", p_np))
    Adam(0.5).update(natives("jax", p_np), grads, state2)
    assert len(cache) == n_fns


@pytest.mark.parametrize("backend", ["numpy", "jax"])
def test_numba_learning_rate_change_does_not_recompile(backend):
    from mithril.utils.optimizers.adam import _adam
    from mithril.utils.optimizers.engines.kernels import update_kernel

    p_np, g_np = _small()
    opt = Adam(0.01)
    params = natives(backend, p_np)
    state = init(opt, backend, params)
    for _ in range(2):  # (JAX's first step reads the caller's arrays: another kernel)
        params, state = opt.update(params, natives(backend, g_np), state)
    kernel = update_kernel(_adam, 2, 7, "float32", backend == "jax", False, False)  # JAX: double buffer
    n_sigs = len(kernel.signatures)
    for k in range(5):
        opt.set_learning_rate(0.01 / (k + 1))
        params, state = opt.update(params, natives(backend, g_np), state)
    assert len(kernel.signatures) == n_sigs == 1


# ---------------------------------------------------------------------------------------------
# clip_gradients / global_norm helpers vs torch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
def test_global_norm_and_clip_gradients_match_torch(backend):
    rng = np.random.default_rng(3)
    g_np = {"a": rng.standard_normal((5, 4)) * 3, "b": rng.standard_normal(7), "c": np.array(2.0)}
    dtype = "float32" if backend == "jax" else "float64"
    tol = 1e-6 if dtype == "float32" else 1e-13
    g_np = {k: v.astype(dtype) for k, v in g_np.items()}
    grads = natives(backend, g_np)
    tg = [torch.tensor(v) for v in g_np.values()]
    norm = global_norm(grads)
    assert isinstance(norm, float)
    ref = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.double())
                                                      for t in tg])))
    assert abs(norm - ref) <= tol * ref
    for max_norm in (1.0, 1e3):  # clips / leaves alone
        out = clip_gradients(grads, clip_norm=max_norm)
        ts = [torch.tensor(v, requires_grad=True) for v in g_np.values()]
        for t, v in zip(ts, g_np.values(), strict=True):
            t.grad = torch.tensor(v)
        pre = torch.nn.utils.clip_grad_norm_(ts, max_norm)
        assert abs(float(pre) - norm) <= tol * norm
        for (k, v), t in zip(out.items(), ts, strict=True):
            assert type(v) is type(grads[k]) and host(v).dtype == np.dtype(dtype), k
            assert rel_err(host(v), t.grad.numpy()) <= tol, (k, max_norm)
    out = clip_gradients(grads, clip_value=1.5)
    for (k, v), t in zip(out.items(), tg, strict=True):
        assert type(v) is type(grads[k]), k
        np.testing.assert_array_equal(host(v), torch.clamp(t, -1.5, 1.5).numpy())
    for k, v in grads.items():  # inputs untouched
        np.testing.assert_array_equal(host(v), g_np[k])


def test_clip_gradients_both_and_errors():
    g = {"a": np.array([3.0, -4.0, 0.5])}
    out = clip_gradients(g, clip_value=1.0, clip_norm=1.0)  # norm first, then value (as fused)
    v = np.clip(g["a"] * (1.0 / (np.linalg.norm(g["a"]) + 1e-6)), -1, 1)
    np.testing.assert_allclose(out["a"], v, rtol=1e-14)
    with pytest.raises(ValueError, match="clip_value or clip_norm"):
        clip_gradients(g)
    with pytest.raises(ValueError, match="clip_norm"):
        clip_gradients(g, clip_norm=-1.0)
    with pytest.raises(ValueError, match="clip_value"):
        clip_gradients(g, clip_value=0.0)
    with pytest.raises(FloatingPointError):
        clip_gradients({"a": np.array([np.inf])}, clip_norm=1.0)


# ---------------------------------------------------------------------------------------------
# non-finite gradients
# ---------------------------------------------------------------------------------------------


def _bad(g_np, backend, value=np.nan):
    bad = {k: v.copy() for k, v in g_np.items()}
    bad["b"][1] = value
    return natives(backend, bad)


@pytest.mark.parametrize("backend", ALL)
def test_nonfinite_skip(backend):
    p_np, g_np = _small()
    opt, ref = Adam(0.1, nonfinite="skip"), Adam(0.1, nonfinite="skip")
    params, rparams = natives(backend, p_np), natives(backend, p_np)
    state, rstate = init(opt, backend, params), init(ref, backend, rparams)
    params, state = opt.update(params, natives(backend, g_np), state)
    rparams, rstate = ref.update(rparams, natives(backend, g_np), rstate)
    before = {k: host(v) for k, v in params.items()}
    slots = {s: host(v) for s, v in state.slots.items()}
    for value in (np.nan, np.inf, -np.inf):
        with pytest.warns(RuntimeWarning, match="non-finite"):
            params, state = opt.update(params, _bad(g_np, backend, value), state)
        assert state.last_step_skipped and state.step == 1
        assert not np.isfinite(state.last_grad_norm)
        for k in before:
            np.testing.assert_array_equal(host(params[k]), before[k])
        for s in slots:
            np.testing.assert_array_equal(host(state.slots[s]), slots[s])
    assert state.num_skipped == 3
    # a good step afterwards continues as if the bad ones never happened
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        params, state = opt.update(params, natives(backend, g_np), state)
        rparams, rstate = ref.update(rparams, natives(backend, g_np), rstate)
    assert not state.last_step_skipped and state.step == 2 and state.num_skipped == 3
    for k in p_np:
        np.testing.assert_array_equal(host(params[k]), host(rparams[k]))


@pytest.mark.parametrize("backend", ALL)
def test_nonfinite_raise(backend):
    p_np, g_np = _small()
    opt = SGD(0.1, momentum=0.9, nonfinite="raise")
    params = natives(backend, p_np)
    state = init(opt, backend, params)
    params, state = opt.update(params, natives(backend, g_np), state)
    before = {k: host(v) for k, v in params.items()}
    slot = host(state.slots["momentum"])
    with pytest.raises(FloatingPointError, match=r"\['b'\]"):
        opt.update(params, _bad(g_np, backend), state)
    assert state.step == 1 and state.num_skipped == 0
    for k in before:  # the caller's params are still valid and unchanged
        np.testing.assert_array_equal(host(params[k]), before[k])
    np.testing.assert_array_equal(host(state.slots["momentum"]), slot)
    params, state = opt.update(params, natives(backend, g_np), state)
    assert state.step == 2


@pytest.mark.parametrize("backend", ALL)
def test_nonfinite_propagate_is_default_and_detected(backend):
    p_np, g_np = _small()
    opt = Adam(0.1)
    assert opt.nonfinite == "propagate"
    params = natives(backend, p_np)
    state = init(opt, backend, params)
    with warnings.catch_warnings():  # a finite step: no warning, norm measured in the same pass
        warnings.simplefilter("error")
        params, state = opt.update(params, natives(backend, g_np), state)
    norm = np.sqrt(sum(np.sum(np.square(v.astype(np.float64))) for v in g_np.values()))
    assert state.last_grad_norm == pytest.approx(norm, rel=1e-6)
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        params, state = opt.update(params, _bad(g_np, backend), state)
        state.settle()  # (jax-jit, torch-ops: read when asked, see test_nonfinite_step)
    assert not np.isfinite(state.last_grad_norm) and state.num_nonfinite == 1
    assert state.step == 2 and not state.last_step_skipped and state.num_skipped == 0
    b = host(params["b"])
    assert np.isnan(b[1]) and np.isfinite(b[[0, 2]]).all()
    assert np.isfinite(host(params["a"])).all()
    assert np.isnan(host(state.slot("v")["b"])[1])


@pytest.mark.parametrize("backend", ALL)
def test_returned_params_keep_the_callers_order(backend):
    """Names whose sorted order is not the caller's ("w10" before "w2"): the update returns
    them in the caller's order, so the next update knows its own arrays (``returned``: no
    check, no copy). jax.jit hands dicts back sorted; the jitted engine copied every
    parameter on every step until the order was restored (200 tensors: 7.6 -> 3.5 ms)."""
    rng = np.random.default_rng(0)
    p_np = {f"w{i}": rng.standard_normal(3).astype(np.float32) for i in (2, 10, 1)}
    g_np = {k: rng.standard_normal(3).astype(np.float32) for k in p_np}
    opt = Adam(0.1)
    params = natives(backend, p_np)
    state = init(opt, backend, params)
    for _ in range(2):
        params, state = opt.update(params, natives(backend, g_np), state)
        assert list(params) == ["w2", "w10", "w1"] and state.returned(params)


@pytest.mark.parametrize("backend", ALL)
def test_nonfinite_unchecked_applies_without_looking(backend):
    """``"unchecked"`` (torch.optim / optax): the same step as ``"propagate"``, no warning, no
    count; the accelerator engines (jitted JAX, torch's fused kernels) measure no norm
    unless ``clip_norm`` needs it, and then leave it on the device."""
    p_np, g_np = _small()
    runs = {}
    for policy in ("propagate", "unchecked"):
        opt = Adam(0.1, nonfinite=policy)
        params = natives(backend, p_np)
        state = init(opt, backend, params)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            params, state = opt.update(params, natives(backend, g_np), state)
        runs[policy] = {k: host(v) for k, v in params.items()}
    for k in p_np:
        np.testing.assert_array_equal(runs["unchecked"][k], runs["propagate"][k], err_msg=k)
    lazy = backend in ("jax-jit", "torch-ops")
    assert (state.last_grad_norm is None) if lazy else state.last_grad_norm > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        params, state = opt.update(params, _bad(g_np, backend), state)
    assert state.step == 2 and state.num_nonfinite == 0 and state.num_skipped == 0
    b = host(params["b"])
    assert np.isnan(b[1]) and np.isfinite(b[[0, 2]]).all()
    opt = Adam(0.1, nonfinite="unchecked", clip_norm=0.5)
    state = init(opt, backend, natives(backend, p_np))
    _, state = opt.update(natives(backend, p_np), natives(backend, g_np), state)
    norm = np.sqrt(sum(np.sum(np.square(v.astype(np.float64))) for v in g_np.values()))
    assert float(np.asarray(host(state.last_grad_norm))) == pytest.approx(norm, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# custom optimizers
# ---------------------------------------------------------------------------------------------


def _guide_custom_optimizer() -> type:
    """The guide's "Custom Optimizers" listing, verbatim (its text lives in the guide tests)."""
    from test_guide_optimizers import CUSTOM

    ns: dict = {}
    exec(CUSTOM, ns)
    return ns["CustomOptimizer"]


CustomOptimizer = _guide_custom_optimizer()


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
def test_guide_custom_optimizer(backend):
    p_np, g_np = _small()
    opt = CustomOptimizer(learning_rate=0.1, custom_param=0.5)
    params = natives(backend, p_np)
    state = opt.init(params)  # uses self.backend, inferred from params
    assert opt.backend.name == backend
    ref_p = {k: v.astype(np.float64) for k, v in p_np.items()}
    ref_m = {k: np.zeros_like(v) for k, v in ref_p.items()}
    for t in range(5):
        g = {k: v * (t + 1) for k, v in g_np.items()}
        if t == 3:
            del g["b"]
        params, state = opt.update(params, natives(backend, g), state)
        for k in g:
            ref_m[k] = 0.5 * ref_m[k] + g[k]
            ref_p[k] = ref_p[k] - 0.1 * ref_m[k]
    for k in p_np:
        assert type(params[k]) is type(native(backend, p_np[k]))
        assert rel_err(host(params[k]), ref_p[k]) <= 1e-5
        assert rel_err(host(state[k]["momentum"]), ref_m[k]) <= 1e-5


class AdaBelief(Optimizer):
    """A user optimizer stating only ``slots``/``scalars``/``math``: fused path for free."""

    slots = ("m", "s")

    def __init__(self, learning_rate=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, **kw):
        super().__init__(learning_rate, **kw)
        self.beta1, self.beta2, self.eps = beta1, beta2, eps

    def scalars(self, step):
        return (self.learning_rate, self.beta1, self.beta2, 1 - self.beta1**step,
                1 - self.beta2**step, self.eps)

    @staticmethod
    def math(p, g, m, s, lr, b1, b2, bc1, bc2, eps):
        m = b1 * m + (1 - b1) * g
        s = b2 * s + (1 - b2) * (g - m) * (g - m) + eps
        return p - lr * (m / bc1) / (sqrt(s / bc2) + eps), m, s


def _decayed_rule(p, g, acc, lr, rho):
    acc = rho * acc + g * g
    return p - lr * g / sqrt(acc), acc


class Decayed(Optimizer):
    """Another style: ``slot_names``/``slot_init``/``kernel_math`` methods. (``kernel_math``
    must return the same function object every time: kernels are cached by it.)"""

    def __init__(self, learning_rate=0.1, rho=0.5, **kw):
        super().__init__(learning_rate, **kw)
        self.rho = rho

    def slot_names(self):
        return ("acc",)

    def slot_init(self, slot):
        return 1.0

    def scalars(self, step):
        return (self.learning_rate, self.rho)

    def kernel_math(self):
        return _decayed_rule


def _adabelief_ref(p, grads, lr=0.01, b1=0.9, b2=0.99, eps=1e-8):
    m, s = {k: np.zeros_like(v) for k, v in p.items()}, {k: np.zeros_like(v) for k, v in p.items()}
    p = dict(p)
    for t, g in enumerate(grads, 1):
        for k in g:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            s[k] = b2 * s[k] + (1 - b2) * (g[k] - m[k]) ** 2 + eps
            p[k] = p[k] - lr * (m[k] / (1 - b1**t)) / (np.sqrt(s[k] / (1 - b2**t)) + eps)
    return p, m, s


def _has_kernel(math_fn, n_slots: int, n_scal: int, dtype: str, copy: bool = False) -> bool:
    """Whether the fused numba kernel for ``math_fn`` was generated already (a cache hit)."""
    from mithril.utils.optimizers.engines.kernels import update_kernel as fn

    hits = fn.cache_info().hits
    fn(math_fn, n_slots, n_scal, dtype, copy, False, False)
    return fn.cache_info().hits == hits + 1


@pytest.mark.parametrize("backend", ALL)
def test_user_subclass_gets_fused_path(backend):
    dtype = "float32" if backend.startswith("jax") else "float64"
    tol = 1e-4 if dtype == "float32" else 1e-12  # float32 vs a float64 reference
    p0, grads = problem(dtype, 20)
    opt = AdaBelief(0.01, beta2=0.99)
    params = natives(backend, p0)
    state = init(opt, backend, params)
    assert isinstance(state, OptimizerState) and set(state.slots) == {"m", "s"}
    for g in grads:
        params, state = opt.update(params, natives(backend, g), state)
    # the fused kernel was generated from AdaBelief.math (the jitted JAX engine and torch's
    # fused-ops engine run the math as array ops: whether the kernel exists there depends
    # on which tests ran before in the process)
    if backend not in ("jax-jit", "torch-ops"):
        assert _has_kernel(AdaBelief.math, 2, 6, dtype, backend == "jax")
    ref_p, ref_m, ref_s = _adabelief_ref({k: v.astype(np.float64) for k, v in p0.items()},
                                         [{k: v.astype(np.float64) for k, v in g.items()}
                                          for g in grads])
    for k in SHAPES:
        assert rel_err(host(params[k]), ref_p[k]) <= tol, k
        assert rel_err(host(state.slot("m")[k]), ref_m[k]) <= tol * 10, k
        assert rel_err(host(state.slot("s")[k]), ref_s[k]) <= tol, k

    opt2 = Decayed(0.1, rho=0.5)
    p_np, g_np = _small(dtype)
    params = natives(backend, p_np)
    state = init(opt2, backend, params)
    np.testing.assert_array_equal(host(state.slots["acc"]), 1.0)
    params, state = opt2.update(params, natives(backend, g_np), state)
    for k in p_np:
        acc = 0.5 + g_np[k].astype(np.float64) ** 2
        exp = p_np[k] - 0.1 * g_np[k] / np.sqrt(acc)
        assert rel_err(host(params[k]), exp) <= tol
        assert rel_err(host(state.slot("acc")[k]), acc) <= tol


# ---------------------------------------------------------------------------------------------
# misc API
# ---------------------------------------------------------------------------------------------


def test_learning_rate_accessors_and_repr():
    for opt in (SGD(0.1, momentum=0.9), Adam(), AdamW(), RMSProp(), AdaGrad()):
        lr = opt.get_learning_rate()
        opt.set_learning_rate(lr * 2)
        assert opt.get_learning_rate() == lr * 2
        assert type(opt).__name__ in repr(opt)
        json.dumps(opt.hyperparameters())
    assert AdamW().weight_decay == 1e-2 and RMSProp().decay == 0.9 and AdaGrad().epsilon == 1e-8


def test_zz_report_observed_errors(capsys):
    """Not a check: prints the max errors seen by this worker (``pytest -s``)."""
    if OBSERVED:
        with capsys.disabled():
            worst = sorted(OBSERVED.items(), key=lambda kv: -kv[1])[:8]
            print("\nlargest observed parity errors:", {k: f"{v:.2e}" for k, v in worst})
