"""mithril.distributed.jax_parallel: data-parallel JAX on 2 local CPU devices equals 1 device
(jax.sharding; XLA's collectives), with replicated and with sharded optimizer state.

The 2-device runs need ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` before JAX
starts, so they run in a fresh interpreter (``tests/jax_dp_worker.py``), once per dtype.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import jax_dp_worker as W  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "jax_dp_worker.py")


@pytest.fixture(scope="module", params=["float64", "float32"])
def results(request, tmp_path_factory) -> tuple[str, dict[str, np.ndarray]]:
    dtype = request.param
    out = str(tmp_path_factory.mktemp("jaxdp") / f"{dtype}.npz")
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    res = subprocess.run([sys.executable, WORKER, dtype, out], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    with np.load(out) as z:
        return dtype, {k: z[k] for k in z.files}


def _of(res: dict, cfg: tuple) -> dict[str, np.ndarray]:
    k = W.key(cfg) + "#"
    return {n[len(k):]: v for n, v in res.items() if n.startswith(k)}


@pytest.mark.parametrize("opt", ["adam", "sgd", "lamb"])
@pytest.mark.parametrize("shard", [False, True], ids=["replicated", "sharded"])
def test_two_devices_equal_one(results, opt, shard) -> None:
    """20 steps with clipping on (and LAMB's per-tensor trust ratio): 2 devices equal 1
    device and the plain fused step; the step with 15 rows runs replicated."""
    dtype, res = results
    tol = 1e-12 if dtype == "float64" else 1e-6
    one, plain, two = _of(res, (opt, 1, False)), _of(res, (opt, 0, False)), \
        _of(res, (opt, 2, shard))
    for k in one:
        if k.startswith("p/") or k == "norms":
            np.testing.assert_allclose(two[k], one[k], rtol=tol, atol=tol, err_msg=k)
            np.testing.assert_allclose(plain[k], one[k], rtol=tol, atol=tol, err_msg=k)
    assert one["norms"].max() > 0.3  # clipping was on
    assert int(two["step"]) == W.STEPS
    assert two["sharded"].tolist() == [t != 7 for t in range(W.STEPS)]
    full = int(one["bytes"][0])
    if shard:  # each device holds half (plus the padding of odd-sized tensors)
        assert len(two["bytes"]) == 2 and all(full / 2 <= b <= full / 2 + 64
                                              for b in two["bytes"])
    else:
        assert two["bytes"].tolist() == [full, full]


def test_refusals_in_process() -> None:
    import jax

    import mithril as ml
    from mithril.backends import NumpyBackend
    from mithril.cli.networks import mlp_spec
    from mithril.distributed.jax_parallel import (
        DeviceCountError,
        device_mesh,
        make_sharded_train_step,
    )

    with pytest.raises(DeviceCountError, match="xla_force_host_platform_device_count"):
        device_mesh(jax.local_device_count() + 1)
    with pytest.raises(DeviceCountError, match=">= 1"):
        device_mesh(0)
    spec = mlp_spec(6, 3, (4,))
    compiled = ml.compile(spec.model, NumpyBackend(dtype="float32"), shapes=spec.shapes)
    with pytest.raises(TypeError, match="JAX backend"):
        make_sharded_train_step(compiled, W.make_opt("adam"), loss="loss", devices=1)


def test_one_device_in_process_equals_plain_step() -> None:
    """In this process (one CPU device): the sharded step on a 1-device mesh, float32."""
    import mithril as ml
    from mithril.backends import JaxBackend
    from mithril.cli.networks import mlp_spec
    from mithril.distributed.jax_parallel import make_sharded_train_step
    from mithril.utils.training import make_train_step

    spec = mlp_spec(6, 3, (8,))
    got = {}
    for which in ("plain", "sharded"):
        compiled = ml.compile(spec.model, JaxBackend(dtype="float32", seed=0),
                              shapes=spec.shapes)
        params = compiled.get_parameters()
        step = make_train_step(compiled, W.make_opt("adam"), loss="loss") if which == "plain" \
            else make_sharded_train_step(compiled, W.make_opt("adam"), loss="loss", devices=1,
                                         shard_state=True)
        state = step.init(params)
        for t in range(3):
            params, state, _ = step(params, state, W.batch(t, "float32"))
        got[which] = {n: np.asarray(v) for n, v in params.items()}
        back = step.to_optimizer_state(state, params)
        assert back.step == 3
        if which == "sharded":  # its mesh and layout are fixed: the program follows them
            with pytest.raises(AttributeError, match="ShardedTrainStep.shard_state is fixed .*"
                                                     "make_sharded_train_step"):
                step.shard_state = False
            assert step.shard_state is True
    for n in got["plain"]:
        np.testing.assert_allclose(got["sharded"][n], got["plain"][n], rtol=1e-6, atol=1e-7)


_DEAD_PEER = """
import os, sys, time
import numpy as np
rank, port = int(sys.argv[1]), sys.argv[2]
from mithril.distributed.jax_parallel import init_jax
init_jax(rank, 2, f"127.0.0.1:{port}", timeout=20, heartbeat=3)
import jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(np.array(jax.devices()), ("data",))
sharding = NamedSharding(mesh, P("data"))
host = np.arange(8.0)
x = jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
total = jax.jit(lambda a: a.sum(), out_shardings=NamedSharding(mesh, P()))
for step in range(10_000):
    if rank == 1 and step == 3:
        os._exit(3)  # dies mid-run, without a word
    float(total(x).addressable_data(0))  # a collective every step
    time.sleep(0.05)
print("rank 0 finished: the dead peer went unnoticed")
"""


@pytest.mark.slow
def test_a_dead_process_stops_the_other_instead_of_a_hang(tmp_path) -> None:
    """Two processes joined by jax.distributed (init_jax); one exits mid-run. The other
    must stop by itself within the heartbeat bound (JAX's coordination service aborts it),
    not hang: the test gives it 90 s."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = tmp_path / "dead_peer.py"
    script.write_text(_DEAD_PEER)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), port], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    try:
        out0, err0 = procs[0].communicate(timeout=90)
    finally:
        for p in procs:
            p.kill()
    assert procs[1].wait(timeout=10) == 3
    assert procs[0].returncode != 0, out0
    assert "finished" not in out0
    assert "distributed" in err0.lower() or "gloo" in err0.lower(), err0[-2000:]
