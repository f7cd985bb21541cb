"""The global-norm clip's floor, side by side with both peers, float64:

* the optimizers' fused ``clip_norm=c`` (default ``clip_eps=1e-6``) is torch's
  ``clip_grad_norm_``: scale
  ``min(1, c / (‖g‖ + 1e-6))`` (NumPy, torch, JAX's default and jitted engines, and
  ``optax_transformation``);
* optax's ``clip_by_global_norm`` (and Keras's ``global_clipnorm``) has no 1e-6: scale
  ``c / ‖g‖`` where ``‖g‖ >= c``, else 1. That convention is ``clip_eps=0.0`` (its own
  tests: tests/test_clip_eps_option.py), ``clip_gradients(grads, clip_norm=c, eps=0.0)``
  before an optimizer without ``clip_norm`` (any backend), or
  ``optax.chain(optax.clip_by_global_norm(c), optax_transformation(opt))`` in a JAX program.

The cases: a large norm (the two differ by ~1e-6 relative), a norm just below ``c`` (torch
scales it by ``c/(‖g‖ + 1e-6)`` < 1, optax leaves it), a tiny norm above a tiny ``c`` (the
1e-6 dominates: torch's step is ~11x smaller than optax's) and an all-zero gradient
(unchanged, finite, in both). SGD with lr 1 makes the step the clipped gradient itself."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import jax_float64

from mithril.utils.optimizers import SGD, clip_gradients, global_norm

TOL = 1e-12
#: case -> (gradient scale, clip_norm); the gradients are ``scale · unit``, ‖unit‖ = 1
CASES = {"large": (5.0, 1.0), "just-below": (1.0 - 1e-7, 1.0), "tiny": (1e-7, 1e-8),
         "zero": (0.0, 1.0)}


def problem(case: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], float]:
    rng = np.random.default_rng(11)
    p0 = {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(3)}
    g = {k: rng.standard_normal(v.shape) for k, v in p0.items()}
    n = np.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
    scale, c = CASES[case]
    return p0, {k: v / n * scale for k, v in g.items()}, c


def torch_step(case: str) -> tuple[dict[str, np.ndarray], float]:
    """torch: clip_grad_norm_ then SGD(lr=1): the params and the norm it returns."""
    p0, g, c = problem(case)
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in p0.items()}
    for k, t in tp.items():
        t.grad = torch.tensor(g[k])
    norm = torch.nn.utils.clip_grad_norm_(list(tp.values()), c)
    torch.optim.SGD(list(tp.values()), lr=1.0).step()
    return {k: t.detach().numpy() for k, t in tp.items()}, float(norm)


def optax_like(case: str) -> dict[str, np.ndarray]:
    """optax.clip_by_global_norm's rule written out in float64 (checked against optax
    itself in the JAX subprocess): p − g·c/‖g‖ where ‖g‖ >= c, else p − g."""
    p0, g, c = problem(case)
    n = np.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
    return {k: p0[k] - (g[k] if n < c else g[k] / n * c) for k in p0}


def diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert set(a) == set(b)
    return max(float(np.max(np.abs(np.asarray(a[k]) - b[k]))) for k in a)


def eps_effect(case: str) -> float:
    """How far the two conventions' steps are apart in ``case``."""
    return diff(torch_step(case)[0], optax_like(case))


def test_the_cases_tell_the_conventions_apart() -> None:
    assert eps_effect("large") > 1e-7       # 5e-6 relative of a unit step
    assert eps_effect("just-below") > 1e-7  # torch scales, optax does not
    tiny = torch_step("tiny")[0]
    p0, g, c = problem("tiny")
    step = np.sqrt(sum(float(np.sum((p0[k] - tiny[k]) ** 2)) for k in p0))
    assert step == pytest.approx(c * 1e-7 / (1e-7 + 1e-6), rel=1e-9)  # torch: ~c/11
    assert eps_effect("zero") == 0.0


def to_torch(x: np.ndarray) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


BACKENDS = {"numpy": (np.array, np.asarray), "torch": (to_torch, lambda t: t.numpy())}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_fused_clip_norm_is_torch(case: str, backend: str) -> None:
    to, back = BACKENDS[backend]
    p0, g, c = problem(case)
    opt = SGD(1.0, clip_norm=c)
    params = {k: to(v) for k, v in p0.items()}
    state = opt.init(params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (norm 0: no division warning)
        new, state = opt.update(params, {k: to(v) for k, v in g.items()}, state)
    want, norm = torch_step(case)
    assert diff({k: back(v) for k, v in new.items()}, want) <= TOL
    assert float(state.last_grad_norm) == pytest.approx(norm, rel=1e-12, abs=1e-300)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_clip_gradients_eps_0_then_update_is_optax(case: str, backend: str) -> None:
    to, back = BACKENDS[backend]
    p0, g, c = problem(case)
    opt = SGD(1.0)
    params = {k: to(v) for k, v in p0.items()}
    state = opt.init(params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clipped = clip_gradients({k: to(v) for k, v in g.items()}, clip_norm=c, eps=0.0)
    new, state = opt.update(params, clipped, state)
    assert diff({k: back(v) for k, v in new.items()}, optax_like(case)) <= TOL
    # clip_gradients' default eps is torch's (the fused clip_norm's)
    torch_way = clip_gradients({k: to(v) for k, v in g.items()}, clip_norm=c)
    got = {k: p0[k] - back(v) for k, v in torch_way.items()}
    assert diff(got, torch_step(case)[0]) <= TOL


def test_global_norm_of_zero_and_tiny() -> None:
    assert global_norm(problem("zero")[1]) == 0.0
    assert global_norm(problem("tiny")[1]) == pytest.approx(1e-7, rel=1e-12)


def _jax_side() -> dict[str, dict[str, float]]:
    """Each case's largest differences on JAX float64 (x64 for the block only)."""
    import jax
    import jax.numpy as jnp
    import optax

    from mithril.interop import optax_transformation
    from mithril.utils.optimizers import engines

    def run_tx(tx, p0, g):
        p = {k: jnp.asarray(v) for k, v in p0.items()}
        u, _ = jax.jit(tx.update)({k: jnp.asarray(v) for k, v in g.items()}, tx.init(p), p)
        return {k: np.asarray(v) for k, v in optax.apply_updates(p, u).items()}

    def run_ours(opt, p0, g, clip_first=None):
        params = {k: jnp.asarray(v) for k, v in p0.items()}
        grads = {k: jnp.asarray(v) for k, v in g.items()}
        if clip_first is not None:
            grads = clip_gradients(grads, clip_norm=clip_first, eps=0.0)
        new, _ = opt.update(params, grads, opt.init(params))
        return {k: np.asarray(v) for k, v in new.items()}

    def d(a, b):
        return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)

    out = {}
    for case in CASES:
        p0, g, c = problem(case)
        torch_want, optax_want = torch_step(case)[0], optax_like(case)
        peer = run_tx(optax.chain(optax.clip_by_global_norm(c), optax.sgd(1.0)), p0, g)
        r = {"optax-vs-rule": d(peer, optax_want)}
        for engine in ("auto", "jit"):
            old, engines.JAX_ENGINE = engines.JAX_ENGINE, engine
            try:
                r[f"fused-{engine}-vs-torch"] = d(run_ours(SGD(1.0, clip_norm=c), p0, g),
                                                  torch_want)
                r[f"eps0-{engine}-vs-optax"] = d(run_ours(SGD(1.0), p0, g, clip_first=c), peer)
            finally:
                engines.JAX_ENGINE = old
        r["transformation-vs-torch"] = d(run_tx(optax_transformation(SGD(1.0, clip_norm=c)),
                                                p0, g), torch_want)
        chained = optax.chain(optax.clip_by_global_norm(c), optax_transformation(SGD(1.0)))
        r["chain-vs-optax"] = d(run_tx(chained, p0, g), peer)
        out[case] = r
    return out


@pytest.fixture(scope="module")
def jax_side() -> dict[str, dict[str, float]]:
    with jax_float64():
        return _jax_side()


@pytest.mark.parametrize("case", sorted(CASES))
def test_jax_and_optax_programs(jax_side: dict[str, dict[str, float]], case: str) -> None:
    """On JAX (default and jitted engines, ``optax_transformation`` under ``jax.jit``):
    ``clip_norm=`` is torch's, ``clip_gradients(eps=0)`` / ``optax.clip_by_global_norm``
    chained in front are optax's (checked against optax itself)."""
    r = jax_side[case]
    assert set(r) == {"optax-vs-rule", "fused-auto-vs-torch", "fused-jit-vs-torch",
                      "eps0-auto-vs-optax", "eps0-jit-vs-optax", "transformation-vs-torch",
                      "chain-vs-optax"}
    bad = {k: v for k, v in r.items() if not v <= TOL}
    assert not bad, (case, bad)
