"""What every adapter kind shares.

A kind is one PEFT method (``peft_type``) served by this engine. Its module (beside this
file, named after PEFT's ``tuners/<method>/`` folder) holds three things:

- ``validate``: pure file inspection (the config and the safetensors header, never the
  tensors) against `BaseModelShape`, the facts about the served base. It names every
  tensor key it will apply; any other key in the file is refused by the caller, so no
  tensor is ever silently dropped.
- ``read``: the adapter's tensors as host tensors, ready to be packed.
- ``rows``: the object that applies the resident adapters of this kind to one model, per
  row of a batch (`KindRows`).

The engine knows nothing of HTTP: `AdapterError.status` is a hint, as with EngineError.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


class AdapterError(Exception):
    """An adapter that cannot be registered or loaded, with the status and code to answer."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param


@dataclass(frozen=True)
class BaseModelShape:
    """What validation may know of the served base: plain data, no torch."""

    linear: Mapping[str, tuple[int, int]]  # linear module path -> (in_features, out_features)
    token_modules: Mapping[str, tuple[int, int]]  # input embedding / output layer -> (rows, dim)
    # float parameters by full path (quantized ones are left out: no adapter may replace them)
    params: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    model_type: str = ""
    hidden_size: int = 0
    num_layers: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    vocab_size: int = 0
    max_model_len: int = 0
    names: frozenset[str] = frozenset()  # names the base is known by
    # the base's own float weight of a module (None: not at hand), for an adapter file that
    # restates a whole base layer; the one look at base tensors validation takes
    weight: Callable[[str], Any] | None = field(default=None, compare=False)


def config_dims(text_config: Any) -> dict[str, Any]:
    """BaseModelShape's architecture fields from a (text) model config, as both engines read
    them: head_dim from the config, else hidden_size / heads; KV heads default to heads."""
    heads = int(getattr(text_config, "num_attention_heads", 0) or 0)
    hidden = int(getattr(text_config, "hidden_size", 0) or 0)
    head_dim = getattr(text_config, "head_dim", None) or (hidden // heads if heads else 0)
    return {
        "model_type": str(getattr(text_config, "model_type", "") or ""),
        "hidden_size": hidden,
        "num_layers": int(getattr(text_config, "num_hidden_layers", 0) or 0),
        "num_kv_heads": int(getattr(text_config, "num_key_value_heads", None) or heads),
        "head_dim": int(head_dim),
    }


@dataclass(frozen=True)
class Limits:
    max_rank: int


@dataclass
class AdapterFile:
    """An adapter folder as validation sees it: its config and its tensors' names/shapes."""

    path: Path
    config: dict[str, Any]
    header: dict[str, dict[str, Any]]  # tensor key -> {"dtype", "shape", "data_offsets"}

    def shape(self, key: str) -> list[int]:
        return [int(d) for d in self.header[key].get("shape", [])]

    def numel(self, key: str) -> int:
        n = 1
        for d in self.shape(key):
            n *= d
        return n


@dataclass
class KindReport:
    """What a kind's validation learned about one adapter."""

    target_modules: list[str]  # base module paths it changes (empty for virtual tokens)
    parameters: int  # numbers it trained (the tensors it applies)
    used: set[str]  # tensor keys it applies
    rank: int | None = None  # LoRA only
    alpha: float | None = None
    use_rslora: bool = False
    trained_tokens: list[int] = field(default_factory=list)
    # positions of every request's context the adapter takes (virtual tokens, KV prefixes)
    virtual_tokens: int = 0
    # keys the kind recognised but cannot apply, and why (named in the refusal)
    reasons: dict[str, str] = field(default_factory=dict)


class AdapterWeights(Protocol):
    """One adapter's tensors in host memory, as a kind's ``read`` returns them."""

    name: str
    kind: str

    @property
    def nbytes(self) -> int: ...


class KindRows(Protocol):
    """The resident adapters of one kind on one model, applied per row of a forward."""

    def add(self, weights: Any) -> None: ...

    def remove(self, name: str) -> None: ...

    def plan(self, rows: list[str | None], input_start: int | None) -> None:
        """Before a forward: row i uses this kind's adapter rows[i] (None: not this kind).
        ``input_start`` is the prompt position of the first input column during prefill
        (None while decoding). ``plan([], None)`` clears the plan after the forward."""
        ...


class AdapterKind(Protocol):
    name: str  # our name, as GET /adapters/{name} shows it: "lora", "ia3", ...
    peft_type: str  # PEFT's name for it in adapter_config.json: "LORA", "IA3", ...

    def validate(self, file: AdapterFile, base: BaseModelShape, limits: Limits) -> KindReport: ...

    def read(self, name: str, path: Path, dtype: Any) -> Any: ...

    def rows(self, model: Any, device: Any, dtype: Any) -> KindRows: ...


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """Tensor names, dtypes and shapes from a safetensors header, without loading data."""
    try:
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file too short")
            (length,) = struct.unpack("<Q", raw)
            if length > 100 * 1024 * 1024:
                raise ValueError("header too large")
            header = json.loads(f.read(length))
    except (OSError, ValueError) as exc:
        raise AdapterError(
            400, f"{path.name} is not a readable safetensors file: {exc}", "invalid_weights"
        ) from exc
    if not isinstance(header, dict):
        raise AdapterError(400, f"{path.name} has a malformed header", "invalid_weights")
    header.pop("__metadata__", None)
    for key, meta in header.items():
        if not isinstance(meta, dict) or not isinstance(meta.get("shape"), list):
            raise AdapterError(400, f"{path.name}: tensor {key!r} has no shape", "invalid_weights")
    return header


def strip_peft_prefix(key: str) -> str:
    """PEFT saves keys under ``base_model.model.``; a few exporters drop it."""
    return key.removeprefix("base_model.model.")


def config_int(config: dict[str, Any], field_name: str, default: int | None = None) -> int:
    value = config.get(field_name, default)
    try:
        if value is None or isinstance(value, bool):
            raise ValueError("missing")
        return int(value)
    except (TypeError, ValueError) as exc:
        raise AdapterError(
            400,
            f"{CONFIG_FILE}: {field_name} must be an integer (got {value!r})",
            "invalid_config",
        ) from exc
