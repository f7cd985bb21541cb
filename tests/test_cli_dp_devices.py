"""``mithril train --backend jax --devices N --optimizer dpsgd``: one JAX process over its
local devices trains DP-SGD (the sharded step computes each example's gradient on the mesh:
:mod:`mithril.utils.train_step_private`), as one device does. It was refused ("trains in one
process"); ``--nprocs`` and torchrun still are (a gradient per batch per process)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_cli_distributed import TINY, rows, run_procs

pytest.importorskip("jax")

DP = [*TINY, "--backend", "jax", "--dtype", "float64", "--optimizer",
      "dpsgd:lr=0.1,noise_multiplier=1.1,momentum=0.5"]


def test_two_devices_equal_one(tmp_path) -> None:
    runs = {}
    for devices in (None, 2):
        out = tmp_path / f"d{devices}"
        argv = ["train", *DP, *(["--devices", str(devices)] if devices else []),
                "--out", str(out)]
        res = run_procs(argv)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[devices] = out
    one, two = (rows(runs[d] / "metrics.csv") for d in (None, 2))
    assert len(one) == len(two) == 23
    for key in ("loss", "acc", "grad_norm"):
        np.testing.assert_allclose([float(r[key]) for r in two], [float(r[key]) for r in one],
                                   rtol=1e-10, atol=1e-12, err_msg=key)
    p1, p2 = (json.loads((runs[d] / "summary.json").read_text())["privacy"] for d in (None, 2))
    assert p2["epsilon"] == pytest.approx(p1["epsilon"], rel=1e-12) and p1["epsilon"] > 0
    assert json.loads((runs[2] / "summary.json").read_text())["devices"] == 2


def test_more_processes_are_still_refused(tmp_path) -> None:
    res = run_procs(["train", *DP, "--nprocs", "2", "--out", str(tmp_path / "run")])
    assert res.returncode == 2, res.stderr[-2000:]
    assert "trains in one process" in res.stderr and "--nprocs" in res.stderr
    assert not (tmp_path / "run").exists()
