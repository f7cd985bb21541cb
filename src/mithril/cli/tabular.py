"""``mithril train --data FILE.csv --target COLUMN`` (or ``FILE.tsv``, tab-separated, or
``FILE.npz``): an MLP on the user's table, and what ``mithril predict`` needs to use it.

Reading checks everything before any work: a missing file, a target column that does not
exist, a row with the wrong number of cells, a missing value (an empty cell, ``NA``, ``NaN``,
``null``, ``?``, Excel's ``#N/A``: :data:`.table_text.MISSING`) or a feature that is not a
finite number is a :class:`~mithril.cli.errors.CLIError` naming the file, the column and the
row (data rows are counted from 1 after the header; the file line is given too).

Classification or regression is inferred from the target (``--objective`` overrides): text
values, or at most :data:`MAX_INFERRED_CLASSES` distinct integers, are classes; other numbers
are a regression target. Features are standardised with the training split's mean and standard
deviation (a constant column, or one constant but for rounding, is left at 0, as
StandardScaler leaves it); a regression target too (RMSE and R² are reported in its own units). The split is seeded (``--split-seed``) and stratified when every class has two
rows at least.

The run folder gets ``model.safetensors`` (the parameters, written with
:func:`mithril.utils.checkpoint.save_checkpoint`: no pickle) and ``preprocess.json`` (feature
names, standardisation statistics, objective, class labels, the network's shape).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .data import Dataset
from .errors import CLIError
from .networks import mlp_spec
from .preprocess import Preprocess
from .table_arrays import _strings, holds_arrays, load_arrays
from .table_text import (
    _case_hint,
    _duplicates,
    _is_float,
    _looks_like_data,
    _missing,
    _names,
    _not_number_hint,
    _not_utf8,
    _number,
    _plain,
    _separator_hint,
    _target_hint,
    nfc,
    written_number_hint,
)

#: at most this many distinct integer targets are taken for classes
MAX_INFERRED_CLASSES = 20
MAX_CLASSES = 1000
#: a target of numbers but for at most this many text cells (a typo: '1.2.3', '-') is
#: warned of: it is taken for classes, as text is
STRAY_CELLS = 2
MODEL_FILE, PREPROCESS_FILE = "model.safetensors", "preprocess.json"
#: rows evaluated at a time (the metrics after each epoch, predict): a large table's
#: activations stay small, and NumPy runs chunks of this size about 4x faster than one call
#: on 300,000 rows; a smaller set is evaluated in one call, as before
CHUNK_ROWS = 16384
#: the text tables by suffix -> their separator (any other suffix but .npz is read as a CSV)
SEPARATORS = {".csv": ",", ".tsv": "\t", ".tab": "\t"}


def separator_of(path: str) -> str:
    """The cell separator of the text table ``path``: a tab for ``.tsv``/``.tab``, else a
    comma."""
    return SEPARATORS.get(Path(path).suffix.lower(), ",")


@dataclass
class Table:
    """Features as float64 (rows, columns), and the raw target values (or None)."""

    path: str
    features: list[str]
    x: np.ndarray
    target: str | None
    #: floats where every value is a number, else strings; for predict (``features`` given)
    #: None where the target cell is missing: such rows are predicted but not scored
    y: list[Any] | None
    #: the target's values as written (stripped; None where missing): predict compares text
    #: class labels with them ('2.50' is a label of its own, not the number 2.5)
    y_text: list[str | None] | None = None
    #: the file line of each target value (a text table), for messages
    y_lines: list[int] | None = None


def read_csv(path: str, target: str | None, features: list[str] | None = None,
             missing: bool = False) -> Table:
    """Read and check ``path`` (comma-separated, or tab-separated: see :func:`separator_of`),
    with the same rules either way: the columns ``features`` (default: every column but
    ``target``) must be numbers, ``target`` (None: not read; ``features`` given: read if
    present) any non-missing value; with ``features`` given (predict) a missing target value
    is None instead of an error (the target is optional there). ``missing`` (``--impute``):
    a missing feature cell is NaN instead of an error."""
    read = 0  # the file's lines read into complete rows (a bad row starts after them)
    sep = separator_of(path)
    blocks: _Blocks | None = None
    holes: dict[str, list[str]] = {}  # column -> the rows missing it (all named at once)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            # strict: an unclosed quote is an error, not a cell that swallows the rest of the file
            reader = csv.reader(f, strict=True, delimiter=sep)
            header = next(reader, None)
            while header is not None and len(header) <= 1 and not "".join(header).strip():
                header = next(reader, None)  # blank lines above the header are skipped too
            read = reader.line_num
            if header is None or not any(h.strip() for h in header):
                raise CLIError(f"--data {path}: empty file, or no header row")
            # names in Unicode's composed form (NFC), as --target and a model's features
            header = [nfc(h.strip()) for h in header]
            target = None if target is None else nfc(target)
            features = None if features is None else [nfc(f) for f in features]
            # training: a data row would be lost as the header (predict finds its columns by
            # name, so a header of numbers, e.g. years, is one there)
            if features is None and all(_is_float(h) for h in header):
                raise CLIError(f"--data {path}: line {read} holds only numbers "
                               f"({_names(header, 5)}): the file has no header row? Add one "
                               f"naming the columns (--target names one of them)")
            # a dict, not list.index: tables of 20,000 columns (genes, pixels) are common
            position = {h: i for i, h in enumerate(header)}
            want_target = target is not None and (features is None or target in position)
            if target is not None and features is None and target not in position:
                raise CLIError(f"--target {target!r} is not a column of {path} (columns: "
                               f"{_names(header)}){_separator_hint(header, sep)}"
                               f"{_target_hint(target, header)}")
            if features is None and "" in position:  # a feature named '' (pandas' row index)
                raise CLIError(f"--data {path}: column {header.index('') + 1} has no name "
                               f"in the header row (the index pandas writes without "
                               f"to_csv(index=False), or a trailing "
                               f"{'tab' if sep == chr(9) else 'comma'}?); name it or remove it")
            dup = _duplicates(header)
            if features is not None:  # predict reads its columns only; the others are ignored
                dup = [d for d in dup if d == target or d in features]
            if dup:
                raise CLIError(f"--data {path}: duplicate column name(s) "
                               f"{_names([repr(d) for d in dup])}")
            scoring = features is not None  # predict: the target column is optional
            if features is None:
                features = [h for h in header if h != target]
            if not features:
                raise CLIError(f"--data {path}: no feature columns (the only column is the "
                               f"target {target!r}); a model needs at least one")
            absent = [c for c in features if c not in position]
            if absent:
                raise CLIError(f"--data {path} lacks the feature column(s) "
                               f"{_names([repr(c) for c in absent])} (the model was trained "
                               f"on {_names(features)}){_separator_hint(header, sep)}"
                               f"{_case_hint(absent, header)}"
                               + ("; its line 1 holds only numbers: no header row?"
                                  if all(_is_float(h) for h in header) else ""))
            cols = [position[c] for c in features]
            tcol = position[target] if want_target else None
            blocks = _Blocks(path, features, cols)
            ys: list[str | None] = []
            lines: list[int] = []
            i = 0  # data rows, blank lines not counted (the row numbers of predictions.csv)
            for row in reader:
                start, read = read + 1, reader.line_num
                if not row or (len(row) == 1 < len(header) and not row[0].strip()):
                    continue  # a blank line, or one of spaces (in a one-column file: a cell)
                i += 1
                if len(row) != len(header):
                    blocks.flush(holes)  # a bad cell above it is named first
                    trailing = len(row) == len(header) + 1 and not row[-1].strip()
                    raise CLIError(f"--data {path}: row {i} (line {start}) has {len(row)} "
                                   f"cells, the header {len(header)}"
                                   + (f" (its last is empty: a trailing "
                                      f"{'tab' if sep == chr(9) else 'comma'} ends the data "
                                      f"rows? remove it)" if trailing else ""))
                blocks.add(row, start, holes)
                if tcol is not None:
                    cell = row[tcol].strip()
                    lines.append(start)
                    if _missing(cell) and scoring:
                        ys.append(None)  # predicted, left out of the score
                        continue
                    if _missing(cell):
                        blocks.flush(holes)
                        raise CLIError(f"--data {path}: missing value in the target column "
                                       f"{target!r}, row {i} (line {start})")
                    if not scoring and _number(cell) is None and _is_float(cell):
                        # 'inf' would otherwise turn a numeric target into text labels
                        blocks.flush(holes)
                        raise CLIError(f"--data {path}: target column {target!r}, row {i} "
                                       f"(line {start}): {cell!r} is not a finite number")
                    ys.append(cell)
            blocks.flush(holes)
    except OSError as exc:
        raise CLIError(f"--data {path}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        if blocks is not None:
            blocks.flush(holes)  # a bad cell above the line is named first
        raise CLIError(f"--data {path}: {_not_utf8(path, exc)}") from None
    except csv.Error as exc:
        if blocks is not None:
            blocks.flush(holes)
        hint = "; a quoted cell is never closed" if "end of data" in str(exc) else \
            "; a quote opened on this line is never closed?" if "field limit" in str(exc) else \
            "; text (a space?) follows a closing quote" if "expected after" in str(exc) else ""
        raise CLIError(f"--data {path}: line {read + 1}: not a readable CSV row "
                       f"({exc}{hint})") from None
    if holes and not missing:
        raise CLIError(_missing_message(path, holes, scoring))
    assert blocks is not None
    if not blocks.rows:
        raise CLIError(f"--data {path}: no data rows")
    if tcol is not None and not scoring and _looks_like_data(header) and target in ys:
        # UCI's iris.data: numbers and a class, the class a value of its column too (a
        # header of wavelengths, 908.1, 909.7, ..., protein, names a column of numbers)
        raise CLIError(f"--data {path}: line 1 holds numbers such as "
                       f"{next(h for h in header if _is_float(h))!r} ({_names(header, 5)}), "
                       f"and {target!r} is a value of its column too: the file has no header "
                       f"row? Add one naming the columns (--target names one of them)")
    x = blocks.array()
    return Table(path, features, x, target if tcol is not None else None,
                 _typed(ys) if tcol is not None else None, ys if tcol is not None else None,
                 lines if tcol is not None else None)


#: data rows whose feature cells are held as text before they are converted to float64 at once
BLOCK_ROWS = 4096


class _Blocks:
    """The feature cells of a text table, converted to float64 a block of rows at a time: the
    text of at most :data:`BLOCK_ROWS` rows is held (a table of Python floats would take four
    times the memory of the array, plus the copy to it), and one ``float`` over a block's cells
    reads them as :func:`.table_text._number` does cell by cell, which is left for a block
    holding a missing or non-finite value, to name it."""

    def __init__(self, path: str, features: list[str], cols: list[int]) -> None:
        self.path, self.features, self.cols = path, features, cols
        self.cells: list[str] = []
        self.lines: list[int] = []  # the file line each held row starts on
        self.blocks: list[np.ndarray] = []
        self.rows = 0  # rows converted

    def add(self, row: list[str], line: int, holes: dict[str, list[str]]) -> None:
        self.cells.extend(map(row.__getitem__, self.cols))
        self.lines.append(line)
        if len(self.lines) >= BLOCK_ROWS:
            self.flush(holes)

    def flush(self, holes: dict[str, list[str]]) -> None:
        """Convert the rows held; missing cells are added to ``holes`` (column -> rows), any
        other cell that is not a finite number is a CLIError naming it."""
        if not self.lines:
            return
        cells, nf = self.cells, len(self.features)
        try:
            block = np.fromiter(map(float, cells), np.float64, len(cells))
            # (float takes '1_000' and other scripts' digits too: cell by cell, they are text)
            fine = bool(np.isfinite(block).all()) and _plain("".join(cells))
        except ValueError:
            fine = False
        if not fine:  # cell by cell: the missing ones are counted, the first bad one named
            block = np.empty(len(cells))
            for k, cell in enumerate(cells):
                v = _number(cell)
                if v is not None:
                    block[k] = v
                    continue
                r, c = divmod(k, nf)
                where = f"row {self.rows + r + 1} (line {self.lines[r]})"
                if not _missing(cell):
                    raise CLIError(f"--data {self.path}: column {self.features[c]!r}, {where}: "
                                   f"{cell.strip()!r} is not a finite number "
                                   f"({_not_number_hint(cell)})")
                holes.setdefault(self.features[c], []).append(where)
                block[k] = math.nan
        self.blocks.append(block.reshape(-1, nf))
        self.rows += len(self.lines)
        self.cells, self.lines = [], []

    def array(self) -> np.ndarray:
        """The rows converted, (rows, features)."""
        if len(self.blocks) == 1:
            return self.blocks[0]
        return np.concatenate(self.blocks) if self.blocks else \
            np.empty((0, len(self.features)))


def _missing_message(path: str, holes: dict[str, list[str]], predicting: bool) -> str:
    """Every column with missing cells and its count, what to do (the model takes numbers only,
    and neither command guesses a value: a fill is preprocessing of its own, to repeat the same
    at prediction), then the first missing cell."""
    cells = sum(len(w) for w in holes.values())
    counts = ", ".join(f"{name!r} ({len(w)})" for name, w in holes.items())
    fix = ("fill them as the training data were filled" if predicting else
           "drop those rows or fill the cells first (pandas: df.dropna(), or "
           "df.fillna(df.mean(numeric_only=True)) and the same fill before `mithril predict`; "
           "then df.to_csv(path, index=False)), or give --impute mean (the training rows' mean, "
           "which predict fills in too)")
    name, where = next((n, w[0]) for n, w in holes.items())
    return (f"--data {path}: {cells} missing value{'s' * (cells != 1)} (empty, NA, NaN, ...) in "
            f"{counts}: the model takes numbers only; {fix}. The first: missing value in "
            f"column {name!r}, {where}")


def _typed(values: list[str | None]) -> list[Any]:
    """Floats if every value is a number, else the strings (None, a missing value, stays); a
    whole number written without a fraction beyond 2**53 (an identifier, a class code) is kept
    as an exact int, which a float would round."""
    numbers: list[Any] = [None if v is None else _number(v) for v in values]
    if any(n is None and v is not None for n, v in zip(numbers, values)):
        return values
    for k, (n, v) in enumerate(zip(numbers, values)):
        if n is not None and abs(n) >= 2**53 and v is not None:
            with contextlib.suppress(ValueError):
                numbers[k] = int(v)
    return numbers


def read_npz(path: str, target: str | None, features: list[str] | None = None,
             missing: bool = False) -> Table:
    """``X`` (rows, features) and the target array (``y``, or ``target``) of an ``.npz``, a
    ``.safetensors`` file or a folder of ``.npy`` files (:func:`.table_arrays.load_arrays`;
    ``feature_names`` if it holds them); no pickled objects. ``missing``: NaN features are
    kept (``--impute``), an infinite one is refused all the same."""
    name = target or "y"
    arrays = load_arrays(path)
    if "X" not in arrays:
        near = next((k for k in arrays if k.lower() in ("x", "x_train", "features", "data")),
                    None)  # x (names are case-sensitive), Keras datasets' x_train, ...
        hint = f"; save the features as X, e.g. np.savez(path, X={near}, y=...)" if near else ""
        raise CLIError(f"--data {path}: no array 'X' (it holds {', '.join(arrays) or 'nothing'})"
                       f"{hint}")
    x = arrays["X"]
    if x.ndim != 2 or x.dtype.kind not in "biuf":
        hint = " (images or sequences: the MLP takes X.reshape(len(X), -1))" \
            if x.ndim > 2 and x.dtype.kind in "biuf" else \
            " (one feature: save X.reshape(-1, 1), as scikit-learn asks)" \
            if x.ndim == 1 and x.dtype.kind in "biuf" else ""
        raise CLIError(f"--data {path}: 'X' must be a 2-d array of numbers, got {x.dtype} "
                       f"{x.shape}{hint}")
    names = [f"x{i}" for i in range(x.shape[1])]
    if "feature_names" in arrays:
        fn = arrays["feature_names"]
        if fn.ndim != 1 or fn.dtype.kind not in "US":
            raise CLIError(f"--data {path}: 'feature_names' must be a 1-d array of strings, got "
                           f"{fn.dtype} {fn.shape}")
        names = [nfc(n) for n in _strings(fn)]
        dup = _duplicates(names)
        if features is not None:  # predict picks its columns; the others are ignored
            dup = [d for d in dup if d in features]
        if dup:
            raise CLIError(f"--data {path}: duplicate feature name(s) {', '.join(map(repr, dup))}")
    if len(names) != x.shape[1]:
        raise CLIError(f"--data {path}: {len(names)} feature_names for {x.shape[1]} columns")
    if features is not None:  # predict: the model's columns by name, as in a CSV
        features = [nfc(f) for f in features]
        if "feature_names" not in arrays and names != features:
            raise CLIError(f"--data {path}: 'X' has {len(names)} columns and no "
                           f"'feature_names'; the model was trained on {len(features)} "
                           f"([{_names(features)}]): save feature_names=... to pick them")
        absent = [c for c in features if c not in names]
        if absent:
            raise CLIError(f"--data {path} lacks the feature(s) {_names([repr(c) for c in absent])}"
                           f" (the model was trained on {_names(features)})")
        position = {n: i for i, n in enumerate(names)}
        x, names = x[:, [position[c] for c in features]], list(features)
    elif not names:
        raise CLIError(f"--data {path}: 'X' has no feature columns (shape {x.shape}); a model "
                       f"needs at least one")
    x = x.astype(np.float64)
    bad = np.argwhere(np.isinf(x))
    if len(bad):
        r, c = bad[0]
        raise CLIError(f"--data {path}: missing or non-finite value in column {names[c]!r}, "
                       f"row {r + 1} ({x[r, c]})")
    if not missing and np.isnan(x).any():  # counted per column, with the fix, as in a CSV
        holes = {names[c]: [f"row {r + 1}" for r in np.flatnonzero(np.isnan(x[:, c]))]
                 for c in np.flatnonzero(np.isnan(x).any(axis=0))}
        raise CLIError(_missing_message(path, holes, features is not None))
    y: list[Any] | None = None
    raw: list[str | None] | None = None
    if features is None or name in arrays:
        if name not in arrays:
            raise CLIError(f"--target {name!r}: {path} has no array {name!r} (it holds "
                           f"{', '.join(arrays)})")
        yarr = arrays[name]
        if yarr.ndim != 1 or len(yarr) != len(x):
            hint = f" (a column: save {name}.ravel(); one-hot rows: {name}.argmax(axis=1))" \
                if yarr.ndim == 2 and len(yarr) == len(x) else ""
            raise CLIError(f"--data {path}: {name!r} must be 1-d with one value per row of X "
                           f"({len(x)}), got shape {yarr.shape}{hint}")
        if yarr.dtype.kind not in "biufUS":  # dates, complex numbers, records: no target
            raise CLIError(f"--data {path}: {name!r} must hold numbers or strings, got "
                           f"{yarr.dtype}")
        if yarr.dtype.kind in "US":  # a missing value as in a CSV cell ('', 'NA', ...)
            raw = [None if _missing(v) else v.strip() for v in _strings(yarr)]
        else:
            raw = [str(v) for v in yarr.tolist()] if yarr.dtype.kind in "iu" else \
                [str(v) if math.isfinite(v) else None for v in yarr.astype(np.float64)]
        if features is None and None in raw:
            raise CLIError(f"--data {path}: missing value in the target {name!r}, row "
                           f"{raw.index(None) + 1}")
        # predict: a missing target is predicted but not scored
        y = _typed(raw)
    if not len(x):
        raise CLIError(f"--data {path}: no data rows")
    return Table(path, names, x, name if y is not None else None, y, raw)


def read_table(path: str, target: str | None, features: list[str] | None = None,
               missing: bool = False) -> Table:
    """The table ``path``: arrays (:func:`.table_arrays.holds_arrays`: ``.npz``,
    ``.safetensors``, a folder of ``.npy``) or a text table (``.csv``, ``.tsv``, ...)."""
    if holds_arrays(path):
        return read_npz(path, target, features, missing)
    if Path(path).suffix.lower() == ".npy":  # else read as a CSV: "not UTF-8 text"
        raise CLIError(f"--data {path}: an .npy holds one array; save the features (and the "
                       f"target) as an .npz: np.savez('data.npz', X=..., y=...), or put X.npy "
                       f"and y.npy in a folder and give the folder")
    return read_csv(path, target, features, missing)


def infer_objective(y: list[Any]) -> str:
    if any(isinstance(v, str) for v in y):
        return "classification"
    distinct = set(y)
    if all(float(v).is_integer() for v in distinct) and len(distinct) <= MAX_INFERRED_CLASSES:
        return "classification"
    return "regression"


def _label(v: Any) -> Any:
    """A class label for JSON and the predictions: integers stay integers."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def tabular_job(args: argparse.Namespace) -> Any:
    from .tasks import Job

    impute = getattr(args, "impute", None)
    table = read_table(args.data, args.target, missing=impute is not None)
    assert table.y is not None
    objective = args.objective or infer_objective(table.y)
    n = len(table.y)
    text = [i for i, v in enumerate(table.y) if isinstance(v, str) and _number(v) is None]
    if text and args.objective is None and all(written_number_hint(table.y[i]) for i in text):
        # numbers as spreadsheets write them ('1,234.5', '3,5', '$12', '5%'): else one class
        # per value, silently
        raise CLIError(f"--data {table.path}: the target {table.target!r} holds "
                       f"{table.y[text[0]]!r} in row {text[0] + 1}: "
                       f"{written_number_hint(table.y[text[0]])} (--objective classification "
                       f"takes such values as class labels)")
    if objective == "regression":
        if text:
            bad = table.y[text[0]]
            hint = f" ({written_number_hint(bad)})" if written_number_hint(bad) else ""
            raise CLIError(f"--objective regression: the target {table.target!r} of "
                           f"{table.path} has the non-numeric value {bad!r} in row "
                           f"{text[0] + 1}{hint}")
        labels: list[Any] = []
        y = np.asarray(table.y, dtype=np.float64)
    else:
        labels = sorted(set(table.y), key=lambda v: (isinstance(v, str), v))
        if not 2 <= len(labels) <= MAX_CLASSES:
            only = f" (its {n} row{'s' * (n != 1)} all hold {_label(labels[0])!r})" \
                if len(labels) == 1 else ""
            raise CLIError(f"classification needs 2 to {MAX_CLASSES} classes; the target "
                           f"{table.target!r} has {len(labels)}{only}")
        index = {v: i for i, v in enumerate(labels)}
        y = np.array([index[v] for v in table.y], dtype=np.int64)
    tr, te = split(y, objective, args.test_size, args.split_seed, table.path)
    x_tr, x_te = table.x[tr], table.x[te]
    fill, holes = None, int(np.isnan(table.x).sum())
    if impute is not None:  # scikit-learn's SimpleImputer(strategy="mean") on the training rows
        fill = impute_values(x_tr, table.features, table.path)
        x_tr, x_te = (np.where(np.isnan(a), fill, a) for a in (x_tr, x_te))
    mean, std = mean_std(x_tr)
    t_mean = t_std = 0.0
    if objective == "regression":
        t_mean, t_std = (float(v[0]) for v in mean_std(y[tr][:, None]))
        y = ((y - t_mean) / t_std)[:, None]
    data = Dataset((x_tr - mean) / std, y[tr], (x_te - mean) / std, y[te], len(labels))
    spec = replace(mlp_spec(len(table.features), len(labels) or 1, args.hidden, args.activation,
                            objective, t_std or 1.0), eval_chunk=CHUNK_ROWS)
    pre = Preprocess(table.features, mean.tolist(), std.tolist(), objective,
                     str(table.target), [_label(v) for v in labels], t_mean, t_std,
                     list(args.hidden), args.activation, None if fill is None else fill.tolist())
    what = f"{len(labels)} classes" if labels else f"regression on {table.target!r}"
    if args.objective is None and len(labels) > 2 and not any(isinstance(v, str) for v in labels):
        # ages, counts, prices in whole units: a newcomer may have meant a number
        what += (f" (its {len(labels)} distinct whole numbers taken for classes; --objective "
                 f"regression predicts a number)")
    elif args.objective is None and not labels and all(float(v).is_integer() for v in table.y):
        # class codes (products, regions, ...): scikit-learn's type_of_target says multiclass
        what += (f" (its {len(set(table.y))} distinct whole numbers taken for a number to "
                 f"predict, more than {MAX_INFERRED_CLASSES}; --objective classification takes "
                 f"them for classes)")
    describe = (f"{table.path}: {len(tr)} train / {len(te)} test rows of {n}, "
                f"{len(table.features)} features, {what}")
    if fill is not None:
        describe += (f"; {holes} missing value{'s' * (holes != 1)} filled with the training "
                     f"rows' mean of {'its' if holes == 1 else 'their'} feature (--impute mean)")
    if args.objective is None and text and len(text) <= STRAY_CELLS and n - len(text) >= 10:
        # a typo ('1.2.3', '-') in a column of numbers: one class per value, silently
        where = ", ".join(f"{table.y[i]!r} in row {i + 1}" + (
            f" (line {table.y_lines[i]})" if table.y_lines else "") for i in text)
        describe += (f" (warning: the target {table.target!r} is numbers but for {where}, "
                     f"so its values are taken for class labels; fix or drop "
                     f"{'that row' if len(text) == 1 else 'those rows'}, or give --objective "
                     f"regression, which refuses such a cell)")
    unseen = sorted(set(y[te].tolist()) - set(y[tr].tolist())) if labels else []
    if unseen:  # rare classes (or an identifier taken for the target): say so, train anyway
        shown = _names([repr(_label(labels[i])) for i in unseen], 5)
        describe += (f" (warning: {int(np.isin(y[te], unseen).sum())} test row(s) of "
                     f"class(es) {shown} that no training row has: it cannot learn them)")

    def write(run: Any, folder: Path) -> list[Path]:
        from ..utils.checkpoint import save_checkpoint
        from .report import write_json
        from .training import MIXED_PRECISION

        # the weights the final metrics measure (schedule-free: the averaged ones)
        # the dtype the model computed in (predict computes in it); mixed precision's compute
        # dtype, its parameters being the float32 masters
        cfg = run.cfg
        save_checkpoint(folder / MODEL_FILE, run.saved_params(),
                        extra={"preprocess": PREPROCESS_FILE, "preprocess_digest": pre.digest(),
                               "compute_dtype": MIXED_PRECISION[cfg.mixed_precision] or cfg.dtype,
                               "mixed_precision": cfg.mixed_precision})
        return [folder / MODEL_FILE, write_json(folder / PREPROCESS_FILE, pre.as_dict())]

    settings = {"data": str(table.path), "target": table.target, "objective": objective,
                "features": len(table.features), "classes": len(labels)}
    if impute is not None:  # (absent otherwise: runs from before the flag resume as they were)
        settings["impute"] = impute
    return Job("tabular", data, spec, describe, settings, write=write)


def impute_values(x: np.ndarray, features: list[str], path: str) -> np.ndarray:
    """Each feature's mean over the training rows ``x`` that have it (NaN: missing), as
    scikit-learn's ``SimpleImputer(strategy="mean")`` fits it; a feature that no training row
    has is a CLIError (SimpleImputer drops such a column, which predict could not match)."""
    seen = ~np.isnan(x)
    empty = [f for f, k in zip(features, seen.sum(axis=0)) if k == 0]
    if empty:
        raise CLIError(f"--impute mean: the feature(s) {_names([repr(f) for f in empty])} of "
                       f"{path} have no value in any training row; drop them")
    # the mean of the values present, on the columns scaled by a power of two as in mean_std
    # (exact: no overflow of the sum near 1e308)
    peak = np.nanmax(np.abs(x), axis=0)
    exp = np.frexp(np.where(peak > 0, peak, 1.0))[1]
    return np.ldexp(np.nanmean(np.ldexp(x, -exp), axis=0), exp)


def mean_std(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column means and standard deviations (ddof 0, as StandardScaler; a constant column's is
    1, and so is that of a column constant but for rounding: 0.7 in every row has a standard
    deviation of 1e-16, which StandardScaler's bound on the rounding error of the variance takes
    for 0, else a new value such as 0.75 would be standardised to 4e14). Computed on the columns
    scaled by a power of two, which is exact, so that values near 1e200 do not overflow the
    squares to an inf standard deviation (a column silently set to 0, and a preprocess.json that
    predict cannot use)."""
    peak = np.abs(a).max(axis=0) if len(a) else np.zeros(a.shape[1])
    exp = np.frexp(np.where(peak > 0, peak, 1.0))[1]
    scaled = np.ldexp(a, -exp)
    mean, std = scaled.mean(axis=0), scaled.std(axis=0)
    # scikit-learn's _is_constant_feature (the bound is the same on the scaled columns)
    n, eps = len(a), np.finfo(np.float64).eps
    constant = std**2 <= n * eps * std**2 + (n * mean * eps) ** 2
    mean, std = np.ldexp(mean, exp), np.ldexp(std, exp)
    std[constant | (std == 0)] = 1.0
    return mean, std


def split(y: np.ndarray, objective: str, test_size: float, seed: int,
          path: str) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the train and test splits: seeded, stratified when every class has two
    rows at least."""
    from sklearn.model_selection import train_test_split

    if not 0 < test_size < 1:
        raise CLIError(f"--test-size must be between 0 and 1, got {test_size}")
    idx = np.arange(len(y))
    strat = None
    if objective == "classification" and np.bincount(y).min() >= 2:
        strat = y
    try:
        try:
            tr, te = train_test_split(idx, test_size=test_size, random_state=seed, stratify=strat)
        except ValueError:  # e.g. fewer test rows than classes: split without stratifying
            tr, te = train_test_split(idx, test_size=test_size, random_state=seed)
    except ValueError as exc:
        raise CLIError(f"--data {path}: cannot split its {len(y)} rows with --test-size "
                       f"{test_size} ({exc})") from None
    if len(tr) < 2 or len(te) < 1:
        raise CLIError(f"--data {path}: {len(y)} rows are too few to split into training and "
                       f"test rows")
    return np.sort(tr), np.sort(te)
