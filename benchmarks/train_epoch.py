"""One training epoch - MLP + cross-entropy + Adam, 40 steps of batch 128 on digits-sized
data (64 features, 10 classes) - per Mithril backend, against two references measured in
the same run:

* **torch**: a plain torch loop (``nn.Linear`` / ``relu``, ``F.cross_entropy``,
  ``loss.backward()``, ``torch.optim.Adam(fused=True)``);
* **optax**: one jitted JAX step (``jax.value_and_grad`` + ``optax.adam`` +
  ``optax.apply_updates``, params and state donated).

Mithril variants: ``step`` is :func:`mithril.utils.training.make_train_step` (on JAX the
one-program step with its ``OptaxState``), ``separate`` is ``compiled.evaluate(...,
output_gradients=...)`` then ``optimizer.update``. Every variant starts from the same
parameters and data (pre-sliced native batches); an epoch ends when its last loss is on
the host. Each variant runs in a process of its own (``--shared``: all in this one), so no
framework's idle thread pool (OpenMP, XLA's, OpenBLAS's: they spin-wait after their work)
takes the cores from another's; the processes take turns, never two at once. Rounds visit
the variants in a rotating order; medians over rounds, and each median's ratio to the
faster reference (and the same ratio of the fastest rounds, and the
median of the per-round ratios to the optax step, steadier on a loaded machine).
``--clock cpu`` times with the variant's process's CPU time (all its threads) instead of the
wall clock: less sensitive to other processes on a shared machine.

    python benchmarks/train_epoch.py [--rounds 15] [--hidden 128 128] [--backend numpy torch jax]
                                     [--clock wall|cpu] [--no-torch] [--shared]
                                     [--device cuda] [--batch 128]
                                     [--schedule none|lr|momentum]
                                     [--optimizer adam|sgd|lookahead]

``--schedule lr`` changes the learning rate at every step (a cosine over the epoch),
``--schedule momentum`` also β₁ (a momentum cycle, 0.95 to 0.85), in every variant: torch
through ``param_groups[0]``, optax as ``optax.inject_hyperparams(optax.adam)`` with the
values set in its state, Mithril through ``opt.set_learning_rate`` / ``opt.beta1`` (the
one-program JAX step then takes them as the program's arguments: it compiles once).

``--optimizer sgd``: SGD with momentum 0.9 everywhere (torch's fused SGD, ``optax.sgd``;
``--schedule momentum`` then cycles the momentum); ``--optimizer lookahead``: Lookahead
(``sync_period`` 5, ``slow_step_size`` 0.5) around Adam, against ``optax.lookahead`` (torch
has none: no torch reference; the schedule drives the inner Adam's).

``--device cuda``: the torch loop and Mithril's torch backend on the GPU (JAX on its default
device: the GPU where jax[cuda] is installed); an epoch still ends with its last loss on the
host, so it is timed up to the device's last step.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
from mithril.cli.networks import mlp_spec
from mithril.utils.optimizers import SGD, Adam, Lookahead
from mithril.utils.training import make_train_step

FEATURES, CLASSES, STEPS, LR = 64, 10, 40, 1e-3
#: ``--device`` and ``--batch``, as environment variables: the variants' processes see them
DEVICE = os.environ.get("MITHRIL_BENCH_DEVICE", "cpu")
BATCH = int(os.environ.get("MITHRIL_BENCH_BATCH", "128"))
BACKENDS = {"numpy": NumpyBackend, "torch": TorchBackend, "jax": JaxBackend}
#: ``--schedule``: which hyperparameters change at every step
SCHEDULE = os.environ.get("MITHRIL_BENCH_SCHEDULE", "none")
#: ``--optimizer``: adam, sgd (momentum 0.9) or lookahead (around Adam)
OPTIMIZER = os.environ.get("MITHRIL_BENCH_OPTIMIZER", "adam")
MOMENTUM, SYNC, ALPHA = 0.9, 5, 0.5


def ours() -> Any:
    """The Mithril optimizer of ``--optimizer``."""
    if OPTIMIZER == "sgd":
        return SGD(learning_rate=LR, momentum=MOMENTUM)
    adam = Adam(learning_rate=LR)
    return Lookahead(adam, sync_period=SYNC, slow_step_size=ALPHA) \
        if OPTIMIZER == "lookahead" else adam


def set_scheduled(opt: Any, h: tuple[float, float]) -> None:
    """Set step's (learning rate, β₁ or momentum) on a Mithril optimizer."""
    opt.set_learning_rate(h[0])
    if OPTIMIZER == "sgd":
        opt.momentum = h[1]
    else:
        (opt.inner if OPTIMIZER == "lookahead" else opt).beta1 = h[1]


def scheduled(k: int) -> tuple[float, float] | None:
    """(learning rate, β₁) at step ``k`` of the epoch, or None without a schedule."""
    if SCHEDULE == "none":
        return None
    lr = LR * (0.55 + 0.45 * np.cos(np.pi * k / STEPS))
    return float(lr), (0.95 - 0.1 * k / STEPS) if SCHEDULE == "momentum" else 0.9


def data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((STEPS * BATCH, FEATURES)).astype(np.float32)
    y = rng.integers(0, CLASSES, STEPS * BATCH)
    return x, y


def batches(x: np.ndarray, y: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH]) for i in range(STEPS)]


def mithril_epoch(backend: str, hidden: list[int], fused: bool,
                  x: np.ndarray, y: np.ndarray) -> tuple[Callable[[], float], dict]:
    spec = mlp_spec(FEATURES, CLASSES, hidden)
    be = (TorchBackend(dtype="float32", seed=0, device=DEVICE) if backend == "torch" else
          BACKENDS[backend](dtype="float32", seed=0))
    compiled = ml.compile(spec.model, be, shapes=spec.shapes)
    params = compiled.get_parameters()
    init = {k: np.array(be.to_numpy(v)) for k, v in params.items()}
    opt = ours()
    feed = [{"input": be.array(a), "target": be.array(b, be.int_dtype)} for a, b in batches(x, y)]
    box: dict[str, Any] = {"params": params}
    if fused:
        step = make_train_step(compiled, opt, loss="loss")
        box["state"] = step.init(params)

        def epoch() -> float:
            p, s = box["params"], box["state"]
            for k, d in enumerate(feed):
                if (h := scheduled(k)) is not None:
                    set_scheduled(opt, h)
                p, s, out = step(p, s, d)
            box["params"], box["state"] = p, s
            return float(be.to_numpy(out["loss"]))
    else:
        box["state"] = opt.init(params)
        cots = {"loss": 1.0}

        def epoch() -> float:
            p, s = box["params"], box["state"]
            for k, d in enumerate(feed):
                if (h := scheduled(k)) is not None:
                    set_scheduled(opt, h)
                out, g = compiled.evaluate(p, d, output_gradients=cots)
                p, s = opt.update(p, g, s)
            box["params"], box["state"] = p, s
            return float(be.to_numpy(out["loss"]))
    return epoch, init


def _layers(init: dict, hidden: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(weight (in, out), bias) of each layer from a Mithril parameter dict, in order."""
    ws = sorted((k for k, v in init.items() if v.ndim == 2), key=_order)
    bs = sorted((k for k, v in init.items() if v.ndim == 1), key=_order)
    assert len(ws) == len(bs) == len(hidden) + 1, list(init)
    out = []
    for w, b in zip(ws, bs, strict=True):
        W = init[w]
        if W.shape[0] != (out[-1][0].shape[1] if out else FEATURES):
            W = W.T
        out.append((W, init[b]))
    return out


def _order(name: str) -> tuple:
    digits = "".join(c if c.isdigit() else " " for c in name).split()
    return tuple(int(d) for d in digits), name


def torch_epoch(layers: list, x: np.ndarray, y: np.ndarray) -> Callable[[], float]:
    ps = []
    for W, b in layers:
        ps += [torch.tensor(W.copy(), device=DEVICE, requires_grad=True),
               torch.tensor(b.copy(), device=DEVICE, requires_grad=True)]
    opt = torch.optim.SGD(ps, lr=LR, momentum=MOMENTUM, fused=True) if OPTIMIZER == "sgd" \
        else torch.optim.Adam(ps, lr=LR, fused=True)
    beta = "momentum" if OPTIMIZER == "sgd" else "betas"
    feed = [(torch.from_numpy(a.copy()).to(DEVICE), torch.from_numpy(b.copy()).to(DEVICE))
            for a, b in batches(x, y)]

    def epoch() -> float:
        for k, (a, b) in enumerate(feed):
            if (hp := scheduled(k)) is not None:
                opt.param_groups[0]["lr"] = hp[0]
                opt.param_groups[0][beta] = hp[1] if OPTIMIZER == "sgd" else (hp[1], 0.999)
            h = a
            for i in range(0, len(ps), 2):
                h = h @ ps[i] + ps[i + 1]
                if i + 2 < len(ps):
                    h = torch.relu(h)
            loss = F.cross_entropy(h, b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return float(loss.detach())
    return epoch


def optax_epoch(layers: list, x: np.ndarray, y: np.ndarray,
                tx: Any = None) -> Callable[[], float]:
    """The optax reference's epoch (``tx``: another transformation than ``--optimizer``'s,
    without a schedule)."""
    params: Any = [(jnp.asarray(W), jnp.asarray(b)) for W, b in layers]
    base, beta = (optax.sgd, "momentum") if OPTIMIZER == "sgd" else (optax.adam, "b1")
    start = {beta: MOMENTUM if OPTIMIZER == "sgd" else 0.9}
    if tx is None:
        tx = optax.inject_hyperparams(base)(learning_rate=LR, **start) \
            if SCHEDULE != "none" else base(LR, **start)
    if OPTIMIZER == "lookahead":
        tx = optax.lookahead(tx, sync_period=SYNC, slow_step_size=ALPHA)
        params = optax.LookaheadParams(params, jax.tree.map(jnp.copy, params))  # (donated:
        # init_synced's fast and slow are the same buffers)
    feed = [(jnp.asarray(a), jnp.asarray(b)) for a, b in batches(x, y)]

    def loss_fn(p: list, a: Any, b: Any) -> Any:
        h = a
        for i, (W, c) in enumerate(p):
            h = h @ W + c
            if i + 1 < len(p):
                h = jax.nn.relu(h)
        return optax.softmax_cross_entropy_with_integer_labels(h, b).mean()

    @jax.jit
    def _step(p: list, s: Any, a: Any, b: Any) -> tuple:  # (Lookahead's: of the fast weights)
        loss, g = jax.value_and_grad(loss_fn)(p.fast if OPTIMIZER == "lookahead" else p, a, b)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    step = jax.jit(_step, donate_argnums=(0, 1))
    box = {"p": params, "s": tx.init(params)}

    def epoch() -> float:
        p, s = box["p"], box["s"]
        for k, (a, b) in enumerate(feed):
            if (h := scheduled(k)) is not None:  # (Python floats: no array made per step)
                hp = (s.fast_state if OPTIMIZER == "lookahead" else s).hyperparams
                hp["learning_rate"], hp[beta] = h
            p, s, loss = step(p, s, a, b)
        box["p"], box["s"] = p, s
        return float(loss)
    return epoch


def build(name: str, hidden: list[int]) -> Callable[[], float]:
    """The epoch function of variant ``name`` (every variant from the same data and the
    same initial parameters: those of a Mithril NumPy model of the same seed)."""
    x, y = data()
    if name.startswith("mithril "):
        _, backend, kind = name.split()
        return mithril_epoch(backend, hidden, kind == "step", x, y)[0]
    init = mithril_epoch("numpy", hidden, False, x, y)[1]
    layers = _layers(init, hidden)
    return torch_epoch(layers, x, y) if name == TORCH_REF else optax_epoch(layers, x, y)


#: seconds between two variants' turns: a library's idle threads spin-wait after its work
#: (OpenBLAS's up to 2^28 cycles, ~0.1 s), which would take a core from the next variant
GAP = 0.3
TORCH_REF, OPTAX_REF = "torch loop (fused step)", "jax+optax jitted step"


def _worker(name: str, hidden: list[int], clock: str, conn: Any) -> None:
    """A variant in a process of its own: runs an epoch per message, replies with its time."""
    fn = build(name, hidden)
    tick = time.perf_counter if clock == "wall" else time.process_time
    t0 = time.perf_counter()
    fn()
    conn.send(time.perf_counter() - t0)
    while conn.recv():
        t0 = tick()
        fn()
        conn.send(tick() - t0)


class _Remote:
    def __init__(self, name: str, hidden: list[int], clock: str) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(name, hidden, clock, child), daemon=True)
        self.proc.start()

    def first(self) -> float:
        return self.conn.recv()

    def __call__(self) -> float:
        time.sleep(GAP)  # the previous variant's threads stop spinning first
        self.conn.send(True)
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(False)
        self.proc.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--hidden", type=int, nargs="+", default=[128, 128])
    ap.add_argument("--backend", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall clock (default) or this process's CPU time")
    ap.add_argument("--no-torch", action="store_true", help="leave out the torch reference")
    ap.add_argument("--device", default=None, help="torch's device (default cpu; e.g. cuda)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 128)")
    ap.add_argument("--schedule", choices=("none", "lr", "momentum"), default="none",
                    help="hyperparameters changed at every step (see the module docs)")
    ap.add_argument("--optimizer", choices=("adam", "sgd", "lookahead"), default="adam",
                    help="the optimizer of every variant (see the module docs)")
    ap.add_argument("--shared", action="store_true",
                    help="every variant in this one process (their thread pools then contend: "
                         "not how anyone trains), instead of one process each")
    args = ap.parse_args()
    global DEVICE, BATCH, SCHEDULE, OPTIMIZER
    SCHEDULE = os.environ["MITHRIL_BENCH_SCHEDULE"] = args.schedule
    OPTIMIZER = os.environ["MITHRIL_BENCH_OPTIMIZER"] = args.optimizer
    if args.device:
        DEVICE = os.environ["MITHRIL_BENCH_DEVICE"] = args.device
    if args.batch:
        BATCH = args.batch
        os.environ["MITHRIL_BENCH_BATCH"] = str(args.batch)
    names = [f"mithril {b} {k}" for b in args.backend for k in ("step", "separate")]
    torch_ref = not args.no_torch and OPTIMIZER != "lookahead"  # (torch has no Lookahead)
    names += ([TORCH_REF] if torch_ref else []) + [OPTAX_REF]
    first: dict[str, float] = {}
    variants: dict[str, Callable[[], float]] = {}
    if args.shared:
        for n in names:
            variants[n] = build(n, args.hidden)
        for n, fn in variants.items():  # warm-up: compiles, caches
            t0 = time.perf_counter()
            fn()
            first[n] = time.perf_counter() - t0
        clock = time.perf_counter if args.clock == "wall" else time.process_time

        def timed(fn: Callable[[], float]) -> Callable[[], float]:
            def run() -> float:
                t0 = clock()
                fn()
                return clock() - t0
            return run
        runs = {n: timed(fn) for n, fn in variants.items()}
    else:
        remotes = {}
        for n in names:  # one at a time: the first epochs (compiling) do not overlap
            remotes[n] = _Remote(n, args.hidden, args.clock)
            first[n] = remotes[n].first()
        runs = dict(remotes)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            times[n].append(runs[n]())
    if not args.shared:
        for rem in remotes.values():
            rem.close()
    med = {n: statistics.median(v) for n, v in times.items()}
    low = {n: min(v) for n, v in times.items()}
    refs = [r for r in (TORCH_REF, OPTAX_REF) if r in med]
    best_ref = min(med[r] for r in refs)
    opt = times[OPTAX_REF]
    print(f"one epoch: MLP {[FEATURES, *args.hidden, CLASSES]} + cross-entropy + {OPTIMIZER}, "
          f"{STEPS} steps of {BATCH}, float32, torch on {DEVICE}, schedule {SCHEDULE}; "
          f"torch threads "
          f"{torch.get_num_threads()}; "
          f"median of {args.rounds} rounds, {args.clock} clock, "
          f"{'one process for all' if args.shared else 'one process per variant'}")
    best_low = min(low[r] for r in refs)
    print(f"{'variant':34s} {'epoch ms':>9s} {'per step us':>12s} {'vs best ref':>12s} "
          f"{'min: vs best':>13s} {'vs optax/round':>15s} {'first epoch ms':>15s}")
    for n in names:
        per_round = statistics.median(a / b for a, b in zip(times[n], opt, strict=True))
        print(f"{n:34s} {med[n] * 1e3:9.2f} {med[n] / STEPS * 1e6:12.1f} "
              f"{med[n] / best_ref:11.2f}x {low[n] / best_low:12.2f}x {per_round:14.2f}x "
              f"{first[n] * 1e3:15.1f}")


if __name__ == "__main__":
    main()
