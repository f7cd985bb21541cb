"""``ScheduleFree(base)`` against ``optax.contrib.schedule_free(base, learning_rate)``, side
by side in each test, float64, 30 steps, on the NumPy, torch and JAX backends (params,
``z``, ``weight_sum``, ``max_lr`` and the evaluation params within 1e-12):

* around SGD, Adam(beta1=0) (``weight_lr_power`` 0 and 2), Lion and RMSProp; around
  AdamW(beta1=0) also against our fused ``ScheduleFreeAdamW`` (optax's
  ``schedule_free_adamw`` math);
* a warm-up scheduler on the base's lr (``averaging_lr=None``: optax's wrapper schedule one
  step behind its own count) and a fixed ``averaging_lr``;
* a loss-aware base (PolyakSGD) with ``loss=``, optax's ``value=``;
* a parameter without gradient keeps its ``y`` and ``z``; a step the base skips is skipped
  whole; bad input changes nothing; ``state_dict`` and safetensors checkpoints resume
  bit-exactly; ``torch_optimizer`` and ``make_train_step`` equal the direct calls;
  ``optax_transformation`` refuses it by name.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib as oc
import pytest
import torch
from conftest import host, native
from optimizer_parity import jax_float64

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
from mithril.cli.networks import mlp_spec
from mithril.errors import KeyMismatchError, ShapeError
from mithril.interop import optax_transformation, torch_optimizer
from mithril.utils.checkpoint import load_checkpoint, save_checkpoint
from mithril.utils.lr_schedulers import LambdaLR
from mithril.utils.optimizers import (
    SGD,
    Adam,
    AdamW,
    Lion,
    PolyakSGD,
    RMSProp,
    ScheduleFree,
    ScheduleFreeAdamW,
)
from mithril.utils.training import make_train_step

BACKENDS = ["numpy", "torch", "jax"]
STEPS, TOL = 30, 1e-12
RNG = np.random.default_rng(0)
A = RNG.normal(size=(4, 3))
P0 = {"w": RNG.normal(size=(4, 3)), "b": RNG.normal(size=3)}


@pytest.fixture(autouse=True)
def x64():
    with jax_float64():
        yield


def loss_grads(p):
    """A curved loss (quadratic plus quartic) and its gradients, in the arrays' backend."""
    w, b = p["w"], p["b"]
    r = w - native(_kind(w), A)
    loss = float(0.5 * (r * r).sum() + 0.1 * (w ** 4).sum() + (b * b).sum())
    return loss, {"w": r + 0.4 * w ** 3, "b": 2 * b}


def _kind(a) -> str:
    return "torch" if hasattr(a, "detach") else "numpy" if isinstance(a, np.ndarray) else "jax"


def start(backend):
    return {k: native(backend, v) for k, v in P0.items()}


def err(ours, theirs) -> float:
    return max(float(np.max(np.abs(host(ours[k]) - np.asarray(theirs[k])))) for k in theirs)


def run_optax(tx, steps=STEPS, extra=False):
    """optax's params, eval params and state after each step (a list)."""
    q = {k: jnp.asarray(v) for k, v in P0.items()}
    s = tx.init(q)
    out = []
    for _ in range(steps):
        loss, g = loss_grads(q)
        u, s = tx.update(g, s, q, **({"value": jnp.asarray(loss)} if extra else {}))
        q = optax.apply_updates(q, u)
        out.append((q, oc.schedule_free_eval_params(s, q), s))
    return out


def check_against(opt, ref, backend, sched=None, loss=False):
    params = start(backend)
    state = opt.init(params)
    if sched is not None:
        sched = sched(opt)
    for q, ev, s in ref:
        value, g = loss_grads(params)
        params, state = opt.update(params, g, state, **({"loss": value} if loss else {}))
        if sched is not None:
            sched.step()
        assert err(params, q) <= TOL and err(opt.eval_params(state, params), ev) <= TOL
        assert err(state.slot("z"), s.z) <= TOL
        assert abs(state.values["weight_sum"] - float(s.weight_sum)) <= TOL * max(
            1.0, float(s.weight_sum))
        assert state.values["max_lr"] == pytest.approx(float(s.max_lr), rel=TOL)
    assert err(params, P0) > 0.1  # (it moved)
    return params, state


CASES = {  # ours, optax's
    "sgd": (lambda: ScheduleFree(SGD(0.1)), lambda: oc.schedule_free(optax.sgd(0.1), 0.1)),
    "adam_p0": (lambda: ScheduleFree(Adam(0.05, beta1=0.0), weight_lr_power=0.0),
                lambda: oc.schedule_free(optax.adam(0.05, b1=0.0), 0.05, weight_lr_power=0)),
    "adam_p2": (lambda: ScheduleFree(Adam(0.05, beta1=0.0), b1=0.95),
                lambda: oc.schedule_free(optax.adam(0.05, b1=0.0), 0.05, b1=0.95)),
    "lion": (lambda: ScheduleFree(Lion(0.01, beta1=0.0), averaging_lr=0.02),
             lambda: oc.schedule_free(optax.lion(0.01, b1=0.0), 0.02)),
    "rmsprop": (lambda: ScheduleFree(RMSProp(0.01, decay=0.9, convention="optax")),
                lambda: oc.schedule_free(optax.rmsprop(0.01, decay=0.9), 0.01)),
}


@pytest.mark.parametrize("backend,case", [  # (every base on NumPy; the other backends' sweep slow)
    pytest.param(b, c, marks=[pytest.mark.slow] if b != "numpy" and c != "adam_p2" else [])
    for b in BACKENDS for c in sorted(CASES)])
def test_matches_optax(backend, case):
    ours, theirs = CASES[case]
    check_against(ours(), run_optax(theirs()), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_around_adamw_beta1_0_is_the_fused_schedule_free_adamw(backend):
    """optax's ``schedule_free_adamw`` is ``schedule_free`` around RMS scaling with decoupled
    decay (Adam without momentum): ``ScheduleFree(AdamW(beta1=0))`` equals it and our fused
    ``ScheduleFreeAdamW``."""
    kw = {"weight_decay": 0.05}
    ref = run_optax(oc.schedule_free_adamw(0.05, b1=0.9, **kw))
    params, state = check_against(ScheduleFree(AdamW(0.05, beta1=0.0, **kw)), ref, backend)
    fused = ScheduleFreeAdamW(0.05, **kw)
    p2 = start(backend)
    s2 = fused.init(p2)
    for _ in range(STEPS):
        p2, s2 = fused.update(p2, loss_grads(p2)[1], s2)
    assert err(params, {k: host(v) for k, v in p2.items()}) <= TOL
    assert err(state.slot("z"), {k: host(v) for k, v in s2.slot("z").items()}) <= TOL


W = 8  # warm-up steps


def warm(count):  # optax.warmup_constant_schedule(0, 0.1, W) in float64
    return 0.1 * jnp.minimum(count, W).astype(jnp.float64) / W


@pytest.mark.parametrize("fixed", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_warmup_scheduler(backend, fixed):
    """A LambdaLR warm-up on the base's lr: with ``averaging_lr=None`` the weight reads the
    same lr as the base's step (optax's wrapper schedule at ``count - 1``); a fixed
    ``averaging_lr`` is optax's constant ``learning_rate``."""
    ours = ScheduleFree(Adam(0.1, beta1=0.0), averaging_lr=0.1 if fixed else None)
    tx = oc.schedule_free(optax.adam(warm, b1=0.0), 0.1 if fixed else lambda c: warm(c - 1))
    check_against(ours, run_optax(tx), backend,
                  sched=lambda o: LambdaLR(o, lambda t: min(t, W) / W))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_loss_aware_base(backend):
    ours = ScheduleFree(PolyakSGD(max_learning_rate=0.5, f_min=0.0), averaging_lr=0.5)
    tx = oc.schedule_free(optax.polyak_sgd(max_learning_rate=0.5, f_min=0.0), 0.5)
    check_against(ours, run_optax(tx, extra=True), backend, loss=True)
    assert ours.needs_loss and not ScheduleFree(SGD(0.1)).needs_loss


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_parameter_without_gradient_keeps_y_and_z(backend):
    """Gradients for ``w`` only: optax's schedule_free on ``w`` alone, ``b`` as it was."""
    opt = ScheduleFree(Adam(0.05, beta1=0.0))
    params = start(backend)
    state = opt.init(params)
    tx = oc.schedule_free(optax.adam(0.05, b1=0.0), 0.05)
    q = {"w": jnp.asarray(P0["w"])}
    s = tx.init(q)
    for _ in range(STEPS):
        params, state = opt.update(params, {"w": loss_grads(params)[1]["w"]}, state)
        u, s = tx.update({"w": loss_grads({**q, "b": jnp.asarray(P0["b"])})[1]["w"]}, s, q)
        q = optax.apply_updates(q, u)
        assert err(params, q) <= TOL and np.array_equal(host(params["b"]), P0["b"])
    assert np.array_equal(host(state.slot("z")["b"]), P0["b"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_stays_float32(backend):
    opt = ScheduleFree(Adam(0.05, beta1=0.0))
    params = {k: native(backend, v.astype(np.float32)) for k, v in P0.items()}
    state = opt.init(params)
    for _ in range(3):
        params, state = opt.update(params, {k: 2 * v - 1 for k, v in params.items()}, state)
    for arrays in (params, state.slot("z"), opt.eval_params(state, params)):
        assert all(host(v).dtype == np.float32 for v in arrays.values())


def test_a_z_slot_held_as_a_jax_array():
    """Where the JAX engine keeps the slots on the device (a GPU), ``z`` is a JAX array:
    written with ``.at[].set``, the same numbers as the host buffer (JAX on CPU)."""
    opt, ref = ScheduleFree(Adam(0.05, beta1=0.0)), ScheduleFree(Adam(0.05, beta1=0.0))
    params, p_ref = start("jax"), start("jax")
    state, s_ref = opt.init(params), ref.init(p_ref)
    state.slots["z"] = jnp.asarray(state.slots["z"])
    for _ in range(3):
        params, state = opt.update(params, {"w": loss_grads(params)[1]["w"]}, state)
        p_ref, s_ref = ref.update(p_ref, {"w": loss_grads(p_ref)[1]["w"]}, s_ref)
    assert isinstance(state.slots["z"], type(jnp.zeros(1)))
    assert np.array_equal(host(state.slots["z"]), host(s_ref.slots["z"]))
    assert err(params, {k: host(v) for k, v in p_ref.items()}) == 0


def snapshot(params, state):
    return ({k: host(v) for k, v in params.items()},
            {k: host(v) for k, v in state.slots.items()}, dict(state.values), state.step)


def unchanged(params, state, snap):
    p, slots, values, step = snap
    assert err(params, p) == 0 and state.step == step and state.values == values
    assert all(np.array_equal(host(state.slots[k]), v) for k, v in slots.items())


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_changes_nothing(backend):
    """Refused calls (bad keys, shapes, a NaN under the base's ``nonfinite="raise"``, a loss
    to a base that takes none, another optimizer's state) change nothing: the run goes on
    as one without them; a step the base skips is skipped whole."""
    make = lambda policy: ScheduleFree(Adam(0.05, beta1=0.0, nonfinite=policy))  # noqa: E731
    opt, ref = make("raise"), make("raise")
    params, p_ref = start(backend), start(backend)
    state, s_ref = opt.init(params), ref.init(p_ref)
    for _ in range(2):
        params, state = opt.update(params, loss_grads(params)[1], state)
        p_ref, s_ref = ref.update(p_ref, loss_grads(p_ref)[1], s_ref)
    g = loss_grads(params)[1]
    nan = {k: v * float("nan") for k, v in g.items()}
    other = Adam(0.05).init(params)
    snap = snapshot(params, state)
    for exc, match, call in [
            (KeyMismatchError, "unknown", lambda: opt.update(params, {**g, "c": g["b"]}, state)),
            (ShapeError, "shape", lambda: opt.update(params, {**g, "b": g["w"]}, state)),
            (FloatingPointError, "non-finite|NaN|nan", lambda: opt.update(params, nan, state)),
            (TypeError, "takes no loss", lambda: opt.update(params, g, state, loss=1.0)),
            (ValueError, "made by Adam", lambda: opt.update(params, g, other))]:
        with pytest.raises(exc, match=match):
            call()
        unchanged(params, state, snap)
    skip = make("skip")
    with pytest.warns(RuntimeWarning, match="skipped"):
        out, state = skip.update(params, nan, state)
    assert state.last_step_skipped
    unchanged(out, state, snap)
    for _ in range(3):
        params, state = opt.update(params, loss_grads(params)[1], state)
        p_ref, s_ref = ref.update(p_ref, loss_grads(p_ref)[1], s_ref)
    assert err(params, {k: host(v) for k, v in p_ref.items()}) == 0


def test_bad_arguments_and_eval_params_refusals():
    for kw, exc, match in [({"b1": 0.0}, ValueError, "b1 must be in"),
                           ({"averaging_lr": -1.0}, ValueError, "averaging_lr"),
                           ({"averaging_lr": lambda t: 0.1}, TypeError, "averaging_lr"),
                           ({"weight_lr_power": float("inf")}, ValueError, "weight_lr_power")]:
        with pytest.raises(exc, match=match):
            ScheduleFree(SGD(0.1), **kw)
    with pytest.raises(TypeError, match="schedule-free already"):
        ScheduleFree(ScheduleFreeAdamW())
    with pytest.raises(TypeError, match="base_optimizer must be a mithril optimizer"):
        ScheduleFree(optax.sgd(0.1))
    opt = ScheduleFree(SGD(0.1))
    params = start("numpy")
    state = opt.init(params)
    assert err(opt.eval_params(state, params), P0) <= 1e-15  # x = y = z at the start
    with pytest.raises(TypeError, match="needs params"):
        opt.eval_params(state, None)
    with pytest.raises(ValueError, match="got SGD's"):
        opt.eval_params(SGD(0.1).init(params), params)
    with pytest.raises(KeyMismatchError):
        opt.eval_params(state, {"w": params["w"]})
    with pytest.raises(TypeError, match="ScheduleFree overrides update"):
        optax_transformation(opt)


def test_in_optax_the_wrapper_is_optaxs_around_our_base_transformation():
    """``optax_transformation(ScheduleFree(...))`` is refused (above); optax's wrapper around
    ``optax_transformation(base)``, jitted, gives the same numbers."""
    tx = oc.schedule_free(optax_transformation(Adam(0.05, beta1=0.0)), 0.05)
    step = jax.jit(tx.update)
    q = {k: jnp.asarray(v) for k, v in P0.items()}
    s = tx.init(q)
    ref = []
    for _ in range(10):
        u, s = step(loss_grads(q)[1], s, q)
        q = optax.apply_updates(q, u)
        ref.append((q, oc.schedule_free_eval_params(s, q), s))
    check_against(ScheduleFree(Adam(0.05, beta1=0.0)), ref, "numpy")


@pytest.mark.parametrize("arrays", ["numpy", "torch"])
def test_state_dict_and_checkpoint_resume_bit_exactly(arrays, tmp_path):
    make = lambda: ScheduleFree(Adam(0.05, beta1=0.0), b1=0.95)  # noqa: E731
    opt = make()
    params = start("numpy")
    state = opt.init(params)
    for _ in range(4):
        params, state = opt.update(params, loss_grads(params)[1], state)
    d = opt.state_dict(state, arrays=arrays)
    path = tmp_path / "sf.safetensors"
    save_checkpoint(path, params, opt, state)
    fresh, fresh2 = make(), make()
    fresh.b1 = 0.5  # (restored)
    p2 = {k: v.copy() for k, v in params.items()}
    s2 = fresh.load_state_dict(d, p2)
    ck = load_checkpoint(path, params_template=params, optimizer=fresh2)
    p3, s3 = ck["params"], ck["state"]
    assert fresh.b1 == 0.95 and s2.values == state.values == s3.values
    for _ in range(4):
        params, state = opt.update(params, loss_grads(params)[1], state)
        p2, s2 = fresh.update(p2, loss_grads(p2)[1], s2)
        p3, s3 = fresh2.update(p3, loss_grads(p3)[1], s3)
    assert err(p2, params) == 0 and err(p3, params) == 0
    with pytest.raises(KeyError, match="weight_sum"):
        make().load_state_dict({**d, "values": {k: v for k, v in d["values"].items()
                                                if k != "weight_sum"}}, params)


def test_torch_optimizer_is_the_direct_calls():
    opt = ScheduleFree(Adam(0.05, beta1=0.0))
    params = start("torch")
    state = opt.init(params)
    ps = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in P0.items()}
    drop_in = torch_optimizer(ScheduleFree(Adam(0.05, beta1=0.0)), list(ps.items()))
    for _ in range(10):
        params, state = opt.update(params, loss_grads(params)[1], state)
        g = loss_grads({k: p.detach() for k, p in ps.items()})[1]
        for k, p in ps.items():
            p.grad = g[k].clone()
        drop_in.step()
        assert err(ps, {k: host(v) for k, v in params.items()}) == 0


@pytest.mark.parametrize("backend", {"numpy": NumpyBackend, "torch": TorchBackend,
                                     "jax": JaxBackend}.items(), ids=lambda b: b[0])
def test_make_train_step_is_evaluate_and_update(backend):
    def problem():
        spec = mlp_spec(8, 4, [16])
        be = backend[1](dtype="float32", seed=0)
        compiled = ml.compile(spec.model, be, shapes=spec.shapes)
        rng = np.random.default_rng(0)
        data = [{"input": be.array(rng.standard_normal((16, 8)).astype(np.float32)),
                 "target": be.array(rng.integers(0, 4, 16), be.int_dtype)} for _ in range(3)]
        return compiled, be, data

    compiled, be, data = problem()
    opt = ScheduleFree(Adam(1e-2, beta1=0.0))
    params = compiled.get_parameters()
    state = opt.init(params)
    for batch in data:
        _, grads = compiled.evaluate(params, batch, output_gradients={"loss": 1.0})
        params, state = opt.update(params, grads, state)
    compiled2, be2, _ = problem()
    step = make_train_step(compiled2, ScheduleFree(Adam(1e-2, beta1=0.0)), loss="loss")
    p2 = compiled2.get_parameters()
    s2 = step.init(p2)
    for batch in data:
        p2, s2, _ = step(p2, s2, batch)
    # (JAX: one program, mithril.interop.optax_outer, its scalars in float32; NumPy and
    # torch: bit for bit)
    assert step.fused == (backend[0] == "jax")
    tol = 2e-6 if step.fused else 0.0
    for k in params:
        np.testing.assert_allclose(np.asarray(be2.to_numpy(p2[k])),
                                   np.asarray(be.to_numpy(params[k])), rtol=tol, atol=tol,
                                   err_msg=k)
