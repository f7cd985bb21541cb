"""Edge cases of the convolution, pooling, normalisation, activation and loss blocks, side by
side with ``torch.nn.functional`` in float64 on NumPy, JAX and torch: the output and the
gradient of every parameter and input within 1e-10 (relative to max(1, |torch|)).

The cases are the corners the per-block suites pass over: a stride larger than the kernel,
dilation with padding, ``padding="same"`` with an even dilated kernel, depthwise channel
multipliers, 1x1 and length-1 inputs, non-square kernels, ``count_include_pad=False``,
LayerNorm without affine parts or over one feature, GroupNorm as instance norm on 1x1 maps,
BatchNorm with batch 1 (spatial) and in inference mode, ReLU / LeakyReLU at 0 and with a
negative slope, saturated sigmoid / tanh, a softmax row with -inf, and cross-entropy with
every combination of class weights, ignore_index and label smoothing per reduction (an
all-ignored mean is NaN, as torch). Attention and recurrent layers:
``test_layers_edges_vs_torch_seq.py``.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from layer_edges import Case, compare, parity_tests, run_mithril

import mithril as ml
from mithril.backends import NumpyBackend, TorchBackend

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")


def unary(fn):
    """A torch reference of a block on ``input`` whose parameters are named by their role."""
    def ref(t, d):
        roles = {k.rsplit(".", 1)[-1]: v for k, v in t.items() if k != "input"}
        return {"output": fn(t["input"], **roles)}
    return ref


def ce(**opts):
    weight = opts.get("weight")
    kw = {"weight": None if weight is None else torch.tensor(weight),
          "ignore_index": opts.get("ignore_index", -100),
          "label_smoothing": opts.get("label_smoothing", 0.0),
          "reduction": opts.get("reduction", "mean")}
    return lambda t, d: {"output": F.cross_entropy(t["input"], d["target"], **kw)}


_RNG = np.random.default_rng(11)
_X0 = _RNG.standard_normal((6, 5))
_X0[0, 0] = _X0[1, 1] = 0.0  # the kinks of ReLU / LeakyReLU
_LABELS = np.array([0, 4, -100, 2, 2, 1])
_W = np.array([0.5, 1.5, 2.0, 0.7, 1.1])
_PROBS = _RNG.random((6, 5))
_PROBS /= _PROBS.sum(1, keepdims=True)

CASES: dict[str, Case] = {
    # -- convolutions --------------------------------------------------------------------
    "conv2d_stride_above_kernel": Case(lambda: ml.Convolution2D(2, 3, stride=3), {"input": (2, 2, 8, 7)},
                                       unary(lambda x, weight, bias: F.conv2d(x, weight, bias, 3))),
    "conv2d_dilation_padding": Case(lambda: ml.Convolution2D(3, 3, dilation=2, padding=2), {"input": (1, 2, 6, 6)},
                                    unary(lambda x, weight, bias: F.conv2d(x, weight, bias, 1, 2, 2))),
    "conv2d_same_even_dilated": Case(
        lambda: ml.Convolution2D(4, 3, padding="same", dilation=3), {"input": (1, 2, 9, 10)},
        unary(lambda x, weight, bias: F.conv2d(x, weight, bias, padding="same", dilation=3))),
    "conv2d_depthwise_multiplier": Case(
        lambda: ml.Convolution2D(3, 6, groups=3, padding=1), {"input": (2, 3, 5, 5)},
        unary(lambda x, weight, bias: F.conv2d(x, weight, bias, padding=1, groups=3))),
    "conv2d_1x1_input_padded": Case(lambda: ml.Convolution2D(3, 4, padding=1), {"input": (1, 3, 1, 1)},
                                    unary(lambda x, weight, bias: F.conv2d(x, weight, bias, padding=1))),
    "conv2d_non_square": Case(lambda: ml.Convolution2D((1, 5), 4, stride=(3, 1)), {"input": (2, 3, 7, 9)},
                              unary(lambda x, weight, bias: F.conv2d(x, weight, bias, (3, 1)))),
    "conv1d_stride_above_kernel_dilated": Case(
        lambda: ml.Convolution1D(2, 4, stride=5, dilation=3, padding=1), {"input": (2, 3, 17)},
        unary(lambda x, weight, bias: F.conv1d(x, weight, bias, 5, 1, 3))),
    "conv1d_length_1": Case(lambda: ml.Convolution1D(1, 2), {"input": (1, 3, 1)},
                            unary(lambda x, weight, bias: F.conv1d(x, weight, bias))),
    # -- pooling -------------------------------------------------------------------------
    "max_pool2d_stride_above_kernel": Case(lambda: ml.MaxPool2D(2, stride=3), {"input": (2, 2, 8, 7)},
                                           unary(lambda x: F.max_pool2d(x, 2, 3))),
    "max_pool2d_1x1": Case(lambda: ml.MaxPool2D(1), {"input": (1, 2, 1, 1)}, unary(lambda x: F.max_pool2d(x, 1))),
    "max_pool2d_padding_dilation": Case(lambda: ml.MaxPool2D(3, stride=2, padding=1, dilation=2),
                                        {"input": (1, 2, 7, 8)}, unary(lambda x: F.max_pool2d(x, 3, 2, 1, 2))),
    "max_pool2d_non_square": Case(lambda: ml.MaxPool2D((1, 3), stride=(2, 1), padding=(0, 1)),
                                  {"input": (1, 2, 5, 6)}, unary(lambda x: F.max_pool2d(x, (1, 3), (2, 1), (0, 1)))),
    "max_pool1d_kernel_1_stride_2": Case(lambda: ml.MaxPool1D(1, stride=2), {"input": (1, 2, 9)},
                                         unary(lambda x: F.max_pool1d(x, 1, 2))),
    "avg_pool2d_stride_above_kernel": Case(lambda: ml.AvgPool2D(2, stride=3), {"input": (2, 2, 8, 7)},
                                           unary(lambda x: F.avg_pool2d(x, 2, 3))),
    "avg_pool2d_exclude_pad": Case(
        lambda: ml.AvgPool2D((3, 2), stride=(2, 1), padding=1, count_include_pad=False), {"input": (2, 2, 7, 6)},
        unary(lambda x: F.avg_pool2d(x, (3, 2), (2, 1), 1, count_include_pad=False))),
    "avg_pool1d_exclude_pad": Case(
        lambda: ml.AvgPool1D(5, stride=3, padding=2, count_include_pad=False), {"input": (2, 2, 9)},
        unary(lambda x: F.avg_pool1d(x, 5, 3, 2, count_include_pad=False))),
    "avg_pool2d_exclude_pad_no_padding": Case(
        lambda: ml.AvgPool2D(2, count_include_pad=False), {"input": (2, 2, 5, 6)},
        unary(lambda x: F.avg_pool2d(x, 2, count_include_pad=False))),
    "avg_pool2d_exclude_pad_1x1_input": Case(
        lambda: ml.AvgPool2D(3, stride=1, padding=1, count_include_pad=False), {"input": (1, 2, 1, 1)},
        unary(lambda x: F.avg_pool2d(x, 3, 1, 1, count_include_pad=False))),
    "max_pool2d_ceil_mode": Case(lambda: ml.MaxPool2D(3, stride=2, padding=1, ceil_mode=True),
                                 {"input": (2, 2, 6, 7)}, unary(lambda x: F.max_pool2d(x, 3, 2, 1, ceil_mode=True))),
    "max_pool1d_ceil_mode_dilated": Case(
        lambda: ml.MaxPool1D(2, stride=3, dilation=2, ceil_mode=True), {"input": (2, 2, 8)},
        unary(lambda x: F.max_pool1d(x, 2, 3, 0, 2, ceil_mode=True))),
    "max_pool1d_ceil_mode_kernel_past_input": Case(  # torch: one window, reading past the end
        lambda: ml.MaxPool1D(3, stride=2, dilation=2, ceil_mode=True), {"input": (1, 2, 4)},
        unary(lambda x: F.max_pool1d(x, 3, 2, 0, 2, ceil_mode=True))),
    "avg_pool2d_ceil_mode": Case(lambda: ml.AvgPool2D((3, 2), stride=2, padding=1, ceil_mode=True),
                                 {"input": (2, 2, 6, 7)},
                                 unary(lambda x: F.avg_pool2d(x, (3, 2), 2, 1, ceil_mode=True))),
    "avg_pool2d_ceil_mode_exclude_pad": Case(
        lambda: ml.AvgPool2D(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
        {"input": (2, 2, 6, 7)},
        unary(lambda x: F.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=False))),
    "avg_pool1d_ceil_mode_no_padding": Case(lambda: ml.AvgPool1D(3, stride=2, ceil_mode=True), {"input": (2, 2, 8)},
                                            unary(lambda x: F.avg_pool1d(x, 3, 2, ceil_mode=True))),
    "global_avg_pool_1x1": Case(lambda: ml.GlobalAvgPool2D(), {"input": (1, 2, 1, 1)},
                                unary(lambda x: F.adaptive_avg_pool2d(x, 1).flatten(1))),
    # -- normalisation -------------------------------------------------------------------
    "layer_norm_large_eps": Case(lambda: ml.LayerNorm(eps=0.5), {"input": (2, 3, 5)},
                                 unary(lambda x, weight, bias: F.layer_norm(x, (5,), weight, bias, 0.5))),
    "layer_norm_no_affine": Case(lambda: ml.LayerNorm(use_scale=False, use_bias=False), {"input": (2, 3, 5)},
                                 unary(lambda x: F.layer_norm(x, (5,)))),
    "layer_norm_scale_only": Case(lambda: ml.LayerNorm(use_bias=False), {"input": (2, 3, 5)},
                                  unary(lambda x, weight: F.layer_norm(x, (5,), weight))),
    "layer_norm_one_feature": Case(lambda: ml.LayerNorm(), {"input": (2, 3, 1)},
                                   unary(lambda x, weight, bias: F.layer_norm(x, (1,), weight, bias))),
    "layer_norm_normalized_shape_3_dims": Case(
        lambda: ml.LayerNorm(normalized_shape=(3, 4, 5)), {"input": (2, 3, 4, 5)},
        unary(lambda x, weight, bias: F.layer_norm(x, (3, 4, 5), weight, bias))),
    "layer_norm_normalized_shape_2_dims_no_affine": Case(
        lambda: ml.LayerNorm(eps=0.1, use_scale=False, use_bias=False, normalized_shape=[4, 5]),
        {"input": (2, 3, 4, 5)}, unary(lambda x: F.layer_norm(x, (4, 5), eps=0.1))),
    "layer_norm_normalized_shape_int": Case(lambda: ml.LayerNorm(normalized_shape=5), {"input": (2, 3, 4, 5)},
                                            unary(lambda x, weight, bias: F.layer_norm(x, (5,), weight, bias))),
    "group_norm_instance_1x1": Case(lambda: ml.GroupNorm(4), {"input": (2, 4, 1, 1)},
                                    unary(lambda x, weight, bias: F.group_norm(x, 4, weight, bias))),
    "group_norm_no_spatial": Case(lambda: ml.GroupNorm(2), {"input": (3, 4)},
                                  unary(lambda x, weight, bias: F.group_norm(x, 2, weight, bias))),
    "batch_norm2d_batch_1": Case(lambda: ml.BatchNorm2D(3), {"input": (1, 3, 2, 2)},
                                 unary(lambda x, weight, bias: F.batch_norm(x, None, None, weight, bias, True))),
    "batch_norm1d_two_rows": Case(lambda: ml.BatchNorm1D(3), {"input": (2, 3)},
                                  unary(lambda x, weight, bias: F.batch_norm(x, None, None, weight, bias, True))),
    "batch_norm1d_no_affine": Case(lambda: ml.BatchNorm1D(3, affine=False), {"input": (4, 3, 2)},
                                   unary(lambda x: F.batch_norm(x, None, None, None, None, True))),
    "batch_norm1d_inference": Case(  # the initial running statistics: mean 0, variance 1
        lambda: ml.BatchNorm1D(3), {"input": (4, 3, 2)},
        unary(lambda x, weight, bias: F.batch_norm(x, torch.zeros(3, dtype=x.dtype), torch.ones(3, dtype=x.dtype),
                                                   weight, bias, False)), training=False),
    "batch_norm1d_inference_no_running_stats": Case(
        lambda: ml.BatchNorm1D(3, track_running_stats=False), {"input": (4, 3, 2)},
        unary(lambda x, weight, bias: F.batch_norm(x, None, None, weight, bias, True)), training=False),
    # -- activations ---------------------------------------------------------------------
    "relu_at_zero": Case(lambda: ml.Relu(), {"input": _X0}, unary(F.relu)),
    "leaky_relu_negative_slope": Case(lambda: ml.LeakyRelu(-0.3), {"input": _X0},
                                      unary(lambda x: F.leaky_relu(x, -0.3))),
    "leaky_relu_slope_above_1": Case(lambda: ml.LeakyRelu(2.0), {"input": _X0}, unary(lambda x: F.leaky_relu(x, 2.0))),
    "gelu_tanh_wide": Case(lambda: ml.Gelu(approximate=True), {"input": 5 * _X0},
                           unary(lambda x: F.gelu(x, approximate="tanh"))),
    "gelu_torch_string_none": Case(lambda: ml.Gelu(approximate="none"), {"input": 5 * _X0},
                                   unary(lambda x: F.gelu(x, approximate="none"))),
    "gelu_torch_string_tanh": Case(lambda: ml.Gelu(approximate="tanh"), {"input": 5 * _X0},
                                   unary(lambda x: F.gelu(x, approximate="tanh"))),
    "sigmoid_saturated": Case(lambda: ml.Sigmoid(), {"input": 40 * _X0}, unary(torch.sigmoid)),
    "tanh_saturated": Case(lambda: ml.Tanh(), {"input": 40 * _X0}, unary(torch.tanh)),
    "softmax_axis_0": Case(lambda: ml.Softmax(0), {"input": _X0}, unary(lambda x: F.softmax(x, 0))),
    "softmax_minus_inf": Case(lambda: ml.Softmax(), {"input": np.where(_X0 > 0.5, -np.inf, _X0)},
                              unary(lambda x: F.softmax(x, -1))),
    # -- losses --------------------------------------------------------------------------
    "cross_entropy_probs_weight_smoothing_mean": Case(
        lambda: ml.CrossEntropy(weight=_W, label_smoothing=0.1), {"input": _X0},
        ce(weight=_W, label_smoothing=0.1), data={"target": _PROBS}),
    "cross_entropy_axis1_3d_all_options": Case(
        lambda: ml.CrossEntropy(axis=1, ignore_index=-100, weight=_W, label_smoothing=0.2), {"input": (2, 5, 4)},
        ce(weight=_W, label_smoothing=0.2), data={"target": np.array([[0, -100, 4, 2], [1, 1, 3, 0]])}),
    "cross_entropy_all_ignored_mean_is_nan": Case(
        lambda: ml.CrossEntropy(ignore_index=3), {"input": _X0}, ce(ignore_index=3), data={"target": np.full(6, 3)}),
    "cross_entropy_log_probs_weight_ignore": Case(
        lambda: ml.CrossEntropy(input_type="log_probs", ignore_index=-100, weight=_W),
        {"input": F.log_softmax(torch.tensor(_X0), -1).numpy()},
        lambda t, d: {"output": F.nll_loss(t["input"], d["target"], weight=torch.tensor(_W))},
        data={"target": _LABELS}),
    # -- embedding -----------------------------------------------------------------------
    "embedding_repeated_rows": Case(lambda: ml.Embedding(4, 3), {},
                                    lambda t, d: {"output": F.embedding(d["input"], t["embedding.weight"])},
                                    data={"input": np.array([[0, 3, 3], [1, 0, 2], [3, 3, 1]])}),
    "embedding_padding_idx": Case(  # the padding row is looked up but gets no gradient
        lambda: ml.Embedding(4, 3, padding_idx=3), {},
        lambda t, d: {"output": F.embedding(d["input"], t["embedding.weight"], padding_idx=3)},
        data={"input": np.array([[0, 3, 3], [1, 0, 2], [3, 3, 1]])}),
    "embedding_negative_padding_idx": Case(
        lambda: ml.Embedding(4, 3, padding_idx=-4), {},
        lambda t, d: {"output": F.embedding(d["input"], t["embedding.weight"], padding_idx=0)},
        data={"input": np.array([[0, 3, 3], [1, 0, 2], [3, 0, 1]])}),
    "squared_error_sum_both_sides": Case(
        lambda: ml.SquaredError(reduction="sum"), {"input": (6, 5), "target": (6, 5)},
        lambda t, d: {"output": F.mse_loss(t["input"], t["target"], reduction="sum")}),
}
for _red in ("mean", "sum", "none"):
    for _opts in ({"ignore_index": -100}, {"ignore_index": -100, "label_smoothing": 0.2},
                  {"ignore_index": -100, "weight": _W}, {"ignore_index": -100, "weight": _W, "label_smoothing": 0.3}):
        CASES[f"cross_entropy_{_red}_" + "_".join(k.split("_")[0] for k in _opts)] = Case(
            (lambda o=_opts, r=_red: ml.CrossEntropy(reduction=r, **o)), {"input": _X0},
            ce(reduction=_red, **_opts), data={"target": _LABELS})


test_equals_torch, jax_results, test_jax_equals_torch = parity_tests(__name__, CASES)


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith("max_pool")])
def test_numpy_max_pool_without_compiled_loops_equals_torch(name, monkeypatch):
    """The strided-slice path of dtypes without compiled window loops (float16, bfloat16)."""
    from mithril.models import window_kernels

    monkeypatch.setattr(window_kernels, "_COMPILED", ())
    case = CASES[name]
    compare(name, case, *run_mithril(name, case, "numpy"), what="numpy, no compiled loops")


@pytest.mark.parametrize("backend_cls", [NumpyBackend, TorchBackend])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_without_running_stats_refuses_one_value_per_channel(backend_cls, training):
    """Batch statistics of one value per channel: torch refuses them in both modes when the
    module has no running statistics (NumPy gave the bias in inference mode, torch's own
    error came from the torch backend)."""
    model = ml.Model()
    model |= ml.BatchNorm1D(3, track_running_stats=False)(input="input", output="output")
    compiled = ml.compile(model, backend_cls(dtype="float64"), shapes={"input": [None, 3]})
    params = compiled.get_parameters()
    x = compiled.backend.array(np.ones((1, 3)))
    with pytest.raises(ValueError, match=r"BatchNorm1D: the batch statistics .* more than one "
                                         r"value per channel, got input of shape \(1, 3\)"):
        compiled.evaluate(params, {"input": x}, training=training)
    with pytest.raises(ValueError, match="more than 1 value per channel"):  # torch's own
        torch.nn.BatchNorm1d(3, track_running_stats=False, dtype=torch.float64).eval()(
            torch.ones(1, 3, dtype=torch.float64))
    two = compiled.evaluate(params, {"input": compiled.backend.array(np.eye(3)[:2])},
                            training=training)["output"]
    want = F.batch_norm(torch.tensor(np.eye(3)[:2]), None, None, training=True)
    assert np.abs(np.asarray(compiled.backend.to_numpy(two)) - want.numpy()).max() <= 1e-12


@pytest.mark.parametrize("backend_cls", [NumpyBackend, TorchBackend])
@pytest.mark.parametrize("momentum", [None, 0.0, 1.0, 0.3])
def test_batch_norm_running_stats_momentum_edges(backend_cls, momentum):
    """momentum=None (a cumulative average), 0 (frozen) and 1 (the last batch): the running
    statistics, the count and the inference output after 4 steps equal torch's."""
    model = ml.Model()
    model |= ml.BatchNorm1D(3, momentum=momentum)(input="input", output="output")
    compiled = ml.compile(model, backend_cls(dtype="float64"), shapes={"input": [None, 3, 4]})
    params, state = compiled.get_parameters(), compiled.initial_state_dict
    ref = torch.nn.BatchNorm1d(3, momentum=momentum, dtype=torch.float64)
    rng = np.random.default_rng(0)
    to_np = lambda a: np.asarray(compiled.backend.to_numpy(a))  # noqa: E731
    for _ in range(4):
        x = 2 + 3 * rng.standard_normal((5, 3, 4))
        out, state = compiled.evaluate(params, {"input": compiled.backend.array(x)}, state=state)
        assert np.abs(to_np(out["output"]) - ref(torch.tensor(x)).detach().numpy()).max() <= 1e-12
    assert np.abs(to_np(state["batch_norm1_d.running_mean"]) - ref.running_mean.numpy()).max() <= 1e-12
    assert np.abs(to_np(state["batch_norm1_d.running_var"]) - ref.running_var.numpy()).max() <= 1e-12
    assert int(to_np(state["batch_norm1_d.num_batches_tracked"])) == int(ref.num_batches_tracked) == 4
    x = rng.standard_normal((2, 3, 4))
    out, _ = compiled.evaluate(params, {"input": compiled.backend.array(x)}, state=state, training=False)
    assert np.abs(to_np(out["output"]) - ref.eval()(torch.tensor(x)).detach().numpy()).max() <= 1e-12


def test_pool_switches_are_bools():
    with pytest.raises(TypeError, match="AvgPool2D: count_include_pad must be a bool, got 'no'"):
        ml.AvgPool2D(3, padding=1, count_include_pad="no")
    with pytest.raises(TypeError, match="MaxPool1D: ceil_mode must be a bool, got 1"):
        ml.MaxPool1D(3, ceil_mode=1)
    assert repr(ml.AvgPool1D(3, padding=1, count_include_pad=False, ceil_mode=True)).endswith(
        "count_include_pad=False, ceil_mode=True)")


def test_ceil_mode_shapes_and_free_sizes():
    """The output size rounds up (the last window starting in the input or the padding before
    it, as torch); a free spatial size stays free until evaluate."""
    for n in range(3, 12):
        want = F.max_pool1d(torch.zeros(1, 1, n), 3, 2, 1, ceil_mode=True).shape[-1]
        model = ml.Model()
        model |= ml.MaxPool1D(3, stride=2, padding=1, ceil_mode=True)(input="input", output="output")
        compiled = ml.compile(model, NumpyBackend(dtype="float64"), shapes={"input": [1, 1, n]})
        assert compiled.program.output_shape("output") == (1, 1, want)
    model = ml.Model()
    model |= ml.AvgPool2D(2, ceil_mode=True)(input="input", output="output")
    compiled = ml.compile(model, NumpyBackend(dtype="float64"), shapes={"input": [1, 1, None, None]})
    x = np.arange(15.0).reshape(1, 1, 3, 5)
    out = compiled.evaluate({}, {"input": x})["output"]
    assert np.array_equal(out, F.avg_pool2d(torch.tensor(x), 2, ceil_mode=True).numpy())


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
def test_embedding_padding_row_starts_at_zeros_and_stays(backend_name):
    """As ``nn.Embedding(padding_idx=k)``: row k is initialised to zeros (the others N(0, 1)),
    and a training step leaves it where it is while the looked-up rows move."""
    from layer_edges import BACKENDS

    model = ml.Model()
    model |= ml.Embedding(5, 3, padding_idx=-2)(input="input", output="output")
    backend = BACKENDS[backend_name](dtype="float64", seed=0)
    compiled = ml.compile(model, backend, shapes={"input": [4]})
    params = compiled.get_parameters()
    w = np.asarray(backend.to_numpy(params["embedding.weight"]))
    ref = torch.nn.Embedding(5, 3, padding_idx=-2)
    assert ref.padding_idx == 3 and torch.all(ref.weight[3] == 0)
    assert np.all(w[3] == 0) and np.all(np.abs(w[[0, 1, 2, 4]]) > 0)
    idx = backend.array(np.array([3, 1, 3, 0]), backend.int_dtype)
    _, grads = compiled.evaluate(params, {"input": idx},
                                 output_gradients={"output": backend.array(np.ones((4, 3)))})
    g = np.asarray(backend.to_numpy(grads["embedding.weight"]))
    assert np.all(g[3] == 0) and np.all(g[[0, 1]] == 1) and np.all(g[[2, 4]] == 0)
    assert repr(ml.Embedding(5, 3, padding_idx=-2)) == "Embedding(5, 3, padding_idx=3)"


@pytest.mark.parametrize("bad", [5, -6, 1.0, True, "0"])
def test_embedding_padding_idx_out_of_range(bad):
    with pytest.raises(ValueError, match=r"Embedding: padding_idx must be an int in \[-5, 4\] "
                                         r"\(num_embeddings=5\), got "):
        ml.Embedding(5, 3, padding_idx=bad)


def test_layer_norm_normalized_shape_errors():
    """A trailing shape other than ``normalized_shape`` is a ShapeError naming both at compile
    time (torch: a RuntimeError at the call); a bad ``normalized_shape`` a ValueError."""
    model = ml.Model()
    model |= ml.LayerNorm(normalized_shape=(3, 5))(input="input")
    with pytest.raises(ml.ShapeError, match=r"LayerNorm: 'input' of shape \[2, 4, 5\] does not end "
                                            r"in normalized_shape \(3, 5\)"):
        ml.compile(model, NumpyBackend(), shapes={"input": [2, 4, 5]})
    with pytest.raises(RuntimeError, match="normalized_shape"):
        F.layer_norm(torch.zeros(2, 4, 5), (3, 5))
    for bad in (0, (), (2.0,), "4", True):
        with pytest.raises(ValueError, match="LayerNorm: normalized_shape must be a positive int"):
            ml.LayerNorm(normalized_shape=bad)
    model = ml.Model()
    model |= ml.LayerNorm(normalized_shape=(4, 5))(input="input", output="output")
    compiled = ml.compile(model, NumpyBackend(dtype="float64"), shapes={"input": [None, None, 4, 5]})
    assert compiled.parameter_shapes == {"layer_norm.weight": (4, 5), "layer_norm.bias": (4, 5)}


def test_activation_arguments():
    """torch's GELU strings: "none" was read as a true bool (the tanh form, 1e-3 off the
    exact GELU); other values and a non-number LeakyReLU slope are named errors."""
    assert ml.Gelu(approximate="none").approximate is False
    assert ml.Gelu(approximate="tanh").approximate is True
    for bad in ("erf", None, 1):
        with pytest.raises(ValueError, match="Gelu: approximate must be a bool, 'none' or 'tanh'"):
            ml.Gelu(approximate=bad)
    for bad in ("0.1", True, None):
        with pytest.raises(ValueError, match="LeakyRelu: slope must be a number"):
            ml.LeakyRelu(bad)


def _ceil_grid():
    """Pools torch takes in ceil mode: kernel 2-3, stride 1-3, padding 0-1, dilation 1-2 (max
    only), lengths 4, 5, 7; 1-D and 2-D."""
    for nd, k, s, p, d, n in itertools.product((1, 2), (2, 3), (1, 2, 3), (0, 1), (1, 2), (4, 5, 7)):
        if p <= k // 2:
            for kind in ("max", "avg_include_pad", "avg_exclude_pad")[: 1 if d > 1 else 3]:
                yield nd, kind, k, s, p, d, n


@pytest.mark.slow
@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
def test_ceil_mode_grid_equals_torch(backend_name):
    """Every pool of the grid, output and input gradient, against torch in ceil mode."""
    count = 0
    for nd, kind, k, s, p, d, n in _ceil_grid():
        shape = (1, 2, n) if nd == 1 else (1, 2, n, n + 1)
        suffix = "1D" if nd == 1 else "2D"
        if kind == "max":
            block = functools.partial(getattr(ml, "MaxPool" + suffix), k, stride=s, padding=p,
                                      dilation=d, ceil_mode=True)
            fn = getattr(F, f"max_pool{nd}d")
            ref = functools.partial(fn, kernel_size=k, stride=s, padding=p, dilation=d, ceil_mode=True)
        else:
            include = kind == "avg_include_pad"
            block = functools.partial(getattr(ml, "AvgPool" + suffix), k, stride=s, padding=p,
                                      count_include_pad=include, ceil_mode=True)
            fn = getattr(F, f"avg_pool{nd}d")
            ref = functools.partial(fn, kernel_size=k, stride=s, padding=p, ceil_mode=True,
                                    count_include_pad=include)
        try:
            ref(torch.zeros(shape))
        except RuntimeError:  # torch's output would be empty
            continue
        name = f"ceil {kind} {nd}d k{k} s{s} p{p} d{d} n{n}"
        case = Case(block, {"input": shape}, unary(ref))
        compare(name, case, *run_mithril(name, case, backend_name), what=backend_name)
        count += 1
    assert count > 250
