"""`--train.ema`: the weight average follows its formula, leaves training unchanged, is the saved model,
is evaluated beside the raw weights, and resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import short_run, train_losses

from tinychat.errors import UserError
from tinychat.train.ema import WeightEMA


def test_the_average_follows_its_formula_and_swaps_back():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    model[1].bias.requires_grad_(False)  # frozen: not averaged
    ema = WeightEMA(model, 0.8)
    w = model[0].weight
    expect = w.detach().clone()
    for step in range(1, 30):
        with torch.no_grad():
            w.add_(torch.randn_like(w))
        d = min(0.8, (1 + step) / (10 + step))
        expect = d * expect + (1 - d) * w.detach()
        ema.update(step)
    torch.testing.assert_close(ema.state_dict()["0.weight"], expect)
    assert "1.bias" not in ema.state_dict() and set(ema.state_dict()) == {"0.weight", "0.bias", "1.weight"}
    raw = w.detach().clone()
    with ema.swapped_in():
        torch.testing.assert_close(w.detach(), expect)
    torch.testing.assert_close(w.detach(), raw)
    with pytest.raises(UserError, match="decay in"):
        WeightEMA(model, 1.0)


def test_the_final_model_is_the_average_and_training_is_unchanged(corpus_run: Path):
    plain = short_run(corpus_run, "noema", "--train.max_steps", "6")
    avg = short_run(corpus_run, "ema", "--train.max_steps", "6", "--train.ema", "0.7", "--train.eval_every", "3")
    assert train_losses(avg) == train_losses(plain)  # the optimiser never sees the average
    final = load_file(str(avg / "checkpoints" / "pretrain" / "model.safetensors"))
    last = avg / "checkpoints" / "pretrain" / "step_000006"
    raw, saved = load_file(str(last / "model.safetensors")), load_file(str(last / "ema.safetensors"))
    key = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(final[key], saved[key])
    assert not torch.equal(final[key], raw[key])
    plain_final = load_file(str(plain / "checkpoints" / "pretrain" / "model.safetensors"))
    torch.testing.assert_close(raw[key], plain_final[key])
    evals = [json.loads(x) for x in (avg / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["kind"] == "eval" and e["step"] == 6]
    assert any("val_bpb" in e for e in evals) and any("ema_val_bpb" in e for e in evals)


def test_resume_continues_the_average(corpus_run: Path):
    whole = short_run(corpus_run, "ema6", "--train.max_steps", "6", "--train.ema", "0.7")
    part = short_run(corpus_run, "ema3", "--train.max_steps", "3", "--train.ema", "0.7")
    short_run(corpus_run, "ema3", "--train.max_steps", "6", "--train.ema", "0.7", "--resume")
    a = load_file(str(whole / "checkpoints" / "pretrain" / "model.safetensors"))
    b = load_file(str(part / "checkpoints" / "pretrain" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)
