"""Every optimizer of the catalog that has an optax counterpart, in random configurations
(hyperparameters drawn log-uniform / uniform over their useful ranges, flags at random),
through ``optax_transformation`` against optax's own, side by side on the same pytree
(nested dict and list, a 0-d leaf) and gradients, jitted; the params compared after every
step in the measure of :func:`rel` (elementwise relative, floored at 1e-3 of the tensor's
largest magnitude). float32: one configuration each; float64 (``jax_enable_x64``, slow): 8
(each a few JAX compiles: 20 took ~1 min per optimizer, 28 optimizers).

Known differences, kept out of the draws (each measured in float64, 8 steps, 20 draws):

* ``RAdam`` is torch's: ε is added to ``sqrt(v)`` before the bias correction, optax's
  ``radam`` after it (its rectified steps differ by up to 2.5e-6 relative with ε = 2.5e-5;
  there is no ``convention="optax"``): ε is drawn below 1e-12, where that is < 1e-15.
* optax's schedule-free warmup (a linear schedule of the int32 count) is float32 even with
  ``jax_enable_x64``: our warmed-up steps differed by its rounding (up to 4.3e-6 relative
  over 6 steps); the draws' warmup rates are exact in float32 (:func:`warmup`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

import mithril.utils.optimizers as M  # noqa: E402
from mithril.interop import optax_transformation  # noqa: E402

ADW = optax.add_decayed_weights
STEPS = 6


# Draws: each takes a Generator and gives (our optimizer, optax's) with the same
# hyperparameters; coupled weight decay where optax has none is add_decayed_weights in front.
def u(r: np.random.Generator, a: float, b: float) -> float:
    """Uniform in [a, b)."""
    return float(r.uniform(a, b))


def lu(r: np.random.Generator, a: float, b: float) -> float:
    """Log-uniform in [a, b)."""
    return float(10 ** r.uniform(np.log10(a), np.log10(b)))


def wd_chain(wd: float, tx: Any) -> Any:
    return optax.chain(ADW(wd), tx) if wd else tx


def sgd(r: np.random.Generator) -> tuple:
    lr, mom, nest, wd = (
        lu(r, 1e-3, 0.1),
        (u(r, 0.5, 0.99) if r.random() < 0.7 else 0.0),
        bool(r.random() < 0.5),
        (lu(r, 1e-3, 0.1) if r.random() < 0.5 else 0.0),
    )
    nest = nest and mom > 0
    return M.SGD(lr, momentum=mom, nesterov=nest, weight_decay=wd, convention="optax"), wd_chain(
        wd, optax.sgd(lr, mom or None, nest)
    )


def adam(r: np.random.Generator) -> tuple:
    lr, b1, b2, eps = lu(r, 1e-4, 0.05), u(r, 0.5, 0.99), u(r, 0.9, 0.9999), lu(r, 1e-10, 1e-2)
    wd = lu(r, 1e-3, 0.1) if r.random() < 0.4 else 0.0
    ams = bool(r.random() < 0.3)
    ref = optax.amsgrad(lr, b1, b2, eps) if ams else optax.adam(lr, b1, b2, eps)
    return M.Adam(lr, b1, b2, eps, weight_decay=wd, amsgrad=ams, convention="optax"), wd_chain(
        wd, ref
    )


def adamw(r: np.random.Generator) -> tuple:
    lr, b1, b2, eps, wd = (
        lu(r, 1e-4, 0.05),
        u(r, 0.5, 0.99),
        u(r, 0.9, 0.9999),
        lu(r, 1e-10, 1e-2),
        lu(r, 1e-3, 0.5),
    )
    return M.AdamW(lr, b1, b2, eps, weight_decay=wd, convention="optax"), optax.adamw(
        lr, b1, b2, eps, weight_decay=wd
    )


def nadam(r: np.random.Generator) -> tuple:
    lr, b1, b2, eps = lu(r, 1e-4, 0.05), u(r, 0.5, 0.99), u(r, 0.9, 0.9999), lu(r, 1e-10, 1e-2)
    wd = lu(r, 1e-3, 0.1) if r.random() < 0.5 else 0.0
    dec = bool(r.random() < 0.5) and wd > 0
    ref = (
        optax.nadamw(lr, b1, b2, eps, weight_decay=wd)
        if dec
        else wd_chain(wd, optax.nadam(lr, b1, b2, eps))
    )
    return M.NAdam(
        lr, b1, b2, eps, weight_decay=wd, decoupled_weight_decay=dec, convention="optax"
    ), ref


def rmsprop(r: np.random.Generator) -> tuple:
    lr, dec, eps = lu(r, 1e-4, 0.05), u(r, 0.8, 0.999), lu(r, 1e-8, 1e-2)
    mom = u(r, 0.3, 0.95) if r.random() < 0.5 else 0.0
    cen = bool(r.random() < 0.5)
    wd = lu(r, 1e-3, 0.1) if r.random() < 0.4 else 0.0
    return M.RMSProp(
        lr, dec, eps, momentum=mom, centered=cen, weight_decay=wd, convention="optax"
    ), wd_chain(wd, optax.rmsprop(lr, dec, eps, centered=cen, momentum=mom or None))


def adagrad(r: np.random.Generator) -> tuple:
    lr, eps, iav = lu(r, 1e-3, 0.5), lu(r, 1e-10, 1e-2), u(r, 0.0, 1.0)
    wd = lu(r, 1e-3, 0.1) if r.random() < 0.4 else 0.0
    return M.AdaGrad(
        lr, eps, initial_accumulator_value=iav, weight_decay=wd, convention="optax"
    ), wd_chain(wd, optax.adagrad(lr, iav, eps))


def radam(r: np.random.Generator) -> tuple:
    lr, b1, b2, eps = lu(r, 1e-4, 0.05), u(r, 0.5, 0.99), u(r, 0.5, 0.999), lu(r, 1e-30, 1e-12)
    return M.RAdam(lr, b1, b2, eps), optax.radam(lr, b1, b2, eps)


def lion(r: np.random.Generator) -> tuple:
    lr, b1, b2, wd = (
        lu(r, 1e-4, 0.05),
        u(r, 0.5, 0.99),
        u(r, 0.5, 0.999),
        (lu(r, 1e-3, 0.5) if r.random() < 0.6 else 0.0),
    )
    return M.Lion(lr, b1, b2, wd), optax.lion(lr, b1, b2, weight_decay=wd)


def yogi(r: np.random.Generator) -> tuple:
    lr, b1, b2, eps, iav = (
        lu(r, 1e-4, 0.05),
        u(r, 0.5, 0.99),
        u(r, 0.9, 0.9999),
        lu(r, 1e-6, 1e-2),
        lu(r, 1e-8, 1e-2),
    )
    return M.Yogi(lr, b1, b2, eps, initial_accumulator_value=iav), optax.chain(
        optax.scale_by_yogi(b1, b2, eps, 0.0, iav), optax.scale_by_learning_rate(lr)
    )


def adabelief(r: np.random.Generator) -> tuple:
    lr, b1, b2, eps, er = (
        lu(r, 1e-4, 0.05),
        u(r, 0.5, 0.99),
        u(r, 0.9, 0.9999),
        lu(r, 1e-16, 1e-4),
        lu(r, 1e-16, 1e-6),
    )
    nest = bool(r.random() < 0.5)
    return M.AdaBelief(lr, b1, b2, eps, er, nesterov=nest), optax.adabelief(
        lr, b1, b2, eps, er, nesterov=nest
    )


def adopt(r: np.random.Generator) -> tuple:
    lr, b1, b2, eps = lu(r, 1e-4, 0.05), u(r, 0.5, 0.99), u(r, 0.9, 0.9999), lu(r, 1e-8, 1e-3)
    clip, nest = bool(r.random() < 0.5), bool(r.random() < 0.5)
    return M.ADOPT(lr, b1, b2, eps, use_clipping=clip, nesterov=nest), optax.contrib.adopt(
        lr, b1, b2, eps, use_clipping=clip, nesterov=nest
    )


def adan(r: np.random.Generator) -> tuple:
    lr, b1, b2, b3, eps, er, wd = (
        lu(r, 1e-4, 0.05),
        u(r, 0.5, 0.99),
        u(r, 0.5, 0.99),
        u(r, 0.5, 0.999),
        lu(r, 1e-8, 1e-3),
        lu(r, 1e-10, 1e-6),
        (lu(r, 1e-3, 0.2) if r.random() < 0.5 else 0.0),
    )
    return M.Adan(lr, b1, b2, b3, eps, er, wd), optax.adan(lr, b1, b2, b3, eps, er, weight_decay=wd)


def ademamix(r: np.random.Generator) -> tuple:
    lr, b1, b2, b3, al, eps, wd = (
        lu(r, 1e-4, 0.05),
        u(r, 0.5, 0.99),
        u(r, 0.9, 0.9999),
        u(r, 0.9, 0.9999),
        u(r, 0, 10),
        lu(r, 1e-8, 1e-3),
        (lu(r, 1e-3, 0.2) if r.random() < 0.5 else 0.0),
    )
    return M.AdEMAMix(lr, b1, b2, b3, al, eps, 0.0, wd), optax.contrib.ademamix(
        lr, b1, b2, b3, al, eps=eps, weight_decay=wd
    )


def lamb(r: np.random.Generator) -> tuple:
    lr, b1, b2, eps, wd = (
        lu(r, 1e-4, 0.05),
        u(r, 0.5, 0.99),
        u(r, 0.9, 0.9999),
        lu(r, 1e-8, 1e-3),
        (lu(r, 1e-3, 0.2) if r.random() < 0.5 else 0.0),
    )
    return M.LAMB(lr, b1, b2, eps, 0.0, wd), optax.lamb(lr, b1, b2, eps, 0.0, wd)


def lars(r: np.random.Generator) -> tuple:
    lr, mom, tc, eps, wd = (
        lu(r, 1e-3, 0.5),
        u(r, 0.5, 0.95),
        lu(r, 1e-3, 0.1),
        lu(r, 1e-10, 1e-4),
        (lu(r, 1e-3, 0.2) if r.random() < 0.5 else 0.0),
    )
    nest = bool(r.random() < 0.5)
    return M.LARS(lr, mom, tc, eps, nest, wd), optax.lars(lr, wd, True, tc, eps, True, mom, nest)


def novograd(r: np.random.Generator) -> tuple:
    lr, b1, b2, eps, wd = (
        lu(r, 1e-4, 0.05),
        u(r, 0.5, 0.99),
        u(r, 0.1, 0.99),
        lu(r, 1e-8, 1e-3),
        (lu(r, 1e-3, 0.2) if r.random() < 0.5 else 0.0),
    )
    return M.Novograd(lr, b1, b2, eps, 0.0, wd), optax.novograd(lr, b1, b2, eps, 0.0, wd)


def signum(r: np.random.Generator) -> tuple:
    lr, mom = lu(r, 1e-4, 0.05), u(r, 0.5, 0.99)
    return M.Signum(lr, mom), optax.signum(lr, mom)


def ogd(r: np.random.Generator) -> tuple:
    lr, a, b = lu(r, 1e-3, 0.1), u(r, 0.1, 2), u(r, 0.1, 2)
    return M.OptimisticGD(lr, a, b), optax.optimistic_gradient_descent(lr, a, b)


def oadam(r: np.random.Generator) -> tuple:
    lr, a, b, b1, b2, eps = (
        lu(r, 1e-3, 0.05),
        u(r, 0.1, 2),
        u(r, 0.1, 2),
        u(r, 0.5, 0.99),
        u(r, 0.9, 0.9999),
        lu(r, 1e-8, 1e-3),
    )
    nest = bool(r.random() < 0.5)
    return M.OptimisticAdam(lr, a, b, b1, b2, eps, 0.0, nest), optax.optimistic_adam_v2(
        lr, alpha=a, beta=b, b1=b1, b2=b2, eps=eps, eps_root=0.0, nesterov=nest
    )


def adamaxw(r: np.random.Generator) -> tuple:
    lr, b1, b2, eps, wd = (
        lu(r, 1e-4, 0.05),
        u(r, 0.5, 0.99),
        u(r, 0.9, 0.9999),
        lu(r, 1e-8, 1e-3),
        lu(r, 1e-4, 0.2),
    )
    return M.Adamax(lr, b1, b2, eps, wd, decoupled_weight_decay=True), optax.adamaxw(
        lr, b1, b2, eps, wd
    )


def sademamix(r: np.random.Generator) -> tuple:
    lr, b1, b2, al, eps = (
        lu(r, 1e-4, 0.05),
        u(r, 0.5, 0.99),
        u(r, 0.5, 0.99),
        u(r, 0, 5),
        lu(r, 1e-8, 1e-3),
    )
    return M.SimplifiedAdEMAMix(lr, b1, b2, al, eps), optax.contrib.simplified_ademamix(
        lr, b1, b2, al, eps
    )


def cocob(r: np.random.Generator) -> tuple:
    lr, al, eps = u(r, 0.1, 2), u(r, 10, 200), lu(r, 1e-8, 1e-3)
    return M.COCOB(lr, al, eps), optax.contrib.cocob(lr, al, eps)


def fromage(r: np.random.Generator) -> tuple:
    lr, mn = lu(r, 1e-3, 0.1), lu(r, 1e-8, 1e-3)
    return M.Fromage(lr, mn), optax.fromage(lr, mn)


def dog(r: np.random.Generator) -> tuple:
    lr, eps = u(r, 0.1, 2), lu(r, 1e-8, 1e-4)
    kind = ["heuristic", "distance", "learning_rate"][r.integers(3)]
    v = lu(r, 1e-4, 1e-2)  # (smaller: the params barely move in STEPS)
    return M.DoG(lr, (kind, v), eps), optax.contrib.dog(lr, (kind, v), eps)


def dowg(r: np.random.Generator) -> tuple:
    lr, eps = u(r, 0.1, 2), lu(r, 1e-8, 1e-3)
    iv = lu(r, 1e-6, 1e-2) if r.random() < 0.5 else None
    return M.DoWG(lr, iv, eps), optax.contrib.dowg(lr, iv, eps)


def prodigy(r: np.random.Generator) -> tuple:
    lr, b1, b2, eps, e0 = (
        u(r, 0.3, 1.5),
        u(r, 0.5, 0.95),
        u(r, 0.9, 0.999),
        lu(r, 1e-8, 1e-4),
        lu(r, 1e-5, 1e-3),  # d0: from 1e-7 a draw barely moved in the steps
    )
    return M.Prodigy(lr, b1, b2, None, eps, e0), optax.contrib.prodigy(lr, (b1, b2), None, eps, e0)


def warmup(r: np.random.Generator, lr: float) -> tuple[float, int | None]:
    """(lr, warmup_steps): none, or 1, 2 or 4 steps with lr on a coarse binary grid, so that
    optax's warmup rate (float32 even with x64: see above) is exact: lr·t/n has few bits."""
    n = [None, 1, 2, 4][int(r.integers(4))]
    return (lr if n is None else float(np.ldexp(np.round(np.ldexp(lr, 12)), -12))), n


def sfadamw(r: np.random.Generator) -> tuple:
    lr, b1, b2, eps, wd = (
        lu(r, 1e-3, 0.05),
        u(r, 0.5, 0.95),
        u(r, 0.9, 0.999),
        lu(r, 1e-8, 1e-4),
        (lu(r, 1e-3, 0.1) if r.random() < 0.5 else 0.0),
    )
    lr, wu = warmup(r, lr)
    return M.ScheduleFreeAdamW(lr, wu, b1, b2, eps, wd), optax.contrib.schedule_free_adamw(
        lr, wu, b1, b2, eps, wd
    )


def sfsgd(r: np.random.Generator) -> tuple:
    lr, b1, wd = lu(r, 1e-3, 0.5), u(r, 0.5, 0.95), (lu(r, 1e-3, 0.1) if r.random() < 0.5 else 0.0)
    lr, wu = warmup(r, lr)
    return M.ScheduleFreeSGD(lr, wu, b1, wd), optax.contrib.schedule_free_sgd(lr, wu, b1, wd)


CASES = {  # name -> draw(rng) -> (our optimizer, optax's)
    f.__name__: f
    for f in (
        sgd,
        adam,
        adamw,
        nadam,
        rmsprop,
        adagrad,
        radam,
        lion,
        yogi,
        adabelief,
        adopt,
        adan,
        ademamix,
        lamb,
        lars,
        novograd,
        signum,
        ogd,
        oadam,
        adamaxw,
        sademamix,
        cocob,
        fromage,
        dog,
        dowg,
        prodigy,
        sfadamw,
        sfsgd,
    )
}


def rel(a: Any, b: Any, floor: float = 1e-3) -> float:
    """``max |a - b| / max(|a|, |b|, floor·M)``, ``M`` the larger magnitude of ``a``
    (float32: ``floor`` 1, the error relative to the tensor's scale, as a param near 0 is
    the difference of two rounded terms)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    m = max(np.abs(a).max(initial=0), 1e-30)
    s = np.maximum(np.maximum(np.abs(a), np.abs(b)), floor * m)
    return float(np.max(np.abs(a - b) / s, initial=0))


def worst_error(name: str, seed: int, dt: Any) -> float:
    """The largest :func:`rel` error over the params of STEPS jitted steps of draw ``seed``."""
    r = np.random.default_rng(seed)
    ours, ref = CASES[name](r)
    shapes = {"w": (3, 4), "b": (5,), "s": (), "c": (2, 1, 3)}
    x = {k: jnp.asarray(r.standard_normal(s), dt) for k, s in shapes.items()}
    p0 = {"a": {"w": x["w"], "b": x["b"]}, "l": [x["s"], x["c"]]}
    grads = [
        jax.tree.map(lambda v, t=t: jnp.asarray(r.standard_normal(v.shape) * (1 + t % 3), dt), p0)
        for t in range(STEPS)
    ]
    out = []
    for tx in (ref, optax_transformation(ours)):
        p, s, traj = p0, tx.init(p0), []
        step = jax.jit(tx.update)
        for g in grads:
            updates, s = step(g, s, p)
            p = optax.apply_updates(p, updates)
            traj.append(p)
        out.append(traj)
    moved = max(rel(a, b) for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(out[0][-1])))
    assert moved > 1e-5, "the params stood still: nothing compared"
    floor = 1.0 if dt == jnp.float32 else 1e-3
    errors = [
        rel(a, b, floor)
        for pa, pb in zip(*out)
        for a, b in zip(jax.tree.leaves(pa), jax.tree.leaves(pb))
    ]
    assert not np.isnan(errors).any(), "NaN params"
    return max(errors)


@pytest.fixture
def x64():
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", before)


@pytest.fixture
def x32():
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    yield
    jax.config.update("jax_enable_x64", before)


@pytest.mark.parametrize("name", sorted(CASES))
def test_one_random_configuration_float32(name, x32):
    # float32: our traced bias corrections are exp/expm1 of the step, optax's powers
    # (measured up to 5.7e-7 over two draws of each)
    assert worst_error(name, 0, jnp.float32) < 3e-6


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_random_configurations_float64(name, x64):
    tol = 1e-12
    errors = [worst_error(name, seed, jnp.float64) for seed in range(8)]
    assert max(errors) < tol, (name, int(np.argmax(errors)), max(errors))
