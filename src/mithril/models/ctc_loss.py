"""``CTCLoss``, as ``torch.nn.CTCLoss`` / ``F.ctc_loss``: the connectionist temporal
classification loss of per-step log-probabilities against unaligned label sequences.

For one sequence with T steps and target l (length S), the extended labels l' (length 2S + 1)
put the blank before, between and after the labels. The forward variables

    α_t(s) = logsumexp(α_{t−1}(s), α_{t−1}(s − 1), [α_{t−1}(s − 2) if l'_s ≠ l'_{s−2}])
             + log_probs[t, l'_s]

start from α_0 = (log_probs[0, blank], log_probs[0, l_1], −inf, ...), and the loss is
−logsumexp(α_{T−1}(2S), α_{T−1}(2S − 1)): −log of the total probability of the alignments.
The backward variables β run the same recursion from the end. Everything is in log space
and vectorised over the batch (one loop over time: ``jax.lax.scan`` on JAX); torch runs
``F.ctc_loss``.

The gradient is torch's, which is *not* the derivative with respect to ``log_probs`` alone:
torch's kernel returns exp(log_probs) − exp(log Σ_{s: l'_s = c} α_t(s)·β_t(s) + nll −
log_probs[t, c]) for t below the input length (0 past it), the gradient with respect to the
logits when ``log_probs = log_softmax(logits)`` (the two agree through a log-softmax: its
VJP removes the exp(log_probs) term). NumPy's VJP and JAX's (a ``jax.custom_vjp``) return
that same expression, so every backend trains as torch does.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import InputValueError, ShapeError
from .half_precision import float32_forward, float32_vjp
from .operator import Operator, Shape, backend_of, fmt, functional_of
from .pointwise_losses import check_reduction

_NEG = -np.inf


def _lse(xp: Any, *xs: Any) -> Any:
    """log Σ exp(x) of same-shape arrays, shifted by their max (0 where all are −inf, as torch's
    kernel: the result is then −inf, never NaN)."""
    m = xs[0]
    for x in xs[1:]:
        m = xp.maximum(m, x)
    m = xp.where(m == _NEG, 0.0, m)
    return xp.log(sum(xp.exp(x - m) for x in xs)) + m


def _shift(xp: Any, a: Any, k: int) -> Any:
    """``a`` moved k states right along its last axis, −inf coming in (all of them when k is
    past its length: one state, an empty target)."""
    k = min(k, a.shape[-1])
    return xp.concatenate([xp.full((*a.shape[:-1], k), _NEG, dtype=a.dtype),
                           a[..., :a.shape[-1] - k]], -1)


def _scan(xp: Any, step: Any, init: Any, xs: tuple, reverse: bool = False) -> tuple[Any, Any]:
    """``(last carry, stacked outputs)`` of ``carry, out = step(carry, x)`` over the leading
    axis of ``xs``: ``jax.lax.scan`` on JAX (one traced step), a loop elsewhere."""
    if backend_of(xp) == "jax":
        import jax

        return jax.lax.scan(step, init, xs, reverse=reverse)
    n, outs, c = len(xs[0]), [], init
    for t in (range(n - 1, -1, -1) if reverse else range(n)):
        c, o = step(c, tuple(x[t] for x in xs))
        outs.append(o)
    return c, xp.stack(outs[::-1] if reverse else outs)


def _labels(xp: Any, targets: Any, tl: Any, blank: int, n: int) -> Any:
    """The extended labels (N, 2S + 1) of padded (N, S) or concatenated (Σ,) targets: the
    blank at even states and past each target's end; a concatenated target is gathered at its
    offset, S being the total length (JAX needs a static bound)."""
    if targets.ndim == 1:  # concatenated
        size = targets.shape[0]
        off = xp.cumsum(tl) - tl
        pos = xp.arange(size)[None, :]
        targets = targets[xp.minimum(off[:, None] + pos, max(size - 1, 0))] if size else \
            xp.zeros((n, 0), dtype=targets.dtype)
    s = targets.shape[1]
    inside = xp.arange(s)[None, :] < tl[:, None]
    lab = xp.where(inside, targets, blank)
    full = xp.full((n, 2 * s + 1), blank, dtype=lab.dtype)
    if backend_of(xp) == "jax":
        return full.at[:, 1::2].set(lab)
    full[:, 1::2] = lab
    return full


def _alphas(xp: Any, lp: Any, lab: Any, il: Any, tl: Any) -> tuple[Any, Any, Any]:
    """``(nll (N,), α (T, N, L), emissions (T, N, L))``; α frozen past each input length."""
    T, n = lp.shape[0], lab.shape[0]
    lpl = xp.take_along_axis(lp, xp.broadcast_to(lab[None], (T, *lab.shape)), axis=2)
    skip = xp.concatenate([xp.zeros((n, min(2, lab.shape[1])), dtype=bool),
                           lab[:, 2:] != lab[:, :-2]], 1)
    # α_{−1}: probability 1 in a virtual state before state 0 (gives torch's α_0)
    init = xp.where(xp.arange(lab.shape[1]) == 0, 0.0, _NEG) + xp.zeros(lab.shape, lp.dtype)

    def step(a: Any, x: tuple) -> tuple[Any, Any]:
        e, t = x
        new = _lse(xp, a, _shift(xp, a, 1), xp.where(skip, _shift(xp, a, 2), _NEG)) + e
        a = xp.where((t < il)[:, None], new, a)
        return a, a

    last, alphas = _scan(xp, step, init, (lpl, xp.arange(T)))
    end = xp.take_along_axis(last, (2 * tl)[:, None], 1)[:, 0]
    before = xp.take_along_axis(last, xp.maximum(2 * tl - 1, 0)[:, None], 1)[:, 0]
    return -_lse(xp, end, xp.where(tl > 0, before, _NEG)), alphas, lpl


def _grad(xp: Any, lp: Any, lab: Any, il: Any, tl: Any, nll: Any, alphas: Any, lpl: Any,
          gn: Any, zero_infinity: bool) -> Any:
    """torch's CTC gradient (see the module docstring) times the per-sequence cotangent ``gn``."""
    T, (n, L), C = lp.shape[0], lab.shape, lp.shape[2]
    skip = xp.concatenate([lab[:, 2:] != lab[:, :-2], xp.zeros((n, min(2, L)), dtype=bool)], 1)
    # β_{il}: probability 1 in a virtual state after state 2S (gives torch's β_{il−1})
    virtual = xp.where(xp.arange(L)[None, :] == 2 * tl[:, None], 0.0, _NEG) + \
        xp.zeros(lab.shape, lp.dtype)

    def step(b: Any, x: tuple) -> tuple[Any, Any]:
        e, t = x
        up = lambda k: xp.concatenate([b[:, k:], xp.full((n, min(k, L)), _NEG, dtype=b.dtype)], 1)  # noqa: E731
        new = _lse(xp, b, up(1), xp.where(skip, up(2), _NEG)) + e
        live = (t < il)[:, None]
        return xp.where(live, new, virtual), xp.where(live, new, _NEG)

    _, betas = _scan(xp, step, virtual, (lpl, xp.arange(T)), reverse=True)
    ab = alphas + betas
    m = xp.max(ab, axis=2, keepdims=True)
    m = xp.where(m == _NEG, 0.0, m)
    onehot = (lab[:, :, None] == xp.arange(C)[None, None, :]).astype(lp.dtype)
    lcab = xp.log(xp.einsum("tnl,nlc->tnc", xp.exp(ab - m), onehot)) + m
    g = xp.exp(lp) - xp.exp(lcab + nll[None, :, None] - lp)
    keep = xp.arange(T)[:, None] < il[None, :]
    if zero_infinity:
        keep = keep & ~xp.isinf(nll)[None, :]
    return xp.where(keep[:, :, None], g * gn[None, :, None], 0.0)


@functools.lru_cache(maxsize=2)
def _jax_nll(zero_infinity: bool) -> Any:
    """The per-sequence nll with torch's gradient, as a ``jax.custom_vjp``."""
    import jax
    import jax.numpy as jnp

    @jax.custom_vjp
    def nll(lp: Any, lab: Any, il: Any, tl: Any) -> Any:
        return _alphas(jnp, lp, lab, il, tl)[0]

    def fwd(lp: Any, lab: Any, il: Any, tl: Any) -> tuple[Any, Any]:
        out, alphas, lpl = _alphas(jnp, lp, lab, il, tl)
        return out, (lp, lab, il, tl, out, alphas, lpl)

    def bwd(res: tuple, g: Any) -> tuple:
        return _grad(jnp, *res, g, zero_infinity), None, None, None

    nll.defvjp(fwd, bwd)
    return nll


class CTCLoss(Operator):
    """The CTC loss of torch's ``nn.CTCLoss(blank=0, reduction="mean", zero_infinity=False)``
    (the math: the module docstring).

    Inputs: ``log_probs`` (T, N, C), or (T, C) for one unbatched sequence: log-probabilities
    per step (any values: torch does not check them; usually a log-softmax over C);
    ``targets`` padded (N, S) (entries past a target's length are ignored, any value) or
    concatenated (Σ target_lengths,) when batched, (S,) unbatched: class indices in [0, C)
    (the blank as a target is computed as torch computes it, but means nothing);
    ``input_lengths`` and ``target_lengths`` (N,), or 0-d unbatched: each sequence's steps
    (≤ T; steps past it are ignored and get gradient 0) and target length (≤ S padded; their
    sum = Σ concatenated).

    Per sequence, nll = −log p(target | log_probs): inf where no alignment fits (a target
    too long for its steps: 2 steps per repeated label pair included). ``zero_infinity``
    makes those 0, with gradient 0. ``reduction``: "mean" is torch's, the mean over the
    batch of nll / max(target_length, 1); "sum"; "none": (N,) (or () unbatched). Only
    ``log_probs`` is differentiable; its gradient is torch's (module docstring). Lengths and
    indices out of range are an ``InputValueError`` naming the data key, checked before a
    run."""

    inputs = ("log_probs", "targets", "input_lengths", "target_lengths")
    int_inputs = value_checked_inputs = frozenset(inputs[1:])

    def __init__(self, blank: int = 0, reduction: str = "mean", zero_infinity: bool = False) -> None:
        if isinstance(blank, bool) or not isinstance(blank, (int, np.integer)) or blank < 0:
            raise ValueError(f"CTCLoss: blank must be an int >= 0, got {blank!r}")
        if not isinstance(zero_infinity, (bool, np.bool_)):
            raise ValueError(f"CTCLoss: zero_infinity must be a bool, got {zero_infinity!r}")
        self.blank, self.zero_infinity = int(blank), bool(zero_infinity)
        self.reduction = check_reduction("CTCLoss", reduction)

    def infer_shape(self, shapes):
        s, t = shapes.get("log_probs"), shapes.get("targets")
        il, tl = shapes.get("input_lengths"), shapes.get("target_lengths")
        if s is not None and len(s) not in (2, 3):
            raise ShapeError(f"CTCLoss: 'log_probs' must be (T, N, C) or (T, C) unbatched, got "
                             f"{fmt(s)}")
        if s is not None and 0 in s:  # (torch: "log_probs tensor must not be empty")
            raise ShapeError(f"CTCLoss: 'log_probs' must not be empty (as torch), got {fmt(s)}")
        if s is not None and s[-1] is not None and s[-1] <= self.blank:
            raise ShapeError(f"CTCLoss: blank={self.blank} is not a class of 'log_probs' "
                             f"{fmt(s)} (C = {s[-1]})")
        batched = s is None or len(s) == 3
        n = s[1] if s is not None and batched else None
        if t is not None and s is not None and (len(t) != 1 if not batched else len(t) not in (1, 2)):
            raise ShapeError("CTCLoss: 'targets' must be " + (
                "(N, S) padded or (sum of target_lengths,) concatenated" if batched else
                "(S,) for unbatched 'log_probs'") + f", got {fmt(t)} for 'log_probs' {fmt(s)}")
        if t is not None and batched and len(t) == 2 and None not in (n, t[0]) and t[0] != n:
            raise ShapeError(f"CTCLoss: padded 'targets' {fmt(t)} must have N = {n} rows "
                             f"('log_probs' {fmt(s)})")
        for key, ls in (("input_lengths", il), ("target_lengths", tl)):
            want = (n,) if batched else ()
            if ls is not None and s is not None and (
                    len(ls) != len(want) or batched and None not in (n, ls[0]) and ls[0] != n):
                raise ShapeError(f"CTCLoss: '{key}' must have shape {fmt(want)} (one length "
                                 f"per sequence of 'log_probs' {fmt(s)}), got {fmt(ls)}")
        if s is None:
            return None
        return (n,) if self.reduction == "none" and batched else ()

    def check_inputs(self, shapes: Mapping[str, Shape | None], dtypes: Mapping[str, str],
                     arrays: Mapping[str, Any], names: Mapping[str, str]) -> None:
        """torch's checks, naming the data key: 0 ≤ input length ≤ T, 0 ≤ target length ≤ S
        (padded) or their sum = Σ (concatenated), labels within each target in [0, C)."""
        s, t = shapes.get("log_probs"), shapes.get("targets")
        get = lambda k: None if arrays.get(k) is None else np.asarray(  # noqa: E731
            arrays[k].cpu() if hasattr(arrays[k], "cpu") else arrays[k]).astype(np.int64)
        il, tl, tg = get("input_lengths"), get("target_lengths"), get("targets")

        def bad(key: str, msg: str) -> None:
            raise InputValueError(f"CTCLoss: {key} '{names.get(key, key)}' {msg}")

        if il is not None and s is not None and il.size and (il.min() < 0 or il.max() > s[0]):
            v = il.min() if il.min() < 0 else il.max()
            bad("input_lengths", f"holds {v}: input lengths must be in [0, T = {s[0]}] "
                f"('log_probs' {fmt(s)})")
        if tl is not None and tl.size and tl.min() < 0:
            bad("target_lengths", f"holds {tl.min()}: target lengths must be >= 0")
        if tl is None or t is None:
            return
        tl = tl.reshape(-1)
        if len(t) == 2 or s is not None and len(s) == 2:  # padded
            if tl.size and tl.max() > t[-1]:
                bad("target_lengths", f"holds {tl.max()}, longer than the padded 'targets' "
                    f"{fmt(t)} (S = {t[-1]})")
            rows = None if tg is None else tg.reshape(tl.size, tg.shape[-1])  # (S may be 0)
            inside = None if tg is None else np.arange(t[-1])[None] < tl[:, None]
        else:
            if t[0] is not None and tl.sum() != t[0]:
                bad("target_lengths", f"sums to {tl.sum()}, but the concatenated 'targets' have "
                    f"{t[0]} labels")
            rows, inside = tg, None
        if rows is None or s is None or not rows.size:
            return
        vals = rows if inside is None else rows[inside]
        if vals.size and (vals.min() < 0 or vals.max() >= s[-1]):
            bad("targets", f"holds class index {vals.min() if vals.min() < 0 else vals.max()} "
                f"within a target: indices must be in [0, {s[-1] - 1}] (C = {s[-1]})")

    def _batched(self, xp: Any, log_probs: Any, targets: Any, il: Any, tl: Any) -> tuple:
        if log_probs.ndim == 2:
            return log_probs[:, None], targets[None], il.reshape(1), tl.reshape(1)
        return log_probs, targets, il.reshape(-1), tl.reshape(-1)

    def _reduce(self, xp: Any, nll: Any, tl: Any, unbatched: bool) -> Any:
        if self.zero_infinity:
            nll = xp.where(xp.isinf(nll), 0.0, nll)
        if self.reduction == "none":
            return nll[0] if unbatched else nll
        if self.reduction == "sum":
            return nll.sum()
        return (nll / xp.maximum(tl, 1).astype(nll.dtype)).mean()

    @float32_forward(on_torch=True)  # (the recursions: torch.autocast's float32 op; torch
    # has no CPU half ctc_loss)
    def forward(self, xp: Any, log_probs: Any, targets: Any, input_lengths: Any,
                target_lengths: Any) -> Any:
        F = functional_of(xp)
        if F is not None:
            return F.ctc_loss(log_probs, targets.long(), input_lengths.long(),
                              target_lengths.long(), blank=self.blank,
                              reduction=self.reduction, zero_infinity=self.zero_infinity)
        lp, tg, il, tl = self._batched(xp, log_probs, targets, input_lengths, target_lengths)
        lab = _labels(xp, tg, tl, self.blank, lp.shape[1])
        if backend_of(xp) == "jax":
            nll = _jax_nll(self.zero_infinity)(lp, lab, il, tl)
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                nll = _alphas(xp, lp, lab, il, tl)[0]
        return self._reduce(xp, nll, tl, log_probs.ndim == 2)

    @float32_vjp
    def vjp(self, g, out, args, wrt):
        lp, tg, il, tl = self._batched(np, args["log_probs"], args["targets"],
                                       args["input_lengths"], args["target_lengths"])
        n = lp.shape[1]
        lab = _labels(np, tg, tl, self.blank, n)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            nll, alphas, lpl = _alphas(np, lp, lab, il, tl)
            gn = np.broadcast_to(np.asarray(g, lp.dtype).reshape(-1), (n,))
            if self.reduction == "mean":
                gn = gn / np.maximum(tl, 1) / n
            grad = _grad(np, lp, lab, il, tl, nll, alphas, lpl, gn, self.zero_infinity)
        return {"log_probs": grad.reshape(args["log_probs"].shape)}

    def __repr__(self) -> str:
        return (f"CTCLoss(blank={self.blank}, reduction={self.reduction!r}, "
                f"zero_infinity={self.zero_infinity})")
