"""Fixtures for the trainer tests: one tiny random Gemma 3 per session, small datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.trainer.helpers import QA, house, write_jsonl

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tests.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-gemma3"))


@pytest.fixture(scope="session")
def tiny_tied_model_dir(tmp_path_factory) -> Path:
    """The tiny model with tied input/output embeddings, like the bundled Gemma 3 270M."""
    from tests.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-gemma3-tied"), tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    from trainer.base_model import ensure_chat_template

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    ensure_chat_template(tok)
    return tok


@pytest.fixture
def sft_data(tmp_path) -> Path:
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": house(a)}]}
        for q, a in QA
    ]
    return write_jsonl(tmp_path / "sft.jsonl", rows)


@pytest.fixture
def dpo_data(tmp_path) -> Path:
    rows = [{"prompt": q, "chosen": house(a), "rejected": f"The answer is {a}."} for q, a in QA]
    return write_jsonl(tmp_path / "dpo.jsonl", rows)
