"""The margin, embedding and likelihood losses' configurations and cases for the losses
fuzzer (:mod:`losses_norms_fuzz_cases` draws them among its own): MarginRankingLoss,
HingeEmbeddingLoss, SoftMarginLoss, CosineEmbeddingLoss, TripletMarginLoss,
MultiMarginLoss, MultiLabelMarginLoss, MultiLabelSoftMarginLoss, PoissonNLLLoss and
GaussianNLLLoss with random options and shapes, beside ``torch.nn.functional``.

``special="ties"`` takes inputs on a grid of eighths, so pairs land exactly on a margin
(and, for the triplet loss with eps = 0 and p in 1, 2, inf, distances tie exactly): where
torch passes a hinge's gradient at 0 and where its kernels do not is then compared too.
"""

from __future__ import annotations

import json
import math
import zlib
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from layer_edges import Case

import mithril as ml

MARGIN_LOSSES = ("margin_ranking", "hinge_embedding", "soft_margin", "cosine_embedding",
                 "triplet", "multi_margin", "multilabel_margin", "multilabel_soft_margin",
                 "poisson_nll", "gaussian_nll")
_REDUCTIONS = ("mean", "sum", "none")


def _dims(draw: Any, lo: int, hi: int) -> list[int]:
    return [draw(st.integers(1, 4)) for _ in range(draw(st.integers(lo, hi)))]


@st.composite
def margin_loss_configs(draw: Any) -> dict[str, Any]:
    op = draw(st.sampled_from(MARGIN_LOSSES))
    cfg: dict[str, Any] = {"op": op, "reduction": draw(st.sampled_from(_REDUCTIONS)),
                           "scale": draw(st.sampled_from([1.0, 1.0, 10.0])),
                           "special": draw(st.sampled_from(["", "", "ties"]))}
    if op in ("margin_ranking", "hinge_embedding", "soft_margin", "poisson_nll"):
        cfg["shape"] = _dims(draw, 0, 3)
    elif op == "cosine_embedding":
        cfg["shape"] = _dims(draw, 1, 2)
    elif op in ("multi_margin", "multilabel_margin"):
        cfg["shape"] = _dims(draw, 1, 2)
    else:
        cfg["shape"] = _dims(draw, 1, 3)
    if op in ("margin_ranking", "hinge_embedding", "cosine_embedding", "multi_margin"):
        cfg["margin"] = draw(st.sampled_from([1.0, 0.5, 0.0, -0.25, 2.0]))
    if op == "triplet":
        cfg["margin"] = draw(st.sampled_from([1.0, 0.5, 2.0]))
        cfg["p"] = draw(st.sampled_from([2.0, 1.0, math.inf] if cfg["special"] else
                                        [2.0, 1.0, 3.0, 0.5, math.inf]))
        cfg["eps"] = 0.0 if cfg["special"] else draw(st.sampled_from([1e-6, 0.0, 0.1]))
        cfg["swap"] = draw(st.booleans())
    elif op == "multi_margin":
        cfg["p"] = draw(st.sampled_from([1, 2]))
        cfg["weight"] = draw(st.booleans())
    elif op == "multilabel_soft_margin":
        cfg["weight"] = draw(st.booleans())
    elif op == "poisson_nll":
        cfg["log_input"], cfg["full"] = draw(st.booleans()), draw(st.booleans())
        cfg["eps"] = draw(st.sampled_from([1e-8, 0.5]))
    elif op == "gaussian_nll":
        cfg["full"] = draw(st.booleans())
        cfg["eps"] = draw(st.sampled_from([1e-6, 0.1]))
        cfg["var"] = draw(st.sampled_from(["same", "rows", "one"]))
    return cfg


def _rng(cfg: dict[str, Any]) -> np.random.Generator:
    name = json.dumps(cfg, sort_keys=True, separators=(",", ":"))
    return np.random.default_rng(zlib.crc32(name.encode()))


def _ref(fn: Any, *keys: str, **kw: Any) -> Any:
    def ref(t: dict, d: dict) -> dict:
        return {"output": fn(*[t[k] if k in t else d[k] for k in keys], **kw)}
    return ref


def margin_case(cfg: dict[str, Any]) -> Case:
    """The case a configuration of :func:`margin_loss_configs` describes."""
    rng, op, shape, r = _rng(cfg), cfg["op"], tuple(cfg["shape"]), cfg["reduction"]
    ties = cfg["special"] == "ties"

    def x(shp: tuple = shape) -> np.ndarray:
        v = rng.standard_normal(shp) * (cfg["scale"] if not ties else 2.0)
        return np.round(v * 8) / 8 if ties else v

    def signs(shp: tuple = shape) -> np.ndarray:
        return rng.choice([-1.0, 1.0, 1.0, -1.0, 0.0] if op != "soft_margin" else [-1.0, 1.0],
                          shp)

    m = cfg.get("margin")
    if op == "margin_ranking":
        y, x2 = rng.choice([-1.0, 1.0], shape), x()
        x1 = np.where(rng.random(shape) < 0.5, x2 + y * m, x()) if ties else x()
        return Case(lambda: ml.MarginRankingLoss(m, r),
                    {"input1": x1, "input2": x2, "target": y},
                    _ref(F.margin_ranking_loss, "input1", "input2", "target", margin=m,
                         reduction=r))
    if op == "hinge_embedding":
        v = np.where(rng.random(shape) < 0.5, m, x()) if ties else x()
        return Case(lambda: ml.HingeEmbeddingLoss(m, r), {"input": v},
                    _ref(F.hinge_embedding_loss, "input", "target", margin=m, reduction=r),
                    data={"target": signs()})
    if op == "soft_margin":
        return Case(lambda: ml.SoftMarginLoss(r), {"input": x()},
                    _ref(F.soft_margin_loss, "input", "target", reduction=r),
                    data={"target": signs()})
    if op == "cosine_embedding":
        a, b = x(), x()
        if ties:  # zero vectors: cosine 0 (a tie with margin 0)
            a = np.where(rng.random((*shape[:-1], 1)) < 0.4, 0.0, a)
        return Case(lambda: ml.CosineEmbeddingLoss(m, r), {"input1": a, "input2": b},
                    _ref(F.cosine_embedding_loss, "input1", "input2", "target", margin=m,
                         reduction=r), data={"target": signs(shape[:-1])})
    if op == "triplet":
        a = x()
        pos = np.where(rng.random(shape) < 0.3, a, x()) if ties else x()
        kw = {"margin": m, "p": cfg["p"], "eps": cfg["eps"], "swap": cfg["swap"]}
        return Case(lambda: ml.TripletMarginLoss(**kw, reduction=r),
                    {"anchor": a, "positive": pos, "negative": x()},
                    _ref(F.triplet_margin_loss, "anchor", "positive", "negative",
                         reduction=r, **kw))
    if op == "multi_margin":
        c = shape[-1]
        t = rng.integers(0, c, shape[:-1])
        v = x()
        if ties:  # x[i] = x[y] − margin: a term exactly at 0
            xy = np.take_along_axis(v, t[..., None], -1)
            v = np.where(rng.random(shape) < 0.4, xy - m, v)
        w = rng.uniform(0.2, 3.0, c) if cfg["weight"] else None
        return Case(lambda: ml.MultiMarginLoss(cfg["p"], m, w, r), {"input": v},
                    lambda tt, d: {"output": F.multi_margin_loss(
                        tt["input"], d["target"], p=cfg["p"], margin=m, reduction=r,
                        weight=None if w is None else torch.tensor(w, dtype=tt["input"].dtype))},
                    data={"target": t})
    if op == "multilabel_margin":
        c = shape[-1]
        rows = np.reshape(rng.integers(-1, c, (max(1, math.prod(shape[:-1])), c)), shape)
        return Case(lambda: ml.MultiLabelMarginLoss(r), {"input": x()},
                    _ref(F.multilabel_margin_loss, "input", "target", reduction=r),
                    data={"target": rows})
    if op == "multilabel_soft_margin":
        w = rng.uniform(0.2, 3.0, shape[-1]) if cfg["weight"] else None
        t = rng.choice([0.0, 1.0], shape) if ties else rng.random(shape)
        return Case(lambda: ml.MultiLabelSoftMarginLoss(w, r), {"input": x(), "target": t},
                    lambda tt, d: {"output": F.multilabel_soft_margin_loss(
                        tt["input"], tt["target"], reduction=r,
                        weight=None if w is None else torch.tensor(w, dtype=tt["input"].dtype))})
    if op == "poisson_nll":
        kw = {"log_input": cfg["log_input"], "full": cfg["full"], "eps": cfg["eps"]}
        v = x() if cfg["log_input"] else rng.uniform(0.05, 4.0, shape)
        t = rng.choice([0.0, 1.0, 0.5, 2.0, 3.0, 6.0], shape)
        ref = _ref(F.poisson_nll_loss, "input", "target", reduction=r, **kw)
        block = lambda: ml.PoissonNLLLoss(**kw, reduction=r)  # noqa: E731
        if cfg["full"]:  # torch's Stirling-term target gradient is NaN at t = 0
            return Case(block, {"input": v}, ref, data={"target": t})
        return Case(block, {"input": v, "target": t}, ref)
    vshape = {"same": shape, "rows": shape[:-1],
              "one": (*shape[:-1], 1)}[cfg["var"]]
    var = rng.uniform(0.0, 2.0, vshape)
    if ties:  # below and at the clamp
        var = np.where(rng.random(vshape) < 0.4, rng.choice([0.0, cfg["eps"] / 2, cfg["eps"]],
                                                            vshape), var)
    return Case(lambda: ml.GaussianNLLLoss(cfg["full"], cfg["eps"], r),
                {"input": x(), "target": x(), "var": var},
                _ref(F.gaussian_nll_loss, "input", "target", "var", full=cfg["full"],
                     eps=cfg["eps"], reduction=r))
