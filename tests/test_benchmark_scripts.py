"""The GPU checks' script runs: ``benchmarks/cuda_checks.sh dry`` runs every command of the
full device run (the CUDA tests, ``optimizer_step.py`` with its chained, chunk-policy and
barrier variants, ``gradient_order.py``, ``jit_first_step.py``, ``train_epoch.py``) on the CPU
at small sizes, so a session lent a GPU for a few minutes does not spend them on a flag that
no longer exists. Slow (about ten minutes here): ``pytest -m slow``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_cuda_checks_dry_run(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), MITHRIL_CACHE_DIR=str(tmp_path / "cache"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    run = subprocess.run(["bash", "benchmarks/cuda_checks.sh", "dry"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1200)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    commands = re.findall(r"^== python3 (\S+)", out, flags=re.M)
    assert commands[0] == "-m" and commands.count("benchmarks/optimizer_step.py") == 7, commands
    for script in ("gradient_order.py", "jit_first_step.py", "train_epoch.py"):
        assert f"benchmarks/{script}" in commands, script
    # each benchmark printed its table: a ratio against the reference measured alongside
    assert len(re.findall(r"\d\.\d\dx", out)) > 20, out[-4000:]
    assert (tmp_path / "log.txt").stat().st_size > 0
