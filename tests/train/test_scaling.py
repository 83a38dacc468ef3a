"""Scaling laws (train/scaling.py): the Chinchilla fit recovers a known law, and `tinychat scaling` runs a
tiny sweep end to end (runs, fit, prediction of the held-out run, report and plots)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tinychat.cli import main
from tinychat.train.scaling import bootstrap, compute_optimal, fit_law, predict

TRUE = {"E": 1.7, "A": 400.0, "alpha": 0.34, "B": 410.0, "beta": 0.28}


def test_fit_recovers_a_known_law_and_extrapolates():
    n, d = np.repeat([1e4, 3e4, 1e5, 3e5], 4), np.tile([5e4, 1e5, 2e5, 4e5], 4)
    loss = predict(TRUE, n, d) * np.exp(np.random.default_rng(0).normal(0, 0.002, len(n)))  # 0.2% noise
    fit = fit_law(n, d, loss)
    assert fit["alpha"] == pytest.approx(TRUE["alpha"], abs=0.05) and fit["beta"] == pytest.approx(
        TRUE["beta"], abs=0.05
    )
    # 3x beyond the largest N and D fitted: within 1.5% of the true law
    assert predict(fit, 1e6, 1.2e6) == pytest.approx(predict(TRUE, 1e6, 1.2e6), rel=0.015)
    boots = bootstrap(n, d, loss, fit, 4)
    assert len(boots) >= 3 and all(b["alpha"] > 0 for b in boots)
    n_opt, d_opt = compute_optimal(fit, np.array([1e15, 1e17]))
    assert np.allclose(6 * n_opt * d_opt, [1e15, 1e17]) and n_opt[1] > n_opt[0] and d_opt[1] > d_opt[0]


def test_scaling_command_end_to_end(corpus_run: Path, tmp_path: Path):
    base = corpus_run / "base"
    args = ["scaling", "--runs-dir", str(tmp_path), "--run", "law", "--data", str(base / "data" / "tokens")]
    args += ["--tokenizer", str(base / "tokenizer"), "--sizes", "16", "32", "--tokens", "2048", "4096"]
    args += ["--heldout-size", "48", "--heldout-tokens", "4096", "--n-layer", "1", "--bootstrap", "3"]
    args += ["--train.batch_size", "4", "--train.seq_len", "32", "--train.eval_batches", "2", "--train.peak_flops", "1"]
    assert main(args) == 0
    out = json.loads((tmp_path / "law" / "scaling.json").read_text())
    assert len(out["points"]) == 4 and out["heldout"]["width"] == 48
    assert sorted(p["params"] for p in out["points"])[0] < out["heldout"]["params"]
    pred = out["prediction"]
    assert pred["error_pct"] == pytest.approx(100 * (pred["predicted"] / pred["measured"] - 1))
    assert "held-out run" in (tmp_path / "law" / "scaling.md").read_text()
    for name in ("scaling_curves.png", "scaling_fit.png", "scaling_frontier.png"):
        assert (tmp_path / "law" / "plots" / name).stat().st_size > 1000
    # a second invocation reuses the finished runs (nothing is retrained)
    before = (tmp_path / "law" / "sweep" / "d16_t2048" / "metrics.jsonl").read_text()
    assert main([*args, "--heldout-tokens", "0"]) == 0
    assert (tmp_path / "law" / "sweep" / "d16_t2048" / "metrics.jsonl").read_text() == before
    # --mup: the same sweep under μP, base width the smallest; at the base width μP is the standard model
    assert main([*args, "--heldout-tokens", "0", "--mup"]) == 0
    mup = json.loads((tmp_path / "law" / "scaling.json").read_text())
    assert [p["mup_base"] for p in mup["points"]] == [16] * 4
    key = {(p["width"], p["tokens"]): p["val_loss"] for p in out["points"]}
    for p in mup["points"]:
        same = p["val_loss"] == key[(p["width"], p["tokens"])]
        assert same == (p["width"] == 16), p


def test_scaling_needs_two_sizes_and_two_budgets(tmp_path: Path, capsys):
    assert main(["scaling", "--runs-dir", str(tmp_path), "--sizes", "32", "--tokens", "1000", "2000"]) == 2
    assert "at least two" in capsys.readouterr().err
    args = ["scaling", "--runs-dir", str(tmp_path), "--sizes", "32", "--tokens", "1000", "2000"]
    assert main([*args, "--train.warmup_steps", "20"]) == 2  # a flag the sweep cannot honour is named, not dropped
    assert "--train.warmup_steps 20 is ignored" in capsys.readouterr().out


def test_mup_scales_hidden_lr_and_init_only():
    import torch

    from tinychat.model.config import ModelConfig
    from tinychat.model.transformer import Model
    from tinychat.train.config import TrainConfig
    from tinychat.train.optim import build_optimizer, mup_init

    torch.manual_seed(0)
    model = Model(ModelConfig(vocab_size=64, d_model=128, n_layer=2, n_head=4, n_kv_head=4, head_dim=32, d_ff=384))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mup_init(model, base=32)
    for n, p in model.named_parameters():
        hidden = p.ndim == 2 and "embed" not in n and "lm_head" not in n
        torch.testing.assert_close(p.detach(), before[n] * (0.5 if hidden else 1.0))  # sqrt(32 / 128)
    opt = build_optimizer(model, TrainConfig(mup_base_width=32), torch.device("cpu"))
    scales = sorted(g.get("lr_scale", 1.0) for g in opt.param_groups)
    assert scales == [0.25, 1.0, 1.0]  # hidden matrices at base/width; embeddings and gains at the base LR
    hidden_group = next(g for g in opt.param_groups if g.get("lr_scale") == 0.25)
    assert len(hidden_group["params"]) == 2 * 7  # q, k, v, o, gate, up, down per block


def test_lr_sweep_command(corpus_run: Path, tmp_path: Path):
    base = corpus_run / "base"
    args = ["scaling", "--runs-dir", str(tmp_path), "--run", "lr", "--data", str(base / "data" / "tokens")]
    args += ["--tokenizer", str(base / "tokenizer"), "--sizes", "16", "32", "--lrs", "0.001", "0.01"]
    args += ["--lr-tokens", "2048", "--n-layer", "1", "--train.batch_size", "4", "--train.seq_len", "32"]
    args += ["--train.eval_batches", "2", "--train.peak_flops", "1"]
    assert main(args) == 0
    out = json.loads((tmp_path / "lr" / "lr_sweep.json").read_text())
    assert len(out["runs"]) == 2 * 2 * 2 and out["mup_base"] == 16
    assert set(out["best"]["SP"]) == {"16", "32"} and set(out["best"]["μP"].values()) <= {0.001, 0.01}
    assert (tmp_path / "lr" / "plots" / "lr_transfer.png").stat().st_size > 1000
    assert "| μP | 32 |" in (tmp_path / "lr" / "lr_sweep.md").read_text()
