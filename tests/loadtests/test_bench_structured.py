"""loadtests/bench_structured.py's pieces on the tiny model, so the script keeps working as
the grammar code moves: its schema and forced tool call compile with the server's own
compiler (cold, then from the cache), and the schema asks for more than the benchmark's
tokens can hold (every constrained row must end by length, as the free rows do)."""

from __future__ import annotations

from loadtests import bench_structured


def test_compile_times_cover_both_grammars_cold_and_cached(tiny_model_path):
    times = bench_structured.compile_times(tiny_model_path)  # asserts two cache hits itself
    assert set(times) == {
        "vocabulary + JSON mode",
        *(
            f"{g} {what}"
            for g in ("json_schema", "tool_call")
            for what in ("compile, cold", "compile, cached", "first mask")
        ),
    }
    assert all(ms >= 0 for ms in times.values())


def test_the_schema_outlasts_the_default_token_budget():
    people = bench_structured.SCHEMA["properties"]["people"]
    # each item takes well over one token: minItems items cannot fit in 32 tokens
    assert people["minItems"] > 32
    assert bench_structured.TOOLS[0]["function"]["parameters"] is bench_structured.SCHEMA
