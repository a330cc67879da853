"""Full fine-tune -> LoRA: a truncated SVD of each linear layer's weight change.

For a linear layer with base weight W0 and fine-tuned weight W1, the change D = W1 - W0
(out, in) has the SVD D = U S V^T. Its best rank-r approximation (Eckart-Young) is
U_r S_r V_r^T, which is exactly a LoRA with B = U_r S_r (out, r), A = V_r^T (r, in) and
scaling 1 (lora_alpha = r). The relative error of that layer is
sqrt(sum of the dropped S^2) / sqrt(sum of all S^2), reported per layer and overall.

The rank is ``extract_rank`` for every layer, or per layer the smallest rank that keeps
``extract_energy`` of the squared singular values (at most ``extract_max_rank``), written
as PEFT's ``rank_pattern``/``alpha_pattern``. What a LoRA on the linear layers cannot carry
(the change to the embeddings and the norm weights) is reported as its share of the whole
change, so a reader sees how much of the fine-tune the adapter leaves out.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PER_LAYER_IN_CARD = 400


def linear_layers(model: Any) -> dict[str, Any]:
    """Module path -> nn.Linear for every linear layer but the output head."""
    import torch

    head = model.get_output_embeddings()
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head
    }


def energy_rank(singular: Any, energy: float) -> int:
    """The smallest r whose top-r squared singular values hold ``energy`` of the total."""
    import torch

    power = singular.double() ** 2
    total = float(power.sum())
    if total == 0.0:
        return 0
    kept = torch.cumsum(power, 0) / total
    # a tolerance for float round-off: energy 1.0 must not ask for one rank past the last
    return int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=kept.dtype))) + 1


def extract_lora(reference: Any, trained: Any, config: Any) -> tuple[dict[str, Any], Any]:
    """A LoRA (PEFT model on ``reference``, the frozen base copy) approximating the change
    from ``reference`` to ``trained``, and the extraction report. ``reference`` gets the
    LoRA layers injected in place: use the returned PEFT model from here on."""
    import torch
    from peft import LoraConfig, get_peft_model

    base_layers = linear_layers(reference)
    tuned_layers = linear_layers(trained)
    factors: dict[str, tuple[Any, Any]] = {}
    per_layer = []
    linear_sq = 0.0
    dropped_sq = 0.0
    with torch.no_grad():
        for path, base_layer in base_layers.items():
            delta = tuned_layers[path].weight.detach().float() - base_layer.weight.detach().float()
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)  # (out, k), (k,), (k, in)
            total = float((s.double() ** 2).sum())
            if total == 0.0:
                continue  # untouched by training: nothing to carry
            if config.extract_rank is not None:
                rank = min(config.extract_rank, s.numel())
            else:
                rank = min(energy_rank(s, config.extract_energy), config.extract_max_rank)
            rest = float((s[rank:].double() ** 2).sum())
            factors[path] = (vh[:rank].clone(), (u[:, :rank] * s[:rank]).clone())
            linear_sq += total
            dropped_sq += rest
            per_layer.append(
                {
                    "module": path,
                    "rank": rank,
                    "relative_error": (rest / total) ** 0.5,
                    "delta_norm": total**0.5,
                }
            )
        other_sq: dict[str, float] = {}
        tuned_params = dict(trained.named_parameters())
        linear_weights = {f"{p}.weight" for p in base_layers}
        for pname, param in reference.named_parameters():
            if pname in linear_weights or pname not in tuned_params:
                continue
            diff = float(
                ((tuned_params[pname].detach().float() - param.detach().float()) ** 2).sum()
            )
            if diff > 0:
                other_sq[pname] = diff
    if not factors:
        raise ValueError("the fine-tune changed no linear layer: there is nothing to extract")
    ranks = {path: a.shape[0] for path, (a, _) in factors.items()}
    top = max(ranks.values())
    lora = LoraConfig(
        r=top,
        lora_alpha=top,  # scaling alpha/r = 1: B A is the change itself
        lora_dropout=0.0,
        target_modules=sorted(ranks),
        rank_pattern={p: r for p, r in ranks.items() if r != top},
        alpha_pattern={p: r for p, r in ranks.items() if r != top},
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(reference, lora)
    with torch.no_grad():
        for path, (a, b) in factors.items():
            layer: Any = peft_model.base_model.model.get_submodule(path)  # type: ignore[union-attr]
            layer.lora_A["default"].weight.copy_(a)  # (r, in)
            layer.lora_B["default"].weight.copy_(b)  # (out, r)
    peft_model.requires_grad_(False)
    whole = linear_sq + sum(other_sq.values())
    rank_values = sorted(ranks.values())
    report = {
        "rank": config.extract_rank,
        "energy": None if config.extract_rank is not None else config.extract_energy,
        "max_rank": config.extract_max_rank,
        "layers": len(factors),
        "ranks": {
            "min": rank_values[0],
            "median": rank_values[len(rank_values) // 2],
            "max": rank_values[-1],
        },
        # ||D - B A|| / ||D|| over every extracted layer together
        "relative_error": (dropped_sq / linear_sq) ** 0.5,
        # share of the whole change (squared Frobenius norm) in the linear layers; the rest
        # (embeddings, norms) is not in the adapter
        "linear_share": linear_sq / whole if whole else 1.0,
        "not_extracted": {
            k: v / whole for k, v in sorted(other_sq.items(), key=lambda kv: -kv[1])[:8]
        },
        "per_layer": per_layer[:PER_LAYER_IN_CARD],
    }
    logger.info(
        "extracted a LoRA from %d layers: ranks %s, relative error %.4f, linear layers hold "
        "%.1f%% of the change",
        len(factors),
        report["ranks"],
        report["relative_error"],
        100 * report["linear_share"],
    )
    return report, peft_model


def save_full_model(model: Any, tokenizer: Any, model_dir: Path, card: dict[str, Any]) -> Path:
    """The fine-tuned weights as an ordinary model folder (safetensors, tokenizer with its
    chat template), usable as SWAPSERVE_BASE_MODEL; written beside and renamed at the end."""
    from trainer.atomic import write_json_atomic
    from trainer.common import CARD_NAME, check_output_dir

    model_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=model_dir.parent, prefix=f".{model_dir.name}.tmp-"))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        write_json_atomic(tmp / CARD_NAME, card, indent=2)
        check_output_dir(model_dir)
        os.replace(tmp, model_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("full fine-tuned model written to %s", model_dir)
    return model_dir
