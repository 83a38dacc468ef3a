"""Tensor / pipeline parallelism on a device mesh (train/parallel.py) against one process, on CPU with gloo
under torchrun: the same global batch in fp32 must give the same per-step losses (within 1e-5), and a
checkpoint written under one mesh must resume under another."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from train_helpers import pretrain_cmd, run_cmd, train_losses

from tinychat.errors import UserError
from tinychat.train.parallel import MeshShape, parse_mesh

STEPS = 4
GLOBAL = ["--train.batch_tokens", str(2 * 4 * 32)]  # 2 sequences of 4 x 32 tokens per step, however split


def test_parse_mesh():
    assert parse_mesh("dp=2,tp=2", 4) == MeshShape(pp=1, dp=2, tp=2)
    assert parse_mesh("tp=2", 8) == MeshShape(pp=1, dp=4, tp=2)  # dp takes the ranks left over
    assert parse_mesh(" pp=2 , tp=2 ", 4) == MeshShape(pp=2, dp=1, tp=2)
    assert parse_mesh("dp=4", 4).trivial and not parse_mesh("pp=2", 4).trivial
    for bad, world in (("dp=3,tp=2", 4), ("tp=3", 4), ("tp=2,tp=2", 4), ("xp=2", 2), ("tp=0", 2), ("tp:2", 2)):
        with pytest.raises(UserError, match="--train.mesh"):
            parse_mesh(bad, world)


UNTIED = ["--model.tie_embeddings", "false"]  # pipeline stages cannot share the embedding with the head


@pytest.fixture(scope="module")
def references(corpus_run: Path) -> dict[str, dict[int, float]]:
    """One process's losses, with the tied head (tinychat's default) and with an untied one."""
    out = {}
    for name, extra in (("tied", []), ("untied", UNTIED)):
        r = run_cmd(
            pretrain_cmd(corpus_run, "--run", f"mesh-one-{name}", "--train.max_steps", str(STEPS), *GLOBAL, *extra)
        )
        assert r.returncode == 0, r.stderr
        out[name] = train_losses(corpus_run / f"mesh-one-{name}")
    return out


def _run_mesh(corpus_run: Path, name: str, mesh: str, ranks: int, *extra: str) -> dict[int, float]:
    """Per-step losses of `pretrain` under torchrun with `ranks` processes laid out as `mesh`."""
    r = run_cmd(
        pretrain_cmd(
            corpus_run,
            "--run",
            name,
            "--train.max_steps",
            str(STEPS),
            *GLOBAL,
            "--train.mesh",
            mesh,
            *extra,
            torchrun=ranks,
        )
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("--resume" not in extra) or "resumed pretrain from" in r.stdout
    return train_losses(corpus_run / name)


def _assert_same(a: dict[int, float], b: dict[int, float]) -> None:
    assert list(a) == list(b) == list(range(1, STEPS + 1))
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5, abs=1e-5), (step, a[step], b[step])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mesh", "ranks", "extra"),
    [
        ("tp=2", 2, []),
        ("dp=2,tp=2", 4, []),
        ("pp=2,dp=2", 4, [*UNTIED, "--train.pp_schedule", "1f1b"]),
        ("pp=2,tp=2", 4, [*UNTIED, "--train.pp_schedule", "gpipe", "--train.pp_microbatches", "4"]),
    ],
)
def test_mesh_matches_one_process(corpus_run: Path, references: dict, mesh: str, ranks: int, extra: list[str]):
    """TP alone, DP x TP, DP x PP (1F1B) and TP x PP (GPipe, 4 micro-batches): the same losses as one process, the same
    validation loss from the final evaluation, and a final checkpoint gathered whole from the shards and stages."""
    name = "mesh-" + mesh.replace(",", "-").replace("=", "")
    ref = "untied" if extra else "tied"
    _assert_same(references[ref], _run_mesh(corpus_run, name, mesh, ranks, *extra))
    from tinychat.model import Model

    wa = Model.from_pretrained(str(corpus_run / f"mesh-one-{ref}" / "checkpoints" / "pretrain")).state_dict()
    wb = Model.from_pretrained(str(corpus_run / name / "checkpoints" / "pretrain")).state_dict()
    assert wa.keys() == wb.keys()
    for k in wa:  # Adam divides by the root of a tiny second moment, so last-bit gradient differences grow: on an
        # AVX2-only CPU one weight of 2,048 differed by 1.6e-5 after STEPS steps; a wrong shard differs far more
        torch.testing.assert_close(wa[k], wb[k], atol=5e-5, rtol=1e-4)
    if "dp=2" not in mesh:  # the same validation batches as one process (dp=2 splits them differently)
        va, vb = (
            [json.loads(x) for x in (corpus_run / r / "metrics.jsonl").read_text().splitlines()]
            for r in (f"mesh-one-{ref}", name)
        )
        (ea,), (eb,) = ([e["val_loss"] for e in v if e["kind"] == "eval"] for v in (va, vb))
        assert ea == pytest.approx(eb, rel=1e-5)


@pytest.mark.slow
def test_checkpoint_from_one_mesh_resumes_under_another(corpus_run: Path, references: dict):
    """Saved at step 2 under pp=2 x dp=2 (4 ranks: pipeline stages merged, FSDP shards gathered), resumed
    under tp=2 (2 ranks): the weights and AdamW moments, split the new way, continue the run unchanged."""
    run = corpus_run / "mesh-reshard"
    _run_mesh(corpus_run, "mesh-reshard", "pp=2,dp=2", 4, *UNTIED, "--train.checkpoint_every", "2")
    stage = run / "checkpoints" / "pretrain"
    shutil.rmtree(stage / f"step_{STEPS:06d}")  # forget the end: the newest checkpoint is step 2
    resumed = _run_mesh(corpus_run, "mesh-reshard", "tp=2", 2, *UNTIED, "--train.checkpoint_every", "2", "--resume")
    _assert_same(references["untied"], resumed)


@pytest.mark.slow
def test_mesh_resume_after_sigkill_is_bitwise(corpus_run: Path):
    """Every rank of a tp=2 run killed at once (SIGKILL to the process group: no handler runs, as when a node
    dies), then resumed: the same losses to the last bit as a run that was never interrupted."""
    args = ["--train.max_steps", "40", "--train.checkpoint_every", "5", "--train.mesh", "tp=2"]
    ref = run_cmd(pretrain_cmd(corpus_run, "--run", "mesh-kill-ref", *args, torchrun=2))
    assert ref.returncode == 0, ref.stderr[-3000:]
    cmd = pretrain_cmd(corpus_run, "--run", "mesh-kill", *args, torchrun=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    run = corpus_run / "mesh-kill"
    t0 = time.time()
    while not ((run / "metrics.jsonl").exists() and max(train_losses(run) or {0: 0}) >= 12):
        assert proc.poll() is None and time.time() - t0 < 240, "the run ended or stalled before step 12"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert max(train_losses(run)) < 40
    again = run_cmd(pretrain_cmd(corpus_run, "--run", "mesh-kill", *args, "--resume", torchrun=2))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed pretrain" in again.stdout
    assert train_losses(run) == train_losses(corpus_run / "mesh-kill-ref")  # bitwise


def test_gpu_node_preset_is_a_valid_mesh_for_its_model():
    """configs/gpu-node.toml (8 GPUs, dp=4 x tp=2): its mesh fills 8 ranks, its model splits that way and also
    under the pipeline mesh its comments suggest, and its batch divides evenly. Checked here without GPUs."""
    from tinychat.config import parse_args
    from tinychat.model.config import resolve
    from tinychat.train.parallel import check_mesh
    from tinychat.train.pretrain import PretrainConfig

    root = Path(__file__).resolve().parents[2]
    cfg = parse_args(PretrainConfig, ["--config", str(root / "configs" / "gpu-node.toml")], section="pretrain")
    shape = parse_mesh(cfg.train.mesh, 8)
    assert shape == MeshShape(pp=1, dp=4, tp=2)
    model = resolve(cfg.model)
    check_mesh(shape, model)
    check_mesh(parse_mesh("pp=2,dp=2,tp=2", 8), model)
    per_step = cfg.train.batch_size * cfg.train.seq_len * shape.dp
    assert cfg.train.batch_tokens % per_step == 0 and cfg.train.seq_len <= model.max_seq_len
    with pytest.raises(UserError, match="tie_embeddings"):
        check_mesh(parse_mesh("pp=2", 2), resolve(cfg.model.__class__()))
