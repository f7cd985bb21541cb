"""Data parallel on 2 gloo ranks (``tests/dist_hunt67b_worker.py``).

``gradient_views`` after a step: a replicated step leaves the mean over ranks there (what
DDP leaves in ``.grad``: the all-reduce runs in place), a sharded one what the rank wrote
(the reduce-scatter writes a buffer of its own), in every dtype and at every world size.
Before, a sharded float16 step left them divided by N (divided in place before the
reduce-scatter), and a sharded step in one process left them clipped (its receive buffer
is the send buffer). The params are torch.optim.SGD's on the mean gradient either way.

``scatter_state`` of a whole state made for other parameters (a ``b`` of shape (1,) where
the parameter is (4,)) on one rank: broadcast silently into the sharded state, and a refusal
came after ``dp.init``, on that rank only. Now every rank refuses before ``dp.init`` (a
``ShapeError`` naming the slot), and the right state then scatters as before.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import dist_hunt67b_worker as W  # noqa: E402
from test_hunt67_distributed import _run as run_ranks  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "dist_hunt67b_worker.py")


def _run(tmp_path, case: str) -> list[dict]:
    return run_ranks(tmp_path, case, WORKER)


def _torch_sgd(grads: dict[str, np.ndarray], clip: float | None, dtype: torch.dtype
               ) -> dict[str, np.ndarray]:
    net = torch.nn.ParameterDict({n: torch.nn.Parameter(torch.ones(s, dtype=dtype))
                                  for n, s in W.SHAPES.items()})
    for n, p in net.items():
        p.grad = torch.from_numpy(grads[n]).to(dtype)
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(list(net.values()), clip)
    torch.optim.SGD(net.parameters(), lr=W.LR).step()
    return {n: p.detach().double().numpy() for n, p in net.items()}


@pytest.mark.slow
def test_gradient_views_after_a_step_replicated_mean_sharded_as_written(tmp_path) -> None:
    ranks = _run(tmp_path, "views")
    g0, g1 = W.local_grads(0), W.local_grads(1)
    mean = {n: (g0[n] + g1[n]) / 2 for n in W.SHAPES}
    for r, res in enumerate(ranks):
        mine = W.local_grads(r)
        for key, got in res.items():
            dt, shard, clip = key.split("/")
            want = mine if shard == "True" else mean
            for n in W.SHAPES:
                np.testing.assert_array_equal(got["views"][n], want[n],
                                              err_msg=f"rank {r} {key} views {n}")
            tdt = torch.float16 if dt == "float16" else torch.float32
            ref = _torch_sgd(mean, None if clip == "None" else float(clip), tdt)
            tol = 1e-3 if dt == "float16" else 1e-6
            for n in W.SHAPES:
                np.testing.assert_allclose(got["params"][n], ref[n], rtol=0, atol=tol,
                                           err_msg=f"rank {r} {key} params {n}")


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_one_process_sharded_clip_leaves_the_views_as_written(dtype) -> None:
    """One process (no process group): the sharded step's receive buffer was the send
    buffer, so global-norm clipping scaled the caller's gradient views in place."""
    from mithril import distributed as dist
    from mithril.utils.optimizers import SGD

    g = W.local_grads(0)
    for shard in (False, True):
        p = {n: np.ones(s, dtype) for n, s in W.SHAPES.items()}
        dp = dist.DataParallel(SGD(W.LR, clip_norm=W.CLIP), shard_state=shard)
        st = dp.init(p)
        v = dp.gradient_views(st)
        for n in W.SHAPES:
            v[n][...] = g[n]
        p, st = dp.update(p, v, st)
        tdt = torch.float16 if dtype == "float16" else torch.float32
        ref = _torch_sgd(g, W.CLIP, tdt)
        for n in W.SHAPES:
            np.testing.assert_array_equal(v[n], g[n].astype(dtype), err_msg=f"{shard} {n}")
            np.testing.assert_allclose(np.asarray(p[n], np.float64), ref[n], rtol=0,
                                       atol=1e-3 if dtype == "float16" else 1e-6)


@pytest.mark.slow
def test_scatter_state_of_other_shapes_on_one_rank_refused_on_every_rank(tmp_path) -> None:
    ranks = _run(tmp_path, "scatter")
    for r, res in enumerate(ranks):
        for shard in ("False", "True"):
            got = res[shard]
            assert "retry" not in got, got.get("retry")
            ref = got["refused"]
            assert ref is not None, f"rank {r} shard={shard} took the state of other shapes"
            assert ref["type"] == "ShapeError", ref
            assert "slot" in ref["msg"] and "'b'" in ref["msg"], ref
            assert ("rank 1 refused" in ref["msg"]) == (r == 0), ref
            assert got["seconds"] < W.TIMEOUT / 2, got["seconds"]
            assert got["step"] == 4
            for n in got["m"]:
                np.testing.assert_array_equal(got["m"][n],
                                              np.full(W.SHAPES[n], 7.0 if n == "w" else 0.0))
                np.testing.assert_array_equal(got["v"][n],
                                              np.full(W.SHAPES[n], 3.0 if n == "b" else 0.0))
        assert sorted(res["True"]["m"]) == [["w"], ["b"]][r] and res["True"]["owned"] == [
            ["w"], ["b"]][r]


def test_scatter_state_checks_before_init_one_process() -> None:
    """One process: a state of other shapes (broadcastable) is refused naming the slot, and
    ``dp`` is left unbound (a later ``init`` of the right params works)."""
    from mithril import distributed as dist
    from mithril.distributed.full_state import scatter_state
    from mithril.errors import ShapeError
    from mithril.utils.optimizers import Adam

    params = {n: np.ones(s) for n, s in W.SHAPES.items()}
    other = Adam(0.1).init({"w": np.ones((1, 2)), "b": np.ones(4)})
    for shard in (False, True):
        dp = dist.DataParallel(Adam(0.1), shard_state=shard)
        with pytest.raises(ShapeError, match=r"slot '(m|v)' of 'w' has shape \(1, 2\)"):
            scatter_state(dp, other, params)
        with pytest.raises(TypeError, match="OptimizerState"):
            scatter_state(dp, {"m": 1}, params)
        full = Adam(0.1).init(params)
        full.slot("m")["w"][...] = 2.0
        st = scatter_state(dp, full, params)
        np.testing.assert_array_equal(st.slot("m")["w"], np.full((3, 2), 2.0))
