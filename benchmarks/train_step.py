"""Forward + backward of an MLP 784-512-512-10 (relu), batch 128, float32:
Mithril's ``compiled.evaluate(params, inputs, output_gradients={"output": g})`` against the
same network written by hand in plain torch (autograd), plain JAX
(``jax.jit(jax.value_and_grad)``) and plain NumPy (hand-written backward).

Every variant gets the same parameters, inputs and output cotangent ``g`` and returns the
outputs and the parameter gradients (checked equal before timing). All are timed in one
process: each round visits the backends in turn and times Mithril and hand-written in
ABBA / BAAB order; the medians are reported with the ratio Mithril / hand-written.

    python benchmarks/train_step.py [--rounds 16] [--calls 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend

SIZES = [784, 512, 512, 10]
BATCH = 128
SETTLE_S = 0.2


# -- hand-written references ---------------------------------------------------------------
def numpy_step(p, x, g):
    w1, b1, w2, b2, w3, b3 = p
    h1 = np.maximum(x @ w1.T + b1, 0)
    h2 = np.maximum(h1 @ w2.T + b2, 0)
    out = h2 @ w3.T + b3
    gw3, gb3 = g.T @ h2, g.sum(0)
    d2 = (g @ w3) * (h2 > 0)
    gw2, gb2 = d2.T @ h1, d2.sum(0)
    d1 = (d2 @ w2) * (h1 > 0)
    gw1, gb1 = d1.T @ x, d1.sum(0)
    return out, (gw1, gb1, gw2, gb2, gw3, gb3)


def torch_step(p, x, g):
    leaves = [t.detach().requires_grad_(True) for t in p]
    w1, b1, w2, b2, w3, b3 = leaves
    h = torch.relu(x @ w1.T + b1)
    h = torch.relu(h @ w2.T + b2)
    out = h @ w3.T + b3
    grads = torch.autograd.grad(out, leaves, g)
    return out.detach(), grads


def _jax_loss(p, x, g):
    w1, b1, w2, b2, w3, b3 = p
    h = jax.nn.relu(x @ w1.T + b1)
    h = jax.nn.relu(h @ w2.T + b2)
    out = h @ w3.T + b3
    return jnp.vdot(out, g), out  # d/dp <out, g> is the VJP of g


jax_step = jax.jit(jax.value_and_grad(_jax_loss, has_aux=True))


# -- set-up -------------------------------------------------------------------------------
def build():
    model = ml.MLP(["relu", "relu", None], SIZES[1:])
    model.set_shapes(input=[None, SIZES[0]])
    return model


def variants():
    """"numpy/mithril", "numpy/hand", ... -> a zero-argument step returning arrays to block on."""
    out = {}
    for label, backend in (("numpy", NumpyBackend()), ("torch", TorchBackend()),
                           ("jax", JaxBackend())):
        backend.set_seed(0)
        compiled = ml.compile(build(), backend)
        params = compiled.get_parameters()
        x = backend.randn(BATCH, SIZES[0])
        g = backend.randn(BATCH, SIZES[-1])
        inputs, cots = {"input": x}, {"output": g}
        ordered = tuple(params.values())  # linear_0.weight, linear_0.bias, linear_1.weight, ...
        assert list(params) == [f"linear_{i}.{k}" for i in range(3) for k in ("weight", "bias")]

        def mithril(c=compiled, p=params, i=inputs, o=cots):
            return c.evaluate(p, i, output_gradients=o)

        hand = {"numpy": numpy_step, "torch": torch_step, "jax": jax_step}[label]

        def reference(h=hand, p=ordered, x=x, g=g):
            return h(p, x, g)

        # sanity: both compute the same gradients
        (_, got), (_, want) = mithril(), reference()  # jax: ((value, out), grads)
        for p, w in zip((got[name] for name in params), want, strict=True):
            a, b = backend.to_numpy(p), backend.to_numpy(w)
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())
        out[f"{label}/mithril"], out[f"{label}/hand"] = mithril, reference
    return out


def block(result):
    jax.block_until_ready(jax.tree_util.tree_leaves(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=16, help="interleaved rounds")
    ap.add_argument("--calls", type=int, default=5, help="calls per timing sample")
    args = ap.parse_args()

    runs = variants()
    for fn in runs.values():  # warm-up (JAX compiles here)
        for _ in range(3):
            block(fn())

    def sample(fn) -> float:
        for _ in range(2):  # untimed: let the previous library's thread pool settle
            block(fn())
        t0 = time.perf_counter()
        for _ in range(args.calls):
            block(fn())
        return (time.perf_counter() - t0) / args.calls * 1e3

    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(args.rounds):
        for label in ("numpy", "torch", "jax"):
            # The previous library's worker threads keep spinning for a while after its
            # last call (OpenBLAS ~0.1 s) and would slow whichever variant runs first.
            time.sleep(SETTLE_S)
            a, b = f"{label}/mithril", f"{label}/hand"
            if r % 2:
                a, b = b, a
            for name in (a, b, b, a):  # ABBA, then BAAB: both sides see the same conditions
                times[name].append(sample(runs[name]))

    print(f"MLP {'-'.join(map(str, SIZES))} relu, batch {BATCH}, float32, forward+backward; "
          f"median of {2 * args.rounds} samples x {args.calls} calls; torch threads "
          f"{torch.get_num_threads()}")
    print(f"{'backend':8} {'mithril ms':>11} {'hand ms':>9} {'ratio':>7}")
    for label in ("numpy", "torch", "jax"):
        m = statistics.median(times[f"{label}/mithril"])
        h = statistics.median(times[f"{label}/hand"])
        print(f"{label:8} {m:11.3f} {h:9.3f} {m / h:7.3f}")


if __name__ == "__main__":
    main()
