"""Random LoRA adapters in PEFT's format over a model directory, for the multi-adapter serving tests."""

from __future__ import annotations

from pathlib import Path

import torch

from tinychat.model import Model
from tinychat.model.peft.lora import LoraConfig, LoRALinear, apply_lora, save_adapter

ALL = ("q", "k", "v", "o", "gate", "up", "down")


def make_lora(
    base_dir: Path, out: Path, seed: int, rank: int = 4, targets: tuple[str, ...] = ALL, std: float = 0.3
) -> Path:
    """A LoRA adapter of `base_dir` with random, non-zero B (as after training), saved to `out` (PEFT's files)."""
    model = Model.from_pretrained(str(base_dir), dtype=torch.float32)
    cfg = LoraConfig(rank=rank, alpha=2.0 * rank, targets=list(targets))
    torch.manual_seed(seed)
    apply_lora(model, cfg)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B.weight, std=std)
    save_adapter(out, model.state_dict(), cfg, base_dir)
    return out
