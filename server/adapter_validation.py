"""Checks an adapter folder before anything is loaded. Pure file inspection: no tensor data.

The folder-level checks live here (safe files, a config that parses, size limits); what the
adapter's tensors must look like depends on its method, and each method's kind checks that
(server/engine/kinds/<kind>.py, found by ``peft_type``). Then two rules for every kind:
every tensor in the file is applied or named in the refusal, and the base model the config
names is judged by what the tensors proved (server/known_bases.py).

Every failure is an `AdapterError` with the HTTP status and error code to answer with,
and a message that says what is wrong and what to do about it.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.engine.kinds import KINDS, kind_for
from server.engine.kinds.base import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterError,
    AdapterFile,
    BaseModelShape,
    Limits,
    read_safetensors_header,
)
from server.known_bases import KnownToDiffer, judge

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "AdapterError",
    "AdapterSpec",
    "check_name",
    "read_safetensors_header",
    "validate_adapter_dir",
]

logger = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# what PEFT would load instead of adapter_model.safetensors: pickled weights
PICKLED_WEIGHTS = tuple(f"adapter_model{s}" for s in PICKLE_SUFFIXES)


@dataclass
class AdapterSpec:
    """What validation learned about an adapter folder."""

    rank: int | None  # LoRA's largest rank; None for other kinds
    alpha: float | None
    target_modules: list[str]  # module paths in the base, e.g. model.layers.0.self_attn.q_proj
    base_model_name: str | None
    size_bytes: int
    use_rslora: bool
    config: dict[str, Any] = field(default_factory=dict)
    trained_tokens: list[int] = field(default_factory=list)  # ids with trained rows
    kind: str = "lora"
    peft_type: str = "LORA"
    parameters: int = 0  # trained numbers the adapter applies
    virtual_tokens: int = 0  # context positions it takes before every prompt
    base_check: dict[str, str | None] = field(default_factory=dict)


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


def _guess_reason(key: str, base: BaseModelShape) -> str:
    """Why a tensor that no kind claimed cannot be applied, in words a user can act on."""
    if key.endswith(".bias"):
        return "a trained bias, which is not applied per row"
    if key.endswith(".weight") and any(m in key for m in ("lm_head", "embed_tokens", "wte")):
        return "a whole embedding or output layer (modules_to_save), not mixable per row"
    return "not a tensor of this adapter's method as PEFT saves it"


def _refuse_unapplied(
    header: dict[str, Any], used: set[str], reasons: dict[str, str], kind: str, base: BaseModelShape
) -> None:
    """Every tensor in the file is applied or named here: never served without some."""
    unused = sorted(set(header) - used)
    if not unused:
        return
    listed = "; ".join(
        f"{key} ({reasons.get(key) or _guess_reason(key, base)})" for key in unused[:8]
    )
    more = f" and {len(unused) - 8} more" if len(unused) > 8 else ""
    raise AdapterError(
        400,
        f"{WEIGHTS_FILE} holds {len(unused)} tensor(s) a {kind} adapter here would not apply, "
        f"and serving it without them would not be the adapter that was trained: {listed}{more}",
        "unsupported_adapter",
    )


def validate_adapter_dir(
    path: Path, *, base: BaseModelShape, max_rank: int, max_bytes: int
) -> AdapterSpec:
    """Validate a PEFT adapter folder (any served kind) against the served base model."""
    if not path.is_dir():
        raise AdapterError(400, f"adapter path {path} is not a folder", "invalid_path", "path")
    weights = path / WEIGHTS_FILE
    pickled = sorted(p.name for p in path.iterdir() if p.name in PICKLED_WEIGHTS)
    if pickled and not weights.is_file():
        raise AdapterError(
            400,
            f"refusing pickled weights ({', '.join(pickled)}): swapserve never unpickles "
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
    if not weights.is_file():
        raise AdapterError(400, f"{WEIGHTS_FILE} is missing from {path}", "invalid_weights")
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    if size > max_bytes:
        raise AdapterError(
            413, f"adapter is {size} bytes, over the limit of {max_bytes}", "adapter_too_large"
        )

    peft_type = str(config.get("peft_type") or "")
    kind = kind_for(peft_type)
    if kind is None:
        served = ", ".join(sorted(KINDS))
        raise AdapterError(
            400,
            f"peft_type {peft_type or 'missing'!r} is not served here (served: {served})",
            "unsupported_adapter",
        )
    header = read_safetensors_header(weights)
    file = AdapterFile(path=path, config=config, header=header)
    report = kind.validate(file, base, Limits(max_rank=max_rank))
    _refuse_unapplied(header, report.used, report.reasons, kind.name, base)

    base_name = config.get("base_model_name_or_path")
    try:
        verdict = judge(
            str(base_name) if base_name else None, base.names, base.hidden_size, base.num_layers
        )
    except KnownToDiffer as exc:
        raise AdapterError(400, str(exc), "base_model_mismatch") from exc
    if verdict.status == "unverified":
        logger.warning("adapter at %s: base not verified by name: %s", path, verdict.detail)
    return AdapterSpec(
        rank=report.rank,
        alpha=report.alpha,
        target_modules=report.target_modules,
        base_model_name=str(base_name) if base_name else None,
        size_bytes=size,
        use_rslora=report.use_rslora,
        config=config,
        trained_tokens=report.trained_tokens,
        kind=kind.name,
        peft_type=kind.peft_type,
        parameters=report.parameters,
        virtual_tokens=report.virtual_tokens,
        base_check=verdict.as_dict(),
    )
