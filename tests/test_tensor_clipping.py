"""Per-tensor clipping in the fused step: ``clip_tensor_norm`` against Keras 3's
``clipnorm`` and ``clip_block_rms`` against optax's ``clip_by_block_rms``, float64, run side
by side (one subprocess: JAX x64 and the Keras backend are process-global); groups turning
it off; every engine agreeing in float32; a refused step changing nothing."""

from __future__ import annotations

import functools
import json
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import optimizer_engine, run_python

from mithril.utils.optimizers import SGD, Adam, AdamW

SHAPES = {"w": (3, 4), "b": (4,), "s": (), "big": (130, 130)}
STEPS = 12  # every gradient scale (1 + t % 5) twice, for momentum and Adam's moments


def problem(dtype="float64"):
    rng = np.random.default_rng(0)
    p0 = {k: np.asarray(rng.standard_normal(s), dtype=dtype) for k, s in SHAPES.items()}
    grads = [{k: np.asarray(rng.standard_normal(s) * (1 + t % 5), dtype=dtype)
              for k, s in SHAPES.items()} for t in range(STEPS)]
    return p0, grads


_SCRIPT = r"""
import json, os
os.environ["KERAS_BACKEND"] = "jax"
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np
import optax
import keras
keras.config.set_floatx("float64")
p0, grads = problem()
names = list(SHAPES)
out = {}
for c in (0.5, 3.0):  # Keras clipnorm with SGD, plain and with momentum (Keras's Adam puts
    # epsilon elsewhere than torch's, which the clipped, small gradients of "big" magnify)
    for kind in ("plain", "sgd"):
        opt = keras.optimizers.SGD(learning_rate=0.01, momentum=0.9 if kind == "sgd" else 0.0,
                                   clipnorm=c)
        vs = [keras.Variable(p0[k], dtype="float64") for k in names]
        for g in grads:
            opt.apply([jnp.asarray(g[k]) for k in names], vs)
        out[f"keras/{kind}/{c}"] = {k: np.array(v.value).tolist() for k, v in zip(names, vs)}
for c in (0.5, 3.0):  # optax clip_by_block_rms before adam
    tx = optax.chain(optax.clip_by_block_rms(c), optax.adam(0.01))
    ps = {k: jnp.asarray(v) for k, v in p0.items()}
    st = tx.init(ps)
    for g in grads:
        u, st = tx.update({k: jnp.asarray(v) for k, v in g.items()}, st, ps)
        ps = optax.apply_updates(ps, u)
    out[f"optax/rms/{c}"] = {k: np.array(v).tolist() for k, v in ps.items()}
"""


@functools.cache
def references() -> dict:
    import inspect

    # one interpreter for the references of Keras, optax and the adaptive clipping (the
    # imports take most of its time): each script sets its own SHAPES
    code = "\n".join([f"SHAPES = {SHAPES!r}\nSTEPS = {STEPS!r}", "import numpy as np",
                      inspect.getsource(problem), _SCRIPT, "clip_out = out",
                      f"SHAPES = {AGC_SHAPES!r}", _AGC_SCRIPT,
                      'print(json.dumps({"clip": clip_out, "agc": agc}))'])
    return json.loads(run_python(code, timeout=300).strip().splitlines()[-1])


def run(opt, conv=np.array, dtype="float64", grads_of=None):
    p0, grads = problem(dtype)
    params = {k: conv(v.copy()) for k, v in p0.items()}
    state = opt.init(params)
    for g in grads_of or grads:
        params, state = opt.update(params, {k: conv(v) for k, v in g.items()}, state)
    return {k: np.asarray(v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in params.items()}


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.maximum(np.abs(a), np.abs(b)), 1e-3)))


@pytest.mark.parametrize("c", [0.5, 3.0])
def test_against_keras_clipnorm_and_optax_block_rms(c):
    ref = references()["clip"]
    cases = {f"keras/plain/{c}": SGD(0.01, clip_tensor_norm=c),
             # Keras SGD: m ← μ·m − lr·g; p ← p + m: torch's SGD without dampening, same numbers
             f"keras/sgd/{c}": SGD(0.01, momentum=0.9, clip_tensor_norm=c),
             f"optax/rms/{c}": Adam(0.01, clip_block_rms=c)}
    for key, opt in cases.items():
        mine = run(opt)
        errs = {k: rel(mine[k], ref[key][k]) for k in SHAPES}
        assert max(errs.values()) <= 1e-10, (key, errs)


def test_groups_turn_it_off_and_global_clip_sees_clipped_norms():
    p0, grads = problem()
    opt = AdamW(0.01, clip_tensor_norm=1.0, clip_norm=2.0,
                param_groups=[{"params": ["big"], "clip_tensor_norm": None}])
    mine = run(opt)
    # by hand: per tensor, then the global (torch) rule on the clipped gradients
    by_hand = []
    for g in grads:
        h = {k: v if k == "big" else v * 1.0 / max(np.linalg.norm(v), 1.0) for k, v in g.items()}
        n = np.sqrt(sum(np.sum(v * v) for v in h.values()))
        by_hand.append({k: v * min(1.0, 2.0 / (n + 1e-6)) for k, v in h.items()})
    want = run(AdamW(0.01), grads_of=by_hand)
    for k in SHAPES:
        assert rel(mine[k], want[k]) <= 1e-12, k


@pytest.mark.parametrize("kind, conv", [("numba", torch.from_numpy), ("numba", jnp.asarray),
                                        ("jax-jit", jnp.asarray), ("array", np.array),
                                        ("array", torch.from_numpy)])
def test_engines_agree_in_float32(kind, conv):
    def make():
        return Adam(0.01, clip_tensor_norm=1.0, clip_block_rms=0.3, clip_norm=5.0,
                    param_groups=[{"params": ["w"], "clip_block_rms": None}])

    want = run(make(), dtype="float32")
    with optimizer_engine(kind):
        got = run(make(), conv, dtype="float32")
    for k in SHAPES:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=2e-6)


def test_nonfinite_gradient_with_tensor_clipping_is_refused_cleanly():
    p0, grads = problem()
    opt = Adam(0.01, clip_tensor_norm=1.0, nonfinite="skip")
    params = {k: v.copy() for k, v in p0.items()}
    state = opt.init(params)
    params, state = opt.update(params, grads[0], state)
    before = {k: np.array(v) for k, v in params.items()}, state.to_numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        params, state = opt.update(params, dict(grads[1], s=np.asarray(np.inf)), state)
    assert state.last_step_skipped and not np.isfinite(state.last_grad_norm)
    for k in SHAPES:
        assert np.array_equal(params[k], before[0][k])
    for s, v in state.to_numpy().items():
        assert np.array_equal(v, before[1][s])


@pytest.mark.parametrize("arg", ["clip_tensor_norm", "clip_block_rms"])
def test_bad_values_name_the_argument(arg):
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match=arg):
            Adam(**{arg: bad})


# ---------------------------------------------------------------------------------------------
# adaptive gradient clipping (optax adaptive_grad_clip), unit-wise
# ---------------------------------------------------------------------------------------------

AGC_SHAPES = {"w": (5, 7), "heads": (3, 4, 2), "conv": (2, 2, 3, 4), "b": (7,), "row": (1, 6),
              "s": ()}

_AGC_SCRIPT = r"""
import json
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np
import optax
rng = np.random.default_rng(3)
p0 = {k: np.asarray(rng.standard_normal(s)) for k, s in SHAPES.items()}
grads = [{k: np.asarray(rng.standard_normal(s) * (0.1 + 3 * (t % 3))) for k, s in SHAPES.items()}
         for t in range(12)]
out = {}
for c in (0.01, 0.3):
    tx = optax.chain(optax.adaptive_grad_clip(c), optax.sgd(0.1, momentum=0.9))
    ps = {k: jnp.asarray(v) for k, v in p0.items()}
    st = tx.init(ps)
    for g in grads:
        u, st = tx.update({k: jnp.asarray(v) for k, v in g.items()}, st, ps)
        ps = optax.apply_updates(ps, u)
    out[str(c)] = {k: np.array(v).tolist() for k, v in ps.items()}
agc = {"p0": {k: v.tolist() for k, v in p0.items()},
       "grads": [{k: v.tolist() for k, v in g.items()} for g in grads], "out": out}
"""


def agc_reference() -> dict:
    return references()["agc"]


def _agc_run(opt, conv=np.array):
    ref = agc_reference()
    params = {k: conv(np.asarray(v, dtype=np.float64)) for k, v in ref["p0"].items()}
    state = opt.init(params)
    for g in ref["grads"]:
        params, state = opt.update(params, {k: conv(np.asarray(v, dtype=np.float64))
                                            for k, v in g.items()}, state)
    return {k: np.asarray(v.numpy() if isinstance(v, torch.Tensor) else v)
            for k, v in params.items()}


@pytest.mark.parametrize("c", [0.01, 0.3])
@pytest.mark.parametrize("conv", [np.array, torch.from_numpy], ids=["numpy", "torch"])
def test_adaptive_clip_equals_optax(c, conv):
    want = agc_reference()["out"][str(c)]
    mine = _agc_run(SGD(0.1, momentum=0.9, adaptive_clip=c), conv)
    errs = {k: rel(mine[k], want[k]) for k in AGC_SHAPES}
    assert max(errs.values()) <= 1e-10, errs
    # a group turning it off: that tensor sees the raw gradient
    off = _agc_run(SGD(0.1, momentum=0.9, adaptive_clip=c,
                       param_groups=[{"params": ["b"], "adaptive_clip": None}]), conv)
    raw = _agc_run(SGD(0.1, momentum=0.9), conv)
    assert np.array_equal(off["b"], raw["b"]) and np.array_equal(off["w"], mine["w"])


def test_adaptive_clip_refuses_six_dimensions_before_any_change():
    opt = Adam(0.01, adaptive_clip=0.1)
    params = {"x": np.ones((1, 2, 1, 2, 1, 2)) * np.arange(1, 9).reshape(1, 2, 1, 2, 1, 2),
              "y": np.ones((2, 2, 2, 2, 2, 2))}
    state = opt.init(params)
    with pytest.raises(ValueError, match=r"parameter 'x'.*shape \(1, 2, 1, 2, 1, 2\)"):
        opt.update(params, {k: np.ones_like(v) for k, v in params.items()}, state)
    assert state.step == 0 and np.all(params["y"] == 1)
