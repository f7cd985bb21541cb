"""The one-program JAX train step of the wrappers (Mechanize, ScheduleFree, SAM, DP-SGD:
:mod:`mithril.interop.optax_outer`) against the separate calls (``optimizer.init``'s state,
the wrapper's own ``update``), where they parted:

* Mechanize's ``x0`` of a parameter the first step's loss does not reach: the separate
  calls take every parameter's value at the first update, the program kept ``init``'s (a
  model whose params were replaced after ``step.init``, a pretrained one, then stepped its
  late head from the wrong reference point).
* A Mechanize whose ``betas`` changed in number since ``init``: the separate calls refuse
  the state; the program stepped on with the betas it still held (fewer) or raised a bare
  ``KeyError`` (more); a state of another optimizer was a bare ``KeyError`` too.
* A Mechanize or DP-SGD around a loss-aware base (PolyakSGD, Momo): the separate calls
  refuse (the wrapper hands its base no loss; DP-SGD's step would read the batch's loss,
  which is not private), the program ran it.
* The wrappers' own step counts (DP-SGD's ``dp_count``, the noise's counter; Mechanic's
  ``mechanic_count``) were float32 in the program: past 2**24 steps they stopped, and
  DP-SGD drew the same noise every step.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

pytest.importorskip("jax")

from test_train_step_outer_wrappers import _close, _problem, _same_states  # noqa: E402
from test_unreached_params import data_of, two_heads  # noqa: E402

import mithril as ml  # noqa: E402
from mithril.backends import JaxBackend  # noqa: E402
from mithril.utils import optimizers as o  # noqa: E402
from mithril.utils.training import make_train_step  # noqa: E402


def test_mechanize_x0_of_a_parameter_the_first_step_does_not_reach() -> None:
    """``step.init`` at the model's initial params, the first step at others (pretrained):
    the unreached head's ``x0`` is its value at that first step, in the program as in the
    separate calls, and so are the params once that head trains."""
    runs = {}
    for fused in (False, True):
        c = ml.compile(two_heads(), JaxBackend(), shapes={"input": [8, 3]})
        opt = o.Mechanize(o.Adam(learning_rate=1.0), s_init=1e-3)
        steps = {k: make_train_step(c, opt, loss=k) for k in ("loss_a", "loss_b")}
        start = c.get_parameters()
        state = steps["loss_a"].init(start) if fused else opt.init(start)
        params = {k: c.backend.array(np.asarray(v) * 0.5 + 0.1) for k, v in start.items()}
        rng = np.random.default_rng(1)
        for loss in ("loss_a", "loss_b", "loss_b"):
            data = {k: c.backend.array(v.astype(np.float32)) for k, v in data_of(rng).items()}
            params, state, _ = steps[loss](params, state, data)
        assert steps["loss_a"].fused
        runs[fused] = (params, steps["loss_a"].to_optimizer_state(state, params))
    (want, want_state), (got, state) = runs[False], runs[True]
    _close(state.slot("mechanic_x0"), want_state.slot("mechanic_x0"), 0.0, "x0")
    _close(got, want)
    _same_states(state, want_state)


@pytest.mark.parametrize("betas", [(0.5,), (0.5, 0.6, 0.7)])
def test_mechanize_betas_changed_in_number_are_refused_as_separately(betas: tuple) -> None:
    """The separate calls' ValueError, and nothing changed: the same state steps on once
    the betas are back."""
    c, be, batches = _problem()
    for fused in (False, True):
        opt = o.Mechanize(o.Adam(learning_rate=1.0), s_init=1e-3, num_betas=2)
        step = make_train_step(c, opt, loss="loss")
        params = c.get_parameters()
        state = step.init(params) if fused else opt.init(params)
        params, state, _ = step(params, state, batches[0])
        before = {k: np.asarray(v).copy() for k, v in params.items()}
        opt.betas = betas
        with pytest.raises(ValueError, match="Mechanic's scalars for 2 betas"):
            step(params, state, batches[1])
        _close(params, before, 0.0)
        opt.betas = (0.9, 0.99)
        params, state, _ = step(params, state, batches[1])
        assert step.to_optimizer_state(state, params).step == 2


def test_a_state_of_another_optimizer_is_refused_by_name() -> None:
    c, be, batches = _problem()
    params = c.get_parameters()
    plain = make_train_step(c, o.SGD(learning_rate=0.1), loss="loss")
    for opt, lacks in ((o.DPSGD(0.1), "dp_count"), (o.Mechanize(o.SGD(learning_rate=1.0)),
                                                    "mechanic_x0"),
                       (o.ScheduleFree(o.SGD(learning_rate=0.1)), "'z'")):
        step = make_train_step(c, opt, loss="loss")
        assert step.fused
        with pytest.raises(ValueError, match=f"lacks its .*{lacks}.*another optimizer"):
            step(params, plain.init(params), batches[0])


@pytest.mark.parametrize("wrap", ["mechanize", "dp"])
@pytest.mark.parametrize("base", [o.PolyakSGD, o.Momo])
def test_a_loss_aware_base_under_a_wrapper_that_hands_it_no_loss(wrap: str, base) -> None:
    """Not one program: the separate calls, whose base asks for the loss (as
    ``optimizer.update`` does), with nothing changed; ScheduleFree hands it the loss and
    stays one program."""
    c, be, batches = _problem()
    opt = (o.Mechanize(base(learning_rate=1.0), s_init=1e-3) if wrap == "mechanize"
           else o.DifferentiallyPrivate(base(learning_rate=0.1), noise_multiplier=0.5))
    step = make_train_step(c, opt, loss="loss")
    assert not step.fused
    params = c.get_parameters()
    state = step.init(params)
    before = {k: np.asarray(v).copy() for k, v in params.items()}
    with pytest.raises(TypeError, match="needs loss="):
        step(params, state, batches[0])
    _close(params, before, 0.0)
    assert state.step == 0
    assert make_train_step(c, o.ScheduleFree(base(learning_rate=0.1)), loss="loss").fused


@pytest.mark.parametrize("wrap", ["dp", "mechanize"])
def test_own_counts_past_float32s_integers(wrap: str) -> None:
    """A state at 2**24 aggregated steps (a resumed long run): two more steps count two,
    and DP-SGD's noise is each step's own draw, in the program as in the separate calls."""
    c, be, batches = _problem()
    key = "dp_count" if wrap == "dp" else "mechanic_count"

    def make():
        if wrap == "dp":
            return o.DPSGD(0.1, noise_multiplier=1.0, seed=1)
        return o.Mechanize(o.Adam(learning_rate=1.0), s_init=1e-3)

    runs = {}
    for fused in (False, True):
        opt = make()
        step = make_train_step(c, opt, loss="loss")
        params = c.get_parameters()
        state = opt.init(params)
        params, state, _ = step(params, state, batches[0])
        state.values[key] = float(2 ** 24)
        if fused:
            state = step.from_optimizer_state(state)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for data in batches[1:3]:
                params, state, _ = step(params, state, data)
        runs[fused] = (params, step.to_optimizer_state(state, params))
    (want, want_state), (got, state) = runs[False], runs[True]
    assert state.values[key] == want_state.values[key] == 2 ** 24 + 2
    _close(got, want)
    _same_states(state, want_state)
