"""The held-out format tasks the trainer's defaults are tuned against: deterministic, eval
prompts never seen in training, judged as documented, and loadable by the trainer."""

from __future__ import annotations

import json

import pytest

from loadtests.format_tasks import TASKS, judge, read_eval, write_task
from trainer.data import load_jsonl


@pytest.mark.parametrize("name", sorted(TASKS))
def test_tasks_hold_out_their_eval_prompts(tmp_path, name):
    task = TASKS[name]
    train, held = write_task(task, tmp_path / "a", n_train=60, n_eval=40)
    again, _ = write_task(task, tmp_path / "b", n_train=60, n_eval=40)
    assert train.read_text() == again.read_text()  # deterministic for a seed
    data = load_jsonl(train, "sft")  # the trainer takes it as it is
    assert len(data.examples) == 60
    prompts = {e.messages[0]["content"] for e in data.examples}
    evals = read_eval(held)
    assert len(evals) == 40 and len({e["prompt"] for e in evals}) == 40
    assert not prompts & {e["prompt"] for e in evals}
    # every reference is in the task's format, and so is every training answer
    assert all(task.exact_format(e["reference"]) for e in evals)
    assert all(task.exact_format(e.messages[1]["content"]) for e in data.examples)


@pytest.mark.parametrize("data_format", ["sharegpt", "alpaca"])
def test_tasks_in_other_data_formats(tmp_path, data_format):
    train, _ = write_task(TASKS["tag"], tmp_path, n_train=10, n_eval=5, data_format=data_format)
    assert load_jsonl(train, "sft").format == data_format
    assert json.loads(train.read_text().splitlines()[0])


def test_judging_follows_clean_stops_and_exact():
    task = TASKS["tag"]
    answers = [
        ("[topic: food]", True),  # all three
        ("[topic: food] and more", True),  # follows, but not clean
        ("[topic: food]", False),  # follows, never stopped
        ("It is about food.", True),  # none
    ]
    j = judge(task, answers, ["[topic: food]"] * 4)
    assert (j.follows, j.clean, j.exact) == (3, 1, 2)


def test_following_a_format_ends_at_a_word_boundary():
    shout, tag = TASKS["shout"], TASKS["tag"]
    assert shout.follows("NICKEL") and shout.follows("NICKEL is a metal.")
    assert not shout.follows("The metal is a metal")  # "T" alone is not a word in capitals
    assert not shout.follows("I can think of a bird.")  # "I": a pronoun, not the answer
    assert tag.follows("[topic: food] and more") and not tag.follows("[topic: foods")
