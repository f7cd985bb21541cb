"""The parameters a training step's loss does not reach, left out of its update as
``torch.optim`` leaves out a parameter whose ``.grad`` is None.

``compiled.evaluate(..., output_gradients={loss: 1.0})`` gives every parameter a gradient,
zeros for those the loss does not depend on (the other head of a two-head model, a
parameter no path leads from to the loss). Torch's ``backward`` leaves their ``.grad`` None
(``zero_grad(set_to_none=True)``, its default), so ``torch.optim`` skips them: no weight
decay, no momentum, and their own ``state[p]["step"]`` does not advance. A
:class:`~mithril.utils.training.TrainStep` does the same: the gradients it passes to
``update`` leave them out (their params and slots stay as they were), and the state counts
the step as missed for them (:meth:`OptimizerState.note_missed
<mithril.utils.optimizers.OptimizerState.note_missed>`, as ``torch_optimizer`` does), so
their bias corrections count their own steps. With an
:class:`~mithril.utils.accumulation.Accumulate` (torch's loop that steps every ``k``
backward passes: a parameter no pass of the window reached keeps ``.grad`` None) the
gradients of every micro-batch leave them out, and the wrapped optimizer's state counts the
missed step at each window's step. SAM (its ``update`` takes ``closure=``) gets them left
out as well: it neither perturbs nor steps them (torch's SAM recipe with ``.grad`` None);
LBFGS gets every gradient, zeros for them (torch.optim.LBFGS reads a ``.grad`` None as
zeros). Which they are is a property of the model and
the loss (:meth:`~mithril.compiler.compiled_model.CompiledModel.reached_parameters`), known
when the step is made: where the loss reaches every parameter (the usual case) nothing of
this runs. The one-program JAX step does the same inside its program
(:func:`mithril.utils.train_step_jax.update_reached`; its state counts the missed steps in
``hyperparams["missed"]``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any


def unreached_params(compiled: Any, loss: str, optimizer: Any) -> frozenset[str]:
    """The parameters of ``compiled`` that its output ``loss`` does not depend on; none for
    an ``optimizer`` that is neither a mithril optimizer nor an ``Accumulate`` (another
    wrapper's ``update`` may need every gradient), nor for LBFGS (one direction over every
    parameter, no per-parameter state: torch.optim.LBFGS reads a ``.grad`` None as zeros,
    the gradients ``evaluate`` gives them)."""
    from .accumulation import Accumulate
    from .optimizers.base import Optimizer
    from .optimizers.lbfgs import LBFGS

    if not isinstance(optimizer, (Optimizer, Accumulate)) or isinstance(optimizer, LBFGS):
        return frozenset()
    reached = set(compiled.reached_parameters(loss))
    return frozenset(n for n in compiled.program.param_shapes if n not in reached)


def update_reached(optimizer: Any, unreached: frozenset[str], params: Mapping[str, Any],
                   gradients: Mapping[str, Any], opt_state: Any, **kw: Any
                   ) -> tuple[Any, Any]:
    """``optimizer.update`` (``kw``: its ``loss=``, ``closure=``) with the gradients of
    ``unreached`` left out, then their missed
    step counted in the state (not for a skipped step, nor for a Lookahead with
    ``reset_state``: see :func:`mithril.distributed.missed_steps.note_missed`); for an
    ``Accumulate``, in its wrapped optimizer's state when the window's step was taken."""
    params, opt_state = optimizer.update(
        params, {k: g for k, g in gradients.items() if k not in unreached}, opt_state, **kw)
    opt, state = optimizer, opt_state
    if isinstance(optimizer, _accumulate()):  # (its wrapped optimizer steps once a window)
        if not opt_state.applied:
            return params, opt_state
        opt, state = optimizer.optimizer, opt_state.inner
    # (over the few unreached, not every parameter: the same names in the same order at
    # every step, which note_missed recognises)
    _note_missed()(opt, state, [n for n in unreached if n in params])
    return params, opt_state


@functools.cache
def _accumulate() -> type:
    from .accumulation import Accumulate  # (imported once it is needed: a cycle otherwise)

    return Accumulate


@functools.cache
def _note_missed() -> Any:
    from ..distributed.missed_steps import note_missed  # (only where some are unreached)

    return note_missed
