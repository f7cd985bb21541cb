"""The ranks of ``tests/test_review_distributed47.py``: ``DataParallel`` side by side with
torch's ``DistributedDataParallel`` + ``torch.optim`` and ``ZeroRedundancyOptimizer`` in the
same gloo ranks, float64 (``python tests/dist_review47_worker.py JOB RANK WORLD PORT OUT
[FOLDER]``; JOB ``fast`` or ``slow``; each rank writes ``OUT.RANK.json``).

Every run: 4 parameters (two groups: the biases at their own learning rate), a StepLR on
every group, ``clip_norm`` (the global norm over every rank's averaged gradients), step
``ACC`` accumulated over two micro-batches (ours in ``gradient_views``, DDP under
``no_sync``), and the last batch uneven (5 rows: 3 on rank 0, 2 on rank 1, each share's
loss scaled by ``N·n_r/B``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from mithril.utils.optimizers import SGD, Adafactor, AdamW  # noqa: E402

SHAPES = {"w1": (5, 4), "b1": (4,), "w2": (4, 3), "b2": (3,)}
BIASES = ["b1", "b2"]
STEPS, ROWS, LAST_ROWS, ACC, NAN_AT, SAVE_AT = 6, 8, 5, 1, 2, 3
LR, LR_B, WD, CLIP, GAMMA = 0.05, 0.02, 0.01, 0.5, 0.5


def init_params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {n: 0.5 * torch.randn(s, generator=g, dtype=torch.float64)
            for n, s in SHAPES.items()}


def batch(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + t)
    rows = LAST_ROWS if t == STEPS - 1 else ROWS
    return (torch.randn(rows, 5, generator=g, dtype=torch.float64),
            torch.randn(rows, 3, generator=g, dtype=torch.float64))


def loss_of(p: dict[str, Any], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    return ((out - y) ** 2).sum(1).mean()


def shares(t: int, rank: int, world: int) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """This rank's micro-batches of step ``t`` and each one's loss weight: its rows of the
    batch (the last, uneven: ``ceil`` rows on the first ranks), scaled by ``N·n_r/B``, and
    halved into two micro-batches at step ``ACC``."""
    x, y = batch(t)
    rows = len(x)
    bounds = [rows * r // world + (rows * r % world > 0) for r in range(world + 1)]
    lo, hi = bounds[rank], bounds[rank + 1]
    weight = world * (hi - lo) / rows
    if t != ACC:
        return [(x[lo:hi], y[lo:hi], weight)]
    mid = (lo + hi) // 2
    return [(x[lo:mid], y[lo:mid], weight / 2), (x[mid:hi], y[mid:hi], weight / 2)]


def whole_batch_grads(p: dict[str, Any], t: int) -> dict[str, torch.Tensor]:
    """The gradient of the whole batch's mean loss (what one process steps with)."""
    q = {n: v.detach().clone().requires_grad_() for n, v in p.items()}
    return dict(zip(q, torch.autograd.grad(loss_of(q, *batch(t)), list(q.values()))))


MAKERS = {  # ours, torch.optim's class and its keywords (with our defaults: torch's)
    "sgd": (lambda **kw: SGD(LR, momentum=0.9, weight_decay=WD, **kw), torch.optim.SGD,
            {"momentum": 0.9, "weight_decay": WD}),
    "adamw": (lambda **kw: AdamW(LR, weight_decay=WD, **kw), torch.optim.AdamW,
              {"weight_decay": WD}),
    "adafactor": (lambda **kw: Adafactor(LR, weight_decay=WD, **kw), torch.optim.Adafactor,
                  {"weight_decay": WD}),
}


def ours(name: str, **kw: Any) -> Any:
    return MAKERS[name][0](param_groups=[{"params": BIASES, "learning_rate": LR_B}],
                           clip_norm=CLIP, **kw)


def listed(p: dict[str, Any]) -> dict[str, list]:
    return {n: v.detach().tolist() for n, v in p.items()}


def run_ours(name: str, shard: bool, rank: int, world: int, steps: range = range(STEPS),
             start: tuple[Any, Any, Any] | None = None, folder: str | None = None,
             nan: bool = False) -> dict[str, Any]:
    """DataParallel: this rank's micro-batches accumulated in ``gradient_views``; with
    ``folder``, saved there before step SAVE_AT; ``start``: (dp, params, state) loaded."""
    from mithril.distributed import DataParallel, save_sharded
    from mithril.utils.lr_schedulers import StepLR

    if start is None:
        dp = DataParallel(ours(name, **({"nonfinite": "skip"} if nan else {})), shard)
        p = init_params()
        st = dp.init(p)
    else:
        dp, p, st = start
    sched = StepLR(dp.optimizer, 2, GAMMA)
    for _ in range(steps.start):
        sched.step()
    norms = []
    for t in steps:
        if folder is not None and t == SAVE_AT:
            save_sharded(folder, p, dp, st)
        views = dp.gradient_views(st)
        for k, (x, y, w) in enumerate(shares(t, rank, world)):
            q = {n: v.detach().clone().requires_grad_() for n, v in p.items()}
            gs = torch.autograd.grad(w * loss_of(q, x, y), list(q.values()))
            for n, g in zip(q, gs):
                if k == 0:
                    views[n][...] = g
                else:
                    views[n] += g
        if nan and t == NAN_AT and rank == world - 1:
            views["w1"][0, 0] = float("nan")
        p, st = dp.update(p, views, st)
        norms.append(st.last_grad_norm)
        sched.step()
    return {"params": listed(p), "norms": norms, "step": st.step,
            "skipped": st.num_skipped, "owned": list(st.owned)}


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for n, a in init_params().items():
            self.register_parameter(n, torch.nn.Parameter(a))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_of(dict(self.named_parameters()), x, y)


def run_torch(name: str, zero: bool, rank: int, world: int, nan: bool = False,
              consolidate: bool = False) -> dict[str, Any]:
    """DDP + torch.optim (or ZeroRedundancyOptimizer of it): the same micro-batches, the
    first under ``no_sync``; ``clip_grad_norm_`` of DDP's averaged gradients; a non-finite
    norm skips ``step()`` (as a GradScaler); with ``consolidate``, the consolidated state
    at SAVE_AT on rank 0."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    _, cls, kw = MAKERS[name]
    net = Net()
    model = DistributedDataParallel(net)
    groups = [{"params": [net.w1, net.w2]}, {"params": [net.b1, net.b2], "lr": LR_B}]
    opt = (ZeroRedundancyOptimizer(groups, optimizer_class=cls, lr=LR, **kw) if zero
           else cls(groups, lr=LR, **kw))
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, GAMMA)
    out: dict[str, Any] = {"norms": []}
    for t in range(STEPS):
        if consolidate and t == SAVE_AT:
            opt.consolidate_state_dict(to=0)
            if rank == 0:
                sd = opt.state_dict()
                names = list(SHAPES)  # (the order of the groups' params)
                order = ["w1", "w2", "b1", "b2"]
                out["consolidated"] = {
                    order[i]: {k: (v.tolist() if torch.is_tensor(v) else v)
                               for k, v in s.items()} for i, s in sd["state"].items()}
                out["consolidated_lrs"] = [g["lr"] for g in sd["param_groups"]]
                assert sorted(order) == sorted(names)
        opt.zero_grad()
        micro = shares(t, rank, world)
        for k, (x, y, w) in enumerate(micro):
            if k < len(micro) - 1:
                with model.no_sync():
                    (w * model(x, y)).backward()
            else:
                (w * model(x, y)).backward()
        if nan and t == NAN_AT:  # the all-reduce has spread rank 1's NaN: as DDP would
            net.w1.grad[0, 0] = float("nan")
        norm = float(torch.nn.utils.clip_grad_norm_(net.parameters(), CLIP))
        out["norms"].append(norm)
        if norm == norm and norm != float("inf"):
            opt.step()
        sched.step()
    out["params"] = listed(dict(net.named_parameters()))
    return out


# -- jobs ------------------------------------------------------------------------------------

def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def settings_case(rank: int, world: int) -> dict[str, Any]:
    """A setting differing between the ranks: at init (beta2), and in the middle of a run
    (a learning rate set on rank 0 only, as a scheduler stepped there alone; a non-finite
    policy changed on rank 1 only): every rank refuses, naming it, and nothing changes."""
    from mithril.distributed import DataParallel
    from mithril.utils.optimizers import Adam

    out: dict[str, Any] = {}
    g = {n: torch.full(s, 0.1 * (rank + 1), dtype=torch.float64) for n, s in SHAPES.items()}
    for shard in (False, True):
        key = f"shard={shard}"
        try:
            DataParallel(Adam(LR, beta2=0.999 if rank == 0 else 0.99), shard).init(
                init_params())
            out[f"{key}/init"] = "accepted"
        except ValueError as e:
            out[f"{key}/init"] = _err(e)
        dp = DataParallel(Adam(LR, nonfinite="skip"), shard)
        p = init_params()
        st = dp.init(p)
        p, st = dp.update(p, g, st)
        for what, attr, value, who in (("lr", "learning_rate", 2 * LR, 0),
                                       ("policy", "nonfinite", "raise", 1)):
            before = (listed(p), st.step, {s: listed(st.slot(s)) for s in st.local.slots})
            saved = getattr(dp.optimizer, attr)
            if rank == who:
                setattr(dp.optimizer, attr, value)
            started = time.monotonic()
            try:
                dp.update(p, g, st)
                out[f"{key}/{what}"] = "accepted"
            except ValueError as e:
                out[f"{key}/{what}"] = _err(e)
            out[f"{key}/{what}/seconds"] = time.monotonic() - started
            after = (listed(p), st.step, {s: listed(st.slot(s)) for s in st.local.slots})
            out[f"{key}/{what}/unchanged"] = after == before
            setattr(dp.optimizer, attr, saved)
        p, st = dp.update(p, g, st)  # (the ranks agree again: the run goes on)
        out[f"{key}/params"], out[f"{key}/step"] = listed(p), st.step
    return out


def atomic_case(rank: int, world: int) -> dict[str, Any]:
    """Rank 1 alone gives a gradient of the wrong shape, then params with a renamed key:
    every rank raises (rank 1 its own error, rank 0 one of its class naming rank 1), the
    state and the gradient views are as before, and the run then equals DDP's."""
    from mithril.distributed import DataParallel

    out: dict[str, Any] = {}
    for shard in (False, True):
        dp = DataParallel(ours("adamw"), shard)
        p = init_params()
        st = dp.init(p)
        views = dp.gradient_views(st)
        for v in views.values():
            v[...] = 0.1 * (rank + 1)
        before = (listed(p), st.step, listed(views))
        bad_g = dict(views)
        bad_p = dict(p)
        if rank == 1:
            bad_g["w1"] = torch.zeros(4, 5, dtype=torch.float64)
            bad_p["w3"] = bad_p.pop("w2")
        for what, args in (("shape", (p, bad_g)), ("names", (bad_p, views))):
            try:
                dp.update(*args, st)
                out[f"{shard}/{what}"] = "accepted"
            except Exception as e:  # noqa: BLE001 - the class is what is checked
                out[f"{shard}/{what}"] = _err(e)
            out[f"{shard}/{what}/unchanged"] = (listed(p), st.step, listed(views)) == before
    return out


def job(name: str, rank: int, world: int, folder: str) -> dict[str, Any]:
    res: dict[str, Any] = {}

    def case(key: str, fn: Any) -> None:
        try:
            res[key] = fn()
        except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
            import traceback

            res[key] = {"crashed": _err(e) + "\n" + traceback.format_exc()[-2000:]}

    if name == "fast":
        case("settings", lambda: settings_case(rank, world))
        case("atomic", lambda: atomic_case(rank, world))
        return res
    for opt in MAKERS:
        case(opt, lambda opt=opt: {
            **{f"ours/{s}": run_ours(opt, s, rank, world) for s in (False, True)},
            "ddp": run_torch(opt, False, rank, world),
            "zero": run_torch(opt, True, rank, world)})
    case("nan", lambda: {
        **{f"ours/{s}": run_ours("adamw", s, rank, world, nan=True) for s in (False, True)},
        "ddp": run_torch("adamw", False, rank, world, nan=True)})
    case("ckpt", lambda: ckpt_case(rank, world, folder))
    return res


def ckpt_case(rank: int, world: int, folder: str) -> dict[str, Any]:
    """Sharded AdamW saved before step SAVE_AT on 2 ranks (and ZeRO's state consolidated
    at the same step); and the run resumed on 2 ranks from the checkpoint the test wrote at
    world 1 (``FOLDER/one``)."""
    from mithril.distributed import DataParallel, load_sharded

    out = {"zero": run_torch("adamw", True, rank, world, consolidate=True),
           "ours": run_ours("adamw", True, rank, world, folder=os.path.join(folder, "two"))}
    dp = DataParallel(ours("adamw"), True)
    p, st = load_sharded(os.path.join(folder, "one"), dp, backend="torch")
    out["from_one"] = run_ours("adamw", True, rank, world, range(SAVE_AT, STEPS),
                               start=(dp, p, st))
    return out


# -- JAX: make_sharded_train_step against shard_map + optax ---------------------------------

JAX_STEPS, JAX_ODD = 6, 4  # step JAX_ODD's batch of 15 rows cannot be split over 2 devices


def jax_batch(t: int) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(200 + t)
    rows = 15 if t == JAX_ODD else 16
    return {"input": rng.normal(size=(rows, 6)), "target": rng.integers(0, 3, size=rows)}


def jax_main(out: str) -> None:
    """In a process with 2 CPU devices and float64: ``make_sharded_train_step`` (state
    replicated and sharded) with AdamW and Lion, each with a bias group at its own rate,
    a StepLR and global-norm clipping, against the peer: ``jax.shard_map`` over the same
    mesh, each device's half batch, ``lax.pmean`` of the gradients, and the optax chain
    ``clip_by_global_norm`` + ``multi_transform`` of the rule with a step schedule per
    group."""
    import jax
    import numpy as np
    import optax
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    import mithril as ml
    from mithril.backends import JaxBackend
    from mithril.cli.networks import mlp_spec
    from mithril.distributed.jax_parallel import make_sharded_train_step
    from mithril.utils.lr_schedulers import StepLR
    from mithril.utils.optimizers import Lion

    assert jax.device_count() == 2, jax.devices()
    spec = mlp_spec(6, 3, (8, 5))
    compiled = ml.compile(spec.model, JaxBackend(dtype="float64", seed=0), shapes=spec.shapes)
    p0 = {n: np.asarray(v) for n, v in compiled.get_parameters().items()}
    biases = [n for n in p0 if n.endswith("bias")]
    labels = {n: "b" if n in biases else "w" for n in p0}
    mesh = Mesh(np.array(jax.devices()), ("data",))

    def sched(lr: float) -> Any:  # StepLR(2, GAMMA); (optax.exponential_decay computes
        # in float32 even under x64: 0.05 + 7.5e-10 at count 0, which the peer must not add)
        return optax.piecewise_constant_schedule(lr, {2: GAMMA, 4: GAMMA})

    cases = {
        "adamw": (lambda: AdamW(LR, weight_decay=WD, clip_norm=CLIP, clip_eps=0.0,
                                param_groups=[{"params": biases, "learning_rate": LR_B}]),
                  lambda lr: optax.adamw(sched(lr), weight_decay=WD)),
        "lion": (lambda: Lion(LR / 10, weight_decay=WD, clip_norm=CLIP, clip_eps=0.0,
                              param_groups=[{"params": biases, "learning_rate": LR_B / 10}]),
                 lambda lr: optax.lion(sched(lr / 10), weight_decay=WD)),
    }
    res: dict[str, Any] = {}
    for name, (ours_opt, rule) in cases.items():
        for shard in (False, True):
            opt = ours_opt()
            step = make_sharded_train_step(compiled, opt, loss="loss", devices=2,
                                           shard_state=shard)
            scheduler = StepLR(opt, 2, GAMMA)
            params = {n: jax.numpy.asarray(v) for n, v in p0.items()}
            st = step.init(params)
            split = []
            for t in range(JAX_STEPS):
                params, st, _ = step(params, st, jax_batch(t))
                split.append(step.last_batch_sharded)
                scheduler.step()
            res.update({f"{name}/{shard}/{n}": np.asarray(v) for n, v in params.items()})
            res[f"{name}/{shard}/split"] = np.array(split)
        tx = optax.chain(optax.clip_by_global_norm(CLIP),
                         optax.multi_transform({"w": rule(LR), "b": rule(LR_B)}, labels))

        def grad(p: Any, d: Any) -> Any:
            return jax.grad(lambda q: compiled.evaluate(q, d)["loss"])(p)

        def mean_grad(p: Any, d: Any) -> Any:  # on each device: its rows, then the mean
            return jax.lax.pmean(grad(p, d), "data")

        split_grad = jax.jit(jax.shard_map(mean_grad, mesh=mesh, in_specs=(P(), P("data")),
                                           out_specs=P()))

        @jax.jit
        def apply(p: Any, s: Any, g: Any, tx: Any = tx) -> Any:
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        p = {n: jax.numpy.asarray(v) for n, v in p0.items()}
        s = tx.init(p)
        for t in range(JAX_STEPS):
            d = jax_batch(t)
            g = split_grad(p, d) if len(d["target"]) % 2 == 0 else jax.jit(grad)(p, d)
            p, s = apply(p, s, g)
        res.update({f"{name}/optax/{n}": np.asarray(v) for n, v in p.items()})
    np.savez(out, **res)


def main() -> None:
    import torch.distributed as dist

    if sys.argv[1] == "jax":
        jax_main(sys.argv[2])
        return

    from mithril import distributed as mdist

    name, rank, world, port, out = sys.argv[1], *map(int, sys.argv[2:5]), sys.argv[5]
    folder = sys.argv[6] if len(sys.argv) > 6 else ""
    torch.set_num_threads(1)
    mdist.init(rank, world, master_port=port, timeout=float(os.environ.get("DIST_TIMEOUT",
                                                                           "20")))
    res = job(name, rank, world, folder)
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
