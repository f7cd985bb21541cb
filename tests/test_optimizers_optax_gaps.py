"""The optimizers that filled gaps against optax's catalog: SM3 (optax.sm3 /
scale_by_sm3), AcProp (optax.contrib.acprop), DAdaptAdamW (optax.contrib.dadapt_adamw),
NoisySGD (optax.noisy_sgd, with our noise injected into optax's: see ``OurNoise``), MADGRAD
(optax.contrib.madgrad, its float32 √t made float64: see ``Float64Sqrt``).

float64 parity: each case runs 25 steps side by side with optax (jitted), from the same start
and gradients, under a piecewise-constant learning-rate schedule (optax: the schedule as the
``learning_rate``; ours: ``set_learning_rate`` before each step), with weight decay, masks,
parameter groups (optax: ``multi_transform``) where the optimizer has them, on four paths:
the fused numba kernel (NumPy), torch float64, the jitted JAX engine, and
``mithril.interop.optax_transformation(opt, learning_rate=schedule)``; parameters are
compared after every step, to 1e-12 (relative, floored at 1e-3 of the tensor's scale). JAX
float64 needs the process-global ``jax_enable_x64``: it runs in one fresh interpreter.
The defaults are optax's. ``make_train_step`` runs each (tests/test_train_step_fn.py).
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
from conftest import run_python

from mithril.utils.optimizers import MADGRAD, SM3, AcProp, DAdaptAdamW, NoisySGD

TOL = 1e-12

_SCRIPT = r"""
import inspect, json
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib as oc
import torch
import mithril.utils.optimizers.engines as engines
from mithril.interop import optax_transformation
from mithril.utils.optimizers import MADGRAD, SM3, AcProp, DAdaptAdamW, NoisySGD
from mithril.utils.optimizers.noisy_sgd import gaussian_noise
from mithril.utils.optimizers.tensorwise import NumpyOps

STEPS = 25
SHAPES = {"w": (3, 4), "b": (4,), "c": (2, 3, 2), "s": ()}
rng = np.random.default_rng(0)
P0 = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
# "b" gets a zero gradient on the first two steps (SM3's zero accumulator, AcProp's first v)
GRADS = [{k: rng.standard_normal(s) * (1 + t % 5) * (k != "b" or t >= 2)
          for k, s in SHAPES.items()} for t in range(STEPS)]
FACTORS = {10: 0.5, 18: 4.0}


class Float64Sqrt:
    # optax.contrib.madgrad's λ = (lr + ε)·jnp.sqrt(count + 1) takes the root of its int32
    # count in float32 even under x64 (~3e-8 relative off in float64 runs); its module is
    # given a jnp whose sqrt of an integer is float64, the rest untouched
    def __getattr__(self, name):
        return getattr(jnp, name)

    def sqrt(self, x):
        x = jnp.asarray(x)
        return jnp.sqrt(x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.integer) else x)


import optax.contrib._madgrad  # noqa: E402
optax.contrib._madgrad.jnp = Float64Sqrt()  # optax.piecewise_constant_schedule's scales at these counts


def sched(lr0):
    return optax.piecewise_constant_schedule(lr0, FACTORS)


def lr_at(lr0, t):
    return float(sched(lr0)(t))


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    floor = 1e-3 * max(float(np.max(np.abs(b), initial=0.0)), 1e-300)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), floor), initial=0.0))


def no_b(n):
    return n != "b"


LABELS = {"w": "main", "b": "half", "c": "main", "s": "main"}  # (multi_transform's)
CASES = {
    "sm3": (lambda: SM3(0.1), lambda: optax.chain(
        optax.scale_by_sm3(0.9), optax.scale_by_learning_rate(sched(0.1)))),
    "sm3_b2_wd": (lambda: SM3(0.05, momentum=0.5, beta2=0.9, epsilon=1e-6, weight_decay=0.01),
                  lambda: optax.chain(optax.add_decayed_weights(0.01),
                                      optax.scale_by_sm3(0.5, 0.9, 1e-6),
                                      optax.scale_by_learning_rate(sched(0.05)))),
    "acprop": (lambda: AcProp(0.01), lambda: oc.acprop(sched(0.01))),
    "acprop_wd_mask": (
        lambda: AcProp(0.02, beta1=0.8, beta2=0.99, epsilon=1e-8, eps_root=1e-12,
                       weight_decay=0.1, weight_decay_mask=no_b),
        lambda: oc.acprop(sched(0.02), b1=0.8, b2=0.99, eps=1e-8, eps_root=1e-12,
                          weight_decay=0.1, mask={k: k != "b" for k in SHAPES})),
    "acprop_groups": (
        lambda: AcProp(0.02, param_groups=[{"params": ["b"], "lr_scale": 0.5}]),
        lambda: optax.multi_transform({"main": oc.acprop(sched(0.02)),
                                       "half": oc.acprop(sched(0.01))}, LABELS)),
    "dadapt": (lambda: DAdaptAdamW(estim_lr0=1e-3),
               lambda: oc.dadapt_adamw(sched(1.0), estim_lr0=1e-3)),
    "dadapt_wd": (lambda: DAdaptAdamW(0.5, beta1=0.8, beta2=0.99, epsilon=1e-6,
                                      estim_lr0=1e-2, weight_decay=0.1),
                  lambda: oc.dadapt_adamw(sched(0.5), betas=(0.8, 0.99), eps=1e-6,
                                          estim_lr0=1e-2, weight_decay=0.1)),
    "noisy_sgd": (lambda: NoisySGD(0.1, eta=0.3), lambda: optax.noisy_sgd(sched(0.1), eta=0.3)),
    "noisy_sgd_wd": (lambda: NoisySGD(0.05, eta=0.1, gamma=0.3, seed=7, weight_decay=0.01),
                     lambda: optax.chain(optax.add_decayed_weights(0.01), optax.noisy_sgd(
                         sched(0.05), eta=0.1, gamma=0.3))),
    "madgrad": (lambda: MADGRAD(0.05), lambda: oc.madgrad(sched(0.05))),
    "madgrad_wd": (lambda: MADGRAD(0.02, momentum=0.5, epsilon=1e-4, weight_decay=0.1),
                   lambda: oc.madgrad(sched(0.02), momentum=0.5, eps=1e-4, weight_decay=0.1)),
}
SEEDS = {"noisy_sgd": 0, "noisy_sgd_wd": 7}


class OurNoise:
    # optax.tree.random_like as optax.add_noise calls it, drawing our counter-based noise
    # (the seed's, step t at its t-th call) in place of jax.random's: optax.noisy_sgd's own
    # σ_t, order and scaling then apply to the very noise ours adds

    def __init__(self, seed):
        self.seed, self.t = seed, 0

    def __call__(self, rng_key, target_tree, sampler=None, dtype=None):
        self.t += 1
        return {k: jnp.asarray(gaussian_noise(NumpyOps(), v.shape, self.seed, k, self.t,
                                              np.float64)) for k, v in target_tree.items()}


def reference(make_tx, keys, seed=None):
    tx = make_tx()

    def step(params, g, s):
        u, s = tx.update(g, s, params)
        return optax.apply_updates(params, u), s

    if seed is None:
        step = jax.jit(step)
    else:  # optax.noisy_sgd, op by op, with our noise
        optax.tree.random_like = OurNoise(seed)

    params = {k: jnp.asarray(P0[k]) for k in keys}
    s = tx.init(params)
    out = []
    for g in GRADS:
        params, s = step(params, {k: jnp.asarray(g[k]) for k in keys}, s)
        out.append({k: np.array(v) for k, v in params.items()})
    return out


def ours(make, path, keys):
    opt = make()
    lr0 = opt.learning_rate
    if path == "optax_transformation":
        tx = optax_transformation(opt, learning_rate=sched(lr0))
        yield from reference(lambda: tx, keys)
        return
    engines.JAX_ENGINE = "jit" if path == "jax-jit" else "auto"
    conv = {"numpy": np.array, "torch": torch.tensor, "jax-jit": jnp.asarray}[path]
    params = {k: conv(P0[k]) for k in keys}
    state = opt.init(params)
    for t, g in enumerate(GRADS):
        opt.set_learning_rate(lr_at(lr0, t))
        params, state = opt.update(params, {k: conv(g[k]) for k in keys}, state)
        got = {k: np.array(v) for k, v in params.items()}
        assert all(v.dtype == np.float64 for v in got.values())
        yield got
    assert state.step == STEPS


errors = {}
for case, (make, make_tx) in CASES.items():
    if case not in ONLY:
        continue
    # optax's scale_by_sm3 fails on a 0-d parameter (IndexError: no axis); ours treats it
    # as a vector's element (tested below, in-process)
    keys = [k for k in SHAPES if k != "s" or not case.startswith("sm3")]
    want = reference(make_tx, keys, SEEDS.get(case))
    assert np.max(np.abs(want[-1]["w"] - P0["w"])) > 1e-3, case  # it moved
    for path in ("numpy", "torch", "jax-jit", "optax_transformation"):
        errors[f"{case}/{path}"] = max(rel_err(got[k], want[t][k])
                                       for t, got in enumerate(ours(make, path, keys))
                                       for k in keys)


def sig(f):
    return {k: repr(p.default) for k, p in inspect.signature(f).parameters.items()
            if p.default is not inspect.Parameter.empty}


defaults = {"SM3": {**sig(optax.scale_by_sm3), **sig(optax.sm3)},
            "AcProp": sig(oc.acprop), "DAdaptAdamW": sig(oc.dadapt_adamw),
            "NoisySGD": sig(optax.noisy_sgd), "MADGRAD": sig(oc.madgrad)}
print(json.dumps({"errors": errors, "defaults": defaults}))
"""


#: the default suite's cases: one per optimizer, with its options (decay, mask, momentum)
QUICK = ("sm3_b2_wd", "acprop_wd_mask", "dadapt_wd", "noisy_sgd_wd", "madgrad_wd")
#: the slow suite's: the defaults, the groups (one interpreter start: ~20 s of imports)
REST = ("sm3", "acprop", "acprop_groups", "dadapt", "noisy_sgd", "madgrad")


@functools.cache
def reference_run(cases: tuple[str, ...]) -> dict:
    code = f"ONLY = {list(cases)!r}\n" + _SCRIPT
    return json.loads(run_python(code, timeout=600).strip().splitlines()[-1])


def _check_parity(cases: tuple[str, ...]) -> None:
    errors = reference_run(cases)["errors"]
    assert sorted(errors) == sorted(f"{c}/{p}" for c in cases for p in (
        "numpy", "torch", "jax-jit", "optax_transformation"))
    bad = {k: e for k, e in errors.items() if not e <= TOL}
    assert not bad, bad


def test_float64_parity_with_optax():
    """25 steps under a schedule, four paths, each ≤ 1e-12 from optax: one case of each."""
    _check_parity(QUICK)


@pytest.mark.slow
def test_float64_parity_with_optax_more_cases():
    """The defaults and the parameter groups (optax: multi_transform), as above."""
    _check_parity(REST)


# our name -> optax's
_OPTAX_NAMES = {"beta1": "b1", "beta2": "b2", "epsilon": "eps", "estim_lr0": "estim_lr0"}


@pytest.mark.parametrize("cls", [SM3, AcProp, DAdaptAdamW, NoisySGD, MADGRAD])
def test_defaults_are_optax(cls):
    import inspect

    ref = reference_run(QUICK)["defaults"][cls.__name__]
    ours = {k: p.default for k, p in inspect.signature(cls).parameters.items()
            if p.default is not inspect.Parameter.empty}
    if cls is DAdaptAdamW:  # optax's betas tuple
        assert eval(ref["betas"]) == (ours["beta1"], ours["beta2"])
        assert float(ref["learning_rate"]) == ours["learning_rate"]
    if cls is SM3:
        assert float(ref["momentum"]) == ours["momentum"]
    if cls is NoisySGD:  # optax's key=None is key 0 (with a warning); its seed= is deprecated
        assert ref["key"] == "None" and ours.pop("seed") == 0
    checked = 0
    for name, value in ours.items():
        theirs = _OPTAX_NAMES.get(name, name)
        if theirs in ref and name != "learning_rate":
            assert float(eval(ref[theirs])) == value, (cls.__name__, name)
            checked += 1
    assert checked >= 2


def _problem(dtype="float32"):
    rng = np.random.default_rng(1)
    shapes = {"w": (3, 4), "b": (4,), "c": (2, 3, 2)}
    p0 = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
    grads = [{k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
             for _ in range(8)]
    return p0, grads


@pytest.mark.parametrize("make", [lambda: SM3(0.1, weight_decay=0.01), lambda: AcProp(1e-2),
                                  lambda: DAdaptAdamW(estim_lr0=1e-3),
                                  lambda: MADGRAD(0.05, weight_decay=0.01)])
def test_float32_numpy_torch_agree_and_state_dict_resumes(make):
    """float32: NumPy and torch agree to rounding; a state_dict round trip mid-run resumes
    exactly."""
    import torch

    p0, grads = _problem()
    runs = []
    for conv in (np.array, torch.tensor):
        opt = make()
        params = {k: conv(v.copy()) for k, v in p0.items()}
        state = opt.init(params)
        for g in grads:
            params, state = opt.update(params, {k: conv(v) for k, v in g.items()}, state)
        runs.append({k: np.array(v.numpy() if conv is torch.tensor else v)
                     for k, v in params.items()})
    for k in p0:
        np.testing.assert_allclose(runs[1][k], runs[0][k], rtol=1e-5, atol=1e-6, err_msg=k)
    # resume from a state_dict after 4 steps: the same as running through
    opt = make()
    params = {k: v.copy() for k, v in p0.items()}
    state = opt.init(params)
    for g in grads[:4]:
        params, state = opt.update(params, g, state)
    saved = opt.state_dict(state)
    params = {k: np.array(v) for k, v in params.items()}
    opt2 = make()
    state2 = opt2.load_state_dict(saved, params)
    for g in grads[4:]:
        params, state2 = opt2.update(params, g, state2)
    for k in p0:
        np.testing.assert_array_equal(np.array(params[k]), runs[0][k], err_msg=k)


@pytest.mark.parametrize("cls,kw,what", [
    (SM3, {"momentum": 1.0}, "momentum"), (SM3, {"beta2": 1.5}, "beta2"),
    (SM3, {"epsilon": -1.0}, "epsilon"), (AcProp, {"beta1": 1.0}, "beta1"),
    (AcProp, {"epsilon": 0.0}, "epsilon"), (AcProp, {"eps_root": -1e-8}, "eps_root"),
    (DAdaptAdamW, {"estim_lr0": 0.0}, "estim_lr0"), (DAdaptAdamW, {"beta2": 1.0}, "beta2"),
    (MADGRAD, {"momentum": 1.0}, "momentum"), (MADGRAD, {"epsilon": -1e-6}, "epsilon")])
def test_bad_hyperparameters_name_the_argument(cls, kw, what):
    with pytest.raises(ValueError, match=what):
        cls(**kw)


def test_sm3_slots_are_per_axis():
    """A rank-r ≥ 2 tensor keeps Σ shape accumulators (the memory saving), a vector its own."""
    p0, grads = _problem("float64")
    opt = SM3(0.1)
    state = opt.init(p0)
    mu = state.slot_layout("mu")
    assert dict(zip(mu.names, mu.shapes)) == {"w": (7,), "b": (4,), "c": (7,)}
    params, state = opt.update(p0, grads[0], state)
    acc = grads[0]["w"] ** 2  # first step: μ = max of g² over the other axis
    got = state.slot_layout("mu").unflatten(state.slots["mu"])["w"]
    np.testing.assert_allclose(got, np.concatenate([acc.max(1), acc.max(0)]), rtol=1e-15)


# ---------------------------------------------------------------------------------------------
# NoisySGD's noise: reproducible, the same on every backend, with the stated statistics
# ---------------------------------------------------------------------------------------------

def _noisy_run(conv, seed=0, steps=3, eta=0.5, gamma=0.55):
    """NoisySGD on zero gradients (what moves is -lr·σ_t·ξ_t), lr 1: each step's noise."""
    p0 = {"w": np.zeros((400, 250)), "b": np.zeros(7)}
    opt = NoisySGD(1.0, eta=eta, gamma=gamma, seed=seed)
    params = {k: conv(v) for k, v in p0.items()}
    state = opt.init(params)
    prev, out = {k: v.copy() for k, v in p0.items()}, []
    for _ in range(steps):
        params, state = opt.update(params, {k: conv(np.zeros_like(v)) for k, v in p0.items()},
                                   state)
        now = {k: np.array(v.numpy() if hasattr(v, "numpy") else v) for k, v in params.items()}
        out.append({k: prev[k] - now[k] for k in now})
        prev = now
    return out


def test_noisy_sgd_noise_statistics_and_reproducibility():
    import torch

    steps = _noisy_run(np.array)
    for t, d in enumerate(steps, 1):
        sigma = (0.5 / t**0.55) ** 0.5
        z = d["w"].ravel() / sigma  # 1e5 draws: mean ±0.013, std ±0.0067 at 3 sigma
        assert abs(z.mean()) < 0.015 and abs(z.std() - 1) < 0.008, (t, z.mean(), z.std())
        assert abs(np.mean(z**4) - 3) < 0.1  # Gaussian kurtosis
    a, b = steps[0]["w"].ravel(), steps[1]["w"].ravel()
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.015  # independent across steps
    assert not np.array_equal(steps[0]["b"], steps[0]["w"].ravel()[:7])
    # the same seed: the same noise (on torch to its log / cos's last bit); another seed:
    # other noise
    again, on_torch = _noisy_run(np.array), _noisy_run(torch.tensor)
    for t in range(3):
        for k in ("w", "b"):
            np.testing.assert_array_equal(again[t][k], steps[t][k])
            np.testing.assert_allclose(on_torch[t][k], steps[t][k], rtol=1e-14, atol=1e-15)
    other = _noisy_run(np.array, seed=1, steps=1)
    assert abs(np.corrcoef(other[0]["w"].ravel(), a)[0, 1]) < 0.015


def test_noisy_sgd_resumes_the_same_noise():
    """The noise is a function of (seed, name, step, index): a run resumed from a state dict
    continues the uninterrupted run's noise bit for bit."""
    p0, grads = _problem("float64")
    opt = NoisySGD(0.1, eta=0.2, seed=5)
    params, state = dict(p0), opt.init(p0)
    for g in grads:
        params, state = opt.update(params, g, state)
    want = {k: np.array(v) for k, v in params.items()}
    params, state = dict(p0), opt.init(p0)
    for g in grads[:3]:
        params, state = opt.update(params, g, state)
    saved, params = opt.state_dict(state), {k: np.array(v) for k, v in params.items()}
    opt2 = NoisySGD(0.1, eta=0.2, seed=5)
    state2 = opt2.load_state_dict(saved, params)
    for g in grads[3:]:
        params, state2 = opt2.update(params, g, state2)
    for k in p0:
        np.testing.assert_array_equal(np.array(params[k]), want[k], err_msg=k)


@pytest.mark.parametrize("seed, error", [(-1, ValueError), (2**32, ValueError),
                                         (1.5, TypeError), (True, TypeError), ("0", TypeError)])
def test_noisy_sgd_refuses_a_bad_seed(seed, error):
    with pytest.raises(error, match="seed"):
        NoisySGD(seed=seed)


def test_torch_sparse_adam_on_a_full_gradient_is_keras_convention_adam():
    """torch.optim.SparseAdam (not added: gradients here are dense) on a sparse gradient
    storing every entry steps as ``Adam(convention="keras")``, ε added to the uncorrected
    √v (docs/optimizers.md): 25 float64 steps."""
    import torch

    from mithril.utils.optimizers import Adam

    rng = np.random.default_rng(2)
    p0 = rng.standard_normal((5, 3))
    w = torch.tensor(p0, requires_grad=True)
    ref = torch.optim.SparseAdam([w], lr=0.01, betas=(0.8, 0.99), eps=1e-3)
    opt = Adam(0.01, beta1=0.8, beta2=0.99, epsilon=1e-3, convention="keras")
    params = {"w": p0.copy()}
    state = opt.init(params)
    for _ in range(25):
        g = rng.standard_normal((5, 3))
        w.grad = torch.tensor(g).to_sparse()
        ref.step()
        params, state = opt.update(params, {"w": g}, state)
        want = w.detach().numpy()
        np.testing.assert_allclose(np.array(params["w"]), want, rtol=0, atol=1e-14)
    assert np.abs(want - p0).max() > 0.1
