"""What parameter groups cost: one Adam step with 1, 2, 10 and 50 groups, NumPy backend.

Every group has its own learning rate and weight decay (tensors are dealt to the groups in
turn), so every row of the scalar table differs; the fused kernel still makes one pass,
reading each tensor's row once. All variants are timed in the same process in rotating
blocks (the warm-up and rotation of ``optimizer_step.py``), each step with the next of three
pre-made gradient sets; medians and the ratio to one group are printed, and each variant's
first step is checked once against a NumPy reference of grouped AdamW.

    python benchmarks/param_groups.py [--sizes a,b] [--rounds 6] [--block 5]
"""

from __future__ import annotations

import argparse

import numpy as np
from optimizer_step import GRAD_SETS, SIZES, Impl, make_numpy, shapes_for, time_blocks

LR, WD = 1e-3, 1e-2


def group_specs(names: list[str], n: int) -> list[dict]:
    """``n`` groups (n = 1: none) with their own lr and weight decay, tensors dealt in turn."""
    if n == 1:
        return []
    return [{"params": names[i::n], "learning_rate": LR * (1 + i / n), "weight_decay": WD * (i % 3)}
            for i in range(n)]


def grouped_impl(n: int, params: dict, gsets: list) -> Impl:
    from mithril.utils.optimizers import AdamW

    opt = AdamW(LR, weight_decay=WD, param_groups=group_specs(list(params), n))
    box = {"p": {k: v.copy() for k, v in params.items()}, "g": gsets[0]}
    box["s"] = opt.init(box["p"])

    def give(i: int) -> None:
        box["g"] = gsets[i]

    def step() -> None:
        box["p"], box["s"] = opt.update(box["p"], box["g"], box["s"])

    step()
    return Impl(give, step, {k: np.array(v) for k, v in box["p"].items()})


def reference(n: int, params: dict, g: dict) -> dict:
    """The first AdamW step, group by group (m̂/(√v̂+ε) = g/(|g|+ε) on step 1)."""
    lr = {k: LR for k in params}
    wd = {k: WD for k in params}
    for spec in group_specs(list(params), n):
        for k in spec["params"]:
            lr[k], wd[k] = spec["learning_rate"], spec["weight_decay"]
    return {k: p * (1 - lr[k] * wd[k]) - lr[k] * g[k] / (np.abs(g[k]) + 1e-8)
            for k, p in params.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="a,b")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--block", type=int, default=5)
    ap.add_argument("--warm", type=float, default=0.05)
    args = ap.parse_args()
    print(f"{'case':<22}{'median ms':>10}{'vs 1 group':>12}")
    for size in args.sizes.split(","):
        total, n_tensors = SIZES[size]
        params, gsets = make_numpy(shapes_for(total, n_tensors))
        assert len(gsets) == GRAD_SETS
        impls = {n: grouped_impl(n, params, gsets) for n in (1, 2, 10, 50)}
        for n, impl in impls.items():  # the update really happened, per group
            want = reference(n, params, gsets[0])
            err = max(float(np.max(np.abs(impl.first[k] - want[k]))) for k in want) / LR
            assert err < 1e-3, f"{n} groups: first step off the reference by {err:.2e} lr"
        med = time_blocks({f"{n} groups": i for n, i in impls.items()}, args.rounds, args.block,
                          args.warm)
        one = med["1 groups"]
        for k, v in med.items():
            print(f"{size} {k:<20}{v * 1e3:>10.2f}{v / one:>11.2f}x", flush=True)


if __name__ == "__main__":
    main()
