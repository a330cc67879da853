"""Errors raised by the RAG module.

Every error carries a ``status`` hint (the HTTP status the server should answer with) and a
short machine-readable ``code``, so the HTTP layer maps them without guessing:
``except RAGError as e: return error_response(e.status, str(e), code=e.code)``.
"""

from __future__ import annotations


class RAGError(Exception):
    """Base class of every error raised by ``rag``."""

    status: int = 400
    code: str = "rag_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        # Which request field was at fault, for the OpenAI-style error body.
        self.param = param


class NotFound(RAGError):
    status = 404
    code = "not_found"


class CollectionNotFound(NotFound):
    code = "collection_not_found"


class DocumentNotFound(NotFound):
    code = "document_not_found"


class AlreadyExists(RAGError):
    status = 409
    code = "already_exists"


class CollectionExists(AlreadyExists):
    code = "collection_exists"


class InvalidArgument(RAGError):
    """A malformed request: bad name, top_k out of range, bad filter syntax."""

    status = 400
    code = "invalid_argument"


class InvalidName(InvalidArgument):
    code = "invalid_name"


class InvalidFilter(InvalidArgument):
    code = "invalid_filter"


class UnknownFilterField(RAGError):
    """The filter parsed, but names a metadata field that no document has."""

    status = 422
    code = "unknown_filter_field"


class InvalidDocument(RAGError):
    """Input that parsed as a request but is not a usable document (empty, not UTF-8...)."""

    status = 422
    code = "invalid_document"


class DocumentTooLarge(RAGError):
    status = 413
    code = "document_too_large"


class EmbedderMismatch(RAGError):
    """The collection was built with another embedding model: its vectors are incomparable."""

    status = 409
    code = "embedder_mismatch"


class CorruptCollection(RAGError):
    """On-disk state that cannot be recovered automatically."""

    status = 500
    code = "corrupt_collection"
