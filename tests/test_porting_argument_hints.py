"""What a user porting from optax / Keras / torch meets on an optimizer's arguments: each
refused argument names itself and what to give instead (and the hint is checked to give the
peer's numbers), a refused call builds and changes nothing; optax's mask written as a dict
of bools (flat or as the params' pytree) is taken, side by side with optax and torch."""

from __future__ import annotations

import json
import re

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from mithril.interop import optax_transformation, torch_optimizer
from mithril.utils.lr_schedulers import ExponentialDecay
from mithril.utils.optimizers import SGD, Adam, AdamW, clip_gradients

RNG = np.random.default_rng(0)
P = {"w": RNG.standard_normal((3, 2)), "b": RNG.standard_normal(2)}
G = [{k: RNG.standard_normal(v.shape) for k, v in P.items()} for _ in range(3)]


def _run(opt, params=P, grads=G):
    params, state = {k: v.copy() for k, v in params.items()}, opt.init(params)
    for g in grads:
        params, state = opt.update(params, g, state)
    return params, state


# -- 1. Keras's clipping names ----------------------------------------------------------
def test_global_clipnorm_names_clip_norm_and_the_exact_keras_optax_rule():
    with pytest.raises(TypeError, match=r"'global_clipnorm' \(did you mean clip_norm\? .*"
                       + re.escape("clip_norm=c, clip_eps=0.0")):
        Adam(1e-3, global_clipnorm=1.0)
    with pytest.raises(TypeError, match=r"'clipnorm' \(did you mean clip_tensor_norm\?\)"):
        Adam(1e-3, clipnorm=1.0)
    with pytest.raises(TypeError, match=r"'clipvalue' \(did you mean clip_value\?\)"):
        Adam(1e-3, clipvalue=1.0)
    # the hint's claim: ‖g‖ = 2e-6 > c = 1e-6, where torch's 1e-6 counts (scale 1/3, not 1/2)
    c, g = 1e-6, {"w": np.array([2e-6, 0.0])}
    want, _ = optax.chain(optax.clip_by_global_norm(c), optax.sgd(1.0)).update(
        {"w": jnp.asarray(g["w"])}, optax.chain(optax.clip_by_global_norm(c),
                                                optax.sgd(1.0)).init({"w": jnp.zeros(2)}))
    p0 = {"w": np.zeros(2)}
    recipe = SGD(1.0).update(p0, clip_gradients(g, clip_norm=c, eps=0.0), SGD(1.0).init(p0))[0]
    hinted = SGD(1.0, clip_norm=c, clip_eps=0.0)
    hinted = hinted.update(p0, g, hinted.init(p0))[0]
    np.testing.assert_allclose(hinted["w"], recipe["w"], rtol=1e-15)  # (the hint: optax's)
    fused = SGD(1.0, clip_norm=c).update(p0, g, SGD(1.0, clip_norm=c).init(p0))[0]
    np.testing.assert_allclose(recipe["w"], np.asarray(want["w"]), rtol=1e-6)  # -1e-6
    torch_g = torch.tensor(g["w"], requires_grad=True)
    torch_g.grad = torch.tensor(g["w"])
    torch.nn.utils.clip_grad_norm_([torch_g], c)
    np.testing.assert_allclose(fused["w"], -torch_g.grad.numpy(), rtol=1e-12)  # -6.7e-7
    assert abs(fused["w"][0] - recipe["w"][0]) > 3e-7


# -- 2. optax's mask as a dict of bools ---------------------------------------------------
MASK = {"w": True, "b": False}


def test_dict_mask_equals_torch_groups_and_the_list_mask():
    got, _ = _run(AdamW(0.1, weight_decay=0.3, weight_decay_mask=MASK))
    listed, _ = _run(AdamW(0.1, weight_decay=0.3, weight_decay_mask=["w"]))
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in P.items()}
    ref = torch.optim.AdamW([{"params": [tp["w"]]}, {"params": [tp["b"]], "weight_decay": 0.0}],
                            lr=0.1, weight_decay=0.3)
    for g in G:
        for k in tp:
            tp[k].grad = torch.tensor(g[k])
        ref.step()
    for k in P:
        np.testing.assert_allclose(got[k], tp[k].detach().numpy(), rtol=1e-12)
        np.testing.assert_array_equal(got[k], listed[k])


def test_dict_mask_survives_state_dict_json_and_torch_optimizer():
    opt = AdamW(0.1, weight_decay=0.3, weight_decay_mask=MASK)
    half, st = _run(opt, grads=G[:1])
    d = json.loads(json.dumps(opt.state_dict(st), default=lambda a: np.asarray(a).tolist()))
    assert d["hyperparameters"]["weight_decay_mask"] == MASK
    fresh = AdamW(0.1, weight_decay=0.3)
    st2 = fresh.load_state_dict(d, half)
    assert fresh.weight_decay_mask == MASK
    for g in G[1:]:
        half, st2 = fresh.update(half, g, st2)
    full, _ = _run(AdamW(0.1, weight_decay=0.3, weight_decay_mask=MASK))
    for k in P:
        np.testing.assert_allclose(half[k], full[k], rtol=1e-12)
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in P.items()}
    topt = torch_optimizer(AdamW(0.1, weight_decay=0.3, weight_decay_mask=MASK), tp.items())
    for g in G:
        for k in tp:
            tp[k].grad = torch.tensor(g[k])
        topt.step()
    for k in P:
        np.testing.assert_allclose(tp[k].detach().numpy(), full[k], rtol=1e-12)


def test_pytree_dict_mask_in_optax_transformation_equals_optax_masked():
    params = {"dense": {"kernel": jnp.asarray(P["w"], jnp.float32),
                        "bias": jnp.asarray(P["b"], jnp.float32)}}
    mask = {"dense": {"kernel": True, "bias": False}}
    ours = optax_transformation(AdamW(0.1, weight_decay=0.3, weight_decay_mask=mask))
    theirs = optax.adamw(0.1, weight_decay=0.3, eps=1e-8, mask=mask)
    p1, p2, s1, s2 = params, params, ours.init(params), theirs.init(params)
    for g in G:
        tree = {"dense": {"kernel": jnp.asarray(g["w"], jnp.float32),
                          "bias": jnp.asarray(g["b"], jnp.float32)}}
        u1, s1 = ours.update(tree, s1, p1)
        u2, s2 = theirs.update(tree, s2, p2)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    want, _ = _run(AdamW(0.1, weight_decay=0.3, weight_decay_mask=MASK))
    for k, n in (("kernel", "w"), ("bias", "b")):  # (optax's float32 1 − β₂ᵗ: ~1e-5 off)
        np.testing.assert_allclose(p1["dense"][k], want[n], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(p1["dense"][k], p2["dense"][k], rtol=3e-5)


def test_dict_mask_missing_a_name_or_not_bool_is_named_and_changes_nothing():
    with pytest.raises(TypeError, match=r"weight_decay_mask\['dense/kernel'\] must be a bool"):
        AdamW(0.1, weight_decay_mask={"dense": {"kernel": 1}})
    opt = AdamW(0.1, weight_decay=0.3, weight_decay_mask={"w": True})
    before = opt.hyperparameters()
    params = {k: v.copy() for k, v in P.items()}
    with pytest.raises(KeyError, match=r"weight_decay_mask has no entry for parameter 'b'"):
        opt.init(params)
    assert opt.hyperparameters() == before and opt._backend is None
    for k in P:
        np.testing.assert_array_equal(params[k], P[k])
    tx = optax_transformation(AdamW(0.1, weight_decay_mask={"w": True}))
    jp = {k: jnp.asarray(v) for k, v in P.items()}
    with pytest.raises(KeyError, match="no entry for parameter 'b'"):  # (at its first update)
        tx.update(jp, tx.init(jp), jp)
    extra = AdamW(0.1, weight_decay_mask={**MASK, "c": True}, strict=True)
    with pytest.raises(ValueError, match=r"weight_decay_mask names unknown parameters \['c'\]"):
        _run(extra)


# -- 3. optax's mask function (of the whole params) ---------------------------------------
@pytest.mark.parametrize("fn, exc", [
    (lambda params: {k: v.ndim > 1 for k, v in params.items()}, ValueError),  # raises on a str
    (lambda params: {k: k == "w" for k in params}, TypeError),  # returns a dict
])
def test_optax_style_mask_function_is_named_at_init(fn, exc):
    opt = AdamW(0.1, weight_decay=0.3, weight_decay_mask=fn)
    with pytest.raises(exc, match=re.escape(
            "weight_decay_mask functions take one parameter name (str) and return a bool; "
            "optax's take the whole params pytree")):
        opt.init(P)
    assert opt._backend is None


# -- 4. a schedule as learning_rate -------------------------------------------------------
def test_schedule_as_learning_rate_names_the_schedulers_and_they_give_optax_numbers():
    sched = optax.exponential_decay(0.1, 1, 0.5)
    for kw in ({"learning_rate": sched}, {"lr": sched}):
        with pytest.raises(TypeError, match=r"learning_rate must be a number, got .*"
                           r"mithril\.utils\.lr_schedulers .*From optax or Keras"):
            Adam(**kw)
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['learning_rate'\].*lr_schedulers"):
        Adam(0.1, param_groups=[{"params": "w", "learning_rate": sched}])
    opt = Adam(0.1)
    with pytest.raises(TypeError, match="lr_schedulers"):
        opt.set_learning_rate(sched)
    assert opt.learning_rate == 0.1
    with pytest.raises(TypeError, match=r"weight_decay must be a number.*hyperparameter\("):
        Adam(0.1, weight_decay=sched)
    # the hint: the initial value, a scheduler stepped after each update
    sch, params, state = ExponentialDecay(opt, 1, 0.5), dict(P), opt.init(P)
    tx = optax.adam(sched, eps=1e-8)
    ref, rs = {k: jnp.asarray(v, jnp.float32) for k, v in P.items()}, None
    rs = tx.init(ref)
    for g in G:
        params, state = opt.update(params, g, state)
        sch.step()
        u, rs = tx.update({k: jnp.asarray(v, jnp.float32) for k, v in g.items()}, rs, ref)
        ref = optax.apply_updates(ref, u)
    for k in P:
        np.testing.assert_allclose(params[k], ref[k], rtol=1e-5, atol=1e-6)
