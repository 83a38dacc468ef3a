"""The passkey suite: prompt lengths, scoring by teacher-forced greedy match, the CLI, and the training documents."""

import json
import random
import re

import pytest
import torch
from torch import nn

from tinychat.cli import main
from tinychat.eval.passkey import build_rows, run_passkey, score
from tinychat.model import Model, preset
from tinychat.tokenizer import train_tokenizer
from tinychat.world import filler
from tinychat.world.passkey import QUESTION, document


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    texts = [document(rng, rng.randint(2, 8)) for _ in range(200)]
    texts += [filler.paragraph("en", rng) for _ in range(200)]
    return train_tokenizer(texts, 500)


class Oracle(nn.Module):
    """A language model that knows the rows: its argmax after each prefix is the row's next token
    (optionally with the answer's last digit changed), so score() must say exactly which rows it gets."""

    def __init__(self, rows, vocab: int, wrong: set[int]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.seqs = []
        for i, r in enumerate(rows):
            answer = list(r["answer"])
            if i in wrong:
                answer[-1] = (answer[-1] + 1) % vocab
            self.seqs.append(r["ids"] + answer)
        self.vocab = vocab

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*x.shape, self.vocab)
        for b in range(x.shape[0]):
            seq = next(s for s in self.seqs if x[b, : len(s)].tolist()[: len(s) - 1] == s[:-1])
            for t in range(len(seq) - 1):
                logits[b, t, seq[t + 1]] = 1.0
        return logits


def test_rows_fit_their_length_and_hide_the_key(tok):
    for length in (64, 200):
        rows = build_rows(tok, length, 5)
        for r in rows:
            total = len(r["ids"]) + len(r["answer"])
            assert length - 25 <= total <= length
            text = tok.decode(r["ids"])
            assert text.endswith(QUESTION) and text.count(r["key"]) == 2
            assert tok.decode(r["answer"]).strip() == r["key"]
        assert [r["depth"] for r in rows] == [0, 0.25, 0.5, 0.75, 1.0]
        first = tok.decode(rows[0]["ids"])
        assert first.index(rows[0]["key"]) < 120  # depth 0: right after the introduction
    assert build_rows(tok, 128, 3) == build_rows(tok, 128, 3)  # deterministic


def test_score_is_greedy_exact_match(tok):
    rows = build_rows(tok, 80, 4) + build_rows(tok, 120, 2)
    oracle = Oracle(rows, tok.vocab_size, wrong={1, 4})
    assert score(oracle, rows, batch_size=3) == [True, False, True, True, False, True]


def test_run_passkey_lifts_and_restores_the_window(tok):
    model = Model(preset("tiny", vocab_size=tok.vocab_size, n_layer=1, d_model=32, head_dim=16, max_seq_len=64))
    result = run_passkey(model, tok, [64, 128], samples=3)
    assert model.cfg.max_seq_len == 64
    assert list(result["lengths"]) == ["64", "128"] and result["lengths"]["128"]["ratio"] == 2.0
    assert result["lengths"]["64"]["n"] == 3 and 0 <= result["lengths"]["64"]["accuracy"] <= 1
    model.cfg.rope_scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 80}
    assert list(run_passkey(model, tok, None, samples=1)["lengths"]) == ["80", "160", "320", "640"]


def test_eval_cli_passkey(tok, tmp_path, capsys):
    model = Model(preset("tiny", vocab_size=tok.vocab_size, n_layer=1, d_model=32, head_dim=16, max_seq_len=64))
    model.save_pretrained(str(tmp_path / "m"))
    tok.save_pretrained(tmp_path / "m")
    out = tmp_path / "r.json"
    argv = ["eval", "--model", str(tmp_path / "m"), "--suite", "passkey", "--lengths", "64", "96"]
    assert main([*argv, "--passkey-samples", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "passkey (trained length 64" in printed and re.search(r"\n\s+96\s+1\.5\s", printed)
    assert set(json.loads(out.read_text())["passkey"]["lengths"]) == {"64", "96"}
    assert main([*argv[:-2], "8", "--passkey-samples", "2"]) == 2
    assert "too short" in capsys.readouterr().err


def test_world_passkey_documents(tmp_path, capsys):
    out = tmp_path / "pk.jsonl"
    argv = ["world", "passkey", "--out", str(out), "--docs", "20", "--min-sentences", "2", "--max-sentences", "5"]
    assert main(argv) == 0
    rows = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert len(rows) == 20 and len(set(rows)) == 20
    for text in rows:
        key = re.search(r"The pass key is (\d{5})\. Remember it", text).group(1)
        assert text.endswith(f"{QUESTION} {key}.")
    assert main([*argv[:3], "--docs", "0"]) == 2
