"""Muon against torch.optim.Muon on 8 matrices of 512×512, float32.

Each implementation steps from the same start with the same gradients, rotating through
``--pool`` fresh random gradient sets (so no step reuses the previous one's buffers); the
median time per step is printed with its ratio to torch's (the median of per-step ratios:
the three run in turn step by step, so a machine's changing load hits all alike).

Ours runs on the torch backend (the very operations torch runs: the bfloat16
Newton–Schulz iteration included), on the NumPy backend (where torch is installed, the same
torch operations on zero-copy views of our NumPy buffers; ``--numpy-emulated`` times the
path taken without torch: float32 matrix products, each result rounded to bfloat16) and,
where JAX is installed, on JAX (eager, emulated). With ``--ns-dtype float32`` ours iterates
in float32 instead (torch has no such option: its timing stays bfloat16's).

Where the emulated path's time goes (one thread): torch's 15 bfloat16 products per matrix
run on oneDNN's AVX512-BF16 kernels, ~0.58 ms each for 512×512 on the AMD Zen 4 this was
written on; NumPy has float32 BLAS only: OpenBLAS ``sgemm`` ~2.2 ms and ``ssyrk`` ~1.7 ms,
so that path is bound near 3x torch's time however little else it does.

Before timing, two steps of each from the same params and gradients (the second on the
arrays the first returned: the in-place path that is timed) are checked against torch's:
equal to the last bit on the torch and NumPy backends; emulated, to bfloat16 rounding (for
scale, the same step with a float64 iteration is printed: torch's bfloat16 is that far from
exact).
All run on ``--threads`` threads (torch's intra-op pool, NumPy's BLAS, XLA's CPU pool).

``--clock cpu`` times each step by the process's CPU time instead of the wall clock (all
threads counted): on a machine busy with other work, waiting for a core is left out.

    python benchmarks/muon.py [--steps 20] [--pool 4] [--threads 1] [--ns-dtype bfloat16]
                              [--no-jax] [--clock wall]
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
    if (_threads or "1") == "1":  # XLA's CPU pool: one thread too
        os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                                           "intra_op_parallelism_threads=1")

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
    if kind == "jax":
        import jax
        import jax.numpy as jnp

        native = jnp.asarray
    else:
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
        if kind == "jax":
            jax.block_until_ready(box["p"])

    return step, lambda: {k: np.array(v.numpy() if kind == "torch" else v)
                          for k, v in box["p"].items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--pool", type=int, default=4, help="gradient sets rotated through")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ns-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--no-jax", action="store_true", help="leave JAX out")
    ap.add_argument("--numpy-emulated", action="store_true",
                    help="the NumPy backend's path without torch (float32 BLAS, rounded)")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="cpu: this process's CPU time (all its threads), for a machine "
                         "busy with other work")
    args = ap.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    try:
        import jax  # noqa: F401
    except ImportError:
        args.no_jax = True
    kinds = ["torch", "numpy"] + ([] if args.no_jax else ["jax"])
    if args.numpy_emulated:
        from mithril.utils.optimizers import muon

        muon._TORCH["module"] = None  # as without torch installed
    torch.set_num_threads(args.threads)
    start, grads = data(args.pool)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {N_MATRICES} "
          f"matrices {SIZE}x{SIZE} float32; {KW}; ours: ns_dtype={args.ns_dtype}; "
          f"{args.clock} clock")

    # the check: two steps of each from the same start (torch: bfloat16 Newton–Schulz)
    step, get = make_torch(start, grads)
    step(), step()
    ref = {k: v - start[k] for k, v in get().items()}
    for kind, ns_dtype in [(k, "bfloat16") for k in kinds] + [("numpy", "float64")]:
        step, get = make_ours(kind, start, grads, ns_dtype)
        step(), step()
        upd = {k: v - start[k] for k, v in get().items()}
        err = max(float(np.linalg.norm(upd[k] - ref[k]) / np.linalg.norm(ref[k])) for k in ref)
        print(f"check: two steps, ours on {kind:5s} ({ns_dtype}) vs torch: the updates "
              f"differ by {err:.1e} (Frobenius, relative)")
        if ns_dtype == "bfloat16":  # float64: bfloat16's own error, for scale
            exact = kind == "torch" or (kind == "numpy" and not args.numpy_emulated)
            assert err <= (0.0 if exact else 2.0 ** -6), err

    names = ["torch.optim.Muon"] + [f"ours, {k} backend" for k in kinds]
    steps = [make_torch(start, grads)[0]] + [make_ours(k, start, grads, args.ns_dtype)[0]
                                             for k in kinds]
    for step in steps:  # warm-up (first-call allocations, numba compiles of the checks)
        step()
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(args.steps):
        for step, t in zip(steps, times):
            t0 = clock()
            step()
            t.append(clock() - t0)
    for name, t in zip(names, times):
        ratio = statistics.median(a / b for a, b in zip(t, times[0]))
        print(f"{name:22s} median step {statistics.median(t) * 1e3:8.1f} ms" +
              ("" if t is times[0] else f"   {ratio:.2f}x torch's (median of per-step ratios)"))


if __name__ == "__main__":
    main()
