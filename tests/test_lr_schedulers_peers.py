"""The schedules of optax and Keras that torch lacks (WSD, InverseSqrt, PiecewiseConstant,
PiecewiseInterpolate, JoinSchedules, CosineDecayRestarts), each against its reference over 300
steps at ``1e-12`` relative.

optax (0.2.x) and Keras (3, ``KERAS_BACKEND=jax``) are evaluated in float64 (``jax_enable_x64``)
in **one** subprocess (:func:`conftest.run_python`) for all cases, vectorised over the steps.
Keras 3.15's jax backend computes ``ops.cos`` of a float64 tensor in float32
(``result_type(float64, float)`` is float32 there); the subprocess evaluates Keras's
``CosineDecayRestarts`` once as it is (compared at float32 precision) and once with that single
op computing in float64 (compared at ``1e-12``). optax has no WSD and neither library has an
inverse-square-root schedule: WSD is compared with a NumPy formula and with
``optax.join_schedules`` of optax pieces, InverseSqrt with the formulas of fairseq, the
Transformer paper ("Noam"), T5 and Hugging Face.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import numpy as np
import pytest
import scheduler_parity
from conftest import run_python
from scheduler_parity import FakeOpt, N, assert_rel

from mithril.utils.lr_schedulers import (
    WSD,
    CosineAnnealingLR,
    CosineDecayRestarts,
    InverseSqrt,
    JoinSchedules,
    LinearLR,
    LRScheduler,
    PiecewiseConstant,
    PiecewiseInterpolate,
    SequentialLR,
)


def our_lrs(make: Callable[[FakeOpt], LRScheduler], base: float, n: int = N) -> list[float]:
    """The learning rate after construction and after each of ``n`` steps, checked equal to
    ``get_lr_at`` (these schedules are closed forms)."""
    return scheduler_parity.our_lrs(make, base, n, closed_form=True)


# --------------------------------------------------------------------------------------------
# the references: one subprocess for every optax / Keras case
# --------------------------------------------------------------------------------------------

BASE = 0.1

#: name -> (our factory on an optimizer at BASE, reference spec for the subprocess)
CASES: dict[str, tuple[Callable[[FakeOpt], LRScheduler], dict]] = {}


def _wsd_spec(w: int, s: int, d: int, start: float, final: float, kind: str) -> dict:
    return {"kind": "wsd", "w": w, "s": s, "d": d, "start": start, "final": final,
            "decay": kind}


for _w, _s, _d, _start, _final in [(20, 100, 150, 0.001, 0.002), (20, 100, 180, 0.0, 0.0),
                                   (0, 50, 200, 0.0, 0.01), (30, 0, 120, 0.05, 0.0),
                                   (10, 200, 0, 0.0, 0.003)]:
    for _kind in ("linear", "cosine"):
        CASES[f"wsd-{_kind}-{_w}-{_s}-{_d}"] = (
            lambda o, a=(_w, _s, _d, _start, _final, _kind): WSD(o, *a),  # type: ignore[misc]
            _wsd_spec(_w, _s, _d, _start, _final, _kind))

for _i, _bs in enumerate([{10: 0.5, 50: 0.1, 51: 2.0, 200: 0.3}, {0: 0.5, 100: 0.0},
                          {299: 0.1, 300: 10.0, 1000: 0.5}, {}]):
    CASES[f"piecewise-constant-{_i}"] = (
        lambda o, bs=_bs: PiecewiseConstant(o, bs),  # type: ignore[misc]
        {"kind": "pc", "bs": sorted(_bs.items())})
    for _it in ("linear", "cosine"):
        CASES[f"piecewise-interpolate-{_it}-{_i}"] = (
            lambda o, it=_it, bs=_bs: PiecewiseInterpolate(o, it, bs),  # type: ignore[misc]
            {"kind": "pi", "type": _it, "bs": sorted(_bs.items())})

for _i, (_b, _v) in enumerate([([10, 50, 51, 200], [0.1, 0.05, 0.01, 0.02, 0.003]),
                               ([0], [0.5, 0.25]), ([299, 300], [0.1, 0.2, 0.3])]):
    CASES[f"piecewise-keras-{_i}"] = (
        lambda o, b=_b, v=_v: PiecewiseConstant(o, boundaries=b, values=v),  # type: ignore[misc]
        {"kind": "keras_pc", "boundaries": _b, "values": _v})

for _first, _tm, _mm, _alpha in [(10, 1.0, 1.0, 0.0), (10, 2.0, 1.0, 0.0), (7, 1.5, 0.8, 0.1),
                                 (13, 2.0, 0.5, 0.05), (5, 1.3, 0.9, 0.0), (3.5, 3.0, 1.0, 0.0),
                                 (2, 1.1, 1.0, 0.2), (1, 2.0, 0.9, 0.0), (40, 1.0, 0.7, 0.01)]:
    CASES[f"cosine-restarts-{_first}-{_tm}-{_mm}-{_alpha}"] = (
        lambda o, a=(_first, _tm, _mm, _alpha): CosineDecayRestarts(o, *a),  # type: ignore[misc]
        {"kind": "keras_cdr", "first": _first, "t_mul": _tm, "m_mul": _mm, "alpha": _alpha})


def _join_ours(o: FakeOpt) -> LRScheduler:
    return JoinSchedules(o, [LinearLR(o, 1e-3, 1.0, 25), PiecewiseConstant(o, {30: 0.5}),
                             CosineAnnealingLR(o, 200)], [25, 100])


CASES["join"] = (_join_ours, {"kind": "join", "base": BASE})
CASES["join-peers"] = (
    lambda o: JoinSchedules(o, [WSD(o, 10, 20, 30, 0.0, 0.01, "cosine"),
                                PiecewiseInterpolate(o, "linear", {50: 0.2, 80: 0.5}),
                                PiecewiseConstant(o, {5: 0.3})], [70, 250]),
    {"kind": "join_peers", "base": BASE})

REFERENCE_SCRIPT = r"""
import json, os, sys
os.environ["KERAS_BACKEND"] = "jax"
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np
import optax
import keras
keras.config.set_floatx("float64")
from keras.src.backend.jax import numpy as keras_jnp

BASE = %(base)r
steps = jnp.arange(%(n)d + 1)
specs = json.loads(%(specs)r)


def vec(f):
    return [float(v) for v in np.asarray(jax.vmap(f)(steps), dtype=np.float64)]  # no jit:
    # XLA fusion rounds differently (e.g. -4e-18 instead of 0 at the end of a linear decay)


def wsd(w, s, d, start, final, decay, base=BASE):
    if d == 0:
        dec = optax.constant_schedule(final)
    elif decay == "linear":
        dec = optax.linear_schedule(base, final, d)
    else:
        dec = optax.cosine_decay_schedule(base, d, final / base)
    return optax.join_schedules(
        [optax.linear_schedule(start, base, w), optax.constant_schedule(base), dec],
        [w, w + s])


keras_cos = keras_jnp.cos


def cdr(spec, float64_cos):
    keras_jnp.cos = (lambda x: jnp.cos(jnp.asarray(x))) if float64_cos else keras_cos
    k = keras.optimizers.schedules.CosineDecayRestarts(
        np.float64(BASE), spec["first"], t_mul=spec["t_mul"], m_mul=spec["m_mul"],
        alpha=spec["alpha"])
    out = np.asarray(k(steps))
    assert out.dtype == np.float64, out.dtype
    keras_jnp.cos = keras_cos
    return [float(v) for v in out]


out = {}
for name, spec in specs.items():
    kind = spec["kind"]
    if kind == "wsd":
        out[name] = vec(wsd(spec["w"], spec["s"], spec["d"], spec["start"], spec["final"],
                            spec["decay"]))
    elif kind == "pc":
        out[name] = vec(optax.piecewise_constant_schedule(BASE, dict(spec["bs"])))
    elif kind == "pi":
        out[name] = vec(optax.piecewise_interpolate_schedule(spec["type"], BASE,
                                                             dict(spec["bs"])))
    elif kind == "keras_pc":
        k = keras.optimizers.schedules.PiecewiseConstantDecay(
            spec["boundaries"], [np.float64(v) for v in spec["values"]])
        out[name] = [float(v) for v in np.asarray(k(steps), dtype=np.float64)]
    elif kind == "keras_cdr":
        out[name] = cdr(spec, True)
        out[name + "/float32-cos"] = cdr(spec, False)
    elif kind == "join":
        out[name] = vec(optax.join_schedules([
            optax.linear_schedule(1e-3 * BASE, BASE, 25),
            optax.piecewise_constant_schedule(BASE, {30: 0.5}),
            optax.cosine_decay_schedule(BASE, 200)], [25, 100]))
    elif kind == "join_peers":
        out[name] = vec(optax.join_schedules([
            wsd(10, 20, 30, 0.0, 0.01, "cosine"),
            optax.piecewise_interpolate_schedule("linear", BASE, {50: 0.2, 80: 0.5}),
            optax.piecewise_constant_schedule(BASE, {5: 0.3})], [70, 250]))
    else:
        raise ValueError(kind)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def references() -> dict[str, list[float]]:
    specs = json.dumps({name: spec for name, (_, spec) in CASES.items()})
    code = REFERENCE_SCRIPT % {"base": BASE, "n": N, "specs": specs}
    text = run_python(code, timeout=300)
    return json.loads(text.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(CASES))
def test_equals_optax_or_keras_in_float64(name: str, references: dict) -> None:
    make, _ = CASES[name]
    ours = our_lrs(make, BASE)
    assert_rel(ours, references[name])
    if name.startswith("cosine-restarts"):  # Keras as it is: its cos in float32
        ref32 = references[name + "/float32-cos"]
        assert max(abs(a - b) for a, b in zip(ours, ref32, strict=True)) <= 1e-7 * BASE


# --------------------------------------------------------------------------------------------
# NumPy formulas
# --------------------------------------------------------------------------------------------


def wsd_numpy(base: float, w: int, s: int, d: int, start: float, final: float, kind: str,
              n: int = N) -> np.ndarray:
    t = np.arange(n + 1, dtype=np.float64)
    warm = start + (base - start) * t / max(w, 1)
    p = np.clip((t - w - s) / max(d, 1), 0.0, 1.0)
    shape = {"linear": 1.0 - p, "cosine": 0.5 * (1.0 + np.cos(np.pi * p)),
             "1-sqrt": 1.0 - np.sqrt(p)}[kind]
    decay = final + (base - final) * shape
    return np.where(t < w, warm, np.where(t < w + s, base, np.where(t < w + s + d, decay,
                                                                     final)))


@pytest.mark.parametrize("kind", ["linear", "cosine", "1-sqrt"])
@pytest.mark.parametrize("w,s,d,start,final", [(20, 100, 150, 0.001, 0.002), (0, 30, 270, 0, 0),
                                               (25, 0, 100, 0.01, 0.0), (5, 5, 1, 0.0, 0.05)])
def test_wsd_equals_the_numpy_formula(kind: str, w: int, s: int, d: int, start: float,
                                      final: float) -> None:
    ours = our_lrs(lambda o: WSD(o, w, s, d, start, final, kind), BASE)
    assert_rel(ours, list(wsd_numpy(BASE, w, s, d, start, final, kind)))
    assert ours[w] == BASE and ours[-1] == final  # peak after the warm-up, final at the end


@pytest.mark.parametrize("w", [1, 10, 40, 299])
def test_inverse_sqrt_equals_fairseq_noam_t5_and_hugging_face(w: int) -> None:
    t = np.arange(N + 1, dtype=np.float64)
    # fairseq inverse_sqrt: warmup_init_lr -> lr linearly, then lr * sqrt(warmup) / sqrt(t)
    lr, init = BASE, 1e-4
    lr_step = (lr - init) / w
    fairseq = np.where(t < w, init + t * lr_step, lr * w**0.5 * np.maximum(t, 1) ** -0.5)
    assert_rel(our_lrs(lambda o: InverseSqrt(o, w, start_lr=init), BASE), list(fairseq))
    # Vaswani et al. ("Noam"): d^-0.5 * min(t^-0.5, t * w^-1.5), t >= 1 (0 at t = 0)
    d_model = 512
    peak = (d_model * w) ** -0.5
    tt = np.maximum(t, 1)
    noam = np.where(t == 0, 0.0, d_model**-0.5 * np.minimum(tt**-0.5, tt * w**-1.5))
    assert_rel(our_lrs(lambda o: InverseSqrt(o, w), peak), list(noam))
    # T5: 1 / sqrt(max(t, w))
    t5 = 1.0 / np.sqrt(np.maximum(t, w))
    assert_rel(our_lrs(lambda o: InverseSqrt(o, w, start_lr=w**-0.5), w**-0.5), list(t5))
    # Hugging Face get_inverse_sqrt_schedule(num_warmup_steps=w, timescale)
    for timescale in (w, 7, 1000):
        shift = timescale - w
        hf = [BASE * (s / max(1, w) if s < w else 1.0 / math.sqrt((s + shift) / timescale))
              for s in range(N + 1)]
        assert_rel(our_lrs(lambda o, ts=timescale: InverseSqrt(o, w, timescale=ts), BASE), hf)


def test_inverse_sqrt_without_warmup_needs_a_timescale() -> None:
    ours = our_lrs(lambda o: InverseSqrt(o, 0, timescale=4.0), BASE)
    assert_rel(ours, [BASE * math.sqrt(4.0 / (t + 4.0)) for t in range(N + 1)])


def test_piecewise_keras_and_optax_forms_differ_by_one_step() -> None:
    optax_form = PiecewiseConstant(FakeOpt(1.0), {10: 0.5})
    keras_form = PiecewiseConstant(FakeOpt(1.0), boundaries=[10], values=[1.0, 0.5])
    assert [optax_form.get_lr_at(t) for t in (9, 10, 11)] == [1.0, 0.5, 0.5]
    assert [keras_form.get_lr_at(t) for t in (9, 10, 11)] == [1.0, 1.0, 0.5]


def test_join_schedules_is_sequential_lr_under_optax_names() -> None:
    def seq(o: FakeOpt) -> LRScheduler:
        return SequentialLR(o, [LinearLR(o, 1e-3, 1.0, 25), PiecewiseConstant(o, {30: 0.5}),
                                CosineAnnealingLR(o, 200)], [25, 100])

    assert our_lrs(_join_ours, BASE) == our_lrs(seq, BASE)
    join = _join_ours(FakeOpt(BASE))
    assert join.boundaries == [25, 100] and join.schedules is join.schedulers
    assert join.state_dict()["boundaries"] == [25, 100]
