"""optax's and Keras 3's decay schedules side by side with ours (:class:`ExponentialDecay`,
:class:`PolynomialDecay`, :class:`InverseTimeDecay`, and optax's composite schedules written
with ours), and a Keras optimizer driven by a schedule against ours driven by the scheduler.

The references come from ONE subprocess (JAX's x64 switch is process-global), evaluated in
float64 at steps ``0..N`` and at a few huge steps; ours must agree at ``1e-12`` relative.
Keras 3.15's jax backend computes ``ops.floor`` and ``ops.ceil`` of float64 tensors in
float32 (``result_type(float64, float)`` is float32 there), which changes a staircase or a
cycle only past ``2**24`` steps (from step ``2**31`` on, ``InverseTimeDecay(staircase=True)``
is off by 4e-8 and ``PolynomialDecay(cycle=True)`` with ``decay_steps=1`` goes below its
``end_learning_rate``): Keras is evaluated as it is (compared up to step ``N``) and with
those two ops in float64 (compared at every step).
optax and Keras evaluate a schedule at the optimizer's count *before* incrementing it (the
first update at 0); our scheduler, stepped after each update, gives update ``k`` the rate of
step ``k``: the same.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import run_python
from scheduler_parity import FakeOpt, N, assert_rel

import mithril.utils.optimizers as mo
from mithril.utils.accumulation import Accumulate
from mithril.utils.lr_schedulers import (
    WSD,
    ExponentialDecay,
    InverseTimeDecay,
    JoinSchedules,
    PiecewiseInterpolate,
    PolynomialDecay,
    ReduceLROnPlateau,
)

BASE = 0.1
HUGE = [10**6, 2**31 + 7, 10**12]

#: name -> (ours: an expression on ``o``, a FakeOpt at ``lr``; the peer's expression; lr)
CASES: dict[str, tuple[str, str, float]] = {
    # optax.exponential_decay
    "exp": ("ExponentialDecay(o, 10, 0.5)", "optax.exponential_decay(B, 10, 0.5)", BASE),
    "exp-stair-begin": ("ExponentialDecay(o, 7.5, 0.9, 20, staircase=True)",
                        "optax.exponential_decay(B, 7.5, 0.9, 20, staircase=True)", BASE),
    "exp-floor": ("ExponentialDecay(o, 10, 0.5, end_value=0.01)",
                  "optax.exponential_decay(B, 10, 0.5, end_value=0.01)", BASE),
    "exp-grow-ceiling": ("ExponentialDecay(o, 10, 1.5, 50, True, 0.5)",
                         "optax.exponential_decay(B, 10, 1.5, 50, True, 0.5)", BASE),
    "exp-end-above-base": ("ExponentialDecay(o, 3, 0.5, 10, end_value=0.2)",
                           "optax.exponential_decay(B, 3, 0.5, 10, end_value=0.2)", BASE),
    "exp-rate-one-end": ("ExponentialDecay(o, 10, 1.0, end_value=0.05)",
                         "optax.exponential_decay(B, 10, 1.0, end_value=0.05)", BASE),
    "exp-one-step": ("ExponentialDecay(o, 1, 0.97, 299)",
                     "optax.exponential_decay(B, 1, 0.97, 299)", BASE),
    # keras.optimizers.schedules.ExponentialDecay
    "keras-exp": ("ExponentialDecay(o, 10, 0.5)", "K.ExponentialDecay(B, 10, 0.5)", BASE),
    "keras-exp-stair": ("ExponentialDecay(o, 7.5, 1.02, staircase=True)",
                        "K.ExponentialDecay(B, 7.5, 1.02, staircase=True)", BASE),
    # optax.polynomial_schedule / linear_schedule / warmup_constant_schedule
    "poly": ("PolynomialDecay(o, 100, 0.001, 2, 50)",
             "optax.polynomial_schedule(B, 0.001, 2, 100, 50)", BASE),
    "poly-sqrt": ("PolynomialDecay(o, 250, 0.0, 0.5)",
                  "optax.polynomial_schedule(B, 0.0, 0.5, 250)", BASE),
    "poly-one-step": ("PolynomialDecay(o, 1, 0.01, 3)",
                      "optax.polynomial_schedule(B, 0.01, 3, 1)", BASE),
    "linear-rising": ("PolynomialDecay(o, 40, 0.3)", "optax.linear_schedule(B, 0.3, 40)", BASE),
    "warmup-constant": ("PolynomialDecay(o, 30, 0.1)",
                        "optax.warmup_constant_schedule(0.0, 0.1, 30)", 0.0),
    # keras PolynomialDecay, cycle included
    "keras-poly": ("PolynomialDecay(o, 40, 0.0001)", "K.PolynomialDecay(B, 40)", BASE),
    "keras-poly-cycle": ("PolynomialDecay(o, 40, 0.001, 2.0, cycle=True)",
                         "K.PolynomialDecay(B, 40, 0.001, 2.0, cycle=True)", BASE),
    "keras-poly-cycle-frac": ("PolynomialDecay(o, 33.5, 0.0, 0.5, cycle=True)",
                              "K.PolynomialDecay(B, 33.5, 0.0, 0.5, cycle=True)", BASE),
    "keras-poly-cycle-one": ("PolynomialDecay(o, 1, 0.01, cycle=True)",
                             "K.PolynomialDecay(B, 1, 0.01, cycle=True)", BASE),
    # keras InverseTimeDecay
    "keras-inv": ("InverseTimeDecay(o, 10, 0.5)", "K.InverseTimeDecay(B, 10, 0.5)", BASE),
    "keras-inv-stair": ("InverseTimeDecay(o, 7, 2.0, staircase=True)",
                        "K.InverseTimeDecay(B, 7, 2.0, staircase=True)", BASE),
    "keras-inv-frac": ("InverseTimeDecay(o, 0.5, 0.1)", "K.InverseTimeDecay(B, 0.5, 0.1)", BASE),
    # optax's composites, written with ours
    "warmup-exp": (
        "JoinSchedules(o, [WSD(o, 20, 0, 0, 0.0, 0.1), "
        "ExponentialDecay(o, 10, 0.8, 15, True, 0.01)], [20])",
        "optax.warmup_exponential_decay_schedule(0.0, B, 20, 10, 0.8, 15, True, 0.01)", BASE),
    "warmup-cosine": ("WSD(o, 20, 0, 180, 0.001, 0.002, 'cosine')",
                      "optax.warmup_cosine_decay_schedule(0.001, B, 20, 200, 0.002)", BASE),
    "cosine-exponent": ("WSD(o, 0, 0, 250, 0.0, 0.02, 'cosine', 2.5)",
                        "optax.cosine_decay_schedule(B, 250, 0.2, 2.5)", BASE),
    "warmup-cosine-exponent": ("WSD(o, 30, 0, 170, 0.0, 0.001, 'cosine', 0.5)",
                               "optax.warmup_cosine_decay_schedule(0.0, B, 30, 200, 0.001, 0.5)",
                               BASE),
    "cosine-rising": ("WSD(o, 0, 0, 100, 0.0, 0.15, 'cosine')",
                      "optax.cosine_decay_schedule(B, 100, 1.5)", BASE),
    "sgdr": (
        "JoinSchedules(o, [WSD(o, 10, 0, 90, 0.0, 0.001, 'cosine') for _ in range(3)], "
        "[100, 200])",
        "optax.sgdr_schedule([dict(init_value=0.0, peak_value=B, warmup_steps=10, "
        "decay_steps=100, end_value=0.001)] * 3)", BASE),
    "cosine-onecycle": ("PiecewiseInterpolate(o, 'cosine', {60: 25.0, 200: 1 / 25e4})",
                        "optax.cosine_onecycle_schedule(200, B)", BASE / 25),
    "linear-onecycle": (
        "PiecewiseInterpolate(o, 'linear', {60: 25.0, 170: 1 / 25, 200: 1e-4})",
        "optax.linear_onecycle_schedule(200, B)", BASE / 25),
}

_NAMES = {"ExponentialDecay": ExponentialDecay, "PolynomialDecay": PolynomialDecay,
          "InverseTimeDecay": InverseTimeDecay, "JoinSchedules": JoinSchedules,
          "WSD": WSD, "PiecewiseInterpolate": PiecewiseInterpolate}


def ours(name: str, lr: float | None = None):
    expr, _, base = CASES[name]
    o = FakeOpt(base if lr is None else lr)
    return eval(expr, {**_NAMES, "o": o}), o


# a Keras or optax optimizer with a schedule as its learning rate against ours: (the peer's
# optimizer, its kwargs, the schedule; our optimizer, its kwargs, our scheduler on o)
TRAJ_STEPS = 30
TRAJECTORIES = {
    "keras-sgd-momentum-exp": ("keras.optimizers.SGD", {"momentum": 0.9},
                               "K.ExponentialDecay(0.1, 4, 0.5, staircase=True)",
                               "SGD", {"momentum": 0.9, "convention": "keras"},
                               "ExponentialDecay(o, 4, 0.5, staircase=True)"),
    "keras-adam-poly-cycle": ("keras.optimizers.Adam", {},
                              "K.PolynomialDecay(0.1, 7, 0.01, 2.0, cycle=True)",
                              "Adam", {"epsilon": 1e-7, "convention": "keras"},
                              "PolynomialDecay(o, 7, 0.01, 2.0, cycle=True)"),
    "keras-rmsprop-inv": ("keras.optimizers.RMSprop", {"momentum": 0.5},
                          "K.InverseTimeDecay(0.1, 3, 1.0)",
                          "RMSProp", {"epsilon": 1e-7, "momentum": 0.5, "convention": "keras"},
                          "InverseTimeDecay(o, 3, 1.0)"),
    # Keras counts the schedule in calls, not in updates: with gradient_accumulation_steps
    # its rate moves on every call (its ``iterations`` counts the updates); ours stepped after
    # every call of the Accumulate wrapper gives the same updates
    "keras-sgd-accumulate": ("keras.optimizers.SGD",
                             {"momentum": 0.9, "gradient_accumulation_steps": 3},
                             "K.ExponentialDecay(0.1, 2, 0.5)",
                             "SGD", {"momentum": 0.9, "convention": "keras", "accumulate": 3},
                             "ExponentialDecay(o, 2, 0.5)"),
    "optax-sgd-momentum-exp": ("optax.sgd", {"momentum": 0.9},
                               "optax.exponential_decay(0.1, 3, 0.7, 5, True, 0.02)",
                               "SGD", {"momentum": 0.9, "convention": "optax"},
                               "ExponentialDecay(o, 3, 0.7, 5, True, 0.02)"),
    "optax-adam-poly": ("optax.adam", {}, "optax.polynomial_schedule(0.1, 0.001, 2, 20, 4)",
                        "Adam", {"convention": "optax"},
                        "PolynomialDecay(o, 20, 0.001, 2, 4)"),
}

# optax.contrib.reduce_on_plateau and Keras's ReduceLROnPlateau callback on one metric
# sequence (a noisy descent): name -> (factor, patience, rtol or atol / min_delta, cooldown,
# min_scale)
PLATEAUS = {"default-ish": (0.5, 3, 1e-4, 0, 0.0), "patience-1": (0.5, 1, 0.05, 0, 0.0),
            "cooldown-floor": (0.7, 5, 0.02, 4, 0.2), "cooldown-1": (0.5, 2, 0.01, 1, 0.0)}
METRICS = [round(float(v), 1) for v in
           np.cumsum(np.random.default_rng(1).standard_normal(120) * 0.3 - 0.12) + 50]

SCRIPT = r"""
import json, os
os.environ["KERAS_BACKEND"] = "jax"
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np
import optax
import keras
keras.config.set_floatx("float64")
from keras.src.backend.jax import numpy as keras_jnp
K = keras.optimizers.schedules
keras_ops = {"floor": keras_jnp.floor, "ceil": keras_jnp.ceil}


def float64_ops(on):  # Keras 3's floor / ceil of float64 compute in float32 (see above)
    for op, f in keras_ops.items():
        setattr(keras_jnp, op, (lambda x, g=getattr(jnp, op): g(jnp.asarray(x))) if on else f)


cases, trajectories = json.loads(%(cases)r), json.loads(%(traj)r)
plateaus, metrics = json.loads(%(plateaus)r), json.loads(%(metrics)r)
steps = jnp.concatenate([jnp.arange(%(n)d + 1.0), jnp.asarray(%(huge)r, dtype=jnp.float64)])
out = {}
for name, (_, peer, _) in cases.items():
    B = np.float64(%(base)r)
    for suffix, on in (("", True), ("/as-is", False)):
        float64_ops(on)
        f = eval(peer)
        out[name + suffix] = [float(v) for v in np.asarray(jax.vmap(f)(steps), np.float64)]
float64_ops(False)
rng = np.random.default_rng(0)
grads = [rng.standard_normal((3, 2)) for _ in range(%(traj_steps)d)]
out["grads"] = [g.tolist() for g in grads]
for name, (popt, kw, sched, *_rest) in trajectories.items():
    traj, lrs = [], []
    if popt.startswith("keras"):
        opt = eval(popt)(learning_rate=eval(sched), **kw)
        v = keras.Variable(np.ones((3, 2)), dtype="float64")
        opt.build([v])
        for g in grads:
            lrs.append(float(opt.learning_rate))  # the rate this update uses
            opt.apply([jnp.asarray(g)], [v])
            traj.append(np.array(v.value).tolist())
    else:  # optax: the schedule at the count before the update increments it; the count
        # is an int32, which optax's schedules turn into float32 rates: made float64 here
        f = eval(sched)
        tx = optax.inject_hyperparams(eval(popt), hyperparam_dtype=jnp.float64)(
            learning_rate=lambda count, f=f: f(jnp.asarray(count, jnp.float64)), **kw)
        w = jnp.ones((3, 2))
        state = tx.init(w)
        for g in grads:
            u, state = tx.update(jnp.asarray(g), state, w)
            lrs.append(float(state.hyperparams["learning_rate"]))  # the rate u used
            w = optax.apply_updates(w, u)
            traj.append(np.array(w).tolist())
    out["traj/" + name] = {"params": traj, "lrs": lrs}
from optax import contrib


class Model:  # what Keras's ReduceLROnPlateau callback reads: model.optimizer
    optimizer = None


for name, (factor, patience, tol, cooldown, min_scale) in plateaus.items():
    for mode in ("rel", "abs"):
        tx = contrib.reduce_on_plateau(factor=factor, patience=patience, cooldown=cooldown,
                                       rtol=tol if mode == "rel" else 0.0,
                                       atol=tol if mode == "abs" else 0.0, min_scale=min_scale)
        w = jnp.zeros(1)
        state = tx.init(w)
        update = jax.jit(lambda s, v: tx.update(jnp.ones(1), s, w, value=v)[1])
        lrs = []
        for v in metrics:
            state = update(state, jnp.asarray(v))
            lrs.append(float(%(base)r * state.scale))
        out[f"plateau/optax-{mode}/{name}"] = lrs
    cb = keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=factor, patience=patience,
                                           min_delta=tol, cooldown=cooldown,
                                           min_lr=min_scale * %(base)r)
    model = Model()
    model.optimizer = keras.optimizers.SGD(learning_rate=%(base)r)
    cb.set_model(model)
    cb.on_train_begin()
    lrs = []
    for i, v in enumerate(metrics):
        cb.on_epoch_end(i, {"loss": v})
        lrs.append(float(np.asarray(model.optimizer.learning_rate)))
    out[f"plateau/keras/{name}"] = lrs
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def references() -> dict:
    code = SCRIPT % {"cases": json.dumps(CASES), "traj": json.dumps(TRAJECTORIES), "n": N,
                     "huge": HUGE, "base": BASE, "traj_steps": TRAJ_STEPS,
                     "plateaus": json.dumps(PLATEAUS), "metrics": json.dumps(METRICS)}
    return json.loads(run_python(code, timeout=300).strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(CASES))
def test_equals_the_peer_in_float64(name: str, references: dict) -> None:
    sched, o = ours(name)
    got = [o.get_learning_rate()]
    for _ in range(N):
        sched.step()
        got.append(o.get_learning_rate())
    assert got == [sched.get_lr_at(t) for t in range(N + 1)]
    assert_rel(got, references[name + "/as-is"][: N + 1])  # Keras as it is, up to N
    want = references[name]
    for t, ref in zip(HUGE, want[N + 1:], strict=True):
        if math.isinf(ref):  # a growing rate without a ceiling: ours says where
            with pytest.raises(ValueError, match=f"at step {t} is inf"):
                sched.get_lr_at(t)
        else:
            got.append(sched.get_lr_at(t))
    assert_rel(got, want[: len(got)])
    assert len(got) == len(want) or name == "keras-exp-stair"


@pytest.mark.parametrize("name", ["exp-stair-begin", "exp-grow-ceiling", "keras-poly-cycle",
                                  "keras-inv-stair", "warmup-exp"])
def test_state_dict_round_trip_mid_run(name: str, references: dict) -> None:
    """Saved at step 37 through JSON, loaded into a fresh one built with other settings: the
    rest of the run is the peer's."""
    sched, o = ours(name)
    for _ in range(37):
        sched.step()
    state = json.loads(json.dumps(sched.state_dict(), allow_nan=False))
    resumed, o2 = ours(name, lr=0.5)  # another base: the state's wins
    resumed.load_state_dict(state)
    assert o2.get_learning_rate() == references[name][37]
    got = []
    for _ in range(40):
        resumed.step()
        got.append(o2.get_learning_rate())
    assert_rel(got, references[name][38:78])


@pytest.mark.parametrize("name", list(TRAJECTORIES))
def test_peer_optimizer_with_a_schedule(name: str, references: dict) -> None:
    """Keras evaluates the schedule at ``iterations`` before the update, optax at its count
    before incrementing it (0 for the first update): ours, stepped after each update, gives
    every update the same rate and the same parameters."""
    *_, our_opt, our_kw, our_sched = TRAJECTORIES[name]
    ref = references["traj/" + name]
    our_kw = dict(our_kw)
    k = our_kw.pop("accumulate", None)  # Keras's gradient_accumulation_steps
    opt = getattr(mo, our_opt)(learning_rate=0.1, **our_kw)
    opt = opt if k is None else Accumulate(opt, k)
    sched = eval(our_sched, {**_NAMES, "o": opt})
    params = {"w": np.ones((3, 2))}
    state = opt.init(params)
    lrs = []
    for t, g in enumerate(references["grads"]):
        lrs.append(opt.get_learning_rate())
        params, state = opt.update(params, {"w": np.asarray(g)}, state)
        sched.step()
        np.testing.assert_allclose(params["w"], ref["params"][t], rtol=1e-12, atol=1e-14)
    assert_rel(lrs, ref["lrs"])


@pytest.mark.parametrize("make,arg", [
    (lambda o: ExponentialDecay(o, 0, 0.5), "transition_steps"),  # optax: constant
    (lambda o: ExponentialDecay(o, 10, 0.0), "decay_rate"),  # optax: constant
    (lambda o: ExponentialDecay(o, 10, -0.5, staircase=True), "decay_rate"),  # optax: ± rates
    (lambda o: ExponentialDecay(o, 10, 0.5, -3), "transition_begin"),  # optax: 0
    (lambda o: ExponentialDecay(o, 10, 0.5, 2.5), "transition_begin"),
    (lambda o: ExponentialDecay(o, 10, 0.5, end_value=-1.0), "end_value"),
    (lambda o: ExponentialDecay(o, 10, 0.5, staircase="False"), "staircase"),
    (lambda o: PolynomialDecay(o, 0, 0.0), "transition_steps"),  # optax: constant
    (lambda o: PolynomialDecay(o, 10, 0.0, power=-1.0), "power"),
    (lambda o: PolynomialDecay(o, 10, float("nan")), "end_value"),
    (lambda o: PolynomialDecay(o, 10, 0.0, cycle=1), "cycle"),
    (lambda o: InverseTimeDecay(o, 0, 0.5), "decay_steps"),  # (as Keras)
    (lambda o: InverseTimeDecay(o, 10, -0.5), "decay_rate"),  # Keras: negative rates
])
def test_what_the_peers_turn_into_odd_schedules_raises(make, arg: str) -> None:
    o = FakeOpt(BASE)
    with pytest.raises(ValueError, match=arg):
        make(o)
    assert o.lr == BASE and o.set_calls == 0


def test_a_bad_hyperparameter_set_mid_run_changes_nothing() -> None:
    o = FakeOpt(BASE)
    sched = ExponentialDecay(o, 10, 0.5, end_value=0.01)
    for _ in range(5):
        sched.step()
    before = (sched.state_dict(), o.lr)
    with pytest.raises(ValueError, match="decay_rate"):
        sched.decay_rate = 0.0
    assert (sched.state_dict(), o.lr) == before
    sched.end_value = None  # from the next step on, no floor
    assert sched.get_lr_at(100) == BASE * 0.5**10


def test_end_value_rules_at_the_edges() -> None:
    # a growing rate with a ceiling never overflows; without one, the step says where
    grow = ExponentialDecay(FakeOpt(BASE), 1, 2.0, end_value=1.0)
    assert grow.get_lr_at(10**12) == 1.0 and grow.get_lr_at(3) == 0.8
    with pytest.raises(ValueError, match="at step 5000 is inf"):
        ExponentialDecay(FakeOpt(BASE), 1, 2.0).get_lr_at(5000)
    # Keras's PolynomialDecay with cycle reaches end_value exactly at each multiple
    cyc = PolynomialDecay(FakeOpt(BASE), 10, 0.001, cycle=True)
    assert [cyc.get_lr_at(t) for t in (0, 10, 20, 30)] == [BASE, 0.001, 0.001, 0.001]
    assert cyc.get_lr_at(11) == pytest.approx(0.001 + (BASE - 0.001) * 0.45, rel=1e-15)


def test_wsd_state_saved_before_exponent_existed_loads() -> None:
    o = FakeOpt(BASE)
    old = WSD(o, 5, 5, 10, decay_type="cosine")
    for _ in range(12):
        old.step()
    state = old.state_dict()
    assert state["exponent"] == 1.0
    del state["exponent"]  # as saved before
    resumed = WSD(FakeOpt(BASE), 5, 5, 10, decay_type="cosine", exponent=3.0)
    resumed.load_state_dict(state)
    assert resumed.exponent == 1.0 and resumed.get_lr_at(17) == old.get_lr_at(17)
    with pytest.raises(ValueError, match="exponent"):
        WSD(FakeOpt(BASE), 5, 5, 10, exponent=-1.0)


def test_per_group_each_group_decays_from_its_own_rate() -> None:
    """As optax's ``multi_transform`` with one schedule per group, each from its own
    ``init_value``: ``per_group=True``."""
    opt = mo.SGD(0.1, param_groups=[{"params": ["b"], "learning_rate": 0.02}])
    sched = ExponentialDecay(opt, 4, 0.5, transition_begin=2, per_group=True)
    for _ in range(10):
        sched.step()
    assert sched.get_last_lrs() == [0.1 * 0.5**2, 0.02 * 0.5**2]
    state = json.loads(json.dumps(sched.state_dict()))
    other = mo.SGD(0.1, param_groups=[{"params": ["b"], "learning_rate": 0.02}])
    resumed = ExponentialDecay(other, 4, 0.5, transition_begin=2, per_group=True)
    resumed.load_state_dict(state)
    resumed.step()
    sched.step()
    assert resumed.get_last_lrs() == sched.get_last_lrs() == [0.1 * 0.5**2.25,
                                                              0.02 * 0.5**2.25]


@pytest.mark.parametrize("peer", ["optax-rel", "optax-abs", "keras"])
@pytest.mark.parametrize("name", list(PLATEAUS))
def test_plateau_as_optax_and_keras(name: str, peer: str, references: dict) -> None:
    """optax reduces when the bad evaluations reach ``patience`` (torch: exceed it) and has no
    ``eps``; Keras's callback too, with an absolute ``min_delta`` and a cooldown that counts
    the evaluation of the reduction: our ReduceLROnPlateau with ``patience - 1``, ``eps=0``
    (and for Keras ``threshold_mode='abs'``, ``cooldown - 1``) gives their rates."""
    factor, patience, tol, cooldown, min_scale = PLATEAUS[name]
    o = FakeOpt(BASE)
    sched = ReduceLROnPlateau(
        o, factor=factor, patience=patience - 1, threshold=tol, min_lr=min_scale * BASE,
        eps=0.0, threshold_mode="rel" if peer == "optax-rel" else "abs",
        cooldown=max(cooldown - 1, 0) if peer == "keras" else cooldown)
    got = []
    for v in METRICS:
        sched.step(v)
        got.append(o.lr)
    want = references[f"plateau/{peer}/{name}"]
    assert len(set(want)) >= 3  # it did reduce, more than once
    assert_rel(got, want)
