"""The JAX one-program train step's first epoch (tracing + XLA compiling, then 40 steps) and
steady step, per non-finite policy, against the jitted optax step, all in one process.

The model of ``train_epoch.py`` (MLP + cross-entropy + Adam, batch 128; ``--hidden``, by
default 49 layers of 128: the issue's 50-layer MLP). For each variant: the process CPU time of
its first epoch (XLA compiles on the calling thread: less sensitive to other processes than
the wall clock), then the median over ``--rounds`` rounds of 40 steps (variants interleaved in
each round, each on its own parameters), with ratios to the optax step measured alongside.
Every parameter of every variant is checked to have moved (the updates really happened).

    python benchmarks/jax_step_compile.py [--hidden 1024 1024] [--rounds 7] [--policies skip]
                                          [--optimizer adam|lamb|lars]

``--optimizer lamb`` / ``lars``: a two-pass optimizer (its per-tensor sums, then the update)
against ``optax.lamb`` / ``optax.lars`` at the same learning rate.

With a fresh ``MITHRIL_CACHE_DIR`` the first policy run compiles the update kernel of
XLA's FFI route (once per machine, :mod:`mithril.utils.optimizers.engines.xla_ffi`);
``MITHRIL_JAX_FFI=0`` measures the traced update instead.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_epoch as te  # noqa: E402

import mithril as ml  # noqa: E402
from mithril.backends import JaxBackend  # noqa: E402
from mithril.utils.optimizers import LAMB, LARS, SM3, Adafactor, Adam  # noqa: E402
from mithril.utils.optimizers.engines import kernel_cache, xla_ffi  # noqa: E402
from mithril.utils.training import make_train_step  # noqa: E402

POLICIES = ("unchecked", "propagate", "skip")
#: ``--optimizer``: ours and optax's
OPTIMIZERS = {"adam": (Adam, None), "lamb": (LAMB, "lamb"), "lars": (LARS, "lars"),
              "adafactor": (Adafactor, "adafactor"), "sm3": (SM3, "sm3")}


def mithril_variant(policy: str, hidden: list[int], feed: list, spec: Any,
                    optimizer: str = "adam") -> dict:
    be = JaxBackend(dtype="float32", seed=0)
    compiled = ml.compile(spec.model, be, shapes=spec.shapes)
    opt = OPTIMIZERS[optimizer][0](learning_rate=te.LR, nonfinite=policy)
    step = make_train_step(compiled, opt, loss="loss")
    params = compiled.get_parameters()
    box = {"p": params, "s": step.init(params)}

    def run(k: int) -> float:
        box["p"], box["s"], out = step(box["p"], box["s"], feed[k % len(feed)])
        return out["loss"]
    return {"run": run, "box": box, "init": {k: te.np.array(v) for k, v in params.items()}}


def optax_variant(init: dict, hidden: list[int], x: Any, y: Any,
                  optimizer: str = "adam") -> dict:
    name = OPTIMIZERS[optimizer][1]
    epoch = te.optax_epoch(te._layers(init, hidden), x, y,
                           None if name is None else getattr(te.optax, name)(te.LR))
    return {"epoch": epoch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, nargs="+", default=[128] * 49)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES),
                    help="the first one run pays any kernel compiled on its first use")
    ap.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adam")
    a = ap.parse_args()
    x, y = te.data()
    spec = te.mlp_spec(te.FEATURES, te.CLASSES, a.hidden)
    be = JaxBackend(dtype="float32", seed=0)
    feed = [{"input": be.array(u), "target": be.array(v, be.int_dtype)}
            for u, v in te.batches(x, y)]
    variants: dict[str, Any] = {}
    first: dict[str, float] = {}
    for policy in a.policies:
        v = mithril_variant(policy, a.hidden, feed, spec, a.optimizer)
        c0 = time.process_time()
        for k in range(te.STEPS):
            loss = v["run"](k)
        float(loss)
        first[policy] = time.process_time() - c0
        variants[policy] = v
    init = variants[a.policies[0]]["init"]
    new_kernels = kernel_cache.stats()["new"]
    ox = optax_variant(init, a.hidden, x, y, a.optimizer)
    c0 = time.process_time()
    ox["epoch"]()  # (its first epoch: the first step compiles, 40 steps)
    first["optax"] = time.process_time() - c0
    names = (*a.policies, "optax")
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(a.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            if name == "optax":
                ox["epoch"]()
            else:
                for k in range(te.STEPS):
                    loss = variants[name]["run"](k)
                float(loss)
            times[name].append((time.perf_counter() - t) / te.STEPS)
    for name in a.policies:  # the updates happened: every parameter moved from its start
        box = variants[name]["box"]
        assert all(not te.np.array_equal(te.np.asarray(box["p"][k]), v)
                   for k, v in init.items()), name
    ref = statistics.median(times["optax"])
    ffi = "on" if xla_ffi.ENABLED else "off (MITHRIL_JAX_FFI=0)"
    shown = [te.FEATURES, *a.hidden, te.CLASSES] if len(a.hidden) < 6 else \
        f"of {len(a.hidden) + 1} layers"
    print(f"JAX one-program step, MLP {shown} + cross-entropy + {OPTIMIZERS[a.optimizer][0].__name__}, batch {te.BATCH}, "
          f"float32; first epoch: process CPU s; steady: median of {a.rounds} rounds of "
          f"{te.STEPS} steps; the update through XLA's FFI: {ffi}; kernels first compiled "
          f"on this machine by the first variant: {new_kernels}")
    print(f"{'variant':28s} {'first s':>8s} {'vs optax':>9s} {'steady us':>10s} {'vs optax':>9s}")
    for name in names:
        med = statistics.median(times[name])
        label = "optax jitted step" if name == "optax" else f"mithril nonfinite={name}"
        print(f"{label:28s} {first[name]:8.2f} {first[name] / first['optax']:8.2f}x "
              f"{med * 1e6:10.0f} {med / ref:8.2f}x")


if __name__ == "__main__":
    main()
