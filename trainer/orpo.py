"""Odds-ratio preference optimisation (ORPO) with TRL's ORPOTrainer (``trl.experimental``
in TRL 1.16), on the methods of the method table that it can train.

ORPO needs no reference model: its loss is the NLL of the chosen answer plus ``beta``
times the log-sigmoid of the log odds ratio between chosen and rejected, so one pass over
preference pairs teaches the answers and the preference at once (Hong et al., 2024). It
reads the same pairs as DPO. The job itself is the shared skeleton, ``trainer.train.train``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

from trainer.config import ConfigError, JobConfig, is_number
from trainer.dpo import pair_rows
from trainer.objectives import Objective, evaluate_adapter_and_base


@dataclass
class ORPOJobConfig(JobConfig):
    """Configuration of an ORPO job: the common fields plus ``beta`` (the paper's lambda).
    Its default learning rate is half the method's SFT rate: between SFT (its NLL term) and
    DPO (its preference term)."""

    LR_SCALE: ClassVar[float] = 0.5
    OBJECTIVE: ClassVar[str] = "orpo"

    beta: float = field(
        default=0.1,
        metadata={
            "help": "Weight (> 0) of the odds-ratio term against the NLL of the chosen answers "
            "(the ORPO paper's lambda)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not is_number(self.beta) or self.beta <= 0:
            raise ConfigError("beta", f"{self.beta!r}: must be a number > 0, e.g. 0.1")


def _trl() -> tuple[type, type]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the experimental namespace warns on import
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    return ORPOTrainer, ORPOConfig


def _eval_loss(trainer: Any, base_view: Any) -> dict[str, Any]:
    metrics, base = evaluate_adapter_and_base(trainer, base_view)
    return {
        "eval_loss": {"base": base["eval_loss"], "adapter": metrics["eval_loss"]},
        "reward_accuracy": metrics.get("eval_rewards/accuracies"),
        "reward_margin": metrics.get("eval_rewards/margins"),
        "log_odds_ratio": {
            "base": base.get("eval_log_odds_ratio"),
            "adapter": metrics.get("eval_log_odds_ratio"),
        },
    }


OBJECTIVE = Objective(
    name="orpo",
    summary="odds-ratio preference optimisation (SFT + preference in one loss, no reference)",
    data="`prompt`/`chosen`/`rejected` pairs",
    config_class=ORPOJobConfig,
    task="dpo",
    trl=_trl,
    trl_args=lambda config: {"beta": config.beta, "disable_dropout": True},
    rows=pair_rows,
    eval_loss=_eval_loss,
)
