"""4-bit weight-only linear layers on PyTorch's fused CPU kernel.

bitsandbytes' NF4 layers on a CPU dequantize the whole weight to floats before every
multiply: a decode step of the bundled model rebuilds ~100M weights per token, and that,
not the multiply, is most of the step. PyTorch ships a fused weight-only int4 kernel for
the CPU (``torch._weight_int4pack_mm_for_cpu``, the one torchao's int4 CPU layout uses):
it reads the packed nibbles and their group scales inside the matmul, with bfloat16
activations, and is faster than a float32 matmul on the dequantized weight.

Its format is affine 4-bit per group of ``group_size`` input columns: ``w = (q - 8) *
scale + zero`` with ``q`` in 0..15, ``scale`` and ``zero`` in bfloat16. NF4 (16 fixed
non-uniform levels times one absmax per block of 64) is not of that form, so the layers
are re-quantized at load from the weights as the loader holds them (NF4 dequantized, or
floats), choosing per group the range that minimises the squared error rather than plain
min/max. The resident size stays 4-bit: half a byte per weight plus 4 bytes of scale and
zero per group.

Only the decoder's linear layers are converted; the output layer has its own module
(server/engine/lm_head.py). Layers the kernel cannot take (an input width that is not a
multiple of the group size, an output width that is not a multiple of 16) are left as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from server.engine import revision, vnni
from server.engine.hugepages import resident

logger = logging.getLogger(__name__)

GROUP_SIZES = (32, 64, 128, 256)
# Shrink factors tried for each group's range: the first is plain min/max. A narrower
# range clips a few outliers but rounds every other weight more finely.
_RANGE_SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8)


def int4_kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
    )


def fits_int4(in_features: int, out_features: int, group_size: int) -> bool:
    return in_features % group_size == 0 and out_features % 16 == 0


def quantize_int4(
    weight: torch.Tensor, group_size: int, shrinks: tuple[float, ...] = _RANGE_SHRINK
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> (q (out, in) int32 in 0..15, scales_and_zeros
    (in / group_size, out, 2) bfloat16), the layout the CPU kernel wants. ``shrinks``: the
    range factors tried per group (``(1.0,)``: plain min/max, five times quicker)."""
    out_f, in_f = weight.shape
    w = weight.detach().float().reshape(out_f, in_f // group_size, group_size)
    lo_full = w.amin(dim=-1, keepdim=True)
    hi_full = w.amax(dim=-1, keepdim=True)
    mid = (lo_full + hi_full) / 2
    half = (hi_full - lo_full) / 2
    best_err = None
    best_q = best_scale = best_lo = None
    for shrink in shrinks:
        lo = mid - half * shrink
        scale = (half * shrink * 2 / 15).clamp_min(1e-8)
        # the kernel keeps scale and zero in bfloat16: choose q against those values
        scale = scale.to(torch.bfloat16).float()
        zero = (lo + scale * 8).to(torch.bfloat16).float()
        lo = zero - scale * 8
        q = torch.round((w - lo) / scale).clamp_(0, 15)
        err = ((q * scale + lo - w) ** 2).sum(dim=-1, keepdim=True)
        if best_err is None:
            best_err, best_q, best_scale, best_lo = err, q, scale, lo
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_q = torch.where(better, q, best_q)
        best_scale = torch.where(better, scale, best_scale)
        best_lo = torch.where(better, lo, best_lo)
    assert best_q is not None and best_scale is not None and best_lo is not None
    zero = best_lo + best_scale * 8
    q_int = best_q.to(torch.int32).reshape(out_f, in_f)
    scales_and_zeros = (
        torch.stack([best_scale.squeeze(-1), zero.squeeze(-1)], dim=-1)  # (out, groups, 2)
        .transpose(0, 1)
        .contiguous()
        .to(torch.bfloat16)
    )
    return q_int, scales_and_zeros


# rows quantized at once when packing: a 262k-row table never has more than this many
# rows' float copies (a multiple of both layouts' row blocks: 64 and 16)
_PACK_ROWS = 16384


def _quantized_row_blocks(
    weight: torch.Tensor, group_size: int, shrinks: tuple[float, ...]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """quantize_int4 over ``_PACK_ROWS`` rows at a time (both kernels pack rows apart)."""
    for start in range(0, weight.shape[0], _PACK_ROWS):
        yield quantize_int4(weight[start : start + _PACK_ROWS], group_size, shrinks)


def pack_int4(
    weight: torch.Tensor, group_size: int, shrinks: tuple[float, ...] = _RANGE_SHRINK
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) weight -> (packed nibbles, scales_and_zeros) for the CPU kernel."""
    packed, scales = [], []
    for q, sz in _quantized_row_blocks(weight, group_size, shrinks):
        packed.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1))
        scales.append(sz)
    return resident(torch.cat(packed)), resident(torch.cat(scales, dim=1))


def pack_vnni(
    weight: torch.Tensor, group_size: int, shrinks: tuple[float, ...] = _RANGE_SHRINK
) -> vnni.Packed:
    """(out, in) weight -> the same int4 weights in the VNNI kernel's layout."""
    parts = [
        vnni.pack(q, sz, group_size) for q, sz in _quantized_row_blocks(weight, group_size, shrinks)
    ]
    return vnni.Packed(
        resident(torch.cat([p.nibbles for p in parts])),
        resident(torch.cat([p.scales for p in parts])),
        resident(torch.cat([p.minimums for p in parts])),
        int(weight.shape[0]),
        int(weight.shape[1]),
        group_size,
    )


def dequantize_int4(q: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """The float weight an int4 layer stands for (for tests and quality checks)."""
    out_f, in_f = q.shape
    groups = scales_and_zeros.shape[0]
    sz = scales_and_zeros.float().transpose(0, 1)  # (out, groups, 2)
    w = (q.float().reshape(out_f, groups, -1) - 8) * sz[..., :1] + sz[..., 1:]
    return w.reshape(out_f, in_f)


class Int4Linear(revision.Watched, nn.Module):
    """y = x @ W.T (+ bias) with W in 4 bits, on ``_weight_int4pack_mm_for_cpu`` or, with
    ``kernel="vnni"``, on the VNNI kernel (server/engine/vnni.py): the same quantized
    weights either way, in the layout of the kernel that serves them."""

    _kernel_inputs = frozenset({"vnni"})  # what kernel_parts reads besides the bias buffer

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        group_size: int = 32,
        kernel: str = "torch",
    ):
        super().__init__()
        out_f, in_f = weight.shape
        if not fits_int4(int(in_f), int(out_f), group_size):
            raise ValueError(
                f"a {in_f} x {out_f} layer does not fit the int4 kernel with group size "
                f"{group_size} (in_features a multiple of it, out_features of 16)"
            )
        if kernel not in ("torch", "vnni"):
            raise ValueError(f"kernel must be torch or vnni, not {kernel!r}")
        self.in_features = int(in_f)
        self.out_features = int(out_f)
        self.group_size = group_size
        self.kernel = kernel
        self.vnni: vnni.Packed | None = None
        if kernel == "vnni":
            self.vnni = pack_vnni(weight, group_size)
            self.vnni.register_on(self)
        else:
            packed, scales_and_zeros = pack_int4(weight, group_size)
            self.register_buffer("packed", packed, persistent=False)
            self.register_buffer("scales_and_zeros", scales_and_zeros, persistent=False)
        self.register_buffer(
            "bias", None if bias is None else bias.detach().float().clone(), persistent=False
        )

    def kernel_parts(self) -> tuple[vnni.Packed, vnni.LoRAPack | None, torch.Tensor | None] | None:
        """What a whole layer on the CPU kernel (vnni.DecodeLayer) takes in place of calling
        this module: its packed weight, no LoRA pack, no row slots; None where this layer
        is not on the kernel (or has a bias)."""
        if self.vnni is None or self.bias is not None:
            return None
        return self.vnni, None, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.vnni is not None:
            out = vnni.matmul(flat, self.vnni)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                flat.to(torch.bfloat16), self.packed, self.group_size, self.scales_and_zeros
            )
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, group_size={self.group_size}, "
            f"kernel={self.kernel}"
        )


def float_weight(module: nn.Module) -> torch.Tensor | None:
    """A linear layer's weight as floats: plain, or dequantized from bitsandbytes' 4-bit."""
    weight = getattr(module, "weight", None)
    if weight is None:
        return None
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, quant_state).float()
    if isinstance(weight, torch.Tensor) and weight.is_floating_point() and weight.dim() == 2:
        return weight.detach().float()
    return None


def _in_out(weight: torch.Tensor) -> tuple[int, int]:
    return int(weight.shape[1]), int(weight.shape[0])


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    try:
        import bitsandbytes as bnb

        return isinstance(module, bnb.nn.Linear4bit)
    except ImportError:  # bitsandbytes is a dependency; this only guards odd installs
        return False


def repack_linear_layers(model: nn.Module, group_size: int = 32, kernel: str = "torch") -> int:
    """Replace every linear layer of the decoder (not the output layer) by an Int4Linear on
    ``kernel`` (torch or vnni).

    Returns the number of layers converted. One layer at a time, so the float copy of
    only one weight exists at once.
    """
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group size must be one of {GROUP_SIZES}")
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if child is output or not _is_linear(child):
                continue
            targets.append((parent, child_name, child))
    converted = 0
    for parent, child_name, child in targets:
        weight = float_weight(child)
        if weight is None or not fits_int4(*_in_out(weight), group_size):
            continue
        bias: Any = getattr(child, "bias", None)
        # a layer the VNNI layout cannot take stays on the int4 kernel
        layer_kernel = kernel if vnni.fits(*_in_out(weight), group_size) else "torch"
        setattr(parent, child_name, Int4Linear(weight, bias, group_size, layer_kernel))
        converted += 1
    logger.info(
        "re-packed %d linear layers to 4-bit (group size %d, %s kernel)",
        converted,
        group_size,
        kernel,
    )
    return converted
