"""A training step where the loss does not reach every parameter, against one where it does.

``make_train_step(compiled, opt, loss=...)`` leaves the parameters its loss does not reach
out of the update (as ``torch.optim`` skips a ``.grad`` None) and counts a missed step for
them (:mod:`mithril.utils.unreached_params`). Model: a two-head MLP (trunk ``Linear(hidden)``
+ ReLU, head a ``Linear(1)``, head b ``Linear(out_b)``, MSE losses ``loss_a``, ``loss_b`` and
their sum ``loss``). Variants, each with its own Adam and state:

* ``all``: ``loss`` (both heads reached);
* ``unreached``: ``loss_a`` (head b left out of every update, its missed count growing);
* ``alternating``: the ``loss_a`` and ``loss_b`` steps in turn on one state (each head
  misses every other step).

``--part step`` (default) times the whole step (forward, backward, update);
``--part update`` only ``opt.update`` on gradients computed beforehand (all of them, or
head b's left out + ``note_missed``, as the step does), the optimizer's share alone.

Every step gets a fresh batch (four rotate) and so fresh gradients. Each round times the
variants of each backend in turn, in ABBA order within the round (the machine's load
moves both alike); the medians over rounds are reported with the ratio to ``all``. After
timing, one check that the updates really happened: the reached parameters moved, head b
of ``unreached`` did not, and its missed count is the number of steps it took.

    python benchmarks/unreached_step.py [--backend numpy torch] [--part step|update]
                                        [--rounds 9] [--steps 200] [--dtype float64]
                                        [--clock wall|cpu] [--scheduled]

``--clock cpu`` times the process's CPU time instead of the wall clock: on a machine that
other jobs load, the steadier measure (time spent waiting for a core is not counted).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np

import mithril as ml
from mithril.backends import NumpyBackend, TorchBackend
from mithril.utils.optimizers import Adam
from mithril.utils.training import make_train_step

BACKENDS = {"numpy": NumpyBackend, "torch": TorchBackend}
VARIANTS = ("all", "unreached", "alternating")
HEAD_B = ("linear_2.weight", "linear_2.bias")


def two_heads(hidden: int, out_b: int) -> ml.Model:
    m = ml.Model()
    m |= ml.Linear(hidden)(input="input", output="h0")
    m |= ml.Relu()(input="h0", output="h")
    m |= ml.Linear(1)(input="h", output="ya")
    m |= ml.Linear(out_b)(input="h", output="yb")
    m |= ml.MeanSquaredError()(input="ya", target="ta", output=ml.IOKey("loss_a"))
    m |= ml.MeanSquaredError()(input="yb", target="tb", output=ml.IOKey("loss_b"))
    m |= ml.Add()(left="loss_a", right="loss_b", output=ml.IOKey("loss"))
    return m


class Variant:
    """One variant's step(s), parameters and state, stepped ``n`` times by :meth:`run`."""

    def __init__(self, name: str, compiled: Any, batches: list[dict], part: str,
                 host: Any, scheduled: bool = False) -> None:
        self.name, self.batches, self.part, self.host = name, batches, part, host
        self.scheduled = scheduled
        self.opt = Adam(learning_rate=1e-3)
        losses = {"all": ["loss"], "unreached": ["loss_a"],
                  "alternating": ["loss_a", "loss_b"]}[name]
        self.steps = [make_train_step(compiled, self.opt, loss=k) for k in losses]
        self.params = compiled.get_parameters()
        self.start = {k: np.array(host(v)) for k, v in self.params.items()}
        self.state = self.steps[0].init(self.params)
        self.taken = 0
        if part == "update":  # the gradients of each batch, computed once
            self.grads = []
            for i, b in enumerate(batches):
                loss = losses[i % len(losses)]
                _, g = compiled.evaluate(self.params, b, output_gradients={loss: 1.0})
                left = set(compiled.program.param_shapes) - set(
                    compiled.reached_parameters(loss))
                self.grads.append(({k: v for k, v in g.items() if k not in left},
                                   [k for k in self.params if k in left]))

    def run(self, n: int, clock: Any = time.perf_counter) -> list[float]:
        """Take ``n`` steps; the time of each (seconds, by ``clock``)."""
        out = []
        steps, batches, k = self.steps, self.batches, len(self.batches)
        p, s = self.params, self.state
        if self.part == "update":
            opt = self.opt
            for _ in range(n):
                i = self.taken % k
                g, left = self.grads[i]
                t0 = clock()
                if self.scheduled:
                    opt.learning_rate = 1e-3 * 0.999 ** (self.taken % 1000)
                p, s = opt.update(p, g, s)
                if left:
                    s.note_missed(left)
                out.append(clock() - t0)
                self.taken += 1
        else:
            for _ in range(n):
                i = self.taken
                step = steps[i % len(steps)]
                t0 = clock()
                if self.scheduled:  # (a scheduler's step: a new rate before each)
                    self.opt.learning_rate = 1e-3 * 0.999 ** (i % 1000)
                p, s, _ = step(p, s, batches[i % k])
                out.append(clock() - t0)
                self.taken += 1
        self.params, self.state = p, s
        return out

    def check(self) -> str:
        """That the steps updated what they should (raises otherwise): a line to print."""
        moved = {k for k, v in self.params.items()
                 if not np.array_equal(self.host(v), self.start[k])}
        if self.name == "unreached":
            want = set(self.params) - set(HEAD_B)
            counts = self.state.missed_counts()
            assert counts == dict.fromkeys(HEAD_B, self.taken), counts
        else:
            want = set(self.params)
        assert moved == want, (self.name, sorted(moved ^ want))
        return f"{self.name}: {self.taken} steps, {len(moved)} tensors updated"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    ap.add_argument("--part", default="step", choices=("step", "update"))
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=200, help="steps per variant and round")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                    help="cpu: the process's CPU time (steadier on a loaded machine)")
    ap.add_argument("--scheduled", action="store_true",
                    help="set a new learning rate before every step (as a scheduler does)")
    ap.add_argument("--dtype", default="float64", choices=("float32", "float64"))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--inputs", type=int, default=8)
    ap.add_argument("--out-b", type=int, default=4)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    runs: dict[str, list[Variant]] = {}
    for name in args.backend:
        b = BACKENDS[name](dtype=args.dtype)
        c = ml.compile(two_heads(args.hidden, args.out_b), b,
                       shapes={"input": [args.batch, args.inputs]})
        batches = [{k: b.array(v.astype(args.dtype)) for k, v in {
            "input": rng.standard_normal((args.batch, args.inputs)),
            "ta": rng.standard_normal((args.batch, 1)),
            "tb": rng.standard_normal((args.batch, args.out_b))}.items()} for _ in range(4)]
        host = (lambda x: x.detach().cpu().numpy()) if name == "torch" else np.asarray
        runs[name] = [Variant(v, c, batches, args.part, host, args.scheduled) for v in VARIANTS]
        for v in runs[name]:
            v.run(args.warmup)

    clock = time.perf_counter if args.clock == "wall" else time.process_time
    medians: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        for name, variants in runs.items():
            order = variants if r % 2 == 0 else variants[::-1]  # (ABC, CBA, ...)
            for v in order:
                medians.setdefault((name, v.name), []).append(
                    statistics.median(v.run(args.steps, clock)))

    sched = ", rate set every step" if args.scheduled else ""
    print(f"{args.part}{sched}, {args.clock} clock, {args.dtype}, two-head MLP {args.inputs}-{args.hidden}-(1 | "
          f"{args.out_b}), batch {args.batch}, Adam; median over {args.rounds} rounds of the "
          f"per-step median of {args.steps} steps")
    for name, variants in runs.items():
        ref = statistics.median(medians[(name, "all")])
        for v in variants:
            m = statistics.median(medians[(name, v.name)])
            print(f"  {name:6s} {v.name:12s} {1e6 * m:8.1f} us   x{m / ref:.3f} of all")
        for v in variants:
            print("  check:", name, v.check())


if __name__ == "__main__":
    main()
