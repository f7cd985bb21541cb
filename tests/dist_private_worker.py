"""The ranks of ``tests/test_distributed_private.py``: DP-SGD under ``DataParallel``, each
rank with the per-example gradients of its share of every batch (``python
tests/dist_private_worker.py RANK WORLD PORT OUT``; each rank writes ``OUT.RANK.json``).

The model is an MLP with a cross-entropy; batches of 7 rows split unevenly (4 + 3), as
``per_example_gradients`` gives them on NumPy and torch, float64.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

import mithril as ml  # noqa: E402
from mithril.backends import NumpyBackend, TorchBackend  # noqa: E402
from mithril.utils.optimizers import DPSGD, Adam, DifferentiallyPrivate  # noqa: E402
from mithril.utils.per_example import per_example_gradients  # noqa: E402

STEPS, ROWS, BAD_AT = 4, 7, 2
CLIP = 0.05  # (small: most examples are clipped)


def model() -> ml.Model:
    m = ml.Model()
    m |= ml.MLP(["tanh", None], [5, 3])(input="input", output="logits")
    m |= ml.CrossEntropy()(input="logits", target="target", output=ml.IOKey("loss"))
    return m


def batch(t: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(100 + t)
    return rng.standard_normal((ROWS, 4)), rng.integers(0, 3, ROWS)


def share(t: int, rank: int, world: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = batch(t)
    bounds = [ROWS * r // world + (ROWS * r % world > 0) for r in range(world + 1)]
    return x[bounds[rank]:bounds[rank + 1]], y[bounds[rank]:bounds[rank + 1]]


def makers() -> dict[str, Any]:
    return {"dpsgd": lambda: DPSGD(0.5, l2_norm_clip=CLIP, noise_multiplier=1.1, seed=7,
                                   momentum=0.9),
            "dpsgd0": lambda: DPSGD(0.5, l2_norm_clip=CLIP, noise_multiplier=0.0, seed=7),
            # Opacus's settings: the expected batch size as the denominator, its clip ε
            "opacus": lambda: DPSGD(0.5, l2_norm_clip=CLIP, noise_multiplier=1.1, seed=7,
                                    momentum=0.9, expected_batch_size=8, clip_epsilon=1e-6),
            "adam": lambda: DifferentiallyPrivate(Adam(0.01), l2_norm_clip=CLIP,
                                                  noise_multiplier=0.5, seed=1)}


def run(backend_name: str, which: str, rank: int, world: int, wrap: bool = True
        ) -> dict[str, Any]:
    """``STEPS`` steps of ``which``; with ``wrap`` under ``DataParallel`` (this rank's share),
    else one process on the whole batch. At ``BAD_AT`` (wrapped) rank 1 first gives the
    batch's mean gradient instead of per-example ones: refused on every rank."""
    from mithril.distributed import DataParallel

    backend = (NumpyBackend if backend_name == "numpy" else TorchBackend)(dtype="float64")
    compiled = ml.compile(model(), backend, shapes={"input": [None, 4]})
    rng = np.random.default_rng(0)
    params = {k: backend.array(0.5 * rng.standard_normal(s))
              for k, s in sorted(compiled.parameter_shapes.items())}
    opt = makers()[which]()
    dp = DataParallel(opt) if wrap else opt
    state = dp.init(params)
    out: dict[str, Any] = {}
    for t in range(STEPS):
        x, y = share(t, rank, world) if wrap else batch(t)
        data = {"input": backend.array(x), "target": backend.array(y, backend.int_dtype)}
        grads = per_example_gradients(compiled, params, data, loss="loss")
        if wrap and t == BAD_AT:
            before = {k: backend.to_numpy(v).copy() for k, v in params.items()}
            bad = grads if rank == 0 else {k: g.mean(0) for k, g in grads.items()}
            try:
                dp.update(params, bad, state)
                out["refused"] = None
            except Exception as e:  # noqa: BLE001 - the test reads its class and message
                out["refused"] = f"{type(e).__name__}: {e}"
            out["unchanged"] = all(np.array_equal(backend.to_numpy(params[k]), before[k])
                                   for k in params) and state.local.values["dp_count"] == t
        params, state = dp.update(params, grads, state)
    out["params"] = {k: backend.to_numpy(v).tolist() for k, v in params.items()}
    local = state.local if wrap else state
    out["count"] = local.values["dp_count"]
    return out


def main() -> None:
    import torch
    import torch.distributed as dist

    from mithril import distributed as mdist

    rank, world, port, out = *map(int, sys.argv[1:4]), sys.argv[4]
    torch.set_num_threads(1)
    mdist.init(rank, world, master_port=port,
               timeout=float(os.environ.get("DIST_TIMEOUT", "20")))
    res = {f"{b}/{w}": run(b, w, rank, world) for b in ("numpy", "torch") for w in makers()}
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
