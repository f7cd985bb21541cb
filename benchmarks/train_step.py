"""Forward + backward of four networks, float32: Mithril's ``compiled.evaluate(params, inputs,
output_gradients={"output": g})`` against the same network written by hand in plain torch
(autograd), plain JAX (``jax.jit(jax.value_and_grad)``) and plain NumPy (hand-written backward).

Cases (``--case``):

* ``mlp``: MLP 784-512-512-10 (relu), batch 128;
* ``cnn8``: CNN on digits-sized images (N, 1, 8, 8), batch 128: [conv 3×3 (padding 1) → relu →
  max-pool 2] with 32 then 64 channels → flatten → linear 10;
* ``cnn32``: the same CNN on (N, 3, 32, 32) images, batch 128;
* ``transformer``: one pre-LayerNorm causal ``TransformerBlock`` (d=256, 4 heads, feed-forward
  1024, exact GELU) on (16, 128, 256).

Every variant gets the same parameters, inputs and output cotangent ``g`` and returns the
outputs and the parameter gradients (checked equal before timing). All are timed in one
process: each round visits the backends in turn and times Mithril and hand-written in
ABBA / BAAB order; the medians are reported with the ratio Mithril / hand-written, and the
ratio of the fastest samples (``min ratio``: on a machine shared with other work, whose noise
only ever adds time, the steadier of the two).

The hand-written NumPy is as fast as we could write it: the CNN keeps its activations
channels-last, convolves by im2col (``sliding_window_view``, matmuls), pools by strided
maxima of a reshape (its argmax mask takes every maximum: only the ReLU's zeros tie, and their
gradient is 0) and computes the input gradient as a convolution of the padded output gradient
with the flipped kernel (im2col again: faster in NumPy than scattering columns back); the transformer
saves its intermediates, masks the scores with ``copyto(where=)`` and runs the backward with
2-D matmuls; both work in place wherever a temporary can be reused (bias and residual adds,
ReLU, softmax, GELU and its derivative). Both hand-written CNN convolutions work through
the batch in cache-sized chunks of images (im2col rows built, multiplied and dropped while in
cache), as Mithril's do. It is plain NumPy; Mithril's NumPy backend also uses its core
dependency numba where NumPy's strided operations are slow (the convolution's im2col / col2im
and max pooling, :mod:`mithril.models.window_kernels`).

    python benchmarks/train_step.py [--case mlp cnn8 cnn32 transformer] [--rounds 8]
                                    [--backend numpy torch jax] [--torch-threads 1]
                                    [--clock wall|cpu]

``--clock cpu`` times the process's CPU time instead of the wall clock: on a machine other
jobs load, with one BLAS thread (``OPENBLAS_NUM_THREADS=1``) and ``--torch-threads 1``, the
steadier measure (time spent waiting for a core is not counted).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from numpy.lib.stride_tricks import sliding_window_view
from scipy.special import erf

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend

SETTLE_S = 0.2
BACKENDS = ("numpy", "torch", "jax")


def _vjp_loss(fn):
    """d/dp <fn(p, x), g> is the VJP of g: jit(value_and_grad) of it, with the output as aux."""
    def loss(p, x, g):
        out = fn(p, x)
        return jnp.vdot(out, g), out
    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def _torch_vjp(fn):
    def step(p, x, g):
        leaves = [t.detach().requires_grad_(True) for t in p]
        out = fn(leaves, x)
        return out.detach(), torch.autograd.grad(out, leaves, g)
    return step


# == MLP 784-512-512-10 =========================================================================
MLP_SIZES = [784, 512, 512, 10]


def mlp_model() -> ml.Model:
    model = ml.MLP(["relu", "relu", None], MLP_SIZES[1:])
    model.set_shapes(input=[None, MLP_SIZES[0]])
    return model


def mlp_numpy(p, x, g):
    w1, b1, w2, b2, w3, b3 = p
    h1 = np.maximum(x @ w1.T + b1, 0)
    h2 = np.maximum(h1 @ w2.T + b2, 0)
    out = h2 @ w3.T + b3
    gw3, gb3 = g.T @ h2, g.sum(0)
    d2 = (g @ w3) * (h2 > 0)
    gw2, gb2 = d2.T @ h1, d2.sum(0)
    d1 = (d2 @ w2) * (h1 > 0)
    gw1, gb1 = d1.T @ x, d1.sum(0)
    return out, (gw1, gb1, gw2, gb2, gw3, gb3)


def mlp_forward(relu):
    def fwd(p, x):
        w1, b1, w2, b2, w3, b3 = p
        h = relu(x @ w1.T + b1)
        h = relu(h @ w2.T + b2)
        return h @ w3.T + b3
    return fwd


# == CNN: [conv 3×3 pad 1 → relu → max-pool 2] × (32, 64) → flatten → linear 10 ================
CNN_CHANNELS = (32, 64)


def cnn_model() -> ml.Model:
    model = ml.Model()
    prev = "input"
    for i, c in enumerate(CNN_CHANNELS):
        model |= ml.Convolution2D(3, c, padding=1)(input=prev, output=ml.IOKey(f"c{i}", expose=False))
        model |= ml.Relu()(input=f"c{i}", output=ml.IOKey(f"r{i}", expose=False))
        model |= ml.MaxPool2D(2)(input=f"r{i}", output=ml.IOKey(f"p{i}", expose=False))
        prev = f"p{i}"
    model |= ml.Flatten()(input=prev, output=ml.IOKey("flat", expose=False))
    model |= ml.Linear(10)(input="flat", output="output")
    return model


#: the hand-written convolution works through the batch in chunks of about this many bytes of
#: im2col rows (built, multiplied and dropped while in cache), as Mithril's NumPy backend does
CHUNK = 1 << 21


def _chunks(n: int, image_bytes: int) -> list[tuple[int, int]]:
    per = max(1, CHUNK // image_bytes)
    per = -(-n // -(-n // per))  # as many chunks, of even sizes
    return [(s, min(n, s + per)) for s in range(0, n, per)]


def _windows3(x):
    """The 3×3 windows (padding 1) of channels-last x (N, H, W, C): a (N, H, W, 3, 3, C) view of
    its zero-padded copy."""
    n, h, wd, c = x.shape
    xp = np.zeros((n, h + 2, wd + 2, c), dtype=x.dtype)
    xp[:, 1:-1, 1:-1] = x
    return sliding_window_view(xp, (3, 3), axis=(1, 2)).transpose(0, 1, 2, 4, 5, 3)


def _im2col_matmul(win, wk, out=None, gw=None, gy=None):
    """Chunk by chunk of images: the im2col rows of ``win`` (N, H, W, 3, 3, C) times ``wk.T``
    into ``out`` (N·H·W, O), or (``gy`` given) ``gy.T`` times them summed into ``gw``."""
    n, h, wd, _, _, c = win.shape
    p = h * wd
    buf = None
    for s, e in _chunks(n, p * 9 * c * win.itemsize):
        if buf is None:
            buf = np.empty(((e - s) * p, 9 * c), dtype=win.dtype)
        cols = buf[:(e - s) * p]
        np.copyto(cols.reshape(e - s, h, wd, 3, 3, c), win[s:e])
        if gy is None:
            np.matmul(cols, wk.T, out=out[s * p:e * p])
        elif s == 0:
            gw[...] = gy[:e * p].T @ cols
        else:
            gw += gy[s * p:e * p].T @ cols


def _np_conv3(x, w, b):
    """3×3 convolution, padding 1, channels-last: x (N, H, W, C), w (O, C, 3, 3) -> (N·H·W, O),
    the windows (for the weight gradient) and the weight as (O, 9·C), columns (kh, kw, c)."""
    n, h, wd, c = x.shape
    win = _windows3(x)
    wk = w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1)           # (O, 9·C) in (kh, kw, c)
    y = np.empty((n * h * wd, w.shape[0]), dtype=x.dtype)
    _im2col_matmul(win, wk, out=y)
    y += b
    return y, win, wk


def _np_pool2(y):
    """2×2 max-pool of (N, H, W, C): the pooled (N, H/2, W/2, C) and the argmax mask (every
    maximum of a window: ties only happen where the ReLU gave zeros, whose gradient is 0)."""
    n, h, w, c = y.shape
    r = y.reshape(n, h // 2, 2, w // 2, 2, c)
    m = np.maximum(r[:, :, 0, :, 0], r[:, :, 0, :, 1])             # strided maxima: faster
    np.maximum(m, r[:, :, 1, :, 0], out=m)                          # than r.max(axis=(2, 4))
    np.maximum(m, r[:, :, 1, :, 1], out=m)
    return m, r == m[:, :, None, :, None, :]


def cnn_numpy(p, x, g):
    """The CNN by hand: channels-last activations, im2col convolutions."""
    (w0, b0, w1, b1, wl, bl) = p
    n = x.shape[0]
    a = x.transpose(0, 2, 3, 1)                                     # NHWC
    saved = []
    for w, b in ((w0, b0), (w1, b1)):
        _, h, wd, _ = a.shape
        y, win, wk = _np_conv3(a, w, b)
        y = np.maximum(y, 0, out=y).reshape(n, h, wd, -1)
        pooled, mask = _np_pool2(y)
        saved.append((a.shape, win, wk, y, mask))
        a = pooled
    flat = a.transpose(0, 3, 1, 2).reshape(n, -1)                   # flatten as NCHW
    out = flat @ wl.T + bl
    gwl, gbl = g.T @ flat, g.sum(0)
    ga = (g @ wl).reshape(n, a.shape[3], a.shape[1], a.shape[2]).transpose(0, 2, 3, 1)
    grads: list[Any] = []
    for i in (1, 0):
        shape, win, wk, y, mask = saved[i]
        nn_, h, wd, c = shape
        gy = (mask * ga[:, :, None, :, None, :]).reshape(y.shape)
        gy *= y > 0
        o = gy.shape[-1]
        gy = gy.reshape(-1, o)                                      # (N·H·W, O)
        gw = np.empty((o, 9 * c), dtype=gy.dtype)
        _im2col_matmul(win, wk, gw=gw, gy=gy)
        grads[:0] = [gw.reshape(-1, 3, 3, c).transpose(0, 3, 1, 2), gy.sum(0)]
        if i:  # a convolution of the padded gy with the flipped kernel (im2col, matmuls):
            # faster in NumPy than scattering gy @ wk back offset by offset
            wf = wk.reshape(o, 3, 3, c)[:, ::-1, ::-1].transpose(1, 2, 0, 3).reshape(9 * o, c)
            ga = np.empty((nn_ * h * wd, c), dtype=gy.dtype)
            _im2col_matmul(_windows3(gy.reshape(nn_, h, wd, o)), wf.T, out=ga)
            ga = ga.reshape(nn_, h, wd, c)
    return out, (*grads, gwl, gbl)


def cnn_torch_fwd(p, x):
    w0, b0, w1, b1, wl, bl = p
    h = F.max_pool2d(F.relu(F.conv2d(x, w0, b0, padding=1)), 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, w1, b1, padding=1)), 2)
    return F.linear(h.flatten(1), wl, bl)


def cnn_jax_fwd(p, x):
    w0, b0, w1, b1, wl, bl = p

    def block(h, w, b):
        y = jax.lax.conv_general_dilated(h, w, (1, 1), ((1, 1), (1, 1)),
                                         dimension_numbers=("NCHW", "OIHW", "NCHW"))
        y = jax.nn.relu(y + b[:, None, None])
        return jax.lax.reduce_window(y, -jnp.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")

    h = block(block(x, w0, b0), w1, b1)
    return h.reshape(h.shape[0], -1) @ wl.T + bl


# == Transformer block: pre-LN, causal, d 256, 4 heads, feed-forward 1024, exact GELU ==========
D, HEADS, FF, SEQ, TBATCH, EPS = 256, 4, 1024, 128, 16, 1e-5


def transformer_model() -> ml.Model:
    model = ml.Model()
    model |= ml.TransformerBlock(D, HEADS, FF, activation="gelu", is_causal=True)(
        input="input", output="output")
    return model


def _np_ln(x, w, b):
    xc = x - x.mean(-1, keepdims=True)
    rstd = 1.0 / np.sqrt((xc * xc).mean(-1, keepdims=True) + EPS)
    xhat = xc * rstd
    y = xhat * w
    y += b
    return y, xhat, rstd


def _np_ln_back(gy, xhat, rstd, w):
    gw = (gy * xhat).reshape(-1, xhat.shape[-1]).sum(0)
    gb = gy.reshape(-1, gy.shape[-1]).sum(0)
    gx = gy * w
    gx = (gx - gx.mean(-1, keepdims=True) - xhat * (gx * xhat).mean(-1, keepdims=True)) * rstd
    return gx, gw, gb


def _np_linear(x, w, b):
    y = x @ w.T
    y += b
    return y


def transformer_numpy(p, x, g):
    """The block by hand, forward saving its intermediates, backward with 2-D matmuls (in
    place wherever a temporary can be reused)."""
    ln1w, ln1b, wi, bi, wo, bo, ln2w, ln2b, w1, b1, w2, b2 = p
    bsz, seq, d = x.shape
    dh, scale = d // HEADS, 1.0 / math.sqrt(d // HEADS)
    rows = bsz * seq
    n1, xh1, rs1 = _np_ln(x, ln1w, ln1b)
    n1f = n1.reshape(rows, d)
    qkv = _np_linear(n1f, wi, bi).reshape(bsz, seq, 3, HEADS, dh).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]                                 # (B, H, L, dh)
    s = q @ k.swapaxes(-1, -2)
    s *= scale
    np.copyto(s, -np.inf, where=~np.tril(np.ones((seq, seq), dtype=bool)))
    s -= s.max(-1, keepdims=True)
    pr = np.exp(s, out=s)
    pr /= pr.sum(-1, keepdims=True)
    att = (pr @ v).transpose(0, 2, 1, 3).reshape(rows, d)
    r = _np_linear(att, wo, bo).reshape(x.shape)
    r += x
    n2, xh2, rs2 = _np_ln(r, ln2w, ln2b)
    n2f = n2.reshape(rows, d)
    hpre = _np_linear(n2f, w1, b1)
    cdf = erf(hpre * (1 / math.sqrt(2)))
    cdf += 1
    cdf *= 0.5
    hact = hpre * cdf
    out = _np_linear(hact, w2, b2).reshape(x.shape)
    out += r
    # backward
    gf = g.reshape(rows, d)
    gw2, gb2 = gf.T @ hact, gf.sum(0)
    gh = hpre * hpre                                                 # GELU': Φ + x·φ(x)
    gh *= -0.5
    np.exp(gh, out=gh)
    gh *= hpre
    gh *= 1 / math.sqrt(2 * math.pi)
    gh += cdf
    gh *= gf @ w2
    gw1, gb1 = gh.T @ n2f, gh.sum(0)
    gn2 = (gh @ w1).reshape(x.shape)
    gr, gln2w, gln2b = _np_ln_back(gn2, xh2, rs2, ln2w)
    gr += g
    gr = gr.reshape(rows, d)
    gwo, gbo = gr.T @ att, gr.sum(0)
    ga = (gr @ wo).reshape(bsz, seq, HEADS, dh).transpose(0, 2, 1, 3)
    gqkv = np.empty((bsz, seq, 3, HEADS, dh), dtype=x.dtype)        # q, k, v cotangents
    gqkv[:, :, 2] = (pr.swapaxes(-1, -2) @ ga).transpose(0, 2, 1, 3)
    gs = ga @ v.swapaxes(-1, -2)
    gs -= (gs * pr).sum(-1, keepdims=True)
    gs *= pr
    gs *= scale
    gqkv[:, :, 0] = (gs @ k).transpose(0, 2, 1, 3)
    gqkv[:, :, 1] = (gs.swapaxes(-1, -2) @ q).transpose(0, 2, 1, 3)
    gqkv = gqkv.reshape(rows, 3 * d)
    gwi, gbi = gqkv.T @ n1f, gqkv.sum(0)
    gn1 = (gqkv @ wi).reshape(x.shape)
    gln1w = (gn1 * xh1).reshape(rows, d).sum(0)
    gln1b = gn1.reshape(rows, d).sum(0)
    return out, (gln1w, gln1b, gwi, gbi, gwo, gbo, gln2w, gln2b, gw1, gb1, gw2, gb2)


def transformer_torch_fwd(p, x):
    ln1w, ln1b, wi, bi, wo, bo, ln2w, ln2b, w1, b1, w2, b2 = p
    bsz, seq, d = x.shape
    h = F.layer_norm(x, (d,), ln1w, ln1b, EPS)
    q, k, v = F.linear(h, wi, bi).view(bsz, seq, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    r = x + F.linear(a.transpose(1, 2).reshape(bsz, seq, d), wo, bo)
    h = F.gelu(F.linear(F.layer_norm(r, (d,), ln2w, ln2b, EPS), w1, b1))
    return r + F.linear(h, w2, b2)


def _jax_ln(x, w, b):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + EPS) * w + b


def transformer_jax_fwd(p, x):
    ln1w, ln1b, wi, bi, wo, bo, ln2w, ln2b, w1, b1, w2, b2 = p
    bsz, seq, d = x.shape
    h = _jax_ln(x, ln1w, ln1b)
    qkv = (h @ wi.T + bi).reshape(bsz, seq, 3, HEADS, d // HEADS).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    s = (q @ k.swapaxes(-1, -2)) / math.sqrt(d // HEADS)
    s = jnp.where(jnp.tril(jnp.ones((seq, seq), dtype=bool)), s, -jnp.inf)
    a = (jax.nn.softmax(s, axis=-1) @ v).transpose(0, 2, 1, 3).reshape(bsz, seq, d)
    r = x + a @ wo.T + bo
    h = jax.nn.gelu(_jax_ln(r, ln2w, ln2b) @ w1.T + b1, approximate=False)
    return r + h @ w2.T + b2


# == the cases =================================================================================
@dataclass
class Case:
    title: str
    model: Callable[[], ml.Model]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    hand: dict[str, Callable]
    calls: int  # calls per timing sample


CASES = {
    "mlp": Case(f"MLP {'-'.join(map(str, MLP_SIZES))} relu, batch 128", mlp_model,
                (128, MLP_SIZES[0]), (128, MLP_SIZES[-1]),
                {"numpy": mlp_numpy, "torch": _torch_vjp(mlp_forward(torch.relu)),
                 "jax": _vjp_loss(mlp_forward(jax.nn.relu))}, 5),
    "cnn8": Case("CNN [conv3x3 32, relu, pool2, conv3x3 64, relu, pool2, linear 10], "
                 "input (128, 1, 8, 8)", cnn_model, (128, 1, 8, 8), (128, 10),
                 {"numpy": cnn_numpy, "torch": _torch_vjp(cnn_torch_fwd),
                  "jax": _vjp_loss(cnn_jax_fwd)}, 3),
    "cnn32": Case("the same CNN, input (128, 3, 32, 32)", cnn_model, (128, 3, 32, 32), (128, 10),
                  {"numpy": cnn_numpy, "torch": _torch_vjp(cnn_torch_fwd),
                   "jax": _vjp_loss(cnn_jax_fwd)}, 1),
    "transformer": Case(f"TransformerBlock pre-LN causal d {D}, {HEADS} heads, ff {FF}, gelu, "
                        f"input ({TBATCH}, {SEQ}, {D})", transformer_model, (TBATCH, SEQ, D),
                        (TBATCH, SEQ, D),
                        {"numpy": transformer_numpy, "torch": _torch_vjp(transformer_torch_fwd),
                         "jax": _vjp_loss(transformer_jax_fwd)}, 1),
}


def make_backend(label: str):
    return {"numpy": NumpyBackend, "torch": TorchBackend, "jax": JaxBackend}[label]()


def variants(case: Case, labels) -> dict[str, Callable]:
    """"numpy/mithril", "numpy/hand", ... -> a zero-argument step returning arrays to block on."""
    out = {}
    for label in labels:
        backend = make_backend(label)
        backend.set_seed(0)
        compiled = ml.compile(case.model(), backend, shapes={"input": list(case.input_shape)})
        params = compiled.get_parameters()
        x = backend.randn(*case.input_shape)
        g = backend.randn(*case.output_shape)
        inputs, cots = {"input": x}, {"output": g}
        ordered = tuple(params.values())

        def mithril(c=compiled, p=params, i=inputs, o=cots):
            return c.evaluate(p, i, output_gradients=o)

        def reference(h=case.hand[label], p=ordered, x=x, g=g):
            return h(p, x, g)

        # sanity: both compute the same output and gradients
        (gout, got), (want_out, want) = mithril(), reference()
        if label == "jax":
            want_out = want_out[1]  # ((value, out), grads)
        pairs = [(gout["output"], want_out), *zip((got[n] for n in params), want, strict=True)]
        for name, (a, b) in zip(["output", *params], pairs):
            a, b = backend.to_numpy(a), backend.to_numpy(b)
            assert a.shape == b.shape, (label, name, a.shape, b.shape)
            np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3 * np.abs(b).max(),
                                       err_msg=f"{label}: {name}")
        out[f"{label}/mithril"], out[f"{label}/hand"] = mithril, reference
    return out


def block(result):
    jax.block_until_ready(jax.tree_util.tree_leaves(result))


def bench(case: Case, labels, rounds: int, calls: int | None,
          clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    runs = variants(case, labels)
    calls = calls or case.calls
    for fn in runs.values():  # warm-up (JAX compiles here)
        for _ in range(3):
            block(fn())

    def sample(fn) -> float:
        for _ in range(2):  # untimed: let the previous library's thread pool settle
            block(fn())
        t0 = clock()
        for _ in range(calls):
            block(fn())
        return (clock() - t0) / calls * 1e3

    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(rounds):
        for label in labels:
            # The previous library's worker threads keep spinning for a while after its
            # last call (OpenBLAS ~0.1 s) and would slow whichever variant runs first.
            time.sleep(SETTLE_S)
            a, b = f"{label}/mithril", f"{label}/hand"
            if r % 2:
                a, b = b, a
            for name in (a, b, b, a):  # ABBA, then BAAB: both sides see the same conditions
                times[name].append(sample(runs[name]))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", nargs="+", choices=list(CASES), default=list(CASES))
    ap.add_argument("--backend", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    ap.add_argument("--rounds", type=int, default=8, help="interleaved rounds")
    ap.add_argument("--calls", type=int, default=None,
                    help="calls per timing sample (default: per case, 1-5)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall clock (default) or process CPU time (steadier on a loaded "
                         "machine with one BLAS / torch thread)")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's); 1 is steadier on a loaded "
                         "machine")
    args = ap.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    print(f"float32, forward+backward, median of {2 * args.rounds} samples ({args.clock} "
          f"clock); torch threads {torch.get_num_threads()}, OPENBLAS_NUM_THREADS="
          f"{os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}")
    print(f"{'case':12} {'backend':8} {'mithril ms':>11} {'hand ms':>9} {'ratio':>7} "
          f"{'min ratio':>10}")
    for name in args.case:
        case = CASES[name]
        times = bench(case, args.backend, args.rounds, args.calls,
                      time.process_time if args.clock == "cpu" else time.perf_counter)
        for label in args.backend:
            mt, ht = times[f"{label}/mithril"], times[f"{label}/hand"]
            m, h = statistics.median(mt), statistics.median(ht)
            print(f"{name:12} {label:8} {m:11.3f} {h:9.3f} {m / h:7.3f} {min(mt) / min(ht):10.3f}",
                  flush=True)
    print("cases: " + "; ".join(f"{k}: {CASES[k].title}" for k in args.case))


if __name__ == "__main__":
    main()
