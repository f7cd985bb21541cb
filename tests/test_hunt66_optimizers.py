"""Second pass over the optimizer catalog's less-covered options, side by side with torch.optim
in float64 on a problem with a matrix, a 0-d scalar and size-1 tensors:

* LBFGS's ``max_eval``, ``tolerance_grad`` / ``tolerance_change`` and a short
  ``history_size``, with and without the strong-Wolfe search: the same parameters and the same
  ``n_iter`` / ``func_evals`` counters as ``torch.optim.LBFGS`` on NumPy, torch and JAX;
* ``torch_optimizer`` with ASGD / Rprop / NAdam / Adagrad hyperparameters written into
  ``param_groups`` by hand between steps (``lambd``, ``alpha``, ``t0``, ``etas``,
  ``step_sizes``, ``momentum_decay``, ``lr_decay``), two groups;
* ``nonfinite="skip"`` on ASGD and Rprop: a skipped step leaves their per-tensor ``eta`` /
  ``mu`` and step sizes alone, so the run equals torch's without that step.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import host, jax_float64, native

import mithril.utils.optimizers as mo
from mithril.interop import torch_optimizer


@pytest.fixture(autouse=True)
def _torch_float64():
    """torch keeps ASGD's eta / mu and NAdam's mu_product in its default dtype: float64 here,
    as ours (float32 under torch's default: see test_optimizers_torch_catalog.py)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


SHAPES = {"w": (3, 4), "s": (), "one": (1,), "one2": (1, 1), "b": (5,)}
RNG = np.random.default_rng(0)
P0 = {n: RNG.standard_normal(s) * 0.7 for n, s in SHAPES.items()}
A = RNG.standard_normal((4, 5))


def _loss(t: dict) -> torch.Tensor:
    z = torch.tanh(t["w"] @ torch.tensor(A)) + t["b"] * t["s"]
    x = torch.cat([z.flatten(), t["one"], t["one2"].flatten(), t["s"].reshape(1)])
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum() * 0.01 + (x**4).sum() * 0.1


def _loss_and_grads(p: dict) -> tuple[float, dict]:
    t = {n: torch.tensor(np.asarray(v, np.float64), requires_grad=True) for n, v in p.items()}
    loss = _loss(t)
    loss.backward()
    return float(loss.detach()), {n: t[n].grad.numpy().copy() for n in t}


def _torch_lbfgs(kw: dict, steps: int) -> tuple[list, tuple]:
    t = {n: torch.tensor(v, requires_grad=True) for n, v in P0.items()}
    opt = torch.optim.LBFGS(list(t.values()), **kw)

    def closure():
        opt.zero_grad()
        loss = _loss(t)
        loss.backward()
        return loss

    out = []
    for _ in range(steps):
        opt.step(closure)
        out.append({n: v.detach().numpy().copy() for n, v in t.items()})
    st = opt.state[opt.param_groups[0]["params"][0]]
    return out, (st["n_iter"], st["func_evals"])


def _our_lbfgs(kw: dict, steps: int, backend: str) -> tuple[list, tuple]:
    opt = mo.LBFGS(**kw)
    p = {n: native(backend, v) for n, v in P0.items()}
    state = opt.init(p)

    def closure(params):
        loss, g = _loss_and_grads({n: host(v) for n, v in params.items()})
        return loss, {n: native(backend, a) for n, a in g.items()}

    out = []
    for _ in range(steps):
        p, state = opt.update(p, None, state, closure=closure)
        out.append({n: host(v) for n, v in p.items()})
    return out, (int(state.values["n_iter"]), int(state.values["func_evals"]))


LBFGS_CASES = {
    "max_eval_wolfe": dict(lr=1, max_iter=20, max_eval=7, line_search_fn="strong_wolfe"),
    "max_eval": dict(lr=0.5, max_iter=20, max_eval=7),
    "history3": dict(lr=0.5, max_iter=4, history_size=3),
    "tolerance_grad": dict(lr=1, max_iter=50, tolerance_grad=1e-2, line_search_fn="strong_wolfe"),
    "tolerance_change": dict(lr=0.3, max_iter=50, tolerance_change=1e-3),
    "max_eval_1": dict(lr=1, max_iter=3, max_eval=1, line_search_fn="strong_wolfe"),
    "large_tolerance_grad": dict(lr=1, max_iter=5, tolerance_grad=10.0),
}


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
def test_lbfgs_stopping_rules_match_torch(backend):
    for case, kw in LBFGS_CASES.items():
        want, want_counts = _torch_lbfgs(kw, 5)
        if backend == "jax":
            with jax_float64():
                got, counts = _our_lbfgs(kw, 5, backend)
        else:
            got, counts = _our_lbfgs(kw, 5, backend)
        assert counts == want_counts, case
        worst = max(float(np.abs(np.asarray(g[n]) - w[n]).max())
                    for g, w in zip(got, want) for n in w)
        assert worst < 1e-9, (case, worst)
        assert all(np.shape(got[-1][n]) == SHAPES[n] for n in SHAPES)


def _start() -> dict:
    rng = np.random.default_rng(3)
    return {n: rng.standard_normal(s) for n, s in SHAPES.items()}


def _grad(t: int, p: dict) -> dict:
    rng = np.random.default_rng(1000 + t)
    return {n: rng.standard_normal(s) + 0.3 * np.asarray(p[n]) for n, s in SHAPES.items()}


def _groups(ps: dict, g1: dict, named: bool) -> list:
    names = list(ps)
    pick = (lambda n: (n, ps[n])) if named else (lambda n: ps[n])
    return [{"params": [pick(n) for n in names[:2]]},
            {"params": [pick(n) for n in names[2:]], **g1}]


def _drive(opt, ps: dict, edits: dict, steps: int = 25) -> list:
    out = []
    for t in range(1, steps + 1):
        for gi, k, v in edits.get(t, []):
            opt.param_groups[gi][k] = v
        g = _grad(t, {n: p.detach().numpy() for n, p in ps.items()})
        for n, p in ps.items():
            p.grad = torch.tensor(g[n])
        opt.step()
        out.append({n: p.detach().numpy().copy() for n, p in ps.items()})
    return out


GROUP_EDITS = {
    "asgd": (torch.optim.ASGD, lambda: mo.ASGD(0.02, t0=5), dict(lr=0.02, t0=5), {"lr": 0.01},
             {5: [(0, "lambd", 0.01)], 8: [(1, "alpha", 0.5)], 12: [(0, "t0", 3)],
              15: [(1, "lr", 0.05)]}),
    "rprop": (torch.optim.Rprop, lambda: mo.Rprop(0.01), dict(lr=0.01), {"lr": 0.02},
              {5: [(0, "etas", (0.4, 1.5))], 10: [(1, "step_sizes", (1e-4, 0.01))],
               15: [(0, "lr", 0.5)]}),
    "nadam": (torch.optim.NAdam, lambda: mo.NAdam(0.01), dict(lr=0.01), {"lr": 0.02},
              {5: [(0, "betas", (0.8, 0.99))], 8: [(1, "momentum_decay", 0.1)],
               12: [(0, "weight_decay", 0.1)], 15: [(1, "eps", 1e-3)]}),
    "adagrad": (torch.optim.Adagrad,
                lambda: mo.AdaGrad(0.05, epsilon=1e-10, lr_decay=0.05,
                                   initial_accumulator_value=0.2),
                dict(lr=0.05, lr_decay=0.05, initial_accumulator_value=0.2), {"lr": 0.1},
                {5: [(0, "lr_decay", 0.2)], 12: [(1, "weight_decay", 0.1)]}),
}


@pytest.mark.parametrize("case", sorted(GROUP_EDITS))
def test_torch_optimizer_group_edits_match_torch(case):
    cls, make, kw, g1, edits = GROUP_EDITS[case]

    def params():
        return {n: torch.nn.Parameter(torch.tensor(v)) for n, v in _start().items()}

    ps = params()
    want = _drive(cls(_groups(ps, g1, named=False), **kw), ps, edits)
    ps2 = params()
    got = _drive(torch_optimizer(make(), _groups(ps2, g1, named=True)), ps2, edits)
    for g, w in zip(got, want):
        for n in w:
            assert g[n].shape == w[n].shape
            np.testing.assert_allclose(g[n], w[n], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("case", ["asgd", "rprop"])
def test_skipped_steps_leave_per_tensor_state(case, backend):
    make, cls, kw = {
        "asgd": (lambda: mo.ASGD(0.02, lambd=0.05, alpha=0.5, t0=3, nonfinite="skip"),
                 torch.optim.ASGD, dict(lr=0.02, lambd=0.05, alpha=0.5, t0=3)),
        "rprop": (lambda: mo.Rprop(0.01, etas=(0.3, 1.7), step_sizes=(1e-3, 0.02),
                                   nonfinite="skip"),
                  torch.optim.Rprop, dict(lr=0.01, etas=(0.3, 1.7), step_sizes=(1e-3, 0.02))),
    }[case]
    ts = {n: torch.tensor(v, requires_grad=True) for n, v in _start().items()}
    ref = cls(list(ts.values()), **kw)
    opt = make()
    p = {n: native(backend, v) for n, v in _start().items()}
    state = opt.init(p)
    k = 0
    for t in range(1, 19):
        if t in (5, 11):  # a NaN in the size-1 tensor's gradient: skipped, torch never steps
            bad = {n: native(backend, np.full(s, np.nan if n == "one" else 1.0))
                   for n, s in SHAPES.items()}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                p, state = opt.update(p, bad, state)
            assert state.last_step_skipped
            continue
        k += 1
        g = _grad(k, {n: host(v) for n, v in p.items()})
        p, state = opt.update(p, {n: native(backend, a) for n, a in g.items()}, state)
        for n, v in ts.items():
            v.grad = torch.tensor(g[n])
        ref.step()
        for n, v in ts.items():
            np.testing.assert_allclose(host(p[n]), v.detach().numpy(), rtol=1e-12, atol=1e-14)
    assert state.step == 16 and state.num_skipped == 2
