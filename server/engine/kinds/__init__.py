"""Adapter kinds, one module per PEFT method, found by ``peft_type``.

The layout follows PEFT's ``peft/tuners/<method>/``: a reader who knows PEFT finds the LoRA
kind in lora.py, IA3 in ia3.py, and so on, each holding the method's validation (what the
file must hold to fit the base), its loader and its per-row application. Adding a kind is
one new module here and one line in ``KINDS``.
"""

from __future__ import annotations

from server.engine.kinds import (
    ia3,
    ln_tuning,
    lora,
    p_tuning,
    prefix_tuning,
    prompt_tuning,
    trainable_tokens,
)
from server.engine.kinds.base import AdapterKind

KINDS: dict[str, AdapterKind] = {
    kind.peft_type: kind
    for kind in (
        lora.KIND,
        ia3.KIND,
        prompt_tuning.KIND,
        p_tuning.KIND,
        prefix_tuning.KIND,
        ln_tuning.KIND,
        trainable_tokens.KIND,
    )
}
BY_NAME: dict[str, AdapterKind] = {kind.name: kind for kind in KINDS.values()}


def kind_for(peft_type: str) -> AdapterKind | None:
    return KINDS.get(peft_type.upper())
