"""Prompt tuning (peft_type ``PROMPT_TUNING``): learned virtual tokens before the prompt.

PEFT saves ``prompt_embeddings`` (num_virtual_tokens, hidden) and, in its forward, puts
them in front of the embedded prompt: the virtual tokens take positions 0..n-1 and the
prompt's tokens follow at n, n+1, ... (PEFT ignores given position ids for this method).
They are raw vectors: a scaled embedding (Gemma) scales the prompt's rows, not these.

Here a row with such an adapter gets n placeholder ids in front of its prompt (the
scheduler asks `virtual_tokens`); while its prompt is prefilled, the wrapped input
embedding replaces the placeholders' rows with its adapter's vectors. They occupy the
row's own positions and KV cache, exactly as prompt tokens would; other rows are
unaffected. Decoding then needs nothing more: the cache holds them.

P-tuning (server/engine/kinds/p_tuning.py) is the same at inference: PEFT saves the output
of its prompt encoder as ``prompt_embeddings``.
"""

from __future__ import annotations

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
    config_int,
)

PROMPT_KEY = "prompt_embeddings"


def check_context(kind: str, virtual: int, base: BaseModelShape) -> None:
    """Virtual tokens take context positions: leave room for a prompt token and an answer."""
    if base.max_model_len and virtual + 2 > base.max_model_len:
        raise AdapterError(
            400,
            f"the {kind} adapter has num_virtual_tokens={virtual}, but this server's context "
            f"is {base.max_model_len} tokens and every request needs at least one prompt token "
            "and one generated token beside them: use fewer virtual tokens or raise "
            "SWAPSERVE_MAX_MODEL_LEN",
            "context_length_exceeded",
            "num_virtual_tokens",
        )


def check_prompt_learning_config(file: AdapterFile) -> int:
    """num_virtual_tokens, and one transformer submodule (a decoder-only model)."""
    virtual = config_int(file.config, "num_virtual_tokens")
    if virtual < 1:
        raise AdapterError(400, "num_virtual_tokens must be at least 1", "invalid_config")
    subs = config_int(file.config, "num_transformer_submodules", 1)
    if subs != 1:
        raise AdapterError(
            400,
            f"num_transformer_submodules={subs}: the adapter was made for an encoder-decoder "
            "model; this server serves a decoder-only base",
            "base_model_mismatch",
        )
    if file.config.get("modules_to_save"):
        raise AdapterError(
            400,
            f"modules_to_save={file.config['modules_to_save']} replaces whole base layers, which "
            "cannot be mixed per row in a batch; retrain without modules_to_save",
            "unsupported_adapter",
        )
    return virtual


class PromptTuningKind:
    name = "prompt_tuning"
    peft_type = "PROMPT_TUNING"
    rows_key = "virtual_tokens"  # shared with p-tuning: one table, one wrapped embedding

    def validate(self, file: AdapterFile, base: BaseModelShape, limits: Limits) -> KindReport:
        virtual = check_prompt_learning_config(file)
        if PROMPT_KEY not in file.header:
            raise AdapterError(
                400, f"{WEIGHTS_FILE} holds no {PROMPT_KEY} tensor", "invalid_weights"
            )
        shape = file.shape(PROMPT_KEY)
        if len(shape) != 2 or shape[0] != virtual:
            raise AdapterError(
                400,
                f"{PROMPT_KEY} has shape {shape}, but the config says num_virtual_tokens="
                f"{virtual}: expected [{virtual}, hidden size]",
                "invalid_weights",
            )
        if shape[1] != base.hidden_size:
            raise AdapterError(
                400,
                f"the virtual tokens are {shape[1]} wide, the base model's embeddings "
                f"{base.hidden_size}: the adapter belongs to another base model",
                "base_model_mismatch",
            )
        check_context(self.name, virtual, base)
        reasons = {
            key: (
                "prompt encoder weights: PEFT serves its output, saved as prompt_embeddings; "
                "save the adapter with PEFT's save_pretrained"
            )
            for key in file.header
            if key.startswith("prompt_encoder.")
        }
        return KindReport(
            target_modules=[],
            parameters=file.numel(PROMPT_KEY),
            used={PROMPT_KEY},
            virtual_tokens=virtual,
            reasons=reasons,
        )

    def read(self, name: str, path: Path, dtype: torch.dtype) -> VirtualTokens:
        from safetensors import safe_open

        with safe_open(str(path / WEIGHTS_FILE), "pt") as f:
            vectors = f.get_tensor(PROMPT_KEY).float().contiguous()
        return VirtualTokens(name, vectors, kind=self.name)

    def rows(self, model: nn.Module, device: torch.device, dtype: torch.dtype) -> VirtualTokenRows:
        return VirtualTokenRows(model, device)


KIND = PromptTuningKind()


@dataclass
class VirtualTokens:
    name: str
    vectors: torch.Tensor  # (num_virtual_tokens, hidden)
    kind: str = "prompt_tuning"

    @property
    def nbytes(self) -> int:
        return self.vectors.nbytes

    @property
    def virtual_tokens(self) -> int:
        return int(self.vectors.shape[0])


class VirtualTokenEmbedding(nn.Module):
    """The input embedding; during a prefill, a row's first n input positions take its
    adapter's virtual token vectors instead of the placeholders' rows."""

    def __init__(self, base: nn.Module, owner: VirtualTokenRows):
        super().__init__()
        self.base = base
        self._owner = [owner]
        for attr in ("weight", "num_embeddings", "embedding_dim", "padding_idx", "embed_scale"):
            if hasattr(base, attr):  # what callers read off the layer it replaces
                setattr(self, attr, getattr(base, attr))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids)
        owner = self._owner[0]
        if owner.row_count is None or owner.row_offset is None or owner.table is None:
            return out
        start = owner.input_start
        seq = input_ids.shape[1]
        pos = torch.arange(start, start + seq, device=out.device)  # prompt positions of columns
        hit = pos[None, :] < owner.row_count[:, None]  # (batch, seq)
        if not bool(hit.any()):
            return out
        index = (owner.row_offset[:, None] + pos[None, :]).clamp(max=owner.table.shape[0] - 1)
        vectors = owner.table[index].to(out.dtype)  # (batch, seq, hidden)
        return torch.where(hit[..., None], vectors, out)


class VirtualTokenRows:
    """Virtual tokens of every resident prompt-tuning / p-tuning adapter, packed in one
    table (sum of n, hidden); each row reads its own adapter's slice."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.model: Any = model
        self.device = device
        self.adapters: dict[str, VirtualTokens] = {}
        self.table: torch.Tensor | None = None
        self.offsets: dict[str, int] = {}
        self.layer: VirtualTokenEmbedding | None = None
        # the plan of the current forward (prefill only)
        self.input_start = 0
        self.row_count: torch.Tensor | None = None  # (batch,) virtual tokens, 0 for others
        self.row_offset: torch.Tensor | None = None  # (batch,) where its slice starts

    def virtual_tokens(self, name: str) -> int:
        weights = self.adapters.get(name)
        return weights.virtual_tokens if weights is not None else 0

    def add(self, weights: VirtualTokens) -> None:
        if self.layer is None:
            embedding = self.model.get_input_embeddings()
            self.layer = VirtualTokenEmbedding(embedding, self)
            self.model.set_input_embeddings(self.layer)
        self.adapters[weights.name] = weights
        self._pack()

    def remove(self, name: str) -> None:
        if self.adapters.pop(name, None) is not None:
            self._pack()

    def _pack(self) -> None:
        self.offsets, total, parts = {}, 0, []
        for name, weights in self.adapters.items():
            self.offsets[name] = total
            total += weights.virtual_tokens
            parts.append(weights.vectors)
        self.table = torch.cat(parts).to(self.device) if parts else None

    def plan(self, rows: list[str | None], input_start: int | None) -> None:
        counts = [self.virtual_tokens(n) if n is not None else 0 for n in rows]
        if input_start is None or input_start >= max(counts, default=0):
            self.row_count = self.row_offset = None
            return
        self.input_start = input_start
        self.row_count = torch.tensor(counts, dtype=torch.long, device=self.device)
        offsets = [self.offsets.get(n, 0) if n is not None else 0 for n in rows]
        self.row_offset = torch.tensor(offsets, dtype=torch.long, device=self.device)
