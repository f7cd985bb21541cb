"""Norms, softmax, cross-entropy and reductions in float16 / bfloat16 on NumPy, JAX and
PyTorch, side by side with torch.nn.functional in the same dtype on CPU and with the float64
truth (``half_precision_cases.py``): the statistics are computed in float32 and rounded
once, as torch, so a sum of squares over 4096 values of 10 no longer overflows float16 and
the outputs are correctly rounded."""

from __future__ import annotations

import half_precision_cases as hp
import numpy as np
import pytest
import torch

import mithril as ml
from mithril.backends import NumpyBackend
from mithril.models.half_precision import float32_forward, float32_vjp

BF16 = ["attention_long", "global_avg_pool", "l1", "l2", "layer_norm_big_long", "rms_norm_big_long", "group_norm_big_long", "batch_norm_big_long", "softmax_long",
        "cross_entropy", "mean", "sum", "mse", "huber"]


def cases(names: list[str]) -> list:
    """``(name, backend)`` pairs."""
    return [(n, b) for n in names for b in ("numpy", "jax", "torch")]


def check(name: str, backend: str, dtype: str) -> None:
    r = hp.measure(name, hp.CASES[name], backend, dtype)
    assert r["dtypes"] == {dtype}, r["dtypes"]
    for key, ours in r["ours"].items():
        peer, side = r["torch"][key], r["side"][key]
        what = f"{backend} {dtype} {name} {key}: ours {ours:.3g}, torch {peer:.3g} ulps off the truth"
        # no inf (or NaN) where torch has none; never more than an ulp further from the truth
        assert ours <= peer + 1, what
        if peer <= 1:  # where torch is correctly rounded: side by side within 2 ulps
            assert side <= 2, f"{what}; {side:.3g} ulps from torch"
        if backend != "torch":  # float32 statistics: finite even where torch's CPU kernel is
            assert ours < np.inf, what  # not (log_softmax over 70000 classes), and the
            if key == "y":  # forward rounded once
                assert ours <= 1, what


@pytest.mark.parametrize("name,backend", cases(list(hp.CASES)))
def test_float16_equals_torch(name: str, backend: str) -> None:
    check(name, backend, "float16")


@pytest.mark.parametrize("name,backend", cases(BF16))
def test_bfloat16_equals_torch(name: str, backend: str) -> None:
    check(name, backend, "bfloat16")


def test_float16_rms_norm_numbers() -> None:
    """The numbers behind the rule: over 4096 values of 10 the sum of squares (~4e5) is past
    float16's 65504, and values of 300 square past it one by one."""
    x = (300 * np.random.default_rng(0).standard_normal((2, 64))).astype(np.float16)
    model = ml.Model()
    model |= ml.RMSNorm(64, elementwise_affine=False)(input="input", output="output")
    compiled = ml.compile(model, NumpyBackend(dtype="float16"), shapes={"input": [2, 64]})
    got = compiled.evaluate({}, {"input": x})["output"]
    want = torch.nn.functional.rms_norm(torch.tensor(x), (64,)).numpy()
    assert got.dtype == np.float16 and np.isfinite(got).all()
    assert np.abs(got.astype(np.float32) - want).max() <= 2 ** -9  # (|y| < 4: ulp <= 2^-9)


@pytest.mark.parametrize("kind", ["numpy", "jax", "torch"])
def test_float16_batch_norm_running_statistics_vs_torch(kind: str) -> None:
    """Training mode on float16: the batch statistics in float32, the running ones rounded
    to float16 once per step, as torch.nn.BatchNorm2d(dtype=float16) on CPU."""
    x = (5 + 10 * np.random.default_rng(1).standard_normal((16, 3, 8, 8))).astype(np.float16)
    backend = hp.BACKENDS[kind](dtype="float16")
    model = ml.Model()
    model |= ml.BatchNorm2D(3)(input="input", output="output")
    compiled = ml.compile(model, backend, shapes={"input": [16, 3, 8, 8]})
    params, state = compiled.get_parameters(), compiled.initial_state_dict
    bn = torch.nn.BatchNorm2d(3, dtype=torch.float16)
    for _ in range(2):
        out, state = compiled.evaluate(params, {"input": backend.array(x)}, state=state)
        bn(torch.tensor(x))
    for key, ref in (("running_mean", bn.running_mean), ("running_var", bn.running_var)):
        got = np.asarray(state[f"batch_norm2_d.{key}"])
        assert got.dtype == np.float16
        assert hp.ulps(got, ref.numpy(), "float16") <= 1, (key, got, ref)
    assert np.asarray(out["output"]).dtype == np.float16


@pytest.mark.parametrize("kind", ["numpy", "jax"])
def test_float16_robust_probabilities_keep_their_cutoff(kind: str) -> None:
    """Robust probabilities with the default cutoff, float16's smallest normal 2^-14, stay in
    float16 (in float32 the cutoff would be 2^-126 and the gradient at p = 0, -1/(2·c) per
    row of a mean, an overflow): -1/(2·2^-14) = -8192, finite."""
    backend = hp.BACKENDS[kind](dtype="float16")
    model = ml.Model()
    model |= ml.CrossEntropy(input_type="probs", robust=True)(input="input", target="target",
                                                               output="output")
    compiled = ml.compile(model, backend, shapes={"input": [2, 3]}, trainable_keys={"input"})
    p = np.array([[0.0, 0.5, 0.5], [0.2, 0.3, 0.5]], np.float16)
    _, grads = compiled.evaluate({"input": backend.array(p)}, {"target": backend.array(np.array([0, 1]))},
                                 output_gradients={"output": backend.array(np.float16(1))})
    assert np.asarray(grads["input"])[0, 0] == -8192


def test_float32_and_float64_pass_through_bitwise() -> None:
    """The rule touches half precision only: a float32 / float64 call is the method's own."""
    rng = np.random.default_rng(2)
    for dt in (np.float32, np.float64):
        x = (10 * rng.standard_normal((3, 257))).astype(dt)
        g = rng.standard_normal((3, 257)).astype(dt)
        for op in (ml.RMSNorm(257, elementwise_affine=False), ml.Softmax()):
            out = op.forward(np, input=x)
            raw = type(op).forward.__wrapped__(op, np, input=x)
            assert out.dtype == dt and out.tobytes() == raw.tobytes()
            gi = op.vjp(g, out, {"input": x}, frozenset({"input"}))["input"]
            raw = type(op).vjp.__wrapped__(op, g, out, {"input": x}, frozenset({"input"}))["input"]
            assert gi.dtype == dt and gi.tobytes() == raw.tobytes()


def test_half_rule_wraps_forward_and_vjp_once() -> None:
    """One rule: every operator of the area wraps its NumPy / JAX forward and its VJP in it."""
    for cls in (ml.RMSNorm, ml.GroupNorm, ml.BatchNorm1D, ml.BatchNorm2D, ml.Softmax,
                ml.CrossEntropy):
        assert getattr(cls.forward, "__wrapped__", None) is not None, cls
        assert getattr(cls.vjp, "__wrapped__", None) is not None, cls
    assert float32_forward.__module__ == float32_vjp.__module__ == "mithril.models.half_precision"
