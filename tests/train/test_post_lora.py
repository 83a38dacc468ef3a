"""LoRA: zero-initialised B, merge equivalence, adapters off, PEFT's file format both ways, `tinychat merge`."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from tinychat.errors import UserError
from tinychat.model import Model
from tinychat.model.peft.lora import (
    LoraConfig,
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_disabled,
    merge_lora,
    merge_state,
    save_adapter,
)

X = torch.randint(16, 200, (2, 12))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(X)


def trained_lora(base_dir: Path, cfg: LoraConfig) -> Model:
    """The base with adapters whose B is random (as after training), so the update is not zero."""
    model = Model.from_pretrained(str(base_dir), dtype=torch.float32)
    apply_lora(model, cfg)
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    return model


def test_lora_starts_at_the_base_and_trains_only_the_adapters(tiny_model_dir: Path):
    base = Model.from_pretrained(str(tiny_model_dir))
    lora = copy.deepcopy(base)
    n = apply_lora(lora, LoraConfig(rank=4, targets=["q", "v"]))
    assert n == 2 * base.cfg.n_layer
    torch.testing.assert_close(logits(lora), logits(base), atol=0, rtol=0)  # B = 0
    names = {k for k, p in lora.named_parameters() if p.requires_grad}
    assert names and all(".lora_A." in k or ".lora_B." in k for k in names)
    assert "model.layers.0.self_attn.q_proj.weight" in lora.state_dict()  # base names unchanged
    with pytest.raises(UserError, match="unknown target 'qq'"):
        LoraConfig(rank=4, targets=["qq"]).leaf_names()


def test_merged_and_unmerged_give_the_same_logits(tiny_model_dir: Path):
    cfg = LoraConfig(rank=4, alpha=8, targets=["all"])
    lora = trained_lora(tiny_model_dir, cfg)
    unmerged = logits(lora)
    with lora_disabled(lora):
        torch.testing.assert_close(logits(lora), logits(Model.from_pretrained(str(tiny_model_dir))))
    assert (unmerged - logits(Model.from_pretrained(str(tiny_model_dir)))).abs().max() > 1e-3
    merged_sd = merge_state(lora.state_dict(), cfg.scaling)  # what a LoRA run saves
    plain = Model.from_pretrained(str(tiny_model_dir))
    plain.load_state_dict(merged_sd)
    torch.testing.assert_close(logits(plain), unmerged, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(merge_lora(lora)), unmerged, atol=1e-5, rtol=0)
    assert not any(isinstance(m, LoRALinear) for m in lora.modules())


def test_adapter_save_and_load_round_trip(tiny_model_dir: Path, tmp_path: Path):
    cfg = LoraConfig(rank=2, alpha=4, targets=["q", "k", "v", "o"])
    lora = trained_lora(tiny_model_dir, cfg)
    save_adapter(tmp_path / "adapter", lora.state_dict(), cfg, tiny_model_dir)
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    conf = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (
        conf["peft_type"] == "LORA"
        and conf["r"] == 2
        and conf["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    )
    size = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    assert size < 0.2 * (tiny_model_dir / "model.safetensors").stat().st_size  # a small file beside the base
    again = Model.from_pretrained(str(tiny_model_dir))
    load_adapter(again, tmp_path / "adapter")
    torch.testing.assert_close(logits(again), logits(lora), atol=0, rtol=0)
    from tinychat.train.post import load_causal_lm

    torch.testing.assert_close(logits(load_causal_lm(tmp_path / "adapter")), logits(lora), atol=1e-5, rtol=0)


def test_peft_opens_our_adapters_and_we_open_peft_adapters(tiny_model_dir: Path, tmp_path: Path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    cfg = LoraConfig(rank=4, alpha=16, targets=["q", "v", "up", "down"])
    lora = trained_lora(tiny_model_dir, cfg)
    save_adapter(tmp_path / "ours", lora.state_dict(), cfg, tiny_model_dir)
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(hf_base, tmp_path / "ours").eval()(X).logits
    torch.testing.assert_close(theirs, logits(lora), atol=1e-5, rtol=0)

    hf_base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    pcfg = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["k_proj", "o_proj", "gate_proj"], init_lora_weights=False)
    pm = peft.get_peft_model(hf_base, pcfg).eval()
    pm.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = pm(X).logits
    ours = Model.from_pretrained(str(tiny_model_dir))
    load_adapter(ours, tmp_path / "peft")
    torch.testing.assert_close(logits(ours), expected, atol=1e-5, rtol=0)


def test_merge_command_writes_a_model_transformers_opens(tiny_model_dir: Path, tmp_path: Path, capsys):
    from tinychat.cli import main

    cfg = LoraConfig(rank=4, targets=["q", "v"])
    lora = trained_lora(tiny_model_dir, cfg)
    save_adapter(tmp_path / "adapter", lora.state_dict(), cfg, tiny_model_dir)
    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    merged = Model.from_pretrained(str(tmp_path / "merged"))
    torch.testing.assert_close(logits(merged), logits(lora), atol=1e-5, rtol=0)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(hf(X).logits, logits(lora), atol=1e-4, rtol=0)
    capsys.readouterr()
    assert main(["merge", "--adapter", str(tmp_path / "missing"), "--out", str(tmp_path / "m2")]) == 2
    assert "adapter_config.json is missing" in capsys.readouterr().err
