"""Review 49: :class:`CheckpointManager`, rotating checkpoints as the peers do.

Keras' ``ModelCheckpoint(save_best_only=True)`` runs side by side (the epochs it writes are
the steps we write); Lightning's ``ModelCheckpoint(save_top_k, monitor, save_last)`` and
orbax's ``CheckpointManager(max_to_keep)`` (not installed) by their documented rules. A
preempted run resumes from ``latest()`` as the run that did not stop; a refused save
writes and removes nothing; the slow test kills a training process mid-save (SIGKILL).
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from mithril.errors import CheckpointError, DTypeError, KeyMismatchError
from mithril.utils.checkpoint import CheckpointManager, load_checkpoint, save_checkpoint
from mithril.utils.lr_schedulers import StepLR
from mithril.utils.optimizers import SGD

NAN = float("nan")
P = {"w": np.ones(3)}


def files(folder) -> list[str]:
    return sorted(os.listdir(folder))


def keras_written(values: list[float], mode: str) -> list[int]:
    """The (1-based) epochs Keras' ModelCheckpoint(save_best_only=True) writes."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import tempfile

    import keras

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    with tempfile.TemporaryDirectory() as d:
        cb = keras.callbacks.ModelCheckpoint(os.path.join(d, "k-{epoch}.weights.h5"),
                                             monitor="val_loss", mode=mode,
                                             save_best_only=True, save_weights_only=True)
        cb.set_model(model)
        for epoch, v in enumerate(values):
            cb.on_epoch_end(epoch, {"val_loss": v})
        return sorted(int(os.path.basename(f)[2:-len(".weights.h5")])
                      for f in glob.glob(os.path.join(d, "*.h5")))


@pytest.mark.parametrize("mode", ["min", "max"])
def test_save_best_only_writes_the_epochs_keras_writes(tmp_path, mode):
    values = [0.5, 0.7, NAN, 0.5, 0.4, 0.4, 0.6, 0.3, 0.3]
    sign = 1 if mode == "min" else -1
    values = [sign * v for v in values]
    expected = keras_written(values, mode)
    assert expected == [1, 5, 8]
    manager = CheckpointManager(tmp_path, max_to_keep=1, best_metric="val_loss", best_mode=mode)
    written = [step for step, v in enumerate(values, 1)
               if manager.save(step, P, metrics={"val_loss": v}) is not None]
    assert written == expected
    assert manager.steps() == [8] and files(tmp_path) == ["ckpt-00000008.safetensors"]
    assert manager.best() == manager.latest() == str(tmp_path / "ckpt-00000008.safetensors")


def test_a_nan_first_metric_does_not_stop_later_saves_as_it_does_in_keras(tmp_path):
    """Keras 3 takes the first value as the best whatever it is: after a NaN nothing
    compares better, and no epoch is saved again. A NaN is never among our best (as
    Lightning, which ranks it worst)."""
    values = [NAN, 0.5, 0.7, 0.4]
    assert keras_written(values, "min") == [1]
    manager = CheckpointManager(tmp_path, max_to_keep=1, best_metric="val_loss")
    written = [step for step, v in enumerate(values, 1)
               if manager.save(step, P, metrics={"val_loss": v}) is not None]
    assert written == [2, 4] and manager.steps() == [4]


def test_keep_the_latest_n_as_orbax_max_to_keep(tmp_path):
    manager = CheckpointManager(tmp_path / "run", max_to_keep=3)
    assert manager.latest() is None and manager.best() is None and manager.steps() == []
    for step in range(0, 14, 2):
        assert manager.save(step, {"w": np.full(3, float(step))}) == manager.path(step)
    assert manager.steps() == [8, 10, 12] and manager.best() == manager.latest()
    assert files(tmp_path / "run") == [f"ckpt-{s:08d}.safetensors" for s in (8, 10, 12)]
    assert load_checkpoint(manager.latest())["params"]["w"].tolist() == [12, 12, 12]
    every = CheckpointManager(tmp_path / "all")
    for step in range(5):
        every.save(step, P)
    assert every.steps() == [0, 1, 2, 3, 4]


def test_top_k_with_the_latest_as_lightnings_save_top_k_and_save_last(tmp_path):
    """save_top_k=2: a new one enters when there is room or when strictly better than the
    worst kept, which it replaces (the earlier of equal ones stays); save_last keeps the
    latest too; a NaN is never among the best."""
    manager = CheckpointManager(tmp_path, max_to_keep=2, best_metric="loss", keep_latest=True)
    plan = [(1, 0.5, [1]), (2, 0.7, [1, 2]), (3, 0.4, [1, 3]), (4, 0.5, [1, 3, 4]),
            (5, NAN, [1, 3, 5]), (6, 0.3, [3, 6]), (7, 0.9, [3, 6, 7])]
    for step, loss, kept in plan:
        assert manager.save(step, P, metrics={"loss": loss, "acc": 1 - loss}) is not None
        assert manager.steps() == kept, step
        assert files(tmp_path) == [f"ckpt-{s:08d}.safetensors" for s in kept]
    assert manager.best() == manager.path(6) and manager.latest() == manager.path(7)
    assert manager.metrics(6) == {"loss": 0.3, "acc": 0.7}
    with pytest.raises(KeyError, match=r"no checkpoint of step 5 .*\[3, 6, 7\]"):
        manager.metrics(5)
    assert load_checkpoint(manager.best())["metrics"]["loss"] == 0.3


def test_a_new_manager_reads_the_folder_and_rotates_what_was_left(tmp_path):
    first = CheckpointManager(tmp_path, best_metric="loss", best_mode="max")
    for step, loss in enumerate([0.1, 0.3, NAN, 0.2]):
        first.save(step, P, metrics={"loss": loss})
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "ckpt-x.safetensors").write_text("not a step")
    save_checkpoint(tmp_path / "ckpt-9.safetensors", P)  # not ours (path(9): ckpt-00000009)
    again = CheckpointManager(tmp_path, max_to_keep=1, best_metric="loss", best_mode="max")
    assert again.steps() == [0, 1, 2, 3] and again.best() == again.path(1)
    assert np.isnan(again.metrics(2)["loss"])
    assert again.save(4, P, metrics={"loss": 0.2}) is None  # not better: nothing written
    assert again.save(5, P, metrics={"loss": 0.4}) == again.path(5)
    assert files(tmp_path) == ["ckpt-00000005.safetensors", "ckpt-9.safetensors",
                               "ckpt-x.safetensors", "notes.txt"]
    bad = tmp_path / "ckpt-00000007.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=f"'{bad}'"):
        CheckpointManager(tmp_path)


def test_refused_saves_write_and_remove_nothing(tmp_path):
    folder = tmp_path / "new"
    manager = CheckpointManager(folder, max_to_keep=1, best_metric="val_loss")
    with pytest.raises(KeyMismatchError, match=r"'val_loss' \(best_metric\), got \['loss'\]"):
        manager.save(1, P, metrics={"loss": 0.1})
    with pytest.raises(TypeError, match="step must be an int"):
        manager.save(1.0, P, metrics={"val_loss": 0.1})
    with pytest.raises(DTypeError, match="int64"):  # an integer parameter: the save refuses it
        manager.save(1, {"w": np.arange(3)}, metrics={"val_loss": 0.1})
    assert not folder.exists() and manager.steps() == []
    manager.save(3, P, metrics={"val_loss": 0.5})
    before = {f: (folder / f).read_bytes() for f in files(folder)}
    opt = SGD(0.1, momentum=0.9)
    with pytest.raises(ValueError, match="step 3 is not after the latest checkpoint's, 3"):
        manager.save(3, P, metrics={"val_loss": 0.1})
    with pytest.raises(ValueError, match="state given without its optimizer"):
        manager.save(4, P, state=opt.init(P), metrics={"val_loss": 0.1})
    assert {f: (folder / f).read_bytes() for f in files(folder)} == before
    assert manager.steps() == [3]
    for kwargs, words in [({"max_to_keep": 0}, "max_to_keep"), ({"best_mode": "auto"}, "best_mode"),
                          ({"prefix": "a/b"}, "prefix"), ({"keep_latest": 1}, "keep_latest"),
                          ({"best_metric": ""}, "best_metric")]:
        with pytest.raises((TypeError, ValueError), match=words):
            CheckpointManager(folder, **kwargs)


def _loop(folder, until: int, stop_at: int | None = None, resume: bool = False):
    """Linear regression, SGD with momentum and StepLR, data reshuffled each epoch (4
    batches); a checkpoint every 3 steps, the best by loss kept and the latest."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((32, 4)), rng.standard_normal(32)
    params = {"w": np.zeros(4), "b": np.zeros(())}
    opt = SGD(0.05, momentum=0.9)
    sched = StepLR(opt, 5, 0.5)
    state, order, step = opt.init(params), np.random.default_rng(1), 0
    epoch_start = order.bit_generator.state
    manager = CheckpointManager(folder, max_to_keep=1, best_metric="loss", keep_latest=True)
    if resume:
        ck = load_checkpoint(manager.latest(), params_template=params, optimizer=opt,
                             scheduler=sched)
        params, state, step = ck["params"], ck["state"], ck["step"]
        order.bit_generator.state = epoch_start = ck["extra"]["order"]
    perm = order.permutation(32)  # (on a resume: the epoch's order, drawn again)
    while step < until:
        idx = perm[(step % 4) * 8:(step % 4 + 1) * 8]
        err = x[idx] @ params["w"] + params["b"] - y[idx]
        grads = {"w": x[idx].T @ err / 4, "b": np.asarray(err.mean() * 2)}
        params, state = opt.update(params, grads, state)
        sched.step()
        step += 1
        if step % 4 == 0:  # the next epoch's order, and the state it is drawn from
            epoch_start = order.bit_generator.state
            perm = order.permutation(32)
        if step % 3 == 0:
            manager.save(step, params, opt, state, sched, extra={"order": epoch_start},
                         metrics={"loss": float((err ** 2).mean())})
        if step == stop_at:
            return None
    return params, state


def test_a_preempted_run_resumes_from_the_latest_as_the_run_that_did_not_stop(tmp_path):
    ref_params, ref_state = _loop(tmp_path / "ref", 22)
    _loop(tmp_path / "run", 22, stop_at=14)  # preempted after step 14: the latest is 12,
    # an epoch's end
    assert CheckpointManager(tmp_path / "run").latest().endswith("ckpt-00000012.safetensors")
    params, state = _loop(tmp_path / "run", 22, resume=True)
    for k in ref_params:
        np.testing.assert_array_equal(params[k], ref_params[k])
    np.testing.assert_array_equal(state.slot("momentum")["w"], ref_state.slot("momentum")["w"])
    assert CheckpointManager(tmp_path / "run").steps() == \
        CheckpointManager(tmp_path / "ref").steps()


CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from mithril.utils.checkpoint import CheckpointManager, load_checkpoint, save_checkpoint
    folder, total = sys.argv[1], int(sys.argv[2])
    manager = CheckpointManager(folder, max_to_keep=2, best_metric="loss", keep_latest=True)
    w, step = np.zeros(200_000), 0
    if manager.latest() is not None:
        ck = load_checkpoint(manager.latest())
        w, step = ck["params"]["w"], ck["extra"]["step"]
    while step < total:
        step += 1
        w = w * 0.99 + np.sin(step + np.arange(200_000.0))
        manager.save(step, {"w": w}, extra={"step": step},
                     metrics={"loss": float(np.sin(step * 1.7))})
        print(step, flush=True)
""")


@pytest.mark.slow
def test_a_training_process_killed_mid_save_resumes_to_the_same_end(tmp_path):
    total = 60
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, "-c", CHILD, str(ref), str(total)], check=True,
                   capture_output=True, env=env)
    run, rng, kills = tmp_path / "run", np.random.default_rng(3), 0
    while True:
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(run), str(total)],
                                 stdout=subprocess.PIPE, text=True, env=env)
        line = child.stdout.readline()
        if line:  # one save done: kill at a random moment, often mid-save
            time.sleep(float(rng.uniform(0, 0.2)))
            child.send_signal(signal.SIGKILL)
            kills += 1
        child.wait()
        child.stdout.close()
        manager = CheckpointManager(run)  # every file there is whole
        assert len(manager.steps()) <= 4  # two best, the latest, one a kill left over
        if manager.latest() and load_checkpoint(manager.latest())["extra"]["step"] == total:
            break
    assert kills >= 3
    kept = {"max_to_keep": 2, "best_metric": "loss", "keep_latest": True}
    got, want = CheckpointManager(run, **kept), CheckpointManager(ref, **kept)
    np.testing.assert_array_equal(load_checkpoint(got.latest())["params"]["w"],
                                  load_checkpoint(want.latest())["params"]["w"])
    assert got.best() == str(run / os.path.basename(want.best()))  # the same step
    np.testing.assert_array_equal(load_checkpoint(got.best())["params"]["w"],
                                  load_checkpoint(want.best())["params"]["w"])
