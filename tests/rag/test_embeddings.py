from __future__ import annotations

import numpy as np
import pytest

from rag.embeddings import Embedder, EmbedderLike, default_model_path, get_embedder
from rag.errors import InvalidArgument


def test_default_model_comes_from_the_package(real_embedder):
    assert (default_model_path() / "model.safetensors").is_file()
    assert real_embedder.name.startswith("all-MiniLM-L6-v2@")
    assert real_embedder.dim == 384
    assert real_embedder.max_seq_length == 256
    assert isinstance(real_embedder, EmbedderLike)


def test_loaded_once_per_process(real_embedder):
    assert get_embedder() is real_embedder


def test_embed_normalised_float32_in_input_order(real_embedder):
    seen = []
    texts = ["a much longer sentence about the weather in Paris today", "cat", "dogs bark"]
    v = real_embedder.embed(texts, batch_size=2, progress=lambda d, t: seen.append((d, t)))
    assert v.dtype == np.float32 and v.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    # Sorting by length for batching must not reorder the output.
    np.testing.assert_allclose(v[1], real_embedder.embed(["cat"])[0], atol=1e-5)
    assert seen == [(2, 3), (3, 3)]
    assert real_embedder.embed([]).shape == (0, 384)


def test_count_tokens_sees_whole_long_text(real_embedder):
    # No truncation at the model's window and no padding.
    assert real_embedder.count_tokens("hello " * 1000) == 1000
    assert real_embedder.count_tokens("hello") == 1
    spans = real_embedder.token_spans("Hi there")
    assert spans == [(0, 2), (3, 8)]


def test_not_a_model_folder_is_refused(tmp_path):
    with pytest.raises(InvalidArgument, match="not a local sentence-transformers folder"):
        Embedder(tmp_path)


def test_model_label_without_loading(tmp_path):
    from rag.embeddings import model_label

    assert model_label(None) == "all-MiniLM-L6-v2"
    assert model_label(default_model_path()) == "all-MiniLM-L6-v2"
    assert model_label(tmp_path / "my-embedder") == "my-embedder"


def test_token_ids_embed_as_their_text(real_embedder):
    """What /v1/embeddings' token arrays rely on: a text's own ids (special tokens left
    out, then added by the embedder) give the text's vector, and are counted alike."""
    texts = ["The reactor runs on frozen lemonade.", "Ünïcode and CAPS", "a"]
    ids = [real_embedder.token_ids(t) for t in texts]
    assert real_embedder.special_tokens == 2  # [CLS] and [SEP]
    for t, i in zip(texts, ids, strict=True):
        assert real_embedder.input_length(t) == len(i) + 2
        assert all(0 <= x < real_embedder.vocab_size for x in i)
    np.testing.assert_allclose(
        real_embedder.embed_token_ids(ids), real_embedder.embed(texts), atol=1e-5
    )
