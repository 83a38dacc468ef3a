"""The optimisers: Muon's orthogonalisation, its parameter split, and training + exact resume with it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from train_helpers import pretrain_cmd, run_cmd, train_losses

from tinychat.errors import UserError
from tinychat.model.config import preset
from tinychat.model.transformer import Model
from tinychat.train.config import TrainConfig
from tinychat.train.optim import Muon, build_optimizer, orthogonalize


@pytest.mark.parametrize("shape", [(64, 16), (16, 64), (32, 32)])
def test_orthogonalize_flattens_the_spectrum(shape):
    torch.manual_seed(0)
    # a badly conditioned matrix: singular values from 1e-3 to 10
    u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0]))
    v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1]))
    k = min(shape)
    g = u[:, :k] @ torch.diag(torch.logspace(-3, 1, k)) @ v[:, :k].T
    s = torch.linalg.svdvals(orthogonalize(g))
    assert orthogonalize(g).shape == g.shape
    # Muon's quintic iteration maps every singular value into roughly [0.7, 1.2], not exactly 1
    assert s.max() < 1.3 and s[: k // 2].min() > 0.6
    assert torch.linalg.svdvals(g).max() / torch.linalg.svdvals(g).min() > 1e3


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    model = Model(preset("tiny", vocab_size=128, d_model=32, n_layer=2, n_head=2, n_kv_head=1, head_dim=16, d_ff=64))
    cfg = TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    assert isinstance(opt, Muon)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = [names[id(p)] for g in opt.param_groups if g["muon"] for p in g["params"]]
    rest = [names[id(p)] for g in opt.param_groups if not g["muon"] for p in g["params"]]
    assert len(muon) == 2 * 7 and all("layers" in n and n.endswith("proj.weight") for n in muon)
    assert "model.embed_tokens.weight" in rest and all("norm" in n or "embed" in n for n in rest)
    assert next(g for g in opt.param_groups if g["muon"])["lr_scale"] == pytest.approx(20.0)
    # one step moves every trained tensor, and a muon update has the same RMS for any matrix
    x = torch.randint(0, 128, (2, 8))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(x).float().logsumexp(-1).mean().backward()
    for g in opt.param_groups:
        g["lr"] = 1e-3 * g.get("lr_scale", 1.0)
    opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == set(before)


def test_muon_refuses_sharded_parameters(monkeypatch):
    model = torch.nn.Linear(4, 4)

    class DTensor(torch.nn.Parameter):  # stands in for torch.distributed.tensor.DTensor: only its name is read
        pass

    model.weight = DTensor(model.weight.detach())
    with pytest.raises(UserError, match="muon does not shard"):
        build_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))


def test_training_with_muon_learns_and_resumes_exactly(corpus_run: Path):
    args = [
        "--train.optimizer",
        "muon",
        "--train.max_steps",
        "40",
        "--train.checkpoint_every",
        "20",
        "--train.lr",
        "1e-2",
    ]
    ref = run_cmd(pretrain_cmd(corpus_run, "--run", "muon", *args))
    assert ref.returncode == 0, ref.stderr
    losses = train_losses(corpus_run / "muon")
    assert len(losses) == 40 and sum(list(losses.values())[-5:]) / 5 < 0.6 * losses[1]
    # resume from the step-20 checkpoint: momentum and Adam moments come back, so steps 21-40 are bitwise equal
    shutil.copytree(corpus_run / "muon", corpus_run / "muon2")
    ckpt = corpus_run / "muon2" / "checkpoints" / "pretrain"
    shutil.rmtree(ckpt / "step_000040")
    for f in ckpt.iterdir():
        if f.is_file():
            f.unlink()  # the final model: without it the stage is unfinished
    again = run_cmd(pretrain_cmd(corpus_run, "--run", "muon2", *args, "--resume"))
    assert again.returncode == 0, again.stderr
    assert "resumed pretrain" in again.stdout
    assert train_losses(corpus_run / "muon2") == losses


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_ia3_scales_are_gains_not_decayed_matrices(optimizer: str):
    """IA3's scales are (out, 1) / (1, in) matrices in PEFT's layout but start at the base's 1: decay would pull
    them toward 0, away from the base, and Muon would orthogonalise a vector. They go with the gains."""
    from tinychat.model.peft.ia3 import apply_ia3

    model = Model(preset("tiny", vocab_size=128, d_model=32, n_layer=2, n_head=2, n_kv_head=1, head_dim=16, d_ff=64))
    apply_ia3(model, ["k", "v", "down"])
    opt = build_optimizer(model, TrainConfig(optimizer=optimizer, lr=1e-3, weight_decay=10.0), torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {names[id(p)]: g for g in opt.param_groups for p in g["params"]}
    assert len(groups) == 6 and all(n.endswith("ia3_l") for n in groups)  # only the scales train
    assert all(g["weight_decay"] == 0.0 and not g.get("muon", False) for g in groups.values())
    loss = model(torch.randint(0, 128, (2, 8))).float().pow(2).mean()  # one step with no gradient signal ...
    loss.mul(0).backward()
    opt.step()
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in model.named_parameters() if n.endswith("ia3_l"))
