"""Per-parameter step counts inside one param group, as torch.optim keeps them: a parameter
whose ``.grad`` is None at a ``step()`` is skipped and its ``step`` does not advance, so its
bias corrections (Adam, AdamW, NAdam, RAdam, Adamax), Adagrad's ``lr_decay`` and SGD's
undampened first buffer count only its own steps. Side by side with ``torch.optim`` on the
same float64 model: parameter ``b`` has no gradient for its first steps and again now and
then after it started, in the same group as ``a`` (stepped every time). While skipped,
``b``, its moments and its count are untouched (no weight decay either). State dicts carry
each parameter's count: a resume continues bit for bit, and a ``torch.optim`` optimizer
that loaded ours and stepped on gives its per-parameter ``step`` back to ours."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from test_interop_torch_optimizer import default_dtype
from test_muon_adafactor import ns_in_grad_dtype, torch_muon

from mithril.errors import KeyMismatchError
from mithril.interop import torch_optimizer
from mithril.utils import optimizers as O

STEPS = 20
#: the steps at which ``b`` has no gradient: its first three, then now and then
NONE_AT = {0, 1, 2, 7, 12, 13, 17}

CASES = {  # ours, torch's (lr 0.05 both)
    "adam": (O.Adam, {}, torch.optim.Adam, {}),
    "adam_wd": (O.Adam, {"weight_decay": 0.1}, torch.optim.Adam, {"weight_decay": 0.1}),
    "adamw_amsgrad": (O.AdamW, {"amsgrad": True, "weight_decay": 0.1}, torch.optim.AdamW,
                      {"amsgrad": True, "weight_decay": 0.1}),
    "nadam": (O.NAdam, {}, torch.optim.NAdam, {}),
    "radam": (O.RAdam, {}, torch.optim.RAdam, {}),
    "adamax": (O.Adamax, {}, torch.optim.Adamax, {}),
    "adagrad_lr_decay": (O.AdaGrad, {"lr_decay": 0.1}, torch.optim.Adagrad, {"lr_decay": 0.1}),
    "sgd_momentum_dampening": (O.SGD, {"momentum": 0.9, "dampening": 0.3}, torch.optim.SGD,
                               {"momentum": 0.9, "dampening": 0.3}),
    "asgd": (O.ASGD, {"t0": 3}, torch.optim.ASGD, {"t0": 3}),  # (the two-pass path)
    "adafactor": (O.Adafactor, {}, torch.optim.Adafactor, {}),  # (its fused kernel)
    "adafactor_unfused": (O.Adafactor, {"fused": False}, torch.optim.Adafactor, {}),
}
#: torch keeps NAdam's μ product, Adagrad's and ASGD's step scalars in float32 tensors
TOL = {"nadam": 1e-7, "adagrad_lr_decay": 1e-5, "asgd": 1e-7}


def _grads():
    rng = np.random.default_rng(0)
    return ([torch.tensor(rng.standard_normal((3, 4))) for _ in range(STEPS)],
            [torch.tensor(rng.standard_normal(5)) for _ in range(STEPS)])


def _params():
    rng = np.random.default_rng(1)
    return (torch.nn.Parameter(torch.tensor(rng.standard_normal((3, 4)))),
            torch.nn.Parameter(torch.tensor(rng.standard_normal(5))))


def _pair(case):
    ours_cls, ours_kw, torch_cls, torch_kw = CASES[case]
    a1, b1 = _params()
    a2, b2 = _params()
    ours = torch_optimizer(ours_cls(learning_rate=0.05, **ours_kw), [("a", a1), ("b", b1)])
    ref = torch_cls([a2, b2], lr=0.05, **torch_kw)
    return (a1, b1, ours), (a2, b2, ref)


def _step(a, b, opt, i, ga, gb):
    opt.zero_grad(set_to_none=True)
    a.grad = ga[i].clone()
    if i not in NONE_AT:
        b.grad = gb[i].clone()
    opt.step()


def _steps(p, opt):
    return float(opt.state[p].get("step", 0))  # (torch: no entry before its first step)


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_parameter_missing_steps_counts_its_own_as_torch(case):
    with default_dtype(torch.float64):
        (a1, b1, ours), (a2, b2, ref) = _pair(case)
        ga, gb = _grads()
        tol = TOL.get(case, 1e-12)
        for i in range(STEPS):
            b_before = b1.detach().clone()
            slots_before = {k: v.clone() for k, v in ours.state[b1].items()}
            for a, b, o in ((a1, b1, ours), (a2, b2, ref)):
                _step(a, b, o, i, ga, gb)
            assert torch.allclose(a1, a2, rtol=tol, atol=tol), (case, i)
            assert torch.allclose(b1, b2, rtol=tol, atol=tol), (
                case, i, float((b1 - b2).abs().max()))
            # each parameter's own count, as torch's (SGD keeps none: its momentum buffer
            # is None until the parameter's first step, the undampened one)
            own = sum(j not in NONE_AT for j in range(i + 1))
            assert _steps(a1, ours) == i + 1 and _steps(b1, ours) == own, (case, i)
            if "sgd" not in case:
                assert (_steps(a2, ref), _steps(b2, ref)) == (i + 1, own)
            if i in NONE_AT:  # skipped: the parameter, its slots and its count untouched
                assert torch.equal(b1.detach(), b_before)
                for k, v in slots_before.items():
                    assert torch.equal(ours.state[b1][k], v), (case, i, k)
        ref_state = ref.state[b2]
        for k, v in ours.state[b1].items():
            if k != "step" and k in ref_state:
                assert torch.allclose(v, ref_state[k], rtol=tol, atol=tol), (case, k)


def test_zero_grad_set_to_none_with_an_unused_branch_matches_torch():
    """A real model whose branch is unused on some steps (its ``.grad`` stays None after
    ``zero_grad(set_to_none=True)``), AdamW with weight decay: torch's numbers, and the
    branch neither moves nor decays while unused."""
    with default_dtype(torch.float64):
        torch.manual_seed(0)
        m1 = torch.nn.ModuleDict({"body": torch.nn.Linear(4, 4), "head": torch.nn.Linear(4, 2),
                                  "aux": torch.nn.Linear(4, 2)})
        m2 = copy.deepcopy(m1)
        ours = torch_optimizer(O.AdamW(learning_rate=0.02, weight_decay=0.5),
                               m1.named_parameters())
        ref = torch.optim.AdamW(m2.parameters(), lr=0.02, weight_decay=0.5)
        g = torch.Generator().manual_seed(2)
        for i in range(STEPS):
            x = torch.randn(8, 4, generator=g)
            for m, o in ((m1, ours), (m2, ref)):
                o.zero_grad(set_to_none=True)
                h = torch.tanh(m["body"](x))
                loss = m["head"](h).pow(2).mean()
                if i not in NONE_AT:
                    loss = loss + m["aux"](h).pow(2).mean()
                loss.backward()
            aux_before = m1["aux"].weight.detach().clone()
            ours.step()
            ref.step()
            if i in NONE_AT:
                assert m1["aux"].weight.grad is None
                assert torch.equal(m1["aux"].weight.detach(), aux_before)
            for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
                assert torch.allclose(p1, p2, rtol=1e-12, atol=1e-12), (i, n)
                assert _steps(p1, ours) == _steps(p2, ref), (i, n)


@pytest.mark.parametrize("case", ["adam", "nadam", "adagrad_lr_decay"])
def test_state_dict_resume_is_bit_exact_and_carries_each_count(case):
    """Saved after ``b`` missed steps and loaded into a new wrapper, the run continues bit
    for bit as the unbroken one; the state dict's per-parameter ``step`` are torch's."""
    with default_dtype(torch.float64):
        (a1, b1, ours), (a2, b2, ref) = _pair(case)
        (a3, b3, resumed), _ = _pair(case)
        ga, gb = _grads()
        half = 13  # (b missed steps 0-2, 7 and 12)
        for i in range(half):
            _step(a1, b1, ours, i, ga, gb)
            _step(a2, b2, ref, i, ga, gb)
        sd = ours.state_dict()
        torch_sd = ref.state_dict()
        assert [float(sd["state"][k]["step"]) for k in (0, 1)] == [
            float(torch_sd["state"][k]["step"]) for k in (0, 1)] == [13.0, 8.0]
        with torch.no_grad():
            a3.copy_(a1)
            b3.copy_(b1)
        resumed.load_state_dict(sd)
        assert _steps(b3, resumed) == 8.0
        for i in range(half, STEPS):
            _step(a1, b1, ours, i, ga, gb)
            _step(a3, b3, resumed, i, ga, gb)
        assert torch.equal(a1, a3) and torch.equal(b1, b3)
        # the mithril optimizer's own state dict carries the counts too
        mo, st = ours.mithril_optimizer, ours.mithril_state
        back = copy.copy(mo).load_state_dict(
            mo.state_dict(st), {"a": a1.detach().clone(), "b": b1.detach().clone()})
        assert list(np.asarray(back.missed)) == list(np.asarray(st.missed)) == [0, 7]


def test_torch_optim_that_loaded_ours_gives_its_counts_back():
    """A ``torch.optim.Adam`` that loaded our state dict (after ``b`` missed steps) and
    stepped on, ``b`` missing more, keeps the ``mithril`` entry as it was: its per-parameter
    ``step`` give each count, and ours continues as torch's."""
    with default_dtype(torch.float64):
        (a1, b1, ours), (a2, b2, ref) = _pair("adam")
        ga, gb = _grads()
        for i in range(10):
            _step(a1, b1, ours, i, ga, gb)
        with torch.no_grad():
            a2.copy_(a1)
            b2.copy_(b1)
        ref.load_state_dict(ours.state_dict())
        for i in range(10, 15):
            _step(a2, b2, ref, i, ga, gb)
        with torch.no_grad():
            a1.copy_(a2)
            b1.copy_(b2)
        ours.load_state_dict(ref.state_dict())
        assert (_steps(a1, ours), _steps(b1, ours)) == (15.0, 9.0)
        for i in range(15, STEPS):
            _step(a1, b1, ours, i, ga, gb)
            _step(a2, b2, ref, i, ga, gb)
        assert torch.allclose(a1, a2, rtol=1e-12, atol=1e-12)
        assert torch.allclose(b1, b2, rtol=1e-12, atol=1e-12)


@pytest.fixture
def muon_ns64(monkeypatch):
    """torch.optim.Muon's Newton-Schulz in the gradients' dtype (float64), as ours."""
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", ns_in_grad_dtype)


def test_muons_fallback_counts_each_parameters_steps_as_torch_adamw(muon_ns64):
    """Muon's fallback (AdamW for what is not a matrix) counts a parameter's own steps too:
    torch.optim.Muon (its Newton-Schulz in float64, as ours) on the matrix and
    torch.optim.AdamW on the vector, side by side."""
    with default_dtype(torch.float64):
        (w1, b1), (w2, b2) = _params(), _params()
        ours = torch_optimizer(O.Muon(0.02, ns_dtype="float64", weight_decay=0.1,
                                      fallback=O.AdamW(3e-4, weight_decay=0.01)),
                               [("w", w1), ("b", b1)])
        refs = (torch.optim.Muon([w2], lr=0.02, weight_decay=0.1),
                torch.optim.AdamW([b2], lr=3e-4, weight_decay=0.01))
        gw, gb = _grads()
        for i in range(STEPS):
            _step(w1, b1, ours, i, gw, gb)
            for o in refs:
                o.zero_grad(set_to_none=True)
            w2.grad = gw[i].clone()
            if i not in NONE_AT:
                b2.grad = gb[i].clone()
            for o in refs:
                o.step()
            assert torch.allclose(w1, w2, rtol=1e-12, atol=1e-12), i
            assert torch.allclose(b1, b2, rtol=1e-12, atol=1e-12), (i, float((b1 - b2).abs().max()))
            assert _steps(b1, ours) == _steps(b2, refs[1])


@pytest.mark.parametrize("engine", ["array", "fused-ops"])
def test_the_other_torch_engines_count_each_parameters_steps(monkeypatch, engine):
    """The flat-tensor path (float16, bfloat16) and torch's fused kernels (CUDA's engine,
    run on CPU here) read the same rows: torch's numbers."""
    from mithril.utils.optimizers import engines
    from mithril.utils.optimizers.engines.array_engine import ArrayEngine
    from mithril.utils.optimizers.engines.torch_fused import TorchFusedEngine

    if engine == "array":
        monkeypatch.setattr(engines, "engine_for",
                            lambda backend, layout, *_: ArrayEngine(backend, layout))
    else:
        monkeypatch.setattr(engines, "TORCH_ENGINE", "fused-ops")
    with default_dtype(torch.float64):
        (a1, b1, ours), (a2, b2, ref) = _pair("adamw_amsgrad")
        ga, gb = _grads()
        for i in range(STEPS):
            _step(a1, b1, ours, i, ga, gb)
            _step(a2, b2, ref, i, ga, gb)
            assert torch.allclose(b1, b2, rtol=1e-12, atol=1e-12), i
        kind = ArrayEngine if engine == "array" else TorchFusedEngine
        assert type(ours.mithril_state.engine) is kind
        assert torch.allclose(a1, a2, rtol=1e-12, atol=1e-12)
        assert _steps(b1, ours) == _steps(b2, ref) == 13


def test_the_jitted_jax_engine_counts_them_when_told(monkeypatch):
    """The jitted JAX engine (accelerators; forced on CPU here) reads the same rows."""
    import jax.numpy as jnp
    from optimizer_parity import jax_float64

    from mithril.utils.optimizers import engines
    from mithril.utils.optimizers.engines.jax_engine import JaxEngine

    monkeypatch.setattr(engines, "JAX_ENGINE", "jit")
    ga, gb = _grads()
    (a0, b0), (ta, tb) = _params(), _params()
    ref = torch.optim.Adam([ta, tb], lr=0.05)
    with jax_float64():
        opt = O.Adam(0.05)
        params = {"a": jnp.asarray(a0.detach().numpy()), "b": jnp.asarray(b0.detach().numpy())}
        state = opt.init(params)
        for i in range(STEPS):
            grads = {"a": jnp.asarray(ga[i].numpy())}
            if i not in NONE_AT:
                grads["b"] = jnp.asarray(gb[i].numpy())
            params, state = opt.update(params, grads, state)
            if i in NONE_AT:
                state.note_missed(["b"])
            _step(ta, tb, ref, i, ga, gb)
        assert isinstance(state.engine, JaxEngine)
        np.testing.assert_allclose(np.asarray(params["b"]), tb.detach().numpy(), rtol=1e-12,
                                   atol=1e-12)
        np.testing.assert_allclose(np.asarray(params["a"]), ta.detach().numpy(), rtol=1e-12,
                                   atol=1e-12)


def test_a_group_added_later_whose_parameter_misses_steps_matches_torch():
    """A group added after 5 steps (its ``step_offset``) holding a parameter that then has
    no gradient now and then: the two offsets add up, as torch's per-parameter count."""
    with default_dtype(torch.float64):
        (a1, b1, ours), (a2, b2, ref) = (
            (a, b, cls([a], **kw)) for (a, b), cls, kw in (
                (_params(), lambda ps, **kw: torch_optimizer(O.Adam(0.05), ps), {}),
                (_params(), torch.optim.Adam, {"lr": 0.05})))
        ga, gb = _grads()
        for i in range(STEPS):
            if i == 5:
                for b, o in ((b1, ours), (b2, ref)):
                    o.add_param_group({"params": [b], "lr": 0.02})
            for a, b, o in ((a1, b1, ours), (a2, b2, ref)):
                o.zero_grad(set_to_none=True)
                a.grad = ga[i].clone()
                if i >= 5 and i not in NONE_AT:
                    b.grad = gb[i].clone()
                o.step()
            assert torch.allclose(a1, a2, rtol=1e-12, atol=1e-12), i
            assert torch.allclose(b1, b2, rtol=1e-12, atol=1e-12), i
            if i >= 5:
                assert _steps(b1, ours) == _steps(b2, ref), i
        assert _steps(b1, ours) == sum(j >= 5 and j not in NONE_AT for j in range(STEPS))


def test_a_skipped_step_counts_no_missed_step():
    """Under ``nonfinite="skip"`` a refused step is no step: the parameter without a
    gradient at it does not count it as missed."""
    with default_dtype(torch.float64):
        a, b = _params()
        ours = torch_optimizer(O.Adam(0.05, nonfinite="skip"), [("a", a), ("b", b)])
        ga, gb = _grads()
        _step(a, b, ours, 3, ga, gb)  # (both have a gradient)
        ours.zero_grad(set_to_none=True)
        a.grad = torch.full_like(a, float("inf"))
        with pytest.warns(RuntimeWarning, match="skip"):
            ours.step()
        assert ours.mithril_state.num_skipped == 1 and ours.mithril_state.missed is None
        assert (_steps(a, ours), _steps(b, ours)) == (1.0, 1.0)
        _step(a, b, ours, 0, ga, gb)  # (b's gradient None: counted now)
        assert (_steps(a, ours), _steps(b, ours)) == (2.0, 1.0)


def test_the_native_api_counts_them_when_told_as_torch(tmp_path):
    """A plain ``update`` keeps one count (optax's convention); ``state.note_missed`` after
    it gives torch's per-parameter count, and the state dict and a checkpoint keep it (NumPy
    engine)."""
    rng = np.random.default_rng(3)
    p0 = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
    ga, gb = _grads()
    ta, tb = (torch.nn.Parameter(torch.tensor(p0[k])) for k in "ab")
    ref = torch.optim.NAdam([ta, tb], lr=0.05)
    opt = O.NAdam(0.05)
    params = {k: v.copy() for k, v in p0.items()}
    state = opt.init(params)
    for i in range(STEPS):
        grads = {"a": ga[i].numpy()} if i in NONE_AT else {"a": ga[i].numpy(), "b": gb[i].numpy()}
        params, state = opt.update(params, grads, state)
        if i in NONE_AT:
            state.note_missed(["b"])
        ref.zero_grad(set_to_none=True)
        ta.grad, tb.grad = ga[i].clone(), None if i in NONE_AT else gb[i].clone()
        ref.step()
        if i == 9:  # a resume from the state dict, bit for bit
            sd = opt.state_dict(state)
            assert sd["missed"] == {"b": 4}
            copies = {k: v.copy() for k, v in params.items()}
            params, state = copies, O.NAdam(0.05).load_state_dict(sd, copies)
            opt = O.NAdam(0.05)
            assert state.missed_counts() == {"b": 4}
        if i == 14:  # and a resume from a checkpoint file
            from mithril.utils.checkpoint import load_checkpoint, save_checkpoint

            path = tmp_path / "ckpt.safetensors"
            save_checkpoint(path, params, opt, state)
            opt = O.NAdam(0.05)
            got = load_checkpoint(path, params, opt)
            params, state = got["params"], got["state"]
            assert state.missed_counts() == {"b": 6}
    np.testing.assert_allclose(params["b"], tb.detach().numpy(), rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(params["a"], ta.detach().numpy(), rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("missed, exc, match", [
    ({"c": 1}, KeyError, r"'missed' names unknown parameters \['c'\]"),
    ({"b": -1}, ValueError, r"'missed' of 'b' must be an int >= 0, got -1"),
    ({"b": 1.5}, ValueError, r"'missed' of 'b' must be an int >= 0"),
    ({"b": 4}, ValueError, r"'missed' of 'b' is 4, beyond the 3 steps taken"),
    ([1], TypeError, r"'missed' must be a dict of parameter -> int, got list"),
])
def test_a_bad_missed_entry_is_refused_and_changes_nothing(missed, exc, match):
    params = {"a": np.ones(3), "b": np.ones(2)}
    opt = O.Adam(0.05)
    state = opt.init(params)
    for _ in range(3):
        params, state = opt.update(params, {"a": np.full(3, 0.5), "b": np.full(2, 0.5)}, state)
    sd = {**opt.state_dict(state), "missed": missed}
    before = opt.state_dict(None)
    with pytest.raises(exc, match=match):
        opt.load_state_dict(sd, {k: v.copy() for k, v in params.items()})
    assert opt.state_dict(None) == before


def test_a_torch_state_dict_with_a_bad_step_is_refused_unchanged():
    """A parameter's ``step`` beyond the optimizer's count, or not a whole number, is
    refused by its entry, nothing changed; in a ``torch.optim`` state dict too."""
    with default_dtype(torch.float64):
        (a1, b1, ours), (a2, b2, ref) = _pair("adam")
        ga, gb = _grads()
        for i in range(10):
            _step(a1, b1, ours, i, ga, gb)
            _step(a2, b2, ref, i, ga, gb)
        sd = ours.state_dict()
        for bad in (11.0, 2.5, -1.0):
            broken = copy.deepcopy(sd)
            broken["state"][1]["step"] = torch.tensor(bad)
            with pytest.raises(ValueError, match=r"'state'\[1\]\['step'\] must be a whole "
                                                 r"number of steps from 0 to 10"):
                ours.load_state_dict(broken)
            assert _steps(b1, ours) == 6.0
        broken = ref.state_dict()  # (a torch.optim state dict: its steps checked the same)
        broken["state"][1]["step"] = torch.tensor(2.5)
        with pytest.raises(ValueError, match=r"'state'\[1\]\['step'\] must be a whole"):
            ours.load_state_dict(broken)
        assert _steps(b1, ours) == 6.0
        with pytest.raises(KeyMismatchError, match="'step_offset' is set by the wrapper"):
            ours.add_param_group({"params": [("c", torch.nn.Parameter(torch.ones(2)))],
                                  "step_offset": 3})


def test_the_fused_jax_step_keeps_a_state_s_own_counts():
    """The fused JAX train step counts each parameter's own steps (Muon and Adafactor too,
    each tensor its own row; with weight averaging too, the averages reading the optimizer's
    count): a state with missed counts goes into its program and back, counts and all."""
    from test_train_step_atomicity import compiled_mlp

    from mithril.utils.training import make_train_step

    compiled = compiled_mlp("jax", [16, 12])
    params = compiled.get_parameters()
    first = sorted(params)[0]
    grads = {k: v * 0.5 for k, v in params.items()}
    for opt in (O.Muon(learning_rate=1e-2, ema_decay=0.9), O.Muon(learning_rate=1e-2)):
        _, state = opt.update(params, grads, opt.init(params))  # (a count <= the step)
        state.note_missed([first])
        step = make_train_step(compiled, opt, loss="loss")
        back = step.to_optimizer_state(step.from_optimizer_state(state), params)
        assert back.missed_counts() == {first: 1}


def test_counts_survive_an_added_group():
    """``add_param_group`` rebuilds the state: a parameter that had missed steps keeps its
    own count (torch's numbers after the add)."""
    with default_dtype(torch.float64):
        (a1, b1, ours), (a2, b2, ref) = _pair("adam")
        c1, c2 = (torch.nn.Parameter(torch.ones(4)) for _ in range(2))
        ga, gb = _grads()
        for i in range(STEPS):
            if i == 10:
                ours.add_param_group({"params": [("c", c1)]})
                ref.add_param_group({"params": [c2]})
            for a, b, c, o in ((a1, b1, c1, ours), (a2, b2, c2, ref)):
                _step(a, b, o, i, ga, gb)
                if i >= 10:  # (a second step for c alone: torch's counts c's own)
                    o.zero_grad(set_to_none=True)
                    c.grad = gb[i][:4].clone()
                    o.step()
            assert torch.allclose(b1, b2, rtol=1e-12, atol=1e-12), i
            assert torch.allclose(c1, c2, rtol=1e-12, atol=1e-12), i
            for p1, p2 in ((a1, a2), (b1, b2), (c1, c2)):
                assert _steps(p1, ours) == _steps(p2, ref), i


def test_a_lookahead_counts_each_parameter_and_syncs_on_the_group():
    """A Lookahead (no torch.optim peer) counts each parameter's own steps for its inner's
    rules and the group's for its sync (tests/test_lookahead_param_steps.py compares it
    with a hand-written reference): a parameter without a gradient is left alone (and its
    slow weights), and the others step and sync as with every gradient given."""
    with default_dtype(torch.float64):
        a1, b1 = _params()
        a2, b2 = _params()
        ours = torch_optimizer(O.Lookahead(O.Adam(0.05), sync_period=3), [("a", a1), ("b", b1)])
        alone = torch_optimizer(O.Lookahead(O.Adam(0.05), sync_period=3), [("a", a2)])
        ga, gb = _grads()
        for i in range(STEPS):
            b_before = b1.detach().clone()
            _step(a1, b1, ours, i, ga, gb)
            alone.zero_grad(set_to_none=True)
            a2.grad = ga[i].clone()
            alone.step()
            assert torch.equal(a1, a2), i
            if i in NONE_AT:
                assert torch.equal(b1.detach(), b_before), i
        assert ours.mithril_state.missed_counts() == {"b": len(NONE_AT)}
        assert (_steps(a1, ours), _steps(b1, ours)) == (STEPS, STEPS - len(NONE_AT))


def test_a_whole_group_missing_steps_now_and_then_matches_torch():
    """torch's group dicts: the second group (its own ``lr``) has no gradient at its first
    steps and again now and then; it was counted from its first gradient on, every step
    after counting (torch's Adam: its own count)."""
    with default_dtype(torch.float64):
        (a1, b1), (a2, b2) = _params(), _params()
        ours = torch_optimizer(O.Adam(0.05), [{"params": [a1]}, {"params": [b1], "lr": 0.02}])
        ref = torch.optim.Adam([{"params": [a2]}, {"params": [b2], "lr": 0.02}], lr=0.05)
        ga, gb = _grads()
        for i in range(STEPS):
            _step(a1, b1, ours, i, ga, gb)
            _step(a2, b2, ref, i, ga, gb)
            assert torch.allclose(a1, a2, rtol=1e-12, atol=1e-12), i
            assert torch.allclose(b1, b2, rtol=1e-12, atol=1e-12), i
            assert (_steps(a1, ours), _steps(b1, ours)) == (_steps(a2, ref), _steps(b2, ref))
