"""How the fused CPU step's work is cut for threads: piece sizes, A/B in one process.

The NumPy engine cuts the flat buffers into pieces of ``threads.PIECE`` elements and gives
each thread a contiguous range of them (:mod:`mithril.utils.optimizers.engines.atomics`).
This script times one optimizer step (SGD-momentum or Adam, float32, one tensor) with
several piece sizes, each its own optimizer and state, taking turns in rotating blocks in
this one process with the same rotating gradient sets, so that the comparison does not
depend on where a process's pages or code happen to land (that alone moves a 1M-param
step by ~10% between processes). A size larger than half the tensor gives one piece per
thread: the static split of torch's ``parallel_for``. Medians, and each one's ratio to the
default piece size; bandwidth at 20 B/param (SGD) or 28 (Adam). Each layout's update is
checked once against NumPy. Torch's fused step is measured by
``benchmarks/optimizer_step.py``, in processes of its own: in one process its OpenMP
threads spin on the cores ours need.

    python benchmarks/piece_layout.py                       # 10M and 1M, SGD and Adam
    python benchmarks/piece_layout.py --params 10M --pieces 16,18,20,half --optimizers sgd
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from mithril.utils.optimizers import SGD, Adam
from mithril.utils.optimizers.engines import threads

GRAD_SETS = 4
BYTES = {"sgd": 20, "adam": 28}


def _count(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 10**3, "M": 10**6}.get(text[-1:], 1)
    return int(float(text.rstrip("KM")) * scale)


def _piece(spec: str, n: int) -> int:
    """A piece size from ``spec``: a power of two (``18``: 2^18) or ``half`` (n/2, rounded
    up to a multiple of 16)."""
    if spec == "half":
        return -(-n // 32) * 16
    return 1 << int(spec)


def _make(kind: str) -> object:
    return SGD(learning_rate=1e-3, momentum=0.9) if kind == "sgd" else Adam(learning_rate=1e-3)


def _check(kind: str, p0: np.ndarray, g: np.ndarray, p1: np.ndarray) -> None:
    """The first update against NumPy (SGD: b = g; Adam: p − lr·sign-ish first step)."""
    if kind == "sgd":
        want = p0 - 1e-3 * g
    else:  # Adam's first step: m̂ = g, v̂ = g², so p − lr·g/(|g| + ε)
        want = p0 - 1e-3 * g / (np.abs(g) + 1e-8)
    np.testing.assert_allclose(p1, want, rtol=1e-5, atol=1e-6)


def run(n: int, kind: str, specs: list[str], rounds: int, block: int) -> None:
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(n).astype(np.float32)
    grads = [{"w": rng.standard_normal(n).astype(np.float32)} for _ in range(GRAD_SETS)]
    default = threads.PIECE
    boxes = {}
    for spec in specs:
        threads.PIECE = _piece(spec, n)  # the plan is cut when the optimizer's state is made
        try:
            opt = _make(kind)
            params = {"w": p0.copy()}
            state = opt.init(params)
            params, state = opt.update(params, grads[0], state)
        finally:
            threads.PIECE = default
        _check(kind, p0, grads[0]["w"], np.asarray(params["w"]))
        boxes[spec] = [opt, params, state, state.engine._plan.pieces]
    times: dict[str, list[float]] = {s: [] for s in specs}
    for r in range(rounds):
        order = specs[r % len(specs):] + specs[:r % len(specs)]
        for spec in order:
            opt, params, state, _ = boxes[spec]
            for i in range(GRAD_SETS):  # warm: this layout's buffers in cache as they will be
                params, state = opt.update(params, grads[i], state)
            t0 = time.perf_counter()
            for i in range(block):
                params, state = opt.update(params, grads[i % GRAD_SETS], state)
            times[spec].append((time.perf_counter() - t0) / block)
            boxes[spec][1:3] = params, state
    ref = statistics.median(times[specs[0]])
    print(f"\n{kind}, {n:,} float32 params in one tensor, {threads.get_num_threads()} threads, "
          f"median of {rounds} blocks of {block} steps")
    print(f"{'piece':>18} {'pieces':>7} {'median ms':>10} {'vs ' + specs[0]:>10} {'GB/s':>7}")
    for spec in specs:
        med = statistics.median(times[spec])
        size = _piece(spec, n)
        print(f"{spec + ' (' + format(size, ',') + ')':>18} {boxes[spec][3]:>7} {med * 1e3:>10.3f} "
              f"{med / ref:>9.2f}x {BYTES[kind] * n / med / 1e9:>7.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="10M,1M", help="comma-separated sizes (10M, 1M, 500K)")
    ap.add_argument("--optimizers", default="sgd,adam")
    ap.add_argument("--pieces", default="18,16,20,half",
                    help="piece sizes: log2 or 'half'; the first is the reference")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--block", type=int, default=20)
    a = ap.parse_args()
    specs = a.pieces.split(",")
    for s in specs:
        if s != "half" and not (s.isdigit() and 4 <= int(s) <= 30):
            ap.error(f"--pieces: {s!r} is neither a log2 size in [4, 30] nor 'half'")
    kinds = a.optimizers.split(",")
    if not set(kinds) <= set(BYTES) or a.rounds < 1 or a.block < 1:
        ap.error("--optimizers takes sgd and adam; --rounds and --block must be positive")
    for n in map(_count, a.params.split(",")):
        for kind in kinds:
            run(n, kind, specs, a.rounds, a.block)


if __name__ == "__main__":
    main()
