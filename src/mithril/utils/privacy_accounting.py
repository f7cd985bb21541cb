"""Privacy accounting for DP-SGD (:class:`~mithril.utils.optimizers.DPSGD`,
:class:`~mithril.utils.optimizers.DifferentiallyPrivate`): the ``(ε, δ)`` a run spends, and
the noise multiplier that spends a target ``ε``, on top of Google's ``dp_accounting``
package (``pip install 'mithril[privacy]'``); no privacy math is written here.

A DP-SGD step with noise multiplier ``σ`` on a batch that holds each of the ``N`` training
examples independently with probability ``q`` (Poisson sampling, ``q = B / N`` for an expected
batch size ``B``) is the Poisson-subsampled Gaussian mechanism; ``steps`` of them compose.
With the ``"rdp"`` accountant (the default, Opacus's ``RDPAccountant``) ε is the Rényi-DP
bound at the orders of Opacus (``1.1, 1.2, ..., 10.9, 12, 13, ..., 63``) turned into
``(ε, δ)`` by Balle et al. (2020), Theorem 21::

    ε = min over orders α of  RDP_α(σ, q) · steps + log((α − 1) / α) − (log δ + log α) / (α − 1)

``"pld"`` is ``dp_accounting``'s privacy-loss-distribution accountant (tight: the role of
Opacus's ``PRVAccountant``; the two approximate the same exact ε by different
discretisations, so they agree to ~1 %, not to rounding).

Equal to Opacus 1.6's ``RDPAccountant`` to ≤ 1e-9 relative where the best order is large
(σ ≳ 1.1 with ε ≲ 5, the usual runs) or an integer. Where it is small and fractional (large
ε, or σ < 1), ``dp_accounting`` 0.6 sums the fractional order's binomial series with the
coefficients' absolute values, an upper bound of Opacus's (exact) ``A_α``: ε here is then
larger than Opacus's, a valid but looser bound (σ = 1, q = 0.01, 1,000 steps: +6e-7
relative; σ = 0.8, q = 0.05, 3,000 steps: 38.2 against 37.0, where ``log A`` at α = 1.8 is
0.00685 against 0.00643 in Opacus and by numerical integration).
:func:`get_noise_multiplier` is Opacus's search (``opacus.accountants.utils``): double σ from
20 until ε ≤ the target, then bisect until ε is within ``epsilon_tolerance`` below it, and
return the upper end (a σ whose ε is at most the target).

Shuffled batches (not Poisson-sampled, as ``mithril train`` draws them) are accounted as if
Poisson-sampled at ``q = batch_size / N``, as Opacus does without ``poisson_sampling``: the
usual practice, not a proof for that sampling.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Sequence
from typing import Any

__all__ = ["ACCOUNTANTS", "RDP_ORDERS", "PrivacyAccountant", "get_epsilon",
           "get_noise_multiplier"]

#: Opacus's ``RDPAccountant.DEFAULT_ALPHAS``: the Rényi orders the ``"rdp"`` accountant tries
RDP_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)]
                                      + [float(a) for a in range(12, 64)])
ACCOUNTANTS = ("rdp", "pld")
#: :func:`get_noise_multiplier` gives up above this σ (Opacus's ``MAX_SIGMA``)
MAX_SIGMA = 1e6


def _dp_accounting() -> Any:
    try:
        import dp_accounting
    except ImportError:
        raise ImportError("privacy accounting needs the dp-accounting package: pip install "
                          "'mithril[privacy]' (or pip install dp-accounting)") from None
    return dp_accounting


def _number(name: str, value: Any, low: float, high: float, low_open: bool = True,
            high_open: bool = False) -> float:
    """``value`` as a float in the interval, or the error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    v = float(value)
    if (v <= low if low_open else v < low) or (v >= high if high_open else v > high):
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name} must be in {lo}{low:g}, {high:g}{hi}, got {value!r}")
    return v


def _steps(value: Any, name: str = "steps") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _accountant(name: Any) -> str:
    if name not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {', '.join(map(repr, ACCOUNTANTS))}, "
                         f"got {name!r}")
    return name


class PrivacyAccountant:
    """The privacy a DP-SGD run has spent, as Opacus's accountants keep it: ``step`` once per
    optimizer step (a σ and sampling rate ``q``), ``get_epsilon(delta)`` at any time.
    ``history`` holds ``(noise_multiplier, sample_rate, steps)`` runs of equal steps (Opacus's
    form); ``state_dict`` / ``load_state_dict`` keep it."""

    def __init__(self, accountant: str = "rdp") -> None:
        self.mechanism = _accountant(accountant)
        self.history: list[tuple[float, float, int]] = []

    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` steps of noise ``noise_multiplier`` at sampling rate
        ``sample_rate`` (merged into the last entry when they are the same)."""
        sigma = _number("noise_multiplier", noise_multiplier, 0.0, math.inf, low_open=False,
                        high_open=True)
        q = _number("sample_rate", sample_rate, 0.0, 1.0, low_open=False)
        n = _steps(steps)
        if self.history and self.history[-1][:2] == (sigma, q):
            self.history[-1] = (sigma, q, self.history[-1][2] + n)
        else:
            self.history.append((sigma, q, n))

    def get_epsilon(self, delta: float) -> float:
        """ε of the steps so far at ``delta`` (0 before any step; ``inf`` if a step had no
        noise and a positive sampling rate)."""
        return _epsilon(self.history, delta, self.mechanism)

    def state_dict(self) -> dict[str, Any]:
        return {"mechanism": self.mechanism, "history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (checked whole first: a bad one changes nothing)."""
        if not isinstance(state, dict) or set(state) != {"mechanism", "history"}:
            raise ValueError("PrivacyAccountant.load_state_dict: expected a dict with keys "
                             f"'history' and 'mechanism', got {state!r}")
        fresh = PrivacyAccountant(state["mechanism"])
        for entry in state["history"]:
            if not isinstance(entry, (list, tuple)) or len(entry) != 3:
                raise ValueError(f"PrivacyAccountant.load_state_dict: a history entry is "
                                 f"(noise_multiplier, sample_rate, steps), got {entry!r}")
            fresh.step(noise_multiplier=entry[0], sample_rate=entry[1], steps=entry[2])
        self.mechanism, self.history = fresh.mechanism, fresh.history

    def __len__(self) -> int:
        return len(self.history)


def _epsilon(history: Sequence[tuple[float, float, int]], delta: Any, mechanism: str) -> float:
    delta = _number("delta", delta, 0.0, 1.0, high_open=True)
    dpa = _dp_accounting()
    events = [dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(s)), n)
              for s, q, n in history if n > 0 and q > 0]
    if not events:
        return 0.0
    if any(s == 0 for s, q, n in history if n > 0 and q > 0):
        return math.inf  # (no noise: no privacy)
    if mechanism == "rdp":
        from dp_accounting.rdp import RdpAccountant

        acc: Any = RdpAccountant(RDP_ORDERS)
    else:
        from dp_accounting.pld import PLDAccountant

        acc = PLDAccountant()
    absl = logging.getLogger("absl")  # (its note per fractional order that does not
    level = absl.level  # converge, written while composing and when reading ε)
    absl.setLevel(logging.ERROR)
    try:
        acc.compose(dpa.ComposedDpEvent(events))
        return float(acc.get_epsilon(delta))
    finally:
        absl.setLevel(level)


def get_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                accountant: str = "rdp") -> float:
    """ε after ``steps`` DP-SGD steps of noise ``noise_multiplier`` (σ) with Poisson sampling
    rate ``sample_rate`` (q = expected batch size / N), at ``delta``: Opacus's
    ``RDPAccountant`` with ``history = [(σ, q, steps)]`` (module docs)."""
    acc = PrivacyAccountant(accountant)
    acc.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
    return acc.get_epsilon(delta)


def get_noise_multiplier(*, target_epsilon: float, target_delta: float, sample_rate: float,
                         epochs: float | None = None, steps: int | None = None,
                         accountant: str = "rdp", epsilon_tolerance: float = 0.01) -> float:
    """The noise multiplier σ whose ε after ``steps`` (or ``epochs``: ``int(epochs /
    sample_rate)`` steps) is at most ``target_epsilon`` and within ``epsilon_tolerance`` of it:
    ``opacus.accountants.utils.get_noise_multiplier`` (module docs), the same arguments."""
    target = _number("target_epsilon", target_epsilon, 0.0, math.inf, high_open=True)
    q = _number("sample_rate", sample_rate, 0.0, 1.0)
    tol = _number("epsilon_tolerance", epsilon_tolerance, 0.0, math.inf, high_open=True)
    _number("target_delta", target_delta, 0.0, 1.0, high_open=True)
    _accountant(accountant)
    if (steps is None) == (epochs is None):
        raise ValueError("get_noise_multiplier takes either steps or epochs (one of them)")
    if steps is None:
        n = int(_number("epochs", epochs, 0.0, math.inf, high_open=True) / q)
    else:
        n = _steps(steps)
    if n == 0:
        raise ValueError(f"get_noise_multiplier: no step to account for (steps={steps}, "
                         f"epochs={epochs}, sample_rate={sample_rate})")

    def eps(sigma: float) -> float:
        return _epsilon([(sigma, q, n)], target_delta, accountant)

    eps_high, sigma_low, sigma_high = math.inf, 0.0, 10.0
    while eps_high > target:
        sigma_high *= 2
        eps_high = eps(sigma_high)
        if sigma_high > MAX_SIGMA:
            raise ValueError(f"get_noise_multiplier: target_epsilon={target_epsilon} at "
                             f"target_delta={target_delta} is out of reach (the privacy "
                             f"budget is too low: sigma > {MAX_SIGMA:g})")
    while target - eps_high > tol:
        sigma = (sigma_low + sigma_high) / 2
        e = eps(sigma)
        if e < target:
            sigma_high, eps_high = sigma, e
        else:
            sigma_low = sigma
    return sigma_high
