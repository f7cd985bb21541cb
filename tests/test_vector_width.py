"""The fused kernels prefer the CPU's widest vectors (:mod:`...engines.vector_width`): the
attribute is on the kernels' LLVM functions and nowhere else, the kernel cache keys on the
width, ``MITHRIL_VECTOR_WIDTH`` sets it, and both widths compute the same step (to float32
rounding: the Σg² and the fused operations may associate differently)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import llvmlite.binding as ll
import numba
import numpy as np
import pytest

from mithril.utils.optimizers import Adam
from mithril.utils.optimizers.engines import kernel_cache, kernels, vector_width

ATTR = '"prefer-vector-width"="512"'


def _axpy(x, y, a):  # pragma: no cover - compiled by numba
    for j in range(x.shape[0]):
        y[j] = a * x[j] + y[j]


def _ir(disp):
    return disp.inspect_llvm(disp.signatures[0])


def test_kernels_carry_the_attribute_and_user_functions_do_not():
    assert vector_width.WIDTH == 512 and vector_width.PIPELINE is not None
    x, y = np.ones(64, np.float32), np.zeros(64, np.float32)
    ours, plain = vector_width.njit(_axpy), numba.njit(_axpy)
    ours(x, y, np.float32(2.0))
    plain(x, y, np.float32(2.0))
    np.testing.assert_array_equal(y, np.full(64, 4.0, np.float32))
    assert ATTR in _ir(ours)
    assert "prefer-vector-width" not in _ir(plain)  # numba's own target is left alone


def test_the_update_kernel_carries_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MITHRIL_CACHE_DIR", str(tmp_path))  # compiled here, not loaded
    kernel = kernels.update_kernel.__wrapped__(Adam(1e-3).kernel_math(), 2, 7, "float32")
    p, m, v = np.ones(64, np.float32), np.zeros(64, np.float32), np.zeros(64, np.float32)
    from mithril.utils.optimizers.engines import threads

    table = np.array([[1, 0, 0, 1, 1e-3, 0.1, 0.999, 0.001, 1e-2, 0.0316, 1e-8]], np.float32)
    threads.Plan(np.array([0]), np.array([64])).run(
        kernel, (p, p, m, v), np.array([np.full(64, 0.5, np.float32).ctypes.data]),
        (np.zeros(1, np.int64), table))
    assert (p < 1).all() and ATTR in _ir(kernel)


# (``flatten()`` lists every feature, "-avx512f" where the CPU lacks it: ask for the flag)
@pytest.mark.skipif(not ll.get_host_cpu_features().get("avx512f", False),
                    reason="the CPU has no 512-bit vectors (the attribute is checked above)")
def test_512_bit_registers_where_the_cpu_has_them():
    x, y = np.ones(64, np.float32), np.zeros(64, np.float32)
    ours = vector_width.njit(_axpy)
    ours(x, y, np.float32(2.0))
    assert "zmm" in ours.inspect_asm(ours.signatures[0])


def test_the_cache_keys_on_the_width():
    assert f"vector width {vector_width.WIDTH}" in kernel_cache.environment()
    assert f"float64 sums {vector_width.ACC64}" in kernel_cache.environment()


@pytest.mark.parametrize("name, avx512, width, acc64", [
    ("sapphirerapids", True, 512, True),  # 512-bit units: the float64 Σg², 8 lanes
    ("znver5", True, 512, True),
    ("znver4", True, 512, False),  # AVX-512 on 256-bit units: 16 float32 lanes
    ("znver4", True, 256, False),
    ("sapphirerapids", True, 256, False),  # 256-bit vectors: the gradient's type
    ("znver3", False, 512, False),  # AVX2
])
def test_the_tile_sums_are_float64_only_on_full_width_avx512(monkeypatch, name, avx512, width,
                                                              acc64):
    """Each tile's Σg² is summed in float64 where the update's float32 loop keeps 8 lanes of
    a 512-bit unit with it; on Zen 4 (AVX-512 on 256-bit units) and narrower vectors in the
    gradient's type, so that the update runs on a full register of float32 lanes."""
    monkeypatch.setattr(ll, "get_host_cpu_name", lambda: name)
    monkeypatch.setattr(ll, "get_host_cpu_features", lambda: {"avx512f": avx512, "avx2": True})
    monkeypatch.setattr(vector_width, "WIDTH", width)
    monkeypatch.setattr(numba.config, "CPU_NAME", None)
    assert vector_width._acc64() is acc64
    monkeypatch.setattr(numba.config, "CPU_NAME", "generic")  # a named target: not the host's
    assert vector_width._acc64() is False


SCRIPT = """
import json
import numpy as np
from mithril.utils.optimizers import Adam
from mithril.utils.optimizers.engines import kernel_cache, vector_width

rng = np.random.default_rng(0)
params = {"w": rng.standard_normal(5000).astype(np.float32)}
opt = Adam(1e-2)
state = opt.init(params)
for k in range(5):
    params, state = opt.update(params, {"w": rng.standard_normal(5000).astype(np.float32)}, state)
print(json.dumps({"width": vector_width.WIDTH, "pipeline": vector_width.PIPELINE is not None,
                  "env": kernel_cache.environment(), "w": params["w"].tolist()}))
"""


#: the width alone: no kernel to compile or load
WIDTH_SCRIPT = """
import json
from mithril.utils.optimizers.engines import vector_width
print(json.dumps({"width": vector_width.WIDTH}))
"""


def _run(tmp_path, width, script=SCRIPT):
    env = {**os.environ, "MITHRIL_CACHE_DIR": str(tmp_path / "cache"),
           "MITHRIL_VECTOR_WIDTH": width}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_environment_variable_sets_it_and_both_widths_agree(tmp_path):
    wide, default = _run(tmp_path, "512"), _run(tmp_path, "0")
    assert (wide["width"], wide["pipeline"]) == (512, True)
    assert (default["width"], default["pipeline"]) == (0, False)
    assert wide["env"] != default["env"]  # two kernels in one cache folder, not one
    np.testing.assert_allclose(wide["w"], default["w"], rtol=1e-6, atol=1e-7)
    # (an unknown value: the default)
    assert _run(tmp_path, "bogus", WIDTH_SCRIPT)["width"] == 512
