"""``AlphaDropout`` / ``FeatureAlphaDropout`` against torch's ``nn.AlphaDropout`` /
``nn.FeatureAlphaDropout``.

The draws cannot equal torch's generator's, so: every training-mode output is one of
torch's two values per element (a·x + α'·a·p kept, α'·a·(p − 1) dropped, torch's own outputs
checked to follow the same rule with the same a), the dropped fraction is p and a standard
normal input keeps mean 0 and variance 1 (as torch's, side by side), the gradient is a on
kept elements and 0 on dropped ones, a feature dropout drops whole channels, the draws are
the same on NumPy, torch and JAX, inference mode and p = 0 are the identity and p = 1 gives
zeros."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mithril as ml
from mithril.models.alpha_dropout import ALPHA, AlphaDropout, FeatureAlphaDropout

_X = np.random.default_rng(0).standard_normal((64, 32, 8, 8))  # 131072 elements, 2048 channels


def _a(p: float) -> float:
    return 1.0 / np.sqrt((ALPHA ** 2 * p + 1) * (1 - p))


def _run(block, x: np.ndarray, backend=None, training: bool = True):
    be = backend or ml.NumpyBackend(dtype="float64")
    model = ml.Model()
    model |= block(input="input", output="output")
    c = ml.compile(model, be, shapes={"input": list(x.shape)}, trainable_keys={"input"})
    g = np.ones_like(x)
    out, grads = c.evaluate({"input": be.array(x)}, {}, output_gradients={"output": be.array(g)},
                            training=training)[:2]
    return np.asarray(be.to_numpy(out["output"])), np.asarray(be.to_numpy(grads["input"]))


def _kept(y: np.ndarray, x: np.ndarray, p: float) -> np.ndarray:
    """Which elements of an alpha-dropout output ``y`` of ``x`` were kept (each element must
    be one of the two values)."""
    a = _a(p)
    kept = np.abs(y - (a * x + ALPHA * a * p)) < 1e-12
    dropped = np.abs(y - ALPHA * a * (p - 1)) < 1e-12
    assert (kept | dropped).all()
    return kept


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_values_statistics_and_gradient_follow_torch(p: float) -> None:
    y, gx = _run(AlphaDropout(p), _X)
    kept = _kept(y, _X, p)
    torch.manual_seed(0)
    yt = torch.nn.AlphaDropout(p).train()(torch.tensor(_X)).numpy()
    kept_t = _kept(yt, _X, p)  # torch's outputs follow the same two values
    for frac in (1 - kept.mean(), 1 - kept_t.mean()):
        assert abs(frac - p) < 0.006
    assert abs(y.mean() - yt.mean()) < 0.015 and abs(y.mean()) < 0.015
    assert abs(y.var() - 1) < 0.02 and abs(yt.var() - 1) < 0.02
    assert np.array_equal(gx, np.where(kept, _a(p), 0.0))


def test_feature_alpha_dropout_drops_whole_channels() -> None:
    p = 0.3
    y, gx = _run(FeatureAlphaDropout(p), _X)
    kept = _kept(y, _X, p)
    per_channel = kept.reshape(64, 32, -1)
    assert (per_channel.all(-1) | ~per_channel.any(-1)).all()
    assert abs(1 - per_channel[..., 0].mean() - p) < 0.03
    torch.manual_seed(0)
    yt = torch.nn.FeatureAlphaDropout(p).train()(torch.tensor(_X)).numpy()
    kt = _kept(yt, _X, p).reshape(64, 32, -1)
    assert (kt.all(-1) | ~kt.any(-1)).all()
    assert np.array_equal(gx, np.where(kept, _a(p), 0.0))


@pytest.mark.parametrize("block", [AlphaDropout, FeatureAlphaDropout])
def test_the_draws_are_the_same_on_every_backend(block) -> None:
    x = _X[:4, :8].astype(np.float32)
    outs = [_run(block(0.4), x, cls(dtype="float32")) for cls in
            (ml.NumpyBackend, ml.TorchBackend, ml.JaxBackend)]
    for y, g in outs[1:]:
        assert np.abs(y - outs[0][0]).max() < 1e-6 and np.array_equal(g, outs[0][1])


def test_inference_p0_and_p1() -> None:
    x = _X[:2, :3]
    for block in (AlphaDropout(0.5), FeatureAlphaDropout(0.5)):
        y, g = _run(block, x, training=False)
        assert np.array_equal(y, x) and np.array_equal(g, np.ones_like(x))
        assert np.array_equal(torch.nn.AlphaDropout(0.5).eval()(torch.tensor(x)).numpy(), x)
    y, g = _run(AlphaDropout(0.0), x)
    assert np.array_equal(y, x) and np.array_equal(g, np.ones_like(x))
    y, g = _run(AlphaDropout(1.0), x)
    want = torch.nn.AlphaDropout(1.0).train()(torch.tensor(x)).numpy()
    assert np.array_equal(y, want) and (y == 0).all() and (g == 0).all()


def test_bad_arguments_and_shapes_are_named() -> None:
    for p in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="AlphaDropout: p must be a probability"):
            AlphaDropout(p)
    model = ml.Model()
    model |= FeatureAlphaDropout()(input="input", output="output")
    with pytest.raises(ml.ShapeError, match=r"FeatureAlphaDropout: 'input' needs a channel axis"):
        ml.compile(model, ml.NumpyBackend(), shapes={"input": [5]})
