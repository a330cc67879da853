"""Arms that name no max_tokens get a budget from the references, not the server's 512."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from server.ab.experiments import BUDGET_MARGIN_TOKENS, ExperimentService
from server.ab.models import ExperimentRequest
from server.ab.report import render_report


def service(tmp_path, default_max_tokens=512):
    engine = SimpleNamespace(tokenize=lambda text: text.split())  # one token a word

    async def prepare(req):
        raise asyncio.CancelledError  # nothing runs: only the submitted record matters

    serving = SimpleNamespace(
        ctx=SimpleNamespace(engine=engine, default_max_tokens=default_max_tokens),
        chat=SimpleNamespace(prepare=prepare),
    )
    return ExperimentService(
        tmp_path,
        serving=lambda: serving,
        check_arm=lambda model, rag: None,
        base_model="base",
    )


def submit(svc, body):
    async def go():
        rec = svc.submit(ExperimentRequest.model_validate(body))
        for task in svc.tasks.values():
            task.cancel()
        await asyncio.gather(*svc.tasks.values(), return_exceptions=True)
        return rec

    return asyncio.run(go())


QUESTIONS = [
    {"question": "Who?", "references": ["Ada Lovelace", "the countess of Lovelace"]},
    {"question": "When?", "references": ["1843"]},
]


def test_arms_without_max_tokens_get_the_longest_reference_plus_a_margin(tmp_path):
    svc = service(tmp_path)
    arms = [
        {"name": "base", "model": "base"},
        {"name": "short", "model": "base", "max_tokens": 3},
    ]
    rec = submit(svc, {"questions": QUESTIONS, "arms": arms})
    budget = rec["budget"]
    assert budget["longest_reference_tokens"] == 4  # "the countess of Lovelace"
    assert budget["max_tokens"] == 4 + BUDGET_MARGIN_TOKENS
    assert budget["arms"] == ["base"]
    assert [a["max_tokens"] for a in rec["arms"]] == [4 + BUDGET_MARGIN_TOKENS, 3]
    html = render_report(rec)
    assert "from the references" in html and "the longest reference is 4 tokens" in html


def test_the_budget_never_exceeds_the_server_default_and_a_given_one_wins(tmp_path):
    rec = submit(service(tmp_path, default_max_tokens=6), {"questions": QUESTIONS,
                 "arms": [{"name": "a", "model": "base"}, {"name": "b", "model": "base"}]})  # fmt: skip
    assert [a["max_tokens"] for a in rec["arms"]] == [6, 6]
    rec = submit(service(tmp_path), {"questions": QUESTIONS, "max_tokens": 20,
                 "arms": [{"name": "a", "model": "base"}, {"name": "b", "model": "base"}]})  # fmt: skip
    assert rec["budget"] is None and [a["max_tokens"] for a in rec["arms"]] == [20, 20]
