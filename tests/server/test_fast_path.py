"""The fast path (lean decoder over a preallocated KV cache) against the reference path
(the model's own forward over a growing cache), on the same weights.

Tolerances: float32 weights, logits within 1e-4 (absolute) of the reference at every step;
int4 weights (the same Int4Linear layers under both paths), within 1e-3 relative to the
largest logit. Greedy tokens equal for every step run here (20 decode steps).
"""

from __future__ import annotations

import pytest
import torch

from server.engine import vnni
from server.engine.base import BASE_ADAPTER
from server.engine.fast_runner import FastModelRunner
from server.engine.hf import use_fast_path
from server.engine.runner import ModelRunner
from server.engine.static_kv import StaticKV
from tests.support import load_causal_lm, read_adapter
from tests.tiny_model import build_lora_adapter, build_peft_adapter, build_tiny_model

END_OF_TURN, START_OF_TURN = 5, 4
PROMPTS = [
    [2, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60],
    [2, START_OF_TURN, 61, 62, END_OF_TURN],
    [2, 70, 71, 72, 73, 74, 75, 76, 77],
    [2, 80],
]
STEPS = 20


@pytest.fixture(scope="module", params=["untied", "tied", "llama"])
def setup(request, tmp_path_factory):
    """A tiny model (Gemma 3 untied or tied, or a tied Llama with two key heads) and three
    adapters (LoRA on all layers, on q only, token rows)."""
    root = tmp_path_factory.mktemp(f"fast-{request.param}")
    model_path = build_tiny_model(
        root / "model",
        tie_word_embeddings=request.param != "untied",
        arch="llama" if request.param == "llama" else "gemma",
    )
    adapters = {
        "all": build_lora_adapter(model_path, root / "all", r=4, seed=1),
        "q": build_lora_adapter(model_path, root / "q", r=2, seed=2, target_modules=["q_proj"]),
        "eot": build_lora_adapter(
            model_path, root / "eot", r=4, seed=3, trainable_token_indices=[END_OF_TURN]
        ),
    }
    return model_path, adapters


def _runner(kind, model, adapters):
    runner = kind(model, pad_token_id=0)
    for name, path in adapters.items():
        runner.adapters.add(read_adapter(name, path))
    return runner


def _generate(runner, prompts, rows, *, chunk, leave_at=None, forced=None):
    """Greedy decode; returns the logits of every step (prefill first). ``leave_at``:
    {step: row index} drops that row before that step. ``forced``: tokens to feed
    instead of the argmax (so both paths see the same inputs)."""
    group = runner.new_group(prompts, rows)
    while not group.finished:
        runner.prefill_chunk(group, chunk)
    batch, logits = runner.finish_prefill(group)
    out = [logits]
    alive = list(range(len(prompts)))
    for step in range(STEPS):
        tokens = logits.argmax(-1).tolist() if forced is None else [forced[step][i] for i in alive]
        if leave_at and step in leave_at:
            gone = alive.index(leave_at[step])
            keep = [i for i in range(len(alive)) if i != gone]
            batch.select(keep)
            alive = [alive[i] for i in keep]
            tokens = [tokens[i] for i in keep]
            rows = [rows[i] for i in keep]
        logits = runner.decode(batch, tokens, rows)
        out.append(logits)
    return out


@pytest.mark.parametrize("kernels", ["torch", "c"])
def test_fast_path_matches_reference_with_mixed_adapters_and_token_rows(setup, kernels):
    """kernels "c": the step's norms, activation and attention on the project's CPU kernels
    (server/engine/vnni.py), which otherwise serve only a model whose 4-bit layers are on
    them: here over float32 weights, so that nothing else differs."""
    if kernels == "c" and vnni.unavailable() is not None:
        pytest.skip(f"VNNI kernel out: {vnni.unavailable()}")
    model_path, adapters = setup
    rows = ["all", BASE_ADAPTER, "eot", "q"]
    ref = _generate(
        _runner(ModelRunner, load_causal_lm(model_path), adapters),
        PROMPTS,
        list(rows),
        chunk=8,
        leave_at={7: 1},
    )
    fast_runner = _runner(FastModelRunner, load_causal_lm(model_path), adapters)
    fast_runner.decoder.c_kernels = kernels == "c"
    fast = _generate(fast_runner, PROMPTS, list(rows), chunk=8, leave_at={7: 1})
    assert len(ref) == len(fast) == STEPS + 1
    for step, (a, b) in enumerate(zip(ref, fast, strict=True)):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0, msg=f"step {step}")
        assert torch.equal(a.argmax(-1), b.argmax(-1)), f"greedy token differs at step {step}"
    # the adapters do change outputs: the test could fail
    base_only = _generate(
        _runner(FastModelRunner, load_causal_lm(model_path), {}),
        PROMPTS,
        [BASE_ADAPTER] * 4,
        chunk=8,
    )
    assert not torch.allclose(base_only[0][0], fast[0][0], atol=1e-3)


@pytest.mark.parametrize("kernels", ["torch", "c"])
def test_batch_size_changes_every_step(setup, kernels):
    """Rows join and leave at every step; each row's logits stay those it has alone (with
    the step's norms, activation and attention on the CPU kernels too)."""
    if kernels == "c" and vnni.unavailable() is not None:
        pytest.skip(f"VNNI kernel out: {vnni.unavailable()}")
    model_path, adapters = setup
    runner = _runner(FastModelRunner, load_causal_lm(model_path), adapters)
    runner.decoder.c_kernels = kernels == "c"
    names = ["all", BASE_ADAPTER, "eot", "q"]
    alone = [_generate(runner, [p], [n], chunk=16) for p, n in zip(PROMPTS, names, strict=True)]
    # row i joins at step i (prefilled alone, then merged); row 0 leaves after step 5,
    # row 2 after step 9: the batch goes 1, 2, 3, 4, 3, 3, 2, ...
    batch = None
    members: list[int] = []  # prompt index of each batch row
    steps_done: dict[int, int] = {}
    pending: dict[int, list[int]] = {}
    leave = {5: 0, 9: 2}
    for step in range(14):
        if step < len(PROMPTS):
            group = runner.new_group([PROMPTS[step]], [names[step]])
            while not group.finished:
                runner.prefill_chunk(group, 16)
            joined, logits = runner.finish_prefill(group)
            torch.testing.assert_close(logits, alone[step][0], atol=1e-4, rtol=0)
            if batch is None:
                batch = joined
            else:
                batch.merge(joined)
            members.append(step)
            steps_done[step] = 0
            pending[step] = logits.argmax(-1).tolist()
        if step in leave:
            gone = members.index(leave[step])
            batch.select([i for i in range(len(members)) if i != gone])
            members.pop(gone)
        assert batch is not None
        tokens = [pending[m][0] for m in members]
        logits = runner.decode(batch, tokens, [names[m] for m in members])
        for row, m in enumerate(members):
            steps_done[m] += 1
            expected = alone[m][steps_done[m]][0]
            torch.testing.assert_close(logits[row], expected, atol=1e-4, rtol=0)
            pending[m] = [int(logits[row].argmax())]
    assert batch.batch_size == len(members) == 2


def test_static_kv_rows_keep_their_contents_when_others_leave_and_join():
    def filled(rows: int, lengths: list[int], start: float) -> StaticKV:
        kv = StaticKV.empty(2, 1, 4, rows, max(lengths), torch.float32, torch.device("cpu"))
        for store in (kv.keys, kv.values):
            for t in store:
                for r, n in enumerate(lengths):
                    t[r, :, :n] = start + r
        kv.lengths = list(lengths)
        return kv

    kv = filled(3, [5, 2, 7], 0.0)
    kv.merge(filled(2, [300, 1], 10.0))  # grows rows and capacity
    assert kv.lengths == [5, 2, 7, 300, 1]
    assert kv.capacity >= 301 and kv.row_capacity >= 5
    kv.select([0, 2, 3])
    assert kv.lengths == [5, 7, 300]
    for t in kv.keys + kv.values:
        assert torch.all(t[0, :, :5] == 0) and torch.all(t[1, :, :7] == 2)
        assert torch.all(t[2, :, :300] == 10)
    kv.select([2, 0])  # out of order
    assert kv.lengths == [300, 5]
    assert torch.all(kv.keys[1][0, :, :300] == 10) and torch.all(kv.values[0][1, :, :5] == 0)


def test_fast_path_setting(tiny_model_path):
    model = load_causal_lm(tiny_model_path)
    assert use_fast_path("auto", model, "cpu")
    assert not use_fast_path("off", model, "cpu")
    assert not use_fast_path("auto", model, "cuda")
    model.config.model_type = "somethingelse"
    assert not use_fast_path("auto", model, "cpu")
    with pytest.raises(ValueError, match="fast path"):
        use_fast_path("on", model, "cpu")


@pytest.mark.parametrize("arch", ["gemma", "llama"])
def test_int4_engine_on_the_tiny_model(tmp_path, arch):
    """nf4 on a CPU: linear layers in int4, the tied output layer in int8 (the embedding
    shares its table only where the table is most of the model: not in these tiny ones);
    the fast path decodes as the reference path on those same weights."""
    from server.config import Settings
    from server.engine.factory import build_engine
    from server.engine.int4 import Int4Linear
    from server.engine.lm_head import Int8Embedding, Int8LMHead

    path = build_tiny_model(tmp_path / "tied", tie_word_embeddings=True, arch=arch)
    engine = build_engine(Settings(base_model=str(path), quantization="nf4", device="cpu"))
    model = engine.runner.model
    info = engine.info
    assert info.quantization == "int4" and info.runner == "fast"
    assert info.weights_format["linear"].startswith("int4")
    linears = [m for m in model.modules() if isinstance(m, Int4Linear)]
    assert len(linears) == 2 * 7
    assert isinstance(model.lm_head, Int8LMHead)
    assert model.lm_head.screen_kind is not None  # logits screened on the fast path
    assert "screened" in info.weights_format["output_layer"]
    assert not isinstance(model.get_input_embeddings(), Int8Embedding)
    assert info.weights_format["embedding"] == "float32"
    # 4-bit layers, an 8-bit output table and its packed copy (the screen's), counted
    assert info.weights_bytes < 0.6 * info.fp32_bytes
    fast = _generate(engine.runner, PROMPTS, [BASE_ADAPTER] * 4, chunk=8)
    reference = ModelRunner(model, pad_token_id=0)
    forced = [x.argmax(-1).tolist() for x in fast]
    ref = _generate(reference, PROMPTS, [BASE_ADAPTER] * 4, chunk=8, forced=forced)
    for step, (a, b) in enumerate(zip(ref, fast, strict=True)):
        scale = a.abs().max()
        # each row's leaders are recomputed from the int8 rows: within 1e-3; the rest of
        # the vocabulary carries the 4-bit screen's values, and which candidate near the
        # 64th is recomputed can differ between two paths' hidden states: within its error
        lead = a.topk(16, dim=-1).indices
        assert (a - b).gather(-1, lead).abs().max() <= 1e-3 * scale, f"step {step}"
        assert (a - b).abs().max() <= 5e-2 * scale, f"step {step}"
        assert torch.equal(a.argmax(-1), b.argmax(-1)), f"greedy token differs at step {step}"


@pytest.mark.skipif(vnni.unavailable() is not None, reason=f"VNNI kernel out: {vnni.unavailable()}")
@pytest.mark.parametrize("arch", ["gemma", "llama"])
def test_whole_layers_on_the_kernel_are_the_kernels_called_one_by_one(tmp_path, arch, monkeypatch):
    """A decode step's layers as whole calls on the C kernel (vnni.decode_layers) give the
    same logits, bit for bit, as the same kernels called module by module, with mixed LoRA
    adapters (one on every layer, one on q only), token rows and base rows in the batch,
    rows leaving; layers an adapter kind wraps (IA3, resident but on no row here) run
    module by module, to the same result."""
    from peft import IA3Config, TaskType

    from server.config import Settings
    from server.engine.factory import build_engine

    path = build_tiny_model(tmp_path / "m", tie_word_embeddings=True, arch=arch)
    adapters = {
        "all": build_lora_adapter(path, tmp_path / "all", r=4, seed=1),
        "q": build_lora_adapter(path, tmp_path / "q", r=2, seed=2, target_modules=["q_proj"]),
        "eot": build_lora_adapter(
            path, tmp_path / "eot", r=4, seed=3, trainable_token_indices=[END_OF_TURN]
        ),
    }
    calls = []
    original = vnni.decode_layers

    def counted(kernels, *args, **kwargs):
        ran = original(kernels, *args, **kwargs)
        calls.extend(kernels[:ran])
        return ran

    monkeypatch.setattr(vnni, "decode_layers", counted)
    ia3 = build_peft_adapter(path, tmp_path / "ia3", IA3Config(task_type=TaskType.CAUSAL_LM))
    rows = ["all", BASE_ADAPTER, "eot", "q"]
    runs = {}
    for how in ("whole", "one by one", "ia3 resident"):
        engine = build_engine(Settings(base_model=str(path), quantization="nf4", device="cpu"))
        runner = engine.runner
        for name, adapter in adapters.items():
            runner.adapters.add(read_adapter(name, adapter))
        if how == "one by one":
            runner.decoder._layer_kernel = lambda i, layer: None
        if how == "ia3 resident":
            runner.adapters.add(read_adapter("ia3", ia3))
        runs[how] = _generate(runner, PROMPTS, list(rows), chunk=8, leave_at={7: 1})
        if how == "whole":
            assert len(calls) == STEPS * 2  # every layer of every step (two layers)
    assert len(calls) == STEPS * 2  # none with IA3's wrapped layers
    for step, (a, b, c) in enumerate(zip(*runs.values(), strict=True)):
        assert torch.equal(a, b), f"step {step}"
        assert torch.equal(b, c), f"step {step}"


def test_int4_layer_stays_close_to_its_float_weight():
    from server.engine.int4 import Int4Linear, dequantize_int4, quantize_int4

    torch.manual_seed(0)
    weight = torch.randn(96, 128) * 0.05
    x = torch.randn(5, 3, 128)
    layer = Int4Linear(weight, None, group_size=32)
    q, scales_and_zeros = quantize_int4(weight, 32)
    restored = dequantize_int4(q, scales_and_zeros)
    # 4 bits per weight: about 8% relative error on gaussian weights, never worse than
    # plain min/max rounding (the range search only keeps a better choice)
    assert (restored - weight).norm() / weight.norm() < 0.09
    out = layer(x)
    assert out.shape == (5, 3, 96) and out.dtype == torch.float32
    expected = x.to(torch.bfloat16).float() @ restored.t()
    assert (out - expected).norm() / expected.norm() < 1e-2
    with pytest.raises(ValueError, match="group size"):
        Int4Linear(torch.randn(96, 48), None, group_size=32)
