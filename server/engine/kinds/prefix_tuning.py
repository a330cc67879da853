"""Prefix tuning (peft_type ``PREFIX_TUNING``): learned keys and values before the prompt.

PEFT saves ``prompt_embeddings`` (num_virtual_tokens, num_layers * 2 * token_dim), the
prefix of every layer's KV cache (with ``prefix_projection`` it saves the projection's
output, so the file is the same either way). In its forward the prefix is a cache of n
entries before the prompt: the prompt's tokens take positions n, n+1, ... and attend to
the prefix as to earlier tokens. With grouped-query attention PEFT sizes token_dim as
num_key_value_heads * head_dim (its config's num_attention_heads is then the KV heads).

Here a row with such an adapter gets its prefix written into its own cache columns, just
left of its prompt, before the prompt is prefilled (`ModelRunner.prefill_chunk` asks
`prefix`); the attention mask covers them and the row's positions start at n, as in PEFT.
Other rows of the batch have padding there, masked out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
from server.engine.kinds.prompt_tuning import (
    PROMPT_KEY,
    check_context,
    check_prompt_learning_config,
)


class PrefixTuningKind:
    name = "prefix_tuning"
    peft_type = "PREFIX_TUNING"

    def validate(self, file: AdapterFile, base: BaseModelShape, limits: Limits) -> KindReport:
        virtual = check_prompt_learning_config(file)
        if PROMPT_KEY not in file.header:
            raise AdapterError(
                400, f"{WEIGHTS_FILE} holds no {PROMPT_KEY} tensor", "invalid_weights"
            )
        width = base.num_layers * 2 * base.num_kv_heads * base.head_dim
        config = file.config
        layers = config_int(config, "num_layers")
        heads = config_int(config, "num_attention_heads")
        token_dim = config_int(config, "token_dim")
        if (layers, heads, token_dim) != (
            base.num_layers,
            base.num_kv_heads,
            base.num_kv_heads * base.head_dim,
        ):
            raise AdapterError(
                400,
                f"the prefix is for {layers} layers of {heads} KV heads ({token_dim} wide); the "
                f"base model has {base.num_layers} layers of {base.num_kv_heads} KV heads of "
                f"{base.head_dim} ({base.num_kv_heads * base.head_dim} wide): the adapter "
                "belongs to another base model",
                "base_model_mismatch",
            )
        shape = file.shape(PROMPT_KEY)
        if shape != [virtual, width]:
            raise AdapterError(
                400,
                f"{PROMPT_KEY} has shape {shape}, expected [{virtual}, {width}] "
                f"(num_virtual_tokens, layers x 2 x KV width)",
                "base_model_mismatch",
            )
        check_context(self.name, virtual, base)
        return KindReport(
            target_modules=[],
            parameters=file.numel(PROMPT_KEY),
            used={PROMPT_KEY},
            virtual_tokens=virtual,
        )

    def read(self, name: str, path: Path, dtype: torch.dtype) -> Prefix:
        import json

        from safetensors import safe_open

        config = json.loads((path / "adapter_config.json").read_text())
        with safe_open(str(path / WEIGHTS_FILE), "pt") as f:
            flat = f.get_tensor(PROMPT_KEY)  # (n, layers * 2 * heads * head_dim)
        n = flat.shape[0]
        layers, heads = int(config["num_layers"]), int(config["num_attention_heads"])
        head_dim = int(config["token_dim"]) // heads
        # PEFT: view (n, layers * 2, heads, head_dim), permute to (layers * 2, heads, n, head_dim)
        kv = flat.view(n, layers * 2, heads, head_dim).permute(1, 2, 0, 3).contiguous()
        return Prefix(name, kv)

    def rows(self, model: nn.Module, device: torch.device, dtype: torch.dtype) -> PrefixRows:
        return PrefixRows(device)


KIND = PrefixTuningKind()


@dataclass
class Prefix:
    name: str
    kv: torch.Tensor  # (layers * 2, kv heads, n, head_dim): layer l's keys at 2l, values 2l+1
    kind: str = "prefix_tuning"

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes

    @property
    def prefix_tokens(self) -> int:
        return int(self.kv.shape[2])


class PrefixRows:
    """Resident prefixes; the runner writes them into the cache (nothing to wrap)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.adapters: dict[str, torch.Tensor] = {}

    def add(self, weights: Prefix) -> None:
        self.adapters[weights.name] = weights.kv.to(self.device)

    def remove(self, name: str) -> None:
        self.adapters.pop(name, None)

    def prefix_tokens(self, name: str) -> int:
        kv = self.adapters.get(name)
        return int(kv.shape[2]) if kv is not None else 0

    def plan(self, rows: list[str | None], input_start: int | None) -> None:
        unknown = {n for n in rows if n is not None and n not in self.adapters}
        if unknown:
            raise KeyError(f"adapters not resident: {sorted(unknown)}")

    def cache_columns(
        self, rows: list[str | None], width: int, dtype: torch.dtype
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, keys and values (batch, kv heads, width, head_dim): each row's prefix
        right-aligned in the ``width`` columns, zeros (masked) elsewhere."""
        some = next(iter(self.adapters.values()))
        layers2, heads, _, head_dim = some.shape
        out = torch.zeros(
            len(rows), layers2, heads, width, head_dim, dtype=dtype, device=self.device
        )
        for i, name in enumerate(rows):
            if name is not None:
                kv = self.adapters[name]
                out[i, :, :, width - kv.shape[2] :] = kv.to(dtype)
        return [(out[:, 2 * layer], out[:, 2 * layer + 1]) for layer in range(layers2 // 2)]
