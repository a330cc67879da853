"""The int8 output layer: close to the full-precision one, and batch-invariant per row."""

from __future__ import annotations

import asyncio

import pytest
import torch
from torch import nn

from server.engine import vnni
from server.engine.lm_head import (
    DYNAMIC_FROM_ROWS,
    Int8LMHead,
    fbgemm_available,
    use_int8_lm_head,
)
from tests.support import greedy_alone_and_batched


def test_int8_logits_stay_close_to_full_precision():
    torch.manual_seed(0)
    linear = nn.Linear(64, 5000, bias=False)
    x = torch.randn(6, 3, 64)
    ref = linear(x)
    head = Int8LMHead(linear.weight)
    out = head(x).float()
    assert out.shape == ref.shape
    assert head.weight_int8.dtype == torch.int8
    err = (out - ref).abs().max() / ref.abs().max()
    assert err < 0.02, f"relative error {err:.4f}"
    # where the top two logits are further apart than the error, the choice is the same
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * (out - ref).abs().max()
    assert clear.any()
    assert torch.equal(out.argmax(-1)[clear], ref.argmax(-1)[clear])


def test_leading_logits_are_exact_for_the_int8_weights_not_rounded_to_bfloat16():
    """Logits near 25 with gaps of a few hundredths, as a small instruction-tuned model's:
    the kernel's bfloat16 output (steps of 0.125 there) ties or swaps the leaders; the head
    recomputes them in float32, so its choice is the int8 weights' own."""
    torch.manual_seed(1)
    weight = torch.randn(4000, 96)
    x = torch.randn(16, 96)
    head = Int8LMHead(weight)
    deq = head.weight_int8.float() * head.scale_f32[:, None]  # the int8 weights, exactly
    x = x * (25.0 / (x @ deq.t()).amax(-1, keepdim=True))  # leading logit of each row at 25
    want = x @ deq.t()
    raw = torch._weight_int8pack_mm(x.to(torch.bfloat16), head.weight_int8, head.scale).float()
    # the test means something: bfloat16 rounding alone changes some row's choice or ties it
    top2 = raw.topk(2, dim=-1).values
    assert ((raw.argmax(-1) != want.argmax(-1)) | (top2[:, 0] == top2[:, 1])).any()
    out = head(x)
    assert out.dtype == torch.float32
    assert torch.equal(out.argmax(-1), want.argmax(-1))
    lead = want.topk(8, dim=-1)
    torch.testing.assert_close(out.gather(-1, lead.indices), lead.values, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "kernel",
    [
        "torch",
        pytest.param(
            "vnni",
            marks=pytest.mark.skipif(
                vnni.unavailable() is not None, reason=f"VNNI kernel out: {vnni.unavailable()}"
            ),
        ),
    ],
)
def test_an_int4_screen_keeps_the_int8_choice_and_leading_logits(kernel):
    """Screened in int4 (on either kernel), then each row's leaders recomputed from the int8
    rows: the choice and the leading logits are the int8 head's; the rest of the
    vocabulary stays within the int4 copy's error of the weights."""
    torch.manual_seed(2)
    weight = torch.randn(4096, 128)
    x = torch.randn(12, 128)
    plain = Int8LMHead(weight)
    screened = Int8LMHead(weight, screen="int4", kernel=kernel)
    assert screened.screen_kernel == kernel and plain.screen_kernel is None
    assert torch.equal(screened.weight_int8, plain.weight_int8)
    deq = plain.weight_int8.float() * plain.scale_f32[:, None]
    x = x * (25.0 / (x @ deq.t()).amax(-1, keepdim=True))
    want = x @ deq.t()
    out = screened(x)
    assert torch.equal(out.argmax(-1), want.argmax(-1))
    lead = want.topk(16, dim=-1)
    torch.testing.assert_close(out.gather(-1, lead.indices), lead.values, atol=1e-4, rtol=0)
    # the screen is a coarser copy, not another function: the tail within int4's error
    ref = x @ weight.t()
    err = (out - ref).abs().max() / ref.abs().max()
    assert 0 < err < 0.15, f"relative error {err:.4f}"
    # the int4 copy costs half the int8 table's bytes (plus a scale and zero per group)
    table = {"weight_int8", "scale", "scale_f32"}
    screen_bytes = sum(
        b.numel() * b.element_size() for n, b in screened.named_buffers() if n not in table
    )
    assert screen_bytes < 0.6 * screened.weight_int8.numel()


@pytest.mark.skipif(not fbgemm_available(), reason="PyTorch built without FBGEMM")
def test_an_int8_dynamic_screen_keeps_the_choice_and_is_exactly_batch_invariant():
    """FBGEMM's integer matmul with each row's activations quantized on its own scale: the
    leaders are the int8 head's, the rest within the activations' 7 bits, and a row's logits
    are bit for bit the same alone and beside rows of any other size (integer sums are exact,
    the quantization range is fixed)."""
    torch.manual_seed(3)
    weight = torch.randn(4096, 128)
    x = torch.randn(12, 128)
    x[5] *= 40  # a row far larger than the others must not coarsen theirs
    plain = Int8LMHead(weight)
    screened = Int8LMHead(weight, screen="int8-dynamic")
    assert screened.screen_kind == "int8-dynamic" and screened.packed is not None
    deq = plain.weight_int8.float() * plain.scale_f32[:, None]
    x = x * (25.0 / (x @ deq.t()).amax(-1, keepdim=True))
    x[5] *= 40
    want = x @ deq.t()
    out = screened(x)
    assert torch.equal(out.argmax(-1), want.argmax(-1))
    lead = want.topk(16, dim=-1)
    torch.testing.assert_close(out.gather(-1, lead.indices), lead.values, atol=1e-3, rtol=1e-5)
    err = ((out - want).abs().amax(-1) / want.abs().amax(-1)).max()
    assert 0 < err < 0.05, f"relative error {err:.4f}"
    alone = torch.cat([screened(x[i : i + 1]) for i in range(len(x))])
    assert torch.equal(alone, out)
    # the packed table is counted in the resident size
    assert screened.packed_bytes >= screened.weight_int8.numel()


@pytest.mark.skipif(not fbgemm_available(), reason="PyTorch built without FBGEMM")
def test_both_screens_held_each_forward_takes_the_one_for_its_row_count():
    """int4+int8-dynamic: fewer than DYNAMIC_FROM_ROWS rows are screened as by the int4
    head, more as by the int8-dynamic head, bit for bit; the leaders are the int8 weights'
    either way, and both copies are counted in the resident size."""
    torch.manual_seed(4)
    weight = torch.randn(4096, 128)
    both = Int8LMHead(weight, screen="int4+int8-dynamic")
    int4 = Int8LMHead(weight, screen="int4")
    dynamic = Int8LMHead(weight, screen="int8-dynamic")
    assert both.screen_kind == "int4+int8-dynamic"
    assert both.screen is not None and both.packed is not None
    assert both.packed_bytes == dynamic.packed_bytes
    x = torch.randn(DYNAMIC_FROM_ROWS + 2, 128) * 3
    few, many = x[: DYNAMIC_FROM_ROWS - 1], x
    assert torch.equal(both(few), int4(few)) and not torch.equal(both(few), dynamic(few))
    assert torch.equal(both(many), dynamic(many)) and not torch.equal(both(many), int4(many))
    deq = both.weight_int8.float() * both.scale_f32[:, None]
    for rows in (few, many):
        want = rows @ deq.t()
        out = both(rows)
        assert torch.equal(out.argmax(-1), want.argmax(-1))
        lead = want.topk(16, dim=-1)
        torch.testing.assert_close(out.gather(-1, lead.indices), lead.values, atol=1e-4, rtol=0)


def test_the_fast_path_holds_both_screens_where_vnni_makes_the_integer_one_quicker(
    monkeypatch,
):
    from server.engine import lm_head

    monkeypatch.setattr(lm_head, "fbgemm_available", lambda: True)
    monkeypatch.setattr(lm_head, "cpu_has_vnni", lambda: True)
    assert lm_head.auto_screen() == "int4+int8-dynamic"
    monkeypatch.setattr(lm_head, "cpu_has_vnni", lambda: False)  # 7-bit, not measured
    assert lm_head.auto_screen() == "int4"
    monkeypatch.setattr(lm_head, "cpu_has_vnni", lambda: True)
    monkeypatch.setattr(lm_head, "fbgemm_available", lambda: False)
    assert lm_head.auto_screen() == "int4"


@pytest.mark.skipif(not fbgemm_available(), reason="PyTorch built without FBGEMM")
def test_engine_with_the_int8_dynamic_screen_decodes_the_same_alone_and_batched(
    tiny_model_path,
):
    from server.config import Settings
    from server.engine.factory import build_engine

    engine = build_engine(
        Settings(base_model=str(tiny_model_path), quantization="nf4", lm_head="int8-dynamic")
    )
    head = engine.runner.model.lm_head
    assert isinstance(head, Int8LMHead) and head.screen_kind == "int8-dynamic"
    assert "FBGEMM" in engine.info.weights_format["output_layer"]
    asyncio.run(engine.start())
    try:
        prompts = ["Hello world, this is", "One base", "The quick brown fox jumps"]
        alone, together = greedy_alone_and_batched(engine, prompts)
        assert together == alone
    finally:
        asyncio.run(engine.shutdown())


def test_an_unknown_screen_is_refused():
    with pytest.raises(ValueError, match="screen"):
        Int8LMHead(torch.randn(64, 64), screen="int2")


def test_a_screen_is_skipped_where_the_kernel_cannot_take_the_table():
    head = Int8LMHead(torch.randn(100, 96), screen="int4")  # 96 % 64, 100 % 16
    assert head.screen is None
    assert head(torch.randn(2, 96)).shape == (2, 100)


def test_only_a_plain_linear_head_is_swapped():
    class WithBias(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = nn.Linear(8, 16, bias=True)

    model = WithBias()
    assert not use_int8_lm_head(model)
    assert isinstance(model.lm_head, nn.Linear)
    assert not use_int8_lm_head(nn.Module())


def test_engine_with_int8_head_decodes_the_same_alone_and_batched(tiny_model_path):
    from server.config import Settings
    from server.engine.factory import build_engine

    engine = build_engine(
        Settings(base_model=str(tiny_model_path), quantization="none", lm_head="int8")
    )
    assert isinstance(engine.runner.model.lm_head, Int8LMHead)
    asyncio.run(engine.start())
    try:
        prompts = ["Hello world, this is", "One base", "The quick brown fox jumps"]
        alone, together = greedy_alone_and_batched(engine, prompts)
        assert together == alone
        assert len(set(map(tuple, alone))) > 1  # prompts lead somewhere different
    finally:
        asyncio.run(engine.shutdown())


def test_auto_keeps_the_head_of_an_unquantized_model(tiny_model_path):
    from server.config import Settings
    from server.engine.factory import build_engine

    engine = build_engine(Settings(base_model=str(tiny_model_path), quantization="none"))
    assert isinstance(engine.runner.model.lm_head, nn.Linear)


def test_a_shared_table_serves_the_embedding_lookup(tmp_path):
    """With share_embedding, a tied embedding looks its rows up in the output layer's int8
    table (one table in memory), scaled as the model scales its embedding."""
    from server.engine.lm_head import Int8Embedding
    from tests.tiny_model import build_tiny_model
    from trainer.base_model import load_base_model

    path = build_tiny_model(tmp_path / "tied", tie_word_embeddings=True)  # Gemma: scaled
    model = load_base_model(path, quantization="none", device="cpu").model
    ids = torch.tensor([[1, 5, 17, 250, 399]])
    with torch.inference_mode():
        before = model.get_input_embeddings()(ids)
        assert use_int8_lm_head(model, share_embedding=True)
        embedding = model.get_input_embeddings()
        assert isinstance(embedding, Int8Embedding)
        assert embedding.weight_int8.data_ptr() == model.lm_head.weight_int8.data_ptr()
        after = embedding(ids)
    assert after.dtype == before.dtype
    assert ((after - before).norm() / before.norm()) < 0.02
