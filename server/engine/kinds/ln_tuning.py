"""LN tuning (peft_type ``LN_TUNING``): trained copies of the base's norm layers, per row.

PEFT's LN tuning deep-copies each target layer (the norms: Gemma's and Llama's have a
weight and no bias, so this is the BitFit-style method that applies to them) and trains the
copy; the file holds the copy's parameters under ``<module>.ln_tuning_layers.<param>``.

In a batch each wrapped layer runs once for every row, as the base; then, for each
distinct adapter among the rows, once more on its rows with that adapter's parameters
(``torch.func.functional_call``) and those rows' outputs are replaced. A norm costs a few
element-wise operations on a (rows, seq, hidden) tensor, so the loop over the distinct
adapters of a batch stays far below one matmul; in exchange any norm type works as PEFT's
copy does (RMSNorm, LayerNorm with a bias, Gemma's 1 + weight). PEFT lets LN tuning copy any
layer; a float one (not 4-bit) is served the same way, at one extra pass over its rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

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

_KEY = re.compile(r"^(?:base_model\.model\.)?(.*)\.ln_tuning_layers(?:\.[^.]+)?\.([^.]+)$")


def ln_key(key: str) -> tuple[str, str] | None:
    """'base_model.model.model.norm.ln_tuning_layers.weight' -> ('model.norm', 'weight')."""
    m = _KEY.match(key)
    return (m.group(1), m.group(2)) if m else None


class LNTuningKind:
    name = "ln_tuning"
    peft_type = "LN_TUNING"

    def validate(self, file: AdapterFile, base: BaseModelShape, limits: Limits) -> KindReport:
        if file.config.get("modules_to_save"):
            raise AdapterError(
                400,
                f"modules_to_save={file.config['modules_to_save']} replaces whole base layers, "
                "which cannot be mixed per row in a batch; retrain without modules_to_save",
                "unsupported_adapter",
            )
        found = {k: p for k in file.header if (p := ln_key(k)) is not None}
        if not found:
            raise AdapterError(
                400, f"{WEIGHTS_FILE} holds no LN tuning parameters", "invalid_weights"
            )
        missing = sorted({f"{m}.{p}" for m, p in found.values() if f"{m}.{p}" not in base.params})
        if missing:
            code = "no_matching_modules" if len(missing) == len(found) else "base_model_mismatch"
            raise AdapterError(
                400,
                f"LN tuning parameters for {len(missing)} tensors the base model does not have "
                f"(or holds quantized) (e.g. {', '.join(missing[:3])}): the adapter was made for "
                "another architecture",
                code,
            )
        parameters = 0
        per_module: dict[str, int] = {}
        for key, (module, param) in found.items():
            shape = file.shape(key)
            expected = list(base.params[f"{module}.{param}"])
            if shape != expected:
                raise AdapterError(
                    400,
                    f"{module}.{param}: LN tuning tensor of shape {shape}, the base's is "
                    f"{expected}: the adapter belongs to another base model",
                    "base_model_mismatch",
                )
            parameters += file.numel(key)
            per_module[module] = per_module.get(module, 0) + file.numel(key)
        return KindReport(target_modules=sorted(per_module), parameters=parameters, used=set(found))

    def read(self, name: str, path: Path, dtype: torch.dtype) -> NormWeights:
        from safetensors.torch import load_file

        modules: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in load_file(str(path / WEIGHTS_FILE)).items():
            found = ln_key(key)
            if found is not None:
                modules.setdefault(found[0], {})[found[1]] = tensor
        return NormWeights(name, modules)

    def rows(self, model: nn.Module, device: torch.device, dtype: torch.dtype) -> NormRows:
        return NormRows(model, device)


KIND = LNTuningKind()


@dataclass
class NormWeights:
    name: str
    modules: dict[str, dict[str, torch.Tensor]]  # module path -> parameter name -> tensor
    kind: str = "ln_tuning"

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for params in self.modules.values() for t in params.values())


class RowNorm(nn.Module):
    """A norm layer that each row may run with its own adapter's parameters."""

    def __init__(self, base: nn.Module, owner: NormRows):
        super().__init__()
        self.base = base
        self._owner = [owner]
        self.params: dict[str, dict[str, torch.Tensor]] = {}  # adapter -> its parameters
        # the base's own module, under any other kind's wrapper: the adapter's parameters
        # are named after it, and a row of this kind has no other kind's change to see
        self.own = _innermost(base)
        for attr in ("in_features", "out_features", "weight"):
            if hasattr(base, attr):  # what another kind's wrapper reads off the layer
                setattr(self, attr, getattr(base, attr))

    def _run(self, params: dict[str, torch.Tensor], x: torch.Tensor, args, kwargs):
        merged = {**dict(self.own.named_parameters()), **params}
        return torch.func.functional_call(self.own, merged, (x, *args), kwargs)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        owner = self._owner[0]
        groups = owner.groups
        if groups and owner.whole_batch:
            (name,) = groups
            params = self.params.get(name)
            if params is not None:  # every row runs this adapter: no base pass needed
                return self._run(params, x, args, kwargs)
        out = self.base(x, *args, **kwargs)
        if not groups:
            return out
        out = out.clone()
        for name, rows in groups.items():
            params = self.params.get(name)
            if params is None:
                continue
            own = self._run(params, x.index_select(0, rows), args, kwargs)
            out.index_copy_(0, rows, own.to(out.dtype))
        return out


def _innermost(module: nn.Module) -> nn.Module:
    while isinstance(getattr(module, "base", None), nn.Module):
        module = module.base  # type: ignore[assignment]
    return module


class NormRows:
    def __init__(self, model: nn.Module, device: torch.device):
        self.model = model
        self.device = device
        self.adapters: dict[str, NormWeights] = {}
        self.layers: dict[str, RowNorm] = {}
        self.groups: dict[str, torch.Tensor] = {}  # adapter -> its rows in this forward
        self.whole_batch = False  # one adapter holds every row

    def add(self, weights: NormWeights) -> None:
        placed = {}
        for module, params in weights.modules.items():
            layer = self.layers.get(module)
            if layer is None:
                parent_name, _, child = module.rpartition(".")
                parent = self.model.get_submodule(parent_name) if parent_name else self.model
                layer = RowNorm(getattr(parent, child), self)
                setattr(parent, child, layer)
                self.layers[module] = layer
            dtypes = {n: p.dtype for n, p in layer.own.named_parameters()}
            placed[module] = {
                n: t.to(self.device, dtypes.get(n, t.dtype)) for n, t in params.items()
            }
        for module, params in placed.items():
            self.layers[module].params[weights.name] = params
        self.adapters[weights.name] = weights

    def remove(self, name: str) -> None:
        if self.adapters.pop(name, None) is not None:
            for layer in self.layers.values():
                layer.params.pop(name, None)

    def plan(self, rows: list[str | None], input_start: int | None) -> None:
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(rows):
            if name is not None:
                if name not in self.adapters:
                    raise KeyError(f"adapters not resident: {name}")
                groups.setdefault(name, []).append(i)
        self.groups = {
            name: torch.tensor(idx, dtype=torch.long, device=self.device)
            for name, idx in groups.items()
        }
        self.whole_batch = len(groups) == 1 and None not in rows
