"""The published Mithril's ``LinearSVM``, ``KernelizedSVM(kernel)`` (with ``RBFKernel`` and
``PolynomialKernel``) and ``QuadraticFormRegularizer``, side by side with torch autograd of
their published definitions in float64 on NumPy, torch and JAX (outputs and the gradients
of every input and parameter), the NumPy gradients against central differences, the 10
published integration cases (``test_linearSVM_*``, ``test_kernelizedSVM_*``) through
``test_train_model``'s runner with these blocks mapped, and bad kernels refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import test_train_model as runner
import torch
from conftest import central_differences, jax_float64_results, run_python

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend

_RNG = np.random.default_rng(2024)
#: per case: the model's inputs (all trained, so all get gradients) and the cotangents
_X = _RNG.standard_normal((5, 3))
_X[0] = [1.0, -1.0, 0.5]  # with the weight below: output exactly 0 (sign 0)
_W = np.array([[0.5, 1.0, 0.5]])
_B = np.array([0.25])
_X1, _X2 = _RNG.standard_normal((4, 2)), _RNG.standard_normal((3, 2))
_WK = _RNG.standard_normal((1, 3))
_K = _RNG.standard_normal((3, 3))

CASES = {
    "linear": ({"input": _X, "weight": _W, "bias": _B},
               {"output": _RNG.standard_normal((5, 1)), "decision_output": _RNG.standard_normal((5, 1))}),
    "rbf": ({"input1": _X1, "input2": _X2, "l_scale": np.array([1.3]), "sigma": np.array([0.8]),
             "weight": _WK, "bias": _B},
            {"kernel": _RNG.standard_normal((4, 3)), "output": _RNG.standard_normal((4, 1))}),
    "poly": ({"input1": _X1, "input2": _X2, "poly_coef": np.array([0.7]), "degree": np.array([2.5]),
              "weight": _WK, "bias": _B},
             {"kernel": _RNG.standard_normal((4, 3)), "output": _RNG.standard_normal((4, 1))}),
    "quadratic_form": ({"input": _WK, "kernel": _K}, {"output": np.array([[1.5]])}),
}


def _model(case: str) -> ml.Model:
    if case == "linear":
        return ml.LinearSVM()
    if case == "quadratic_form":
        return ml.QuadraticFormRegularizer()
    return ml.KernelizedSVM(ml.RBFKernel() if case == "rbf" else ml.PolynomialKernel())


def _backend(name: str):
    return {"numpy": NumpyBackend, "torch": TorchBackend, "jax": JaxBackend}[name](dtype="float64")


def _compiled(case: str, backend):
    values, _ = CASES[case]
    model = _model(case)
    inputs = [k for k in values if k in model.input_keys]  # (weight, bias: parameters)
    return ml.compile(model, backend, shapes={k: v.shape for k, v in values.items()},
                      trainable_keys=inputs)


def run(case: str, backend_name: str) -> dict[str, np.ndarray]:
    """Our outputs ("out|k") and gradients ("grad|k") of ``case`` on a float64 backend."""
    backend = _backend(backend_name)
    values, cots = CASES[case]
    c = _compiled(case, backend)
    out, grads = c.evaluate({k: backend.array(v) for k, v in values.items()}, {},
                            output_gradients={k: backend.array(v) for k, v in cots.items()})
    res = {f"out|{k}": backend.to_numpy(v) for k, v in out.items()}
    res.update({f"grad|{k}": backend.to_numpy(v) for k, v in grads.items()})
    return res


def _torch(case: str) -> dict[str, np.ndarray]:
    """The published definitions in torch, differentiated by autograd."""
    values, cots = CASES[case]
    t = {k: torch.tensor(v, requires_grad=True) for k, v in values.items()}
    if case == "linear":
        y = t["input"] @ t["weight"].T + t["bias"]
        outs = {"output": y, "decision_output": torch.sign(y)}
    elif case == "quadratic_form":
        outs = {"output": 0.5 * t["input"] @ t["kernel"] @ t["input"].T}
    else:
        x1, x2 = t["input1"], t["input2"]
        if case == "rbf":
            d2 = ((x1[:, None, :] - x2[None, :, :]) ** 2).sum(-1)
            k = t["l_scale"] ** 2 * torch.exp(-d2 / (2 * t["sigma"] ** 2))
        else:  # the bases here are away from 0: the robust power is the plain one
            k = torch.abs(x1 @ x2.T + t["poly_coef"]) ** t["degree"]
        outs = {"kernel": k, "output": k @ t["weight"].T + t["bias"]}
    grads = torch.autograd.grad([outs[k] for k in cots], list(t.values()),
                                [torch.tensor(cots[k]) for k in cots])
    res = {f"out|{k}": v.detach().numpy() for k, v in outs.items()}
    res.update({f"grad|{k}": g.numpy() for k, g in zip(t, grads, strict=True)})
    return res


@pytest.fixture(scope="module")
def jax_results():
    return jax_float64_results("test_published_svm", "CASES", "run")


@pytest.mark.parametrize("case", list(CASES))
def test_against_torch_autograd_on_three_backends(case, jax_results):
    want = _torch(case)
    for name, got in (("numpy", run(case, "numpy")), ("torch", run(case, "torch")),
                      ("jax", jax_results[case])):
        assert set(got) == set(want), (name, set(got) ^ set(want))
        for k, v in want.items():
            np.testing.assert_allclose(got[k], v, rtol=1e-12, atol=1e-12, err_msg=f"{case} {name} {k}")
    if case == "linear":  # a sign of exactly 0, and no gradient through the decision
        assert want["out|decision_output"][0, 0] == 0.0


@pytest.mark.parametrize("case", list(CASES))
def test_numpy_gradients_against_central_differences(case):
    backend = NumpyBackend(dtype="float64")
    values, cots = CASES[case]
    if case == "linear":  # sign jumps at row 0's output of 0: no difference quotient there
        cots = {**cots, "decision_output": cots["decision_output"] * [[0.0], [1], [1], [1], [1]]}
    c = _compiled(case, backend)

    def f(p):
        out = c.evaluate(p, {})
        return sum(float(np.sum(out[k] * cots[k])) for k in cots)

    _, grads = c.evaluate(values, {}, output_gradients=cots)
    fd = central_differences(f, {k: v.copy() for k, v in values.items()}, 1e-6)
    for k in values:
        np.testing.assert_allclose(grads[k], fd[k], rtol=1e-6, atol=1e-7, err_msg=f"{case} {k}")


# -- the published integration cases ---------------------------------------------------------------
SVM_CASES = [*(f"test_linearSVM_{i}" for i in range(1, 5)), "test_kernelizedSVM_1",
             "test_kernelizedSVM_1_without_reg", *(f"test_kernelizedSVM_{i}" for i in range(2, 6))]
_KERNELS = {"RBFKernel": ml.RBFKernel, "PolynomialKernel": ml.PolynomialKernel}


class _TrainModel(ml.TrainModel):
    """The runner's TrainModel, connecting the published regularizer's ``kernel`` (the
    cases' ``"kernel": "kernel"``) where the runner passes ``input`` only."""

    def add_regularization(self, model, coef, **connections):
        if isinstance(model, ml.QuadraticFormRegularizer):
            connections.setdefault("kernel", "kernel")
        return super().add_regularization(model, coef, **connections)


@pytest.fixture
def mapped(monkeypatch):
    def kernelized(kernel):
        return ml.KernelizedSVM(_KERNELS[kernel if isinstance(kernel, str) else kernel["name"]]())

    monkeypatch.setitem(runner._INPUT_BLOCKS, "LinearSVM", ml.LinearSVM)
    monkeypatch.setitem(runner._INPUT_BLOCKS, "KernelizedSVM", kernelized)
    monkeypatch.setitem(runner._LOSSES, "HingeLoss", ml.HingeLoss)
    monkeypatch.setitem(runner._LOSSES, "QuadHingeLoss", ml.QuadHingeLoss)
    monkeypatch.setitem(runner._REGS, "quadraticformregularizer", ml.QuadraticFormRegularizer)
    monkeypatch.setattr(runner, "TrainModel", _TrainModel)


@pytest.mark.parametrize("backend", [NumpyBackend(dtype="float64"), TorchBackend(dtype="float64")],
                         ids=["numpy", "torch"])
def test_published_integration_cases_match(mapped, backend):
    cases = runner.all_cases()
    assert [k for k in cases if "SVM" in k] == SVM_CASES
    got = {n: runner.run_integration_case(cases[n], backend) for n in SVM_CASES}
    assert got == {n: [] for n in SVM_CASES}


@pytest.mark.slow
def test_published_integration_cases_match_on_jax():
    """The same 10 cases on JAX float64 (x64 is process-global: a subprocess)."""
    here = Path(__file__).resolve().parent
    res = json.loads(run_python(f"""
        import json, sys
        sys.path.insert(0, {str(here)!r})
        import pytest
        import test_published_svm as t
        from mithril.backends import JaxBackend
        t.mapped.__wrapped__(pytest.MonkeyPatch())
        cases = t.runner.all_cases()
        print(json.dumps({{n: t.runner.run_integration_case(cases[n], JaxBackend(dtype="float64"))
                          for n in t.SVM_CASES}}))
    """, timeout=600).strip().splitlines()[-1])
    assert res == {n: [] for n in SVM_CASES}


def test_the_svm_cases_discard_what_they_do_not_train():
    """test_linearSVM_* discard ``decision_output``: its Sign is not computed at all."""
    tm = ml.TrainModel(ml.LinearSVM())
    tm.add_loss(ml.HingeLoss(), input="output", target="target")
    c = ml.compile(tm, NumpyBackend(dtype="float64"), shapes={"input": [3, 2], "target": [3, 1]},
                   discard_keys=["decision_output"])
    assert "decision_output" not in c.output_keys
    assert not [n for n in c.program.nodes if isinstance(n.op, ml.Sign)]


# -- bad kernels -------------------------------------------------------------------------------------
def test_bad_kernels_are_refused_by_name():
    with pytest.raises(ml.KeyMismatchError, match=r"at least two inputs, Relu has \['input'\]"):
        ml.KernelizedSVM(ml.Relu())
    two_outputs = ml.Model()
    two_outputs |= ml.RBFKernel().connect(input1="a", input2="b", l_scale="l", sigma="s", output="k")
    two_outputs |= ml.Relu().connect(input="k", output="r")
    with pytest.raises(ml.KeyMismatchError, match=r"single output, Model has \['k', 'r'\]"):
        ml.KernelizedSVM(two_outputs)
    with pytest.raises(TypeError, match="kernel must be a block"):
        ml.KernelizedSVM("RBFKernel")


def test_a_kernel_model_keeps_its_input_names():
    """A composite kernel's inputs are the SVM's inputs under their own names."""
    kernel = ml.Model()
    kernel |= ml.MatrixMultiply().connect(left="xa", right="xb", output="gram")
    svm = ml.KernelizedSVM(kernel)
    assert svm.input_keys[:2] == ("xa", "xb") and svm.cin.key == "xa"
    backend = NumpyBackend(dtype="float64")
    c = ml.compile(svm, backend, shapes={"xa": [4, 2], "xb": [2, 3]})
    assert c.parameter_shapes == {"weight": (1, 3), "bias": (1,)}
    p = {"weight": _WK, "bias": _B}
    out = c.evaluate(p, {"xa": _X1, "xb": _X2.T})
    np.testing.assert_allclose(out["output"], _X1 @ _X2.T @ _WK.T + _B, rtol=1e-12)
