"""A decode step's layers in one call on the CPU kernel (vnni.decode_layers), and the
revision number that tells the decoder when to look at the model's layers again
(server/engine/revision.py) instead of before every layer of every step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from server.engine import revision, vnni
from server.engine.base import BASE_ADAPTER
from server.engine.int4 import Int4Linear
from tests.support import read_adapter
from tests.tiny_model import build_lora_adapter, build_tiny_model

needs_kernel = pytest.mark.skipif(
    vnni.unavailable() is not None, reason=f"VNNI kernel out: {vnni.unavailable()}"
)
PROMPT = [2, 40, 41, 42, 43, 44, 45]


def _engine(path):
    from server.config import Settings
    from server.engine.factory import build_engine

    return build_engine(Settings(base_model=str(path), quantization="nf4", device="cpu"))


def test_revision_moves_on_what_the_kernel_reads_and_not_otherwise():
    layer = nn.Sequential(nn.Linear(4, 4))
    changes = {
        "a module assigned": lambda: setattr(layer, "0", nn.Linear(4, 4)),
        "a parameter assigned": lambda: setattr(layer[0], "bias", nn.Parameter(torch.ones(4))),
        "a buffer registered": lambda: layer[0].register_buffer("extra", torch.zeros(1)),
    }
    for what, change in changes.items():
        before = revision.current()
        change()
        assert revision.current() != before, what
    int4 = Int4Linear(torch.randn(32, 64), None, group_size=32)
    before = revision.current()
    int4.group_note = "anything"  # not read by the kernel
    assert revision.current() == before
    int4.vnni = None  # read by kernel_parts: the layer would leave the kernel
    assert revision.current() != before
    assert int4.kernel_parts() is None


@needs_kernel
def test_decode_layers_equals_the_layers_one_by_one_and_stops_when_paused(tmp_path):
    engine = _engine(build_tiny_model(tmp_path / "m", tie_word_embeddings=True))
    runner, decoder = engine.runner, engine.runner.decoder
    group = runner.new_group([PROMPT, PROMPT[:3]], [BASE_ADAPTER] * 2)
    while not group.finished:
        runner.prefill_chunk(group, 8)
    cache, _ = runner.finish_prefill(group)
    cache.ensure_step()
    positions = cache.positions(torch.device("cpu")).view(-1)
    tables = {
        k: (c.view(2, -1), s.view(2, -1))
        for k, (c, s) in decoder._cos_sin(positions.view(-1, 1)).items()
    }
    kernels = [k for k, _ in decoder._step_kernels()]
    layers = len(kernels)
    assert layers == 2 and all(k is not None for k in kernels)
    cos = [tables[kind][0] for kind in decoder.layer_types]
    sin = [tables[kind][1] for kind in decoder.layer_types]
    h0 = torch.randn(2, kernels[0].spec.hidden)

    def caches():
        return [k.clone() for k in cache.keys], [v.clone() for v in cache.values]

    def one_by_one(count):
        h, keys, values = h0.clone(), *caches()
        for i in range(count):
            kernels[i](h, None, keys[i], values[i], positions, cos[i], sin[i])
        return h, keys, values

    h, keys, values = h0.clone(), *caches()
    ran = vnni.decode_layers(kernels, h, [None] * layers, keys, values, positions, cos, sin)
    want_h, want_keys, want_values = one_by_one(layers)
    assert ran == layers
    assert torch.equal(h, want_h)
    assert all(
        torch.equal(a, b) for a, b in zip(keys + values, want_keys + want_values, strict=True)
    )

    pause = vnni.Pause()
    pause.set()  # a request came in: the call ends after the layer under way
    h, keys, values = h0.clone(), *caches()
    ran = vnni.decode_layers(kernels, h, [None] * layers, keys, values, positions, cos, sin, pause)
    want_h, want_keys, _ = one_by_one(1)
    assert ran == 1
    assert torch.equal(h, want_h)
    assert torch.equal(keys[0], want_keys[0])
    assert torch.equal(keys[1], cache.keys[1])  # the second layer's cache: not written
    # ... and the caller resumes with the rest
    pause.clear()
    ran = vnni.decode_layers(
        kernels[1:], h, [None], keys[1:], values[1:], positions, cos[1:], sin[1:], pause
    )
    assert ran == 1 and torch.equal(h, one_by_one(layers)[0])


@needs_kernel
def test_decode_layers_refuses_what_does_not_fit_and_writes_nothing(tmp_path):
    engine = _engine(build_tiny_model(tmp_path / "m", tie_word_embeddings=True, arch="llama"))
    decoder = engine.runner.decoder
    kernels = [k for k, _ in decoder._step_kernels()]
    kv, dim = decoder.num_kv_heads, decoder.head_dim
    keys = [torch.zeros(2, kv, 8, dim) for _ in kernels]
    values = [torch.zeros(2, kv, 8, dim) for _ in kernels]
    positions = torch.tensor([0, 3])
    cos, sin = [torch.ones(2, dim)] * 2, [torch.zeros(2, dim)] * 2
    h = torch.randn(2, kernels[0].spec.hidden)
    before = h.clone()
    slots = [None, None]
    bad = {
        "one cache too few": lambda: vnni.decode_layers(
            kernels, h, slots, keys[:1], values, positions, cos, sin
        ),
        "h in float64": lambda: vnni.decode_layers(
            kernels, h.double(), slots, keys, values, positions, cos, sin
        ),
        "h not contiguous": lambda: vnni.decode_layers(
            kernels, h.t().contiguous().t(), slots, keys, values, positions, cos, sin
        ),
        "the second layer's cache narrower": lambda: vnni.decode_layers(
            kernels, h, slots, [keys[0], torch.zeros(2, kv, 4, dim)], values, positions, cos, sin
        ),
        "positions in int32": lambda: vnni.decode_layers(
            kernels, h, slots, keys, values, positions.int(), cos, sin
        ),
        "slots in int64": lambda: vnni.decode_layers(
            kernels, h, [torch.zeros(2, dtype=torch.long)] * 2, keys, values, positions, cos, sin
        ),
        "a position past the cache": lambda: vnni.decode_layers(
            kernels, h, slots, keys, values, torch.tensor([0, 8]), cos, sin
        ),
    }
    for what, call in bad.items():
        with pytest.raises(ValueError):
            call()
        assert torch.equal(h, before), what
        assert not any(t.any() for t in keys + values), what


@needs_kernel
def test_whole_layers_follow_adapters_that_come_and_go(tmp_path):
    """The decoder keeps its layers' kernels between steps: an adapter unloaded and another
    loaded under its name (LoRA blocks packed again), rows with and without adapters from
    step to step, all decode as a fresh engine does with those adapters, bit for bit."""
    path = build_tiny_model(tmp_path / "m", tie_word_embeddings=True)
    first = build_lora_adapter(path, tmp_path / "first", r=4, seed=1)
    second = build_lora_adapter(path, tmp_path / "second", r=4, seed=2)
    q_only = build_lora_adapter(path, tmp_path / "q", r=2, seed=3, target_modules=["q_proj"])

    def steps(runner, rows, count=4):
        group = runner.new_group([PROMPT] * len(rows), rows)
        while not group.finished:
            runner.prefill_chunk(group, 8)
        batch, logits = runner.finish_prefill(group)
        out = []
        for _ in range(count):
            logits = runner.decode(batch, logits.argmax(-1).tolist(), rows)
            out.append(logits)
        return out

    def fresh(adapters, rows):
        runner = _engine(path).runner
        for name, adapter in adapters.items():
            runner.adapters.add(read_adapter(name, adapter))
        return steps(runner, rows)

    kept = _engine(path).runner
    kept.adapters.add(read_adapter("a", first))
    for rows in (["a", BASE_ADAPTER], [BASE_ADAPTER], ["a"]):
        got = steps(kept, rows)
        want = fresh({"a": first}, rows)
        assert all(torch.equal(x, y) for x, y in zip(got, want, strict=True)), rows
    seen = kept.decoder._kernels_revision
    kept.adapters.remove("a")
    kept.adapters.add(read_adapter("a", second))  # the same name, other weights
    kept.adapters.add(read_adapter("q", q_only))
    assert revision.current() != seen
    for rows in (["a", "q"], ["q", BASE_ADAPTER], ["a"]):
        got = steps(kept, rows)
        want = fresh({"a": second, "q": q_only}, rows)
        assert all(torch.equal(x, y) for x, y in zip(got, want, strict=True)), rows
    assert kept.decoder._kernels_revision != seen
