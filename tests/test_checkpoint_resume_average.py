"""Resuming from a checkpoint file into an optimizer that keeps an average the run did not:
``load_checkpoint`` starts it at the resume, as ``load_state_dict`` does, and the run then
equals torch with a fresh ``AveragedModel`` created at the resume (float64, every step); a
checkpoint that has the EMA restores it exactly, directly and through Lookahead."""

from __future__ import annotations

import numpy as np
from optimizer_parity import host, natives
from test_weight_averaging import problem
from test_weight_averaging_start import LR, after_step, assert_rows, torch_rows

import mithril.utils.optimizers as mo
from mithril.utils.checkpoint import load_checkpoint, save_checkpoint


def _run(opt, params, state, grads):
    rows = []
    for g in grads:
        params, state = opt.update(params, natives("numpy", g), state)
        rows.append(after_step(opt, state, params))
    return params, state, rows


def test_load_checkpoint_starts_an_ema_the_run_lacked(tmp_path):
    p0, grads = problem(seed=11, steps=20)
    plain = mo.Adam(LR)
    params = natives("numpy", p0)
    params, state, _ = _run(plain, params, plain.init(params), grads[:10])
    path = tmp_path / "run.safetensors"
    save_checkpoint(path, params, plain, state)

    opt = mo.Adam(LR, ema_decay=0.9, ema_every=2)
    loaded = load_checkpoint(path, params, opt)
    assert (opt.ema_decay, opt.ema_every, opt.ema_start) == (0.9, 2, 11)
    at_resume = {k: host(v) for k, v in loaded["params"].items()}
    _, _, rows = _run(opt, loaded["params"], loaded["state"], grads[10:])
    want = torch_rows(p0, grads, decay=0.9, start=11, every=2)[10:]
    assert_rows(rows, want, at_resume, "load_checkpoint into an EMA", first=11)


def test_load_checkpoint_with_an_ema_restores_it_exactly(tmp_path):
    p0, grads = problem(seed=12, steps=14)
    for make in (lambda: mo.Adam(LR, ema_decay=0.8, ema_start=3),
                 lambda: mo.Lookahead(mo.Adam(LR, ema_decay=0.8, ema_start=3), sync_period=3)):
        opt = make()
        params = natives("numpy", p0)
        params, state, _ = _run(opt, params, opt.init(params), grads[:7])
        path = tmp_path / "ema.safetensors"
        save_checkpoint(path, params, opt, state)
        _, _, straight = _run(opt, params, state, grads[7:])

        opt2 = make()
        loaded = load_checkpoint(path, params, opt2)
        _, _, resumed = _run(opt2, loaded["params"], loaded["state"], grads[7:])
        for a, b in zip(straight, resumed, strict=True):
            for x, y in zip(a, b):
                if x is not None:
                    assert all(np.array_equal(x[k], y[k]) for k in x), type(opt).__name__
