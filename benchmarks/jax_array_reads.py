"""What 2,000 JAX arrays cost before any arithmetic: the floor under the JAX backend's cost
per tensor (issue #16's row "JAX backend, cost per tensor").

An optimizer step on JAX-on-CPU arrays (``opt.update`` with the fused kernel) must, per
gradient, read its abstract value, wait for the computation that produces it and read its
buffer address; JAX gives the address one array at a time. This script times, per array,
in the same run and on the same arrays:

* **ours**: Mithril's update of 2,000 tensors of 500 float32 (Adam), minus its kernel
  measured alone on NumPy arrays of the same layout (what is left is the reads);
* **reads**: the batched wait plus the address reads alone (what the update does per array);
* **jit dispatch**: calling a jitted function of the 2,000 arrays that returns one of them
  times 1 (JAX's own per-argument cost: what any jitted step taking them pays);
* **jitted SGD step**: ``[p - 1e-3 * g for p, g in ...]`` under ``jax.jit``, the params
  donated: the least any jitted step that takes and returns every tensor pays JAX per
  tensor (dispatch, one tiny kernel per tensor, the output arrays);
* **optax**: the update of ``optax.adam`` under ``jax.jit`` with donation, per tensor.

Each is timed "hot" (nothing between calls) and "cold" (a 32 MB buffer written between
calls, as a step's arithmetic does: the arrays' bookkeeping is then out of cache), medians
of rotating gradient sets. An update is never really hot: its own kernel writes 28 MB
between two calls' reads, so "cold" is what a training loop sees.

    python benchmarks/jax_array_reads.py [--tensors 2000] [--size 500] [--repeats 200]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax._src.lib import xla_client

from mithril.utils.optimizers import Adam


def timed(fn: Callable[[int], object], repeats: int, trash: np.ndarray | None) -> float:
    """Median seconds of ``fn(i)`` over ``repeats`` calls (``trash`` written before each)."""
    out = []
    for i in range(repeats):
        if trash is not None:
            trash *= 1.0000001
        t0 = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tensors", type=int, default=2000)
    ap.add_argument("--size", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=200)
    a = ap.parse_args()
    if a.tensors < 1 or a.size < 1 or a.repeats < 1:
        ap.error("--tensors, --size and --repeats must be positive")
    n, rng = a.tensors, np.random.default_rng(0)
    host = {f"p{i}": rng.standard_normal(a.size, dtype=np.float32) for i in range(n)}
    host_g = [{k: rng.standard_normal(a.size, dtype=np.float32) for k in host} for _ in range(3)]
    gsets = [{k: jnp.asarray(v) for k, v in g.items()} for g in host_g]
    lists = [list(g.values()) for g in gsets]
    trash = np.ones(8 << 20, np.float32)  # 32 MB

    opt = Adam(learning_rate=1e-3)
    box = {"p": {k: jnp.asarray(v) for k, v in host.items()}}
    box["s"] = opt.init(box["p"])
    nbox = {"p": {k: v.copy() for k, v in host.items()}}
    opt_np = Adam(learning_rate=1e-3)  # (an optimizer serves one backend)
    nbox["s"] = opt_np.init(nbox["p"])

    def ours(i: int) -> None:
        box["p"], box["s"] = opt.update(box["p"], gsets[i % 3], box["s"])

    def ours_numpy(i: int) -> None:  # the same step on NumPy arrays: the kernel and Python
        nbox["p"], nbox["s"] = opt_np.update(nbox["p"], host_g[i % 3], nbox["s"])

    ptr = type(lists[0][0]).unsafe_buffer_pointer

    def reads(i: int) -> None:
        xs = lists[i % 3]
        xla_client.batched_block_until_ready(xs)
        np.fromiter(map(ptr, xs), np.int64, len(xs))

    first = jax.jit(lambda xs: xs[0] * 1)

    def dispatch(i: int) -> None:
        first(lists[i % 3]).block_until_ready()

    sgd = jax.jit(lambda ps, gs: [p - 1e-3 * g for p, g in zip(ps, gs)], donate_argnums=0)
    sbox = {"p": [jnp.asarray(v) for v in host.values()]}

    def jitted_sgd(i: int) -> None:
        sbox["p"] = sgd(sbox["p"], lists[i % 3])
        jax.block_until_ready(sbox["p"])

    tx = optax.adam(1e-3)
    obox = {"p": {k: jnp.asarray(v) for k, v in host.items()}}
    obox["s"] = tx.init(obox["p"])

    def _step(p: dict, s: object, g: dict) -> tuple:
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    ostep = jax.jit(_step, donate_argnums=(0, 1))

    def optax_step(i: int) -> None:
        obox["p"], obox["s"] = ostep(obox["p"], obox["s"], gsets[i % 3])
        jax.block_until_ready(obox["p"])

    for fn in (ours, ours_numpy, reads, dispatch, jitted_sgd, optax_step):  # compile, warm up
        for i in range(5):
            fn(i)
    # a check that the update happened: the params moved
    before = np.asarray(box["p"]["p0"]).copy()
    ours(0)
    assert not np.array_equal(np.asarray(box["p"]["p0"]), before), "the update changed nothing"

    us = 1e6 / n
    print(f"{n} float32 tensors of {a.size}, medians of {a.repeats} calls, µs per tensor")
    print(f"{'':34}{'hot':>8}{'cold':>8}")
    rows = {}
    for name, fn in (("ours: JAX update", ours), ("ours: NumPy update (kernel+Python)", ours_numpy),
                     ("reads (wait + addresses)", reads), ("jit dispatch of the arrays", dispatch),
                     ("jitted SGD step, donated", jitted_sgd),
                     ("optax adam, jitted", optax_step)):
        rows[name] = [timed(fn, a.repeats, t) * us for t in (None, trash)]
        print(f"{name:34}{rows[name][0]:8.3f}{rows[name][1]:8.3f}")
    jx, npy = rows["ours: JAX update"], rows["ours: NumPy update (kernel+Python)"]
    print(f"{'ours: JAX minus NumPy':34}{jx[0] - npy[0]:8.3f}{jx[1] - npy[1]:8.3f}"
          "   (what JAX arrays add per tensor)")


if __name__ == "__main__":
    main()
