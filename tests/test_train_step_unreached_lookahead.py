"""The one-program JAX step with parameters the loss does not reach, for a Lookahead: its
inner optimizer counts each parameter's steps (a bias correction of ``t − missed``) while its
sync counts the group's (every ``sync_period`` steps of the optimizer), so each row of the
program is given its tensor's missed steps beside the group's count. A two-head model trained
on each head's loss in turn (``tests/test_unreached_params.py``'s), float32: the fused step
equals the separate calls with ``note_missed`` on JAX and the NumPy step (to 1e-6), compiles
once per loss, and a state dict taken mid-run resumes bit for bit (the harness of
``tests/test_train_step_unreached_tensorwise.py``). Before, a Lookahead's step fell back to
the separate calls (and the sharded step refused it)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("jax")

import test_train_step_unreached_tensorwise as T  # noqa: E402


def lookaheads() -> dict:
    from mithril.utils.optimizers import SGD, Adam, Lookahead, RAdam

    return {"lookahead-adam": lambda: Lookahead(Adam(1e-2, weight_decay=0.1), sync_period=3),
            "lookahead-sgd": lambda: Lookahead(SGD(0.05, momentum=0.9, weight_decay=0.1),
                                               sync_period=2, slow_step_size=0.6),
            "lookahead-radam": lambda: Lookahead(RAdam(1e-2), sync_period=3)}


@pytest.mark.parametrize("name", list(lookaheads()))
def test_one_device_equals_separate_calls_and_numpy(name: str, monkeypatch) -> None:
    monkeypatch.setattr(T, "optimizers", lookaheads)
    res = {**T._run(name, "one", "float32"), **T._run(name, "separate", "float32")}
    start = {n[len("start/"):]: v for n, v in res.items() if n.startswith("start/")}
    one = T._of(res, f"{name}/one")
    ref, ref_state = T._numpy_run(name, "float32", start)
    T._check_run(res, f"{name}/one", ref, ref_state, 1e-6)
    T._close(one, T._of(res, f"{name}/separate"), 1e-6, "fused vs separate calls")
    assert all(np.any(one[n] != start[n]) for n in start)  # (each head reached at times)


def test_reset_state_runs_in_the_one_program() -> None:
    """``reset_state``: the inner count restarts at each sync, one for all, so no missed step
    is counted (``note_missed``'s rule): every row takes the group's count, in the one
    program (its numbers: test_train_step_unreached_averaging)."""
    import mithril as ml
    from mithril.backends import JaxBackend
    from mithril.utils.optimizers import Adam, Lookahead
    from mithril.utils.training import make_train_step

    c = ml.compile(T.two_heads(), JaxBackend(dtype="float32", seed=0), shapes=T.SHAPES)
    opt = Lookahead(Adam(1e-2), sync_period=3, reset_state=True)
    assert make_train_step(c, opt, loss="loss_a").fused
    assert make_train_step(c, Lookahead(Adam(1e-2), sync_period=3), loss="loss_a").fused
