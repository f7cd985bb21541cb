"""``DataParallel`` counts each parameter's own steps as DDP + ``torch.optim`` do
(:mod:`mithril.distributed.missed_steps`).

What torch does, seen here on two gloo ranks (``DistributedDataParallel(
find_unused_parameters=True)``, float64): a parameter reached on no rank keeps ``.grad``
None on every rank (``zero_grad(set_to_none=True)``), so ``torch.optim.Adam`` skips it and
its ``state[p]['step']`` stays; one reached on one rank only gets the mean (zeros from the
other) on both, and steps. With ``set_to_none=False`` the unreached one has zeros and steps
(moments decay) once its ``.grad`` exists. Ours: a gradient absent (or None) on every rank
leaves the parameter, its slots and its own step count as they were (``note_missed``, on
every rank: replicated; on its holder: sharded); present on some rank it is the mean.

Before, the count was one per state (optax's): ``b``'s bias corrections after its missed
steps were off DDP's by ~1e-2. Now ≤1e-12 on every rank, Adam and AdamW, both modes, and
through ``save_sharded`` / ``load_sharded`` in the middle (2 -> 2 and 2 -> 1). The two-rank
tests (``@pytest.mark.slow``) run this file as the worker: ``python
tests/test_distributed_missed_counts.py RANK WORLD INIT_FILE OUT FOLDER``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from mithril.distributed import DataParallel, load_sharded, save_sharded  # noqa: E402
from mithril.errors import ShapeError  # noqa: E402
from mithril.utils.optimizers import Adam, AdamW, Lookahead  # noqa: E402

SHAPES = {"w": (4, 3), "b": (3,), "c": (3,)}
ROWS, STEPS, SAVE_AT, LR, WD = 8, 8, 4, 0.05, 0.1
#: ``b`` is reached by no rank's loss at these steps (its first one too)
NONE_AT = {0, 3, 4}
#: ``c`` is reached by rank 0's loss only at these steps (rank 1: None, the mean halved)
ONE_AT = {1, 3, 6}
TOL = 1e-12
MAKERS = {"adam": (Adam, torch.optim.Adam, {}),
          "adamw": (AdamW, torch.optim.AdamW, {"weight_decay": WD})}


def init_params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in SHAPES.items()}


def share(t: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(50 + t)
    x = torch.randn(ROWS, 4, generator=g, dtype=torch.float64)
    y = torch.randn(ROWS, 3, generator=g, dtype=torch.float64)
    k = ROWS // world
    return x[rank * k:(rank + 1) * k], y[rank * k:(rank + 1) * k]


def loss_fn(p: dict[str, Any], x: torch.Tensor, y: torch.Tensor, t: int, rank: int
            ) -> torch.Tensor:
    out = torch.tanh(x @ p["w"])
    if t not in NONE_AT:
        out = out + p["b"]
    loss = ((out - y) ** 2).mean()
    if rank == 0 or t not in ONE_AT:
        loss = loss + (p["c"] * out.mean(0)).sum()
    return loss


def grads(p: dict[str, Any], t: int, rank: int, world: int) -> dict[str, Any]:
    """This rank's gradients; None where its loss does not reach the parameter."""
    q = {n: (a.detach() if torch.is_tensor(a) else torch.from_numpy(np.asarray(a)))
         .clone().requires_grad_(True) for n, a in p.items()}
    x, y = share(t, rank, world)
    g = torch.autograd.grad(loss_fn(q, x, y, t, rank), list(q.values()), allow_unused=True)
    return dict(zip(q, g))


def feed(g: dict[str, Any], t: int, zeros: bool = False) -> dict[str, Any]:
    """What a loop passes ``update``: a missing gradient as a missing key (even steps) or
    None (odd); ``zeros``: as zeros once the parameter has had a gradient (what
    ``zero_grad(set_to_none=False)`` leaves in ``.grad``: only step 0 has none)."""
    if zeros and t > 0:
        return {n: torch.zeros(SHAPES[n], dtype=torch.float64) if a is None else a
                for n, a in g.items()}
    return {n: a for n, a in g.items() if a is not None or t % 2}


def listed(p: dict[str, Any]) -> dict[str, list]:
    return {n: np.asarray(a.detach() if torch.is_tensor(a) else a).tolist()
            for n, a in p.items()}


def torch_steps(opt: torch.optim.Optimizer, named: dict[str, Any]) -> dict[str, int]:
    return {n: int(opt.state[a]["step"]) if a in opt.state else 0 for n, a in named.items()}


def close(got: dict, want: dict, what: str, tol: float = TOL) -> None:
    for n in SHAPES:
        np.testing.assert_allclose(np.asarray(got[n], dtype=np.float64),
                                   np.asarray(want[n], dtype=np.float64),
                                   rtol=0, atol=tol, err_msg=f"{what} {n}")


# -- one process (fast) ------------------------------------------------------------------

def _torch_alone(name: str) -> tuple[dict, dict]:
    """torch.optim on the whole batch, ``.grad`` None where unreached: params, steps."""
    _, cls, kw = MAKERS[name]
    x = {n: a.clone().requires_grad_(True) for n, a in init_params().items()}
    opt = cls(list(x.values()), lr=LR, **kw)
    for t in range(STEPS):
        for n, g in grads(x, t, 0, 1).items():
            x[n].grad = g
        opt.step()
    return listed(x), torch_steps(opt, x)


@pytest.mark.parametrize("name", list(MAKERS))
@pytest.mark.parametrize("shard", [False, True])
def test_one_process_counts_as_torch_optim(name, shard) -> None:
    """World size 1 (no process group): ``b`` absent at its missed steps (a missing key or
    None) counts its own steps, as torch.optim's ``step``; off by far more before."""
    ours, cls_kw = MAKERS[name][0], MAKERS[name][2]
    dp = DataParallel(ours(LR, **cls_kw), shard_state=shard)
    p = {n: a.numpy() for n, a in init_params().items()}
    st = dp.init(p)
    plain = ours(LR, **cls_kw)  # the wrapped optimizer alone: one count for all (optax's)
    q = dict(p)
    ps = plain.init(q)
    for t in range(STEPS):
        g = {n: None if a is None else a.numpy() for n, a in grads(p, t, 0, 1).items()}
        p, st = dp.update(p, feed(g, t), st)
        q, ps = plain.update(q, {n: a for n, a in g.items() if a is not None}, ps)
    want, steps = _torch_alone(name)
    assert steps == {"w": STEPS, "b": STEPS - len(NONE_AT), "c": STEPS}
    assert st.local.missed_counts() == {"b": len(NONE_AT)} and st.step == STEPS
    close(p, want, f"{name} shard={shard}")
    assert np.abs(np.asarray(q["b"]) - np.asarray(want["b"])).max() > 1e-3  # (the count)


@pytest.mark.parametrize("shard", [False, True])
def test_skipped_or_refused_steps_count_no_miss(shard) -> None:
    """A step skipped (``nonfinite="skip"``) or refused (bad input) with ``b`` absent takes
    no step, so ``b`` misses none; the next applied one without it does."""
    dp = DataParallel(Adam(LR, nonfinite="skip"), shard_state=shard)
    p = {n: np.ones(s) for n, s in SHAPES.items()}
    st = dp.init(p)
    with pytest.warns(RuntimeWarning, match="skipped"):
        p, st = dp.update(p, {"w": np.full((4, 3), np.nan), "c": np.ones(3)}, st)
    with pytest.raises(ShapeError, match=r"gradients\['w'\]"):
        dp.update(p, {"w": np.ones(5), "c": np.ones(3)}, st)
    assert st.step == 0 and st.num_skipped == 1 and st.local.missed is None
    p, st = dp.update(p, {"w": np.ones((4, 3)), "c": np.ones(3)}, st)
    assert st.step == 1 and st.local.missed_counts() == {"b": 1}


@pytest.mark.parametrize("reset", [False, True])
@pytest.mark.parametrize("shard", [False, True])
def test_lookahead_counts_as_torch_optimizer(shard, reset) -> None:
    """A Lookahead (with and without ``reset_state``) counts as ``torch_optimizer`` of it,
    given ``.grad`` None where the gradient is absent: the same rule, bit for bit."""
    from mithril.interop import torch_optimizer

    def make() -> Lookahead:
        return Lookahead(Adam(LR), sync_period=3, slow_step_size=0.5, reset_state=reset)

    dp = DataParallel(make(), shard_state=shard)
    p = {n: a.numpy() for n, a in init_params().items()}
    st = dp.init(p)
    x = {n: torch.nn.Parameter(a) for n, a in init_params().items()}
    opt = torch_optimizer(make(), list(x.items()))
    for t in range(STEPS):
        g = grads(p, t, 0, 1)
        p, st = dp.update(p, feed({n: None if a is None else a.numpy()
                                   for n, a in g.items()}, t), st)
        for n, a in g.items():
            x[n].grad = a
        opt.step()
    close(p, listed(x), f"lookahead reset={reset}", tol=0)
    assert st.local.missed_counts() == ({} if reset else {"b": len(NONE_AT)})


# -- two processes (slow) ------------------------------------------------------------------

class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for n, a in init_params().items():
            self.register_parameter(n, torch.nn.Parameter(a))

    def forward(self, x: torch.Tensor, y: torch.Tensor, t: int, rank: int) -> torch.Tensor:
        return loss_fn(dict(self.named_parameters()), x, y, t, rank)


def ddp_run(name: str, rank: int, world: int, set_to_none: bool = True) -> dict[str, Any]:
    """DDP(find_unused_parameters=True) + torch.optim: params, each parameter's ``step``,
    and at each step which of ``b``, ``c`` had ``.grad`` None on this rank."""
    from torch.nn.parallel import DistributedDataParallel

    _, cls, kw = MAKERS[name]
    net = Net()
    model = DistributedDataParallel(net, find_unused_parameters=True)
    opt = cls(net.parameters(), lr=LR, **kw)
    none = []
    for t in range(STEPS):
        opt.zero_grad(set_to_none=set_to_none)
        model(*share(t, rank, world), t, rank).backward()
        none.append([net.b.grad is None, net.c.grad is None])
        opt.step()
    named = dict(net.named_parameters())
    return {"params": listed(named), "steps": torch_steps(opt, named), "none": none}


def ours_run(name: str, shard: bool, rank: int, world: int, folder: str | None = None,
             zeros: bool = False) -> dict[str, Any]:
    """DataParallel on this rank's gradients; with ``folder``, saved at SAVE_AT there, and
    also loaded back into a fresh DataParallel that runs the rest (``resumed``)."""
    ours, _, kw = MAKERS[name]
    dp = DataParallel(ours(LR, **kw), shard_state=shard)
    p = init_params()
    st = dp.init(p)
    out: dict[str, Any] = {}
    for t in range(STEPS):
        if folder is not None and t == SAVE_AT:
            save_sharded(folder, p, dp, st)
            out["missed_at_save"] = st.local.missed_counts()
        p, st = dp.update(p, feed(grads(p, t, rank, world), t, zeros), st)
    out.update(params=listed(p), missed=st.local.missed_counts(), held=list(st.owned))
    if folder is not None:
        dp = DataParallel(ours(LR, **kw), shard_state=shard)
        p, st = load_sharded(folder, dp, backend="torch")
        out["loaded_missed"] = st.local.missed_counts()
        for t in range(SAVE_AT, STEPS):
            p, st = dp.update(p, feed(grads(p, t, rank, world), t), st)
        out["resumed"] = listed(p)
    return out


def _worker(rank: int, world: int, init: str, out: str, folder: str) -> None:
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=30))
    res: dict[str, Any] = {}
    for name in MAKERS:
        res[f"{name}/ddp"] = ddp_run(name, rank, world)
        for shard in (False, True):
            res[f"{name}/{shard}"] = ours_run(name, shard, rank, world,
                                              os.path.join(folder, f"{name}-{shard}"))
    res["zeros/ddp"] = ddp_run("adam", rank, world, set_to_none=False)
    for shard in (False, True):
        res[f"zeros/{shard}"] = ours_run("adam", shard, rank, world, zeros=True)
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[list[dict], str]:
    sys.path.insert(0, os.path.dirname(__file__))
    from test_distributed import run_ranks

    folder = str(tmp_path_factory.mktemp("missed"))
    out, init = os.path.join(folder, "out"), os.path.join(folder, "init")
    results, logs = run_ranks(lambda r: [__file__, str(r), "2", init, out, folder], out, 2,
                              300, 30, "missed counts")
    for r, res in enumerate(results):
        if res is None:
            pytest.fail(f"rank {r} wrote nothing:\n{logs[r].decode()[-3000:]}")
    return results, folder


@pytest.mark.slow
def test_what_ddp_does(two_ranks) -> None:
    """torch's side, as observed: ``b`` None on both ranks exactly at its missed steps (its
    ``step`` does not advance); ``c``, reached on rank 0 only, never None on rank 1 after
    the all-reduce; with ``set_to_none=False``, ``b`` steps with zeros after step 0."""
    results, _ = two_ranks
    for r, res in enumerate(results):
        d = res["adam/ddp"]
        assert [b for b, _ in d["none"]] == [t in NONE_AT for t in range(STEPS)], r
        assert not any(c for _, c in d["none"]), r
        assert d["steps"] == {"w": STEPS, "b": STEPS - len(NONE_AT), "c": STEPS}
        z = res["zeros/ddp"]
        assert [b for b, _ in z["none"]] == [t == 0 for t in range(STEPS)], r
        assert z["steps"] == {"w": STEPS, "b": STEPS - 1, "c": STEPS}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MAKERS))
def test_both_modes_equal_ddp_on_every_rank(two_ranks, name) -> None:
    results, _ = two_ranks
    for shard in (False, True):
        for r, res in enumerate(results):
            got, want = res[f"{name}/{shard}"], res[f"{name}/ddp"]
            close(got["params"], want["params"], f"rank {r} shard={shard}")
            holds_b = "b" in got["held"]
            assert got["missed"] == ({"b": len(NONE_AT)} if holds_b else {}), (r, shard)
        if shard:  # b's count is kept by its holder alone
            assert ["b" in res[f"{name}/True"]["held"] for res in results] == [False, True]
        close(results[0][f"{name}/{shard}"]["params"], results[1][f"{name}/{shard}"]["params"],
              "rank 0 vs 1", tol=0)


@pytest.mark.slow
def test_zeros_passed_step_as_ddp_set_to_none_false(two_ranks) -> None:
    """Zeros passed for an unreached parameter are a gradient (moments decay, a step
    counted), as the zeros ``zero_grad(set_to_none=False)`` leaves for DDP."""
    results, _ = two_ranks
    for r, res in enumerate(results):
        for shard in (False, True):
            got = res[f"zeros/{shard}"]
            close(got["params"], res["zeros/ddp"]["params"], f"rank {r} shard={shard}")
            assert got["missed"] == ({"b": 1} if "b" in got["held"] else {})
    b_none, b_zero = (results[0][k]["params"]["b"] for k in ("adam/ddp", "zeros/ddp"))
    assert np.abs(np.subtract(b_none, b_zero)).max() > 1e-3  # (the two conventions differ)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MAKERS))
def test_resume_in_the_middle_equals_ddp(two_ranks, name) -> None:
    """Saved at SAVE_AT (``b`` had missed 2 steps), loaded on 2 ranks and on 1 process, run
    on: the same as the unbroken run and as DDP."""
    results, folder = two_ranks
    for shard in (False, True):
        for r, res in enumerate(results):
            got = res[f"{name}/{shard}"]
            want = {"b": 2} if "b" in got["held"] else {}
            assert got["missed_at_save"] == want and got["loaded_missed"] == want
            close(got["resumed"], res[f"{name}/ddp"]["params"], f"rank {r} resumed")
            close(got["resumed"], got["params"], f"rank {r} vs unbroken", tol=0)
        # 2 -> 1: the mean of the two ranks' gradients (None where both are None)
        ours, _, kw = MAKERS[name]
        dp = DataParallel(ours(LR, **kw), shard_state=shard)
        p, st = load_sharded(os.path.join(folder, f"{name}-{shard}"), dp, backend="torch")
        assert st.local.missed_counts() == {"b": 2} and st.step == SAVE_AT
        for t in range(SAVE_AT, STEPS):
            g0, g1 = grads(p, t, 0, 2), grads(p, t, 1, 2)
            g = {n: None if g0[n] is None and g1[n] is None else
                 sum(a for a in (g0[n], g1[n]) if a is not None) / 2 for n in SHAPES}
            p, st = dp.update(p, feed(g, t), st)
        close(listed(p), results[0][f"{name}/ddp"]["params"], f"2 -> 1 shard={shard}")


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
