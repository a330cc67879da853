"""The short soak, in CI: the real server on the tiny random model under locust, with
adapter churn through both route families, an A/B split with feedback whose arms are
churned, documents, a training job, a scoped key trying admin calls, and one SIGKILL mid-run. Every answer is checked against its
adapter's marker and every acknowledged write against what the restarted server holds.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

if importlib.util.find_spec("locust") is None:  # the `loadtest` extra (make test installs it)
    pytest.skip("locust is not installed (pip install .[loadtest])", allow_module_level=True)

from loadtests.soak.run import Config, Soak  # noqa: E402


@pytest.fixture(scope="module")
def soak(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    results = tmp_path_factory.mktemp("soak-results")
    cfg = Config(
        duration_s=90,
        users=8,
        base_model=str(tiny_model_path),
        tiny=True,
        results=results,
        sample_every_s=2.0,
        seed=1,
    )
    summary = Soak(cfg, tmp_path_factory.mktemp("soak-work")).run()
    print(summary["text"])
    return {**summary, "results": results}


def verdict(soak: dict, starts: str) -> dict:
    found = [v for v in soak["verdicts"] if v["goal"].startswith(starts)]
    assert found, f"no verdict {starts!r} in {soak['verdicts']}"
    return found[0]


def test_no_answer_comes_from_the_wrong_adapter(soak):
    v = verdict(soak, "0 answers from the wrong adapter")
    assert v["met"], (v, soak["wrong_answers"][:3])
    assert soak["marker_checked"] > 100
    # the tiny model in float32 decodes a row the same in any batch: every answer is exact
    assert soak["drifted_answers"] == 0, soak["drifted_examples"][:3]
    assert soak["ambiguous_answers"] == 0, soak["ambiguous_examples"][:3]


def test_the_ab_split_under_churn_adds_up(soak):
    v = verdict(soak, "A/B split under churn")
    assert v["met"], v
    split = soak["split"]
    assert soak["split_checked"] > 10
    assert sum(split["rated"].values()) > 0  # feedback was given, and stored
    # answers from both churned arms and the base's: the churn ran under each
    assert all(n > 0 for n in split["answered"].values()), split


def test_no_acknowledged_write_is_lost_across_the_kill(soak):
    assert len(soak["restarts"]) == 1  # the kill happened, and the server came back
    v = verdict(soak, "0 acknowledged writes lost")
    assert v["met"], v


def test_no_5xx_outside_the_restart_window(soak):
    assert verdict(soak, "0 5xx outside")["met"], soak["outcomes"]


def test_the_load_reached_the_queue_limit_and_the_churn_ran(soak):
    outcomes = soak["outcomes"]
    assert outcomes.get("ok", 0) > 50
    assert outcomes.get("429 queue full", 0) > 0  # users above max_num_seqs + max_queue
    churn = soak["churn_outcomes"]
    assert churn.get("ok", 0) > 20
    assert soak["totals"]["adapters_evicted"] > 0  # more adapters than resident


def test_scoped_key_structured_output_and_the_rest_hold(soak):
    for goal in ("the scoped key", "structured and tool", "nothing half-written"):
        v = verdict(soak, goal)
        assert v["met"], v
    assert soak["churn_errors"] == []


def test_report_files(soak):
    results: Path = soak["results"]
    for name in ("soak_outcomes.csv", "soak_minutes.csv", "soak_verdicts.csv",
                 "soak_report.html", "locust.html", "locust_stats.csv"):  # fmt: skip
        assert (results / name).stat().st_size > 0, name
    summary = json.loads((results / "soak_summary.json").read_text())
    assert summary["totals"]["requests"] == soak["totals"]["requests"]
