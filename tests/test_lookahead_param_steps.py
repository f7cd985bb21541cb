"""A Lookahead under ``torch_optimizer`` counts each parameter's own steps, as the other
optimizers there: its inner optimizer's rules (Adam's bias corrections) count the steps a
parameter had a gradient at since its group joined (torch.optim's per-parameter ``step``),
and its sync counts the group's steps (timm's Lookahead keeps one count per param group,
from its ``add_param_group``, and passes over a parameter whose ``.grad`` is None). torch
has no Lookahead: the reference is written by hand, torch.optim.Adam plus per-parameter
slow weights synced on the group's own count, float64:

* a group added after ``K`` steps (``add_param_group``): its slow weights start as its
  parameters at the add and sync every ``P``-th step since (was: refused);
* a parameter whose ``.grad`` is None at some steps (its Adam count is its own), and one
  that never has one (its slow weights stay its fast ones; was: one count for all).

State dicts carry the counts: ``Lookahead.load_state_dict`` restores ``"missed"`` (it was
dropped: the resumed run's bias corrections counted the missed steps), and a
``torch_optimizer`` resume continues bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_interop_torch_optimizer import default_dtype

from mithril.interop import torch_optimizer
from mithril.utils import optimizers as O

STEPS, K, P, ALPHA, LR = 16, 4, 3, 0.5, 0.05
#: the steps at which ``b`` has no gradient (its first, a sync step of group 0: t = 6, ...)
NONE_AT = {0, 1, 5, 6, 10}
TOL = 1e-10


def _data() -> tuple[dict[str, np.ndarray], dict[str, list[np.ndarray]]]:
    rng = np.random.default_rng(0)
    init = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(5),
            "c": rng.standard_normal(2), "d": rng.standard_normal(3)}
    grads = {n: [rng.standard_normal(v.shape) for _ in range(STEPS)] for n, v in init.items()}
    return init, grads


def _grad(name: str, i: int) -> bool:
    """Whether ``name`` has a gradient at step ``i``: ``b`` misses ``NONE_AT``, ``c``
    (the late group) has one from its add, ``d`` never has one."""
    return {"a": True, "b": i not in NONE_AT, "c": i >= K, "d": False}[name]


def reference(late: bool) -> tuple[dict[str, list[np.ndarray]], dict[str, np.ndarray], dict]:
    """torch.optim.Adam over a, b, d (c added after ``K`` steps with ``late``) and, per
    parameter, slow weights (its value when its group started) synced on its group's
    count, a parameter without a ``.grad`` passed over (timm's ``update_slow``). Returns
    each parameter's value after every step, the final slow weights and torch's steps."""
    init, grads = _data()
    x = {n: torch.tensor(v, requires_grad=True) for n, v in init.items()}
    opt = torch.optim.Adam([x["a"], x["b"], x["d"]], lr=LR)
    groups = [(["a", "b", "d"], 0)]
    slow = {n: x[n].detach().clone() for n in "abd"}
    out: dict[str, list[np.ndarray]] = {n: [] for n in "abcd"}
    for i in range(STEPS):
        if late and i == K:
            opt.add_param_group({"params": [x["c"]]})
            groups.append((["c"], K))
            slow["c"] = x["c"].detach().clone()
        for n in "abcd":
            x[n].grad = torch.tensor(grads[n][i]) if _grad(n, i) else None
        opt.step()
        t = i + 1
        for names, since in groups:
            if (t - since) % P:
                continue
            for n in names:
                if x[n].grad is not None:
                    with torch.no_grad():
                        slow[n] += ALPHA * (x[n] - slow[n])
                        x[n].copy_(slow[n])
        for n in "abcd":
            out[n].append(x[n].detach().numpy().copy())
    steps = {n: float(opt.state[x[n]]["step"]) if x[n] in opt.state else 0.0 for n in "abcd"}
    return out, {n: v.numpy().copy() for n, v in slow.items()}, steps


def ours(late: bool, resume_at: int | None = None
         ) -> tuple[dict[str, list[np.ndarray]], dict[str, np.ndarray], dict, torch.optim.Optimizer]:
    """The same run with ``torch_optimizer(Lookahead(Adam))``; ``resume_at``: its
    ``state_dict()`` loaded into a new wrapper (and parameters) after that many steps."""
    init, grads = _data()
    x = {n: torch.nn.Parameter(torch.tensor(v)) for n, v in init.items()}

    def make() -> torch.optim.Optimizer:
        return torch_optimizer(O.Lookahead(O.Adam(LR), sync_period=P, slow_step_size=ALPHA),
                               [("a", x["a"]), ("b", x["b"]), ("d", x["d"])])

    opt = make()
    out: dict[str, list[np.ndarray]] = {n: [] for n in "abcd"}
    for i in range(STEPS):
        if late and i == K:
            opt.add_param_group({"params": [("c", x["c"])]})
        if i == resume_at:
            saved = opt.state_dict()
            x = {n: torch.nn.Parameter(p.detach().clone()) for n, p in x.items()}
            opt = make()
            if late and i >= K:
                opt.add_param_group({"params": [("c", x["c"])]})
            opt.load_state_dict(saved)
        opt.zero_grad(set_to_none=True)
        for n in "abcd":
            if _grad(n, i):
                x[n].grad = torch.tensor(grads[n][i])
        opt.step()
        for n in "abcd":
            out[n].append(x[n].detach().numpy().copy())
    la = opt.mithril_optimizer
    slow = {n: v.detach().numpy().copy()
            for n, v in la.slow_params(opt.mithril_state).items()}
    steps = {n: float(opt.state[x[n]]["step"]) if n in slow else 0.0 for n in "abcd"}
    return out, slow, steps, opt


@pytest.mark.parametrize("late", [False, True], ids=["missed", "late_group_and_missed"])
def test_lookahead_counts_each_parameter_as_the_hand_written_reference(late):
    with default_dtype(torch.float64):
        ref, ref_slow, ref_steps = reference(late)
        got, slow, steps, opt = ours(late)
    for n in "abcd":
        for i in range(STEPS):
            np.testing.assert_allclose(got[n][i], ref[n][i], rtol=0, atol=TOL,
                                       err_msg=f"{n} after step {i + 1}")
    for n, v in ref_slow.items():
        np.testing.assert_allclose(slow[n], v, rtol=0, atol=TOL, err_msg=f"slow {n}")
    # d never had a gradient: its slow weights are its fast ones, its initial values
    np.testing.assert_array_equal(slow["d"], _data()[0]["d"])
    np.testing.assert_array_equal(got["d"][-1], _data()[0]["d"])
    assert steps == {**ref_steps, "d": 0.0}  # (torch keeps no entry for d)
    own_b = STEPS - len(NONE_AT)
    assert ref_steps["b"] == own_b and ref_steps["a"] == STEPS
    assert opt.mithril_state.missed_counts() == {"b": len(NONE_AT), "d": STEPS}


def test_one_count_for_all_was_off_the_reference():
    """The convention before (one count for all, the sync included) is measurably off the
    reference: ``b``'s Adam bias corrections counted its missed steps. What this test file
    guards is not rounding."""
    with default_dtype(torch.float64):
        ref, _, _ = reference(False)
        got, _, _, opt = ours(False)
        # the same run with the missed counts dropped after every step: one count for all
        init, grads = _data()
        x = {n: torch.nn.Parameter(torch.tensor(v)) for n, v in init.items()}
        one = torch_optimizer(O.Lookahead(O.Adam(LR), sync_period=P, slow_step_size=ALPHA),
                              [("a", x["a"]), ("b", x["b"]), ("d", x["d"])])
        for i in range(STEPS):
            one.zero_grad(set_to_none=True)
            for n in "abd":
                if _grad(n, i):
                    x[n].grad = torch.tensor(grads[n][i])
            one.step()
            one.mithril_state.set_missed(None)
    assert np.abs(got["b"][-1] - ref["b"][-1]).max() <= TOL
    assert np.abs(x["b"].detach().numpy() - ref["b"][-1]).max() > 1e-3


@pytest.mark.parametrize("late", [False, True], ids=["missed", "late_group_and_missed"])
@pytest.mark.parametrize("at", [3, 6, 9])
def test_a_torch_optimizer_resume_continues_bit_for_bit(late, at):
    with default_dtype(torch.float64):
        whole, whole_slow, whole_steps, _ = ours(late)
        got, slow, steps, _ = ours(late, resume_at=at)
    for n in "abcd":
        np.testing.assert_array_equal(got[n][-1], whole[n][-1], err_msg=n)
    for n in whole_slow:
        np.testing.assert_array_equal(slow[n], whole_slow[n], err_msg=f"slow {n}")
    assert steps == whole_steps


def test_lookahead_load_state_dict_restores_the_missed_counts():
    """The native API: a state with missed counts (``note_missed``) through
    ``state_dict`` / ``load_state_dict`` continues bit for bit (the counts were dropped:
    ``b``'s next step counted its missed steps); a bad count is refused, naming it, and
    changes nothing."""
    init, grads = _data()
    la = O.Lookahead(O.Adam(LR), sync_period=P, slow_step_size=ALPHA)

    def run(opt, p, st, steps):
        for i in steps:
            g = {n: grads[n][i] for n in "ab" if _grad(n, i)}
            p, st = opt.update(p, g, st)
            st.note_missed([n for n in "ab" if n not in g])
        return p, st

    p = {n: init[n].copy() for n in "ab"}
    p, st = run(la, p, la.init(p), range(8))
    p = {n: v.copy() for n, v in p.items()}  # (the state's buffer: the next steps write it)
    assert st.missed_counts() == {"b": 4}
    d = la.state_dict(st)
    assert d["missed"] == {"b": 4}
    whole_p, whole_st = run(la, {n: v.copy() for n, v in p.items()}, st, range(8, STEPS))
    other = O.Lookahead(O.Adam(LR), sync_period=P, slow_step_size=ALPHA)
    back = other.load_state_dict(d, {n: v.copy() for n, v in p.items()})
    assert back.missed_counts() == {"b": 4}
    got_p, got_st = run(other, {n: v.copy() for n, v in p.items()}, back, range(8, STEPS))
    for n in "ab":
        np.testing.assert_array_equal(got_p[n], whole_p[n], err_msg=n)
        np.testing.assert_array_equal(other.slow_params(got_st)[n],
                                      la.slow_params(whole_st)[n], err_msg=n)
    # refused, naming the entry, nothing changed
    before = other.hyperparameters()
    with pytest.raises(ValueError, match=r"'missed' of 'b' is 9, beyond the 8 steps"):
        other.load_state_dict({**d, "missed": {"b": 9}}, p)
    with pytest.raises(KeyError, match=r"'missed' names unknown parameters \['z'\]"):
        other.load_state_dict({**d, "missed": {"z": 1}}, p)
    assert other.hyperparameters() == before


def test_reset_state_keeps_one_count():
    """With ``reset_state`` the inner's count restarts at each sync (optax's): one count
    for all, no per-parameter counts noted, as before."""
    with default_dtype(torch.float64):
        init, grads = _data()
        x = {n: torch.nn.Parameter(torch.tensor(v)) for n, v in init.items()}
        opt = torch_optimizer(O.Lookahead(O.Adam(LR), sync_period=P, reset_state=True),
                              [("a", x["a"]), ("b", x["b"])])
        for i in range(STEPS):
            opt.zero_grad(set_to_none=True)
            for n in "ab":
                if _grad(n, i):
                    x[n].grad = torch.tensor(grads[n][i])
            opt.step()
        assert opt.mithril_state.missed is None
        assert float(opt.state[x["b"]]["step"]) == STEPS


def test_a_dcp_flattened_state_dict_after_a_late_group_resumes_exactly():
    """DCP's ``flatten_optimizer_state_dict=True`` drops the "mithril" entry: the late
    group's ``step_offset`` is rebuilt from the parameters' ``step`` into the Lookahead's
    inner groups (it was put beside them, where a Lookahead refuses it), and the resumed
    run (its slow weights included) is the unbroken one bit for bit."""
    from test_recent_features_edges import _flattened_resume_after_add

    def make(ps):
        return torch_optimizer(O.Lookahead(O.Adam(0.01, weight_decay=0.1), sync_period=2), ps)

    whole, resumed = _flattened_resume_after_add(make)
    for a, b in zip(whole, resumed):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_the_native_api_on_each_engine_matches_the_reference(backend):
    """The native API (``update`` then ``note_missed``, what the wrapper does) on the NumPy
    engine and the torch backend's: the reference's numbers, slow weights included."""
    from mithril.backends import NumpyBackend, TorchBackend

    be = {"numpy": NumpyBackend, "torch": TorchBackend}[backend](dtype="float64")
    with default_dtype(torch.float64):
        ref, ref_slow, _ = reference(False)
    init, grads = _data()
    la = O.Lookahead(O.Adam(LR), sync_period=P, slow_step_size=ALPHA)
    p = {n: be.array(init[n]) for n in "abd"}
    st = la.init(p)
    for i in range(STEPS):
        g = {n: be.array(grads[n][i]) for n in "abd" if _grad(n, i)}
        p, st = la.update(p, g, st)
        st.note_missed([n for n in "abd" if n not in g])
        for n in "abd":
            np.testing.assert_allclose(be.to_numpy(p[n]), ref[n][i], rtol=0, atol=TOL,
                                       err_msg=f"{n} after step {i + 1}")
    slow = la.slow_params(st)
    for n in "abd":
        np.testing.assert_allclose(be.to_numpy(slow[n]), ref_slow[n], rtol=0, atol=TOL,
                                   err_msg=f"slow {n}")
