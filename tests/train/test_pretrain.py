"""The training loop through `tinychat pretrain`: learning, exact resume after SIGKILL, Ctrl-C, DDP and
FSDP2 against one process, checkpoints that transformers opens, the NaN guard, and bad input."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from train_helpers import TINY, pretrain_cmd, run_cmd, train_losses

from tinychat.cli import main
from tinychat.eval.backend import detect_mode


def test_loss_falls_and_checkpoints_open_in_transformers(corpus_run: Path):
    r = run_cmd(
        pretrain_cmd(
            corpus_run,
            "--run",
            "learn",
            "--train.max_steps",
            "60",
            "--train.lr",
            "1e-2",
            "--train.eval_every",
            "30",
            "--train.checkpoint_every",
            "30",
        )
    )
    assert r.returncode == 0, r.stderr
    losses = train_losses(corpus_run / "learn")
    assert len(losses) == 60
    assert sum(list(losses.values())[-5:]) / 5 < 0.6 * losses[1]
    records = [json.loads(x) for x in (corpus_run / "learn" / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in records if e["kind"] == "eval"]
    assert [e["step"] for e in evals] == [30, 60] and evals[1]["val_bpb"] < evals[0]["val_bpb"]
    first_step = next(r for r in records if r["kind"] == "train")
    for key in ("tok_per_s", "mfu", "lr", "grad_norm", "tokens"):
        assert key in first_step
    assert records[0]["kind"] == "peak" and records[0]["source"] == "probe" and len(records[0]["probes"]) == 5
    transformers = pytest.importorskip("transformers")
    final = corpus_run / "learn" / "checkpoints" / "pretrain"
    hf = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    from tinychat.model import Model

    ours = Model.from_pretrained(str(final))
    x = torch.randint(0, ours.cfg.vocab_size, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), atol=1e-4, rtol=0)
    assert (final / "tokenizer.json").exists()
    record = json.loads((final / "config.json").read_text())  # plain text, no chat rows: a base model
    assert record["tinychat_stage"] == "pretrain" and record["tinychat_chat"] is False
    assert detect_mode(final) == "base"
    assert sorted(p.name for p in final.glob("step_*")) == ["step_000030", "step_000060"]
    assert transformers.AutoModelForCausalLM.from_pretrained(final / "step_000030") is not None


def _wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.stderr.read()}")
        if (run_dir / "metrics.jsonl").exists() and max(train_losses(run_dir) or {0: 0}) >= step:
            return
        time.sleep(0.01)
    raise AssertionError("training did not reach the step in time")


def test_resume_after_sigkill_gives_identical_losses(corpus_run: Path):
    # 80 steps: a tiny model's step takes a few ms, and the kill at step 13 must land before the run ends
    args = ["--train.max_steps", "80", "--train.checkpoint_every", "5", "--train.keep_checkpoints", "2"]
    ref = run_cmd(pretrain_cmd(corpus_run, "--run", "ref", *args))
    assert ref.returncode == 0, ref.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        pretrain_cmd(corpus_run, "--run", "killed", *args),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_step(corpus_run / "killed", proc, 13)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    assert max(train_losses(corpus_run / "killed")) < 80
    again = run_cmd(pretrain_cmd(corpus_run, "--run", "killed", *args, "--resume"))
    assert again.returncode == 0, again.stderr
    assert "resumed pretrain" in again.stdout
    assert train_losses(corpus_run / "killed") == train_losses(corpus_run / "ref")  # bitwise


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(corpus_run: Path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        pretrain_cmd(corpus_run, "--run", "sigint", "--train.max_steps", "100000"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_step(corpus_run / "sigint", proc, 3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "continue with --resume" in out
    steps = list((corpus_run / "sigint" / "checkpoints" / "pretrain").glob("step_*"))
    assert len(steps) == 1 and (steps[0] / "model.safetensors").exists()


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_gloo_ranks_match_one_process(corpus_run: Path, mode: str):
    """Same global batch (2 ranks x 4 sequences vs 1 process x 2 micro-batches of 4): same losses."""
    single = run_cmd(
        pretrain_cmd(
            corpus_run, "--run", f"one-{mode}", "--train.max_steps", "6", "--train.batch_tokens", str(2 * 4 * 32)
        )
    )
    assert single.returncode == 0, single.stderr
    multi = run_cmd(
        pretrain_cmd(
            corpus_run,
            "--run",
            f"two-{mode}",
            "--train.max_steps",
            "6",
            "--train.batch_tokens",
            str(2 * 4 * 32),
            "--train.distributed",
            mode,
            torchrun=2,
        )
    )
    assert multi.returncode == 0, multi.stderr[-3000:]
    a, b = train_losses(corpus_run / f"one-{mode}"), train_losses(corpus_run / f"two-{mode}")
    assert list(a) == list(b) == list(range(1, 7))
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-4), (step, a[step], b[step])
    # the final weights agree too, and the checkpoint gathered from the ranks opens
    from tinychat.model import Model

    wa = Model.from_pretrained(str(corpus_run / f"one-{mode}" / "checkpoints" / "pretrain")).state_dict()
    wb = Model.from_pretrained(str(corpus_run / f"two-{mode}" / "checkpoints" / "pretrain")).state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=2e-4, rtol=1e-3)


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(corpus_run: Path):
    ok = run_cmd(pretrain_cmd(corpus_run, "--run", "nan", "--train.max_steps", "2", "--train.checkpoint_every", "1"))
    assert ok.returncode == 0
    before = sorted(p.name for p in (corpus_run / "nan" / "checkpoints" / "pretrain").glob("step_*"))
    bad = run_cmd(
        pretrain_cmd(
            corpus_run,
            "--run",
            "nan",
            "--train.max_steps",
            "8",
            "--train.lr",
            "1e12",
            "--train.warmup_steps",
            "0",
            "--resume",
            "--train.checkpoint_every",
            "1",
        )
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    m = re.search(
        r"is not finite at step (\d+); stopped without saving, the last good checkpoint is (\S+) ", bad.stderr
    )
    assert m, bad.stderr
    failed, good = int(m.group(1)), Path(m.group(2))
    after = sorted(p.name for p in (corpus_run / "nan" / "checkpoints" / "pretrain").glob("step_*"))
    assert before[-1] in after + [good.name] and good.name == after[-1]
    assert int(good.name.split("_")[1]) == failed  # the checkpoint after the last finite step, nothing later
    assert (good / "model.safetensors").exists()


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_bad_inputs_fail_before_training(corpus_run: Path, tmp_path: Path, capsys):
    base = [
        "pretrain",
        "--runs-dir",
        str(tmp_path),
        "--tokenizer",
        str(corpus_run / "base" / "tokenizer"),
        "--train.max_steps",
        "1",
        "--train.seq_len",
        "32",
        *TINY,
    ]
    assert main([*base, "--data", str(tmp_path / "missing")]) == 2
    assert "does not exist" in _err(capsys)
    assert main([*base, "--data", str(corpus_run / "base" / "data" / "tokens"), "--train.seq_len", "4096"]) == 2
    assert "larger than the model's context window" in _err(capsys)
    assert main([*base, "--train.learning_rate", "1"]) == 2
    assert "unknown option --train.learning_rate" in _err(capsys)
    assert main([*base, "--data", str(corpus_run / "base" / "data" / "tokens"), "--train.max_steps", "0"]) == 2
    assert "no training budget" in _err(capsys)
    # a tokenizer whose vocabulary differs from the one the data was tokenized with
    from helpers import tiny_corpus

    from tinychat.tokenizer import train_tokenizer

    train_tokenizer(tiny_corpus(100, seed=1), 300).save_pretrained(tmp_path / "other_tok")
    assert (
        main(
            [*base[:4], str(tmp_path / "other_tok"), *base[5:], "--data", str(corpus_run / "base" / "data" / "tokens")]
        )
        == 2
    )
    assert "re-tokenize" in _err(capsys)
    # a validation split too small for one batch: refused at start, not at the first evaluation
    from tinychat.data.shards import TokenIndex

    tokens = corpus_run / "base" / "data" / "tokens"
    index = TokenIndex.load(tokens)
    val, train = (sum(len(m) for m in index.memmaps(split)) for split in ("val", "train"))
    batch = (val - 1) // 32 + 1  # one more 32-token sequence than the val split holds (packed: stride 32)
    assert batch * 32 < train
    assert main([*base, "--data", str(tokens), "--train.batch_size", str(batch)]) == 2
    assert "the val split" in _err(capsys)
    assert not list(tmp_path.glob("*/checkpoints"))
