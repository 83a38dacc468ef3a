"""What the suites talk to (tinychat.infer.complete: a tokenizer plus batched greedy completion of token-id
prompts, and loading a model directory), and deciding whether a model is a base or a chat model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from tinychat.infer.complete import Completer, LocalCompleter, load  # noqa: F401 - re-exported for the suites

Mode = Literal["base", "chat"]


# stages whose objective is next-token prediction on plain documents: their models are base models
BASE_STAGES = ("pretrain", "distill")


def detect_mode(model_dir: str | Path, stage: str = "", tokenizer: Any = None) -> Mode:
    """base or chat, by explicit rules in this order (first that applies wins):

    1. config.json's "tinychat_chat", which training records (tinychat.train.loop.record_stage): chat if the
       model met the chat template in training, post-training or chat rows mixed into pretraining, else base;
    2. a stage name given by the caller: pretrain and distill are base, any other (sft, dpo, grpo, ...) chat;
    3. config.json's "tinychat_stage", when a writer recorded one (same rule);
    4. a run checkpoint directory (.../checkpoints/STAGE or .../checkpoints/STAGE/step_N): the folder
       name is the stage (same rule);
    5. otherwise a directory whose tokenizer has a chat template with <|im_start|> is chat, else base.
    """
    d = Path(model_dir)
    try:
        record = json.loads((d / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        record = {}
    record = record if isinstance(record, dict) else {}
    if isinstance(record.get("tinychat_chat"), bool):
        return "chat" if record["tinychat_chat"] else "base"
    if stage:
        return "base" if stage in BASE_STAGES else "chat"
    hint = record.get("tinychat_stage")
    if isinstance(hint, str) and hint:
        return "base" if hint in BASE_STAGES else "chat"
    r = d.resolve()
    if r.parent.name == "checkpoints":
        return "base" if r.name in BASE_STAGES else "chat"
    if r.parent.parent.name == "checkpoints" and r.name.startswith("step_"):  # a resumable step directory
        return "base" if r.parent.name in BASE_STAGES else "chat"
    if tokenizer is None:
        try:
            cfg = json.loads((d / "tokenizer_config.json").read_text())
        except (OSError, json.JSONDecodeError):
            return "base"
        template = cfg.get("chat_template") or ""
        return "chat" if isinstance(template, str) and "<|im_start|>" in template else "base"
    template = getattr(tokenizer, "chat_template", None) or ""
    return "chat" if "<|im_start|>" in template and tokenizer.im_start_id is not None else "base"
