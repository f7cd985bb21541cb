"""Adversarial review: three small networks a torch user would port, run side by side with
``torch.nn`` from the same weights, on NumPy, torch and JAX.

* a CNN: dilated and grouped strided convolutions without bias, two BatchNorm2d, ReLU and exact
  GELU, max pooling, an adaptive average pool with overlapping windows (3 -> 2), flatten,
  linear, cross-entropy with label smoothing and ``ignore_index=-100`` (a label of -100 in
  the batch);
* a language-model transformer: an embedding with ``padding_idx``, sinusoidal positions, a
  pre-norm and a post-norm ``TransformerBlock`` (GELU) under a causal mask and a key padding
  mask, a final LayerNorm and a per-token head, cross-entropy ignoring the padding targets
  with label smoothing, against two ``nn.TransformerEncoderLayer``;
* recurrent classifiers on padded variable-length batches: a 2-layer bidirectional LSTM with
  ``proj_size`` and a 2-layer bidirectional GRU, classifying from the final states of every
  layer and direction (``pack_padded_sequence`` on torch's side).

Checked: the forward pass and every parameter gradient (float64 to 1e-10, float32), the
BatchNorm running statistics, inference mode, several training steps of AdamW with a linear
warm-up then cosine schedule and gradient clipping (through ``make_train_step`` and through
``evaluate`` + ``update``) against ``torch.optim.AdamW`` + ``SequentialLR`` +
``clip_grad_norm_`` in float64 (1e-9), and bad input (an error naming the key, nothing
changed).
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, jax_float64
from test_networks_torch_parity import sinusoids  # (the torch tutorials' table)
from torch.nn.utils.rnn import pack_padded_sequence

import mithril as ml
from mithril.utils.lr_schedulers import CosineAnnealingLR, LinearLR, SequentialLR
from mithril.utils.optimizers import AdamW
from mithril.utils.training import make_train_step


def hidden(name: str) -> ml.IOKey:
    return ml.IOKey(name, expose=False)


# -- the CNN --------------------------------------------------------------------------------------
def cnn_mithril() -> ml.Model:
    m = ml.Model()
    m |= ml.Convolution2D(3, 4, padding=2, dilation=2, use_bias=False)(input="input",
                                                                       output=hidden("c0"))
    m |= ml.BatchNorm2D(4)(input="c0", output=hidden("b0"))
    m |= ml.Relu()(input="b0", output=hidden("r0"))
    m |= ml.MaxPool2D(2)(input="r0", output=hidden("p0"))
    m |= ml.Convolution2D(3, 8, stride=2, padding=1, groups=2, use_bias=False)(
        input="p0", output=hidden("c1"))
    m |= ml.BatchNorm2D(8)(input="c1", output=hidden("b1"))
    m |= ml.Gelu()(input="b1", output=hidden("g1"))
    m |= ml.AdaptiveAvgPool2D(2)(input="g1", output=hidden("a1"))
    m |= ml.Flatten()(input="a1", output=hidden("flat"))
    m |= ml.Linear(5)(input="flat", output="logits")
    m |= ml.CrossEntropy(axis=1, label_smoothing=0.1, ignore_index=-100)(
        input="logits", target="target", output="loss")
    return m


class CNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c0 = torch.nn.Conv2d(3, 4, 3, padding=2, dilation=2, bias=False)
        self.b0 = torch.nn.BatchNorm2d(4)
        self.c1 = torch.nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2, bias=False)
        self.b1 = torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Linear(32, 5)

    def forward(self, input, target):
        x = F.max_pool2d(torch.relu(self.b0(self.c0(input))), 2)
        x = F.adaptive_avg_pool2d(F.gelu(self.b1(self.c1(x))), 2)
        logits = self.head(x.flatten(1))
        return logits, F.cross_entropy(logits, target, label_smoothing=0.1, ignore_index=-100)


CNN_NAMES = {"convolution2_d_0.weight": "c0.weight", "batch_norm2_d_0.weight": "b0.weight",
             "batch_norm2_d_0.bias": "b0.bias", "convolution2_d_1.weight": "c1.weight",
             "batch_norm2_d_1.weight": "b1.weight", "batch_norm2_d_1.bias": "b1.bias",
             "linear.weight": "head.weight", "linear.bias": "head.bias"}
CNN_STATE = {"batch_norm2_d_0": "b0", "batch_norm2_d_1": "b1"}


def cnn_batch(rng, n: int) -> dict:
    target = rng.integers(0, 5, n)
    target[n // 2] = -100  # one ignored row
    return {"input": rng.standard_normal((n, 3, 10, 10)), "target": target}


# -- the transformer language model ----------------------------------------------------------------
V, L, D, HEADS, FF = 9, 6, 8, 2, 12


def transformer_mithril() -> ml.Model:
    m = ml.Model()
    m |= ml.Embedding(V, D, padding_idx=0)(input="tokens", output=hidden("emb"))
    m |= ml.PositionalEncoding(D)(input="emb", output=hidden("x0"))
    m |= ml.TransformerBlock(D, HEADS, FF, activation="gelu", is_causal=True,
                             use_key_padding_mask=True)(
        input="x0", key_padding_mask="pad", output=hidden("x1"))
    m |= ml.TransformerBlock(D, HEADS, FF, activation="gelu", is_causal=True,
                             use_key_padding_mask=True, norm_first=False)(
        input="x1", key_padding_mask="pad", output=hidden("x2"))
    m |= ml.LayerNorm()(input="x2", output=hidden("final"))
    m |= ml.Linear(V)(input="final", output="logits")
    m |= ml.CrossEntropy(ignore_index=0, label_smoothing=0.05)(
        input="logits", target="target", output="loss")
    return m


class LM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(V, D, padding_idx=0)
        kw = {"dropout": 0.0, "activation": "gelu", "batch_first": True}
        self.pre = torch.nn.TransformerEncoderLayer(D, HEADS, FF, norm_first=True, **kw)
        self.post = torch.nn.TransformerEncoderLayer(D, HEADS, FF, norm_first=False, **kw)
        self.norm = torch.nn.LayerNorm(D)
        self.head = torch.nn.Linear(D, V)

    def forward(self, tokens, pad, target):
        n = tokens.shape[1]
        x = self.emb(tokens) + torch.tensor(sinusoids(n, D), dtype=self.emb.weight.dtype)
        causal = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
        x = self.pre(x, src_mask=causal, src_key_padding_mask=pad)
        x = self.post(x, src_mask=causal, src_key_padding_mask=pad)
        logits = self.head(self.norm(x))
        return logits, F.cross_entropy(logits.reshape(-1, V), target.reshape(-1), ignore_index=0,
                                       label_smoothing=0.05)


def _layer_names(ours: str, theirs: str) -> dict[str, str]:
    mods = {"layer_norm_0": "norm1", "layer_norm_1": "norm2", "linear_0": "linear1",
            "linear_1": "linear2"}
    names = {f"{ours}.multi_head_attention.{k}": f"{theirs}.self_attn.{k}"
             for k in ("in_proj_weight", "in_proj_bias")}
    names.update({f"{ours}.multi_head_attention.out_proj_{p}": f"{theirs}.self_attn.out_proj.{p}"
                  for p in ("weight", "bias")})
    names.update({f"{ours}.{a}.{p}": f"{theirs}.{b}.{p}" for a, b in mods.items()
                  for p in ("weight", "bias")})
    return names


LM_NAMES = {"embedding.weight": "emb.weight", **_layer_names("transformer_block_0", "pre"),
            **_layer_names("transformer_block_1", "post"), "layer_norm.weight": "norm.weight",
            "layer_norm.bias": "norm.bias", "linear.weight": "head.weight",
            "linear.bias": "head.bias"}


def lm_batch(rng, n: int) -> dict:
    lengths = rng.integers(2, L + 1, n)
    lengths[0] = L
    pad = np.arange(L)[None] >= lengths[:, None]  # True: padding (at the end)
    seq = rng.integers(1, V, (n, L + 1))
    seq[:, :L][pad] = 0  # padding token, the embedding's padding_idx
    target = seq[:, 1:].copy()
    target[pad] = 0  # ignored
    return {"tokens": seq[:, :L], "pad": pad, "target": target}


# -- the recurrent classifiers -----------------------------------------------------------------------
T, IN, H, P, C = 5, 3, 4, 2, 3


def rnn_mithril(kind: str) -> tuple[ml.Model, ml.Model]:
    opts = {"batch_first": True, "num_layers": 2, "bidirectional": True, "lengths": True}
    block = ml.LSTM(H, proj_size=P, **opts) if kind == "lstm" else ml.GRU(H, **opts)
    width = 4 * (P if kind == "lstm" else H)
    m = ml.Model()
    m |= block(input="input", lengths="lengths", hidden=hidden("h"))
    m |= ml.Transpose([1, 0, 2])(input="h", output=hidden("ht"))  # (K, N, ·) -> (N, K, ·)
    m |= ml.Reshape([-1, width])(input="ht", output=hidden("features"))
    m |= ml.Linear(C)(input="features", output="logits")
    m |= ml.CrossEntropy()(input="logits", target="target", output="loss")
    return m, block


class Classifier(torch.nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        opts = {"num_layers": 2, "bidirectional": True, "batch_first": True}
        self.rnn = (torch.nn.LSTM(IN, H, proj_size=P, **opts) if kind == "lstm"
                    else torch.nn.GRU(IN, H, **opts))
        self.head = torch.nn.Linear(4 * (P if kind == "lstm" else H), C)

    def forward(self, input, lengths, target):
        packed = pack_padded_sequence(input, lengths, batch_first=True, enforce_sorted=False)
        _, h = self.rnn(packed)
        h = h[0] if isinstance(h, tuple) else h
        logits = self.head(h.transpose(0, 1).reshape(len(input), -1))
        return logits, F.cross_entropy(logits, target)


def rnn_batch(rng, n: int) -> dict:
    lengths = rng.integers(1, T + 1, n)
    lengths[0] = T
    x = rng.standard_normal((n, T, IN))
    x[np.arange(T)[None] >= lengths[:, None]] = 0.0  # padding
    return {"input": x, "lengths": lengths, "target": rng.integers(0, C, n)}


# -- side by side ----------------------------------------------------------------------------------
def network(name: str):
    """(Mithril model, torch module, {mithril name: torch name}, {state prefix: torch module},
    batch maker, compile shapes)."""
    if name == "cnn":
        return cnn_mithril(), CNN(), CNN_NAMES, CNN_STATE, cnn_batch, {"input": [None, 3, 10, 10]}
    if name == "lm":
        return (transformer_mithril(), LM(), LM_NAMES, {}, lm_batch,
                {"tokens": [None, L], "pad": [None, L], "target": [None, L]})
    model, block = rnn_mithril(name)
    names = {f"{name}.{ours}": f"rnn.{theirs}" for theirs, ours in block.torch_names().items()}
    names.update({"linear.weight": "head.weight", "linear.bias": "head.bias"})
    return model, Classifier(name), names, {}, rnn_batch, {"input": [None, T, IN]}


def on(backend, batch: dict) -> dict:
    """A batch of NumPy arrays as ``backend``'s (integer arrays in its int dtype)."""
    return {k: backend.array(v, backend.int_dtype) if v.dtype.kind == "i" else backend.array(v)
            for k, v in batch.items()}


def setup(name: str, backend_name: str, dtype: str = "float64"):
    """The compiled model, its params copied from a seeded torch module, and that module."""
    backend = BACKENDS[backend_name](dtype=dtype, seed=0)
    torch.manual_seed(0)
    model, net, names, states, make_batch, shapes = network(name)
    compiled = ml.compile(model, backend, shapes=shapes)
    net = net.to(getattr(torch, dtype))
    theirs = dict(net.named_parameters())
    assert set(names) == set(compiled.get_parameters()) and set(names.values()) == set(theirs)
    params = {k: backend.array(theirs[t].detach().numpy().copy()) for k, t in names.items()}
    return backend, compiled, params, net, names, states, make_batch


def npy(backend, a) -> np.ndarray:
    return np.asarray(backend.to_numpy(a), np.float64)


def torch_inputs(batch: dict, dtype: str) -> dict:
    out = {k: torch.tensor(v) for k, v in batch.items()}
    if "lengths" in out:
        out["lengths"] = out["lengths"].cpu()
    return {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v for k, v in out.items()}


# -- forward and gradients -----------------------------------------------------------------------
NETWORKS = ["cnn", "lm", "lstm", "gru"]


def forward_backward(name: str, backend_name: str, dtype: str, n: int = 6) -> dict[str, float]:
    """The largest difference to torch of the loss, the logits, each gradient and (training
    mode) each running statistic, for one batch of ``n``."""
    backend, compiled, params, net, names, states, make_batch = setup(name, backend_name, dtype)
    batch = make_batch(np.random.default_rng(1), n)
    batch = {k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in batch.items()}
    kw = {"state": compiled.initial_state_dict} if states else {}
    outputs, grads, *rest = compiled.evaluate(params, on(backend, batch),
                                              output_gradients={"loss": 1.0}, **kw)
    logits, loss = net(**torch_inputs(batch, dtype))
    loss.backward()
    theirs = dict(net.named_parameters())
    worst = {"loss": abs(npy(backend, outputs["loss"]) - loss.item()),
             "logits": np.abs(npy(backend, outputs["logits"]) - logits.detach().numpy()).max()}
    for k, t in names.items():
        worst[k] = np.abs(npy(backend, grads[k]) - theirs[t].grad.numpy()).max()
    for k, v in (rest[0] if rest else {}).items():
        prefix, buffer = k.rsplit(".", 1)
        want = getattr(getattr(net, states[prefix]), buffer).numpy()
        worst[k] = np.abs(npy(backend, v) - want).max()
    return {k: float(v) for k, v in worst.items()}


def assert_within(worst: dict[str, float], tol: float, label: str) -> None:
    bad = {k: v for k, v in worst.items() if not v <= tol}
    assert not bad, f"{label}: {bad}"


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
@pytest.mark.parametrize("name", NETWORKS)
def test_forward_and_every_gradient_float64(name, backend_name):
    assert_within(forward_backward(name, backend_name, "float64"), 1e-10, name)


def slow_but(first: str, names: list[str]) -> list:
    """``names`` as parameters, all but ``first`` marked slow (on JAX each network is a few
    XLA compiles: seconds of CPU)."""
    return [n if n == first else pytest.param(n, marks=pytest.mark.slow) for n in names]


@pytest.mark.parametrize("name", slow_but("cnn", NETWORKS))
def test_forward_and_every_gradient_float64_on_jax(name):
    with jax_float64():
        assert_within(forward_backward(name, "jax", "float64"), 1e-10, name)


@pytest.mark.parametrize("backend_name", ["numpy", "torch", pytest.param("jax", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", NETWORKS)
def test_forward_and_every_gradient_float32(name, backend_name):
    assert_within(forward_backward(name, backend_name, "float32"), 2e-5, name)


# -- training: AdamW + warm-up then cosine + clipping, against torch -------------------------------
STEPS, LR, WD, CLIP = 6, 0.02, 0.05, 0.5


def schedule(optimizer, make_warmup, make_cosine, make_sequential):
    warmup = make_warmup(optimizer, start_factor=0.25, total_iters=2)
    cosine = make_cosine(optimizer, T_max=STEPS - 2, eta_min=1e-3)
    return make_sequential(optimizer, [warmup, cosine], milestones=[2])


def train_side_by_side(name: str, backend_name: str, via: str,
                       dtype: str = "float64") -> dict[str, float]:
    """``STEPS`` steps of both loops (the batch shrinks to 1 on the last, and the
    sequence models' lengths vary); the largest difference of each kind over the run."""
    backend, compiled, params, net, names, states, make_batch = setup(name, backend_name, dtype)
    theirs = dict(net.named_parameters())
    optimizer = AdamW(learning_rate=LR, weight_decay=WD, clip_norm=CLIP)
    scheduler = schedule(optimizer, LinearLR, CosineAnnealingLR, SequentialLR)
    reference = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=WD)
    lr_sched = torch.optim.lr_scheduler
    their_scheduler = schedule(reference, lr_sched.LinearLR, lr_sched.CosineAnnealingLR,
                               lr_sched.SequentialLR)
    step = make_train_step(compiled, optimizer, loss="loss") if via == "step" else None
    opt_state = step.init(params) if step else optimizer.init(params)
    state = compiled.initial_state_dict
    kw = {"state": state} if states else {}
    rng, worst = np.random.default_rng(2), {}

    def seen(kind: str, got, want) -> None:
        worst[kind] = max(worst.get(kind, 0.0), float(np.abs(npy(backend, got) - want).max()))

    for n in [5] * (STEPS - 1) + [1]:
        batch = {k: v.astype(dtype) if v.dtype.kind == "f" else v
                 for k, v in make_batch(rng, n).items()}
        if name == "cnn" and n == 1:
            batch["target"][0] = 1  # (a batch of one ignored row has a NaN mean, as torch's)
        reference.zero_grad()
        _, loss = net(**torch_inputs(batch, dtype))
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(net.parameters(), CLIP).item()
        reference.step()
        their_scheduler.step()
        data = on(backend, batch)
        if step is not None:
            params, opt_state, outputs, *rest = step(params, opt_state, data, **kw)
        else:
            outputs, grads, *rest = compiled.evaluate(params, data, output_gradients={"loss": 1.0},
                                                      **kw)
            params, opt_state = optimizer.update(params, grads, opt_state)
            seen("grad norm", opt_state.last_grad_norm, norm)
        scheduler.step()
        kw = {"state": rest[0]} if rest else {}
        seen("loss", outputs["loss"], loss.item())
        seen("lr", optimizer.learning_rate, reference.param_groups[0]["lr"])
        for k, t in names.items():
            seen("param", params[k], theirs[t].detach().numpy())
        for k, v in kw.get("state", {}).items():
            prefix, buffer = k.rsplit(".", 1)
            seen("running stats", v, getattr(getattr(net, states[prefix]), buffer).numpy())
    if states:  # inference mode: the running statistics
        batch = {k: v.astype(dtype) if v.dtype.kind == "f" else v
                 for k, v in make_batch(rng, 3).items()}
        batch["target"][:] = 0
        out, after = compiled.evaluate(params, on(backend, batch), training=False, **kw)
        assert all(np.array_equal(npy(backend, after[k]), npy(backend, kw["state"][k]))
                   for k in after)
        net.eval()
        logits, loss = net(**torch_inputs(batch, dtype))
        seen("eval loss", out["loss"], loss.item())
        seen("eval logits", out["logits"], logits.detach().numpy())
    return worst


@pytest.mark.parametrize("via", ["step", "separate"])
@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
@pytest.mark.parametrize("name", NETWORKS)
def test_adamw_warmup_cosine_clip_trains_as_torch(name, backend_name, via):
    assert_within(train_side_by_side(name, backend_name, via), 1e-9, f"{name} {via}")


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
@pytest.mark.parametrize("name", ["cnn", "lstm", "gru"])
def test_adamw_warmup_cosine_clip_trains_as_torch_float32(name, backend_name):
    """float32, through the step. (Not the language model: the key projection's bias has a
    zero gradient in exact arithmetic, every score of a row sharing it, and AdamW turns each
    side's float32 rounding noise there, ~1e-10, into steps of the learning rate: 5e-3 apart
    after 6 steps, on both sides' own noise.)"""
    assert_within(train_side_by_side(name, backend_name, "step", "float32"), 1e-5, name)


@pytest.mark.parametrize("via", ["step", pytest.param("separate", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", slow_but("gru", NETWORKS))
def test_adamw_warmup_cosine_clip_trains_as_torch_on_jax(name, via):
    """The separate calls, and the one-program step (its scalars are float32 pairs whose
    sum is the float64 value: 1e-11 here)."""
    with jax_float64():
        assert_within(train_side_by_side(name, "jax", via), 1e-9, f"{name} {via}")


# -- bad input: an error naming the key, nothing changed ---------------------------------------------
def bad_batches(name: str, good: dict) -> list[tuple[str, dict, type, str]]:
    """(label, batch, error class, a piece of its message) for each mistake of a user's loop."""
    x = "tokens" if name == "lm" else "input"
    wrong = {"cnn": np.zeros((4, 3, 9, 10)), "lm": np.zeros((4, L + 1), np.int64),
             "lstm": np.zeros((4, T + 1, IN)), "gru": np.zeros((4, T, IN + 1))}[name]
    as_float = {x: good[x].astype(np.float64)} if name == "lm" else {x: good[x].astype(np.int64)}
    return [
        ("wrong input shape", {**good, x: wrong}, ml.ShapeError, f"'{x}'"),
        ("wrong input dtype", {**good, **as_float}, ml.DTypeError, f"'{x}'"),
        ("missing data key", {k: v for k, v in good.items() if k != x}, ml.KeyMismatchError,
         f"'{x}'"),
        ("label shape", {**good, "target": good["target"][..., None]}, ml.ShapeError, "'target'"),
        ("label batch", {**good, "target": good["target"][:-1]}, ml.ShapeError, "'target'"),
        ("float labels", {**good, "target": good["target"].astype(np.float64)}, ml.DTypeError,
         "'target'"),
    ]


def refused_run(name: str, backend_name: str, via: str, with_bad: bool) -> dict[str, np.ndarray]:
    """Two good AdamW steps, with every bad batch of :func:`bad_batches` offered between them
    (each must raise and change nothing); the params and model state at the end."""
    backend, compiled, params, net, names, states, make_batch = setup(name, backend_name)
    optimizer = AdamW(learning_rate=LR, weight_decay=WD, clip_norm=CLIP)
    step = make_train_step(compiled, optimizer, loss="loss") if via == "step" else None
    opt_state = step.init(params) if step else optimizer.init(params)
    kw = {"state": compiled.initial_state_dict} if states else {}
    rng = np.random.default_rng(3)

    def run(batch):
        if step is not None:
            new, o, _, *rest = step(params, opt_state, on(backend, batch), **kw)
        else:
            _, grads, *rest = compiled.evaluate(params, on(backend, batch),
                                                output_gradients={"loss": 1.0}, **kw)
            new, o = optimizer.update(params, grads, opt_state)
        return new, o, ({"state": rest[0]} if rest else {})

    def snapshot() -> dict[str, np.ndarray]:
        return {k: npy(backend, v).copy() for k, v in {**params, **kw.get("state", {})}.items()}

    batches = [make_batch(rng, 4) for _ in range(2)]
    params, opt_state, kw = run(batches[0])
    if with_bad:
        before = snapshot()
        for label, batch, error, key in bad_batches(name, batches[1]):
            with pytest.raises(error, match=key):
                run(batch)
            after = snapshot()
            assert all(np.array_equal(after[k], before[k]) for k in before), label
    params, opt_state, kw = run(batches[1])
    return snapshot()


@pytest.mark.parametrize("via", ["step", "separate"])
@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
@pytest.mark.parametrize("name", NETWORKS)
def test_bad_input_is_named_and_changes_nothing(name, backend_name, via):
    """Each refused batch names its key; the params, the optimizer's state and BatchNorm's
    statistics stay as they were: the next good step gives an uninterrupted run's numbers."""
    clean = refused_run(name, backend_name, via, with_bad=False)
    interrupted = refused_run(name, backend_name, via, with_bad=True)
    assert all(np.array_equal(interrupted[k], clean[k]) for k in clean)


@pytest.mark.slow
@pytest.mark.parametrize("via", ["step", "separate"])
@pytest.mark.parametrize("name", NETWORKS)
def test_bad_input_is_named_and_changes_nothing_on_jax(name, via):
    with jax_float64():
        clean = refused_run(name, "jax", via, with_bad=False)
        interrupted = refused_run(name, "jax", via, with_bad=True)
        assert all(np.array_equal(interrupted[k], clean[k]) for k in clean)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_batch_first_sequence_input_is_checked_and_cast_as_the_time_major_one(kind):
    """``batch_first=True`` put a Transpose (any dtype) first, so the sequence escaped the
    input checks: on torch an int64 or float32 tensor reached torch's matmul
    (``RuntimeError: expected m1 and m2 to have the same dtype``, no key named) and NumPy / JAX
    took integer sequences. Now, as with ``batch_first=False``: float32 data is cast to the
    model's float64 and integers are a ``DTypeError`` naming 'input'."""
    backend = ml.TorchBackend(dtype="float64")
    block = getattr(ml, kind)(4, batch_first=True)
    compiled = ml.compile(block, backend, shapes={"input": [2, 5, 3]})
    params = compiled.get_parameters()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    want = compiled.evaluate(params, {"input": x.float().double()})["output"]
    got = compiled.evaluate(params, {"input": x.float()})["output"]
    assert got.dtype == torch.float64 and torch.equal(got, want)
    for b in (backend, ml.NumpyBackend(dtype="float64")):
        c = ml.compile(getattr(ml, kind)(4, batch_first=True), b, shapes={"input": [2, 5, 3]})
        with pytest.raises(ml.DTypeError, match="'input'"):
            c.evaluate(c.get_parameters(), {"input": b.array(np.ones((2, 5, 3), np.int64),
                                                             b.int_dtype)})


# -- odd sizes -------------------------------------------------------------------------------------
def test_heads_that_do_not_divide_the_width_are_named():
    with pytest.raises(ValueError, match=r"embed_dim \(10\) must be divisible by num_heads \(3\)"):
        ml.TransformerBlock(10, 3, 16)
    model = ml.Model()
    model |= ml.MultiHeadAttention(3)(query="x", key="x", value="x", output="output")
    with pytest.raises(ml.ShapeError, match=r"embed_dim \(10, the last dimension of 'query'\) "
                       r"must be divisible by num_heads \(3\)"):
        ml.compile(model, ml.NumpyBackend(), shapes={"x": [None, 4, 10]})


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
@pytest.mark.parametrize("norm_first", [True, False])
def test_transformer_block_batch_one_and_length_one_as_torch(backend_name, norm_first):
    """One model with the batch and the length left free, run at (1, 1), (1, 5), (3, 1) and
    (2, 4) under a causal mask and a key padding mask: outputs and every gradient as
    ``nn.TransformerEncoderLayer``'s."""
    backend = BACKENDS[backend_name](dtype="float64", seed=0)
    model = ml.Model()
    model |= ml.TransformerBlock(D, HEADS, FF, activation="gelu", is_causal=True,
                                 use_key_padding_mask=True, norm_first=norm_first)(
        input="input", key_padding_mask="pad", output="output")
    compiled = ml.compile(model, backend, shapes={"input": [None, None, D], "pad": [None, None]})
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, activation="gelu",
                                             batch_first=True, norm_first=norm_first,
                                             dtype=torch.float64)
    names = {k.replace("transformer_block_0.", "transformer_block."): v.replace("pre.", "")
             for k, v in _layer_names("transformer_block_0", "pre").items()}
    theirs = dict(layer.named_parameters())
    params = {k: backend.array(theirs[v].detach().numpy().copy()) for k, v in names.items()}
    rng = np.random.default_rng(0)
    for n, length in ((1, 1), (1, 5), (3, 1), (2, 4)):
        x, g = rng.standard_normal((n, length, D)), rng.standard_normal((n, length, D))
        pad = np.zeros((n, length), bool)
        pad[-1, 1:] = np.arange(1, length) >= 3  # the last entry's keys from the 4th on
        out, grads = compiled.evaluate(params, on(backend, {"input": x, "pad": pad}),
                                       output_gradients={"output": backend.array(g)})
        layer.zero_grad()
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)
        y = layer(torch.tensor(x), src_mask=causal, src_key_padding_mask=torch.tensor(pad))
        y.backward(torch.tensor(g))
        assert np.abs(npy(backend, out["output"]) - y.detach().numpy()).max() < 1e-12
        for k, v in names.items():
            assert np.abs(npy(backend, grads[k]) - theirs[v].grad.numpy()).max() < 1e-12, (n, k)


@pytest.mark.parametrize("backend_name", ["numpy", "torch", pytest.param("jax", marks=pytest.mark.slow)])
def test_cnn_in_eval_mode_gradients_as_torch_eval(backend_name):
    """After three training-mode batches, an inference-mode pass (BatchNorm on its running
    statistics) gives ``net.eval()``'s loss and every gradient, and leaves the state alone."""
    context = jax_float64() if backend_name == "jax" else nullcontext()
    with context:
        backend, compiled, params, net, names, states, make_batch = setup("cnn", backend_name)
        rng, state = np.random.default_rng(0), compiled.initial_state_dict
        for _ in range(3):
            batch = make_batch(rng, 5)
            batch["input"] = batch["input"] * 2 + 1
            _, state = compiled.evaluate(params, on(backend, batch), state=state)
            net(**torch_inputs(batch, "float64"))
        net.eval()
        batch = make_batch(rng, 4)
        out, grads, after = compiled.evaluate(params, on(backend, batch), state=state,
                                              training=False, output_gradients={"loss": 1.0})
        _, loss = net(**torch_inputs(batch, "float64"))
        loss.backward()
        theirs = dict(net.named_parameters())
        assert abs(npy(backend, out["loss"]) - loss.item()) < 1e-12
        for k, v in names.items():
            assert np.abs(npy(backend, grads[k]) - theirs[v].grad.numpy()).max() < 1e-12, k
        assert all(np.array_equal(npy(backend, after[k]), npy(backend, state[k])) for k in state)


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
def test_a_skipped_step_returns_its_forward_passs_batchnorm_statistics_as_torch(backend_name):
    """``nonfinite="skip"`` leaves the params alone, but the state returned is the forward
    pass's, NaN included, as torch's buffers after the forward whose ``optimizer.step()`` a
    finiteness check skips (docs/dropout-batchnorm.md); keeping the state passed in drops
    the batch."""
    backend, compiled, params, net, names, states, make_batch = setup("cnn", backend_name)
    step = make_train_step(compiled, AdamW(learning_rate=LR, clip_norm=CLIP, nonfinite="skip"),
                           loss="loss")
    opt_state, state = step.init(params), compiled.initial_state_dict
    rng = np.random.default_rng(0)
    batch = make_batch(rng, 4)
    params, opt_state, _, state = step(params, opt_state, on(backend, batch), state=state)
    net(**torch_inputs(batch, "float64"))
    before = {k: npy(backend, v).copy() for k, v in params.items()}
    batch = make_batch(rng, 4)
    batch["input"][0, 0, 0, 0] = np.nan
    with pytest.warns(RuntimeWarning, match="step skipped"):
        params, opt_state, _, new_state = step(params, opt_state, on(backend, batch), state=state)
    net(**torch_inputs(batch, "float64"))
    assert opt_state.last_step_skipped
    assert all(np.array_equal(npy(backend, params[k]), before[k]) for k in before)
    for k, v in new_state.items():
        prefix, buffer = k.rsplit(".", 1)
        want = getattr(getattr(net, states[prefix]), buffer).numpy()
        assert np.allclose(npy(backend, v), want, rtol=0, atol=1e-12, equal_nan=True), k
    assert np.isnan(npy(backend, new_state["batch_norm2_d_0.running_mean"])).any()
    assert not any(np.isnan(npy(backend, v)).any() for v in state.values())
