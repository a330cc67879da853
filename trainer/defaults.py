"""Defaults that teach: the training settings a user did not give, chosen from the data.

``swapserve train sft --data my.jsonl --name x`` with no tuning flag leaves the learning
rate, the number of steps, the warm-up, the eval split and early stopping to this module.
Every rule is here, in one place, and ``resolve_defaults`` returns both the concrete config
and the reasons, which the CLI prints before training (and in ``--dry-run``) and the card
records. A value the user set is kept as given.

The rules (tuned on held-out format tasks, ``loadtests/format_tasks.py``, with the bundled
Gemma 3 270M; see the README's Training adapters section for the figures):

- **Eval split.** With at least ``MIN_EXAMPLES_FOR_SPLIT`` examples and no eval file, 10% of
  the examples are held out, at least ``MIN_EVAL`` and at most ``MAX_EVAL``: enough for a
  stable eval loss, never a large bite out of a small set. Fewer examples: no split, all
  of them train.
- **Steps.** TRL's SFT default is 3 epochs. Small data needs more passes than that to teach
  a format and to stop after it, so a run is at least ``MIN_STEPS`` optimizer steps; large
  data needs fewer passes (2 epochs from ``TWO_EPOCHS_FROM`` training examples, 1 from
  ``ONE_EPOCH_FROM``), and a run is at most ``MAX_STEPS`` steps.
- **Learning rate.** Per method (LoRA 2e-4 as in the QLoRA paper; IA3, prompt and prefix
  tuning, norm tuning and full fine-tuning at the rates their papers and PEFT's examples
  use), times a factor per objective (preference objectives move more gently than SFT),
  raised 2.5x for short runs (<= ``SHORT_RUN_STEPS`` steps), which have few updates to
  learn in.
- **Warm-up.** 10% of the steps (at most 100), so the first updates, taken with an
  untrained adapter's noisy gradients, do not overshoot.
- **Early stopping.** When the rules chose the number of steps and there is an eval set,
  eval loss is measured ``EVALS_PER_RUN`` times per run (and at the last step); training
  stops after ``PATIENCE`` evals in a row without a new best, and the weights of the best
  eval are the ones written. A run whose steps or epochs the user set runs to its end.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

MIN_EXAMPLES_FOR_SPLIT = 30
EVAL_SHARE = 0.1
MIN_EVAL = 5
MAX_EVAL = 100
BASE_EPOCHS = 3.0  # TRL's SFTConfig default
TWO_EPOCHS_FROM = 2_000
ONE_EPOCH_FROM = 10_000
MIN_STEPS = 60
MAX_STEPS = 5_000
SHORT_RUN_STEPS = 100
SHORT_RUN_LR_FACTOR = 2.5
WARMUP_SHARE = 0.1
MAX_WARMUP = 100
EVALS_PER_RUN = 10
PATIENCE = 3

# The peak learning rate of each PEFT method is declared with the method
# (``trainer.methods.Method.learning_rate``) and each objective's factor with its config
# (``LR_SCALE``: preference losses sharpen quickly and overshoot; README: DPO).


def method_lr(method: str) -> float:
    from trainer.methods import METHODS

    return METHODS[method].learning_rate if method in METHODS else METHODS["lora"].learning_rate


def objective_lr_factor(objective: str) -> float:
    from trainer.objectives import MODULES, get_objective

    return get_objective(objective).config_class.LR_SCALE if objective in MODULES else 1.0


AUTO_FIELDS = (
    "eval_fraction",
    "max_steps",
    "learning_rate",
    "warmup_steps",
    "eval_steps",
    "early_stopping_patience",
)


@dataclass
class Choice:
    """One resolved setting: its value, whether the rules chose it, and why."""

    value: Any
    auto: bool
    why: str

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "auto": self.auto, "why": self.why}


@dataclass
class Defaults:
    """The outcome of ``resolve_defaults``: what each setting became, and why."""

    n_examples: int
    n_train: int
    n_eval: int
    method: str
    objective: str
    choices: dict[str, Choice] = field(default_factory=dict)

    @property
    def auto(self) -> list[str]:
        return [name for name, c in self.choices.items() if c.auto]

    def to_dict(self) -> dict[str, Any]:
        return {
            "examples": self.n_examples,
            "train_examples": self.n_train,
            "eval_examples": self.n_eval,
            "method": self.method,
            "objective": self.objective,
            "chosen": {name: c.to_dict() for name, c in self.choices.items()},
        }

    def describe(self) -> list[str]:
        """Lines for the CLI and the logs, one per setting."""
        lines = [
            f"settings ({self.objective}, {self.method}; {self.n_train} training / "
            f"{self.n_eval} eval examples; 'auto' = chosen from the data, see trainer/defaults.py):"
        ]
        for name, c in self.choices.items():
            tag = "auto" if c.auto else "given"
            lines.append(f"  {name} = {_fmt(c.value)}  [{tag}: {c.why}]")
        return lines

    def card(self, callbacks: list[Any] | None = None) -> dict[str, Any]:
        """What the adapter's card records: the choices, and how early stopping went."""
        out = self.to_dict()
        for cb in callbacks or []:
            if hasattr(cb, "summary"):
                out["early_stopping"] = cb.summary()
        return out

    def callbacks(self) -> list[Any]:
        """Trainer callbacks these settings need (early stopping)."""
        patience = self.choices["early_stopping_patience"].value
        if not patience or not self.choices["eval_steps"].value:
            return []
        return [make_early_stopping(int(patience))]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def method_of(config: Any) -> str:
    """The PEFT method a config trains (LoRA unless the config says otherwise)."""
    method = getattr(config, "method", None) or getattr(config, "peft_method", None) or "lora"
    if method == "lora" and getattr(config, "quantization", None) == "nf4":
        return "qlora"
    return str(method)


def n_eval_for(n_examples: int) -> int:
    """How many examples the automatic split holds out (0: too few to spare any)."""
    if n_examples < MIN_EXAMPLES_FOR_SPLIT:
        return 0
    return max(MIN_EVAL, min(MAX_EVAL, round(n_examples * EVAL_SHARE)))


def epochs_for(n_train: int) -> float:
    if n_train >= ONE_EPOCH_FROM:
        return 1.0
    if n_train >= TWO_EPOCHS_FROM:
        return 2.0
    return BASE_EPOCHS


def learning_rate_for(method: str, objective: str, steps: int) -> tuple[float, str]:
    base = method_lr(method)
    factor = objective_lr_factor(objective)
    lr = base * factor
    why = f"{method} {base:g}"
    if factor != 1.0:
        why += f" x {factor:g} for {objective}"
    if steps <= SHORT_RUN_STEPS:
        lr *= SHORT_RUN_LR_FACTOR
        why += f", x {SHORT_RUN_LR_FACTOR:g} for a short run (<= {SHORT_RUN_STEPS} steps)"
    return float(f"{lr:.3g}"), why


def resolve_defaults(
    config: Any, kind: str, n_examples: int, n_eval_file: int | None = None
) -> tuple[Any, Defaults]:
    """Fill every setting left to the rules (None) from the data size, method and objective.

    ``n_examples``: lines of the training file; ``n_eval_file``: lines of the eval file, when
    one is given. Returns a copy of ``config`` with concrete values, and the ``Defaults``
    that say what was chosen and why. Idempotent: a resolved config resolves to itself."""
    method, objective = method_of(config), kind
    out = dataclasses.replace(config)
    choices: dict[str, Choice] = {}

    # -- eval split
    if n_eval_file is not None:
        n_eval = n_eval_file
        choices["eval_fraction"] = Choice(
            out.eval_fraction if out.eval_fraction is not None else 0.0,
            False,
            f"an eval file is given ({n_eval} examples)",
        )
        if out.eval_fraction is None:
            out.eval_fraction = 0.0
    elif out.eval_fraction is None:
        n_eval = n_eval_for(n_examples)
        out.eval_fraction = n_eval / n_examples if n_eval else 0.0
        why = (
            f"{EVAL_SHARE:.0%} held out, at least {MIN_EVAL}, at most {MAX_EVAL}"
            if n_eval
            else f"fewer than {MIN_EXAMPLES_FOR_SPLIT} examples: all of them train"
        )
        choices["eval_fraction"] = Choice(round(out.eval_fraction, 4), True, why)
    else:
        n_eval = _split_size(n_examples, out.eval_fraction)
        choices["eval_fraction"] = Choice(out.eval_fraction, False, f"{n_eval} examples held out")
    n_train = n_examples - (0 if n_eval_file is not None else n_eval)

    # -- steps
    per_step = out.batch_size * out.gradient_accumulation_steps
    steps_per_epoch = max(1, math.ceil(n_train / per_step))
    auto_steps = out.max_steps is None and out.epochs is None
    if out.max_steps is not None:
        steps = out.max_steps
        choices["max_steps"] = Choice(steps, False, f"{steps / steps_per_epoch:.1f} epochs")
    elif out.epochs is not None:
        steps = max(1, math.ceil(out.epochs * steps_per_epoch))
        out.max_steps = steps
        choices["max_steps"] = Choice(steps, False, f"from epochs={out.epochs:g}")
    else:
        epochs = epochs_for(n_train)
        steps = math.ceil(epochs * steps_per_epoch)
        unit = "step" if steps_per_epoch == 1 else "steps"
        why = f"{epochs:g} epochs of {steps_per_epoch} {unit} ({per_step} examples a step)"
        if steps < MIN_STEPS:
            steps = MIN_STEPS
            why += f", raised to {MIN_STEPS} steps: small data needs more passes"
        elif steps > MAX_STEPS:
            steps = MAX_STEPS
            why += f", capped at {MAX_STEPS} steps"
        out.max_steps = steps
        choices["max_steps"] = Choice(steps, True, why)
    if out.epochs is None:
        out.epochs = round(steps / steps_per_epoch, 3)

    # -- learning rate
    if out.learning_rate is None:
        out.learning_rate, why = learning_rate_for(method, objective, steps)
        choices["learning_rate"] = Choice(out.learning_rate, True, why)
    else:
        choices["learning_rate"] = Choice(out.learning_rate, False, "as configured")

    # -- warm-up
    if out.warmup_steps is None:
        out.warmup_steps = min(MAX_WARMUP, math.ceil(steps * WARMUP_SHARE))
        choices["warmup_steps"] = Choice(
            out.warmup_steps, True, f"{WARMUP_SHARE:.0%} of the steps, at most {MAX_WARMUP}"
        )
    else:
        choices["warmup_steps"] = Choice(out.warmup_steps, False, "as configured")

    # -- evals during training and early stopping
    if out.eval_steps is None:
        # evals during training serve early stopping, which shortens a run the rules
        # sized; a run whose length the user set runs that length
        evals = bool(n_eval) and auto_steps
        out.eval_steps = max(1, math.ceil(steps / EVALS_PER_RUN)) if evals else 0
        if evals:
            why = f"eval loss {EVALS_PER_RUN} times a run"
        elif not n_eval:
            why = "no eval set: eval after training only, if at all"
        else:
            why = "the run's length is set: eval after training only"
        choices["eval_steps"] = Choice(out.eval_steps, True, why)
    else:
        choices["eval_steps"] = Choice(out.eval_steps, False, "as configured")
    if out.early_stopping_patience is None:
        out.early_stopping_patience = PATIENCE if n_eval and out.eval_steps else 0
        why = (
            f"stop after {PATIENCE} evals without a better eval loss; keep the best weights"
            if out.early_stopping_patience
            else "no evals during training: off"
        )
        choices["early_stopping_patience"] = Choice(out.early_stopping_patience, True, why)
    else:
        choices["early_stopping_patience"] = Choice(
            out.early_stopping_patience, False, "as configured (0 = off)"
        )
    defaults = Defaults(n_examples, n_train, n_eval, method, objective, choices)
    return out, defaults


def resolve_for_data(
    config: Any, kind: str, data: Any, eval_data: Any = None
) -> tuple[Any, Defaults]:
    """``resolve_defaults`` for loaded data (``trainer.data.LoadedData``); logs the choices."""
    from trainer.objectives import get_objective

    resolved, defaults = resolve_defaults(
        config,
        kind,
        len(data.examples),
        len(eval_data.examples) if eval_data is not None else None,
    )
    own = get_objective(kind).data_defaults
    if own is not None:
        resolved, choices = own(resolved, data.examples)
        defaults.choices.update(choices)
    for line in defaults.describe():
        logger.info("%s", line)
    return resolved, defaults


def _split_size(n_examples: int, fraction: float) -> int:
    """The hold-out ``trainer.common.split_eval`` makes for ``fraction``."""
    if fraction <= 0 or n_examples < 2:
        return 0
    return min(max(1, round(n_examples * fraction)), n_examples - 1)


def make_early_stopping(patience: int) -> Any:
    """A Trainer callback: stop after ``patience`` evals without a lower eval loss, and put
    the trainable weights of the best eval back at the end of training."""
    from transformers import TrainerCallback

    class EarlyStopping(TrainerCallback):
        def __init__(self) -> None:
            self.best: float | None = None
            self.best_step = 0
            self.bad_evals = 0
            self.saved: dict[str, Any] | None = None
            self.stopped_at: int | None = None
            self.last_step: int | None = None  # the step of the last eval seen
            self.history: list[dict[str, float]] = []

        def on_step_end(self, args, state, control, **kwargs):
            # the last step is always evaluated, so the best weights are chosen among all
            every = getattr(args, "eval_steps", None) or 0
            last = state.global_step >= state.max_steps
            if last and not (every and state.global_step % every == 0):
                control.should_evaluate = True

        def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
            loss = (metrics or {}).get("eval_loss")
            if loss is None or model is None or state.global_step == self.last_step:
                return
            self.last_step = state.global_step
            self.history.append({"step": state.global_step, "eval_loss": float(loss)})
            # a NaN or infinite eval loss is never a new best
            if math.isfinite(loss) and (self.best is None or loss < self.best):
                self.best, self.best_step, self.bad_evals = float(loss), state.global_step, 0
                # only the trained parameters: a few MB for a LoRA
                self.saved = {
                    n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
                }
                return
            self.bad_evals += 1
            if self.bad_evals >= patience:
                self.stopped_at = state.global_step
                control.should_training_stop = True
                logger.info(
                    "early stop at step %d: eval loss %.4f has not improved on %.4f (step %d) "
                    "for %d evals",
                    state.global_step,
                    loss,
                    self.best,
                    self.best_step,
                    patience,
                )

        def on_train_end(self, args, state, control, model=None, **kwargs):
            if self.saved is None or model is None or self.best_step == state.global_step:
                return
            import torch

            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in self.saved:
                        p.copy_(self.saved[n])
            logger.info(
                "kept the weights of step %d (eval loss %.4f)", self.best_step, self.best or 0
            )

        def summary(self) -> dict[str, Any]:
            return {
                "best_eval_loss": self.best,
                "best_step": self.best_step,
                "stopped_early_at": self.stopped_at,
                "eval_loss_history": list(self.history),
            }

    return EarlyStopping()
