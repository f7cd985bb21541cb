"""``mithril train --optimizer sophia``: the loop measures Hutchinson's estimate of the
Hessian's diagonal on Sophia's due steps (as optax's sophia does inside its update), with
signs drawn from ``--seed`` and the step count: the same on every backend, and a resumed run
draws what the uninterrupted one drew."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_cli_resume import _assert_same_run, _table, _train

from mithril.cli.main import main
from mithril.utils.checkpoint import load_checkpoint
from mithril.utils.hessian import hutchinson_diagonal

pytest.importorskip("sklearn")

SOPHIA = ["--optimizer", "sophia:update_interval=2", "--target", "label", "--batch-size", "8",
          "--hidden", "6", "--lr", "0.01", "--scheduler", "none", "--no-progress",
          "--no-plot", "--checkpoint"]


def _state(run: Path) -> dict:
    return load_checkpoint(run / "checkpoint.safetensors")


def test_the_loop_folds_the_estimate_into_nu_and_backends_agree(tmp_path: Path) -> None:
    data = _table(tmp_path / "t.csv")
    runs = {}
    for be in ("numpy", "torch", "jax"):
        runs[be] = tmp_path / be
        assert _train("--data", str(data), *SOPHIA, "--epochs", "2", "--backend", be,
                      "--out", str(runs[be])) == 0
    ck = {be: _state(r) for be, r in runs.items()}
    nus = {be: c["optimizer_state_dict"]["slots"]["nu"] for be, c in ck.items()}
    # (before the loop measured it, nu stayed 0 and the step was clipped sign descent)
    for nu in nus.values():
        assert all(np.isfinite(v).all() for v in nu.values())
        assert max(float(np.abs(v).max()) for v in nu.values()) > 1e-3
    # the same signs on every backend; torch and JAX exact products (NumPy's by central
    # differences, which a ReLU's kink inside the step throws off for some entries)
    for k, v in nus["torch"].items():
        np.testing.assert_allclose(v, nus["jax"][k], rtol=1e-4, atol=1e-7)
    for be in ("numpy", "jax"):
        for k, v in ck[be]["params"].items():
            np.testing.assert_allclose(v, ck["torch"]["params"][k], rtol=0, atol=2e-4)


def test_a_resumed_run_is_the_uninterrupted_one(tmp_path: Path) -> None:
    data = _table(tmp_path / "t.csv")
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert _train("--data", str(data), *SOPHIA, "--epochs", "3", "--out", str(whole)) == 0
    assert _train("--data", str(data), *SOPHIA, "--epochs", "1", "--out", str(part)) == 0
    assert main(["train", "--resume", str(part), "--epochs", "3", "--no-progress",
                 "--no-plot"]) == 0
    _assert_same_run(whole, part)


def test_the_estimate_is_hutchinsons_at_the_params_before_the_step() -> None:
    """What the loop folds in: hutchinson_diagonal with a Generator of (seed, step); the
    same generator twice gives the same estimate (the draws are not shared state)."""
    import mithril as ml
    from mithril.backends import NumpyBackend
    from mithril.cli.networks import mlp_spec

    spec = mlp_spec(3, 2, [4])
    c = ml.compile(spec.model, NumpyBackend(dtype="float64"), shapes={"input": [5, 3]})
    p = c.get_parameters()
    rng = np.random.default_rng(0)
    data = {"input": rng.standard_normal((5, 3)), "target": rng.integers(0, 2, 5)}
    make = lambda: np.random.default_rng(np.random.SeedSequence([7, 4]))  # noqa: E731
    a = hutchinson_diagonal(c, p, data, make(), loss="loss")
    b = hutchinson_diagonal(c, p, data, make(), loss="loss")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("argv, said", [
    (["--optimizer", "sophia", "--task", "digits-cnn"], "Dropout or BatchNorm"),
    (["--optimizer", "sophia", "--mixed-precision", "bfloat16"], "mixed-precision"),
])
def test_where_the_loop_cannot_measure_it_sophia_is_refused(tmp_path, capsys, argv, said):
    out = tmp_path / "run"
    with pytest.raises(SystemExit):
        main(["train", *argv, "--epochs", "1", "--no-progress", "--no-plot",
              "--out", str(out)])
    assert said in capsys.readouterr().err
    assert not out.exists()
