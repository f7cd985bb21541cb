"""mithril.distributed side by side with its torch peers: ``DistributedDataParallel``,
``ZeroRedundancyOptimizer`` and plain ``torch.optim`` on the whole batch.

The multi-process tests run 3 ranks on loopback gloo (``tests/dist_peer_worker.py``, the
batch of 10 rows split 4/3/3), every case with its torch peer in the same ranks; the
whole-batch torch references run here. The one-process tests take the sharded step's own
path (``shard_state=True`` with a world of one).
"""

from __future__ import annotations

import os
import sys
import warnings

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import dist_peer_worker as W  # noqa: E402
from test_distributed import _free_port, run_ranks  # noqa: E402

from mithril.distributed import DataParallel  # noqa: E402
from mithril.utils.optimizers import Adam  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "dist_peer_worker.py")
WORLD = 3


def _close(got: dict, want: dict, tol: float = 1e-12, what: str = "") -> None:
    for n in W.SHAPES:
        np.testing.assert_allclose(np.array(got[n]), np.asarray(want[n]), rtol=tol, atol=tol,
                                   err_msg=f"{what} {n}")


def _torch_params(net: torch.nn.Module) -> dict[str, np.ndarray]:
    return {n: a.detach().numpy() for n, a in net.named_parameters()}


@pytest.fixture(scope="module")
def peers(tmp_path_factory) -> list[dict]:
    """Every case's results on each of the 3 ranks (the ranks stop by themselves: each
    collective has a 10 s timeout; what outlives the deadline is killed)."""
    out = str(tmp_path_factory.mktemp("peers") / "out")
    port = _free_port()
    results, logs = run_ranks(lambda r: [WORKER, str(r), str(WORLD), str(port), out], out,
                              WORLD, 240, 10, "peers")
    for r, res in enumerate(results):
        if res is None:
            pytest.fail(f"rank {r} wrote nothing:\n{logs[r].decode()[-3000:]}")
    return results


def _case(peers: list[dict], name: str) -> list[dict]:
    got = [res.get(name, {"crashed": "the rank stopped before this case"}) for res in peers]
    for r, g in enumerate(got):
        assert "crashed" not in g, f"rank {r}: {g['crashed']}"
    return got


# -- peers on 3 ranks ----------------------------------------------------------------------

@pytest.mark.slow
def test_groups_clipping_scheduler_equal_ddp_and_zero(peers) -> None:
    """Two learning rates (groups), clipping by the global norm and a StepLR on every group,
    replicated and sharded over 3 uneven shares: the params equal DDP's, ZeRO's and one
    torch process's on the whole batch; the norm each rank reports is the whole batch's."""
    net = W.Net(W.init_params())
    opt = torch.optim.Adam([{"params": [net.w1, net.w2]}, {"params": [net.b1, net.b2],
                                                            "lr": 0.01}], lr=W.LR)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    norms = []
    for t in range(W.STEPS):
        opt.zero_grad()
        net(*W.batch(t)).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(net.parameters(), W.CLIP)))
        opt.step()
        sched.step()
    ref = _torch_params(net)
    owned = []
    for r, got in enumerate(_case(peers, "parity")):
        for kind in ("mithril/False", "mithril/True", "ddp", "zero"):
            _close(got[kind]["params"], ref, what=f"rank {r} {kind}")
            np.testing.assert_allclose(got[kind]["norms"], norms, rtol=1e-13)
        _close(got["mithril/True"]["params"], got["zero"]["params"], what=f"rank {r}")
        owned += got["mithril/True"]["owned"]
    assert sorted(owned) == sorted(W.SHAPES)  # each tensor's state on one rank


@pytest.mark.slow
def test_nonfinite_raise_on_one_rank_changes_nothing(peers) -> None:
    """A NaN gradient on the last rank only, nonfinite='raise': every rank raises, and the
    state reads as before the call, sharded too (the sharded step had recorded the NaN norm
    and a skipped step); the run then equals DDP's with clip_grad_norm_(error_if_nonfinite)
    refusing that step."""
    for r, got in enumerate(_case(peers, "raise")):
        ddp = got["ddp"]
        assert "error" in ddp and len(ddp["norms"]) == W.STEPS - 1
        for shard in (False, True):
            mine = got[f"mithril/{shard}"]
            assert mine["error"].startswith("FloatingPointError: Adam: non-finite gradient")
            prev = ddp["norms"][W.BAD - 1]
            assert mine["after"][:2] == pytest.approx([prev, prev], rel=1e-13), (r, shard)
            assert mine["after"][2:] == [False, W.BAD, 0], (r, shard)
            np.testing.assert_allclose(mine["norms"], ddp["norms"], rtol=1e-13)
            _close(mine["params"], ddp["params"], what=f"rank {r} shard={shard}")


@pytest.mark.slow
def test_skip_returns_the_params_given(peers) -> None:
    """nonfinite='skip' with params projected before every step: the skipped step returns
    the projected params it was given, as ZeroRedundancyOptimizer leaves them (the sharded
    step returned the last step's output), and every step equals the peer's."""
    for r, got in enumerate(_case(peers, "skip")):
        for shard in (False, True):
            mine = got[f"mithril/{shard}"]
            assert mine["skipped"] == 1
            for t in range(W.STEPS):
                _close(mine["steps"][t], got["zero"]["steps"][t],
                       what=f"rank {r} shard={shard} step {t}")


@pytest.mark.slow
def test_refused_step_keeps_accumulated_gradient_views(peers) -> None:
    """Micro-batches accumulated in gradient_views (DDP: no_sync): a step refused because
    rank 1's params are wrong raises on every rank naming rank 1, leaves the views as they
    were (the replicated step had all-reduced them in place: the retry then stepped with
    the sum, not the mean) and the retried run equals DDP's."""
    for r, got in enumerate(_case(peers, "views")):
        for shard in (False, True):
            mine = got[f"mithril/{shard}"]
            assert mine["refused"].startswith("ShapeError: ")
            assert "params['w1'] has shape (2, 2)" in mine["refused"]
            assert ("rank 1 refused" in mine["refused"]) == (r != 1)
            assert mine["views_kept"] is True and mine["step_kept"] == 1
            _close(mine["params"], got["ddp"]["params"], what=f"rank {r} shard={shard}")


@pytest.mark.slow
def test_create_graph_gradients_equal_ddp(peers) -> None:
    """Gradients that require grad (create_graph=True) step as DDP's plain ones (packing
    them raised torch's in-place-on-a-leaf RuntimeError)."""
    for r, got in enumerate(_case(peers, "create_graph")):
        for shard in (False, True):
            assert isinstance(got[f"mithril/{shard}"], dict), got[f"mithril/{shard}"]
            _close(got[f"mithril/{shard}"], got["ddp"], what=f"rank {r} shard={shard}")


@pytest.mark.slow
def test_float16_mean_that_fits_where_the_sum_does_not(peers) -> None:
    """float16 gradients of 30000 on each of 3 ranks: the mean fits float16, their sum does
    not. The replicated step divides before it sums, as DDP, and gives DDP's and one
    process's step (it gave -inf params)."""
    net = torch.nn.Linear(4, 1, bias=False).to(torch.float16)
    with torch.no_grad():
        net.weight.fill_(1.0)
    opt = torch.optim.SGD(net.parameters(), lr=1e-5)
    net(torch.full((1, 4), 30000.0, dtype=torch.float16)).sum().backward()
    opt.step()
    ref = net.weight.detach().float().reshape(-1).tolist()
    from mithril.utils.optimizers import SGD  # one process of ours: it rounds 1 − 0.3 once

    ours = SGD(1e-5)
    p = {"w": torch.ones(4, dtype=torch.float16)}
    p, _ = ours.update(p, {"w": torch.full((4,), 30000.0, dtype=torch.float16)}, ours.init(p))
    mine = p["w"].float().tolist()
    assert np.isfinite(ref).all() and ref[0] != 1.0
    np.testing.assert_allclose(mine, ref, atol=1e-3)  # (torch rounds lr·g to float16 first)
    for got in _case(peers, "float16"):
        assert got["ddp"] == ref and got["mithril"] == mine
        assert got["norm"] == 60000.0  # the mean's norm, ‖(30000,)·4‖
        assert got["sharded"] == mine and got["sharded_norm"] == 60000.0  # (it was -inf)


@pytest.mark.slow
def test_a_rank_holding_no_tensor_follows_the_others_refusal(peers) -> None:
    """ZeRO with more ranks than tensors: results overflowing on every tensor were reported
    as ranks diverging (the empty rank voted 'applied'), and its step count moved on alone
    (a later load_sharded refused the checkpoint). Now every rank skips or raises alike, as
    one process does, and the next step runs everywhere."""
    from mithril.utils.optimizers import SGD

    one = SGD(0.5)
    p = {"a": torch.ones(3, dtype=torch.float64), "b": torch.ones(2, dtype=torch.float64)}
    p, st = one.update(p, {k: torch.ones_like(v) for k, v in p.items()}, one.init(p))
    want = {k: v.tolist() for k, v in p.items()}
    got = _case(peers, "empty_rank")
    assert sorted(len(g["skip"]["owned"]) for g in got) == [0, 1, 1]
    for g in got:
        skip, raised = g["skip"], g["raise"]
        assert skip["params"] == {"a": [1.0] * 3, "b": [1.0] * 2}  # the params given
        assert (skip["step"], skip["skipped"], skip["last_skipped"]) == (0, 1, True)
        assert "FloatingPointError" in raised["error"] and raised["step"] == 0
        assert raised["skipped"] == 0
        for r in (skip, raised):
            assert r["after"] == want and r["step_after"] == 1


@pytest.mark.slow
def test_init_refused_on_one_rank_raises_on_every_rank(peers) -> None:
    """``init`` called again with another rank or world size is refused (it was silently
    ignored). Rank 1 alone passes a float32 parameter: every rank raises a TypeError naming it
    (the others named rank 1) within a second, where they had waited for rank 1 in a
    collective until a PeerError."""
    for r, got in enumerate(_case(peers, "init_refused")):
        # init again: a no-op with this rank's own arguments, refused with others
        assert got[f"again{(r, WORLD)}"] == "accepted"
        assert got[f"again{(r, WORLD + 1)}"] == (
            f"ValueError: init: world_size={WORLD + 1}, but this process already joined a "
            f"process group as rank {r} of {WORLD}")
        assert got[f"again{((r + 1) % WORLD, WORLD)}"].startswith(
            f"ValueError: init: rank={(r + 1) % WORLD}, but")
        for shard in (False, True):
            msg = got[str(shard)]
            assert msg.startswith("TypeError: "), msg
            assert "float32: ['b1']" in msg and ("rank 1 refused" in msg) == (r != 1)
            assert got[f"{shard}/seconds"] < 5


@pytest.mark.slow
def test_broadcast_params_refuses_mismatch_then_equals_ddp(peers) -> None:
    """broadcast_params with rank 1's 'w1' of another shape (same size), or 'b1' of another
    dtype, or a read-only NumPy 'b2': a ValueError on every rank naming the parameter (and rank
    1), nothing overwritten (before: rank 0's bytes silently reshaped, or gloo aborted the
    process, or the read-only array written). Then every rank holds rank 0's params, as
    DDP's constructor gives."""
    rank0 = {n: a.numpy() for n, a in W.init_params(seed=0).items()}
    for got in _case(peers, "broadcast"):
        for case, name in (("shape", "w1"), ("dtype", "b1")):
            assert got[case].startswith(f"ValueError: broadcast_params: the ranks' parameters "
                                        f"differ, first at parameter {list(W.SHAPES).index(name)}"
                                        f" '{name}'"), got[case]
            assert "rank 1 has" in got[case] and got[case + "/kept"] is True
        assert got["readonly"].startswith("ValueError: ") and got["readonly/kept"] is True
        assert "params['b2'] is a read-only NumPy array" in got["readonly"]
        np.testing.assert_array_equal(np.array(got["mithril"]["w1"]), rank0["w1"])
        for n in W.SHAPES:
            np.testing.assert_array_equal(np.array(got["mithril"][n]), np.array(got["ddp"][n]))


# -- one process: the sharded step's own path -------------------------------------------------

def test_one_process_sharded_raise_keeps_the_reported_norm() -> None:
    """nonfinite='raise' sharded: the refused step leaves last_grad_norm and
    last_step_skipped as after the last applied step (torch's clip_grad_norm_ with
    error_if_nonfinite refuses alike), and the run continues as torch.optim.Adam's."""
    dp = DataParallel(Adam(W.LR, clip_norm=W.CLIP, nonfinite="raise"), shard_state=True)
    p = W.init_params()
    st = dp.init(p)
    net = W.Net(W.init_params())
    opt = torch.optim.Adam(net.parameters(), lr=W.LR)
    prev = None
    for t in range(W.STEPS):
        x, y = W.batch(t)
        if t == W.BAD:
            x[0, 0] = float("nan")
        opt.zero_grad()
        net(x, y).backward()
        try:
            norm = float(torch.nn.utils.clip_grad_norm_(net.parameters(), W.CLIP,
                                                        error_if_nonfinite=True))
            opt.step()
        except RuntimeError:
            norm = None
        if norm is None:
            with pytest.raises(FloatingPointError, match="non-finite gradient"):
                dp.update(p, W.grads(p, x, y), st)
            assert st.last_grad_norm == pytest.approx(prev, rel=1e-13)
            assert st.local.last_grad_norm == pytest.approx(prev, rel=1e-13)
            assert (st.last_step_skipped, st.step, st.num_skipped) == (False, t, 0)
            continue
        p, st = dp.update(p, W.grads(p, x, y), st)
        assert st.last_grad_norm == pytest.approx(norm, rel=1e-13)
        prev = norm
    _close(W.listed(p), _torch_params(net))


def test_one_process_sharded_skip_returns_the_params_given() -> None:
    """nonfinite='skip' sharded with params projected before every step: the skipped step
    returns the projected params (it returned the previous step's output), every step as
    torch.optim.Adam stepping only on a finite gradient norm."""
    dp = DataParallel(Adam(W.LR, nonfinite="skip"), shard_state=True)
    p = W.init_params()
    st = dp.init(p)
    net = W.Net(W.init_params())
    opt = torch.optim.Adam(net.parameters(), lr=W.LR)
    for t in range(W.STEPS):
        x, y = W.batch(t)
        if t == W.BAD:
            x[0, 0] = float("nan")
        p = {n: a.clamp(-0.6, 0.6) for n, a in p.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            p, st = dp.update(p, W.grads(p, x, y), st)
        with torch.no_grad():
            for q in net.parameters():
                q.clamp_(-0.6, 0.6)
        opt.zero_grad()
        net(x, y).backward()
        if torch.isfinite(torch.nn.utils.clip_grad_norm_(net.parameters(), float("inf"))):
            opt.step()
        _close(W.listed(p), _torch_params(net), what=f"step {t}")
        assert st.last_step_skipped == (t == W.BAD)
    assert st.num_skipped == 1


def test_one_process_sharded_create_graph_gradients() -> None:
    """Sharded (its own packing path), gradients requiring grad step as torch.optim.Adam's
    plain ones."""
    dp = DataParallel(Adam(W.LR, clip_norm=W.CLIP), shard_state=True)
    p = W.init_params()
    st = dp.init(p)
    net = W.Net(W.init_params())
    opt = torch.optim.Adam(net.parameters(), lr=W.LR)
    for t in range(3):
        x, y = W.batch(t)
        p, st = dp.update(p, W.grads(p, x, y, create_graph=True), st)
        opt.zero_grad()
        net(x, y).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), W.CLIP)
        opt.step()
    _close(W.listed(p), _torch_params(net))
    assert not st._send.requires_grad


@pytest.mark.parametrize("shard", [False, True])
def test_one_process_mixed_params_are_named(shard) -> None:
    """Mixed dtypes or libraries: a TypeError naming the odd parameters (as the wrapped
    optimizer's), the optimizer left unbound (a valid init then works)."""
    p = W.init_params()
    opt = Adam(W.LR)
    dp = DataParallel(opt, shard_state=shard)
    with pytest.raises(TypeError, match=r"mix dtypes \(float64: \['w1', 'w2', 'b2'\]; "
                                        r"float32: \['b1'\]\)"):
        dp.init(dict(p, b1=p["b1"].float()))
    with pytest.raises(TypeError, match=r"mix libraries \(torch: \['w1', 'b1', 'w2'\]; "
                                        r"numpy: \['b2'\]\)"):
        dp.init(dict(p, b2=p["b2"].numpy()))
    st = dp.init(p)
    assert st.step == 0 and st.owned == tuple(W.SHAPES)
