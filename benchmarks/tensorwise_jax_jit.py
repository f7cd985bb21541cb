"""The tensorwise optimizers (SM3, Adafactor, Muon) on the jitted JAX engine
(``MITHRIL_JAX_ENGINE=jit``, here on CPU), against optax's jitted equivalents in the same run.

200 float32 tensors of mixed shapes (80 matrices 64..192 × 64..192, 20 conv kernels
(32, 16, 3, 3), 100 vectors), ~1.5M parameters. Each step takes fresh gradients, rotating
through 3 sets; ours is ``opt.update(params, grads, state)``, optax's a ``jax.jit`` step
(``tx.update`` then ``optax.apply_updates``) with params and state donated. The median time
per step is printed with its ratio to optax's; both are checked once to have moved the
params. ``--eager`` also times the per-tensor path un-jitted (``MITHRIL_TENSORWISE_JIT=0``:
:mod:`mithril.utils.optimizers.engines.tensorwise_jit` off), what ran before.

optax's counterparts are the nearest, not the same algorithms: optax.sm3 (the same
algorithm: mithril's SM3 follows it), optax.adafactor (factored second moments, but
optax's variant: momentum-free, its own decay and clipping) and optax.contrib.muon (Adam on
the non-matrices, as mithril's Muon's default AdamW fallback).

    MITHRIL_JAX_ENGINE=jit python benchmarks/tensorwise_jax_jit.py [--steps 15] [--eager]
        [--only sm3,adafactor,muon]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("MITHRIL_JAX_ENGINE", "jit")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from mithril.utils.optimizers import SM3, Adafactor, Muon  # noqa: E402
from mithril.utils.optimizers.engines import tensorwise_jit  # noqa: E402

LR = 1e-2


def shapes() -> dict[str, tuple[int, ...]]:
    rng = np.random.default_rng(0)
    out: dict[str, tuple[int, ...]] = {}
    for i in range(80):
        out[f"m{i:03d}"] = tuple(int(x) for x in rng.choice([64, 96, 128, 160, 192], 2))
    for i in range(20):
        out[f"c{i:03d}"] = (32, 16, 3, 3)
    for i in range(100):
        out[f"v{i:03d}"] = (int(rng.choice([64, 128, 256, 512])),)
    return out


def data() -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(1)
    sh = shapes()
    start = {k: (0.02 * rng.standard_normal(s)).astype(np.float32) for k, s in sh.items()}
    grads = [{k: rng.standard_normal(s).astype(np.float32) for k, s in sh.items()}
             for _ in range(3)]
    return start, grads


def ours(make, start: dict, grads: list[dict], steps: int) -> list[float]:
    opt = make()
    params = {k: jnp.asarray(v) for k, v in start.items()}
    gs = [{k: jnp.asarray(v) for k, v in g.items()} for g in grads]
    state = opt.init(params)
    assert type(state.engine).__name__ == "JaxEngine", type(state.engine).__name__
    times = []
    for t in range(steps + 2):  # two untimed: the compile, then the steady state
        t0 = time.perf_counter()
        params, state = opt.update(params, gs[t % 3], state)
        jax.block_until_ready(params)
        if t >= 2:
            times.append(time.perf_counter() - t0)
    moved = max(float(np.max(np.abs(np.asarray(params[k]) - start[k]))) for k in start)
    assert moved > 0, "ours: the params did not move"
    return times


def theirs(tx, start: dict, grads: list[dict], steps: int) -> list[float]:
    params = {k: jnp.asarray(v) for k, v in start.items()}
    gs = [{k: jnp.asarray(v) for k, v in g.items()} for g in grads]
    state = tx.init(params)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    fn = jax.jit(step, donate_argnums=(0, 1))
    times = []
    for t in range(steps + 2):
        t0 = time.perf_counter()
        params, state = fn(params, state, gs[t % 3])
        jax.block_until_ready(params)
        if t >= 2:
            times.append(time.perf_counter() - t0)
    moved = max(float(np.max(np.abs(np.asarray(params[k]) - start[k]))) for k in start)
    assert moved > 0, "optax: the params did not move"
    return times


CASES = {
    "sm3": (lambda: SM3(learning_rate=LR), lambda: optax.sm3(LR)),
    "adafactor": (lambda: Adafactor(learning_rate=LR), lambda: optax.adafactor(LR)),
    "muon": (lambda: Muon(learning_rate=LR), lambda: optax.contrib.muon(LR)),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--eager", action="store_true", help="also time the un-jitted path")
    ap.add_argument("--eager-steps", type=int, default=3)
    ap.add_argument("--only", default="sm3,adafactor,muon")
    a = ap.parse_args()
    unknown = [n for n in a.only.split(",") if n not in CASES]
    if unknown:
        ap.error(f"--only: unknown {unknown}; choose from {', '.join(CASES)}")
    start, grads = data()
    print(f"{len(start)} tensors, {sum(v.size for v in start.values()):,} params, float32, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}, optax {optax.__version__}")
    for name in a.only.split(","):
        make, tx = CASES[name]
        ref = statistics.median(theirs(tx(), start, grads, a.steps)) * 1e3
        line = f"{name:10s} optax {ref:8.2f} ms"
        if a.eager:
            tensorwise_jit.ENABLED = False
            try:
                ms = statistics.median(ours(make, start, grads, a.eager_steps)) * 1e3
            finally:
                tensorwise_jit.ENABLED = True
            line += f" | eager {ms:8.2f} ms ({ms / ref:6.1f}x)"
        ms = statistics.median(ours(make, start, grads, a.steps)) * 1e3
        print(line + f" | jit {ms:8.2f} ms ({ms / ref:5.2f}x)", flush=True)


if __name__ == "__main__":
    main()
