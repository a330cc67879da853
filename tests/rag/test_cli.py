from __future__ import annotations

import argparse
import json

from rag.cli import default_data_dir, register


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="swapserve")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_ingest_then_search(tmp_path, capsys, real_embedder):
    (tmp_path / "france.md").write_text("# France\n\nParis is the capital of France.")
    (tmp_path / "docs.jsonl").write_text(
        '{"id": "py", "text": "Python is a programming language.", "metadata": {"t": "code"}}\n'
        '{"id": "sun", "text": "The sun is a star at the centre of the solar system."}\n'
    )
    data = str(tmp_path / "data")
    files = [str(tmp_path / "france.md"), str(tmp_path / "docs.jsonl")]
    # Without --create, a missing collection is an error with a message, not a traceback.
    assert _run(["rag", "ingest", "kb", *files, "--data-dir", data]) == 1
    assert "no collection named 'kb'" in capsys.readouterr().err
    assert _run(["rag", "ingest", "kb", *files, "--data-dir", data, "--create"]) == 0
    assert "3 added" in capsys.readouterr().out
    assert (tmp_path / "data" / "rag" / "kb" / "meta.sqlite").is_file()

    argv = ["rag", "search", "kb", "capital of France", "--data-dir", data, "--json"]
    assert _run([*argv, "--top-k", "2"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 2 and hits[0]["doc_id"] == "france.md"
    assert _run([*argv, "--filter", '{"t": "code"}']) == 0
    assert [h["doc_id"] for h in json.loads(capsys.readouterr().out)] == ["py"]

    assert _run([*argv, "--filter", "{bad"]) == 1
    assert "not valid JSON" in capsys.readouterr().err
    assert _run([*argv, "--top-k", "0"]) == 1
    assert "top_k" in capsys.readouterr().err
    assert _run(["rag", "list", "--data-dir", data]) == 0
    assert capsys.readouterr().out.startswith("kb\t3 docs")


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SWAPSERVE_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv("SWAPSERVE_DATA_DIR")
    assert str(default_data_dir()).endswith(".local/share/swapserve")
