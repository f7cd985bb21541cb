"""The JAX side of the data-parallel tests, run in a fresh interpreter with
``XLA_FLAGS=--xla_force_host_platform_device_count=2`` (``tests/test_jax_parallel.py``):
``python tests/jax_dp_worker.py DTYPE OUT.npz`` trains a small MLP 20 steps per
configuration on 1 device, on 2 devices with replicated state and with sharded state, and
saves the parameters, the gradient norms and the state's bytes per device.
"""

from __future__ import annotations

import os
import sys

import numpy as np

STEPS, BATCH = 20, 16


def make_opt(name: str):
    from mithril.utils.optimizers import LAMB, SGD, Adam

    if name == "adam":
        return Adam(0.05, clip_norm=0.3)
    if name == "sgd":
        return SGD(0.05, momentum=0.9, clip_norm=0.3)
    if name == "lamb":
        return LAMB(0.05, weight_decay=0.01, clip_norm=0.3)
    raise ValueError(name)


#: (optimizer, devices, shard_state); devices 0: the plain fused step (make_train_step)
CONFIGS = [(o, d, s) for o in ("adam", "sgd", "lamb") for d, s in ((0, False), (1, False),
                                                                    (2, False), (2, True))]


def key(cfg: tuple) -> str:
    return "-".join(str(c) for c in cfg)


def batch(step: int, dtype: str, rows: int = BATCH) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 + step)
    return {"input": rng.normal(size=(rows, 6)).astype(dtype),
            "target": rng.integers(0, 3, size=rows)}


def run(cfg: tuple, dtype: str) -> dict[str, np.ndarray]:
    import mithril as ml
    from mithril.backends import JaxBackend
    from mithril.cli.networks import mlp_spec
    from mithril.distributed.jax_parallel import (
        make_sharded_train_step,
        state_bytes_per_device,
    )

    name, devices, shard = cfg
    spec = mlp_spec(6, 3, (8, 5))
    be = JaxBackend(dtype=dtype, seed=0)
    compiled = ml.compile(spec.model, be, shapes=spec.shapes)
    params = compiled.get_parameters()
    if devices == 0:
        from mithril.utils.training import make_train_step

        step = make_train_step(compiled, make_opt(name), loss="loss", grad_norm=True)
    else:
        step = make_sharded_train_step(compiled, make_opt(name), loss="loss",
                                       devices=devices, shard_state=shard)
    state = step.init(params)
    res: dict[str, np.ndarray] = {}
    norms, sharded = [], []
    for t in range(STEPS):
        params, state, out = step(params, state, batch(t, dtype, BATCH if t != 7 else 15))
        norms.append(float(step.last_grad_norm))
        sharded.append(bool(getattr(step, "last_batch_sharded", False)))
    res.update({f"p/{n}": np.asarray(v) for n, v in params.items()})
    res["norms"] = np.array(norms)
    res["sharded"] = np.array(sharded)
    per = state_bytes_per_device(state.slots)
    res["bytes"] = np.array([per[k] for k in sorted(per)])
    plain = step.to_optimizer_state(state, params)
    res["step"] = np.array(plain.step)
    return res


def main() -> None:
    dtype, out = sys.argv[1], sys.argv[2]
    import jax

    assert jax.device_count() == 2, jax.devices()
    flat = {}
    for cfg in CONFIGS:
        flat.update({key(cfg) + "#" + k: v for k, v in run(cfg, dtype).items()})
    np.savez(out, **flat)


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
