"""Direct preference optimisation of a LoRA adapter with TRL's DPOTrainer.

The reference policy is the same base with the adapter disabled (``ref_model=None`` on a
PEFT model): no second copy of the weights. Read ``run_dpo`` top to bottom; it mirrors
``run_sft``. Prompts are always rendered with the chat template (a bare string prompt is
one user turn), because the adapter is served behind the chat API.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from trainer.base_model import LoadedBaseModel
from trainer.common import (
    EvalPhase,
    ProgressFn,
    StopFn,
    TrainingCancelled,
    TrainResult,
    answers_to_generate,
    check_output_dir,
    eval_generation,
    finish_run,
    fit_output_layer_to_fused_head,
    fix_adapter_dtype,
    load_base,
    lora_config,
    make_progress_callback,
    prepare_model,
    quiet_trainer,
    scratch_dir,
    split_eval,
    trainable_tokens_for,
    trainer_args,
    use_gradient_checkpointing,
)
from trainer.config import ConfigError, JobConfig, is_number
from trainer.data import Example, LoadedData, as_chat_prompt, check_lengths, load_jsonl
from trainer.defaults import resolve_for_data

logger = logging.getLogger(__name__)


@dataclass
class DPOJobConfig(JobConfig):
    """Configuration of a DPO job: the common fields of ``JobConfig`` plus ``beta``."""

    learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Peak learning rate of AdamW, in (0, 1); DPO wants less than SFT. Default: "
            "a quarter of SFT's for the method and run length (trainer/defaults.py)."
        },
    )
    beta: float = field(
        default=0.1,
        metadata={"help": "DPO temperature (> 0): higher keeps the adapter closer to the base."},
    )
    sft_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight (0-100) of an SFT loss on the chosen answers added to the DPO loss "
            "(RPO): the adapter also learns to write them, not only to prefer them. 0 = off."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not is_number(self.beta) or self.beta <= 0:
            raise ConfigError("beta", f"{self.beta!r}: must be a number > 0, e.g. 0.1")
        if not is_number(self.sft_weight) or not 0 <= self.sft_weight <= 100:
            raise ConfigError("sft_weight", f"{self.sft_weight!r}: must be a number in [0, 100]")


def _as_trl_row(example: Example) -> dict:
    assert example.prompt is not None
    return {
        "prompt": as_chat_prompt(example.prompt),
        "chosen": [{"role": "assistant", "content": example.chosen}],
        "rejected": [{"role": "assistant", "content": example.rejected}],
    }


def run_dpo(
    config: DPOJobConfig,
    data_path: str | Path,
    output_dir: str | Path,
    *,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    base: LoadedBaseModel | None = None,
    name: str | None = None,
) -> TrainResult:
    """Train a LoRA adapter on preference pairs; same contract as ``run_sft``."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    started = time.monotonic()
    output_dir = Path(output_dir)
    check_output_dir(output_dir)

    data = load_jsonl(data_path, "dpo")
    eval_data: LoadedData | None = load_jsonl(config.eval_file, "dpo") if config.eval_file else None
    # settings left unset are chosen from the data (steps, lr, warm-up, eval split, early stop)
    config, chosen = resolve_for_data(config, "dpo", data, eval_data)
    train_examples, eval_examples = split_eval(data, config, eval_data)
    if should_stop is not None and should_stop():
        raise TrainingCancelled("cancelled before the base model was loaded")

    base = load_base(config, base)
    tokenizer = base.tokenizer
    length_report = check_lengths(data, tokenizer, config.max_length)
    if eval_data is not None:
        check_lengths(eval_data, tokenizer, config.max_length)
    tokens = trainable_tokens_for(config, base, train_examples)

    train_ds = Dataset.from_list([_as_trl_row(e) for e in train_examples])
    eval_ds = Dataset.from_list([_as_trl_row(e) for e in eval_examples]) if eval_examples else None

    gc = use_gradient_checkpointing(config, base.device)
    model = prepare_model(base, gc)
    callback = make_progress_callback(progress, should_stop)
    extra_callbacks = chosen.callbacks()
    with scratch_dir(output_dir) as scratch:
        args = DPOConfig(
            **trainer_args(config, base.device, Path(scratch), gc),
            beta=config.beta,
            # DPO's sigmoid loss, plus TRL's NLL on the chosen answers when asked (RPO)
            loss_type=["sigmoid", "sft"] if config.sft_weight > 0 else ["sigmoid"],
            loss_weights=[1.0, config.sft_weight] if config.sft_weight > 0 else None,
            # Dropout makes the policy and reference log-probs of one batch disagree.
            disable_dropout=True,
        )
        trainer = DPOTrainer(
            model=model,
            ref_model=None,  # reference = the same weights with the adapter disabled
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tokenizer,
            peft_config=lora_config(config, tokens),
            callbacks=[callback, *extra_callbacks],
        )
        quiet_trainer(trainer)
        fix_adapter_dtype(trainer, base.device)
        fit_output_layer_to_fused_head(trainer.model)
        logger.info("DPO: %d train / %d eval pairs", len(train_ds), len(eval_examples))
        trainer.train()
        if callback.cancelled:
            raise TrainingCancelled(f"cancelled at step {trainer.state.global_step}")

        peft_model = trainer.model
        eval_results = None
        if eval_ds is not None:
            phase = EvalPhase(
                progress,
                should_stop,
                trainer,
                callback,
                answers_to_generate(eval_examples, config),
            )
            phase.report(0)
            metrics = trainer.evaluate(eval_ds)
            phase.check()
            # With the adapter disabled, policy == reference and the DPO loss is log 2 by
            # construction, so only the adapter's numbers are informative.
            eval_results = {
                "examples": len(eval_examples),
                "eval_loss": {"base": 0.6931471805599453, "adapter": metrics["eval_loss"]},
                "reward_accuracy": metrics.get("eval_rewards/accuracies"),
                "reward_margin": metrics.get("eval_rewards/margins"),
                **eval_generation(peft_model, base, eval_examples, config, phase),
            }
        return finish_run(
            kind="dpo",
            trainer=trainer,
            peft_model=peft_model,
            history=callback.history,
            config=config,
            base=base,
            data=data,
            eval_data=eval_data,
            n_train=len(train_examples),
            n_eval=len(eval_examples),
            length_report=length_report,
            eval_results=eval_results,
            output_dir=output_dir,
            started=started,
            should_stop=should_stop,
            name=name,
            tokens=tokens,
            defaults=chosen.card(extra_callbacks),
        )
