"""Review 51: models written with the published functional API (``Linear(3)(input=x)``,
``Model.create``) trained a few steps with our optimizers on NumPy, torch and JAX (float64),
against the same network and optimizer in torch (``torch.nn.functional`` + ``torch.optim``):
a small CNN (Conv2D, Relu, MaxPool2D, Flatten, Linear; CrossEntropy) with Adam, a GRU
unrolled over time whose steps share their weights by name (``weight="w_ir"``) with SGD
(momentum), and an MLP-mixer of ``@functional`` blocks (token mixing through transposes,
LayerNorm, Gelu, residuals) with AdamW; losses, parameters after each step and the gradients
of the last step agree to 1e-12 on every backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import jax_float64

import mithril as ml
from mithril.models import (
    Convolution2D,
    CrossEntropy,
    Flatten,
    Gelu,
    IOKey,
    LayerNorm,
    Linear,
    MaxPool2D,
    Mean,
    Model,
    Relu,
    Sigmoid,
    SquaredError,
    Tanh,
    TrainModel,
    functional,
)
from mithril.utils.optimizers import SGD, Adam, AdamW

BACKENDS = {"numpy": ml.NumpyBackend, "torch": ml.TorchBackend, "jax": ml.JaxBackend}
F64 = dict(rtol=0, atol=1e-12)
STEPS = 4


def functional_cnn() -> Model:
    x = IOKey("input")
    h = Relu()(input=Convolution2D(3, 4, name="conv")(input=x))
    h = Flatten(start_dim=1)(input=MaxPool2D(2)(input=h))
    return Model.create(Linear(3, name="head")(input=h), name="cnn")


def functional_gru(steps: int, hidden: int) -> Model:
    """h' = (1 - z)·n + z·h with torch.nn.GRU's gates, each step's Linear calls sharing
    their weights by name."""
    x, h = IOKey("input"), IOKey("h0")

    def lin(name: str, v):
        return Linear(hidden)(input=v, weight=f"w_{name}", bias=f"b_{name}")

    for t in range(steps):
        xt = x[:, t, :]
        r = Sigmoid()(input=lin("ir", xt) + lin("hr", h))
        z = Sigmoid()(input=lin("iz", xt) + lin("hz", h))
        n = Tanh()(input=lin("in", xt) + r * lin("hn", h))
        h = (1 - z) * n + z * h
    return Model.create(h, name="gru")


def torch_gru(p: dict, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    for t in range(x.shape[1]):
        xt = x[:, t, :]
        r = torch.sigmoid(F.linear(xt, p["w_ir"], p["b_ir"]) + F.linear(h, p["w_hr"], p["b_hr"]))
        z = torch.sigmoid(F.linear(xt, p["w_iz"], p["b_iz"]) + F.linear(h, p["w_hz"], p["b_hz"]))
        n = torch.tanh(F.linear(xt, p["w_in"], p["b_in"]) + r * F.linear(h, p["w_hn"], p["b_hn"]))
        h = (1 - z) * n + z * h
    return h


def _train(name: str, model: Model, loss, shapes: dict, data: dict, params: dict, opt,
           ) -> tuple[list[float], list[dict], dict]:
    """Losses, parameters after each step, and the last step's gradients, as NumPy."""
    def run():
        b = BACKENDS[name](dtype="float64")
        tm = TrainModel(model)
        tm.add_loss(loss, reduce_steps=[Mean()], input="output", target="target")
        c = ml.compile(tm, b, shapes=shapes)
        p = {k: b.array(v) for k, v in params.items()}
        d = {k: b.array(v) for k, v in data.items()}
        state, costs, after = opt.init(p), [], []
        for _ in range(STEPS):
            out, grads = c.evaluate(p, d, output_gradients=True)
            costs.append(float(b.to_numpy(out["final_cost"])))
            p, state = opt.update(p, grads, state)
            after.append({k: np.array(b.to_numpy(v)) for k, v in p.items()})
        return costs, after, {k: np.array(b.to_numpy(v)) for k, v in grads.items()}

    if name == "jax":
        with jax_float64():
            return run()
    return run()


def _torch_train(params: dict, forward, opt_cls, **opt_kw) -> tuple[list[float], list[dict], dict]:
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    opt = opt_cls(list(t.values()), **opt_kw)
    costs, after = [], []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = forward(t)
        loss.backward()
        grads = {k: v.grad.numpy().copy() for k, v in t.items()}
        opt.step()
        costs.append(float(loss.detach()))
        after.append({k: v.detach().numpy().copy() for k, v in t.items()})
    return costs, after, grads


def _check(got, want) -> None:
    costs, after, grads = got
    np.testing.assert_allclose(costs, want[0], **F64)
    for mine, theirs in zip(after, want[1], strict=True):
        assert mine.keys() == theirs.keys()
        for k in theirs:
            np.testing.assert_allclose(mine[k], theirs[k], **F64, err_msg=k)
    for k in want[2]:
        np.testing.assert_allclose(grads[k], want[2][k], **F64, err_msg=k)


@pytest.fixture(scope="module")
def cnn_case():
    rng = np.random.default_rng(51)
    c = ml.compile(functional_cnn(), ml.NumpyBackend(dtype="float64"),
                   shapes={"input": [5, 2, 6, 6]})
    params = {k: rng.standard_normal(s) * 0.3 for k, s in c.parameter_shapes.items()}
    data = {"input": rng.standard_normal((5, 2, 6, 6)), "target": rng.integers(0, 3, 5)}

    def forward(t):
        h = F.max_pool2d(F.relu(F.conv2d(torch.tensor(data["input"]), t["conv.weight"],
                                         t["conv.bias"])), 2)
        out = F.linear(h.flatten(1), t["head.weight"], t["head.bias"])
        return F.cross_entropy(out, torch.tensor(data["target"]))

    want = _torch_train(params, forward, torch.optim.Adam, lr=0.05)
    return params, data, want


@pytest.mark.parametrize("name", list(BACKENDS))
def test_functional_cnn_trains_with_adam_as_torch(name, cnn_case):
    params, data, want = cnn_case
    assert list(params) == ["conv.weight", "conv.bias", "head.weight", "head.bias"]
    got = _train(name, functional_cnn(), CrossEntropy(), {"input": [5, 2, 6, 6]}, data, params,
                 Adam(learning_rate=0.05))
    _check(got, want)
    assert got[0][-1] < got[0][0]


@pytest.fixture(scope="module")
def gru_case():
    rng = np.random.default_rng(52)
    B, T, D, H = 3, 4, 5, 4
    c = ml.compile(functional_gru(T, H), ml.NumpyBackend(dtype="float64"),
                   shapes={"input": [B, T, D], "h0": [B, H]})
    # one wire per shared name: 12 parameters, whatever the number of steps
    assert sorted(c.parameter_shapes) == sorted(f"{wb}_{g}" for wb in "wb" for g in (
        "ir", "hr", "iz", "hz", "in", "hn"))
    params = {k: rng.standard_normal(s) * 0.5 for k, s in c.parameter_shapes.items()}
    data = {"input": rng.standard_normal((B, T, D)), "h0": rng.standard_normal((B, H)),
            "target": rng.standard_normal((B, H))}

    def forward(t):
        out = torch_gru(t, torch.tensor(data["input"]), torch.tensor(data["h0"]))
        return F.mse_loss(out, torch.tensor(data["target"]))

    want = _torch_train(params, forward, torch.optim.SGD, lr=0.3, momentum=0.9)
    return params, data, want


@pytest.mark.parametrize("name", list(BACKENDS))
def test_functional_gru_with_weights_shared_by_name_trains_as_torch(name, gru_case):
    params, data, want = gru_case
    got = _train(name, functional_gru(4, 4), SquaredError(), {"input": [3, 4, 5], "h0": [3, 4]},
                 data, params, SGD(learning_rate=0.3, momentum=0.9))
    _check(got, want)
    assert got[0][-1] < got[0][0]


@functional
def mixer_layer(x, *, tokens: int, channels: int):
    """x + token-MLP(LN(x))ᵀ, then + channel-MLP(LN(·)) (B, tokens, channels)."""
    h = LayerNorm(name="ln1")(input=x).transpose((0, 2, 1))
    h = Linear(tokens, name="tok2")(input=Gelu()(input=Linear(2 * tokens, name="tok1")(input=h)))
    x = x + h.transpose((0, 2, 1))
    h = Linear(2 * channels, name="ch1")(input=LayerNorm(name="ln2")(input=x))
    return x + Linear(channels, name="ch2")(input=Gelu()(input=h))


def functional_mixer(layers: int, tokens: int, channels: int) -> Model:
    h = IOKey("input")
    for i in range(layers):
        h = mixer_layer(h, tokens=tokens, channels=channels, name=f"layer{i}")
    return Model.create(Linear(2, name="head")(input=h.mean(axis=1)), name="mixer")


def torch_mixer(t: dict, x: torch.Tensor, layers: int) -> torch.Tensor:
    def lin(v, n):
        return F.linear(v, t[f"{n}.weight"], t[f"{n}.bias"])

    for i in range(layers):
        p = f"layer{i}"
        ln = F.layer_norm(x, x.shape[-1:], t[f"{p}.ln1.weight"], t[f"{p}.ln1.bias"])
        x = x + lin(F.gelu(lin(ln.transpose(1, 2), f"{p}.tok1")), f"{p}.tok2").transpose(1, 2)
        ln = F.layer_norm(x, x.shape[-1:], t[f"{p}.ln2.weight"], t[f"{p}.ln2.bias"])
        x = x + lin(F.gelu(lin(ln, f"{p}.ch1")), f"{p}.ch2")
    return lin(x.mean(1), "head")


@pytest.fixture(scope="module")
def mixer_case():
    rng = np.random.default_rng(53)
    B, T, C = 4, 3, 5
    c = ml.compile(functional_mixer(2, T, C), ml.NumpyBackend(dtype="float64"),
                   shapes={"input": [B, T, C]})
    params = {k: rng.standard_normal(s) * 0.4 for k, s in c.parameter_shapes.items()}
    data = {"input": rng.standard_normal((B, T, C)), "target": rng.standard_normal((B, 2))}

    def forward(t):
        return F.mse_loss(torch_mixer(t, torch.tensor(data["input"]), 2),
                          torch.tensor(data["target"]))

    want = _torch_train(params, forward, torch.optim.AdamW, lr=0.02, weight_decay=0.1)
    return params, data, want


@pytest.mark.parametrize("name", list(BACKENDS))
def test_functional_mlp_mixer_of_decorated_blocks_trains_with_adamw_as_torch(name, mixer_case):
    params, data, want = mixer_case
    assert list(params)[:4] == ["layer0.ln1.weight", "layer0.ln1.bias", "layer0.tok1.weight",
                                "layer0.tok1.bias"] and list(params)[-2:] == ["head.weight",
                                                                             "head.bias"]
    got = _train(name, functional_mixer(2, 3, 5), SquaredError(), {"input": [4, 3, 5]}, data,
                 params, AdamW(learning_rate=0.02, weight_decay=0.1))
    _check(got, want)
    assert got[0][-1] < got[0][0]
