"""PEFT methods, declared once each: the fields a method reads, its defaults, its checks and
the PEFT config it builds. The CLI (``--method``), the HTTP job request (``config.method``),
the card and the README's method table all read this table; nothing else asks "which
method is this?".

Two axes stay apart: the *objective* (what the loss is: sft, dpo, orpo, kto; see
``trainer.objectives``) and the *method* (which weights train: this file). Any objective
runs with any method, except the pairs a method refuses here, with the reason.

Checks come in two kinds, both before any training:
- ``check``: the method's own fields, from the config alone (``JobConfig.__post_init__``);
- ``check_base``: against the base model's structure (module names and classes, context
  length, whether its folder is already quantized), read from its ``config.json`` on the
  meta device: no weights are loaded, so the server runs it when a job is submitted.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.config import ConfigError, is_int, is_number

if TYPE_CHECKING:
    from trainer.config import JobConfig
    from trainer.tokens import TrainableTokens

# The learning rates below are for SFT; an objective scales them (``LR_SCALE``: DPO and
# KTO take a quarter, as their own defaults have always been 5e-5 against SFT's 2e-4).
LORA_FIELDS = (
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "use_rslora",
    "use_dora",
    "trainable_tokens",
)
MAX_VIRTUAL_TOKENS = 512
ENCODER_TYPES = ("MLP", "LSTM")
MAX_EXTRACT_RANK = 256


# --------------------------------------------------------------------------- base structure


@dataclass(frozen=True)
class BaseStructure:
    """What the checks need to know about a base model, without its weights."""

    path: str
    model_type: str
    context: int  # max_position_embeddings: positions a sequence (virtual tokens included) may use
    modules: Mapping[
        str, str
    ]  # module path -> class name, e.g. "model.layers.0.mlp.down_proj": "Linear"
    parameters: int  # parameter count of the unquantized architecture
    prequantized: str | None  # the folder's own quantization_config method, if it ships one

    def matching(self, target: str) -> list[str]:
        """Module paths a PEFT target name selects: the name itself or a dotted suffix."""
        return [m for m in self.modules if m == target or m.endswith("." + target)]

    def matching_regex(self, pattern: str) -> list[str]:
        return [m for m in self.modules if re.fullmatch(pattern, m)]

    def linear(self, path: str) -> bool:
        return self.modules.get(path, "").startswith("Linear")

    def norm(self, path: str) -> bool:
        return "Norm" in self.modules.get(path, "")


@functools.lru_cache(maxsize=8)
def _structure(path: str, mtime: float) -> BaseStructure:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = json.loads((Path(path) / "config.json").read_text())
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    modules = {name: type(module).__name__ for name, module in model.named_modules() if name}
    head = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is head), None)
    if head_name is not None:
        # the output layer is not a target of any method (PEFT's all-linear skips it too)
        modules[head_name] = "OutputHead"
    text = getattr(config, "get_text_config", lambda: config)()
    quant = raw.get("quantization_config") or {}
    return BaseStructure(
        path=path,
        model_type=str(getattr(text, "model_type", raw.get("model_type", ""))),
        context=int(getattr(text, "max_position_embeddings", 0) or 2048),
        modules=modules,
        parameters=sum(p.numel() for p in model.parameters()),
        prequantized=str(quant.get("quant_method") or "4-bit/8-bit") if quant else None,
    )


def base_structure(path: str | Path) -> BaseStructure:
    """The structure of the model folder at ``path`` (cached while its config is unchanged)."""
    path = Path(path)
    return _structure(str(path), (path / "config.json").stat().st_mtime)


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Method:
    """One training method: which weights train and how."""

    name: str
    peft_type: str | None  # the adapter_config.json peft_type it writes; None: full weights
    summary: str
    trains: str  # what is trained, for the docs
    fields: tuple[str, ...]  # JobConfig fields of this method (besides the common ones)
    quantizations: tuple[str, ...]  # base precisions it trains on; the first is the default
    learning_rate: float  # the default SFT learning rate
    trains_token_rows: bool = False  # can train embedding rows (PEFT trainable_token_indices)
    gradient_checkpointing: bool = True  # prefix tuning's KV prefix does not survive it
    refuses_objectives: Mapping[str, str] = field(default_factory=dict)
    check: Callable[[JobConfig], None] = lambda config: None
    check_base: Callable[[JobConfig, BaseStructure], None] = lambda config, base: None
    # (config, base structure, resolved token rows) -> a PEFT config, or None (full weights)
    peft_config: Callable[[JobConfig, BaseStructure, TrainableTokens | None], Any] = (
        lambda config, base, tokens: None
    )


def _check_lora(config: JobConfig) -> None:
    from trainer.config import MAX_RANK

    if not is_int(config.r) or not 1 <= config.r <= MAX_RANK:
        raise ConfigError("r", f"{config.r!r} is out of range: set an integer in 1..{MAX_RANK}")
    if not is_number(config.lora_alpha) or config.lora_alpha <= 0:
        raise ConfigError("lora_alpha", f"{config.lora_alpha!r}: must be a number > 0")
    if not is_number(config.lora_dropout) or not 0 <= config.lora_dropout < 1:
        raise ConfigError("lora_dropout", f"{config.lora_dropout!r}: must satisfy 0 <= dropout < 1")
    for name in ("use_rslora", "use_dora"):
        if not isinstance(getattr(config, name), bool):
            raise ConfigError(name, "must be true or false")
    if config.target_modules is None:
        config.target_modules = "all-linear"


def _selected(config: JobConfig, base: BaseStructure, default: list[str]) -> list[str]:
    """Module paths ``config.target_modules`` selects in the base; ConfigError (field
    target_modules) for an entry that selects nothing, naming what the base has."""
    tm = config.target_modules
    if tm is None:
        tm = default
    if tm == "all-linear":
        return [m for m in base.modules if base.linear(m)]
    if isinstance(tm, str):
        found = base.matching_regex(tm)
        if not found:
            raise ConfigError(
                "target_modules",
                f"the pattern {tm!r} matches no module of the base model ({base.model_type})",
            )
        return found
    selected: list[str] = []
    for name in tm:
        found = base.matching(name)
        if not found:
            leaves = sorted({m.rsplit(".", 1)[-1] for m in base.modules if base.linear(m)})
            raise ConfigError(
                "target_modules",
                f"{name!r} is not a module of the base model ({base.model_type}); its linear "
                f"layers are {', '.join(leaves)}",
            )
        selected.extend(found)
    return selected


def _check_lora_base(config: JobConfig, base: BaseStructure) -> None:
    _selected(config, base, ["all-linear"])


def _lora_peft(config: JobConfig, base: BaseStructure, tokens: TrainableTokens | None) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha,  # type: ignore[arg-type]  # a float scales as well
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
        # Only these rows of the input embedding are trained (and, for a tied model, the
        # same rows of the output layer); None keeps a plain LoRA, with no key in the file.
        trainable_token_indices=list(tokens.ids) if tokens and tokens.ids else None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def _ia3_defaults(model_type: str) -> tuple[list[str], list[str]]:
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FF,
    )
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS,
    )

    if model_type not in TARGETS:
        raise ConfigError(
            "target_modules",
            f"PEFT has no default IA3 modules for model type {model_type!r}: list them, "
            "e.g. ['k_proj', 'v_proj', 'down_proj'] and feedforward_modules ['down_proj']",
        )
    return list(TARGETS[model_type]), list(FF.get(model_type, []))


def _check_ia3(config: JobConfig) -> None:
    ff = config.feedforward_modules
    if ff is not None and (
        not isinstance(ff, list | tuple) or not all(isinstance(x, str) and x for x in ff)
    ):
        raise ConfigError("feedforward_modules", "must be a list of module names, or null")
    if ff is not None:
        config.feedforward_modules = list(ff)
    if ff and isinstance(config.target_modules, list):
        extra = sorted(set(ff) - set(config.target_modules))
        if extra:
            raise ConfigError(
                "feedforward_modules",
                f"{', '.join(extra)} not in target_modules: IA3 scales a feed-forward module's "
                "input, so it must be a target as well",
            )


def _check_ia3_base(config: JobConfig, base: BaseStructure) -> None:
    targets, _ = _ia3_defaults(base.model_type) if config.target_modules is None else ([], [])
    for path in _selected(config, base, targets):
        if not base.linear(path):
            raise ConfigError(
                "target_modules",
                f"{path} is a {base.modules[path]}: IA3 scales linear layers only",
            )
    for name in config.feedforward_modules or []:
        if not base.matching(name):
            raise ConfigError("feedforward_modules", f"{name!r} is not a module of the base model")


def _ia3_peft(config: JobConfig, base: BaseStructure, tokens: TrainableTokens | None) -> Any:
    from peft import IA3Config

    targets, ff = _ia3_defaults(base.model_type) if config.target_modules is None else ([], [])
    target_modules = config.target_modules if config.target_modules is not None else targets
    if config.feedforward_modules is not None:
        ff = config.feedforward_modules
    elif config.target_modules is not None:
        # the base's usual feed-forward modules among the ones asked for
        _, usual = _ia3_defaults(base.model_type)
        ff = [m for m in target_modules if m in usual] if isinstance(target_modules, list) else []
    return IA3Config(
        target_modules=target_modules,
        feedforward_modules=ff,
        task_type="CAUSAL_LM",
    )


def _check_virtual_tokens(config: JobConfig) -> None:
    n = config.num_virtual_tokens
    if not is_int(n) or not 1 <= n <= MAX_VIRTUAL_TOKENS:
        raise ConfigError(
            "num_virtual_tokens", f"{n!r}: must be an integer in 1..{MAX_VIRTUAL_TOKENS}"
        )


def _check_context(config: JobConfig, base: BaseStructure) -> None:
    n = config.num_virtual_tokens
    if n + config.max_length > base.context:
        raise ConfigError(
            "num_virtual_tokens",
            f"{n} virtual tokens + max_length {config.max_length} = {n + config.max_length} "
            f"positions, more than the base model's context of {base.context}: lower "
            "num_virtual_tokens or max_length",
        )


def _check_prompt_tuning(config: JobConfig) -> None:
    _check_virtual_tokens(config)
    text = config.prompt_tuning_init_text
    if text is not None and (not isinstance(text, str) or not text.strip()):
        raise ConfigError(
            "prompt_tuning_init_text", "must be a non-empty string, or null for a random init"
        )


def _prompt_tuning_peft(
    config: JobConfig, base: BaseStructure, tokens: TrainableTokens | None
) -> Any:
    from peft import PromptTuningConfig

    if config.prompt_tuning_init_text:
        # PEFT embeds the text (repeated or cut to num_virtual_tokens) with the base's own
        # embedding: training starts from a real instruction instead of noise.
        return PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=config.num_virtual_tokens,
            prompt_tuning_init="TEXT",
            prompt_tuning_init_text=config.prompt_tuning_init_text,
            tokenizer_name_or_path=base.path,
        )
    return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=config.num_virtual_tokens)


def _check_prefix(config: JobConfig) -> None:
    _check_virtual_tokens(config)
    if not isinstance(config.prefix_projection, bool):
        raise ConfigError("prefix_projection", "must be true or false")
    if config.gradient_checkpointing:
        raise ConfigError(
            "gradient_checkpointing",
            "prefix tuning feeds its prefix as past key/values, which gradient checkpointing "
            "drops: leave it null (off) or false",
        )


def _prefix_peft(config: JobConfig, base: BaseStructure, tokens: TrainableTokens | None) -> Any:
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=config.num_virtual_tokens,
        prefix_projection=config.prefix_projection,
    )


def _check_p_tuning(config: JobConfig) -> None:
    _check_virtual_tokens(config)
    if not is_int(config.encoder_hidden_size) or not 1 <= config.encoder_hidden_size <= 8192:
        raise ConfigError(
            "encoder_hidden_size", f"{config.encoder_hidden_size!r}: an integer in 1..8192"
        )
    if config.encoder_reparameterization_type not in ENCODER_TYPES:
        raise ConfigError(
            "encoder_reparameterization_type",
            f"{config.encoder_reparameterization_type!r}: use one of {', '.join(ENCODER_TYPES)}",
        )


def _p_tuning_peft(config: JobConfig, base: BaseStructure, tokens: TrainableTokens | None) -> Any:
    from peft import PromptEncoderConfig

    return PromptEncoderConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=config.num_virtual_tokens,
        encoder_hidden_size=config.encoder_hidden_size,
        encoder_reparameterization_type=config.encoder_reparameterization_type,
    )


def _ln_defaults(model_type: str) -> list[str]:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING as LN

    if model_type not in LN:
        raise ConfigError(
            "target_modules",
            f"PEFT has no default norm modules for model type {model_type!r}: list them, "
            "e.g. ['input_layernorm', 'post_attention_layernorm', 'norm']",
        )
    return list(LN[model_type])


def _check_ln_base(config: JobConfig, base: BaseStructure) -> None:
    default = _ln_defaults(base.model_type) if config.target_modules is None else []
    for path in _selected(config, base, default):
        if not base.norm(path):
            raise ConfigError(
                "target_modules",
                f"{path} is a {base.modules[path]}, not a norm layer: ln_tuning trains norm "
                "weights only",
            )


def _ln_peft(config: JobConfig, base: BaseStructure, tokens: TrainableTokens | None) -> Any:
    from peft import LNTuningConfig

    targets = config.target_modules
    if targets is None:
        targets = _ln_defaults(base.model_type)
    return LNTuningConfig(task_type="CAUSAL_LM", target_modules=targets)


def _check_full(config: JobConfig) -> None:
    if config.extract_rank is not None and (
        not is_int(config.extract_rank) or not 1 <= config.extract_rank <= MAX_EXTRACT_RANK
    ):
        raise ConfigError(
            "extract_rank",
            f"{config.extract_rank!r}: an integer in 1..{MAX_EXTRACT_RANK}, or null to pick "
            "each layer's rank by extract_energy",
        )
    if not is_number(config.extract_energy) or not 0 < config.extract_energy <= 1:
        raise ConfigError(
            "extract_energy", f"{config.extract_energy!r}: a number in (0, 1], e.g. 0.9"
        )
    if not is_int(config.extract_max_rank) or not 1 <= config.extract_max_rank <= MAX_EXTRACT_RANK:
        raise ConfigError(
            "extract_max_rank", f"{config.extract_max_rank!r}: an integer in 1..{MAX_EXTRACT_RANK}"
        )


def _check_full_base(config: JobConfig, base: BaseStructure) -> None:
    if base.prequantized:
        raise ConfigError(
            "method",
            f"the base model folder is already quantized ({base.prequantized}): its weights "
            "cannot be trained directly. Train an adapter (lora, qlora, ...) on it, or point "
            "base_model at an unquantized folder for method 'full'",
        )


_PROMPT_ORPO = (
    "TRL's ORPOTrainer scores the logits against labels that do not include the virtual "
    "tokens' positions, so the shapes disagree; use dpo or kto, or another method"
)

_LORA = Method(
    name="lora",
    peft_type="LORA",
    summary="LoRA on an unquantized base (float32 on CPU, bf16 on GPU)",
    trains="two low-rank matrices per target linear layer (+ chosen embedding rows)",
    fields=LORA_FIELDS,
    quantizations=("none",),
    learning_rate=2e-4,
    trains_token_rows=True,
    check=_check_lora,
    check_base=_check_lora_base,
    peft_config=_lora_peft,
)

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        _LORA,
        # the same method on the base as the server holds it
        replace(
            _LORA,
            name="qlora",
            summary="LoRA on the 4-bit NF4 base (QLoRA): the base as the server holds it",
            quantizations=("nf4",),
        ),
        Method(
            name="ia3",
            peft_type="IA3",
            summary="IA3: learned vectors that rescale the keys/values and the feed-forward input",
            trains="one vector per target layer (its output, or its input for feed-forward layers)",
            fields=("target_modules", "feedforward_modules"),
            quantizations=("nf4", "none"),
            learning_rate=3e-3,
            check=_check_ia3,
            check_base=_check_ia3_base,
            peft_config=_ia3_peft,
        ),
        Method(
            name="prompt_tuning",
            peft_type="PROMPT_TUNING",
            summary="prompt tuning: virtual tokens (soft prompt) prepended to every input",
            trains="num_virtual_tokens embedding vectors",
            fields=("num_virtual_tokens", "prompt_tuning_init_text"),
            quantizations=("nf4", "none"),
            learning_rate=3e-2,
            refuses_objectives={"orpo": _PROMPT_ORPO},
            check=_check_prompt_tuning,
            check_base=_check_context,
            peft_config=_prompt_tuning_peft,
        ),
        Method(
            name="prefix_tuning",
            peft_type="PREFIX_TUNING",
            summary="prefix tuning: learned key/value prefixes in every attention layer",
            trains="num_virtual_tokens key and value vectors per layer",
            fields=("num_virtual_tokens", "prefix_projection"),
            quantizations=("nf4", "none"),
            learning_rate=1e-2,
            gradient_checkpointing=False,
            check=_check_prefix,
            check_base=_check_context,
            peft_config=_prefix_peft,
        ),
        Method(
            name="p_tuning",
            peft_type="P_TUNING",
            summary="P-tuning: virtual tokens produced by a small trained encoder (MLP or LSTM)",
            trains="a prompt encoder; the adapter file holds the virtual tokens it produces",
            fields=("num_virtual_tokens", "encoder_hidden_size", "encoder_reparameterization_type"),
            quantizations=("nf4", "none"),
            learning_rate=1e-3,
            refuses_objectives={"orpo": _PROMPT_ORPO},
            check=_check_p_tuning,
            check_base=_check_context,
            peft_config=_p_tuning_peft,
        ),
        Method(
            name="ln_tuning",
            peft_type="LN_TUNING",
            summary="norm tuning: the RMSNorm/LayerNorm weights only. The BitFit-style method "
            "for Gemma and Llama, whose linear layers have no biases to tune",
            trains="a copy of each target norm layer's weight vector",
            fields=("target_modules",),
            quantizations=("nf4", "none"),
            learning_rate=1e-3,
            check_base=_check_ln_base,
            peft_config=_ln_peft,
        ),
        Method(
            name="full",
            peft_type=None,
            summary="full fine-tune of every weight (small bases), then a rank-r LoRA "
            "extracted from the weight difference by truncated SVD",
            trains="every weight; the extracted adapter holds a low-rank copy of the change "
            "to each linear layer",
            fields=("extract_rank", "extract_energy", "extract_max_rank"),
            quantizations=("none",),
            learning_rate=2e-5,
            check=_check_full,
            check_base=_check_full_base,
        ),
    )
}

DEFAULT_METHODS = {"nf4": "qlora", "none": "lora"}


def method_names() -> list[str]:
    return list(METHODS)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError("method", f"{name!r} is not a method: use one of {', '.join(METHODS)}")
    return METHODS[name]


def method_owned_fields() -> set[str]:
    """Every config field that belongs to some method (the rest are common)."""
    return {f for m in METHODS.values() for f in m.fields}


def owners(field_name: str) -> list[str]:
    return [m.name for m in METHODS.values() if field_name in m.fields]


def default_quantization(method: str | None, served: str) -> str | None:
    """The quantization a server fills in for a job on its base: its own, unless the
    method fixes one (lora, qlora, full); None leaves the method's default."""
    if method is None:
        return served
    m = METHODS.get(method)
    if m is None or len(m.quantizations) == 1:
        return None
    return served if served in m.quantizations else None


def resolve(config: JobConfig) -> Method:
    """Fill ``method`` and ``quantization`` in from each other, then run the method's own
    checks. Called from ``JobConfig.__post_init__``."""
    from trainer.config import QUANTIZATIONS

    if config.quantization is not None and config.quantization not in QUANTIZATIONS:
        raise ConfigError(
            "quantization",
            f"{config.quantization!r} is not supported: use 'nf4' (4-bit base) or 'none'",
        )
    if config.method is None:
        config.method = DEFAULT_METHODS[config.quantization or "nf4"]
    if not isinstance(config.method, str):
        raise ConfigError("method", f"must be one of {', '.join(METHODS)}")
    method = get_method(config.method)
    if config.quantization is None:
        config.quantization = method.quantizations[0]
    elif config.quantization not in method.quantizations:
        raise ConfigError("quantization", _quantization_conflict(method, config.quantization))
    return method


def _quantization_conflict(method: Method, quantization: str) -> str:
    if method.name == "full":
        return (
            "method 'full' trains every weight, and 4-bit NF4 weights cannot be trained "
            "(they are frozen integer codes): use quantization 'none' (the default for full), "
            "or train an adapter on the 4-bit base with method 'qlora'"
        )
    if method.name == "lora":
        return "LoRA on a 4-bit NF4 base is method 'qlora': set method 'qlora' (or quantization 'none')"
    if method.name == "qlora":
        return "QLoRA trains on the 4-bit NF4 base: use method 'lora' for an unquantized base"
    return f"{quantization!r}: method {method.name!r} trains on {', '.join(method.quantizations)}"


def check_objective(method: Method, objective: str) -> None:
    why = method.refuses_objectives.get(objective)
    if why:
        raise ConfigError(
            "method", f"method {method.name!r} cannot train with objective {objective!r}: {why}"
        )


def check_against_base(config: JobConfig, base_path: str | Path) -> BaseStructure:
    """The method's checks against the base model's structure (no weights loaded)."""
    structure = base_structure(base_path)
    get_method(str(config.method)).check_base(config, structure)
    return structure


def methods_markdown() -> str:
    """The README's method table, generated from this table (a test keeps them equal)."""
    from trainer.config import JobConfig

    defaults = {f: JobConfig.field_default(f) for f in method_owned_fields()}
    lines = [
        "| method | PEFT type | trains | base | default lr (SFT) | fields (default) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for m in METHODS.values():
        fields = ", ".join(f"`{f}` ({_show(defaults[f])})" for f in m.fields)
        lines.append(
            f"| `{m.name}` | {m.peft_type or '(full weights)'} | {m.trains} | "
            f"{' or '.join(m.quantizations)} | {m.learning_rate:g} | {fields} |"
        )
    return "\n".join(lines)


def _show(value: Any) -> str:
    if value is None:
        return "auto"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


if __name__ == "__main__":
    print(methods_markdown())
