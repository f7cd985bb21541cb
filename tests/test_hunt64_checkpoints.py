"""Checkpoint and state-dict round trips found broken by a review (hunt 64)."""

from __future__ import annotations

import numpy as np
import pytest

import mithril.utils.optimizers as mo
from mithril.utils.checkpoint import load_checkpoint, save_checkpoint

torch = pytest.importorskip("torch")

SHAPES = {"w": (24, 6), "b": (5,)}


def _galore_run(steps: range, params, state, opt, grads):
    for t in steps:
        params, state = opt.update(params, {k: torch.tensor(g, dtype=torch.bfloat16)
                                            for k, g in grads[t].items()}, state)
    return params, state


def test_galore_bfloat16_state_resumes_from_its_checkpoint(tmp_path) -> None:
    """GaLore holds each projector in its parameter's dtype: in bfloat16 its columns are
    orthonormal only to bfloat16's rounding (~3e-3 off), which the load refused as no SVD's
    (off by more than 1e-3), so a bfloat16 run could not resume from its own checkpoint."""
    rng = np.random.default_rng(0)
    p0 = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    grads = [{k: rng.standard_normal(s) for k, s in SHAPES.items()} for _ in range(6)]

    def make():
        return mo.GaLore(learning_rate=0.01, rank=4, update_proj_gap=2)

    opt = make()
    params = {k: torch.tensor(v, dtype=torch.bfloat16) for k, v in p0.items()}
    params, state = _galore_run(range(3), params, opt.init(params), opt, grads)
    P = opt.state_dict(state)["slots"]["projector"]["w"].astype(np.float64)
    assert np.abs(P.T @ P - np.eye(4)).max() > 1e-3  # (what the load refused)
    path = tmp_path / "galore.safetensors"
    save_checkpoint(path, params, opt, state)
    want, _ = _galore_run(range(3, 6), params, state, opt, grads)

    template = {k: v.clone() for k, v in params.items()}
    other = make()
    ck = load_checkpoint(path, params_template=template, optimizer=other)
    got, _ = _galore_run(range(3, 6), ck["params"], ck["state"], other, grads)
    for k in want:
        assert torch.equal(got[k], want[k]), k

    # a projector that is no SVD's is still refused in bfloat16
    sd = opt.state_dict(state)
    sd["slots"]["projector"]["w"] = 1.2 * sd["slots"]["projector"]["w"].astype(np.float32)
    fresh = make()
    with pytest.raises(ValueError, match="'projector' of 'w' must have orthonormal columns"):
        fresh.load_state_dict(sd, template)


@pytest.mark.parametrize("make", [
    lambda: mo.Mechanize(mo.Adam(0.05, ema_decay=0.9,
                                 param_groups=[{"params": ["b"], "learning_rate": 0.01}])),
    lambda: mo.ScheduleFree(mo.SGD(0.05, momentum=0.9)),
], ids=["Mechanize", "ScheduleFree"])
def test_load_sharded_of_a_wrapper_resumes(tmp_path, make) -> None:
    """load_sharded of a Mechanize or ScheduleFree run (DataParallel's replicated mode takes
    them) raised AttributeError: "'Mechanize' object has no attribute '_strict'" (the
    groups are the base optimizer's; only a Lookahead's inner was looked through)."""
    from mithril.distributed import DataParallel, load_sharded, save_sharded

    rng = np.random.default_rng(3)
    p0 = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    grads = [{k: rng.standard_normal(s) for k, s in SHAPES.items()} for _ in range(6)]

    def run(dp, params, state, steps):
        for t in steps:
            params, state = dp.update(params, {k: g.copy() for k, g in grads[t].items()}, state)
        return params, state

    dp = DataParallel(make())
    params, state = run(dp, dict(p0), dp.init(dict(p0)), range(3))
    save_sharded(tmp_path, params, dp, state)
    want, _ = run(dp, {k: v.copy() for k, v in params.items()}, state, range(3, 6))

    again = DataParallel(make())
    loaded, st = load_sharded(tmp_path, again)
    assert st.local.step == 3
    got, _ = run(again, loaded, st, range(3, 6))
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.parametrize("shard", [False, True])
def test_load_sharded_restores_a_wrappers_saved_averaging(tmp_path, shard) -> None:
    """A checkpoint's EMA / SWA settings are restored, as Optimizer.load_state_dict does;
    for a Lookahead they were set on the Lookahead's own __dict__, not on its inner
    optimizer, which keeps and applies them: the resumed EMA ran with the loading
    optimizer's decay (0.5) instead of the saved 0.9."""
    from mithril.distributed import DataParallel, load_sharded, save_sharded

    rng = np.random.default_rng(4)
    p0 = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    grads = [{k: rng.standard_normal(s) for k, s in SHAPES.items()} for _ in range(8)]

    def run(dp, params, state, steps):
        for t in steps:
            params, state = dp.update(params, {k: g.copy() for k, g in grads[t].items()}, state)
        return params, state

    dp = DataParallel(mo.Lookahead(mo.Adam(0.05, ema_decay=0.9, swa_start=2)),
                      shard_state=shard)
    params, state = run(dp, dict(p0), dp.init(dict(p0)), range(4))
    save_sharded(tmp_path, params, dp, state)
    _, want = run(dp, {k: v.copy() for k, v in params.items()}, state, range(4, 8))

    again = DataParallel(mo.Lookahead(mo.Adam(0.05, ema_decay=0.5, swa_start=5)),
                         shard_state=shard)
    loaded, st = load_sharded(tmp_path, again)
    assert (again.optimizer.inner.ema_decay, again.optimizer.inner.swa_start) == (0.9, 2)
    _, got = run(again, loaded, st, range(4, 8))
    for s in ("ema", "swa"):
        np.testing.assert_array_equal(got.local.slots[s], want.local.slots[s], err_msg=s)


def test_refused_load_sharded_leaves_the_averaging_settings(tmp_path) -> None:
    """load_sharded set the checkpoint's EMA decay on the optimizer before DataParallel.init
    refused it (clip_norm with clip_tensor_norm, sharded): the call raised, "nothing
    changed", yet ema_decay had become the checkpoint's 0.9."""
    from mithril.distributed import DataParallel, load_sharded, save_sharded

    p = {"w": np.ones((4, 3)), "b": np.ones(3)}
    dp = DataParallel(mo.Adam(0.1, ema_decay=0.9), shard_state=True)
    st = dp.init(p)
    p, st = dp.update(p, {k: np.full_like(v, 0.5) for k, v in p.items()}, st)
    save_sharded(tmp_path, p, dp, st)

    opt = mo.Adam(0.1, ema_decay=0.5, clip_norm=1.0, clip_tensor_norm=1.0)
    with pytest.raises(NotImplementedError, match="clip_tensor_norm"):
        load_sharded(tmp_path, DataParallel(opt, shard_state=True))
    assert opt.ema_decay == 0.5
