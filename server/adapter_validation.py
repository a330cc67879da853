"""Checks an adapter folder before anything is loaded. Pure file inspection: no torch.

Every failure is an `AdapterError` with the HTTP status and error code to answer with,
and a message that says what is wrong and what to do about it.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.engine.peft_format import lora_key_module, token_key_module, trainable_token_ids

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
WEIGHTS_FILE = "adapter_model.safetensors"
# Trained token rows per adapter and module: a few special tokens, not a new vocabulary
MAX_TRAINED_TOKENS = 256
CONFIG_FILE = "adapter_config.json"


class AdapterError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param


@dataclass
class AdapterSpec:
    """What validation learned about an adapter folder."""

    rank: int
    alpha: float
    target_modules: list[str]  # module paths in the base, e.g. model.layers.0.self_attn.q_proj
    base_model_name: str | None
    size_bytes: int
    use_rslora: bool
    config: dict[str, Any] = field(default_factory=dict)
    trained_tokens: list[int] = field(default_factory=list)  # ids with trained rows


def check_name(name: str, reserved: set[str]) -> None:
    if not NAME_RE.match(name or ""):
        raise AdapterError(
            400,
            f"invalid adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            "invalid_name",
            "name",
        )
    if name in reserved:
        raise AdapterError(400, f"the name {name!r} is reserved", "invalid_name", "name")


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
    return header


def _check_token_rows(
    header: dict[str, Any], config: dict[str, Any], token_modules: dict[str, tuple[int, int]]
) -> list[int]:
    """Trained token rows: each for a module the base has, shaped (ids, dim), ids in range."""
    found = {}
    for key, meta in header.items():
        module = token_key_module(key)
        if module is not None:
            found[module] = list(meta.get("shape", []))
    if config.get("trainable_token_indices") and not found:
        raise AdapterError(
            400,
            "adapter_config.json lists trainable_token_indices but the weights hold no "
            "trained token rows",
            "invalid_weights",
        )
    every: set[int] = set()
    for module, shape in sorted(found.items()):
        if module not in token_modules:
            raise AdapterError(
                400,
                f"trained token rows for {module}, which is not the base model's input "
                "embedding or output layer: the adapter belongs to another base model",
                "base_model_mismatch",
            )
        rows, dim = token_modules[module]
        try:
            ids = trainable_token_ids(config, module)
        except (TypeError, ValueError) as exc:
            raise AdapterError(
                400, f"trainable_token_indices is malformed: {exc}", "invalid_config"
            ) from exc
        if not ids or len(set(ids)) != len(ids):
            raise AdapterError(
                400,
                f"trainable_token_indices gives no unique token ids for {module}",
                "invalid_config",
            )
        if len(ids) > MAX_TRAINED_TOKENS:
            raise AdapterError(
                400,
                f"{len(ids)} trained tokens for {module}, above the {MAX_TRAINED_TOKENS} this "
                "server applies per row; retrain with fewer trainable_token_indices",
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
    return sorted(every)


def validate_adapter_dir(
    path: Path,
    *,
    base_linear_shapes: dict[str, tuple[int, int]],
    base_names: set[str],
    max_rank: int,
    max_bytes: int,
    base_token_modules: dict[str, tuple[int, int]] | None = None,
) -> AdapterSpec:
    """Validate a PEFT LoRA folder against the served base model.

    base_linear_shapes maps every linear module path of the base to (in_features,
    out_features); base_names are the names the base is known by; base_token_modules maps
    the input embedding and output layer paths to (rows, dim), where an adapter may carry
    trained token rows (PEFT's trainable_token_indices)."""
    if not path.is_dir():
        raise AdapterError(400, f"adapter path {path} is not a folder", "invalid_path", "path")
    pickles = sorted(p.name for p in path.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise AdapterError(
            400,
            f"refusing pickled weights ({', '.join(pickles)}): swapserve never unpickles "
            "a user's file; save the adapter with safe_serialization=True",
            "unsafe_weights",
        )
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterError(400, f"{CONFIG_FILE} is missing from {path}", "invalid_config")
    try:
        config = json.loads(config_path.read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise AdapterError(400, f"{CONFIG_FILE} does not parse: {exc}", "invalid_config") from exc
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterError(400, f"{WEIGHTS_FILE} is missing from {path}", "invalid_weights")
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    if size > max_bytes:
        raise AdapterError(
            413, f"adapter is {size} bytes, over the limit of {max_bytes}", "adapter_too_large"
        )

    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterError(
            400,
            f"only LoRA adapters are served (peft_type is {peft_type or 'missing'})",
            "unsupported_adapter",
        )
    if config.get("use_dora"):
        raise AdapterError(
            400,
            "DoRA adapters cannot join a mixed-adapter batch (PEFT refuses adapter_names with "
            "DoRA) and swapserve does not fall back silently: merge the DoRA weights into a "
            "plain LoRA or retrain with use_dora=false",
            "unsupported_adapter",
        )
    if config.get("modules_to_save"):
        raise AdapterError(
            400,
            f"modules_to_save={config['modules_to_save']} replaces whole base layers, which "
            "cannot be mixed per row in a batch; retrain without modules_to_save (to train a few "
            "token rows, such as a chat template's end-of-turn token, PEFT's "
            "trainable_token_indices is served)",
            "unsupported_adapter",
        )

    if config.get("lora_bias"):
        raise AdapterError(
            400,
            "lora_bias=true adds a trained bias to lora_B, which the mixed-batch LoRA layers "
            "do not apply; retrain with lora_bias=false",
            "unsupported_adapter",
        )

    try:
        rank = int(config.get("r", 0))
        alpha = float(config.get("lora_alpha", rank))
    except (TypeError, ValueError) as exc:
        raise AdapterError(400, f"r / lora_alpha are not numbers: {exc}", "invalid_config") from exc
    ranks = [rank] + [int(v) for v in (config.get("rank_pattern") or {}).values()]
    top = max(ranks)
    if rank < 1:
        raise AdapterError(400, "r must be at least 1", "invalid_config")
    if top > max_rank:
        raise AdapterError(
            400,
            f"adapter rank {top} is above this server's max_lora_rank {max_rank}: raise "
            "SWAPSERVE_MAX_LORA_RANK or use a smaller adapter",
            "rank_too_high",
        )

    base_name = config.get("base_model_name_or_path")
    if base_name and base_names:
        short = Path(str(base_name)).name.lower()
        known = {n.lower() for n in base_names}
        if short not in known and not any(short.startswith(k) for k in known):
            raise AdapterError(
                400,
                f"adapter was trained on base model {base_name!r}, but this server serves "
                f"{sorted(base_names)[0]!r}",
                "base_model_mismatch",
            )

    header = read_safetensors_header(weights)
    modules: dict[str, dict[str, list[int]]] = {}
    for key, meta in header.items():
        found = lora_key_module(key)
        if found is None:
            continue
        module, which = found
        modules.setdefault(module, {})[which] = list(meta.get("shape", []))
    if not modules:
        raise AdapterError(400, f"{WEIGHTS_FILE} holds no LoRA tensors", "invalid_weights")
    matched = [m for m in modules if m in base_linear_shapes]
    if not matched:
        sample = ", ".join(sorted(modules)[:3])
        raise AdapterError(
            400,
            f"none of the adapter's {len(modules)} target modules exist in the base model "
            f"(e.g. {sample}); it was made for another architecture",
            "no_matching_modules",
        )
    missing = sorted(set(modules) - set(matched))
    if missing:
        raise AdapterError(
            400,
            f"{len(missing)} of the adapter's target modules do not exist in the base model "
            f"(e.g. {', '.join(missing[:3])})",
            "base_model_mismatch",
        )
    for module in matched:
        in_f, out_f = base_linear_shapes[module]
        shapes = modules[module]
        a, b = shapes.get("A"), shapes.get("B")
        if not a or not b or len(a) != 2 or len(b) != 2:
            raise AdapterError(400, f"{module}: needs 2-D lora_A and lora_B", "invalid_weights")
        if a[1] != in_f or b[0] != out_f or a[0] != b[1]:
            raise AdapterError(
                400,
                f"{module}: LoRA shapes A{a} B{b} do not fit the base layer "
                f"({in_f} in, {out_f} out): the adapter belongs to another base model",
                "base_model_mismatch",
            )
        if a[0] > max_rank:
            raise AdapterError(
                400,
                f"{module} has rank {a[0]}, above max_lora_rank {max_rank}",
                "rank_too_high",
            )
    return AdapterSpec(
        rank=top,
        alpha=alpha,
        target_modules=sorted(matched),
        base_model_name=str(base_name) if base_name else None,
        size_bytes=size,
        use_rslora=bool(config.get("use_rslora")),
        config=config,
        trained_tokens=_check_token_rows(header, config, base_token_modules or {}),
    )
