"""``LSTM(proj_size=P)`` against ``torch.nn.LSTM(proj_size=P)``: h = (o·tanh(c))·W_hrᵀ with P
features (h_n (K, N, P), c_n (K, N, H), output D·P, layer k > 0 reading D·P features), one and
two layers and directions, ``batch_first``, no bias, zero and given initial states, and with
``lengths`` (torch's packed sequences). float64 at 1e-10 on NumPy, torch and JAX (JAX in a
subprocess, x64): outputs and the gradients of the input, the states and every parameter,
``weight_hr`` included, with torch's weights loaded by ``params_from_torch``. Then the NumPy
BPTT against finite differences, torch's names and init, and the named errors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import (
    BACKENDS,
    assert_arrays_within,
    central_differences,
    jax_case_params,
    jax_float64_results,
    selected_cases,
    to_np,
    torch_results,
)
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import mithril as ml
from mithril.errors import KeyMismatchError, ShapeError

TOL = 1e-10
T, D, H, P = 4, 3, 5, 2
# case: (lengths or None: full, options shared by both, initial states given)
CASES = {
    "l1": (None, {}, True),
    "l2_bi_zero_states": (None, {"num_layers": 2, "bidirectional": True}, False),
    "bi_batch_first_no_bias": (None, {"bidirectional": True, "batch_first": True, "bias": False}, True),
    "l2_lengths": ([4, 1, 3], {"num_layers": 2}, True),
    "bi_batch_first_lengths_zero_states": ([2, 4], {"bidirectional": True, "batch_first": True}, False),
}


def setup(case: str):
    lengths, opts, given = CASES[case]
    n = 3 if lengths is None else len(lengths)
    rng = np.random.default_rng(sum(map(ord, case)))
    ref = torch.nn.LSTM(D, H, proj_size=P, **opts).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.tensor(rng.standard_normal(tuple(p.shape)) * 0.5))
    ours = ml.LSTM(H, **opts, proj_size=P, initial_states=given, lengths=lengths is not None)
    k = opts.get("num_layers", 1) * (2 if opts.get("bidirectional") else 1)
    bf, w = opts.get("batch_first", False), P * (2 if opts.get("bidirectional") else 1)
    ins = {"input": rng.standard_normal((n, T, D) if bf else (T, n, D))}
    if given:
        ins.update(initial_hidden=rng.standard_normal((k, n, P)), initial_cell=rng.standard_normal((k, n, H)))
    cots = {"output": rng.standard_normal((n, T, w) if bf else (T, n, w)),
            "hidden": rng.standard_normal((k, n, P)), "cell": rng.standard_normal((k, n, H))}
    return ours, ref, ins, None if lengths is None else np.array(lengths), cots


def run_mithril(case: str, backend_name: str) -> dict[str, np.ndarray]:
    ours, ref, ins, lengths, cots = setup(case)
    backend = BACKENDS[backend_name](dtype="float64")
    shapes = {k: v.shape for k, v in ins.items()}
    data = {}
    if lengths is not None:
        shapes["lengths"], data["lengths"] = lengths.shape, backend.array(lengths)
    compiled = ml.compile(ours, backend, shapes=shapes, trainable_keys=list(ins))
    params = ours.params_from_torch(ref.state_dict(), backend=backend)
    params.update({k: backend.array(v) for k, v in ins.items()})
    out, grads = compiled.evaluate(params, data, output_gradients={k: backend.array(v) for k, v in cots.items()})
    back = {m: t for t, m in ours.torch_names().items()}
    res = {f"out|{k}": to_np(backend, v) for k, v in out.items()}
    res.update({f"grad|{back.get(k, k)}": to_np(backend, v) for k, v in grads.items()})
    return res


def run_torch(case: str) -> dict[str, np.ndarray]:
    _, ref, ins, lengths, cots = setup(case)
    bf = CASES[case][1].get("batch_first", False)
    leaves = {k: torch.tensor(v, requires_grad=True) for k, v in ins.items()}
    x = leaves["input"] if lengths is None else pack_padded_sequence(
        leaves["input"], torch.tensor(lengths), batch_first=bf, enforce_sorted=False)
    o, (hn, cn) = ref(x, (leaves["initial_hidden"], leaves["initial_cell"])) \
        if "initial_hidden" in leaves else ref(x)
    if lengths is not None:
        o, _ = pad_packed_sequence(o, batch_first=bf, total_length=T)
    outs = {"output": o, "hidden": hn, "cell": cn}
    return torch_results(outs, {**leaves, **dict(ref.named_parameters())}, cots)


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
@pytest.mark.parametrize("case", list(CASES))
def test_equals_torch(case, backend_name):
    assert_arrays_within(run_mithril(case, backend_name), run_torch(case), TOL, f"{backend_name} {case}")


@pytest.fixture(scope="module")
def jax_results(request):
    return jax_float64_results("test_recurrent_proj_size", "CASES", "run_mithril",
        only=selected_cases(request, "case", list(CASES)))


@pytest.mark.parametrize("case", jax_case_params(list(CASES)))
def test_jax_equals_torch(case, jax_results):
    assert_arrays_within(jax_results.get(case, {}), run_torch(case), TOL, f"jax {case}")


def test_numpy_bptt_matches_finite_differences(eps=1e-6):
    block = ml.LSTM(3, num_layers=2, bidirectional=True, proj_size=2, initial_states=True, lengths=True)
    shapes = {"input": (3, 2, 2), "initial_hidden": (4, 2, 2), "initial_cell": (4, 2, 3)}
    compiled = ml.compile(block, ml.NumpyBackend(dtype="float64"), shapes={**shapes, "lengths": [2]},
                          trainable_keys=list(shapes))
    rng = np.random.default_rng(2)
    params = {k: rng.standard_normal(s) for k, s in compiled.parameter_shapes.items()}
    data = {"lengths": np.array([3, 2])}
    cots = {k: rng.standard_normal(compiled.program.output_shape(k)) for k in compiled.output_keys}

    def loss(ps):
        out = compiled.evaluate(ps, data)
        return sum(float(np.sum(out[k] * cots[k])) for k in cots)

    _, grads = compiled.evaluate(params, data, output_gradients=cots)
    assert "l1_reverse.weight_hr" in grads
    for name, numeric in central_differences(loss, params, eps).items():
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-6, atol=1e-8, err_msg=name)


def test_names_shapes_and_init_are_torchs():
    ours = ml.LSTM(64, num_layers=2, bidirectional=True, proj_size=16)
    ref = torch.nn.LSTM(8, 64, num_layers=2, bidirectional=True, proj_size=16)
    names = ours.torch_names()
    assert sorted(names) == sorted(ref.state_dict())
    params = ml.compile(ours, ml.NumpyBackend(dtype="float64", seed=0),
                        shapes={"input": [5, 2, 8]}).get_parameters()
    for t, m in names.items():
        assert params[m].shape == tuple(ref.state_dict()[t].shape), t
        bound = 1 / np.sqrt(64)  # torch: every weight and bias U(±1/√H), weight_hr included
        assert bound * 0.9 < np.abs(params[m]).max() <= bound, t


@pytest.mark.parametrize("make, match", [
    (lambda: ml.GRU(4, proj_size=2), "proj_size is for LSTM only"),
    (lambda: ml.LSTM(4, proj_size=4), r"proj_size \(4\) must be an int in \[0, hidden_size = 4\)"),
    (lambda: ml.LSTM(4, proj_size=-1), "proj_size must be a positive int"),
])
def test_bad_proj_size_is_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_initial_hidden_must_have_proj_size_features():
    with pytest.raises(ShapeError, match=r"'initial_hidden' must be \(N, 2\) per layer and direction"):
        ml.compile(ml.LSTM(5, proj_size=2, initial_states=True), ml.NumpyBackend(),
                   shapes={"input": [T, 3, D], "initial_hidden": [1, 3, 5], "initial_cell": [1, 3, 5]})


def test_state_dict_without_projection_is_refused():
    with pytest.raises(KeyMismatchError, match=r"missing key\(s\) \['weight_hr_l0'\]"):
        ml.LSTM(5, proj_size=2).params_from_torch(torch.nn.LSTM(D, 5).state_dict())
