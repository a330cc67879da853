"""LoRA (peft_type ``LORA``): many adapters on one base model, mixed per row in one forward.

Every base linear layer that some resident adapter targets is wrapped once. The adapters
resident on the compute device are packed side by side in each wrapped layer:
``a_cat`` (in, R) and ``b_cat`` (R, out), adapter k in columns [off_k, off_k + r_k) with
its scaling folded into B. A batch whose rows use different adapters then costs, per
layer, the same two small matmuls whatever the number of adapters:

    delta = ((x @ a_cat) * row_mask) @ b_cat

where ``row_mask`` keeps, for each row, only its own adapter's block (all zeros for a row
of another adapter or of the base). PEFT's mixed-batch forward instead loops over the
distinct adapters of the batch (select the rows, two matmuls, scatter back, for each),
which on a CPU makes eight adapters cost far more than one. A batch that uses a single
adapter slices its block and skips the mask. The layout (offsets) is the same in every
layer, so one mask serves all.

LoRA on an embedding layer (PEFT's ``lora_embedding_A``/``lora_embedding_B``) is packed
the same way, with A looked up by token id instead of multiplied. Trained token rows
(``trainable_token_indices``) ride along (server/engine/kinds/trainable_tokens.py).

A file may also restate a base layer whole (PEFT's ``save_embedding_layers``, on by
default when an embedding or the output layer is a target): such a tensor is applied by
being the base's own value, which the loader checks; one that differs is refused.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from server.engine import revision, vnni
from server.engine.kinds.base import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterError,
    AdapterFile,
    BaseModelShape,
    KindReport,
    Limits,
)
from server.engine.kinds.trainable_tokens import (
    TokenRows,
    check_token_rows,
    read_token_rows,
    tied,
)

# 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' (PEFT >= 0.3; an adapter
# name such as '.default' may sit before '.weight'), and LoRA on an embedding layer:
# '...embed_tokens.lora_embedding_A' (PEFT saves that one as a bare parameter)
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(.*)\."
    r"(?:lora_(?P<lin>[AB])(?:\.[^.]+)?\.weight|lora_embedding_(?P<emb>[AB])(?:\.[^.]+)?)$"
)
# a whole base layer written beside the LoRA tensors (save_embedding_layers)
_LAYER_KEY = re.compile(r"^(?:base_model\.model\.)?(.*?)(?:\.base_layer)?\.weight$")


def lora_key_module(key: str) -> tuple[str, str] | None:
    """'base_model.model.model.layers.0.q_proj.lora_A.weight' -> ('model.layers.0.q_proj', 'A');
    an embedding's 'lora_embedding_B' -> (module, 'embB')."""
    m = _KEY.match(key)
    if not m:
        return None
    if m.group("lin"):
        return m.group(1), m.group("lin")
    return m.group(1), "emb" + m.group("emb")


def _pattern_value(patterns: dict[str, Any], module: str) -> Any | None:
    """PEFT's rank_pattern / alpha_pattern: a key matches a module path or its suffix."""
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", module):
            return value
    return None


def lora_scaling(config: dict[str, Any], module: str, rank: int) -> float:
    """The factor PEFT multiplies lora_B(lora_A(x)) by for ``module`` (rank = its r)."""
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module)
    if alpha is None:
        alpha = config.get("lora_alpha", rank)
    if config.get("use_rslora"):
        return float(alpha) / math.sqrt(rank)
    return float(alpha) / rank


# --- validation: file inspection against the base's shapes ---------------------------------


def _refuse_config(config: dict[str, Any]) -> None:
    """LoRA variants whose forward is not two matmuls per row: refused with the reason."""
    if config.get("use_dora"):
        raise AdapterError(
            400,
            "DoRA adapters cannot join a mixed-adapter batch (PEFT refuses adapter_names with "
            "DoRA) and swapserve does not fall back silently: merge the DoRA weights into a "
            "plain LoRA or retrain with use_dora=false",
            "unsupported_adapter",
        )
    if config.get("modules_to_save"):
        raise AdapterError(
            400,
            f"modules_to_save={config['modules_to_save']} replaces whole base layers, which "
            "cannot be mixed per row in a batch; retrain without modules_to_save (to train a few "
            "token rows, such as a chat template's end-of-turn token, PEFT's "
            "trainable_token_indices is served)",
            "unsupported_adapter",
        )
    if config.get("lora_bias"):
        raise AdapterError(
            400,
            "lora_bias=true adds a trained bias to lora_B, which the mixed-batch LoRA layers "
            "do not apply; retrain with lora_bias=false",
            "unsupported_adapter",
        )
    for field_name, why in (
        ("layer_replication", "duplicates base layers"),
        ("alora_invocation_tokens", "activates the adapter mid-sequence (aLoRA)"),
        ("target_parameters", "adapts parameters rather than layers"),
    ):
        if config.get(field_name):
            raise AdapterError(
                400,
                f"{field_name}={config[field_name]!r} {why}, which this server does not apply "
                "per row; retrain without it",
                "unsupported_adapter",
            )


def _rank(config: dict[str, Any]) -> tuple[int, float]:
    try:
        rank = int(config.get("r", 0))
        alpha = float(config.get("lora_alpha", rank))
        for v in (config.get("rank_pattern") or {}).values():
            int(v)
    except (TypeError, ValueError) as exc:
        raise AdapterError(
            400, f"r / lora_alpha / rank_pattern are not numbers: {exc}", "invalid_config"
        ) from exc
    if rank < 1:
        raise AdapterError(400, "r must be at least 1", "invalid_config")
    return rank, alpha


def _check_restated(
    file: AdapterFile, base: BaseModelShape, keys: dict[str, str], reasons: dict[str, str]
) -> dict[str, str]:
    """Whole base layers in the file (PEFT's save_embedding_layers): the input embedding or
    output layer, equal to the base's own, is applied by being it; anything else is named
    in the refusal."""
    restated = {}
    for key, module in keys.items():
        shape = file.shape(key)
        expected = base.token_modules.get(module)
        if expected is None:
            reasons[key] = (
                "a whole base layer's weights (modules_to_save or a full fine-tune), which "
                "cannot be mixed per row"
            )
        elif shape != list(expected):
            reasons[key] = (
                f"a whole {module} of shape {shape} where the base's is {list(expected)} "
                "(a resized vocabulary: the adapter added tokens the base does not have)"
            )
        elif base.weight is None:
            restated[key] = module  # compared with the base's at load
        else:
            own = base.weight(module)
            if own is None:
                reasons[key] = (
                    f"a whole {module}, which this server cannot compare with its base's (the "
                    "output layer is held in int8): only a copy equal to the base is applied"
                )
            elif not same_weight(_tensor(file, key), own):
                reasons[key] = (
                    f"a whole {module} that differs from the base's (a trained embedding or "
                    "output layer, as modules_to_save writes it), which cannot be mixed per "
                    "row; train LoRA on it, or trainable_token_indices for a few token rows"
                )
            else:
                restated[key] = module  # the base's own value: applied by being it
    return restated


def _tensor(file: AdapterFile, key: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(file.path / WEIGHTS_FILE), "pt") as f:
        return f.get_tensor(key)


def same_weight(tensor: torch.Tensor, base: torch.Tensor) -> bool:
    """Equal to the base's weight, compared in the coarser of the two dtypes (a float32 copy
    of a bfloat16 base is the base)."""
    if tuple(tensor.shape) != tuple(base.shape):
        return False
    low = base.dtype if base.element_size() <= tensor.element_size() else tensor.dtype
    return torch.equal(tensor.to(low).cpu(), base.detach().to(low).cpu())


class LoRAKind:
    name = "lora"
    peft_type = "LORA"

    def validate(self, file: AdapterFile, base: BaseModelShape, limits: Limits) -> KindReport:
        config = file.config
        _refuse_config(config)
        rank, alpha = _rank(config)
        ranks = [rank] + [int(v) for v in (config.get("rank_pattern") or {}).values()]
        top = max(ranks)
        if top > limits.max_rank:
            raise AdapterError(
                400,
                f"adapter rank {top} is above this server's max_lora_rank {limits.max_rank}: "
                "raise SWAPSERVE_MAX_LORA_RANK or use a smaller adapter",
                "rank_too_high",
            )

        modules: dict[str, dict[str, list[int]]] = {}
        keys: dict[str, list[str]] = {}
        layer_keys: dict[str, str] = {}
        reasons: dict[str, str] = {}
        for key in file.header:
            found = lora_key_module(key)
            if found is not None:
                module, which = found
                modules.setdefault(module, {})[which] = file.shape(key)
                keys.setdefault(module, []).append(key)
                continue
            layer = _LAYER_KEY.match(key)
            if layer is not None:
                layer_keys[key] = layer.group(1)
            elif key.endswith(".bias"):
                reasons[key] = (
                    f"a trained bias (bias={config.get('bias')!r}), which the mixed-batch LoRA "
                    "layers do not apply; retrain with bias='none'"
                )
        if not modules:
            raise AdapterError(400, f"{WEIGHTS_FILE} holds no LoRA tensors", "invalid_weights")
        linear = {m for m, s in modules.items() if "A" in s or "B" in s}
        embedding = set(modules) - linear
        matched = [m for m in linear if m in base.linear] + [
            m for m in embedding if m in base.token_modules and m in _input_embeddings(base)
        ]
        if not matched:
            sample = ", ".join(sorted(modules)[:3])
            raise AdapterError(
                400,
                f"none of the adapter's {len(modules)} target modules exist in the base model "
                f"(e.g. {sample}); it was made for another architecture",
                "no_matching_modules",
            )
        missing = sorted(set(modules) - set(matched))
        if missing:
            raise AdapterError(
                400,
                f"{len(missing)} of the adapter's target modules do not exist in the base model "
                f"(e.g. {', '.join(missing[:3])})",
                "base_model_mismatch",
            )
        parameters = 0
        for module in sorted(linear):
            in_f, out_f = base.linear[module]
            a, b = modules[module].get("A"), modules[module].get("B")
            if not a or not b or len(a) != 2 or len(b) != 2:
                raise AdapterError(400, f"{module}: needs 2-D lora_A and lora_B", "invalid_weights")
            if a[1] != in_f or b[0] != out_f or a[0] != b[1]:
                raise AdapterError(
                    400,
                    f"{module}: LoRA shapes A{a} B{b} do not fit the base layer "
                    f"({in_f} in, {out_f} out): the adapter belongs to another base model",
                    "base_model_mismatch",
                )
            self._check_module_rank(module, a[0], limits)
            parameters += a[0] * (a[1] + b[0])
        for module in sorted(embedding):
            rows, dim = base.token_modules[module]
            a, b = modules[module].get("embA"), modules[module].get("embB")
            if not a or not b or len(a) != 2 or len(b) != 2:
                raise AdapterError(
                    400,
                    f"{module}: needs 2-D lora_embedding_A and lora_embedding_B",
                    "invalid_weights",
                )
            if a[1] != rows or b[0] != dim or a[0] != b[1]:
                raise AdapterError(
                    400,
                    f"{module}: LoRA embedding shapes A{a} B{b} do not fit the base's embedding "
                    f"({rows} tokens of width {dim}): the adapter belongs to another base model",
                    "base_model_mismatch",
                )
            self._check_module_rank(module, a[0], limits)
            parameters += a[0] * (a[1] + b[0])
        restated = _check_restated(file, base, layer_keys, reasons)
        trained_tokens, token_keys, token_params = check_token_rows(file, base)
        used = {k for ks in keys.values() for k in ks} | set(restated) | token_keys
        return KindReport(
            target_modules=sorted(matched),
            parameters=parameters + token_params,
            used=used,
            rank=top,
            alpha=alpha,
            use_rslora=bool(config.get("use_rslora")),
            trained_tokens=trained_tokens,
            reasons=reasons,
        )

    @staticmethod
    def _check_module_rank(module: str, rank: int, limits: Limits) -> None:
        if rank > limits.max_rank:
            raise AdapterError(
                400,
                f"{module} has rank {rank}, above max_lora_rank {limits.max_rank}",
                "rank_too_high",
            )

    def read(self, name: str, path: Path, dtype: torch.dtype) -> LoRAWeights:
        return read_peft_lora(name, path, dtype)

    def rows(self, model: nn.Module, device: torch.device, dtype: torch.dtype) -> LoRARows:
        return LoRARows(model, device, dtype)


def _input_embeddings(base: BaseModelShape) -> set[str]:
    """Token modules that are looked up (an embedding), not multiplied (the output layer)."""
    return {m for m in base.token_modules if m not in base.linear}


KIND = LoRAKind()


# --- loading ----------------------------------------------------------------------------------


@dataclass
class LoRAWeights:
    """One adapter as host tensors: module path -> (A (r, in), B * scaling (out, r))."""

    name: str
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    # module path (input embedding or output layer) -> (token ids (n,), their rows (n, dim))
    tokens: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # embedding path -> (A^T (vocab, r), B * scaling (r, dim)): LoRA on an embedding
    embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # base module path -> the whole weight the file restates (checked against the base)
    restated: dict[str, torch.Tensor] = field(default_factory=dict)
    kind: str = "lora"

    @property
    def rank(self) -> int:
        """Width of the adapter's block: its largest rank over modules (rank_pattern)."""
        ranks = [a.shape[0] for a, _ in self.modules.values()]
        ranks += [a.shape[1] for a, _ in self.embeddings.values()]
        return max(ranks, default=0)

    @property
    def nbytes(self) -> int:
        total = sum(a.nbytes + b.nbytes for a, b in self.modules.values())
        total += sum(a.nbytes + b.nbytes for a, b in self.embeddings.values())
        return total + sum(ids.nbytes + rows.nbytes for ids, rows in self.tokens.values())


def read_peft_lora(name: str, path: Path, dtype: torch.dtype = torch.float32) -> LoRAWeights:
    """Read a validated PEFT LoRA folder (safetensors only; nothing is unpickled)."""
    from safetensors.torch import load_file

    config: dict[str, Any] = json.loads((path / CONFIG_FILE).read_text())
    tensors = load_file(str(path / WEIGHTS_FILE))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    restated = {}
    for key, tensor in tensors.items():
        found = lora_key_module(key)
        if found is not None:
            module, which = found
            pairs.setdefault(module, {})[which] = tensor
            continue
        layer = _LAYER_KEY.match(key)
        if layer is not None:
            restated[layer.group(1)] = tensor
    modules, embeddings = {}, {}
    for module, ab in pairs.items():
        if "A" in ab:
            a, b = ab["A"], ab["B"]
            scale = lora_scaling(config, module, int(a.shape[0]))
            modules[module] = (a.to(dtype).contiguous(), (b.float() * scale).to(dtype).contiguous())
        else:
            a, b = ab["embA"], ab["embB"]  # (r, vocab), (dim, r)
            scale = lora_scaling(config, module, int(a.shape[0]))
            embeddings[module] = (
                a.t().to(dtype).contiguous(),
                (b.float() * scale).t().to(dtype).contiguous(),
            )
    return LoRAWeights(
        name,
        modules,
        read_token_rows(config, tensors, dtype),
        embeddings=embeddings,
        restated=restated,
    )


# --- per-row application ----------------------------------------------------------------------


@dataclass
class _Plan:
    """Which adapter block each row of the current forward uses."""

    single: tuple[int, int] | None  # (offset, rank) when every row uses one adapter
    single_name: str | None
    mask: torch.Tensor | None  # (batch, 1, R) otherwise
    slots: torch.Tensor  # (batch,) int32: each row's adapter in packing order, -1 for none


class LoRALinear(revision.Watched, nn.Module):
    """A base linear layer plus the packed LoRA blocks of every resident adapter."""

    # what kernel_parts reads besides the base module and the plan
    _kernel_inputs = frozenset({"int8", "a_cat"})

    def __init__(self, base: Any, owner: LoRARows):
        super().__init__()
        self.base = base
        self.in_features = int(base.in_features)
        self.out_features = int(base.out_features)
        self._owner = [owner]  # a list, so the owner is not registered as a submodule
        self.targets: set[str] = set()  # adapters with weights for this layer
        self.a_cat: torch.Tensor | None = None
        self.b_cat: torch.Tensor | None = None
        # on a CPU over a 4-bit layer of the VNNI kernel: every adapter's blocks in 8 bits,
        # each row reading only its own (vnni.lora_add) instead of a_cat / b_cat
        self.int8: vnni.LoRAPack | None = None

    @property
    def on_kernel(self) -> bool:
        """Whether this layer's blocks go to the CPU kernel (see LoRARows._pack)."""
        return getattr(self.base, "kernel", None) == "vnni"

    def _delta(self, x: torch.Tensor) -> torch.Tensor | None:
        plan = self._owner[0].current
        if plan is None or self.a_cat is None or self.b_cat is None:
            return None
        xa = x.to(self.a_cat.dtype)
        if plan.single is not None:
            if plan.single_name not in self.targets:
                return None
            off, rank = plan.single
            return (xa @ self.a_cat[:, off : off + rank]) @ self.b_cat[off : off + rank]
        assert plan.mask is not None
        return ((xa @ self.a_cat) * plan.mask) @ self.b_cat

    def kernel_parts(self) -> tuple[vnni.Packed, vnni.LoRAPack | None, torch.Tensor | None] | None:
        """For a whole layer on the CPU kernel (vnni.DecodeLayer): the base's packed
        weight, this layer's 8-bit blocks and the current rows' slots (None, None when no
        delta applies now, as forward adds none); None where forward would take another
        road (a float block, a base not on the kernel)."""
        parts_of = getattr(self.base, "kernel_parts", None)
        parts = parts_of() if parts_of is not None else None
        if parts is None or parts[1] is not None:
            return None
        plan = self._owner[0].current
        if plan is None or (self.int8 is None and self.a_cat is None):
            return parts[0], None, None
        if self.int8 is None:
            return None
        return parts[0], self.int8, plan.slots

    def kernel_plan(self) -> torch.Tensor | None:
        """What of kernel_parts changes from one forward to the next: the rows' slots where
        a delta applies now, else None."""
        plan = self._owner[0].current
        if plan is None or (self.int8 is None and self.a_cat is None):
            return None
        return plan.slots

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        plan = self._owner[0].current
        if self.int8 is not None and plan is not None:
            # the base's fresh float32 output takes the deltas in place
            flat = out.reshape(-1, self.out_features)
            if flat.dtype != torch.float32 or not flat.is_contiguous():
                flat = flat.to(torch.float32).contiguous()
            tokens = x.shape[-2] if x.dim() == 3 else 1
            vnni.lora_add(flat, x.reshape(-1, self.in_features), self.int8, plan.slots, tokens)
            return flat.reshape(out.shape).to(out.dtype)
        delta = self._delta(x)
        return out if delta is None else out + delta.to(out.dtype)


class LoRAEmbedding(LoRALinear):
    """An embedding plus packed LoRA blocks: A^T (vocab, R) is looked up by token id."""

    def __init__(self, base: Any, owner: LoRARows):
        nn.Module.__init__(self)
        self.base = base
        weight = base.weight
        self.in_features = int(weight.shape[0])  # vocabulary: rows of A^T
        self.out_features = int(weight.shape[1])
        self._owner = [owner]
        self.targets = set()
        self.a_cat = None
        self.b_cat = None
        scale = getattr(base, "embed_scale", None)
        # PEFT scales the LoRA output like the base's rows (Gemma's scaled embedding)
        self.embed_scale = float(scale) if scale is not None else 1.0
        for attr in ("weight", "num_embeddings", "embedding_dim", "padding_idx"):
            if hasattr(base, attr):
                setattr(self, attr, getattr(base, attr))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        plan = self._owner[0].current
        if plan is None or self.a_cat is None or self.b_cat is None:
            return out
        if plan.single is not None:
            if plan.single_name not in self.targets:
                return out
            off, rank = plan.single
            delta = self.a_cat[x, off : off + rank] @ self.b_cat[off : off + rank]
        else:
            assert plan.mask is not None
            delta = (self.a_cat[x] * plan.mask) @ self.b_cat  # (batch, seq, dim)
        return out + (delta * self.embed_scale).to(out.dtype)


class LoRARows:
    """The resident LoRA adapters of one model and the per-forward row plan."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype):
        self.model = model
        self.device = device
        self.dtype = dtype
        self.layers: dict[str, LoRALinear] = {}
        self.adapters: dict[str, LoRAWeights] = {}  # resident, in packing order
        self.offsets: dict[str, tuple[int, int]] = {}
        self.current: _Plan | None = None
        self.tokens = TokenRows(model, device, dtype)
        # adapter -> module -> its block in 8 bits, for the layers on the CPU kernel
        self._int8: dict[str, dict[str, vnni.LoRABlock]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.adapters

    def add(self, weights: LoRAWeights) -> None:
        self._check_restated(weights)  # before anything changes: a refusal leaves no trace
        for module in weights.modules:
            self._wrap(module, LoRALinear)
        for module in weights.embeddings:
            self._wrap(module, LoRAEmbedding)
        if weights.tokens:
            self.tokens.add(weights)
        self.adapters[weights.name] = weights
        self._pack()

    def remove(self, name: str) -> None:
        if self.adapters.pop(name, None) is not None:
            self._int8.pop(name, None)
            self.tokens.remove(name)
            self._pack()

    def _check_restated(self, weights: LoRAWeights) -> None:
        differ = []
        for module, tensor in weights.restated.items():
            base = base_weight(self.model, module)
            if base is None or not same_weight(tensor, base):
                differ.append(module)
        if differ:
            raise AdapterError(
                400,
                f"the adapter file holds whole {', '.join(f'{m}.weight' for m in differ)} that "
                "differ from the base model's: a whole trained layer per adapter cannot be mixed "
                "per row (modules_to_save or a trained embedding); retrain with LoRA on it, or "
                "with trainable_token_indices for a few token rows",
                "unsupported_adapter",
            )

    def _wrap(self, module: str, cls: type[LoRALinear]) -> None:
        if module in self.layers:
            return
        parent_name, _, child = module.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        base = getattr(parent, child)
        if cls is LoRALinear and not (
            hasattr(base, "in_features") and hasattr(base, "out_features")
        ):
            raise ValueError(f"{module} is not a linear layer")
        wrapped = cls(base, self)
        setattr(parent, child, wrapped)
        self.layers[module] = wrapped

    def _pack(self) -> None:
        """Lay every resident adapter's block side by side in every wrapped layer."""
        self.offsets = {}
        total = 0
        for name, weights in self.adapters.items():
            self.offsets[name] = (total, weights.rank)
            total += weights.rank
        for module, layer in self.layers.items():
            if total == 0:  # no adapter left: wrapped layers pass the base through
                layer.a_cat = layer.b_cat = layer.int8 = None
                layer.targets = set()
                continue
            if self._on_kernel(layer):
                blocks = [self._int8_block(name, module) for name in self.adapters]
                layer.int8 = vnni.pack_lora(blocks, layer.in_features, layer.out_features)
                layer.a_cat = layer.b_cat = None
                layer.targets = {n for n, w in self.adapters.items() if module in w.modules}
                continue
            a_cat = torch.zeros(layer.in_features, total, dtype=self.dtype)
            b_cat = torch.zeros(total, layer.out_features, dtype=self.dtype)
            targets = set()
            for name, weights in self.adapters.items():
                off = self.offsets[name][0]
                if module in weights.modules:
                    a, b = weights.modules[module]  # (r, in), (out, r)
                    a, b = a.t(), b.t()
                elif module in weights.embeddings:
                    a, b = weights.embeddings[module]  # (vocab, r), (r, dim)
                else:
                    continue
                rank = a.shape[1]
                a_cat[:, off : off + rank] = a
                b_cat[off : off + rank] = b
                targets.add(name)
            layer.a_cat = a_cat.to(self.device)
            layer.b_cat = b_cat.to(self.device)
            layer.targets = targets

    def _int8_block(self, name: str, module: str) -> vnni.LoRABlock | None:
        """An adapter's block on a kernel layer in 8 bits, quantized once while resident."""
        pair = self.adapters[name].modules.get(module)
        if pair is None:
            return None
        blocks = self._int8.setdefault(name, {})
        if module not in blocks:
            blocks[module] = vnni.quantize_lora(*pair)
        return blocks[module]

    def _on_kernel(self, layer: LoRALinear) -> bool:
        return (
            type(layer) is LoRALinear
            and layer.on_kernel
            and self.device.type == "cpu"
            and self.dtype == torch.float32
        )

    def plan(self, rows: list[str | None], input_start: int | None) -> None:
        """Plan the next forward: row i uses adapter rows[i] (None: not a LoRA row)."""
        self.tokens.plan(rows, input_start)
        used = {name for name in rows if name is not None}
        unknown = used - set(self.offsets)
        if unknown:
            raise KeyError(f"adapters not resident: {sorted(unknown)}")
        order = {name: i for i, name in enumerate(self.adapters)}
        slots = torch.tensor(
            [-1 if name is None else order[name] for name in rows], dtype=torch.int32
        )
        if not used:
            self.current = None
        elif len(used) == 1 and None not in rows:
            (name,) = used
            self.current = _Plan(
                single=self.offsets[name], single_name=name, mask=None, slots=slots
            )
        else:
            total = sum(rank for _, rank in self.offsets.values())
            mask = torch.zeros(len(rows), 1, total, dtype=self.dtype)
            for row, row_name in enumerate(rows):
                if row_name is not None:
                    off, rank = self.offsets[row_name]
                    mask[row, 0, off : off + rank] = 1
            self.current = _Plan(
                single=None, single_name=None, mask=mask.to(self.device), slots=slots
            )


def base_weight(model: nn.Module, module: str) -> torch.Tensor | None:
    """The float weight of a base module, looking through our wrappers; an int8 output
    layer of a tied model shares the input embedding's weight."""
    try:
        layer: Any = model.get_submodule(module)
    except AttributeError:
        return None
    while hasattr(layer, "base") and isinstance(layer.base, nn.Module):
        layer = layer.base
    weight = getattr(layer, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight
    output = getattr(model, "get_output_embeddings", lambda: None)()
    if tied(model) and output is not None and _unwrap(output) is layer:
        embedding = _unwrap(model.get_input_embeddings())  # type: ignore[operator]
        weight = getattr(embedding, "weight", None)
        return weight if isinstance(weight, torch.Tensor) else None
    return None


def _unwrap(layer: Any) -> Any:
    while hasattr(layer, "base") and isinstance(layer.base, nn.Module):
        layer = layer.base
    return layer
