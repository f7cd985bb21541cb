"""Shared by ``test_half_precision_layers.py``: norms, softmax, losses and reductions in
float16 (and bfloat16) on a Mithril backend, side by side with ``torch.nn.functional`` in the
same dtype on CPU and with the float64 truth (torch, on the same rounded values).

A case is a block, its differentiated inputs (float64 values rounded to the half dtype once;
every backend and torch get those), constant data (class indices) and the torch function.
Errors are in units in the last place of the half dtype at the reference value
(``ulps``), with inf where one side is finite and the other not.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np
import torch
import torch.nn.functional as F

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend

BACKENDS = {"numpy": NumpyBackend, "jax": JaxBackend, "torch": TorchBackend}
NP_DTYPES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Case:
    block: Callable[[], Any]
    #: differentiated inputs: key -> (shape, scale, offset): offset + scale * standard normal
    inputs: dict[str, tuple[tuple[int, ...], float, float]]
    #: (inputs as tensors, data as tensors) -> the output tensor
    torch_fn: Callable[[dict, dict], Any]
    data: dict[str, np.ndarray] = field(default_factory=dict)


def values(name: str, case: Case, dtype: str) -> dict[str, np.ndarray]:
    """The inputs, rounded to ``dtype`` (and held as float64)."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return {k: (off + scale * rng.standard_normal(shape)).astype(NP_DTYPES[dtype]).astype(np.float64)
            for k, (shape, scale, off) in case.inputs.items()}


def run_mithril(case: Case, ins: dict, cot: np.ndarray, backend_name: str,
                dtype: str) -> tuple[np.ndarray, dict[str, np.ndarray], set[str]]:
    """The output and the inputs' gradients (as float64 arrays) of ``case`` on a backend, and
    the dtypes the backend returned them in."""
    backend = BACKENDS[backend_name](dtype=dtype)
    model = ml.Model()
    model |= case.block()(**{k: k for k in (*ins, *case.data)}, output="output")
    shapes = {k: list(np.shape(v)) for k, v in {**ins, **case.data}.items()}
    compiled = ml.compile(model, backend, shapes=shapes, trainable_keys=set(ins))
    state = compiled.initial_state_dict
    res = compiled.evaluate({k: backend.array(v) for k, v in ins.items()},
                            {k: backend.array(v) for k, v in case.data.items()},
                            output_gradients={"output": backend.array(cot)},
                            **({"state": state} if state else {}))
    f64 = lambda a: np.asarray(backend.to_numpy(a)).astype(np.float64)  # noqa: E731
    dtypes = {str(a.dtype).removeprefix("torch.") for a in (res[0]["output"], *res[1].values())}
    return f64(res[0]["output"]), {k: f64(res[1][k]) for k in ins}, dtypes


def run_torch(case: Case, ins: dict, cot: np.ndarray,
              dtype: Any) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """torch.nn.functional in ``dtype`` (a torch dtype) on CPU: the output and gradients."""
    t = {k: torch.tensor(v, dtype=dtype, requires_grad=True) for k, v in ins.items()}
    d = {k: torch.tensor(v) for k, v in case.data.items()}
    y = case.torch_fn(t, d)
    grads = torch.autograd.grad(y, list(t.values()), torch.tensor(cot, dtype=dtype))
    f64 = lambda a: a.detach().to(torch.float64).numpy()  # noqa: E731
    return f64(y), {k: f64(g) for k, g in zip(t, grads)}


def ulps(got: np.ndarray, want: np.ndarray, dtype: str, at: np.ndarray | None = None) -> float:
    """The largest |got − want| in ulps of ``dtype`` at ``at`` (default ``want``; the spacing
    of its binade, at least the smallest normal one); inf where exactly one of ``got`` and
    ``want`` is finite (or they are infinities of different sign); NaN against NaN is equal."""
    got, want = np.broadcast_arrays(np.asarray(got, np.float64), np.asarray(want, np.float64))
    fin_g, fin_w = np.isfinite(got), np.isfinite(want)
    if (fin_g != fin_w).any() or ((got[~fin_w] != want[~fin_w]) & ~(
            np.isnan(got[~fin_w]) & np.isnan(want[~fin_w]))).any():
        return float("inf")
    at = want if at is None else np.broadcast_to(np.asarray(at, np.float64), want.shape)
    fi = ml_dtypes.finfo(NP_DTYPES[dtype])
    scale = np.where(np.isfinite(at[fin_w]), np.abs(at[fin_w]), 0.0)
    ulp = 2.0 ** np.floor(np.log2(np.maximum(scale, float(fi.smallest_normal)) * float(fi.eps)))
    return float((np.abs(got[fin_w] - want[fin_w]) / ulp).max(initial=0.0))


def measure(name: str, case: Case, backend_name: str, dtype: str = "float16") -> dict[str, Any]:
    """Per output (``"y"``) and gradient (``"d<key>"``), in ulps of ``dtype`` at the float64
    truth: the backend against the truth (``ours``), torch.nn.functional in ``dtype`` on CPU
    against the truth (``torch``) and the backend against torch (``side``); and the dtypes
    the backend returned (``dtypes``)."""
    ins = values(name, case, dtype)
    rng = np.random.default_rng(zlib.crc32(name.encode()) + 1)
    probe = case.torch_fn({k: torch.tensor(v) for k, v in ins.items()},
                          {k: torch.tensor(v) for k, v in case.data.items()})
    cot = rng.standard_normal(tuple(probe.shape)).astype(NP_DTYPES[dtype]).astype(np.float64)
    got = run_mithril(case, ins, cot, backend_name, dtype)
    peer = run_torch(case, ins, cot, TORCH_DTYPES[dtype])
    truth = run_torch(case, ins, cot, torch.float64)
    pairs = {"y": (got[0], peer[0], truth[0]), **{f"d{k}": (got[1][k], peer[1][k], truth[1][k])
                                                    for k in ins}}
    return {"ours": {k: ulps(a, t, dtype) for k, (a, p, t) in pairs.items()},
            "torch": {k: ulps(p, t, dtype) for k, (a, p, t) in pairs.items()},
            "side": {k: ulps(a, p, dtype, at=t) for k, (a, p, t) in pairs.items()},
            "dtypes": got[2]}


def _labels(n: int, c: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, c, n)


#: name -> case; "big": magnitudes whose squares or sums leave float16's range (65504), "long":
#: axes of thousands of values, "offset": a large mean over a small spread
CASES: dict[str, Case] = {
    "rms_norm": Case(lambda: ml.RMSNorm(512, elementwise_affine=False), {"input": ((4, 512), 1.0, 0.0)},
                     lambda t, d: F.rms_norm(t["input"], (512,))),
    "rms_norm_big_long": Case(lambda: ml.RMSNorm(4096, elementwise_affine=False),
                              {"input": ((2, 4096), 10.0, 0.0)}, lambda t, d: F.rms_norm(t["input"], (4096,))),
    "rms_norm_huge": Case(lambda: ml.RMSNorm(64, elementwise_affine=False),
                          {"input": ((4, 64), 300.0, 0.0)}, lambda t, d: F.rms_norm(t["input"], (64,))),
    "layer_norm": Case(lambda: ml.LayerNorm(use_scale=False, use_bias=False),
                       {"input": ((4, 512), 1.0, 0.0)}, lambda t, d: F.layer_norm(t["input"], (512,))),
    "layer_norm_big_long": Case(lambda: ml.LayerNorm(use_scale=False, use_bias=False),
                                {"input": ((2, 4096), 10.0, 0.0)},
                                lambda t, d: F.layer_norm(t["input"], (4096,))),
    "layer_norm_offset": Case(lambda: ml.LayerNorm(use_scale=False, use_bias=False),
                              {"input": ((4, 256), 1.0, 100.0)}, lambda t, d: F.layer_norm(t["input"], (256,))),
    "group_norm": Case(lambda: ml.GroupNorm(2, affine=False), {"input": ((2, 4, 16, 16), 1.0, 0.0)},
                       lambda t, d: F.group_norm(t["input"], 2)),
    "group_norm_big_long": Case(lambda: ml.GroupNorm(2, affine=False),
                                {"input": ((2, 4, 32, 32), 10.0, 0.0)}, lambda t, d: F.group_norm(t["input"], 2)),
    "batch_norm": Case(lambda: ml.BatchNorm2D(3, affine=False, track_running_stats=False),
                       {"input": ((8, 3, 8, 8), 1.0, 0.0)},
                       lambda t, d: F.batch_norm(t["input"], None, None, training=True)),
    "batch_norm_big_long": Case(lambda: ml.BatchNorm2D(3, affine=False, track_running_stats=False),
                                {"input": ((16, 3, 16, 16), 10.0, 5.0)},
                                lambda t, d: F.batch_norm(t["input"], None, None, training=True)),
    "softmax": Case(lambda: ml.Softmax(), {"input": ((4, 512), 3.0, 0.0)},
                    lambda t, d: F.softmax(t["input"], -1)),
    "softmax_long": Case(lambda: ml.Softmax(), {"input": ((2, 70000), 0.01, 0.0)},
                         lambda t, d: F.softmax(t["input"], -1)),
    "cross_entropy": Case(lambda: ml.CrossEntropy(), {"input": ((64, 1000), 3.0, 0.0)},
                          lambda t, d: F.cross_entropy(t["input"], d["target"]), {"target": _labels(64, 1000)}),
    "cross_entropy_long": Case(lambda: ml.CrossEntropy(reduction="sum"), {"input": ((4, 70000), 0.01, 0.0)},
                               lambda t, d: F.cross_entropy(t["input"], d["target"], reduction="sum"),
                               {"target": _labels(4, 70000)}),
    "cross_entropy_smooth": Case(lambda: ml.CrossEntropy(label_smoothing=0.1),
                                 {"input": ((64, 1000), 3.0, 0.0)},
                                 lambda t, d: F.cross_entropy(t["input"], d["target"], label_smoothing=0.1),
                                 {"target": _labels(64, 1000)}),
    "mean": Case(lambda: ml.Mean(axis=-1), {"input": ((4, 8192), 10.0, 5.0)},
                 lambda t, d: t["input"].mean(-1)),
    "sum": Case(lambda: ml.Sum(axis=-1), {"input": ((4, 8192), 1.0, 1.0)}, lambda t, d: t["input"].sum(-1)),
    "mse": Case(lambda: ml.MeanSquaredError(), {"input": ((64, 512), 10.0, 0.0), "target": ((64, 512), 1.0, 0.0)},
                lambda t, d: F.mse_loss(t["input"], t["target"])),
    "attention_long": Case(lambda: ml.ScaledDotProduct(),
                           {"query": ((1, 2, 8, 32), 1.0, 0.0), "key": ((1, 2, 4096, 32), 1.0, 0.0),
                            "value": ((1, 2, 4096, 32), 1.0, 0.0)},
                           lambda t, d: F.scaled_dot_product_attention(t["query"], t["key"], t["value"])),
    "global_avg_pool": Case(lambda: ml.GlobalAvgPool2D(), {"input": ((2, 3, 64, 64), 10.0, 5.0)},
                            lambda t, d: t["input"].mean((2, 3))),
    "l2": Case(lambda: ml.L2(), {"input": ((4, 4096), 1.0, 0.0)},
               lambda t, d: 0.5 * (t["input"] * t["input"]).sum()),
    "l1": Case(lambda: ml.L1(), {"input": ((4, 4096), 1.0, 0.0)}, lambda t, d: t["input"].abs().sum()),
    "huber": Case(lambda: ml.HuberLoss(), {"input": ((64, 512), 10.0, 0.0), "target": ((64, 512), 1.0, 0.0)},
                  lambda t, d: F.huber_loss(t["input"], t["target"])),
}
