"""The published Mithril's own test data (``../shared/conformance/published``): every case of
``models_directed_test.json`` and ``primitives_directed_test.json`` whose blocks and
arguments we offer is built with this API and must match the published outputs and
gradients at 1e-10 (relative and absolute) in float64; the others are listed by reason.

The sets of cases built are asserted exactly, so a regression (or a newly buildable case)
shows. NumPy and torch run by default; JAX (float64 needs its process-global x64 mode) runs
in a subprocess under ``-m slow``. The data is read from ``../shared`` at test time only."""

from __future__ import annotations

import inspect
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from conftest import run_python, shared_file
from test_mithril_api import _BLOCKS, _build

import mithril as ml
from mithril.compiler.program import _snake

FILES = ("models_directed_test.json", "primitives_directed_test.json")
#: the published loaders drop these cases: their expected values are wrong
KNOWN_WRONG = {"test_power_1", "test_linear_9"}
#: cases whose expected gradients are not those of the published definition: the gradient in
#: ``k`` of GaussProcessRegressionCore differs from torch autograd through the published
#: Cholesky path (the outputs match; tests/test_published_new_blocks_cases.py shows both)
WRONG_GRADIENTS = {"test_GaussProcessRegressionLayer", "test_GaussProcessRegressionLayer_2"}
#: cases whose arguments contradict their data: each is refused here (by the error named)
CONTRADICTORY = {"test_polynomial_2D_Degree_2_multilabel":
                 "PolynomialRegression(dimension=1) given a weight (2, 5): a ShapeError naming "
                 "linear.weight (the published Mithril takes the weight's 2)"}
TOL = 1e-10
#: where the published results differ by backend, every backend here gives torch's, except
#: the robust log of a probability of exactly 0: the published NumPy and JAX gradient (the
#: slope of the linear continuation; see docs/mithril-compat.md)
NUMPY_RESULT = {"test_cross_entropy_5", "test_cross_entropy_7",  # models_directed
                "test_cross_entropy_8", "test_cross_entropy_10"}  # primitives_directed
#: cases with subnormal inputs (1e-311): XLA on CPU flushes them to 0, as the published JAX
#: results show; not run on JAX
JAX_SUBNORMAL = {"test_robust_log_3", "test_robust_power_7"}

#: published block name -> our constructor (beyond the curated table of test_mithril_api)
BLOCKS = {**_BLOCKS, **{n: getattr(ml.models, n) for n in (
    "Buffer", "Mean", "Sum", "Max", "Min", "Subtract", "Divide", "Power", "Exponential", "Log",
    "Sqrt", "Absolute", "Transpose", "Where", "Convolution1D", "Convolution2D", "MaxPool1D",
    "MaxPool2D", "Softplus", "AbsoluteError", "QuantileLoss", "HingeLoss", "QuadHingeLoss",
    "KLDivergence", "BinaryCrossEntropy", "Variance", "Sine", "Cosine", "StopGradient",
    "StableReciprocal", "PermuteTensor", "PolynomialFeatures", "PolynomialRegression",
    "LogisticRegression", "EncoderDistanceMatrix", "RBFKernel", "PolynomialKernel", "Concat",
    "FloorDivide", "Prod", "ShiftLeft", "ShiftRight", "MDSCore", "MDS", "GaussProcessRegressionCore")},
    # the published cells' layout (weights as inputs); ml.models.RNNCell is torch's
    "RNNCell": ml.PublishedRNNCell, "LSTMCell": ml.PublishedLSTMCell}
#: arguments whose published value is also our default (accepted, then dropped)
DEFAULTS = {"robust": False}
#: our arguments that give a block the published form (the published losses are elementwise)
PUBLISHED_FORM = {"BinaryCrossEntropy": {"reduction": "none"}}
#: the published parameter names of our composite blocks: published -> ours
_LINEAR = {"weight": "linear.weight", "bias": "linear.bias"}
PUBLISHED_PARAMS = {"PolynomialRegression": _LINEAR, "LogisticRegression": _LINEAR}


class Unbuilt(Exception):
    """A case we do not build; its message is the reason."""


def _check_blocks(spec: dict) -> None:
    """``Unbuilt`` for a block name or an argument we do not offer, anywhere in ``spec``."""
    name = spec["name"]
    if name != "Model":
        if name not in BLOCKS:
            raise Unbuilt(f"block {name} not offered" if not hasattr(ml.models, name) else
                          f"block {name}: its published terminals and parameters are not mapped")
        ctor = BLOCKS[name]
        known = set(inspect.signature(ctor).parameters) if inspect.isclass(ctor) else None
        for a, v in (spec.get("args") or {}).items():
            if DEFAULTS.get(a, object()) == v:
                continue
            if known is not None and a not in known:
                raise Unbuilt(f"argument {name}({a}=...) not offered")
    for sub in (spec.get("submodels") or {}).values():
        _check_blocks(sub)


def _normalize(case: dict) -> dict:
    """A case of either file as one record: spec, inputs, static inputs, output gradients,
    expected outputs and gradients, discarded keys."""
    spec = case["model"] if isinstance(case["model"], dict) else {"name": case["model"]}
    res = case["results"]
    ev = res.get("eval")  # primitives_directed: the output itself, or one per backend
    if "output_grads" in case or isinstance(ev, dict) and not set(ev) <= {"numpy", "jax", "torch"}:
        return {"spec": spec, "inputs": case["inputs"], "static": case.get("static_keys", {}),
                "cots": case.get("output_grads", {}), "eval": res["eval"], "grad": res.get("grad", {}),
                "discard": case.get("discard_keys", [])}
    cots = {"output": case["output_grad"]} if "output_grad" in case else {}
    if spec["name"] == "LeakyRelu" and not spec.get("args"):  # this file's default slope
        spec = {**spec, "args": {"slope": 0.2}}
    return {"spec": spec, "inputs": case["inputs"], "static": case.get("static_inputs", {}),
            "cots": cots, "eval": {"output": res["eval"]}, "grad": res.get("grad", {}), "discard": []}


def _declared(spec: dict) -> set[str]:
    """The names ``spec`` (and its submodels) declare differentiable."""
    names = {k for k, flag in spec.get("assigned_differentiabilities") or () if flag}
    for conns in (spec.get("connections") or {}).values():
        for c in conns.values():
            if isinstance(c, dict) and (c.get("key") or {}).get("differentiable"):
                names.add(c["key"]["name"])
    for sub in (spec.get("submodels") or {}).values():
        names |= _declared(sub)
    return names


def _block(spec: dict, data: dict):
    """Our block for ``spec`` and its parameter names, published -> ours."""
    args = {k: v for k, v in (spec.get("args") or {}).items() if DEFAULTS.get(k, object()) != v}
    args.update({k: tuple(args[k]) for k in spec.get("tuples", ()) if isinstance(args.get(k), list)})
    args.update({k: str(args[k]).lower() for k in spec.get("enums", {}) if isinstance(args.get(k), str)})
    name = spec["name"]
    if name == "Model":
        return _build(spec, data, BLOCKS)[0], {}
    args.update(PUBLISHED_FORM.get(name, {}))
    if name.startswith("Convolution") and "out_channels" not in args:  # published: from the weight
        args["out_channels"] = len(data["weight"])
    block, names = _build({**spec, "args": args}, data, BLOCKS)
    names = names or dict(PUBLISHED_PARAMS.get(name, {}))
    if name != "Model" and not names:  # published role names: our block path + role
        prefix = _snake(type(block).__name__)
        names = {r: f"{prefix}.{r}" for r in (getattr(block, "param_init", None) or {})}
    return block, names


def _expected(want, numpy_result: bool) -> np.ndarray:
    if isinstance(want, dict):
        want = want["numpy" if numpy_result else "torch"]
    return np.asarray(want, dtype=np.float64)


def _array(v, dtype=None):
    """A case's value as a NumPy array, or a list input (``is_list``) as a list of them."""
    return [np.asarray(e, dtype=dtype) for e in v] if isinstance(v, _Elements) else np.asarray(v, dtype=dtype)


class _Elements(list):
    """The value of a list input (the published ``is_list``): one array per element."""


def _close(got, want) -> bool:
    if isinstance(want, _Elements):  # a list input's gradient: one per element
        return len(got) == len(want) and all(_close(g, w) for g, w in zip(got, want, strict=True))
    return bool(np.allclose(got, want, rtol=TOL, atol=TOL))


def run_case(case: dict, backend, numpy_result: bool = False) -> str:
    """'ok' or 'mismatch: <keys>'; ``Unbuilt`` for a case we do not build. A list input
    (``is_list``: the published ``Concat``'s ``input``) is given as a list of arrays, its
    gradient compared per element, as published."""
    c = _normalize(case)
    _check_blocks(c["spec"])
    lists = {k for k in c["inputs"] if c["inputs"].get("is_list") and k != "is_list"}
    raw = {k: _Elements(v) if k in lists else v for k, v in c["inputs"].items() if k != "is_list"}
    grads = {k: _Elements(v) if k in lists else v for k, v in c["grad"].items()}
    data = {k: _array(v) for k, v in {**raw, **c["static"]}.items()}
    block, pnames = _block(c["spec"], data)
    declared = _declared(c["spec"]) if c["spec"]["name"] == "Model" else set()
    # what the model declares differentiable is trainable through that declaration alone
    trainable = [k for k in raw if k not in pnames and k in grads and k not in declared]
    data_keys = [k for k in data if k not in pnames and k not in trainable and k not in declared]
    consts = {pnames[k]: np.asarray(v, dtype=np.float64) for k, v in c["static"].items() if k in pnames}
    shapes = {k: [e.shape for e in v] if k in lists else v.shape for k, v in data.items() if k not in pnames}
    compiled = ml.compile(block, backend, shapes=shapes, trainable_keys=trainable, data_keys=data_keys,
                          constant_keys=consts, discard_keys=c["discard"])
    ours = {pnames.get(k, k): k for k in raw if k in pnames or k in compiled.parameter_shapes}

    def given(v, kind="float"):
        if isinstance(v, list):
            return [given(e, kind) for e in v]
        return backend.array(v.astype(np.float64) if kind == "float" else v)
    params = {o: given(data[p]) for o, p in ours.items()}
    kinds = compiled.program.input_kinds
    inputs = {k: given(data[k], kinds.get(k, kinds.get(f"{k}[0]"))) for k in compiled.input_keys}
    cots = {k: backend.array(np.asarray(v, dtype=np.float64)) for k, v in c["cots"].items()
            if k in compiled.output_keys}
    out, got = compiled.evaluate(params, inputs, output_gradients=cots) if cots else (
        compiled.evaluate(params, inputs), {})
    bad = [k for k, want in c["eval"].items() if k not in out or not _close(
        backend.to_numpy(out[k]), _expected(want, numpy_result))]
    if cots:
        bad += [f"no gradient for {p}" for p in grads if p not in ours.values()]
        for o, p in ours.items():
            if p not in grads:
                continue
            g = got[o]
            g = [backend.to_numpy(e) for e in g] if isinstance(g, list) else backend.to_numpy(g)
            want = _array(grads[p], np.float64) if p in lists else _expected(grads[p], numpy_result)
            if not _close(g, _Elements(want) if p in lists else want):
                bad.append(f"grad {p}")
    return "ok" if not bad else "mismatch: " + ", ".join(bad)


def results(backend, file: str) -> dict[str, str]:
    """'ok', 'mismatch: ...', 'error: ...' or 'unbuilt: <reason>' per case of ``file``."""
    cases = json.loads(shared_file("conformance", "published", file).read_text())
    out = {}
    for name, case in cases.items():
        if name in KNOWN_WRONG or name.startswith("test_tsne"):
            out[name] = "unbuilt: expected values wrong (the published loaders skip it)"
            continue
        if name in WRONG_GRADIENTS:
            out[name] = "unbuilt: expected gradients not the published definition's (torch autograd)"
            continue
        if name in CONTRADICTORY:
            out[name] = f"unbuilt: {CONTRADICTORY[name]}"
            continue
        if name in JAX_SUBNORMAL and backend.name == "jax":
            out[name] = "unbuilt: subnormal inputs (XLA on CPU flushes them to 0)"
            continue
        try:
            out[name] = run_case(case, backend, name in NUMPY_RESULT)
        except Unbuilt as e:
            out[name] = f"unbuilt: {e}"
        except Exception as e:  # noqa: BLE001 - reported by name, with the reason
            out[name] = f"error: {type(e).__name__}: {str(e)[:160]}"
    return out


def by_reason(res: dict[str, str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for name, r in res.items():
        if r != "ok":
            groups[r].append(name)
    return dict(sorted(groups.items(), key=lambda kv: -len(kv[1])))


def _report(file: str, res: dict[str, str]) -> None:
    ok = sum(r == "ok" for r in res.values())
    print(f"\n{file}: {ok}/{len(res)} built and matching at {TOL:g}")
    for reason, names in by_reason(res).items():
        print(f"  {len(names):3d}  {reason}: {', '.join(names[:6])}{' ...' if len(names) > 6 else ''}")


#: the cases built and matching, per file (the rest are listed by reason when the test runs)
BUILT = {
    "models_directed_test.json": set("""
        test_PolynomialKernel test_RBFKernel_1 test_RBFKernel_2 test_abs
        test_absolute_error_1 test_absolute_error_2 test_absolute_error_3
        test_absolute_error_4 test_binary_cross_entropy_1 test_binary_cross_entropy_2
        test_binary_cross_entropy_3 test_binary_cross_entropy_4 test_binary_cross_entropy_5
        test_binary_cross_entropy_6 test_binary_cross_entropy_7 test_binary_cross_entropy_8
        test_binary_w_logits_1 test_binary_w_logits_2 test_binary_w_logits_3 test_buffer_1
        test_buffer_2 test_buffer_3 test_composite_1 test_composite_2 test_composite_3
        test_composite_4 test_composite_5 test_composite_extend_numbers
        test_composite_1_extend_from_inputs test_composite_2_extend_from_inputs
        test_composite_3_extend_from_inputs test_composite_4_extend_from_inputs
        test_composite_5_extend_from_inputs test_composite_6_extend_from_inputs
        test_concat test_concat_1 test_concat_2 test_concat_3 test_concat_4
        test_concat_1_last_axis test_concat_2_last_axis test_concat_axis_none_1
        test_concat_axis_none_2 test_concat_axis_none_3 test_concat_axis_none_4
        test_conv1d_1 test_conv1d_2 test_conv1d_3 test_conv1d_4 test_conv1d_5 test_conv1d_6
        test_conv1d_7 test_conv1d_8 test_conv1d_9 test_conv2d_1 test_conv2d_2 test_conv2d_3
        test_conv2d_4 test_conv2d_5 test_conv2d_6 test_conv2d_7 test_conv2d_8 test_conv2d_9
        test_cos test_cross_entropy_1 test_cross_entropy_10 test_cross_entropy_11
        test_cross_entropy_12 test_cross_entropy_2 test_cross_entropy_3 test_cross_entropy_4
        test_cross_entropy_5 test_cross_entropy_6 test_cross_entropy_7 test_cross_entropy_8
        test_cross_entropy_9 test_distance_matrix_1 test_distance_matrix_2
        test_distance_matrix_3 test_distance_matrix_4 test_distance_matrix_5
        test_distance_matrix_6 test_div_1 test_div_2 test_div_3 test_div_4 test_div_5
        test_div_6 test_embedding_1 test_embedding_2 test_embedding_3 test_exp test_flatten
        test_flatten2 test_flatten3 test_flatten4 test_flatten5 test_gelu_1 test_gelu_2
        test_hinge_loss_1 test_hinge_loss_2 test_hinge_loss_3 test_kl_div_1 test_kl_div_3
        test_kl_div_4 test_layernorm_1 test_layernorm_2 test_leaky_relu_1 test_leaky_relu_2
        test_leaky_relu_3 test_linear_1 test_linear_2 test_linear_3 test_linear_4
        test_logistic_1_logits_ignored test_logistic_1_probs_ignored
        test_logistic_2_no_ignore test_matmul_1 test_maxpool1d_1 test_maxpool1d_1_2d_input
        test_maxpool1d_2 test_maxpool1d_2_2d_input test_maxpool1d_3
        test_maxpool1d_3_2d_input test_maxpool1d_4 test_maxpool1d_4_2d_input
        test_maxpool2d_1 test_maxpool2d_1_3d_input test_maxpool2d_2
        test_maxpool2d_2_3d_input test_maxpool2d_3 test_maxpool2d_3_3d_input
        test_maxpool2d_4 test_maxpool2d_4_3d_input test_maxpool2d_5 test_mult_1 test_mult_2
        test_mult_3 test_mult_4 test_mult_5 test_mult_6 test_mult_7
        test_multilabel_3_binary_w_logits_1 test_nn_1 test_permute_tensor_1
        test_permute_tensor_2 test_poly_features_1 test_poly_features_2 test_poly_features_3
        test_poly_features_4 test_polynomial_1D_Degree_1 test_polynomial_1D_Degree_2
        test_polynomial_1D_Degree_3 test_polynomial_2D_Degree_1 test_polynomial_2D_Degree_2
        test_power_2 test_power_3 test_power_4 test_power_5 test_power_6
        test_quad_hinge_loss_1 test_quad_hinge_loss_2 test_quad_hinge_loss_3
        test_quantile_loss_1 test_quantile_loss_2 test_quantile_loss_3 test_quantile_loss_4
        test_reduce_max_1 test_reduce_max_2 test_reduce_max_3 test_reduce_max_4
        test_reduce_max_5 test_reduce_max_6 test_reduce_max_7 test_reduce_mean_1
        test_reduce_mean_2 test_reduce_mean_3 test_reduce_mean_4 test_reduce_mean_5
        test_reduce_mean_6 test_reduce_mean_7 test_reduce_min_1 test_reduce_min_2
        test_reduce_min_3 test_reduce_min_4 test_reduce_min_5 test_reduce_min_6
        test_reduce_min_7 test_reduce_sum_1 test_reduce_sum_2 test_reduce_sum_3
        test_reduce_sum_4 test_reduce_sum_5 test_reduce_sum_6 test_reduce_sum_7 test_relu_1
        test_relu_2 test_relu_3 test_relu_4 test_sigmoid_1 test_sigmoid_2 test_sigmoid_3
        test_robust_log_1 test_robust_log_2 test_robust_log_3
        test_robust_power_1 test_robust_power_2 test_robust_power_3 test_robust_power_4
        test_robust_power_5 test_robust_power_6 test_robust_power_7
        test_robust_sqrt_1 test_robust_sqrt_2 test_robust_sqrt_3 test_robust_sqrt_4 test_robust_sqrt_5
        test_sigmoid_4 test_sigmoid_5 test_sigmoid_6 test_sin test_softmax_1 test_softmax_2
        test_softmax_3 test_softmax_4 test_softmax_5 test_softmax_6 test_softmax_7
        test_softmax_8 test_softplus_1 test_softplus_2 test_softplus_3 test_softplus_4
        test_sqrt_1 test_sqrt_2 test_sqrt_3 test_squared_error_1 test_squared_error_2
        test_squared_error_3 test_squared_error_4 test_stable_reciprocal_1
        test_stable_reciprocal_2 test_stable_reciprocal_3 test_stop_gradient_1
        test_stop_gradient_2 test_sub_1 test_sub_2 test_sub_3 test_sub_4 test_sub_5
        test_sub_6 test_sum_1 test_sum_2 test_sum_3 test_sum_4 test_sum_5 test_sum_6
        test_sum_7 test_sum_8 test_sum_9 test_tanh_1 test_tanh_2 test_tanh_3 test_tanh_4
        test_tanh_5 test_transpose test_transpose_axis_1 test_transpose_axis_2
        test_transpose_axis_3 test_transpose_axis_4 test_var_1 test_var_2 test_var_3
        test_var_4 test_where_1 test_where_2 test_where_3 test_where_4 test_where_5
        test_mds_core_1 test_mds_core_2 test_mds_core_3 test_mds_core_4 test_mds_2
        test_rnn_cell_1 test_rnn_cell_2 test_lstm_cell_1
    """.split()),
    "primitives_directed_test.json": set("""
        test_abs test_absolute_error_1 test_absolute_error_2 test_absolute_error_3
        test_absolute_error_4 test_binary_w_logits_1 test_binary_w_logits_2
        test_binary_w_logits_3 test_buffer_1 test_buffer_2 test_buffer_3 test_concat
        test_concat_last_axis_1 test_concat_last_axis_2 test_cos test_cross_entropy_1
        test_cross_entropy_10 test_cross_entropy_11 test_cross_entropy_2
        test_cross_entropy_3 test_cross_entropy_4 test_cross_entropy_5 test_cross_entropy_6
        test_cross_entropy_7 test_cross_entropy_8 test_cross_entropy_9 test_div_1 test_div_2
        test_div_3 test_div_4 test_div_5 test_div_6 test_exp test_gelu_1 test_gelu_2
        test_hinge_loss_1 test_hinge_loss_2 test_hinge_loss_3 test_kl_div_1 test_kl_div_3
        test_kl_div_4 test_leaky_relu_1 test_leaky_relu_2 test_leaky_relu_3 test_matmul_1
        test_mult_1 test_mult_2 test_mult_3 test_mult_4 test_mult_5 test_mult_6
        test_multilabel_3_binary_w_logits_1 test_permute_tensor_1 test_permute_tensor_2
        test_power_2 test_power_3 test_power_4 test_power_5 test_power_6
        test_primitive_binary_cross_entropy_1 test_primitive_binary_cross_entropy_2
        test_primitive_binary_cross_entropy_3 test_primitive_binary_cross_entropy_4
        test_primitive_binary_cross_entropy_5 test_primitive_binary_cross_entropy_6
        test_primitive_binary_cross_entropy_7 test_primitive_binary_cross_entropy_8
        test_primitive_hinge_loss_1 test_primitive_hinge_loss_2 test_primitive_hinge_loss_3
        test_primitive_squared_error_1 test_primitive_squared_error_2
        test_primitive_squared_error_3 test_primitive_squared_error_4 test_quad_hinge_loss_1
        test_quad_hinge_loss_2 test_quad_hinge_loss_3 test_quantile_loss_1
        test_quantile_loss_2 test_quantile_loss_3 test_quantile_loss_4 test_reduce_max_1
        test_reduce_max_2 test_reduce_max_3 test_reduce_max_4 test_reduce_max_5
        test_reduce_max_6 test_reduce_max_7 test_reduce_mean_1 test_reduce_mean_2
        test_reduce_mean_3 test_reduce_mean_4 test_reduce_mean_5 test_reduce_mean_6
        test_reduce_mean_7 test_reduce_min_1 test_reduce_min_2 test_reduce_min_3
        test_reduce_min_4 test_reduce_min_5 test_reduce_min_6 test_reduce_min_7
        test_reduce_sum_1 test_reduce_sum_2 test_reduce_sum_3 test_reduce_sum_4
        test_reduce_sum_5 test_reduce_sum_6 test_reduce_sum_7 test_relu_1 test_relu_2
        test_relu_3 test_relu_4 test_sigmoid_1 test_sigmoid_2 test_sigmoid_3 test_sigmoid_4
        test_robust_log_1 test_robust_log_2 test_robust_log_3
        test_robust_power_1 test_robust_power_2 test_robust_power_3 test_robust_power_4
        test_robust_power_5 test_robust_power_6 test_robust_power_7
        test_robust_sqrt_1 test_robust_sqrt_2 test_robust_sqrt_3 test_robust_sqrt_4 test_robust_sqrt_5
        test_sigmoid_5 test_sigmoid_6 test_sin test_softmax_1 test_softmax_2 test_softmax_3
        test_softmax_4 test_softmax_5 test_softmax_6 test_softmax_7 test_softplus_1
        test_softplus_2 test_softplus_3 test_softplus_4 test_sqrt_1 test_sqrt_2 test_sqrt_3
        test_stable_reciprocal_1 test_stable_reciprocal_2 test_stable_reciprocal_3
        test_stop_gradient_1 test_stop_gradient_2 test_sub_1 test_sub_2 test_sub_3
        test_sub_4 test_sub_5 test_sub_6 test_sum_1 test_sum_2 test_sum_3 test_sum_4
        test_sum_5 test_sum_6 test_tanh_1 test_tanh_2 test_tanh_3 test_tanh_4 test_tanh_5
        test_transpose test_transpose_axis_1 test_transpose_axis_2 test_transpose_axis_3
        test_transpose_axis_4 test_var_1 test_var_2 test_var_3 test_var_4
        test_floor_div_1 test_floor_div_2 test_floor_div_3 test_floor_div_4 test_floor_div_5
        test_floor_div_6 test_prod_1 test_prod_2 test_prod_3 test_prod_4 test_shift_left_1
        test_shift_left_2 test_shift_left_3 test_shift_right_1 test_shift_right_2 test_shift_right_3
    """.split()),
}



def _check(file: str, res: dict[str, str], backend: str) -> None:
    _report(f"{file} on {backend}", res)
    assert not {k: r for k, r in res.items() if r != "ok" and not r.startswith("unbuilt")}, res
    assert {k for k, r in res.items() if r == "ok"} == BUILT[file] - (
        JAX_SUBNORMAL if backend == "jax" else set())


@pytest.mark.parametrize("file", FILES)
def test_published_cases_numpy_and_torch(file):
    """Every case whose blocks we offer matches on NumPy and torch, float64."""
    for backend in (ml.NumpyBackend(dtype="float64"), ml.TorchBackend(dtype="float64")):
        _check(file, results(backend, file), backend.name)


@pytest.mark.slow
def test_published_cases_jax():
    """The same on JAX, float64 (x64 is process-global: in a subprocess)."""
    here = Path(__file__).resolve().parent
    res = json.loads(run_python(f"""
        import json, sys
        sys.path.insert(0, {str(here)!r})
        import test_published_conformance as t
        from mithril.backends import JaxBackend
        b = JaxBackend(dtype="float64")
        print(json.dumps({{f: t.results(b, f) for f in t.FILES}}))
    """, timeout=600).strip().splitlines()[-1])
    for file in FILES:
        _check(file, res[file], "jax")


def test_counts_in_the_compatibility_page():
    """docs/mithril-compat.md states the counts per file."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "mithril-compat.md").read_text()
    for file in FILES:
        assert f"`{file}`: {len(BUILT[file])}" in page, file


def test_contradictory_cases_are_refused():
    """The cases listed in CONTRADICTORY do raise what their reason says."""
    cases = json.loads(shared_file("conformance", "published", FILES[0]).read_text())
    with pytest.raises(ml.ShapeError, match="parameter 'linear.weight': expected shape \\[1, 5\\], "
                                            "got \\[2, 5\\]"):
        run_case(cases["test_polynomial_2D_Degree_2_multilabel"], ml.NumpyBackend(dtype="float64"))
