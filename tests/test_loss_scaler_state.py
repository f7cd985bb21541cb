"""LossScaler / MixedPrecisionTrainer state dicts and arguments (issue #12): every field is
checked (as the constructor checks it) before any is written, so a bad dict, a huge int or a
missing key raises a library error naming the key and changes nothing. The property tests
load random (mostly bad) state dicts between scaler updates and compare the scaler bitwise.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mithril as ml
from mithril.backends import NumpyBackend
from mithril.errors import KeyMismatchError
from mithril.utils.mixed_precision import LossScaler, MixedPrecisionTrainer
from mithril.utils.optimizers import SGD


def regressor() -> ml.Model:
    m = ml.Model()
    m += ml.MLP(["tanh", None], [16, 4])
    m.set_shapes(input=[None, 8])
    return m


# -- loss-scaler and trainer state dicts: checked first, nothing changed on error (issue #12) -----
HUGE = 10**400
SCALER_BAD = [  # (key, value, error, message)
    ("scale", float("nan"), ValueError, "'scale'"), ("scale", float("inf"), ValueError, "'scale'"),
    ("scale", -1e-45, ValueError, "'scale'"), ("scale", -2.0, ValueError, "'scale'"),
    ("scale", 1e39, ValueError, "float32"), ("scale", 1e-50, ValueError, "float32"),
    ("scale", HUGE, ValueError, "too large"), ("scale", "65536", TypeError, "'scale'"),
    ("scale", True, TypeError, "'scale'"), ("scale", None, TypeError, "'scale'"),
    ("growth_factor", 1.0, ValueError, "'growth_factor'"),
    ("growth_factor", float("inf"), ValueError, "'growth_factor'"),
    ("growth_factor", HUGE, ValueError, "too large"),
    ("backoff_factor", 1.0, ValueError, "'backoff_factor'"),
    ("backoff_factor", 0.0, ValueError, "'backoff_factor'"),
    ("backoff_factor", -HUGE, ValueError, "too large"),
    ("growth_interval", 0, ValueError, "'growth_interval'"),
    ("growth_interval", 2.5, TypeError, "'growth_interval'"),
    ("growth_interval", HUGE, ValueError, "too large"),
    ("growth_interval", 2**63, ValueError, "too large"),
    ("growth_tracker", -1, ValueError, "'growth_tracker'"),
    ("growth_tracker", 3, ValueError, "'growth_tracker' must be < "),  # interval is 3
    ("growth_tracker", HUGE, ValueError, "too large"),
    ("growth_tracker", "1", TypeError, "'growth_tracker'"),
    ("dynamic", "no", TypeError, "'dynamic'"), ("dynamic", 2, TypeError, "'dynamic'"),
]


def big_id(v):
    return f"int_{v.bit_length()}_bits" if isinstance(v, int) and abs(v) > 2**64 else None


def scaler_bits(s: LossScaler) -> tuple:
    return (s._scale.tobytes(), s.growth_factor.hex(), s.backoff_factor.hex(),
            s.growth_interval, s.dynamic, s.growth_tracker, type(s._scale))


@pytest.mark.parametrize("key, value, err, msg", SCALER_BAD, ids=big_id)
def test_loss_scaler_load_state_dict_refuses_bad_fields(key, value, err, msg):
    s = LossScaler(1024.0, growth_interval=3)
    s.update(False)
    s.update(True)
    s.update(False)  # scale 512, tracker 1
    before = scaler_bits(s)
    with pytest.raises(err, match=msg) as info:
        s.load_state_dict({**s.state_dict(), key: value})
    assert key in str(info.value)
    assert scaler_bits(s) == before and s.scale == 512.0 and s.growth_tracker == 1
    s.update(False)
    s.update(False)  # still a working scaler: it grows after 3 finite steps
    assert s.scale == 1024.0 and s.growth_tracker == 0


@pytest.mark.parametrize("key, value, err, msg", [
    (k, v, e, m) for k, v, e, m in SCALER_BAD if k != "scale"], ids=big_id)
def test_loss_scaler_attribute_set_is_checked_as_the_constructor_checks(key, value, err, msg):
    """``scaler.growth_factor = x`` is checked (a bad value changes nothing, so the scaler
    never holds a state ``load_state_dict`` would refuse); torch's ``update(new_scale)`` is
    refused (our ``update`` takes whether the step found an inf)."""
    s = LossScaler(1024.0, growth_interval=3)
    s.update(False)  # tracker 1
    before = scaler_bits(s)
    with pytest.raises(err, match=msg) as info:
        setattr(s, key, value)
    assert key in str(info.value) and scaler_bits(s) == before
    with pytest.raises(TypeError, match="found_inf must be a bool .*got 2048.0"):
        s.update(2048.0)
    assert scaler_bits(s) == before
    s.growth_interval = 2  # a good value takes effect at once: the next finite step grows
    s.update(np.bool_(False))
    assert s.scale == 2048.0 and s.growth_tracker == 0
    LossScaler().load_state_dict(s.state_dict())


@pytest.mark.parametrize("key", ["scale", "growth_factor", "backoff_factor", "growth_interval",
                                 "growth_tracker"])
def test_loss_scaler_load_state_dict_missing_key_changes_nothing(key):
    s = LossScaler(1024.0)
    d = {k: v for k, v in LossScaler(8.0, 3.0, 0.25, 7).state_dict().items()
         if k.lstrip("_") != key}  # (the tracker is under both keys: torch's and ours)
    with pytest.raises(KeyMismatchError, match=key):
        s.load_state_dict(d)
    assert s.scale == 1024.0 and s.growth_factor == 2.0 and s.growth_interval == 2000
    with pytest.raises(TypeError, match="dict"):
        s.load_state_dict([("scale", 1.0)])
    # 'dynamic' may be absent (older checkpoints): True
    s.load_state_dict({k: v for k, v in LossScaler(8.0, 3.0, 0.25, 7, dynamic=False)
                       .state_dict().items() if k != "dynamic"})
    assert s.dynamic is True and s.scale == 8.0 and s.growth_factor == 3.0


@pytest.mark.parametrize("arg, value, err", [
    ("loss_scale", HUGE, ValueError), ("loss_scale", 1e39, ValueError),
    ("loss_scale", "1024", TypeError), ("growth_factor", HUGE, ValueError),
    ("growth_factor", float("inf"), ValueError), ("backoff_factor", HUGE, ValueError),
    ("growth_interval", HUGE, ValueError), ("growth_interval", float("inf"), TypeError),
    ("growth_interval", 2.0, TypeError), ("dynamic_loss_scaling", "yes", TypeError),
], ids=big_id)
def test_trainer_and_scaler_constructor_errors(arg, value, err):
    backend = NumpyBackend(dtype="float16")
    compiled = ml.compile(regressor(), backend)
    with pytest.raises(err, match=arg):
        MixedPrecisionTrainer(compiled, SGD(), compiled.get_parameters(), **{arg: value})


@pytest.fixture(scope="module")
def np_trainer_parts():
    backend = NumpyBackend(dtype="float16")
    compiled = ml.compile(regressor(), backend)
    return compiled, compiled.get_parameters()


def trainer_bits(tr: MixedPrecisionTrainer) -> tuple:
    return scaler_bits(tr.scaler), tr.num_steps, tr.num_skipped_steps


def test_trainer_load_state_dict_checks_everything_before_writing(np_trainer_parts):
    compiled, params = np_trainer_parts
    tr = MixedPrecisionTrainer(compiled, SGD(learning_rate=0.1), params, loss_scale=256.0)
    good = MixedPrecisionTrainer(compiled, SGD(), params, loss_scale=32.0).state_dict()
    good.update(num_steps=5, num_skipped_steps=2)
    before = trainer_bits(tr)
    for bad, err, msg in [
        ({k: v for k, v in good.items() if k != "num_steps"}, KeyMismatchError, "num_steps"),
        ({**good, "num_skipped_steps": 6}, ValueError, "num_skipped_steps"),
        ({**good, "num_steps": HUGE}, ValueError, "num_steps"),
        ({**good, "num_steps": -1}, ValueError, "num_steps"),
        ({**good, "num_steps": 5.0}, TypeError, "num_steps"),
        ({**good, "scaler": {**good["scaler"], "scale": -1.0}}, ValueError, "'scaler' 'scale'"),
        ({**good, "scaler": {**good["scaler"], "scale": float("nan")}}, ValueError, "'scale'"),
        ({**good, "scaler": None}, TypeError, "'scaler'"),
        ("not a dict", TypeError, "dict"),
    ]:
        with pytest.raises(err, match=msg):
            tr.load_state_dict(bad)
        assert trainer_bits(tr) == before  # the scale was not overwritten before the error
    # the trainer still trains at its own scale
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    tr.forward({"input": x})
    _, _, ok = tr.backward_and_update({"output": np.full((4, 4), 0.01, np.float32)})
    assert ok and tr.loss_scale == 256.0 and tr.num_steps == 1
    tr.load_state_dict(good)
    assert tr.loss_scale == 32.0 and (tr.num_steps, tr.num_skipped_steps) == (5, 2)
    # what the masters and the engine were made for cannot change under them
    for name, value in [("model", compiled), ("optimizer", SGD()), ("compute_dtype", "float32")]:
        with pytest.raises(AttributeError, match=f"MixedPrecisionTrainer.{name} is fixed"):
            setattr(tr, name, value)
    with pytest.raises(TypeError, match="scaler must be a LossScaler, got float"):
        tr.scaler = 1024.0
    tr.scaler = LossScaler(64.0)  # (a new scaler is read at the next step)
    assert tr.loss_scale == 64.0


def test_loss_gradient_errors_name_the_output(np_trainer_parts):
    compiled, params = np_trainer_parts
    tr = MixedPrecisionTrainer(compiled, SGD(), params)
    tr.forward({"input": np.ones((4, 8), np.float32)})
    for value, err, msg in [(HUGE, ValueError, "too large"), ("1.0", TypeError, "number"),
                            ([[1.0], [2.0, 3.0]], TypeError, "number"),
                            (object(), TypeError, "number")]:
        with pytest.raises(err, match=f"'output'.*{msg}"):
            tr.backward_and_update({"output": value})
    _, _, ok = tr.backward_and_update({"output": np.full((4, 4), 0.01, np.float32)})
    assert ok and tr.num_steps == 1  # the forward pass was kept through the errors


# -- property tests: random updates and (mostly bad) state dicts ----------------------------------
SCALER_KEYS = list(LossScaler().state_dict())
SCALER_VALUES = [HUGE, -HUGE, 2**63, float("nan"), float("inf"), 0.0, -1.0, 0, 1, 2, 3, 0.5,
                 1.5, 1e39, 1e-50, "x", None, True, False, 8.0, 65536.0]
SCALER_OPS = st.one_of(
    st.tuples(st.just("update"), st.booleans()),
    st.tuples(st.just("load"), st.tuples(st.sampled_from(SCALER_KEYS),
                                         st.sampled_from(SCALER_VALUES), st.booleans())),
    st.tuples(st.just("load_trainer"), st.tuples(
        st.sampled_from(SCALER_KEYS + ["num_steps", "num_skipped_steps", "scaler"]),
        st.sampled_from(SCALER_VALUES), st.booleans())),
)


def check_scaler_sequence(trainer: MixedPrecisionTrainer, ops: list) -> None:
    """A load that raises raises a library error and changes nothing (bitwise); one that
    succeeds installs exactly the given values; a huge int always raises."""
    tr, s = trainer, trainer.scaler
    for op, arg in ops:
        before = trainer_bits(tr)
        if op == "update":
            s.update(arg)
            assert 0 <= s.scale < float("inf") and 0 <= s.growth_tracker < s.growth_interval
            continue
        key, value, delete = arg
        if op == "load":
            d: dict = s.state_dict()
            target = d
        else:
            d = tr.state_dict()
            target = d if key in ("num_steps", "num_skipped_steps", "scaler") else d["scaler"]
        if delete and key != "dynamic":
            del target[key]
        else:
            target[key] = value
        try:
            (s.load_state_dict if op == "load" else tr.load_state_dict)(d)
        except (ValueError, TypeError, KeyError) as e:
            assert not isinstance(e, OverflowError)
            assert trainer_bits(tr) == before, f"{op} {key}={value!r} changed the scaler"
            continue
        assert not (value is HUGE or value == -HUGE) or delete, f"{key}={value!r} accepted"
        sd = s.state_dict()
        loaded = d if op == "load" else d["scaler"]
        for k, v in loaded.items():
            assert sd[k] == (float(np.float32(v)) if k == "scale" else v), k


@settings(derandomize=True, max_examples=100, deadline=None)
@given(ops=st.lists(SCALER_OPS, min_size=1, max_size=15))
def test_property_scaler_state_dicts_are_all_or_nothing(np_trainer_parts, ops):
    compiled, params = np_trainer_parts
    check_scaler_sequence(MixedPrecisionTrainer(compiled, SGD(), params, growth_interval=3), ops)


@pytest.mark.slow
@settings(derandomize=True, max_examples=600, deadline=None)
@given(ops=st.lists(SCALER_OPS, min_size=1, max_size=30))
def test_slow_property_scaler_state_dicts_are_all_or_nothing(np_trainer_parts, ops):
    compiled, params = np_trainer_parts
    check_scaler_sequence(MixedPrecisionTrainer(compiled, SGD(), params, growth_interval=3), ops)
