"""Muon against torch.optim.Muon on 8 matrices of 512×512, float32.

Each implementation steps from the same start with the same gradients, rotating through
``--pool`` fresh random gradient sets (so no step reuses the previous one's buffers); the
median time per step is printed with its ratio to torch's (the median of per-step ratios:
the three run in turn step by step, so a machine's changing load hits all alike).

Ours runs on the torch backend (the very operations torch runs: the bfloat16
Newton–Schulz iteration included) and on the NumPy backend (bfloat16 emulated: float32
matrix products, each result rounded to bfloat16). With ``--ns-dtype float32`` ours
iterates in float32 instead (torch has no such option: its timing stays bfloat16's).

Before timing, one step of each from the same params and gradients is checked against
torch's: on the torch backend equal to the last bit; on NumPy to bfloat16 rounding (the
updates differ by at most 2⁻⁶ in Frobenius norm, relative; float32 sums of 512 products
round differently from torch's, and the iteration spreads each flipped bfloat16 rounding;
for scale, the same step with a float64 iteration is printed: torch's bfloat16 is that far
from exact).
Both libraries run on ``--threads`` threads (torch's intra-op pool and NumPy's BLAS).

    python benchmarks/muon.py [--steps 20] [--pool 4] [--threads 1] [--ns-dtype bfloat16]
"""

from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__":  # the BLAS pool's size is read when NumPy loads
    _threads = next((a.split("=")[1] for a in sys.argv if a.startswith("--threads=")), None)
    if _threads is None and "--threads" in sys.argv:
        _threads = sys.argv[sys.argv.index("--threads") + 1]
    os.environ.setdefault("OPENBLAS_NUM_THREADS", _threads or "1")
    os.environ.setdefault("OMP_NUM_THREADS", _threads or "1")

import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mithril.utils.optimizers import Muon  # noqa: E402

N_MATRICES, SIZE = 8, 512
KW = dict(lr=0.02, weight_decay=0.1, momentum=0.95)


def data(pool: int) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(0)
    shape = (SIZE, SIZE)
    start = {f"w{i}": rng.standard_normal(shape).astype(np.float32) * 0.02
             for i in range(N_MATRICES)}
    grads = [{k: rng.standard_normal(shape).astype(np.float32) for k in start}
             for _ in range(pool)]
    return start, grads


def make_torch(start: dict, grads: list[dict]):
    params = {k: torch.tensor(v) for k, v in start.items()}
    tgrads = [{k: torch.tensor(v) for k, v in g.items()} for g in grads]
    opt = torch.optim.Muon(list(params.values()), **KW)
    box = {"t": 0}

    def step() -> None:
        g = tgrads[box["t"] % len(tgrads)]
        box["t"] += 1
        for k, p in params.items():
            p.grad = g[k]
        opt.step()

    return step, lambda: {k: v.numpy().copy() for k, v in params.items()}


def make_ours(kind: str, start: dict, grads: list[dict], ns_dtype: str | None):
    native = torch.tensor if kind == "torch" else np.array
    opt = Muon(KW["lr"], weight_decay=KW["weight_decay"], momentum=KW["momentum"],
               ns_dtype=ns_dtype, fallback=None)
    params = {k: native(v) for k, v in start.items()}
    ngrads = [{k: native(v) for k, v in g.items()} for g in grads]
    box = {"p": params, "s": opt.init(params), "t": 0}

    def step() -> None:
        g = ngrads[box["t"] % len(ngrads)]
        box["t"] += 1
        box["p"], box["s"] = opt.update(box["p"], g, box["s"])

    return step, lambda: {k: np.array(v.numpy() if kind == "torch" else v)
                          for k, v in box["p"].items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--pool", type=int, default=4, help="gradient sets rotated through")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ns-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start, grads = data(args.pool)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {N_MATRICES} "
          f"matrices {SIZE}x{SIZE} float32; {KW}; ours: ns_dtype={args.ns_dtype}")

    # the check: one step of each from the same start (torch: bfloat16 Newton–Schulz)
    step, get = make_torch(start, grads)
    step()
    ref = {k: v - start[k] for k, v in get().items()}
    for kind, ns_dtype in (("torch", "bfloat16"), ("numpy", "bfloat16"), ("numpy", "float64")):
        step, get = make_ours(kind, start, grads, ns_dtype)
        step()
        upd = {k: v - start[k] for k, v in get().items()}
        err = max(float(np.linalg.norm(upd[k] - ref[k]) / np.linalg.norm(ref[k])) for k in ref)
        print(f"check: one step, ours on {kind:5s} ({ns_dtype}) vs torch: the updates differ "
              f"by {err:.1e} (Frobenius, relative)")
        if ns_dtype == "bfloat16":  # float64: bfloat16's own error, for scale
            assert err <= (0.0 if kind == "torch" else 2.0 ** -6), err

    names = ["torch.optim.Muon", "ours, torch backend", "ours, numpy backend"]
    steps = [make_torch(start, grads)[0], make_ours("torch", start, grads, args.ns_dtype)[0],
             make_ours("numpy", start, grads, args.ns_dtype)[0]]
    for step in steps:  # warm-up (first-call allocations, numba compiles of the checks)
        step()
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(args.steps):
        for step, t in zip(steps, times):
            t0 = time.perf_counter()
            step()
            t.append(time.perf_counter() - t0)
    for name, t in zip(names, times):
        ratio = statistics.median(a / b for a, b in zip(t, times[0]))
        print(f"{name:22s} median step {statistics.median(t) * 1e3:8.1f} ms" +
              ("" if t is times[0] else f"   {ratio:.2f}x torch's (median of per-step ratios)"))


if __name__ == "__main__":
    main()
