import pytest
from pydantic import ValidationError

from server.config import Settings


def test_defaults_are_valid_and_loopback():
    s = Settings()
    assert s.binds_loopback
    assert s.quantization == "nf4"


def test_bounds_are_checked_against_each_other():
    with pytest.raises(ValidationError, match="max_cpu_loras"):
        Settings(max_loras=8, max_cpu_loras=4)
    with pytest.raises(ValidationError, match="default_max_tokens"):
        Settings(max_model_len=128, default_max_tokens=128)


def test_env_prefix(monkeypatch):
    monkeypatch.setenv("SWAPSERVE_MAX_MODEL_LEN", "1024")
    monkeypatch.setenv("SWAPSERVE_QUANTIZATION", "none")
    s = Settings()
    assert s.max_model_len == 1024
    assert s.quantization == "none"
    monkeypatch.setenv("SWAPSERVE_QUANTIZATION", "int3")
    with pytest.raises(ValidationError, match="quantization"):
        Settings()
