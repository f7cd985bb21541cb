"""Data-parallel training on 2 gloo ranks (``tests/dist_hunt67_worker.py``): a refusal that
only one rank can see must be a refusal on every rank, before any collective moves data.

An EMA swapped in for evaluation (``swap_ema``) on one rank, and ``update`` called without
swapping back: the wrapped optimizer refuses that, but ``DataParallel`` did not check it before
the step's collectives, so rank 0 raised alone while rank 1 applied the step (replicated: the
replicas silently one step apart) or waited in the all-gather until the timeout (sharded).
``gather_state`` likewise left the other ranks waiting in the gather. Now every rank raises
the ``ValueError`` at once, nothing changes, and after the swap back the run is one process's:
``torch.optim.Adam`` on the mean gradients and ``torch.optim.swa_utils.AveragedModel``'s EMA
(float64, 1e-12).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import dist_hunt67_worker as W  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "dist_hunt67_worker.py")
TOL = 1e-12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(tmp_path, case: str, worker: str = WORKER) -> list[dict]:
    """Run ``case`` of ``worker`` on 2 gloo ranks (90 s each at most); their JSON results."""
    out = str(tmp_path / case)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, worker, str(r), "2", port, out, case], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=90)[0].decode()[-3000:])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    res = []
    for r in range(2):
        path = f"{out}.{r}.json"
        assert os.path.exists(path), logs
        with open(path) as f:
            got = json.load(f)
        assert "crash" not in got, got["crash"]
        res.append(got)
    return res


def _torch_reference(steps: int) -> tuple[dict, dict, dict]:
    """torch.optim.Adam on the mean of the two ranks' gradients, with AveragedModel's EMA
    updated after every step: params, EMA, and the Adam state."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    net = torch.nn.ParameterDict({n: torch.nn.Parameter(torch.from_numpy(a))
                                  for n, a in W.init_params().items()})
    opt = torch.optim.Adam(net.parameters(), lr=W.LR)
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(W.DECAY))
    for t in range(steps):
        g0, g1 = W.grads(t, 0), W.grads(t, 1)
        for n, p in net.items():
            p.grad = torch.from_numpy((g0[n] + g1[n]) / 2)
        opt.step()
        ema.update_parameters(net)
    params = {n: p.detach().numpy() for n, p in net.items()}
    avg = {n: p.detach().numpy() for n, p in ema.module.items()}
    st = {n: opt.state[p] for n, p in net.items()}
    return params, avg, st


@pytest.mark.slow
@pytest.mark.parametrize("case", ["swap", "swap_sharded"])
def test_ema_swapped_in_on_one_rank_refuses_the_step_on_every_rank(tmp_path, case) -> None:
    ranks = _run(tmp_path, case)
    for r, got in enumerate(ranks):
        assert got["refused"] is not None, f"rank {r} applied the step rank 0 refused"
        assert got["refused"]["type"] == "ValueError", got["refused"]
        assert "swap" in got["refused"]["msg"], got["refused"]
        assert got["seconds"] < W.TIMEOUT / 2, got["seconds"]  # no wait for a timeout
        assert got["step_after_refusal"] == 1 and got["unchanged"], r
        assert "retry" not in got, got.get("retry")
        assert got["step"] == 2
    want, avg, _ = _torch_reference(2)
    for r, got in enumerate(ranks):
        for n in W.SHAPES:
            np.testing.assert_allclose(got["params"][n], want[n], rtol=0, atol=TOL,
                                       err_msg=f"rank {r} {n}")
        for n, e in got["ema"].items():  # (sharded: the EMA of the tensors it owns)
            np.testing.assert_allclose(e, avg[n], rtol=0, atol=TOL, err_msg=f"rank {r} ema {n}")
    assert sorted(n for g in ranks for n in g["ema"]) == sorted(
        W.SHAPES if case == "swap_sharded" else [*W.SHAPES, *W.SHAPES])


@pytest.mark.slow
def test_gather_state_refused_on_one_rank_raises_on_every_rank(tmp_path) -> None:
    ranks = _run(tmp_path, "gather")
    for r, got in enumerate(ranks):
        assert got["refused"] is not None and got["refused"]["type"] == "ValueError", (
            r, got["refused"])
        assert got["seconds"] < W.TIMEOUT / 2, got["seconds"]
        assert "retry" not in got, got.get("retry")
    full = ranks[0]
    assert full["step"] == 2 and "m" not in ranks[1]
    _, avg, st = _torch_reference(2)
    for n in W.SHAPES:
        np.testing.assert_allclose(full["m"][n], st[n]["exp_avg"].numpy(), rtol=0, atol=TOL)
        np.testing.assert_allclose(full["v"][n], st[n]["exp_avg_sq"].numpy(), rtol=0, atol=TOL)
        np.testing.assert_allclose(full["ema"][n], avg[n], rtol=0, atol=TOL)


@pytest.mark.slow
def test_results_overflowing_on_one_ranks_tensors_count_on_every_rank(tmp_path) -> None:
    """Sharded, "propagate": SGD's step overflows ``b`` (rank 1's) from finite gradients.
    One process counts it once in ``num_nonfinite`` (not again while the values stay
    non-finite) and warns; rank 0 used to count 0, warn nothing, and ``gather_state`` (and
    so the CLI's checkpoint) kept its 0. The first step's params are torch.optim.SGD's
    (-inf in ``b``)."""
    from mithril.utils.optimizers import SGD

    ranks = _run(tmp_path, "overflow")
    assert [g["owned"] for g in ranks] == [["w"], ["b"]]
    opt = SGD(W.OVERFLOW_LR)
    params = {n: np.ones(s) for n, s in W.OVERFLOW_SHAPES.items()}
    st = opt.init(params)
    want, warned = [], []
    for _ in range(2):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            params, st = opt.update(params, W.overflow_grads(), st)
        want.append([st.num_nonfinite, bool(st.nonfinite_values)])
        warned.append(sum("non-finite" in str(w.message) for w in seen))
    assert want == [[1, True], [1, True]] and warned == [1, 0]
    net = torch.nn.ParameterDict({n: torch.nn.Parameter(torch.ones(s, dtype=torch.float64))
                                  for n, s in W.OVERFLOW_SHAPES.items()})
    topt = torch.optim.SGD(net.parameters(), lr=W.OVERFLOW_LR)
    for n, p in net.items():
        p.grad = torch.from_numpy(W.overflow_grads()[n])
    topt.step()
    for r, got in enumerate(ranks):
        assert got["counts"] == want, f"rank {r}: {got['counts']}"
        assert got["warned"] == warned, f"rank {r} warned {got['warned']}"
        for n, p in net.items():
            np.testing.assert_array_equal(got["params"][n], p.detach().numpy())
    assert np.isneginf(ranks[0]["params"]["b"]).all()
    assert ranks[0]["gathered"] == 1


@pytest.mark.slow
def test_dp_sgd_with_a_rank_holding_no_example(tmp_path) -> None:
    """DP-SGD on 2 ranks where rank 1 has no example at a step (0 rows; ``{}``, a rank out of
    batches) and rank 0 has some: the step one process takes on the whole batch (noise
    included), and without noise optax.contrib.dpsgd's. It was refused on every rank
    ("per-example gradients of an empty batch"), so such a run could not train. A step with
    no example on any rank is still refused, on every rank, nothing changed."""
    import jax
    import optax

    from mithril.utils.optimizers import DPSGD

    ranks = _run(tmp_path, "dp_empty")
    whole = [{n: np.concatenate([W.dp_examples(t, r)[n] for r in range(2)
                                 if W.dp_examples(t, r)], axis=0) for n in W.DP_SHAPES}
             for t in range(len(W.DP_ROWS))]
    for noise in (1.1, 0.0):
        opt = DPSGD(W.DP_LR, l2_norm_clip=W.DP_CLIP, noise_multiplier=noise, seed=W.DP_SEED)
        params = {n: np.zeros(s) for n, s in W.DP_SHAPES.items()}
        st = opt.init(params)
        want = []
        for g in whole:
            params, st = opt.update(params, g, st)
            want.append({n: np.array(a) for n, a in params.items()})
        for r, res in enumerate(ranks):
            got = res[str(noise)]
            assert "error" not in got, got["error"]
            for t, step in enumerate(got["steps"]):
                for n in W.DP_SHAPES:
                    np.testing.assert_allclose(step[n], want[t][n], rtol=0, atol=TOL,
                                               err_msg=f"rank {r} noise {noise} step {t} {n}")
            assert got["all_empty"]["type"] == "ShapeError", got["all_empty"]
            assert "empty batch" in got["all_empty"]["msg"]
            assert got["unchanged"] and got["count"] == len(W.DP_ROWS)
    jax.config.update("jax_enable_x64", True)
    tx = optax.contrib.dpsgd(W.DP_LR, W.DP_CLIP, 0.0, seed=W.DP_SEED)
    params = {n: jax.numpy.zeros(s, dtype="float64") for n, s in W.DP_SHAPES.items()}
    ost = tx.init(params)
    for t, g in enumerate(whole):
        upd, ost = tx.update({n: jax.numpy.asarray(a) for n, a in g.items()}, ost, params)
        params = optax.apply_updates(params, upd)
        for r, res in enumerate(ranks):
            for n in W.DP_SHAPES:
                np.testing.assert_allclose(res["0.0"]["steps"][t][n], np.asarray(params[n]),
                                           rtol=0, atol=TOL, err_msg=f"optax rank {r} {t} {n}")


@pytest.mark.slow
def test_sophia_folds_the_mean_of_the_ranks_estimates(tmp_path) -> None:
    """Sophia on 2 ranks, each with the gradients and the Hessian-diagonal estimate of its
    share: ``dp.update_hessian`` folds their mean in on every rank (replicated and sharded),
    which is optax.contrib.sophia fed the mean gradients and mean estimates. Before there was
    no such method: each rank folded its own estimate into its own state (the replicas
    drifted apart silently; sharded, its state refused the other tensors). A bad estimate
    on one rank is refused on every rank."""
    from test_sophia import optax_run

    grads, hs = [], []
    for t in range(W.SOPHIA_STEPS):
        (g0, h0), (g1, h1) = W.sophia_inputs(t, 0), W.sophia_inputs(t, 1)
        grads.append({n: (g0[n] + g1[n]) / 2 for n in W.SHAPES})
        if t % W.SOPHIA_EVERY == 0:
            hs.append({n: (h0[n] + h1[n]) / 2 for n in W.SHAPES})
    want = optax_run({"update_interval": W.SOPHIA_EVERY}, W.init_params(), grads, hs,
                     W.SOPHIA_LR)
    ranks = _run(tmp_path, "sophia")
    for r, res in enumerate(ranks):
        for shard in ("False", "True"):
            got = res[shard]
            assert got["used"] == len(hs) == 3
            for t, step in enumerate(got["steps"]):
                for n in W.SHAPES:
                    np.testing.assert_allclose(step[n], want[t][n], rtol=0, atol=TOL,
                                               err_msg=f"rank {r} sharded={shard} {t} {n}")
            assert got["refused"]["type"] == "ShapeError", got["refused"]
            assert "estimate['w']" in got["refused"]["msg"]


@pytest.mark.parametrize("opt", ["schedule-free-adamw", "schedule-free-sgd"])
def test_cli_schedule_free_with_shard_state_exits_2_before_starting(tmp_path, capsys,
                                                                   monkeypatch, opt) -> None:
    """``mithril train --nprocs 2 --shard-state --optimizer schedule-free-adamw`` ran and
    evaluated / saved the training point y where one process (and ``--nprocs 2`` without
    ``--shard-state``) measures and saves the averaged x: on the digits task its final
    test loss was 1.4410 against one process's 1.4691. Refused now, as ``--ema`` with
    ``--shard-state`` (each process holds z of its own share only)."""
    from mithril.cli import main

    monkeypatch.setattr("mithril.cli.train.launch", lambda *a: pytest.fail("launched"))
    with pytest.raises(SystemExit) as e:
        main(["train", "--epochs", "1", "--no-progress", "--optimizer", opt, "--nprocs", "2",
              "--shard-state", "--out", str(tmp_path / "run")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--shard-state" in err and "schedule-free" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
