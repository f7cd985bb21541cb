"""The generated numba kernels: the double-buffered variant (with or without streaming
stores, aligned or not) gives the same bits as the in-place one."""

import numpy as np
import pytest

from mithril.utils.optimizers import SGD, Adam
from mithril.utils.optimizers.engines import streaming, threads
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
    sizes = np.array([37, 16, 1, 0, 100], dtype=np.int64)  # remainders, an exact 16, empty
    offsets = np.array([0, 48, 64, 80, 96], dtype=np.int64)  # multiples of 16 (JAX layout)
    total = 196
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
