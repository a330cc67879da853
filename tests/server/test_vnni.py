"""The VNNI kernel (server/engine/vnni.py): its arithmetic, its layout, its fallbacks.

The kernel tests run where the CPU has AVX-512 VNNI and a C compiler builds it (this
project's machines: CI included); elsewhere they skip saying why, and the fallback tests
still run.
"""

from __future__ import annotations

import pytest
import torch

from server.engine import vnni
from server.engine.int4 import Int4Linear, dequantize_int4, quantize_int4
from server.engine.lm_head import Int8LMHead

needs_kernel = pytest.mark.skipif(
    vnni.unavailable() is not None, reason=f"VNNI kernel out: {vnni.unavailable()}"
)


def _random_int4(out_f: int, in_f: int, group: int, seed: int = 0):
    torch.manual_seed(seed)
    weight = torch.randn(out_f, in_f) * 0.05
    q, scales_and_zeros = quantize_int4(weight, group)
    return weight, q, scales_and_zeros


def _expected(x: torch.Tensor, packed: vnni.Packed, halves: int) -> torch.Tensor:
    """The kernel's arithmetic written out: each row's groups of inputs rounded to 8 bits of
    their largest magnitude (float32, half to even), and with two halves the remainder to
    8 more, then exact sums, in float64."""
    g = packed.group_size
    xs = x.float().reshape(len(x), -1, g)
    peak = xs.abs().amax(-1, keepdim=True)
    inv = torch.where(peak > 0, torch.tensor(127.0) / peak, torch.zeros_like(peak))
    scaled = xs * inv
    xq = torch.round(scaled).double()
    if halves == 2:
        xq = xq + torch.round((scaled - torch.round(scaled)) * 128).double() / 128
    dx = peak / 127.0
    restored = (xq * dx.double()).reshape(len(x), -1)
    return (restored @ vnni.dequantize(packed).double().t()).float()


@needs_kernel
@pytest.mark.parametrize(
    ("out_f", "in_f", "group"), [(16, 32, 32), (48, 96, 32), (64, 128, 64), (32, 256, 128)]
)
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 17])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("halves", [1, 2])
def test_kernel_computes_its_stated_arithmetic(out_f, in_f, group, rows, threads, halves):
    _, q, sz = _random_int4(out_f, in_f, group, seed=rows)
    packed = vnni.pack(q, sz, group)
    x = torch.randn(rows, in_f) * 3
    x[0, :group] = 0  # a group of zeros: scale 0, no division by it
    out = vnni.matmul(x, packed, halves=halves, threads=threads)
    assert out.shape == (rows, out_f) and out.dtype == torch.float32
    torch.testing.assert_close(out, _expected(x, packed, halves), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_two_halves_keep_the_activations_as_well_as_bfloat16_does_or_better():
    """One 8-bit half rounds a group's small inputs coarsely where one input is large (the
    outlier channels of a transformer's activations); two halves keep about 15 bits."""
    weight, q, sz = _random_int4(64, 256, 32)
    packed = vnni.pack(q, sz, 32)
    x = torch.randn(8, 256)
    x[:, 7] = 60.0  # an outlier channel
    exact = x.double() @ vnni.dequantize(packed).double().t()
    bf16 = x.to(torch.bfloat16).double() @ vnni.dequantize(packed).double().t()

    def err(y):
        return float((y.double() - exact).norm() / exact.norm())

    one, two = vnni.matmul(x, packed, halves=1), vnni.matmul(x, packed, halves=2)
    assert err(two) < err(bf16) < err(one)
    assert err(two) < 1e-3
    with pytest.raises(ValueError, match="halves"):
        vnni.matmul(x, packed, halves=3)


@needs_kernel
def test_a_rows_output_is_the_same_alone_and_in_any_batch():
    """Each row is quantized on its own scales and its sums are exact: batch-invariant, bit
    for bit, whatever the other rows hold (one 50x larger here) and however many there are."""
    _, q, sz = _random_int4(64, 128, 32)
    packed = vnni.pack(q, sz, 32)
    x = torch.randn(11, 128)
    x[4] *= 50
    for halves in (1, 2):
        together = vnni.matmul(x, packed, halves=halves)
        alone = torch.cat([vnni.matmul(x[i : i + 1], packed, halves=halves) for i in range(11)])
        assert torch.equal(together, alone)
        assert torch.equal(vnni.matmul(x[:9], packed, halves=halves), together[:9])


def test_packing_keeps_the_int4_weights():
    """The layout is a re-ordering of the int4 kernel's weights: scales exact, minimums
    within float16's rounding."""
    weight, q, sz = _random_int4(48, 96, 32)
    packed = vnni.pack(q, sz, 32)
    want = dequantize_int4(q, sz)
    torch.testing.assert_close(vnni.dequantize(packed), want, rtol=0, atol=1e-4)
    assert packed.nibbles.numel() == 48 * 96 // 2  # 4 bits a weight
    assert (vnni.dequantize(packed) - weight).norm() / weight.norm() < 0.09


def test_shapes_the_layout_cannot_take_are_refused():
    _, q, sz = _random_int4(24, 64, 32)
    with pytest.raises(ValueError, match="does not fit the VNNI kernel"):
        vnni.pack(q, sz, 32)
    assert not vnni.fits(64, 24, 32) and not vnni.fits(48, 32, 32) and vnni.fits(64, 32, 32)
    assert not vnni.fits(64, 32, 8)  # groups of whole 16-float vectors


@needs_kernel
def test_matmul_takes_any_float_input_and_refuses_a_wrong_width():
    _, q, sz = _random_int4(32, 64, 32)
    packed = vnni.pack(q, sz, 32)
    x = torch.randn(64, 5).t()  # not contiguous
    torch.testing.assert_close(vnni.matmul(x, packed), vnni.matmul(x.contiguous(), packed))
    half = vnni.matmul(x.to(torch.bfloat16), packed)
    assert half.dtype == torch.float32
    assert vnni.matmul(torch.empty(0, 64), packed).shape == (0, 32)
    with pytest.raises(ValueError, match="64"):
        vnni.matmul(torch.randn(3, 32), packed)


@needs_kernel
def test_int4_layer_on_either_kernel_stays_close_to_the_float_weight():
    torch.manual_seed(0)
    weight = torch.randn(96, 128) * 0.05
    bias = torch.randn(96)
    x = torch.randn(5, 3, 128)
    on_vnni = Int4Linear(weight, bias, group_size=32, kernel="vnni")
    on_torch = Int4Linear(weight, bias, group_size=32, kernel="torch")
    assert on_vnni.kernel == "vnni" and "kernel=vnni" in repr(on_vnni)
    ref = x @ weight.t() + bias
    a, b = on_vnni(x), on_torch(x)
    assert a.shape == b.shape == (5, 3, 96) and a.dtype == torch.float32
    # the same quantized weights; the activations in ~15 bits a group or in bfloat16
    assert (a - b).norm() / b.norm() < 0.01
    assert (a - ref).norm() / ref.norm() < 0.09
    # resident: 4 bits a weight plus a float16 scale and minimum a group, as the int4 layout
    vnni_bytes = sum(t.numel() * t.element_size() for t in on_vnni.buffers() if t is not bias)
    torch_bytes = sum(t.numel() * t.element_size() for t in on_torch.buffers())
    assert vnni_bytes == torch_bytes
    with pytest.raises(ValueError, match="kernel"):
        Int4Linear(weight, None, group_size=32, kernel="fast")


@needs_kernel
def test_the_output_layers_int4_screen_on_the_kernel_is_the_one_screen_and_batch_invariant():
    """Its choice and leaders are checked with the torch kernel's in test_lm_head.py."""
    torch.manual_seed(2)
    head = Int8LMHead(torch.randn(4096, 128), screen="int4", kernel="vnni")
    assert head.screen_kind == "int4" and head.screen_kernel == "vnni"
    assert head.screen is None and head.packed is None  # the one screen held
    x = torch.randn(12, 128)
    alone = torch.cat([head(x[i : i + 1]) for i in range(len(x))])
    assert torch.equal(alone, head(x))  # batch-invariant, tail included


def test_the_setting_resolves_to_a_kernel_that_runs(monkeypatch):
    assert vnni.resolve("torch") == "torch"
    with pytest.raises(ValueError, match="one of"):
        vnni.resolve("fastest")
    monkeypatch.setattr(vnni, "_load", lambda: (None, "the CPU lacks avx512_vnni"))
    assert vnni.resolve("auto") == "torch"
    with pytest.raises(ValueError, match="lacks avx512_vnni"):
        vnni.resolve("vnni")
    with pytest.raises(RuntimeError, match="lacks avx512_vnni"):
        vnni.matmul(torch.randn(1, 32), vnni.pack(*_random_int4(16, 32, 32)[1:], 32))


def test_a_failing_or_missing_compiler_is_said_not_crashed(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing built there yet
    monkeypatch.setattr(vnni, "cpu_flags", lambda: set(vnni.CPU_FLAGS))
    monkeypatch.setattr(vnni.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    vnni._load.cache_clear()
    try:
        monkeypatch.setenv("CC", "false")  # exists, fails
        assert "failed" in (vnni.unavailable() or "")
        vnni._load.cache_clear()
        monkeypatch.setenv("CC", "no-such-compiler")
        assert "no C compiler" in (vnni.unavailable() or "")
        assert not list(tmp_path.rglob("*.so"))  # no partial library left behind
    finally:
        vnni._load.cache_clear()
    monkeypatch.setattr(vnni, "cpu_flags", lambda: {"avx512f"})
    assert "avx512_vnni" in (vnni.unavailable() or "")
    vnni._load.cache_clear()
