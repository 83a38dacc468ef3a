"""Retrieval: dense top-k, BM25 keywords, reciprocal-rank fusion, MMR, metadata filters and a relevance gate.

Why both retrievers: dense embeddings match meaning ("Where was she born?" ~ "Birthplace: ..."), BM25
matches rare exact strings (names, numbers, product codes) that a 384-d sentence embedding blurs. Their
scores live on different scales, so hybrid search fuses RANKS, not scores: reciprocal rank fusion,
score(d) = sum over retrievers of w / (rrf_k + rank(d)), the standard from Cormack et al. (2009). The
weight w is 1, except that the dense vote counts `foreign_dense_weight` (default 0) for a query in a
language the embedder declares it was not trained on: all-MiniLM-L6-v2 is English-only, and on tinyworld's
Chinese questions its ranking is mostly noise. RRF with rrf_k=60 is flat (rank 1 scores 1/61, rank 2 1/62),
so even a quarter-weight noisy vote reorders BM25's near-perfect top ranks: measured on tinyworld, Chinese
recall@1 is 0.49 at weight 1, 0.65 at 0.25 and equals BM25's at 0 (docs/rag.md).

Why a gate on cosine similarity: fusion always returns k chunks, even for a question the documents know
nothing about. The answer step needs "nothing relevant" to be a real outcome so the assistant can say it
does not know; every candidate is therefore scored against the query embedding (chunk texts hit the
embedding cache, so this costs one query embedding) and dropped below `min_similarity`.

MMR (maximal marginal relevance) re-ranks the fused candidates greedily by
lambda * sim(query, d) - (1 - lambda) * max sim(d, already chosen), so five near-duplicate chunks of one
document do not crowd out the second document a question needs.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from tinychat.errors import UserError
from tinychat.rag.bm25 import BM25Index
from tinychat.rag.embed import Embedder
from tinychat.rag.store import VectorStore, Where
from tinychat.rag.types import ChunkRecord, Hit

MODES = ("dense", "bm25", "hybrid")


@dataclass
class RetrieveConfig:
    mode: str = "hybrid"  # dense | bm25 | hybrid
    k: int = 4  # chunks returned
    candidates: int = 20  # per retriever, before fusion and MMR
    rrf_k: int = 60
    foreign_dense_weight: float = 0.0  # the dense vote's weight for a query in a language the embedder lacks
    mmr: bool = False
    mmr_lambda: float = 0.7
    min_similarity: float = 0.0  # cosine(query, chunk) below this is "not relevant" (dropped)
    where: Where | None = None

    def check(self) -> RetrieveConfig:
        if self.mode not in MODES:
            raise UserError(f"retrieval mode must be one of {', '.join(MODES)}, got {self.mode!r}.")
        if self.k < 1 or self.candidates < 1:
            raise UserError(f"k and candidates must be at least 1, got k={self.k}, candidates={self.candidates}.")
        if not 0.0 <= self.mmr_lambda <= 1.0:
            raise UserError(f"mmr_lambda must be between 0 and 1, got {self.mmr_lambda}.")
        return self


def rrf(rankings: dict[str, list[Hit]], k: int, rrf_k: int = 60, weights: dict[str, float] | None = None) -> list[Hit]:
    """Reciprocal rank fusion of several best-first lists of hits (same chunk id = same chunk), optionally weighted."""
    fused: dict[str, Hit] = {}
    for name, hits in rankings.items():
        w = (weights or {}).get(name, 1.0)
        for rank, h in enumerate(hits, start=1):
            f = fused.setdefault(h.record.id, Hit(h.record, 0.0, scores={}))
            f.score += w / (rrf_k + rank)
            f.scores[name] = h.score
    out = sorted(fused.values(), key=lambda h: (-h.score, h.record.source, h.record.position))[:k]
    for r, h in enumerate(out, start=1):
        h.rank = r
    return out


def mmr(query: np.ndarray, vectors: np.ndarray, k: int, lam: float) -> list[int]:
    """Indices of `vectors` (unit rows) chosen greedily by maximal marginal relevance to `query`."""
    if len(vectors) == 0:
        return []
    rel = vectors @ query
    sim = vectors @ vectors.T
    chosen = [int(np.argmax(rel))]
    best_red = sim[chosen[0]].copy()
    while len(chosen) < min(k, len(vectors)):
        score = lam * rel - (1 - lam) * best_red
        score[chosen] = -np.inf
        j = int(np.argmax(score))
        chosen.append(j)
        best_red = np.maximum(best_red, sim[j])
    return chosen


@dataclass
class KeywordIndex:
    version: str  # a hash of every (source, content hash): names the index's file in the cache
    store_version: str | None  # the store's own change counter when it has one (VectorStore.version)
    records: list[ChunkRecord]
    index: BM25Index
    by_id: dict[str, ChunkRecord]


class Retriever:
    """Searches one store with one embedder; the BM25 index is rebuilt only when the store's contents change."""

    def __init__(self, store: VectorStore, embedder: Embedder, cache_dir: Path | None = None) -> None:
        self.store, self.embedder, self.cache_dir = store, embedder, cache_dir
        self._kw: KeywordIndex | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ the two retrievers
    def embed_query(self, query: str) -> np.ndarray:
        """Queries bypass the embedding cache: it is for chunk texts, and would grow with every question asked."""
        return getattr(self.embedder, "inner", self.embedder).embed([query])[0]

    def dense(self, query: str | np.ndarray, k: int, where: Where | None = None) -> list[Hit]:
        q = self.embed_query(query) if isinstance(query, str) else query
        return self.store.search(q, k, where)

    def dense_known(self, qv: np.ndarray, k: int, where: Where | None, kw: KeywordIndex) -> list[Hit]:
        """`dense`, with the chunks taken from the keyword index's records instead of read from the store.

        Hybrid search holds every record already (BM25 needs them), so the vector search only returns
        ids; a chunk written since the index was built is not in it, and then the store is asked as usual.
        """
        pairs = self.store.search_ids(qv, k, where)
        if not all(i in kw.by_id for i, _ in pairs):
            return self.dense(qv, k, where)
        return [Hit(kw.by_id[i], float(s), rank) for rank, (i, s) in enumerate(pairs, start=1)]

    def keyword(self, query: str, k: int, where: Where | None = None, kw: KeywordIndex | None = None) -> list[Hit]:
        kw = kw or self.keyword_index()
        allowed = None
        if where is not None:
            allowed = np.array([where.matches(r) for r in kw.records], dtype=bool)
        out = []
        for rank, (i, s) in enumerate(kw.index.search(query, k, allowed), start=1):
            out.append(Hit(kw.records[i], float(s), rank, {"bm25": float(s)}))
        return out

    def _version(self) -> str:
        items = sorted(self.store.sources().items())
        return hashlib.sha256(repr(items).encode()).hexdigest()[:16]

    def keyword_index(self) -> KeywordIndex:
        """The BM25 index of what the store holds now. Asking the store's version is free; only when it has
        moved (or the store has none) are all sources' hashes read: 36 ms a query at 100k chunks (12,500 sources)."""
        store_version = self.store.version()
        kw = self._kw
        if kw is not None and store_version is not None and kw.store_version == store_version:
            return kw
        version = self._version()
        with self._lock:
            if self._kw is not None and self._kw.version == version:
                self._kw.store_version = store_version
                return self._kw
            records = self.store.records()
            path = self.cache_dir / f"bm25-{version}.npz" if self.cache_dir else None
            index = None
            if path is not None and path.is_file():
                try:
                    index = BM25Index.load(path)
                except (OSError, ValueError):
                    index = None
                if index is not None and len(index) != len(records):
                    index = None
            if index is None:
                index = BM25Index([r.text for r in records])
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    for old in path.parent.glob("bm25-*.npz"):
                        old.unlink(missing_ok=True)
                    index.save(path)
            self._kw = KeywordIndex(version, store_version, records, index, {r.id: r for r in records})
            return self._kw

    def _dense_weight(self, query: str, cfg: RetrieveConfig) -> float:
        """1, or less when the embedder declares its languages and the query's is not one of them."""
        from tinychat.rag.answer import language

        langs = getattr(getattr(self.embedder, "inner", self.embedder), "languages", None)
        return 1.0 if not langs or language(query) in langs else cfg.foreign_dense_weight

    # ------------------------------------------------------------------ the pipeline
    def search(self, query: str, cfg: RetrieveConfig | None = None) -> list[Hit]:
        """Candidates from the configured retriever(s), fused, gated by similarity, optionally MMR-ranked."""
        cfg = (cfg or RetrieveConfig()).check()
        if not query.strip():
            return []
        qv = self.embed_query(query)
        n = max(cfg.candidates, cfg.k)
        if cfg.mode == "dense":
            hits = self.dense(qv, n, cfg.where)
            for h in hits:
                h.scores = {"dense": h.score}
        elif cfg.mode == "bm25":
            hits = self.keyword(query, n, cfg.where)
        else:
            kw = self.keyword_index()
            ranked = {"dense": self.dense_known(qv, n, cfg.where, kw), "bm25": self.keyword(query, n, cfg.where, kw)}
            hits = rrf(ranked, n, cfg.rrf_k, {"dense": self._dense_weight(query, cfg)})
        if not hits:
            return []
        vecs = self.embedder.embed([h.record.text for h in hits])  # cached at ingest: no model call
        sims = vecs @ qv
        keep = [i for i, s in enumerate(sims) if s >= cfg.min_similarity]
        for i, h in enumerate(hits):
            h.scores["similarity"] = float(sims[i])
        if cfg.mmr:
            order = [keep[j] for j in mmr(qv, vecs[keep], cfg.k, cfg.mmr_lambda)]
        else:
            order = keep[: cfg.k]
        out = [replace(hits[i], rank=r) for r, i in enumerate(order, start=1)]
        return out
