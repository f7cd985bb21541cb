"""Muon's two conventions, and optax.contrib.muon, step by step, float32.

Layouts: ``12x512`` (12 matrices 512×512 and 12 vectors of 512: a transformer's blocks),
``4x1024`` (4 matrices 1024×1024), ``tiny`` (2 of 64×64 and 2 vectors: the smoke test).
On each of ``--backends`` (NumPy, torch, JAX) ours runs ``Muon(convention="optax")`` and
``Muon(convention="torch", ns_dtype="float32")`` (the same float32 iteration: torch's
default bfloat16 would time another thing); on JAX optax's ``optax.contrib.muon`` runs too,
jitted with its params and state donated. The vectors go to each one's fallback (optax's
adamw; our torch convention's AdamW). Every step takes the next of ``--pool`` fresh
gradient sets; the implementations run in turn step by step (a machine's changing load
hits all alike) and each's median time per step is printed with the median of its per-step
ratios to our torch convention on the same backend (and, on JAX, to optax's).

    python benchmarks/muon_conventions.py [--layouts 12x512 4x1024] [--steps 10] [--pool 3]
                                          [--backends numpy torch jax] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__":  # the BLAS / XLA pools' sizes are read when they load
    _t = next((a.split("=")[1] for a in sys.argv if a.startswith("--threads=")), None)
    if _t is None and "--threads" in sys.argv:
        _t = sys.argv[sys.argv.index("--threads") + 1]
    for _k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_k, _t or "1")
    if (_t or "1") == "1":
        os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                                           "intra_op_parallelism_threads=1")

import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402

from mithril.utils.optimizers import Muon  # noqa: E402

LAYOUTS = {"12x512": (12, 512), "4x1024": (4, 1024), "tiny": (2, 64)}
LR = 0.02


def data(layout: str, pool: int) -> tuple[dict, list[dict]]:
    n, size = LAYOUTS[layout]
    rng = np.random.default_rng(0)
    shapes = {**{f"w{i}": (size, size) for i in range(n)},
              **{f"b{i}": (size,) for i in range(n if layout != "4x1024" else 0)}}
    start = {k: (rng.standard_normal(s) * 0.02).astype(np.float32) for k, s in shapes.items()}
    grads = [{k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
             for _ in range(pool)]
    return start, grads


def ours(backend: str, convention: str, start: dict, grads: list[dict]
         ) -> Callable[[int], dict]:
    """One step of our Muon on ``backend``, the ``t``-th gradient set (mod the pool); it
    returns the params."""
    if backend == "torch":
        import torch

        conv: Callable = torch.tensor
        sync: Callable = lambda p: p  # noqa: E731  (CPU: done on return)
    elif backend == "jax":
        import jax
        import jax.numpy as jnp

        conv, sync = jnp.asarray, jax.block_until_ready
    else:
        conv, sync = np.array, lambda p: p  # noqa: E731
    kw = {"ns_dtype": "float32"} if convention == "torch" else {}
    opt = Muon(LR, convention=convention, weight_decay=0.1, **kw)
    box = {"p": {k: conv(v) for k, v in start.items()}}
    box["s"] = opt.init(box["p"])
    g = [{k: conv(v) for k, v in gs.items()} for gs in grads]

    def step(t: int) -> dict:
        box["p"], box["s"] = opt.update(box["p"], g[t % len(g)], box["s"])
        return sync(box["p"])
    return step


def theirs(start: dict, grads: list[dict]) -> Callable[[int], dict]:
    """optax.contrib.muon, jitted, params and state donated."""
    import jax
    import jax.numpy as jnp
    import optax
    import optax.contrib as oc

    tx = oc.muon(LR, weight_decay=0.1)

    def update(p: dict, s: object, g: dict) -> tuple[dict, object]:
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    jitted = jax.jit(update, donate_argnums=(0, 1))
    box = {"p": {k: jnp.asarray(v) for k, v in start.items()}}
    box["s"] = tx.init(box["p"])
    g = [{k: jnp.asarray(v) for k, v in gs.items()} for gs in grads]

    def step(t: int) -> dict:
        box["p"], box["s"] = jitted(box["p"], box["s"], g[t % len(g)])
        return jax.block_until_ready(box["p"])
    return step


def run(layout: str, backend: str, steps: int, pool: int) -> None:
    start, grads = data(layout, pool)
    impls = {"torch convention": ours(backend, "torch", start, grads),
             "optax convention": ours(backend, "optax", start, grads)}
    if backend == "jax":
        impls["optax.contrib.muon"] = theirs(start, grads)
    for f in impls.values():  # (compile, allocate)
        f(0)
        f(1)
    times: dict[str, list[float]] = {k: [] for k in impls}
    for t in range(2, 2 + steps):
        for k, f in impls.items():
            t0 = time.perf_counter()
            f(t)
            times[k].append(time.perf_counter() - t0)
    last = {k: f(2 + steps) for k, f in impls.items()}  # (the same steps, the same grads)
    if backend == "jax":  # float32 rounding apart, or the timing compares other things
        a, b = last["optax convention"], last["optax.contrib.muon"]
        print(f"{layout:7s} {backend:6s} max |ours - optax| after {steps + 3} steps: "
              f"{max(float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])))) for k in a):.1e}")
    base = times["torch convention"]
    for k, ts in times.items():
        ratio = statistics.median(a / b for a, b in zip(ts, base))
        extra = ""
        if backend == "jax" and k != "optax.contrib.muon":
            extra = f"  vs optax {statistics.median(a / b for a, b in zip(ts, times['optax.contrib.muon'])):.2f}x"  # noqa: E501
        print(f"{layout:7s} {backend:6s} {k:20s} {statistics.median(ts) * 1e3:10.2f} ms  "
              f"{ratio:.2f}x{extra}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layouts", nargs="+", default=["12x512", "4x1024"], choices=LAYOUTS)
    ap.add_argument("--backends", nargs="+", default=["numpy", "torch", "jax"],
                    choices=["numpy", "torch", "jax"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--pool", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    try:
        import torch

        torch.set_num_threads(a.threads)
    except ImportError:
        a.backends = [b for b in a.backends if b != "torch"]
    print(f"{'layout':7s} {'engine':6s} {'optimizer':20s} {'median':>13s}  vs torch convention")
    for layout in a.layouts:
        for backend in a.backends:
            run(layout, backend, a.steps, a.pool)


if __name__ == "__main__":
    main()
