"""The JAX side of ``tests/test_distributed_edges_vs_torch.py``, in a fresh interpreter
with ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` and float64 (``python
tests/jax_optax_peer_worker.py OUT.npz``): :func:`make_sharded_train_step` on 2 CPU devices
(replicated and sharded optimizer state) and its peer, a jitted optax step on the mean
gradient over the same mesh (the batch split along ``"data"``, the parameters replicated:
XLA inserts the all-reduce), 6 steps each; step 3's batch of 15 rows cannot be split over 2
devices and runs replicated on both sides.
"""

from __future__ import annotations

import os
import sys

import numpy as np

STEPS, BATCH, ODD, LR = 6, 16, 3, 0.05


def batch(t: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 + t)
    rows = 15 if t == ODD else BATCH
    return {"input": rng.normal(size=(rows, 6)), "target": rng.integers(0, 3, size=rows)}


def main() -> None:
    import jax
    import optax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import mithril as ml
    from mithril.backends import JaxBackend
    from mithril.cli.networks import mlp_spec
    from mithril.distributed.jax_parallel import make_sharded_train_step
    from mithril.utils.optimizers import SGD, Adam

    assert jax.device_count() == 2, jax.devices()
    spec = mlp_spec(6, 3, (8, 5))
    compiled = ml.compile(spec.model, JaxBackend(dtype="float64", seed=0), shapes=spec.shapes)
    p0 = {n: np.asarray(v) for n, v in compiled.get_parameters().items()}
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rep, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    cases = {"adam": (lambda: Adam(LR), lambda: optax.adam(LR)),
             "sgd": (lambda: SGD(LR, momentum=0.9, nesterov=True, weight_decay=0.01),
                     lambda: optax.chain(optax.add_decayed_weights(0.01),
                                         optax.sgd(LR, momentum=0.9, nesterov=True)))}
    out: dict[str, np.ndarray] = {}
    for name, (ours, theirs) in cases.items():
        for shard in (False, True):
            step = make_sharded_train_step(compiled, ours(), loss="loss", devices=2,
                                           shard_state=shard)
            params = {n: jax.numpy.asarray(v) for n, v in p0.items()}
            st = step.init(params)
            split = []
            for t in range(STEPS):
                params, st, _ = step(params, st, batch(t))
                split.append(step.last_batch_sharded)
            out.update({f"{name}/{shard}/{n}": np.asarray(v) for n, v in params.items()})
            out[f"{name}/{shard}/split"] = np.array(split)
        tx = theirs()

        @jax.jit
        def peer(p, s, d, tx=tx):
            g = jax.grad(lambda q: compiled.evaluate(q, d)["loss"])(p)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        p = jax.device_put({n: jax.numpy.asarray(v) for n, v in p0.items()}, rep)
        s = jax.device_put(tx.init(p), rep)
        for t in range(STEPS):
            d = batch(t)
            d = jax.device_put(d, rows if len(d["target"]) % 2 == 0 else rep)
            p, s = peer(p, s, d)
        out.update({f"{name}/optax/{n}": np.asarray(v) for n, v in p.items()})
    np.savez(sys.argv[1], **out)


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
