"""The one-program JAX step's state (an :class:`~mithril.interop.OptaxState`) from and to
an :class:`~mithril.utils.optimizers.state.OptimizerState` (what
:meth:`~mithril.utils.training.TrainStep.from_optimizer_state` /
:meth:`~mithril.utils.training.TrainStep.to_optimizer_state` convert, checked there): the
slots, the step count, the optimizer-wide values and the counts the program keeps in its
``hyperparams`` (skipped, non-finite and, per parameter, missed steps:
:mod:`~mithril.utils.train_step_jax`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .train_step_jax import MISSED, carry_counts, read_counts, same_params


def with_missed(step: Any, opt_state: Any, missed: np.ndarray | None) -> Any:
    """``opt_state`` holding each parameter's missed steps (``missed``: in the model's
    order; None: 0) where the step leaves some parameter out or some count is not 0, so
    that each parameter's rules count its own steps (``t − missed``), as torch.optim's
    per-parameter ``step``; else as it is (the program then counts one step for all)."""
    if not step._unreached and (missed is None or not missed.any()):
        return opt_state
    if getattr(step.optimizer, "reset_state", False):  # (none counted: group_counts)
        return opt_state
    import jax.numpy as jnp

    n = len(step.compiled._eval.names)
    counts = jnp.zeros(n, jnp.int32) if missed is None else jnp.asarray(missed, jnp.int32)
    return opt_state._replace(hyperparams={**opt_state.hyperparams, MISSED: counts})


def optax_state_of(step: Any, state: Any) -> Any:
    """``state`` (an ``OptimizerState`` of ``step.optimizer`` and the model's parameters,
    checked) as the program's ``OptaxState``."""
    import jax.numpy as jnp

    template = step._transformation().init(
        {n: jnp.zeros(s, step.backend.native_dtype())
         for n, s in step.compiled.program.param_shapes.items()})
    slots = {s: {n: jnp.asarray(np.asarray(state.engine.to_numpy(v))).astype(
        template.slots[s][n].dtype) for n, v in state.slot(s).items()}
        for s in template.slots}
    tensors = {s: {n: jnp.asarray(np.asarray(state.engine.to_numpy(v))).reshape(())
                   .astype(template.tensor_slots[s][n].dtype)
                   for n, v in state.slot(s).items()} for s in template.tensor_slots}
    values = {k: jnp.asarray(float(state.values[k]), template.values[k].dtype)
              for k in template.values}
    missed = None
    if state.missed is not None and state.missed.any() and getattr(
            step.optimizer, "reset_state", False):  # (its program counts none: group_counts)
        raise ValueError(f"this state's parameters {sorted(state.missed_counts())} missed "
                         f"steps and count their own (OptimizerState.note_missed), which a "
                         f"Lookahead with reset_state does not (its inner count restarts at "
                         f"each sync, one for all); step it with optimizer.update instead")
    if state.missed is not None:  # (the layout's order to the model's)
        got = state.missed_counts()
        missed = np.array([got.get(n, 0) for n in step.compiled._eval.names], np.int64)
    out = carry_counts(step._counted(template, state.num_skipped), state)._replace(
        count=jnp.asarray(state.step, jnp.int32), slots=slots, tensor_slots=tensors,
        values=values)
    return with_missed(step, out, missed)


def optimizer_state_of(step: Any, opt_state: Any, params: Any) -> Any:
    """The program's ``opt_state`` as ``step.optimizer.init(params)`` would hold it after as
    many updates; a ``ValueError`` naming the slots of a state of another optimizer."""
    out = step.optimizer.init(params)
    held = {*opt_state.slots, *opt_state.tensor_slots}
    if held != set(out.slots):
        raise ValueError(f"opt_state holds the slots {sorted(held)}, this "
                         f"{type(step.optimizer).__name__}'s are {sorted(out.slots)}: a "
                         f"state of another optimizer?")
    held_per = {s: opt_state.slots[s] if s in opt_state.slots else opt_state.tensor_slots[s]
                for s in out.slots}
    for s, per in held_per.items():  # every slot checked before any is written
        lay = out.slot_layout(s)
        same_params(f"opt_state's slot '{s}'", {n: np.shape(v) for n, v in per.items()},
                    dict(zip(lay.names, lay.shapes)))
    eng = out.engine
    for s, flat in out.slots.items():
        host = {n: np.asarray(v) for n, v in held_per[s].items()}
        data = out.slot_layout(s).flatten_numpy(host).astype(out.layout.dtype)
        if eng.backend.name == "jax" and not isinstance(flat, np.ndarray):
            out.slots[s] = eng.from_numpy(data)
        else:
            eng.np_view(flat)[...] = data
    read_counts(opt_state, out)  # (the step; with nonfinite="skip", the skips)
    missed = opt_state.hyperparams.get(MISSED)
    if missed is not None:
        out.set_missed({n: int(m) for n, m in zip(step.compiled._eval.names,
                                                   np.asarray(missed).tolist()) if m})
    out.values.update({k: float(v) for k, v in opt_state.values.items()})
    return out


def counts_own_steps(optimizer: Any) -> bool:
    """Whether the program can leave out the parameters a step does not reach, each
    counting its own steps: every optimizer its transformation takes. An elementwise or
    two-pass one gives each parameter its own row of scalars (``update(missed=)`` of
    :func:`~mithril.interop.optax_transformation`), a tensorwise one (Muon, Adafactor) each
    tensor (:mod:`.train_step_own_counts`), the weight averages and a group's
    ``step_offset`` reading the optimizer's count beside them; a Lookahead's sync counts the
    group's steps and its inner rules each parameter's, except with ``reset_state``, whose
    inner count restarts at each sync, one for all (no missed step counted:
    :func:`~.train_step_jax.group_counts`)."""
    from ..interop.optax_outer import outer_base
    from ..interop.optax_special import classify

    try:
        classify(outer_base(optimizer))
    except TypeError:  # (refused as a transformation: the step says why when it is made)
        return False
    return True
