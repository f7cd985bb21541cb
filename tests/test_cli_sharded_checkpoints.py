"""Checkpoints of ``mithril train --nprocs N --shard-state`` (ZeRO-1) and of mixed-precision
data-parallel runs: every rank takes part in each save (the shards gathered to rank 0 with
one ``torch.distributed.gather``, :mod:`mithril.distributed.full_state`), rank 0 writes the
one-file checkpoint, and ``--resume`` continues bit for bit at the same world size (and to
rounding at another). JAX processes (``--backend jax --nprocs``) gather their state from the
devices to process 0 the same way.

The gather and its inverse run here on two real gloo ranks (this file is also their worker
script); the CLI runs are real two-process runs as in ``test_cli_parallel_preemption``."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve()


# -- the worker: two gloo ranks gather, save, scatter ------------------------------------------
def _grads(params: dict, rank: int, step: int) -> dict:
    """Rank ``rank``'s gradients at ``step`` (``"skip"`` has none on even steps: its missed
    count)."""
    rng = np.random.default_rng(100 * step + rank)
    return {k: rng.standard_normal(v.shape) for k, v in params.items()
            if not (k == "skip" and step % 2 == 0)}


def _case(name: str) -> tuple[dict, object, int]:
    """The parameters, the optimizer and the missed count of ``"skip"`` of case ``name``."""
    from mithril.utils.optimizers import SGD, AdamW, Prodigy

    rng = np.random.default_rng(0)
    if name == "one-tensor":  # rank 0 of 2 owns no tensor (the tensor's middle is rank 1's)
        return {"w": rng.standard_normal((6, 5))}, SGD(0.1, momentum=0.9), 0
    # one tensor dominates: the ranks hold unequal shares
    params = {"w": rng.standard_normal((40, 30)), "b": rng.standard_normal(30),
              "skip": rng.standard_normal((5, 3)), "v": rng.standard_normal(7)}
    if name == "prodigy":  # an optimizer-wide value (d), summed over the ranks each step
        return params, Prodigy(1.0), 3
    return params, AdamW(1e-2, weight_decay=0.1, ema_decay=0.9), 3


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from mithril import distributed as dist

    dist.init(rank, world, timeout=60)
    for name in ("adamw-ema", "one-tensor", "prodigy"):
        _check_case(name, rank, folder)
    Path(folder, f"ok-{rank}").write_text("ok")
    dist.shutdown()


def _check_case(name: str, rank: int, folder: str) -> None:
    from mithril import distributed as dist
    from mithril.distributed.full_state import gather_state, scatter_state
    from mithril.utils.checkpoint import load_checkpoint, save_checkpoint

    params, opt, missed = _case(name)

    def run(dp, params, state, steps):
        for t in steps:
            params, state = dp.update(params, _grads(params, rank, t), state)
        return params, state

    shard = dist.DataParallel(opt, shard_state=True)
    s_s = shard.init(params)
    assert name != "one-tensor" or (rank == 0) == (s_s.owned == ())
    p_s, s_s = run(shard, dict(params), s_s, range(5))
    rep = dist.DataParallel(opt, shard_state=False)
    p_r, s_r = run(rep, dict(params), rep.init(params), range(5))
    full = gather_state(shard, s_s, p_s)
    assert (full is None) == (rank != 0)
    path = os.path.join(folder, f"{name}.safetensors")
    if rank == 0:  # the gathered state is the replicated run's, bit for bit
        for k in p_r:
            np.testing.assert_array_equal(p_s[k], p_r[k], err_msg=f"{name} {k}")
        want = {"skip": missed} if missed else {}
        assert (full.step, full.missed_counts()) == (5, want) == \
            (s_r.local.step, s_r.local.missed_counts()), name
        assert full.values == s_r.local.values, name
        for s in s_r.local.slots:
            for k, v in s_r.local.slot(s).items():
                np.testing.assert_array_equal(full.slot(s)[k], v, err_msg=f"{name} {s}/{k}")
        if getattr(s_r.local, "averaged", None) is not None:
            assert {s: list(c) for s, c in full.averaged.items()} == \
                {s: list(c) for s, c in s_r.local.averaged.items()}
        save_checkpoint(path, p_s, opt, full)
    dist.process_group.barrier("saved")
    loaded = load_checkpoint(path)
    back = opt.load_state_dict(loaded["optimizer_state_dict"], loaded["params"])
    # the loaded state scattered (sharded, and replicated) goes on as the run that did not stop
    p_a, s_a = run(shard, dict(p_s), s_s, range(5, 9))
    p_b, s_b = run(shard, dict(loaded["params"]), scatter_state(shard, back, loaded["params"]),
                   range(5, 9))
    p_c, s_c = run(rep, dict(loaded["params"]), scatter_state(rep, back, loaded["params"]),
                   range(5, 9))
    for k in p_a:
        np.testing.assert_array_equal(p_b[k], p_a[k], err_msg=f"{name} {k}")
        np.testing.assert_array_equal(p_c[k], p_a[k], err_msg=f"{name} {k}")
    for s in s_a.local.slots:
        for k, v in s_a.local.slot(s).items():
            np.testing.assert_array_equal(s_b.local.slot(s)[k], v)
            np.testing.assert_array_equal(s_c.local.slot(s)[k], v)
    assert s_b.local.missed_counts() == s_a.local.missed_counts()
    assert s_b.local.values == s_a.local.values == s_c.local.values, name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_gather_and_scatter_on_two_ranks(tmp_path) -> None:
    """ZeRO-sharded on 2 ranks (AdamW with an EMA and a parameter that misses steps; SGD
    on one tensor, rank 0 owning none; Prodigy's optimizer-wide d): the state gathered to
    rank 0 equals the replicated run's (slots, values, counts, missed steps); saved, loaded
    and scattered (sharded or replicated) it goes on bit for bit."""
    port = _free_port()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("WORLD_SIZE", None)
    procs = [subprocess.Popen([sys.executable, str(HERE), str(r), "2", str(port),
                               str(tmp_path)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for r in range(2)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=180)[0].decode()[-3000:])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the ranks did not stop within 180 s")
    assert all((tmp_path / f"ok-{r}").exists() for r in range(2)), "\n".join(logs)


# -- fast: the pieces in one process -----------------------------------------------------------
def test_encode_decode_round_trip_without_pickle() -> None:
    from mithril.distributed.full_state import decode, encode

    tree = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "n": 3, "x": float("nan"),
            "l": [np.float64(2.5), np.zeros((0, 2)), {"s": "t"}], "e": np.array(7.0)}
    data = encode(tree)
    assert b"pickle" not in data and not data[8:].startswith(b"\x80")
    got = decode(data)
    np.testing.assert_array_equal(got["a"], tree["a"])
    assert got["a"].dtype == np.float32 and got["e"].shape == () and got["l"][1].shape == (0, 2)
    assert got["n"] == 3 and np.isnan(got["x"]) and got["l"][0] == 2.5 and got["l"][2] == {"s": "t"}


def test_merged_shards_are_the_one_process_state() -> None:
    """A one-process AdamW state split into two ranks' state dicts (as each rank's
    ``state_dict(local)`` of its tensors) and merged: the optimizer loads it back to the
    same slots, counts and missed steps."""
    from mithril.distributed.full_state import merge_state_dicts
    from mithril.utils.optimizers import AdamW

    rng = np.random.default_rng(1)
    params = {k: rng.standard_normal(s) for k, s in [("a", (3, 4)), ("b", (4,)), ("c", (2,))]}
    opt = AdamW(1e-2, ema_decay=0.9)
    state = opt.init(params)
    for t in range(4):
        grads = {k: rng.standard_normal(v.shape) for k, v in params.items()
                 if not (k == "c" and t % 2)}
        params, state = opt.update(params, grads, state)
        state.note_missed([] if t % 2 == 0 else ["c"])
    sd = opt.state_dict(state)
    owned = [["a"], ["b", "c"]]
    parts = []
    for own in owned:
        part = {k: v for k, v in sd.items() if k not in ("slots", "averaged", "missed")}
        part["slots"] = {s: {n: per[n] for n in own} for s, per in sd["slots"].items()}
        part["averaged"] = {s: {n: per[n] for n in own} for s, per in sd["averaged"].items()}
        part["missed"] = {n: m for n, m in sd["missed"].items() if n in own}
        parts.append(part)
    merged = merge_state_dicts(parts, owned, list(params))
    back = opt.load_state_dict(merged, params)
    assert back.missed_counts() == state.missed_counts() == {"c": 2}
    for s in state.slots:
        for k, v in state.slot(s).items():
            np.testing.assert_array_equal(back.slot(s)[k], v)
    with pytest.raises(ValueError, match="the ranks' states have different slots"):
        bad = [parts[0], {**parts[1], "slots": {"m": parts[1]["slots"]["m"]}}]
        merge_state_dicts(bad, owned, list(params))


def test_scatter_refuses_another_optimizers_state_and_gather_a_plain_state() -> None:
    """One process (no process group): scatter_state of an SGD state into an Adam
    DataParallel is refused naming the slots, and the state given is left as it was;
    gather_state of a plain OptimizerState is refused naming what it takes."""
    from mithril.distributed import DataParallel
    from mithril.distributed.full_state import gather_state, scatter_state
    from mithril.utils.optimizers import SGD, Adam

    params = {"w": np.ones((2, 3)), "b": np.zeros(3)}
    sgd = SGD(0.1, momentum=0.9)
    full = sgd.init(params)
    full.slot("momentum_buffer" if "momentum_buffer" in full.slots else
              sorted(full.slots)[0])["w"][...] = 5.0
    before = {s: {k: v.copy() for k, v in full.slot(s).items()} for s in full.slots}
    dp = DataParallel(Adam(1e-3), shard_state=True)
    with pytest.raises(ValueError, match=r"the state has slots \[.*\], Adam here \['m', 'v'\]"):
        scatter_state(dp, full, params)
    for s, per in before.items():
        for k, v in per.items():
            np.testing.assert_array_equal(full.slot(s)[k], v)
    with pytest.raises(TypeError, match="gather_state: state must be what DataParallel.init "
                                        "returned, got OptimizerState"):
        gather_state(dp, full, params)
    # one process: the sharded state is whole, and goes back and forth unchanged
    adam = DataParallel(Adam(1e-3), shard_state=True)
    st = adam.init(params)
    p2, st = adam.update(params, {k: np.full(v.shape, 0.5) for k, v in params.items()}, st)
    whole = gather_state(adam, st, p2)
    again = scatter_state(adam, whole, p2)
    for s in ("m", "v"):
        for k in params:
            np.testing.assert_array_equal(again.local.slot(s)[k], st.local.slot(s)[k])
    assert again.local.step == 1


def test_ranks_whose_replicated_state_differs_save_nothing(monkeypatch) -> None:
    """Mixed precision: the ranks compare a digest of the masters, the optimizer state and
    the loss scale before rank 0 saves; a difference is an error, not rank 0's copy saved."""
    from types import SimpleNamespace

    from mithril.cli import parallel_checkpoint as pc
    from mithril.cli.errors import TrainingError
    from mithril.distributed import full_state, process_group

    run = SimpleNamespace(trainer=SimpleNamespace(master_params={"w": np.ones(2)},
                                                  state_dict=lambda: {"scale": 8.0}),
                          params={"w": np.ones(2)}, state=SimpleNamespace(local=None),
                          backend=SimpleNamespace(to_numpy=np.asarray))
    par = SimpleNamespace(world=SimpleNamespace(size=2, rank=0, shard_state=True),
                          _trainer=run.trainer, dp=None)
    monkeypatch.setattr(full_state, "gather_state", lambda dp, st, p: "whole")
    mine = pc._digest(run, None)
    monkeypatch.setattr(process_group, "all_gather_bytes", lambda d, what: [d, d])
    assert pc.gather(par, run) == "whole"
    monkeypatch.setattr(process_group, "all_gather_bytes", lambda d, what: [d, b"other"])
    with pytest.raises(TrainingError, match=r"differ \(ranks \[1\] from rank 0\): no "
                                            r"checkpoint saved"):
        pc.gather(par, run)
    assert mine == pc._digest(run, None)
    run.trainer.master_params["w"] = np.array([1.0, 2.0])
    assert pc._digest(run, None) != mine


# -- the CLI: two real processes ----------------------------------------------------------------
def _cli():
    sys.path.insert(0, str(HERE.parent))
    import test_cli_parallel_preemption as tp

    return tp


SHORT = ["--epochs", "2", "--hidden", "16", "--batch-size", "64", "--lr", "1e-2",
         "--scheduler", "none", "--no-plot", "--no-progress", "--nprocs", "2"]


def _straight_vs_resumed(tmp_path: Path, extra: list[str]) -> tuple[Path, Path]:
    """2 epochs straight, and 1 epoch then ``--resume --epochs 2`` (46 steps, stopped at
    23): the two final checkpoints."""
    tp = _cli()
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    runs = [tp._start(["train", *SHORT, *extra, "--epochs", epochs, "--checkpoint", "--out",
                       str(out)]) for out, epochs in ((whole, "2"), (cut, "1"))]
    for p in runs:  # (side by side: most of each is starting the processes)
        rc, _, err = tp._finish(p)
        assert rc == 0, err[-3000:]
    shutil.copytree(cut, tmp_path / "copy")
    rc, out, err = tp._finish(tp._start(["train", "--resume", str(cut), "--epochs", "2",
                                         "--no-progress"]))
    assert rc == 0, err[-3000:]
    assert "resumed from" in out and "after step 23" in out
    return whole, cut


def _same(whole: Path, cut: Path) -> dict:
    from mithril.utils.checkpoint import load_checkpoint

    a, b = (load_checkpoint(d / "checkpoint.safetensors") for d in (whole, cut))
    for k in a["params"]:
        np.testing.assert_array_equal(b["params"][k], a["params"][k], err_msg=k)
    sa, sb = a["optimizer_state_dict"], b["optimizer_state_dict"]
    assert sa["step"] == sb["step"] and set(sa["slots"]) == set(sb["slots"]) == {"m", "v"}
    for s in sa["slots"]:
        for k in sa["slots"][s]:
            np.testing.assert_array_equal(sb["slots"][s][k], sa["slots"][s][k], err_msg=k)
    assert (whole / "metrics.csv").read_text() == (cut / "metrics.csv").read_text()
    assert a["extra"]["world"] == b["extra"]["world"]
    return a


@pytest.mark.slow  # four two-process runs, ~30 s (sharded resume by default: test_distributed.py)
def test_sharded_two_processes_resume_bit_for_bit(tmp_path) -> None:
    """--nprocs 2 --shard-state, float64: the resumed run's parameters, Adam moments and
    logs equal the straight run's bit for bit; the same checkpoint resumes in one process
    (another split of each batch's sum: equal to rounding)."""
    from mithril.cli import main
    from mithril.utils.checkpoint import load_checkpoint

    whole, cut = _straight_vs_resumed(tmp_path, ["--shard-state", "--dtype", "float64"])
    a = _same(whole, cut)
    assert a["extra"]["world"] == {"nprocs": 2, "shard_state": True, "launcher": "mithril"}
    other, plain = tmp_path / "copy", tmp_path / "plain"
    shutil.copytree(other, plain)
    assert main(["train", "--resume", str(other), "--epochs", "2", "--nprocs", "1",
                 "--no-progress", "--no-plot"]) == 0
    b = load_checkpoint(other / "checkpoint.safetensors")
    assert b["extra"]["world"] == {"nprocs": 1, "shard_state": True, "launcher": "mithril"}
    for k in a["params"]:
        np.testing.assert_allclose(b["params"][k], a["params"][k], rtol=1e-9, atol=1e-12)
    # --no-shard-state: the sharded run resumed with the whole state in each process
    assert main(["train", "--resume", str(plain), "--epochs", "2", "--nprocs", "1",
                 "--no-shard-state", "--no-progress", "--no-plot"]) == 0
    c = load_checkpoint(plain / "checkpoint.safetensors")
    assert c["extra"]["world"] == {"nprocs": 1, "shard_state": False, "launcher": "mithril"}
    for k in a["params"]:
        np.testing.assert_array_equal(c["params"][k], b["params"][k], err_msg=k)
    for s in ("m", "v"):
        for k, v in b["optimizer_state_dict"]["slots"][s].items():
            np.testing.assert_array_equal(c["optimizer_state_dict"]["slots"][s][k], v, err_msg=k)


@pytest.mark.slow  # three two-process runs, ~35 s on a loaded machine
def test_mixed_precision_two_processes_resume_bit_for_bit(tmp_path) -> None:
    """--nprocs 2 --mixed-precision fp16 (torch): the float32 masters, Adam moments, loss
    scale (backed off at the first step's overflow) and logs of the resumed run equal the
    straight run's bit for bit."""
    whole, cut = _straight_vs_resumed(tmp_path, ["--backend", "torch",
                                                 "--mixed-precision", "fp16"])
    a = _same(whole, cut)
    from mithril.utils.checkpoint import load_checkpoint

    b = load_checkpoint(cut / "checkpoint.safetensors")
    mp = a["extra"]["mixed_precision_trainer"]
    assert mp == b["extra"]["mixed_precision_trainer"]
    assert mp["num_steps"] == 46 and mp["num_skipped_steps"] == 1
    assert mp["scaler"]["scale"] == 2.0**15
    assert all(v.dtype == np.float32 for v in a["params"].values())


@pytest.mark.slow  # JAX compiles in four processes, ~60 s
def test_jax_processes_resume_bit_for_bit(tmp_path) -> None:
    """--backend jax --nprocs 2 --devices 2 --shard-state: every save gathers the state
    from the processes' devices (``multihost_utils.process_allgather``) to process 0; the
    resume puts it back on the mesh and goes on as the straight run, bit for bit."""
    whole, cut = _straight_vs_resumed(tmp_path, ["--backend", "jax", "--devices", "2",
                                                 "--shard-state", "--dtype", "float64"])
    a = _same(whole, cut)
    assert a["extra"]["world"] == {"nprocs": 2, "shard_state": True, "launcher": "mithril",
                                   "devices": 2}


@pytest.mark.slow  # a SIGTERM mid-run, three two-process runs, ~60 s
def test_sharded_two_processes_sigterm_checkpoint_and_resume(tmp_path) -> None:
    """As ``test_two_processes_sigterm_checkpoint_and_resume`` with --shard-state: the
    periodic saves and the stop's gather every rank's shard; the resume (and one at
    --nprocs 1) continues the run."""
    tp = _cli()
    whole = tmp_path / "whole"
    rc, _, err = tp._finish(tp._start(["train", *tp.FLAGS, "--nprocs", "2", "--shard-state",
                                       "--checkpoint", "--out", str(whole)]))
    assert rc == 0, err[-3000:]
    tp._sigterm_then_resume(tmp_path, whole, "launcher", ["--nprocs", "2", "--shard-state"])


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
