"""Held-out bits per character of ``mithril train --task charlm`` against the wall clock.

Runs the command (``pydoc_data.topics``, the default model: 4 blocks of d=128, 4 heads,
context 128, batches of 32, AdamW with warm-up and cosine decay) on each ``--backend`` with
``--steps`` steps, measuring every ``--eval-every`` steps, and prints for each: the wall time
of the whole command (data, compilation, training, measurement and sampling), the final
held-out bits per character, and the first measurement at or below ``--target`` (2.5) with the
wall time it was reached. The issue's target: <= 2.5 bits/char within 10 minutes on JAX on a
2-core machine.

``--reference`` also trains the same model with the same recipe in plain torch: the same
text, split, held-out and training windows measured, batches drawn the same way, the same
initial weights (copied from Mithril's initialisation), ``torch.optim.AdamW(fused=True)``
with the same learning rate, weight decay, warm-up + cosine schedule and gradient clipping,
measuring the same windows every ``--eval-every`` steps, with as many threads (``--threads``,
default 1 as the CLI) as the Mithril runs. It prints the wall time each run
took to reach ``--target`` and the ratio Mithril / torch (the issue's target: <= 1.1). Both
clocks start before the text is loaded; the reference's excludes only the Mithril compilation
it uses to copy the initial weights. ``--repeats N`` runs both N times in alternating order
(Mithril first, then the reference first) and reports the median ratios, so that a load that
drifts during a run favours neither side on average; ``--clock cpu`` times them all in
CPU time of this process instead of wall time (steadier on a loaded machine).

    python benchmarks/charlm.py --backend jax --steps 1000
    python benchmarks/charlm.py --backend jax numpy torch --steps 300
    python benchmarks/charlm.py --backend torch jax --steps 300 --target 3.2 --reference
    python benchmarks/charlm.py --backend torch --steps 150 --eval-every 25 --target 3.3 \
        --reference --repeats 2 -- --sample-chars 0
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from mithril.cli import main

_CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
_now = time.perf_counter  # the clock of every time reported (--clock)


class Clock:
    """Wall time since the start of the run at each epoch line printed."""

    def __init__(self) -> None:
        self.start = _now()
        self.marks: list[float] = []

    def __call__(self, line: str = "", *args: object, **kwargs: object) -> None:
        if line.startswith("train: epoch"):
            self.marks.append(_now() - self.start)
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
                       "--no-plot", "--threads", str(args.threads), "--out", str(out),
                       *args.extra])
    finally:
        train_mod.print = real_print  # type: ignore[attr-defined]
    total = _now() - clock.start
    assert status == 0
    summary = json.loads((out / "summary.json").read_text())
    with open(out / "epochs.csv", newline="") as f:
        epochs = list(csv.DictReader(f))
    reached = next(((int(e["step"]), float(e["test_bpc"]), clock.marks[i])
                    for i, e in enumerate(epochs) if float(e["test_bpc"]) <= args.target), None)
    return {"backend": backend, "wall_s": total, "bpc": summary["final"]["test_bpc"],
            "steps": summary["steps"], "reached": reached, "epoch_s": _steady(clock.marks)}


def _steady(marks: list[float]) -> float | None:
    """The median wall time between measurements after the first (compilation excluded)."""
    gaps = [b - a for a, b in zip(marks, marks[1:])]
    return statistics.median(gaps) if gaps else None


def reference(args: argparse.Namespace) -> dict:
    """The charlm recipe in plain torch (see the module docstring); the same result dict."""
    import torch
    import torch.nn.functional as F

    import mithril as ml
    from mithril.cli.charlm import RandomWindows, load_text, windows
    from mithril.cli.networks import charlm_spec

    start = _now()
    context, batch, d, layers, heads = 128, 32, 128, 4, 4  # the CLI's defaults
    lr, wd, clip, seed, eval_windows = 3e-3, 0.1, 1.0, 0, 128
    warmup = min(100, args.steps // 10)
    text, _ = load_text(None)
    alphabet = sorted(set(text))
    index = {c: i for i, c in enumerate(alphabet)}
    tokens = np.fromiter((index[c] for c in text), dtype=np.int64, count=len(text))
    n_test = int(len(tokens) * 0.1)
    train, test = tokens[:len(tokens) - n_test], tokens[len(tokens) - n_test:]
    sets = {"train": windows(train, context, eval_windows), "test": windows(test, context,
                                                                            eval_windows)}
    sets = {k: (torch.as_tensor(x), torch.as_tensor(y)) for k, (x, y) in sets.items()}

    # the same initial weights: Mithril's initialisation of the same model, as torch leaves
    spec = charlm_spec(len(alphabet), context, d, layers, heads)
    backend = ml.TorchBackend(seed=seed)
    t_init = _now()
    init = ml.compile(spec.model, backend, shapes=spec.shapes).get_parameters()
    p = {k: torch.nn.Parameter(v.detach().clone()) for k, v in init.items()}
    start += _now() - t_init  # Mithril's compilation is not the reference's cost

    def forward(x: torch.Tensor) -> torch.Tensor:
        n, length = x.shape
        h = F.embedding(x, p["embedding.weight"]) + p["positional_embedding.weight"][:length]
        for i in range(layers):
            b = f"transformer_block_{i}."
            a = F.layer_norm(h, (d,), p[b + "layer_norm_0.weight"], p[b + "layer_norm_0.bias"])
            q, k, v = F.linear(a, p[b + "multi_head_attention.in_proj_weight"],
                               p[b + "multi_head_attention.in_proj_bias"]) \
                .view(n, length, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = h + F.linear(a.transpose(1, 2).reshape(n, length, d),
                             p[b + "multi_head_attention.out_proj_weight"],
                             p[b + "multi_head_attention.out_proj_bias"])
            a = F.layer_norm(h, (d,), p[b + "layer_norm_1.weight"], p[b + "layer_norm_1.bias"])
            a = F.gelu(F.linear(a, p[b + "linear_0.weight"], p[b + "linear_0.bias"]))
            h = h + F.linear(a, p[b + "linear_1.weight"], p[b + "linear_1.bias"])
        h = F.layer_norm(h, (d,), p["layer_norm.weight"], p["layer_norm.bias"])
        return F.linear(h, p["linear.weight"], p["linear.bias"])

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(forward(x).flatten(0, 1), y.flatten())

    opt = torch.optim.AdamW(list(p.values()), lr=lr, weight_decay=wd, fused=True)
    decay = args.steps - warmup

    def factor(t: int) -> float:  # linear warm-up from 0, then cosine to 0
        if t < warmup:
            return t / warmup
        return 0.5 * (1 + math.cos(math.pi * min(t - warmup, decay) / decay))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    rng = np.random.default_rng(seed)
    per_epoch = [args.eval_every] * (args.steps // args.eval_every)
    if args.steps % args.eval_every:
        per_epoch.append(args.steps % args.eval_every)
    batches = RandomWindows(train, context, batch, per_epoch)
    epochs, step = [], 0
    for epoch in range(1, len(per_epoch) + 1):
        for xb, yb in batches(epoch, rng):
            loss = loss_of(torch.as_tensor(xb), torch.as_tensor(yb))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(p.values(), clip)
            opt.step()
            sched.step()
            step += 1
        with torch.no_grad():  # the held-out and training windows, in chunks of 64
            bpc = {k: sum(float(loss_of(x[i:i + 64], y[i:i + 64])) * len(x[i:i + 64])
                          for i in range(0, len(x), 64)) / len(x) / math.log(2)
                   for k, (x, y) in sets.items()}
        epochs.append((step, bpc["test"], _now() - start))
        print(f"torch reference: step {step}  test {bpc['test']:.3f} bits/char  "
              f"train {bpc['train']:.3f}  {epochs[-1][2]:.0f} s", flush=True)
    reached = next((e for e in epochs if e[1] <= args.target), None)
    return {"backend": "torch (plain, AdamW fused)", "wall_s": _now() - start,
            "bpc": epochs[-1][1], "steps": step, "reached": reached,
            "epoch_s": _steady([e[2] for e in epochs])}


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", nargs="+", default=["jax"])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--target", type=float, default=2.5)
    p.add_argument("--threads", type=int, default=1,
                   help="BLAS/OpenMP and torch threads of every run (the CLI's default: 1)")
    p.add_argument("--reference", action="store_true",
                   help="also train the same model and recipe in plain torch (AdamW fused)")
    p.add_argument("extra", nargs="*", help="more `mithril train` flags (after --)")
    p.add_argument("--repeats", type=int, default=1,
                   help="with --reference: run the Mithril runs and the reference this many "
                        "times, in alternating order (Mithril first, then the reference first, "
                        "...), and report each round's ratios and their median: a load that "
                        "drifts during a round then favours neither side on average")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall clock (default) or this process's CPU time (steadier on a loaded "
                        "machine; every run is in this process, one after the other)")
    args = p.parse_args()
    global _now
    _now = _CLOCK[args.clock]
    if args.reference:  # imported before either clock starts: neither run pays for it
        import torch  # noqa: F401
    rounds = []
    for i in range(args.repeats if args.reference else 1):
        rounds.append(_round(args, reference_first=i % 2 == 1))
        if args.repeats > 1:
            print(f"\nround {i + 1}/{args.repeats}:")
            _report(rounds[-1], args)
    if len(rounds) > 1:
        print(f"\nmedians over {len(rounds)} rounds (alternating order):")
        for j, b in enumerate(args.backend):
            for what, ratios in (("time to target", [_ratios(r, j)[0] for r in rounds]),
                                 ("steady-state", [_ratios(r, j)[1] for r in rounds])):
                ratios = [x for x in ratios if x is not None]
                if ratios:
                    print(f"{what}, Mithril {b} / plain torch: median "
                          f"{statistics.median(ratios):.2f} (rounds: "
                          f"{', '.join(f'{x:.2f}' for x in ratios)})")
    else:
        _report(rounds[0], args)


def _round(args: argparse.Namespace, reference_first: bool) -> list[dict]:
    """The Mithril runs then the reference (``reference_first``: the other way round); the
    reference last in the list."""
    def ref() -> list[dict]:
        if not args.reference:
            return []
        from mithril.cli.training import thread_limit

        with thread_limit(args.threads, "torch"):  # as the CLI's training loop
            return [reference(args)]

    if reference_first:
        r = ref()
        return [run(b, args) for b in args.backend] + r
    return [run(b, args) for b in args.backend] + ref()


def _ratios(results: list[dict], j: int) -> tuple[float | None, float | None]:
    """(time to the target, steady-state time per epoch) of Mithril run ``j`` / the reference."""
    r, ref = results[j], results[-1]
    reach = r["reached"][2] / ref["reached"][2] \
        if r["reached"] is not None and ref["reached"] is not None else None
    steady = r["epoch_s"] / ref["epoch_s"] if r["epoch_s"] and ref["epoch_s"] else None
    return reach, steady


def _report(results: list[dict], args: argparse.Namespace) -> None:
    print()
    for r in results:
        hit = "not reached" if r["reached"] is None else \
            f"{r['reached'][1]:.3f} at step {r['reached'][0]} after {r['reached'][2]:.0f} s"
        steady = "" if r["epoch_s"] is None else \
            f"; {r['epoch_s']:.1f} s per {args.eval_every} steps + measurement after the first"
        print(f"{r['backend']:>6}: {r['steps']} steps in {r['wall_s']:.0f} s, final held-out "
              f"{r['bpc']:.3f} bits/char; <= {args.target}: {hit}{steady}")
    ref = results[-1]["reached"] if args.reference else None
    if ref is not None:
        for r in results[:-1]:
            if r["reached"] is not None:
                print(f"time to {args.target} bits/char, Mithril {r['backend']} / plain torch: "
                      f"{r['reached'][2] / ref[2]:.2f}")
            if r["epoch_s"] and results[-1]["epoch_s"]:
                print(f"steady-state time per {args.eval_every} steps, Mithril {r['backend']} / "
                      f"plain torch: {r['epoch_s'] / results[-1]['epoch_s']:.2f}")


if __name__ == "__main__":
    cli()
