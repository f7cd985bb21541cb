"""A mithril optimizer as a real ``torch.optim.Optimizer``.

:func:`torch_optimizer` wraps any mithril optimizer (:mod:`mithril.utils.optimizers`) for a
plain torch training loop: ``zero_grad`` / ``backward`` / ``step``, learning-rate schedulers,
``torch.amp.GradScaler``, ``clip_grad_norm_`` and ``state_dict`` checkpoints all work as with
a ``torch.optim`` optimizer, while the update itself is mithril's (one fused kernel over all
parameters on CPU)::

    import torch
    from mithril.interop import torch_optimizer
    from mithril.utils.optimizers import Adam

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch_optimizer(Adam(learning_rate=1e-2), model.named_parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    checkpoint = opt.state_dict()  # torch.save-able (also with weights_only=True loads)

How it works:

* **Parameter groups as torch's.** ``params`` may be torch's list of dicts
  (``[{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]``): each group holds
  its parameters, ``lr`` and the optimizer's other hyperparameters under torch's names where
  torch has one (``betas`` for ``beta1, beta2[, beta3]``, a lone ``beta1`` keeping its name;
  ``eps`` for ``epsilon``, ``alpha`` for RMSProp's ``decay``; the rest, e.g. ``momentum``,
  ``weight_decay``, ``amsgrad``, ``clip_norm``, under their own; a ``Lookahead``'s group
  holds its inner optimizer's beside its own ``sync_period`` / ``slow_step_size``), a
  group's missing values being the optimizer's. Every :meth:`step` reads the groups: a
  changed ``lr`` is set as the group's rate (a scheduler or a user may change it at will,
  nothing recompiles; a Mithril scheduler of ``opt.mithril_optimizer`` drives the groups'
  rates too, each shown as its ``lr`` as soon as it is set, unless the ``lr`` was written
  since, and saved and resumed: :mod:`.torch_optim_rates`), and any other changed value is
  applied after the constructor's checks (so ``OneCycleLR``'s momentum cycling of ``betas``/``momentum`` works too). A
  change that would need other state slots (e.g. SGD momentum from 0 to 0.9 after the first
  step) is refused with a ``ValueError``. With several groups (:mod:`.torch_optim_groups`)
  each is one of the mithril optimizer's ``param_groups`` holding all its values, and the
  optimizer's own rate is fixed at 1.0 (each group's ``lr_scale`` is then its ``lr``);
  values that hold for the whole step or change the state slots must agree between groups,
  and LBFGS, Prodigy, the schedule-free optimizers and Muon take one group (give them
  ``param_groups`` of their own instead).
* **Groups added later** (``opt.add_param_group({"params": backbone.parameters(), "lr":
  1e-5})``, progressive unfreezing) as torch's: ``params`` a tensor, a list or a generator
  (of ``(name, tensor)`` pairs where the groups are named), missing values from ``defaults``
  (the constructor's), a parameter already in a group refused with torch's text. It is
  checked as the constructor's groups are (the same code) before anything changes, and
  rebuilds the optimizer state with one more group: the other parameters keep theirs bit for
  bit, the new ones start fresh (torch's initial state: zeros, ASGD's ``eta`` = its ``lr``,
  Adagrad's sums from ``defaults``' ``initial_accumulator_value``), the next step copies the
  parameters into the new buffer (for a moment the state is held twice). The new parameters
  count their own steps from the add, as torch's (their group's ``step_offset``: the rules
  that read the count, bias corrections, Adagrad's ``lr_decay``, ASGD, SGD's first step,
  give torch's numbers), and ``state_dict()`` shows each parameter's own ``step``. A
  ``Lookahead``'s new group (its inner optimizer's) counts its own steps too, its sync
  included: every ``sync_period``-th step since the add, its slow weights starting as its
  parameters at the add (timm's Lookahead, which counts each group's steps).
  Groups that are all empty (``[{"params": []}]``) are taken, as torch's. A scheduler
  made before the add does as torch's: ``StepLR`` moves the new group too, one holding a
  value per group (``LambdaLR``) or reading ``initial_lr`` (``OneCycleLR``) raises at its
  next step; make schedulers after the last add. A group's ``params`` changed by hand, or a
  dict appended to ``param_groups``, is refused at the next step (torch's steps whatever
  the lists hold; ours holds its parameters in one buffer): use ``add_param_group``.
* **No copy per step.** The first :meth:`step` creates the optimizer state and runs the
  update; the optimizer then holds every parameter in one flat buffer, and each
  ``nn.Parameter`` is pointed at its slice of it (``param.data = view``: the Parameter
  object, its ``.grad`` and every reference to it are unchanged). Later steps write the
  buffer in place, reading the ``.grad`` tensors where they lie. Writing a parameter in
  place (``model.load_state_dict``, ``p.mul_``) writes the buffer and is seen; replacing
  ``p.data`` is detected (address, shape and strides, per step) and the new tensor is copied in.
  ``torch.save`` of one parameter alone saves the whole buffer (torch saves storages), and
  ``safetensors.torch.save_model`` refuses the shared storage (``save_file(model.state_dict())``
  writes each tensor alone).
  Each step counts in the updated parameters' autograd version counters, as torch's
  in-place updates do: a backward through a graph built before the step fails loudly.
* Parameters whose ``.grad`` is ``None`` are skipped (left untouched, with their state:
  no weight decay either); a step with no gradient at all does nothing. **Each parameter
  counts its own steps**, as torch.optim's per-parameter ``state[p]["step"]``: a step at
  which its ``.grad`` is None (``zero_grad(set_to_none=True)`` and a branch the forward did
  not use, a frozen layer, its first steps or now and then) is not counted for it, so its
  bias corrections (Adam, AdamW, NAdam, RAdam, Adamax, Muon's fallback), Adagrad's
  ``lr_decay``, ASGD's η/μ and SGD's undampened first buffer give torch's numbers. The
  wrapper notes those steps in the state (:meth:`~mithril.utils.optimizers.OptimizerState.
  note_missed`); a parameter with its own count gets its own row of per-step scalars (the
  same values, its count: :mod:`mithril.utils.optimizers.groups`), still one fused pass,
  and nothing more is done per step while every parameter has a gradient. ``state_dict()``
  shows each count as the parameter's ``step``, and a load takes them back (also from a
  ``torch.optim`` optimizer that loaded ours and stepped on, or a DCP-flattened one). A
  ``Lookahead``'s inner optimizer counts each parameter's own steps as well, while its sync
  counts the group's (timm's: a parameter syncs on its group's sync steps that it has a
  gradient at; one that never had one keeps slow weights equal to its fast ones); with
  ``reset_state`` it keeps one count for all (its inner's count restarts at each sync). A sparse ``.grad`` (``nn.Embedding(sparse=True)``) is densified: SGD and
  AdaGrad then give ``torch.optim.SGD``'s / ``Adagrad``'s sparse numbers, other optimizers
  their dense update (torch's refuse sparse gradients).
* On CPU float32/float64 the update is the fused numba kernel; elsewhere (GPU, float16,
  bfloat16) the engines' flat-tensor path. Muon and Adafactor (per-tensor matrix updates,
  :class:`~mithril.utils.optimizers.tensorwise.TensorwiseOptimizer`) run torch's own
  operations tensor by tensor, on any device, into the same flat buffer, bit for bit as
  torch; Adafactor on CPU runs its fused kernel instead unless built with ``fused=False``
  (equal to torch to rounding: it sums its statistics in float64). **Complex parameters**
  are optimized as ``torch.view_as_real`` of them, as torch's optimizers do (their slots
  complex as torch's; Muon and Adafactor refuse them, as torch's:
  :mod:`.torch_optim_complex`). Parameters must share one (real) dtype and device, and no two may overlap in memory (``b.data = a.data`` is refused:
  torch.optim keeps such a tie, one buffer cannot).
* **LBFGS** (any optimizer whose ``update`` takes ``closure=``) needs ``step(closure)``
  with torch's usual closure (clear the gradients, compute the loss, ``backward()``,
  return the loss), as ``torch.optim.LBFGS``; it calls it as often as its iterations and
  line search need. At its default ``fused=None`` it runs torch's own operations here (the
  numbers of ``torch.optim.LBFGS`` to the last bit; ``fused=True`` is ~0.9x faster). Each evaluation point is copied into the parameters (their storage is
  kept) before the closure runs, their ``.grad`` are read (zeros where None), and the
  parameters end at the step's result; ``step`` returns the closure's first loss. If
  anything fails (the closure raises, returns a non-finite loss or gradient, or no loss)
  the parameters are written back and the optimizer state is unchanged; an exception of
  the closure's own propagates with a note saying so. Its ``state_dict()`` is
  ``torch.optim.LBFGS``'s own layout (:mod:`.torch_optim_lbfgs`): one entry, under the
  first parameter's id, of flat tensors over the parameters in order (``d``,
  ``prev_flat_grad``, the history oldest first as lists ``old_dirs`` (the gradient
  changes y), ``old_stps`` (the steps s) and ``ro`` = 1/(y·s)) and ``H_diag``, ``t``,
  ``prev_loss``, ``func_evals``, ``n_iter``; ``torch.optim.LBFGS`` loads it and goes on
  as this run would, and torch's own loads here and goes on as torch's (torch keeps no
  step count or returned loss: taken from the ``"mithril"`` entry while it matches the
  state, else the fewest steps and ``prev_loss``). ``convention="optax"`` keeps its
  per-parameter layout and refuses torch's, by name.
* ``state_dict()`` is torch-shaped (:mod:`.torch_optim_checkpoints`): ``{"state": {i:
  {"step": tensor, <slot>: tensor}}, "param_groups": [group], "mithril": {...}}`` with torch's slot names where torch has the
  optimizer (``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``, ...), each of its slot shape
  (0-d for one value per tensor, e.g. ASGD's ``eta``/``mu`` as torch, Novograd's ``nu``;
  Adafactor's factors ``row_var``/``col_var``), leaving out what a parameter does not use
  (entries with no elements; an optax-convention LBFGS's history not yet made); the ``"mithril"`` entry holds the
  optimizer's name, hyperparameters, exact counters and, under ``"values"``, its
  optimizer-wide values (Prodigy's ``d``, the schedule-free ``weight_sum``, LBFGS's
  ``n_iter``, ...; :mod:`.torch_optim_state` has the details), also kept in the group
  (``torch.distributed.checkpoint`` keeps only ``state`` and ``param_groups``: its
  ``get/set_optimizer_state_dict`` and ``dcp.save``/``load`` resume exactly; with
  ``flatten_optimizer_state_dict=True``, which drops the entry, the groups and each
  parameter's ``step`` rebuild it, except optimizer-wide values). ``load_state_dict``
  checks everything first and changes nothing on error; a saved and reloaded run continues
  bit-exactly (one exception, from mithril's ASGD: a run saved right after an lr change
  uses the new lr one step early, where an unbroken run uses the old one once more). A
  ``torch.optim`` optimizer's own state dict (of the same kind and groups; one of another
  kind is refused, named by its slots or, before its first step, its groups' settings) is
  taken: its
  groups' values, each parameter's ``step`` as its count (the most any took is the
  optimizer's), its slots; a parameter it keeps no entry for (no gradient yet) starts
  fresh, as one whose ``step`` is 0 always does. Such a parameter's entry in ours holds
  what torch's first step reads (ASGD's ``eta`` = ``lr``, ``mu`` = 1; Rprop's
  ``step_size`` = ``lr``; no SGD ``momentum_buffer``), so a ``torch.optim`` optimizer
  loads ours either way; ``opt.state[p]`` shows mithril's own initial values. One that
  loaded ours keeps the entry in its first group and is taken too (each parameter's
  ``step`` its own count: the most steps any took since the entry's are the optimizer's).
* Hyperparameters changed mid-run follow torch (NAdam multiplies each step's β₁ into its
  per-parameter ``mu_product``, as torch). torch's ``maximize`` and
  ``decoupled_weight_decay`` (in a group by hand or from a torch state dict) are refused
  at the step unless they say what the optimizer does (``maximize=False``; AdamW's
  ``decoupled_weight_decay=True``, Adam's ``False``) rather than ignored; changes that
  would need other state slots (SGD momentum 0 -> 0.9, ``amsgrad``, ``centered``, or a
  ``nesterov`` toggle that breaks its own rule) are refused with a ``ValueError`` where
  torch.optim raises a ``KeyError`` or runs on.
* ``torch.amp.GradScaler`` needs nothing special: it unscales the ``.grad`` tensors of the
  group's parameters in place, checks them for inf/NaN and calls :meth:`step` only when
  they are finite (``_step_supports_amp_scaling`` is deliberately not set).

The base class :class:`~mithril.utils.optimizers.Optimizer` itself (no update rule) is
refused with a ``TypeError``; every optimizer of :mod:`mithril.utils.optimizers` works.

Also: ``opt.state[p]`` gives, per parameter, ``step`` and the slots as live views
(torch's names; write them in place, ``step`` too: its own count from the next step; setting, removing or clearing entries, torch's ways to
reset a state, raises, see :mod:`.torch_optim_state_view`); ``opt.mithril_optimizer`` /
``opt.mithril_state`` are the wrapped optimizer and its
:class:`~mithril.utils.optimizers.OptimizerState` (``None`` before the first step, except
AdaGrad's, made with the wrapper as ``torch.optim.Adagrad``'s; its
``values`` hold the optimizer-wide values).
"""

from __future__ import annotations

import copy
import inspect
import operator
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from ..utils.optimizers import AdaGrad, Optimizer
from .torch_optim_checkpoints import TorchCheckpoints
from .torch_optim_closure import closure_step
from .torch_optim_complex import aliased, check_complex, point, real, reals
from .torch_optim_groups import (  # noqa: F401 - group_keys: public here
    check_torch_flags,
    group_keys,
    hyperparameters_for,
    joined_at,
    named,
    torch_groups,
)
from .torch_optim_params import (
    added_parameters,
    check_no_overlap,
    count_in_place,
    dense,
    lies_at,
    lies_at_real,
    parameters,
    split,
)
from .torch_optim_state import (  # noqa: F401 - TORCH_SLOTS, slot_names_for_torch: public here
    TORCH_SLOTS,
    slot_names_for_torch,
    torch_initial,
    with_added,
)
from .torch_optim_state_view import StepCounts, live_state
from .torch_optim_sync import TorchGroupSync

__all__ = ["TorchOptimizer", "torch_optimizer"]


class TorchOptimizer(TorchGroupSync, TorchCheckpoints, torch.optim.Optimizer):
    """A mithril optimizer as a ``torch.optim.Optimizer`` (see the module docs); build it
    with :func:`torch_optimizer`."""

    def __init__(self, optimizer: Optimizer, params: Any) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a mithril optimizer (mithril.utils.optimizers), "
                            f"got {type(optimizer).__name__}")
        cls = type(optimizer)
        if (cls.update is Optimizer.update and cls.kernel_math is Optimizer.kernel_math
                and cls.math is Optimizer.math):
            raise TypeError(f"{cls.__name__} states no update rule (no math or kernel_math, "
                            f"and no update of its own): it cannot be wrapped; give a "
                            f"concrete optimizer, e.g. Adam")
        if getattr(optimizer, "takes_per_example_gradients", False):
            raise TypeError(f"{cls.__name__} takes per-example gradients (a leading batch "
                            f"axis), not the .grad torch's backward leaves: see "
                            f"mithril.utils.per_example.per_example_gradients and "
                            f"docs/privacy.md")
        items, extras, counts = split(params)
        names, tensors, by_name = parameters(items, allow_empty=extras is not None)
        check_complex(optimizer, names, tensors)
        self._complex = any(p.is_complex() for p in tensors)  # (torch_optim_complex)
        self._alias = aliased(tensors)
        self._counts: StepCounts | None = None  # opt.state[p]["step"], made at a first read
        self._mithril = optimizer
        self._names = names
        self._keys = group_keys(optimizer)
        self._closure_driven = "closure" in inspect.signature(optimizer.update).parameters
        self._opt_state: Any = None  # OptimizerState, created by the first step or a load
        self._views: dict[str, torch.Tensor] | None = None  # what the last update returned
        defaults = {key: self._value_of(ours) for key, ours in self._keys}
        given = list(zip(names, tensors)) if by_name else tensors
        hp, where = None, ""
        self._group_names = [names]
        if extras is not None:  # torch's list of dicts: their values set on the optimizer
            # (the path of add_param_group's too)
            given, values, self._group_names, where = torch_groups(
                extras, counts, names, given, self._keys, defaults)
            # (why: a group's maximize=True was taken here and refused at every step)
            check_torch_flags(optimizer, values, self._keys)
            hp = hyperparameters_for(optimizer, self._keys, values, self._group_names, where,
                                     self._closure_driven, grouped=False)
        self._grouped = len(self._group_names) > 1
        self._constructing = True
        try:
            super().__init__(given, defaults)
        finally:
            self._constructing = False
        if hp is not None:  # (checked as a load is: a refused value changes nothing)
            try:
                optimizer.load_state_dict({"optimizer": type(optimizer).__name__,
                                           "hyperparameters": hp})
            except (TypeError, ValueError, KeyError) as e:  # (named as a change is)
                raise named(e, where) from e
        self._params: list[torch.Tensor] = [p for g in self.param_groups for p in g["params"]]
        self._synced = [{key: copy.deepcopy(g[key]) for key, _ in self._keys}
                        for g in self.param_groups]
        self._note_rates()
        if isinstance(optimizer, AdaGrad) and self._params:
            # as torch.optim.Adagrad's, made now: torch.distributed.checkpoint's
            # get_optimizer_state_dict ran a step at lr 0 on an empty state (one lr_decay
            # step, and weight decay into the sums, that torch's Adagrad never takes)
            with torch.no_grad(), torch.inference_mode(False):
                self._opt_state, self._views = self._start()

    # -- what users see ------------------------------------------------------------------
    @property
    def mithril_optimizer(self) -> Optimizer:
        """The wrapped mithril optimizer."""
        return self._mithril

    @property
    def mithril_state(self) -> Any:
        """Its :class:`~mithril.utils.optimizers.OptimizerState` (None before the first step,
        except AdaGrad's: made with the wrapper, as torch's)."""
        return self._opt_state

    @property  # type: ignore[override]
    def state(self) -> defaultdict:
        """Per parameter: ``step`` (a tensor) and views of the state slots under torch's
        names (built on each access; on CPU and GPU the slot tensors are live views of the
        optimizer's buffers, so writing them changes the state)."""
        st = self.__dict__.get("_opt_state")
        if self._counts is None:
            self._counts = StepCounts()
        self._counts.take(self._mithril, st, self._names)
        steps = self._counts.refresh(self._mithril, st, self._names)
        return live_state(self._mithril, st, self._names, self._params, steps)

    @state.setter
    def state(self, value: Any) -> None:
        # torch.optim.Optimizer.__init__ assigns an empty one; after it, torch's way to reset
        # (opt.state = defaultdict(dict)) was silently ignored
        if value or not self.__dict__.get("_constructing"):
            raise AttributeError("the state of a mithril torch_optimizer is set by "
                                 "load_state_dict; to start afresh, make a new one")

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("a mithril torch_optimizer cannot be pickled or deep-copied; save "
                        "state_dict() and load it into a new one")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``: a group of new parameters (``params``: a tensor, a
        list or a generator of them, or of ``(name, tensor)`` pairs where the groups have
        ``param_names``) whose missing values are ``defaults``' (the constructor's).
        Everything is checked before anything changes; the other parameters keep their
        state bit for bit, the new ones start with a fresh one (see the module docs)."""
        if self.__dict__.get("_constructing"):
            super().add_param_group(param_group)
            return
        if not isinstance(param_group, dict):  # (torch's too: the dict itself is the group)
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        self._take_counts()
        k = len(self.param_groups)
        items, extras, counts = split([param_group], start=k)
        assert extras is not None  # (a list of one dict)
        by_name = "param_names" in self.param_groups[0]
        new_names, new_tensors = added_parameters(items, k, len(self._names), by_name,
                                                  list(zip(self._names, self._params)))
        names, _, _ = parameters([*zip(self._names, self._params), *zip(new_names, new_tensors)])
        check_complex(self._mithril, new_names, new_tensors)
        given = list(zip(new_names, new_tensors)) if by_name else new_tensors
        dicts, values, added, where = torch_groups(extras, counts, new_names, given,
                                                   self._keys, self.defaults, k)
        # (why: a group added with maximize=True was taken, and every later step refused)
        check_torch_flags(self._mithril, values, self._keys, k)
        group_names = [*self._group_names, *added]
        hp = hyperparameters_for(self._mithril, self._keys, [*self.param_groups, values[0]],
                                 group_names, where, self._closure_driven, self._grouped)
        joined_at(self._mithril, hp, new_names, self._opt_state, k)
        trial = copy.copy(self._mithril)
        try:  # checked as a construction's values are, on a copy
            trial.load_state_dict({"optimizer": type(trial).__name__, "hyperparameters": hp})
        except (TypeError, ValueError, KeyError) as e:
            raise named(e, where) from e
        params = [*self._params, *new_tensors]
        try:
            with torch.inference_mode(False):  # (buffers of normal tensors: see step)
                state = with_added(trial, self._opt_state, names, reals(params), new_names,
                                   torch_initial(trial, values[0]["lr"], self.defaults))
        except ValueError as e:
            raise ValueError(f"{where}: {e}; set this in the constructor instead") from e
        # nothing fails from here on
        self._quiet = True  # (param_groups shows no rate until the groups are set: _note_rates)
        self._mithril.load_state_dict({"optimizer": type(trial).__name__, "hyperparameters": hp})
        param_group.update(dicts[0])  # (torch's: the dict given, its defaults set, is the group)
        super().add_param_group(param_group)
        self._names, self._params, self._group_names = names, params, group_names
        self._grouped = len(group_names) > 1
        self._complex = any(p.is_complex() for p in params)
        self._alias = aliased(params)
        self._synced = [{key: copy.deepcopy(g[key]) for key, _ in self._keys}
                        for g in self.param_groups]
        if state is not None:
            self._opt_state = state
            self._views = None  # the next step copies the parameters into the new buffer
        self._note_rates()
        self._count_on()

    # -- the step -----------------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One update from the parameters' ``.grad`` (those with none are skipped). With
        ``closure``, it is called first under ``torch.enable_grad()`` and its loss returned.
        An optimizer that evaluates the loss itself (LBFGS) needs ``closure`` and calls it
        as often as it needs (see the module docs); one that steps with the loss (PolyakSGD,
        Momo: ``needs_loss``) needs it once, for that loss."""
        if self._closure_driven:
            return self._closure_step(closure)
        needs_loss = getattr(self._mithril, "needs_loss", False)
        if needs_loss and closure is None:  # (before anything runs: nothing changes)
            raise TypeError(f"{type(self._mithril).__name__} steps with the loss: call "
                            f"step(closure), the closure returning the loss at the current "
                            f"parameters (after its backward, as torch's step(closure))")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        at = {"loss": loss.detach() if isinstance(loss, torch.Tensor) else loss} \
            if needs_loss else {}
        self._take_counts()  # (first: a refused one changes nothing)
        self._sync_all()
        names, params = self._names, self._params
        grads = {n: dense(p.grad) for n, p in zip(names, params) if p.grad is not None}
        if not grads:
            return loss
        if self._complex:  # (each complex one as its real view: torch_optim_complex)
            grads = {n: real(g) for n, g in grads.items()}
        # (inference_mode(False): inference tensors as parameters got no gradient)
        with torch.no_grad(), torch.inference_mode(False):
            state, current = (self._start() if self._opt_state is None
                              else (self._opt_state, self._current()))
            new, state = self._mithril.update(current, grads, state, **at)
            self._opt_state = state
            self._adopt(current, new)
            if not state.last_step_skipped:
                count_in_place([p for p in params if p.grad is not None])
                # each parameter counts its own steps (OptimizerState.note_missed), as
                # torch's; but a Lookahead with reset_state: its inner's count restarts at
                # each sync, one count since then for all (read now: a group may change it)
                if len(grads) < len(names) and not getattr(self._mithril, "reset_state",
                                                            False):  # (a C-speed test first)
                    state.note_missed([n for n, p in zip(names, params) if p.grad is None])
        self._count_on()
        return loss

    def _start(self) -> tuple[Any, dict[str, torch.Tensor]]:
        """A new optimizer state from the parameters (the first step's, or AdaGrad's at
        construction) and the arrays to pass to ``update``."""
        names, params = self._names, self._params
        check_no_overlap(names, params)
        current = {n: real(p) for n, p in zip(names, params)}
        state = self._mithril.init(current)
        adopt = getattr(state.engine, "adopt_storage", None)
        if adopt is not None and state.engine.kind == "torch":
            # each parameter moves into the flat buffer before the next is copied:
            # the parameters are never held twice (the first step's peak memory)
            owner = dict(zip(names, params))
            alias = self._alias
            current = adopt(state, current, lambda n, v: point(owner[n], v, alias))
        return state, current

    def _closure_step(self, closure: Callable[[], Any] | None) -> Any:
        """``step(closure)`` of an optimizer that evaluates the loss itself (LBFGS):
        :func:`.torch_optim_closure.closure_step`."""
        return closure_step(self, closure)

    def _current(self) -> dict[str, torch.Tensor]:
        """The arrays to pass to ``update``: the ones it returned last time wherever the
        parameter still lies there (then nothing is copied), else the parameter's tensor."""
        views = self._views
        if views is None:
            check_no_overlap(self._names, self._params)
            return {n: real(p) for n, p in zip(self._names, self._params)}
        out = {}
        replaced = False
        at = lies_at_real if self._complex else lies_at
        for (n, v), p in zip(views.items(), self._params):
            if at(p, v):
                out[n] = v
                continue
            if not self._alias and p.is_complex():  # (its own memory: copied in, as it is)
                out[n] = real(p)
                continue
            if not replaced:  # (once: a parameter replaced from outside may now share memory)
                check_no_overlap(self._names, self._params)
                replaced = True
            if p.untyped_storage().data_ptr() == v.untyped_storage().data_ptr():
                # why: p.data = p.data.t() (a square matrix) kept address and shape, so it
                # counted as unchanged and the update ran on the untransposed buffer with
                # the transposed parameter's gradient; a view of the buffer itself is
                # copied out first (copying it in place would overlap)
                out[n] = real(p).clone()
            else:
                out[n] = real(p)
        return out

    def _adopt(self, current: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> None:
        """Point every parameter at the array ``update`` returned for it (its slice of the
        optimizer's flat buffer) unless it already lies there."""
        views = self._views
        same = (views is not None and all(map(operator.is_, views.values(), new.values()))
                and all(map(operator.is_, current.values(), new.values())))
        if not same:  # a first step, a reloaded state, or a parameter replaced from outside
            at = lies_at_real if self._complex else lies_at
            for p, v in zip(self._params, new.values()):
                if not at(p, v):
                    point(p, v, self._alias)
        self._views = new


def torch_optimizer(optimizer: Optimizer, params: Any) -> TorchOptimizer:
    """``optimizer`` (a mithril optimizer, e.g. ``Adam(learning_rate=1e-3)``) as a
    ``torch.optim.Optimizer`` over ``params``: an iterable of parameters
    (``model.parameters()``), of ``(name, parameter)`` pairs (``model.named_parameters()``;
    a plain iterable gets the names ``param0, param1, ...``), or torch's list of
    parameter-group dicts. See the module docs."""
    return TorchOptimizer(optimizer, params)
