"""The side-by-side harness of the optimizer parity tests (``test_optimizers.py`` and the
catalog, resume, scheduler-group and weight-averaging tests that import it).

:func:`side_by_side` runs a mithril optimizer case of :data:`CASES` and its torch.optim
counterpart in the same loop, from the same start (:func:`problem`), on the same gradient
sequence, and measures the parameters after every step and the state slots at the end.

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
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import numpy as np
import pytest
import torch
from conftest import host, jax_float64, native  # noqa: F401 (jax_float64: re-exported)

import mithril.utils.optimizers as mo
import mithril.utils.optimizers.engines as engines
from mithril.utils.optimizers import (
    Optimizer,
    OptimizerState,
)

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
#: the largest error of each check (the terminal summary prints the worst: conftest.py)
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


def small_problem(dtype="float32"):
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


def natives(backend: str, d: dict) -> dict:
    return {k: native(backend, v) for k, v in d.items()}


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
    opt = make_opt(case, **extra)
    return lock_step(opt, backend, dtype, steps, tcls, tkw, TORCH_SLOTS[type(opt).__name__],
                     lr_factors=lr_factors, drop=drop, torch_clip=torch_clip)


def lock_step(opt: Optimizer, backend: str, dtype: str, steps: int, torch_cls: str,
              torch_kw: dict, slot_names: dict[str, str], lr_factors: dict | None = None,
              drop=None, torch_clip: dict | None = None, torch_wd: float = 0.0,
              every_slot: bool = False) -> dict:
    """``opt`` on ``backend`` and ``torch.optim.<torch_cls>(**torch_kw)`` in lock-step on
    :func:`problem` (the harness of :func:`side_by_side` and of the catalog's tests).

    ``torch_wd``: torch's gradients get ``+ torch_wd * p`` (a coupled weight decay the torch
    class lacks); ``slot_names``: our slot -> torch's state key, every one of them required
    with ``every_slot``. The other arguments as :func:`side_by_side`'s."""
    p0, grads = problem(dtype, steps)
    params = natives(backend, p0)
    state = init(opt, backend, params)
    tparams = {k: torch.tensor(v, requires_grad=True) for k, v in p0.items()}
    topt = getattr(torch.optim, torch_cls)(list(tparams.values()), **torch_kw)
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
            if torch_wd and p.grad is not None:
                p.grad = p.grad.add(p.detach(), alpha=torch_wd)
        if torch_clip:
            with_grad = [p for p in tparams.values() if p.grad is not None]
            if "norm" in torch_clip:
                torch.nn.utils.clip_grad_norm_(with_grad, torch_clip["norm"])
            if "value" in torch_clip:
                torch.nn.utils.clip_grad_value_(with_grad, torch_clip["value"])
        topt.step()
        perr = max(perr, *(rel_err(host(params[k]), tparams[k].detach().numpy()) for k in SHAPES))
    serr = 0.0
    assert (set(state.slots) == set(slot_names) if every_slot
            else set(state.slots) <= set(slot_names)), state.slots
    for slot in state.slots:
        mine = state.slot(slot)
        for k, p in tparams.items():
            if p in topt.state:  # else torch never saw a gradient for p
                serr = max(serr, rel_err(host(mine[k]), topt.state[p][slot_names[slot]].numpy()))
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


def check(label: str, r: dict, tol: float = TOL64) -> None:
    OBSERVED[label] = max(r["params"], r["slots"])
    assert r["params"] <= tol, f"{label}: params rel err {r['params']:.3g}"
    assert r["slots"] <= tol, f"{label}: slots rel err {r['slots']:.3g}"



# ---------------------------------------------------------------------------------------------
# the tensor-op engine (torch on GPU, float16/bfloat16), forced on CPU in float64
# ---------------------------------------------------------------------------------------------

ARRAY_BACKENDS = ("numpy", "torch")


@pytest.fixture
def array_engine(monkeypatch):
    """Every ``init`` gets an :class:`ArrayEngine` (for the duration of the test)."""
    from mithril.utils.optimizers.engines.array_engine import ArrayEngine

    monkeypatch.setattr(engines, "engine_for", lambda backend, layout, *_: ArrayEngine(backend, layout))
    for backend in ARRAY_BACKENDS:
        monkeypatch.setitem(EXPECTED_ENGINE, backend, "ArrayEngine")



def check_torch_optimizer_resume(make: Callable[[], Optimizer], p0: dict, grads: list[dict],
                                 at: int) -> None:
    """``torch_optimizer(make())`` stepped through ``grads`` equals, to the bit, one stopped
    after ``at`` steps whose own state dict (``torch.save`` / ``torch.load(weights_only=True)``)
    is loaded into a new wrapper that takes the rest."""
    import io

    from mithril.interop import torch_optimizer

    def fresh():
        tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in p0.items()}
        return tp, torch_optimizer(make(), list(tp.items()))

    def steps(tp, topt, gs):
        for g in gs:
            for k, p in tp.items():
                p.grad = torch.tensor(g[k])
            topt.step()

    tp, topt = fresh()
    steps(tp, topt, grads)
    want = {k: v.detach().numpy().copy() for k, v in tp.items()}
    tp, topt = fresh()
    steps(tp, topt, grads[:at])
    buf = io.BytesIO()
    torch.save(topt.state_dict(), buf)
    tp2, topt2 = fresh()
    with torch.no_grad():
        for k in tp2:
            tp2[k].copy_(tp[k])
    topt2.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    steps(tp2, topt2, grads[at:])
    for k, v in tp2.items():
        np.testing.assert_array_equal(v.detach().numpy(), want[k], err_msg=k)


def optax_trajectory(tx, p0: dict, grads: list[dict]) -> list[dict]:
    """The params after each of ``grads`` under the optax transformation ``tx`` (one jitted
    step; each gradient in its parameter's dtype), as NumPy arrays."""
    import jax
    import jax.numpy as jnp
    import optax

    @jax.jit
    def step(p, g, s):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    p = {k: jnp.asarray(v) for k, v in p0.items()}
    s, out = tx.init(p), []
    for g in grads:
        p, s = step(p, {k: jnp.asarray(g[k], p[k].dtype) for k in p}, s)
        out.append({k: np.array(v) for k, v in p.items()})
    return out
