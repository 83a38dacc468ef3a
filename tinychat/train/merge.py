"""`tinychat merge`: fold a LoRA, DoRA or IA3 adapter into its base model's weights, giving a plain model directory.

Every post-training command with --peft.method lora/dora/ia3 (or --lora.rank) already writes the merged
model to checkpoints/STAGE/ and the adapter beside it (checkpoints/STAGE/adapter/); this command is for
adapters met elsewhere (trained by PEFT, shared without their base) or applied to another copy of the base.
The merged model computes the same logits as base + adapter (W' = W + (alpha/r) B A; DoRA rescales its
rows; IA3 multiplies rows or columns), at the base's speed. Prompt/prefix adapters have nothing to fold.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tinychat.config import field
from tinychat.errors import UserError


@dataclass
class MergeConfig:
    adapter: str = field("", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    base: str = field("", help="base model directory or hub id (default: the adapter's base_model_name_or_path)")
    out: str = field("", help="directory to write the merged model to")


def merge(adapter: Path, base: Path | None, out: Path) -> Path:
    from tinychat.model.hf import copy_tokenizer
    from tinychat.model.hub import resolve_model_dir
    from tinychat.model.peft import load_adapter, merge_adapters
    from tinychat.model.peft.common import adapter_base, read_adapter_config
    from tinychat.model.transformer import Model
    from tinychat.train.reward import RewardModel, save_reward_model

    conf = read_adapter_config(adapter)
    if conf["peft_type"] not in ("LORA", "IA3"):
        raise UserError(
            f"{adapter}: {conf['peft_type']} adapters cannot be merged into the weights; run them unmerged."
        )
    task = conf.get("task_type") or "CAUSAL_LM"
    if task not in ("CAUSAL_LM", "SEQ_CLS"):
        raise UserError(f"{adapter}: task_type {task} is not supported (CAUSAL_LM or SEQ_CLS).")
    base = resolve_model_dir(base) if base else adapter_base(adapter)
    model = Model.from_pretrained(str(base), dtype=torch.float32)
    if task == "SEQ_CLS":
        model = RewardModel.from_causal_lm(model)
    loaded, _ = load_adapter(model, adapter)  # modules it saved whole (a score head, embeddings) are placed too
    if task == "SEQ_CLS" and "score" not in (loaded.get("modules_to_save") or []):
        raise UserError(f"{adapter}: a SEQ_CLS adapter must carry the score head (score.weight).")
    merge_adapters(model)
    if task == "SEQ_CLS":
        pad = model.cfg.pad_token_id
        if pad is None and (base / "tokenizer.json").is_file():
            from tinychat.tokenizer import Tokenizer

            pad = Tokenizer.from_pretrained(base).pad_id
        save_reward_model(model, out, model.state_dict(), pad if pad is not None else 0)  # type: ignore[arg-type]
    else:
        model.save_pretrained(str(out), dtype=torch.float32)
    copy_tokenizer(base if (base / "tokenizer.json").is_file() else adapter, out)
    return out


def run(cfg: MergeConfig) -> int:
    if not cfg.adapter or not cfg.out:
        raise UserError("merge needs --adapter DIR and --out DIR.")
    out = merge(Path(cfg.adapter), Path(cfg.base) if cfg.base else None, Path(cfg.out))
    print(f"merge: {cfg.adapter} + its base -> {out}")
    return 0
