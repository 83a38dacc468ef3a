"""Continued pretraining with an extended vocabulary, in Chinese-LLaMA's two stages: `pretrain --init` grows the
model's rows for the new tokens, stage 1 (--trainable embeddings) changes nothing but the embeddings and the
output layer, stage 2 (--lora.rank with modules_to_save) writes a PEFT adapter that the real peft opens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_corpus

from tinychat.cli import main
from tinychat.model import Model
from tinychat.model.peft.lora import LoraConfig, apply_lora, train_only
from tinychat.tokenizer import Tokenizer
from tinychat.tokenizer.extend import extend_tokenizer

ZH = ["今天天气很好我们一起去公园散步。", "小模型学习说话和调用工具。", "北京上海出生于城市公司。"]
LOOP = ["--train.batch_size", "2", "--train.seq_len", "32", "--train.warmup_steps", "0", "--train.lr", "1e-2",
        "--train.precision", "fp32", "--train.eval_every", "0", "--train.checkpoint_every", "0",
        "--train.tensorboard", "false", "--train.max_steps", "2", "--samples"]  # fmt: skip


@pytest.fixture(scope="module")
def setup(tiny_tokenizer, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An extended tokenizer, token shards of Chinese + English text made with it, a runs directory."""
    root = tmp_path_factory.mktemp("vocab")
    new, _ = extend_tokenizer(tiny_tokenizer, ZH * 30, 20)
    new.save_pretrained(root / "tok_ext")
    docs = [*(z * 3 for z in ZH * 20), *tiny_corpus(60)]
    (root / "mixed.jsonl").write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
    args = ["data", "tokenize", str(root / "mixed.jsonl"), "--tokenizer", str(root / "tok_ext"),
            "--out", str(root / "tokens"), "--workers", "1", "--progress", "false"]  # fmt: skip
    assert main(args) == 0
    return {"tok_ext": root / "tok_ext", "tokens": root / "tokens", "runs": root / "runs", "base": tiny_model_dir}


def pretrain(s: dict[str, Path], stage: str, init: Path, *extra: str) -> int:
    return main(["pretrain", "--runs-dir", str(s["runs"]), "--run", "v", "--stage", stage, "--init", str(init),
                 "--tokenizer", str(s["tok_ext"]), "--data", str(s["tokens"]), *extra, *LOOP])  # fmt: skip


def test_train_only_and_modules_to_save_pick_the_right_parameters(tiny_model_dir: Path):
    model = Model.from_pretrained(str(tiny_model_dir))  # tied: embed_tokens and lm_head are one matrix
    n = train_only(model, ["embed_tokens", "lm_head"])
    assert {k for k, p in model.named_parameters() if p.requires_grad} == {"model.embed_tokens.weight"}
    assert n == model.model.embed_tokens.weight.numel()
    apply_lora(model, LoraConfig(rank=2, targets=["q"], modules_to_save=["embed_tokens"]))
    names = {k for k, p in model.named_parameters() if p.requires_grad}
    assert "model.embed_tokens.weight" in names and "model.layers.0.self_attn.q_proj.weight" not in names
    assert all(k == "model.embed_tokens.weight" or ".lora_" in k for k in names)


def test_stage1_grows_the_vocabulary_and_trains_only_embeddings(setup, capsys):
    base = Model.from_pretrained(str(setup["base"]))
    assert pretrain(setup, "cpt1", setup["base"], "--trainable", "embeddings") == 0
    assert "tokens to" in capsys.readouterr().out  # the --init model was resized for the extended tokenizer
    out = Model.from_pretrained(str(setup["runs"] / "v" / "checkpoints" / "cpt1"))
    new_size = Tokenizer.from_pretrained(setup["tok_ext"]).vocab_size
    assert out.cfg.vocab_size == new_size > base.cfg.vocab_size
    before, after = base.state_dict(), out.state_dict()
    for k, v in before.items():
        if "embed_tokens" in k or "lm_head" in k:
            assert not torch.equal(after[k][: v.shape[0]], v), k  # old rows learn too
        else:
            torch.testing.assert_close(after[k], v, atol=0, rtol=0)  # the transformer is frozen
    assert pretrain(setup, "bad", setup["base"], "--trainable", "embeddings", "--lora.rank", "4") == 2
    assert "choose one" in capsys.readouterr().err


def test_stage2_adapter_opens_in_peft_and_merges(setup, tmp_path: Path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    stage1 = setup["runs"] / "v" / "checkpoints" / "cpt1"
    if not (stage1 / "config.json").is_file():
        assert pretrain(setup, "cpt1", setup["base"], "--trainable", "embeddings") == 0
    lora = ["--lora.rank", "4", "--lora.targets", "q,v,up", "--lora.modules_to_save", "embed_tokens", "lm_head"]
    assert pretrain(setup, "cpt2", stage1, *lora) == 0
    cpt2 = setup["runs"] / "v" / "checkpoints" / "cpt2"
    conf = json.loads((cpt2 / "adapter" / "adapter_config.json").read_text())
    assert conf["modules_to_save"] == ["embed_tokens", "lm_head"] and conf["ensure_weight_tying"] is True
    merged = Model.from_pretrained(str(cpt2))
    s1 = Model.from_pretrained(str(stage1))
    assert not torch.equal(merged.model.embed_tokens.weight, s1.model.embed_tokens.weight)  # embeddings trained
    x = torch.randint(0, merged.cfg.vocab_size, (2, 16))
    with torch.no_grad():
        expected = merged.eval()(x)
        hf = transformers.AutoModelForCausalLM.from_pretrained(stage1, dtype=torch.float32)
        theirs = peft.PeftModel.from_pretrained(hf, cpt2 / "adapter").eval()(x).logits
    torch.testing.assert_close(theirs, expected, atol=1e-4, rtol=0)
    assert main(["merge", "--adapter", str(cpt2 / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    with torch.no_grad():
        ours = Model.from_pretrained(str(tmp_path / "merged")).eval()(x)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
