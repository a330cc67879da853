"""The one job skeleton every objective and method runs through. Read ``train`` top to bottom:

validate (config, data, base) -> load the base -> tokenise with our own masks -> prepare the
model for the method -> the objective's TRL trainer -> train -> eval (base vs trained)
-> [full: save the model folder, extract a LoRA by SVD, eval it] -> adapter + card, atomically.

The objective (``trainer.objectives``: sft, dpo, orpo, kto) decides the loss, the data and the
eval numbers; the method (``trainer.methods``: lora, qlora, ia3, prompt_tuning, ...) decides
which weights train. Neither is named anywhere below.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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
from trainer.data import LoadedData, check_lengths, load_jsonl
from trainer.defaults import resolve_for_data
from trainer.methods import check_against_base, get_method
from trainer.objectives import get_objective
from trainer.paths import full_model_dir
from trainer.tokens import TrainableTokens

logger = logging.getLogger(__name__)

# every per-token field TRL's trainers read from the fused head (SFT, DPO, KTO metrics)
FUSED_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")


def train(
    config: JobConfig,
    data_path: str | Path,
    output_dir: str | Path,
    *,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    base: LoadedBaseModel | None = None,
    name: str | None = None,
    model_dir: str | Path | None = None,
    callbacks: list[Any] | None = None,
) -> TrainResult:
    """Train ``config``'s method with ``config``'s objective on ``data_path``; write the
    adapter and its card to ``output_dir`` (for ``full``: also the model folder,
    ``model_dir`` or ``full_model_dir(output_dir)``).

    ``base``: an already-loaded base to train on (an adapter is injected into it in place,
    so do not serve it afterwards); by default it is loaded from ``config``. Raises
    DataError, ConfigError, FileExistsError before training starts, and TrainingCancelled
    when ``should_stop()`` returned True (nothing is written then). ``callbacks``: extra
    transformers TrainerCallbacks (tests and benchmarks watch the model through them).
    """
    from datasets import Dataset

    objective = get_objective(config.OBJECTIVE)
    method = get_method(str(config.method))
    started = time.monotonic()
    output_dir = Path(output_dir)
    check_output_dir(output_dir)
    full_dir = None
    if method.peft_type is None:
        full_dir = Path(model_dir) if model_dir else full_model_dir(output_dir)
        check_output_dir(full_dir)

    data = load_jsonl(data_path, objective.task)
    eval_data: LoadedData | None = (
        load_jsonl(config.eval_file, objective.task) if config.eval_file else None
    )
    # settings left unset are chosen from the data (steps, lr, warm-up, eval split, early stop)
    config, chosen = resolve_for_data(config, objective.name, data, eval_data)
    train_examples, eval_examples = split_eval(data, config, eval_data)
    if should_stop is not None and should_stop():
        raise TrainingCancelled("cancelled before the base model was loaded")

    base = load_base(config, base)
    structure = check_against_base(config, base.path)
    tokenizer = base.tokenizer
    # Length check over everything we will feed the model, before step one.
    length_report = check_lengths(data, tokenizer, config.max_length, config.loss_turns)
    if eval_data is not None:
        check_lengths(eval_data, tokenizer, config.max_length, config.loss_turns)
    tokens = (
        trainable_tokens_for(config, base, train_examples)
        if method.trains_token_rows
        else TrainableTokens(spec=config.trainable_tokens)
    )
    train_ds = Dataset.from_list(objective.rows(train_examples, tokenizer, config))
    eval_ds = (
        Dataset.from_list(objective.rows(eval_examples, tokenizer, config))
        if eval_examples
        else None
    )

    gc = use_gradient_checkpointing(config, base.device)
    reference = None
    if method.peft_type is None:
        # Full fine-tune: every weight trains; a frozen copy of the base is the reference
        # (DPO/KTO), the eval's base and the starting point of the extraction.
        reference = copy.deepcopy(base.model).requires_grad_(False)
        model = base.model.requires_grad_(True)
    else:
        model = prepare_model(base, gc)
    callback = make_progress_callback(progress, should_stop)
    extra_callbacks = chosen.callbacks()  # early stopping, when the defaults chose it
    with scratch_dir(output_dir) as scratch:
        trainer_cls, args_cls = objective.trl()
        args = args_cls(
            **trainer_args(config, base.device, Path(scratch), gc), **objective.trl_args(config)
        )
        extra: dict[str, Any] = {"ref_model": reference} if objective.uses_reference else {}
        trainer = trainer_cls(
            model=model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tokenizer,
            peft_config=method.peft_config(config, structure, tokens),
            callbacks=[callback, *extra_callbacks, *(callbacks or [])],
            **extra,
        )
        quiet_trainer(trainer)
        fix_adapter_dtype(trainer, base.device)
        fit_output_layer_to_fused_head(trainer.model)
        trained = trainer.model
        counts = parameter_counts(trained, structure.parameters)
        logger.info(
            "%s/%s: %d train / %d eval examples, %d trainable parameters (%.3f%% of the base)",
            objective.name,
            method.name,
            len(train_ds),
            len(eval_examples),
            counts["trainable"],
            counts["trainable_pct"],
        )
        train_started = time.monotonic()
        trainer.train()
        train_time = time.monotonic() - train_started
        if callback.cancelled:
            raise TrainingCancelled(f"cancelled at step {trainer.state.global_step}")

        def base_view() -> Any:
            return showing_base(trainer, trained, reference)

        generation = objective.generation_examples(eval_examples)
        eval_results = None
        phase = None
        if eval_ds is not None:
            answers = answers_to_generate(generation, config)
            if method.peft_type is None:
                answers += answers // 2  # the extracted adapter answers too
            phase = EvalPhase(progress, should_stop, trainer, callback, answers)
            phase.report(0)
            eval_results = {
                "examples": len(eval_examples),
                **objective.eval_loss(trainer, base_view),
            }
            phase.check()
            eval_results.update(
                eval_generation(trained, base, generation, config, phase, base_model=reference)
            )

        adapter_model = trained
        extraction = None
        if method.peft_type is None:
            from trainer.extract import extract_lora

            assert full_dir is not None and reference is not None
            if should_stop is not None and should_stop():
                raise TrainingCancelled("cancelled after training, before writing")
            extraction, adapter_model = extract_lora(reference, trained, config)
            if eval_results is not None and phase is not None:
                eval_results["extracted"] = extracted_eval(
                    objective, trainer, adapter_model, base, generation, config, phase
                )
            extraction["model_dir"] = str(full_dir)
        return finish_run(
            kind=objective.name,
            trainer=trainer,
            peft_model=adapter_model,
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
            parameters=counts,
            train_time_s=train_time,
            extraction=extraction,
            full_model=(trained, tokenizer, full_dir) if full_dir else None,
            defaults=chosen.card(extra_callbacks),
        )


@contextmanager
def showing_base(trainer: Any, trained: Any, reference: Any) -> Iterator[Any]:
    """The trainer evaluates the base instead of the trained model: the adapter disabled,
    or (full fine-tune) the frozen reference copy in the trained model's place."""
    if reference is None:
        with trained.disable_adapter():
            yield trained
        return
    with evaluating(trainer, reference):
        yield reference


@contextmanager
def evaluating(trainer: Any, model: Any) -> Iterator[None]:
    """``trainer.evaluate()`` runs ``model`` (same data, same loss) instead of its own."""
    from trl.trainer.utils import add_fused_lm_head

    if not getattr(model, "_swapserve_fused", False):
        # TRL's losses call model(..., fused_lm_head=True) and read these fields (a second
        # patch replaces the first: the head is computed by the outer one alone)
        target = model.get_base_model() if hasattr(model, "get_base_model") else model
        add_fused_lm_head(target, outputs=FUSED_OUTPUTS)
        model._swapserve_fused = True
    saved = trainer.model, trainer.model_wrapped
    trainer.model = trainer.model_wrapped = model
    try:
        yield
    finally:
        trainer.model, trainer.model_wrapped = saved


def extracted_eval(
    objective: Any,
    trainer: Any,
    adapter: Any,
    base: LoadedBaseModel,
    generation: list[Any],
    config: JobConfig,
    phase: EvalPhase,
) -> dict[str, Any]:
    """The extracted LoRA's eval: its loss where the objective's loss needs no reference
    (a preference loss would compare it with itself), and its generated answers."""
    out: dict[str, Any] = {"eval_loss": None}
    if not objective.uses_reference:
        with evaluating(trainer, adapter):
            out["eval_loss"] = trainer.evaluate()["eval_loss"]
    phase.check()
    gen = eval_generation(adapter, base, generation, config, phase, skip_base=True)
    out.update({k: v for k, v in gen.items() if k != "base"})
    return out


def parameter_counts(model: Any, base_parameters: int) -> dict[str, Any]:
    """Trainable parameters, as a count and a share of the base model's parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "trainable": int(trainable),
        "base": int(base_parameters),
        "trainable_pct": 100.0 * trainable / base_parameters if base_parameters else 0.0,
    }
