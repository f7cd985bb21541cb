"""Hugging Face-style checkpoints into Mithril with :mod:`mithril.interop.torch_weights`: a
GPT-2 written by hand as ``transformers`` defines it (``Conv1D``: ``x @ W + b`` with W (in, out),
``c_attn`` packing q, k, v columns, ``gelu_new``, the LM head tied to ``wte``) loads with
``transpose=`` into ``TransformerBlock``s and a head that reuses the embedding's key: logits and
every gradient equal torch's (float64, 1e-12) on NumPy, torch and JAX, and the export goes back
through ``load_state_dict(strict=True)``. A BERT encoder layer's separate query / key / value
``Linear``s stack into ``in_proj`` with ``concat=`` (the same parity). Then tied names, ``params_to_torch(strict=False,
dtype=)``, bfloat16 checkpoints, and refusals that name the key and change nothing (wrong
shapes, duplicate or ambiguous pairings, the wrong architecture, pickles that are not
weights)."""

from __future__ import annotations

import json
import math
import os
import pickle
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from conftest import BACKENDS, jax_float64
from safetensors.torch import save_file, save_model

import mithril as ml
from mithril.errors import CheckpointError
from mithril.interop import params_from_torch, params_to_torch
from mithril.interop.torch_weights import torch_names

V, E, HEADS, P, NL, L = 13, 8, 2, 7, 2, 5  # vocabulary, width, heads, positions, blocks, length
CONV1D = r"transformer\.h\.\d+\.(attn|mlp)\.c_(attn|proj|fc)\.weight"
B = r"transformer\.h\.(\d+)\."
GPT2_NAMES = [(B + "ln_1", r"transformer_block_\1.layer_norm_0"),
              (B + "ln_2", r"transformer_block_\1.layer_norm_1"),
              (B + r"attn\.c_attn\.(weight|bias)",
               r"transformer_block_\1.multi_head_attention.in_proj_\2"),
              (B + r"attn\.c_proj\.(weight|bias)",
               r"transformer_block_\1.multi_head_attention.out_proj_\2"),
              (B + r"mlp\.c_fc", r"transformer_block_\1.linear_0"),
              (B + r"mlp\.c_proj", r"transformer_block_\1.linear_1"),
              (r"transformer\.wte\.weight", "wte")]


# -- GPT-2 as transformers' modeling_gpt2.py defines it (eager attention, no dropout) --------------
class Conv1D(torch.nn.Module):
    """``transformers.pytorch_utils.Conv1D``: a linear layer whose weight is (in, out)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = torch.nn.Parameter(torch.empty(nx, nf).normal_(std=0.02))
        self.bias = torch.nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        out = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight)
        return out.view(x.size()[:-1] + (self.nf,))


def gelu_new(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


class Attention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_attn, self.c_proj = Conv1D(3 * E, E), Conv1D(E, E)
        mask = torch.tril(torch.ones(P, P, dtype=torch.bool)).view(1, 1, P, P)
        self.register_buffer("bias", mask, persistent=False)  # as transformers >= 4.31

    def forward(self, x):
        n, length, _ = x.shape
        q, k, v = (t.view(n, length, HEADS, E // HEADS).transpose(1, 2)
                   for t in self.c_attn(x).split(E, dim=2))
        w = q @ k.transpose(-1, -2) / math.sqrt(E // HEADS)
        w = torch.where(self.bias[:, :, :length, :length], w, torch.finfo(w.dtype).min)
        y = (w.softmax(-1) @ v).transpose(1, 2).reshape(n, length, E)
        return self.c_proj(y)


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_fc, self.c_proj = Conv1D(4 * E, E), Conv1D(E, 4 * E)

    def forward(self, x):
        return self.c_proj(gelu_new(self.c_fc(x)))


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1, self.attn = torch.nn.LayerNorm(E), Attention()
        self.ln_2, self.mlp = torch.nn.LayerNorm(E), MLP()

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte, self.wpe = torch.nn.Embedding(V, E), torch.nn.Embedding(P, E)
        self.h = torch.nn.ModuleList(Block() for _ in range(NL))
        self.ln_f = torch.nn.LayerNorm(E)

    def forward(self, ids):
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[-1]))
        for block in self.h:
            x = block(x)
        return self.ln_f(x)


class GPT2LMHeadModel(torch.nn.Module):
    def __init__(self, tie: bool = True) -> None:
        super().__init__()
        self.transformer = GPT2Model()
        self.lm_head = torch.nn.Linear(E, V, bias=False)
        if tie:  # transformers' tie_weights: one Parameter under both names
            self.lm_head.weight = self.transformer.wte.weight

    def forward(self, ids):
        return self.lm_head(self.transformer(ids))


def gpt2_torch(tie: bool = True) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    net = GPT2LMHeadModel(tie)
    with torch.no_grad():  # away from the init (biases 0, norms 1): no value a default
        for p in net.parameters():
            p.normal_(0.0, 0.5)
    return net.double()


def wire(name: str) -> ml.IOKey:
    return ml.IOKey(name, expose=False)


def gpt2_mithril(tie: bool = True, head: bool = True) -> ml.Model:
    """The same network from Mithril blocks; ``tie``: the head's ``weight`` is the embedding's
    key ``wte`` (one parameter), else a Linear of its own."""
    m = ml.Model()
    m |= ml.Embedding(V, E)(input="input", weight="wte", output=wire("tokens"))
    m |= ml.PositionalEmbedding(P, E)(input="tokens", output=wire("x0"))
    for i in range(NL):
        m |= ml.TransformerBlock(E, HEADS, 4 * E, activation=ml.Gelu(approximate=True),
                                 is_causal=True)(input=f"x{i}", output=wire(f"x{i + 1}"))
    m |= ml.LayerNorm()(input=f"x{NL}", output="final" if not head else wire("final"))
    if head:
        head_kw = {"weight": "wte"} if tie else {}
        m |= ml.Linear(V, use_bias=False)(input="final", output="logits", **head_kw)
    return m


def compiled_gpt2(backend_name: str = "numpy", dtype: str = "float64", **kw):
    backend = BACKENDS[backend_name](dtype=dtype, seed=0)
    return backend, ml.compile(gpt2_mithril(**kw), backend, shapes={"input": [None, L]})


def npy(backend, a) -> np.ndarray:
    return np.asarray(backend.to_numpy(a))


def side_by_side(backend_name: str) -> dict[str, float]:
    backend, compiled = compiled_gpt2(backend_name)
    net = gpt2_torch()
    params, state = params_from_torch(compiled, net.state_dict(), GPT2_NAMES, transpose=CONV1D)
    assert state == {} and set(params) == set(compiled.parameter_shapes)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, V, (3, L))
    g = rng.standard_normal((3, L, V))
    out, grads = compiled.evaluate(params, {"input": backend.array(ids, backend.int_dtype)},
                                   output_gradients={"logits": backend.array(g)})
    y = net(torch.tensor(ids))
    (y * torch.tensor(g)).sum().backward()
    worst = {"logits": np.abs(npy(backend, out["logits"]) - y.detach().numpy()).max()}
    mapping = torch_names(compiled, net, GPT2_NAMES, transpose=CONV1D)
    assert mapping["lm_head.weight"] == mapping["transformer.wte.weight"] == "wte"
    for t, p in net.named_parameters():  # the tied one once: its grad holds both uses
        want = p.grad.numpy()
        want = want.T if "c_" in t and t.endswith("weight") else want
        worst[mapping[t]] = np.abs(npy(backend, grads[mapping[t]]) - want).max()
    # a step in Mithril, back into a fresh torch module (strict), equal outputs
    params = {k: v - 0.1 * grads[k] for k, v in params.items()}
    fresh = gpt2_torch()
    exported = params_to_torch(compiled, params, GPT2_NAMES, like=fresh, transpose=CONV1D)
    assert list(exported) == list(fresh.state_dict())
    assert torch.equal(exported["lm_head.weight"], exported["transformer.wte.weight"])
    assert all(t.is_contiguous() for t in exported.values())  # safetensors needs it
    fresh.load_state_dict(exported, strict=True)
    ids = rng.integers(0, V, (2, L))
    got = compiled.evaluate(params, {"input": backend.array(ids, backend.int_dtype)})
    with torch.no_grad():
        worst["exported"] = np.abs(npy(backend, got["logits"]) - fresh(torch.tensor(ids)).numpy()
                                   ).max()
    return {k: float(v) for k, v in worst.items()}


@pytest.mark.parametrize("backend_name", ["numpy", "torch", "jax"])
def test_gpt2_conv1d_weights_load_transposed_into_transformer_blocks_with_the_tied_head(
        backend_name):
    with jax_float64() if backend_name == "jax" else nullcontext():
        worst = side_by_side(backend_name)
    assert len(worst) == 2 + len(compiled_gpt2()[1].parameter_shapes)
    bad = {k: v for k, v in worst.items() if not v <= 1e-12}
    assert not bad, bad


def test_without_transpose_the_conv1d_shapes_are_named_with_the_hint():
    backend, compiled = compiled_gpt2()
    net = gpt2_torch()
    with pytest.raises(ml.ShapeError, match=r"torch 'transformer\.h\.0\.attn\.c_attn\.weight' "
                       r"\(8, 24\) vs Mithril 'transformer_block_0\.multi_head_attention\."
                       r"in_proj_weight' \(24, 8\).*takes transpose="):
        params_from_torch(compiled, net, GPT2_NAMES)
    with pytest.raises(ml.KeyMismatchError, match=r"transpose \['.*c_atn.*'\] match\(es\) no "
                       r"name"):
        params_from_torch(compiled, net, GPT2_NAMES, transpose=[CONV1D, r".*c_atn\.weight"])
    with pytest.raises(ml.ShapeError, match=r"transpose matches 'transformer\.h\.0\.attn\.c_attn"
                       r"\.bias' \(24,\).*rank >= 2"):
        params_from_torch(compiled, net, GPT2_NAMES, transpose=r".*\.c_attn\..*")
    with pytest.raises(TypeError, match="transpose must be a regex"):
        params_from_torch(compiled, net, GPT2_NAMES, transpose=3)
    # a square Conv1D (c_proj, E x E) is what a wrong transpose cannot catch by shape:
    # the callable form picks names exactly
    picked = params_from_torch(compiled, net, GPT2_NAMES,
                               transpose=lambda k: k.endswith(("c_attn.weight", "c_fc.weight",
                                                               "c_proj.weight"))).params
    assert np.array_equal(picked["transformer_block_1.multi_head_attention.out_proj_weight"],
                          net.transformer.h[1].attn.c_proj.weight.detach().numpy().T)


# -- tied weights -----------------------------------------------------------------------------
def test_a_tied_state_dict_loads_into_an_untied_model_and_an_untied_one_is_refused_when_tied():
    """torch ties (one Parameter, both names in the state_dict); a Mithril model with a head of
    its own takes the tensor twice. torch untied into a Mithril model that ties: two
    different tensors for one parameter, refused by name."""
    net = gpt2_torch()
    backend, untied = compiled_gpt2(tie=False)
    params = params_from_torch(untied, net, GPT2_NAMES, transpose=CONV1D).params
    assert np.array_equal(params["linear.weight"], params["wte"])
    assert not np.shares_memory(params["linear.weight"], params["wte"])
    loose = gpt2_torch(tie=False)
    backend, compiled = compiled_gpt2()
    with pytest.raises(ml.KeyMismatchError, match=r"unexpected torch key 'lm_head\.weight'"):
        params_from_torch(compiled, loose, GPT2_NAMES, transpose=CONV1D)
    with pytest.raises(ml.KeyMismatchError, match=r"names map torch 'transformer\.wte\.weight' "
                       r"and 'lm_head\.weight' both to Mithril 'wte' \(two tensors"):
        params_from_torch(compiled, loose, [*GPT2_NAMES, ("lm_head.weight", "wte")],
                          transpose=CONV1D)


def test_tied_checkpoint_files_a_bin_keeps_the_tie_and_safetensors_save_model_drops_one(tmp_path):
    """``torch.save`` keeps one storage for both names (``weights_only`` load too);
    ``save_pretrained`` writes the tensor once (GPT-2's ``_tied_weights_keys``: the head's
    name is dropped), which the tied model does not need; ``safetensors.torch.save_model``
    keeps one name of its own choosing: the names rule for the other is named unused."""
    net = gpt2_torch()
    backend, compiled = compiled_gpt2()
    want = params_from_torch(compiled, net, GPT2_NAMES, transpose=CONV1D).params
    torch.save(net.state_dict(), tmp_path / "pytorch_model.bin")
    save_file({k: v for k, v in net.state_dict().items() if k != "lm_head.weight"},
              tmp_path / "model.safetensors")
    save_model(net, tmp_path / "chosen.safetensors")
    with pytest.raises(ml.KeyMismatchError, match=r"names \['transformer\\\\.wte\\\\.weight'\] "
                       r"match\(es\) no name"):
        params_from_torch(compiled, tmp_path / "chosen.safetensors", GPT2_NAMES, transpose=CONV1D)
    for source in (tmp_path / "pytorch_model.bin", tmp_path / "model.safetensors"):
        got = params_from_torch(compiled, source, GPT2_NAMES, transpose=CONV1D).params
        assert all(np.array_equal(got[k], want[k]) for k in want), source
    back = params_to_torch(compiled, want, GPT2_NAMES, like=tmp_path / "model.safetensors",
                           transpose=CONV1D)
    assert "lm_head.weight" not in back
    save_file(back, tmp_path / "again.safetensors")  # contiguous, unshared: save_file takes it
    fresh = gpt2_torch(tie=True)
    assert fresh.load_state_dict(back, strict=False).missing_keys == ["lm_head.weight"]
    assert torch.equal(fresh.lm_head.weight, net.lm_head.weight)  # tied: wte set both


def test_exporting_two_different_parameters_into_one_tied_torch_tensor_is_refused():
    """Mithril's untied head trained apart from the embedding: torch's ``load_state_dict`` into
    the tied module would copy both into the one tensor and keep the last, silently."""
    net = gpt2_torch()
    backend, untied = compiled_gpt2(tie=False)
    params = params_from_torch(untied, net, GPT2_NAMES, transpose=CONV1D).params
    same = params_to_torch(untied, params, GPT2_NAMES, like=net, transpose=CONV1D)
    gpt2_torch().load_state_dict(same, strict=True)  # equal values: fine
    params["linear.weight"] = params["linear.weight"] + 1.0
    with pytest.raises(ml.KeyMismatchError, match=r"'transformer\.wte\.weight' and "
                       r"'lm_head\.weight' are one tensor.*Mithril 'wte' and "
                       r"'linear\.weight' differ"):
        params_to_torch(untied, params, GPT2_NAMES, like=net, transpose=CONV1D)
    params_to_torch(untied, params, GPT2_NAMES, like=gpt2_torch(tie=False),
                    transpose=CONV1D)


# -- params_to_torch(strict=False, dtype=), bfloat16 -------------------------------------------------
class GPT2ForSequenceClassification(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.transformer = GPT2Model()
        self.score = torch.nn.Linear(E, 3, bias=False)


def test_export_strict_false_leaves_out_the_entries_with_no_pair():
    """A Mithril backbone (no head) into a torch classifier: strict names the head's entry;
    strict=False leaves it out, as ``load_state_dict(strict=False)`` then reports it. The
    other way, a Mithril head the torch module lacks is left out too."""
    backend, backbone = compiled_gpt2(head=False)
    net = gpt2_torch()
    params = params_from_torch(backbone, net, GPT2_NAMES, transpose=CONV1D).params  # lm_head
    assert set(params) == set(backbone.parameter_shapes)  # follows wte: nothing left over
    target = GPT2ForSequenceClassification().double()
    with pytest.raises(ml.KeyMismatchError, match=r"unexpected torch key 'score\.weight' \(3, 8\)"):
        params_to_torch(backbone, params, GPT2_NAMES, like=target, transpose=CONV1D)
    out = params_to_torch(backbone, params, GPT2_NAMES, like=target, transpose=CONV1D,
                          strict=False)
    assert "score.weight" not in out and len(out) == len(target.state_dict()) - 1
    result = target.load_state_dict(out, strict=False)
    assert result.missing_keys == ["score.weight"] and result.unexpected_keys == []
    assert torch.equal(target.transformer.h[1].mlp.c_fc.weight, net.transformer.h[1].mlp.c_fc.weight)
    backend, full = compiled_gpt2(tie=False)
    params = params_from_torch(full, net, GPT2_NAMES, transpose=CONV1D).params
    lm = {f"transformer.{k}": v for k, v in net.transformer.state_dict().items()}
    out = params_to_torch(full, params, GPT2_NAMES, like=lm, transpose=CONV1D, strict=False)
    assert set(out) == set(lm)
    with pytest.raises(ml.KeyMismatchError, match=r"missing Mithril key 'linear\.weight'"):
        params_to_torch(full, params, GPT2_NAMES, like=lm, transpose=CONV1D)


def test_export_in_a_chosen_dtype_casts_floats_as_torch_and_keeps_counters_integers():
    from test_torch_weights import setup

    backend, compiled = compiled_gpt2()
    net = gpt2_torch()
    params = params_from_torch(compiled, net, GPT2_NAMES, transpose=CONV1D).params
    full = params_to_torch(compiled, params, GPT2_NAMES, like=net, transpose=CONV1D)
    for dtype in ("bfloat16", torch.float32, "torch.float16"):
        out = params_to_torch(compiled, params, GPT2_NAMES, like=net, transpose=CONV1D,
                              dtype=dtype)
        want = getattr(torch, dtype.removeprefix("torch.")) if isinstance(dtype, str) else dtype
        assert all(t.dtype == want and torch.equal(t, full[k].to(want)) for k, t in out.items())
    for bad in ("int32", "bfloat", torch.int64, np.float32):
        with pytest.raises(TypeError, match="dtype must be a torch floating dtype"):
            params_to_torch(compiled, params, GPT2_NAMES, like=net, transpose=CONV1D, dtype=bad)
    backend, cnn, net, _ = setup("cnn", "numpy")
    params, state = params_from_torch(cnn, net)
    out = params_to_torch(cnn, params, like=net, state=state, dtype="bfloat16")
    assert out["1.num_batches_tracked"].dtype == torch.int64
    assert out["1.running_var"].dtype == torch.bfloat16


@pytest.mark.parametrize("backend_name", ["numpy", "torch", "jax"])
def test_a_bfloat16_checkpoint_into_a_bfloat16_model_exactly_and_back(backend_name, tmp_path):
    """bfloat16 tensors (a module's, or a safetensors file's raw bits) into a bfloat16 model
    need no cast and keep every bit; the export gives them back bit for bit. A float32 model
    takes them with cast=True only."""
    net = gpt2_torch().to(torch.bfloat16)
    sd = net.state_dict()
    save_file({k: v for k, v in sd.items() if k != "lm_head.weight"}, tmp_path / "m.safetensors")
    backend, compiled = compiled_gpt2(backend_name, "bfloat16")
    for source in (net, tmp_path / "m.safetensors"):
        params = params_from_torch(compiled, source, GPT2_NAMES, transpose=CONV1D).params
        got = params["transformer_block_0.multi_head_attention.in_proj_weight"]
        assert "bfloat16" in str(got.dtype)
        got = npy(backend, got)
        assert np.array_equal(got.astype(np.float32),
                              sd["transformer.h.0.attn.c_attn.weight"].float().numpy().T)
        back = params_to_torch(compiled, params, GPT2_NAMES, like=net, transpose=CONV1D)
        assert all(back[k].dtype == torch.bfloat16 and torch.equal(back[k], v)
                   for k, v in sd.items()), source
    backend, f32 = compiled_gpt2(backend_name, "float32")
    with pytest.raises(ml.DTypeError, match=r"torch 'transformer\.wte\.weight' is bfloat16, "
                       r"Mithril 'wte' takes float32 \(or cast=True\)"):
        params_from_torch(f32, net, GPT2_NAMES, transpose=CONV1D)
    params = params_from_torch(f32, net, GPT2_NAMES, transpose=CONV1D, cast=True).params
    assert np.array_equal(npy(backend, params["wte"]), sd["transformer.wte.weight"].float())


# -- refusals: named, and nothing changed ------------------------------------------------------------
class Evil:
    """A pickle that runs a command when unpickled."""

    def __init__(self, mark: str) -> None:
        self.mark = mark

    def __reduce__(self):
        return os.system, (f"touch {self.mark}",)


def refusals(net: torch.nn.Module, tmp_path) -> list[tuple[str, object, dict, type, str]]:
    """(label, source, options, error, message) for the GPT-2 model."""
    sd = net.state_dict()
    mark = tmp_path / "pwned"
    torch.save({**sd, "evil": Evil(str(mark))}, tmp_path / "evil.bin")
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump(Evil(str(mark)), f)
    with open(tmp_path / "plain.pt", "wb") as f:  # a pickle, not torch.save's archive
        pickle.dump(dict(sd), f)
    torch.save(net, tmp_path / "module.pt")
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "lightning.ckpt")
    (tmp_path / "fake.safetensors").write_bytes((tmp_path / "evil.bin").read_bytes())
    ok = {"names": GPT2_NAMES, "transpose": CONV1D}
    c_fc = "transformer.h.1.mlp.c_fc.weight"
    return [
        ("pickled code", tmp_path / "evil.bin", ok, CheckpointError,
         r"evil\.bin' holds Python objects besides tensors \(.*GLOBAL posix\.system.*never "
         r"unpickled"),
        ("a bare pickle of code", tmp_path / "evil.pt", ok, CheckpointError, r"evil\.pt' holds"),
        ("a plain pickle", tmp_path / "plain.pt", ok, CheckpointError, r"plain\.pt' holds"),
        ("a whole module", tmp_path / "module.pt", ok, CheckpointError,
         r"module\.pt' holds .*GPT2LMHeadModel"),
        ("a training checkpoint", tmp_path / "lightning.ckpt", ok, CheckpointError,
         r"does not hold a state_dict .* pick the state_dict out"),
        ("a pickle named .safetensors", tmp_path / "fake.safetensors", ok, CheckpointError,
         "is not a safetensors file"),
        ("an object in a dict", {**sd, "x": Evil(str(mark))}, ok, TypeError,
         r"entries must be tensors or numeric arrays, got 'x' \(ndarray of object\)"),
        ("a wrong shape", {**sd, c_fc: sd[c_fc][:, :-1]}, ok, ml.ShapeError,
         rf"torch '{c_fc}' \(31, 8\) \(transposed\) vs Mithril 'transformer_block_1\.linear_0"
         r"\.weight' \(32, 8\)"),
        ("two module paths to one", net, {**ok, "names": dict.fromkeys(
            ["transformer.h.0.ln_1", "transformer.h.1.ln_1"], "transformer_block_0.layer_norm_0")},
         ml.KeyMismatchError, r"names map torch module paths 'transformer\.h\.0\.ln_1' and "
         r"'transformer\.h\.1\.ln_1' both to Mithril 'transformer_block_0\.layer_norm_0'"),
        ("two tensors to one", net, {**ok, "names": [*GPT2_NAMES, (
            r"transformer\.wpe\.weight", "transformer_block_0.linear_1.weight")]},
         ml.KeyMismatchError, r"'transformer\.wpe\.weight'.*both to Mithril"),
        ("ambiguous", net, {"transpose": CONV1D}, ml.KeyMismatchError,
         r"ambiguous: torch \['transformer\.h\.0\.ln_1', .*'transformer\.ln_f'\] and Mithril "
         r"\['layer_norm'\]"),
        ("another architecture", GPT2ForSequenceClassification().double(), ok,
         ml.KeyMismatchError, r"unexpected torch key 'score\.weight' \(3, 8\)"),
        ("a wrong shape, strict=False", torch.nn.Conv2d(3, 4, 3).double(), {"strict": False},
         ml.ShapeError, r"torch 'weight' \(4, 3, 3, 3\) vs Mithril 'layer_norm\.weight' \(8,\)"),
        ("another architecture, strict=False", torch.nn.BatchNorm1d(4).double(),
         {"strict": False}, ml.KeyMismatchError, r"unexpected torch key 'running_mean' \(4,\)"
         r".*no entry pairs: a state_dict of another model\?"),
    ]


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
def test_every_refusal_is_named_runs_no_pickled_code_and_changes_nothing(backend_name, tmp_path):
    backend, compiled = compiled_gpt2(backend_name)
    net = gpt2_torch()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    mine = {k: npy(backend, v).copy() for k, v in compiled.get_parameters().items()}
    for label, source, options, error, message in refusals(net, tmp_path):
        with pytest.raises(error, match=message):
            params_from_torch(compiled, source, **options)
        assert not (tmp_path / "pwned").exists(), label
        assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items()), label
        assert all(np.array_equal(npy(backend, v), mine[k])
                   for k, v in compiled.get_parameters().items()), label
    params = params_from_torch(compiled, net, GPT2_NAMES, transpose=CONV1D).params
    with torch.no_grad():
        net.transformer.wte.weight.add_(1)  # new memory: the load does not move with torch
    assert np.array_equal(npy(backend, params["wte"]), before["transformer.wte.weight"])


def test_an_npz_of_arrays_loads_and_one_holding_objects_is_refused(tmp_path):
    backend, compiled = compiled_gpt2()
    net = gpt2_torch()
    arrays = {k: v.numpy() for k, v in net.state_dict().items() if k != "lm_head.weight"}
    np.savez(tmp_path / "w.npz", **arrays)
    params = params_from_torch(compiled, tmp_path / "w.npz", GPT2_NAMES, transpose=CONV1D).params
    assert np.array_equal(params["transformer_block_0.linear_1.weight"],
                          arrays["transformer.h.0.mlp.c_proj.weight"].T)
    np.savez(tmp_path / "o.npz", x=np.array([Evil(str(tmp_path / "pwned"))], dtype=object))
    with pytest.raises(CheckpointError, match=r"o\.npz' as an \.npz of arrays"):
        params_from_torch(compiled, tmp_path / "o.npz")
    assert not (tmp_path / "pwned").exists()


def test_an_older_gpt2_file_with_mask_buffers_loads_with_ignore_and_still_checks_the_rest(
        tmp_path):
    """The hub's first GPT-2 files hold ``GPT2Model``'s names (no ``transformer.`` prefix, no
    head: tied) and each block's causal mask buffers ``attn.bias`` (1, 1, P, P) and
    ``attn.masked_bias``, which ``transformers`` ignores on load. ``ignore=`` drops them by
    regex; unlike strict=False a missing weight is still named."""
    net = gpt2_torch()
    sd = {k.removeprefix("transformer."): v for k, v in net.state_dict().items()
          if k != "lm_head.weight"}
    for i in range(NL):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(P, P)).view(1, 1, P, P)
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    names = [(a.replace(r"transformer\.", ""), b) for a, b in GPT2_NAMES]
    conv1d, masks = CONV1D.replace(r"transformer\.", ""), r"h\.\d+\.attn\.(masked_)?bias"
    backend, compiled = compiled_gpt2()
    with pytest.raises(ml.KeyMismatchError, match=r"unexpected torch key 'h\.0\.attn\.bias' "
                       r"\(1, 1, 7, 7\)"):
        params_from_torch(compiled, tmp_path, names, transpose=conv1d)
    got = params_from_torch(compiled, tmp_path, names, transpose=conv1d, ignore=masks).params
    want = params_from_torch(compiled, net, GPT2_NAMES, transpose=CONV1D).params
    assert all(np.array_equal(got[k], want[k]) for k in want)
    with pytest.raises(ml.KeyMismatchError, match=r"ignore \['h\\\\\.\\\\d\+\\\\\.mask'\] match"):
        params_from_torch(compiled, tmp_path, names, transpose=conv1d, ignore=[r"h\.\d+\.mask"])
    del sd["wpe.weight"]
    with pytest.raises(ml.KeyMismatchError, match=r"missing Mithril key 'positional_embedding\."
                       r"weight' \(7, 8\)"):
        params_from_torch(compiled, sd, names, transpose=conv1d, ignore=masks)
    back = params_to_torch(compiled, got, names, like=tmp_path, transpose=conv1d, ignore=masks)
    assert list(back) == list(net.transformer.state_dict())  # the masks left out
    net.transformer.load_state_dict(back, strict=True)  # (non-persistent buffers today)


def test_export_by_the_names_that_torch_names_gives_covers_both_tied_names():
    """Without like=, the names dict of a tied model holds one Mithril name twice (it was
    refused: 'give like=')."""
    net = gpt2_torch()
    backend, compiled = compiled_gpt2()
    params = params_from_torch(compiled, net, GPT2_NAMES, transpose=CONV1D).params
    every = torch_names(compiled, net, GPT2_NAMES, transpose=CONV1D)
    assert len(every) == len(compiled.parameter_shapes) + 1
    out = params_to_torch(compiled, params, every, transpose=CONV1D)
    assert set(out) == set(net.state_dict())
    fresh = gpt2_torch(tie=True)
    fresh.load_state_dict(out, strict=True)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in fresh.state_dict().items())
    with pytest.raises(TypeError, match="give like="):  # a Mithril name left out: still refused
        params_to_torch(compiled, params, {k: v for k, v in every.items() if v != "wte"})


# -- BERT: query / key / value Linears stacked into in_proj with concat= ------------------------------
FF = 12
LAYER = r"encoder\.layer\.(\d+)\."
BERT_NAMES = [(LAYER + r"attention\.output\.dense\.(weight|bias)",
               r"transformer_block_\1.multi_head_attention.out_proj_\2"),
              (LAYER + r"attention\.output\.LayerNorm", r"transformer_block_\1.layer_norm_0"),
              (LAYER + r"intermediate\.dense", r"transformer_block_\1.linear_0"),
              (LAYER + r"output\.dense", r"transformer_block_\1.linear_1"),
              (LAYER + r"output\.LayerNorm", r"transformer_block_\1.layer_norm_1")]
BERT_CONCAT = {f"transformer_block_{i}.multi_head_attention.in_proj_{w}":
               [f"encoder.layer.{i}.attention.self.{p}.{w}" for p in ("query", "key", "value")]
               for i in range(NL) for w in ("weight", "bias")}


class BertLayer(torch.nn.Module):
    """``transformers``' BertLayer (eager attention, no mask, no dropout), its modules named
    as there: post-norm, exact GELU, LayerNorm eps 1e-12."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = torch.nn.Module()
        self.attention.self = torch.nn.Module()
        for p in ("query", "key", "value"):
            setattr(self.attention.self, p, torch.nn.Linear(E, E))
        self.attention.output = torch.nn.Module()
        self.attention.output.dense = torch.nn.Linear(E, E)
        self.attention.output.LayerNorm = torch.nn.LayerNorm(E, eps=1e-12)
        self.intermediate = torch.nn.Module()
        self.intermediate.dense = torch.nn.Linear(E, FF)
        self.output = torch.nn.Module()
        self.output.dense = torch.nn.Linear(FF, E)
        self.output.LayerNorm = torch.nn.LayerNorm(E, eps=1e-12)

    def forward(self, x):
        n, length, _ = x.shape
        a = self.attention.self
        q, k, v = (f(x).view(n, length, HEADS, E // HEADS).transpose(1, 2)
                   for f in (a.query, a.key, a.value))
        w = (q @ k.transpose(-1, -2) / math.sqrt(E // HEADS)).softmax(-1)
        y = (w @ v).transpose(1, 2).reshape(n, length, E)
        h = self.attention.output.LayerNorm(self.attention.output.dense(y) + x)
        f = self.output.dense(torch.nn.functional.gelu(self.intermediate.dense(h)))
        return self.output.LayerNorm(f + h)


class BertEncoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Module()
        self.encoder.layer = torch.nn.ModuleList(BertLayer() for _ in range(NL))

    def forward(self, x):
        for layer in self.encoder.layer:
            x = layer(x)
        return x


def bert_torch() -> BertEncoder:
    torch.manual_seed(0)
    net = BertEncoder()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.5)
    return net.double()


def bert_mithril(backend_name: str):
    m = ml.Model()
    for i in range(NL):
        m |= ml.TransformerBlock(E, HEADS, FF, activation="gelu", eps=1e-12, norm_first=False)(
            input="input" if i == 0 else f"x{i}",
            output="output" if i == NL - 1 else wire(f"x{i + 1}"))
    backend = BACKENDS[backend_name](dtype="float64", seed=0)
    return backend, ml.compile(m, backend, shapes={"input": [None, L, E]})


@pytest.mark.parametrize("backend_name", ["numpy", "torch", "jax"])
def test_bert_query_key_value_stack_into_in_proj_and_split_back(backend_name):
    with jax_float64() if backend_name == "jax" else nullcontext():
        backend, compiled = bert_mithril(backend_name)
        net = bert_torch()
        params = params_from_torch(compiled, net, BERT_NAMES, concat=BERT_CONCAT).params
        rng = np.random.default_rng(2)
        x, g = rng.standard_normal((3, L, E)), rng.standard_normal((3, L, E))
        out, grads = compiled.evaluate(params, {"input": backend.array(x)},
                                       output_gradients={"output": backend.array(g)})
        xt = torch.tensor(x)
        (net(xt) * torch.tensor(g)).sum().backward()
        worst = {"output": np.abs(npy(backend, out["output"]) - net(xt).detach().numpy()).max()}
        theirs = dict(net.named_parameters())
        mapping = torch_names(compiled, net, BERT_NAMES, concat=BERT_CONCAT)
        assert len(mapping) == len(params) == len(compiled.parameter_shapes)
        for t, m in mapping.items():
            want = torch.cat([theirs[k].grad for k in t.split("+")]).numpy()
            worst[m] = np.abs(npy(backend, grads[m]) - want).max()
        assert not {k: v for k, v in worst.items() if not v <= 1e-12}, worst
        params = {k: v - 0.1 * grads[k] for k, v in params.items()}
        fresh = bert_torch()
        back = params_to_torch(compiled, params, BERT_NAMES, like=fresh, concat=BERT_CONCAT)
        assert list(back) == list(fresh.state_dict())
        fresh.load_state_dict(back, strict=True)
        got = npy(backend, compiled.evaluate(params, {"input": backend.array(x)})["output"])
        with torch.no_grad():
            assert np.abs(got - fresh(xt).numpy()).max() <= 1e-12


def test_concat_refusals_name_the_entries():
    backend, compiled = bert_mithril("numpy")
    net = bert_torch()
    sd = net.state_dict()
    q = "encoder.layer.0.attention.self.query.weight"
    block = "transformer_block_0.multi_head_attention.in_proj_weight"
    cases = [
        ({**BERT_CONCAT, block: [q.replace("query", "qeury"), *BERT_CONCAT[block][1:]]}, sd,
         ml.KeyMismatchError, r"concat\['transformer_block_0\.multi_head_attention\.in_proj_"
         r"weight'\] names torch 'encoder\.layer\.0\.attention\.self\.qeury\.weight', which the "
         r"state_dict lacks \(closest: \['encoder\.layer\.0\.attention\.self\.query\.weight'"),
        ({**BERT_CONCAT, "transformer_block_1.multi_head_attention.in_proj_weight":
          [q, q.replace("query", "key")]}, sd, ml.KeyMismatchError,
         rf"concat puts torch '{q}' into both"),
        (BERT_CONCAT, {**sd, q: sd[q][:, :-1]}, ml.ShapeError,
         rf"stacks rows .* got '{q}' \(8, 7\) float64"),
        (BERT_CONCAT, {**sd, q: sd[q].float()}, ml.DTypeError, rf"'{q}' \(8, 8\) float32"),
        ({**{k: v for k, v in BERT_CONCAT.items() if k != block},
          "transformer_block_0.attention.in_proj_weight": BERT_CONCAT[block]}, sd,
         ml.KeyMismatchError, r"into Mithril 'transformer_block_0\.attention\.in_proj_weight'"
         r": the model lacks it \(closest: \['transformer_block_0\.multi_head_attention\.in_"),
        ({block: [q]}, sd, TypeError, "two or more torch names"),
    ]
    before = {k: v.clone() for k, v in sd.items()}
    for concat, source, error, message in cases:
        with pytest.raises(error, match=message):
            params_from_torch(compiled, source, BERT_NAMES, concat=concat)
        assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    params = compiled.get_parameters()
    with pytest.raises(TypeError, match="concat needs like="):
        params_to_torch(compiled, params, torch_names(compiled, net, BERT_NAMES,
                                                      concat=BERT_CONCAT), concat=BERT_CONCAT)


@pytest.mark.parametrize(("header", "message"), [
    (b"[1, 2]", r"is not a safetensors file: the header is a JSON list, not an object"),
    (b'"x"', r"the header is a JSON str"),
    (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}',
     r"tensor 'a' is malformed: .*bytes -8\.\.0 do not hold \(2,\) of F32"),
    (b'{"a": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}',
     r"tensor 'a' is malformed: .*dtype F8_E4M3 is not one of \['BF16', "),
])
def test_a_malformed_safetensors_header_is_named_not_a_bare_python_error(header, message,
                                                                         tmp_path):
    """A header that is JSON but not an object was an AttributeError from inside the reader."""
    path = tmp_path / "bad.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    backend, compiled = compiled_gpt2()
    with pytest.raises(CheckpointError, match=r"bad\.safetensors'.*" + message):
        params_from_torch(compiled, path)


@pytest.mark.parametrize("weight_map", [["model.safetensors"], {"wte.weight": "../m.safetensors"},
                                        {"wte.weight": 3}])
def test_a_sharded_index_must_name_shard_files_beside_it(weight_map, tmp_path):
    """A list was a bare AttributeError; a shard outside the index's folder was read."""
    net = gpt2_torch()
    save_file({"wte.weight": net.state_dict()["transformer.wte.weight"]}, tmp_path / "m.safetensors")
    (tmp_path / "sub").mkdir()
    index = tmp_path / "sub" / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    backend, compiled = compiled_gpt2()
    with pytest.raises(CheckpointError, match=r"is not a sharded checkpoint's index .*'weight_map' "
                       r"must map names to shard files in its folder"):
        params_from_torch(compiled, index, strict=False)
