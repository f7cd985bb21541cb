"""Checkpoints of a gradient-accumulation run saved mid-window (``Accumulate``): the resumed
run equals the unbroken one to the bit, and both equal ``optax.MultiSteps`` over
``optax.adam`` run side by side; a window's micro-batches are never dropped silently, and
edited window metadata is refused, naming the field."""

from __future__ import annotations

import json

import numpy as np
import optax
import pytest
from test_checkpoint_faults import build, parts

from mithril.backends import NumpyBackend, TorchBackend
from mithril.errors import CheckpointError
from mithril.utils.accumulation import Accumulate, AccumulateState
from mithril.utils.checkpoint import load_checkpoint, save_checkpoint
from mithril.utils.optimizers import Adam

K, STEPS, CUT = 4, 14, 6  # the cut falls after 2 micro-batches of the second window


def _grads(t: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(t)
    return {"w": rng.standard_normal((3, 2)), "b": rng.standard_normal(2)}


def _start() -> dict[str, np.ndarray]:
    return {"w": np.full((3, 2), 0.5), "b": np.full(2, -0.25)}


def _run(be, acc, params, state, start, stop):
    for t in range(start, stop):
        params, state = acc.update(params, {k: be.array(v) for k, v in _grads(t).items()},
                                   state, weight=1.0 + t % 3)
    return params, state


@pytest.mark.parametrize("backend", [NumpyBackend, TorchBackend])
def test_resume_mid_window_is_exact_and_matches_optax_multisteps(backend, tmp_path):
    be = backend(dtype="float64")
    acc = Accumulate(Adam(learning_rate=0.01), K)
    p0 = {k: be.array(v) for k, v in _start().items()}
    full, _ = _run(be, acc, p0, acc.init(p0), 0, STEPS)

    acc1 = Accumulate(Adam(learning_rate=0.01), K)
    p, st = _run(be, acc1, p0, acc1.init(p0), 0, CUT)
    assert st.micro_step == CUT % K
    save_checkpoint(tmp_path / "ck", p, acc1, st)
    acc2 = Accumulate(Adam(learning_rate=0.3), 2)  # both restored from the file
    got = load_checkpoint(tmp_path / "ck", p, acc2)
    assert acc2.k == K and acc2.get_learning_rate() == 0.01
    assert isinstance(got["state"], AccumulateState) and got["state"].micro_step == CUT % K
    resumed, _ = _run(be, acc2, got["params"], got["state"], CUT, STEPS)
    for k in full:
        np.testing.assert_array_equal(be.to_numpy(resumed[k]), be.to_numpy(full[k]), err_msg=k)

    # optax's MultiSteps over adam, the same weighted micro-batches (scaled so that its
    # plain mean is our weighted one)
    tx = optax.MultiSteps(optax.adam(0.01), every_k_schedule=K)
    params = {k: v.copy() for k, v in _start().items()}
    ostate = tx.init(params)
    for w0 in range(0, STEPS - STEPS % K, K):
        ws = [1.0 + t % 3 for t in range(w0, w0 + K)]
        for t, w in zip(range(w0, w0 + K), ws):
            g = {k: v * (w * K / sum(ws)) for k, v in _grads(t).items()}
            upd, ostate = tx.update(g, ostate, params)
            params = optax.apply_updates(params, upd)
    mid, _ = _run(be, Accumulate(Adam(learning_rate=0.01), K), p0,
                  Accumulate(Adam(learning_rate=0.01), K).init(p0), 0, STEPS - STEPS % K)
    for k in params:
        # (optax in float32, JAX's default)
        np.testing.assert_allclose(be.to_numpy(mid[k]), np.asarray(params[k]), rtol=2e-6,
                                   atol=1e-7, err_msg=k)


def test_buffered_micro_batches_are_not_dropped_silently(tmp_path):
    be = NumpyBackend(dtype="float64")
    acc = Accumulate(Adam(learning_rate=0.01), K)
    p0 = _start()
    p, st = _run(be, acc, p0, acc.init(p0), 0, CUT)
    save_checkpoint(tmp_path / "ck", p, acc, st)
    plain = Adam(learning_rate=0.3)
    with pytest.raises(ValueError, match=r"holds 2 buffered micro-batch\(es\) of an "
                                         r"Accumulate\(k=4\): load it with optimizer="):
        load_checkpoint(tmp_path / "ck", p, plain)
    assert plain.learning_rate == 0.3
    # at a window's end nothing is buffered: the plain optimizer takes the state
    p, st = _run(be, acc, p, st, CUT, 2 * K)
    save_checkpoint(tmp_path / "end", p, acc, st)
    assert load_checkpoint(tmp_path / "end", p, Adam())["state"].step == 2
    # and a plain checkpoint loads into an Accumulate with an empty window
    save_checkpoint(tmp_path / "plain", p, acc.optimizer, st.inner)
    got = load_checkpoint(tmp_path / "plain", p, Accumulate(Adam(), 3))
    assert got["state"].micro_step == 0 and got["state"].step == 2


@pytest.mark.parametrize("field,value,msg", [
    ("count", 4, r"'accumulate.count' is 4, not an integer in \[0, k\)"),
    ("k", 0, r"'accumulate.k' is 0, not an integer >= 1"),
    ("total_weight", 0.0, r"'accumulate.total_weight' is 0.0"),
    ("grads", {}, r"'accumulate.grads' must map parameters"),
])
def test_edited_window_metadata_is_refused(tmp_path, field, value, msg):
    be = NumpyBackend(dtype="float64")
    acc = Accumulate(Adam(learning_rate=0.01), K)
    p0 = _start()
    p, st = _run(be, acc, p0, acc.init(p0), 0, CUT)
    save_checkpoint(tmp_path / "ck", p, acc, st)
    meta, tensors, _, _ = parts(tmp_path / "ck")
    meta = json.loads(meta)
    meta["accumulate"][field] = value
    if field == "grads":  # (the tensors too, or the table check answers first)
        tensors = {k: v for k, v in tensors.items() if not k.startswith("accumulate/")}
    (tmp_path / "bad").write_bytes(build(json.dumps(meta), tensors))
    fresh = Accumulate(Adam(learning_rate=0.3), 2)
    with pytest.raises(CheckpointError, match=msg):
        load_checkpoint(tmp_path / "bad", p, fresh)
    assert fresh.k == 2 and fresh.get_learning_rate() == 0.3
