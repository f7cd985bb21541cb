"""The published segformer decode head (``examples/segformer/segformer_decode_head.py``): its
expression methods ``.floor()`` and ``.clamp(min, max)`` (number bounds, and a connection or
shape-wire bound as ``x.clamp(0, H_in - 1)``) and a shape wire met with a connection in
arithmetic (``H_in / H_out``), on NumPy, torch and JAX in float64 against torch (values and
autograd's gradients). What the published file needs beyond those is a strict xfail naming
the file it needs."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import evaluate_np, jax_float64, np_dict

import mithril as ml
from mithril.models import Buffer, IOKey, Model, Tensor

BACKENDS = {"numpy": ml.NumpyBackend, "torch": ml.TorchBackend, "jax": ml.JaxBackend}
RNG = np.random.default_rng(5130)


def _run_in(name: str, go):
    if name == "jax":
        with jax_float64():
            return go()
    return go()


def _run(name: str, model: Model, shapes: dict, data: dict, cot: dict,
         trainable: set[str]) -> tuple[dict, dict]:
    def go():
        b = BACKENDS[name](dtype="float64")
        pm = ml.compile(model, b, shapes=shapes, trainable_keys=trainable, jit=True)
        params = {k: v for k, v in data.items() if k in trainable}
        rest = {k: v for k, v in data.items() if k not in trainable}
        return evaluate_np(pm, b, params, rest, cot)

    return _run_in(name, go)


def _run_stateful(name: str, model: Model, shapes: dict, trainable: set[str],
                  inputs: dict, cot: dict) -> tuple[dict, dict, dict]:
    """Outputs, gradients and the BatchNorm state after one evaluate from the model's
    initial state (all of ``inputs`` given as trainable inputs or parameters)."""
    def go():
        b = BACKENDS[name](dtype="float64")
        pm = ml.compile(model, b, shapes=shapes, trainable_keys=trainable, jit=True)
        out, grads, state = pm.evaluate({k: b.array(v) for k, v in inputs.items()}, {},
                                        {k: b.array(v) for k, v in cot.items()},
                                        state=pm.initial_state_dict)
        return np_dict(b, out), np_dict(b, grads), np_dict(b, state)

    return _run_in(name, go)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_floor_and_clamp_match_torch(name):
    """``x.floor()``, ``x.clamp(-0.5, 0.75)``, ``x.clamp(max=0.2)``, ``x.clamp(lo, hi)``
    (connection bounds) and ``x.clamp(0, x.shape[1] - 4)`` (a shape wire bound): values
    and gradients (the ends included, as torch: x equal to a bound passes its gradient)."""
    x, lo, hi = IOKey("x", type=Tensor[float]), IOKey("lo", type=Tensor[float]), \
        IOKey("hi", type=Tensor[float])
    m = Model.create(f=x.floor() * x, c=x.clamp(-0.5, 0.75), u=x.clamp(max=0.2),
                     t=x.clamp(lo, hi), s=x.clamp(0, x.shape[1] - 4))
    xv = RNG.standard_normal((3, 5)) * 2
    xv[0, :3] = [-0.5, 0.75, 0.2]  # (at the bounds)
    lov, hiv = RNG.standard_normal((5,)) - 0.5, RNG.standard_normal((3, 1)) + 0.5
    xv[1, 0], xv[2, 1] = lov[0], hiv[2, 0]
    data = {"x": xv, "lo": lov, "hi": hiv}
    t = {k: torch.tensor(v, requires_grad=True) for k, v in data.items()}
    tx = t["x"]
    want = {"f": tx.floor() * tx, "c": tx.clamp(-0.5, 0.75), "u": tx.clamp(max=0.2),
            "t": torch.clamp(tx, t["lo"], t["hi"]), "s": tx.clamp(0, 1)}
    cot = {k: RNG.standard_normal(v.shape) for k, v in want.items()}
    torch.autograd.backward(list(want.values()), [torch.tensor(cot[k]) for k in want])
    shapes = {k: list(v.shape) for k, v in data.items()}
    out, grads = _run(name, m, shapes, data, cot, {"x", "lo", "hi"})
    for k, v in want.items():
        np.testing.assert_allclose(out[k], v.detach().numpy(), rtol=0, atol=1e-15, err_msg=k)
    for k, v in t.items():
        np.testing.assert_allclose(grads[k], v.grad.numpy(), rtol=0, atol=1e-15, err_msg=k)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_a_shape_wire_in_arithmetic_with_a_connection(name):
    """``x / x.shape[1]`` and ``(x.shape[0] * x.shape[1]) - x`` as torch computes them."""
    x = IOKey("x", type=Tensor[float])
    m = Model.create(a=x / x.shape[1], b=x.shape[0] * x.shape[1] - x)
    xv = RNG.standard_normal((3, 5))
    tx = torch.tensor(xv, requires_grad=True)
    want = {"a": tx / 5, "b": 15 - tx}
    cot = {k: RNG.standard_normal(v.shape) for k, v in want.items()}
    torch.autograd.backward(list(want.values()), [torch.tensor(cot[k]) for k in want])
    out, grads = _run(name, m, {"x": [3, 5]}, {"x": xv}, cot, {"x"})
    for k, v in want.items():
        np.testing.assert_allclose(out[k], v.detach().numpy(), rtol=0, atol=1e-15, err_msg=k)
    np.testing.assert_allclose(grads["x"], tx.grad.numpy(), rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", ["numpy", "torch", "jax"])
def test_two_sizes_divided_are_in_the_models_float_dtype(name):
    """The published scale factor ``H_in / H_out``: two sizes, one a connection (a Size
    output), divided in the model's float dtype (torch's with float64 its default dtype)."""
    x = IOKey("x", type=Tensor[float])
    h_out = Buffer()(input=x.shape[0])
    m = Model.create(s=x.shape[1] / h_out)

    def go():
        b = BACKENDS[name](dtype="float64")
        pm = ml.compile(m, b, shapes={"x": [3, 5]}, jit=True, inference=True)
        return np_dict(b, pm.evaluate({}, {"x": b.array(np.zeros((3, 5)))}))["s"]
    got = _run_in(name, go)
    want = torch.tensor(5, dtype=torch.float64) / 3
    assert str(got.dtype) == "float64"
    np.testing.assert_array_equal(got, want.numpy())


def test_clamp_refuses_bad_bounds_by_name():
    x = IOKey("x")
    with pytest.raises(ValueError, match="Clamp: give min_val, max_val or both"):
        x.clamp()
    with pytest.raises(TypeError, match="unsupported operand for 'clamp' with IOKey\\('x'\\): "
                       "str 'a'"):
        x.clamp(0, "a")


# synnada-ai/mithril examples/segformer/segformer_decode_head.py, verbatim (but its license
# header)
DECODE_HEAD = '''
from mithril.framework import IOKey, Tensor
from mithril.models import (
    Arange,
    BatchNorm2D,
    Concat,
    Convolution2D,
    Flatten,
    Linear,
    Model,
    Relu,
)
from mithril.types import Dtype


def segformer_bilinear_interpolate(*, name: str | None = None):
    input = IOKey("input", type=Tensor[float])
    size = IOKey("size", type=tuple[int, ...])

    input_dtype = input.dtype()
    shape = input.shape
    H_in, W_in = shape[2], shape[3]
    H_out, W_out = size[0], size[1]
    # Scale factors
    scale_y = H_in / H_out
    scale_x = W_in / W_out

    # Create normalized grid (i.e., in input pixel space)
    yy = ((Arange()(stop=H_out) + 0.5) * scale_y - 0.5).clamp(0, H_in - 1)
    xx = ((Arange()(stop=W_out) + 0.5) * scale_x - 0.5).clamp(0, W_in - 1)

    y0 = yy.floor().cast(Dtype.int64)
    x0 = xx.floor().cast(Dtype.int64)
    y1 = (y0 + 1).clamp(0, H_in - 1)
    x1 = (x0 + 1).clamp(0, W_in - 1)

    ly = (yy - y0.cast(input_dtype)).reshape((1, 1, H_out, 1))
    lx = (xx - x0.cast(input_dtype)).reshape((1, 1, 1, W_out))
    hy = 1.0 - ly
    hx = 1.0 - lx

    Ia = input[:, :, y0[:, None], x0]  # top-left
    Ib = input[:, :, y1[:, None], x0]  # bottom-left
    Ic = input[:, :, y0[:, None], x1]  # top-right
    Id = input[:, :, y1[:, None], x1]  # bottom-right

    wa = hy * hx
    wb = ly * hx
    wc = hy * lx
    wd = ly * lx
    out = Ia * wa + Ib * wb + Ic * wc + Id * wd

    return Model.create(name=name, output=out)


def segformer_mlp(decoder_hidden_size, *, name: str | None = None) -> Model:
    input = IOKey("input", type=Tensor[float])

    hidden_states = Flatten(start_dim=2)(input=input).transpose(axes=(0, 2, 1))
    hidden_states = Linear(decoder_hidden_size, name="proj")(input=hidden_states)
    return Model.create(name=name, output=hidden_states)


def segformer_decode_head(config, *, name: str | None = None) -> Model:
    hidden_states = IOKey(
        "input", value=tuple(Tensor() for _ in range(config.num_encoder_blocks))
    )

    hidden_shapes = [
        [1, 64, 128, 128],
        [1, 128, 64, 64],
        [1, 320, 32, 32],
        [1, 512, 16, 16],
    ]
    batch_size = hidden_states[0].shape[0]
    size = hidden_states[0].shape[2:]
    num_encoder_blocks = config.num_encoder_blocks
    all_hidden_states: list[IOKey] = []

    for i in range(num_encoder_blocks):
        encoder_hidden_state: IOKey = hidden_states[i]
        encoder_hidden_state.set_shapes(hidden_shapes[i])
        # Unify channel dimension.
        shape = encoder_hidden_state.shape
        height, width = shape[2], shape[3]
        encoder_hidden_state = segformer_mlp(
            config.decoder_hidden_size, name=f"linear_c_{i}"
        )(input=encoder_hidden_state)
        encoder_hidden_state = encoder_hidden_state.transpose(axes=(0, 2, 1))
        encoder_hidden_state = encoder_hidden_state.reshape(
            shape=(batch_size, -1, height, width)
        )
        # Upsample.
        encoder_hidden_state = segformer_bilinear_interpolate()(
            input=encoder_hidden_state, size=size
        )
        all_hidden_states.append(encoder_hidden_state)

    # Concatenate all hidden states.
    hidden_states = Concat(axis=1)(input=all_hidden_states[::-1])
    hidden_states = Convolution2D(
        out_channels=config.decoder_hidden_size,
        kernel_size=1,
        use_bias=False,
        name="linear_fuse",
    )(input=hidden_states)
    hidden_states = BatchNorm2D(config.decoder_hidden_size, name="batch_norm")(
        input=hidden_states
    )
    hidden_states = Relu()(input=hidden_states)
    hidden_states = Convolution2D(
        out_channels=config.num_labels,
        kernel_size=1,
        name="classifier",
    )(input=hidden_states)
    return Model.create(name=name, logits=hidden_states)
'''


_TUPLE_INPUT = '''    hidden_states = IOKey(
        "input", value=tuple(Tensor() for _ in range(config.num_encoder_blocks))
    )'''
_SET_SHAPES = "        encoder_hidden_state.set_shapes(hidden_shapes[i])\n"


def published_decode_head(*patches: tuple[str, str]) -> dict:
    """The published file's functions, its text (imports included) with ``patches`` (old,
    new) applied."""
    src = DECODE_HEAD
    for old, new in patches:
        assert old in src, old
        src = src.replace(old, new)
    namespace: dict = {}
    exec(compile(src, "segformer_decode_head.py", "exec"), namespace)  # noqa: S102
    return namespace


def test_the_published_decode_head_imports():
    from mithril.types import Dtype

    assert Dtype.int64 == "int64" and str(Dtype.float32) == "float32"
    assert ml.NumpyBackend(dtype=Dtype.float64).dtype == "float64"


def test_the_published_decode_head_builds():
    cfg = SimpleNamespace(num_encoder_blocks=4, decoder_hidden_size=8, num_labels=3)
    published_decode_head()["segformer_decode_head"](cfg)


def test_the_published_decode_head_builds_with_its_tuple_input():
    """Verbatim: ``IOKey("input", value=tuple(Tensor() ...))`` is a tuple of
    inputs ``input_0`` .. (in order), indexed ``hidden_states[i]``; ``set_shapes`` on an
    element declares that input's shape (before: TypeError, "Tensor() without a value")."""
    cfg = SimpleNamespace(num_encoder_blocks=4, decoder_hidden_size=8, num_labels=3)
    head = published_decode_head()["segformer_decode_head"]
    m = head(cfg)
    assert m.input_keys == ("input_0", "input_1", "input_2", "input_3")
    shapes = ml.compile(m, ml.NumpyBackend(dtype="float64")).get_shapes()
    assert [shapes[f"input_{i}"] for i in range(4)] == [[1, 64, 128, 128], [1, 128, 64, 64],
                                                         [1, 320, 32, 32], [1, 512, 16, 16]]
    assert shapes["logits"] == [1, 3, 128, 128]
    with pytest.raises(ml.ShapeError, match=r"'input_0' has shape \[1, 64, 128, 128\] but "
                       r"'input_0 \(compile shapes\)' has shape \[1, 3, 8, 8\]"):
        ml.compile(m, ml.NumpyBackend(), shapes={"input_0": [1, 3, 8, 8]})


def test_a_tuple_input_refuses_what_is_no_tuple_of_as_many():
    from mithril.models import TBD, Relu, ToTuple

    hs = IOKey("hs", value=(TBD, TBD))
    inner = Model.create(hs[0] + hs[1])
    assert inner.input_keys == ("hs_0", "hs_1")
    x = IOKey("x")
    for given, err, msg in ((x, TypeError, r"'hs' is a tuple of 2 inputs: give it a ToTuple"),
                            (ToTuple(3)(x, x, x), ValueError, r"'hs' takes a tuple of 2 arrays, "
                                                               r"got a tuple of 3")):
        call = inner(hs=given)
        with pytest.raises(err, match=msg):
            Model.create(call)
        assert call.home is None and not inner._used
    m = Model.create(inner(hs=ToTuple(2)(Relu()(input=x), x)))
    out = ml.compile(m, ml.NumpyBackend(dtype="float64")).evaluate({}, {"x": np.array([-2.0, 3.0])})
    np.testing.assert_allclose(out["output"], [-2.0, 6.0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="a tuple of inputs .* is a named input"):
        Model.create(IOKey(value=(TBD, TBD))[0] + 1)


def bilinear_with_an_untyped_size():
    """The published bilinear interpolation, verbatim (its ``size`` typed
    ``tuple[int, ...]``: a 1-d integer array here, a Shape output's)."""
    return published_decode_head()["segformer_bilinear_interpolate"]


@pytest.mark.parametrize("name", ["numpy", "torch", "jax"])
def test_the_published_bilinear_interpolation_is_torch_interpolate(name):
    """Upsampling (4, 5) -> (8, 7) and downsampling to (3, 2), ``size`` given as another
    input's ``x.shape[2:]`` (its values known at compile time: the Aranges' ends and the
    reshapes' sizes): ``F.interpolate(mode="bilinear", align_corners=False)``'s values and
    gradients, jitted on JAX."""
    interp = bilinear_with_an_untyped_size()
    x, up, down = (IOKey(k, type=Tensor[float]) for k in ("input", "up", "down"))
    m = Model.create(big=interp(name="i0")(input=x, size=up.shape[2:]),
                     small=interp(name="i1")(input=x, size=down.shape[2:]))
    xv = RNG.standard_normal((2, 3, 4, 5))
    tx = torch.tensor(xv, requires_grad=True)
    want = {"big": F.interpolate(tx, size=(8, 7), mode="bilinear", align_corners=False),
            "small": F.interpolate(tx, size=(3, 2), mode="bilinear", align_corners=False)}
    cot = {k: RNG.standard_normal(v.shape) for k, v in want.items()}
    torch.autograd.backward(list(want.values()), [torch.tensor(cot[k]) for k in want])
    data = {"input": xv, "up": np.zeros((1, 1, 8, 7)), "down": np.zeros((1, 1, 3, 2))}
    out, grads = _run(name, m, {k: list(v.shape) for k, v in data.items()}, data, cot, {"input"})
    for k, v in want.items():
        np.testing.assert_allclose(out[k], v.detach().numpy(), rtol=0, atol=1e-14, err_msg=k)
    np.testing.assert_allclose(grads["input"], tx.grad.numpy(), rtol=0, atol=1e-14)


_EACH_INPUT = '''    hidden_states = tuple(
        IOKey(f"input_{i}", type=Tensor[float]) for i in range(config.num_encoder_blocks)
    )'''


def _decode_head_torch(t: dict, hs: list[torch.Tensor], running: dict) -> torch.Tensor:
    """HF ``SegformerDecodeHead`` in nn.functional, training mode (batch statistics; the
    running ones in ``running`` updated as nn.BatchNorm2d's buffers)."""
    outs = []
    for i, h in enumerate(hs):
        b, _, height, width = h.shape
        e = F.linear(h.flatten(2).transpose(1, 2), t[f"linear_c_{i}.proj.weight"],
                     t[f"linear_c_{i}.proj.bias"])
        e = e.permute(0, 2, 1).reshape(b, -1, height, width)
        outs.append(F.interpolate(e, size=hs[0].shape[2:], mode="bilinear", align_corners=False))
    x = F.conv2d(torch.cat(outs[::-1], dim=1), t["linear_fuse.weight"])
    x = F.batch_norm(x, running["mean"], running["var"], t["batch_norm.weight"],
                     t["batch_norm.bias"], training=True, momentum=0.1, eps=1e-5)
    return F.conv2d(F.relu(x), t["classifier.weight"], t["classifier.bias"])


@pytest.mark.parametrize("name", ["numpy", "torch", "jax"])
def test_the_published_decode_head_matches_torch(name):
    """The decode head with its tuple input as one input per stage (``input_0`` ..; the
    tuple waits on test_the_published_decode_head_builds) and no ``set_shapes`` of the
    published full-size shapes: the rest verbatim (per-stage MLPs, reshapes by shape wires,
    bilinear upsampling to stage 0's size, Concat of the reversed list, fuse conv, BatchNorm2D
    on batch statistics, ReLU, classifier) against torch's values and gradients."""
    cfg = SimpleNamespace(num_encoder_blocks=3, decoder_hidden_size=5, num_labels=3)
    head = published_decode_head((_TUPLE_INPUT, _EACH_INPUT),
                                 (_SET_SHAPES, ""))["segformer_decode_head"](cfg, name="head")
    shapes = {"input_0": [2, 4, 8, 6], "input_1": [2, 6, 4, 3], "input_2": [2, 7, 2, 2]}
    pm = ml.compile(head, ml.NumpyBackend(dtype="float64"), shapes=shapes)
    params = {k: RNG.standard_normal(v) * 0.4 for k, v in pm.parameter_shapes.items()}
    data = {k: RNG.standard_normal(v) for k, v in shapes.items()}
    t = {k: torch.tensor(v, requires_grad=True) for k, v in {**params, **data}.items()}
    running = {"mean": torch.zeros(5, dtype=torch.float64), "var": torch.ones(5, dtype=torch.float64)}
    want = _decode_head_torch(t, [t[k] for k in shapes], running)
    assert tuple(want.shape) == (2, 3, 8, 6) and head.output_keys == ("logits",)
    cot = RNG.standard_normal(want.shape)
    want.backward(torch.tensor(cot))

    out, grads, state = _run_stateful(name, head, shapes, set(shapes), {**params, **data},
                                      {"logits": cot})
    np.testing.assert_allclose(out["logits"], want.detach().numpy(), rtol=0, atol=1e-12)
    for k in ("mean", "var"):
        np.testing.assert_allclose(state[f"batch_norm.running_{k}"], running[k].numpy(), rtol=0,
                                   atol=1e-14, err_msg=k)
    assert int(state["batch_norm.num_batches_tracked"]) == 1
    assert set(grads) == set(t)
    for k, v in t.items():
        np.testing.assert_allclose(grads[k], v.grad.numpy(), rtol=0, atol=1e-12, err_msg=k)


# synnada-ai/mithril examples/segformer/segformer_semantic_segmentation.py, verbatim (but its
# license header; its two relative imports are the functions given to it)
SEMANTIC = '''
from mithril.framework import IOKey, Tensor
from mithril.models import Model

from .segformer_decode_head import segformer_decode_head
from .segformer_encoder import segformer_encoder


def segformer(config, *, name: str | None = None):
    pixel_values = IOKey("input", type=Tensor[float])
    last_hidden, encoder_hidden_states = segformer_encoder(config, name="encoder")(
        input=pixel_values
    )
    return Model.create(
        name=name, last_hidden_state=last_hidden, hidden_states=encoder_hidden_states
    )


def segformer_semantic_segmentation(config, *, name: str | None = None):
    pixel_values = IOKey("input", type=Tensor[float])
    last_hidden_state, hidden_states = segformer(config, name="segformer")(
        input=pixel_values
    )
    logits = segformer_decode_head(config, name="decode_head")(input=hidden_states)
    return Model.create(name=name, logits=logits)
'''


def published_semantic_segmentation() -> dict:
    """The published file with the encoder (verbatim) and the decode head (its full-size
    ``set_shapes`` left out) as its imports give them."""
    from test_published_functional_segformer import published

    namespace = {"segformer_encoder": published()["segformer_encoder"],
                 "segformer_decode_head": published_decode_head(
                     (_SET_SHAPES, ""))["segformer_decode_head"]}
    src = SEMANTIC.replace("from .segformer_decode_head import segformer_decode_head\n", "")
    exec(compile(src.replace("from .segformer_encoder import segformer_encoder\n", "").replace(  # noqa: S102
        "from mithril.framework import", "from mithril.models import"), "segformer.py", "exec"),
        namespace)
    return namespace


@pytest.mark.parametrize("name", ["numpy", "torch", "jax"])
def test_the_published_semantic_segmentation_matches_torch(name):
    """The whole published segformer: the encoder's ToTuple output a list output of the
    ``segformer`` model, given whole to the decode head's tuple input; values, gradients
    (parameters and pixels) and BatchNorm's running statistics against torch in float64."""
    from test_published_segformer_encoder import CONFIG, _encoder

    cfg = SimpleNamespace(**vars(CONFIG), decoder_hidden_size=5, num_labels=3)
    model = published_semantic_segmentation()["segformer_semantic_segmentation"](cfg, name="s")
    assert model.input_keys == ("input",) and model.output_keys == ("logits",)
    shapes = {"input": [2, 3, 16, 12]}
    pm = ml.compile(model, ml.NumpyBackend(dtype="float64"), shapes=shapes)
    params = {k: RNG.standard_normal(v) * (0.3 if len(v) > 1 else 0.1) + (
        len(v) == 1 and k.endswith("weight")) for k, v in pm.parameter_shapes.items()}
    x = RNG.standard_normal((2, 3, 16, 12))
    t = {k: torch.tensor(v, requires_grad=True) for k, v in {**params, "input": x}.items()}
    enc = {k.removeprefix("segformer.encoder."): v for k, v in t.items()}
    head = {k.removeprefix("decode_head."): v for k, v in t.items()}
    running = {"mean": torch.zeros(5, dtype=torch.float64), "var": torch.ones(5, dtype=torch.float64)}
    want = _decode_head_torch(head, _encoder(enc, t["input"], cfg), running)
    assert tuple(want.shape) == (2, 3, 4, 3)
    cot = RNG.standard_normal(want.shape)
    want.backward(torch.tensor(cot))

    out, grads, state = _run_stateful(name, model, shapes, {"input"}, {**params, "input": x},
                                      {"logits": cot})
    np.testing.assert_allclose(out["logits"], want.detach().numpy(), rtol=0, atol=1e-12)
    for k in ("mean", "var"):
        np.testing.assert_allclose(state[f"decode_head.batch_norm.running_{k}"],
                                   running[k].numpy(), rtol=0, atol=1e-14, err_msg=k)
    assert set(grads) == set(t)
    for k, v in t.items():
        np.testing.assert_allclose(grads[k], v.grad.numpy(), rtol=0, atol=1e-12, err_msg=k)
