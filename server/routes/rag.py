"""Retrieval collections over HTTP: create, list, ingest (JSON or files), search, delete.

Thin routes: each validates its input with pydantic and calls the `rag` package's public
API through `RetrievalService.run` (a worker thread: all of it blocks). `rag`'s errors
carry their own status, code and param, and become the OpenAI error shape in
server/errors.py. Every ingest is parsed and checked in full before anything is written,
so a refused request changes nothing stored.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile

from rag.chunking import ChunkingConfig
from rag.collection import CollectionInfo, DocumentInput, read_info
from rag.errors import CollectionNotFound, InvalidDocument, NotFound
from rag.store import documents_from_bytes, validate_name
from server.auth import current_key, require_collection
from server.errors import APIError
from server.openapi import request_body
from server.retrieval import RetrievalService
from server.schemas import (
    NAME_PATTERN,
    Collection,
    CollectionList,
    CreateCollection,
    Deleted,
    Document,
    DocumentList,
    ErrorResponse,
    IngestDocuments,
    IngestFiles,
    IngestResult,
    SearchHit,
    SearchRequest,
    SearchResult,
)
from server.state import RetrievalDep


def _allowed_collection(request: Request) -> None:
    """A key with a collection allow-list sees other collections as missing (404)."""
    name = request.path_params.get("name")
    if name is not None:
        require_collection(name)


router = APIRouter(prefix="/rag", tags=["rag"], dependencies=[Depends(_allowed_collection)])
# searching is an inference call (scope chosen in create_app); everything else writes
search_router = APIRouter(prefix="/rag", tags=["rag"], dependencies=[Depends(_allowed_collection)])

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 404, 409, 413, 415, 422, 503)
}

MAX_FILES = 1000


# The pattern is documented, and checked by rag.store.validate_name (its 400 says why).
CollectionName = Annotated[
    str,
    Path(description="The collection's name.", json_schema_extra={"pattern": NAME_PATTERN}),
]


def collection_out(info: CollectionInfo) -> Collection:
    return Collection(
        id=info.name,
        embedder=info.embedder_name,
        dim=info.dim,
        created_at=info.created_at,
        documents=info.documents,
        chunks=info.chunks,
        index_kind=info.index_kind,
        chunk_tokens=info.chunk_tokens,
        overlap=info.overlap,
    )


# --- collections --------------------------------------------------------------------------


def _info(rag: RetrievalService, name: str) -> CollectionInfo:
    # Read from the metadata store: no need to load the index or the embedding model.
    try:
        return read_info(rag.store.root / validate_name(name))
    except NotFound as exc:
        raise CollectionNotFound(f"no collection named {name!r}", param="name") from exc


@router.post("/collections", status_code=201, response_model=Collection, responses=ERRORS)
async def create_collection(body: CreateCollection, rag: RetrievalDep) -> Collection:
    chunking = None
    if body.chunk_tokens is not None or body.overlap is not None:
        default = ChunkingConfig()
        chunking = ChunkingConfig(
            chunk_tokens=body.chunk_tokens or default.chunk_tokens,
            overlap=default.overlap if body.overlap is None else body.overlap,
        )
        chunking.validate()
    coll = await rag.run(rag.store.create, body.name, chunking=chunking)
    return collection_out(await rag.run(coll.info))


@router.get("/collections", response_model=CollectionList)
async def list_collections(rag: RetrievalDep) -> CollectionList:
    infos = await rag.run(rag.store.list)
    key = current_key()
    if key is not None:
        infos = [i for i in infos if key.allows_collection(i.name)]
    return CollectionList(data=[collection_out(i) for i in infos])


@router.get("/collections/{name}", response_model=Collection, responses=ERRORS)
async def get_collection(name: CollectionName, rag: RetrievalDep) -> Collection:
    return collection_out(await rag.run(_info, rag, name))


@router.delete("/collections/{name}", response_model=Deleted, responses=ERRORS)
async def delete_collection(name: CollectionName, rag: RetrievalDep) -> Deleted:
    await rag.run(rag.store.delete, name)
    return Deleted(id=name, object="rag.collection")


# --- documents ----------------------------------------------------------------------------


_INGEST_BODY = request_body(json=IngestDocuments, multipart=IngestFiles)


def _text_id(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


async def _json_documents(request: Request) -> list[DocumentInput]:
    try:
        body = IngestDocuments.model_validate_json(await request.body())
    except ValidationError as exc:
        # the app's handler turns it into a 400 naming the field (documents.0.text)
        raise RequestValidationError(exc.errors()) from exc
    return [
        DocumentInput(
            id=d.id if d.id is not None else _text_id(d.text), text=d.text, metadata=d.metadata
        )
        for d in body.documents
    ]


async def _file_documents(request: Request, rag: RetrievalService) -> list[DocumentInput]:
    form = await request.form(max_files=MAX_FILES)
    try:
        return await _parse_form(form, rag)
    finally:
        await form.close()


async def _parse_form(form: FormData, rag: RetrievalService) -> list[DocumentInput]:
    metadata: dict[str, Any] | None = None
    raw_meta = form.get("metadata")
    if isinstance(raw_meta, str) and raw_meta.strip():
        try:
            metadata = json.loads(raw_meta)
        except json.JSONDecodeError as exc:
            raise APIError(400, f"metadata is not valid JSON: {exc}", param="metadata") from exc
        if not isinstance(metadata, dict):
            raise APIError(400, "metadata must be a JSON object", param="metadata")
    uploads = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
    if not uploads:
        raise APIError(
            400, "no files in the multipart body; send them as `files` parts", param="files"
        )
    docs: list[DocumentInput] = []
    for up in uploads:
        data = await up.read()
        # Parsing decodes and splits; cheap next to embedding, but not free on big files.
        docs += await rag.run(
            documents_from_bytes,
            data,
            up.filename or "upload.txt",
            max_doc_bytes=rag.store.max_doc_bytes,
            metadata=metadata,
        )
    return docs


@router.post(
    "/collections/{name}/documents",
    response_model=IngestResult,
    responses=ERRORS,
    openapi_extra=_INGEST_BODY,
)
async def add_documents(name: CollectionName, request: Request, rag: RetrievalDep) -> IngestResult:
    """Add documents as JSON (`{"documents": [{id?, text, metadata?}]}`) or as uploaded
    files (multipart, one or more `files` parts). All or nothing: one bad document or
    file refuses the whole request. An existing id is replaced; identical text and
    metadata are left as they are (`unchanged`), without re-embedding."""
    validate_name(name)
    if not await rag.run(rag.store.exists, name):
        # Before reading the body: a large upload to a typo'd name fails fast.
        raise CollectionNotFound(f"no collection named {name!r}", param="name")
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        docs = await _file_documents(request, rag)
    elif content_type.startswith("application/json") or not content_type:
        docs = await _json_documents(request)
    else:
        raise APIError(
            415,
            f"unsupported content type {content_type!r}: send application/json or "
            "multipart/form-data",
            code="unsupported_media_type",
        )
    if not docs:
        raise InvalidDocument("no documents given", param="documents")
    if len(docs) > rag.max_docs_per_request:
        raise APIError(
            413,
            f"{len(docs)} documents in one request, over the limit of "
            f"{rag.max_docs_per_request} (SWAPSERVE_RAG_MAX_DOCS_PER_REQUEST): send them in "
            "several requests",
            param="documents",
            code="too_many_documents",
        )
    result = await rag.run(rag.store.add_documents, name, docs)
    info = await rag.run(_info, rag, name)
    return IngestResult(
        collection=name,
        ids=[d.id for d in docs],
        added=len(result.added),
        replaced=len(result.replaced),
        unchanged=len(result.unchanged),
        metadata_updated=len(result.metadata_updated),
        chunks=result.chunks_written,
        documents=info.documents,
    )


@router.get("/collections/{name}/documents", response_model=DocumentList, responses=ERRORS)
async def list_documents(
    name: CollectionName,
    rag: RetrievalDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> DocumentList:
    coll = await rag.run(rag.store.get, name)
    rows = await rag.run(coll.documents, limit=limit, offset=offset)
    return DocumentList(data=[Document(**r) for r in rows])


@router.delete(
    "/collections/{name}/documents/{doc_id:path}", response_model=Deleted, responses=ERRORS
)
async def delete_document(name: CollectionName, doc_id: str, rag: RetrievalDep) -> Deleted:
    coll = await rag.run(rag.store.get, name)
    await rag.run(coll.delete_document, doc_id)
    return Deleted(id=doc_id, object="rag.document")


# --- search -------------------------------------------------------------------------------


@search_router.post("/collections/{name}/search", response_model=SearchResult, responses=ERRORS)
async def search(name: CollectionName, body: SearchRequest, rag: RetrievalDep) -> SearchResult:
    hits = await rag.run(
        rag.store.search,
        name,
        body.query,
        top_k=body.top_k,
        min_score=body.min_score,
        filter=body.filter,
    )
    return SearchResult(
        collection=name,
        data=[
            SearchHit(
                score=h.score,
                doc_id=h.doc_id,
                chunk_index=h.chunk_index,
                text=h.text,
                char_start=h.char_start,
                char_end=h.char_end,
                metadata=h.metadata,
            )
            for h in hits
        ],
    )
