"""LoRA deltas on the CPU kernel (server/engine/vnni.py): each row its own adapter, the
blocks in 8 bits, within their rounding of the float32 deltas."""

from __future__ import annotations

import pytest
import torch

from server.engine import vnni
from server.engine.int4 import Int4Linear
from server.engine.kinds.lora import LoRALinear, LoRARows, LoRAWeights

pytestmark = pytest.mark.skipif(
    vnni.unavailable() is not None, reason=f"VNNI kernel out: {vnni.unavailable()}"
)


def _block(rank: int, in_f: int, out_f: int, scale: float = 1.0):
    return torch.randn(rank, in_f) * 0.1, torch.randn(out_f, rank) * 0.1 * scale


def _delta(x: torch.Tensor, block) -> torch.Tensor:
    a, b = block
    return (x @ a.t()) @ b.t()


@pytest.mark.parametrize(("in_f", "out_f"), [(64, 48), (40, 72), (640, 2048)])
@pytest.mark.parametrize("tokens", [1, 3])
def test_each_row_gets_its_own_adapters_delta(in_f, out_f, tokens):
    """Ranks 8, 16 and none on this layer, a row without adapter, an adapter 100x smaller
    than another (its own scales: not rounded away), widths with tails."""
    torch.manual_seed(in_f + tokens)
    blocks = [
        _block(8, in_f, out_f),
        None,
        _block(16, in_f, out_f, scale=0.01),
        _block(4, in_f, out_f),
    ]
    pack = vnni.pack_lora([b and vnni.quantize_lora(*b) for b in blocks], in_f, out_f)
    assert pack.slots == 4 and pack.offsets.tolist() == [0, 8, 8, 24, 28]
    slots = torch.tensor([2, -1, 0, 3, 1, 2, 0], dtype=torch.int32)
    x = torch.randn(len(slots) * tokens, in_f)
    base = torch.randn(len(x), out_f)
    out = base.clone()
    vnni.lora_add(out, x, pack, slots, tokens)
    for row, slot in enumerate(slots.tolist()):
        rows = slice(row * tokens, (row + 1) * tokens)
        block = blocks[slot] if slot >= 0 else None
        if block is None:  # no adapter, or none on this layer: untouched, bit for bit
            assert torch.equal(out[rows], base[rows])
            continue
        want = _delta(x[rows], block)
        got = out[rows] - base[rows]
        # two 8-bit roundings (A's and B's) of gaussian blocks: ~0.7 % each
        err = float((got - want).norm() / want.norm())
        assert err < 0.02, (row, slot, err)


def test_eight_bit_blocks_are_a_quarter_of_float32():
    blocks = [_block(16, 640, 2048) for _ in range(8)]
    pack = vnni.pack_lora([vnni.quantize_lora(*b) for b in blocks], 640, 2048)
    float_bytes = sum(a.nbytes + b.nbytes for a, b in blocks)
    assert pack.nbytes < 0.3 * float_bytes


def test_bad_inputs_are_refused_and_nothing_is_written():
    pack = vnni.pack_lora([vnni.quantize_lora(*_block(4, 32, 16))], 32, 16)
    x, out = torch.randn(2, 32), torch.zeros(2, 16)
    with pytest.raises(ValueError, match="do not fit"):
        vnni.lora_add(out, torch.randn(2, 24), pack, torch.tensor([0, 0], dtype=torch.int32))
    with pytest.raises(ValueError, match="do not fit"):
        vnni.lora_add(out, x, pack, torch.tensor([0], dtype=torch.int32))  # 1 slot, 2 rows
    with pytest.raises(ValueError, match="slots"):
        vnni.lora_add(out, x, pack, torch.tensor([0, 5], dtype=torch.int32))  # no slot 5
    assert torch.equal(out, torch.zeros(2, 16))


def test_lora_rows_over_a_kernel_layer_pack_in_8_bits_and_match_float32():
    """LoRARows over an Int4Linear of the VNNI kernel: the layer holds the 8-bit pack and
    no float32 blocks; mixed rows (two adapters, a base row), a single-adapter batch and a
    prefill of several tokens per row all land within the blocks' rounding."""
    torch.manual_seed(0)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = Int4Linear(torch.randn(96, 64) * 0.05, None, 32, kernel="vnni")

    model = Tiny()
    base = model.proj
    rows = LoRARows(model, torch.device("cpu"), torch.float32)
    blocks = {"one": _block(8, 64, 96), "two": _block(16, 64, 96)}
    for name, block in blocks.items():
        rows.add(LoRAWeights(name, {"proj": block}))
    layer = model.proj
    assert isinstance(layer, LoRALinear) and layer.int8 is not None and layer.a_cat is None
    for names, tokens in ((["two", None, "one"], 1), (["one", "one"], 1), (["two", "one"], 4)):
        x = torch.randn(len(names), tokens, 64)
        rows.plan(names, None)
        got = layer(x)
        assert got.shape == (len(names), tokens, 96)
        for i, name in enumerate(names):
            if name is None:
                assert torch.equal(got[i], base(x[i]))
                continue
            want = _delta(x[i], blocks[name])
            delta = got[i] - base(x[i])
            assert float((delta - want).norm() / want.norm()) < 0.02, (names, i)
    # each adapter quantized once: a repack (another adapter joining) reuses its blocks
    kept = rows._int8["one"]["proj"]
    rows.add(LoRAWeights("three", {"proj": _block(4, 64, 96)}))
    assert rows._int8["one"]["proj"] is kept and layer.int8.slots == 3
    for name in ("one", "two", "three"):
        rows.remove(name)
    assert layer.int8 is None and not rows._int8
