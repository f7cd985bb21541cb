"""Checkpoint files of a rich optimizer state, altered (with valid digests), truncated and
corrupted: every load raises a :class:`~mithril.errors.CheckpointError` naming the file (and
the field or tensor; a ``ValueError`` where it holds another optimizer class) and changes
nothing (the optimizer, the scheduler, the file), or loads exactly what the file says.

The states are those of :mod:`test_state_fuzz` (an Adam with an EMA, an SWA, a parameter
group, skipped steps in a row and a parameter that missed steps; Prodigy's values;
Adafactor's factored slots). Hypothesis alters the metadata's optimizer fields
(``missed``, ``averaged``, ``consecutive_skips``, ``slots``, ``slot_shapes``, ``values``,
the counters) and the optimizer's tensors (dropped, added, reshaped, of another dtype), and
the file is rebuilt with digests that match (:func:`test_checkpoint_faults.build`, an
independent writer of the format). The default run draws 40 examples per state; ``pytest -m
slow`` 10,000 for the Adam one.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_checkpoint_faults import CODES, build, parts
from test_state_fuzz import CONFIGS, SHAPES, host, trained

from mithril.errors import CheckpointError
from mithril.utils.checkpoint import load_checkpoint, save_checkpoint
from mithril.utils.lr_schedulers import StepLR


def _saved(folder, config: str):
    opt, params, state = trained(config, "numpy")
    path = folder / f"{config}.safetensors"
    save_checkpoint(path, params, opt, state, StepLR(opt, step_size=2, gamma=0.5))
    return path, params, state


def _fresh(config: str):
    opt = CONFIGS[config](lr=123.0)
    return opt, StepLR(opt, step_size=9, gamma=0.9)


def _snapshot(opt, sched) -> str:
    return json.dumps([opt.hyperparameters(), sched.state_dict()], default=repr)


def _load(path, params, config):
    """Load ``path`` into a fresh optimizer and scheduler: the result, or the error (checked
    to leave them and the file as they were)."""
    opt, sched = _fresh(config)
    before, raw = _snapshot(opt, sched), path.read_bytes()
    try:
        got = load_checkpoint(path, params_template=params, optimizer=opt, scheduler=sched)
    except (ValueError, KeyError) as e:  # (CheckpointError, or another optimizer's class)
        assert isinstance(e, CheckpointError) or "cannot load it into" in str(e), e
        assert str(path) in str(e) and _snapshot(opt, sched) == before
        assert path.read_bytes() == raw
        return e
    assert path.read_bytes() == raw
    return opt, got


_leaf = (st.none() | st.booleans() | st.integers(-3, 12) | st.sampled_from([2**63, -2**70])
         | st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(["w", "b", "m"]))
_json = st.recursive(_leaf, lambda c: st.lists(c, max_size=3)
                     | st.dictionaries(st.sampled_from(["w", "b", "ema", "m", "zz"]), c,
                                       max_size=3), max_leaves=5)


def _opt_paths(value, prefix):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            if prefix != ("optimizer",) or k != "hyperparameters":
                yield from _opt_paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _opt_paths(v, (*prefix, i))


@st.composite
def _altered(draw, meta: dict, tensors: dict):
    m = json.loads(json.dumps(meta))
    t = dict(tensors)
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.booleans()):  # a metadata field of the optimizer
            path = draw(st.sampled_from([p for p in _opt_paths(m["optimizer"], ("optimizer",))
                                         if len(p) > 1]))
            parent = m
            for k in path[:-1]:
                parent = parent[k]
            op = draw(st.sampled_from(["replace", "delete", "add"]))
            if op == "delete" and isinstance(parent, dict):
                del parent[path[-1]]
            elif op == "add" and isinstance(parent[path[-1]], dict):
                parent[path[-1]][draw(st.sampled_from(["w", "zz", "ema"]))] = draw(_json)
            else:
                parent[path[-1]] = draw(_json)
            continue
        name = draw(st.sampled_from([k for k in t if k.startswith("opt")] or ["opt/m/w"]))
        code, shape, raw = t.get(name, ("F32", [4], b"\0" * 16))
        a = np.frombuffer(raw, CODES[code]).reshape(shape)
        op = draw(st.sampled_from(["drop", "extra", "reshape", "F64", "F16", "I32"]))
        if op == "drop":
            t.pop(name, None)
        elif op == "extra":
            t[draw(st.sampled_from(["opt/m/zz", "opt/zz/w", "optv/zz", "opt/ema/w2"]))] = (
                "F32", list(a.shape), a.astype("<f4").tobytes())
        elif op == "reshape":
            t[name] = (code, [1, *a.shape], raw)
        else:
            t[name] = (op, list(a.shape), a.astype(CODES[op]).tobytes())
    return json.dumps(m), t


def fuzz(folder, config: str, examples: int) -> dict:
    path, params, _ = _saved(folder, config)
    meta, tensors, _, _ = parts(path)
    original = json.loads(meta)
    counts = {"examples": 0, "refused": 0}

    @given(st.data())
    @settings(max_examples=examples, derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    def check(data):
        text, t = data.draw(_altered(original, tensors))
        path.write_bytes(build(text, t))
        counts["examples"] += 1
        got = _load(path, params, config)
        if isinstance(got, Exception):
            counts["refused"] += 1
            return
        opt, ck = got  # loaded: exactly what the metadata and the tensors say
        m = json.loads(text)["optimizer"]
        sd = opt.state_dict(ck["state"])
        assert (sd["step"], sd["num_skipped"], sd["consecutive_skips"]) == (
            m["step"], m["num_skipped"], m.get("consecutive_skips", 0))
        assert sd.get("missed", {}) == {n: c for n, c in m.get("missed", {}).items() if c}
        if m.get("averaged") is not None:
            assert sd["averaged"] == m["averaged"]
        for s, per in sd["slots"].items():
            for n, a in per.items():
                code, shape, raw = t[f"opt/{s}/{n}"]
                np.testing.assert_array_equal(a, np.frombuffer(raw, CODES[code]).reshape(
                    shape).astype(a.dtype))

    check()
    return counts


@pytest.mark.parametrize("config", list(CONFIGS))
def test_altered_checkpoints_are_refused_cleanly(tmp_path, config):
    counts = fuzz(tmp_path, config, 40)
    assert counts["refused"] >= counts["examples"] // 2, counts


@pytest.mark.slow
@pytest.mark.parametrize("config", list(CONFIGS))
def test_altered_checkpoints_are_refused_cleanly_long(tmp_path, config):
    print(f"\n{config}: {fuzz(tmp_path, config, 10_000 if config == 'adam' else 2_000)}")


# ---------------------------------------------------------------------------------------------
# named cases
# ---------------------------------------------------------------------------------------------


def _with(path, change) -> None:
    meta, tensors, _, _ = parts(path)
    m = json.loads(meta)
    change(m["optimizer"], m)
    path.write_bytes(build(json.dumps(m), tensors))


@pytest.mark.parametrize("field, value, words", [
    ("missed", "b", "'optimizer.missed' is 'b', not an object"),  # (was a bare TypeError)
    ("missed", {"b": -1}, "'optimizer.missed.b' must be an integer in [0, 2**63)"),
    ("missed", {"b": 4}, "'missed' of 'b' is 4, beyond the 3 steps"),
    ("missed", {"zz": 1}, "names unknown parameters ['zz']"),
    ("averaged", {"ema": {"w": 2**63, "b": 1}, "swa": {"w": 1, "b": 1}},
     "'optimizer.averaged.ema.w' must be an integer"),
    ("averaged", {"ema": {"w": 9, "b": 1}, "swa": {"w": 1, "b": 1}}, "beyond the 3 steps"),
    ("averaged", [], "'optimizer.averaged' is [], not an object"),
    ("consecutive_skips", -1, "'optimizer.consecutive_skips' must be an integer"),
])
def test_named_metadata_cases(tmp_path, field, value, words):
    path, params, _ = _saved(tmp_path, "adam")
    _with(path, lambda o, m: o.__setitem__(field, value))
    e = _load(path, params, "adam")
    assert isinstance(e, CheckpointError) and words in str(e), e


def test_state_fields_without_a_step_are_refused(tmp_path):
    path, params, _ = _saved(tmp_path, "adam")
    meta, tensors, _, _ = parts(path)
    m = json.loads(meta)
    m["optimizer"].update(step=None, num_skipped=None, num_nonfinite=None, slots=[],
                          consecutive_skips=0)
    del m["optimizer"]["averaged"]
    path.write_bytes(build(json.dumps(m), {k: v for k, v in tensors.items()
                                           if not k.startswith("opt")}))
    e = _load(path, params, "adam")
    assert isinstance(e, CheckpointError) and "without a step" in str(e)


def test_old_files_without_the_new_fields_load(tmp_path):
    """A file saved before ``consecutive_skips``, ``averaged`` and ``missed`` were kept
    loads: 0, inferred from the step, none."""
    path, params, state = _saved(tmp_path, "adam")
    _with(path, lambda o, m: [o.pop(k) for k in ("consecutive_skips", "averaged", "missed")])
    opt, ck = _load(path, params, "adam")
    sd = opt.state_dict(ck["state"])
    assert sd["consecutive_skips"] == 0 and "missed" not in sd and sd["step"] == state.step
    assert sd["averaged"] == {"ema": {"w": 3, "b": 3}, "swa": {"w": 2, "b": 2}}
    for s, per in opt.state_dict(state)["slots"].items():
        for n, a in per.items():
            np.testing.assert_array_equal(sd["slots"][s][n], a)


def test_another_format_version_is_refused(tmp_path):
    path, params, _ = _saved(tmp_path, "adam")
    _with(path, lambda o, m: m.__setitem__("format", "mithril-checkpoint-3"))
    e = _load(path, params, "adam")
    assert "metadata field 'format' is 'mithril-checkpoint-3'; this version reads " \
           "'mithril-checkpoint-2'" in str(e)


def test_truncated_and_corrupted_files_are_refused(tmp_path):
    path, params, _ = _saved(tmp_path, "adam")
    raw = path.read_bytes()
    rng = np.random.default_rng(3)
    cuts = [0, 7, 8, 100, len(raw) // 2, len(raw) - 1]
    flips = rng.integers(0, len(raw), 12)
    for data in [raw[:c] for c in cuts] + [
            raw[:i] + bytes([raw[i] ^ (1 << int(rng.integers(8)))]) + raw[i + 1:]
            for i in flips] + [raw + b"\0" * 8]:
        path.write_bytes(data)
        assert isinstance(_load(path, params, "adam"), CheckpointError)
    path.write_bytes(raw)
    opt, ck = _load(path, params, "adam")
    assert ck["state"].missed_counts() == {"b": 2} and ck["state"].consecutive_skips == 1
    assert set(SHAPES) == set(ck["params"]) and all(
        np.array_equal(host(ck["params"][k]), host(params[k])) for k in SHAPES)
