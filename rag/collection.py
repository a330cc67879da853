"""A collection: a FAISS index of chunk vectors + a SQLite store of documents and chunks.

On disk, one folder::

    meta.sqlite              collection info, documents, chunks (text + float32 vector)
    index-<generation>.faiss the FAISS index, written with faiss.serialize_index

Nothing is pickled. The SQLite ``info`` table records which index generation (and its
SHA-256) matches the committed metadata, which makes a write crash-safe:

1. ``BEGIN IMMEDIATE`` (serialises writers, across processes too), write rows;
2. apply the change to the in-memory index, write it to ``index-<g+1>.faiss``, fsync;
3. record generation g+1 and its checksum, ``COMMIT`` (the atomic point);
4. delete ``index-<g>.faiss``.

Killed before 3, SQLite rolls the batch back and ``index-<g>`` is still there (the orphan
``index-<g+1>`` is removed on the next open); killed after 3, ``index-<g+1>`` was fsynced
before the commit. If the recorded index is missing, corrupt or disagrees with the chunk
count anyway, it is rebuilt from the vectors stored in SQLite.

Index choice: ``IndexIDMap2(IndexFlatIP)`` (exact) up to ``approx_threshold`` chunks, then
``IndexIVFFlat`` (inner product). IVF rather than HNSW because FAISS's HNSW cannot remove
vectors, and deleting/replacing documents is a core operation here; IVF removes natively,
trains in seconds, and with nprobe=16 over ~sqrt(n) lists measured recall@10 >= 0.99 on
clustered data (see loadtests/bench_rag.py). IVF keeps our chunk ids itself (add_with_ids),
so it is not wrapped in IndexIDMap2, whose remove_ids assumes the sub-index renumbers
like a flat index does, which IVF does not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from rag.chunking import Chunk, ChunkingConfig, chunk_text
from rag.embeddings import EmbedderLike, ProgressFn
from rag.errors import (
    CorruptCollection,
    DocumentNotFound,
    EmbedderMismatch,
    InvalidArgument,
    InvalidDocument,
    InvalidFilter,
    NotFound,
    UnknownFilterField,
)

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MAX_TOP_K = 100
MAX_DOC_ID_CHARS = 512
DB_NAME = "meta.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    doc_id TEXT PRIMARY KEY,
    metadata TEXT NOT NULL,
    text_sha256 TEXT NOT NULL,
    n_chars INTEGER NOT NULL,
    chunk_count INTEGER NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    -- AUTOINCREMENT: ids are never reused, so a stale index can never alias a new chunk.
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    doc_id TEXT NOT NULL REFERENCES documents(doc_id) ON DELETE CASCADE,
    chunk_index INTEGER NOT NULL,
    char_start INTEGER NOT NULL,
    char_end INTEGER NOT NULL,
    n_tokens INTEGER NOT NULL,
    text TEXT NOT NULL,
    vector BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_doc ON chunks(doc_id, chunk_index);
"""


def _test_pause(point: str) -> None:
    """Crash-safety test hook: park the process at a named point so a test can SIGKILL it
    there deterministically. A no-op unless SWAPSERVE_RAG_TEST_PAUSE_AT names the point
    (and, when SWAPSERVE_RAG_TEST_PAUSE_ARMED names a file, until that file exists)."""
    if os.environ.get("SWAPSERVE_RAG_TEST_PAUSE_AT") != point:
        return
    armed = os.environ.get("SWAPSERVE_RAG_TEST_PAUSE_ARMED")
    if armed and not Path(armed).exists():  # not armed yet: earlier batches pass through
        return
    marker = os.environ.get("SWAPSERVE_RAG_TEST_PAUSE_MARKER")
    if marker:
        Path(marker).write_text(point)
    time.sleep(3600)


@dataclass(frozen=True)
class DocumentInput:
    """A document to add: ``id`` is the caller's key (adding an existing id replaces it)."""

    id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Hit:
    score: float
    text: str
    doc_id: str
    chunk_index: int
    char_start: int
    char_end: int
    chunk_id: int
    metadata: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "text": self.text,
            "doc_id": self.doc_id,
            "chunk_index": self.chunk_index,
            "char_start": self.char_start,
            "char_end": self.char_end,
            "chunk_id": self.chunk_id,
            "metadata": self.metadata,
        }


@dataclass(frozen=True)
class AddResult:
    added: list[str]
    replaced: list[str]
    unchanged: list[str]
    metadata_updated: list[str]
    chunks_written: int


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    embedder_name: str
    dim: int
    created_at: float
    documents: int
    chunks: int
    index_kind: str
    generation: int
    chunk_tokens: int
    overlap: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class IndexConfig:
    approx_threshold: int = 20_000
    """Above this many chunks, switch from exact flat search to IVF. Flat search costs
    ~1 ms per 10k chunks per query on one core: fine below this, too slow well above it."""
    nprobe: int = 16
    """IVF lists scanned per query; higher = better recall, slower."""

    def __post_init__(self) -> None:
        if self.approx_threshold < 100:
            raise InvalidArgument("approx_threshold must be >= 100", param="approx_threshold")
        if self.nprobe < 1:
            raise InvalidArgument("nprobe must be >= 1", param="nprobe")


def _ideal_nlist(n: int) -> int:
    # ~sqrt(n) lists, and at least 39 training points per list (FAISS's own minimum).
    return max(1, min(int(math.sqrt(n)), n // 39))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file_durably(path: Path, data: np.ndarray) -> None:
    with open(path, "wb") as f:
        f.write(data.data)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(path.parent)


def validate_top_k(top_k: int) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
        raise InvalidArgument(
            f"top_k must be an integer between 1 and {MAX_TOP_K}, got {top_k!r}", param="top_k"
        )
    return top_k


def _validate_docs(docs: Sequence[DocumentInput]) -> None:
    seen: set[str] = set()
    for d in docs:
        if not isinstance(d.id, str) or not d.id.strip() or len(d.id) > MAX_DOC_ID_CHARS:
            raise InvalidDocument(
                f"document id must be a non-empty string of at most {MAX_DOC_ID_CHARS} "
                f"characters, got {d.id!r}",
                param="id",
            )
        if any(ord(c) < 32 for c in d.id):
            raise InvalidDocument(f"document id {d.id!r} contains control characters")
        if d.id in seen:
            raise InvalidDocument(f"document id {d.id!r} appears twice in one batch", param="id")
        seen.add(d.id)
        if not isinstance(d.text, str) or not d.text.strip():
            raise InvalidDocument(f"document {d.id!r} is empty", param="text")
        if not isinstance(d.metadata, dict) or not all(isinstance(k, str) for k in d.metadata):
            raise InvalidDocument(
                f"metadata of document {d.id!r} must be a JSON object", param="metadata"
            )
        try:
            json.dumps(d.metadata, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise InvalidDocument(
                f"metadata of document {d.id!r} is not JSON-serialisable: {e}", param="metadata"
            ) from e


_SCALARS = (str, int, float, bool, type(None))


def _json_path(field_name: str) -> str:
    if not isinstance(field_name, str) or not field_name or '"' in field_name:
        raise InvalidFilter(
            f"filter field names must be non-empty strings without '\"', got {field_name!r}",
            param="filter",
        )
    # Quoted, so a key with dots is one top-level key, not a nested path.
    return f'$."{field_name}"'


def _value_condition(path: str, value: Any) -> tuple[str, list[Any]]:
    """SQL matching one JSON value exactly, type included ("1" != 1, true != 1)."""
    if value is None:
        return "json_type(d.metadata, ?) = 'null'", [path]
    if isinstance(value, bool):
        return "json_type(d.metadata, ?) = ?", [path, "true" if value else "false"]
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidFilter("filter values must be finite numbers", param="filter")
        return (
            "(json_type(d.metadata, ?) IN ('integer', 'real') AND json_extract(d.metadata, ?) = ?)",
            [path, path, value],
        )
    if isinstance(value, str):
        return (
            "(json_type(d.metadata, ?) = 'text' AND json_extract(d.metadata, ?) = ?)",
            [path, path, value],
        )
    raise InvalidFilter(
        f"filter values must be strings, numbers, booleans or null, got {type(value).__name__}",
        param="filter",
    )


def parse_filter(flt: dict[str, Any]) -> list[tuple[str, str, list[Any]]]:
    """Filter dict -> [(json path, SQL condition, params)], one per field (ANDed).

    Syntax: ``{"field": value}`` (equality) or ``{"field": {"$in": [v1, v2]}}``.
    """
    if not isinstance(flt, dict):
        raise InvalidFilter("filter must be a JSON object of field -> value", param="filter")
    out = []
    for key, cond in flt.items():
        path = _json_path(key)
        if isinstance(cond, dict):
            if set(cond) != {"$in"}:
                raise InvalidFilter(
                    f"unsupported filter operator(s) {sorted(cond)} on {key!r}; supported: "
                    'a plain value (equality) or {"$in": [...]}',
                    param="filter",
                )
            values = cond["$in"]
            if not isinstance(values, list) or not values:
                raise InvalidFilter(f'"$in" on {key!r} needs a non-empty list', param="filter")
            parts = [_value_condition(path, v) for v in values]
            sql = "(" + " OR ".join(p[0] for p in parts) + ")"
            params = [x for p in parts for x in p[1]]
        elif isinstance(cond, _SCALARS):
            sql, params = _value_condition(path, cond)
        else:
            raise InvalidFilter(
                f"filter on {key!r}: expected a value or {{'$in': [...]}}, got "
                f"{type(cond).__name__}",
                param="filter",
            )
        out.append((path, sql, params))
    return out


class Collection:
    """One named collection on disk. Thread-safe; several processes may share the folder
    (writers are serialised by SQLite, readers reload the index when it changed)."""

    def __init__(
        self,
        path: str | Path,
        embedder: EmbedderLike,
        *,
        index_config: IndexConfig | None = None,
        _create: dict[str, Any] | None = None,
    ) -> None:
        self.path = Path(path)
        self.name = self.path.name
        self.embedder = embedder
        self.index_config = index_config or IndexConfig()
        self._lock = threading.RLock()
        self._index: Any = None
        self._generation = -1
        db = self.path / DB_NAME
        if _create is None and not db.is_file():
            raise NotFound(f"no collection at {self.path}")
        self._conn = sqlite3.connect(db, timeout=60, isolation_level=None, check_same_thread=False)
        try:
            # Rollback journal (not WAL): a reader's SHARED lock then holds back a writer's
            # commit, so an index file can't be deleted between reading its generation and
            # opening it.
            self._conn.execute("PRAGMA journal_mode=DELETE")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            if _create is not None:
                self._init_db(_create)
            self._check_embedder()
            self._load_index()
        except BaseException:
            self._conn.close()
            raise

    # ---------------------------------------------------------------- lifecycle

    @classmethod
    def create(
        cls,
        path: str | Path,
        embedder: EmbedderLike,
        *,
        chunking: ChunkingConfig | None = None,
        index_config: IndexConfig | None = None,
    ) -> Collection:
        chunking = chunking or ChunkingConfig()
        chunking.validate()
        Path(path).mkdir(parents=True, exist_ok=False)
        info = {
            "schema_version": SCHEMA_VERSION,
            "embedder_name": embedder.name,
            "dim": embedder.dim,
            "created_at": time.time(),
            "generation": 0,
            "index_sha256": "",
            "index_kind": "flat",
            "chunk_tokens": chunking.chunk_tokens,
            "overlap": chunking.overlap,
        }
        return cls(path, embedder, index_config=index_config, _create=info)

    @classmethod
    def open(
        cls, path: str | Path, embedder: EmbedderLike, *, index_config: IndexConfig | None = None
    ) -> Collection:
        return cls(path, embedder, index_config=index_config)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            self._index = None

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _init_db(self, info: dict[str, Any]) -> None:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    self._conn.execute(stmt)
            self._conn.executemany(
                "INSERT INTO info(key, value) VALUES (?, ?)",
                [(k, json.dumps(v)) for k, v in info.items()],
            )
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise

    def _info(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self._conn.execute("SELECT key, value FROM info")}

    def _set_info(self, **values: Any) -> None:
        self._conn.executemany(
            "UPDATE info SET value = ? WHERE key = ?",
            [(json.dumps(v), k) for k, v in values.items()],
        )

    def _check_embedder(self) -> None:
        info = self._info()
        if info.get("schema_version") != SCHEMA_VERSION:
            raise CorruptCollection(
                f"collection {self.name!r} has schema version {info.get('schema_version')}, "
                f"this code reads version {SCHEMA_VERSION}"
            )
        if info["embedder_name"] != self.embedder.name or info["dim"] != self.embedder.dim:
            raise EmbedderMismatch(
                f"collection {self.name!r} was built with embedder {info['embedder_name']} "
                f"(dim {info['dim']}) but is being opened with {self.embedder.name} "
                f"(dim {self.embedder.dim}); its vectors are not comparable. Open it with the "
                "original embedder, or create a new collection and re-ingest."
            )

    # ---------------------------------------------------------------- index files

    def _index_file(self, generation: int) -> Path:
        return self.path / f"index-{generation:010d}.faiss"

    def _load_index(self) -> None:
        """Load the index the committed metadata points to; repair it if it disagrees."""
        with self._lock:
            self._conn.execute("BEGIN")  # SHARED lock: no commit can land while we read
            try:
                info = self._info()
                n_chunks = self._conn.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
                gen = info["generation"]
                index = self._read_index_file(gen, info["index_sha256"], n_chunks)
            finally:
                self._conn.execute("COMMIT")
            if index is None:
                self._repair()
            else:
                self._index, self._generation = index, gen
            self._remove_orphans()

    def _read_index_file(self, gen: int, sha: str, n_chunks: int) -> Any:
        if gen == 0:
            return self._new_flat()
        f = self._index_file(gen)
        try:
            data = np.fromfile(f, dtype=np.uint8)
        except OSError as e:
            logger.warning("collection %s: index file %s unreadable (%s)", self.name, f.name, e)
            return None
        if hashlib.sha256(data.data).hexdigest() != sha:
            logger.warning("collection %s: index file %s fails its checksum", self.name, f.name)
            return None
        index = faiss.deserialize_index(data)
        if index.ntotal != n_chunks or index.d != self.embedder.dim:
            logger.warning(
                "collection %s: index holds %d vectors, metadata %d chunks",
                self.name,
                index.ntotal,
                n_chunks,
            )
            return None
        return index

    def _repair(self) -> None:
        """Rebuild the index from the vectors in SQLite and record it as the current one."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            info = self._info()
            logger.warning(
                "collection %s: rebuilding index generation %d from stored vectors",
                self.name,
                info["generation"],
            )
            index = self._build_from_db()
            new_gen = info["generation"] + 1
            sha = self._write_index(index, new_gen)
            self._set_info(generation=new_gen, index_sha256=sha, index_kind=self._kind(index))
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._index, self._generation = index, new_gen

    def _remove_orphans(self) -> None:
        """Delete index files of other generations (left by a crash or a finished write)."""
        # The write lock: another process may be between writing index-<g+1> and committing.
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            gen = self._info()["generation"]
            keep = self._index_file(gen).name
            for f in self.path.glob("index-*.faiss"):
                if f.name != keep:
                    logger.info("collection %s: removing stale %s", self.name, f.name)
                    f.unlink(missing_ok=True)
        finally:
            self._conn.execute("COMMIT")

    def _write_index(self, index: Any, generation: int) -> str:
        data = faiss.serialize_index(index)
        _write_file_durably(self._index_file(generation), data)
        return hashlib.sha256(data.data).hexdigest()

    def _new_flat(self) -> Any:
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.embedder.dim))

    @staticmethod
    def _kind(index: Any) -> str:
        return "ivf" if isinstance(index, faiss.IndexIVF) else "flat"

    def _build(self, ids: np.ndarray, vecs: np.ndarray) -> Any:
        n = len(ids)
        if n <= self.index_config.approx_threshold:
            index = self._new_flat()
        else:
            nlist = _ideal_nlist(n)
            quantizer = faiss.IndexFlatIP(self.embedder.dim)
            index = faiss.IndexIVFFlat(
                quantizer, self.embedder.dim, nlist, faiss.METRIC_INNER_PRODUCT
            )
            # 64 points per centroid is plenty for k-means here and keeps training to
            # seconds at 100k chunks (FAISS's default samples up to 256).
            index.cp.max_points_per_centroid = 64
            index.cp.seed = 1234
            index.train(vecs)
            logger.info("collection %s: trained IVF with %d lists on %d", self.name, nlist, n)
        if n:
            index.add_with_ids(vecs, ids)
        return index

    def _build_from_db(self) -> Any:
        rows = self._conn.execute("SELECT id, vector FROM chunks ORDER BY id").fetchall()
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        vecs = np.zeros((len(rows), self.embedder.dim), dtype=np.float32)
        for i, r in enumerate(rows):
            vecs[i] = np.frombuffer(r[1], dtype=np.float32)
        return self._build(ids, vecs)

    def _needs_rebuild(self, index: Any) -> bool:
        n, threshold = index.ntotal, self.index_config.approx_threshold
        if isinstance(index, faiss.IndexIVF):
            # Hysteresis: don't flip between kinds around the threshold.
            if n < threshold // 2:
                return True
            # Re-cluster when the list count is far from what the size calls for.
            ideal = _ideal_nlist(n)
            return not (index.nlist / 2 <= ideal <= index.nlist * 2)
        return n > threshold

    def _refresh(self) -> None:
        """Reload the index if another process committed a newer generation."""
        row = self._conn.execute("SELECT value FROM info WHERE key = 'generation'").fetchone()
        if self._index is None or json.loads(row[0]) != self._generation:
            self._load_index()

    # ---------------------------------------------------------------- writes

    def add_documents(
        self,
        docs: Sequence[DocumentInput],
        *,
        progress: ProgressFn | None = None,
        batch_size: int = 32,
    ) -> AddResult:
        """Chunk, embed and add documents in one atomic batch.

        A document whose id exists replaces the old one (same text and metadata: skipped;
        same text, new metadata: only the metadata is updated, nothing is re-embedded).
        ``progress(chunks_done, chunks_total)`` is called as embedding proceeds.
        """
        docs = list(docs)
        _validate_docs(docs)
        with self._lock:
            existing = self._existing(d.id for d in docs)
        to_embed: list[tuple[DocumentInput, list[Chunk]]] = []
        meta_only: list[DocumentInput] = []
        unchanged: list[str] = []
        cfg = self.chunking_config
        for d in docs:
            old = existing.get(d.id)
            if old is not None and old[0] == _sha(d.text):
                if old[1] == d.metadata:
                    unchanged.append(d.id)
                else:
                    meta_only.append(d)
                continue
            to_embed.append((d, chunk_text(d.id, d.text, self.embedder, cfg, d.metadata)))
        # Embedding is the slow part: done before taking any lock.
        texts = [c.text for _, chunks in to_embed for c in chunks]
        vectors = self.embedder.embed(texts, batch_size=batch_size, progress=progress)
        if progress is not None and not texts:
            progress(0, 0)
        _test_pause("after_embed")
        items = []
        offset = 0
        for d, chunks in to_embed:
            items.append((d, chunks, vectors[offset : offset + len(chunks)]))
            offset += len(chunks)
        self._commit(items, meta_only=meta_only, delete_ids=[])
        replaced = [d.id for d, _ in to_embed if d.id in existing]
        return AddResult(
            added=[d.id for d, _ in to_embed if d.id not in existing],
            replaced=replaced,
            unchanged=unchanged,
            metadata_updated=[d.id for d in meta_only],
            chunks_written=len(texts),
        )

    def add_embedded(self, items: Sequence[tuple[DocumentInput, list[Chunk], np.ndarray]]) -> None:
        """Add documents whose chunks are already embedded (benchmarks, re-imports)."""
        _validate_docs([d for d, _, _ in items])
        for d, chunks, vecs in items:
            if vecs.shape != (len(chunks), self.embedder.dim):
                raise InvalidArgument(
                    f"document {d.id!r}: vectors of shape {vecs.shape}, expected "
                    f"({len(chunks)}, {self.embedder.dim})"
                )
        self._commit(list(items), meta_only=[], delete_ids=[])

    def delete_document(self, doc_id: str) -> int:
        """Remove a document and its chunks; returns how many chunks were removed."""
        with self._lock:
            if doc_id not in self._existing([doc_id]):
                raise DocumentNotFound(
                    f"collection {self.name!r} has no document {doc_id!r}", param="doc_id"
                )
            return self._commit([], meta_only=[], delete_ids=[doc_id])

    def _existing(self, ids: Iterable[str]) -> dict[str, tuple[str, dict[str, Any]]]:
        ids = list(ids)
        out: dict[str, tuple[str, dict[str, Any]]] = {}
        for i in range(0, len(ids), 500):
            part = ids[i : i + 500]
            q = ",".join("?" * len(part))
            for doc_id, sha, meta in self._conn.execute(
                f"SELECT doc_id, text_sha256, metadata FROM documents WHERE doc_id IN ({q})",
                part,
            ):
                out[doc_id] = (sha, json.loads(meta))
        return out

    def _commit(
        self,
        items: list[tuple[DocumentInput, list[Chunk], np.ndarray]],
        *,
        meta_only: list[DocumentInput],
        delete_ids: list[str],
    ) -> int:
        if not items and not meta_only and not delete_ids:
            return 0
        new_file: Path | None = None
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                info = self._info()
                gen = info["generation"]
                if gen != self._generation or self._index is None:
                    # Another process committed since we loaded; start from its state. We
                    # hold the write lock, so nothing can change under us now.
                    index = self._read_index_file(
                        gen,
                        info["index_sha256"],
                        conn.execute("SELECT COUNT(*) FROM chunks").fetchone()[0],
                    )
                    self._index = index if index is not None else self._build_from_db()
                    self._generation = gen
                index = self._index
                now = time.time()
                gone = [d.id for d, _, _ in items] + delete_ids
                old_ids: list[int] = []
                for i in range(0, len(gone), 500):
                    part = gone[i : i + 500]
                    q = ",".join("?" * len(part))
                    old_ids += [
                        r[0]
                        for r in conn.execute(f"SELECT id FROM chunks WHERE doc_id IN ({q})", part)
                    ]
                    conn.execute(f"DELETE FROM documents WHERE doc_id IN ({q})", part)
                for d in meta_only:
                    conn.execute(
                        "UPDATE documents SET metadata = ?, updated_at = ? WHERE doc_id = ?",
                        (json.dumps(d.metadata), now, d.id),
                    )
                new_ids: list[int] = []
                new_vecs: list[np.ndarray] = []
                for d, chunks, vecs in items:
                    conn.execute(
                        "INSERT INTO documents(doc_id, metadata, text_sha256, n_chars, "
                        "chunk_count, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                        (d.id, json.dumps(d.metadata), _sha(d.text), len(d.text), len(chunks), now),
                    )
                    vecs = np.ascontiguousarray(vecs, dtype=np.float32)
                    for c, v in zip(chunks, vecs, strict=True):
                        cur = conn.execute(
                            "INSERT INTO chunks(doc_id, chunk_index, char_start, char_end, "
                            "n_tokens, text, vector) VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (
                                d.id,
                                c.index,
                                c.char_start,
                                c.char_end,
                                c.n_tokens,
                                c.text,
                                v.tobytes(),
                            ),
                        )
                        new_ids.append(int(cur.lastrowid or 0))
                    new_vecs.append(vecs)
                _test_pause("after_sqlite_write")
                if old_ids:
                    index.remove_ids(np.asarray(old_ids, dtype=np.int64))
                if new_ids:
                    index.add_with_ids(np.concatenate(new_vecs), np.asarray(new_ids, np.int64))
                if self._needs_rebuild(index):
                    index = self._build_from_db()
                new_gen = gen + 1
                new_file = self._index_file(new_gen)
                sha = self._write_index(index, new_gen)
                _test_pause("after_index_write")
                self._set_info(generation=new_gen, index_sha256=sha, index_kind=self._kind(index))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if new_file is not None:
                    new_file.unlink(missing_ok=True)
                # The in-memory index may hold half of this batch: reload it from disk.
                self._index, self._generation = None, -1
                raise
            self._index, self._generation = index, new_gen
            _test_pause("after_commit")
            self._index_file(gen).unlink(missing_ok=True)
            logger.info(
                "collection %s: generation %d, -%d/+%d chunks, %d total (%s)",
                self.name,
                new_gen,
                len(old_ids),
                len(new_ids),
                index.ntotal,
                self._kind(index),
            )
            return len(old_ids)

    # ---------------------------------------------------------------- reads

    @property
    def chunking_config(self) -> ChunkingConfig:
        info = self._info()
        return ChunkingConfig(chunk_tokens=info["chunk_tokens"], overlap=info["overlap"])

    def info(self) -> CollectionInfo:
        with self._lock:
            return read_info(self.path, conn=self._conn)

    def documents(self, *, limit: int = 1000, offset: int = 0) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT doc_id, metadata, chunk_count, n_chars, updated_at FROM documents "
                "ORDER BY doc_id LIMIT ? OFFSET ?",
                (limit, offset),
            ).fetchall()
        return [
            {
                "id": r[0],
                "metadata": json.loads(r[1]),
                "chunks": r[2],
                "chars": r[3],
                "updated_at": r[4],
            }
            for r in rows
        ]

    def chunks(self, doc_id: str | None = None) -> list[Hit]:
        """Every chunk (of one document, or of all), in document order, as score-0 hits:
        for tools that walk a collection rather than search it (the RAFT data builder)."""
        sql = (
            "SELECT c.id, c.text, c.doc_id, c.chunk_index, c.char_start, c.char_end, "
            "d.metadata FROM chunks c JOIN documents d ON d.doc_id = c.doc_id"
        )
        params: list[Any] = []
        if doc_id is not None:
            sql += " WHERE c.doc_id = ?"
            params.append(doc_id)
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY c.doc_id, c.chunk_index", params).fetchall()
        return [
            Hit(
                score=0.0,
                text=r[1],
                doc_id=r[2],
                chunk_index=r[3],
                char_start=r[4],
                char_end=r[5],
                chunk_id=r[0],
                metadata=json.loads(r[6]),
            )
            for r in rows
        ]

    def count_chunks(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM chunks").fetchone()[0])

    def index_size(self) -> int:
        with self._lock:
            self._refresh()
            return int(self._index.ntotal)

    @property
    def index_kind(self) -> str:
        with self._lock:
            self._refresh()
            return self._kind(self._index)

    def search(
        self,
        query: str,
        *,
        top_k: int = 5,
        min_score: float | None = None,
        filter: dict[str, Any] | None = None,
    ) -> list[Hit]:
        """Chunks nearest to ``query`` (cosine similarity), best first.

        ``filter`` selects documents by metadata before the search, so it returns
        ``top_k`` hits whenever that many chunks match, however far they are from the query.
        """
        validate_top_k(top_k)
        if not isinstance(query, str) or not query.strip():
            raise InvalidArgument("query must be a non-empty string", param="query")
        if filter:
            # Validate before spending time on the embedding.
            parse_filter(filter)
        return self.search_vector(
            self.embedder.embed_query(query), top_k=top_k, min_score=min_score, filter=filter
        )

    def search_vector(
        self,
        vector: np.ndarray,
        *,
        top_k: int = 5,
        min_score: float | None = None,
        filter: dict[str, Any] | None = None,
        exact: bool = False,
    ) -> list[Hit]:
        """As :meth:`search`, for a query already embedded. ``exact`` forces exhaustive
        search on an approximate index (used to measure recall)."""
        validate_top_k(top_k)
        if min_score is not None and not (
            isinstance(min_score, int | float) and -1.0 <= min_score <= 1.0
        ):
            raise InvalidArgument("min_score must be a number in [-1, 1]", param="min_score")
        q = np.ascontiguousarray(np.asarray(vector, dtype=np.float32).reshape(1, -1))
        if q.shape[1] != self.embedder.dim:
            raise InvalidArgument(f"query vector has dim {q.shape[1]}, not {self.embedder.dim}")
        with self._lock:
            self._refresh()
            index = self._index
            selected: np.ndarray | None = None
            if filter:
                selected = self._filter_ids(filter)
                available = len(selected)
            else:
                available = index.ntotal
            k = min(top_k, available)
            if k == 0:
                return []
            scores, ids = self._faiss_search(index, q, k, selected, exact)
            if (ids >= 0).sum() < k and isinstance(index, faiss.IndexIVF) and not exact:
                # The probed lists held fewer than k eligible chunks (a selective filter):
                # scan every list so a filter never returns fewer hits than exist.
                scores, ids = self._faiss_search(index, q, k, selected, True)
            return self._hits(scores, ids, min_score)

    def _faiss_search(
        self, index: Any, q: np.ndarray, k: int, selected: np.ndarray | None, exact: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        sel = None
        if selected is not None:
            # IDSelectorBatch keeps a pointer to `selected`; it stays alive in this frame.
            sel = faiss.IDSelectorBatch(len(selected), faiss.swig_ptr(selected))
        if isinstance(index, faiss.IndexIVF):
            nprobe = self.index_config.nprobe
            if selected is not None and len(selected):
                # A filter that keeps 1/s of the chunks gets s times the lists, so about as
                # many eligible candidates are scanned as without a filter; IVF checks the
                # selector before computing a distance, so the extra lists are cheap.
                nprobe = math.ceil(nprobe * index.ntotal / len(selected))
            params: Any = faiss.SearchParametersIVF()
            params.nprobe = index.nlist if exact else min(nprobe, index.nlist)
        else:
            params = faiss.SearchParameters()
        if sel is not None:
            params.sel = sel
        scores, ids = index.search(q, k, params=params)
        return scores[0], ids[0]

    def _filter_ids(self, flt: dict[str, Any]) -> np.ndarray:
        conds = parse_filter(flt)
        for path, _, _ in conds:
            has = self._conn.execute(
                "SELECT 1 FROM documents d WHERE json_type(d.metadata, ?) IS NOT NULL LIMIT 1",
                (path,),
            ).fetchone()
            if has is None:
                field_name = path[3:-1]
                raise UnknownFilterField(
                    f"no document in collection {self.name!r} has metadata field "
                    f"{field_name!r}; check the spelling (fields are case-sensitive)",
                    param="filter",
                )
        where = " AND ".join(c[1] for c in conds)
        params = [p for c in conds for p in c[2]]
        rows = self._conn.execute(
            # Documents first, then their chunks by index: JSON is parsed once per document,
            # not once per chunk.
            f"SELECT id FROM chunks WHERE doc_id IN (SELECT d.doc_id FROM documents d "
            f"WHERE {where})",
            params,
        ).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def _hits(self, scores: np.ndarray, ids: np.ndarray, min_score: float | None) -> list[Hit]:
        pairs = [
            (float(s), int(i))
            for s, i in zip(scores, ids, strict=True)
            if i >= 0 and (min_score is None or s >= min_score)
        ]
        if not pairs:
            return []
        q = ",".join("?" * len(pairs))
        rows = {
            r[0]: r
            for r in self._conn.execute(
                "SELECT c.id, c.text, c.doc_id, c.chunk_index, c.char_start, c.char_end, "
                f"d.metadata FROM chunks c JOIN documents d ON d.doc_id = c.doc_id "
                f"WHERE c.id IN ({q})",
                [i for _, i in pairs],
            )
        }
        hits = []
        for score, cid in pairs:
            r = rows.get(cid)
            if r is None:  # cannot happen while index and metadata agree; never crash on it
                logger.error("collection %s: index returned unknown chunk %d", self.name, cid)
                continue
            hits.append(
                Hit(
                    score=score,
                    text=r[1],
                    doc_id=r[2],
                    chunk_index=r[3],
                    char_start=r[4],
                    char_end=r[5],
                    chunk_id=cid,
                    metadata=json.loads(r[6]),
                )
            )
        return hits


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_index_file(path: str | Path) -> tuple[Path | None, str | None]:
    """(the committed index file, what is wrong with it or None), from metadata alone.

    Reads under SQLite's SHARED lock, as `_load_index` does, so a writer in another
    process cannot commit (and delete the file checked) meanwhile. Raises CorruptCollection
    when the metadata itself is unreadable. A collection with no vectors yet (generation
    0) has no index file: (None, None).
    """
    path = Path(path)
    db = path / DB_NAME
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=60, isolation_level=None)
    except sqlite3.Error as e:
        raise CorruptCollection(f"collection {path.name!r}: unreadable metadata ({e})") from e
    try:
        conn.execute("BEGIN")
        info = {k: json.loads(v) for k, v in conn.execute("SELECT key, value FROM info")}
        gen, sha = int(info["generation"]), str(info["index_sha256"])
        if gen == 0:
            return None, None
        f = path / f"index-{gen:010d}.faiss"
        try:
            digest = hashlib.sha256(f.read_bytes()).hexdigest()
        except OSError as e:
            return f, f"index file {f.name} unreadable ({e.strerror})"
        if digest != sha:
            return f, f"index file {f.name} fails its checksum"
        return f, None
    except (sqlite3.Error, KeyError, ValueError, TypeError) as e:
        raise CorruptCollection(f"collection {path.name!r}: unreadable metadata ({e})") from e
    finally:
        conn.close()


def read_info(path: str | Path, *, conn: sqlite3.Connection | None = None) -> CollectionInfo:
    """Collection info straight from SQLite, without loading the index or an embedder."""
    path = Path(path)
    own = conn is None
    if conn is None:
        db = path / DB_NAME
        if not db.is_file():
            raise NotFound(f"no collection at {path}")
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=60)
    try:
        info = {k: json.loads(v) for k, v in conn.execute("SELECT key, value FROM info")}
        docs = conn.execute("SELECT COUNT(*) FROM documents").fetchone()[0]
        chunks = conn.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
    except sqlite3.DatabaseError as e:
        raise CorruptCollection(f"collection {path.name!r}: unreadable metadata ({e})") from e
    finally:
        if own:
            conn.close()
    return CollectionInfo(
        name=path.name,
        embedder_name=info["embedder_name"],
        dim=info["dim"],
        created_at=info["created_at"],
        documents=docs,
        chunks=chunks,
        index_kind=info["index_kind"],
        generation=info["generation"],
        chunk_tokens=info["chunk_tokens"],
        overlap=info["overlap"],
    )
