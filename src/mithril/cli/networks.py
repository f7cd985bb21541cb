"""The models ``mithril train`` trains: an MLP (digits, tabular data), a small CNN (digits as
8×8 images) and a GPT-style character model, each with the same terminals.

Every model takes ``input`` and ``target`` and gives ``loss`` and the model's prediction:
``logits`` (classification; the loss is the cross-entropy against integer labels) or
``prediction`` (regression, one value per row; the loss is the mean squared error against
a (N, 1) target).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mithril as ml
from mithril.models import IOKey

OBJECTIVES = ("classification", "regression")


@dataclass(frozen=True)
class ModelSpec:
    """A logical model and how the training loop treats it."""

    model: ml.Model
    #: the shapes to compile with (``None``: a free dimension)
    shapes: dict[str, list[int | None]]
    #: one line for the run's header, e.g. ``CNN conv 3×3 32 → pool → ...``
    description: str
    objective: str = "classification"
    #: regression: the target's standard deviation, so RMSE is reported in the data's units
    target_scale: float = 1.0
    #: evaluate the sets in chunks of this many rows (None: all at once)
    eval_chunk: int | None = None
    #: report bits per character (the loss in nats / ln 2) beside the accuracy
    bits_per_char: bool = False

    @property
    def output(self) -> str:
        return "logits" if self.objective == "classification" else "prediction"


def _hidden(name: str) -> IOKey:
    return IOKey(name, expose=False)


def _head(model: ml.Model, objective: str) -> None:
    if objective == "classification":
        model |= ml.CrossEntropy()(input="logits", target="target", output="loss")
    else:
        model |= ml.MeanSquaredError()(input="prediction", target="target", output="loss")


def mlp_spec(num_features: int, outputs: int, hidden: Sequence[int], activation: str = "relu",
             objective: str = "classification", target_scale: float = 1.0,
             what: str = "MLP") -> ModelSpec:
    """``input → MLP(hidden…, outputs)`` (``outputs`` classes, or 1 for regression)."""
    model = ml.Model()
    acts: list[str | None] = [activation] * len(hidden) + [None]
    out = "logits" if objective == "classification" else "prediction"
    model |= ml.MLP(acts, [*hidden, outputs])(input="input", output=out)
    _head(model, objective)
    return ModelSpec(model, {"input": [None, num_features]},
                     f"{what} {[num_features, *hidden, outputs]} ({activation})", objective,
                     target_scale)


def cnn_spec(image: tuple[int, int, int], num_classes: int, channels: Sequence[int] = (32, 64),
             batchnorm: bool = True, dropout: float = 0.0) -> ModelSpec:
    """``[conv 3×3 (padding 1) → BatchNorm → relu → max-pool 2]`` per entry of ``channels``,
    then flatten → Dropout → linear, on NCHW images of shape ``image`` (C, H, W)."""
    model = ml.Model()
    prev, (_, h, w) = "input", image
    parts = []
    for i, c in enumerate(channels):
        model |= ml.Convolution2D(3, c, padding=1)(input=prev, output=_hidden(f"conv{i}"))
        prev = f"conv{i}"
        if batchnorm:
            model |= ml.BatchNorm2D(c)(input=prev, output=_hidden(f"norm{i}"))
            prev = f"norm{i}"
        model |= ml.Relu()(input=prev, output=_hidden(f"act{i}"))
        model |= ml.MaxPool2D(2)(input=f"act{i}", output=_hidden(f"pool{i}"))
        prev = f"pool{i}"
        h, w = h // 2, w // 2
        parts.append(f"conv 3×3 {c}{' → BN' if batchnorm else ''} → relu → pool 2")
    model |= ml.Flatten()(input=prev, output=_hidden("flat"))
    prev = "flat"
    if dropout:
        model |= ml.Dropout(dropout)(input=prev, output=_hidden("dropped"))
        prev = "dropped"
        parts.append(f"dropout {dropout:g}")
    model |= ml.Linear(num_classes)(input=prev, output="logits")
    _head(model, "classification")
    desc = f"CNN {' → '.join(parts)} → linear {channels[-1] * h * w}→{num_classes}"
    return ModelSpec(model, {"input": [None, *image]}, desc)


def charlm_spec(vocab: int, context: int, d_model: int = 128, layers: int = 4, heads: int = 4,
                dropout: float = 0.0, eval_chunk: int = 64) -> ModelSpec:
    """GPT-style: token embedding + learned position embedding → ``layers`` pre-LayerNorm
    causal :class:`~mithril.TransformerBlock` (GELU, feed-forward 4·d) → LayerNorm → linear
    head over the ``vocab`` characters; input and target (N, context) character indices.
    ``dropout``: after the embeddings and inside every block (its attention weights, after
    each sub-layer and the feed-forward activation, as torch's layers)."""
    model = ml.Model()
    model |= ml.Embedding(vocab, d_model)(input="input", output=_hidden("tokens"))
    model |= ml.PositionalEmbedding(context, d_model)(input="tokens", output=_hidden("h0"))
    prev = "h0"
    if dropout:
        model |= ml.Dropout(dropout)(input=prev, output=_hidden("h0_dropped"))
        prev = "h0_dropped"
    for i in range(layers):
        block = ml.TransformerBlock(d_model, heads, 4 * d_model, activation="gelu", is_causal=True,
                                    dropout=dropout)  # (attention, sub-layers: as nanoGPT)
        model |= block(input=prev, output=_hidden(f"h{i + 1}"))
        prev = f"h{i + 1}"
    model |= ml.LayerNorm()(input=prev, output=_hidden("final"))
    model |= ml.Linear(vocab)(input="final", output="logits")
    _head(model, "classification")
    desc = (f"GPT {layers} layers × (d {d_model}, {heads} heads, causal), context {context}, "
            f"{vocab} characters" + (f", dropout {dropout:g}" if dropout else ""))
    return ModelSpec(model, {"input": [None, context], "target": [None, context]}, desc,
                     eval_chunk=eval_chunk, bits_per_char=True)


def describe_params(params: dict[str, Any]) -> str:
    n = sum(int(getattr(p, "size", 0) if not callable(getattr(p, "numel", None)) else p.numel())
            for p in params.values())
    return f"{n:,} parameters"
