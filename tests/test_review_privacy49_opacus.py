"""Review of DP-SGD as an Opacus user (2): per-sample gradients, their norms and the DP step
beside Opacus 1.6's ``GradSampleModule`` and ``DPOptimizer`` (float64, noise-free runs to
1e-12; with noise the distribution), Poisson batches divided by the expected batch size
(an empty one included), and the settings that make our step Opacus's."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

opacus = pytest.importorskip("opacus")  # (the test extra installs it: a peer, not a feature)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from opacus import GradSampleModule  # noqa: E402
from opacus.layers import DPLSTM, DPRNN  # noqa: E402
from opacus.optimizers import DPOptimizer  # noqa: E402

import mithril as ml  # noqa: E402
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend  # noqa: E402
from mithril.utils.optimizers import SGD, DifferentiallyPrivate  # noqa: E402
from mithril.utils.per_example import per_example_gradients  # noqa: E402

# -- per-sample gradients and the DP step beside Opacus ----------------------------------------
BACKENDS = {"numpy": NumpyBackend, "torch": TorchBackend, "jax": JaxBackend}
OPACUS_EPS = 1e-6  # (Opacus's clip factor: max_grad_norm / (norm + 1e-6))


def _h(name: str) -> ml.IOKey:
    return ml.IOKey(name, expose=False)


class Vision(torch.nn.Module):
    """Conv2d, GroupNorm, Linear, LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3, padding=1)
        self.gn = torch.nn.GroupNorm(2, 4)
        self.l0 = torch.nn.Linear(64, 6)
        self.ln = torch.nn.LayerNorm(6)
        self.l1 = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.l1(self.ln(self.l0(torch.relu(self.gn(self.conv(x))).flatten(1))))


def vision_mithril() -> ml.Model:
    m = ml.Model()
    m |= ml.Convolution2D(3, 4, padding=1)(input="input", output=_h("c"))
    m |= ml.GroupNorm(2)(input="c", output=_h("g"))
    m |= ml.Relu()(input="g", output=_h("r"))
    m |= ml.Flatten()(input="r", output=_h("f"))
    m |= ml.Linear(6)(input="f", output=_h("l"))
    m |= ml.LayerNorm()(input="l", output=_h("n"))
    m |= ml.Linear(3)(input="n", output="logits")
    m |= ml.CrossEntropy()(input="logits", target="target", output=ml.IOKey("loss"))
    return m


class Text(torch.nn.Module):
    """Embedding, LSTM (Opacus's DPLSTM), Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(7, 5)
        self.lstm = DPLSTM(5, 4, batch_first=True)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, tokens):
        return self.head(self.lstm(self.emb(tokens))[0].mean(1))


def text_mithril() -> ml.Model:
    m = ml.Model()
    m |= ml.Embedding(7, 5)(input="tokens", output=_h("e"))
    m |= ml.LSTM(4, batch_first=True)(input="e", output=_h("s"))
    m |= ml.Mean(axis=1)(input="s", output=_h("p"))
    m |= ml.Linear(3)(input="p", output="logits")
    m |= ml.CrossEntropy()(input="logits", target="target", output=ml.IOKey("loss"))
    return m


class Recurrent(torch.nn.Module):
    """A tanh RNN (Opacus's DPRNN) regressor."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = DPRNN(3, 4, batch_first=True)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0].mean(1))


def rnn_mithril() -> ml.Model:
    m = ml.Model()
    m |= ml.RNN(4, batch_first=True)(input="input", output=_h("s"))
    m |= ml.Mean(axis=1)(input="s", output=_h("p"))
    m |= ml.Linear(2)(input="p", output="logits")
    m |= ml.MeanSquaredError()(input="logits", target="target", output=ml.IOKey("loss"))
    return m


_RNN = {"weight_ih": "weight_ih_l0", "weight_hh": "weight_hh_l0", "bias_ih": "bias_ih_l0",
        "bias_hh": "bias_hh_l0"}
NETWORKS = {
    "vision": (vision_mithril, Vision, "input", {"input": [None, 2, 4, 4]}, {
        "convolution2_d.weight": "conv.weight", "convolution2_d.bias": "conv.bias",
        "group_norm.weight": "gn.weight", "group_norm.bias": "gn.bias",
        "linear_0.weight": "l0.weight", "linear_0.bias": "l0.bias",
        "layer_norm.weight": "ln.weight", "layer_norm.bias": "ln.bias",
        "linear_1.weight": "l1.weight", "linear_1.bias": "l1.bias"}),
    "text": (text_mithril, Text, "tokens", {"tokens": [None, 6]}, {
        "embedding.weight": "emb.weight", "linear.weight": "head.weight",
        "linear.bias": "head.bias",
        **{f"lstm.recurrence.{k}": f"lstm.{v}" for k, v in _RNN.items()}}),
    "rnn": (rnn_mithril, Recurrent, "input", {"input": [None, 5, 3]}, {
        "linear.weight": "head.weight", "linear.bias": "head.bias",
        **{f"rnn.recurrence.{k}": f"rnn.{v}" for k, v in _RNN.items()}}),
}


def network(name: str, n: int, seed: int = 0) -> tuple:
    """(Mithril model, Opacus GradSampleModule, names, compile shapes, batch maker)."""
    make, torch_cls, key, shapes, names = NETWORKS[name]
    torch.manual_seed(seed)
    module = torch_cls().double()
    rng = np.random.default_rng(seed)

    def batch(size: int) -> dict:
        if name == "text":
            x = rng.integers(0, 7, (size, 6))
        else:
            x = rng.standard_normal((size, *shapes[key][1:]))
        y = rng.standard_normal((size, 2)) if name == "rnn" else rng.integers(0, 3, size)
        return {key: x, "target": y}

    return make(), GradSampleModule(module), names, shapes, batch, key


def torch_loss(name: str, out, target):
    return F.mse_loss(out, target) if name == "rnn" else F.cross_entropy(out, target)


def to_torch(d: dict) -> dict:
    return {k: torch.as_tensor(v) for k, v in d.items()}


def opacus_grad_samples(name: str, gsm, key: str, data: dict) -> dict:
    gsm.zero_grad(set_to_none=True)
    for p in gsm.parameters():
        p.grad_sample = None
    t = to_torch(data)
    with warnings.catch_warnings():  # (torch: "full backward hook ... no inputs require grad")
        warnings.simplefilter("ignore", UserWarning)
        torch_loss(name, gsm(t[key]), t["target"]).backward()
    return {n: p.grad_sample.detach().numpy().copy() for n, p in gsm._module.named_parameters()}


def on(be, name: str, data: dict, key: str) -> dict:
    x = be.array(data[key], be.int_dtype) if name == "text" else be.array(data[key])
    y = be.array(data["target"]) if name == "rnn" else be.array(data["target"], be.int_dtype)
    return {key: x, "target": y}


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("name", list(NETWORKS))
def test_per_sample_gradients_and_norms_equal_opacus(name, backend) -> None:
    model, gsm, names, shapes, batch, key = network(name, 6)
    be = BACKENDS[backend](dtype="float64")
    compiled = ml.compile(model, be, shapes=shapes)
    theirs_p = dict(gsm._module.named_parameters())
    assert set(compiled.parameter_shapes) == set(names)
    params = {k: be.array(theirs_p[t].detach().numpy()) for k, t in names.items()}
    data = batch(6)
    theirs = opacus_grad_samples(name, gsm, key, data)
    ours = per_example_gradients(compiled, params, on(be, name, data, key), "loss")
    for k, t in names.items():
        np.testing.assert_allclose(be.to_numpy(ours[k]), theirs[t], rtol=1e-10, atol=1e-12,
                                   err_msg=k)
    # the global per-sample norms Opacus clips by
    their_norms = np.linalg.norm(np.stack(  # (Opacus: the norm of the per-parameter norms)
        [np.linalg.norm(theirs[t].reshape(6, -1), axis=1) for t in names.values()], 1), axis=1)
    our_norms = np.sqrt(sum((be.to_numpy(g).reshape(6, -1) ** 2).sum(1) for g in ours.values()))
    np.testing.assert_allclose(our_norms, their_norms, rtol=1e-12)


def opacus_run(name: str, gsm, key: str, batches: list, clip: float, expected: int,
               lr: float = 0.5, momentum: float = 0.9) -> dict:
    """Opacus's DPOptimizer (noise 0) around torch's SGD over ``batches``."""
    opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=lr, momentum=momentum),
                      noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=expected)
    for data in batches:
        opt.zero_grad(set_to_none=True)
        t = to_torch(data)
        with warnings.catch_warnings():  # (the hook note; an empty batch's mean loss: NaN)
            warnings.simplefilter("ignore", UserWarning)
            torch_loss(name, gsm(t[key]), t["target"]).backward()
        opt.step()
    return {n: p.detach().numpy().copy() for n, p in gsm._module.named_parameters()}


@pytest.mark.parametrize("backend", ["numpy", "torch", pytest.param(
    "jax", marks=pytest.mark.slow)])  # (JAX: ~15 s of vmapped compilation per network)
@pytest.mark.parametrize("name", ["vision", "text"])
def test_poisson_batches_step_as_opacus_without_noise(name, backend) -> None:
    """Batches of varying size (Poisson sampling, an empty one included) divided by the
    expected batch size, clipped as Opacus clips (1e-6 in the factor's denominator)."""
    model, gsm, names, shapes, batch, key = network(name, 6)
    be = BACKENDS[backend](dtype="float64")
    compiled = ml.compile(model, be, shapes=shapes)
    p0 = {k: dict(gsm._module.named_parameters())[t].detach().numpy().copy()
          for k, t in names.items()}
    batches = [batch(n) for n in (4, 7, 0, 2, 5)]
    theirs = opacus_run(name, gsm, key, batches, clip=0.05, expected=4)
    opt = DifferentiallyPrivate(SGD(0.5, momentum=0.9), l2_norm_clip=0.05,
                                noise_multiplier=0.0, expected_batch_size=4,
                                clip_epsilon=OPACUS_EPS)
    params = {k: be.array(v) for k, v in p0.items()}
    state = opt.init(params)
    clipped = 0
    for data in batches:
        rows = per_example_gradients(compiled, params, on(be, name, data, key), "loss")
        flat = [be.to_numpy(g) for g in rows.values()]
        norms = np.sqrt(sum((g.reshape(len(g), g[0].size if len(g) else 0) ** 2).sum(1)
                            for g in flat))
        clipped += int((norms > 0.05).sum())
        params, state = opt.update(params, rows, state)
    assert clipped >= 10  # (the clipping is exercised)
    for k, t in names.items():
        np.testing.assert_allclose(be.to_numpy(params[k]), theirs[t], rtol=1e-12, atol=1e-13,
                                   err_msg=k)
    assert state.values["dp_count"] == 5


def test_without_opacus_clipping_epsilon_the_step_is_optax_not_opacus() -> None:
    """clip_epsilon=0 (optax's clipping) differs from Opacus's by ~1e-6 / norm: measurable."""
    model, gsm, names, shapes, batch, key = network("vision", 6)
    be = NumpyBackend(dtype="float64")
    compiled = ml.compile(model, be, shapes=shapes)
    p0 = {k: dict(gsm._module.named_parameters())[t].detach().numpy().copy()
          for k, t in names.items()}
    data = batch(6)
    theirs = opacus_run("vision", gsm, key, [data], clip=0.05, expected=6, momentum=0.0)
    opt = DifferentiallyPrivate(SGD(0.5), l2_norm_clip=0.05, noise_multiplier=0.0)
    params, _ = opt.update(p0, per_example_gradients(compiled, p0, data, "loss"), opt.init(p0))
    worst = max(np.abs(params[k] - theirs[t]).max() for k, t in names.items())
    assert 1e-10 < worst < 1e-5


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
def test_the_noise_has_opacus_distribution(backend) -> None:
    """Zero per-example gradients: the step is the noise alone, N(0, (σ·C / E)²) per element
    in both (different draws: compared by mean, std and a two-sample KS test)."""
    from scipy import stats

    sigma, clip, expected, shape = 1.3, 0.7, 4, (300, 200)
    w = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    topt = DPOptimizer(torch.optim.SGD([w], lr=1.0), noise_multiplier=sigma,
                       max_grad_norm=clip, expected_batch_size=expected)
    torch.manual_seed(0)
    w.grad_sample = torch.zeros((3, *shape), dtype=torch.float64)
    w.grad = torch.zeros(shape, dtype=torch.float64)
    topt.step()
    theirs = -w.detach().numpy().ravel()
    be = BACKENDS[backend](dtype="float64")
    opt = DifferentiallyPrivate(SGD(1.0), l2_norm_clip=clip, noise_multiplier=sigma, seed=5,
                                expected_batch_size=expected)
    params = {"w": be.array(np.zeros(shape))}
    params, _ = opt.update(params, {"w": be.array(np.zeros((3, *shape)))}, opt.init(params))
    ours = -be.to_numpy(params["w"]).ravel()
    want = sigma * clip / expected
    for x in (ours, theirs):
        assert abs(x.mean()) < 4 * want / np.sqrt(x.size)
        assert x.std() == pytest.approx(want, rel=0.01)
    assert stats.ks_2samp(ours, theirs).pvalue > 1e-3


# -- the new settings: checks, state dicts, optax, the training step -------------------------
@pytest.mark.parametrize("kwargs, match", [({"expected_batch_size": 0}, "expected_batch_size"),
                                           ({"expected_batch_size": 2.5}, "expected_batch_size"),
                                           ({"clip_epsilon": -1e-6}, "clip_epsilon")])
def test_bad_new_settings_are_named(kwargs, match) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        DifferentiallyPrivate(SGD(0.1), **kwargs)


def test_an_empty_batch_needs_the_expected_batch_size_and_changes_nothing() -> None:
    opt = DifferentiallyPrivate(SGD(0.1, momentum=0.9), noise_multiplier=0.5)
    params = {"w": np.ones((3, 2))}
    state = opt.init(params)
    with pytest.raises(ml.ShapeError, match="empty batch .* set expected_batch_size"):
        opt.update(params, {"w": np.zeros((0, 3, 2))}, state)
    assert state.values["dp_count"] == 0 and (params["w"] == 1).all()


def test_the_new_settings_survive_a_state_dict() -> None:
    opt = DifferentiallyPrivate(SGD(0.1), l2_norm_clip=0.3, noise_multiplier=0.7,
                                expected_batch_size=16, clip_epsilon=1e-6)
    params = {"w": np.zeros((3, 2))}
    state = opt.init(params)
    params, state = opt.update(params, {"w": np.ones((5, 3, 2))}, state)
    saved = opt.state_dict(state)
    fresh = DifferentiallyPrivate(SGD(0.1))
    loaded = fresh.load_state_dict(saved, params)
    assert (fresh.expected_batch_size, fresh.clip_epsilon) == (16, 1e-6)
    assert loaded.values["dp_count"] == 1
    bad = {**saved, "hyperparameters": {**saved["hyperparameters"], "expected_batch_size": -3}}
    with pytest.raises(ValueError, match="expected_batch_size"):
        DifferentiallyPrivate(SGD(0.1)).load_state_dict(bad, params)


def test_optax_aggregate_divides_by_the_expected_batch_size() -> None:
    import jax.numpy as jnp

    dp = DifferentiallyPrivate(SGD(0.1, backend=JaxBackend(dtype="float64")),
                               l2_norm_clip=0.5, noise_multiplier=0.8, seed=2,
                               expected_batch_size=8, clip_epsilon=1e-6)
    rows = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((3, 4, 2)))}
    tx = dp.optax_aggregate()
    mean, _ = tx.update(rows, tx.init(None))
    want = dp.aggregate(rows, 3, 1)
    np.testing.assert_allclose(np.asarray(mean["w"]), np.asarray(want["w"]), rtol=1e-13)
    flat = np.asarray(rows["w"]).reshape(3, -1)
    c = np.minimum(0.5 / (np.linalg.norm(flat, axis=1) + 1e-6), 1.0)
    noise = np.asarray(want["w"]).ravel() * 8 - c @ flat
    assert np.abs(noise).max() > 0.05  # (noise present, at C·σ per element before / 8)


def test_the_training_step_takes_an_empty_poisson_batch() -> None:
    m = ml.Model()
    m |= ml.MLP(["tanh", None], [6, 3])(input="input", output="logits")
    m |= ml.CrossEntropy()(input="logits", target="target", output=ml.IOKey("loss"))
    compiled = ml.compile(m, NumpyBackend(dtype="float64"), shapes={"input": [None, 4]})
    from mithril.utils.training import make_train_step

    def make():
        return DifferentiallyPrivate(SGD(0.1, momentum=0.9), 1.0, 0.3, seed=1,
                                     expected_batch_size=4)
    p0 = {k: np.full(s, 0.1) for k, s in compiled.parameter_shapes.items()}
    step, ref = make_train_step(compiled, make(), loss="loss"), make()
    params = dict(p0)
    state = step.init(params)
    rparams, rstate = dict(p0), ref.init(p0)
    for n in (3, 0, 2):
        data = {"input": np.ones((n, 4)), "target": np.arange(n) % 3}
        with np.errstate(all="ignore"), warnings.catch_warnings():  # (an empty mean: NaN)
            warnings.simplefilter("ignore", RuntimeWarning)
            params, state, _ = step(params, state, data)
        rparams, rstate = ref.update(rparams, per_example_gradients(compiled, rparams, data,
                                                                     "loss"), rstate)
    for k in p0:
        np.testing.assert_array_equal(params[k], rparams[k])
    assert state.values["dp_count"] == 3


def test_data_parallel_runs_the_opacus_settings() -> None:
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    import dist_private_worker as W

    opt = W.makers()["opacus"]()
    assert (opt.expected_batch_size, opt.clip_epsilon) == (8, 1e-6)
