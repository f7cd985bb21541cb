"""What the order of a gradient dict's keys costs an update: Adam on many small tensors,
gradients whose keys come in the parameters' order against the same gradients with their
keys sorted (what a ``jax.jit`` returns for a dict), per backend, in the same run.

Parameter names ``layer0.weight``, ``layer1.weight``, ... are in numeric order, so sorting
them (``layer0``, ``layer1``, ``layer10``, ``layer100``, ...) permutes them. The engines
keep the last key order they saw and its permutation to the parameters' (see
docs/optimizers.md, "Pass gradients as `evaluate` returns them"); before, any other order
was checked and read key by key. Each variant rotates :data:`GRAD_SETS` gradient sets
(made by a jitted function on JAX, as ``jax.grad`` under ``jax.jit`` makes them), and the
first step of each is checked against a NumPy Adam step.

    python benchmarks/gradient_order.py [--tensors 2000] [--size 500] [--rounds 15]
                                        [--backends numpy,torch,jax] [--device cuda]

``--device``: where torch's tensors live (JAX uses its default device).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from mithril.utils.optimizers import Adam

GRAD_SETS, LR = 3, 1e-3
DEVICE = "cpu"  # torch's (--device)


def native(lib: str, arrays: list[dict[str, np.ndarray]]) -> list[dict]:
    """``arrays`` as ``lib``'s arrays, key order kept (JAX: through a jitted identity that
    keeps it, as a JAX computation returns its results)."""
    if lib == "torch":
        import torch

        return [{k: torch.from_numpy(v.copy()).to(DEVICE) for k, v in d.items()} for d in arrays]
    if lib == "jax":
        import jax
        import jax.numpy as jnp

        scale = jax.jit(lambda vals: [v * 1.0 for v in vals])
        return [dict(zip(d, scale([jnp.asarray(v) for v in d.values()]), strict=True))
                for d in arrays]
    return [{k: v.copy() for k, v in d.items()} for d in arrays]


def variant(lib: str, params: dict, grads: list[dict], key_order: list[str]) -> Callable[[], None]:
    """20 updates a call, each with the next gradient set in ``key_order``; checks the
    first against NumPy (one step from a fresh state: p − lr·g/(|g|+ε))."""
    p = native(lib, [params])[0]
    gs = native(lib, [{k: g[k] for k in key_order} for g in grads])
    opt = Adam(LR)
    box = {"p": p, "s": opt.init(p), "i": 0}
    first = next(iter(params))
    box["p"], box["s"] = opt.update(box["p"], gs[0], box["s"])
    got = np.asarray(box["p"][first].cpu().numpy() if lib == "torch" else box["p"][first])
    g0 = grads[0][first].astype(np.float64)
    want = params[first] - LR * g0 / (np.abs(g0) + 1e-8)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    def run() -> None:
        for _ in range(20):
            box["i"] += 1
            box["p"], box["s"] = opt.update(box["p"], gs[box["i"] % GRAD_SETS], box["s"])
        wait(lib, box["p"][first])
    return run


def wait(lib: str, x: object) -> None:
    """Until the device has run the steps queued (a no-op on CPU NumPy/torch)."""
    if lib == "jax":
        x.block_until_ready()  # type: ignore[attr-defined]
    elif lib == "torch" and DEVICE != "cpu":
        import torch

        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tensors", type=int, default=2000)
    ap.add_argument("--size", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--backends", default="numpy,torch,jax")
    ap.add_argument("--device", default="cpu", help="torch's device (e.g. cuda)")
    a = ap.parse_args()
    global DEVICE
    DEVICE = a.device
    if a.tensors < 2 or a.size < 1 or a.rounds < 1:
        ap.error("--tensors must be at least 2, --size and --rounds positive")
    rng = np.random.default_rng(0)
    names = [f"layer{i}.weight" for i in range(a.tensors)]
    params = {n: rng.standard_normal(a.size).astype(np.float32) for n in names}
    grads = [{n: (rng.standard_normal(a.size) * 1e-2).astype(np.float32) for n in names}
             for _ in range(GRAD_SETS)]
    print(f"Adam, {a.tensors} tensors of {a.size} float32, median of {a.rounds} rounds of "
          f"20 steps, ms a step")
    print(f"{'backend':8s} {'params order':>13s} {'keys sorted':>12s} {'sorted/order':>13s}")
    for lib in a.backends.split(","):
        runs = {"order": variant(lib, params, grads, names),
                "sorted": variant(lib, params, grads, sorted(names))}
        times: dict[str, list[float]] = {k: [] for k in runs}
        for r in range(a.rounds):  # the two take turns, starting in turn
            for k in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                t0 = time.perf_counter()
                runs[k]()
                times[k].append((time.perf_counter() - t0) / 20 * 1e3)
        o, s = (statistics.median(times[k]) for k in ("order", "sorted"))
        print(f"{lib:8s} {o:13.2f} {s:12.2f} {s / o:12.2f}x")


if __name__ == "__main__":
    main()
