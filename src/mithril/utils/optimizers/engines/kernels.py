"""The fused loops the :class:`~.numba_engine.NumbaEngine` runs, generated from an
optimizer's elementwise ``math``.

One kernel per (math, slot count, dtype, variant): a per-tensor inner loop over contiguous
slices (which LLVM vectorises) inside an outer loop over the pieces that threads claim
(:mod:`.threads`, :mod:`.atomics`). Gradients are read where they lie, through a table of
their addresses, so each byte is touched once (28 bytes per parameter for an fp32 Adam step)
however many tensors there are. Σ g² is measured in the same pass.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numba
import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from . import atomics, kernel_cache, streaming, vector_width
from .literals import typed_literals

# Vectorising flags, but not nnan/ninf: NaN/inf must still propagate and be detected.
_FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
#: an optimizer's math keeps its own association (torch's: ``(1 − β₂)·g·g`` is
#: ``((1 − β₂)·g)·g``, finite in float32 where ``g·g`` overflows); inlined by LLVM, its
#: instructions keep these flags inside a loop whose sums are reassociated
_MATH_FASTMATH = _FASTMATH - {"reassoc"}
#: elements per tile of an update's inner loop, each tile's g² summed in ``ACC`` (float32
#: for float32 gradients on AVX2) before it is added to the float64 total (``_INNER_SRC``);
#: a multiple of 16
TILE = 1024


def _as_written(fn: Callable[..., Any]) -> Any:
    """An optimizer's math or reduction compiled apart, in its written association
    (:data:`_MATH_FASTMATH`), for LLVM to inline into the kernel's loop."""
    return vector_width.njit(fastmath=_MATH_FASTMATH, error_model="numpy", nogil=True,
                             forceinline=True)(typed_literals(fn))


@intrinsic
def voidptr(typingctx, addr):  # pragma: no cover - compiled by numba
    """An integer address as a void pointer (to view a gradient buffer with carray)."""
    if isinstance(addr, types.Integer):
        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], cgutils.voidptr_t)
        return types.voidptr(addr), codegen
    return None


@intrinsic
def exponent_bits(typingctx, x):  # pragma: no cover - compiled by numba
    """The exponent field of a float, as an int of its width (all ones: ±inf or NaN).

    An integer test: the fastmath flags (``reassoc``, ``contract``) let LLVM fold float
    probes such as ``x − x`` or ``0·x`` away, inf and NaN included."""
    if isinstance(x, types.Float):
        ity = types.int64 if x.bitwidth == 64 else types.int32
        mask = 0x7FF0000000000000 if x.bitwidth == 64 else 0x7F800000

        def codegen(context, builder, signature, args):
            ll = context.get_value_type(ity)
            return builder.and_(builder.bitcast(args[0], ll), ll(mask))
        return ity(x), codegen
    return None


_BODY_SRC = """
        x = G[j]
        xa = ACC(x)
        t += xa * xa
        g = x * gscale
        if CLIP:
            g = min(max(g, -cv), cv)
        p = P[j]
        g = g + l2 * p
        p = p * keep
        {lhs} = MATH(p, g, {reads}{scal_args})
        z = ITYPE(max(z, {probe}))
        STORE
{writes}"""

# The loop runs over tiles of TILE elements, each summing g² in ACC (t): the gradient's own
# type where float64 vectors hold fewer than 8 lanes (AVX2, NEON: a float64 accumulator in
# the loop made LLVM vectorise the whole update at the float64 width, half the float32
# lanes, an AVX2 Adam step ~20% slower), float64 where they hold 8 (vector_width.ACC64).
# The tiles' sums add up in float64; a tile whose sum overflows (finite |g| > ~1e19 in
# float32) is summed again in float64
_INNER_SRC = """
def inner(P_, Q_, {slots_}G_, gscale, cv, l2, keep{scal}):
    s = 0.0
    # the largest exponent field of a new value (EXP: inf or NaN somewhere), an integer of
    # the float's width (ITYPE): numba types a loop-carried int as int64, and the vectorised
    # loop then widened every lane of the probe (a 1M-param SGD pass in L3: 7-10% slower)
    z = ITYPE(0)
    n = P_.shape[0]
    n16 = n - n % 16
    # streaming stores (a second buffer only) on [0, n16), where Q is 64-byte aligned
    stream = STREAM and address(Q_) % 64 == 0
    # tiles of TILE elements, the last n % 16 apart with or without streaming stores (so
    # that both variants sum the same ranges)
    a = 0
    while a < n:
        b = min(a + TILE, n16) if a < n16 else n
        P, Q, G = P_[a:b], Q_[a:b], G_[a:b]{rebind}
        t = ACC(0){loops}
        if np.isfinite(t):
            s += np.float64(t)
        else:
            s += wide_sumsq(G)
        a = b
    if STREAM:
        store_fence()
    return s if z != EXP else np.nan
"""

# the averages of a parameter without gradient still move towards it (see update_kernel)
_NOGRAD_SRC = """
def avg_inner(P, {avgs}{weights}):
    for j in range(P.shape[0]):
        p = P[j]
{steps}
"""

_OUTER_SRC = """
def kernel(P, Q, {slots}gptr, seg_t, seg_first, seg_off, seg_size, bounds, sync, acc, spins,
           group, H{unit_args}):
    pieces = bounds.shape[0] - 1
    slot = arrive(sync)  # this thread's range of pieces (:mod:`.atomics`)
    k = claim(sync, slot)
    while k < pieces:
        s = 0.0
        for e in range(bounds[k], bounds[k + 1]):
            a = seg_off[e]
            b = a + seg_size[e]
            t = seg_t[e]
            base = gptr[t]
            if base == 0:  # no gradient: the parameter passes through unchanged
                if COPY:  # a loop, not a slice assignment: numba's shape-mismatch path for
                    for j in range(a, b):  # that costs ~2 s on a first-ever compile
                        Q[j] = P[j]
{nograd}                continue
            G = carray(voidptr(base + seg_first[e] * ITEMSIZE), (seg_size[e],), DTYPE)
            r = group[t]  # the tensor's row of scalars (its parameter group)
{call}
        acc[k] = s
        piece_done(sync)
        k = claim(sync, slot)
    return all_done(sync, pieces, spins)
"""


# the unitwise variant (adaptive clipping, :mod:`.unitwise`): the gradient of a clipped
# tensor of U > 1 units (element j in unit j mod U) is scaled by its unit's factor as it is
# read, row by row (rows of U elements) so that the loop over a row is contiguous and
# vectorised, with no call or modulo per element
_INNER_F_SRC = """
def inner_f(P_, Q_, {slots_}G_, FR, u0, gscale, cv, l2, keep{scal}):
    s = 0.0
    z = ITYPE(0)
    n = P_.shape[0]
    U = FR.shape[0]
    j0 = 0
    u = u0
    while j0 < n:
        m = min(U - u, n - j0)
        P, Q, G, FA = P_[j0:j0 + m], Q_[j0:j0 + m], G_[j0:j0 + m], FR[u:u + m]{rebind}
        t = ACC(0)
        for j in range(m):  # (slices: j from 0 is known non-negative, so LLVM vectorises){body}
        s += np.float64(t) if np.isfinite(t) else wide_sumsq_f(G, FA)
        j0 += m
        u = 0
    return s if z != EXP else np.nan
"""

_UNIT_CALL_SRC = """            if UN[t] > 1:
                U = UN[t]
                s += inner_f(P[a:b], Q[a:b], {slices}G, F[UB[t]:UB[t] + U], seg_first[e] % U,
                             {row})
            else:
    """


def _nested_max(terms: list[str]) -> str:
    """``max(a, max(b, c))``: numba's max of more than two arguments does not vectorise."""
    return terms[0] if len(terms) == 1 else f"max({terms[0]}, {_nested_max(terms[1:])})"


_LOOP = vector_width.njit(fastmath=_FASTMATH, error_model="numpy", nogil=True,
                         forceinline=True)


def inner_namespace(math_fn: Any, n_slots: int, n_scal: int, dtype: str, copy: bool = False,
                    clip: bool = False, stream: bool = False, dry: bool = False,
                    unitwise: bool = False) -> tuple[dict[str, Any], dict[str, Any], str]:
    """The per-tensor loop of :func:`update_kernel` (its arguments alike), compiled into
    any kernel that calls it (``forceinline``): ``inner(P, Q, *slots, G, gscale, cv, l2,
    keep, *scalars)`` updates one contiguous tensor and returns Σ g² of its raw gradient in
    float64, NaN where a new value is ±inf or NaN. Returns the namespace it lives in
    (``ns["inner"]``; ``ns["inner_f"]`` too where ``unitwise``), the source template's
    fields and the kernel's name, for a kernel of the caller's own (the outer loop of
    :func:`update_kernel`, the XLA handler of :mod:`.xla_ffi`) to be compiled in."""
    slots = [f"S{k}" for k in range(n_slots)]
    fields = dict(
        slots="".join(s + ", " for s in slots),
        scal="".join(f", h{k}" for k in range(n_scal)),
        lhs="p, " + ", ".join(f"s{k}" for k in range(n_slots)),
        reads="".join(f"{s}[j], " for s in slots),
        scal_args=", ".join(f"h{k}" for k in range(n_scal)),
        writes="" if dry else "\n".join(f"        {s}[j] = s{k}" for k, s in enumerate(slots)),
        probe=_nested_max(["exponent_bits(p)"] + [f"exponent_bits(s{k})" for k in range(n_slots)]),
        slices="".join(f"{s}[a:b], " for s in slots),
        row=", ".join(f"H[r, {i}]" for i in range(4 + n_scal)),
        nograd="",
        unit_args=", UB, UN, F" if unitwise else "",
    )
    ns: dict[str, Any] = {"np": np, "carray": numba.carray, "voidptr": voidptr, "DTYPE": np.dtype(dtype).type,
                          "MATH": _as_written(math_fn),
                          "CLIP": clip, "COPY": copy and not dry,
                          "STREAM": copy and stream and not dry and streaming.AVAILABLE, "stream_store": streaming.stream_store,
                          "store_fence": streaming.store_fence, "address": streaming.address,
                          "claim": atomics.claim, "arrive": atomics.arrive, "piece_done": atomics.piece_done,
                          "all_done": atomics.all_done, "ITEMSIZE": np.dtype(dtype).itemsize,
                          "exponent_bits": exponent_bits, "TILE": TILE, "wide_sumsq": _tile_sumsq,
                          "ACC": np.float64 if vector_width.ACC64 else np.dtype(dtype).type,
                          "wide_sumsq_f": _tile_sumsq_scaled,
                          "ITYPE": np.int64 if np.dtype(dtype).itemsize == 8 else np.int32,
                          "EXP": (np.int64(0x7FF0000000000000) if np.dtype(dtype).itemsize == 8
                                  else np.int32(0x7F800000))}
    name = f"<mithril kernel {getattr(math_fn, '__qualname__', math_fn)}>"
    body = _BODY_SRC.format(**fields)
    store = "pass" if dry else "Q[j] = p" if copy else "P[j] = p"
    deeper = "\n" + " " * 8  # (the loops are one or two levels deeper than the body's text)
    plain = ("\n        for j in range(b - a):"
             + body.replace("STORE", store).replace("\n", "\n    "))
    if ns["STREAM"]:  # (only then: a loop never run still costs its compile time)
        plain = ("\n        if stream and a < n16:\n            for j in range(b - a):"
                 + body.replace("STORE", "stream_store(Q, j, p)").replace("\n", deeper)
                 + "\n        else:" + plain.replace("\n", "\n    "))
    src = _INNER_SRC.format(
        **fields, slots_="".join(f"{s}_, " for s in slots),
        rebind="".join(f"\n        {s} = {s}_[a:b]" for s in slots), loops=plain)
    if unitwise:  # the same body, the gradient scaled by its unit's factor as it is read
        src += _INNER_F_SRC.format(
            **fields, slots_="".join(f"{s}_, " for s in slots),
            rebind="".join(f"\n        {s} = {s}_[j0:j0 + m]" for s in slots),
            body=body.replace("STORE", store).replace("\n", "\n    ").replace(
                "x = G[j]\n", "x = G[j] * FA[j]\n"))
    kernel_cache.exec_source(src, name, ns)
    ns["inner"] = _LOOP(ns["inner"])
    if unitwise:
        ns["inner_f"] = _LOOP(ns["inner_f"])
    return ns, fields, name


@functools.cache
def update_kernel(math_fn: Any, n_slots: int, n_scal: int, dtype: str, copy: bool = False,
                  clip: bool = False, stream: bool = False, dry: bool = False,
                  n_avg: int = 0, unitwise: bool = False) -> Any:
    """The fused update for ``math_fn`` with ``n_slots`` slots and ``n_scal`` scalars.

    The scalars come as a table ``H`` with one row per parameter group (the prologue's
    gscale, clip value, coupled L2 and decoupled keep factor, then the optimizer's
    scalars) and ``group``, each tensor's row: any hyperparameter may differ between
    groups at the cost of one table read per tensor, in the same single pass.

    The per-tensor loop is a separate function over contiguous slices so that LLVM
    vectorises it, then inlines it (``forceinline``: a kernel must not call code compiled
    apart, see :mod:`.kernel_cache`). It returns Σ g² of the raw gradients, measured in
    the same pass for free (each tile's sum in float64, or in float32 for float32 gradients
    where vectors are 256 bits or less: ``_INNER_SRC``; the tiles' sum in float64).
    Parameters are read from ``P`` and written to ``Q`` when
    ``copy`` (JAX's double buffer; with streaming stores if ``stream``, :mod:`.streaming`), else in place
    (``Q`` is then ignored: LLVM must see one buffer to vectorise); ``clip`` compiles
    clipping by value in. Each variant is compiled on first use only, which keeps a first
    step's compile time to one loop.

    The new parameters and slots are also probed in the same pass, at no extra traffic:
    the largest exponent field among them (:func:`exponent_bits`, an integer max that
    vectorises) is all ones iff one of them is ±inf or NaN, and the loop then returns NaN.
    A non-finite result therefore means a non-finite gradient *or* a non-finite new value
    (the caller tells them apart, rarely, with :func:`sumsq_kernel`). ``dry`` computes the
    step and probes it without storing anything (the ``skip``/``raise`` policies' check).

    ``n_avg``: the last ``n_avg`` slots are weight averages (:mod:`..averaging`), whose
    weights are the last ``n_avg`` scalars: they move towards the parameters of tensors
    without a gradient too (as torch's ``AveragedModel`` averages every parameter), where
    the rest of the step leaves them alone. With ``n_avg = 0`` the kernel is the one it
    always was.

    ``unitwise``: the kernel takes three more arguments, ``UB, UN, F``, and the gradient of
    a tensor ``t`` with ``UN[t] > 1`` units is multiplied elementwise by its units' factors
    ``F[UB[t] + j mod UN[t]]`` as it is read (adaptive clipping, :mod:`.unitwise`).
    """
    ns, fields, name = inner_namespace(math_fn, n_slots, n_scal, dtype, copy, clip, stream,
                                       dry, unitwise)
    slots = [f"S{k}" for k in range(n_slots)]
    call = f"            s += inner(P[a:b], Q[a:b], {fields['slices']}G, {fields['row']})"
    if unitwise:
        call = _UNIT_CALL_SRC.format(slices=fields["slices"], row=fields["row"]) + call
    fields["call"] = call
    if n_avg and not dry:
        first_slot, first_w = n_slots - n_avg, 4 + n_scal - n_avg
        fields["nograd"] = "                avg_inner(P[a:b], {}{})\n".format(
            "".join(f"{s}[a:b], " for s in slots[first_slot:]),
            ", ".join(f"H[group[t], {first_w + i}]" for i in range(n_avg)))
    if fields["nograd"]:
        from ..averaging import _jitable, average

        ns["AVG"] = _jitable(average)
        kernel_cache.exec_source(_NOGRAD_SRC.format(
            avgs="".join(f"A{i}, " for i in range(n_avg)),
            weights=", ".join(f"w{i}" for i in range(n_avg)),
            steps="\n".join(f"        A{i}[j] = AVG(p, A{i}[j], w{i})" for i in range(n_avg))),
            name, ns)
        ns["avg_inner"] = _LOOP(ns["avg_inner"])
    kernel_cache.exec_source(_OUTER_SRC.format(**fields), name, ns)
    jit = kernel_cache.jit(fastmath=_FASTMATH, error_model="numpy", nogil=True)
    return jit(ns["kernel"])


def _sumsq(G):  # pragma: no cover - compiled by numba
    """Σ g² of one contiguous slice, in float64."""
    s = 0.0
    for j in range(G.shape[0]):
        x = np.float64(G[j])
        s += x * x
    return s


#: :func:`_sumsq` vectorised (``reassoc``), for the passes that only sum
_sumsq_inner = vector_width.njit(fastmath={"reassoc", "contract"}, nogil=True,
                                 forceinline=True)(_sumsq)
#: :func:`_sumsq` as a plain loop, for an update's tile whose own sum overflowed (rare):
#: not vectorised, so each update kernel compiles faster
_tile_sumsq = numba.njit(nogil=True, inline="always")(_sumsq)


@numba.njit(nogil=True, inline="always")
def _tile_sumsq_scaled(G, F):  # pragma: no cover - compiled by numba
    """Σ (g·f)² of a unitwise row whose own sum overflowed, the product in the gradient's
    type (as the unitwise update reads it), the squares summed in float64."""
    s = 0.0
    for j in range(G.shape[0]):
        s += np.float64(G[j] * F[j]) ** 2
    return s


@functools.cache
def sumsq_kernel(dtype: str) -> Any:
    """Σ g² over every gradient, accumulated in float64 (inf/NaN propagate); its pieces are
    shared between threads as the update kernel's (:mod:`.atomics`)."""
    dt, itemsize = np.dtype(dtype).type, np.dtype(dtype).itemsize
    jit = kernel_cache.jit(fastmath={"reassoc", "contract"}, nogil=True)
    inner = _sumsq_inner

    @jit
    def sumsq(gptr, seg_t, seg_first, seg_size, bounds, sync, acc, spins):  # pragma: no cover
        pieces = bounds.shape[0] - 1
        slot = atomics.arrive(sync)  # this thread's range of pieces (:mod:`.atomics`)
        k = atomics.claim(sync, slot)
        while k < pieces:
            s = 0.0
            for e in range(bounds[k], bounds[k + 1]):
                base = gptr[seg_t[e]]
                if base != 0:
                    s += inner(numba.carray(voidptr(base + seg_first[e] * itemsize), (seg_size[e],), dt))
            acc[k] = s
            atomics.piece_done(sync)
            k = atomics.claim(sync, slot)
        return atomics.all_done(sync, pieces, spins)

    return sumsq


@kernel_cache.jit(nogil=True)
def inside(ptr: np.ndarray, spans: np.ndarray) -> int:  # pragma: no cover - compiled
    """How many (address, span) pairs have the address in the [start, stop) span: 0 when
    none of ``ptr`` lies in one. A count only: boxing an array of which ones, every step,
    cost more than the loop; the caller finds them when there are any."""
    n = 0
    for k in range(spans.shape[0]):
        lo, size = spans[k, 0], np.uint64(spans[k, 1] - spans[k, 0])
        for i in range(ptr.shape[0]):  # one unsigned compare, no branch: vectorised
            n += np.uint64(ptr[i] - lo) < size
    return n


_REDUCE_BODY_SRC = """
        g = G[j] * gscale
        if CLIP:
            g = min(max(g, -cv), cv)
        p = P[j]
        g = g + l2 * p
        p = p * keep
        {lhs} = REDUCE(p, g, {reads}{scal_args})
{accumulate}"""

_REDUCE_INNER_SRC = """
def rinner(P, {slots}G, R, gscale, cv, l2, keep{scal}):
{init}
    for j in range(P.shape[0]):{body}
{store}
"""

# Where sums are float32 (ACC, as in _INNER_SRC): tiles of TILE elements, each tile's terms
# summed in ACC at the float32 width, the tiles in float64; a tile whose sums are not finite
# (a term overflowing ACC, or a NaN) is taken again in float64, as the loop above
_REDUCE_TILED_SRC = """
def rinner(P_, {slots_}G_, R, gscale, cv, l2, keep{scal}):
{init}
    n = P_.shape[0]
    a = 0
    while a < n:
        b = min(a + TILE, n)
        P, G = P_[a:b], G_[a:b]{rebind}
{tinit}
        for j in range(b - a):{tbody}
        if {finite}:
{add}
        else:
            for j in range(b - a):{wbody}
        a = b
{store}
"""

# the unitwise variant: as _INNER_F_SRC, row by row with the units' factors
_REDUCE_INNER_F_SRC = """
def rinner_f(P_, {slots_}G_, FR, u0, R, gscale, cv, l2, keep{scal}):
{init}
    n = P_.shape[0]
    U = FR.shape[0]
    j0 = 0
    u = u0
    while j0 < n:
        m = min(U - u, n - j0)
        P, G, FA = P_[j0:j0 + m], G_[j0:j0 + m], FR[u:u + m]{rebind}
        for j in range(m):{body}
        j0 += m
        u = 0
{store}
"""

_REDUCE_OUTER_SRC = """
def rkernel(P, {slots}gptr, seg_t, seg_first, seg_off, seg_size, bounds, sync, acc, spins,
            group, H, R{unit_args}):
    pieces = bounds.shape[0] - 1
    slot = arrive(sync)  # this thread's range of pieces (:mod:`.atomics`)
    k = claim(sync, slot)
    while k < pieces:
        for e in range(bounds[k], bounds[k + 1]):
            t = seg_t[e]
            base = gptr[t]
            if base == 0:  # no gradient: the second pass leaves the tensor alone
                continue
            a = seg_off[e]
            b = a + seg_size[e]
            G = carray(voidptr(base + seg_first[e] * ITEMSIZE), (seg_size[e],), DTYPE)
            r = group[t]
{call}
        acc[k] = 0.0
        piece_done(sync)
        k = claim(sync, slot)
    return all_done(sync, pieces, spins)
"""


@functools.cache
def reduce_kernel(reduce_fn: Any, n_slots: int, n_scal: int, n_terms: int, dtype: str,
                  clip: bool = False, unitwise: bool = False) -> Any:
    """The first pass of a two-pass optimizer: per segment of the :class:`~.threads.Plan`,
    the float64 sums of :func:`reduce_namespace`'s terms into ``R[segment]``. It reads
    only; the caller adds the segments of each tensor up in order, so the result does not
    depend on the thread count."""
    ns, fields, name = reduce_namespace(reduce_fn, n_slots, n_scal, n_terms, dtype, clip,
                                        unitwise)
    call = f"            rinner(P[a:b], {fields['slices']}G, R[e], {fields['row']})"
    if unitwise:
        call = ("            if UN[t] > 1:\n"
                f"                rinner_f(P[a:b], {fields['slices']}G, F[UB[t]:UB[t] + UN[t]], "
                f"seg_first[e] % UN[t], R[e], {fields['row']})\n"
                "            else:\n    " + call)
    ns.update(claim=atomics.claim, arrive=atomics.arrive, piece_done=atomics.piece_done,
              all_done=atomics.all_done)
    kernel_cache.exec_source(_REDUCE_OUTER_SRC.format(**fields, call=call), name, ns)
    return kernel_cache.jit(fastmath=_FASTMATH, error_model="numpy", nogil=True)(ns["rkernel"])


def reduce_namespace(reduce_fn: Any, n_slots: int, n_scal: int, n_terms: int, dtype: str,
                     clip: bool = False, unitwise: bool = False
                     ) -> tuple[dict[str, Any], dict[str, Any], str]:
    """The per-segment loop of a two-pass optimizer's first pass, compiled into any kernel
    that calls it (``forceinline``, as :func:`inner_namespace`'s): ``rinner(P, *slots, G,
    R, gscale, cv, l2, keep, *scalars)`` stores into ``R[:n_terms]`` the float64 sums of
    the ``n_terms`` elementwise terms ``reduce_fn(p, g, *slots, *scalars)`` over a
    segment (with the gradient scaled, clipped and L2-decayed as the update sees it),
    reading only. Where :func:`update_kernel` sums a float32 Σ g² per tile in float32
    (``ACC``), the terms are summed likewise: per
    tile of ``TILE`` elements in ``ACC``, a tile whose sums are not finite again in float64,
    the tiles in float64 (a float64 accumulator in the loop ran the float32 terms at half
    the vector width: LAMB's first pass over 1M float32 took 984 µs instead of 569 on one
    AVX2 core). ``unitwise``: the gradients are scaled by their units' factors as in
    :func:`update_kernel` (row by row, in float64). Returns the namespace
    (``ns["rinner"]``, ``ns["rinner_f"]`` where ``unitwise``), the template's fields and
    the kernel's name (the outer loop of :func:`reduce_kernel`, the XLA handler of
    :mod:`.xla_ffi`)."""
    slots = [f"S{k}" for k in range(n_slots)]
    fields = dict(
        slots="".join(s + ", " for s in slots),
        scal="".join(f", h{k}" for k in range(n_scal)),
        init="\n".join(f"    r{i} = 0.0" for i in range(n_terms)),
        lhs="".join(f"t{i}, " for i in range(n_terms)),
        reads="".join(f"{s}[j], " for s in slots),
        scal_args=", ".join(f"h{k}" for k in range(n_scal)),
        accumulate="\n".join(f"        r{i} += np.float64(t{i})" for i in range(n_terms)),
        store="\n".join(f"    R[{i}] = r{i}" for i in range(n_terms)),
        slices="".join(f"{s}[a:b], " for s in slots),
        row=", ".join(f"H[r, {i}]" for i in range(4 + n_scal)),
        unit_args=", UB, UN, F" if unitwise else "",
    )
    body = _REDUCE_BODY_SRC.format(**fields)
    acc = np.float64 if vector_width.ACC64 else np.dtype(dtype).type
    loop = vector_width.njit(fastmath=_FASTMATH, error_model="numpy", nogil=True, forceinline=True)
    ns: dict[str, Any] = {"np": np, "carray": numba.carray, "voidptr": voidptr,
                          "DTYPE": np.dtype(dtype).type, "ITEMSIZE": np.dtype(dtype).itemsize,
                          "REDUCE": _as_written(reduce_fn),
                          "CLIP": clip, "TILE": TILE, "ACC": acc}
    name = f"<mithril reduction {getattr(reduce_fn, '__qualname__', reduce_fn)}>"
    if acc is np.float64:  # float64 sums in the loop: already at the full width
        src = _REDUCE_INNER_SRC.format(**fields, body=body)
    else:
        q = [f"q{i}" for i in range(n_terms)]
        tile_body = _REDUCE_BODY_SRC.format(**{**fields, "accumulate": "\n".join(
            f"        {x} += ACC(t{i})" for i, x in enumerate(q))})
        src = _REDUCE_TILED_SRC.format(
            **fields, slots_="".join(f"{s}_, " for s in slots),
            rebind="".join(f"\n        {s} = {s}_[a:b]" for s in slots),
            tinit="\n".join(f"        {x} = ACC(0)" for x in q),
            tbody=tile_body.replace("\n", "\n    "),
            finite=" and ".join(f"np.isfinite({x})" for x in q),
            add="\n".join(f"            r{i} += np.float64({x})" for i, x in enumerate(q)),
            wbody=body.replace("\n", "\n" + " " * 8))
    if unitwise:
        src += _REDUCE_INNER_F_SRC.format(
            **fields, slots_="".join(f"{s}_, " for s in slots),
            rebind="".join(f"\n        {s} = {s}_[j0:j0 + m]" for s in slots),
            body=body.replace("\n", "\n    ").replace("G[j] * gscale", "(G[j] * FA[j]) * gscale"))
    kernel_cache.exec_source(src, name, ns)
    ns["rinner"] = loop(ns["rinner"])
    if unitwise:
        ns["rinner_f"] = loop(ns["rinner_f"])
    return ns, fields, name


@functools.cache
def segment_sumsq_kernel(dtype: str) -> Any:
    """Σ g² of each segment of the :class:`~.threads.Plan` into ``R[segment]`` (float64; 0
    for a tensor without gradient): per-tensor gradient norms, read-only."""
    dt, itemsize = np.dtype(dtype).type, np.dtype(dtype).itemsize
    jit = kernel_cache.jit(fastmath={"reassoc", "contract"}, nogil=True)
    inner = _sumsq_inner

    @jit
    def segsumsq(gptr, seg_t, seg_first, seg_size, bounds, sync, acc, spins, R):  # pragma: no cover
        pieces = bounds.shape[0] - 1
        slot = atomics.arrive(sync)  # this thread's range of pieces (:mod:`.atomics`)
        k = atomics.claim(sync, slot)
        while k < pieces:
            for e in range(bounds[k], bounds[k + 1]):
                base = gptr[seg_t[e]]
                if base != 0:
                    R[e] = inner(numba.carray(voidptr(base + seg_first[e] * itemsize),
                                              (seg_size[e],), dt))
            acc[k] = 0.0
            atomics.piece_done(sync)
            k = atomics.claim(sync, slot)
        return atomics.all_done(sync, pieces, spins)

    return segsumsq
