"""One rank of ``tests/test_hunt67_distributed2.py`` (``python tests/dist_hunt67b_worker.py
RANK WORLD PORT OUT CASE``): runs CASE on this rank and writes what it saw to
``OUT.RANK.json`` (every exception caught and recorded, so that a rank left waiting by
another reports a PeerError within the timeout instead of hanging).

``views``: SGD (with and without global-norm clipping) on 2 ranks, float16 and float32,
replicated and sharded, the gradients written into ``gradient_views``: what the views hold
after the step, and the params. ``scatter``: ``scatter_state`` of a whole Adam state whose
parameter ``b`` has another shape on rank 1 only (a broadcastable one), then of the
right state: every rank must refuse the first before ``dp.init``, and the second must give
the slots of the state.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
import warnings
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

LR, CLIP, TIMEOUT = 0.25, 0.1, 10.0
SHAPES = {"w": (3, 2), "b": (4,)}


def local_grads(rank: int) -> dict[str, np.ndarray]:
    """Rank ``rank``'s gradients (exact in float16; their mean too)."""
    return {"w": np.full((3, 2), 1.0 + rank), "b": np.arange(4) + 2.0 * rank}


def err(e: BaseException) -> dict[str, str]:
    return {"type": type(e).__name__, "msg": str(e)[:400]}


def views_case(rank: int) -> dict[str, Any]:
    from mithril import distributed as dist
    from mithril.utils.optimizers import SGD

    out: dict[str, Any] = {}
    for dt in ("float16", "float32"):
        for shard in (False, True):
            for clip in (None, CLIP):
                p = {n: np.ones(s, dt) for n, s in SHAPES.items()}
                dp = dist.DataParallel(SGD(LR, clip_norm=clip), shard_state=shard)
                st = dp.init(p)
                v = dp.gradient_views(st)
                for n, g in local_grads(rank).items():
                    v[n][...] = g
                p, st = dp.update(p, v, st)
                out[f"{dt}/{shard}/{clip}"] = {
                    "views": {n: a.astype(np.float64).tolist() for n, a in v.items()},
                    "params": {n: np.asarray(a, np.float64).tolist() for n, a in p.items()}}
    return out


def scatter_case(rank: int) -> dict[str, Any]:
    from mithril import distributed as dist
    from mithril.distributed.full_state import scatter_state
    from mithril.utils.optimizers import Adam

    params = {n: np.ones(s) for n, s in SHAPES.items()}
    out: dict[str, Any] = {}
    for shard in (False, True):
        opt = Adam(0.1)
        full = opt.init(params)
        full.slot("m")["w"][...] = 7.0
        full.slot("v")["b"][...] = 3.0
        full.step = 4
        bad = full
        if rank == 1:  # the state of a model whose b is (1,): broadcastable into (4,)
            bad = Adam(0.1).init({"w": np.ones((3, 2)), "b": np.ones(1)})
            bad.slot("v")["b"][...] = 9.0
        dp = dist.DataParallel(Adam(0.1), shard_state=shard)
        t0 = time.monotonic()
        try:
            scatter_state(dp, bad, params)
            refused = None
        except Exception as e:  # noqa: BLE001 - recorded for the test
            refused = err(e)
        got: dict[str, Any] = {"refused": refused, "seconds": time.monotonic() - t0}
        try:
            st = scatter_state(dp, full, params)
            got["owned"] = list(st.owned)
            got["m"] = {n: np.asarray(a).tolist() for n, a in st.slot("m").items()}
            got["v"] = {n: np.asarray(a).tolist() for n, a in st.slot("v").items()}
            got["step"] = st.step
        except Exception as e:  # noqa: BLE001
            got["retry"] = err(e)
        out[str(shard)] = got
    return out


def main() -> None:
    rank, world, port, out, case = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                                    sys.argv[4], sys.argv[5])
    warnings.simplefilter("ignore")
    from mithril import distributed as dist

    dist.init(rank, world, master_addr="127.0.0.1", master_port=port, timeout=TIMEOUT)
    try:
        res = views_case(rank) if case == "views" else scatter_case(rank)
    except Exception as e:  # noqa: BLE001
        res = {"crash": "".join(traceback.format_exception(e))[-3000:]}
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main()
