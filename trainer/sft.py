"""Supervised fine-tuning of a LoRA adapter (QLoRA on a 4-bit base) with TRL's SFTTrainer.

Read ``run_sft`` top to bottom: validate -> load base -> tokenise with our own loss masks ->
train -> eval (base vs adapter) -> write adapter + card atomically.

The data is tokenised here, not by TRL, so the masks used in training are the very ones
``trainer.data.render_loss_mask`` shows in a dry run: loss on assistant turns (chat) or on
the completion (prompt/completion), end-of-turn included so the model learns to stop.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
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
from trainer.config import JobConfig
from trainer.data import LoadedData, check_lengths, load_jsonl, tokenize_sft
from trainer.defaults import resolve_for_data

logger = logging.getLogger(__name__)


@dataclass
class SFTJobConfig(JobConfig):
    """Configuration of an SFT job. All fields are documented in ``JobConfig``; SFT adds
    none of its own today, and keeps the class so the CLI, the HTTP request and the job
    record name the method they configure."""


def run_sft(
    config: SFTJobConfig,
    data_path: str | Path,
    output_dir: str | Path,
    *,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    base: LoadedBaseModel | None = None,
    name: str | None = None,
) -> TrainResult:
    """Train a LoRA adapter on ``data_path``; write it and its card to ``output_dir``.

    ``base``: an already-loaded base to train on (its model gets LoRA layers injected in
    place, so do not serve it afterwards); by default it is loaded from ``config``.
    Raises DataError (bad data), ConfigError, FileExistsError (output exists) before
    training starts, and TrainingCancelled when ``should_stop()`` returned True.
    """
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    started = time.monotonic()
    output_dir = Path(output_dir)
    check_output_dir(output_dir)

    data = load_jsonl(data_path, "sft")
    eval_data: LoadedData | None = load_jsonl(config.eval_file, "sft") if config.eval_file else None
    # settings left unset are chosen from the data (steps, lr, warm-up, eval split, early stop)
    config, chosen = resolve_for_data(config, "sft", data, eval_data)
    train_examples, eval_examples = split_eval(data, config, eval_data)
    if should_stop is not None and should_stop():
        raise TrainingCancelled("cancelled before the base model was loaded")

    base = load_base(config, base)
    tokenizer = base.tokenizer
    # Length check over everything we will feed the model, before step one.
    length_report = check_lengths(data, tokenizer, config.max_length, config.loss_turns)
    if eval_data is not None:
        check_lengths(eval_data, tokenizer, config.max_length, config.loss_turns)
    tokens = trainable_tokens_for(config, base, train_examples)

    def to_dataset(examples):
        rows = []
        for example in examples:
            seq = tokenize_sft(example, tokenizer, config.loss_turns)
            rows.append({"input_ids": seq.input_ids, "labels": seq.labels})
        return Dataset.from_list(rows)

    train_ds = to_dataset(train_examples)
    eval_ds = to_dataset(eval_examples) if eval_examples else None

    gc = use_gradient_checkpointing(config, base.device)
    model = prepare_model(base, gc)
    callback = make_progress_callback(progress, should_stop)
    extra_callbacks = chosen.callbacks()
    with scratch_dir(output_dir) as scratch:
        args = SFTConfig(**trainer_args(config, base.device, Path(scratch), gc))
        trainer = SFTTrainer(
            model=model,
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
        logger.info(
            "SFT: %d train / %d eval examples, %d steps",
            len(train_ds),
            len(eval_examples),
            trainer.args.max_steps if trainer.args.max_steps > 0 else -1,
        )
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
            adapter_loss = trainer.evaluate(eval_ds)["eval_loss"]
            with peft_model.disable_adapter():
                base_loss = trainer.evaluate(eval_ds)["eval_loss"]
            phase.check()
            eval_results = {
                "examples": len(eval_examples),
                "eval_loss": {"base": base_loss, "adapter": adapter_loss},
                **eval_generation(peft_model, base, eval_examples, config, phase),
            }
        return finish_run(
            kind="sft",
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
