"""DP-SGD under ``DataParallel`` (``tests/dist_private_worker.py`` runs 2 gloo ranks):
each rank's per-example gradients of its share of the batch give the step one process
takes with ``DifferentiallyPrivate`` on the whole batch (noise included: drawn once, the
same on every rank), and, without noise, ``optax.contrib.dpsgd``'s."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import dist_private_worker as W  # noqa: E402
from test_distributed import _free_port, run_ranks  # noqa: E402

import mithril as ml  # noqa: E402
from mithril.backends import NumpyBackend  # noqa: E402
from mithril.utils.per_example import per_example_gradients  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "dist_private_worker.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    port, out = _free_port(), str(tmp_path_factory.mktemp("dp") / "dp")
    results, logs = run_ranks(lambda r: [WORKER, str(r), "2", str(port), out], out, 2, 180,
                              20, "dp")
    for r, res in enumerate(results):
        if res is None:
            pytest.fail(f"rank {r} wrote nothing:\n{logs[r].decode()[-3000:]}")
    return results


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("which", ["dpsgd", "dpsgd0", "adam", "opacus"])
def test_two_ranks_step_as_one_process_on_the_whole_batch(ranks, backend, which) -> None:
    want = W.run(backend, which, 0, 1, wrap=False)
    for r, res in enumerate(ranks):
        got = res[f"{backend}/{which}"]
        assert got["count"] == W.STEPS
        for k, v in want["params"].items():
            np.testing.assert_allclose(got["params"][k], v, rtol=1e-13, atol=1e-14,
                                       err_msg=f"rank {r} {backend} {which} {k}")
        # a batch gradient on rank 1 (no example axis) is refused on both ranks, naming the
        # key; nothing changed (params, the noise's count), and the run went on
        assert got["refused"].startswith("ShapeError: "), got["refused"]
        assert "per-example gradients have shape (batch" in got["refused"]
        if r == 0:
            assert "rank 1 refused, so every rank did" in got["refused"]
        assert got["unchanged"] is True


def test_without_noise_two_ranks_equal_optax_dpsgd(ranks) -> None:
    """optax's ``contrib.dpsgd`` on the whole batch's per-example gradients (the same
    params at every step: computed here along optax's trajectory)."""
    import jax
    import optax

    jax.config.update("jax_enable_x64", True)
    backend = NumpyBackend(dtype="float64")
    compiled = ml.compile(W.model(), backend, shapes={"input": [None, 4]})
    rng = np.random.default_rng(0)
    params = {k: 0.5 * rng.standard_normal(s)
              for k, s in sorted(compiled.parameter_shapes.items())}
    tx = optax.contrib.dpsgd(0.5, W.CLIP, 0.0, seed=7)
    state = tx.init(params)
    for t in range(W.STEPS):
        x, y = W.batch(t)
        grads = per_example_gradients(compiled, params, {"input": x, "target": y},
                                      loss="loss")
        upd, state = tx.update({k: jax.numpy.asarray(g) for k, g in grads.items()}, state)
        params = {k: np.asarray(optax.apply_updates(params[k], upd[k])) for k in params}
    for res in ranks:
        for k, v in params.items():
            np.testing.assert_allclose(res["numpy/dpsgd0"]["params"][k], v, rtol=1e-12,
                                       atol=1e-13, err_msg=k)
