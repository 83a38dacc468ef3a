"""RAG throughput and latency: ingest (documents/s, chunks/s) and query latency p50/p95 at 10k and 100k chunks.

    .venv/bin/python bench/rag.py [--docs 200] [--sizes 10000,100000] [--base 2000] [--queries 40] [--refine 2]

Ingest: --docs Markdown files (bilingual tinyworld filler text under headings, 2-6 paragraphs each) go
through the whole pipeline of `tinychat rag ingest`: hash, load, split (800/120 characters), embed with
all-MiniLM-L6-v2, write to LanceDB. Reported: documents/s, chunks/s, the share of time spent embedding,
and the cost of a second, unchanged sync (hashes only).

Query latency at each size, exact search below the store's index threshold (20k chunks) and the ANN index
(IVF_HNSW_SQ, re-ranked with full vectors) above it, for dense search (query embedding + vector search) and
hybrid search (dense + BM25 + reciprocal rank fusion + the similarity gate). Embedding 100k texts with MiniLM
takes 15-40 minutes on a 2-core CPU (100-130 texts/s idle), so only --base distinct paragraphs are embedded
for real; chunk i is paragraph i mod base plus a unique suffix, and its vector that paragraph's real embedding
plus a small random perturbation (renormalised), cached under the chunk's text so the gate reads it. Search
cost does not depend on what the vectors mean, only on their number and spread; recall is measured elsewhere
(tinychat rag eval).
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def write_docs(root: Path, n: int, seed: int = 0) -> None:
    from tinychat.world import filler

    rng = random.Random(seed)
    for i in range(n):
        lang = rng.choice(("en", "zh"))
        parts = [f"# Document {i}\n"]
        for j in range(rng.randint(2, 6)):
            parts.append(f"## Part {j + 1}\n\n" + filler.paragraph(lang, rng, 3, 7) + "\n")
        p = root / f"d{i // 100:03d}" / f"doc-{i:05d}.md"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("\n".join(parts), encoding="utf-8")


def bench_ingest(n_docs: int, tmp: Path) -> None:
    from tinychat.rag.kb import KbSettings, KnowledgeBase

    docs = tmp / "docs"
    write_docs(docs, n_docs)
    kb = KnowledgeBase(tmp / "kb-ingest", KbSettings())
    kb.embedder.embed(["warm up the model"])
    inner = kb.embedder.inner
    spent = [0.0]
    real = inner.embed

    def timed(texts: list[str]) -> np.ndarray:
        t = time.perf_counter()
        out = real(texts)
        spent[0] += time.perf_counter() - t
        return out

    inner.embed = timed
    rep = kb.sync([docs])
    again = kb.sync([docs])
    kb.close()
    n_chunks = rep.chunks_added
    print(f"ingest: {n_docs} documents -> {n_chunks} chunks in {rep.seconds:.1f}s")
    print(
        f"  {n_docs / rep.seconds:.1f} documents/s, {n_chunks / rep.seconds:.1f} chunks/s; "
        f"embedding {100 * spent[0] / rep.seconds:.0f}% of the time"
    )
    print(f"  unchanged re-sync: {again.seconds:.2f}s ({len(again.unchanged)} unchanged, {again.chunks_added} added)")


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs), q))


def bench_queries(sizes: list[int], base: int, n_queries: int, tmp: Path, refine: int) -> None:
    from tinychat.rag.embed import CachedEmbedder, MiniLMEmbedder
    from tinychat.rag.retrieve import RetrieveConfig, Retriever
    from tinychat.rag.store import open_store
    from tinychat.rag.types import ChunkRecord
    from tinychat.world import filler

    rng = random.Random(1)
    paragraphs = [filler.paragraph(rng.choice(("en", "zh")), rng, 2, 5) for _ in range(base)]
    model = MiniLMEmbedder()
    t0 = time.perf_counter()
    base_vecs = model.embed(paragraphs)
    secs = time.perf_counter() - t0
    print(f"embedded {base} base paragraphs in {secs:.1f}s ({base / secs:.0f}/s)")
    queries = [" ".join(p.split()[:8]) if " " in p else p[:16] for p in rng.sample(paragraphs, n_queries)]
    gen = np.random.default_rng(0)
    for size in sizes:
        d = tmp / f"kb-{size}"
        emb = CachedEmbedder(model, d / "cache" / "embeddings.sqlite")
        store = open_store("lance", str(d / "lance"), model.dim, refine_factor=refine)
        all_vecs = np.zeros((size, model.dim), dtype=np.float32)
        t0 = time.perf_counter()
        for start in range(0, size, 5000):
            idx = np.arange(start, min(size, start + 5000))
            texts = [f"{paragraphs[i % base]} (record {i})" for i in idx]
            vecs = base_vecs[idx % base] + 0.05 * gen.standard_normal((len(idx), model.dim)).astype(np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            recs = [
                ChunkRecord(
                    f"r{i}:0", f"/bench/doc-{i // 8}.md", f"doc {i // 8}", "", int(i % 8), 0, len(t), t, f"h{i // 8}"
                )
                for i, t in zip(idx, texts)
            ]
            store.add(recs, vecs)
            emb.put(texts, vecs)
            all_vecs[idx] = vecs
        store.optimize()
        fill = time.perf_counter() - t0
        retr = Retriever(store, emb, d / "cache")
        t0 = time.perf_counter()
        retr.keyword("warm", 1)  # builds the BM25 index once
        bm25_build = time.perf_counter() - t0
        for q in queries[:3]:  # warm both paths (first sqlite and LanceDB reads)
            retr.search(q, RetrieveConfig(mode="dense", k=5))
            retr.search(q, RetrieveConfig(mode="hybrid", k=5))
        dense, hybrid = [], []
        for q in queries:
            t = time.perf_counter()
            retr.search(q, RetrieveConfig(mode="dense", k=5))
            dense.append(1000 * (time.perf_counter() - t))
            t = time.perf_counter()
            retr.search(q, RetrieveConfig(mode="hybrid", k=5))
            hybrid.append(1000 * (time.perf_counter() - t))
        stages: dict[str, list[float]] = {"embed query": [], "vector search": [], "bm25": [], "gate (cache)": []}
        for q in queries:  # where a hybrid query's time goes, stage by stage
            t = time.perf_counter()
            qv = retr.embed_query(q)
            t1 = time.perf_counter()
            kw = retr.keyword_index()
            hits = retr.dense_known(qv, 20, None, kw)
            t2 = time.perf_counter()
            hits += retr.keyword(q, 20, None, kw)
            t3 = time.perf_counter()
            emb.embed([h.record.text for h in hits])
            t4 = time.perf_counter()
            for name, dt in zip(stages, (t1 - t, t2 - t1, t3 - t2, t4 - t3)):
                stages[name].append(1000 * dt)
        recall = []  # the store's top 20 (what hybrid search fuses) against an exact scan in numpy
        for q in queries:
            qv = retr.embed_query(q)
            exact = {f"r{i}:0" for i in np.argsort(-(all_vecs @ qv))[:20]}
            recall.append(len(exact & {h.record.id for h in store.search(qv, 20)}) / 20)
        indexed = f"ANN index: IVF_HNSW_SQ, refine {refine}" if store.has_index() else "exact scan"
        print(
            f"{size:>7} chunks ({indexed}; stored in {fill:.1f}s, BM25 built in {bm25_build:.1f}s): "
            f"dense p50 {statistics.median(dense):.1f} ms p95 {pct(dense, 95):.1f} ms | "
            f"hybrid p50 {statistics.median(hybrid):.1f} ms p95 {pct(hybrid, 95):.1f} ms"
        )
        print(f"  vector recall@20 against an exact scan: {np.mean(recall):.3f}")
        print("  hybrid by stage, p50: " + ", ".join(f"{k} {statistics.median(v):.1f} ms" for k, v in stages.items()))
        store.close()
        emb.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=200)
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--base", type=int, default=2000, help="paragraphs embedded for real for the latency runs")
    ap.add_argument("--queries", type=int, default=40)
    ap.add_argument("--refine", type=int, default=2, help="LanceStore refine_factor (k x this re-ranked exactly)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.docs:
            bench_ingest(args.docs, Path(tmp))
        sizes = [int(s) for s in args.sizes.split(",") if s]
        if sizes:
            bench_queries(sizes, min(args.base, max(sizes)), args.queries, Path(tmp), args.refine)


if __name__ == "__main__":
    main()
