"""Every keras.optimizers class we have, random hyperparameters, shapes, gradients and the
BaseOptimizer options a Keras user sets, side by side with ours (``keras_parity_hunt``).

Each configuration (:func:`keras_parity_hunt.config`): Keras's class with random
hyperparameters; one of clipnorm / clipvalue / global_clipnorm or none; weight_decay with
``exclude_from_weight_decay(var_names=["b"])`` or not; use_ema with ema_momentum and an
ema_overwrite_frequency, or gradient_accumulation_steps; a loss_scale_factor; an
ExponentialDecay schedule (staircase or not); shapes 0-d to 3-d; some tensors without a
gradient on some steps. Ours by the mapping of docs/optimizers.md "From Keras 3". Keras runs
on the JAX backend in float64 in a subprocess (x64 is process-global), ours on NumPy there
too; the parameters after every one of 12 steps and the EMA at the end must agree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from keras_parity_hunt import CLASSES

#: what each comparison allows: float64 rounding, except Muon (Keras adds 1e-7 to ‖U‖, we
#: take max(‖U‖, ε): ~1e-7 relative per step)
TOL, TOL_MUON = 1e-9, 2e-6


def run(pairs: list[tuple[str, int]]) -> list[dict]:
    """:func:`keras_parity_hunt.compare` of each (class, seed), in a subprocess."""
    code = (f"import sys, json\nsys.path.insert(0, {os.path.dirname(__file__)!r})\n"
            "import keras_parity_hunt as h\nh.setup_keras()\n"
            f"out = [{{**h.compare(cfg), 'cfg': cfg}} for cfg in "
            f"(h.config(c, s) for c, s in {pairs!r})]\nprint(json.dumps(out))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=3000, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check(results: list[dict]) -> None:
    bad = []
    for r in results:
        cfg = r["cfg"]
        tol = TOL_MUON if cfg["cls"] == "Muon" else TOL
        if r["traj"] > tol or r.get("ema", 0.0) > tol:  # (the EMA averages those)
            bad.append(f"{cfg['cls']} seed {cfg['seed']}: {r['traj']:.1e} from step "
                       f"{r['step']}, EMA {r.get('ema')}; {cfg['opts']} {cfg['our_kw']}")
    assert not bad, "\n".join(bad)


def test_keras_parity_a_few_random_configurations() -> None:
    """Configurations that between them set every option (a quick run; the slow test below
    runs eight random ones of every class)."""
    check(run([("SGD", 1), ("Nadam", 0), ("Adam", 1), ("Adafactor", 0)]))


@pytest.mark.slow
@pytest.mark.parametrize("cls", CLASSES)
def test_keras_parity_random(cls: str) -> None:
    check(run([(cls, s) for s in range(8)]))
