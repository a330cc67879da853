"""Every data format a user brings, loaded and masked: the loss mask of each is checked token
by token against the segments of the rendered text that must (and must not) carry loss.

The tiny model's tokenizer has the project's Gemma template, which has no tool format, so
tool conversations go through the documented fallback (trainer/chat.py); a Hermes-style
template with a tool format is set on a copy of the tokenizer to check the native path."""

from __future__ import annotations

import copy
import json

import pytest

from tests.trainer.helpers import write_jsonl
from trainer import chat
from trainer.data import DataError, dry_run, load_jsonl, prompt_for_generation, tokenize_sft

BOS = "<bos>"
EOT = "<end_of_turn>\n"


def user(text: str) -> str:
    return f"<start_of_turn>user\n{text}{EOT}"


MODEL = "<start_of_turn>model\n"


def load_one(tmp_path, row, task="sft"):
    data = load_jsonl(write_jsonl(tmp_path / "d.jsonl", [row]), task)
    (example,) = data.examples
    return data, example


def assert_mask(tokenizer, seq, segments: list[tuple[str, bool]]) -> None:
    """``segments``: the rendered text in pieces, each flagged with whether it carries loss.

    Every token must carry loss exactly when it starts inside a flagged piece, with its own
    id as the label; and the loss tokens decode back to exactly the flagged pieces."""
    assert seq.text == "".join(text for text, _ in segments), seq.text
    trained: list[tuple[int, int]] = []
    at = 0
    for text, flag in segments:
        if flag:
            trained.append((at, at + len(text)))
        at += len(text)
    mismatches = []
    for i, (tok, (start, end), label) in enumerate(
        zip(seq.input_ids, seq.offsets, seq.labels, strict=True)
    ):
        expected = end > start and any(s <= start < e for s, e in trained)
        want = tok if expected else -100
        if label != want:
            mismatches.append((i, tokenizer.convert_ids_to_tokens(tok), label, want))
    assert not mismatches, f"tokens masked wrongly (index, token, label, expected): {mismatches}"
    loss_text = tokenizer.decode([t for t in seq.labels if t != -100])
    assert loss_text == "".join(text for text, flag in segments if flag)


# --------------------------------------------------------------------------- chat


S = {"role": "system", "content": "Answer briefly."}
U1 = {"role": "user", "content": "What is 2 plus 2?"}
A1 = {"role": "assistant", "content": "4"}
U2 = {"role": "user", "content": "Say hello."}
A2 = {"role": "assistant", "content": "hello world"}
CHAT_SEGMENTS = [
    (BOS + user("Answer briefly.\n\nWhat is 2 plus 2?") + MODEL, False),
    ("4" + EOT, True),
    (user("Say hello.") + MODEL, False),
    ("hello world" + EOT, True),
]


def test_chat_multi_turn_with_system_prompt_trains_every_assistant_turn(tmp_path, tiny_tokenizer):
    data, example = load_one(tmp_path, {"messages": [S, U1, A1, U2, A2]})
    assert data.format == "chat" and data.counts()["assistant_turns"] == 2
    assert_mask(tiny_tokenizer, tokenize_sft(example, tiny_tokenizer), CHAT_SEGMENTS)


def test_chat_loss_on_the_last_turn_only_by_option(tmp_path, tiny_tokenizer):
    _, example = load_one(tmp_path, {"messages": [S, U1, A1, U2, A2]})
    seq = tokenize_sft(example, tiny_tokenizer, loss_turns="last")
    segments = [(text, flag and "hello" in text) for text, flag in CHAT_SEGMENTS]
    assert_mask(tiny_tokenizer, seq, segments)


def test_openai_format_weight_zero_turn_is_context(tmp_path, tiny_tokenizer):
    row = {
        "messages": [
            {"role": "developer", "content": "Answer briefly."},  # OpenAI's newer name
            U1,
            {**A1, "weight": 0},
            {"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text",
                                                                          "text": "hello."}]},
            {**A2, "weight": 1},
        ]
    }  # fmt: skip
    _, example = load_one(tmp_path, row)
    assert example.weights == [None, None, 0, None, 1]
    segments = [(text, flag and "hello" in text) for text, flag in CHAT_SEGMENTS]
    assert_mask(tiny_tokenizer, tokenize_sft(example, tiny_tokenizer), segments)


@pytest.mark.parametrize(
    ("row", "field", "needle"),
    [
        ({"messages": [U1, {**A1, "weight": 2}]}, "messages[1].weight", "0 or 1"),
        ({"messages": [U1, {**A1, "weight": True}]}, "messages[1].weight", "0 or 1"),
        ({"messages": [{**U1, "weight": 1}, A1]}, "messages[0].weight", "only assistant"),
        ({"messages": [U1, {**A1, "weight": 0}]}, "messages", "nothing to learn"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}, A1]},
            "messages[0].content[0]",
            "only text parts",
        ),
    ],
)
def test_openai_format_problems(tmp_path, row, field, needle):
    with pytest.raises(DataError) as info:
        load_jsonl(write_jsonl(tmp_path / "d.jsonl", [row]))
    (problem,) = info.value.problems
    assert (problem.line, problem.field) == (1, field)
    assert needle in problem.message


# --------------------------------------------------------------------------- prompt/completion


def test_prompt_completion_text_trains_the_completion_and_eos(tmp_path, tiny_tokenizer):
    _, example = load_one(tmp_path, {"prompt": "The quick brown", "completion": " fox jumps."})
    seq = tokenize_sft(example, tiny_tokenizer)
    # plain text: tokens the tokenizer adds itself (Gemma's <bos>) have no text, and no loss
    added = [i for i, (start, end) in enumerate(seq.offsets) if end <= start]
    assert all(seq.labels[i] == -100 for i in added)
    assert_mask(tiny_tokenizer, seq, [("The quick brown", False), (" fox jumps.<eos>", True)])


def test_prompt_completion_as_messages_trains_the_completion_turns(tmp_path, tiny_tokenizer):
    row = {"prompt": [S, U1, A1, U2], "completion": [A2]}
    data, example = load_one(tmp_path, row)
    assert data.format == "prompt_completion"
    segments = [(text, flag and "hello" in text) for text, flag in CHAT_SEGMENTS]
    assert_mask(tiny_tokenizer, tokenize_sft(example, tiny_tokenizer), segments)


# --------------------------------------------------------------------------- ShareGPT


def test_sharegpt_conversations(tmp_path, tiny_tokenizer):
    row = {
        "conversations": [
            {"from": "system", "value": "Answer briefly."},
            {"from": "human", "value": "What is 2 plus 2?"},
            {"from": "gpt", "value": "4"},
            {"from": "human", "value": "Say hello."},
            {"from": "gpt", "value": "hello world"},
        ]
    }
    data, example = load_one(tmp_path, row)
    assert data.format == "sharegpt"
    assert_mask(tiny_tokenizer, tokenize_sft(example, tiny_tokenizer), CHAT_SEGMENTS)
    # a top-level system prompt (LLaMA-Factory's layout) renders the same
    row = {"system": "Answer briefly.", "conversations": row["conversations"][1:]}
    _, example = load_one(tmp_path, row)
    assert_mask(tiny_tokenizer, tokenize_sft(example, tiny_tokenizer), CHAT_SEGMENTS)


@pytest.mark.parametrize(
    ("turns", "field", "needle"),
    [
        ([{"from": "robot", "value": "x"}], "conversations[0].from", "not a known speaker"),
        ([{"from": "human", "value": 3}], "conversations[0].value", "must be a string"),
        (
            [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}],
            "conversations[1].from",
            "expected 'assistant'",
        ),
        ([{"from": "human", "value": "a"}], "conversations[0].from", "must end with a assistant"),
    ],
)
def test_sharegpt_problems_name_the_turn(tmp_path, turns, field, needle):
    rows = [{"system": "Be brief.", "conversations": turns}]
    with pytest.raises(DataError) as info:
        load_jsonl(write_jsonl(tmp_path / "d.jsonl", rows))
    (problem,) = info.value.problems
    assert problem.field == field and needle in problem.message


# --------------------------------------------------------------------------- Alpaca


def test_alpaca_instruction_input_output(tmp_path, tiny_tokenizer):
    row = {"instruction": "Say hello.", "input": "to the world", "output": "hello world"}
    data, example = load_one(tmp_path, row)
    assert data.format == "alpaca"
    segments = [
        (BOS + user("Say hello.\n\nto the world") + MODEL, False),
        ("hello world" + EOT, True),
    ]
    assert_mask(tiny_tokenizer, tokenize_sft(example, tiny_tokenizer), segments)


def test_alpaca_with_system_and_history(tmp_path, tiny_tokenizer):
    row = {
        "system": "Answer briefly.",
        "history": [["What is 2 plus 2?", "4"]],
        "instruction": "Say hello.",
        "input": "",
        "output": "hello world",
    }
    _, example = load_one(tmp_path, row)
    assert_mask(tiny_tokenizer, tokenize_sft(example, tiny_tokenizer), CHAT_SEGMENTS)
    seq = tokenize_sft(example, tiny_tokenizer, loss_turns="last")
    last_only = [(text, flag and "hello" in text) for text, flag in CHAT_SEGMENTS]
    assert_mask(tiny_tokenizer, seq, last_only)


def test_alpaca_problems(tmp_path):
    rows = [
        {"instruction": "Say hello.", "output": " "},
        {"instruction": 3, "output": "x"},
        {"instruction": "a", "output": "b", "history": [["only one"]]},
    ]
    with pytest.raises(DataError) as info:
        load_jsonl(write_jsonl(tmp_path / "d.jsonl", rows))
    assert [(p.line, p.field) for p in info.value.problems] == [
        (1, "output"),
        (2, "instruction"),
        (3, "history"),
    ]


# --------------------------------------------------------------------------- tools

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}
TOOL_ROW = {
    "tools": [WEATHER],
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ],
}


# The project's Gemma template before it had a tool format: a template without one.
GEMMA_WITHOUT_TOOLS = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] | trim ~ '\n\n' %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n"
    "{% if loop.first and role == 'user' %}{{ first_user_prefix }}{% endif %}"
    "{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
CALL_TEXT = '<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>'


@pytest.fixture
def no_tools_tokenizer(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = GEMMA_WITHOUT_TOOLS
    return tokenizer


def test_tool_calls_through_the_bundled_template(tmp_path, tiny_tokenizer):
    """The bundled Gemma template has a tool format: tools in the first user turn, compact
    <tool_call> blocks, each tool result a user turn."""
    assert chat.template_renders_tools(tiny_tokenizer)
    data, example = load_one(tmp_path, TOOL_ROW)
    assert data.counts()["with_tools"] == 1
    # arguments are parsed, so a template gets an object, as transformers documents
    assert example.messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    seq = tokenize_sft(example, tiny_tokenizer)
    assert not seq.tool_fallback
    tools = "".join(line + "\n" for line in chat.tools_system_text([WEATHER]).splitlines()[1:])
    segments = [
        (BOS + user(f"{chat.FALLBACK_TOOLS_HEADER}{tools}\nWeather in Paris?") + MODEL, False),
        (CALL_TEXT + EOT, True),
        (user("<tool_response>\nsunny\n</tool_response>") + MODEL, False),
        ("It is sunny." + EOT, True),
    ]
    assert_mask(tiny_tokenizer, seq, segments)
    # the eval prompt is rendered the same way, up to the last assistant turn
    prompt, has_special = prompt_for_generation(example, tiny_tokenizer)
    assert has_special and prompt == segments[0][0] + CALL_TEXT + EOT + segments[2][0]


def test_tool_calls_through_the_fallback_format(tmp_path, no_tools_tokenizer):
    """A template without a tool format (like SmolLM2's) gets the same conventions as plain
    turns: the tools in the system prompt, which this template folds into the user turn."""
    tokenizer = no_tools_tokenizer
    assert not chat.template_renders_tools(tokenizer)
    _, example = load_one(tmp_path, TOOL_ROW)
    seq = tokenize_sft(example, tokenizer)
    assert seq.tool_fallback
    system = chat.tools_system_text([WEATHER]).strip()
    segments = [
        (BOS + user(f"{system}\n\nWeather in Paris?") + MODEL, False),
        (CALL_TEXT + EOT, True),
        (user("<tool_response>\nsunny\n</tool_response>") + MODEL, False),
        ("It is sunny." + EOT, True),
    ]
    assert_mask(tokenizer, seq, segments)
    prompt, _ = prompt_for_generation(example, tokenizer)
    assert prompt == segments[0][0] + CALL_TEXT + EOT + segments[2][0]
    # the server renders a chat request with tools the same way (server/engine/hf.py)
    assert chat.render_prompt(tokenizer, example.messages[:1], [WEATHER]) == segments[0][0]


def test_parallel_calls_answered_in_any_order_and_legacy_functions(tmp_path, tiny_tokenizer):
    second = {**CALL, "id": "call_2", "function": {"name": "get_weather", "arguments": {}}}
    row = {
        "tools": [WEATHER],
        "messages": [
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "tool_calls": [CALL, second]},
            {"role": "tool", "tool_call_id": "call_2", "content": "rain"},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            {"role": "assistant", "content": "Sunny, and rain."},
        ],
    }
    _, example = load_one(tmp_path, row)
    seq = tokenize_sft(example, tiny_tokenizer)
    assert CALL_TEXT + '<tool_call>{"name":"get_weather","arguments":{}}</tool_call>' in seq.text
    assert seq.text.index("rain") < seq.text.index("sunny")
    # OpenAI's legacy function calling reads as the same thing
    legacy = {
        "functions": [WEATHER["function"]],
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "function_call": CALL["function"]},
            {"role": "function", "name": "get_weather", "content": "sunny"},
            {"role": "assistant", "content": "It is sunny."},
        ],
    }
    _, old = load_one(tmp_path, legacy)
    _, new = load_one(tmp_path, TOOL_ROW)
    assert tokenize_sft(old, tiny_tokenizer).text == tokenize_sft(new, tiny_tokenizer).text


def test_sharegpt_function_call_and_observation(tmp_path, tiny_tokenizer):
    row = {
        "tools": json.dumps([WEATHER["function"]]),  # LLaMA-Factory writes a JSON string
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": '{"name": "get_weather", "arguments": '
                                               '{"city": "Paris"}}'},
            {"from": "observation", "value": "sunny"},
            {"from": "gpt", "value": "It is sunny."},
        ],
    }  # fmt: skip
    _, example = load_one(tmp_path, row)
    _, openai_style = load_one(tmp_path, TOOL_ROW)
    assert (
        tokenize_sft(example, tiny_tokenizer).labels
        == tokenize_sft(openai_style, tiny_tokenizer).labels
    )


@pytest.mark.parametrize(
    ("messages", "field", "needle"),
    [
        (
            [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}],
            "messages[1].role",
            "must answer a tool call",
        ),
        (
            [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [CALL]},
             {"role": "assistant", "content": "y"}],
            "messages[2].role",
            "expected a tool message answering call_1",
        ),
        (
            [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [CALL]},
             {"role": "tool", "tool_call_id": "call_9", "content": "y"}],
            "messages[2].tool_call_id",
            "answers no open tool call",
        ),
        (
            [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
                {**CALL, "function": {"name": "get_weather", "arguments": "{not json"}}]}],
            "messages[1].tool_calls[0].function.arguments",
            "not valid JSON",
        ),
        (
            [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
                {**CALL, "function": {"name": "launch", "arguments": {}}}]}],
            "messages[1].tool_calls",
            "not among the example's tools",
        ),
        (
            [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [CALL]},
             {"role": "tool", "tool_call_id": "call_1", "content": "y"}],
            "messages[2]",
            "must end with a assistant turn",
        ),
    ],
)  # fmt: skip
def test_tool_conversation_problems(tmp_path, messages, field, needle):
    rows = [{"tools": [WEATHER], "messages": messages}]
    with pytest.raises(DataError) as info:
        load_jsonl(write_jsonl(tmp_path / "d.jsonl", rows))
    (problem,) = info.value.problems
    assert problem.field == field and needle in problem.message


@pytest.mark.parametrize("template", ["bundled", "without tools"])
def test_example_may_end_with_the_tool_call(tmp_path, tiny_tokenizer, no_tools_tokenizer, template):
    """OpenAI's own fine-tuning example: the assistant turn that calls the tool is the last."""
    tokenizer = tiny_tokenizer if template == "bundled" else no_tools_tokenizer
    row = {"tools": [WEATHER], "messages": TOOL_ROW["messages"][:2]}
    _, example = load_one(tmp_path, row)
    seq = tokenize_sft(example, tokenizer)
    loss_text = tokenizer.decode([t for t in seq.labels if t != -100])
    assert loss_text == CALL_TEXT + EOT
    assert example.reference_answer(tokenizer) == CALL_TEXT == example.reference_answer()


HERMES_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<start_of_turn>system\nTOOLS:{% for t in tools %} {{ t.function.name }}"
    "{% endfor %}<end_of_turn>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'tool' %}<start_of_turn>tool\n{{ m.tool_call_id }}={{ m.content }}"
    "<end_of_turn>\n"
    "{% else %}<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n"
    "{% if m.content %}{{ m.content }}{% endif %}"
    "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} "
    "{{ c.function.arguments | tojson }}{% endfor %}<end_of_turn>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def test_a_template_with_a_tool_format_renders_tools_natively(tmp_path, tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = HERMES_TEMPLATE
    assert chat.template_renders_tools(tokenizer)
    _, example = load_one(tmp_path, TOOL_ROW)
    seq = tokenize_sft(example, tokenizer)
    assert not seq.tool_fallback
    segments = [
        (BOS + "<start_of_turn>system\nTOOLS: get_weather" + EOT + user("Weather in Paris?") + MODEL,
         False),
        ('CALL get_weather {"city": "Paris"}' + EOT, True),
        ("<start_of_turn>tool\ncall_1=sunny" + EOT + MODEL, False),
        ("It is sunny." + EOT, True),
    ]  # fmt: skip
    assert_mask(tokenizer, seq, segments)
    assert example.reference_answer(tokenizer) == "It is sunny."


# --------------------------------------------------------------------------- dry run


def test_dry_run_shows_the_first_examples_masks(tmp_path, no_tools_tokenizer):
    rows = [TOOL_ROW, {"tools": [WEATHER], "messages": [U1, A1]}, TOOL_ROW, TOOL_ROW]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    report = dry_run(path, no_tools_tokenizer, max_length=512)
    assert [e["line"] for e in report["examples"]] == [1, 2, 3]
    assert report["tool_fallback"] is True
    assert "--- line 2:" in report["rendered"] and "[[4<end_of_turn>\n]]" in report["rendered"]
    assert "[[<tool_call>" in report["rendered"]


@pytest.mark.parametrize("fmt", ["tools", "sharegpt", "alpaca"])
def test_each_format_trains_end_to_end(tiny_model_dir, tmp_path, fmt):
    from tests.trainer.helpers import quick_config
    from trainer.sft import SFTJobConfig, run_sft

    rows = {
        "tools": [TOOL_ROW] * 4,
        "sharegpt": [{"conversations": [{"from": "human", "value": "Say hello."},
                                        {"from": "gpt", "value": "hello world"}]}] * 4,
        "alpaca": [{"instruction": "Say hello.", "output": "hello world"}] * 4,
    }[fmt]  # fmt: skip
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    config = quick_config(SFTJobConfig, tiny_model_dir, max_steps=2, max_length=512)
    result = run_sft(config, data, tmp_path / "adapter")
    assert result.steps == 2
    assert result.card["data"]["format"] == ("chat" if fmt == "tools" else fmt)
    # the end-of-turn row is trained: it carries loss in every format
    assert result.card["hyperparameters"]["trainable_token_strings"] == ["<end_of_turn>"]
