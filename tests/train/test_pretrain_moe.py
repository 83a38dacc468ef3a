"""A mixture-of-experts model trained by the one loop: router losses in the backward pass and in metrics.jsonl."""

import json

import pytest


def test_moe_trains_through_the_loop_and_logs_router_metrics(corpus_run):
    from train_helpers import TINY, pretrain_cmd, run_cmd

    assert "--model.d_ff" in TINY
    cmd = pretrain_cmd(corpus_run, "--run", "moe", "--train.max_steps", "6", "--model.n_experts", "4")
    cmd += ["--model.experts_per_token", "2", "--train.log_every", "1"]
    proc = run_cmd(cmd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    recs = [json.loads(line) for line in (corpus_run / "moe" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    assert len(train) == 6 and all(r["moe_aux"] >= 2.0 - 1e-4 for r in train)  # >= k, k at perfect balance
    assert all(abs(sum(r[f"moe_load_e{e}"] for e in range(4)) - 1) < 1e-4 for r in train)
    saved = json.loads((corpus_run / "moe" / "checkpoints" / "pretrain" / "config.json").read_text())
    assert saved["architectures"] == ["Qwen3MoeForCausalLM"] and saved["num_experts"] == 4


@pytest.mark.parametrize("distributed", ["ddp", "fsdp"])
def test_moe_trains_under_ddp_and_fsdp_with_idle_experts(corpus_run, distributed):
    """16 experts, 1 per token, 64 tokens per rank: some expert gets no token on some rank and step, and DDP (or
    FSDP2, sharding every expert) still finds a gradient for every parameter; the first step's loss equals the
    single-process run's."""
    from train_helpers import pretrain_cmd, run_cmd, train_losses

    moe = ["--model.n_experts", "16", "--model.experts_per_token", "1", "--train.max_steps", "3"]
    moe += ["--train.batch_size", "2", "--train.batch_tokens", str(2 * 2 * 32)]
    one = run_cmd(pretrain_cmd(corpus_run, "--run", f"moe-one-{distributed}", *moe, "--train.batch_size", "4"))
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_cmd(
        pretrain_cmd(
            corpus_run, "--run", f"moe-two-{distributed}", *moe, "--train.distributed", distributed, torchrun=2
        )
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = train_losses(corpus_run / f"moe-one-{distributed}"), train_losses(corpus_run / f"moe-two-{distributed}")
    assert list(a) == list(b) == [1, 2, 3]
    assert a[1] == pytest.approx(b[1], rel=1e-4)
