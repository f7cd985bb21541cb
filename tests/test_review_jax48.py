"""Review as a JAX-native user (jax48): a compiled model's ``evaluate`` under ``jax.jit``,
``grad``, ``value_and_grad``, ``vmap`` (per-example gradients), ``checkpoint`` and
``lax.scan``; a user's own jitted loop with optax; ``make_train_step`` against a jitted optax
step (numbers, compiles counted with ``jax_log_compiles``, donation); Dropout seeded by a
JAX PRNG key; params and batches placed on a mesh of two CPU devices. Every number is
checked against plain JAX + optax run side by side: float64 to 1e-12, float32 to 1e-6."""

from __future__ import annotations

import functools
import json
import logging

import conftest
import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
optax = pytest.importorskip("optax")

import mithril as ml  # noqa: E402
from mithril.backends import JaxBackend  # noqa: E402
from mithril.utils.optimizers import Adam, AdamW  # noqa: E402
from mithril.utils.training import make_train_step  # noqa: E402

TOL64, TOL32 = 1e-12, 1e-6


def mlp(backend, dropout: float | None = None, n_in: int = 5):
    model = ml.Model()
    model |= ml.Linear(8)(input="input", output="h")
    model |= ml.Tanh()(input="h", output="a")
    last = "a"
    if dropout is not None:
        model |= ml.Dropout(dropout)(input="a", output="d")
        last = "d"
    model |= ml.Linear(3)(input=last, output="logits")
    model |= ml.CrossEntropy()(input="logits", target="target", output=ml.IOKey("loss"))
    return ml.compile(model, backend, shapes={"input": [None, n_in]})


def ref_loss(p, x, y):
    """The same MLP in plain JAX (torch's Linear layout: ``x @ W.T + b``)."""
    h = jnp.tanh(x @ p["linear_0.weight"].T + p["linear_0.bias"])
    logits = h @ p["linear_1.weight"].T + p["linear_1.bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)).max())
               for k in a)


class Compiles(logging.Handler):
    """Counts XLA compiles (``jax_log_compiles``'s "Finished XLA compilation" records)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Finished XLA compilation"):
            self.n += 1


@pytest.fixture
def compiles():
    handler, log = Compiles(), logging.getLogger("jax")
    log.addHandler(handler)
    old = jax.config.jax_log_compiles
    jax.config.update("jax_log_compiles", True)
    try:
        yield handler
    finally:
        jax.config.update("jax_log_compiles", old)
        log.removeHandler(handler)


def data(n: int = 16, seed: int = 0, n_in: int = 5):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, n_in)), rng.integers(0, 3, n).astype(np.int32)


# -- JAX's transformations over evaluate -------------------------------------------------------
def test_jax_transformations_of_evaluate_equal_plain_jax_float64():
    with conftest.jax_float64():
        c = mlp(JaxBackend(dtype="float64"))
        params = c.get_parameters()
        xs, ys = data()
        x, y = jnp.asarray(xs), jnp.asarray(ys)

        def loss(p, x, y):
            return c.evaluate(p, {"input": x, "target": y})["loss"]

        want_l, want_g = jax.value_and_grad(ref_loss)(params, x, y)
        assert abs(float(jax.jit(loss)(params, x, y)) - float(want_l)) <= TOL64
        for name, f in [("grad", jax.grad(loss)), ("jit(grad)", jax.jit(jax.grad(loss))),
                        ("grad(checkpoint)", jax.grad(jax.checkpoint(loss)))]:
            assert max_diff(f(params, x, y), want_g) <= TOL64, name
        got_l, got_g = jax.jit(jax.value_and_grad(loss))(params, x, y)
        assert abs(float(got_l) - float(want_l)) <= TOL64 and max_diff(got_g, want_g) <= TOL64
        # per-example gradients: vmap over examples of a batch of one
        per = jax.vmap(jax.grad(lambda p, a, b: loss(p, a[None], b[None])), (None, 0, 0))
        per_ref = jax.vmap(jax.grad(lambda p, a, b: ref_loss(p, a[None], b[None])), (None, 0, 0))
        got, want = per(params, x, y), per_ref(params, x, y)
        assert got["linear_0.weight"].shape == (16, 8, 5) and max_diff(got, want) <= TOL64

        # a user's SGD loop as one lax.scan over 4 batches
        def body(loss_fn):
            def f(p, batch):
                value, g = jax.value_and_grad(loss_fn)(p, *batch)
                return jax.tree.map(lambda a, b: a - 0.5 * b, p, g), value
            return f

        batches = (x.reshape(4, 4, 5), y.reshape(4, 4))
        p_got, l_got = jax.lax.scan(body(loss), params, batches)
        p_want, l_want = jax.lax.scan(body(ref_loss), params, batches)
        assert float(jnp.abs(l_got - l_want).max()) <= TOL64 and max_diff(p_got, p_want) <= TOL64
        assert float(l_got[-1]) != float(l_got[0])  # the loop moved the params


def test_a_users_jitted_loop_with_optax_equals_plain_jax_float64(compiles):
    with conftest.jax_float64():
        c = mlp(JaxBackend(dtype="float64"))
        tx = optax.adamw(1e-2, weight_decay=1e-2)

        def make(loss_fn):
            @jax.jit
            def step(p, s, x, y):
                value, g = jax.value_and_grad(loss_fn)(p, x, y)
                u, s = tx.update(g, s, p)
                return optax.apply_updates(p, u), s, value
            return step

        ours = make(lambda p, x, y: c.evaluate(p, {"input": x, "target": y})["loss"])
        theirs = make(ref_loss)
        p, q = c.get_parameters(), c.get_parameters()
        s, t = tx.init(p), tx.init(q)
        for i in range(6):
            xs, ys = data(seed=i)
            before = compiles.n
            p, s, lp = ours(p, s, jnp.asarray(xs), jnp.asarray(ys))
            if i > 0:  # a steady loop compiles nothing
                assert compiles.n == before, f"step {i} compiled {compiles.n - before}"
            q, t, lq = theirs(q, t, jnp.asarray(xs), jnp.asarray(ys))
            assert abs(float(lp) - float(lq)) <= TOL64
        assert max_diff(p, q) <= TOL64 and max_diff(p, c.get_parameters()) > 1e-3


# -- make_train_step -----------------------------------------------------------------------------
def test_train_step_equals_jitted_optax_and_a_steady_loop_compiles_nothing(compiles):
    with conftest.jax_float64():
        c = mlp(JaxBackend(dtype="float64"))
        tx = optax.adamw(1e-2, weight_decay=1e-2)

        @jax.jit
        def theirs(p, s, x, y):
            value, g = jax.value_and_grad(ref_loss)(p, x, y)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s, value

        step = make_train_step(c, AdamW(learning_rate=1e-2, weight_decay=1e-2), loss="loss")
        p = c.get_parameters()
        s = step.init(p)
        assert jax.tree_util.tree_leaves(s)  # the fused step's state is a pytree of arrays
        q, t = c.get_parameters(), tx.init(c.get_parameters())
        counts = []
        # jnp batches, then NumPy ones (host arrays the backend commits: one more program),
        # then both in turn: nothing more compiles
        for i, kind in enumerate(["jnp"] * 4 + ["np"] * 2 + ["jnp", "np"]):
            xs, ys = data(seed=i)
            batch = ({"input": jnp.asarray(xs), "target": jnp.asarray(ys)} if kind == "jnp"
                     else {"input": xs, "target": ys})
            before = compiles.n
            p, s, out = step(p, s, batch)
            counts.append(compiles.n - before)
            q, t, lq = theirs(q, t, jnp.asarray(xs), jnp.asarray(ys))
            assert abs(float(out["loss"]) - float(lq)) <= TOL64
        assert step.fused and counts[1:4] == [0, 0, 0] and counts[5:] == [0, 0, 0], counts
        assert max_diff(p, q) <= TOL64
        assert all(v.dtype == jnp.float64 for v in p.values())


def test_float32_train_step_stays_float32_with_x64_on_and_equals_optax(compiles):
    # x64 on for the process (a float64 backend elsewhere): a float32 model's step keeps
    # float32 params and state, and its numbers are optax's in float32
    with conftest.jax_float64():
        c = mlp(JaxBackend())
        step = make_train_step(c, Adam(learning_rate=1e-2), loss="loss")
        tx = optax.adam(1e-2)

        @jax.jit
        def theirs(p, s, x, y):
            g = jax.grad(ref_loss)(p, x, y)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        p = c.get_parameters()
        s = step.init(p)
        q, t = c.get_parameters(), tx.init(c.get_parameters())
        for i in range(4):
            xs, ys = data(seed=i)
            p, s, _ = step(p, s, {"input": xs, "target": ys})  # float64 host data: cast
            q, t = theirs(q, t, jnp.asarray(xs, jnp.float32), jnp.asarray(ys))
        assert {v.dtype for v in p.values()} == {np.dtype(np.float32)}
        assert {v.dtype for v in jax.tree_util.tree_leaves(s.slots)} == {np.dtype(np.float32)}
        assert max_diff(p, q) <= TOL32


def test_reusing_a_donated_array_is_a_named_type_error_and_changes_nothing():
    c = mlp(JaxBackend())
    step = make_train_step(c, Adam(learning_rate=1e-2), loss="loss")
    xs, ys = data()
    batch = {"input": xs, "target": ys}
    p = c.get_parameters()
    s = step.init(p)
    p, s, _ = step(p, s, batch)
    old_p, old_s = p, s
    p, s, _ = step(p, s, batch)  # consumes old_p and old_s
    assert old_p["linear_0.weight"].is_deleted()
    kept = {k: np.asarray(v).copy() for k, v in p.items()}
    with pytest.raises(TypeError, match=r"params\['linear_0.bias'\] is a deleted JAX array"):
        step(old_p, s, batch)
    with pytest.raises(TypeError, match=r"opt_state.* is a deleted JAX array"):
        step(p, old_s, batch)
    assert max_diff(p, kept) == 0.0 and int(s.count) == 2  # nothing consumed by the refusals
    p, s, _ = step(p, s, batch)
    assert int(s.count) == 3


# -- Dropout and JAX PRNG keys -------------------------------------------------------------------
def test_a_jax_prng_key_is_taken_as_the_backend_seed():
    # JaxBackend(seed=jax.random.PRNGKey(7)) was a bare TypeError ("Only scalar arrays can be
    # converted to Python scalars"); a key now stands for its seed: the same initial params
    # and the same Dropout masks as seed 7
    xs, ys = data()
    batch = {"input": jnp.asarray(xs, jnp.float32), "target": jnp.asarray(ys)}
    runs = []
    for seed in (7, jax.random.PRNGKey(7), jax.random.key(7)):
        c = mlp(JaxBackend(seed=seed), dropout=0.5)
        assert c.seed == 7
        p = c.get_parameters()
        runs.append((p, [float(c.evaluate(p, batch)["loss"]) for _ in range(3)]))
    for p, losses in runs[1:]:
        assert max_diff(p, runs[0][0]) == 0.0 and losses == runs[0][1]
    assert len(set(runs[0][1])) == 3  # a new mask every training step
    other = mlp(JaxBackend(seed=jax.random.PRNGKey(8)), dropout=0.5)
    assert max_diff(other.get_parameters(), runs[0][0]) > 0
    # keys that stand for no one seed are refused by name, and a refused set_seed keeps it
    backend = JaxBackend(seed=7)
    draw = backend.randn(3)
    for bad, what in [(jax.random.key(0, impl="rbg"), "key data of shape \\[4\\]"),
                      (jax.random.split(jax.random.key(0), 2), "a batch of keys of shape \\[2\\]"),
                      (jnp.arange(3), "got an array of int32\\[3\\]")]:
        with pytest.raises(TypeError, match="seed: .*" + what):
            backend.set_seed(bad)
    assert backend.seed == 7 and np.array_equal(np.asarray(backend.randn(3)),
                                                np.asarray(JaxBackend(seed=7).randn(6))[3:])
    assert not np.array_equal(np.asarray(draw), np.asarray(backend.randn(3)))
    # compiled.seed = key (was NotImplementedError from a key's astype)
    c = mlp(JaxBackend(seed=0), dropout=0.5)
    c.seed = jax.random.PRNGKey(7)
    p = runs[0][0]
    assert [float(c.evaluate(p, batch)["loss"]) for _ in range(3)] == runs[0][1]


def test_a_key_or_a_float_as_the_dropout_step_is_refused_by_name():
    # a key as step= was JAX's "Cannot convert_element_type from key<fry> to uint32"; a
    # float step array was truncated silently
    c = mlp(JaxBackend(seed=0), dropout=0.5)
    p = c.get_parameters()
    xs, ys = data()
    batch = {"input": jnp.asarray(xs, jnp.float32), "target": jnp.asarray(ys)}
    for bad, what in [(jax.random.key(1), r"key<fry>\[\]"), (jax.random.PRNGKey(1), r"uint32\[2\]"),
                      (jnp.asarray(1.5), r"float32\[\]")]:
        with pytest.raises(TypeError, match=r"evaluate\(step=\.\.\.\) must be an int .*" + what):
            c.evaluate(p, batch, step=bad)
        with pytest.raises(TypeError, match=r"evaluate\(step=\.\.\.\)"):
            jax.jit(lambda p, k: c.evaluate(p, batch, step=k)["loss"])(p, bad)
    assert c.step == 0
    # a traced integer step: one program, reproducible, a new mask per step
    f = jax.jit(lambda p, k: c.evaluate(p, batch, step=k)["loss"])
    got = [float(f(p, k)) for k in (0, 1, 0, 1)]
    want = [float(c.evaluate(p, batch, step=k)["loss"]) for k in (0, 1)]
    assert got == want * 2 and want[0] != want[1] and f._cache_size() == 1


# -- params and batches on a mesh --------------------------------------------------------------
MESH = r'''
import json
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import mithril as ml
from mithril.backends import JaxBackend
from mithril.distributed.jax_parallel import make_sharded_train_step
from mithril.utils.optimizers import Adam
from mithril.utils.training import make_train_step

assert jax.device_count() == 2
model = ml.Model()
model |= ml.Linear(4)(input="input", output="logits")
model |= ml.CrossEntropy()(input="logits", target="target", output=ml.IOKey("loss"))
c = ml.compile(model, JaxBackend(dtype="float64"), shapes={"input": [None, 6]})
rng = np.random.default_rng(0)
x, y = rng.standard_normal((8, 6)), rng.integers(0, 4, 8).astype(np.int32)
mesh = Mesh(np.array(jax.devices()), ("d",))

def ref(p, x, y):
    lg = x @ p["linear.weight"].T + p["linear.bias"]
    return optax.softmax_cross_entropy_with_integer_labels(lg, y).mean()

def diff(a, b):
    return max(float(np.abs(np.asarray(a[k]) - np.asarray(b[k])).max()) for k in b)

res = {}
p0 = c.get_parameters()
want_l, want_g = jax.value_and_grad(ref)(p0, jnp.asarray(x), jnp.asarray(y))
# params split over the mesh (tensor-parallel), host data and cotangent on one device
ps = jax.device_put(p0, NamedSharding(mesh, P("d")))
out, g = c.evaluate(ps, {"input": x, "target": y}, output_gradients={"loss": 1.0})
res["tp_loss"] = abs(float(out["loss"]) - float(want_l))
res["tp_grad"] = diff(g, want_g)
# get_parameters() (one device) with a batch split over the mesh (data-parallel by hand)
xs = jax.device_put(jnp.asarray(x), NamedSharding(mesh, P("d")))
ys = jax.device_put(jnp.asarray(y), NamedSharding(mesh, P("d")))
out, g = c.evaluate(p0, {"input": xs, "target": ys}, output_gradients={"loss": 1.0})
res["dp_grad"] = diff(g, want_g)
# make_train_step on the split params: optax's numbers, the params stay split
tx = optax.adam(1e-2)
q, t = dict(p0), tx.init(p0)
step = make_train_step(c, Adam(1e-2), loss="loss")
p, s = dict(ps), step.init(ps)
for _ in range(3):
    u, t = tx.update(jax.grad(ref)(q, jnp.asarray(x), jnp.asarray(y)), t, q)
    q = optax.apply_updates(q, u)
    p, s, out = step(p, s, {"input": xs, "target": ys})
res["step"] = diff(p, q)
res["step_spec"] = p["linear.weight"].sharding.spec == P("d")
# evaluate the params a data-parallel step returned (replicated on its mesh) on host data
c2 = ml.compile(model, JaxBackend(dtype="float64"), shapes={"input": [None, 6]})
dstep = make_sharded_train_step(c2, Adam(1e-2), loss="loss", devices=2)
p2 = c2.get_parameters()
s2 = dstep.init(p2)
p2, s2, out = dstep(p2, s2, {"input": x, "target": y})
val = c2.evaluate(p2, {"input": x, "target": y})["loss"]
res["dp_eval"] = abs(float(val) - float(ref(jax.device_get(p2), jnp.asarray(x), jnp.asarray(y))))
# Adam.update (its CPU engine) on params split over the mesh: optax's numbers, or the error
opt = Adam(1e-2)
try:
    st = opt.init(ps)
    new, st = opt.update(ps, g_split := jax.device_put(want_g, NamedSharding(mesh, P("d"))), st)
    u, _ = tx.update(g_split, tx.init(p0), p0)
    res["update"] = diff(new, optax.apply_updates(p0, u))
except TypeError as e:
    res["update"] = str(e)
# a backend given a device commits its arrays there: they follow the mesh all the same
c3 = ml.compile(model, JaxBackend(dtype="float64", device="cpu"), shapes={"input": [None, 6]})
assert c3.get_parameters()["linear.weight"].committed
val = c3.evaluate(ps, {"input": x, "target": y})["loss"]
res["dev_eval"] = abs(float(val) - float(want_l))
print(json.dumps(res))
'''


@functools.lru_cache(maxsize=1)
def mesh_results() -> dict:
    """What :data:`MESH` measured, in a process with two CPU devices (run once)."""
    out = conftest.run_python(MESH, env={
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_ENABLE_X64": "1"})
    return json.loads(out.strip().splitlines()[-1])


def test_params_and_batches_on_a_two_device_mesh_float64():
    # evaluate on params placed on a mesh (split with jax.device_put, or returned by
    # make_sharded_train_step) with NumPy data was JAX's "Received incompatible devices for
    # jitted computation" (the data, constants and cotangent committed to device 0), and so
    # was make_train_step on split params (the state's count committed to device 0)
    res = mesh_results()
    for k in ("tp_loss", "tp_grad", "dp_grad", "step", "dp_eval"):
        assert res[k] <= TOL64, (k, res[k])
    assert res["step_spec"] is True and res["dev_eval"] <= TOL64


# -- waiting for files outside jax48's list ------------------------------------------------------
def test_optimizer_update_on_params_split_over_a_mesh_equals_optax():
    res = mesh_results()["update"]
    assert not isinstance(res, str), res  # now: "gradients['linear.bias'] cannot be read as..."
    assert res <= TOL64


def test_optimizer_update_inside_jax_jit_names_the_jittable_way():
    opt = Adam(learning_rate=1e-2)
    params = {"w": jnp.ones((3, 2))}
    grads = {"w": jnp.full((3, 2), 0.5)}
    with pytest.raises(TypeError, match="optax_transformation"):
        jax.jit(lambda p, g: opt.update(p, g, opt.init(p)))(params, grads)


def test_the_train_step_under_jax_jit_is_refused_by_name_and_changes_nothing():
    # jax.jit(step) was JAX's ConcretizationTypeError ("The is_deleted() method was called on
    # traced array"), naming nothing of the step
    c = mlp(JaxBackend(), dropout=0.5)
    step = make_train_step(c, Adam(learning_rate=1e-2), loss="loss")
    xs, ys = data()
    batch = {"input": jnp.asarray(xs, jnp.float32), "target": jnp.asarray(ys)}
    p = c.get_parameters()
    s = step.init(p)
    kept = {k: np.asarray(v).copy() for k, v in p.items()}
    with pytest.raises(TypeError, match=r"opt_state.count is a JAX tracer: the train step was "
                                        r"called inside a JAX transformation.*optax_transformation"):
        jax.jit(step)(p, s, batch)
    assert c.step == 0 and int(s.count) == 0 and max_diff(p, kept) == 0.0
    p, s, _ = step(p, s, batch)
    assert c.step == 1 and int(s.count) == 1


def test_optax_transformation_in_a_users_jit_equals_optax_float64():
    # the jittable way the refusals point at: compiled.evaluate + optax_transformation
    from mithril.interop import optax_transformation

    with conftest.jax_float64():
        c = mlp(JaxBackend(dtype="float64"))
        ours_tx = optax_transformation(AdamW(learning_rate=1e-2, weight_decay=1e-2))
        theirs_tx = optax.adamw(1e-2, weight_decay=1e-2)

        def make(tx, loss_fn):
            @jax.jit
            def step(p, s, x, y):
                g = jax.grad(loss_fn)(p, x, y)
                u, s = tx.update(g, s, p)
                return optax.apply_updates(p, u), s
            return step

        ours = make(ours_tx, lambda p, x, y: c.evaluate(p, {"input": x, "target": y})["loss"])
        theirs = make(theirs_tx, ref_loss)
        p, q = c.get_parameters(), c.get_parameters()
        s, t = ours_tx.init(p), theirs_tx.init(q)
        for i in range(5):
            xs, ys = data(seed=i)
            p, s = ours(p, s, jnp.asarray(xs), jnp.asarray(ys))
            q, t = theirs(q, t, jnp.asarray(xs), jnp.asarray(ys))
        assert max_diff(p, q) <= TOL64 and max_diff(p, c.get_parameters()) > 1e-3
        assert ours._cache_size() == 1


def test_a_float64_model_with_x64_turned_off_is_refused_by_name():
    # with jax_enable_x64 turned off after the float64 backend turned it on, evaluate ran the
    # float64 model in float32 (JAX's truncation warnings aside): a float32 loss, 6.8e-9 off
    from mithril.errors import DTypeError

    with conftest.jax_float64():
        backend = JaxBackend(dtype="float64")
        c = mlp(backend, dropout=0.5)
        p = c.get_parameters()
        xs, ys = data()
        want = float(c.evaluate(p, {"input": xs, "target": ys}, step=0)["loss"])
        with jax.enable_x64(False):
            for call in (lambda: c.evaluate(p, {"input": xs, "target": ys}),
                         lambda: c.evaluate(p, {"input": jnp.asarray(xs), "target": ys},
                                            output_gradients={"loss": 1.0}),
                         lambda: backend.array(xs)):
                with pytest.raises(DTypeError, match=r"JaxBackend\(dtype='float64'\) .* needs "
                                                     r"jax_enable_x64, now off"):
                    call()
        assert c.step == 0  # the refused training-mode calls drew no masks
        got = float(c.evaluate(p, {"input": xs, "target": ys})["loss"])
        assert got == want and c.step == 1


def test_train_step_dropout_draws_step_i_mask_reproducibly_from_a_key_seed():
    # each fused step draws the mask of its step (evaluate(step=i) on the params it was
    # given), a new one every step, and a run seeded by a key is that of its seed
    xs, ys = data()
    batch = {"input": jnp.asarray(xs, jnp.float32), "target": jnp.asarray(ys)}
    runs = []
    for seed in (3, jax.random.PRNGKey(3)):
        c = mlp(JaxBackend(seed=seed), dropout=0.5)
        step = make_train_step(c, Adam(learning_rate=1e-2), loss="loss")
        p = c.get_parameters()
        s = step.init(p)
        losses, replayed = [], []
        for i in range(4):
            replayed.append(float(c.evaluate(p, batch, step=i)["loss"]))
            p, s, out = step(p, s, batch)
            losses.append(float(out["loss"]))
        assert max(abs(a - b) for a, b in zip(losses, replayed)) <= TOL32
        runs.append((losses, {k: np.asarray(v) for k, v in p.items()}))
        assert c.step == 4
    assert runs[0][0] == runs[1][0] and max_diff(runs[0][1], runs[1][1]) == 0.0
    no_drop = mlp(JaxBackend(seed=3))
    same = float(no_drop.evaluate(no_drop.get_parameters(), batch)["loss"])
    assert abs(runs[0][0][0] - same) > 1e-3  # the same first params: the mask did something


def test_a_users_donating_jit_leaves_the_models_parameters_alive():
    c = mlp(JaxBackend())
    p = c.get_parameters()
    first = {k: np.asarray(v).copy() for k, v in p.items()}
    halve = jax.jit(lambda p: jax.tree.map(lambda a: a * 0.5, p), donate_argnums=0)
    p = halve(p)
    assert max_diff(c.get_parameters(), first) == 0.0


def test_separate_calls_on_the_jitted_engine_compile_only_at_the_first_step(compiles):
    # the accelerators' path (the jitted JaxEngine) with get_parameters()' arrays: committed
    # to the device, the second step compiled once more (their outputs' placement changed)
    with conftest.optimizer_engine("jax-jit"):
        c = mlp(JaxBackend())
        opt = Adam(learning_rate=1e-2)
        tx = optax.adam(1e-2)
        p = c.get_parameters()
        s = opt.init(p)
        q, t = c.get_parameters(), tx.init(c.get_parameters())
        xs, ys = data()
        batch = {"input": jnp.asarray(xs, jnp.float32), "target": jnp.asarray(ys)}
        counts = []
        for _ in range(4):
            before = compiles.n
            _, g = c.evaluate(p, batch, output_gradients={"loss": 1.0})
            p, s = opt.update(p, g, s)
            counts.append(compiles.n - before)
            u, t = tx.update(jax.grad(ref_loss)(q, batch["input"], batch["target"]), t, q)
            q = optax.apply_updates(q, u)
        assert type(s.engine).__name__ == "JaxEngine" and counts[1:] == [0, 0, 0], counts
        assert max_diff(p, q) <= TOL32


def test_dropout_in_a_users_jit_without_step_warns():
    c = mlp(JaxBackend(), dropout=0.5)
    p = c.get_parameters()
    xs, ys = data()
    f = jax.jit(lambda p, x, y: c.evaluate(p, {"input": x, "target": y})["loss"])
    x, y = jnp.asarray(xs, jnp.float32), jnp.asarray(ys)
    assert float(f(p, x, y)) == float(f(p, x, y))  # the same mask twice, silently
    with pytest.warns(UserWarning, match=r"step="):
        jax.jit(lambda p, x, y: c.evaluate(p, {"input": x, "target": y})["loss"])(p, x, y)
