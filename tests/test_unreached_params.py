"""Parameters a loss does not reach: ``CompiledModel.reached_parameters`` against hand-made
expectations, and ``make_train_step`` leaving them out of the update as torch.optim leaves
out a ``.grad`` None (no weight decay, no momentum, their own step count), side by side with
a plain torch loop: a two-head model trained on one head's loss and then the other's, and a
model with a parameter no loss uses, AdamW and SGD (momentum + weight decay), Accumulate
against torch's accumulation loop, float64 NumPy and torch to 1e-12; every optimizer of the
catalog leaves an unreached head bit for bit; SAM (closure-driven) against the torch SAM recipe
with ``.grad`` None, Mechanize against itself on the model without the head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
from mithril.utils.optimizers import SGD, Adam, AdamW
from mithril.utils.training import make_train_step

BACKENDS = {"numpy": NumpyBackend, "torch": TorchBackend}
# name -> (ours, torch.optim's)
OPTIMIZERS = {
    "adamw": (lambda: AdamW(learning_rate=1e-2, weight_decay=0.1),
              lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)),
    "sgd": (lambda: SGD(learning_rate=0.05, momentum=0.9, weight_decay=0.1),
            lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.1)),
}
# the loss of each step: head a, then b, then alternating (each head misses steps, its
# moments and its own step count start late)
SCHEDULE = ["loss_a", "loss_a", "loss_b", "loss_a", "loss_b", "loss_b", "loss_a"]


def two_heads() -> ml.Model:
    """A trunk (linear_0, relu) and two heads (linear_1 -> loss_a, linear_2 -> loss_b)."""
    m = ml.Model()
    m |= ml.Linear(4)(input="input", output="h0")
    m |= ml.Relu()(input="h0", output="h")
    m |= ml.Linear(1)(input="h", output="ya")
    m |= ml.Linear(2)(input="h", output="yb")
    m |= ml.MeanSquaredError()(input="ya", target="ta", output=ml.IOKey("loss_a"))
    m |= ml.MeanSquaredError()(input="yb", target="tb", output=ml.IOKey("loss_b"))
    return m


class TorchTwoHeads(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear_0, self.linear_1, self.linear_2 = (
            torch.nn.Linear(3, 4), torch.nn.Linear(4, 1), torch.nn.Linear(4, 2))

    def forward(self, x: torch.Tensor, loss: str, data: dict) -> torch.Tensor:
        h = torch.relu(self.linear_0(x))
        head, target = (self.linear_1, "ta") if loss == "loss_a" else (self.linear_2, "tb")
        return torch.nn.functional.mse_loss(head(h), torch.from_numpy(data[target]))


def data_of(rng: np.random.Generator) -> dict:
    return {"input": rng.standard_normal((8, 3)), "ta": rng.standard_normal((8, 1)),
            "tb": rng.standard_normal((8, 2))}


def host(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def torch_copy(module: torch.nn.Module, params: dict) -> None:
    with torch.no_grad():
        for n, p in module.named_parameters():
            p.copy_(torch.from_numpy(host(params[n]).copy()))


# -- reached_parameters --------------------------------------------------------------------
def test_reached_parameters_of_two_heads_and_its_cache():
    c = ml.compile(two_heads(), NumpyBackend(), shapes={"input": [8, 3]})
    trunk = ("linear_0.weight", "linear_0.bias")
    assert c.reached_parameters("loss_a") == (*trunk, "linear_1.weight", "linear_1.bias")
    assert c.reached_parameters(["loss_b"]) == (*trunk, "linear_2.weight", "linear_2.bias")
    assert c.reached_parameters(["h"]) == trunk
    # in parameter order, whatever the order of the outputs; None: every output
    assert c.reached_parameters(["loss_b", "ya"]) == tuple(c.parameter_shapes)
    assert c.reached_parameters() == tuple(c.parameter_shapes)
    # cached per set of outputs: the same answer object
    assert c.reached_parameters(("ya", "loss_b")) is c.reached_parameters(["loss_b", "ya"])
    with pytest.raises(ml.KeyMismatchError, match=r"unknown output key\(s\) \['lossa'\].*loss_a"):
        c.reached_parameters(["lossa"])


def test_reached_parameters_with_a_trainable_input_and_model_state():
    m = ml.Model()
    m |= ml.Linear(3)(input="input", output="y")
    m |= ml.Add()(left="y", right="shift", output="z")
    c = ml.compile(m, NumpyBackend(), shapes={"input": [4, 2], "shift": [4, 3]},
                   trainable_keys={"shift"})
    assert c.reached_parameters("y") == ("linear.weight", "linear.bias")
    assert c.reached_parameters("z") == ("shift", "linear.weight", "linear.bias")

    m = ml.Model()
    m |= ml.Linear(3)(input="input", output="h")
    m |= ml.BatchNorm1D(3)(input="h", output="n")
    m |= ml.Linear(1)(input="n", output="y")
    m |= ml.Linear(2)(input="input", output="aux")
    c = ml.compile(m, NumpyBackend(), shapes={"input": [4, 2]})
    assert set(c.state_shapes) == {"batch_norm1_d.running_mean", "batch_norm1_d.running_var",
                                   "batch_norm1_d.num_batches_tracked"}  # no parameters
    assert c.reached_parameters("y") == ("linear_0.weight", "linear_0.bias",
                                         "batch_norm1_d.weight", "batch_norm1_d.bias",
                                         "linear_1.weight", "linear_1.bias")
    assert c.reached_parameters("n") == ("linear_0.weight", "linear_0.bias",
                                         "batch_norm1_d.weight", "batch_norm1_d.bias")
    assert c.reached_parameters("aux") == ("linear_2.weight", "linear_2.bias")
    # the zeros evaluate gives outside it are what the helper predicts
    rng = np.random.default_rng(0)
    params = c.get_parameters()
    _, grads, _ = c.evaluate(params, {"input": rng.standard_normal((4, 2)).astype(np.float32)},
                             output_gradients={"aux": np.ones((4, 2), np.float32)},
                             state=c.initial_state_dict)
    assert {n for n, g in grads.items() if np.any(g)} == set(c.reached_parameters("aux"))


# -- make_train_step against torch ---------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_two_heads_trained_alternately_as_torch(backend, opt):
    b = BACKENDS[backend](dtype="float64")
    c = ml.compile(two_heads(), b, shapes={"input": [8, 3]})
    ours, theirs = OPTIMIZERS[opt]
    optimizer = ours()
    steps = {k: make_train_step(c, optimizer, loss=k) for k in ("loss_a", "loss_b")}
    params = c.get_parameters()
    module = TorchTwoHeads().double()
    torch_copy(module, params)
    topt = theirs(module.parameters())
    state = steps["loss_a"].init(params)
    rng = np.random.default_rng(1)
    for loss in SCHEDULE:
        data = data_of(rng)
        params, state, _ = steps[loss](params, state, {k: b.array(v) for k, v in data.items()})
        topt.zero_grad()
        module(torch.from_numpy(data["input"]), loss, data).backward()
        topt.step()
    for n, p in module.named_parameters():
        np.testing.assert_allclose(host(params[n]), p.detach().numpy(), rtol=0, atol=1e-12,
                                   err_msg=n)
    if opt == "adamw":  # each parameter's own step count, as torch's state[p]["step"]
        total = len(SCHEDULE)
        ours_steps = {n: total - state.missed_counts().get(n, 0) for n in params}
        assert ours_steps == {n: int(topt.state[p]["step"])
                              for n, p in module.named_parameters()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_parameter_no_loss_uses_stays_as_torch_leaves_it(backend):
    b = BACKENDS[backend](dtype="float64")
    m = ml.Model()
    m |= ml.Linear(2)(input="input", output="y")
    m |= ml.Linear(5)(input="input", output="unused")  # an output, but never a loss
    m |= ml.MeanSquaredError()(input="y", target="target", output=ml.IOKey("loss"))
    c = ml.compile(m, b, shapes={"input": [6, 3]})
    optimizer = AdamW(learning_rate=1e-2, weight_decay=0.5)
    step = make_train_step(c, optimizer, loss="loss")
    params = c.get_parameters()
    before = {n: host(p).copy() for n, p in params.items()}
    module = torch.nn.ModuleDict({"linear_0": torch.nn.Linear(3, 2),
                                  "linear_1": torch.nn.Linear(3, 5)}).double()
    torch_copy(module, params)
    topt = torch.optim.AdamW(module.parameters(), lr=1e-2, weight_decay=0.5)
    state = step.init(params)
    rng = np.random.default_rng(2)
    for _ in range(4):
        x, t = rng.standard_normal((6, 3)), rng.standard_normal((6, 2))
        params, state, _ = step(params, state, {"input": b.array(x), "target": b.array(t)})
        topt.zero_grad()
        torch.nn.functional.mse_loss(module["linear_0"](torch.from_numpy(x)),
                                     torch.from_numpy(t)).backward()
        topt.step()
    for n, p in module.named_parameters():
        np.testing.assert_allclose(host(params[n]), p.detach().numpy(), rtol=0, atol=1e-12,
                                   err_msg=n)
    for n in ("linear_1.weight", "linear_1.bias"):  # untouched, bit for bit; no slot either
        assert np.array_equal(host(params[n]), before[n])
        assert not np.any(host(state.slot("m")[n]))
        assert module["linear_1"].weight.grad is None
    assert state.missed_counts() == {"linear_1.weight": 4, "linear_1.bias": 4}



@pytest.mark.parametrize("backend", BACKENDS)
def test_accumulated_steps_skip_the_unreached_head_as_torch(backend):
    """``Accumulate(AdamW, k=2)`` in the step against torch's loop stepping every two
    backward passes of ``loss / 2``: head b, reached by no pass, keeps ``.grad`` None there."""
    from mithril.utils.accumulation import Accumulate

    b = BACKENDS[backend](dtype="float64")
    c = ml.compile(two_heads(), b, shapes={"input": [8, 3]})
    acc = Accumulate(AdamW(learning_rate=1e-2, weight_decay=0.1), k=2)
    step = make_train_step(c, acc, loss="loss_a")
    params = c.get_parameters()
    module = TorchTwoHeads().double()
    torch_copy(module, params)
    topt = torch.optim.AdamW(module.parameters(), lr=1e-2, weight_decay=0.1)
    state = step.init(params)
    rng = np.random.default_rng(7)
    for i in range(6):
        data = data_of(rng)
        params, state, _ = step(params, state, {k: b.array(v) for k, v in data.items()})
        (module(torch.from_numpy(data["input"]), "loss_a", data) / 2).backward()
        if i % 2:
            topt.step()
            topt.zero_grad()
    for n, p in module.named_parameters():
        np.testing.assert_allclose(host(params[n]), p.detach().numpy(), rtol=0, atol=1e-12,
                                   err_msg=n)
    assert state.inner.step == 3
    assert state.inner.missed_counts() == {"linear_2.weight": 3, "linear_2.bias": 3}

# -- the step is still the separate calls ---------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_step_equals_evaluate_and_update(backend):
    """Bit for bit ``evaluate`` + ``update`` where the loss reaches every parameter; where it
    does not, ``update`` without their gradients, then ``note_missed`` for them."""
    b = BACKENDS[backend](dtype="float64")
    c = ml.compile(two_heads(), b, shapes={"input": [8, 3]})
    m = ml.Model()
    m |= ml.Linear(4)(input="input", output="h")
    m |= ml.Linear(1)(input="h", output="y")
    m |= ml.MeanSquaredError()(input="y", target="ta", output=ml.IOKey("loss_a"))
    whole = ml.compile(m, b, shapes={"input": [8, 3]})
    rng = np.random.default_rng(3)
    for compiled, unreached in ((whole, set()), (c, {"linear_2.weight", "linear_2.bias"})):
        opt_a, opt_b = Adam(learning_rate=1e-2), Adam(learning_rate=1e-2)
        step = make_train_step(compiled, opt_a, loss="loss_a")
        params = compiled.get_parameters()
        p2 = {n: v.copy() if isinstance(v, np.ndarray) else v.clone() for n, v in params.items()}
        s1, s2 = step.init(params), opt_b.init(p2)
        for _ in range(3):
            data = {k: b.array(v) for k, v in data_of(rng).items() if k in compiled.input_keys}
            params, s1, out1 = step(params, s1, data)
            out2, grads = compiled.evaluate(p2, data, output_gradients={"loss_a": 1.0})
            p2, s2 = opt_b.update(p2, {n: g for n, g in grads.items() if n not in unreached},
                                  s2)
            s2.note_missed(sorted(unreached))
            assert all(np.array_equal(host(params[n]), host(p2[n])) for n in params)
            assert np.array_equal(host(out1["loss_a"]), host(out2["loss_a"]))
        assert s1.missed_counts() == s2.missed_counts() == {n: 3 for n in unreached}
        assert s1.step == 3


def test_a_skipped_step_counts_no_missed_step():
    """``nonfinite="skip"``: a step that was skipped changed nothing, so it is not counted as
    missed either (torch_optimizer's rule)."""
    c = ml.compile(two_heads(), NumpyBackend(dtype="float64"), shapes={"input": [8, 3]})
    step = make_train_step(c, Adam(learning_rate=1e-2, nonfinite="skip"), loss="loss_a")
    params = c.get_parameters()
    state = step.init(params)
    data = data_of(np.random.default_rng(4))
    params, state, _ = step(params, state, data)
    with pytest.warns(RuntimeWarning, match="step skipped"), np.errstate(all="ignore"):
        params, state, _ = step(params, state, {**data, "ta": np.full((8, 1), np.inf)})
    assert state.last_step_skipped and state.step == 1
    assert state.missed_counts() == {"linear_2.weight": 1, "linear_2.bias": 1}


def test_jax_one_program_leaves_the_unreached_out_as_numpy():
    """The one-program JAX step leaves out a parameter the loss does not reach (``fused``
    True), equal to NumPy's step; Muon with weight averaging too (its averages read the
    optimizer's count: test_train_step_unreached_averaging). (Alternating losses and resumed states:
    ``tests/test_train_step_unreached_jax.py``.)"""
    from mithril.utils.optimizers import Muon

    shapes = {"input": [8, 3]}
    cj = ml.compile(two_heads(), JaxBackend(), shapes=shapes)
    cn = ml.compile(two_heads(), NumpyBackend(), shapes=shapes)
    sj, sn = (make_train_step(c, AdamW(learning_rate=1e-2, weight_decay=0.1), loss="loss_a")
              for c in (cj, cn))
    assert sj.fused and not sn.fused
    assert make_train_step(cj, Muon(ema_decay=0.9), loss="loss_a").fused
    pn = cn.get_parameters()
    pj = {n: cj.backend.array(v) for n, v in pn.items()}
    before = {n: v.copy() for n, v in pn.items()}
    s_j, s_n = sj.init(pj), sn.init(pn)
    rng = np.random.default_rng(5)
    for _ in range(3):
        data = {k: v.astype(np.float32) for k, v in data_of(rng).items()}
        pj, s_j, _ = sj(pj, s_j, {k: cj.backend.array(v) for k, v in data.items()})
        pn, s_n, _ = sn(pn, s_n, data)
    for n in pn:
        np.testing.assert_allclose(np.asarray(pj[n]), pn[n], rtol=1e-5, atol=1e-6, err_msg=n)
    assert np.array_equal(np.asarray(pj["linear_2.weight"]), before["linear_2.weight"])
    assert sj.to_optimizer_state(s_j, pj).missed_counts() == s_n.missed_counts() == {
        "linear_2.weight": 3, "linear_2.bias": 3}


def _catalog() -> list:
    from test_train_step_fn import optimizers

    return [n for n in optimizers() if n != "lbfgs"]  # (LBFGS: update(closure=) instead)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", _catalog())
def test_every_optimizer_leaves_the_unreached_head_alone(backend, name):
    """Every optimizer of the catalog: the head the loss does not reach keeps its values bit
    for bit and counts its missed steps, the other parameters move."""
    from test_train_step_fn import optimizers

    c = ml.compile(two_heads(), BACKENDS[backend](dtype="float64"), shapes={"input": [8, 3]})
    step = make_train_step(c, optimizers()[name](), loss="loss_a")
    params = c.get_parameters()
    before = {n: host(p).copy() for n, p in params.items()}
    state = step.init(params)
    rng = np.random.default_rng(6)
    for _ in range(3):
        params, state, _ = step(params, state, {k: c.backend.array(v)
                                                for k, v in data_of(rng).items()})
    assert {n for n in params if not np.array_equal(host(params[n]), before[n])} == \
        set(c.reached_parameters("loss_a"))
    assert state.missed_counts() == {"linear_2.weight": 3, "linear_2.bias": 3}


# -- the wrappers: SAM (closure-driven) and Mechanize ---------------------------------------
def torch_sam_step(module, topt, rho: float, adaptive: bool, loss: str, data: dict) -> None:
    """The torch SAM recipe (davda54/sam's first_step / second_step) written out: a ``.grad``
    None is neither in the norm nor perturbed, and the base step skips it."""
    def loss_fn() -> torch.Tensor:
        return module(torch.from_numpy(data["input"]), loss, data)

    topt.zero_grad(set_to_none=True)
    loss_fn().backward()
    ps = [p for p in module.parameters() if p.grad is not None]
    with torch.no_grad():
        norm = torch.norm(torch.stack([((p.abs() if adaptive else 1.0) * p.grad).norm(2)
                                       for p in ps]), 2)
        old = [p.clone() for p in ps]
        for p in ps:
            p.add_((p * p if adaptive else 1.0) * p.grad * (rho / (norm + 1e-12)))
    topt.zero_grad(set_to_none=True)
    loss_fn().backward()
    with torch.no_grad():
        for p, o in zip(ps, old):
            p.copy_(o)
    topt.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_leaves_the_unreached_head_out_as_torch(backend, adaptive):
    """``SAM(AdamW)`` in make_train_step, trained on one head's loss and then the other's,
    against the torch recipe by hand where the other head has ``.grad`` None: not perturbed,
    not in the norm, not decayed, its own AdamW step count."""
    from mithril.utils.optimizers import SAM

    b = BACKENDS[backend](dtype="float64")
    c = ml.compile(two_heads(), b, shapes={"input": [8, 3]})
    optimizer = SAM(AdamW(learning_rate=1e-2, weight_decay=0.1), rho=0.1, adaptive=adaptive)
    steps = {k: make_train_step(c, optimizer, loss=k) for k in ("loss_a", "loss_b")}
    params = c.get_parameters()
    module = TorchTwoHeads().double()
    torch_copy(module, params)
    topt = torch.optim.AdamW(module.parameters(), lr=1e-2, weight_decay=0.1)
    state = steps["loss_a"].init(params)
    rng = np.random.default_rng(8)
    for loss in SCHEDULE:
        data = data_of(rng)
        params, state, _ = steps[loss](params, state, {k: b.array(v) for k, v in data.items()})
        torch_sam_step(module, topt, 0.1, adaptive, loss, data)
    for n, p in module.named_parameters():
        np.testing.assert_allclose(host(params[n]), p.detach().numpy(), rtol=0, atol=1e-12,
                                   err_msg=n)
    assert {n: len(SCHEDULE) - state.missed_counts().get(n, 0) for n in params} == {
        n: int(topt.state[p]["step"]) for n, p in module.named_parameters()}


def test_torch_optimizer_sam_leaves_a_grad_none_out_as_torch():
    """``torch_optimizer(SAM(AdamW)).step(closure)`` where a head's ``.grad`` stays None:
    equal to the torch recipe by hand (1e-12, float64; it was zero-filled: 1.4e-3 off on
    that head after 3 steps), and the head's missed steps are counted."""
    from mithril.interop import torch_optimizer
    from mithril.utils.optimizers import SAM

    ours, ref = TorchTwoHeads().double(), TorchTwoHeads().double()
    ref.load_state_dict(ours.state_dict())
    opt = torch_optimizer(SAM(AdamW(learning_rate=1e-2, weight_decay=0.1), rho=0.1),
                          ours.named_parameters())
    topt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    rng = np.random.default_rng(9)
    for _ in range(3):
        data = data_of(rng)

        def closure(data=data):
            opt.zero_grad(set_to_none=True)
            loss = ours(torch.from_numpy(data["input"]), "loss_a", data)
            loss.backward()
            return loss

        opt.step(closure)
        torch_sam_step(ref, topt, 0.1, False, "loss_a", data)
    for (n, p), q in zip(ours.named_parameters(), ref.parameters()):
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=0, atol=1e-12,
                                   err_msg=n)
    assert opt.mithril_state.missed_counts() == {"linear_2.weight": 3, "linear_2.bias": 3}


@pytest.mark.parametrize("backend", BACKENDS)
def test_mechanize_with_an_unreached_head_is_mechanize_without_it(backend):
    """``Mechanize(AdamW)`` in make_train_step on head a's loss of the two-head model equals
    it on the model without head b (whose parameters it is never given): params and
    Mechanic's scalars; head b stays bit for bit and counts its missed steps."""
    from mithril.utils.optimizers import Mechanize

    b = BACKENDS[backend](dtype="float64")
    c = ml.compile(two_heads(), b, shapes={"input": [8, 3]})
    m = ml.Model()
    m |= ml.Linear(4)(input="input", output="h0")
    m |= ml.Relu()(input="h0", output="h")
    m |= ml.Linear(1)(input="h", output="ya")
    m |= ml.MeanSquaredError()(input="ya", target="ta", output=ml.IOKey("loss_a"))
    alone = ml.compile(m, b, shapes={"input": [8, 3]})

    def mechanize():
        return Mechanize(AdamW(learning_rate=1.0, weight_decay=0.1), s_init=1e-2)

    (o1, step1), (o2, step2) = ((o, make_train_step(cm, o, loss="loss_a"))
                                for cm, o in ((c, mechanize()), (alone, mechanize())))
    params = c.get_parameters()
    before = {n: host(p).copy() for n, p in params.items()}
    p2 = {n: b.array(before[n].copy()) for n in alone.parameter_shapes}
    s1, s2 = step1.init(params), step2.init(p2)
    rng = np.random.default_rng(9)
    for _ in range(4):
        data = data_of(rng)
        params, s1, _ = step1(params, s1, {k: b.array(v) for k, v in data.items()})
        p2, s2, _ = step2(p2, s2, {k: b.array(v) for k, v in data.items() if k != "tb"})
    for n in p2:
        np.testing.assert_allclose(host(params[n]), host(p2[n]), rtol=0, atol=1e-12,
                                   err_msg=n)
    for k, v in o2.vectors(s2).items():
        np.testing.assert_allclose(o1.vectors(s1)[k], v, rtol=1e-12, atol=0, err_msg=k)
    assert not np.allclose(o1.vectors(s1)["s"], 1e-2)  # (Mechanic's s moved from s_init)
    for n in ("linear_2.weight", "linear_2.bias"):
        assert np.array_equal(host(params[n]), before[n])
        assert not np.any(host(s1.slot("m")[n]))
    assert s1.missed_counts() == {"linear_2.weight": 4, "linear_2.bias": 4}
    assert not s2.missed_counts()
