"""Muon's in-place step on torch (:meth:`Muon.fused_step`: torch.optim.Muon's own
operations, no copies) equals torch.optim.Muon to the last bit, leaves the gradients it is
given untouched, and is taken only where nothing needs the whole step computed first."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mithril.utils.optimizers.muon as muon_module
from mithril.utils.optimizers import AdamW, Muon

SHAPES = {"tall": (9, 4), "wide": (3, 8), "sq": (6, 6)}


def grads(dtype, steps, rng):
    return [{k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}
            for _ in range(steps)]


@pytest.fixture
def fused_calls(monkeypatch):
    calls = []
    orig = Muon.fused_step

    def spy(self, *args):
        out = orig(self, *args)
        calls.append(out is not None)
        return out
    monkeypatch.setattr(muon_module.Muon, "fused_step", spy)
    return calls


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kw", [{}, {"nesterov": False, "weight_decay": 0.0},
                                {"ns_steps": 3, "adjust_lr_fn": "match_rms_adamw"},
                                {"momentum": 0.3}, {"momentum": 0.3, "nesterov": False}])
def test_in_place_step_is_torch_bit_for_bit(fused_calls, dtype, kw):
    rng = np.random.default_rng(0)
    p0 = {k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}
    gs = grads(dtype, 12, rng)
    tp = {k: torch.tensor(v) for k, v in p0.items()}
    ref = torch.optim.Muon(list(tp.values()), lr=0.02, **kw)
    opt = Muon(0.02, fallback=None, **kw)
    params = {k: torch.tensor(v) for k, v in p0.items()}
    state = opt.init(params)
    for g in gs:
        for k, p in tp.items():
            p.grad = torch.tensor(g[k])
        ref.step()
        given = {k: torch.tensor(v) for k, v in g.items()}
        params, state = opt.update(params, given, state)
        for k in SHAPES:
            assert torch.equal(params[k], tp[k]), k
            assert torch.equal(given[k], torch.tensor(g[k])), k  # not written
            assert torch.equal(state.slot("momentum_buffer")[k], ref.state[tp[k]]["momentum_buffer"])
    assert fused_calls[0] is False and all(fused_calls[1:])  # the first: the user's arrays
    norm = np.sqrt(sum((gs[-1][k].astype(np.float64) ** 2).sum() for k in SHAPES))
    assert state.last_grad_norm == pytest.approx(norm, rel=1e-12)


def test_fused_passes_round_as_torch_with_nan_and_odd_sizes():
    """The numba passes (float32): torch's lerp, bfloat16 cast and add, to the bit, on
    sizes that leave vector tails, with NaN and inf in the gradient."""
    from mithril.utils.optimizers.engines import muon_kernels as K

    rng = np.random.default_rng(7)
    for n, mu in [(1, 0.95), (17, 0.95), (1003, 0.3), (4099, 0.5)]:
        g = rng.standard_normal(n).astype(np.float32)
        if n > 3:
            g[[1, n // 2, n - 1]] = [np.nan, np.inf, -np.inf]
        b = rng.standard_normal(n).astype(np.float32)
        tb, tg = torch.tensor(b), torch.tensor(g)
        tb.lerp_(tg, 1 - mu)
        want16 = tg.lerp(tb, mu).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        x16 = np.empty(n, np.uint16)
        s, z = K.momentum_pass(b, g, x16, *K.weights(1 - mu), *K.weights(mu), True)
        np.testing.assert_array_equal(b, tb.numpy())
        nan = np.isnan(tg.lerp(tb, mu).numpy())
        np.testing.assert_array_equal(x16[~nan], want16[~nan])
        assert (x16[nan] & 0x7FFF > 0x7F80).all()  # NaN stays NaN
        assert s == pytest.approx(float((g.astype(np.float64) ** 2).sum()), rel=1e-12, nan_ok=True)
        p = rng.standard_normal((n, 1)).astype(np.float32)
        o = torch.tensor(rng.standard_normal((1, n)).astype(np.float32)).bfloat16().T
        want = torch.tensor(p).mul_(0.998).add_(o, alpha=-0.03).numpy()
        K.apply_pass(p, K.bits16(o), np.float32(0.998), True, np.float32(-0.03))
        np.testing.assert_array_equal(p, want)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numpy_backend_takes_torchs_in_place_step_bit_for_bit(fused_calls, dtype):
    """On NumPy (torch installed) the bfloat16 step runs torch's operations on zero-copy
    views of our buffers: torch.optim.Muon's bits, in place from the second step on."""
    rng = np.random.default_rng(4)
    p0 = {k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}
    gs = grads(dtype, 8, rng)
    tp = {k: torch.tensor(v) for k, v in p0.items()}
    ref = torch.optim.Muon(list(tp.values()), lr=0.02)
    opt = Muon(0.02, fallback=None)
    params = {k: v.copy() for k, v in p0.items()}
    state = opt.init(params)
    for g in gs:
        for k, p in tp.items():
            p.grad = torch.tensor(g[k])
        ref.step()
        given = {k: v.copy() for k, v in g.items()}
        params, state = opt.update(params, given, state)
        for k in SHAPES:
            assert isinstance(params[k], np.ndarray)
            np.testing.assert_array_equal(params[k], tp[k].numpy())
            np.testing.assert_array_equal(given[k], g[k])  # not written
            np.testing.assert_array_equal(state.slot("momentum_buffer")[k],
                                          ref.state[tp[k]]["momentum_buffer"].numpy())
    assert fused_calls[0] is False and all(fused_calls[1:])
    norm = np.sqrt(sum((gs[-1][k].astype(np.float64) ** 2).sum() for k in SHAPES))
    assert state.last_grad_norm == pytest.approx(norm, rel=1e-12)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_an_lr_beyond_float32_makes_params_non_finite_and_warns(fused_calls, backend):
    """torch's ``add_`` refuses an ``alpha`` its dtype cannot hold (midway through a step):
    here such a step is taken whole, by the per-tensor path, and warns as any other."""
    rng = np.random.default_rng(5)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    if backend == "torch":
        params = {k: torch.tensor(v) for k, v in params.items()}
    opt = Muon(1e-3, fallback=None, weight_decay=0.0)
    state = opt.init(params)
    g = grads("float32", 1, rng)[0]
    if backend == "torch":
        g = {k: torch.tensor(v) for k, v in g.items()}
    params, state = opt.update(params, g, state)  # the first step: the per-tensor path
    opt.set_learning_rate(1e39)  # beyond float32: the update overflows
    with pytest.warns(RuntimeWarning, match="made params or state non-finite"):
        params, state = opt.update(params, g, state)
    assert fused_calls == [False, False]
    assert state.num_nonfinite == 1 and not np.isfinite(np.asarray(params["sq"])).all()


@pytest.mark.parametrize("kw", [{"nonfinite": "skip"}, {"clip_norm": 1.0}, {"ema_decay": 0.9},
                                {"clip_value": 0.5}])
def test_options_needing_the_whole_step_first_take_the_per_tensor_path(fused_calls, kw):
    rng = np.random.default_rng(1)
    params = {k: torch.tensor(rng.standard_normal(s)) for k, s in SHAPES.items()}
    opt = Muon(0.02, fallback=None, **kw)
    state = opt.init(params)
    for g in grads("float64", 3, rng):
        params, state = opt.update(params, {k: torch.tensor(v) for k, v in g.items()}, state)
    assert not any(fused_calls)


def test_a_parameter_that_is_not_a_matrix_takes_the_per_tensor_path(fused_calls):
    rng = np.random.default_rng(2)
    params = {"w": torch.tensor(rng.standard_normal((4, 3))), "b": torch.zeros(3,
                                                                             dtype=torch.float64)}
    opt = Muon(0.02, fallback=AdamW(1e-3))
    state = opt.init(params)
    for _ in range(3):
        g = {"w": torch.tensor(rng.standard_normal((4, 3))),
             "b": torch.tensor(rng.standard_normal(3))}
        params, state = opt.update(params, g, state)
    assert not any(fused_calls)


def test_nonfinite_gradient_propagates_and_warns_as_the_per_tensor_path():
    rng = np.random.default_rng(3)
    params = {k: torch.tensor(rng.standard_normal(s)) for k, s in SHAPES.items()}
    opt = Muon(0.02, fallback=None)
    state = opt.init(params)
    g = {k: torch.tensor(v) for k, v in grads("float64", 1, rng)[0].items()}
    params, state = opt.update(params, g, state)
    g["sq"][0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        params, state = opt.update(params, g, state)
    assert state.num_nonfinite == 1 and not state.last_step_skipped
    assert torch.isnan(params["sq"]).any()
