"""Claims of docs/optimizers.md, docs/training.md, docs/coming-from-mlx.md and
docs/dropout-batchnorm.md checked against the code and the peer library side by side."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

from mithril.utils.lr_schedulers import ReduceLROnPlateau
from mithril.utils.optimizers import SGD

DOCS = Path(os.environ.get("DOCS_DIR", Path(__file__).resolve().parent.parent / "docs"))


def _table_row(page: str, peer: str) -> str:
    """The "here" cell of the table row of ``page`` whose first cell starts with ``peer``."""
    for line in (DOCS / page).read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].startswith(f"`{peer}"):
            return re.match(r"`([^`]*)`", cells[1]).group(1)
    raise AssertionError(f"no row for {peer} in {page}")


@pytest.mark.parametrize("patience, cooldown", [(0, 0), (0, 2), (1, 0), (3, 1)])
def test_keras_reduce_on_plateau_row_runs_and_equals_keras(patience, cooldown):
    # the row said patience=patience - 1: Keras's patience=0 (valid there, it reduces at the
    # first evaluation without improvement) gave -1, which ReduceLROnPlateau refuses
    os.environ.setdefault("KERAS_BACKEND", "jax")
    keras = pytest.importorskip("keras")
    mapping = _table_row("optimizers.md", "keras.callbacks.ReduceLROnPlateau(")
    factor, min_delta, min_lr, c = 0.5, 1e-3, 1e-4, cooldown
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    callback = keras.callbacks.ReduceLROnPlateau(
        monitor="val_loss", factor=factor, patience=patience, min_delta=min_delta,
        cooldown=c, min_lr=min_lr, verbose=0)
    callback.set_model(model)
    callback.on_train_begin()
    opt = SGD(learning_rate=0.1)
    ours = eval(mapping, {"ReduceLROnPlateau": ReduceLROnPlateau, "max": max},
                {"opt": opt, "factor": factor, "patience": patience, "min_delta": min_delta,
                 "c": c, "min_lr": min_lr})
    metrics = [1.0, 0.9, 0.9, 0.95, 0.85, 0.8505, 0.86, 0.87, 0.7, 0.7, 0.7, 0.7, 0.71,
               0.69, 0.69, 0.69]
    mine, theirs = [], []
    for epoch, m in enumerate(metrics):
        callback.on_epoch_end(epoch, {"val_loss": m})
        ours.step(m)
        mine.append(opt.get_learning_rate())
        theirs.append(float(model.optimizer.learning_rate))
    np.testing.assert_allclose(mine, theirs, rtol=1e-6)
    assert min(mine) < 0.1  # it did reduce


def test_scheduler_state_dict_with_unknown_key_is_refused_and_changes_nothing():
    # "Schedulers have state_dict() / load_state_dict() too ... checked the same way": an
    # optimizer's state dict with a key it does not know is refused, a scheduler's was loaded
    # with the key silently ignored (a typo such as "gama", or a nested child's)
    import json

    import torch

    from mithril.utils.lr_schedulers import ExponentialLR, SequentialLR, StepLR

    saved_opt = SGD(learning_rate=0.1)
    saved = StepLR(saved_opt, step_size=3, gamma=0.5)
    for _ in range(4):
        saved.step()
    typo = json.loads(json.dumps(saved.state_dict()))
    typo["gama"] = 0.9
    opt = SGD(learning_rate=0.1)
    sched = StepLR(opt, step_size=3, gamma=0.5)
    sched.step()
    with pytest.raises(KeyError, match="gama"):
        sched.load_state_dict(typo)
    # nothing changed: the run goes on as torch's StepLR, uninterrupted
    w = torch.nn.Parameter(torch.zeros(1))
    ref = torch.optim.SGD([w], lr=0.1)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref, step_size=3, gamma=0.5)
    ref.step()
    ref_sched.step()
    assert sched.last_step == 1
    for _ in range(7):
        assert abs(opt.get_learning_rate() - ref.param_groups[0]["lr"]) < 1e-15
        ref.step()
        ref_sched.step()
        sched.step()
    # the state without the typo loads
    del typo["gama"]
    sched.load_state_dict(typo)
    assert sched.last_step == 4 and abs(opt.get_learning_rate() - 0.05) < 1e-15

    # a nested child's unknown key, inside a composite
    o = SGD(learning_rate=0.1)
    seq = SequentialLR(o, [StepLR(o, 2), ExponentialLR(o, 0.9)], [3])
    nested = json.loads(json.dumps(seq.state_dict()))
    nested["schedulers"][1]["extra"] = 1
    o2 = SGD(learning_rate=0.1)
    seq2 = SequentialLR(o2, [StepLR(o2, 2), ExponentialLR(o2, 0.9)], [3])
    with pytest.raises(KeyError, match="extra"):
        seq2.load_state_dict(nested)
    assert seq2.last_step == 0 and o2.get_learning_rate() == 0.1
