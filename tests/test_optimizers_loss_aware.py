"""Optimizers whose step needs the loss (``needs_loss``; ``update(..., loss=f)``, optax's
``value=``): PolyakSGD (optax.polyak_sgd), Momo and MomoAdam (optax.contrib.momo /
momo_adam).

float64 parity: each case runs 25 steps of a least-squares problem side by side with optax
(jitted, the loss a traced argument), the loss and gradients computed at the current
params every step, under a piecewise-constant schedule (optax: the schedule as its
learning rate / ``scaling``; ours: ``set_learning_rate`` before each step), on four paths:
the fused numba kernel (NumPy), torch float64, the jitted JAX engine, and
``optax_transformation(opt, learning_rate=schedule)`` given ``value=``; params compared after
every step to 1e-12 (relative, floored at 1e-3 of the tensor's scale). Also inside
``optax.chain`` and through ``make_train_step``'s one JAX program (the loss it computes).
JAX float64 needs the process-global ``jax_enable_x64``: one fresh interpreter.
"""

from __future__ import annotations

import functools
import inspect
import json

import numpy as np
import pytest
from conftest import run_python

from mithril.utils.optimizers import SGD, Adam, Momo, MomoAdam, Optimizer, PolyakSGD

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
from mithril.utils.optimizers import Momo, MomoAdam, PolyakSGD

STEPS = 25
rng = np.random.default_rng(0)
X, Y = rng.standard_normal((40, 5)), rng.standard_normal((40, 3))
P0 = {"W": rng.standard_normal((3, 5)), "b": rng.standard_normal(3)}
FACTORS = {10: 0.5, 18: 4.0}


def loss_and_grads(p):  # mean squared residual of a 3x5 linear map with a bias
    W, b = np.asarray(p["W"], np.float64), np.asarray(p["b"], np.float64)
    r = X @ W.T + b - Y
    return float(np.mean(r * r)), {"W": 2 * r.T @ X / r.size, "b": 2 * r.sum(0) / r.size}


def sched(lr0):
    return optax.piecewise_constant_schedule(lr0, FACTORS)


def lr_at(lr0, t):
    return float(sched(lr0)(t))


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    floor = 1e-3 * max(float(np.max(np.abs(b), initial=0.0)), 1e-300)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), floor), initial=0.0))


LABELS = {"W": "main", "b": "half"}


def polyak_groups(**kw):  # one Polyak step over each group's scaled gradient
    return optax.chain(optax.multi_transform({"main": optax.sgd(sched(0.7)),
                                              "half": optax.sgd(sched(0.35))}, LABELS),
                       optax.scale_by_polyak(**kw))


CASES = {
    "polyak": (lambda: PolyakSGD(0.7, max_learning_rate=0.5, f_min=0.05),
               lambda: optax.polyak_sgd(0.5, sched(0.7), f_min=0.05)),
    # f_min above the losses reached: the gap turns negative (sps+: 0), ε in the denominator
    "polyak_plus": (lambda: PolyakSGD(0.7, max_learning_rate=2.0, f_min=1.03, epsilon=1e-3,
                                      variant="sps+"),
                    lambda: optax.polyak_sgd(2.0, sched(0.7), 1.03, 1e-3, "sps+")),
    "polyak_groups": (lambda: PolyakSGD(0.7, max_learning_rate=0.5, f_min=0.05, param_groups=[
                          {"params": ["b"], "lr_scale": 0.5}]),
                      lambda: polyak_groups(max_learning_rate=0.5, f_min=0.05)),
    "momo": (lambda: Momo(0.5), lambda: oc.momo(sched(0.5))),
    "momo_wd_adapt": (lambda: Momo(0.8, beta=0.8, lower_bound=0.1, weight_decay=0.05,
                                   adapt_lower_bound=True),
                      lambda: oc.momo(sched(0.8), 0.8, 0.1, 0.05, True)),
    "momo_adam": (lambda: MomoAdam(0.05), lambda: oc.momo_adam(sched(0.05))),
    "momo_adam_wd_adapt": (lambda: MomoAdam(0.1, beta1=0.8, beta2=0.99, epsilon=1e-6,
                                            lower_bound=0.05, weight_decay=0.05,
                                            adapt_lower_bound=True),
                           lambda: oc.momo_adam(sched(0.1), 0.8, 0.99, 1e-6, 0.05, 0.05, True)),
}


def reference(make_tx):
    tx = make_tx()

    @jax.jit
    def step(params, g, s, value):  # (value traced: the transformation's loss path too)
        u, s = tx.update(g, s, params, value=value)
        return optax.apply_updates(params, u), s

    params = {k: jnp.asarray(v) for k, v in P0.items()}
    s = tx.init(params)
    out, losses = [], []
    for _ in range(STEPS):
        f, g = loss_and_grads(params)
        losses.append(f)
        params, s = step(params, {k: jnp.asarray(v) for k, v in g.items()}, s, f)
        out.append({k: np.array(v) for k, v in params.items()})
    return out, losses


def ours(make, path):
    opt = make()
    lr0 = opt.learning_rate
    if path == "optax_transformation":
        yield from reference(lambda: optax_transformation(opt, learning_rate=sched(lr0)))[0]
        return
    engines.JAX_ENGINE = "jit" if path == "jax-jit" else "auto"
    conv = {"numpy": np.array, "torch": torch.tensor, "jax-jit": jnp.asarray}[path]
    params = {k: conv(v) for k, v in P0.items()}
    state = opt.init(params)
    for t in range(STEPS):
        opt.set_learning_rate(lr_at(lr0, t))
        f, g = loss_and_grads({k: np.array(v) for k, v in params.items()})
        loss = {"numpy": np.float64(f), "torch": torch.tensor(f, dtype=torch.float64),
                "jax-jit": jnp.asarray(f)}[path]
        params, state = opt.update(params, {k: conv(v) for k, v in g.items()}, state, loss=loss)
        got = {k: np.array(v) for k, v in params.items()}
        assert all(v.dtype == np.float64 for v in got.values())
        yield got
    assert state.step == STEPS and state.values["loss"] == f


errors, losses = {}, {}
for case, (make, make_tx) in CASES.items():
    want, losses[case] = reference(make_tx)
    assert np.max(np.abs(want[-1]["W"] - P0["W"])) > 1e-2, case  # it moved
    for path in ("numpy", "torch", "jax-jit", "optax_transformation"):
        errors[f"{case}/{path}"] = max(rel_err(got[k], want[t][k])
                                       for t, got in enumerate(ours(make, path)) for k in P0)

# inside optax.chain (the extra argument passed through), against optax's own chain
def chained(tx):
    return lambda: optax.chain(optax.clip_by_global_norm(0.5), tx)


want = reference(chained(optax.polyak_sgd(0.5, 0.7, 0.05)))[0]
got = reference(chained(optax_transformation(PolyakSGD(0.7, max_learning_rate=0.5,
                                                       f_min=0.05))))[0]
errors["polyak/chain"] = max(rel_err(g[k], w[k]) for g, w in zip(got, want) for k in P0)

# make_train_step's one JAX program (the loss it computes goes to the update) against the
# separate evaluate + update(loss=) on the same float64 model, the learning rate and weight
# decay changed mid-run
import mithril as ml
from mithril.backends import JaxBackend
from mithril.cli.networks import mlp_spec
from mithril.utils.training import make_train_step

spec = mlp_spec(6, 3, [8])
for name, make in [("polyak", lambda: PolyakSGD(0.5, max_learning_rate=0.3)),
                   ("momo", lambda: Momo(0.5, weight_decay=0.01)),
                   ("momo_adam", lambda: MomoAdam(0.05, adapt_lower_bound=True))]:
    runs = []
    for fused in (True, False):
        be = JaxBackend(dtype="float64", seed=0)
        compiled = ml.compile(spec.model, be, shapes=spec.shapes)
        r = np.random.default_rng(1)
        batches = [{"input": be.array(r.standard_normal((16, 6))),
                    "target": be.array(r.integers(0, 3, 16), be.int_dtype)} for _ in range(6)]
        params, opt = compiled.get_parameters(), make()
        start = {k: np.array(v) for k, v in params.items()}
        step = make_train_step(compiled, opt, loss="loss") if fused else None
        state = step.init(params) if fused else opt.init(params)
        assert step is None or step.fused
        lr0 = opt.learning_rate
        for i, d in enumerate(batches):  # (changed hyperparameters: traced in the program)
            opt.set_learning_rate(lr0 * (0.5 if i >= 2 else 1.0))
            if i == 3:
                opt.weight_decay = 0.02
            if fused:
                params, state, out = step(params, state, d)
            else:
                out, g = compiled.evaluate(params, d, output_gradients={"loss": 1.0})
                params, state = opt.update(params, g, state, loss=out["loss"])
        runs.append({k: np.array(v) for k, v in params.items()})
    assert max(np.abs(runs[0][k] - start[k]).max() for k in start) > 1e-3, name
    errors[f"{name}/train_step"] = max(rel_err(runs[0][k], runs[1][k]) for k in start)


def sig(f):
    return {k: repr(p.default) for k, p in inspect.signature(f).parameters.items()
            if p.default is not inspect.Parameter.empty}


defaults = {"PolyakSGD": sig(optax.polyak_sgd), "Momo": sig(oc.momo),
            "MomoAdam": sig(oc.momo_adam)}
print(json.dumps({"errors": errors, "defaults": defaults, "losses": losses}))
"""


@functools.cache
def reference_run() -> dict:
    return json.loads(run_python(_SCRIPT, timeout=600).strip().splitlines()[-1])


def test_float64_parity_with_optax():
    """25 steps with the loss of the current params, under a schedule, four paths (and a
    chain, the one-program train step), each ≤ 1e-12 from optax."""
    run = reference_run()
    errors = run["errors"]
    cases = ("polyak", "polyak_plus", "polyak_groups", "momo", "momo_wd_adapt", "momo_adam",
             "momo_adam_wd_adapt")
    assert sorted(errors) == sorted(
        [f"{c}/{p}" for c in cases for p in ("numpy", "torch", "jax-jit",
                                             "optax_transformation")]
        + ["polyak/chain"] + [f"{n}/train_step" for n in ("polyak", "momo", "momo_adam")])
    bad = {k: e for k, e in errors.items() if not e <= TOL}
    assert not bad, bad
    # the loss changed along the run, and went below f_min = 1.03 in "polyak_plus" (a
    # negative gap, clipped to 0 by sps+: no step since), above it before
    for case, losses in run["losses"].items():
        assert losses[-1] < 0.9 * losses[0], case
    plus = run["losses"]["polyak_plus"]
    assert max(plus) > 1.03 > min(plus) == plus[-1] == plus[-2]


# our name -> optax's
_OPTAX_NAMES = {"beta1": "b1", "beta2": "b2", "epsilon": "eps", "beta": "beta",
                "learning_rate": "learning_rate"}


@pytest.mark.parametrize("cls", [PolyakSGD, Momo, MomoAdam])
def test_defaults_are_optax(cls):
    ref = reference_run()["defaults"][cls.__name__]
    ours = {k: p.default for k, p in inspect.signature(cls).parameters.items()
            if p.default is not inspect.Parameter.empty}
    if cls is PolyakSGD:  # our learning_rate is optax's scaling
        ref["learning_rate"] = ref.pop("scaling")
    checked = 0
    for name, value in ours.items():
        theirs = _OPTAX_NAMES.get(name, name)
        if theirs in ref:
            assert eval(ref[theirs]) == value, (cls.__name__, name)
            checked += 1
    assert checked >= 4


# ---------------------------------------------------------------------------------------------
# the loss argument: required, checked, refused by name; a refused or skipped call changes
# nothing
# ---------------------------------------------------------------------------------------------

def _problem():
    rng = np.random.default_rng(3)
    X, Y = rng.standard_normal((20, 4)), rng.standard_normal((20, 2))
    p0 = {"W": rng.standard_normal((2, 4)), "b": rng.standard_normal(2)}

    def loss_and_grads(p):
        r = X @ p["W"].T + p["b"] - Y
        return float(np.mean(r * r)), {"W": 2 * r.T @ X / r.size, "b": 2 * r.sum(0) / r.size}

    return p0, loss_and_grads


def _host(v):
    return v.detach().numpy().copy() if hasattr(v, "detach") else np.array(v)


def _snapshot(params, state):
    return ({k: np.array(v) for k, v in params.items()}, state.step, dict(state.values),
            {k: np.array(v) for k, v in state.to_numpy().items()})


def _same(a, b):
    assert a[1:3] == b[1:3]
    for x, y in ((a[0], b[0]), (a[3], b[3])):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


MAKERS = [lambda: PolyakSGD(0.5), lambda: Momo(0.5, weight_decay=0.01),
          lambda: MomoAdam(0.05, adapt_lower_bound=True)]


@pytest.mark.parametrize("make", MAKERS)
def test_a_missing_or_bad_loss_is_refused_and_changes_nothing(make):
    import torch

    p0, loss_and_grads = _problem()
    opt = make()
    params = {k: v.copy() for k, v in p0.items()}
    state = opt.init(params)
    f, g = loss_and_grads(params)
    params, state = opt.update(params, g, state, loss=f)  # one step: values not the initial
    before = _snapshot(params, state)
    f, g = loss_and_grads({k: np.array(v) for k, v in params.items()})
    name = type(opt).__name__
    with pytest.raises(TypeError, match=rf"{name}\.update needs loss="):
        opt.update(params, g, state)
    for bad, err, what in [(float("nan"), ValueError, "loss=nan is not finite"),
                           (np.inf, ValueError, "loss=inf is not finite"),
                           (torch.tensor(-np.inf), ValueError, "loss=-inf is not finite"),
                           (np.ones(2), ValueError, r"loss must be a scalar \(0-d\), got shape \(2,\)"),
                           (torch.ones(1), ValueError, "loss must be a scalar"),
                           ("0.5", TypeError, "loss must be a real number"),
                           (True, TypeError, "loss must be a real number"),
                           (1 + 2j, TypeError, "loss must be a real number")]:
        with pytest.raises(err, match=what):
            opt.update(params, g, state, loss=bad)
        _same(_snapshot(params, state), before)
    # a gradient the step refuses (a key it does not know): the loss written for the step
    # is taken back
    with pytest.raises(Exception, match="nope"):
        opt.update(params, {**g, "nope": np.ones(1)}, state, loss=f)
    _same(_snapshot(params, state), before)
    # a torch loss that requires grad, a NumPy scalar, an int: taken as the number
    loss = torch.tensor(f, dtype=torch.float64, requires_grad=True)
    params, state = opt.update(params, g, state, loss=loss)
    assert state.values["loss"] == f and state.step == 2


def test_an_optimizer_that_does_not_use_the_loss_refuses_it():
    p0, loss_and_grads = _problem()
    for opt in (SGD(0.1), Adam(0.01)):
        params = {k: v.copy() for k, v in p0.items()}
        state = opt.init(params)
        f, g = loss_and_grads(params)
        with pytest.raises(TypeError, match=rf"{type(opt).__name__}\.update takes no loss="):
            opt.update(params, g, state, loss=f)
        assert state.step == 0
        params, state = opt.update(params, g, state, loss=None)  # (None: as without it)
        assert state.step == 1 and "loss" not in state.values
    assert not SGD.needs_loss and "loss" not in Adam.state_values


@pytest.mark.parametrize("make", MAKERS)
def test_a_skipped_step_keeps_the_values_and_the_state_dict_resumes(make):
    p0, loss_and_grads = _problem()
    opt = make()
    opt.nonfinite = "skip"
    params = {k: v.copy() for k, v in p0.items()}
    state = opt.init(params)
    for _ in range(3):
        f, g = loss_and_grads({k: np.array(v) for k, v in params.items()})
        params, state = opt.update(params, g, state, loss=f)
    assert state.values["loss"] == f
    before = _snapshot(params, state)
    with pytest.warns(RuntimeWarning, match="skipped"):
        params, state = opt.update(params, {**g, "b": np.full(2, np.nan)}, state, loss=0.123)
    assert state.last_step_skipped
    _same(_snapshot(params, state), before)
    # a state dict mid-run: the resumed run is the uninterrupted one, bit for bit
    saved, params = opt.state_dict(state), {k: np.array(v) for k, v in params.items()}
    assert saved is not None
    runs = []
    for o, s in ((opt, state), (make(), None)):
        p = {k: v.copy() for k, v in params.items()}
        if s is None:
            o.nonfinite = "skip"
            s = o.load_state_dict(saved, p)
        for _ in range(4):
            f, g = loss_and_grads({k: np.array(v) for k, v in p.items()})
            p, s = o.update(p, g, s, loss=f)
        runs.append({k: np.array(v) for k, v in p.items()})
    for k in p0:
        np.testing.assert_array_equal(runs[0][k], runs[1][k])


def test_polyak_step_by_hand():
    """γ = min((f − f_min)/(lr²‖g‖² + ε), max_lr); p ← p − γ·lr·g, the norm over every
    tensor; γ = 0 when the gradient is zero (optax's guard)."""
    p0, loss_and_grads = _problem()
    opt = PolyakSGD(0.5, max_learning_rate=10.0, f_min=0.2, epsilon=1e-3)
    f, g = loss_and_grads(p0)
    sq = sum(float(np.sum((0.5 * v) ** 2)) for v in g.values())
    gamma = min((f - 0.2) / (sq + 1e-3), 10.0)
    assert gamma < 10.0  # (not capped: the formula itself)
    new, _ = opt.update(dict(p0), g, opt.init(p0), loss=f)
    for k in p0:
        np.testing.assert_allclose(new[k], p0[k] - gamma * 0.5 * g[k], rtol=1e-14)
    zero = {k: np.zeros_like(v) for k, v in p0.items()}
    new, _ = PolyakSGD().update(dict(p0), zero, PolyakSGD().init(p0), loss=f)
    for k in p0:
        np.testing.assert_array_equal(new[k], p0[k])


def test_groups_and_hyperparameters():
    # Momo's optimizer-wide settings cannot differ per group; bad values are named
    with pytest.raises(ValueError, match="beta"):
        Momo(param_groups=[{"params": ["b"], "beta": 0.5}])
    with pytest.raises(ValueError, match="lower_bound"):
        MomoAdam(param_groups=[{"params": ["b"], "lower_bound": 1.0}])
    with pytest.raises(ValueError, match="f_min"):
        PolyakSGD(param_groups=[{"params": ["b"], "f_min": 1.0}])
    for cls, kw, what in [(PolyakSGD, {"variant": "sps-"}, "variant"),
                          (PolyakSGD, {"max_learning_rate": -1.0}, "max_learning_rate"),
                          (PolyakSGD, {"f_min": float("nan")}, "f_min"),
                          (Momo, {"beta": 1.0}, "beta"),
                          (Momo, {"lower_bound": float("inf")}, "lower_bound"),
                          (MomoAdam, {"beta2": 1.5}, "beta2"),
                          (MomoAdam, {"epsilon": -1.0}, "epsilon")]:
        with pytest.raises(ValueError, match=what):
            cls(**kw)
    with pytest.raises(TypeError, match="adapt_lower_bound"):
        Momo(adapt_lower_bound="yes")
    assert PolyakSGD(eps=1e-3).epsilon == 1e-3  # (optax's name)
    # a Momo group's learning rate scales its step: half the rate, half the move at step 1
    # (τ is the optimizer's: the Polyak term of the first step, below α)
    p0, loss_and_grads = _problem()
    f, g = loss_and_grads(p0)
    moves = []
    for groups in (None, [{"params": ["b"], "lr_scale": 0.5}]):
        opt = Momo(10.0, param_groups=groups)
        new, _ = opt.update(dict(p0), g, opt.init(p0), loss=f)
        moves.append({k: new[k] - p0[k] for k in p0})
    np.testing.assert_allclose(moves[1]["b"], 0.5 * moves[0]["b"], rtol=1e-14)
    np.testing.assert_array_equal(moves[1]["W"], moves[0]["W"])


def test_torch_step_closure_gives_the_loss():
    """torch.optim's wrapper: ``step(closure)`` passes the closure's loss to ``update`` (the
    run equals ``Momo.update(..., loss=)`` on NumPy bit for bit); ``step()`` without a
    closure is refused by name and changes nothing. (The separate-calls train step passes
    its loss: tests/test_train_step_fn.py runs the three there.)"""
    import torch

    from mithril.interop import torch_optimizer

    w0 = np.array([1.0, -2.0, 0.5])
    w = torch.nn.Parameter(torch.tensor(w0))
    opt = torch_optimizer(Momo(0.5, beta=0.8), [w])
    ours, ref = Momo(0.5, beta=0.8), {"w": w0.copy()}
    state = ours.init(ref)
    w.grad = torch.full((3,), 0.5, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"Momo steps with the loss: call step\(closure\)"):
        opt.step()
    assert torch.equal(w.detach(), torch.tensor(w0))

    def closure():
        opt.zero_grad()
        loss = (w * w * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).sum()
        loss.backward()
        return loss

    for _ in range(5):
        p = ref["w"]
        loss = float((p * p * np.array([1.0, 2.0, 3.0])).sum())
        ref, state = ours.update(ref, {"w": 2 * p * np.array([1.0, 2.0, 3.0])}, state,
                                 loss=loss)
        ref = {"w": np.array(ref["w"])}
        assert float(opt.step(closure).detach()) == loss
        np.testing.assert_array_equal(w.detach().numpy(), ref["w"])
    assert not np.array_equal(ref["w"], w0)


def test_a_loss_aware_optimizer_of_your_own():
    """``needs_loss = True``: the step's loss is ``values["loss"]`` in ``tensor_scalars``.
    Here SGD whose step is the loss itself (p ← p − lr·f·g), on NumPy and torch."""
    import torch

    class LossScaledSGD(Optimizer):
        needs_loss = True

        def tensor_scalars(self, step, sums, scalars, tensors, values, sizes):
            return (values["loss"],), tensors, dict(values)

        @staticmethod
        def math(p, g, lr, f):
            return (p - lr * f * g,)

    assert LossScaledSGD.state_values == ("loss",)
    p0, loss_and_grads = _problem()
    for conv in (np.array, torch.tensor):
        opt = LossScaledSGD(0.1)
        params = {k: conv(v.copy()) for k, v in p0.items()}
        state = opt.init(params)
        want = {k: v.copy() for k, v in p0.items()}
        for _ in range(3):
            f, g = loss_and_grads({k: _host(v) for k, v in params.items()})
            params, state = opt.update(params, {k: conv(v) for k, v in g.items()}, state,
                                       loss=f)
            want = {k: want[k] - 0.1 * f * g[k] for k in want}
        for k in p0:
            np.testing.assert_allclose(_host(params[k]), want[k], rtol=1e-13)


def test_given_up_after_a_run_of_skips_the_step_takes_its_loss():
    """``max_consecutive_skips``: the step applied after the run (as under "propagate")
    gets the loss it was given."""
    opt = Momo(0.5, nonfinite="skip", max_consecutive_skips=1)
    params = {"w": np.ones(3)}
    state = opt.init(params)
    params, state = opt.update(params, {"w": np.ones(3)}, state, loss=1.0)
    with pytest.warns(RuntimeWarning, match="skipped"):
        params, state = opt.update(params, {"w": np.full(3, np.nan)}, state, loss=2.0)
    assert state.values["loss"] == 1.0 and state.step == 1
    with pytest.warns(RuntimeWarning) as got:  # (and: params now non-finite)
        params, state = opt.update(params, {"w": np.full(3, np.nan)}, state, loss=3.0)
    assert any("2 non-finite steps in a row" in str(w.message) for w in got)
    assert state.step == 2 and state.values["loss"] == 3.0
    assert state.values["barf"] == pytest.approx(0.9 * 1.0 + 0.1 * 3.0, rel=1e-15)


def test_optax_transformation_takes_value_and_refuses_it_missing_or_bad():
    """``update(..., value=loss)`` (float32 here): missing, non-scalar or NaN refused by name
    before anything runs; a skipped step (``nonfinite="skip"``) keeps the state's values,
    its loss included. Optimizers that do not use the loss keep their plain transformation."""
    import jax.numpy as jnp
    import optax

    from mithril.interop import optax_transformation

    tx = optax_transformation(Momo(0.5, nonfinite="skip"))
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    assert type(optax_transformation(Adam(0.01))) is optax.GradientTransformation
    params = {"w": jnp.ones(3, jnp.float32)}
    state = tx.init(params)
    g = {"w": jnp.full(3, 0.5, jnp.float32)}
    with pytest.raises(TypeError, match=r"value=loss"):
        tx.update(g, state, params)
    with pytest.raises(ValueError, match=r"value must be a scalar"):
        tx.update(g, state, params, value=jnp.ones(2))
    with pytest.raises(ValueError, match=r"value=nan is not finite"):
        tx.update(g, state, params, value=float("nan"))
    _, state = tx.update(g, state, params, value=jnp.float32(2.0))
    assert int(state.count) == 1 and float(state.values["loss"]) == 2.0
    before = {k: float(v) for k, v in state.values.items()}
    _, state = tx.update({"w": jnp.full(3, jnp.nan, jnp.float32)}, state, params, value=5.0)
    assert int(state.count) == 1
    assert {k: float(v) for k, v in state.values.items()} == before


@pytest.mark.parametrize("make", MAKERS)
def test_float32_numpy_torch_jax_agree(make):
    """float32 params: the fused kernel, torch and the jitted JAX engine agree (to float32
    rounding) over 10 steps, and keep float32."""
    import jax.numpy as jnp
    import torch

    p0, loss_and_grads = _problem()
    outs = []
    for conv in (np.array, torch.tensor, jnp.asarray):
        opt = make()
        params = {k: conv(v.astype(np.float32)) for k, v in p0.items()}
        state = opt.init(params)
        for _ in range(10):
            f, g = loss_and_grads({k: _host(v).astype(np.float64) for k, v in params.items()})
            params, state = opt.update(params, {k: conv(v.astype(np.float32))
                                                for k, v in g.items()}, state, loss=f)
        outs.append({k: _host(v) for k, v in params.items()})
        assert all(v.dtype == np.float32 for v in outs[-1].values())
    for got in outs[1:]:
        for k in p0:
            np.testing.assert_allclose(got[k], outs[0][k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert max(np.abs(outs[0][k] - p0[k]).max() for k in p0) > 1e-2
