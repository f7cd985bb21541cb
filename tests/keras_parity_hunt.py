"""Random Keras 3 optimizer configurations and ours for them (see
``tests/test_keras_parity_random.py``): both run in one process (``run``), Keras on the JAX
backend in float64, ours on NumPy."""

from __future__ import annotations

import numpy as np

STEPS = 12
NAMES = ("w", "b", "c", "s")


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _optimizer(rng: np.random.Generator, cls: str) -> tuple[str, dict, dict]:
    """(our class, our kwargs, Keras's kwargs) for Keras's ``cls``, random hyperparameters."""
    b1, b2, eps = _u(rng, 0.5, 0.95), _u(rng, 0.9, 0.999), float(10 ** rng.uniform(-8, -2))
    k = {"beta_1": b1, "beta_2": b2, "epsilon": eps}
    o = {"beta1": b1, "beta2": b2, "epsilon": eps, "convention": "keras"}
    if cls == "SGD":
        m = 0.0 if rng.random() < 0.3 else _u(rng, 0.1, 0.99)
        nes = bool(rng.random() < 0.5)
        return "SGD", {"momentum": m, "nesterov": nes, "convention": "keras"}, {
            "momentum": m, "nesterov": nes}
    if cls == "RMSprop":
        rho, m, c = _u(rng, 0.5, 0.99), (0.0 if rng.random() < 0.4 else _u(rng, 0.1, 0.9)), \
            bool(rng.random() < 0.5)
        return "RMSProp", {"decay": rho, "momentum": m, "centered": c, "epsilon": eps,
                           "convention": "keras"}, {"rho": rho, "momentum": m, "centered": c,
                                                    "epsilon": eps}
    if cls in ("Adam", "AdamW"):
        ams = bool(rng.random() < 0.4)
        return cls, {**o, "amsgrad": ams}, {**k, "amsgrad": ams}
    if cls in ("Adamax", "Nadam", "Lamb"):
        return {"Nadam": "NAdam", "Lamb": "LAMB"}.get(cls, cls), o, k
    if cls == "Lion":
        return "Lion", {"beta1": b1, "beta2": b2, "weight_decay": 0.0}, {
            "beta_1": b1, "beta_2": b2}
    if cls == "Adagrad":
        a0 = _u(rng, 0.0, 0.5)
        return "AdaGrad", {"initial_accumulator_value": a0, "epsilon": eps,
                           "convention": "keras"}, {"initial_accumulator_value": a0,
                                                    "epsilon": eps}
    if cls == "Adadelta":
        rho = _u(rng, 0.5, 0.99)
        return "Adadelta", {"rho": rho, "epsilon": eps, "convention": "keras"}, {
            "rho": rho, "epsilon": eps}
    if cls == "Adafactor":
        e1, e2, d, dec = float(10 ** rng.uniform(-30, -10)), _u(rng, 1e-4, 1e-2), \
            _u(rng, 0.3, 2.0), _u(rng, -0.9, -0.3)
        return "Adafactor", {"epsilon": (e1, e2), "d": d, "beta2_decay": dec,
                             "convention": "keras"}, {"epsilon_1": e1, "epsilon_2": e2,
                                                      "clip_threshold": d,
                                                      "beta_2_decay": dec}
    if cls == "Ftrl":
        kw = {"learning_rate_power": -_u(rng, 0.1, 0.9),
              "initial_accumulator_value": _u(rng, 0.01, 0.5),
              "l1_regularization_strength": _u(rng, 0.0, 0.05),
              "l2_regularization_strength": _u(rng, 0.0, 0.05),
              "l2_shrinkage_regularization_strength": _u(rng, 0.0, 0.05),
              "beta": _u(rng, 0.0, 0.5)}
        return "Ftrl", kw, kw
    if cls == "Muon":
        r, a, rate = _u(rng, 0.2, 1.0), _u(rng, 0.0, 0.05), _u(rng, 0.1, 0.4)
        m, nes = _u(rng, 0.5, 0.95), bool(rng.random() < 0.5)
        return "Muon", {"momentum": m, "nesterov": nes, "adjust_lr_fn": rate,
                        "ns_dtype": None, "fallback": {"AdamW": {
                            "rel_lr": r, "weight_decay": a / r, "beta1": b1, "beta2": b2,
                            "epsilon": eps, "convention": "keras"}}}, {
            "momentum": m, "nesterov": nes, "rms_rate": rate, "adam_lr_ratio": r,
            "adam_weight_decay": a, "adam_beta_1": b1, "adam_beta_2": b2, "epsilon": eps}
    raise ValueError(cls)


CLASSES = ("SGD", "RMSprop", "Adam", "AdamW", "Adamax", "Adagrad", "Adadelta", "Adafactor",
           "Ftrl", "Nadam", "Lion", "Lamb", "Muon")


def config(cls: str, seed: int) -> dict:
    """A random configuration of Keras's ``cls``: its hyperparameters, the BaseOptimizer
    options a Keras user sets (one clipping, weight decay with an exclusion, EMA with an
    overwrite, a loss scale, accumulation, a schedule), shapes, learning rate."""
    rng = np.random.default_rng([seed, CLASSES.index(cls)])
    ours, okw, kkw = _optimizer(rng, cls)
    opts: dict = {}
    clip = rng.choice(["", "clipnorm", "clipvalue", "global_clipnorm"])
    if clip:
        opts[str(clip)] = _u(rng, 0.3, 3.0)
    if rng.random() < 0.6:
        opts["weight_decay"] = _u(rng, 0.01, 0.3)
        if rng.random() < 0.5:
            opts["exclude"] = ["b"]
    accumulate = rng.random() < 0.25
    if accumulate:
        opts["gradient_accumulation_steps"] = int(rng.integers(2, 4))
    elif rng.random() < 0.4:
        opts["use_ema"], opts["ema_momentum"] = True, _u(rng, 0.5, 0.99)
        if rng.random() < 0.5:
            opts["ema_overwrite_frequency"] = int(rng.integers(2, 6))
    if rng.random() < 0.25:
        opts["loss_scale_factor"] = float(2 ** rng.integers(4, 12))
    if rng.random() < 0.4:
        opts["schedule"] = [int(rng.integers(2, 8)), _u(rng, 0.3, 0.9),
                            bool(rng.random() < 0.5)]  # ExponentialDecay(lr, steps, rate, stair)
    shapes = {"w": [int(x) for x in rng.integers(1, 6, 2)], "b": [int(rng.integers(1, 7))],
              "c": [int(x) for x in rng.integers(1, 4, 3)], "s": []}
    if cls == "Muon":  # (a matrix for Muon's own step, not 1-wide)
        shapes["w"] = [int(x) for x in rng.integers(2, 7, 2)]
    return {"cls": cls, "ours": ours, "our_kw": okw, "keras_kw": kkw, "opts": opts,
            "lr": float(10 ** rng.uniform(-3, -1)), "shapes": shapes,
            "missing": bool(not accumulate and rng.random() < 0.4), "seed": seed}


def data(cfg: dict) -> tuple[dict, list]:
    rng = np.random.default_rng(cfg["seed"] + 1000)
    p0 = {k: np.asarray(rng.standard_normal(s)) for k, s in cfg["shapes"].items()}
    grads = [{k: np.asarray(rng.standard_normal(s) * (1 + t % 3))
              for k, s in cfg["shapes"].items()}
             for t in range(STEPS)]
    return p0, grads


def gone(cfg: dict, t: int) -> set:
    if not cfg["missing"]:
        return set()
    return {"b"} if t % 3 == 1 else {"w", "s"} if t % 5 == 3 else set()


def ours(cfg: dict) -> list:
    """Our trajectory (and EMA at the end) for ``cfg``, by the mapping of
    docs/optimizers.md's "From Keras 3"."""
    import mithril.utils.lr_schedulers as ls
    import mithril.utils.optimizers as mo
    from mithril.utils.accumulation import Accumulate

    opts, lr = cfg["opts"], cfg["lr"]
    kw = dict(cfg["our_kw"])
    if "fallback" in kw:
        fb = dict(kw["fallback"]["AdamW"])
        kw["fallback"] = mo.AdamW(learning_rate=lr * fb.pop("rel_lr"), **fb)
    if "weight_decay" in opts:  # (decoupled, before the step: convention="keras")
        kw["weight_decay"] = opts["weight_decay"]
    elif cfg["ours"] in ("AdamW", "Muon"):
        kw["weight_decay"] = 0.004  # (Keras's AdamW's and Muon's default)
    if "clipnorm" in opts:
        kw["clip_tensor_norm"] = opts["clipnorm"]
    if "clipvalue" in opts:
        kw["clip_value"] = opts["clipvalue"]
    if opts.get("use_ema"):
        kw["ema_decay"] = opts["ema_momentum"]
    if "global_clipnorm" in opts and "gradient_accumulation_steps" in opts:
        # Keras clips the window's mean: our clip_norm on the inner optimizer does (with
        # clip_eps=0.0, Keras's c/‖g‖ without torch's 1e-6)
        kw["clip_norm"], kw["clip_eps"] = opts["global_clipnorm"], 0.0
    opt = getattr(mo, cfg["ours"])(learning_rate=lr, **kw)
    if "exclude" in opts:
        opt.exclude_from_weight_decay(var_names=opts["exclude"])
    k = opts.get("gradient_accumulation_steps")
    wrapped = opt if k is None else Accumulate(opt, k)
    sched = None
    if "schedule" in opts:
        steps, rate, stair = opts["schedule"]
        sched = ls.StepLR(wrapped, step_size=steps, gamma=rate) if stair else \
            ls.ExponentialLR(wrapped, gamma=rate ** (1 / steps))
    p0, grads = data(cfg)
    params = {n: v.copy() for n, v in p0.items()}
    state = wrapped.init(params)
    traj = []
    for t in range(STEPS):
        g = {n: v for n, v in grads[t].items() if n not in gone(cfg, t)}
        if "loss_scale_factor" in opts:  # the scaled loss's gradients, divided back
            s = opts["loss_scale_factor"]
            g = {n: np.asarray(np.asarray(v * s) / s) for n, v in g.items()}
        if "global_clipnorm" in opts and k is None:
            g = mo.clip_gradients(g, clip_norm=opts["global_clipnorm"], eps=0.0)
        params, state = wrapped.update(params, g, state)
        if sched is not None:
            sched.step()
        if (t + 1) % opts.get("ema_overwrite_frequency", STEPS + 1) == 0:
            params = {n: np.array(v) for n, v in opt.ema_params(state).items()}
        traj.append({n: np.array(v, dtype=np.float64) for n, v in params.items()})
    ema = opt.ema_params(state) if opts.get("use_ema") else None
    return traj, ema


def keras_run(cfg: dict) -> list:
    """Keras's trajectory (JAX backend, float64: the caller enabled x64)."""
    import jax.numpy as jnp
    import keras

    opts, lr = cfg["opts"], cfg["lr"]
    base = {k: v for k, v in opts.items() if k not in ("exclude", "schedule")}
    if "schedule" in opts:
        steps, rate, stair = opts["schedule"]
        lr = keras.optimizers.schedules.ExponentialDecay(lr, steps, rate, staircase=stair)
    opt = getattr(keras.optimizers, cfg["cls"])(learning_rate=lr, **cfg["keras_kw"], **base)
    if "exclude" in opts:
        opt.exclude_from_weight_decay(var_names=opts["exclude"])
    p0, grads = data(cfg)
    names = list(p0)
    vs = [keras.Variable(p0[n], dtype="float64", name=n) for n in names]
    opt.build(vs)
    s = opts.get("loss_scale_factor", 1.0)
    traj = []
    for t in range(STEPS):
        opt.apply([None if n in gone(cfg, t) else jnp.asarray(grads[t][n] * s) for n in names],
                  vs)
        traj.append({n: np.array(v.value) for n, v in zip(names, vs)})
    ema = {n: np.array(v.value) for n, v in zip(names, opt._model_variables_moving_average)} \
        if opts.get("use_ema") else None
    return traj, ema


def setup_keras() -> None:
    """Keras on JAX in float64, its float32-accurate ops.mean / ops.norm (Keras 3.15:
    Adafactor's and Muon's) replaced by float64 ones."""
    import os

    os.environ["KERAS_BACKEND"] = "jax"
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import keras
    import keras.src.ops as kops

    keras.config.set_floatx("float64")
    kops.mean = lambda x, axis=None, keepdims=False: jnp.mean(jnp.asarray(x), axis=axis,
                                                              keepdims=keepdims)
    kops.norm = lambda x, ord=None, axis=None, keepdims=False: jnp.linalg.norm(
        jnp.asarray(x), ord=ord, axis=axis, keepdims=keepdims)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(float(np.max(np.abs(b), initial=0.0)), 1e-30)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-3 * scale), initial=0.0))


def compare(cfg: dict) -> dict:
    """{"traj": worst relative error over steps and tensors, "step": the first step off by
    more than 1e-9, "ema": the EMA's}."""
    (t1, e1), (t2, e2) = ours(cfg), keras_run(cfg)
    errs = [max(rel(a[n], b[n]) for n in a) for a, b in zip(t1, t2)]
    first = next((i for i, e in enumerate(errs) if e > 1e-9), None)
    out = {"traj": max(errs), "step": first}
    if e1 is not None:
        out["ema"] = max(rel(e1[n], e2[n]) for n in e1)
    return out


if __name__ == "__main__":
    import json
    import sys

    setup_keras()
    seeds = range(int(sys.argv[1]), int(sys.argv[2]))
    classes = sys.argv[3].split(",") if len(sys.argv) > 3 else CLASSES
    for cls in classes:
        for seed in seeds:
            cfg = config(cls, seed)
            try:
                r = compare(cfg)
            except Exception as e:  # noqa: BLE001 - an exploration: report, go on
                r = {"error": f"{type(e).__name__}: {e}"[:300]}
            bad = "error" in r or r["traj"] > 1e-9 or r.get("ema", 0) > 1e-9
            print(json.dumps({"cls": cls, "seed": seed, **r, **({"cfg": cfg} if bad else {})}),
                  flush=True)
