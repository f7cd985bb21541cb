"""Loading a malformed optimizer state, fuzzed: every loader raises a clear library error and
changes nothing, or loads exactly what it was given.

The state dicts are rich: an Adam with an EMA and an SWA (their update counts,
``"averaged"``), a parameter group, skipped steps in a row (``consecutive_skips``) and a
parameter that missed steps (``"missed"``: :meth:`OptimizerState.note_missed`); a Prodigy
(optimizer-wide ``values``) and an Adafactor (factored slots of their own shapes). Hypothesis
mutates one to three of their fields (any depth: a slot's array, one missed count, a whole
key) into a wrong type, shape, dtype, length, sign or size, deletes them, adds unknown
keys, or relabels the dict for another optimizer; ``load_state_dict(d, params)`` must then
either

* raise ``ValueError`` / ``TypeError`` / ``KeyError`` (the library's: a message that starts
  with "state dict" and names a key on the mutated path), leaving the optimizer's
  hyperparameters, its live state and params, and the dict itself bitwise as they were, or
* load a state whose own ``state_dict`` gives back what was mutated (values cast to the
  state's dtype; absent counters read as 0), and that takes a step.

The checkpoint half (:mod:`tests.test_state_fuzz_checkpoint`) does the same to files.
The default run draws 60 examples per case; ``pytest -m slow`` 10,000 (numpy) and 2,000.
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
CONFIGS = {
    "adam": lambda lr=0.05: mo.Adam(lr, ema_decay=0.9, swa_start=2, nonfinite="skip",
                                    param_groups=[{"params": ["b"], "weight_decay": 0.1}]),
    "prodigy": lambda lr=1.0: mo.Prodigy(lr),
    "adafactor": lambda lr=0.01: mo.Adafactor(lr),
}
ALLOWED = (ValueError, TypeError, KeyError)


def native(backend: str, a):
    if backend == "torch":
        return torch.tensor(a)
    if backend == "jax":
        import jax.numpy as jnp

        return jnp.asarray(a)
    return np.array(a)


def host(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        if x.device.type == "meta":  # (no data)
            return np.full(x.shape, np.nan, np.float32)
        x = x.detach().cpu()
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy().copy()
    return np.array(x)


def trained(config: str, backend: str):
    """(optimizer, params, state) after five steps: the second skipped (an inf gradient), the
    fourth and fifth without 'b' (noted missed), the last skipped again (Adam's)."""
    rng = np.random.default_rng(0)
    opt = CONFIGS[config]()
    params = {k: native(backend, rng.standard_normal(s).astype(np.float32))
              for k, s in SHAPES.items()}
    state = opt.init(params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for t in range(5):
            g = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
            if t in (1, 4) and config == "adam":
                g["w"][0, 0] = np.inf
            if t >= 3:
                del g["b"]
            params, state = opt.update(params, {k: native(backend, v) for k, v in g.items()},
                                       state)
            if t >= 3:
                state.note_missed(["b"])
    return opt, params, state


def snapshot(opt, params, state) -> tuple:
    return (opt.hyperparameters(), {k: host(v) for k, v in params.items()},
            opt.state_dict(state))


def same(a, b) -> bool:
    """Deep equality of state dicts (arrays bitwise, NaN equal to NaN, dtypes included)."""
    if isinstance(a, dict) or isinstance(b, dict):
        return (isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys()
                and all(same(a[k], b[k]) for k in a))
    if isinstance(a, (np.ndarray, torch.Tensor)) or isinstance(b, (np.ndarray, torch.Tensor)):
        if type(a) is not type(b):
            return False
        x, y = host(a), host(b)
        return x.dtype == y.dtype and x.shape == y.shape and np.array_equal(
            x, y, equal_nan=x.dtype.kind in "fc")
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return type(a) is type(b) and (a == b or (a != a and b != b))


def deep_copy(d):
    if isinstance(d, dict):
        return {k: deep_copy(v) for k, v in d.items()}
    if isinstance(d, torch.Tensor):
        return d.clone()
    if isinstance(d, np.ndarray):
        return d.copy()  # (an object array's elements: the same objects)
    return copy.deepcopy(d)


# ---------------------------------------------------------------------------------------------
# mutations
# ---------------------------------------------------------------------------------------------

_scalar = st.sampled_from([-1, -2**70, 2**63, 2**70, 1.5, float("nan"), float("inf"), True,
                           "3", None, [], {}, [1], b"x", np.int64(-1), np.float64(2.0),
                           np.array(3), np.array([1, 2]), torch.tensor(2)]).map(deep_copy)
# (a fresh copy each time: a later mutation may add to a drawn {})
_small_int = st.integers(0, 12)


@st.composite
def _array(draw, like):
    """A replacement for the array ``like``: another shape, dtype, container or content."""
    a = host(like)
    if a.dtype.kind not in "fiub":  # (an earlier mutation's: start from zeros)
        a = np.zeros(a.shape, np.float32)
    how = draw(st.sampled_from(["shape", "transposed", "scalar", "f64", "f16", "int", "uint",
                                "bool", "complex", "list", "ragged", "str", "torch", "torch-bf16",
                                "huge", "nan", "object", "meta"]))
    make = {
        "shape": lambda: np.zeros((*a.shape, 2), a.dtype),
        "transposed": lambda: a.T.copy() if a.ndim == 2 else a[None],
        "scalar": lambda: np.float32(1.0),
        "f64": lambda: a.astype(np.float64) * 0.5,
        "f16": lambda: a.astype(np.float16),
        "int": lambda: np.full(a.shape, 7, np.int64),
        "uint": lambda: np.full(a.shape, 2**64 - 1, np.uint64),
        "bool": lambda: a > 0,
        "complex": lambda: a.astype(np.complex64),
        "list": lambda: a.tolist(),
        "ragged": lambda: [[1.0], [1.0, 2.0]],
        "str": lambda: "array",
        "torch": lambda: torch.tensor(a, dtype=torch.float64),
        "torch-bf16": lambda: torch.tensor(a).to(torch.bfloat16),
        "huge": lambda: np.full(a.shape, 1e300),
        "nan": lambda: np.full(a.shape, np.nan, a.dtype),
        "object": lambda: np.array([object()] * max(a.size, 1), dtype=object),
        "meta": lambda: torch.empty(a.shape, device="meta"),  # (no data: a bare error before)
    }[how]
    with np.errstate(over="ignore"):  # (float16 of a huge value: inf, a valid state value)
        return make()


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))


@st.composite
def mutated(draw, sd: dict, others: list[str]):
    """``sd`` with one to three of its fields (at any depth) replaced, deleted or added to;
    also the path(s) changed."""
    m = deep_copy(sd)
    touched = []
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(m) if p and p[0] != "hyperparameters"]
        path = draw(st.sampled_from(paths))
        parent = m
        for k in path[:-1]:
            parent = parent[k]
        key, old = path[-1], parent[path[-1]]
        op = draw(st.sampled_from(["replace", "delete", "add", "count", "relabel"]))
        if op == "delete":
            del parent[key]
        elif op == "add" and isinstance(old, dict):
            new = draw(st.sampled_from(["zz", "w", "ema", "m", "step", 3]))
            old[new] = draw(_small_int | _scalar)
            path = (*path, new)
        elif op == "count" and isinstance(old, (int, np.integer)):
            parent[key] = draw(_small_int)  # (a plausible count: accepted where consistent)
        elif op == "relabel":
            m["optimizer"] = draw(st.sampled_from(others))
            path = ("optimizer",)
        elif isinstance(old, (np.ndarray, torch.Tensor)):
            parent[key] = draw(_array(old))
        else:
            parent[key] = draw(_scalar)
        touched.append(path)
    return m, touched


# ---------------------------------------------------------------------------------------------
# the check
# ---------------------------------------------------------------------------------------------


def check_loaded(opt, st_, mutated_sd: dict, backend: str) -> None:
    """An accepted state dict was loaded as given: the state's own dict equals it."""
    again = opt.state_dict(st_)
    for k in ("step", "num_skipped", "num_nonfinite", "consecutive_skips"):
        assert again[k] == mutated_sd.get(k, 0), k
    for s, per in again["slots"].items():
        for n, a in per.items():
            given_ = host(mutated_sd["slots"][s][n]) if isinstance(
                mutated_sd["slots"][s][n], torch.Tensor) else np.asarray(mutated_sd["slots"][s][n])
            if given_.dtype.kind == "V" or str(given_.dtype) == "bfloat16":
                given_ = given_.astype(np.float32)
            with np.errstate(over="ignore", invalid="ignore"):
                np.testing.assert_array_equal(host(a), given_.astype(host(a).dtype),
                                              err_msg=f"{s}/{n}")
    assert same(again.get("values", {}), {k: float(v) for k, v in
                                          mutated_sd.get("values", {}).items()})
    if mutated_sd.get("averaged") is not None:  # (None, as absent: inferred from the step)
        assert again["averaged"] == mutated_sd["averaged"]
    want_missed = {n: int(c) for n, c in (mutated_sd.get("missed") or {}).items() if c}
    assert again.get("missed", {}) == want_missed
    grads = {k: native(backend, np.ones(s, np.float32)) for k, s in SHAPES.items()}
    params = {k: native(backend, np.zeros(s, np.float32)) for k, s in SHAPES.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _, after = opt.update(params, grads, st_)
    assert after.step == again["step"] + (not after.last_step_skipped)  # (NaN slots: skipped)


def fuzz(config: str, backend: str, examples: int, seed_dict=None) -> dict:
    opt0, params0, state0 = trained(config, backend)
    sd = opt0.state_dict(state0)
    others = [c for c in ("SGD", "AdamW", "Lion", "Adafactor", "Prodigy", "Adam")
              if c != sd["optimizer"]]
    counts = {"examples": 0, "raised": 0}

    @given(st.data())
    @settings(max_examples=examples, derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    def check(data):
        d, touched = data.draw(mutated(sd, others))
        kept = deep_copy(d)
        opt, params, state = CONFIGS[config](lr=123.0), params0, state0
        before = snapshot(opt, params, state)
        counts["examples"] += 1
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                loaded = opt.load_state_dict(d, {k: native(backend, host(v))
                                                 for k, v in params.items()})
        except ALLOWED as e:
            counts["raised"] += 1
            msg = str(e)
            names = {str(k) for p in touched for k in p}
            assert "state dict" in msg and any(n in msg for n in names), (touched, msg)
            assert same(snapshot(opt, params, state), before), touched
            assert same(d, kept), touched  # the dict itself untouched
            return
        assert same(d, kept), touched
        if loaded is None:
            assert "slots" not in d, touched
            return
        check_loaded(opt, loaded, d, backend)

    check()
    return counts


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
def test_malformed_state_dicts_are_refused_cleanly(config, backend):
    counts = fuzz(config, backend, 60 if backend != "jax" else 25)
    assert counts["raised"] >= counts["examples"] // 2, counts  # (mostly refusals: a real fuzz)


@pytest.mark.slow
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
def test_malformed_state_dicts_are_refused_cleanly_long(config, backend):
    counts = fuzz(config, backend, 10_000 if backend == "numpy" else 2_000)
    print(f"\n{config}/{backend}: {counts}")


# ---------------------------------------------------------------------------------------------
# the cases found, each named
# ---------------------------------------------------------------------------------------------


def _load(d, backend="numpy", config="adam"):
    opt0, params, state = trained(config, backend)
    opt = CONFIGS[config](lr=123.0)
    before = opt.hyperparameters()
    try:
        return opt, opt.load_state_dict(d, {k: native(backend, host(v))
                                            for k, v in params.items()})
    finally:
        assert opt.hyperparameters() == before or "slots" in d


@pytest.fixture(scope="module")
def saved():
    opt, params, state = trained("adam", "numpy")
    sd = opt.state_dict(state)
    assert sd["missed"] == {"b": 2} and sd["consecutive_skips"] == 1 and sd["num_skipped"] == 2
    assert sd["averaged"] == {"ema": {"w": 3, "b": 3}, "swa": {"w": 2, "b": 2}}
    return sd


@pytest.mark.parametrize("key, value, exc, words", [
    ("missed", [], TypeError, "'missed' must be a dict"),  # (was accepted: falsy)
    ("missed", 0, TypeError, "'missed' must be a dict"),
    ("missed", {"b": 4}, ValueError, "'missed' of 'b' is 4, beyond the 3 steps"),
    ("averaged", {"ema": {"w": 2**70, "b": 1}, "swa": {"w": 1, "b": 1}}, ValueError,
     "'averaged' count of 'ema' for 'w' is 1180591620717411303424, beyond"),  # (OverflowError)
    ("averaged", {"ema": {"w": 4, "b": 1}, "swa": {"w": 1, "b": 1}}, ValueError,
     "beyond the 3 steps taken"),  # (was accepted)
    ("bogus", 1, KeyError, "state dict key(s) 'bogus' unknown to Adam"),  # (was ignored)
    ("step", None, KeyError, "'slots' but no 'step'"),  # (deleted: was read as 0)
    ("slots", {"m": {"w": [[1.0], [1.0, 2.0]], "b": np.zeros(4)}}, TypeError,
     "slot 'm' of 'w' is no array"),  # (a bare NumPy ValueError)
    ("slots", {"m": {"w": np.full((3, 4), 1e300), "b": np.zeros(4)}}, ValueError,
     "slot 'm' of 'w' holds np.float64(1e+300), beyond the range of the state's float32"),
])
def test_named_cases(saved, key, value, exc, words):
    d = deep_copy(saved)
    if key == "step":
        del d["step"]
    elif key == "slots":
        d["slots"] = {**d["slots"], "m": value["m"]}
    else:
        d[key] = value
    with pytest.raises(exc) as e:
        _load(d)
    assert words in str(e.value)


def test_old_state_dicts_without_the_new_fields_load(saved):
    """A dict saved before ``consecutive_skips``, ``averaged`` and ``missed`` were kept: 0,
    inferred from the step (each average updated at every step since its start), none."""
    d = {k: v for k, v in deep_copy(saved).items()
         if k not in ("consecutive_skips", "averaged", "missed")}
    opt, st_ = _load(d)
    again = opt.state_dict(st_)
    assert st_.consecutive_skips == 0 and st_.missed is None and "missed" not in again
    assert again["averaged"] == {"ema": {"w": 3, "b": 3}, "swa": {"w": 2, "b": 2}}


def test_torch_tensor_slots_load_bitwise(saved):
    """Slots as torch tensors (float64 and bfloat16: ``torch.load(map_location=...)`` gives
    them) load as their values."""
    d = deep_copy(saved)
    d["slots"]["m"] = {n: torch.tensor(a) for n, a in d["slots"]["m"].items()}
    d["slots"]["v"] = {n: torch.tensor(a).to(torch.bfloat16) for n, a in d["slots"]["v"].items()}
    again = mo.Adam().state_dict(_load(d)[1])
    for n, a in saved["slots"]["m"].items():
        np.testing.assert_array_equal(again["slots"]["m"][n], a)
        np.testing.assert_array_equal(again["slots"]["v"][n], torch.tensor(
            saved["slots"]["v"][n]).to(torch.bfloat16).float().numpy())


def test_slots_of_mixed_dtypes_keep_every_value(saved):
    """A slot whose first parameter's array is float16 (or int64) and the others float32:
    each loads as its value in the state's float32 (the flat buffer took the first array's
    dtype, rounding 'b' to float16: 0.1234567 loaded as 0.12347412)."""
    for first in (np.float16, np.int64):
        d = deep_copy(saved)
        d["slots"]["m"] = {"w": np.zeros((3, 4), first), "b": np.full(4, 0.1234567, np.float32)}
        opt, st_ = _load(d)
        np.testing.assert_array_equal(st_.slot("m")["b"], np.full(4, 0.1234567, np.float32))


def test_note_missed_and_set_missed_refuse_bad_input_unchanged():
    """Unknown names (a bare KeyError 'zz' before), counts that are no int, negative or
    beyond the step: refused, naming them, the counts as they were."""
    from mithril.errors import KeyMismatchError

    _, _, state = trained("adam", "numpy")
    for call, exc, words in [
            (lambda: state.note_missed(["b", "zz"]), KeyMismatchError, "note_missed: 'zz'"),
            (lambda: state.set_missed({"zz": 1}), KeyMismatchError, "set_missed: 'zz'"),
            (lambda: state.set_missed({"b": -1}), ValueError, "'b' must be an int in [0, step=3]"),
            (lambda: state.set_missed({"b": 4}), ValueError, "got 4"),
            (lambda: state.set_missed({"b": 1.0}), ValueError, "got 1.0")]:
        with pytest.raises(exc, match=None) as e:
            call()
        assert words in str(e.value) and state.missed_counts() == {"b": 2}
    state.set_missed({"b": 3, "w": 0})
    assert state.missed_counts() == {"b": 3}
