"""``RNN`` / ``LSTM`` / ``GRU`` against ``torch.nn`` at the edges the main tables do not
reach: a sequence of one step, a batch of one, ``bias=False`` for RNN and GRU, a reverse
direction over one step, ``batch_first`` with no bias, each from the default zero states and
from given ones. float64 at 1e-10 on NumPy, torch and JAX (JAX in a subprocess, x64): the
outputs, h_n (c_n), and the gradients of the input, the initial states and every parameter,
with torch's weights loaded by ``params_from_torch``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import (
    BACKENDS,
    assert_arrays_within,
    jax_case_params,
    jax_float64_results,
    selected_cases,
    to_np,
    torch_results,
)

import mithril as ml

TOL = 1e-10
D, H = 3, 4
TORCH = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}
OURS = {"rnn": ml.RNN, "lstm": ml.LSTM, "gru": ml.GRU}
# case: (kind, T, N, options shared by both, initial states given)
CASES = {
    "rnn_T1_N1": ("rnn", 1, 1, {}, True),
    "rnn_no_bias_relu_bi": ("rnn", 4, 2, {"bias": False, "nonlinearity": "relu", "bidirectional": True}, True),
    "rnn_T1_l2_bi_zero_states": ("rnn", 1, 3, {"num_layers": 2, "bidirectional": True}, False),
    "lstm_T1_N1_bi": ("lstm", 1, 1, {"bidirectional": True}, True),
    "lstm_N1_l2_batch_first_no_bias": ("lstm", 5, 1, {"num_layers": 2, "batch_first": True,
                                                     "bias": False}, True),
    "lstm_T1_zero_states": ("lstm", 1, 3, {}, False),
    "gru_no_bias": ("gru", 5, 2, {"bias": False}, True),
    "gru_no_bias_bi_batch_first_zero_states": ("gru", 4, 2, {"bias": False, "bidirectional": True,
                                                            "batch_first": True}, False),
    "gru_T1_N1_l2_bi": ("gru", 1, 1, {"num_layers": 2, "bidirectional": True}, True),
}


def setup(case: str):
    """(our block, torch's module with random float64 weights, inputs, output cotangents)."""
    kind, t, n, opts, given = CASES[case]
    rng = np.random.default_rng(sum(map(ord, case)))
    ref = TORCH[kind](D, H, **opts).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.tensor(rng.standard_normal(tuple(p.shape)) * 0.5))
    ours = OURS[kind](H, **opts, initial_states=given)
    k = opts.get("num_layers", 1) * (2 if opts.get("bidirectional") else 1)
    bf, w = opts.get("batch_first", False), H * (2 if opts.get("bidirectional") else 1)
    ins = {"input": rng.standard_normal((n, t, D) if bf else (t, n, D))}
    states = ["initial_hidden", "initial_cell"][: 2 if kind == "lstm" else 1]
    cots = {"output": rng.standard_normal((n, t, w) if bf else (t, n, w))}
    for s, out in zip(states, ("hidden", "cell")):
        if given:
            ins[s] = rng.standard_normal((k, n, H))
        cots[out] = rng.standard_normal((k, n, H))
    return ours, ref, ins, cots


def run_mithril(case: str, backend_name: str) -> dict[str, np.ndarray]:
    ours, ref, ins, cots = setup(case)
    backend = BACKENDS[backend_name](dtype="float64")
    compiled = ml.compile(ours, backend, shapes={k: v.shape for k, v in ins.items()},
                          trainable_keys=list(ins))
    params = ours.params_from_torch(ref.state_dict(), backend=backend)
    params.update({k: backend.array(v) for k, v in ins.items()})
    out, grads = compiled.evaluate(params, {}, output_gradients={k: backend.array(v)
                                                                 for k, v in cots.items()})
    back = {m: t for t, m in ours.torch_names().items()}
    res = {f"out|{k}": to_np(backend, v) for k, v in out.items()}
    res.update({f"grad|{back.get(k, k)}": to_np(backend, v) for k, v in grads.items()})
    return res


def run_torch(case: str) -> dict[str, np.ndarray]:
    _, ref, ins, cots = setup(case)
    leaves = {k: torch.tensor(v, requires_grad=True) for k, v in ins.items()}
    states = [leaves[k] for k in ("initial_hidden", "initial_cell") if k in leaves]
    args = (leaves["input"],) + ((tuple(states) if len(states) == 2 else states[0],) if states else ())
    o, s = ref(*args)
    outs = {"output": o, **(dict(zip(("hidden", "cell"), s)) if isinstance(s, tuple) else {"hidden": s})}
    return torch_results(outs, {**leaves, **dict(ref.named_parameters())}, cots)


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
@pytest.mark.parametrize("case", list(CASES))
def test_equals_torch(case, backend_name):
    assert_arrays_within(run_mithril(case, backend_name), run_torch(case), TOL, f"{backend_name} {case}")


@pytest.fixture(scope="module")
def jax_results(request):
    return jax_float64_results("test_recurrent_edges", "CASES", "run_mithril",
        only=selected_cases(request, "case", list(CASES)))


@pytest.mark.parametrize("case", jax_case_params(list(CASES)))
def test_jax_equals_torch(case, jax_results):
    assert_arrays_within(jax_results.get(case, {}), run_torch(case), TOL, f"jax {case}")
