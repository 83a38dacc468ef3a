"""The copy-drill stage (`tinychat copy-drills`): drills whose second half repeats the first, an alphabet of
the text's own tokens, a softmax over each batch's candidates only, and pretraining that continues it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from train_helpers import TINY

from tinychat.cli import main
from tinychat.data.shards import TokenIndex
from tinychat.model import Model
from tinychat.model.config import ModelConfig
from tinychat.tokenizer import Tokenizer
from tinychat.tokenizer.bytes import token_byte_lengths
from tinychat.train.config import TrainConfig
from tinychat.train.copy_drills import CopyDrillsConfig, CopyDrillsObjective, DrillSource, drill_alphabet, drill_rows
from tinychat.train.pretrain import PretrainObjective


def test_drill_rows_hold_whole_drills_that_repeat_their_first_half():
    rng = np.random.default_rng(0)
    toks, copy = drill_rows(rng, np.arange(10, 20), rows=40, length=17, start=1, sep=[5, 6], lens=(2, 6))
    assert toks.shape == copy.shape == (40, 17)
    seen = set()
    for row, flags in zip(toks.tolist(), copy.tolist()):
        at = 0
        while at < len(row):  # every drill is whole inside its row: start, xs, sep, xs; then start padding
            assert row[at] == 1
            if 5 not in row[at:]:
                assert row[at:] == [1] * (len(row) - at) and not any(flags[at:])
                break
            n = row.index(5, at) - at - 1
            body = row[at + 1 : at + 3 + 2 * n]
            assert 2 <= n < 6 and body[n : n + 2] == [5, 6] and body[:n] == body[n + 2 :]
            assert flags[at : at + 3 + 2 * n] == [False] * (n + 3) + [True] * n
            seen.add(n)
            at += 3 + 2 * n
        assert all(10 <= t < 20 for t, f in zip(row, flags) if f)
    assert seen == {2, 3, 4, 5}  # the last drill of a row is drawn to fit, the others from the whole range
    with pytest.raises(ValueError, match="cannot hold"):
        drill_rows(rng, np.arange(10, 20), rows=1, length=6, start=1, sep=[5, 6], lens=(2, 6))


def test_alphabet_is_the_most_frequent_text_tokens(corpus_run: Path):
    base = corpus_run / "base"
    tok = Tokenizer.from_pretrained(base / "tokenizer")
    index = TokenIndex.load(base / "data" / "tokens")
    sep = tok.encode("\n")
    ids = drill_alphabet(index, tok, 50, {index.eot_id, *sep})
    counts = np.bincount(np.concatenate([np.asarray(m) for m in index.memmaps("train")]), minlength=tok.vocab_size)
    assert len(ids) == 50 and len(set(ids.tolist())) == 50
    assert index.eot_id not in ids and not set(sep) & set(ids.tolist())
    assert all(token_byte_lengths(tok)[i] > 0 for i in ids)
    assert list(counts[ids]) == sorted(counts[ids], reverse=True)
    assert counts[ids].min() >= max(
        counts[i]
        for i in range(tok.vocab_size)
        if i not in ids and i != index.eot_id and i not in sep and token_byte_lengths(tok)[i] > 0
    )


def test_drill_softmax_ranks_the_candidates_and_leaves_other_rows_alone():
    torch.manual_seed(0)
    model = Model(ModelConfig(vocab_size=300, d_model=32, n_layer=2, n_head=2, n_kv_head=1, head_dim=16, d_ff=64))
    cfg = CopyDrillsConfig(per_batch=12, train=TrainConfig(batch_size=4, seq_len=24))
    obj = CopyDrillsObjective(cfg, DrillSource(np.arange(100, 200), start=0, sep=[7], per_batch=12))
    obj.ctx = SimpleNamespace(device=torch.device("cpu"), dist=SimpleNamespace(rank=0, world=1))
    x, y, c, cand = obj.batch(np.random.default_rng(1))
    assert x.shape == (4, 24)
    assert len(cand) == 14 and set(y.unique().tolist()) <= set(cand.tolist())
    loss, _ = obj.loss(model, (x, y, c, cand))
    logits = model(x)[..., cand]  # the full head, then the candidates' columns: the same softmax
    expect = F.cross_entropy(logits.flatten(0, 1), torch.searchsorted(cand, y).flatten(), reduction="sum")
    torch.testing.assert_close(loss, expect, rtol=1e-4, atol=1e-3)
    loss.backward()
    grad = model.lm_head.weight.grad  # tied: the input embedding's rows as well
    others = torch.ones(300, dtype=torch.bool)
    others[cand] = False
    assert grad[others].abs().max() == 0 and grad[cand].abs().sum(1).min() > 0


def test_copy_drills_then_pretraining_continues_them(corpus_run: Path):
    base = ["--runs-dir", str(corpus_run), "--tokenizer", str(corpus_run / "base" / "tokenizer")]
    data = ["--data", str(corpus_run / "base" / "data" / "tokens")]
    train = ["--train.batch_size", "4", "--train.seq_len", "32", "--train.precision", "fp32"]
    train += ["--train.tensorboard", "false", "--train.warmup_steps", "2"]
    drills = ["copy-drills", *base, *data, *TINY, *train, "--run", "cd", "--alphabet", "40", "--per_batch", "8"]
    assert main([*drills, "--train.max_steps", "6", "--train.eval_every", "3"]) == 0
    run = corpus_run / "cd"
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["kind"] == "eval" and e["stage"] == "copy"]
    assert [e["step"] for e in evals] == [3, 6]
    assert all(0 <= e["copy_accuracy"] <= 1 and 0 <= e["copy_accuracy_candidates"] <= 1 for e in evals)
    assert (run / "config.copy.toml").is_file()
    drilled = Model.from_pretrained(str(run / "checkpoints" / "copy"))
    pre = ["pretrain", *base, *data, *train, "--run", "cd", "--init", str(run / "checkpoints" / "copy")]
    assert main([*pre, "--train.max_steps", "2", "--train.eval_every", "0", "--train.lr", "0", "--samples"]) == 0
    after = Model.from_pretrained(str(run / "checkpoints" / "pretrain"))
    assert drilled.cfg.n_layer == after.cfg.n_layer == 2
    for (name, a), b in zip(drilled.state_dict().items(), after.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)  # lr 0: pretraining started from the drilled weights


def _drills_cmd(runs: Path, run: str) -> list[str]:
    """`tinychat copy-drills` on the shared corpus with the tiny model."""
    base = runs / "base"
    return [
        "copy-drills",
        "--runs-dir",
        str(runs),
        "--run",
        run,
        *TINY,
        "--tokenizer",
        str(base / "tokenizer"),
        "--data",
        str(base / "data" / "tokens"),
    ]


def test_a_window_too_short_for_the_shortest_drill_is_one_sentence(corpus_run: Path, capsys):
    args = [*_drills_cmd(corpus_run, "short"), "--train.seq_len", "10", "--min_len", "5", "--train.max_steps", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot hold a drill of min_len 5: use at least 11" in err and err.count("\n") == 0
    assert not (corpus_run / "short" / "checkpoints").exists()


def test_stop_at_ends_the_stage_at_the_first_evaluation_that_reaches_it(corpus_run: Path):
    args = [*_drills_cmd(corpus_run, "stop"), "--train.precision", "fp32"]
    args += ["--train.batch_size", "4", "--train.seq_len", "32", "--train.tensorboard", "false", "--per_batch", "4"]
    assert main([*args, "--train.max_steps", "40", "--train.eval_every", "2", "--stop_at", "0.01"]) == 0
    records = [json.loads(x) for x in (corpus_run / "stop" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert evals[0]["copy_accuracy_candidates"] >= 0.01 and evals[0]["done"]  # chance is 1/4 among 4 ids
    assert max(steps) == 2 and [e["step"] for e in evals] == [2, 2]  # the stopping one, then the final one
    assert (corpus_run / "stop" / "checkpoints" / "copy" / "config.json").is_file()


def test_a_curriculum_moves_to_longer_windows_at_stop_at_with_the_same_tokens_per_step(corpus_run: Path):
    cfg = CopyDrillsConfig(windows=[8, 16, 32], train=TrainConfig(batch_size=4, seq_len=32))
    obj = CopyDrillsObjective(cfg, DrillSource(np.arange(100, 200), start=0, sep=[7], lens=(2, 30), per_batch=12))
    obj.ctx = SimpleNamespace(device=torch.device("cpu"), dist=SimpleNamespace(rank=0, world=1))
    for phase, shape in enumerate([(16, 8), (8, 16), (4, 32)]):
        obj.phase = phase
        assert obj.batch(np.random.default_rng(1))[0].shape == shape
    args = [*_drills_cmd(corpus_run, "curr"), "--train.precision", "fp32", "--train.batch_size", "4"]
    args += ["--train.seq_len", "32", "--train.tensorboard", "false", "--per_batch", "4", "--min_len", "2"]
    args += ["--windows", "8", "16", "--stop_at", "0.01", "--train.eval_every", "2", "--train.checkpoint_every", "2"]
    assert main([*args, "--train.max_steps", "3"]) == 0
    run = corpus_run / "curr"

    def evals() -> list[tuple[int, int, bool]]:
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["window"], r["done"]) for r in records if r["kind"] == "eval"]

    assert evals() == [(2, 8, False), (3, 16, True)]  # 8 reached at step 2, then 16 at the final evaluation
    step2 = run / "checkpoints" / "copy" / "step_000002"
    assert json.loads((step2 / "trainer_state.json").read_text())["objective"] == {"phase": 1}
    shutil.rmtree(run / "checkpoints" / "copy" / "step_000003")
    assert main([*args, "--train.max_steps", "3", "--resume"]) == 0  # step 3 again, from step 2's phase
    assert evals() == [(2, 8, False), (3, 16, True)]  # the log was rewound to step 2: step 3 at 16 tokens again


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--windows", "16", "32"], "needs --stop_at > 0"),
        (["--windows", "8", "--min_len", "5"], "a window (8) cannot hold a drill of min_len 5: use at least 11"),
        (["--windows", "2000", "--stop_at", "0.5"], "larger than the context window"),
        (["--min_len", "5", "--max_len", "5"], "min_len < max_len"),
        (["--separator", ""], "separator"),
        (["--data", "/nonexistent"], "not a tokenized data directory"),
    ],
)
def test_bad_input_is_one_sentence(corpus_run: Path, capsys: pytest.CaptureFixture, flags: list[str], message: str):
    args = [*_drills_cmd(corpus_run, "bad"), "--train.max_steps", "1"]
    assert main([*args, *flags]) != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_pretraining_keeps_a_share_of_every_batch_for_drills(corpus_run: Path):
    base = corpus_run / "base"
    tok = Tokenizer.from_pretrained(base / "tokenizer")
    cfg = TrainConfig(batch_size=8, seq_len=32)
    obj = PretrainObjective(base / "data" / "tokens", tok, cfg, [], drill_rows=0.25)
    obj.setup(SimpleNamespace(device=torch.device("cpu"), dist=SimpleNamespace(rank=0, world=1)))
    plain = PretrainObjective(base / "data" / "tokens", tok, cfg, [])
    plain.setup(SimpleNamespace(device=torch.device("cpu"), dist=SimpleNamespace(rank=0, world=1)))
    for step in (0, 5):
        (x, y), (px, py) = obj.micro_batches(step, None)[0], plain.micro_batches(step, None)[0]
        assert torch.equal(x[:6], px[:6]) and torch.equal(y[:6], py[:6])  # the text rows are the same text
        assert torch.equal(x[6:, 1:], y[6:, :-1])  # two drill rows, shifted as text is
        alphabet = set(obj.drills.alphabet.tolist()) | {obj.drills.start, *obj.drills.sep}
        assert set(x[6:].unique().tolist()) <= alphabet and not torch.equal(x[6:], px[6:])
    narrow = PretrainObjective(base / "data" / "tokens", tok, cfg, [], drill_rows=0.25, drill_alphabet=20)
    narrow.setup(SimpleNamespace(device=torch.device("cpu"), dist=SimpleNamespace(rank=0, world=1)))
    assert narrow.drills.alphabet.tolist() == obj.drills.alphabet[:20].tolist()  # the 20 most frequent


def test_drill_rows_in_a_window_too_short_for_a_drill_is_one_sentence(corpus_run: Path, capsys):
    base = corpus_run / "base"
    args = ["pretrain", "--runs-dir", str(corpus_run), "--run", "short-drills", *TINY]
    args += ["--tokenizer", str(base / "tokenizer"), "--data", str(base / "data" / "tokens")]
    assert main([*args, "--train.seq_len", "8", "--drill_rows", "0.25", "--train.max_steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--drill_rows needs train.seq_len of at least 11" in err and err.count("\n") == 0
