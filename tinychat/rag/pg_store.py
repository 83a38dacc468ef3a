"""The PostgreSQL + pgvector store: chunks in one table, an HNSW index with cosine distance.

Why this layout: one row per chunk with the ChunkRecord fields as plain columns (filters and listings
are ordinary SQL, a btree on (source, position) serves deletes and ordered listings) and the embedding
as `vector(dim)`. The HNSW index is created with the table, because pgvector keeps it up to date on
every insert and it needs no training data (unlike IVF); `ef_search` sets how many candidates a search
keeps (pgvector's default is 40; at ef_search >= the row count the search is exact). With a filter,
pgvector >= 0.8 is told to keep scanning the graph until k rows pass it (`hnsw.iterative_scan`), so a
selective filter still returns k hits.
Safety: every value travels as a query parameter, the table name must be a plain identifier and is
quoted by psycopg, and session settings go through set_config(...) with parameters, never string SQL.
Rows are written with COPY, the fastest way into PostgreSQL; vectors travel in pgvector's text form.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import numpy as np

from tinychat.errors import UserError
from tinychat.rag.store import RECORD_FIELDS, Where, check_vectors, to_hits
from tinychat.rag.types import ChunkRecord, Hit

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")  # PostgreSQL keeps 63 characters of a name
_INT_FIELDS = {"position", "start", "end"}


def _vector_text(v: np.ndarray) -> str:
    """pgvector's text form of a float32 row: "[x1,x2,...]" (float32 -> shortest exact decimal)."""
    return "[" + ",".join(map(str, v.tolist())) + "]"


class PgVectorStore:
    """Chunks with their embeddings in PostgreSQL table `table` (created, with its indexes, if missing)."""

    def __init__(self, dsn: str, dim: int, table: str = "tinychat_chunks", ef_search: int = 100) -> None:
        try:
            import psycopg
            from psycopg import sql
            from psycopg.rows import dict_row
        except ImportError as e:
            raise UserError(
                "the pgvector store needs psycopg 3; install it with `pip install 'psycopg[binary]'`."
            ) from e
        if not IDENTIFIER.fullmatch(table):
            raise UserError(f"invalid table name {table!r}: use letters, digits and _ (at most 63, not first a digit).")
        self.dim = dim
        self.table = table
        self.ef_search = ef_search
        self._sql = sql
        self._t = sql.Identifier(table)
        try:
            self._conn = psycopg.connect(dsn, autocommit=True, row_factory=dict_row)
        except psycopg.OperationalError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot connect to PostgreSQL for the vector store: {first}") from e
        try:
            try:
                self._conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            except psycopg.Error as e:
                raise UserError(f"PostgreSQL could not enable the pgvector extension (is it installed?): {e}") from e
            self._create_table()
        except BaseException:
            self._conn.close()
            raise
        version = self._conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
        self._iterative = tuple(int(x) for x in re.findall(r"\d+", version["extversion"])[:2]) >= (0, 8)

    def _create_table(self) -> None:
        sql = self._sql
        types = {f: "integer" if f in _INT_FIELDS else "text" for f in RECORD_FIELDS}
        types["source"] = 'text COLLATE "C"'  # byte order, like LanceDB: listings sort the same in both stores
        cols = [sql.SQL("{} {} NOT NULL").format(sql.Identifier(f), sql.SQL(t)) for f, t in types.items()]
        cols.append(sql.SQL("embedding vector({}) NOT NULL").format(sql.Literal(self.dim)))
        ix, hnsw = (sql.Identifier(self._index_name(what)) for what in ("source", "hnsw"))
        self._conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(self._t, sql.SQL(", ").join(cols)))
        stored = self._conn.execute(
            "SELECT atttypmod FROM pg_attribute WHERE attrelid = %s::regclass AND attname = 'embedding'",
            [self._t.as_string(self._conn)],
        ).fetchone()
        if stored is None or stored["atttypmod"] != self.dim:
            got = None if stored is None else stored["atttypmod"]
            raise UserError(
                f"PostgreSQL table {self.table} holds {got}-dimensional vectors but the embedder makes {self.dim};"
                " use the embedder the knowledge base was built with, or another table."
            )
        self._conn.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (source, position)").format(ix, self._t))
        self._conn.execute(
            sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} USING hnsw (embedding vector_cosine_ops)").format(
                hnsw, self._t
            )
        )

    def _index_name(self, what: str) -> str:
        """`{table}_{what}`, or for a long table name its first 40 characters + a hash (fits in 63, stays unique)."""
        if len(self.table) + len(what) < 63:
            return f"{self.table}_{what}"
        return f"{self.table[:40]}_{hashlib.sha256(self.table.encode()).hexdigest()[:8]}_{what}"

    def _where(self, where: Where | None) -> tuple[Any, list[str]]:
        """(" WHERE ..." or "", its parameters)."""
        sql = self._sql
        conds = where.conditions() if where is not None else []
        if not conds:
            return sql.SQL(""), []
        terms = [
            sql.SQL("starts_with({}, %s)" if op == "prefix" else "{} = %s").format(sql.Identifier(c))
            for c, op, _ in conds
        ]
        return sql.SQL(" WHERE ") + sql.SQL(" AND ").join(terms), [v for _, _, v in conds]

    @property
    def _columns(self) -> Any:
        return self._sql.SQL(", ").join(map(self._sql.Identifier, RECORD_FIELDS))

    # ------------------------------------------------------------------ writes
    def add(self, records: list[ChunkRecord], vectors: np.ndarray) -> None:
        vecs = check_vectors(vectors, len(records), self.dim)
        if not records:
            return
        sql = self._sql
        copy_sql = sql.SQL("COPY {} ({}, embedding) FROM STDIN").format(self._t, self._columns)
        with self._conn.transaction(), self._conn.cursor() as cur, cur.copy(copy_sql) as copy:
            for r, v in zip(records, vecs):
                copy.write_row([*(getattr(r, f) for f in RECORD_FIELDS), _vector_text(v)])

    def delete_sources(self, sources: list[str]) -> int:
        if not sources:
            return 0
        with self._conn.cursor() as cur:
            cur.execute(self._sql.SQL("DELETE FROM {} WHERE source = ANY(%s)").format(self._t), [list(sources)])
            return cur.rowcount

    def optimize(self) -> None:
        """VACUUM ANALYZE: drops deleted rows from the table and the HNSW graph, refreshes planner statistics."""
        self._conn.execute(self._sql.SQL("VACUUM (ANALYZE) {}").format(self._t))

    # ------------------------------------------------------------------ reads
    def search(self, vector: np.ndarray, k: int, where: Where | None = None) -> list[Hit]:
        if k <= 0:
            return []
        sql = self._sql
        cond, params = self._where(where)
        query = sql.SQL("SELECT {}, embedding <=> %s::vector AS distance FROM {}{} ORDER BY distance LIMIT %s").format(
            self._columns, self._t, cond
        )
        q = _vector_text(np.asarray(vector, dtype=np.float32).reshape(-1))
        with self._conn.transaction(), self._conn.cursor() as cur:  # set_config(..., true) lasts this transaction
            ef = min(1000, max(self.ef_search, k))  # pgvector accepts 1 to 1000
            cur.execute("SELECT set_config('hnsw.ef_search', %s, true)", [str(ef)])
            if self._iterative and params:
                cur.execute("SELECT set_config('hnsw.iterative_scan', 'strict_order', true)")
            rows = cur.execute(query, [q, *params, k]).fetchall()
        return to_hits(rows, [1.0 - r["distance"] for r in rows])

    def search_ids(self, vector: np.ndarray, k: int, where: Where | None = None) -> list[tuple[str, float]]:
        return [(h.record.id, h.score) for h in self.search(vector, k, where)]

    def records(self, where: Where | None = None) -> list[ChunkRecord]:
        cond, params = self._where(where)
        query = self._sql.SQL("SELECT {} FROM {}{} ORDER BY source, position").format(self._columns, self._t, cond)
        return [ChunkRecord(**r) for r in self._conn.execute(query, params).fetchall()]

    def sources(self) -> dict[str, str]:
        query = self._sql.SQL("SELECT DISTINCT source, content_hash FROM {}").format(self._t)
        return {r["source"]: r["content_hash"] for r in self._conn.execute(query).fetchall()}

    def count(self) -> int:
        return int(self._conn.execute(self._sql.SQL("SELECT count(*) AS n FROM {}").format(self._t)).fetchone()["n"])

    def version(self) -> str | None:
        """None: PostgreSQL keeps no cheap per-table change counter, so retrieval compares sources()."""
        return None

    def close(self) -> None:
        self._conn.close()
