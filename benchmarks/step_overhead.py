"""Per-call overhead of a training step, in one process: torch written by hand against
Mithril's ``evaluate`` (forward + gradients) and ``make_train_step`` on the same network
(MLP [64, 128, 128, 10] + cross-entropy, batch 128, float32, Adam).

Variants (torch; NumPy has no hand-written reference: its two Mithril variants only):

* ``hand fwd+grad``: ``F.linear`` / ``relu`` / ``F.cross_entropy`` on detached leaves and
  ``torch.autograd.grad`` (what ``evaluate(..., output_gradients=...)`` computes);
* ``hand loop``: the same, the gradients set as ``.grad`` and ``torch.optim.Adam(fused=True)``;
* ``evaluate``: ``compiled.evaluate(params, batch, output_gradients={"loss": 1.0})``;
* ``eval+update``: ``evaluate`` then ``optimizer.update``;
* ``step``: ``make_train_step``'s step.

``--base DIR``: also the same Mithril variants from another copy of the package, importable
from ``DIR`` as ``mithril_base`` (e.g. ``git archive <commit> src/mithril`` unpacked and
renamed), for an A/B in one process. Rounds visit the variants in turn (alternating order),
each round timing ``--calls`` calls; printed: the median and minimum per call and the median
of the per-round ratios to the first variant. ``--clock thread`` times this thread's CPU
time (torch runs its kernels on the calling thread with ``--threads 1``): steadier than the
wall clock on a shared machine. Keep ``--threads 1`` there: the threads of two libraries'
pools (OpenBLAS, OpenMP) spin after their work and take each other's cores.

    python benchmarks/step_overhead.py [--backend torch numpy] [--rounds 15] [--calls 40]
                                       [--threads 1] [--clock wall|thread] [--base DIR]
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

B, FEATURES, CLASSES, HIDDEN = 128, 64, 10, (128, 128)


def mithril_variants(pkg: str, backend: str, seed: int = 0) -> dict[str, Callable[[int], Any]]:
    """``evaluate``, ``eval+update`` and ``step`` of package ``pkg`` (``mithril`` or a copy)."""
    import numpy as np

    ml = importlib.import_module(pkg)
    backends = importlib.import_module(pkg + ".backends")
    Adam = importlib.import_module(pkg + ".utils.optimizers").Adam
    make_train_step = importlib.import_module(pkg + ".utils.training").make_train_step
    m = ml.Model()
    m |= ml.MLP(["relu"] * len(HIDDEN) + [None], [*HIDDEN, CLASSES])(input="input",
                                                                     output="logits")
    m |= ml.CrossEntropy()(input="logits", target="target", output=ml.IOKey("loss"))
    be = (backends.TorchBackend if backend == "torch" else backends.NumpyBackend)(
        dtype="float32", seed=seed)
    compiled = ml.compile(m, be, shapes={"input": [B, FEATURES]})
    rng = np.random.default_rng(seed)
    init = {k: (0.1 * rng.standard_normal(s)).astype(np.float32)
            for k, s in compiled.parameter_shapes.items()}
    feed = [{"input": be.array(rng.standard_normal((B, FEATURES)).astype(np.float32)),
             "target": be.array(rng.integers(0, CLASSES, B), be.int_dtype)} for _ in range(8)]
    cots = {"loss": 1.0}
    fixed = {k: be.array(v) for k, v in init.items()}
    box: dict[str, Any] = {}
    opt = Adam(learning_rate=1e-3)
    box["p"] = {k: be.array(v) for k, v in init.items()}
    box["s"] = opt.init(box["p"])
    step = make_train_step(compiled, Adam(learning_rate=1e-3), loss="loss")
    box["sp"] = {k: be.array(v) for k, v in init.items()}
    box["ss"] = step.init(box["sp"])

    def evaluate(i: int) -> Any:
        return compiled.evaluate(fixed, feed[i % 8], output_gradients=cots)

    def separate(i: int) -> None:
        _, g = compiled.evaluate(box["p"], feed[i % 8], output_gradients=cots)
        box["p"], box["s"] = opt.update(box["p"], g, box["s"])

    def stepped(i: int) -> None:
        box["sp"], box["ss"], _ = step(box["sp"], box["ss"], feed[i % 8])

    return {"evaluate": evaluate, "eval+update": separate, "step": stepped}


def hand_variants(seed: int = 0) -> dict[str, Callable[[int], Any]]:
    """The same network and step written with torch by hand."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(seed)
    sizes = [FEATURES, *HIDDEN, CLASSES]
    ps: list[Any] = []
    for i, o in zip(sizes[:-1], sizes[1:], strict=True):
        ps += [torch.tensor(0.1 * rng.standard_normal((o, i)), dtype=torch.float32),
               torch.zeros(o)]
    leaves = [p.clone().requires_grad_() for p in ps]
    feed = [(torch.from_numpy(rng.standard_normal((B, FEATURES)).astype(np.float32)),
             torch.from_numpy(rng.integers(0, CLASSES, B))) for _ in range(8)]
    opt = torch.optim.Adam(leaves, lr=1e-3, fused=True)

    def loss_of(ws: list[Any], i: int) -> Any:
        h, y = feed[i % 8]
        for k in range(len(ws) // 2):
            h = F.linear(h, ws[2 * k], ws[2 * k + 1])
            if k < len(ws) // 2 - 1:
                h = torch.relu(h)
        return F.cross_entropy(h, y)

    def fwd_grad(i: int) -> Any:
        ws = [p.detach().requires_grad_() for p in ps]
        with torch.enable_grad():
            loss = loss_of(ws, i)
        return loss, torch.autograd.grad(loss, ws)

    def loop(i: int) -> None:
        loss = loss_of(leaves, i)
        for p, g in zip(leaves, torch.autograd.grad(loss, leaves), strict=True):
            p.grad = g
        opt.step()

    return {"hand fwd+grad": fwd_grad, "hand loop": loop}


def measure(variants: dict[str, Callable[[int], Any]], rounds: int, calls: int,
            clock: Callable[[], int]) -> dict[str, list[float]]:
    """Per-call times (us) of each variant, one entry per round; rounds alternate order."""
    for f in variants.values():  # warm-up: kernels compiled, caches and steady states made
        for i in range(20):
            f(i)
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(rounds):
        for k in names if r % 2 == 0 else names[::-1]:
            f = variants[k]
            t0 = clock()
            for i in range(calls):
                f(i)
            times[k].append((clock() - t0) / calls / 1e3)
    return times


def report(times: dict[str, list[float]]) -> None:
    first = next(iter(times))
    print(f"{'variant':28s} {'median us':>10s} {'min us':>8s} {'ratio to ' + first:>28s}")
    for k, v in times.items():
        ratio = statistics.median(a / b for a, b in zip(v, times[first], strict=True))
        print(f"{k:28s} {statistics.median(v):10.1f} {min(v):8.1f} {ratio:27.3f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", nargs="+", default=["torch", "numpy"],
                    choices=["torch", "numpy"])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1, help="torch's and BLAS's threads")
    ap.add_argument("--clock", choices=("wall", "thread"), default="wall")
    ap.add_argument("--base", default=None, help="a directory holding mithril_base (A/B)")
    args = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))  # (before NumPy loads BLAS)
    import torch

    torch.set_num_threads(args.threads)
    if args.base:
        sys.path.insert(0, args.base)
    clock = time.perf_counter_ns if args.clock == "wall" else time.thread_time_ns
    for backend in args.backend:
        variants: dict[str, Callable[[int], Any]] = {}
        if backend == "torch":
            variants.update(hand_variants())
        for pkg in (["mithril_base"] if args.base else []) + ["mithril"]:
            label = "base " if pkg == "mithril_base" else ""
            variants.update({f"{label}{k}": f for k, f in mithril_variants(pkg, backend).items()})
        print(f"{backend}: MLP {[FEATURES, *HIDDEN, CLASSES]} + cross-entropy, batch {B}, "
              f"float32, Adam; {args.threads} thread(s), {args.clock} clock, median of "
              f"{args.rounds} rounds of {args.calls} calls")
        report(measure(variants, args.rounds, args.calls, clock))


if __name__ == "__main__":
    main()
