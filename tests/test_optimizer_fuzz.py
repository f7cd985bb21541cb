"""Failure atomicity of the optimizers, fuzzed (issue #12): a call that raises changes
nothing, and bad input never escapes as a foreign exception.

Each example builds an optimizer (five kinds, three backends, three ``nonfinite`` policies),
takes one good step so that the state owns the parameters, then makes one call with bad
input drawn by hypothesis: ``update`` with wrong gradients, params or state,
``set_learning_rate``, ``load_state_dict`` with a mutated state dict, ``init`` with mixed
params. When the call raises, it must raise a library error (``ValueError``, ``TypeError``,
``KeyError``, or ``FloatingPointError`` under ``nonfinite="raise"``) and the params the
last update returned, every slot, the counters, the hyperparameters and the bound backend
must be bitwise as before. A call that does not raise must leave a usable optimizer: a good
step after it works.

The default suite draws 150 examples; ``pytest -m slow`` draws 4,000 (the count and the
outcome are printed).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mithril.utils.optimizers as mo

SHAPES = {"w": (3, 4), "b": (4,)}
KINDS = {"SGD": {"momentum": 0.9}, "Adam": {}, "AdamW": {}, "RMSProp": {"centered": True},
         "AdaGrad": {}}
ALLOWED = (ValueError, TypeError, KeyError, FloatingPointError)
HUGE = 10**400
BAD_SCALARS = [HUGE, -HUGE, float("nan"), float("inf"), -1.0, "0.1", None, True, [0.1],
               complex(1, 1), np.float64("nan"), 2**63]
COUNTS = {"examples": 0, "raised": 0, "foreign": 0, "changed": 0}


def native(backend: str, a):
    if backend == "torch":
        return torch.tensor(a)
    if backend == "jax":
        import jax.numpy as jnp

        return jnp.asarray(a)
    return np.array(a)


def host(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy().copy()
    return np.array(x)


def _snapshot(opt, params, state) -> tuple:
    return ({k: host(v) for k, v in params.items()},
            {s: host(state.engine.to_numpy(v)) for s, v in state.slots.items()},
            (state.step, state.num_skipped, state.num_nonfinite),
            copy.deepcopy(opt.hyperparameters()), opt._backend)


def _equal(a: tuple, b: tuple) -> bool:
    for x, y in ((a[0], b[0]), (a[1], b[1])):
        if x.keys() != y.keys() or not all(
                x[k].dtype == y[k].dtype and x[k].shape == y[k].shape
                and np.array_equal(x[k], y[k], equal_nan=True) for k in x):
            return False
    hp_a, hp_b = a[3], b[3]
    same_hp = hp_a.keys() == hp_b.keys() and all(
        hp_a[k] == hp_b[k] or (hp_a[k] != hp_a[k] and hp_b[k] != hp_b[k]) for k in hp_a)
    return a[2] == b[2] and same_hp and a[4] is b[4]


def _bad_array(backend: str, kind: str, shape: tuple, rng: np.random.Generator):
    """An array (or not) that is wrong for a parameter of ``shape`` in one way."""
    good = rng.standard_normal(shape).astype(np.float32)
    other = "numpy" if backend != "numpy" else "torch"
    return {
        "shape": lambda: native(backend, np.ones((1,) + shape, np.float32)),
        "broadcast": lambda: native(backend, np.ones((1,) * len(shape), np.float32)),
        "scalar": lambda: native(backend, np.float32(1.0)),
        "float64": lambda: native(backend, good.astype(np.float64)),
        "int": lambda: native(backend, good.astype(np.int32)),
        "list": lambda: good.tolist(),
        "none": lambda: None,
        "string": lambda: "w",
        "other-backend": lambda: native(other, good),
        "nan": lambda: native(backend, np.full(shape, np.nan, np.float32)),
        "huge": lambda: native(backend, np.full(shape, 3e38, np.float32)),
        "transposed": lambda: native(backend, good.T.copy()) if len(shape) == 2 else None,
    }[kind]()


ARRAY_FAULTS = ["shape", "broadcast", "scalar", "float64", "int", "list", "none", "string",
                "other-backend", "nan", "huge", "transposed"]
DICT_FAULTS = ["missing", "extra", "not-a-dict", "int-key"]


def _mutated_state_dict(sd: dict, how: str, value, key_pick: int) -> dict:
    sd = copy.deepcopy(sd)
    hp = sd["hyperparameters"]
    if how == "hyperparameter":
        k = sorted(hp)[key_pick % len(hp)]
        hp[k] = value
    elif how == "unknown-hyperparameter":
        hp["nonsense"] = value
    elif how == "counter":
        sd[["step", "num_skipped", "num_nonfinite"][key_pick % 3]] = value
    elif how == "slot-shape":
        s = sorted(sd["slots"])[key_pick % len(sd["slots"])] if sd["slots"] else None
        if s:
            sd["slots"][s]["w"] = np.zeros((4, 3), np.float32)
    elif how == "slot-missing":
        if sd["slots"]:
            sd["slots"].pop(sorted(sd["slots"])[0])
        else:
            sd["slots"]["ghost"] = {}
    elif how == "slot-value":
        if sd["slots"]:
            sd["slots"][sorted(sd["slots"])[0]]["b"] = value
    elif how == "optimizer-name":
        sd["optimizer"] = value
    elif how == "not-a-dict":
        return value
    return sd


op_strategy = st.one_of(
    st.tuples(st.just("grads"), st.sampled_from(ARRAY_FAULTS + DICT_FAULTS), st.sampled_from(list(SHAPES))),
    st.tuples(st.just("params"), st.sampled_from(ARRAY_FAULTS + DICT_FAULTS), st.sampled_from(list(SHAPES))),
    st.tuples(st.just("state"), st.sampled_from(["other-optimizer", "string", "none"]), st.just("w")),
    st.tuples(st.just("lr"), st.sampled_from(range(len(BAD_SCALARS))), st.just("w")),
    st.tuples(st.just("load"), st.sampled_from(["hyperparameter", "unknown-hyperparameter", "counter",
                                                "slot-shape", "slot-missing", "slot-value",
                                                "optimizer-name", "not-a-dict"]),
              st.sampled_from(range(len(BAD_SCALARS)))),
    st.tuples(st.just("init"), st.sampled_from(["mixed-dtype", "mixed-backend", "int", "list"]), st.just("w")),
)


def check_one(kind: str, backend: str, policy: str, op: tuple, pick: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    COUNTS["examples"] += 1
    opt = getattr(mo, kind)(learning_rate=0.01, nonfinite=policy, **KINDS[kind])
    p0 = {k: native(backend, rng.standard_normal(s).astype(np.float32)) for k, s in SHAPES.items()}
    good_g = lambda: {k: native(backend, rng.standard_normal(s).astype(np.float32))  # noqa: E731
                      for k, s in SHAPES.items()}
    state = opt.init(p0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        params, state = opt.update(p0, good_g(), state)
    before = _snapshot(opt, params, state)
    what, fault, key = op

    def call():
        if what in ("grads", "params"):
            d = good_g() if what == "grads" else dict(params)
            if fault == "missing":
                d.pop(key)
            elif fault == "extra":
                d["ghost"] = native(backend, np.ones(3, np.float32))
            elif fault == "not-a-dict":
                d = list(d.values())
            elif fault == "int-key":
                d[7] = d.pop(key)
            else:
                d[key] = _bad_array(backend, fault, SHAPES[key], rng)
            return opt.update(params, d, state) if what == "grads" else opt.update(d, good_g(), state)
        if what == "state":
            other = {"other-optimizer": lambda: (mo.SGD(0.1) if kind != "SGD" else mo.Adam()).init(
                {k: host(v) for k, v in params.items()}), "string": lambda: "state",
                "none": lambda: None}[fault]()
            return opt.update(params, good_g(), other)
        if what == "lr":
            return opt.set_learning_rate(BAD_SCALARS[fault])
        if what == "load":
            sd = _mutated_state_dict(opt.state_dict(state), fault, BAD_SCALARS[key], pick)
            return opt.load_state_dict(sd, {k: host(v) for k, v in params.items()})
        if what == "init":
            mixed = {"mixed-dtype": lambda: {"a": native(backend, np.ones(2, np.float32)),
                                             "b": native(backend, np.ones(2, np.float64)),
                                             "c": native(backend, np.ones(2, np.float64))},
                     "mixed-backend": lambda: {"a": native(backend, np.ones(2, np.float32)),
                                               "b": native("numpy" if backend != "numpy" else "torch",
                                                           np.ones(2, np.float32))},
                     "int": lambda: {"a": native(backend, np.ones(2, np.int32))},
                     "list": lambda: {"a": [1.0, 2.0]}}[fault]()
            fresh = getattr(mo, kind)(learning_rate=0.01, nonfinite=policy, **KINDS[kind])
            try:
                fresh.init(mixed)
            except ALLOWED:
                assert fresh._backend is None, "a refused init kept the inferred backend"
                raise
            return None
        raise AssertionError(what)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out = call()
    except ALLOWED as e:
        COUNTS["raised"] += 1
        if isinstance(e, FloatingPointError):
            assert policy == "raise", f"FloatingPointError under nonfinite={policy!r}"
        if not _equal(_snapshot(opt, params, state), before):
            COUNTS["changed"] += 1
            raise AssertionError(f"{op} raised {e!r} but changed params/state/hyperparameters") from e
        return
    except Exception as e:
        COUNTS["foreign"] += 1
        raise AssertionError(f"{op} on {kind}/{backend} escaped as {type(e).__name__}: {e}") from e
    # accepted: the optimizer is still usable (an accepted update returned new params)
    if what in ("grads", "params") and out is not None:
        params, state = out
    if what == "load" and out is not None:
        state = out
        params = {k: native(backend, v) for k, v in {k: host(v) for k, v in params.items()}.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            opt.update(params, good_g(), state)
        except FloatingPointError:
            assert policy == "raise"


def _test(max_examples: int):
    @settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(kind=st.sampled_from(sorted(KINDS)), backend=st.sampled_from(["numpy", "torch", "jax"]),
           policy=st.sampled_from(["propagate", "skip", "raise"]), op=op_strategy,
           pick=st.integers(0, 7), seed=st.integers(0, 2**16))
    def run(kind, backend, policy, op, pick, seed):
        check_one(kind, backend, policy, op, pick, seed)

    return run


def test_optimizer_calls_that_raise_change_nothing():
    _test(150)()


@pytest.mark.slow
def test_optimizer_calls_that_raise_change_nothing_slow():
    for k in COUNTS:
        COUNTS[k] = 0
    _test(4000)()
    print(f"\noptimizer fuzz: {COUNTS}")
    assert COUNTS["foreign"] == 0 and COUNTS["changed"] == 0
