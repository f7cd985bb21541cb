"""Follow-ups of the sixty-seventh session's review."""
from __future__ import annotations

import numpy as np
import pytest


def test_mlx_ema_and_eval_params_keep_the_parameters_tree() -> None:
    """``mlx_optimizer(...).ema_params()`` / ``eval_params()`` come back in the user's own
    tree structure, as ``apply_gradients`` does (MLX's tree_map): tuples stay tuples, a dict
    with digit keys stays a dict. They came back through ``tree_unflatten``: lists."""
    mx = pytest.importorskip("mlx.core")
    from mithril.interop import mlx_optimizer
    from mithril.utils.optimizers import Adam, ScheduleFreeAdamW

    def tree(a: float) -> dict:
        return {"layers": ({"w": mx.full((2,), a)}, {"w": mx.full((3,), a)}),
                "d": {"0": mx.full((1,), a)}}

    for opt, get in [(mlx_optimizer(Adam(1e-2, ema_decay=0.9)), "ema_params"),
                     (mlx_optimizer(ScheduleFreeAdamW(1e-2)), "eval_params")]:
        params = tree(1.0)
        for _ in range(2):
            params = opt.apply_gradients(tree(0.5), params)
        got = getattr(opt, get)()
        assert isinstance(got["layers"], tuple) and isinstance(got["d"], dict)
        want = getattr(opt.mithril_optimizer, get)(
            *((opt.mithril_state,) if get == "ema_params" else (opt.mithril_state, opt._params)))
        np.testing.assert_array_equal(np.asarray(got["layers"][1]["w"]), want["layers.1.w"])
        np.testing.assert_array_equal(np.asarray(got["d"]["0"]), want["d.0"])
