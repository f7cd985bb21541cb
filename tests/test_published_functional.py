"""The published Mithril's functional API: a block's call is a connection (its output) and
``Model.create`` collects the calls an output reaches. The published nanoGPT
(``examples/gpt/functional_model.py``) runs verbatim on NumPy, torch and JAX in float64, its
output and every gradient against torch.nn.functional with the same weights; its parameter
names are the class-based example's. Then the published rules (tests/scripts/
test_immediate_extend.py) one by one against the same model built with ``|=``, the old
styles still working, and bad input refused with nothing changed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import evaluate_np, jax_float64

import mithril as ml
from mithril.models import (
    Add,
    Buffer,
    Gelu,
    IOKey,
    Linear,
    Model,
    Multiply,
    Relu,
    Split,
)
from mithril.models.primitives import Power

BACKENDS = {"numpy": ml.NumpyBackend, "torch": ml.TorchBackend, "jax": ml.JaxBackend}
F64 = dict(rtol=0, atol=1e-12)

# synnada-ai/mithril examples/gpt/functional_model.py, verbatim but for its license header
GPT_SRC = '''
"""
This example is equivalent of nanoGPT by karpathy.
Torch implementation of nanoGPT: https://github.com/karpathy/nanoGPT
"""

from mithril import IOKey
from mithril.models import (
    Add,
    Arange,
    Embedding,
    Gelu,
    LayerNorm,
    Linear,
    Model,
    ScaledDotProduct,
    Size,
    Split,
)


# Create self causal attention model.
def causal_attention(input_dim, num_heads, bias=True):
    if (input_dim % num_heads) != 0:
        raise ValueError("Requires input dims to be divisible by num_heads")

    input = IOKey("input")
    lin_out = Linear(input_dim * 3, name="c_attn")(input=input)

    t_axes = (0, 2, 1, 3)
    shp_con = input.shape
    reshape_con = (shp_con[0], shp_con[1], num_heads, -1)

    split_out = Split(3, axis=-1)(input=lin_out)
    tq = split_out[0].reshape(reshape_con).transpose(t_axes)
    tk = split_out[1].reshape(reshape_con).transpose(t_axes)
    tv = split_out[2].reshape(reshape_con).transpose(t_axes)

    sdp_out = ScaledDotProduct()(query=tq, key=tk, value=tv)
    t_sdp = sdp_out.transpose(t_axes).reshape(shp_con[:3])
    output = Linear(input_dim, name="c_proj")(input=t_sdp)
    return Model.create(output, name="attn")


def mlp(n_embd: int):
    fc_out = Linear(n_embd * 4, name="c_fc")(input=IOKey("input"))
    gelu_out = Gelu()(input=fc_out)
    output = Linear(n_embd, name="c_proj")(input=gelu_out)
    return Model.create(output, name="mlp")


# Create Transformer Encoder Block.
def create_block(name, dims, num_heads, bias=True, eps=1e-5):
    input = IOKey("input")
    ln1_out = LayerNorm(use_bias=bias, eps=eps, name="ln_1")(input=input)
    attn_out = causal_attention(dims, num_heads, bias)(input=ln1_out)
    add1_out = Add()(left=input, right=attn_out)
    ln2_out = LayerNorm(use_bias=bias, eps=eps, name="ln_2")(input=add1_out)
    mlp_out = mlp(dims)(input=ln2_out)
    output = Add()(left=add1_out, right=mlp_out)
    return Model.create(output, name=name)


def create_gpt(bias, block_size, dims, num_heads, num_layers, vocab_size):
    # Create Position Embedding model
    input = IOKey("input")
    s_out = Size(dim=1)(input=input)
    arr_out = Arange(start=0, step=1)(stop=s_out)
    pos_out = Embedding(name="wpe", num_embeddings=block_size, dim=dims)(input=arr_out)
    token_out = Embedding(name="wte", num_embeddings=vocab_size, dim=dims)(input=input)

    block_out = IOKey("input")
    for idx in range(num_layers):
        block_out = create_block(f"{idx}", dims, num_heads)(input=block_out)
    blocks_out = Model.create(block_out, name="h")(input=pos_out + token_out)

    ln_out = LayerNorm(use_bias=bias, name="ln_f")(input=blocks_out)
    transformer = Model.create(ln_out, name="transformer")
    # Create GPT
    t_out = transformer(input=IOKey("input", differentiable=False))
    output = Linear(vocab_size, use_bias=False, name="lm_head")(input=t_out)
    return Model.create(output=output, name="gpt")
'''

CFG = dict(bias=True, block_size=12, dims=8, num_heads=2, num_layers=2, vocab_size=11)


def published_gpt(causal: bool = False) -> Model:
    """``create_gpt(**CFG)`` of the published file. Its ``ScaledDotProduct()`` is causal as
    published (the default there) and not causal here (torch's default here): ``causal``
    spells ``is_causal=True`` out in the source, the one change."""
    src = GPT_SRC.replace("ScaledDotProduct()(", "ScaledDotProduct(is_causal=True)(") \
        if causal else GPT_SRC
    namespace: dict = {}
    exec(compile(src, "functional_model.py", "exec"), namespace)  # noqa: S102
    return namespace["create_gpt"](**CFG)


def torch_gpt(p: dict, idx: np.ndarray, cot: np.ndarray, causal: bool) -> tuple[np.ndarray, dict]:
    """nanoGPT's forward (karpathy) in torch.nn.functional on the published names."""
    t = {k: torch.tensor(v, requires_grad=True) for k, v in p.items()}
    B, T = idx.shape
    D, H = CFG["dims"], CFG["num_heads"]
    x = t["transformer.wte.weight"][torch.tensor(idx)] + t["transformer.wpe.weight"][torch.arange(T)]
    for i in range(CFG["num_layers"]):
        h = f"transformer.h.{i}"
        a = F.layer_norm(x, (D,), t[f"{h}.ln_1.weight"], t[f"{h}.ln_1.bias"], 1e-5)
        q, k, v = F.linear(a, t[f"{h}.attn.c_attn.weight"], t[f"{h}.attn.c_attn.bias"]).split(D, -1)
        q, k, v = (z.reshape(B, T, H, -1).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2).reshape(B, T, D)
        x = x + F.linear(y, t[f"{h}.attn.c_proj.weight"], t[f"{h}.attn.c_proj.bias"])
        m = F.layer_norm(x, (D,), t[f"{h}.ln_2.weight"], t[f"{h}.ln_2.bias"], 1e-5)
        m = F.gelu(F.linear(m, t[f"{h}.mlp.c_fc.weight"], t[f"{h}.mlp.c_fc.bias"]))
        x = x + F.linear(m, t[f"{h}.mlp.c_proj.weight"], t[f"{h}.mlp.c_proj.bias"])
    x = F.layer_norm(x, (D,), t["transformer.ln_f.weight"], t["transformer.ln_f.bias"], 1e-5)
    out = F.linear(x, t["lm_head.weight"])
    out.backward(torch.tensor(cot))
    return out.detach().numpy(), {k: v.grad.numpy() for k, v in t.items()}


@pytest.fixture(scope="module")
def gpt_case():
    rng = np.random.default_rng(51)
    pm = ml.compile(published_gpt(), ml.NumpyBackend(dtype="float64"), shapes={"input": [3, 5]})
    params = {k: rng.standard_normal(v) * 0.4 for k, v in pm.parameter_shapes.items()}
    return params, rng.integers(0, CFG["vocab_size"], (3, 5)), rng.standard_normal((3, 5, 11))


def test_gpt_parameter_names_are_the_class_based_examples():
    from test_review_published48 import _GPT, create_gpt

    assert _GPT == CFG
    b = ml.NumpyBackend(dtype="float64")
    functional = ml.compile(published_gpt(), b, shapes={"input": [3, 5]})
    classic = ml.compile(create_gpt(**CFG), b, shapes={"input": [3, 5]})
    assert functional.parameter_shapes == classic.parameter_shapes
    assert "transformer.h.1.attn.c_attn.weight" in functional.parameter_shapes
    assert list(functional.input_keys) == ["input"] and functional.get_shapes()["output"] == [3, 5, 11]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", list(BACKENDS))
def test_published_functional_gpt_matches_torch_nanogpt(name, causal, gpt_case):
    params, idx, cot = gpt_case
    want, want_grads = torch_gpt(params, idx, cot, causal)

    def run():
        b = BACKENDS[name](dtype="float64")
        pm = ml.compile(published_gpt(causal), b, shapes={"input": [3, 5]})
        return evaluate_np(pm, b, params, {"input": idx}, {"output": cot})

    if name == "jax":
        with jax_float64():
            out, grads = run()
    else:
        out, grads = run()
    np.testing.assert_allclose(out["output"], want, **F64)
    assert set(grads) == set(want_grads)
    for k, g in want_grads.items():
        np.testing.assert_allclose(grads[k], g, **F64, err_msg=k)


# --- the published rules (tests/scripts/test_immediate_extend.py), against |= --------------

def _eval(model: Model, data: dict, shapes: dict | None = None) -> tuple[dict, dict]:
    """Outputs and parameter gradients (output cotangents of ones) on NumPy float64, with
    parameters drawn from one seed in the compiled order."""
    b = ml.NumpyBackend(dtype="float64")
    pm = ml.compile(model, b, shapes=shapes or {k: v.shape for k, v in data.items()})
    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(v) for k, v in pm.parameter_shapes.items()}
    out = pm.evaluate(params, data)
    return evaluate_np(pm, b, params, data, {k: np.ones(np.shape(v)) for k, v in out.items()})


def test_create_equals_the_same_model_built_with_ior():
    # published test_functional_model_with_create_api
    input1, input2 = IOKey("input1"), IOKey("input2")
    x = Add()(left=input1, right=input2)
    x = Multiply()(left=x, right=x)
    x = x**2
    x = Linear(3)(input=x)
    f_model = Model.create(x)
    model = Model()
    model |= (add := Add()).connect("input1", "input2")
    model |= (mult := Multiply()).connect(add.output, add.output)
    model |= (pw := Power(exponent=2)).connect(mult.output)
    model |= (lin := Linear(3)).connect(input=pw.output, output="output")
    assert f_model.input_keys == model.input_keys == ("input1", "input2")
    assert f_model.output_keys == ("output",) and f_model.cout.key == "output"
    rng = np.random.default_rng(1)
    data = {"input1": rng.standard_normal((2, 4)), "input2": rng.standard_normal((2, 4))}
    got, want = _eval(f_model, data), _eval(model, data)
    assert got[0].keys() == {"output"} and got[1].keys() == {"linear.weight", "linear.bias"}
    for g, w in zip(got, want, strict=True):
        for k in g:
            np.testing.assert_allclose(g[k], w[k], **F64, err_msg=k)
    x = torch.tensor(data["input1"] + data["input2"]) ** 4  # ((a + b)·(a + b))²
    b = ml.NumpyBackend(dtype="float64")
    pm = ml.compile(f_model, b, shapes={"input1": [2, 4], "input2": [2, 4]})
    w, bias = np.arange(12.0).reshape(3, 4) / 7, np.array([1.0, -2.0, 0.5])
    out = pm.evaluate({"linear.weight": w, "linear.bias": bias}, data)["output"]
    np.testing.assert_allclose(out, F.linear(x, torch.tensor(w), torch.tensor(bias)).numpy(), **F64)
    assert lin is not None


def test_unnamed_iokeys_become_inputs_named_after_what_they_feed():
    # published test_functional_model_with_create_api_no_key_namings; one IOKey() object is
    # one wire (Add()(left=k, right=k))
    a, b = IOKey(), IOKey()
    m = Model.create(Multiply()(left=Add()(left=a, right=b), right=3.0))
    assert m.input_keys == ("left", "right")
    out = ml.compile(m, ml.NumpyBackend(dtype="float64")).evaluate(
        {}, {"left": np.array([1.0, 2.0]), "right": np.array([0.5, 4.0])})["output"]
    np.testing.assert_allclose(out, [4.5, 18.0], **F64)
    k = IOKey()
    m = Model.create(Add()(left=k, right=k))
    assert m.input_keys == ("left",)


def test_keyword_outputs_keep_their_order_and_a_call_unpacks_them():
    # published test_model_create_output_order
    input1, input2 = IOKey("input1"), IOKey("input2")
    model = Model.create(out1=Multiply()(input1, input2), out2=Add()(input1, input2),
                         out3=Power()(input1, input2))
    assert model.output_keys == ("out1", "out2", "out3") and model.cout.key == "out1"
    _out1, _out2, _out3 = model(IOKey("p"), IOKey("q"))  # positional: its inputs in order
    outer = Model.create(_out3, twice=_out1 * 2.0, s=_out2)
    assert outer.output_keys == ("output", "twice", "s") and outer.input_keys == ("p", "q")
    copy = Model.create(copy=Linear(2)(input=IOKey("x"), output="h"))  # named otherwise
    assert copy.output_keys == ("h", "copy") and copy.cout.key == "copy"
    got = ml.compile(outer, ml.NumpyBackend(dtype="float64")).evaluate(
        {}, {"p": np.array([2.0, 3.0]), "q": np.array([3.0, 0.5])})
    p, q = torch.tensor([2.0, 3.0], dtype=torch.float64), torch.tensor([3.0, 0.5], dtype=torch.float64)
    for k, want in {"output": p**q, "twice": 2 * p * q, "s": p + q}.items():
        np.testing.assert_allclose(got[k], want.numpy(), **F64, err_msg=k)


def test_a_multi_output_call_indexes_its_outputs_and_a_named_output_stays():
    x = IOKey("x")
    a, b, c = Split(3, axis=-1)(input=x)
    first = Split(3, axis=-1)(input=x)[0]
    h = Linear(2, name="h")(input=x, output="hidden")  # named by its call: kept
    m = Model.create(a + b * c, first=first, r=Relu()(input=h))
    assert m.output_keys == ("hidden", "output", "first", "r")
    rng = np.random.default_rng(3)
    xv = rng.standard_normal((2, 6))
    pm = ml.compile(m, ml.NumpyBackend(dtype="float64"), shapes={"x": [2, 6]})
    w, bias = rng.standard_normal((2, 6)), rng.standard_normal(2)
    got = pm.evaluate({"h.weight": w, "h.bias": bias}, {"x": xv})
    t = torch.tensor(xv).split(2, -1)
    np.testing.assert_allclose(got["output"], (t[0] + t[1] * t[2]).numpy(), **F64)
    np.testing.assert_allclose(got["first"], xv[:, :2], **F64)
    np.testing.assert_allclose(got["r"], F.relu(F.linear(*map(torch.tensor, (xv, w, bias)))).numpy(),
                               **F64)


def test_the_connect_styles_keep_working_and_mix_with_calls():
    model = Model()
    model |= (lin := Linear(3)(input="x"))  # a call is still a block to add
    model += Relu()
    model |= Gelu()(input=Linear(4)(input=lin), output="g")  # a call inside a call: added first
    model |= Add().connect(left=model.cout, right="y", output="s")
    assert lin.home is model and model.input_keys == ("x", "y")
    assert model.output_keys == ("output", "g", "s")  # (the inner call's: internal)
    rng = np.random.default_rng(2)
    data = {"x": rng.standard_normal((1, 2)), "y": rng.standard_normal((1, 4))}
    b = ml.NumpyBackend(dtype="float64")
    pm = ml.compile(model, b, shapes={k: v.shape for k, v in data.items()})
    p = {k: rng.standard_normal(v) for k, v in pm.parameter_shapes.items()}
    out = pm.evaluate(p, data)
    t = {k: torch.tensor(v) for k, v in {**p, **data}.items()}
    h = F.linear(t["x"], t["linear_0.weight"], t["linear_0.bias"])
    g = F.gelu(F.linear(h, t["linear_1.weight"], t["linear_1.bias"]))
    for k, want in {"output": F.relu(h), "g": g, "s": g + t["y"]}.items():
        np.testing.assert_allclose(out[k], want.numpy(), **F64, err_msg=k)


def test_a_created_model_nests_and_chains_with_plus_equals():
    x = IOKey("input")
    block = Model.create(Linear(3, name="inner")(input=Relu()(input=x)), name="blk")
    outer = Model()
    outer += Linear(2, name="first").connect(input="input")
    outer += block
    outer += Buffer().connect(output="output")
    b = ml.NumpyBackend(dtype="float64")
    pm = ml.compile(outer, b, shapes={"input": [1, 5]})
    assert list(pm.parameter_shapes) == ["first.weight", "first.bias", "blk.inner.weight",
                                         "blk.inner.bias"]
    rng = np.random.default_rng(4)
    p = {k: rng.standard_normal(v) for k, v in pm.parameter_shapes.items()}
    xv = rng.standard_normal((1, 5))
    t = {k: torch.tensor(v) for k, v in p.items()}
    want = F.linear(F.relu(F.linear(torch.tensor(xv), t["first.weight"], t["first.bias"])),
                    t["blk.inner.weight"], t["blk.inner.bias"])
    np.testing.assert_allclose(pm.evaluate(p, {"input": xv})["output"], want.numpy(), **F64)


# --- bad input: a library error naming it, and nothing changed ------------------------------

def test_create_refuses_no_output_an_input_and_a_non_connection():
    with pytest.raises(ValueError, match=r"Model.create: give the output\(s\)"):
        Model.create()
    with pytest.raises(ValueError, match=r"Model.create: give the output\(s\)"):
        Model.create(name="m")
    with pytest.raises(TypeError, match=r"Model.create: an output is a block's call .* got an "
                                        r"input \(IOKey\('x'\)\)"):
        Model.create(IOKey("x"))
    with pytest.raises(TypeError, match=r"Model.create\(y=...\): .* got int"):
        Model.create(y=3)


def test_create_refuses_an_output_name_taken_and_restores_the_calls():
    x = IOKey("input")
    lin = Linear(2)(input=x)
    with pytest.raises(ValueError, match=r"Model.create\(input=...\): 'input' names another"):
        Model.create(input=lin)
    assert lin.home is None  # the call is free again: it builds a model now
    m = Model.create(lin)
    assert lin.home is m and m.output_keys == ("output",)


def test_a_call_belongs_to_one_model():
    lin = Linear(2)(input=IOKey("input"))
    first = Model.create(lin, name="first")
    relu = Relu()(input=lin)
    with pytest.raises(ValueError, match=r"Linear\(...\).output is the output of a call that is "
                                         r"part of another model"):
        Model.create(relu)
    assert relu.home is None
    model = Model()
    model |= Linear(3).connect(input="z", output="h")
    with pytest.raises(ValueError, match="part of another model"):
        model |= Add()(left="h", right=lin)
    assert len(model.blocks) == 1 and model.output_keys == ("h",)
    with pytest.raises(ValueError, match="this call was added to"):
        model |= lin
    with pytest.raises(ValueError, match="is the output of a call that is not part of this model"):
        model.set_cout(Relu()(input="h"))
    assert first.output_keys == ("output",)


def test_a_raising_add_puts_back_the_calls_it_pulled_in():
    inner = Model.create(Relu()(input=IOKey("input")), name="inner")
    other = Linear(2)(input=IOKey("a"))
    Model.create(other)
    pulled = inner(input=Linear(3)(input="x"))  # a created model's call, not yet added
    model = Model()
    with pytest.raises(ValueError, match="part of another model"):
        model |= Add()(left=pulled, right=other)
    assert pulled.home is None and not inner._used and model.blocks == [] and model.conns == {}
    model |= Add()(left=pulled, right="y", output="out")  # the same calls, now added
    assert pulled.home is model and model.input_keys == ("x", "y")


def test_a_created_model_is_frozen():
    created = Model.create(Relu()(input=IOKey("input")), name="c")
    before = (list(created.blocks), dict(created.conns))
    for add in (lambda m: m.__ior__(Relu()), lambda m: m.__iadd__(Gelu()(input="input"))):
        with pytest.raises(AttributeError, match="made by Model.create and is frozen"):
            add(created)
    assert (list(created.blocks), dict(created.conns)) == before
    created.set_shapes(input=[2, 3])  # declaring is not extending
    outer = Model()
    outer |= created(input="x")
    assert outer.input_keys == ("x",)


def test_multi_output_calls_are_picked_by_index():
    parts = Split(2)(input=IOKey("x"))
    with pytest.raises(ValueError, match=r"returns 2 outputs \['output_0', 'output_1'\]: give "
                                         r"one of them"):
        Model.create(Relu()(input=parts))
    assert parts.home is None
    with pytest.raises(IndexError, match=r"returns 2 outputs .* got 2"):
        parts[2]
    with pytest.raises(TypeError, match="a call unpacks only into the outputs of a block with several"):
        a, b = Relu()(input="x")
    assert "Indexer" in repr(type(Relu()(input="x")[0].op))  # one output: its value indexed


def test_the_old_refusal_of_the_functional_style_is_gone():
    # tests/test_review_published47.py::test_the_functional_api_is_refused_with_what_to_do_instead
    # asserted the TypeError this replaces (see the report)
    fc_out = Linear(32)(input=IOKey("input"))
    model = Model()
    model |= Linear(4).connect(input="input", output="h")
    model |= Gelu()(input=fc_out, output="g")
    assert model.output_keys == ("h", "g") and fc_out.home is model


def test_a_call_is_the_blocks_own_connect():
    # published segformer: Reshape()(input=sdp_out, shape=(...)); Reshape.connect takes shape=
    from mithril.models import Reshape

    model = Model()
    model |= Reshape()(input="x", shape=(2, -1), output="y")
    out = ml.compile(model, ml.NumpyBackend(dtype="float64"), shapes={"x": [4]}).evaluate(
        {}, {"x": np.arange(4.0)})["y"]
    np.testing.assert_array_equal(out, np.arange(4.0).reshape(2, -1))


# --- += of a block whose canonical input is given (published Model.__add__) ----------------

def test_plus_equals_refuses_a_block_with_its_canonical_input_given_and_another_unnamed():
    # published: "Submodel must have single available canonical input! Set canonical input or
    # use |= operator." (a KeyError); Subtract's canonical input is left only
    from mithril.models.primitives import Subtract

    model = Model()
    model |= Relu().connect(input="x")
    model += Add().connect(left="x", output="y")  # commutative: right takes the Relu's output
    before = (list(model.blocks), dict(model.conns), model.cout.key)
    with pytest.raises(ml.KeyMismatchError, match=r"Subtract: \+= wires the previous output to "
                                                  r"its canonical input 'left'.*\['right'\]"):
        model += Subtract().connect(left="y", output="z")
    assert (list(model.blocks), dict(model.conns), model.cout.key) == before
    with pytest.raises(ml.KeyMismatchError, match="nothing is left to wire it to: add it with"):
        model += Subtract().connect(left="y", right="x", output="z")  # every input given
    assert (list(model.blocks), dict(model.conns), model.cout.key) == before
    model |= Subtract().connect(left="y", right="x", output="z")
    model |= Add()(left="y", right="z", output="w")
    xv = np.array([-1.0, 0.5, 2.0])
    out = ml.compile(model, ml.NumpyBackend(dtype="float64"), shapes={"x": [3]}).evaluate(
        {}, {"x": xv})
    y = xv + np.maximum(xv, 0)
    np.testing.assert_allclose(out["w"], y + (y - xv), **F64)
    first = Model()
    first += Subtract().connect(left="a")  # nothing before it: nothing to wire
    assert first.input_keys == ("a", "right")
