"""IA3 (peft_type ``IA3``): learned vectors that rescale a linear layer, per row.

PEFT's IA3 keeps one vector ``ia3_l`` per target layer. For a feed-forward layer (listed
in ``feedforward_modules``) it is shaped (1, in) and scales the layer's input; for any
other it is shaped (out, 1) and scales the output. The shape says which, so the loader
does not depend on the config's module lists.

In a batch every wrapped layer holds two tables, ``in_scale`` (slots + 1, in) and
``out_scale`` (slots + 1, out), whose row 0 is all ones (rows of the base or of another
kind) and row k + 1 is resident adapter k's vector (ones where it has none). A forward
gathers each batch row's vector and multiplies: one element-wise product per table
whatever the number of adapters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from server.engine.kinds.base import (
    WEIGHTS_FILE,
    AdapterError,
    AdapterFile,
    BaseModelShape,
    KindReport,
    Limits,
)

_KEY = re.compile(r"^(?:base_model\.model\.)?(.*)\.ia3_l(?:\.[^.]+)?$")


def ia3_key_module(key: str) -> str | None:
    m = _KEY.match(key)
    return m.group(1) if m else None


class IA3Kind:
    name = "ia3"
    peft_type = "IA3"

    def validate(self, file: AdapterFile, base: BaseModelShape, limits: Limits) -> KindReport:
        if file.config.get("modules_to_save"):
            raise AdapterError(
                400,
                f"modules_to_save={file.config['modules_to_save']} replaces whole base layers, "
                "which cannot be mixed per row in a batch; retrain without modules_to_save",
                "unsupported_adapter",
            )
        found = {k: m for k in file.header if (m := ia3_key_module(k)) is not None}
        if not found:
            raise AdapterError(400, f"{WEIGHTS_FILE} holds no IA3 vectors", "invalid_weights")
        missing = sorted(m for m in found.values() if m not in base.linear)
        if missing:
            code = "no_matching_modules" if len(missing) == len(found) else "base_model_mismatch"
            raise AdapterError(
                400,
                f"IA3 vectors for {len(missing)} modules the base model does not have as linear "
                f"layers (e.g. {', '.join(missing[:3])}): the adapter was made for another "
                "architecture",
                code,
            )
        parameters = 0
        for key, module in found.items():
            in_f, out_f = base.linear[module]
            shape = file.shape(key)
            if shape not in ([1, in_f], [out_f, 1]):
                raise AdapterError(
                    400,
                    f"{module}: IA3 vector of shape {shape} fits neither the layer's input "
                    f"[1, {in_f}] nor its output [{out_f}, 1]: the adapter belongs to another "
                    "base model",
                    "base_model_mismatch",
                )
            parameters += file.numel(key)
        return KindReport(
            target_modules=sorted(found.values()), parameters=parameters, used=set(found)
        )

    def read(self, name: str, path: Path, dtype: torch.dtype) -> IA3Weights:
        from safetensors.torch import load_file

        inputs: dict[str, torch.Tensor] = {}
        outputs: dict[str, torch.Tensor] = {}
        for key, tensor in load_file(str(path / WEIGHTS_FILE)).items():
            module = ia3_key_module(key)
            if module is None:
                continue
            # (1, in) scales the input (a feed-forward layer), (out, 1) the output
            side = inputs if tensor.shape[0] == 1 and tensor.shape[-1] != 1 else outputs
            side[module] = tensor.flatten().float()
        return IA3Weights(name, inputs, outputs)

    def rows(self, model: nn.Module, device: torch.device, dtype: torch.dtype) -> IA3Rows:
        return IA3Rows(model, device)


KIND = IA3Kind()


@dataclass
class IA3Weights:
    name: str
    inputs: dict[str, torch.Tensor]  # feed-forward layers: scales their input (in,)
    outputs: dict[str, torch.Tensor]  # other layers: scales their output (out,)
    kind: str = "ia3"

    @property
    def nbytes(self) -> int:
        vectors = list(self.inputs.values()) + list(self.outputs.values())
        return sum(v.nbytes for v in vectors)


class IA3Linear(nn.Module):
    """A linear layer whose input and/or output each row's IA3 vector rescales."""

    def __init__(self, base: Any, owner: IA3Rows):
        super().__init__()
        self.base = base
        self.in_features = int(base.in_features)
        self.out_features = int(base.out_features)
        self._owner = [owner]
        self.in_scale: torch.Tensor | None = None  # (slots + 1, in), row 0 all ones
        self.out_scale: torch.Tensor | None = None  # (slots + 1, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slots = self._owner[0].row_slots
        if slots is None:
            return self.base(x)
        if self.in_scale is not None:
            # PEFT scales in the vector's dtype (float32), then casts back
            scale = self.in_scale[slots].unsqueeze(1)  # (batch, 1, in)
            x = (x.to(scale.dtype) * scale).to(x.dtype)
        out = self.base(x)
        if self.out_scale is not None:
            scale = self.out_scale[slots].unsqueeze(1)  # (batch, 1, out)
            out = (out * scale).to(out.dtype)
        return out


class IA3Rows:
    def __init__(self, model: nn.Module, device: torch.device):
        self.model = model
        self.device = device
        self.adapters: dict[str, IA3Weights] = {}
        self.layers: dict[str, IA3Linear] = {}
        self.row_slots: torch.Tensor | None = None  # (batch,) 0 = unscaled, k + 1 = adapter k

    def add(self, weights: IA3Weights) -> None:
        for module in list(weights.inputs) + list(weights.outputs):
            if module not in self.layers:
                parent_name, _, child = module.rpartition(".")
                parent = self.model.get_submodule(parent_name) if parent_name else self.model
                wrapped = IA3Linear(getattr(parent, child), self)
                setattr(parent, child, wrapped)
                self.layers[module] = wrapped
        self.adapters[weights.name] = weights
        self._pack()

    def remove(self, name: str) -> None:
        if self.adapters.pop(name, None) is not None:
            self._pack()

    def _pack(self) -> None:
        slots = len(self.adapters) + 1
        for module, layer in self.layers.items():
            tables: dict[str, torch.Tensor | None] = {}
            for side, width in (("inputs", layer.in_features), ("outputs", layer.out_features)):
                if not any(module in getattr(w, side) for w in self.adapters.values()):
                    tables[side] = None
                    continue
                table = torch.ones(slots, width, dtype=torch.float32)
                for k, weights in enumerate(self.adapters.values()):
                    vector = getattr(weights, side).get(module)
                    if vector is not None:
                        table[k + 1] = vector
                tables[side] = table.to(self.device)
            layer.in_scale, layer.out_scale = tables["inputs"], tables["outputs"]

    def plan(self, rows: list[str | None], input_start: int | None) -> None:
        if not any(name is not None for name in rows):
            self.row_slots = None
            return
        order = {name: k + 1 for k, name in enumerate(self.adapters)}
        unknown = {n for n in rows if n is not None and n not in order}
        if unknown:
            raise KeyError(f"adapters not resident: {sorted(unknown)}")
        slots = [order[name] if name is not None else 0 for name in rows]
        self.row_slots = torch.tensor(slots, dtype=torch.long, device=self.device)
