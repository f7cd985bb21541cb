"""Hunt 65, the recurrent area: regressions found side by side with ``torch.nn`` and
``torch.nn.utils.rnn``."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from conftest import jax_float64
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import mithril as ml
from mithril.models import pack_data_into_time_slots


def test_time_slots_of_given_lengths_are_torchs_packed_steps_and_bad_lengths_are_named():
    """``lengths`` cut each sequence to its first steps: step t holds the rows torch's
    ``pack_padded_sequence(enforce_sorted=False)`` packs at t (batch_sizes[t] of them, longest
    first). A length outside [1, T_i] or not an int is a ValueError naming it (it was numpy's
    broadcast error for a length past the data, and a silent cut or nothing for 3.7, -1, 0)."""
    rng = np.random.default_rng(0)
    seqs = [rng.standard_normal((t, 2)) for t in (3, 5, 4)]
    lengths = [2, 5, 3]
    b = ml.NumpyBackend(dtype="float64")
    slots, _ = pack_data_into_time_slots([(s,) for s in seqs], b, lengths=lengths)
    padded = torch.zeros(3, 5, 2, dtype=torch.float64)
    for i, s in enumerate(seqs):
        padded[i, :len(s)] = torch.tensor(s)
    packed = pack_padded_sequence(padded, torch.tensor(lengths), batch_first=True,
                                  enforce_sorted=False)
    assert sorted(slots) == [f"input{t}" for t in range(len(packed.batch_sizes))]
    start = 0
    for t, n in enumerate(packed.batch_sizes.tolist()):
        np.testing.assert_array_equal(slots[f"input{t}"][:, 0], packed.data[start:start + n].numpy())
        start += n
    for bad, at in (([6, 5, 3], r"lengths\[0\] = 6 must be an int in \[1, 3\]"),
                    ([2, 5, -1], r"lengths\[2\] = -1 must be an int in \[1, 4\]"),
                    ([2, 0, 3], r"lengths\[1\] = 0 must be an int in \[1, 5\]"),
                    ([2.5, 5, 3], r"lengths\[0\] = 2.5 must be an int"),
                    ([True, 5, 3], r"lengths\[0\] = True must be an int")):
        with pytest.raises(ValueError, match=at):
            pack_data_into_time_slots([(s,) for s in seqs], b, lengths=bad)


def _nan_padded_case(kind: str, opts: dict):
    """torch's module (float64, random weights), a batch padded with NaN past each length,
    given initial states and cotangents; torch's outputs and gradients of the packed call."""
    rng = np.random.default_rng(sum(map(ord, kind)))
    t, n, i, h, lengths = 4, 3, 2, 3, [4, 2, 1]
    ref = getattr(torch.nn, kind)(i, h, **opts).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.tensor(rng.standard_normal(tuple(p.shape)) * 0.6))
    bf, d = opts.get("batch_first", False), 2 if opts.get("bidirectional") else 1
    k, hp = opts.get("num_layers", 1) * d, opts.get("proj_size", 0) or h
    x = rng.standard_normal((n, t, i) if bf else (t, n, i))
    for row, length in enumerate(lengths):
        (x[row, length:] if bf else x[length:, row])[...] = np.nan
    ins = {"input": x, "initial_hidden": rng.standard_normal((k, n, hp))}
    cots = {"output": rng.standard_normal(x.shape[:-1] + (d * hp,)),
            "hidden": rng.standard_normal((k, n, hp))}
    for row, length in enumerate(lengths):  # torch's pad_packed_sequence never reads these
        (cots["output"][row, length:] if bf else cots["output"][length:, row])[...] = np.nan
    if kind == "LSTM":
        ins["initial_cell"] = rng.standard_normal((k, n, h))
        cots["cell"] = rng.standard_normal((k, n, h))
    leaves = {key: torch.tensor(v, requires_grad=True) for key, v in ins.items()}
    packed = pack_padded_sequence(leaves["input"], torch.tensor(lengths), batch_first=bf,
                                  enforce_sorted=False)
    states = [leaves[key] for key in ("initial_hidden", "initial_cell") if key in leaves]
    y, s = ref(packed, tuple(states) if len(states) == 2 else states[0])
    y, _ = pad_packed_sequence(y, batch_first=bf, total_length=t)
    outs = {"output": y, **dict(zip(("hidden", "cell"), s if isinstance(s, tuple) else (s,)))}
    leaves.update(dict(ref.named_parameters()))
    grads = torch.autograd.grad([outs[key] for key in cots], list(leaves.values()),
                                [torch.tensor(cots[key]) for key in cots])
    want = {key: v.detach().numpy() for key, v in outs.items()}
    want.update({f"grad|{key}": g.numpy() for key, g in zip(leaves, grads)})
    return ref, ins, np.array(lengths), cots, want


NAN_CASES = {"lstm": ("LSTM", {"num_layers": 2, "bidirectional": True, "batch_first": True,
                               "proj_size": 2}),
             "gru": ("GRU", {"num_layers": 2, "bidirectional": True, "bias": False}),
             "rnn_relu": ("RNN", {"nonlinearity": "relu", "bidirectional": True})}


@pytest.mark.parametrize("backend_name", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("case", sorted(NAN_CASES))
def test_lengths_never_read_the_padding_as_torchs_packed_sequences(case, backend_name):
    """NaN past each sequence's length: torch's ``pack_padded_sequence`` never reads it, so
    its outputs, states and every gradient are finite, the padding's gradient zero. Ours
    computed every step's input projection over the padding too, and the zero cotangents
    there times NaN made every gradient NaN (the outputs were right). The same for NaN in
    ``output``'s cotangent past the lengths, which ``pad_packed_sequence``'s backward drops:
    NumPy's BPTT multiplied it by 0 (NaN), the other backends' ``where`` dropped it."""
    with jax_float64() if backend_name == "jax" else contextlib.nullcontext():
        got, want = _nan_padded_run(case, backend_name)
    assert set(got) == set(want)
    for key, w in want.items():
        np.testing.assert_allclose(got[key], w, rtol=0, atol=1e-10, err_msg=key)


def _nan_padded_run(case: str, backend_name: str):
    kind, opts = NAN_CASES[case]
    ref, ins, lengths, cots, want = _nan_padded_case(kind, opts)
    ours = getattr(ml, kind)(ref.hidden_size, **opts, initial_states=True, lengths=True)
    backend = {"numpy": ml.NumpyBackend, "torch": ml.TorchBackend,
               "jax": ml.JaxBackend}[backend_name](dtype="float64")
    compiled = ml.compile(ours, backend, shapes={k: v.shape for k, v in ins.items()},
                          trainable_keys=list(ins))
    params = ours.params_from_torch(ref.state_dict(), backend=backend)
    params.update({k: backend.array(v) for k, v in ins.items()})
    out, grads = compiled.evaluate(params, {"lengths": backend.array(lengths)},
                                   output_gradients={k: backend.array(v) for k, v in cots.items()})
    back = {m: t for t, m in ours.torch_names().items()}
    got = {k: np.asarray(backend.to_numpy(v)) for k, v in out.items()}
    got.update({f"grad|{back.get(k, k)}": np.asarray(backend.to_numpy(v)) for k, v in grads.items()})
    return got, want


@pytest.mark.parametrize("backend_name", [None, "numpy", "torch", "jax"])
def test_params_from_torch_are_copies_a_torch_optimizer_step_leaves_alone(backend_name):
    """``params_from_torch`` gave views of the torch tensors (NumPy's ``.numpy()``, and the
    backends' arrays of those, JAX's included), so torch's in-place ``optimizer.step()``
    changed the loaded params too: a side-by-side run then started ours from torch's
    updated weights. Ours must keep the values they had when loaded: the output of torch's
    module before its step."""
    torch.manual_seed(0)
    ref = torch.nn.LSTM(3, 4, num_layers=2).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with torch.no_grad():
        want = ref(x)[0].numpy().copy()
    ours = ml.LSTM(4, num_layers=2)
    with jax_float64() if backend_name == "jax" else contextlib.nullcontext():
        backend = {None: ml.NumpyBackend, "numpy": ml.NumpyBackend, "torch": ml.TorchBackend,
                   "jax": ml.JaxBackend}[backend_name](dtype="float64")
        params = ours.params_from_torch(ref.state_dict(),
                                        backend=None if backend_name is None else backend)
        opt = torch.optim.SGD(ref.parameters(), lr=0.5)
        ref(x)[0].sum().backward()
        opt.step()  # in place, on ref's parameters
        compiled = ml.compile(ours, backend, shapes={"input": [5, 2, 3]})
        got = compiled.evaluate(params, {"input": backend.array(x.numpy())})["output"]
        got = np.asarray(backend.to_numpy(got))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    with torch.no_grad():
        assert not np.allclose(ref(x)[0].numpy(), want)  # (torch's module did change)


def test_a_cell_state_given_to_rnn_or_gru_is_not_sent_to_initial_states():
    """torch's RNN / GRU take no c0 (``gru(x, (h0, c0))`` is a torch error), so connecting
    ``initial_cell`` to ours must not say that ``initial_states=True`` would give it (it said
    so; that block has no ``initial_cell`` either). An LSTM's still does."""
    from mithril.errors import KeyMismatchError
    for block in (ml.GRU(4), ml.RNN(4), ml.GRU(4, initial_states=True)):
        with pytest.raises(KeyMismatchError, match=r"no terminal\(s\) \['initial_cell'\]") as e:
            block(input="x", initial_cell="c")
        assert "initial_states=True" not in str(e.value)
    ml.GRU(4, initial_states=True)(input="x", initial_hidden="h")  # (its h0 it takes)
    with pytest.raises(KeyMismatchError, match=r"\['initial_cell'\]: .*initial_states=True"):
        ml.LSTM(4)(input="x", initial_cell="c")
    with pytest.raises(AttributeError):  # torch: a GRU's hx is one tensor, no (h0, c0)
        torch.nn.GRU(3, 4)(torch.zeros(2, 1, 3), (torch.zeros(1, 1, 4), torch.zeros(1, 1, 4)))


@pytest.mark.parametrize("backend_name", [None, "numpy", "torch"])
def test_params_from_torch_of_a_bfloat16_module(backend_name):
    """A bfloat16 torch module's ``state_dict`` was torch's own ``TypeError`` (``.numpy()``
    has no bfloat16), where ``mithril.interop.params_from_torch`` takes it. Now the values
    load exactly, in bfloat16 (ml_dtypes' for NumPy), and the block runs as torch's."""
    torch.manual_seed(0)
    ref = torch.nn.GRU(3, 4, num_layers=2).bfloat16()
    ours = ml.GRU(4, num_layers=2)
    backend = (ml.TorchBackend if backend_name == "torch" else ml.NumpyBackend)(dtype="bfloat16")
    params = ours.params_from_torch(ref.state_dict(),
                                    backend=None if backend_name is None else backend)
    for t, m in ours.torch_names().items():
        got = np.asarray(backend.to_numpy(params[m]))
        assert got.dtype.name == "bfloat16" or backend_name == "torch"
        np.testing.assert_array_equal(got.astype(np.float32), ref.state_dict()[t].float().numpy())
    x = torch.randn(5, 2, 3).bfloat16()
    compiled = ml.compile(ours, backend, shapes={"input": [5, 2, 3]})
    out = compiled.evaluate(params, {"input": backend.array(x.float().numpy())})["output"]
    with torch.no_grad():
        want = ref(x)[0].float().numpy()
    np.testing.assert_allclose(np.asarray(backend.to_numpy(out)).astype(np.float32), want,
                               rtol=0, atol=2e-2)


@pytest.mark.parametrize("kind", ["rnn", "lstm"])
def test_published_cells_output_their_published_keys_only(kind):
    """The published ``RNNCell`` / ``LSTMCell`` output ``hidden``, ``hidden_compl`` and
    ``output`` (and ``cell``); ours also exposed their unnamed inner wires (``output_1`` ..
    ``output_9``: x·w_hhᵀ + ..., the gates, ...), which ``evaluate`` returned and errors
    listed. One step against torch, the state's extra row passed on as ``hidden_compl``."""
    rng = np.random.default_rng(3)
    n, m, i, h, o = 2, 3, 3, 4, 2
    data = {"input": rng.standard_normal((n, 1, i)), "prev_hidden": rng.standard_normal((m, 1, h))}
    if kind == "rnn":
        cell = ml.PublishedRNNCell()
        w = {"w_ih": (h, i), "w_hh": (h, h), "bias_h": (h,), "w_ho": (o, h), "bias_o": (o,)}
    else:
        cell = ml.PublishedLSTMCell()
        data["prev_cell"] = rng.standard_normal((m, 1, h))
        w = {**{f"w_{g}": (h, i + h) for g in "fico"}, **{f"bias_{g}": (h,) for g in "fico"},
             "w_out": (o, h), "bias_out": (o,)}
    params = {k: rng.standard_normal(s) * 0.5 for k, s in w.items()}
    want_keys = {"hidden", "hidden_compl", "output"} | ({"cell"} if kind == "lstm" else set())
    assert set(cell.output_keys) == want_keys
    compiled = ml.compile(cell, ml.NumpyBackend(dtype="float64"),
                          shapes={k: v.shape for k, v in {**data, **params}.items()})
    out = compiled.evaluate(params, data)
    assert set(out) == want_keys
    t = {k: torch.tensor(v) for k, v in {**data, **params}.items()}
    hp = t["prev_hidden"][:n]
    if kind == "rnn":
        hid = torch.tanh(t["input"] @ t["w_ih"].T + hp @ t["w_hh"].T + t["bias_h"])
        want = {"hidden": hid, "output": hid @ t["w_ho"].T + t["bias_o"]}
    else:
        xh = torch.cat([t["input"], hp], -1)
        f, ig, og = (torch.sigmoid(xh @ t[f"w_{g}"].T + t[f"bias_{g}"]) for g in "fio")
        c = f * t["prev_cell"][:n] + ig * torch.tanh(xh @ t["w_c"].T + t["bias_c"])
        hid = og * torch.tanh(c)
        want = {"hidden": hid, "cell": c, "output": hid @ t["w_out"].T + t["bias_out"]}
    want["hidden_compl"] = t["prev_hidden"][n:]
    for k, v in want.items():
        np.testing.assert_allclose(out[k], v.numpy(), rtol=0, atol=1e-12, err_msg=k)


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32", "uint64", "int32"])
def test_unsigned_lengths_as_torchs_pack_padded_sequence(dtype, backend_name):
    """torch's ``pack_padded_sequence`` takes lengths of any integer dtype (uint32
    included); on the torch backend ours raised torch's ``NotImplementedError: "min_all" not
    implemented for 'UInt32'`` (and its comparison could not promote them). Outputs, h_n and
    the input's gradient as torch's; a length past T still the named error."""
    from mithril.errors import InputValueError
    torch.manual_seed(0)
    ref = torch.nn.GRU(3, 4, bidirectional=True).double()
    x = np.random.default_rng(0).standard_normal((5, 2, 3))
    lengths = np.array([5, 2], dtype=dtype)
    xt = torch.tensor(x, requires_grad=True)
    packed = pack_padded_sequence(xt, torch.from_numpy(lengths.astype(np.int64)).to(
        getattr(torch, dtype)), enforce_sorted=False)
    y, h = ref(packed)
    y, _ = pad_packed_sequence(y, total_length=5)
    (y.sum() + h.sum()).backward()
    ours = ml.GRU(4, bidirectional=True, lengths=True)
    backend = {"numpy": ml.NumpyBackend, "torch": ml.TorchBackend}[backend_name](dtype="float64")
    compiled = ml.compile(ours, backend, shapes={"input": [5, 2, 3]}, trainable_keys=["input"])
    params = {**ours.params_from_torch(ref.state_dict(), backend=backend),
              "input": backend.array(x)}
    out, grads = compiled.evaluate(params, {"lengths": backend.array(lengths)},
                                   output_gradients={"output": backend.ones(5, 2, 8),
                                                     "hidden": backend.ones(2, 2, 4)})
    for got, want in ((out["output"], y), (out["hidden"], h), (grads["input"], xt.grad)):
        np.testing.assert_allclose(np.asarray(backend.to_numpy(got)), want.detach().numpy(),
                                   rtol=0, atol=1e-12)
    with pytest.raises(InputValueError, match="sequence length 6 out of range"):
        compiled.evaluate(params, {"lengths": backend.array(np.array([6, 2], dtype=dtype))})


def test_nonlinearity_is_an_rnns_and_named_by_the_block():
    """torch's RNN / RNNCell take nonlinearity "tanh" or "relu"; LSTM and GRU have fixed
    gates. ``Recurrence("gru" or "lstm", nonlinearity="relu")`` ignored it silently, an
    RNNCell's bad value was named "RNN:", and a relu ``Recurrence``'s repr read as tanh's."""
    with pytest.raises(ValueError, match=r"^RNNCell: nonlinearity must be 'tanh' or 'relu'"):
        ml.RNNCell(3, nonlinearity="sigmoid")
    for kind in ("gru", "lstm"):
        with pytest.raises(ValueError, match=rf"^{kind.upper()}: nonlinearity must be"):
            ml.Recurrence(kind, 3, nonlinearity="relu")
    assert "nonlinearity='relu'" in repr(ml.Recurrence("rnn", 3, nonlinearity="relu"))
    # relu as torch's, on a cell: max(·, 0) of the same pre-activation
    torch.manual_seed(0)
    ref = torch.nn.RNNCell(3, 4, nonlinearity="relu").double()
    cell = ml.RNNCell(4, nonlinearity="relu")
    x, h = np.random.default_rng(0).standard_normal((2, 2, 3))[0], np.zeros((2, 4))
    compiled = ml.compile(cell, ml.NumpyBackend(dtype="float64"),
                          shapes={"input": [2, 3], "prev_hidden": [2, 4]})
    out = compiled.evaluate(cell.params_from_torch(ref.state_dict()),
                            {"input": x, "prev_hidden": h})["output"]
    with torch.no_grad():
        np.testing.assert_allclose(out, ref(torch.tensor(x), torch.tensor(h)).numpy(), atol=1e-12)


def test_torchs_positional_sizes_are_refused_not_read_as_switches():
    """``torch.nn.LSTM(8, 4)`` is input 8, hidden 4; ``ml.LSTM(8, 4)`` silently was hidden 8
    with ``batch_first=4`` (truthy), and ``ml.RNNCell(8, 4)`` hidden 8 with ``bias=4``. A
    switch takes a bool, as torch's ``bias`` / ``batch_first`` (a TypeError there too)."""
    for make, what in ((lambda: ml.LSTM(8, 4), "batch_first"), (lambda: ml.GRU(8, 1), "batch_first"),
                       (lambda: ml.RNNCell(8, 4), "bias"), (lambda: ml.GRUCell(8, 2), "bias"),
                       (lambda: ml.RNN(4, bidirectional="yes"), "bidirectional"),
                       (lambda: ml.LSTM(4, lengths=2), "lengths")):
        with pytest.raises(TypeError, match=rf"{what} must be a bool"):
            make()
    with pytest.raises(TypeError, match="batch_first should be of type bool"):
        torch.nn.GRU(3, 4, 1, True, 1)  # (torch's own: num_layers, bias, batch_first)
    torch.manual_seed(0)
    ref = torch.nn.GRU(3, 4, batch_first=True, bias=False).double()
    ours = ml.GRU(4, np.True_, False)
    assert ours.batch_first is True and ours.bias is False
    x = np.random.default_rng(0).standard_normal((2, 5, 3))
    compiled = ml.compile(ours, ml.NumpyBackend(dtype="float64"), shapes={"input": [2, 5, 3]})
    out = compiled.evaluate(ours.params_from_torch(ref.state_dict()), {"input": x})
    with torch.no_grad():
        y, h = ref(torch.tensor(x))
    np.testing.assert_allclose(out["output"], y.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(out["hidden"], h.numpy(), rtol=0, atol=1e-12)
