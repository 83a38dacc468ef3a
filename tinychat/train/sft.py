"""Supervised fine-tuning: next-token loss on the assistant's tokens of chat conversations.

`tinychat sft [--init DIR] [--data FILE]` turns a base model into a chat model. Rows are OpenAI
messages (system/user/assistant/tool, multi-turn, tool calls, optional "tools" schemas), rendered by the
tokenizer's ChatML renderer, whose mask is True exactly on what the assistant must produce (its content,
<tool_call> markup and the closing <|im_end|>): the loss is the cross-entropy on those tokens only,
averaged over every assistant token of the global batch (the loop's sum / count). Short conversations
are packed into rows of seq_len tokens (see chat_data). Evaluation: validation loss on the assistant
tokens of the validation rows, and task accuracy: greedy replies to the validation conversations
(without their last assistant turn) graded against that turn (or the row's "answer") by exact match.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from tinychat.config import field
from tinychat.data.tokenize import check_weights, skill_copies
from tinychat.errors import UserError
from tinychat.train import post
from tinychat.train.chat_data import Conversation, Prompt, encode_sft, read_rows, render, sft_batch, sft_rows
from tinychat.train.config import TrainConfig
from tinychat.train.distributed import all_reduce_sum
from tinychat.train.loop import TrainResult
from tinychat.train.pretrain import lm_loss
from tinychat.train.rewards import final_answer


@dataclass
class SFTConfig(post.PostConfig):
    stage: str = field("sft", help="checkpoint folder name under RUNS_DIR/NAME/checkpoints")
    train: TrainConfig = post.train_defaults(lr=1e-3, warmup_steps=20, batch_size=8, seq_len=512, eval_every=100)
    default_budget: ClassVar[dict[str, Any]] = {"epochs": 2.0}
    pack: bool = field(True, help="pack short conversations into rows of seq_len tokens (causal over the row)")
    eval_rows: int = field(32, help="validation conversations answered greedily for task accuracy (0 = off)")
    max_new_tokens: int = field(64, help="reply length limit when measuring task accuracy")
    skill_weights: dict[str, float] = field(
        {},
        help="copies of a training row by its 'skill' field (a TOML table; '*' for the rest, default 1): 0.25 keeps "
        "a quarter of those rows, 2 adds each twice, 0 drops them; validation rows are kept as they are",
    )


def weigh(rows: list[tuple[str, dict]], weights: dict[str, float]) -> list[tuple[str, dict]]:
    """Each row as many times as its skill's weight says (`skill_copies`); the same rows for the same input, every run.

    Why: a short SFT sees a fraction of an epoch, and rows of a few skills can fill it. On the speedrun's world
    the agent, knowledge-base and calculator transcripts (tool schemas, documents in context) are two thirds of
    the SFT tokens, so the skills with short rows (facts, instructions, refusals) get little of the step budget.
    """
    if not weights:
        return rows
    rng = random.Random(0)
    return [r for r in rows for _ in range(skill_copies(weights, str(r[1].get("skill", "")), rng))]


def task_prompts(tok: Any, rows: list[tuple[str, dict]]) -> list[Prompt]:
    """Validation rows as (prompt, expected answer): the row's "answer", else the final answer of its last plain
    assistant reply (what follows its "Answer:", as the reply is graded: a drill's worked sum ends "Answer: 132",
    and compared whole it never matched, so drills reported eval_accuracy 0 at any validation loss)."""
    out = []
    for where, row in rows:
        msgs = row["messages"]
        if not isinstance(msgs, list) or len(msgs) < 2:
            continue
        last = msgs[-1]
        if "answer" in row:
            prompt, target = msgs if last.get("role") != "assistant" else msgs[:-1], row
        elif last.get("role") == "assistant" and isinstance(last.get("content"), str) and not last.get("tool_calls"):
            prompt, target = msgs[:-1], {"answer": final_answer(last["content"])}
        else:
            continue
        out.append(Prompt(render(tok, prompt, row.get("tools"), where, generation_prompt=True).ids, target))
    return out


class SFTObjective(post.ItemObjective):
    """Items are packed rows: lists of conversation indices, seq_len + 1 tokens at most."""

    name = "sft"

    def __init__(
        self, cfg: SFTConfig, tok: Any, init: Any, convs: list[Conversation], val: list[Conversation], tasks: list
    ) -> None:
        super().__init__(cfg, tok, init)
        self.cfg: SFTConfig = cfg
        self.convs, self.val_convs, self.tasks = convs, val, tasks
        self.items = sft_rows(convs, cfg.train.seq_len, cfg.pack)
        self.val_rows = sft_rows(val, cfg.train.seq_len, cfg.pack)

    def batch(self, rows: list[list[int]], model: Any = None, convs: list[Conversation] | None = None) -> Any:
        width = self.cfg.train.seq_len if self.cfg.pack else None  # packed rows: one fixed shape
        x, y = sft_batch(self.convs if convs is None else convs, rows, self.tok.pad_id, width)
        return x.to(self.ctx.device), y.to(self.ctx.device)

    def count(self, batch: Any) -> int:
        return int((batch[1] != -100).sum())

    def tokens(self, batch: Any) -> int:
        return batch[0].numel()

    def loss(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return lm_loss(model, *batch), {}

    def evaluate(self, model: torch.nn.Module, step: int) -> dict[str, Any]:
        from tinychat.train.chat_data import shard

        cfg, ctx = self.cfg, self.ctx
        result: dict[str, Any] = {}
        sums = torch.zeros(2, device=ctx.device)
        for rows in self.eval_chunks(self.val_rows, cfg.train.batch_size * cfg.train.eval_batches * ctx.dist.world):
            x, y = self.batch(rows, convs=self.val_convs)
            with ctx.autocast():
                sums += torch.stack([lm_loss(model, x, y).float(), (y != -100).sum().float()])
        nats, n = all_reduce_sum(sums).tolist()
        if n:
            result["val_loss"] = nats / n
        if cfg.eval_rows and self.tasks:
            from tinychat.train.rollout import evaluate_prompts

            tasks = shard(self.tasks, ctx.dist.rank, ctx.dist.world, cfg.eval_rows)
            raw = getattr(model, "module", model)
            metrics, samples = evaluate_prompts(raw, self.tok, tasks, ctx, cfg.max_new_tokens)
            result.update(metrics)
            if ctx.dist.is_main and samples:
                result["samples"] = samples
        return result


def run_sft(cfg: SFTConfig) -> TrainResult:
    inputs = post.locate(cfg, ("anneal", "pretrain"), "sft")  # the speedrun's anneal, where it ran one
    tok, max_len = inputs.tok, cfg.train.seq_len + 1
    check_weights(cfg.skill_weights, "skill_weights")
    rows = weigh(read_rows(inputs.data, ("messages",), "sft"), cfg.skill_weights)
    if not rows:
        raise UserError(f"skill_weights {cfg.skill_weights} leave none of the rows of {inputs.data}.")
    convs, stats = encode_sft(tok, rows, max_len)
    val_rows = read_rows(inputs.val, ("messages",), "sft") if inputs.val else []
    val, _ = encode_sft(tok, val_rows, max_len)
    if not convs:
        raise UserError(f"{inputs.data}: no conversation has an assistant reply to learn.")
    print(
        f"sft: {stats['conversations']} conversations ({stats['truncated']} cut to {max_len} tokens, "
        f"{stats['no_targets']} without assistant tokens skipped), {len(val)} validation"
    )
    model = post.start_model(cfg, inputs)
    post.add_peft(model, cfg, tok)
    room = model.cfg.max_seq_len - cfg.max_new_tokens  # a longer prompt would shorten every reply of its batch
    tasks = [t for t in task_prompts(tok, val_rows) if len(t.ids) <= room]
    objective = SFTObjective(cfg, tok, inputs.init, convs, val, tasks)
    return post.launch(cfg, objective, model, inputs)


def run(cfg: SFTConfig) -> int:
    return post.report("sft", run_sft(cfg), ("val_loss", "eval_accuracy"))
