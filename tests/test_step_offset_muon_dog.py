"""A late-joining param group (``step_offset``, torch's ``add_param_group``) where the step
is not one optimizer's rows: Muon's fallback tensors (its group's 1-D params, updated by the
fallback AdamW) and DoG's ``("heuristic", c)`` start (``r_ε = c (1 + ‖x₀‖)``, over the
tensors updated at step 1). Before, Muon's fallback rows counted the optimizer's steps
(Adam's bias correction at t, not t − k) and, in the JAX program, moved before their group
joined; DoG's ‖x₀‖ counted parameters not joined yet. Side by side, float64: torch's Muon
+ AdamW with ``add_param_group`` after ``N`` steps, the eager NumPy engine resuming from an
``N``-step state, and the one-program JAX step (a float64 run, ``conftest``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.optim._muon as torch_muon
from conftest import jax_float64_results
from test_muon_adafactor import ns_in_grad_dtype
from test_step_offset_jax import LATE, M, N, compiled, float64_scalars, gradients, problem
from test_step_offset_jax import eager_run as _eager_run

from mithril.backends import NumpyBackend
from mithril.utils import optimizers as O

TOL = 1e-10
cases = ["muon", "dog_heuristic"]


def make(case: str, offset: int | None) -> Any:
    groups = {} if offset is None else {"param_groups": [{"params": LATE,
                                                          "step_offset": offset}]}
    if case == "muon":
        return O.Muon(0.02, ns_dtype="float64", fallback=O.AdamW(3e-4), **groups)
    return O.DoG(init_step=("heuristic", 1e-2), **groups)


def run(case: str, backend: str) -> dict[str, np.ndarray]:
    """The params after N + M steps of the one-program JAX step, from ``init``."""
    from mithril.backends import JaxBackend
    from mithril.utils.training import make_train_step

    p0, data = problem()
    be = JaxBackend(dtype="float64")
    c = compiled(be)
    ts = make_train_step(c, make(case, N), loss="loss")
    p = {k: be.array(v) for k, v in p0.items()}
    st = ts.init(p)
    out = {}
    for i in range(N + M):
        p, st, _ = ts(p, st, {"input": be.array(data[i]["input"]),
                              "target": be.array(data[i]["target"], be.int_dtype)})
        if i == 0:  # (the late params kept before their group joins)
            out.update({f"first#{k}": np.asarray(v) for k, v in p.items()})
    out.update({k: np.asarray(v) for k, v in p.items()})
    out["fused"] = np.array(ts.fused)
    return out


def eager_run(case: str) -> dict[str, np.ndarray]:
    """The eager NumPy engine resuming from an ``N``-step state of the early parameters
    (:func:`test_step_offset_jax.eager_run`)."""
    return _eager_run(case, make)


def torch_muon_run() -> dict[str, np.ndarray]:
    """torch's Muon (the matrices; its Newton–Schulz in float64, as ours with
    ``ns_dtype="float64"``: :func:`test_muon_adafactor.ns_in_grad_dtype`) and AdamW (the
    rest), each given the late layer's tensors by ``add_param_group`` after N steps."""
    p0, data = problem()
    c = compiled(NumpyBackend(dtype="float64"))
    ts = {k: torch.tensor(v, requires_grad=True) for k, v in p0.items()}

    def part(late: bool, matrix: bool) -> list:
        return [t for k, t in ts.items() if (LATE in k) == late and (t.ndim == 2) == matrix]

    with float64_scalars():
        opts = [torch.optim.Muon(part(False, True), lr=0.02),
                torch.optim.AdamW(part(False, False), lr=3e-4)]
        for i in range(N + M):
            if i == N:
                opts[0].add_param_group({"params": part(True, True)})
                opts[1].add_param_group({"params": part(True, False)})
            g = gradients(c, {k: t.detach().numpy() for k, t in ts.items()}, data[i])
            for k, t in ts.items():
                t.grad = torch.tensor(g[k])
            for o in opts:
                o.step()
    return {k: t.detach().numpy().copy() for k, t in ts.items()}


@pytest.fixture(scope="module")
def jax_results() -> dict[str, dict[str, np.ndarray]]:
    return jax_float64_results("test_step_offset_muon_dog", "cases", "run")


@pytest.mark.parametrize("case", cases)
def test_late_group_as_the_reference(case, jax_results, monkeypatch):
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", ns_in_grad_dtype)
    p0, _ = problem()
    eager = eager_run(case)
    ref = torch_muon_run() if case == "muon" else eager
    got = jax_results[case]
    assert bool(got["fused"])
    for k in p0:
        np.testing.assert_allclose(eager[k], ref[k], rtol=0, atol=TOL, err_msg=f"eager {k}")
        np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=TOL, err_msg=f"jax {k}")
        assert not np.allclose(ref[k], p0[k])  # (every parameter moved)
        if LATE in k:  # kept before the group joined
            np.testing.assert_array_equal(got[f"first#{k}"], p0[k])
