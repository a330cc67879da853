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


def test_ingest_honours_the_servers_document_limit(tmp_path, capsys, monkeypatch, real_embedder):
    from server.config import Settings

    (tmp_path / "small.md").write_text("Small notes fit. " * 5)  # 85 bytes
    (tmp_path / "big.md").write_text("Big notes do not. " * 20)  # 360 bytes
    files = [str(tmp_path / "small.md"), str(tmp_path / "big.md")]
    data = tmp_path / "data"
    argv = ["rag", "ingest", "kb", *files, "--data-dir", str(data), "--create"]
    monkeypatch.setenv("SWAPSERVE_RAG_MAX_DOC_BYTES", "200")
    # The server reads the very same variable.
    assert Settings().rag_max_doc_bytes == 200

    assert _run(argv) == 1
    err = capsys.readouterr().err
    assert "'big.md' is 360 bytes; the limit is 200" in err
    # All or nothing, as over HTTP: not even the collection was created.
    assert not (data / "rag" / "kb").exists()

    # The flag wins over the variable.
    assert _run([*argv, "--max-doc-bytes", "400"]) == 0
    assert "2 added" in capsys.readouterr().out

    monkeypatch.setenv("SWAPSERVE_RAG_MAX_DOC_BYTES", "2k")
    assert _run(argv) == 1
    assert "SWAPSERVE_RAG_MAX_DOC_BYTES='2k' is not an integer" in capsys.readouterr().err
    monkeypatch.setenv("SWAPSERVE_RAG_MAX_DOC_BYTES", "0")
    assert _run(argv) == 1
    assert "below the minimum 1" in capsys.readouterr().err


def test_store_limits_follow_the_server_settings(monkeypatch):
    from rag.cli import store_limits
    from server.config import Settings

    monkeypatch.delenv("SWAPSERVE_RAG_MAX_DOC_BYTES", raising=False)
    monkeypatch.delenv("SWAPSERVE_RAG_APPROX_THRESHOLD", raising=False)
    defaults, settings = store_limits(), Settings()
    assert defaults["max_doc_bytes"] == settings.rag_max_doc_bytes
    assert defaults["index_config"].approx_threshold == settings.rag_approx_threshold

    monkeypatch.setenv("SWAPSERVE_RAG_MAX_DOC_BYTES", "1234")
    monkeypatch.setenv("SWAPSERVE_RAG_APPROX_THRESHOLD", "500")
    limits, settings = store_limits(), Settings()
    assert limits["max_doc_bytes"] == settings.rag_max_doc_bytes == 1234
    assert limits["index_config"].approx_threshold == settings.rag_approx_threshold == 500
