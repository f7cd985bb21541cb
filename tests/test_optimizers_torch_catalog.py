"""Adamax, NAdam, RAdam, Adadelta, Rprop and ASGD side by side with ``torch.optim``.

Each case runs the mithril optimizer and its torch.optim counterpart in lock-step from the
same start on the same gradients (:func:`optimizer_parity.problem`: a 3x4 matrix, a vector, a
0-d scalar and a 130x130 matrix, 100 steps), with the learning rate changed three times
mid-run (``set_learning_rate`` on ours, ``param_groups[0]["lr"]`` on torch, before the same
step), and compares the parameters after every step and the state slots at the end in the
measure :func:`optimizer_parity.rel_err` (float64: <= 1e-10). Every case runs on NumPy,
torch, JAX through the fused numba engine and JAX through the jitted engine (float64 with
x64 switched on for the block only), once more with a constant learning rate on NumPy, and
on the tensor-op :class:`ArrayEngine` (torch on GPU, float16/bfloat16) forced on CPU.

The torch reference runs with ``torch.set_default_dtype(torch.float64)``: NAdam's
``mu_product`` and ASGD's ``eta``/``mu`` are torch tensors of the default dtype, i.e. rounded
to float32 every step under torch's default; mithril computes them in float64 (the size of
that difference is checked by :func:`test_torch_default_dtype_rounds_scalar_state`).

Also: float32 runs agree across backends (NumPy, torch and JAX-on-CPU run the same fused
kernel: identical bits), a state dict taken mid-run resumes bit-exactly, the new elementwise
functions keep float32 kernels float32, and bad hyperparameters are refused with errors
naming the argument.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from optimizer_parity import (
    ALL,
    LR_FACTORS,
    SHAPES,
    STEPS,
    TOL64,
    array_engine,  # noqa: F401  (a fixture)
    host,
    init,
    lock_step,
    natives,
    on,
    problem,
)

from mithril.utils.optimizers.adadelta import Adadelta
from mithril.utils.optimizers.adamax import Adamax
from mithril.utils.optimizers.asgd import ASGD
from mithril.utils.optimizers.elementwise import abs_, minimum, sign, where
from mithril.utils.optimizers.nadam import NAdam
from mithril.utils.optimizers.radam import RAdam
from mithril.utils.optimizers.rprop import Rprop

CLASSES = {c.__name__: c for c in (Adamax, NAdam, RAdam, Adadelta, Rprop, ASGD)}

# name -> (mithril class, kwargs, torch.optim kwargs); torch's class has the same name. A
# "torch_wd" entry in the torch kwargs is fed to torch as g + wd*p (Rprop has no weight decay).
CASES: dict[str, tuple[str, dict, dict]] = {
    "adamax": ("Adamax", {"learning_rate": 0.01}, {"lr": 0.01}),
    "adamax_wd": ("Adamax", {"lr": 0.01, "beta1": 0.8, "beta2": 0.99, "eps": 1e-6,
                             "weight_decay": 0.1},
                  {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1}),
    "nadam": ("NAdam", {"learning_rate": 0.01}, {"lr": 0.01}),
    "nadam_wd": ("NAdam", {"learning_rate": 0.01, "beta2": 0.99, "momentum_decay": 0.02,
                           "weight_decay": 0.1},
                 {"lr": 0.01, "betas": (0.9, 0.99), "momentum_decay": 0.02, "weight_decay": 0.1}),
    "nadam_decoupled": ("NAdam", {"learning_rate": 0.01, "weight_decay": 0.1,
                                  "decoupled_weight_decay": True},
                        {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}),
    # beta2 = 0.999: rho_t > 5 from step 6 on, both branches run
    "radam": ("RAdam", {"learning_rate": 0.01}, {"lr": 0.01}),
    "radam_wd": ("RAdam", {"learning_rate": 0.01, "beta1": 0.8, "beta2": 0.99, "epsilon": 1e-6,
                           "weight_decay": 0.1},
                 {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1}),
    "radam_decoupled": ("RAdam", {"learning_rate": 0.01, "weight_decay": 0.1,
                                  "decoupled_weight_decay": True},
                        {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}),
    "adadelta": ("Adadelta", {}, {}),  # lr 1.0
    "adadelta_wd": ("Adadelta", {"learning_rate": 0.5, "rho": 0.95, "epsilon": 1e-5,
                                 "weight_decay": 0.1},
                    {"lr": 0.5, "rho": 0.95, "eps": 1e-5, "weight_decay": 0.1}),
    "rprop": ("Rprop", {"learning_rate": 0.01}, {"lr": 0.01}),
    # a small step_max: the clamp from above runs too
    "rprop_wd": ("Rprop", {"learning_rate": 0.01, "etas": (0.3, 1.5), "step_sizes": (1e-4, 0.05),
                           "weight_decay": 0.1},
                 {"lr": 0.01, "etas": (0.3, 1.5), "step_sizes": (1e-4, 0.05), "torch_wd": 0.1}),
    # t0 = 40: the averaging starts within the run
    "asgd": ("ASGD", {"learning_rate": 0.01, "lambd": 0.01, "t0": 40},
             {"lr": 0.01, "lambd": 0.01, "t0": 40}),
    "asgd_wd": ("ASGD", {"learning_rate": 0.02, "lambd": 1e-3, "alpha": 0.6, "t0": 10,
                         "weight_decay": 0.1},
                {"lr": 0.02, "lambd": 1e-3, "alpha": 0.6, "t0": 10, "weight_decay": 0.1}),
}

# mithril slot -> torch.optim state key
TORCH_SLOTS = {
    "Adamax": {"m": "exp_avg", "u": "exp_inf"},
    "NAdam": {"m": "exp_avg", "v": "exp_avg_sq", "mu_product": "mu_product"},
    "RAdam": {"m": "exp_avg", "v": "exp_avg_sq"},
    "Adadelta": {"square_avg": "square_avg", "acc_delta": "acc_delta"},
    "Rprop": {"prev": "prev", "step_size": "step_size"},
    "ASGD": {"ax": "ax", "eta": "eta", "mu": "mu"},
}

#: the largest error of each check (printed after the run: conftest.py)
OBSERVED: dict[str, float] = {}


@contextlib.contextmanager
def torch_default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def make_opt(case: str):
    cls, kw, _ = CASES[case]
    return CLASSES[cls](**kw)


def side_by_side(case: str, backend: str = "numpy", dtype: str = "float64", steps: int = STEPS,
                 lr_factors: dict | None = LR_FACTORS, torch_dtype: torch.dtype | None = None
                 ) -> dict:
    """Run ``case`` on ``backend`` and torch.optim in lock-step (see the module docstring).
    Returns the max relative errors of params (every step) and slots (end), and the final
    params. ``torch_dtype``: torch's default dtype for its run (float64 unless given)."""
    tdt = torch_dtype or (torch.float64 if dtype == "float64" else torch.float32)
    with on(backend, dtype), torch_default_dtype(tdt):
        return _side_by_side(case, backend, dtype, steps, lr_factors)


def _side_by_side(case, backend, dtype, steps, lr_factors):
    cls, _, tkw = CASES[case]
    tkw = dict(tkw)
    torch_wd = tkw.pop("torch_wd", 0.0)
    return lock_step(make_opt(case), backend, dtype, steps, cls, tkw, TORCH_SLOTS[cls],
                     lr_factors=lr_factors, torch_wd=torch_wd, every_slot=True)


def _check(label: str, r: dict, tol: float = TOL64) -> None:
    case = label.split("/")[0]
    OBSERVED[case] = max(OBSERVED.get(case, 0.0), r["params"], r["slots"])
    assert r["params"] <= tol, f"{label}: params rel err {r['params']:.3g}"
    assert r["slots"] <= tol, f"{label}: slots rel err {r['slots']:.3g}"


# ---------------------------------------------------------------------------------------------
# float64 parity with torch.optim
# ---------------------------------------------------------------------------------------------


#: the default suite's cases: every optimizer with its options (weight decay coupled and
#: decoupled, betas, Rprop's clamp, ASGD's averaging from t0 = 10) reach every branch of its
#: kernel; the defaults-only cases (each a numba compile) run under ``-m slow``
QUICK = ("adamax_wd", "nadam_wd", "nadam_decoupled", "radam_wd", "radam_decoupled",
         "adadelta_wd", "rprop_wd", "asgd_wd")


@pytest.mark.parametrize("case", [c if c in QUICK else pytest.param(c, marks=pytest.mark.slow)
                                  for c in CASES])
def test_parity_float64(case):
    """100 steps vs torch.optim with lr changes on every backend, and with a constant lr on
    NumPy (one test per case: each kernel compiles once)."""
    for backend in ALL:
        r = side_by_side(case, backend)
        assert r["dtype"] == "float64" and r["step"] == STEPS, backend
        _check(f"{case}/{backend}", r)
    _check(f"{case}/constant-lr", side_by_side(case, "numpy", lr_factors=None))


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_array_engine_parity_float64(array_engine, backend):  # noqa: F811
    """The tensor-op engine (torch on GPU, float16/bfloat16): the same math with per-step
    scalars as Python floats (RAdam's branch is then a plain bool). NumPy takes it for
    float16 only: the cases using where/minimum/sign."""
    for case in CASES if backend == "torch" else ("radam", "rprop_wd"):
        _check(f"{case}/array/{backend}", side_by_side(case, backend))


@pytest.mark.parametrize("make", [lambda a: a.astype(np.float16),
                                  lambda a: torch.tensor(a, dtype=torch.float16),
                                  lambda a: torch.tensor(a, dtype=torch.bfloat16)],
                         ids=["numpy-float16", "torch-float16", "torch-bfloat16"])
def test_half_precision_keeps_dtype(make):
    """float16/bfloat16 (the tensor-op engine): Python-float scalars and literals in where()
    do not widen params or slots; 10 steps stay finite."""
    rng = np.random.default_rng(5)
    for cls in CLASSES.values():
        opt = cls(epsilon=1e-4) if "epsilon" in cls().hyperparameters() else cls()
        p = {"w": make(rng.standard_normal((3, 4))), "s": make(np.array(0.5))}
        state = opt.init(p)
        for _ in range(10):
            p, state = opt.update(p, {k: make(rng.standard_normal(v.shape)) for k, v in p.items()},
                                  state)
        for x in (*p.values(), *state.slots.values()):
            assert x.dtype == p["s"].dtype, (cls.__name__, x.dtype)
        w = p["w"].float().numpy() if isinstance(p["w"], torch.Tensor) else p["w"]
        assert np.isfinite(w).all(), cls.__name__


def test_torch_default_dtype_rounds_scalar_state():
    """Under torch's default dtype (float32), NAdam's mu_product and ASGD's eta/mu are
    rounded to float32 each step (NAdam ~1e-7, ASGD ~1e-5 in this measure: ASGD's
    error compounds through the average); none for the others."""
    for case in ("nadam", "asgd_wd"):
        r = side_by_side(case, torch_dtype=torch.float32)
        assert 1e-12 < r["params"] <= 1e-3, (case, r["params"])
    assert side_by_side("radam", torch_dtype=torch.float32)["params"] <= TOL64


# ---------------------------------------------------------------------------------------------
# float32: the backends agree with each other
# ---------------------------------------------------------------------------------------------


# where/sign/minimum with literals (Rprop), a branch on a per-step scalar (RAdam); abs_ is
# checked in float32 by test_elementwise_keep_float32_in_numba_kernels
@pytest.mark.parametrize("case", ["rprop", "radam_decoupled"])
def test_float32_backends_agree(case):
    runs = {b: side_by_side(case, b, dtype="float32") for b in ALL}
    for b, r in runs.items():
        assert r["dtype"] == "float32", b
        assert r["params"] <= 1e-3, (b, r["params"])  # close to torch.optim in float32
    for k in SHAPES:
        for a, b in (("numpy", "jax-jit"), ("torch", "jax-jit")):
            x, y = runs[a]["final"][k], runs[b]["final"][k]
            assert float(np.max(np.abs(x - y)) / np.max(np.abs(y))) <= 1e-5, (case, a, b, k)
        # NumPy, torch and JAX on CPU run the same fused kernel: identical bits
        np.testing.assert_array_equal(runs["numpy"]["final"][k], runs["torch"]["final"][k])
        np.testing.assert_array_equal(runs["numpy"]["final"][k], runs["jax"]["final"][k])
    if case == "rprop":  # only exact operations (products by etas, clamps, signs)
        for b in ALL:
            assert runs[b]["params"] == 0.0, b


def test_elementwise_keep_float32_in_numba_kernels():
    """where/minimum/sign/abs_ with a float64 literal or an int keep a float32 kernel float32
    (as maximum does), and return the input's type outside numba."""
    import numba
    from numba import types

    @numba.njit
    def f(x):
        return (where(x > 0, x, 0.0), where(x < 0, 1, x), minimum(x, 0.5), sign(x), abs_(x))

    out = f(np.float32(-1.5))
    assert out == (0.0, 1.0, -1.5, -1.0, 1.5)
    assert all(t == types.float32 for t in f.nopython_signatures[0].return_type.types)
    assert f(np.float64(2.0)) == (2.0, 2.0, 0.5, 1.0, 2.0)
    assert np.isnan(f(np.float32(np.nan))[3]) and f(np.float32(0.0))[3] == 0.0

    import jax.numpy as jnp

    x = np.array([-2.0, 0.0, 3.0], np.float32)
    for a in (x, torch.tensor(x), jnp.asarray(x)):
        for r, want in ((where(a > 0, a, 0.0), [0, 0, 3]), (minimum(a, 1.0), [-2, 0, 1]),
                        (sign(a), [-1, 0, 1]), (abs_(a), [2, 0, 3]),
                        (where(True, a, a * 0), x), (where(np.False_, a, a * 0), [0, 0, 0])):
            assert type(r) is type(a) and str(r.dtype).endswith("float32"), (type(a), r)
            np.testing.assert_array_equal(host(r), np.asarray(want, np.float32))
    assert sign(-3.0) == -1.0 and abs_(-2.0) == 2.0 and minimum(1.0, 2.0) == 1.0
    assert where(1.0 > 0, 1.0, 2.0) == 1.0


# ---------------------------------------------------------------------------------------------
# resuming, per-step scalars, hyperparameters
# ---------------------------------------------------------------------------------------------

RESUME_CASES = ["adamax_wd", "nadam_wd", "nadam_decoupled", "radam_wd", "adadelta_wd",
                "rprop_wd", "asgd_wd"]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_state_dict_round_trip_resumes_bit_exactly(backend):
    """K steps, state_dict, a fresh optimizer (wrong lr, restored by the load) loads it into
    fresh params and takes N more steps: params and every slot equal the uninterrupted run
    exactly (NAdam's mu product and RAdam's rho_t come from the restored step)."""
    k_steps, n_steps = 8, 6  # K > t0 + 2 of asgd_wd: the averaging runs across the save
    p0, grads = problem("float64", k_steps + n_steps)
    with on(backend, "float64"):
        for case in RESUME_CASES:
            opt = make_opt(case)
            opt.set_learning_rate(opt.get_learning_rate() * 0.5)
            params = natives(backend, p0)
            state = init(opt, backend, params)
            for t in range(k_steps):
                params, state = opt.update(params, natives(backend, grads[t]), state)
            saved = opt.state_dict(state)
            saved_params = {k: host(v) for k, v in params.items()}
            for t in range(k_steps, k_steps + n_steps):
                params, state = opt.update(params, natives(backend, grads[t]), state)

            fresh = make_opt(case)
            fresh.set_learning_rate(123.0)
            params2 = natives(backend, saved_params)
            state2 = fresh.load_state_dict(saved, params2)
            assert state2.step == k_steps and fresh.get_learning_rate() == opt.get_learning_rate()
            for t in range(k_steps, k_steps + n_steps):
                params2, state2 = fresh.update(params2, natives(backend, grads[t]), state2)
            for k in SHAPES:
                np.testing.assert_array_equal(host(params2[k]), host(params[k]), err_msg=case)
            for s in state.slots:
                for k, v in state.slot(s).items():
                    np.testing.assert_array_equal(host(state2.slot(s)[k]), host(v),
                                                  err_msg=f"{case}/{s}/{k}")


def test_per_step_scalars_depend_on_the_step_only():
    """NAdam's mu product is torch's running product, per tensor: each step multiplies in
    that step's mu, so a beta1 changed mid-run (or a group's own) is followed as torch does
    and a resumed state continues from the stored product; ASGD's eta uses the lr of the
    previous step, as torch, kept per tensor (torch's eta and mu state)."""
    params = {"w": np.ones(3), "b": np.ones(2)}
    opt = NAdam(momentum_decay=0.01, param_groups=[{"params": ["b"], "beta1": 0.5}])
    state = opt.init(params)
    prod = {"w": 1.0, "b": 1.0}  # torch: mu_product *= mu, from 1
    for t in range(1, 60):
        if t == 30:
            opt.beta1 = 0.8
        params, state = opt.update(params, {k: np.full_like(v, 0.1) for k, v in params.items()},
                                   state)
        for k, b1 in (("w", opt.beta1), ("b", 0.5)):
            prod[k] *= b1 * (1.0 - 0.5 * (0.96 ** (t * 0.01)))
    got = state.slot("mu_product")
    assert float(got["w"]) == prod["w"] and float(got["b"]) == prod["b"]
    assert NAdam(convention="optax").tensor_slots == ()  # no schedule, so no product

    opt = ASGD(learning_rate=0.1, lambd=0.5, alpha=1.0, t0=2)

    def between(step, tensors, lr):  # the per-tensor scalars of one tensor at ``step``
        return opt.tensor_scalars(step, (), tuple(np.array([x]) for x in (lr, 0.5, 1.0, 2.0)),
                                  tensors, {}, np.array([3]))

    (decay, eta, mu, mu_c), kept, _ = between(1, {"eta": np.zeros(1), "mu": np.zeros(1)}, 0.1)
    assert eta == 0.1 and mu == 1.0 and mu_c == 0.0  # eta_1 = lr, mu_1 = 1 (torch's init)
    assert kept["eta"] == 0.1 / (1 + 0.5 * 0.1 * 1) and kept["mu"] == 1.0
    (decay, eta, mu, _), kept, _ = between(2, kept, 0.2)  # a new lr is used one step late
    assert eta == 0.1 / (1 + 0.5 * 0.1 * 1) and decay == 1 - 0.5 * eta
    assert kept["eta"] == 0.2 / (1 + 0.5 * 0.2 * 2)
    assert between(4, kept, 0.2)[1]["mu"] == 1 / 2 and between(3, kept, 0.2)[1]["mu"] == 1.0


def test_rprop_and_asgd_specifics():
    """Rprop: lr is only the initial step size (torch); step_size is -1 until an element's
    first step. ASGD: averaged_params is the ax slot."""
    p = {"a": np.array([1.0, 2.0, 3.0])}
    opt = Rprop(learning_rate=0.1, etas=(0.5, 2.0), step_sizes=(0.01, 1.0))
    state = opt.init(p)
    np.testing.assert_array_equal(state.slot("step_size")["a"], -1.0)
    g = np.array([1.0, -1.0, 0.0])
    p, state = opt.update(p, {"a": g}, state)
    np.testing.assert_array_equal(p["a"], [0.9, 2.1, 3.0])
    opt.set_learning_rate(100.0)  # no effect from here on
    p, state = opt.update(p, {"a": np.array([1.0, 1.0, 0.0])}, state)
    np.testing.assert_allclose(p["a"], [0.7, 2.1, 3.0], rtol=1e-15)  # grow; flip: no move
    np.testing.assert_array_equal(state.slot("step_size")["a"], [0.2, 0.05, 0.1])
    np.testing.assert_array_equal(state.slot("prev")["a"], [1.0, 0.0, 0.0])

    opt = ASGD(learning_rate=0.1, t0=0)
    q = {"a": np.array([1.0, -1.0]), "s": np.array(2.0)}
    state = opt.init(q)
    q, state = opt.update(q, {"a": np.array([1.0, 1.0]), "s": np.array(0.5)}, state)
    avg = opt.averaged_params(state)
    assert set(avg) == {"a", "s"} and avg["s"].shape == ()
    np.testing.assert_array_equal(avg["a"], q["a"])  # mu_1 = 1: ax = p


@pytest.mark.parametrize("cls, kwargs, exc, name", [
    (Adamax, {"learning_rate": -0.1}, ValueError, "learning_rate"),
    (Adamax, {"beta1": 1.0}, ValueError, "beta1"),
    (Adamax, {"weight_decay": 10**400}, ValueError, "weight_decay"),
    (NAdam, {"lr": -1.0}, ValueError, "learning_rate"),
    (NAdam, {"beta2": 1.5}, ValueError, "beta2"),
    (NAdam, {"momentum_decay": -1e-3}, ValueError, "momentum_decay"),
    (NAdam, {"decoupled_weight_decay": "yes"}, TypeError, "decoupled_weight_decay"),
    (RAdam, {"beta1": -0.1}, ValueError, "beta1"),
    (RAdam, {"epsilon": 0.0}, ValueError, "epsilon"),
    (RAdam, {"learning_rate": 10**400}, ValueError, "learning_rate"),
    (Adadelta, {"rho": 1.5}, ValueError, "rho"),
    (Adadelta, {"lr": float("nan")}, ValueError, "learning_rate"),
    (Adadelta, {"eps": "1e-6"}, TypeError, "epsilon"),
    (Rprop, {"etas": (1.2, 0.5)}, ValueError, "etas"),
    (Rprop, {"etas": (0.5, 1.0)}, ValueError, "etas"),
    (Rprop, {"etas": 0.5}, TypeError, "etas"),
    (Rprop, {"etas": (0.5, 10**400)}, ValueError, "etas"),
    (Rprop, {"step_sizes": (50.0, 1e-6)}, ValueError, "step_sizes"),
    (Rprop, {"step_sizes": (-1e-6, 50.0)}, ValueError, "step_sizes"),
    (Rprop, {"step_sizes": (1e-6, 50.0, 60.0)}, TypeError, "step_sizes"),
    (ASGD, {"lambd": -1e-4}, ValueError, "lambd"),
    (ASGD, {"alpha": float("inf")}, ValueError, "alpha"),
    (ASGD, {"t0": 10**400}, ValueError, "t0"),
    (ASGD, {"weight_decay": -0.1}, ValueError, "weight_decay"),
])
def test_bad_hyperparameters_name_the_argument(cls, kwargs, exc, name):
    with pytest.raises(exc, match=name):
        cls(**kwargs)


def test_defaults_are_torchs_and_hyperparameters_round_trip():
    for cls, tcls, pairs in (
            (Adamax, torch.optim.Adamax, {"learning_rate": "lr", "epsilon": "eps"}),
            (NAdam, torch.optim.NAdam, {"learning_rate": "lr", "epsilon": "eps",
                                        "momentum_decay": "momentum_decay",
                                        "decoupled_weight_decay": "decoupled_weight_decay"}),
            (RAdam, torch.optim.RAdam, {"learning_rate": "lr", "epsilon": "eps",
                                        "decoupled_weight_decay": "decoupled_weight_decay"}),
            (Adadelta, torch.optim.Adadelta, {"learning_rate": "lr", "epsilon": "eps",
                                              "rho": "rho"}),
            (Rprop, torch.optim.Rprop, {"learning_rate": "lr", "etas": "etas",
                                        "step_sizes": "step_sizes"}),
            (ASGD, torch.optim.ASGD, {"learning_rate": "lr", "lambd": "lambd", "alpha": "alpha",
                                      "t0": "t0"})):
        ours, theirs = cls(), tcls([torch.zeros(1)]).defaults
        for mine, t in pairs.items():
            assert getattr(ours, mine) == (tuple(theirs[t]) if t in ("etas", "step_sizes")
                                           else theirs[t]), (cls.__name__, mine)
        if "betas" in theirs:
            assert (ours.beta1, ours.beta2) == tuple(theirs["betas"])
        assert ours.weight_decay == theirs.get("weight_decay", 0.0)
        hp = ours.hyperparameters()
        assert all(not k.startswith("_") for k in hp)
        again = cls()
        again.load_state_dict(ours.state_dict())
        assert again.hyperparameters() == hp and cls.__name__ in repr(ours)
    assert NAdam(decoupled_weight_decay=True).decoupled_weight_decay is True
    assert NAdam().decoupled_weight_decay is False and RAdam().decoupled_weight_decay is False
