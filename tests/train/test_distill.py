"""`tinychat distill`: the KD loss math (zero at student == teacher, the gradient reaches only the student,
forward vs reverse), token- and sequence-level runs end to end on the one loop, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from train_helpers import TINY, run_cmd

from tinychat.cli import main
from tinychat.data.shards import TokenIndex
from tinychat.model import Model, preset
from tinychat.model.loss import topk_kl
from tinychat.train.distill import kd_loss


def test_kl_is_zero_when_student_equals_teacher_and_positive_otherwise():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    mask = torch.ones(2, 5, dtype=torch.bool)
    for direction in ("forward", "reverse"):
        assert kd_loss(logits, logits.clone(), mask, 2.0, direction).item() == pytest.approx(0.0, abs=1e-5)
        assert kd_loss(logits + torch.randn_like(logits), logits, mask, 2.0, direction).item() > 0.1


def test_kl_matches_the_definition_and_the_mask():
    torch.manual_seed(1)
    s, t = torch.randn(1, 3, 7), torch.randn(1, 3, 7)
    mask = torch.tensor([[True, False, True]])
    T = 1.5
    ps, pt = F.softmax(s / T, -1), F.softmax(t / T, -1)
    fwd = (pt * (pt.log() - ps.log())).sum(-1)  # KL(teacher || student)
    rev = (ps * (ps.log() - pt.log())).sum(-1)
    want_f = (fwd[0, 0] + fwd[0, 2]) * T * T
    want_r = (rev[0, 0] + rev[0, 2]) * T * T
    assert kd_loss(s, t, mask, T, "forward").item() == pytest.approx(want_f.item(), rel=1e-5)
    assert kd_loss(s, t, mask, T, "reverse").item() == pytest.approx(want_r.item(), rel=1e-5)
    assert abs(want_f.item() - want_r.item()) > 1e-3  # the two directions are different objectives


def test_topk_kl_is_the_kl_of_the_coarsened_distributions():
    """Over the teacher's K likeliest tokens plus "the rest": the full KL when K = V, the KL of the two
    distributions coarsened to K + 1 outcomes otherwise (never more than the full one), zero for a twin."""
    torch.manual_seed(2)
    s, t = torch.randn(2, 4, 13), torch.randn(2, 4, 13)
    mask = torch.tensor([[True, True, False, True], [True, True, True, True]])
    T = 1.3
    full = kd_loss(s, t, mask, T, "forward")
    top = F.log_softmax(t / T, -1).topk(13, -1)
    assert topk_kl(F.log_softmax(s / T, -1), top.indices, top.values, mask, T).item() == pytest.approx(
        full.item(), rel=1e-4
    )
    top = F.log_softmax(t / T, -1).topk(4, -1)
    ps, pt = F.softmax(s / T, -1), F.softmax(t / T, -1)
    cs = torch.cat([ps.gather(-1, top.indices), 1 - ps.gather(-1, top.indices).sum(-1, keepdim=True)], -1)
    ct = torch.cat([pt.gather(-1, top.indices), 1 - pt.gather(-1, top.indices).sum(-1, keepdim=True)], -1)
    want = ((ct * (ct.log() - cs.log())).sum(-1) * mask).sum() * T * T
    got = topk_kl(F.log_softmax(s / T, -1), top.indices.to(torch.int16), top.values.half(), mask, T)
    assert got.item() == pytest.approx(want.item(), rel=2e-3)  # (fp16 log-probabilities, as cached)
    assert 0 < got.item() < full.item()
    assert topk_kl(F.log_softmax(t / T, -1), top.indices, top.values, mask, T).item() == pytest.approx(0.0, abs=1e-5)


def test_gradient_reaches_only_the_student(tiny_tokenizer):
    from tinychat.train.distill import DistillConfig, DistillObjective

    cfg = preset("tiny", vocab_size=tiny_tokenizer.vocab_size, d_model=32, n_layer=1, n_head=2, n_kv_head=1,
                 head_dim=16, d_ff=64, max_seq_len=32)  # fmt: skip
    torch.manual_seed(0)
    student, teacher = Model(cfg), Model(cfg)
    teacher.requires_grad_(False)
    dcfg = DistillConfig(teacher="t", alpha=0.3)
    obj = DistillObjective(Path("."), tiny_tokenizer, dcfg.train, [], teacher, dcfg)
    x = torch.randint(0, cfg.vocab_size, (2, 9))
    loss, extra = obj.loss(student, (x[:, :-1], x[:, 1:]))
    assert set(extra) == {"ce", "kd"}
    assert loss.item() == pytest.approx(0.3 * extra["ce"].item() + 0.7 * extra["kd"].item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    # a student identical to its teacher gets no gradient from the KL term alone
    twin = Model(cfg)
    twin.load_state_dict(teacher.state_dict())
    obj.dcfg = DistillConfig(teacher="t", alpha=0.0)
    loss, _ = obj.loss(twin, (x[:, :-1], x[:, 1:]))
    loss.backward()
    assert max(p.grad.abs().max().item() for p in twin.parameters()) < 1e-5


def _teacher(corpus_run: Path, root: Path) -> Path:
    """A small model briefly pretrained on the tiny corpus (the teacher of the end-to-end tests)."""
    tok = corpus_run / "base" / "tokenizer"
    d = root / "teacher"
    if not (d / "model.safetensors").exists():
        r = run_cmd(_cmd(corpus_run, "pretrain", "--run", "teacher", "--train.max_steps", "30", "--train.lr", "1e-2"))
        assert r.returncode == 0, r.stderr
        src = corpus_run / "teacher" / "checkpoints" / "pretrain"
        Model.from_pretrained(str(src)).save_pretrained(str(d))
        from tinychat.tokenizer import Tokenizer

        Tokenizer.from_pretrained(tok).save_pretrained(d)
    return d


def _cmd(runs: Path, command: str, *extra: str) -> list[str]:
    import sys

    return [
        sys.executable, "-m", "tinychat.cli", command, "--runs-dir", str(runs),
        "--tokenizer", str(runs / "base" / "tokenizer"), "--data", str(runs / "base" / "data" / "tokens"),
        *TINY, "--train.batch_size", "4", "--train.seq_len", "32", "--train.warmup_steps", "3",
        "--train.precision", "fp32", "--train.tensorboard", "false", "--train.eval_every", "0", "--samples", *extra,
    ]  # fmt: skip


def test_token_level_distill_runs_on_the_loop(corpus_run: Path, tmp_path: Path):
    teacher = _teacher(corpus_run, corpus_run.parent)
    small = ["--model.d_model", "32", "--model.n_head", "2", "--model.n_kv_head", "1", "--model.d_ff", "64"]
    r = run_cmd(_cmd(corpus_run, "distill", "--run", "kd", "--teacher", str(teacher), "--kd", "reverse",
                     "--train.max_steps", "12", *small))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "distill: 12 steps" in r.stdout and "val bpb" in r.stdout
    rows = [json.loads(x) for x in (corpus_run / "kd" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [x for x in rows if x["kind"] == "train" and x["stage"] == "distill"]
    assert len(train_rows) == 12 and all("kd" in x and "ce" in x for x in train_rows)
    out = corpus_run / "kd" / "checkpoints" / "distill"
    assert Model.from_pretrained(str(out)).cfg.d_model == 32 and (out / "tokenizer.json").exists()
    assert (corpus_run / "kd" / "config.distill.toml").exists()
    from tinychat.eval.backend import detect_mode

    assert detect_mode(out) == "base"  # a distilled student is a base model, evaluated with few-shot prompts


def test_cached_topk_distill_matches_the_live_teacher_on_the_loop(corpus_run: Path):
    """--kd_topk V caches the teacher's whole distribution: the same losses as the teacher in the loop; a
    small K trains too, without the teacher at any step."""
    teacher = _teacher(corpus_run, corpus_run.parent)
    small = ["--model.d_model", "32", "--model.n_head", "2", "--model.n_kv_head", "1", "--model.d_ff", "64"]
    V = Model.from_pretrained(str(teacher)).cfg.vocab_size
    runs = {}
    for name, extra in (("live", []), ("cachev", ["--kd_topk", str(V)]), ("cache8", ["--kd_topk", "8"])):
        r = run_cmd(_cmd(corpus_run, "distill", "--run", name, "--teacher", str(teacher), "--temperature", "1",
                         "--train.max_steps", "6", *small, *extra))  # fmt: skip
        assert r.returncode == 0, r.stderr
        rows = [json.loads(x) for x in (corpus_run / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = [x for x in rows if x["kind"] == "train" and x["stage"] == "distill"]
        if extra:
            assert f"the teacher's top-{extra[1]} next tokens of" in r.stdout
    for a, b in zip(runs["live"], runs["cachev"]):
        assert a["kd"] == pytest.approx(b["kd"], rel=2e-3) and a["ce"] == pytest.approx(b["ce"], rel=2e-3)
    assert len(runs["cache8"]) == 6 and runs["cache8"][-1]["loss"] < runs["cache8"][0]["loss"]


def test_sequence_level_distill_trains_on_teacher_written_documents(corpus_run: Path):
    teacher = _teacher(corpus_run, corpus_run.parent)
    r = run_cmd(_cmd(corpus_run, "distill", "--run", "seq", "--teacher", str(teacher), "--alpha", "1.0",
                     "--seq.samples", "40", "--seq.prompt_tokens", "4", "--seq.new_tokens", "40", "--seq.batch", "16",
                     "--train.max_steps", "4"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    data = corpus_run / "seq" / "data" / "distill"
    index = TokenIndex.load(data)
    assert index.splits["train"]["docs"] == 40
    meta = json.loads((data / "index.json").read_text())
    assert meta["teacher"]["samples"] == 40 and meta["teacher"]["model"] == str(teacher)
    base = TokenIndex.load(corpus_run / "base" / "data" / "tokens")
    assert index.splits["val"] == base.splits["val"]  # validation stays the real text
    np.testing.assert_array_equal(np.concatenate(index.memmaps("val")), np.concatenate(base.memmaps("val")))
    stream = np.concatenate(index.memmaps("train"))
    ends = np.flatnonzero(stream == index.eot_id)
    assert len(ends) == 40 and ends[-1] == len(stream) - 1
    # every document opens with the first 4 tokens of a real training document
    real = np.concatenate(base.memmaps("train"))
    real_starts = {tuple(real[s : s + 4]) for s in np.r_[0, np.flatnonzero(real == base.eot_id)[:-1] + 1]}
    starts = np.r_[0, ends[:-1] + 1]
    assert all(tuple(stream[s : s + 4]) in real_starts for s in starts)
    rows = [json.loads(x) for x in (corpus_run / "seq" / "metrics.jsonl").read_text().splitlines()]
    assert all("kd" not in x for x in rows if x["kind"] == "train")  # alpha 1: cross-entropy only


def test_cli_errors(corpus_run: Path, tiny_model_dir: Path, capsys):
    runs = corpus_run
    base = [
        "distill", "--runs-dir", str(runs), "--run", "bad", "--tokenizer", str(runs / "base" / "tokenizer"),
        "--data", str(runs / "base" / "data" / "tokens"), *TINY, "--train.max_steps", "1", "--train.seq_len", "32",
    ]  # fmt: skip
    assert main(base) == 2
    assert "--teacher" in capsys.readouterr().err
    for flags, word in (
        (["--kd", "sideways"], "--kd"),
        (["--temperature", "0"], "--temperature"),
        (["--alpha", "1.5"], "--alpha"),
        (["--alpha", "1"], "pretrain"),
        (["--seq.samples", "-1"], "--seq.samples"),
        (["--kd_topk", "-1"], "--kd_topk"),
        (["--kd_topk", "8", "--kd", "reverse"], "forward KL only"),
    ):
        assert main([*base, "--teacher", str(tiny_model_dir), *flags]) == 2
        assert word in capsys.readouterr().err
    assert main([*base, "--teacher", str(corpus_run / "missing")]) == 2
    # the session's tiny model has its own tokenizer: not the corpus run's
    assert main([*base, "--teacher", str(tiny_model_dir)]) == 2
    assert "tokenizer" in capsys.readouterr().err
    assert not (corpus_run / "bad" / "checkpoints").exists()
