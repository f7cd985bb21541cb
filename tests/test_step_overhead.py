"""A training loop's steady state (:mod:`mithril.compiler.steady`) and the torch backward
through autograd's engine: the calls a loop repeats skip the checks that depend only on the
arrays' keys, types, shapes and dtypes, and keep every one that reads values. Each test
holds a behaviour the fast path must keep: the same numbers (against torch written by hand,
float64), the same error for a bad input, and nothing changed by a refused call."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mithril as ml
from mithril.backends import NumpyBackend, TorchBackend
from mithril.utils.optimizers import Adam
from mithril.utils.training import make_train_step

B, D, C = 16, 5, 4


def problem(backend: type, dtype: str = "float64") -> tuple:
    m = ml.Model()
    m |= ml.MLP(["relu", None], [7, C])(input="input", output=ml.IOKey("logits"))
    m |= ml.CrossEntropy()(input="logits", target="target", output=ml.IOKey("loss"))
    be = backend(dtype=dtype, seed=0)
    compiled = ml.compile(m, be, shapes={"input": [B, D]})
    rng = np.random.default_rng(0)
    batches = [{"input": be.array(rng.standard_normal((B, D))),
                "target": be.array(rng.integers(0, C, B), be.int_dtype)} for _ in range(3)]
    return compiled, be, batches


def host(be, tree):
    return {k: np.array(be.to_numpy(v)) for k, v in tree.items()}


def torch_reference(params: dict, batch: dict) -> tuple[float, dict]:
    """The same network written with torch.nn.functional, and its gradients (float64)."""
    ps = {k: torch.tensor(np.asarray(v), requires_grad=True) for k, v in params.items()}
    x = torch.tensor(np.asarray(batch["input"]))
    h = torch.relu(F.linear(x, ps["mlp.linear_0.weight"], ps["mlp.linear_0.bias"]))
    logits = F.linear(h, ps["mlp.linear_1.weight"], ps["mlp.linear_1.bias"])
    loss = F.cross_entropy(logits, torch.tensor(np.asarray(batch["target"])))
    grads = torch.autograd.grad(loss, list(ps.values()))
    return float(loss.detach()), {k: g.numpy() for k, g in zip(ps, grads, strict=True)}


def count_full_checks(monkeypatch, compiled) -> list:
    calls: list = []
    full = type(compiled)._prepare

    def counted(self, *a, **kw):
        if self is compiled:
            calls.append(1)
        return full(self, *a, **kw)

    monkeypatch.setattr(type(compiled), "_prepare", counted)
    return calls


@pytest.mark.parametrize("backend", [TorchBackend, NumpyBackend])
def test_steady_calls_match_torch_and_skip_the_full_checks(backend, monkeypatch):
    compiled, be, batches = problem(backend)
    params = compiled.get_parameters()
    calls = count_full_checks(monkeypatch, compiled)
    cots = {"loss": 1.0}
    for i in range(6):
        out, grads = compiled.evaluate(params, batches[i % 3], output_gradients=cots)
        loss, want = torch_reference(host(be, params), host(be, batches[i % 3]))
        assert abs(float(be.to_numpy(out["loss"])) - loss) < 1e-12
        for k, g in host(be, grads).items():
            np.testing.assert_allclose(g, want[k], rtol=1e-12, atol=1e-14)
    assert len(calls) == 1  # the first call's full checks; the others took the steady path
    # a new dict of the same number: the steady path too; True is refused as before (two
    # outputs: which one?), in the steady state as on a first call
    compiled.evaluate(params, batches[0], output_gradients={"loss": 1.0})
    assert len(calls) == 1
    with pytest.raises(ml.KeyMismatchError, match="output_gradients=True differentiates"):
        compiled.evaluate(params, batches[0], output_gradients=True)


@pytest.mark.parametrize("backend", [TorchBackend, NumpyBackend])
def test_steady_calls_read_the_output_gradients_given(backend):
    compiled, be, batches = problem(backend)
    params = compiled.get_parameters()
    cots = {"loss": 1.0}
    _, g1 = compiled.evaluate(params, batches[0], output_gradients=cots)
    compiled.evaluate(params, batches[0], output_gradients=cots)
    cots["loss"] = 2.0  # the same dict, changed in place
    _, g2 = compiled.evaluate(params, batches[0], output_gradients=cots)
    _, g3 = compiled.evaluate(params, batches[0], output_gradients={"loss": be.array(
        np.float64(3.0))})
    _, gi = compiled.evaluate(params, batches[0], output_gradients={"loss": 1})
    fresh, _, _ = problem(backend)  # a first, fully checked call of each, for comparison
    for g, cot in ((g1, 1.0), (g2, 2.0), (g3, 3.0), (gi, 1.0)):
        _, want = fresh.evaluate(params, batches[0], output_gradients={"loss": cot})
        fresh._steady = None
        for k, v in host(be, want).items():
            np.testing.assert_array_equal(host(be, g)[k], v)
        for k, v in host(be, g1).items():
            np.testing.assert_allclose(host(be, g)[k], cot * v, rtol=1e-13, atol=1e-16)
    with pytest.raises(ml.DTypeError, match="output gradient 'loss'"):  # checked as given
        compiled.evaluate(params, batches[0], output_gradients={"loss": be.array(
            np.float32(1.0), "float32")})
    out = compiled.evaluate(params, batches[1])  # forward only, then gradients again
    assert set(out) == {"logits", "loss"}
    compiled.evaluate(params, batches[1], output_gradients={"loss": 1.0})


def full_path_error(backend: type, bad: dict, kind: type) -> str:
    """The message a model's first (fully checked) call gives for ``bad``'s batch."""
    compiled, be, batches = problem(backend)
    with pytest.raises(kind) as e:
        compiled.evaluate(compiled.get_parameters(), {**batches[0], **bad(be)},
                          output_gradients={"loss": 1.0})
    return str(e.value)


BAD = [  # (what, the batch's replaced entries, the error)
    ("label out of range", lambda be: {"target": be.array(np.r_[np.zeros(B - 1), C], be.int_dtype)},
     ValueError),
    ("negative label", lambda be: {"target": be.array(np.r_[np.zeros(B - 1), -1], be.int_dtype)},
     ValueError),
    ("torch's ignore_index", lambda be: {"target": be.array(np.r_[np.zeros(B - 1), -100],
                                                            be.int_dtype)}, ValueError),
    ("another batch size", lambda be: {"input": be.array(np.zeros((B + 1, D)))}, ml.ShapeError),
    ("float labels", lambda be: {"target": be.array(np.zeros(B))}, ml.DTypeError),
]


@pytest.mark.parametrize("backend", [TorchBackend, NumpyBackend])
@pytest.mark.parametrize("what, bad, kind", BAD, ids=[b[0] for b in BAD])
def test_a_bad_batch_in_the_steady_state_is_refused_as_on_the_first_call(backend, what, bad,
                                                                           kind):
    want = full_path_error(backend, bad, kind)
    compiled, be, batches = problem(backend)
    params = compiled.get_parameters()
    before = host(be, params)
    for i in range(2):
        compiled.evaluate(params, batches[i], output_gradients={"loss": 1.0})
    assert compiled._steady is not None
    with pytest.raises(kind) as e:
        compiled.evaluate(params, {**batches[0], **bad(be)}, output_gradients={"loss": 1.0})
    assert str(e.value) == want
    if what == "torch's ignore_index":
        assert "ignore_index=-100" in want
    for k, v in host(be, params).items():
        np.testing.assert_array_equal(v, before[k])
    _, g = compiled.evaluate(params, batches[0], output_gradients={"loss": 1.0})  # still fine
    assert np.isfinite(host(be, g)["mlp.linear_0.weight"]).all()


@pytest.mark.parametrize("backend", [TorchBackend, NumpyBackend])
def test_a_train_step_refuses_a_bad_batch_and_changes_nothing(backend):
    compiled, be, batches = problem(backend)
    step = make_train_step(compiled, Adam(learning_rate=1e-2), loss="loss")
    params = compiled.get_parameters()
    state = step.init(params)
    for i in range(3):
        params, state, _ = step(params, state, batches[i])
    assert compiled._steady_ins is not None  # the step's inputs took the steady path
    before, count = host(be, params), state.step
    bad = {**batches[0], "target": be.array(np.r_[np.zeros(B - 1), C], be.int_dtype)}
    with pytest.raises(ValueError, match=r"1 of 16 class indices out of range \(e.g. 4\)"):
        step(params, state, bad)
    assert state.step == count
    for k, v in host(be, params).items():
        np.testing.assert_array_equal(v, before[k])
    params, state, out = step(params, state, batches[0])  # and the loop goes on
    assert state.step == count + 1


@pytest.mark.parametrize("backend", [TorchBackend, NumpyBackend])
def test_the_step_is_bit_for_bit_evaluate_and_update(backend):
    compiled, be, batches = problem(backend)
    init = host(be, compiled.get_parameters())
    opt_a, opt_b = Adam(learning_rate=1e-2), Adam(learning_rate=1e-2)
    step = make_train_step(compiled, opt_a, loss="loss")
    pa = {k: be.array(v) for k, v in init.items()}
    pb = {k: be.array(v) for k, v in init.items()}
    sa, sb = step.init(pa), opt_b.init(pb)
    for i in range(5):
        pa, sa, out_a = step(pa, sa, batches[i % 3])
        out_b, g = compiled.evaluate(pb, batches[i % 3], output_gradients={"loss": 1.0})
        pb, sb = opt_b.update(pb, g, sb)
        assert float(be.to_numpy(out_a["loss"])) == float(be.to_numpy(out_b["loss"]))
    for k, v in host(be, pa).items():
        np.testing.assert_array_equal(v, host(be, pb)[k])


def test_torch_engine_backward_is_autograd_grad_bit_for_bit(monkeypatch):
    compiled, be, batches = problem(TorchBackend, "float32")
    params = compiled.get_parameters()
    _, fast = compiled.evaluate(params, batches[0], output_gradients={"loss": 1.0})
    assert compiled._eval._engine is not None  # (this torch has the engine's call)
    monkeypatch.setattr(compiled._eval, "_engine", None)  # torch.autograd.grad instead
    _, slow = compiled.evaluate(params, batches[0], output_gradients={"loss": 1.0})
    for k, v in host(be, slow).items():
        np.testing.assert_array_equal(host(be, fast)[k], v)
    assert all(g is not params[k] for k, g in fast.items())


def test_torch_parameters_given_as_nn_parameters():
    compiled, be, batches = problem(TorchBackend)
    params = compiled.get_parameters()
    nn_params = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    _, want = compiled.evaluate(params, batches[0], output_gradients={"loss": 1.0})
    for _ in range(2):
        _, got = compiled.evaluate(nn_params, batches[0], output_gradients={"loss": 1.0})
        for k, v in host(be, want).items():
            np.testing.assert_array_equal(host(be, got)[k], v)
    assert not any(p.grad is not None for p in nn_params.values())  # (no .grad written)


@pytest.mark.parametrize("backend", [TorchBackend, NumpyBackend])
def test_a_wrapper_step_takes_the_steady_path_with_the_same_numbers(backend, monkeypatch):
    from mithril.utils.accumulation import Accumulate

    compiled, be, batches = problem(backend)
    init = host(be, compiled.get_parameters())
    step = make_train_step(compiled, Accumulate(Adam(learning_rate=1e-2), k=2), loss="loss")
    ref = Accumulate(Adam(learning_rate=1e-2), k=2)
    pa = {k: be.array(v) for k, v in init.items()}
    pb = {k: be.array(v) for k, v in init.items()}
    sa, sb = step.init(pa), ref.init(pb)
    calls = count_full_checks(monkeypatch, compiled)
    for i in range(6):
        pa, sa, _ = step(pa, sa, batches[i % 3])
        fresh, _, _ = problem(backend)  # each reference gradient from a first, full call
        _, g = fresh.evaluate(pb, batches[i % 3], output_gradients={"loss": 1.0})
        pb, sb = ref.update(pb, g, sb)
    assert len(calls) == 1  # the step's first call; the others took the steady path
    for k, v in host(be, pa).items():
        np.testing.assert_array_equal(v, host(be, pb)[k])



@pytest.mark.parametrize("backend", [TorchBackend, NumpyBackend])
def test_another_operators_value_check_is_kept_in_the_steady_state(backend):
    # Embedding has no steady_check: its check_inputs hook runs at every steady call
    m = ml.Model()
    m |= ml.Embedding(6, 3)(input="input", output=ml.IOKey("out"))
    be = backend(dtype="float64")
    compiled = ml.compile(m, be, shapes={"input": [4]})
    params = compiled.get_parameters()
    good = {"input": be.array(np.array([0, 1, 2, 5]), be.int_dtype)}
    bad = {"input": be.array(np.array([0, 1, 2, 6]), be.int_dtype)}
    with pytest.raises(ValueError) as first:
        ml.compile(m, be, shapes={"input": [4]}).evaluate(params, bad)
    for _ in range(2):
        out = compiled.evaluate(params, good)
    assert compiled._steady_fwd is not None
    with pytest.raises(ValueError) as steady:
        compiled.evaluate(params, bad)
    assert str(steady.value) == str(first.value)
    assert "embedding index 6 out of range" in str(first.value)
    (weight,) = params.values()
    np.testing.assert_array_equal(be.to_numpy(out["out"])[3], be.to_numpy(weight)[5])


def test_torch_model_without_parameters_and_an_input_that_requires_grad():
    # was torch's bare RuntimeError ("`inputs` argument to `grad()` cannot be empty"); NumPy
    # and JAX return no gradients: so does torch now, and the input's .grad stays None
    m = ml.Model()
    m |= ml.Relu()(input="input", output=ml.IOKey("out"))
    compiled = ml.compile(m, TorchBackend(dtype="float64"), shapes={"input": [3]})
    x = torch.tensor([1.5, -1.0, 0.0], dtype=torch.float64, requires_grad=True)
    for _ in range(2):
        out, grads = compiled.evaluate({}, {"input": x}, output_gradients={"out": torch.ones(
            3, dtype=torch.float64)})
        assert grads == {}
        np.testing.assert_array_equal(out["out"].numpy(), torch.relu(x).detach().numpy())
    assert x.grad is None

def test_the_overhead_benchmark_runs():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, "benchmarks/step_overhead.py", "--rounds", "1",
                          "--calls", "2"], cwd=root, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for name in ("hand fwd+grad", "hand loop", "evaluate", "eval+update", "step"):
        assert name in run.stdout, run.stdout
    assert run.stdout.count("x\n") == 8  # a ratio per variant: 5 torch, 3 NumPy


def test_the_steady_path_declines_an_array_on_another_device() -> None:
    """The kept call's metadata holds each array's device: a torch tensor elsewhere (here
    torch's "meta" device) takes the full path, not the kept call's."""
    import torch

    from mithril.compiler.steady import SteadyInputs

    x = torch.zeros(5, 8)
    kept = SteadyInputs({"input": x}, [], {})
    assert kept({"input": torch.ones(5, 8)}) is not None
    assert kept({"input": torch.ones(5, 8, device="meta")}) is None
