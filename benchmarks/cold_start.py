"""Cold start: the first Adam step of a fresh process, Mithril per backend vs torch fused Adam
and optax.

Every figure comes from a new Python process that imports what it needs, builds float32
params and gradients (1M params in 10 tensors), then times its optimizer's first step:
``init`` + the first update (torch: the fused ``Adam``'s constructor + first ``step()``, whose
state is made there; optax: ``init`` + the first call of the jitted update, compile included),
synchronised. Mithril is measured twice per backend:

* **first-ever**: an empty kernel cache (a new ``MITHRIL_CACHE_DIR``): what the very first
  run on a machine pays, numba compiling the kernels;
* **second**: the cache that a first run filled: every later process on the machine.

The peers have no such cache (torch's fused kernel ships compiled; optax compiles its jitted
step in each process, unless the user sets up JAX's persistent cache: the ``optax (JAX
cache)`` row, a warm ``jax_compilation_cache_dir``). Each row is the median of
``--repeats`` processes, interleaved; ratios are against torch fused (NumPy, torch) and
optax (JAX), measured in the same run. ``total`` is the process's wall time from start to
the first step done (interpreter and imports included).

``--without-scipy`` adds, in the same rounds, a second-process row per NumPy / torch backend
whose process starts with ``scipy`` hidden, as on an install of Mithril's core dependencies
(NumPy, numba, safetensors) and torch. Where scipy is installed, numba imports
``scipy.linalg`` (its BLAS probe in ``numba.np.arraymath``) when it first loads any kernel,
and a NumPy process's first step pays that. JAX depends on scipy: its processes always have
it.

    python benchmarks/cold_start.py                       # every backend, 5 processes each
    python benchmarks/cold_start.py --repeats 9 --backends numpy jax
    python benchmarks/cold_start.py --repeats 5 --backends numpy torch --without-scipy
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

SHAPES = [(512, 384), (384,), (384, 512), (512,), (512, 512), (512,), (512, 384), (384,),
          (384, 128), (128,)]
LR = 1e-3


def child(impl: str) -> dict:
    """One fresh process's measurement (run with ``--child``)."""
    if os.environ.get("COLD_START_WITHOUT_SCIPY"):
        sys.modules["scipy"] = None  # type: ignore[assignment]  # ``import scipy`` fails
    import numpy as np

    rng = np.random.default_rng(0)
    p = {f"p{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(SHAPES)}
    g = {k: (rng.standard_normal(v.shape) * 1e-2).astype(np.float32) for k, v in p.items()}
    if impl.startswith("mithril"):
        backend = impl.split("-", 1)[1]
        from mithril.utils.optimizers import Adam

        if backend == "torch":
            import torch

            p = {k: torch.from_numpy(v) for k, v in p.items()}
            g = {k: torch.from_numpy(v) for k, v in g.items()}
        elif backend.startswith("jax"):
            import jax.numpy as jnp

            p = {k: jnp.asarray(v) for k, v in p.items()}
            g = {k: jnp.asarray(v) for k, v in g.items()}
        ready = time.perf_counter()
        opt = Adam(LR)
        state = opt.init(p)
        p, state = opt.update(p, g, state)
        if backend.startswith("jax"):
            next(iter(p.values())).block_until_ready()
        done = time.perf_counter()
        from mithril.utils.optimizers.engines import kernel_cache

        extra = kernel_cache.stats()
    elif impl == "torch-fused":
        import torch

        tp = [torch.from_numpy(v).requires_grad_() for v in p.values()]
        for t, v in zip(tp, g.values()):
            t.grad = torch.from_numpy(v)
        ready = time.perf_counter()
        opt = torch.optim.Adam(tp, LR, fused=True)
        opt.step()
        done = time.perf_counter()
        extra = {}
    else:  # optax
        import jax
        import optax

        jp = {k: jax.numpy.asarray(v) for k, v in p.items()}
        jg = {k: jax.numpy.asarray(v) for k, v in g.items()}
        jax.block_until_ready((jp, jg))
        ready = time.perf_counter()
        tx = optax.adam(LR)

        @jax.jit
        def step(params, grads, state):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        state = tx.init(jp)
        jp, state = step(jp, jg, state)
        jax.block_until_ready(jp)
        done = time.perf_counter()
        extra = {}
    return {"step": done - ready, "total": time.time() - float(os.environ["COLD_START_T0"]),
            **extra}


def run(impl: str, env: dict[str, str]) -> dict:
    env = {**env, "COLD_START_T0": repr(time.time())}
    out = subprocess.run([sys.executable, __file__, "--child", impl], env=env,
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"{impl} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backends", nargs="+", default=["numpy", "torch", "jax", "jax-jit"],
                    help="jax-jit: MITHRIL_JAX_ENGINE=jit (the jitted engine, JAX's cache)")
    ap.add_argument("--without-scipy", action="store_true",
                    help="also second processes of NumPy / torch without scipy (a core install)")
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return

    base = {k: v for k, v in os.environ.items()
            if k not in ("MITHRIL_CACHE_DIR", "NUMBA_CACHE_DIR", "JAX_COMPILATION_CACHE_DIR",
                         "MITHRIL_JAX_ENGINE", "COLD_START_WITHOUT_SCIPY")}
    tmp = tempfile.mkdtemp(prefix="mithril-cold-")
    rows: dict[str, list[dict]] = {}
    peers = ["torch-fused"] if {"numpy", "torch"} & set(args.backends) else []
    if any(b.startswith("jax") for b in args.backends):
        peers += ["optax", "optax-cached"]
    warm = {b: os.path.join(tmp, f"warm-{b}") for b in args.backends}
    jax_warm = os.path.join(tmp, "optax-cache")
    for b in args.backends:  # fill each backend's warm cache once
        run(f"mithril-{b}", {**base, "MITHRIL_CACHE_DIR": warm[b], **_engine(b)})
    if "optax-cached" in peers:
        run("optax", {**base, **_jax_cache(jax_warm)})
    for r in range(args.repeats):  # interleaved: drifts in machine load hit every row alike
        for b in args.backends:
            fresh = os.path.join(tmp, f"fresh-{b}-{r}")
            rows.setdefault(f"mithril {b}, first-ever", []).append(
                run(f"mithril-{b}", {**base, "MITHRIL_CACHE_DIR": fresh, **_engine(b)}))
            rows.setdefault(f"mithril {b}, second", []).append(
                run(f"mithril-{b}", {**base, "MITHRIL_CACHE_DIR": warm[b], **_engine(b)}))
            if args.without_scipy and b in ("numpy", "torch"):
                rows.setdefault(f"mithril {b}, second, no scipy", []).append(run(
                    f"mithril-{b}", {**base, "MITHRIL_CACHE_DIR": warm[b],
                                     "COLD_START_WITHOUT_SCIPY": "1"}))
        for peer in peers:
            env = {**base, **(_jax_cache(jax_warm) if peer == "optax-cached" else {})}
            name = {"torch-fused": "torch fused Adam", "optax": "optax",
                    "optax-cached": "optax (JAX cache)"}[peer]
            rows.setdefault(name, []).append(run("optax" if peer.startswith("optax") else peer, env))
        print(f"round {r + 1}/{args.repeats} done", file=sys.stderr)

    med = {k: (statistics.median(x["step"] for x in v), statistics.median(x["total"] for x in v))
           for k, v in rows.items()}
    print(f"\nfirst Adam step of a fresh process ({_nparams():,} float32 params in "
          f"{len(SHAPES)} tensors), median of {args.repeats} processes")
    print(f"{'':34s} {'step s':>8s} {'total s':>8s}  {'vs torch fused':>14s} {'vs optax':>9s}")
    torch_ref = med.get("torch fused Adam", (float("nan"),))[0]
    optax_ref = med.get("optax", (float("nan"),))[0]
    for k, (step, total) in med.items():
        hits = ""
        if k.startswith("mithril"):
            last = rows[k][-1]
            hits = f"  (kernel cache: {last.get('hits', 0)} hits, {last.get('misses', 0)} compiled)"
        print(f"{k:34s} {step:8.3f} {total:8.3f}  {step / torch_ref:14.2f} {step / optax_ref:9.2f}{hits}")


def _nparams() -> int:
    n = 0
    for s in SHAPES:
        k = 1
        for d in s:
            k *= d
        n += k
    return n


def _engine(backend: str) -> dict[str, str]:
    return {"MITHRIL_JAX_ENGINE": "jit"} if backend == "jax-jit" else {}


def _jax_cache(folder: str) -> dict[str, str]:
    return {"JAX_COMPILATION_CACHE_DIR": folder,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


if __name__ == "__main__":
    main()
