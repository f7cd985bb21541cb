"""An optax user's programs, side by side with optax (float64, under ``jax.jit`` with
donation): optax's mask *functions* of the whole params pytree in ``optax_transformation``
(``optax.adamw(mask=fn)`` ported as ``AdamW(weight_decay_mask=fn)``), ``mu_dtype`` /
``slot_dtypes`` (optax's ``mu_dtype`` / ``accumulator_dtype``: a slot kept in its own dtype
between steps), and the user's ``optax.chain(clip_by_global_norm, scale_by_adam,
add_decayed_weights(mask=), scale_by_learning_rate(schedule))`` ported both ways."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest
from conftest import jax_float64

from mithril.interop.optax_transform import optax_transformation
from mithril.utils.lr_schedulers import WSD
from mithril.utils.optimizers import ADOPT, SGD, Adam, AdamW, AdEMAMix, Lion, Muon, NAdam

STEPS = 12
BF16 = jnp.bfloat16


def params_of(dt: Any = "float64") -> dict:
    """Nested dicts, a tuple with a None leaf, a scalar: a Flax-style tree."""
    rng = np.random.default_rng(0)
    return {"enc": {"kernel": jnp.asarray(rng.standard_normal((4, 3)), dt),
                    "bias": jnp.asarray(rng.standard_normal(3), dt)},
            "head": (jnp.asarray(rng.standard_normal(3), dt), None),
            "scale": jnp.asarray(0.7, dt)}


def loss(p: Any) -> Any:
    return sum(jnp.sum(jnp.sin(2 * x) + 0.5 * x * x) for x in jax.tree.leaves(p))


def trajectory(tx: Any, params: Any, steps: int = STEPS, fix: Any = None
               ) -> tuple[list, Any]:
    """The params after each jitted, donated step (and the last state); ``fix``: applied to
    the state after each update (the reference's rounding of a slot)."""
    def step(p, s):
        u, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), (s if fix is None else fix(s))

    step = jax.jit(step, donate_argnums=(0, 1))
    p, state, out = jax.tree.map(jnp.array, params), tx.init(params), []
    for _ in range(steps):
        p, state = step(p, state)
        out.append(jax.tree.map(np.array, p))  # (a copy: the next step donates p)
    return out, state


def gap(a: list, b: list) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for pa, pb in zip(a, b)
               for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)))


def by_rank(p: Any) -> Any:
    """optax's usual mask function: decay the matrices only."""
    return jax.tree.map(lambda x: x.ndim > 1, p)


# -- optax mask functions ------------------------------------------------------------------
MASKS = {
    "ndim": by_rank,
    "prefix": lambda p: {"enc": True, "head": False, "scale": False},  # a bool per subtree
    "path": lambda p: jax.tree_util.tree_map_with_path(
        lambda path, x: "bias" not in jax.tree_util.keystr(path), p),
}


@pytest.mark.parametrize("mask", sorted(MASKS))
def test_optax_mask_function_matches_adamw_mask(mask):
    fn = MASKS[mask]
    with jax_float64():
        params = params_of()
        want, _ = trajectory(optax.adamw(0.05, weight_decay=0.5, mask=fn), params)
        got, _ = trajectory(optax_transformation(
            AdamW(0.05, weight_decay=0.5, weight_decay_mask=fn, convention="optax")), params)
        unmasked, _ = trajectory(optax.adamw(0.05, weight_decay=0.5), params)
    assert gap(want, got) < 1e-12
    assert gap(want, unmasked) > 1e-3  # (the mask matters: the check can fail)


def test_optax_mask_function_in_the_users_chain_with_a_schedule():
    """The user's chain, with ours in place of scale_by_adam + add_decayed_weights +
    scale_by_learning_rate: one AdamW with the mask function and the schedule."""
    sched = optax.warmup_cosine_decay_schedule(0.0, 0.05, 3, STEPS, 1e-3)
    with jax_float64():
        params = params_of()
        want, _ = trajectory(optax.chain(
            optax.clip_by_global_norm(1.0), optax.scale_by_adam(),
            optax.add_decayed_weights(1e-1, mask=by_rank), optax.scale_by_learning_rate(sched)),
            params)
        ours = AdamW(1.0, weight_decay=1e-1, weight_decay_mask=by_rank, convention="optax")
        got, _ = trajectory(optax.chain(optax.clip_by_global_norm(1.0),
                                        optax_transformation(ours, learning_rate=sched)), params)
        # scale_by_adam itself: ours at learning rate 1, negated (our update is -lr·step)
        part, _ = trajectory(optax.chain(
            optax.clip_by_global_norm(1.0),
            optax_transformation(Adam(1.0, convention="optax")), optax.scale(-1.0),
            optax.add_decayed_weights(1e-1, mask=by_rank), optax.scale_by_learning_rate(sched)),
            params)
    assert gap(want, got) < 1e-12
    assert gap(want, part) < 1e-12


def test_a_name_function_is_still_ours_and_a_bad_optax_mask_is_named():
    with jax_float64():
        params = params_of()
        by_name = AdamW(0.05, weight_decay=0.5, convention="optax",
                        weight_decay_mask=lambda name: name.endswith("kernel"))
        got, _ = trajectory(optax_transformation(by_name), params, 3)
        want, _ = trajectory(optax.adamw(0.05, weight_decay=0.5, mask=by_rank), params, 3)
        assert gap(want, got) < 1e-12
        tx = optax_transformation(AdamW(0.05, weight_decay_mask=lambda p: {"enc": True}))
        state = tx.init(params)
        with pytest.raises(ValueError, match="weight_decay_mask .* not the params' structure"):
            tx.update(params, state, params)
        tx = optax_transformation(AdamW(0.05, weight_decay_mask=lambda p: jax.tree.map(
            lambda x: jnp.sum(x) > 0, p)))
        with pytest.raises(TypeError, match="traced value for 'enc/bias'"):
            jax.jit(tx.update)(params, state, params)


def test_optax_mask_function_on_muon_fallback():
    """The tensorwise path (Muon with an AdamW fallback) reads it too."""
    with jax_float64():
        params = params_of()
        fn = lambda p: jax.tree.map(lambda x: x.ndim == 0, p)  # noqa: E731
        names = {"enc/kernel": False, "enc/bias": False, "head/0": False, "scale": True}
        a, _ = trajectory(optax_transformation(Muon(0.02, weight_decay=0.3, fallback=AdamW(
            0.01), weight_decay_mask=fn)), params, 4)
        b, _ = trajectory(optax_transformation(Muon(0.02, weight_decay=0.3, fallback=AdamW(
            0.01), weight_decay_mask=names)), params, 4)
        c, _ = trajectory(optax_transformation(Muon(0.02, weight_decay=0.3, fallback=AdamW(
            0.01))), params, 4)
    assert gap(a, b) == 0.0
    assert gap(a, c) > 1e-4


# -- mu_dtype / slot_dtypes ----------------------------------------------------------------
def rounded(fields: tuple[str, ...], to: Any = BF16) -> Any:
    """An optax state's ``fields`` (``mu``, ``trace``...) rounded to ``to`` and kept in the
    params' dtype: optax's own optimizer with its slot stored as ours stores it."""
    def fix(state):
        def one(path, x):
            named = any(getattr(k, "name", None) in fields for k in path)
            floating = named and jnp.issubdtype(getattr(x, "dtype", int), jnp.floating)
            return x.astype(to).astype(x.dtype) if floating else x
        return jax.tree_util.tree_map_with_path(one, state)
    return fix


MU = {  # name: (optax's optimizer, ours, optax's mu_dtype optimizer, the state's fields)
    "adam": (lambda: optax.adam(0.05), lambda: Adam(0.05, convention="optax"),
             lambda: optax.adam(0.05, mu_dtype=BF16), ("mu",)),
    "adamw": (lambda: optax.adamw(0.05, weight_decay=0.1),
              lambda: AdamW(0.05, weight_decay=0.1, convention="optax"),
              lambda: optax.adamw(0.05, weight_decay=0.1, mu_dtype=BF16), ("mu",)),
    "amsgrad": (lambda: optax.amsgrad(0.05), lambda: Adam(0.05, amsgrad=True, convention="optax"),
                lambda: optax.amsgrad(0.05, mu_dtype=BF16), ("mu",)),
    "nadam": (lambda: optax.nadam(0.05), lambda: NAdam(0.05, convention="optax"),
              lambda: optax.nadam(0.05, mu_dtype=BF16), ("mu",)),
    "lion": (lambda: optax.lion(0.01, weight_decay=0.1), lambda: Lion(0.01, weight_decay=0.1),
             lambda: optax.lion(0.01, weight_decay=0.1, mu_dtype=BF16), ("mu",)),
    "adopt": (lambda: optax.contrib.adopt(0.05), lambda: ADOPT(0.05),
              lambda: optax.contrib.adopt(0.05, mu_dtype=BF16), ("mu",)),
    "ademamix": (lambda: optax.contrib.ademamix(0.05), lambda: AdEMAMix(0.05),
                 lambda: optax.contrib.ademamix(0.05, mu_dtype=BF16), ("m1", "m2")),
}


@pytest.mark.parametrize("name", sorted(MU))
def test_mu_dtype_keeps_the_first_moment_as_optax_stores_it(name):
    """float64 params, the first moment in bfloat16: equal to optax's optimizer whose state
    is rounded as ours is stored (to 1e-12, 12 jitted donated steps), and to optax's own
    ``mu_dtype`` on the first step (its stored moment bit for bit). From the second step
    optax differs by bfloat16 rounding: it multiplies the stored moment by β in bfloat16
    (a weak-typed Python float), ours in the parameters' dtype."""
    ref, ours, peer, fields = MU[name]
    with jax_float64():
        params = params_of()
        want, _ = trajectory(ref(), params, fix=rounded(fields))
        got, state = trajectory(optax_transformation(ours(), mu_dtype=BF16), params)
        plain, plain_state = trajectory(optax_transformation(ours()), params)
        first, peer_state = trajectory(peer(), params, 1)
        one, one_state = trajectory(optax_transformation(ours(), mu_dtype=BF16), params, 1)
    assert gap(want, got) < 1e-12
    mu = [s for s in state.slots if s in ("m", "m1", "m2")]
    assert mu and all(x.dtype == BF16 for s in mu for x in jax.tree.leaves(state.slots[s]))
    assert all(x.dtype == jnp.float64 for s in state.slots if s not in mu
               for x in jax.tree.leaves(state.slots[s]))
    # (the rounding matters: the check can fail; Lion's signs are the same unrounded)
    assert name == "lion" or gap(plain, got) > 1e-5
    assert gap([state.slots["m" if "m" in mu else "m1"]],
               [plain_state.slots["m" if "m" in mu else "m1"]]) > 1e-6
    assert gap(first, one) < 1e-15
    if name == "ademamix":  # (optax's ademamix casts m1, m2 back to mu_dtype at init only)
        return
    bits = lambda xs: sorted(np.asarray(x).view(np.uint16).tobytes() for x in xs)  # noqa: E731
    theirs = [x for x in jax.tree.leaves(peer_state) if getattr(x, "dtype", None) == BF16]
    mine = [x for s in mu for x in jax.tree.leaves(one_state.slots[s])]
    assert len(theirs) == len(mine) and bits(theirs) == bits(mine)


def test_slot_dtypes_is_sgds_accumulator_dtype_and_float32_params():
    with jax_float64():
        params = params_of()
        want, _ = trajectory(optax.sgd(0.05, momentum=0.9), params, fix=rounded(("trace",)))
        got, state = trajectory(optax_transformation(SGD(0.05, momentum=0.9, convention="optax"),
                                                     slot_dtypes={"momentum": BF16}), params)
    assert gap(want, got) < 1e-12
    assert {x.dtype for x in jax.tree.leaves(state.slots["momentum"])} == {jnp.dtype(BF16)}
    # float32 params, float16 moment: optax's rounding of its float32 run, to float32's
    params = params_of("float32")
    want, _ = trajectory(optax.adam(0.05), params, fix=rounded(("mu",), jnp.float16))
    got, state = trajectory(optax_transformation(Adam(0.05, convention="optax"),
                                                 mu_dtype="float16"), params)
    assert gap(want, got) < 2e-5  # (float32 bias corrections: a float16 tie may round apart)
    assert state.slots["m"]["enc"]["kernel"].dtype == jnp.float16
    assert state.slots["v"]["enc"]["kernel"].dtype == jnp.float32


def test_a_wider_moment_than_the_params_is_computed_in_its_dtype():
    """bfloat16 params, ``mu_dtype=float32`` (optax allows a wider one): the moment is
    computed in float32 (not rounded to bfloat16 first), the params stay bfloat16."""
    params = params_of("bfloat16")
    tx = optax_transformation(Adam(0.05, convention="optax"), mu_dtype=jnp.float32)
    grads = jax.grad(loss)(params)
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    for g, m, v, u in zip(*(jax.tree.leaves(t) for t in (grads, state.slots["m"],
                                                          state.slots["v"], updates))):
        assert m.dtype == jnp.float32 and v.dtype == u.dtype == BF16
        np.testing.assert_array_equal(np.asarray(m), np.float32(1 - 0.9) *
                                      np.asarray(g, np.float32))


def test_mu_dtype_under_inject_hyperparams_masked_and_multisteps():
    with jax_float64():
        params = params_of()
        want, _ = trajectory(optax.MultiSteps(optax.masked(
            optax.inject_hyperparams(optax.adam)(learning_rate=0.05), by_rank), 2), params,
            fix=rounded(("mu",)))
        got, _ = trajectory(optax.MultiSteps(optax.masked(
            optax.inject_hyperparams(optax_transformation)(
                Adam(convention="optax"), learning_rate=0.05, mu_dtype=BF16), by_rank), 2),
            params)
    assert gap(want, got) < 1e-12


def test_mu_dtype_refusals_name_the_slot():
    with pytest.raises(ValueError, match=r"SGD: mu_dtype: no first-moment slot .* \['momentum'\]"):
        optax_transformation(SGD(0.1, momentum=0.9), mu_dtype=BF16)
    with pytest.raises(ValueError, match=r"Adam: slot_dtypes\['mu'\]: no such slot"):
        optax_transformation(Adam(), slot_dtypes={"mu": BF16})
    with pytest.raises(TypeError, match=r"slot_dtypes\['m'\]: int32 is not a floating"):
        optax_transformation(Adam(), mu_dtype=jnp.int32)
    with pytest.raises(TypeError, match=r"slot_dtypes\['m'\]: 'bfloat17' is not a dtype"):
        optax_transformation(Adam(), mu_dtype="bfloat17")
    with pytest.raises(TypeError, match="Muon: mu_dtype / slot_dtypes"):
        optax_transformation(Muon(fallback=AdamW()), mu_dtype=BF16)
    params = params_of("float32")
    plain = optax_transformation(Adam(convention="optax"))
    half = optax_transformation(Adam(convention="optax"), mu_dtype=BF16)
    state = plain.init(params)
    with pytest.raises(ValueError, match=r"slot 'm' for 'enc/bias' has dtype float32, "
                                         r"expected bfloat16"):
        half.update(params, state, params)
    with pytest.raises(ValueError, match=r"slot 'm' for 'enc/bias' has dtype bfloat16, "
                                         r"the parameter float32"):
        plain.update(params, half.init(params), params)


# -- other hyperparameters in state.hyperparams (optax.inject_hyperparams) ---------------------
def test_beta1_written_in_state_hyperparams_as_optaxs_b1():
    """``opt_state.hyperparams["b1"] = 0.5`` mid-run, as with optax.inject_hyperparams(
    optax.adam): ours through a factory naming ``beta1`` / ``beta2`` (inject_hyperparams
    sees named arguments only), float64, jitted, to 1e-12; no more compilations than optax."""
    results, compiled = [], []
    with jax_float64():
        params = params_of()
        ref = optax.inject_hyperparams(optax.adam)(learning_rate=0.05, b1=0.9, b2=0.99)
        ours = optax.inject_hyperparams(lambda learning_rate, beta1, beta2: optax_transformation(
            Adam(convention="optax"), learning_rate=learning_rate, beta1=beta1, beta2=beta2))(
            learning_rate=0.05, beta1=0.9, beta2=0.99)
        for tx, (b1, b2) in ((ref, ("b1", "b2")), (ours, ("beta1", "beta2"))):
            step = jax.jit(lambda p, s, tx=tx: tx.update(jax.grad(loss)(p), s, p))
            p, state, out = params, tx.init(params), []
            for i in range(8):
                if i == 4:
                    state.hyperparams.update({b1: 0.5, b2: 0.9, "learning_rate": 0.02})
                u, state = step(p, state)
                p = optax.apply_updates(p, u)
                out.append(jax.tree.map(np.array, p))
            results.append(out)
            compiled.append(step._cache_size())
        unchanged, _ = trajectory(optax.adam(0.05, b1=0.9, b2=0.99), params, 8)
    assert gap(*results) < 1e-12
    assert gap(results[0], unchanged) > 1e-3  # (the writes matter: the check can fail)
    assert compiled[1] <= compiled[0]


def test_hyperparameter_keywords_refused_by_name():
    with pytest.raises(KeyError, match="Adam has no hyperparameter 'beta7'"):
        optax_transformation(Adam(), beta7=0.1)
    with pytest.raises(TypeError, match=r"optax_transformation\(Adam, beta1=...\): .* got str"):
        optax_transformation(Adam(), beta1="0.9")
    with pytest.raises(ValueError, match="'beta1' is in schedules too"):
        optax_transformation(Adam(), beta1=0.9, schedules={"beta1": lambda c: 0.9})
    with pytest.raises(TypeError, match="inject_hyperparams sees only named arguments"):
        optax.inject_hyperparams(optax_transformation)(Adam(), learning_rate=0.1,
                                                       beta1=0.9).init(params_of("float32"))


# -- the user's program ported to our optimizer and scheduler (JAX backend) -----------------
def test_users_chain_ported_to_adamw_and_wsd_on_the_jax_backend():
    """``optax.chain(clip_by_global_norm(1), scale_by_adam(), add_decayed_weights(wd,
    mask), scale_by_learning_rate(warmup_cosine_decay_schedule))`` is ``AdamW(clip_norm=1,
    clip_eps=0, weight_decay_mask=..., convention="optax")`` with ``WSD`` stepped after
    each update. optax evaluates its schedules at the int32 count in float32 even under
    x64 (``warmup_cosine_decay_schedule(...)(1)`` is 0.01666666939...): the peer runs its
    schedule at a float64 count, else the two differ by ~6e-9 (its rounding)."""
    with jax_float64():
        sched = optax.warmup_cosine_decay_schedule(0.0, 0.05, 3, STEPS, 1e-3)
        exact = lambda c: sched(jnp.asarray(c, jnp.float64))  # noqa: E731
        flat = {"enc/kernel": params_of()["enc"]["kernel"], "enc/bias": params_of()["enc"]["bias"],
                "head": params_of()["head"][0]}
        mask = {k: v.ndim > 1 for k, v in flat.items()}
        want, _ = trajectory(optax.chain(
            optax.clip_by_global_norm(1.0), optax.scale_by_adam(),
            optax.add_decayed_weights(1e-1, mask=mask), optax.scale_by_learning_rate(exact)),
            flat)
        opt = AdamW(0.05, weight_decay=1e-1, weight_decay_mask=mask, clip_norm=1.0,
                    clip_eps=0.0, convention="optax")
        scheduler = WSD(opt, 3, 0, STEPS - 3, 0.0, 1e-3, "cosine")
        p, state, got = dict(flat), opt.init(flat), []
        for _ in range(STEPS):
            p, state = opt.update(p, jax.grad(loss)(p), state)
            scheduler.step()
            got.append({k: np.array(v) for k, v in p.items()})
        assert all(v.dtype == jnp.float64 for v in p.values())
    assert gap(want, got) < 1e-12


# -- waiting for files outside this review's ------------------------------------------------
def test_mu_dtype_and_keywords_through_the_public_optax_transformation():
    from mithril.interop import optax_transformation as public

    tx = public(Adam(convention="optax"), mu_dtype=BF16, beta1=0.5)
    state = tx.init(params_of("float32"))
    assert state.slots["m"]["enc"]["kernel"].dtype == BF16
    assert float(state.hyperparams["beta1"]) == 0.5


def test_optax_argument_names_are_hinted():
    for kw, ours in (({"b1": 0.8}, "beta1"), ({"b2": 0.9}, "beta2"),
                     ({"mask": by_rank}, "weight_decay_mask")):
        with pytest.raises(TypeError, match=ours):
            AdamW(**kw)


def test_optax_mask_pytree_with_a_tuple_matches_adamw_mask():
    with jax_float64():
        params = params_of()
        tree = by_rank(params)  # {"enc": {...}, "head": (False, None), "scale": False}
        want, _ = trajectory(optax.adamw(0.05, weight_decay=0.5, mask=tree), params, 3)
        got, _ = trajectory(optax_transformation(AdamW(0.05, weight_decay=0.5, convention="optax",
                                                       weight_decay_mask=tree)), params, 3)
    assert gap(want, got) < 1e-12
