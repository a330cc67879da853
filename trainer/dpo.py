"""Direct preference optimisation with TRL's DPOTrainer, on any method of the method table.

The reference policy is the base: for an adapter, the same weights with the adapter disabled
(``ref_model=None`` on a PEFT model: no second copy of the weights); for a full fine-tune, a
frozen copy. Prompts are always rendered with the chat template (a bare string prompt is one
user turn), because the adapter is served behind the chat API. The job itself is the shared
skeleton, ``trainer.train.train``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from trainer.base_model import LoadedBaseModel
from trainer.common import ProgressFn, StopFn, TrainResult
from trainer.config import ConfigError, JobConfig, is_number
from trainer.data import Example, as_chat_prompt
from trainer.objectives import Objective


@dataclass
class DPOJobConfig(JobConfig):
    """Configuration of a DPO job: the common fields of ``JobConfig`` plus ``beta`` and
    ``sft_weight``. Its default learning rate is a quarter of the method's (5e-5 for LoRA)."""

    LR_SCALE: ClassVar[float] = 0.25
    OBJECTIVE: ClassVar[str] = "dpo"

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


def pair_rows(
    examples: list[Example], tokenizer: Any = None, config: Any = None
) -> list[dict[str, Any]]:
    """Preference pairs as TRL's conversational prompt/chosen/rejected rows."""
    rows = []
    for example in examples:
        assert example.prompt is not None
        rows.append(
            {
                "prompt": as_chat_prompt(example.prompt),
                "chosen": [{"role": "assistant", "content": example.chosen}],
                "rejected": [{"role": "assistant", "content": example.rejected}],
            }
        )
    return rows


def _trl() -> tuple[type, type]:
    from trl import DPOConfig, DPOTrainer

    return DPOTrainer, DPOConfig


def _trl_args(config: DPOJobConfig) -> dict[str, Any]:
    return {
        "beta": config.beta,
        # DPO's sigmoid loss, plus TRL's NLL on the chosen answers when asked (RPO)
        "loss_type": ["sigmoid", "sft"] if config.sft_weight > 0 else ["sigmoid"],
        "loss_weights": [1.0, config.sft_weight] if config.sft_weight > 0 else None,
        # Dropout makes the policy and reference log-probs of one batch disagree.
        "disable_dropout": True,
    }


def _eval_loss(trainer: Any, base_view: Any) -> dict[str, Any]:
    metrics = trainer.evaluate()
    # With the adapter disabled, policy == reference and the DPO loss is log 2 by
    # construction, so only the trained model's numbers are informative.
    return {
        "eval_loss": {"base": math.log(2), "adapter": metrics["eval_loss"]},
        "reward_accuracy": metrics.get("eval_rewards/accuracies"),
        "reward_margin": metrics.get("eval_rewards/margins"),
    }


OBJECTIVE = Objective(
    name="dpo",
    summary="direct preference optimisation on prompt/chosen/rejected pairs",
    data="`prompt`/`chosen`/`rejected` pairs",
    config_class=DPOJobConfig,
    task="dpo",
    trl=_trl,
    trl_args=_trl_args,
    rows=pair_rows,
    eval_loss=_eval_loss,
    uses_reference=True,
)


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
    """DPO through the job skeleton; same contract as ``run_sft``."""
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
