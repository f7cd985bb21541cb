"""A loss-aware optimizer (Momo: ``needs_loss``) under ``MixedPrecisionTrainer``: its step
takes the objective whose gradients the backward computed, Σ cotangent·output of the
half-precision forward (what ``make_train_step`` passes), so ``mithril train --optimizer
momo --mixed-precision fp16`` runs; the CLI's data-parallel loop passes it as well."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from test_mixed_precision import BACKENDS, as_np, regressor

import mithril as ml
from mithril.utils.mixed_precision import MixedPrecisionTrainer
from mithril.utils.optimizers import Momo


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_momo_steps_with_the_forwards_objective(kind):
    backend = BACKENDS[kind](dtype="float16", seed=3)
    compiled = ml.compile(regressor(), backend)
    trainer = MixedPrecisionTrainer(compiled, Momo(learning_rate=0.5), compiled.get_parameters(),
                                    None, loss_scale=1024.0)
    x, t = backend.randn(16, 8), backend.randn(16, 4)
    before = copy.deepcopy(dict(trainer.master_params))  # (float32 masters)
    out = trainer.forward({"input": x})
    cot = 2 * (out["output"] - t) / 16
    objective = float(np.sum(backend.to_numpy(out["output"]).astype(np.float64)
                             * backend.to_numpy(cot).astype(np.float64)))
    params, _, success = trainer.backward_and_update({"output": cot})
    assert success
    grads = trainer.last_gradients
    got = as_np(backend, params)
    for loss, same in ((objective, True), (objective * 1.5, False)):
        ref = Momo(learning_rate=0.5)
        want, _ = ref.update(dict(before), grads, ref.init(dict(before)), loss=loss)
        want = as_np(backend, want)
        close = all(np.allclose(got[k], want[k], rtol=1e-6, atol=1e-7) for k in want)
        assert close is same, (loss, {k: float(np.abs(got[k] - want[k]).max()) for k in want})


def test_the_cli_trains_momo_with_mixed_precision_and_two_ranks(tmp_path):
    from mithril.cli import main

    for extra in (["--mixed-precision", "fp16"], ["--nprocs", "2"]):
        out = tmp_path / extra[0].strip("-")
        assert main(["train", "--optimizer", "momo", "--epochs", "1", "--backend", "torch",
                     "--out", str(out), *extra]) in (0, None)
        assert (out / "summary.json").exists()
