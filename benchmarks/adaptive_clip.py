"""What adaptive gradient clipping (optax ``adaptive_grad_clip``) costs in an Adam step.

Variants, all timed in the same process in rotating blocks (``optimizer_step.time_blocks``),
each step with the next of three pre-made gradient sets, float32:

* ``Adam``: no clipping (the reference for the cost);
* ``Adam + AGC fused``: ``Adam(adaptive_clip=c)``: a read-only pass of per-unit norms of g
  and p, then the usual single update pass reading each unit's factor (NumPy, torch);
* ``Adam + AGC copies``: the same numbers with clipped copies of the gradients made first
  (the path the jitted JAX and tensor-op engines take);
* ``optax chain``: ``optax.chain(adaptive_grad_clip(c), adam)`` under ``jax.jit`` with
  donation (torch has no adaptive clipping).

Each variant's first step is checked once against a NumPy float64 reference. Traffic of
the fused step: 8 B/param read for the norms (g, p) plus Adam's 28.

    python benchmarks/adaptive_clip.py [--sizes a,b] [--backends numpy,torch]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from optimizer_step import GRAD_SETS, LR, SIZES, Impl, make_numpy, shapes_for, time_blocks

C = 0.01


def reference(p: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Adam's first step on the adaptively clipped gradient, float64."""
    from mithril.utils.optimizers.clipping import adaptive_clip

    p, g = p.astype(np.float64), g.astype(np.float64)
    g = adaptive_clip(g, p, C)
    return p - LR * g / (np.abs(g) + 1e-8)


def mithril_impl(backend: str, params: dict, gsets: list, clip: bool, fused: bool) -> Impl:
    from mithril.utils.optimizers import Adam

    conv = (lambda a: __import__("torch").from_numpy(a.copy())) if backend == "torch" else np.copy
    p = {k: conv(v) for k, v in params.items()}
    gs = [{k: conv(v) for k, v in g.items()} for g in gsets]
    opt = Adam(LR, adaptive_clip=C) if clip else Adam(LR)
    box = {"p": p, "s": opt.init(p), "g": gs[0]}
    if not fused:  # the base class then hands the engine clipped copies
        box["s"].engine.fuses_adaptive_clip = lambda opt, state: False

    def give(i: int) -> None:
        box["g"] = gs[i]

    def step() -> None:
        box["p"], box["s"] = opt.update(box["p"], box["g"], box["s"])

    step()
    names = list(params)
    host = (lambda x: x.numpy()) if backend == "torch" else np.asarray
    return Impl(give, step, {k: np.array(host(box["p"][k])) for k in (names[0], names[-1])})


def optax_impl(params: dict, gsets: list) -> Impl:
    import jax
    import jax.numpy as jnp
    import optax

    p = {k: jnp.asarray(v) for k, v in params.items()}
    gs = [{k: jnp.asarray(v) for k, v in g.items()} for g in gsets]
    tx = optax.chain(optax.adaptive_grad_clip(C), optax.adam(LR))
    box = {"p": p, "s": tx.init(p), "g": gs[0]}

    def _step(params, grads, state):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    fn = jax.jit(_step, donate_argnums=(0, 2))

    def give(i: int) -> None:
        box["g"] = gs[i]

    def step() -> None:
        box["p"], box["s"] = fn(box["p"], box["g"], box["s"])
        jax.block_until_ready(box["p"])

    step()
    names = list(params)
    return Impl(give, step, {k: np.asarray(box["p"][k]) for k in (names[0], names[-1])})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="a,b")
    ap.add_argument("--backends", default="numpy,torch")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--block", type=int, default=5)
    ap.add_argument("--warm", type=float, default=0.05)
    args = ap.parse_args()
    print(f"{'case':<34}{'median ms':>10}{'vs Adam':>9}{'vs optax':>10}{'GB/s':>7}")
    for size in args.sizes.split(","):
        total, n_tensors = SIZES[size]
        params, gsets = make_numpy(shapes_for(total, n_tensors))
        assert len(gsets) == GRAD_SETS
        for backend in args.backends.split(","):
            t0 = time.perf_counter()
            impls = {"Adam": mithril_impl(backend, params, gsets, False, True),
                     "Adam + AGC fused": mithril_impl(backend, params, gsets, True, True),
                     "Adam + AGC copies": mithril_impl(backend, params, gsets, True, False),
                     "optax chain": optax_impl(params, gsets)}
            names = list(params)
            for label, impl in impls.items():  # the update really happened
                if label == "Adam":
                    continue
                for k in (names[0], names[-1]):
                    want = reference(params[k], gsets[0][k])
                    err = float(np.max(np.abs(impl.first[k] - want))) / LR
                    assert err < 1e-3, f"{label}: first step off the reference by {err:.2e} lr"
            med = time_blocks(impls, args.rounds, args.block, args.warm)
            base, ref = med["Adam"], med["optax chain"]
            for k, v in med.items():
                gbs = (36 if "AGC" in k else 28) * total / v / 1e9 if k != "optax chain" else 0
                print(f"{size} {backend:<6}{k:<25}{v * 1e3:>10.2f}{v / base:>8.2f}x"
                      f"{v / ref:>9.2f}x{gbs:>7.0f}", flush=True)
            print(f"  (set-up {time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
