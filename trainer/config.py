"""The job configuration shared by SFT and DPO: base model, LoRA section, training loop, eval.

One config object drives the CLI, the HTTP job request (``from_dict``) and the job record
(``to_dict``). Every field is documented in ``metadata["help"]`` and checked in
``__post_init__``, so a bad value fails when the config is built, not minutes into a job.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Self

QUANTIZATIONS = ("nf4", "none")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
MAX_RANK = 256
TRAINABLE_TOKEN_MODES = ("auto", "none")
LOSS_TURNS = ("all", "last")
MAX_TRAINABLE_TOKENS = 64


class ConfigError(ValueError):
    """A config value is out of range or of the wrong type; the message names the field
    and the fix."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        super().__init__(f"{field_name}: {message}")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return (isinstance(value, int | float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class JobConfig:
    """Fields common to every training method. Subclasses add their own."""

    # -- base model
    base_model: str | None = field(
        default=None,
        metadata={
            "help": "Base model: a bundled model's short name ('smollm2-135m-instruct', "
            "'gemma3-270m'), a local Hugging Face model folder, or None/'bundled' for the "
            "default bundled smollm2-135m-instruct. Never downloaded."
        },
    )
    quantization: str = field(
        default="nf4",
        metadata={
            "help": "'nf4' loads the base in 4-bit NF4 and trains LoRA on top (QLoRA); "
            "'none' keeps the base unquantized (plain LoRA)."
        },
    )
    device: str = field(
        default="auto",
        metadata={"help": "'auto' (CUDA when available, else CPU), 'cpu' or 'cuda[:N]'."},
    )
    # -- LoRA section
    r: int = field(default=16, metadata={"help": f"LoRA rank, 1..{MAX_RANK}."})
    lora_alpha: float = field(
        default=32.0,
        metadata={"help": "LoRA scaling numerator (> 0): the update is scaled by alpha/r."},
    )
    lora_dropout: float = field(
        default=0.05, metadata={"help": "Dropout on the LoRA input, 0 <= dropout < 1."}
    )
    target_modules: str | list[str] = field(
        default="all-linear",
        metadata={
            "help": "Modules that get LoRA: 'all-linear' (every linear layer but the output "
            "head) or a list of module names such as ['q_proj', 'v_proj']."
        },
    )
    use_rslora: bool = field(
        default=False,
        metadata={"help": "Rank-stabilised LoRA: scale by alpha/sqrt(r) instead of alpha/r."},
    )
    use_dora: bool = field(
        default=False,
        metadata={
            "help": "Weight-decomposed LoRA (DoRA). Allowed, but a DoRA adapter cannot be served "
            "in a mixed-adapter batch; its card says mixed_batch_servable: false."
        },
    )
    trainable_tokens: str | list[str | int] = field(
        default="auto",
        metadata={
            "help": "Embedding rows trained besides the LoRA layers (the output layer shares "
            "them when the model ties its embeddings): 'auto' trains the model's stop tokens "
            "that carry loss in the data (e.g. <end_of_turn> for chat data), so the adapter "
            "learns to stop; 'none' trains no rows (a plain LoRA); or a list of at most "
            f"{MAX_TRAINABLE_TOKENS} token strings (as the tokenizer spells them) or ids."
        },
    )
    # -- training loop
    learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Peak learning rate of AdamW, in (0, 1). Default: chosen from the method "
            "and the run's length (trainer/defaults.py)."
        },
    )
    epochs: float | None = field(
        default=None,
        metadata={
            "help": "Passes over the training data (> 0); ignored when max_steps is set. "
            "Default (neither set): chosen from the data size (trainer/defaults.py)."
        },
    )
    max_steps: int | None = field(
        default=None,
        metadata={
            "help": "Optimizer steps to run (>= 1); overrides epochs when set. Default: "
            "chosen from the data size (trainer/defaults.py)."
        },
    )
    batch_size: int = field(default=4, metadata={"help": "Examples per forward pass (>= 1)."})
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={"help": "Forward passes per optimizer step (>= 1); effective batch = product."},
    )
    max_length: int = field(
        default=512,
        metadata={
            "help": "Tokens per training sequence (>= 16), counted with the chat template; "
            "longer examples are truncated and reported."
        },
    )
    lr_scheduler_type: str = field(
        default="linear",
        metadata={"help": f"Learning-rate schedule, one of {', '.join(SCHEDULERS)}."},
    )
    warmup_steps: int | None = field(
        default=None,
        metadata={
            "help": "Steps of linear learning-rate warm-up (>= 0). Default: a tenth of the steps (at most 100)."
        },
    )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Recompute activations in the backward pass to save memory. None: on for "
            "CUDA, off for CPU (where memory is rarely the limit and it costs ~30% speed)."
        },
    )
    seed: int = field(default=42, metadata={"help": "Random seed for LoRA init, shuffling, split."})
    # -- eval
    eval_fraction: float | None = field(
        default=None,
        metadata={
            "help": "Share of the data held out for eval, 0 <= f < 1 (at least one example when "
            "> 0). Ignored when eval_file is given. 0 and no eval_file: no eval. Default: a tenth "
            "(at least 5, at most 100 examples) from 30 examples on, else none."
        },
    )
    eval_steps: int | None = field(
        default=None,
        metadata={
            "help": "Measure eval loss every this many steps during training (>= 1); 0: only "
            "after training. Default: 10 times a run when there is an eval set."
        },
    )
    early_stopping_patience: int | None = field(
        default=None,
        metadata={
            "help": "Stop when eval loss has not improved for this many evals in a row and keep "
            "the weights of the best eval (>= 1); 0: off. Default: 3 when there are evals "
            "during training."
        },
    )
    loss_turns: str = field(
        default="all",
        metadata={
            "help": "Which assistant turns of a conversation carry loss: 'all' (every one "
            "whose weight is not 0) or 'last' (only the final one)."
        },
    )
    eval_file: str | None = field(
        default=None, metadata={"help": "A JSONL file of the same format used as the eval set."}
    )
    eval_max_examples: int = field(
        default=20,
        metadata={"help": "At most this many eval examples get generated answers (>= 0)."},
    )
    eval_max_new_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Token budget of each generated eval answer (>= 1). Default: the longest "
            "eval reference in tokens + 8, at most 256 (a longer answer cannot match exactly, "
            "and cutting it off can only raise its token F1)."
        },
    )

    def __post_init__(self) -> None:
        self._validate_common()

    def _validate_common(self) -> None:
        if self.base_model is not None and not isinstance(self.base_model, str):
            raise ConfigError("base_model", "must be a folder path string or null")
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(
                "quantization",
                f"{self.quantization!r} is not supported: use 'nf4' (QLoRA) or 'none' (LoRA)",
            )
        if not isinstance(self.device, str) or not (
            self.device in ("auto", "cpu") or self.device.startswith("cuda")
        ):
            raise ConfigError("device", f"{self.device!r}: use 'auto', 'cpu' or 'cuda[:N]'")
        if not is_int(self.r) or not 1 <= self.r <= MAX_RANK:
            raise ConfigError("r", f"{self.r!r} is out of range: set an integer in 1..{MAX_RANK}")
        if not is_number(self.lora_alpha) or self.lora_alpha <= 0:
            raise ConfigError("lora_alpha", f"{self.lora_alpha!r}: must be a number > 0")
        if not is_number(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            raise ConfigError(
                "lora_dropout", f"{self.lora_dropout!r}: must satisfy 0 <= dropout < 1"
            )
        tm = self.target_modules
        if isinstance(tm, str):
            if not tm:
                raise ConfigError("target_modules", "empty: use 'all-linear' or a list of names")
        elif isinstance(tm, list | tuple):
            if not tm or not all(isinstance(x, str) and x for x in tm):
                raise ConfigError(
                    "target_modules", "must be a non-empty list of module names (strings)"
                )
            self.target_modules = list(tm)
        else:
            raise ConfigError("target_modules", "must be 'all-linear' or a list of module names")
        self._validate_trainable_tokens()
        for name in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, "must be true or false")
        if self.learning_rate is not None and (
            not is_number(self.learning_rate) or not 0 < self.learning_rate < 1
        ):
            raise ConfigError(
                "learning_rate", f"{self.learning_rate!r}: must be in (0, 1), e.g. 2e-4, or null"
            )
        if self.epochs is not None and (not is_number(self.epochs) or self.epochs <= 0):
            raise ConfigError("epochs", f"{self.epochs!r}: must be > 0 (or set max_steps)")
        if self.max_steps is not None and (not is_int(self.max_steps) or self.max_steps < 1):
            raise ConfigError(
                "max_steps", f"{self.max_steps!r}: must be an integer >= 1, or null for epochs"
            )
        if not is_int(self.batch_size) or self.batch_size < 1:
            raise ConfigError("batch_size", f"{self.batch_size!r}: must be an integer >= 1")
        if not is_int(self.gradient_accumulation_steps) or self.gradient_accumulation_steps < 1:
            raise ConfigError(
                "gradient_accumulation_steps",
                f"{self.gradient_accumulation_steps!r}: must be an integer >= 1",
            )
        if not is_int(self.max_length) or self.max_length < 16:
            raise ConfigError("max_length", f"{self.max_length!r}: must be an integer >= 16")
        if self.lr_scheduler_type not in SCHEDULERS:
            raise ConfigError(
                "lr_scheduler_type",
                f"{self.lr_scheduler_type!r}: use one of {', '.join(SCHEDULERS)}",
            )
        if self.warmup_steps is not None and (
            not is_int(self.warmup_steps) or self.warmup_steps < 0
        ):
            raise ConfigError("warmup_steps", f"{self.warmup_steps!r}: must be an integer >= 0")
        if self.gradient_checkpointing is not None and not isinstance(
            self.gradient_checkpointing, bool
        ):
            raise ConfigError("gradient_checkpointing", "must be true, false or null (auto)")
        if not is_int(self.seed):
            raise ConfigError("seed", f"{self.seed!r}: must be an integer")
        if self.eval_fraction is not None and (
            not is_number(self.eval_fraction) or not 0 <= self.eval_fraction < 1
        ):
            raise ConfigError(
                "eval_fraction", f"{self.eval_fraction!r}: must satisfy 0 <= fraction < 1"
            )
        for name in ("eval_steps", "early_stopping_patience"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 0):
                raise ConfigError(name, f"{value!r}: must be an integer >= 0, or null (auto)")
        if self.loss_turns not in LOSS_TURNS:
            raise ConfigError(
                "loss_turns", f"{self.loss_turns!r}: use 'all' or 'last' (assistant turns)"
            )
        if self.eval_file is not None and not isinstance(self.eval_file, str):
            raise ConfigError("eval_file", "must be a path string or null")
        if not is_int(self.eval_max_examples) or self.eval_max_examples < 0:
            raise ConfigError("eval_max_examples", "must be an integer >= 0")
        if self.eval_max_new_tokens is not None and (
            not is_int(self.eval_max_new_tokens) or self.eval_max_new_tokens < 1
        ):
            raise ConfigError("eval_max_new_tokens", "must be an integer >= 1, or null (auto)")

    def _validate_trainable_tokens(self) -> None:
        """The shape of the value; whether each token exists needs the tokenizer
        (``trainer.tokens.explicit_ids``)."""
        tt = self.trainable_tokens
        if isinstance(tt, str):
            if tt not in TRAINABLE_TOKEN_MODES:
                raise ConfigError(
                    "trainable_tokens",
                    f"{tt!r}: use 'auto', 'none' or a list of token strings or ids "
                    "(a single token is a list of one)",
                )
            return
        if not isinstance(tt, list | tuple) or not tt:
            raise ConfigError(
                "trainable_tokens", "must be 'auto', 'none' or a non-empty list of tokens"
            )
        if len(tt) > MAX_TRAINABLE_TOKENS:
            raise ConfigError(
                "trainable_tokens",
                f"{len(tt)} tokens: at most {MAX_TRAINABLE_TOKENS}; train fewer rows",
            )
        for item in tt:
            if isinstance(item, int) and not isinstance(item, bool):
                if item < 0:
                    raise ConfigError("trainable_tokens", f"token id {item} is negative")
            elif not isinstance(item, str) or not item:
                raise ConfigError(
                    "trainable_tokens",
                    f"{item!r}: each entry must be a token string or an integer id",
                )
        self.trainable_tokens = list(tt)

    # -- (de)serialisation: the HTTP request and the job record use the same shape

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Build from a JSON object; unknown keys are an error that lists the valid ones."""
        if not isinstance(data, dict):
            raise ConfigError("config", f"must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                unknown[0],
                f"unknown field(s) {', '.join(unknown)}; valid fields: {', '.join(sorted(names))}",
            )
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """Field name -> help text, for CLI help and API docs."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}

    @property
    def mixed_batch_servable(self) -> bool:
        # PEFT's adapter_names (mixed batches) raises for DoRA.
        return not self.use_dora
