"""A torch user's trained module brought into Mithril with :mod:`mithril.interop.torch_weights`
and back: a CNN (``nn.Sequential`` of Conv2d / BatchNorm2d / Linear), a language model
(``nn.Embedding`` + ``nn.TransformerEncoder`` of two post-norm layers, packed ``in_proj``), a
2-layer bidirectional ``nn.LSTM`` and an ``nn.Embedding`` + ``nn.GRU``, each rebuilt with Mithril
blocks. ``module.state_dict()`` (or a safetensors / ``.bin`` / sharded file of it) → params and
BatchNorm state → forward outputs, every gradient and the running statistics equal torch's
(float64, 1e-12) on NumPy, torch and JAX; Mithril → ``load_state_dict(strict=True)`` → equal
outputs. Mismatches name the torch key, the Mithril key and both shapes or dtypes."""

from __future__ import annotations

import json
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from conftest import BACKENDS, jax_float64
from safetensors.torch import save_file

import mithril as ml
from mithril.errors import CheckpointError
from mithril.interop import params_from_torch, params_to_torch
from mithril.interop.torch_weights import torch_names

V, D, HEADS, FF, L = 11, 8, 2, 12, 5  # vocabulary, width, heads, feed-forward, length
IN, H, C = 3, 4, 5  # recurrent input features, hidden size, classes
LM_NAMES = [(r"encoder\.layers\.(\d+)", r"transformer_block_\1")]


def wire(name: str) -> ml.IOKey:
    return ml.IOKey(name, expose=False)


def cnn() -> tuple[ml.Model, torch.nn.Module, dict, dict]:
    m = ml.Model()
    m |= ml.Convolution2D(3, 4, padding=1)(input="input")
    m += ml.BatchNorm2D(4)
    m += ml.Relu()
    m += ml.MaxPool2D(2)
    m += ml.Convolution2D(3, 8, padding=1, use_bias=False)
    m += ml.BatchNorm2D(8)
    m += ml.Relu()
    m += ml.GlobalAvgPool2D()
    m += ml.Linear(C)(output="logits")
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2), torch.nn.Conv2d(4, 8, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(8, C))
    return m, net, {"input": [None, 3, 6, 6]}, {}


class LM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(V, D)
        layer = torch.nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, activation="gelu",
                                                 batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = torch.nn.Linear(D, V)

    def forward(self, input):
        causal = torch.triu(torch.ones(input.shape[1], input.shape[1], dtype=torch.bool), 1)
        return self.head(self.encoder(self.emb(input), mask=causal))


def lm():
    m = ml.Model()
    m |= ml.Embedding(V, D)(input="input", output=wire("x0"))
    for i in range(2):
        m |= ml.TransformerBlock(D, HEADS, FF, activation="gelu", is_causal=True,
                                 norm_first=False)(input=f"x{i}", output=wire(f"x{i + 1}"))
    m |= ml.Linear(V)(input="x2", output="logits")
    return m, LM(), {"input": [None, L]}, {"names": LM_NAMES}


class Recurrent(torch.nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        if kind == "lstm":
            self.emb = None
            self.rnn = torch.nn.LSTM(IN, H, num_layers=2, bidirectional=True, batch_first=True)
        else:
            self.emb = torch.nn.Embedding(V, IN)
            self.rnn = torch.nn.GRU(IN, H, batch_first=True)
        self.head = torch.nn.Linear(self.rnn.hidden_size * (1 + self.rnn.bidirectional), C)

    def forward(self, input):
        return self.head(self.rnn(input if self.emb is None else self.emb(input))[0])


def recurrent(kind: str):
    m = ml.Model()
    if kind == "lstm":
        m |= ml.LSTM(H, num_layers=2, bidirectional=True, batch_first=True)(
            input="input", output=wire("h"))
        shapes = {"input": [None, L, IN]}
    else:
        m |= ml.Embedding(V, IN)(input="input", output=wire("e"))
        m |= ml.GRU(H, batch_first=True)(input="e", output=wire("h"))
        shapes = {"input": [None, L]}
    m |= ml.Linear(C)(input="h", output="logits")
    return m, Recurrent(kind), shapes, {}


NETWORKS = {"cnn": cnn, "lm": lm, "lstm": lambda: recurrent("lstm"),
            "gru": lambda: recurrent("gru")}


def data(name: str, rng: np.random.Generator, n: int = 4) -> np.ndarray:
    if name == "cnn":
        return rng.standard_normal((n, 3, 6, 6)) * 2 + 1
    return rng.integers(0, V, (n, L)) if name in ("lm", "gru") else rng.standard_normal((n, L, IN))


def setup(name: str, backend_name: str, dtype: str = "float64"):
    """(backend, compiled model, torch module, its names option) from a seeded module."""
    torch.manual_seed(0)
    model, net, shapes, kw = NETWORKS[name]()
    with torch.no_grad():  # away from torch's init (biases 0, norms 1): no value a default
        for p in net.parameters():
            p.normal_(0.0, 0.5)
    net = net.to(getattr(torch, dtype))
    backend = BACKENDS[backend_name](dtype=dtype, seed=0)
    return backend, ml.compile(model, backend, shapes=shapes), net, kw.get("names")


def npy(backend, a) -> np.ndarray:
    return np.asarray(backend.to_numpy(a))


def as_input(backend, x: np.ndarray):
    return backend.array(x, backend.int_dtype) if x.dtype.kind == "i" else backend.array(x)


def side_by_side(name: str, backend_name: str) -> dict[str, float]:
    """The largest difference to torch of the logits, every gradient and the running
    statistics after one training-mode pass from the module's own ``state_dict``; then one
    SGD step and the statistics exported back into a fresh module, whose train- and
    eval-mode outputs must equal Mithril's."""
    backend, compiled, net, names = setup(name, backend_name)
    params, state = params_from_torch(compiled, net.state_dict(), names)
    mapping = torch_names(compiled, net, names)
    rng = np.random.default_rng(1)
    x = data(name, rng)
    g = rng.standard_normal({"cnn": (len(x), C), "lm": (len(x), L, V)}.get(name, (len(x), L, C)))
    kw = {"state": state} if state else {}
    out, grads, *rest = compiled.evaluate(params, {"input": as_input(backend, x)},
                                          output_gradients={"logits": backend.array(g)}, **kw)
    y = net(torch.tensor(x))
    (y * torch.tensor(g)).sum().backward()
    theirs = {**dict(net.named_parameters()), **dict(net.named_buffers())}
    assert sorted(mapping.values()) == sorted([*grads, *(rest[0] if rest else {})])
    worst = {"logits": np.abs(npy(backend, out["logits"]) - y.detach().numpy()).max()}
    for t, m in mapping.items():
        if m in grads:
            worst[m] = np.abs(npy(backend, grads[m]) - theirs[t].grad.numpy()).max()
        else:  # BatchNorm's statistics after the pass
            worst[m] = np.abs(npy(backend, rest[0][m]) - theirs[t].numpy()).max()
    # Mithril -> torch: a step, the new statistics, into a fresh module
    params = {k: v - 0.1 * grads[k] for k, v in params.items()}
    state = rest[0] if rest else {}
    fresh = NETWORKS[name]()[1].double()
    exported = params_to_torch(compiled, params, names, like=fresh, state=state)
    assert list(exported) == list(fresh.state_dict())
    fresh.load_state_dict(exported, strict=True)
    x = data(name, rng, 3)
    for training in (False, True):
        kw = {"state": state} if state else {}
        got = compiled.evaluate(params, {"input": as_input(backend, x)}, training=training, **kw)
        got = got[0] if state else got
        fresh.train(training)
        with torch.no_grad():
            want = fresh(torch.tensor(x)).numpy()
        worst[f"exported, training={training}"] = np.abs(npy(backend, got["logits"]) - want).max()
    return {k: float(v) for k, v in worst.items()}


def assert_within(worst: dict[str, float], tol: float) -> None:
    bad = {k: v for k, v in worst.items() if not v <= tol}
    assert not bad, bad


def jax_slow(name: str, backend_name: str) -> object:
    """On JAX the CNN and the transformer are several XLA compiles (seconds of CPU each)."""
    marks = [pytest.mark.slow] if backend_name == "jax" and name in ("cnn", "lm") else []
    return pytest.param(name, backend_name, marks=marks, id=f"{name}-{backend_name}")


@pytest.mark.parametrize(("name", "backend_name"),
                         [jax_slow(n, b) for n in NETWORKS for b in ("numpy", "torch", "jax")])
def test_state_dict_in_gives_torchs_outputs_gradients_and_statistics_and_back(name, backend_name):
    with jax_float64() if backend_name == "jax" else nullcontext():
        assert_within(side_by_side(name, backend_name), 1e-12)


def test_the_pairs_found_are_the_hand_written_ones_of_the_network_review():
    """Independent of this module: the names ``tests/test_review_networks47.py`` wrote by hand
    (a CNN with two BatchNorms, a pre-norm and a post-norm encoder layer, LSTM / GRU
    classifiers) are the pairs found (the two encoder layers by ``names``)."""
    from test_review_networks47 import network

    for name in ("cnn", "lm", "lstm", "gru"):
        model, net, by_hand, _, _, shapes = network(name)
        compiled = ml.compile(model, ml.NumpyBackend(dtype="float64"), shapes=shapes)
        names = {"pre": "transformer_block_0", "post": "transformer_block_1"} if name == "lm" \
            else None
        found = torch_names(compiled, net.double(), names)
        assert {m: t for t, m in found.items() if m in by_hand} == by_hand, name


# -- files ------------------------------------------------------------------------------------
def test_safetensors_bin_sharded_and_hugging_face_folders_load_directly(tmp_path):
    backend, compiled, net, _ = setup("cnn", "numpy")
    sd = net.state_dict()
    want, want_state = params_from_torch(compiled, sd)
    save_file(sd, tmp_path / "cnn.safetensors")
    (tmp_path / "hf").mkdir()
    torch.save(sd, tmp_path / "hf" / "pytorch_model.bin")
    shards = tmp_path / "sharded"
    shards.mkdir()
    keys = list(sd)
    weight_map = {}
    for i, part in enumerate((keys[:5], keys[5:])):
        file = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, shards / file)
        weight_map.update(dict.fromkeys(part, file))
    (shards / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for source in (tmp_path / "cnn.safetensors", str(tmp_path / "cnn.safetensors"),
                   tmp_path / "hf", shards, shards / "model.safetensors.index.json"):
        params, state = params_from_torch(compiled, source)
        assert all(np.array_equal(params[k], want[k]) for k in want), source
        assert all(np.array_equal(state[k], want_state[k]) for k in want_state), source
        assert state["batch_norm2_d_0.num_batches_tracked"].dtype == np.int64
    back = params_to_torch(compiled, want, like=tmp_path / "cnn.safetensors", state=want_state)
    assert set(back) == set(keys) and all(torch.equal(back[k], sd[k]) for k in keys)


def test_a_prefixed_hugging_face_style_file_and_bfloat16_with_cast(tmp_path):
    """Keys under ``model.`` (as a Hugging Face checkpoint's) are mapped by a module path;
    bfloat16 weights need ``cast=True`` and then hold torch's bfloat16 values exactly."""
    backend, compiled, net, _ = setup("gru", "numpy")
    sd = {f"model.{k}": v.to(torch.bfloat16) for k, v in net.state_dict().items()}
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ml.DTypeError, match=r"torch 'model\.rnn\.weight_ih_l0' is bfloat16, "
                       r"Mithril 'gru\.recurrence\.weight_ih' takes float64 \(or cast=True\)"):
        params_from_torch(compiled, tmp_path, {"model": ""})
    params, _ = params_from_torch(compiled, tmp_path, {"model": ""}, cast=True)
    assert np.array_equal(params["gru.recurrence.weight_hh"],
                          sd["model.rnn.weight_hh_l0"].double().numpy())
    assert np.array_equal(params["embedding.weight"], sd["model.emb.weight"].double().numpy())


def test_a_truncated_safetensors_file_is_named(tmp_path):
    backend, compiled, net, _ = setup("cnn", "numpy")
    save_file(net.state_dict(), tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(data[:-40])
    with pytest.raises(CheckpointError, match=r"m\.safetensors'.*tensor '9\.weight' is malformed"):
        params_from_torch(compiled, tmp_path / "m.safetensors")


# -- mismatches: named, and nothing changed -------------------------------------------------------
def test_the_transformer_layers_are_ambiguous_without_names_and_the_message_pairs_them():
    backend, compiled, net, _ = setup("lm", "numpy")
    with pytest.raises(ml.KeyMismatchError, match=r"ambiguous: torch \['encoder\.layers\.0', "
                       r"'encoder\.layers\.1'\] and Mithril \['transformer_block_0', "
                       r"'transformer_block_1'\].*names=, e\.g\. \{'encoder\.layers\.0': "
                       r"'transformer_block_0', 'encoder\.layers\.1': 'transformer_block_1'\}"):
        params_from_torch(compiled, net)
    suggested = {"encoder.layers.0": "transformer_block_0", "encoder.layers.1": "transformer_block_1"}
    one_name = {"encoder.layers.1.norm2.bias": "transformer_block_1.layer_norm_1.bias"}
    by_regex = torch_names(compiled, net, LM_NAMES)
    assert torch_names(compiled, net, suggested) == by_regex
    assert torch_names(compiled, net, one_name) == by_regex  # the rest of the layer follows
    assert torch_names(compiled, net, lambda k: one_name.get(k)) == by_regex
    assert by_regex["encoder.layers.1.self_attn.out_proj.weight"] == \
        "transformer_block_1.multi_head_attention.out_proj_weight"
    assert by_regex["encoder.layers.0.norm2.weight"] == "transformer_block_0.layer_norm_1.weight"


def mismatches(sd: dict) -> list[tuple[str, dict, dict, type, str]]:
    """(label, state_dict, names, error, message) for the CNN's ``sd``."""
    f32 = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    return [
        ("missing", {k: v for k, v in sd.items() if k != "9.bias"}, None, ml.KeyMismatchError,
         r"torch module '9' lacks the entry for Mithril 'linear\.bias' \(5,\)"),
        ("missing buffer", {k: v for k, v in sd.items() if k != "1.running_var"}, None,
         ml.KeyMismatchError, r"lacks the entry for Mithril 'batch_norm2_d_0\.running_var'"),
        ("unexpected", {**sd, "pe": torch.zeros(3)}, None, ml.KeyMismatchError,
         r"unexpected torch key 'pe' \(3,\)"),
        ("shape", {**sd, "9.weight": torch.zeros(C, 9, dtype=torch.float64)}, None,
         ml.ShapeError, r"torch '9\.weight' \(5, 9\) vs Mithril 'linear\.weight' \(5, 8\)"),
        ("dtype", f32, None, ml.DTypeError,
         r"torch '0\.weight' is float32, Mithril 'convolution2_d_0\.weight' takes float64"),
        ("int counter", {**sd, "1.num_batches_tracked": torch.tensor(0.0)}, None, ml.DTypeError,
         r"'1\.num_batches_tracked' is float32, Mithril 'batch_norm2_d_0\.num_batches_tracked' "
         r"takes an integer dtype"),
        ("names typo", sd, {"10": "linear"}, ml.KeyMismatchError,
         r"names \['10'\] match\(es\) no name"),
        ("names target", sd, {"9": "lineer"}, ml.KeyMismatchError,
         r"torch '9' -> 'lineer' \(closest: \['linear'"),
        ("names twice", sd, {"9.weight": "linear.weight", "0.weight": "linear.weight"},
         ml.KeyMismatchError, r"torch '0\.weight' and '9\.weight' both to Mithril 'linear\.weight'"),
        ("names type", sd, 3, TypeError, "names must be a dict"),
        ("bad regex", sd, [("(", "x")], ValueError, "bad regex"),
    ]


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
def test_every_mismatch_is_named_and_changes_nothing(backend_name):
    """Each refused load names the torch key, the Mithril key and both shapes / dtypes; the
    module's tensors and the compiled model's parameters stay as they were. A load that
    succeeds hands out new memory: changing the torch module afterwards changes nothing."""
    backend, compiled, net, _ = setup("cnn", backend_name)
    sd = net.state_dict()
    before = {k: v.clone() for k, v in sd.items()}
    mine = {k: npy(backend, v).copy() for k, v in compiled.get_parameters().items()}
    for label, bad, names, error, message in mismatches(sd):
        with pytest.raises(error, match=message):
            params_from_torch(compiled, bad, names)
        assert all(torch.equal(sd[k], before[k]) for k in sd), label
        assert all(np.array_equal(npy(backend, v), mine[k])
                   for k, v in compiled.get_parameters().items()), label
    params, _ = params_from_torch(compiled, {k: v.float() if v.is_floating_point() else v
                                             for k, v in sd.items()}, cast=True)
    assert np.array_equal(npy(backend, params["linear.weight"]), sd["9.weight"].float().double())
    params, state = params_from_torch(compiled, sd)
    with torch.no_grad():
        for v in net.state_dict().values():
            v.add_(1)
    assert np.array_equal(npy(backend, params["linear.weight"]), before["9.weight"].numpy())
    assert np.array_equal(npy(backend, state["batch_norm2_d_0.running_mean"]),
                          before["1.running_mean"].numpy())


def test_params_to_torch_checks_before_it_converts():
    backend, compiled, net, _ = setup("cnn", "numpy")
    params, state = params_from_torch(compiled, net)
    with pytest.raises(ml.KeyMismatchError, match=r"keeps state \['batch_norm2_d_0\.num_batches_"):
        params_to_torch(compiled, params, like=net)
    with pytest.raises(ml.ShapeError, match=r"'linear\.weight' \(8, 5\) \(the model's: \(5, 8\)\)"):
        params_to_torch(compiled, {**params, "linear.weight": params["linear.weight"].T},
                        like=net, state=state)
    with pytest.raises(ml.KeyMismatchError, match=r"missing Mithril key\(s\) \['linear\.bias'\], "
                       r"unexpected key\(s\) \['linear\.b'\]"):
        params_to_torch(compiled, {**{k: v for k, v in params.items() if k != "linear.bias"},
                                   "linear.b": params["linear.bias"]}, like=net, state=state)
    with pytest.raises(TypeError, match="give like="):
        params_to_torch(compiled, params, state=state)
    every = torch_names(compiled, net)
    out = params_to_torch(compiled, params, every, state=state)  # no like: every name given
    assert set(out) == set(net.state_dict())
    assert all(torch.equal(out[t], net.state_dict()[t]) for t in out)
    assert out["1.num_batches_tracked"].dtype == torch.int64


# -- the other blocks with torch twins -----------------------------------------------------------
def other_blocks() -> dict:
    """{label: (torch module, Mithril block, compile shapes, inputs as (N, …) shapes, torch call)}."""
    lstm_cell = {"input": [2, 3], "prev_hidden": [2, 4], "prev_cell": [2, 4]}
    return {
        "decoder layer": (torch.nn.TransformerDecoderLayer(8, 2, 12, dropout=0.0,
                                                           batch_first=True, norm_first=True),
                          ml.TransformerDecoderBlock(8, 2, 12),
                          {"input": [2, 3, 8], "memory": [2, 4, 8]},
                          lambda m, a: m(a["input"], a["memory"])),
        "attention kdim vdim bias_kv": (
            torch.nn.MultiheadAttention(8, 2, kdim=5, vdim=6, batch_first=True,
                                        add_bias_kv=True),
            ml.MultiHeadAttention(2, embed_dim=8, kdim=5, vdim=6, add_bias_kv=True),
            {"query": [2, 3, 8], "key": [2, 4, 5], "value": [2, 4, 6]},
            lambda m, a: m(a["query"], a["key"], a["value"])[0]),
        "lstm cell": (torch.nn.LSTMCell(3, 4), ml.LSTMCell(4), lstm_cell,
                      lambda m, a: m(a["input"], (a["prev_hidden"], a["prev_cell"]))[0]),
        "gru cell": (torch.nn.GRUCell(3, 4), ml.GRUCell(4),
                     {"input": [2, 3], "prev_hidden": [2, 4]},
                     lambda m, a: m(a["input"], a["prev_hidden"])),
        "transposed conv, groups": (torch.nn.ConvTranspose2d(4, 6, 3, groups=2, stride=2),
                                    ml.ConvTranspose2D(3, 6, groups=2, stride=2),
                                    {"input": [2, 4, 5, 5]}, lambda m, a: m(a["input"])),
    }


@pytest.mark.parametrize("label", list(other_blocks()))
def test_other_blocks_load_with_torchs_layout(label):
    """The decoder layer (``multihead_attn``, ``norm3``), an attention with kdim / vdim
    (``q/k/v_proj_weight``) and ``bias_k`` / ``bias_v``, the cells (torch's ``weight_ih``
    without a layer suffix) and a grouped transposed convolution ((in, out/groups, k, k)):
    forward as torch's from its ``state_dict`` alone, and back."""
    torch.manual_seed(0)
    net, block, shapes, call = other_blocks()[label]
    net = net.double()
    compiled = ml.compile(block, ml.NumpyBackend(dtype="float64"), shapes=shapes)
    params, _ = params_from_torch(compiled, net)
    rng = np.random.default_rng(0)
    inputs = {k: rng.standard_normal(s) for k, s in shapes.items()}
    out = compiled.evaluate(params, inputs)
    with torch.no_grad():
        want = call(net, {k: torch.tensor(v) for k, v in inputs.items()}).numpy()
    assert np.abs(out[compiled.output_keys[0]] - want).max() < 1e-12
    exported = params_to_torch(compiled, params, like=net)
    assert all(torch.equal(exported[k], v) for k, v in net.state_dict().items())


def test_float32_weights_into_float32_models_on_torch_and_jax():
    """The common case, float32 on both sides (JAX's integers are int32 without x64): values
    copied exactly, the BatchNorm counter an integer."""
    for backend_name in ("torch", "jax"):
        backend, compiled, net, _ = setup("cnn", backend_name, "float32")
        net(torch.randn(4, 3, 6, 6))
        params, state = params_from_torch(compiled, net)
        sd = net.state_dict()
        assert np.array_equal(npy(backend, params["convolution2_d_0.weight"]), sd["0.weight"])
        assert np.array_equal(npy(backend, state["batch_norm2_d_1.running_var"]),
                              sd["5.running_var"])
        assert npy(backend, state["batch_norm2_d_0.num_batches_tracked"]) == 1
        assert npy(backend, state["batch_norm2_d_0.num_batches_tracked"]).dtype.kind == "i"


def test_strict_false_loads_a_backbone_and_leaves_the_new_head_to_the_model():
    """As torch's ``load_state_dict(strict=False)``: a backbone's state_dict (the head's
    entries dropped, an extra buffer kept) gives every pairable entry and leaves out the rest;
    a shape that differs or an ambiguity is still an error."""
    backend, compiled, net, _ = setup("cnn", "numpy")
    sd = {k: v for k, v in net.state_dict().items() if not k.startswith("9.")}
    with pytest.raises(ml.KeyMismatchError, match=r"missing Mithril key 'linear\.weight'"):
        params_from_torch(compiled, sd)
    params, state = params_from_torch(compiled, {**sd, "pe": torch.zeros(3)}, strict=False)
    assert set(params) == set(compiled.parameter_shapes) - {"linear.weight", "linear.bias"}
    assert set(state) == set(compiled.state_shapes)
    assert np.array_equal(params["convolution2_d_1.weight"], sd["4.weight"])
    with pytest.raises(ml.ShapeError, match=r"torch '9\.weight' \(5, 9\)"):
        params_from_torch(compiled, {**sd, "9.weight": torch.zeros(5, 9, dtype=torch.float64),
                                     "9.bias": torch.zeros(5, dtype=torch.float64)},
                          strict=False)
    backend, compiled, net, _ = setup("lm", "numpy")
    with pytest.raises(ml.KeyMismatchError, match="ambiguous"):
        params_from_torch(compiled, net, strict=False)
