"""The cells of a text table (``mithril train --data FILE.csv``) and the hints of its error
messages: what counts as a number or a missing value, and why a file that does not read as
expected probably does not (another separator, a decimal comma, no header row, not UTF-8)."""

from __future__ import annotations

import contextlib
import math
import unicodedata
from collections import Counter

#: missing-value markers, compared lower-cased: pandas' ``read_csv`` defaults (Excel's ``#N/A``
#: among them: read as text, it would turn a numeric target into one class per value) and ``?``
MISSING = frozenset({"", "na", "n/a", "nan", "-nan", "null", "none", "?", "#n/a", "#n/a n/a",
                     "#na", "<na>", "1.#ind", "-1.#ind", "1.#qnan", "-1.#qnan"})


def _plain(text: str) -> bool:
    """Whether ``text`` may be a number as pandas' ``read_csv`` reads one: ASCII, no ``_``
    (Python's ``float`` also takes ``1_000`` and other scripts' digits, such as ``٣``, which
    pandas keeps as text)."""
    return text.isascii() and "_" not in text


def _number(text: str) -> float | None:
    if not _plain(text.strip()):
        return None
    try:
        v = float(text)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def nfc(name: str) -> str:
    """A column name in Unicode's composed form (NFC): 'é' typed as one character or as 'e'
    and a combining accent (as macOS writes file names) are the same name."""
    return unicodedata.normalize("NFC", name)


def _duplicates(names: list[str]) -> list[str]:
    return sorted(n for n, k in Counter(names).items() if k > 1)


def _names(names: list[str], limit: int = 20) -> str:
    """``names`` for a message: the first ``limit`` of a wide table, and how many in all."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names)} in all)"


def _not_utf8(path: str, exc: UnicodeDecodeError) -> str:
    """Where a file stops being UTF-8 (the decoder's position is within a buffer, not the
    file): its line and byte, and what to do."""
    with contextlib.suppress(OSError), open(path, "rb") as f:
        head = f.read(2)
        if head in (b"\xff\xfe", b"\xfe\xff"):
            return "the file is UTF-16 text; save it as UTF-8 ('CSV UTF-8' in a spreadsheet)"
        if head in (b"\x1f\x8b", b"PK"):  # not text at all: latin-1 would be a wrong guess
            what = "gzip-compressed: decompress it" if head == b"\x1f\x8b" else \
                "a zip archive (an .xlsx workbook, an .npz?): save the table as CSV UTF-8"
            return f"the file is {what}"
        f.seek(0)
        for n, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as bad:
                return (f"line {n}: byte {line[bad.start:bad.start + 1]!r} is not UTF-8 text "
                        f"(latin-1 or cp1252?); save the file as UTF-8 ('CSV UTF-8' in a "
                        f"spreadsheet)")
    return f"not UTF-8 text ({exc})"


def _separator_hint(header: list[str], sep: str = ",") -> str:
    """A hint for a header read as one cell: a file separated by ';' or tabs (the CSV of a
    spreadsheet in many locales), which is read with commas only (a .tsv with tabs only)."""
    if header and header[0].lower().startswith("sep=") and len(header[0]) <= 5:
        # Excel's first line naming the separator, read as the header ('sep=,' is 2 cells)
        return (f"; line 1 is Excel's {header[0] + ',' * (len(header) - 1)!r} line, not a "
                f"header: remove it (and separate the cells by "
                f"{'tabs' if sep == chr(9) else 'commas'})")
    seps = [s for s in (";", "\t", "|", ",") if s != sep and len(header) == 1 and s in header[0]]
    if not seps:
        return ""
    if sep == ",":
        tsv = " (name a tab-separated file .tsv)" if seps[0] == "\t" else ""
        return f"; the header is one cell: is the file separated by {seps[0]!r}? Only commas " \
               f"separate columns{tsv}"
    return f"; the header is one cell: is the file separated by {seps[0]!r}? Only tabs " \
           f"separate the columns of a .tsv" + ("; name a comma-separated file .csv"
                                                if seps[0] == "," else "")


def _comma_number(cell: str) -> bool:
    """Whether ``cell`` is digits with commas: a decimal comma (as spreadsheets write in many
    locales) or digit grouping, which ``float`` does not read."""
    text = cell.strip()
    return "," in text and any(c.isdigit() for c in text) and \
        not text.strip("+-").replace(",", "").replace(".", "").strip("0123456789")


COMMA_HINT = ("a decimal comma, or commas grouping digits? Numbers are read with a decimal "
              "point and no grouping, e.g. 1234.5")
DIGITS_HINT = ("digits grouped by '_', or digits of another script? Numbers are read as "
               "pandas reads them: ASCII digits, no grouping, e.g. 1234.5")
SIGN_HINT = ("a currency or percent sign, or spaces grouping digits? Numbers are read plain, "
             "e.g. 1234.5")
QUOTE_HINT = ("a space before an opening quote? A quote opens a cell only right after the "
              "separator (1,\"2\" not 1, \"2\"), else it is part of the cell's text")
#: what spreadsheets write around or inside numbers: currency, percent, (thin, no-break) spaces
DECORATIONS = "$€£¥%\u00a0\u2009\u202f "


def written_number_hint(cell: str) -> str | None:
    """Why ``cell`` is a number as a spreadsheet writes it but not as ``float`` reads it (a
    comma in digits; a currency or percent sign, or spaces grouping digits; quoted after a
    space), or None."""
    text = cell.strip()
    if len(text) > 1 and text[0] == text[-1] == '"' and _is_float(text[1:-1]):
        return QUOTE_HINT  # ', "2"': Python's csv (and pandas) keep the quotes after a space
    if _comma_number(cell):
        return COMMA_HINT
    if not _plain(text) and any(c.isdigit() for c in text) and _python_float(text):
        return DIGITS_HINT
    plain = cell.strip()
    for c in DECORATIONS:
        plain = plain.replace(c, "")
    if plain != cell.strip() and any(c.isdigit() for c in plain) and _is_float(plain):
        return SIGN_HINT
    return None


def _not_number_hint(cell: str) -> str:
    """Why a feature cell is not a number, and the fix: a number as a spreadsheet writes it
    (:func:`written_number_hint`), else text."""
    return written_number_hint(cell) or ("features must be numeric: encode a text column "
                                         "first, e.g. with pandas.get_dummies")


def _target_hint(target: str, header: list[str]) -> str:
    """A hint for a ``--target`` not in ``header``: the column it differs from only in case or
    spaces, or (a number, as a column index of Keras or NumPy) that it takes a name."""
    near = [h for h in header if h.lower() == target.strip().lower()]
    if near:
        return f"; did you mean {near[0]!r}? (names are case-sensitive)"
    quoted = [h for h in header if len(h) > 1 and h[0] == h[-1] == '"' and
              h[1:-1].strip() == target.strip()]
    if quoted:  # 'a, "y"': the quotes kept as part of the name
        return f"; the header has {quoted[0]!r}: {QUOTE_HINT}"
    if target.strip().lstrip("-").isdigit() and len(header) > 1:
        return (f"; --target takes a column's name from the header row, not its position "
                f"(the last column is {header[-1]!r})")
    return ""


def _case_hint(absent: list[str], header: list[str]) -> str:
    """A hint for columns a model needs that ``header`` has in another case or spacing
    (predict finds its columns by exact name, as pandas does)."""
    lower = {h.lower(): h for h in header}
    pairs = [(c, lower[c.strip().lower()]) for c in absent if c.strip().lower() in lower]
    if not pairs:
        return ""
    shown = ", ".join(f"{h!r} for {c!r}" for c, h in pairs[:5])
    return f"; the file has {shown}{', ...' if len(pairs) > 5 else ''} (names are case-sensitive)"


def _looks_like_data(header: list[str]) -> bool:
    """Whether a header row may be a data row: every cell but one (a text label, as in UCI's
    ``iris.data``) a number, one of them with a fraction. Whole numbers are names (pandas
    writes a DataFrame's default columns 0, 1, ...; years); so are wavelengths (908.1, ...)
    over a target column of numbers, which the caller tells apart."""
    numbers = [h for h in header if _is_float(h)]
    return len(header) > 2 and len(numbers) >= len(header) - 1 and \
        any(not float(h).is_integer() for h in numbers if _number(h) is not None)


def _python_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _is_float(text: str) -> bool:
    """Whether ``text`` is a number (finite or not) as pandas reads one (:func:`_plain`)."""
    return _plain(text.strip()) and _python_float(text)


def _missing(text: str) -> bool:
    return text.strip().lower() in MISSING
