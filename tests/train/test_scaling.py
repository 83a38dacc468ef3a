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


def test_scaling_needs_two_sizes_and_two_budgets(tmp_path: Path, capsys):
    assert main(["scaling", "--runs-dir", str(tmp_path), "--sizes", "32", "--tokens", "1000", "2000"]) == 2
    assert "at least two" in capsys.readouterr().err
