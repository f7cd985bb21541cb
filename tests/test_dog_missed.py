"""DoG with a parameter that has no gradient at some steps (``state.note_missed``, what
``torch_optimizer`` does for a ``.grad`` that is None): side by side with a float64
reference of its formula, which optax.contrib.dog checks where every gradient is there.
(Its missed counts once made the next step raise a bare TypeError: the estimate's first
step was read from each tensor's own count.)"""

from __future__ import annotations

import numpy as np
import optax.contrib
import pytest
import torch

from mithril.interop import torch_optimizer
from mithril.utils.optimizers import DoG

SHAPES = {"w": (3, 4), "b": (4,)}
STEPS = 5
KINDS = [("heuristic", 1e-6), ("heuristic", 0.05), ("distance", 1e-3), ("learning_rate", 1e-2)]


def start() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {n: rng.standard_normal(s) for n, s in SHAPES.items()}


def grads(t: int, absent: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Step ``t``'s gradients (float64); ``b`` has none at the steps ``absent``."""
    rng = np.random.default_rng(100 + t)
    g = {n: rng.standard_normal(s) for n, s in SHAPES.items()}
    return {n: a for n, a in g.items() if not (n == "b" and t in absent)}


def reference(init_step: tuple[str, float], absent: tuple[int, ...], lr: float = 0.7,
              eps: float = 1e-8) -> dict[str, np.ndarray]:
    """DoG in float64: r, S over the tensors with a gradient; x₀ of a tensor is its value
    at its first update (its distance counts from the step after); r_ε, or η₀, at the
    optimizer's first step."""
    p, x0 = start(), {}
    kind, c = init_step
    r = s = 0.0
    for t in range(1, STEPS + 1):
        g = grads(t, absent)
        if t == 1:
            r = {"heuristic": c * (1 + np.sqrt(sum(np.sum(p[n] ** 2) for n in g))),
                 "distance": c, "learning_rate": 0.0}[kind]
        r = max(r, np.sqrt(sum(np.sum((x0[n] - p[n]) ** 2) for n in g if n in x0)))
        s += sum(np.sum(a * a) for a in g.values())
        eta = c if kind == "learning_rate" and t == 1 else r / np.sqrt(s + eps)
        for n, a in g.items():
            x0.setdefault(n, p[n].copy())
            p[n] = p[n] - lr * (eta * a)
    return p


def native(backend: str, a: np.ndarray):
    if backend == "torch":
        return torch.tensor(a)
    if backend == "jax":
        import jax.numpy as jnp

        return jnp.asarray(a)
    return a.copy()


def run_noted(backend: str, init_step, absent) -> tuple[dict[str, np.ndarray], dict]:
    """Mithril's DoG, ``b`` left out of the gradients and noted missed."""
    opt = DoG(0.7, init_step=init_step)
    p = {n: native(backend, a) for n, a in start().items()}
    state = opt.init(p)
    for t in range(1, STEPS + 1):
        g = grads(t, absent)
        p, state = opt.update(p, {n: native(backend, a) for n, a in g.items()}, state)
        state.note_missed([n for n in SHAPES if n not in g])  # (after the step, as torch's)
    return {n: np.asarray(v.detach() if backend == "torch" else v) for n, v in p.items()}, \
        state.missed_counts()


def tol(backend: str) -> float:
    return 2e-5 if backend == "jax" else 1e-12  # (JAX: float32)


def close(got: dict, want: dict, rtol: float, label: str) -> None:
    for n in SHAPES:
        np.testing.assert_allclose(got[n], want[n], rtol=rtol, atol=rtol, err_msg=f"{label} {n}")


@pytest.mark.parametrize("init_step", KINDS, ids=lambda k: f"{k[0]}-{k[1]}")
def test_reference_is_optax_with_every_gradient(init_step) -> None:
    """The reference, and mithril, are optax.contrib.dog where no gradient is absent."""
    import jax.numpy as jnp

    tx = optax.contrib.dog(0.7, init_step)
    p = {n: jnp.asarray(a, jnp.float32) for n, a in start().items()}
    st = tx.init(p)
    for t in range(1, STEPS + 1):
        g = {n: jnp.asarray(a, jnp.float32) for n, a in grads(t, ()).items()}
        u, st = tx.update(g, st, p)
        p = optax.apply_updates(p, u)
    want = {n: np.asarray(a, np.float64) for n, a in p.items()}
    close(reference(init_step, ()), want, 2e-5, "reference vs optax")
    close(run_noted("numpy", init_step, ())[0], want, 2e-5, "mithril vs optax")


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("absent", [(1, 3), (2,), (2, 3, 4)], ids=str)
@pytest.mark.parametrize("init_step", KINDS, ids=lambda k: f"{k[0]}-{k[1]}")
def test_missed_gradient_as_the_reference(init_step, absent, backend) -> None:
    got, missed = run_noted(backend, init_step, absent)
    assert missed == {"b": len(absent)}
    want = reference(init_step, absent)
    close(got, want, tol(backend), f"{backend} {absent}")
    # (b's missed steps matter: far beyond float64 rounding)
    assert np.abs(want["b"] - reference(init_step, ())["b"]).max() > 1e-9


@pytest.mark.parametrize("absent", [(1, 3), (2,)], ids=str)
def test_torch_optimizer_with_grad_none(absent) -> None:
    """``torch_optimizer(DoG)`` with ``b.grad`` None: the reference, and the noted run
    bit for bit (the same missed counts)."""
    init_step = ("heuristic", 0.05)
    x = {n: torch.nn.Parameter(torch.tensor(a)) for n, a in start().items()}
    opt = torch_optimizer(DoG(0.7, init_step=init_step), list(x.items()))
    for t in range(1, STEPS + 1):
        g = grads(t, absent)
        for n, v in x.items():
            v.grad = torch.tensor(g[n]) if n in g else None
        opt.step()
    got = {n: v.detach().numpy().copy() for n, v in x.items()}
    close(got, reference(init_step, absent), 1e-12, "torch_optimizer")
    noted, _ = run_noted("torch", init_step, absent)
    for n in SHAPES:
        np.testing.assert_array_equal(got[n], noted[n], err_msg=n)
