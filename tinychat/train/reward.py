"""Reward model: the transformer with a scalar head on the last token, trained on preference pairs.

`tinychat reward [--init SFT_DIR] [--data PAIRS]` learns r(prompt, reply) from pairs (chosen > rejected)
with the Bradley-Terry loss  -log sigmoid(r(x, y_chosen) - r(x, y_rejected)),  summed over pairs and
averaged by the loop over the pairs of the global batch. Evaluation: the same loss and the pairwise
accuracy (how often the chosen reply scores higher) on held-out pairs.

The saved directory is what transformers calls a sequence-classification model (Qwen3- / Llama- /
Qwen2ForSequenceClassification, num_labels=1, pad_token_id set): the decoder under `model.*` and the
head `score.weight` (d_model -> 1, no bias). transformers scores the last non-padding token; a
sequence here ends with the reply's <|im_end|>, so that is the token scored, by both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tinychat.config import field
from tinychat.errors import UserError
from tinychat.model.config import ModelConfig
from tinychat.model.transformer import Model, rope_inv_freq
from tinychat.train import post
from tinychat.train.chat_data import Pair, encode_pairs, pair_batch, read_rows
from tinychat.train.config import TrainConfig
from tinychat.train.distributed import all_reduce_sum
from tinychat.train.loop import TrainResult

PAIR_FIELDS = ("prompt", "chosen", "rejected")


class RewardModel(Model):
    """A Model whose LM head is replaced by `score`: hidden state of the last real token -> one number."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        del self.lm_head
        self.score = nn.Linear(cfg.d_model, 1, bias=False)
        nn.init.normal_(self.score.weight, std=cfg.init_std)

    @classmethod
    def from_causal_lm(cls, model: Model) -> RewardModel:
        """Turn a loaded causal LM into a reward model in place: same decoder, the head swapped.

        Re-classing the instance keeps every parameter (and LoRA wrapper) where it is: RewardModel adds
        methods and the `score` module, no other state.
        """
        model.__class__ = cls
        del model.lm_head
        model.score = nn.Linear(model.cfg.d_model, 1, bias=False, device=model.model.norm.weight.device)
        nn.init.normal_(model.score.weight, std=model.cfg.init_std)
        return model  # type: ignore[return-value]

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        """Scores (B,) in fp32 of right-padded sequences (B, T) with `lengths` real tokens each."""
        h = self.hidden_states(input_ids)
        last = (lengths if lengths is not None else torch.full_like(input_ids[:, 0], input_ids.shape[1])) - 1
        return self.score(h[torch.arange(len(h), device=h.device), last]).squeeze(-1).float()

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        cfg = self.cfg
        forward = 2 * self.num_params(exclude_embeddings=True) + 4 * cfg.n_layer * cfg.n_head * cfg.head_dim * (
            seq_len or cfg.max_seq_len
        )
        return float(3 * forward if training else forward)


def save_reward_model(model: RewardModel, path: Path, state: dict[str, torch.Tensor], pad_token_id: int) -> None:
    """Write config.json (…ForSequenceClassification, num_labels 1) and model.safetensors, atomically."""
    from tinychat.model.hf import config_to_hf, write_files_atomically

    cfg = config_to_hf(model.cfg)
    cfg["architectures"] = [cfg["architectures"][0].replace("ForCausalLM", "ForSequenceClassification")]
    cfg.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, num_labels=1)
    cfg["pad_token_id"] = model.cfg.pad_token_id if model.cfg.pad_token_id is not None else pad_token_id
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items() if k != "lm_head.weight"}
    write_files_atomically(
        path,
        {
            "config.json": (json.dumps(cfg, indent=2) + "\n").encode(),
            "model.safetensors": lambda p: save_file(tensors, str(p), metadata={"format": "pt"}),
        },
    )


def load_reward_model(path: str | Path) -> RewardModel:
    """Open a directory save_reward_model (or transformers, for these families) wrote."""
    from tinychat.model.hf import read_config
    from tinychat.model.hub import resolve_model_dir

    p = resolve_model_dir(path)
    cfg = read_config(p)
    archs = json.loads((p / "config.json").read_text()).get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise UserError(f"{p} is not a reward model (architectures {archs}); train one with `tinychat reward`.")
    with torch.device("meta"):
        model = RewardModel(cfg)
    try:
        weights = load_file(str(p / "model.safetensors"))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{p / 'model.safetensors'} cannot be read ({e}).") from None
    model = model.to_empty(device="cpu")
    try:
        model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True, assign=True)
    except RuntimeError as e:
        raise UserError(f"{p}: the weights do not match a reward model of this config ({str(e)[:200]}).") from None
    model.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
    return model.eval()


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair loss -log sigmoid(r_chosen - r_rejected) (B,)."""
    return -F.logsigmoid(chosen - rejected)


@dataclass
class RewardConfig(post.PostConfig):
    stage: str = field("reward", help="checkpoint folder name under RUNS_DIR/NAME/checkpoints")
    train: TrainConfig = post.train_defaults(lr=3e-4, warmup_steps=10, batch_size=16, eval_every=100)


class RewardObjective(post.ItemObjective):
    name = "reward"
    task_type = "SEQ_CLS"
    adapter_modules = ("score",)

    def __init__(self, cfg: RewardConfig, tok: Any, init: Any, pairs: list[Pair], val: list[Pair]) -> None:
        super().__init__(cfg, tok, init)
        self.items, self.val = pairs, val

    def batch(self, pairs: list[Pair], model: Any = None) -> tuple[torch.Tensor, ...]:
        return tuple(t.to(self.ctx.device) for t in pair_batch(pairs, self.tok.pad_id))

    def count(self, batch: Any) -> int:
        return batch[0].shape[0] // 2

    def tokens(self, batch: Any) -> int:
        return batch[0].numel()

    def loss(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ids, _, lengths = batch
        chosen, rejected = model(ids, lengths).chunk(2)
        margin = chosen - rejected
        metrics = {
            "accuracy": (margin > 0).float().sum(),
            "margin": margin.sum(),
            "chosen": chosen.sum(),
            "rejected": rejected.sum(),
        }
        return bradley_terry(chosen, rejected).sum(), metrics

    def evaluate(self, model: torch.nn.Module, step: int) -> dict[str, Any]:
        ctx = self.ctx
        sums = torch.zeros(3, device=ctx.device)
        for pairs in self.eval_chunks(self.val):
            with ctx.autocast():
                loss, m = self.loss(model, self.batch(pairs))
            sums += torch.stack([loss.float(), m["accuracy"], torch.tensor(float(len(pairs)), device=ctx.device)])
        loss, acc, n = all_reduce_sum(sums).tolist()
        return {"val_loss": loss / n, "val_accuracy": acc / n} if n else {}

    def write_model(self, model: torch.nn.Module, path: Path, state: dict[str, torch.Tensor]) -> None:
        save_reward_model(model, path, state, self.tok.pad_id)  # type: ignore[arg-type]


def load_pairs(tok: Any, path: Path | None, max_len: int, command: str) -> list[Pair]:
    """Preference pairs of a file (none for no file); reports pairs skipped for length, errors if none remain."""
    if path is None:
        return []
    pairs, skipped = encode_pairs(tok, read_rows(path, PAIR_FIELDS, command), max_len)
    if skipped:
        print(f"{command}: {skipped} pairs of {path} are longer than {max_len} tokens and were skipped")
    if not pairs:
        raise UserError(f"{path}: no preference pair fits in train.seq_len ({max_len}) tokens.")
    return pairs


def run_reward(cfg: RewardConfig) -> TrainResult:
    inputs = post.locate(cfg, ("sft",), "preference")
    pairs = load_pairs(inputs.tok, inputs.data, cfg.train.seq_len, "reward")
    val = load_pairs(inputs.tok, inputs.val, cfg.train.seq_len, "reward")
    print(f"reward: {len(pairs)} preference pairs, {len(val)} validation")
    config_file = inputs.init / "config.json"
    if config_file.is_file() and "ForSequenceClassification" in config_file.read_text():
        model = load_reward_model(inputs.init)  # continue training a reward model
    else:
        torch.manual_seed(cfg.train.seed)
        model = RewardModel.from_causal_lm(post.load_causal_lm(inputs.init))
    post.check_model(model, inputs.tok, cfg)
    post.add_peft(model, cfg, inputs.tok, heads=("score",))
    return post.launch(cfg, RewardObjective(cfg, inputs.tok, inputs.init, pairs, val), model, inputs)


def run(cfg: RewardConfig) -> int:
    return post.report("reward", run_reward(cfg), ("val_loss", "val_accuracy"))
