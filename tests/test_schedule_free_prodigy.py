"""ScheduleFreeSGD, ScheduleFreeAdamW and Prodigy: exact against optax.contrib, the backends
and engines agree, state dicts and checkpoints resume bit-exactly, skipped steps change
nothing, bad arguments are named.

float64 parity: every case runs 100 steps side by side with optax
(``optax.inject_hyperparams`` around ``optax.contrib.schedule_free_sgd`` /
``schedule_free_adamw`` / ``prodigy``), from the same start and gradient sequence, with the
learning rate changed twice mid-run, on the fused numba kernel (NumPy float64) and the jitted
JAX engine (JAX float64); the parameters (and, for schedule-free, ``eval_params`` against
``schedule_free_eval_params``) are compared after every step, ``<= 1e-10`` in the measure of
:func:`rel_err` (elementwise relative, floored at 1e-3 of the tensor's largest magnitude).
The warm-up cases run optax eagerly: jitted, XLA rewrites the warm-up's ``count / steps``
as a multiplication by a rounded reciprocal and fuses a multiply-add (its learning rate then
differs by ~1e-8 relative); eagerly optax computes what its source says, which is what we
reproduce. JAX float64 needs the process-global ``jax_enable_x64``: all of it runs in ONE
fresh subprocess (:func:`reference_run`, cached), which prints the errors.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import warnings

import numpy as np
import pytest
import torch
from conftest import host, native, optimizer_engine, run_python
from float64_reference import lr_at, reference_code

from mithril.utils.checkpoint import load_checkpoint, save_checkpoint
from mithril.utils.optimizers import Adam, Prodigy, ScheduleFreeAdamW, ScheduleFreeSGD
from mithril.utils.optimizers.engines import jax_engine
from mithril.utils.optimizers.engines.kernels import reduce_kernel, update_kernel

STEPS = 100
TOL64 = 1e-10
TOL32 = 3e-6
SHAPES = {"w": (3, 4), "b": (4,), "s": (), "big": (40, 50)}

# name -> (class, kwargs, optax factory of the learning rate, run optax jitted)
CASES: dict[str, tuple[str, dict, str, bool]] = {
    "sgd": ("ScheduleFreeSGD", {"learning_rate": 0.05},
            "lambda learning_rate: optax.contrib.schedule_free_sgd(learning_rate)", True),
    "sgd_wd_warmup": (
        "ScheduleFreeSGD", {"learning_rate": 0.05, "warmup_steps": 10, "beta1": 0.8,
                            "weight_decay": 0.1, "weight_lr_power": 1.5},
        "lambda learning_rate: optax.contrib.schedule_free_sgd(learning_rate, 10, b1=0.8, "
        "weight_decay=0.1, weight_lr_power=1.5)", False),
    "adamw": ("ScheduleFreeAdamW", {"learning_rate": 0.01},
              "lambda learning_rate: optax.contrib.schedule_free_adamw(learning_rate)", True),
    "adamw_wd_warmup": (
        "ScheduleFreeAdamW", {"learning_rate": 0.01, "warmup_steps": 15, "beta1": 0.95,
                              "beta2": 0.99, "epsilon": 1e-6, "weight_decay": 0.1,
                              "weight_lr_power": 1.0},
        "lambda learning_rate: optax.contrib.schedule_free_adamw(learning_rate, 15, 0.95, 0.99, "
        "1e-6, weight_decay=0.1, weight_lr_power=1.0)", False),
    "prodigy": ("Prodigy", {"learning_rate": 1.0},
                "lambda learning_rate: optax.contrib.prodigy(learning_rate)", True),
    "prodigy_all": (
        "Prodigy", {"learning_rate": 1.0, "beta1": 0.8, "beta2": 0.99, "beta3": 0.9,
                    "epsilon": 1e-6, "estim_lr0": 1e-5, "estim_lr_coef": 1.5,
                    "weight_decay": 0.1, "safeguard_warmup": True},
        "lambda learning_rate: optax.contrib.prodigy(learning_rate, (0.8, 0.99), 0.9, 1e-6, "
        "1e-5, 1.5, 0.1, True)", True),
}
CLASSES = {c.__name__: c for c in (ScheduleFreeSGD, ScheduleFreeAdamW, Prodigy)}
#: the largest error of each check (printed after the run: conftest.py)
OBSERVED: dict[str, float] = {}


def problem(dtype: str = "float64", steps: int = STEPS, seed: int = 0):
    """Start parameters and a gradient sequence: noise plus, for the first 50 steps, a
    constant drift (so that Prodigy's distance estimate grows, then settles); "b" gets a
    zero gradient on the first two steps."""
    rng = np.random.default_rng(seed)
    p0 = {k: np.asarray(rng.standard_normal(s), dtype=dtype) for k, s in SHAPES.items()}
    drift = {k: 2 * rng.standard_normal(s) for k, s in SHAPES.items()}
    grads = [{k: np.asarray((rng.standard_normal(s) * (1 + t % 7) + drift[k] * (t < 50))
                            * (k != "b" or t >= 2), dtype=dtype) for k, s in SHAPES.items()}
             for t in range(steps)]
    return p0, grads


# ---------------------------------------------------------------------------------------------
# float64 parity with optax.contrib: one subprocess (jax_enable_x64 is process-global)
# ---------------------------------------------------------------------------------------------

_SCRIPT = r"""
import inspect, json
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import mithril.utils.optimizers.engines as engines
from mithril.utils.optimizers import Prodigy, ScheduleFreeAdamW, ScheduleFreeSGD
"""

_SCRIPT_MAIN = r"""
CLASSES = {c.__name__: c for c in (ScheduleFreeSGD, ScheduleFreeAdamW, Prodigy)}
p0, grads = problem("float64")
names = list(SHAPES)


def run_reference(kw, ref, jit):
    lr0 = kw["learning_rate"]
    tx = optax.inject_hyperparams(eval(ref))(learning_rate=lr0)

    def step(params, g, s):
        u, s = tx.update(g, s, params)
        return optax.apply_updates(params, u), s

    step = jax.jit(step) if jit else step
    params = {k: jnp.asarray(v) for k, v in p0.items()}
    s = tx.init(params)
    traj = []
    for t in range(STEPS):
        s.hyperparams["learning_rate"] = jnp.asarray(lr_at(lr0, t), dtype=jnp.float64)
        params, s = step(params, {k: jnp.asarray(v) for k, v in grads[t].items()}, s)
        x = (optax.contrib.schedule_free_eval_params(s.inner_state, params)
             if hasattr(s.inner_state, "z") else None)
        traj.append(([np.array(params[k]) for k in names],
                     None if x is None else [np.array(x[k]) for k in names]))
    assert traj[-1][0][0].dtype == np.float64
    return traj


def run_mithril(cls_name, kw, engine, values):
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
        x = opt.eval_params(state) if hasattr(opt, "eval_params") else None
        yield ([np.array(params[k]) for k in names],
               None if x is None else [np.array(x[k]) for k in names])
    assert state.step == STEPS and np.array(params["w"]).dtype == np.float64
    values.update(state.values)


out = {}
for case, (cls_name, kw, ref, jit) in CASES.items():
    traj = run_reference(kw, ref, jit)
    for engine in ("numpy", "jax-jit"):
        err = err_x = 0.0
        values = {}
        for t, (mine, x) in enumerate(run_mithril(cls_name, kw, engine, values)):
            err = max(err, *(rel_err(a, b) for a, b in zip(mine, traj[t][0])))
            if x is not None:
                err_x = max(err_x, *(rel_err(a, b) for a, b in zip(x, traj[t][1])))
        out[f"{case}/{engine}"] = err
        out[f"{case}/{engine}/values"] = values
        if traj[0][1] is not None:
            out[f"{case}/{engine}/eval_params"] = err_x


def sig(f):
    return {k: p.default for k, p in inspect.signature(f).parameters.items()
            if p.default is not inspect.Parameter.empty}

defaults = {"ScheduleFreeSGD": sig(optax.contrib.schedule_free_sgd),
            "ScheduleFreeAdamW": sig(optax.contrib.schedule_free_adamw),
            "Prodigy": sig(optax.contrib.prodigy)}
print(json.dumps({"errors": out, "defaults": defaults}, default=repr))
"""


@functools.cache
def reference_run() -> dict:
    """The float64 comparisons (and optax's defaults), in one fresh interpreter."""
    code = reference_code(_SCRIPT, _SCRIPT_MAIN, problem, STEPS, SHAPES, CASES)
    return json.loads(run_python(code, timeout=300).strip().splitlines()[-1])


# our name -> optax's
_REF_NAMES = {"beta1": "b1", "beta2": "b2", "epsilon": "eps"}


def test_float64_parity_and_defaults():
    """100 steps vs optax.contrib, two lr changes, with and without weight decay and warm-up,
    ≤ 1e-10 (params and eval_params); and the defaults are optax's. One test, so that under
    xdist the subprocess runs once."""
    res = reference_run()
    errors, defaults = res["errors"], res["defaults"]
    bad = {}
    for case in CASES:
        for engine in ("numpy", "jax-jit"):
            for key in (f"{case}/{engine}", f"{case}/{engine}/eval_params"):  # not values
                if key not in errors:
                    continue
                OBSERVED[f"f64/{key}"] = errors[key]
                if not errors[key] <= TOL64:
                    bad[key] = errors[key]
        assert f"{case}/numpy" in errors, case
        if case.startswith("prodigy"):  # the estimate grew: the steps were not negligible
            values = errors[f"{case}/numpy/values"]
            assert values["d"] > 1e3 * CASES[case][1].get("estim_lr0", 1e-6), values
    assert sum("eval_params" in k for k in errors) == 2 * 4  # every schedule-free case
    assert not bad, bad
    for cls in CLASSES.values():
        ref = dict(defaults[cls.__name__])
        if "betas" in ref:  # Prodigy's (beta1, beta2) pair
            ref["b1"], ref["b2"] = ref.pop("betas")
        ours = {k: p.default for k, p in inspect.signature(cls).parameters.items()
                if p.default is not inspect.Parameter.empty}
        checked = 0
        for name, value in ours.items():
            theirs = _REF_NAMES.get(name, name)
            if theirs in ref:
                want = 0.0 if ref[theirs] is None and name == "weight_decay" else ref[theirs]
                assert value == want, (cls.__name__, name, value, want)
                checked += 1
        assert checked >= 5, (cls.__name__, checked)


# ---------------------------------------------------------------------------------------------
# float32: the backends and engines agree
# ---------------------------------------------------------------------------------------------

F32_CASES = ["sgd_wd_warmup", "adamw_wd_warmup", "prodigy_all"]
F32_STEPS = 30
F32_LR = {10: 0.5}


def run32(case: str, backend: str, steps: int = F32_STEPS, stop_at: int | None = None):
    """Final float32 params and eval params of ``case`` on ``backend``, and the state; with
    ``stop_at``, the optimizer and state are rebuilt from a state_dict after that many steps
    (and the params copied)."""
    cls_name, kw, _, _ = CASES[case]
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
                assert state.step == stop_at and state.values == d["values"]
            g = {k: native(backend, v) for k, v in grads[t].items()}
            params, state = opt.update(params, g, state)
        x = opt.eval_params(state) if hasattr(opt, "eval_params") else params
        return ({k: host(v) for k, v in params.items()}, {k: host(v) for k, v in x.items()},
                state)


@pytest.mark.parametrize("case", F32_CASES)
def test_float32_backends_agree(case):
    runs = {b: run32(case, b) for b in ("numpy", "torch", "jax", "jax-jit", "array-torch")}
    for k in SHAPES:
        for i in (0, 1):  # params, eval params
            mine = runs["numpy"][i][k]
            assert mine.dtype == np.float32
            # NumPy, torch and JAX on CPU run the same fused kernel: identical bits
            np.testing.assert_array_equal(mine, runs["torch"][i][k])
            np.testing.assert_array_equal(mine, runs["jax"][i][k])
            for other in ("jax-jit", "array-torch"):
                y = runs[other][i][k]
                assert y.dtype == np.float32
                err = float(np.max(np.abs(mine - y)) / np.max(np.abs(mine)))
                label = f"f32/{case}/numpy-{other}"
                OBSERVED[label] = max(err, OBSERVED.get(label, 0.0))
                assert err <= TOL32, (case, other, k, err)
    for b in runs:  # the optimizer-wide values: float64 on every engine, nearly equal
        for name, v in runs[b][2].values.items():
            assert v == pytest.approx(runs["numpy"][2].values[name], rel=1e-5), (b, name)


# ---------------------------------------------------------------------------------------------
# state dicts and checkpoints resume bit-exactly; skipped steps change nothing
# ---------------------------------------------------------------------------------------------

def _snapshot(state) -> tuple[dict, dict]:
    return ({s: {k: host(v) for k, v in state.slot(s).items()} for s in state.slots},
            dict(state.values))


@pytest.mark.parametrize("case", F32_CASES)
def test_state_dict_round_trip_resumes_bit_exactly(case):
    whole, x1, s1 = run32(case, "numpy", steps=20)
    resumed, x2, s2 = run32(case, "numpy", steps=20, stop_at=11)
    assert s1.step == s2.step == 20
    for k in SHAPES:
        np.testing.assert_array_equal(whole[k], resumed[k])
        np.testing.assert_array_equal(x1[k], x2[k])
    (slots1, values1), (slots2, values2) = _snapshot(s1), _snapshot(s2)
    assert values1 == values2 and set(values1) == set(CLASSES[CASES[case][0]].state_values)
    for slot in slots1:
        for k in SHAPES:
            np.testing.assert_array_equal(slots1[slot][k], slots2[slot][k])


@pytest.mark.parametrize("case", ["sgd_wd_warmup", "adamw_wd_warmup", "prodigy_all"])
def test_checkpoint_resumes_bit_exactly(case, tmp_path):
    cls_name, kw, _, _ = CASES[case]
    cls = CLASSES[cls_name]
    p0, grads = problem("float32", 16)

    def run(opt, params, state, a, b):
        for t in range(a, b):
            opt.set_learning_rate(lr_at(kw["learning_rate"], t * 5))
            params, state = opt.update(params, grads[t], state)
        return params, state

    opt = cls(**kw)
    params = {k: v.copy() for k, v in p0.items()}
    whole, s_whole = run(opt, params, opt.init(params), 0, 16)
    x_whole = {k: v.copy() for k, v in getattr(opt, "eval_params", lambda s: {})(s_whole).items()}

    opt = cls(**kw)
    params = {k: v.copy() for k, v in p0.items()}
    params, state = run(opt, params, opt.init(params), 0, 9)
    x_then = getattr(opt, "eval_params", lambda s: {})(state)
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, params, opt, state)

    opt2 = cls()  # defaults, replaced by the checkpoint's
    ck = load_checkpoint(path, params_template=p0, optimizer=opt2)
    assert opt2.hyperparameters() == opt.hyperparameters()
    assert ck["state"].values == state.values and ck["state"].step == 9
    if hasattr(opt2, "eval_params"):  # a restored state needs the params to derive x
        with pytest.raises(ValueError, match="pass them"):
            opt2.eval_params(ck["state"])
        again = opt2.eval_params(ck["state"], ck["params"])
        for k in SHAPES:
            np.testing.assert_array_equal(again[k], x_then[k])
    resumed, s_res = run(opt2, ck["params"], ck["state"], 9, 16)
    for k in SHAPES:
        np.testing.assert_array_equal(whole[k], resumed[k])
    assert s_res.values == s_whole.values
    if hasattr(opt2, "eval_params"):
        x_res = opt2.eval_params(s_res)
        for k in SHAPES:
            np.testing.assert_array_equal(x_whole[k], x_res[k])


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax-jit", "array-numpy"])
@pytest.mark.parametrize("case", ["sgd_wd_warmup", "adamw_wd_warmup", "prodigy_all"])
def test_skip_leaves_params_slots_and_values_unchanged(case, backend):
    """A NaN gradient under nonfinite="skip": params, every slot and state.values as they
    were, the step not counted; the run then continues as if it had never happened."""
    cls_name, kw, _, _ = CASES[case]
    p0, grads = problem("float32", 6)
    with optimizer_engine(backend):
        def fresh():
            opt = CLASSES[cls_name](**kw, nonfinite="skip")
            params = {k: native(backend, v) for k, v in p0.items()}
            return opt, params, opt.init(params)

        opt, params, state = fresh()
        for t in range(3):
            params, state = opt.update(params, {k: native(backend, v)
                                                for k, v in grads[t].items()}, state)
        before_p = {k: host(v) for k, v in params.items()}
        before_slots, before_values = _snapshot(state)
        bad = {k: v.copy() for k, v in grads[3].items()}
        bad["w"][1, 2] = np.nan
        with pytest.warns(RuntimeWarning, match="skipped"):
            params, state = opt.update(params, {k: native(backend, v) for k, v in bad.items()},
                                       state)
        assert state.last_step_skipped and state.num_skipped == 1 and state.step == 3
        for k in SHAPES:
            np.testing.assert_array_equal(host(params[k]), before_p[k])
        slots, values = _snapshot(state)
        assert values == before_values
        for s in slots:
            for k in SHAPES:
                np.testing.assert_array_equal(slots[s][k], before_slots[s][k])
        for t in range(3, 6):
            params, state = opt.update(params, {k: native(backend, v)
                                                for k, v in grads[t].items()}, state)
        opt2, p2, s2 = fresh()
        for t in range(6):
            p2, s2 = opt2.update(p2, {k: native(backend, v) for k, v in grads[t].items()}, s2)
        for k in SHAPES:
            np.testing.assert_array_equal(host(params[k]), host(p2[k]))
        assert state.values == s2.values


# ---------------------------------------------------------------------------------------------
# init, eval_params, recompilation, arguments
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls, slot", [(ScheduleFreeSGD, "z"), (ScheduleFreeAdamW, "z"),
                                       (Prodigy, "x0")])
def test_init_copies_params_into_the_slot(cls, slot):
    p0, grads = problem("float32", 2)
    params = {k: v.copy() for k, v in p0.items()}
    opt = cls()
    state = opt.init(params)
    for k in SHAPES:
        np.testing.assert_array_equal(params[k], p0[k])  # not modified
        np.testing.assert_array_equal(state.slot(slot)[k], p0[k])
    params["w"][...] = 7.0  # a copy, not the caller's arrays
    assert not np.any(state.slot(slot)["w"] == 7.0)
    init = {"weight_sum": 0.0, "max_lr": 0.0} if cls is not Prodigy else {
        "d": 1e-6, "numerator": 0.0}
    assert state.values == init
    if hasattr(opt, "eval_params"):  # before any step, x is the start
        x = opt.eval_params(state)
        for k in SHAPES:
            np.testing.assert_array_equal(x[k], p0[k])
    with pytest.raises(TypeError, match="dict"):  # a refused init keeps no inferred backend
        cls().init([1.0])
    fresh = cls()
    with pytest.raises(TypeError):
        fresh.init({"a": np.ones(2, np.float32), "b": torch.ones(2)})
    assert fresh._backend is None


def test_eval_params():
    p0, grads = problem("float32", 3)
    sgd, adamw = ScheduleFreeSGD(0.1, beta1=0.8), ScheduleFreeAdamW(0.1)
    params = {k: v.copy() for k, v in p0.items()}
    state = sgd.init(params)
    for g in grads:
        params, state = sgd.update(params, g, state)
    x = sgd.eval_params(state)
    z = state.slot("z")
    for k in SHAPES:  # x = (y - (1 - b1) z) / b1, new arrays
        np.testing.assert_array_equal(x[k], (params[k] - (1.0 - 0.8) * z[k]) / 0.8)
        assert not np.shares_memory(x[k], params[k])
    given = sgd.eval_params(state, {k: v.copy() for k, v in params.items()})
    for k in SHAPES:
        np.testing.assert_array_equal(given[k], x[k])
    with pytest.raises(ValueError, match="ScheduleFreeSGD, not by this ScheduleFreeAdamW"):
        adamw.eval_params(state)
    adam = Adam(0.1)
    with pytest.raises(ValueError, match="made by Adam"):
        sgd.eval_params(adam.init(p0))
    with pytest.raises(TypeError, match="state must be"):
        sgd.eval_params({"z": 1})
    with pytest.raises(ValueError, match="made by Prodigy"):
        sgd.eval_params(Prodigy().init(p0))
    assert not hasattr(Prodigy(), "eval_params")
    with pytest.raises(KeyError):
        sgd.eval_params(state, {"w": params["w"]})
    with pytest.raises(Exception, match="shape"):
        sgd.eval_params(state, {**params, "w": np.ones(3)})
    # torch and JAX give their own arrays
    for backend in ("torch", "jax"):
        opt = ScheduleFreeSGD(0.1)
        ps = {k: native(backend, v.astype(np.float32)) for k, v in p0.items()}
        st = opt.init(ps)
        ps, st = opt.update(ps, {k: native(backend, v.astype(np.float32))
                                 for k, v in grads[0].items()}, st)
        out = opt.eval_params(st)
        assert type(out["w"]).__module__.split(".")[0] in ("torch", "jax", "jaxlib")
        assert tuple(out["w"].shape) == SHAPES["w"]


#: on the jitted JAX engine, the settings that switch a branch of the scalars traced into its
#: program (None → a number, a bool): one program more, once (the key holds them)
BRANCHES = {"warmup_steps", "beta3", "safeguard_warmup"}


def test_hyperparameter_changes_never_recompile():
    """Numeric settings are arguments: changing one compiles nothing (the numba kernels,
    the jitted programs); on the jitted engine, a branch's setting compiles one program."""
    p0, grads = problem("float32", 8)
    for kind in ("numpy", "jax-jit"):
        with optimizer_engine(kind):
            for cls, changes in ((ScheduleFreeAdamW, {"beta1": 0.7, "weight_lr_power": 1.0,
                                                      "warmup_steps": 3, "weight_decay": 0.2}),
                                 (Prodigy, {"beta3": 0.5, "estim_lr_coef": 3.0,
                                            "safeguard_warmup": True, "epsilon": 1e-4})):
                opt = cls(0.01)
                params = {k: native(kind, v) for k, v in p0.items()}
                state = opt.init(params)
                gs = [{k: native(kind, v) for k, v in g.items()} for g in grads]
                params, state = opt.update(params, gs[0], state)
                counts = (update_kernel.cache_info().misses, reduce_kernel.cache_info().misses,
                          len(jax_engine._COMPILED))
                more = 0
                for t, (name, value) in enumerate(changes.items()):
                    opt.set_learning_rate(0.01 * (t + 2))
                    setattr(opt, name, value)
                    params, state = opt.update(params, gs[t + 1], state)
                    more += kind == "jax-jit" and name in BRANCHES  # (compiled at most:
                    # _COMPILED is shared, an earlier test may have made that program)
                    assert (update_kernel.cache_info().misses,
                            reduce_kernel.cache_info().misses) == counts[:2], (kind, name)
                    assert counts[2] <= len(jax_engine._COMPILED) <= counts[2] + more, (
                        kind, cls.__name__, name)
                assert np.isfinite(host(params["w"])).all()


def test_missing_gradients_and_groups_run():
    """A parameter without a gradient is left alone (slots too); parameter groups give each
    tensor its own lr."""
    p0, grads = problem("float32", 3)
    for cls in CLASSES.values():
        opt = cls(0.01, param_groups=[{"params": ["big"], "learning_rate": 0.001}])
        params = {k: v.copy() for k, v in p0.items()}
        state = opt.init(params)
        params, state = opt.update(params, grads[0], state)
        before = {s: np.array(state.slot(s)["b"]) for s in state.slots}
        b = params["b"].copy()
        params, state = opt.update(params, {k: v for k, v in grads[1].items() if k != "b"},
                                   state)
        np.testing.assert_array_equal(params["b"], b)
        for s in state.slots:
            np.testing.assert_array_equal(state.slot(s)["b"], before[s])
        assert all(np.isfinite(v).all() for v in params.values())


def test_optax_transformations_start_from_the_params():
    """z (schedule-free) and x0 (Prodigy) start as the params in the transformation's state
    too (its numbers are checked in tests/test_interop_optax_more.py)."""
    import jax.numpy as jnp

    from mithril.interop import optax_transformation

    params = {"w": jnp.arange(3.0)}
    for cls in CLASSES.values():
        state = optax_transformation(cls()).init(params)
        slot = "z" if "ScheduleFree" in cls.__name__ else "x0"
        assert jnp.array_equal(state.slots[slot]["w"], params["w"]), cls.__name__


BAD = [
    (ScheduleFreeSGD, {"beta1": 0.0}, ValueError, "beta1"),
    (ScheduleFreeSGD, {"beta1": 1.5}, ValueError, "beta1"),
    (ScheduleFreeSGD, {"warmup_steps": -1}, ValueError, "warmup_steps"),
    (ScheduleFreeSGD, {"warmup_steps": 2.5}, TypeError, "warmup_steps"),
    (ScheduleFreeSGD, {"weight_lr_power": float("nan")}, ValueError, "weight_lr_power"),
    (ScheduleFreeSGD, {"weight_lr_power": "2"}, TypeError, "weight_lr_power"),
    (ScheduleFreeSGD, {"weight_decay": -0.1}, ValueError, "weight_decay"),
    (ScheduleFreeSGD, {"learning_rate": -1.0}, ValueError, "learning_rate"),
    (ScheduleFreeAdamW, {"beta2": 1.0}, ValueError, "beta2"),
    (ScheduleFreeAdamW, {"epsilon": -1e-8}, ValueError, "epsilon"),
    (ScheduleFreeAdamW, {"beta1": None}, TypeError, "beta1"),
    (Prodigy, {"estim_lr0": 0.0}, ValueError, "estim_lr0"),
    (Prodigy, {"estim_lr_coef": -1.0}, ValueError, "estim_lr_coef"),
    (Prodigy, {"beta3": 1.0}, ValueError, "beta3"),
    (Prodigy, {"beta1": float("inf")}, ValueError, "beta1"),
    (Prodigy, {"safeguard_warmup": "yes"}, TypeError, "safeguard_warmup"),
    (Prodigy, {"epsilon": "x"}, TypeError, "epsilon"),
]


@pytest.mark.parametrize("cls, kw, exc, name", BAD,
                         ids=[f"{c.__name__}-{next(iter(k))}" for c, k, _, _ in BAD])
def test_bad_hyperparameters_name_the_argument(cls, kw, exc, name):
    with pytest.raises(exc, match=name):
        cls(**kw)


def test_aliases_and_hyperparameters_round_trip():
    assert ScheduleFreeSGD(lr=0.3).learning_rate == 0.3
    assert ScheduleFreeAdamW(eps=1e-5).epsilon == 1e-5
    assert Prodigy(eps=1e-6).epsilon == 1e-6
    with pytest.raises(TypeError):
        Prodigy(betas=(0.9, 0.99))  # ours are beta1, beta2
    for cls in CLASSES.values():
        o = cls()
        assert type(o)(**o.hyperparameters()).hyperparameters() == o.hyperparameters()
        assert "_d" not in o.hyperparameters()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a zero learning rate so far: weight 0/0 is 0, quietly
        opt = ScheduleFreeSGD(0.0)
        p = {"w": np.ones(2, np.float32)}
        s = opt.init(p)
        p, s = opt.update(p, {"w": np.ones(2, np.float32)}, s)
        assert s.values == {"weight_sum": 0.0, "max_lr": 0.0}
        np.testing.assert_array_equal(p["w"], np.ones(2, np.float32))
