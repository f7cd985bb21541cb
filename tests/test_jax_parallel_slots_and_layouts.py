"""mithril.distributed.jax_parallel: the sharded JAX train step against the plain fused step
(make_train_step) on 2 CPU devices, for what tests/test_jax_parallel.py does not cover:
optimizers whose slots are not the parameters' shapes (Muon, Adafactor) with sharded state,
nonfinite="skip"'s count of skipped steps, states of another layout refused before anything
runs, and to_optimizer_state's state bound to JAX as TrainStep's.

Each test runs its script in a fresh interpreter with 2 CPU devices (float64: the sharded
step must equal the plain one to ~1e-12), which prints a JSON result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

_PRELUDE = """
import json, os, warnings
import jax
jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_enable_x64", True)
import numpy as np
import mithril as ml
from mithril.backends import JaxBackend
from mithril.cli.networks import mlp_spec
from mithril.distributed.jax_parallel import make_sharded_train_step, state_bytes_per_device
from mithril.utils.training import make_train_step
from mithril.utils import optimizers as O

def batch(t, rows=16):
    rng = np.random.default_rng(100 + t)
    return {"input": rng.normal(size=(rows, 6)), "target": rng.integers(0, 3, size=rows)}

def make(devices, shard, opt, spec=None):
    spec = spec or mlp_spec(6, 3, (8, 5))
    c = ml.compile(spec.model, JaxBackend(dtype="float64", seed=0), shapes=spec.shapes)
    step = make_train_step(c, opt, loss="loss") if devices == 0 else \\
        make_sharded_train_step(c, opt, loss="loss", devices=devices, shard_state=shard)
    return step, c.get_parameters()

def host(p):
    return {k: np.asarray(v) for k, v in p.items()}

def maxdiff(a, b):
    return max(float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])), initial=0.0))
               for k in a)
"""


def _run(body: str, timeout: float = 240) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    code = _PRELUDE + textwrap.dedent(body)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_sharded_state_of_slots_not_shaped_as_their_parameter() -> None:
    """Muon (empty fallback slots for matrices, empty momentum for vectors) and Adafactor
    (factored row/column slots) with shard_state=True: each slot is padded by its own size,
    not its parameter's (a (3, 5) weight's empty slot became 1 element: not divisible by 2;
    an (8, 1) row slot was sliced and reshaped to (8, 6))."""
    got = _run("""
    out = {}
    for name, mk in (("muon", lambda: O.Muon(0.02)), ("adafactor", lambda: O.Adafactor(0.01))):
        res = {}
        for mode in ((0, False), (2, True)):
            step, p = make(*mode, mk())
            st = step.init(p)
            for t in range(4):
                p, st, _ = step(p, st, batch(t, 16 if t != 2 else 15))
            back = step.to_optimizer_state(st, p)
            res[mode] = (host(p), {s: {n: np.asarray(back.engine.to_numpy(v))
                                       for n, v in back.slot(s).items()} for s in back.slots})
        (p0, s0), (p2, s2) = res[(0, False)], res[(2, True)]
        out[name] = [maxdiff(p0, p2), max(maxdiff(s0[s], s2[s]) for s in s0),
                     sorted(s0) == sorted(s2)]
    print(json.dumps(out))
    """)
    for name, (dp, ds, same) in got.items():
        assert dp < 1e-12 and ds < 1e-12 and same, (name, dp, ds)


def test_skipped_steps_are_counted_as_the_plain_step_counts_them() -> None:
    """nonfinite="skip": the step with a NaN input is skipped on every device, and the count
    of skipped steps (to_optimizer_state's num_skipped, the warning) is kept as by the plain
    fused step (it stayed 0, with no warning), also from a resumed state."""
    got = _run("""
    out = {}
    for mode in ((0, False), (2, False), (2, True)):
        step, p = make(*mode, O.Adam(0.05, nonfinite="skip"))
        st = step.init(p)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            for t in range(6):
                b = batch(t)
                if t in (2, 4):
                    b["input"][0, 0] = np.nan
                p, st, _ = step(p, st, b)
                jax.block_until_ready(st)  # (the warning reads a count the device has)
            back = step.to_optimizer_state(st, p)
            # resumed (from_optimizer_state keeps the count): one more skipped step
            st = step.from_optimizer_state(back)
            b = batch(9)
            b["target"] = b["target"].copy()
            b["input"][3, 1] = np.inf
            p, st, _ = step(p, st, b)
            jax.block_until_ready(st)
            p, st, _ = step(p, st, batch(10))
            again = step.to_optimizer_state(st, p)
        warned = [str(x.message) for x in w if "skipped" in str(x.message)]
        out[str(mode)] = [back.step, back.num_skipped, again.step, again.num_skipped,
                          len(warned), host(p)["mlp.linear_0.weight"].tolist()]
    print(json.dumps(out))
    """)
    ref = got["(0, False)"]
    assert ref[:4] == [4, 2, 5, 3]
    for mode in ("(2, False)", "(2, True)"):
        assert got[mode][:5] == ref[:5], (mode, got[mode][:5], ref[:5])
        assert max(abs(a - b) for ra, rb in zip(got[mode][5], ref[5])
                   for a, b in zip(ra, rb)) < 1e-12


def test_a_state_of_another_layout_is_refused_naming_its_slot() -> None:
    """shard_state=True given a replicated state (or one of a step on another device count)
    refuses it, naming the slot, the parameter and both shapes, before anything runs: the
    state stays usable (it was a bare IndivisibleError from JAX, or ran when the sizes
    happened to divide); a state of another optimizer is still refused as the plain step
    refuses it (a KeyError of the slot's name after the first fix)."""
    got = _run("""
    out = {}
    spec = mlp_spec(6, 3, (8, 5))
    for name, (src, dst) in {"replicated": ((2, False), (2, True)),
                             "two_to_one": ((2, True), (1, True)),
                             "sgd": ((2, True), (2, True))}.items():
        other, p = make(*src, O.SGD(0.1, momentum=0.9) if name == "sgd" else O.Adam(0.05))
        st = other.init(p)
        step, _ = make(*dst, O.Adam(0.05))
        try:
            step(host(p), st, batch(0))
            out[name] = ["accepted"]
        except Exception as e:
            out[name] = [type(e).__name__, str(e)]
        out[name].append(not any(x.is_deleted() for x in jax.tree.leaves(st)))
        p2, st2, _ = other(host(p), st, batch(0))  # still the other step's to use
        out[name].append(int(st2.count))
    print(json.dumps(out))
    """)
    kind, msg, alive, count = got["replicated"]
    assert kind == "ShapeError" and alive and count == 1, got
    assert "slot 'm' for 'mlp.linear_0.weight' has shape (8, 6)" in msg and "(48,)" in msg
    kind, msg, alive, count = got["two_to_one"]
    assert kind == "ShapeError" and alive and count == 1, got
    assert "'mlp.linear_1.bias' has shape (6,)" in msg and "(5,)" in msg
    kind, msg, alive, count = got["sgd"]
    assert kind == "ValueError" and "another optimizer" in msg and alive and count == 1, got


def test_to_optimizer_state_is_a_jax_state_as_the_plain_steps() -> None:
    """In this process (one device): the sharded step's to_optimizer_state is the state
    optimizer.init(params) holds on JAX, as TrainStep's is: optimizer.update continues it
    with the model's JAX params (it was bound to NumPy, and refused them)."""
    import jax.numpy as jnp
    import numpy as np

    import mithril as ml
    from mithril.backends import JaxBackend
    from mithril.cli.networks import mlp_spec
    from mithril.distributed.jax_parallel import make_sharded_train_step
    from mithril.utils.optimizers import Adam
    from mithril.utils.training import make_train_step

    spec = mlp_spec(6, 3, (8, 5))
    c = ml.compile(spec.model, JaxBackend(dtype="float32", seed=0), shapes=spec.shapes)
    rng = np.random.default_rng(0)
    data = {"input": rng.normal(size=(4, 6)).astype("float32"), "target": np.array([0, 1, 2, 0])}
    got = {}
    for which in ("plain", "sharded"):
        opt = Adam(0.1)
        step = make_train_step(c, opt, loss="loss") if which == "plain" else \
            make_sharded_train_step(c, opt, loss="loss", devices=1, shard_state=True)
        p = c.get_parameters()
        st = step.init(p)
        p, st, _ = step(p, st, data)
        back = step.to_optimizer_state(st, p)
        assert back.engine.backend.name == "jax", which
        params = {k: jnp.asarray(np.asarray(v)) for k, v in p.items()}
        grads = {k: jnp.full_like(v, 0.5) for k, v in params.items()}
        p2, st2 = opt.update(params, grads, back)
        assert st2.step == 2
        got[which] = {k: np.asarray(v) for k, v in p2.items()}
    for k in got["plain"]:
        np.testing.assert_allclose(got["sharded"][k], got["plain"][k], rtol=1e-6, atol=1e-7)
