"""Keras 3 side by side: what a Keras user switching to us reproduces, and how.

Each case runs ``keras.optimizers.<X>`` (JAX backend, float64) and ours from the same start on
the same gradients for 24 steps, on tensors of odd shapes (0-d, 1-d, 2-d, 3-d), the learning
rate changed twice mid-run, and compares the parameters after every step in
:func:`optimizer_parity.rel_err` (elementwise relative, floored at 1e-3 of the tensor's
scale), ``<= 1e-10``. The cases cover Keras's options too (clipnorm, clipvalue,
global_clipnorm, weight_decay, exclude_from_weight_decay, use_ema / ema_momentum /
ema_overwrite_frequency, loss_scale_factor, gradient_accumulation_steps, with use_ema too),
Muon's and ScheduleFreeAdamW's own, and its learning-rate schedules. Keras needs JAX's
process-global x64 switch: its trajectories, and ours on the jitted JAX engine, come from ONE
subprocess (:func:`reference_process`), which runs while ours on NumPy (the fused numba
kernel) run here (the :func:`runs` fixture).

Cases where some tensors get no gradient on some steps (``None`` in Keras, a missing key
here) cover what Keras keeps per optimizer rather than per tensor (NAdam's running μ product).
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

import numpy as np
import pytest
from optimizer_parity import rel_err

import mithril.utils.lr_schedulers as ls
import mithril.utils.optimizers as mo

SHAPES = {"w": (3, 4), "b": (4,), "s": (), "c": (2, 3, 2), "t": (5, 3)}  # t: a tall matrix
STEPS = 24
TOL = 1e-10
LR0 = 0.01


def make(name: str, kw: dict, their_kw: dict | None = None):
    """Our optimizer ``name(learning_rate=LR0, **kw)``; a dict value ``{"Class": kwargs}``
    is built first (a Muon's fallback). Keras's ``gradient_accumulation_steps=k`` is our
    ``Accumulate(optimizer, k)``, its ``exclude_from_weight_decay`` (``"exclude"`` here)
    ours."""
    from mithril.utils.accumulation import Accumulate

    kw = {k: make(*next(iter(v.items()))) if isinstance(v, dict) else v for k, v in kw.items()}
    opt = getattr(mo, name)(**{"learning_rate": LR0, **kw})
    if "exclude" in (their_kw or {}):  # Keras's exclude_from_weight_decay(var_names=...)
        opt.exclude_from_weight_decay(var_names=their_kw["exclude"])
    k = (their_kw or {}).get("gradient_accumulation_steps")
    return opt if k is None else Accumulate(opt, k)


def problem(dtype: str = "float64"):
    rng = np.random.default_rng(0)
    p0 = {k: np.asarray(rng.standard_normal(s), dtype=dtype) for k, s in SHAPES.items()}
    grads = [{k: np.asarray(rng.standard_normal(s) * (1 + t % 5), dtype=dtype)
              for k, s in SHAPES.items()} for t in range(STEPS)]
    return p0, grads


def missing(pattern: str, t: int) -> list[str]:
    """The tensors without a gradient at step ``t``."""
    if pattern == "some":
        return ["b"] if t % 4 == 1 else (["s", "w"] if t % 7 == 3 else [])
    return []


def lr_at(lr0: float, t: int) -> float:
    return lr0 * (3.0 if 8 <= t < 15 else 0.5 if t >= 15 else 1.0)


# name -> (our class, our kwargs, Keras class, Keras kwargs, missing-gradient pattern); the
# learning rate (both sides' first argument) changes twice mid-run (lr_at)
CASES: dict[str, tuple[str, dict, str, dict, str]] = {
    "nadam/missing": ("NAdam", {"epsilon": 1e-7, "convention": "keras"}, "Nadam", {}, "some"),
    "nadam_wd/missing": ("NAdam", {"epsilon": 1e-7, "weight_decay": 0.1, "convention": "keras"},
                         "Nadam", {"weight_decay": 0.1}, "some"),
    "adam_ema_wd/missing": (
        "Adam", {"epsilon": 1e-7, "weight_decay": 0.1, "ema_decay": 0.9, "convention": "keras"},
        "Adam", {"weight_decay": 0.1, "use_ema": True, "ema_momentum": 0.9}, "some"),
    "sgd_nesterov_clipnorm": (
        "SGD", {"momentum": 0.9, "nesterov": True, "clip_tensor_norm": 1.0,
                "convention": "keras"},
        "SGD", {"momentum": 0.9, "nesterov": True, "clipnorm": 1.0}, ""),
    # Keras takes Nesterov without momentum: plain SGD (torch, and our torch convention,
    # refuse it)
    "sgd_nesterov_no_momentum/missing": (
        "SGD", {"nesterov": True, "weight_decay": 0.1, "convention": "keras"},
        "SGD", {"nesterov": True, "weight_decay": 0.1}, "some"),
    "rmsprop_centered_clipvalue": (
        "RMSProp", {"epsilon": 1e-7, "centered": True, "momentum": 0.9, "clip_value": 0.5,
                    "convention": "keras"},
        "RMSprop", {"centered": True, "momentum": 0.9, "clipvalue": 0.5}, ""),
    "lion_wd/missing": ("Lion", {"weight_decay": 0.1}, "Lion", {"weight_decay": 0.1}, "some"),
    "lamb/missing": ("LAMB", {"epsilon": 1e-7}, "Lamb", {}, "some"),
    # convention="keras" where Keras's ε or weight decay differ from torch's / optax's
    "lamb_wd/missing": ("LAMB", {"epsilon": 1e-7, "weight_decay": 0.1, "convention": "keras"},
                        "Lamb", {"weight_decay": 0.1}, "some"),
    "adamax_wd": ("Adamax", {"epsilon": 1e-7, "weight_decay": 0.1, "convention": "keras"},
                  "Adamax", {"weight_decay": 0.1}, ""),
    "adamax_eps": ("Adamax", {"epsilon": 0.1, "convention": "keras"},  # ε out of the max
                   "Adamax", {"epsilon": 0.1}, "some"),
    "adadelta_wd": ("Adadelta", {"rho": 0.95, "epsilon": 1e-7, "weight_decay": 0.1,
                                 "convention": "keras"}, "Adadelta", {"weight_decay": 0.1}, ""),
    "ftrl_wd/missing": ("Ftrl", {"weight_decay": 0.1}, "Ftrl", {"weight_decay": 0.1}, "some"),
    # Keras's Muon (AdamW for what is not a matrix), by the recipe of Muon's docstring
    "muon": ("Muon", {"weight_decay": 0.004, "adjust_lr_fn": "match_rms_adamw",
                      "ns_dtype": None, "fallback": {"AdamW": {
                          "learning_rate": LR0, "weight_decay": 0.004, "epsilon": 1e-7,
                          "convention": "keras"}}},
             "Muon", {}, "some"),
    # Keras's Muon options: adam_lr_ratio r is fallback_lr_ratio, its AdamW's decay
    # adam_weight_decay / r (Keras decays by lr·adam_weight_decay), rms_rate adjust_lr_fn
    "muon_options/missing": (
        "Muon", {"weight_decay": 0.02, "momentum": 0.9, "nesterov": False, "ns_steps": 3,
                 "adjust_lr_fn": 0.35, "ns_dtype": None, "fallback": {"AdamW": {
                     "learning_rate": LR0 * 0.1, "weight_decay": 0.1, "beta1": 0.8,
                     "epsilon": 1e-7, "convention": "keras"}}},
        "Muon", {"weight_decay": 0.02, "momentum": 0.9, "nesterov": False, "ns_steps": 3,
                 "rms_rate": 0.35, "adam_lr_ratio": 0.1, "adam_weight_decay": 0.01,
                 "adam_beta_1": 0.8}, "some"),
    "muon_rms_rate_none": ("Muon", {"weight_decay": 0.004, "adjust_lr_fn": "none",
                                    "ns_dtype": None, "fallback": {"AdamW": {
                                        "weight_decay": 0.004, "epsilon": 1e-7,
                                        "convention": "keras"}}},
                           "Muon", {"rms_rate": None}, ""),
    # Keras's exclude_from_weight_decay(var_names=...) ("exclude"): on Muon it holds for
    # the fallback's tensors too
    "muon_exclude/missing": (
        "Muon", {"weight_decay": 0.1, "adjust_lr_fn": "match_rms_adamw", "ns_dtype": None,
                 "fallback": {"AdamW": {"weight_decay": 0.1, "epsilon": 1e-7,
                                        "convention": "keras"}}},
        "Muon", {"weight_decay": 0.1, "adam_weight_decay": 0.1, "exclude": ["b", "^w"]},
        "some"),
    "adam_wd_exclude/missing": ("Adam", {"epsilon": 1e-7, "weight_decay": 0.1,
                                         "convention": "keras"},
                                "Adam", {"weight_decay": 0.1, "exclude": ["b", "c"]}, "some"),
    # Keras's ScheduleFreeAdamW: its warm-up (lr·min(t/W, 1)), 1/t weights, decay of y
    "sfadamw_warmup_wd/missing": (
        "ScheduleFreeAdamW", {"warmup_steps": 10, "weight_decay": 0.1, "epsilon": 1e-3,
                              "beta1": 0.8, "convention": "keras"},
        "ScheduleFreeAdamW", {"warmup_steps": 10, "weight_decay": 0.1, "epsilon": 1e-3,
                              "beta_1": 0.8}, "some"),
    # Keras's loss_scale_factor=s (Keras gets the gradients of the loss times s): a fixed
    # scale, the recipe divides the gradients by s before the update
    "adagrad_loss_scale": ("AdaGrad", {"epsilon": 1e-7, "convention": "keras"},
                           "Adagrad", {"loss_scale_factor": 1000.0}, ""),
    # Keras's global_clipnorm: clip_gradients(eps=0) before the update (the fused clip_norm
    # keeps torch's 1e-6: ~1e-7 off here)
    "adam_global_clipnorm/missing": ("Adam", {"epsilon": 1e-7, "convention": "keras"},
                                     "Adam", {"global_clipnorm": 3.0}, "some"),
    # Keras's ema_overwrite_frequency=k: the EMA rebound as the parameters after every k-th
    # update (the recipe of averaging.py)
    "adam_ema_overwrite": ("Adam", {"epsilon": 1e-7, "ema_decay": 0.9, "convention": "keras"},
                           "Adam", {"use_ema": True, "ema_momentum": 0.9,
                                    "ema_overwrite_frequency": 5}, "some"),
    # Keras's Adafactor (its means in float64, see _SCRIPT)
    "adafactor_wd/missing": ("Adafactor", {"weight_decay": 0.1, "convention": "keras"},
                             "Adafactor", {"weight_decay": 0.1}, "some"),
    "adafactor_options": ("Adafactor", {"epsilon": (1e-20, 1e-2), "d": 2.0, "beta2_decay": -0.5,
                                        "convention": "keras"},
                          "Adafactor", {"epsilon_1": 1e-20, "epsilon_2": 1e-2,
                                        "clip_threshold": 2.0, "beta_2_decay": -0.5}, ""),
    "adafactor_clip_below_one": ("Adafactor", {"d": 0.3, "convention": "keras"},  # (torch: d >= 1)
                                 "Adafactor", {"clip_threshold": 0.3}, ""),
    # Keras's gradient_accumulation_steps: our Accumulate wrapper (Keras's iterations, and
    # so the bias corrections, count the applied steps)
    "adam_wd/accumulate": ("Adam", {"epsilon": 1e-7, "weight_decay": 0.1, "convention": "keras"},
                           "Adam", {"weight_decay": 0.1, "gradient_accumulation_steps": 3}, ""),
    "sgd_clipnorm/accumulate": (
        "SGD", {"momentum": 0.9, "clip_tensor_norm": 1.0, "convention": "keras"},
        "SGD", {"momentum": 0.9, "clipnorm": 1.0, "gradient_accumulation_steps": 4}, ""),
    # with accumulation Keras's EMA moves on every call, not every update (see
    # keras_accumulated_ema): another average than ours, checked against that description
    "sgd_ema/accumulate": (
        "SGD", {"momentum": 0.9, "ema_decay": 0.8, "convention": "keras"},
        "SGD", {"momentum": 0.9, "use_ema": True, "ema_momentum": 0.8,
                "gradient_accumulation_steps": 3}, ""),
}
#: the cases also run on the jitted JAX engine (the others' steps are no different there)
JIT = ("nadam/missing", "adam_ema_wd/missing", "adam_ema_overwrite",
       "adam_global_clipnorm/missing", "lamb_wd/missing", "adamax_eps", "muon",
       "adam_wd/accumulate", "adafactor_wd/missing", "sfadamw_warmup_wd/missing",
       "muon_exclude/missing", "adam_wd_exclude/missing")
#: Keras's Muon scales by ‖x‖ + 1e-7 where torch (and we) take max(‖x‖, ε) (its float32
#: ops.norm is replaced by a float64 one, see _SCRIPT)
TOLS = {"muon": 3e-7, "muon_options/missing": 3e-7, "muon_rms_rate_none": 3e-7,
        "muon_exclude/missing": 3e-7}
#: the cases also run on float32 parameters (against Keras's float64 run: ≤ 1e-4)
FLOAT32 = ("nadam/missing", "lamb_wd/missing", "adamax_eps", "adadelta_wd",
           "adafactor_wd/missing", "sfadamw_warmup_wd/missing")

# keras.optimizers.schedules.<expression> -> (ours on an optimizer whose lr is 0.1, what the
# comparison allows: Keras's CosineDecay computes its cosine in float32)
SCHEDULE_STEPS = 80
SCHEDULES: dict[str, tuple[str, float]] = {
    "ExponentialDecay(0.1, 10, 0.5)":
        ("ExponentialLR(o, gamma=0.5 ** (1 / 10))", 1e-13),
    "ExponentialDecay(0.1, 10, 0.5, staircase=True)": ("StepLR(o, step_size=10, gamma=0.5)", 0),
    "InverseTimeDecay(0.1, 10, 0.5)": ("LambdaLR(o, lambda t: 1 / (1 + 0.5 * t / 10))", 1e-15),
    "InverseTimeDecay(0.1, 10, 0.5, staircase=True)":
        ("LambdaLR(o, lambda t: 1 / (1 + 0.5 * (t // 10)))", 1e-15),
    "PolynomialDecay(0.1, 40, end_learning_rate=0.0, power=2.0)": ("PolynomialLR(o, total_iters=40, power=2.0)", 1e-15),
    "PiecewiseConstantDecay([10, 30], [0.1, 0.05, 0.01])":
        ("PiecewiseConstant(o, boundaries=[10, 30], values=[0.1, 0.05, 0.01])", 0),
    # a warm-up from 0.01 to 0.1, then the cosine down to 0.1·alpha, which stays (torch's
    # CosineAnnealingLR would rise again past T_max): WSD without a stable phase
    "CosineDecay(0.01, 40, alpha=0.2, warmup_target=0.1, warmup_steps=10)":
        ("WSD(o, 10, 0, 40, start_lr=0.01, final_lr=0.02, decay_type='cosine')", 3e-7),
    "CosineDecay(0.1, 40, alpha=0.2)":
        ("WSD(o, 0, 0, 40, final_lr=0.02, decay_type='cosine')", 3e-7),
}

_SCRIPT = r"""
import json, os
os.environ["KERAS_BACKEND"] = "jax"
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np
import keras
import mithril.utils.optimizers as mo
import mithril.utils.optimizers.engines as engines

keras.config.set_floatx("float64")
# Keras 3.15's ops.mean of float64 arrays is float32-accurate (Adafactor's RMS and factors),
# its ops.norm float32 (Muon's Newton–Schulz scaling): those run with float64 ones
import keras.src.ops as kops
keras_mean, keras_norm = kops.mean, kops.norm


def float64_mean(x, axis=None, keepdims=False):
    return jnp.mean(jnp.asarray(x), axis=axis, keepdims=keepdims)


def float64_norm(x, ord=None, axis=None, keepdims=False):
    return jnp.linalg.norm(jnp.asarray(x), ord=ord, axis=axis, keepdims=keepdims)


p0, grads = problem()
names = list(SHAPES)
out = {}
for case, (ours, our_kw, theirs, their_kw, pattern) in CASES.items():
    kops.mean = float64_mean if theirs == "Adafactor" else keras_mean
    kops.norm = float64_norm if theirs == "Muon" else keras_norm
    opt = getattr(keras.optimizers, theirs)(
        learning_rate=LR0, **{k: v for k, v in their_kw.items() if k != "exclude"})
    if "exclude" in their_kw:
        opt.exclude_from_weight_decay(var_names=their_kw["exclude"])
    vs = [keras.Variable(p0[k], dtype="float64", name=k) for k in names]
    opt.build(vs)
    keras_traj = []
    for t in range(STEPS):
        opt.learning_rate = lr_at(LR0, t)
        gone = missing(pattern, t)
        scale = their_kw.get("loss_scale_factor") or 1.0  # (the loss's gradients, scaled)
        opt.apply([None if k in gone else jnp.asarray(grads[t][k] * scale) for k in names],
                  vs)
        keras_traj.append([np.array(v.value).tolist() for v in vs])
    ema = [np.array(v.value).tolist() for v in opt._model_variables_moving_average] \
        if their_kw.get("use_ema") else None
    out[case] = {"keras": keras_traj, "ema": ema}
    if case not in JIT:
        continue
    engines.JAX_ENGINE = "jit"  # ours on the jitted JAX engine, in float64
    mine = make(ours, our_kw, their_kw)
    params = {k: jnp.asarray(v) for k, v in p0.items()}
    state = mine.init(params)
    jit_traj = []
    for t in range(STEPS):
        mine.learning_rate = lr_at(LR0, t)
        gone = missing(pattern, t)
        g = {k: jnp.asarray(grads[t][k]) for k in names if k not in gone}
        if "global_clipnorm" in their_kw:
            g = mo.clip_gradients(g, clip_norm=their_kw["global_clipnorm"], eps=0.0)
        params, state = mine.update(params, g, state)
        if (t + 1) % their_kw.get("ema_overwrite_frequency", STEPS + 1) == 0:
            params = {k: jnp.array(v) for k, v in mine.ema_params(state).items()}
        jit_traj.append([np.array(params[k]).tolist() for k in names])
    out[case]["jit"] = jit_traj
out["schedules"] = {}
for e in SCHEDULES:  # (step by step, jitted: CosineDecay's warm-up branches on the step)
    sched = jax.jit(eval("keras.optimizers.schedules." + e))
    out["schedules"][e] = [float(sched(jnp.asarray(t))) for t in range(SCHEDULE_STEPS)]
print(json.dumps(out))
"""


def reference_process() -> tuple[subprocess.Popen, Any]:
    """The subprocess computing Keras's trajectories and ours on the jitted JAX engine,
    started (its stdout a file: it never waits for a reader)."""
    code = "\n".join([
        "import json\nimport numpy as np", f"SHAPES = {SHAPES!r}\nSTEPS = {STEPS!r}\nLR0 = {LR0!r}",
        f"SCHEDULE_STEPS = {SCHEDULE_STEPS}\nSCHEDULES = {list(SCHEDULES)!r}",
        f"CASES = json.loads({json.dumps(CASES)!r})\nJIT = {JIT!r}",
        inspect.getsource(problem), inspect.getsource(missing), inspect.getsource(lr_at),
        inspect.getsource(make), _SCRIPT])
    out = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    return proc, out


def run_ours(case: str, dtype: str = "float64"):
    ours, our_kw, _, their_kw, pattern = CASES[case]
    opt = make(ours, our_kw, their_kw)
    p0, grads = problem(dtype)
    params = {k: v.copy() for k, v in p0.items()}
    state = opt.init(params)
    traj = []
    for t in range(STEPS):
        opt.learning_rate = lr_at(LR0, t)
        gone = missing(pattern, t)
        g = {k: g for k, g in grads[t].items() if k not in gone}
        if "loss_scale_factor" in their_kw:  # the recipe: the scaled loss's gradients / s
            s = their_kw["loss_scale_factor"]
            g = {k: np.asarray(v * s / s) for k, v in g.items()}
        if "global_clipnorm" in their_kw:
            g = mo.clip_gradients(g, clip_norm=their_kw["global_clipnorm"], eps=0.0)
        params, state = opt.update(params, g, state)
        if (t + 1) % their_kw.get("ema_overwrite_frequency", STEPS + 1) == 0:
            params = {k: np.array(v) for k, v in opt.ema_params(state).items()}
        traj.append([np.array(params[k], dtype=np.float64) for k in SHAPES])
    return traj, opt, state


@pytest.fixture(scope="module")
def runs() -> dict:
    """{case: (Keras's and our jitted runs, ours on NumPy)}: ours computed (numba compiles
    each kernel) while the subprocess runs Keras."""
    proc, out = reference_process()
    try:
        ours = {case: run_ours(case) for case in CASES}
        ours32 = {case: run_ours(case, "float32")[0] for case in FLOAT32}
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()  # a no-op once it has exited
    with out:
        assert proc.returncode == 0, err[-4000:]
        out.seek(0)
        refs = json.loads(out.read().strip().splitlines()[-1])
    return {**{case: (refs[case], ours[case]) for case in CASES},
            "schedules": refs["schedules"], "float32": ours32}


def worst(a: list, b: list) -> float:
    return max(rel_err(x, y) for sa, sb in zip(a, b, strict=True)
               for x, y in zip(sa, sb, strict=True))


@pytest.mark.parametrize("case", list(CASES))
def test_equals_keras_step_by_step(case: str, runs: dict) -> None:
    ref, (traj, opt, state) = runs[case]
    tol = TOLS.get(case, TOL)
    assert worst(traj, ref["keras"]) <= tol, case
    if case in JIT:
        assert worst(ref["jit"], ref["keras"]) <= tol, f"{case} (jitted JAX engine)"
    if ref["ema"] is not None:
        k = CASES[case][3].get("gradient_accumulation_steps")
        ema = [opt.ema_params(state)[n] for n in SHAPES] if k is None else \
            keras_accumulated_ema(traj, k, 0.8)
        assert max(rel_err(ema[i], e) for i, e in enumerate(ref["ema"])) <= TOL
        if k is not None:  # ours, once per update, is another average
            ours = opt.optimizer.ema_params(state.inner)
            assert max(rel_err(ours[n], e) for n, e in zip(SHAPES, ref["ema"])) > 0.1


def keras_accumulated_ema(traj: list, k: int, m: float) -> list:
    """Keras's EMA under ``gradient_accumulation_steps=k``, as docs/optimizers.md states it:
    updated after every call (``avg ← m·avg + (1−m)·p``, the parameters as they are, k − 1
    times unchanged between updates), a copy on the first k calls."""
    avg = list(traj[0])
    for t, params in enumerate(traj):
        mom = 0.0 if t < k else m
        avg = [mom * a + (1 - mom) * p for a, p in zip(avg, params)]
    return avg


@pytest.mark.parametrize("case", FLOAT32)
def test_float32_follows_keras(case: str, runs: dict) -> None:
    assert worst(runs["float32"][case], runs[case][0]["keras"]) <= 1e-4


def test_nadam_keras_product_is_one_for_the_optimizer(runs: dict) -> None:
    """Keras's Nadam keeps one μ product, advanced on every step: a tensor that missed steps
    uses the optimizer's (a per-tensor product lagged behind: ~6e-3 off Keras in 24 steps)."""
    _, (_, _, state) = runs["nadam/missing"]
    mu = [0.9 * (1 - 0.5 * 0.96**t) for t in range(1, STEPS + 1)]
    assert state.values["mu_product"] == pytest.approx(float(np.prod(mu)), rel=1e-14)


def test_keras_conventions_refuse_what_keras_lacks() -> None:
    with pytest.raises(ValueError, match="torch has no LAMB"):
        mo.LAMB(convention="torch")
    with pytest.raises(ValueError, match="eps_root"):
        mo.LAMB(eps_root=1e-8, convention="keras")
    for cls in (mo.Adamax, mo.Adadelta):
        with pytest.raises(ValueError, match="convention must be one of"):
            cls(convention="tf")



@pytest.mark.parametrize("keras_schedule", list(SCHEDULES))
def test_schedule_equals_keras(keras_schedule: str, runs: dict) -> None:
    """Our scheduler driving an optimizer, stepped after each update, gives the learning rate
    Keras's schedule gives at ``optimizer.iterations`` for that update."""
    ours, tol = SCHEDULES[keras_schedule]
    o = mo.SGD(learning_rate=0.1)
    sched = eval("ls." + ours, {"ls": ls, "o": o})
    got = []
    for _ in range(SCHEDULE_STEPS):
        got.append(o.get_learning_rate())
        sched.step()
    want = runs["schedules"][keras_schedule]
    np.testing.assert_allclose(got, want, rtol=tol, atol=1e-16)  # (XLA: 1 − 40/40 ≈ 1e-17)


def test_nadam_group_of_another_convention_is_refused() -> None:
    """Keras's one μ product and torch's per-tensor ones cannot share a state: a group that
    switches convention is refused, naming it (taken, its tensors would step with the
    optimizer's kind of product)."""
    with pytest.raises(ValueError, match=r"param_groups\[0\]: convention='torch' changes NAdam"):
        mo.NAdam(convention="keras", param_groups=[{"params": ["b"], "convention": "torch",
                                                    "decoupled_weight_decay": True}])
    with pytest.raises(ValueError, match=r"param_groups\[0\]: convention='keras' changes NAdam"):
        mo.NAdam(param_groups=[{"params": ["b"], "convention": "keras", "momentum_decay": 1.0,
                                "decoupled_weight_decay": True}])


def test_clip_gradients_eps() -> None:
    """``eps=0``: Keras's / optax's global clip, ``g·c/‖g‖`` exactly; the default keeps torch's
    1e-6; a bad eps is refused, naming it."""
    g = {"a": np.array([3.0, 0.0]), "b": np.array(4.0)}
    out = mo.clip_gradients(g, clip_norm=1.0, eps=0.0)
    np.testing.assert_allclose(out["a"], [0.6, 0.0], rtol=1e-15)
    assert float(out["b"]) == pytest.approx(0.8, rel=1e-15)
    assert float(mo.clip_gradients(g, clip_norm=1.0)["b"]) == pytest.approx(4 / (5 + 1e-6),
                                                                            rel=1e-15)
    zero = {"a": np.zeros(2)}
    np.testing.assert_array_equal(mo.clip_gradients(zero, clip_norm=1.0, eps=0.0)["a"], 0.0)
    with pytest.raises(ValueError, match="eps"):
        mo.clip_gradients(g, clip_norm=1.0, eps=-1.0)


def test_rmsprop_names_keras_rho_and_torch_alpha() -> None:
    """Keras's ``RMSprop(rho=)`` and torch's ``RMSprop(alpha=)`` are our ``decay``: the error
    says so (it pointed at Adadelta / ASGD, which take those names)."""
    for name in ("rho", "alpha"):
        with pytest.raises(TypeError, match=rf"takes decay= .*\(got {name}=0.9\)"):
            mo.RMSProp(**{name: 0.9})


@pytest.mark.parametrize(("cls", "name", "ours"), [
    ("Adafactor", "clip_threshold", "ours is d"), ("Adafactor", "epsilon_2", "epsilon=\\("),
    ("Adafactor", "relative_step", "always min"), ("Muon", "adam_beta_1", "AdamW\\(beta1="),
    ("Muon", "adam_lr_ratio", "fallback_lr_ratio"), ("Muon", "rms_rate", "match_rms_adamw"),
    ("Muon", "muon_b", "ns_coefficients")])
def test_keras_names_say_ours(cls: str, name: str, ours: str) -> None:
    """Keras's names of Adafactor's and Muon's hyperparameters are refused naming ours (the
    generic error had no hint for them)."""
    with pytest.raises(TypeError, match=rf"Keras's {name}=: .*{ours}"):
        getattr(mo, cls)(**{name: 1.0})


def test_nadam_keras_without_parameters() -> None:
    """No parameter at all: the step counts, the product stays 1 (it indexed the first
    tensor's μ: IndexError)."""
    from mithril.backends import NumpyBackend

    opt = mo.NAdam(convention="keras", backend=NumpyBackend())
    _, state = opt.update({}, {}, opt.init({}))
    assert state.step == 1 and state.values["mu_product"] == 1.0


def test_keras_options_of_muon_and_schedule_free_are_checked() -> None:
    """Keras's ScheduleFreeAdamW weights every step alike: another weight_lr_power is refused
    under its convention (0 by default there, optax's 2 otherwise); Adafactor's d is >= 1
    under torch's, > 0 under Keras's; Muon's adjust_lr_fn takes Keras's rms_rate (a number,
    "none") and refuses anything else, naming it."""
    assert mo.ScheduleFreeAdamW(convention="keras").weight_lr_power == 0.0
    assert mo.ScheduleFreeAdamW().weight_lr_power == 2.0
    with pytest.raises(ValueError, match="weight_lr_power=2.0: Keras's ScheduleFreeAdamW"):
        mo.ScheduleFreeAdamW(convention="keras", weight_lr_power=2.0)
    with pytest.raises(ValueError, match="convention must be 'optax' or 'keras'"):
        mo.ScheduleFreeAdamW(convention="torch")
    with pytest.raises(ValueError, match=r"param_groups\[0\]: convention='keras' changes"):
        mo.ScheduleFreeAdamW(param_groups=[{"params": ["b"], "convention": "keras",
                                            "weight_lr_power": 0.0}])
    with pytest.raises(ValueError, match=r"d \(the clipping threshold\) must be >= 1"):
        mo.Adafactor(d=0.3)  # (torch's rule; Keras's clip_threshold is any number > 0)
    with pytest.raises(ValueError, match=r"must be > 0, got 0.0"):
        mo.Adafactor(d=0.0, convention="keras")
    assert mo.Muon(adjust_lr_fn=0.3).adjust_lr_fn == 0.3
    with pytest.raises(ValueError, match="adjust_lr_fn must be one of .* or a number > 0"):
        mo.Muon(adjust_lr_fn="None")
    with pytest.raises(ValueError, match="adjust_lr_fn must be >= 0"):
        mo.Muon(adjust_lr_fn=-0.2)
    with pytest.raises(TypeError, match="adjust_lr_fn must be a number"):
        mo.Muon(adjust_lr_fn=True)
