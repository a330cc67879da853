"""Small helpers shared by the trainer tests."""

from __future__ import annotations

import json
from pathlib import Path

# Short questions whose answers the tiny tokenizer covers well (it was trained on them).
QA = [
    ("What is the capital of France?", "Paris"),
    ("What is 2 plus 2?", "4"),
    ("Which animal is quick?", "the brown fox"),
    ("Which dog is lazy?", "the lazy dog"),
    ("What changes behaviour?", "adapters"),
    ("What brings knowledge?", "retrieval"),
    ("Say hello.", "hello world"),
    ("What is served per request?", "LoRA adapters"),
]


def house(answer: str) -> str:
    return json.dumps({"answer": answer, "confidence": "high"})


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def snapshot_base(model) -> list:
    """(name, parameter, copy) for every base weight, before any adapter exists."""
    return [(n, p, p.detach().clone()) for n, p in model.named_parameters()]


def assert_base_unchanged(snapshot) -> None:
    import torch

    for name, param, before in snapshot:
        # QLoRA preparation upcasts bf16 norms to fp32 (lossless); values must not move.
        now = param.detach()
        if now.dtype != before.dtype:
            now, before = now.float(), before.float()
        assert torch.equal(now, before), f"base weight {name} changed"


def assert_lora_trained(output_dir: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(output_dir / "adapter_model.safetensors"))
    lora_b = {k: v for k, v in tensors.items() if "lora_B" in k}
    assert lora_b, f"no lora_B tensors in {sorted(tensors)[:5]}"
    # PEFT initialises lora_B to zero: any non-zero entry means training moved it.
    assert any(v.abs().sum() > 0 for v in lora_b.values())


def loss_went_down(history: list[dict]) -> bool:
    losses = [h["loss"] for h in history]
    return sum(losses[-2:]) / 2 < sum(losses[:2]) / 2


def quick_config(config_cls, model_dir, **overrides):
    """A job config for a few fast CPU steps on a tiny model, no eval; fields overridable."""
    fields = dict(
        base_model=str(model_dir),
        quantization="none",
        device="cpu",
        r=4,
        learning_rate=1e-2,
        max_steps=4,
        batch_size=4,
        max_length=128,
        eval_fraction=0.0,
    )
    fields.update(overrides)
    return config_cls(**fields)
