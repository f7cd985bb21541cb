"""``convention="mlx"`` against a NumPy float64 transcription of MLX's optimizers and
schedules, on the NumPy, torch and JAX backends, and ``mlx_optimizer``'s tree conventions.

The reference below (:class:`MlxRef` and its subclasses, :func:`mlx_schedule`) is a
line-by-line transcription of ``apply_single`` / ``init_single`` in MLX 0.32's
``python/mlx/optimizers/optimizers.py``, of ``Optimizer.apply_gradients`` (schedule at the
step count, then ``step + 1``, then the update) and of ``python/mlx/optimizers/schedulers.py``
(github.com/ml-explore/mlx). Where MLX computes with its ``uint64`` step array and Python
floats (weakly typed), the scalar is float32 (``b1**step``, ``rsqrt(1 - b2**step)``,
Adafactor's ``step**decay_rate`` and relative step, the schedules): :func:`f32` marks those.
MLX's learning rate is given as a float64 array (a float would be float32), the value Mithril
takes. Nothing here needs MLX; where it is installed, the reference is checked against it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mithril.utils.lr_schedulers import WSD, ExponentialLR, JoinSchedules, PolynomialDecay, StepLR
from mithril.utils.optimizers import (
    SGD,
    Adadelta,
    Adafactor,
    AdaGrad,
    Adam,
    Adamax,
    AdamW,
    Lion,
    Muon,
    RMSProp,
    clip_gradients,
    global_norm,
)

STEPS, TOL = 22, 1e-12
SHAPES = {"w": (4, 3), "wide": (2, 5), "k": (2, 3, 4), "b": (4,), "one": (1,), "s": ()}


def f32(x: float | np.ndarray) -> np.float32:
    """A scalar MLX computes in float32 (its uint64 step with a weakly typed Python float)."""
    return np.float32(x)


def rsqrt32(x: np.float32) -> np.float32:
    return np.float32(1) / np.sqrt(np.float32(x))


# -- the transcription: python/mlx/optimizers/optimizers.py (MLX 0.32) ----------------------
class MlxRef:
    """``Optimizer``: one ``step`` for all parameters; ``init_single`` per parameter at the
    first call; ``learning_rate = schedule(step)`` before ``step += 1``; ``apply_single``
    over the gradients' leaves."""

    def __init__(self, learning_rate=None):
        self.schedule = learning_rate if callable(learning_rate) else None
        self.learning_rate = None if callable(learning_rate) else learning_rate
        self.step = 0
        self.state: dict[str, dict] = {}

    def apply_gradients(self, gradients: dict, parameters: dict) -> dict:
        if not self.state:
            for k, p in gradients.items():
                self.state[k] = {}
                self.init_single(p, self.state[k])
        if self.schedule is not None:
            self.learning_rate = float(self.schedule(self.step))
        self.step += 1
        return {k: self.apply_single(g.copy(), parameters[k].copy(), self.state[k])
                for k, g in gradients.items()}

    def init_single(self, parameter, state):
        raise NotImplementedError

    def apply_single(self, gradient, parameter, state):
        raise NotImplementedError


class RefSGD(MlxRef):
    def __init__(self, learning_rate, momentum=0.0, weight_decay=0.0, dampening=0.0,
                 nesterov=False):
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening.")
        super().__init__(learning_rate)
        self.momentum, self.weight_decay = momentum, weight_decay
        self.dampening, self.nesterov = dampening, nesterov

    def init_single(self, parameter, state):
        state["v"] = np.zeros_like(parameter)

    def apply_single(self, gradient, parameter, state):
        if self.weight_decay != 0:
            gradient += self.weight_decay * parameter
        if self.momentum <= 0:
            return parameter - self.learning_rate * gradient
        v = self.momentum * state.get("v")
        if self.dampening > 0:
            v += (1 - self.dampening) * gradient
        else:
            v += gradient
        update = gradient + self.momentum * v if self.nesterov else v
        state["v"] = v
        return parameter - self.learning_rate * update


class RefRMSprop(MlxRef):
    def __init__(self, learning_rate, alpha=0.99, eps=1e-8):
        super().__init__(learning_rate)
        self.alpha, self.eps = alpha, eps

    def init_single(self, parameter, state):
        state["v"] = np.zeros_like(parameter)

    def apply_single(self, gradient, parameter, state):
        lr, alpha, eps = self.learning_rate, self.alpha, self.eps
        v = state["v"]
        v = alpha * v + (1 - alpha) * np.square(gradient)
        state["v"] = v
        return parameter - lr * gradient / (np.sqrt(v) + eps)


class RefAdagrad(MlxRef):
    def __init__(self, learning_rate, eps=1e-8):
        super().__init__(learning_rate)
        self.eps = eps

    def init_single(self, parameter, state):
        state["v"] = np.zeros_like(parameter)

    def apply_single(self, gradient, parameter, state):
        lr, eps = self.learning_rate, self.eps
        v = state["v"] + np.square(gradient)
        state["v"] = v
        return parameter - lr * gradient / (np.sqrt(v) + eps)


class RefAdaDelta(MlxRef):
    def __init__(self, learning_rate, rho=0.9, eps=1e-6):
        super().__init__(learning_rate)
        self.rho, self.eps = rho, eps

    def init_single(self, parameter, state):
        state["v"] = np.zeros_like(parameter)
        state["u"] = np.zeros_like(parameter)

    def apply_single(self, gradient, parameter, state):
        lr, rho, eps = self.learning_rate, self.rho, self.eps
        v, u = state["v"], state["u"]
        v = rho * v + (1 - rho) * np.square(gradient)
        d = np.sqrt(u + eps) / np.sqrt(v + eps) * gradient
        u = rho * u + (1 - rho) * np.square(d)
        state["v"], state["u"] = v, u
        return parameter - lr * d


class RefAdam(MlxRef):
    def __init__(self, learning_rate, betas=(0.9, 0.999), eps=1e-8, bias_correction=False):
        super().__init__(learning_rate)
        self.betas, self.eps, self.bias_correction = betas, eps, bias_correction

    def init_single(self, parameter, state):
        state["m"] = np.zeros_like(parameter)
        state["v"] = np.zeros_like(parameter)

    def apply_single(self, gradient, parameter, state):
        lr = self.learning_rate
        b1, b2 = self.betas
        eps, step = self.eps, self.step
        m = b1 * state["m"] + (1 - b1) * gradient
        v = b2 * state["v"] + (1 - b2) * np.square(gradient)
        state["m"], state["v"] = m, v
        if self.bias_correction:
            c1 = lr / np.float64(f32(1) - f32(b1) ** f32(step))  # (b1**step: float32)
            c2 = np.float64(rsqrt32(f32(1) - f32(b2) ** f32(step)))
            numerator = c1 * m
            denominator = np.sqrt(v) * c2 + eps
            return parameter - numerator / denominator
        return parameter - lr * m / (np.sqrt(v) + eps)


class RefAdamW(RefAdam):
    def __init__(self, learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                 bias_correction=False):
        super().__init__(learning_rate, betas, eps, bias_correction)
        self.weight_decay = weight_decay

    def apply_single(self, gradient, parameter, state):
        lr = self.learning_rate
        return super().apply_single(gradient, parameter * (1 - lr * self.weight_decay), state)


class RefAdamax(RefAdam):
    def __init__(self, learning_rate, betas=(0.9, 0.999), eps=1e-8):
        super().__init__(learning_rate, betas, eps)
        del self.bias_correction  # (MLX's Adamax has none)

    def apply_single(self, gradient, parameter, state):
        lr = self.learning_rate
        b1, b2 = self.betas
        m = b1 * state["m"] + (1 - b1) * gradient
        v = np.maximum(b2 * state["v"], np.abs(gradient))
        state["m"], state["v"] = m, v
        return parameter - lr * m / (v + self.eps)


class RefLion(MlxRef):
    def __init__(self, learning_rate, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(learning_rate)
        self.betas, self.weight_decay = betas, weight_decay

    def init_single(self, parameter, state):
        state["m"] = np.zeros_like(parameter)

    def apply_single(self, gradient, parameter, state):
        lr = self.learning_rate
        b1, b2 = self.betas
        m = state["m"]
        c = b1 * m + (1 - b1) * gradient
        state["m"] = b2 * m + (1 - b2) * gradient
        if self.weight_decay > 0:
            parameter = (1 - lr * self.weight_decay) * parameter
        return parameter - lr * np.sign(c)


class RefAdafactor(MlxRef):
    def __init__(self, learning_rate=None, eps=(1e-30, 1e-3), clip_threshold=1.0,
                 decay_rate=-0.8, beta_1=None, weight_decay=0.0, scale_parameter=True,
                 relative_step=True, warmup_init=False):
        super().__init__(learning_rate)
        self.eps, self.clip_threshold, self.decay_rate = eps, clip_threshold, decay_rate
        self.beta_1, self.weight_decay = beta_1, weight_decay
        self.scale_parameter, self.relative_step = scale_parameter, relative_step
        self.warmup_init = warmup_init

    def init_single(self, parameter, state):
        if parameter.ndim >= 2:
            shape = parameter.shape
            state["exp_avg_sq_row"] = np.zeros(shape[:-1])
            state["exp_avg_sq_col"] = np.zeros(shape[:-2] + shape[-1:])
        else:
            state["exp_avg_sq"] = np.zeros_like(parameter)
        if self.beta_1 is not None:
            state["exp_avg"] = np.zeros_like(parameter)

    @staticmethod
    def _compute_rms(inputs):
        return np.sqrt(np.mean(np.square(inputs)))

    def _compute_learning_rate(self, step, parameter_rms):
        if self.relative_step:
            min_step = f32(1e-6) * f32(step) if self.warmup_init else f32(1e-2)
            relative_step_size = np.minimum(min_step, rsqrt32(step))  # (float32)
        else:
            relative_step_size = self.learning_rate
        relative_step_size = np.float64(relative_step_size)
        parameter_scale = 1.0
        if self.scale_parameter:
            parameter_scale = np.maximum(self.eps[1], parameter_rms)
        return parameter_scale * relative_step_size

    @staticmethod
    def _approximate_exp_moving_avg(exp_avg_sq_row, exp_avg_sq_col):
        r_factor = 1 / np.sqrt(exp_avg_sq_row / np.mean(exp_avg_sq_row, axis=-1,
                                                        keepdims=True))
        c_factor = 1 / np.sqrt(exp_avg_sq_col)
        return np.expand_dims(r_factor, axis=-1) * np.expand_dims(c_factor, axis=-2)

    def apply_single(self, gradient, parameter, state):
        factored = gradient.ndim >= 2
        step = self.step
        parameter_rms = self._compute_rms(parameter)
        learning_rate = self._compute_learning_rate(step, parameter_rms)
        beta_2 = 1.0 - np.float64(f32(step) ** f32(self.decay_rate))  # (float32 power)
        update = np.square(gradient) + self.eps[0]
        if factored:
            row = beta_2 * state["exp_avg_sq_row"] + (1 - beta_2) * np.mean(update, axis=-1)
            col = beta_2 * state["exp_avg_sq_col"] + (1 - beta_2) * np.mean(update, axis=-2)
            state["exp_avg_sq_row"], state["exp_avg_sq_col"] = row, col
            update = self._approximate_exp_moving_avg(row, col) * gradient
        else:
            exp_avg_sq = beta_2 * state["exp_avg_sq"] + (1 - beta_2) * update
            state["exp_avg_sq"] = exp_avg_sq
            update = 1 / np.sqrt(exp_avg_sq) * gradient
        update = update / np.maximum(1.0, self._compute_rms(update) / self.clip_threshold)
        update = learning_rate * update
        if self.beta_1 is not None:
            exp_avg = self.beta_1 * state["exp_avg"] + (1 - self.beta_1) * update
            state["exp_avg"] = exp_avg
            update = exp_avg
        if self.weight_decay != 0:
            parameter = parameter + parameter * (-self.weight_decay * learning_rate)
        return parameter - update


class RefMuon(MlxRef):
    def __init__(self, learning_rate, momentum=0.95, weight_decay=0.01, nesterov=True,
                 ns_steps=5):
        super().__init__(learning_rate)
        self.momentum, self.weight_decay = momentum, weight_decay
        self.nesterov, self.ns_steps = nesterov, ns_steps

    def init_single(self, parameter, state):
        state["v"] = np.zeros_like(parameter)

    @staticmethod
    def _zeropower_via_newtonschulz5(X, steps):
        a, b, c = (3.4445, -4.7750, 2.0315)
        c = np.float64(f32(c))  # (mx.addmm takes alpha as a float32)
        transpose_needed = X.shape[-2] > X.shape[-1]
        if transpose_needed:
            X = X.T
        X = X / (np.linalg.norm(X) + 1e-7)
        for _ in range(steps):
            A = X @ X.T
            B = c * (A @ A) + b * A  # mx.addmm(b * A, A, A, beta=1.0, alpha=c)
            X = B @ X + a * X  # mx.addmm(a * X, B, X, beta=1.0, alpha=1.0)
        if transpose_needed:
            X = X.T
        return X

    def apply_single(self, gradient, parameter, state):
        if self.weight_decay != 0:
            gradient = gradient + self.weight_decay * parameter
        v = self.momentum * state["v"]
        v = v + (1 - self.momentum) * gradient
        state["v"] = v
        update = gradient * (1 - self.momentum) + v * self.momentum if self.nesterov else v
        lr = self.learning_rate
        if update.ndim >= 2:
            original_shape = update.shape
            if update.ndim > 2:
                update = update.reshape(update.shape[0], -1)
            update = self._zeropower_via_newtonschulz5(update, self.ns_steps)
            update = update.reshape(original_shape)
            lr *= max(1, update.shape[-2] / update.shape[-1]) ** 0.5
        return parameter - lr * update


def ref_clip_grad_norm(grads: dict, max_norm: float) -> tuple[dict, float]:
    """``clip_grad_norm`` (optimizers.py)."""
    if max_norm < 0:
        raise ValueError(f"max_norm should be >=0, {max_norm} was provided instead")
    total_norm = np.sqrt(sum(np.sum(np.square(g)) for g in grads.values()))
    normalizer = np.minimum(max_norm / (total_norm + 1e-6), 1.0)
    return {k: g * normalizer for k, g in grads.items()}, float(total_norm)


# -- the transcription: python/mlx/optimizers/schedulers.py (float32, as MLX's) -------------
def mlx_schedule(name: str, *a):
    if name == "exponential_decay":
        init, decay_rate = map(f32, a)
        return lambda step: init * decay_rate ** f32(step)
    if name == "step_decay":
        init, decay_rate, step_size = f32(a[0]), f32(a[1]), a[2]
        return lambda step: init * decay_rate ** f32(step // step_size)
    if name == "cosine_decay":
        init, decay_steps, end = f32(a[0]), a[1], f32(a[2] if len(a) > 2 else 0.0)

        def cosine(step):
            s = f32(min(step, decay_steps))
            decay = f32(0.5) * (f32(1.0) + np.cos(f32(math.pi / decay_steps) * s))
            return end + decay * (init - end)
        return cosine
    if name == "linear_schedule":
        init, end, steps = f32(a[0]), f32(a[1]), a[2]
        return lambda step: f32(min(step, steps)) * f32((a[1] - a[0]) / steps) + init
    if name == "join_schedules":
        schedules, boundaries = a

        def join(step):
            output = schedules[0](step)
            for boundary, schedule in zip(boundaries, schedules[1:]):
                output = output if step < boundary else schedule(step - boundary)
            return output
        return join
    raise KeyError(name)


# -- the runs ------------------------------------------------------------------------------
def problem(shapes=SHAPES, steps=STEPS, seed=0):
    rng = np.random.default_rng(seed)
    p0 = {k: rng.standard_normal(s) for k, s in shapes.items()}
    # ("b" gets zero gradients on the first two steps: the empty states' edge)
    grads = [{k: rng.standard_normal(s) * (1 + t % 4) * (k != "b" or t >= 2)
              for k, s in shapes.items()} for t in range(steps)]
    return p0, grads


def native(backend: str, a: np.ndarray):
    if backend == "torch":
        return torch.tensor(a)
    if backend == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)  # (conftest restores it after the module)
        return jax.numpy.asarray(a)
    return np.array(a)


def host(x) -> np.ndarray:
    return x.detach().numpy().copy() if isinstance(x, torch.Tensor) else np.array(x)


def run_ref(ref: MlxRef, p0: dict, grads: list) -> list[dict]:
    params, out = {k: v.copy() for k, v in p0.items()}, []
    for g in grads:
        params = ref.apply_gradients(g, params)
        out.append(params)
    return out


def run_ours(opt, p0: dict, grads: list, backend: str, sched=None) -> list[dict]:
    params = {k: native(backend, v) for k, v in p0.items()}
    state, out = opt.init(params), []
    for g in grads:
        params, state = opt.update(params, {k: native(backend, v) for k, v in g.items()},
                                   state)
        if sched is not None:
            sched.step()
        out.append({k: host(v) for k, v in params.items()})
    return out


def worst(ours: list[dict], ref: list[dict]) -> float:
    assert len(ours) == len(ref) == STEPS
    return max(float(np.max(np.abs(o[k] - r[k]))) / max(1.0, float(np.max(np.abs(r[k]))))
               for o, r in zip(ours, ref) for k in r)


LR = 0.01
# id: (Mithril's optimizer, MLX's reference): the same hyperparameters, MLX's names
CASES = {
    "sgd": (lambda: SGD(0.05, convention="mlx"), lambda: RefSGD(0.05)),
    "sgd_dampening_no_momentum": (
        lambda: SGD(0.05, dampening=0.5, weight_decay=0.1, convention="mlx"),
        lambda: RefSGD(0.05, dampening=0.5, weight_decay=0.1)),
    "sgd_momentum_dampening_wd": (
        lambda: SGD(0.05, momentum=0.9, dampening=0.3, weight_decay=0.1, convention="mlx"),
        lambda: RefSGD(0.05, momentum=0.9, dampening=0.3, weight_decay=0.1)),
    "sgd_nesterov_wd": (
        lambda: SGD(0.05, momentum=0.8, nesterov=True, weight_decay=0.1, convention="mlx"),
        lambda: RefSGD(0.05, momentum=0.8, nesterov=True, weight_decay=0.1)),
    "rmsprop": (lambda: RMSProp(LR, convention="mlx"), lambda: RefRMSprop(LR)),
    "rmsprop_alpha0": (lambda: RMSProp(LR, decay=0.0, epsilon=1e-3, convention="mlx"),
                       lambda: RefRMSprop(LR, alpha=0.0, eps=1e-3)),
    "adagrad": (lambda: AdaGrad(0.1, epsilon=1e-3, convention="mlx"),
                lambda: RefAdagrad(0.1, eps=1e-3)),
    "adadelta": (lambda: Adadelta(1.0, convention="mlx"), lambda: RefAdaDelta(1.0)),
    "adadelta_rho0": (lambda: Adadelta(0.5, rho=0.0, epsilon=1e-4, convention="mlx"),
                      lambda: RefAdaDelta(0.5, rho=0.0, eps=1e-4)),
    "adam": (lambda: Adam(LR, convention="mlx"), lambda: RefAdam(LR)),
    "adam_bias_correction": (
        lambda: Adam(LR, beta1=0.8, beta2=0.99, epsilon=1e-3, bias_correction=True,
                     convention="mlx"),
        lambda: RefAdam(LR, betas=(0.8, 0.99), eps=1e-3, bias_correction=True)),
    "adam_betas_0": (lambda: Adam(LR, beta1=0.0, beta2=0.0, bias_correction=True,
                                  convention="mlx"),
                     lambda: RefAdam(LR, betas=(0.0, 0.0), bias_correction=True)),
    "adamw": (lambda: AdamW(LR, weight_decay=0.1, convention="mlx"),
              lambda: RefAdamW(LR, weight_decay=0.1)),
    "adamw_bias_correction": (
        lambda: AdamW(LR, beta1=0.5, weight_decay=0.3, bias_correction=True, convention="mlx"),
        lambda: RefAdamW(LR, betas=(0.5, 0.999), weight_decay=0.3, bias_correction=True)),
    "adamax": (lambda: Adamax(LR, beta2=0.5, epsilon=1e-3, convention="mlx"),
               lambda: RefAdamax(LR, betas=(0.9, 0.5), eps=1e-3)),
    "lion": (lambda: Lion(0.003, convention="mlx"), lambda: RefLion(0.003)),
    "lion_wd": (lambda: Lion(0.003, beta1=0.5, beta2=0.8, weight_decay=0.5, convention="mlx"),
                lambda: RefLion(0.003, betas=(0.5, 0.8), weight_decay=0.5)),
    "adafactor": (lambda: Adafactor(convention="mlx"), lambda: RefAdafactor()),
    "adafactor_unscaled_warmup_wd": (
        lambda: Adafactor(scale_parameter=False, warmup_init=True, weight_decay=0.2,
                          convention="mlx"),
        lambda: RefAdafactor(scale_parameter=False, warmup_init=True, weight_decay=0.2)),
    "adafactor_first_moment_clip": (
        lambda: Adafactor(beta_1=0.9, d=0.3, beta2_decay=-0.5, weight_decay=0.1,
                          convention="mlx"),
        lambda: RefAdafactor(beta_1=0.9, clip_threshold=0.3, decay_rate=-0.5,
                             weight_decay=0.1)),
    "adafactor_lr": (
        lambda: Adafactor(0.03, relative_step=False, beta_1=0.0, epsilon=(1e-10, 1e-2),
                          d=100.0, convention="mlx"),
        lambda: RefAdafactor(0.03, relative_step=False, beta_1=0.0, eps=(1e-10, 1e-2),
                             clip_threshold=100.0)),
    "muon": (lambda: Muon(0.02, convention="mlx"), lambda: RefMuon(0.02)),
    "muon_plain": (lambda: Muon(0.02, momentum=0.5, nesterov=False, weight_decay=0.0,
                                ns_steps=2, convention="mlx"),
                   lambda: RefMuon(0.02, momentum=0.5, nesterov=False, weight_decay=0.0,
                                   ns_steps=2)),
}
FAST = ("sgd_momentum_dampening_wd", "adam_bias_correction", "adafactor_first_moment_clip",
        "muon")


def grid():
    return [pytest.param(b, c, marks=[pytest.mark.slow] if b == "jax" and c not in FAST
                         else []) for c in CASES for b in ("numpy", "torch", "jax")]


@pytest.mark.parametrize("backend, case", grid())
def test_the_mlx_convention_is_mlxs_update_rule(backend, case):
    """Every parameter after every step, to 1e-12 in float64 (0-d, size-1, 3-D included)."""
    ours, ref = CASES[case]
    p0, grads = problem()
    assert worst(run_ours(ours(), p0, grads, backend), run_ref(ref(), p0, grads)) <= TOL


SCHEDULES = {  # id: (MLX's schedule, Mithril's scheduler on an optimizer at rate init, init)
    "exponential_decay": (("exponential_decay", 0.1, 0.9),
                          lambda o: ExponentialLR(o, gamma=0.9), 0.1),
    "step_decay": (("step_decay", 0.1, 0.5, 3), lambda o: StepLR(o, step_size=3, gamma=0.5),
                   0.1),
    "cosine_decay_end": (("cosine_decay", 0.1, 10, 0.02),
                         lambda o: WSD(o, 0, 0, 10, final_lr=0.02, decay_type="cosine"), 0.1),
    "linear_schedule": (("linear_schedule", 0.0, 0.1, 7),
                        lambda o: PolynomialDecay(o, 7, end_value=0.1), 0.0),
}


@pytest.mark.parametrize("name", [*SCHEDULES, "join_schedules"])
def test_schedules_are_mlxs_to_float32_rounding(name):
    """A Mithril scheduler stepped after each update gives MLX's rate at MLX's step count
    (0 before the first update), for 25 steps (past the schedules' ends)."""
    if name == "join_schedules":
        ref = mlx_schedule("join_schedules", [mlx_schedule("linear_schedule", 0.0, 0.1, 5),
                                              mlx_schedule("cosine_decay", 0.1, 10, 0.01)], [5])

        def make(o):
            return JoinSchedules(o, [PolynomialDecay(o, 5, end_value=0.1),
                                     WSD(o, 0, 0, 10, final_lr=0.01, decay_type="cosine",
                                         base_lr=0.1)], [5])
        init = 0.0
    else:
        args, make, init = SCHEDULES[name]
        ref = mlx_schedule(*args)
    opt = SGD(init)
    sched = make(opt)
    for t in range(25):
        theirs = float(ref(t))
        assert abs(opt.learning_rate - theirs) <= 1e-6 * max(abs(theirs), 1e-2), (t, name)
        sched.step()


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
def test_an_mlx_schedule_drives_adam(backend):
    """MLX's ``Adam(learning_rate=schedule, bias_correction=True)``: ``set_learning_rate`` of
    the schedule's value at MLX's step count before each update."""
    sched = mlx_schedule("join_schedules", [mlx_schedule("linear_schedule", 0.0, 0.02, 4),
                                            mlx_schedule("cosine_decay", 0.02, 12, 0.001)], [4])
    p0, grads = problem()
    ref = run_ref(RefAdam(lambda t: float(sched(t)), bias_correction=True), p0, grads)
    opt = Adam(bias_correction=True, convention="mlx")
    params = {k: native(backend, v) for k, v in p0.items()}
    state, got = opt.init(params), []
    for t, g in enumerate(grads):
        opt.set_learning_rate(float(sched(t)))
        params, state = opt.update(params, {k: native(backend, v) for k, v in g.items()},
                                   state)
        got.append({k: host(v) for k, v in params.items()})
    assert worst(got, ref) <= TOL


@pytest.mark.parametrize("max_norm", [0.5, 3.0, 100.0])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_clip_grad_norm(backend, max_norm):
    p0, grads = problem(steps=2)
    theirs, norm = ref_clip_grad_norm(grads[1], max_norm)
    g = {k: native(backend, v) for k, v in grads[1].items()}
    assert abs(float(host(global_norm(g))) - norm) <= 1e-12 * norm
    got = clip_gradients(g, clip_norm=max_norm)
    assert max(float(np.abs(host(got[k]) - theirs[k]).max()) for k in theirs) <= 1e-14
    # the optimizer's own clip_norm= clips first, as clip_grad_norm before MLX's update
    opt = Adam(LR, clip_norm=max_norm, convention="mlx")
    params = {k: native(backend, v) for k, v in p0.items()}
    state = opt.init(params)
    ref, p = RefAdam(LR), dict(p0)
    for gr in grads:
        params, state = opt.update(params, {k: native(backend, v) for k, v in gr.items()},
                                   state)
        p = ref.apply_gradients(ref_clip_grad_norm(gr, max_norm)[0], p)
    assert max(float(np.abs(host(params[k]) - p[k]).max()) for k in p) <= TOL


# -- the reference itself, against MLX where it is installed ---------------------------------
MLX_OF = {"RefSGD": "SGD", "RefRMSprop": "RMSprop", "RefAdagrad": "Adagrad",
          "RefAdaDelta": "AdaDelta", "RefAdam": "Adam", "RefAdamW": "AdamW",
          "RefAdamax": "Adamax", "RefLion": "Lion", "RefAdafactor": "Adafactor",
          "RefMuon": "Muon"}


@pytest.mark.parametrize("case", list(CASES))
def test_the_transcription_is_mlx(case):
    mx = pytest.importorskip("mlx.core")
    optim = pytest.importorskip("mlx.optimizers")
    ref = CASES[case][1]()
    kw = {k: v for k, v in vars(ref).items()
          if k not in ("schedule", "learning_rate", "step", "state")}
    if ref.learning_rate is not None:
        kw["learning_rate"] = mx.array(ref.learning_rate, dtype=mx.float64)
    theirs = getattr(optim, MLX_OF[type(ref).__name__])(**kw)
    p0, grads = problem()
    params, got = {k: mx.array(v, dtype=mx.float64) for k, v in p0.items()}, []
    for g in grads:
        params = theirs.apply_gradients({k: mx.array(v, dtype=mx.float64)
                                         for k, v in g.items()}, params)
        mx.eval(params)
        got.append({k: np.array(v) for k, v in params.items()})
    assert worst(got, run_ref(ref, p0, grads)) <= TOL


# -- mlx_optimizer: MLX's trees of parameters ------------------------------------------------
def _mlx_tree(mx):
    r = np.random.default_rng(3)

    def a(*s):
        return mx.array(r.standard_normal(s), dtype=mx.float64)
    return {"layers": [{"weight": a(3, 2), "bias": a(2)}, {"weight": a(2, 2)}],
            "pair": (a(4), a()), "by_id": {"0": a(3), "7": a(2, 3)}, "frozen": {}}


def test_mlx_optimizer_returns_the_gradients_tree_structure():
    """As MLX's ``tree_map``: a tuple stays a tuple and a dict keyed "0", "7" a dict (they
    came back as a list, and {"1": a, "2": b} as the list [{}, a, b]); the numbers are the
    reference's over 22 steps, 0-d leaf included."""
    mx = pytest.importorskip("mlx.core")
    from mlx.utils import tree_flatten, tree_map

    from mithril.interop import mlx_optimizer

    params = _mlx_tree(mx)
    opt = mlx_optimizer(AdamW(weight_decay=0.1, bias_correction=True, convention="mlx"),
                        learning_rate=mx.array(LR, dtype=mx.float64))
    ref = RefAdamW(LR, weight_decay=0.1, bias_correction=True)
    flat = {k: np.array(v) for k, v in tree_flatten(params)}
    rng = np.random.default_rng(4)
    for _ in range(STEPS):
        grads = tree_map(lambda p: mx.array(rng.standard_normal(p.shape), dtype=mx.float64),
                         params)
        new = opt.apply_gradients(grads, params)
        assert type(new["pair"]) is tuple and isinstance(new["by_id"], dict)
        assert tree_map(lambda x: x.shape, new) == tree_map(lambda x: x.shape, grads)
        flat = ref.apply_gradients({k: np.array(v) for k, v in tree_flatten(grads)}, flat)
        params = new
    got = dict(tree_flatten(params))
    assert max(float(np.abs(np.array(got[k]) - flat[k]).max()) for k in flat) <= TOL
    one = {"1": mx.array([1.0]), "2": mx.array([2.0])}
    out = mlx_optimizer(SGD(0.1)).apply_gradients(one, one)
    assert list(out) == ["1", "2"] and np.allclose(np.array(out["2"]), [1.8])


def test_mlx_optimizer_refuses_two_leaves_of_one_name():
    """{"a.b": x, "a": {"b": y}} flattens to one name twice: one of the two was dropped
    (never updated, missing from the result); now a KeyMismatchError naming it, nothing
    changed."""
    mx = pytest.importorskip("mlx.core")
    from mithril.errors import KeyMismatchError
    from mithril.interop import mlx_optimizer

    opt = mlx_optimizer(SGD(0.1, momentum=0.9, convention="mlx"))
    good = {"a": {"b": mx.array([1.0])}}
    opt.apply_gradients(good, good)
    slots = {k: np.array(v) for k, v in opt.mithril_state.slots.items()}
    tree = {"a.b": mx.array([1.0]), "a": {"b": mx.array([2.0])}}
    with pytest.raises(KeyMismatchError, match=r"gradients names \['a\.b'\] twice"):
        opt.apply_gradients(tree, tree)
    assert opt.state["step"].item() == 1
    assert all(np.array_equal(opt.mithril_state.slots[k], slots[k]) for k in slots)


RANKS = {"tall3": (6, 4, 2), "conv": (8, 2, 3, 3), "tall": (5, 3), "col": (4, 1),
         "row": (1, 4), "unit": (1, 1), "one": (1,), "s": ()}


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("case", ["muon", "adafactor_first_moment_clip",
                                  "adafactor_unscaled_warmup_wd"])
def test_every_rank_as_mlx(backend, case):
    """MLX's Muon orthogonalises ``U.reshape(shape[0], -1)`` (transposed when tall) with
    the rate scaled by the original last two axes; its Adafactor factors the last two axes
    of any tensor of 2+ axes: tall 3-D, 4-D, a column, a row, 1×1, size-1 and 0-d."""
    ours, ref = CASES[case]
    p0, grads = problem(shapes=RANKS)
    assert worst(run_ours(ours(), p0, grads, backend), run_ref(ref(), p0, grads)) <= TOL


def test_mlx_optimizer_sees_a_parameter_edited_in_place():
    """MLX's ``a[i] = v`` edits an array in place (the same object, other values): the
    wrapper took the model's arrays for those it returned and stepped from its own copy,
    dropping the edit; now MLX's numbers (the reference's: SGD with momentum)."""
    mx = pytest.importorskip("mlx.core")
    nn = pytest.importorskip("mlx.nn")
    from mithril.interop import mlx_optimizer

    mx.random.seed(0)
    model = nn.Linear(3, 2)
    model.set_dtype(mx.float64)
    opt = mlx_optimizer(SGD(momentum=0.9, convention="mlx"),
                        learning_rate=mx.array(0.1, dtype=mx.float64))
    ref = RefSGD(0.1, momentum=0.9)
    flat = {"weight": np.array(model.weight), "bias": np.array(model.bias)}
    rng = np.random.default_rng(5)
    for t in range(6):
        g = {k: rng.standard_normal(v.shape) for k, v in flat.items()}
        opt.update(model, {k: mx.array(v, dtype=mx.float64) for k, v in g.items()})
        flat = ref.apply_gradients(g, flat)
        if t % 2 == 0:  # (weight clipping, a manual reset: in place)
            model.weight[0] = 0.0
            model.bias[:] = mx.clip(model.bias, -0.1, 0.1)
            flat["weight"][0] = 0.0
            flat["bias"] = np.clip(flat["bias"], -0.1, 0.1)
    for k, v in flat.items():
        assert np.abs(np.array(getattr(model, k)) - v).max() <= TOL, k
