"""The side-by-side harness of the learning-rate scheduler tests (``test_lr_schedulers*.py``).

A scheduler drives :class:`FakeOpt`, which only stores the learning rate it is given;
:func:`torch_lrs` runs the ``torch.optim.lr_scheduler`` counterpart on
``torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)``; both return the learning
rate after construction and after each of ``n`` steps. :func:`assert_rel` holds the two to
``|ours - ref| <= 1e-12 * max(|ours|, |ref|)`` (purely relative: torch's recursive formulas
against our closed forms differ by the recursion's rounding), :func:`assert_exact` to equality.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch

from mithril.utils.lr_schedulers import LRScheduler

REL_TOL = 1e-12
N = 300


class FakeOpt:
    """A stand-in for a mithril optimizer: it stores a float and counts the calls that set it;
    while ``refuse`` is set it refuses every learning rate, as an optimizer refuses a bad one."""

    def __init__(self, lr: float) -> None:
        self.lr = float(lr)
        self.set_calls = 0
        self.refuse = False

    def get_learning_rate(self) -> float:
        return self.lr

    def set_learning_rate(self, lr: float) -> None:
        if self.refuse:
            raise ValueError(f"learning_rate refused: {lr}")
        self.lr = float(lr)
        self.set_calls += 1


def torch_lrs(
    make: Callable[[torch.optim.Optimizer], object],
    base: float,
    n: int = N,
    metrics: Sequence[float] | None = None,
) -> list[float]:
    """torch's learning rate after construction and after each of ``n`` scheduler steps (each
    after an optimizer step, as torch expects; ``metrics[i]`` passed to step ``i`` if given)."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = make(opt)
        out = [float(opt.param_groups[0]["lr"])]
        for i in range(n):
            opt.step()
            if metrics is None:
                sched.step()  # type: ignore[attr-defined]
            else:
                sched.step(metrics[i])  # type: ignore[attr-defined]
            out.append(float(opt.param_groups[0]["lr"]))
    return out


def our_lrs(
    make: Callable[[FakeOpt], LRScheduler],
    base: float,
    n: int = N,
    metrics: Sequence[float | None] | None = None,
    closed_form: bool = False,
) -> list[float]:
    """Ours, the same way; every step also checks ``get_last_lr`` and ``last_step``, and with
    ``closed_form`` the whole run is checked equal to ``get_lr_at(t)``."""
    opt = FakeOpt(base)
    sched = make(opt)
    out = [opt.get_learning_rate()]
    assert sched.get_last_lr() == out[0]
    for i in range(n):
        if metrics is None:
            sched.step()
        else:
            sched.step(metrics[i])  # type: ignore[call-arg]
        out.append(opt.get_learning_rate())
        assert sched.get_last_lr() == out[-1]
        assert sched.last_step == i + 1
    if closed_form:
        assert out == [sched.get_lr_at(t) for t in range(n + 1)]
    return out


def noisy_metric(n: int, seed: int = 0) -> list[float]:
    """A decreasing loss curve with noise and long plateaus (fixed by the seed)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    curve = 1.0 / (1.0 + 0.03 * np.minimum(t, 60)) + 0.2 * (t > 150) * np.exp(-(t - 150) / 20)
    return [float(v) for v in curve + 0.01 * rng.standard_normal(n)]


def max_rel(ours: list[float], ref: list[float]) -> float:
    """The largest ``|a - b| / max(|a|, |b|)`` over the run (0 where they are equal)."""
    assert len(ours) == len(ref)
    return max((abs(a - b) / max(abs(a), abs(b)) for a, b in zip(ours, ref, strict=True)
                if a != b), default=0.0)


def assert_exact(ours: list[float], ref: list[float]) -> None:
    assert len(ours) == len(ref)
    bad = [(t, a, b) for t, (a, b) in enumerate(zip(ours, ref, strict=True)) if a != b]
    assert not bad, f"first mismatches (t, ours, ref): {bad[:5]}"


def assert_rel(ours: list[float], ref: list[float], rel: float = REL_TOL) -> None:
    assert len(ours) == len(ref)
    bad = [(t, a, b) for t, (a, b) in enumerate(zip(ours, ref, strict=True))
           if abs(a - b) > rel * max(abs(a), abs(b))]
    assert not bad, f"first mismatches (t, ours, ref): {bad[:5]}"


_PEER_SCRIPT = r"""
import json, os
os.environ["KERAS_BACKEND"] = "jax"
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np
import optax
import keras
keras.config.set_floatx("float64")
from keras.src.backend.jax import numpy as keras_jnp
keras_jnp.cos = lambda x: jnp.cos(jnp.asarray(x))  # Keras's float64 cos runs in float32
K = keras.optimizers.schedules
steps = jnp.arange(%(n)d, dtype=jnp.float64)
out = {}
for name, peer in json.loads(%(cases)r).items():
    values = np.asarray(jax.vmap(eval(peer))(steps))
    assert values.dtype == np.float64, (name, values.dtype)
    out[name] = [float(v) for v in values]
print(json.dumps(out))
"""


def peer_schedules(cases: dict[str, str], n: int) -> dict[str, list[float]]:
    """Each optax / Keras schedule expression of ``cases`` (``optax.…``, ``K.…`` for
    ``keras.optimizers.schedules``, or a ``lambda t: …`` of ``jnp``) at the counts
    ``0 .. n − 1`` in float64, run in a subprocess (``jax_enable_x64`` is process-global;
    Keras's cosine is computed in float64 there, as it is not by Keras itself)."""
    from conftest import run_python

    code = _PEER_SCRIPT % {"n": n, "cases": json.dumps(cases)}
    return json.loads(run_python(code, timeout=300).strip().splitlines()[-1])
