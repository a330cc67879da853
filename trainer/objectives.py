"""Training objectives, declared once each: the loss (which TRL trainer), the data it reads,
its own config fields and its eval numbers.

One file per objective, TRL's habit: ``trainer/sft.py``, ``dpo.py``, ``orpo.py``, ``kto.py``,
each with its config dataclass (a ``JobConfig`` subclass) and its ``OBJECTIVE``. The job
skeleton (``trainer.train.train``), the job manager, the worker, the CLI and the server's
routes find them here by name; the PEFT method is the other axis (``trainer.methods``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trainer.config import ConfigError

if TYPE_CHECKING:
    from trainer.config import JobConfig
    from trainer.data import Example, Task

MODULES = {"sft": "trainer.sft", "dpo": "trainer.dpo", "orpo": "trainer.orpo", "kto": "trainer.kto"}

# (trainer, a context that shows the base instead of the trained model) ->
# {"eval_loss": {"base": .., "adapter": ..}, other metrics ...}; the trainer evaluates the
# eval set it was built with (TRL tokenises it at construction)
EvalLoss = Callable[[Any, Callable[[], AbstractContextManager[Any]]], dict[str, Any]]


def evaluate_adapter_and_base(
    trainer: Any, base_view: Callable[[], AbstractContextManager[Any]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The trainer's eval metrics for the trained adapter, then for the base (shown through
    ``base_view``): what every objective's EvalLoss starts from."""
    adapter = trainer.evaluate()
    with base_view():
        base = trainer.evaluate()
    return adapter, base


@dataclass(frozen=True)
class Objective:
    name: str
    summary: str  # one line: the CLI's help and the docs
    data: str  # the data it reads, for the docs and errors
    config_class: type[JobConfig]
    task: Task  # what trainer.data.load_jsonl accepts for it
    # the TRL classes (trainer, config), imported only when a job trains
    trl: Callable[[], tuple[type, type]]
    # its own TRL config arguments, from its config fields
    trl_args: Callable[[Any], dict[str, Any]]
    # dataset rows for its TRL trainer, from validated examples (examples, tokenizer, config)
    rows: Callable[[list[Example], Any, Any], list[dict[str, Any]]]
    eval_loss: EvalLoss
    # the loss compares with a reference model (the base): for a full fine-tune the trainer
    # gets a frozen copy of the base; for an adapter, the adapter disabled
    uses_reference: bool = False
    # the eval examples whose reference answers the generated answers are scored against
    generation_examples: Callable[[list[Example]], list[Example]] = list
    # its own settings chosen from the training examples (config, examples) -> (config,
    # {field: trainer.defaults.Choice}), after the common ones (trainer.defaults)
    data_defaults: Callable[[Any, list[Example]], tuple[Any, dict[str, Any]]] | None = None


def objective_names() -> list[str]:
    return list(MODULES)


def get_objective(name: str) -> Objective:
    if name not in MODULES:
        raise ConfigError(
            "kind", f"{name!r} is not a training objective: use one of {', '.join(MODULES)}"
        )
    return importlib.import_module(MODULES[name]).OBJECTIVE  # type: ignore[no-any-return]


def build_config(kind: str, config: JobConfig | dict[str, Any] | None) -> JobConfig:
    """A config object of ``kind`` from a JSON request body (dict) or an existing config."""
    cls = get_objective(kind).config_class
    if config is None:
        return cls()
    if isinstance(config, dict):
        return cls.from_dict(config)
    if not isinstance(config, cls):
        raise ConfigError("config", f"a {kind} job needs a {cls.__name__}")
    return config
