"""Pieces of the job skeleton (trainer/train.py): model preparation, progress/cancel
callback, eval (loss + generated answers, base vs trained), and the atomic adapter + card
output."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trainer.atomic import write_json_atomic
from trainer.base_model import (
    LoadedBaseModel,
    load_base_model,
    model_fingerprint,
    native_bf16,
)
from trainer.config import JobConfig
from trainer.data import Example, LoadedData, prompt_for_generation
from trainer.defaults import n_eval_for
from trainer.metrics import aggregate
from trainer.tokens import TrainableTokens, model_vocab_size, resolve_trainable_tokens

logger = logging.getLogger(__name__)

CARD_NAME = "swapserve_card.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
CARD_VERSION = 1


class TrainingCancelled(RuntimeError):
    """should_stop() said stop; nothing was written."""


@dataclass
class ProgressUpdate:
    step: int
    total_steps: int
    loss: float | None
    eta_s: float | None
    elapsed_s: float
    epoch: float | None = None
    # "train", then "eval" after the last step (eval loss, then generated answers, base and
    # adapter): on a CPU the eval can take minutes, so it reports progress of its own.
    phase: str = "train"
    eval_done: int | None = None  # answers generated so far
    eval_total: int | None = None  # answers to generate (base + adapter)
    # Set on the update that reports an eval during training (eval_steps): the eval loss at
    # ``step``; ``loss`` then repeats the last train loss, which it does not add to.
    eval_loss: float | None = None

    @property
    def progress(self) -> float:
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0


ProgressFn = Callable[[ProgressUpdate], None]
StopFn = Callable[[], bool]
# Raises TrainingCancelled when the job should stop; called between (and inside) eval steps.
CheckFn = Callable[[], None]


@dataclass
class TrainResult:
    output_dir: Path
    card: dict[str, Any]
    loss_history: list[dict[str, float]]
    final_loss: float | None
    steps: int
    wall_time_s: float
    eval: dict[str, Any] | None
    # The trained PEFT model, for in-process callers (tests, benchmarks); not serialised.
    model: Any = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("model")
        out["output_dir"] = str(self.output_dir)
        return out


def library_versions() -> dict[str, str]:
    import bitsandbytes
    import peft
    import torch
    import transformers
    import trl

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "trl": trl.__version__,
        "bitsandbytes": bitsandbytes.__version__,
    }


def peak_memory() -> dict[str, int]:
    import torch

    # ru_maxrss is KiB on Linux: the peak resident set of this process (the job's own,
    # when it runs in a worker process).
    out = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available():
        out["peak_cuda_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    return out


def check_output_dir(output_dir: Path) -> None:
    """Refuse before training, not after: a result must never overwrite another."""
    if output_dir.exists():
        raise FileExistsError(
            f"output folder {output_dir} already exists: pick another name or remove it"
        )


def split_eval(
    data: LoadedData, config: JobConfig, eval_data: LoadedData | None
) -> tuple[list[Example], list[Example]]:
    """Train/eval examples: a given eval file wins; else a seeded random hold-out."""
    examples = list(data.examples)
    if eval_data is not None:
        return examples, list(eval_data.examples)
    fraction = config.eval_fraction
    if fraction is None:  # not resolved yet: the automatic split's size
        fraction = n_eval_for(len(examples)) / len(examples)
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    n_eval = max(1, round(len(examples) * fraction))
    n_eval = min(n_eval, len(examples) - 1)
    order = list(range(len(examples)))
    random.Random(config.seed).shuffle(order)
    held = set(order[:n_eval])
    return (
        [e for i, e in enumerate(examples) if i not in held],
        [e for i, e in enumerate(examples) if i in held],
    )


def load_base(config: JobConfig, base: LoadedBaseModel | None) -> LoadedBaseModel:
    if base is not None:
        if base.quantization != config.quantization:
            raise ValueError(
                f"the given base is {base.quantization!r} but config.quantization is "
                f"{config.quantization!r}"
            )
        return base
    return load_base_model(
        config.base_model,
        quantization=config.quantization,  # type: ignore[arg-type]  # resolved by the method
        device=config.device,
    )


def use_gradient_checkpointing(config: JobConfig, device: str) -> bool:
    from trainer.methods import get_method

    if config.gradient_checkpointing is not None:
        return config.gradient_checkpointing
    return device.startswith("cuda") and get_method(str(config.method)).gradient_checkpointing


def fast_bf16(device: str) -> bool:
    """Whether bf16 matmuls are native here. CPUs without AVX512-BF16/AMX emulate them:
    measured on a 2-core AVX2 machine, QLoRA steps on Gemma 3 270M took ~95 s in bf16
    against ~5 s in fp32."""
    return native_bf16(device)


def prepare_model(base: LoadedBaseModel, gradient_checkpointing: bool) -> Any:
    """Make the base ready for adapter training; for a 4-bit base, the QLoRA recipe."""

    model = base.model
    if base.quantization == "nf4":
        from peft import prepare_model_for_kbit_training

        # Freezes the base, upcasts the small non-quantized weights (norms, embeddings) to
        # fp32 for stable gradients, and makes checkpointing work with frozen inputs.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        # (the loader already picks fp32 compute for the 4-bit layers where bf16 matmuls
        # are emulated; see trainer.base_model.native_bf16)
    else:
        for param in model.parameters():
            param.requires_grad_(False)
    return model


def fix_adapter_dtype(trainer: Any, device: str) -> None:
    """TRL casts LoRA weights to bf16 on a quantized base (the QLoRA paper's choice); on
    hardware without native bf16, keep them fp32 (see ``fast_bf16``)."""
    import torch

    if fast_bf16(device):
        return
    for param in trainer.model.parameters():
        if param.requires_grad and param.dtype == torch.bfloat16:
            param.data = param.data.to(torch.float32)


def trainable_tokens_for(
    config: JobConfig, base: LoadedBaseModel, train_examples: list[Example]
) -> TrainableTokens:
    """Resolve ``config.trainable_tokens`` against this base and the training examples;
    ConfigError (before any training) for a token the tokenizer does not have."""
    tokens = resolve_trainable_tokens(
        config.trainable_tokens,
        base.tokenizer,
        stop_token_ids=base.stop_token_ids,
        examples=train_examples,
        model_vocab_size=model_vocab_size(base.model),
    )
    logger.info("%s", tokens.describe())
    return tokens


def fit_output_layer_to_fused_head(peft_model: Any) -> None:
    """Let TRL's fused LM head see the trained token rows of a tied output layer.

    TRL's trainers compute the loss from ``get_output_embeddings().weight`` and ``.bias``
    instead of calling the layer. For a model with tied embeddings PEFT wraps the output
    layer in a TrainableTokensWrapper, whose ``weight`` already holds the trained rows
    (gradients flow through it) but which has no ``bias`` while the adapter is active, so
    the fused head fails. The wrapped layer's own forward applies no bias either: expose
    the original layer's missing bias as ``None``, which is what both sides compute."""
    from peft.utils.other import TrainableTokensWrapper

    head = peft_model.get_output_embeddings()
    if not isinstance(head, TrainableTokensWrapper):
        return
    if getattr(head.original_module, "bias", None) is not None:
        raise ValueError(
            "trainable tokens on a tied output layer with a bias are not supported: PEFT's "
            "wrapper drops the bias; set trainable_tokens to 'none'"
        )
    # a plain attribute (no parameter), found before the wrapper's __getattr__ is asked
    head.bias = None  # type: ignore[assignment]


def trainer_args(config: JobConfig, device: str, scratch: Path, gc: bool) -> dict[str, Any]:
    """Keyword arguments common to SFTConfig and DPOConfig."""
    import torch

    on_cuda = device.startswith("cuda")
    bf16 = bool(on_cuda and torch.cuda.is_bf16_supported())
    return {
        "output_dir": str(scratch),
        "learning_rate": config.learning_rate,
        "num_train_epochs": config.epochs if config.epochs is not None else 1.0,
        "max_steps": config.max_steps if config.max_steps is not None else -1,
        "per_device_train_batch_size": config.batch_size,
        "per_device_eval_batch_size": config.batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "lr_scheduler_type": config.lr_scheduler_type,
        "warmup_steps": config.warmup_steps,
        "max_length": config.max_length,
        "seed": config.seed,
        "data_seed": config.seed,
        "logging_steps": 1,
        "logging_strategy": "steps",
        # eval loss during training when trainer.defaults asked for it (early stopping)
        "eval_strategy": "steps" if config.eval_steps else "no",
        "eval_steps": config.eval_steps or None,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        # TRL defaults to bf16 mixed precision; on CPU it is slower than fp32 and on old
        # GPUs it fails, so ask for it only where the hardware has it.
        "bf16": bf16,
        "fp16": False,
        "use_cpu": not on_cuda,
        "gradient_checkpointing": gc,
        "gradient_checkpointing_kwargs": {"use_reentrant": False} if gc else None,
    }


def make_progress_callback(progress: ProgressFn | None, should_stop: StopFn | None) -> Any:
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        """Forwards step/loss/eta to ``progress``; stops at the next step when asked."""

        def __init__(self) -> None:
            self.history: list[dict[str, float]] = []
            # the evals during training (eval_steps), not the eval after it
            self.eval_history: list[dict[str, float]] = []
            self.cancelled = False
            self.started = time.monotonic()
            self.training = False

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.monotonic()
            self.training = True

        def on_train_end(self, args, state, control, **kwargs):
            # the evals after training (adapter, then base) log an eval_loss too
            self.training = False

        def on_step_end(self, args, state, control, **kwargs):
            if should_stop is not None and should_stop():
                self.cancelled = True
                control.should_training_stop = True

        def on_prediction_step(self, args, state, control, **kwargs):
            # The evals (during training at eval_steps, and ours after it) call predict. The
            # Trainer has no flag to end an evaluation early, so raise out of it.
            if should_stop is not None and should_stop():
                self.cancelled = True
                raise TrainingCancelled("cancelled during eval (eval loss)")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or state.global_step == 0:
                return
            if "eval_loss" in logs:
                self._eval_logged(state, float(logs["eval_loss"]))
                return
            if "loss" not in logs:
                return
            loss = float(logs["loss"])
            self.history.append({"step": state.global_step, "loss": loss})
            self._report(state, loss if math.isfinite(loss) else None)

        def _eval_logged(self, state, eval_loss: float) -> None:
            # once per step: a forced eval at the last step may repeat a scheduled one
            seen = bool(self.eval_history) and self.eval_history[-1]["step"] == state.global_step
            if not self.training or seen or not math.isfinite(eval_loss):
                return
            self.eval_history.append({"step": state.global_step, "eval_loss": eval_loss})
            last = self.history[-1]["loss"] if self.history else None
            loss = last if last is not None and math.isfinite(last) else None
            self._report(state, loss, eval_loss=eval_loss)

        def _report(self, state, loss: float | None, eval_loss: float | None = None) -> None:
            if progress is None:
                return
            elapsed = time.monotonic() - self.started
            total = int(state.max_steps or 0)
            done = state.global_step
            eta = elapsed / done * max(0, total - done) if done else None
            progress(
                ProgressUpdate(
                    step=done,
                    total_steps=total,
                    loss=loss,
                    eta_s=eta,
                    elapsed_s=elapsed,
                    epoch=float(state.epoch) if state.epoch is not None else None,
                    eval_loss=eval_loss,
                )
            )

    return ProgressCallback()


def quiet_trainer(trainer: Any) -> None:
    """Progress goes through our callback and logging; drop the Trainer's stdout printer."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


class EvalPhase:
    """The eval phase of a run: reports its progress and stops it on cancel.

    ``check()`` raises TrainingCancelled once ``should_stop()`` is true; it is called for
    every eval-loss batch and every generated token, so a cancel during eval takes effect
    within one forward pass instead of after the whole eval."""

    def __init__(
        self,
        progress: ProgressFn | None,
        should_stop: StopFn | None,
        trainer: Any,
        callback: Any,
        answers: int,
    ):
        self.progress = progress
        self.should_stop = should_stop
        self.step = int(trainer.state.global_step)
        self.total_steps = int(trainer.state.max_steps or self.step)
        history = callback.history
        self.loss = history[-1]["loss"] if history else None
        self.started = callback.started
        self.total = answers
        self.done = 0

    def check(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise TrainingCancelled(
                f"cancelled during eval ({self.done} of {self.total} answers generated)"
            )

    def report(self, done: int | None = None) -> None:
        """Tell ``progress`` where the eval stands (``done`` answers generated so far)."""
        if done is not None:
            self.done = done
        self.check()
        if self.progress is None:
            return
        self.progress(
            ProgressUpdate(
                step=self.step,
                total_steps=self.total_steps,
                loss=self.loss,
                eta_s=None,
                elapsed_s=time.monotonic() - self.started,
                phase="eval",
                eval_done=self.done,
                eval_total=self.total,
            )
        )


# Eval prompts per generate() call. On a CPU a decode step of the 4-bit model costs about
# the same for 8 rows as for 32 (dequantizing the weights dominates), so fewer, larger
# batches finish the eval sooner.
EVAL_BATCH_SIZE = 32
AUTO_EVAL_TOKENS_MARGIN = 8
AUTO_EVAL_TOKENS_MAX = 256


def eval_token_budget(config: JobConfig, tokenizer: Any, references: list[str]) -> int:
    """max_new_tokens of each eval answer: the configured one, else just past the longest
    reference (generating further cannot turn a miss into an exact match)."""
    if config.eval_max_new_tokens is not None:
        return config.eval_max_new_tokens
    longest = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references)
    return min(AUTO_EVAL_TOKENS_MAX, longest + AUTO_EVAL_TOKENS_MARGIN)


def answers_to_generate(examples: list[Example], config: JobConfig) -> int:
    """How many answers eval_generation generates: base and adapter for each example."""
    return 2 * len(examples[: config.eval_max_examples])


def _stop_on_check(check: CheckFn) -> Any:
    """A generation StoppingCriteria that calls ``check`` at every token (it raises)."""
    import torch
    from transformers import StoppingCriteria

    class CheckEveryToken(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            check()
            # (batch,): never ends a row itself; EOS and max_new_tokens do that
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return CheckEveryToken()


def generate_answers(
    model: Any,
    tokenizer: Any,
    examples: list[Example],
    max_new_tokens: int,
    stop_token_ids: list[int],
    batch_size: int = 8,
    *,
    check: CheckFn | None = None,
    after_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy answers to each example's prompt, batched with left padding.

    ``check`` runs at every generated token and may raise to abandon the generation;
    ``after_batch(n)`` is told how many answers are done after each batch."""
    import torch
    from transformers import StoppingCriteriaList

    answers: list[str] = []
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right edge
    device = next(model.parameters()).device
    # After training the model is still in train mode (dropout on) and its config says
    # use_cache=False (set for training): generating like that re-runs the whole prefix
    # at every token. Evaluate as the server would serve.
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            rendered = [prompt_for_generation(e, tokenizer) for e in chunk]
            has_special = rendered[0][1]
            enc = tokenizer(
                [text for text, _ in rendered],
                add_special_tokens=not has_special,
                padding=True,
                return_tensors="pt",
            ).to(device)
            stopping = StoppingCriteriaList([_stop_on_check(check)]) if check else None
            with torch.no_grad():
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=stop_token_ids or None,
                    pad_token_id=tokenizer.pad_token_id,
                    use_cache=True,
                    stopping_criteria=stopping,
                )
            new_tokens = out[:, enc["input_ids"].shape[1] :]  # (batch, new)
            answers.extend(
                t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            )
            if after_batch is not None:
                after_batch(len(answers))
    finally:
        tokenizer.padding_side = old_side
        if was_training:
            model.train()
    return answers


def eval_generation(
    model: Any,
    base: LoadedBaseModel,
    examples: list[Example],
    config: JobConfig,
    phase: EvalPhase | None = None,
    *,
    base_model: Any = None,
    skip_base: bool = False,
) -> dict[str, Any]:
    """Exact match and token F1 of greedy answers, base vs trained. The base is
    ``base_model`` when given (a full fine-tune's frozen copy), else ``model`` with its
    adapter disabled; ``skip_base`` answers with ``model`` only. ``phase`` (optional) gets
    progress after each batch and can cancel mid-answer."""
    chosen = examples[: config.eval_max_examples]
    if not chosen:
        return {}
    refs = [e.reference_answer(base.tokenizer) for e in chosen]
    n = len(chosen)
    budget = eval_token_budget(config, base.tokenizer, refs)
    start = phase.done if phase is not None else 0

    def hooks(offset: int) -> dict[str, Any]:
        if phase is None:
            return {}
        return {
            "check": phase.check,
            "after_batch": lambda done: phase.report(start + offset + done),
        }

    def answers(which: Any, offset: int) -> list[str]:
        return generate_answers(
            which,
            base.tokenizer,
            chosen,
            budget,
            base.stop_token_ids,
            EVAL_BATCH_SIZE,
            **hooks(offset),
        )

    was_training = model.training
    model.eval()
    try:
        base_answers: list[str] | None = None
        if skip_base:
            pass
        elif base_model is not None:
            base_answers = answers(base_model, 0)
        else:
            with model.disable_adapter():
                base_answers = answers(model, 0)
        adapter_answers = answers(model, 0 if skip_base else n)
    finally:
        model.train(was_training)
    samples = [
        {"line": e.line, "reference": r, "adapter": a}
        | ({"base": base_answers[i]} if base_answers else {})
        for i, (e, r, a) in enumerate(zip(chosen, refs, adapter_answers, strict=True))
    ][:5]
    out: dict[str, Any] = {
        "adapter": aggregate(adapter_answers, refs),
        "max_new_tokens": budget,
        "samples": samples,
    }
    if base_answers is not None:
        out["base"] = aggregate(base_answers, refs)
    return out


def build_card(
    *,
    kind: str,
    config: JobConfig,
    base: LoadedBaseModel,
    data: LoadedData,
    eval_data: LoadedData | None,
    n_train: int,
    n_eval: int,
    length_report: Any,
    loss_history: list[dict[str, float]],
    steps: int,
    eval_results: dict[str, Any] | None,
    wall_time_s: float,
    name: str,
    tokens: TrainableTokens | None = None,
    peft_config: dict[str, Any] | None = None,
    parameters: dict[str, Any] | None = None,
    train_time_s: float | None = None,
    extraction: dict[str, Any] | None = None,
    defaults: dict[str, Any] | None = None,
) -> dict[str, Any]:
    from trainer.methods import get_method

    method = get_method(str(config.method))
    final = loss_history[-1]["loss"] if loss_history else None
    hyperparameters = config.method_dict()
    # What "auto" (or the list) became for this base and data: the rows the file holds.
    resolved = tokens.to_dict() if tokens else {"ids": [], "tokens": []}
    hyperparameters["trainable_token_ids"] = resolved["ids"]
    hyperparameters["trainable_token_strings"] = resolved["tokens"]
    card: dict[str, Any] = {
        "card_version": CARD_VERSION,
        "name": name,
        "kind": kind,
        "objective": kind,
        "method": {
            "name": method.name,
            # the adapter file's kind: a full fine-tune registers its extracted LoRA
            "peft_type": method.peft_type or "LORA",
            "summary": method.summary,
            "parameters": parameters,
            # the adapter's own PEFT config, as written to adapter_config.json
            "peft_config": peft_config,
        },
        "base_model": {
            "id": base.model_id,
            "path": str(base.path),
            "fingerprint": model_fingerprint(base.path),
            "quantization": base.quantization,
        },
        "data": {
            "path": str(data.path),
            "sha256": data.sha256,
            "format": data.format,
            "examples": len(data.examples),
            "train_examples": n_train,
            "eval_examples": n_eval,
            "eval_file_sha256": eval_data.sha256 if eval_data else None,
            "lengths": asdict(length_report),
        },
        "hyperparameters": hyperparameters,
        # which settings trainer.defaults chose from the data, and why
        "defaults": defaults,
    }
    if method.peft_type == "LORA":
        card["lora"] = {
            "r": config.r,
            "alpha": config.lora_alpha,
            "target_modules": config.target_modules,
            "use_rslora": config.use_rslora,
            "use_dora": config.use_dora,
            "trainable_token_indices": resolved["ids"],
        }
    if extraction is not None:
        card["extraction"] = extraction
    card.update(
        {
            "mixed_batch_servable": config.mixed_batch_servable,
            "serving_note": None
            if config.mixed_batch_servable
            else "DoRA adapters cannot share a mixed-adapter batch (PEFT adapter_names raises); "
            "serve in a lane of their own",
            "libraries": library_versions(),
            "train": {
                "steps": steps,
                "final_loss": final,
                "loss_history": loss_history,
                "train_time_s": round(train_time_s, 3) if train_time_s is not None else None,
            },
            "eval": eval_results,
            "wall_time_s": round(wall_time_s, 3),
            "memory": peak_memory(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    )
    return card


def write_output(model: Any, card: dict[str, Any], output_dir: Path) -> Path:
    """Save adapter + card into a temp folder beside ``output_dir`` and rename at the end,
    so a failure or a kill never leaves a folder that looks complete."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}.tmp-"))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        # Keep only what the server loads: PEFT also writes a README model card.
        for child in tmp.iterdir():
            if child.name not in ADAPTER_FILES:
                if child.is_dir():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        missing = [f for f in ADAPTER_FILES if not (tmp / f).is_file()]
        if missing:
            raise RuntimeError(f"PEFT did not write {', '.join(missing)}")
        card["adapter_bytes"] = (tmp / ADAPTER_FILES[1]).stat().st_size
        card["adapter_parameters"] = _tensor_elements(tmp / ADAPTER_FILES[1])
        # the folder is renamed into place whole below; the card is written durably first
        write_json_atomic(tmp / CARD_NAME, card, indent=2)
        check_output_dir(output_dir)
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


def _tensor_elements(path: Path) -> int:
    """Values stored in a safetensors file (what the adapter holds on disk; for P-tuning
    the virtual tokens its encoder produced, not the encoder)."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(path), framework="pt") as fh:
        for key in fh.keys():
            n = 1
            for dim in fh.get_slice(key).get_shape():
                n *= dim
            total += n
    return total


def scratch_dir(output_dir: Path) -> tempfile.TemporaryDirectory:
    """Trainer's own output_dir (it writes nothing there with save_strategy='no', but wants one)."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(dir=output_dir.parent, prefix=f".{output_dir.name}.scratch-")


def finish_run(
    *,
    kind: str,
    trainer: Any,
    peft_model: Any,
    history: list[dict[str, float]],
    config: Any,
    base: Any,
    data: Any,
    eval_data: Any,
    n_train: int,
    n_eval: int,
    length_report: Any,
    eval_results: dict[str, Any] | None,
    output_dir: Path,
    started: float,
    should_stop: StopFn | None,
    name: str | None,
    tokens: TrainableTokens | None = None,
    parameters: dict[str, Any] | None = None,
    train_time_s: float | None = None,
    extraction: dict[str, Any] | None = None,
    full_model: tuple[Any, Any, Path] | None = None,
    defaults: dict[str, Any] | None = None,
) -> TrainResult:
    """The end every job shares: last cancel check, card, [full model folder], adapter
    folder, result. The model folder is written first and removed again if the adapter
    cannot be: a job leaves both or neither."""
    if should_stop is not None and should_stop():
        raise TrainingCancelled("cancelled after training, before writing")
    wall = time.monotonic() - started
    peft_config = (
        peft_model.peft_config["default"].to_dict() if hasattr(peft_model, "peft_config") else None
    )
    card = build_card(
        kind=kind,
        config=config,
        base=base,
        data=data,
        eval_data=eval_data,
        n_train=n_train,
        n_eval=n_eval,
        length_report=length_report,
        loss_history=history,
        steps=trainer.state.global_step,
        eval_results=eval_results,
        wall_time_s=wall,
        name=name or output_dir.name,
        tokens=tokens,
        peft_config=_jsonable(peft_config),
        parameters=parameters,
        train_time_s=train_time_s,
        extraction=extraction,
        defaults=defaults,
    )
    model_dir = None
    if full_model is not None:
        from trainer.extract import save_full_model

        model, tokenizer, model_dir = full_model
        save_full_model(model, tokenizer, model_dir, card)
    try:
        write_output(peft_model, card, output_dir)
    except BaseException:
        if model_dir is not None:
            shutil.rmtree(model_dir, ignore_errors=True)
        raise
    logger.info("%s adapter written to %s in %.1f s", kind.upper(), output_dir, wall)
    return TrainResult(
        output_dir=output_dir,
        card=card,
        loss_history=history,
        final_loss=card["train"]["final_loss"],
        steps=trainer.state.global_step,
        wall_time_s=wall,
        eval=eval_results,
        model=peft_model,
    )


def _jsonable(value: Any) -> Any:
    """A PEFT config dict as plain JSON (sets become sorted lists, enums their values)."""
    return json.loads(
        json.dumps(value, default=lambda v: sorted(v) if isinstance(v, set) else str(v))
    )
