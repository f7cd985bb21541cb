"""Every benchmark script still runs: each of ``benchmarks/`` that the GPU checks' dry run
(``test_benchmark_scripts.py``) does not cover, at its smallest sizes, in a fresh process with
its own kernel cache. Each must exit 0 without a traceback and print its table (figures with
the reference measured alongside). Slow (about six minutes here): ``pytest -m slow``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: script -> (arguments, a line its table must print)
RUNS = {
    "adaptive_clip.py": (["--sizes", "1Mx1", "--rounds", "1", "--block", "2", "--warm", "0"],
                         r"\d\.\d\dx"),
    "catalog.py": (["--quick", "--only", "Adam,Lion", "--sizes", "a"], r"\d\.\d\dx"),
    "param_groups.py": (["--rounds", "1", "--block", "2", "--warm", "0"], r"\d\.\d\dx"),
    "piece_layout.py": (["--params", "500K", "--rounds", "1", "--block", "2"], r"\d\.\d\dx"),
    "jax_array_reads.py": (["--tensors", "20", "--size", "100", "--repeats", "2"],
                           r"optax adam, jitted\s+\d+\.\d+"),
    "lbfgs.py": (["--steps", "3"], r"\d\.\d\dx"),
    "muon.py": (["--steps", "2", "--pool", "2"], r"\d\.\d\dx"),
    "muon_conventions.py": (["--layouts", "tiny", "--steps", "2", "--pool", "2"],
                            r"optax convention\s+\d+\.\d+ ms\s+\d\.\d\dx"),
    "cold_start.py": (["--repeats", "1", "--backends", "numpy"],
                      r"mithril numpy, second\s+\d+\.\d+"),
    "distributed_step.py": (["--params", "10000", "--steps", "3"], r"\d+\.\d+"),
    "memory.py": (["--params", "100000", "--tensors", "4", "--case", "numpy", "torch-fused",
                   "--repeat", "1"], r"torch-fused\s+\d+\.\d+ B/param"),
    "train_step.py": (["--case", "mlp", "--backend", "numpy", "--rounds", "1"],
                      r"mlp\s+numpy\s+\d+\.\d+\s+\d+\.\d+\s+\d\.\d+"),
    "charlm.py": (["--backend", "numpy", "--steps", "5", "--eval-every", "5"], r"\d+\.\d+"),
    "unreached_step.py": (["--backend", "numpy", "--rounds", "1", "--steps", "5",
                           "--warmup", "2"], r"unreached\s+\d+\.\d+ us\s+x\d\.\d+"),
    "unreached_averaging_jax.py": (["--rounds", "1", "--steps", "3", "--optimizers", "adamw"],
                                   r"one program: True\s+median\s+\d+\.\d+"),
    "tensorwise_jax_jit.py": (["--steps", "2", "--only", "sm3"], r"jit\s+\d+\.\d+ ms \(\s*\d+\.\d\dx\)"),
    "step_overhead.py": (["--rounds", "1"], r"step\s+\d+\.\d+\s+\d+\.\d+\s+\d\.\d+x"),
    "jax_ffi_update.py": (["--layers", "2", "--rounds", "1"],
                          r"ffi call\s+\d+\.\d+\s+\d+\.\d+\s+\d+\.\d+x"),
    "jax_step_compile.py": (["--hidden", "8", "--rounds", "1"],
                            r"optax jitted step\s+\d+\.\d+\s+1\.00x"),
    "train_step_wrappers.py": (["--rounds", "1", "--steps", "2", "--wrapper", "sam", "dpsgd"],
                               r"dpsgd\s+\d+\.\d+\s+\d+\.\d+\s+\d+\.\d+\s+\d+\.\d+x"),
    "galore.py": (["--matrices", "2", "--rows", "64", "--cols", "16", "--rounds", "1", "--block",
                   "2", "--warm", "0", "--backends", "numpy"], r"refresh\s+numpy\s+\d+\.\d+\s+\d+\.\d+"),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(RUNS))
def test_benchmark_runs(script, tmp_path):
    args, table = RUNS[script]
    env = dict(os.environ, MITHRIL_CACHE_DIR=str(tmp_path / "cache"))
    run = subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    out = run.stdout + run.stderr
    assert run.returncode == 0 and "Traceback" not in out, out[-4000:]
    assert re.search(table, run.stdout), run.stdout[-4000:]


def test_every_benchmark_script_is_smoke_tested():
    # a new script joins RUNS (or the GPU checks' dry run), so that it cannot rot unseen
    dry = (ROOT / "benchmarks" / "cuda_checks.sh").read_text()
    scripts = {p.name for p in (ROOT / "benchmarks").glob("*.py")}
    assert scripts - set(RUNS) - {s for s in scripts if f"benchmarks/{s}" in dry} == set()
