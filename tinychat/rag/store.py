"""The vector-store interface, the metadata filter, and the factory that opens a backend.

Why one small interface with two backends:
  * LanceDB (tinychat.rag.lance_store) is the default: embedded, a folder on disk, no server, an ANN
    index once the collection is large. A knowledge base is then just a directory you can copy.
  * PostgreSQL + pgvector (tinychat.rag.pg_store) is for teams that already run PostgreSQL: chunks sit
    next to their other data, with HNSW search and transactions.
Ingest, sync and retrieval only use the methods below, so they cannot tell the backends apart, and a
test checks that both give the same top-k on the same data. Scores are cosine similarity (higher is
better) in both. Filters are a fixed set of fields (`Where`), never free text: each backend turns them
into its own query with the values quoted by the database library, so a filter value cannot inject SQL.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from tinychat.errors import UserError
from tinychat.rag.types import ChunkRecord, Hit

RECORD_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(ChunkRecord))


@dataclass(frozen=True)
class Where:
    """Which chunks a search or listing may return: the AND of the fields given (None = no constraint)."""

    source: str | None = None  # exactly this source
    source_prefix: str | None = None  # sources starting with this (e.g. a folder's path + "/")
    kind: str | None = None
    lang: str | None = None

    def conditions(self) -> list[tuple[str, str, str]]:
        """(column, op, value) for each given field; op is "=" or "prefix"."""
        given = [
            ("source", "=", self.source),
            ("source", "prefix", self.source_prefix),
            ("kind", "=", self.kind),
            ("lang", "=", self.lang),
        ]
        return [(c, op, v) for c, op, v in given if v is not None]

    def matches(self, record: ChunkRecord) -> bool:
        """The same test in Python (for indexes outside the store, such as BM25)."""
        return all(
            getattr(record, c).startswith(v) if op == "prefix" else getattr(record, c) == v
            for c, op, v in self.conditions()
        )


@runtime_checkable
class VectorStore(Protocol):
    """Chunks and their embeddings, searchable by cosine similarity."""

    dim: int

    def add(self, records: list[ChunkRecord], vectors: np.ndarray) -> None:
        """Append chunks (row i of vectors embeds records[i]); replace a source with delete_sources first."""
        ...

    def delete_sources(self, sources: list[str]) -> int:
        """Remove every chunk of these sources; returns how many chunks went."""
        ...

    def search(self, vector: np.ndarray, k: int, where: Where | None = None) -> list[Hit]:
        """The k chunks most similar to `vector` (cosine), best first, Hit.rank from 1."""
        ...

    def search_ids(self, vector: np.ndarray, k: int, where: Where | None = None) -> list[tuple[str, float]]:
        """(chunk id, score) of `search`, best first, for callers that hold the records already."""
        ...

    def sources(self) -> dict[str, str]:
        """source -> content_hash of everything stored (what incremental sync compares against)."""
        ...

    def records(self, where: Where | None = None) -> list[ChunkRecord]:
        """All matching chunks, ordered by (source, position)."""
        ...

    def count(self) -> int: ...

    def version(self) -> str | None:
        """A value that changes whenever the contents do, cheap enough to ask on every query; None when the
        backend has none (callers then compare `sources()`, which reads every chunk's hash)."""
        ...

    def optimize(self) -> None:
        """Build or refresh the ANN index (and compact storage) after a batch of changes."""
        ...

    def close(self) -> None: ...


def check_vectors(vectors: np.ndarray, n: int, dim: int) -> np.ndarray:
    """vectors as a contiguous float32 [n, dim] array, or ValueError naming the wrong shape."""
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    if v.shape != (n, dim):
        raise ValueError(f"expected vectors of shape ({n}, {dim}), got {v.shape}.")
    return v


def to_hits(rows: list[dict], scores: list[float]) -> list[Hit]:
    """Hits (rank 1, 2, ...) from rows holding at least the ChunkRecord fields, already sorted best first."""
    return [
        Hit(ChunkRecord(**{f: row[f] for f in RECORD_FIELDS}), float(s), rank=i)
        for i, (row, s) in enumerate(zip(rows, scores), start=1)
    ]


def open_store(kind: str, location: str, dim: int, **options: Any) -> VectorStore:
    """ "lance" with a directory, or "pgvector" with a PostgreSQL DSN (postgresql://user@host/db).

    `options` go to the backend: LanceStore(table, index_threshold, refine_factor), PgVectorStore(table, ef_search).
    """
    if kind == "lance":
        from tinychat.rag.lance_store import LanceStore

        return LanceStore(Path(location), dim, **options)
    if kind == "pgvector":
        from tinychat.rag.pg_store import PgVectorStore

        return PgVectorStore(location, dim, **options)
    raise UserError(f"unknown vector store {kind!r}: use 'lance' (a directory) or 'pgvector' (a PostgreSQL DSN).")
