"""The vllm engine's translation layer (server/engine/vllm.py), without starting vLLM:
our sampling parameters -> vLLM's, LoRA rank -> the sizes vLLM allocates, CPU thread
binding, and the adapters the engine refuses. Runs where vLLM is installed (the vLLM
environment: `make vllm-env`, then `make test`); skipped elsewhere."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here (make vllm-env)")

from server.engine.base import SamplingParams  # noqa: E402
from server.engine.vllm import (  # noqa: E402
    _token_rows,
    cpu_thread_binding,
    to_vllm_sampling,
    vllm_lora_rank,
)
from tests.tiny_model import build_lora_adapter, build_tiny_model  # noqa: E402


def test_sampling_parameters_map_one_to_one():
    from vllm.sampling_params import RequestOutputKind

    ours = SamplingParams(
        max_tokens=7,
        temperature=0.3,
        top_p=0.9,
        seed=11,
        stop=["\n", "END"],
        presence_penalty=0.5,
        frequency_penalty=-0.25,
        n=3,
    )
    theirs = to_vllm_sampling(ours, stop_token_ids=[1, 106])
    assert (theirs.max_tokens, theirs.temperature, theirs.top_p, theirs.seed, theirs.n) == (
        7,
        0.3,
        0.9,
        11,
        3,
    )
    assert theirs.stop == ["\n", "END"]
    assert theirs.presence_penalty == 0.5 and theirs.frequency_penalty == -0.25
    assert theirs.stop_token_ids == [1, 106] and not theirs.ignore_eos
    assert theirs.output_kind == RequestOutputKind.DELTA  # streamed as new text only


def test_ignore_eos_decodes_past_every_stop_token():
    theirs = to_vllm_sampling(SamplingParams(max_tokens=4, ignore_eos=True), [1, 106])
    assert theirs.ignore_eos and not theirs.stop_token_ids and not theirs.stop


def test_greedy_is_temperature_zero():
    theirs = to_vllm_sampling(SamplingParams(max_tokens=4, temperature=0.0), [1])
    assert theirs.temperature == 0.0


@pytest.mark.parametrize(("ours", "theirs"), [(1, 1), (4, 8), (16, 16), (48, 64), (64, 64)])
def test_max_lora_rank_rounds_up_to_a_size_vllm_allocates(ours, theirs):
    assert vllm_lora_rank(ours) == theirs


def test_rank_above_vllm_largest_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="SWAPSERVE_MAX_LORA_RANK"):
        vllm_lora_rank(1024)


def test_cpu_binding_splits_the_cores_over_the_ranks():
    assert cpu_thread_binding(1, [0, 1]) == "0,1"
    assert cpu_thread_binding(2, [0, 1]) == "0|1"
    assert cpu_thread_binding(2, [0, 1, 2, 3]) == "0,1|2,3"
    with pytest.raises(ValueError, match="cores"):
        cpu_thread_binding(4, [0, 1])


def test_token_rows_are_found_in_an_adapter(tmp_path):
    base = build_tiny_model(tmp_path / "base", head_dim=32)
    plain = build_lora_adapter(base, tmp_path / "plain")
    rows = build_lora_adapter(base, tmp_path / "rows", trainable_token_indices=[3, 5])
    assert _token_rows(plain) == []
    assert _token_rows(rows)  # refused at registration with a 400 (engine suite)


def test_structured_output_and_logit_bias_map_and_logprobs_are_refused_by_name():
    from server.engine.base import StructuredOutput
    from server.engine.vllm import UnsupportedFieldError

    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    ours = SamplingParams(
        max_tokens=4, structured_outputs=StructuredOutput(json_schema=schema), logit_bias={5: 2.0}
    )
    theirs = to_vllm_sampling(ours, [1])
    assert theirs.structured_outputs.json == schema and theirs.logit_bias == {5: 2.0}
    mode = to_vllm_sampling(
        SamplingParams(max_tokens=4, structured_outputs=StructuredOutput(json_object=True)), [1]
    )
    assert mode.structured_outputs.json_object
    for params, field in [
        (SamplingParams(max_tokens=4, logprobs=2), "logprobs"),
        (SamplingParams(max_tokens=4, prompt_logprobs=0), "echo"),
        (SamplingParams(max_tokens=4, structured_outputs=StructuredOutput(grammar="x")), "tools"),
    ]:
        with pytest.raises(UnsupportedFieldError) as err:
            to_vllm_sampling(params, [1])
        assert err.value.param == field and err.value.status == 400
