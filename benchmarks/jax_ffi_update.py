"""The design measured before it was adopted (the fifty-eighth session; what the train step
runs since is ``mithril/utils/optimizers/engines/xla_ffi.py``, the engines' own kernel):
the one-program JAX step's optimizer update and finiteness
probe as ONE call of a numba kernel through XLA's typed FFI (no C compiler: the handler is a
numba ``cfunc`` reading XLA's C call frame, ``jaxlib/include/xla/ffi/api/c_api.h``), against
the traced ``jnp`` update that the one-program step compiles today, with the probe
(``"propagate"``: Σ g² and Σ (x − x) of every new value) and without it (``"unchecked"``).

Adam over the tensors of an MLP's layers (``--layers`` hidden layers of 128, weights and
biases; 3 by default: [64, 128, 128, 10]'s shapes; 50: the issue's 50-layer MLP), float32,
params and moments donated (the FFI call writes them in place: ``input_output_aliases``).
Printed: each variant's XLA compile (process CPU time, lowering included) and its median
per call over ``--rounds`` rounds of 200 calls (variants interleaved, four gradient sets
taken in turn), with ratios to the traced checked update; bytes counted as fp32 Adam's 28 a
parameter (the probe's reads are not counted). Checked once: the FFI update equals the
traced one to 1e-6 and sees a NaN gradient, and every variant moved every parameter.

The kernel here is one loop per tensor on one thread, with the engines' fastmath flags and
their integer probe of the exponent bits, but not their tiles, float64 totals or threads:
it measures what the call costs XLA to compile and to run, and roughly what a fused loop
does behind it, not the engines' kernels themselves.

    python benchmarks/jax_ffi_update.py [--layers 3] [--rounds 15]
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from numba import carray, cfunc, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from mithril.utils.optimizers.engines.kernels import exponent_bits

LR, B1, B2, EPS = 1e-3, 0.9, 0.999, 1e-8


@intrinsic
def _ptr(typingctx, addr):  # noqa: ARG001 - numba's intrinsic signature
    def codegen(context, builder, sig, args):  # noqa: ARG001
        return builder.inttoptr(args[0], cgutils.voidptr_t)
    return types.voidptr(types.int64), codegen


@njit(inline="always")
def _i64(addr, n):
    return carray(_ptr(addr), (n,), dtype=np.int64)


@njit(inline="always")
def _f32(addr, n):
    return carray(_ptr(addr), (n,), dtype=np.float32)


@njit(inline="always")
def _data(buf):  # XLA_FFI_Buffer: struct_size, extension_start, dtype, data, rank, dims
    return _i64(buf, 4)[3]


@njit(inline="always")
def _size(buf):
    b = _i64(buf, 6)
    n = 1
    if b[4] > 0:
        dims = _i64(b[5], b[4])
        for j in range(b[4]):
            n *= dims[j]
    return n


#: the engines' vectorising flags (not nnan/ninf: the probe is an integer test of the
#: exponent bits, which no flag folds away)
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}


@cfunc(types.voidptr(types.voidptr), nopython=True, fastmath=FASTMATH)
def _handler(frame):
    """XLA_FFI_CallFrame (64-bit): extension_start at 8, stage at 32, args {size at 56,
    buffers at 72}, rets {size at 96, buffers at 112}. A metadata query (extension type 1)
    gets API version 0.3 and no traits; stages before execute (3) do nothing. Arguments:
    [lr, b1, b2, eps, 1 − b1ᵗ, 1 − b2ᵗ], then p, g, m, v per tensor; results: p, m, v per
    tensor, then [Σ g², NaN where a new value is not finite (else 0)]. Returns NULL
    (success)."""
    cf = carray(frame, (22,), dtype=np.int64)
    if cf[1] != 0:
        ext = _i64(cf[1], 4)
        if (ext[1] & 0xFFFFFFFF) == 1:  # XLA_FFI_Extension_Metadata
            md = carray(_ptr(ext[3]), (12,), dtype=np.int32)
            md[6], md[7], md[8] = 0, 3, 0  # api_version.major, .minor, traits
            return _ptr(0)
    if (cf[4] & 0xFFFFFFFF) != 3:
        return _ptr(0)
    nargs = cf[7]
    args, rets = _i64(cf[9], nargs), _i64(cf[14], cf[12])
    sc = _f32(_data(args[0]), 6)
    lr, b1, b2, eps, c1, c2 = sc[0], sc[1], sc[2], sc[3], sc[4], sc[5]
    n = (nargs - 1) // 4
    sq, probe = np.float32(0), np.float32(0)
    for t in range(n):
        k = _size(args[1 + 4 * t])
        p, g = _f32(_data(args[1 + 4 * t]), k), _f32(_data(args[2 + 4 * t]), k)
        m, v = _f32(_data(args[3 + 4 * t]), k), _f32(_data(args[4 + 4 * t]), k)
        po, mo = _f32(_data(rets[3 * t]), k), _f32(_data(rets[3 * t + 1]), k)
        vo = _f32(_data(rets[3 * t + 2]), k)
        z = np.int32(0)
        for i in range(k):
            gi = g[i]
            mi = b1 * m[i] + (np.float32(1) - b1) * gi
            vi = b2 * v[i] + (np.float32(1) - b2) * gi * gi
            pi = p[i] - lr * (mi / c1) / (np.sqrt(vi / c2) + eps)
            po[i], mo[i], vo[i] = pi, mi, vi
            sq += gi * gi
            z = max(z, max(exponent_bits(pi), max(exponent_bits(mi), exponent_bits(vi))))
        if z == 0x7F800000:
            probe = np.float32(np.nan)
    out = _f32(_data(rets[3 * n]), 2)
    out[0], out[1] = sq, probe
    return _ptr(0)


def register() -> None:
    new = ctypes.pythonapi.PyCapsule_New
    new.restype, new.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p,
                                                   ctypes.c_void_p]
    jax.ffi.register_ffi_target("bench_adam_probe", new(_handler.address, None, None),
                                platform="cpu")


def scalars(t):
    return jnp.stack([jnp.float32(LR), jnp.float32(B1), jnp.float32(B2), jnp.float32(EPS),
                      (1 - B1 ** t).astype(jnp.float32), (1 - B2 ** t).astype(jnp.float32)])


def ffi_step(ps, gs, ms, vs, t):
    args = [scalars(t)]
    outs, aliases = [], {}
    for i, (p, g, m, v) in enumerate(zip(ps, gs, ms, vs)):
        args += [p, g, m, v]
        outs += [jax.ShapeDtypeStruct(p.shape, p.dtype)] * 3
        aliases.update({1 + 4 * i: 3 * i, 3 + 4 * i: 3 * i + 1, 4 + 4 * i: 3 * i + 2})
    outs.append(jax.ShapeDtypeStruct((2,), jnp.float32))
    res = jax.ffi.ffi_call("bench_adam_probe", outs, input_output_aliases=aliases)(*args)
    n = len(ps)
    return res[0:3 * n:3], res[1:3 * n:3], res[2:3 * n:3], jnp.all(jnp.isfinite(res[-1]))


def traced_step(ps, gs, ms, vs, t, check=True):
    sc = scalars(t)
    new = [(p - sc[0] * (mi / sc[4]) / (jnp.sqrt(vi / sc[5]) + sc[3]), mi, vi)
           for p, g, m, v in zip(ps, gs, ms, vs)
           for mi, vi in [(B1 * m + (1 - B1) * g, B2 * v + (1 - B2) * g * g)]]
    nps, nms, nvs = (list(x) for x in zip(*new))
    if not check:
        return nps, nms, nvs, jnp.asarray(True)
    sq = sum(jnp.sum(g * g) for g in gs)
    probe = sum(jnp.sum((a - a) + (b - b) + (c - c)) for a, b, c in zip(nps, nms, nvs))
    return nps, nms, nvs, jnp.isfinite(sq) & jnp.isfinite(probe)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=15)
    a = ap.parse_args()
    register()
    widths = [64] + [128] * (a.layers - 1) + [10]
    shapes = [s for i, o in zip(widths, widths[1:]) for s in ((o, i), (o,))]
    rng = np.random.default_rng(0)

    def make():
        return [jnp.asarray(rng.standard_normal(s).astype(np.float32)) for s in shapes]

    variants = {"ffi call": jax.jit(ffi_step, donate_argnums=(0, 2, 3)),
                "traced, checked": jax.jit(traced_step, donate_argnums=(0, 2, 3)),
                "traced, unchecked": jax.jit(lambda *x: traced_step(*x, check=False),
                                             donate_argnums=(0, 2, 3))}
    start, zeros = make(), [jnp.zeros(s, jnp.float32) for s in shapes]
    grads = [make() for _ in range(4)]
    compile_s = {}
    for name, f in variants.items():
        c0 = time.process_time()
        f.lower(start, grads[0], zeros, zeros, jnp.float32(1)).compile()
        compile_s[name] = time.process_time() - c0

    def fresh():
        return [x.copy() for x in start], [x.copy() for x in zeros], [x.copy() for x in zeros]

    p1, m1, v1 = fresh()
    p2, m2, v2 = fresh()
    got = variants["ffi call"](p1, grads[0], m1, v1, jnp.float32(1))
    want = variants["traced, checked"](p2, grads[0], m2, v2, jnp.float32(1))
    for x, y in zip(got[0] + got[1] + got[2], want[0] + want[1] + want[2]):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)
    bad = list(grads[0])
    bad[-1] = bad[-1].at[0].set(jnp.nan)
    p1, m1, v1 = fresh()
    assert not bool(variants["ffi call"](p1, bad, m1, v1, jnp.float32(1))[3])

    state = {k: fresh() for k in variants}
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(a.rounds):
        for name in names[r % 3:] + names[:r % 3]:
            ps, ms, vs = state[name]
            t0 = time.perf_counter()
            for i in range(200):
                ps, ms, vs, ok = variants[name](ps, grads[i % 4], ms, vs, jnp.float32(i + 1))
            ok.block_until_ready()
            times[name].append((time.perf_counter() - t0) / 200)
            state[name] = (ps, ms, vs)
    for name in names:  # every parameter moved
        assert all(not np.array_equal(np.asarray(p), np.asarray(s))
                   for p, s in zip(state[name][0], start)), name
    n_params = sum(int(np.prod(s)) for s in shapes)
    ref = statistics.median(times["traced, checked"])
    print(f"Adam over {len(shapes)} tensors ({n_params:,} float32 params, {a.layers} layers); "
          f"median of {a.rounds} rounds of 200 calls")
    print(f"{'variant':20s} {'compile s':>10s} {'us/call':>9s} {'vs checked':>11s} {'GB/s':>6s}")
    for name in names:
        med = statistics.median(times[name])
        print(f"{name:20s} {compile_s[name]:10.3f} {med * 1e6:9.1f} {med / ref:10.2f}x "
              f"{28 * n_params / med / 1e9:6.1f}")


if __name__ == "__main__":
    main()
