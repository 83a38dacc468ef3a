"""`tinychat eval`: the table, --out JSON, recording with --run/--stage, and one-sentence errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tinychat.cli import main


def test_eval_command_writes_json_and_records(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs = tmp_path / "runs"
    for sub in ("checkpoints", "world", "data"):  # a fresh run: no metrics.jsonl yet
        shutil.copytree(run_dir / sub, runs / "c" / sub)
    out = tmp_path / "res.json"
    argv = [
        "eval",
        "--run",
        "c",
        "--runs-dir",
        str(runs),
        "--stage",
        "pretrain",
        "--suite",
        "bpb,refusal,arithmetic",
        "--limit",
        "2",
        "--max-new-tokens",
        "4",
        "--bpb-tokens",
        "256",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "bits per byte" in printed and "refusal" in printed and "mode base" in printed
    res = json.loads(out.read_text())
    assert list(res["suites"]) == ["refusal", "arithmetic"] and res["bpb"]["tokens"] == 255
    lines = [json.loads(x) for x in (runs / "c" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["kind"], r["suite"]) for r in lines] == [
        ("pretrain", "eval_suite", "bpb"),
        ("pretrain", "eval_suite", "refusal"),
        ("pretrain", "eval_suite", "arithmetic"),
    ]
    assert lines[0]["val_bpb"] == res["bpb"]["bpb"] and lines[1]["accuracy"] == res["suites"]["refusal"]["accuracy"]
    assert "samples" not in lines[1]


def test_eval_with_model_and_files(tiny_model_dir: Path, world_dir: Path, tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n")
    argv = [
        "eval",
        "--model",
        str(tiny_model_dir),
        "--suite",
        "bpb",
        "--data",
        str(text),
        "--out",
        str(tmp_path / "o.json"),
    ]
    assert main(argv) == 0
    assert json.loads((tmp_path / "o.json").read_text())["suites"] == {}
    argv = [
        "eval",
        "--model",
        str(tiny_model_dir),
        "--world",
        str(world_dir),
        "--suite",
        "multistep",
        "--mode",
        "base",
        "--limit",
        "2",
        "--max-new-tokens",
        "4",
        "--cot-max-new-tokens",
        "4",
        "--out",
        str(tmp_path / "m.json"),
    ]
    assert main(argv) == 0
    ms = json.loads((tmp_path / "m.json").read_text())["suites"]["multistep"]
    assert ms["mode"] == "base" and set(ms["by_mode"]) == {"cot", "direct"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval"], "give --model"),
        (["eval", "--model", "/nonexistent/model", "--suite", "none"], "does not exist"),
        (["eval", "--model", "M", "--suite", "facts"], "is not known"),
        (["eval", "--model", "M", "--suite", "bpb"], "needs validation text"),
        (["eval", "--model", "M", "--suite", "refusal"], "need --world"),
        (["eval", "--run", "x", "--model", "M"], "needs --stage"),
    ],
)
def test_errors_are_one_sentence(
    argv: list[str], message: str, tiny_model_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = [str(tiny_model_dir) if a == "M" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
