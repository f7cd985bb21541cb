"""The JAX train step with parameters the loss does not reach, for the optimizers whose step
used to fall back to the separate calls there (evaluate + ``optimizer.update``): weight
averaging of a tensorwise optimizer (Muon, Adafactor), a group's ``step_offset``,
``Lookahead(reset_state=True)``; and AdamW with an EMA (one program before and after).

The two-head model of ``benchmarks/unreached_step.py`` (trunk ``Linear(hidden)`` + ReLU, heads
``Linear(1)`` / ``Linear(out_b)``), the ``loss_a`` and ``loss_b`` steps in turn on one state
(each head misses every other step; ``--one-head``: the ``loss_a`` step alone), fresh
device batches (four rotate). Medians over rounds
of the time per step (after a warm-up that compiles), and whether the step is one program.
``--all-reached``: one head, both losses of it (every parameter reached by each step);
``--optimizers adamw,adam``: plain ones (all: ``--help``).

    python benchmarks/unreached_averaging_jax.py [--rounds 7] [--steps 100] [--hidden 256]
                                                 [--one-head] [--all-reached]
                                                 [--optimizers adamw-ema,adamw]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import mithril as ml
from mithril.backends import JaxBackend
from mithril.utils.optimizers import Adafactor, Adam, AdamW, Lookahead, Muon
from mithril.utils.training import make_train_step

OPTIMIZERS = {
    "adamw-ema": lambda: AdamW(1e-3, ema_decay=0.99),
    "muon-ema": lambda: Muon(1e-3, ema_decay=0.99, fallback=AdamW(1e-3)),
    "adafactor-swa": lambda: Adafactor(1e-2, swa_start=10),
    "lookahead-reset": lambda: Lookahead(Adam(1e-3), sync_period=5, reset_state=True),
    "adamw": lambda: AdamW(1e-3),
    "adam": lambda: Adam(1e-3),
}
DEFAULT = "adamw-ema,muon-ema,adafactor-swa,lookahead-reset"


def model(hidden: int, out_b: int, all_reached: bool = False) -> ml.Model:
    m = ml.Model()
    m |= ml.Linear(hidden)(input="input", output="h0")
    m |= ml.Relu()(input="h0", output="h")
    m |= ml.Linear(out_b)(input="h", output="yb")
    if all_reached:  # (loss_a of the one head too: each step reaches every parameter)
        m |= ml.MeanSquaredError()(input="yb", target="ta", output=ml.IOKey("loss_a"))
        m |= ml.MeanSquaredError()(input="yb", target="tb", output=ml.IOKey("loss_b"))
        return m
    m |= ml.Linear(1)(input="h", output="ya")
    m |= ml.MeanSquaredError()(input="ya", target="ta", output=ml.IOKey("loss_a"))
    m |= ml.MeanSquaredError()(input="yb", target="tb", output=ml.IOKey("loss_b"))
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--inputs", type=int, default=32)
    ap.add_argument("--out-b", type=int, default=4)
    ap.add_argument("--one-head", action="store_true",
                    help="the loss_a step only (head b never reached), not the two in turn")
    ap.add_argument("--all-reached", action="store_true",
                    help="one head, both losses of it: every parameter reached by each step")
    ap.add_argument("--optimizers", default=DEFAULT,
                    help=f"comma-separated, of {', '.join(OPTIMIZERS)} (default {DEFAULT})")
    a = ap.parse_args()
    backend = JaxBackend()
    c = ml.compile(model(a.hidden, a.out_b, a.all_reached), backend,
                   shapes={"input": [a.batch, a.inputs]})
    rng = np.random.default_rng(0)
    out_a = a.out_b if a.all_reached else 1
    data = [{"input": backend.array(rng.standard_normal((a.batch, a.inputs), np.float32)),
             "ta": backend.array(rng.standard_normal((a.batch, out_a), np.float32)),
             "tb": backend.array(rng.standard_normal((a.batch, a.out_b), np.float32))}
            for _ in range(4)]
    runs = {}
    for name in a.optimizers.split(","):
        opt = OPTIMIZERS[name]()
        steps = [make_train_step(c, opt, loss=k) for k in ("loss_a", "loss_b")]
        params = c.get_parameters()
        runs[name] = [steps, params, steps[0].init(params)]
    times: dict[str, list[float]] = {n: [] for n in runs}

    def go(name: str, n: int) -> float:
        steps, params, state = runs[name]
        t0 = time.perf_counter()
        for i in range(n):
            params, state, out = steps[0 if a.one_head else i % 2](params, state, data[i % 4])
        np.asarray(out["loss_a" if a.one_head or (n - 1) % 2 == 0 else "loss_b"])  # (waits)
        runs[name][1:] = [params, state]
        return (time.perf_counter() - t0) / n

    for name in runs:
        go(name, 10)  # (compiles)
    for r in range(a.rounds):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for name in order:
            times[name].append(go(name, a.steps))
    for name, ts in times.items():
        print(f"{name:18s} one program: {str(runs[name][0][0].fused):5s} "
              f"median {statistics.median(ts) * 1e6:9.1f} µs/step")


if __name__ == "__main__":
    main()
