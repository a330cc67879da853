"""build_engine(settings) -> Engine: the one place that knows which engines exist.

A new engine is one module beside hf.py and a branch here; nothing above the Engine
protocol (server/engine/base.py) changes.
"""

from __future__ import annotations

from server.config import Settings
from server.engine.base import Engine


def build_engine(settings: Settings) -> Engine:
    """The engine named by the settings, on the one shared base-model loader."""
    if settings.engine == "vllm":
        from server.engine.vllm import build_vllm_engine

        return build_vllm_engine(settings)
    from server.engine import hugepages
    from server.engine.hf import HFEngine
    from server.engine.int4 import int4_kernel_available
    from server.engine.lm_head import auto_screen
    from server.engine.vnni import resolve as resolve_int4_kernel
    from trainer.base_model import load_base_model, native_bf16, pick_device

    device = pick_device(settings.device)
    # 4-bit on the CPU's int4 kernel: re-quantized from the checkpoint's own weights
    # (loaded unquantized), which keeps more of them than a re-pack of NF4 would
    int4 = (
        settings.quantization == "nf4"
        and device == "cpu"
        and settings.fast_path != "off"
        and int4_kernel_available()
    )
    loaded = load_base_model(
        settings.base_model,
        quantization="none" if int4 else settings.quantization,
        device=device,
        cache_dir=settings.cache_dir,
    )
    kernel = resolve_int4_kernel(settings.int4_kernel) if int4 else "torch"
    lm_head: str | None = None if settings.lm_head in ("auto", "native") else settings.lm_head
    if settings.lm_head == "auto" and settings.quantization == "nf4" and loaded.device == "cpu":
        if int4:
            lm_head = auto_screen(kernel)
        elif not native_bf16("cpu"):
            lm_head = "int8"
    hugepages.use(settings.huge_pages != "off")  # for what the engine packs
    return HFEngine(
        loaded,
        lm_head=lm_head,
        int4_weights=int4,
        int4_kernel=kernel,
        fast_path=settings.fast_path,
        max_model_len=settings.max_model_len,
        max_num_seqs=settings.max_num_seqs,
        max_queue=settings.max_queue,
        prefill_chunk_tokens=settings.prefill_chunk_tokens,
        request_timeout_s=settings.request_timeout_s,
    )
