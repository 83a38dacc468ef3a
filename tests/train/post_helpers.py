"""A toy run directory, toy chat/preference/RL data and toy rewards for the post-training tests.

Built once per session: run "toy" holds the session's tiny random model (tests/conftest.py: 2 layers,
d=64) at checkpoints/pretrain, so every command finds its default --init chain, and tinyworld-shaped
splits under world/. The tasks are chosen so a few dozen steps suffice: a planted preference, a
constant reply, "reply with digits".
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

RUN = "toy"


def common(runs: Path, run: str = RUN) -> list[str]:
    return [
        "--runs_dir",
        str(runs),
        "--run",
        run,
        "--train.precision",
        "fp32",
        "--train.tensorboard",
        "false",
        "--train.seq_len",
        "64",
        "--train.batch_size",
        "8",
        "--train.warmup_steps",
        "2",
        "--train.checkpoint_every",
        "0",
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def sums(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(f"{a} + {b} =", str(a + b)) for a, b in ((rng.randint(0, 9), rng.randint(0, 9)) for _ in range(n))]


def sft_rows(n: int, seed: int = 0) -> list[dict]:
    """The reply is always "ok": learnable in a few steps, so task accuracy must reach 1."""
    return [{"messages": [user(q), assistant("ok")]} for q, _ in sums(n, seed)]


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    """Planted preference: the chosen reply says "yes", the rejected one "no" (same answer after it)."""
    return [
        {"prompt": [user(q)], "chosen": [assistant(f"yes {a}")], "rejected": [assistant(f"no {a}")]}
        for q, a in sums(n, seed)
    ]


def rl_rows(n: int, seed: int = 0) -> list[dict]:
    return [{"messages": [user(q)], "answer": a} for q, a in sums(n, seed)]


def digit_reward(reply: str, row: Mapping[str, Any], finished: bool) -> float:
    """Toy verifiable reward: the fraction of the reply's characters that are digits."""
    chars = re.sub(r"\s", "", reply)
    return sum(c.isdigit() for c in chars) / max(len(chars), 1)


def build_toy_runs(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    """runs/toy with the session's tiny random model as its pretrain stage, and toy tinyworld-style splits."""
    import shutil

    runs = tmp_path_factory.mktemp("post") / "runs"
    shutil.copytree(model_dir, runs / RUN / "checkpoints" / "pretrain")
    world = runs / RUN / "world"
    write_jsonl(world / "sft" / "train.jsonl", sft_rows(120))
    write_jsonl(world / "sft" / "val.jsonl", sft_rows(16, seed=1))
    write_jsonl(world / "preference" / "train.jsonl", preference_rows(120))
    write_jsonl(world / "preference" / "val.jsonl", preference_rows(24, seed=1))
    write_jsonl(world / "rl" / "train.jsonl", rl_rows(64))
    return runs


def fresh_run(runs: Path, name: str) -> Path:
    """A new run beside "toy" with its base model and world only (no later stages): for the default chain."""
    import shutil

    dst = runs / name
    if not dst.exists():
        shutil.copytree(runs / RUN / "checkpoints" / "pretrain", dst / "checkpoints" / "pretrain")
        shutil.copytree(runs / RUN / "world", dst / "world")
    return dst


def metrics(run_dir: Path, stage: str, kind: str = "train") -> list[dict]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["stage"] == stage and r["kind"] == kind]


@pytest.fixture(scope="session")
def toy_runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return build_toy_runs(tmp_path_factory, tiny_model_dir)


@pytest.fixture
def one_thread():
    """One intra-op thread per test: tiny matmuls gain nothing from two, and lose a lot on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
