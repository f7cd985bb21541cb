"""SignSGD / Signum, OptimisticGD, OptimisticAdam, Adamax(decoupled_weight_decay=True),
SimplifiedAdEMAMix and COCOB against optax 0.2.8 (sign_sgd, signum,
optimistic_gradient_descent, optimistic_adam_v2, adamaxw, contrib.simplified_ademamix,
contrib.cocob).

float64 parity: every case runs 100 steps side by side with optax (jitted), from the same
start and gradient sequence on four tensors (a matrix, a vector, a scalar and a 3-D one),
with optax given a learning-rate *schedule* (``optax.piecewise_constant_schedule``: ×0.5 at
step 40, ×2 of the start from step 70) and ours the same one (``lr_schedulers.
PiecewiseConstant``), on the NumPy, torch and JAX backends (the fused numba kernel; and
JAX's jitted engine),
and through ``optax_transformation(opt, learning_rate=schedule, scalars="traced")`` inside
``jax.jit``. Parameters are compared after every step, ``<= 1e-10`` in the measure of
:func:`rel_err` (as tests/test_optimizers_optax_catalog.py). JAX float64 needs the
process-global ``jax_enable_x64``: it all runs in ONE fresh subprocess (cached).

In-process (float32): the backends agree (the flat tensor-op engine too), ``torch_optimizer`` drives a torch model exactly
as the optimizer's own update does, a state_dict round trip mid-run resumes bit-exactly,
bad hyperparameters raise naming the argument.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json

import numpy as np
import pytest
from conftest import host, native, optimizer_engine, run_python
from float64_reference import reference_code
from test_optimizers_optax_catalog import problem

from mithril.utils.optimizers import (
    COCOB,
    Adamax,
    DoG,
    DoWG,
    Fromage,
    OptimisticAdam,
    OptimisticGD,
    SignSGD,
    Signum,
    SimplifiedAdEMAMix,
)

STEPS = 100
TOL64 = 1e-10
SHAPES = {"w": (3, 4), "b": (4,), "s": (), "cube": (2, 3, 5)}
DECAYED = ["w", "s", "cube"]  # a weight-decay mask: not "b" (optax: a dict of bools)
MASK = "{'w': True, 'b': False, 's': True, 'cube': True}"

# name -> (class, kwargs, optax factory of the learning-rate schedule). Coupled weight decay
# (optimizers without their own in optax) is add_decayed_weights in front.
CASES: dict[str, tuple[str, dict, str]] = {
    "sign_sgd": ("SignSGD", {"learning_rate": 0.01}, "lambda lr: optax.sign_sgd(lr)"),
    "sign_sgd_wd": ("SignSGD", {"learning_rate": 0.01, "weight_decay": 0.1},
                    "lambda lr: optax.chain(optax.add_decayed_weights(0.1), optax.sign_sgd(lr))"),
    "signum": ("Signum", {"learning_rate": 0.01}, "lambda lr: optax.signum(lr)"),
    "signum_wd": ("SignSGD", {"learning_rate": 0.01, "momentum": 0.8, "weight_decay": 0.1},
                  "lambda lr: optax.chain(optax.add_decayed_weights(0.1), optax.signum(lr, 0.8))"),
    "ogd": ("OptimisticGD", {"learning_rate": 0.01},
            "lambda lr: optax.optimistic_gradient_descent(lr)"),
    "ogd_wd": ("OptimisticGD", {"learning_rate": 0.01, "alpha": 0.5, "beta": 0.3,
                                "weight_decay": 0.1},
               "lambda lr: optax.chain(optax.add_decayed_weights(0.1), "
               "optax.optimistic_gradient_descent(lr, 0.5, 0.3))"),
    "oadam": ("OptimisticAdam", {"learning_rate": 0.01},
              "lambda lr: optax.optimistic_adam_v2(lr)"),
    "oadam_wd": ("OptimisticAdam", {"learning_rate": 0.01, "alpha": 0.7, "beta": 0.4,
                                    "beta1": 0.8, "beta2": 0.99, "epsilon": 1e-6,
                                    "eps_root": 1e-10, "nesterov": False, "weight_decay": 0.1},
                 "lambda lr: optax.chain(optax.add_decayed_weights(0.1), optax.optimistic_adam_v2("
                 "lr, alpha=0.7, beta=0.4, b1=0.8, b2=0.99, eps=1e-6, eps_root=1e-10, "
                 "nesterov=False))"),
    "adamaxw": ("Adamax", {"learning_rate": 0.01, "weight_decay": 1e-4,
                           "decoupled_weight_decay": True},
                "lambda lr: optax.adamaxw(lr)"),
    "adamaxw_mask": ("Adamax", {"learning_rate": 0.01, "beta1": 0.8, "beta2": 0.99,
                                "epsilon": 1e-6, "weight_decay": 0.1,
                                "decoupled_weight_decay": True, "weight_decay_mask": DECAYED},
                     f"lambda lr: optax.adamaxw(lr, 0.8, 0.99, 1e-6, 0.1, {MASK})"),
    "sademamix": ("SimplifiedAdEMAMix", {"learning_rate": 1e-3},
                  "lambda lr: optax.contrib.simplified_ademamix(lr)"),
    "sademamix_wd": ("SimplifiedAdEMAMix", {"learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.99,
                                            "alpha": 2.0, "epsilon": 1e-6, "eps_root": 1e-10,
                                            "weight_decay": 0.1, "weight_decay_mask": DECAYED},
                     "lambda lr: optax.contrib.simplified_ademamix(lr, 0.9, 0.99, 2.0, 1e-6, "
                     f"1e-10, 0.1, {MASK})"),
    "cocob": ("COCOB", {"learning_rate": 1.0}, "lambda lr: optax.contrib.cocob(lr)"),
    "cocob_wd": ("COCOB", {"learning_rate": 0.5, "alpha": 50.0, "epsilon": 1e-6,
                           "weight_decay": 0.1, "weight_decay_mask": DECAYED},
                 f"lambda lr: optax.contrib.cocob(lr, 50.0, 1e-6, 0.1, {MASK})"),
    # two passes: per-tensor norms (Fromage), sums over every parameter (DoG, DoWG)
    "fromage": ("Fromage", {"learning_rate": 0.01}, "lambda lr: optax.fromage(lr)"),
    "fromage_wd": ("Fromage", {"learning_rate": 0.05, "min_norm": 1e-3, "weight_decay": 0.1},
                   "lambda lr: optax.chain(optax.add_decayed_weights(0.1), "
                   "optax.fromage(lr, 1e-3))"),
    "dog": ("DoG", {"learning_rate": 1.0}, "lambda lr: optax.contrib.dog(lr)"),
    "dog_heuristic": ("DoG", {"learning_rate": 1.0, "init_step": ["heuristic", 0.05]},
                      "lambda lr: optax.contrib.dog(lr, ('heuristic', 0.05))"),
    "dog_distance_wd": ("DoG", {"learning_rate": 0.5, "init_step": ["distance", 1e-3],
                                "epsilon": 1e-6, "weight_decay": 0.1,
                                "weight_decay_mask": DECAYED},
                        "lambda lr: optax.contrib.dog(lr, ('distance', 1e-3), 1e-6, 0.1, "
                        f"{MASK})"),
    "dog_lr": ("DoG", {"learning_rate": 1.0, "init_step": ["learning_rate", 1e-2]},
               "lambda lr: optax.contrib.dog(lr, ('learning_rate', 1e-2))"),
    "dowg": ("DoWG", {"learning_rate": 1.0}, "lambda lr: optax.contrib.dowg(lr)"),
    "dowg_wd": ("DoWG", {"learning_rate": 0.5, "init_estim_sq_dist": 1e-3, "epsilon": 1e-6,
                         "weight_decay": 0.1},
                "lambda lr: optax.contrib.dowg(lr, 1e-3, 1e-6, 0.1)"),
}
CLASSES = {c.__name__: c for c in (SignSGD, Signum, OptimisticGD, OptimisticAdam, Adamax,
                                   SimplifiedAdEMAMix, COCOB, Fromage, DoG, DoWG)}
ENGINES = ("numpy", "torch", "jax", "jax-jit", "optax_transformation")
#: the largest error of each check (printed after the run: conftest.py)
OBSERVED: dict[str, float] = {}


_SCRIPT = r"""
import inspect, json
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import torch
import mithril.utils.optimizers.engines as engines
from mithril.interop import optax_transformation
from mithril.utils.lr_schedulers import PiecewiseConstant
from mithril.utils.optimizers import (COCOB, Adamax, DoG, DoWG, Fromage, OptimisticAdam,
                                      OptimisticGD, SignSGD, Signum, SimplifiedAdEMAMix)

CLASSES = {c.__name__: c for c in (SignSGD, Signum, OptimisticGD, OptimisticAdam, Adamax,
                                   SimplifiedAdEMAMix, COCOB, Fromage, DoG, DoWG)}
p0, grads = problem("float64")
names = list(SHAPES)


def schedule(lr0):
    # ×0.5 from step 40, ×2 of the start from step 70 (the scales multiply)
    return optax.piecewise_constant_schedule(lr0, {40: 0.5, 70: 4.0})


def jitted(tx):
    @jax.jit
    def step(params, g, s):
        u, s = tx.update(g, s, params)
        return optax.apply_updates(params, u), s
    return step


def run_optax(tx):
    step = jitted(tx)
    params = {k: jnp.asarray(v) for k, v in p0.items()}
    s = tx.init(params)
    for t in range(STEPS):
        params, s = step(params, {k: jnp.asarray(v) for k, v in grads[t].items()}, s)
        yield [np.array(params[k]) for k in names]
    assert np.array(params["w"]).dtype == np.float64


def run_mithril(cls_name, kw, engine):
    if engine == "optax_transformation":
        engines.JAX_ENGINE = "jit"
        tx = optax_transformation(CLASSES[cls_name](**kw),
                                  learning_rate=schedule(kw["learning_rate"]), scalars="traced")
        yield from run_optax(tx)
        return
    engines.JAX_ENGINE = "jit" if engine == "jax-jit" else "auto"
    conv = {"jax-jit": jnp.asarray, "jax": jnp.asarray, "torch": torch.tensor,
            "numpy": np.array}[engine]
    opt = CLASSES[cls_name](**kw)
    params = {k: conv(v) for k, v in p0.items()}
    state = opt.init(params)
    assert type(state.engine).__name__ == ("JaxEngine" if engine == "jax-jit" else "NumbaEngine")
    sched = PiecewiseConstant(opt, {40: 0.5, 70: 4.0})  # optax's schedule, ours
    for t in range(STEPS):
        assert opt.learning_rate == lr_at(kw["learning_rate"], t)
        params, state = opt.update(params, {k: conv(v) for k, v in grads[t].items()}, state)
        sched.step()
        yield [np.array(params[k]) for k in names]
    assert state.step == STEPS and np.array(params["w"]).dtype == np.float64


out = {}
for case, (cls_name, kw, ref) in CASES.items():
    traj = list(run_optax(eval(ref)(schedule(kw["learning_rate"]))))
    for engine in ENGINES:
        err = 0.0
        for t, mine in enumerate(run_mithril(cls_name, kw, engine)):
            err = max(err, *(rel_err(a, b) for a, b in zip(mine, traj[t])))
        out[f"{case}/{engine}"] = err
    # how far the parameters moved: a case that does not move would prove nothing
    out[f"{case}/moved"] = max(rel_err(traj[-1][i], p0[k]) for i, k in enumerate(names))

# the deprecated optax.optimistic_adam(lr, optimism) (α = lr, β = optimism, no lr; it takes
# no schedule) is OptimisticAdam(learning_rate=lr, alpha=1, beta=optimism/lr)
import warnings
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    traj = list(run_optax(optax.optimistic_adam(0.01, 0.03)))
opt = OptimisticAdam(learning_rate=0.01, alpha=1.0, beta=0.03 / 0.01)
params = {k: v.copy() for k, v in p0.items()}
state = opt.init(params)
err = 0.0
for t in range(STEPS):
    params, state = opt.update(params, grads[t], state)
    err = max(err, *(rel_err(params[k], traj[t][i]) for i, k in enumerate(names)))
out["optimistic_adam_v1/numpy"] = err


def sig(f):
    return {k: p.default for k, p in inspect.signature(f).parameters.items()
            if p.default is not inspect.Parameter.empty}

refs = {"SignSGD": optax.sign_sgd, "Signum": optax.signum,
        "OptimisticGD": optax.optimistic_gradient_descent,
        "OptimisticAdam": optax.optimistic_adam_v2, "Adamax": optax.adamaxw,
        "SimplifiedAdEMAMix": optax.contrib.simplified_ademamix, "COCOB": optax.contrib.cocob,
        "Fromage": optax.fromage, "DoG": optax.contrib.dog, "DoWG": optax.contrib.dowg}
print(json.dumps({"errors": out, "defaults": {c: sig(f) for c, f in refs.items()}},
                 default=repr))
"""


@functools.cache
def reference_run() -> dict:
    """The float64 comparisons (and optax's defaults), in one fresh interpreter."""
    code = reference_code("", _SCRIPT, problem, STEPS, SHAPES, CASES, f"ENGINES = {ENGINES!r}")
    return json.loads(run_python(code, timeout=600).strip().splitlines()[-1])


# our name -> optax's (Signum's momentum is optax.signum's beta)
_REF_NAMES = {"beta1": "b1", "beta2": "b2", "epsilon": "eps"}


@pytest.mark.slow
def test_float64_parity_with_optax_and_defaults():
    """100 steps vs optax with an lr schedule, ≤ 1e-10 on every engine and through
    optax_transformation; and the defaults are optax's (but the ones documented)."""
    res = reference_run()
    errors, defaults = res["errors"], res["defaults"]
    for case in CASES:
        OBSERVED[f"f64/{case}"] = max(errors[f"{case}/{e}"] for e in ENGINES)
    bad = {f"{case}/{e}": errors[f"{case}/{e}"] for case in CASES for e in ENGINES
           if not errors[f"{case}/{e}"] <= TOL64}
    assert not bad, bad
    # the deprecated optimistic_adam: (lr+o)·u − o·u_prev against lr·((1+o/lr)·u − (o/lr)·u_prev)
    assert errors["optimistic_adam_v1/numpy"] <= TOL64, errors["optimistic_adam_v1/numpy"]
    OBSERVED["f64/optimistic_adam_v1"] = errors["optimistic_adam_v1/numpy"]
    # (DoG's default r_ε = 1e-6·(1 + ‖x₀‖) grows slowly: it moves ~2e-4 in 100 steps)
    still = [case for case in CASES if not errors[f"{case}/moved"] > 1e-4]
    assert not still, still
    # documented departures: no default lr in optax (SignSGD, Signum, OptimisticGD,
    # OptimisticAdam, Adamax, SimplifiedAdEMAMix, Fromage); optax.adamaxw decays 1e-4 by
    # default, Adamax (the plain one's default) does not; DoG's and DoWG's weight_decay
    # None is 0 here
    departures = {("Adamax", "weight_decay"), ("DoG", "weight_decay"),
                  ("DoWG", "weight_decay")}
    for cls in CLASSES.values():
        ref = defaults[cls.__name__]
        ours = {k: p.default for k, p in inspect.signature(cls).parameters.items()
                if p.default is not inspect.Parameter.empty}
        names = {**_REF_NAMES, "momentum": "beta"} if cls is Signum else _REF_NAMES
        checked = 0
        for name, value in ours.items():
            theirs = names.get(name, name)
            if theirs in ref and (cls.__name__, name) not in departures:
                want = ref[theirs]
                want = tuple(want) if isinstance(want, list) else want  # (JSON: DoG's init_step)
                assert value == want, (cls.__name__, name, value, want)
                checked += 1
        assert checked >= {"SignSGD": 0}.get(cls.__name__, 1), (cls.__name__, checked)
    assert defaults["Adamax"]["weight_decay"] == 1e-4 and Adamax().weight_decay == 0.0
    assert COCOB().learning_rate == defaults["COCOB"]["learning_rate"] == 1.0
    assert DoG().learning_rate == defaults["DoG"]["learning_rate"] == 1.0
    assert DoWG().learning_rate == defaults["DoWG"]["learning_rate"] == 1.0
    assert defaults["DoG"]["weight_decay"] is None and DoG().weight_decay == 0.0


# ---------------------------------------------------------------------------------------------
# float32: the backends agree; torch_optimizer; checkpoints; hyperparameter checks
# ---------------------------------------------------------------------------------------------

F32_CASES = ["sign_sgd_wd", "signum_wd", "ogd_wd", "oadam", "oadam_wd", "adamaxw_mask",
             "sademamix_wd", "cocob_wd", "fromage_wd", "dog_distance_wd", "dog_lr", "dowg_wd"]
F32_STEPS = 20


def run32(case: str, backend: str, steps: int = F32_STEPS, stop_at: int | None = None):
    """Final float32 params of ``case`` on ``backend``; with ``stop_at``, the optimizer and
    state are rebuilt from a state_dict after that many steps (and the params copied)."""
    cls_name, kw, _ = CASES[case]
    p0, grads = problem("float32", steps, shapes=SHAPES)
    with optimizer_engine(backend):
        opt = CLASSES[cls_name](**kw)
        params = {k: native(backend, v) for k, v in p0.items()}
        state = opt.init(params)
        assert type(state.engine).__name__ == {"jax-jit": "JaxEngine", "array-torch":
                                               "ArrayEngine"}.get(backend, "NumbaEngine")
        for t in range(steps):
            if t == 8:
                opt.set_learning_rate(kw["learning_rate"] * 0.5)
            if t == stop_at:
                d = copy.deepcopy(opt.state_dict(state))
                opt = CLASSES[cls_name]()  # defaults, replaced by the state dict's
                params = {k: native(backend, host(v)) for k, v in params.items()}
                state = opt.load_state_dict(d, params)
                assert state.step == stop_at
                assert opt.hyperparameters() == CLASSES[cls_name](**kw).hyperparameters() | {
                    "learning_rate": kw["learning_rate"] * 0.5}
            g = {k: native(backend, v) for k, v in grads[t].items()}
            params, state = opt.update(params, g, state)
        return {k: host(v) for k, v in params.items()}, state


@pytest.mark.parametrize("case", F32_CASES)
def test_float32_backends_agree(case):
    runs = {b: run32(case, b)[0] for b in ("numpy", "torch", "jax", "jax-jit", "array-torch")}
    for k in SHAPES:
        assert runs["numpy"][k].dtype == np.float32
        # NumPy, torch and JAX on CPU run the same fused kernel: identical bits
        np.testing.assert_array_equal(runs["numpy"][k], runs["torch"][k])
        np.testing.assert_array_equal(runs["numpy"][k], runs["jax"][k])
        # XLA's fusion and the flat tensor ops (torch's accelerator path, forced here on
        # CPU) round differently: close, relative to each tensor's scale
        for other in ("jax-jit", "array-torch"):
            x, y = runs["numpy"][k], runs[other][k]
            err = float(np.max(np.abs(x - y)) / max(np.max(np.abs(x)), 1.0))
            OBSERVED[f"f32/{case}/{other}"] = max(err, OBSERVED.get(f"f32/{case}/{other}", 0.0))
            assert err <= 3e-6, (case, other, k, err)


@pytest.mark.parametrize("case", F32_CASES)
def test_state_dict_round_trip_resumes_bit_exactly(case):
    whole, s1 = run32(case, "numpy")
    resumed, s2 = run32(case, "numpy", stop_at=11)
    assert s1.step == s2.step == F32_STEPS
    assert set(s1.slots) == set(s2.slots)
    assert bool(s1.slots) == (case not in ("sign_sgd_wd", "fromage_wd"))  # (they keep none)
    assert s1.values.keys() == s2.values.keys()
    for name in s1.values:  # DoG's and DoWG's optimizer-wide sums
        assert float(s1.values[name]) == float(s2.values[name]), name
    for k in SHAPES:
        np.testing.assert_array_equal(whole[k], resumed[k])
    for slot in s1.slots:
        for k in SHAPES:
            np.testing.assert_array_equal(np.asarray(s1.slot(slot)[k]),
                                          np.asarray(s2.slot(slot)[k]))


@pytest.mark.parametrize("case", ["signum_wd", "ogd_wd", "oadam", "adamaxw_mask",
                                  "sademamix_wd", "cocob_wd", "fromage_wd", "dog_lr", "dowg_wd"])
def test_torch_optimizer_drives_a_torch_model_as_update_does(case):
    """``torch_optimizer(opt, model.named_parameters())`` on a torch model, with real
    backward passes: each step equals the optimizer's own update on the same gradients."""
    import torch

    from mithril.interop import torch_optimizer

    cls_name, kw, _ = CASES[case]
    kw = {k: v for k, v in kw.items() if k != "weight_decay_mask"}
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    mine = CLASSES[cls_name](**kw)
    params = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    state = mine.init(params)
    topt = torch_optimizer(CLASSES[cls_name](**kw), model.named_parameters())
    losses = []
    for _ in range(6):
        topt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        losses.append(loss.item())
        grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
        topt.step()
        params, state = mine.update(params, grads, state)
        for n, p in model.named_parameters():
            np.testing.assert_array_equal(p.detach().numpy(), params[n], err_msg=n)
    assert losses[-1] != losses[0]


BAD = [
    (SignSGD, {"momentum": 1.0}, ValueError, "momentum"),
    (SignSGD, {"momentum": "0.9"}, TypeError, "momentum"),
    (SignSGD, {"learning_rate": -0.1}, ValueError, "learning_rate"),
    (Signum, {"momentum": 0.0}, ValueError, "momentum"),
    (Signum, {"weight_decay": -1.0}, ValueError, "weight_decay"),
    (OptimisticGD, {"alpha": -1.0}, ValueError, "alpha"),
    (OptimisticGD, {"beta": float("nan")}, ValueError, "beta"),
    (OptimisticAdam, {"beta1": 1.0}, ValueError, "beta1"),
    (OptimisticAdam, {"beta2": -0.5}, ValueError, "beta2"),
    (OptimisticAdam, {"eps_root": -1e-8}, ValueError, "eps_root"),
    (OptimisticAdam, {"nesterov": "yes"}, TypeError, "nesterov"),
    (Adamax, {"decoupled_weight_decay": "yes"}, TypeError, "decoupled_weight_decay"),
    (Adamax, {"decoupled_weight_decay": False, "convention": "keras"}, ValueError,
     "decoupled_weight_decay"),
    (SimplifiedAdEMAMix, {"beta1": 1.5}, ValueError, "beta1"),
    (SimplifiedAdEMAMix, {"alpha": -2.0}, ValueError, "alpha"),
    (SimplifiedAdEMAMix, {"epsilon": 0.0}, ValueError, "epsilon"),
    (COCOB, {"alpha": 0.0}, ValueError, "alpha"),
    (COCOB, {"epsilon": -1e-8}, ValueError, "epsilon"),
    (COCOB, {"learning_rate": float("inf")}, ValueError, "learning_rate"),
    (Fromage, {"min_norm": -1e-6}, ValueError, "min_norm"),
    (DoG, {"init_step": ("guess", 1e-6)}, ValueError, "init_step"),
    (DoG, {"init_step": 1e-6}, ValueError, "init_step"),
    (DoG, {"init_step": ("distance", -1.0)}, ValueError, "init_step"),
    (DoG, {"epsilon": float("nan")}, ValueError, "epsilon"),
    (DoWG, {"init_estim_sq_dist": -1.0}, ValueError, "init_estim_sq_dist"),
    (DoWG, {"epsilon": -1.0}, ValueError, "epsilon"),
]


@pytest.mark.parametrize("cls, kw, exc, name", BAD,
                         ids=[f"{c.__name__}-{next(iter(k))}" for c, k, _, _ in BAD])
def test_bad_hyperparameters_name_the_argument(cls, kw, exc, name):
    with pytest.raises(exc, match=name):
        cls(**kw)


def test_hyperparameters_round_trip_and_slots():
    for cls in CLASSES.values():  # every hyperparameter is a constructor argument (checkpoints)
        o = cls()
        assert type(o)(**o.hyperparameters()).hyperparameters() == o.hyperparameters()
    assert SignSGD().slot_names() == () and SignSGD(momentum=0.5).slot_names() == ("m",)
    assert Signum().momentum == 0.9
    assert Adamax().decoupled_weight_decay is False
    assert Adamax(convention="keras").decoupled_weight_decay is True
    assert Adamax(decoupled_weight_decay=True).hyperparameters()["decoupled_weight_decay"]
    state = COCOB(epsilon=1e-5).init({"w": np.zeros(3)})
    np.testing.assert_array_equal(state.slot("scale")["w"], np.full(3, 1e-5))


@pytest.mark.parametrize("case", ["cocob", "dog_lr", "dowg"])
def test_a_parameter_missing_from_the_first_steps_keeps_its_starting_point(case):
    """COCOB's p₀ and DoG's / DoWG's x₀ are the parameters' initial values in optax (copied
    at ``init``). Here a parameter absent from the first two steps' gradients steps
    exactly as with zero gradients there (what the float64 parity checks against optax):
    its starting point is its value at its first update, not 0."""
    cls_name, kw, _ = CASES[case]
    p0, grads = problem("float32", 12, shapes=SHAPES)
    runs = []
    for drop in (False, True):
        opt = CLASSES[cls_name](**kw)
        params = {k: v.copy() for k, v in p0.items()}
        state = opt.init(params)
        for t, g in enumerate(grads):
            g = {k: v for k, v in g.items() if not (drop and k == "b" and t < 2)}
            params, state = opt.update(params, g, state)
        runs.append({k: host(v) for k, v in params.items()})
    assert not np.array_equal(runs[0]["b"], p0["b"])  # it moved after its first update
    for k in SHAPES:
        np.testing.assert_array_equal(runs[0][k], runs[1][k], err_msg=k)
