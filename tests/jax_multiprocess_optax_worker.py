"""One of 2 JAX processes of ``tests/test_distributed_edges_vs_torch.py`` (``python
tests/jax_multiprocess_optax_worker.py PROCESS PORT OUT.npz``; float64): joined by
:func:`init_jax` (``jax.distributed``, gloo), one CPU device each, both pass the same global
batch to :func:`make_sharded_train_step` (sharded optimizer state over the 2 processes'
devices). Process 0 then runs the peer on its own device: a jitted optax step on the whole
batch's gradient, and saves both.
"""

from __future__ import annotations

import os
import sys

import numpy as np

STEPS, LR = 4, 0.05


def batch(t: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 + t)
    return {"input": rng.normal(size=(8, 6)), "target": rng.integers(0, 3, size=8)}


def main() -> None:
    me, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    from mithril.distributed.jax_parallel import init_jax, make_sharded_train_step

    init_jax(me, 2, f"127.0.0.1:{port}", timeout=60, local_devices=1)
    import jax
    import optax

    import mithril as ml
    from mithril.backends import JaxBackend
    from mithril.cli.networks import mlp_spec
    from mithril.utils.optimizers import Adam

    assert jax.process_count() == 2 and jax.device_count() == 2
    spec = mlp_spec(6, 3, (8,))
    compiled = ml.compile(spec.model, JaxBackend(dtype="float64", seed=0), shapes=spec.shapes)
    p0 = {n: np.asarray(v) for n, v in compiled.get_parameters().items()}
    step = make_sharded_train_step(compiled, Adam(LR), loss="loss", devices=1,
                                   shard_state=True)
    params = dict(p0)
    st = step.init(params)
    split = []
    for t in range(STEPS):
        params, st, _ = step(params, st, batch(t))
        split.append(step.last_batch_sharded)
    got = {f"ours/{n}": np.asarray(jax.device_get(v)) for n, v in params.items()}
    plain = step.to_optimizer_state(st, params)  # (every process gathers: a collective)
    got["ours_step"] = np.array(int(plain.step))
    if me == 0:
        dev = jax.local_devices()[0]
        tx = optax.adam(LR)

        @jax.jit
        def peer(p, s, d):
            g = jax.grad(lambda q: compiled.evaluate(q, d)["loss"])(p)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        p = jax.device_put({n: jax.numpy.asarray(v) for n, v in p0.items()}, dev)
        s = tx.init(p)
        for t in range(STEPS):
            p, s = peer(p, s, jax.device_put(batch(t), dev))
        got.update({f"optax/{n}": np.asarray(v) for n, v in p.items()})
        got["split"] = np.array(split)
        np.savez(out, **got)
    jax.distributed.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("JAX_ENABLE_X64", "1")
    main()
