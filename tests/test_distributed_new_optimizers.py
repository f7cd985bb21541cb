"""The newest optimizers under data-parallel training: ``DataParallel`` replicated (DDP)
and sharded (ZeRO) on 2 gloo ranks, and the JAX sharded step on 2 CPU devices, each against
one process on the whole batch (float64, to 1e-12).

Every case has a StepLR on every group, weight decay, two parameter groups (the biases at
half the rate and without decay), clipping by the global norm (active: the norms exceed
it) and parameters the loss does not reach: ``u`` on no step, ``b2`` on the steps of
``NONE_AT`` (absent on every rank: left untouched, its own steps counted, as DDP +
torch.optim). The one-process reference is the bare optimizer on the whole batch's
gradients, told of the missed steps (``state.note_missed``, what DDP + torch.optim count).

ZeRO splits by whole tensors (:mod:`mithril.distributed.sharding`), so the tensor-wise math
(SM3's accumulators, Muon's Newton–Schulz, Adafactor's factors, LAMB's / LARS's trust
ratios, DoG's / DoWG's ``layer_wise`` estimates) runs on whole tensors and gives the one
process's numbers. Optimizers whose state holds sums over *all* parameters (DAdaptAdamW,
Prodigy, DoG / DoWG without ``layer_wise``, NAdam of Keras's convention: ``state_values``)
gather every rank's per-tensor sums before ``tensor_scalars`` (:mod:`mithril.distributed.
global_sums`): sharded too they equal one process; only a rank holding no tensor refuses
them. The sharded runs of ``CKPT`` are also saved (``save_sharded``) after
SAVE_AT steps, loaded into a fresh ``DataParallel`` and run on: the same to the bit, and on
one process (2 -> 1) to 1e-12.

The two-rank runs use this file as the worker (``python tests/test_distributed_new_optimizers.py
torch RANK INIT OUT FOLDER CASES``; ``... jax OUT CASES`` for 2 JAX devices, x64 on).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from mithril.utils import optimizers as O  # noqa: E402
from mithril.utils.lr_schedulers import StepLR  # noqa: E402

SHAPES = {"w1": (5, 6), "b1": (6,), "w2": (6, 3), "b2": (3,), "u": (4, 3)}
ROWS, STEPS, SAVE_AT, CLIP, TOL = 8, 6, 3, 0.5, 1e-12
#: ``b2`` is reached by no rank's loss at these steps; ``u`` at none
NONE_AT = {2}
#: the biases at half the rate, without weight decay
#: (``bias``: the JAX model's names, ``linear_0.bias``)
GROUPS = [{"params": "^b|bias", "lr_scale": 0.5, "weight_decay": 0.0}]


def _opt(cls: Any, lr: float, wd: float = 1e-2, **kw: Any) -> Any:
    def make(groups: Any = None) -> Any:
        if groups is None:
            groups = LOSS_GROUPS if cls.needs_loss else GROUPS
        clip = None if cls.needs_loss else CLIP
        return cls(lr, weight_decay=wd, clip_norm=clip, param_groups=groups, **kw)
    return make


#: name -> a maker of the optimizer (``groups``: the parameter groups, by regex or callable)
CASES = {
    "sm3": _opt(O.SM3, 0.05),
    "acprop": _opt(O.AcProp, 0.02),
    "dadapt_adamw": _opt(O.DAdaptAdamW, 1.0, wd=0.1, estim_lr0=1e-2),
    "noisy_sgd": _opt(O.NoisySGD, 0.05, seed=3),
    "madgrad": _opt(O.MADGRAD, 0.02),
    "radam_optax": _opt(O.RAdam, 0.02, convention="optax"),
    "nadam_optax": _opt(O.NAdam, 0.02, convention="optax"),
    "nadam_keras": _opt(O.NAdam, 0.02, convention="keras"),
    "lion_smooth": _opt(O.Lion, 0.01, mode="smooth"),
    "lion_refined": _opt(O.Lion, 0.01, mode="refined"),
    "dog_layer_wise": _opt(O.DoG, 1.0, init_step=("heuristic", 1e-2), layer_wise=True),
    "dowg_layer_wise": _opt(O.DoWG, 1.0, layer_wise=True),
    "dog": _opt(O.DoG, 1.0, init_step=("heuristic", 1e-2)),
    "dowg": _opt(O.DoWG, 1.0),
    "muon_exclude": _opt(O.Muon, 0.02, exclude_layers=["w2|linear_2"], ns_dtype="float64"),
    "lamb": _opt(O.LAMB, 0.02),
    "lars": _opt(O.LARS, 0.1),
    "adafactor": _opt(O.Adafactor, 0.05),
    "prodigy": _opt(O.Prodigy, 1.0, estim_lr0=1e-2),
    "cocob": _opt(O.COCOB, 1.0),
    "schedule_free_adamw": _opt(O.ScheduleFreeAdamW, 0.02),
    # centralized gradients: the global norm (and its clip) is theirs, each rank
    # centralizing its own tensors before its sum of squares
    "adam_centralize": _opt(O.Adam, 0.05, centralize=True),
    # loss-aware: the step takes the mean of the ranks' losses. Their groups set lr_scale
    # only (the decay and the step size are optimizer-wide), and they clip nothing: the
    # clipped gradients' small norm made every Polyak step size its cap (α), which the loss
    # then did not change (a loss 1% off moved nothing; now ~8e-3)
    "momo": _opt(O.Momo, 1.0, wd=1e-2, adapt_lower_bound=True),
    "momo_adam": _opt(O.MomoAdam, 0.5, wd=1e-2),
    "polyak_sgd": _opt(O.PolyakSGD, 1.0, wd=1e-2, max_learning_rate=1.0),
}
#: the loss-aware cases' groups
LOSS_GROUPS = [{"params": "^b|bias", "lr_scale": 0.5}]
#: the cases run with shares of 3 and 5 rows (the losses and gradients scaled to match)
UNEVEN_CASES = ("momo",)
#: saved and loaded mid-run (sharded)
CKPT = ("sm3", "muon_exclude", "dog_layer_wise")
#: the default suite's cases (one start of two ranks); the others: @slow
FAST = ("sm3", "dadapt_adamw", "prodigy", "dog", "muon_exclude", "dog_layer_wise",
        "noisy_sgd", "momo", "adam_centralize")
#: the default suite's cases on 2 JAX devices
JAX_FAST = ("dog_layer_wise",)


def init_params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in SHAPES.items()}


def batch(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(70 + t)
    return (torch.randn(ROWS, 5, generator=g, dtype=torch.float64),
            torch.randn(ROWS, 3, generator=g, dtype=torch.float64))


#: rank 0's rows of a batch in the uneven split (rank 1: the rest)
UNEVEN = 3


def _forward(p: dict[str, Any], t: int, rank: int, world: int, uneven: bool
             ) -> tuple[dict[str, Any], Any, list[str]]:
    """The leaf tensors, this rank's loss (the mean squared error over its rows of batch
    ``t``, all rows at ``world`` 1; ``uneven``: rows split 3 / 5, the loss scaled by
    ``world·n_r/n`` so that the mean over ranks is the whole batch's) and the parameters
    it reaches."""
    q = {n: torch.from_numpy(np.array(a, dtype=np.float64)).requires_grad_(True)
         for n, a in p.items()}
    x, y = batch(t)
    k = ROWS // world
    lo, hi = rank * k, (rank + 1) * k
    if uneven and world > 1:
        lo, hi = (0, UNEVEN) if rank == 0 else (UNEVEN, ROWS)
    x, y = x[lo:hi], y[lo:hi]
    out = torch.tanh(x @ q["w1"] + q["b1"]) @ q["w2"]
    if t not in NONE_AT:
        out = out + q["b2"]
    used = [n for n in q if n != "u" and (n != "b2" or t not in NONE_AT)]
    return q, ((out - y) ** 2).mean() * (world * (hi - lo) / ROWS), used


def grads(p: dict[str, Any], t: int, rank: int, world: int, uneven: bool = False
          ) -> dict[str, np.ndarray]:
    """The gradients of :func:`_forward`'s loss; parameters it does not reach are absent."""
    q, loss, used = _forward(p, t, rank, world, uneven)
    g = torch.autograd.grad(loss, [q[n] for n in used])
    return {n: a.numpy() for n, a in zip(used, g)}


def loss_of(opt: Any, p: dict[str, Any], t: int, rank: int, world: int,
            uneven: bool = False) -> dict[str, float]:
    """``{"loss": this rank's loss}`` for a loss-aware optimizer, else nothing."""
    if not opt.needs_loss:
        return {}
    return {"loss": float(_forward(p, t, rank, world, uneven)[1].detach())}


def listed(p: dict[str, Any]) -> dict[str, list]:
    return {n: np.asarray(a, dtype=np.float64).tolist() for n, a in p.items()}


def one_process(name: str) -> dict[str, Any]:
    """The bare optimizer on the whole batch (told of the missed steps): params, norms."""
    opt = CASES[name]()
    sched = StepLR(opt, 2, 0.5)
    p = {n: a.numpy() for n, a in init_params().items()}
    st = opt.init(p)
    norms = []
    for t in range(STEPS):
        g = grads(p, t, 0, 1)
        p, st = opt.update(p, g, st, **loss_of(opt, p, t, 0, 1))
        st.note_missed([n for n in SHAPES if n not in g])
        norms.append(float(st.last_grad_norm))
        sched.step()
    return {"params": listed(p), "norms": norms, "missed": st.missed_counts()}


# -- the torch worker (one rank) -----------------------------------------------------------
def ranks_run(name: str, shard: bool, rank: int, world: int, folder: str,
              uneven: bool = False) -> dict[str, Any]:
    """DataParallel on this rank's rows (``uneven``: 3 / 5 rows, the losses and gradients
    scaled to match), with this rank's loss for a loss-aware optimizer; sharded cases of
    CKPT saved at SAVE_AT and resumed by a fresh DataParallel (``resumed``). A refused
    construction: its error."""
    from mithril.distributed import DataParallel, load_sharded, save_sharded

    try:
        dp = DataParallel(CASES[name](), shard_state=shard)
    except NotImplementedError as e:
        return {"refused": str(e)}
    sched = StepLR(dp.optimizer, 2, 0.5)
    p = {n: a.numpy() for n, a in init_params().items()}
    st = dp.init(p)
    norms, out = [], {}
    path = os.path.join(folder, f"{name}-{shard}")
    for t in range(STEPS):
        if t == SAVE_AT and shard and name in CKPT:
            save_sharded(path, p, dp, st)
            sd = sched.state_dict()
        p, st = dp.update(p, grads(p, t, rank, world, uneven), st,
                          **loss_of(dp.optimizer, p, t, rank, world, uneven))
        norms.append(float(st.last_grad_norm))
        sched.step()
    out.update(params=listed(p), norms=norms, missed=st.local.missed_counts(),
               owned=list(st.owned))
    if shard and name in CKPT:
        dp = DataParallel(CASES[name](), shard_state=True)
        sched = StepLR(dp.optimizer, 2, 0.5)
        sched.load_state_dict(sd)
        p, st = load_sharded(path, dp)
        for t in range(SAVE_AT, STEPS):
            p, st = dp.update(p, grads(p, t, rank, world), st)
            sched.step()
        out["resumed"] = listed(p)
    return out


def mechanize() -> Any:
    return O.Mechanize(O.AdamW(0.02, weight_decay=1e-2, clip_norm=CLIP, param_groups=GROUPS),
                       s_init=0.1)


def full(g: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``g`` with zeros for the parameters the loss did not reach (Mechanize takes a
    gradient for every parameter)."""
    return {n: g[n] if n in g else np.zeros(s) for n, s in SHAPES.items()}


def mechanize_run(rank: int, world: int) -> dict[str, Any]:
    """Mechanize (around AdamW with groups and clipping, under a StepLR) on this rank's rows
    (every parameter's gradient given: zeros where not reached), replicated; world 1 on the
    whole batch is the one-process reference."""
    from mithril.distributed import DataParallel

    opt = mechanize()
    sched = StepLR(opt, 2, 0.5)
    dp = DataParallel(opt) if world > 1 else None
    p = {n: a.numpy() for n, a in init_params().items()}
    st = dp.init(p) if dp else opt.init(p)
    for t in range(STEPS):
        g = full(grads(p, t, rank, world))
        p, st = dp.update(p, g, st) if dp else opt.update(p, g, st)
        sched.step()
    return {"params": listed(p), "values": dict((st.local if dp else st).values)}


def idle_rank(rank: int) -> dict[str, Any]:
    """One tensor on 2 ranks: rank 0 holds none, and cannot join the gathering of the
    per-tensor sums. ``init`` refuses DoG (``layer_wise=False``) on every rank; a
    ``layer_wise`` DoG (per-tensor estimates: no gathering) inits, steps, and is refused at
    ``update`` once set to ``layer_wise=False``, params and state unchanged."""
    from mithril.distributed import DataParallel

    out: dict[str, Any] = {}
    p = {"w1": init_params()["w1"].numpy()}
    g = {"w1": grads(init_params(), 0, rank, 2)["w1"]}
    try:
        DataParallel(CASES["dog"](), shard_state=True).init(p)
    except NotImplementedError as e:
        out["init"] = str(e)
    dp = DataParallel(CASES["dog_layer_wise"](), shard_state=True)
    st = dp.init(p)
    p, st = dp.update(p, g, st)
    dp.optimizer.layer_wise = False
    before = p["w1"].copy()
    try:
        dp.update(p, g, st)
    except NotImplementedError as e:
        out["update"] = str(e)
    out["unchanged"] = st.step == 1 and np.array_equal(p["w1"], before)
    return out


def bad_loss(rank: int) -> dict[str, Any]:
    """Rank 1 gives a NaN loss to Momo, replicated and sharded: every rank refuses the step
    (naming the loss on rank 1), params and state unchanged."""
    from mithril.distributed import DataParallel

    out: dict[str, Any] = {}
    for shard in (False, True):
        dp = DataParallel(CASES["momo"](), shard_state=shard)
        p = {n: a.numpy() for n, a in init_params().items()}
        st = dp.init(p)
        before = {n: a.copy() for n, a in p.items()}
        loss = loss_of(dp.optimizer, p, 0, rank, 2)["loss"] if rank == 0 else float("nan")
        try:
            dp.update(p, grads(p, 0, rank, 2), st, loss=loss)
        except ValueError as e:
            out[f"{shard}/error"] = str(e)
        out[f"{shard}/unchanged"] = st.step == 0 and dict(st.local.values) == {
            "barf": 0.0, "gamma": 0.0, "lb": 0.0, "loss": 0.0} and all(
                np.array_equal(p[n], before[n]) for n in p)
    return out


def torch_worker(rank: int, init: str, out: str, folder: str, names: list[str]) -> None:
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    res: dict[str, Any] = {}
    for name in names:
        for shard in (False, True):
            try:
                res[f"{name}/{shard}"] = ranks_run(name, shard, rank, 2, folder)
            except Exception as e:  # (reported by the test, naming the case)
                res[f"{name}/{shard}"] = {"crashed": f"{type(e).__name__}: {e}"}
            if name in UNEVEN_CASES:
                res[f"{name}/{shard}/uneven"] = ranks_run(name, shard, rank, 2, folder, True)
    res["idle_rank"] = idle_rank(rank)
    res["bad_loss"] = bad_loss(rank)
    res["mechanize"] = mechanize_run(rank, 2)
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


def two_ranks(folder: str, names: tuple[str, ...]) -> tuple[list[dict], str]:
    sys.path.insert(0, os.path.dirname(__file__))
    from test_distributed import run_ranks

    out, init = os.path.join(folder, "out"), os.path.join(folder, "init")
    results, logs = run_ranks(lambda r: [__file__, "torch", str(r), init, out, folder,
                                         ",".join(names)], out, 2, 600, 60, "new optimizers")
    for r, res in enumerate(results):
        if res is None:
            pytest.fail(f"rank {r} wrote nothing:\n{logs[r].decode()[-3000:]}")
    return results, folder


def check_ranks(ranks: tuple[list[dict], str], name: str) -> None:
    """Both modes on both ranks equal one process (sharded optimizer-wide values
    included: every rank's sums gathered); the resumed runs equal the unbroken, and
    the checkpoint loaded by one process (2 -> 1) runs on as one process."""
    results, folder = ranks
    want = one_process(name)
    assert max(want["norms"]) > CLIP  # (clipping is active, where set)
    assert want["missed"] == {"u": STEPS, "b2": len(NONE_AT)}
    for shard, uneven in ((False, False), (True, False), (False, True), (True, True)):
        if uneven and name not in UNEVEN_CASES:
            continue
        got = [res[f"{name}/{shard}" + "/uneven" * uneven] for res in results]
        for r, g in enumerate(got):
            assert "crashed" not in g, (name, shard, r, g.get("crashed"))
            assert "refused" not in g, (name, shard, r, g["refused"])
            for n in SHAPES:
                np.testing.assert_allclose(g["params"][n], want["params"][n], rtol=0, atol=TOL,
                                           err_msg=f"{name} shard={shard} uneven={uneven} "
                                                   f"rank {r} {n}")
            np.testing.assert_allclose(g["norms"], want["norms"], rtol=1e-13, atol=0)
            if "resumed" in g:
                assert g["resumed"] == g["params"], (name, r)
        if shard:
            assert sorted(got[0]["owned"] + got[1]["owned"]) == sorted(SHAPES)
            held = {n: c for g in got for n, c in g["missed"].items()}
            assert held == want["missed"], name
        else:
            assert got[0]["missed"] == got[1]["missed"] == want["missed"]
    if name in CKPT:
        resumed_alone(os.path.join(folder, f"{name}-True"), name, want)


def resumed_alone(path: str, name: str, want: dict) -> None:
    """The sharded checkpoint of 2 ranks loaded by one process and run on."""
    from mithril.distributed import DataParallel, load_sharded

    dp = DataParallel(CASES[name](), shard_state=True)
    sched = StepLR(dp.optimizer, 2, 0.5)
    for _ in range(SAVE_AT):
        sched.step()
    p, st = load_sharded(path, dp)
    assert st.step == SAVE_AT and st.local.missed_counts() == {"u": SAVE_AT, "b2": 1}
    for t in range(SAVE_AT, STEPS):
        p, st = dp.update(p, grads(p, t, 0, 1), st)
        sched.step()
    for n in SHAPES:
        np.testing.assert_allclose(p[n], want["params"][n], rtol=0, atol=TOL,
                                   err_msg=f"{name} 2 -> 1 {n}")


@pytest.fixture(scope="module")
def fast_ranks(tmp_path_factory) -> Any:
    if importlib.util.find_spec("jax") is not None:  # (its worker runs beside the ranks)
        start_devices(str(tmp_path_factory.mktemp("newopt_jax")), JAX_FAST)
    yield two_ranks(str(tmp_path_factory.mktemp("newopt")), FAST)
    for proc, _ in _STARTED.values():  # (not collected: its tests were not selected)
        proc.kill()
        proc.wait()
    _STARTED.clear()


@pytest.mark.parametrize("name", FAST)
def test_two_ranks_equal_one_process(fast_ranks, name) -> None:
    check_ranks(fast_ranks, name)


def test_optimizer_wide_values_refused_where_a_rank_holds_no_tensor(fast_ranks) -> None:
    """Every rank joins the gathering of the per-tensor sums with its own tensors: one
    holding none refuses, at ``init`` and at an ``update`` after a switch to optimizer-wide
    values (``layer_wise=False``), on every rank alike, nothing changed."""
    for res in fast_ranks[0]:
        got = res["idle_rank"]
        for when in ("init", "update"):
            assert got[when].startswith("shard_state=True: DoG keeps optimizer-wide values "
                                        "['max_dist', 'sum_sq'] computed over all parameters, "
                                        "and rank(s) [0] hold no tensor"), (when, got)
        assert got["unchanged"] is True


def test_a_bad_loss_on_one_rank_is_refused_by_all(fast_ranks) -> None:
    """A loss-aware step with a non-finite loss on rank 1: both ranks raise, nothing
    changed (the losses travel with the refusals, before anything is written)."""
    for r, res in enumerate(fast_ranks[0]):
        for shard in (False, True):
            msg = res["bad_loss"][f"{shard}/error"]
            assert "loss=nan is not finite" in msg, (r, shard, msg)
            if r == 0:
                assert msg.startswith("DataParallel.update: rank 1 refused"), msg
            assert res["bad_loss"][f"{shard}/unchanged"] is True, (r, shard)


@pytest.mark.parametrize("make, loss, error, match", [
    (CASES["momo"], None, TypeError, "Momo.update needs loss="),
    (CASES["polyak_sgd"], np.array([1.0]), ValueError, r"loss must be a scalar \(0-d\)"),
    (CASES["sm3"], 1.0, TypeError, "DataParallel.update: SM3 takes no loss="),
])
@pytest.mark.parametrize("shard", [False, True])
def test_loss_refused_at_one_process(make, loss, error, match, shard) -> None:
    """A world of one checks the loss as the ranks do: missing for a loss-aware optimizer,
    not a scalar, or given to one that takes none; nothing changed."""
    from mithril.distributed import DataParallel

    dp = DataParallel(make(), shard_state=shard)
    p = {n: a.numpy() for n, a in init_params().items()}
    st = dp.init(p)
    before = {n: a.copy() for n, a in p.items()}
    with pytest.raises(error, match=match):
        dp.update(p, grads(p, 0, 0, 1), st, loss=loss)
    assert st.step == 0 and all(np.array_equal(p[n], before[n]) for n in p)
    p, st = dp.update(p, grads(p, 0, 0, 1), st, **loss_of(dp.optimizer, p, 0, 0, 1))
    assert st.step == 1


@pytest.mark.parametrize("name", ["dog", "prodigy", "dadapt_adamw", "adam_centralize"])
def test_one_process_sharded_equals_the_optimizer(name) -> None:
    """A world of one (no process group) holds every tensor: the sharded step is the
    optimizer's own (no gathering)."""
    from mithril.distributed import DataParallel

    want = one_process(name)
    dp = DataParallel(CASES[name](), shard_state=True)
    sched = StepLR(dp.optimizer, 2, 0.5)
    p = {n: a.numpy() for n, a in init_params().items()}
    st = dp.init(p)
    for t in range(STEPS):
        p, st = dp.update(p, grads(p, t, 0, 1), st)
        sched.step()
    for n in SHAPES:
        np.testing.assert_allclose(p[n], want["params"][n], rtol=0, atol=TOL)
    assert st.last_grad_norm == pytest.approx(want["norms"][-1], rel=1e-12)


def test_mechanize_replicated_equals_one_process(fast_ranks) -> None:
    """Mechanize's norms and inner products over all parameters are the averaged
    gradients' when replicated: both ranks equal one process (its scalars too)."""
    want = mechanize_run(0, 1)
    for r, res in enumerate(fast_ranks[0]):
        got = res["mechanize"]
        for n in SHAPES:
            np.testing.assert_allclose(got["params"][n], want["params"][n], rtol=0, atol=TOL,
                                       err_msg=f"rank {r} {n}")
        assert got["values"].keys() == want["values"].keys()
        np.testing.assert_allclose(list(got["values"].values()), list(want["values"].values()),
                                   rtol=1e-12, atol=1e-300)
    assert np.abs(np.subtract(want["params"]["w1"], init_params()["w1"].numpy())).max() > 1e-3


@pytest.mark.parametrize("make, shard, match", [
    (O.LBFGS, False, "LBFGS evaluates the loss itself"),
    (O.LBFGS, True, "LBFGS evaluates the loss itself"),
    (lambda: O.SAM(O.SGD(0.1)), False, "SAM evaluates the loss itself"),
    (lambda: O.SAM(O.SGD(0.1)), True, "SAM evaluates the loss itself"),
    (mechanize, True, "shard_state=True: Mechanize runs its base optimizer's whole update")])
def test_what_data_parallel_cannot_run_is_refused_by_name(make, shard, match) -> None:
    """Refused at construction, naming the class: before, SAM and L-BFGS raised at the first
    update (after ``mithril train --nprocs 2`` had started its processes), and sharded
    SAM / Mechanize failed in ``init`` on a missing ``clip_norm`` (each rank would have taken
    Mechanize's norms and inner products over its own tensors)."""
    from mithril.distributed import DataParallel

    with pytest.raises(NotImplementedError, match=match):
        DataParallel(make(), shard_state=shard)


@pytest.fixture(scope="module")
def all_ranks(tmp_path_factory) -> tuple[list[dict], str]:
    names = tuple(n for n in CASES if n not in FAST)
    return two_ranks(str(tmp_path_factory.mktemp("newopt_all")), names)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in CASES if n not in FAST])
def test_two_ranks_equal_one_process_all(all_ranks, name) -> None:
    check_ranks(all_ranks, name)


# -- the JAX worker (2 devices) -------------------------------------------------------------
LOSSES = ("loss_a", "loss_b")


def jax_run(name: str, kind: str) -> dict[str, np.ndarray]:
    """The schedule of losses (each head unreached at some steps) on the one-device step
    (``one``) or on 2 devices, state replicated (``rep``) or sharded (``shard``): the params
    and the state as ``optimizer.init`` holds it. Sharded cases of CKPT are converted
    (``to_optimizer_state``, a state dict) after SAVE_AT steps and resumed by a new
    optimizer and steps (``resumed/``)."""
    from test_unreached_params import SCHEDULE, data_of, two_heads

    import mithril as ml
    from mithril.backends import JaxBackend
    from mithril.distributed.jax_parallel import make_sharded_train_step
    from mithril.utils.training import make_train_step

    c = ml.compile(two_heads(), JaxBackend(dtype="float64", seed=0), shapes={"input": [8, 3]})

    def steps_of(opt: Any) -> dict[str, Any]:
        if kind == "one":
            return {k: make_train_step(c, opt, loss=k) for k in LOSSES}
        return {k: make_sharded_train_step(c, opt, loss=k, devices=2, shard_state=kind == "shard")
                for k in LOSSES}

    def held(prefix: str, steps: dict, state: Any, params: dict) -> dict[str, np.ndarray]:
        st = steps["loss_a"].to_optimizer_state(state, params)
        got = {f"{prefix}/p/{n}": np.asarray(v) for n, v in params.items()}
        got.update({f"{prefix}/missed/{n}": np.array(k) for n, k in st.missed_counts().items()})
        for s in st.slots:
            got.update({f"{prefix}/slot/{s}/{n}": np.asarray(v) for n, v in st.slot(s).items()})
        got.update({f"{prefix}/value/{k}": np.array(v) for k, v in st.values.items()})
        got[f"{prefix}/step"] = np.array(st.step)
        return got

    rng = np.random.default_rng(1)
    data = [{k: c.backend.array(v) for k, v in data_of(rng).items()} for _ in SCHEDULE]
    opt = CASES[name]()
    sched = StepLR(opt, 2, 0.5)
    steps = steps_of(opt)
    params = c.get_parameters()
    out = {f"start/{n}": np.asarray(v).copy() for n, v in params.items()}
    state = steps["loss_a"].init(params)
    ckpt = kind == "shard" and name in CKPT
    for i, (loss, d) in enumerate(zip(SCHEDULE, data)):
        if i == SAVE_AT and ckpt:
            sd = opt.state_dict(steps[loss].to_optimizer_state(state, params))
            saved, sched_sd = {n: np.asarray(v).copy() for n, v in params.items()}, \
                sched.state_dict()
        params, state, _ = steps[loss](params, state, d)
        sched.step()
    out.update(held(f"{name}/{kind}", steps, state, params))
    if ckpt:
        opt = CASES[name]()
        sched = StepLR(opt, 2, 0.5)
        sched.load_state_dict(sched_sd)
        steps = steps_of(opt)
        params = {n: c.backend.array(v) for n, v in saved.items()}
        state = steps[SCHEDULE[SAVE_AT]].from_optimizer_state(opt.load_state_dict(sd, params))
        for loss, d in zip(SCHEDULE[SAVE_AT:], data[SAVE_AT:]):
            params, state, _ = steps[loss](params, state, d)
            sched.step()
        out.update(held(f"{name}/{kind}/resumed", steps, state, params))
    return out


def jax_worker(out: str, names: list[str]) -> None:
    import jax

    jax.config.update("jax_enable_x64", True)
    assert jax.device_count() == 2, jax.devices()
    warnings.simplefilter("ignore")
    flat: dict[str, np.ndarray] = {}
    for name in names:
        for kind in ("one", "rep", "shard"):
            try:
                flat.update(jax_run(name, kind))
            except Exception as e:  # (reported by the test, naming the case)
                flat[f"{name}/{kind}/crashed"] = np.array(f"{type(e).__name__}: {e}")
    np.savez(out, **flat)


#: JAX workers started and not yet collected, by their cases: (process, folder)
_STARTED: dict[tuple[str, ...], tuple[Any, str]] = {}


def start_devices(folder: str, names: tuple[str, ...]) -> None:
    """Start the JAX worker on ``names`` (once), e.g. beside the torch ranks."""
    if names in _STARTED:
        return
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    with open(os.path.join(folder, "jax.log"), "w") as log:
        proc = subprocess.Popen([sys.executable, __file__, "jax",
                                 os.path.join(folder, "jax.npz"), ",".join(names)],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    _STARTED[names] = (proc, folder)


def two_devices(folder: str, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """What the JAX worker gave for ``names`` (started here unless it was already)."""
    pytest.importorskip("jax")
    start_devices(folder, names)
    proc, folder = _STARTED.pop(names)
    try:
        proc.wait(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the JAX worker on {names} did not stop within 600 s")
    with open(os.path.join(folder, "jax.log")) as log:
        assert proc.returncode == 0, log.read()[-4000:]
    with np.load(os.path.join(folder, "jax.npz")) as z:
        return {k: z[k] for k in z.files}


def _under(res: dict, prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in res.items() if k.startswith(prefix)}


def check_devices(res: dict, name: str) -> None:
    """2 devices, state replicated and sharded, equal the one-device step to 1e-12: params,
    slots, optimizer-wide values, each parameter's missed steps; the resumed run the
    unbroken one, bit for bit."""
    for kind in ("one", "rep", "shard"):
        assert f"{name}/{kind}/crashed" not in res, str(res.get(f"{name}/{kind}/crashed"))
    one = {k: v for k, v in _under(res, f"{name}/one/").items()}
    start = _under(res, "start/")
    assert all(np.max(np.abs(one[f"p/{n}"] - v)) > 1e-6 for n, v in start.items()), name
    assert {k: int(v) for k, v in _under(one, "missed/").items() if v} == {
        "linear_1.weight": 3, "linear_1.bias": 3, "linear_2.weight": 4, "linear_2.bias": 4}
    for kind in ("rep", "shard"):
        got = {k: v for k, v in _under(res, f"{name}/{kind}/").items()
               if not k.startswith("resumed/")}
        assert set(got) == set(one), (name, kind, set(got) ^ set(one))
        for k in one:
            np.testing.assert_allclose(got[k], one[k], rtol=0, atol=TOL,
                                       err_msg=f"{name} {kind} {k}")
        resumed = _under(res, f"{name}/{kind}/resumed/")
        if resumed:
            assert set(resumed) == set(got)
            for k in got:
                assert np.array_equal(resumed[k], got[k]), (name, k)


@pytest.fixture(scope="module")
def fast_devices(tmp_path_factory) -> dict[str, np.ndarray]:
    folder = _STARTED[JAX_FAST][1] if JAX_FAST in _STARTED else \
        str(tmp_path_factory.mktemp("newopt_jax"))
    return two_devices(folder, JAX_FAST)


@pytest.mark.parametrize("name", JAX_FAST)
def test_two_devices_equal_one_device(fast_devices, name) -> None:
    check_devices(fast_devices, name)


@pytest.fixture(scope="module")
def all_devices(tmp_path_factory) -> dict[str, np.ndarray]:
    names = [n for n in CASES if n not in JAX_FAST]
    res: dict[str, np.ndarray] = {}
    for i in range(0, len(names), 4):  # (each run within its own timeout)
        folder = str(tmp_path_factory.mktemp("newopt_jax_all"))
        res.update(two_devices(folder, tuple(names[i:i + 4])))
    return res


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in CASES if n not in JAX_FAST])
def test_two_devices_equal_one_device_all(all_devices, name) -> None:
    check_devices(all_devices, name)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    if sys.argv[1] == "torch":
        torch_worker(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5],
                     sys.argv[6].split(","))
    else:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        jax_worker(sys.argv[2], sys.argv[3].split(","))
