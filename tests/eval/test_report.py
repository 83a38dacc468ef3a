"""The report card shows exactly the numbers the run recorded (metrics.jsonl, timings.json, environment.json)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tinychat.cli import main
from tinychat.errors import UserError
from tinychat.eval.report import fmt_count, fmt_pct, fmt_rate, fmt_seconds, shared_accuracy, wilson, write_report

ENV = {
    "hardware": {
        "cpu": "Test CPU 9000",
        "cores": 2,
        "logical_cpus": 2,
        "ram_bytes": 8 * 2**30,
        "gpus": [],
        "torch_threads": 2,
    },
    "versions": {"python": "3.11.7", "torch": "2.13.0+cpu", "tinychat": "0.1.0", "platform": "Linux"},
    "git": {"commit": "0123456789abcdef", "dirty": False},
}
TIMINGS = {"world": 1.25, "tokenizer": 3.5, "data": 7.75, "pretrain": 480.0, "sft": 95.5}


def suite(stage: str, name: str, acc: float, n: int, mode: str, **extra: object) -> dict:
    return {
        "stage": stage,
        "kind": "eval_suite",
        "step": 0,
        "time": 0,
        "suite": name,
        "mode": mode,
        "params": 6_800_000,
        "accuracy": acc,
        "n": n,
        "by_lang": {"en": {"accuracy": acc, "n": n // 2}, "zh": {"accuracy": acc, "n": n - n // 2}},
        **extra,
    }


def records() -> list[dict]:
    out = []
    for step in range(1, 6):
        out.append(
            {
                "stage": "pretrain",
                "kind": "train",
                "step": step,
                "time": 0,
                "loss": 9.0 - step,
                "lr": 1e-3,
                "grad_norm": 1.0,
                "tokens": 4096 * step,
                "tok_per_s": 9000.0 + 100 * step,
                "mfu": 0.1 + 0.01 * step,
                "step_time": 0.4,
                "elapsed": 0.4 * step,
            }
        )
    out.append({"stage": "pretrain", "kind": "eval", "step": 5, "time": 0, "val_loss": 3.75, "val_bpb": 1.2345})
    peak = {"peak_flops": 9e11, "probe_min": 4e11, "probe_median": 8e11, "probe_max": 9e11, "source": "probe"}
    out.append({"stage": "pretrain", "kind": "peak", "step": 0, "time": 0, **peak})
    for step in range(1, 4):
        out.append(
            {
                "stage": "sft",
                "kind": "train",
                "step": step,
                "time": 0,
                "loss": 2.0 - 0.5 * step,
                "lr": 1e-4,
                "grad_norm": 1.0,
                "tokens": 1000 * step,
                "tok_per_s": 5000.0,
                "mfu": 0.05,
                "step_time": 0.2,
                "elapsed": 0.2 * step,
            }
        )
    out += [
        suite(
            "pretrain",
            "bpb",
            None,
            0,
            "base",
            val_bpb=1.5,
            val_loss=3.9,
            val_ppl=49.4,
            val_tokens=16384,
            source="runs/x/data/tokens",
        ),
        suite("pretrain", "facts_trained", 0.125, 40, "base"),
        suite("pretrain", "facts_trained", 0.25, 40, "base"),  # re-evaluated: the latest line wins
        suite(
            "pretrain",
            "multistep",
            0.1,
            40,
            "base",
            by_mode={"cot": {"accuracy": 0.15, "n": 20}, "direct": {"accuracy": 0.05, "n": 20}},
        ),
        suite(
            "sft",
            "bpb",
            None,
            0,
            "chat",
            val_bpb=1.5625,
            val_loss=4.0,
            val_ppl=54.6,
            val_tokens=16384,
            source="runs/x/data/tokens",
        ),
        suite("sft", "facts_trained", 0.625, 40, "chat"),
        suite(
            "sft",
            "arithmetic_tool",
            0.375,
            40,
            "chat",
            tool={"calls": 30, "valid_calls": 27, "validity_rate": 0.9, "use_rate": 0.75, "rounds": 2},
        ),
    ]
    return out


@pytest.fixture
def hand_run(tmp_path: Path) -> Path:
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records()) + '{"torn line\n')
    (run / "timings.json").write_text(json.dumps(TIMINGS))
    (run / "environment.json").write_text(json.dumps(ENV))
    return run


def test_report_numbers_equal_the_recorded_ones(hand_run: Path) -> None:
    path = write_report(hand_run)
    md = path.read_text()
    assert path == hand_run / "report.md"
    # machine and software, from environment.json (not from this machine)
    for s in ("Test CPU 9000", "8.0 GiB", "2.13.0+cpu", "0123456789abcdef", "3.11.7"):
        assert s in md, s
    # wall time per stage, from timings.json
    for stage, secs in TIMINGS.items():
        assert re.search(rf"\| {stage} \| {re.escape(fmt_seconds(secs))} \|", md), stage
    assert f"**{fmt_seconds(sum(TIMINGS.values()))}**" in md
    # training: last record's step, tokens and loss, median tokens/s and MFU, params from the eval lines
    assert "| pretrain | 6.80M | 5 | 20.48k | 4.0000 | 9.30k | 13.0% | 2.0 s |" in md
    assert "| sft | 6.80M | 3 | 3.00k | 0.5000 | 5.00k | 5.0% | 0.6 s |" in md
    assert "val_loss 3.7500, val_bpb 1.2345" in md
    # suites: latest line wins; breakdowns by language, mode and tool use
    assert "| facts_trained | 25.0% [14.2–40.2] (n=40) | 62.5% [47.0–75.8] (n=40) |" in md  # 95% Wilson
    # the MFU peak each stage measured against, with the spread of its probes
    assert "| pretrain | 0.900 | 0.400 | 0.800 | 0.900 | probe |" in md
    assert "multistep · chain of thought | 15.0% | — |" in md
    assert "arithmetic_tool · valid tool calls | — | 90.0% |" in md
    assert "arithmetic_tool · tool used | — | 75.0% |" in md
    # alignment tax: bits per byte per stage and the change from the base model
    assert "| pretrain | 1.5000 | — | 49.40 | 16.38k |" in md
    assert "| sft | 1.5625 | +0.0625 | 54.60 | 16.38k |" in md
    for png in ("curves.png", "evals.png", "bpb.png", "throughput.png"):
        assert (hand_run / "plots" / png).stat().st_size > 1000 and f"plots/{png}" in md
    assert write_report(hand_run).read_text() == md  # re-rendering gives the same file


def test_wilson_intervals() -> None:
    # reference values of the 95% Wilson score interval
    assert wilson(0.5, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson(0.0, 24) == pytest.approx((0.0, 0.1380), abs=1e-4)  # 0 of 24 is not "exactly 0%"
    assert wilson(1.0, 80)[1] == 1.0 and wilson(1.0, 80)[0] == pytest.approx(0.9542, abs=1e-4)
    assert fmt_rate(0.25, 40) == "25.0% [14.2–40.2] (n=40)" and fmt_rate(0.25, None) == "25.0%"


def test_formatting_helpers() -> None:
    assert fmt_seconds(95.5) == "1m36s" and fmt_seconds(3.25) == "3.2 s" and fmt_seconds(7300) == "2h01m"
    assert fmt_count(6_800_000) == "6.80M" and fmt_count(512) == "512" and fmt_pct(0.125) == "12.5%"


def test_report_command_and_errors(hand_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["report", "x", "--runs-dir", str(hand_run.parent), "--plots", "false"]) == 0
    assert "report ->" in capsys.readouterr().out
    assert "## Plots" not in (hand_run / "report.md").read_text()
    (tmp_path / "runs" / "empty").mkdir()
    with pytest.raises(UserError, match="nothing to report"):
        write_report(tmp_path / "runs" / "empty")
    assert main(["report", "nope", "--runs-dir", str(tmp_path / "runs")]) == 2


def test_stage_evaluation_to_report(run_dir: Path) -> None:
    """evaluate_stage records to metrics.jsonl; the report shows those very numbers."""
    from tinychat.eval import evaluate_stage
    from tinychat.train.metrics import read_metrics

    opts = dict(limit=2, max_new_tokens=6, cot_max_new_tokens=8, bpb_tokens=512, seq_len=64)
    base = evaluate_stage(run_dir, "pretrain", suites=["facts_trained", "multistep"], **opts)
    chat = evaluate_stage(
        run_dir,
        "sft",
        model_dir=run_dir / "checkpoints" / "pretrain",
        suites=["arithmetic_tool", "facts_trained"],
        **{**opts, "limit": 3},
    )
    assert base["mode"] == "base" and chat["mode"] == "chat"
    recs = read_metrics(run_dir, kind="eval_suite")
    assert {(r["stage"], r["suite"]) for r in recs} == {
        ("pretrain", "bpb"),
        ("pretrain", "facts_trained"),
        ("pretrain", "multistep"),
        ("sft", "bpb"),
        ("sft", "arithmetic_tool"),
        ("sft", "facts_trained"),
    }
    bpb = {r["stage"]: r for r in recs if r["suite"] == "bpb"}
    assert bpb["pretrain"]["val_bpb"] == base["bpb"]["bpb"]
    assert json.loads((run_dir / "eval" / "sft.json").read_text())["suites"]["arithmetic_tool"]["samples"]
    assert (run_dir / "environment.json").is_file()
    md = write_report(run_dir, plots=False).read_text()
    assert f"| pretrain | {bpb['pretrain']['val_bpb']:.4f} | — |" in md
    delta = bpb["sft"]["val_bpb"] - bpb["pretrain"]["val_bpb"]
    assert f"| sft | {bpb['sft']['val_bpb']:.4f} | {delta:+.4f} |" in md
    fr = next(r for r in recs if r["suite"] == "facts_trained")
    assert f"| facts_trained | {fmt_rate(fr['accuracy'], fr['n'])} | " in md
    # per-row outcomes: the pretrain stage answered the first 2 rows, sft the first 3; compared on the 2
    outs = {r["stage"]: r["outcomes"] for r in recs if r["suite"] == "facts_trained"}
    for stage, n in (("pretrain", 2), ("sft", 3)):
        rec = next(r for r in recs if r["suite"] == "facts_trained" and r["stage"] == stage)
        assert len(outs[stage]) > 3 and outs[stage][:n].count(".") == 0 and set(outs[stage][n:]) == {"."}
        assert outs[stage].count("1") == rec["correct"]
    accs, n = shared_accuracy([outs["pretrain"], outs["sft"]])
    assert n == 2 and accs == [outs["pretrain"][:2].count("1") / 2, outs["sft"][:2].count("1") / 2]
    gain = f"{fmt_pct(accs[1])} ({100 * (accs[1] - accs[0]):+.1f})"
    assert "## What each stage added" in md and f"| facts_trained | 2 | {fmt_pct(accs[0])} | {gain} |" in md


def test_shared_accuracy_uses_only_rows_every_stage_answered() -> None:
    assert shared_accuracy(["11.0", "0110", "1.11"]) == ([0.5, 0.0, 1.0], 2)  # rows 0 and 3
    assert shared_accuracy(["1.", ".1"]) == ([], 0)
