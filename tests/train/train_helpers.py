"""A tokenized corpus and a tiny-model command line shared by the training tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tiny_corpus

TINY = [
    "--model.n_layer",
    "2",
    "--model.d_model",
    "64",
    "--model.n_head",
    "4",
    "--model.n_kv_head",
    "2",
    "--model.head_dim",
    "16",
    "--model.d_ff",
    "128",
    "--model.max_seq_len",
    "128",
]


def build_corpus_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runs/ with run 'base': a tokenizer and token shards from a small synthetic corpus."""
    from tinychat.cli import main

    root = tmp_path_factory.mktemp("train")
    src = root / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in tiny_corpus(3000)))
    run = root / "runs" / "base"
    assert (
        main(["tokenizer", "train", "--input", str(src), "--vocab-size", "400", "--out", str(run / "tokenizer")]) == 0
    )
    assert (
        main(
            [
                "data",
                "tokenize",
                str(src),
                "--tokenizer",
                str(run / "tokenizer"),
                "--out",
                str(run / "data" / "tokens"),
                "--val-fraction",
                "0.05",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    return root / "runs"


def pretrain_cmd(runs: Path, *extra: str, torchrun: int = 0) -> list[str]:
    head = [sys.executable, "-m", "tinychat.cli"]
    if torchrun:
        head = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(torchrun),
            "--master_port",
            str(29500 + os.getpid() % 1000),
            "-m",
            "tinychat.cli",
            "--",
        ]
    return [
        *head,
        "pretrain",
        "--runs-dir",
        str(runs),
        "--tokenizer",
        str(runs / "base" / "tokenizer"),
        "--data",
        str(runs / "base" / "data" / "tokens"),
        *TINY,
        "--train.batch_size",
        "4",
        "--train.seq_len",
        "32",
        "--train.warmup_steps",
        "3",
        "--train.precision",
        "fp32",
        "--train.tensorboard",
        "false",
        "--train.eval_every",
        "0",
        "--samples",
        *extra,
    ]


def run_cmd(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def short_run(runs: Path, name: str, *extra: str) -> Path:
    """A tiny pretraining run at a constant learning rate with a checkpoint every 3 steps; its run directory."""
    flags = ["--train.schedule", "constant", "--train.checkpoint_every", "3"]
    r = run_cmd(pretrain_cmd(runs, "--run", name, *flags, *extra))
    assert r.returncode == 0, r.stderr
    return runs / name


def train_losses(run_dir: Path, stage: str = "pretrain") -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["stage"] == stage and rec["kind"] == "train":
            out[rec["step"]] = rec["loss"]
    return out
