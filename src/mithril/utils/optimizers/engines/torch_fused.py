"""torch's own fused optimizer kernels on views of our flat buffers: torch on CUDA.

``torch._fused_adam_``, ``torch._fused_adamw_`` and ``torch._fused_sgd_`` are what
``torch.optim.Adam / AdamW / SGD(fused=True)`` run: one multi-tensor launch that reads and
writes each byte once. They take lists of tensors, so they are given the per-tensor views of
the flat parameter and slot buffers and the gradients where they lie (no concatenation):
the same kernel, the same traffic as torch's fused step, without torch.optim's per-step
Python (grouping tensors by device and dtype, the per-parameter step counters).

What the engine adds depends on the ``nonfinite`` policy:

* ``"propagate"`` (the default): the global gradient norm (``torch._foreach_norm``, summed in
  float64) and, after the kernel, one read of each flat buffer (``torch.aminmax``, which
  NaN and ±inf reach) to find a non-finite param or slot value, read back with the norm in
  one copy: ~16 B/param more than the kernel's 28 (fp32 Adam). The host does not wait for
  it: the copy goes to pinned memory, read when the next update is queued or the state's
  norm or counters are read (:class:`~..state.DeviceReport`);
* ``"unchecked"`` (torch.optim's contract): nothing measured, probed or read back, so the
  host never waits for the device; the norm is measured only for ``clip_norm``
  (``state.last_grad_norm`` is then that 0-d float64 tensor on the device, else None).

``clip_norm`` gives the kernels copies of the gradients scaled by ``min(1, clip_norm /
(‖g‖ + clip_eps))`` (torch ``clip_grad_norm_``; the kernels' own ``grad_scale`` would write the
unscaled gradients back into the caller's). Everything these kernels do not compute goes
through :class:`~.array_engine.ArrayEngine`, on the same buffers: ``"skip"`` and
``"raise"`` (computed before anything is written), other optimizers and conventions, value
and per-tensor clipping, weight averaging, parameters without a gradient.
"""

from __future__ import annotations

import math
from typing import Any

from ..adam import _adam, _amsgrad
from ..sgd import _momentum, _nesterov, _plain
from ..state import DeviceReport
from .array_engine import ArrayEngine
from .common import norm_scale

_ADAM = {_adam: False, _amsgrad: True}  # kernel math -> amsgrad
_SGD = (_plain, _momentum, _nesterov)
_UNFUSED = ("clip_value", "clip_tensor_norm", "clip_block_rms", "adaptive_clip")


def kernel_call(opt: Any) -> str | None:
    """Which fused kernel computes ``opt``'s step exactly ("adam", "sgd"), or None."""
    if opt.full_slot_names() != opt.slot_names() or opt.two_pass() or getattr(opt, "_step_offset", 0):
        return None  # (a group that joined later counts its own steps: not one kernel's)
    if any(getattr(opt, k, None) is not None for k in _UNFUSED):
        return None
    math_fn = opt.kernel_math()
    if math_fn in _ADAM and not opt.weight_decay_in_math:
        return "adam"
    if math_fn in _SGD and not opt.decoupled_weight_decay:
        return "sgd"
    return None


class TorchFusedEngine(ArrayEngine):
    """:class:`ArrayEngine` whose steps, where torch has a fused kernel for them, are that
    kernel on the flat buffers' views (see the module docs)."""

    def __init__(self, backend: Any, layout: Any) -> None:
        super().__init__(backend, layout)
        # per buffer name ("params" or a slot): (the buffer, its per-tensor views); a buffer
        # replaced (a loaded state) replaces its entry
        self._views: dict[str, tuple[Any, list[Any]]] = {}
        self._step_t = self.t.zeros((), dtype=self.t.float32, device=self.device)
        self._index: Any = None  # the groups' row index that _parts was made from
        self._parts: list[tuple[int, list[int]]] = []

    def _views_of(self, name: str, buf: Any) -> list[Any]:
        got = self._views.get(name)
        if got is None or got[0] is not buf:
            self._views[name] = got = (buf, list(self.layout.unflatten(buf).values()))
        return got[1]

    def _groups(self, opt: Any, state: Any) -> list[tuple[Any, list[int], str]] | None:
        """(optimizer view, tensor indices, kernel) per parameter group, or None when a
        group's step is not one of the kernels' (the hyperparameters are read from the
        views on every step; the partition is remembered with the groups' row index)."""
        index, views = opt.group_rows(state)
        kernels = [kernel_call(v) for v in views]
        if None in kernels:
            return None
        if self._index is not index:
            self._parts = [(r, [i for i, row in enumerate(index) if row == r])
                           for r in range(len(views))]
            self._index = index
        return [(views[r], ids, kernels[r]) for r, ids in self._parts if ids]

    def step(self, opt: Any, state: Any, params: Any, grads: Any, t: int,
             prepared: Any = None, ours: bool = False) -> tuple[dict, bool, Any, bool]:
        lay = self.layout
        plan = None
        if opt.nonfinite in ("propagate", "unchecked") and len(grads) == len(lay.names) > 0:
            plan = self._groups(opt, state)
        if plan is None:
            return super().step(opt, state, params, grads, t, prepared, ours)
        torch = self.t
        gs = prepared if prepared is not None else [grads[n] for n in lay.names]
        dense = []  # (contiguous copies are not writes: made while checking)
        for n, g in zip(lay.names, gs):
            if g.device != self.device:
                raise ValueError(f"gradients['{n}'] is on {g.device}, the parameters on "
                                 f"{self.device}")
            dense.append(g if g.is_contiguous() else g.contiguous())
        gs = dense
        copies = [] if ours else self.read_params(params, state.param_views or {},
                                                  state.params_flat)
        # checked: from here nothing can fail
        if state.params_flat is None:
            state.params_flat = self.full(lay.total, 0.0)
            state.param_views = lay.unflatten(state.params_flat)
        if copies:
            pv = state.param_views
            torch._foreach_copy_([pv[n] for n, _ in copies], [x for _, x in copies])
        checked = opt.nonfinite == "propagate"
        norm = None
        if checked or any(v.clip_norm is not None for v, _, _ in plan):
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(gs, 2, torch.float64)))
        ps = self._views_of("", state.params_flat)
        slots = {s: self._views_of(s, state.slots[s]) for s in opt.slot_names()}
        self._step_t.fill_(float(t))
        for v, ids, kernel in plan:
            p = [ps[i] for i in ids]
            g = [gs[i] for i in ids]
            if v.clip_norm is not None:  # scaled copies (the kernels' grad_scale would
                # unscale the caller's gradients in place)
                g = torch._foreach_mul(g, norm_scale(v.clip_norm, norm, v.clip_eps)
                                       .to(self.tdtype))
            if kernel == "adam":
                amsgrad = _ADAM[v.kernel_math()]
                fn = torch._fused_adamw_ if v.decoupled_weight_decay else torch._fused_adam_
                fn(p, g, [slots["m"][i] for i in ids], [slots["v"][i] for i in ids],
                   [slots["vmax"][i] for i in ids] if amsgrad else [], [self._step_t] * len(ids),
                   lr=v.learning_rate, beta1=v.beta1, beta2=v.beta2, weight_decay=v.weight_decay,
                   eps=v.epsilon, amsgrad=amsgrad, maximize=False)
            else:
                mom = v.momentum
                torch._fused_sgd_(p, g, [slots["momentum"][i] for i in ids] if mom else [],
                                  weight_decay=v.weight_decay, momentum=mom,
                                  lr=v.learning_rate, dampening=v.dampening,
                                  nesterov=v.nesterov, maximize=False,
                                  is_first_step=t == 1 and mom > 0)
        if not checked:
            return dict(state.param_views), True, norm, True
        # one pass over each flat buffer; min and max are NaN or ±inf where any value is
        bufs = [b for b in (state.params_flat, *(state.slots[s] for s in opt.slot_names()))
                if b.numel()]
        probe = torch.stack([norm, *(x.double() for b in bufs for x in torch.aminmax(b))])
        return dict(state.param_views), True, self._report(probe), True

    def _report(self, probe: Any) -> DeviceReport:
        """The probe (norm, then each buffer's min and max), read when needed: copied now
        into pinned host memory without waiting (on CUDA, an event marks the copy done)."""
        torch = self.t
        if probe.device.type == "cuda":
            host = probe.to("cpu", non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        else:
            host, done = probe, None

        def read() -> tuple[float, bool]:
            if done is not None:
                done.synchronize()
            vals = host.tolist()
            return vals[0], all(map(math.isfinite, vals[1:]))
        return DeviceReport(read)
