"""ScheduleFreeSGD / ScheduleFreeAdamW with a warm-up and a parameter that has no gradient at
some steps (``state.note_missed``: what ``torch_optimizer`` records for a ``.grad`` that is
None), or that joined later (a group's ``step_offset``). Side by side with a float64
reference written here: optax's formula (which optax.contrib checks below where every
gradient is there), with the reference package's (facebookresearch ``schedulefree``)
convention for a missing gradient: the parameter's z, y and ν are left as they are, while
the optimizer-wide largest lr and weight sum, and the warm-up and bias correction (its
per-group ``k``), keep the optimizer's count; a group that joined later counts its own
steps from its join. (The missed counts once made the next update raise a bare TypeError:
the weight was computed from each tensor's own count.)"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import host, native
from optimizer_parity import on

from mithril.utils.optimizers import ScheduleFreeAdamW, ScheduleFreeSGD

SHAPES = {"w": (3, 4), "b": (4,)}
STEPS, WARMUP, LR, B1, B2, EPS, WD = 7, 3, 0.05, 0.9, 0.99, 1e-8, 0.1
ABSENT = (2, 4, 5)  # the steps at which 'b' has no gradient
BACKENDS = ["numpy", "torch", "jax", "jax-jit"]


def start() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {n: rng.standard_normal(s) for n, s in SHAPES.items()}


def grads(t: int, absent: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Step ``t``'s gradients (float64); ``b`` has none at the steps ``absent``."""
    rng = np.random.default_rng(100 + t)
    g = {n: rng.standard_normal(s) for n, s in SHAPES.items()}
    return {n: a for n, a in g.items() if not (n == "b" and t in absent)}


def reference(adam: bool, absent: tuple[int, ...] = (), joined: int = 0, b_scale: float = 1.0,
              own_count: bool = False) -> dict[str, np.ndarray]:
    """The schedule-free step in float64 (optax's): the averaging weight from the
    optimizer's count ``t``, the z step's warm-up (one step behind) and bias correction from
    the parameter's group's count (``t − joined`` for 'b'), 'b' untouched where absent.
    ``b_scale``: 'b''s group's lr over the optimizer's (the weight uses the optimizer's).
    ``own_count``: 'b''s own count instead, its missed steps left out (torch.optim's
    per-parameter ``step``: not the convention, the bug's alternative)."""
    y = start()
    z = {n: a.copy() for n, a in y.items()}
    nu = {n: np.zeros_like(a) for n, a in y.items()}
    max_lr = weight_sum = 0.0
    for t in range(1, STEPS + 1):
        max_lr = max(max_lr, LR * min(t, WARMUP) / WARMUP)
        weight_sum += max_lr ** 2
        c = max_lr ** 2 / weight_sum
        for n, g in grads(t, absent + tuple(range(1, joined + 1))).items():
            k = t - (joined if n == "b" else 0)  # the group's own count
            if own_count and n == "b":
                k -= sum(1 for a in absent if a < t)
            lr = LR * min(k - 1, WARMUP) / WARMUP * (b_scale if n == "b" else 1.0)
            if adam:
                nu[n] = B2 * nu[n] + (1 - B2) * g * g
                step = g / (np.sqrt(nu[n] / (1 - B2 ** k)) + EPS) + WD * y[n]
            else:
                step = g + WD * y[n]
            z_new = z[n] - lr * step
            x = (1 - c) * (y[n] - (1 - B1) * z[n]) / B1 + c * z_new
            y[n], z[n] = B1 * x + (1 - B1) * z_new, z_new
    return {**{f"p/{n}": a for n, a in y.items()}, **{f"z/{n}": a for n, a in z.items()},
            **({f"nu/{n}": a for n, a in nu.items()} if adam else {}),
            "weight_sum": np.float64(weight_sum), "max_lr": np.float64(max_lr)}


def make(adam: bool, **kw):
    cls = ScheduleFreeAdamW if adam else ScheduleFreeSGD
    extra = {"beta2": B2, "epsilon": EPS} if adam else {}
    return cls(LR, warmup_steps=WARMUP, beta1=B1, weight_decay=WD, **extra, **kw)


def outcome(opt, params, state) -> dict[str, np.ndarray]:
    sd = opt.state_dict(state)
    out = {f"p/{n}": host(v) for n, v in params.items()}
    out.update({f"{s}/{n}": np.asarray(a) for s, per in sd["slots"].items()
                for n, a in per.items()})
    out.update({k: np.float64(v) for k, v in sd["values"].items()})
    return out


def run(adam: bool, backend: str, absent: tuple[int, ...], note: bool = True, joined: int = 0,
        b_scale: float = 1.0) -> tuple[dict[str, np.ndarray], dict]:
    """Mithril's run, 'b' left out of the gradients at ``absent`` (noted missed with
    ``note``); with ``joined``, 'b' is left out of the first ``joined`` steps and then in a
    group of ``step_offset`` ``joined``."""
    group = [{"params": ["b"], "step_offset": joined}] if joined else []
    if b_scale != 1.0:
        group = [{"params": ["b"], "learning_rate": LR * b_scale}]
    with on(backend, "float64"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        before, opt = make(adam), make(adam, param_groups=group)
        p = {n: native(backend, a) for n, a in start().items()}
        state = before.init(p)
        for t in range(1, STEPS + 1):
            g = grads(t, absent + tuple(range(1, joined + 1)))
            p, state = (before if t <= joined else opt).update(
                p, {n: native(backend, a) for n, a in g.items()}, state)
            if note and t > joined:
                state.note_missed([n for n in SHAPES if n not in g])  # (after the step, as torch)
        return outcome(opt, p, state), state.missed_counts()


def assert_close(got: dict, want: dict, rtol: float) -> None:
    assert got.keys() == want.keys()
    for k, w in want.items():
        np.testing.assert_allclose(got[k], w, rtol=rtol, atol=rtol * 1e-2, err_msg=k)


# the warm-up fraction is rounded to float32 as optax computes it: ~1e-8 of the lr
RTOL = 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("adam", [True, False], ids=["adamw", "sgd"])
def test_a_parameter_missing_steps_matches_the_reference(adam, backend):
    got, missed = run(adam, backend, ABSENT)
    assert missed == {"b": len(ABSENT)}
    want = reference(adam, ABSENT)
    assert_close(got, want, RTOL)
    # the test tells the counts apart: 'b''s own count in its warm-up and bias correction
    # would move it by far more than the tolerance
    other = reference(adam, ABSENT, own_count=True)["p/b"]
    assert np.max(np.abs(other - want["p/b"]) / np.abs(want["p/b"])) > 1e3 * RTOL


@pytest.mark.parametrize("adam", [True, False], ids=["adamw", "sgd"])
def test_noting_missed_steps_changes_nothing(adam):
    """The counts are per group (the reference's ``k``): noted or not, the same numbers."""
    noted, _ = run(adam, "numpy", ABSENT)
    plain, missed = run(adam, "numpy", ABSENT, note=False)
    assert missed == {}
    for k, v in plain.items():
        np.testing.assert_array_equal(noted[k], v, err_msg=k)


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("adam", [True, False], ids=["adamw", "sgd"])
def test_a_group_that_joined_later_counts_from_its_join(adam, backend):
    """'b''s group has ``step_offset`` 2: its z step's warm-up and bias correction count
    from its join, the averaging weight from the optimizer's first step (one value for all
    the parameters); and it misses steps after it joined."""
    got, missed = run(adam, backend, (5,), joined=2)
    assert missed == {"b": 1}
    assert_close(got, reference(adam, (5,), joined=2), RTOL)


@pytest.mark.parametrize("adam", [True, False], ids=["adamw", "sgd"])
def test_a_group_learning_rate_scales_its_z_step_only(adam):
    got, _ = run(adam, "numpy", ABSENT, b_scale=0.5)
    assert_close(got, reference(adam, ABSENT, b_scale=0.5), RTOL)


@pytest.mark.parametrize("adam", [True, False], ids=["adamw", "sgd"])
def test_the_reference_is_optax_where_every_gradient_is_there(adam):
    """The reference above against optax.contrib (float32: jax_enable_x64 is left off in
    this process), every gradient there: what makes it the formula mithril follows."""
    import jax.numpy as jnp
    import optax
    import optax.contrib

    tx = (optax.contrib.schedule_free_adamw(LR, WARMUP, B1, B2, EPS, WD) if adam else
          optax.contrib.schedule_free_sgd(LR, WARMUP, B1, WD))
    params = {n: jnp.asarray(a, jnp.float32) for n, a in start().items()}
    s = tx.init(params)
    for t in range(1, STEPS + 1):
        g = {n: jnp.asarray(a, jnp.float32) for n, a in grads(t, ()).items()}
        u, s = tx.update(g, s, params)
        params = optax.apply_updates(params, u)
    want = reference(adam)
    for n in SHAPES:
        np.testing.assert_allclose(np.asarray(params[n]), want[f"p/{n}"], rtol=2e-5,
                                   atol=2e-6, err_msg=n)
        np.testing.assert_allclose(np.asarray(s.z[n]), want[f"z/{n}"], rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(float(s.weight_sum), want["weight_sum"], rtol=1e-6)


@pytest.mark.parametrize("adam", [True, False], ids=["adamw", "sgd"])
def test_torch_optimizer_with_grad_none(adam):
    """``torch_optimizer`` with ``b.grad`` None at some steps (the missed counts it keeps):
    the reference, and the plain noted run bit for bit."""
    import torch

    from mithril.interop import torch_optimizer

    x = {n: torch.nn.Parameter(torch.tensor(a)) for n, a in start().items()}
    opt = torch_optimizer(make(adam), list(x.items()))
    for t in range(1, STEPS + 1):
        g = grads(t, ABSENT)
        for n, v in x.items():
            v.grad = torch.tensor(g[n]) if n in g else None
        opt.step()
    got = {n: v.detach().numpy().copy() for n, v in x.items()}
    want = reference(adam, ABSENT)
    noted, _ = run(adam, "torch", ABSENT)
    for n in SHAPES:
        np.testing.assert_allclose(got[n], want[f"p/{n}"], rtol=RTOL, atol=RTOL * 1e-2)
        np.testing.assert_array_equal(got[n], noted[f"p/{n}"], err_msg=n)


@pytest.mark.parametrize("adam", [True, False], ids=["adamw", "sgd"])
def test_optax_update_missed_counts_change_nothing(adam):
    """optax_transformation's ``update(missed=)`` (make_train_step's per-leaf counts):
    schedule-free counts per group, so counts given or not, the same numbers and one
    weight sum."""
    import jax.numpy as jnp

    from mithril.interop import optax_transformation

    out = []
    for missed in (None, np.array([0, 2], np.int32)):  # (leaves in order: b, w)
        tx = optax_transformation(make(adam))
        p = {n: jnp.asarray(a, jnp.float32) for n, a in start().items()}
        s = tx.init(p)
        for t in range(1, STEPS + 1):
            g = {n: jnp.asarray(a, jnp.float32) for n, a in grads(t, ()).items()}
            u, s = tx.update(g, s, p, missed=missed)
            p = {n: p[n] + u[n] for n in p}
        out.append((p, {k: np.asarray(v) for k, v in s.values.items()}))
    assert all(v.shape == () for v in out[1][1].values())
    for n in SHAPES:
        np.testing.assert_array_equal(np.asarray(out[1][0][n]), np.asarray(out[0][0][n]))
