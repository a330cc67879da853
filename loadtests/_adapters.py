"""Random LoRA adapters in PEFT's on-disk format, written straight from layer shapes.

Speed does not depend on weight values, so benchmarks make as many adapters as they need
in seconds, without loading the base model or training anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def linear_shapes_from_config(config: dict) -> dict[str, tuple[int, int]]:
    """(in, out) of every decoder linear layer of a Llama/Gemma-style model."""
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or hidden // heads
    inter = config["intermediate_size"]
    per_layer = {
        "self_attn.q_proj": (hidden, heads * head_dim),
        "self_attn.k_proj": (hidden, kv_heads * head_dim),
        "self_attn.v_proj": (hidden, kv_heads * head_dim),
        "self_attn.o_proj": (heads * head_dim, hidden),
        "mlp.gate_proj": (hidden, inter),
        "mlp.up_proj": (hidden, inter),
        "mlp.down_proj": (inter, hidden),
    }
    return {
        f"model.layers.{i}.{name}": shape
        for i in range(config["num_hidden_layers"])
        for name, shape in per_layer.items()
    }


def random_lora_adapter(
    out: Path,
    shapes: dict[str, tuple[int, int]],
    *,
    r: int = 16,
    seed: int = 0,
    base_name: str = "gemma-3-270m",
    scale: float = 0.02,
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (in_f, out_f) in shapes.items():
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(r, in_f, generator=gen) * scale
        tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, r, generator=gen) * scale
    save_file(tensors, out / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": r,
        "lora_alpha": 2 * r,
        "lora_dropout": 0.0,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in shapes}),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return out
