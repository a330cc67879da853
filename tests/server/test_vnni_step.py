"""The rest of a decode step on the project's CPU kernels (server/engine/vnni.py): RMS norm
with a residual, the MLP's activation times its up projection, and a decode step's
attention (norms of q and k, rotary embedding, cache writes, grouped-query attention with
and without a sliding window), each against torch's own operators."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from server.engine import vnni

pytestmark = pytest.mark.skipif(
    vnni.unavailable() is not None, reason=f"VNNI kernel out: {vnni.unavailable()}"
)


@pytest.mark.parametrize("dim", [16, 40, 256, 640])
def test_rms_norm_is_torchs_arithmetic(dim):
    torch.manual_seed(dim)
    x = torch.randn(3, 5, dim) * 4
    x[0, 0] = 0  # a row of zeros: eps keeps it finite
    weight = torch.randn(dim)
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
    got = vnni.rms_norm(x, weight, 1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vnni.rms_norm(x.transpose(0, 1), weight, 1e-6), want.transpose(0, 1))
    with pytest.raises(ValueError, match="float32"):
        vnni.rms_norm(x.double(), weight, 1e-6)
    with pytest.raises(ValueError, match="float32"):
        vnni.rms_norm(x, weight[:-1], 1e-6)


def test_rms_norm_adds_the_residual_in_the_same_call():
    torch.manual_seed(0)
    x, residual, weight = torch.randn(3, 2, 40), torch.randn(3, 2, 40), torch.randn(40)
    want = residual + x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
    torch.testing.assert_close(vnni.rms_norm(x, weight, 1e-6, residual), want)
    with pytest.raises(ValueError, match="residual"):
        vnni.rms_norm(x, weight, 1e-6, residual[:, :1])


@pytest.mark.parametrize("name", ["GELUTanh", "SiLU"])
@pytest.mark.parametrize("n", [1, 37, 2048 * 3])
def test_activation_times_up_is_torchs(name, n):
    torch.manual_seed(n)
    gate = torch.randn(n) * 4
    gate[:4] = torch.tensor([0.0, 1e-4, -30.0, 30.0])[: min(4, n)]
    if n > 8:
        gate[4:8] = torch.tensor([-100.0, 100.0, 1e-30, -1e-3])
    up = torch.randn(n)
    act = (lambda g: F.gelu(g, approximate="tanh")) if name == "GELUTanh" else F.silu
    got = vnni.act_mul(gate, up, name)
    torch.testing.assert_close(got, act(gate) * up, rtol=2e-6, atol=1e-6)
    with pytest.raises(ValueError):
        vnni.act_mul(gate, up[:-1] if n > 1 else up.double(), name)


def _reference(q, k, v, keys, values, positions, cos, sin, q_norm, k_norm, eps, window, scale):
    """The same step in torch operators, on copies of the cache."""
    keys, values = keys.clone(), values.clone()
    n = q.shape[0]
    kv_heads, dim = keys.shape[1], keys.shape[3]
    heads = q.shape[1] // dim
    qh, kh, vh = q.view(n, heads, dim), k.view(n, kv_heads, dim), v.view(n, kv_heads, dim)

    def norm(x, w):
        if w is None:
            return x
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def rope(x):
        return x * cos[:, None] + x.roll(dim // 2, dims=-1) * sin[:, None]

    qh, kh = rope(norm(qh, q_norm)), rope(norm(kh, k_norm))
    out = torch.empty(n, heads, dim)
    for r in range(n):
        p = int(positions[r])
        keys[r, :, p], values[r, :, p] = kh[r], vh[r]
        first = max(0, p - window + 1) if window else 0
        for head in range(heads):
            h = head // (heads // kv_heads)
            scores = (keys[r, h, first : p + 1] @ qh[r, head]) * scale
            out[r, head] = torch.softmax(scores, -1) @ values[r, h, first : p + 1]
    return out.reshape(n, heads * dim), keys, values


@pytest.mark.parametrize(
    "heads,kv_heads,dim,window,norms",
    [(4, 1, 256, None, True), (4, 2, 32, 5, False), (2, 2, 24, 1, True), (6, 3, 64, 300, True)],
)
def test_decode_attention_is_torchs(heads, kv_heads, dim, window, norms):
    torch.manual_seed(heads * dim)
    n, rows, capacity = 3, 5, 40
    q, k, v = (
        torch.randn(n, heads * dim),
        torch.randn(n, kv_heads * dim),
        torch.randn(n, kv_heads * dim),
    )
    keys, values = (
        torch.randn(rows, kv_heads, capacity, dim),
        torch.randn(rows, kv_heads, capacity, dim),
    )
    positions = torch.tensor([0, 17, capacity - 1])
    angles = positions[:, None].float() * torch.rand(dim // 2) + 0.3
    emb = torch.cat((angles, angles), -1)
    cos, sin = emb.cos() * 1.1, emb.sin() * 1.1
    sin[:, : dim // 2] *= -1
    q_norm = torch.randn(dim) if norms else None
    k_norm = torch.randn(dim) if norms else None
    scale = 1 / math.sqrt(dim)
    want, want_keys, want_values = _reference(
        q, k, v, keys, values, positions, cos, sin, q_norm, k_norm, 1e-6, window, scale
    )
    untouched = keys[3:].clone()
    got = vnni.attend_decode(
        q,
        k,
        v,
        keys,
        values,
        positions,
        cos,
        sin,
        q_norm=q_norm,
        k_norm=k_norm,
        eps=1e-6,
        window=window,
        scale=scale,
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(keys, want_keys, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values, want_values)
    assert torch.equal(keys[3:], untouched)  # rows past n are not touched


def test_decode_attention_refuses_what_does_not_fit_and_writes_nothing():
    n, heads, dim, capacity = 2, 2, 16, 8
    q, k, v = torch.randn(n, heads * dim), torch.randn(n, dim), torch.randn(n, dim)
    keys, values = torch.zeros(n, 1, capacity, dim), torch.zeros(n, 1, capacity, dim)
    cos, sin = torch.ones(n, dim), torch.zeros(n, dim)
    common = dict(q_norm=None, k_norm=None, eps=1e-6, window=None, scale=0.25)
    with pytest.raises(ValueError, match="refused"):  # a position past the cache
        vnni.attend_decode(q, k, v, keys, values, torch.tensor([0, capacity]), cos, sin, **common)
    with pytest.raises(ValueError, match="do not fit"):
        vnni.attend_decode(
            q, k, v, keys, values, torch.tensor([0, 1], dtype=torch.int32), cos, sin, **common
        )
    with pytest.raises(ValueError, match="do not fit"):
        vnni.attend_decode(q, k[:, :8], v, keys, values, torch.tensor([0, 1]), cos, sin, **common)
    assert not keys.any() and not values.any()
