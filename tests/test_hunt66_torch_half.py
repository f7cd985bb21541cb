"""Half precision on the torch backend (session 66): the blocks whose torch CPU kernel has no
float16 / bfloat16 version (``ctc_loss``, ``multi_margin_loss``, ``multilabel_margin_loss``,
``avg_pool3d``: CTCLoss, MultiMarginLoss, MultiLabelMarginLoss, AvgPool3D, and the
LocalResponseNorm / LPPool3D built on it) or whose half kernel overflows
(``cosine_embedding_loss``'s |a|², a label-smoothed ``cross_entropy``'s sum over the classes,
x² in LocalResponseNorm / LPPool, an asymmetrically padded AvgPool's window sums) compute in
float32 and round once to the input dtype, values and gradients, as torch.autocast runs them
and as NumPy and JAX do (``half_precision``). Each is checked against torch in float64 on the
same rounded inputs; float32 / float64 are bit-identical to the unwrapped methods."""

from __future__ import annotations

import inspect
import warnings

import half_precision_cases as hp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mithril as ml
from mithril.backends import TorchBackend

C = hp.Case
W = np.random.default_rng(5).random(1000) + 0.5
LABELS = hp._labels(64, 1000)
MLM_TARGET = np.array([[0, 2, -1, 0, 0, 0], [1, -1, 0, 0, 0, 0], [3, 4, 5, 0, -1, 0],
                       [5, -1, 0, 0, 0, 0]])


def _ctc(t, d):
    return F.ctc_loss(t["log_probs"], d["targets"], d["input_lengths"], d["target_lengths"])


def _w(t):
    return torch.tensor(W, dtype=t["input"].dtype)


#: name -> (case, backends): the torch backend raised NotImplementedError or gave inf / NaN
#: (or, with "numpy"/"jax" listed, so did those) before
CASES: dict[str, tuple[hp.Case, tuple[str, ...]]] = {
    "ctc": (C(lambda: ml.CTCLoss(), {"log_probs": ((12, 3, 6), 1.0, -2.0)}, _ctc,
              {"targets": np.array([[1, 2, 2], [3, 4, 0], [5, 1, 3]]),
               "input_lengths": np.array([12, 10, 9]), "target_lengths": np.array([3, 2, 3])}),
            ("torch",)),
    "multi_margin": (C(lambda: ml.MultiMarginLoss(), {"input": ((8, 300), 1.0, 0.0)},
                       lambda t, d: F.multi_margin_loss(t["input"], d["target"]),
                       {"target": hp._labels(8, 300)}), ("torch",)),
    "multi_margin_weighted_p2": (
        C(lambda: ml.MultiMarginLoss(p=2, weight=W[:50]), {"input": ((8, 50), 1.0, 0.0)},
          lambda t, d: F.multi_margin_loss(t["input"], d["target"], p=2,
                                           weight=torch.tensor(W[:50], dtype=t["input"].dtype)),
          {"target": hp._labels(8, 50)}), ("torch",)),
    "multilabel_margin": (C(lambda: ml.MultiLabelMarginLoss(), {"input": ((4, 6), 1.0, 0.0)},
                            lambda t, d: F.multilabel_margin_loss(t["input"], d["target"]),
                            {"target": MLM_TARGET}), ("torch",)),
    "avg_pool3d": (C(lambda: ml.AvgPool3D(2, 1, padding=1, count_include_pad=False),
                     {"input": ((2, 2, 4, 4, 4), 1.0, 0.0)},
                     lambda t, d: F.avg_pool3d(t["input"], 2, 1, 1, count_include_pad=False)),
                   ("torch",)),
    "avg_pool2d_asymmetric_big": (
        C(lambda: ml.AvgPool2D(3, 1, padding=((1, 0), (1, 0))), {"input": ((1, 2, 5, 5), 1e4, 2e4)},
          lambda t, d: F.avg_pool2d(F.pad(t["input"], (1, 0, 1, 0)), 3, 1)), ("torch",)),
    "local_response_norm_5d": (C(lambda: ml.LocalResponseNorm(3), {"input": ((2, 5, 3, 3, 3), 1.0, 0.0)},
                                 lambda t, d: F.local_response_norm(t["input"], 3)), ("torch",)),
    "local_response_norm_4d": (C(lambda: ml.LocalResponseNorm(4), {"input": ((2, 5, 3, 3), 1.0, 0.0)},
                                 lambda t, d: F.local_response_norm(t["input"], 4)), ("torch",)),
    "local_response_norm_big": (  # 300² > 65504: every backend's x² overflowed float16
        C(lambda: ml.LocalResponseNorm(3, alpha=1.0), {"input": ((1, 4, 5), 300.0, 0.0)},
          lambda t, d: F.local_response_norm(t["input"], 3, alpha=1.0)), ("numpy", "jax", "torch")),
    "lp_pool3d": (C(lambda: ml.LPPool3D(2, 2), {"input": ((1, 2, 4, 4, 4), 1.0, 0.0)},
                    lambda t, d: F.lp_pool3d(t["input"], 2, 2)), ("torch",)),
    "lp_pool2d_big": (  # the window sum of 9 squares of 100 passes 65504
        C(lambda: ml.LPPool2D(2, 3), {"input": ((1, 2, 6, 6), 100.0, 0.0)},
          lambda t, d: F.lp_pool2d(t["input"], 2, 3)), ("numpy", "jax", "torch")),
    "cosine_embedding_big": (
        C(lambda: ml.CosineEmbeddingLoss(reduction="sum"),
          {"input1": ((4, 1024), 10.0, 0.0), "input2": ((4, 1024), 10.0, 0.0)},
          lambda t, d: F.cosine_embedding_loss(t["input1"], t["input2"], d["target"],
                                               reduction="sum"),
          {"target": np.array([1.0, -1.0, 1.0, -1.0])}), ("torch",)),
    "cross_entropy_weight_smoothing": (
        C(lambda: ml.CrossEntropy(weight=W, label_smoothing=0.1), {"input": ((64, 1000), 3.0, 0.0)},
          lambda t, d: F.cross_entropy(t["input"], d["target"], weight=_w(t), label_smoothing=0.1),
          {"target": LABELS}), ("torch",)),
    "cross_entropy_smoothing_sum_axis1": (
        C(lambda: ml.CrossEntropy(axis=1, label_smoothing=0.1, reduction="sum"),
          {"input": ((8, 1000, 4), 3.0, 0.0)},
          lambda t, d: F.cross_entropy(t["input"], d["target"], label_smoothing=0.1, reduction="sum"),
          {"target": np.random.default_rng(1).integers(0, 1000, (8, 4))}), ("torch",)),
    # torch.autocast's float32 ops whose CPU half kernels round far from the truth
    "triplet_margin_big": (
        C(lambda: ml.TripletMarginLoss(), {k: ((4, 1024), 300.0, 0.0)
                                           for k in ("anchor", "positive", "negative")},
          lambda t, d: F.triplet_margin_loss(t["anchor"], t["positive"], t["negative"])),
        ("torch",)),  # (17 ulps off)
    "cosine_similarity_big": (
        C(lambda: ml.CosineSimilarity(), {"input1": ((4, 1024), 300.0, 0.0),
                                          "input2": ((4, 1024), 300.0, 0.0)},
          lambda t, d: F.cosine_similarity(t["input1"], t["input2"])), ("torch",)),  # (67 ulps)
    "adaptive_avg_pool3d": (C(lambda: ml.AdaptiveAvgPool3D(3), {"input": ((1, 2, 5, 5, 5), 1.0, 0.0)},
                              lambda t, d: F.adaptive_avg_pool3d(t["input"], 3)),
                            ("torch",)),  # (34 ulps off)
    "prod": (C(lambda: ml.Prod(axis=-1), {"input": ((4, 64), 0.05, 1.0)},
               lambda t, d: torch.prod(t["input"], -1)), ("numpy", "torch")),  # (2-3 ulps off)
    "rbf_kernel_big": (  # ‖x − y‖² over 1024 features of 10 passes 65504: output 0, NaN grads
        C(lambda: ml.RBFKernel(), {"input1": ((5, 1024), 10.0, 0.0), "input2": ((6, 1024), 10.0, 0.0),
                                   "l_scale": ((1,), 0.1, 2.0), "sigma": ((1,), 1.0, 300.0)},
          lambda t, d: t["l_scale"] ** 2 * torch.exp(
              -((t["input1"][:, None] - t["input2"][None]) ** 2).sum(-1) / (2 * t["sigma"] ** 2))),
        ("numpy", "jax", "torch")),
    # linear algebra (torch.autocast's float32 linalg): torch has no CPU half lu / cholesky,
    # NumPy and JAX no float16 solve; every backend raised
    "symmetric_solve": (C(lambda: ml.SymmetricSolve(),
                          {"matrix": ((6, 6), 0.1, 2 * np.eye(6)), "input": ((6, 2), 1.0, 0.0)},
                          lambda t, d: torch.linalg.solve(_spd(t["matrix"]), t["input"])),
                        ("numpy", "jax", "torch")),
    "gpr_loss": (C(lambda: ml.GPRLoss(), {"labels": ((6, 1), 1.0, 0.0), "mu": ((6, 1), 1.0, 0.0),
                                          "K_term": ((6, 6), 0.1, 2 * np.eye(6)), "alpha": ((6, 1), 1.0, 0.0)},
                   lambda t, d: (0.5 * ((t["labels"] - t["mu"]) * t["alpha"]).sum()
                                 + 0.5 * torch.logdet(_spd(t["K_term"])) + 3 * np.log(2 * np.pi)
                                 ).reshape(1)),
                 ("numpy", "jax", "torch")),
}


def _spd(m):
    """The symmetric part of ``m`` (2·I plus noise: positive definite)."""
    return (m + m.T) / 2


def _grid() -> list:
    return [(n, b, dt) for n, (_, bs) in CASES.items() for b in bs
            for dt in ("float16", "bfloat16")]


@pytest.mark.parametrize("name,backend,dtype", _grid())
def test_half_equals_float64_torch_rounded(name: str, backend: str, dtype: str) -> None:
    """The output within an ulp of torch's float64 result and every gradient within 2 ulps of
    its largest entry, in the input's dtype. Before: torch's NotImplementedError ("ctc_loss_cpu"
    / "avg_pool3d_out_frame" ... not implemented for 'Half'), or an inf loss (cross-entropy
    with label smoothing, 300² in LocalResponseNorm, LPPool's window sums), NaN gradients
    (cosine embedding) on torch."""
    case = CASES[name][0]
    ins = hp.values(name, case, dtype)
    rng = np.random.default_rng(7)
    probe = case.torch_fn({k: torch.tensor(v) for k, v in ins.items()},
                          {k: torch.tensor(v) for k, v in case.data.items()})
    cot = rng.standard_normal(tuple(probe.shape)).astype(hp.NP_DTYPES[dtype]).astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y, grads, dtypes = hp.run_mithril(case, ins, cot, backend, dtype)
    want, want_grads = hp.run_torch(case, ins, cot, torch.float64)
    assert dtypes == {dtype}
    assert np.isfinite(want).all()
    assert hp.ulps(y, want, dtype) <= 1, (y, want)
    for k, g in grads.items():
        scale = np.abs(want_grads[k]).max()
        assert hp.ulps(g, want_grads[k], dtype, at=scale) <= 2, k


def test_ctc_float16_numbers_on_torch() -> None:
    """A concrete number: CTCLoss of float16 log-probabilities on the torch backend is torch's
    float64 loss rounded to float16 (it raised "ctc_loss_cpu" not implemented for 'Half')."""
    lp = torch.log_softmax(torch.tensor(np.random.default_rng(3).standard_normal((6, 1, 4))), -1)
    lp16 = lp.half()
    args = (torch.tensor([[1, 2]]), torch.tensor([6]), torch.tensor([2]))
    want = F.ctc_loss(lp16.double(), *args).half().item()
    model = ml.Model()
    model |= ml.CTCLoss()(log_probs="lp", targets="t", input_lengths="il", target_lengths="tl",
                          output=ml.IOKey("loss"))
    backend = TorchBackend(dtype="float16")
    compiled = ml.compile(model, backend, shapes={"lp": [6, 1, 4], "t": [1, 2], "il": [1],
                                                  "tl": [1]}, trainable_keys={"lp"})
    out = compiled.evaluate({"lp": lp16}, {"t": args[0], "il": args[1], "tl": args[2]})
    assert out["loss"].dtype == torch.float16 and out["loss"].item() == want


#: op, its inputs (name -> shape, scale; the rest: constant integer data) per bitwise check
_WIDE = [
    (lambda: ml.CTCLoss(), "ctc"), (lambda: ml.MultiMarginLoss(), "multi_margin"),
    (lambda: ml.MultiLabelMarginLoss(), "multilabel_margin"),
    (lambda: ml.AvgPool3D(2, 1, padding=1, count_include_pad=False), "avg_pool3d"),
    (lambda: ml.AvgPool2D(3, 1, padding=((1, 0), (1, 0))), "avg_pool2d_asymmetric_big"),
    (lambda: ml.LocalResponseNorm(3), "local_response_norm_5d"),
    (lambda: ml.LPPool3D(2, 2), "lp_pool3d"), (lambda: ml.LPPool2D(2, 3), "lp_pool2d_big"),
    (lambda: ml.CosineEmbeddingLoss(reduction="sum"), "cosine_embedding_big"),
    (lambda: ml.CrossEntropy(weight=W, label_smoothing=0.1), "cross_entropy_weight_smoothing"),
    (lambda: ml.TripletMarginLoss(), "triplet_margin_big"),
    (lambda: ml.CosineSimilarity(), "cosine_similarity_big"),
    (lambda: ml.AdaptiveAvgPool3D(3), "adaptive_avg_pool3d"),
    (lambda: ml.Prod(axis=-1), "prod"),
    (lambda: ml.SymmetricSolve(), "symmetric_solve"),
]


@pytest.mark.parametrize("make,name", _WIDE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float32_float64_bitwise_as_the_unwrapped_forward(make, name, dtype) -> None:
    """The rule touches half precision only: on torch (and NumPy), a float32 / float64 forward
    is the method's own, bit for bit."""
    op = make()
    case = CASES[name][0]
    ins = {k: v for k, v in hp.values(name, case, "float16").items()}
    raw = inspect.unwrap(type(op).forward)  # (the method itself, under every wrapper)
    for kind in ("torch", "numpy"):
        if kind == "torch":
            xp = TorchBackend(dtype=str(dtype).removeprefix("torch."))._xp
            arrays = {**{k: torch.tensor(v, dtype=dtype) for k, v in ins.items()},
                      **{k: torch.tensor(v) for k, v in case.data.items()}}
        else:
            xp = np
            nd = np.float32 if dtype == torch.float32 else np.float64
            arrays = {**{k: v.astype(nd) for k, v in ins.items()}, **case.data}
        got = op.forward(xp, **arrays)
        want = raw(op, xp, **arrays)
        a, b = (np.asarray(v.numpy() if kind == "torch" else v) for v in (got, want))
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
