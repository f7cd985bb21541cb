"""The optimizer catalog's speed table: every optimizer against its peer's fastest step.

For each optimizer of ``mithril.utils.optimizers`` (whatever ``__all__`` holds when this
runs), one step on (a) 10M float32 parameters in 200 tensors and (b) 1M in 2,000, timed
through the public ``params, state = opt.update(params, grads, state)`` call on the NumPy,
torch-CPU and JAX-CPU backends, interleaved in the same process with the peer:

* torch.optim's class for the same algorithm, with ``fused=True`` where torch has a fused
  step for it, else ``foreach=True``, timed on torch's default threads and on one, the
  faster counting (see :data:`PEER_1T`);
* else optax's (``optax.contrib`` included) under ``jax.jit`` with the params and state
  donated;
* else none (Ftrl: only Keras has it, and Keras's step is too slow to be a fair peer).

Targets, for NumPy and torch: at most 1.0x the peer's time on (a) and 0.25x on (b); JAX is
reported beside them. Timing is that of ``optimizer_step.py`` (whose helpers this reuses):
each case in a fresh process, rotating blocks of consecutive steps after an equal warm-up
time, medians; every step gets the next of three pre-made gradient sets (one reused
gradient stays in cache and flatters the figure), handed over untimed. The first call
(JAX: tracing and compiling) is excluded and reported in the notes.

Checked once per case, before timing: every implementation makes its first step (ADOPT:
two, its first moves nothing) from the same params and gradients, and each of ours must
change the params as the peer did, ``‖Δours − Δpeer‖ / ‖Δpeer‖ ≤ 1e-4`` plus the float32
rounding of the params (``2⁻²³·‖p‖/‖Δpeer‖``); a ``WARNING`` line says where not (without
a peer, ours on torch and JAX against ours on NumPy).

GB/s counts the bytes per parameter the algorithm must move at least in float32 (column
B/p; see :data:`SPECS`): SGD with momentum reads p, g, b and writes p, b: 20 B, not 12; a
two-pass optimizer (LAMB, LARS, Novograd, Prodigy) adds what its first pass must read.

    python benchmarks/catalog.py                     # everything, both sizes
    python benchmarks/catalog.py --quick --only Adam # a smoke run (one process, < 1 min)

The full run takes half an hour (an hour on a loaded 2-core machine): optax's first compile
on (b) takes up to minutes per optimizer (LAMB: 1-3.5 min), and each case pays its imports
and compiles.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from optimizer_step import GRAD_SETS, SIZES, Impl, shapes_for, sync, time_blocks, to_host

#: optimizers benchmarked elsewhere, with where (they need 2-D parameters)
OWN_BENCHMARK = {"Muon": "benchmarks/muon.py (Newton-Schulz on 2-D parameters only)",
                 "DPSGD": "per-example gradients: tests/test_dpsgd.py",
                 "DifferentiallyPrivate": "per-example gradients: tests/test_dpsgd.py"}
#: the scale of the parameters (float32 rounding of p stays far below a 1e-3 step)
P_SCALE, G_SCALE = 0.1, 1e-2
REL_TOL = 1e-4
TARGETS = {"a": 1.0, "b": 0.25}
#: a torch peer is timed twice, on torch's default intra-op threads and on one, and the
#: faster counts: on a loaded machine (more runnable threads than cores) each of torch's
#: parallel regions waits for a descheduled thread, and its 2,000-tensor step ran 5-10x
#: slower on two threads than on one
PEER_1T = "peer 1 thread"


# -- peers --------------------------------------------------------------------------------
@dataclass
class Peer:
    kind: str            # "torch" or "optax"
    label: str           # e.g. "torch Adam fused", "optax lamb"
    make: Callable       # torch: list of tensors -> torch optimizer; optax: () -> transformation
    wrap: Callable | None = None    # optax: params dict -> the params optax steps (Lookahead)
    unwrap: Callable | None = None  # optax: those params -> the params dict


def torch_peer(cls_name: str, **kw: Any) -> Callable[[], Peer]:
    """torch.optim's ``cls_name`` with ``fused=True`` where it has a CPU fused step (tried on
    a tiny tensor), else ``foreach=True``."""

    def build() -> Peer:
        import torch

        cls = getattr(torch.optim, cls_name)
        mode = "foreach"
        if "fused" in inspect.signature(cls.__init__).parameters:
            try:
                t = torch.zeros(4, requires_grad=True)
                t.grad = torch.ones(4)
                cls([t], **kw, fused=True).step()
                mode = "fused"
            except (RuntimeError, ValueError, TypeError):
                pass
        return Peer("torch", f"torch {cls_name} {mode}",
                    lambda params: cls(params, **kw, **{mode: True}))

    return build


def optax_peer(path: str, *args: Any, **kw: Any) -> Callable[[], Peer]:
    """``optax.<path>(*args, **kw)`` (``path`` may be ``contrib.adopt``)."""

    def build() -> Peer:
        import optax

        fn: Any = optax
        for part in path.split("."):
            fn = getattr(fn, part)
        return Peer("optax", f"optax {path}", lambda: fn(*args, **kw))

    return build


def optax_lookahead() -> Peer:
    import optax

    return Peer("optax", "optax lookahead(adam)",
                lambda: optax.lookahead(optax.adam(1e-3), sync_period=6, slow_step_size=0.5),
                wrap=optax.LookaheadParams.init_synced, unwrap=lambda lp: lp.fast)


# -- the catalog ----------------------------------------------------------------------------
@dataclass
class Spec:
    ours: Callable[[Any], Any]               # the optimizers module -> a fresh instance
    peer: Callable[[], Peer] | None          # None: no fair peer (see note)
    bytes: float                             # least float32 traffic per parameter and step
    why: str                                 # what those bytes are
    check_steps: int = 1                     # steps before the agreement check
    note: str = ""


RW = "read p, g, {s}; write p, {s}"

#: name -> ours (hyperparameters given to both sides where defaults differ), peer, bytes
SPECS: dict[str, Spec] = {
    "Adam": Spec(lambda o: o.Adam(1e-3), torch_peer("Adam", lr=1e-3), 28, RW.format(s="m, v")),
    "AdamW": Spec(lambda o: o.AdamW(1e-3, weight_decay=1e-2),
                  torch_peer("AdamW", lr=1e-3, weight_decay=1e-2), 28, RW.format(s="m, v")),
    "SGD": Spec(lambda o: o.SGD(1e-3, momentum=0.9), torch_peer("SGD", lr=1e-3, momentum=0.9),
                20, RW.format(s="b")),
    "RMSProp": Spec(lambda o: o.RMSProp(1e-3),
                    torch_peer("RMSprop", lr=1e-3, alpha=0.9, eps=1e-8), 20, RW.format(s="v")),
    "AdaGrad": Spec(lambda o: o.AdaGrad(1e-2), torch_peer("Adagrad", lr=1e-2, eps=1e-8), 20,
                    RW.format(s="sum")),
    "Adadelta": Spec(lambda o: o.Adadelta(1.0),
                     torch_peer("Adadelta", lr=1.0, rho=0.9, eps=1e-6), 28, RW.format(s="v, u")),
    "Adamax": Spec(lambda o: o.Adamax(2e-3), torch_peer("Adamax", lr=2e-3), 28,
                   RW.format(s="m, u")),
    "NAdam": Spec(lambda o: o.NAdam(2e-3), torch_peer("NAdam", lr=2e-3), 28, RW.format(s="m, v")),
    "RAdam": Spec(lambda o: o.RAdam(1e-3), torch_peer("RAdam", lr=1e-3), 28, RW.format(s="m, v")),
    "Rprop": Spec(lambda o: o.Rprop(1e-2), torch_peer("Rprop", lr=1e-2), 28,
                  RW.format(s="prev, step")),
    "ASGD": Spec(lambda o: o.ASGD(1e-2), torch_peer("ASGD", lr=1e-2), 20, RW.format(s="ax")),
    "Adafactor": Spec(lambda o: o.Adafactor(1e-2), torch_peer("Adafactor", lr=1e-2), 28,
                      "3 passes; matrices 24 (p, g; g; p, g -> p), vectors 32 (p, g, V -> V; "
                      "p, g, V -> p); half the params each"),
    "Lion": Spec(lambda o: o.Lion(1e-4, weight_decay=1e-3),
                 optax_peer("lion", 1e-4, weight_decay=1e-3), 20, RW.format(s="m")),
    "LAMB": Spec(lambda o: o.LAMB(1e-3), optax_peer("lamb", 1e-3), 44,
                 "pass 1 reads p, g, m, v (norms of p, u); pass 2 28"),
    "LARS": Spec(lambda o: o.LARS(1e-3), optax_peer("lars", 1e-3), 28,
                 "pass 1 reads p, g (norms of p, u); pass 2 20"),
    "Novograd": Spec(lambda o: o.Novograd(1e-3), optax_peer("novograd", 1e-3), 24,
                     "pass 1 reads g (its norm); pass 2 20"),
    "Yogi": Spec(lambda o: o.Yogi(1e-2), optax_peer("yogi", 1e-2), 28, RW.format(s="m, v")),
    "AdaBelief": Spec(lambda o: o.AdaBelief(1e-3), optax_peer("adabelief", 1e-3), 28,
                      RW.format(s="m, s")),
    "Adan": Spec(lambda o: o.Adan(1e-3), optax_peer("adan", 1e-3), 44,
                 RW.format(s="m, v, n, g_prev")),
    "ADOPT": Spec(lambda o: o.ADOPT(1e-3), optax_peer("contrib.adopt", 1e-3), 28,
                  RW.format(s="m, v"), check_steps=2),
    "AdEMAMix": Spec(lambda o: o.AdEMAMix(1e-3), optax_peer("contrib.ademamix", 1e-3), 36,
                     RW.format(s="m1, m2, v")),
    "ScheduleFreeAdamW": Spec(lambda o: o.ScheduleFreeAdamW(2.5e-3),
                              optax_peer("contrib.schedule_free_adamw", 2.5e-3), 28,
                              RW.format(s="z, nu")),
    "ScheduleFreeSGD": Spec(lambda o: o.ScheduleFreeSGD(1.0),
                            optax_peer("contrib.schedule_free_sgd", 1.0), 20, RW.format(s="z")),
    # estim_lr0 1e-3 (optax: 1e-6) on both sides: a first step far above float32 rounding
    "Prodigy": Spec(lambda o: o.Prodigy(1.0, estim_lr0=1e-3),
                    optax_peer("contrib.prodigy", 1.0, estim_lr0=1e-3), 52,
                    "pass 1 reads p, g, x0, s; pass 2 reads p, g, m, v, s, writes p, m, v, s"),
    "Lookahead": Spec(lambda o: o.Lookahead(o.Adam(1e-3), sync_period=6, slow_step_size=0.5),
                      optax_lookahead, 28 + 8 / 6,
                      "Adam's 28, and the slow weights read and written on sync steps (1 in 6)"),
    "SignSGD": Spec(lambda o: o.SignSGD(1e-3), optax_peer("sign_sgd", 1e-3), 12,
                    "reads p, g, writes p"),
    "Signum": Spec(lambda o: o.Signum(1e-3), optax_peer("signum", 1e-3), 20, RW.format(s="m")),
    "OptimisticGD": Spec(lambda o: o.OptimisticGD(1e-3),
                         optax_peer("optimistic_gradient_descent", 1e-3), 20,
                         RW.format(s="prev")),
    "OptimisticAdam": Spec(lambda o: o.OptimisticAdam(1e-3),
                           optax_peer("optimistic_adam_v2", 1e-3), 36,
                           RW.format(s="m, v, prev")),
    "SimplifiedAdEMAMix": Spec(lambda o: o.SimplifiedAdEMAMix(1e-3),
                               optax_peer("contrib.simplified_ademamix", 1e-3), 28,
                               RW.format(s="m, n")),
    "COCOB": Spec(lambda o: o.COCOB(1.0), optax_peer("contrib.cocob", 1.0), 52,
                  RW.format(s="p0, c, scale, sub, reward")),
    "Fromage": Spec(lambda o: o.Fromage(1e-2), optax_peer("fromage", 1e-2), 20,
                    "pass 1 reads p, g (norms of p, g); pass 2 12"),
    "DoG": Spec(lambda o: o.DoG(1.0), optax_peer("contrib.dog", 1.0), 32,
                "pass 1 reads p, g, x0 (sums over all); pass 2 reads p, g, x0, writes p, x0"),
    "DoWG": Spec(lambda o: o.DoWG(1.0), optax_peer("contrib.dowg", 1.0), 32,
                 "pass 1 reads p, g, x0 (sums over all); pass 2 reads p, g, x0, writes p, x0"),
    "AcProp": Spec(lambda o: o.AcProp(1e-3), optax_peer("contrib.acprop", 1e-3), 28,
                   RW.format(s="m, v")),
    "MADGRAD": Spec(lambda o: o.MADGRAD(1e-2), optax_peer("contrib.madgrad", 1e-2), 32,
                    "read p, g, x0, s, v; write p, s, v"),
    "DAdaptAdamW": Spec(lambda o: o.DAdaptAdamW(1.0), optax_peer("contrib.dadapt_adamw", 1.0), 48,
                        "pass 1 reads g, v, s (sums over all); pass 2 reads p, g, m, v, s, "
                        "writes p, m, v, s"),
    "SM3": Spec(lambda o: o.SM3(1e-3), optax_peer("sm3", 1e-3), 20,
                "read p, g, m; write p, m (and a few per-axis accumulators per tensor)"),
    # half the tensors are matrices (n, 50): rank 16 of 50 projected, the moments 16/50 of
    # the matrix; the projection refreshes at step 1 only (gap 200; a case makes < 200
    # steps: the timed ones are the steady step); benchmarks/galore.py times the SVDs apart
    "GaLore": Spec(lambda o: o.GaLore(1e-3, rank=16), optax_peer("contrib.galore", 1e-3, rank=16),
                   20, "vectors Adam's 28; matrices read p, g, write p (12), moments 16/50"),
    "Ftrl": Spec(lambda o: o.Ftrl(1e-3), None, 28, RW.format(s="n, z"),
                 note="no torch/optax FTRL; Keras's step is too slow to be a fair peer"),
}


def catalog() -> tuple[list[str], list[str]]:
    """The optimizer names to run (``__all__`` order) and a note for each one skipped."""
    from mithril.utils import optimizers as O

    names, skipped = [], []
    for name in O.__all__:
        cls = getattr(O, name)
        if not (isinstance(cls, type) and issubclass(cls, O.Optimizer)) or cls is O.Optimizer:
            continue
        if "closure" in inspect.signature(cls.update).parameters:
            skipped.append(f"{name}: skipped, its update needs a closure (no one-step peer)")
        elif name in OWN_BENCHMARK:
            skipped.append(f"{name}: skipped, see {OWN_BENCHMARK[name]}")
        else:
            names.append(name)
    return names, skipped


def spec_of(name: str) -> Spec:
    """The catalog entry, or for an optimizer added since: its defaults, no peer, and the
    bytes of a one-pass elementwise step (12 + 8 per slot), if it is one."""
    if name in SPECS:
        return SPECS[name]
    from mithril.utils import optimizers as O
    from mithril.utils.optimizers.tensorwise import TensorwiseOptimizer

    opt = getattr(O, name)()
    one_pass = not opt.two_pass() and not isinstance(opt, TensorwiseOptimizer)
    b = 12 + 8 * len(opt.slot_names()) if one_pass else float("nan")
    return Spec(lambda o: getattr(o, name)(), None, b, "12 + 8 per slot" if one_pass else "?",
                note="not in the catalog table yet: defaults, no peer")


# -- implementations --------------------------------------------------------------------------
def make_data(shapes: list[tuple[int, ...]], seed: int = 0) -> tuple[dict, list[dict]]:
    """float32 params (scale :data:`P_SCALE`) and :data:`GRAD_SETS` gradient sets."""
    rng = np.random.default_rng(seed)
    p = {f"p{i}": (rng.standard_normal(s, np.float32) * np.float32(P_SCALE))
         for i, s in enumerate(shapes)}
    gs = [{k: rng.standard_normal(v.shape, np.float32) * np.float32(G_SCALE) for k, v in p.items()}
          for _ in range(GRAD_SETS)]
    return p, gs


def flat(params: dict) -> np.ndarray:
    """All params as one new float64 vector (a copy: ours' returned arrays are overwritten by
    the next update)."""
    return np.concatenate([np.asarray(to_host(v), np.float64).ravel() for v in params.values()])


def ours_impl(name: str, backend: str, p: dict, gs: list[dict], check_steps: int
              ) -> tuple[Impl, float]:
    """Ours on ``backend`` (own copies of ``p`` and ``gs``); the first-call time."""
    from mithril.utils import optimizers as O

    if backend == "numpy":
        conv: Callable = np.array
    elif backend == "torch":
        import torch

        def conv(x):
            return torch.from_numpy(x.copy())
    else:
        import jax.numpy as jnp

        conv = jnp.array
    params = {k: conv(v) for k, v in p.items()}
    gsets = [{k: conv(v) for k, v in g.items()} for g in gs]
    opt = spec_of(name).ours(O)
    box: dict[str, Any] = {"p": params, "g": gsets[0]}

    def give(i: int) -> None:
        box["g"] = gsets[i]

    def step() -> None:
        box["p"], box["s"] = opt.update(box["p"], box["g"], box["s"])
        sync(box["p"])

    t0 = time.perf_counter()
    box["s"] = opt.init(params)
    step()
    first_call = time.perf_counter() - t0
    for i in range(1, check_steps):
        give(i)
        step()
    return Impl(give, step, flat(box["p"])), first_call


def torch_peer_impl(peer: Peer, p: dict, gs: list[dict], check_steps: int) -> tuple[Impl, float]:
    import torch

    tp = [torch.from_numpy(v.copy()) for v in p.values()]
    tg = [[torch.from_numpy(g[k].copy()) for k in p] for g in gs]
    opt = peer.make(tp)

    def give(i: int) -> None:
        for t, g in zip(tp, tg[i]):
            t.grad = g

    give(0)
    t0 = time.perf_counter()
    opt.step()
    first_call = time.perf_counter() - t0
    for i in range(1, check_steps):
        give(i)
        opt.step()
    out = np.concatenate([t.numpy().astype(np.float64).ravel() for t in tp])
    return Impl(give, opt.step, out), first_call


def optax_peer_impl(peer: Peer, p: dict, gs: list[dict], check_steps: int) -> tuple[Impl, float]:
    import jax
    import jax.numpy as jnp
    import optax

    tx = peer.make()
    wrap = peer.wrap or (lambda d: d)
    unwrap = peer.unwrap or (lambda d: d)
    params = wrap({k: jnp.array(v) for k, v in p.items()})
    gsets = [{k: jnp.array(v) for k, v in g.items()} for g in gs]
    # copies: a state or wrapper may hold the very param arrays (Prodigy's x0, Lookahead's
    # slow weights), and one buffer cannot be donated twice
    params = jax.tree.map(jnp.copy, params)
    box = {"p": params, "s": jax.tree.map(jnp.copy, tx.init(params)), "g": gsets[0]}

    def _step(params, grads, state):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step_fn = jax.jit(_step, donate_argnums=(0, 2))

    def give(i: int) -> None:
        box["g"] = gsets[i]

    def step() -> None:
        box["p"], box["s"] = step_fn(box["p"], box["g"], box["s"])
        jax.block_until_ready(box["p"])

    t0 = time.perf_counter()
    step()
    first_call = time.perf_counter() - t0
    for i in range(1, check_steps):
        give(i)
        step()
    out = unwrap(box["p"])  # a dict that JAX rebuilt in sorted key order
    return Impl(give, step, flat({k: out[k] for k in p})), first_call


def on_threads(impl: Impl, n: int) -> Impl:
    """``impl`` with torch's intra-op threads set to ``n`` in its (untimed) handover."""
    import torch

    def give(i: int) -> None:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        impl.give(i)

    return Impl(give, impl.step, impl.first)


# -- one case -------------------------------------------------------------------------------
def check(impls: dict[str, Impl], ref_key: str, p0: np.ndarray, name: str) -> list[str]:
    """Warnings where an implementation's params after the check steps differ from
    ``ref_key``'s by more than :data:`REL_TOL` (relative, plus the float32 rounding of p)."""
    ref = impls[ref_key].first
    d_ref = ref - p0
    n_ref = float(np.linalg.norm(d_ref))
    if not n_ref > 0:
        return [f"WARNING {name}: {ref_key} did not change the params"]
    tol = REL_TOL + 2.0 ** -23 * float(np.linalg.norm(ref)) / n_ref
    out = []
    for k, impl in impls.items():
        if k == ref_key or impl.first is None:
            continue
        err = float(np.linalg.norm((impl.first - p0) - d_ref)) / n_ref
        if not err <= tol:
            out.append(f"WARNING {name}: {k} changed the params by {err:.2e} (relative) from "
                       f"{ref_key}'s change (tolerance {tol:.1e})")
    return out


def run_case(name: str, size: str, backends: list[str], args: argparse.Namespace) -> dict:
    """Time one (optimizer, size); returns the table row."""
    spec = spec_of(name)
    total, n = SIZES[size]
    p, gs = make_data(shapes_for(total, n))
    impls: dict[str, Impl] = {}
    first: dict[str, float] = {}
    peer = spec.peer() if spec.peer else None
    if peer is not None:
        make = torch_peer_impl if peer.kind == "torch" else optax_peer_impl
        impls["peer"], first["peer"] = make(peer, p, gs, spec.check_steps)
        if peer.kind == "torch":  # and on one thread (see PEER_1T)
            impls[PEER_1T], _ = make(peer, p, gs, spec.check_steps)
    for b in backends:
        impls[b], first[b] = ours_impl(name, b, p, gs, spec.check_steps)
    if PEER_1T in impls:
        import torch

        default = torch.get_num_threads()
        impls = {k: on_threads(v, 1 if k == PEER_1T else default) for k, v in impls.items()}
    p0 = np.concatenate([v.astype(np.float64).ravel() for v in p.values()])
    del p, gs
    ref = "peer" if peer is not None else ("numpy" if "numpy" in impls else next(iter(impls)))
    warnings = check(impls, ref, p0, f"{name} ({size})")
    for impl in impls.values():
        impl.first = None
    del p0
    med = time_blocks(impls, args.rounds, args.block, args.warm)
    slow = {k: f"{v:.1f}s" for k, v in first.items() if v >= 0.5 and k in ("jax", "peer")}
    label = peer.label if peer else "-"
    if PEER_1T in med:  # the peer's fastest: torch on its default threads or on one
        one = med.pop(PEER_1T)
        if one < med["peer"]:
            med["peer"] = one
            label += ", 1 thread"
    return {"name": name, "size": size, "peer": label, "bytes": spec.bytes,
            "ms": {k: v * 1e3 for k, v in med.items()}, "first": slow, "warnings": warnings,
            "note": spec.note, "why": spec.why, "total": total}


# -- the table ------------------------------------------------------------------------------
COLS = ("numpy", "torch", "jax", "peer")


def header() -> str:
    ms = "".join(f"{c + ' ms':>10}" for c in COLS)
    ratio = "".join(f"{c + ' x':>9}" for c in COLS[:3])
    return (f"{'optimizer':<18}{'peer':<35}{'case':<5}{'B/p':>5}{ms}{ratio}"
            f"{'GB/s np/torch/jax/peer':>26}  target  first call")


def fmt_row(r: dict) -> str:
    ms, peer = r["ms"], r["ms"].get("peer")

    def num(v: float | None, f: str) -> str:
        return "-" if v is None or not math.isfinite(v) else format(v, f)

    cells = "".join(f"{num(ms.get(c), '.2f'):>10}" for c in COLS)
    ratios = "".join(f"{num(ms[c] / peer if peer and c in ms else None, '.2f'):>9}"
                     for c in COLS[:3])
    gbs = "/".join(num(r["total"] * r["bytes"] / (ms[c] * 1e-3) / 1e9 if c in ms else None, ".1f")
                   for c in COLS)
    miss = misses(r)
    target = "-" if peer is None else ("ok" if not miss else "MISS " + ",".join(miss))
    first = ", ".join(f"{k} {v}" for k, v in r["first"].items())
    b = num(r["bytes"], ".4g")
    return (f"{r['name']:<18}{r['peer']:<35}{r['size']:<5}{b:>5}{cells}{ratios}{gbs:>26}  "
            f"{target:<7} {first}")


def misses(r: dict) -> list[str]:
    """The backends (numpy, torch) over the target of the row's case."""
    peer = r["ms"].get("peer")
    if not peer:
        return []
    return [c for c in ("numpy", "torch") if c in r["ms"] and r["ms"][c] / peer > TARGETS[r["size"]]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated optimizer names (default: all)")
    ap.add_argument("--sizes", default="a,b")
    ap.add_argument("--backends", default="numpy,torch,jax", help="ours on these")
    ap.add_argument("--quick", action="store_true",
                    help="fewer, shorter rounds, all cases in this process (a smoke run)")
    ap.add_argument("--rounds", type=int, default=6, help="rounds over all implementations")
    ap.add_argument("--block", type=int, default=5, help="timed consecutive steps per round")
    ap.add_argument("--warm", type=float, default=0.05, help="untimed seconds before each block")
    ap.add_argument("--in-process", action="store_true",
                    help="run every case in this process (by default each gets a fresh one)")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:  # and in one process: a fresh one per case costs imports and compiles
        args.rounds, args.block, args.warm, args.in_process = 2, 3, 0.02, True
    backends = [b for b in args.backends.split(",") if b]
    if args.child:  # one case, in a fresh process: print its row for the parent
        name, size = args.child.split(":")
        print("@@ROW " + json.dumps(run_case(name, size, backends, args)), flush=True)
        return
    names, skipped = catalog()
    if args.only:
        wanted = args.only.split(",")
        unknown = [w for w in wanted if w not in names and not any(w + ":" in s for s in skipped)]
        if unknown:
            ap.error(f"unknown or skipped optimizer(s) {unknown}; the catalog has {names}")
        names = [n for n in names if n in wanted]
        skipped = [s for s in skipped if s.split(":")[0] in wanted]
    for s in skipped:
        print(s)
    print(header(), flush=True)
    rows, notes, failed = [], [], []
    for name in names:
        for size in args.sizes.split(","):
            if args.in_process:
                try:
                    row = run_case(name, size, backends, args)
                except Exception as e:  # one broken optimizer, not the whole table
                    failed.append(f"{name} ({size}): failed: {type(e).__name__}: {e}")
                    print(f"{name:<18}({size}) failed: {type(e).__name__}: {e}", flush=True)
                    continue
            else:
                cmd = [sys.executable, __file__, "--child", f"{name}:{size}", "--backends",
                       args.backends, "--rounds", str(args.rounds), "--block", str(args.block),
                       "--warm", str(args.warm)]
                res = subprocess.run(cmd, capture_output=True, text=True)
                lines = [ln for ln in res.stdout.splitlines() if ln.startswith("@@ROW ")]
                if res.returncode or not lines:
                    err = res.stderr.strip().splitlines() or ["?"]
                    tail = next((ln for ln in reversed(err) if "Error" in ln or "Exception" in ln),
                                err[-1])[:300]
                    failed.append(f"{name} ({size}): failed: {tail}")
                    print(f"{name:<18}({size}) failed: {tail}", flush=True)
                    continue
                row = json.loads(lines[-1][6:])
            rows.append(row)
            notes += row["warnings"]
            print(fmt_row(row), flush=True)
    print()
    seen = set()
    for r in rows:
        if r["name"] not in seen:
            seen.add(r["name"])
            print(f"{r['name']:<18}B/p {r['bytes']:.4g}: {r['why']}"
                  + (f"  [{r['note']}]" if r["note"] else ""))
    print()
    for line in notes + failed:
        print(line)
    missed = []
    for r in rows:
        over = [f"{c} {r['ms'][c] / r['ms']['peer']:.2f}x" for c in misses(r)]
        if over:
            missed.append(f"{r['name']} ({r['size']}): {', '.join(over)}")
    print(f"targets (numpy, torch <= {TARGETS['a']}x on (a), <= {TARGETS['b']}x on (b)): "
          + ("all met" if not missed else f"missed by {len(missed)} row(s):"))
    for m in missed:
        print("  " + m)


if __name__ == "__main__":
    main()
