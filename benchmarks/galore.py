"""GaLore's step, steady state and projector refresh timed apart, against optax's.

``catalog.py`` times GaLore with ``update_proj_gap=200``: the projector (one SVD per
matrix) is refreshed at step 1 only, so its figure is the steady state alone, where optax's
``lax.cond`` skips the SVD as ours does. Users feel both: a steady step, and every
``update_proj_gap`` steps one with an SVD per matrix. This times them apart, in one
process, interleaved with ``optax.contrib.galore`` under ``jax.jit`` (params and state
donated), same data, rank 16:

* steady: ``update_proj_gap`` = 10⁹ (after the untimed first step no SVD runs);
* refresh: ``update_proj_gap`` = 1 (every step runs an SVD per matrix).

Ours on NumPy, on torch-CPU on its default intra-op threads and on one (see
``catalog.PEER_1T``: on a loaded machine torch's parallel regions wait for descheduled
threads) and on JAX-CPU; medians of rotating blocks (``optimizer_step.time_blocks``).

    python benchmarks/galore.py                    # 16 matrices (1024, 96) + 16 vectors
    python benchmarks/galore.py --matrices 20 --rows 512 --cols 256
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
from catalog import Peer, optax_peer_impl
from optimizer_step import GRAD_SETS, Impl, sync, time_blocks

GAPS = {"steady": 10**9, "refresh": 1}


def make_data(k: int, rows: int, cols: int, seed: int = 0) -> tuple[dict, list[dict]]:
    """``k`` float32 matrices (rows, cols) and ``k`` vectors (rows,), :data:`GRAD_SETS`
    gradient sets."""
    rng = np.random.default_rng(seed)
    shapes = [(rows, cols), (rows,)] * k
    p = {f"p{i:03d}": rng.standard_normal(s, np.float32) * np.float32(0.1)
         for i, s in enumerate(shapes)}
    gs = [{n: rng.standard_normal(v.shape, np.float32) * np.float32(1e-2) for n, v in p.items()}
          for _ in range(GRAD_SETS)]
    return p, gs


def ours(backend: str, gap: int, p: dict, gs: list[dict], threads: int | None = None) -> Impl:
    """Mithril's GaLore on ``backend`` (torch: on ``threads`` intra-op threads)."""
    from mithril.utils.optimizers import GaLore

    if backend == "torch":
        import torch

        def conv(x: np.ndarray) -> Any:
            return torch.from_numpy(x.copy())
    elif backend == "jax":
        import jax.numpy as jnp

        conv = jnp.array
    else:
        conv = np.array
    opt = GaLore(1e-3, rank=16, update_proj_gap=gap)
    gsets = [{n: conv(v) for n, v in g.items()} for g in gs]
    box: dict[str, Any] = {"p": {n: conv(v) for n, v in p.items()}, "g": gsets[0]}
    box["s"] = opt.init(box["p"])

    def give(i: int) -> None:
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        box["g"] = gsets[i]

    def step() -> None:
        box["p"], box["s"] = opt.update(box["p"], box["g"], box["s"])
        sync(box["p"])

    give(0)
    step()  # (step 1: the first SVD, untimed)
    return Impl(give, step, None)


def optax_galore(gap: int, p: dict, gs: list[dict]) -> Impl:
    """``optax.contrib.galore`` under ``jax.jit``, params and state donated (the catalog's
    optax peer); its first step (the first SVD) untimed."""
    import optax

    peer = Peer("optax", "optax galore",
                lambda: optax.contrib.galore(1e-3, rank=16, update_proj_gap=gap))
    return optax_peer_impl(peer, p, gs, 1)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--matrices", type=int, default=16)
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--block", type=int, default=5)
    ap.add_argument("--warm", type=float, default=0.2)
    ap.add_argument("--backends", default="numpy,torch,jax")
    args = ap.parse_args()
    p, gs = make_data(args.matrices, args.rows, args.cols)
    n = sum(v.size for v in p.values())
    print(f"GaLore rank 16, {args.matrices} matrices ({args.rows}, {args.cols}) + "
          f"{args.matrices} vectors: {n / 1e6:.2f}M float32 params; "
          f"{time.strftime('%Y-%m-%d', time.gmtime())}")
    print(f"{'case':<8}" + "".join(f"{c:>16}" for c in ("impl", "ms", "x optax")))
    for case, gap in GAPS.items():
        impls = {"optax": optax_galore(gap, p, gs)}
        for b in args.backends.split(","):
            if b == "torch":  # (each sets its threads before its blocks)
                import torch

                impls[b] = ours(b, gap, p, gs, threads=torch.get_num_threads())
                impls["torch 1 thread"] = ours(b, gap, p, gs, threads=1)
            else:
                impls[b] = ours(b, gap, p, gs)
        med = time_blocks(impls, args.rounds, args.block, args.warm)
        for k, v in med.items():
            print(f"{case:<8}{k:>16}{v * 1e3:>16.2f}{v / med['optax']:>16.2f}")


if __name__ == "__main__":
    main()
