"""Review 48, the published Mithril's recurrent templates (``OneToMany``,
``EncoderDecoder``, ``pack_data_into_time_slots``, the cells' weights taken from the data):
the published tests ported and run on NumPy, torch and JAX in float64, against torch
autograd of the same network (the shape wires are in ``test_review_published48.py``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_review_published48 import BACKENDS, TOL, _check, _run, _under_x64

import mithril as ml

# --- the published recurrent templates: OneToMany, EncoderDecoder; weights from the data -------

def _cell_torch(kind: str, t: dict, x, state: dict, prefix: str = "") -> tuple[dict, torch.Tensor]:
    """One step of the published cell (its first len(x) rows of the state): state, output."""
    n = x.shape[0]
    h = state["hidden"][:n]
    if kind == "rnn":
        hid = torch.tanh(x @ t[f"{prefix}w_ih"].T + h @ t[f"{prefix}w_hh"].T + t[f"{prefix}bias_h"])
        return {"hidden": hid}, hid @ t[f"{prefix}w_ho"].T + t[f"{prefix}bias_o"]
    xh = torch.cat([x, h], dim=-1)
    f, i, o = (torch.sigmoid(xh @ t[f"{prefix}w_{g}"].T + t[f"{prefix}bias_{g}"]) for g in "fio")
    cell = f * state["cell"][:n] + i * torch.tanh(xh @ t[f"{prefix}w_c"].T + t[f"{prefix}bias_c"])
    hid = o * torch.tanh(cell)
    return {"hidden": hid, "cell": cell}, hid @ t[f"{prefix}w_out"].T + t[f"{prefix}bias_out"]


def _one_to_many_torch(kind, t, data, steps, teacher_forcing, prefix="", state=None):
    state = state or {k: torch.tensor(data[f"{prefix}initial_{k}"]) for k in ("hidden", "cell")
                      if f"{prefix}initial_{k}" in data}
    outs, x = {}, torch.tensor(data[f"{prefix}input"])
    for s in range(steps):
        if s > 0:
            n = data[f"target{s}"].shape[0]
            x = (torch.tensor(data[f"target{s - 1}"]) if teacher_forcing else outs[f"output{s - 1}"])[:n]
        state, outs[f"output{s}"] = _cell_torch(kind, t, x, state, prefix)
    return outs


_SIZES = {"rnn": dict(w_ih=(5, 3), w_hh=(5, 5), bias_h=(5,), w_ho=(3, 5), bias_o=(3,)),
          "lstm": {**{f"w_{g}": (5, 8) for g in "fico"}, **{f"bias_{g}": (5,) for g in "fico"},
                   "w_out": (3, 5), "bias_out": (3,)}}


@pytest.mark.parametrize("teacher_forcing", [False, True])
@pytest.mark.parametrize("kind", ["rnn", "lstm"])
@pytest.mark.parametrize("name", ["numpy", "torch", pytest.param("jax", marks=pytest.mark.slow)])
def test_one_to_many_of_shrinking_targets_matches_torch(name, kind, teacher_forcing):
    """Targets of 3, 3, 2 and 1 rows (sequences sorted longest first, ending): step t takes
    the rows still running, of the previous output (or target). The weights' shapes come
    from the data's: none is given to compile."""
    from mithril.models.published_cells import OneToMany, PublishedLSTMCell, PublishedRNNCell
    rng = np.random.default_rng(4)
    rows = [3, 3, 2, 1]
    data = {"input": rng.standard_normal((3, 1, 3)), "initial_hidden": rng.standard_normal((4, 1, 5)),
            **{f"target{i}": rng.standard_normal((n, 1, 3)) for i, n in enumerate(rows)}}
    if kind == "lstm":
        data["initial_cell"] = rng.standard_normal((4, 1, 5))
    if not teacher_forcing:
        del data["target0"]  # (read by teacher forcing only)
    params = {k: rng.standard_normal(v) * 0.5 for k, v in _SIZES[kind].items()}
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    want = _one_to_many_torch(kind, t, data, len(rows), teacher_forcing)
    cots = {k: rng.standard_normal(tuple(v.shape)) for k, v in want.items()}
    sum(torch.sum(v * torch.tensor(cots[k])) for k, v in want.items()).backward()
    cell = PublishedRNNCell if kind == "rnn" else PublishedLSTMCell
    build = lambda: OneToMany(cell(), len(rows), teacher_forcing=teacher_forcing)  # noqa: E731
    pm = ml.compile(build(), ml.NumpyBackend(dtype="float64"),
                    shapes={k: list(v.shape) for k, v in data.items()})
    assert pm.parameter_shapes == _SIZES[kind]  # from the data's shapes
    got = _run(name, build, {k: list(v.shape) for k, v in data.items()}, params, data, cots)
    _check(got, {k: v.detach().numpy() for k, v in want.items()}, t)


class TorchOneToMany(torch.nn.Module):
    # synnada-ai/mithril tests/scripts/test_recurrent_models.py, as published
    def __init__(self, input_features, hidden_features, sequence_length):
        super().__init__()
        self.seq_len = sequence_length
        self.rnn = torch.nn.RNN(input_features, hidden_features, batch_first=True)
        self.fc = torch.nn.Linear(hidden_features, input_features)

    def forward(self, x, init_h):
        outputs = []
        out, hn = self.rnn(x, init_h)
        out = self.fc(out)
        outputs.append(out)
        for _ in range(self.seq_len - 1):
            out, hn = self.rnn(out, hn)
            out = self.fc(out)
            outputs.append(out)
        return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("name", ["numpy", "torch"])
def test_rnn_one_to_many_as_the_published_test(name):
    """tests/scripts/test_recurrent_models.py::test_rnn_one_to_many, ported: TrainModel of
    OneToMany with an AbsoluteError per step, compiled with the data as constants and no
    shapes (the weights' shapes inferred), against torch's nn.RNN + nn.Linear."""
    from mithril.models import AbsoluteError, Sum, TrainModel
    from mithril.models.published_cells import OneToMany, PublishedRNNCell
    torch.manual_seed(0)
    for batch_size, input_features, hidden_features, max_seq_length in [(4, 3, 5, 3), (1, 2, 7, 5)]:
        model = OneToMany(cell_type=PublishedRNNCell(), max_sequence_length=max_seq_length,
                          teacher_forcing=False)
        ctx = TrainModel(model)
        for idx in range(max_seq_length):
            ctx.add_loss(AbsoluteError(), input=f"output{idx}", target=f"target{idx}",
                         reduce_steps=[Sum()])
        torch_model = TorchOneToMany(input_features, hidden_features, max_seq_length).double()
        x = torch.randn(batch_size, 1, input_features, dtype=torch.float64)
        h0 = torch.randn(1, batch_size, hidden_features, dtype=torch.float64)
        targets = torch.randn(batch_size, max_seq_length, input_features, dtype=torch.float64)
        input_dict = {f"target{idx}": targets[:, idx: idx + 1, :] for idx in range(max_seq_length)}
        input_dict["initial_hidden"] = torch.swapaxes(h0, 0, 1)
        input_dict["input"] = x
        b = BACKENDS[name](dtype="float64")
        comp_model = ml.compile(model=ctx, backend=b,
                                constant_keys={k: b.array(v.numpy()) for k, v in input_dict.items()})
        sd = torch_model.state_dict()
        params = {"w_ih": sd["rnn.weight_ih_l0"], "w_hh": sd["rnn.weight_hh_l0"],
                  "bias_h": sd["rnn.bias_ih_l0"] + sd["rnn.bias_hh_l0"], "w_ho": sd["fc.weight"],
                  "bias_o": sd["fc.bias"]}
        out, grads = comp_model.evaluate({k: b.array(v.numpy()) for k, v in params.items()},
                                         output_gradients=True)
        output_torch = torch_model(x, h0)
        loss = sum(torch.abs(output_torch[:, i: i + 1] - input_dict[f"target{i}"]).sum()
                   for i in range(max_seq_length))
        loss.backward()
        for i in range(max_seq_length):
            np.testing.assert_allclose(b.to_numpy(out[f"output{i}"]),
                                       output_torch[:, i: i + 1].detach().numpy(), **TOL)
        np.testing.assert_allclose(b.to_numpy(out["final_cost"]), loss.item(), **TOL)
        p = dict(torch_model.named_parameters())
        want = {"w_ih": p["rnn.weight_ih_l0"].grad, "w_hh": p["rnn.weight_hh_l0"].grad,
                "w_ho": p["fc.weight"].grad, "bias_o": p["fc.bias"].grad,
                "bias_h": p["rnn.bias_ih_l0"].grad}  # (= bias_hh's: one bias here)
        np.testing.assert_allclose(p["rnn.bias_ih_l0"].grad, p["rnn.bias_hh_l0"].grad, **TOL)
        for k, v in want.items():
            np.testing.assert_allclose(b.to_numpy(grads[k]), v.numpy(), **TOL, err_msg=k)


@pytest.mark.parametrize("kind", ["rnn", "lstm"])
@pytest.mark.parametrize("name", list(BACKENDS))
def test_encoder_decoder_matches_torch(name, kind):
    """The encoder's sequences (3, 2, 2 rows a step: lengths 3, 3, 2) end in the published
    hidden_concat order; indices reorder those rows for the decoder (targets of 3, 2 rows)."""
    from mithril.models.published_cells import EncoderDecoder, PublishedLSTMCell, PublishedRNNCell
    rng = np.random.default_rng(9)
    enc_rows, dec_rows = [3, 3, 2], [3, 2]
    data = {"initial_hidden": rng.standard_normal((3, 1, 5)),
            **{f"input{i}": rng.standard_normal((n, 1, 3)) for i, n in enumerate(enc_rows)},
            "indices": np.array([2, 0, 1]), "decoder_input": rng.standard_normal((3, 1, 3)),
            **{f"target{i}": rng.standard_normal((n, 1, 3)) for i, n in enumerate(dec_rows) if i}}
    if kind == "lstm":
        data["initial_cell"] = rng.standard_normal((3, 1, 5))
        data["decoder_initial_cell"] = rng.standard_normal((3, 1, 5))
    sizes = _SIZES[kind]
    params = {**{k: rng.standard_normal(v) * 0.5 for k, v in sizes.items()},
              **{f"decoder_{k}": rng.standard_normal(v) * 0.5 for k, v in sizes.items()}}
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    state = {k: torch.tensor(data[f"initial_{k}"]) for k in ("hidden", "cell") if f"initial_{k}" in data}
    tails = []
    for s, n in enumerate(enc_rows):  # the encoder: ManyToOne's hidden_concat
        prev = state["hidden"]
        state, _ = _cell_torch(kind, t, torch.tensor(data[f"input{s}"]), state)
        if s > 0:
            tails.append(prev[n:])
        if s == len(enc_rows) - 1:
            tails.insert(len(tails) - 1, state["hidden"])
    hidden = torch.cat(tails)[torch.tensor(data["indices"])]
    dec_state = {"hidden": hidden, **({"cell": torch.tensor(data["decoder_initial_cell"])}
                                      if kind == "lstm" else {})}
    want = _one_to_many_torch(kind, t, data, len(dec_rows), False, prefix="decoder_", state=dec_state)
    cots = {k: rng.standard_normal(tuple(v.shape)) for k, v in want.items()}
    sum(torch.sum(v * torch.tensor(cots[k])) for k, v in want.items()).backward()
    cell = PublishedRNNCell if kind == "rnn" else PublishedLSTMCell
    build = lambda: EncoderDecoder(cell(), len(enc_rows), len(dec_rows))  # noqa: E731
    shapes = {k: list(v.shape) for k, v in data.items()}
    pm = ml.compile(build(), ml.NumpyBackend(dtype="float64"), shapes=shapes)
    assert pm.parameter_shapes == {**sizes, **{f"decoder_{k}": v for k, v in sizes.items()}}
    got = _run(name, build, shapes, params, data, cots)
    _check(got, {k: v.detach().numpy() for k, v in want.items()}, t)


def test_many_to_one_weights_follow_from_the_data_but_its_output_width():
    """ManyToOne: the input and hidden sizes come from input0 and initial_hidden; the output
    layer's width from one of its shapes (the published infers it through the loss)."""
    from mithril.models.published_cells import ManyToOne, OneToMany, PublishedRNNCell
    shapes = {"input0": [4, 1, 3], "input1": [2, 1, 3], "initial_hidden": [4, 1, 5]}
    pm = ml.compile(ManyToOne(PublishedRNNCell(), 2), ml.NumpyBackend(), shapes={**shapes, "bias_o": [2]})
    assert pm.parameter_shapes == {"w_ih": (5, 3), "w_hh": (5, 5), "bias_h": (5,), "w_ho": (2, 5),
                                   "bias_o": (2,)}
    with pytest.raises(ml.ShapeError, match=r"cannot infer the shape of parameter 'w_ho' .*"
                                            r"declare it: compile\(\.\.\., shapes=\{'w_ho'"):
        ml.compile(ManyToOne(PublishedRNNCell(), 2), ml.NumpyBackend(), shapes=shapes)
    with pytest.raises(TypeError, match="OneToMany: cell_type must be a PublishedRNNCell"):
        OneToMany(ml.RNNCell(5), 3)
    with pytest.raises(ValueError, match="EncoderDecoder: max_input_sequence_length must be an int >= 2"):
        ml.models.published_cells.EncoderDecoder(PublishedRNNCell(), 1, 3)


class TorchEncoderDecoder(torch.nn.Module):
    # synnada-ai/mithril tests/scripts/test_recurrent_models.py, as published
    def __init__(self, input_features, hidden_features, decoder_seq_len):
        super().__init__()
        self.encoder = torch.nn.RNN(input_features, hidden_features, batch_first=True)
        self.decoder = TorchOneToMany(input_features, hidden_features, decoder_seq_len)


@pytest.mark.parametrize("name", ["numpy", "torch"])
def test_encoder_decoder_of_packed_time_slots_as_the_published_test(name):
    """tests/scripts/test_recurrent_models.py::test_torch_encoder_decoder_var_seq_len (skipped
    there for a tolerance), ported: targets of several lengths packed by
    pack_data_into_time_slots (their indices reorder the encoder's states), inputs of one
    length (the published hidden_concat lists states in the input-sorted order only then),
    compiled with the data as constants and no shapes, in float64 against torch."""
    from mithril.models import (
        AbsoluteError,
        EncoderDecoder,
        PublishedRNNCell,
        Sum,
        TrainModel,
        pack_data_into_time_slots,
    )
    torch.manual_seed(1)
    batch_size, seq_len, input_dim, hidden_dim = 6, 3, 2, 4
    target_lengths = [2, 3, 1, 3, 2, 3]
    data = [(torch.randn(seq_len, input_dim, dtype=torch.float64),
             torch.randn(n, input_dim, dtype=torch.float64)) for n in target_lengths]
    b = BACKENDS[name](dtype="float64")
    data = [tuple(b.array(v.numpy()) for v in d) for d in data]
    train_time_inputs, data_sorted_wrt_input = pack_data_into_time_slots(
        backend=b, data=data, key=("input",), index=0)
    train_indices, train_time_targets, _ = pack_data_into_time_slots(
        backend=b, data=data_sorted_wrt_input, key=("target",), index=1, return_indices=True)
    assert train_indices == [1, 3, 5, 0, 4, 2] and list(train_time_targets) == ["target0", "target1",
                                                                                  "target2"]
    assert [v.shape[0] for v in train_time_targets.values()] == [6, 5, 3]
    h0 = torch.randn(batch_size, 1, hidden_dim, dtype=torch.float64)
    dec_in = torch.randn(batch_size, 1, input_dim, dtype=torch.float64)
    static_inputs = {"initial_hidden": b.array(h0.numpy()), "decoder_input": b.array(dec_in.numpy()),
                     "indices": b.array(np.array(train_indices))} | train_time_inputs | train_time_targets
    model = EncoderDecoder(cell_type=PublishedRNNCell(), max_input_sequence_length=seq_len,
                           max_target_sequence_length=seq_len)
    ctx = TrainModel(model)
    for idx in range(seq_len):
        ctx.add_loss(AbsoluteError(), input=f"output{idx}", target=f"target{idx}", reduce_steps=[Sum()])
    comp_model = ml.compile(model=ctx, backend=b, constant_keys=static_inputs)
    tm = TorchEncoderDecoder(input_dim, hidden_dim, seq_len).double()
    sd = dict(tm.named_parameters())
    key_map = {"w_ih": "encoder.weight_ih_l0", "w_hh": "encoder.weight_hh_l0",
               "decoder_w_ih": "decoder.rnn.weight_ih_l0", "decoder_w_hh": "decoder.rnn.weight_hh_l0",
               "decoder_w_ho": "decoder.fc.weight", "decoder_bias_o": "decoder.fc.bias"}
    params = {k: sd[v].detach().numpy() for k, v in key_map.items()}
    params["bias_h"] = (sd["encoder.bias_ih_l0"] + sd["encoder.bias_hh_l0"]).detach().numpy()
    params["decoder_bias_h"] = (sd["decoder.rnn.bias_ih_l0"] + sd["decoder.rnn.bias_hh_l0"]).detach().numpy()
    params["w_ho"], params["bias_o"] = np.zeros((input_dim, hidden_dim)), np.zeros(input_dim)  # unread
    assert comp_model.parameter_shapes == {k: v.shape for k, v in params.items()}
    outputs, grads = comp_model.evaluate({k: b.array(v) for k, v in params.items()}, output_gradients=True)
    x = torch.stack([torch.tensor(b.to_numpy(d[0])) for d in data_sorted_wrt_input])
    _, hn = tm.encoder(x, h0.transpose(0, 1))
    output = tm.decoder(dec_in, hn[:, train_indices])  # (the decoder's rows: target-sorted)
    loss = torch.tensor(0.0, dtype=torch.float64)
    for idx in range(seq_len):
        target = torch.tensor(b.to_numpy(train_time_targets[f"target{idx}"]))
        np.testing.assert_allclose(b.to_numpy(outputs[f"output{idx}"]),
                                   output[:target.shape[0], idx: idx + 1].detach().numpy(), **TOL)
        loss = loss + torch.abs(output[:target.shape[0], idx: idx + 1] - target).sum()
    loss.backward()
    np.testing.assert_allclose(b.to_numpy(outputs["final_cost"]), loss.item(), **TOL)
    for k, v in key_map.items():
        np.testing.assert_allclose(b.to_numpy(grads[k]), sd[v].grad.numpy(), **TOL, err_msg=k)
    for k, v in (("bias_h", "encoder.bias_ih_l0"), ("decoder_bias_h", "decoder.rnn.bias_ih_l0")):
        np.testing.assert_allclose(b.to_numpy(grads[k]), sd[v].grad.numpy(), **TOL, err_msg=k)
    np.testing.assert_allclose(b.to_numpy(grads["w_ho"]), 0.0)


def test_pack_data_into_time_slots_refuses_what_it_cannot_pack():
    from mithril.models import pack_data_into_time_slots
    b = ml.NumpyBackend()
    with pytest.raises(ValueError, match=r"data\[1\]\[0\] is float64 \[2, 3\], data\[0\]\[0\] float64 "
                                         r"\[2, 2\]: the feature shapes and dtypes must agree"):
        pack_data_into_time_slots([(np.zeros((2, 2)),), (np.zeros((2, 3)),)], b)
    with pytest.raises(ValueError, match=r"sorted_data=True, but the lengths are not sorted"):
        pack_data_into_time_slots([(np.zeros((1, 2)),), (np.zeros((2, 2)),)], b, sorted_data=True)
    with pytest.raises(ValueError, match="data has no samples"):
        pack_data_into_time_slots([], b)




@pytest.mark.parametrize("name", list(BACKENDS))
def test_encoder_decoder_inference_matches_torch(name):
    """examples/model_api/variable_length_many_to_one_lstm.py's inference half: a trained
    EncoderDecoder's parameters evaluate EncoderDecoderInference (compiled with data keys and
    no shapes: built at the first evaluate), against the published torch test's
    TorchEncoderDecoder forward."""
    from mithril.models import EncoderDecoderInference, PublishedRNNCell
    torch.manual_seed(2)
    batch, seq_len, target_len, input_dim, hidden_dim = 3, 3, 4, 2, 5
    tm = TorchEncoderDecoder(input_dim, hidden_dim, target_len).double()
    sd = dict(tm.named_parameters())
    params = {"w_ih": sd["encoder.weight_ih_l0"], "w_hh": sd["encoder.weight_hh_l0"],
              "bias_h": sd["encoder.bias_ih_l0"] + sd["encoder.bias_hh_l0"],
              "decoder_w_ih": sd["decoder.rnn.weight_ih_l0"], "decoder_w_hh": sd["decoder.rnn.weight_hh_l0"],
              "decoder_bias_h": sd["decoder.rnn.bias_ih_l0"] + sd["decoder.rnn.bias_hh_l0"],
              "decoder_w_ho": sd["decoder.fc.weight"], "decoder_bias_o": sd["decoder.fc.bias"]}
    params = {k: v.detach().numpy() for k, v in params.items()}
    params["w_ho"], params["bias_o"] = np.zeros((input_dim, hidden_dim)), np.zeros(input_dim)
    x = torch.randn(batch, seq_len, input_dim, dtype=torch.float64)
    h0 = torch.randn(batch, 1, hidden_dim, dtype=torch.float64)
    dec_in = torch.randn(batch, 1, input_dim, dtype=torch.float64)
    data = {"initial_hidden": h0.numpy(), "decoder_input": dec_in.numpy(),
            **{f"input{i}": x[:, i: i + 1].numpy() for i in range(seq_len)}}
    _, hn = tm.encoder(x, h0.transpose(0, 1))
    want = tm.decoder(dec_in, hn).detach().numpy()

    def go():
        b = BACKENDS[name](dtype="float64")
        pm = ml.compile(EncoderDecoderInference(PublishedRNNCell(), seq_len, target_len), b,
                        data_keys=set(data))
        out = pm.evaluate({k: b.array(v) for k, v in params.items()},
                          {k: b.array(v) for k, v in data.items()})
        return {k: np.asarray(b.to_numpy(v)) for k, v in out.items()}
    out = go() if name != "jax" else _under_x64(go)
    assert sorted(out) == [f"output{i}" for i in range(target_len)]
    for i in range(target_len):
        np.testing.assert_allclose(out[f"output{i}"], want[:, i: i + 1], **TOL)
