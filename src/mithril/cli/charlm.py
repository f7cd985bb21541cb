"""``mithril train --task charlm``: a GPT-style character model.

The text is ``pydoc_data.topics`` (the help topics that ship with CPython: about 465 KB of
English, joined in key order) or ``--data FILE.txt`` (UTF-8). The characters of the whole text
make the vocabulary; the last ``--test-size`` of it (default 10%) is held out. Each training
step takes ``--batch-size`` windows of ``--context + 1`` characters at random offsets of the
training text (input: the first ``context``, target: the next character of each); every
``--eval-every`` steps ("an epoch" in the files) the loss is measured on up to
``--eval-windows`` non-overlapping windows of the held-out text, and as many of the training
text, and reported in nats and in bits per character (``bpc`` = loss / ln 2). At the end a
paragraph is sampled from the model, starting from the first ``context`` characters of the
held-out text, and printed and written to ``sample.txt``.

A text too short for one batch of windows (``batch_size × (context + 1)`` characters, plus
``context + 1`` held out) is refused before anything runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from .data import Dataset
from .errors import CLIError
from .networks import charlm_spec
from .table_text import _not_utf8


def load_text(path: str | None) -> tuple[str, str]:
    """(text, where it came from)."""
    if path is None:
        from pydoc_data.topics import topics

        return "".join(topics[k] for k in sorted(topics)), "pydoc_data.topics"
    try:
        # -sig: a byte-order mark (Windows editors) is not a character of the text
        return Path(path).read_text(encoding="utf-8-sig"), path
    except OSError as exc:
        raise CLIError(f"--data {path}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:  # the line and byte (or a compressed file), as a table's
        raise CLIError(f"--data {path}: {_not_utf8(path, exc)}") from None


def windows(tokens: np.ndarray, context: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``limit`` non-overlapping (input, target) windows, evenly spread over ``tokens``."""
    starts = np.arange(0, len(tokens) - context, context)
    if len(starts) > limit:
        starts = starts[np.linspace(0, len(starts) - 1, limit).round().astype(int)]
    idx = starts[:, None] + np.arange(context)
    return tokens[idx], tokens[idx + 1]


class RandomWindows:
    """The batches of an "epoch" (``--eval-every`` steps): ``batch_size`` windows at random
    offsets of the training text."""

    def __init__(self, tokens: np.ndarray, context: int, batch_size: int,
                 steps: list[int]) -> None:
        self.tokens, self.context, self.batch_size = tokens, context, batch_size
        self.per_epoch = steps
        self.offsets = np.arange(context)

    def steps(self, epoch: int) -> int:
        return self.per_epoch[epoch - 1] if epoch <= len(self.per_epoch) else 0

    def __call__(self, epoch: int, rng: np.random.Generator):  # type: ignore[no-untyped-def]
        high = len(self.tokens) - self.context  # a start s needs s + context < len
        for _ in range(self.steps(epoch)):
            idx = rng.integers(0, high, self.batch_size)[:, None] + self.offsets
            yield self.tokens[idx], self.tokens[idx + 1]


def sample(run: Any, prompt: np.ndarray, chars: int, temperature: float, seed: int,
           alphabet: list[str]) -> tuple[str, str]:
    """``chars`` characters drawn one at a time from the model's distribution (divided by
    ``temperature``; a tiny one picks the likeliest), each conditioned on the last
    ``context`` characters; and a note, empty unless the model's logits stopped being finite
    (a diverged run), which ends the sample there."""
    rng = np.random.default_rng(seed)
    window = prompt.copy()
    params = run.eval_params()
    target = np.zeros((1, len(window)), dtype=np.int64)
    out: list[str] = []
    for _ in range(chars):
        logits = run.predict(params, window[None], target)["logits"][0, -1].astype(np.float64)
        if not np.isfinite(logits).all():
            return "".join(out), (f"(sampling stopped after {len(out)} characters: the model's "
                                  f"logits are inf or NaN, a diverged run)")
        with np.errstate(over="ignore"):  # (≤ 0: a tiny temperature gives 0 and -inf)
            p = np.exp((logits - logits.max()) / temperature)
        p /= p.sum()
        c = int(rng.choice(len(p), p=p))
        out.append(alphabet[c])
        window = np.concatenate([window[1:], [c]])
    return "".join(out), ""


def charlm_job(args: argparse.Namespace) -> Any:
    from .tasks import Job, steps_in

    text, source = load_text(args.data)
    context, batch = args.context, args.batch_size
    need = batch * (context + 1)
    if len(text) < need:
        raise CLIError(f"--data {source}: the text has {len(text):,} characters, fewer than one "
                       f"batch: --batch-size {batch} × (--context {context} + 1) = {need:,}")
    if args.d_model % args.heads:
        raise CLIError(f"--d-model {args.d_model} must be divisible by --heads {args.heads}")
    if not 0 < args.test_size < 1:
        raise CLIError(f"--test-size must be between 0 and 1, got {args.test_size}")
    if getattr(args, "split_seed", None):  # (0: the parser's default, which runs saved hold)
        raise CLIError(f"--split-seed does not apply to charlm: the held-out text is the last "
                       f"--test-size of it, not a random split (got --split-seed "
                       f"{args.split_seed}); --seed orders the training windows")
    alphabet = sorted(set(text))
    index = {c: i for i, c in enumerate(alphabet)}
    tokens = np.fromiter((index[c] for c in text), dtype=np.int64, count=len(text))
    n_test = int(len(tokens) * args.test_size)
    train, test = tokens[:len(tokens) - n_test], tokens[len(tokens) - n_test:]
    if len(test) < context + 1 or len(train) < need:
        raise CLIError(f"--data {source}: {len(text):,} characters leave {len(train):,} for "
                       f"training and {len(test):,} held out (--test-size {args.test_size}); "
                       f"one batch needs {need:,} and the held-out part {context + 1}")
    x_tr, y_tr = windows(train, context, args.eval_windows)
    x_te, y_te = windows(test, context, args.eval_windows)
    data = Dataset(x_tr, y_tr, x_te, y_te, len(alphabet))
    batches = RandomWindows(train, context, batch, steps_in(args.steps, args.eval_every))
    args.epochs = len(batches.per_epoch)
    spec = charlm_spec(len(alphabet), context, args.d_model, args.layers, args.heads,
                       args.dropout, eval_chunk=max(1, min(64, 8192 // context)))
    describe = (f"{source}: {len(text):,} characters ({len(alphabet)} distinct), "
                f"{len(train):,} for training, {len(test):,} held out ({len(x_te)} windows "
                f"measured); {args.steps} steps of {batch} windows of {context}")
    settings = {"source": source, "characters": len(text), "vocabulary": len(alphabet),
                "steps": args.steps, "eval_every": args.eval_every, "context": context,
                "d_model": args.d_model, "layers": args.layers, "heads": args.heads,
                "dropout": args.dropout, "eval_windows": args.eval_windows,
                "temperature": args.temperature}
    prompt = test[:context]
    state: dict[str, str] = {}

    def finish(run: Any, result: Any) -> tuple[dict[str, Any], str]:
        f = result.final
        extra = {"bits_per_char": f["test_bpc"], "train_bits_per_char": f["train_bpc"]}
        if not args.sample_chars:
            return extra, ""
        state["sample"], note = sample(run, prompt, args.sample_chars, args.temperature,
                                       args.seed, alphabet)
        extra["sample"] = state["sample"]
        head = "".join(alphabet[i] for i in prompt[-60:])
        return extra, (f"sample (temperature {args.temperature:g}) after the held-out text "
                       f"...{head!r}:\n\n{state['sample']}\n" + (f"{note}\n" if note else ""))

    def write(run: Any, folder: Path) -> list[Path]:
        if "sample" not in state:
            return []
        from .report import atomic_file

        path = folder / "sample.txt"
        with atomic_file(path, "w", encoding="utf-8") as fh:
            fh.write(state["sample"] + "\n")
        return [path]

    return Job("charlm", data, spec, describe, settings, batches, finish, write)
