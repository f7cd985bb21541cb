"""Keras 3 side by side (JAX backend, float64, in a subprocess: x64 is process-global) with
our Keras-convention optimizers and options, on NumPy, torch and JAX arrays, and the
refusals a Keras user meets.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import jax_float64, run_python

import mithril.utils.optimizers as mo

#: tensors whose names contain one another's ("w" is in "ww" and "bw")
SHAPES = {"w": (3, 4), "ww": (4,), "bw": (2, 3), "s": ()}
STEPS = 24


def problem() -> tuple[dict, list]:
    rng = np.random.default_rng(66)
    p0 = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    grads = [{k: rng.standard_normal(s) * (1 + t % 3) for k, s in SHAPES.items()}
             for t in range(STEPS)]
    return p0, grads


def lr_at(t: int) -> float:
    return 0.01 * (3.0 if 8 <= t < 15 else 0.5 if t >= 15 else 1.0)


_KERAS = r"""
import json, os
os.environ["KERAS_BACKEND"] = "jax"
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np
import keras
keras.config.set_floatx("float64")
SHAPES = {shapes!r}
STEPS = {steps!r}
rng = np.random.default_rng(66)
p0 = {{k: rng.standard_normal(s) for k, s in SHAPES.items()}}
grads = [{{k: rng.standard_normal(s) * (1 + t % 3) for k, s in SHAPES.items()}}
         for t in range(STEPS)]
out = {{}}
# AdamW with the variable named "w" excluded from weight decay (Keras's var_list)
opt = keras.optimizers.AdamW(learning_rate=0.01, weight_decay=0.5)
vs = {{k: keras.Variable(v, dtype="float64", name=k) for k, v in p0.items()}}
opt.exclude_from_weight_decay(var_list=[vs["w"]])
opt.build(list(vs.values()))
traj = []
for t in range(STEPS):
    opt.learning_rate = 0.01 * (3.0 if 8 <= t < 15 else 0.5 if t >= 15 else 1.0)
    opt.apply([jnp.asarray(grads[t][k]) for k in vs], list(vs.values()))
    traj.append({{k: np.array(v.value).tolist() for k, v in vs.items()}})
out["adamw_exclude_w"] = traj
# the same without exclusions
opt = keras.optimizers.AdamW(learning_rate=0.01, weight_decay=0.5)
vs = {{k: keras.Variable(v, dtype="float64", name=k) for k, v in p0.items()}}
opt.build(list(vs.values()))
traj = []
for t in range(STEPS):
    opt.learning_rate = 0.01 * (3.0 if 8 <= t < 15 else 0.5 if t >= 15 else 1.0)
    opt.apply([jnp.asarray(grads[t][k]) for k in vs], list(vs.values()))
    traj.append({{k: np.array(v.value).tolist() for k, v in vs.items()}})
out["adamw"] = traj
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def keras_runs() -> dict:
    code = _KERAS.format(shapes=SHAPES, steps=STEPS)
    return json.loads(run_python(code, timeout=300).strip().splitlines()[-1])


def _to(backend: str, a: np.ndarray):
    if backend == "torch":
        return torch.tensor(a)
    if backend == "jax":
        return jnp.asarray(a)
    return np.array(a)


def _numpy(a) -> np.ndarray:
    return np.array(a.detach().numpy() if isinstance(a, torch.Tensor) else a, dtype=np.float64)


def _run(opt, backend: str) -> list[dict]:
    """``opt``'s parameters after each of the STEPS updates (the learning rate changed twice
    mid-run, as Keras's ``optimizer.learning_rate = ...``), as NumPy."""
    p0, grads = problem()
    params = {k: _to(backend, v) for k, v in p0.items()}
    state = opt.init(params)
    traj = []
    for t in range(STEPS):
        opt.learning_rate = lr_at(t)
        params, state = opt.update(params, {k: _to(backend, g) for k, g in grads[t].items()},
                                   state)
        traj.append({k: _numpy(v) for k, v in params.items()})
    return traj


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
def test_exclude_names_is_exact_and_a_lone_string_is_refused(backend: str,
                                                             keras_runs: dict) -> None:
    """``exclude_from_weight_decay(names=...)`` names exact parameters (Keras's ``var_list``):
    ``names=["w"]`` keeps ``"ww"`` and ``"bw"`` decaying, as Keras's does. A lone string
    ``names="w"`` was searched as a regex and silently excluded ``"ww"`` and ``"bw"`` too (a
    step ~2.5e-3 off Keras's after 24 steps); it is refused now, naming ``names`` and
    ``regex=``, and the refused call changes nothing."""
    opt = mo.AdamW(learning_rate=0.01, weight_decay=0.5, epsilon=1e-7, convention="keras")
    with pytest.raises(TypeError, match=r"names must be a list of exact names, got 'w' "
                                        r"\(a pattern is regex=\)"):
        opt.exclude_from_weight_decay(names="w")
    assert opt.exclude_weight_decay == []
    opt.exclude_from_weight_decay(names=["w"])
    with jax_float64():
        traj = _run(opt, backend)
    for t, (got, want) in enumerate(zip(traj, keras_runs["adamw_exclude_w"], strict=True)):
        for k in SHAPES:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-14,
                                       err_msg=f"{k} at step {t}")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"regex": ["w"]}, r"regex must be a string searched in each name, got \['w'\] "
                       r"\(exact names are names=\)"),
    ({"names": {"w": True}}, r"names must be a list of exact names, got \{'w': True\}"),
    ({"names": ["w", 3]}, r"names must be a list of exact names, got \['w', 3\]"),
    ({"names": ["w"], "regex": ("^b",)}, r"regex must be a string"),
])
def test_exclude_arguments_of_another_kind_are_refused_at_the_call(kwargs: dict, message: str,
                                                                   keras_runs: dict) -> None:
    """``regex=["w"]`` was taken as a list of exact names (``"ww"`` kept decaying, where the
    pattern ``w`` excludes it); ``names={"w": True}`` was taken, and every later update raised
    a KeyError for the parameters the dict left out. Each is refused at the call, naming the
    argument, and leaves no exclusion behind: the run is Keras's AdamW without one."""
    opt = mo.AdamW(learning_rate=0.01, weight_decay=0.5, epsilon=1e-7, convention="keras")
    with pytest.raises(TypeError, match=message):
        opt.exclude_from_weight_decay(**kwargs)
    assert opt.exclude_weight_decay == []
    traj = _run(opt, "numpy")
    for t, (got, want) in enumerate(zip(traj, keras_runs["adamw"], strict=True)):
        for k in SHAPES:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-14,
                                       err_msg=f"{k} at step {t}")
