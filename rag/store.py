"""Many named collections under one folder, and helpers to turn files into documents.

``CollectionStore(root, embedder)`` is what the HTTP layer and the CLI hold: one per
process, sharing one embedder. Collections are opened lazily and kept open.
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rag.chunking import ChunkingConfig
from rag.collection import (
    AddResult,
    Collection,
    CollectionInfo,
    DocumentInput,
    Hit,
    IndexConfig,
    check_index_file,
    read_info,
    validate_top_k,
)
from rag.embeddings import EmbedderLike, ProgressFn
from rag.errors import (
    CollectionExists,
    CollectionNotFound,
    CorruptCollection,
    DocumentTooLarge,
    InvalidDocument,
    InvalidName,
    NotFound,
)

logger = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEFAULT_MAX_DOC_BYTES = 2 * 1024 * 1024
FORMATS = ("json", "jsonl", "text", "markdown")
_EXTENSIONS = {
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".txt": "text",
    ".text": "text",
    ".md": "markdown",
    ".markdown": "markdown",
}


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidName(
            f"invalid collection name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            param="name",
        )
    return name


def _decode(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8-sig")  # tolerate a BOM, which editors add on Windows
    except UnicodeDecodeError as e:
        raise InvalidDocument(
            f"{source}: not valid UTF-8 (byte {e.start}: {data[e.start : e.start + 1]!r}); "
            "convert the file to UTF-8",
            param="file",
        ) from e


def _record(obj: Any, source: str, default_id: str) -> DocumentInput:
    if not isinstance(obj, dict):
        raise InvalidDocument(f"{source}: each record must be an object with a 'text' field")
    unknown = set(obj) - {"id", "text", "metadata"}
    if unknown:
        raise InvalidDocument(
            f"{source}: unknown field(s) {sorted(unknown)}; records have id?, text, metadata?"
        )
    text = obj.get("text")
    if not isinstance(text, str):
        raise InvalidDocument(f"{source}: 'text' must be a string", param="text")
    doc_id = obj.get("id", default_id)
    if isinstance(doc_id, int) and not isinstance(doc_id, bool):
        doc_id = str(doc_id)
    if not isinstance(doc_id, str):
        raise InvalidDocument(f"{source}: 'id' must be a string", param="id")
    metadata = obj.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise InvalidDocument(f"{source}: 'metadata' must be an object", param="metadata")
    return DocumentInput(id=doc_id, text=text, metadata=metadata)


def documents_from_bytes(
    data: bytes,
    filename: str,
    *,
    format: str | None = None,
    max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES,
    metadata: dict[str, Any] | None = None,
) -> list[DocumentInput]:
    """Parse an uploaded or local file into documents.

    - ``.json``: a list of ``{id?, text, metadata?}`` (ids default to ``<file>#<n>``);
    - ``.jsonl``: one such object per line;
    - ``.txt``/``.md``: one document whose id is the file name.

    ``format`` overrides the extension (one of ``FORMATS``). Each document's text may be
    at most ``max_doc_bytes`` bytes of UTF-8. ``metadata`` is merged under each record's.
    """
    name = Path(filename).name
    fmt = format or _EXTENSIONS.get(Path(filename).suffix.lower())
    if fmt not in FORMATS:
        raise InvalidDocument(
            f"{name}: unknown format; use one of {sorted(_EXTENSIONS)} or pass format= "
            f"(one of {list(FORMATS)})",
            param="format",
        )
    text = _decode(data, name)
    base_meta = {"source": name, **(metadata or {})}
    docs: list[DocumentInput] = []
    if fmt in ("text", "markdown"):
        docs.append(DocumentInput(id=name, text=text, metadata=base_meta))
    elif fmt == "json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise InvalidDocument(f"{name}: invalid JSON ({e})", param="file") from e
        if not isinstance(obj, list):
            raise InvalidDocument(f"{name}: expected a JSON list of documents", param="file")
        for i, rec in enumerate(obj):
            docs.append(_record(rec, f"{name} item {i}", f"{name}#{i}"))
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidDocument(f"{name} line {lineno}: invalid JSON ({e})") from e
            docs.append(_record(rec, f"{name} line {lineno}", f"{name}#{lineno}"))
    if fmt in ("json", "jsonl"):
        docs = [DocumentInput(d.id, d.text, {**base_meta, **d.metadata}) for d in docs]
    if not docs:
        raise InvalidDocument(f"{name}: contains no documents", param="file")
    for d in docs:
        check_document(d, max_doc_bytes)
    return docs


def check_document(doc: DocumentInput, max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES) -> None:
    if not isinstance(doc.text, str) or not doc.text.strip():
        raise InvalidDocument(f"document {doc.id!r} is empty", param="text")
    size = len(doc.text.encode("utf-8"))
    if size > max_doc_bytes:
        raise DocumentTooLarge(
            f"document {doc.id!r} is {size} bytes; the limit is {max_doc_bytes} "
            "(split it, or raise max_doc_bytes)",
            param="text",
        )


class CollectionStore:
    """Named collections under ``root_dir``, all using one embedder."""

    def __init__(
        self,
        root_dir: str | Path,
        embedder: EmbedderLike,
        *,
        max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES,
        chunking: ChunkingConfig | None = None,
        index_config: IndexConfig | None = None,
    ) -> None:
        self.root = Path(root_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.embedder = embedder
        self.max_doc_bytes = max_doc_bytes
        self.chunking = chunking or ChunkingConfig()
        self.chunking.validate()
        self.index_config = index_config or IndexConfig()
        self._open: dict[str, Collection] = {}
        # Guards _open and create/delete; per-collection work has its own lock.
        self._lock = threading.Lock()

    @property
    def quarantine(self) -> Path:
        # a name no collection can have (names start with a letter or digit)
        return self.root / ".quarantine"

    def recover(self) -> builtins.list[str]:
        """At start: check every collection from its metadata, and set aside what is broken
        so the rest keep serving. Returns what was quarantined, as log-ready lines.

        - Metadata (SQLite) unreadable: nothing can be rebuilt from it, so the whole folder
          moves to ``<root>/.quarantine/`` and the collection is gone from the list.
        - Index file missing, or failing the checksum the metadata holds: the file moves to
          quarantine, and the index is rebuilt from the vectors stored in SQLite when the
          collection is next opened (no document is lost).
        """
        done: builtins.list[str] = []
        for p in sorted(self.root.iterdir()):
            if not (p.is_dir() and NAME_RE.match(p.name) and (p / "meta.sqlite").is_file()):
                continue
            try:
                index_file, problem = check_index_file(p)
            except CorruptCollection as exc:
                dest = self._set_aside(p, p.name)
                logger.error(
                    "collection %s quarantined at start-up: %s; moved to %s",
                    p.name,
                    exc.message,
                    dest,
                )
                done.append(f"{p.name}: {exc.message}")
                continue
            if problem is not None and index_file is not None:
                dest = self._set_aside(index_file, f"{p.name}-{index_file.name}")
                logger.error(
                    "collection %s: %s; quarantined to %s, the index will be rebuilt from the "
                    "stored vectors when the collection is next opened",
                    p.name,
                    problem,
                    dest if dest.exists() else "(nothing: the file is missing)",
                )
                done.append(f"{p.name}: {problem}")
        return done

    def _set_aside(self, path: Path, label: str) -> Path:
        self.quarantine.mkdir(parents=True, exist_ok=True)
        dest = self.quarantine / f"{label}-{int(time.time())}"
        if path.exists():
            os.replace(path, dest)
        return dest

    def _path(self, name: str) -> Path:
        return self.root / validate_name(name)

    def create(self, name: str, *, chunking: ChunkingConfig | None = None) -> Collection:
        path = self._path(name)
        with self._lock:
            if path.exists():
                raise CollectionExists(f"collection {name!r} already exists", param="name")
            try:
                coll = Collection.create(
                    path,
                    self.embedder,
                    chunking=chunking or self.chunking,
                    index_config=self.index_config,
                )
            except FileExistsError as e:  # another process created it since the check
                raise CollectionExists(f"collection {name!r} already exists", param="name") from e
            self._open[name] = coll
            logger.info("created collection %s (embedder %s)", name, self.embedder.name)
            return coll

    def get(self, name: str) -> Collection:
        path = self._path(name)
        with self._lock:
            coll = self._open.get(name)
            if coll is not None:
                return coll
            try:
                coll = Collection.open(path, self.embedder, index_config=self.index_config)
            except NotFound as e:
                raise CollectionNotFound(f"no collection named {name!r}", param="name") from e
            self._open[name] = coll
            return coll

    def get_or_create(self, name: str) -> Collection:
        try:
            return self.get(name)
        except CollectionNotFound:
            return self.create(name)

    def exists(self, name: str) -> bool:
        return (self._path(name) / "meta.sqlite").is_file()

    def list(self) -> list[CollectionInfo]:
        """Info of every collection, read from metadata only (no index or embedder load)."""
        out = []
        for p in sorted(self.root.iterdir()):
            if p.is_dir() and NAME_RE.match(p.name) and (p / "meta.sqlite").is_file():
                try:
                    out.append(read_info(p))
                except Exception:  # one broken collection must not hide the others
                    logger.exception("cannot read collection %s", p.name)
        return out

    def delete(self, name: str) -> None:
        path = self._path(name)
        with self._lock:
            if not (path / "meta.sqlite").is_file():
                raise CollectionNotFound(f"no collection named {name!r}", param="name")
            coll = self._open.pop(name, None)
            if coll is not None:
                coll.close()
            # Rename first so a crash mid-delete never leaves a half-deleted collection
            # that still looks valid under its name.
            trash = self.root / f".deleted-{name}"
            shutil.rmtree(trash, ignore_errors=True)
            path.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
            logger.info("deleted collection %s", name)

    def close(self) -> None:
        with self._lock:
            for coll in self._open.values():
                coll.close()
            self._open.clear()

    # ---------------------------------------------------------------- ingest / search

    def add_documents(
        self,
        name: str,
        docs: Sequence[DocumentInput],
        *,
        progress: ProgressFn | None = None,
    ) -> AddResult:
        for d in docs:
            check_document(d, self.max_doc_bytes)
        return self.get(name).add_documents(docs, progress=progress)

    def ingest_records(
        self,
        name: str,
        records: Iterable[dict[str, Any]],
        *,
        progress: ProgressFn | None = None,
    ) -> AddResult:
        """Records as parsed from a JSON request body: ``[{id?, text, metadata?}, ...]``."""
        docs = [_record(r, f"record {i}", f"doc-{i}") for i, r in enumerate(records)]
        if not docs:
            raise InvalidDocument("no documents given", param="documents")
        return self.add_documents(name, docs, progress=progress)

    def ingest_bytes(
        self,
        name: str,
        data: bytes,
        filename: str,
        *,
        format: str | None = None,
        progress: ProgressFn | None = None,
    ) -> AddResult:
        docs = documents_from_bytes(data, filename, format=format, max_doc_bytes=self.max_doc_bytes)
        return self.add_documents(name, docs, progress=progress)

    def ingest_files(
        self,
        name: str,
        paths: Sequence[str | Path],
        *,
        progress: ProgressFn | None = None,
    ) -> AddResult:
        """Parse every file first (so one bad file adds nothing), then add in one batch."""
        docs: builtins.list[DocumentInput] = []
        for p in paths:
            p = Path(p)
            try:
                data = p.read_bytes()
            except OSError as e:
                raise NotFound(f"cannot read {p}: {e.strerror}", param="file") from e
            docs += documents_from_bytes(data, p.name, max_doc_bytes=self.max_doc_bytes)
        return self.add_documents(name, docs, progress=progress)

    def search(
        self,
        name: str,
        query: str,
        *,
        top_k: int = 5,
        min_score: float | None = None,
        filter: dict[str, Any] | None = None,
    ) -> builtins.list[Hit]:
        validate_top_k(top_k)
        return self.get(name).search(query, top_k=top_k, min_score=min_score, filter=filter)
