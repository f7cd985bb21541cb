"""One optimizer step: Mithril vs torch fused, optax (jit + donation) and a NumPy triad.

Mithril is timed through the public ``params, state = opt.update(params, grads, state)``
call with default options, exactly as a training loop makes it. Every implementation runs in
a process of its own (``--shared``: all of a case in one), the processes taking turns with a
pause between them (a library's idle threads spin for a while after its work: torch's
OpenMP threads would hold a core the next implementation needs), in rotating blocks of
consecutive steps after an equal warm-up time, and medians are reported with ratios against torch's fused
step and optax, and the effective bandwidth at 28 bytes/param (fp32 Adam: read p, g, m, v;
write p, m, v) or 20 bytes/param (SGD with momentum: read p, g, buf; write p, buf).

Each step gets the next of :data:`GRAD_SETS` pre-made gradient sets (the same for every
implementation): one reused gradient would stay in cache and flatter the figure. Handing a
set over (torch: pointing each ``.grad`` at it) is not timed. Each implementation's first
step is checked once against a NumPy reference of the same step.

``--chain K``: each timed sample is K consecutive steps (each with the next gradient set,
handed over inside the timing) and one wait for the last, as a loop that does not read
anything back between steps runs: what JAX's and CUDA's queues let the host do ahead of
the device (the figure is per step).

    python benchmarks/optimizer_step.py                 # both sizes, all backends
    python benchmarks/optimizer_step.py --sizes b --backends jax --optimizers adam
    python benchmarks/optimizer_step.py --device cuda --backends torch,jax --sizes 10Mx10,100Mx10

``--device cuda``: torch's tensors (torch fused, Mithril's torch backend) on the GPU, each
step timed up to ``torch.cuda.synchronize()``; JAX on its default device (the GPU where
jax[cuda] is installed; set ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` so that its processes
and torch's share the card).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np

#: (parameters, tensors): (a) and (b) are the catalog's; "10Mx1", "10Mx10" and "1Mx1" the
#: few-large-tensors cases (torch's fused kernel is at its best there); "1Mx10" the JAX
#: jit engine's row (``MITHRIL_JAX_ENGINE=jit``); "100kx10" a small model, whose steps cost
#: the host about as much as the device (``--chain``)
SIZES = {"a": (10_000_000, 200), "b": (1_000_000, 2_000), "10Mx1": (10_000_000, 1),
         "10Mx10": (10_000_000, 10), "1Mx1": (1_000_000, 1), "1Mx10": (1_000_000, 10),
         "100Mx10": (100_000_000, 10), "100kx10": (100_000, 10)}
#: where torch's tensors live (``--device``; an environment variable, so that the processes
#: this one starts see it too)
DEVICE = os.environ.get("MITHRIL_BENCH_DEVICE", "cpu")
BYTES = {"adam": 28, "sgd": 20}
GRAD_SETS = 3
LR = 1e-3


def shapes_for(total: int, n: int) -> list[tuple[int, ...]]:
    per = total // n
    return [(per // 50, 50) if i % 2 else (per,) for i in range(n)]


def make_numpy(shapes, seed=0):
    """Params and :data:`GRAD_SETS` gradient sets (float32)."""
    rng = np.random.default_rng(seed)
    p = {f"p{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)}
    gs = [{f"p{i}": (rng.standard_normal(s) * 1e-2).astype(np.float32) for i, s in enumerate(shapes)}
          for _ in range(GRAD_SETS)]
    return p, gs


def reference_first_step(opt_name: str, p: np.ndarray, g: np.ndarray) -> np.ndarray:
    """One step from a fresh state in float64 (Adam: m̂/(√v̂+ε) = g/(|g|+ε); SGD with
    momentum: the first buffer is g)."""
    p, g = p.astype(np.float64), g.astype(np.float64)
    return p - LR * (g / (np.abs(g) + 1e-8) if opt_name == "adam" else g)


class Impl:
    """One implementation: ``give(i)`` hands gradient set ``i`` over (untimed), ``step()``
    is timed (``step(wait=False)``: no wait for the device at its end, see ``--chain``);
    ``first`` holds (first, last) param after the first step, for the check."""

    def __init__(self, give: Callable[[int], None], step: Callable[[], None], first) -> None:
        self.give, self.step, self.first = give, step, first


def mithril_impl(opt_name: str, params, gsets, policy: str = "propagate") -> Impl:
    """``policy``: ``nonfinite`` (``"unchecked"``: torch.optim's contract, nothing measured
    or read back: what the accelerator engines run fastest)."""
    from mithril.utils.optimizers import SGD, Adam

    opt = Adam(LR, nonfinite=policy) if opt_name == "adam" else \
        SGD(LR, momentum=0.9, nonfinite=policy)
    box = {"p": params, "s": opt.init(params), "g": gsets[0]}

    def give(i: int) -> None:
        box["g"] = gsets[i]

    def step(wait: bool = True):
        box["p"], box["s"] = opt.update(box["p"], box["g"], box["s"])
        if wait:
            sync(box["p"])

    step()
    first = tuple(np.array(to_host(box["p"][k])) for k in (next(iter(params)), list(params)[-1]))
    if opt_name == "adam" and DEVICE != "cpu":  # the engine the device runs (see the notes)
        print(f"  ({type(box['s'].engine).__name__} on {DEVICE})", flush=True)
    return Impl(give, step, first)


def to_host(x) -> np.ndarray:
    if hasattr(x, "detach"):
        return to_host_tensor(x)
    return x.numpy() if hasattr(x, "numpy") and not hasattr(x, "block_until_ready") else np.asarray(x)


def sync(params) -> None:
    x = next(iter(params.values()))
    if hasattr(x, "block_until_ready"):
        x.block_until_ready()
    elif DEVICE != "cpu" and type(x).__module__.startswith("torch"):
        import torch

        torch.cuda.synchronize()


def to_host_tensor(t) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


def torch_fused(opt_name: str, shapes, seed=0, norm: bool = False) -> Impl:
    """torch.optim's fused step; ``norm``: after ``torch.nn.utils.get_total_norm`` of the
    gradients (what a loop that logs or clips the norm adds; Mithril reports it always)."""
    import torch

    p, gs = make_numpy(shapes, seed)
    tp = [torch.from_numpy(v).to(DEVICE) for v in p.values()]
    tg = [[torch.from_numpy(v).to(DEVICE) for v in g.values()] for g in gs]
    opt = torch.optim.Adam(tp, LR, fused=True) if opt_name == "adam" else \
        torch.optim.SGD(tp, LR, momentum=0.9, fused=True)

    def give(i: int) -> None:
        for t, g in zip(tp, tg[i]):
            t.grad = g

    def step(wait: bool = True) -> None:
        if norm:
            torch.nn.utils.get_total_norm([t.grad for t in tp])
        opt.step()
        if DEVICE != "cpu" and wait:
            torch.cuda.synchronize()

    give(0)
    step()
    return Impl(give, step, (to_host_tensor(tp[0]), to_host_tensor(tp[-1])))


def optax_impl(opt_name: str, shapes, seed=0) -> tuple[Impl, float]:
    import jax
    import jax.numpy as jnp
    import optax

    p, gs = make_numpy(shapes, seed)
    p = {k: jnp.asarray(v) for k, v in p.items()}
    gs = [{k: jnp.asarray(v) for k, v in g.items()} for g in gs]
    tx = optax.adam(LR) if opt_name == "adam" else optax.sgd(LR, momentum=0.9)
    box = {"p": p, "s": tx.init(p), "g": gs[0]}

    def _step(params, grads, state):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step_fn = jax.jit(_step, donate_argnums=(0, 2))

    def give(i: int) -> None:
        box["g"] = gs[i]

    def step(wait: bool = True):
        box["p"], box["s"] = step_fn(box["p"], box["g"], box["s"])
        if wait:
            jax.block_until_ready(box["p"])

    t0 = time.perf_counter()
    step()
    compile_s = time.perf_counter() - t0
    names = list(p)
    return Impl(give, step, (np.asarray(box["p"][names[0]]), np.asarray(box["p"][names[-1]]))), compile_s


def numpy_triad(total: int) -> Impl:
    a = np.ones(total, np.float32)
    bs = [np.ones(total, np.float32) for _ in range(GRAD_SETS)]
    box = {"b": bs[0]}

    def give(i: int) -> None:
        box["b"] = bs[i]

    def step(wait: bool = True):  # a += 0.5 * b in place: 12 bytes/element of traffic
        np.multiply(box["b"], np.float32(0.5), out=box["b"])
        np.add(a, box["b"], out=a)

    return Impl(give, step, None)


def time_blocks(fns: dict[str, Impl], rounds: int, block: int, warm: float,
                chain: int = 1) -> dict[str, float]:
    """Median step time of each implementation.

    Each round runs every implementation untimed for ``warm`` seconds (at least one step)
    and then for ``block`` timed consecutive steps, as a training loop calls its
    optimizer; the order rotates between rounds so that no implementation always follows
    the same other one. The warm-up is a time, the same for all, not a step count: on the
    shared machines we measure on, memory-bound code runs up to 2x slower for the first few
    milliseconds after any pause or after another library's block (a NumPy in-place add
    over 24 MB: 0.68 ms on the first pass after a 40 ms sleep, 0.40 ms from the fifth; a
    compute-bound loop is not affected), so one untimed step warmed a 5 ms torch step
    but not a 1 ms one."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    turn = 0
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            times[k] += run_block(fns[k], warm, block, turn, chain)
            turn += 1000
    return {k: statistics.median(v) for k, v in times.items()}


def build(name: str, size: str, opt_name: str) -> tuple[Impl, str]:
    """Implementation ``name`` of one case, made in this process, and a note on it."""
    total, n = SIZES[size]
    shapes = shapes_for(total, n)
    if name == "torch fused":
        return torch_fused(opt_name, shapes), ""
    if name == "torch fused + norm":
        return torch_fused(opt_name, shapes, norm=True), ""
    if name == "numpy triad":
        return numpy_triad(total), ""
    if name == "optax jit+donate":
        impl, c = optax_impl(opt_name, shapes)
        return impl, f"first call {c:.1f}s"
    p, gs = make_numpy(shapes)
    policy = "unchecked" if name.endswith(" unchecked") else "propagate"
    if name == "mithril numpy":
        return mithril_impl(opt_name, p, gs), ""
    if name.startswith("mithril torch"):
        import torch

        return mithril_impl(opt_name, {k: torch.from_numpy(v).to(DEVICE) for k, v in p.items()},
                            [{k: torch.from_numpy(v).to(DEVICE) for k, v in g.items()}
                             for g in gs], policy), ""
    import jax.numpy as jnp

    jp = {k: jnp.asarray(v) for k, v in p.items()}
    jgs = [{k: jnp.asarray(v) for k, v in g.items()} for g in gs]
    t0 = time.perf_counter()
    impl = mithril_impl(opt_name, jp, jgs, policy)
    return impl, f"first call {time.perf_counter() - t0:.1f}s"


def names_for(backends: list[str], no_optax: bool, unchecked: bool = False) -> list[str]:
    names = ["torch fused"] + (["torch fused + norm"] if DEVICE != "cpu" else [])
    if "numpy" in backends:
        names += ["mithril numpy", "numpy triad"]
    # on a GPU (or with --unchecked) also nonfinite="unchecked": no norm, no probe, no read
    # back (the accelerator engines' fast path)
    gpu = [" unchecked"] if DEVICE != "cpu" or unchecked else []
    if "torch" in backends:
        names += ["mithril torch" + x for x in ["", *gpu]]
    if "jax" in backends:
        names += ["mithril jax" + x for x in ["", *gpu]] + ([] if no_optax else ["optax jit+donate"])
    return names


def run_block(impl: Impl, warm: float, block: int, turn: int, chain: int = 1) -> list[float]:
    """``warm`` seconds of untimed steps (at least one), then ``block`` timed ones (each,
    with ``chain`` > 1, the mean of a chain of steps with one wait at its end)."""
    t_end = time.perf_counter() + warm
    while True:
        turn += 1
        impl.give(turn % GRAD_SETS)
        impl.step()
        if time.perf_counter() >= t_end:
            break
    out = []
    for _ in range(block):
        turn += 1
        impl.give(turn % GRAD_SETS)
        t0 = time.perf_counter()
        for _ in range(1, chain):
            impl.step(wait=False)
            turn += 1
            impl.give(turn % GRAD_SETS)
        impl.step()
        out.append((time.perf_counter() - t0) / chain)
    return out


def _serve(name: str, size: str, opt_name: str, conn) -> None:
    """One implementation in a process of its own: its first step, then a block per message."""
    impl, note = build(name, size, opt_name)
    conn.send((impl.first, note))
    while (msg := conn.recv()) is not None:
        conn.send(run_block(impl, *msg))


#: seconds between two implementations' blocks: a library's idle threads spin-wait after
#: its work (torch's OpenMP, OpenBLAS: up to ~0.1 s) and would take a core from the next one
GAP = 0.3


def time_isolated(names: list[str], size: str, opt_name: str, args: argparse.Namespace
                  ) -> tuple[dict[str, float], dict[str, tuple], dict[str, str]]:
    """As :func:`time_blocks`, each implementation in a process of its own (started one at a
    time), the processes taking turns: no library's thread pool runs, or spins, while
    another's step is timed, as in a program that uses one of them."""
    ctx = mp.get_context("spawn")
    conns, procs, firsts, notes = {}, [], {}, {}
    for k in names:
        conns[k], child = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(k, size, opt_name, child), daemon=True)
        proc.start()
        procs.append(proc)
        firsts[k], notes[k] = conns[k].recv()
    times: dict[str, list[float]] = {k: [] for k in names}
    turn = 0
    for r in range(args.rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            time.sleep(GAP)
            conns[k].send((args.warm, args.block, turn, args.chain))
            times[k] += conns[k].recv()
            turn += 1000
    for k in names:
        conns[k].send(None)
    for proc in procs:
        proc.join()
    return {k: statistics.median(v) for k, v in times.items()}, firsts, notes


def run_case(size: str, opt_name: str, backends: list[str], args: argparse.Namespace) -> None:
    """Time every implementation of one case (size, optimizer) and print its rows."""
    total, n = SIZES[size]
    names = names_for(backends, args.no_optax, args.unchecked)
    if args.shared:
        fns, notes = {}, {}
        for k in names:
            fns[k], notes[k] = build(k, size, opt_name)
        firsts = {k: f.first for k, f in fns.items()}
    else:
        med, firsts, notes = time_isolated(names, size, opt_name, args)
    p, gs = make_numpy(shapes_for(total, n))
    pn = list(p)
    want = [reference_first_step(opt_name, p[x], gs[0][x]) for x in (pn[0], pn[-1])]
    for k, first in firsts.items():  # the update really happened, and is the right one
        if first is not None:
            for got, ref in zip(first, want):
                err = np.max(np.abs(got - ref)) / LR
                assert err < 1e-3, f"{k}: first step off the reference by {err:.2e} lr"
    if args.shared:
        med = time_blocks(fns, args.rounds, args.block, args.warm, args.chain)
    ref, ox = med["torch fused"], med.get("optax jit+donate")
    for k, v in med.items():
        gbs = total * BYTES[opt_name] / v / 1e9 if k != "numpy triad" else total * 12 / v / 1e9
        print(f"{size} {opt_name:<5}{k:<25}{v * 1e3:>10.2f}{v / ref:>15.2f}x"
              f"{(f'{v / ox:.2f}x' if ox else '-'):>10}{gbs:>8.1f}  {notes.get(k, '')}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="a,b")
    ap.add_argument("--backends", default="numpy,torch,jax")
    ap.add_argument("--optimizers", default="adam,sgd")
    ap.add_argument("--rounds", type=int, default=6, help="rounds over all implementations")
    ap.add_argument("--block", type=int, default=5, help="timed consecutive steps per round")
    ap.add_argument("--warm", type=float, default=0.05, help="untimed steps before each block, in seconds")
    ap.add_argument("--no-optax", action="store_true", help="skip optax (its first compile on (b) takes minutes)")
    ap.add_argument("--in-process", action="store_true",
                    help="run every case in this process (by default each case gets a fresh one: the "
                         "arrays, caches and compiled programs of earlier cases slow later ones)")
    ap.add_argument("--shared", action="store_true",
                    help="every implementation of a case in one process (their thread pools then "
                         "contend: torch's OpenMP threads spin after its step, on a core the next "
                         "one needs), instead of one process each")
    ap.add_argument("--device", default=None,
                    help="torch's device (default cpu; e.g. cuda): see the module docs")
    ap.add_argument("--unchecked", action="store_true",
                    help="also time Mithril with nonfinite='unchecked' (always on a GPU)")
    ap.add_argument("--chain", type=int, default=1,
                    help="steps per timed sample, with one wait at the end (see the module docs)")
    ap.add_argument("--no-header", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.chain < 1:
        ap.error("--chain must be positive")
    if args.device:
        global DEVICE
        DEVICE = os.environ["MITHRIL_BENCH_DEVICE"] = args.device
    header = f"[{DEVICE}] " + f"{'case':<28}{'median ms':>10}{'vs torch fused':>16}{'vs optax':>10}{'GB/s':>8}"
    cases = [(s, o) for s in args.sizes.split(",") for o in args.optimizers.split(",")]
    if not args.in_process:
        print(header, flush=True)
        for size, opt_name in cases:
            cmd = [sys.executable, __file__, "--in-process", "--sizes", size, "--optimizers", opt_name,
                   "--backends", args.backends, "--rounds", str(args.rounds), "--block", str(args.block),
                   "--warm", str(args.warm), "--chain", str(args.chain)] + (
                       ["--shared"] if args.shared else []) + (
                       ["--unchecked"] if args.unchecked else [])
            subprocess.run(cmd + (["--no-optax"] if args.no_optax else []) + ["--no-header"], check=True)
        return
    if not args.no_header:
        print(header)
    for size, opt_name in cases:
        run_case(size, opt_name, args.backends.split(","), args)


if __name__ == "__main__":
    main()
