"""A mixture-of-experts model trained by the one loop: router losses in the backward pass and in metrics.jsonl."""

import json


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
