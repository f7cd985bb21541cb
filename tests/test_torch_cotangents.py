"""The torch backend's ``evaluate(..., output_gradients=...)``: the cotangents go to
autograd's engine directly (what ``torch.autograd.grad`` ends in, without its Python); where
that private entry is missing or an output is not a plain tensor of the cotangent's shape,
``torch.autograd.grad``, with a loss's cotangent 1 left to torch (``grad_outputs`` None,
torch's own ``ones_like``), which gives the same bits and skips torch's symbolic shape check,
whose first use imports sympy (~0.35 s of a process's first training step). Any other
cotangent, or one changed in place, is passed as it is."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_python

torch = pytest.importorskip("torch")

import mithril as ml  # noqa: E402
from mithril.backends import TorchBackend  # noqa: E402
from mithril.backends.torch_backend import _TorchEvaluator  # noqa: E402
from mithril.cli.networks import mlp_spec  # noqa: E402


def _model(device: str = "cpu") -> tuple:
    spec = mlp_spec(8, 3, [16])
    be = TorchBackend(dtype="float32", seed=0, device=device)
    c = ml.compile(spec.model, be, shapes={"input": [5, 8], "target": [5]})
    rng = np.random.default_rng(0)
    data = {"input": be.array(rng.standard_normal((5, 8)).astype(np.float32)),
            "target": be.array(rng.integers(0, 3, 5), be.int_dtype)}
    return c, c.get_parameters(), data


def _grads(c, params, data, cot) -> dict:
    _, g = c.evaluate(params, data, output_gradients={"loss": cot})
    return {k: v.cpu().numpy().copy() for k, v in g.items()}


def test_unit_cotangent_left_to_torch_gives_the_same_bits(monkeypatch):
    """The engine's path, autograd.grad with the 1 left to torch, and with it given: the
    same bits."""
    c, params, data = _model()
    engine = _grads(c, params, data, 1.0)
    seen = []
    unit = _TorchEvaluator._unit
    monkeypatch.setattr(_TorchEvaluator, "_unit",
                        lambda self, out, cot: seen.append(r := unit(self, out, cot)) or r)
    monkeypatch.setattr(c._eval, "_engine", None)  # (the fallback: torch.autograd.grad)
    implicit = _grads(c, params, data, 1.0)
    assert seen == [True]
    monkeypatch.setattr(_TorchEvaluator, "_unit", lambda self, out, cot: False)
    explicit = _grads(c, params, data, 1.0)  # grad_outputs given: torch's usual path
    assert implicit.keys() == explicit.keys() == engine.keys()
    for k in implicit:
        assert np.array_equal(implicit[k], explicit[k]), k
        assert np.array_equal(engine[k], explicit[k]), k


def test_other_cotangents_are_passed_and_in_place_changes_count():
    c, params, data = _model()
    one = _grads(c, params, data, 1.0)
    two = _grads(c, params, data, 2.0)
    for k in one:  # ×2 is exact in binary floating point
        assert np.array_equal(two[k], 2 * one[k]), k
    cot = torch.ones((), dtype=torch.float32)  # the caller's own tensor, then changed
    assert all(np.array_equal(v, one[k]) for k, v in _grads(c, params, data, cot).items())
    cot.fill_(2.0)
    assert all(np.array_equal(v, two[k]) for k, v in _grads(c, params, data, cot).items())
    cot.numpy()[...] = 1.0  # through a NumPy view (no version bump): a CPU value is read
    assert all(np.array_equal(v, one[k]) for k, v in _grads(c, params, data, cot).items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_cotangent_read_once_per_version():
    c, params, data = _model("cuda")
    cot = torch.ones((), dtype=torch.float32, device="cuda")
    one = _grads(c, params, data, cot)
    cot.fill_(2.0)  # in place: its version moves, so it is read again
    two = _grads(c, params, data, cot)
    for k in one:
        assert np.array_equal(two[k], 2 * one[k]), k


def test_first_training_step_does_not_import_sympy():
    code = """
        import json, sys
        import numpy as np
        import mithril as ml
        from mithril.backends import TorchBackend
        from mithril.cli.networks import mlp_spec
        from mithril.utils.optimizers import Adam
        from mithril.utils.training import make_train_step
        spec = mlp_spec(8, 3, [16])
        be = TorchBackend(dtype="float32", seed=0)
        c = ml.compile(spec.model, be, shapes={"input": [5, 8], "target": [5]})
        step = make_train_step(c, Adam(1e-3), loss="loss")
        p = c.get_parameters()
        s = step.init(p)
        rng = np.random.default_rng(0)
        d = {"input": be.array(rng.standard_normal((5, 8)).astype(np.float32)),
             "target": be.array(rng.integers(0, 3, 5), be.int_dtype)}
        before = "sympy" in sys.modules
        p, s, out = step(p, s, d)
        print(json.dumps([before, "sympy" in sys.modules, float(out["loss"])]))
    """
    out = run_python(code, timeout=300)
    before, after, loss = json.loads(out.strip().splitlines()[-1])
    assert before is False and after is False and np.isfinite(loss)
