"""What the float64 side-by-side runs against optax and Keras share
(test_optimizers_optax_catalog, test_optimizers_optax_more_catalog,
test_schedule_free_prodigy, test_conventions, test_lookahead): the learning-rate schedule
every one applies, and the code of the fresh interpreter in which the peers run
(``jax_enable_x64`` is process-global). The interpreter gets the constants and the source of
``problem``, :func:`lr_at` and :func:`rel_err`, so both sides draw the same gradients and
measure alike."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from typing import Any

from optimizer_parity import rel_err

LR_FACTORS = {40: 0.5, 70: 2.0}  # step index -> factor of the initial lr, from that step on


def lr_at(lr0: float, t: int) -> float:
    f = 1.0
    for s, x in LR_FACTORS.items():
        if t >= s:
            f = x
    return lr0 * f


def reference_code(prelude: str, main: str, problem: Callable[..., Any], steps: int,
                   shapes: dict[str, tuple], cases: Any, *extra: str) -> str:
    """The reference interpreter's script: ``prelude`` (its imports), the constants
    ``STEPS``, ``SHAPES``, ``LR_FACTORS`` and ``CASES``, the ``extra`` lines, the source of
    ``problem``, :func:`lr_at` and :func:`rel_err`, then ``main``."""
    return "\n".join([
        prelude, "import json\nimport numpy as np",
        f"STEPS = {steps!r}\nSHAPES = {shapes!r}\nLR_FACTORS = {LR_FACTORS!r}",
        f"CASES = json.loads({json.dumps(cases)!r})", *extra,
        inspect.getsource(problem), inspect.getsource(lr_at), inspect.getsource(rel_err),
        main])
