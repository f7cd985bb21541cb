"""``mithril predict`` computes in the dtype the run was trained in (recorded in its
model.safetensors), ``--dtype`` overrides it, and a model file saved before the dtype was
recorded predicts in float32 as it did, with a note."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from mithril.cli import main
from mithril.utils.checkpoint import load_checkpoint, save_checkpoint

pytest.importorskip("sklearn")


def _table(path: Path, n: int = 30) -> Path:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((n, 3))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["a", "b", "c", "kind"])
        w.writerows([[*r.round(5).tolist(), "up" if r[0] - r[2] > 0 else "down"] for r in x])
    return path


def _train(tmp_path: Path, out: str, *extra: str) -> Path:
    data = tmp_path / "t.csv" if (tmp_path / "t.csv").exists() else _table(tmp_path / "t.csv")
    assert main(["train", "--data", str(data), "--target", "kind", "--epochs", "3",
                 "--batch-size", "8", "--hidden", "6", "5", "--activation", "tanh", "--lr",
                 "0.05", "--no-progress", "--no-plot", "--out", str(tmp_path / out),
                 *extra]) == 0
    return tmp_path / out


def _predict(run: Path, *extra: str) -> np.ndarray:
    out = run / "p.csv"
    assert main(["predict", "--run", str(run), "--data", str(run.parent / "t.csv"),
                 "--out", str(out), *extra]) == 0
    rows = list(csv.DictReader(open(out)))
    return np.array([[float(r["p_down"]), float(r["p_up"])] for r in rows])


def _features(run: Path) -> np.ndarray:
    pre = json.loads((run / "preprocess.json").read_text())
    with open(run.parent / "t.csv") as f:
        x = np.array([[float(r[c]) for c in pre["features"]] for r in csv.DictReader(f)])
    return (x - np.array(pre["mean"])) / np.array(pre["std"])


def _numpy_probs(run: Path, dtype: type) -> np.ndarray:
    """The saved MLP (tanh, tanh, linear; weights (out, in)) evaluated in NumPy in ``dtype``."""
    p = {k: np.asarray(v, dtype=dtype) for k, v in
         load_checkpoint(run / "model.safetensors")["params"].items()}
    h = _features(run).astype(dtype)
    for i in range(3):
        h = h @ p[f"mlp.linear_{i}.weight"].T + p[f"mlp.linear_{i}.bias"]
        h = np.tanh(h) if i < 2 else h
    z = h.astype(np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_float64_run_predicts_in_float64(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    run = _train(tmp_path, "r64", "--dtype", "float64")
    assert load_checkpoint(run / "model.safetensors")["params"]["mlp.linear_0.weight"].dtype \
        == np.float64
    capsys.readouterr()
    got = _predict(run)
    assert "in float64" in capsys.readouterr().out
    want = _numpy_probs(run, np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    # float32 (the old behaviour) is measurably further away: the test can tell them apart
    assert np.abs(_numpy_probs(run, np.float32) - want).max() > 1e-9
    # the torch backend, and torch's own functional MLP with the same weights
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    np.testing.assert_allclose(_predict(run, "--backend", "torch"), want, rtol=0, atol=1e-12)
    w = {k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in
         load_checkpoint(run / "model.safetensors")["params"].items()}
    h = torch.from_numpy(_features(run))
    for i in range(3):
        h = F.linear(h, w[f"mlp.linear_{i}.weight"], w[f"mlp.linear_{i}.bias"])
        h = torch.tanh(h) if i < 2 else h
    np.testing.assert_allclose(got, F.softmax(h, dim=1).numpy(), rtol=0, atol=1e-12)


def test_dtype_override_and_old_model_files(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    run = _train(tmp_path, "r64", "--dtype", "float64")
    f32 = _numpy_probs(run, np.float32)
    np.testing.assert_allclose(_predict(run, "--dtype", "float32"), f32, rtol=0, atol=1e-6)
    assert np.abs(_predict(run, "--dtype", "float32") - _numpy_probs(run, np.float64)).max() \
        > 1e-9
    # a model file saved before the dtype was recorded: float32 as before, and a note
    ckpt = load_checkpoint(run / "model.safetensors")
    extra = {k: v for k, v in ckpt["extra"].items() if k not in ("compute_dtype",
                                                                  "mixed_precision")}
    save_checkpoint(run / "model.safetensors", ckpt["params"], extra=extra)
    capsys.readouterr()
    old = _predict(run)
    out = capsys.readouterr().out
    assert "does not record the dtype it was trained in" in out and "in float32" in out
    assert "stored in float64: give --dtype to choose" in out
    np.testing.assert_allclose(old, f32, rtol=0, atol=1e-6)
    np.testing.assert_allclose(_predict(run, "--dtype", "float64"),
                               _numpy_probs(run, np.float64), rtol=0, atol=1e-12)


def test_mixed_precision_run_predicts_in_its_compute_dtype(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _train(tmp_path, "bf", "--precision", "bf16")
    saved = load_checkpoint(run / "model.safetensors")
    assert saved["extra"]["compute_dtype"] == "bfloat16"
    assert saved["params"]["mlp.linear_0.weight"].dtype == np.float32  # the masters
    capsys.readouterr()
    half = _predict(run)
    assert "in bfloat16" in capsys.readouterr().out
    full = _predict(run, "--dtype", "float32")
    np.testing.assert_allclose(full, _numpy_probs(run, np.float32), rtol=0, atol=1e-6)
    # bfloat16 keeps 8 bits of mantissa: near, not equal
    assert 1e-5 < np.abs(half - full).max() < 5e-2


def test_dtype_too_narrow_for_the_weights_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _train(tmp_path, "r", "--dtype", "float64")
    ckpt = load_checkpoint(run / "model.safetensors")
    params = dict(ckpt["params"])
    params["mlp.linear_0.bias"] = params["mlp.linear_0.bias"] * 1e6  # beyond float16's 65504
    save_checkpoint(run / "model.safetensors", params, extra=ckpt["extra"])
    with pytest.raises(SystemExit) as e:
        main(["predict", "--run", str(run), "--data", str(tmp_path / "t.csv"),
              "--dtype", "float16"])
    assert e.value.code == 2
    assert "--dtype float16: weights of model.safetensors overflow it (mlp.linear_0.bias)" \
        in capsys.readouterr().err
    assert not (run / "predictions.csv").exists()
