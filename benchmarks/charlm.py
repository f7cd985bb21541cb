"""Held-out bits per character of ``mithril train --task charlm`` against the wall clock.

Runs the command (``pydoc_data.topics``, the default model: 4 blocks of d=128, 4 heads,
context 128, batches of 32, AdamW with warm-up and cosine decay) on each ``--backend`` with
``--steps`` steps, measuring every ``--eval-every`` steps, and prints for each: the wall time
of the whole command (data, compilation, training, measurement and sampling), the final
held-out bits per character, and the first measurement at or below ``--target`` (2.5) with the
wall time it was reached. The issue's target: <= 2.5 bits/char within 10 minutes on JAX on a
2-core machine.

    python benchmarks/charlm.py --backend jax --steps 1000
    python benchmarks/charlm.py --backend jax numpy torch --steps 300
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

from mithril.cli import main


class Clock:
    """Wall time since the start of the run at each epoch line printed."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.marks: list[float] = []

    def __call__(self, line: str = "", *args: object, **kwargs: object) -> None:
        if line.startswith("train: epoch"):
            self.marks.append(time.perf_counter() - self.start)
        print(line, *args, **kwargs, flush=True)


def run(backend: str, args: argparse.Namespace) -> dict:
    import mithril.cli.train as train_mod

    out = Path(tempfile.mkdtemp()) / backend
    clock = Clock()
    real_print = train_mod.print if hasattr(train_mod, "print") else print
    train_mod.print = clock  # type: ignore[attr-defined]  # the epoch lines, timed
    try:
        status = main(["train", "--task", "charlm", "--backend", backend, "--steps",
                       str(args.steps), "--eval-every", str(args.eval_every), "--no-progress",
                       "--no-plot", "--out", str(out), *args.extra])
    finally:
        train_mod.print = real_print  # type: ignore[attr-defined]
    total = time.perf_counter() - clock.start
    assert status == 0
    summary = json.loads((out / "summary.json").read_text())
    with open(out / "epochs.csv", newline="") as f:
        epochs = list(csv.DictReader(f))
    reached = next(((int(e["step"]), float(e["test_bpc"]), clock.marks[i])
                    for i, e in enumerate(epochs) if float(e["test_bpc"]) <= args.target), None)
    return {"backend": backend, "wall_s": total, "bpc": summary["final"]["test_bpc"],
            "steps": summary["steps"], "reached": reached}


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", nargs="+", default=["jax"])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--target", type=float, default=2.5)
    p.add_argument("extra", nargs="*", help="more `mithril train` flags (after --)")
    args = p.parse_args()
    results = [run(b, args) for b in args.backend]
    print()
    for r in results:
        hit = "not reached" if r["reached"] is None else \
            f"{r['reached'][1]:.3f} at step {r['reached'][0]} after {r['reached'][2]:.0f} s"
        print(f"{r['backend']:>6}: {r['steps']} steps in {r['wall_s']:.0f} s, final held-out "
              f"{r['bpc']:.3f} bits/char; <= {args.target}: {hit}")


if __name__ == "__main__":
    cli()
