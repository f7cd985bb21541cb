"""A Keras 3 user's review (session 47): ``keras.optimizers.<X>`` with non-default options and
a ``keras.optimizers.schedules.*`` learning rate, and ``LossScaleOptimizer``, side by side with
ours by the mapping of docs/optimizers.md ("From Keras 3", "From optax or Keras").

Keras runs on its NumPy backend in float64 (the other Keras tests run its JAX backend: the
optimizers' and schedules' code is Keras's own on both; NumPy's computes its cosines and
floors in float64 and takes ~0.1 s for what JAX's eager dispatch takes ~20 s) in ONE
subprocess (``KERAS_BACKEND`` is read at import), while ours run here on NumPy (the
:func:`runs` fixture). Each case compares the parameters after every step (and the EMA) in
:func:`optimizer_parity.rel_err`.

The cases are what the other Keras tests leave out: a schedule inside the optimizer (each
Keras schedule, CosineDecay's warm-up up and down included, with weight decay, EMA,
exclusions, clipping), edge hyperparameters (``beta_1=0``, Ftrl's shrinkage with ``beta``),
``global_clipnorm`` under ``gradient_accumulation_steps`` (exact with ``clip_eps=0.0``), and
``LossScaleOptimizer`` over an Adam with EMA, weight decay, clipnorm and a schedule through
skipped steps. Also: Keras spellings that are not ours (``exclude_from_weight_decay(var_list=)``,
``LossScaleOptimizer``'s ``initial_scale`` / ``dynamic_growth_steps``) get an error naming ours.
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
from mithril.errors import KeyMismatchError
from mithril.utils.accumulation import Accumulate
from mithril.utils.loss_scaler import LossScaler
from mithril.utils.mixed_precision import MixedPrecisionTrainer

SHAPES = {"w": (3, 4), "b": (4,), "s": (), "c": (2, 3, 2)}
STEPS = 20
E = 1e-7  # Keras's epsilon
KC = {"convention": "keras"}

# name -> (Keras class, Keras kwargs ("exclude": exclude_from_weight_decay(var_names=)),
#          Keras schedule or None, our class, our kwargs, our scheduler or None (on "o"),
#          learning rate, missing-gradient pattern)
CASES: dict[str, tuple[str, dict, str | None, str, dict, str | None, float, str]] = {
    # CosineDecay's linear warm-up to warmup_target, then the cosine down to alpha * target
    "adamw_cosine_warmup": (
        "AdamW", {"weight_decay": 0.02},
        "CosineDecay(0.001, 12, alpha=0.1, warmup_target=0.05, warmup_steps=5)",
        "AdamW", {"epsilon": E, "weight_decay": 0.02, **KC},
        "WSD(o, 5, 0, 12, 0.001, 0.1 * 0.05, 'cosine')", 0.05, ""),
    # a "warm-up" down from a higher initial rate
    "adamw_cosine_warmup_down": (
        "AdamW", {}, "CosineDecay(0.05, 12, alpha=0.1, warmup_target=0.01, warmup_steps=5)",
        "AdamW", {"epsilon": E, "weight_decay": 0.004, **KC},
        "WSD(o, 5, 0, 12, 0.05, 0.1 * 0.01, 'cosine')", 0.01, "some"),
    "sgd_restarts_wd": (
        "SGD", {"momentum": 0.9, "weight_decay": 0.05},
        "CosineDecayRestarts(0.1, 5, t_mul=1.5, m_mul=0.7, alpha=0.05)",
        "SGD", {"momentum": 0.9, "weight_decay": 0.05, **KC},
        "CosineDecayRestarts(o, 5, 1.5, 0.7, 0.05)", 0.1, ""),
    "rmsprop_centered_piecewise": (
        "RMSprop", {"momentum": 0.5, "centered": True},
        "PiecewiseConstantDecay([5, 12], [0.01, 0.003, 0.0005])",
        "RMSProp", {"epsilon": E, "momentum": 0.5, "centered": True, **KC},
        "PiecewiseConstant(o, boundaries=[5, 12], values=[0.01, 0.003, 0.0005])", 0.01, ""),
    "nadam_polynomial_cycle": (
        "Nadam", {"clipnorm": 1.0}, "PolynomialDecay(0.02, 7, 0.001, power=2.0, cycle=True)",
        "NAdam", {"epsilon": E, "clip_tensor_norm": 1.0, **KC},
        "PolynomialDecay(o, 7, 0.001, 2.0, cycle=True)", 0.02, "some"),
    "adagrad_inverse_time_wd": (
        "Adagrad", {"weight_decay": 0.1}, "InverseTimeDecay(0.1, 4, 0.5, staircase=True)",
        "AdaGrad", {"epsilon": E, "weight_decay": 0.1, **KC},
        "InverseTimeDecay(o, 4, 0.5, staircase=True)", 0.1, ""),
    "lion_exponential_exclude": (
        "Lion", {"weight_decay": 0.2, "beta_1": 0.8, "beta_2": 0.95, "exclude": ["b"]},
        "ExponentialDecay(0.01, 4, 0.5, staircase=True)",
        "Lion", {"weight_decay": 0.2, "beta1": 0.8, "beta2": 0.95},
        "ExponentialDecay(o, 4, 0.5, staircase=True)", 0.01, "some"),
    "adam_beta1_0_amsgrad_exclude": (
        "Adam", {"beta_1": 0.0, "amsgrad": True, "weight_decay": 0.1, "exclude": ["c"]}, None,
        "Adam", {"epsilon": E, "beta1": 0.0, "amsgrad": True, "weight_decay": 0.1, **KC},
        None, 0.01, "some"),
    "ftrl_shrinkage_beta_wd": (
        "Ftrl", {"l1_regularization_strength": 0.5, "l2_shrinkage_regularization_strength": 0.2,
                 "beta": 0.3, "weight_decay": 0.05}, None,
        "Ftrl", {"l1_regularization_strength": 0.5, "l2_shrinkage_regularization_strength": 0.2,
                 "beta": 0.3, "weight_decay": 0.05}, None, 0.1, "some"),
    "sgd_nesterov_ema_overwrite_exclude": (
        "SGD", {"momentum": 0.8, "nesterov": True, "weight_decay": 0.1, "exclude": ["^s$", "c"],
                "use_ema": True, "ema_momentum": 0.5, "ema_overwrite_frequency": 4}, None,
        "SGD", {"momentum": 0.8, "nesterov": True, "weight_decay": 0.1, "ema_decay": 0.5, **KC},
        None, 0.05, "some"),
    # Keras clips the window's mean: clip_norm on the inner optimizer, exact with clip_eps=0
    "adam_global_clipnorm_accumulate": (
        "Adam", {"global_clipnorm": 1.0, "gradient_accumulation_steps": 2}, None,
        "Adam", {"epsilon": E, "clip_norm": 1.0, "clip_eps": 0.0, **KC}, None, 0.01, ""),
    # exclude_from_weight_decay called on the optimizer that accumulates (ours: the wrapper)
    "adamw_accumulate_exclude": (
        "AdamW", {"weight_decay": 0.1, "gradient_accumulation_steps": 2, "exclude": ["b"]},
        None, "AdamW", {"epsilon": E, "weight_decay": 0.1, **KC}, None, 0.01, ""),
}
#: the cases also run in float32 on both sides (Keras's variables float32, its schedules'
#: values cast to them)
FLOAT32 = ("adamw_cosine_warmup_down", "nadam_polynomial_cycle", "lion_exponential_exclude",
           "ftrl_shrinkage_beta_wd", "sgd_nesterov_ema_overwrite_exclude")
#: Keras's LossScaleOptimizer run: scale 2**8, growth after 3 finite steps, inf / NaN at
#: these steps (in the first gradient's first entry)
LSO_BAD = {4: "inf", 5: "nan", 12: "inf", 13: "inf", 14: "inf"}
LSO_STEPS = 24


def problem(steps: int = STEPS) -> tuple[dict, list]:
    rng = np.random.default_rng(0)
    p0 = {k: np.asarray(rng.standard_normal(s)) for k, s in SHAPES.items()}
    grads = [{k: np.asarray(rng.standard_normal(s) * (1 + t % 5)) for k, s in SHAPES.items()}
             for t in range(steps)]
    return p0, grads


def missing(pattern: str, t: int) -> set[str]:
    """The tensors without a gradient at step ``t``."""
    if pattern == "some":
        return {"b"} if t % 4 == 1 else ({"s", "w"} if t % 7 == 3 else set())
    return set()


_SCRIPT = r"""
import json, os
os.environ["KERAS_BACKEND"] = "jax"
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np
import keras
from keras.src.backend.jax import numpy as keras_jnp

keras.config.set_floatx("float64")
for op in ("cos", "floor", "ceil"):  # (Keras 3 computes these of float64 in float32)
    setattr(keras_jnp, op, lambda x, f=getattr(jnp, op): f(jnp.asarray(x)))
K = keras.optimizers.schedules


def run(opt, steps, feed, dtype="float64"):
    # Keras's parameters after each step and its optimizer variables at the end (by id):
    # its stateless_apply, jitted (eager dispatch is ~100x slower); feed(t, variables) gives
    # step t's gradients (None: none for that tensor)
    vs = [keras.Variable(p0[n].astype(dtype), dtype=dtype, name=n) for n in names]
    opt.build(vs)
    ids = [id(v) for v in opt.variables]
    ov, tv = [v.value for v in opt.variables], [v.value for v in vs]
    step = jax.jit(opt.stateless_apply)
    traj = []
    for t in range(steps):
        g = feed(t, dict(zip(ids, ov)))
        tv, ov = step(ov, [None if g[n] is None else jnp.asarray(g[n], dtype) for n in names],
                      tv)
        traj.append([np.asarray(v).tolist() for v in tv])
    return traj, dict(zip(ids, ov))


p0, grads = problem()
names = list(SHAPES)
out = {}
for case, dtype in [(c, "float64") for c in CASES] + [(c, "float32") for c in FLOAT32]:
    cls, kw, sched, _, _, _, lr, pattern = CASES[case]
    kw = dict(kw)
    exclude = kw.pop("exclude", None)
    opt = getattr(keras.optimizers, cls)(learning_rate=eval("K." + sched) if sched else lr,
                                         **kw)
    if exclude:
        opt.exclude_from_weight_decay(var_names=exclude)
    traj, final = run(opt, STEPS, lambda t, _: {
        n: None if n in missing(pattern, t) else grads[t][n] for n in names}, dtype)
    ema = [np.asarray(final[id(v)]).tolist() for v in opt._model_variables_moving_average] \
        if kw.get("use_ema") else None
    out[case + ("/float32" if dtype == "float32" else "")] = {"traj": traj, "ema": ema}

# LossScaleOptimizer over Adam (EMA, weight decay, clipnorm, a schedule): the gradients of
# the scaled loss given
inner = keras.optimizers.Adam(learning_rate=K.ExponentialDecay(0.01, 3, 0.5), weight_decay=0.1,
                              use_ema=True, ema_momentum=0.8, clipnorm=0.5)
opt = keras.optimizers.LossScaleOptimizer(inner, initial_scale=2.0**8, dynamic_growth_steps=3)
lso_grads = problem(LSO_STEPS)[1]


def scaled(t, variables):  # the scaled loss's gradients, at the scale the step starts with
    g = {n: lso_grads[t][n] * float(variables[id(opt.dynamic_scale)]) for n in names}
    if t in LSO_BAD:
        g["w"][0, 0] = float(LSO_BAD[t])
    scales.append(float(variables[id(opt.dynamic_scale)]))
    return g


scales = []
traj, final = run(opt, LSO_STEPS, scaled)
scales = scales[1:] + [float(final[id(opt.dynamic_scale)])]  # (the scale after each step)
out["loss_scale"] = {"traj": traj, "scales": scales, "ema": [
    np.asarray(final[id(v)]).tolist() for v in inner._model_variables_moving_average]}
print(json.dumps(out))
"""


def reference_process() -> tuple[subprocess.Popen, Any]:
    """The subprocess computing Keras's runs, started (its stdout a file: it never waits)."""
    code = "\n".join([
        "import json\nimport numpy as np",
        f"SHAPES = {SHAPES!r}\nSTEPS = {STEPS!r}\nLSO_STEPS = {LSO_STEPS!r}",
        f"CASES = json.loads({json.dumps(CASES)!r})\nFLOAT32 = {FLOAT32!r}",
        f"LSO_BAD = {{int(k): v for k, v in {LSO_BAD!r}.items()}}",
        inspect.getsource(problem), inspect.getsource(missing), _SCRIPT])
    out = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "KERAS_BACKEND": "numpy"})
    return proc, out


def run_ours(case: str, dtype: str = "float64") -> tuple[list, Any]:
    """Our trajectory for ``case`` (and the EMA at the end, or None), in ``dtype``."""
    _, kkw, _, cls, kw, sched, lr, pattern = CASES[case]
    opt = getattr(mo, cls)(learning_rate=lr, **kw)
    k = kkw.get("gradient_accumulation_steps")
    wrapped = opt if k is None else Accumulate(opt, k)
    if "exclude" in kkw:  # (on the wrapper, as Keras's on the optimizer that accumulates)
        wrapped.exclude_from_weight_decay(var_names=kkw["exclude"])
    scheduler = eval("ls." + sched, {"ls": ls, "o": wrapped}) if sched else None
    p0, grads = problem()
    params = {n: v.astype(dtype) for n, v in p0.items()}
    state = wrapped.init(params)
    traj = []
    for t in range(STEPS):
        g = {n: v.astype(dtype) for n, v in grads[t].items() if n not in missing(pattern, t)}
        params, state = wrapped.update(params, g, state)
        if scheduler is not None:  # (Keras's schedule moves on every call)
            scheduler.step()
        if (t + 1) % kkw.get("ema_overwrite_frequency", STEPS + 1) == 0:
            params = {n: np.array(v) for n, v in opt.ema_params(state).items()}
        traj.append([np.array(params[n], np.float64) for n in SHAPES])
    ema = [np.array(opt.ema_params(state)[n], np.float64) for n in SHAPES] \
        if "ema_decay" in kw else None
    return traj, ema


def run_ours_loss_scale() -> tuple[list, list, list]:
    """Keras's LossScaleOptimizer as a loop with our LossScaler: the gradients of the scaled
    loss, divided back; a non-finite one skips the update and the scheduler step."""
    opt = mo.Adam(learning_rate=0.01, epsilon=E, weight_decay=0.1, ema_decay=0.8,
                  clip_tensor_norm=0.5, convention="keras")
    scheduler = ls.ExponentialDecay(opt, 3, 0.5)
    scaler = LossScaler(init_scale=2.0**8, growth_interval=3)
    p0, grads = problem(LSO_STEPS)
    params = {n: v.copy() for n, v in p0.items()}
    state = opt.init(params)
    traj, scales = [], []
    for t in range(LSO_STEPS):
        scaled = {n: np.asarray(grads[t][n] * scaler.scale) for n in SHAPES}
        if t in LSO_BAD:
            scaled["w"][0, 0] = float(LSO_BAD[t])
        g = {n: np.asarray(v / scaler.scale) for n, v in scaled.items()}
        found_inf = not all(np.isfinite(v).all() for v in g.values())
        if not found_inf:
            params, state = opt.update(params, g, state)
            scheduler.step()
        scaler.update(found_inf)
        traj.append([np.array(params[n]) for n in SHAPES])
        scales.append(scaler.scale)
    return traj, scales, [opt.ema_params(state)[n] for n in SHAPES]


@pytest.fixture(scope="module")
def runs() -> dict:
    """{case: (Keras's run, ours)}: ours computed while the subprocess runs Keras."""
    proc, out = reference_process()
    try:
        ours = {case: run_ours(case) for case in CASES}
        ours.update({f"{case}/float32": run_ours(case, "float32") for case in FLOAT32})
        ours["loss_scale"] = run_ours_loss_scale()
        _, err = proc.communicate(timeout=600)
    finally:
        proc.kill()  # a no-op once it has exited
    with out:
        assert proc.returncode == 0, err[-4000:]
        out.seek(0)
        refs = json.loads(out.read().strip().splitlines()[-1])
    return {case: (refs[case], ours[case]) for case in ours}


def worst(a: list, b: list) -> float:
    return max(rel_err(x, y) for sa, sb in zip(a, b, strict=True)
               for x, y in zip(sa, sb, strict=True))


@pytest.mark.parametrize("case", list(CASES))
def test_equals_keras_step_by_step(case: str, runs: dict) -> None:
    ref, (traj, ema) = runs[case]
    assert worst(traj, ref["traj"]) <= 1e-10, case
    if ref["ema"] is not None:
        assert max(rel_err(a, b) for a, b in zip(ema, ref["ema"], strict=True)) <= 1e-10


@pytest.mark.parametrize("case", FLOAT32)
def test_float32_equals_keras_float32(case: str, runs: dict) -> None:
    """Both sides in float32: float32 rounding apart (each tensor's largest difference over
    its largest magnitude, or 0.1; a formula or an order of operations off shows as >= 1e-3)."""
    ref, (traj, ema) = runs[f"{case}/float32"]
    scaled = max(float(np.max(np.abs(a - np.asarray(b)), initial=0.0))
                 / max(float(np.max(np.abs(b), initial=0.0)), 0.1)  # (Ftrl's l1: zeros)
                 for sa, sb in zip(traj, ref["traj"], strict=True)
                 for a, b in zip(sa, sb, strict=True))
    assert scaled <= 2e-5, case  # (observed: 2e-7 to 1.4e-6)


def test_loss_scale_optimizer_equals_keras(runs: dict) -> None:
    """``LossScaleOptimizer(Adam(schedule, weight_decay, use_ema, clipnorm),
    initial_scale=2**8, dynamic_growth_steps=3)`` through five non-finite steps (two in a
    row, three in a row): the scale after every step, the parameters and the EMA (which a
    skipped step leaves, as the schedule) agree with our LossScaler loop."""
    ref, (traj, scales, ema) = runs["loss_scale"]
    assert scales == ref["scales"]
    assert scales[:6] == [256.0, 256.0, 512.0, 512.0, 256.0, 128.0]
    assert worst(traj, ref["traj"]) <= 1e-10
    assert max(rel_err(a, b) for a, b in zip(ema, ref["ema"], strict=True)) <= 1e-10


def test_exclude_from_weight_decay_names_ours_for_keras_var_list() -> None:
    """Keras's ``exclude_from_weight_decay(var_list=[variables])`` is ``names=`` here: the
    error says so (it was Python's bare "unexpected keyword argument"), on a Lookahead too,
    and nothing is excluded."""
    for opt in (mo.AdamW(weight_decay=0.1), mo.Lookahead(mo.AdamW(weight_decay=0.1))):
        with pytest.raises(TypeError, match=r"Keras's var_list= .* is names= here"):
            opt.exclude_from_weight_decay(var_list=["b"])
        assert opt.exclude_weight_decay == []


def test_exclude_from_weight_decay_calls_add_up() -> None:
    """Each call adds to the exclusions (Keras's second call replaces its first's: the
    documented difference): after ``var_names=["b"]`` then ``["c"]`` neither decays, ``w``
    does (``p - lr·wd·p`` on a zero gradient: 1 - 0.1·0.5)."""
    opt = mo.SGD(learning_rate=0.1, weight_decay=0.5, convention="keras")
    opt.exclude_from_weight_decay(var_names=["b"])
    opt.exclude_from_weight_decay(var_names=["c"])
    params = {n: np.ones(2) for n in ("w", "b", "c")}
    params, _ = opt.update(params, {n: np.zeros(2) for n in params}, opt.init(params))
    assert [float(params[n][0]) for n in ("w", "b", "c")] == [0.95, 1.0, 1.0]


@pytest.mark.parametrize("cls", ["Adam", "SGD", "Ftrl", "Adafactor"])
def test_keras_name_argument_is_refused_with_a_hint(cls: str) -> None:
    """Keras's ``name=`` (every Keras optimizer takes one) is refused saying to drop it (it
    was Python's bare "unexpected keyword argument")."""
    with pytest.raises(TypeError, match=r"Keras's name=: an optimizer here has no name"):
        getattr(mo, cls)(name="adam")


def test_accumulate_refuses_a_window_with_a_missing_gradient_and_goes_on() -> None:
    """Keras takes ``None`` for a variable on a micro-batch under
    ``gradient_accumulation_steps`` (on JAX that variable's sum then outlives the window);
    ``Accumulate`` refuses a micro-batch whose keys differ from the window's, naming them,
    and the window goes on as if the call had not been made."""
    acc = Accumulate(mo.SGD(learning_rate=0.1), 2)
    params = {"w": np.zeros(2), "b": np.zeros(1)}
    state = acc.init(params)
    params, state = acc.update(params, {"w": np.array([1.0, 2.0]), "b": np.array([4.0])},
                               state)
    with pytest.raises(KeyMismatchError, match=r"keys \['b', 'w'\], got \['w'\]"):
        acc.update(params, {"w": np.array([9.0, 9.0])}, state)
    params, state = acc.update(params, {"w": np.array([3.0, 4.0]), "b": np.array([0.0])},
                               state)
    np.testing.assert_allclose(params["w"], [-0.2, -0.3], rtol=1e-15)
    np.testing.assert_allclose(params["b"], [-0.2], rtol=1e-15)


@pytest.mark.parametrize(("keras_name", "ours"), [("initial_scale", "init_scale"),
                                                 ("dynamic_growth_steps", "growth_interval")])
def test_loss_scaler_names_ours_for_keras_names(keras_name: str, ours: str) -> None:
    with pytest.raises(TypeError, match=rf"{keras_name}.*{ours}"):
        LossScaler(**{keras_name: 2})
    with pytest.raises(TypeError, match=r"'initial_scale' \(use loss_scale=\)"):
        MixedPrecisionTrainer(None, None, {}, initial_scale=2.0)  # (checked first)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'nope'$"):
        LossScaler(nope=1)
