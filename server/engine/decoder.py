"""A lean forward pass over a transformers decoder, for the engine's fast path.

A transformers model's forward is written for every use at once: it builds attention
masks through several layers of helpers, updates a generic cache object, and dispatches
attention through a registry, on every call. In a decode step of a small model on a CPU
that bookkeeping costs as much as the arithmetic. This module runs the same layers with
only what a step needs:

- the model's own modules are called for embeddings, linear layers and MLPs, so the
  engine's LoRA layers (and any other per-row adapter layer wrapped around them) apply
  exactly as in the reference path;
- stock RMS norms run as one fused ``rms_norm`` (a wrapped norm is called as a module);
- on a model whose 4-bit layers are on the project's CPU kernel (server/engine/vnni.py),
  norms, a stock gated MLP's activation and a decode step's attention run on its kernels,
  one call each;
- keys and values go straight into a preallocated cache (server/engine/static_kv.py),
  each row at its own position, with no padding columns: the mask is causal (and the
  sliding window where a layer has one), nothing else;
- grouped-query attention needs no copy of the keys: the query heads that share a key
  head are laid out as extra query positions of that head.

Supported families: Gemma 3 text models and Llama-style models (``supported`` says why
not otherwise); anything else runs on the reference path (server/engine/runner.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from server.engine import revision, vnni
from server.engine.static_kv import StaticKV

# model_type -> whether it has Gemma's four norms per layer (else Llama's two)
_FAMILIES = {"gemma3_text": True, "llama": False}
# norms whose weight is used as (1 + w), the rest as w
_ONE_PLUS_NORMS = {"Gemma3RMSNorm"}
_PLAIN_NORMS = {"LlamaRMSNorm"}
_STATIC_ROPE = {"default", "linear", "llama3"}
# MLPs computing down(act(gate(x)) * up(x))
_GATED_MLPS = {"Gemma3MLP", "LlamaMLP"}


def supported(model: nn.Module) -> str | None:
    """None when the fast path can run this model, else the reason it cannot."""
    config: Any = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _FAMILIES:
        return f"model type {model_type!r} (fast path: {', '.join(sorted(_FAMILIES))})"
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return "attention logit soft-capping"
    if getattr(config, "use_bidirectional_attention", False):
        return "bidirectional attention"
    rope = getattr(config, "rope_parameters", None) or {}
    params = rope.values() if all(isinstance(v, dict) for v in rope.values()) else [rope]
    for p in params:
        kind = (p or {}).get("rope_type", "default")
        if kind not in _STATIC_ROPE:
            return f"rope type {kind!r}"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "no model.layers / model.rotary_emb"
    return None


@dataclass
class _Rope:
    inv_freq: torch.Tensor  # (head_dim / 2,)
    scaling: float


class FastDecoder:
    """The model's layers, run by hand over a StaticKV."""

    def __init__(self, model: nn.Module):
        reason = supported(model)
        if reason is not None:
            raise ValueError(f"the fast path does not support this model: {reason}")
        self.model: Any = model
        config: Any = model.config
        self.gemma = _FAMILIES[config.model_type]
        self.num_layers = int(config.num_hidden_layers)
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(
            getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        )
        self.groups = self.num_heads // self.num_kv_heads
        self.final_softcap = getattr(config, "final_logit_softcapping", None)
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * self.num_layers
        self.layer_types: list[str] = list(layer_types)
        window = getattr(config, "sliding_window", None)
        self.windows: list[int | None] = [
            int(window) if t == "sliding_attention" and window else None for t in self.layer_types
        ]
        rotary = model.model.rotary_emb
        self.ropes: dict[str, _Rope] = {}
        for kind in set(self.layer_types):
            inv = getattr(rotary, f"{kind}_inv_freq", None)
            if inv is None:
                inv = rotary.inv_freq
                scaling = getattr(rotary, "attention_scaling", 1.0)
            else:
                scaling = getattr(rotary, f"{kind}_attention_scaling", 1.0)
            self.ropes[kind] = _Rope(inv.detach().float().clone(), float(scaling))
        self.scalings = [float(layer.self_attn.scaling) for layer in model.model.layers]
        self._norm_weights: dict[int, tuple[torch.Tensor, float]] = {}
        # on the VNNI kernel's model, the project's other CPU kernels too: norms, the MLP's
        # activation and a decode step's attention, one call each where torch takes several
        # operators (five for a norm, some forty for attention)
        self.c_kernels = vnni.serves(model)
        # per layer: (the parts it was built from, its DecodeLayer or None where it cannot run)
        self._layer_kernels: dict[int, tuple[tuple[Any, ...], vnni.DecodeLayer | None]] = {}
        # what _step_kernels found at the model's last revision (server/engine/revision.py):
        # per layer, the modules whose row plan changes by forward, and per pattern of
        # those plans (which apply now) the layer's kernel
        self._kernels_revision = -1
        self._plan_probes: list[list[Any]] = []
        self._kernels_by_plan: list[dict[tuple[bool, ...], vnni.DecodeLayer | None]] = []
        # set by another thread (a request came in): a decode step's run of whole layers
        # on the kernel stops after the layer under way and calls between_layers
        self.pause = vnni.Pause()

    # --- building blocks ---------------------------------------------------------------

    def new_cache(self, rows: int, capacity: int, dtype: torch.dtype, device: torch.device):
        return StaticKV.empty(
            self.num_layers, self.num_kv_heads, self.head_dim, rows, capacity, dtype, device
        )

    def _norm_params(self, module: nn.Module) -> tuple[torch.Tensor, float] | None:
        """A stock RMS norm's float32 weight (as used: 1 + w for Gemma's) and epsilon; None
        for a wrapped or unknown norm (it runs as its own module)."""
        key = id(module)
        if key not in self._norm_weights:
            kind = type(module).__name__
            if kind not in _ONE_PLUS_NORMS and kind not in _PLAIN_NORMS:
                return None  # not cached: a wrapper may come and go with adapters
            weight = module.weight.detach().float()
            if kind in _ONE_PLUS_NORMS:
                weight = 1.0 + weight
            eps = float(getattr(module, "eps", getattr(module, "variance_epsilon", 1e-6)))
            self._norm_weights[key] = (weight.contiguous(), eps)
        return self._norm_weights[key]

    def _norm(
        self, module: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """module(x), plus ``residual`` where given."""
        params = self._norm_params(module)
        if params is None:
            out = module(x)
            return out if residual is None else residual + out
        weight, eps = params
        if self.c_kernels and x.dtype == torch.float32:
            return vnni.rms_norm(x, weight, eps, residual)
        # the model's own arithmetic, in float32, in the fewest operators
        x32 = x if x.dtype == torch.float32 else x.float()
        out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True).add_(eps)) * weight
        out = out if x.dtype == torch.float32 else out.to(x.dtype)
        return out if residual is None else residual + out

    @staticmethod
    def _kernel_activation(mlp: Any) -> str | None:
        """A stock gated MLP's activation, by the name the CPU kernel knows it by; None for
        any other MLP or activation (the MLP then runs as its own module)."""
        name = type(getattr(mlp, "act_fn", None)).__name__
        if type(mlp).__name__ not in _GATED_MLPS or name not in vnni.ACTIVATIONS:
            return None
        return name

    def _mlp(self, mlp: Any, x: torch.Tensor) -> torch.Tensor:
        """The MLP; a stock gated one with its activation and product in one kernel call."""
        activation = self._kernel_activation(mlp) if self.c_kernels else None
        if activation is None:
            return mlp(x)
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        if gate.dtype != torch.float32 or up.dtype != torch.float32:
            return mlp.down_proj(mlp.act_fn(gate) * up)
        return mlp.down_proj(vnni.act_mul(gate, up, activation))

    def _qk_norms(self, attn: Any) -> tuple[torch.Tensor | None, torch.Tensor | None, float] | None:
        """Gemma's q and k norms as the CPU kernel takes them (weights and their one
        epsilon); (None, None, 0) for a family without them; None where either is wrapped
        or their epsilons differ (attention then runs in torch operators)."""
        if not self.gemma:
            return None, None, 0.0
        q_params = self._norm_params(attn.q_norm)
        k_params = self._norm_params(attn.k_norm)
        if q_params is None or k_params is None or q_params[1] != k_params[1]:
            return None
        return q_params[0], k_params[0], q_params[1]

    def _cos_sin(self, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """positions (n, T) -> per layer type, cos and signed sin of shape
        (n, T, 1, head_dim). The sine's first half carries the minus sign of
        rotate_half, so that rotating x is x * cos + roll(x, head_dim / 2) * sin."""
        out = {}
        half = self.head_dim // 2
        for kind, rope in self.ropes.items():
            freqs = positions.float()[..., None] * rope.inv_freq  # (n, T, head_dim / 2)
            emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
            sin = emb.sin() * rope.scaling
            sin[..., :half] *= -1
            out[kind] = (emb.cos() * rope.scaling, sin)
        return out

    def _masks(self, positions: torch.Tensor, kv_len: int) -> dict[int | None, torch.Tensor]:
        """(n, 1, T, kv_len) bool, True where a query may attend: causal, and within the
        sliding window for layers that have one. Keys past a row's own position are never
        read, so rows of different lengths need no padding mask."""
        cols = torch.arange(kv_len, device=positions.device)
        pos = positions[:, None, :, None]  # (n, 1, T, 1)
        causal = cols <= pos
        masks: dict[int | None, torch.Tensor] = {None: causal}
        for window in set(self.windows):
            if window is not None:
                masks[window] = causal & (cols > pos - window)
        return masks

    # --- attention ---------------------------------------------------------------------------

    def _attend_decode(
        self,
        i: int,
        attn: nn.Module,
        x: torch.Tensor,
        cache: StaticKV,
        positions: torch.Tensor,
        cos_sin: dict[str, tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor | None:
        """Layer i's attention in a decode step on the CPU kernel (vnni.attend_decode): the
        norms of q and k, rotary embedding, cache writes and attention in one call. None
        where it does not apply (a wrapped q or k norm): _attend runs then."""
        qk = self._qk_norms(attn)
        if qk is None:
            return None
        q_norm, k_norm, eps = qk
        n = x.shape[0]
        q = attn.q_proj(x).reshape(n, -1)
        k = attn.k_proj(x).reshape(n, -1)
        v = attn.v_proj(x).reshape(n, -1)
        cos, sin = cos_sin[self.layer_types[i]]
        out = vnni.attend_decode(
            q.float().contiguous(),
            k.float().contiguous(),
            v.float().contiguous(),
            cache.keys[i],
            cache.values[i],
            positions,
            cos,
            sin,
            q_norm=q_norm,
            k_norm=k_norm,
            eps=eps,
            window=self.windows[i],
            scale=self.scalings[i],
        )
        return out.view(n, 1, -1)

    @staticmethod
    def _projections(layer: Any) -> tuple[Any, ...]:
        """q, k, v, o, gate, up, down (None where the MLP has no such module)."""
        attn, mlp = layer.self_attn, layer.mlp
        return (
            attn.q_proj,
            attn.k_proj,
            attn.v_proj,
            attn.o_proj,
            getattr(mlp, "gate_proj", None),
            getattr(mlp, "up_proj", None),
            getattr(mlp, "down_proj", None),
        )

    def _step_kernels(self) -> list[tuple[vnni.DecodeLayer, torch.Tensor | None] | None]:
        """Each layer's whole-layer kernel and its rows' slots for this step; None for a
        layer that runs module by module. The full look (_layer_kernel) runs once per
        revision of the model (server/engine/revision.py) and pattern of which of a
        layer's modules apply a row plan now; a step in between asks only for the
        modules' plans (``kernel_plan``: the slots, or None)."""
        layers = self.model.model.layers
        now = revision.current()
        if now != self._kernels_revision:
            self._kernels_revision = now
            self._plan_probes = [
                [m for m in self._projections(layer) if hasattr(m, "kernel_plan")]
                for layer in layers
            ]
            self._kernels_by_plan = [{} for _ in layers]
        out: list[tuple[vnni.DecodeLayer, torch.Tensor | None] | None] = []
        for i, layer in enumerate(layers):
            plans = [m.kernel_plan() for m in self._plan_probes[i]]
            pattern = tuple(p is not None for p in plans)
            known = self._kernels_by_plan[i]
            if pattern not in known:
                fused = self._layer_kernel(i, layer)
                known[pattern] = fused[0] if fused is not None else None
            kernel = known[pattern]
            # a layer on the kernel has one plan (_layer_kernel refuses two): its slots
            out.append(
                None
                if kernel is None
                else (kernel, next((p for p in plans if p is not None), None))
            )
        return out

    def _layer_kernel(
        self, i: int, layer: nn.Module
    ) -> tuple[vnni.DecodeLayer, torch.Tensor | None] | None:
        """Layer i of a decode step as one call on the CPU kernel, and the rows' LoRA slots:
        where every projection is a 4-bit layer on the kernel (with 8-bit LoRA blocks or
        none), the norms stock and the MLP a stock gated one. None otherwise (an adapter
        kind that wraps a layer, a wrapped norm): the layer runs module by module. Built
        once per set of weights (adapters loading or leaving repack the LoRA blocks)."""
        attn, mlp = layer.self_attn, layer.mlp
        parts = []
        for module in self._projections(layer):
            parts_of = getattr(module, "kernel_parts", None)
            part = parts_of() if parts_of is not None else None
            if part is None:
                return None
            parts.append(part)
        slots = [s for _, _, s in parts if s is not None]
        if any(s is not slots[0] for s in slots):
            return None
        norms = [layer.input_layernorm, layer.post_attention_layernorm]
        if self.gemma:
            norms += [layer.pre_feedforward_layernorm, layer.post_feedforward_layernorm]
            norms += [attn.q_norm, attn.k_norm]  # in the key: a wrapper may replace them
        key = (*(p for p, _, _ in parts), *(lo for _, lo, _ in parts), *norms, mlp)
        cached = self._layer_kernels.get(i)
        if (
            cached is None
            or len(cached[0]) != len(key)
            or any(a is not b for a, b in zip(cached[0], key, strict=True))
        ):
            cached = (key, self._build_layer_kernel(i, layer, parts, norms))
            self._layer_kernels[i] = cached
        kernel = cached[1]
        return None if kernel is None else (kernel, slots[0] if slots else None)

    def _build_layer_kernel(
        self, i: int, layer: Any, parts: list[Any], norms: list[nn.Module]
    ) -> vnni.DecodeLayer | None:
        """norms: the layer's own (two for Llama, four for Gemma), then Gemma's q and k."""
        activation = self._kernel_activation(layer.mlp)
        qk = self._qk_norms(layer.self_attn)
        layer_norms = norms[: 4 if self.gemma else 2]
        params = [self._norm_params(norm) for norm in layer_norms]
        if activation is None or qk is None or any(p is None for p in params):
            return None
        epsilons = {p[1] for p in params if p is not None}
        if len(epsilons) != 1 or len({p.group_size for p, _, _ in parts}) != 1:
            return None
        weights: list[torch.Tensor | None] = [p[0] for p in params if p is not None]
        q_norm, k_norm, qk_eps = qk
        return vnni.DecodeLayer(
            vnni.LayerParts(
                projections=[p for p, _, _ in parts],
                loras=[lo for _, lo, _ in parts],
                norms=weights if self.gemma else [*weights, None, None],
                eps=epsilons.pop(),
                q_norm=q_norm,
                k_norm=k_norm,
                qk_eps=qk_eps,
                heads=self.num_heads,
                kv_heads=self.num_kv_heads,
                head_dim=self.head_dim,
                window=self.windows[i],
                scale=self.scalings[i],
                activation=activation,
            )
        )

    def _attend(
        self,
        i: int,
        attn: nn.Module,
        x: torch.Tensor,
        cache: StaticKV,
        positions: torch.Tensor,
        rows: torch.Tensor,
        cos_sin: dict[str, tuple[torch.Tensor, torch.Tensor]],
        masks: dict[int | None, torch.Tensor],
    ) -> torch.Tensor:
        """Layer i's attention for x (n, T, hidden) in torch operators: writes the keys and
        values of the T positions into the cache, returns (n, T, heads * head_dim)."""
        n, t = x.shape[:2]
        decode = t == 1
        q = attn.q_proj(x).view(n, t, self.num_heads, self.head_dim)
        k = attn.k_proj(x).view(n, t, self.num_kv_heads, self.head_dim)
        v = attn.v_proj(x).view(n, t, self.num_kv_heads, self.head_dim)
        if self.gemma:
            q = self._norm(attn.q_norm, q)
            k = self._norm(attn.k_norm, k)
        cos, sin = cos_sin[self.layer_types[i]]
        half = self.head_dim // 2
        q = q * cos + q.roll(half, dims=-1) * sin
        k = k * cos + k.roll(half, dims=-1) * sin
        keys, values = cache.keys[i], cache.values[i]  # (rows, kv_heads, capacity, dim)
        if k.dtype != keys.dtype:
            q, k, v = q.to(keys.dtype), k.to(keys.dtype), v.to(keys.dtype)
        # each row's keys at its own positions: (n, T, kv_heads, dim) in place
        keys[rows, :, positions] = k
        values[rows, :, positions] = v
        if decode:
            # (n, kv_heads, groups, dim): the query heads of one key head as its rows
            query = q.view(n, self.num_kv_heads, self.groups, self.head_dim)
        else:
            query = (
                q.view(n, t, self.num_kv_heads, self.groups, self.head_dim)
                .permute(0, 2, 3, 1, 4)
                .reshape(n, self.num_kv_heads, self.groups * t, self.head_dim)
            )
        kv_len = masks[None].shape[-1]
        mask = masks[self.windows[i]]  # (n, 1, T, kv_len)
        if not decode and self.groups > 1:
            mask = mask.repeat(1, 1, self.groups, 1)
        out = F.scaled_dot_product_attention(
            query,
            keys[:n, :, :kv_len],
            values[:n, :, :kv_len],
            attn_mask=mask,
            scale=self.scalings[i],
        )  # (n, kv_heads, groups * T, dim)
        return (
            out.view(n, self.num_kv_heads, self.groups, t, self.head_dim)
            .permute(0, 3, 1, 2, 4)
            .reshape(n, t, self.num_heads * self.head_dim)
        )

    # --- the forward ---------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: StaticKV,
        *,
        keep: torch.Tensor | None = None,
        between_layers: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """Run ``input_ids`` (n, T) at ``positions`` (n, T) for cache rows 0..n-1.

        Writes their keys and values at those positions, attends over each row's cache
        up to its own position, and returns logits (n, len(keep), vocab) for the columns
        in ``keep`` (all columns when None). A row's cache column is its position.

        ``between_layers``, in a decode forward (T == 1), is called between layers: a
        newcomer's prefill may run there rather than wait for the whole step. After each
        layer that runs module by module; where layers run as whole calls on the CPU
        kernel, one call takes all of them (no Python, so no GIL, between them) and stops
        after the layer under way when ``pause`` is set (the runner's ``interrupt_decode``:
        a request came in), and the callback runs there. This forward keeps nothing but its
        own tensors across the call.
        """
        model = self.model
        n, t = input_ids.shape
        h = model.get_input_embeddings()(input_ids)  # (n, T, hidden)
        dtype = h.dtype
        kv_len = int(positions.max()) + 1
        decode = t == 1
        cos_sin = self._cos_sin(positions)
        masks: dict[int | None, torch.Tensor] = {}
        rows = torch.arange(n, device=h.device).unsqueeze(1)  # (n, 1)
        # a decode step's attention in one kernel call per layer (where it runs)
        c_attention = decode and self.c_kernels and cache.keys[0].dtype == torch.float32
        flat_cos_sin = {}  # (n, head_dim) each
        if c_attention:
            flat_cos_sin = {k: (c.view(n, -1), s.view(n, -1)) for k, (c, s) in cos_sin.items()}
        flat_positions = positions.view(-1)
        if c_attention and h.dtype == torch.float32:
            h = h.reshape(n, -1).clone()  # our own: whole layers on the kernel update it in place
        layers = model.model.layers
        fused: list[tuple[vnni.DecodeLayer, torch.Tensor | None] | None] = [None] * len(layers)
        if c_attention and h.dtype == torch.float32:
            fused = self._step_kernels()
        i = 0
        while i < len(layers):
            if fused[i] is not None:
                # this layer and the whole-layer ones after it, in one call
                h = h.reshape(n, -1)
                if not h.is_contiguous():
                    h = h.contiguous()
                end = i + 1
                while end < len(layers) and fused[end] is not None:
                    end += 1
                run = [f for f in fused[i:end] if f is not None]
                tables = [flat_cos_sin[kind] for kind in self.layer_types[i:end]]
                ran = vnni.decode_layers(
                    [kernel for kernel, _ in run],
                    h,
                    [slots for _, slots in run],
                    cache.keys[i:end],
                    cache.values[i:end],
                    flat_positions,
                    [cos for cos, _ in tables],
                    [sin for _, sin in tables],
                    pause=self.pause if between_layers is not None else None,
                )
                i += ran
                if between_layers is not None and self.pause.is_set():
                    self.pause.clear()  # before the call: a request coming during it sets it again
                    between_layers()
                    fused = self._step_kernels()  # a forward there planned other rows
                continue
            layer = layers[i]
            attn = layer.self_attn
            h = h.view(n, t, -1)
            residual = h
            x = self._norm(layer.input_layernorm, h)
            out = None
            if c_attention:
                out = self._attend_decode(i, attn, x, cache, flat_positions, flat_cos_sin)
            if out is None:
                masks = masks or self._masks(positions, kv_len)
                out = self._attend(i, attn, x, cache, positions, rows, cos_sin, masks)
            if out.dtype != dtype:
                out = out.to(dtype)
            out = attn.o_proj(out)
            if self.gemma:
                h = self._norm(layer.post_attention_layernorm, out, residual=residual)
                x = self._mlp(layer.mlp, self._norm(layer.pre_feedforward_layernorm, h))
                h = self._norm(layer.post_feedforward_layernorm, x, residual=h)
            else:
                h = residual + out
                h = h + self._mlp(layer.mlp, self._norm(layer.post_attention_layernorm, h))
            i += 1
            if decode and between_layers is not None:
                between_layers()
        h = self._norm(model.model.norm, h.view(n, t, -1))
        if keep is not None:
            h = h[:, keep]
        logits = model.get_output_embeddings()(h)
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits
