"""The job configuration every objective shares: base model, method, the methods' own
sections, training loop, eval.

One config object drives the CLI, the HTTP job request (``from_dict``), the job record
(``to_dict``) and the card. Every field is documented in ``metadata["help"]`` and checked in
``__post_init__``, so a bad value fails when the config is built, not minutes into a job.

Which fields a PEFT method reads, its defaults and its checks live in the method table
(``trainer.methods``); an objective (``trainer.sft``, ``trainer.dpo``, ...) subclasses
``JobConfig`` with its own fields. A method's field set to anything but its default on a job
of another method is refused: a value the job would ignore is a mistake to report.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

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


def _methods_phrase(names: list[str]) -> str:
    if len(names) == 1:
        return f"method {names[0]}"
    return f"methods {', '.join(names[:-1])} and {names[-1]}"


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return (isinstance(value, int | float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class JobConfig:
    """Fields common to every training method. Subclasses add their own."""

    # -- base model and method
    base_model: str | None = field(
        default=None,
        metadata={
            "help": "Base model: a bundled model's short name ('smollm2-135m-instruct', "
            "'gemma3-270m'), a local Hugging Face model folder, or None/'bundled' for the "
            "default bundled smollm2-135m-instruct. Never downloaded."
        },
    )
    method: str | None = field(
        default=None,
        metadata={
            "help": "What trains: lora, qlora, ia3, prompt_tuning, prefix_tuning, p_tuning, "
            "ln_tuning or full (see the method table). Default: qlora on a 4-bit base "
            "(quantization 'nf4' or unset), lora with quantization 'none'."
        },
    )
    quantization: str | None = field(
        default=None,
        metadata={
            "help": "'nf4' loads the base in 4-bit NF4, 'none' unquantized. Default: the "
            "method's (qlora: nf4; lora and full: none; the others: nf4)."
        },
    )
    device: str = field(
        default="auto",
        metadata={"help": "'auto' (CUDA when available, else CPU), 'cpu' or 'cuda[:N]'."},
    )
    # -- lora / qlora
    r: int = field(default=16, metadata={"help": f"LoRA rank, 1..{MAX_RANK}."})
    lora_alpha: float = field(
        default=32.0,
        metadata={"help": "LoRA scaling numerator (> 0): the update is scaled by alpha/r."},
    )
    lora_dropout: float = field(
        default=0.05, metadata={"help": "Dropout on the LoRA input, 0 <= dropout < 1."}
    )
    target_modules: str | list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules the method adapts (lora, qlora, ia3, ln_tuning): a list of module "
            "names such as ['q_proj', 'v_proj'], a regex over module paths, or 'all-linear' "
            "(every linear layer but the output head). Default: 'all-linear' for LoRA; PEFT's "
            "modules for the base's model type for IA3 (e.g. q_proj, v_proj, down_proj) and "
            "ln_tuning (every norm layer)."
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
            f"{MAX_TRAINABLE_TOKENS} token strings (as the tokenizer spells them) or ids. "
            "LoRA methods only: for the others 'auto' trains no rows."
        },
    )
    # -- ia3
    feedforward_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "IA3: the target modules whose input (not output) is scaled, as IA3 does "
            "for feed-forward layers. Default: PEFT's for the model type, among the targets."
        },
    )
    # -- prompt_tuning, prefix_tuning, p_tuning
    num_virtual_tokens: int = field(
        default=20,
        metadata={
            "help": "Virtual tokens (prompt methods), 1..512; with max_length they must fit "
            "the base model's context."
        },
    )
    prompt_tuning_init_text: str | None = field(
        default=None,
        metadata={
            "help": "prompt_tuning: start the virtual tokens from this text's embeddings "
            "(repeated or cut to num_virtual_tokens); null starts them at random."
        },
    )
    prefix_projection: bool = field(
        default=False,
        metadata={
            "help": "prefix_tuning: train the prefixes through a two-layer MLP "
            "(reparameterisation), saved as the prefixes it produces."
        },
    )
    encoder_hidden_size: int = field(
        default=128, metadata={"help": "p_tuning: hidden size of the prompt encoder."}
    )
    encoder_reparameterization_type: str = field(
        default="MLP", metadata={"help": "p_tuning: the prompt encoder, 'MLP' or 'LSTM'."}
    )
    # -- full
    extract_rank: int | None = field(
        default=None,
        metadata={
            "help": "full: rank of the LoRA extracted from each linear layer's weight change "
            "(truncated SVD), 1..256. Null: per layer, the smallest rank that keeps "
            "extract_energy of the change, at most extract_max_rank."
        },
    )
    extract_energy: float = field(
        default=0.9,
        metadata={
            "help": "full: share of each layer's squared singular values the extracted LoRA "
            "keeps when extract_rank is null, in (0, 1]."
        },
    )
    extract_max_rank: int = field(
        default=64,
        metadata={
            "help": "full: the highest per-layer rank extract_energy may pick (the server's "
            "default max_lora_rank is 64)."
        },
    )
    # -- training loop
    learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Peak learning rate of AdamW, in (0, 1). Default: chosen from the method "
            "(its rate in the method table), the objective and the run's length "
            "(trainer/defaults.py)."
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

    # Scales the method's default learning rate (objectives override it; trainer.defaults
    # applies it when learning_rate is left unset).
    LR_SCALE: ClassVar[float] = 1.0
    # The objective this config belongs to (objectives override it).
    OBJECTIVE: ClassVar[str] = "sft"

    def __post_init__(self) -> None:
        from trainer import methods

        method = methods.resolve(self)
        self._refuse_fields_of_other_methods(method.name, method.fields)
        methods.check_objective(method, self.OBJECTIVE)
        self._validate_trainable_tokens()
        self._validate_common()
        method.check(self)

    def _refuse_fields_of_other_methods(self, method: str, own: tuple[str, ...]) -> None:
        from trainer import methods

        for name in sorted(methods.method_owned_fields() - set(own)):
            if getattr(self, name) != self.field_default(name):
                raise ConfigError(
                    name,
                    f"only used by {_methods_phrase(methods.owners(name))}; this job's "
                    f"method is {method!r}: leave it out, or pick one of those methods",
                )

    def _validate_common(self) -> None:
        if self.base_model is not None and not isinstance(self.base_model, str):
            raise ConfigError("base_model", "must be a folder path string or null")
        if not isinstance(self.device, str) or not (
            self.device in ("auto", "cpu") or self.device.startswith("cuda")
        ):
            raise ConfigError("device", f"{self.device!r}: use 'auto', 'cpu' or 'cuda[:N]'")
        tm = self.target_modules
        if tm is None:
            pass
        elif isinstance(tm, str):
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

    @classmethod
    def field_default(cls, name: str) -> Any:
        for f in dataclasses.fields(cls):
            if f.name == name:
                if f.default_factory is not dataclasses.MISSING:
                    return f.default_factory()
                return f.default
        raise KeyError(name)

    def method_dict(self) -> dict[str, Any]:
        """The fields that configure this job: the common ones, its method's and its
        objective's (what the card records; other methods' fields are left out)."""
        from trainer import methods

        others = methods.method_owned_fields() - set(methods.get_method(str(self.method)).fields)
        return {k: v for k, v in self.to_dict().items() if k not in others}

    @property
    def mixed_batch_servable(self) -> bool:
        # PEFT's adapter_names (mixed batches) raises for DoRA.
        return not (self.method in ("lora", "qlora") and self.use_dora)
