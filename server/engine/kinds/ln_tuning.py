"""LN tuning (peft_type ``LN_TUNING``): trained copies of the base's norm layers, per row.

PEFT's LN tuning deep-copies each target layer (the norms: Gemma's and Llama's have a
weight and no bias, so this is the BitFit-style method that applies to them) and trains the
copy; the file holds the copy's parameters under ``<module>.ln_tuning_layers.<param>``.

In a batch each wrapped layer runs once for every row, as the base; then, for each
distinct adapter among the rows, once more on its rows with that adapter's parameters
(``torch.func.functional_call``) and those rows' outputs are replaced. A norm costs a few
element-wise operations on a (rows, seq, hidden) tensor, so the loop over the distinct
adapters of a batch stays far below one matmul; in exchange any norm type works as PEFT's
copy does (RMSNorm, LayerNorm with a bias, Gemma's 1 + weight).
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
# anything bigger than this per module is not a norm: a whole layer per row is not served
MAX_PARAMS_PER_MODULE = 1 << 16


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
        big = sorted(m for m, n in per_module.items() if n > MAX_PARAMS_PER_MODULE)
        if big:
            raise AdapterError(
                400,
                f"LN tuning copies of {', '.join(big[:3])} hold more than "
                f"{MAX_PARAMS_PER_MODULE} numbers each: whole layers, not norms, which are not "
                "served per row; tune the norm layers only",
                "unsupported_adapter",
            )
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

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        groups = self._owner[0].groups
        if groups and len(groups) == 1 and self._owner[0].whole_batch:
            (name,) = groups
            params = self.params.get(name)
            if params is not None:  # every row runs this adapter: no base pass needed
                return torch.func.functional_call(
                    self.base, {**dict(self.base.named_parameters()), **params}, (x, *args), kwargs
                )
        out = self.base(x, *args, **kwargs)
        if not groups:
            return out
        out = out.clone()
        base_params = dict(self.base.named_parameters())
        for name, rows in groups.items():
            params = self.params.get(name)
            if params is None:
                continue
            own = torch.func.functional_call(
                self.base, {**base_params, **params}, (x.index_select(0, rows), *args), kwargs
            )
            out.index_copy_(0, rows, own.to(out.dtype))
        return out


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
            dtypes = {n: p.dtype for n, p in layer.base.named_parameters()}
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
