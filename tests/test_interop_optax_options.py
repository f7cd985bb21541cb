"""Every option of the optimizers' base class (centralization, normalization, the clipping
of each kind, weight averaging, ``nonfinite="skip"``, weight decay with exclusions and
parameter groups) with each optimizer of the catalog: the optax transformation (what
``make_train_step``'s JAX program runs) against the optimizer's own update, step for step.
An option the transformation left out would show here as a difference (adaptive clipping was, and a Lookahead's inner groups).
The default suite runs a few optimizers of each kind; ``-m slow`` the whole catalog."""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mithril.utils.optimizers as catalog
from mithril.interop import optax_transformation
from mithril.utils.optimizers.base import Optimizer

RNG = np.random.default_rng(0)
SHAPES = {"w": (6, 4), "b": (4,), "k": (2, 3, 3, 4), "s": ()}
P0 = {k: np.asarray(RNG.standard_normal(s), np.float32) for k, s in SHAPES.items()}
GRADS = [{k: np.asarray(RNG.standard_normal(s) * 2, np.float32) for k, s in SHAPES.items()}
         for _ in range(5)]
OPTIONS = {
    "clip_value": {"clip_value": 0.5},
    "clip_block_rms": {"clip_block_rms": 0.3},
    "clip_tensor_norm": {"clip_tensor_norm": 0.7},
    "adaptive_clip": {"adaptive_clip": 0.02},
    "centralize": {"centralize": True, "clip_norm": 1.0},
    "normalize_grad": {"normalize_grad": 0.5, "normalize_eps": 1e-3},
    "clip_norm": {"clip_norm": 1.0, "clip_value": 0.8},
    "ema": {"ema_decay": 0.9, "ema_every": 2},
    "swa": {"swa_start": 2},
    "skip": {"nonfinite": "skip"},
    "weight_decay": {"weight_decay": 0.05},
    "exclude_weight_decay": {"weight_decay": 0.05, "exclude_weight_decay": ["b"]},
    "param_groups": {"weight_decay": 0.05, "param_groups": [
        {"params": ["b", "s"], "lr_scale": 0.5, "weight_decay": 0.0}]},
}
#: the default suite's: one of each kind (elementwise, two-pass, wrapper, per-tensor)
FEW = ("Adam", "LAMB", "Lookahead", "Muon", "Adafactor")
ALL = tuple(n for n in catalog.__all__ if isinstance(getattr(catalog, n), type)
            and issubclass(getattr(catalog, n), Optimizer)
            # (LBFGS: a closure; the others are refused by optax_transformation by name:
            # an update of their own or per-example gradients, tests/test_interop_optax.py)
            and n not in ("Optimizer", "LBFGS", "SAM", "Mechanize", "ScheduleFree", "DPSGD",
                          "DifferentiallyPrivate"))


def make(name: str, options: dict[str, Any]) -> Any:
    cls = getattr(catalog, name)
    if name == "Lookahead":  # (the options are its inner optimizer's)
        return cls(catalog.Adam(learning_rate=1e-2, **options), sync_period=2)
    extra = {"ns_dtype": "float32"} if name == "Muon" else {}
    if name == "SGD":
        extra["momentum"] = 0.9
    if name == "GaLore":  # (a full rank would project on a centralized matrix's null space too:
        extra["rank"] = 2  # its singular vector is arbitrary, and Adam on it blows up rounding)
    return cls(learning_rate=1e-2, **options, **extra)


def check(name: str, option: str) -> None:
    try:
        make(name, OPTIONS[option])
    except (TypeError, ValueError) as e:  # (an option the optimizer does not take)
        pytest.skip(f"{name} does not take {option}: {e}")
    tx = optax_transformation(make(name, OPTIONS[option]))
    p = {k: jnp.asarray(v) for k, v in P0.items()}
    state = tx.init(p)
    opt = make(name, OPTIONS[option])
    # a loss-aware optimizer (PolyakSGD, Momo) takes each step's loss: optax's value=
    losses = [2.0 - 0.25 * i for i in range(len(GRADS))] if opt.needs_loss else [None] * 5
    update = jax.jit(lambda g, s, p, f: tx.update(
        g, s, p, new_params=True, **({} if f is None else {"value": f})))
    want = {k: v.copy() for k, v in P0.items()}
    own = opt.init(want)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for g, f in zip(GRADS, losses):
            p, state = update({k: jnp.asarray(v) for k, v in g.items()}, state, p, f)
            want, own = opt.update(want, {k: v.copy() for k, v in g.items()}, own,
                                   **({} if f is None else {"loss": f}))
    for k in want:
        scale = max(1e-3, float(np.max(np.abs(want[k]))))
        err = float(np.max(np.abs(np.asarray(p[k]) - want[k]))) / scale
        assert err < 1e-4, (name, option, k, err)


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("name", FEW)
def test_options(name: str, option: str) -> None:
    check(name, option)


@pytest.mark.slow
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("name", [n for n in ALL if n not in FEW])
def test_options_whole_catalog(name: str, option: str) -> None:
    check(name, option)
