"""build_engine: which engine the settings name, and a clear error when it cannot be had."""

from __future__ import annotations

import importlib.util

import pytest

from server.config import Settings
from server.engine.factory import build_engine


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_engine_without_vllm_says_how_to_get_it():
    with pytest.raises(RuntimeError, match="make serve ENGINE=vllm"):
        build_engine(Settings(engine="vllm"))
