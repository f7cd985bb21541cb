"""Lion, Yogi, AdaBelief, ADOPT, Adan, AdEMAMix, LAMB, LARS, Novograd (against optax) and Ftrl (against Keras 3).

float64 parity: every case runs 100 steps side by side with its reference (optax jitted, or
Keras on the JAX backend), from the same start and gradient sequence, with the learning rate
changed twice mid-run (optax: ``optax.inject_hyperparams``; Keras: ``opt.learning_rate = ...``
before the same step), on the fused numba kernel (NumPy float64) and the jitted JAX engine
(JAX float64); parameters are compared after every step, ``<= 1e-10`` in the measure of
:func:`rel_err` (as tests/optimizer_parity.py: elementwise relative, floored at 1e-3 of the
tensor's largest magnitude). JAX float64 needs the process-global ``jax_enable_x64``: all of
it runs in ONE fresh subprocess (:func:`reference_run`, cached), which prints the errors.

float32: NumPy, torch and JAX on CPU run the same fused kernel (identical bits); the jitted
JAX engine and the flat tensor-op engine (the GPU path, forced here on CPU) agree to ~1e-6 of
each tensor's scale. A state_dict round trip mid-run resumes bit-exactly; bad
hyperparameters raise ValueError/TypeError naming the argument.
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

from mithril.utils.optimizers.adabelief import AdaBelief
from mithril.utils.optimizers.adan import Adan
from mithril.utils.optimizers.ademamix import AdEMAMix
from mithril.utils.optimizers.adopt import ADOPT
from mithril.utils.optimizers.ftrl import Ftrl
from mithril.utils.optimizers.lamb import LAMB
from mithril.utils.optimizers.lars import LARS
from mithril.utils.optimizers.lion import Lion
from mithril.utils.optimizers.novograd import Novograd
from mithril.utils.optimizers.sgd import BY_CONVENTION
from mithril.utils.optimizers.yogi import Yogi

STEPS = 100
TOL64 = 1e-10
TOL32 = 3e-6  # measured up to ~9e-7 (Ftrl, Lion; tensor ops vs the fused kernel)
SHAPES = {"w": (3, 4), "b": (4,), "s": (), "big": (130, 130)}

# name -> (class, kwargs, reference). A reference is an optax factory of the learning rate
# (given to optax.inject_hyperparams) or ("keras", kwargs of keras.optimizers.Ftrl).
# Coupled weight decay (optimizers without their own in optax) is add_decayed_weights in front.
CASES: dict[str, tuple[str, dict, object]] = {
    "lion": ("Lion", {"learning_rate": 1e-3, "weight_decay": 0.0},
             "lambda learning_rate: optax.lion(learning_rate, weight_decay=0.0)"),
    "lion_wd": ("Lion", {"learning_rate": 3e-3, "beta1": 0.95, "beta2": 0.98, "weight_decay": 0.1},
                "lambda learning_rate: optax.lion(learning_rate, 0.95, 0.98, weight_decay=0.1)"),
    "yogi": ("Yogi", {"learning_rate": 0.01},
             "lambda learning_rate: optax.yogi(learning_rate)"),
    "yogi_wd": ("Yogi", {"learning_rate": 0.02, "beta1": 0.8, "beta2": 0.99, "epsilon": 1e-4,
                         "eps_root": 1e-8, "initial_accumulator_value": 0.0, "weight_decay": 0.1},
                "lambda learning_rate: optax.chain(optax.add_decayed_weights(0.1), "
                "optax.scale_by_yogi(0.8, 0.99, 1e-4, 1e-8, 0.0), "
                "optax.scale_by_learning_rate(learning_rate))"),
    "adabelief": ("AdaBelief", {"learning_rate": 0.01},
                  "lambda learning_rate: optax.adabelief(learning_rate)"),
    "adabelief_nesterov_wd": (
        "AdaBelief", {"learning_rate": 0.01, "beta1": 0.8, "epsilon": 1e-8, "eps_root": 1e-12,
                      "nesterov": True, "weight_decay": 0.1},
        "lambda learning_rate: optax.chain(optax.add_decayed_weights(0.1), optax.adabelief("
        "learning_rate, 0.8, eps=1e-8, eps_root=1e-12, nesterov=True))"),
    "adopt": ("ADOPT", {"learning_rate": 0.01},
              "lambda learning_rate: optax.contrib.adopt(learning_rate)"),
    "adopt_noclip_wd": (
        "ADOPT", {"learning_rate": 0.01, "beta2": 0.99, "use_clipping": False, "weight_decay": 0.1},
        "lambda learning_rate: optax.chain(optax.add_decayed_weights(0.1), "
        "optax.contrib.adopt(learning_rate, b2=0.99, use_clipping=False))"),
    "adopt_nesterov": ("ADOPT", {"learning_rate": 0.01, "beta2": 0.999, "nesterov": True},
                       "lambda learning_rate: optax.contrib.adopt(learning_rate, b2=0.999, "
                       "nesterov=True)"),
    "adopt_nesterov_noclip": (
        "ADOPT", {"learning_rate": 0.01, "nesterov": True, "use_clipping": False},
        "lambda learning_rate: optax.contrib.adopt(learning_rate, nesterov=True, "
        "use_clipping=False)"),
    "adan": ("Adan", {"learning_rate": 0.01},
             "lambda learning_rate: optax.adan(learning_rate)"),
    "adan_wd": ("Adan", {"learning_rate": 0.01, "beta1": 0.9, "beta2": 0.8, "beta3": 0.95,
                         "epsilon": 1e-6, "eps_root": 0.0, "weight_decay": 0.1},
                "lambda learning_rate: optax.adan(learning_rate, 0.9, 0.8, 0.95, 1e-6, 0.0, "
                "weight_decay=0.1)"),
    "ademamix": ("AdEMAMix", {"learning_rate": 0.01},
                 "lambda learning_rate: optax.contrib.ademamix(learning_rate)"),
    "ademamix_wd": ("AdEMAMix", {"learning_rate": 0.01, "beta3": 0.99, "alpha": 8.0,
                                 "eps_root": 1e-10, "weight_decay": 0.1},
                    "lambda learning_rate: optax.contrib.ademamix(learning_rate, b3=0.99, "
                    "alpha=8.0, eps_root=1e-10, weight_decay=0.1)"),
    "lamb": ("LAMB", {"learning_rate": 0.01},
             "lambda learning_rate: optax.lamb(learning_rate)"),
    "lamb_wd": ("LAMB", {"learning_rate": 0.01, "beta1": 0.8, "beta2": 0.99, "epsilon": 1e-8,
                         "eps_root": 1e-10, "weight_decay": 0.1},
                "lambda learning_rate: optax.lamb(learning_rate, 0.8, 0.99, 1e-8, 1e-10, 0.1)"),
    "lars": ("LARS", {"learning_rate": 0.1},
             "lambda learning_rate: optax.lars(learning_rate)"),
    # groups: no decay and no trust ratio for "b" (optax's two masks)
    "lars_groups_nesterov": (
        "LARS", {"learning_rate": 0.1, "momentum": 0.8, "trust_coefficient": 0.02,
                 "epsilon": 1e-9, "nesterov": True, "weight_decay": 0.1,
                 "param_groups": [{"params": ["b"], "weight_decay": 0.0,
                                   "trust_coefficient": None}]},
        "lambda learning_rate: optax.lars(learning_rate, 0.1, "
        "{'w': True, 'b': False, 's': True, 'big': True}, 0.02, 1e-9, "
        "{'w': True, 'b': False, 's': True, 'big': True}, 0.8, True)"),
    "novograd": ("Novograd", {"learning_rate": 0.01},
                 "lambda learning_rate: optax.novograd(learning_rate)"),
    "novograd_wd": ("Novograd", {"learning_rate": 0.01, "beta1": 0.8, "beta2": 0.5,
                                 "epsilon": 1e-8, "eps_root": 1e-10, "weight_decay": 0.1},
                    "lambda learning_rate: optax.novograd(learning_rate, 0.8, 0.5, 1e-8, "
                    "1e-10, 0.1)"),
    "ftrl": ("Ftrl", {"learning_rate": 0.1}, ("keras", {})),
    "ftrl_all": ("Ftrl", {"learning_rate": 0.1, "learning_rate_power": -0.3,
                          "initial_accumulator_value": 0.5, "l1_regularization_strength": 0.05,
                          "l2_regularization_strength": 0.1,
                          "l2_shrinkage_regularization_strength": 0.02, "beta": 0.3,
                          "weight_decay": 0.1},
                 ("keras", {"learning_rate_power": -0.3, "initial_accumulator_value": 0.5,
                            "l1_regularization_strength": 0.05,
                            "l2_regularization_strength": 0.1,
                            "l2_shrinkage_regularization_strength": 0.02, "beta": 0.3,
                            "weight_decay": 0.1})),
}
CLASSES = {c.__name__: c for c in (Lion, Yogi, AdaBelief, ADOPT, Adan, AdEMAMix, Ftrl, LAMB,
                                   LARS, Novograd)}
#: the largest error of each check (printed after the run: conftest.py)
OBSERVED: dict[str, float] = {}


def problem(dtype: str = "float64", steps: int = STEPS, seed: int = 0, shapes=None):
    """Start parameters and a gradient sequence (of ``shapes``, default ``SHAPES``); "b" gets
    a zero gradient on the first two steps (sign(0) = 0 for Lion and SignSGD, a zero first v
    for ADOPT, Adan's zero first difference, the optimistic first step, COCOB's zero bet)."""
    shapes = SHAPES if shapes is None else shapes
    rng = np.random.default_rng(seed)
    p0 = {k: np.asarray(rng.standard_normal(s), dtype=dtype) for k, s in shapes.items()}
    grads = [{k: np.asarray(rng.standard_normal(s) * (1 + t % 7) * (k != "b" or t >= 2),
                            dtype=dtype) for k, s in shapes.items()} for t in range(steps)]
    return p0, grads


# ---------------------------------------------------------------------------------------------
# float64 parity with optax / Keras: one subprocess (jax_enable_x64 is process-global)
# ---------------------------------------------------------------------------------------------

_SCRIPT = r"""
import inspect, json, os
os.environ["KERAS_BACKEND"] = "jax"
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import mithril.utils.optimizers.engines as engines
from mithril.utils.optimizers.adabelief import AdaBelief
from mithril.utils.optimizers.adan import Adan
from mithril.utils.optimizers.ademamix import AdEMAMix
from mithril.utils.optimizers.adopt import ADOPT
from mithril.utils.optimizers.ftrl import Ftrl
from mithril.utils.optimizers.lamb import LAMB
from mithril.utils.optimizers.lars import LARS
from mithril.utils.optimizers.lion import Lion
from mithril.utils.optimizers.novograd import Novograd
from mithril.utils.optimizers.yogi import Yogi

import keras  # the test extra has it: Ftrl's reference

keras.config.set_floatx("float64")
"""

_SCRIPT_MAIN = r"""
CLASSES = {c.__name__: c for c in (Lion, Yogi, AdaBelief, ADOPT, Adan, AdEMAMix, Ftrl, LAMB,
                                   LARS, Novograd)}
p0, grads = problem("float64")
names = list(SHAPES)


def run_reference(kw, ref):
    lr0 = kw["learning_rate"]
    traj = []
    if isinstance(ref, list):  # Keras
        opt = keras.optimizers.Ftrl(learning_rate=lr0, **ref[1])
        vs = [keras.Variable(p0[k], dtype="float64") for k in names]
        for t in range(STEPS):
            opt.learning_rate = lr_at(lr0, t)
            opt.apply([jnp.asarray(grads[t][k]) for k in names], vs)
            traj.append([np.array(v.value) for v in vs])
        assert traj[-1][0].dtype == np.float64
        return traj
    tx = optax.inject_hyperparams(eval(ref))(learning_rate=lr0)

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


def run_mithril(cls_name, kw, engine):
    engines.JAX_ENGINE = "jit" if engine == "jax-jit" else "auto"
    conv = jnp.asarray if engine == "jax-jit" else np.array
    opt = CLASSES[cls_name](**kw)
    params = {k: conv(v) for k, v in p0.items()}
    state = opt.init(params)
    assert type(state.engine).__name__ == ("JaxEngine" if engine == "jax-jit" else "NumbaEngine")
    lr0 = kw["learning_rate"]
    for t in range(STEPS):
        opt.set_learning_rate(lr_at(lr0, t))
        params, state = opt.update(params, {k: conv(v) for k, v in grads[t].items()}, state)
        yield [np.array(params[k]) for k in names]
    assert state.step == STEPS and np.array(params["w"]).dtype == np.float64


out = {}
for case, (cls_name, kw, ref) in CASES.items():
    traj = run_reference(kw, ref)
    for engine in ("numpy", "jax-jit"):
        err = 0.0
        for t, mine in enumerate(run_mithril(cls_name, kw, engine)):
            err = max(err, *(rel_err(a, b) for a, b in zip(mine, traj[t])))
        out[f"{case}/{engine}"] = err

# the references' defaults
def sig(f):
    return {k: p.default for k, p in inspect.signature(f).parameters.items()
            if p.default is not inspect.Parameter.empty}

refs = {"Lion": optax.lion, "Yogi": optax.scale_by_yogi, "AdaBelief": optax.adabelief,
        "ADOPT": optax.contrib.adopt, "Adan": optax.adan, "AdEMAMix": optax.contrib.ademamix,
        "LAMB": optax.lamb, "LARS": optax.lars, "Novograd": optax.novograd}
defaults = {c: sig(f) for c, f in refs.items()}
defaults["Ftrl"] = sig(keras.optimizers.Ftrl)
print(json.dumps({"errors": out, "defaults": defaults}, default=repr))
"""


@functools.cache
def reference_run() -> dict:
    """The float64 comparisons (and the references' defaults), in one fresh interpreter."""
    code = reference_code(_SCRIPT, _SCRIPT_MAIN, problem, STEPS, SHAPES, CASES)
    return json.loads(run_python(code, timeout=300).strip().splitlines()[-1])


# our name -> the reference's
_REF_NAMES = {"beta1": "b1", "beta2": "b2", "beta3": "b3", "epsilon": "eps"}


def test_float64_parity_and_defaults():
    """100 steps vs optax (core and contrib) or Keras, with two lr changes, ≤ 1e-10; and the
    defaults are the reference's. One test, so that under xdist the subprocess runs once."""
    res = reference_run()
    errors, defaults = res["errors"], res["defaults"]
    bad = {}
    for case in CASES:
        assert errors.get(case, 0.0) is not None, f"{case}: no reference run"
        for engine in ("numpy", "jax-jit"):
            err = errors[f"{case}/{engine}"]
            OBSERVED[f"f64/{case}/{engine}"] = err
            if not err <= TOL64:
                bad[f"{case}/{engine}"] = err
    assert not bad, bad
    for cls in CLASSES.values():
        if cls.__name__ not in defaults:
            continue
        ref = defaults[cls.__name__]
        ours = {k: p.default for k, p in inspect.signature(cls).parameters.items()
                if p.default is not inspect.Parameter.empty}
        checked = 0
        for name, value in ours.items():
            theirs = _REF_NAMES.get(name, name)
            if theirs in ref and name != "learning_rate":
                if value is BY_CONVENTION:  # (Lion's weight decay: 1e-3 optax's, 0 MLX's)
                    value = getattr(cls(), name)
                # (Keras' weight_decay=None is our 0.0; optax's mu_dtype=None is ours)
                want = (None if value is None else 0.0) if ref[theirs] is None else ref[theirs]
                assert value == want, (cls.__name__, name, value, want)
                checked += 1
        assert checked >= 2, (cls.__name__, checked)
    assert Ftrl().learning_rate == defaults["Ftrl"]["learning_rate"]


# ---------------------------------------------------------------------------------------------
# float32: the backends and engines agree; checkpoints; hyperparameter checks
# ---------------------------------------------------------------------------------------------

# one option set per optimizer (weight decay included), 30 steps with an lr change
F32_CASES = ["lion_wd", "yogi_wd", "adabelief_nesterov_wd", "adopt", "adan_wd", "ademamix_wd",
             "ftrl_all", "lamb_wd", "lars_groups_nesterov", "novograd_wd"]
F32_STEPS = 30
F32_LR = {10: 0.5}


def run32(case: str, backend: str, steps: int = F32_STEPS, stop_at: int | None = None):
    """Final float32 params of ``case`` on ``backend``; with ``stop_at``, the optimizer and
    state are rebuilt from a state_dict after that many steps (and the params copied)."""
    cls_name, kw, _ = CASES[case]
    p0, grads = problem("float32", steps)
    with optimizer_engine(backend):
        opt = CLASSES[cls_name](**kw)
        params = {k: native(backend, v) for k, v in p0.items()}
        state = opt.init(params)
        expected = {"jax-jit": "JaxEngine", "array-numpy": "ArrayEngine",
                    "array-torch": "ArrayEngine"}.get(backend, "NumbaEngine")
        assert type(state.engine).__name__ == expected
        for t in range(steps):
            if t in F32_LR:
                opt.set_learning_rate(kw["learning_rate"] * F32_LR[t])
            if t == stop_at:
                d = copy.deepcopy(opt.state_dict(state))
                opt = CLASSES[cls_name]()  # defaults, replaced by the state dict's
                params = {k: native(backend, host(v)) for k, v in params.items()}
                state = opt.load_state_dict(d, params)
                assert state.step == stop_at
            g = {k: native(backend, v) for k, v in grads[t].items()}
            params, state = opt.update(params, g, state)
        return {k: host(v) for k, v in params.items()}, state


@pytest.mark.parametrize("case", F32_CASES)
def test_float32_backends_agree(case):
    runs = {b: run32(case, b)[0] for b in
            ("numpy", "torch", "jax", "jax-jit", "array-torch")}
    for k in SHAPES:
        assert runs["numpy"][k].dtype == np.float32
        # NumPy, torch and JAX on CPU run the same fused kernel: identical bits
        np.testing.assert_array_equal(runs["numpy"][k], runs["torch"][k])
        np.testing.assert_array_equal(runs["numpy"][k], runs["jax"][k])
        # XLA's fusion and the tensor ops round differently: close, relative to each
        # tensor's scale
        for other in ("jax-jit", "array-torch"):
            x, y = runs["numpy"][k], runs[other][k]
            err = float(np.max(np.abs(x - y)) / np.max(np.abs(x)))
            label = f"f32/{case}/numpy-{other}"
            OBSERVED[label] = max(err, OBSERVED.get(label, 0.0))
            assert err <= TOL32, (case, other, k, err)


@pytest.mark.parametrize("case", F32_CASES)
def test_state_dict_round_trip_resumes_bit_exactly(case):
    whole, s1 = run32(case, "numpy", steps=20)
    resumed, s2 = run32(case, "numpy", steps=20, stop_at=11)
    assert s1.step == s2.step == 20
    for k in SHAPES:
        np.testing.assert_array_equal(whole[k], resumed[k])
    for slot in s1.slots:
        for k in SHAPES:
            np.testing.assert_array_equal(np.asarray(s1.slot(slot)[k]),
                                          np.asarray(s2.slot(slot)[k]))


BAD = [
    (Lion, {"beta1": 1.0}, ValueError, "beta1"),
    (Lion, {"beta2": -0.1}, ValueError, "beta2"),
    (Lion, {"weight_decay": -1}, ValueError, "weight_decay"),
    (Lion, {"learning_rate": "0.1"}, TypeError, "learning_rate"),
    (Yogi, {"epsilon": 0.0}, ValueError, "epsilon"),
    (Yogi, {"eps_root": -1e-8}, ValueError, "eps_root"),
    (Yogi, {"initial_accumulator_value": float("nan")}, ValueError, "initial_accumulator_value"),
    (AdaBelief, {"nesterov": "yes"}, TypeError, "nesterov"),
    (AdaBelief, {"beta2": 1.5}, ValueError, "beta2"),
    (ADOPT, {"use_clipping": 2}, TypeError, "use_clipping"),
    (ADOPT, {"epsilon": -1.0}, ValueError, "epsilon"),
    (Adan, {"beta3": 1.0}, ValueError, "beta3"),
    (Adan, {"eps_root": "x"}, TypeError, "eps_root"),
    (AdEMAMix, {"alpha": -1.0}, ValueError, "alpha"),
    (AdEMAMix, {"beta3": float("inf")}, ValueError, "beta3"),
    (Ftrl, {"learning_rate_power": 0.5}, ValueError, "learning_rate_power"),
    (Ftrl, {"learning_rate_power": None}, TypeError, "learning_rate_power"),
    (Ftrl, {"learning_rate": 0.0}, ValueError, "learning_rate"),
    (Ftrl, {"l1_regularization_strength": -0.1}, ValueError, "l1_regularization_strength"),
    (Ftrl, {"l2_regularization_strength": -0.1}, ValueError, "l2_regularization_strength"),
    (Ftrl, {"l2_shrinkage_regularization_strength": -1}, ValueError,
     "l2_shrinkage_regularization_strength"),
    (Ftrl, {"beta": -1.0}, ValueError, "beta"),
    (LAMB, {"beta2": 1.5}, ValueError, "beta2"),
    (LARS, {"trust_coefficient": 0.0}, ValueError, "trust_coefficient"),
    (LARS, {"nesterov": "yes"}, TypeError, "nesterov"),
    (Novograd, {"eps_root": -1.0}, ValueError, "eps_root"),
    (Ftrl, {"initial_accumulator_value": -0.1}, ValueError, "initial_accumulator_value"),
]


@pytest.mark.parametrize("cls, kw, exc, name", BAD,
                         ids=[f"{c.__name__}-{next(iter(k))}" for c, k, _, _ in BAD])
def test_bad_hyperparameters_name_the_argument(cls, kw, exc, name):
    with pytest.raises(exc, match=name):
        cls(**kw)


def test_aliases_setters_and_unknown_arguments():
    assert Lion(lr=0.01).learning_rate == 0.01
    assert Yogi(eps=1e-5).epsilon == 1e-5
    with pytest.raises(TypeError):
        Adan(lr=0.1, learning_rate=0.1)
    with pytest.raises(TypeError):
        AdEMAMix(b3=0.9)  # ours is beta3
    opt = Ftrl()
    with pytest.raises(ValueError, match="learning_rate"):
        opt.set_learning_rate(0.0)
    assert opt.learning_rate == 1e-3
    for cls in CLASSES.values():  # every hyperparameter is a constructor argument (checkpoints)
        o = cls()
        assert type(o)(**o.hyperparameters()).hyperparameters() == o.hyperparameters()
