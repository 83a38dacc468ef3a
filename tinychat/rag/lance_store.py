"""The default vector store: a LanceDB table in a directory, searched by cosine similarity.

Why LanceDB: it is embedded (no server to run, the knowledge base is a folder), columnar on disk (a
listing reads only the columns it needs, never the vectors), and it has ANN indexes that build on a CPU.
Below `index_threshold` chunks a search is an exact scan, which is fast at that size and has perfect
recall. From there `optimize()` builds an IVF_HNSW_SQ index: k-means partitions, an HNSW graph inside
each, vectors stored as 8-bit scalars. Why that one: on a CPU it built 3-5x faster than IVF_PQ on 25k
384-d vectors with the same recall (1.0 at k=10 on clustered data, 0.996 on pure noise) and latency, and
8-bit scalars lose far less than product quantisation. Each partition carries its own graph, so there are
far fewer, larger partitions than IVF_PQ's usual sqrt(n) (one per 100k rows, `_partitions`), and a search
probes at least four of them (all, up to 400k rows) or the nearest quarter, then re-ranks `refine_factor`
times k candidates with the full vectors: the reported scores are exact cosine similarities. refine_factor 2
found the exact top 20 (recall 1.000 against a numpy scan, bench/rag.py, 100k chunks, then 79 partitions) in
30 ms where 10 took 40 ms; 1 dropped recall to 0.969. When a narrow filter leaves fewer than k rows in those
partitions it probes further, so a filtered search still returns k hits. Chunks added after the index was
built are still found (LanceDB scans unindexed rows too) until the next `optimize()` folds them in. Filter
values go into the SQL through LanceDB's own literal printer (`lit(v).to_sql()`), which quotes them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa

from tinychat.errors import UserError
from tinychat.rag.store import RECORD_FIELDS, Where, check_vectors, to_hits
from tinychat.rag.types import ChunkRecord, Hit

VECTOR = "vector"
MIN_INDEX_ROWS = 256  # fewer rows give k-means too little to train on (and exact search is instant)


def _schema(dim: int) -> pa.Schema:
    ints = {"position", "start", "end"}
    cols = [pa.field(f, pa.int64() if f in ints else pa.string()) for f in RECORD_FIELDS]
    return pa.schema([*cols, pa.field(VECTOR, pa.list_(pa.float32(), dim))])


def _quote(value: str) -> str:
    """`value` as a SQL string literal, printed by LanceDB itself (quotes doubled)."""
    from lancedb.expr import lit

    return lit(value).to_sql()


def _sql(where: Where | None) -> str | None:
    """A LanceDB filter for `where` (None when it constrains nothing)."""
    if where is None or not where.conditions():
        return None
    terms = [
        f"starts_with(`{c}`, {_quote(v)})" if op == "prefix" else f"`{c}` = {_quote(v)}"
        for c, op, v in where.conditions()
    ]
    return " AND ".join(terms)


def _partitions(n: int) -> int:
    """IVF partitions for n rows: one per 100k, as each partition holds an HNSW graph of its own.

    Measured at 100k chunks (384-d, 2-core CPU, top 20, refine 2): one partition answered in 8.3 ms with
    recall 1.000 and took 53 s to build; 4 partitions 9.5 ms, 0.993, 31 s; 16 partitions 13-15 ms, 0.990,
    28 s; the earlier sqrt(n) / 4 = 79 partitions 27 ms, 1.000. Searching a few large graphs beats probing
    many small ones, and the build is a one-off beside embedding 100k chunks (~8 minutes on this CPU).
    """
    return max(1, math.ceil(n / 100_000))


class LanceStore:
    """Chunks with their vectors in `path`/`table`.lance (created on first open)."""

    def __init__(
        self,
        path: str | Path,
        dim: int,
        table: str = "chunks",
        index_threshold: int = 20_000,
        refine_factor: int = 2,
    ) -> None:
        import lancedb

        self.path = Path(path)
        self.dim = dim
        self.index_threshold = index_threshold
        self.refine_factor = refine_factor
        self.path.mkdir(parents=True, exist_ok=True)
        self._db = lancedb.connect(str(self.path))
        try:
            self._table = self._db.open_table(table)
        except ValueError:  # not there yet
            self._table = self._db.create_table(table, schema=_schema(dim), exist_ok=True)
        vec = self._table.schema.field(VECTOR).type if VECTOR in self._table.schema.names else None
        stored = getattr(vec, "list_size", None)
        if stored != dim:
            raise UserError(
                f"the vector store in {self.path} holds {stored}-dimensional vectors but the embedder makes {dim};"
                " use the embedder the knowledge base was built with, or rebuild it."
            )

    # ------------------------------------------------------------------ writes
    def add(self, records: list[ChunkRecord], vectors: np.ndarray) -> None:
        vecs = check_vectors(vectors, len(records), self.dim)
        if not records:
            return
        cols: dict[str, list | pa.Array] = {f: [getattr(r, f) for r in records] for f in RECORD_FIELDS}
        cols[VECTOR] = pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel()), self.dim)
        self._table.add(pa.Table.from_pydict(cols, schema=self._table.schema))

    def delete_sources(self, sources: list[str]) -> int:
        deleted = 0
        for i in range(0, len(sources), 500):  # keeps each IN (...) list a reasonable size
            listed = ", ".join(_quote(s) for s in sources[i : i + 500])
            deleted += int(self._table.delete(f"`source` IN ({listed})").num_deleted_rows)
        return deleted

    def optimize(self) -> None:
        """Build the IVF_HNSW_SQ index once count() >= index_threshold; otherwise compact and update the index."""
        n = self.count()
        if n >= max(self.index_threshold, MIN_INDEX_ROWS) and not self.has_index():
            from lancedb.index import HnswSq

            cfg = HnswSq(distance_type="cosine", num_partitions=_partitions(n))
            self._table.create_index(VECTOR, config=cfg, replace=True)
        else:
            self._table.optimize()  # merges small fragments, adds rows written since to an existing index

    def has_index(self) -> bool:
        return any(VECTOR in ix.columns for ix in self._table.list_indices())

    # ------------------------------------------------------------------ reads
    def search(self, vector: np.ndarray, k: int, where: Where | None = None) -> list[Hit]:
        rows = self._nearest(vector, k, where, list(RECORD_FIELDS))
        return to_hits(rows, [1.0 - r["_distance"] for r in rows])

    def search_ids(self, vector: np.ndarray, k: int, where: Where | None = None) -> list[tuple[str, float]]:
        """Reads no chunk text: at 100k chunks fetching the 20 texts from disk cost about as much as the search."""
        return [(r["id"], 1.0 - r["_distance"]) for r in self._nearest(vector, k, where, ["id"])]

    def _nearest(self, vector: np.ndarray, k: int, where: Where | None, columns: list[str]) -> list[dict]:
        if k <= 0:
            return []
        q = np.asarray(vector, dtype=np.float32).reshape(-1)
        query = (
            self._table.search(q, vector_column_name=VECTOR)
            .distance_type("cosine")
            .select([*columns, "_distance"])  # asked for: LanceDB warns when it adds it unasked
            .limit(k)
            .minimum_nprobes(max(4, math.ceil(_partitions(self.count()) / 4)))  # ignored by exact search
            .maximum_nprobes(0)  # more only when a narrow filter leaves fewer than k rows in those
            .refine_factor(self.refine_factor)
            .ef(max(100, 8 * k))  # HNSW candidate list: LanceDB's default lost 1.4% of the top 20 at 100k chunks
        )
        sql = _sql(where)
        if sql:
            query = query.where(sql, prefilter=True)
        return query.to_arrow().to_pylist()

    def _scan(self, columns: list[str], where: Where | None = None) -> pa.Table:
        query = self._table.search().select(columns).limit(None)
        sql = _sql(where)
        if sql:
            query = query.where(sql)
        return query.to_arrow()

    def records(self, where: Where | None = None) -> list[ChunkRecord]:
        rows = self._scan(list(RECORD_FIELDS), where).sort_by([("source", "ascending"), ("position", "ascending")])
        return [ChunkRecord(**r) for r in rows.to_pylist()]

    def sources(self) -> dict[str, str]:
        pairs = self._scan(["source", "content_hash"]).group_by(["source", "content_hash"]).aggregate([])
        return dict(zip(pairs["source"].to_pylist(), pairs["content_hash"].to_pylist()))

    def count(self) -> int:
        return int(self._table.count_rows())

    def version(self) -> str | None:
        """LanceDB's table version: every add, delete and optimize commits a new one (no data is read)."""
        return f"lance-{self._table.version}"

    def close(self) -> None:
        self._table = None  # LanceDB holds no server connection; dropping the handles releases the files
        self._db = None
