import argparse
import json
import re

import httpx
import pytest

from tests.trainer.helpers import write_jsonl
from trainer import cli


def parse(argv):
    parser = argparse.ArgumentParser(prog="swapserve")
    cli.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_flags_map_onto_the_job_config(tmp_path):
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps({"seed": 7, "r": 32}))
    args = parse(
        ["train", "dpo", "--data", "d.jsonl", "--name", "n", "--rank", "4", "--lr", "0.001",
         "--max-steps", "5", "--quantization", "none", "--beta", "0.2", "--dora",
         "--target-modules", "q_proj, v_proj", "--config", str(cfg_file)]
    )  # fmt: skip
    config = cli.config_from_args(args)
    assert type(config).__name__ == "DPOJobConfig"
    assert (config.r, config.learning_rate, config.max_steps) == (4, 0.001, 5)
    assert (config.quantization, config.beta, config.use_dora, config.seed) == (
        "none",
        0.2,
        True,
        7,
    )
    assert config.target_modules == ["q_proj", "v_proj"]
    assert config.use_rslora is False  # not given: the config default


def test_base_defaults_to_the_servers(monkeypatch, tmp_path):
    """--base, then the config file, then SWAPSERVE_BASE_MODEL (what the server serves)."""
    argv = ["train", "sft", "--data", "d.jsonl", "--name", "n"]
    monkeypatch.delenv("SWAPSERVE_BASE_MODEL", raising=False)
    assert cli.config_from_args(parse(argv)).base_model is None  # the default bundled model
    monkeypatch.setenv("SWAPSERVE_BASE_MODEL", "gemma3-270m")
    assert cli.config_from_args(parse(argv)).base_model == "gemma3-270m"
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps({"base_model": "/models/a"}))
    assert cli.config_from_args(parse([*argv, "--config", str(cfg_file)])).base_model == "/models/a"
    assert cli.config_from_args(parse([*argv, "--base", "/models/b"])).base_model == "/models/b"


def test_default_output_root(monkeypatch, tmp_path):
    monkeypatch.setenv("SWAPSERVE_DATA_DIR", str(tmp_path))
    assert cli.default_data_dir() == tmp_path


def test_dry_run_prints_loss_mask(tiny_model_dir, sft_data, capsys):
    code = cli.main(
        ["train", "sft", "--data", str(sft_data), "--name", "x", "--base", str(tiny_model_dir),
         "--dry-run"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "examples: 8 (chat)" in out
    assert "[[" in out and "<end_of_turn>" in out and "carry loss" in out


def test_bad_data_and_bad_flags_exit_2_with_the_line(tiny_model_dir, tmp_path, capsys):
    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": 3}],
    )
    code = cli.main(
        ["train", "sft", "--data", str(bad), "--name", "x", "--base", str(tiny_model_dir),
         "--dry-run"]
    )  # fmt: skip
    assert code == 2
    assert "line 2: prompt:" in capsys.readouterr().err
    code = cli.main(["train", "sft", "--data", str(bad), "--name", "x", "--rank", "0"])
    assert code == 2
    assert "r: 0 is out of range" in capsys.readouterr().err


def test_train_in_foreground_and_register_with_server(
    tiny_model_dir, sft_data, tmp_path, monkeypatch, capsys
):
    calls = []

    def fake_post(url, json=None, headers=None, timeout=None):
        calls.append({"url": url, "json": json, "headers": headers})
        return httpx.Response(201, json={"name": json["name"]}, request=httpx.Request("POST", url))

    monkeypatch.setattr(httpx, "post", fake_post)
    out = tmp_path / "adapter"
    code = cli.main(
        ["train", "sft", "--data", str(sft_data), "--name", "house", "--base", str(tiny_model_dir),
         "--quantization", "none", "--device", "cpu", "--rank", "4", "--max-steps", "2",
         "--eval-fraction", "0", "--output-dir", str(out), "--server", "http://srv:8000/",
         "--api-key", "sk-test"]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    assert (out / "adapter_model.safetensors").is_file()
    assert f"adapter: {out}" in printed and "registered 'house'" in printed
    assert calls == [
        {
            "url": "http://srv:8000/adapters",
            "json": {"name": "house", "path": str(out.resolve())},
            "headers": {"Authorization": "Bearer sk-test"},
        }
    ]


def test_server_refusal_is_reported(monkeypatch, tmp_path, capsys):
    def refuse(url, json=None, headers=None, timeout=None):
        return httpx.Response(409, text='{"error": {"message": "exists"}}')

    monkeypatch.setattr(httpx, "post", refuse)
    assert cli.register_with_server("http://srv", "a", tmp_path) == 1
    assert "409" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_help_lists_fields(method, capsys):
    with pytest.raises(SystemExit):
        parse(["train", method, "--help"])
    assert "--rank" in capsys.readouterr().out


def test_progress_bar_shows_the_eval_loss(tiny_model_dir, sft_data, tmp_path, capsys):
    # an eval every step: the bar's postfix carries the eval loss next to the train loss
    code = cli.main(
        ["train", "sft", "--data", str(sft_data), "--name", "evalbar", "--base",
         str(tiny_model_dir), "--quantization", "none", "--device", "cpu", "--rank", "4",
         "--max-steps", "2", "--eval-fraction", "0.25", "--eval-steps", "1",
         "--eval-max-examples", "0", "--output-dir", str(tmp_path / "adapter")]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0
    shown = re.findall(r"eval_loss=([0-9.]+)", err)
    assert shown, err[-2000:]
    assert all(float(v) > 0 for v in shown)
    # the train loss is shown beside it
    assert re.search(r"loss=[0-9.]+, eval_loss=", err)
