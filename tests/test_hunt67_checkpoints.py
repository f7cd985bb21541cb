"""Checkpoints and resume, second pass (hunt 67): killed saves, refusals, odd folders."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from mithril.utils.checkpoint import CheckpointManager, load_checkpoint
from mithril.utils.checkpoint_io import _host_tag


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_manager_removes_a_killed_saves_temporary_of_another_step(tmp_path) -> None:
    """A save killed mid-write leaves its temporary file ``.ckpt-ckpt-00000003...tmp``; the
    manager's next save removed only those of the step it wrote, so a resumed run that saved
    other steps (another interval, a step its rotation did not keep) kept every killed save's
    temporary, each as large as a checkpoint, for good."""
    manager = CheckpointManager(tmp_path, max_to_keep=2)
    manager.save(2, {"w": np.arange(4.0)})
    host, dead = _host_tag(), _dead_pid()
    stale = [f".ckpt-ckpt-00000003.safetensors-{host}-{dead}-0a1b2c.tmp",
             f".ckpt-ckpt-00000009.safetensors-{host}-{dead}-ffee.tmp"]
    kept = [f".ckpt-ckpt-00000004.safetensors-{host}-{os.getppid()}-0a1b.tmp",  # a live one
            f".ckpt-ckpt-00000005.safetensors-0000beef-{dead}-0a1b.tmp",  # another host's
            f".ckpt-other-00000003.safetensors-{host}-{dead}-0a1b.tmp",  # not the manager's
            f".ckpt-run.safetensors-{host}-{dead}-0a1b.tmp", "notes.txt"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"partial")
    assert manager.save(5, {"w": np.arange(4.0) + 5}) == manager.path(5)
    assert sorted(os.listdir(tmp_path)) == sorted(kept + ["ckpt-00000002.safetensors",
                                                         "ckpt-00000005.safetensors"])
    np.testing.assert_array_equal(load_checkpoint(manager.latest())["params"]["w"],
                                  np.arange(4.0) + 5)


MANAGER_CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from mithril.utils.checkpoint import CheckpointManager
    folder, i = sys.argv[1], int(sys.argv[2])
    manager = CheckpointManager(folder, max_to_keep=2)
    w = np.arange(1_000_000, dtype=np.float64)
    while True:
        i += 1
        manager.save(i, {"w": w + i}, extra={"i": i})
        print(i, flush=True)
""")


@pytest.mark.slow
def test_manager_saves_killed_at_random_leave_a_checkpoint_and_no_temporaries(tmp_path) -> None:
    """SIGKILL at random moments of a manager's saves, each run resumed at a later step than
    the killed one was writing: the latest checkpoint always loads whole, and after the next
    completed save no temporary file is left."""
    rng, last = np.random.default_rng(0), 0
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for _ in range(12):
        child = subprocess.Popen([sys.executable, "-c", MANAGER_CHILD, str(tmp_path),
                                  str(last)], stdout=subprocess.PIPE, text=True, env=env)
        assert child.stdout.readline().strip() == str(last + 1)
        time.sleep(float(rng.uniform(0, 0.3)))
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        manager = CheckpointManager(tmp_path, max_to_keep=2)
        ck = load_checkpoint(manager.latest())
        i = ck["extra"]["i"]
        np.testing.assert_array_equal(ck["params"]["w"], np.arange(1_000_000.0) + i)
        last = i + 3  # the resumed run saves other steps
        manager.save(last, {"w": np.arange(1_000_000.0) + last}, extra={"i": last})
        assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
        assert len(os.listdir(tmp_path)) == 2


def test_save_sharded_removes_a_killed_saves_temporary(tmp_path) -> None:
    """save_sharded writes each shard as ``shard-…safetensors.pending-<save id>`` through a
    temporary file; one killed while writing it left ``.ckpt-shard-…pending-<id>-…tmp`` (a
    whole shard's size), which no later save removed: each save has a new id, and rank 0's
    clean-up looked only at ``shard-*`` names."""
    from mithril.distributed import DataParallel, load_sharded, save_sharded
    from mithril.utils.optimizers import Adam

    host, dead = _host_tag(), _dead_pid()
    stale = f".ckpt-shard-00000-of-00001.safetensors.pending-0123abcd-{host}-{dead}-9f.tmp"
    kept = [f".ckpt-shard-00000-of-00001.safetensors.pending-0123abcd-{host}-"
            f"{os.getppid()}-9f.tmp",  # a live process's
            f".ckpt-shard-00000-of-00001.safetensors.pending-0123abcd-0000beef-{dead}-9f.tmp",
            f".ckpt-run.safetensors-{host}-{dead}-0a1b.tmp"]
    for name in [stale, *kept]:
        (tmp_path / name).write_bytes(b"partial")
    dp = DataParallel(Adam(0.1))
    params = {"w": np.arange(6.0).reshape(2, 3), "b": np.ones(3)}
    state = dp.init(params)
    params, state = dp.update(params, {"w": np.ones((2, 3)), "b": np.full(3, 0.5)}, state)
    save_sharded(tmp_path, params, dp, state)
    assert sorted(os.listdir(tmp_path)) == sorted([*kept, "shard-00000-of-00001.safetensors"])
    loaded, _ = load_sharded(tmp_path, DataParallel(Adam(0.1)))
    for k, v in params.items():
        np.testing.assert_array_equal(loaded[k], v)


SHARDED_CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from mithril.distributed import DataParallel, save_sharded
    from mithril.utils.optimizers import Adam
    folder, i = sys.argv[1], int(sys.argv[2])
    dp = DataParallel(Adam(0.1))
    w = np.arange(1_000_000, dtype=np.float64)
    state = dp.init({"w": w, "b": np.ones(3)})
    while True:
        i += 1
        save_sharded(folder, {"w": w + i, "b": np.full(3, float(i))}, dp, state)
        print(i, flush=True)
""")


@pytest.mark.slow
def test_save_sharded_killed_at_random_leaves_a_checkpoint_and_no_temporaries(tmp_path) -> None:
    """SIGKILL at random moments of save_sharded: the folder always loads, whole, as one of
    the saves, and the next completed save leaves only its shard."""
    from mithril.distributed import DataParallel, load_sharded
    from mithril.utils.optimizers import Adam

    rng, last = np.random.default_rng(1), 0
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for _ in range(10):
        child = subprocess.Popen([sys.executable, "-c", SHARDED_CHILD, str(tmp_path),
                                  str(last)], stdout=subprocess.PIPE, text=True, env=env)
        assert child.stdout.readline().strip() == str(last + 1)
        time.sleep(float(rng.uniform(0, 0.3)))
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        loaded, _ = load_sharded(tmp_path, DataParallel(Adam(0.1)))
        i = int(loaded["b"][0])
        np.testing.assert_array_equal(loaded["w"], np.arange(1_000_000.0) + i)
        np.testing.assert_array_equal(loaded["b"], np.full(3, float(i)))
        done = subprocess.run([sys.executable, "-c", SHARDED_CHILD.replace(
            "while True:", "for _ in range(1):"), str(tmp_path), str(i)], env=env,
            capture_output=True, text=True, check=True)
        last = int(done.stdout.split()[-1])
        assert os.listdir(tmp_path) == ["shard-00000-of-00001.safetensors"]


def test_save_checkpoint_of_a_data_parallel_says_what_to_save(tmp_path) -> None:
    """``save_checkpoint(path, params, dp, state)`` (a DataParallel, as the training loop holds
    it) raised a bare ``AttributeError: 'DataParallel' object has no attribute
    'hyperparameters'``; its state with ``dp.optimizer`` was told to "save custom states
    through params or extra". Both now name what a checkpoint of a DataParallel run is
    (gather_state + dp.optimizer, or save_sharded), and nothing is written."""
    from mithril.distributed import DataParallel, save_sharded
    from mithril.distributed.full_state import gather_state
    from mithril.utils.checkpoint import save_checkpoint
    from mithril.utils.optimizers import Adam

    dp = DataParallel(Adam(0.1))
    params = {"w": np.arange(3.0)}
    state = dp.init(params)
    params, state = dp.update(params, {"w": np.ones(3)}, state)
    path = tmp_path / "ck.safetensors"
    for optimizer, st in ((dp, state), (dp, None), (dp.optimizer, state)):
        with pytest.raises(TypeError, match=r"DataParallel.*gather_state\(dp, state, params\)"
                                            r".*save_sharded\(folder, params, dp, state\)"):
            save_checkpoint(path, params, optimizer, st)
    with pytest.raises(TypeError, match="must be a mithril optimizer .* got object"):
        save_checkpoint(path, params, object())
    assert os.listdir(tmp_path) == []
    # what the message says works, and resumes the run
    save_checkpoint(path, params, dp.optimizer, gather_state(dp, state, params))
    save_sharded(tmp_path / "shards", params, dp, state)
    other = DataParallel(Adam(0.5))
    ck = load_checkpoint(path, params_template=params, optimizer=other.optimizer)
    assert ck["state"].step == 1 and other.optimizer.get_learning_rate() == 0.1
    np.testing.assert_array_equal(ck["params"]["w"], params["w"])


def test_save_through_a_symbolic_link_writes_the_file_it_points_to(tmp_path,
                                                                   monkeypatch) -> None:
    """``ckpt.safetensors -> /elsewhere/run 1/ckpt.safetensors`` (a checkpoint kept on another
    disk): torch.save and safetensors' save_file write the linked file; save_checkpoint's
    ``os.replace`` replaced the link itself, so the new checkpoint stayed beside the link and
    the linked file silently kept the old one. A failing save (a full disk) leaves the linked
    file as it was."""
    import errno

    import torch

    import mithril.utils.checkpoint_io as checkpoint_io
    from mithril.utils.checkpoint import save_checkpoint

    far = tmp_path / "other disk" / "run ü 1"
    far.mkdir(parents=True)
    (tmp_path / "here").mkdir()
    link = tmp_path / "here" / "ckpt.safetensors"
    target = far / "ckpt.safetensors"
    save_checkpoint(target, {"w": np.zeros(3)}, extra={"step": 0})
    os.symlink(os.path.relpath(target, link.parent), link)
    save_checkpoint(link, {"w": np.arange(3.0)}, extra={"step": 1})
    assert os.path.islink(link) and os.listdir(link.parent) == ["ckpt.safetensors"]
    for path in (link, target):
        ck = load_checkpoint(path)
        assert ck["extra"] == {"step": 1}
        np.testing.assert_array_equal(ck["params"]["w"], np.arange(3.0))
    # as torch.save through the same kind of link
    tlink, ttarget = tmp_path / "here" / "t.pt", far / "t.pt"
    torch.save({"w": torch.zeros(3)}, ttarget)
    os.symlink(ttarget, tlink)
    torch.save({"w": torch.arange(3.0)}, tlink)
    assert os.path.islink(tlink)
    assert torch.equal(torch.load(ttarget, weights_only=True)["w"], torch.arange(3.0))

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_io.os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(link, {"w": np.ones(3)}, extra={"step": 2})
    monkeypatch.undo()
    assert os.path.islink(link) and sorted(os.listdir(far)) == ["ckpt.safetensors", "t.pt"]
    assert load_checkpoint(link)["extra"] == {"step": 1}


@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
def test_save_keeps_the_permissions_of_the_checkpoint_it_replaces(tmp_path) -> None:
    """A checkpoint made private (``chmod 600``) became readable by everyone (0644, the
    temporary file's default) at the next save, which replaces it; torch.save rewrites the
    file in place and keeps its mode. The mode is now carried over; a new file gets the
    default, as torch.save's."""
    import stat

    import torch

    from mithril.utils.checkpoint import CheckpointManager, save_checkpoint

    path, theirs = tmp_path / "ck.safetensors", tmp_path / "ck.pt"
    save_checkpoint(path, {"w": np.zeros(2)})
    torch.save({"w": torch.zeros(2)}, theirs)
    assert stat.S_IMODE(os.stat(path).st_mode) == stat.S_IMODE(os.stat(theirs).st_mode)
    for mode in (0o600, 0o640, 0o444):
        os.chmod(path, mode)
        save_checkpoint(path, {"w": np.full(2, float(mode))})
        assert stat.S_IMODE(os.stat(path).st_mode) == mode, oct(mode)
        np.testing.assert_array_equal(load_checkpoint(path)["params"]["w"], float(mode))
        if mode != 0o444:  # (torch.save cannot write a read-only file but as root)
            os.chmod(theirs, mode)
            torch.save({"w": torch.ones(2)}, theirs)
            assert stat.S_IMODE(os.stat(theirs).st_mode) == mode
    torch.save({}, tmp_path / "fresh.pt")
    manager = CheckpointManager(tmp_path / "run", max_to_keep=1)
    manager.save(1, {"w": np.zeros(2)})  # (a new file: the default mode)
    assert stat.S_IMODE(os.stat(manager.path(1)).st_mode) == \
        stat.S_IMODE(os.stat(tmp_path / "fresh.pt").st_mode)


@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
def test_save_sharded_keeps_the_permissions_of_the_shard_it_replaces(tmp_path) -> None:
    """As save_checkpoint: a shard made private (``chmod 600``) became 0644 at the next
    save_sharded, whose pending file, new, replaced it."""
    import stat

    from mithril.distributed import DataParallel, load_sharded, save_sharded
    from mithril.utils.optimizers import Adam

    dp = DataParallel(Adam(0.1))
    params = {"w": np.arange(4.0)}
    state = dp.init(params)
    path = save_sharded(tmp_path, params, dp, state)
    fresh = stat.S_IMODE(os.stat(path).st_mode)
    for mode in (0o600, 0o640):
        os.chmod(path, mode)
        params, state = dp.update(params, {"w": np.ones(4)}, state)
        assert save_sharded(tmp_path, params, dp, state) == path
        assert stat.S_IMODE(os.stat(path).st_mode) == mode != fresh
        loaded, st = load_sharded(tmp_path, DataParallel(Adam(0.1)))
        np.testing.assert_array_equal(loaded["w"], params["w"])
    assert os.listdir(tmp_path) == [os.path.basename(path)]


def test_torch_reduce_lr_on_plateau_is_saved_and_resumes_bit_for_bit(tmp_path) -> None:
    """torch's ReduceLROnPlateau over the torch drop-in keeps ``mode_worse`` = inf (and
    ``best`` = inf before its first step): save_checkpoint refused its state ("must be
    JSON-serialisable (finite floats)"), while torch's StepLR, OneCycleLR... were taken. Its
    non-finite floats are now stored and read back as floats; the run resumed from the file
    equals the uninterrupted one bit for bit, its scheduler's state torch's own."""
    import torch

    import mithril.utils.optimizers as mo
    from mithril.interop import torch_optimizer
    from mithril.utils.checkpoint import save_checkpoint

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(8, 1, generator=gen, dtype=torch.float64)
    metrics = [1.0, 0.9, 0.95, 0.97, 0.96, 0.99, 0.85, 0.86, 0.87, 0.88, 0.9, 0.91]

    def make(lr: float):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1).double()
        opt = torch_optimizer(mo.Adam(lr), model.named_parameters())
        return model, opt, torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=1,
                                                                      factor=0.5)

    def run(model, opt, sched, steps) -> None:
        for t in steps:
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
            sched.step(metrics[t])

    model, opt, sched = make(0.1)
    params = {n: p.detach() for n, p in model.named_parameters()}
    save_checkpoint(tmp_path / "start", params, opt.mithril_optimizer, None, sched)
    assert load_checkpoint(tmp_path / "start")["scheduler_state_dict"]["best"] == math.inf
    run(model, opt, sched, range(5))
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    save_checkpoint(tmp_path / "ck", params, opt.mithril_optimizer, opt.mithril_state, sched)
    run(model, opt, sched, range(5, 12))

    model2, opt2, sched2 = make(0.7)
    ck = load_checkpoint(tmp_path / "ck", params, scheduler=sched2)
    assert sched2.state_dict()["mode_worse"] == math.inf
    with torch.no_grad():
        for n, p in model2.named_parameters():
            p.copy_(ck["params"][n])
    opt2.load_state_dict(ck["optimizer_state_dict"])
    assert opt2.param_groups[0]["lr"] == 0.05
    run(model2, opt2, sched2, range(5, 12))
    assert sched2.state_dict() == sched.state_dict()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 0.00625
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
