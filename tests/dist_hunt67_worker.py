"""One rank of ``tests/test_hunt67_distributed.py`` (``python tests/dist_hunt67_worker.py
RANK WORLD PORT OUT CASE``): runs CASE on this rank and writes what it saw to
``OUT.RANK.json`` (every exception caught and recorded, so that a rank left waiting by
another reports a PeerError within the timeout instead of hanging).

``swap``/``swap_sharded``: ``DataParallel(Adam(ema_decay=0.5))`` takes one step; then rank 0
evaluates with its EMA swapped in (``swap_ema``) and calls ``update`` without swapping back.
Every rank must refuse that step (nothing changed anywhere); after rank 0 swaps back, the
retried step must give the one-process result. ``gather``: the same EMA swapped in on rank 0
during ``gather_state`` (sharded): every rank must raise at once, and the retry gather the
whole state. ``overflow``: finite gradients whose step overflows rank 1's tensor only, under
``nonfinite="propagate"`` (sharded): every rank must count and report it as one process.
``dp_empty``: DP-SGD where rank 1 holds no example at some steps (0 rows, or ``{}``).
``sophia``: Sophia with each rank's own Hessian-diagonal estimate (``dp.update_hessian``).
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

SHAPES = {"w": (3, 4), "b": (4,), "u": (2, 3)}
LR, DECAY, TIMEOUT = 0.1, 0.5, 10.0


def init_params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {n: rng.normal(size=s) for n, s in SHAPES.items()}


def grads(t: int, rank: int) -> dict[str, np.ndarray]:
    """Rank ``rank``'s gradients at step ``t`` (the step's gradient: their mean)."""
    rng = np.random.default_rng(100 * t + rank)
    return {n: rng.normal(size=s) for n, s in SHAPES.items()}


def listed(p: dict[str, Any]) -> dict[str, list]:
    return {n: np.asarray(a).tolist() for n, a in p.items()}


def err(e: BaseException) -> dict[str, str]:
    return {"type": type(e).__name__, "msg": str(e)[:400]}


def swap_case(rank: int, shard: bool) -> dict[str, Any]:
    from mithril import distributed as dist
    from mithril.utils.optimizers import Adam

    dp = dist.DataParallel(Adam(LR, ema_decay=DECAY), shard_state=shard)
    params = init_params()
    state = dp.init(params)
    params, state = dp.update(params, grads(0, rank), state)
    out: dict[str, Any] = {"owned": list(state.owned)}
    if rank == 0:  # evaluates with the EMA, and forgets to swap the training weights back
        params.update(dp.optimizer.swap_ema({n: params[n] for n in state.owned}, state.local))
    before = listed(params)
    t0 = time.monotonic()
    try:
        params, state = dp.update(params, grads(1, rank), state)
        out["refused"] = None
    except Exception as e:  # noqa: BLE001 - recorded for the test
        out["refused"] = err(e)
    out["seconds"] = time.monotonic() - t0
    out["step_after_refusal"] = state.step
    out["unchanged"] = listed(params) == before
    if rank == 0:
        params.update(dp.optimizer.swap_ema({n: params[n] for n in state.owned}, state.local))
    try:
        params, state = dp.update(params, grads(1, rank), state)
        out["params"] = listed(params)
        out["step"] = state.step
        out["ema"] = listed(dp.optimizer.ema_params(state.local))
    except Exception as e:  # noqa: BLE001
        out["retry"] = err(e)
    return out


def gather_case(rank: int) -> dict[str, Any]:
    from mithril import distributed as dist
    from mithril.distributed.full_state import gather_state
    from mithril.utils.optimizers import Adam

    dp = dist.DataParallel(Adam(LR, ema_decay=DECAY), shard_state=True)
    params = init_params()
    state = dp.init(params)
    for t in range(2):
        params, state = dp.update(params, grads(t, rank), state)
    out: dict[str, Any] = {}
    if rank == 0:
        params.update(dp.optimizer.swap_ema({n: params[n] for n in state.owned}, state.local))
    t0 = time.monotonic()
    try:
        gather_state(dp, state, params)
        out["refused"] = None
    except Exception as e:  # noqa: BLE001
        out["refused"] = err(e)
    out["seconds"] = time.monotonic() - t0
    if rank == 0:
        params.update(dp.optimizer.swap_ema({n: params[n] for n in state.owned}, state.local))
    try:
        full = gather_state(dp, state, params)
        if full is not None:
            out["step"] = full.step
            out["m"] = listed(full.slot("m"))
            out["v"] = listed(full.slot("v"))
            out["ema"] = listed(full.slot("ema"))
    except Exception as e:  # noqa: BLE001
        out["retry"] = err(e)
    return out


def overflow_case(rank: int) -> dict[str, Any]:
    """SGD(lr=1e307) under "propagate", sharded: finite gradients whose step overflows ``b``
    (rank 1's tensor) only, twice."""
    from mithril import distributed as dist
    from mithril.distributed.full_state import gather_state
    from mithril.utils.optimizers import SGD

    dp = dist.DataParallel(SGD(OVERFLOW_LR), shard_state=True)
    params = {n: np.ones(s) for n, s in OVERFLOW_SHAPES.items()}
    state = dp.init(params)
    out: dict[str, Any] = {"owned": list(state.owned), "counts": [], "warned": []}
    for _ in range(2):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            params, state = dp.update(params, overflow_grads(), state)
        out["counts"].append([state.num_nonfinite, bool(state.local.nonfinite_values)])
        out["warned"].append(sum("non-finite" in str(w.message) for w in seen))
        out.setdefault("params", listed(params))  # (after the first step)
    full = gather_state(dp, state, params)
    out["gathered"] = None if full is None else full.num_nonfinite
    return out


OVERFLOW_SHAPES, OVERFLOW_LR = {"w": (3, 4), "b": (12,)}, 1e307


def overflow_grads() -> dict[str, np.ndarray]:
    return {"w": np.full((3, 4), 1e-10), "b": np.full(12, 100.0)}


DP_SHAPES, DP_LR, DP_CLIP, DP_SEED = {"w": (3, 2), "b": (2,)}, 0.5, 0.3, 7
#: each step's examples on rank 0 and rank 1 (None: rank 1 passes {}, a rank out of batches)
DP_ROWS = [(3, 0), (2, None), (1, 2)]


def dp_examples(t: int, rank: int) -> dict[str, np.ndarray]:
    """Rank ``rank``'s per-example gradients at step ``t`` (rows: DP_ROWS)."""
    rows = DP_ROWS[t][rank]
    if rows is None:
        return {}
    rng = np.random.default_rng(1000 + 10 * t + rank)
    return {n: rng.normal(size=(rows, *s)) for n, s in DP_SHAPES.items()}


def dp_case(rank: int) -> dict[str, Any]:
    """DP-SGD (replicated) where rank 1 holds no example at some steps; then a step with
    no example on any rank (refused on every rank, nothing changed)."""
    from mithril import distributed as dist
    from mithril.utils.optimizers import DPSGD

    out: dict[str, Any] = {}
    for noise in (1.1, 0.0):
        dp = dist.DataParallel(DPSGD(DP_LR, l2_norm_clip=DP_CLIP, noise_multiplier=noise,
                                     seed=DP_SEED))
        params = {n: np.zeros(s) for n, s in DP_SHAPES.items()}
        state = dp.init(params)
        got: dict[str, Any] = {"steps": []}
        try:
            for t in range(len(DP_ROWS)):
                params, state = dp.update(params, dp_examples(t, rank), state)
                got["steps"].append(listed(params))
        except Exception as e:  # noqa: BLE001
            got["error"] = err(e)
        before = listed(params)
        empty = {n: np.zeros((0, *s)) for n, s in DP_SHAPES.items()}
        try:
            params, state = dp.update(params, empty, state)
            got["all_empty"] = None
        except Exception as e:  # noqa: BLE001
            got["all_empty"] = err(e)
        got["unchanged"] = listed(params) == before
        got["count"] = float(state.local.values["dp_count"])
        out[str(noise)] = got
    return out


SOPHIA_LR, SOPHIA_STEPS, SOPHIA_EVERY = 0.01, 5, 2


def sophia_inputs(t: int, rank: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Rank ``rank``'s gradients and Hessian-diagonal estimate at step ``t``."""
    rng = np.random.default_rng(500 + 10 * t + rank)
    return ({n: rng.normal(size=s) for n, s in SHAPES.items()},
            {n: rng.uniform(0.1, 2.0, size=s) for n, s in SHAPES.items()})


def sophia_case(rank: int) -> dict[str, Any]:
    """Sophia under DataParallel (replicated, sharded): each rank folds in the estimate of
    its share (``dp.update_hessian``) after the steps ``hessian_due`` names."""
    from mithril import distributed as dist
    from mithril.utils.optimizers import Sophia

    out: dict[str, Any] = {}
    for shard in (False, True):
        dp = dist.DataParallel(Sophia(SOPHIA_LR, update_interval=SOPHIA_EVERY),
                               shard_state=shard)
        params = init_params()
        state = dp.init(params)
        steps, used = [], 0
        for t in range(SOPHIA_STEPS):
            g, h = sophia_inputs(t, rank)
            due = dp.optimizer.hessian_due(state.local)
            params, state = dp.update(params, g, state)
            if due:
                state = dp.update_hessian(state, h)
                used += 1
            steps.append(listed(params))
        try:  # a bad estimate on rank 1 only: refused on every rank
            bad = dict(sophia_inputs(0, rank)[1])
            if rank == 1:
                bad["w"] = bad["w"][:2]
            dp.update_hessian(state, bad)
            refused = None
        except Exception as e:  # noqa: BLE001
            refused = err(e)
        out[str(shard)] = {"steps": steps, "used": used, "refused": refused}
    return out


def main() -> None:
    rank, world, port, out, case = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                                    sys.argv[4], sys.argv[5])
    warnings.simplefilter("ignore")
    from mithril import distributed as dist

    dist.init(rank, world, master_addr="127.0.0.1", master_port=port, timeout=TIMEOUT)
    try:
        res = (gather_case(rank) if case == "gather" else overflow_case(rank)
               if case == "overflow" else dp_case(rank) if case == "dp_empty" else
               sophia_case(rank) if case == "sophia" else
               swap_case(rank, case == "swap_sharded"))
    except Exception as e:  # noqa: BLE001
        res = {"crash": "".join(traceback.format_exception(e))[-3000:]}
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main()
