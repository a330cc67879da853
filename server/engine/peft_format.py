"""PEFT's on-disk LoRA format, read without PEFT and without torch.

Shared by adapter validation (file inspection) and the engine's own LoRA layers, so both
agree on which module a tensor belongs to and how it is scaled.
"""

from __future__ import annotations

import math
import re
from typing import Any

_KEY = re.compile(r"^(?:base_model\.model\.)?(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$")
_TOKEN_KEY = re.compile(
    r"^(?:base_model\.model\.)?(.*)\.token_adapter\.trainable_tokens_delta(?:\.[^.]+)?$"
)


def lora_key_module(key: str) -> tuple[str, str] | None:
    """'base_model.model.model.layers.0.q_proj.lora_A.weight' -> ('model.layers.0.q_proj', 'A')."""
    m = _KEY.match(key)
    if not m:
        return None
    return m.group(1), m.group(2)


def token_key_module(key: str) -> str | None:
    """'base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta' ->
    'model.embed_tokens': the rows of trained tokens (their new values, not differences)."""
    m = _TOKEN_KEY.match(key)
    return m.group(1) if m else None


def trainable_token_ids(config: dict[str, Any], module: str) -> list[int]:
    """The token ids whose rows ``module`` holds, from ``trainable_token_indices``: a list
    is for the input embedding (the one module PEFT then saves rows for); a mapping names
    modules by path or suffix (PEFT's rule)."""
    spec = config.get("trainable_token_indices")
    if isinstance(spec, list):
        return [int(i) for i in spec]
    if isinstance(spec, dict):
        for pattern, ids in spec.items():
            if module == pattern or module.endswith(f".{pattern}"):
                return [int(i) for i in ids]
    return []


def _pattern_value(patterns: dict[str, Any], module: str) -> Any | None:
    """PEFT's rank_pattern / alpha_pattern: a key matches a module path or its suffix."""
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", module):
            return value
    return None


def lora_scaling(config: dict[str, Any], module: str, rank: int) -> float:
    """The factor PEFT multiplies lora_B(lora_A(x)) by for ``module`` (rank = its r)."""
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module)
    if alpha is None:
        alpha = config.get("lora_alpha", rank)
    if config.get("use_rslora"):
        return float(alpha) / math.sqrt(rank)
    return float(alpha) / rank
