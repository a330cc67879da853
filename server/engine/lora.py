"""Many LoRA adapters on one base model, mixed per row in one forward.

Every base linear layer that some resident adapter targets is wrapped once. The adapters
resident on the compute device are packed side by side in each wrapped layer:
``a_cat`` (in, R) and ``b_cat`` (R, out), adapter k in columns [off_k, off_k + r_k) with
its scaling folded into B. A batch whose rows use different adapters then costs, per
layer, the same two small matmuls whatever the number of adapters:

    delta = ((x @ a_cat) * row_mask) @ b_cat

where ``row_mask`` keeps, for each row, only its own adapter's block (all zeros for a
base row). PEFT's mixed-batch forward instead loops over the distinct adapters of the
batch (select the rows, two matmuls, scatter back, for each), which on a CPU makes eight
adapters cost far more than one. A batch that uses a single adapter slices its block and
skips the mask. The layout (offsets) is the same in every layer, so one mask serves all.

Adapters may also carry trained token rows (PEFT's ``trainable_token_indices``): new
values for a few rows of the input embedding, such as a chat template's end-of-turn token
that a base model never learned to use. In a tied model the output layer uses the same
rows. They are applied per row of the batch too: a row's embedding of such a token, and
its logit for it, come from its own adapter's row; other rows see the base's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from server.engine.base import BASE_ADAPTER
from server.engine.peft_format import (
    lora_key_module,
    lora_scaling,
    token_key_module,
    trainable_token_ids,
)


@dataclass
class LoRAWeights:
    """One adapter as host tensors: module path -> (A (r, in), B * scaling (out, r))."""

    name: str
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    # module path (input embedding or output layer) -> (token ids (n,), their rows (n, dim))
    tokens: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        """Width of the adapter's block: its largest rank over modules (rank_pattern)."""
        return max(a.shape[0] for a, _ in self.modules.values())

    @property
    def nbytes(self) -> int:
        lora = sum(a.nbytes + b.nbytes for a, b in self.modules.values())
        return lora + sum(ids.nbytes + rows.nbytes for ids, rows in self.tokens.values())


def read_peft_lora(name: str, path: Path, dtype: torch.dtype = torch.float32) -> LoRAWeights:
    """Read a validated PEFT LoRA folder (safetensors only; nothing is unpickled)."""
    from safetensors.torch import load_file

    config: dict[str, Any] = json.loads((path / "adapter_config.json").read_text())
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    tokens = {}
    for key, tensor in load_file(str(path / "adapter_model.safetensors")).items():
        found = lora_key_module(key)
        if found is not None:
            module, which = found
            pairs.setdefault(module, {})[which] = tensor
        token_module = token_key_module(key)
        if token_module is not None:
            ids = torch.tensor(trainable_token_ids(config, token_module), dtype=torch.long)
            tokens[token_module] = (ids, tensor.to(dtype).contiguous())
    modules = {}
    for module, ab in pairs.items():
        a, b = ab["A"], ab["B"]
        scale = lora_scaling(config, module, int(a.shape[0]))
        modules[module] = (a.to(dtype).contiguous(), (b.float() * scale).to(dtype).contiguous())
    return LoRAWeights(name, modules, tokens)


@dataclass
class _Plan:
    """Which adapter block each row of the current forward uses."""

    single: tuple[int, int] | None  # (offset, rank) when every row uses one adapter
    single_name: str | None
    mask: torch.Tensor | None  # (batch, 1, R) otherwise
    # each row's adapter as its index in MultiLoRA.adapters (-1: the base), for token rows
    row_slots: torch.Tensor | None = None


class LoRALinear(nn.Module):
    """A base linear layer plus the packed LoRA blocks of every resident adapter."""

    def __init__(self, base: nn.Module, owner: MultiLoRA):
        super().__init__()
        self.base = base
        self.in_features = int(base.in_features)
        self.out_features = int(base.out_features)
        self._owner = [owner]  # a list, so the owner is not registered as a submodule
        self.targets: set[str] = set()  # adapters with weights for this layer
        self.a_cat: torch.Tensor | None = None
        self.b_cat: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        plan = self._owner[0].plan
        if plan is None or self.a_cat is None or self.b_cat is None:
            return out
        xa = x.to(self.a_cat.dtype)
        if plan.single is not None:
            if plan.single_name not in self.targets:
                return out
            off, rank = plan.single
            delta = (xa @ self.a_cat[:, off : off + rank]) @ self.b_cat[off : off + rank]
        else:
            assert plan.mask is not None
            delta = ((xa @ self.a_cat) * plan.mask) @ self.b_cat
        return out + delta.to(out.dtype)


class _TokenRows(nn.Module):
    """Base embedding or output layer plus the trained token rows of resident adapters.

    Packed like the LoRA blocks: ``ids`` (K,), ``slots`` (K,) the owning adapter's index,
    ``rows`` (K, dim). A row of the batch matches only its own adapter's entries, and an
    adapter lists a token once, so at most one entry applies to any (row, token)."""

    def __init__(self, base: nn.Module, owner: MultiLoRA, *, output: bool):
        super().__init__()
        self.base = base
        self.output = output
        self._owner = [owner]
        self.ids: torch.Tensor | None = None
        self.slots: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None
        # Gemma-style embeddings multiply the looked-up row by a constant
        scale = getattr(base, "embed_scale", None)
        self.embed_scale = float(scale) if scale is not None and not output else 1.0
        for attr in ("in_features", "out_features", "weight", "num_embeddings"):
            if hasattr(base, attr):  # what callers read off the layer it replaces
                setattr(self, attr, getattr(base, attr))

    def _active(self) -> torch.Tensor | None:
        plan = self._owner[0].plan
        if plan is None or plan.row_slots is None or self.slots is None:
            return None
        # (batch, K): row b uses the adapter that owns entry k
        return plan.row_slots[:, None] == self.slots[None, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        owns = self._active()
        if owns is None or not bool(owns.any()):
            return out
        assert self.ids is not None and self.rows is not None
        if self.output:
            return self._logits(x, out, owns)
        # input ids (batch, seq) -> which entry, if any, replaces each position's row
        hits = (x[..., None] == self.ids) & owns[:, None, :]  # (batch, seq, K)
        hit = hits.any(-1)
        if not bool(hit.any()):
            return out
        entry = hits.to(torch.float32).argmax(-1)
        new = (self.rows[entry] * self.embed_scale).to(out.dtype)
        return torch.where(hit[..., None], new, out)

    def _logits(self, x: torch.Tensor, out: torch.Tensor, owns: torch.Tensor) -> torch.Tensor:
        assert self.ids is not None and self.rows is not None
        new = x.to(self.rows.dtype) @ self.rows.t()  # (batch, seq, K)
        uniq, entry_to_uniq = torch.unique(self.ids, return_inverse=True)
        pick = torch.nn.functional.one_hot(entry_to_uniq, len(uniq)).to(new.dtype)  # (K, U)
        owned = owns.to(new.dtype)  # (batch, K)
        has = (owned @ pick) > 0  # (batch, U)
        values = (new * owned[:, None, :]) @ pick  # (batch, seq, U)
        out = out.clone()
        out[..., uniq] = torch.where(has[:, None, :], values.to(out.dtype), out[..., uniq])
        return out


class MultiLoRA:
    """The resident adapters of one model and the per-forward row plan."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype):
        self.model = model
        self.device = device
        self.dtype = dtype
        self.layers: dict[str, LoRALinear] = {}
        self.adapters: dict[str, LoRAWeights] = {}  # resident, in packing order
        self.offsets: dict[str, tuple[int, int]] = {}
        self.plan: _Plan | None = None
        self.token_layers: dict[str, _TokenRows] = {}
        self._token_sources: dict[str, str] = {}  # wrapped layer -> module whose rows it uses

    def __contains__(self, name: str) -> bool:
        return name in self.adapters

    def add(self, weights: LoRAWeights) -> None:
        for module in weights.modules:
            if module not in self.layers:
                self._wrap(module)
        for module in weights.tokens:
            self._wrap_tokens(module)
        self.adapters[weights.name] = weights
        self._pack()

    def remove(self, name: str) -> LoRAWeights | None:
        weights = self.adapters.pop(name, None)
        if weights is not None:
            self._pack()
        return weights

    def _wrap(self, module: str) -> None:
        parent_name, _, child = module.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        base = getattr(parent, child)
        if isinstance(base, LoRALinear):
            self.layers[module] = base
            return
        if not (hasattr(base, "in_features") and hasattr(base, "out_features")):
            raise ValueError(f"{module} is not a linear layer")
        wrapped = LoRALinear(base, self)
        setattr(parent, child, wrapped)
        self.layers[module] = wrapped

    def _wrap_tokens(self, module: str) -> None:
        """Wrap the input embedding holding ``module``'s rows, and in a tied model the
        output layer too (PEFT's rule: tied weights share the trained rows)."""
        model: Any = self.model  # a transformers model
        targets = {module: module}
        embedding = model.get_input_embeddings()
        held = model.get_submodule(module)
        if (held is embedding or held is getattr(embedding, "base", None)) and _tied(model):
            targets[_module_name(model, model.get_output_embeddings())] = module
        for target in targets:
            if target in self.token_layers:
                continue
            parent_name, _, child = target.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            base = getattr(parent, child)
            is_output = base is model.get_output_embeddings()
            wrapped = _TokenRows(base, self, output=is_output)
            setattr(parent, child, wrapped)
            self.token_layers[target] = wrapped
        self._token_sources.update(targets)

    def _pack_tokens(self) -> None:
        for target, layer in self.token_layers.items():
            source = self._token_sources[target]
            ids, slots, rows = [], [], []
            for slot, weights in enumerate(self.adapters.values()):
                entry = weights.tokens.get(source)
                if entry is not None:
                    ids.append(entry[0])
                    slots.append(torch.full_like(entry[0], slot))
                    rows.append(entry[1])
            if not ids:
                layer.ids = layer.slots = layer.rows = None
                continue
            layer.ids = torch.cat(ids).to(self.device)
            layer.slots = torch.cat(slots).to(self.device)
            layer.rows = torch.cat(rows).to(self.device, self.dtype)

    def _pack(self) -> None:
        """Lay every resident adapter's block side by side in every wrapped layer."""
        self._pack_tokens()
        self.offsets = {}
        total = 0
        for name, weights in self.adapters.items():
            self.offsets[name] = (total, weights.rank)
            total += weights.rank
        for module, layer in self.layers.items():
            if total == 0:  # no adapter left: wrapped layers pass the base through
                layer.a_cat = layer.b_cat = None
                layer.targets = set()
                continue
            a_cat = torch.zeros(layer.in_features, total, dtype=self.dtype)
            b_cat = torch.zeros(total, layer.out_features, dtype=self.dtype)
            targets = set()
            for name, weights in self.adapters.items():
                pair = weights.modules.get(module)
                if pair is None:
                    continue
                off = self.offsets[name][0]
                a, b = pair
                rank = a.shape[0]
                a_cat[:, off : off + rank] = a.t()
                b_cat[off : off + rank] = b.t()
                targets.add(name)
            layer.a_cat = a_cat.to(self.device)
            layer.b_cat = b_cat.to(self.device)
            layer.targets = targets

    def set_rows(self, adapters: list[str]) -> None:
        """Plan the next forward: row i uses adapters[i] (BASE_ADAPTER for none)."""
        used = set(adapters) - {BASE_ADAPTER}
        unknown = used - set(self.offsets)
        if unknown:
            raise KeyError(f"adapters not resident: {sorted(unknown)}")
        row_slots = None
        if used and any(self.adapters[name].tokens for name in used):
            order = {name: i for i, name in enumerate(self.adapters)}
            slots = [order.get(name, -1) for name in adapters]
            row_slots = torch.tensor(slots, dtype=torch.long, device=self.device)
        if not used:
            self.plan = None
        elif len(used) == 1 and BASE_ADAPTER not in adapters:
            (name,) = used
            self.plan = _Plan(
                single=self.offsets[name], single_name=name, mask=None, row_slots=row_slots
            )
        else:
            total = sum(rank for _, rank in self.offsets.values())
            mask = torch.zeros(len(adapters), 1, total, dtype=self.dtype)
            for row, name in enumerate(adapters):
                if name != BASE_ADAPTER:
                    off, rank = self.offsets[name]
                    mask[row, 0, off : off + rank] = 1
            self.plan = _Plan(
                single=None, single_name=None, mask=mask.to(self.device), row_slots=row_slots
            )

    def clear_rows(self) -> None:
        self.plan = None


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the base's linear layers compute in (4-bit layers say so themselves)."""
    for module in model.modules():
        dtype = getattr(module, "compute_dtype", None)
        if isinstance(dtype, torch.dtype):
            return dtype
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def _tied(model: nn.Module) -> bool:
    config: Any = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", False))


def _module_name(model: nn.Module, module: nn.Module | None) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise ValueError("module not found in the model")
