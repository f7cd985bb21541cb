"""Review 47: programs of the published Mithril (synnada-ai/mithril) ported as they are and
run on NumPy, torch and JAX in float64, their outputs and gradients compared with torch
autograd of the same network computed here (not with the examples' prose); and the
published spellings a porting user meets on the way (``Model(name=...)``,
``set_shapes({conn: shape})``, ``ml.TBD``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import jax_float64

import mithril as ml
from mithril.models import (
    MLP,
    Add,
    Buffer,
    Convolution2D,
    Flatten,
    Gelu,
    IOKey,
    LayerNorm,
    LeakyRelu,
    Linear,
    LinearSVM,
    MaxPool2D,
    Mean,
    Model,
    QuadHingeLoss,
    Relu,
    SquaredError,
    TrainModel,
)
from mithril.models.published_cells import ManyToOne, PublishedLSTMCell, PublishedRNNCell

BACKENDS = {"numpy": ml.NumpyBackend, "torch": ml.TorchBackend, "jax": ml.JaxBackend}
TOL = dict(rtol=1e-10, atol=1e-12)
#: the convolution networks on JAX: ~8 s of XLA compiling each, under ``-m slow``
SLOW_JAX = ["numpy", "torch", pytest.param("jax", marks=pytest.mark.slow)]


def _run(name: str, build, shapes: dict, params: dict, data: dict, cots=True, **compile_kw):
    """Compile ``build()`` on backend ``name`` (float64), evaluate with ``params`` / ``data``
    (NumPy arrays, moved to the backend) and return NumPy outputs and gradients."""
    def go():
        b = BACKENDS[name](dtype="float64")
        pm = ml.compile(build(), b, shapes=shapes, **compile_kw)
        cv = cots if cots is True else {k: b.array(v) for k, v in cots.items()}
        out, grads = pm.evaluate({k: b.array(v) for k, v in params.items()},
                                 {k: b.array(v) for k, v in data.items()}, output_gradients=cv)
        return ({k: np.asarray(b.to_numpy(v)) for k, v in out.items()},
                {k: np.asarray(b.to_numpy(v)) for k, v in grads.items()})
    if name == "jax":
        with jax_float64():
            return go()
    return go()


# --- examples/model_api/convolution_with_svm.py (published, as of cc5c80c) ------------------

def _svm_train_model() -> TrainModel:
    # synnada-ai/mithril examples/model_api/convolution_with_svm.py, as published
    backbone = Model()
    backbone += Convolution2D(kernel_size=3, out_channels=8, stride=2, padding=1)
    backbone += MaxPool2D(kernel_size=2, stride=2)
    backbone += Convolution2D(kernel_size=3, out_channels=16, stride=2, padding=1)
    backbone += MaxPool2D(kernel_size=2, stride=2)
    backbone += Convolution2D(kernel_size=3, out_channels=32, stride=2, padding=1)
    backbone += Flatten(start_dim=1)
    age_head = MLP(activations=[LeakyRelu(), LeakyRelu(), Buffer()], dimensions=[256, 64, 1])
    gender_head = MLP(activations=[LeakyRelu(), LeakyRelu(), Buffer()], dimensions=[32, 16, 1])
    SVM_Model = LinearSVM()  # noqa: N806 (the example's name)
    logical_model = Model()
    logical_model |= backbone
    logical_model |= age_head.connect(input=backbone.cout, output="age")
    logical_model |= gender_head.connect(input=backbone.cout)
    logical_model |= SVM_Model.connect(input=gender_head.output, output="gender",
                                       decision_output="pred_gender")
    logical_model.expose_keys("gender", "pred_gender", "age")
    logical_model.set_cin(backbone.cin)
    train_model = TrainModel(logical_model)
    train_model.add_loss(QuadHingeLoss(), reduce_steps=[Mean()], target="gender_target",
                         input="gender")
    train_model.add_loss(SquaredError(), reduce_steps=[Mean()], target="age_target", input="age")
    return train_model


def _svm_torch(p: dict, d: dict) -> tuple[dict, dict]:
    """The same network in torch: final_cost and the gradients of every parameter."""
    t = {k: torch.tensor(v, requires_grad=True) for k, v in p.items()}
    h = torch.tensor(d["input"])
    for i in range(3):
        h = F.conv2d(h, t[f"model.convolution2_d_{i}.weight"], t[f"model.convolution2_d_{i}.bias"],
                     stride=2, padding=1)
        if i < 2:
            h = F.max_pool2d(h, 2, 2)
    h = h.flatten(1)

    def mlp(x, m):
        for i in range(3):
            x = F.linear(x, t[f"{m}.linear_{i}.weight"], t[f"{m}.linear_{i}.bias"])
            x = F.leaky_relu(x, 0.01) if i < 2 else x
        return x
    age = mlp(h, "mlp_0")
    gender = F.linear(mlp(h, "mlp_1"), t["weight"], t["bias"])
    gt, at = torch.tensor(d["gender_target"]), torch.tensor(d["age_target"])
    cost = (torch.clamp(1 - gt * gender, min=0) ** 2).mean() + ((age - at) ** 2).mean()
    cost.backward()
    outs = {"final_cost": cost.detach().numpy(), "age": age.detach().numpy(),
            "gender": gender.detach().numpy(), "pred_gender": torch.sign(gender).detach().numpy()}
    return outs, {k: v.grad.numpy() for k, v in t.items()}


@pytest.fixture(scope="module")
def svm_case():
    rng = np.random.default_rng(47)
    shapes = {"input": [6, 3, 32, 32]}
    pm = ml.compile(_svm_train_model(), ml.NumpyBackend(dtype="float64"), shapes=shapes,
                    data_keys={"input", "age_target", "gender_target"})
    params = {k: rng.standard_normal(v) * 0.3 for k, v in pm.parameter_shapes.items()}
    data = {"input": rng.standard_normal((6, 3, 32, 32)),
            "age_target": rng.standard_normal((6, 1)),
            "gender_target": np.sign(rng.standard_normal((6, 1)))}
    return shapes, params, data, _svm_torch(params, data)


@pytest.mark.parametrize("name", SLOW_JAX)
def test_convolution_with_svm_example_matches_torch(name, svm_case):
    shapes, params, data, (want_out, want_grads) = svm_case
    out, grads = _run(name, _svm_train_model, shapes, params, data,
                      data_keys={"input", "age_target", "gender_target"})
    for k, v in want_out.items():
        np.testing.assert_allclose(out[k], v, **TOL, err_msg=k)
    assert set(grads) == set(want_grads)
    for k, v in want_grads.items():
        np.testing.assert_allclose(grads[k], v, **TOL, err_msg=k)


# --- examples/model_api/resnet_logical_models.py: basic_block, bottleneck, make_layer ------

def basic_block(out_channels: int, stride: int = 1, downsample: Model | None = None) -> Model:
    # synnada-ai/mithril examples/model_api/resnet_logical_models.py, as published
    block = Model()
    block += Convolution2D(kernel_size=3, out_channels=out_channels, padding=1, stride=stride)
    model_input = block.cin
    block += Relu()
    block += Convolution2D(kernel_size=3, out_channels=out_channels, padding=1)
    skip_in = block.cout
    if downsample is not None:
        block |= downsample.connect(input=model_input)
        block |= Add().connect(left=downsample.cout, right=skip_in)
    else:
        block |= Add().connect(left=model_input, right=skip_in)
    block += Relu()
    return block


def bottleneck(out_channels: int, stride: int = 1, downsample: Model | None = None) -> Model:
    # synnada-ai/mithril examples/model_api/resnet_logical_models.py, as published
    model = Model()
    model += Convolution2D(kernel_size=1, out_channels=out_channels, stride=stride)
    model += Relu()
    model += Convolution2D(kernel_size=3, out_channels=out_channels, padding=1, stride=stride)
    model += Relu()
    model += Convolution2D(kernel_size=1, out_channels=out_channels, stride=stride)
    skip_in = model.cout
    if downsample is not None:
        model |= downsample.connect(input=model.cin)
        model |= Add().connect(left=downsample.cout, right=skip_in)
    else:
        model |= Add().connect(left=model.cin, right=skip_in)
    model += Relu()
    return model


def make_layer(out_channels: int, block, n_blocks: int = 2, stride: int = 1) -> Model:
    # synnada-ai/mithril examples/model_api/resnet_logical_models.py, as published
    layer = Model()
    downsample = Convolution2D(kernel_size=1, out_channels=out_channels, stride=stride)
    layer += block(out_channels, stride, downsample)
    for _ in range(n_blocks - 1):
        layer += block(out_channels)
    return layer


def _small_resnet() -> Model:
    # the published resnet(), with 4 / 8 channels and two layers (one of bottlenecks)
    resnet = Model()
    resnet += Convolution2D(kernel_size=7, out_channels=4, stride=2, padding=3)
    resnet += make_layer(4, bottleneck, n_blocks=2, stride=1)
    resnet += make_layer(8, basic_block, n_blocks=2, stride=2)
    resnet += Flatten(start_dim=1)
    resnet |= Linear(dimension=3).connect(input=resnet.cout, output=IOKey(name="output"))
    return resnet


def _resnet_torch(p: dict, x: np.ndarray, cot: np.ndarray) -> tuple[np.ndarray, dict]:
    t = {k: torch.tensor(v, requires_grad=True) for k, v in p.items()}

    def conv(h, path, stride=1, padding=0):
        return F.conv2d(h, t[f"{path}.weight"], t[f"{path}.bias"], stride=stride, padding=padding)

    def basic(h, path, stride, down):
        y = conv(F.relu(conv(h, f"{path}.convolution2_d_0", stride, 1)),
                 f"{path}.convolution2_d_1", 1, 1)
        skip = conv(h, f"{path}.convolution2_d_2", stride) if down else h
        return F.relu(skip + y)

    def neck(h, path, down):
        y = F.relu(conv(h, f"{path}.convolution2_d_0"))
        y = F.relu(conv(y, f"{path}.convolution2_d_1", 1, 1))
        y = conv(y, f"{path}.convolution2_d_2")
        skip = conv(h, f"{path}.convolution2_d_3") if down else h
        return F.relu(skip + y)

    h = conv(torch.tensor(x), "convolution2_d", 2, 3)
    h = neck(neck(h, "model_0.model_0", True), "model_0.model_1", False)
    h = basic(basic(h, "model_1.model_0", 2, True), "model_1.model_1", 1, False)
    out = F.linear(h.flatten(1), t["linear.weight"], t["linear.bias"])
    out.backward(torch.tensor(cot))
    return out.detach().numpy(), {k: v.grad.numpy() for k, v in t.items()}


@pytest.mark.parametrize("name", SLOW_JAX)
def test_resnet_example_blocks_match_torch(name):
    rng = np.random.default_rng(7)
    shapes = {"input": [2, 3, 16, 16]}
    pm = ml.compile(_small_resnet(), ml.NumpyBackend(dtype="float64"), shapes=shapes)
    params = {k: rng.standard_normal(v) * 0.5 for k, v in pm.parameter_shapes.items()}
    x, cot = rng.standard_normal((2, 3, 16, 16)), rng.standard_normal((2, 3))
    want, want_grads = _resnet_torch(params, x, cot)
    out, grads = _run(name, _small_resnet, shapes, params, {"input": x}, cots={"output": cot})
    np.testing.assert_allclose(out["output"], want, **TOL)
    assert set(grads) == set(want_grads)
    for k, v in want_grads.items():
        np.testing.assert_allclose(grads[k], v, **TOL, err_msg=k)


# --- examples/gpt/model.py: mlp() and create_block()'s residual halves, named as published ---

def gpt_mlp(n_embd: int) -> Model:
    # synnada-ai/mithril examples/gpt/model.py mlp(), but for Linear(..., name="c_fc" /
    # "c_proj"): operators take no name= yet (test_operator_name_as_published)
    block = Model(name="mlp")
    block += Linear(n_embd * 4).connect(input="input")
    block += Gelu()
    block += Linear(n_embd).connect(output=IOKey("output"))
    return block


def create_block(name: str, dims: int, bias: bool = True, eps: float = 1e-5) -> Model:
    # examples/gpt/model.py create_block() without its attention half (which reads
    # model.input.shape: shape wires are not offered, see docs/mithril-compat.md)
    block = Model(name=name)
    block += LayerNorm(use_bias=bias, eps=eps).connect(input="input")
    block += gpt_mlp(dims)
    block |= Add().connect(left="input", right=block.cout, output="output")
    return block


def _gpt_blocks() -> Model:
    blocks = Model(name="h")  # as create_gpt(): blocks += create_block(f"{idx}", ...)
    for idx in range(2):
        blocks += create_block(f"{idx}", 8)
    gpt = Model()
    gpt += blocks.connect(input="input")
    gpt += LayerNorm().connect(output=IOKey("output"))
    return gpt


@pytest.mark.parametrize("name", list(BACKENDS))
def test_named_models_name_their_parameters_and_match_torch(name):
    rng = np.random.default_rng(3)
    shapes = {"input": [2, 5, 8]}
    pm = ml.compile(_gpt_blocks(), ml.NumpyBackend(dtype="float64"), shapes=shapes)
    assert list(pm.parameter_shapes)[:4] == [
        "h.0.layer_norm.weight", "h.0.layer_norm.bias", "h.0.mlp.linear_0.weight",
        "h.0.mlp.linear_0.bias"]
    assert "h.1.mlp.linear_1.bias" in pm.parameter_shapes
    params = {k: rng.standard_normal(v) for k, v in pm.parameter_shapes.items()}
    x, cot = rng.standard_normal((2, 5, 8)), rng.standard_normal((2, 5, 8))
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    y = torch.tensor(x)
    for i in ("0", "1"):
        p = f"h.{i}"
        ln = F.layer_norm(y, (8,), t[f"{p}.layer_norm.weight"], t[f"{p}.layer_norm.bias"], 1e-5)
        z = F.gelu(F.linear(ln, t[f"{p}.mlp.linear_0.weight"], t[f"{p}.mlp.linear_0.bias"]))
        y = y + F.linear(z, t[f"{p}.mlp.linear_1.weight"], t[f"{p}.mlp.linear_1.bias"])
    y = F.layer_norm(y, (8,), t["layer_norm.weight"], t["layer_norm.bias"], 1e-5)
    y.backward(torch.tensor(cot))
    out, grads = _run(name, _gpt_blocks, shapes, params, {"input": x}, cots={"output": cot})
    np.testing.assert_allclose(out["output"], y.detach().numpy(), **TOL)
    assert set(grads) == set(t)
    for k, v in t.items():
        np.testing.assert_allclose(grads[k], v.grad.numpy(), **TOL, err_msg=k)


def test_block_names_are_checked():
    with pytest.raises(ValueError, match="name must be a non-empty str without '.'"):
        Model(name="a.b")
    with pytest.raises(ValueError, match="MLP: name must be"):
        MLP(activations=[None], dimensions=[2], name=3)
    twice = Model()
    twice += Model(name="x").__ior__(Linear(2))  # two siblings named "x"
    twice += Model(name="x").__ior__(Linear(2))
    with pytest.raises(ValueError, match="two blocks of the model are both named 'x'"):
        ml.compile(twice, ml.NumpyBackend(), shapes={"input": [1, 2]})
    clash = Model()  # a name that an unnamed sibling's default also takes
    clash += Linear(2)
    clash += MLP(activations=[None], dimensions=[2], name="linear")
    with pytest.raises(ValueError, match="both named 'linear'"):
        ml.compile(clash, ml.NumpyBackend(), shapes={"input": [1, 2]})
    named = [LinearSVM(name="svm"), MLP([None], [1], name="head")]
    assert [m.name for m in named] == ["svm", "head"] and Model().name is None


def test_operator_name_as_published():
    # examples/gpt/model.py: Linear(n_embd * 4, name="c_fc"), LayerNorm(..., name="ln_1")
    block = Model(name="mlp")
    block += Linear(32, name="c_fc").connect(input="input")
    block += LayerNorm(name="ln_1")
    pm = ml.compile(block, ml.NumpyBackend(), shapes={"input": [2, 8]})
    assert list(pm.parameter_shapes) == ["c_fc.weight", "c_fc.bias", "ln_1.weight", "ln_1.bias"]


def test_positional_connect_as_published():
    # examples/gpt/model.py: LayerNorm(...).connect("input"), Add().connect("input", block.cout,
    # "add_out"), Linear(...).connect(model.c_attn_out, output="split_out")
    block = Model()
    block += Linear(4).connect("input")
    block |= Add().connect("input", block.cout, "add_out")
    assert block.output_keys[-1] == "add_out"
    pm = ml.compile(block, ml.NumpyBackend(dtype="float64"), shapes={"input": [3, 4]})
    params = {k: np.random.default_rng(0).normal(size=v) for k, v in pm.parameter_shapes.items()}
    x = np.random.default_rng(1).normal(size=(3, 4))
    want = x + x @ params["linear.weight"].T + params["linear.bias"]
    np.testing.assert_allclose(pm.evaluate(params, {"input": x})["add_out"], want, rtol=1e-12)
    with pytest.raises(TypeError, match=r"Add.connect takes at most 3 positional connections "
                                        r"\(left, right, output\), got 4"):
        Add().connect("a", "b", "c", "d")
    with pytest.raises(TypeError, match="Linear.connect got two values for 'input'"):
        Linear(2).connect("x", input="y")
    with pytest.raises(ValueError, match="Linear: name must be a non-empty str without '.'"):
        Linear(2, name="a.b")


# --- the published Model's set_shapes / set_differentiability spellings, and ml.TBD -----------

def test_set_shapes_takes_a_mapping_of_connections_and_changes_nothing_when_it_raises():
    lin = Linear(3)
    model = Model()
    model |= lin.connect(input="input", output="output")
    # a bad key after a good one: nothing is set (it used to set "input" first, then raise)
    with pytest.raises(ml.KeyMismatchError, match="no terminal 'nope'"):
        model.set_shapes(input=[2, 4], nope=[3])
    assert model.conns["input"].shape is None
    with pytest.raises(ml.ShapeError):  # the two spellings of one key disagree
        model.set_shapes({model.input: [2, 4]}, input=[2, 5])
    assert model.conns["input"].shape is None
    model.set_shapes({model.input: [2, None], lin.output: [None, 3]}, input=[None, 4])
    pm = ml.compile(model, ml.NumpyBackend())
    assert pm.get_shapes() == {"input": [2, 4], "output": [2, 3], "linear.weight": [3, 4],
                               "linear.bias": [3]}


def test_tbd_is_no_value():
    # the published cells' IOKey("w_ih", value=w_ih, differentiable=True) with w_ih=TBD
    model = Model()
    model |= Linear(2).connect(input=IOKey("input", value=ml.TBD), weight=ml.TBD,
                               bias=IOKey("b", value=ml.TBD, differentiable=True),
                               output="output")
    assert model.input_keys == ("input", "b") and ml.TBD is ml.ToBeDetermined()
    pm = ml.compile(model, ml.NumpyBackend(dtype="float64"), shapes={"input": [1, 3]})
    assert sorted(pm.parameter_shapes) == ["b", "linear.weight"]
    assert repr(ml.TBD) == "TBD"


# --- examples/model_api/many_to_one_any_backend_training.py: ManyToOne of the published cell --

_RNN_SHAPES = {"w_ih": [5, 3], "w_hh": [5, 5], "w_ho": [2, 5], "bias_h": [5], "bias_o": [2]}
_LSTM_SHAPES = {**{f"w_{g}": [5, 8] for g in "fico"}, "w_out": [2, 5],
                **{f"bias_{g}": [5] for g in "fico"}, "bias_out": [2]}


def _cell_torch(kind: str, t: dict, x, state: dict) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """One step of the published cell: the next state, its output and ``hidden_compl``."""
    n = x.shape[0]
    h, compl = state["hidden"][:n], state["hidden"][n:]
    if kind == "rnn":
        hid = torch.tanh(x @ t["w_ih"].T + h @ t["w_hh"].T + t["bias_h"])
        return {"hidden": hid}, hid @ t["w_ho"].T + t["bias_o"], compl
    xh = torch.cat([x, h], dim=-1)
    f, i, o = (torch.sigmoid(xh @ t[f"w_{g}"].T + t[f"bias_{g}"]) for g in "fio")
    cell = f * state["cell"][:n] + i * torch.tanh(xh @ t["w_c"].T + t["bias_c"])
    hid = o * torch.tanh(cell)
    return {"hidden": hid, "cell": cell}, hid @ t["w_out"].T + t["bias_out"], compl


def _many_to_one_torch(kind, params, data, steps):
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    state = {k: torch.tensor(data[f"initial_{k}"]) for k in ("hidden", "cell")
             if f"initial_{k}" in data}
    outs, tails = {}, []
    for s in range(steps):
        state, outs[f"output{s}"], compl = _cell_torch(kind, t, torch.tensor(data[f"input{s}"]), state)
        if s == steps - 1:
            tails.append(state["hidden"])
        if s > 0:
            tails.append(compl)
    outs["hidden_concat"] = torch.cat(tails)
    return t, outs


def _many_to_one_train_model(cell, max_seq_length: int) -> TrainModel:
    # synnada-ai/mithril examples/model_api/many_to_one_any_backend_training.py, as published
    # but for the cell's name: ManyToOne(RNNCell(), ...) there, PublishedRNNCell() here
    many_to_one_model = ManyToOne(cell, max_seq_length)
    train_model = TrainModel(many_to_one_model)
    train_model.add_loss(SquaredError(), input=f"output{max_seq_length - 1}", target="target",
                         reduce_steps=[Mean()])
    return train_model


@pytest.mark.parametrize("name", list(BACKENDS))
def test_many_to_one_example_matches_torch(name):
    rng = np.random.default_rng(11)
    steps = 4
    consts = {"initial_hidden": rng.standard_normal((6, 1, 5)), "target": rng.standard_normal((6, 1, 2)),
              **{f"input{i}": rng.standard_normal((6, 1, 3)) for i in range(steps)}}
    params = {k: rng.standard_normal(v) * 0.5 for k, v in _RNN_SHAPES.items()}
    t, outs = _many_to_one_torch("rnn", params, consts, steps)
    cost = ((outs[f"output{steps - 1}"] - torch.tensor(consts["target"])) ** 2).mean()
    cost.backward()

    def go():
        backend = BACKENDS[name](dtype="float64")
        constant_keys = {k: backend.array(v) for k, v in consts.items()}
        pm = ml.compile(model=_many_to_one_train_model(PublishedRNNCell(), steps),
                        constant_keys=constant_keys, backend=backend, shapes=_RNN_SHAPES)
        assert sorted(pm.randomize_params()) == sorted(_RNN_SHAPES)  # the cell's weights
        p = {k: backend.array(v) for k, v in params.items()}
        with pytest.raises(ml.KeyMismatchError, match=r"are constants .* leave them out"):
            pm.evaluate(p, constant_keys, output_gradients=True)  # as the published loop does
        outputs, gradients = pm.evaluate(p, output_gradients=True)
        return backend.to_numpy(outputs["final_cost"]), {k: backend.to_numpy(v)
                                                         for k, v in gradients.items()}
    if name == "jax":
        with jax_float64():
            got, grads = go()
    else:
        got, grads = go()
    np.testing.assert_allclose(got, cost.item(), **TOL)
    assert set(grads) == set(t)
    for k, v in t.items():
        np.testing.assert_allclose(grads[k], v.grad.numpy(), **TOL, err_msg=k)


@pytest.mark.parametrize("kind", ["rnn", "lstm"])
@pytest.mark.parametrize("name", list(BACKENDS))
def test_many_to_one_of_shrinking_batches_matches_torch(name, kind):
    """Sequences of lengths 3, 2, 2, 1 sorted longest first: step t takes the rows still
    running; ``hidden_concat`` holds the states left behind, in the published order."""
    rng = np.random.default_rng(5)
    rows = [4, 3, 1]
    data = {"initial_hidden": rng.standard_normal((4, 1, 5)),
            **{f"input{i}": rng.standard_normal((n, 1, 3)) for i, n in enumerate(rows)}}
    if kind == "lstm":
        data["initial_cell"] = rng.standard_normal((4, 1, 5))
    shapes = _RNN_SHAPES if kind == "rnn" else _LSTM_SHAPES
    params = {k: rng.standard_normal(v) * 0.5 for k, v in shapes.items()}
    t, want = _many_to_one_torch(kind, params, data, len(rows))
    cots = {k: rng.standard_normal(tuple(v.shape)) for k, v in want.items()}
    sum(torch.sum(v * torch.tensor(cots[k])) for k, v in want.items()).backward()
    cell = PublishedRNNCell if kind == "rnn" else PublishedLSTMCell
    out, grads = _run(name, lambda: ManyToOne(cell(), len(rows)),
                      {**shapes, **{k: list(v.shape) for k, v in data.items()}}, params, data,
                      cots=cots)
    assert out["hidden_concat"].shape == (4, 1, 5)
    for k, v in want.items():
        np.testing.assert_allclose(out[k], v.detach().numpy(), **TOL, err_msg=k)
    assert set(grads) == set(t)
    for k, v in t.items():
        np.testing.assert_allclose(grads[k], v.grad.numpy(), **TOL, err_msg=k)


def test_many_to_one_refuses_a_torch_cell_and_a_short_sequence():
    with pytest.raises(TypeError, match="cell_type must be a PublishedRNNCell"):
        ManyToOne(ml.RNNCell(5), 3)
    with pytest.raises(ValueError, match="max_sequence_length must be an int >= 2"):
        ManyToOne(PublishedRNNCell(), 1)


def test_a_functional_call_joins_a_model_and_summary_says_what_instead():
    # examples/gpt/functional_model.py: fc_out = Linear(n_embd * 4, ...)(input=IOKey("input"));
    # gelu_out = Gelu()(input=fc_out): a call is a connection; the model that reads it adds
    # its block first (the functional API itself: tests/test_published_functional.py)
    fc_out = Linear(32)(input=IOKey("input"))
    model = Model()
    model |= Linear(4).connect(input="input", output="h")
    model |= Gelu()(input=fc_out, output="g")
    assert model.output_keys == ("h", "g")
    with pytest.raises(TypeError, match=r"Model.summary: .* ml.compile\(model, backend"):
        model.summary()  # the published logical summary (it was "no attribute or connection")


@pytest.mark.parametrize("name", ["numpy", "torch"])
def test_compile_keys_name_a_childs_parameter_role_by_object(name):
    # published: compile(constant_keys={lin.weight: w}) / data_keys={lin.bias}; these were a
    # KeyMismatchError ("not a connection of ... one of its direct children")
    lin = Linear(2)
    model = Model()
    model |= Relu().connect(input="input")
    model += lin.connect(output="output")
    b = BACKENDS[name](dtype="float64")
    w, bias, x = np.arange(6.0).reshape(2, 3) - 2, np.array([0.5, -1.0]), np.array([[1.0, -2.0, 3.0]])
    pm = ml.compile(model, b, shapes={"input": [1, 3]}, constant_keys={lin.weight: b.array(w)},
                    data_keys={lin.bias})
    assert pm.parameter_shapes == {} and set(pm.input_keys) == {"input", "linear.bias"}
    out = pm.evaluate({}, {"input": b.array(x), "linear.bias": b.array(bias)})
    want = F.linear(torch.relu(torch.tensor(x)), torch.tensor(w), torch.tensor(bias))
    np.testing.assert_allclose(b.to_numpy(out["output"]), want.numpy(), **TOL)
    alone = Linear(3)  # an operator compiled alone
    pm = ml.compile(alone, b, shapes={"input": [1, 3]}, constant_keys={alone.weight: b.array(np.eye(3))})
    assert list(pm.parameter_shapes) == ["linear.bias"]
    with pytest.raises(ml.KeyMismatchError, match="not a connection of the compiled model"):
        ml.compile(model, b, shapes={"input": [1, 3]}, constant_keys={Linear(2).weight: 1.0})


@pytest.mark.parametrize("name", ["numpy", "torch"])
def test_set_differentiability_false_on_a_parameter_role_object(name):
    # published: model.set_differentiability({lin.weight: False}) freezes the weight; it was
    # ignored here (the weight stayed a trained parameter)
    lin = Linear(2)
    model = Model()
    model |= lin.connect(input="input", output="output")
    model.set_differentiability({lin.weight: False})
    b = BACKENDS[name](dtype="float64")
    pm = ml.compile(model, b, shapes={"input": [4, 3]})
    assert list(pm.parameter_shapes) == ["linear.bias"] and pm.input_keys == ("input", "linear.weight")
    rng = np.random.default_rng(0)
    x, w, bias, cot = (rng.standard_normal(s) for s in ((4, 3), (2, 3), (2,), (4, 2)))
    out, grads = pm.evaluate({"linear.bias": b.array(bias)},
                             {"input": b.array(x), "linear.weight": b.array(w)},
                             output_gradients={"output": b.array(cot)})
    tb = torch.tensor(bias, requires_grad=True)
    y = F.linear(torch.tensor(x), torch.tensor(w), tb)
    y.backward(torch.tensor(cot))
    np.testing.assert_allclose(b.to_numpy(out["output"]), y.detach().numpy(), **TOL)
    assert list(grads) == ["linear.bias"]
    np.testing.assert_allclose(b.to_numpy(grads["linear.bias"]), tb.grad.numpy(), **TOL)
    # the compile's key sets win over the declaration, as published
    pm = ml.compile(model, b, shapes={"input": [4, 3]}, trainable_keys=["linear.weight"])
    assert sorted(pm.parameter_shapes) == ["linear.bias", "linear.weight"]
    pm = ml.compile(model, b, shapes={"input": [4, 3]}, constant_keys={"linear.weight": b.array(w)})
    assert pm.input_keys == ("input",)
