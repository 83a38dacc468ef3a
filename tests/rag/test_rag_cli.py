"""`tinychat rag ingest|list|query|ask|remove` and `tinychat agent` end to end through the CLI, and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tinychat.cli import main

DOCS = {
    "ada.md": "# Ada Quill\n\nAda Quill was born in 1961 in Porthaven. She works as a glassblower.\n",
    "porthaven.txt": "Porthaven\n\nPorthaven is a harbour city. Its landmark is the Copper Lighthouse.\n",
}


@pytest.fixture()
def docs(tmp_path: Path) -> Path:
    d = tmp_path / "docs"
    d.mkdir()
    for name, text in DOCS.items():
        (d / name).write_text(text)
    return d


def test_ingest_list_query_remove(docs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kb = str(tmp_path / "kb")
    assert main(["rag", "ingest", str(docs), "--kb", kb, "--chunk-size", "300", "--overlap", "30"]) == 0
    assert "2 added" in capsys.readouterr().out
    assert main(["rag", "ingest", str(docs), "--kb", kb]) == 0
    assert "0 added, 0 updated, 2 unchanged" in capsys.readouterr().out
    assert main(["rag", "list", "--kb", kb, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert sorted(d["name"] for d in listed) == ["ada.md", "porthaven.txt"]
    assert main(["rag", "query", "Copper Lighthouse", "--kb", kb, "--k", "1", "--json"]) == 0
    top = json.loads(capsys.readouterr().out)[0]
    assert top["source"] == "porthaven.txt" and top["rank"] == 1
    assert main(["rag", "remove", "ada.md", "--kb", kb]) == 0
    assert main(["rag", "list", "--kb", kb]) == 0
    assert "1 documents" in capsys.readouterr().out


def test_ask_with_a_local_model(docs: Path, tmp_path: Path, tiny_model_dir: Path, capsys) -> None:  # noqa: ANN001
    kb = str(tmp_path / "kb")
    assert main(["rag", "ingest", str(docs), "--kb", kb]) == 0
    capsys.readouterr()
    q = "When was Ada Quill born?"
    assert main(["rag", "ask", q, "--kb", kb, "--model", str(tiny_model_dir), "--json", "--max-tokens", "4"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["status"] == "answered" and res["sources"][0]["name"] == "ada.md"
    assert main(["rag", "ask", "Explain lattice gauge theory", "--kb", kb, "--model", str(tiny_model_dir)]) == 0
    assert "don't know" in capsys.readouterr().out


def test_errors_are_one_sentence_and_exit_2(tmp_path: Path, docs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rag", "ingest", "--kb", str(tmp_path / "kb")]) == 2
    assert main(["rag", "ingest", str(tmp_path / "missing"), "--kb", str(tmp_path / "kb")]) == 2
    assert main(["rag", "list", "--kb", str(tmp_path / "nokb")]) == 2
    assert main(["rag", "ingest", str(docs), "--kb", str(tmp_path / "kb2"), "--store", "chroma"]) == 2
    assert main(["rag", "ingest", str(docs), "--kb", str(tmp_path / "kb3"), "--overlap", "900"]) == 2
    assert main(["rag", "query", "x", "--kb", str(tmp_path / "nokb"), "--mode", "magic"]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 6 and all(line.startswith("error: ") for line in err.strip().splitlines())
    assert not (tmp_path / "kb2").exists() and not (tmp_path / "kb3").exists()  # a refused setting writes nothing


def test_tinychat_embedder_with_token_chunks(docs: Path, tmp_path: Path, tiny_model_dir: Path, capsys) -> None:  # noqa: ANN001
    kb = str(tmp_path / "kb")
    args = ["--embedder", f"tinychat:{tiny_model_dir}", "--unit", "tokens", "--chunk-size", "24", "--overlap", "4"]
    assert main(["rag", "ingest", str(docs), "--kb", kb, *args]) == 0
    assert main(["rag", "list", "--kb", kb, "--json"]) == 0
    assert sum(d["chunks"] for d in json.loads(capsys.readouterr().out.split("\n", 1)[1])) > 2


def test_agent_cli_runs_tools_and_writes_a_trace(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:  # noqa: ANN001
    trace = tmp_path / "t.jsonl"
    code = main(
        ["agent", "What is 2 + 2?", "--model", str(tiny_model_dir), "--workspace", str(tmp_path / "ws")]
        + ["--max-steps", "2", "--max-tokens", "8", "--trace", str(trace), "--json"]
    )
    assert code in (0, 1)  # a random model may or may not stop on its own within two steps
    res = json.loads(capsys.readouterr().out)
    assert res["model_calls"] >= 1 and res["stopped"] in ("answer", "max_steps")
    assert [json.loads(x)["kind"] for x in trace.read_text().splitlines()][-1] == "final"
    assert main(["agent", "", "--model", str(tiny_model_dir)]) == 2
    assert main(["agent", "x", "--model", str(tiny_model_dir), "--base-url", "http://127.0.0.1:9"]) == 2
