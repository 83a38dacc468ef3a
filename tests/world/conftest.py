"""Shared worlds for the tinyworld tests: generated once per session (micro: ~0.3 s; small: ~1.5 s)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tinychat.world.generate import generate_world


@pytest.fixture(scope="session")
def micro_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tinyworld") / "micro"
    generate_world(out, seed=0, size="micro")
    return out


@pytest.fixture(scope="session")
def small_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tinyworld") / "small"
    generate_world(out, seed=0, size="small")
    return out
