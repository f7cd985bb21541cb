"""The jitted JAX engine's first step (tracing and XLA's compile) and its steady step, on
many tensors, against the same update in optax, jitted with donation.

The jitted engine (``engines/jax_engine.py``) is what the JAX backend runs on accelerators
(and on CPU with ``MITHRIL_JAX_ENGINE=jit``, which this script sets). Its program takes the
scalar table, and where the scalars differ between tensors (parameter groups, a two-pass
optimizer's per-tensor scalars) it reads a row per tensor. Cases:

* ``adam``: Adam (``optax.adam``);
* ``adamw-groups``: AdamW with no weight decay on every second tensor (a parameter group;
  ``optax.adamw`` with a ``mask``);
* ``lamb``: LAMB (``optax.lamb``), whose scalars are per tensor every step;
* ``adam-tensor-clip``: Adam with each tensor's gradient clipped to norm 1
  (``clip_tensor_norm``, Keras's ``clipnorm``; in optax a ``stateless`` transform before
  ``optax.adam``), whose per-tensor norms are summed every step.

Each variant runs in a fresh process with an empty cache folder (``MITHRIL_CACHE_DIR``;
optax's process has no persistent cache), one at a time: ``first`` is the first step's
wall time, the program's compile included; ``steady`` the median of rounds of
``--block`` steps, each step with the next of three gradient sets. Checked once per case:
our first step moves the parameters as optax's does (relative difference of the updates
below 1e-3), else a ``WARNING`` line.

``--nonfinite unchecked``: our steps without the norm and the finite probes (optax's
contract; the default ``"propagate"`` measures and probes every step).

``--one-chunk``: the layout as one chunk, as on an accelerator (on CPU each tensor of
8,192 elements or more is a chunk of its own; see ``engines/jax_chunks.py``).

    python benchmarks/jit_first_step.py [--cases adam,adamw-groups,lamb,adam-tensor-clip]
                                        [--tensors 200] [--total 10000000] [--one-chunk]
                                        [--rounds 7] [--nonfinite propagate|unchecked]
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
from typing import Any

import numpy as np

CASES = ("adam", "adamw-groups", "lamb", "adam-tensor-clip")
LR, WD, GRAD_SETS, CLIP = 1e-3, 1e-2, 3, 1.0


def _no_decay(name: str) -> bool:
    return int(name[1:]) % 2 == 1


def _data(tensors: int, total: int) -> tuple[dict, list[dict]]:
    per = total // tensors
    shapes = [(per // 50, 50) if i % 2 else (per,) for i in range(tensors)]
    rng = np.random.default_rng(0)
    p = {f"p{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)}
    gs = [{k: (rng.standard_normal(v.shape) * 1e-2).astype(np.float32) for k, v in p.items()}
          for _ in range(GRAD_SETS)]
    return p, gs


def _ours(case: str, nonfinite: str) -> Any:
    from mithril.utils import optimizers as O

    if case == "adam":
        return O.Adam(LR, nonfinite=nonfinite)
    if case == "adamw-groups":
        return O.AdamW(LR, weight_decay=WD, nonfinite=nonfinite,
                       param_groups=[{"params": _no_decay, "weight_decay": 0.0}])
    if case == "adam-tensor-clip":
        return O.Adam(LR, clip_tensor_norm=CLIP, nonfinite=nonfinite)
    return O.LAMB(LR, weight_decay=WD, nonfinite=nonfinite)


def _optax(case: str) -> Any:
    import jax
    import jax.numpy as jnp
    import optax

    def clip_each(u: Any, _: Any) -> Any:  # Keras clipnorm: g·c / max(‖g‖, c)
        return jax.tree.map(lambda g: g * (CLIP / jnp.maximum(jnp.linalg.norm(g), CLIP)), u)

    if case == "adam":
        tx = optax.adam(LR)
    elif case == "adamw-groups":
        tx = optax.adamw(LR, weight_decay=WD, mask=lambda p: {k: not _no_decay(k) for k in p})
    elif case == "adam-tensor-clip":
        tx = optax.chain(optax.stateless(clip_each), optax.adam(LR))
    else:
        tx = optax.lamb(LR, weight_decay=WD)

    def step(p: Any, s: Any, g: Any) -> Any:
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    return tx, jax.jit(step, donate_argnums=(0, 1))


def child(lib: str, case: str, tensors: int, total: int, rounds: int, block: int,
          nonfinite: str) -> dict:
    """One variant in this (fresh) process: first step and steady steps."""
    import jax
    import jax.numpy as jnp

    p_np, gs_np = _data(tensors, total)
    p = {k: jnp.asarray(v) for k, v in p_np.items()}
    gs = [{k: jnp.asarray(v) for k, v in g.items()} for g in gs_np]
    first_name = next(iter(p_np))
    if lib == "mithril":
        opt = _ours(case, nonfinite)
        state = opt.init(p)
        if type(state.engine).__name__ != "JaxEngine":
            raise SystemExit(f"expected the jitted engine, got {type(state.engine).__name__}")

        def step(p: Any, i: int) -> Any:
            nonlocal state
            p, state = opt.update(p, gs[i % GRAD_SETS], state)
            return p
    else:
        tx, jitted = _optax(case)
        ostate = tx.init(p)

        def step(p: Any, i: int) -> Any:
            nonlocal ostate
            p, ostate = jitted(p, ostate, gs[i % GRAD_SETS])
            return p
    t0 = time.perf_counter()
    p = step(p, 0)
    jax.block_until_ready(p)
    first = time.perf_counter() - t0
    delta = (np.asarray(p[first_name], np.float64) - p_np[first_name]).tolist()
    i, times = 1, []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(block):
            p = step(p, i)
            i += 1
        jax.block_until_ready(p)
        times.append((time.perf_counter() - t0) / block)
    return {"first": first, "steady": statistics.median(times[1:] or times), "delta": delta}


def run_child(lib: str, case: str, a: argparse.Namespace) -> dict:
    env = dict(os.environ, MITHRIL_JAX_ENGINE="jit", PYTHONUNBUFFERED="1")
    with tempfile.TemporaryDirectory() as cache:
        env["MITHRIL_CACHE_DIR"] = cache
        cmd = [sys.executable, __file__, "--child", json.dumps(
            [lib, case, a.tensors, a.total, a.rounds, a.block, a.one_chunk,
             a.nonfinite])]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{lib} {case} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--tensors", type=int, default=200)
    ap.add_argument("--total", type=int, default=10_000_000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--block", type=int, default=5)
    ap.add_argument("--one-chunk", action="store_true")
    ap.add_argument("--nonfinite", default="propagate", choices=("propagate", "unchecked"),
                    help="our policy (optax checks nothing: \"unchecked\" is its contract)")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        lib, case, tensors, total, rounds, block, one_chunk, nonfinite = json.loads(a.child)
        if one_chunk:
            from mithril.utils.optimizers.engines import jax_chunks

            jax_chunks.CHUNK_MIN = 1 << 62
        print(json.dumps(child(lib, case, tensors, total, rounds, block, nonfinite)))
        return
    cases = a.cases.split(",")
    bad = [c for c in cases if c not in CASES]
    if bad or a.tensors < 1 or a.total < 50 * a.tensors or a.rounds < 1 or a.block < 1:
        ap.error(f"cases are {CASES}; --total must be at least 50 per tensor; "
                 f"--tensors, --rounds and --block positive")
    import jax

    print(f"jitted JAX engine on {jax.default_backend()}, {a.tensors} tensors, {a.total:,} "
          f"float32 params{' (one chunk)' if a.one_chunk else ''}, nonfinite={a.nonfinite!r}; first step s (compile "
          f"included), steady ms a step (median of {a.rounds} rounds of {a.block})")
    print(f"{'case':14s} {'first ours':>10s} {'optax':>7s} {'ratio':>6s}   "
          f"{'steady ours':>11s} {'optax':>7s} {'ratio':>6s}")
    for case in cases:
        ours, ref = run_child("mithril", case, a), run_child("optax", case, a)
        d_ours, d_ref = np.asarray(ours["delta"]), np.asarray(ref["delta"])
        rel = float(np.linalg.norm(d_ours - d_ref) / max(np.linalg.norm(d_ref), 1e-30))
        if not rel <= 1e-3:
            print(f"WARNING {case}: our first update differs from optax's by {rel:.2e}")
        print(f"{case:14s} {ours['first']:10.2f} {ref['first']:7.2f} "
              f"{ours['first'] / ref['first']:5.2f}x   {ours['steady'] * 1e3:11.2f} "
              f"{ref['steady'] * 1e3:7.2f} {ours['steady'] / ref['steady']:5.2f}x")


if __name__ == "__main__":
    main()
