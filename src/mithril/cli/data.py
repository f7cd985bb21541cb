"""The task of ``mithril train`` and ``mithril compare``: scikit-learn's digits (8×8 images of
handwritten digits, 1,797 samples, shipped with scikit-learn, so no download)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import CLIError


@dataclass(frozen=True)
class Dataset:
    """Standardised features (float64) and integer labels, split once."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])


def load_digits_split(test_size: float = 0.2, split_seed: int = 0) -> Dataset:
    """Digits split into train/test (stratified, fixed by ``split_seed``) and standardised with
    the training set's mean and standard deviation (constant pixels are left at 0)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:  # pragma: no cover - the cli extra installs it
        raise CLIError("the digits data set needs scikit-learn: pip install 'mithril[cli]'") from None
    if not 0 < test_size < 1:
        raise CLIError(f"--test-size must be between 0 and 1, got {test_size}")
    digits = load_digits()
    x, y = digits.data.astype(np.float64), digits.target.astype(np.int64)
    try:
        x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, stratify=y,
                                                  random_state=split_seed)
    except ValueError as exc:  # e.g. fewer test (or training) samples than classes
        raise CLIError(f"--test-size {test_size} and --split-seed {split_seed}: "
                       f"cannot split the {len(y)} digits ({exc})") from None
    mean, std = x_tr.mean(axis=0), x_tr.std(axis=0)
    std[std == 0] = 1.0
    return Dataset((x_tr - mean) / std, y_tr, (x_te - mean) / std, y_te, int(y.max()) + 1)
