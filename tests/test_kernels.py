"""The generated numba kernels: the double-buffered variant (with or without streaming
stores, aligned or not) gives the same bits as the in-place one; Σ g² per tile in float32
(where the CPU's vectors are 256 bits or less) stays within float32 rounding of the float64
sum, overflowing tiles are summed again in float64 (in the update and in a two-pass
optimizer's first pass), the update runs on full-width vectors, and every built-in math
computes float32 in float32."""

import llvmlite.binding as ll
import numba
import numpy as np
import pytest

from mithril.utils.optimizers import LARS, SGD, Adam
from mithril.utils.optimizers.engines import kernels, streaming, threads, vector_width
from mithril.utils.optimizers.engines.common import prologue
from mithril.utils.optimizers.engines.kernels import update_kernel


def _aligned(n: int, shift: int = 0) -> np.ndarray:
    """A float32 buffer of ``n`` elements starting ``shift`` elements after a 64-byte boundary."""
    raw = np.empty(n + 32, np.float32)
    start = (-raw.ctypes.data % 64) // 4 + shift
    return raw[start:start + n]


@pytest.mark.parametrize("opt", [SGD(0.1, momentum=0.9, weight_decay=0.01), Adam(0.01)],
                         ids=["sgd", "adam"])
@pytest.mark.parametrize("shift,stream", [(0, True), (1, True), (0, False)],
                         ids=["aligned-streaming", "misaligned-plain", "aligned-plain"])
def test_double_buffer_matches_in_place(opt, shift, stream):
    rng = np.random.default_rng(0)
    # remainders, an exact 16, empty, more than two tiles (kernels.TILE) with a remainder
    sizes = np.array([37, 16, 1, 0, 100, 2 * kernels.TILE + 37], dtype=np.int64)
    offsets = np.array([0, 48, 64, 80, 96, 208], dtype=np.int64)  # multiples of 16 (JAX layout)
    total = int(offsets[-1] + sizes[-1])
    p0 = rng.standard_normal(total).astype(np.float32)
    grads = [rng.standard_normal(int(n)).astype(np.float32) for n in sizes]
    gptr = np.array([g.ctypes.data if g.size else 0 for g in grads], dtype=np.int64)
    gptr[3] = 0  # a missing gradient: copied through unchanged
    scal = opt.scalars(1)
    row = np.array([[*prologue(opt, None, scal[0]), *scal]], dtype=np.float32)
    args = (np.zeros(len(sizes), np.int64), row)  # one group: every tensor reads row 0
    n_slots = len(opt.slot_names())

    P, slots = p0.copy(), [np.full(total, 0.5, np.float32) for _ in range(n_slots)]
    in_place = update_kernel(opt.kernel_math(), n_slots, len(scal), "float32", False, False, False)
    plan = threads.Plan(offsets, sizes)
    norm_a = plan.run(in_place, (P, P, *slots), gptr, args)

    src, dst = _aligned(total), _aligned(total, shift)
    src[:], dst[:] = p0, np.nan
    slots2 = [np.full(total, 0.5, np.float32) for _ in range(n_slots)]
    double = update_kernel(opt.kernel_math(), n_slots, len(scal), "float32", True, False, stream)
    norm_b = plan.run(double, (src, dst, *slots2), gptr, args)

    assert norm_b == pytest.approx(norm_a, rel=1e-12)  # vector loops may sum in another order
    for o, n in zip(offsets, sizes):
        np.testing.assert_array_equal(dst[o:o + n], P[o:o + n])
    np.testing.assert_array_equal(src, p0)  # the source buffer is only read
    for a, b in zip(slots, slots2):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("stream", [True, False])
def test_streaming_stores_only_when_asked(stream, tmp_path, monkeypatch):
    # compiled afresh (an empty kernel cache, past the per-process one): a kernel loaded from
    # the disk cache does not compile the inner loop whose assembly this reads
    monkeypatch.setenv("MITHRIL_CACHE_DIR", str(tmp_path))
    opt = SGD(0.1, momentum=0.9)
    kernel = update_kernel.__wrapped__(opt.kernel_math(), 1, len(opt.scalars(1)), "float32", True,
                                       False, stream)
    src, dst, m = _aligned(64), _aligned(64), np.zeros(64, np.float32)
    g = np.ones(64, np.float32)
    threads.Plan(np.array([0]), np.array([64])).run(
        kernel, (src, dst, m), np.array([g.ctypes.data]),
        (np.zeros(1, np.int64), np.array([[1, 0, 0, 1, *opt.scalars(1)]], np.float32)))
    inner = kernel.py_func.__globals__["inner"]
    asm = inner.inspect_asm(inner.signatures[0])
    assert ("movnt" in asm) == (stream and streaming.AVAILABLE)


def test_streaming_only_beyond_the_last_level_cache():
    llc = streaming.last_level_cache_bytes()
    assert llc >= 1 << 20  # every x86/ARM server part has at least 1 MiB
    assert not streaming.worth_it(llc // 2)  # fits: cached stores may never reach memory
    assert streaming.worth_it(4 * llc) == streaming.AVAILABLE


def _step(opt, g):
    """One NumPy update of a fresh ``w`` (float32) by ``opt`` with gradient ``g``."""
    p = {"w": np.linspace(-1, 1, g.size, dtype=np.float32)}
    state = opt.init(p)
    p, state = opt.update(p, {"w": g}, state)
    return p["w"], state


@pytest.mark.parametrize("n", [5_000, 300_003])  # one piece; several pieces and threads
def test_grad_norm_is_the_float64_norm(n):
    """Σ g² per tile in float32, the tiles added in float64: the reported norm is within
    float32 rounding of the float64 norm (one float32 sum over all elements is not: its
    error grows with the count)."""
    g = (np.random.default_rng(1).random(n, dtype=np.float32) + 0.5)  # one sign: no cancelling
    _, state = _step(Adam(1e-3), g)
    exact = float(np.sqrt(np.sum(g.astype(np.float64) ** 2)))
    assert state.last_grad_norm == pytest.approx(exact, rel=2e-7)


def test_a_tile_whose_float32_sum_overflows_is_summed_in_float64():
    """A finite gradient of 3e19 squares past float32's range: its tile is summed again in
    float64, so the norm is finite and right, and SGD's finite step is applied as finite."""
    g = np.random.default_rng(2).standard_normal(3 * kernels.TILE + 5).astype(np.float32)
    g[kernels.TILE + 7] = 3e19
    w, state = _step(SGD(1e-21, momentum=0.9), g)
    exact = float(np.sqrt(np.sum(g.astype(np.float64) ** 2)))
    assert state.last_grad_norm == pytest.approx(exact, rel=1e-7)
    assert np.isfinite(w).all() and not state.nonfinite_values and state.num_nonfinite == 0
    w0 = np.linspace(-1, 1, g.size, dtype=np.float32)
    assert w[kernels.TILE + 7] == pytest.approx(w0[kernels.TILE + 7] - 0.03, abs=1e-6)
    np.testing.assert_array_equal(state.slot("momentum")["w"], g)


@pytest.mark.skipif(not ll.get_host_cpu_features().get("avx2", False),
                    reason="full-width float32 vectors are checked on AVX2 and wider")
def test_the_update_runs_on_eight_float32_lanes(tmp_path, monkeypatch):
    """The float32 Adam update's square roots and divisions use 256-bit (or wider)
    registers: with a float64 Σ g² in the loop, an AVX2 CPU ran them on 128-bit ones."""
    monkeypatch.setenv("MITHRIL_CACHE_DIR", str(tmp_path))  # compiled here, not loaded
    opt = Adam(1e-3)
    n_scal = len(opt.scalars(1))
    kernel = kernels.update_kernel.__wrapped__(opt.kernel_math(), 2, n_scal, "float32")
    p, m, v = np.ones(64, np.float32), np.zeros(64, np.float32), np.zeros(64, np.float32)
    threads.Plan(np.array([0]), np.array([64])).run(
        kernel, (p, p, m, v), np.array([np.full(64, 0.5, np.float32).ctypes.data]),
        (np.zeros(1, np.int64), np.array([[1, 0, 0, 1, *opt.scalars(1)]], np.float32)))
    inner = kernel.py_func.__globals__["inner"]
    asm = inner.inspect_asm(inner.signatures[0])
    sqrt = [line for line in asm.splitlines() if "vsqrtps" in line]
    assert any("%ymm" in line or "%zmm" in line for line in sqrt), sqrt
    assert vector_width.ACC64 == (ll.get_host_cpu_features().get("avx512f", False)
                                  and vector_width.WIDTH == 512 and not numba.config.CPU_NAME
                                  and ll.get_host_cpu_name() not in vector_width.HALF_WIDTH_512)


def _first_pass(p: np.ndarray, g: np.ndarray) -> np.ndarray:
    """LARS's first pass (Σ p², Σ g²) over one float32 tensor, through the engine's kernel."""
    from mithril.utils.optimizers.lars import _lars_reduce

    opt = LARS(0.1)
    scal = opt.scalars(1)
    kernel = kernels.reduce_kernel(_lars_reduce, 1, len(scal), 2, "float32")
    plan = threads.Plan(np.array([0]), np.array([p.size]))
    R = np.zeros((len(plan.seg_t), 2))
    H = np.array([[1, 0, 0, 1, *scal]], np.float32)
    plan.run(kernel, (p, np.zeros_like(p)), np.array([g.ctypes.data]),
             (np.zeros(1, np.int64), H, R))
    sums = np.zeros((1, 2))
    np.add.at(sums, plan.seg_t, R)
    return sums[0]


def test_the_first_pass_sums_tiles_and_a_tile_that_overflows_float32_in_float64():
    """A two-pass optimizer's sums (LARS's Σ p², Σ g²): each tile in float32 where vectors
    are 256 bits or less, the tiles in float64, within float32 rounding of the float64 sums
    of the same float32 terms; a tile whose float32 sum overflows (squares of 1.5e18, each
    finite in float32) is taken again in float64."""
    rng = np.random.default_rng(3)
    n = 300 * kernels.TILE + 5
    p = rng.random(n, dtype=np.float32) + 0.5  # one sign: no cancelling
    g = rng.random(n, dtype=np.float32) + 0.5
    exact = [np.sum((x * x).astype(np.float64)) for x in (p, g)]
    np.testing.assert_allclose(_first_pass(p, g), exact, rtol=2e-7)
    big = p.copy()
    big[kernels.TILE:2 * kernels.TILE] = 1.5e18  # Σ of one tile: 2.3e39 > float32's 3.4e38
    sums = _first_pass(big, g)
    assert np.isfinite(sums).all()
    np.testing.assert_allclose(sums[0], np.sum((big * big).astype(np.float64)), rtol=1e-12)


def _kernel_maths() -> list:
    """Every built-in elementwise optimizer math and reduction: the module-level functions
    of ``mithril.utils.optimizers`` whose arguments start ``(p, g, ...)``."""
    import importlib
    import inspect
    import pkgutil

    import mithril.utils.optimizers as mo

    found = []
    for info in pkgutil.iter_modules(mo.__path__):
        mod = importlib.import_module(f"{mo.__name__}.{info.name}")
        for name, fn in vars(mod).items():
            if (inspect.isfunction(fn) and fn.__module__ == mod.__name__
                    and list(inspect.signature(fn).parameters)[:2] == ["p", "g"]
                    and not getattr(fn, "array_only", False)):  # (mu_dtype's: no numba)
                found.append(pytest.param(fn, id=f"{info.name}.{name}"))
    return found


@pytest.mark.parametrize("fn", _kernel_maths())
def test_kernel_math_computes_float32_in_float32(fn):
    """Given float32 arguments, every value a math returns is float32 under numba: an int or
    float literal beside a float32 (``1 - x``) is float64 there, and the kernel then runs
    the whole step in float64, unvectorised (LARS's update did, at half SGD's speed)."""
    import inspect

    jitted = numba.njit(fn)
    jitted(*[np.float32(0.5)] * len(inspect.signature(fn).parameters))
    out = jitted.nopython_signatures[0].return_type
    assert all(t == numba.float32 for t in getattr(out, "types", [out])), str(out)


def test_the_kernel_math_scan_finds_the_catalog():
    assert len(_kernel_maths()) >= 45
