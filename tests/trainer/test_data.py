import hashlib
import json

import pytest

from tests.trainer.helpers import write_jsonl
from trainer.data import (
    LOSS_CLOSE,
    LOSS_OPEN,
    DataError,
    check_lengths,
    dataset_hash,
    dry_run,
    load_jsonl,
    render_loss_mask,
    tokenize_preference,
    tokenize_sft,
)

U = {"role": "user", "content": "What is 2 plus 2?"}
A = {"role": "assistant", "content": "4"}
S = {"role": "system", "content": "Answer briefly."}
GOOD = {"messages": [U, A]}


def problems_of(path, task=None):
    with pytest.raises(DataError) as info:
        load_jsonl(path, task)
    return info.value.problems


def one_problem(tmp_path, bad_line, task=None, line=2):
    """Write a good line, then the bad one; expect exactly one problem on ``line``."""
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD if task != "dpo" else DPO_GOOD, bad_line])
    probs = problems_of(path, task)
    assert [p.line for p in probs] == [line], probs
    return probs[0]


DPO_GOOD = {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}


def test_good_chat_file_loads_with_hash_and_counts(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, {"messages": [S, U, A, U, A]}, ""])
    data = load_jsonl(path, "sft")
    assert data.format == "chat"
    assert data.counts() == {
        "examples": 2,
        "lines": 2,
        "format": "chat",
        "assistant_turns": 3,
        "with_tools": 0,
    }
    assert data.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == dataset_hash(path)
    assert [e.line for e in data.examples] == [1, 2]


def test_malformed_json_names_line_and_keeps_going(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, '{"messages": [', GOOD, "[1, 2]"])
    probs = problems_of(path)
    assert [p.line for p in probs] == [2, 4]
    assert "malformed JSON" in probs[0].message
    assert "expected a JSON object" in probs[1].message
    assert "line 2" in str(DataError(probs))


@pytest.mark.parametrize(
    ("bad", "field", "needle"),
    [
        ({"messages": [U, {"role": "assistant"}]}, "messages[1].content", "missing"),
        ({"messages": [U, {"content": "4"}]}, "messages[1].role", "missing"),
        ({"messages": [U, {"role": "assistant", "content": 4}]}, "messages[1].content", "string"),
        ({"messages": [U, {"role": "bot", "content": "4"}]}, "messages[1].role", "not one of"),
        ({"messages": [U, {"role": "assistant", "content": "  "}]}, "messages[1].content", "empty"),
        ({"messages": "hello"}, "messages", "list of messages"),
        ({"messages": []}, "messages", "empty list"),
        ({"messages": [U, "hi"]}, "messages[1]", "must be an object"),
        ({"text": "hello"}, "", "unknown format"),
    ],
)
def test_missing_or_wrong_typed_fields(tmp_path, bad, field, needle):
    problem = one_problem(tmp_path, bad)
    assert problem.field == field
    assert needle in problem.message


@pytest.mark.parametrize(
    ("messages", "needle"),
    [
        ([A, U], "expected 'user'"),
        ([U, U, A], "expected 'assistant'"),
        ([U, A, U], "must end with a assistant turn"),
        ([U, S, A], "system message may only come first"),
        ([S], "no user turn"),
    ],
)
def test_roles_out_of_order(tmp_path, messages, needle):
    problem = one_problem(tmp_path, {"messages": messages})
    assert needle in problem.message
    assert "line 2" in str(problem)


def test_prompt_completion_problems(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "Q", "completion": "A"},
            {"prompt": "Q"},
            {"prompt": "Q", "completion": [A]},
            {"prompt": "Q", "completion": " "},
            {"prompt": [U], "completion": [U]},
        ],
    )
    probs = problems_of(path, "sft")
    assert [(p.line, p.field) for p in probs] == [
        (2, "completion"),
        (3, "prompt"),
        (4, "completion"),
        (5, "prompt+completion[1].role"),
        (5, "completion"),
    ]
    assert "missing" in probs[0].message
    assert "both be strings or both be message lists" in probs[1].message


def test_empty_dataset(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    probs = problems_of(path)
    assert len(probs) == 1 and "empty" in probs[0].message
    with pytest.raises(DataError, match="no such file"):
        load_jsonl(tmp_path / "missing.jsonl")


def test_mixed_formats_and_wrong_task(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, {"prompt": "Q", "completion": "A"}])
    (problem,) = problems_of(path)
    assert problem.line == 2 and "differs from line 1" in problem.message
    path = write_jsonl(tmp_path / "p.jsonl", [DPO_GOOD])
    (problem,) = problems_of(path, "sft")
    assert problem.line == 1 and "train dpo" in problem.message
    path = write_jsonl(tmp_path / "s.jsonl", [GOOD])
    (problem,) = problems_of(path, "dpo")
    assert problem.line == 1 and "DPO needs" in problem.message


@pytest.mark.parametrize(
    ("bad", "field", "needle"),
    [
        ({"prompt": "Hi?", "chosen": "Hello."}, "rejected", "missing"),
        ({"prompt": "Hi?", "chosen": "Same", "rejected": "Same"}, "rejected", "identical"),
        ({"prompt": "Hi?", "chosen": 3, "rejected": "x"}, "chosen", "must be a string"),
        ({"prompt": [U, A], "chosen": "a", "rejected": "b"}, "prompt[1].role", "end with a user"),
        ({"prompt": "Hi?", "chosen": [U], "rejected": "b"}, "chosen", "one assistant message"),
    ],
)
def test_dpo_problems(tmp_path, bad, field, needle):
    problem = one_problem(tmp_path, bad, task="dpo")
    assert problem.field == field
    assert needle in problem.message


def test_dpo_prompt_as_messages_and_answer_as_list(tmp_path):
    row = {"prompt": [S, U], "chosen": [A], "rejected": [{"role": "assistant", "content": "5"}]}
    data = load_jsonl(write_jsonl(tmp_path / "d.jsonl", [row]), "dpo")
    assert data.examples[0].chosen == "4" and data.examples[0].rejected == "5"


def test_loss_mask_covers_assistant_turns_only(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [S, U, A, U, {**A, "content": "5"}]}])
    seq = tokenize_sft(load_jsonl(path).examples[0], tiny_tokenizer)
    rendered = render_loss_mask(seq)
    # both assistant turns, with their end-of-turn, carry loss; nothing else does
    assert rendered.count(LOSS_OPEN) == 2
    assert f"{LOSS_OPEN}4<end_of_turn>" in rendered
    assert f"{LOSS_OPEN}5<end_of_turn>" in rendered
    loss_text = tiny_tokenizer.decode([t for t in seq.labels if t != -100])
    assert "What is" not in loss_text and "Answer briefly" not in loss_text
    assert loss_text.count("<end_of_turn>") == 2


def test_loss_mask_prompt_completion(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "The quick brown", "completion": " fox jumps."}]
    seq = tokenize_sft(
        load_jsonl(write_jsonl(tmp_path / "d.jsonl", rows)).examples[0], tiny_tokenizer
    )
    loss_text = tiny_tokenizer.decode([t for t in seq.labels if t != -100])
    assert loss_text == " fox jumps.<eos>"
    # conversational prompt/completion: the prompt's own assistant turn carries no loss
    rows = [{"prompt": [U, A, U], "completion": [{**A, "content": "5"}]}]
    seq = tokenize_sft(
        load_jsonl(write_jsonl(tmp_path / "c.jsonl", rows)).examples[0], tiny_tokenizer
    )
    assert render_loss_mask(seq).count(LOSS_OPEN) == 1
    assert f"{LOSS_OPEN}5<end_of_turn>" in render_loss_mask(seq)


def test_preference_masks(tmp_path, tiny_tokenizer):
    data = load_jsonl(write_jsonl(tmp_path / "d.jsonl", [DPO_GOOD]), "dpo")
    chosen, rejected = tokenize_preference(data.examples[0], tiny_tokenizer)
    assert tiny_tokenizer.decode([t for t in chosen.labels if t != -100]).startswith("Hello.")
    assert tiny_tokenizer.decode([t for t in rejected.labels if t != -100]).startswith("Go away.")


def test_lengths_report_truncation_and_refuse_prompt_past_max_length(tmp_path, tiny_tokenizer):
    long_answer = " ".join(["hello world"] * 20)
    rows = [GOOD, {"messages": [U, {**A, "content": long_answer}]}]
    data = load_jsonl(write_jsonl(tmp_path / "d.jsonl", rows))
    report = check_lengths(data, tiny_tokenizer, max_length=32)
    assert report.n_truncated == 1 and report.truncated_lines == [2]
    assert report.longest > 32
    long_prompt = {"messages": [{**U, "content": " ".join(["hello world"] * 20)}, A]}
    data = load_jsonl(write_jsonl(tmp_path / "e.jsonl", [GOOD, long_prompt]))
    with pytest.raises(DataError) as info:
        check_lengths(data, tiny_tokenizer, max_length=32)
    (problem,) = info.value.problems
    assert problem.line == 2 and "max_length=32" in problem.message


def test_dry_run_renders_first_example(tmp_path, tiny_tokenizer, sft_data):
    report = dry_run(sft_data, tiny_tokenizer, max_length=512)
    assert report["counts"]["examples"] == 8
    assert report["first_loss_tokens"] > 0
    first = json.loads(sft_data.read_text().splitlines()[0])
    answer = first["messages"][1]["content"]
    assert f"{LOSS_OPEN}{answer}<end_of_turn>\n{LOSS_CLOSE}" in report["rendered"]
    assert f"{LOSS_OPEN}<bos>" not in report["rendered"]
    truncated = dry_run(sft_data, tiny_tokenizer, max_length=28)["rendered"]
    assert "TRUNCATED" in truncated
