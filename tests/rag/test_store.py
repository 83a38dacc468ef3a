"""The LanceDB store: CRUD, filters (quotes in values), persistence, dimension check, the ANN index path."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from tinychat.errors import UserError
from tinychat.rag.lance_store import LanceStore
from tinychat.rag.store import VectorStore, Where, open_store
from tinychat.rag.types import ChunkRecord

DIM = 16
QUOTED = 'docs/it\'s "quoted"; DROP TABLE chunks; --.md'  # every filter value must be data, never SQL


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    v = rng.normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def make_records(sources: dict[str, int], kind: str = "md", lang: str = "en") -> list[ChunkRecord]:
    """`n` chunks per source, ids and hashes derived from the source name."""
    out = []
    for src, n in sources.items():
        h = hashlib.sha256(src.encode()).hexdigest()
        for i in range(n):
            out.append(
                ChunkRecord(
                    id=f"{h[:16]}:{i}",
                    source=src,
                    title=f"Title of {src}",
                    heading=f"Section {i}",
                    position=i,
                    start=10 * i,
                    end=10 * i + 9,
                    text=f"chunk {i} of {src}",
                    content_hash=h,
                    kind=kind,
                    lang=lang,
                )
            )
    return out


def make_corpus() -> tuple[list[ChunkRecord], np.ndarray]:
    """10 chunks over 5 sources (one with quotes and SQL in its name, one Chinese txt) and their vectors."""
    recs = (
        make_records({"docs/a.md": 3, "docs/b.md": 2, QUOTED: 2})
        + make_records({"notes/zh.txt": 2}, kind="txt", lang="zh")
        + make_records({"docs.md": 1})  # shares the "docs" prefix but not "docs/"
    )
    return recs, unit(np.random.default_rng(0), len(recs))


# ---------------------------------------------------------------------------------------------- the contract
# Written against the VectorStore interface only; tests/rag/test_pgvector.py runs them on PostgreSQL too.
def check_crud(store: VectorStore) -> None:
    """add / search / sources / records / delete_sources on an empty store of dimension DIM."""
    recs, vecs = make_corpus()
    assert isinstance(store, VectorStore) and store.count() == 0 and store.search(vecs[0], 3) == []
    v0 = store.version()
    store.add(recs, vecs)
    store.add([], np.zeros((0, DIM), np.float32))
    assert store.count() == len(recs)
    v1 = store.version()
    assert v0 is None or v1 != v0  # a store with a version moves it on every write

    assert store.search_ids(vecs[4], 3) == [(h.record.id, pytest.approx(h.score)) for h in store.search(vecs[4], 3)]

    hits = store.search(vecs[4], 3)
    assert [h.rank for h in hits] == [1, 2, 3]
    assert hits[0].record == recs[4] and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert hits[0].score >= hits[1].score >= hits[2].score
    exact = np.argsort(-(vecs @ vecs[4]))[:3]  # brute force
    assert [h.record.id for h in hits] == [recs[i].id for i in exact]
    assert [h.score for h in hits] == pytest.approx(list((vecs @ vecs[4])[exact]), abs=1e-5)

    assert store.sources() == {r.source: r.content_hash for r in recs}
    listed = store.records()
    assert [(r.source, r.position) for r in listed] == sorted((r.source, r.position) for r in recs)
    assert sorted(listed, key=lambda r: r.id) == sorted(recs, key=lambda r: r.id)

    assert store.version() == v1  # reads do not move it
    assert store.delete_sources(["docs/a.md", "never-there"]) == 3
    assert v1 is None or store.version() != v1
    assert store.count() == len(recs) - 3 and "docs/a.md" not in store.sources()
    assert all(h.record.source != "docs/a.md" for h in store.search(vecs[0], 20))
    assert store.delete_sources([]) == 0


def check_filters(store: VectorStore) -> None:
    """Every Where field, alone and combined, with values that would break naive SQL."""
    recs, vecs = make_corpus()
    store.add(recs, vecs)

    def ids(where: Where) -> set[str]:
        return {h.record.id for h in store.search(vecs[0], 50, where)}

    assert ids(Where(source=QUOTED)) == {r.id for r in recs if r.source == QUOTED}
    assert {r.source for r in store.records(Where(source=QUOTED))} == {QUOTED}
    assert ids(Where(source_prefix="docs/")) == {r.id for r in recs if r.source.startswith("docs/")}
    assert ids(Where(source_prefix="docs/it's")) == {r.id for r in recs if r.source == QUOTED}
    assert ids(Where(lang="zh")) == {r.id for r in recs if r.lang == "zh"}
    assert ids(Where(kind="md", source_prefix="docs")) == {r.id for r in recs if r.kind == "md"}
    assert ids(Where(kind="txt", lang="en")) == set()
    assert ids(Where(source="x' OR '1'='1")) == set()
    assert len(store.search(vecs[0], 2, Where(source_prefix="docs/"))) == 2
    for where in (Where(source_prefix="docs"), Where(source="docs.md", kind="md"), Where(lang="en", kind="md")):
        assert ids(where) == {r.id for r in recs if where.matches(r)}  # Where.matches is the same test
        assert store.records(where) == sorted(filter(where.matches, recs), key=lambda r: (r.source, r.position))
    assert store.delete_sources([QUOTED]) == 2 and store.count() == len(recs) - 2


# ---------------------------------------------------------------------------------------------- LanceDB
def test_lance_crud(tmp_path: Path):
    store = LanceStore(tmp_path / "kb", DIM)
    check_crud(store)
    store.close()


def test_lance_filters(tmp_path: Path):
    check_filters(LanceStore(tmp_path / "kb", DIM))


def test_reopen_keeps_data_and_checks_dimension(tmp_path: Path):
    recs, vecs = make_corpus()
    store = LanceStore(tmp_path / "kb", DIM)
    store.add(recs, vecs)
    store.close()
    again = open_store("lance", str(tmp_path / "kb"), DIM)
    assert again.count() == len(recs) and again.search(vecs[2], 1)[0].record == recs[2]
    with pytest.raises(UserError, match="holds 16-dimensional vectors but the embedder makes 384"):
        LanceStore(tmp_path / "kb", 384)
    with pytest.raises(ValueError, match="shape"):
        again.add(recs[:2], vecs[:3])
    with pytest.raises(UserError, match="unknown vector store"):
        open_store("faiss", str(tmp_path), DIM)


def test_ann_index_keeps_recall(tmp_path: Path):
    rng = np.random.default_rng(1)
    vecs = unit(rng, 600, 32)
    recs = make_records({f"src{i}.md": 60 for i in range(10)})
    store = LanceStore(tmp_path / "kb", 32, index_threshold=500)
    store.add(recs[:400], vecs[:400])
    store.optimize()
    assert not store.has_index()  # below the threshold: exact search only
    store.add(recs[400:], vecs[400:])
    store.optimize()
    assert store.has_index()
    top1 = [store.search(vecs[i], 1)[0] for i in range(0, 600, 7)]
    assert [h.record.id for h in top1] == [recs[i].id for i in range(0, 600, 7)]
    assert all(h.score == pytest.approx(1.0, abs=1e-4) for h in top1)  # refined: exact cosine, not PQ estimates

    extra = make_records({"late.md": 1})  # added after the index: still found
    late = unit(rng, 1, 32)
    store.add(extra, late)
    assert store.search(late[0], 1)[0].record.id == extra[0].id
    hits = store.search(vecs[3], 5, Where(source="src0.md"))
    assert hits[0].record.id == recs[3].id and all(h.record.source == "src0.md" for h in hits) and len(hits) == 5
    store.optimize()  # folds the late rows into the index
    assert store.search(late[0], 1)[0].record.id == extra[0].id
