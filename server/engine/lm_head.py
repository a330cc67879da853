"""An int8 output layer for CPUs without native bfloat16 matmuls.

Gemma 3's output layer is its tied 262k x 640 embedding, kept in bfloat16 by the loader.
On an AVX2 CPU a bfloat16 matmul is emulated: fine for one row (memory-bound, ~35 ms),
but a decode step of 8 rows pays ~260 ms for the logits alone, half the step. With the
weight in int8 (one scale per vocabulary row, as llama.cpp keeps its output tensor in
Q6_K/Q8_0) torch's weight-only int8 kernel does 8 rows in ~90 ms. The embedding lookup
keeps the bfloat16 table; the int8 copy adds a quarter of the full-precision size.

In a model whose output layer is tied to its input embedding (Gemma), the embedding can
look its rows up in the same int8 table instead (``share_embedding``): one 8-bit table
serves both, and the full-precision one is freed. The fast path does this.

The logits can be screened first (``screen``), and only each row's leading logits then
computed from the int8 rows, in float32: the choice among the leaders is the int8 weights'
(greedy decoding and the top log probabilities), the rest of the vocabulary carries the
screen's values (sampling's far tail). Two screens:
- ``"int4"`` (the fast path's): an int4 copy of the table (half the int8 one's size)
  through PyTorch's fused int4 kernel: ~1.8x quicker than the int8 kernel at one row and
  ~1.5x at eight; or, with ``kernel="vnni"``, through the VNNI kernel
  (server/engine/vnni.py), each row's activations in 8 bits: 5.6 against 7.5 ms for Gemma
  3's table at one row, 10 against 38 ms at eight (and against 15 for int8-dynamic), so
  that where it runs the int4 copy is the only screen held.
- ``"int8-dynamic"``: the int8 table packed for FBGEMM's integer matmul, each row's
  activations quantized to 8 bits on the fly (7 on a CPU without VNNI, whose 16-bit pair
  sums would saturate), scaled by the row's own largest value, so that a row's logits do not
  depend on the other rows of the batch (integer sums are exact). A decode step of 8 rows
  of Gemma 3 270M measured 16 % quicker than with the int4 screen, one row 8 % slower (it
  reads twice the bytes); the packed copy is as large as the int8 table.
- ``"int4+int8-dynamic"`` (the fast path's where FBGEMM and VNNI are there): both copies,
  the int4 one for forwards of fewer than ``DYNAMIC_FROM_ROWS`` rows (a single stream, a
  prompt's last token), the integer matmul from there up (a batch of streams). A row's
  leaders are the int8 weights' in either case; the tail of the vocabulary carries the
  values of the screen its forward used.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from server.engine import vnni
from server.engine.int4 import fits_int4, int4_kernel_available, pack_int4, pack_vnni
from server.engine.topk import top_k_indices

# how many of each row's leading logits are recomputed in float32 (see Int8LMHead.forward)
REFINE_TOP_K = 64
# input columns per scale and zero of the int4 screen (the int4 kernel's group size)
LM_HEAD_SCREEN_GROUP_SIZE = 64


SCREENS = ("int8-dynamic", "int4", "int4+int8-dynamic")
# forwards of this many rows or more take the int8-dynamic screen when both are held
DYNAMIC_FROM_ROWS = 4


def cpu_has_vnni() -> bool:
    """Whether the CPU has VNNI's 8-bit dot products (AVX512-VNNI or AVX-VNNI): FBGEMM's
    integer matmul then sums 8-bit activations exactly, where without it pairs of products
    saturate at 16 bits unless the activations keep to 7 (``reduce_range``)."""
    return bool(vnni.cpu_flags() & {"avx512_vnni", "avx_vnni"})


def fbgemm_available() -> bool:
    """Whether PyTorch's FBGEMM integer matmul (x86) is built in."""
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(
        torch.ops.quantized, "linear_dynamic"
    )


def auto_screen(kernel: str = "torch") -> str:
    """The fast path's screen: the int4 copy (the quicker at one row, with half the bytes);
    on PyTorch's int4 kernel, beside it FBGEMM's integer matmul for batches where VNNI's dot
    products make it the quicker (16 % less per decode step of 8 rows on Gemma 3 270M). On
    the VNNI kernel (``kernel="vnni"``) the int4 copy is the quicker at every row count."""
    if kernel == "vnni":
        return "int4"
    return "int4+int8-dynamic" if fbgemm_available() and cpu_has_vnni() else "int4"


class Int8LMHead(nn.Module):
    def __init__(self, weight: torch.Tensor, screen: str | None = None, kernel: str = "torch"):
        super().__init__()
        if screen is not None and screen not in SCREENS:
            raise ValueError(f"screen must be one of {SCREENS}, not {screen!r}")
        if kernel not in ("torch", "vnni"):
            raise ValueError(f"kernel must be torch or vnni, not {kernel!r}")
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        self.register_buffer("weight_int8", q.contiguous(), persistent=False)
        self.register_buffer("scale", scale.to(torch.bfloat16), persistent=False)  # the kernel's
        self.register_buffer("scale_f32", scale.contiguous(), persistent=False)  # the refinement's
        self.in_features = int(weight.shape[1])
        self.out_features = int(weight.shape[0])
        self.screen_group_size: int | None = None
        self.screen: torch.Tensor | None
        self.screen_scales: torch.Tensor | None
        self.register_buffer("screen", None, persistent=False)
        self.register_buffer("screen_scales", None, persistent=False)
        self.screen_vnni: vnni.Packed | None = None  # the int4 screen on the VNNI kernel
        self.packed: Any = None  # FBGEMM's packed int8 table (not a tensor)
        self.packed_bytes = 0
        self.reduce_range = True
        if screen in ("int8-dynamic", "int4+int8-dynamic") and fbgemm_available():
            self._pack_fbgemm(q, scale)
        if screen in ("int4", "int4+int8-dynamic"):
            self._hold_int4_screen(w, kernel)

    def _hold_int4_screen(self, w: torch.Tensor, kernel: str) -> None:
        # plain min/max per group: the screen only has to rank, the leaders are recomputed
        group = LM_HEAD_SCREEN_GROUP_SIZE
        if kernel == "vnni" and vnni.fits(self.in_features, self.out_features, group):
            self.screen_vnni = pack_vnni(w, group, shrinks=(1.0,))
            self.screen_vnni.register_on(self, prefix="vnni_")
            self.screen_group_size = group
        elif int4_kernel_available() and fits_int4(self.in_features, self.out_features, group):
            packed, scales = pack_int4(w, group, shrinks=(1.0,))
            self.screen, self.screen_scales = packed, scales
            self.screen_group_size = group

    @property
    def screen_kind(self) -> str | None:
        """The screens held (one of SCREENS), or None: the int8 kernel for every logit."""
        int4 = self.screen_kernel is not None
        if self.packed is not None and int4:
            return "int4+int8-dynamic"
        if self.packed is not None:
            return "int8-dynamic"
        return "int4" if int4 else None

    @property
    def screen_kernel(self) -> str | None:
        """Which kernel runs the int4 screen: "vnni", "torch", or None without one."""
        if self.screen_vnni is not None:
            return "vnni"
        return "torch" if self.screen is not None else None

    def _pack_fbgemm(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        with warnings.catch_warnings():  # PyTorch's quantized tensors warn of their future
            warnings.simplefilter("ignore")
            qweight = torch._make_per_channel_quantized_tensor(
                q, scale.double(), torch.zeros(self.out_features, dtype=torch.long), 0
            )
            self.packed = torch.ops.quantized.linear_prepack(qweight, None)
        # the activations' range is fixed by one extra row holding +1 and -1, so that the
        # on-the-fly quantization of a batch does not depend on its other rows
        pad = torch.zeros(1, self.in_features)
        pad[0, 0], pad[0, -1] = 1.0, -1.0
        self.register_buffer("pad", pad, persistent=False)
        # the packed rows, and per row a scale, a zero point and a column offset
        self.packed_bytes = self.out_features * (self.in_features + 8 + 8 + 4)
        # 8-bit activations where VNNI sums them exactly, else 7 (no 16-bit saturation)
        self.reduce_range = not cpu_has_vnni()

    def _screen_int8_dynamic(self, flat: torch.Tensor) -> torch.Tensor:
        x = flat.float()
        peak = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)  # each row in [-1, 1]
        out = torch.ops.quantized.linear_dynamic(
            torch.cat([x / peak, self.pad]), self.packed, self.reduce_range
        )
        return out[:-1] * peak

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        int4 = self.screen_kernel is not None
        if self.packed is not None and (not int4 or len(flat) >= DYNAMIC_FROM_ROWS):
            out = self._screen_int8_dynamic(flat)
        elif self.screen_vnni is not None:
            out = vnni.matmul(flat, self.screen_vnni, halves=1)  # it only ranks
        elif self.screen is not None:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                flat.to(torch.bfloat16), self.screen, self.screen_group_size, self.screen_scales
            )
        else:
            out = torch._weight_int8pack_mm(flat.to(torch.bfloat16), self.weight_int8, self.scale)
        out = out.float()
        # The kernels write bfloat16 (8 significant bits, so logits near 25 come in steps of
        # 0.125) or quantize the activations: the leading candidates of a small model often tie
        # or swap (SmolLM2 answered "L'Etoile..." for Paris). The leading candidates are
        # recomputed in float32 from the int8 rows: the choice among them is the int8
        # weights', not the rounding's nor the screen's.
        top = top_k_indices(out, min(REFINE_TOP_K, self.out_features))  # (M, k)
        rows = self.weight_int8[top].float()  # (M, k, in)
        exact = torch.einsum("mi,mki->mk", flat.float(), rows) * self.scale_f32[top]
        out.scatter_(1, top, exact)
        return out.reshape(*x.shape[:-1], self.out_features)


class Int8Embedding(nn.Module):
    """An input embedding that looks its rows up in a tied Int8LMHead's table."""

    def __init__(self, head: Int8LMHead, embed_scale: float, padding_idx: int | None):
        super().__init__()
        # the same tensors as the head's: counted once in the model's resident size
        self.register_buffer("weight_int8", head.weight_int8, persistent=False)
        self.register_buffer("scale", head.scale, persistent=False)
        self.num_embeddings = head.out_features
        self.embedding_dim = head.in_features
        self.padding_idx = padding_idx
        # Gemma multiplies looked-up rows by sqrt(hidden); the token-row layers read it here
        self.embed_scale = embed_scale

    @property
    def weight(self) -> torch.Tensor:
        """The int8 table (callers read its shape)."""
        return self.weight_int8

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight_int8[input_ids].float() * self.scale[input_ids].float()[..., None]
        return rows * self.embed_scale if self.embed_scale != 1.0 else rows


def use_int8_lm_head(
    model: nn.Module,
    *,
    share_embedding: bool = False,
    screen: str | None = None,
    kernel: str = "torch",
) -> bool:
    """Swap the model's output layer for an int8 one; False where it has none to swap.

    With ``share_embedding``, a tied input embedding is replaced too, by lookups into the
    same int8 table. With ``screen`` (one of SCREENS), logits are screened first (see the
    module's docstring), its int4 copy on ``kernel`` (torch or vnni); a screen whose kernel
    the CPU lacks is not held."""
    head = getattr(model, "lm_head", None)
    weight = getattr(head, "weight", None)
    if not isinstance(head, nn.Linear) or weight is None or head.bias is not None:
        return False
    get_embedding = getattr(model, "get_input_embeddings", None)
    embedding = get_embedding() if get_embedding is not None else None
    tied = embedding is not None and getattr(embedding, "weight", None) is weight
    new_head = Int8LMHead(weight, screen=screen, kernel=kernel)
    model.lm_head = new_head
    if share_embedding and tied and isinstance(embedding, nn.Embedding):
        scale = getattr(embedding, "embed_scale", None)
        # as the model computes it: the scale in the table's dtype
        embed_scale = 1.0 if scale is None else float(torch.as_tensor(scale).to(weight.dtype))
        model.set_input_embeddings(Int8Embedding(new_head, embed_scale, embedding.padding_idx))
    return True


def table_is_most_of_the_model(model: nn.Module) -> bool:
    """Whether the input embedding holds more than half of the model's weights, as loaded
    (before linear layers are re-packed into buffers). Gemma 3
    270M: 63 %; SmolLM2-135M: 21 %). Only then does the fast path share the int8 output
    table with the embedding: an int8 row is a coarser lookup than the loaded one
    (SmolLM2-135M-Instruct's greedy answers kept 12.4 of 32 float32 tokens with the shared
    table, 21.8 with its own: loadtests/bench_quality.py), worth it where the table is most
    of the resident size."""
    embedding = model.get_input_embeddings()
    table = sum(p.numel() for p in embedding.parameters())
    total = sum(p.numel() for p in model.parameters())
    return total > 0 and table > total / 2
