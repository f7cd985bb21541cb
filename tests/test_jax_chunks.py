"""The jitted JAX engine's chunked slots (``engines/jax_chunks.py``): the chunk policy, the
mapping ``state.slots`` holds, and steps over large and small tensors against optax and
the NumPy engine. (Every other jax-jit test runs with a 10-element threshold: conftest.)"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import optimizer_engine

from mithril.utils.optimizers import LAMB, SGD, Adam, AdamW
from mithril.utils.optimizers.engines import jax_chunks
from mithril.utils.optimizers.engines.jax_chunks import ChunkedSlots, chunk_bounds
from mithril.utils.optimizers.layout import Layout

BIG = 1 << 13


@pytest.fixture
def real_threshold(monkeypatch):
    monkeypatch.setattr(jax_chunks, "CHUNK_MIN", BIG)


def test_bounds_cpu_and_gpu(real_threshold):
    sizes = [5, BIG + 3, 3, 7, BIG, 2]
    lay = Layout(tuple(f"p{i}" for i in range(6)), tuple((s,) for s in sizes), "float32")
    off = np.concatenate([[0], np.cumsum(sizes)])
    span = [(i, int(off[i]), int(off[i + 1])) for i in range(6)]
    # each large tensor alone, then every small one (wherever it lies) in one chunk
    assert chunk_bounds(lay, "cpu") == ((span[1],), (span[4],), (span[0], span[2], span[3],
                                                                 span[5]))
    assert chunk_bounds(lay, "gpu") == (tuple(span),)
    big_only = Layout(("a", "b"), ((BIG,), (2, BIG)), "float32")
    assert chunk_bounds(big_only, "cpu") == (((0, 0, BIG),), ((1, BIG, 3 * BIG),))
    small_only = Layout(("a", "b"), ((3,), (2, 2)), "float32")
    assert chunk_bounds(small_only, "cpu") == (((0, 0, 3), (1, 3, 7)),)
    assert chunk_bounds(Layout((), (), "float32"), "cpu") == ((),)


def test_bounds_of_accelerators_in_runs(monkeypatch):
    """``CHUNK_TENSORS`` (``MITHRIL_JAX_CHUNK_TENSORS``): an accelerator's layout in runs of
    that many consecutive tensors; unset, one chunk."""
    lay = Layout(tuple(f"p{i}" for i in range(5)), ((3,), (2, 2), (), (5,), (1,)), "float32")
    off = np.concatenate([[0], np.cumsum([3, 4, 1, 5, 1])])
    span = [(i, int(off[i]), int(off[i + 1])) for i in range(5)]
    assert chunk_bounds(lay, "gpu") == (tuple(span),)
    monkeypatch.setattr(jax_chunks, "CHUNK_TENSORS", 2)
    assert chunk_bounds(lay, "gpu") == (tuple(span[:2]), tuple(span[2:4]), (span[4],))
    assert chunk_bounds(lay, "tpu") == chunk_bounds(lay, "gpu")
    monkeypatch.setattr(jax_chunks, "CHUNK_TENSORS", 5)
    assert chunk_bounds(lay, "gpu") == (tuple(span),)


def test_runs_of_tensors_equal_numpy_engine(monkeypatch):
    """Adam with two groups and a missing gradient over an accelerator's layout cut in runs
    of three tensors (here on CPU), against the NumPy engine."""
    from mithril.utils.optimizers.engines import jax_engine

    monkeypatch.setattr(jax_chunks, "CHUNK_TENSORS", 3)
    monkeypatch.setattr(jax_engine, "chunk_bounds", lambda lay, _: chunk_bounds(lay, "gpu"))
    rng = np.random.default_rng(5)
    p0 = _params(rng)
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in p0.items()
              if i == 0 or k != "b2"} for i in range(3)]

    def make():
        return AdamW(learning_rate=1e-2, weight_decay=0.1,
                     param_groups=[{"params": r"^b", "learning_rate": 5e-3}])
    ref_opt, opt = make(), make()
    ref_p = {k: v.copy() for k, v in p0.items()}
    ref_s = ref_opt.init(ref_p)
    with optimizer_engine("jax-jit"):
        p = {k: jnp.asarray(v) for k, v in p0.items()}
        s = opt.init(p)
    assert len(s.engine.bounds) == 3  # (nine tensors)
    for g in grads:
        ref_p, ref_s = ref_opt.update(ref_p, g, ref_s)
        p, s = opt.update(p, {k: jnp.asarray(v) for k, v in g.items()}, s)
    for k in p0:
        np.testing.assert_allclose(np.asarray(p[k]), ref_p[k], rtol=2e-6, atol=1e-6)
    for name in ("m", "v"):
        np.testing.assert_allclose(np.asarray(s.slots[name]), ref_s.slots[name],
                                   rtol=2e-6, atol=1e-6)


def test_mapping_reads_writes_and_versions():
    bounds = (((1, 3, 7),), ((0, 0, 3), (2, 7, 9)))  # (chunks need not be contiguous)
    m, v = jnp.arange(9.0), jnp.arange(9.0) * 2
    slots = ChunkedSlots.of({"m": m, "v": v}, bounds)
    assert ChunkedSlots.of(slots, bounds) is slots
    assert list(slots) == ["m", "v"] and len(slots) == 2
    parts = slots.chunks("m")
    assert [np.asarray(p).tolist() for p in parts] == [[3, 4, 5, 6], [0, 1, 2, 7, 8]]
    assert slots.chunks("m") is parts  # split once
    np.testing.assert_array_equal(slots["m"], m)  # read back: joined in layout order
    new = slots.replaced({"m": (jnp.zeros(4), jnp.ones(5))})
    np.testing.assert_array_equal(new["m"], [1, 1, 1, 0, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(new["v"], v)
    np.testing.assert_array_equal(slots["m"], m)  # the old mapping is unchanged
    assert new.version == 0
    new["v"] = jnp.full(9, 5.0)  # a write holds the slot flat until the next split
    assert new.version == 1
    np.testing.assert_array_equal(new.chunks("v")[1], [5, 5, 5, 5, 5])
    del new["v"]
    assert list(new) == ["m"] and new.version == 2
    with pytest.raises(KeyError):
        new["v"]


def test_split_and_join_keep_placement_and_values():
    """Split and join copy on the host (no compiled program), in layout order, and keep
    an array's placement: an uncommitted flat buffer gives uncommitted chunks, as the
    jitted step's outputs are, so the second step meets the signature of the first."""
    import jax

    bounds = (((1, 3, 7),), ((0, 0, 3), (2, 7, 9)))
    flat = jnp.arange(9.0, dtype=jnp.float32)
    parts = jax_chunks.split(bounds, flat)
    assert [np.asarray(p).tolist() for p in parts] == [[3, 4, 5, 6], [0, 1, 2, 7, 8]]
    assert not any(p._committed for p in parts) and parts[0].dtype == jnp.float32
    parts[0].delete()  # (a copy: the flat buffer is not the chunk's)
    np.testing.assert_array_equal(np.asarray(flat), np.arange(9.0))
    dev = jax.devices()[0]
    pinned = jax.device_put(flat, dev)
    parts = jax_chunks.split(bounds, pinned)
    assert all(p._committed and p.devices() == {dev} for p in parts)
    joined = jax_chunks.join(bounds, parts)
    np.testing.assert_array_equal(np.asarray(joined), np.arange(9.0))
    assert joined._committed and joined.dtype == jnp.float32
    assert not jax_chunks.join(bounds, jax_chunks.split(bounds, flat))._committed
    # a NumPy array a user wrote into the slots: the jitted split, the same chunks
    parts = jax_chunks.split(bounds, np.arange(9.0, dtype=np.float32))
    assert [np.asarray(p).tolist() for p in parts] == [[3, 4, 5, 6], [0, 1, 2, 7, 8]]


def _jitted_adam(rng: np.random.Generator) -> tuple:
    """:func:`_params`, and Adam's state of them on the jitted engine: (p0, opt, p, s)."""
    p0 = _params(rng)
    opt = Adam(learning_rate=1e-2)
    with optimizer_engine("jax-jit"):
        p = {k: jnp.asarray(v) for k, v in p0.items()}
        s = opt.init(p)
    return p0, opt, p, s


def test_second_chunked_step_compiles_nothing(real_threshold):
    """The first step splits the flat slots; the steps after it run the same compiled
    program (the split chunks have the step's own outputs' signature)."""
    from mithril.utils.optimizers.engines.jax_engine import _COMPILED

    rng = np.random.default_rng(4)
    p0, opt, p, s = _jitted_adam(rng)
    assert len(s.engine.bounds) == 4
    grads = [{k: jnp.asarray(rng.standard_normal(v.shape).astype(np.float32))
              for k, v in p0.items()} for _ in range(2)]
    p, s = opt.update(p, grads[0], s)
    traces = sum(f._cache_size() for f in _COMPILED.values())
    for g in grads * 2:
        p, s = opt.update(p, g, s)
    assert sum(f._cache_size() for f in _COMPILED.values()) == traces


def _params(rng):
    """Large tensors (own chunks) between runs of small ones, in an order whose sorted
    names differ from the layout's."""
    shapes = {"w1": (300, 300), "b1": (200,), "s": (), "w10": (BIG + 5,), "b2": (7, 3),
              "w2": (250, 290), "w3": (40, 30), "b3": (200,), "w4": (30, 40)}
    # (b3 and w4 share b1's and w3's sizes: cut from the chunk at offsets passed as
    # arguments, slice_offsets)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


@pytest.mark.parametrize("make", [
    lambda: Adam(learning_rate=1e-2),
    lambda: AdamW(learning_rate=1e-2, weight_decay=0.1, clip_norm=5.0),
    lambda: SGD(learning_rate=1e-2, momentum=0.9, nesterov=True, nonfinite="unchecked"),
    # groups that differ inside the chunk of small tensors (a row per element there)
    lambda: AdamW(learning_rate=1e-2, weight_decay=0.1, param_groups=[
        {"params": r"^b", "weight_decay": 0.0, "learning_rate": 5e-3}]),
    # a row per tensor (the first pass's per-tensor sums: span sums in the small chunk)
    lambda: LAMB(learning_rate=1e-2, weight_decay=0.01),
    lambda: SGD(learning_rate=1e-2, momentum=0.9, clip_tensor_norm=1.0),
], ids=["adam", "adamw-clip", "sgd-unchecked", "adamw-groups", "lamb", "sgd-tensor-clip"])
@pytest.mark.parametrize("threshold", [BIG, 1 << 40], ids=["chunks", "one-chunk"])
def test_chunked_steps_equal_numpy_engine(monkeypatch, threshold, make):
    """CPU's chunks, and one chunk of every tensor (an accelerator's layout: each element
    reads its own row of the table where the groups differ)."""
    monkeypatch.setattr(jax_chunks, "CHUNK_MIN", threshold)
    rng = np.random.default_rng(0)
    p0 = _params(rng)
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in p0.items()}
             for _ in range(4)]
    ref_opt, ref_p = make(), {k: v.copy() for k, v in p0.items()}
    ref_s = ref_opt.init(ref_p)
    opt = make()
    with optimizer_engine("jax-jit"):
        p = {k: jnp.asarray(v) for k, v in p0.items()}
        s = opt.init(p)
    assert type(s.engine).__name__ == "JaxEngine"
    assert len(s.engine.bounds) == (4 if threshold == BIG else 1)
    for g in grads:
        ref_p, ref_s = ref_opt.update(ref_p, g, ref_s)
        p, s = opt.update(p, {k: jnp.asarray(v) for k, v in g.items()}, s)
    assert isinstance(s.slots, ChunkedSlots)
    if opt.nonfinite != "unchecked":  # the global norm, summed over the chunks
        assert float(s.last_grad_norm) == pytest.approx(ref_s.last_grad_norm, rel=1e-5)
    for k in p0:
        np.testing.assert_allclose(np.asarray(p[k]), ref_p[k], rtol=2e-6, atol=1e-6)
    for name in ref_opt.full_slot_names():
        np.testing.assert_allclose(np.asarray(s.slots[name]), ref_s.slots[name],
                                   rtol=2e-6, atol=1e-6)
        for k, a in s.slot(name).items():
            np.testing.assert_allclose(np.asarray(a), ref_s.slot(name)[k], rtol=2e-6,
                                       atol=1e-6)
    saved = s.to_numpy()  # (what a checkpoint writes: flat host buffers)
    assert set(saved) == set(ref_s.slots)
    for name, a in saved.items():
        np.testing.assert_allclose(a, ref_s.slots[name], rtol=2e-6, atol=1e-6)


def test_chunked_adam_equals_optax(real_threshold):
    """Side by side with optax's adam, jitted with donation, over five steps."""
    import jax

    rng = np.random.default_rng(1)
    p0 = _params(rng)
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in p0.items()}
             for _ in range(5)]
    tx = optax.adam(1e-2)
    step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
        *tx.update(g, s, p)), donate_argnums=(0, 1))
    op = {k: jnp.asarray(v) for k, v in p0.items()}
    os_ = tx.init(op)
    opt = Adam(learning_rate=1e-2)
    with optimizer_engine("jax-jit"):
        p = {k: jnp.asarray(v) for k, v in p0.items()}
        s = opt.init(p)
    for g in grads:
        gj = {k: jnp.asarray(v) for k, v in g.items()}
        op, os_ = step(op, os_, gj)
        p, s = opt.update(p, gj, s)
    for k in p0:
        np.testing.assert_allclose(np.asarray(p[k]), np.asarray(op[k]), rtol=3e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(s.slots["v"]), np.concatenate(
        [np.asarray(os_[0].nu[k]).reshape(-1) for k in p0]), rtol=3e-6, atol=1e-12)


@pytest.mark.parametrize("threshold", [BIG, 1 << 40], ids=["chunks", "one-chunk"])
def test_missing_gradient_and_written_slot(monkeypatch, threshold):
    """A tensor without a gradient keeps its value and slots, in a chunk of its own, in
    a run of small ones and in one chunk of every tensor (a mask per element); a slot
    written between steps is what the next step reads (the repeated step's recipe no
    longer holds)."""
    monkeypatch.setattr(jax_chunks, "CHUNK_MIN", threshold)
    rng = np.random.default_rng(2)
    p0, opt, p, s = _jitted_adam(rng)
    full = {k: jnp.asarray(rng.standard_normal(v.shape).astype(np.float32)) for k, v in p0.items()}
    for _ in range(3):  # the third step runs by the recipe
        p, s = opt.update(p, full, s)
    assert s.fast is not None and s.fast.used
    before = {k: np.asarray(v) for k, v in p.items()}
    m_before = {k: np.asarray(v) for k, v in s.slot("m").items()}
    part = {k: v for k, v in full.items() if k not in ("w10", "b1")}
    p, s = opt.update(p, part, s)
    for k in ("w10", "b1"):
        np.testing.assert_array_equal(np.asarray(p[k]), before[k])
        np.testing.assert_array_equal(np.asarray(s.slot("m")[k]), m_before[k])
    assert not np.array_equal(np.asarray(p["w1"]), before["w1"])
    # written between steps: the next step starts from the zeroed second moment
    for _ in range(2):
        p, s = opt.update(p, full, s)
    s.slots["v"] = jnp.zeros_like(s.slots["v"])
    s.slots["m"] = jnp.zeros_like(s.slots["m"])
    ref = Adam(learning_rate=1e-2)
    rs = ref.init({k: np.asarray(v) for k, v in p.items()})
    rs.step = s.step
    rp, rs = ref.update({k: np.array(v) for k, v in p.items()},
                        {k: np.asarray(v) for k, v in full.items()}, rs)
    p, s = opt.update(p, full, s)
    for k in p0:
        np.testing.assert_allclose(np.asarray(p[k]), rp[k], rtol=2e-6, atol=1e-6)


def test_repeated_scalar_and_empty_tensors(real_threshold):
    """Scalars and empty tensors that repeat their size in the chunk of small tensors (cut
    at offsets passed as arguments), with a gradient missing for one of each, against the
    NumPy engine."""
    shapes = {"a": (), "e1": (0,), "b": (3,), "c": (), "e2": (2, 0), "d": (3,), "f": ()}
    rng = np.random.default_rng(6)
    p0 = {k: rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()}
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in p0.items()
              if i != 1 or k not in ("c", "e1")} for i in range(3)]
    ref_opt, opt = Adam(learning_rate=1e-2), Adam(learning_rate=1e-2)
    ref_p = {k: v.copy() for k, v in p0.items()}
    ref_s = ref_opt.init(ref_p)
    with optimizer_engine("jax-jit"):
        p = {k: jnp.asarray(v) for k, v in p0.items()}
        s = opt.init(p)
    (offs,) = s.engine._offsets
    assert [o is not None for o in offs] == [True, True, True, True, True, True, True]
    for g in grads:
        ref_p, ref_s = ref_opt.update(ref_p, g, ref_s)
        p, s = opt.update(p, {k: jnp.asarray(v) for k, v in g.items()}, s)
    for k in p0:
        assert p[k].shape == p0[k].shape
        np.testing.assert_allclose(np.asarray(p[k]), ref_p[k], rtol=2e-6, atol=1e-6)


def test_bfloat16_chunked_equals_one_chunk(monkeypatch):
    """JAX bfloat16 on CPU takes the jitted engine by default: with the real threshold its
    large tensors are chunks of their own, with an unreachable one the whole layout is one
    chunk; the steps are the same elementwise math, so the params and slots are equal."""
    rng = np.random.default_rng(3)
    p0 = {k: jnp.asarray(v, dtype=jnp.bfloat16) for k, v in _params(rng).items()}
    grads = [{k: jnp.asarray(rng.standard_normal(v.shape), dtype=jnp.bfloat16)
              for k, v in p0.items()} for _ in range(3)]
    out = {}
    for threshold in (BIG, 1 << 40):
        monkeypatch.setattr(jax_chunks, "CHUNK_MIN", threshold)
        opt = AdamW(learning_rate=1e-2, weight_decay=0.1)
        p = {k: v + 0 for k, v in p0.items()}
        s = opt.init(p)
        assert type(s.engine).__name__ == "JaxEngine"
        assert len(s.engine.bounds) == (4 if threshold == BIG else 1)
        for g in grads:
            p, s = opt.update(p, g, s)
        out[threshold] = ({k: np.asarray(v, dtype=np.float32) for k, v in p.items()},
                          {k: np.asarray(v, dtype=np.float32) for k, v in s.slots.items()})
    (pa, sa), (pb, sb) = out.values()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)
    assert not np.array_equal(pa["w1"], np.asarray(p0["w1"], dtype=np.float32))


def _kernels(txt: str) -> tuple[int, int]:
    """(fused kernels, distinct ones) of an optimized HLO text: bodies compared without
    their names and metadata."""
    import re

    bodies = re.findall(r"^%fused\S* \(.*?\n}\n", txt, flags=re.S | re.M)
    norm = {re.sub(r"%[\w.\-]+", "%x", re.sub(r", metadata=\{[^}]*\}", "", b.split("\n", 1)[1]))
            for b in bodies}
    return len(bodies), len(norm)


def test_slices_of_one_size_are_one_kernel(real_threshold):
    """On CPU the tensors a chunk's tensors share a size with are cut out at offsets passed
    as arguments: XLA compiles one kernel for all of them (~20 ms each on 2 cores; 2,000
    tensors: a 58 s first step became 12 s), where constant offsets make a kernel each."""
    import jax

    from mithril.utils.optimizers.engines.jax_parts import Parts, slice_offsets

    shapes = [(100,), (10, 10)] * 20 + [(3,), (7,), (2, 2)]
    lay = Layout(tuple(f"p{i}" for i in range(len(shapes))), tuple(shapes), "float32")
    bounds = chunk_bounds(lay, "cpu")
    assert len(bounds) == 1
    parts = Parts(lay, bounds)
    x = jnp.arange(sum(int(np.prod(s)) for s in shapes), dtype=jnp.float32)
    fn = jax.jit(lambda x, offs: parts.unflat([x * 2.0], offs))
    offs = slice_offsets(bounds, "cpu")
    assert [o is None for o in offs[0]] == [False] * 40 + [True] * 3
    out = fn(x, offs)
    at = 0
    for i, s in enumerate(shapes):  # the values: each tensor's own piece
        n = int(np.prod(s))
        np.testing.assert_array_equal(out[f"p{i}"], 2 * np.arange(at, at + n).reshape(s))
        at += n
    # one kernel a shape of the repeated size (two), one per other tensor (three)
    assert _kernels(fn.lower(x, offs).compile().as_text()) == (43, 5)
    const = slice_offsets(bounds, "gpu")  # constants: a kernel each
    assert const == (None,)
    assert _kernels(fn.lower(x, const).compile().as_text()) == (43, 43)


@pytest.mark.parametrize("threshold", [BIG, 1 << 40], ids=["chunks", "one-chunk"])
def test_without_barriers_the_same_step_and_reports(monkeypatch, threshold):
    """``MITHRIL_JAX_BARRIERS=0`` (:data:`~.jax_engine.BARRIERS`, a measuring knob) only
    lets XLA schedule the norm and the finite probe with the update: the same parameters,
    slots and norm, bit for bit, and a non-finite step is still reported."""
    import warnings

    import jax

    from mithril.utils.optimizers.engines import jax_engine

    monkeypatch.setattr(jax_chunks, "CHUNK_MIN", threshold)
    rng = np.random.default_rng(7)
    p0 = _params(rng)
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in p0.items()}
             for _ in range(3)]
    grads[2]["b2"][1, 1] = np.inf  # the third step: a non-finite gradient
    barrier, placed = jax.lax.optimization_barrier, []
    monkeypatch.setattr(jax.lax, "optimization_barrier",
                        lambda x: placed.append(1) or barrier(x))
    out = {}
    for barriers in (True, False):
        placed.clear()
        monkeypatch.setattr(jax_engine, "BARRIERS", barriers)
        monkeypatch.setattr(jax_engine, "_COMPILED", {})  # (programs built with the knob)
        opt = AdamW(learning_rate=1e-2, weight_decay=0.1, clip_norm=5.0)
        with optimizer_engine("jax-jit"):
            p = {k: jnp.asarray(v) for k, v in p0.items()}
            s = opt.init(p)
        norms = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for g in grads:
                p, s = opt.update(p, {k: jnp.asarray(v) for k, v in g.items()}, s)
                norms.append(float(s.last_grad_norm))
        assert s.num_nonfinite == 1 and any("non-finite" in str(w.message) for w in caught)
        assert bool(placed) == barriers  # (the knob: no barrier traced without it)
        out[barriers] = ({k: np.asarray(v) for k, v in p.items()}, s.to_numpy(), norms)
    (pa, sa, na), (pb, sb, nb) = out[True], out[False]
    np.testing.assert_array_equal(na[:2], nb[:2])
    assert not np.isfinite(na[2]) and not np.isfinite(nb[2])
    for k in p0:
        np.testing.assert_array_equal(pa[k], pb[k])
    for name in sa:
        np.testing.assert_array_equal(sa[name], sb[name])
