"""``preprocess.json``: what ``mithril predict`` needs besides the parameters of a model that
``mithril train --data`` trained (feature names, standardisation, imputation, classes)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CLIError
from .networks import OBJECTIVES

PREPROCESS_FORMAT = "mithril-tabular-1"


@dataclass
class Preprocess:
    """What a prediction needs besides the parameters (``preprocess.json``)."""

    features: list[str]
    mean: list[float]
    std: list[float]
    objective: str
    target: str
    labels: list[Any]
    target_mean: float
    target_std: float
    hidden: list[int]
    activation: str
    #: ``--impute mean``: the value of each feature a missing cell takes (the training rows'
    #: mean, in the feature's units), or None: a missing cell is refused
    impute: list[float] | None = None

    def as_dict(self) -> dict[str, Any]:
        d = {"format": PREPROCESS_FORMAT, **vars(self)}
        if self.impute is None:  # as written before --impute: the digests of runs stay valid
            del d["impute"]
        return d

    @classmethod
    def load(cls, path: Path) -> Preprocess:
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(d, dict):
                raise ValueError(f"a JSON object expected, got {type(d).__name__}")
            if d.pop("format", None) != PREPROCESS_FORMAT:
                raise ValueError(f"format is not {PREPROCESS_FORMAT}")
            pre = cls(**d)
            pre.check()
            return pre
        except OSError as exc:
            raise CLIError(f"--run {path.parent}: not a run of `mithril train --data` "
                           f"({path.name}: {exc.strerror or exc})") from None
        except (ValueError, TypeError) as exc:
            raise CLIError(f"--run {path.parent}: {path.name} is damaged ({exc})") from None

    def digest(self) -> str:
        """A fingerprint of the fields, kept in the model file: a model.safetensors of the same
        shapes copied from another run (other data, other statistics) would else predict
        silently with the wrong preprocessing."""
        text = json.dumps(self.as_dict(), sort_keys=True, allow_nan=False)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def check(self) -> None:
        """ValueError naming the field unless the fields can standardise the features and
        read the outputs (an edited file: a statistic per feature, finite, std > 0)."""
        if not isinstance(self.features, list) or not self.features or \
                not all(isinstance(f, str) for f in self.features):
            raise ValueError("'features' must be a non-empty list of column names")
        n = len(self.features)
        for key in ("mean", "std", "impute"):
            v = getattr(self, key)
            if key == "impute" and v is None:
                continue
            if not isinstance(v, list) or len(v) != n or not all(
                    isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)
                    for t in v):
                raise ValueError(f"{key!r} must hold {n} finite numbers, one per feature")
        if min(self.std) <= 0:
            raise ValueError("'std' must be > 0")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"'objective' must be one of {', '.join(OBJECTIVES)}")
        if not isinstance(self.labels, list) or (self.objective == "classification"
                                                 and len(self.labels) < 2):
            raise ValueError("'labels' must list the classes (two at least)")
        if len({json.dumps(v) for v in self.labels}) != len(self.labels):
            raise ValueError("'labels' must not repeat a class (one p_<label> column each)")
        for key in ("target_mean", "target_std"):
            v = getattr(self, key)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{key!r} must be a finite number")

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Standardised features; with :attr:`impute`, a missing (NaN) cell first takes its
        feature's value."""
        if self.impute is not None:
            x = np.where(np.isnan(x), np.asarray(self.impute), x)
        return (x - np.asarray(self.mean)) / np.asarray(self.std)
