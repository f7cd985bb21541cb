"""Review of the learning-rate schedules by a user of torch / optax / Hugging Face schedules.

* Hugging Face ``transformers.optimization``'s recipes (``get_linear_schedule_with_warmup``,
  ``get_cosine_schedule_with_warmup`` with its ``num_cycles``, the hard restarts,
  ``get_polynomial_decay_schedule_with_warmup``, ``get_constant_schedule_with_warmup``,
  ``get_inverse_sqrt_schedule``, ``get_cosine_with_min_lr_schedule_with_warmup``,
  ``get_wsd_schedule`` with its ``warmup_type`` and ``decay_type``): transformers is not
  installed here, so its ``lr_lambda`` functions are copied below as written there and run
  by ``torch.optim.lr_scheduler.LambdaLR`` on a ``torch.optim.SGD`` with momentum; ours
  drive a mithril ``SGD``. Every step's rate and the parameters after the run agree in
  float64 (1e-12).
* optax's ``inject_hyperparams`` with a schedule on ``b1`` and on ``weight_decay`` of
  ``adamw``: ours schedule the same hyperparameters through ``opt.hyperparameter(name)``.
  (optax evaluates a schedule at its int32 count, in float32: the schedules are given a
  float64 count here so that the comparison is of the methods, to 1e-12.)
* an optax schedule object, or any plain ``step -> value`` function, given as it is to
  ``LambdaLR(opt, schedule, base_lr=1.0)``: optax's ``sgd(learning_rate=schedule)``; a Keras
  schedule object the same way: Keras's float32 SGD bit for bit (slow: Keras's import).
* ``mithril plot-schedule``'s rates for each torch-named scheduler it offers against the
  torch scheduler with the same arguments (warm-up and sequences as torch's ``LinearLR`` in
  a ``SequentialLR``).

Schedulers on wrapped optimizers: ``test_review_sched49_wrappers.py``.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from functools import partial

import numpy as np
import pytest
import torch

from mithril.cli.schedule import learning_rates
from mithril.utils import lr_schedulers as L
from mithril.utils.optimizers import SGD, AdamW

TL = torch.optim.lr_scheduler
BASE = 0.1
RTOL = 1e-12


# --------------------------------------------------------------------------------------------
# Hugging Face's lr_lambda functions (transformers/optimization.py), as written there
# --------------------------------------------------------------------------------------------


def hf_linear(current_step, *, num_warmup_steps, num_training_steps):
    if current_step < num_warmup_steps:
        return float(current_step) / float(max(1, num_warmup_steps))
    return max(0.0, float(num_training_steps - current_step)
               / float(max(1, num_training_steps - num_warmup_steps)))


def hf_cosine(current_step, *, num_warmup_steps, num_training_steps, num_cycles,
              min_lr_rate=0.0):
    if current_step < num_warmup_steps:
        return float(current_step) / float(max(1, num_warmup_steps))
    progress = float(current_step - num_warmup_steps) / float(
        max(1, num_training_steps - num_warmup_steps))
    factor = 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))
    factor = factor * (1 - min_lr_rate) + min_lr_rate
    return max(0, factor)


def hf_hard_restarts(current_step, *, num_warmup_steps, num_training_steps, num_cycles):
    if current_step < num_warmup_steps:
        return float(current_step) / float(max(1, num_warmup_steps))
    progress = float(current_step - num_warmup_steps) / float(
        max(1, num_training_steps - num_warmup_steps))
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(num_cycles) * progress) % 1.0))))


def hf_polynomial(current_step, *, num_warmup_steps, num_training_steps, lr_end, power, lr_init):
    if current_step < num_warmup_steps:
        return float(current_step) / float(max(1, num_warmup_steps))
    elif current_step > num_training_steps:
        return lr_end / lr_init
    else:
        lr_range = lr_init - lr_end
        decay_steps = num_training_steps - num_warmup_steps
        pct_remaining = 1 - (current_step - num_warmup_steps) / decay_steps
        decay = lr_range * pct_remaining**power + lr_end
        return decay / lr_init


def hf_constant(current_step, *, num_warmup_steps):
    if current_step < num_warmup_steps:
        return float(current_step) / float(max(1.0, num_warmup_steps))
    return 1.0


def hf_inverse_sqrt(current_step, *, num_warmup_steps, timescale=None):
    if current_step < num_warmup_steps:
        return float(current_step) / float(max(1, num_warmup_steps))
    shift = timescale - num_warmup_steps
    decay = 1.0 / math.sqrt((current_step + shift) / timescale)
    return decay


def hf_wsd(current_step, *, num_warmup_steps, num_stable_steps, num_decay_steps, warmup_type,
           decay_type, min_lr_ratio, num_cycles):
    if current_step < num_warmup_steps:
        progress = float(current_step) / float(max(1, num_warmup_steps))
        if warmup_type == "linear":
            factor = progress
        elif warmup_type == "cosine":
            factor = 0.5 * (1.0 - math.cos(math.pi * progress))
        elif warmup_type == "1-sqrt":
            factor = 1.0 - math.sqrt(1.0 - progress)
        factor = factor * (1.0 - min_lr_ratio) + min_lr_ratio
        return max(0.0, factor)
    if current_step < num_warmup_steps + num_stable_steps:
        return 1.0
    if current_step < num_warmup_steps + num_stable_steps + num_decay_steps:
        progress = float(current_step - num_warmup_steps - num_stable_steps) / float(
            max(1, num_decay_steps))
        if decay_type == "linear":
            factor = 1.0 - progress
        elif decay_type == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))
        elif decay_type == "1-sqrt":
            factor = 1.0 - math.sqrt(progress)
        factor = factor * (1.0 - min_lr_ratio) + min_lr_ratio
        return max(0.0, factor)
    return min_lr_ratio


# --------------------------------------------------------------------------------------------
# side by side: a torch SGD under LambdaLR(HF lambda) and a mithril SGD under ours
# --------------------------------------------------------------------------------------------


def _side_by_side(ours: Callable[[SGD], L.LRScheduler], hf: Callable[[int], float],
                  steps: int) -> None:
    rng = np.random.default_rng(7)
    p0 = rng.standard_normal(6)
    grads = rng.standard_normal((steps, 6))
    opt = SGD(learning_rate=BASE, momentum=0.9)
    sched = ours(opt)
    params = {"w": p0.copy()}
    state = opt.init(params)
    w = torch.nn.Parameter(torch.tensor(p0, dtype=torch.float64))
    ref = torch.optim.SGD([w], lr=BASE, momentum=0.9)
    ref_sched = TL.LambdaLR(ref, hf)
    for t in range(steps):
        lr, ref_lr = opt.get_learning_rate(), ref.param_groups[0]["lr"]
        assert abs(lr - ref_lr) <= RTOL * max(abs(ref_lr), 1e-300), (t, lr, ref_lr)
        params, state = opt.update(params, {"w": grads[t].copy()}, state)
        w.grad = torch.tensor(grads[t], dtype=torch.float64)
        ref.step()
        sched.step()
        ref_sched.step()
    np.testing.assert_allclose(params["w"], w.detach().numpy(), rtol=RTOL, atol=1e-14)


W, T = 10, 100


def _warm(o):  # a linear warm-up from 0 to the optimizer's rate, nothing else
    return L.WSD(o, W, 0, 0)


HF_CASES = {
    # get_linear_schedule_with_warmup(opt, W, T), past T too (0 there)
    "linear": (lambda o: L.WSD(o, W, 0, T - W),
               partial(hf_linear, num_warmup_steps=W, num_training_steps=T), 130),
    # get_cosine_schedule_with_warmup(opt, W, T) up to T
    "cosine": (lambda o: L.WSD(o, W, 0, T - W, decay_type="cosine"),
               partial(hf_cosine, num_warmup_steps=W, num_training_steps=T, num_cycles=0.5),
               T + 1),
    # ... and past T, where HF's cosine rises again as torch's CosineAnnealingLR does
    "cosine-past-end": (lambda o: L.SequentialLR(o, [_warm(o), L.CosineAnnealingLR(o, T - W)],
                                                 [W]),
                        partial(hf_cosine, num_warmup_steps=W, num_training_steps=T,
                                num_cycles=0.5), 3 * T),
    # num_cycles=2 over T - W = 88 steps: a full cosine wave every 44, T_max = 22
    "cosine-2-cycles": (lambda o: L.SequentialLR(o, [_warm(o), L.CosineAnnealingLR(o, 22)],
                                                 [W]),
                        partial(hf_cosine, num_warmup_steps=W, num_training_steps=W + 88,
                                num_cycles=2), 150),
    # get_cosine_with_min_lr_schedule_with_warmup(opt, W, T, min_lr_rate=0.05) up to T
    "cosine-min-lr": (lambda o: L.WSD(o, W, 0, T - W, final_lr=0.05 * BASE,
                                      decay_type="cosine"),
                      partial(hf_cosine, num_warmup_steps=W, num_training_steps=T,
                              num_cycles=0.5, min_lr_rate=0.05), T + 1),
    # get_cosine_with_hard_restarts_schedule_with_warmup(opt, W, T, num_cycles=3), then 0
    "hard-restarts": (lambda o: L.SequentialLR(o, [_warm(o), L.CosineAnnealingWarmRestarts(
        o, (T - W) // 3), L.ConstantLR(o, 0.0, 10**9)], [W, T]),
                      partial(hf_hard_restarts, num_warmup_steps=W, num_training_steps=T,
                              num_cycles=3), 2 * T),
    # get_polynomial_decay_schedule_with_warmup(opt, W, T, lr_end=1e-4, power=2)
    "polynomial": (lambda o: L.JoinSchedules(o, [_warm(o), L.PolynomialDecay(o, T - W, 1e-4,
                                                                             power=2.0)], [W]),
                   partial(hf_polynomial, num_warmup_steps=W, num_training_steps=T, lr_end=1e-4,
                           power=2.0, lr_init=BASE), 2 * T),
    # get_constant_schedule_with_warmup(opt, W): optax's warmup_constant from 0
    "constant": (lambda o: L.PolynomialDecay(o, W, BASE, base_lr=0.0),
                 partial(hf_constant, num_warmup_steps=W), 60),
    # get_inverse_sqrt_schedule(opt, W) and with its timescale
    "inverse-sqrt": (lambda o: L.InverseSqrt(o, W),
                     partial(hf_inverse_sqrt, num_warmup_steps=W, timescale=W), 400),
    "inverse-sqrt-timescale": (lambda o: L.InverseSqrt(o, W, timescale=37),
                               partial(hf_inverse_sqrt, num_warmup_steps=W, timescale=37), 400),
}


@pytest.mark.parametrize("name", list(HF_CASES))
def test_hugging_face_recipes_side_by_side(name):
    ours, hf, steps = HF_CASES[name]
    _side_by_side(ours, hf, steps)


@pytest.mark.parametrize("warmup_type", ["linear", "cosine", "1-sqrt"])
@pytest.mark.parametrize("decay_type", ["linear", "cosine", "1-sqrt"])
def test_hugging_face_wsd_every_warmup_and_decay(warmup_type, decay_type):
    # get_wsd_schedule(opt, 12, 40, num_stable_steps=30, warmup_type, decay_type,
    # min_lr_ratio=0.1): WSD(opt, 12, 30, 40, 0.1 * base, 0.1 * base, decay_type, warmup_type=)
    hf = partial(hf_wsd, num_warmup_steps=12, num_stable_steps=30, num_decay_steps=40,
                 warmup_type=warmup_type, decay_type=decay_type, min_lr_ratio=0.1,
                 num_cycles=0.5)
    _side_by_side(lambda o: L.WSD(o, 12, 30, 40, 0.1 * BASE, 0.1 * BASE, decay_type,
                                  warmup_type=warmup_type), hf, 100)


def test_wsd_warmup_type_checked_saved_and_set():
    opt = SGD(learning_rate=BASE)
    with pytest.raises(ValueError, match="warmup_type must be one of"):
        L.WSD(opt, 5, 0, 5, warmup_type="cos")
    assert opt.get_learning_rate() == BASE  # a refused construction changes nothing
    sched = L.WSD(opt, 8, 2, 8, warmup_type="cosine")
    for _ in range(3):
        sched.step()
    state = json.loads(json.dumps(sched.state_dict()))
    assert state["warmup_type"] == "cosine"
    lr = opt.get_learning_rate()
    assert abs(lr - BASE * 0.5 * (1 - math.cos(math.pi * 3 / 8))) < 1e-15
    # a bad value set later is refused, naming it, and changes nothing
    with pytest.raises(ValueError, match="warmup_type"):
        sched.warmup_type = "exp"
    assert sched.warmup_type == "cosine" and opt.get_learning_rate() == lr
    assert sched.state_dict() == state
    # resumed into a scheduler built with the default (linear) warm-up: the saved one wins
    resumed = L.WSD(SGD(learning_rate=BASE), 8, 2, 8)
    resumed.load_state_dict(state)
    assert resumed.warmup_type == "cosine"
    assert [resumed.get_lr_at(t) for t in range(20)] == [sched.get_lr_at(t) for t in range(20)]
    # a state saved before warmup_type existed loads as the linear warm-up it was
    old = {k: v for k, v in L.WSD(SGD(learning_rate=BASE), 8, 2, 8).state_dict().items()
           if k != "warmup_type"}
    again = L.WSD(SGD(learning_rate=BASE), 8, 2, 8, warmup_type="1-sqrt")
    again.load_state_dict(old)
    assert again.warmup_type == "linear" and again.get_lr_at(4) == BASE * 4 / 8


# --------------------------------------------------------------------------------------------
# optax: schedules on hyperparameters other than the rate, schedules given as functions
# --------------------------------------------------------------------------------------------


def _optax():
    optax = pytest.importorskip("optax")
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    return optax, jax.numpy


def test_optax_inject_hyperparams_b1_and_weight_decay_schedules():
    optax, jnp = _optax()
    rng = np.random.default_rng(3)
    p0, grads = rng.standard_normal(5), rng.standard_normal((14, 5))

    def f64(schedule):  # optax evaluates at an int32 count in float32: float64 here
        return lambda count: schedule(jnp.asarray(count, jnp.float64))

    tx = optax.inject_hyperparams(optax.adamw, hyperparam_dtype=jnp.float64)(
        learning_rate=0.01, b1=f64(optax.linear_schedule(0.5, 0.9, 6)), b2=0.999, eps=1e-8,
        weight_decay=f64(optax.exponential_decay(0.1, 4, 0.5)))
    ref = jnp.asarray(p0)
    ref_state = tx.init(ref)
    opt = AdamW(learning_rate=0.01, beta1=0.5, beta2=0.999, epsilon=1e-8, weight_decay=0.1)
    beta1 = L.PolynomialDecay(opt.hyperparameter("beta1"), 6, 0.9)
    decay = L.ExponentialDecay(opt.hyperparameter("weight_decay"), 4, 0.5)
    params = {"w": p0.copy()}
    state = opt.init(params)
    for g in grads:
        u, ref_state = tx.update(jnp.asarray(g), ref_state, ref)
        ref = optax.apply_updates(ref, u)
        params, state = opt.update(params, {"w": g.copy()}, state)
        # the values the update just used, as optax records them
        assert abs(float(ref_state.hyperparams["b1"]) - opt.beta1) <= 1e-15
        assert abs(float(ref_state.hyperparams["weight_decay"]) - opt.weight_decay) <= 1e-16
        beta1.step()
        decay.step()
    np.testing.assert_allclose(params["w"], np.asarray(ref), rtol=RTOL, atol=1e-15)
    assert opt.beta1 == 0.9 and abs(opt.weight_decay - 0.1 * 0.5 ** (14 / 4)) < 1e-16


@pytest.mark.parametrize("kind", ["optax-object", "python-function"])
def test_a_schedule_function_given_as_it_is(kind):
    optax, jnp = _optax()
    schedule = optax.warmup_cosine_decay_schedule(0.0, 0.1, 10, 60, 1e-3)
    if kind == "python-function":  # the optax convention: step -> the rate itself
        def schedule(step):
            return 0.1 * 0.97**step if step >= 5 else 0.02 * step
    rng = np.random.default_rng(5)
    p0, grads = rng.standard_normal(4), rng.standard_normal((70, 4))
    tx = optax.sgd(learning_rate=lambda c: schedule(jnp.asarray(c, jnp.int64)), momentum=0.9)
    ref = jnp.asarray(p0)
    ref_state = tx.init(ref)
    opt = SGD(learning_rate=0.5, momentum=0.9)  # its own rate is unused: base_lr=1.0
    sched = L.LambdaLR(opt, schedule, base_lr=1.0)
    params = {"w": p0.copy()}
    state = opt.init(params)
    for t, g in enumerate(grads):
        assert abs(opt.get_learning_rate() - float(schedule(t))) <= 1e-15
        u, ref_state = tx.update(jnp.asarray(g), ref_state, ref)
        ref = optax.apply_updates(ref, u)
        params, state = opt.update(params, {"w": g.copy()}, state)
        sched.step()
    np.testing.assert_allclose(params["w"], np.asarray(ref), rtol=RTOL, atol=1e-15)


# --------------------------------------------------------------------------------------------
# mithril plot-schedule against torch, each torch-named scheduler it offers
# --------------------------------------------------------------------------------------------

N = 300
CLI_CASES = {
    "none": ([("none", {})], {}, lambda o: TL.ConstantLR(o, 1.0, 1)),
    "step": ([("step", {})], {}, lambda o: TL.StepLR(o, N // 3, 0.1)),
    "multistep": ([("multistep", {"milestones": [50, 120, 200], "gamma": 0.3})], {},
                  lambda o: TL.MultiStepLR(o, [50, 120, 200], 0.3)),
    "exponential": ([("exponential", {})], {}, lambda o: TL.ExponentialLR(o, 0.01 ** (1 / N))),
    "cosine": ([("cosine", {})], {}, lambda o: TL.CosineAnnealingLR(o, N)),
    "cosine-past-t-max": ([("cosine", {"t_max": 100, "eta_min": 0.01})], {},
                          lambda o: TL.CosineAnnealingLR(o, 100, 0.01)),
    "cosine-restarts": ([("cosine-restarts", {"t_0": 20, "t_mult": 2, "eta_min": 1e-3})], {},
                        lambda o: TL.CosineAnnealingWarmRestarts(o, 20, 2, 1e-3)),
    "onecycle": ([("onecycle", {})], {},
                 lambda o: TL.OneCycleLR(o, BASE, total_steps=N, cycle_momentum=False)),
    "onecycle-linear-3": ([("onecycle", {"anneal_strategy": "linear", "three_phase": True,
                                         "max_lr": 0.5, "pct_start": 0.25})], {},
                          lambda o: TL.OneCycleLR(o, 0.5, total_steps=N, pct_start=0.25,
                                                  anneal_strategy="linear", three_phase=True,
                                                  cycle_momentum=False)),
    "warmup-cosine": ([("cosine", {})], {"warmup_steps": 30, "warmup_start_lr": 0.01},
                      lambda o: TL.SequentialLR(o, [TL.LinearLR(o, 0.1, 1.0, 30),
                                                    TL.CosineAnnealingLR(o, N - 30)], [30])),
    "warmup-sequence": ([("step", {"step_size": 50, "gamma": 0.5}), ("exponential",
                                                                     {"gamma": 0.99})],
                        {"switch_at": [150], "warmup_steps": 20, "warmup_start_lr": 0.02},
                        lambda o: TL.SequentialLR(o, [TL.LinearLR(o, 0.2, 1.0, 20),
                                                      TL.StepLR(o, 50, 0.5),
                                                      TL.ExponentialLR(o, 0.99)], [20, 150])),
}


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_plot_schedule_rates_equal_torch(name):
    specs, settings, make = CLI_CASES[name]
    ours, _ = learning_rates(specs, settings, N, BASE)
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))], lr=BASE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch's SequentialLR / step-order warnings)
        ref_sched = make(ref_opt)
        ref = []
        for _ in range(N):
            ref.append(ref_opt.param_groups[0]["lr"])
            ref_opt.step()
            ref_sched.step()
    np.testing.assert_allclose(ours, ref, rtol=1e-13, atol=1e-17)



@pytest.mark.slow  # (importing Keras takes ~10 s of CPU)
def test_a_keras_schedule_object_given_as_it_is_float32_bit_for_bit():
    # Keras's SGD(learning_rate=CosineDecay(...)) in its float32: LambdaLR(opt, schedule,
    # base_lr=1.0) on float32 parameters gives the same parameters, bit for bit
    import os

    os.environ.setdefault("KERAS_BACKEND", "jax")  # (read at import; a set one is kept)
    keras = pytest.importorskip("keras")
    schedule = keras.optimizers.schedules.CosineDecay(0.01, 50, warmup_target=0.1,
                                                      warmup_steps=10)
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(6).astype(np.float32)
    grads = rng.standard_normal((60, 6)).astype(np.float32)
    var = keras.Variable(p0)
    ref = keras.optimizers.SGD(learning_rate=schedule)
    ref.build([var])
    opt = SGD(learning_rate=0.3)
    sched = L.LambdaLR(opt, schedule, base_lr=1.0)
    params = {"w": p0.copy()}
    state = opt.init(params)
    for t, g in enumerate(grads):
        assert opt.get_learning_rate() == float(schedule(t))
        ref.apply_gradients([(keras.ops.convert_to_tensor(g), var)])
        params, state = opt.update(params, {"w": g.copy()}, state)
        sched.step()
    assert params["w"].dtype == np.float32
    np.testing.assert_array_equal(params["w"], np.asarray(keras.ops.convert_to_numpy(var.value)))
