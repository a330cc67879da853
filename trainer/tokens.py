"""Which embedding rows an adapter trains besides its LoRA layers (``config.trainable_tokens``).

A base model that never saw its chat template's end-of-turn token in pre-training has an
untrained row for it (Gemma 3 270M: ``<end_of_turn>``, cosine 0.995 with a cluster of unused
tokens). A LoRA on the linear layers cannot separate that row from its neighbours, so the
adapter learns the answers but never stops. Training just those rows (PEFT's
``LoraConfig(trainable_token_indices=...)``) fixes it at the cost of a few kB per adapter:
the file holds the rows' new values, and for a model with tied input/output embeddings the
output layer uses the same rows.

``"auto"`` picks the model's stop tokens that carry loss in the training data, computed from
the very masks training uses (``trainer.data``), so an adapter trains the end-of-turn token
its data teaches and nothing else.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.config import ConfigError
from trainer.data import Example, Tokenized, tokenize_example

logger = logging.getLogger(__name__)

FIELD = "trainable_tokens"


@dataclass
class TrainableTokens:
    """The resolved rows: what the card records and what LoraConfig gets."""

    spec: str | list[str | int]  # the config value it was resolved from
    ids: list[int] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)  # the tokenizer's strings for ``ids``

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, "ids": list(self.ids), "tokens": list(self.tokens)}

    def describe(self) -> str:
        """One line for the dry run and the logs."""
        if not self.ids:
            why = (
                "no stop token carries loss in this data"
                if self.spec == "auto"
                else "trainable_tokens is 'none'"
            )
            return f"trainable tokens: none ({why}); a plain LoRA"
        shown = ", ".join(f"{t!r} (id {i})" for i, t in zip(self.ids, self.tokens, strict=True))
        how = "auto: stop tokens that carry loss" if self.spec == "auto" else "as configured"
        return f"trainable tokens ({how}): {shown}"


def vocab_rows(tokenizer: Any, model_vocab_size: int | None) -> int:
    """Rows of the embedding an id may index: the model's, else the tokenizer's."""
    return int(model_vocab_size) if model_vocab_size else len(tokenizer)


def explicit_ids(
    spec: list[str | int], tokenizer: Any, model_vocab_size: int | None = None
) -> list[int]:
    """Token ids for an explicit list of token strings / ids; ConfigError for anything that is
    not exactly one token of this tokenizer or is outside the embedding."""
    rows = vocab_rows(tokenizer, model_vocab_size)
    vocab = tokenizer.get_vocab()
    ids: list[int] = []
    for item in spec:
        if isinstance(item, int):
            if not 0 <= item < rows:
                raise ConfigError(
                    FIELD, f"token id {item} is out of range: this model has ids 0..{rows - 1}"
                )
            token_id = item
        else:
            token_id = vocab.get(item)
            if token_id is None:
                pieces = tokenizer.tokenize(item)
                raise ConfigError(
                    FIELD,
                    f"{item!r} is not a token of this tokenizer (it splits into {len(pieces)} "
                    f"pieces: {pieces[:8]}); give a single token's string, as "
                    "tokenizer.convert_ids_to_tokens shows it, or its id",
                )
            if token_id >= rows:
                raise ConfigError(
                    FIELD,
                    f"{item!r} has id {token_id}, outside the model's {rows} embedding rows",
                )
        if token_id not in ids:
            ids.append(int(token_id))
    return ids


def loss_token_ids(sequences: Iterable[Tokenized]) -> set[int]:
    """Every token id that carries loss in ``sequences``."""
    found: set[int] = set()
    for seq in sequences:
        found.update(label for label in seq.labels if label != -100)
    return found


def training_sequences(examples: Iterable[Example], tokenizer: Any) -> Iterable[Tokenized]:
    """The sequences the optimiser sees, masked as in training."""
    for example in examples:
        yield from tokenize_example(example, tokenizer)


def resolve_trainable_tokens(
    spec: str | list[str | int],
    tokenizer: Any,
    *,
    stop_token_ids: Iterable[int],
    examples: Iterable[Example],
    model_vocab_size: int | None = None,
) -> TrainableTokens:
    """Turn ``config.trainable_tokens`` into token ids for this tokenizer and data."""
    if spec == "none":
        return TrainableTokens(spec=spec)
    if spec == "auto":
        carried = loss_token_ids(training_sequences(examples, tokenizer))
        ids = sorted(set(stop_token_ids) & carried)
    else:
        ids = explicit_ids(list(spec), tokenizer, model_vocab_size)
    tokens = [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]
    return TrainableTokens(spec=spec, ids=ids, tokens=tokens)


def model_vocab_size(model: Any) -> int:
    """Rows of the model's input embedding."""
    return int(model.get_input_embeddings().weight.shape[0])


def config_vocab_size(model_path: Path) -> int | None:
    """Embedding rows from a model folder's config.json, without loading weights."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return int(size) if size else None


@functools.lru_cache(maxsize=4)
def _tokenizer(model_path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def check_trainable_tokens(spec: str | list[str | int], model_path: Path) -> None:
    """Refuse an explicit token list that does not fit the base in ``model_path``, before a
    job starts (ConfigError); 'auto' and 'none' depend on the data and always resolve."""
    if isinstance(spec, str):
        return
    explicit_ids(list(spec), _tokenizer(str(model_path)), config_vocab_size(model_path))
