"""One rank of the multi-process tests of ``mithril.distributed`` (run by
``tests/test_distributed.py`` as ``python tests/dist_worker.py JOB RANK WORLD PORT OUT``),
and the model, data and optimizer configurations both sides share.

The model is ``((X·w + b)·v)`` under half a squared error, with gradients computed in NumPy:
a step costs microseconds, the optimizers' kernels and the collectives are what is tested.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import numpy as np

STEPS, BATCH = 20, 16
SHAPES = {"w": (6, 4), "b": (4,), "v": (4, 3)}


def make_opt(name: str) -> Any:
    from mithril.utils.optimizers import LAMB, SGD, Adam

    if name == "adam":
        return Adam(0.05, clip_norm=0.3)
    if name == "sgd":
        return SGD(0.05, momentum=0.9, clip_norm=0.3)
    if name == "lamb":
        return LAMB(0.05, weight_decay=0.01, clip_norm=0.3)
    if name == "groups":
        return Adam(0.05, weight_decay=0.01, clip_norm=0.3,
                    param_groups=[{"params": ["b"], "learning_rate": 0.01, "weight_decay": 0.0}])
    if name == "skip":
        return Adam(0.05, clip_norm=0.3, nonfinite="skip")
    raise ValueError(name)


#: (optimizer, shard_state, backend, dtype) of the equivalence runs
CONFIGS = [(o, s, be, dt) for o in ("adam", "sgd", "lamb") for s in (False, True)
           for be in ("numpy", "torch") for dt in ("float64", "float32")]
CONFIGS += [(o, s, "numpy", "float64") for o in ("groups", "skip") for s in (False, True)]


def key(cfg: tuple) -> str:
    return "-".join(str(c) for c in cfg)


def init_params(dtype: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {n: rng.normal(size=s).astype(dtype) for n, s in SHAPES.items()}


def batch(step: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(100 + step)
    return rng.normal(size=(BATCH, 6)).astype(dtype), rng.normal(size=(BATCH, 3)).astype(dtype)


def grads(p: dict[str, Any], x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Gradients of ``mean(|(x·w + b)·v − y|²)/2`` (NumPy, in x's dtype)."""
    w, b, v = (np.asarray(p[n]) for n in ("w", "b", "v"))
    h = x @ w + b
    e = (h @ v - y) / len(x)
    dh = e @ v.T
    return {"w": x.T @ dh, "b": dh.sum(0), "v": h.T @ e}


def run(cfg: tuple, rank: int, world: int, wrap: bool = True) -> tuple[dict, Any]:
    """20 steps of ``cfg`` on this rank's share of each batch; returns NumPy params, state."""
    from mithril.distributed import DataParallel

    name, shard, backend, dtype = cfg
    opt = make_opt(name)
    params: dict[str, Any] = init_params(dtype)
    if backend == "torch":
        import torch

        params = {n: torch.from_numpy(a) for n, a in params.items()}
    dp = DataParallel(opt, shard_state=shard) if wrap else opt
    state = dp.init(params)
    part = BATCH // world
    for t in range(STEPS):
        x, y = batch(t, dtype)
        g = grads({n: (a.numpy() if hasattr(a, "numpy") else a) for n, a in params.items()},
                  x[rank * part:(rank + 1) * part], y[rank * part:(rank + 1) * part])
        if name == "skip" and t == 5:
            g["v"][0, 0] = np.nan  # on every rank's share: the whole batch's too
        if backend == "torch":
            import torch

            g = {n: torch.from_numpy(a) for n, a in g.items()}
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                params, state = dp.update(params, g, state)
    return {n: np.array(a.numpy() if hasattr(a, "numpy") else a) for n, a in params.items()}, state


def job_equivalence(rank: int, world: int, out: str, ckpt: str) -> dict:
    from mithril.distributed import DataParallel, load_sharded, save_sharded

    res: dict[str, Any] = {}
    for cfg in CONFIGS:
        p, st = run(cfg, rank, world)
        res[key(cfg)] = {n: a.tolist() for n, a in p.items()}
        res[key(cfg) + "/bytes"] = st.state_bytes()
        res[key(cfg) + "/norm"] = st.last_grad_norm
        res[key(cfg) + "/skipped"] = st.num_skipped
        if cfg == ("adam", True, "numpy", "float64"):
            res["slots"] = {s: {n: np.asarray(a).tolist() for n, a in st.slot(s).items()}
                            for s in st.local.slots}
            save_sharded(os.path.join(ckpt, "two"), {n: p[n] for n in p}, DataParallel(
                make_opt("adam"), shard_state=True), st)
    # resume a checkpoint written by one process, continue 3 steps, return the params
    dp = DataParallel(make_opt("adam"), shard_state=True)
    params, state = load_sharded(os.path.join(ckpt, "one"), dp)
    res["resumed_step"] = state.step
    part = BATCH // world
    for t in range(STEPS, STEPS + 3):
        x, y = batch(t, "float64")
        g = grads(params, x[rank * part:(rank + 1) * part], y[rank * part:(rank + 1) * part])
        params, state = dp.update(params, g, state)
    res["resumed"] = {n: np.asarray(a).tolist() for n, a in params.items()}
    return res


#: (backend, compute dtype) of the mixed-precision runs; the loss scale starts at 2**10,
#: grows every 3 finite steps, and at step MP_BAD one row of rank 1's share is inf
MP_CONFIGS = [("numpy", "float32"), ("numpy", "float16"), ("torch", "float16")]
MP_STEPS, MP_BAD = 12, 5


def run_mixed(cfg: tuple, rank: int, world: int, wrap: bool = True) -> dict[str, Any]:
    """MixedPrecisionTrainer (dynamic loss scaling) on a small MLP, on this rank's rows of
    every batch; the float32 masters, the loss scales and the skipped steps."""
    import mithril as ml
    from mithril.backends import NumpyBackend, TorchBackend
    from mithril.cli.networks import mlp_spec
    from mithril.distributed import DataParallel
    from mithril.utils.mixed_precision import MixedPrecisionTrainer

    backend, dtype = cfg
    spec = mlp_spec(6, 3, (8,))
    be = (NumpyBackend if backend == "numpy" else TorchBackend)(dtype=dtype, seed=0)
    compiled = ml.compile(spec.model, be, shapes=spec.shapes)
    opt = make_opt("adam")
    trainer = MixedPrecisionTrainer(compiled, DataParallel(opt) if wrap else opt,
                                    compiled.get_parameters(), loss_scale=2.0**10,
                                    growth_interval=3)
    part = BATCH // world
    scales, skipped = [], []
    for t in range(MP_STEPS):
        x, _ = batch(t, "float32")
        y = np.random.default_rng(200 + t).integers(0, 3, size=BATCH)
        if t == MP_BAD:
            x[BATCH - 1, 2] = np.inf  # in rank 1's share only
        xs, ys = x[rank * part:(rank + 1) * part], y[rank * part:(rank + 1) * part]
        with np.errstate(all="ignore"):
            trainer.forward({"input": be.array(xs), "target": be.array(ys, be.int_dtype)})
            _, _, ok = trainer.backward_and_update({"loss": 1.0})
        scales.append(trainer.loss_scale)
        skipped.append(not ok)
    masters = {n: np.asarray(be.to_numpy(v), dtype=np.float64)
               for n, v in trainer.master_params.items()}
    return {"params": masters, "scales": scales, "skipped": skipped,
            "num_skipped": trainer.num_skipped_steps}


def job_mixed(rank: int, world: int) -> dict:
    res: dict[str, Any] = {}
    for cfg in MP_CONFIGS:
        r = run_mixed(cfg, rank, world)
        r["params"] = {n: a.tolist() for n, a in r["params"].items()}
        res[key(cfg)] = r
    return res


def job_resume4(rank: int, world: int, ckpt: str) -> dict:
    """Load the 2-rank checkpoint on 4 ranks (what each holds), take 3 more steps, save."""
    from mithril.distributed import DataParallel, load_sharded, save_sharded

    dp = DataParallel(make_opt("adam"), shard_state=True)
    params, state = load_sharded(os.path.join(ckpt, "two"), dp)
    res: dict[str, Any] = {"owned": list(state.owned), "step": state.step,
                           "loaded": {n: np.asarray(a).tolist() for n, a in params.items()},
                           "loaded_slots": {s: {n: np.asarray(a).tolist()
                                                for n, a in state.slot(s).items()}
                                            for s in state.local.slots}}
    part = BATCH // world
    for t in range(STEPS, STEPS + 3):
        x, y = batch(t, "float64")
        g = grads(params, x[rank * part:(rank + 1) * part], y[rank * part:(rank + 1) * part])
        params, state = dp.update(params, g, state)
    save_sharded(os.path.join(ckpt, "four"), {n: np.asarray(a) for n, a in params.items()},
                 dp, state)
    res["params"] = {n: np.asarray(a).tolist() for n, a in params.items()}
    res["slots"] = {s: {n: np.asarray(a).tolist() for n, a in state.slot(s).items()}
                    for s in state.local.slots}
    return res


def job_faults(rank: int, world: int, out: str) -> dict:
    from mithril.distributed import DataParallel

    res: dict[str, Any] = {}
    params = init_params("float64")
    if rank == 1:
        params = {"w": params["w"], "b2": params["b"], "v": params["v"]}
    try:
        DataParallel(make_opt("adam")).init(params)
        res["mismatch"] = "accepted"
    except ValueError as e:
        res["mismatch"] = str(e)
    # one tensor: rank 0 holds nothing, rank 1 all
    one = {"w": init_params("float64")["w"]}
    dp = DataParallel(make_opt("lamb"), shard_state=True)
    state = dp.init(one)
    for t in range(3):
        x, y = batch(t, "float64")
        g = {"w": x[:6, :4] * (rank + 1)}
        one, state = dp.update(one, g, state)
    res["one_tensor"] = {"w": np.asarray(one["w"]).tolist(), "owned": list(state.owned),
                         "step": state.step}
    params = init_params("float64")
    dp = DataParallel(make_opt("adam"), shard_state=True)
    state = dp.init(params)
    start = time.monotonic()
    try:
        for t in range(STEPS):
            if rank == 1 and t == 3:
                os._exit(3)  # dies mid-run, without a word
            x, y = batch(t, "float64")
            params, state = dp.update(params, grads(params, x, y), state)
            start = time.monotonic()
        res["dead_peer"] = "no error"
    except Exception as e:  # noqa: BLE001 - whatever torch raises is reported
        res["dead_peer"] = f"{type(e).__name__}: {e}"[:300]
    res["waited"] = time.monotonic() - start
    # rank 1 is gone: the other collectives say so too, and a save writes nothing
    from mithril.distributed import broadcast_params, save_sharded

    try:
        broadcast_params(params)
        res["broadcast"] = "no error"
    except Exception as e:  # noqa: BLE001
        res["broadcast"] = f"{type(e).__name__}: {e}"[:300]
    folder = os.path.join(os.path.dirname(out), "after_death")
    try:
        save_sharded(folder, params, dp, state)
        res["save"] = "no error"
    except Exception as e:  # noqa: BLE001
        res["save"] = f"{type(e).__name__}: {e}"[:300]
    res["save_wrote"] = os.path.exists(folder)
    return res


def job_refusals(rank: int, world: int, folder: str) -> dict:
    """A step or save refused on one rank or on all: every rank raises, nothing changes
    (state, params, the checkpoint on disk); bfloat16 torch parameters on 2 ranks."""
    import hashlib

    import torch

    from mithril.distributed import DataParallel, load_sharded, save_sharded
    from mithril.utils.optimizers import Adam

    res: dict[str, Any] = {}
    params = {"w": np.ones((8, 4)), "b": np.zeros(4), "c": np.zeros(4)}
    g = {k: np.full(v.shape, 0.1) for k, v in params.items()}
    dp = DataParallel(Adam(0.1), shard_state=True)
    st = dp.init(params)
    params, st = dp.update(params, g, st)
    save_sharded(folder, params, dp, st)

    def snapshot() -> str:
        return hashlib.sha256(b"".join(open(os.path.join(folder, f), "rb").read() + f.encode()
                                       for f in sorted(os.listdir(folder)))).hexdigest()

    def slots() -> dict:
        return {s: {n: np.asarray(a).tolist() for n, a in st.slot(s).items()}
                for s in st.local.slots}

    disk, held, norm = snapshot(), slots(), st.last_grad_norm
    for case, bad in (("all", True), ("rank1", rank == 1)):
        p = dict(params, w=np.ones((3, 3))) if bad else params
        try:
            dp.update(p, g, st)
            res[case] = "accepted"
        except Exception as e:  # noqa: BLE001 - the class and message are the result
            res[case] = f"{type(e).__name__}: {e}"
        res[case + "/unchanged"] = (st.step, st.last_grad_norm == norm, slots() == held)
        p = {"w": params["w"]} if bad else params
        try:
            save_sharded(folder, p, dp, st)
            res[case + "/save"] = "accepted"
        except Exception as e:  # noqa: BLE001
            res[case + "/save"] = f"{type(e).__name__}: {e}"
        res[case + "/disk"] = snapshot() == disk
    # replicated: a bad parameter on rank 1 only is refused by both before either steps
    rp = {k: v.copy() for k, v in params.items()}
    rdp = DataParallel(Adam(0.1))
    rst = rdp.init(rp)
    try:
        rdp.update(dict(rp, b=np.ones(5)) if rank == 1 else rp, g, rst)
        res["replicated"] = "accepted"
    except Exception as e:  # noqa: BLE001
        res["replicated"] = f"{type(e).__name__}: {e}"
    res["replicated/step"] = rst.step
    res["replicated/m"] = np.asarray(rst.slot("m")["w"]).tolist()
    params, st = dp.update(params, g, st)  # the state is as before the refusals
    res["params"] = {n: np.asarray(a).tolist() for n, a in params.items()}
    loaded, st2 = load_sharded(folder, DataParallel(Adam(0.1), shard_state=True))
    res["loaded_step"] = st2.step
    # two saves of the very same state, shards mixed (as a kill during the renames leaves)
    import shutil

    from mithril.distributed import process_group as pg

    for f in ("x", "y"):
        save_sharded(folder + f, params, dp, st)
    if rank == 0:
        shutil.copy(os.path.join(folder + "y", "shard-00001-of-00002.safetensors"), folder + "x")
    pg.barrier("test")
    try:
        load_sharded(folder + "x", DataParallel(Adam(0.1), shard_state=True))
        res["mixed"] = "accepted"
    except Exception as e:  # noqa: BLE001
        res["mixed"] = f"{type(e).__name__}: {e}"
    # bfloat16 torch: both ranks' gradients alike, so the mean is theirs exactly
    for shard in (False, True):
        tp = {n: torch.from_numpy(a).to(torch.bfloat16) for n, a in init_params("float64").items()}
        tg = {n: torch.full_like(a, 0.25) for n, a in tp.items()}
        dp = DataParallel(Adam(0.01), shard_state=shard)
        st = dp.init(tp)
        for _ in range(3):
            tp, st = dp.update(tp, tg, st)
        res[f"bf16/{shard}"] = {n: a.float().numpy().tolist() for n, a in tp.items()}
    return res


def main() -> None:
    job, rank, world, port, out = sys.argv[1], *map(int, sys.argv[2:5]), sys.argv[5]
    from mithril import distributed as dist

    dist.init(rank, world, master_port=port, timeout=float(os.environ.get("DIST_TIMEOUT", 20)))
    if job == "equivalence":
        res = job_equivalence(rank, world, out, sys.argv[6])
    elif job == "mixed":
        res = job_mixed(rank, world)
    elif job == "refusals":
        res = job_refusals(rank, world, sys.argv[6])
    elif job == "resume4":
        res = job_resume4(rank, world, sys.argv[6])
    else:
        res = job_faults(rank, world, out)
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump(res, f)
    os._exit(0)  # no teardown: a dead peer must not make this rank wait


if __name__ == "__main__":
    main()
