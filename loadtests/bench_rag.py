"""RAG benchmark: ingestion throughput, search latency flat vs IVF, recall@10 of IVF.

    HF_HUB_OFFLINE=1 python loadtests/bench_rag.py [--sizes 10000 100000] [--queries 200]

Ingestion with the real bundled embedder is measured on a small corpus (embedding
dominates and is slow on CPU); the 10k/100k index comparisons use random clustered unit
vectors (dim 384, like all-MiniLM-L6-v2), which exercise the same Collection code minus
the embedding. Ratios come from one run on one machine; absolute times are context only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rag.chunking import Chunk  # noqa: E402
from rag.collection import Collection, DocumentInput, IndexConfig  # noqa: E402

DIM = 384
CHUNKS_PER_DOC = 10


class VectorsOnly:
    """Stand-in embedder for pre-embedded vectors (never asked to embed)."""

    name = "bench-random-384"
    dim = DIM
    max_seq_length = 256

    def token_spans(self, text):  # pragma: no cover - unused
        raise NotImplementedError

    count_tokens = embed = embed_query = token_spans


def clustered(n: int, seed: int) -> np.ndarray:
    # Real embeddings cluster by topic; a uniform random cloud has no structure for any
    # approximate index to use and would understate recall.
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(50, n // 50), DIM))
    x = centres[rng.integers(0, len(centres), n)] + 0.7 * rng.normal(size=(n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def build(path: Path, x: np.ndarray, threshold: int, batch: int) -> tuple[Collection, float]:
    c = Collection.create(path, VectorsOnly(), index_config=IndexConfig(approx_threshold=threshold))
    t0 = time.perf_counter()
    for start in range(0, len(x), batch):
        items = []
        for d in range(start, min(start + batch, len(x)), CHUNKS_PER_DOC):
            vecs = x[d : d + CHUNKS_PER_DOC]
            chunks = [Chunk(f"d{d}", i, f"chunk {d + i}", 0, 1, 1) for i in range(len(vecs))]
            items.append((DocumentInput(f"d{d}", "t", {"shard": (d // 10) % 10}), chunks, vecs))
        c.add_embedded(items)
    return c, len(x) / (time.perf_counter() - t0)


def latencies(c: Collection, queries: np.ndarray, **kw) -> tuple[list[float], list[set[int]]]:
    times, results = [], []
    for q in queries:
        t0 = time.perf_counter()
        hits = c.search_vector(q, top_k=10, **kw)
        times.append(time.perf_counter() - t0)
        results.append({h.chunk_id for h in hits})
    return times, results


def ms(xs: list[float]) -> str:
    return f"p50 {1000 * statistics.median(xs):7.2f} ms  p95 {1000 * np.percentile(xs, 95):7.2f} ms"


def bench_real_embedder(tmp: Path) -> None:
    from rag.embeddings import get_embedder

    t0 = time.perf_counter()
    emb = get_embedder()
    load = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    words = "model adapter server request token batch memory index vector query".split()
    docs = [
        DocumentInput(
            f"doc{i}",
            "\n\n".join(
                " ".join(rng.choice(words, 12)).capitalize() + "."
                for _ in range(rng.integers(3, 9))
            ),
        )
        for i in range(60)
    ]
    c = Collection.create(tmp / "real", emb)
    t0 = time.perf_counter()
    res = c.add_documents(docs)
    dt = time.perf_counter() - t0
    t1 = time.perf_counter()
    for q in ["batch memory", "adapter server request", "vector index query"]:
        c.search(q, top_k=5)
    qdt = (time.perf_counter() - t1) / 3
    print(f"real embedder {emb.name}: load {load:.1f} s")
    print(
        f"  ingest {len(docs)} docs / {res.chunks_written} chunks: "
        f"{res.chunks_written / dt:.1f} chunks/s (embedding included)"
    )
    print(f"  search incl. query embedding: {1000 * qdt:.1f} ms/query")
    c.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--batch", type=int, default=10_000, help="chunks per ingest commit")
    ap.add_argument("--skip-real", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if not args.skip_real:
            bench_real_embedder(tmp)
        for n in args.sizes:
            x = clustered(n, seed=n)
            rng = np.random.default_rng(1)
            noise = rng.normal(size=(args.queries, DIM))
            q = x[rng.integers(0, n, args.queries)] + 0.6 * noise / np.linalg.norm(
                noise, axis=1, keepdims=True
            )
            q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
            flat, flat_rate = build(tmp / f"flat{n}", x, threshold=n + 1, batch=args.batch)
            approx, ivf_rate = build(
                tmp / f"ivf{n}", x, threshold=max(100, n // 5), batch=args.batch
            )
            nlist = approx._index.nlist
            t_flat, r_flat = latencies(flat, q)
            t_ivf, r_ivf = latencies(approx, q)
            recall = np.mean([len(a & b) / 10 for a, b in zip(r_flat, r_ivf, strict=True)])
            t_ff, _ = latencies(flat, q, filter={"shard": 3})
            t_if, r_if = latencies(approx, q, filter={"shard": 3})
            _, r_ife = latencies(approx, q, filter={"shard": 3}, exact=True)
            frecall = np.mean([len(a & b) / 10 for a, b in zip(r_ife, r_if, strict=True)])
            print(f"\n{n} chunks, dim {DIM}, {args.queries} queries, top_k=10")
            print(
                f"  ingest (pre-embedded, {args.batch}/commit): flat {flat_rate:,.0f} chunks/s, "
                f"ivf {ivf_rate:,.0f} chunks/s (ratio {ivf_rate / flat_rate:.2f})"
            )
            print(f"  flat         {ms(t_flat)}")
            print(f"  ivf({nlist:4d},16) {ms(t_ivf)}  recall@10 vs flat {recall:.3f}")
            print(
                f"  latency ratio ivf/flat (p50): {statistics.median(t_ivf) / statistics.median(t_flat):.3f}"
            )
            print(
                f"  filter shard=3 (10%): flat {ms(t_ff)}; ivf {ms(t_if)}; "
                f"ivf recall@10 {frecall:.3f}"
            )
            flat.close()
            approx.close()


if __name__ == "__main__":
    main()
