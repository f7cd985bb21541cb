"""mithril.distributed's edge cases side by side with torch.distributed's own tools:
``DistributedDataParallel(find_unused_parameters=True)`` with ``torch.optim`` SGD/AdamW,
``no_sync`` accumulation and ``clip_grad_norm_``; ``ZeroRedundancyOptimizer`` with
``add_param_group``, ``consolidate_state_dict`` and ``load_state_dict`` at another world size.

The 2-rank cases run in ``tests/dist_edges_worker.py`` (loopback gloo, joined by a file
``init_method``), every case with its torch peer in the same ranks; float64, the batch of 9
rows split 5/4. The one-process tests run here.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import dist_edges_worker as W  # noqa: E402
from test_distributed import run_ranks  # noqa: E402

from mithril.distributed import DataParallel, load_sharded, save_sharded  # noqa: E402
from mithril.errors import KeyMismatchError  # noqa: E402
from mithril.utils.optimizers import SGD, Adam  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "dist_edges_worker.py")
WORLD = 2
TOL = 1e-12


def _np(x: object) -> np.ndarray:
    return np.asarray(x.detach() if torch.is_tensor(x) else x, dtype=np.float64)


def _close(got: dict, want: dict, what: str = "", tol: float = TOL) -> None:
    for n in W.SHAPES:
        np.testing.assert_allclose(_np(got[n]), _np(want[n]), rtol=tol, atol=tol,
                                   err_msg=f"{what} {n}")


def _whole_batch_adam(steps: int) -> tuple[dict, torch.optim.Adam, dict, DataParallel, object]:
    """``steps`` steps of Adam at world size 1 (no process group), ours (``DataParallel``,
    sharded: its own path at world size 1) and torch's, on the same whole-batch gradients."""
    p0 = W.init_params()
    dp = DataParallel(Adam(W.LR), shard_state=True)
    p = {n: a.clone() for n, a in p0.items()}
    st = dp.init(p)
    net = W.Net(p0)
    topt = torch.optim.Adam(net.parameters(), lr=W.LR)
    for t in range(steps):
        p, st = dp.update(p, W.grads(p, t, 0, 1, skip=-1), st)
        topt.zero_grad(set_to_none=True)
        for q, g in zip(net.parameters(), W.grads(dict(net.named_parameters()), t, 0, 1,
                                                  skip=-1).values()):
            q.grad = g
        topt.step()
    return p, topt, dict(net.named_parameters()), dp, st


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[list[dict], str]:
    """Every case's results on both ranks, and the folder (a world-size-1 checkpoint of
    ours and torch's Adam state go in first, for the 1 -> 2 resume)."""
    folder = str(tmp_path_factory.mktemp("edges"))
    p, topt, tparams, dp, st = _whole_batch_adam(W.STEPS)
    save_sharded(os.path.join(folder, "ours"), p, dp, st)
    sd = topt.state_dict()
    with open(os.path.join(folder, "torch.json"), "w") as f:
        json.dump({"params": W.listed(tparams),
                   "group": {k: v for k, v in sd["param_groups"][0].items() if k != "params"},
                   "state": [{k: v.tolist() for k, v in sd["state"][i].items()}
                             for i in range(len(W.SHAPES))]}, f)
    out = os.path.join(folder, "out")
    init = os.path.join(folder, "init")
    results, logs = run_ranks(lambda r: [WORKER, str(r), str(WORLD), init, out], out, WORLD,
                              240, 30, "edges")
    for r, res in enumerate(results):
        if res is None:
            pytest.fail(f"rank {r} wrote nothing:\n{logs[r].decode()[-3000:]}")
    return results, folder


def _case(ranks: tuple[list[dict], str], name: str) -> list[dict]:
    got = [res.get(name, {"crashed": "the rank stopped before this case"}) for res in ranks[0]]
    for r, g in enumerate(got):
        assert "crashed" not in g, f"rank {r}: {g['crashed']}"
    return got


@pytest.mark.slow
def test_unused_on_one_rank_sgd_nesterov_clip_equals_ddp_and_zero(ranks) -> None:
    """``u`` reached on rank 0 only (counted as zero on rank 1, as DDP's
    ``find_unused_parameters``), ``b2`` reached on no rank at step 2 (left untouched: no
    momentum, no weight decay), uneven shares, clip_grad_norm_: both modes equal DDP +
    torch.optim.SGD and ZeroRedundancyOptimizer to 1e-12, on every rank."""
    got = _case(ranks, "unused")
    for r, g in enumerate(got):
        for k in ("mithril/False", "mithril/True", "zero"):
            _close(g[k], g["ddp"], f"rank {r} {k}")
    _close(got[0]["mithril/True"], got[1]["mithril/True"], "rank 0 vs 1", tol=0)


@pytest.mark.slow
def test_adamw_group_lr_changed_mid_run_equals_ddp_and_zero_add_param_group(ranks) -> None:
    """AdamW, the biases in a group of their own lr (ZeRO: ``add_param_group``) set to 0.02
    before step 2; the state sharded as ZeRO shards it (the same tensors per rank); ``b2``
    (in that group) reached on no rank at step SKIP: its own step count stays, as torch's
    ``state[p]['step']`` (DDP: on every rank; ZeRO and ours sharded: on its holder)."""
    got = _case(ranks, "adamw_groups")
    for r, g in enumerate(got):
        for k in ("mithril/False", "mithril/True", "zero"):
            _close(g[k], g["ddp"], f"rank {r} {k}")
        assert g["steps/ddp"] == {n: W.STEPS - (n == "b2") for n in W.SHAPES}, r
        assert g["missed/False"] == {"b2": 1}, r
        assert g["steps/zero"] == {n: W.STEPS - (n == "b2") for n in g["steps/zero"]}, r
        assert g["missed/True"] == ({"b2": 1} if "b2" in g["owned/True"] else {}), r
    assert got[0]["owned/True"] + got[1]["owned/True"] == list(W.SHAPES)
    assert sorted([*got[0]["steps/zero"], *got[1]["steps/zero"]]) == sorted(W.SHAPES)


@pytest.mark.slow
def test_accumulation_in_gradient_views_equals_ddp_no_sync(ranks) -> None:
    for r, g in enumerate(_case(ranks, "accumulate")):
        for k in ("mithril/False", "mithril/True"):
            _close(g[k], g["ddp"], f"rank {r} {k}")


@pytest.mark.slow
def test_a_rank_out_of_batches_equals_ddp_join(ranks) -> None:
    """Rank 1 has no batch at the last step and passes ``{}`` (its gradients count as
    zero, the mean over both ranks): equal to DDP under ``model.join()`` (SGD with
    momentum, AdamW), both modes, to 1e-12 on every rank."""
    for r, g in enumerate(_case(ranks, "join")):
        for name in ("sgd", "adamw"):
            for shard in (False, True):
                _close(g[f"{name}/mithril/{shard}"], g[f"{name}/ddp"],
                       f"rank {r} {name} shard={shard}")


@pytest.mark.slow
def test_zero_state_consolidated_equals_ours_loaded_at_world_one(ranks) -> None:
    """Sharded Adam at world size 2: each rank holds the state of the tensors ZeRO's rank
    holds; saved by ``save_sharded`` and loaded here at world size 1, every slot equals
    torch's ``consolidate_state_dict`` (exp_avg, exp_avg_sq, step); 2 more steps here equal
    torch.optim.Adam resumed from that consolidated state dict."""
    got = _case(ranks, "zero_state")
    for r, g in enumerate(got):
        _close(g["mithril"], g["zero"], f"rank {r} params")
        assert sorted(g["owned"]) == g["zero_held"]
    assert got[0]["state_bytes"] + got[1]["state_bytes"] == 16 * sum(
        int(np.prod(s)) for s in W.SHAPES.values())
    zs = got[0]["zero_state"]
    dp = DataParallel(Adam(W.LR), shard_state=True)
    p, st = load_sharded(os.path.join(ranks[1], "out.ckpt"), dp, backend="torch")
    assert st.step == W.STEPS and st.owned == tuple(W.SHAPES)
    _close(p, got[0]["zero"], "loaded params")
    for slot, key in (("m", "exp_avg"), ("v", "exp_avg_sq")):
        _close({n: a.numpy() for n, a in st.slot(slot).items()},
               {n: zs[n][key] for n in W.SHAPES}, f"slot {slot}")
    assert {zs[n]["step"] for n in W.SHAPES} == {float(W.STEPS)}
    net = W.Net({n: torch.tensor(v, dtype=torch.float64) for n, v in got[0]["zero"].items()})
    topt = torch.optim.Adam(net.parameters(), lr=W.LR)
    topt.load_state_dict({"param_groups": [{**topt.state_dict()["param_groups"][0]}],
                          "state": {i: {k: torch.tensor(v, dtype=torch.float64)
                                        for k, v in zs[n].items()}
                                    for i, n in enumerate(W.SHAPES)}})
    for t in range(W.STEPS, W.STEPS + 2):
        p, st = dp.update(p, W.grads(p, t, 0, 1, skip=-1), st)
        topt.zero_grad(set_to_none=True)
        for q, g in zip(net.parameters(), W.grads(dict(net.named_parameters()), t, 0, 1,
                                                  skip=-1).values()):
            q.grad = g
        topt.step()
    _close(p, dict(net.named_parameters()), "resumed at world size 1")


@pytest.mark.slow
def test_resume_world_one_into_two_equals_zero_load_state_dict(ranks) -> None:
    """A checkpoint saved here at world size 1, loaded by both ranks (each takes the slots
    of its own tensors) and 2 more steps: equal to ZeroRedundancyOptimizer loading
    torch.optim.Adam's world-size-1 state dict, and equal on both ranks."""
    got = _case(ranks, "resume_1to2")
    for r, g in enumerate(got):
        assert g["step"] == W.STEPS + 2
        _close(g["mithril"], g["zero"], f"rank {r}")
    assert got[0]["owned"] + got[1]["owned"] == list(W.SHAPES)
    _close(got[0]["mithril"], got[1]["mithril"], "rank 0 vs 1", tol=0)


@pytest.mark.slow
def test_fp16_sharded_refused_step_keeps_the_gradient_views(ranks) -> None:
    """float16, sharded, gradients accumulated in ``gradient_views`` (1 on rank 0, 2 on
    rank 1 for ``w``): rank 1's bad parameter makes every rank refuse, naming rank 1, and the
    views stay as they were, so the retry applies the mean, 1 - 0.25·1.5 = 0.625 (before the
    fix the refused step had divided the views by 2 in place: 0.8125)."""
    for r, g in enumerate(_case(ranks, "fp16_views")):
        assert g["refused"].startswith("ShapeError: ")
        assert ("rank 1 refused" in g["refused"]) == (r == 0)
        np.testing.assert_array_equal(g["views"]["w"], np.full((3, 2), 1.0 + r))
        np.testing.assert_array_equal(g["views"]["b"], np.full(4, 2.0 + r))
        np.testing.assert_array_equal(g["params"]["w"], np.full((3, 2), 1 - 0.25 * 1.5))
        np.testing.assert_array_equal(g["params"]["b"], np.full(4, 1 - 0.25 * 2.5))


@pytest.mark.slow
def test_jax_two_devices_equal_a_jitted_optax_step_on_the_mean_gradient(tmp_path) -> None:
    """JAX: ``make_sharded_train_step`` on 2 CPU devices, replicated and sharded state,
    equals a jitted optax step (adam; sgd with nesterov momentum and coupled weight decay)
    on the mean gradient over the same mesh, float64, to 1e-12; the batch of 15 rows runs
    replicated on both sides."""
    import subprocess

    out = str(tmp_path / "jax.npz")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_ENABLE_X64": "1",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    res = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__),
                                                       "jax_optax_peer_worker.py"), out],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    with np.load(out) as z:
        got = {k: z[k] for k in z.files}
    for name in ("adam", "sgd"):
        ref = {k.split("/", 2)[2]: v for k, v in got.items() if k.startswith(f"{name}/optax/")}
        assert len(ref) == 6 and all(v.dtype == np.float64 for v in ref.values())
        for shard in (False, True):
            for n, v in ref.items():
                np.testing.assert_allclose(got[f"{name}/{shard}/{n}"], v, rtol=TOL, atol=TOL,
                                           err_msg=f"{name} shard={shard} {n}")
            assert got[f"{name}/{shard}/split"].tolist() == [t != 3 for t in range(6)]
    # (the two optimizers moved the parameters apart: the steps did something)
    assert np.abs(got["adam/optax/mlp.linear_0.weight"]
                  - got["sgd/optax/mlp.linear_0.weight"]).max() > 1e-3


@pytest.mark.slow
def test_a_save_failing_on_one_rank_keeps_the_previous_checkpoint(ranks) -> None:
    """Rank 1's save fails while writing (a full disk), then while renaming its shard over
    the previous one (refused: a reader holds it open on Windows): both ranks raise the
    class of rank 1's error, the folder is byte for byte the step-1 checkpoint with no
    stray file, and it loads; before the fix a failed rename left rank 0's new shard next
    to rank 1's old one (load_sharded: "shard 1 disagrees with shard 0 on step"), and rank 0
    raised a RuntimeError saying "nothing changed"."""
    files = ["shard-00000-of-00002.safetensors", "shard-00001-of-00002.safetensors"]
    for r, g in enumerate(_case(ranks, "save_fails")):
        for phase, cls, text in (("write", "OSError", "No space left on device"),
                                 ("rename", "PermissionError", "Permission denied")):
            assert g[f"{phase}/error"].startswith(f"{cls}: "), g[f"{phase}/error"]
            assert text in g[f"{phase}/error"]
            assert ("rank 1 refused" in g[f"{phase}/error"]) == (r == 0)
            assert g[f"{phase}/disk_kept"] is True
            assert g[f"{phase}/files"] == files
            assert g[f"{phase}/loaded"] is True
        assert g["saved"] is True and g["files"] == files


@pytest.mark.slow
def test_jax_two_processes_equal_a_jitted_optax_step(tmp_path) -> None:
    """JAX, 2 processes joined by ``init_jax`` (jax.distributed), one CPU device each,
    sharded state over both: 4 Adam steps equal optax.adam on the whole batch's gradient
    (float64, 1e-12), and the gathered state counts 4 steps."""
    import subprocess

    from test_distributed import _free_port

    out = str(tmp_path / "jmp.npz")
    port = str(_free_port())
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_ENABLE_X64": "1"}
    env.pop("XLA_FLAGS", None)
    worker = os.path.join(os.path.dirname(__file__), "jax_multiprocess_optax_worker.py")
    procs = [subprocess.Popen([sys.executable, worker, str(r), port, out], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(2)]
    logs = []
    try:
        for q in procs:
            logs.append(q.communicate(timeout=240)[0].decode()[-3000:])
    finally:
        for q in procs:
            q.kill()
    assert all(q.returncode == 0 for q in procs), "\n".join(logs)
    with np.load(out) as z:
        got = {k: z[k] for k in z.files}
    ours = {k[5:]: v for k, v in got.items() if k.startswith("ours/")}
    assert len(ours) == 4 and int(got["ours_step"]) == 4 and got["split"].all()
    for n, v in ours.items():
        assert v.dtype == np.float64
        np.testing.assert_allclose(v, got[f"optax/{n}"], rtol=TOL, atol=TOL, err_msg=n)


# -- one process (fast) --------------------------------------------------------------------

@pytest.mark.parametrize("shard", [False, True])
def test_one_process_none_gradient_and_new_parameter(shard) -> None:
    """World size 1: a parameter whose gradient is None on a step (torch leaves ``.grad``
    None: SGD with momentum and weight decay skips it) equals torch.optim.SGD; a parameter
    not given to ``init`` (ZeRO's ``add_param_group`` has no counterpart) is refused by
    name, and the refused call changes nothing."""
    p0 = W.init_params()
    dp = DataParallel(SGD(W.LR, momentum=0.9, weight_decay=0.01), shard_state=shard)
    p = {n: a.clone() for n, a in p0.items()}
    st = dp.init(p)
    net = W.Net(p0)
    topt = torch.optim.SGD(net.parameters(), lr=W.LR, momentum=0.9, weight_decay=0.01)
    for t in range(W.STEPS):
        p, st = dp.update(p, W.grads(p, t, 0, 1), st)
        topt.zero_grad(set_to_none=True)
        for q, g in zip(net.parameters(), W.grads(dict(net.named_parameters()), t, 0, 1
                                                  ).values()):
            q.grad = g
        topt.step()
    _close(p, dict(net.named_parameters()), f"shard={shard}")
    before = {n: a.clone() for n, a in p.items()}
    step = st.step
    g = W.grads(p, 0, 0, 1)
    with pytest.raises(KeyMismatchError, match=r"unknown \['extra'\]"):
        dp.update({**p, "extra": torch.zeros(2, dtype=torch.float64)}, g, st)
    with pytest.raises(KeyMismatchError, match="extra"):
        dp.update(p, {**g, "extra": torch.zeros(2, dtype=torch.float64)}, st)
    assert st.step == step
    _close(p, before, "after the refusals", tol=0)


def test_one_process_checkpoint_slots_equal_torch_adam_state(tmp_path) -> None:
    """Sharded Adam at world size 1, saved and loaded: the slots equal torch.optim.Adam's
    exp_avg / exp_avg_sq after the same steps."""
    p, topt, tparams, dp, st = _whole_batch_adam(3)
    save_sharded(tmp_path / "c", p, dp, st)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p2, st2 = load_sharded(tmp_path / "c", DataParallel(Adam(W.LR), shard_state=True))
    _close(p2, tparams, "params")
    sd = topt.state_dict()["state"]
    for slot, key in (("m", "exp_avg"), ("v", "exp_avg_sq")):
        _close(st2.slot(slot), {n: sd[i][key].numpy() for i, n in enumerate(W.SHAPES)}, slot)


def test_one_process_failed_rename_keeps_the_checkpoint(tmp_path, monkeypatch) -> None:
    """World size 1: the rename of the new shard over the old one fails: the old shard,
    byte for byte, and no stray file; a file of a save killed mid-commit (the kept previous
    shard) is removed by the next save that works."""
    p, _, _, dp, st = _whole_batch_adam(1)
    folder = tmp_path / "c"
    save_sharded(folder, p, dp, st)
    shard = folder / "shard-00000-of-00001.safetensors"
    before = shard.read_bytes()
    p, st = dp.update(p, W.grads(p, 1, 0, 1, skip=-1), st)
    replace = os.replace

    def locked(src, dst) -> None:
        if ".pending-" in os.fspath(src) and ".pending-" not in os.fspath(dst):
            raise PermissionError(13, "Permission denied", os.fspath(dst))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", locked)
    with pytest.raises(PermissionError, match="Permission denied"):
        save_sharded(folder, p, dp, st)
    monkeypatch.setattr(os, "replace", replace)
    assert shard.read_bytes() == before and os.listdir(folder) == [shard.name]
    stale = folder / (shard.name + ".previous-0123456789abcdef")
    stale.write_bytes(before)
    save_sharded(folder, p, dp, st)
    assert os.listdir(folder) == [shard.name]
    assert load_sharded(folder, DataParallel(Adam(W.LR), shard_state=True))[1].step == 2
