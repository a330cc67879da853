"""The resident adapters of one model, of every kind, and the plan of each forward.

Each row of a forward names one adapter (BASE_ADAPTER for none). Every kind that has a
resident adapter keeps one rows object (server/engine/kinds/<kind>.py) that wrapped the
layers it needs once; before a forward each of them learns which rows are its own, and
during the forward applies only to those. A row therefore carries its own adapter of
whatever kind, and rows of one kind never see another kind's change: the wrappers nest
freely (an IA3 vector and a LoRA block on the same layer touch different rows).

Two kinds also change a row's sequence: prompt tuning and p-tuning put virtual tokens in
front of the prompt (``virtual_tokens``), prefix tuning puts keys and values in front of
it in every layer's cache (``prefix_tokens``, ``prefix_cache``). The runner asks for both
when it starts a prompt; decoding then needs nothing more, the cache holds them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from server.engine.base import BASE_ADAPTER
from server.engine.kinds import BY_NAME
from server.engine.kinds.base import KindRows
from server.engine.kinds.prefix_tuning import PrefixRows
from server.engine.kinds.prompt_tuning import VirtualTokenRows


class MultiAdapter:
    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype):
        self.model = model
        self.device = device
        self.dtype = dtype  # adapter blocks compute in it (adapter_dtype)
        self.adapters: dict[str, Any] = {}  # name -> weights (kind, nbytes, ...)
        self.rows: dict[str, KindRows] = {}  # rows_key -> the kind's rows object
        self._rows_of: dict[str, str] = {}  # adapter name -> rows_key
        self._planned = False

    def __contains__(self, name: str) -> bool:
        return name in self.adapters

    def add(self, weights: Any) -> None:
        kind = BY_NAME[weights.kind]
        key = getattr(kind, "rows_key", kind.name)
        rows = self.rows.get(key)
        if rows is None:
            rows = kind.rows(self.model, self.device, self.dtype)
        rows.add(weights)  # may refuse (e.g. a restated layer that differs): nothing changed
        self.rows[key] = rows
        self.adapters[weights.name] = weights
        self._rows_of[weights.name] = key

    def remove(self, name: str) -> Any | None:
        weights = self.adapters.pop(name, None)
        if weights is not None:
            self.rows[self._rows_of.pop(name)].remove(name)
        return weights

    # --- what a row's sequence looks like --------------------------------------------------

    def virtual_tokens(self, name: str) -> int:
        """Placeholder ids to put in front of the prompt (prompt tuning, p-tuning)."""
        rows = self.rows.get("virtual_tokens")
        return rows.virtual_tokens(name) if isinstance(rows, VirtualTokenRows) else 0

    def prefix_tokens(self, name: str) -> int:
        """Cache columns in front of the prompt that hold a KV prefix (prefix tuning)."""
        rows = self.rows.get("prefix_tuning")
        return rows.prefix_tokens(name) if isinstance(rows, PrefixRows) else 0

    def context_tokens(self, name: str) -> int:
        """Positions of the context the adapter takes before the prompt."""
        return self.virtual_tokens(name) + self.prefix_tokens(name)

    def prefix_cache(
        self, adapters: list[str], width: int, dtype: torch.dtype
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values), each (batch, kv heads, width, head_dim): every row's
        prefix right-aligned in ``width`` columns, zeros for rows without one."""
        rows = self.rows["prefix_tuning"]
        assert isinstance(rows, PrefixRows)
        own = [name if rows.prefix_tokens(name) else None for name in adapters]
        return rows.cache_columns(own, width, dtype)

    # --- the plan of one forward -------------------------------------------------------------

    def set_rows(self, adapters: list[str], input_start: int | None = None) -> None:
        """Plan the next forward: row i uses adapters[i] (BASE_ADAPTER for none).
        ``input_start`` is the prompt position of the first input column during a prefill
        (None while decoding)."""
        unknown = {a for a in adapters if a != BASE_ADAPTER and a not in self.adapters}
        if unknown:
            raise KeyError(f"adapters not resident: {sorted(unknown)}")
        for key, rows in self.rows.items():
            mine = [a if self._rows_of.get(a) == key else None for a in adapters]
            rows.plan(mine, input_start)
        self._planned = True

    def clear_rows(self) -> None:
        if self._planned:
            for rows in self.rows.values():
                rows.plan([], None)
            self._planned = False


def adapter_dtype(model: nn.Module, device: torch.device) -> torch.dtype:
    """The dtype adapter blocks compute in. On a GPU, the base's compute dtype. On a CPU,
    float32: adapter matmuls are small (rank x width), and a CPU multiplies bfloat16 by
    conversion or emulation; with LoRA blocks in bfloat16 a decode step of 8 LoRA rows on
    the bundled NF4 model cost about twice the base's, in float32 about the same
    (loadtests/bench_kinds.py, e). The delta is cast to the layer's dtype when added."""
    if device.type == "cpu":
        return torch.float32
    return compute_dtype(model)


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
