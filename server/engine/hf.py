"""The `hf` engine: transformers + bitsandbytes on the CPU or one GPU, own adapter layers."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from server.engine import decoder, hugepages
from server.engine.base import (
    EngineInfo,
    GenerationOutput,
    GenerationRequest,
)
from server.engine.fast_runner import FastModelRunner
from server.engine.grammar import GrammarCompiler
from server.engine.int4 import repack_linear_layers
from server.engine.kinds import kind_for
from server.engine.kinds.base import CONFIG_FILE, AdapterError, BaseModelShape, config_dims
from server.engine.kinds.lora import base_weight
from server.engine.lm_head import SCREENS, table_is_most_of_the_model, use_int8_lm_head
from server.engine.runner import ModelRunner
from server.engine.scheduler import Scheduler, new_sequences
from server.engine.token_bytes import token_bytes_table
from trainer.base_model import LoadedBaseModel, release_freed_memory
from trainer.chat import render_prompt

logger = logging.getLogger(__name__)


def _parameter_count(model: Any) -> int:
    """Parameters as the checkpoint had them (4-bit tensors are packed two per byte)."""
    total = 0
    for param in model.parameters():
        quant_state = getattr(param, "quant_state", None)
        if quant_state is not None and getattr(quant_state, "shape", None) is not None:
            n = 1
            for dim in quant_state.shape:
                n *= int(dim)
            total += n
        else:
            total += param.numel()
    return total


def _resident_bytes(model: Any) -> int:
    """Bytes of the model's parameters and buffers, each tensor counted once, and of the
    packed tables kernels hold outside tensors (``packed_bytes``)."""
    seen: set[int] = set()
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total + sum(int(getattr(m, "packed_bytes", 0)) for m in model.modules())


def use_fast_path(setting: str, model: Any, device: str) -> bool:
    """auto: on a CPU, for the model families the lean decoder knows; on: there too, or a
    start-up error that says why not; off: the reference path."""
    if setting == "off":
        return False
    reason = decoder.supported(model)
    if setting == "on":
        if reason is not None:
            raise ValueError(f"SWAPSERVE_FAST_PATH=on, but {reason}; use auto or off")
        return True
    if reason is not None:
        logger.info("reference path: the fast path does not support %s", reason)
        return False
    return device == "cpu"


def _weights_format(model: Any) -> dict[str, str]:
    """What each kind of weight is held as, for /ready."""
    from server.engine.int4 import Int4Linear
    from server.engine.lm_head import (
        DYNAMIC_FROM_ROWS,
        REFINE_TOP_K,
        Int8Embedding,
        Int8LMHead,
    )

    linear = "as loaded"
    int4_layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    if int4_layers:
        kernels = sorted({_KERNEL_NAMES[m.kernel] for m in int4_layers})
        groups = min(m.group_size for m in int4_layers)
        linear = f"int4, group size {groups} ({' and '.join(kernels)})"
    else:
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if getattr(weight, "quant_state", None) is not None:
                linear = "nf4 (bitsandbytes)"
                break
    head = model.get_output_embeddings()
    embedding = model.get_input_embeddings()
    out = _dtype_of(head)
    if isinstance(head, Int8LMHead):
        out = "int8, one scale per row"
        dynamic = "FBGEMM's int8 matmul (activations quantized per row)"
        screen_kernel = _SCREEN_KERNEL_NAMES.get(head.screen_kernel or "")
        int4 = f"an int4 copy (group size {head.screen_group_size}; {screen_kernel})"
        screens = {
            "int8-dynamic": dynamic,
            "int4": int4,
            "int4+int8-dynamic": f"{int4} below {DYNAMIC_FROM_ROWS} rows, {dynamic} from there",
        }
        if head.screen_kind in screens:
            out += (
                f"; logits screened by {screens[head.screen_kind]}, each row's leading "
                f"{REFINE_TOP_K} in float32"
            )
    emb = "shares the int8 output table" if isinstance(embedding, Int8Embedding) else None
    held = {
        "linear": linear,
        "output_layer": out,
        "embedding": emb or _dtype_of(embedding),
    }
    if int4_layers:  # packed while the engine was built (SWAPSERVE_HUGE_PAGES)
        held["pages"] = (
            "2 MB (transparent huge pages): the 4-bit layers, the int4 screen, LoRA blocks"
            if hugepages.active()
            else "4 KB"
        )
    return held


_KERNEL_NAMES = {
    "torch": "CPU int4 kernel",
    "vnni": "VNNI kernel, activations in two 8-bit halves; LoRA rows in 8 bits",
}
_SCREEN_KERNEL_NAMES = {"torch": "CPU int4 kernel", "vnni": "VNNI kernel, activations in 8 bits"}


def _dtype_of(module: Any) -> str:
    weight = getattr(module, "weight", None)
    return str(weight.dtype).removeprefix("torch.") if weight is not None else "none"


def _linear_shapes(model: Any) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every linear layer a LoRA adapter could target."""
    shapes = {}
    for name, module in model.named_modules():
        in_f = getattr(module, "in_features", None)
        out_f = getattr(module, "out_features", None)
        if isinstance(in_f, int) and isinstance(out_f, int) and name:
            shapes[name] = (in_f, out_f)
    return shapes


def _token_modules(model: Any) -> dict[str, tuple[int, int]]:
    """(rows, dim) of the input embedding and the output layer, by path: where an adapter
    may carry trained token rows."""
    found = {}
    targets = [model.get_input_embeddings(), model.get_output_embeddings()]
    for name, module in model.named_modules():
        if name and any(module is t for t in targets if t is not None):
            weight = getattr(module, "weight", None)
            rows = getattr(module, "out_features", None) or getattr(module, "num_embeddings", None)
            dim = getattr(module, "in_features", None) or getattr(module, "embedding_dim", None)
            if rows is None and weight is not None:
                rows, dim = weight.shape
            if isinstance(rows, int) and isinstance(dim, int):
                found[name] = (rows, dim)
    return found


def _float_params(model: Any) -> dict[str, tuple[int, ...]]:
    """Shapes of the parameters an adapter may replace per row (LN tuning): float ones, not
    the packed 4-bit weights."""
    found = {}
    for name, param in model.named_parameters():
        if getattr(param, "quant_state", None) is not None or not param.is_floating_point():
            continue
        if type(param).__name__ in ("Params4bit", "Int8Params"):
            continue
        found[name] = tuple(int(d) for d in param.shape)
    return found


def _text_config(model: Any) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


class HFEngine:
    """One resident base model; a scheduler thread batches every request onto it."""

    def __init__(
        self,
        loaded: LoadedBaseModel,
        *,
        max_model_len: int,
        max_num_seqs: int = 16,
        max_queue: int = 64,
        prefill_chunk_tokens: int = 512,
        request_timeout_s: float = 600.0,
        lm_head: str | None = None,
        int4_weights: bool = False,
        int4_kernel: str = "torch",
        fast_path: str = "auto",
    ):
        """``int4_weights``: re-pack the decoder's linear layers for the CPU's int4 kernel
        (server/engine/int4.py), multiplied by ``int4_kernel`` (torch or vnni: see
        server/engine/vnni.py; also the int4 screen's). ``lm_head``: "int8", "int8-dynamic" or "int4" (the int8
        table with that screen of the logits) or None for the output layer as loaded
        (server/engine/lm_head.py). ``fast_path``: auto, on or off (see use_fast_path)."""
        self.loaded = loaded
        model = loaded.model
        num_parameters = _parameter_count(model)  # as loaded, before any re-packing
        quantization: str = loaded.quantization
        share = int4_weights and table_is_most_of_the_model(model)  # as loaded
        if int4_weights:
            repack_linear_layers(model, kernel=int4_kernel)
            quantization = "int4"
        screen = lm_head if lm_head in SCREENS else None
        if lm_head and use_int8_lm_head(
            model, share_embedding=share, screen=screen, kernel=int4_kernel
        ):
            logger.info("output layer in %s (SWAPSERVE_LM_HEAD=native keeps it as loaded)", lm_head)
        if int4_weights or lm_head:
            release_freed_memory()
        self.tokenizer = loaded.tokenizer
        self.request_timeout_s = request_timeout_s
        pad_token_id = int(self.tokenizer.pad_token_id)
        self.runner: ModelRunner | FastModelRunner
        if use_fast_path(fast_path, model, loaded.device):
            self.runner = FastModelRunner(model, pad_token_id=pad_token_id)
        else:
            self.runner = ModelRunner(model, pad_token_id=pad_token_id)
        self.max_model_len = min(max_model_len, loaded.max_position_embeddings)
        vocab_size = int(loaded.model.get_input_embeddings().weight.shape[0])
        self._vocab_size = vocab_size
        self._token_table: tuple[list[bytes], list[int]] | None = None
        self._token_table_lock = threading.Lock()
        self.grammars = GrammarCompiler(
            self.token_table,
            lambda text: self.tokenizer.encode(text, add_special_tokens=False),
            eos_token_id=int(self.tokenizer.eos_token_id),
        )
        self.scheduler = Scheduler(
            self.runner,
            self._decode,
            loaded.stop_token_ids,
            max_model_len=self.max_model_len,
            max_num_seqs=max_num_seqs,
            max_queue=max_queue,
            prefill_chunk_tokens=prefill_chunk_tokens,
            token_bytes=lambda token: self.token_table()[0][token],
        )
        self._adapters: set[str] = set()  # on the compute device, in the adapter layers
        self._host: dict[str, Any] = {}  # off the device, kept in host memory
        # taken before any adapter wraps a layer: the paths are the base's own
        self._linear_shapes = _linear_shapes(loaded.model)
        self._token_modules = _token_modules(loaded.model)
        self._float_params = _float_params(loaded.model)
        self._info = EngineInfo(
            model_id=loaded.model_id,
            engine="hf",
            device=loaded.device,
            quantization=quantization,
            max_model_len=self.max_model_len,
            weights_bytes=_resident_bytes(model),
            fp32_bytes=num_parameters * 4,
            num_parameters=num_parameters,
            vocab_size=vocab_size,
            runner=self.runner.kind,
            weights_format=_weights_format(model),
        )

    @property
    def info(self) -> EngineInfo:
        return self._info

    async def start(self) -> None:
        self.scheduler.start()
        # every token's bytes (log probabilities, grammars): built now, off the request path
        threading.Thread(target=self.token_table, name="swapserve-vocab", daemon=True).start()

    def token_table(self) -> tuple[list[bytes], list[int]]:
        """(bytes of every token id, special token ids), built once."""
        with self._token_table_lock:
            if self._token_table is None:
                self._token_table = token_bytes_table(self.tokenizer, self._vocab_size)
            return self._token_table

    async def shutdown(self) -> None:
        await asyncio.to_thread(self.scheduler.stop)

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def render_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> str:
        # as the trainer renders its data: a template without a tool format (SmolLM2's)
        # gets the tools, calls and results as plain turns instead of silently dropping them
        return render_prompt(self.tokenizer, messages, tools)

    def tokenize(self, text: str) -> list[int]:
        # The chat template already writes <bos>; a raw completion prompt gets one here.
        bos = self.tokenizer.bos_token
        add_special = not (bos and text.startswith(bos))
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    # --- adapters: every model change runs in the scheduler thread, between two steps ----

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        return dict(self._linear_shapes)

    def token_modules(self) -> dict[str, tuple[int, int]]:
        return dict(self._token_modules)

    def base_names(self) -> set[str]:
        names = {self.loaded.model_id, self.loaded.path.name}
        source = getattr(self.loaded.model.config, "_name_or_path", None)
        if source:
            names.add(Path(str(source)).name)
        return names

    def model_shape(self) -> BaseModelShape:
        text = _text_config(self.loaded.model)
        return BaseModelShape(
            linear=dict(self._linear_shapes),
            token_modules=dict(self._token_modules),
            params=dict(self._float_params),
            **config_dims(text),
            vocab_size=int(self._info.vocab_size or 0),
            max_model_len=self.max_model_len,
            names=frozenset(self.base_names()),
            weight=lambda module: base_weight(self.loaded.model, module),
        )

    def has_adapter(self, name: str) -> bool:
        return name in self._adapters

    async def load_adapter(self, name: str, path: Path) -> None:
        future = self.scheduler.call(lambda: self._load_adapter(name, path))
        await asyncio.wrap_future(future)

    async def unload_adapter(self, name: str) -> None:
        future = self.scheduler.call(lambda: self._unload_adapter(name, keep_host_copy=False))
        await asyncio.wrap_future(future)

    async def offload_adapter(self, name: str) -> None:
        """Off the compute device, but kept in host memory for a fast reload."""
        future = self.scheduler.call(lambda: self._unload_adapter(name, keep_host_copy=True))
        await asyncio.wrap_future(future)

    async def drop_host_copy(self, name: str) -> None:
        future = self.scheduler.call(lambda: self._host.pop(name, None))
        await asyncio.wrap_future(future)

    def _load_adapter(self, name: str, path: Path) -> None:
        adapters = self.runner.adapters
        if name in adapters:
            return
        weights = self._host.pop(name, None)  # from host memory: no file reads
        if weights is None:
            peft_type = str(json.loads((path / CONFIG_FILE).read_text()).get("peft_type", ""))
            kind = kind_for(peft_type)
            if kind is None:
                raise AdapterError(
                    400, f"no adapter kind serves peft_type {peft_type!r}", "unsupported_adapter"
                )
            weights = kind.read(name, path, adapters.dtype)
        adapters.add(weights)
        self._adapters.add(name)

    def _unload_adapter(self, name: str, *, keep_host_copy: bool) -> None:
        if not keep_host_copy:
            self._host.pop(name, None)
        weights = self.runner.adapters.remove(name)
        if keep_host_copy and weights is not None:
            self._host[name] = weights  # already host tensors
        self._adapters.discard(name)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[GenerationOutput | BaseException] = asyncio.Queue()

        def emit(item: GenerationOutput | BaseException) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        grammar = None
        spec = request.sampling.structured_outputs
        if spec is not None:
            # compiled (or found in the cache) off the scheduler thread: the first one
            # also teaches the grammar library this model's vocabulary
            first = await asyncio.to_thread(self.grammars.compile, spec)
            copies = [first]
            grammar = lambda: copies.pop() if copies else self.grammars.compile(spec)  # noqa: E731
        seqs = new_sequences(
            request, emit, default_timeout_s=self.request_timeout_s, grammar=grammar
        )
        self.scheduler.submit(seqs)
        remaining = len(seqs)
        try:
            while remaining:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason is not None:
                    remaining -= 1
                yield item
        finally:
            # ensure a client that went away frees its rows at the next step
            for seq in seqs:
                seq.cancelled = True
            self.scheduler.wake()

    def stats(self) -> dict[str, float]:
        s = self.scheduler.stats
        return {
            "queue_depth": s.waiting,
            "running": s.running,
            "prefilling": s.prefilling,
            "batch_size": s.last_batch_size,
            "decode_steps": s.steps,
            "generated_tokens": s.tokens_generated,
            "prompt_tokens": s.prompt_tokens,
            "cancelled": s.requests_cancelled,
            "timed_out": s.requests_timed_out,
        }
