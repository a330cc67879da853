"""The vllm engine's translation layer (server/engine/vllm.py), without starting vLLM:
our sampling parameters -> vLLM's (structured outputs, logprobs, echo), vLLM's outputs ->
ours (logprobs, stop tokens, max_tokens 0), LoRA rank -> the sizes vLLM allocates, CPU
thread binding, and the adapters the engine refuses. Runs where vLLM is installed (the vLLM
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


def test_structured_outputs_map_onto_vllms_guidance_backend_as_compact_json():
    from server.engine.base import StructuredOutput
    from server.engine.structured import compact_schema

    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    ours = SamplingParams(
        max_tokens=4, structured_outputs=StructuredOutput(json_schema=schema), logit_bias={5: 2.0}
    )
    theirs = to_vllm_sampling(ours, [1])
    # the hf engine's JSON options ride in the schema: the same compact JSON on both engines
    assert theirs.structured_outputs.json == compact_schema(schema)
    assert theirs.structured_outputs.json["x-guidance"]["whitespace_flexible"] is False
    assert theirs.logit_bias == {5: 2.0}
    mode = to_vllm_sampling(
        SamplingParams(max_tokens=4, structured_outputs=StructuredOutput(json_object=True)), [1]
    )
    assert mode.structured_outputs.json == compact_schema({"type": "object"})
    lark = 'start: "a" | "b"'
    grammar = to_vllm_sampling(
        SamplingParams(max_tokens=4, structured_outputs=StructuredOutput(grammar=lark)), [1]
    )
    assert grammar.structured_outputs.grammar == lark


def test_a_forced_tool_call_grammar_passes_vllms_guidance_validation():
    """The Lark grammar the tool planner writes (server/serving/tools.py) is what vLLM's
    llguidance backend is given; its own validation (serialisation + compile) accepts it."""
    from vllm.v1.structured_output.backend_guidance import validate_guidance_grammar

    from server.serving.tools import plan

    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                    "required": ["city"],
                },
            },
        }
    ]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        tool_plan = plan(tools, choice, None)
        assert tool_plan is not None and tool_plan.grammar is not None
        params = SamplingParams(max_tokens=4, structured_outputs=tool_plan.grammar)
        validate_guidance_grammar(to_vllm_sampling(params, [1]))  # raises if refused


def test_logprobs_and_prompt_logprobs_map_and_max_tokens_0_decodes_one():
    theirs = to_vllm_sampling(SamplingParams(max_tokens=3, logprobs=5), [1])
    assert theirs.logprobs == 5 and theirs.prompt_logprobs is None
    echo = to_vllm_sampling(SamplingParams(max_tokens=0, logprobs=2, prompt_logprobs=2), [1])
    # vLLM decodes at least one token; the engine drops it (test_outputs_... below)
    assert echo.prompt_logprobs == 2 and echo.max_tokens == 1
    assert (
        to_vllm_sampling(SamplingParams(max_tokens=0, prompt_logprobs=0), [1]).prompt_logprobs == 0
    )


def _lp(logprob: float, rank: int):
    from vllm.logprobs import Logprob as VLogprob

    return VLogprob(logprob=logprob, rank=rank)


def _bytes(token: int) -> bytes:
    return f"<{token}>".encode()


def test_token_logprobs_keep_the_chosen_token_and_the_k_most_likely():
    from server.engine.vllm import token_logprobs

    # vLLM's dict: the chosen token with its rank, then ranks 1..k
    outside = {7: _lp(-3.0, 4), 1: _lp(-0.5, 1), 2: _lp(-1.0, 2), 3: _lp(-2.0, 3)}
    out = token_logprobs(outside, 7, 3, _bytes)
    assert (out.chosen.token_id, out.chosen.logprob, out.chosen.token_bytes) == (7, -3.0, b"<7>")
    assert [(t.token_id, t.logprob) for t in out.top] == [(1, -0.5), (2, -1.0), (3, -2.0)]
    inside = {2: _lp(-1.0, 2), 1: _lp(-0.5, 1)}  # the chosen token is among the top 2
    out = token_logprobs(inside, 2, 2, _bytes)
    assert out.chosen.logprob == -1.0 and [t.token_id for t in out.top] == [1, 2]
    # k 0: the chosen token only; a grammar's forbidden tokens (-inf) are no alternatives
    assert token_logprobs(outside, 7, 0, _bytes).top == []
    masked = {5: _lp(0.0, 1), 6: _lp(float("-inf"), 2)}
    assert [t.token_id for t in token_logprobs(masked, 5, 2, _bytes).top] == [5]


def test_prompt_logprobs_start_with_none():
    from vllm.logprobs import FlatLogprobs

    from server.engine.vllm import prompt_token_logprobs

    flat = FlatLogprobs()  # vLLM's compact form reads as a list of dicts
    for position in (None, {20: _lp(-1.5, 3), 9: _lp(-0.1, 1)}, {30: _lp(-0.2, 1)}):
        flat.append(position)
    out = prompt_token_logprobs(flat, [10, 20, 30], 1, _bytes)
    assert out[0].chosen.token_id == 10 and out[0].chosen.logprob is None and out[0].top == []
    assert (out[1].chosen.logprob, [t.token_id for t in out[1].top]) == (-1.5, [9])
    assert (out[2].chosen.logprob, [t.token_id for t in out[2].top]) == (-0.2, [30])


def _engine():
    from server.engine.vllm import VLLMEngine

    engine = VLLMEngine.__new__(VLLMEngine)  # the output translation only: no vLLM started
    engine._token_bytes = [_bytes(i) for i in range(100)]
    return engine


def _choice(index, ids, *, finish=None, stop_reason=None, logprobs=None, text="x"):
    from types import SimpleNamespace

    return SimpleNamespace(
        index=index,
        text=text,
        token_ids=ids,
        finish_reason=finish,
        stop_reason=stop_reason,
        logprobs=logprobs,
    )


async def _collect(engine, sampling, prompt, results):
    from types import SimpleNamespace

    from server.engine.base import GenerationRequest

    async def stream():
        for prompt_logprobs, choices in results:
            yield SimpleNamespace(prompt_logprobs=prompt_logprobs, outputs=choices)

    request = GenerationRequest("r", prompt, sampling)
    return [out async for out in engine._outputs(request, stream())]


def test_outputs_carry_logprobs_and_drop_the_stop_tokens():
    import asyncio

    sampling = SamplingParams(max_tokens=4, logprobs=1, prompt_logprobs=1, n=2)
    prompt_lps = [None, {4: _lp(-0.7, 1)}]
    results = [
        (
            prompt_lps,
            [_choice(0, [5], logprobs=[{5: _lp(-0.1, 1)}])],
        ),
        (None, [_choice(1, [6], logprobs=[{6: _lp(-0.3, 1)}])]),
        (
            None,
            [
                # 1 is eos: neither its id nor its logprob is returned (hf engine alike)
                _choice(0, [8, 1], finish="stop", logprobs=[{8: _lp(-0.2, 1)}, {1: _lp(-0.9, 1)}])
            ],
        ),
    ]
    outs = asyncio.run(_collect(_engine(), sampling, [3, 4], results))
    assert [(o.index, o.token_ids) for o in outs] == [(0, [5]), (1, [6]), (0, [8])]
    assert [[e.chosen.logprob for e in o.logprobs] for o in outs] == [[-0.1], [-0.3], [-0.2]]
    # each choice's first output carries the prompt's logprobs, the first token's None
    firsts = [o.prompt_logprobs for o in outs[:2]]
    assert all(p is not None and [e.chosen.logprob for e in p] == [None, -0.7] for p in firsts)
    assert outs[2].prompt_logprobs is None
    assert outs[2].finish_reason == "stop" and outs[2].completion_tokens == 2


def test_max_tokens_0_gives_the_prompt_logprobs_and_no_token():
    import asyncio

    sampling = SamplingParams(max_tokens=0, logprobs=0, prompt_logprobs=0)
    results = [([None, {4: _lp(-0.7, 2)}], [_choice(0, [9], finish="length")])]
    (out,) = asyncio.run(_collect(_engine(), sampling, [3, 4], results))
    assert out.token_ids == [] and out.text == "" and out.logprobs is None
    assert out.finish_reason == "length" and out.completion_tokens == 0
    assert out.prompt_tokens == 2 and [e.chosen.token_id for e in out.prompt_logprobs] == [3, 4]


def test_what_vllm_refuses_names_the_request_field():
    """vLLM's own request checks (VLLMValidationError) become a 400 naming our field."""
    from vllm.exceptions import VLLMValidationError

    from server.engine.base import StructuredOutput
    from server.engine.vllm import _refused_param

    plain = SamplingParams(max_tokens=4, logprobs=25)
    assert (
        _refused_param(VLLMValidationError("too many", parameter="logprobs"), plain) == "logprobs"
    )
    assert _refused_param(VLLMValidationError("no"), plain) is None
    schema = SamplingParams(max_tokens=4, structured_outputs=StructuredOutput(json_object=True))
    assert _refused_param(VLLMValidationError("Grammar error"), schema) == "response_format"
    tools = SamplingParams(max_tokens=4, structured_outputs=StructuredOutput(grammar="x"))
    assert _refused_param(VLLMValidationError("Grammar error"), tools) == "tools"
