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


def test_vllm_engine_refuses_nf4_saying_what_to_change():
    with pytest.raises(ValidationError, match="AWQ, GPTQ or compressed-tensors"):
        Settings(engine="vllm", quantization="nf4")
    with pytest.raises(ValidationError, match="SWAPSERVE_LM_HEAD"):
        Settings(engine="vllm", lm_head="int8")
    # nothing asked for: the vllm engine applies no quantization of its own
    assert Settings(engine="vllm").quantization == "none"
    assert Settings().quantization == "nf4"


def test_parallel_settings_need_the_vllm_engine():
    with pytest.raises(ValidationError, match="SWAPSERVE_ENGINE=vllm"):
        Settings(tensor_parallel_size=2)
    with pytest.raises(ValidationError, match="distributed_executor_backend=ray"):
        Settings(distributed_executor_backend="ray")
    s = Settings(engine="vllm", tensor_parallel_size=2, distributed_executor_backend="ray")
    assert (s.tensor_parallel_size, s.distributed_executor_backend) == (2, "ray")


def test_vllm_engine_env(monkeypatch):
    monkeypatch.setenv("SWAPSERVE_ENGINE", "vllm")
    monkeypatch.setenv("SWAPSERVE_QUANTIZATION", "nf4")
    with pytest.raises(ValidationError, match="quantization=nf4"):
        Settings()
