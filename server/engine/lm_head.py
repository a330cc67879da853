"""An int8 output layer for CPUs without native bfloat16 matmuls.

Gemma 3's output layer is its tied 262k x 640 embedding, kept in bfloat16 by the loader.
On an AVX2 CPU a bfloat16 matmul is emulated: fine for one row (memory-bound, ~35 ms),
but a decode step of 8 rows pays ~260 ms for the logits alone, half the step. With the
weight in int8 (one scale per vocabulary row, as llama.cpp keeps its output tensor in
Q6_K/Q8_0) torch's weight-only int8 kernel does 8 rows in ~90 ms. The embedding lookup
keeps the bfloat16 table; the int8 copy adds a quarter of the full-precision size.
"""

from __future__ import annotations

import torch
from torch import nn


class Int8LMHead(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        self.register_buffer("weight_int8", q.contiguous(), persistent=False)
        self.register_buffer("scale", scale.to(torch.bfloat16), persistent=False)
        self.in_features = int(weight.shape[1])
        self.out_features = int(weight.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        out = torch._weight_int8pack_mm(flat, self.weight_int8, self.scale)
        return out.reshape(*x.shape[:-1], self.out_features)


def use_int8_lm_head(model: nn.Module) -> bool:
    """Swap the model's output layer for an int8 one; False where it has none to swap."""
    head = getattr(model, "lm_head", None)
    weight = getattr(head, "weight", None)
    if not isinstance(head, nn.Linear) or weight is None or head.bias is not None:
        return False
    model.lm_head = Int8LMHead(weight)
    return True
