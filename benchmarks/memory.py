"""Peak memory of Adam's first update on ``--params`` float32 parameters (default 50M, in
10 tensors), each case in a fresh process: the peak RSS (``ru_maxrss``) once params and
gradients exist, and after ``init`` + the first update, reported as bytes per parameter
beyond params + gradients (an ideal Adam needs 8: the two moments).

Cases: ``numpy`` / ``torch`` / ``jax`` (mithril ``Adam``, ``init`` then ``update``: the
caller still holds the arrays it passed, which ``update`` never modifies, so one copy of the
parameters is made besides them: 12 B/param is the floor there), ``numpy-adopt`` /
``torch-adopt`` (the same, but the caller hands its arrays over with ``params =
opt.adopt(params, state)`` after ``init``: moved into the flat buffer one by one, never
held twice), ``torch-optim`` (mithril's
``torch_optimizer(Adam)`` on ``nn.Parameter`` s: in place, as torch), ``torch-fused``
(``torch.optim.Adam(fused=True)``), ``optax`` (``optax.adam`` in a jitted, donated step),
``mithril-optax`` (the same step with ``mithril.interop.optax_transformation(Adam)``: the
optimizer half of ``make_train_step``'s one JAX program).

Imports and kernels (numba's compiler, the disk-cached kernels) are excluded: each case first
runs one tiny step of its own optimizer, then measures. The host arrays the inputs were made
from are dropped, so that what is left is what the caller holds.

Each case runs ``--repeat`` times (default 3, the cases taking turns), each in a fresh
process, and the median is reported with the range; the children run with glibc's mmap
threshold fixed at its default (:data:`CHILD_ENV`), else a run's figure moves by up to
~4 B/param between identical runs. The jitted JAX
steps are compiled before the baseline is taken, from the shapes alone.

    python benchmarks/memory.py [--params 50000000] [--case numpy torch ...] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

CASES = ("numpy", "torch", "jax", "numpy-adopt", "torch-adopt", "torch-optim", "torch-fused",
         "optax", "mithril-optax")


#: glibc's default mmap threshold (128 KiB), fixed: by default glibc raises it after a large
#: block is freed (up to 32 MiB), so blocks freed *before* the baseline decide whether later
#: ones come from the heap (kept) or from mmap (returned): ±3 B/param between identical runs
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}


def peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def run_case(case: str, n: int, tensors: int) -> dict:
    import numpy as np

    adopt = case.endswith("-adopt")
    case = case.removesuffix("-adopt")
    warm_up(case)
    rng = np.random.default_rng(0)
    size = n // tensors
    host_p = [rng.standard_normal(size, dtype=np.float32) for _ in range(tensors)]
    host_g = [rng.standard_normal(size, dtype=np.float32) for _ in range(tensors)]
    if case in ("numpy", "torch", "jax"):
        from mithril.utils.optimizers import Adam

        if case == "numpy":
            params = {f"p{i}": a for i, a in enumerate(host_p)}
            grads = {f"p{i}": a for i, a in enumerate(host_g)}
        elif case == "torch":
            import torch

            params = {f"p{i}": torch.from_numpy(a) for i, a in enumerate(host_p)}
            grads = {f"p{i}": torch.from_numpy(a) for i, a in enumerate(host_g)}
        else:
            import jax.numpy as jnp

            params = {f"p{i}": jnp.asarray(a) for i, a in enumerate(host_p)}
            grads = {f"p{i}": jnp.asarray(a) for i, a in enumerate(host_g)}
        del host_p[:], host_g[:]
        base = peak()
        opt = Adam(learning_rate=1e-3)
        state = opt.init(params)
        if adopt:
            params = opt.adopt(params, state)
        params, state = opt.update(params, grads, state)
    elif case in ("torch-fused", "torch-optim"):
        import torch

        ps = [torch.nn.Parameter(torch.from_numpy(a)) for a in host_p]
        for p, g in zip(ps, host_g, strict=True):
            p.grad = torch.from_numpy(g)
        del host_p[:], host_g[:]
        base = peak()
        if case == "torch-fused":
            opt = torch.optim.Adam(ps, lr=1e-3, fused=True)
        else:
            from mithril.interop import torch_optimizer
            from mithril.utils.optimizers import Adam

            opt = torch_optimizer(Adam(learning_rate=1e-3), ps)
        opt.step()
    else:
        import jax
        import jax.numpy as jnp
        import optax

        if case == "optax":
            tx = optax.adam(1e-3)
        else:
            from mithril.interop import optax_transformation
            from mithril.utils.optimizers import Adam

            tx = optax_transformation(Adam(learning_rate=1e-3))

        def step(p, s, g):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        # compiled before the baseline (XLA's compiler memory is not the optimizer's)
        specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in host_p]
        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
            specs, jax.eval_shape(tx.init, specs), specs).compile()
        params = [jnp.asarray(a) for a in host_p]
        grads = [jnp.asarray(a) for a in host_g]
        del host_p[:], host_g[:]
        base = peak()
        state = tx.init(params)
        params, state = compiled(params, state, grads)
        jax.block_until_ready(params)
    after = peak()
    return {"case": case + ("-adopt" if adopt else ""), "base_bytes": base, "peak_bytes": after,
            "extra_bytes_per_param": (after - base) / n}


def warm_up(case: str) -> None:
    """One step of the case's optimizer on a tiny tensor: imports, the numba runtime and the
    kernel (loaded from the disk cache, or compiled) are in memory before the baseline."""
    import numpy as np

    p, g = np.ones(64, np.float32), np.ones(64, np.float32)
    if case in ("numpy", "torch", "jax", "torch-optim"):
        from mithril.utils.optimizers import Adam

        if case == "torch-optim":
            import torch

            from mithril.interop import torch_optimizer

            w = torch.nn.Parameter(torch.ones(64))
            w.grad = torch.ones(64)
            torch_optimizer(Adam(learning_rate=1e-3), [w]).step()
            return
        conv = {"numpy": np.asarray}
        if case == "torch":
            import torch

            conv["torch"] = torch.from_numpy
        elif case == "jax":
            import jax.numpy as jnp

            conv["jax"] = jnp.asarray
        opt = Adam(learning_rate=1e-3)
        params = {"w": conv[case](p)}
        state = opt.init(params)
        for _ in range(2):  # JAX: the first and the later updates run different kernels
            params, state = opt.update(params, {"w": conv[case](g)}, state)
    elif case == "torch-fused":
        import torch

        w = torch.nn.Parameter(torch.ones(64))
        w.grad = torch.ones(64)
        torch.optim.Adam([w], lr=1e-3, fused=True).step()
    else:
        import jax
        import jax.numpy as jnp
        import optax

        jax.block_until_ready(optax.adam(1e-3).init([jnp.ones(64)]))
        if case == "mithril-optax":
            from mithril.interop import optax_transformation
            from mithril.utils.optimizers import Adam

            jax.block_until_ready(optax_transformation(Adam(learning_rate=1e-3)).init(
                [jnp.ones(64)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=int, default=50_000_000)
    ap.add_argument("--tensors", type=int, default=10)
    ap.add_argument("--case", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--repeat", type=int, default=3,
                    help="fresh processes per case (the median is reported)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_case(args.child, args.params, args.tensors)))
        return
    print(f"Adam, first update, {args.params:,} float32 params in {args.tensors} tensors; "
          f"peak RSS beyond params + gradients (fresh process per run, {args.repeat} runs "
          f"per case, taking turns: median [min, max])")
    runs: dict[str, list[dict]] = {c: [] for c in args.case}
    for _ in range(args.repeat):  # the cases take turns: a drift of the machine hits all
        for case in args.case:
            out = subprocess.run([sys.executable, __file__, "--child", case, "--params",
                                  str(args.params), "--tensors", str(args.tensors)],
                                 capture_output=True, text=True, check=False, env=CHILD_ENV)
            if out.returncode:
                print(f"{case:14s} failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            runs[case].append(json.loads(out.stdout.strip().splitlines()[-1]))
    for case, rs in runs.items():
        if rs:
            extra = sorted(r["extra_bytes_per_param"] for r in rs)
            peak_mib = statistics.median(r["peak_bytes"] for r in rs) / 2**20
            print(f"{case:14s} {statistics.median(extra):6.2f} B/param [{extra[0]:.2f}, "
                  f"{extra[-1]:.2f}] (peak {peak_mib:8.1f} MiB)")


if __name__ == "__main__":
    main()
