"""Configurations and cases of ``test_losses_norms_fuzz*.py``: every loss, norm and
activation block we offer, with random arguments and shapes, beside its torch peer.

A configuration is a JSON dict whose text is the case's name: it seeds the inputs, so a name
rebuilds its case anywhere (:data:`CASES`, for the JAX column in a fresh x64 process). Its
``op`` names the block; the rest are the block's arguments, the input's shape (axes of size 1
and 0, no batch axis), and ``scale`` / ``special`` for extreme values (large logits, tiny
variances, ±inf / NaN where torch defines the result, inputs exactly at a kink).
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
from margin_losses_fuzz_cases import MARGIN_LOSSES, margin_case, margin_loss_configs

import mithril as ml

ACTIVATIONS = ("relu", "leaky_relu", "sigmoid", "tanh", "gelu", "softmax", "softplus", "elu",
               "selu", "celu", "mish", "hardswish", "hardsigmoid", "l1", "l2",
               "silu", "log_softmax", "glu", "hardtanh",
               # torch.nn's small modules (test_small_modules_vs_torch.py)
               "identity", "softmin", "tanhshrink", "threshold", "relu6", "rrelu")
PAIR_LOSSES = ("mse", "l1_loss", "huber", "smooth_l1", "bce_logits", "bce_probs", "kl_div",
               "hinge", "quad_hinge", "quantile")
NORMS = ("layer_norm", "group_norm", "batch_norm", "rms_norm", "instance_norm")
REDUCTIONS = ("mean", "sum", "none")
#: alphas exact in float32: torch's CELU backward rounds 1/α through float32
ALPHAS = (1.0, 0.5, 2.0, 0.25, 1.5, -0.75)


def name_of(cfg: dict[str, Any]) -> str:
    return json.dumps(cfg, sort_keys=True, separators=(",", ":"))


def _shape(draw: Any, lo: int, hi: int, dmax: int = 4, zero: bool = True) -> list[int]:
    """Axes of 1 to ``dmax`` elements, now and then one of 0 (when ``zero``)."""
    rank = draw(st.integers(lo, hi))
    dims = [draw(st.integers(1, dmax)) for _ in range(rank)]
    if zero and dims and draw(st.integers(0, 7)) == 0:
        dims[draw(st.integers(0, rank - 1))] = 0
    return dims


# -- strategies -------------------------------------------------------------------------------
@st.composite
def activation_configs(draw: Any) -> dict[str, Any]:
    op = draw(st.sampled_from(ACTIVATIONS))
    cfg: dict[str, Any] = {"op": op, "shape": _shape(draw, 0, 3),
                           "scale": draw(st.sampled_from([1.0, 1.0, 4.0, 30.0, 1e3])),
                           "special": draw(st.sampled_from(["", "", "kinks", "inf", "nan"]))}
    if op == "leaky_relu":
        cfg["slope"] = draw(st.sampled_from([0.01, 0.2, -0.5, 1.5, 0.0]))
    elif op == "gelu":
        cfg["approximate"] = draw(st.sampled_from(["none", "tanh"]))
    elif op in ("softmax", "log_softmax", "softmin"):
        cfg["shape"] = _shape(draw, 1, 3)
        cfg["axis"] = draw(st.integers(-len(cfg["shape"]), len(cfg["shape"]) - 1))
    elif op == "glu":  # an even, nonzero length along the halved axis (torch refuses 0)
        cfg["shape"] = _shape(draw, 1, 3)
        cfg["axis"] = draw(st.integers(-len(cfg["shape"]), len(cfg["shape"]) - 1))
        cfg["shape"][cfg["axis"]] = 2 * draw(st.integers(1, 2))
    elif op == "hardtanh":
        cfg["min_val"], cfg["max_val"] = draw(st.sampled_from(
            [(-1.0, 1.0), (0.0, 6.0), (-2.5, 0.5), (1.0, 1.0), (-0.25, 3.0)]))
    elif op == "softplus":
        cfg["beta"] = draw(st.sampled_from([1.0, 0.5, 2.0, 10.0]))
        cfg["threshold"] = draw(st.sampled_from([20.0, 1.0, 0.0, -2.0, 5.0]))
    elif op in ("elu", "celu"):
        cfg["alpha"] = draw(st.sampled_from(ALPHAS))
    elif op == "threshold":
        cfg["threshold"], cfg["value"] = draw(st.sampled_from(
            [(0.0, 0.0), (0.5, -2.0), (-1.0, 20.0), (2.0, 2.0)]))
    elif op == "rrelu":  # inference mode: the fixed slope (lower + upper) / 2
        cfg["lower"], cfg["upper"] = draw(st.sampled_from(
            [(1 / 8, 1 / 3), (0.0, 0.0), (0.1, 0.9), (0.5, 0.5)]))
    return cfg


@st.composite
def pair_loss_configs(draw: Any) -> dict[str, Any]:
    op = draw(st.sampled_from(PAIR_LOSSES))
    cfg: dict[str, Any] = {"op": op, "shape": _shape(draw, 0, 3),
                           "reduction": draw(st.sampled_from(REDUCTIONS)),
                           "scale": draw(st.sampled_from([1.0, 1.0, 10.0, 1e3])),
                           "special": draw(st.sampled_from(["", "", "ties", "hard"]))}
    if op == "huber":
        cfg["delta"] = draw(st.sampled_from([1.0, 0.1, 2.5, 1e-3]))
    elif op == "smooth_l1":
        cfg["beta"] = draw(st.sampled_from([1.0, 0.0, 0.3, 4.0]))
    elif op in ("bce_logits", "bce_probs"):
        cfg["pos_weight"] = draw(st.sampled_from([1.0, 1.0, 3.0, 0.25]))
        if cfg["shape"] and cfg["shape"][-1] and draw(st.booleans()):  # one per class
            cfg["pos_weight"] = draw(st.lists(st.sampled_from([1.0, 3.0, 0.25, 0.5]),
                                              min_size=cfg["shape"][-1],
                                              max_size=cfg["shape"][-1]))
    elif op == "quantile":
        cfg["q"] = draw(st.sampled_from([0.5, 0.1, 0.9, 0.0, 1.0]))
    elif op == "kl_div":
        cfg["log_target"] = draw(st.booleans())
        cfg["reduction"] = draw(st.sampled_from([*REDUCTIONS, "batchmean"]))
    return cfg


@st.composite
def cross_entropy_configs(draw: Any) -> dict[str, Any]:
    c = draw(st.integers(1, 5))
    batch = _shape(draw, 0, 3, 3)
    axis = draw(st.sampled_from([-1, 1])) if batch else -1
    shape = batch + [c] if axis == -1 else batch[:1] + [c] + batch[1:]
    target = draw(st.sampled_from(["index", "index", "probs", "onehot"]))
    cfg: dict[str, Any] = {"op": "cross_entropy", "shape": shape, "axis": axis, "target": target,
                           "input_type": draw(st.sampled_from(["logits", "logits", "probs",
                                                               "log_probs"])),
                           "reduction": draw(st.sampled_from(REDUCTIONS)),
                           "scale": draw(st.sampled_from([1.0, 1.0, 30.0, 1e4])),
                           "weight": draw(st.booleans()), "smoothing":
                           draw(st.sampled_from([0.0, 0.0, 0.1, 0.5, 1.0]))}
    if draw(st.integers(0, 4)) == 0:  # −inf logits (a masked class), one per row at most
        cfg["neg_inf"] = True
    if target == "index":
        cfg["ignore_index"] = draw(st.sampled_from([None, None, -100, 0, c]))
    else:  # soft targets are differentiable too (torch's too)
        cfg["target_grad"] = draw(st.booleans())
    return cfg


@st.composite
def norm_configs(draw: Any) -> dict[str, Any]:
    op = draw(st.sampled_from(NORMS))
    cfg: dict[str, Any] = {"op": op, "eps": draw(st.sampled_from([1e-5, 1e-5, 0.1, 1e-12])),
                           "special": draw(st.sampled_from(["", "", "tiny_var", "large"]))}
    if op in ("layer_norm", "rms_norm"):
        cfg["shape"] = _shape(draw, 1, 4, zero=False)
        cfg["k"] = draw(st.integers(1, len(cfg["shape"])))
        cfg["affine"] = draw(st.booleans())
        if op == "layer_norm":
            cfg["bias"] = draw(st.booleans())
            cfg["k"] = draw(st.sampled_from([None, cfg["k"]]))
        elif draw(st.booleans()):
            cfg["eps"] = None
    elif op == "group_norm":
        g, cg = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        cfg.update(groups=g, shape=[draw(st.integers(1, 3)), g * cg, *_shape(draw, 0, 2, 3)],
                   affine=draw(st.booleans()))
    elif op == "instance_norm":  # more than one spatial element (torch refuses one)
        nd = draw(st.sampled_from([1, 2]))
        spatial = [draw(st.integers(2, 4)), *_shape(draw, nd - 1, nd - 1, 3, zero=False)]
        cfg.update(nd=nd, shape=[draw(st.integers(1, 3)), draw(st.integers(1, 3)), *spatial],
                   affine=draw(st.booleans()))
    else:
        nd = draw(st.sampled_from([1, 2]))
        rank = draw(st.sampled_from([2, 3])) if nd == 1 else 4
        cfg.update(nd=nd, shape=[draw(st.integers(1, 4)), draw(st.integers(1, 3)),
                                 *_shape(draw, rank - 2, rank - 2, 3, zero=False)],
                   affine=draw(st.booleans()), track=draw(st.booleans()),
                   training=draw(st.booleans()),
                   momentum=draw(st.sampled_from([0.1, None, 0.0, 1.0, 0.5])))
    return cfg


@st.composite
def nll_loss_configs(draw: Any) -> dict[str, Any]:
    """NLLLoss: (C,) or (N, C, d1, ...) log-probabilities (any values), torch's layout."""
    c = draw(st.integers(1, 5))
    batch = _shape(draw, 0, 3, 3)
    return {"op": "nll_loss", "shape": batch[:1] + [c] + batch[1:],
            "reduction": draw(st.sampled_from(REDUCTIONS)),
            "scale": draw(st.sampled_from([1.0, 30.0])), "weight": draw(st.booleans()),
            "ignore_index": draw(st.sampled_from([-100, 0, c, None]))}


configs = st.one_of(activation_configs(), pair_loss_configs(), cross_entropy_configs(),
                    norm_configs(), margin_loss_configs(), nll_loss_configs())


# -- inputs -----------------------------------------------------------------------------------
def _rng(cfg: dict[str, Any], salt: int = 0) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(name_of(cfg).encode()) + salt)


def _kinks(cfg: dict[str, Any]) -> list[float]:
    """The points where the activation's pieces meet (its gradient is a convention there)."""
    op = cfg["op"]
    if op == "softplus":
        return [cfg["threshold"] / cfg["beta"], 0.0]
    if op in ("hardswish", "hardsigmoid"):
        return [-3.0, 3.0, 0.0]
    if op == "hardtanh":
        return [cfg["min_val"], cfg["max_val"], 0.0]
    if op == "relu6":
        return [0.0, 6.0]
    if op == "threshold":
        return [cfg["threshold"], 0.0]
    return [0.0]


def activation_input(cfg: dict[str, Any]) -> np.ndarray:
    rng = _rng(cfg)
    x = rng.standard_normal(cfg["shape"]) * cfg["scale"]
    flat = x.reshape(-1)
    if flat.size and cfg["special"]:
        at = rng.integers(0, flat.size, max(1, flat.size // 3))
        if cfg["special"] == "kinks":
            flat[at] = rng.choice(_kinks(cfg), at.size)
        elif cfg["special"] == "inf":
            flat[at] = rng.choice([np.inf, -np.inf], at.size)
        else:
            flat[at] = np.nan
    return x


# -- cases ------------------------------------------------------------------------------------
def _activation_case(cfg: dict[str, Any]) -> Case:
    op = cfg["op"]
    blocks: dict[str, Any] = {
        "relu": (ml.Relu, F.relu), "sigmoid": (ml.Sigmoid, torch.sigmoid),
        "tanh": (ml.Tanh, torch.tanh), "selu": (ml.Selu, F.selu), "mish": (ml.Mish, F.mish),
        "hardswish": (ml.Hardswish, F.hardswish),
        "hardsigmoid": (ml.Hardsigmoid, lambda x: torch.where(  # (±inf: 1 / 0 as torch's,
            (x > -3) & (x < 3), (x + 3) / 6, torch.where(  # not 1 + 0·inf; NaN stays NaN)
                x >= 3, torch.ones_like(x), torch.where(x <= -3, torch.zeros_like(x), 0 * x)))),
        "l1": (ml.L1, lambda x: x.abs().sum()), "l2": (ml.L2, lambda x: 0.5 * (x * x).sum()),
        "leaky_relu": (lambda: ml.LeakyRelu(cfg["slope"]),
                       lambda x: F.leaky_relu(x, cfg["slope"])),
        "gelu": (lambda: ml.Gelu(cfg["approximate"]),
                 lambda x: F.gelu(x, approximate=cfg["approximate"])),
        "softmax": (lambda: ml.Softmax(cfg["axis"]), lambda x: F.softmax(x, cfg["axis"])),
        "softplus": (lambda: ml.Softplus(cfg["beta"], cfg["threshold"]),
                     lambda x: F.softplus(x, cfg["beta"], cfg["threshold"])),
        "elu": (lambda: ml.Elu(cfg["alpha"]), lambda x: F.elu(x, cfg["alpha"])),
        "celu": (lambda: ml.Celu(cfg["alpha"]), lambda x: F.celu(x, cfg["alpha"])),
        "silu": (ml.Silu, F.silu),
        "log_softmax": (lambda: ml.LogSoftmax(cfg["axis"]),
                        lambda x: F.log_softmax(x, cfg["axis"])),
        "glu": (lambda: ml.Glu(cfg["axis"]), lambda x: F.glu(x, cfg["axis"])),
        "hardtanh": (lambda: ml.Hardtanh(cfg["min_val"], cfg["max_val"]),
                     lambda x: F.hardtanh(x, cfg["min_val"], cfg["max_val"])),
        "identity": (ml.Identity, lambda x: x * 1), "tanhshrink": (ml.Tanhshrink, F.tanhshrink),
        "softmin": (lambda: ml.Softmin(cfg["axis"]), lambda x: F.softmin(x, cfg["axis"])),
        "threshold": (lambda: ml.Threshold(cfg["threshold"], cfg["value"]),
                      lambda x: F.threshold(x, cfg["threshold"], cfg["value"])),
        "relu6": (ml.ReLU6, F.relu6),
        "rrelu": (lambda: ml.RReLU(cfg["lower"], cfg["upper"]),
                  lambda x: F.rrelu(x, cfg["lower"], cfg["upper"])),
    }
    block, fn = blocks[op]
    # (hardsigmoid's reference is its formula: torch's backward multiplies by 1/6 in float32)
    return Case(block, {"input": activation_input(cfg)},
                lambda t, _: {"output": fn(t["input"])},
                training=False if op == "rrelu" else None)


def unspecified_gradients(name: str) -> np.ndarray | None:
    """Where the input gradient is not torch's to define: at a NaN input of the ELU family,
    Hardswish and Hardtanh, torch's backward gives NaN (Hardtanh: 0) in its vectorised loop
    but the positive side's slope in its scalar tail, so an element's gradient depends on its position (ours: NaN
    for the ELU family, 1 for Hardswish, the cotangent for Hardtanh, on every backend)."""
    cfg = json.loads(name)
    if cfg["op"] in ("elu", "selu", "celu", "hardswish", "hardtanh", "relu6") and \
            cfg["special"] == "nan":
        return np.isnan(activation_input(cfg))
    return None


def _pair_inputs(cfg: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    rng, op, shape, s = _rng(cfg), cfg["op"], cfg["shape"], cfg["scale"]
    x = rng.standard_normal(shape) * s
    t = rng.standard_normal(shape) * s
    if op in ("bce_logits", "bce_probs", "kl_div"):
        t = rng.random(shape)
        if cfg["special"] == "hard":  # 0 / 1 labels (KL: some zero probabilities)
            t = np.round(t) if op != "kl_div" else np.where(t < 0.3, 0.0, t)
    if op == "bce_probs":  # p(1 − p) above torch's 1e-12 clamp of its backward (float32 too)
        x = 1 / (1 + np.exp(-np.clip(x, -12, 12)))
    elif op == "kl_div":
        x = rng.random(shape) + 1e-3
        if cfg.get("log_target"):  # log p (a zero probability: e^-50)
            t = np.log(np.where(t > 0, t, np.exp(-50.0)))
    elif op in ("hinge", "quad_hinge"):
        t = rng.choice([-1.0, 1.0], shape)
        if cfg["special"] == "ties":  # margins exactly 1
            x = np.where(rng.random(shape) < 0.5, t, x)
    elif cfg["special"] == "ties":  # input == target, |d| == delta / beta
        m = rng.random(shape)
        x = np.where(m < 0.3, t, x)
        edge = cfg.get("delta", cfg.get("beta"))
        if edge is not None:
            x = np.where(m > 0.8, t + edge, x)
    return x, t


def _pair_ref(cfg: dict[str, Any]) -> Any:
    op, r = cfg["op"], cfg["reduction"]

    def reduce(v: torch.Tensor) -> torch.Tensor:
        return v if r == "none" else v.mean() if r == "mean" else v.sum()

    if op == "mse":
        return lambda x, t: F.mse_loss(x, t, reduction=r)
    if op == "l1_loss":
        return lambda x, t: F.l1_loss(x, t, reduction=r)
    if op == "huber":
        return lambda x, t: F.huber_loss(x, t, reduction=r, delta=cfg["delta"])
    if op == "smooth_l1":
        return lambda x, t: F.smooth_l1_loss(x, t, reduction=r, beta=cfg["beta"])
    w = cfg.get("pos_weight", 1.0)
    if op == "bce_logits":
        return lambda x, t: F.binary_cross_entropy_with_logits(
            x, t, reduction=r, pos_weight=None if w == 1.0 else torch.tensor(w, dtype=x.dtype))
    if op == "bce_probs":
        if w == 1.0:
            return lambda x, t: F.binary_cross_entropy(x, t, reduction=r)
        return lambda x, t: reduce(-(torch.tensor(w, dtype=x.dtype) * t
                                     * torch.log(x).clamp_min(-100)
                                     + (1 - t) * torch.log1p(-x).clamp_min(-100)))
    if op == "kl_div":
        return lambda x, t: F.kl_div(torch.log(x), t, reduction=r,
                                     log_target=cfg.get("log_target", False))
    if op == "hinge":
        return lambda x, t: reduce(torch.maximum(1 - t * x, torch.zeros_like(x)))
    if op == "quad_hinge":
        return lambda x, t: reduce(torch.maximum(1 - t * x, torch.zeros_like(x)) ** 2)
    q = cfg["q"]
    return lambda x, t: reduce(torch.maximum(q * (t - x), (q - 1) * (t - x)))


def _pair_case(cfg: dict[str, Any]) -> Case:
    op, r = cfg["op"], cfg["reduction"]
    w = cfg.get("pos_weight", 1.0)
    blocks: dict[str, Any] = {
        "mse": lambda: ml.SquaredError(reduction=r), "l1_loss": lambda: ml.AbsoluteError(r),
        "huber": lambda: ml.HuberLoss(cfg["delta"], r),
        "smooth_l1": lambda: ml.SmoothL1Loss(cfg["beta"], r),
        "bce_logits": lambda: ml.BinaryCrossEntropy("logits", w, reduction=r),
        "bce_probs": lambda: ml.BinaryCrossEntropy("probs", w, reduction=r),
        "kl_div": lambda: ml.KLDivergence(reduction=r, log_target=cfg.get("log_target", False)),
        "hinge": lambda: ml.HingeLoss(r),
        "quad_hinge": lambda: ml.QuadHingeLoss(r),
        "quantile": lambda: ml.QuantileLoss(cfg["q"], r)}
    x, t = _pair_inputs(cfg)
    ref = _pair_ref(cfg)
    inputs = {"input": x, "target": t}
    if op == "kl_div" and (t == 0).any():  # d/dp of p·log p at p = 0: −inf in torch, a
        return Case(blocks[op], {"input": x}, lambda a, d: {"output": ref(a["input"],
                                                                          d["target"])},
                    data={"target": t})  # convention: only the prediction differentiated
    return Case(blocks[op], inputs, lambda a, _: {"output": ref(a["input"], a["target"])})


def _ce_case(cfg: dict[str, Any]) -> Case:
    rng, shape, ax = _rng(cfg), cfg["shape"], cfg["axis"] % len(cfg["shape"])
    c = shape[ax]
    x = rng.standard_normal(shape) * cfg["scale"]
    if cfg.get("neg_inf") and c > 1:  # class 0 masked where a coin says so
        first = (slice(None),) * ax + (0,)
        x[first] = np.where(rng.random(x[first].shape) < 0.5, -np.inf, x[first])
    if cfg["input_type"] != "logits":  # probabilities along the class axis (or their log)
        e = np.exp(x - x.max(axis=ax, keepdims=True, initial=-np.inf)) if x.size else x
        x = e / e.sum(axis=ax, keepdims=True) if x.size else x
        x = np.log(x) if cfg["input_type"] == "log_probs" else x
    opts: dict[str, Any] = {}
    if cfg["weight"]:
        opts["weight"] = rng.uniform(0.2, 2.0, c)
    if cfg["smoothing"]:
        opts["label_smoothing"] = cfg["smoothing"]
    if cfg.get("ignore_index") is not None:
        opts["ignore_index"] = cfg["ignore_index"]
    batch = [d for i, d in enumerate(shape) if i != ax]
    if cfg["target"] == "index":
        t: np.ndarray = rng.integers(0, c, batch)
        if "ignore_index" in opts:
            t[rng.random(t.shape) < 1 / 3] = opts["ignore_index"]
    else:
        t = rng.random(shape) + 0.05
        if cfg["target"] == "onehot":
            t = np.moveaxis(np.eye(c)[np.moveaxis(t, ax, -1).argmax(-1)], -1, ax)
        t = t / t.sum(axis=ax, keepdims=True)
    r, it = cfg["reduction"], cfg["input_type"]

    def ref(a: dict, d: dict) -> dict:
        xt = a["input"]
        if ax != min(1, len(shape) - 1):  # torch's class axis: 1 (0 unbatched); contiguous:
            xt = xt.movedim(ax, 1).contiguous()  # nll_loss2d's backward refuses others
        tt = d["target"] if "target" in d else a["target"]
        if tt.is_floating_point() and ax != min(1, len(shape) - 1):
            tt = tt.movedim(ax, 1)
        kw = {k: torch.tensor(v, dtype=xt.dtype) if k == "weight" else v
              for k, v in opts.items()}
        xt = torch.log(xt) if it == "probs" else xt
        if it == "logits":
            out = F.cross_entropy(xt, tt, reduction=r, **kw)
        elif "label_smoothing" not in kw and not tt.is_floating_point():
            out = F.nll_loss(xt, tt, reduction=r, **kw)  # NLL itself
        else:  # F.cross_entropy would take a log-softmax, which changes the gradient
            out = cross_entropy_of_log_probs(xt, tt, reduction=r, **kw)
        return {"output": out}

    block = lambda: ml.CrossEntropy(r, it, axis=cfg["axis"], **opts)  # noqa: E731
    if cfg.get("target_grad"):
        return Case(block, {"input": x, "target": t}, ref)
    return Case(block, {"input": x}, ref, data={"target": t})


def cross_entropy_of_log_probs(logp: torch.Tensor, target: torch.Tensor, reduction: str,
                               weight: torch.Tensor | None = None, ignore_index: int = -100,
                               label_smoothing: float = 0.0) -> torch.Tensor:
    """``F.cross_entropy`` on log-probabilities ``logp`` (class axis 1, or 0 unbatched) without
    its log-softmax: ATen's ``cross_entropy_loss_label_smoothing`` and
    ``cross_entropy_loss_prob_target`` (``LossNLL.cpp``) as torch expressions. On
    ``log_softmax(x)`` it equals ``F.cross_entropy(x, ...)`` (checked by the tests)."""
    ax = min(1, logp.ndim - 1)
    c, eps = logp.shape[ax], label_smoothing
    view = [1] * logp.ndim
    view[ax] = c
    w = torch.ones(c, dtype=logp.dtype) if weight is None else weight
    wb = w.view(view)
    if target.is_floating_point():
        rows = -(logp * wb * ((1 - eps) * target + eps / c)).sum(ax)
        if reduction == "none":
            return rows
        return rows.sum() / (logp.numel() // c) if reduction == "mean" else rows.sum()
    valid = target != ignore_index
    # the NLL part is torch's own (its all-ignored mean: NaN, with a zero gradient)
    nll = F.nll_loss(logp, target, weight, ignore_index=ignore_index, reduction=reduction)
    smooth = torch.where(valid, -(logp * wb).sum(ax), 0.0)
    if reduction == "none":
        return (1 - eps) * nll + eps / c * smooth
    if reduction == "sum":
        return (1 - eps) * nll + eps / c * smooth.sum()
    den = torch.where(valid, w[torch.where(valid, target, 0)], 0.0).sum() \
        if weight is not None else valid.sum()
    return (1 - eps) * nll + eps / c * smooth.sum() / den


def _nll_case(cfg: dict[str, Any]) -> Case:
    rng, shape = _rng(cfg), cfg["shape"]
    c, ii = shape[min(1, len(shape) - 1)], cfg["ignore_index"]
    x = rng.standard_normal(shape) * cfg["scale"]
    t = rng.integers(0, c, shape[:1] + shape[2:] if len(shape) > 1 else [])
    if ii is not None:
        t[rng.random(t.shape) < 1 / 3] = ii
    w = rng.uniform(0.2, 2.0, c) if cfg["weight"] else None
    kw: dict[str, Any] = {} if ii is None else {"ignore_index": ii}

    def ref(a: dict, d: dict) -> dict:
        wt = None if w is None else torch.tensor(w, dtype=a["input"].dtype)
        return {"output": F.nll_loss(a["input"], d["target"], wt, reduction=cfg["reduction"],
                                     **kw)}
    return Case(lambda: ml.NLLLoss(w, ii, cfg["reduction"]), {"input": x}, ref,
                data={"target": t})


def _norm_input(cfg: dict[str, Any]) -> np.ndarray:
    rng = _rng(cfg)
    x = rng.standard_normal(cfg["shape"])
    if cfg["special"] == "tiny_var":  # a large mean, variance ~1e-8 of it
        x = 3.0 + 1e-4 * x
    elif cfg["special"] == "large":
        x = x * 1e4
    return x


def _norm_case(cfg: dict[str, Any]) -> Case:
    op, eps, aff = cfg["op"], cfg["eps"], cfg["affine"]
    x = _norm_input(cfg)
    if op == "layer_norm":
        k = cfg["k"]
        ns = tuple(cfg["shape"][-(k or 1):])

        def ln(a: dict, _: dict) -> dict:
            return {"output": F.layer_norm(a["input"], ns, _named(a, "weight") if aff else None,
                                           _named(a, "bias") if cfg["bias"] else None, eps)}
        return Case(lambda: ml.LayerNorm(eps, aff, cfg["bias"], k and ns), {"input": x}, ln)
    if op == "rms_norm":
        ns = tuple(cfg["shape"][-cfg["k"]:])
        return Case(lambda: ml.RMSNorm(ns, eps, aff), {"input": x}, lambda a, _: {
            "output": F.rms_norm(a["input"], ns, _named(a, "weight") if aff else None, eps)})
    if op == "group_norm":
        g = cfg["groups"]
        return Case(lambda: ml.GroupNorm(g, eps, aff), {"input": x}, lambda a, _: {
            # (torch.group_norm: F.group_norm also refuses one element per (n, group) when
            # n · C / G is 1 (its batch-norm check), a quirk of the functional's, not the op's)
            "output": _group_norm(a["input"], g, _named(a, "weight") if aff else None,
                                   _named(a, "bias") if aff else None, eps)})
    if op == "instance_norm":
        c = cfg["shape"][1]
        block = ml.InstanceNorm1D if cfg["nd"] == 1 else ml.InstanceNorm2D
        return Case(lambda: block(c, eps, aff), {"input": x}, lambda a, _: {
            "output": F.instance_norm(a["input"], weight=_named(a, "weight") if aff else None,
                                      bias=_named(a, "bias") if aff else None, eps=eps)})
    c, tr, mom = cfg["shape"][1], cfg["training"], cfg["momentum"]
    block = ml.BatchNorm1D if cfg["nd"] == 1 else ml.BatchNorm2D

    def bn(a: dict, _: dict) -> dict:
        dt = a["input"].dtype
        rm, rv = torch.zeros(c, dtype=dt), torch.ones(c, dtype=dt)
        batch = tr or not cfg["track"]
        return {"output": F.batch_norm(a["input"], None if batch else rm, None if batch else rv,
                                       _named(a, "weight") if aff else None,
                                       _named(a, "bias") if aff else None, batch, 0.0, eps)}
    return Case(lambda: block(c, eps, mom, aff, cfg["track"]), {"input": x}, bn, training=tr)


def _group_norm(x: torch.Tensor, g: int, w: Any, b: Any, eps: float) -> torch.Tensor:
    """``torch.group_norm``; an empty input as its math (an empty sum is 0): torch's kernel
    gives the weight a NaN gradient there."""
    if x.numel() or w is None:
        return torch.group_norm(x, g, w, b, eps)
    per_channel = (-1,) + (1,) * (x.ndim - 2)
    return x * w.reshape(per_channel) + b.reshape(per_channel)


def _named(a: dict, suffix: str) -> torch.Tensor:
    """The block's parameter ``suffix`` ("weight", "bias") among the tensors by full name."""
    return next(v for k, v in a.items() if k.endswith(suffix) and k != "input")


def case_of(name: str) -> Case:
    cfg = json.loads(name)
    op = cfg["op"]
    if op in ACTIVATIONS:
        return _activation_case(cfg)
    if op in PAIR_LOSSES:
        return _pair_case(cfg)
    if op == "cross_entropy":
        return _ce_case(cfg)
    if op in MARGIN_LOSSES:  # (torch's margin, embedding and likelihood losses)
        return margin_case(cfg)
    if op == "nll_loss":
        return _nll_case(cfg)
    return _norm_case(cfg)


class _Cases(dict):
    """``CASES[name]``: the case a configuration's name describes (built on first use)."""

    def __missing__(self, name: str) -> Case:
        self[name] = case_of(name)
        return self[name]


CASES: dict[str, Case] = _Cases()


def norm_gain(name: str) -> float:
    """For a norm, max(1, |x|)·(1/σ)² over its groups: the factor by which rounding the
    mean (an ulp of |x|) moves the gradient, large at tiny variances (1/σ up to 1/√eps);
    torch's kernels and ours round differently, so the tolerance grows with it. 1 for the
    rest."""
    cfg = json.loads(name)
    if cfg["op"] not in NORMS:
        return 1.0
    x = _norm_input(cfg)
    if cfg["op"] in ("layer_norm", "rms_norm"):
        k = cfg.get("k") or 1
        rows = x.reshape(-1, math.prod(x.shape[-k:]))
    elif cfg["op"] == "group_norm":
        rows = x.reshape(x.shape[0] * cfg["groups"], -1)
    elif cfg["op"] == "instance_norm":
        rows = x.reshape(x.shape[0] * x.shape[1], -1)
    else:
        rows = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)
    if rows.size == 0:
        return 1.0
    var = (rows * rows).mean(1) if cfg["op"] == "rms_norm" else rows.var(1)
    eps = cfg["eps"] if cfg["eps"] is not None else np.finfo(np.float64).eps
    if cfg["op"] == "batch_norm" and cfg["track"] and not cfg["training"]:
        var = np.ones_like(var)
    return max(1.0, float(np.abs(x).max())) / float((var + eps).min())
