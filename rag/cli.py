"""``swapserve rag ...``: ingest files into a collection and search it from a terminal.

The main CLI calls :func:`register` with its subparsers; each command sets ``func``, which
takes the parsed args and returns an exit code (0 ok, 1 a RAG error, reported on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from rag.errors import InvalidArgument, InvalidFilter, RAGError

# The server's settings for the same things (server/config.py, prefix SWAPSERVE_). rag/ must
# not import server/, so the CLI reads the variables itself; both sides must agree, or a
# document the server refuses could still enter through the CLI (and the reverse).
ENV_MAX_DOC_BYTES = "SWAPSERVE_RAG_MAX_DOC_BYTES"
ENV_APPROX_THRESHOLD = "SWAPSERVE_RAG_APPROX_THRESHOLD"


def default_data_dir() -> Path:
    env = os.environ.get("SWAPSERVE_DATA_DIR")
    return Path(env) if env else Path.home() / ".local" / "share" / "swapserve"


def env_int(name: str, default: int, minimum: int) -> int:
    """An integer setting from the environment, checked as the server checks it."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise InvalidArgument(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise InvalidArgument(f"{name}={value} is below the minimum {minimum}")
    return value


def store_limits(max_doc_bytes: int | None = None) -> dict[str, Any]:
    """CollectionStore keyword arguments from the server's SWAPSERVE_RAG_* variables;
    ``max_doc_bytes`` (the --max-doc-bytes flag) wins over the variable."""
    from rag.collection import IndexConfig
    from rag.store import DEFAULT_MAX_DOC_BYTES

    if max_doc_bytes is None:
        max_doc_bytes = env_int(ENV_MAX_DOC_BYTES, DEFAULT_MAX_DOC_BYTES, 1)
    elif max_doc_bytes < 1:
        raise InvalidArgument(f"--max-doc-bytes {max_doc_bytes}: must be >= 1")
    threshold = env_int(ENV_APPROX_THRESHOLD, IndexConfig.approx_threshold, 100)
    return {
        "max_doc_bytes": max_doc_bytes,
        "index_config": IndexConfig(approx_threshold=threshold),
    }


def _store(args: argparse.Namespace) -> Any:
    # Imported here: `swapserve --help` must not load torch.
    from rag.embeddings import get_embedder
    from rag.store import CollectionStore

    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    # Limits first: a bad variable is reported before the embedding model loads.
    limits = store_limits(getattr(args, "max_doc_bytes", None))
    return CollectionStore(data_dir / "rag", get_embedder(args.embedder), **limits)


def _ingest(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from rag.collection import DocumentInput
    from rag.store import documents_from_bytes

    store = _store(args)
    # Every file is read and checked (UTF-8, size limit, records) before anything is
    # created or written: one bad file refuses the whole ingest, as over HTTP.
    docs: list[DocumentInput] = []
    for f in args.files:
        p = Path(f)
        if not p.is_file():
            raise RAGError(f"no such file: {p}")
        docs += documents_from_bytes(p.read_bytes(), p.name, max_doc_bytes=store.max_doc_bytes)
    if args.create and not store.exists(args.collection):
        store.create(args.collection)
    coll = store.get(args.collection)
    with tqdm(total=0, unit="chunk", desc=f"embedding into {args.collection}") as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        res = coll.add_documents(docs, progress=progress)
    print(
        f"{args.collection}: {len(res.added)} added, {len(res.replaced)} replaced, "
        f"{len(res.unchanged)} unchanged, {len(res.metadata_updated)} metadata updated, "
        f"{res.chunks_written} chunks embedded; collection now has "
        f"{coll.count_chunks()} chunks"
    )
    return 0


def _search(args: argparse.Namespace) -> int:
    flt = None
    if args.filter:
        try:
            flt = json.loads(args.filter)
        except json.JSONDecodeError as e:
            raise InvalidFilter(f"--filter is not valid JSON: {e}") from e
    hits = _store(args).search(
        args.collection, args.query, top_k=args.top_k, min_score=args.min_score, filter=flt
    )
    if args.json:
        print(json.dumps([h.to_dict() for h in hits], ensure_ascii=False, indent=2))
        return 0
    if not hits:
        print("no hits")
    for i, h in enumerate(hits, start=1):
        text = " ".join(h.text.split())
        print(f"[{i}] {h.score:.3f}  {h.doc_id} #{h.chunk_index}\n    {text[:300]}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from rag.collection import read_info

    root = (Path(args.data_dir) if args.data_dir else default_data_dir()) / "rag"
    # Listing reads metadata only: no embedder load.
    for p in sorted(root.glob("*/meta.sqlite")) if root.is_dir() else []:
        i = read_info(p.parent)
        print(f"{i.name}\t{i.documents} docs\t{i.chunks} chunks\t{i.index_kind}\t{i.embedder_name}")
    return 0


def _raft(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from rag.raft import RaftConfig, build_raft, read_questions, write_jsonl

    config = RaftConfig(
        distractors=args.distractors,
        p_no_oracle=args.p_no_oracle,
        distractor_source=args.distractor_source,
        candidates=args.candidates,
        closed_book=args.closed_book,
        cite=args.cite,
        seed=args.seed,
    )
    config.validate()  # bad flags fail before the embedder loads
    questions = read_questions(args.questions)
    store = _store(args)
    coll = store.get(args.collection)  # CollectionNotFound: "no collection named ..."
    with tqdm(total=len(questions), unit="q", desc=f"raft from {args.collection}") as bar:

        def progress(done: int, total: int) -> None:
            bar.update(done - bar.n)

        records, stats = build_raft(coll, questions, config, progress=progress)
    write_jsonl(records, args.out)
    for w in stats.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(
        f"{args.out}: {stats.examples} examples from {stats.questions} questions "
        f"({stats.with_oracle} with the oracle, {stats.without_oracle} without, "
        f"{stats.closed_book} closed-book); oracle by doc_id {stats.oracle_by_doc_id}, by "
        f"answer {stats.oracle_by_answer}; retrieval ranks the oracle in the top "
        f"{config.distractors + 1} for {stats.oracle_in_top_k} of {stats.questions}"
    )
    return 0


def _guard(func: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return int(func(args))
        except RAGError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1

    return run


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``rag`` command group to an argparse subparsers object."""
    rag = subparsers.add_parser("rag", help="retrieval collections: ingest and search")
    sub = rag.add_subparsers(dest="rag_command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--data-dir",
        help="data folder (default: $SWAPSERVE_DATA_DIR or ~/.local/share/swapserve); "
        "collections live in <data-dir>/rag",
    )
    common.add_argument(
        "--embedder",
        # The server reads the same variable: CLI and server must embed with one model,
        # or the server refuses the collection (embedder mismatch).
        default=os.environ.get("SWAPSERVE_EMBEDDER") or None,
        help="local sentence-transformers folder (default: $SWAPSERVE_EMBEDDER, else the "
        "bundled all-MiniLM-L6-v2)",
    )

    ingest = sub.add_parser(
        "ingest",
        parents=[common],
        help="add .txt/.md/.json/.jsonl files to a collection",
        description="Add files to a collection. A document whose id exists is replaced; "
        ".txt/.md files use the file name as id.",
    )
    ingest.add_argument("collection")
    ingest.add_argument("files", nargs="+")
    ingest.add_argument("--create", action="store_true", help="create the collection if missing")
    ingest.add_argument(
        "--max-doc-bytes",
        type=int,
        default=None,
        help=f"largest document in UTF-8 bytes (default: ${ENV_MAX_DOC_BYTES}, the server's "
        "limit, else 2 MiB); a larger one refuses the whole ingest",
    )
    ingest.set_defaults(func=_guard(_ingest))

    search = sub.add_parser("search", parents=[common], help="search a collection")
    search.add_argument("collection")
    search.add_argument("query")
    search.add_argument("--top-k", type=int, default=5, help="hits to return (1-100)")
    search.add_argument("--min-score", type=float, default=None)
    search.add_argument(
        "--filter", default=None, help='metadata filter as JSON, e.g. \'{"lang": "en"}\''
    )
    search.add_argument("--json", action="store_true", help="print hits as JSON")
    search.set_defaults(func=_guard(_search))

    raft = sub.add_parser(
        "raft",
        parents=[common],
        help="build RAFT-style SFT data (question + oracle chunk + distractors)",
        description="Build chat SFT data for `swapserve train sft` from a collection and a "
        "question set (the A/B format: {id?, question, references, doc_id?} per line). Each "
        "example is the question with the oracle chunk and distractor chunks, shuffled, in "
        "the prompt the server builds for `rag` requests; a fraction has no oracle.",
    )
    raft.add_argument("collection")
    raft.add_argument("questions", type=Path, help="question set, JSONL")
    raft.add_argument("--out", type=Path, required=True, help="the SFT JSONL to write")
    raft.add_argument("--distractors", type=int, default=3, help="distractor chunks (k)")
    raft.add_argument(
        "--p-no-oracle",
        type=float,
        default=0.2,
        help="fraction of examples with k+1 distractors and no oracle (default 0.2)",
    )
    raft.add_argument(
        "--distractor-source",
        choices=["retrieved", "random"],
        default="retrieved",
        help="top-ranked non-oracle chunks (default) or random chunks",
    )
    raft.add_argument(
        "--candidates", type=int, default=20, help="chunks retrieved per question (1-100)"
    )
    raft.add_argument(
        "--closed-book",
        type=float,
        default=0.0,
        help="fraction of questions that also get a no-passage example (default 0)",
    )
    raft.add_argument(
        "--cite", action="store_true", help="append the oracle's number to answers: 'x [2]'"
    )
    raft.add_argument("--seed", type=int, default=0)
    raft.set_defaults(func=_guard(_raft))

    lst = sub.add_parser("list", parents=[common], help="list collections")
    lst.set_defaults(func=_guard(_list))
    return rag
