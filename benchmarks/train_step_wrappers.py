"""One training epoch on JAX (MLP 64-128-128-10 + cross-entropy, 40 steps of batch 128,
float32) with an optimizer that wraps a whole base update - SAM, Mechanize, ScheduleFree,
DP-SGD - three ways, measured in the same run:

* ``step``: :func:`mithril.utils.training.make_train_step` with ``step.init``'s state: one
  ``jax.jit`` program (forward, backward - SAM's second gradient, DP-SGD's per-example
  ones - and the whole update; :mod:`mithril.interop.optax_outer`,
  :mod:`mithril.utils.train_step_sam`, :mod:`mithril.utils.train_step_private`);
* ``separate``: the same step given ``optimizer.init``'s state (``evaluate`` + ``update``,
  what the JAX step ran for these before);
* ``optax``: one jitted JAX step, params and state donated: ``value_and_grad`` and a
  hand-written SAM around ``optax.adam``; ``optax.contrib.mechanize(optax.adam(1.0))``;
  ``optax.contrib.schedule_free(optax.adam(lr, b1=0), lr)``; ``optax.contrib.dpsgd`` of
  ``jax.vmap(jax.grad)``'s per-example gradients.

Every variant starts from the same parameters and the same batches (a fresh gradient each
step: 40 different batches); an epoch ends when its last loss is on the host. Rounds visit
the variants in a rotating order; the medians of the epochs and their ratios to the optax
step are printed. Once, each variant is checked to have moved the params.

    python benchmarks/train_step_wrappers.py [--rounds 7] [--steps 40]
                                             [--wrapper sam mechanize schedule_free dpsgd]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mithril as ml
from mithril.backends import JaxBackend
from mithril.cli.networks import mlp_spec
from mithril.utils import optimizers as o
from mithril.utils.training import make_train_step

FEATURES, CLASSES, HIDDEN, BATCH = 64, 10, [128, 128], 128
STEPS = 40  # (an epoch; --steps)
LR, RHO, CLIP, NOISE = 1e-3, 0.05, 1.0, 1.0

OURS: dict[str, Callable[[], Any]] = {
    "sam": lambda: o.SAM(o.Adam(LR), rho=RHO),
    "mechanize": lambda: o.Mechanize(o.Adam(1.0)),
    "schedule_free": lambda: o.ScheduleFree(o.Adam(LR, beta1=0.0)),
    "dpsgd": lambda: o.DPSGD(0.1, l2_norm_clip=CLIP, noise_multiplier=NOISE),
}


def data() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [(rng.standard_normal((BATCH, FEATURES)).astype(np.float32),
             rng.integers(0, CLASSES, BATCH)) for _ in range(STEPS)]


def mithril_epoch(wrapper: str, fused: bool, feed: list) -> tuple[Callable[[], float], dict]:
    spec = mlp_spec(FEATURES, CLASSES, HIDDEN)
    be = JaxBackend(dtype="float32", seed=0)
    compiled = ml.compile(spec.model, be, shapes=spec.shapes)
    params = compiled.get_parameters()
    init = {k: np.array(v) for k, v in params.items()}
    opt = OURS[wrapper]()
    step = make_train_step(compiled, opt, loss="loss")
    box = {"p": params, "s": step.init(params) if fused else opt.init(params)}
    assert step.fused  # (the separate calls are what an OptimizerState runs)
    batches = [{"input": be.array(a), "target": be.array(b, be.int_dtype)} for a, b in feed]

    def epoch() -> float:
        p, s = box["p"], box["s"]
        for d in batches:
            p, s, out = step(p, s, d)
        box["p"], box["s"] = p, s
        return float(out["loss"])

    def moved() -> bool:
        return any(not np.array_equal(np.asarray(box["p"][k]), init[k]) for k in init)

    return epoch, {"init": init, "moved": moved}


def _layers(init: dict) -> list:
    def order(name: str) -> tuple:
        return tuple(int(d) for d in "".join(c if c.isdigit() else " " for c in name).split())

    ws = sorted((k for k, v in init.items() if v.ndim == 2), key=order)
    bs = sorted((k for k, v in init.items() if v.ndim == 1), key=order)
    out, prev = [], FEATURES
    for w, b in zip(ws, bs, strict=True):
        W = init[w] if init[w].shape[0] == prev else init[w].T
        out.append((jnp.asarray(W), jnp.asarray(init[b])))
        prev = W.shape[1]
    return out


def _loss(p: list, a: Any, b: Any) -> Any:
    h = a
    for i, (W, c) in enumerate(p):
        h = h @ W + c
        if i + 1 < len(p):
            h = jax.nn.relu(h)
    return optax.softmax_cross_entropy_with_integer_labels(h, b).mean()


def optax_epoch(wrapper: str, init: dict, feed: list) -> tuple[Callable[[], float], Any]:
    params = _layers(init)
    if wrapper == "sam":
        tx = optax.adam(LR)

        def _step(p: list, s: Any, a: Any, b: Any) -> tuple:
            loss, g = jax.value_and_grad(_loss)(p, a, b)
            scale = RHO / (optax.global_norm(g) + 1e-12)
            g2 = jax.grad(_loss)(jax.tree.map(lambda x, y: x + scale * y, p, g), a, b)
            u, s = tx.update(g2, s, p)
            return optax.apply_updates(p, u), s, loss
    elif wrapper == "dpsgd":
        tx = optax.contrib.dpsgd(0.1, CLIP, NOISE, seed=0)

        def _step(p: list, s: Any, a: Any, b: Any) -> tuple:
            loss = _loss(p, a, b)
            rows = jax.vmap(jax.grad(lambda q, x, y: _loss(q, x[None], y[None])),
                            in_axes=(None, 0, 0))(p, a, b)
            u, s = tx.update(rows, s, p)
            return optax.apply_updates(p, u), s, loss
    else:
        tx = optax.contrib.mechanize(optax.adam(1.0)) if wrapper == "mechanize" else \
            optax.contrib.schedule_free(optax.adam(LR, b1=0.0), LR)

        def _step(p: list, s: Any, a: Any, b: Any) -> tuple:
            loss, g = jax.value_and_grad(_loss)(p, a, b)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s, loss

    step = jax.jit(_step, donate_argnums=(0, 1))
    # (copies: schedule-free's z, Mechanic's x0 start as the very params, donated apart)
    box = {"p": params, "s": jax.tree.map(lambda x: jnp.array(x, copy=True), tx.init(params))}
    batches = [(jnp.asarray(a), jnp.asarray(b)) for a, b in feed]
    first = [np.asarray(W) for W, _ in params]

    def epoch() -> float:
        p, s = box["p"], box["s"]
        for a, b in batches:
            p, s, loss = step(p, s, a, b)
        box["p"], box["s"] = p, s
        return float(loss)

    def moved() -> bool:
        return any(not np.array_equal(np.asarray(W), f) for (W, _), f in zip(box["p"], first))

    return epoch, moved


def main() -> None:
    global STEPS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=STEPS, help="steps per epoch")
    ap.add_argument("--wrapper", nargs="+", default=list(OURS), choices=list(OURS))
    args = ap.parse_args()
    STEPS = args.steps
    feed = data()
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, optax {optax.__version__}; "
          f"epoch = {STEPS} steps of {BATCH}, MLP {[FEATURES, *HIDDEN, CLASSES]}")
    print(f"{'wrapper':<14}{'step ms':>10}{'separate ms':>13}{'optax ms':>10}"
          f"{'step/optax':>12}{'separate/optax':>16}")
    for w in args.wrapper:
        fused, info = mithril_epoch(w, True, feed)
        separate, info2 = mithril_epoch(w, False, feed)
        ref, ref_moved = optax_epoch(w, info["init"], feed)
        variants = {"step": fused, "separate": separate, "optax": ref}
        for f in variants.values():  # (compiles, warms the caches)
            f()
        assert info["moved"]() and info2["moved"]() and ref_moved(), "an update did not happen"
        times: dict[str, list[float]] = {k: [] for k in variants}
        names = list(variants)
        for r in range(args.rounds):
            for k in names[r % 3:] + names[:r % 3]:
                t0 = time.perf_counter()
                variants[k]()
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(f"{w:<14}{med['step']:>10.1f}{med['separate']:>13.1f}{med['optax']:>10.1f}"
              f"{med['step'] / med['optax']:>11.2f}x{med['separate'] / med['optax']:>15.2f}x")


if __name__ == "__main__":
    main()
