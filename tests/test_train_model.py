"""TrainModel: losses with reduce steps, L1/L2 regularizers divided by the reduced size of the
losses that depend on them, final_cost and evaluate(..., output_gradients=True); the published
Mithril's integration cases on NumPy, torch and JAX; training with our SGD; bad input."""

from __future__ import annotations

import functools
import json
import re

import numpy as np
import pytest
from conftest import shared_file

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
from mithril.models import (
    L1,
    L2,
    MLP,
    Absolute,
    Buffer,
    CrossEntropy,
    Linear,
    Max,
    Mean,
    Model,
    Relu,
    Sigmoid,
    Softmax,
    SquaredError,
    Subtract,
    Sum,
    TrainModel,
)
from mithril.utils.optimizers import SGD

CONFORMANCE = shared_file("conformance", "mithril-json-cases.json")
PUBLISHED = shared_file("conformance", "published", "integration_directed_test.json")
TOL = {"rtol": 1e-10, "atol": 1e-10}


# -- the published Mithril's integration cases ------------------------------------------------------
def _absolute_error() -> Model:
    m = Model()
    m |= Subtract().connect(left="input", right="target", output=ml.IOKey("diff", expose=False))
    m |= Absolute().connect(input="diff", output="output")
    return m


_LOSSES = {"SquaredError": lambda: SquaredError(reduction="none"),
           "CrossEntropy": lambda: CrossEntropy(reduction="none"),  # the published default
           "AbsoluteError": _absolute_error, "Relu": Relu, "Buffer": Buffer,
           "HingeLoss": ml.HingeLoss, "QuadHingeLoss": ml.QuadHingeLoss}
_ACTS = {"relu": Relu, "sigmoid": Sigmoid, "softmax": Softmax, "buffer": Buffer}
#: published blocks whose parameters are ``linear.weight`` / ``linear.bias`` (published
#: ``weight`` / ``bias``), built with the published arguments (``dimension``: the weight's rows)
_LINEAR_BLOCKS = {"PolynomialRegression": lambda a, d: ml.PolynomialRegression(
                      a.get("degree", 1), a.get("dimension", len(d["weight"]))),
                  "LogisticRegression": lambda a, d: ml.LogisticRegression()}
#: published blocks whose differentiable terminals are inputs (trained under their own names)
_INPUT_BLOCKS = {"EncoderDistanceMatrix": ml.EncoderDistanceMatrix, "MDSCore": ml.MDSCore,
                 "MDS": ml.MDS, "PolynomialKernel": ml.PolynomialKernel,
                 # (their parameters are the terminals "weight" and "bias", as published)
                 "LinearSVM": ml.LinearSVM,
                 "KernelizedSVM": lambda kernel: ml.KernelizedSVM(getattr(ml, kernel if isinstance(
                     kernel, str) else kernel["name"])())}
#: published elementwise losses with arguments
_LOSS_FNS = {"CrossEntropy": lambda **p: CrossEntropy(reduction="none", **p),
             "QuantileLoss": ml.QuantileLoss,
             "BinaryCrossEntropy": lambda **p: ml.BinaryCrossEntropy(reduction="none", **p)}
_REGS = {"l1": L1, "l2": L2, "quadraticformregularizer": ml.QuadraticFormRegularizer}


def _build_model(spec: dict, data: dict) -> tuple[Model, dict[str, str]]:
    """Our model for a published spec, and the published parameter names -> ours."""
    name, args = spec["name"], spec.get("args") or {}
    if name == "Linear":
        return Linear(len(data["weight"])), {"weight": "linear.weight", "bias": "linear.bias"}
    if name in _LINEAR_BLOCKS:
        return _LINEAR_BLOCKS[name](args, data), {"weight": "linear.weight", "bias": "linear.bias"}
    if name in _INPUT_BLOCKS:
        return _INPUT_BLOCKS[name](**args), {}
    if name == "MLP":
        dims = args["dimensions"]
        model = MLP([None if a == "buffer" else a for a in args["activations"]], dims)
        path = (lambda i: f"linear_{i}") if len(dims) > 1 else (lambda i: "linear")
        return model, {f"{r}{i}": f"{path(i)}.{r}" for i in range(len(dims)) for r in ("weight", "bias")}
    if name == "Model" and all(s["name"] == "Layer" for s in spec["submodels"].values()):
        model, names = Model(), {}
        wires: dict[tuple[str, str], str | ml.IOKey] = {}  # (submodel, key) -> our name
        for m, conns in spec["connections"].items():
            for key, v in conns.items():
                if isinstance(v, str):
                    wires[(m, key)] = v
                else:  # {"key": {"connect": [[other, key], ...]}}: a wire inside the model
                    for end in [(m, key), *map(tuple, v["key"]["connect"])]:
                        wires[end] = ml.IOKey(f"_{m}_{key}", expose=False)
        for i, (m, sub) in enumerate(spec["submodels"].items()):
            conns = spec["connections"][m]
            layer = Model()
            layer |= Linear(sub["args"]["dimension"]).connect(input="input", output=ml.IOKey("h", expose=False))
            layer |= _ACTS[sub["args"]["activation"].lower()]().connect(input="h", output="output")
            model |= layer.connect(input=wires[(m, "input")], output=wires[(m, "output")])
            names.update({conns[r]: f"model_{i}.linear.{r}" for r in ("weight", "bias") if r in conns})
        return model, names
    raise NotImplementedError(f"model {name}")


def _loss(spec) -> object:
    if isinstance(spec, dict):
        what = f"{spec['fn']}({', '.join(f'{k}={v!r}' for k, v in spec['params'].items())})"
        if spec["fn"] in _LOSS_FNS:
            return _LOSS_FNS[spec["fn"]](**spec["params"])
        raise NotImplementedError(what)
    if spec not in _LOSSES:
        raise NotImplementedError(f"loss {spec}")
    return _LOSSES[spec]()


def _reduce(step: str):
    return {"Mean": Mean, "Sum": Sum}[step]()


def run_integration_case(case: dict, backend) -> list[str]:
    """Builds ``case`` as a TrainModel, evaluates final_cost and its gradients on ``backend``;
    returns what does not match (empty: all match at 1e-10). NotImplementedError: not expressible."""
    if case.get("injected_static_keys"):
        raise NotImplementedError("injected_static_keys")
    static = {k: np.asarray(v) for k, v in case["static_keys"].items()}
    params_in = {k: np.asarray(v, dtype=np.float64) for k, v in case["inputs"].items()}
    model, names = _build_model(case["model"], {**static, **params_in})
    trained_inputs = {k for k in params_in if k not in names}  # trained under their own names
    names.update({k: k for k in trained_inputs})
    tm = TrainModel(model)
    cross_entropy_targets = set()
    for out, spec in case["output_specs"].items():
        if "loss" not in spec:  # (an output that only is an output: the published MDS's coords)
            continue
        loss = _loss(spec["loss"])
        conns = {"input": out}
        if "target_key" in spec:
            conns["target"] = spec["target_key"]
            if spec["loss"] == "CrossEntropy" or isinstance(spec["loss"], dict) \
                    and spec["loss"]["fn"] == "CrossEntropy":  # (class indices, not BCE's)
                cross_entropy_targets.add(spec["target_key"])
        tm.add_loss(loss, [_reduce(s) for s in spec.get("reduce_steps") or ["Mean"]], **conns)
    for reg in case.get("regularizations", []):
        if reg["model"] not in _REGS:
            raise NotImplementedError(f"regularizer {reg['model']}")
        if reg.get("regex"):
            ours = [names[k] for k in params_in if re.search(reg["input"], k)]
            target = re.compile("^(?:" + "|".join(map(re.escape, ours)) + ")$")
        else:
            target = names.get(reg["input"], reg["input"])
        tm.add_regularization(_REGS[reg["model"]](), coef=reg["coef"]["tensor"], input=target,
                              **({"kernel": reg["kernel"]} if "kernel" in reg else {}))
    if case.get("final_loss_combiner") == "Mean":
        tm.set_loss_combiner(Mean())
    data = {k: v if k in cross_entropy_targets else v.astype(np.float64) for k, v in static.items()}
    c = ml.compile(tm, backend, shapes={k: v.shape for k, v in {**data, **params_in}.items()
                                        if k in data or k in trained_inputs},
                   trainable_keys=trained_inputs, discard_keys=case.get("discard_keys", []))
    params = {names[k]: backend.array(v) for k, v in params_in.items()}
    out, grads = c.evaluate(params, {k: backend.array(v) for k, v in data.items()}, output_gradients=True)
    bad = []
    for k, want in case["results"]["eval"].items():
        if not np.allclose(backend.to_numpy(out[k]), np.asarray(want, dtype=np.float64), **TOL):
            bad.append(f"{k}: {backend.to_numpy(out[k]).tolist()} != {want}")
    for k, want in case["results"]["grad"].items():
        if not np.allclose(backend.to_numpy(grads[names[k]]), np.asarray(want, dtype=np.float64), **TOL):
            bad.append(f"grad {k}: {backend.to_numpy(grads[names[k]]).tolist()} != {want}")
    return bad


#: published cases known to be wrong (the published loaders drop them)
_KNOWN_WRONG = {"test_linear_9", "test_tsne_1", "test_tsne_2", "test_tsne_core_1", "test_tsne_core_2",
                "test_tsne_core_3"}


@functools.cache  # (read once: every test of a case looks its case up)
def all_cases() -> dict[str, dict]:
    """The 14 integration cases of mithril-json-cases.json, then the other published ones."""
    cases = dict(json.loads(CONFORMANCE.read_text())["integration"])
    for k, v in json.loads(PUBLISHED.read_text()).items():
        cases.setdefault(k, v)
    return cases


def integration_results(backend, only: list[str] | None = None) -> dict[str, str]:
    """'ok', 'mismatch: ...', 'unsupported: <reason>' or 'error: ...' per case (of ``only``)."""
    res = {}
    for name, case in all_cases().items():
        if only is not None and name not in only:
            continue
        if name in _KNOWN_WRONG:
            res[name] = "unsupported: known wrong in the published test data"
            continue
        try:
            bad = run_integration_case(case, backend)
            res[name] = "ok" if not bad else "mismatch: " + "; ".join(bad)
        except NotImplementedError as e:
            res[name] = f"unsupported: {e}"
        except Exception as e:  # noqa: BLE001 - reported by name
            res[name] = f"error: {type(e).__name__}: {str(e)[:200]}"
    return res


def _features(case: dict) -> set[str]:
    """What a case exercises of the builder above: its model, losses (with reduce steps,
    target or none), regularizers (regex, kernel), combiner, discarded and injected keys."""
    if "model" not in case:
        return {"no model"}
    out = {f"model {case['model']['name']}", f"combiner {case.get('final_loss_combiner')}",
           f"discard {bool(case.get('discard_keys'))}",
           f"injected {bool(case.get('injected_static_keys'))}"}
    for spec in case["output_specs"].values():
        loss = spec.get("loss")
        out |= {f"loss {loss['fn'] if isinstance(loss, dict) else loss}",
                f"target {'target_key' in spec}",
                *(f"reduce {r}" for r in spec.get("reduce_steps") or ["Mean"])}
    out |= {f"reg {r['model']} regex={bool(r.get('regex'))} kernel={'kernel' in r}"
            for r in case.get("regularizations", [])}
    out.add(f"regs {len(case.get('regularizations', []))}")
    return out


@functools.cache
def _default_cases() -> frozenset[str]:
    """The default run's cases: in order, each that adds a feature not yet covered (so every
    branch of the builder runs on every backend); the others repeat them, under ``-m slow``."""
    chosen, seen = set(), set()
    for name, case in all_cases().items():
        if _features(case) - seen:
            chosen.add(name)
            seen |= _features(case)
    return frozenset(chosen)


#: the published integration cases that must match (the 14 of mithril-json-cases.json first)
EXPECTED_OK = {
    "test_linear_1", "test_linear_2", "test_linear_3", "test_linear_4", "test_linear_5", "test_linear_6",
    "test_linear_7", "test_linear_8", "test_nn_1", "test_nn_3", "test_nn_4", "test_nn_5", "test_nn_9",
    "test_linear_11",
    # regularized and multi-loss cases of the published file
    "test_nn_10", "test_linear_10", "test_linear_10_two_reg_groups", "test_linear_11_two_key_reg",
    "test_linear_with_2_reg", "test_Composite_2", "test_Composite_2-1", "test_Composite_2-2",
    "test_Composite_2-3", "test_Composite_2-4", "test_Composite_2-5", "test_Composite_2-6",
    "test_Composite_2-7", "test_Composite_2-8",
    # CrossEntropy(input_type="probs")
    "test_nn_2", "test_nn_6", "test_nn_7_regex", "test_Composite_1", "test_Composite_1_extend_from_inputs_1",
    # the published blocks: regressions (parameters linear.weight / linear.bias), losses with
    # arguments, and blocks trained through their inputs
    *(f"test_polynomial_{i}" for i in range(1, 16)), *(f"test_logistic_{i}" for i in range(1, 10)),
    *(f"test_quantile_{i}" for i in range(1, 9)), "test_nn_8", "test_nn_8_efficient",
    "test_distance_matrix_1", "test_distance_matrix_2", "test_distance_matrix_3",
    "test_polynomial_kernel_1", "test_polynomial_kernel_2", "test_mds_1",
    *(f"test_mds_base_{i}" for i in (1, 2, 3, "3-1", 4, 5, 6, 7)),
    # the support-vector machines (HingeLoss / QuadHingeLoss, QuadraticFormRegularizer)
    *(f"test_linearSVM_{i}" for i in range(1, 5)), "test_kernelizedSVM_1_without_reg",
    *(f"test_kernelizedSVM_{i}" for i in range(1, 6)),
}


def test_the_expected_cases_are_published():
    """The 14 of mithril-json-cases.json and 77 more of the published file must match."""
    cases = set(all_cases())
    mine = set(json.loads(CONFORMANCE.read_text())["integration"])
    assert mine <= EXPECTED_OK <= cases and len(EXPECTED_OK) == 91
    assert _KNOWN_WRONG <= cases - EXPECTED_OK


#: the default run's cases (``_default_cases``): each branch of the builder on every backend
CASES = [n if n in _default_cases() else pytest.param(n, marks=pytest.mark.slow)
         for n in all_cases()]


def _check(name: str, res: str, backend: str) -> None:
    """A case that must match matches; the rest are known wrong or not expressible (a
    NotImplementedError naming why), never an error or a mismatch."""
    if name in EXPECTED_OK:
        assert res == "ok", (backend, name, res)
    else:
        assert res.startswith("unsupported: "), (backend, name, res)


@pytest.mark.parametrize("name", CASES)
def test_conformance_integration_cases(name):
    """Each case on NumPy and torch (in process) at 1e-10."""
    for backend in (NumpyBackend(dtype="float64"), TorchBackend(dtype="float64")):
        _check(name, integration_results(backend, [name])[name], type(backend).__name__)


@pytest.mark.parametrize("subset", ["default", pytest.param("all", marks=pytest.mark.slow)])
def test_conformance_integration_cases_on_jax(subset):
    """The cases on JAX (float64: x64 for the block only, ``jax_float64`` puts the
    process-wide flag back; the default run's share of them, or all) at 1e-10."""
    from optimizer_parity import jax_float64

    only = sorted(_default_cases()) if subset == "default" else list(all_cases())
    with jax_float64():
        res = integration_results(JaxBackend(dtype="float64"), only)
    assert sorted(res) == sorted(only)
    for name in only:
        _check(name, res[name], "jax")


# -- the rule, by hand -------------------------------------------------------------------------------
BACKENDS = [pytest.param(lambda: NumpyBackend(dtype="float64"), id="numpy"),
            pytest.param(lambda: TorchBackend(dtype="float64"), id="torch")]


def _two_heads(batch: int = 4):
    """Two linear heads on one hidden layer; head_a's loss reduced by Mean, head_b's by Sum
    then Max over a (batch, 3) loss."""
    model = Model()
    model |= Linear(5).connect(input="input", output=ml.IOKey("h", expose=False))
    model |= Linear(2).connect(input="h", output="a")
    model |= Linear(3).connect(input="h", output="b")
    return model


def _reference(p, x, ya, yb, coefs):
    h = x @ p["linear_0.weight"].T + p["linear_0.bias"]
    a = h @ p["linear_1.weight"].T + p["linear_1.bias"]
    b = h @ p["linear_2.weight"].T + p["linear_2.bias"]
    loss_a = np.mean((a - ya) ** 2)             # reduced size 4 * 2 = 8
    loss_b = np.max(np.abs(b - yb).sum(axis=1))  # Sum(axis=1) then Max(): reduced size 4
    c1, c2 = coefs
    # linear_0.weight: both losses depend on it, geometric mean sqrt(8 * 4)
    reg = c1 * 0.5 * np.sum(p["linear_0.weight"] ** 2) / np.sqrt(8 * 4)
    reg += c2 * np.sum(np.abs(p["linear_2.weight"])) / 4  # only loss_b
    return loss_a + loss_b + reg


def _train_model(coefs=(0.3, 0.2)) -> TrainModel:
    tm = TrainModel(_two_heads())
    tm.add_loss(SquaredError(), [Mean()], input="a", target="ya")
    tm.add_loss(_absolute_error(), [Sum(axis=1), Max()], input="b", target="yb")
    tm.add_regularization(L2(), coef=coefs[0], input="linear_0.weight")
    tm.add_regularization(L1(), coef=coefs[1], input=re.compile(r"linear_2\.weight"))
    return tm


@pytest.mark.parametrize("make_backend", BACKENDS)
def test_final_cost_and_gradients_against_finite_differences(make_backend):
    backend = make_backend()
    tm = _train_model()
    c = ml.compile(tm, backend, shapes={"input": [4, 3], "ya": [4, 2], "yb": [4, 3]})
    assert set(c.output_keys) == {"a", "b", "final_cost"}
    assert c.shapes["final_cost"] == ()
    assert sorted(c.parameter_shapes) == sorted(tm.parameter_names)
    rng = np.random.default_rng(0)
    p = {k: rng.standard_normal(s) for k, s in c.parameter_shapes.items()}
    x, ya, yb = rng.standard_normal((4, 3)), rng.standard_normal((4, 2)), rng.standard_normal((4, 3))
    data = {"input": x, "ya": ya, "yb": yb}
    native = {k: backend.array(v) for k, v in data.items()}
    out, grads = c.evaluate({k: backend.array(v) for k, v in p.items()}, native, output_gradients=True)
    np.testing.assert_allclose(float(backend.to_numpy(out["final_cost"])), _reference(p, x, ya, yb, (0.3, 0.2)),
                               rtol=1e-12)
    eps = 1e-6
    for name, value in p.items():
        num = np.zeros_like(value)
        for idx in np.ndindex(value.shape):
            for sign in (1, -1):
                q = {k: v.copy() for k, v in p.items()}
                q[name][idx] += sign * eps
                num[idx] += sign * _reference(q, x, ya, yb, (0.3, 0.2)) / (2 * eps)
        np.testing.assert_allclose(backend.to_numpy(grads[name]), num, rtol=1e-6, atol=1e-8, err_msg=name)


def test_all_backends_agree_on_the_rule():
    rng = np.random.default_rng(1)
    results = []
    for backend in (NumpyBackend(dtype="float64"), TorchBackend(dtype="float64")):
        c = ml.compile(_train_model(), backend, shapes={"input": [4, 3], "ya": [4, 2], "yb": [4, 3]})
        if not results:
            p = {k: rng.standard_normal(s) for k, s in sorted(c.parameter_shapes.items())}
            data = {"input": rng.standard_normal((4, 3)), "ya": rng.standard_normal((4, 2)),
                    "yb": rng.standard_normal((4, 3))}
        out, g = c.evaluate({k: backend.array(v) for k, v in p.items()},
                            {k: backend.array(v) for k, v in data.items()}, output_gradients=True)
        results.append((float(backend.to_numpy(out["final_cost"])), {k: backend.to_numpy(v) for k, v in g.items()}))
    from optimizer_parity import jax_float64

    with jax_float64():  # (x64 for the block only: the process-wide flag put back)
        b = JaxBackend(dtype="float64")
        c = ml.compile(_train_model(), b, shapes={"input": [4, 3], "ya": [4, 2], "yb": [4, 3]})
        out, g = c.evaluate({k: b.array(v) for k, v in p.items()},
                            {k: b.array(v) for k, v in data.items()}, output_gradients=True)
        jax = (float(out["final_cost"]), sum(float(np.sum(np.asarray(v))) for v in g.values()))
        assert all(np.asarray(v).dtype == np.float64 for v in g.values())
    assert abs(results[0][0] - results[1][0]) <= 1e-12 * abs(results[0][0])
    for k in results[0][1]:
        np.testing.assert_allclose(results[1][1][k], results[0][1][k], rtol=1e-10, atol=1e-12)
    assert abs(float(jax[0]) - results[0][0]) <= 1e-12 * abs(results[0][0])
    assert abs(float(jax[1]) - sum(v.sum() for v in results[0][1].values())) <= 1e-9


def test_mean_combiner_coef_key_name_and_metric():
    b = NumpyBackend(dtype="float64")
    tm = TrainModel(_two_heads())
    tm.add_loss(SquaredError(), input="a", target="ya", key_name="loss_a")  # Mean() by default
    tm.add_loss(SquaredError(), [Sum()], coef=0.5, input="b", target="yb", key_name="loss_b")
    tm.add_metric(_absolute_error(), [Mean()], input="a", target="ya", key_name="mae")
    tm.set_loss_combiner(Mean())
    c = ml.compile(tm, b, shapes={"input": [4, 3]})
    assert set(c.output_keys) == {"a", "b", "loss_a", "loss_b", "mae", "final_cost"}
    rng = np.random.default_rng(2)
    p = {k: rng.standard_normal(s) for k, s in c.parameter_shapes.items()}
    data = {"input": rng.standard_normal((4, 3)), "ya": rng.standard_normal((4, 2)),
            "yb": rng.standard_normal((4, 3))}
    out, grads = c.evaluate(p, data, output_gradients=True)
    la, lb = np.mean((out["a"] - data["ya"]) ** 2), 0.5 * np.sum((out["b"] - data["yb"]) ** 2)
    np.testing.assert_allclose(out["loss_a"], la, rtol=1e-14)
    np.testing.assert_allclose(out["loss_b"], lb, rtol=1e-14)
    np.testing.assert_allclose(out["mae"], np.mean(np.abs(out["a"] - data["ya"])), rtol=1e-14)
    np.testing.assert_allclose(out["final_cost"], (la + lb) / 2, rtol=1e-14)
    # the metric adds nothing to the gradients: the same as with a dict naming final_cost only
    _, g2 = c.evaluate(p, data, output_gradients={"final_cost": 1.0})
    for k in grads:
        np.testing.assert_array_equal(grads[k], g2[k])


def test_a_regularized_trainable_input_and_a_regularizer_no_loss_depends_on():
    b = NumpyBackend(dtype="float64")
    model = Model()
    model |= Linear(2).connect(input="input", output="y")
    model |= Linear(2).connect(input="other", output="z")  # no loss reads z
    tm = TrainModel(model)
    tm.add_loss(SquaredError(), [Mean()], input="y", target="t")
    tm.add_regularization(L2(), coef=0.5, input="input")             # an input, made trainable
    tm.add_regularization(L1(), coef=0.1, input="linear_1.weight")   # not divided: no loss uses it
    c = ml.compile(tm, b, shapes={"input": [3, 4], "other": [3, 4]}, trainable_keys=["input"])
    rng = np.random.default_rng(3)
    p = {k: rng.standard_normal(s) for k, s in c.parameter_shapes.items()}
    data = {"other": rng.standard_normal((3, 4)), "t": rng.standard_normal((3, 2))}
    out, g = c.evaluate(p, data, output_gradients=True)
    y = p["input"] @ p["linear_0.weight"].T + p["linear_0.bias"]
    want = np.mean((y - data["t"]) ** 2) + 0.5 * 0.5 * np.sum(p["input"] ** 2) / 6 \
        + 0.1 * np.sum(np.abs(p["linear_1.weight"]))
    np.testing.assert_allclose(out["final_cost"], want, rtol=1e-14)
    np.testing.assert_allclose(g["linear_1.weight"], 0.1 * np.sign(p["linear_1.weight"]), rtol=1e-14)
    gin = 2 * (y - data["t"]) / 6 @ p["linear_0.weight"] + 0.5 * p["input"] / 6
    np.testing.assert_allclose(g["input"], gin, rtol=1e-12)


def test_output_gradients_true_on_a_plain_scalar_model_and_its_errors():
    b = NumpyBackend(dtype="float64")
    m = Model()
    m |= Linear(1).connect(input="x", output=ml.IOKey("h", expose=False))
    m |= Sum().connect(input="h", output="s")
    c = ml.compile(m, b, shapes={"x": [5, 2]})
    p = c.randomize_params()
    x = b.randn(5, 2)
    _, g = c.evaluate(p, {"x": x}, output_gradients=True)
    np.testing.assert_allclose(g["linear.weight"], x.sum(axis=0, keepdims=True), rtol=1e-12)
    np.testing.assert_allclose(g["linear.bias"], [5.0])
    assert set(c.evaluate(p, {"x": x}, output_gradients=False)) == {"s"}
    c2 = ml.compile(Linear(2), b, shapes={"input": [3, 2]})
    with pytest.raises(ml.ShapeError, match=r"scalar output; 'output' has shape \[3, 2\]"):
        c2.evaluate(c2.randomize_params(), {"input": b.randn(3, 2)}, output_gradients=True)
    m2 = Model()
    m2 |= Sum().connect(input="x", output="s1")
    m2 |= Sum().connect(input="x", output="s2")
    c3 = ml.compile(m2, b, shapes={"x": [2]}, trainable_keys=["x"])
    with pytest.raises(ml.KeyMismatchError, match="'final_cost' or the single output"):
        c3.evaluate(c3.randomize_params(), {}, output_gradients=True)


# -- training ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make_backend", BACKENDS)
def test_linear_regression_with_sgd_equals_a_numpy_loop(make_backend):
    """The published examples/model_api linear regression, in our words: Linear, SquaredError
    reduced by Mean, trained with our SGD; equal to gradient descent written in NumPy."""
    backend = make_backend()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 3))
    y = x @ np.array([[1.5], [-2.0], [0.5]]) + 0.3 + 0.01 * rng.standard_normal((32, 1))

    tm = TrainModel(Linear(dimension=1))
    tm.add_loss(SquaredError(), reduce_steps=[Mean()], input="output", target="target")
    c = ml.compile(tm, backend, shapes={"input": [None, 3]})
    w0, b0 = rng.standard_normal((1, 3)), np.zeros(1)
    params = {"linear.weight": backend.array(w0), "linear.bias": backend.array(b0)}
    data = {"input": backend.array(x), "target": backend.array(y)}
    opt = SGD(learning_rate=0.1)
    state = opt.init(params)
    costs = []
    for _ in range(20):
        out, grads = c.evaluate(params, data, output_gradients=True)
        costs.append(float(backend.to_numpy(out["final_cost"])))
        params, state = opt.update(params, grads, state)

    w, bias, ref = w0.copy(), b0.copy(), []
    for _ in range(20):
        r = x @ w.T + bias - y
        ref.append(np.mean(r**2))
        gw, gb = 2 * r.T @ x / r.size, 2 * r.sum(axis=0) / r.size
        w, bias = w - 0.1 * gw, bias - 0.1 * gb
    np.testing.assert_allclose(costs, ref, rtol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(params["linear.weight"]), w, rtol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(params["linear.bias"]), bias, rtol=1e-12)
    assert costs[-1] < 0.05 * costs[0]


def test_top_level_names():
    assert ml.TrainModel is TrainModel and ml.models.L1 is L1 and ml.models.L2 is L2
    assert {"TrainModel", "L1", "L2"} <= set(ml.models.__all__)


# -- bad input -------------------------------------------------------------------------------------------
def test_bad_input_is_named():
    tm = TrainModel(Linear(2))
    with pytest.raises(ml.KeyMismatchError, match=r"names an output of the model; its outputs are \['output'\]"):
        tm.add_loss(SquaredError(), input="outptu", target="target")
    with pytest.raises(ml.KeyMismatchError, match=r"input\(s\) \['target'\] of SquaredError are not connected"):
        tm.add_loss(SquaredError(), input="output")
    with pytest.raises(ml.KeyMismatchError, match=r"has no input\(s\) \['inptu'\]"):
        tm.add_loss(SquaredError(), inptu="output", target="t")
    with pytest.raises(ml.KeyMismatchError, match=r"pattern 'conv' matches no parameter; the parameters "
                                                  r"are \['linear.weight', 'linear.bias'\]"):
        tm.add_regularization(L2(), coef=0.1, input=re.compile("conv"))
    with pytest.raises(ml.KeyMismatchError, match="'weight' names no parameter or input"):
        tm.add_regularization(L2(), coef=0.1, input="weight")
    with pytest.raises(TypeError, match="coef must be a number"):
        tm.add_regularization(L2(), coef="big", input="linear.weight")
    with pytest.raises(TypeError, match="cannot be extended"):
        tm |= Linear(2)
    with pytest.raises(ValueError, match="at least one loss"):
        ml.compile(tm, NumpyBackend(), shapes={"input": [1, 2]})
    tm.add_loss(SquaredError(), input="output", target="target", key_name="loss")
    with pytest.raises(ml.KeyMismatchError, match="key_name 'loss' is already"):
        tm.add_metric(SquaredError(), input="output", target="target", key_name="loss")
    ml.compile(tm, NumpyBackend(), shapes={"input": [1, 2]})
    with pytest.raises(ValueError, match="has been compiled"):
        tm.add_loss(SquaredError(), input="output", target="target")
    with pytest.raises(ValueError, match="already part of a model"):
        TrainModel(tm._model)
