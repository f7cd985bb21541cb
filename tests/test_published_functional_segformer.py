"""The published segformer example (``examples/segformer/segformer_encoder.py``), written in
the functional API: its attention (sequence reduction 1) and overlapping patch embeddings run
as published on NumPy, torch and JAX in float64, outputs and gradients against
torch.nn.functional (HF ``SegformerEfficientSelfAttention`` / ``SegformerOverlapPatchEmbeddings``
arithmetic) with the same weights. The dwconv, layer and whole encoder are checked in
test_published_segformer_encoder.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import evaluate_np, jax_float64

import mithril as ml

BACKENDS = {"numpy": ml.NumpyBackend, "torch": ml.TorchBackend, "jax": ml.JaxBackend}
F64 = dict(rtol=0, atol=1e-12)
PUBLISHED_IMPORT = "from mithril.framework import IOKey, Tensor"

# synnada-ai/mithril examples/segformer/segformer_encoder.py, verbatim (but its license header;
# its import line is checked as published in test_the_published_import_line)
SRC = '''
from mithril.framework import IOKey, Tensor
from mithril.models import (
    Buffer,
    Convolution2D,
    Flatten,
    Gelu,
    LayerNorm,
    Linear,
    Model,
    Softmax,
    ToTuple,
)


def segformer_dwconv(dim=768, *, name: str | None = None) -> Model:
    hidden_states = IOKey("input", type=Tensor[float])
    height = IOKey("height")
    width = IOKey("width")

    shape = hidden_states.shape
    batch_size = shape[0]
    num_channels = shape[2]
    hidden_states = hidden_states.transpose(axes=(0, 2, 1))
    hidden_states = hidden_states.reshape(
        shape=(batch_size, num_channels, height, width)
    )
    hidden_states = Convolution2D(
        kernel_size=3,
        out_channels=dim,
        padding=1,
        use_bias=True,
        groups=dim,
        name="dwconv",
    )(input=hidden_states)
    hidden_states = Flatten(start_dim=2)(input=hidden_states).transpose(axes=(0, 2, 1))
    # Final outputs
    return Model.create(name=name, output=hidden_states)


def segformer_mixffn(
    in_features, hidden_features=None, out_features=None, *, name: str | None = None
):
    input = IOKey("input", type=Tensor[float])
    height = IOKey("height")
    width = IOKey("width")

    out_features = out_features or in_features
    hidden_states = Linear(hidden_features, name="dense1")(input=input)
    hidden_states = segformer_dwconv(dim=hidden_features, name="dwconv")(
        input=hidden_states, height=height, width=width
    )
    hidden_states = Gelu(name="intermediate_act_fn")(hidden_states)
    hidden_states = Linear(out_features, name="dense2")(input=hidden_states)
    return Model.create(name=name, output=hidden_states)


def segformer_self_output(hidden_size, *, name: str | None = None):
    input = IOKey("input", type=Tensor[float])
    hidden_states = Linear(hidden_size, name="dense")(input=input)
    return Model.create(name=name, output=hidden_states)


def transpose_for_scores(
    num_attention_heads, attention_head_size, *, name: str | None = None
):
    hidden_states = IOKey("input", type=Tensor[float])
    hidden_states_shp = hidden_states.shape
    new_shape = (
        hidden_states_shp[0],
        hidden_states_shp[1],
        num_attention_heads,
        attention_head_size,
    )
    hidden_states = hidden_states.reshape(new_shape).transpose(axes=(0, 2, 1, 3))
    return Model.create(name=name, output=hidden_states)


def segformer_efficient_self_attention(
    hidden_size,
    num_attention_heads,
    sequence_reduction_ratio,
    *,
    name: str | None = None,
):
    hidden_states = IOKey("input", type=Tensor[float])
    height = IOKey("height")
    width = IOKey("width")

    if hidden_size % num_attention_heads != 0:
        raise ValueError(
            f"The hidden size ({hidden_size}) is not a multiple of"
            f"the number of attention heads ({num_attention_heads})"
        )
    # NOTE: "height" and "width" keys are only used if sequence_reduction_ratio > 1.
    # We have to add them to the model regardless of sequence_reduction_ratio
    # to keep the API consistent.
    height = Buffer()(input=height)
    width = Buffer()(input=width)

    attention_head_size = int(hidden_size / num_attention_heads)
    all_head_size = num_attention_heads * attention_head_size

    query = Linear(hidden_size, name="query")(input=hidden_states)
    query_layer = transpose_for_scores(num_attention_heads, attention_head_size)(
        input=query
    )

    if sequence_reduction_ratio > 1:
        shape = hidden_states.shape
        batch_size = shape[0]
        num_channels = shape[2]
        hidden_states = hidden_states.transpose(axes=(0, 2, 1)).reshape(
            (batch_size, num_channels, height, width)
        )
        hidden_states = Convolution2D(
            kernel_size=sequence_reduction_ratio,
            out_channels=hidden_size,
            stride=sequence_reduction_ratio,
            name="sr",
        )(input=hidden_states)
        hidden_states = hidden_states.reshape((batch_size, num_channels, -1)).transpose(
            axes=(0, 2, 1)
        )
        hidden_states = LayerNorm(name="layer_norm")(input=hidden_states)

    key = Linear(hidden_size, name="key")(input=hidden_states)
    key_layer = transpose_for_scores(num_attention_heads, attention_head_size)(
        input=key
    )
    value = Linear(hidden_size, name="value")(input=hidden_states)
    value_layer = transpose_for_scores(num_attention_heads, attention_head_size)(
        input=value
    )

    attention_scores = query_layer @ key_layer.transpose(axes=(0, 1, 3, 2))
    attention_scores = attention_scores / (attention_head_size**0.5)
    attention_probs = Softmax()(input=attention_scores)
    context_layer = attention_probs @ value_layer
    context_layer = context_layer.transpose(axes=(0, 2, 1, 3))
    context_shp = context_layer.shape
    new_context_layer_shape = (context_shp[0], context_shp[1], all_head_size)
    # new_context_layer_shape = context_layer.shape[:-2] + (all_head_size,)
    context_layer = context_layer.reshape(new_context_layer_shape)
    return Model.create(
        name=name, output=context_layer, height_out=height, width_out=width
    )


def segformer_attention(
    hidden_size,
    num_attention_heads,
    sequence_reduction_ratio,
    *,
    name: str | None = None,
):
    hidden_states = IOKey("input", type=Tensor[float])
    height = IOKey("height")
    width = IOKey("width")

    self_output, _, _ = segformer_efficient_self_attention(
        hidden_size, num_attention_heads, sequence_reduction_ratio, name="self"
    )(input=hidden_states, height=height, width=width)
    self_output = segformer_self_output(hidden_size, name="output")(input=self_output)
    return Model.create(name=name, output=self_output)


def segformer_layer(
    hidden_size,
    num_attention_heads,
    sequence_reduction_ratio,
    mlp_ratio,
    *,
    name: str | None = None,
):
    hidden_states = IOKey("input", type=Tensor[float])
    height = IOKey("height")
    width = IOKey("width")

    attention_input = LayerNorm(name="layer_norm_1")(input=hidden_states)
    attention_output = segformer_attention(
        hidden_size, num_attention_heads, sequence_reduction_ratio, name="attention"
    )(input=attention_input, height=height, width=width)
    hidden_states = attention_output + hidden_states
    mlp_input = LayerNorm(name="layer_norm_2")(input=hidden_states)
    mlp_hidden_size = int(hidden_size * mlp_ratio)
    mlp_output = segformer_mixffn(hidden_size, mlp_hidden_size, name="mlp")(
        input=mlp_input, height=height, width=width
    )
    layer_output = mlp_output + hidden_states
    return Model.create(name=name, output=layer_output)


def segformer_overlap_patch_embeddings(
    patch_size, stride, hidden_size, *, name: str | None = None
):
    pixel_values = IOKey("input", type=Tensor[float])
    embeddings = Convolution2D(
        patch_size, hidden_size, stride, patch_size // 2, name="proj"
    )(input=pixel_values)
    shape = embeddings.shape
    height, width = shape[2], shape[3]
    embeddings = Flatten(start_dim=2)(input=embeddings).transpose(axes=(0, 2, 1))
    embeddings = LayerNorm(name="layer_norm")(input=embeddings)
    return Model.create(name=name, embeddings=embeddings, height=height, width=width)


def segformer_block(
    hidden_size,
    num_attention_heads,
    depth,
    sequence_reduction_ratio,
    mlp_ratio,
    *,
    name: str | None = None,
) -> Model:
    hidden_states = IOKey("input", type=Tensor[float])
    height = IOKey("height")
    width = IOKey("width")

    for i in range(depth):
        hidden_states = segformer_layer(
            hidden_size,
            num_attention_heads,
            sequence_reduction_ratio,
            mlp_ratio,
            name=f"{i}",
        )(input=hidden_states, height=height, width=width)
    return Model.create(name=name, output=hidden_states)


def segformer_encoder(config, *, name: str | None = None):
    pixel_values = IOKey("input", type=Tensor[float])
    hidden_states = pixel_values
    num_encoder_blocks = config.num_encoder_blocks
    batch_size = pixel_values.shape[0]
    all_hidden_states = []
    for i in range(num_encoder_blocks):
        # Patch Embeddings.
        hidden_states, height, width = segformer_overlap_patch_embeddings(
            config.patch_sizes[i],
            config.strides[i],
            config.hidden_sizes[i],
            name=f"patch_embeddings_{i}",
        )(input=hidden_states)
        # Transformers.
        hidden_states = segformer_block(
            config.hidden_sizes[i],
            config.num_attention_heads[i],
            config.depths[i],
            config.sr_ratios[i],
            config.mlp_ratios[i],
            name=f"block_{i}",
        )(input=hidden_states, height=height, width=width)
        # Layer Norm.
        hidden_states = LayerNorm(name=f"layer_norm_{i}")(input=hidden_states)
        # Reshape back to (batch_size, num_channels, height, width).
        if i != num_encoder_blocks - 1 or (
            i == num_encoder_blocks - 1 and config.reshape_last_stage
        ):
            hidden_states = hidden_states.reshape(
                (batch_size, height, width, -1)
            ).transpose(axes=(0, 3, 1, 2))
        all_hidden_states.append(hidden_states)

    hidden_states_tuple = ToTuple(n=num_encoder_blocks)(*all_hidden_states)
    return Model.create(
        name=name, output=hidden_states, hidden_states=hidden_states_tuple
    )
'''


def published(import_line: str = "from mithril.models import IOKey, Tensor") -> dict:
    """The functions of the published file, defined afresh."""
    namespace: dict = {}
    exec(compile(SRC.replace(PUBLISHED_IMPORT, import_line), "segformer_encoder.py", "exec"),  # noqa: S102
         namespace)
    return namespace


def _run(name: str, model, shapes: dict, params: dict, data: dict, cot: dict):
    def go():
        b = BACKENDS[name](dtype="float64")
        return evaluate_np(ml.compile(model, b, shapes=shapes), b, params, data, cot)

    if name == "jax":
        with jax_float64():
            return go()
    return go()


def _check(got: tuple[dict, dict], want: dict, t: dict) -> None:
    out, grads = got
    for k, v in want.items():
        np.testing.assert_allclose(out[k], v, **F64, err_msg=k)
    assert set(grads) == set(t)
    for k, v in t.items():
        np.testing.assert_allclose(grads[k], v.grad.numpy(), **F64, err_msg=k)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_segformer_attention_matches_torch(name):
    B, N, C, H = 2, 6, 8, 2
    model = published()["segformer_attention"](C, H, 1, name="attention")
    assert model.input_keys == ("input", "height", "width") and model.output_keys == ("output",)
    rng = np.random.default_rng(5)
    shapes = {"input": [B, N, C], "height": [], "width": []}
    pm = ml.compile(model, ml.NumpyBackend(dtype="float64"), shapes=shapes)
    assert list(pm.parameter_shapes) == [f"self.{r}.{p}" for r in ("query", "key", "value")
                                         for p in ("weight", "bias")] + [
        "output.dense.weight", "output.dense.bias"]
    params = {k: rng.standard_normal(v) * 0.5 for k, v in pm.parameter_shapes.items()}
    x, cot = rng.standard_normal((B, N, C)), rng.standard_normal((B, N, C))
    data = {"input": x, "height": np.array(2), "width": np.array(3)}
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    xt = torch.tensor(x)

    def heads(z: torch.Tensor) -> torch.Tensor:
        return z.reshape(B, N, H, C // H).transpose(1, 2)

    q, k, v = (heads(F.linear(xt, t[f"self.{r}.weight"], t[f"self.{r}.bias"]))
               for r in ("query", "key", "value"))
    probs = torch.softmax(q @ k.transpose(-1, -2) / (C // H) ** 0.5, dim=-1)
    ctx = (probs @ v).transpose(1, 2).reshape(B, N, C)
    out = F.linear(ctx, t["output.dense.weight"], t["output.dense.bias"])
    out.backward(torch.tensor(cot))
    _check(_run(name, model, shapes, params, data, {"output": cot}),
           {"output": out.detach().numpy()}, t)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_segformer_overlap_patch_embeddings_match_torch(name):
    model = published()["segformer_overlap_patch_embeddings"](7, 4, 8, name="patch_embeddings_0")
    assert model.output_keys == ("embeddings", "height", "width")
    rng = np.random.default_rng(6)
    shapes = {"input": [2, 3, 16, 12]}
    pm = ml.compile(model, ml.NumpyBackend(dtype="float64"), shapes=shapes)
    params = {k: rng.standard_normal(v) * 0.3 for k, v in pm.parameter_shapes.items()}
    x, cot = rng.standard_normal((2, 3, 16, 12)), rng.standard_normal((2, 12, 8))
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    e = F.conv2d(torch.tensor(x), t["proj.weight"], t["proj.bias"], stride=4, padding=3)
    h, w = e.shape[2:]
    e = F.layer_norm(e.flatten(2).transpose(1, 2), (8,), t["layer_norm.weight"],
                     t["layer_norm.bias"], 1e-5)
    e.backward(torch.tensor(cot))
    got = _run(name, model, shapes, params, {"input": x}, {"embeddings": cot})
    _check(got, {"embeddings": e.detach().numpy()}, t)
    assert (int(got[0]["height"]), int(got[0]["width"])) == (h, w) == (4, 3)


def test_the_published_import_line():
    assert "segformer_attention" in published(PUBLISHED_IMPORT)


def test_segformer_dwconv_reshapes_by_connections():
    """``x.reshape((B, C, height, width))`` with ``height`` / ``width`` the sub-model's inputs:
    built, and compiled once they carry values known at compile time (its numbers against
    torch: test_published_segformer_encoder.py); a data input there is refused by name."""
    model = published()["segformer_dwconv"](8, name="dwconv")
    assert model.input_keys == ("input", "height", "width") and model.output_keys == ("output",)
    b = ml.NumpyBackend(dtype="float64")
    with pytest.raises(ml.ShapeError, match=r"size 2 of the shape, IOKey\('height'\), is a "
                       "connection whose value is computed by the run"):
        ml.compile(model, b, shapes={"input": [2, 12, 8]})
    pm = ml.compile(model, b, shapes={"input": [2, 12, 8]},
                    constant_keys={"height": 4, "width": 3})
    assert pm.parameter_shapes == {"dwconv.weight": (8, 1, 3, 3), "dwconv.bias": (8,)}
    assert pm.program.output_shape("output") == (2, 12, 8)
