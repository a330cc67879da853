"""`swapserve train compare` on the tiny model: every method as its own job, one table and
one HTML report; a method that would be refused stops the comparison before any job."""

from __future__ import annotations

import json

from tests.trainer.helpers import QA, house, write_jsonl
from trainer import cli


def test_compare_runs_each_method_and_writes_the_table(
    tiny_model_dir, sft_data, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("SWAPSERVE_DATA_DIR", str(tmp_path / "data"))
    eval_rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": house(a)}]}
        for q, a in QA[:3]
    ]
    eval_file = write_jsonl(tmp_path / "eval.jsonl", eval_rows)
    report_dir = tmp_path / "report"
    code = cli.main(
        ["train", "compare", "--data", str(sft_data), "--eval-file", str(eval_file),
         "--methods", "lora,ia3,full", "--base", str(tiny_model_dir), "--device", "cpu",
         "--max-steps", "3", "--max-length", "128", "--eval-max-examples", "2",
         "--eval-max-new-tokens", "4", "--prefix", "t", "--report-dir", str(report_dir)]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    record = json.loads((report_dir / "compare.json").read_text())
    labels = [r["label"] for r in record["rows"]]
    assert labels[:3] == ["lora", "ia3", "full"]
    assert labels[3].startswith("full -> LoRA (SVD")
    assert labels[4].startswith("base (")
    by = {r["label"]: r for r in record["rows"]}
    for m in ("lora", "ia3", "full"):
        row = by[m]
        assert row["state"] == "succeeded"
        assert row["trainable"] > 0 and row["adapter_bytes"] > 0 and row["peak_rss_bytes"] > 0
        assert row["eval_loss"] is not None and row["token_f1"] is not None
        assert row["steps"] == 3
    # the methods' own learning rates; the shared budget
    assert by["ia3"]["learning_rate"] > by["lora"]["learning_rate"] > by["full"]["learning_rate"]
    assert by["full"]["trainable_pct"] == 100.0
    assert by["ia3"]["trainable"] < by["lora"]["trainable"]
    extracted = record["rows"][3]
    assert extracted["adapter_bytes"] < by["full"]["adapter_bytes"]  # a LoRA vs a model folder
    assert extracted["serving_note"] == "no --server to measure on"
    assert (tmp_path / "data" / "trained" / "t-ia3" / "adapter_config.json").is_file()
    assert (tmp_path / "data" / "models" / "t-full" / "config.json").is_file()
    table = (report_dir / "compare.md").read_text()
    assert table.splitlines()[0].startswith("| method | trainable params | % of base |")
    assert "| `ia3` |" in table and table in out
    html = (report_dir / "report.html").read_text()
    assert html.startswith("<!doctype html>") and "Trainable parameters" in html


def test_compare_refuses_before_any_job(tiny_model_dir, sft_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SWAPSERVE_DATA_DIR", str(tmp_path / "data"))
    common = ["train", "compare", "--data", str(sft_data), "--eval-file", str(sft_data),
              "--base", str(tiny_model_dir), "--max-length", "128"]  # fmt: skip
    assert cli.main([*common, "--methods", "lora,sgd"]) == 2
    assert "methods: 'sgd' is not a method" in capsys.readouterr().err
    bad = tmp_path / "per-method.json"
    bad.write_text(json.dumps({"prompt_tuning": {"num_virtual_tokens": 500}}))
    code = cli.main([*common, "--methods", "lora,prompt_tuning", "--method-config", str(bad)])
    assert code == 2
    assert "num_virtual_tokens: method prompt_tuning:" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()  # no job folder, no adapter


def test_serving_reports_the_median_run_and_a_refusal_over_any_figure():
    from trainer.compare import median_run

    runs = [{"tok_s": 90.0}, {"tok_s": 60.0}, {"tok_s": 75.0}]
    got = median_run(runs)
    assert got["tok_s"] == 75.0 and got["runs_tok_s"] == [90.0, 60.0, 75.0]
    refused = {"tok_s": None, "error": "not served: 400"}
    assert median_run([{"tok_s": 80.0}, refused, {"tok_s": 70.0}]) == refused
