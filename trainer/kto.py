"""Kahneman-Tversky optimisation (KTO) with TRL's KTOTrainer, on any method of the table.

KTO learns from unpaired ratings: each line is one answer marked desirable or not
(``{"prompt", "completion", "label": true|false}``), which is what ``POST /ab/feedback``
collects as thumbs up/down (export: ``GET /ab/splits/{name}/kto.jsonl``). Preference pairs
are accepted too: each gives one desirable and one undesirable answer. The reference is
the base (adapter disabled, or a frozen copy for a full fine-tune). The job itself is the
shared skeleton, ``trainer.train.train``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from trainer.config import ConfigError, JobConfig, is_number
from trainer.data import Example, as_chat_prompt
from trainer.defaults import Choice
from trainer.objectives import Objective, evaluate_adapter_and_base


@dataclass
class KTOJobConfig(JobConfig):
    """Configuration of a KTO job: the common fields plus ``beta`` and the weights of
    desirable and undesirable answers. Its default learning rate is a quarter of the
    method's, as DPO's."""

    LR_SCALE: ClassVar[float] = 0.25
    OBJECTIVE: ClassVar[str] = "kto"

    beta: float = field(
        default=0.1,
        metadata={"help": "KTO temperature (> 0): higher keeps the adapter closer to the base."},
    )
    desirable_weight: float | None = field(
        default=None,
        metadata={
            "help": "Weight (> 0) of the desirable answers' loss. Default: chosen from the "
            "data, so that liked answers x this weight over disliked answers x "
            "undesirable_weight is 1.15, the middle of the KTO paper's [1, 4/3] (feedback is "
            "rarely balanced); 1 when only one kind is rated."
        },
    )
    undesirable_weight: float = field(
        default=1.0, metadata={"help": "Weight (> 0) of the undesirable answers' loss."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("beta", "desirable_weight", "undesirable_weight"):
            value = getattr(self, name)
            if name == "desirable_weight" and value is None:
                continue  # chosen from the data: balance_weights
            if not is_number(value) or value <= 0:
                raise ConfigError(name, f"{value!r}: must be a number > 0")
        if self.batch_size < 2:
            raise ConfigError(
                "batch_size",
                "KTO needs at least 2 examples per batch: it estimates its KL term from the "
                "batch's mismatched prompt/answer pairs",
            )


def unpaired(examples: list[Example]) -> list[tuple[Example, str, bool]]:
    """(example, answer, desirable) for each rated answer; a pair gives two."""
    out = []
    for e in examples:
        if e.format == "preference":
            out.append((e, str(e.chosen), True))
            out.append((e, str(e.rejected), False))
        else:
            out.append((e, e.reference_answer(), bool(e.label)))
    return out


# the KTO paper (Ethayarajh et al., 2024, section 4.2) keeps liked x desirable_weight over
# disliked x undesirable_weight in [1, 4/3]; TRL warns outside it. Aim at the middle, so that
# the eval hold-out shifting the counts a little stays inside.
BALANCE = 1.15


def balance_weights(
    config: KTOJobConfig, examples: list[Example]
) -> tuple[KTOJobConfig, dict[str, Choice]]:
    """``desirable_weight`` from the counts of liked and disliked answers, when not given."""
    if config.desirable_weight is not None:
        return config, {"desirable_weight": Choice(config.desirable_weight, False, "as configured")}
    labels = [label for _, _, label in unpaired(examples)]
    liked, disliked = sum(labels), len(labels) - sum(labels)
    if liked and disliked:
        target = BALANCE * disliked * config.undesirable_weight / liked
        weight = math.ceil(target * 100) / 100
        why = (
            f"{liked} liked, {disliked} disliked answers: weighted ratio {BALANCE}, inside "
            "the KTO paper's [1, 4/3]"
        )
    else:
        weight = 1.0
        why = f"only {'liked' if liked else 'disliked'} answers ({len(labels)}): nothing to balance"
    return dataclasses.replace(config, desirable_weight=weight), {
        "desirable_weight": Choice(weight, True, why)
    }


def _rows(
    examples: list[Example], tokenizer: Any = None, config: Any = None
) -> list[dict[str, Any]]:
    rows = []
    for example, answer, label in unpaired(examples):
        assert example.prompt is not None
        rows.append(
            {
                "prompt": as_chat_prompt(example.prompt),
                "completion": [{"role": "assistant", "content": answer}],
                "label": label,
            }
        )
    return rows


def _trl() -> tuple[type, type]:
    from trl import KTOConfig, KTOTrainer

    return KTOTrainer, KTOConfig


def _eval_loss(trainer: Any, base_view: Any) -> dict[str, Any]:
    metrics, base = evaluate_adapter_and_base(trainer, base_view)
    return {
        # the base as policy equals the reference: its rewards are 0 and its loss is the
        # weighted 1 - sigmoid(0) = 0.5 per answer, up to the KL term
        "eval_loss": {"base": base["eval_loss"], "adapter": metrics["eval_loss"]},
        "reward_margin": metrics.get("eval_rewards/margins"),
        "kl": metrics.get("eval_kl"),
    }


def _desirable_only(examples: list[Example]) -> list[Example]:
    """Generated answers are scored against desirable answers only."""
    return [e for e in examples if e.format == "preference" or e.label]


OBJECTIVE = Objective(
    name="kto",
    summary="Kahneman-Tversky optimisation on thumbs-up/down rated answers (unpaired)",
    data="`prompt`/`completion`/`label` rated answers, or `prompt`/`chosen`/`rejected` pairs",
    config_class=KTOJobConfig,
    task="kto",
    trl=_trl,
    trl_args=lambda config: {
        "beta": config.beta,
        "desirable_weight": config.desirable_weight,
        "undesirable_weight": config.undesirable_weight,
        "disable_dropout": True,
    },
    rows=_rows,
    eval_loss=_eval_loss,
    uses_reference=True,
    generation_examples=_desirable_only,
    data_defaults=balance_weights,
)
