"""Fixtures of the evaluation tests: a micro tinyworld, and a run directory laid out as the speedrun leaves it.

Hermetic: the world is generated here (~0.3 s), the model is the session's tiny random model, and the
run's validation tokens are tokenized here with its tokenizer. Nothing is downloaded.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tinychat.world.generate import generate_world

    out = tmp_path_factory.mktemp("evalworld") / "world"
    generate_world(out, seed=0, size="micro")
    return out


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, world_dir: Path) -> Path:
    """runs/r with world/, checkpoints/pretrain (the tiny model) and data/tokens (the world's pretraining text)."""
    from tinychat.cli import main

    run = tmp_path_factory.mktemp("evalruns") / "runs" / "r"
    shutil.copytree(tiny_model_dir, run / "checkpoints" / "pretrain")
    shutil.copytree(world_dir, run / "world")
    argv = [
        "data",
        "tokenize",
        str(world_dir / "pretrain" / "train.jsonl"),
        "--tokenizer",
        str(tiny_model_dir),
        "--out",
        str(run / "data" / "tokens"),
        "--val-fraction",
        "0.2",
        "--workers",
        "1",
        "--progress",
        "false",
    ]
    assert main(argv) == 0
    return run
