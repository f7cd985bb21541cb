"""Review of ``mithril.distributed`` side by side with torch's ``DistributedDataParallel``,
``ZeroRedundancyOptimizer`` and JAX ``shard_map`` + optax (``tests/dist_review47_worker.py``
runs the ranks: 2 gloo processes, float64; the JAX peer a process with 2 CPU devices).

Found: a setting differing between the ranks was accepted. Replicated, the replicas drifted
apart silently (``Adam(1e-3)`` on rank 0, ``Adam(1e-2)`` on rank 1: after 3 steps ``w[0, 0]``
was -0.00269 on rank 0 and -0.0269 on rank 1; DDP is as silent); sharded, a non-finite
policy differing made the ranks run different collectives: a ``PeerError`` only after the
whole timeout, the process group then unusable. Now every rank compares every setting at
``init`` and, through three digests in the step's first all-reduce, at every step (a
scheduler stepped on one rank only): a ``ValueError`` naming the setting on every rank,
nothing changed.

The rest equals the peers: SGD with momentum, AdamW and Adafactor with a bias group, a
StepLR, global-norm clipping, accumulation over micro-batches, an uneven last batch, a NaN
on one rank (every rank skips), ZeRO's consolidated state against our checkpoint loaded at
world 1, resumes 2 -> 1 and 1 -> 2, and JAX's sharded step against shard_map + optax.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import dist_review47_worker as W  # noqa: E402
from test_distributed import _free_port, run_ranks  # noqa: E402

from mithril.distributed import DataParallel, load_sharded, save_sharded  # noqa: E402
from mithril.distributed.agreement import settings, settings_votes  # noqa: E402
from mithril.utils.lr_schedulers import StepLR  # noqa: E402
from mithril.utils.optimizers import Adam, AdamW  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "dist_review47_worker.py")
TOL = 1e-12


def _launch(job: str, folder: str, deadline: float) -> list[dict]:
    port, out = _free_port(), os.path.join(folder, job)
    results, logs = run_ranks(lambda r: [WORKER, job, str(r), "2", str(port), out, folder],
                              out, 2, deadline, 20, job)
    for r, res in enumerate(results):
        if res is None:
            pytest.fail(f"rank {r} wrote nothing:\n{logs[r].decode()[-3000:]}")
    return results


def _case(results: list[dict], name: str) -> list[dict]:
    for r, res in enumerate(results):
        assert "crashed" not in res[name], f"rank {r}: {res[name]['crashed']}"
    return [res[name] for res in results]


def _close(got: dict, want: dict, what: str, tol: float = TOL) -> None:
    for n in W.SHAPES:
        np.testing.assert_allclose(np.asarray(got[n]), np.asarray(want[n]), rtol=tol,
                                   atol=tol, err_msg=f"{what} {n}")


# -- one process -----------------------------------------------------------------------------

def test_settings_are_those_given_not_the_groups_a_rank_matched() -> None:
    """What the ranks compare is the same on ranks holding different tensors: a group given
    by a callable is named, not listed by the tensors it matched at this rank's ``init``
    (``hyperparameters()`` lists those, which differ between sharded ranks); a setting
    changed on one rank changes the digest."""
    def make() -> AdamW:
        return AdamW(0.1, param_groups=[{"params": lambda n: n.startswith("b"),
                                         "learning_rate": 0.01}])

    a, b = make(), make()
    a.init({"w": np.zeros(3)})  # (sharded: rank 0 holds w, rank 1 b)
    b.init({"b": np.zeros(3)})
    assert a.hyperparameters()["param_groups"] != b.hyperparameters()["param_groups"]
    assert settings(a) == settings(b) and settings_votes(a) == settings_votes(b)
    assert settings(a)["AdamW.param_groups"][0]["params"].endswith("<lambda>")
    a.learning_rate = 0.2
    assert settings(a)["AdamW.learning_rate"] == 0.2
    assert settings_votes(a) != settings_votes(b)


# -- 2 ranks, default suite -------------------------------------------------------------------

@pytest.fixture(scope="module")
def fast(tmp_path_factory) -> list[dict]:
    return _launch("fast", str(tmp_path_factory.mktemp("fast")), 120)


def test_a_setting_differing_between_ranks_is_refused_on_every_rank(fast) -> None:
    """At init (beta2) and in the middle of a run (a learning rate set on rank 0 only; a
    non-finite policy on rank 1 only: the ranks would run different collectives): every
    rank raises a ValueError naming it at once (not after the 20 s timeout), the state and
    params are as before, and the run goes on equal to one process's."""
    g = [{n: np.full(s, 0.1 * (r + 1)) for n, s in W.SHAPES.items()} for r in range(2)]
    mean = {n: (g[0][n] + g[1][n]) / 2 for n in W.SHAPES}
    for shard in (False, True):
        opt = Adam(W.LR, nonfinite="skip")
        p = {n: v.numpy() for n, v in W.init_params().items()}
        st = opt.init(p)
        for _ in range(2):
            p, st = opt.update(p, mean, st)
        key = f"shard={shard}"
        for r, got in enumerate(_case(fast, "settings")):
            assert got[f"{key}/init"] == ("ValueError: DataParallel: rank 1 has Adam.beta2=0.99, "
                                          "rank 0 0.999 (every rank must use the same settings)")
            assert got[f"{key}/lr"].startswith("ValueError: DataParallel.update: rank 1 has "
                                               "Adam.learning_rate=0.05, rank 0 0.1")
            assert got[f"{key}/policy"].startswith("ValueError: DataParallel.update: rank 1 "
                                                   "has Adam.nonfinite='raise', rank 0 'skip'")
            for what in ("lr", "policy"):
                assert got[f"{key}/{what}/unchanged"] is True, (r, key, what)
                assert got[f"{key}/{what}/seconds"] < 10, (r, key, what)
            assert got[f"{key}/step"] == 2
            _close(got[f"{key}/params"], p, f"rank {r} {key}")


def test_a_bad_input_on_one_rank_is_refused_on_every_rank(fast) -> None:
    """A gradient of the wrong shape, then params with a renamed key, on rank 1 only: rank 1
    raises its own error, rank 0 one of the same class naming rank 1; params, state and the
    gradient views accumulated in are as before."""
    for r, got in enumerate(_case(fast, "atomic")):
        for shard in (False, True):
            prefix = "" if r else "DataParallel.update: rank 1 refused, so every rank did " \
                                  "(nothing changed): "
            assert got[f"{shard}/shape"] == (f"ShapeError: {prefix}gradients['w1'] has shape "
                                             f"(4, 5) but the parameter has shape (5, 4) "
                                             f"(as at init)")
            assert got[f"{shard}/names"] == (f"KeyMismatchError: {prefix}params must hold "
                                             f"exactly the parameters of init: missing "
                                             f"['w2'], unknown ['w3']")
            assert got[f"{shard}/shape/unchanged"] and got[f"{shard}/names/unchanged"]


# -- 2 ranks against DDP and ZeroRedundancyOptimizer (slow) ----------------------------------

@pytest.fixture(scope="module")
def slow(tmp_path_factory) -> tuple[list[dict], str]:
    """The world-1 checkpoint the ranks resume from (1 -> 2) is written here first."""
    folder = str(tmp_path_factory.mktemp("slow"))
    dp, p, st, sched = _alone()
    for t in range(W.SAVE_AT):
        p, st = dp.update(p, W.whole_batch_grads(p, t), st)
        sched.step()
    save_sharded(os.path.join(folder, "one"), p, dp, st)
    return _launch("slow", folder, 300), folder


def _alone() -> tuple:
    dp = DataParallel(W.ours("adamw"), True)
    p = W.init_params()
    return dp, p, dp.init(p), StepLR(dp.optimizer, 2, W.GAMMA)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(W.MAKERS))
def test_both_modes_equal_ddp_and_zero(slow, name) -> None:
    """Groups, StepLR, clipping by the global norm, accumulation, an uneven last batch: the
    params and the norms each rank reports equal DDP + torch.optim's and ZeRO's; both ranks
    hold the very same params; each tensor's state is on one rank."""
    results, _ = slow
    got = _case(results, name)
    for r, g in enumerate(got):
        for kind in ("ours/False", "ours/True", "zero"):
            _close(g[kind]["params"], g["ddp"]["params"], f"rank {r} {kind}")
            np.testing.assert_allclose(g[kind]["norms"], g["ddp"]["norms"], rtol=TOL)
    for kind in ("ours/False", "ours/True"):
        assert got[0][kind]["params"] == got[1][kind]["params"]
    assert sorted(got[0]["ours/True"]["owned"] + got[1]["ours/True"]["owned"]) == sorted(W.SHAPES)
    first = W.init_params()  # (the steps moved the params)
    assert max(np.abs(np.asarray(got[0]["ddp"]["params"][n]) - first[n].numpy()).max()
               for n in W.SHAPES) > 1e-2


@pytest.mark.slow
def test_a_nan_on_one_rank_is_skipped_by_every_rank_as_ddp(slow) -> None:
    """Rank 1's gradient holds a NaN at step NAN_AT (nonfinite='skip'): both ranks skip it
    (one skipped step, 5 counted), as DDP whose averaged gradient then holds the NaN and
    whose step is skipped on a non-finite norm; the params equal DDP's on both ranks."""
    results, _ = slow
    for r, g in enumerate(_case(results, "nan")):
        assert np.isnan(g["ddp"]["norms"][W.NAN_AT])
        for shard in (False, True):
            mine = g[f"ours/{shard}"]
            assert (mine["skipped"], mine["step"]) == (1, W.STEPS - 1), (r, shard)
            assert np.isnan(mine["norms"][W.NAN_AT])
            _close(mine["params"], g["ddp"]["params"], f"rank {r} shard={shard}")


@pytest.mark.slow
def test_checkpoints_across_world_sizes_equal_zero(slow) -> None:
    """Saved on 2 ranks before step SAVE_AT and loaded at world 1: the slots equal ZeRO's
    state consolidated at the same step, and the run resumed on the whole batch equals the
    unbroken runs; loaded on 2 ranks from a world-1 checkpoint, the same."""
    results, folder = slow
    got = _case(results, "ckpt")
    zero = got[0]["zero"]
    dp = DataParallel(W.ours("adamw"), True)
    p, st = load_sharded(os.path.join(folder, "two"), dp, backend="torch")
    assert st.step == W.SAVE_AT
    for n in W.SHAPES:
        state = zero["consolidated"][n]
        assert state["step"] == W.SAVE_AT
        for ours, theirs in (("m", "exp_avg"), ("v", "exp_avg_sq")):
            np.testing.assert_allclose(st.slot(ours)[n].numpy(), state[theirs], rtol=TOL,
                                       atol=TOL, err_msg=f"{ours} {n}")
    assert zero["consolidated_lrs"] == [W.LR * W.GAMMA, W.LR_B * W.GAMMA]
    sched = StepLR(dp.optimizer, 2, W.GAMMA)
    for _ in range(W.SAVE_AT):
        sched.step()
    for t in range(W.SAVE_AT, W.STEPS):
        p, st = dp.update(p, W.whole_batch_grads(p, t), st)
        sched.step()
    _close(W.listed(p), zero["params"], "2 -> 1")
    for r, g in enumerate(got):
        _close(g["ours"]["params"], zero["params"], f"rank {r} unbroken")
        _close(g["from_one"]["params"], zero["params"], f"rank {r} 1 -> 2")
        assert g["from_one"]["step"] == W.STEPS


@pytest.mark.slow
def test_jax_sharded_step_equals_shard_map_and_optax(tmp_path) -> None:
    """2 CPU devices, float64: ``make_sharded_train_step`` (state replicated and sharded)
    with AdamW and Lion, a bias group, a StepLR and clipping, equals shard_map's per-device
    gradients averaged by ``lax.pmean`` and the optax chain, to 1e-12; the batch of 15 rows
    runs replicated on both sides."""
    out = str(tmp_path / "jax.npz")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_ENABLE_X64": "1",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    res = subprocess.run([sys.executable, WORKER, "jax", out], env=env, capture_output=True,
                         text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-4000:]
    with np.load(out) as z:
        got = {k: z[k] for k in z.files}
    for name in ("adamw", "lion"):
        ref = {k.split("/", 2)[2]: v for k, v in got.items() if k.startswith(f"{name}/optax/")}
        assert len(ref) == 6 and all(v.dtype == np.float64 for v in ref.values())
        for shard in (False, True):
            for n, v in ref.items():
                np.testing.assert_allclose(got[f"{name}/{shard}/{n}"], v, rtol=TOL, atol=TOL,
                                           err_msg=f"{name} shard={shard} {n}")
            assert got[f"{name}/{shard}/split"].tolist() == [t != W.JAX_ODD
                                                             for t in range(W.JAX_STEPS)]
    assert np.abs(got["adamw/optax/mlp.linear_0.weight"]
                  - got["lion/optax/mlp.linear_0.weight"]).max() > 1e-3
