"""``mithril train --checkpoint`` / ``--resume DIR``: a run stopped and resumed is the run
that did not stop, bit for bit (parameters, Adam's moments, the EMA, the loss log), at an
epoch boundary and in the middle of an epoch (Ctrl-C); what would change the run is refused,
naming it, and nothing is written."""

from __future__ import annotations

import csv
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from mithril.cli import main
from mithril.cli.training import Run
from mithril.utils.checkpoint import load_checkpoint

pytest.importorskip("sklearn")

# Adam, a warm-up then a step schedule (its shape does not depend on the run's length), EMA
FLAGS = ["--target", "label", "--batch-size", "8", "--hidden", "6", "--lr", "0.01",
         "--scheduler", "step:step_size=5,gamma=0.7", "--warmup-steps", "3", "--ema", "0.9",
         "--no-progress", "--no-plot"]


def _table(path: Path, n: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3)).round(4)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["a", "b", "c", "label"])
        w.writerows([[*r.tolist(), int(r[0] + 0.5 * r[1] > 0)] for r in x])
    return path


def _train(*argv: str) -> int:
    return main(["train", *argv])


def _epochs_without_time(run: Path) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k != "time_s"}
            for r in csv.DictReader(open(run / "epochs.csv"))]


def _assert_same_run(a: Path, b: Path) -> None:
    assert (a / "metrics.csv").read_text() == (b / "metrics.csv").read_text()
    assert _epochs_without_time(a) == _epochs_without_time(b)
    ca, cb = (load_checkpoint(d / "checkpoint.safetensors") for d in (a, b))
    assert ca["params"].keys() == cb["params"].keys()
    for k in ca["params"]:
        np.testing.assert_array_equal(ca["params"][k], cb["params"][k])
    sa, sb = ca["optimizer_state_dict"], cb["optimizer_state_dict"]
    assert sa["step"] == sb["step"] and set(sa["slots"]) == set(sb["slots"])
    for slot in sa["slots"]:
        for k in sa["slots"][slot]:
            np.testing.assert_array_equal(sa["slots"][slot][k], sb["slots"][slot][k])
    if (a / "model.safetensors").exists():
        assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_half_then_resume_is_the_whole_run(tmp_path: Path, backend: str) -> None:
    if backend == "torch":
        pytest.importorskip("torch")
    data = str(_table(tmp_path / "t.csv"))
    common = ["--data", data, *FLAGS, "--backend", backend, "--checkpoint"]
    assert _train(*common, "--epochs", "4", "--out", str(tmp_path / "whole")) == 0
    assert _train(*common, "--epochs", "2", "--out", str(tmp_path / "half")) == 0
    half = load_checkpoint(tmp_path / "half" / "checkpoint.safetensors")
    assert half["extra"]["position"]["epoch"] == 3 and half["extra"]["steps"] == 8
    assert set(half["optimizer_state_dict"]["slots"]) == {"m", "v", "ema"}
    assert _train("--resume", str(tmp_path / "half"), "--epochs", "4", "--no-progress") == 0
    _assert_same_run(tmp_path / "whole", tmp_path / "half")
    rows = list(csv.DictReader(open(tmp_path / "half" / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, 17))
    # the loss moved: the comparison is of a run that learns
    assert float(rows[-1]["loss"]) != float(rows[0]["loss"])


def test_ctrl_c_mid_epoch_then_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """The default cosine schedule over the whole run; Ctrl-C during step 6 (epoch 2 of 5)
    is held to the end of the step, the checkpoint written, and the resume finishes it."""
    data = str(_table(tmp_path / "t.csv"))
    common = ["--data", data, "--target", "label", "--batch-size", "8", "--hidden", "6",
              "--ema", "0.8", "--epochs", "5", "--no-progress", "--no-plot", "--checkpoint"]
    assert _train(*common, "--out", str(tmp_path / "whole")) == 0
    step = Run.step
    calls = []

    def interrupted(self: Run, x: np.ndarray, y: np.ndarray) -> tuple:
        calls.append(1)
        if len(calls) == 6:
            os.kill(os.getpid(), signal.SIGINT)  # arrives inside the step
        return step(self, x, y)

    monkeypatch.setattr(Run, "step", interrupted)
    assert _train(*common, "--out", str(tmp_path / "cut")) == 130
    monkeypatch.setattr(Run, "step", step)
    ckpt = load_checkpoint(tmp_path / "cut" / "checkpoint.safetensors")
    assert ckpt["extra"]["steps"] == 6 and ckpt["extra"]["position"]["epoch"] == 2
    assert ckpt["extra"]["position"]["batch"] == 2  # 4 steps per epoch
    assert len(list(csv.DictReader(open(tmp_path / "cut" / "metrics.csv")))) == 6
    capsys.readouterr()
    assert _train("--resume", str(tmp_path / "cut"), "--no-progress", "--no-plot") == 0
    assert "after step 6 (epoch 2, 2 of its batches done)" in capsys.readouterr().out
    _assert_same_run(tmp_path / "whole", tmp_path / "cut")


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_resume_refuses_what_differs_and_writes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = str(_table(tmp_path / "t.csv"))
    run = tmp_path / "run"
    assert _train("--data", data, *FLAGS, "--epochs", "2", "--checkpoint", "--out",
                  str(run)) == 0
    cosine = tmp_path / "cosine"
    assert _train("--data", data, "--target", "label", "--hidden", "6", "--epochs", "2",
                  "--no-progress", "--no-plot", "--checkpoint", "--out", str(cosine)) == 0
    plain = tmp_path / "plain"
    assert _train("--data", data, *FLAGS, "--epochs", "1", "--out", str(plain)) == 0
    _table(tmp_path / "more.csv", n=50)
    _table(tmp_path / "other.csv", seed=1)
    before = {d: _files(d) for d in (run, cosine, plain)}
    cases = [
        (["--resume", str(run), "--epochs", "4", "--optimizer", "sgd", "--hidden", "7"],
         "changes the run's hidden ([6] in the run, [7] now); optimizer ('adam' in the run, "
         "'sgd' now)"),
        (["--resume", str(run), "--epochs", "4", "--ema", "0.5"],
         "changes the run's ema (0.9 in the run, 0.5 now)"),
        (["--resume", str(run), "--epochs", "4", "--data", str(tmp_path / "more.csv")],
         "the data differ from the run's (train [32, 3] then, [40, 3] now; test [8, 3] "
         "then, [10, 3] now)"),
        (["--resume", str(run), "--epochs", "4", "--data", str(tmp_path / "other.csv")],
         "the data differ from the run's (the same shapes, other values)"),
        (["--resume", str(run)], "the run has done its 2 epochs; give a larger --epochs"),
        (["--resume", str(cosine), "--epochs", "4"],
         "learning-rate schedule differs from the run's: step 2 used lr"),
        (["--resume", str(plain), "--epochs", "4"],
         f"--resume {plain}: no checkpoint.safetensors in it (a run trained with --checkpoint"),
        (["--resume", str(tmp_path / "nowhere")], "nowhere: no such folder"),
        (["--resume", str(run), "--epochs", "4", "--precision", "bf16"],
         "changes the run's mixed_precision ('none' in the run, 'bf16' now)"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            _train(*argv, "--no-progress")
        assert e.value.code == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)
    assert {d: _files(d) for d in (run, cosine, plain)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["t.csv", "more.csv", "other.csv", "run", "cosine", "plain"])


def test_mixed_precision_resumes_with_its_loss_scale(tmp_path: Path) -> None:
    """fp16 with a loss scale too large: the first steps overflow and halve it, on across the
    resume (after step 12); the scaler, the float32 masters and Adam's state carry over."""
    data = str(_table(tmp_path / "t.csv"))
    common = ["--data", data, *FLAGS, "--precision", "fp16", "--loss-scale", "1e9",
              "--checkpoint"]
    assert _train(*common, "--epochs", "6", "--out", str(tmp_path / "whole")) == 0
    assert _train(*common, "--epochs", "3", "--out", str(tmp_path / "half")) == 0
    half = load_checkpoint(tmp_path / "half" / "checkpoint.safetensors")
    assert half["params"]["mlp.linear_0.weight"].dtype == np.float32  # the masters
    assert half["extra"]["mixed_precision_trainer"]["num_skipped_steps"] == 12
    assert _train("--resume", str(tmp_path / "half"), "--epochs", "6", "--no-progress") == 0
    _assert_same_run(tmp_path / "whole", tmp_path / "half")
    rows = list(csv.DictReader(open(tmp_path / "half" / "metrics.csv")))
    skipped = [int(r["skipped"]) for r in rows]
    first = skipped.index(0)
    assert first > 12 and skipped[:first] == [1] * first  # the backoff goes on after the resume
    scales = [float(r["loss_scale"]) for r in rows[:first]]
    assert all(b == a / 2 for a, b in zip(scales, scales[1:]))
