"""Supervised fine-tuning with TRL's SFTTrainer, on any method of the method table.

The data is tokenised here, not by TRL, so the masks used in training are the very ones
``trainer.data.render_loss_mask`` shows in a dry run: loss on assistant turns (chat) or on
the completion (prompt/completion), end-of-turn included so the model learns to stop.
The job itself is the shared skeleton, ``trainer.train.train``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.base_model import LoadedBaseModel
from trainer.common import ProgressFn, StopFn, TrainResult
from trainer.config import JobConfig
from trainer.data import Example, tokenize_sft
from trainer.objectives import Objective, evaluate_adapter_and_base


@dataclass
class SFTJobConfig(JobConfig):
    """Configuration of an SFT job. All fields are documented in ``JobConfig``; SFT adds
    none of its own, and keeps the class so the CLI, the HTTP request and the job record
    name the objective they configure."""


def _trl() -> tuple[type, type]:
    from trl import SFTConfig, SFTTrainer

    return SFTTrainer, SFTConfig


def _rows(examples: list[Example], tokenizer: Any, config: SFTJobConfig) -> list[dict[str, Any]]:
    rows = []
    for example in examples:
        seq = tokenize_sft(example, tokenizer, config.loss_turns)
        rows.append({"input_ids": seq.input_ids, "labels": seq.labels})
    return rows


def _eval_loss(trainer: Any, base_view: Any) -> dict[str, Any]:
    adapter, base = evaluate_adapter_and_base(trainer, base_view)
    return {"eval_loss": {"base": base["eval_loss"], "adapter": adapter["eval_loss"]}}


OBJECTIVE = Objective(
    name="sft",
    summary="supervised fine-tuning on chat or prompt/completion data",
    data="chat `messages` (OpenAI fine-tuning format), `prompt`/`completion`, ShareGPT "
    "`conversations`, Alpaca `instruction`/`output`",
    config_class=SFTJobConfig,
    task="sft",
    trl=_trl,
    trl_args=lambda config: {},
    rows=_rows,
    eval_loss=_eval_loss,
)


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
    """SFT through the job skeleton; see ``trainer.train.train`` for the contract."""
    from trainer.train import train

    return train(
        config,
        data_path,
        output_dir,
        progress=progress,
        should_stop=should_stop,
        base=base,
        name=name,
    )
