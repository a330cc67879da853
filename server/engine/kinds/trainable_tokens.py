"""Trained token rows: new values for a few rows of the input embedding, per batch row.

PEFT writes them in two ways: inside a LoRA adapter (``trainable_token_indices``; keys end
in ``token_adapter.trainable_tokens_delta``) and as an adapter of their own (peft_type
``TRAINABLE_TOKENS``, config ``token_indices``; keys end in ``trainable_tokens_delta``).
Either way the tensor holds the rows' new values (not differences from the base), shaped
(tokens, dim). This is how a base model learns to emit a chat template's end-of-turn token
it never saw in pre-training.

In a batch, a row's embedding of such a token and, in a model with tied input and output
embeddings, its logit for it come from its own adapter's row; other rows see the base's.
The rows of every resident adapter are packed: ``ids`` (K,), ``slots`` (K,) the owning
adapter's index, ``rows`` (K, dim). A batch row matches only its own adapter's entries, and
an adapter lists a token once, so at most one entry applies to any (row, token).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from server.engine.kinds.base import (
    WEIGHTS_FILE,
    AdapterError,
    AdapterFile,
    BaseModelShape,
    KindReport,
    Limits,
)

# Trained token rows per adapter and module: a few special tokens, not a new vocabulary
MAX_TRAINED_TOKENS = 256

_KEY = re.compile(
    r"^(?:base_model\.model\.)?(.*?)(\.token_adapter)?\.trainable_tokens_delta(?:\.[^.]+)?$"
)


def token_key_module(key: str) -> str | None:
    """'base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta' ->
    'model.embed_tokens'."""
    m = _KEY.match(key)
    return m.group(1) if m else None


def token_ids(config: dict[str, Any], module: str) -> list[int]:
    """The token ids whose rows ``module`` holds. LoRA's ``trainable_token_indices``: a list
    is for the input embedding; a mapping names modules by path or suffix (PEFT's rule).
    A TRAINABLE_TOKENS adapter lists them in ``token_indices``."""
    spec = config.get("trainable_token_indices")
    if spec is None:
        spec = config.get("token_indices")
    if isinstance(spec, list):
        return [int(i) for i in spec]
    if isinstance(spec, dict):
        for pattern, ids in spec.items():
            if module == pattern or module.endswith(f".{pattern}"):
                return [int(i) for i in ids]
    return []


def check_token_rows(file: AdapterFile, base: BaseModelShape) -> tuple[list[int], set[str], int]:
    """Trained token rows: each for a module the base has, shaped (ids, dim), ids in range.
    Returns (every trained id, the keys, their parameter count)."""
    found: dict[str, str] = {}
    for key in file.header:
        module = token_key_module(key)
        if module is not None:
            found[module] = key
    declared = file.config.get("trainable_token_indices") or file.config.get("token_indices")
    if declared and not found:
        raise AdapterError(
            400,
            "adapter_config.json lists trained token indices but the weights hold no "
            "trained token rows",
            "invalid_weights",
        )
    every: set[int] = set()
    parameters = 0
    for module, key in sorted(found.items()):
        shape = file.shape(key)
        if module not in base.token_modules:
            raise AdapterError(
                400,
                f"trained token rows for {module}, which is not the base model's input "
                "embedding or output layer: the adapter belongs to another base model",
                "base_model_mismatch",
            )
        rows, dim = base.token_modules[module]
        try:
            ids = token_ids(file.config, module)
        except (TypeError, ValueError) as exc:
            raise AdapterError(
                400, f"trained token indices are malformed: {exc}", "invalid_config"
            ) from exc
        if not ids or len(set(ids)) != len(ids):
            raise AdapterError(
                400,
                f"the config gives no unique token ids for the rows of {module}",
                "invalid_config",
            )
        if len(ids) > MAX_TRAINED_TOKENS:
            raise AdapterError(
                400,
                f"{len(ids)} trained tokens for {module}, above the {MAX_TRAINED_TOKENS} this "
                "server applies per row; retrain with fewer trainable tokens",
                "unsupported_adapter",
            )
        bad = [i for i in ids if not 0 <= i < rows]
        if bad:
            raise AdapterError(
                400,
                f"token ids {bad[:5]} are outside the base model's vocabulary of {rows}",
                "base_model_mismatch",
            )
        if shape != [len(ids), dim]:
            raise AdapterError(
                400,
                f"{module}: trained token rows have shape {shape}, expected "
                f"[{len(ids)}, {dim}] ({len(ids)} tokens of the base's width {dim})",
                "base_model_mismatch",
            )
        every.update(ids)
        parameters += len(ids) * dim
    return sorted(every), set(found.values()), parameters


def read_token_rows(
    config: dict[str, Any], tensors: dict[str, torch.Tensor], dtype: torch.dtype
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module path -> (token ids (n,), their rows (n, dim)) from an adapter's tensors."""
    tokens = {}
    for key, tensor in tensors.items():
        module = token_key_module(key)
        if module is not None:
            ids = torch.tensor(token_ids(config, module), dtype=torch.long)
            tokens[module] = (ids, tensor.to(dtype).contiguous())
    return tokens


# --- the kind of its own: peft_type TRAINABLE_TOKENS ------------------------------------------


@dataclass
class TokenWeights:
    name: str
    tokens: dict[str, tuple[torch.Tensor, torch.Tensor]]
    kind: str = "trainable_tokens"

    @property
    def nbytes(self) -> int:
        return sum(ids.nbytes + rows.nbytes for ids, rows in self.tokens.values())


class TrainableTokensKind:
    name = "trainable_tokens"
    peft_type = "TRAINABLE_TOKENS"

    def validate(self, file: AdapterFile, base: BaseModelShape, limits: Limits) -> KindReport:
        ids, used, parameters = check_token_rows(file, base)
        if not used:
            raise AdapterError(
                400, f"{WEIGHTS_FILE} holds no trained token rows", "invalid_weights"
            )
        modules = sorted({m for k in used if (m := token_key_module(k)) is not None})
        return KindReport(
            target_modules=modules, parameters=parameters, used=used, trained_tokens=ids
        )

    def read(self, name: str, path: Path, dtype: torch.dtype) -> TokenWeights:
        import json

        from safetensors.torch import load_file

        config = json.loads((path / "adapter_config.json").read_text())
        return TokenWeights(
            name, read_token_rows(config, load_file(str(path / WEIGHTS_FILE)), dtype)
        )

    def rows(self, model: nn.Module, device: torch.device, dtype: torch.dtype) -> TokenRows:
        return TokenRows(model, device, dtype)


KIND = TrainableTokensKind()


# --- per-row application -----------------------------------------------------------------------


class TokenRowsLayer(nn.Module):
    """Base embedding or output layer plus the trained token rows of resident adapters."""

    def __init__(self, base: nn.Module, owner: TokenRows, *, output: bool):
        super().__init__()
        self.base = base
        self.output = output
        self._owner = [owner]  # a list, so the owner is not registered as a submodule
        self.ids: torch.Tensor | None = None
        self.slots: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None
        # Gemma-style embeddings multiply the looked-up row by a constant
        scale = getattr(base, "embed_scale", None)
        self.embed_scale = float(scale) if scale is not None and not output else 1.0
        for attr in ("in_features", "out_features", "weight", "num_embeddings"):
            if hasattr(base, attr):  # what callers read off the layer it replaces
                setattr(self, attr, getattr(base, attr))

    def _active(self) -> torch.Tensor | None:
        row_slots = self._owner[0].row_slots
        if row_slots is None or self.slots is None:
            return None
        # (batch, K): row b uses the adapter that owns entry k
        return row_slots[:, None] == self.slots[None, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        owns = self._active()
        if owns is None or not bool(owns.any()):
            return out
        assert self.ids is not None and self.rows is not None
        if self.output:
            return self._logits(x, out, owns)
        # input ids (batch, seq) -> which entry, if any, replaces each position's row
        hits = (x[..., None] == self.ids) & owns[:, None, :]  # (batch, seq, K)
        hit = hits.any(-1)
        if not bool(hit.any()):
            return out
        entry = hits.to(torch.float32).argmax(-1)
        new = (self.rows[entry] * self.embed_scale).to(out.dtype)
        return torch.where(hit[..., None], new, out)

    def _logits(self, x: torch.Tensor, out: torch.Tensor, owns: torch.Tensor) -> torch.Tensor:
        assert self.ids is not None and self.rows is not None
        new = x.to(self.rows.dtype) @ self.rows.t()  # (batch, seq, K)
        uniq, entry_to_uniq = torch.unique(self.ids, return_inverse=True)
        pick = torch.nn.functional.one_hot(entry_to_uniq, len(uniq)).to(new.dtype)  # (K, U)
        owned = owns.to(new.dtype)  # (batch, K)
        has = (owned @ pick) > 0  # (batch, U)
        values = (new * owned[:, None, :]) @ pick  # (batch, seq, U)
        out = out.clone()
        out[..., uniq] = torch.where(has[:, None, :], values.to(out.dtype), out[..., uniq])
        return out


class TokenRows:
    """Trained token rows of resident adapters (of any kind that carries them)."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype):
        self.model = model
        self.device = device
        self.dtype = dtype
        self.adapters: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.layers: dict[str, TokenRowsLayer] = {}
        self._sources: dict[str, str] = {}  # wrapped layer -> module whose rows it uses
        self.row_slots: torch.Tensor | None = None  # (batch,) adapter index, -1: none

    def add(self, weights: Any) -> None:
        tokens = weights.tokens
        for module in tokens:
            self._wrap(module)
        self.adapters[weights.name] = tokens
        self._pack()

    def remove(self, name: str) -> None:
        if self.adapters.pop(name, None) is not None:
            self._pack()

    def plan(self, rows: list[str | None], input_start: int | None) -> None:
        if not any(name is not None and self.adapters.get(name) for name in rows):
            self.row_slots = None
            return
        order = {name: i for i, name in enumerate(self.adapters)}
        slots = [order.get(name, -1) if name is not None else -1 for name in rows]
        self.row_slots = torch.tensor(slots, dtype=torch.long, device=self.device)

    def _wrap(self, module: str) -> None:
        """Wrap the input embedding holding ``module``'s rows, and in a tied model the
        output layer too (PEFT's rule: tied weights share the trained rows)."""
        model: Any = self.model  # a transformers model
        targets = {module: module}
        embedding = model.get_input_embeddings()
        held = model.get_submodule(module)
        if _is_or_wraps(held, embedding) and tied(model):
            targets[module_name(model, model.get_output_embeddings())] = module
        for target in targets:
            if target in self.layers:
                continue
            parent_name, _, child = target.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            base = getattr(parent, child)
            is_output = base is model.get_output_embeddings()
            wrapped = TokenRowsLayer(base, self, output=is_output)
            setattr(parent, child, wrapped)
            self.layers[target] = wrapped
        self._sources.update(targets)

    def _pack(self) -> None:
        for target, layer in self.layers.items():
            source = self._sources[target]
            ids, slots, rows = [], [], []
            for slot, tokens in enumerate(self.adapters.values()):
                entry = tokens.get(source)
                if entry is not None:
                    ids.append(entry[0])
                    slots.append(torch.full_like(entry[0], slot))
                    rows.append(entry[1])
            if not ids:
                layer.ids = layer.slots = layer.rows = None
                continue
            layer.ids = torch.cat(ids).to(self.device)
            layer.slots = torch.cat(slots).to(self.device)
            layer.rows = torch.cat(rows).to(self.device, self.dtype)


def _is_or_wraps(module: Any, target: nn.Module) -> bool:
    while module is not None:
        if module is target:
            return True
        module = getattr(module, "base", None)
    return False


def tied(model: nn.Module) -> bool:
    config: Any = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", False))


def module_name(model: nn.Module, module: nn.Module | None) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise ValueError("module not found in the model")
