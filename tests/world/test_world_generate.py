"""Generation: determinism, the manifest, atomic replacement rules, the CLI, and the small preset's size."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tinychat.cli import main
from tinychat.errors import UserError
from tinychat.world import SKILLS, build_files, ensure_world, generate_world, load_manifest
from tinychat.world.generate import CPU_TINY_PRETRAIN_TOKENS, est_tokens


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path: Path) -> None:
    generate_world(tmp_path / "a", seed=7, size="micro")
    generate_world(tmp_path / "b", seed=7, size="micro")
    generate_world(tmp_path / "c", seed=8, size="micro")
    a, b, c = _tree(tmp_path / "a"), _tree(tmp_path / "b"), _tree(tmp_path / "c")
    assert a == b
    assert set(a) != set(c) or any(a[k] != c[k] for k in a)
    for rel in ("pretrain/train.jsonl", "sft/train.jsonl", "eval/facts_heldout.jsonl", "world.json"):
        assert a[rel] != c[rel], rel


def test_output_does_not_depend_on_hash_seed() -> None:
    """Set or dict-of-str iteration order must never reach the output: two processes, two PYTHONHASHSEEDs."""
    code = (
        "import hashlib; from tinychat.world.generate import build_files; _, f, _ = build_files(5, 'micro'); "
        "print(hashlib.sha256(b''.join(k.encode() + f[k] for k in sorted(f))).hexdigest())"
    )
    outs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        outs.add(
            subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
        )
    assert len(outs) == 1


def test_in_memory_build_matches_disk(micro_dir: Path) -> None:
    _, files, _ = build_files(0, "micro")
    on_disk = _tree(micro_dir)
    for rel, data in files.items():
        assert on_disk[rel] == data, rel
    assert set(on_disk) == set(files) | {"manifest.json"}


def test_manifest_describes_every_file(micro_dir: Path) -> None:
    m = load_manifest(micro_dir)
    on_disk = {k for k in _tree(micro_dir) if k != "manifest.json"}
    assert set(m.files) == on_disk
    for rel, info in m.files.items():
        data = (micro_dir / rel).read_bytes()
        assert info["bytes"] == len(data)
        assert info["sha256"] == hashlib.sha256(data).hexdigest()
        if rel.endswith(".jsonl"):
            assert info["rows"] == len(data.splitlines()) > 0, rel
    assert {f"eval/{s}.jsonl" for s in SKILLS} <= set(m.files)
    assert (m.seed, m.size) == (0, "micro")
    text = (micro_dir / "manifest.json").read_text()
    assert "time" not in json.loads(text)  # no time stamps in content


def test_est_tokens_rule() -> None:
    assert est_tokens("abcd" * 10) == 10
    assert est_tokens("中文中文中文") == 4
    assert est_tokens("ab中文") == round(2 / 4 + 2 / 1.5)


def test_replaces_previous_world_but_not_other_directories(tmp_path: Path) -> None:
    out = tmp_path / "w"
    generate_world(out, seed=0, size="micro")
    generate_world(out, seed=1, size="micro")  # a previous world is replaced
    assert load_manifest(out).seed == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind

    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="--force"):
        generate_world(other, seed=0, size="micro")
    assert (other / "notes.txt").read_text() == "keep me"
    generate_world(other, seed=0, size="micro", force=True)
    assert not (other / "notes.txt").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    generate_world(empty, seed=0, size="micro")  # an empty directory is fine
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        generate_world(afile, seed=0, size="micro")


def test_ensure_world_reuses_or_regenerates(tmp_path: Path) -> None:
    out = tmp_path / "w"
    m1 = ensure_world(out, seed=0, size="micro")
    stamp = (out / "world.json").stat().st_mtime_ns
    ensure_world(out, seed=0, size="micro")
    assert (out / "world.json").stat().st_mtime_ns == stamp
    m2 = ensure_world(out, seed=2, size="micro")
    assert (m1.seed, m2.seed) == (0, 2)


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert main(["world", "generate", "--out", str(out), "--size", "micro", "--seed", "3"]) == 0
    assert load_manifest(out).seed == 3
    assert "wrote tinyworld" in capsys.readouterr().out
    assert main(["world", "generate"]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["world", "generate", "--out", str(out), "--size", "huge"]) == 2
    assert "size" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("x")
    assert main(["world", "generate", "--out", str(tmp_path / "busy"), "--size", "micro"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert main(["world", "generate", "--help"]) == 0


def test_small_preset_size_and_speed(small_dir: Path) -> None:
    """The speedrun default: several passes over every fact within the cpu-tiny budget, generated in seconds."""
    m = load_manifest(small_dir)
    p = m.pretrain
    assert 250_000 <= p["train_est_tokens"] <= 400_000
    # the speedrun spends ~60% of its pretraining tokens on chat rows: the text gets ~3.5 passes
    assert p["passes_at_cpu_tiny_budget"] >= 3
    assert CPU_TINY_PRETRAIN_TOKENS / p["train_est_tokens"] >= 3
    assert p["fact_mentions_min"] == {"en": 6, "zh": 6}
    assert m.entities["trained"] == m.entities["heldout"] == 150
    t0 = time.perf_counter()
    build_files(1, "small")
    assert time.perf_counter() - t0 < 30  # ~1 s on a quiet machine; only a pathological slowdown fails
