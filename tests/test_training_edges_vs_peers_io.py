"""Edges of checkpointing a training run (companion of test_training_edges_vs_peers.py):
what a refused save or load names, and that it leaves every file and object as it was."""

from __future__ import annotations

import numpy as np
import pytest

from mithril.errors import CheckpointError, DTypeError, KeyMismatchError, ShapeError
from mithril.utils.accumulation import Accumulate
from mithril.utils.checkpoint import load_checkpoint, save_checkpoint
from mithril.utils.lr_schedulers import StepLR
from mithril.utils.optimizers import Adam


def test_an_accumulate_state_saved_with_the_wrapped_optimizer_names_the_fix(tmp_path):
    # The hint said "save custom states through params or extra"; the state is an
    # Accumulate's, whose window save_checkpoint stores when given the Accumulate itself.
    acc = Accumulate(Adam(learning_rate=0.1), 3)
    params = {"w": np.ones(2)}
    state = acc.init(params)
    params, state = acc.update(params, {"w": np.full(2, 0.5)}, state)
    path = tmp_path / "ck"
    with pytest.raises(TypeError, match="pass the Accumulate itself as optimizer"):
        save_checkpoint(path, params, acc.optimizer, state)
    assert not path.exists() and list(tmp_path.iterdir()) == []
    save_checkpoint(path, params, acc, state)  # the fix it names
    got = load_checkpoint(path, params_template=params, optimizer=Accumulate(Adam(), 2))
    assert got["state"].micro_step == 1
    np.testing.assert_array_equal(got["state"].accumulator.sum()["w"], np.full(2, 0.5))


@pytest.mark.parametrize("bad", ["shape", "keys", "dtype", "truncated"])
def test_a_refused_load_into_an_accumulate_changes_nothing(tmp_path, bad):
    # k, the wrapped optimizer's rate and the scheduler stay as they were; the error names
    # the file and the parameter at fault.
    acc = Accumulate(Adam(learning_rate=0.1), 4)
    params = {"w": np.ones(3)}
    state = acc.init(params)
    sched = StepLR(acc, step_size=1, gamma=0.5)
    params, state = acc.update(params, {"w": np.ones(3)}, state)
    path = tmp_path / "ck"
    save_checkpoint(path, params, acc, state, sched)
    template, error, named = {
        "shape": ({"w": np.ones(4)}, ShapeError, "'w'"),
        "keys": ({"w": np.ones(3), "b": np.ones(1)}, KeyMismatchError, "'b'"),
        "dtype": ({"w": np.ones(3, np.int64)}, DTypeError, "'w'"),
        "truncated": ({"w": np.ones(3)}, CheckpointError, "ck")}[bad]
    if bad == "truncated":
        path.write_bytes(path.read_bytes()[:-5])
    acc2 = Accumulate(Adam(learning_rate=0.7), 2)
    sched2 = StepLR(acc2, step_size=1, gamma=0.9)
    before = sched2.state_dict()
    with pytest.raises(error, match=named):
        load_checkpoint(path, params_template=template, optimizer=acc2, scheduler=sched2)
    assert (acc2.k, acc2.get_learning_rate(), sched2.state_dict()) == (2, 0.7, before)


@pytest.mark.parametrize("kind", ["numpy", "torch", "jax"])
def test_weighted_half_precision_means_agree_across_backends(kind):
    # The float32 buffers make a weighted float16 mean one rounding of the float32
    # weighted sum (optax.MultiSteps' accumulator dtype): the same bits on every backend,
    # whether formed by mean() or by the window's last update (_mean_with).
    import jax.numpy as jnp
    import torch

    from mithril.utils.accumulation import GradientAccumulator

    rng = np.random.default_rng(0)
    gs = [rng.standard_normal(50).astype(np.float16) for _ in range(3)]
    ws = [1.0, 2.5, 0.7]
    want = (sum(g.astype(np.float32) * np.float32(w) for g, w in zip(gs, ws, strict=True))
            * np.float32(1 / sum(ws))).astype(np.float16)
    conv = {"numpy": np.asarray, "torch": torch.tensor, "jax": jnp.asarray}[kind]
    acc = GradientAccumulator()
    for g, w in zip(gs[:2], ws[:2], strict=True):
        acc.add({"g": conv(g)}, weight=w)
    last = acc._mean_with({"g": conv(gs[2])}, ws[2])["g"]
    acc.add({"g": conv(gs[2])}, weight=ws[2])
    mean = acc.mean()["g"]
    for got in (mean, last):
        host = got.numpy() if kind == "torch" else np.asarray(got)
        assert host.dtype == np.float16
        np.testing.assert_array_equal(host, want)
