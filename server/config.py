"""All server settings: one pydantic-settings class, environment prefix SWAPSERVE_."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "swapserve"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SWAPSERVE_", extra="ignore")

    # --- the base model -------------------------------------------------------------
    base_model: str | None = Field(
        None,
        description="A local Hugging Face model folder; unset = the bundled Gemma 3 270M.",
    )
    served_model_name: str = Field("base", description="The `model` id clients use for the base.")
    quantization: Literal["nf4", "none"] = Field("nf4", description="nf4 = 4-bit bitsandbytes.")
    device: str = Field("auto", description="auto, cpu or cuda[:N].")
    engine: Literal["hf", "vllm"] = "hf"
    cache_dir: Path | None = Field(None, description="Where the converted bundled model lives.")
    data_dir: Path = Field(default_factory=_default_data_dir)

    # --- HTTP ---------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_body_bytes: int = Field(2 * 1024 * 1024, ge=1024, description="413 above this.")

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

    # --- training -------------------------------------------------------------------------
    max_training_jobs: int = Field(
        1, ge=1, description="Training jobs running at once; more wait in a queue."
    )
    max_train_data_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="Largest training request or upload (413)."
    )

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
        return self

    @property
    def binds_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False
