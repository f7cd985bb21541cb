"""Hunt 67, second pass: ``mithril`` command-line flags as a torch / Keras user gives them:
turning a job's default off, errors naming what was typed, resumes, predictions."""

from __future__ import annotations

import json
from pathlib import Path

import conftest
import numpy as np

from mithril.cli import main
from mithril.utils.checkpoint import load_checkpoint


def usage_error(capsys, argv: list[str]) -> str:
    return conftest.usage_error(capsys, argv, last=True)


def charlm(tmp_path: Path) -> list[str]:
    text = tmp_path / "story.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    return ["train", "--task", "charlm", "--data", str(text), "--context", "16",
            "--eval-every", "2", "--d-model", "16", "--layers", "1", "--heads", "2",
            "--batch-size", "4", "--eval-windows", "4", "--sample-chars", "0",
            "--scheduler", "none", "--no-progress", "--no-plot", "--checkpoint"]


# -- a default that is on can be turned off ------------------------------------------------------
def test_charlm_default_clip_norm_is_turned_off_with_none(tmp_path, capsys):
    """charlm clips at 1 by default; ``--clip-norm none`` was 'not a number' and ``0`` is
    refused by the optimizer, so a run without clipping (torch without clip_grad_norm_, Keras
    without clipnorm) could not be asked for. ``none`` now is that run: the same weights as a
    clip that never binds, and no clip_norm in the summary."""
    base = [*charlm(tmp_path), "--steps", "4", "--lr", "0.5", "--warmup-steps", "0"]
    assert main([*base, "--clip-norm", "none", "--out", str(tmp_path / "off")]) == 0
    assert main([*base, "--clip-norm", "1e30", "--out", str(tmp_path / "huge")]) == 0
    assert main([*base, "--out", str(tmp_path / "on")]) == 0
    off = load_checkpoint(tmp_path / "off" / "checkpoint.safetensors")["params"]
    huge = load_checkpoint(tmp_path / "huge" / "checkpoint.safetensors")["params"]
    on = load_checkpoint(tmp_path / "on" / "checkpoint.safetensors")["params"]
    assert all(np.array_equal(off[k], huge[k]) for k in off)
    assert not all(np.array_equal(off[k], on[k]) for k in off)  # (the default clip binds)
    summary = (tmp_path / "off" / "summary.json").read_text()
    assert '"clip_norm"' not in summary
    # resumed, the run keeps no clipping (and refuses one added)
    assert main(["train", "--resume", str(tmp_path / "off"), "--steps", "6"]) == 0
    err = usage_error(capsys, ["train", "--resume", str(tmp_path / "off"), "--steps", "8",
                               "--clip-norm", "1"])
    assert "clip_norm" in err
