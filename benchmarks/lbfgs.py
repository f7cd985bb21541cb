"""LBFGS against torch.optim.LBFGS on a 1M-parameter quadratic.

    loss(W, b) = ½ Σ λ⊙(W − C)² + ½ Σ (b − c)² + ½ ‖W·A + b·1ᵀ − B‖² / K
    W: 1000×1000, b: 1000 (1,001,000 parameters), λ log-spaced in [1e-3, 1]

with fixed random C, c, A (1000×K, K = 8) and B: ill-conditioned enough that L-BFGS keeps
iterating for every step, and cheap to evaluate (elementwise terms and two thin matrix
products), so the optimizer's own work (the two-loop recursion over up to
``history_size`` pairs of 1M-vectors) dominates. Each implementation runs the same
sequence of ``step(closure)`` calls from the same start (torch: one ``step``; ours: one
``update``) with the same closure arithmetic (NumPy for our NumPy backend, torch for torch
and ours on torch); the median time per step is printed with its ratio to torch's. Before
timing, one float64 step of each, given torch's closure, is checked to reach torch's
params (to 1e-10; ours on torch with ``fused=False``, torch's own operations: bit for
bit). NumPy's BLAS runs on one thread (``OPENBLAS_NUM_THREADS=1`` unless set): its
spinning pool would otherwise slow torch's OpenMP threads down; torch runs on
``--threads`` threads (1 by default: on a machine busy with other work, torch's threads
wait on each other, ~50x slower per vector operation on a loaded 2-core box).

``--clock cpu`` times each step by the process's CPU time instead of the wall clock (all
threads counted): on a machine busy with other work, waiting for a core is left out.

    python benchmarks/lbfgs.py [--steps 6] [--history 100] [--max-iter 20] [--line-search]
                               [--threads 1] [--clock wall]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mithril.utils.optimizers import LBFGS  # noqa: E402

N, K = 1000, 8


def problem(dtype: str) -> tuple[dict, dict]:
    """The start and the constants."""
    rng = np.random.default_rng(0)
    const = {"lam": rng.permutation(np.logspace(-3, 0, N * N)).reshape(N, N),
             "C": rng.standard_normal((N, N)), "c": rng.standard_normal(N),
             "A": rng.standard_normal((N, K)) / np.sqrt(N), "B": rng.standard_normal((N, K))}
    start = {"W": np.zeros((N, N)), "b": np.zeros(N)}
    cast = {k: v.astype(dtype) for k, v in const.items()}
    return {k: v.astype(dtype) for k, v in start.items()}, cast


def numpy_closure(k: dict):
    lam, C, c, A, B = (k[n] for n in ("lam", "C", "c", "A", "B"))

    def closure(p):
        W, b = p["W"], p["b"]
        d, e = W - C, b - c
        r = (W @ A + b[:, None] - B) / K
        loss = 0.5 * (float(np.vdot(lam * d, d)) + float(np.vdot(e, e)) + K * float(np.vdot(r, r)))
        return loss, {"W": lam * d + r @ A.T, "b": e + r.sum(axis=1)}
    return closure


def torch_closure(k: dict):
    lam, C, c, A, B = (torch.from_numpy(k[n]) for n in ("lam", "C", "c", "A", "B"))

    def closure(p):
        W, b = p["W"], p["b"]
        d, e = W - C, b - c
        r = (W @ A + b[:, None] - B) / K
        loss = 0.5 * (float(torch.vdot((lam * d).reshape(-1), d.reshape(-1)))
                      + float(torch.vdot(e, e)) + K * float(torch.vdot(r.reshape(-1), r.reshape(-1))))
        return loss, {"W": lam * d + r @ A.T, "b": e + r.sum(dim=1)}
    return closure


def make_torch(start, const, **kw):
    """A function making one torch.optim.LBFGS step, and one giving its params."""
    params = {k: torch.tensor(v) for k, v in start.items()}
    opt = torch.optim.LBFGS(list(params.values()), **kw)
    f = torch_closure(const)

    def closure():
        loss, grads = f(params)
        for k, p in params.items():
            p.grad = grads[k]
        return loss

    return lambda: opt.step(closure), lambda: {k: v.numpy() for k, v in params.items()}


def via_torch(const: dict):
    """torch's closure for NumPy params (the check: the same loss and gradient bits)."""
    f = torch_closure(const)

    def closure(p):
        loss, grads = f({k: torch.from_numpy(v) for k, v in p.items()})
        return loss, {k: v.numpy() for k, v in grads.items()}
    return closure


def make_ours(kind, start, const, same_closure=False, **kw):
    """The same for our LBFGS on the ``kind`` backend."""
    if kind == "torch":
        params, closure = {k: torch.tensor(v) for k, v in start.items()}, torch_closure(const)
    else:
        params = {k: v.copy() for k, v in start.items()}
        closure = via_torch(const) if same_closure else numpy_closure(const)
    kw["learning_rate"] = kw.pop("lr")
    opt = LBFGS(**kw)
    box = {"p": params, "s": opt.init(params)}

    def step():
        box["p"], box["s"] = opt.update(box["p"], None, box["s"], closure=closure)

    return step, lambda: {k: v.numpy() if kind == "torch" else v for k, v in box["p"].items()}


def rel(x: dict, y: dict) -> float:
    return max(float(np.abs(x[k] - y[k]).max() / np.abs(y[k]).max()) for k in y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1, help="torch's intra-op threads")
    ap.add_argument("--history", type=int, default=100)
    ap.add_argument("--max-iter", type=int, default=20)
    ap.add_argument("--line-search", action="store_true", help="line_search_fn='strong_wolfe'")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="cpu: this process's CPU time (all its threads)")
    args = ap.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    kw = dict(lr=1.0 if args.line_search else 0.5, max_iter=args.max_iter,
              history_size=args.history,
              line_search_fn="strong_wolfe" if args.line_search else None)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {N * N + N:,} "
          f"parameters; {kw}; {args.clock} clock")

    start, const = problem("float64")  # the check: one step each, float64
    step, params = make_torch(start, const, **kw)
    step()
    ref = params()
    cases = [("numpy", None), ("torch", None), ("torch", False)]
    for kind, fused in cases:
        step, params = make_ours(kind, start, const, same_closure=True, fused=fused, **kw)
        step()
        err = rel(params(), ref)
        print(f"check: ours on {kind:5s} (fused={fused}) vs torch after one float64 step "
              f"(torch's closure): max rel diff {err:.1e}")
        exact = kind == "torch" and fused is False  # torch's own operations
        assert err <= (0.0 if exact else 1e-10), err

    # float32, the four in turn step by step: a machine's load changes hit all alike
    start, const = problem("float32")
    names = ["torch.optim.LBFGS"] + [f"ours, {k} backend" + (", fused=False" if f is False else "")
                                     for k, f in cases]
    steps = [make_torch(start, const, **kw)[0]] + [
        make_ours(k, start, const, fused=f, **kw)[0] for k, f in cases]
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(args.steps):
        for step, t in zip(steps, times):
            t0 = clock()
            step()
            t.append(clock() - t0)
    for name, t in zip(names, times):
        ratio = statistics.median(a / b for a, b in zip(t, times[0]))
        print(f"{name:36s} median step {statistics.median(t) * 1e3:8.1f} ms, total "
              f"{sum(t):6.2f} s" + ("" if t is times[0] else
                                     f"   {ratio:.2f}x torch's (median of per-step ratios)"))


if __name__ == "__main__":
    main()
