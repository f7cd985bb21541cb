"""Session 47's integration of the reviews: what the reviewers found outside their files,
each against the installed peer run in the same test."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mithril.interop import torch_optimizer
from mithril.utils.optimizers import Adafactor


def _torch_run(make, steps: int = 10) -> list[torch.Tensor]:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).double()
    opt = make(m)
    x = torch.randn(8, 4, dtype=torch.float64)
    for _ in range(steps):
        opt.zero_grad()
        m(x).pow(2).sum().backward()
        opt.step()
    return [p.detach().clone() for p in m.parameters()]


def test_adafactor_takes_torchs_param_groups() -> None:
    """torch's groups repeat every value, Adafactor's ``convention`` too: a repeated one is
    taken (it was refused), so the drop-in equals ``torch.optim.Adafactor`` with groups."""
    def groups(m):
        return [{"params": m[0].parameters(), "lr": 0.05},
                {"params": m[1].parameters(), "weight_decay": 0.1, "beta2_decay": -0.5}]

    theirs = _torch_run(lambda m: torch.optim.Adafactor(groups(m), lr=0.01))
    ours = _torch_run(lambda m: torch_optimizer(Adafactor(learning_rate=0.01), groups(m)))
    for a, b in zip(theirs, ours):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)
    assert float((theirs[0] - _torch_run(lambda m: torch.optim.Adafactor(
        m.parameters(), lr=0.01))[0]).abs().max()) > 1e-3  # (the groups mattered)
    with pytest.raises(ValueError, match=r"param_groups\[0\]: \['convention'\] hold for the "
                                         r"whole step"):
        Adafactor(param_groups=[{"params": ["w"], "convention": "keras"}])
    opt = Adafactor(param_groups=[{"params": ["w"], "convention": "torch"}])  # (restated)
    assert "convention" not in opt.param_groups[0]
    assert np.isclose(opt.learning_rate, 1e-2)


@pytest.mark.parametrize("backend", ["NumpyBackend", "TorchBackend", "JaxBackend"])
def test_model_state_of_another_float_dtype_is_refused_on_every_backend(backend: str) -> None:
    """A float32 BatchNorm state given to a float64 model: a DTypeError naming it on every
    backend (torch and JAX converted it silently, NumPy refused it), as for parameters."""
    import mithril as ml
    from mithril.errors import DTypeError
    from mithril.models import BatchNorm1D, Model

    m = Model()
    m |= BatchNorm1D(3)(input="input", output="output")
    pm = ml.compile(m, getattr(ml, backend)(dtype="float64"), shapes={"input": [4, 3]})
    state = {k: np.asarray(v, np.float32 if "running" in k else None)
             for k, v in pm.initial_state_dict.items()}
    before = {k: v.copy() for k, v in state.items()}
    with pytest.raises(DTypeError, match=r"state 'batch_norm1_d.running_mean': expected "
                                         r"dtype float64, got float32"):
        pm.evaluate(pm.get_parameters(), {"input": np.ones((4, 3))}, state=state,
                    training=True)
    for k in state:
        np.testing.assert_array_equal(state[k], before[k])
    same = {k: v.astype(np.float64) if "running" in k else v for k, v in state.items()}
    _, new = pm.evaluate(pm.get_parameters(), {"input": np.arange(12.0).reshape(4, 3)},
                         state=same, training=True)
    np.testing.assert_allclose(np.asarray(new["batch_norm1_d.running_mean"]),
                               0.1 * np.arange(12.0).reshape(4, 3).mean(0), rtol=1e-12)


@pytest.mark.parametrize("cell, published", [("RNNCell", "PublishedRNNCell()"),
                                             ("LSTMCell", "PublishedLSTMCell()")])
def test_a_published_cell_spelling_names_the_published_cell(cell: str, published: str) -> None:
    """The published Mithril's ``RNNCell()`` (no size) is ours ``PublishedRNNCell()``: the
    error says so (it was Python's "missing 1 required positional argument")."""
    import mithril.models as mm

    with pytest.raises(TypeError, match=rf"{cell}: hidden_size is required.*{published}"):
        getattr(mm, cell)()
    ours = getattr(mm, "Published" + cell)()
    assert type(ours).__name__ == "Published" + cell


def test_scheduler_step_counts_take_integral_floats() -> None:
    """Keras' ``decay_steps=1e4`` (and a JSON config's ``1000.0``): a float with an integral
    value is that integer (it was refused); 2.5 still is, naming the argument."""
    import mithril.utils.lr_schedulers as ls
    from mithril.utils.optimizers import SGD

    def rates(make) -> list[float]:
        opt = SGD(learning_rate=0.1)
        sched = make(opt)
        out = []
        for _ in range(30):
            out.append(opt.learning_rate)
            sched.step()
        return out

    assert rates(lambda o: ls.WSD(o, 5.0, 0, 2e1, 0.1, 0.0, "cosine")) == \
        rates(lambda o: ls.WSD(o, 5, 0, 20, 0.1, 0.0, "cosine"))
    assert rates(lambda o: ls.PiecewiseConstant(o, boundaries=[1e1, 2e1],
                                                values=[0.1, 0.01, 0.001])) == \
        rates(lambda o: ls.PiecewiseConstant(o, boundaries=[10, 20], values=[0.1, 0.01, 0.001]))
    assert rates(lambda o: ls.StepLR(o, 7.0, 0.5)) == rates(lambda o: ls.StepLR(o, 7, 0.5))
    with pytest.raises(ValueError, match="step_size must be an integer >= 1, got 2.5"):
        ls.StepLR(SGD(learning_rate=0.1), 2.5)
    with pytest.raises(ValueError, match="step_size must be an integer >= 1, got nan"):
        ls.StepLR(SGD(learning_rate=0.1), float("nan"))


def test_torch_switches_in_constructor_groups_are_taken_as_a_state_dict_is() -> None:
    """torch's per-group switches that do not change the numbers (``foreach``, ``fused``,
    ``capturable``, ``maximize=False``, ``differentiable=False``) were refused in the groups
    given to ``torch_optimizer`` while a torch state dict holding them loaded: taken now
    (carried along, as torch's), the run equals ``torch.optim.Adam``'s with the same groups;
    ``maximize=True`` is still refused by name, nothing changed."""
    from mithril.utils.optimizers import Adam

    switches = {"foreach": False, "fused": None, "capturable": False, "maximize": False,
                "differentiable": False}

    def groups(m):
        return [{"params": m[0].parameters(), **switches},
                {"params": m[1].parameters(), "lr": 0.05}]

    theirs = _torch_run(lambda m: torch.optim.Adam(groups(m), lr=0.01))
    opts = []
    ours = _torch_run(lambda m: opts.append(torch_optimizer(Adam(learning_rate=0.01),
                                                            groups(m))) or opts[0])
    for a, b in zip(theirs, ours):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)
    assert {k: opts[0].param_groups[0][k] for k in switches} == switches
    m = torch.nn.Linear(2, 2).double()
    before = [p.detach().clone() for p in m.parameters()]
    # (refused at the step, before anything changed)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['maximize'\] = True: Adam has "
                                         r"no 'maximize'"):
        opt = torch_optimizer(Adam(learning_rate=0.01), [{"params": m.parameters(),
                                                          "maximize": True}])
        m(torch.ones(1, 2, dtype=torch.float64)).sum().backward()
        opt.step()
    for p, q in zip(m.parameters(), before):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=0)


def test_one_stateless_activation_instance_given_to_several_blocks() -> None:
    """torch users share one ``nn.GELU()`` between layers: one ``Gelu`` instance given to two
    ``TransformerBlock`` s (or to an MLP's layers) compiled to "used twice"; a stateless one is
    now copied per use (the same numbers as separate instances), one with weights (PReLU)
    is still refused rather than silently un-shared."""
    import mithril as ml

    def blocks(make_act):
        m = ml.Model()
        m |= ml.TransformerBlock(8, 2, 16, activation=make_act())(input="input", output="h")
        m |= ml.TransformerBlock(8, 2, 16, activation=make_act())(input="h", output="output")
        return ml.compile(m, ml.NumpyBackend(dtype="float64"), shapes={"input": [2, 3, 8]})

    shared_act = ml.Gelu(approximate="tanh")
    shared, separate = blocks(lambda: shared_act), blocks(lambda: ml.Gelu(approximate="tanh"))
    assert shared.parameter_shapes == separate.parameter_shapes
    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(v) * 0.3 for k, v in shared.parameter_shapes.items()}
    x = {"input": rng.standard_normal((2, 3, 8))}
    np.testing.assert_array_equal(shared.evaluate(params, x)["output"],
                                  separate.evaluate(params, x)["output"])
    prelu = ml.PReLU()
    with pytest.raises(ValueError, match="is used twice"):
        blocks(lambda: prelu)


def test_every_block_takes_name_as_published() -> None:
    """``name=`` on any block, composite ones too (``TransformerBlock(..., name="enc0")``,
    ``LayerNorm(name="ln_f")``): the parameters' path, checked before anything is built."""
    import mithril as ml

    m = ml.Model()
    m |= ml.TransformerBlock(8, 2, 16, name="enc0")(input="input", output="h")
    m |= ml.LayerNorm(name="ln_f")(input="h", output="output")
    pm = ml.compile(m, ml.NumpyBackend(), shapes={"input": [2, 3, 8]})
    names = list(pm.parameter_shapes)
    assert names[0].startswith("enc0.") and names[-2:] == ["ln_f.weight", "ln_f.bias"]
    assert all(n.startswith(("enc0.", "ln_f.")) for n in names)
    with pytest.raises(ValueError, match="TransformerBlock: name must be a non-empty str"):
        ml.TransformerBlock(8, 2, 16, name="a.b")
