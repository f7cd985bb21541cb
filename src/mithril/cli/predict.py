"""``mithril predict --run runs/NAME --data FILE.csv``: predictions of a model trained with
``mithril train --data``, written to a CSV file.

The run folder holds ``model.safetensors`` (the parameters) and ``preprocess.json`` (feature
names, standardisation statistics, class labels); the data must have the feature columns (by
name, in any order; other columns are ignored). Bad data is refused before anything runs, with
the messages of ``mithril train --data`` (exit status 2).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError
from .argtypes import in_path, look, out_path
from .common import HelpFormatter
from .errors import CLIError
from .report import check_out_file, ensure_writable_file, same_file, write_csv
from .run_types import r_squared
from .table_text import _is_float, _number
from .tabular import CHUNK_ROWS, MODEL_FILE, PREPROCESS_FILE, Preprocess, read_table

DESCRIPTION = """\
Predict with a model trained by `mithril train --data FILE --target COLUMN`. Reads --data
(a CSV, or a tab-separated .tsv, with the feature columns the model was trained on, or an
.npz, a .safetensors file or a folder of .npy files with X), standardises it
with the training statistics and writes --out (default: RUN/predictions.csv): one row per data
row, `row, prediction` and, for classification, the probability of each class (`p_<label>`).
If the data hold the target column too, the accuracy (or RMSE and R²) is printed; rows
whose target cell is empty are predicted all the same and left out of that score.
"""


#: the dtypes ``--dtype`` offers (half precision: what ``--mixed-precision`` computed in)
DTYPES = ("float32", "float64", "bfloat16", "float16")
#: the other files of a run folder, which --out must not replace either
RUN_LOGS = ("metrics.csv", "epochs.csv", "summary.json", "training.png",
            "checkpoint.safetensors", "sample.txt")
#: the dtype of a run whose model file records none (saved before it was recorded)
LEGACY_DTYPE = "float32"


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("predict", help="predict with a model trained by `mithril train --data`",
                       description=DESCRIPTION, usage="mithril predict --run DIR --data FILE "
                       "[options]", formatter_class=HelpFormatter)
    p.add_argument("--run", required=True, metavar="DIR", type=in_path,
                   help="the folder `mithril train --data` wrote (runs/NAME)")
    p.add_argument("--data", required=True, metavar="FILE", type=in_path,
                   help="FILE.csv, FILE.tsv (tab-separated), FILE.npz, FILE.safetensors or "
                        "a folder of X.npy (and y.npy)")
    p.add_argument("--out", metavar="FILE", type=out_path,
                   help="the CSV to write (default: RUN/predictions.csv)")
    p.add_argument("--backend", choices=("numpy", "jax", "torch"), default="numpy",
                   help="where the model runs (default: numpy)")
    p.add_argument("--dtype", choices=DTYPES,
                   help="the dtype to compute in (default: the one the run was trained in, "
                        "as its model file records: --dtype, or with --mixed-precision "
                        "bfloat16/float16; float32 for a run saved before it was recorded)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the run and the data, and stop before predicting or writing")
    p.set_defaults(func=run, no_progress=True, no_plot=True)
    return p


def _read_checkpoint(run_dir: Path, template: dict[str, Any] | None = None) -> dict[str, Any]:
    """``load_checkpoint`` of the run's model file, its errors as one CLIError line."""
    from ..utils.checkpoint import load_checkpoint

    try:
        return load_checkpoint(run_dir / MODEL_FILE, params_template=template)
    except FileNotFoundError:
        raise CLIError(f"--run {run_dir}: {MODEL_FILE} is missing") from None
    except OSError as exc:  # a folder of that name, no permission
        raise CLIError(f"--run {run_dir}: cannot read {MODEL_FILE} "
                       f"({exc.strerror or exc})") from None
    except CheckpointError as exc:  # truncated, altered: not a question of fitting
        raise CLIError(f"--run {run_dir}: {MODEL_FILE} is damaged ({exc})") from None
    # ShapeError is a ValueError; KeyMismatchError is a KeyError
    except (ValueError, KeyError) as exc:
        raise CLIError(f"--run {run_dir}: {MODEL_FILE} does not fit {PREPROCESS_FILE} "
                       f"({exc})") from None


def model_dtype(run_dir: Path, extra: Any, stored: set[str], dtype: str | None
                ) -> tuple[str, str | None]:
    """The dtype to predict in and a note to print (or None): ``dtype`` (``--dtype``) if
    given, else the one the run computed in, as its model file records it (``compute_dtype``);
    a file saved before that was recorded predicts in float32, as it did, with a note."""
    if dtype is not None:
        return dtype, None
    recorded = extra.get("compute_dtype") if isinstance(extra, dict) else None
    if recorded is not None:
        if recorded not in DTYPES:
            raise CLIError(f"--run {run_dir}: {MODEL_FILE} records the unknown compute dtype "
                           f"{recorded!r}; give --dtype ({', '.join(DTYPES)})")
        return recorded, None
    kept = ", ".join(sorted(stored))
    return LEGACY_DTYPE, (f"note: {MODEL_FILE} of {run_dir} does not record the dtype it was "
                          f"trained in (saved by an older mithril); predicting in "
                          f"{LEGACY_DTYPE} as before (its parameters are stored in {kept}: "
                          f"give --dtype to choose)")


def load_model(run_dir: Path, backend: str = "numpy", dtype: str | None = None
               ) -> tuple[Preprocess, Any, dict[str, Any], str | None]:
    """The run's preprocessing, the compiled model, its parameters in ``dtype`` (None: the
    dtype the run computed in; see :func:`model_dtype`) and a note to print (or None)."""
    import mithril as ml

    from .networks import mlp_spec
    from .training import make_backend

    if not look(Path.is_dir, run_dir, "--run"):
        raise CLIError(f"--run {run_dir}: no such folder")
    pre = Preprocess.load(run_dir / PREPROCESS_FILE)
    outputs = len(pre.labels) if pre.objective == "classification" else 1
    try:  # the network preprocess.json describes (an edited file: unknown activation, ...)
        spec = mlp_spec(len(pre.features), outputs, pre.hidden, pre.activation, pre.objective)
    except (ValueError, TypeError, KeyError) as exc:
        raise CLIError(f"--run {run_dir}: {PREPROCESS_FILE} is damaged (its network cannot "
                       f"be built: {exc})") from None
    raw = _read_checkpoint(run_dir)  # as stored: what it records, and its values
    stored = {str(np.asarray(v).dtype) for v in raw["params"].values()}
    dtype, note = model_dtype(run_dir, raw["extra"], stored, dtype)
    try:
        be = make_backend(backend, dtype, 0)
    except ValueError as exc:  # e.g. bfloat16 without ml_dtypes
        raise CLIError(f"--dtype {dtype} on --backend {backend}: {exc}") from None
    compiled = ml.compile(spec.model, be, shapes=spec.shapes, inference=True)
    with np.errstate(over="ignore"):  # a --dtype too narrow is named below
        ckpt = _read_checkpoint(run_dir, compiled.get_parameters())  # checked, cast to dtype
    saved = ckpt["extra"].get("preprocess_digest") if isinstance(ckpt["extra"], dict) else None
    if saved is not None and saved != pre.digest():  # (runs before the digest have none)
        raise CLIError(f"--run {run_dir}: {MODEL_FILE} was saved with another "
                       f"{PREPROCESS_FILE} (copied from another run, or edited); a run's two "
                       f"files go together")
    bad = [k for k, v in raw["params"].items() if not np.isfinite(np.asarray(v)).all()]
    if bad:  # a diverged run: its predictions would be NaN, argmax'ed to the first class
        raise CLIError(f"--run {run_dir}: {MODEL_FILE} holds inf/NaN weights ({', '.join(bad)})"
                       f": the training diverged (see its metrics.csv); train again, e.g. with "
                       f"a smaller --lr or --nonfinite skip")
    over = [k for k, v in ckpt["params"].items()
            if not np.isfinite(be.to_numpy(v).astype(np.float64)).all()]
    if over:  # finite as stored, not in a narrower --dtype
        raise CLIError(f"--dtype {dtype}: weights of {MODEL_FILE} overflow it "
                       f"({', '.join(over)}); predict in the run's own dtype (leave --dtype out)")
    return pre, compiled, ckpt["params"], note


#: rows evaluated at a time: a large file's activations (rows × the widest layer) stay small,
#: and chunks of this size run about 4x faster than one call on 300,000 rows (NumPy, measured)
PREDICT_ROWS = CHUNK_ROWS


def predict(pre: Preprocess, compiled: Any, params: dict[str, Any], x: np.ndarray
            ) -> np.ndarray:
    """Class probabilities (rows, classes), or regression predictions (rows,) in the
    target's units, for raw features ``x`` (:data:`PREDICT_ROWS` rows at a time; each row's
    result does not depend on the others)."""
    if len(x) > PREDICT_ROWS:
        return np.concatenate([predict(pre, compiled, params, x[i:i + PREDICT_ROWS])
                               for i in range(0, len(x), PREDICT_ROWS)])
    be = compiled.backend
    xs = pre.transform(x)
    if pre.objective == "classification":
        target = be.array(np.zeros(len(x), dtype=np.int64), be.int_dtype)
    else:
        target = be.array(np.zeros((len(x), 1)))
    out = compiled.evaluate(params, {"input": be.array(xs), "target": target})
    if pre.objective == "classification":
        logits = be.to_numpy(out["logits"]).astype(np.float64)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    return be.to_numpy(out["prediction"]).astype(np.float64)[:, 0] * pre.target_std \
        + pre.target_mean


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run)
    pre, compiled, params, note = load_model(run_dir, args.backend, args.dtype)
    if note:
        print(note)
    table = read_table(args.data, pre.target, pre.features, missing=pre.impute is not None)
    out = Path(args.out) if args.out else run_dir / "predictions.csv"
    for what, keep in (("--data", Path(args.data)), ("the run's model", run_dir / MODEL_FILE),
                       ("the run's preprocessing", run_dir / PREPROCESS_FILE),
                       *((f"the run's {name}", run_dir / name) for name in RUN_LOGS)):
        if same_file(out, keep):  # the predictions would replace what they come from
            raise CLIError(f"--out {out} is {what} ({keep}); give another file, such as "
                           f"{run_dir / 'predictions.csv'}")
    if not args.dry_run:
        ensure_writable_file(out, example="predictions.csv")
    else:
        check_out_file(out, example="predictions.csv")
    print(f"mithril predict: {len(table.x)} rows of {args.data} with the {pre.objective} model "
          f"of {run_dir} in {compiled.backend.dtype}")
    if args.dry_run:
        print(f"dry run: would write {out}")
        return 0
    result = predict(pre, compiled, params, table.x)
    broken = ~np.isfinite(result.reshape(len(result), -1)).all(axis=1)
    if broken.any():  # overflow in the compute dtype: features far outside the training range?
        print(f"warning: {int(broken.sum())} row(s) (the first: row {int(broken.argmax()) + 1}) "
              f"give inf/NaN outputs in {compiled.backend.dtype} (features far outside the "
              f"training range, or too large for the dtype?)"
              + (": their prediction is left empty and counts as wrong"
                 if pre.objective == "classification" else ""))
    if pre.objective == "classification":
        # (not the first class, which argmax takes for NaN: as `mithril train` counts them)
        pred = [None if b else pre.labels[i] for i, b in zip(result.argmax(axis=1), broken)]
        names = [f"p_{label}" for label in pre.labels]
        # (a generator: the rows are written as made, not held as one dict each)
        rows: Iterable[dict[str, Any]] = (
            {"row": i, "prediction": p, **dict(zip(names, probs))}
            for i, (p, probs) in enumerate(zip(pred, result.tolist()), start=1))
        fields = ["row", "prediction", *names]
    else:
        pred = result.tolist()
        rows = ({"row": i, "prediction": v} for i, v in enumerate(pred, start=1))
        fields = ["row", "prediction"]
    write_csv(out, rows, fields)
    if table.y is not None:
        print(score(pre, pred, table.y, table.y_text))
    print(f"wrote {out}")
    return 0


def score(pre: Preprocess, pred: list[Any], truth: list[Any | None],
          text: list[str | None] | None = None) -> str:
    """Accuracy, or RMSE and R², against the target column found in the data; rows whose
    target is missing (None) are left out, and the line says how many. ``text``: the target
    as written, which text class labels are compared with (else ``truth``)."""
    if text is None:
        text = [None if t is None else str(t) for t in truth]
    kept = [(p, t, w) for p, t, w in zip(pred, truth, text) if t is not None]
    blank = len(truth) - len(kept)
    if not kept:
        return f"({pre.target!r} is empty in every row: no score)"
    note = f" ({len(kept)} rows; {blank} without a {pre.target!r} value left out)" if blank \
        else ""
    if pre.objective == "classification":
        return _accuracy(pre, [p for p, _, _ in kept], [t for _, t, _ in kept],
                         [w for _, _, w in kept]) + note
    return _score(pre, [p for p, _, _ in kept], [t for _, t, _ in kept]) + note


def _accuracy(pre: Preprocess, pred: list[Any], truth: list[Any], text: list[Any]) -> str:
    """The share of rows whose class is the predicted one: text labels (a model trained on
    text classes) compared as written, number labels as numbers ('1.0' is class 1); rows of
    classes the model was not trained on, and rows without a prediction (None: inf/NaN
    outputs), count as wrong, and the line says how many of the former."""
    if any(isinstance(v, str) for v in pre.labels):
        known: set[Any] = set(pre.labels)
        given = [str(w) for w in text]
        same = [p is not None and str(p) == w for p, w in zip(pred, given)]
    else:  # a text cell of a number-label model ('1' among 'x' cells) is read as a number
        given = [t if not isinstance(t, str) else _as_number(t) for t in truth]
        # (exact: Python compares an int label beyond 2**53 with a float exactly)
        known = set(pre.labels)
        same = [g is not None and p is not None and g == p for p, g in zip(pred, given)]
    line = f"accuracy against {pre.target!r}: {np.mean(same):.2%}"
    unknown = [w for g, w in zip(given, text) if g not in known]
    if unknown:
        shown = ", ".join(repr(v) for v in sorted(set(unknown))[:5])
        line += (f" ({len(unknown)} row(s) of class(es) the model was not trained on, "
                 f"{shown}{', ...' if len(set(unknown)) > 5 else ''}: counted as wrong)")
    return line


def _as_number(text: str) -> float | None:
    return _number(text)


def _score(pre: Preprocess, pred: list[Any], truth: list[Any]) -> str:
    # (one cell that is not a finite number leaves every cell a string: Table.y)
    bad = next((t for t in truth if isinstance(t, str) and _number(t) is None), None)
    if bad is not None:  # text, or a number that is not finite ('inf': not text)
        what = "a number that is not finite" if _is_float(bad) else "text"
        return f"({pre.target!r} holds {what}, {bad!r}: no RMSE)"
    y, p = np.asarray(truth, dtype=np.float64), np.asarray(pred)
    sse, sst = float(np.sum((p - y) ** 2)), float(np.sum((y - y.mean()) ** 2))
    return (f"against {pre.target!r}: RMSE {np.sqrt(sse / len(y)):.4g}, "
            f"R² {r_squared(sse, sst):.4f}")
