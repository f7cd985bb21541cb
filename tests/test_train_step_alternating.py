"""Two fused JAX train steps of one model (two losses) taking turns on one optimizer state:
each takes the params and state the other returned as the steps' own (no params check, no
copy, donated: ``train_step_jax.Returned``), as one step takes its own; the checks still
refuse what is not the last return of a step of this model."""

from __future__ import annotations

import numpy as np
import pytest

import mithril as ml
from mithril.backends import JaxBackend
from mithril.utils import training
from mithril.utils.optimizers import SGD, Adam, AdamW
from mithril.utils.training import make_train_step

jax = pytest.importorskip("jax")


def two_heads(hidden: int = 8) -> ml.Model:
    m = ml.Model()
    m |= ml.Linear(hidden)(input="input", output="h0")
    m |= ml.Relu()(input="h0", output="h")
    m |= ml.Linear(1)(input="h", output="ya")
    m |= ml.Linear(2)(input="h", output="yb")
    m |= ml.MeanSquaredError()(input="ya", target="ta", output=ml.IOKey("loss_a"))
    m |= ml.MeanSquaredError()(input="yb", target="tb", output=ml.IOKey("loss_b"))
    return m


def problem(hidden: int = 8) -> tuple:
    be = JaxBackend(dtype="float32", seed=0)
    c = ml.compile(two_heads(hidden), be, shapes={"input": [4, 3]})
    rng = np.random.default_rng(0)
    data = [{"input": be.array(rng.standard_normal((4, 3), np.float32)),
             "ta": be.array(rng.standard_normal((4, 1), np.float32)),
             "tb": be.array(rng.standard_normal((4, 2), np.float32))} for _ in range(2)]
    return c, data


def host(tree: dict) -> dict:
    return {k: np.asarray(v) for k, v in tree.items()}


@pytest.mark.parametrize("make", [lambda: AdamW(1e-2, ema_decay=0.9), lambda: Adam(1e-2)])
def test_steps_in_turn_take_each_others_returns_without_check_or_copy(
        make, monkeypatch: pytest.MonkeyPatch) -> None:
    c, data = problem()
    opt = make()
    steps = [make_train_step(c, opt, loss=k) for k in ("loss_a", "loss_b")]
    params = c.get_parameters()
    start = host(params)
    state = steps[0].init(params)
    params, state, _ = steps[0](params, state, data[0])  # (the user's params: checked, copied)
    validated, refused = [], []
    real_validate, real_refuse = c._validate, training.refuse_consumed
    monkeypatch.setattr(c, "_validate", lambda *a: validated.append(1) or real_validate(*a))
    monkeypatch.setattr(training, "refuse_consumed",
                        lambda *a: refused.append(a[0]) or real_refuse(*a))
    for i in range(1, 7):
        given = list(params.values())
        params, state, out = steps[i % 2](params, state, data[i % 2])
        assert all(a.is_deleted() for a in given)  # donated, not copied first
    assert validated == [] and refused == []  # the other step's returns are the steps' own
    # the same numbers as the steps given copies (checked and copied each call)
    opt2 = make()
    ref = [make_train_step(c, opt2, loss=k) for k in ("loss_a", "loss_b")]
    p = dict(start)
    s = ref[0].init(p)
    for i in range(7):
        p, s, o = ref[i % 2]({k: jax.numpy.array(v) for k, v in host(p).items()}, s,
                             data[i % 2])
    for k, v in host(params).items():
        np.testing.assert_allclose(v, np.asarray(p[k]), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(out["loss_a"]), np.asarray(o["loss_a"]), rtol=1e-6)


def test_only_the_last_return_is_taken_and_refusals_change_nothing() -> None:
    c, data = problem()
    a = make_train_step(c, Adam(1e-2), loss="loss_a")
    b = make_train_step(c, a.optimizer, loss="loss_b")
    p0 = c.get_parameters()
    p1, s1, _ = a(p0, a.init(p0), data[0])
    p2, s2, _ = b(p1, s1, data[1])
    # what a returned was consumed by b: refused by name, not handed to the runtime
    with pytest.raises(TypeError, match=r"opt_state.*consumed by an earlier step"):
        a(p1, s1, data[0])
    # a state of another optimizer, on this model's params: refused by its slots
    with pytest.raises(ValueError, match="state of another optimizer"):
        make_train_step(c, SGD(1e-2, momentum=0.9), loss="loss_b")(p2, s2, data[0])
    # a step of another model (other shapes) checks them as the user's: refused by name
    other, _ = problem(hidden=5)
    o = make_train_step(other, Adam(1e-2), loss="loss_a")
    with pytest.raises(ml.ShapeError, match="weight"):
        o(p2, o.init(other.get_parameters()), data[0])
    # bad data for b (a (4, 3) target for its (4, 2) head: they do not broadcast): refused,
    # and nothing of the state consumed
    with pytest.raises(ml.ShapeError):
        b(p2, s2, {**data[0], "tb": data[0]["input"]})
    assert not any(v.is_deleted() for v in p2.values())
    p3, s3, out = a(p2, s2, data[0])  # the refused calls changed nothing
    assert np.isfinite(float(out["loss_a"])) and int(s3.count) == 3


def test_skipped_steps_in_turn_are_read_without_a_host_read_per_call_and_warned_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from mithril.utils import train_step_jax

    c, data = problem()
    opt = Adam(1e-2, nonfinite="skip")
    steps = [make_train_step(c, opt, loss=k) for k in ("loss_a", "loss_b")]
    params = c.get_parameters()
    state = steps[0].init(params)
    reads = []
    real = train_step_jax._counts
    monkeypatch.setattr(train_step_jax, "_counts", lambda *a: reads.append(1) or real(*a))
    for i in range(5):
        params, state, _ = steps[i % 2](params, state, data[i % 2])
        jax.block_until_ready(state)
    assert len(reads) == 1  # the init state's only: the other step's return continues it
    bad = {**data[0], "input": data[0]["input"] * np.nan}
    with pytest.warns(RuntimeWarning) as got:
        params, state, _ = steps[1](params, state, bad)  # skipped
        for i in range(4):
            jax.block_until_ready(state)
            params, state, _ = steps[i % 2](params, state, data[i % 2])
    assert [str(w.message) for w in got] == [
        "Adam: 1 step(s) skipped (a non-finite gradient, or non-finite params or state after "
        "the step); params and optimizer state unchanged by them (1 in all)"]
