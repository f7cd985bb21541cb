"""One rank of ``tests/test_distributed_edges_vs_torch.py`` (``python
tests/dist_edges_worker.py RANK WORLD INIT_FILE OUT [CASE,...]``, joined by a ``file://``
``init_method``): each case runs :class:`mithril.distributed.DataParallel` and its torch
peer (``DistributedDataParallel`` with ``find_unused_parameters``,
``ZeroRedundancyOptimizer``) on this rank's share of the same float64 batches, and writes
both results to ``OUT.RANK.json`` after each case; the last two cases are ours alone (a
save failing on rank 1; a float16 step refused by rank 1).

The batch of 9 rows is split 5/4 over the 2 ranks (an uneven last share); each rank scales
its loss by ``N·n_r/B`` so that the mean over ranks is the whole batch's gradient, on both
sides. ``u`` is reached by the loss on rank 0 only (DDP's ``find_unused_parameters``), and at
step ``SKIP`` ``b2`` is reached on no rank (its ``.grad`` stays None: no update).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

SHAPES = {"w1": (4, 6), "b1": (6,), "w2": (6, 2), "b2": (2,), "u": (3,)}
BATCH, STEPS, SKIP, LR, CLIP = 9, 4, 2, 0.05, 0.3


def init_params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in SHAPES.items()}


def batch(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + t)
    return (torch.randn(BATCH, 4, generator=g, dtype=torch.float64),
            torch.randn(BATCH, 2, generator=g, dtype=torch.float64))


def loss_fn(p: dict[str, Any], x: torch.Tensor, y: torch.Tensor, t: int, rank: int,
            skip: int = SKIP) -> torch.Tensor:
    """The mean squared error of a tanh MLP; ``b2`` left out at step SKIP; plus a term in
    ``u`` on rank 0 only (its mean over the ranks: half of rank 0's gradient)."""
    out = torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]
    if t != skip:
        out = out + p["b2"]
    loss = ((out - y) ** 2).mean()
    if rank == 0:
        loss = loss + (p["u"] ** 2).sum() * 0.5
    return loss


def share(t: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    x, y = batch(t)
    idx = torch.from_numpy(np.array_split(np.arange(BATCH), world)[rank])
    return x[idx], y[idx], world * len(idx) / BATCH


def grads(p: dict[str, Any], t: int, rank: int, world: int, skip: int = SKIP,
          rows: Any = None) -> dict[str, torch.Tensor]:
    """This rank's gradients (None where the loss does not reach the parameter)."""
    x, y, s = share(t, rank, world)
    if rows is not None:  # a micro-batch: its share of the rank's mean
        s *= len(rows) / len(x)
        x, y = x[torch.from_numpy(rows)], y[torch.from_numpy(rows)]
    q = {n: a.detach().clone().requires_grad_(True) for n, a in p.items()}
    g = torch.autograd.grad(loss_fn(q, x, y, t, rank, skip) * s, list(q.values()),
                            allow_unused=True)
    return dict(zip(q, g))


class Net(torch.nn.Module):
    def __init__(self, params: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for n, a in params.items():
            self.register_parameter(n, torch.nn.Parameter(a.clone()))

    def forward(self, x: torch.Tensor, y: torch.Tensor, t: int, rank: int, skip: int
                ) -> torch.Tensor:
        return loss_fn(dict(self.named_parameters()), x, y, t, rank, skip)


def listed(p: dict[str, Any]) -> dict[str, list]:
    return {n: a.detach().numpy().tolist() for n, a in p.items()}


def err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def torch_run(kind: str, make: Any, rank: int, world: int, steps: int = STEPS,
              clip: float | None = None, micro: int = 1, skip: int = SKIP,
              lr_at: tuple[int, int, float] | None = None, groups: dict | None = None
              ) -> dict[str, Any]:
    """DDP (``kind="ddp"``) or DDP + ZeroRedundancyOptimizer (``"zero"``) on ``make``'s
    optimizer class and arguments; ``micro`` > 1: that many micro-batches per step (the
    first ones under ``no_sync``), each its share of the step's batch."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    net = Net(init_params())
    model = DistributedDataParallel(net, find_unused_parameters=True)
    cls, kw = make
    if groups:  # the biases in a second group of their own lr (ZeRO: add_param_group)
        w = [a for n, a in net.named_parameters() if not n.startswith("b")]
        b = [a for n, a in net.named_parameters() if n.startswith("b")]
        topt = (cls([{"params": w}, {"params": b, **groups}], **kw) if kind == "ddp" else
                ZeroRedundancyOptimizer(w, optimizer_class=cls, **kw))
        if kind == "zero":
            topt.add_param_group({"params": b, **groups})
    else:
        topt = (cls(net.parameters(), **kw) if kind == "ddp" else
                ZeroRedundancyOptimizer(net.parameters(), optimizer_class=cls, **kw))
    for t in range(steps):
        if lr_at is not None and t == lr_at[0]:
            topt.param_groups[lr_at[1]]["lr"] = lr_at[2]
        x, y, s = share(t, rank, world)
        topt.zero_grad(set_to_none=True)
        parts = np.array_split(np.arange(len(x)), micro)
        for k, idx in enumerate(parts):
            idx = torch.from_numpy(idx)
            ctx = model.no_sync() if k < micro - 1 else torch.enable_grad()
            with ctx:
                (model(x[idx], y[idx], t, rank, skip) * s * len(idx) / len(x)).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        topt.step()
    return {"params": listed(dict(net.named_parameters())), "opt": topt, "net": net}


# -- the cases -----------------------------------------------------------------------------

def case_unused(rank: int, world: int) -> dict:
    """AdamW and SGD (momentum, nesterov, weight decay) with global-norm clipping, both
    modes, against DDP(find_unused_parameters=True) and ZeroRedundancyOptimizer."""
    from mithril.distributed import DataParallel
    from mithril.utils.optimizers import SGD

    out: dict[str, Any] = {}
    for shard in (False, True):
        dp = DataParallel(SGD(LR, momentum=0.9, nesterov=True, weight_decay=0.01,
                              clip_norm=CLIP), shard_state=shard)
        p = init_params()
        st = dp.init(p)
        for t in range(STEPS):
            p, st = dp.update(p, grads(p, t, rank, world), st)
        out[f"mithril/{shard}"] = listed(p)
    make = (torch.optim.SGD, {"lr": LR, "momentum": 0.9, "nesterov": True,
                              "weight_decay": 0.01})
    for kind in ("ddp", "zero"):
        out[kind] = torch_run(kind, make, rank, world, clip=CLIP)["params"]
    return out


def case_adamw_groups(rank: int, world: int) -> dict:
    """AdamW, the biases in a group of their own lr (torch: a second group; ZeRO:
    ``add_param_group``), that lr changed before step 2, both modes; ``u`` reached on rank
    0 only, ``b2`` on no rank at step SKIP (its ``.grad`` None: torch.optim skips it and
    its own ``step`` stays; ours: absent, its count stays too, :mod:`.missed_steps`), in
    the group of its own lr."""
    from mithril.distributed import DataParallel
    from mithril.utils.optimizers import AdamW

    out: dict[str, Any] = {}
    for shard in (False, True):
        opt = AdamW(LR, weight_decay=0.1, param_groups=[{"params": "^b",
                                                         "learning_rate": 0.01}])
        dp = DataParallel(opt, shard_state=shard)
        p = init_params()
        st = dp.init(p)
        for t in range(STEPS):
            if t == 2:
                opt.set_learning_rate(0.02, group=0)
            p, st = dp.update(p, grads(p, t, rank, world), st)
        out[f"mithril/{shard}"] = listed(p)
        out[f"owned/{shard}"] = list(st.owned)
        out[f"missed/{shard}"] = st.local.missed_counts()
    make = (torch.optim.AdamW, {"lr": LR, "weight_decay": 0.1})
    for kind in ("ddp", "zero"):
        run = torch_run(kind, make, rank, world, lr_at=(2, 1, 0.02), groups={"lr": 0.01})
        out[kind] = run["params"]
        topt = run["opt"]
        inner = topt.optim if kind == "zero" else topt  # (ZeRO: this rank's tensors)
        names = {id(a): n for n, a in run["net"].named_parameters()}
        out[f"steps/{kind}"] = {names[id(q)]: int(inner.state[q]["step"])
                                for g in inner.param_groups for q in g["params"]
                                if q in inner.state}
    return out


def case_accumulate(rank: int, world: int) -> dict:
    """Gradient accumulation: 2 micro-batches per step summed into ``gradient_views`` (the
    peer: DDP's ``no_sync`` for the first), SGD with momentum and global-norm clipping;
    ``b2`` passed as None at step SKIP (reached by no micro-batch)."""
    from mithril.distributed import DataParallel
    from mithril.utils.optimizers import SGD

    out: dict[str, Any] = {}
    for shard in (False, True):
        dp = DataParallel(SGD(LR, momentum=0.9, clip_norm=CLIP), shard_state=shard)
        p = init_params()
        st = dp.init(p)
        views = dp.gradient_views(st)
        for t in range(STEPS):
            n = len(share(t, rank, world)[0])
            reached = set()
            for v in views.values():
                v[...] = 0
            for part in np.array_split(np.arange(n), 2):
                for k, g in grads(p, t, rank, world, rows=part).items():
                    if g is not None:
                        views[k] += g
                        reached.add(k)
            p, st = dp.update(p, {k: (v if k in reached else None)
                                  for k, v in views.items()}, st)
        out[f"mithril/{shard}"] = listed(p)
    make = (torch.optim.SGD, {"lr": LR, "momentum": 0.9})
    out["ddp"] = torch_run("ddp", make, rank, world, clip=CLIP, micro=2)["params"]
    return out


def case_join(rank: int, world: int) -> dict:
    """Uneven numbers of batches: rank 1 has none at the last step and passes no gradient
    (``{}``: zero there); the peer: DDP under ``model.join()`` (rank 1 runs one batch fewer,
    its collectives shadowed with zeros, the sum divided by the initial world size), SGD with
    momentum, AdamW; both modes."""
    from torch.nn.parallel import DistributedDataParallel

    from mithril.distributed import DataParallel
    from mithril.utils.optimizers import SGD, AdamW

    mine = STEPS - (rank == 1)
    out: dict[str, Any] = {}
    for name, ours, theirs in (
            ("sgd", lambda: SGD(LR, momentum=0.9),
             lambda ps: torch.optim.SGD(ps, lr=LR, momentum=0.9)),
            ("adamw", lambda: AdamW(LR, weight_decay=0.1),
             lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=0.1))):
        for shard in (False, True):
            dp = DataParallel(ours(), shard_state=shard)
            p = init_params()
            st = dp.init(p)
            for t in range(STEPS):
                g = grads(p, t, rank, world, skip=-1) if t < mine else {}
                p, st = dp.update(p, g, st)
            out[f"{name}/mithril/{shard}"] = listed(p)
        net = Net(init_params())
        model = DistributedDataParallel(net, find_unused_parameters=True)
        topt = theirs(net.parameters())
        with model.join():
            for t in range(mine):
                x, y, sc = share(t, rank, world)
                topt.zero_grad(set_to_none=True)
                (model(x, y, t, rank, -1) * sc).backward()
                topt.step()
        # (the rank that ran out stepped one time fewer: it takes the others' parameters,
        # as DDP's join leaves the optimizer of a joined rank to the caller)
        for q in net.parameters():
            torch.distributed.broadcast(q.data, 0)
        out[f"{name}/ddp"] = listed(dict(net.named_parameters()))
    return out


def case_zero_state(rank: int, world: int, folder: str) -> dict:
    """Adam sharded against ZeroRedundancyOptimizer: which tensors each rank holds state
    of, then ``save_sharded`` into ``folder`` and, on rank 0, torch's consolidated state
    (``consolidate_state_dict``) for the test to compare after a load at world size 1."""
    from mithril.distributed import DataParallel, save_sharded
    from mithril.utils.optimizers import Adam

    dp = DataParallel(Adam(LR), shard_state=True)
    p = init_params()
    st = dp.init(p)
    for t in range(STEPS):
        p, st = dp.update(p, grads(p, t, rank, world, skip=-1), st)
    save_sharded(folder, p, dp, st)
    out: dict[str, Any] = {"mithril": listed(p), "owned": list(st.owned),
                           "state_bytes": st.state_bytes()}
    run = torch_run("zero", (torch.optim.Adam, {"lr": LR}), rank, world, skip=-1)
    topt = run["opt"]
    names = list(SHAPES)
    out["zero"] = run["params"]
    out["zero_held"] = sorted(names[i] for i, q in enumerate(topt._all_params)
                              if q in topt.optim.state)
    topt.consolidate_state_dict(to=0)
    if rank == 0:
        sd = topt.state_dict()
        out["zero_state"] = {names[i]: {k: (v.tolist() if torch.is_tensor(v) else v)
                                        for k, v in s.items()}
                             for i, s in sd["state"].items()}
    return out


def case_resume_1to2(rank: int, world: int, folder: str) -> dict:
    """Resume at world size 2 from ``folder/ours`` (saved by the test at world size 1) and,
    for ZeroRedundancyOptimizer, from ``folder/torch.json`` (torch.optim.Adam's state dict
    at world size 1, as lists: no pickle); 2 more steps on both sides."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from mithril.distributed import DataParallel, load_sharded
    from mithril.utils.optimizers import Adam

    dp = DataParallel(Adam(LR), shard_state=True)
    p, st = load_sharded(os.path.join(folder, "ours"), dp, backend="torch")
    start = st.step
    for t in range(start, start + 2):
        p, st = dp.update(p, grads(p, t, rank, world, skip=-1), st)
    with open(os.path.join(folder, "torch.json")) as f:
        saved = json.load(f)
    net = Net({n: torch.tensor(v, dtype=torch.float64) for n, v in saved["params"].items()})
    topt = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=torch.optim.Adam, lr=LR)
    full = {"param_groups": [{**saved["group"], "params": list(range(len(SHAPES)))}],
            "state": {i: {k: torch.tensor(v, dtype=torch.float64) for k, v in s.items()}
                      for i, s in enumerate(saved["state"])}}
    topt.load_state_dict(full)
    for t in range(start, start + 2):
        topt.zero_grad(set_to_none=True)
        for q, g in zip(net.parameters(), grads(dict(net.named_parameters()), t, rank, world,
                                                skip=-1).values()):
            g = torch.zeros_like(q) if g is None else g  # (u on rank 1: zero, as DDP)
            torch.distributed.all_reduce(g)  # (DDP's averaging, by hand)
            q.grad = g / world
        topt.step()
    return {"mithril": listed(p), "zero": listed(dict(net.named_parameters())),
            "owned": list(st.owned), "step": st.step}


def case_save_fails(rank: int, world: int, folder: str) -> dict:
    """A checkpoint saved at step 1; the save at step 2 fails while rank 1 writes its shard
    (an OSError: a full disk): every rank raises, the files on disk are byte for byte those
    of step 1, no temporary file is left, and a load gives step 1's parameters."""
    import hashlib

    from mithril.distributed import DataParallel, checkpoint, load_sharded, save_sharded
    from mithril.utils.optimizers import Adam

    dp = DataParallel(Adam(LR), shard_state=True)
    p = init_params()
    st = dp.init(p)
    p, st = dp.update(p, grads(p, 0, rank, world, skip=-1), st)
    save_sharded(folder, p, dp, st)
    first = listed(p)

    def disk() -> dict[str, str]:
        return {f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest()
                for f in sorted(os.listdir(folder))}

    before = disk()
    p, st = dp.update(p, grads(p, 1, rank, world, skip=-1), st)
    real = checkpoint.write_file

    def full_disk(path: str, *args: Any, **kwargs: Any) -> None:
        real(path, *args, **kwargs)  # (part of the file is there: then the disk fills)
        raise OSError(28, "No space left on device", path)

    replace = os.replace

    def locked(src: str, dst: str) -> None:  # (Windows: a reader holds the old shard open)
        if ".pending-" in os.fspath(src) and ".pending-" not in os.fspath(dst):
            raise PermissionError(13, "Permission denied", dst)
        replace(src, dst)

    out: dict[str, Any] = {}
    for phase, patch in (("write", "write_file"), ("rename", "replace")):
        if rank == 1:
            if patch == "write_file":
                checkpoint.write_file = full_disk
            else:
                os.replace = locked
        try:
            save_sharded(folder, p, dp, st)
            out[f"{phase}/error"] = None
        except Exception as e:  # noqa: BLE001 - the test reads the class and message
            out[f"{phase}/error"] = err(e)
        finally:
            checkpoint.write_file, os.replace = real, replace
        torch.distributed.barrier()
        out[f"{phase}/disk_kept"] = disk() == before
        out[f"{phase}/files"] = sorted(os.listdir(folder))
        try:
            q, st2 = load_sharded(folder, DataParallel(Adam(LR), shard_state=True),
                                  backend="torch")
            out[f"{phase}/loaded"] = listed(q) == first and st2.step == 1
        except Exception as e:  # noqa: BLE001
            out[f"{phase}/loaded"] = err(e)
    save_sharded(folder, p, dp, st)  # and a save that works commits step 2
    q, st2 = load_sharded(folder, DataParallel(Adam(LR), shard_state=True), backend="torch")
    out["saved"] = listed(q) == listed(p) and st2.step == 2
    out["files"] = sorted(os.listdir(folder))
    return out


def case_fp16_refused_views(rank: int, world: int) -> dict:
    """float16, sharded: rank 1 passes a parameter of the wrong shape while the gradients
    are the accumulated ``gradient_views``: every rank refuses, and the views must be as
    they were (float16 is divided by N before the reduce-scatter), so that the retried step
    applies the mean (SGD: p - lr·mean)."""
    from mithril.distributed import DataParallel
    from mithril.utils.optimizers import SGD

    p = {"w": np.ones((3, 2), np.float16), "b": np.ones(4, np.float16)}
    dp = DataParallel(SGD(0.25), shard_state=True)
    st = dp.init(p)
    views = dp.gradient_views(st)
    views["w"][...] = 1 + rank  # the mean over the 2 ranks: 1.5
    views["b"][...] = 2 + rank  # 2.5
    bad = dict(p)
    if rank == 1:
        bad["w"] = np.ones((2, 2), np.float16)
    out: dict[str, Any] = {}
    try:
        dp.update(bad, views, st)
        out["refused"] = None
    except Exception as e:  # noqa: BLE001 - the test reads the class and message
        out["refused"] = err(e)
    out["views"] = {n: v.astype(np.float64).tolist() for n, v in views.items()}
    new, st = dp.update(p, views, st)
    out["params"] = {n: np.asarray(a, np.float64).tolist() for n, a in new.items()}
    return out


def main() -> None:
    import datetime

    import torch.distributed as dist

    rank, world, init_file, out = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3],
                                   sys.argv[4])
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=30))
    warnings.simplefilter("ignore")
    results: dict[str, Any] = {}
    cases = {"unused": case_unused, "adamw_groups": case_adamw_groups,
             "accumulate": case_accumulate, "join": case_join,
             "zero_state": lambda r, w: case_zero_state(r, w, out + ".ckpt"),
             "resume_1to2": lambda r, w: case_resume_1to2(r, w, os.path.dirname(out)),
             "save_fails": lambda r, w: case_save_fails(r, w, out + ".fails"),
             "fp16_views": case_fp16_refused_views}
    only = sys.argv[5].split(",") if len(sys.argv) > 5 else list(cases)
    for name, fn in cases.items():
        if name not in only:
            continue
        try:
            results[name] = fn(rank, world)
        except Exception:  # noqa: BLE001 - reported to the test, which fails on it
            results[name] = {"crashed": traceback.format_exc()[-3000:]}
        with open(f"{out}.{rank}.json", "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
