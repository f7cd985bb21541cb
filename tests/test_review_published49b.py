"""Review 49b, the published Mithril's next gaps, built and checked against torch in float64
on NumPy, torch and JAX: integer constants in expressions (integer arithmetic stays integer,
a float tensor and an int constant meet as torch's tensor and number do), ``Cast`` to int16,
and a shape wire given to a sub-model's input; ported from the published
``examples/t5.py`` (its relative position buckets and bias) and compared with the
Hugging Face formula written here in torch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import jax_float64
from test_review_published48 import BACKENDS, _check, _run

import mithril as ml
from mithril import IOKey
from mithril.models import (
    Add,
    Arange,
    Buffer,
    Embedding,
    Linear,
    Log,
    Minimum,
    Model,
    Transpose,
    Where,
    ZerosLike,
)

NAMES = ["numpy", "torch", "jax"]


def _in_x64(name: str, fn):
    if name == "jax":
        with jax_float64():
            return fn()
    return fn()


# --- the published examples/t5.py, verbatim but for the Arange of a constant start -------------

def relative_position_bucket(bidirectional=True, num_buckets=32, max_distance=128, *, name=None):
    block = Model(name=name)
    relative_position = IOKey("relative_position")
    relative_buckets = IOKey(value=0)

    if bidirectional:
        num_buckets //= 2

        relative_buckets += (relative_position > 0).cast(ml.int16) * num_buckets
        relative_position = relative_position.abs()  # type: ignore
    else:
        block |= ZerosLike().connect(relative_position, output="zeros_like")
        block |= Minimum().connect(left=relative_position, right="zeros_like", output="minimum_out")

        relative_position = -block.minimum_out  # type: ignore
    # now relative_position is in the range [0, inf)

    # half of the buckets are for exact increments in positions
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    scale = (num_buckets - max_exact) / math.log(max_distance / max_exact)

    block |= Log().connect((relative_position.cast(ml.float32) / max_exact), output="log_out")

    block |= Minimum().connect(
        left=(max_exact + block.log_out * scale).cast(ml.int16),  # type: ignore
        right=ml.Tensor(num_buckets - 1),
        output="relative_position_if_large_2",
    )
    block |= Where().connect(cond=is_small, input1=relative_position,
                             input2="relative_position_if_large_2", output="where_out")

    block |= Add().connect(relative_buckets, "where_out", output="output")
    block.expose_keys("output")

    return block


def relative_position_bias(config, bidirectional, *, name=None, offset_start=False):
    """As published; ``offset_start=False``: ``Arange().connect(stop=query_length)`` for the
    published ``Arange(start=TBD).connect(start=offset, ...)`` with the encoder's offset 0
    (``offset_start=True``: as published, a constant start known when compiling)."""
    num_buckets = config["relative_attention_num_buckets"]
    max_distance = config.get("relative_attention_max_distance", 128)
    num_heads = config["num_heads"]

    block = Model(name=name)
    query_length = IOKey("query_length", type=int)
    key_length = IOKey("key_length", type=int)
    if offset_start:
        block |= Arange(start=ml.TBD).connect(start=IOKey("offset", type=int), stop=query_length,
                                              output="context_position")
    else:
        block |= Arange().connect(stop=query_length, output="context_position")
    block |= Arange().connect(stop=key_length, output="memory_position")

    context_position = block.context_position[:, None]  # type: ignore
    memory_position = block.memory_position[None, :]  # type: ignore

    relative_position = memory_position - context_position

    block |= relative_position_bucket(
        bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    ).connect(relative_position=relative_position, output="relative_position_buckets")
    block |= Embedding(num_embeddings=num_buckets, dim=num_heads, name="embeddings").connect(
        input="relative_position_buckets", output="values")
    block |= Transpose(axes=(2, 0, 1)).connect(input="values", output="output")

    block.expose_keys("output")
    return block


def encoder_bias(config, bidirectional, offset_start=False):
    """The published transformer_encoder's first block: the bias of the input's length."""
    input = IOKey("input")
    block = Model()
    extra = {"offset": 0} if offset_start else {}
    block |= relative_position_bias(config, bidirectional=bidirectional,
                                    name="relative_attention_bias", offset_start=offset_start
                                    ).connect(query_length=input.shape[1],
                                              key_length=input.shape[1], output="pos_bias",
                                              **extra)
    block.expose_keys("pos_bias")
    return block


def hf_bucket(relative_position, bidirectional, num_buckets, max_distance):
    """transformers' T5Attention._relative_position_bucket, in torch."""
    relative_buckets = 0
    if bidirectional:
        num_buckets //= 2
        relative_buckets += (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
    else:
        relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    relative_position_if_large = max_exact + (
        torch.log(relative_position.float() / max_exact) / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)).to(torch.long)
    relative_position_if_large = torch.min(
        relative_position_if_large, torch.full_like(relative_position_if_large, num_buckets - 1))
    return relative_buckets + torch.where(is_small, relative_position, relative_position_if_large)


CONFIG = {"relative_attention_num_buckets": 32, "relative_attention_max_distance": 20,
          "num_heads": 3}


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_t5_relative_position_bias_as_published(name, bidirectional):
    """The published T5 bias (buckets by integer arithmetic on Arange outputs, an int
    IOKey(value=0), `* num_buckets`, Cast to int16, Tensor(num_buckets - 1)) equals the
    Hugging Face formula's buckets looked up in the same embedding, and its gradient torch
    autograd's. Before integer constants, `* 16` made the buckets floats (an Embedding index
    NumPy and JAX refuse)."""
    n = 30  # relative distances up to 29 > max_distance 20: the last bucket's clamp is reached
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 3))
    cot = rng.standard_normal((3, n, n))
    pos = torch.arange(n)
    buckets = hf_bucket(pos[None, :] - pos[:, None], bidirectional, 32, 20)
    assert buckets.max() == 31
    tw = torch.tensor(w, requires_grad=True)
    want = tw[buckets].permute(2, 0, 1)
    (want * torch.tensor(cot)).sum().backward()
    got = _run(name, lambda: encoder_bias(CONFIG, bidirectional), {"input": [1, n, 4]},
               {"relative_attention_bias.embeddings.weight": w}, {"input": np.zeros((1, n, 4))},
               {"pos_bias": cot})
    _check(got, {"pos_bias": want.detach().numpy()},
           {"relative_attention_bias.embeddings.weight": tw})


@pytest.mark.parametrize("name", NAMES)
def test_t5_buckets_are_integers_equal_to_hugging_face(name):
    """The bucket wire itself: integers (not floats), each equal to the HF formula's."""
    n = 30

    def go():
        m = Model()
        m |= Arange().connect(stop=IOKey("x").shape[0], output="p")
        m |= relative_position_bucket(True, 32, 20).connect(
            relative_position=m.p[None, :] - m.p[:, None], output="buckets")
        b = BACKENDS[name](dtype="float64")
        pm = ml.compile(m, b, shapes={"x": [n]}, inference=True)
        return b.to_numpy(pm.evaluate({}, {"x": b.array(np.zeros(n))})["buckets"])
    got = _in_x64(name, go)
    pos = torch.arange(n)
    assert np.asarray(got).dtype.kind == "i"
    np.testing.assert_array_equal(got, hf_bucket(pos[None, :] - pos[:, None], True, 32, 20))


def test_t5_bias_with_a_constant_offset_start():
    pm = ml.compile(encoder_bias(CONFIG, True, offset_start=True), ml.NumpyBackend(),
                    shapes={"input": [1, 6, 4]})
    assert pm.get_shapes()["pos_bias"] == [3, 6, 6]


# --- integer constants and the dtype rule (operator.promote) ------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_int_constant_keeps_a_float32_model_float32_with_torchs_numbers(name):
    """`lin.output * 2 + 1`, `2 ** x` and `@ [[1, 2], [3, -1]]` with int constants: float32
    values and gradients
    (NumPy alone would make `float32 * int64` float64), equal to torch's tensor-and-number
    arithmetic."""
    rng = np.random.default_rng(3)
    x, w, bias = (rng.standard_normal(s).astype(np.float32) for s in ((4, 3), (2, 3), (2,)))
    cot = rng.standard_normal((4, 2)).astype(np.float32)
    m = Model()
    m |= (lin := Linear(2)).connect(input="x", weight="w", bias="b")
    m |= Buffer().connect(input=((lin.output * 2 + 1) * (2 ** lin.output)) @ [[1, 2], [3, -1]],
                          output="y")
    m.expose_keys("y")
    b = BACKENDS[name]()
    pm = ml.compile(m, b, shapes={"x": [4, 3]})
    out, grads = pm.evaluate({"w": b.array(w), "b": b.array(bias)}, {"x": b.array(x)},
                             output_gradients={"y": b.array(cot)})
    tw, tb = (torch.tensor(v, requires_grad=True) for v in (w, bias))
    h = torch.tensor(x) @ tw.T + tb
    want = ((h * 2 + 1) * (2 ** h)) @ torch.tensor([[1, 2], [3, -1]], dtype=torch.float32)
    (want * torch.tensor(cot)).sum().backward()
    assert b.dtype_name(out["y"]) == "float32" and b.dtype_name(grads["w"]) == "float32"
    np.testing.assert_allclose(b.to_numpy(out["y"]), want.detach().numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(b.to_numpy(grads["w"]), tw.grad.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b.to_numpy(grads["b"]), tb.grad.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_integer_arithmetic_on_an_arange_stays_integer(name):
    """`Arange(stop=x.shape[0]) * 3 + 1`, `- 2`, `.cast(ml.int16) * 4` and a Minimum with
    `Tensor(5)`: integers, torch's values (before: floats, the int constants made floats)."""
    def go():
        m = Model()
        m |= Arange().connect(stop=IOKey("x").shape[0], output="p")
        m |= Buffer().connect(input=m.p * 3 + 1 - 2, output="a")  # type: ignore
        m |= Minimum().connect(left=(m.p.cast(ml.int16) * 4), right=ml.Tensor(5), output="c")  # type: ignore
        m.expose_keys("a", "c")
        b = BACKENDS[name](dtype="float64")
        pm = ml.compile(m, b, shapes={"x": [6]}, inference=True)
        return {k: np.asarray(b.to_numpy(v)) for k, v in
                pm.evaluate({}, {"x": b.array(np.zeros(6))}).items()}
    out = _in_x64(name, go)
    p = torch.arange(6)
    assert out["a"].dtype.kind == "i" and out["c"].dtype.kind == "i"
    assert out["c"].dtype == np.int16
    np.testing.assert_array_equal(out["a"], p * 3 + 1 - 2)
    np.testing.assert_array_equal(out["c"], torch.minimum(p.to(torch.int16) * 4,
                                                          torch.tensor(5, dtype=torch.int16)))


def test_a_shape_wire_as_a_sub_models_input_and_one_that_is_not_offered():
    """`inner.connect(n=x.shape[1])` is a Size output (the inner Arange's end); `x.shape[0] *
    x.shape[1]` given as a connection is a TypeError naming the key, nothing added."""
    inner = Model()
    inner |= Arange().connect(stop=IOKey("n"), output="r")
    inner.expose_keys("r")
    outer = Model()
    x = IOKey("x")
    outer |= inner.connect(n=x.shape[1], r="r")
    outer.expose_keys("r")
    pm = ml.compile(outer, ml.NumpyBackend(), shapes={"x": [2, 7]}, inference=True)
    np.testing.assert_array_equal(pm.evaluate({}, {"x": np.zeros((2, 7), np.float32)})["r"],
                                  np.arange(7))
    inner2, outer2 = Model(), Model()
    inner2 |= Arange().connect(stop=IOKey("n"), output="r")
    outer2 |= Buffer().connect(input="x", output="y")
    before = list(outer2.blocks)
    with pytest.raises(TypeError, match=r"connection for 'n': the shape wire .*\* .* is given as "
                                        r"a connection only as x.shape or x.shape\[i\]"):
        outer2 |= inner2.connect(n=outer2.x.shape[0] * outer2.x.shape[1])  # type: ignore
    assert outer2.blocks == before


def test_cast_takes_int16_int8_uint8_and_names_the_others():
    for dt in (ml.int16, "int8", "uint8"):
        m = Model()
        m |= Buffer().connect(input=IOKey("x").cast(dt), output="y")
        pm = ml.compile(m, ml.NumpyBackend(), shapes={"x": [3]}, inference=True)
        out = pm.evaluate({}, {"x": np.array([1.7, 2.2, 3.9], np.float32)})["y"]
        assert out.dtype == np.dtype(str(getattr(dt, "name", dt)))
        np.testing.assert_array_equal(out, torch.tensor([1.7, 2.2, 3.9]).to(
            getattr(torch, str(getattr(dt, "name", dt)))).numpy())
    with pytest.raises(ValueError, match="Cast: dtype must be one of .*got 'complex64'"):
        IOKey("x").cast("complex64")


# --- Randn / RandInt (random_blocks.py) -----------------------------------------------------------

def _random_model():
    from mithril.models import RandInt, Randn

    m = Model()
    m |= Randn(shape=(2, 3)).connect(output="a")
    m |= Randn(key=5).connect(shape=(IOKey("x").shape[0], 2), output="k")  # as published
    m |= RandInt((4, 5), low=-3, high=10).connect(output="i")
    m |= Randn(shape=(2, 3)).connect(output="a2")
    m.expose_keys("a", "k", "i", "a2")
    return m


def _draw(name: str, **kw):
    def go():
        b = BACKENDS[name](dtype="float64", seed=3)
        pm = ml.compile(_random_model(), b, shapes={"x": [3]})
        runs = [pm.evaluate({}, {"x": b.ones(3)}, **kw) for _ in range(2)]
        return [{k: np.asarray(b.to_numpy(v)) for k, v in r.items()} for r in runs], pm.step
    return _in_x64(name, go)


def test_randn_and_randint_are_the_same_on_three_backends_and_follow_seed_and_step():
    """A seed and a step give the same draws on NumPy, torch and JAX (float64: 1e-12); a
    keyed Randn is the same at every step, an unkeyed one changes with the step (as the
    published key state) and two blocks differ; `step=` replays a step."""
    got = {n: _draw(n) for n in NAMES}
    for n in NAMES[1:]:
        for r0, r1 in zip(got["numpy"][0], got[n][0], strict=True):
            for k in r0:
                np.testing.assert_allclose(r1[k], r0[k], rtol=1e-12, atol=1e-12, err_msg=k)
    (first, second), step = got["numpy"]
    assert step == 2 and first["i"].dtype == np.int64 and got["jax"][0][0]["i"].dtype == np.int64
    assert not np.allclose(first["a"], second["a"]) and not np.allclose(first["a"], first["a2"])
    np.testing.assert_array_equal(first["k"], second["k"])
    assert first["i"].min() >= -3 and first["i"].max() < 10
    replay, _ = _draw("numpy", step=0)
    np.testing.assert_array_equal(replay[0]["a"], first["a"])
    np.testing.assert_array_equal(replay[1]["a"], first["a"])


def test_randn_is_standard_normal_and_randint_uniform():
    """200k draws: the Kolmogorov-Smirnov distance to N(0, 1) (torch's ndtr) is below the
    0.1% critical value, and RandInt's 7 values each come up 1/7 of the time (4 sigma)."""
    from mithril.models import RandInt, Randn

    m = Model()
    m |= Randn(shape=(200_000,), key=11).connect(output="z")
    m |= RandInt((200_000,), key=12, low=2, high=9).connect(output="i")
    m.expose_keys("z", "i")
    out = ml.compile(m, ml.NumpyBackend(dtype="float64"), inference=True).evaluate({}, {})
    z = np.sort(out["z"])
    cdf = torch.special.ndtr(torch.tensor(z)).numpy()
    n = len(z)
    ks = max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))
    assert ks < 1.95 / np.sqrt(n)
    counts = np.bincount(out["i"] - 2, minlength=7)
    assert counts.sum() == n and len(counts) == 7
    assert np.all(np.abs(counts - n / 7) < 4 * np.sqrt(n / 7 * 6 / 7))


def test_published_randn_as_submodel_and_clips_zeros_from_randn():
    """tests/scripts/test_state_keys.py's Randn().connect(shape=input.shape) and the published
    CLIP's Randn(shape=(rt.shape[0], 1, rt.shape[-1])) -> ZerosLike -> class embedding row."""
    from mithril.models import Concat, Randn

    m = Model()
    inp = IOKey("input")
    m |= Buffer().connect("input", "output")
    m |= Randn().connect(shape=inp.shape, output="randn_output")
    m.expose_keys("output", "randn_output")
    pm = ml.compile(m, ml.JaxBackend())
    import jax.numpy as jnp

    o1, o2 = (pm.evaluate({}, {"input": jnp.ones((2, 2))}) for _ in range(2))
    assert o1["randn_output"].shape == (2, 2) and not jnp.allclose(o1["randn_output"],
                                                                    o2["randn_output"])
    block = Model()
    rt = IOKey("x").transpose((0, 2, 1))
    block |= Randn().connect(shape=(rt.shape[0], 1, rt.shape[-1]), output="rand_1")
    block |= ZerosLike().connect(input=block.rand_1, output="zeros_out")  # type: ignore
    cls = IOKey("class_embedding", differentiable=True, shape=[4])
    block |= Concat(axis=1).connect(input=[cls + block.zeros_out, rt], output="cat1")  # type: ignore
    block.expose_keys("cat1")
    b = ml.TorchBackend(dtype="float64")
    pm = ml.compile(block, b, shapes={"x": [2, 4, 3]})
    rng = np.random.default_rng(0)
    x, c, cot = rng.standard_normal((2, 4, 3)), rng.standard_normal(4), rng.standard_normal((2, 4, 4))
    out, grads = pm.evaluate({"class_embedding": b.array(c)}, {"x": b.array(x)},
                             output_gradients={"cat1": b.array(cot)})
    tc = torch.tensor(c, requires_grad=True)
    want = torch.cat([tc + torch.zeros(2, 1, 4, dtype=torch.float64),
                      torch.tensor(x).transpose(1, 2)], dim=1)
    (want * torch.tensor(cot)).sum().backward()
    np.testing.assert_allclose(b.to_numpy(out["cat1"]), want.detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(b.to_numpy(grads["class_embedding"]), tc.grad.numpy(), atol=1e-12)


def test_random_blocks_refuse_bad_arguments_by_name_and_stay_unchanged():
    from mithril.models import RandInt, Randn

    with pytest.raises(TypeError, match="Randn: key must be an int >= 0"):
        Randn((2,), key=-1)
    with pytest.raises(TypeError, match="Randn: dtype must be one of .*got 'int32'"):
        Randn((2,), dtype="int32")
    with pytest.raises(ValueError, match="RandInt: needs low < high .*low=5, high=5"):
        RandInt((2,), low=5, high=5)
    r = RandInt((2,), low=0, high=4)
    with pytest.raises(TypeError, match="RandInt: high must be an int, got 'h'"):
        r.connect(high="h")
    assert (r.low, r.high) == (0, 4)
    m = Model()
    m |= RandInt((3,)).connect(output="i")
    with pytest.raises(TypeError, match="RandInt: low and high are not given"):
        ml.compile(m, ml.NumpyBackend())
