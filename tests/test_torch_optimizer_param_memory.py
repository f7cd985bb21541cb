"""``torch_optimizer`` against ``torch.optim`` on how parameters lie in memory: sparse
``.grad`` tensors (densified: torch's SGD / Adagrad / LBFGS numbers), ``p.data`` replaced by a
transposed view at the same address (detected by strides), and parameters sharing memory
(refused by name: one flat buffer cannot keep them tied)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from mithril.interop import torch_optimizer  # noqa: E402
from mithril.utils import optimizers as O  # noqa: E402


def _sparse_run(make, bag: bool, steps: int = 4) -> torch.Tensor:
    torch.manual_seed(0)
    emb = (torch.nn.EmbeddingBag(6, 3, sparse=True, mode="sum") if bag
           else torch.nn.Embedding(6, 3, sparse=True)).double()
    opt = make(emb.parameters())
    for i in range(steps):
        opt.zero_grad()
        idx = torch.tensor([[1, 2, 2], [i % 6, 4, 1]])  # repeated rows: uncoalesced grads
        (emb(idx) ** 2).sum().backward()
        assert emb.weight.grad.layout == torch.sparse_coo
        opt.step()
    return emb.weight.detach()


@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")  # torch's Adagrad
@pytest.mark.parametrize("bag", [False, True])
@pytest.mark.parametrize("case", ["sgd", "sgd-momentum", "sgd-nesterov", "adagrad"])
def test_sparse_gradients_as_torch(case: str, bag: bool) -> None:
    """nn.Embedding(sparse=True) with SGD / Adagrad: torch.optim takes the sparse .grad; the
    adapter raised TypeError ("cannot be read as a dense host array") at every step."""
    peers = {
        "sgd": (lambda ps: torch.optim.SGD(ps, lr=0.1),
                lambda ps: torch_optimizer(O.SGD(learning_rate=0.1), ps)),
        "sgd-momentum": (
            lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.2),
            lambda ps: torch_optimizer(O.SGD(learning_rate=0.1, momentum=0.9, dampening=0.2),
                                       ps)),
        "sgd-nesterov": (
            lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
            lambda ps: torch_optimizer(O.SGD(learning_rate=0.1, momentum=0.9, nesterov=True),
                                       ps)),
        "adagrad": (
            lambda ps: torch.optim.Adagrad(ps, lr=0.1, lr_decay=0.1, eps=1e-10),
            lambda ps: torch_optimizer(O.AdaGrad(learning_rate=0.1, lr_decay=0.1,
                                                 epsilon=1e-10), ps)),
    }
    theirs, ours = peers[case]
    expected = _sparse_run(theirs, bag)
    got = _sparse_run(ours, bag)
    assert not torch.equal(expected, _sparse_run(theirs, bag, steps=0))  # it did move
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_sparse_gradients_lbfgs_closure_as_torch() -> None:
    """LBFGS's closure path reads the sparse .grad too (torch.optim.LBFGS densifies it)."""

    def run(make):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(6, 3, sparse=True).double()
        opt = make(emb.parameters())

        def closure():
            opt.zero_grad()
            loss = ((emb(torch.tensor([1, 2, 2])) - 1) ** 2).sum()
            loss.backward()
            return loss

        for _ in range(2):
            opt.step(closure)
        return emb.weight.detach()

    expected = run(lambda ps: torch.optim.LBFGS(ps, lr=0.5, max_iter=4))
    got = run(lambda ps: torch_optimizer(O.LBFGS(learning_rate=0.5, max_iter=4), ps))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("how", ["transpose in place", "new transposed tensor"])
@pytest.mark.parametrize("case", ["sgd-momentum", "adam", "muon"])
def test_parameter_data_transposed_between_steps(case: str, how: str) -> None:
    """``w.data = w.data.t()`` on a square matrix keeps its address and shape: the adapter
    took it for unchanged and updated the untransposed buffer with the transposed
    parameter's gradient (0.96 off torch.optim.SGD after two more steps)."""
    peers = {
        "sgd-momentum": (lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9),
                         lambda ps: torch_optimizer(O.SGD(learning_rate=0.01, momentum=0.9),
                                                    ps)),
        "adam": (lambda ps: torch.optim.Adam(ps, lr=0.05),
                 lambda ps: torch_optimizer(O.Adam(learning_rate=0.05), ps)),
        "muon": (lambda ps: torch.optim.Muon(ps, lr=0.05, adjust_lr_fn="original"),
                 lambda ps: torch_optimizer(O.Muon(learning_rate=0.05, weight_decay=0.1,
                                                   adjust_lr_fn="original"), ps)),
    }
    if case == "muon" and not hasattr(torch.optim, "Muon"):
        pytest.skip("this torch has no torch.optim.Muon")

    def run(make):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(3, 3, dtype=torch.float64))
        opt = make([w])
        x = torch.randn(5, 3, dtype=torch.float64)
        for i in range(4):
            if i == 2:
                w.data = (w.data.t() if how == "transpose in place"
                          else w.data.clone().t().contiguous().t() * 1.5)
            opt.zero_grad()
            ((x @ w - 1) ** 2).sum().backward()
            opt.step()
        return w.detach()

    theirs, ours = peers[case]
    torch.testing.assert_close(run(ours), run(theirs), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("when", ["before construction", "after a step"])
def test_parameters_sharing_memory_refused(when: str) -> None:
    """``b.data = a.data``: torch.optim updates the shared storage with both gradients and
    the two stay tied; the adapter moved each into its own buffer slice, untying them
    silently (0.72 off torch.optim.SGD after three steps). It now refuses, naming both, and
    changes nothing."""

    def setup(make):
        torch.manual_seed(0)
        a = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
        b = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
        t = torch.randn(4, dtype=torch.float64)
        if when == "before construction":
            b.data = a.data
        opt = make([a, b])

        def step():
            opt.zero_grad()
            (((a - t) ** 2).sum() + (b ** 4).sum()).backward()
            opt.step()

        if when == "after a step":
            step()
            b.data = a.data
        return a, b, opt, step

    a, b, opt, step = setup(lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9))
    for _ in range(3):
        step()
    assert a.data_ptr() == b.data_ptr()  # torch keeps them tied

    made = lambda ps: torch_optimizer(O.SGD(learning_rate=0.01, momentum=0.9), ps)  # noqa: E731
    if when == "before construction":
        with pytest.raises(ValueError, match="'param0' and 'param1' share memory"):
            setup(made)
        return
    a, b, opt, step = setup(made)
    before = a.detach().clone()
    buf = opt.state[a]["momentum_buffer"].clone()
    with pytest.raises(ValueError, match="'param0' and 'param1' share memory"):
        step()
    assert torch.equal(a.detach(), before) and a.data_ptr() == b.data_ptr()
    assert torch.equal(opt.state[a]["momentum_buffer"], buf)
    assert float(opt.state[a]["step"]) == 1.0


def test_a_refused_group_value_leaves_the_learning_rate_as_it_was() -> None:
    # a step refused for one group value (betas out of range) changes nothing, the new lr
    # the group also carries included; once the group is fixed the step equals torch.optim's
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    ref = torch.nn.Linear(3, 2).double()
    ref.load_state_dict(model.state_dict())
    opt = torch_optimizer(O.Adam(learning_rate=0.01), model.parameters())
    topt = torch.optim.Adam(ref.parameters(), lr=0.01)
    x = torch.randn(4, 3, dtype=torch.float64)
    for m, o in ((model, opt), (ref, topt)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    opt.param_groups[0].update(lr=0.05, betas=(2.0, 0.9))
    before = (opt.mithril_optimizer.learning_rate, opt.mithril_optimizer.beta1,
              [p.detach().clone() for p in model.parameters()])
    opt.zero_grad()
    model(x).pow(2).sum().backward()
    with pytest.raises(ValueError, match="betas"):
        opt.step()
    assert (opt.mithril_optimizer.learning_rate, opt.mithril_optimizer.beta1) == before[:2]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before[2]))
    opt.param_groups[0]["betas"] = (0.9, 0.999)
    topt.param_groups[0]["lr"] = 0.05
    opt.step()
    topt.zero_grad()
    ref(x).pow(2).sum().backward()
    topt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
