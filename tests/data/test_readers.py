"""Readers: every format streams documents in a deterministic order; bad input is reported, not fatal."""

from __future__ import annotations

import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tinychat.data.readers import Document, ReadError, iter_documents, iter_texts
from tinychat.errors import UserError


def _collect(paths, **kw):
    errors: list[ReadError] = []
    docs = list(iter_documents(paths, on_error=errors.append, **kw))
    return docs, errors


def test_formats_and_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("\ufeffplain text", encoding="utf-8")
    (tmp_path / "b" / "c.md").write_text("# title\nbody", encoding="utf-8")
    (tmp_path / "b" / "d.jsonl").write_text('{"text": "j0"}\n\n{"text": "j2", "x": 1}\n', encoding="utf-8")
    with gzip.open(tmp_path / "b" / "e.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write('{"text": "g0"}\n')
    pq.write_table(pa.table({"text": ["p0", "p1", "p2"]}), tmp_path / "f.parquet", row_group_size=2)
    (tmp_path / "notes.json").write_text("{}")  # unsupported: ignored and reported
    ignored = []
    docs = list(iter_documents(tmp_path, on_ignored=ignored.append))
    assert [(os.path.relpath(d.source, tmp_path), d.index, d.text) for d in docs] == [
        ("a.txt", 0, "plain text"),
        ("f.parquet", 0, "p0"),
        ("f.parquet", 1, "p1"),
        ("f.parquet", 2, "p2"),
        ("b/c.md", 0, "# title\nbody"),
        ("b/d.jsonl", 0, "j0"),
        ("b/d.jsonl", 2, "j2"),
        ("b/e.jsonl.gz", 0, "g0"),
    ]
    assert [p.name for p in ignored] == ["notes.json"]
    assert isinstance(docs[0], Document)


def test_named_field(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"content": "a"}\n{"text": "b"}\n')
    pq.write_table(pa.table({"content": ["c"]}), tmp_path / "y.parquet")
    docs, errors = _collect([tmp_path / "x.jsonl", tmp_path / "y.parquet"], text_field="content")
    assert [d.text for d in docs] == ["a", "c"]
    assert len(errors) == 1 and "missing field 'content'" in errors[0].reason and errors[0].index == 1


def test_bad_input_is_reported_with_file_and_reason(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 latin-1")
    (tmp_path / "lines.jsonl").write_bytes(
        b'{"text": "ok"}\n{broken\n{"text": 5}\n[1, 2]\n{"text": "\xff"}\n{"text": "a\\ud800"}\n{"text": "ok2"}\n'
    )
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"text": [f"r{i}" for i in range(50)]}), good, row_group_size=10)
    (tmp_path / "trunc.parquet").write_bytes(good.read_bytes()[:300])
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocol.parquet")
    data = gzip.compress(b"".join(b'{"text": "g%d"}\n' % i for i in range(2000)))
    (tmp_path / "trunc.jsonl.gz").write_bytes(data[: len(data) // 2])
    docs, errors = _collect(tmp_path)
    texts = [d.text for d in docs]
    assert "ok" in texts and "ok2" in texts and texts.count("r0") == 1
    assert texts[: texts.index("r0")] == [], "good.parquet sorts first and is read whole"
    assert [f"g{i}" for i in range(10)] == [t for t in texts if t.startswith("g")][:10]
    by_file = {}
    for e in errors:
        by_file.setdefault(os.path.basename(e.source), []).append(e)
    assert "invalid UTF-8" in by_file["bad.txt"][0].reason and by_file["bad.txt"][0].n_bytes == 12
    reasons = [e.reason for e in by_file["lines.jsonl"]]
    assert len(reasons) == 5
    assert "bad JSON" in reasons[0] and "is int" in reasons[1] and "JSON object" in reasons[2]
    assert "invalid UTF-8" in reasons[3] and "surrogate" in reasons[4]
    assert [e.index for e in by_file["lines.jsonl"]] == [1, 2, 3, 4, 5]
    assert "Parquet" in by_file["trunc.parquet"][0].reason
    assert "missing column 'body'" not in by_file["nocol.parquet"][0].reason
    assert "missing column 'text'" in by_file["nocol.parquet"][0].reason
    assert "unreadable" in by_file["trunc.jsonl.gz"][0].reason


def test_default_on_error_is_strict(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(UserError, match="bad.txt"):
        list(iter_documents(tmp_path / "bad.txt"))
    assert list(iter_texts(tmp_path)) == []  # iter_texts skips by default


def test_missing_path_and_unknown_suffix_raise_at_call(tmp_path):
    with pytest.raises(UserError, match="nope"):
        iter_documents([tmp_path / "nope"])  # before the first next()
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(UserError, match="unknown format"):
        iter_documents(tmp_path / "x.csv")


def test_parquet_is_read_by_row_group(tmp_path, monkeypatch):
    path = tmp_path / "big.parquet"
    pq.write_table(
        pa.table({"text": [str(i) for i in range(1000)], "other": list(range(1000))}),
        path,
        row_group_size=100,
    )

    def whole_file(*a, **k):
        raise AssertionError("read the whole file")

    monkeypatch.setattr(pq.ParquetFile, "read", whole_file)
    monkeypatch.setattr(pq, "read_table", whole_file)
    docs = list(iter_documents(path))
    assert [d.text for d in docs] == [str(i) for i in range(1000)] and docs[-1].index == 999


def test_prepared_directory_reads_only_its_shards(tmp_path):
    (tmp_path / "part-00000.jsonl").write_text('{"text": "kept"}\n')
    (tmp_path / "summary.md").write_text("# not a document")
    (tmp_path / "stats.json").write_text(
        json.dumps({"kind": "tinychat.prepared", "shards": [{"file": "part-00000.jsonl"}]})
    )
    assert [d.text for d in iter_documents(tmp_path)] == ["kept"]


def test_hf_dataset_dir(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["h0", "h1"], "n": [0, 1]}).save_to_disk(tmp_path / "ds")
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"body": ["t0"]}),
            "test": datasets.Dataset.from_dict({"body": ["s0"]}),
        }
    )
    dd.save_to_disk(tmp_path / "dd")
    assert [d.text for d in iter_documents(tmp_path / "ds")] == ["h0", "h1"]
    docs = list(iter_documents(tmp_path / "dd", text_field="body"))
    assert [(d.text, d.source.endswith("[test]")) for d in docs] == [("s0", True), ("t0", False)]
    # found inside a directory walk too, without descending into its arrow files
    assert sorted(d.text for d in iter_documents(tmp_path, on_error=lambda e: None)) == ["h0", "h1"]


def test_hf_dataset_without_datasets_installed(tmp_path, monkeypatch):
    import builtins

    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "state.json").write_text("{}")
    (tmp_path / "ds" / "dataset_info.json").write_text("{}")
    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(UserError, match="pip install datasets"):
        list(iter_documents(tmp_path / "ds"))
