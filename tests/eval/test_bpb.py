"""Bits per byte and perplexity equal a hand computation from the model's logits, and pretraining's val_bpb."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tinychat.errors import UserError
from tinychat.eval.backend import load
from tinychat.eval.bpb import bits_per_byte, token_stream
from tinychat.tokenizer.bytes import token_byte_lengths


def test_files_match_a_hand_computation(tiny_model_dir: Path, tmp_path: Path) -> None:
    model, tok = load(tiny_model_dir)
    texts = ["the quick brown fox", "今天天气很好。 12 + 7"]
    src = tmp_path / "val.jsonl"
    src.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    ids = [i for t in texts for i in [*tok.encode(t), tok.eot_id]]
    assert token_stream(src, tok).tolist() == ids
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]))[0]
    nats = F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
    n_bytes = sum(token_byte_lengths(tok)[i] for i in ids[1:])
    assert n_bytes == len("".join(texts).encode()) - len(tok.decode(ids[:1]).encode())  # eot targets are 0 bytes
    r = bits_per_byte(model, tok, src, seq_len=128)
    assert r["bpb"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)
    assert r["ppl"] == pytest.approx(math.exp(nats / (len(ids) - 1)), rel=1e-5)
    assert r["tokens"] == len(ids) - 1
    # windows shorter than the stream: every target still counted once
    short = bits_per_byte(model, tok, src, seq_len=5, batch_size=3)
    assert short["tokens"] == len(ids) - 1 and short["bytes"] == n_bytes


def test_token_dir_matches_pretraining_val_bpb(run_dir: Path) -> None:
    """Same tokens, same windows: the number equals what the pretraining evaluation logs."""
    from tinychat.data.loader import val_batches
    from tinychat.train.config import TrainConfig
    from tinychat.train.distributed import DistInfo
    from tinychat.train.loop import TrainContext
    from tinychat.train.pretrain import evaluate_lm

    model, tok = load(run_dir / "checkpoints" / "pretrain")
    T, k = 32, 3
    cfg = TrainConfig(batch_size=1, seq_len=T, eval_batches=k)
    info = DistInfo(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    ctx = TrainContext(cfg, info, torch.device("cpu"), None, run_dir, "pretrain")
    tb = torch.tensor(token_byte_lengths(tok), dtype=torch.float32)
    assert len(list(val_batches(run_dir / "data" / "tokens", 1, T, max_batches=k))) == k
    want = evaluate_lm(model, run_dir / "data" / "tokens", cfg, tb, ctx)
    got = bits_per_byte(model, tok, run_dir / "data" / "tokens", seq_len=T, max_tokens=k * T + 1)
    assert got["bpb"] == pytest.approx(want["val_bpb"], rel=1e-5)
    assert got["loss"] == pytest.approx(want["val_loss"], rel=1e-5)


def test_wrong_inputs(tiny_model_dir: Path, tmp_path: Path) -> None:
    model, tok = load(tiny_model_dir)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="at least 2"):
        bits_per_byte(model, tok, tmp_path / "empty.jsonl")
    with pytest.raises(UserError, match="does not exist"):
        bits_per_byte(model, tok, tmp_path / "missing.jsonl")
